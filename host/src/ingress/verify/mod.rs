//! Verification: the only way from raw request bytes to a [`Verified`] request.
//!
//! Each provider's scheme is a small type in its own file; [`Verifier`] picks
//! one per source. All checks run on the raw body bytes, compare in constant
//! time, and accept any of several secrets (rotation). A failure says which
//! header is at fault and a short reason class — never the expected value.

mod github;
mod gitlab;
mod hmac_generic;
mod linear;
mod slack;
mod standard;
mod stripe;

use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

pub use github::Github;
pub use gitlab::Gitlab;
pub use hmac_generic::GenericHmac;
pub use linear::Linear;
pub use slack::Slack;
pub use standard::StandardWebhooks;
pub use stripe::Stripe;

use crate::secret::Secret;

/// Why a request failed verification. Each maps to a 401 with a short class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A required header is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is present but not in the scheme's format.
    #[error("malformed header {0}")]
    Malformed(&'static str),
    /// The signature or token does not match any configured secret.
    #[error("signature in {0} does not match")]
    Mismatch(&'static str),
    /// The signed timestamp is outside the tolerance window (replay or clock skew).
    #[error("timestamp in {0} is outside the tolerance window")]
    Stale(&'static str),
}

impl VerifyError {
    /// A short machine-readable class for the 401 body and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            VerifyError::MissingHeader(_) => "missing_header",
            VerifyError::Malformed(_) => "malformed_header",
            VerifyError::Mismatch(_) => "bad_signature",
            VerifyError::Stale(_) => "stale_timestamp",
        }
    }

    /// The header (or body field) at fault.
    pub fn header(&self) -> &'static str {
        match self {
            VerifyError::MissingHeader(h)
            | VerifyError::Malformed(h)
            | VerifyError::Mismatch(h)
            | VerifyError::Stale(h) => h,
        }
    }
}

/// A request whose signature, token and timestamp checked out.
///
/// Only [`Verifier::verify`] builds one; normalisation and the store take
/// nothing else, so an unverified body cannot be stored.
pub struct Verified {
    headers: HeaderMap,
    body: Bytes,
    proof: Proof,
}

/// What a request's proof covered, which decides how far the ids read from
/// it can be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Proof {
    /// Nothing was signed: no verification, or a shared token (GitLab's
    /// `X-Gitlab-Token`), which proves the sender but binds nothing to it.
    Nothing,
    /// The signature covered the body, so ids inside the body are signed.
    Body,
    /// The signature covered the body and this delivery id from a header.
    BodyAndId(String),
}

/// Headers that carry a proof for some provider: a signature over the body
/// or a shared token. Once verified they only help an attacker (a signature
/// is a known MAC of a known body), so they are never passed on or stored;
/// the generic source's configured header is removed as well.
pub const PROOF_HEADERS: [&str; 8] = [
    "x-hub-signature",
    "x-hub-signature-256",
    "x-gitlab-token",
    "webhook-signature",
    "svix-signature",
    "stripe-signature",
    "x-slack-signature",
    "linear-signature",
];

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values can be credentials (X-Gitlab-Token): names only.
        f.debug_struct("Verified")
            .field(
                "headers",
                &self.headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            )
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Verified {
    /// The request headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The raw body the signature covered.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The delivery id the signature covered, when the scheme signs one
    /// (Standard Webhooks' `webhook-id`, GitLab's signed `webhook-id`).
    pub fn signed_id(&self) -> Option<&str> {
        match &self.proof {
            Proof::BodyAndId(id) => Some(id),
            Proof::Nothing | Proof::Body => None,
        }
    }

    /// True when the signature covered the body, so an id read from the body
    /// (Stripe's event `id`, Slack's `event_id`) is as good as signed.
    pub fn body_signed(&self) -> bool {
        self.proof != Proof::Nothing
    }

    /// Splits into headers and body.
    pub fn into_parts(self) -> (HeaderMap, Bytes) {
        (self.headers, self.body)
    }
}

/// One source's verification scheme.
#[derive(Debug)]
pub enum Verifier {
    /// GitHub `X-Hub-Signature-256`.
    Github(Github),
    /// GitLab token and/or signing token.
    Gitlab(Gitlab),
    /// Standard Webhooks.
    Standard(StandardWebhooks),
    /// Stripe `Stripe-Signature`.
    Stripe(Stripe),
    /// Slack v0.
    Slack(Slack),
    /// Linear `Linear-Signature`.
    Linear(Linear),
    /// A generic HMAC header.
    Hmac(GenericHmac),
    /// Nothing is checked (local use only).
    None,
}

impl Verifier {
    /// Checks a request at the current time.
    pub fn verify(&self, headers: HeaderMap, body: Bytes) -> Result<Verified, VerifyError> {
        self.verify_at(headers, body, unix_now())
    }

