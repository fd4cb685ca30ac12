//! The store's dispatch role: the deliveries a decision implies, their
//! attempts, workflow runs and their steps, and the dead-letter queue.
//!
//! [`Store::complete_all`](super::Store::complete_all) records a decision and
//! the work it implies in one write: a queued delivery per plain route, a
//! waiting workflow run per workflow route. A crash can therefore never leave
//! a routed event with nothing queued. From there the dispatcher drives them
//! through [`DispatchStore`]: it claims due deliveries per agent (priority,
//! then due time, then arrival; a delivery whose ordering key has an earlier
//! one unsettled waits), settles each attempt (recorded with its time,
//! status, latency, error and answer size), and moves workflow runs from
//! step to step. A step's completion is written in the same transaction as
//! the last delivery of the step that settles it, at most once per run and
//! step (the table's key), so a crash never records it twice.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::decision::{Priority, Route};
use crate::event::Event;

/// Where a delivery is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Waiting for its due time, or out with a worker (leased).
    Queued,
    /// The agent took it.
    Delivered,
    /// Given up: in the dead-letter queue.
    Dead,
}

impl DeliveryStatus {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Queued => "queued",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Dead => "dead",
        }
    }

    /// Parses a stored or typed name.
    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        match s {
            "queued" => Some(DeliveryStatus::Queued),
            "delivered" => Some(DeliveryStatus::Delivered),
            "dead" => Some(DeliveryStatus::Dead),
            _ => None,
        }
    }
}

/// One delivery as listed.
#[derive(Debug, Clone, Serialize)]
pub struct DeliverySummary {
    /// `dlv_<n>`.
    pub id: String,
    /// The event it carries.
    pub event_id: String,
    /// The agent it goes to.
    pub agent: String,
    /// The workflow run it belongs to (`run_<n>`), if any.
    pub run: Option<String>,
    /// The workflow, if any.
    pub workflow: Option<String>,
    /// The workflow step's name, if any.
    pub step: Option<String>,
    /// The `webhook-id`: the same on every attempt.
    pub idempotency_key: String,
    /// How urgent.
    pub priority: Priority,
    /// The route's ordering key, if any.
    pub ordering_key: Option<String>,
    /// Where it is.
    pub status: DeliveryStatus,
    /// Attempts made (claims, counting one in flight).
    pub attempts: u32,
    /// When it was queued (ms since the epoch).
    pub created_at_ms: i64,
    /// When it is next due, while queued.
    pub due_at_ms: Option<i64>,
    /// When it was delivered or dead-lettered.
    pub settled_at_ms: Option<i64>,
    /// The last failure.
    pub last_error: Option<String>,
}

/// One attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Which attempt (from 1).
    pub attempt: u32,
    /// When it started (ms since the epoch).
    pub at_ms: i64,
    /// `delivered`, `retry` or `failed`.
    pub outcome: String,
    /// The HTTP status, where there is one.
    pub status: Option<u16>,
    /// How long it took, in microseconds.
    pub latency_us: u64,
    /// What went wrong.
    pub error: Option<String>,
    /// Bytes of answer read back.
    pub response_bytes: u64,
}

/// Filters for [`DispatchStore::deliveries`].
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    /// Only to this agent.
    pub agent: Option<String>,
    /// Only in this status.
    pub status: Option<DeliveryStatus>,
    /// Only of this event.
    pub event_id: Option<String>,
    /// At most this many, newest first.
    pub limit: usize,
}

/// A delivery leased to a dispatcher worker, with what its envelope needs.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    /// The delivery's number.
    pub id: i64,
    /// The event.
    pub event: Event,
    /// The route as decided.
    pub route: Route,
    /// The workflow step's name, for a step's delivery.
    pub step: Option<String>,
    /// The previous step's answer, for a step after the first.
    pub input: Option<serde_json::Value>,
    /// The `webhook-id`.
    pub idempotency_key: String,
    /// Which attempt this is (from 1), counting every attempt since the
    /// delivery was queued (the envelope's `attempt`; attempts are stored
    /// under it, so a DLQ retry keeps the earlier ones on record).
    pub attempt: u32,
    /// Which attempt this is since the delivery was last retried from the
    /// DLQ (from 1): what `max_attempts` and the backoff count.
    pub round_attempt: u32,
    /// The worker holding it.
    pub worker: String,
    /// When it was first queued (ms since the epoch).
    pub created_at_ms: i64,
}

