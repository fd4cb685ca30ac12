//! What the loopback benches share: the real GitHub payload, a bare axum
//! receiver that only checks the HMAC (the baseline), server runtimes with
//! named threads, a keep-alive client on its own thread, and the CPU clocks
//! that split a process's CPU by thread name.
//!
//! Each bench includes it with `mod common;`; not every bench uses every item.

#![allow(dead_code)]

pub mod nats;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::serve::ListenerExt;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use sluice::cli::send::Signer;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

const PAYLOAD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/corpus/github/issues/opened.payload.json"
);

/// Requests in flight at once (GitHub's own delivery fan-out is far lower;
/// this keeps both servers busy on two workers).
pub const CONCURRENCY: usize = 48;

/// Worker threads of each server runtime.
pub const SERVER_WORKERS: usize = 2;

/// True under `cargo bench` (full figures); false under `cargo test --benches`
/// (one small round as a smoke test). `--list` answers criterion's listing.
pub fn bench_mode(names: &[&str]) -> Option<bool> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        for name in names {
            println!("{name}: benchmark");
        }
        return None;
    }
    Some(args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test"))
}

/// CPU time of every thread of this process, summed by thread name, from
/// `/proc/self/task/*/schedstat` (nanoseconds on CPU). It splits the server's
/// CPU between the request path (tokio workers) and the store's writer thread.
pub fn cpu_by_thread_name() -> BTreeMap<String, Duration> {
    cpu_by_thread_name_of(None)
}

/// [`cpu_by_thread_name`] of process `pid` (a child), or of this process.
pub fn cpu_by_thread_name_of(pid: Option<u32>) -> BTreeMap<String, Duration> {
    let mut by_name = BTreeMap::new();
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}/task"),
        None => "/proc/self/task".to_string(),
    };
    let Ok(tasks) = std::fs::read_dir(dir) else {
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

pub fn cpu_time(clock: libc::clockid_t) -> Duration {
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

/// CPU of process `pid`, every thread it ran, live or ended: `utime` +
/// `stime` of `/proc/PID/stat`, in clock ticks (10 ms on Linux, so a figure
/// is only as good as the CPU it spans is long).
pub fn process_cpu_of(pid: u32) -> Duration {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // The fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields[11..13]
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or_else(|_| panic!("{path}: {f:?}")))
        .sum();
    // SAFETY: sysconf only reads a constant of the running system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / per_second)
}

/// A process's CPU clocks at one instant: this process's, or a child's.
pub struct CpuMark {
    at: Instant,
    pid: Option<u32>,
    process: Duration,
    threads: BTreeMap<String, Duration>,
}

/// What the process spent between a [`CpuMark`] and now.
#[derive(Debug, Default, Clone)]
pub struct CpuSpan {
    pub wall: Duration,
    pub process: Duration,
    /// CPU by thread name (threads that ended meanwhile are missing).
    pub threads: BTreeMap<String, Duration>,
}

impl CpuMark {
    pub fn now() -> CpuMark {
        CpuMark {
            threads: cpu_by_thread_name(),
            pid: None,
            process: cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID),
            at: Instant::now(),
        }
    }

    /// The clocks of child process `pid` (its CPU from `/proc/PID/stat`).
    pub fn of(pid: u32) -> CpuMark {
        CpuMark {
            threads: cpu_by_thread_name_of(Some(pid)),
            pid: Some(pid),
            process: process_cpu_of(pid),
            at: Instant::now(),
        }
    }

    /// When the mark was taken.
    pub fn at(&self) -> Instant {
        self.at
    }

    fn process_cpu(&self) -> Duration {
        match self.pid {
            Some(pid) => process_cpu_of(pid),
            None => cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID),
        }
    }

    pub fn span(&self) -> CpuSpan {
        let wall = self.at.elapsed();
        let process = self.process_cpu().saturating_sub(self.process);
        let threads = cpu_by_thread_name_of(self.pid)
            .into_iter()
            .map(|(name, cpu)| {
                let before = self.threads.get(&name).copied().unwrap_or(Duration::ZERO);
                (name, cpu.saturating_sub(before))
            })
            .collect();
        CpuSpan {
            wall,
            process,
            threads,
        }
    }
}

impl CpuSpan {
    /// CPU of the threads whose name starts with `prefix`.
    pub fn of(&self, prefix: &str) -> Duration {
        self.threads
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(_, cpu)| *cpu)
            .sum()
    }
}

