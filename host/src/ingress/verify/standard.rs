//! Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`.
//!
//! The key is the base64 part of a `whsec_` secret; the signed content is
//! `{id}.{timestamp}.{body}`; the signature header holds space-separated
//! `v1,<base64>` entries, any of which may match (at most [`MAX_SIGNATURES`]
//! entries; a header with more is malformed). `svix-*` headers are accepted
//! as aliases, since Svix senders still use them (not for GitLab, which never
//! sends them). The signed `webhook-id` is the delivery id.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use http::HeaderMap;

use super::{MAX_SIGNATURES, MacKeys, VerifyError, check_timestamp, header};
use crate::secret::Secret;

/// A Standard Webhooks secret that is not `whsec_` + base64.
#[derive(Debug, thiserror::Error)]
#[error("expected a `whsec_` secret with a base64 key")]
pub struct BadKey;

/// The Standard Webhooks scheme (also GitLab's signing token).
#[derive(Debug)]
pub struct StandardWebhooks {
    keys: MacKeys,
    tolerance: Duration,
}

/// The three headers, read from the `webhook-*` names (and, where the sender
/// may use them, the `svix-*` aliases).
pub(super) struct Headers<'a> {
    pub id: &'a str,
    pub timestamp: &'a str,
    pub signature: &'a str,
}

/// Which header names a sender may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Names {
    /// `webhook-*`, or the `svix-*` aliases Svix senders still use.
    WithSvixAliases,
    /// `webhook-*` only (GitLab never sends `svix-*`: an alias there could
    /// only carry an id normalisation would not read).
    WebhookOnly,
}

impl<'a> Headers<'a> {
    /// `Ok(None)` when no signature header of an accepted name is present.
    pub(super) fn read(headers: &'a HeaderMap, names: Names) -> Result<Option<Self>, VerifyError> {
        let pick = |a: &'static str, b: &'static str| -> Result<Option<&'a str>, VerifyError> {
            match (header(headers, a)?, names) {
                (Some(v), _) => Ok(Some(v)),
                (None, Names::WithSvixAliases) => header(headers, b),
                (None, Names::WebhookOnly) => Ok(None),
            }
        };
        let Some(signature) = pick("webhook-signature", "svix-signature")? else {
            return Ok(None);
        };
        let id = pick("webhook-id", "svix-id")?.ok_or(VerifyError::MissingHeader("webhook-id"))?;
        let timestamp = pick("webhook-timestamp", "svix-timestamp")?
            .ok_or(VerifyError::MissingHeader("webhook-timestamp"))?;
        Ok(Some(Headers {
            id,
            timestamp,
            signature,
        }))
    }
}

impl StandardWebhooks {
    /// A verifier accepting any of `secrets` (each `whsec_<base64>`).
    pub fn new(secrets: &[Secret], tolerance: Duration) -> Result<Self, BadKey> {
        let keys = secrets
            .iter()
            .map(|s| decode_key(s.expose()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StandardWebhooks {
            keys: MacKeys::new(keys.iter().map(Vec::as_slice)),
            tolerance,
        })
    }

    /// Checks a request; on success returns the signed `webhook-id`.
    pub(super) fn check(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<String, VerifyError> {
        let h = Headers::read(headers, Names::WithSvixAliases)?
            .ok_or(VerifyError::MissingHeader("webhook-signature"))?;
        self.check_parts(&h, body, now)?;
        Ok(h.id.to_string())
    }

    pub(super) fn check_parts(
        &self,
        h: &Headers<'_>,
        body: &[u8],
        now: i64,
    ) -> Result<(), VerifyError> {
        check_timestamp(h.timestamp, now, self.tolerance, "webhook-timestamp")?;
        let signed = [
            h.id.as_bytes(),
            b".",
            h.timestamp.trim().as_bytes(),
            b".",
            body,
        ];
        // Parse every entry first, then MAC once: the body is hashed once per
        // key however many entries the header holds.
        let mut saw_v1 = false;
        let mut sigs: Vec<[u8; 32]> = Vec::new();
        for (n, entry) in h.signature.split_ascii_whitespace().enumerate() {
            if n == MAX_SIGNATURES {
                return Err(VerifyError::Malformed("webhook-signature"));
            }
            let Some(b64) = entry.strip_prefix("v1,") else {
                continue;
            };
            saw_v1 = true;
            if let Some(sig) = B64.decode(b64).ok().and_then(|s| s.try_into().ok()) {
                sigs.push(sig);
            }
        }
        if !saw_v1 {
            return Err(VerifyError::Malformed("webhook-signature"));
        }
        let candidates: Vec<&[u8]> = sigs.iter().map(|s| s.as_slice()).collect();
        if !candidates.is_empty() && self.keys.any_matches(&signed, &candidates) {
            Ok(())
        } else {
            Err(VerifyError::Mismatch("webhook-signature"))
        }
    }

    /// The three headers a sender would add for `body`, signed with the
    /// first secret.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> Vec<(&'static str, String)> {
        let ts = timestamp.to_string();
        let sig = self
            .keys
            .sign(&[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
        signed_headers(id, ts, [sig])
    }

    /// The three headers for `body` with one `v1,` entry per secret, in the
    /// order the secrets were given, so a receiver holding any one of them
    /// verifies it (secret rotation). With no secrets the signature header
    /// is empty.
    pub fn sign_all(&self, id: &str, timestamp: i64, body: &[u8]) -> Vec<(&'static str, String)> {
        let ts = timestamp.to_string();
        let sigs = self
            .keys
            .sign_each(&[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
        signed_headers(id, ts, sigs)
    }
}

fn signed_headers(
    id: &str,
    ts: String,
    sigs: impl IntoIterator<Item = Vec<u8>>,
) -> Vec<(&'static str, String)> {
    let signature = sigs
        .into_iter()
        .map(|sig| format!("v1,{}", B64.encode(sig)))
        .collect::<Vec<_>>()
        .join(" ");
    vec![
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", ts),
        ("webhook-signature", signature),
    ]
}

fn decode_key(secret: &[u8]) -> Result<Vec<u8>, BadKey> {
    let b64 = secret.strip_prefix(b"whsec_").unwrap_or(secret);
    B64.decode(b64)
        .map_err(|_| BadKey)
        .and_then(|k| if k.is_empty() { Err(BadKey) } else { Ok(k) })
}
