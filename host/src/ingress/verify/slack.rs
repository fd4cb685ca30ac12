//! Slack: `X-Slack-Signature: v0=<hex HMAC-SHA256(secret, "v0:{ts}:{body}")>`
//! with `X-Slack-Request-Timestamp`.

use std::time::Duration;

use http::HeaderMap;

use super::{MacKeys, VerifyError, check_timestamp, hex_mac, required};
use crate::secret::Secret;

/// Slack's v0 signing secret scheme.
#[derive(Debug)]
pub struct Slack {
    keys: MacKeys,
    tolerance: Duration,
}

impl Slack {
    /// A verifier accepting any of `secrets`.
    pub fn new(secrets: &[Secret], tolerance: Duration) -> Self {
        Slack {
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
        let sig = required(headers, "x-slack-signature")?;
        let ts = required(headers, "x-slack-request-timestamp")?;
        let hex_sig = sig
            .strip_prefix("v0=")
            .ok_or(VerifyError::Malformed("X-Slack-Signature"))?;
        let raw = hex_mac(hex_sig, "X-Slack-Signature")?;
        check_timestamp(ts, now, self.tolerance, "X-Slack-Request-Timestamp")?;
        if self
            .keys
            .any_matches(&[b"v0:", ts.trim().as_bytes(), b":", body], &[&raw])
        {
            Ok(())
        } else {
            Err(VerifyError::Mismatch("X-Slack-Signature"))
        }
    }

    /// The two headers Slack would send for `body` at `timestamp`.
    pub fn sign(&self, timestamp: i64, body: &[u8]) -> Vec<(&'static str, String)> {
        let ts = timestamp.to_string();
        let sig = self.keys.sign(&[b"v0:", ts.as_bytes(), b":", body]);
        vec![
            ("X-Slack-Request-Timestamp", ts),
            ("X-Slack-Signature", format!("v0={}", hex::encode(sig))),
        ]
    }
}
