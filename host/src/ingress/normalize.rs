//! Normalisation: provider, kind, action and delivery id from a verified request.
//!
//! Kinds and delivery ids come from what the provider sends, not from guesses,
//! and signed bytes win over unsigned headers: the delivery id is marked
//! signed only where the signature covered it (see [`crate::event::IdOrigin`]),
//! and the body decides whether it is JSON or a form. The body is read once,
//! by a small borrowing probe that pulls out the few fields needed (action,
//! type, id) without building a tree, and that rejects malformed, non-UTF-8
//! and absurdly nested JSON.

use std::fmt;

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

use super::NewEvent;
use super::verify::Verified;
use crate::event::{IdOrigin, Provider};

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
    let signed_id = verified.signed_id().map(str::to_string);
    let body_signed = verified.body_signed();
    let (headers, raw) = verified.into_parts();
    if raw.is_empty() {
        return Err(NormalizeError::Empty);
    }
    let body = payload_document(provider, raw)?;
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
    // An id the signature covered, from the verifier, or one read from a
    // header nobody signed; an id inside a signed body is signed.
    let signed = |id: Option<String>| id.map(|d| (d, IdOrigin::Signed));
    let unsigned = |id: Option<String>| id.map(|d| (d, IdOrigin::Unsigned));
    let from_body = |id: Option<String>| {
        id.map(|d| {
            let origin = if body_signed {
                IdOrigin::Signed
            } else {
                IdOrigin::Unsigned
            };
            (d, origin)
        })
    };

    let (kind, action, delivery) = match provider {
        Provider::Github => (
            need("x-github-event")?,
            probe.action.0,
            unsigned(hdr("x-github-delivery")?),
        ),
        Provider::Gitlab => {
            // Idempotency-Key stays the same across GitLab's retries. With the
            // signing token GitLab sends it again as `webhook-id`, which the
            // signature covers: the verifier hands that one over, so a replay
            // with a fresh unsigned Idempotency-Key is still a duplicate. The
            // event UUID is the fallback for GitLab versions before
            // Idempotency-Key.
            let delivery = match signed(signed_id) {
                Some(d) => Some(d),
                None => unsigned(hdr("idempotency-key")?.or(hdr("x-gitlab-event-uuid")?)),
            };
            let action = probe
                .object_attributes
                .0
                .and_then(|o| o.action.0)
                .or(probe.action.0);
            (need("x-gitlab-event")?, action, delivery)
        }
        Provider::StandardWebhooks => {
            let delivery = match signed(signed_id) {
                Some(d) => Some(d),
                None => unsigned(hdr("webhook-id")?.or(hdr("svix-id")?)),
            };
            (
                probe.type_.0.unwrap_or_else(|| "unknown".into()),
                None,
                delivery,
            )
        }
        Provider::Stripe => (
            probe.type_.0.unwrap_or_else(|| "unknown".into()),
            None,
            from_body(probe.id.0),
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
            (kind, None, from_body(probe.event_id.0))
        }
        Provider::Linear => {
            // Linear signs the body, whose `type` names the kind; the
            // `Linear-Event` header says the same unsigned, so it is not read.
            let kind = probe.type_.0.unwrap_or_else(|| "unknown".into());
            (kind, probe.action.0, unsigned(hdr("linear-delivery")?))
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
                unsigned(delivery),
            )
        }
    };
    let body_sha256 = hex::encode(Sha256::digest(&body));
    let (delivery_id, id_origin) =
        match delivery.filter(|(d, _)| !d.is_empty() && d.len() <= MAX_NAME_LEN) {
            Some(d) => d,
            None => (format!("sha256:{body_sha256}"), IdOrigin::Body),
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
        id_origin,
        body_sha256,
        received_at_ms,
        headers: kept_headers(&headers),
        body,
    })
}

/// The JSON document inside the body. The signed bytes decide how they are
/// read, never an unsigned header: a body that is a JSON object is JSON
/// whatever `Content-Type` says (so a string holding `&payload=…` cannot turn
/// it into a form carrying other JSON). Only providers that send forms have
/// them decoded: GitHub's `payload=` form and Slack's interactivity
/// (`payload=`) and slash commands (a form of fields, made a JSON object).
fn payload_document(provider: Provider, raw: Bytes) -> Result<Bytes, NormalizeError> {
    let json_object = raw
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    if json_object || !matches!(provider, Provider::Github | Provider::Slack) {
        return Ok(raw);
    }
    let mut fields = serde_json::Map::new();
    for (k, v) in form_urlencoded::parse(&raw) {
        if k == "payload" {
            return Ok(Bytes::from(v.into_owned()));
        }
        fields.insert(k.into_owned(), serde_json::Value::String(v.into_owned()));
    }
    if provider == Provider::Slack && fields.contains_key("command") {
        return Ok(Bytes::from(
            serde_json::to_vec(&fields).expect("a map of strings serialises"),
        ));
    }
    Err(NormalizeError::NotJson(
        "neither a JSON object nor a form with a `payload` (or Slack `command`) field".into(),
    ))
}