impl ClaimedDelivery {
    /// The lease this claim holds.
    pub fn lease(&self) -> DeliveryLease {
        DeliveryLease {
            id: self.id,
            worker: self.worker.clone(),
            attempt: self.attempt,
        }
    }
}

/// Proof that a worker holds a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryLease {
    /// The delivery.
    pub id: i64,
    /// The worker.
    pub worker: String,
    /// The claim number.
    pub attempt: u32,
}

/// What becomes of a delivery after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// Delivered; the agent's JSON answer, passed to a workflow's next step.
    Delivered(Option<serde_json::Value>),
    /// Try again at this time (ms since the epoch).
    RetryAt(i64),
    /// Give up: dead-letter it with this reason.
    Dead(String),
}

/// A workflow run waiting for its next move.
#[derive(Debug, Clone)]
pub struct ReadyRun {
    /// The run's number.
    pub id: i64,
    /// The workflow.
    pub workflow: String,
    /// The event.
    pub event_id: String,
    /// The route that started it.
    pub route: Route,
    /// The step to run next (from 0).
    pub step: u32,
    /// The previous step's answer.
    pub input: Option<serde_json::Value>,
}

/// A delivery a workflow step queues.
#[derive(Debug, Clone)]
pub struct StepDelivery {
    /// The agent.
    pub agent: String,
    /// The `webhook-id`.
    pub idempotency_key: String,
}

/// One workflow run as listed.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// `run_<n>`.
    pub id: String,
    /// The workflow.
    pub workflow: String,
    /// The event.
    pub event_id: String,
    /// `waiting`, `ready`, `running`, `done` or `failed`.
    pub state: String,
    /// The step it is on (from 0); past the last when done.
    pub step: u32,
    /// Steps whose completion is recorded, in order, with their answers.
    pub steps_done: Vec<(String, Option<serde_json::Value>)>,
    /// Why it failed.
    pub last_error: Option<String>,
}

/// One entry of the dead-letter queue: an event that could not be routed,
/// or a delivery that could not be made.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// `evt_…` for an event, `dlv_<n>` for a delivery.
    pub id: String,
    /// `event` or `delivery`.
    pub kind: &'static str,
    /// The event.
    pub event_id: String,
    /// The agent, for a delivery.
    pub agent: Option<String>,
    /// Why.
    pub reason: String,
    /// When (ms since the epoch).
    pub at_ms: i64,
}

/// Counts for `/metrics` and `store stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DispatchCounts {
    /// Queued deliveries, by agent.
    pub queued: Vec<(String, u64)>,
    /// Dead deliveries plus dead events.
    pub dead_letters: u64,
    /// Workflow runs not finished.
    pub runs_open: u64,
}

/// The [`DispatchStore::delivery_signal`] name of the workflow runs.
pub const RUNS: &str = "$runs";

/// Wake-up counters by name (an agent, or [`RUNS`]), created on first use;
/// what a backend's [`DispatchStore::delivery_signal`] hands out.
#[derive(Debug, Default)]
pub struct Signals {
    by_name: std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<u64>>>,
}

impl Signals {
    /// The counter of `name`.
    pub fn subscribe(&self, name: &str) -> tokio::sync::watch::Receiver<u64> {
        self.by_name
            .lock()
            .expect("signals lock")
            .entry(name.to_string())
            .or_insert_with(|| tokio::sync::watch::Sender::new(0))
            .subscribe()
    }

