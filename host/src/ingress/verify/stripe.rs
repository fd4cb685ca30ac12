//! Stripe: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]`.
//!
//! The key is the whole `whsec_…` string as bytes (Stripe does not decode it);
//! the signed content is `{t}.{body}`. Several `v1` entries may be present
//! during Stripe's own secret rotation; any match is enough. At most
//! [`MAX_SIGNATURES`] signature entries are read: a header with more is malformed.

use std::time::Duration;

use http::HeaderMap;

use super::{MAX_SIGNATURES, MacKeys, VerifyError, check_timestamp, hex_mac, required};
use crate::secret::Secret;

const NAME: &str = "Stripe-Signature";

/// Stripe's scheme.
#[derive(Debug)]
pub struct Stripe {
    keys: MacKeys,
    tolerance: Duration,
}

impl Stripe {
    /// A verifier accepting any of `secrets`.
    pub fn new(secrets: &[Secret], tolerance: Duration) -> Self {
        Stripe {
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
        let value = required(headers, "stripe-signature")?;
        let mut t = None;
        let mut sigs = Vec::new();
        let mut entries = 0;
        for item in value.split(',') {
            match item.trim().split_once('=') {
                Some(("t", v)) => t = Some(v),
                Some((scheme, v)) => {
                    // Every signature entry counts toward the cap, whatever its scheme.
                    entries += 1;
                    if entries > MAX_SIGNATURES {
                        return Err(VerifyError::Malformed(NAME));
                    }
                    if scheme == "v1" {
                        sigs.push(v);
                    }
                }
                // Stripe's own libraries skip items they cannot split.
                None => {}
            }
        }
        let t = t.ok_or(VerifyError::Malformed(NAME))?;
        if sigs.is_empty() {
            return Err(VerifyError::Malformed(NAME));
        }
        check_timestamp(t, now, self.tolerance, NAME)?;
        // Decode every entry, then MAC once: one MAC of the body per key.
        let sigs: Vec<[u8; 32]> = sigs.iter().filter_map(|s| hex_mac(s, NAME).ok()).collect();
        let candidates: Vec<&[u8]> = sigs.iter().map(|s| s.as_slice()).collect();
        if !candidates.is_empty()
            && self
                .keys
                .any_matches(&[t.as_bytes(), b".", body], &candidates)
        {
            Ok(())
        } else {
            Err(VerifyError::Mismatch(NAME))
        }
    }

    /// The header Stripe would send for `body` at `timestamp`.
    pub fn sign(&self, timestamp: i64, body: &[u8]) -> (&'static str, String) {
        let t = timestamp.to_string();
        let sig = self.keys.sign(&[t.as_bytes(), b".", body]);
        (NAME, format!("t={t},v1={}", hex::encode(sig)))
    }
}
