//! The durable event log: one trait, implemented by the embedded SQLite store
//! (and, for scale-out, by a NATS JetStream store).
//!
//! The store owns durability and deduplication by the event's dedup key
//! ([`crate::event::dedup_key`]): an append returns only after the write is
//! durable, and a second append of the same delivery returns the first
//! event's id — for good where the provider named the delivery, within the
//! store's dedup window where only the body hash did. It never interprets
//! payloads.
//!
//! Router workers use it as a work queue: `claim` leases pending events,
//! `complete` records the decision, `retry_later` handles a failure (and
//! dead-letters on the last attempt: the backend owns the count),
//! `dead_letter` gives up at once, `defer` releases without counting an
//! attempt, and `extend` renews leases while a batch is being routed. A
//! lease that expires (a worker crashed) makes the event claimable again, so
//! a crash between claim and decision loses nothing.

pub mod dispatch;
pub mod export;
pub mod log;
pub mod nats;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::decision::Decision;
use crate::event::{Event, EventStatus, IdOrigin};
use crate::ingress::NewEvent;

pub use export::{ExportPage, ExportedEvent, Imported};

pub use sqlite::SqliteStore;

/// Errors from a store backend.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O, corruption, connection).
    #[error("store backend failed: {0}")]
    Backend(String),
    /// The store cannot take this write now (its write queue is full, or the
    /// disk did not finish in time); a retry soon may succeed.
    #[error("store busy: {0}")]
    Busy(String),
    /// The store has shut down.
    #[error("store is closed")]
    Closed,
    /// No event with this id.
    #[error("no event with id {0}")]
    NotFound(String),
    /// The event is no longer held under this lease (it expired and the event
    /// was claimed again, or it was settled already).
    #[error("lease on {0} lost: the event was claimed again or already settled")]
    LeaseLost(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// What became of a failed attempt ([`Store::retry_later`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// It will be claimed again after the delay.
    Retrying,
    /// It was the last attempt allowed: the event is a dead letter now.
    DeadLettered,
}

/// The result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Newly stored under this id.
    Stored(String),
    /// This delivery was already stored, under this id.
    Duplicate(String),
    /// Newly stored under `id`, though an earlier event of the same source
    /// came with the same unsigned delivery id and another body: one of them
    /// reused the id (a replayed body under a chosen id, or a sender's bug).
    /// Both are kept; this one is marked.
    IdConflict {
        /// The new event.
        id: String,
        /// The earlier event with the same delivery id.
        conflict_with: String,
    },
}

impl Appended {
    /// The event id, new or existing.
    pub fn id(&self) -> &str {
        match self {
            Appended::Stored(id) | Appended::Duplicate(id) => id,
            Appended::IdConflict { id, .. } => id,
        }
    }
}

/// One row of an event listing.
#[derive(Debug, Clone, Serialize)]
pub struct EventSummary {
    /// The store's id.
    pub id: String,
    /// The provider's delivery id.
    pub delivery_id: String,
    /// Whether the signature covered the delivery id, or there was none.
    pub id_origin: IdOrigin,
    /// An earlier event of the same source with this (unsigned) delivery id
    /// and another body, when there is one.
    pub conflict_with: Option<String>,
    /// The configured source.
    pub source: String,
    /// The provider name.
    pub provider: String,
    /// The event kind.
    pub kind: String,
    /// The action, if any.
    pub action: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// Body size in bytes.
    pub size: u64,
    /// Where the event is in its life.
    pub status: EventStatus,
    /// How many times a router worker has claimed it.
    pub attempts: u32,
}

/// Filters for [`Store::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this source.
    pub source: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this status.
    pub status: Option<EventStatus>,
    /// Only events received at or after this time (milliseconds since the
    /// Unix epoch).
    pub since_ms: Option<i64>,
    /// Only events whose latest decision records this rule as switched off
    /// by its circuit breaker (`RuleFailure::Disabled`).
    pub rule_disabled: Option<String>,
    /// At most this many rows, newest first.
    pub limit: usize,
}

/// A leased event handed to a router worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The event.
    pub event: Event,
    /// Which claim this is for the event (1 for the first).
    pub attempt: u32,
    /// The worker that holds it.
    pub worker: String,
}

impl Claimed {
    /// The lease this claim holds, to settle the event with.
    pub fn lease(&self) -> Lease {
        Lease {
            event_id: self.event.id.clone(),
            worker: self.worker.clone(),
            attempt: self.attempt,
        }
    }
}

/// Proof that a worker holds an event. Settling an event (complete, retry,
/// dead-letter) needs the current lease: a worker whose lease expired and whose
/// event was claimed again gets [`StoreError::LeaseLost`] instead of
/// overwriting the newer claim's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The event.
    pub event_id: String,
    /// The worker that claimed it.
    pub worker: String,
    /// The claim number.
    pub attempt: u32,
}

/// Everything the store knows about one event.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    /// Summary fields.
    #[serde(flatten)]
    pub summary: EventSummary,
    /// The stored event itself.
    #[serde(skip)]
    pub event: Event,
    /// The last recorded decision, if routed.
    pub decision: Option<Decision>,
    /// The last routing error, if any.
    pub last_error: Option<String>,
}

/// One recorded decision, for statistics over the rules' recent runs.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedDecision {
    /// The event it was made for.
    pub event_id: String,
    /// The decision.
    pub decision: Decision,
}

