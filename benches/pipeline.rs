//! The whole pipeline over loopback HTTP, beside the bare axum HMAC handler,
//! in one process and one run: `sluice serve` as shipped (the embedded
//! `sluice.toml` and the rules it names under `rules/`, router on; only its
//! data dir is a temp dir and its port is 0) takes each event through intake
//! (verify, dedup, durable append, 202), routing (claim, rule calls, settle)
//! and the recorded decision.
//!
//! The payload is the real GitHub `issues.opened` delivery from the corpus,
//! re-serialised compactly as GitHub sends it: 11,622 bytes, the 11.6 KB
//! payload of the intake bench. (`unlabeled.with-organization` is the corpus
//! file of exactly that size, but it is pretty-printed and its action is one
//! the shipped router ignores; `opened` routes to `issue-triage`, so every
//! event here records a route.) Every request is signed with the source's
//! secret and carries a fresh `X-GitHub-Delivery`.
//!
//! The shipped per-client shield (100 requests/s, bursts of 500, per address)
//! stays on, so the client sends from 256 loopback addresses in turn, as many
//! senders would; the bare handler gets the same connections.
//!
//! Threads are named by stage, so CPU splits by thread name
//! (`/proc/self/task/*/schedstat`): `intake` (the HTTP server's two workers:
//! shield, verify, normalise, dedup, hand-off, 202), `intake-blocking`,
//! `sluice-store-*` (the store's threads: today one writer, which makes every
//! write: appends, claims, settles), `router` (the two router workers'
//! runtime: claim and settle calls, the decision), `rules` (its blocking
//! pool: rule calls and the claimed bodies' reads) and `sluice-ready`
//! (instances made ahead of rule calls). Server CPU is the process's CPU minus
//! the bench's own threads (the client, the main thread, the drain poller).
//! When the store counts its own CPU by kind of work
//! (`sluice_store_cpu_seconds_total{work=...}`), those counters are printed
//! per event too.
//!
//! It measures, in order:
//! 1. rounds alternating between sluice (router on, a burst of events, then
//!    the wait until every one has a decision) and the bare handler (the same
//!    burst): intake throughput of each, and server CPU per event, for sluice
//!    from the burst's start to the drain's end;
//! 2. the router alone: a backlog loaded with the router off, then the rate
//!    at which the router drains it (for at most a minute under `cargo bench`),
//!    against the intake rate of step 1;
//! 3. VmRSS after each round, after the backlog is loaded and after it is
//!    drained, as seen and after `malloc_trim` (what is live).
//!
//! `cargo bench --bench pipeline` for figures (100,000 events of backlog);
//! `cargo test --release --benches` runs one tiny round as a smoke test that
//! checks every request was accepted, the backlog drained and every event
//! got its decision.

// The CPU clocks are only reachable through `libc::clock_gettime` (in
// `common`), and `malloc_trim` through libc: those two calls are the only
// unsafe code.
#![allow(unsafe_code)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    CLIENT_THREAD, ClientOptions, CpuMark, CpuSpan, Driver, Outcome, Server, median, payload,
    server_runtime, signed_requests, start_bare,
};
use sluice::AppState;
use sluice::cli::send::Signer;
use sluice::config::Config;
use sluice::event::EventStatus;
use sluice::rules::SharedRuleSet;
use sluice::rules::reload::Reloader;
use sluice::rules::router::RouterOptions;
use sluice::secret::SecretOrigin;
use sluice::store::ListFilter;
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Loopback addresses the client sends from: enough that the shipped shield
/// (100/s per address, bursts of 500) never refuses the bench's rates.
const CLIENT_ADDRESSES: usize = 256;

/// The drain poller's thread name (its CPU is the bench's, not the server's).
const POLL_THREAD: &str = "bench-poll";

/// Thread-name prefixes of each stage, as the report names them.
const STAGES: [(&str, &[&str]); 4] = [
    ("request path", &["intake"]),
    ("store writer", &["sluice-store"]),
    ("router", &["router"]),
    ("rule calls", &["rules", "sluice-ready"]),
];

