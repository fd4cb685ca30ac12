//! The NATS backend's dispatch role ([`DispatchStore`]): deliveries as
//! messages of a JetStream work queue that every node claims from, their
//! state in a bucket changed only by compare-and-set, listings from this
//! node's index.
//!
//! - **Queueing**: a routed event's deliveries are published before its
//!   state says routed ([`NatsStore::queue_routes`]), one message per
//!   delivery on `prefix.dlv.<agent>.<priority>` of the `PREFIX_DELIVERIES`
//!   stream (work-queue retention), with `Nats-Msg-Id` = the delivery's
//!   idempotency key. A crash between the two makes the event routed again
//!   later, and that second publish is a duplicate (the stream's duplicate
//!   window is longer than a routing lease): the same delivery, not a
//!   second one. A delivery's number (`dlv_<n>`) is the stream sequence of
//!   its first message.
//! - **Claims**: one durable pull consumer per agent and priority
//!   (`dlv-<agent>-<priority>`, created on first claim), fetched most
//!   urgent first. A claim is a compare-and-set of the delivery's entry in
//!   the `prefix-deliveries` bucket (attempts + 1, the worker, the lease's
//!   end); the lease is this node's, kept alive with "in progress" like the
//!   router's, so a node that dies leaves its claims to the consumer's ack
//!   wait, after which any node takes them.
//! - **Settling**: delivered is an ack; a retry a nak with the delay (not
//!   claimable before it); dead a term plus a copy on the DLQ stream
//!   (`prefix.dlq.delivery.<agent>`). Every attempt is recorded in the
//!   entry. A DLQ retry publishes a new message naming the same delivery
//!   (`Sluice-Delivery` header) and reopens the entry with a fresh round.
//! - **Ordering keys**: the unsettled deliveries of one agent and key
//!   form a line (a bucket entry changed by compare-and-set), ordered by
//!   their events' place in the log; a claim that finds an earlier one
//!   first naks its message for [`ORDER_WAIT`]. Settling (delivered or
//!   dead) leaves the line.
//! - **Not honoured** (docs/dispatch.md): workflows (the config refuses
//!   them with this backend; a workflow route a rule still returns is
//!   dead-lettered with the reason, never dropped).
//!
//! It must never settle a delivery it does not hold: every write after the
//! claim goes through the revision the claim wrote.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{NatsOptions, NatsStore, backend};
use crate::decision::{Decision, Priority, Route};
use crate::dispatch::envelope::idempotency_key;
use crate::event::now_ms;
use crate::store::StoreError;
use crate::store::dispatch::{
    AttemptRecord, ClaimedDelivery, DeadLetter, DeliveryFilter, DeliveryLease, DeliveryStatus,
    DeliverySummary, DispatchCounts, DispatchStore, RUNS, ReadyRun, RunSummary, Settle, Signals,
    StepDelivery, delivery_name,
};

/// What the NATS backend says where a workflow would be needed.
pub(crate) const NO_WORKFLOWS: &str =
    "workflows need the embedded backend for now (store.backend = \"embedded\")";

/// The header naming the delivery a DLQ retry's message carries.
const DELIVERY_HEADER: &str = "Sluice-Delivery";

/// How often an idle agent loop looks at its consumers without a wake-up
/// (another node's queueing is also announced on a core subject, which is
/// only a hint).
const POLL: Duration = Duration::from_secs(1);

/// Priorities, most urgent first: the order a claim fetches in.
const PRIORITIES: [Priority; 4] = [
    Priority::Critical,
    Priority::High,
    Priority::Medium,
    Priority::Low,
];

/// How long a delivery waiting behind an earlier one of its ordering key
/// stays out before a claim looks at it again.
const ORDER_WAIT: Duration = Duration::from_millis(500);

/// The key of the paused agents (a JSON list) in the deliveries bucket.
const PAUSED_KEY: &str = "paused";