    /// Moves the counter of `name` (nothing when nobody ever subscribed).
    pub fn poke(&self, name: &str) {
        if let Some(tx) = self.by_name.lock().expect("signals lock").get(name) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Moves every counter.
    pub fn poke_all(&self) {
        for tx in self.by_name.lock().expect("signals lock").values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// `dlv_<n>` for delivery `n`.
pub fn delivery_name(id: i64) -> String {
    format!("dlv_{id}")
}

/// The number in `dlv_<n>` (or a bare number).
pub fn parse_delivery_name(s: &str) -> Option<i64> {
    s.strip_prefix("dlv_").unwrap_or(s).parse().ok()
}

/// The dispatch role of a store backend.
#[async_trait]
pub trait DispatchStore: Send + Sync + 'static {
    /// Voids the claims a process that ended left on deliveries, so they go
    /// out again at once instead of when their leases run out. Only for a
    /// backend one process owns (the embedded store: its log lock keeps out
    /// a second process); a shared backend lets leases run out instead.
    async fn release_claims(&self) -> Result<u64, StoreError>;

    /// Leases up to `max` due deliveries to `agent` for `lease`: priority
    /// first, then due time, then arrival; a delivery whose ordering key has
    /// an earlier unsettled delivery to the same agent is skipped; a paused
    /// agent gets none.
    async fn claim_deliveries(
        &self,
        agent: &str,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedDelivery>, StoreError>;

    /// Records an attempt and settles the delivery. A delivery that
    /// completes its workflow step records the step (at most once) and
    /// makes the run ready for its next step, in the same write; a dead one
    /// fails its run.
    async fn settle_delivery(
        &self,
        lease: &DeliveryLease,
        attempt: &AttemptRecord,
        settle: Settle,
    ) -> Result<(), StoreError>;

    /// Workflow runs ready to move (a step to start, a delay past, the
    /// end), oldest first; and before that, starts waiting runs of each
    /// workflow while fewer than its limit are in progress
    /// (`concurrency(workflow)`), and fails runs past their deadline
    /// (dead-lettering their open deliveries).
    async fn ready_runs(
        &self,
        max: usize,
        limits: &[(String, usize, Duration)],
    ) -> Result<Vec<ReadyRun>, StoreError>;

    /// Starts step `step` of a ready run by queueing its deliveries (with
    /// the step's `input`). Nothing happens if the run moved on.
    async fn start_step(
        &self,
        run: i64,
        step: u32,
        step_name: &str,
        deliveries: Vec<StepDelivery>,
    ) -> Result<(), StoreError>;

    /// Completes a delay step: the run is ready for `step + 1` at `until_ms`.
    async fn delay_step(
        &self,
        run: i64,
        step: u32,
        step_name: &str,
        until_ms: i64,
    ) -> Result<(), StoreError>;

    /// Ends a run whose steps are all done (`failed` with a reason, or done).
    async fn finish_run(&self, run: i64, failed: Option<&str>) -> Result<(), StoreError>;

    /// Deliveries matching a filter, newest first.
    async fn deliveries(&self, filter: &DeliveryFilter)
    -> Result<Vec<DeliverySummary>, StoreError>;

    /// One delivery's attempts, in order.
    async fn attempts(&self, delivery: i64) -> Result<Vec<AttemptRecord>, StoreError>;

    /// An event's workflow runs.
    async fn runs(&self, event_id: &str) -> Result<Vec<RunSummary>, StoreError>;

    /// The dead-letter queue, newest first.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;

    /// Sends a dead delivery again, with a fresh count of attempts (the
    /// earlier ones stay on record), and reopens the workflow run it failed
    /// with a fresh timeout. `false` when it is not dead.
    async fn retry_delivery(&self, delivery: i64) -> Result<bool, StoreError>;

    /// Pauses or resumes deliveries to an agent (they wait; nothing is dropped).
    async fn set_paused(&self, agent: &str, paused: bool) -> Result<(), StoreError>;

    /// The paused agents.
    async fn paused(&self) -> Result<Vec<String>, StoreError>;

    /// Counts for metrics.
    async fn dispatch_counts(&self) -> Result<DispatchCounts, StoreError>;

    /// A counter that moves whenever deliveries to `agent` (or, for
    /// [`RUNS`], workflow runs) may have become claimable: queued, settled
    /// (a slot or an ordering key freed), retried from the DLQ, resumed, a
    /// step advanced. A worker marks it seen before it claims and waits for
    /// a change when it found nothing, so no wake-up falls between the two.
    fn delivery_signal(&self, agent: &str) -> tokio::sync::watch::Receiver<u64>;

    /// When the earliest delivery queued for `agent` (for [`RUNS`]: the
    /// earliest ready run or run deadline) comes due, if any: an idle
    /// worker sleeps until then (or a signal), not in a poll loop.
    async fn next_due(&self, agent: &str) -> Result<Option<i64>, StoreError>;
}