/// `sluice serve` split over two runtimes: HTTP intake on one, the router
/// workers (and the rules' blocking pool) on the other.
struct Gateway {
    state: Arc<AppState>,
    rules: SharedRuleSet,
    _reloader: Arc<Reloader>,
    intake: Server,
    router_rt: Runtime,
    router: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    watcher: JoinHandle<()>,
    /// Where the bench reads the store from (its threads are the bench's).
    poll: Runtime,
    /// The GitHub source's secret, for the bare handler.
    secret: Vec<u8>,
    signer: Signer,
    /// Events accepted so far, all bursts together.
    accepted: usize,
}

impl Gateway {
    /// The shipped config (as `sluice serve` loads it with no `--config`),
    /// with its data dir under `dir`, port 0, and the rules of this checkout.
    fn start(dir: &Path) -> Gateway {
        let mut config = Config::load(None).expect("the embedded config loads");
        config.base_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        config.server.data_dir = dir.join("data");
        config.server.listen = "127.0.0.1:0".parse().expect("address");
        config.validate().expect("the embedded config is valid");
        sluice::cli::serve::init_logging(config.server.log_format);
        let signer = Signer::new(&config, "github").expect("signer");
        let (state, reports) = AppState::build(config).expect("app state");
        let secret = reports
            .iter()
            .find(|r| r.source == "github")
            .map(|r| match &r.origin {
                SecretOrigin::Env(var) => std::env::var(var).expect("secret env var"),
                SecretOrigin::Generated(path, _) | SecretOrigin::File(path) => {
                    std::fs::read_to_string(path).expect("secret file")
                }
                SecretOrigin::ToGenerate(path) => panic!("{} not generated", path.display()),
            })
            .expect("the github source has a secret")
            .trim()
            .as_bytes()
            .to_vec();

        let router_rt = server_runtime("router", "rules");
        let loading = state.clone();
        // On a worker, as `serve` loads them (compiling blocks in place).
        let (reloader, watch) = router_rt
            .block_on(router_rt.spawn(async move { sluice::cli::serve::load_rules(&loading) }))
            .expect("rule loading task")
            .expect("the rules load");
        let rules = reloader.rules().clone();
        assert!(
            rules.load().rules().any(|r| r.name() == "github-router"),
            "rules/github-router did not load (build rules/*.wasm with plugins/build.sh): {:?}",
            reloader.status().load().rules
        );
        let watcher = router_rt.spawn(watch.run());

        let intake_rt = server_runtime("intake", "intake-blocking");
        let (listener, addr) = Server::bind(&intake_rt);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = intake_rt.spawn(sluice::run(state.clone(), listener, async move {
            let _ = stopped.await;
        }));
        let intake = Server {
            name: "sluice-serve",
            accepted: 202,
            uri: format!("http://{addr}/hooks/github").parse().expect("uri"),
            rt: intake_rt,
            stop,
            task,
        };
        let poll = tokio::runtime::Builder::new_current_thread()
            .thread_name(POLL_THREAD)
            .enable_all()
            .build()
            .expect("poll runtime");
        Gateway {
            state,
            rules,
            _reloader: reloader,
            intake,
            router_rt,
            router: None,
            watcher,
            poll,
            secret,
            signer,
            accepted: 0,
        }
    }

    /// Starts the router workers as `serve` does.
    fn start_router(&mut self) {
        assert!(self.router.is_none(), "router already running");
        let (stop, stopped) = watch::channel(false);
        let task = self.router_rt.spawn(sluice::rules::router::run(
            self.state.store.clone(),
            self.rules.clone(),
            RouterOptions::from(&self.state.config.rules),
            stopped,
        ));
        self.router = Some((stop, task));
    }

    /// Stops the router workers once each has finished the event in hand.
    fn stop_router(&mut self) {
        if let Some((stop, task)) = self.router.take() {
            let _ = stop.send(true);
            self.router_rt.block_on(task).expect("router workers");
        }
    }

