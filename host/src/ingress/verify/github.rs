//! GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`.

use http::HeaderMap;

use super::{MacKeys, VerifyError, hex_mac, required};
use crate::secret::Secret;

const HEADER: &str = "x-hub-signature-256";

/// GitHub's signature scheme. GitHub signs neither a timestamp nor the
/// delivery id, so this scheme cannot tell a replayed delivery from a new one:
/// deduplication on `X-GitHub-Delivery` catches honest redeliveries, and a
/// replay under a fresh delivery id is a limit of GitHub's scheme (an
/// allow-list of GitHub's hook addresses narrows who can try).
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
        let sig = hex_mac(hex_sig, "X-Hub-Signature-256")?;
        if self.keys.any_matches(&[body], &[&sig]) {
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