/// The corpus payload re-serialised compactly, as GitHub sends it.
pub fn payload() -> Bytes {
    let text = std::fs::read(PAYLOAD).unwrap_or_else(|e| panic!("cannot read {PAYLOAD}: {e}"));
    let doc: serde_json::Value = serde_json::from_slice(&text).expect("corpus payload is JSON");
    Bytes::from(serde_json::to_vec(&doc).expect("re-serialise"))
}

/// A server runtime with [`SERVER_WORKERS`] workers named `workers` and
/// blocking-pool threads named `blocking` (the same name for both puts all of
/// the runtime's CPU under one name). Tokio starts the workers through the
/// blocking pool when the runtime is built, so the first threads it names are
/// the workers; that is checked here, so a tokio that changes it fails loudly.
pub fn server_runtime(workers: &str, blocking: &str) -> Runtime {
    let named = Arc::new(AtomicUsize::new(0));
    let (w, b) = (workers.to_string(), blocking.to_string());
    let counter = named.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(SERVER_WORKERS)
        .thread_name_fn(move || {
            if counter.fetch_add(1, Ordering::SeqCst) < SERVER_WORKERS {
                w.clone()
            } else {
                b.clone()
            }
        })
        .enable_all()
        .build()
        .expect("server runtime");
    assert_eq!(
        named.load(Ordering::SeqCst),
        SERVER_WORKERS,
        "the runtime named other threads than its workers when built"
    );
    rt
}

/// One server on its own runtime.
pub struct Server {
    pub name: &'static str,
    /// The status a request it accepted gets.
    pub accepted: u16,
    pub uri: Uri,
    pub rt: Runtime,
    pub stop: oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Serves `app` on 127.0.0.1 on a runtime of its own whose threads are
    /// named `thread_name`; `uri` makes the URL requests go to from the
    /// address. Connections set TCP_NODELAY, as sluice's do.
    pub fn serve(
        app: Router,
        thread_name: &str,
        name: &'static str,
        uri: impl FnOnce(SocketAddr) -> String,
    ) -> Server {
        let rt = server_runtime(thread_name, thread_name);
        let (listener, addr) = Server::bind(&rt);
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
            name,
            accepted: 200,
            uri: uri(addr).parse().expect("uri"),
            rt,
            stop,
            task,
        }
    }

    pub fn bind(rt: &Runtime) -> (TcpListener, SocketAddr) {
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        (listener, addr)
    }

    /// Stops accepting, lets requests in flight finish, stops the runtime.
    pub fn shut_down(self) {
        let _ = self.stop.send(());
        self.rt
            .block_on(self.task)
            .expect("server task")
            .unwrap_or_else(|e| panic!("{}: {e:#}", self.name));
        self.rt.shutdown_timeout(Duration::from_secs(5));
    }
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

/// The baseline: a bare axum handler checking GitHub's HMAC with `secret`,
/// on a runtime whose threads are all named `thread_name`.
pub fn start_bare(secret: &[u8], thread_name: &str) -> Server {
    let key = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    let app = Router::new()
        .route("/hooks/github", post(bare_receive))
        .with_state(Arc::new(key));
    Server::serve(app, thread_name, "bare-axum-hmac", |addr| {
        format!("http://{addr}/hooks/github")
    })
}

/// `n` requests, each signed as GitHub would with a fresh delivery id.
pub fn signed_requests(
    signer: &Signer,
    body: &Bytes,
    uri: &Uri,
    n: usize,
) -> Vec<Request<Full<Bytes>>> {
    (0..n)
        .map(|_| signed_request(signer, body, uri).0)
        .collect()
}

/// One `issues` request signed as GitHub would, with a fresh delivery id,
/// and that id (`X-GitHub-Delivery`).
pub fn signed_request(signer: &Signer, body: &Bytes, uri: &Uri) -> (Request<Full<Bytes>>, String) {
    let signed = signer.sign("issues", body).expect("sign");
    let mut req = Request::post(uri.clone());
    let mut delivery = String::new();
    for (name, value) in &signed.headers {
        if name == "x-github-delivery" {
            delivery = value.clone();
        }
        req = req.header(name, value.as_str());
    }
    (req.body(Full::new(signed.body)).expect("request"), delivery)
}