/// One delivery's state: the deliveries bucket's `d.<n>` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DeliveryState {
    pub(crate) event_id: String,
    pub(crate) route: Route,
    pub(crate) key: String,
    pub(crate) status: DeliveryStatus,
    /// Claims since it was queued.
    pub(crate) attempts: u32,
    /// `attempts` when it was last retried from the DLQ.
    #[serde(default)]
    pub(crate) retry_base: u32,
    pub(crate) created_at_ms: i64,
    pub(crate) due_at_ms: i64,
    #[serde(default)]
    pub(crate) settled_at_ms: Option<i64>,
    #[serde(default)]
    pub(crate) last_error: Option<String>,
    #[serde(default)]
    pub(crate) worker: Option<String>,
    /// The stream sequence of the message that carries it now (a DLQ
    /// retry publishes a new one; an older copy is stale).
    pub(crate) msg: u64,
    /// Every attempt, in order.
    #[serde(default)]
    pub(crate) records: Vec<AttemptRecord>,
    /// The event's place in the log (its head's stream sequence), which
    /// orders deliveries sharing an ordering key; 0 without a key.
    #[serde(default)]
    pub(crate) event_seq: u64,
}

/// What a delivery message carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeliveryMsg {
    event_id: String,
    route: Route,
    key: String,
    created_at_ms: i64,
    #[serde(default)]
    event_seq: u64,
}

impl DeliveryState {
    fn queued(m: DeliveryMsg, msg: u64) -> DeliveryState {
        DeliveryState {
            event_id: m.event_id,
            route: m.route,
            key: m.key,
            status: DeliveryStatus::Queued,
            attempts: 0,
            retry_base: 0,
            created_at_ms: m.created_at_ms,
            due_at_ms: m.created_at_ms,
            settled_at_ms: None,
            last_error: None,
            worker: None,
            msg,
            records: Vec::new(),
            event_seq: m.event_seq,
        }
    }

    fn kill(&mut self, reason: &str, now: i64) {
        self.status = DeliveryStatus::Dead;
        self.last_error = Some(reason.to_owned());
        self.settled_at_ms = Some(now);
        self.worker = None;
    }
}

/// The bucket key of delivery `n`.
pub(crate) fn entry(n: i64) -> String {
    format!("d.{n}")
}

/// The bucket key of the line of `agent`'s unsettled deliveries with
/// ordering key `key`: `(event sequence, delivery)` pairs, in order.
fn line_entry(agent: &str, key: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update((agent.len() as u64).to_be_bytes());
    h.update(agent.as_bytes());
    h.update(key.as_bytes());
    format!("o.{}", hex::encode(h.finalize()))
}

/// An agent's name as one subject token and consumer-name part: itself
/// when it is letters, digits, '-' and '_' (what config keys are), else
/// `=` and its hex (a rule may name any agent; '=' is in no plain name).
pub(crate) fn agent_token(agent: &str) -> String {
    if !agent.is_empty()
        && agent
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        agent.to_owned()
    } else {
        format!("={}", hex::encode(agent.as_bytes()))
    }
}

/// The agent an [`agent_token`] stands for.
fn token_agent(token: &str) -> Option<String> {
    match token.strip_prefix('=') {
        Some(h) => String::from_utf8(hex::decode(h).ok()?).ok(),
        None => Some(token.to_owned()),
    }
}

pub(crate) fn priority_rank(p: Priority) -> i64 {
    match p {
        Priority::Low => 0,
        Priority::Medium => 1,
        Priority::High => 2,
        Priority::Critical => 3,
    }
}

pub(crate) fn rank_priority(n: i64) -> Priority {
    match n {
        0 => Priority::Low,
        2 => Priority::High,
        3 => Priority::Critical,
        _ => Priority::Medium,
    }
}

/// A delivery claim this node holds.
pub(super) struct HeldDelivery {
    msg: jetstream::Message,
    worker: String,
    attempt: u32,
    until: Instant,
    touched: Instant,
    state: DeliveryState,
    rev: u64,
}

impl super::Loan for HeldDelivery {
    fn msg(&self) -> &jetstream::Message {
        &self.msg
    }
    fn until(&self) -> Instant {
        self.until
    }
    fn touched(&mut self) -> &mut Instant {
        &mut self.touched
    }
}

/// The dispatch role's part of the store.
pub(super) struct Parts {
    bucket: kv::Store,
    stream: stream::Stream,
    pub(super) held: Arc<std::sync::Mutex<HashMap<i64, HeldDelivery>>>,
    /// Moves when this node holds a new delivery claim.
    pub(super) keeper: Arc<Notify>,
    /// Each agent's consumers, most urgent first, once created.
    consumers: tokio::sync::Mutex<HashMap<String, Arc<Vec<consumer::PullConsumer>>>>,
    pub(super) signals: Arc<Signals>,
}

