//! GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`.

use http::HeaderMap;

use super::{MacKeys, VerifyError, required};
use crate::secret::Secret;

const HEADER: &str = "x-hub-signature-256";

/// GitHub's signature scheme. GitHub signs no timestamp; replays are caught by
/// deduplication on `X-GitHub-Delivery`.
#[derive(Debug)]
pub struct Github {
    keys: MacKeys,
}

impl Github {
    /// A verifier accepting any of `secrets`.
    pub fn new(secrets: &[Secret]) -> Self {
        Github {
            keys: MacKeys::from_secrets(secrets),
        }
    }

    pub(super) fn check(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
        let value = required(headers, HEADER)?;
        let hex_sig = value
            .strip_prefix("sha256=")
            .ok_or(VerifyError::Malformed("X-Hub-Signature-256"))?;
        let mut sig = [0u8; 32];
        hex::decode_to_slice(hex_sig, &mut sig)
            .map_err(|_| VerifyError::Malformed("X-Hub-Signature-256"))?;
        if self.keys.any_matches(&[body], &sig) {
            Ok(())
        } else {
            Err(VerifyError::Mismatch("X-Hub-Signature-256"))
        }
    }

    /// The header GitHub would send for `body`.
    pub fn sign(&self, body: &[u8]) -> (&'static str, String) {
        (
            "X-Hub-Signature-256",
            format!("sha256={}", hex::encode(self.keys.sign(&[body]))),
        )
    }
}
