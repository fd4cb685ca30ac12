//! A generic HMAC-SHA256 header for senders with no scheme of their own:
//! a header name, an optional prefix, hex or base64.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use http::{HeaderMap, HeaderName};

use super::{MacKeys, VerifyError};
use crate::config::Encoding;
use crate::secret::Secret;

/// The generic scheme.
#[derive(Debug)]
pub struct GenericHmac {
    keys: MacKeys,
    header: HeaderName,
    /// The header name as leaked into error messages must be `'static`.
    header_label: &'static str,
    prefix: String,
    encoding: Encoding,
}

impl GenericHmac {
    /// A verifier reading `header` (after `prefix`), encoded as `encoding`.
    pub fn new(secrets: &[Secret], header: HeaderName, prefix: String, encoding: Encoding) -> Self {
        // One small leak per configured source, at load, so errors can name the header.
        let header_label: &'static str = Box::leak(header.as_str().to_string().into_boxed_str());
        GenericHmac {
            keys: MacKeys::from_secrets(secrets),
            header,
            header_label,
            prefix,
            encoding,
        }
    }

    pub(super) fn check(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
        let name = self.header_label;
        let value = headers
            .get(&self.header)
            .ok_or(VerifyError::MissingHeader(name))?;
        let value = value.to_str().map_err(|_| VerifyError::Malformed(name))?;
        let encoded = value
            .trim()
            .strip_prefix(self.prefix.as_str())
            .ok_or(VerifyError::Malformed(name))?;
        let sig = match self.encoding {
            Encoding::Hex => hex::decode(encoded),
            Encoding::Base64 => B64
                .decode(encoded)
                .map_err(|_| hex::FromHexError::InvalidStringLength),
        }
        .map_err(|_| VerifyError::Malformed(name))?;
        if self.keys.any_matches(&[body], &[&sig]) {
            Ok(())
        } else {
            Err(VerifyError::Mismatch(name))
        }
    }

    /// The header that carries the signature.
    pub(super) fn header_name(&self) -> &HeaderName {
        &self.header
    }

    /// The header a sender would add for `body`.
    pub fn sign(&self, body: &[u8]) -> (HeaderName, String) {
        let sig = self.keys.sign(&[body]);
        let encoded = match self.encoding {
            Encoding::Hex => hex::encode(sig),
            Encoding::Base64 => B64.encode(sig),
        };
        (self.header.clone(), format!("{}{encoded}", self.prefix))
    }
}
