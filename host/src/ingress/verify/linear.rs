//! Linear: `Linear-Signature: <hex HMAC-SHA256(secret, body)>`, and the body's
//! `webhookTimestamp` (milliseconds) within the tolerance window when present.
//!
//! Linear always sends `webhookTimestamp` and it is covered by the signature, so
//! a replayed real delivery always carries its old timestamp and is refused; a
//! body without it is refused too.

use std::time::Duration;

use http::HeaderMap;
use serde::Deserialize;

use super::{MacKeys, VerifyError, hex_mac, required};
use crate::secret::Secret;

/// Linear's scheme.
#[derive(Debug)]
pub struct Linear {
    keys: MacKeys,
    tolerance: Duration,
}

#[derive(Deserialize)]
struct Stamp {
    #[serde(rename = "webhookTimestamp")]
    webhook_timestamp: Option<i64>,
}

impl Linear {
    /// A verifier accepting any of `secrets`.
    pub fn new(secrets: &[Secret], tolerance: Duration) -> Self {
        Linear {
            keys: MacKeys::from_secrets(secrets),
            tolerance,
        }
    }

    pub(super) fn check(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<(), VerifyError> {
        let sig = required(headers, "linear-signature")?;
        let raw = hex_mac(sig, "Linear-Signature")?;
        if !self.keys.any_matches(&[body], &[&raw]) {
            return Err(VerifyError::Mismatch("Linear-Signature"));
        }
        // Only after the signature holds is the body worth parsing. Linear
        // always sends the timestamp (its SDK requires it): without it there is
        // no replay protection, so its absence is refused.
        let ms = match serde_json::from_slice::<Stamp>(body) {
            Ok(Stamp {
                webhook_timestamp: Some(ms),
            }) => ms,
            _ => return Err(VerifyError::MissingHeader("webhookTimestamp")),
        };
        if now.saturating_mul(1000).abs_diff(ms) > self.tolerance.as_millis() as u64 {
            return Err(VerifyError::Stale("webhookTimestamp"));
        }
        Ok(())
    }

    /// The header Linear would send for `body`.
    pub fn sign(&self, body: &[u8]) -> (&'static str, String) {
        ("Linear-Signature", hex::encode(self.keys.sign(&[body])))
    }
}
