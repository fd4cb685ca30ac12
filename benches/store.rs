//! What a router worker's claim costs as the backlog grows: one claim of a
//! batch (`rules.batch`'s default) and the completion of each event it
//! handed out, the way a worker routes a batch, at 1k and at 1M pending
//! events, measured in one run and compared. The work queue is an index on
//! `(due_at_ms, seq)`, so the aim is a claim at 1M within 1.5× of the claim
//! at 1k.
//!
//! A backlog is built cheaply but for real: its records are written straight
//! to the event log with the log's own writer (small bodies, in a few large
//! durable writes, each record under its own sequence number), and the store
//! opened on that log indexes them with its own replay, so every claim reads
//! real records through the real `Store::claim` path. The bulk's due times
//! follow arrival, four events per millisecond, with one in ten stamped a
//! quarter second earlier than its neighbours (a request that waited for the
//! writer), so due order and sequence order disagree locally. While a round
//! runs, the backlog is topped up (untimed) with events appended through the
//! store, so it stays near its size, as under steady intake.
//!
//! Every claimed event is checked against the order it is due in: the bulk in
//! exactly its (due time, sequence) order, then the top-ups by due time. The
//! claim's query plan is checked to read the `queue_due` index in order, with
//! no sort.
//!
//! `cargo bench --bench store` for figures: an interleaved run of rounds
//! first (median and p90 of a round and of its claim alone, and the 1M/1k
//! ratios of the medians), then criterion's estimates of a round. `cargo test --release --benches` builds 1k and 10k
//! backlogs only and checks the order over enough rounds to reach the top-ups.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use sluice::decision::Decision;
use sluice::event::{IdOrigin, Provider, dedup_key, now_ms};
use sluice::ingress::normalize::{Naming, normalize};
use sluice::ingress::verify::Verifier;
use sluice::rules::config::RulesConfig;
use sluice::store::log::{self, LogWriter, Record};
use sluice::store::sqlite::Options;
use sluice::store::{Appended, Claimed, SqliteStore, Store};
use tokio::runtime::Runtime;

/// A lease no round outlives.
const LEASE: Duration = Duration::from_secs(300);

/// Records framed per durable write while a backlog is built.
const WRITE_CHUNK: usize = 50_000;

/// One backlog: a store holding `size` pending events, and what its claims
/// must hand out next.
struct Backlog {
    name: String,
    size: usize,
    store: Arc<SqliteStore>,
    /// Bulk events not claimed yet, in the order they are due.
    due: VecDeque<String>,
    /// The due time of the last top-up event claimed.
    last_due: i64,
    /// Top-up events appended so far (their delivery ids).
    topped_up: usize,
    /// Claims with their completions, one per round.
    rounds: Vec<Duration>,
    /// The claims alone, one per round.
    claims: Vec<Duration>,
    _dir: tempfile::TempDir,
}

