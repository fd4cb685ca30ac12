//! The envelope a delivery POSTs to an agent, and its Standard Webhooks
//! signature.
//!
//! The body is the JSON of an [`Envelope`]: `{"event": …, "route": …,
//! "attempt": n}` (and `"step"` and `"input"`, the previous step's answer,
//! for a workflow step). A route with a shaped `payload` carries that in
//! place of the body. It is signed the
//! Standard Webhooks way, so an agent verifies it with any off-the-shelf
//! library: `webhook-id` is the [`idempotency_key`] (one per event, route and
//! step, the same on every attempt, so an agent can drop a repeat),
//! `webhook-timestamp` the Unix seconds of the attempt, and
//! `webhook-signature` one `v1,<base64>` entry per signing secret, so a
//! secret can be rotated while the old one still verifies.
//!
//! The MAC and the `whsec_` decoding are intake's own
//! ([`crate::ingress::verify::StandardWebhooks`]); nothing here holds a
//! secret past signing, and no error or `Debug` output shows one.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::decision::Route;
use crate::event::{Event, Provider};
use crate::ingress::verify::{MAX_SIGNATURES, StandardWebhooks};
use crate::secret::Secret;

/// The JSON document POSTed to an agent for one route of one event.
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    /// The event being delivered.
    pub event: EnvelopeEvent<'a>,
    /// The route the rules chose, as recorded in the decision.
    pub route: &'a Route,
    /// Which attempt this is, from 1; the `webhook-id` stays the same across
    /// attempts.
    pub attempt: u32,
    /// The workflow step this delivery is for; absent for a plain agent route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<&'a str>,
    /// The previous workflow step's answer (one agent's JSON answer, or an
    /// object of them by agent for a parallel step); absent on a first step
    /// and for a plain route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<&'a serde_json::Value>,
}

/// The event part of an [`Envelope`].
#[derive(Debug, Serialize)]
pub struct EnvelopeEvent<'a> {
    /// The store's id (`evt_…`).
    pub id: &'a str,
    /// The configured source name.
    pub source: &'a str,
    /// The provider behind the source (`github`, `standard-webhooks`, …).
    pub provider: Provider,
    /// The provider's event kind (`issues`, `Push Hook`, `invoice.paid`).
    pub kind: &'a str,
    /// The action inside the kind; `null` when there is none.
    pub action: Option<&'a str>,
    /// The provider's delivery id, or `sha256:` + the body hash.
    pub delivery_id: &'a str,
    /// When sluice accepted the event, in milliseconds since the Unix epoch
    /// (the unit the store and decisions use: an integer, no parsing).
    pub received_at_ms: i64,
    /// The stored body.
    pub payload: Payload<'a>,
}

