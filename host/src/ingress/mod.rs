//! The front door: everything between the socket and the durable append.
//!
//! The path of a request is limits → verify → normalize → dedup → persist,
//! and the types enforce it: only [`verify::Verified`] can be normalised into a
//! [`NewEvent`], and only a `NewEvent` can be appended to the store.

pub mod budget;
pub mod dedup;
pub mod handler;
pub mod normalize;
pub mod shield;
pub mod source;
pub mod stats;
pub mod verify;

use bytes::Bytes;

use crate::event::{IdOrigin, Provider, dedup_key};

/// A verified, normalised event on its way into the store.
///
/// It has no public constructor: [`normalize::normalize`] builds it from a
/// verified request, so an unverified body cannot reach the store.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub(in crate::ingress) source: String,
    pub(in crate::ingress) provider: Provider,
    pub(in crate::ingress) kind: String,
    pub(in crate::ingress) action: Option<String>,
    pub(in crate::ingress) delivery_id: String,
    pub(in crate::ingress) id_origin: IdOrigin,
    pub(in crate::ingress) body_sha256: String,
    pub(in crate::ingress) received_at_ms: i64,
    pub(in crate::ingress) headers: Vec<(String, String)>,
    pub(in crate::ingress) body: Bytes,
}

impl NewEvent {
    /// The configured source name.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// The provider behind the source.
    pub fn provider(&self) -> Provider {
        self.provider
    }
    /// The provider's event kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }
    /// The action, when the payload has one.
    pub fn action(&self) -> Option<&str> {
        self.action.as_deref()
    }
    /// The delivery id used for deduplication.
    pub fn delivery_id(&self) -> &str {
        &self.delivery_id
    }
    /// Whether the signature covered the delivery id (or there was none).
    pub fn id_origin(&self) -> IdOrigin {
        self.id_origin
    }
    /// The hex SHA-256 of the payload document.
    pub fn body_sha256(&self) -> &str {
        &self.body_sha256
    }
    /// What makes two deliveries the same one: see [`dedup_key`].
    pub fn dedup_key(&self) -> String {
        dedup_key(
            &self.source,
            self.id_origin,
            &self.delivery_id,
            &self.body_sha256,
        )
    }
    /// Until when (ms since the epoch) a copy counts as a duplicate, given the
    /// store's dedup window; `None` for a provider's id, which never expires.
    pub fn dedup_until_ms(&self, window: std::time::Duration) -> Option<i64> {
        self.id_origin.expires().then(|| {
            self.received_at_ms
                .saturating_add(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))
        })
    }
    /// When sluice accepted the request, in milliseconds since the Unix epoch.
    pub fn received_at_ms(&self) -> i64 {
        self.received_at_ms
    }
    /// Headers kept for rules (credentials removed).
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }
    /// The payload document.
    pub fn body(&self) -> &Bytes {
        &self.body
    }
}