    /// Checks a request as if the time were `now` (seconds since the epoch).
    pub fn verify_at(
        &self,
        mut headers: HeaderMap,
        body: Bytes,
        now: i64,
    ) -> Result<Verified, VerifyError> {
        let proof = match self {
            Verifier::Github(v) => v.check(&headers, &body).map(|()| Proof::Body)?,
            Verifier::Gitlab(v) => v.check(&headers, &body, now)?,
            Verifier::Standard(v) => Proof::BodyAndId(v.check(&headers, &body, now)?),
            Verifier::Stripe(v) => v.check(&headers, &body, now).map(|()| Proof::Body)?,
            Verifier::Slack(v) => v.check(&headers, &body, now).map(|()| Proof::Body)?,
            Verifier::Linear(v) => v.check(&headers, &body, now).map(|()| Proof::Body)?,
            Verifier::Hmac(v) => v.check(&headers, &body).map(|()| Proof::Body)?,
            Verifier::None => Proof::Nothing,
        };
        for name in PROOF_HEADERS {
            headers.remove(name);
        }
        if let Verifier::Hmac(v) = self {
            headers.remove(v.header_name());
        }
        Ok(Verified {
            headers,
            body,
            proof,
        })
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    crate::event::now_ms() / 1000
}

/// Most signature entries read from one header; a header with more is malformed.
pub(crate) const MAX_SIGNATURES: usize = 16;

/// A set of HMAC-SHA256 keys, keyed once at load so each request only clones.
#[derive(Clone)]
pub(crate) struct MacKeys(Vec<Hmac<Sha256>>);

impl std::fmt::Debug for MacKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MacKeys({} keys, <redacted>)", self.0.len())
    }
}

impl MacKeys {
    /// Keys from raw secret bytes.
    pub(crate) fn new<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Self {
        MacKeys(
            keys.into_iter()
                .map(|k| Hmac::<Sha256>::new_from_slice(k).expect("HMAC takes keys of any length"))
                .collect(),
        )
    }

    /// Keys from secrets used as-is.
    pub(crate) fn from_secrets(secrets: &[Secret]) -> Self {
        MacKeys::new(secrets.iter().map(Secret::expose))
    }

    /// True when any of `candidates` is the MAC of the concatenated `parts`
    /// under any key. Each key's MAC is computed once, however many candidates
    /// there are (at most [`MAX_SIGNATURES`]: the header parsers refuse more),
    /// so a request costs one MAC of the body per key. Every key is compared
    /// with every candidate in constant time with no early exit, so timing
    /// reveals neither which key nor which candidate matched.
    pub(crate) fn any_matches(&self, parts: &[&[u8]], candidates: &[&[u8]]) -> bool {
        debug_assert!(candidates.len() <= MAX_SIGNATURES);
        let mut ok = Choice::from(0);
        for key in &self.0 {
            #[cfg(test)]
            tests::count_mac();
            let mut mac = key.clone();
            for p in parts {
                mac.update(p);
            }
            let mac = mac.finalize().into_bytes();
            for c in candidates {
                // Unequal lengths compare false (lengths are not secret).
                ok |= mac.as_slice().ct_eq(c);
            }
        }
        ok.into()
    }

    /// The MAC of `parts` under the first key (for signing test requests).
    pub(crate) fn sign(&self, parts: &[&[u8]]) -> Vec<u8> {
        mac_of(&self.0[0], parts)
    }

    /// The MAC of `parts` under each key, in key order (for signing with
    /// every secret of a rotation at once).
    pub(crate) fn sign_each(&self, parts: &[&[u8]]) -> Vec<Vec<u8>> {
        self.0.iter().map(|key| mac_of(key, parts)).collect()
    }
}

fn mac_of(key: &Hmac<Sha256>, parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = key.clone();
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

/// A header as a string; `None` when absent, an error when not visible ASCII.
pub(crate) fn header<'a>(
    headers: &'a HeaderMap,
    name: &'static str,
) -> Result<Option<&'a str>, VerifyError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| VerifyError::Malformed(name)),
    }
}

/// A hex-encoded HMAC-SHA256 (upper or lower case); malformed names `header`.
pub(crate) fn hex_mac(value: &str, header: &'static str) -> Result<[u8; 32], VerifyError> {
    let mut mac = [0u8; 32];
    hex::decode_to_slice(value.trim(), &mut mac).map_err(|_| VerifyError::Malformed(header))?;
    Ok(mac)
}

/// A required header as a string.
pub(crate) fn required<'a>(
    headers: &'a HeaderMap,
    name: &'static str,
) -> Result<&'a str, VerifyError> {
    header(headers, name)?.ok_or(VerifyError::MissingHeader(name))
}