/// What the client saw over one batch of requests.
#[derive(Debug, Default)]
pub struct Outcome {
    pub sent: usize,
    pub client_cpu: Duration,
    pub by_status: BTreeMap<u16, usize>,
    pub errors: usize,
    /// Wall time and CPU over the batch (the client and idle threads included).
    pub cpu: CpuSpan,
    /// When each request went out, in the order given ([`Pace::Every`] only).
    pub sent_at: Vec<Instant>,
}

impl Outcome {
    pub fn accepted(&self, status: u16) -> usize {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    pub fn per_second(&self, status: u16) -> f64 {
        self.accepted(status) as f64 / self.cpu.wall.as_secs_f64()
    }

    /// Server CPU (everything in the process but the client thread) per accepted event.
    pub fn server_cpu_per_event(&self, status: u16) -> Duration {
        self.cpu.process.saturating_sub(self.client_cpu) / self.accepted(status).max(1) as u32
    }

    /// Server threads' CPU per accepted event, by thread name, busiest first.
    pub fn split(&self, status: u16) -> Vec<(String, f64)> {
        let n = self.accepted(status).max(1) as f64;
        let mut split: Vec<(String, f64)> = self
            .cpu
            .threads
            .iter()
            .filter(|(name, _)| name.as_str() != CLIENT_THREAD)
            .map(|(name, cpu)| (name.clone(), cpu.as_secs_f64() * 1e6 / n))
            .filter(|(_, us)| *us >= 0.5)
            .collect();
        split.sort_by(|a, b| b.1.total_cmp(&a.1));
        split
    }

    pub fn assert_all(&self, server: &Server) {
        self.assert_all_got(server.name, server.accepted);
    }

    /// Checks that every request got `status` from the server called `name`.
    pub fn assert_all_got(&self, name: &str, status: u16) {
        assert!(
            self.errors == 0 && self.accepted(status) == self.sent,
            "{name}: {} requests, {} transport errors, statuses {:?}",
            self.sent,
            self.errors,
            self.by_status
        );
    }
}

/// The client thread's name.
pub const CLIENT_THREAD: &str = "bench-client";

struct Job {
    requests: Vec<Request<Full<Bytes>>>,
    pace: Pace,
    reply: mpsc::Sender<Outcome>,
}

/// How the client sends a batch.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Back to back with this many in flight: as fast as the server answers.
    InFlight(usize),
    /// One request every interval, in the order given, however many are in
    /// flight (an open loop: a slow server does not slow the sender down).
    /// The send times are in [`Outcome::sent_at`].
    Every(Duration),
}

/// How the client connects.
pub struct ClientOptions {
    /// Local addresses to send from, one pooled client each, taken in turn
    /// request by request; empty: the system's choice, one client.
    pub from: Vec<IpAddr>,
    /// How long a pooled connection may idle before the client drops it
    /// (below a server's keep-alive timeout, so none closes under a request).
    pub pool_idle: Duration,
}

/// The client: a current-thread runtime on a dedicated std thread, so its CPU
/// is exactly that thread's CPU. It stays alive between batches so pooled
/// connections stay warm.
pub struct Driver {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    thread: std::thread::JoinHandle<()>,
}

impl Driver {
    pub fn start(options: ClientOptions) -> Driver {
        let (jobs, mut queue) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(CLIENT_THREAD.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("client runtime");
                let from: Vec<Option<IpAddr>> = if options.from.is_empty() {
                    vec![None]
                } else {
                    options.from.into_iter().map(Some).collect()
                };
                let clients: Vec<Client<HttpConnector, Full<Bytes>>> = from
                    .into_iter()
                    .map(|local| {
                        let mut connector = HttpConnector::new();
                        connector.set_nodelay(true);
                        connector.set_local_address(local);
                        Client::builder(TokioExecutor::new())
                            .pool_max_idle_per_host(CONCURRENCY)
                            .pool_idle_timeout(options.pool_idle)
                            .build(connector)
                    })
                    .collect();
                rt.block_on(async move {
                    while let Some(job) = queue.recv().await {
                        let outcome = match job.pace {
                            Pace::InFlight(n) => drive(&clients, job.requests, n).await,
                            Pace::Every(every) => drive_paced(&clients, job.requests, every).await,
                        };
                        let _ = job.reply.send(outcome);
                    }
                });
            })
            .expect("client thread");
        Driver { jobs, thread }
    }

    /// Sends `requests` ([`CONCURRENCY`] in flight) and waits for every answer.
    pub fn run(&self, requests: Vec<Request<Full<Bytes>>>) -> Outcome {
        self.run_paced(requests, Pace::InFlight(CONCURRENCY))
    }

    /// Sends `requests` as `pace` says and waits for every answer.
    pub fn run_paced(&self, requests: Vec<Request<Full<Bytes>>>, pace: Pace) -> Outcome {
        let (reply, outcome) = mpsc::channel();
        self.jobs
            .send(Job {
                requests,
                pace,
                reply,
            })
            .expect("client thread alive");
        outcome.recv().expect("client thread answers")
    }

    pub fn stop(self) {
        drop(self.jobs);
        self.thread.join().expect("client thread");
    }
}

