//! GitLab: the `X-Gitlab-Token` secret token, and/or the signing token, which
//! signs the Standard Webhooks way (`webhook-id` equals `Idempotency-Key`).
//! Only the `webhook-*` names are read: the `svix-*` aliases are refused, so
//! the id the signature covers is always the `webhook-id` the request carries.

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::standard::{Headers, Names, StandardWebhooks};
use super::{Proof, VerifyError, header};
use crate::config::GitlabMode;
use crate::secret::Secret;

/// GitLab's verification, in the configured mode.
pub struct Gitlab {
    mode: GitlabMode,
    /// SHA-256 of each accepted token: comparing fixed-size digests keeps the
    /// comparison constant-time whatever the token lengths.
    tokens: Vec<[u8; 32]>,
    signing: Option<StandardWebhooks>,
}

impl std::fmt::Debug for Gitlab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Token digests are unsalted: keep them out of debug output too.
        f.debug_struct("Gitlab")
            .field("mode", &self.mode)
            .field("tokens", &format_args!("{} <redacted>", self.tokens.len()))
            .field("signing", &self.signing)
            .finish()
    }
}

impl Gitlab {
    /// A verifier for `mode`, with the secret tokens and the signing verifier.
    pub fn new(mode: GitlabMode, tokens: &[Secret], signing: Option<StandardWebhooks>) -> Self {
        let tokens = tokens
            .iter()
            .map(|t| Sha256::digest(t.expose()).into())
            .collect();
        Gitlab {
            mode,
            tokens,
            signing,
        }
    }

    fn check_token(&self, token: &str) -> Result<(), VerifyError> {
        let got: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut ok = subtle::Choice::from(0);
        for t in &self.tokens {
            ok |= t.ct_eq(&got);
        }
        if bool::from(ok) {
            Ok(())
        } else {
            Err(VerifyError::Mismatch("X-Gitlab-Token"))
        }
    }

    /// Checks the signature; on success the proof covers the signed `webhook-id`.
    fn check_signature(
        &self,
        h: Option<&Headers<'_>>,
        body: &[u8],
        now: i64,
    ) -> Result<Proof, VerifyError> {
        let (Some(signing), Some(h)) = (&self.signing, h) else {
            return Err(VerifyError::MissingHeader("webhook-signature"));
        };
        signing.check_parts(h, body, now)?;
        Ok(Proof::BodyAndId(h.id.to_string()))
    }

    /// Checks a request in the configured mode; says what the proof covered
    /// (a token alone covers nothing: its ids are unsigned).
    pub(super) fn check(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<Proof, VerifyError> {
        let token = header(headers, "x-gitlab-token")?;
        let signed = Headers::read(headers, Names::WebhookOnly)?;
        let token_only = |t: &str| self.check_token(t).map(|()| Proof::Nothing);
        match self.mode {
            GitlabMode::Token => {
                token_only(token.ok_or(VerifyError::MissingHeader("X-Gitlab-Token"))?)
            }
            GitlabMode::Signature => self.check_signature(signed.as_ref(), body, now),
            GitlabMode::Both => {
                self.check_token(token.ok_or(VerifyError::MissingHeader("X-Gitlab-Token"))?)?;
                self.check_signature(signed.as_ref(), body, now)
            }
            GitlabMode::Either => {
                // A proof that is present must be right; at least one must be present.
                match (token, signed.as_ref()) {
                    (None, None) => Err(VerifyError::MissingHeader("X-Gitlab-Token")),
                    (Some(t), None) => token_only(t),
                    (None, Some(_)) => self.check_signature(signed.as_ref(), body, now),
                    (Some(t), Some(_)) if !self.tokens.is_empty() && self.signing.is_some() => {
                        self.check_token(t)?;
                        self.check_signature(signed.as_ref(), body, now)
                    }
                    (Some(t), Some(_)) if self.signing.is_none() => token_only(t),
                    (Some(_), Some(_)) => self.check_signature(signed.as_ref(), body, now),
                }
            }
        }
    }

    /// The signing verifier, when configured (for signing test requests).
    pub fn signing(&self) -> Option<&StandardWebhooks> {
        self.signing.as_ref()
    }

    /// The configured mode.
    pub fn mode(&self) -> GitlabMode {
        self.mode
    }
}