/// The deliveries stream and bucket for `options`.
pub(crate) fn layout(options: &NatsOptions) -> (stream::Config, kv::Config) {
    let names = super::Names::new(&options.prefix);
    let stream = stream::Config {
        name: names.deliveries.clone(),
        subjects: vec![format!("{}.dlv.>", names.prefix)],
        retention: stream::RetentionPolicy::WorkQueue,
        num_replicas: options.replicas,
        storage: stream::StorageType::File,
        // Far longer than a routing lease: an event routed again after a
        // crash publishes its deliveries as duplicates.
        duplicate_window: (options.ack_wait * 10).max(Duration::from_secs(600)),
        ..Default::default()
    };
    let bucket = kv::Config {
        bucket: names.deliveries_state.clone(),
        history: 1,
        num_replicas: options.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    (stream, bucket)
}

impl Parts {
    /// Creates what is missing: the deliveries stream and bucket.
    pub(super) async fn open(
        js: &jetstream::Context,
        options: &NatsOptions,
    ) -> Result<Parts, StoreError> {
        let names = super::Names::new(&options.prefix);
        let (stream_cfg, bucket_cfg) = layout(options);
        let stream = js
            .get_or_create_stream(stream_cfg)
            .await
            .map_err(|e| backend(&format!("stream {}", names.deliveries), e))?;
        let bucket = super::leader_read_bucket(js, bucket_cfg).await?;
        Ok(Parts {
            bucket,
            stream,
            held: Arc::default(),
            keeper: Arc::default(),
            consumers: tokio::sync::Mutex::default(),
            signals: Arc::default(),
        })
    }
}

/// Wakes this node's agent loops when any node announces deliveries.
pub(super) async fn wake_task(
    store: &NatsStore,
) -> Result<tokio::task::JoinHandle<()>, StoreError> {
    let mut sub = store
        .client
        .subscribe(format!("{}.wake.dlv.*", store.names.prefix))
        .await
        .map_err(|e| backend("subscribe to delivery wake-ups", e))?;
    let signals = store.dispatch.signals.clone();
    Ok(tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(agent) = m.subject.as_str().rsplit('.').next().and_then(token_agent) {
                signals.poke(&agent);
            }
        }
    }))
}

impl NatsStore {
    fn dlv_subject(&self, agent: &str, p: Priority) -> String {
        format!(
            "{}.dlv.{}.{}",
            self.names.prefix,
            agent_token(agent),
            p.as_str()
        )
    }

    /// Tells this node's and every other node's loop of `agent` to look.
    async fn announce(&self, agent: &str) {
        self.dispatch.signals.poke(agent);
        let _ = self
            .client
            .publish(
                format!("{}.wake.dlv.{}", self.names.prefix, agent_token(agent)),
                Bytes::new(),
            )
            .await;
    }

    /// Queues the deliveries `decision` implies for `event_id`: one message
    /// per route (a duplicate when published before, see the module doc)
    /// and its entry in the deliveries bucket, unless there already is one.
    /// A workflow route is dead-lettered with the reason ([`NO_WORKFLOWS`]).
    /// [`Store::complete`](crate::store::Store::complete) calls it before
    /// the state write; public so a test can stand in for a crash between
    /// the two.
    pub async fn queue_routes(
        &self,
        event_id: &str,
        decision: &Decision,
    ) -> Result<(), StoreError> {
        if decision.routes.is_empty() || decision.dead_letter.is_some() {
            return Ok(());
        }
        let now = now_ms();
        let mut agents = BTreeSet::new();
        let event_seq = if decision.routes.iter().any(|r| r.ordering_key.is_some()) {
            self.events
                .get_last_raw_message_by_subject(&self.names.head(event_id))
                .await
                .map_err(|e| backend(&format!("read {event_id}"), e))?
                .sequence
        } else {
            0
        };
        for route in &decision.routes {
            let key = idempotency_key(event_id, route, None);
            let m = DeliveryMsg {
                event_id: event_id.to_owned(),
                route: route.clone(),
                key: key.clone(),
                created_at_ms: now,
                event_seq: route.ordering_key.as_ref().map_or(0, |_| event_seq),
            };
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", key.as_str());
            let ack = self
                .publish(
                    self.dlv_subject(&route.agent, route.priority),
                    headers,
                    Bytes::from(serde_json::to_vec(&m).expect("delivery serializes")),
                )
                .await?;
            let n = ack.sequence as i64;
            let mut state = DeliveryState::queued(m, ack.sequence);
            if let Some(w) = &route.workflow {
                state.kill(&format!("route to workflow {w:?}: {NO_WORKFLOWS}"), now);
            }
            // Already there: this publish was a duplicate of an earlier
            // routing's, whose entry may have moved on since.
            if self.put_delivery(n, &state, None).await?.is_some() {
                if state.status == DeliveryStatus::Dead {
                    self.dead_letter_copy(n, &state).await?;
                } else {
                    self.join_line(n, &state).await?;
                    agents.insert(route.agent.clone());
                }
            }
        }
        for agent in agents {
            self.announce(&agent).await;
        }
        Ok(())
    }