    /// Sends `n` fresh events and checks every one was accepted.
    fn burst(&mut self, driver: &Driver, body: &Bytes, n: usize) -> Outcome {
        let outcome = driver.run(signed_requests(&self.signer, body, &self.intake.uri, n));
        outcome.assert_all(&self.intake);
        self.accepted += n;
        outcome
    }

    /// Events waiting to be routed (pending, or claimed with an expired lease).
    fn queue_depth(&self) -> u64 {
        self.poll
            .block_on(self.state.store.queue_depth())
            .expect("queue depth")
    }

    fn count(&self, status: EventStatus, limit: usize) -> usize {
        let filter = ListFilter {
            status: Some(status),
            limit,
            ..ListFilter::default()
        };
        self.poll
            .block_on(self.state.store.list(&filter))
            .expect("list events")
            .len()
    }

    /// Waits until every event accepted so far has its decision: first on
    /// the router's own count (cheap to read), then on the store (nothing
    /// waiting, nothing claimed). Panics past `limit`.
    fn wait_drained(&self, limit: Duration) {
        if let Err(left) = self.drain_within(limit) {
            panic!(
                "not drained within {limit:?}: {left} events waiting, {} claimed, {:?} routed of {}",
                self.count(EventStatus::Claimed, 0),
                routed_total(),
                self.accepted
            );
        }
    }

    /// As [`Gateway::wait_drained`], but past `limit` returns how many events
    /// still wait instead.
    fn drain_within(&self, limit: Duration) -> Result<(), u64> {
        let start = Instant::now();
        let expired = || start.elapsed() >= limit;
        while routed_total().is_some_and(|n| n < self.accepted as f64) {
            if expired() {
                return Err(self.queue_depth());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        loop {
            let depth = self.queue_depth();
            if depth == 0 && self.count(EventStatus::Claimed, 1) == 0 {
                return Ok(());
            }
            if expired() {
                return Err(depth);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Checks that every event accepted has been routed and that the newest
    /// ones carry the decision the shipped rule makes for them.
    fn assert_all_decided(&self) {
        assert_eq!(self.count(EventStatus::Routed, 0), self.accepted, "routed");
        for status in [
            EventStatus::Pending,
            EventStatus::Claimed,
            EventStatus::Dead,
        ] {
            assert_eq!(self.count(status, 0), 0, "{status:?}");
        }
        let newest = self
            .poll
            .block_on(self.state.store.list(&ListFilter {
                limit: 3,
                ..ListFilter::default()
            }))
            .expect("list");
        for summary in newest {
            let record = self
                .poll
                .block_on(self.state.store.get(&summary.id))
                .expect("get")
                .expect("event stored");
            let decision = record.decision.expect("a decision is recorded");
            assert!(
                decision.routes.iter().any(|r| r.agent == "issue-triage"),
                "issues.opened routes to issue-triage: {decision:?}"
            );
        }
    }

    /// Ends as `serve` does: intake first, then the router, then the store.
    fn shut_down(mut self) {
        let router = self.router.take();
        let Gateway {
            state,
            intake,
            router_rt,
            watcher,
            poll,
            ..
        } = self;
        intake.shut_down();
        if let Some((stop, task)) = router {
            let _ = stop.send(true);
            router_rt.block_on(task).expect("router workers");
        }
        watcher.abort();
        poll.block_on(state.store.close());
        router_rt.shutdown_timeout(Duration::from_secs(5));
    }
}

/// Sum of `sluice_events_routed_total` (every outcome): decisions the router
/// has made. `None` when the metrics recorder is not sluice's.
fn routed_total() -> Option<f64> {
    metric_values("sluice_events_routed_total")
        .map(|values| values.iter().map(|(_, v)| v).sum::<f64>())
}

/// The samples of counter `name` in sluice's Prometheus text, by label set.
fn metric_values(name: &str) -> Option<Vec<(String, f64)>> {
    let text = sluice::metrics::handle().render();
    let values: Vec<(String, f64)> = text
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let labels = key.strip_prefix(name)?;
            if !(labels.is_empty() || labels.starts_with('{')) {
                return None;
            }
            Some((labels.to_string(), value.parse().ok()?))
        })
        .collect();
    (!values.is_empty()).then_some(values)
}

/// Resident memory of the process, from `/proc/self/status`, in MiB: as an
/// operator would see it, then once the allocator has handed its free pages
/// back (`malloc_trim`), which is closer to what is live.
#[derive(Clone, Copy)]
struct Rss {
    seen: f64,
    live: f64,
}

impl Rss {
    fn now() -> Rss {
        let read = || {
            let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .expect("VmRSS")
                / 1024.0
        };
        let seen = read();
        // SAFETY: glibc's malloc_trim only returns free heap memory to the
        // kernel; any thread may call it at any time.
        unsafe { libc::malloc_trim(0) };
        Rss { seen, live: read() }
    }
}

impl std::fmt::Display for Rss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0}/{:.0}", self.seen, self.live)
    }
}

