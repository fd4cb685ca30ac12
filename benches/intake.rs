//! Intake end to end over loopback HTTP: the full sluice front door (verify →
//! normalise → dedup → durable SQLite append → 202) beside a bare axum handler
//! that only checks GitHub's HMAC and answers 200, in one process and one run.
//!
//! Both servers run on their own multi-threaded tokio runtime with two workers;
//! one client (hyper-util's pooled client, keep-alive, on a current-thread
//! runtime on its own std thread) drives them in alternating rounds with the
//! real compact GitHub `issues.opened` payload, every request pre-signed with a
//! fresh `X-GitHub-Delivery` so none is a duplicate. A round reports
//! throughput and the server's CPU per accepted event: process CPU minus the
//! client thread's CPU over the same interval, then split by thread name, so
//! the request path (tokio workers) and the store's writer thread show apart.
//!
//! `cargo bench --bench intake` for figures (then criterion's own per-request
//! estimates); `cargo test --release --benches` runs a tiny round as a smoke test.

// The CPU clocks (`CLOCK_PROCESS_CPUTIME_ID`, `CLOCK_THREAD_CPUTIME_ID`) are
// only reachable through `libc::clock_gettime`; that one call is the only
// unsafe code, and it writes into a local `timespec`.
#![allow(unsafe_code)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::{
    CONCURRENCY, ClientOptions, Driver, Server, median, payload, server_runtime, signed_requests,
    start_bare,
};
use criterion::{Criterion, Throughput};
use sluice::AppState;
use sluice::cli::send::Signer;
use sluice::config::Config;
use tokio::sync::oneshot;

/// The GitHub webhook secret both servers check.
const SECRET: &str = "6f1c0a3e9b274d58a0c2e4f6b8d1a3c5e7f9b2d4a6c8e0f1";

/// The gateway's config, minus paths: the shield is off (one client IP sends
/// thousands of requests a second here), and the header timeout is long
/// because hyper also counts keep-alive idle time against it, and criterion
/// leaves one server's pooled connections idle while it measures the other.
const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
header_timeout = "300s"

[shield]
enabled = false

[sources.github]
provider = "github"
secret = { file = "github.secret" }
"#;

/// The full gateway over a data dir in `dir`, and a signer for its `github` source.
fn start_sluice(dir: &Path) -> (Server, Signer) {
    std::fs::write(dir.join("github.secret"), SECRET).expect("write secret file");
    let mut config = Config::parse(CONFIG, "benches/intake.rs").expect("bench config parses");
    config.base_dir = dir.to_path_buf();
    config.server.data_dir = dir.join("data");
    config.validate().expect("bench config is valid");
    let signer = Signer::new(&config, "github").expect("signer");
    let (state, _) = AppState::build(config).expect("app state");

    let rt = server_runtime("sluice-server", "sluice-server");
    let (listener, addr) = Server::bind(&rt);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = rt.spawn(sluice::run(state, listener, async move {
        let _ = stopped.await;
    }));
    let server = Server {
        name: "sluice",
        accepted: 202,
        uri: format!("http://{addr}/hooks/github").parse().expect("uri"),
        rt,
        stop,
        task,
    };
    (server, signer)
}

/// One server's figures over the rounds.
#[derive(Default)]
struct Tally {
    rate: Vec<f64>,
    cpu_us: Vec<f64>,
    split: BTreeMap<String, Vec<f64>>,
}