/// Checks a Unix-seconds timestamp against the tolerance window, both ways.
pub(crate) fn check_timestamp(
    value: &str,
    now: i64,
    tolerance: Duration,
    name: &'static str,
) -> Result<i64, VerifyError> {
    let ts: i64 = value
        .trim()
        .parse()
        .map_err(|_| VerifyError::Malformed(name))?;
    if now.abs_diff(ts) > tolerance.as_secs() {
        return Err(VerifyError::Stale(name));
    }
    Ok(ts)
}

/// The default replay window for timestamped schemes.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    //! What one hostile request costs, counted in MACs of its body.

    use std::cell::Cell;

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;

    use super::*;

    thread_local! {
        static MACS: Cell<usize> = const { Cell::new(0) };
    }

    /// Called wherever a MAC over the signed content (and so the body) is computed.
    pub(super) fn count_mac() {
        MACS.with(|c| c.set(c.get() + 1));
    }

    /// The MACs of the body one `verify_at` computes (verification runs on this thread).
    fn macs_for(
        v: &Verifier,
        headers: HeaderMap,
        body: &Bytes,
        now: i64,
    ) -> (usize, Result<(), VerifyError>) {
        MACS.with(|c| c.set(0));
        let r = v.verify_at(headers, body.clone(), now).map(|_| ());
        (MACS.with(Cell::get), r)
    }

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("header value"));
        }
        h
    }

    const NOW: i64 = 1_700_000_000;

    fn whsec(n: u8) -> Secret {
        Secret::new(format!("whsec_{}", B64.encode([n; 32])).as_bytes())
    }

    /// Each scheme with two keys (a rotation), and a header holding `n` wrong
    /// `v1` entries: what that header looks like, per scheme.
    fn hostile(n: usize) -> Vec<(&'static str, Verifier, HeaderMap)> {
        let keys = [whsec(1), whsec(2)];
        let fake_b64 = B64.encode([0xAB; 32]);
        let fake_hex = hex::encode([0xAB; 32]);
        let standard_sig = vec![format!("v1,{fake_b64}"); n].join(" ");
        let standard_headers = headers(&[
            ("webhook-id", "msg_1".into()),
            ("webhook-timestamp", NOW.to_string()),
            ("webhook-signature", standard_sig),
        ]);
        let stripe_sig = format!("t={NOW},{}", vec![format!("v1={fake_hex}"); n].join(","));
        let standard = || StandardWebhooks::new(&keys, DEFAULT_TOLERANCE).expect("keys");
        vec![
            (
                "standard",
                Verifier::Standard(standard()),
                standard_headers.clone(),
            ),
            (
                "stripe",
                Verifier::Stripe(Stripe::new(&keys, DEFAULT_TOLERANCE)),
                headers(&[("stripe-signature", stripe_sig)]),
            ),
            (
                "gitlab-signing",
                Verifier::Gitlab(Gitlab::new(
                    crate::config::GitlabMode::Signature,
                    &[],
                    Some(standard()),
                )),
                standard_headers,
            ),
        ]
    }

    #[test]
    fn a_full_header_costs_one_body_mac_per_key() {
        let body = Bytes::from(vec![b'x'; 4096]);
        for (name, v, h) in hostile(MAX_SIGNATURES) {
            let (macs, r) = macs_for(&v, h, &body, NOW);
            assert!(matches!(r, Err(VerifyError::Mismatch(_))), "{name}: {r:?}");
            assert_eq!(macs, 2, "{name}: {MAX_SIGNATURES} entries, two keys");
        }
    }

    #[test]
    fn thirteen_hundred_entries_cost_no_more_than_one_mac_per_key() {
        let body = Bytes::from(vec![b'x'; 4096]);
        for (name, v, h) in hostile(1300) {
            let (macs, r) = macs_for(&v, h, &body, NOW);
            // More entries than the cap: refused as malformed before any MAC.
            assert!(matches!(r, Err(VerifyError::Malformed(_))), "{name}: {r:?}");
            assert!(
                macs <= 2,
                "{name}: 1,300 entries cost {macs} MACs of the body"
            );
        }
    }

    #[test]
    fn the_right_signature_among_wrong_ones_still_verifies() {
        let body = Bytes::from_static(br#"{"type":"x"}"#);
        let keys = [whsec(1), whsec(2)];
        let v = StandardWebhooks::new(&keys, DEFAULT_TOLERANCE).expect("keys");
        let mut signed = v.sign("msg_1", NOW, &body);
        let good = signed.pop().expect("signature").1;
        let fake = format!("v1,{}", B64.encode([0xAB; 32]));
        let value = format!("{fake} {fake} {good} {fake}");
        let mut h = headers(&signed);
        h.insert("webhook-signature", value.parse().expect("value"));
        let (macs, r) = macs_for(&Verifier::Standard(v), h, &body, NOW);
        assert_eq!(r, Ok(()));
        assert_eq!(macs, 2);
    }
}