/// The stored body as it goes into the envelope.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Payload<'a> {
    /// A JSON body, embedded as the JSON value it is, byte for byte (key
    /// order and number spelling kept; nothing is re-encoded).
    Json(&'a RawValue),
    /// What the rule shaped for the agent (a route's `payload`), instead of
    /// the body.
    Shaped(&'a serde_json::Value),
    /// A body that is not JSON, as a JSON string (bytes that are not UTF-8
    /// become U+FFFD). Stored bodies are JSON in practice: intake stores a
    /// form-encoded GitHub body decoded.
    Text(Cow<'a, str>),
}

impl<'a> Payload<'a> {
    /// The payload of a stored body: JSON when it parses as JSON, a string
    /// otherwise.
    pub fn of(body: &'a [u8]) -> Payload<'a> {
        match serde_json::from_slice::<&RawValue>(body) {
            Ok(raw) => Payload::Json(raw),
            Err(_) => Payload::Text(String::from_utf8_lossy(body)),
        }
    }
}

impl<'a> Envelope<'a> {
    /// The envelope for delivery attempt `attempt` (from 1) of `event` along
    /// `route`, for workflow step `step` if any.
    pub fn new(event: &'a Event, route: &'a Route, attempt: u32, step: Option<&'a str>) -> Self {
        Envelope {
            event: EnvelopeEvent {
                id: &event.id,
                source: &event.source,
                provider: event.provider,
                kind: &event.kind,
                action: event.action.as_deref(),
                delivery_id: &event.delivery_id,
                received_at_ms: event.received_at_ms,
                payload: match &route.payload {
                    Some(shaped) => Payload::Shaped(shaped),
                    None => Payload::of(&event.body),
                },
            },
            route,
            attempt,
            step,
            input: None,
        }
    }

    /// The same envelope carrying the previous step's answer.
    pub fn with_input(mut self, input: Option<&'a serde_json::Value>) -> Self {
        self.input = input;
        self
    }

    /// The body to POST: the envelope as compact JSON.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope has string keys and no fallible values")
    }

    /// The `webhook-id` of this delivery: [`idempotency_key`] of its event,
    /// route and step.
    pub fn idempotency_key(&self) -> String {
        idempotency_key(self.event.id, self.route, self.step)
    }
}

/// The `webhook-id` for delivering `event_id` along `route` (for workflow
/// step `step`): `msg_` + hex of the first 16 bytes of SHA-256 over
///
/// ```text
/// "sluice-delivery-v1" ‖ field(event_id) ‖ field(route.agent)
///   ‖ opt(route.workflow) ‖ opt(step)
/// ```
///
/// where `field(s)` is the length of `s` as 8 bytes big-endian followed by
/// its bytes, and `opt(x)` is one byte `0` for none or `1` then `field(x)`.
/// The encoding is unambiguous, so no two distinct inputs share a preimage.
///
/// The attempt number, priority, reason and labels are left out: the key is
/// the same on every attempt, and a decision holds at most one route per
/// agent and workflow (the router merges routes with both equal, in either
/// merge mode), so agent and workflow identify a route within an event.
pub fn idempotency_key(event_id: &str, route: &Route, step: Option<&str>) -> String {
    fn field(h: &mut Sha256, s: &str) {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    }
    fn opt(h: &mut Sha256, s: Option<&str>) {
        match s {
            None => h.update([0u8]),
            Some(s) => {
                h.update([1u8]);
                field(h, s);
            }
        }
    }
    let mut h = Sha256::new();
    h.update(b"sluice-delivery-v1");
    field(&mut h, event_id);
    field(&mut h, &route.agent);
    opt(&mut h, route.workflow.as_deref());
    opt(&mut h, step);
    format!("msg_{}", hex::encode(&h.finalize()[..16]))
}

/// Why a set of signing secrets cannot sign. Never shows a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// No secret was given.
    #[error("no signing secret")]
    NoSecret,
    /// More secrets than a receiver's signature header may hold.
    #[error("{0} signing secrets; at most {MAX_SIGNATURES} are sent at once")]
    TooMany(usize),
    /// A secret (by position, from 0) is not `whsec_` + base64 of a key.
    #[error("signing secret {0} is not a `whsec_` secret with a base64 key")]
    BadKey(usize),
}

/// Signs delivery bodies with every secret of one agent (built once, used
/// for every delivery to it).
#[derive(Debug)]
pub struct Signer {
    keys: StandardWebhooks,
}

impl Signer {
    /// A signer for `secrets`, each `whsec_<base64>` (the `whsec_` prefix is
    /// optional, as receivers accept it either way); at least one and at most
    /// 16 (the most entries sluice's own intake reads from one header).
    pub fn new(secrets: &[Secret]) -> Result<Signer, SignError> {
        if secrets.is_empty() {
            return Err(SignError::NoSecret);
        }
        if secrets.len() > MAX_SIGNATURES {
            return Err(SignError::TooMany(secrets.len()));
        }
        // Decode one at a time so the error names which secret is bad.
        for (i, s) in secrets.iter().enumerate() {
            StandardWebhooks::new(std::slice::from_ref(s), std::time::Duration::ZERO)
                .map_err(|_| SignError::BadKey(i))?;
        }
        let keys = StandardWebhooks::new(secrets, std::time::Duration::ZERO)
            .map_err(|_| SignError::BadKey(0))?;
        Ok(Signer { keys })
    }

    /// The `webhook-id`, `webhook-timestamp` and `webhook-signature` headers
    /// for `body`, with one `v1,` signature per secret, in the order given.
    pub fn sign(&self, body: &[u8], id: &str, timestamp: i64) -> Vec<(&'static str, String)> {
        self.keys.sign_all(id, timestamp, body)
    }
}

/// Signs `body` once: [`Signer::new`] then [`Signer::sign`].
pub fn sign(
    body: &[u8],
    id: &str,
    timestamp: i64,
    secrets: &[Secret],
) -> Result<Vec<(&'static str, String)>, SignError> {
    Ok(Signer::new(secrets)?.sign(body, id, timestamp))
}
