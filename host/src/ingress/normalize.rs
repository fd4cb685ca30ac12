//! Normalisation: provider, kind, action and delivery id from a verified request.
//!
//! Kinds and delivery ids come from the provider's headers where it sends them,
//! not from guesses; the body is read once, by a small borrowing probe that
//! pulls out the few fields needed (action, type, id) without building a tree,
//! and that rejects malformed, non-UTF-8 and absurdly nested JSON.

use std::fmt;
use std::marker::PhantomData;

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

use super::NewEvent;
use super::verify::Verified;
use crate::event::Provider;

/// Headers never stored: they carry credentials.
const DROPPED_HEADERS: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-gitlab-token",
];

/// Longest kind or action kept; a longer header value is refused.
const MAX_NAME_LEN: usize = 256;

/// A verified request that is still not an event we can take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    /// The body is empty.
    #[error("the body is empty")]
    Empty,
    /// The body is not a JSON object (or, for a form body, has no JSON `payload`).
    #[error("the body is not a JSON object: {0}")]
    NotJson(String),
    /// A header the provider always sends is missing.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is not usable as a name (too long, not visible ASCII).
    #[error("header {0} is not a usable value")]
    BadHeader(&'static str),
}

/// How the source names its deliveries and kinds (only the generic `hmac`
/// provider needs to be told).
#[derive(Debug, Clone, Default)]
pub struct Naming {
    /// The header carrying the delivery id.
    pub delivery_header: Option<http::HeaderName>,
    /// The header carrying the event kind.
    pub kind_header: Option<http::HeaderName>,
}

/// Builds the event to store from a verified request.
pub fn normalize(
    source: &str,
    provider: Provider,
    naming: &Naming,
    verified: Verified,
    received_at_ms: i64,
) -> Result<NewEvent, NormalizeError> {
    let (headers, raw) = verified.into_parts();
    if raw.is_empty() {
        return Err(NormalizeError::Empty);
    }
    let body = payload_document(provider, &headers, raw)?;
    check_shape(&body)?;
    let probe: Probe =
        serde_json::from_slice(&body).map_err(|e| NormalizeError::NotJson(e.to_string()))?;

    let hdr = |name: &'static str| -> Result<Option<String>, NormalizeError> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => match v.to_str() {
                Ok(s) if !s.is_empty() && s.len() <= MAX_NAME_LEN => Ok(Some(s.to_string())),
                _ => Err(NormalizeError::BadHeader(name)),
            },
        }
    };
    let need = |name: &'static str| hdr(name)?.ok_or(NormalizeError::MissingHeader(name));

    let (kind, action, delivery) = match provider {
        Provider::Github => (
            need("x-github-event")?,
            probe.action.0,
            hdr("x-github-delivery")?,
        ),
        Provider::Gitlab => {
            // Idempotency-Key stays the same across GitLab's retries; the event
            // UUID is the fallback for older GitLab versions.
            let delivery = hdr("idempotency-key")?
                .or(hdr("x-gitlab-event-uuid")?)
                .or(hdr("webhook-id")?);
            let action = probe
                .object_attributes
                .0
                .and_then(|o| o.action.0)
                .or(probe.action.0);
            (need("x-gitlab-event")?, action, delivery)
        }
        Provider::StandardWebhooks => {
            let delivery = hdr("webhook-id")?.or(hdr("svix-id")?);
            (
                probe.type_.0.unwrap_or_else(|| "unknown".into()),
                None,
                delivery,
            )
        }
        Provider::Stripe => (
            probe.type_.0.unwrap_or_else(|| "unknown".into()),
            None,
            probe.id.0,
        ),
        Provider::Slack => {
            let inner = probe.event.0.and_then(|e| e.type_.0);
            let outer = probe.type_.0;
            let kind = match (outer.as_deref(), inner) {
                (Some("event_callback"), Some(inner)) => inner,
                (Some(_), _) => outer.unwrap_or_default(),
                (None, _) if probe.command.0.is_some() => "slash_command".into(),
                (None, _) => "unknown".into(),
            };
            (kind, None, probe.event_id.0)
        }
        Provider::Linear => {
            let kind = hdr("linear-event")?
                .or(probe.type_.0)
                .unwrap_or_else(|| "unknown".into());
            (kind, probe.action.0, hdr("linear-delivery")?)
        }
        Provider::Hmac | Provider::None => {
            let kind = match &naming.kind_header {
                Some(h) => headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                None => None,
            };
            let delivery = match &naming.delivery_header {
                Some(h) => headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                None => None,
            };
            (
                kind.or(probe.type_.0).unwrap_or_else(|| "unknown".into()),
                probe.action.0,
                delivery,
            )
        }
    };
    let delivery_id = match delivery.filter(|d| !d.is_empty() && d.len() <= MAX_NAME_LEN) {
        Some(d) => d,
        None => format!("sha256:{}", hex::encode(Sha256::digest(&body))),
    };
    let action = action.filter(|a| !a.is_empty() && a.len() <= MAX_NAME_LEN);
    let kind = if kind.is_empty() {
        "unknown".to_string()
    } else {
        kind
    };
    if kind.len() > MAX_NAME_LEN {
        return Err(NormalizeError::BadHeader("kind"));
    }

    Ok(NewEvent {
        source: source.to_string(),
        provider,
        kind,
        action,
        delivery_id,
        received_at_ms,
        headers: kept_headers(&headers),
        body,
    })
}

