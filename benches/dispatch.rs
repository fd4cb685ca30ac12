//! Dispatch over loopback HTTP: what sluice spends to hand one routed event
//! to an agent, and what the whole gateway does end to end, on the real 11.6 KB
//! GitHub `issues.opened` payload (compact, as GitHub sends it).
//!
//! Both parts deliver to a local agent server in the bench process: axum on
//! 127.0.0.1:0, answering `200 {"ok":true}` at once, on its own runtime whose
//! threads are all named `agent`, so its CPU is counted apart (and printed)
//! and never in sluice's. It checks the first [`VERIFY_SAMPLE`] deliveries'
//! signatures with the reference Standard Webhooks library.
//!
//! 1. **Dispatch overhead per delivery against a bare hyper POST.** A real
//!    `SqliteStore` in a temp dir gets `n` events appended and routed (claim,
//!    then `complete_all` with a decision routing each to the one http agent,
//!    which queues the deliveries in the same write) while the agent is
//!    paused; then the agent is resumed and the real `Dispatcher` (agents
//!    built by `Dispatcher::build_agents` from a config, on two tokio workers
//!    named `dispatch`) sends them all: claim, envelope, Standard Webhooks
//!    signature, POST, settle. Timed from the resume until every delivery is
//!    settled; sluice's CPU is the process's minus the bench's own threads
//!    (the agent server, the client, the poller, the main thread). Baseline:
//!    a bare hyper client (one current-thread runtime) POSTing the same
//!    signed envelope body, pre-signed, `n` times with the same number in
//!    flight ([`IN_FLIGHT`], the agents' default `concurrency`); its CPU is
//!    the client thread's. Rounds alternate; medians. The aim is at most 2×.
//! 2. **End to end**: `sluice serve` as a child process with the shipped
//!    `sluice.toml` and `rules/` (the github-router component routes
//!    `issues.opened` to `issue-triage`), only its data dir, ports, the
//!    secrets (files) and the five GitHub agents (`http` at the bench's agent
//!    server instead of the outbox) changed. Each event's `issue.number` is
//!    its own, so the router's ordering key (`owner/repo#n`) does not put every
//!    delivery in one line: a burst from many issues, not 10,000 events on
//!    one. The client sends from 256 loopback addresses (the shipped shield
//!    admits 100/s per address). (a) the sustained rate: `n` events sent with
//!    48 in flight as fast as intake takes them, timed until the agent has
//!    answered every one; sluice's CPU per event from `/proc/PID/stat` of the
//!    child (every thread), read once the settles are in. (b) latency at a
//!    steady 500 events/s for 10 s: from the moment the client sends a
//!    request to the moment the agent receives its delivery, matched by the
//!    envelope's `event.delivery_id` (`X-GitHub-Delivery`); p50 and p99. Both
//!    are printed against the anchor from the issue: a Svix server with
//!    Postgres and Redis on this machine.
//!
//! `cargo bench --bench dispatch` for figures; `cargo test --release
//! --benches` runs a small round of each as a smoke test that checks every
//! delivery reached the agent, verified, and was settled.

// The CPU clocks are only reachable through libc (in `common`): the only
// unsafe code.
#![allow(unsafe_code)]

mod common;

use std::collections::{BTreeMap, HashMap};

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::routing::post;
use bytes::Bytes;
use common::{
    CLIENT_THREAD, ClientOptions, CpuMark, CpuSpan, Driver, Pace, Server, median, payload,
    quantile, server_runtime, signed_request,
};
use http::{Request, Uri};
use http_body_util::Full;
use sluice::cli::send::Signer;
use sluice::config::Config;
use sluice::decision::{Decision, Priority, Route};
use sluice::dispatch::dispatcher::Dispatcher;
use sluice::dispatch::envelope::Envelope;
use sluice::event::{Event, Provider, now_ms};
use sluice::ingress::normalize::{Naming, normalize};
use sluice::ingress::verify::Verifier;
use sluice::secret::Generate;
use sluice::store::dispatch::DispatchStore;
use sluice::store::{Appended, SqliteStore, Store};
use standardwebhooks::Webhook;
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// The agents' signing secret (`dispatch.signing_secret`).
const AGENT_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The GitHub source's secret in the end-to-end config.
const GITHUB_SECRET: &str = "dispatch-bench-github-secret";

/// Deliveries in flight: the agents' default `concurrency`, and the
/// baseline client's.
const IN_FLIGHT: usize = 16;

