//! The NATS JetStream backend: the store's three roles on a JetStream
//! cluster that several sluice nodes share.
//!
//! - **Event log**: the `PREFIX_EVENTS` stream. An event is one message on
//!   `prefix.ev.<id>`, published with `Nats-Msg-Id` = its dedup key
//!   ([`crate::event::dedup_key`]), so a copy published within the stream's
//!   duplicate window is answered with the original's sequence. Duplicates
//!   older than that window are found in the `prefix-dedup` bucket (TTL
//!   `store.dedup_ttl`), which maps each dedup key to its event. An append
//!   returns once JetStream acknowledged the publish: on a replicated stream
//!   a majority holds it; a single replica is durable only on a server that
//!   syncs every write (`sync_interval: always`). A body larger than the
//!   server's `max_payload` is stored as parts (`prefix.part.<id>.<n>`)
//!   published before its head message, which names how many there are;
//!   a reader reassembles them, so the body arrives whole.
//! - **Work queue** (routing): the durable pull consumer `route` over the
//!   events (and `prefix.redo.<id>`, an operator's replay). Each event's
//!   routing state (status, attempts, holder, decision) is one entry of the
//!   `prefix-state` bucket, changed only by compare-and-set on its revision:
//!   a node that lost its claim (its ack wait ran out and another node took
//!   the event) cannot overwrite the newer claim's outcome. A retry is a
//!   nak with the delay, a deferral a nak that gives the attempt back in
//!   the state, a dead letter a term plus a copy on the `PREFIX_DLQ`
//!   stream; the store counts attempts itself (JetStream's own count also
//!   counts deferrals) and dead-letters past `rules.max_attempts`. Leases
//!   are this node's: it naks a claim whose lease ran out (so the event is
//!   claimable again at once) and sends "in progress" while a lease longer
//!   than the consumer's ack wait is held; a node that dies leaves its
//!   claims to the ack wait, after which any node takes them.
//! - **Index**: a SQLite file per node ([`index`]), fed from the events
//!   stream and the state bucket, which the CLI and admin API list from.
//!   A node's own writes are in it at once; other nodes' arrive through the
//!   feed (eventually consistent; README "Measured" gives the lag).
//! - **Dispatch** ([`dispatch`]): deliveries on a work-queue stream with a
//!   consumer per agent and priority, their state in the `prefix-deliveries`
//!   bucket; a routed event's deliveries are published before its state
//!   says routed.

mod dispatch;
mod index;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer, kv, stream};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use super::{
    Appended, Claimed, EventRecord, EventSummary, Expired, Lease, ListFilter, Released, Store,
    StoreError,
};
use crate::decision::Decision;
use crate::event::{Event, EventStatus, IdOrigin, dedup_key, now_ms};
use crate::ingress::NewEvent;

pub use index::Index;

/// How the NATS backend connects and behaves; [`NatsOptions::from_config`]
/// takes `[store]`, `[store.nats]` and the router's keys.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// The servers, comma-separated.
    pub url: String,
    /// A `.creds` file, if the servers ask for one.
    pub credentials: Option<PathBuf>,
    /// Replicas of every stream and bucket.
    pub replicas: usize,
    /// The names' prefix.
    pub prefix: String,
    /// This node's index file.
    pub index_path: PathBuf,
    /// How long a dedup key is remembered (the dedup bucket's TTL; the
    /// stream's duplicate window is the shorter of this and two minutes).
    pub dedup_ttl: Duration,
    /// Attempts an event gets (`rules.max_attempts`).
    pub max_attempts: u32,
    /// The routing consumer's ack wait: how long a dead node's claims stay
    /// out before another node takes them (`rules.lease_ms`).
    pub ack_wait: Duration,
    /// Longest an append waits for JetStream's acknowledgement before it is
    /// answered busy (503).
    pub append_timeout: Duration,
}

impl NatsOptions {
    /// The options a config sets.
    pub fn from_config(config: &crate::config::Config) -> NatsOptions {
        let n = &config.store.nats;
        NatsOptions {
            url: n.url.clone(),
            credentials: n.credentials.as_ref().map(|c| config.data_dir().join(c)),
            replicas: n.replicas,
            prefix: n.prefix.clone(),
            index_path: config.data_dir().join(&n.index),
            dedup_ttl: config.store.dedup_ttl,
            max_attempts: config.rules.max_attempts.max(1),
            ack_wait: Duration::from_millis(config.rules.lease_ms.max(1_000)),
            append_timeout: config.store.append_timeout,
        }
    }
}

/// The names of the streams, buckets, consumers and subjects under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) prefix: String,
    pub(crate) events: String,
    pub(crate) dlq: String,
    pub(crate) dedup: String,
    pub(crate) state: String,
    pub(crate) deliveries: String,
    pub(crate) deliveries_state: String,
}

impl Names {
    fn new(prefix: &str) -> Names {
        let upper = prefix.to_ascii_uppercase().replace('-', "_");
        Names {
            prefix: prefix.to_owned(),
            events: format!("{upper}_EVENTS"),
            dlq: format!("{upper}_DLQ"),
            dedup: format!("{prefix}-dedup"),
            state: format!("{prefix}-state"),
            deliveries: format!("{upper}_DELIVERIES"),
            deliveries_state: format!("{prefix}-deliveries"),
        }
    }
    fn head(&self, id: &str) -> String {
        format!("{}.ev.{id}", self.prefix)
    }
    fn part(&self, id: &str, n: u32) -> String {
        format!("{}.part.{id}.{n}", self.prefix)
    }
    fn parts(&self, id: &str) -> String {
        format!("{}.part.{id}.*", self.prefix)
    }
    fn redo(&self, id: &str) -> String {
        format!("{}.redo.{id}", self.prefix)
    }
    fn wake(&self) -> String {
        format!("{}.wake.route", self.prefix)
    }
    /// The event id in a head or redo subject.
    fn event_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject.strip_prefix(self.prefix.as_str())?;
        rest.strip_prefix(".ev.")
            .or_else(|| rest.strip_prefix(".redo."))
    }
}