fn label(size: usize) -> String {
    match size {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// A bulk event's record: sequence `seq`, stamped `received_at_ms`.
fn bulk_record(seq: i64, received_at_ms: i64) -> Record {
    let body = Bytes::from(format!(r#"{{"action":"opened","n":{seq}}}"#));
    let delivery_id = format!("bulk-{seq}");
    let body_sha256 = sha256_hex(&body);
    Record {
        seq,
        id: format!("evt_{}", uuid::Uuid::now_v7().simple()),
        source: "bench".into(),
        provider: Provider::Hmac,
        kind: "push".into(),
        action: Some("opened".into()),
        dedup_key: dedup_key("bench", IdOrigin::Unsigned, &delivery_id, &body_sha256),
        delivery_id,
        id_origin: IdOrigin::Unsigned,
        body_sha256,
        conflict_with: None,
        dedup_until_ms: None,
        received_at_ms,
        headers: Vec::new(),
        body,
    }
}

/// Writes `size` records to the log of the index at `path`; returns the
/// bulk's ids in the order they are due.
fn write_bulk(path: &Path, size: usize) -> VecDeque<String> {
    let mut writer =
        LogWriter::open(&log::dir_for(path), log::SEGMENT_BYTES).expect("open the event log");
    let base = now_ms() - 3_600_000;
    let mut order: Vec<(i64, i64, String)> = Vec::with_capacity(size);
    let mut buf = Vec::with_capacity(WRITE_CHUNK * 160);
    for seq in 1..=size as i64 {
        let early = if seq % 10 == 3 { 250 } else { 0 };
        let rec = bulk_record(seq, base + seq / 4 - early);
        rec.frame_into(&mut buf);
        order.push((rec.received_at_ms, seq, rec.id));
        if (seq as usize).is_multiple_of(WRITE_CHUNK) || seq == size as i64 {
            writer.append_durably(&buf).expect("write the event log");
            writer.roll_if_full().expect("roll the event log");
            buf.clear();
        }
    }
    order.sort_unstable();
    order.into_iter().map(|(_, _, id)| id).collect()
}

/// Checks that the claim reads the `queue_due` index in order, never sorts.
fn check_plan(path: &Path) -> Vec<String> {
    let plan = SqliteStore::open_read_only(path)
        .expect("open the index read-only")
        .claim_plan()
        .expect("explain the claim");
    assert!(
        plan.iter().any(|step| step.contains("INDEX queue_due")),
        "the claim does not read the queue_due index: {plan:?}"
    );
    assert!(
        !plan.iter().any(|step| step.contains("TEMP B-TREE")),
        "the claim sorts the due rows: {plan:?}"
    );
    plan
}

fn build(size: usize) -> Backlog {
    let dir = tempfile::Builder::new()
        .prefix("sluice-store-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let path: PathBuf = dir.path().join("sluice.db");
    let started = Instant::now();
    let due = write_bulk(&path, size);
    let written = started.elapsed();
    let store = Arc::new(SqliteStore::open_with(&path, Options::default()).expect("open store"));
    let indexed = started.elapsed() - written;
    let plan = check_plan(&path);
    let name = label(size);
    println!(
        "backlog {name}: log written in {:.1} s, indexed by the store's replay in {:.1} s; claim plan: {}",
        written.as_secs_f64(),
        indexed.as_secs_f64(),
        plan.join(" / ")
    );
    Backlog {
        name,
        size,
        store,
        due,
        last_due: i64::MIN,
        topped_up: 0,
        rounds: Vec::new(),
        claims: Vec::new(),
        _dir: dir,
    }
}

fn decision() -> Decision {
    Decision {
        rules: Vec::new(),
        routes: Vec::new(),
        dead_letter: None,
        defer: None,
        decided_at_ms: now_ms(),
    }
}

/// A new event as intake hands it to the store, stamped now.
fn top_up_event(delivery: &str) -> sluice::ingress::NewEvent {
    let mut h = HeaderMap::new();
    h.insert(
        "x-delivery",
        HeaderValue::from_str(delivery).expect("header"),
    );
    let naming = Naming {
        delivery_header: Some(HeaderName::from_static("x-delivery")),
        kind_header: None,
    };
    let verified = Verifier::None
        .verify_at(
            h,
            Bytes::from(format!(r#"{{"action":"opened","d":"{delivery}"}}"#)),
            0,
        )
        .expect("unsigned source");
    normalize("bench", Provider::Hmac, &naming, verified, now_ms()).expect("normalize")
}

impl Backlog {
    /// Appends events until the backlog is back to its size, when it has
    /// fallen a tenth (at most 1024 events) below it.
    async fn top_up(&mut self, batch: usize) {
        let depth = self.store.queue_depth().await.expect("queue depth") as usize;
        let slack = (self.size / 10).clamp(batch, 1024);
        if depth + slack > self.size {
            return;
        }
        let mut appends = tokio::task::JoinSet::new();
        for _ in depth..self.size {
            self.topped_up += 1;
            let store = self.store.clone();
            let ev = top_up_event(&format!("top-up-{}", self.topped_up));
            appends.spawn(async move { store.append(ev).await });
        }
        while let Some(done) = appends.join_next().await {
            let appended = done.expect("append task").expect("append");
            assert!(matches!(appended, Appended::Stored(_)), "{appended:?}");
        }
    }

    /// One worker's round: claims a batch and completes each event. Returns
    /// how long the claim took and the whole round, and checks what was
    /// claimed against the due order.
    async fn round(&mut self, batch: usize) -> (Duration, Duration) {
        self.top_up(batch).await;
        let decision = decision();
        let started = Instant::now();
        let claimed = self
            .store
            .claim("bench", batch, LEASE)
            .await
            .expect("claim");
        let claim = started.elapsed();
        for c in &claimed {
            self.store
                .complete(&c.lease(), &decision)
                .await
                .expect("complete");
        }
        let took = started.elapsed();
        self.check_order(&claimed, batch);
        (claim, took)
    }

    fn check_order(&mut self, claimed: &[Claimed], batch: usize) {
        assert_eq!(
            claimed.len(),
            batch,
            "{}: a claim on a backlog took fewer than a batch",
            self.name
        );
        for c in claimed {
            assert_eq!(c.attempt, 1, "{}: {} claimed twice", self.name, c.event.id);
            match self.due.pop_front() {
                Some(id) => assert_eq!(
                    c.event.id, id,
                    "{}: the claim skipped the oldest due event",
                    self.name
                ),
                None => {
                    assert!(
                        c.event.received_at_ms >= self.last_due,
                        "{}: a top-up event came before an older one",
                        self.name
                    );
                    self.last_due = c.event.received_at_ms;
                }
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Runs `rounds` rounds on every backlog, interleaved so that the machine's
/// noise falls on each alike, and prints each one's figures and the ratio of
/// the largest backlog's median to the smallest's.
fn compare(rt: &Runtime, backlogs: &mut [Backlog], rounds: usize, batch: usize) {
    for _ in 0..rounds {
        for b in backlogs.iter_mut() {
            let (claim, took) = rt.block_on(b.round(batch));
            b.claims.push(claim);
            b.rounds.push(took);
        }
    }
    println!();
    println!(
        "{rounds} rounds per backlog, interleaved (one worker: claim {batch}, complete each):"
    );
    let mut figures = Vec::new();
    for b in backlogs.iter() {
        let (round, claim) = (median_p90(&b.rounds), median_p90(&b.claims));
        println!(
            "  {:>4} pending: round median {:>6.0} µs ({:.1} µs per event), p90 {:>6.0} µs; \
             claim alone median {:>5.0} µs, p90 {:>6.0} µs",
            b.name,
            micros(round.0),
            micros(round.0) / batch as f64,
            micros(round.1),
            micros(claim.0),
            micros(claim.1)
        );
        figures.push((round.0, claim.0));
    }
    if let (Some(first), Some(last)) = (figures.first(), figures.last())
        && backlogs.len() > 1
    {
        let names = format!(
            "{} / {}",
            backlogs[backlogs.len() - 1].name,
            backlogs[0].name
        );
        let ratio = micros(last.0) / micros(first.0);
        println!(
            "  ratio {names}, round medians: {ratio:.2}×; aim ≤ 1.5×: {}",
            if ratio <= 1.5 { "met" } else { "NOT met" }
        );
        println!(
            "  ratio {names}, claim medians: {:.2}×",
            micros(last.1) / micros(first.1)
        );
    }
    println!();
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The median and the 90th percentile.
fn median_p90(times: &[Duration]) -> (Duration, Duration) {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    (percentile(&sorted, 0.5), percentile(&sorted, 0.9))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench_mode = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    if args.iter().any(|a| a == "--list") {
        println!("claim/1k: benchmark");
        println!("claim/1M: benchmark");
        return;
    }
    let batch = RulesConfig::default().batch;
    // Under `cargo test`, small backlogs only, and enough rounds that the
    // 1k one is topped up and its top-ups claimed too.
    let (sizes, rounds): (&[usize], usize) = if bench_mode {
        (&[1_000, 1_000_000], 400)
    } else {
        (&[1_000, 10_000], 2 * 1_000 / batch)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut backlogs: Vec<Backlog> = sizes.iter().map(|&n| build(n)).collect();
    compare(&rt, &mut backlogs, rounds, batch);

    let mut c = Criterion::default().configure_from_args();
    {
        let mut group = c.benchmark_group("claim");
        // One element per event claimed and completed.
        group
            .throughput(Throughput::Elements(batch as u64))
            .sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        for b in backlogs.iter_mut() {
            let name = b.name.clone();
            group.bench_function(name, |bench| {
                bench.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += rt.block_on(b.round(batch)).1;
                    }
                    total
                })
            });
        }
        group.finish();
    }
    c.final_summary();
    for b in &backlogs {
        b.store.close();
    }
}
