//! Stripe: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]`.
//!
//! The key is the whole `whsec_…` string as bytes (Stripe does not decode it);
//! the signed content is `{t}.{body}`. Several `v1` entries may be present
//! during Stripe's own secret rotation; any match is enough.

use std::time::Duration;

use http::HeaderMap;

use super::{MacKeys, VerifyError, check_timestamp, hex_mac, required};
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
        for item in value.split(',') {
            match item.trim().split_once('=') {
                Some(("t", v)) => t = Some(v),
                Some(("v1", v)) => sigs.push(v),
                Some(_) => {}
                // Stripe's own libraries skip items they cannot split.
                None => {}
            }
        }
        let t = t.ok_or(VerifyError::Malformed(NAME))?;
        if sigs.is_empty() {
            return Err(VerifyError::Malformed(NAME));
        }
        check_timestamp(t, now, self.tolerance, NAME)?;
        let signed = [t.as_bytes(), b".", body];
        let mut ok = false;
        for s in sigs {
            if let Ok(sig) = hex_mac(s, NAME) {
                ok |= self.keys.any_matches(&signed, &sig);
            }
        }
        if ok {
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