impl Tally {
    fn split_line(&self) -> String {
        let mut split: Vec<(&String, f64)> = self
            .split
            .iter()
            .map(|(name, us)| (name, median(us.clone())))
            .collect();
        split.sort_by(|a, b| b.1.total_cmp(&a.1));
        split
            .iter()
            .map(|(name, us)| format!("{name} {us:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The alternating rounds and their report.
fn compare(
    driver: &Driver,
    signer: &Signer,
    body: &Bytes,
    servers: [&Server; 2],
    rounds: usize,
    per_round: usize,
) {
    // Open every pooled connection and fault in both paths before timing.
    for server in servers {
        driver
            .run(signed_requests(signer, body, &server.uri, CONCURRENCY * 4))
            .assert_all(server);
    }
    println!(
        "intake: {per_round} requests per round, {CONCURRENCY} in flight, payload {} bytes, \
         2 server workers each, {rounds} rounds alternating",
        body.len()
    );
    println!(
        "{:<6} {:<15} {:>8} {:>10} {:>11} {:>11}  server CPU µs/event by thread",
        "round", "server", "req/s", "wall", "server µs/ev", "client µs/ev"
    );
    let mut tallies: [Tally; 2] = Default::default();
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let mut rates = [0.0; 2];
        for ((server, tally), rate) in servers.iter().zip(&mut tallies).zip(&mut rates) {
            let requests = signed_requests(signer, body, &server.uri, per_round);
            let outcome = driver.run(requests);
            outcome.assert_all(server);
            *rate = outcome.per_second(server.accepted);
            let cpu_us = outcome.server_cpu_per_event(server.accepted).as_secs_f64() * 1e6;
            let split = outcome.split(server.accepted);
            println!(
                "{:<6} {:<15} {:>8.0} {:>10.2?} {:>11.1} {:>11.1}  {}",
                round,
                server.name,
                rate,
                outcome.cpu.wall,
                cpu_us,
                outcome.client_cpu.as_secs_f64() * 1e6 / outcome.sent as f64,
                split
                    .iter()
                    .map(|(name, us)| format!("{name} {us:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            tally.rate.push(*rate);
            tally.cpu_us.push(cpu_us);
            for (name, us) in split {
                tally.split.entry(name).or_default().push(us);
            }
        }
        ratios.push(rates[0] / rates[1]);
    }
    let ratio = median(ratios.clone());
    let [full, bare] = &tallies;
    let cpu = median(full.cpu_us.clone());
    println!();
    println!("median over {rounds} rounds:");
    println!(
        "  sluice (verify→dedup→SQLite append→202): {:>7.0} req/s, server CPU {cpu:5.1} µs/event ({})",
        median(full.rate.clone()),
        full.split_line()
    );
    println!(
        "  bare axum + HMAC (→200):                 {:>7.0} req/s, server CPU {:5.1} µs/event ({})",
        median(bare.rate.clone()),
        median(bare.cpu_us.clone()),
        bare.split_line()
    );
    println!(
        "  throughput ratio full/bare: {ratio:.2} (per round: {}); aim ≥ 0.60: {}",
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
        if ratio >= 0.60 { "met" } else { "NOT met" }
    );
    println!(
        "  sluice server CPU per accepted event: {cpu:.1} µs; aim ≤ 50 µs: {}",
        if cpu <= 50.0 { "met" } else { "NOT met" }
    );
    println!();
}

fn main() {
    let Some(bench_mode) = common::bench_mode(&["intake/sluice", "intake/bare-axum-hmac"]) else {
        return;
    };
    // CI runs the benches in test mode: one small round proves the path works.
    let (rounds, per_round) = if bench_mode { (5, 5000) } else { (1, 200) };

    let body = payload();
    // On the build disk, not a tmpfs, so the store's fsyncs cost what they would.
    let dir = tempfile::Builder::new()
        .prefix("sluice-intake-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let (full, signer) = start_sluice(dir.path());
    let bare = start_bare(SECRET.as_bytes(), "bare-server");
    // One client address; pooled connections may idle as long as hyper-util's
    // default allows (both servers here keep them longer).
    let driver = Driver::start(ClientOptions {
        from: Vec::new(),
        pool_idle: Duration::from_secs(90),
    });

    compare(&driver, &signer, &body, [&full, &bare], rounds, per_round);

    let mut c = Criterion::default().configure_from_args();
    {
        let mut group = c.benchmark_group("intake");
        // One element per request: criterion prints requests per second.
        group
            .throughput(Throughput::Elements(1))
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4));
        for server in [&full, &bare] {
            group.bench_function(server.name, |b| {
                b.iter_custom(|iters| {
                    let requests = signed_requests(&signer, &body, &server.uri, iters as usize);
                    let outcome = driver.run(requests);
                    outcome.assert_all(server);
                    outcome.cpu.wall
                })
            });
        }
        group.finish();
    }
    c.final_summary();

    driver.stop();
    bare.shut_down();
    full.shut_down();
}