fn kept_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| !DROPPED_HEADERS.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// The few body fields normalisation needs, read in one pass that also
/// rejects what is not a JSON object and what nests deeper than the JSON
/// parser's limit (128) — so a stored payload always parses again when the
/// router reads it. Every skipped value goes through `deserialize_any`, which
/// serde_json depth-checks (its `IgnoredAny` fast path does not). Fields are
/// lenient: a value of another type than expected reads as absent.
#[derive(Default)]
struct Probe {
    action: Text,
    type_: Text,
    id: Text,
    event_id: Text,
    command: Text,
    event: Nested,
    object_attributes: Nested,
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ProbeVisitor)
    }
}

struct ProbeVisitor;

impl<'de> Visitor<'de> for ProbeVisitor {
    type Value = Probe;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Probe, A::Error> {
        let mut p = Probe::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Action => p.action = map.next_value()?,
                Key::Type => p.type_ = map.next_value()?,
                Key::Id => p.id = map.next_value()?,
                Key::EventId => p.event_id = map.next_value()?,
                Key::Command => p.command = map.next_value()?,
                Key::Event => p.event = map.next_value()?,
                Key::ObjectAttributes => p.object_attributes = map.next_value()?,
                Key::Other => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(p)
    }
}

/// The object keys the probe reads; everything else is `Other`.
enum Key {
    Action,
    Type,
    Id,
    EventId,
    Command,
    Event,
    ObjectAttributes,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "action" => Key::Action,
                    "type" => Key::Type,
                    "id" => Key::Id,
                    "event_id" => Key::EventId,
                    "command" => Key::Command,
                    "event" => Key::Event,
                    "object_attributes" => Key::ObjectAttributes,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// Any JSON value, skipped, with the parser's depth check.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Lenient(|| Skip))
    }
}

/// A visitor that accepts any value: scalars give `absent()`, arrays and
/// objects are skipped element by element through [`Skip`].
struct Lenient<F>(F);

macro_rules! absent_for {
    ($($method:ident($ty:ty)),*) => {$(
        fn $method<E: de::Error>(self, _: $ty) -> Result<T, E> {
            Ok((self.0)())
        }
    )*};
}

impl<'de, T, F: FnOnce() -> T> Visitor<'de> for Lenient<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    absent_for!(
        visit_bool(bool),
        visit_i64(i64),
        visit_u64(u64),
        visit_f64(f64),
        visit_str(&str)
    );
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok((self.0)())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok((self.0)())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok((self.0)())
    }
}

/// Visitor methods that read a scalar of no interest as `$val`.
macro_rules! absent {
    ($ret:ty = $val:expr; $($method:ident($ty:ty)),*) => {$(
        fn $method<E: de::Error>(self, _: $ty) -> Result<$ret, E> {
            Ok($val)
        }
    )*};
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
            absent!(Text = Text(None); visit_bool(bool), visit_i64(i64), visit_u64(u64), visit_f64(f64));
            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Text, A::Error> {
                Lenient(|| Text(None)).visit_seq(seq)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Text, A::Error> {
                Lenient(|| Text(None)).visit_map(map)
            }
        }
        d.deserialize_any(V)
    }
}

/// A nested object read as a [`Probe`]; any other JSON value reads as absent.
#[derive(Default)]
struct Nested(Option<Box<Probe>>);

impl<'de> Deserialize<'de> for Nested {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Nested;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Nested, A::Error> {
                ProbeVisitor
                    .visit_map(map)
                    .map(|p| Nested(Some(Box::new(p))))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Nested, A::Error> {
                Lenient(|| Nested(None)).visit_seq(seq)
            }
            absent!(Nested = Nested(None); visit_str(&str), visit_bool(bool), visit_i64(i64), visit_u64(u64), visit_f64(f64));
            fn visit_unit<E: de::Error>(self) -> Result<Nested, E> {
                Ok(Nested(None))
            }
        }
        d.deserialize_any(V)
    }
}