/// What a head message carries before the body: the event without its body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub(crate) event: Event,
    pub(crate) id_origin: IdOrigin,
    pub(crate) body_sha256: String,
    pub(crate) conflict_with: Option<String>,
    pub(crate) size: u64,
    /// Parts the body was split into (0: the body follows the metadata).
    pub(crate) parts: u32,
}

impl Meta {
    fn dedup_key(&self) -> String {
        dedup_key(
            &self.event.source,
            self.id_origin,
            &self.event.delivery_id,
            &self.body_sha256,
        )
    }
}

/// A head message's payload: the metadata's length (4 bytes, big-endian),
/// the metadata as JSON, then the body (when not in parts).
fn encode_head(meta: &Meta, body: &[u8]) -> Bytes {
    let json = serde_json::to_vec(meta).expect("event metadata serializes");
    let mut out = BytesMut::with_capacity(4 + json.len() + body.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(body);
    out.freeze()
}

fn decode_head(payload: &Bytes) -> Result<(Meta, Bytes), StoreError> {
    let bad = || StoreError::Backend("an event message is malformed".into());
    let len = u32::from_be_bytes(
        payload
            .get(..4)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    let json = payload.get(4..4 + len).ok_or_else(bad)?;
    let meta: Meta = serde_json::from_slice(json)
        .map_err(|e| StoreError::Backend(format!("an event message's metadata: {e}")))?;
    Ok((meta, payload.slice(4 + len..)))
}

/// One event's routing state: the `prefix-state` bucket's value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct State {
    pub(crate) status: EventStatus,
    pub(crate) attempts: u32,
    #[serde(default)]
    pub(crate) worker: Option<String>,
    #[serde(default)]
    pub(crate) last_error: Option<String>,
    #[serde(default)]
    pub(crate) decision: Option<Decision>,
    #[serde(default)]
    pub(crate) dead_at_ms: Option<i64>,
    /// When a retried or deferred event is due again (a claim's batch is
    /// handed out in due order: this, or else the arrival).
    #[serde(default)]
    pub(crate) due_at_ms: Option<i64>,
}

impl State {
    fn pending() -> State {
        State {
            status: EventStatus::Pending,
            attempts: 0,
            worker: None,
            last_error: None,
            decision: None,
            dead_at_ms: None,
            due_at_ms: None,
        }
    }
}

/// A claim the lease keeper looks after: its message and lease.
trait Loan {
    fn msg(&self) -> &jetstream::Message;
    fn until(&self) -> Instant;
    fn touched(&mut self) -> &mut Instant;
}

/// A claim this node holds.
struct Held {
    msg: jetstream::Message,
    worker: String,
    attempt: u32,
    until: Instant,
    /// When JetStream last heard of it (the claim, or "in progress").
    touched: Instant,
    /// The state as this claim wrote it, and the revision it got.
    state: State,
    rev: u64,
}

impl Loan for Held {
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

/// `dedup` bucket keys: hex SHA-256 of what they stand for (bucket keys
/// allow few characters).
fn dedup_entry(key: &str) -> String {
    format!("d.{}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// The bucket key recording the first event with an unsigned delivery id.
fn conflict_entry(source: &str, delivery_id: &str) -> String {
    format!(
        "c.{}",
        hex::encode(Sha256::digest(format!("{source}:{delivery_id}").as_bytes()))
    )
}

/// Longest an empty claim waits for a first message.
const CLAIM_WAIT: Duration = Duration::from_millis(250);

/// A nak redelivering after `delay` (JetStream takes a zero delay as "no
/// delay given" and waits out the ack wait; no delay at all is at once).
fn nak(delay: Duration) -> AckKind {
    AckKind::Nak((!delay.is_zero()).then_some(delay))
}

/// Milliseconds since the epoch `delay` from now.
fn due_in(delay: Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
}

/// A NATS failure on a write: busy (intake answers 503 and the sender
/// retries), naming what failed.
fn busy(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Busy(format!("NATS JetStream: {what}: {e}"))
}

fn backend(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("NATS JetStream: {what}: {e}"))
}

/// Whether a bucket update failed because the entry moved past the
/// revision it was made against (another writer won). async-nats 0.51
/// knows JetStream's older error code for it (10071); servers from 2.12 on
/// answer 10164, which it reports as "other", with this text.
pub(crate) fn lost_race(e: &kv::UpdateError) -> bool {
    e.kind() == kv::UpdateErrorKind::WrongLastRevision
        || e.to_string().contains("wrong last sequence")
}

/// The NATS JetStream store. Cheap to share behind an `Arc`.
pub struct NatsStore {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) names: Names,
    pub(crate) options: NatsOptions,
    events: stream::Stream,
    router: consumer::PullConsumer,
    dedup: kv::Store,
    state: kv::Store,
    pub(crate) index: Arc<Index>,
    held: Arc<std::sync::Mutex<HashMap<String, Held>>>,
    /// Moves when this node holds a new claim (the lease keeper recomputes
    /// its next wake-up).
    keeper: Arc<Notify>,
    work: Arc<Notify>,
    closed: Arc<AtomicBool>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    max_payload: usize,
    /// The events stream's duplicate window.
    duplicate_window: Duration,
    dispatch: dispatch::Parts,
}

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStore")
            .field("prefix", &self.names.prefix)
            .finish()
    }
}

/// Connects to the servers in `options` (credentials, if any), with a
/// request timeout of `timeout`.
pub async fn connect(options: &NatsOptions) -> Result<async_nats::Client, StoreError> {
    let mut connect = async_nats::ConnectOptions::new()
        .name("sluice")
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(
            (options.append_timeout / 4).max(Duration::from_millis(250)),
        ));
    if let Some(creds) = &options.credentials {
        connect = connect
            .credentials_file(creds)
            .await
            .map_err(|e| backend(&format!("store.nats.credentials {}", creds.display()), e))?;
    }
    let servers: Vec<&str> = options.url.split(',').map(str::trim).collect();
    let client = tokio::time::timeout(Duration::from_secs(10), connect.connect(servers.as_slice()))
        .await
        .map_err(|_| {
            backend(
                &format!("store.nats.url {}", options.url),
                "no server answered in 10 s",
            )
        })?
        .map_err(|e| backend(&format!("store.nats.url {}", options.url), e))?;
    Ok(client)
}