/// The store's read role: what the CLI needs to look at stored events and
/// decisions without a running server, on any backend. It never writes.
#[async_trait]
pub trait EventReader: Send + Sync {
    /// One event with its body and latest decision.
    async fn get(&self, id: &str) -> Result<Option<EventRecord>, StoreError>;

    /// Events matching a filter, newest first.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<EventSummary>, StoreError>;

    /// The latest `limit` decisions recorded (every routing, replays
    /// included), newest first.
    async fn decisions(&self, limit: usize) -> Result<Vec<RecordedDecision>, StoreError>;

    /// One page of `sluice events export`: at most `limit` events, oldest
    /// first, received at or after `since_ms` when given, starting after
    /// `after` (the previous page's [`ExportPage::next`]; `None` for the
    /// first page), each with its decision, deliveries and runs.
    async fn export_page(
        &self,
        since_ms: Option<i64>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ExportPage, StoreError> {
        let _ = (since_ms, after, limit);
        Err(StoreError::Backend("this backend cannot export".into()))
    }
}

/// What one retention pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Expired {
    /// Events removed (with their decisions and dedup keys).
    pub events: u64,
    /// Of those, dead letters past their time.
    pub dead_letters: u64,
    /// Log segment files deleted.
    pub segments: u64,
}

/// The durable event log and work queue.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Durably appends a verified event, deduplicated by its dedup key.
    /// Returns only after the write is durable.
    async fn append(&self, event: NewEvent) -> Result<Appended, StoreError>;

    /// One event with its decision.
    async fn get(&self, id: &str) -> Result<Option<EventRecord>, StoreError>;

    /// Whether event `id` is still held and readable: not removed by
    /// retention, not lost with its log record. Intake's in-memory dedup
    /// cache asks before it answers a copy as a duplicate of `id`.
    async fn holds(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.get(id).await.is_ok_and(|r| r.is_some()))
    }

    /// Events matching a filter, newest first.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<EventSummary>, StoreError>;

    /// Leases up to `max` routable events to `worker` for `lease`.
    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError>;

    /// Records the decision for a claimed event and releases it as routed.
    async fn complete(&self, lease: &Lease, decision: &Decision) -> Result<(), StoreError>;

    /// [`Store::complete`] for several events at once (a router worker's
    /// batch: one write where the backend can). Per event, in order: settled,
    /// or why not; the outer error is for a write that did not happen at all.
    async fn complete_all(
        &self,
        done: &[(Lease, Decision)],
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let mut out = Vec::with_capacity(done.len());
        for (lease, decision) in done {
            out.push(self.complete(lease, decision).await);
        }
        Ok(out)
    }

    /// Releases a claimed event to be routed again after `delay`: a failed
    /// attempt (a nak). The backend owns the attempt count: when this was the
    /// event's last allowed attempt (`rules.max_attempts`), the event goes to
    /// the dead letters with `error` instead, and the answer says so.
    async fn retry_later(
        &self,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> Result<Released, StoreError>;

    /// Releases a claimed event to be routed again after `delay` without
    /// counting the claim as an attempt: the event could not be routed for a
    /// reason that is not its own (a rule switched off, no capacity).
    async fn defer(&self, lease: &Lease, delay: Duration, reason: &str) -> Result<(), StoreError>;

    /// Renews claims still being worked on for another `lease` from now (a
    /// heartbeat), so a batch routed one event after another keeps every
    /// event it holds. Returns, in order, whether each lease still held;
    /// a lease that had expired and was claimed again is not renewed.
    async fn extend(&self, leases: &[Lease], lease: Duration) -> Result<Vec<bool>, StoreError>;

    /// Moves an event to the dead-letter queue with a reason.
    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), StoreError>;

    /// Makes a stored event routable again (operator replay), with a fresh
    /// attempt count: a replay is a new start, not one more retry.
    async fn requeue(&self, id: &str) -> Result<(), StoreError>;

    /// Retention: removes every event received before `cutoff_ms`
    /// (milliseconds since the epoch) with its decisions, dedup key and
    /// work-queue entry, except dead letters dead-lettered at or after
    /// `cutoff_ms`, and the log storage no remaining event needs.
    async fn expire(&self, cutoff_ms: i64) -> Result<Expired, StoreError>;

    /// Number of events not yet settled: waiting to be routed, or being routed.
    async fn queue_depth(&self) -> Result<u64, StoreError>;

    /// Checks that the store can take writes (for `/readyz`).
    async fn ready(&self) -> Result<(), StoreError>;

    /// Resolves when new events may be claimable; workers also poll.
    async fn wait_for_work(&self, timeout: Duration);

    /// Finishes queued writes and stops taking new ones.
    async fn close(&self);

    /// Stores an exported event (`sluice events import`) under its own id,
    /// with its body, dedup key, status, decision, deliveries and runs; an
    /// event not routed yet comes back pending. An id or delivery the store
    /// holds already is left as it is ([`Imported::AlreadyHeld`]), so an
    /// import can be run again.
    async fn import(&self, record: &ExportedEvent) -> Result<Imported, StoreError> {
        let _ = record;
        Err(StoreError::Backend("this backend cannot import".into()))
    }

    /// [`Store::import`] for several events, in order (one write where the
    /// backend can). Per event: what became of it, or why it failed; the
    /// outer error is for a write that did not happen at all.
    async fn import_all(
        &self,
        records: &[ExportedEvent],
    ) -> Result<Vec<Result<Imported, StoreError>>, StoreError> {
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            out.push(self.import(record).await);
        }
        Ok(out)
    }
}