/// Deepest nesting accepted; the same as the JSON parser's own limit, so a
/// stored payload always parses again when the router reads it.
const MAX_DEPTH: usize = 128;

/// Refuses what is not a JSON object and what nests deeper than [`MAX_DEPTH`].
/// The probe below skips unneeded values without a depth limit, so depth is
/// checked here in one pass over the bytes (outside strings).
fn check_shape(body: &[u8]) -> Result<(), NormalizeError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(NormalizeError::NotJson("expected a JSON object".into()));
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(NormalizeError::NotJson(format!(
                        "nested deeper than {MAX_DEPTH} levels"
                    )));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// The JSON document inside the body: the body itself, or the `payload` field of
/// a form-encoded body (GitHub's and Slack's `application/x-www-form-urlencoded`).
/// A Slack slash command (a form with no `payload`) becomes a JSON object of its fields.
fn payload_document(
    provider: Provider,
    headers: &HeaderMap,
    raw: Bytes,
) -> Result<Bytes, NormalizeError> {
    let is_form = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .starts_with("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Ok(raw);
    }
    let mut fields = serde_json::Map::new();
    for (k, v) in form_urlencoded::parse(&raw) {
        if k == "payload" {
            return Ok(Bytes::from(v.into_owned()));
        }
        fields.insert(k.into_owned(), serde_json::Value::String(v.into_owned()));
    }
    if provider == Provider::Slack && !fields.is_empty() {
        return Ok(Bytes::from(
            serde_json::to_vec(&fields).expect("a map of strings serialises"),
        ));
    }
    Err(NormalizeError::NotJson(
        "form-encoded body without a `payload` field".into(),
    ))
}

fn kept_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| !DROPPED_HEADERS.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// The few body fields normalisation needs. Every field is lenient: a value of
/// another type than expected is ignored rather than failing the request.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Probe {
    action: Text,
    #[serde(rename = "type")]
    type_: Text,
    id: Text,
    event_id: Text,
    command: Text,
    event: Nested<Inner>,
    object_attributes: Nested<Inner>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Inner {
    action: Text,
    #[serde(rename = "type")]
    type_: Text,
}

/// A string field; any other JSON value reads as absent.
#[derive(Default)]
struct Text(Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(Some(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(Some(v)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// An object field read as `T`; any other JSON value reads as absent.
struct Nested<T>(Option<T>);

impl<T> Default for Nested<T> {
    fn default() -> Self {
        Nested(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Nested<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Nested<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Nested<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(|t| Nested(Some(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Nested<T>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Nested(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Nested<T>, E> {
                Ok(Nested(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Nested<T>, E> {
                Ok(Nested(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Nested<T>, E> {
                Ok(Nested(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Nested<T>, E> {
                Ok(Nested(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Nested<T>, E> {
                Ok(Nested(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Nested<T>, E> {
                Ok(Nested(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}