/// Deliveries whose signature the agent server checks with the reference
/// library (the rest it only counts, to keep its CPU off the shared cores).
const VERIFY_SAMPLE: usize = 32;

/// Thread names of the bench's own parts, whose CPU is not sluice's.
const AGENT_THREAD: &str = "agent";
const POLL_THREAD: &str = "bench-poll";

/// Loopback addresses the end-to-end client sends from (the shield admits
/// 100/s per address, bursts of 500).
const CLIENT_ADDRESSES: usize = 256;

/// The anchor from the issue: a Svix server (with Postgres and Redis) on
/// this machine.
const SVIX_RATE: f64 = 690.0;
const SVIX_CPU_US: f64 = 2_640.0;
const SVIX_P50_MS: f64 = 7.6;
const SVIX_P99_MS: f64 = 12.9;

/// The steady rate of the latency run.
const STEADY_PER_SECOND: u32 = 500;

/// What the agent server saw.
#[derive(Default)]
struct Seen {
    /// Deliveries answered, every agent.
    answered: AtomicUsize,
    /// Deliveries to another agent than the one expected.
    elsewhere: AtomicUsize,
    /// Deliveries taken for the signature sample, and those that verified.
    sampled: AtomicUsize,
    verified: AtomicUsize,
    /// While set, each arrival is recorded with its `event.delivery_id`.
    record: AtomicBool,
    arrivals: std::sync::Mutex<Vec<(String, Instant)>>,
}

struct AgentState {
    seen: Seen,
    /// The agent every delivery should go to (the URL path's last segment).
    expect: String,
    webhook: Webhook,
}

/// The part of an envelope the agent server reads.
#[derive(serde::Deserialize)]
struct EnvelopeId {
    event: EnvelopeEventId,
}

#[derive(serde::Deserialize)]
struct EnvelopeEventId {
    delivery_id: String,
}

async fn agent_answer(
    State(state): State<Arc<AgentState>>,
    UrlPath(agent): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (
    StatusCode,
    [(header::HeaderName, HeaderValue); 1],
    &'static str,
) {
    let at = Instant::now();
    let seen = &state.seen;
    if seen.sampled.fetch_add(1, Ordering::Relaxed) < VERIFY_SAMPLE
        && state.webhook.verify(&body, &headers).is_ok()
    {
        seen.verified.fetch_add(1, Ordering::Relaxed);
    }
    if agent != state.expect {
        seen.elsewhere.fetch_add(1, Ordering::Relaxed);
    }
    if seen.record.load(Ordering::Relaxed)
        && let Ok(envelope) = serde_json::from_slice::<EnvelopeId>(&body)
    {
        seen.arrivals
            .lock()
            .expect("arrivals")
            .push((envelope.event.delivery_id, at));
    }
    // Last, so a waiter that sees the count also sees the arrival.
    seen.answered.fetch_add(1, Ordering::Release);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        r#"{"ok":true}"#,
    )
}

/// The local agent server: `POST /agents/{name}` answers 200 at once.
struct AgentServer {
    server: Server,
    state: Arc<AgentState>,
    base: String,
}

impl AgentServer {
    fn start(expect: &str) -> AgentServer {
        let state = Arc::new(AgentState {
            seen: Seen::default(),
            expect: expect.to_string(),
            webhook: Webhook::new(AGENT_SECRET).expect("whsec key"),
        });
        let app = Router::new()
            .route("/agents/{agent}", post(agent_answer))
            .with_state(state.clone());
        let server = Server::serve(app, AGENT_THREAD, "agent-server", |addr| {
            format!("http://{addr}/agents/{expect}")
        });
        let base = format!(
            "http://{}/agents",
            server.uri.authority().expect("an address")
        );
        AgentServer {
            server,
            state,
            base,
        }
    }

    fn url(&self, agent: &str) -> String {
        format!("{}/{agent}", self.base)
    }

    fn answered(&self) -> usize {
        self.state.seen.answered.load(Ordering::Acquire)
    }

