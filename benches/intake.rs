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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::serve::ListenerExt;
use bytes::Bytes;
use criterion::{Criterion, Throughput};
use hmac::{Hmac, Mac};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use sluice::AppState;
use sluice::cli::send::Signer;
use sluice::config::Config;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

const PAYLOAD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/corpus/github/issues/opened.payload.json"
);

/// The GitHub webhook secret both servers check.
const SECRET: &str = "6f1c0a3e9b274d58a0c2e4f6b8d1a3c5e7f9b2d4a6c8e0f1";

/// Requests in flight at once (GitHub's own delivery fan-out is far lower;
/// this keeps both servers busy on two workers).
const CONCURRENCY: usize = 48;

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

/// CPU time of every thread of this process, summed by thread name, from
/// `/proc/self/task/*/schedstat` (nanoseconds on CPU). It splits the server's
/// CPU between the request path (tokio workers) and the store's writer thread.
fn cpu_by_thread_name() -> BTreeMap<String, Duration> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("schedstat")),
        ) else {
            continue;
        };
        let ns = stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        *by_name
            .entry(comm.trim().to_string())
            .or_insert(Duration::ZERO) += Duration::from_nanos(ns);
    }
    by_name
}

fn cpu_time(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, exclusively borrowed timespec for the call, and
    // both clock ids used here are supported by Linux for the calling thread.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock})");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The corpus payload re-serialised compactly, as GitHub sends it.
fn payload() -> Bytes {
    let text = std::fs::read(PAYLOAD).unwrap_or_else(|e| panic!("cannot read {PAYLOAD}: {e}"));
    let doc: serde_json::Value = serde_json::from_slice(&text).expect("corpus payload is JSON");
    Bytes::from(serde_json::to_vec(&doc).expect("re-serialise"))
}

fn server_runtime(name: &str) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("server runtime")
}

/// One server on its own runtime.
struct Server {
    name: &'static str,
    /// The status a request it accepted gets.
    accepted: u16,
    uri: Uri,
    rt: Runtime,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    fn bind(rt: &Runtime) -> (TcpListener, SocketAddr) {
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        (listener, addr)
    }

    fn shut_down(self) {
        let _ = self.stop.send(());
        self.rt
            .block_on(self.task)
            .expect("server task")
            .unwrap_or_else(|e| panic!("{}: {e:#}", self.name));
        self.rt.shutdown_timeout(Duration::from_secs(5));
    }
}

/// The full gateway over a data dir in `dir`, and a signer for its `github` source.
fn start_sluice(dir: &Path) -> (Server, Signer) {
    std::fs::write(dir.join("github.secret"), SECRET).expect("write secret file");
    let mut config = Config::parse(CONFIG, "benches/intake.rs").expect("bench config parses");
    config.base_dir = dir.to_path_buf();
    config.server.data_dir = dir.join("data");
    config.validate().expect("bench config is valid");
    let signer = Signer::new(&config, "github").expect("signer");
    let (state, _) = AppState::build(config).expect("app state");

    let rt = server_runtime("sluice-server");
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

/// What a minimal receiver does: check `X-Hub-Signature-256` over the raw body
/// in constant time, answer 200.
async fn bare_receive(
    State(key): State<Arc<Hmac<Sha256>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let Some(hex_sig) = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
    else {
        return StatusCode::UNAUTHORIZED;
    };
    let mut sig = [0u8; 32];
    if hex::decode_to_slice(hex_sig, &mut sig).is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    let mut mac = (*key).clone();
    mac.update(&body);
    match mac.verify_slice(&sig) {
        Ok(()) => StatusCode::OK,
        Err(_) => StatusCode::UNAUTHORIZED,
    }
}

fn start_bare() -> Server {
    let key = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key length");
    let app = Router::new()
        .route("/hooks/github", post(bare_receive))
        .with_state(Arc::new(key));
    let rt = server_runtime("bare-server");
    let (listener, addr) = Server::bind(&rt);
    // sluice sets TCP_NODELAY on every connection; so does this one.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let task = rt.spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .map_err(anyhow::Error::from)
    });
    Server {
        name: "bare-axum-hmac",
        accepted: 200,
        uri: format!("http://{addr}/hooks/github").parse().expect("uri"),
        rt,
        stop,
        task,
    }
}

/// `n` requests, each signed as GitHub would with a fresh delivery id.
fn signed_requests(
    signer: &Signer,
    body: &Bytes,
    uri: &Uri,
    n: usize,
) -> Vec<Request<Full<Bytes>>> {
    (0..n)
        .map(|_| {
            let signed = signer.sign("issues", body).expect("sign");
            let mut req = Request::post(uri.clone());
            for (name, value) in &signed.headers {
                req = req.header(name, value.as_str());
            }
            req.body(Full::new(signed.body)).expect("request")
        })
        .collect()
}

/// What the client saw over one batch of requests.
#[derive(Debug, Default)]
struct Outcome {
    sent: usize,
    wall: Duration,
    process_cpu: Duration,
    client_cpu: Duration,
    by_status: BTreeMap<u16, usize>,
    errors: usize,
    /// CPU by thread name over the batch (the client and idle threads included).
    threads: BTreeMap<String, Duration>,
}

