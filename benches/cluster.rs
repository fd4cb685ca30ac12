//! Scale-out on NATS JetStream, in one run: `sluice serve` on the embedded
//! backend, one node on a three-server `nats-server -js` cluster, then two
//! nodes on it, each as a child process (`target/release/sluice`), so
//! every process's CPU is read the same way, from `/proc/PID/stat`.
//!
//! Each case runs the shipped `sluice.toml` and the rules it names under
//! `rules/` (router on, the github-router component, outbox agents), with
//! only the data dir, the ports, the secrets (files, so the bench can sign)
//! and the compile cache (shared, so each node does not compile the rule
//! again) changed, and for the NATS cases `[store] backend = "nats"` with
//! `[store.nats] url` (the three servers), `replicas = 3` and a prefix of
//! the case's own. The servers run with their default sync: with three
//! replicas a write is durable once a majority holds it.
//!
//! The payload is the real GitHub `issues.opened` delivery from the corpus,
//! compact, 11,622 bytes, signed with the source's secret and a fresh
//! `X-GitHub-Delivery` per request; the shipped router sends it to
//! `issue-triage`, so each event records a route. The shield stays on, so
//! the client sends from 256 loopback addresses in turn. With two nodes
//! the client alternates requests between them, as a load balancer would.
//!
//! Per case: a warm-up burst, then rounds of a burst of events (48 in
//! flight), each timed from its start until every event has a decision
//! (the nodes' `sluice_events_routed_total`, summed), and then until every
//! delivery is made (`sluice_dispatch_attempts_total{outcome="delivered"}`).
//! CPU per event is summed over every process involved: each sluice node
//! and, for the NATS cases, each nats-server; the bench's own process (the
//! load generator and the pollers) is printed apart. Then, with two nodes
//! up, the index lag: the time from a 202 on one node until the other
//! node's admin API lists the event (`GET /v1/events/{id}` answers 200),
//! p50 and p99.
//!
//! `cargo bench --bench cluster` for figures; `cargo test --release
//! --benches` runs a tiny round of each case and checks that every request
//! got a 202, every event was routed (on every node's index) and
//! delivered, and the lag samples arrived.

// The CPU clocks of `common` are only reachable through libc
// (`clock_gettime`, `sysconf`): those calls are the only unsafe code.
#![allow(unsafe_code)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::nats::NatsCluster;
use common::{ClientOptions, CpuMark, Driver, Outcome, median, payload, quantile, signed_request};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sluice::cli::send::Signer;
use sluice::config::Config;
use tokio::runtime::Runtime;

/// Loopback addresses the client sends from: enough that the shipped shield
/// (100/s per address, bursts of 500) never refuses the bench's rates.
const CLIENT_ADDRESSES: usize = 256;

/// The GitHub source's secret (a file beside each node's config).
const GITHUB_SECRET: &str = "bench-github-secret-0123456789abcdef";

/// The admin API's token (a file beside each node's config).
const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";

/// The aim: NATS CPU per event at most this many times the embedded one's.
const AIM: f64 = 2.0;

/// The agent the shipped rule routes `issues.opened` to.
const AGENT: &str = "issue-triage";

/// A `sluice serve` child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Node {
    child: Child,
    /// `http://127.0.0.1:PORT/hooks/github`.
    hook: Uri,
    /// `http://127.0.0.1:PORT`.
    base: String,
    /// `http://127.0.0.1:PORT/v1`, the admin API.
    admin: String,
}