    /// Waits (polling every millisecond) until `n` deliveries have been
    /// answered; when, or `None` past `limit`.
    fn wait_answered(&self, n: usize, limit: Duration) -> Option<Instant> {
        let start = Instant::now();
        loop {
            if self.answered() >= n {
                return Some(Instant::now());
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Checks that every delivery went to the expected agent and that the
    /// sampled ones verified with the reference library.
    fn assert_sound(&self) {
        let seen = &self.state.seen;
        assert_eq!(
            seen.elsewhere.load(Ordering::Relaxed),
            0,
            "deliveries reached another agent than {}",
            self.state.expect
        );
        let sampled = seen.sampled.load(Ordering::Relaxed).min(VERIFY_SAMPLE);
        assert!(sampled > 0, "no delivery reached the agent");
        assert_eq!(
            seen.verified.load(Ordering::Relaxed),
            sampled,
            "sampled deliveries that verify with the reference Standard Webhooks library"
        );
    }
}

/// The bench's own threads, whose CPU is not sluice's.
fn bench_cpu(span: &CpuSpan, main_thread: &str) -> Duration {
    [AGENT_THREAD, CLIENT_THREAD, POLL_THREAD, main_thread]
        .iter()
        .map(|name| span.of(name))
        .sum()
}

fn us_per(cpu: Duration, n: usize) -> f64 {
    cpu.as_secs_f64() * 1e6 / n.max(1) as f64
}

/// CPU per delivery by thread name (µs), busiest first, without `skip`.
fn split_line(span: &CpuSpan, n: usize, skip: &[&str]) -> String {
    let mut split: Vec<(&String, f64)> = span
        .threads
        .iter()
        .filter(|(name, _)| !skip.iter().any(|s| name.starts_with(s)))
        .map(|(name, cpu)| (name, us_per(*cpu, n)))
        .filter(|(_, us)| *us >= 0.5)
        .collect();
    split.sort_by(|a, b| b.1.total_cmp(&a.1));
    split
        .iter()
        .map(|(name, us)| format!("{name} {us:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main_thread() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .expect("thread name")
        .trim()
        .to_string()
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    // On the build disk, not a tmpfs, so the store's syncs cost what they would.
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir")
}

// ---------------------------------------------------------------------------
// 1. Dispatch overhead per delivery against a bare hyper POST.

/// The agent of the overhead bench.
const AGENT: &str = "bench";

/// A lease no queueing outlives.
const LEASE: Duration = Duration::from_secs(300);

/// The route the shipped github-router gives `issues.opened`, to the bench's
/// agent and without its ordering key (one issue's events go out one at a
/// time; these are many issues').
fn route() -> Route {
    Route {
        agent: AGENT.into(),
        workflow: None,
        priority: Priority::High,
        reason: "issue #1 opened in Codertocat/Hello-World".into(),
        labels: vec!["trigger:opened".into()],
        ordering_key: None,
        payload: None,
    }
}

/// The stored GitHub event intake would hand the store for `body`.
fn github_event(body: &Bytes, delivery: &str) -> sluice::ingress::NewEvent {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-github-event", HeaderValue::from_static("issues"));
    headers.insert(
        "x-github-delivery",
        HeaderValue::from_str(delivery).expect("header"),
    );
    let verified = Verifier::None
        .verify_at(headers, body.clone(), 0)
        .expect("an unsigned source");
    let naming = Naming {
        delivery_header: None,
        kind_header: None,
    };
    normalize("github", Provider::Github, &naming, verified, now_ms()).expect("normalize")
}

/// The store and dispatcher of the overhead bench.
struct Dispatching {
    store: Arc<SqliteStore>,
    dispatch_rt: Runtime,
    poll: Runtime,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Deliveries queued so far.
    queued: usize,
    /// Of those, queued since the last round.
    pending: usize,
    _dir: tempfile::TempDir,
}

impl Dispatching {
    fn start(agent_url: &str) -> Dispatching {
        let dir = temp_dir("sluice-dispatch-bench");
        std::fs::create_dir(dir.path().join("rules")).expect("rules dir");
        std::fs::write(dir.path().join("agent.key"), AGENT_SECRET).expect("agent key");
        std::fs::write(dir.path().join("github.key"), GITHUB_SECRET).expect("github key");
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            format!(
                r#"[server]
data_dir = {data:?}

[sources.github]
provider = "github"
secret = {{ file = "github.key" }}

[rules]
dir = "rules"

[agents.{AGENT}]
kind = "http"
url = "{agent_url}"
allow_loopback = true
concurrency = {IN_FLIGHT}

[dispatch]
signing_secret = {{ file = "agent.key" }}
"#,
                data = dir.path().join("data").display().to_string()
            ),
        )
        .expect("write config");
        let config = Config::load(Some(&path)).expect("the bench config loads");
        let store = Arc::new(
            SqliteStore::open(
                &config.data_dir().join(&config.store.path),
                config.store.batch_max,
            )
            .expect("open store"),
        );
        let agents =
            Dispatcher::build_agents(&config, Generate::IfMissing).expect("the http agent builds");
        let poll = tokio::runtime::Builder::new_current_thread()
            .thread_name(POLL_THREAD)
            .enable_all()
            .build()
            .expect("poll runtime");
        // Paused until a round starts, so the queueing is not timed.
        poll.block_on(store.set_paused(AGENT, true)).expect("pause");
        let dispatch_rt = server_runtime("dispatch", "dispatch-blocking");
        let (stop, stopped) = watch::channel(false);
        let dispatcher = Dispatcher::new(
            store.clone() as Arc<dyn DispatchStore>,
            agents,
            BTreeMap::new(),
        );
        let task = dispatch_rt.spawn(dispatcher.run(stopped));
        Dispatching {
            store,
            dispatch_rt,
            poll,
            stop,
            task,
            queued: 0,
            pending: 0,
            _dir: dir,
        }
    }

    /// Appends `n` events and routes each to the agent (queued, not sent:
    /// the agent is paused). Returns the first event.
    fn queue(&mut self, body: &Bytes, n: usize) -> Event {
        let store = self.store.clone();
        let body = body.clone();
        let first = self.poll.block_on(async move {
            let mut first = None;
            let mut left = n;
            // In chunks, to stay under the store's queue of bodies in flight.
            while left > 0 {
                let chunk = left.min(512);
                let mut appends = tokio::task::JoinSet::new();
                for _ in 0..chunk {
                    let (store, ev) = (
                        store.clone(),
                        github_event(&body, &uuid::Uuid::new_v4().to_string()),
                    );
                    appends.spawn(async move { store.append(ev).await });
                }
                while let Some(done) = appends.join_next().await {
                    let appended = done.expect("append task").expect("append");
                    assert!(matches!(appended, Appended::Stored(_)), "{appended:?}");
                }
                let decision = Decision {
                    rules: Vec::new(),
                    routes: vec![route()],
                    dead_letter: None,
                    defer: None,
                    decided_at_ms: now_ms(),
                };
                let mut routed = 0;
                while routed < chunk {
                    let claimed = store
                        .claim("bench", chunk - routed, LEASE)
                        .await
                        .expect("claim");
                    assert!(!claimed.is_empty(), "appended events are claimable");
                    if first.is_none() {
                        first = Some(claimed[0].event.clone());
                    }
                    let done: Vec<_> = claimed
                        .iter()
                        .map(|c| (c.lease(), decision.clone()))
                        .collect();
                    for settled in store.complete_all(&done).await.expect("complete") {
                        settled.expect("decision recorded");
                    }
                    routed += claimed.len();
                }
                left -= chunk;
            }
            first.expect("at least one event")
        });
        self.queued += n;
        self.pending += n;
        first
    }

    /// Deliveries still queued to the agent, and dead letters.
    fn counts(&self) -> (u64, u64) {
        let counts = self
            .poll
            .block_on(self.store.dispatch_counts())
            .expect("dispatch counts");
        let queued = counts
            .queued
            .iter()
            .filter(|(a, _)| a == AGENT)
            .map(|(_, n)| n)
            .sum();
        (queued, counts.dead_letters)
    }

    /// Resumes the agent and waits until every queued delivery reached the
    /// agent and is settled; pauses it again. The span runs from the resume
    /// to the last settle.
    fn round(&mut self, agent: &AgentServer, main_thread: &str) -> (CpuSpan, Duration) {
        let target = agent.answered() + std::mem::take(&mut self.pending);
        let mark = CpuMark::now();
        self.poll
            .block_on(self.store.set_paused(AGENT, false))
            .expect("resume");
        let limit = Duration::from_secs(60) + Duration::from_millis(self.queued as u64);
        assert!(
            agent.wait_answered(target, limit).is_some(),
            "{} of {target} deliveries answered within {limit:?}",
            agent.answered(),
        );
        loop {
            let (queued, dead) = self.counts();
            assert_eq!(dead, 0, "dead letters");
            if queued == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let span = mark.span();
        let sluice = span.process.saturating_sub(bench_cpu(&span, main_thread));
        self.poll
            .block_on(self.store.set_paused(AGENT, true))
            .expect("pause");
        (span, sluice)
    }

    fn shut_down(self) {
        let _ = self.stop.send(true);
        self.dispatch_rt
            .block_on(self.task)
            .expect("dispatcher task");
        self.poll.block_on(Store::close(&*self.store));
        self.dispatch_rt.shutdown_timeout(Duration::from_secs(5));
    }
}

/// `n` POSTs of `body` to `uri`, signed once as the dispatcher signs.
fn envelope_requests(body: &Bytes, uri: &Uri, n: usize) -> Vec<Request<Full<Bytes>>> {
    let id = "msg_bench";
    let ts = now_ms() / 1000;
    let signature = Webhook::new(AGENT_SECRET)
        .expect("whsec key")
        .sign(id, ts, body)
        .expect("sign");
    (0..n)
        .map(|_| {
            Request::post(uri.clone())
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::USER_AGENT, "sluice/bench")
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", signature.as_str())
                .body(Full::new(body.clone()))
                .expect("request")
        })
        .collect()
}

/// Medians of the overhead bench.
struct Overhead {
    per_round: usize,
    rounds: usize,
    envelope_bytes: usize,
    sluice_rate: f64,
    sluice_us: f64,
    split: String,
    bare_rate: f64,
    bare_us: f64,
    agent_us: f64,
    cpu_ratios: Vec<f64>,
}

fn overhead(bench_mode: bool, body: &Bytes, main_thread: &str) -> Overhead {
    let (rounds, per_round) = if bench_mode { (5, 5_000) } else { (1, 200) };
    let agent = AgentServer::start(AGENT);
    let mut sluice = Dispatching::start(&agent.url(AGENT));
    let driver = Driver::start(ClientOptions {
        from: Vec::new(),
        pool_idle: Duration::from_secs(30),
    });

    // Warm both paths (connections, first allocations) before timing.
    let warm = 4 * IN_FLIGHT;
    let event = sluice.queue(body, warm);
    sluice.round(&agent, main_thread);
    let envelope = Bytes::from(Envelope::new(&event, &route(), 1, None).to_body());
    driver
        .run_paced(
            envelope_requests(&envelope, &agent.server.uri, warm),
            Pace::InFlight(IN_FLIGHT),
        )
        .assert_all(&agent.server);

    println!(
        "dispatch overhead: {per_round} deliveries per round, {IN_FLIGHT} in flight, envelope \
         {} bytes, {rounds} rounds alternating; the agent server in this process (its CPU \
         apart), sluice's dispatcher on 2 tokio workers",
        envelope.len()
    );
    println!(
        "{:<6} {:<12} {:>8} {:>10} {:>10}  CPU µs/delivery by thread",
        "round", "sender", "per s", "µs/deliv", "agent µs"
    );
    let (mut sluice_rates, mut sluice_us, mut bare_rates, mut bare_us, mut agent_us) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut cpu_ratios = Vec::new();
    let mut splits = Vec::new();
    for round in 1..=rounds {
        sluice.queue(body, per_round);
        let (span, cpu) = sluice.round(&agent, main_thread);
        let (rate, us) = (
            per_round as f64 / span.wall.as_secs_f64(),
            us_per(cpu, per_round),
        );
        let split = split_line(
            &span,
            per_round,
            &[AGENT_THREAD, CLIENT_THREAD, POLL_THREAD, main_thread],
        );
        println!(
            "{round:<6} {:<12} {rate:>8.0} {us:>10.1} {:>10.1}  {split}",
            "dispatcher",
            us_per(span.of(AGENT_THREAD), per_round)
        );
        agent_us.push(us_per(span.of(AGENT_THREAD), per_round));
        sluice_rates.push(rate);
        sluice_us.push(us);
        splits.push(split);

        let outcome = driver.run_paced(
            envelope_requests(&envelope, &agent.server.uri, per_round),
            Pace::InFlight(IN_FLIGHT),
        );
        outcome.assert_all(&agent.server);
        let rate = outcome.per_second(200);
        let us_bare = us_per(outcome.client_cpu, per_round);
        println!(
            "{round:<6} {:<12} {rate:>8.0} {us_bare:>10.1} {:>10.1}",
            "bare-hyper",
            us_per(outcome.cpu.of(AGENT_THREAD), per_round)
        );
        bare_rates.push(rate);
        bare_us.push(us_bare);
        cpu_ratios.push(us / us_bare);
    }
    let (queued, dead) = sluice.counts();
    assert_eq!((queued, dead), (0, 0), "deliveries left queued, dead");
    assert_eq!(
        agent.answered(),
        sluice.queued + warm + rounds * per_round,
        "every delivery reached the agent exactly once"
    );
    agent.assert_sound();
    driver.stop();
    sluice.shut_down();
    agent.server.shut_down();

    // The split of the median round.
    let mid = {
        let mut order: Vec<usize> = (0..sluice_us.len()).collect();
        order.sort_by(|&a, &b| sluice_us[a].total_cmp(&sluice_us[b]));
        order[order.len() / 2]
    };
    Overhead {
        per_round,
        rounds,
        envelope_bytes: envelope.len(),
        sluice_rate: median(sluice_rates),
        sluice_us: median(sluice_us),
        split: splits[mid].clone(),
        bare_rate: median(bare_rates),
        bare_us: median(bare_us),
        agent_us: median(agent_us),
        cpu_ratios,
    }
}

// ---------------------------------------------------------------------------
// 2. End to end through `sluice serve`.

/// A `sluice serve` child, killed and reaped when dropped.
struct ServeChild {
    child: Child,
    base: String,
}

impl ServeChild {
    fn spawn(config: &Path) -> ServeChild {
        let (child, base, _) = common::spawn_serve(config);
        ServeChild { child, base }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped `sluice.toml` with its data dir, ports and secrets in `dir`,
/// the rules of this checkout, and the GitHub router's agents as `http`
/// agents of `agents`. Returns the config's path.
fn e2e_config(dir: &Path, agents: &AgentServer) -> PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("sluice.toml");
    let text = std::fs::read_to_string(&shipped).expect("the shipped sluice.toml");
    let mut config: toml::Table = text.parse().expect("the shipped sluice.toml parses");
    let table = |config: &mut toml::Table, key: &str| -> toml::Table {
        config
            .get(key)
            .and_then(toml::Value::as_table)
            .cloned()
            .unwrap_or_default()
    };
    let file = |name: &str| {
        let mut t = toml::Table::new();
        t.insert("file".into(), name.into());
        toml::Value::Table(t)
    };
    std::fs::write(dir.join("github.key"), GITHUB_SECRET).expect("github key");
    std::fs::write(dir.join("agent.key"), AGENT_SECRET).expect("agent key");

    let mut server = table(&mut config, "server");
    server.insert("listen".into(), "127.0.0.1:0".into());
    server.insert("data_dir".into(), "data".into());
    config.insert("server".into(), server.into());
    let mut admin = table(&mut config, "admin");
    admin.insert("listen".into(), "127.0.0.1:0".into());
    config.insert("admin".into(), admin.into());
    let mut rules = table(&mut config, "rules");
    let rules_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    rules.insert("dir".into(), rules_dir.display().to_string().into());
    config.insert("rules".into(), rules.into());
    let mut sources = table(&mut config, "sources");
    let mut github = sources
        .get("github")
        .and_then(toml::Value::as_table)
        .cloned()
        .expect("the shipped config has a github source");
    github.insert("secret".into(), file("github.key"));
    sources.insert("github".into(), github.into());
    config.insert("sources".into(), sources.into());
    let mut dispatch = table(&mut config, "dispatch");
    dispatch.insert("signing_secret".into(), file("agent.key"));
    config.insert("dispatch".into(), dispatch.into());
    let mut declared = table(&mut config, "agents");
    for name in [
        "coordinator",
        "issue-triage",
        "review-agent",
        "deployment",
        "guardian",
    ] {
        let mut agent = toml::Table::new();
        agent.insert("kind".into(), "http".into());
        agent.insert("url".into(), agents.url(name).into());
        agent.insert("allow_loopback".into(), true.into());
        declared.insert(name.into(), agent.into());
    }
    config.insert("agents".into(), declared.into());

    let path = dir.join("sluice.toml");
    std::fs::write(&path, toml::to_string(&config).expect("serialise config"))
        .expect("write config");
    path
}

/// The payload of event `i`: the corpus payload with `issue.number` = `i`
/// (one issue per event, so the router's per-issue ordering key does not
/// queue every delivery behind the one before).
fn issue_body(doc: &serde_json::Value, i: usize) -> Bytes {
    let mut doc = doc.clone();
    doc["issue"]["number"] = (i as u64).into();
    Bytes::from(serde_json::to_vec(&doc).expect("re-serialise"))
}

/// The end-to-end gateway, its client and its events.
struct EndToEnd {
    serve: ServeChild,
    agent: AgentServer,
    driver: Driver,
    signer: Signer,
    uri: Uri,
    doc: serde_json::Value,
    /// Events sent (and delivered) so far.
    sent: usize,
    _dir: tempfile::TempDir,
}

impl EndToEnd {
    fn start(body: &Bytes) -> EndToEnd {
        let dir = temp_dir("sluice-e2e-bench");
        let agent = AgentServer::start("issue-triage");
        let path = e2e_config(dir.path(), &agent);
        let config = Config::load(Some(&path)).expect("the bench config loads");
        let signer = Signer::new(&config, "github").expect("signer");
        let serve = ServeChild::spawn(&path);
        let uri = format!("{}/hooks/github", serve.base).parse().expect("uri");
        let driver = Driver::start(ClientOptions {
            from: (0..CLIENT_ADDRESSES)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)))
                .collect(),
            // Below the shipped header_timeout (10 s), which hyper also
            // applies to idle keep-alive connections.
            pool_idle: Duration::from_secs(5),
        });
        EndToEnd {
            serve,
            agent,
            driver,
            signer,
            uri,
            doc: serde_json::from_slice(body).expect("payload is JSON"),
            sent: 0,
            _dir: dir,
        }
    }

    /// `n` fresh events, each about its own issue, with their delivery ids.
    fn requests(&mut self, n: usize) -> (Vec<Request<Full<Bytes>>>, Vec<String>) {
        let (requests, ids) = (0..n)
            .map(|i| {
                let body = issue_body(&self.doc, self.sent + i + 1);
                signed_request(&self.signer, &body, &self.uri)
            })
            .unzip();
        self.sent += n;
        (requests, ids)
    }

    /// Waits until every event sent has been delivered; when.
    fn wait_delivered(&self) -> Instant {
        let limit = Duration::from_secs(60) + Duration::from_millis(self.sent as u64);
        self.agent
            .wait_answered(self.sent, limit)
            .unwrap_or_else(|| {
                panic!(
                    "{} of {} events delivered within {limit:?}",
                    self.agent.answered(),
                    self.sent
                )
            })
    }

    /// Sends `n` events at a steady `per_second` and returns each one's
    /// latency from send to the agent's receipt, sorted.
    fn steady(&mut self, n: usize, per_second: u32) -> Vec<Duration> {
        let (requests, ids) = self.requests(n);
        let seen = &self.agent.state.seen;
        seen.arrivals.lock().expect("arrivals").clear();
        seen.record.store(true, Ordering::Relaxed);
        let outcome = self
            .driver
            .run_paced(requests, Pace::Every(Duration::from_secs(1) / per_second));
        outcome.assert_all_got("sluice-serve", 202);
        self.wait_delivered();
        seen.record.store(false, Ordering::Relaxed);
        let arrivals: HashMap<String, Instant> =
            seen.arrivals.lock().expect("arrivals").drain(..).collect();
        let mut latencies: Vec<Duration> = ids
            .iter()
            .zip(&outcome.sent_at)
            .map(|(id, sent)| {
                let at = arrivals
                    .get(id)
                    .unwrap_or_else(|| panic!("event {id} never reached the agent"));
                at.saturating_duration_since(*sent)
            })
            .collect();
        latencies.sort();
        latencies
    }

    /// Sends `n` events with 48 in flight and waits until all are delivered.
    /// Returns the rate (events from the first send to the last delivery)
    /// and sluice's CPU over the same (plus the settles after it).
    fn burst(&mut self, n: usize) -> Burst {
        let (requests, _) = self.requests(n);
        let child = CpuMark::of(self.serve.pid());
        let own = CpuMark::now();
        let outcome = self.driver.run(requests);
        outcome.assert_all_got("sluice-serve", 202);
        let intake_wall = outcome.cpu.wall;
        let done = self.wait_delivered();
        let wall = done.duration_since(own.at());
        // The last deliveries' settles come after the agent's answer.
        std::thread::sleep(Duration::from_millis(200));
        let (child, own) = (child.span(), own.span());
        Burst {
            rate: n as f64 / wall.as_secs_f64(),
            intake_rate: n as f64 / intake_wall.as_secs_f64(),
            cpu_us: us_per(child.process, n),
            split: split_line(&child, n, &[]),
            agent_us: us_per(own.of(AGENT_THREAD), n),
            client_us: us_per(outcome.client_cpu, n),
        }
    }
}

/// One end-to-end burst.
struct Burst {
    rate: f64,
    intake_rate: f64,
    cpu_us: f64,
    split: String,
    agent_us: f64,
    client_us: f64,
}

fn main() {
    let Some(bench_mode) = common::bench_mode(&["dispatch/overhead", "dispatch/end-to-end"]) else {
        return;
    };
    let main_thread = main_thread();
    let body = payload();

    let o = overhead(bench_mode, &body, &main_thread);
    let ratio = o.sluice_us / o.bare_us;
    let met = |ok: bool| if ok { "met" } else { "**NOT met**" };
    println!();

    // End to end.
    let (steady_n, bursts, per_burst) = if bench_mode {
        (10 * STEADY_PER_SECOND as usize, 3, 10_000)
    } else {
        (STEADY_PER_SECOND as usize / 2, 1, 200)
    };
    let mut e2e = EndToEnd::start(&body);
    let warm = 2 * CLIENT_ADDRESSES;
    let (requests, _) = e2e.requests(warm);
    e2e.driver.run(requests).assert_all_got("sluice-serve", 202);
    e2e.wait_delivered();
    println!(
        "end to end: sluice serve (pid {}) as shipped, agents at the in-process agent server; \
         payload {} bytes, one issue per event; {CLIENT_ADDRESSES} client addresses",
        e2e.serve.pid(),
        body.len()
    );
    let latencies = e2e.steady(steady_n, STEADY_PER_SECOND);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (p50, p99, max) = (
        ms(quantile(&latencies, 0.50)),
        ms(quantile(&latencies, 0.99)),
        ms(*latencies.last().expect("latencies")),
    );
    println!(
        "steady {STEADY_PER_SECOND}/s, {steady_n} events: send → agent p50 {p50:.2} ms, \
         p90 {:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
        ms(quantile(&latencies, 0.90))
    );
    let mut runs = Vec::new();
    for round in 1..=bursts {
        let b = e2e.burst(per_burst);
        println!(
            "burst {round}: {per_burst} events, 48 in flight: {:.0} delivered/s (intake {:.0}/s); \
             sluice CPU {:.1} µs/event ({}); agent server {:.1} µs, client {:.1} µs",
            b.rate, b.intake_rate, b.cpu_us, b.split, b.agent_us, b.client_us
        );
        runs.push(b);
    }
    e2e.agent.assert_sound();
    assert_eq!(e2e.agent.answered(), e2e.sent, "each event delivered once");
    let rate = median(runs.iter().map(|b| b.rate).collect());
    let cpu = median(runs.iter().map(|b| b.cpu_us).collect());
    let agent_us = median(runs.iter().map(|b| b.agent_us).collect());
    drop(e2e);

    println!();
    println!("paste into the README:");
    println!("| | sluice | baseline | ratio | aim |");
    println!("|---|---|---|---|---|");
    println!(
        "| dispatch, {} deliveries × {} rounds ({} in flight, {} B envelope): CPU per delivery | {:.1} µs ({}) | bare hyper POST {:.1} µs | **{ratio:.2}×** (rounds {}) | ≤ 2×: {} |",
        o.per_round,
        o.rounds,
        IN_FLIGHT,
        o.envelope_bytes,
        o.sluice_us,
        o.split,
        o.bare_us,
        o.cpu_ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
        met(ratio <= 2.0)
    );
    println!(
        "| dispatch: deliveries/s | {:.0} | {:.0} | {:.2} | |",
        o.sluice_rate,
        o.bare_rate,
        o.sluice_rate / o.bare_rate
    );
    println!(
        "| the agent server's own CPU per delivery (apart) | {:.1} µs | | | |",
        o.agent_us
    );
    println!(
        "| end to end, sustained (median of {bursts} × {per_burst}): delivered/s | {rate:.0} | Svix {SVIX_RATE:.0} | **{:.1}×** | ≥ 10×: {} |",
        rate / SVIX_RATE,
        met(rate >= 10.0 * SVIX_RATE)
    );
    println!(
        "| end to end: sluice CPU per event, every thread | {cpu:.0} µs | Svix {SVIX_CPU_US:.0} µs | **1/{:.0}** | ≤ 1/20 (132 µs): {} |",
        SVIX_CPU_US / cpu,
        met(cpu <= SVIX_CPU_US / 20.0)
    );
    println!(
        "| end to end at {STEADY_PER_SECOND}/s ({steady_n} events): p50 send → agent | {p50:.2} ms | Svix {SVIX_P50_MS} ms | {:.2}× | ≤ 2 ms: {} |",
        p50 / SVIX_P50_MS,
        met(p50 <= 2.0)
    );
    println!(
        "| end to end: p99 | {p99:.2} ms | Svix {SVIX_P99_MS} ms | {:.2}× | ≤ 10 ms: {} |",
        p99 / SVIX_P99_MS,
        met(p99 <= 10.0)
    );
    println!("| end to end: the agent server's CPU per event (apart) | {agent_us:.1} µs | | | |");
}