impl Outcome {
    fn accepted(&self, status: u16) -> usize {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    fn per_second(&self, status: u16) -> f64 {
        self.accepted(status) as f64 / self.wall.as_secs_f64()
    }

    /// Server CPU (everything in the process but the client thread) per accepted event.
    fn server_cpu_per_event(&self, status: u16) -> Duration {
        self.process_cpu.saturating_sub(self.client_cpu) / self.accepted(status).max(1) as u32
    }

    /// Server threads' CPU per accepted event, by thread name, busiest first.
    fn split(&self, status: u16) -> Vec<(String, f64)> {
        let n = self.accepted(status).max(1) as f64;
        let mut split: Vec<(String, f64)> = self
            .threads
            .iter()
            .filter(|(name, _)| name.as_str() != CLIENT_THREAD)
            .map(|(name, cpu)| (name.clone(), cpu.as_secs_f64() * 1e6 / n))
            .filter(|(_, us)| *us >= 0.5)
            .collect();
        split.sort_by(|a, b| b.1.total_cmp(&a.1));
        split
    }

    fn assert_all(&self, server: &Server) {
        assert!(
            self.errors == 0 && self.accepted(server.accepted) == self.sent,
            "{}: {} requests, {} transport errors, statuses {:?}",
            server.name,
            self.sent,
            self.errors,
            self.by_status
        );
    }
}

const CLIENT_THREAD: &str = "bench-client";

struct Job {
    requests: Vec<Request<Full<Bytes>>>,
    reply: mpsc::Sender<Outcome>,
}

/// The client: a current-thread runtime on a dedicated std thread, so its CPU
/// is exactly that thread's CPU. It stays alive between batches so pooled
/// connections stay warm.
struct Driver {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    thread: std::thread::JoinHandle<()>,
}

impl Driver {
    fn start() -> Driver {
        let (jobs, mut queue) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(CLIENT_THREAD.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("client runtime");
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                let client: Client<HttpConnector, Full<Bytes>> =
                    Client::builder(TokioExecutor::new())
                        .pool_max_idle_per_host(CONCURRENCY)
                        .build(connector);
                rt.block_on(async move {
                    while let Some(job) = queue.recv().await {
                        let outcome = drive(&client, job.requests).await;
                        let _ = job.reply.send(outcome);
                    }
                });
            })
            .expect("client thread");
        Driver { jobs, thread }
    }

    fn run(&self, requests: Vec<Request<Full<Bytes>>>) -> Outcome {
        let (reply, outcome) = mpsc::channel();
        self.jobs
            .send(Job { requests, reply })
            .expect("client thread alive");
        outcome.recv().expect("client thread answers")
    }

    fn stop(self) {
        drop(self.jobs);
        self.thread.join().expect("client thread");
    }
}

async fn drive(
    client: &Client<HttpConnector, Full<Bytes>>,
    requests: Vec<Request<Full<Bytes>>>,
) -> Outcome {
    let sent = requests.len();
    let queue = Arc::new(Mutex::new(requests));
    let threads0 = cpu_by_thread_name();
    let (process0, client0, start) = (
        cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID),
        cpu_time(libc::CLOCK_THREAD_CPUTIME_ID),
        Instant::now(),
    );
    let tasks: Vec<_> = (0..CONCURRENCY.min(sent))
        .map(|_| {
            let (client, queue) = (client.clone(), queue.clone());
            tokio::spawn(async move {
                let mut seen = Outcome::default();
                loop {
                    let Some(req) = queue.lock().expect("queue").pop() else {
                        break;
                    };
                    match client.request(req).await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            // Read the body to the end so the connection goes back to the pool.
                            if resp.into_body().collect().await.is_err() {
                                seen.errors += 1;
                                continue;
                            }
                            *seen.by_status.entry(status).or_default() += 1;
                        }
                        Err(_) => seen.errors += 1,
                    }
                }
                seen
            })
        })
        .collect();
    let mut total = Outcome {
        sent,
        ..Outcome::default()
    };
    for task in tasks {
        let seen = task.await.expect("client task");
        total.errors += seen.errors;
        for (status, n) in seen.by_status {
            *total.by_status.entry(status).or_default() += n;
        }
    }
    total.wall = start.elapsed();
    total.client_cpu = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID).saturating_sub(client0);
    total.process_cpu = cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(process0);
    for (name, cpu) in cpu_by_thread_name() {
        let before = threads0.get(&name).copied().unwrap_or(Duration::ZERO);
        total.threads.insert(name, cpu.saturating_sub(before));
    }
    total
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
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
                outcome.wall,
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
    let args: Vec<String> = std::env::args().collect();
    let bench_mode = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    if args.iter().any(|a| a == "--list") {
        println!("intake/sluice: benchmark");
        println!("intake/bare-axum-hmac: benchmark");
        return;
    }
    // CI runs the benches in test mode: one small round proves the path works.
    let (rounds, per_round) = if bench_mode { (5, 5000) } else { (1, 200) };

    let body = payload();
    // On the build disk, not a tmpfs, so the store's fsyncs cost what they would.
    let dir = tempfile::Builder::new()
        .prefix("sluice-intake-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let (full, signer) = start_sluice(dir.path());
    let bare = start_bare();
    let driver = Driver::start();

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
                    outcome.wall
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