    /// The entry of delivery `n` and its revision.
    async fn delivery_state(
        &self,
        n: i64,
    ) -> Result<(Option<DeliveryState>, Option<u64>), StoreError> {
        let e = self
            .dispatch
            .bucket
            .entry(entry(n))
            .await
            .map_err(|e| backend(&format!("state of {}", delivery_name(n)), e))?;
        Ok(match e {
            Some(e) if e.operation == kv::Operation::Put => {
                let s: DeliveryState = serde_json::from_slice(&e.value)
                    .map_err(|err| backend(&format!("state of {}", delivery_name(n)), err))?;
                (Some(s), Some(e.revision))
            }
            Some(e) => (None, Some(e.revision)),
            None => (None, None),
        })
    }

    /// Writes delivery `n`'s entry if still at `rev` (`None`: absent);
    /// `Ok(None)` when someone else changed it first.
    async fn put_delivery(
        &self,
        n: i64,
        state: &DeliveryState,
        rev: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        let value = Bytes::from(serde_json::to_vec(state).expect("delivery state serializes"));
        let what = || format!("state of {}", delivery_name(n));
        let bucket = &self.dispatch.bucket;
        let written = match rev {
            Some(rev) => match bucket.update(entry(n), value, rev).await {
                Ok(r) => r,
                Err(e) if super::lost_race(&e) => return Ok(None),
                Err(e) => return Err(backend(&what(), e)),
            },
            None => match bucket.create(entry(n), value).await {
                Ok(r) => r,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Ok(None),
                Err(e) => return Err(backend(&what(), e)),
            },
        };
        self.index.apply_delivery(n, written, Some(state))?;
        Ok(Some(written))
    }

    /// A dead delivery's copy on the DLQ stream.
    async fn dead_letter_copy(&self, n: i64, s: &DeliveryState) -> Result<(), StoreError> {
        let mut headers = HeaderMap::new();
        let reason = s
            .last_error
            .as_deref()
            .unwrap_or("")
            .replace(['\r', '\n'], " ");
        headers.insert("Sluice-Reason", reason.as_str());
        headers.insert(DELIVERY_HEADER, n.to_string().as_str());
        headers.insert("Sluice-Event", s.event_id.as_str());
        headers.insert(
            "Nats-Msg-Id",
            format!("dlq:{}:{}", delivery_name(n), s.attempts).as_str(),
        );
        self.publish(
            format!(
                "{}.dlq.delivery.{}",
                self.names.prefix,
                agent_token(&s.route.agent)
            ),
            headers,
            Bytes::new(),
        )
        .await
        .map(|_| ())
    }

    /// The paused agents and the entry's revision.
    async fn paused_set(&self) -> Result<(BTreeSet<String>, Option<u64>), StoreError> {
        let e = self
            .dispatch
            .bucket
            .entry(PAUSED_KEY)
            .await
            .map_err(|e| backend("paused agents", e))?;
        Ok(match e {
            Some(e) if e.operation == kv::Operation::Put => (
                serde_json::from_slice(&e.value).map_err(|err| backend("paused agents", err))?,
                Some(e.revision),
            ),
            Some(e) => (BTreeSet::new(), Some(e.revision)),
            None => (BTreeSet::new(), None),
        })
    }