impl Node {
    /// Starts `sluice serve --config PATH` and waits (at most 120 s) for
    /// the addresses it prints.
    fn spawn(config: &Path) -> Node {
        let (child, base, admin) = common::spawn_serve(config);
        Node {
            child,
            hook: format!("{base}/hooks/github").parse().expect("hook uri"),
            base,
            admin,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and up to 20 s for a clean exit; SIGKILL after that.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "sluice serve exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "sluice serve (pid {}) did not exit within 20 s of SIGTERM",
            self.pid()
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped `sluice.toml` for one node under `dir`: data dir, ports,
/// secret files and the shared compile cache changed, and the store's
/// `backend` and `[store.nats]` when `nats` is given (URL, prefix).
fn write_config(dir: &Path, cache: &Path, nats: Option<(&str, usize, &str)>) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = root.join("sluice.toml");
    let text =
        std::fs::read_to_string(&shipped).unwrap_or_else(|e| panic!("{}: {e}", shipped.display()));
    let mut config: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", shipped.display()));
    std::fs::create_dir_all(dir).expect("node dir");
    let secret = |name: &str, value: &str| {
        let path = dir.join(name);
        std::fs::write(&path, value).expect("write secret");
        let mut spec = toml::Table::new();
        spec.insert("file".into(), path.display().to_string().into());
        toml::Value::Table(spec)
    };
    let table = |config: &mut toml::Table, key: &str| -> toml::Table {
        config
            .get(key)
            .and_then(toml::Value::as_table)
            .cloned()
            .unwrap_or_default()
    };
    let mut server = table(&mut config, "server");
    server.insert("listen".into(), "127.0.0.1:0".into());
    server.insert(
        "data_dir".into(),
        dir.join("data").display().to_string().into(),
    );
    config.insert("server".into(), server.into());
    let mut admin = table(&mut config, "admin");
    admin.insert("listen".into(), "127.0.0.1:0".into());
    admin.insert("token".into(), secret("admin.key", ADMIN_TOKEN));
    config.insert("admin".into(), admin.into());
    let mut sources = table(&mut config, "sources");
    let mut github = sources
        .get("github")
        .and_then(toml::Value::as_table)
        .cloned()
        .expect("the shipped config has [sources.github]");
    github.insert("secret".into(), secret("github.key", GITHUB_SECRET));
    sources.insert("github".into(), github.into());
    config.insert("sources".into(), sources.into());
    let mut rules = table(&mut config, "rules");
    rules.insert(
        "dir".into(),
        root.join("rules").display().to_string().into(),
    );
    rules.insert("cache_dir".into(), cache.display().to_string().into());
    config.insert("rules".into(), rules.into());
    if let Some((url, replicas, prefix)) = nats {
        let mut store = table(&mut config, "store");
        store.insert("backend".into(), "nats".into());
        let mut n = toml::Table::new();
        n.insert("url".into(), url.into());
        n.insert("replicas".into(), (replicas as i64).into());
        n.insert("prefix".into(), prefix.into());
        store.insert("nats".into(), n.into());
        config.insert("store".into(), store.into());
    }
    let path = dir.join("sluice.toml");
    std::fs::write(&path, toml::to_string(&config).expect("config as TOML")).expect("write config");
    Config::load(Some(&path))
        .and_then(|c| c.validate().map(|()| c))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// The bench's own HTTP client for the nodes' `/metrics` and admin API.
struct Poller {
    rt: Runtime,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Poller {
    fn new() -> Poller {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("poll runtime");
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Poller {
            rt,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Sends `req` and reads the whole answer: its status and body.
    fn send(&self, req: Request<Full<Bytes>>) -> (u16, Bytes) {
        self.rt.block_on(async {
            let uri = req.uri().clone();
            let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
                .await
                .unwrap_or_else(|_| panic!("{uri}: no answer within 30 s"))
                .unwrap_or_else(|e| panic!("{uri}: {e}"));
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .unwrap_or_else(|e| panic!("{uri}: {e}"))
                .to_bytes();
            (status, body)
        })
    }

    fn get(&self, url: &str, token: Option<&str>) -> (u16, Bytes) {
        let mut req = Request::get(url);
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        self.send(req.body(Full::default()).expect("request"))
    }

    /// The sum of counter `name`'s samples on `node` whose labels contain
    /// `label` (every sample when empty).
    fn counter(&self, node: &Node, name: &str, label: &str) -> f64 {
        let (status, body) = self.get(&format!("{}/metrics", node.base), None);
        assert_eq!(status, 200, "{}/metrics", node.base);
        String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                let labels = key.strip_prefix(name)?;
                (labels.is_empty() || labels.starts_with('{'))
                    .then_some(())
                    .filter(|()| labels.contains(label))?;
                value.parse::<f64>().ok()
            })
            .sum()
    }

    /// Decisions recorded on each node (every outcome), and the failed ones.
    fn routed(&self, nodes: &[Node]) -> (Vec<f64>, f64) {
        let each = nodes
            .iter()
            .map(|n| self.counter(n, "sluice_events_routed_total", ""))
            .collect();
        let failed = nodes
            .iter()
            .map(|n| self.counter(n, "sluice_events_routed_total", "outcome=\"failed\""))
            .sum();
        (each, failed)
    }

    /// Deliveries made, all nodes together.
    fn delivered(&self, nodes: &[Node]) -> f64 {
        nodes
            .iter()
            .map(|n| self.counter(n, "sluice_dispatch_attempts_total", "outcome=\"delivered\""))
            .sum()
    }

    /// Waits until `value()` reaches `target`; the time taken, or `None`
    /// past `limit`. A look costs the nodes CPU (a `/metrics` scrape on the
    /// NATS backend counts the index's unsettled events, a scan that grows
    /// with the events held), so the bench looks again only after 20 times
    /// as long as the last look took (at least 10 ms): its scrapes stay
    /// under 5 % of one core.
    fn until(&self, target: f64, limit: Duration, value: impl Fn() -> f64) -> Option<Duration> {
        let start = Instant::now();
        loop {
            let look = Instant::now();
            if value() >= target {
                return Some(start.elapsed());
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep((look.elapsed() * 20).max(Duration::from_millis(10)));
        }
    }
}

/// How long a wait for `events` may take before the bench gives up.
fn limit(events: usize) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(20 * events as u64)
}

/// One case's processes: the sluice nodes and the nats-servers beside them.
struct Case<'a> {
    name: &'static str,
    nodes: Vec<Node>,
    nats: Vec<u32>,
    signer: Signer,
    poller: &'a Poller,
    /// Events accepted so far (warm-up included).
    accepted: usize,
    delivered: usize,
}

/// What one burst cost.
struct Round {
    events: usize,
    /// Accepted per second while the client sent.
    intake_rate: f64,
    /// Events per second from the burst's start until the last decision.
    routed_rate: f64,
    /// CPU per event (µs) to the last decision: sluice nodes, nats-servers,
    /// the bench's own process.
    sluice_us: f64,
    nats_us: f64,
    bench_us: f64,
    /// Decisions each node made in this burst.
    per_node: Vec<f64>,
    /// The sluice nodes' CPU per event by thread name, busiest first.
    threads: Vec<(String, f64)>,
}

impl Round {
    fn total_us(&self) -> f64 {
        self.sluice_us + self.nats_us
    }
}

impl<'a> Case<'a> {
    fn start(
        name: &'static str,
        configs: &[PathBuf],
        nats: Option<&NatsCluster>,
        poller: &'a Poller,
    ) -> Case<'a> {
        let nodes: Vec<Node> = configs.iter().map(|c| Node::spawn(c)).collect();
        let config = Config::load(Some(&configs[0])).expect("node config");
        let signer = Signer::new(&config, "github").expect("signer");
        Case {
            name,
            nodes,
            nats: nats.map(NatsCluster::pids).unwrap_or_default(),
            signer,
            poller,
            accepted: 0,
            delivered: 0,
        }
    }

    /// Sends `n` fresh events, in turn to each node, and checks every one got a 202.
    fn send(&mut self, driver: &Driver, body: &Bytes, n: usize) -> Outcome {
        let requests = (0..n)
            .map(|i| {
                let node = &self.nodes[i % self.nodes.len()];
                signed_request(&self.signer, body, &node.hook).0
            })
            .collect();
        let outcome = driver.run(requests);
        outcome.assert_all_got(self.name, 202);
        self.accepted += n;
        outcome
    }

    /// Waits until every event accepted so far has its decision; panics past the limit.
    fn wait_routed(&self) -> Duration {
        let poller = self.poller;
        let target = self.accepted as f64;
        poller
            .until(target, limit(self.accepted), || {
                poller.routed(&self.nodes).0.iter().sum()
            })
            .unwrap_or_else(|| {
                panic!(
                    "{}: {:?} decisions of {} events after {:?}",
                    self.name,
                    poller.routed(&self.nodes).0,
                    self.accepted,
                    limit(self.accepted)
                )
            })
    }

    /// Holds or lets go the deliveries to [`AGENT`] on every node (on the
    /// NATS backend the paused set is shared; asking each node is harmless).
    fn pause(&self, paused: bool) {
        let verb = if paused { "pause" } else { "resume" };
        for node in &self.nodes {
            let url = format!("{}/agents/{AGENT}/{verb}", node.admin);
            let req = Request::post(&url)
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .body(Full::default())
                .expect("request");
            let (status, body) = self.poller.send(req);
            assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(&body));
        }
    }

    /// Lets the deliveries held so far go (one per event: the shipped rule
    /// routes `issues.opened` to one agent) and waits until every one is
    /// made, or at most `window`, after which the rest are held again:
    /// deliveries made, per second, and CPU per delivery (sluice nodes and
    /// nats-servers), and whether all were made.
    fn deliver(&mut self, window: Duration) -> (f64, f64, bool) {
        let poller = self.poller;
        let before = poller.delivered(&self.nodes);
        let (nodes, nats) = self.marks();
        self.pause(false);
        let start = Instant::now();
        let all = poller
            .until(self.accepted as f64, window, || {
                poller.delivered(&self.nodes)
            })
            .is_some();
        let wall = start.elapsed();
        let cpu: Duration = nodes
            .iter()
            .chain(nats.iter())
            .map(|m| m.span().process)
            .sum();
        let made = (poller.delivered(&self.nodes) - before) as usize;
        if all {
            self.delivered = self.accepted;
        } else {
            self.pause(true);
        }
        (made as f64 / wall.as_secs_f64(), per_event(cpu, made), all)
    }

    /// Wall time of one `/metrics` scrape of the first node (median of 9),
    /// with the events it holds.
    fn scrape_cost(&self) -> Duration {
        let mut walls: Vec<Duration> = (0..9)
            .map(|_| {
                let start = Instant::now();
                self.poller
                    .counter(&self.nodes[0], "sluice_events_routed_total", "");
                start.elapsed()
            })
            .collect();
        walls.sort();
        walls[4]
    }

    /// Every process's CPU now: the nodes', the nats-servers'.
    fn marks(&self) -> (Vec<CpuMark>, Vec<CpuMark>) {
        (
            self.nodes.iter().map(|n| CpuMark::of(n.pid())).collect(),
            self.nats.iter().map(|p| CpuMark::of(*p)).collect(),
        )
    }

    /// One burst of `n` events, timed to the last decision and the last delivery.
    fn round(&mut self, driver: &Driver, body: &Bytes, n: usize) -> Round {
        let (routed0, failed0) = self.poller.routed(&self.nodes);
        let bench = CpuMark::now();
        let (nodes, nats) = self.marks();
        let outcome = self.send(driver, body, n);
        self.wait_routed();
        let wall = nodes[0].at().elapsed();
        let sluice: Vec<_> = nodes.iter().map(CpuMark::span).collect();
        let nats_cpu: Duration = nats.iter().map(|m| m.span().process).sum();
        let bench_cpu = bench.span().process;
        let sluice_cpu: Duration = sluice.iter().map(|s| s.process).sum();
        let (routed, failed) = self.poller.routed(&self.nodes);
        assert_eq!(failed, failed0, "{}: decisions that failed", self.name);
        let mut threads: Vec<(String, f64)> = Vec::new();
        for span in &sluice {
            for (name, cpu) in &span.threads {
                // Tokio names its threads by runtime; group numbered ones.
                let name = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
                match threads.iter_mut().find(|(t, _)| t == name) {
                    Some((_, us)) => *us += per_event(*cpu, n),
                    None => threads.push((name.to_string(), per_event(*cpu, n))),
                }
            }
        }
        threads.retain(|(_, us)| *us >= 0.5);
        threads.sort_by(|a, b| b.1.total_cmp(&a.1));
        Round {
            events: n,
            intake_rate: outcome.per_second(202),
            routed_rate: n as f64 / wall.as_secs_f64(),
            sluice_us: per_event(sluice_cpu, n),
            nats_us: per_event(nats_cpu, n),
            bench_us: per_event(bench_cpu, n),
            per_node: routed.iter().zip(&routed0).map(|(a, b)| a - b).collect(),
            threads,
        }
    }

    /// Checks that every node's index lists every event accepted as routed
    /// (at most 1000: the admin API's page), waiting out the index lag.
    fn assert_listed_routed(&self) {
        assert!(self.accepted <= 1000, "only a page of 1000 can be listed");
        for node in &self.nodes {
            let url = format!("{}/events?status=routed&limit=1000", node.admin);
            let start = Instant::now();
            loop {
                let (status, body) = self.poller.get(&url, Some(ADMIN_TOKEN));
                assert_eq!(status, 200, "{url}");
                let listed: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
                let n = listed
                    .as_array()
                    .or_else(|| listed["events"].as_array())
                    .map_or(0, Vec::len);
                if n == self.accepted {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "{}: {url} lists {n} routed events of {}",
                    self.name,
                    self.accepted
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The index lag: `samples` events, each sent alone to one node and
    /// then looked up on the other node's admin API until it is there.
    fn index_lag(&mut self, body: &Bytes, samples: usize) -> Vec<Duration> {
        assert_eq!(self.nodes.len(), 2, "the lag is between two nodes");
        let mut lags = Vec::with_capacity(samples);
        for i in 0..samples {
            let (from, to) = (&self.nodes[i % 2], &self.nodes[(i + 1) % 2]);
            let (req, _) = signed_request(&self.signer, body, &from.hook);
            let (status, answer) = self.poller.send(req);
            let accepted = Instant::now();
            assert_eq!(
                status,
                202,
                "lag sample {i}: {}",
                String::from_utf8_lossy(&answer)
            );
            let answer: serde_json::Value = serde_json::from_slice(&answer).expect("JSON");
            let id = answer["id"].as_str().expect("the 202 names the event id");
            let url = format!("{}/events/{id}", to.admin);
            loop {
                let (status, _) = self.poller.get(&url, Some(ADMIN_TOKEN));
                if status == 200 {
                    lags.push(accepted.elapsed());
                    break;
                }
                assert_eq!(status, 404, "{url}");
                assert!(
                    accepted.elapsed() < Duration::from_secs(30),
                    "{id} not listed on the other node within 30 s"
                );
                std::thread::sleep(Duration::from_micros(500));
            }
            self.accepted += 1;
            // Apart, so each sample meets an idle cluster.
            std::thread::sleep(Duration::from_millis(20));
        }
        lags
    }

    fn stop(self) {
        for node in self.nodes {
            node.stop();
        }
    }
}

/// The machine's load averages (1, 5, 15 min), to tell what shared it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn per_event(cpu: Duration, events: usize) -> f64 {
    cpu.as_secs_f64() * 1e6 / events.max(1) as f64
}

/// Medians of a case's rounds.
struct Figures {
    name: &'static str,
    nodes: usize,
    intake_rate: f64,
    routed_rate: f64,
    sluice_us: f64,
    nats_us: f64,
    total_us: f64,
    bench_us: f64,
    /// Deliveries per second and CPU per delivery once let go, and
    /// whether all were made within the window.
    delivery: (f64, f64, bool),
    /// Wall time of one `/metrics` scrape at the end, and the events held.
    scrape: (Duration, usize),
    totals: Vec<f64>,
    threads: Vec<(String, f64)>,
}

impl Figures {
    fn of(name: &'static str, nodes: usize, run: Run) -> Figures {
        let rounds = &run.rounds;
        let m = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        let mut threads: Vec<(String, f64)> = Vec::new();
        for r in rounds {
            for (t, _) in &r.threads {
                if !threads.iter().any(|(n, _)| n == t) {
                    let us = rounds
                        .iter()
                        .map(|r| r.threads.iter().find(|(n, _)| n == t).map_or(0.0, |x| x.1))
                        .collect();
                    threads.push((t.clone(), median(us)));
                }
            }
        }
        threads.sort_by(|a, b| b.1.total_cmp(&a.1));
        threads.truncate(6);
        Figures {
            name,
            nodes,
            intake_rate: m(&|r| r.intake_rate),
            routed_rate: m(&|r| r.routed_rate),
            sluice_us: m(&|r| r.sluice_us),
            nats_us: m(&|r| r.nats_us),
            total_us: m(&|r| r.total_us()),
            bench_us: m(&|r| r.bench_us),
            delivery: run.delivery,
            scrape: run.scrape,
            totals: rounds.iter().map(Round::total_us).collect(),
            threads,
        }
    }
}

fn print_round(case: &str, i: usize, r: &Round) {
    println!(
        "{case:<14} {i:<5} {:>6} {:>9.0} {:>9.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1}  per node {:?}",
        r.events,
        r.intake_rate,
        r.routed_rate,
        r.sluice_us,
        r.nats_us,
        r.total_us(),
        r.bench_us,
        r.per_node.iter().map(|n| *n as u64).collect::<Vec<_>>()
    );
}

/// What one case measured.
struct Run {
    rounds: Vec<Round>,
    delivery: (f64, f64, bool),
    scrape: (Duration, usize),
}

/// Runs one case: the agent's deliveries held (so the rounds time intake
/// and routing alone: a routed event's delivery is queued, not made), a
/// warm-up, `rounds` bursts of `per_round`, then the deliveries let go and
/// timed. Past the limit on deliveries it panics in test mode.
fn run_case(
    case: &mut Case,
    driver: &Driver,
    body: &Bytes,
    (warm, rounds, per_round): (usize, usize, usize),
    bench_mode: bool,
) -> Run {
    case.pause(true);
    case.send(driver, body, warm);
    case.wait_routed();
    let rounds = (1..=rounds)
        .map(|i| {
            let r = case.round(driver, body, per_round);
            print_round(case.name, i, &r);
            r
        })
        .collect();
    // Under `cargo bench` the deliveries go for at most a minute (the rate
    // is steady); in test mode every one must be made.
    let window = if bench_mode {
        Duration::from_secs(60)
    } else {
        limit(case.accepted)
    };
    let delivery = case.deliver(window);
    let (rate, us, all) = delivery;
    assert!(
        all || bench_mode,
        "{}: not every delivery was made",
        case.name
    );
    println!(
        "{:<14} deliveries let go: {rate:.0}/s, {us:.1} µs per delivery (sluice and nats-servers){}",
        case.name,
        if all {
            ", all made"
        } else {
            ", the rest held again after the window"
        }
    );
    let scrape = (case.scrape_cost(), case.accepted);
    Run {
        rounds,
        delivery,
        scrape,
    }
}

fn main() {
    let Some(bench_mode) = common::bench_mode(&[
        "cluster/embedded",
        "cluster/nats-1-node",
        "cluster/nats-2-nodes",
    ]) else {
        return;
    };
    let (sizes, lag_samples) = if bench_mode {
        ((2 * CLIENT_ADDRESSES, 3, 5_000), 200)
    } else {
        ((8, 1, 24), 5)
    };
    let (_, rounds, per_round) = sizes;
    // Found before anything runs, so a missing server fails at once.
    let nats_bin = common::nats::binary();
    let body = payload();
    // On the build disk, not a tmpfs, so every fsync costs what it would.
    let dir = tempfile::Builder::new()
        .prefix("sluice-cluster-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let cache = dir.path().join("wasm-cache");
    let poller = Poller::new();
    let driver = Driver::start(ClientOptions {
        from: (0..CLIENT_ADDRESSES)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)))
            .collect(),
        // Below the shipped header_timeout (10 s), which hyper also applies
        // to idle keep-alive connections.
        pool_idle: Duration::from_secs(5),
    });
    println!(
        "cluster: {per_round} events per round, {rounds} rounds per case, {} in flight from \
         {CLIENT_ADDRESSES} loopback addresses, payload {} bytes; sluice serve children as \
         shipped (router on, outbox agents); nats-server {} ×3, default sync, replicas 3; \
         load average {}",
        common::CONCURRENCY,
        body.len(),
        nats_bin.display(),
        load_average()
    );
    println!(
        "{:<14} {:<5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "case",
        "round",
        "events",
        "intake/s",
        "routed/s",
        "sluice µs",
        "nats µs",
        "total µs",
        "bench µs"
    );

    // (a) The embedded backend.
    let config = write_config(&dir.path().join("embedded"), &cache, None);
    let mut case = Case::start("embedded", &[config], None, &poller);
    let embedded = run_case(&mut case, &driver, &body, sizes, bench_mode);
    if !bench_mode {
        case.assert_listed_routed();
    }
    case.stop();

    // (b) One node on a three-server cluster.
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let config = |name: &str, prefix: &str| {
        write_config(
            &dir.path().join(name),
            &cache,
            Some((&nats.url(), nats.len(), prefix)),
        )
    };
    let mut case = Case::start("nats-1-node", &[config("one", "one")], Some(&nats), &poller);
    let one = run_case(&mut case, &driver, &body, sizes, bench_mode);
    if !bench_mode {
        case.assert_listed_routed();
    }
    case.stop();

    // (c) Two nodes on it, the client alternating between them.
    let mut case = Case::start(
        "nats-2-nodes",
        &[config("two-a", "two"), config("two-b", "two")],
        Some(&nats),
        &poller,
    );
    let two = run_case(&mut case, &driver, &body, sizes, bench_mode);
    for (i, r) in two.rounds.iter().enumerate() {
        assert!(
            r.per_node.iter().all(|n| *n > 0.0),
            "round {}: both nodes route ({:?})",
            i + 1,
            r.per_node
        );
    }
    if !bench_mode {
        case.assert_listed_routed();
    }
    let mut lags = case.index_lag(&body, lag_samples);
    lags.sort();
    case.stop();
    driver.stop();
    drop(nats);

    let figures = [
        Figures::of("embedded", 1, embedded),
        Figures::of("nats-1-node", 1, one),
        Figures::of("nats-2-nodes", 2, two),
    ];
    let base = figures[0].total_us;
    let list = |xs: &[f64]| {
        xs.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!();
    println!("medians over {rounds} rounds (paste into the README):");
    println!(
        "| backend | nodes | intake events/s | intake + routing events/s | CPU µs/event to the last decision: sluice | nats-servers | total (rounds) | × embedded | load generator | deliveries let go: /s, CPU µs each |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for f in &figures {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | **{:.0}** ({}) | {:.2}× | {:.0} | {:.0}/s, {:.0} µs{} |",
            f.name,
            f.nodes,
            f.intake_rate,
            f.routed_rate,
            f.sluice_us,
            f.nats_us,
            f.total_us,
            list(&f.totals),
            f.total_us / base.max(f64::MIN_POSITIVE),
            f.bench_us,
            f.delivery.0,
            f.delivery.1,
            if f.delivery.2 { "" } else { " (for 60 s)" },
        );
    }
    let ratio = figures[1].total_us / base.max(f64::MIN_POSITIVE);
    println!();
    if base > 0.0 {
        println!(
            "NATS, one node / embedded, CPU per event: **{ratio:.2}×** (aim ≤ {AIM}×: {})",
            if ratio <= AIM { "met" } else { "NOT met" }
        );
    } else {
        // A tiny round spans less than one clock tick of /proc/PID/stat.
        println!("NATS, one node / embedded, CPU per event: too few events to tell");
    }
    for f in &figures {
        println!(
            "{}: one /metrics scrape took {:.2?} with {} events held",
            f.name, f.scrape.0, f.scrape.1
        );
    }
    for f in &figures {
        println!(
            "{}: sluice threads, µs/event: {}",
            f.name,
            f.threads
                .iter()
                .map(|(t, us)| format!("{t} {us:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "index lag, 202 on one node → listed on the other ({} samples): p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        lags.len(),
        quantile(&lags, 0.5),
        quantile(&lags, 0.99),
        lags.last().expect("samples")
    );
    println!("load average at the end: {}", load_average());
}