/// The bench's own threads, whose CPU is not the server's.
struct Bench {
    main_thread: String,
}

impl Bench {
    /// Server CPU in `span`: the process minus the bench's threads.
    fn server_cpu(&self, span: &CpuSpan) -> Duration {
        [CLIENT_THREAD, POLL_THREAD, self.main_thread.as_str()]
            .iter()
            .fold(span.process, |cpu, name| cpu.saturating_sub(span.of(name)))
    }

    /// Server CPU per event by stage (µs), then what no stage's threads
    /// account for (other threads, threads that ended meanwhile).
    fn stages(&self, span: &CpuSpan, events: usize) -> Vec<(&'static str, f64)> {
        let per = |cpu: Duration| cpu.as_secs_f64() * 1e6 / events.max(1) as f64;
        let mut named = Duration::ZERO;
        let mut out: Vec<(&'static str, f64)> = STAGES
            .iter()
            .map(|(stage, prefixes)| {
                let cpu: Duration = prefixes.iter().map(|p| span.of(p)).sum();
                named += cpu;
                (*stage, per(cpu))
            })
            .collect();
        out.push(("other", per(self.server_cpu(span).saturating_sub(named))));
        out
    }
}

fn per_event_us(cpu: Duration, events: usize) -> f64 {
    cpu.as_secs_f64() * 1e6 / events.max(1) as f64
}

fn stage_line(stages: &[(&str, f64)]) -> String {
    stages
        .iter()
        .map(|(stage, us)| format!("{stage} {us:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Deltas of the store's per-stage CPU counters, when the store exports them.
fn store_cpu() -> Option<Vec<(String, f64)>> {
    metric_values("sluice_store_cpu_seconds_total")
}

fn store_cpu_line(before: &Option<Vec<(String, f64)>>, events: usize) -> Option<String> {
    let after = store_cpu()?;
    let before = before.clone().unwrap_or_default();
    Some(
        after
            .iter()
            .map(|(labels, v)| {
                let was = before
                    .iter()
                    .find(|(l, _)| l == labels)
                    .map_or(0.0, |(_, v)| *v);
                format!("{labels} {:.1}", (v - was) * 1e6 / events.max(1) as f64)
            })
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// How long a drain of `events` may take before the bench gives up.
fn drain_limit(events: usize) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(events as u64)
}

/// Figures of one sluice round.
struct Round {
    intake_rate: f64,
    cpu_us: f64,
    stages: Vec<(&'static str, f64)>,
}

fn main() {
    let Some(bench_mode) =
        common::bench_mode(&["pipeline/sluice-serve", "pipeline/bare-axum-hmac"])
    else {
        return;
    };
    // CI runs the benches in test mode: one small round proves the path works.
    // Under `cargo bench` the router drains the backlog for at most
    // `drain_window` (the rate is steady; the figure is events routed over
    // the time taken), so the whole run stays within a few minutes.
    let (rounds, per_round, backlog, drain_window) = if bench_mode {
        (5, 5_000, 100_000, Duration::from_secs(60))
    } else {
        (1, 200, 500, drain_limit(500))
    };
    let bench = Bench {
        main_thread: std::fs::read_to_string("/proc/thread-self/comm")
            .expect("thread name")
            .trim()
            .to_string(),
    };
    let body = payload();
    // On the build disk, not a tmpfs, so the store's fsyncs cost what they would.
    let dir = tempfile::Builder::new()
        .prefix("sluice-pipeline-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let mut gw = Gateway::start(dir.path());
    let bare = start_bare(&gw.secret, "bare-server");
    let driver = Driver::start(ClientOptions {
        from: (0..CLIENT_ADDRESSES)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)))
            .collect(),
        // Below the shipped header_timeout (10 s), which hyper also applies
        // to idle keep-alive connections.
        pool_idle: Duration::from_secs(5),
    });
    gw.start_router();

    // Open the pooled connections and fault in every path before timing.
    let warm = 2 * CLIENT_ADDRESSES;
    gw.burst(&driver, &body, warm);
    gw.wait_drained(drain_limit(warm));
    driver
        .run(signed_requests(&gw.signer, &body, &bare.uri, warm))
        .assert_all(&bare);

    println!(
        "pipeline: {per_round} events per round, {} in flight from {CLIENT_ADDRESSES} loopback \
         addresses, payload {} bytes, {rounds} rounds alternating; sluice serve as shipped \
         (router on, {} router workers), 2 HTTP workers each",
        common::CONCURRENCY,
        body.len(),
        gw.state.config.rules.workers
    );
    println!(
        "{:<6} {:<13} {:>8} {:>9} {:>9} {:>10}  server CPU µs/event by stage",
        "round", "server", "req/s", "intake", "to drain", "µs/event"
    );
    let rss_start = Rss::now();
    let mut rss_rounds = Vec::new();
    let mut sluice_rounds = Vec::new();
    let (mut bare_rates, mut bare_cpu, mut ratios, mut cpu_ratios) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let store0 = store_cpu();
        let mark = CpuMark::now();
        let outcome = gw.burst(&driver, &body, per_round);
        gw.wait_drained(drain_limit(per_round));
        let span = mark.span();
        let cpu_us = per_event_us(bench.server_cpu(&span), per_round);
        let stages = bench.stages(&span, per_round);
        let intake_rate = outcome.per_second(202);
        println!(
            "{round:<6} {:<13} {intake_rate:>8.0} {:>9.2?} {:>9.2?} {cpu_us:>10.1}  {}",
            "sluice-serve",
            outcome.cpu.wall,
            span.wall,
            stage_line(&stages)
        );
        if let Some(line) = store_cpu_line(&store0, per_round) {
            println!("{:<6} store CPU µs/event by work: {line}", "");
        }

        let outcome = driver.run(signed_requests(&gw.signer, &body, &bare.uri, per_round));
        outcome.assert_all(&bare);
        let rate = outcome.per_second(200);
        let bare_us = per_event_us(bench.server_cpu(&outcome.cpu), per_round);
        println!(
            "{round:<6} {:<13} {rate:>8.0} {:>9.2?} {:>9} {bare_us:>10.1}",
            "bare-axum", outcome.cpu.wall, "-"
        );
        ratios.push(intake_rate / rate);
        cpu_ratios.push(cpu_us / bare_us);
        bare_rates.push(rate);
        bare_cpu.push(bare_us);
        sluice_rounds.push(Round {
            intake_rate,
            cpu_us,
            stages,
        });
        rss_rounds.push(Rss::now());
    }

    // The router alone: a backlog loaded with the router off, then drained.
    gw.stop_router();
    let mut load = Duration::ZERO;
    let chunk = 10_000.min(backlog);
    let mut loaded = 0;
    while loaded < backlog {
        let n = chunk.min(backlog - loaded);
        load += gw.burst(&driver, &body, n).cpu.wall;
        loaded += n;
    }
    let load_rate = backlog as f64 / load.as_secs_f64();
    assert_eq!(gw.queue_depth(), backlog as u64, "the whole backlog waits");
    let rss_loaded = Rss::now();
    let routed0 = routed_total();
    let store0 = store_cpu();
    let mark = CpuMark::now();
    gw.start_router();
    let drained = gw.drain_within(drain_window);
    let span = mark.span();
    let routed = match (drained, routed_total(), routed0) {
        (Ok(()), _, _) => backlog,
        (Err(_), Some(now), Some(before)) => (now - before) as usize,
        (Err(left), _, _) => backlog - left as usize,
    };
    let drain_rate = routed as f64 / span.wall.as_secs_f64();
    let drain_stages = bench.stages(&span, routed);
    let drain_cpu = per_event_us(bench.server_cpu(&span), routed);
    let drain_store = store_cpu_line(&store0, routed);
    let rss_drained = Rss::now();
    match drained {
        Ok(()) => gw.assert_all_decided(),
        Err(left) if bench_mode => println!(
            "backlog NOT drained within {drain_window:?}: {routed} of {backlog} routed, {left} waiting"
        ),
        Err(left) => panic!("backlog not drained within {drain_window:?}: {left} waiting"),
    }

    let median_of = |f: fn(&Round) -> f64| median(sluice_rounds.iter().map(f).collect());
    let intake_rate = median_of(|r| r.intake_rate);
    let cpu = median_of(|r| r.cpu_us);
    let stages: Vec<(&str, f64)> = STAGES
        .iter()
        .map(|(s, _)| *s)
        .chain(["other"])
        .map(|stage| {
            let us = sluice_rounds
                .iter()
                .map(|r| {
                    r.stages
                        .iter()
                        .find(|(s, _)| *s == stage)
                        .map_or(0.0, |x| x.1)
                })
                .collect();
            (stage, median(us))
        })
        .collect();
    let (ratio, cpu_ratio) = (median(ratios.clone()), median(cpu_ratios.clone()));
    let drain_ratio = drain_rate / intake_rate;
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let list = |xs: &[f64], places: usize| {
        xs.iter()
            .map(|x| format!("{x:.places$}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!();
    println!(
        "router alone: {backlog} events loaded with the router off at {load_rate:.0}/s; \
         {routed} routed in {:.2?}: {drain_rate:.0} events/s, {drain_cpu:.1} µs/event ({})",
        span.wall,
        stage_line(&drain_stages)
    );
    if let Some(line) = drain_store {
        println!("router alone: store CPU µs/event by work: {line}");
    }
    println!();
    println!("median over {rounds} rounds (paste into the README):");
    println!("| | events/s | server CPU per event |");
    println!("|---|---|---|");
    println!(
        "| sluice serve, shipped config and rules (intake with the router on; CPU to the drain's end) | {intake_rate:.0} | {cpu:.1} µs ({}) |",
        stage_line(&stages)
    );
    println!(
        "| bare axum + HMAC (200) | {:.0} | {:.1} µs |",
        median(bare_rates),
        median(bare_cpu)
    );
    println!(
        "| ratio | **{ratio:.2}** (per round {}; aim ≥ 0.60: {}) | **{cpu_ratio:.1}×** (per round {}; aim ≤ 3×: {}) |",
        list(&ratios, 2),
        met(ratio >= 0.60),
        list(&cpu_ratios, 2),
        met(cpu_ratio <= 3.0)
    );
    println!(
        "| router alone, backlog of {backlog} ({routed} routed in {:.0?}) | {drain_rate:.0} (**{drain_ratio:.2}×** the intake rate; aim ≥ 1: {}) | {drain_cpu:.1} µs ({}) |",
        span.wall,
        met(drain_ratio >= 1.0),
        stage_line(&drain_stages)
    );
    println!(
        "| VmRSS, MiB as seen/after malloc_trim | start {rss_start}; after each round {}; backlog loaded {rss_loaded}; after the drain {rss_drained} | |",
        rss_rounds
            .iter()
            .map(Rss::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();

    driver.stop();
    bare.shut_down();
    gw.shut_down();
}