    /// `agent`'s consumers, most urgent first, created on first use.
    async fn consumers_of(
        &self,
        agent: &str,
    ) -> Result<Arc<Vec<consumer::PullConsumer>>, StoreError> {
        let mut all = self.dispatch.consumers.lock().await;
        if let Some(c) = all.get(agent) {
            return Ok(c.clone());
        }
        let mut list = Vec::with_capacity(PRIORITIES.len());
        for p in PRIORITIES {
            let name = format!("dlv-{}-{}", agent_token(agent), p.as_str());
            let c = self
                .dispatch
                .stream
                .get_or_create_consumer(
                    &name,
                    consumer::pull::Config {
                        durable_name: Some(name.clone()),
                        filter_subject: self.dlv_subject(agent, p),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: self.options.ack_wait,
                        // The store counts attempts; the dispatcher decides
                        // when they are spent.
                        max_deliver: -1,
                        max_ack_pending: 100_000,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| backend(&format!("consumer {name}"), e))?;
            list.push(c);
        }
        let list = Arc::new(list);
        all.insert(agent.to_owned(), list.clone());
        Ok(list)
    }

    /// Changes the line of `agent`'s unsettled deliveries with ordering
    /// key `key` by compare-and-set (`f` says whether it changed it);
    /// returns the line as written or found.
    async fn change_line(
        &self,
        agent: &str,
        key: &str,
        f: impl Fn(&mut Vec<(u64, i64)>) -> bool,
    ) -> Result<Vec<(u64, i64)>, StoreError> {
        let name = line_entry(agent, key);
        let bucket = &self.dispatch.bucket;
        let what = || format!("ordering key {key:?} of {agent}");
        loop {
            let e = bucket.entry(&name).await.map_err(|e| backend(&what(), e))?;
            let (mut line, rev): (Vec<(u64, i64)>, Option<u64>) = match e {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice(&e.value).map_err(|err| backend(&what(), err))?,
                    Some(e.revision),
                ),
                Some(e) => (Vec::new(), Some(e.revision)),
                None => (Vec::new(), None),
            };
            if !f(&mut line) {
                return Ok(line);
            }
            let value = Bytes::from(serde_json::to_vec(&line).expect("line serializes"));
            let written = match rev {
                Some(rev) => match bucket.update(&name, value, rev).await {
                    Ok(_) => true,
                    Err(e) if super::lost_race(&e) => false,
                    Err(e) => return Err(backend(&what(), e)),
                },
                None => match bucket.create(&name, value).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                    // Another writer created it first: the bucket's create
                    // reports that race as a failed read, not as "exists".
                    Err(e) => match bucket.entry(&name).await {
                        Ok(Some(_)) => false,
                        _ => return Err(backend(&what(), e)),
                    },
                },
            };
            if written {
                return Ok(line);
            }
        }
    }

    /// Puts delivery `n` in its ordering key's line (if it has a key and
    /// is not there yet); returns the line.
    async fn join_line(&self, n: i64, s: &DeliveryState) -> Result<Vec<(u64, i64)>, StoreError> {
        let Some(key) = &s.route.ordering_key else {
            return Ok(Vec::new());
        };
        let place = (s.event_seq, n);
        self.change_line(&s.route.agent, key, |line| {
            if line.contains(&place) {
                return false;
            }
            line.push(place);
            line.sort_unstable();
            true
        })
        .await
    }

    /// Takes settled delivery `n` out of its ordering key's line.
    async fn leave_line(&self, n: i64, s: &DeliveryState) -> Result<(), StoreError> {
        if let Some(key) = &s.route.ordering_key {
            self.change_line(&s.route.agent, key, |line| {
                let before = line.len();
                line.retain(|&(_, m)| m != n);
                line.len() != before
            })
            .await?;
        }
        Ok(())
    }

    /// [`NatsStore::leave_line`] after a settle that is written already:
    /// a failure only delays the next delivery of the key until a claim
    /// finds this one settled and clears its place.
    async fn leave_line_or_warn(&self, n: i64, s: &DeliveryState) {
        if let Err(e) = self.leave_line(n, s).await {
            tracing::warn!(delivery = %delivery_name(n), error = %e, "cannot free an ordering key; the next claim will");
        }
    }

    /// Whether delivery `n` is first in its ordering key's line (always,
    /// without a key). A first place held by a delivery settled since
    /// (its node died before leaving the line) is cleared on the way.
    async fn first_in_line(&self, n: i64, s: &DeliveryState) -> Result<bool, StoreError> {
        if s.route.ordering_key.is_none() {
            return Ok(true);
        }
        loop {
            let line = self.join_line(n, s).await?;
            let Some(&(_, head)) = line.first() else {
                return Ok(true);
            };
            if head == n {
                return Ok(true);
            }
            let (other, _) = self.delivery_state(head).await?;
            if other.is_some_and(|o| o.status == DeliveryStatus::Queued) {
                return Ok(false);
            }
            self.leave_line(head, s).await?;
        }
    }

    /// Leases one fetched delivery message, or settles a stale one.
    async fn lease_delivery(
        &self,
        msg: jetstream::Message,
        worker: &str,
        lease: Duration,
    ) -> Result<Option<ClaimedDelivery>, StoreError> {
        let seq = match msg.info() {
            Ok(i) => i.stream_sequence,
            Err(_) => {
                let _ = msg.ack_with(AckKind::Term).await;
                return Ok(None);
            }
        };
        let n = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(DELIVERY_HEADER))
            .and_then(|v| v.as_str().parse::<i64>().ok())
            .unwrap_or(seq as i64);
        let (state, rev) = self.delivery_state(n).await?;
        let mut state = match state {
            Some(s) => s,
            // Published, but the node crashed before writing the entry.
            None => match serde_json::from_slice::<DeliveryMsg>(&msg.payload) {
                Ok(m) if n == seq as i64 => DeliveryState::queued(m, seq),
                _ => {
                    let _ = msg.ack_with(AckKind::Term).await;
                    return Ok(None);
                }
            },
        };
        if state.status != DeliveryStatus::Queued || state.msg != seq {
            // Settled already (a settle's ack was lost), or an older
            // message of a delivery retried from the DLQ since.
            let _ = msg.ack_with(AckKind::Term).await;
            return Ok(None);
        }
        let now = now_ms();
        if state.worker.is_none() && state.due_at_ms > now {
            // A retry whose delayed nak was lost (its node died after
            // writing the due time): not before its time.
            let wait = Duration::from_millis((state.due_at_ms - now) as u64);
            let _ = msg.ack_with(AckKind::Nak(Some(wait))).await;
            return Ok(None);
        }
        if !self.first_in_line(n, &state).await? {
            // An earlier delivery with its ordering key is unsettled.
            let _ = msg.ack_with(AckKind::Nak(Some(ORDER_WAIT))).await;
            return Ok(None);
        }
        let Some((meta, body, _)) = self.head(&state.event_id).await? else {
            state.kill("its event is gone (removed by retention)", now);
            if self.put_delivery(n, &state, rev).await?.is_some() {
                self.dead_letter_copy(n, &state).await?;
                self.leave_line(n, &state).await?;
                let _ = msg.ack_with(AckKind::Term).await;
            }
            return Ok(None);
        };
        state.attempts += 1;
        state.worker = Some(worker.to_owned());
        state.due_at_ms = now + lease.as_millis() as i64;
        let Some(new_rev) = self.put_delivery(n, &state, rev).await? else {
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            return Ok(None);
        };
        let mut event = meta.event;
        event.body = body;
        let claimed = ClaimedDelivery {
            id: n,
            event,
            route: state.route.clone(),
            step: None,
            input: None,
            idempotency_key: state.key.clone(),
            attempt: state.attempts,
            round_attempt: state.attempts.saturating_sub(state.retry_base),
            worker: worker.to_owned(),
            created_at_ms: state.created_at_ms,
        };
        let at = Instant::now();
        self.dispatch.held.lock().expect("held lock").insert(
            n,
            HeldDelivery {
                msg,
                worker: worker.to_owned(),
                attempt: state.attempts,
                until: at + lease,
                touched: at,
                state,
                rev: new_rev,
            },
        );
        Ok(Some(claimed))
    }
}