/// Sends one request and reads its answer to the end (so the connection
/// goes back to the pool); its status, or `None` on a transport error.
async fn send_one(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Option<u16> {
    let resp = client.request(req).await.ok()?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.ok()?;
    Some(status)
}

impl Outcome {
    fn count(&mut self, answer: Option<u16>) {
        match answer {
            Some(status) => *self.by_status.entry(status).or_default() += 1,
            None => self.errors += 1,
        }
    }
}

async fn drive(
    clients: &[Client<HttpConnector, Full<Bytes>>],
    requests: Vec<Request<Full<Bytes>>>,
    in_flight: usize,
) -> Outcome {
    let sent = requests.len();
    let queue = Arc::new(Mutex::new(requests));
    let (mark, client0) = (CpuMark::now(), cpu_time(libc::CLOCK_THREAD_CPUTIME_ID));
    let tasks: Vec<_> = (0..in_flight.min(sent))
        .map(|_| {
            let (clients, queue) = (clients.to_vec(), queue.clone());
            tokio::spawn(async move {
                let mut seen = Outcome::default();
                loop {
                    let (req, left) = {
                        let mut queue = queue.lock().expect("queue");
                        let Some(req) = queue.pop() else {
                            break;
                        };
                        (req, queue.len())
                    };
                    seen.count(send_one(&clients[left % clients.len()], req).await);
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
    total.client_cpu = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID).saturating_sub(client0);
    total.cpu = mark.span();
    total
}

async fn drive_paced(
    clients: &[Client<HttpConnector, Full<Bytes>>],
    requests: Vec<Request<Full<Bytes>>>,
    every: Duration,
) -> Outcome {
    let sent = requests.len();
    let (mark, client0) = (CpuMark::now(), cpu_time(libc::CLOCK_THREAD_CPUTIME_ID));
    let start = tokio::time::Instant::now();
    let mut sent_at = Vec::with_capacity(sent);
    let mut tasks = Vec::with_capacity(sent);
    for (i, req) in requests.into_iter().enumerate() {
        // Each send at its own time from the start, so a late wake-up is
        // caught up rather than carried over.
        tokio::time::sleep_until(start + every * i as u32).await;
        sent_at.push(Instant::now());
        let client = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move { send_one(&client, req).await }));
    }
    let mut total = Outcome {
        sent,
        ..Outcome::default()
    };
    for task in tasks {
        total.count(task.await.expect("client task"));
    }
    total.client_cpu = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID).saturating_sub(client0);
    total.cpu = mark.span();
    total.sent_at = sent_at;
    total
}

/// The `p`-th quantile (0..=1) of `sorted`, nearest rank.
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Starts `sluice serve --config PATH` (this package's binary, `RUST_LOG`
/// `warn`, stderr inherited) and waits at most 120 s for what it prints:
/// the child, its base URL (`http://127.0.0.1:PORT`) and its admin API's
/// URL (empty when it serves none). A thread keeps draining its stdout, so
/// the child never blocks on a full pipe.
pub fn spawn_serve(config: &std::path::Path) -> (std::process::Child, String, String) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("SLUICE_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn sluice serve");
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut admin = String::new();
        let mut sent = false;
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("admin API on ") {
                admin = rest.split_whitespace().next().unwrap_or_default().into();
            }
            if !sent && let Some(addr) = line.strip_prefix("sluice listening on ") {
                let _ = tx.send((addr.to_string(), admin.clone()));
                sent = true;
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok((base, admin)) => (child, base, admin),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "sluice serve --config {} printed no address within 120 s",
                config.display()
            )
        }
    }
}