/// The stream and bucket configurations for `options`.
pub(crate) fn layout(
    options: &NatsOptions,
) -> (stream::Config, stream::Config, kv::Config, kv::Config) {
    let names = Names::new(&options.prefix);
    let p = &names.prefix;
    let events = stream::Config {
        name: names.events.clone(),
        subjects: vec![
            format!("{p}.ev.*"),
            format!("{p}.part.*.*"),
            format!("{p}.redo.*"),
        ],
        num_replicas: options.replicas,
        storage: stream::StorageType::File,
        duplicate_window: options
            .dedup_ttl
            .min(Duration::from_secs(120))
            .max(Duration::from_millis(100)),
        allow_direct: true,
        ..Default::default()
    };
    let dlq = stream::Config {
        name: names.dlq.clone(),
        subjects: vec![format!("{p}.dlq.>")],
        num_replicas: options.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let dedup = kv::Config {
        bucket: names.dedup.clone(),
        max_age: options.dedup_ttl,
        history: 1,
        num_replicas: options.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let state = kv::Config {
        bucket: names.state.clone(),
        history: 1,
        num_replicas: options.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    (events, dlq, dedup, state)
}

/// What `sluice check` verifies of the cluster, a line per finding: the
/// servers answer (with the credentials, if any), JetStream is enabled for
/// the account, and each stream and bucket exists with the configured
/// replicas or can be created with them: a stream that does not exist yet
/// is tried by creating a probe stream with those replicas, deleted at
/// once. An error says which key is at fault.
pub async fn check(options: &NatsOptions) -> Result<Vec<String>, StoreError> {
    let client = connect(options).await?;
    let info = client.server_info();
    let js = jetstream::new(client.clone());
    js.query_account().await.map_err(|e| {
        backend(
            &format!("store.nats.url {}", options.url),
            format!("JetStream is not available to this account: {e}"),
        )
    })?;
    let mut lines = vec![format!(
        "nats: connected to {} ({} {}), max payload {} bytes",
        options.url, info.server_name, info.version, info.max_payload
    )];
    let names = Names::new(&options.prefix);
    let mut missing = Vec::new();
    for name in [
        names.events.clone(),
        names.dlq.clone(),
        names.deliveries.clone(),
        format!("KV_{}", names.dedup),
        format!("KV_{}", names.state),
        format!("KV_{}", names.deliveries_state),
    ] {
        match js.get_stream(&name).await {
            Ok(mut stream) => {
                let got = stream
                    .info()
                    .await
                    .map_err(|e| backend(&format!("stream {name}"), e))?;
                let replicas = got.config.num_replicas;
                if replicas != options.replicas {
                    return Err(StoreError::Backend(format!(
                        "store.nats.replicas = {}: stream {name} exists with {replicas} \
                         (change one of them: `nats stream edit {name} --replicas {}`)",
                        options.replicas, options.replicas
                    )));
                }
                lines.push(format!(
                    "nats: stream {name}: {replicas} replicas, {} messages",
                    got.state.messages
                ));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                missing.push(name)
            }
            Err(e) => return Err(backend(&format!("stream {name}"), e)),
        }
    }
    if !missing.is_empty() {
        let probe = format!(
            "{}_CHECK_{}",
            names.events.trim_end_matches("_EVENTS"),
            uuid::Uuid::new_v4().simple()
        );
        js.create_stream(stream::Config {
            name: probe.clone(),
            subjects: vec![format!("{}.check.{}", names.prefix, probe)],
            num_replicas: options.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| {
            StoreError::Backend(format!(
                "store.nats.replicas = {}: cannot create a stream with that many replicas: {e}",
                options.replicas
            ))
        })?;
        let _ = js.delete_stream(&probe).await;
        lines.push(format!(
            "nats: to be created at the first start, with {} replicas: {}",
            options.replicas,
            missing.join(", ")
        ));
    }
    Ok(lines)
}

/// Opens (creating it if missing) a bucket whose reads go to its stream's
/// leader: a compare-and-set writes against the revision it read, and a
/// replica's answer (JetStream's "direct get", a bucket's default) can be
/// behind, which fails the write for nothing.
pub(crate) async fn leader_read_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, StoreError> {
    let bucket = config.bucket.clone();
    let what = || format!("bucket {bucket}");
    if js.get_key_value(&bucket).await.is_err() {
        js.create_key_value(config)
            .await
            .map_err(|e| backend(&what(), e))?;
    }
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| backend(&what(), e))?;
    let info = stream.info().await.map_err(|e| backend(&what(), e))?;
    if info.config.allow_direct {
        let mut config = info.config.clone();
        config.allow_direct = false;
        js.update_stream(config)
            .await
            .map_err(|e| backend(&what(), e))?;
    }
    js.get_key_value(&bucket)
        .await
        .map_err(|e| backend(&what(), e))
}

impl NatsStore {
    /// Connects, creates what is missing (streams, buckets, the routing
    /// consumer) with the configured replicas, opens this node's index and
    /// starts feeding it.
    pub async fn open(options: NatsOptions) -> Result<NatsStore, StoreError> {
        let client = connect(&options).await?;
        let mut js = jetstream::new(client.clone());
        // One request's wait: a quarter of append_timeout, so `retrying`
        // can try again after a leader change within it.
        js.set_timeout((options.append_timeout / 4).max(Duration::from_millis(250)));
        let names = Names::new(&options.prefix);
        let (events_cfg, dlq_cfg, dedup_cfg, state_cfg) = layout(&options);
        let duplicate_window = events_cfg.duplicate_window;
        let events = js
            .get_or_create_stream(events_cfg)
            .await
            .map_err(|e| backend(&format!("stream {}", names.events), e))?;
        js.get_or_create_stream(dlq_cfg)
            .await
            .map_err(|e| backend(&format!("stream {}", names.dlq), e))?;
        let dedup = match js.get_key_value(&names.dedup).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(dedup_cfg)
                .await
                .map_err(|e| backend(&format!("bucket {}", names.dedup), e))?,
        };
        let state = leader_read_bucket(&js, state_cfg).await?;
        let router = events
            .get_or_create_consumer(
                "route",
                consumer::pull::Config {
                    durable_name: Some("route".into()),
                    filter_subjects: vec![
                        format!("{}.ev.*", names.prefix),
                        format!("{}.redo.*", names.prefix),
                    ],
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: options.ack_wait,
                    // The store counts attempts itself (deferrals are not
                    // attempts) and dead-letters past the last.
                    max_deliver: -1,
                    max_ack_pending: 100_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| backend("consumer route", e))?;
        let dispatch = dispatch::Parts::open(&js, &options).await?;
        let index = Arc::new(Index::open(&options.index_path)?);
        let max_payload = client.server_info().max_payload;
        let store = NatsStore {
            client,
            js,
            names,
            events,
            router,
            dedup,
            state,
            index,
            held: Arc::default(),
            keeper: Arc::default(),
            work: Arc::default(),
            closed: Arc::default(),
            tasks: std::sync::Mutex::default(),
            max_payload,
            duplicate_window,
            options,
            dispatch,
        };
        store.start_tasks().await?;
        Ok(store)
    }

    /// The lease keeper, the index feeds and the wake-up subscription.
    async fn start_tasks(&self) -> Result<(), StoreError> {
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(keep_leases(
            self.held.clone(),
            self.keeper.clone(),
            self.options.ack_wait,
            self.closed.clone(),
        )));
        tasks.push(tokio::spawn(keep_leases(
            self.dispatch.held.clone(),
            self.dispatch.keeper.clone(),
            self.options.ack_wait,
            self.closed.clone(),
        )));
        tasks.push(dispatch::wake_task(self).await?);
        let mut wake = self
            .client
            .subscribe(self.names.wake())
            .await
            .map_err(|e| backend("subscribe to wake-ups", e))?;
        let work = self.work.clone();
        tasks.push(tokio::spawn(async move {
            while wake.next().await.is_some() {
                work.notify_waiters();
            }
        }));
        tasks.extend(index::feed(self).await?);
        *self.tasks.lock().expect("tasks lock") = tasks;
        Ok(())
    }

    /// The head message of event `id`, if the stream holds it.
    async fn head(&self, id: &str) -> Result<Option<(Meta, Bytes, u64)>, StoreError> {
        match self
            .events
            .get_last_raw_message_by_subject(&self.names.head(id))
            .await
        {
            Ok(m) => {
                let (meta, body) = decode_head(&m.payload)?;
                let body = self.whole_body(&meta, body).await?;
                Ok(Some((meta, body, m.sequence)))
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(backend(&format!("read {id}"), e)),
        }
    }

    /// The body of an event, reassembled from its parts if it has some.
    async fn whole_body(&self, meta: &Meta, inline: Bytes) -> Result<Bytes, StoreError> {
        if meta.parts == 0 {
            return Ok(inline);
        }
        let mut body = BytesMut::with_capacity(meta.size as usize);
        for n in 0..meta.parts {
            let part = self
                .events
                .get_last_raw_message_by_subject(&self.names.part(&meta.event.id, n))
                .await
                .map_err(|e| backend(&format!("read part {n} of {}", meta.event.id), e))?;
            body.extend_from_slice(&part.payload);
        }
        Ok(body.freeze())
    }

    /// The state entry of `id` and its revision (`None`: never written, or
    /// removed).
    async fn state_of(&self, id: &str) -> Result<(Option<State>, Option<u64>), StoreError> {
        let entry = self
            .state
            .entry(id)
            .await
            .map_err(|e| backend(&format!("state of {id}"), e))?;
        Ok(match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let s: State = serde_json::from_slice(&e.value)
                    .map_err(|err| backend(&format!("state of {id}"), err))?;
                (Some(s), Some(e.revision))
            }
            Some(e) => (None, Some(e.revision)),
            None => (None, None),
        })
    }

    /// Writes `state` for `id` if the entry is still at `rev` (`None`: not
    /// there); `Ok(None)` when someone else changed it first.
    async fn put_state(
        &self,
        id: &str,
        state: &State,
        rev: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        let value = Bytes::from(serde_json::to_vec(state).expect("state serializes"));
        let written = match rev {
            Some(rev) => match self.state.update(id, value, rev).await {
                Ok(r) => Ok(r),
                Err(e) if lost_race(&e) => return Ok(None),
                Err(e) => Err(backend(&format!("state of {id}"), e)),
            },
            None => match self.state.create(id, value).await {
                Ok(r) => Ok(r),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return Ok(None),
                // A create that lost a race is reported as a failed read.
                Err(e) => match self.state.entry(id).await {
                    Ok(Some(_)) => return Ok(None),
                    _ => Err(backend(&format!("state of {id}"), e)),
                },
            },
        }?;
        self.index.apply_state(id, written, Some(state))?;
        Ok(Some(written))
    }

    /// Runs `op` until it succeeds or `store.append_timeout` has passed
    /// (then: busy, naming `what`): while a stream or bucket elects a new
    /// leader (a server went down) a request finds no one to answer. Only
    /// for what is safe to repeat: reads, and writes that carry a
    /// `Nats-Msg-Id` or put the same value again.
    async fn retrying<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
        &self,
        what: &str,
        mut op: impl FnMut() -> F,
    ) -> Result<T, StoreError> {
        let deadline = Instant::now() + self.options.append_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() + pause >= deadline => {
                    return Err(busy(&format!("{what} (within store.append_timeout)"), e));
                }
                Err(e) => {
                    tracing::debug!(what, error = %e, "NATS request failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    /// Publishes `payload` on `subject` and waits for JetStream's ack
    /// ([`NatsStore::retrying`]).
    async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck, StoreError> {
        let what = format!("publish on {subject}");
        self.retrying(&what, || async {
            self.js
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        })
        .await
    }

    /// Publishes an event: its parts first when the body is larger than a
    /// message may be, then its head under the dedup key.
    async fn publish_event(
        &self,
        meta: &mut Meta,
        body: &Bytes,
        msg_id: &str,
    ) -> Result<jetstream::publish::PublishAck, StoreError> {
        // Room for the metadata and headers under the server's limit.
        let room = self
            .max_payload
            .saturating_sub((64 * 1024).min(self.max_payload / 4))
            .max(1024);
        let inline = if body.len() > room {
            let mut n = 0;
            for chunk in body.chunks(room) {
                self.publish(
                    self.names.part(&meta.event.id, n),
                    HeaderMap::new(),
                    body.slice_ref(chunk),
                )
                .await?;
                n += 1;
            }
            meta.parts = n;
            &[][..]
        } else {
            &body[..]
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        self.publish(
            self.names.head(&meta.event.id),
            headers,
            encode_head(meta, inline),
        )
        .await
    }

    /// The id of the event at stream sequence `seq`, if still there.
    async fn id_at(&self, seq: u64) -> Result<Option<String>, StoreError> {
        match self.events.get_raw_message(seq).await {
            Ok(m) => Ok(self.names.event_of(&m.subject).map(str::to_owned)),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(backend(&format!("read sequence {seq}"), e)),
        }
    }

    /// Whether this node holds the claim `lease` names (unexpired).
    fn holding(&self, lease: &Lease) -> Result<(), StoreError> {
        match self.held.lock().expect("held lock").get(&lease.event_id) {
            Some(h)
                if h.worker == lease.worker
                    && h.attempt == lease.attempt
                    && h.until > Instant::now() =>
            {
                Ok(())
            }
            _ => Err(StoreError::LeaseLost(lease.event_id.clone())),
        }
    }

    /// Takes this node's claim matching `lease` (held, unexpired) out of the
    /// table, or says the lease is lost.
    fn take(&self, lease: &Lease) -> Result<Held, StoreError> {
        let mut held = self.held.lock().expect("held lock");
        match held.get(&lease.event_id) {
            Some(h)
                if h.worker == lease.worker
                    && h.attempt == lease.attempt
                    && h.until > Instant::now() =>
            {
                Ok(held.remove(&lease.event_id).expect("just seen"))
            }
            _ => Err(StoreError::LeaseLost(lease.event_id.clone())),
        }
    }

    /// Writes the state a settle leads to under the claim's revision;
    /// someone else's write in between means the lease was lost.
    async fn settle(&self, lease: &Lease, f: impl FnOnce(&mut State)) -> Result<Held, StoreError> {
        let held = self.take(lease)?;
        let mut state = held.state.clone();
        f(&mut state);
        state.worker = None;
        match self
            .put_state(&lease.event_id, &state, Some(held.rev))
            .await?
        {
            Some(_) => Ok(held),
            None => Err(StoreError::LeaseLost(lease.event_id.clone())),
        }
    }

    /// Copies event `id`'s dead-lettering to the DLQ stream, with the
    /// reason (its state, written by the caller, says dead).
    async fn to_dead_letters(&self, id: &str, reason: &str) -> Result<(), StoreError> {
        let mut headers = HeaderMap::new();
        headers.insert("Sluice-Reason", reason.replace(['\r', '\n'], " ").as_str());
        headers.insert("Nats-Msg-Id", format!("dlq:{id}:{}", now_ms()).as_str());
        self.publish(
            format!("{}.dlq.event.{id}", self.names.prefix),
            headers,
            Bytes::new(),
        )
        .await
        .map(|_| ())
    }

    /// Leases one fetched message to `worker`, or settles it at once (a
    /// stale copy of a settled event, or one past its last attempt).
    async fn lease_one(
        &self,
        msg: jetstream::Message,
        worker: &str,
        lease: Duration,
    ) -> Result<Option<(i64, u64, Claimed)>, StoreError> {
        let Some(id) = self.names.event_of(&msg.subject).map(str::to_owned) else {
            let _ = msg.ack_with(AckKind::Term).await;
            return Ok(None);
        };
        let (state, rev) = self.state_of(&id).await?;
        let mut state = state.unwrap_or_else(State::pending);
        if matches!(state.status, EventStatus::Routed | EventStatus::Dead) {
            // Settled already: a copy redelivered after a settle whose ack
            // was lost.
            let _ = msg.double_ack().await;
            return Ok(None);
        }
        let head = if self.names.head(&id) == msg.subject.as_str() {
            let (meta, body) = decode_head(&msg.payload)?;
            let body = self.whole_body(&meta, body).await?;
            Some((meta, body))
        } else {
            self.head(&id).await?.map(|(m, b, _)| (m, b))
        };
        let Some((meta, body)) = head else {
            // A replay of an event retention removed since.
            let _ = msg.ack_with(AckKind::Term).await;
            return Ok(None);
        };
        if state.attempts >= self.options.max_attempts {
            let reason = format!("routing never finished in {} claims", state.attempts);
            state.status = EventStatus::Dead;
            state.last_error = Some(reason.clone());
            state.dead_at_ms = Some(now_ms());
            state.worker = None;
            if self.put_state(&id, &state, rev).await?.is_some() {
                self.to_dead_letters(&id, &reason).await?;
                let _ = msg.double_ack_with(AckKind::Term).await;
            }
            return Ok(None);
        }
        state.status = EventStatus::Claimed;
        state.attempts += 1;
        state.worker = Some(worker.to_owned());
        let Some(new_rev) = self.put_state(&id, &state, rev).await? else {
            // Another node changed it between the read and the write: let
            // the message come round again.
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            return Ok(None);
        };
        let mut event = meta.event;
        event.body = body;
        let attempt = state.attempts;
        let due = state.due_at_ms.unwrap_or(event.received_at_ms);
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let now = Instant::now();
        self.held.lock().expect("held lock").insert(
            id,
            Held {
                msg,
                worker: worker.to_owned(),
                attempt,
                until: now + lease,
                touched: now,
                state,
                rev: new_rev,
            },
        );
        Ok(Some((
            due,
            seq,
            Claimed {
                event,
                attempt,
                worker: worker.to_owned(),
            },
        )))
    }

    /// Fills a record from a head and a state.
    fn record(meta: Meta, body: Bytes, state: Option<State>) -> EventRecord {
        let state = state.unwrap_or_else(State::pending);
        let summary = index::summary(&meta, state.status, state.attempts);
        let mut event = meta.event;
        event.body = body;
        EventRecord {
            summary,
            event,
            decision: state.decision,
            last_error: state.last_error,
        }
    }

    /// Stops the background tasks.
    fn stop_tasks(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.keeper.notify_one();
        self.dispatch.keeper.notify_one();
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }
}

/// Naks the claims whose lease ran out (claimable again at once) and tells
/// JetStream the others are still in progress, so a lease longer than the
/// consumer's ack wait holds.
async fn keep_leases<K, H: Loan>(
    held: Arc<std::sync::Mutex<HashMap<K, H>>>,
    wake: Arc<Notify>,
    ack_wait: Duration,
    closed: Arc<AtomicBool>,
) {
    let touch_every = ack_wait / 3;
    while !closed.load(Ordering::Relaxed) {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut touch = Vec::new();
        let mut next = now + touch_every;
        {
            let mut held = held.lock().expect("held lock");
            held.retain(|_, h| {
                if h.until() <= now {
                    expired.push(h.msg().clone());
                    return false;
                }
                if now.duration_since(*h.touched()) >= touch_every {
                    *h.touched() = now;
                    touch.push(h.msg().clone());
                }
                next = next.min(h.until()).min(*h.touched() + touch_every);
                true
            });
        }
        for m in expired {
            let _ = m.ack_with(AckKind::Nak(None)).await;
        }
        for m in touch {
            let _ = m.ack_with(AckKind::Progress).await;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = wake.notified() => {}
        }
    }
}

#[async_trait]
impl Store for NatsStore {
    async fn append(&self, new: NewEvent) -> Result<Appended, StoreError> {
        let key = new.dedup_key();
        let dedup = dedup_entry(&key);
        // A duplicate older than the stream's window: the bucket knows it.
        if let Some(id) = self
            .retrying("dedup lookup", || self.dedup.get(&dedup))
            .await?
        {
            let id = String::from_utf8_lossy(&id).into_owned();
            if self.head(&id).await?.is_some() {
                return Ok(Appended::Duplicate(id));
            }
        }
        let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
        let conflict_with = if new.id_origin() == IdOrigin::Unsigned {
            let entry = conflict_entry(new.source(), new.delivery_id());
            match self.dedup.create(&entry, Bytes::from(id.clone())).await {
                Ok(_) => None,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => self
                    .dedup
                    .get(&entry)
                    .await
                    .map_err(|e| busy("dedup lookup", e))?
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .filter(|first| *first != id),
                Err(e) => return Err(busy("dedup write", e)),
            }
        } else {
            None
        };
        let mut meta = Meta {
            event: Event {
                id: id.clone(),
                source: new.source().to_owned(),
                provider: new.provider(),
                kind: new.kind().to_owned(),
                action: new.action().map(str::to_owned),
                delivery_id: new.delivery_id().to_owned(),
                received_at_ms: new.received_at_ms(),
                headers: new.headers().to_vec(),
                body: Bytes::new(),
            },
            id_origin: new.id_origin(),
            body_sha256: new.body_sha256().to_owned(),
            conflict_with,
            size: new.body().len() as u64,
            parts: 0,
        };
        let mut ack = self.publish_event(&mut meta, new.body(), &key).await?;
        if ack.duplicate {
            match self.id_at(ack.sequence).await? {
                // Our own earlier try, acknowledged too late (`retrying`
                // published again): stored.
                Some(original) if original == id => {}
                Some(original) => return Ok(Appended::Duplicate(original)),
                // The original was removed by retention within the window:
                // this one is new, under a message id of its own.
                None => {
                    ack = self
                        .publish_event(&mut meta, new.body(), &format!("{key}#{id}"))
                        .await?
                }
            }
        }
        // The event is durable now. Its dedup entry matters only for
        // copies older than the stream's duplicate window: if the bucket
        // cannot take it now (its leader is changing), it is written in the
        // background within that window instead of failing the append.
        if let Err(e) = self
            .retrying("dedup write", || {
                self.dedup.put(&dedup, Bytes::from(id.clone()))
            })
            .await
        {
            tracing::warn!(event = %id, error = %e, "dedup entry not written yet; trying again in the background");
            let (bucket, key, value) = (self.dedup.clone(), dedup.clone(), Bytes::from(id.clone()));
            let window = self.duplicate_window;
            tokio::spawn(async move {
                let start = Instant::now();
                while bucket.put(&key, value.clone()).await.is_err() {
                    if start.elapsed() >= window {
                        tracing::error!(dedup_key = %key, "dedup entry never written: a copy older than the duplicate window would be stored again");
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        }
        self.index.insert_event(&meta, ack.sequence)?;
        // Wake routers on every node (a hint: they also poll).
        let _ = self.client.publish(self.names.wake(), Bytes::new()).await;
        self.work.notify_waiters();
        Ok(match meta.conflict_with {
            Some(conflict_with) => Appended::IdConflict { id, conflict_with },
            None => Appended::Stored(id),
        })
    }

    async fn get(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        let Some((meta, body, _)) = self.head(id).await? else {
            return Ok(None);
        };
        let (state, _) = self.state_of(id).await?;
        Ok(Some(Self::record(meta, body, state)))
    }

    async fn holds(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.head(id).await?.is_some())
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<EventSummary>, StoreError> {
        self.index.list(filter)
    }

    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(StoreError::Closed);
        }
        // What is there, waiting up to CLAIM_WAIT for a first message; then
        // again without waiting until a fetch brings nothing new: on a
        // cluster, a message the stream's leader just acknowledged can take
        // a moment to reach the consumer's leader.
        let max = max.max(1);
        let mut fetched = Vec::new();
        let mut first = true;
        while fetched.len() < max {
            let mut fetch = self.router.fetch().max_messages(max - fetched.len());
            if first {
                fetch = fetch.expires(CLAIM_WAIT);
            }
            let mut batch = fetch.messages().await.map_err(|e| backend("claim", e))?;
            let before = fetched.len();
            while let Some(msg) = batch.next().await {
                fetched.push(msg.map_err(|e| backend("claim", e))?);
            }
            if fetched.len() == before {
                break;
            }
            first = false;
        }
        // Each claim is its own round trips to the bucket: all at once.
        let leased = futures_util::future::join_all(
            fetched
                .into_iter()
                .map(|msg| self.lease_one(msg, worker, lease)),
        )
        .await;
        let mut out = Vec::new();
        let mut failed = None;
        for l in leased {
            match l {
                Ok(Some(c)) => out.push(c),
                Ok(None) => {}
                // Not leased: the message comes round again after AckWait.
                Err(e) => failed = Some(e),
            }
        }
        if out.is_empty()
            && let Some(e) = failed
        {
            return Err(e);
        }
        if !out.is_empty() {
            self.keeper.notify_one();
        }
        // JetStream hands out redeliveries first; a batch goes in due order.
        out.sort_by_key(|(due, seq, _)| (*due, *seq));
        Ok(out.into_iter().map(|(_, _, c)| c).collect())
    }

    async fn complete(&self, lease: &Lease, decision: &Decision) -> Result<(), StoreError> {
        // The lease first (a lost one publishes nothing), then the
        // deliveries, then the state that says routed: a crash in between
        // routes the event again, and its deliveries' second publish is a
        // duplicate of the first.
        self.holding(lease)?;
        self.queue_routes(&lease.event_id, decision).await?;
        let held = self
            .settle(lease, |s| {
                s.status = EventStatus::Routed;
                s.decision = Some(decision.clone());
                s.last_error = None;
            })
            .await?;
        // Confirmed, so the queue depth read next counts it settled.
        let _ = held.msg.double_ack().await;
        Ok(())
    }

    async fn retry_later(
        &self,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> Result<Released, StoreError> {
        let last = self
            .held
            .lock()
            .expect("held lock")
            .get(&lease.event_id)
            .is_some_and(|h| h.state.attempts >= self.options.max_attempts);
        if last {
            self.dead_letter(lease, error).await?;
            return Ok(Released::DeadLettered);
        }
        let held = self
            .settle(lease, |s| {
                s.status = EventStatus::Pending;
                s.last_error = Some(error.to_owned());
                s.due_at_ms = Some(due_in(delay));
            })
            .await?;
        // Confirmed, so a claim right after sees it queued again.
        let _ = held.msg.double_ack_with(nak(delay)).await;
        Ok(Released::Retrying)
    }

    async fn defer(&self, lease: &Lease, delay: Duration, reason: &str) -> Result<(), StoreError> {
        let held = self
            .settle(lease, |s| {
                s.status = EventStatus::Pending;
                s.attempts = s.attempts.saturating_sub(1);
                s.last_error = Some(reason.to_owned());
                s.due_at_ms = Some(due_in(delay));
            })
            .await?;
        let _ = held.msg.double_ack_with(nak(delay)).await;
        Ok(())
    }

    async fn extend(&self, leases: &[Lease], lease: Duration) -> Result<Vec<bool>, StoreError> {
        let now = Instant::now();
        let mut out = Vec::with_capacity(leases.len());
        let mut touch = Vec::new();
        {
            let mut held = self.held.lock().expect("held lock");
            for l in leases {
                match held.get_mut(&l.event_id) {
                    Some(h) if h.worker == l.worker && h.attempt == l.attempt && h.until > now => {
                        h.until = now + lease;
                        h.touched = now;
                        touch.push(h.msg.clone());
                        out.push(true);
                    }
                    _ => out.push(false),
                }
            }
        }
        for m in touch {
            let _ = m.ack_with(AckKind::Progress).await;
        }
        self.keeper.notify_one();
        Ok(out)
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), StoreError> {
        let held = self
            .settle(lease, |s| {
                s.status = EventStatus::Dead;
                s.last_error = Some(reason.to_owned());
                s.dead_at_ms = Some(now_ms());
            })
            .await?;
        self.to_dead_letters(&lease.event_id, reason).await?;
        let _ = held.msg.double_ack_with(AckKind::Term).await;
        Ok(())
    }

    async fn requeue(&self, id: &str) -> Result<(), StoreError> {
        if self.head(id).await?.is_none() {
            return Err(StoreError::NotFound(id.to_owned()));
        }
        let (state, rev) = self.state_of(id).await?;
        let Some(mut state) = state else {
            return Ok(()); // never claimed: still queued
        };
        if matches!(state.status, EventStatus::Pending | EventStatus::Claimed) {
            return Ok(());
        }
        state.status = EventStatus::Pending;
        state.attempts = 0;
        state.worker = None;
        state.dead_at_ms = None;
        state.due_at_ms = Some(now_ms());
        if self.put_state(id, &state, rev).await?.is_none() {
            return Err(backend(
                &format!("replay {id}"),
                "changed meanwhile; try again",
            ));
        }
        self.publish(self.names.redo(id), HeaderMap::new(), Bytes::new())
            .await?;
        let _ = self.client.publish(self.names.wake(), Bytes::new()).await;
        self.work.notify_waiters();
        Ok(())
    }

    async fn expire(&self, cutoff_ms: i64) -> Result<Expired, StoreError> {
        let mut gone = Expired::default();
        for (meta, seq, dead) in self.index.expirable(cutoff_ms)? {
            let id = meta.event.id.clone();
            // Only what is settled now (the index may lag another node).
            let (state, _) = self.state_of(&id).await?;
            if !state.as_ref().is_some_and(|s| {
                s.status == EventStatus::Routed
                    || (s.status == EventStatus::Dead
                        && s.dead_at_ms.is_some_and(|t| t < cutoff_ms))
            }) {
                continue;
            }
            for subject in [self.names.parts(&id), self.names.redo(&id)] {
                self.events
                    .purge()
                    .filter(subject)
                    .await
                    .map_err(|e| backend(&format!("expire {id}"), e))?;
            }
            match self.events.delete_message(seq).await {
                Ok(_) => {}
                Err(e) => tracing::debug!(event = %id, error = %e, "head already gone"),
            }
            let _ = self.dedup.purge(dedup_entry(&meta.dedup_key())).await;
            if meta.id_origin == IdOrigin::Unsigned {
                let _ = self
                    .dedup
                    .purge(conflict_entry(&meta.event.source, &meta.event.delivery_id))
                    .await;
            }
            self.state
                .purge(&id)
                .await
                .map_err(|e| backend(&format!("expire {id}"), e))?;
            self.forget_deliveries(&id).await?;
            self.index.remove(&id)?;
            gone.events += 1;
            if dead {
                gone.dead_letters += 1;
            }
        }
        Ok(gone)
    }

    async fn queue_depth(&self) -> Result<u64, StoreError> {
        // From the index: exact for this node's writes, others' as the feed
        // brings them (a clustered consumer's own pending count lags too).
        self.index.unsettled()
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let mut events = self.events.clone();
        events
            .info()
            .await
            .map(|_| ())
            .map_err(|e| busy(&format!("stream {}", self.names.events), e))
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.work.notified()).await;
    }

    async fn import(
        &self,
        record: &super::export::ExportedEvent,
    ) -> Result<super::export::Imported, StoreError> {
        use super::export::Imported;
        let checked = record
            .check()
            .map_err(|e| StoreError::Backend(format!("event {}: {e}", record.id)))?;
        let e = &checked.event;
        if self.head(&e.id).await?.is_some() {
            return Ok(Imported::AlreadyHeld(e.id.clone()));
        }
        let dedup = dedup_entry(&checked.dedup_key);
        if let Some(held) = self
            .retrying("dedup lookup", || self.dedup.get(&dedup))
            .await?
        {
            let held = String::from_utf8_lossy(&held).into_owned();
            if self.head(&held).await?.is_some() {
                return Ok(Imported::AlreadyHeld(held));
            }
        }
        let decision: Option<Decision> =
            match &e.decision {
                Some(raw) => Some(serde_json::from_str(raw.get()).map_err(|err| {
                    StoreError::Backend(format!("event {}: decision: {err}", e.id))
                })?),
                None => None,
            };
        // The state goes in before the event: the router, handed the new
        // message, finds a routed or dead event settled and leaves it.
        let state = State {
            status: match e.status {
                EventStatus::Routed | EventStatus::Dead => e.status,
                EventStatus::Pending | EventStatus::Claimed => EventStatus::Pending,
            },
            attempts: e.attempts,
            worker: None,
            last_error: e.last_error.clone(),
            decision: decision.clone(),
            dead_at_ms: e.dead_at_ms,
            due_at_ms: None,
        };
        let (_, rev) = self.state_of(&e.id).await?;
        if self.put_state(&e.id, &state, rev).await?.is_none() {
            return Ok(Imported::AlreadyHeld(e.id.clone()));
        }
        let mut meta = Meta {
            event: Event {
                id: e.id.clone(),
                source: e.source.clone(),
                provider: e.provider,
                kind: e.kind.clone(),
                action: e.action.clone(),
                delivery_id: e.delivery_id.clone(),
                received_at_ms: e.received_at_ms,
                headers: e.headers.clone(),
                body: Bytes::new(),
            },
            id_origin: e.id_origin,
            body_sha256: checked.body_sha256.clone(),
            conflict_with: e.conflict_with.clone(),
            size: checked.body.len() as u64,
            parts: 0,
        };
        let ack = self
            .publish_event(&mut meta, &checked.body, &checked.dedup_key)
            .await?;
        if ack.duplicate {
            let held = self.id_at(ack.sequence).await?.unwrap_or_default();
            if held != e.id {
                return Ok(Imported::AlreadyHeld(held));
            }
        }
        self.retrying("dedup write", || {
            self.dedup.put(&dedup, Bytes::from(e.id.clone()))
        })
        .await?;
        self.index.insert_event(&meta, ack.sequence)?;
        // Deliveries still queued go out again under their keys; those
        // delivered or dead stay in the export (this backend keeps no
        // record of them).
        if let Some(d) = decision.filter(|_| e.status == EventStatus::Routed) {
            let queued: Vec<_> = e
                .deliveries
                .iter()
                .filter(|x| {
                    x.status == super::dispatch::DeliveryStatus::Queued && x.workflow.is_none()
                })
                .map(|x| x.route.clone())
                .collect();
            if !queued.is_empty() {
                self.queue_routes(
                    &e.id,
                    &Decision {
                        routes: queued,
                        ..d
                    },
                )
                .await?;
            }
        }
        Ok(Imported::Added)
    }

    async fn close(&self) {
        // Claims still held go back at once rather than at their ack wait.
        let held: Vec<Held> = self
            .held
            .lock()
            .expect("held lock")
            .drain()
            .map(|(_, h)| h)
            .collect();
        for h in held {
            let _ = h.msg.ack_with(AckKind::Nak(None)).await;
        }
        let delivering: Vec<jetstream::Message> = self
            .dispatch
            .held
            .lock()
            .expect("held lock")
            .drain()
            .map(|(_, h)| h.msg().clone())
            .collect();
        for m in delivering {
            let _ = m.ack_with(AckKind::Nak(None)).await;
        }
        self.stop_tasks();
        let _ = self.client.flush().await;
    }
}

#[async_trait]
impl super::EventReader for NatsStore {
    async fn get(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        Store::get(self, id).await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<EventSummary>, StoreError> {
        self.index.list(filter)
    }

    async fn decisions(&self, limit: usize) -> Result<Vec<super::RecordedDecision>, StoreError> {
        self.index.decisions(limit)
    }
}

impl Drop for NatsStore {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}