#[async_trait]
impl DispatchStore for NatsStore {
    async fn release_claims(&self) -> Result<u64, StoreError> {
        // A shared backend: claims of a process that ended run out with
        // the consumers' ack wait.
        Ok(0)
    }

    async fn claim_deliveries(
        &self,
        agent: &str,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::Closed);
        }
        if self.paused_set().await?.0.contains(agent) {
            return Ok(Vec::new());
        }
        let max = max.max(1);
        let mut out = Vec::new();
        for c in self.consumers_of(agent).await?.iter() {
            if out.len() >= max {
                break;
            }
            let mut batch = c
                .fetch()
                .max_messages(max - out.len())
                .messages()
                .await
                .map_err(|e| backend(&format!("claim deliveries to {agent}"), e))?;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| backend(&format!("claim deliveries to {agent}"), e))?;
                if let Some(d) = self.lease_delivery(m, worker, lease).await? {
                    out.push(d);
                }
            }
        }
        if !out.is_empty() {
            self.dispatch.keeper.notify_one();
        }
        Ok(out)
    }

    async fn settle_delivery(
        &self,
        lease: &DeliveryLease,
        attempt: &AttemptRecord,
        settle: Settle,
    ) -> Result<(), StoreError> {
        let held = {
            let mut held = self.dispatch.held.lock().expect("held lock");
            match held.get(&lease.id) {
                Some(h)
                    if h.worker == lease.worker
                        && h.attempt == lease.attempt
                        && h.until > Instant::now() =>
                {
                    held.remove(&lease.id).expect("just seen")
                }
                _ => return Err(StoreError::LeaseLost(delivery_name(lease.id))),
            }
        };
        let mut s = held.state.clone();
        s.records.retain(|r| r.attempt != attempt.attempt);
        s.records.push(attempt.clone());
        s.records.sort_by_key(|r| r.attempt);
        s.worker = None;
        let now = now_ms();
        let mut delay = None;
        match &settle {
            Settle::Delivered(_) => {
                s.status = DeliveryStatus::Delivered;
                s.settled_at_ms = Some(now);
                s.last_error = None;
            }
            Settle::RetryAt(at) => {
                s.due_at_ms = *at;
                s.last_error = attempt.error.clone();
                delay = Some(Duration::from_millis((*at - now).max(0) as u64));
            }
            Settle::Dead(reason) => s.kill(reason, now),
        }
        if self
            .put_delivery(lease.id, &s, Some(held.rev))
            .await?
            .is_none()
        {
            return Err(StoreError::LeaseLost(delivery_name(lease.id)));
        }
        match settle {
            Settle::Delivered(_) => {
                let _ = held.msg.ack().await;
                self.leave_line_or_warn(lease.id, &s).await;
            }
            Settle::RetryAt(_) => {
                let _ = held.msg.ack_with(AckKind::Nak(delay)).await;
            }
            Settle::Dead(_) => {
                self.dead_letter_copy(lease.id, &s).await?;
                let _ = held.msg.ack_with(AckKind::Term).await;
                self.leave_line_or_warn(lease.id, &s).await;
            }
        }
        // A slot or a retry time of the agent changed.
        self.dispatch.signals.poke(&s.route.agent);
        Ok(())
    }

    async fn ready_runs(
        &self,
        _max: usize,
        _limits: &[(String, usize, Duration)],
    ) -> Result<Vec<ReadyRun>, StoreError> {
        // No run is ever queued here: a workflow route is dead-lettered.
        Ok(Vec::new())
    }

    async fn start_step(
        &self,
        _run: i64,
        _step: u32,
        _step_name: &str,
        _deliveries: Vec<StepDelivery>,
    ) -> Result<(), StoreError> {
        Err(StoreError::Backend(NO_WORKFLOWS.into()))
    }

    async fn delay_step(
        &self,
        _run: i64,
        _step: u32,
        _step_name: &str,
        _until_ms: i64,
    ) -> Result<(), StoreError> {
        Err(StoreError::Backend(NO_WORKFLOWS.into()))
    }

    async fn finish_run(&self, _run: i64, _failed: Option<&str>) -> Result<(), StoreError> {
        Err(StoreError::Backend(NO_WORKFLOWS.into()))
    }

    async fn deliveries(
        &self,
        filter: &DeliveryFilter,
    ) -> Result<Vec<DeliverySummary>, StoreError> {
        self.index.deliveries(filter)
    }

    async fn attempts(&self, delivery: i64) -> Result<Vec<AttemptRecord>, StoreError> {
        self.index.attempts(delivery)
    }

    async fn runs(&self, _event_id: &str) -> Result<Vec<RunSummary>, StoreError> {
        Ok(Vec::new())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.index.dead_letters(limit)
    }

    async fn retry_delivery(&self, delivery: i64) -> Result<bool, StoreError> {
        let (state, rev) = self.delivery_state(delivery).await?;
        let Some(mut s) = state else {
            return Ok(false);
        };
        if s.status != DeliveryStatus::Dead {
            return Ok(false);
        }
        if let Some(w) = &s.route.workflow {
            return Err(StoreError::Backend(format!(
                "{} is a step of workflow {w:?}: {NO_WORKFLOWS}",
                delivery_name(delivery)
            )));
        }
        // The message first: a crash before the entry is reopened leaves
        // the delivery dead (the message is stale), never queued with
        // nothing to carry it.
        let mut headers = HeaderMap::new();
        headers.insert(DELIVERY_HEADER, delivery.to_string().as_str());
        headers.insert(
            "Nats-Msg-Id",
            format!("{}#retry{}", s.key, s.attempts).as_str(),
        );
        let m = DeliveryMsg {
            event_id: s.event_id.clone(),
            route: s.route.clone(),
            key: s.key.clone(),
            created_at_ms: s.created_at_ms,
            event_seq: s.event_seq,
        };
        let ack = self
            .publish(
                self.dlv_subject(&s.route.agent, s.route.priority),
                headers,
                Bytes::from(serde_json::to_vec(&m).expect("delivery serializes")),
            )
            .await?;
        s.status = DeliveryStatus::Queued;
        s.retry_base = s.attempts;
        s.due_at_ms = now_ms();
        s.settled_at_ms = None;
        s.worker = None;
        s.msg = ack.sequence;
        if self.put_delivery(delivery, &s, rev).await?.is_none() {
            return Err(backend(
                &format!("retry {}", delivery_name(delivery)),
                "changed meanwhile; try again",
            ));
        }
        self.join_line(delivery, &s).await?;
        self.announce(&s.route.agent).await;
        Ok(true)
    }

    async fn set_paused(&self, agent: &str, paused: bool) -> Result<(), StoreError> {
        loop {
            let (mut set, rev) = self.paused_set().await?;
            let changed = if paused {
                set.insert(agent.to_owned())
            } else {
                set.remove(agent)
            };
            if !changed {
                break;
            }
            let value = Bytes::from(serde_json::to_vec(&set).expect("names serialize"));
            let bucket = &self.dispatch.bucket;
            let written = match rev {
                Some(rev) => match bucket.update(PAUSED_KEY, value, rev).await {
                    Ok(_) => true,
                    Err(e) if super::lost_race(&e) => false,
                    Err(e) => return Err(backend("paused agents", e)),
                },
                None => match bucket.create(PAUSED_KEY, value).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                    Err(e) => return Err(backend("paused agents", e)),
                },
            };
            if written {
                break;
            }
        }
        if !paused {
            self.announce(agent).await;
        }
        Ok(())
    }

    async fn paused(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.paused_set().await?.0.into_iter().collect())
    }

    async fn dispatch_counts(&self) -> Result<DispatchCounts, StoreError> {
        self.index.dispatch_counts()
    }

    fn delivery_signal(&self, agent: &str) -> tokio::sync::watch::Receiver<u64> {
        self.dispatch.signals.subscribe(agent)
    }

    async fn next_due(&self, agent: &str) -> Result<Option<i64>, StoreError> {
        if agent == RUNS {
            return Ok(None);
        }
        // Another node's queueing wakes this one through a core subject,
        // which may be missed: never sleep longer than POLL.
        // A due time the index shows past may be another node's claim it
        // has not heard of yet: look again soon, not in a tight loop.
        let now = now_ms();
        let poll = now + POLL.as_millis() as i64;
        Ok(Some(match self.index.next_due(agent)? {
            Some(at) => at.max(now + 100).min(poll),
            None => poll,
        }))
    }
}

impl NatsStore {
    /// Retention: removes the entries of `event_id`'s deliveries.
    pub(super) async fn forget_deliveries(&self, event_id: &str) -> Result<(), StoreError> {
        for n in self.index.deliveries_of(event_id)? {
            self.dispatch
                .bucket
                .purge(entry(n))
                .await
                .map_err(|e| backend(&format!("expire {}", delivery_name(n)), e))?;
            self.index.apply_delivery(n, u64::MAX, None)?;
        }
        Ok(())
    }
}
