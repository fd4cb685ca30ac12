//! Shared test harness: temp configs with file secrets, an in-process gateway
//! on port 0, a small HTTP client and corpus readers.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sluice::AppState;
use sluice::cli::send::{Signed, Signer};
use sluice::config::Config;
use sluice::event::EventStatus;
use sluice::store::{EventRecord, Store};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The shared corpus beside the checkout.
pub fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus")
}

/// Secrets written into the temp dir, one file per role.
pub const SECRETS: &[(&str, &str)] = &[
    ("github.key", "gh-current-secret"),
    ("github-old.key", "gh-previous-secret"),
    ("gitlab.key", "glpat-like-token-value"),
    (
        "gitlab-signing.key",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ),
    ("standard.key", "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"),
    ("stripe.key", "whsec_stripe_test_secret"),
    ("slack.key", "8f742231b10e8888abcd99yyyzzz85a5"),
    ("linear.key", "lin_wh_secret"),
    ("hmac.key", "generic-secret"),
    ("admin.key", ADMIN_TOKEN),
];

/// The admin API token of the test config (`[admin] token`).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// A temp dir with secrets and a config serving every provider.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Env {
    /// A config with every provider and `extra` TOML appended to `[server]`-level text.
    /// Timeouts are generous (10 s), so a loaded machine never trips them;
    /// a test of a timeout sets its own with [`Env::set_server`].
    pub fn new(extra: &str) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        // An empty rules directory: `serve` routes every event to nowhere.
        std::fs::create_dir(dir.path().join("rules")).expect("rules dir");
        for (name, value) in SECRETS {
            std::fs::write(dir.path().join(name), value).expect("write secret");
        }
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{data}"
header_timeout = "10s"
body_timeout = "10s"
max_body_bytes = 1048576

[shield]
enabled = false

[admin]
listen = "127.0.0.1:0"
token = {{ file = "admin.key" }}

[sources.github]
provider = "github"
secrets = [{{ file = "github.key" }}, {{ file = "github-old.key" }}]

[sources.gitlab]
provider = "gitlab"
mode = "token"
secret = {{ file = "gitlab.key" }}

[sources.gitlab-signed]
provider = "gitlab"
mode = "signature"
signing_secrets = [{{ file = "gitlab-signing.key" }}]

[sources.gitlab-both]
provider = "gitlab"
mode = "both"
secret = {{ file = "gitlab.key" }}
signing_secrets = [{{ file = "gitlab-signing.key" }}]

[sources.standard]
provider = "standard-webhooks"
secret = {{ file = "standard.key" }}

[sources.stripe]
provider = "stripe"
secret = {{ file = "stripe.key" }}

[sources.slack]
provider = "slack"
secret = {{ file = "slack.key" }}

[sources.linear]
provider = "linear"
secret = {{ file = "linear.key" }}

[sources.hmac]
provider = "hmac"
secret = {{ file = "hmac.key" }}
header = "X-Signature"
prefix = "sha256="
encoding = "hex"
delivery_header = "X-Delivery"
kind_header = "X-Event"
{extra}
"#,
            data = dir.path().join("data").display()
        );
        let config_path = dir.path().join("sluice.toml");
        std::fs::write(&config_path, text).expect("write config");
        Env { dir, config_path }
    }

    /// Sets `[server]` keys of the test config (replacing the line, or adding it).
    pub fn set_server(&self, keys: &[(&str, &str)]) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let start = lines
            .iter()
            .position(|l| l == "[server]")
            .expect("[server]")
            + 1;
        let end = start
            + lines[start..]
                .iter()
                .position(|l| l.starts_with('['))
                .unwrap_or(lines.len() - start);
        for (key, value) in keys {
            let line = format!("{key} = {value}");
            match lines[start..end]
                .iter()
                .position(|l| l.split('=').next().map(str::trim) == Some(*key))
            {
                Some(i) => lines[start + i] = line,
                None => lines.insert(start, line),
            }
        }
        std::fs::write(&self.config_path, lines.join("\n") + "\n").unwrap();
    }

    /// Approves a rule's grants in the test config: `[rules.grants.<rule>]`
    /// with `keys` (e.g. [`APPROVE_ALL`]).
    pub fn approve(&self, rule: &str, keys: &str) {
        let mut text = std::fs::read_to_string(&self.config_path).unwrap();
        text.push_str(&format!("\n[rules.grants.{rule}]\n{keys}\n"));
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// Declares outbox agents (under the data dir) by name, for rules
    /// that route to them.
    pub fn declare_agents(&self, names: &[&str]) {
        let mut text = std::fs::read_to_string(&self.config_path).unwrap();
        for name in names {
            text.push_str(&format!("\n[agents.{name}]\nkind = \"outbox\"\n"));
        }
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// The loaded config.
    pub fn config(&self) -> Config {
        Config::load(Some(&self.config_path)).expect("test config loads")
    }

    /// A signer for one source.
    pub fn signer(&self, source: &str) -> Signer {
        Signer::new(&self.config(), source).expect("signer")
    }

    /// The SQLite file.
    pub fn db(&self) -> PathBuf {
        self.dir.path().join("data/sluice.db")
    }
}

/// A gateway served in-process on a loopback port.
pub struct Gateway {
    pub addr: SocketAddr,
    state: std::sync::Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

impl Gateway {
    pub async fn start(config: Config) -> Gateway {
        let listener = TcpListener::bind(config.server.listen).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (state, _) = AppState::build(config).expect("state builds");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(sluice::run(state.clone(), listener, async move {
            let _ = rx.await;
        }));
        Gateway {
            addr,
            state,
            stop: Some(tx),
            task: Some(task),
            client: client(),
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        self.task
            .take()
            .expect("running")
            .await
            .expect("join")
            .expect("server ran cleanly");
        // What `sluice::serve` does after intake stops: commit and close the store.
        self.state.store.close().await;
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        metrics_text(&self.client, &format!("http://{}", self.addr)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs a signed request to `/hooks/{source}`.
    pub async fn post_signed(
        &self,
        source: &str,
        signed: &Signed,
    ) -> (StatusCode, serde_json::Value) {
        post(
            &self.client,
            &self.url(&format!("/hooks/{source}")),
            &signed.headers,
            signed.body.clone(),
        )
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// An approval of everything a rule may ask for, for tests about something
/// other than grants.
/// The agents the shipped rules route to (declared in sluice.toml).
pub const SHIPPED_AGENTS: [&str; 10] = [
    "coordinator",
    "issue-triage",
    "review-agent",
    "deployment",
    "guardian",
    "ci-validation",
    "release-manager",
    "mr-reviewer",
    "pipeline-monitor",
    "comment-handler",
];

pub const APPROVE_ALL: &str =
    "sources = [\"*\"]\nkinds = [\"*\"]\nagents = [\"*\"]\nworkflows = [\"*\"]\nwasi = true";

/// The shipped config's approvals of the shipped rules (`[rules.grants.*]`
/// of sluice.toml) and the agents they name, to append to a test config that loads `rules/`.
pub fn shipped_grants() -> &'static str {
    let text = sluice::config::EMBEDDED_DEFAULTS;
    let start = text
        .find("[rules.grants.")
        .expect("sluice.toml approves the shipped rules");
    // With the agents they name (outboxes under the data dir); not the
    // dispatch and admin tables, which a test sets itself.
    let end = text
        .find("\n[dispatch]")
        .expect("sluice.toml has [dispatch] after its agents");
    &text[start..end]
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// POSTs `body` with `headers`; returns the status and the JSON body (or null).
pub async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    headers: &[(HeaderName, String)],
    body: Bytes,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::post(url);
    for (h, v) in headers {
        req = req.header(h, HeaderValue::from_str(v).expect("header value"));
    }
    let resp = client
        .request(req.body(Full::new(body)).expect("request"))
        .await
        .expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// Replaces (or removes, with `None`) one header.
pub fn with_header(signed: &Signed, name: &str, value: Option<&str>) -> Signed {
    let mut s = signed.clone();
    s.headers
        .retain(|(h, _)| !h.as_str().eq_ignore_ascii_case(name));
    if let Some(v) = value {
        s.headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("name"),
            v.to_string(),
        ));
    }
    s
}

/// The value of one header.
pub fn header(signed: &Signed, name: &str) -> String {
    signed
        .headers
        .iter()
        .find(|(h, _)| h.as_str().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .expect("header present")
}

/// Flips one byte of the body (after signing).
pub fn with_flipped_byte(signed: &Signed, at: usize) -> Signed {
    let mut s = signed.clone();
    let mut b = s.body.to_vec();
    let i = at % b.len();
    b[i] ^= 0x01;
    s.body = Bytes::from(b);
    s
}

/// Every GitHub corpus payload as (event kind, file).
pub fn github_payloads() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(corpus().join("github")).expect("corpus/github") {
        let dir = dir.expect("entry").path();
        if !dir.is_dir() {
            continue;
        }
        let kind = dir
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        for f in std::fs::read_dir(&dir).expect("dir") {
            let f = f.expect("entry").path();
            if f.extension().is_some_and(|e| e == "json") {
                out.push((kind.clone(), f));
            }
        }
    }
    out.sort();
    out
}

/// Every GitLab corpus payload as (X-Gitlab-Event, file).
pub fn gitlab_payloads() -> Vec<(String, PathBuf)> {
    let dir = corpus().join("gitlab/webhooks");
    let map: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(dir.join("events.json")).expect("events.json"))
            .expect("map");
    map.into_iter()
        .map(|(file, kind)| (kind, dir.join(file)))
        .collect()
}

/// The compact form of a JSON file, as providers send it.
pub fn compact(bytes: &[u8]) -> Bytes {
    let v: serde_json::Value = serde_json::from_slice(bytes).expect("corpus file is JSON");
    Bytes::from(serde_json::to_vec(&v).expect("serialise"))
}

/// Polls the store until `id` has `status` (at most 20 s); returns its record.
pub async fn until_status(store: &dyn Store, id: &str, status: EventStatus) -> EventRecord {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rec = store
            .get(id)
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("{id} is stored"));
        if rec.summary.status == status {
            return rec;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {id} to be {status:?}: {:?} after {} attempts, last error {:?}",
            rec.summary.status,
            rec.summary.attempts,
            rec.last_error
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every event in a test environment's store, newest first (read-only access).
pub fn stored_events(env: &Env) -> Vec<sluice::store::EventSummary> {
    let ro = sluice::store::sqlite::SqliteStore::open_read_only(&env.db())
        .expect("store opens read-only");
    sluice::store::sqlite::list_summaries(
        &ro,
        &sluice::store::ListFilter {
            limit: 0,
            ..Default::default()
        },
    )
    .expect("list")
}

/// A `sluice serve` child process that is killed and reaped when dropped, so a
/// failed assertion never leaves a server running after the test.
pub struct ServeChild {
    child: Child,
    /// `http://127.0.0.1:PORT`, as the server printed it.
    pub base: String,
    /// The admin API's base URL (`http://127.0.0.1:PORT/v1`), when the
    /// server printed one before its address.
    pub admin: String,
    /// The address, once the server prints it.
    listening: std::sync::mpsc::Receiver<String>,
    /// The admin API's URL, once the server prints it.
    admin_listening: std::sync::mpsc::Receiver<String>,
}

impl ServeChild {
    /// Starts `sluice serve --config PATH` and waits (at most 60 s) for the
    /// address it prints. `RUST_LOG` is `warn`; stderr goes to the test's.
    pub fn spawn(config: &Path) -> ServeChild {
        ServeChild::spawn_with(config, &[])
    }

    /// As [`ServeChild::spawn`], with extra environment variables.
    pub fn spawn_with(config: &Path, env: &[(&str, &str)]) -> ServeChild {
        ServeChild::spawn_command(serve_command(config, env))
    }

    /// Starts `sluice serve --config PATH` as [`ServeChild::spawn`] does but
    /// returns at once, for a test that acts while the server starts up
    /// (`base` is empty).
    pub fn start(config: &Path) -> ServeChild {
        ServeChild::start_command(serve_command(config, &[]))
    }

    /// Starts `cmd`, which runs `sluice serve` (itself or by `exec`, so the
    /// child's pid is the server's), and waits for its address as
    /// [`ServeChild::spawn`] does. stdout is taken; stderr is as `cmd` says.
    pub fn spawn_command(cmd: Command) -> ServeChild {
        let mut guard = ServeChild::start_command(cmd);
        guard.base = guard
            .listening
            .recv_timeout(Duration::from_secs(60))
            .expect("sluice serve printed its address within 60 s");
        // Printed before the gateway's address, so it is in by now.
        guard.admin = guard.admin_listening.try_recv().unwrap_or_default();
        guard
    }

    /// Starts `cmd` as [`ServeChild::spawn_command`] does, without waiting.
    #[allow(clippy::zombie_processes)] // reaped in Drop
    fn start_command(mut cmd: Command) -> ServeChild {
        cmd.stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn sluice");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let (admin_tx, admin_rx) = std::sync::mpsc::channel();
        // From here on the guard owns the process: a panic below still kills it.
        let guard = ServeChild {
            child,
            base: String::new(),
            admin: String::new(),
            listening: rx,
            admin_listening: admin_rx,
        };
        std::thread::spawn(move || {
            let mut sent = false;
            // Keep draining stdout so the child never blocks on a full pipe.
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("admin API on ") {
                    let url = rest.split_whitespace().next().unwrap_or_default();
                    let _ = admin_tx.send(url.to_string());
                }
                if !sent && let Some(addr) = line.strip_prefix("sluice listening on ") {
                    let _ = tx.send(addr.to_string());
                    sent = true;
                }
            }
        });
        guard
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server as an operator does (SIGTERM) and waits (at most
    /// 20 s) for it to finish its writes and exit cleanly.
    pub fn stop(&mut self) {
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(term.success(), "kill -TERM {}", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for sluice serve") {
                assert!(status.success(), "sluice serve exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sluice serve exits within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the server and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sluice serve --config PATH` with `RUST_LOG=warn`, stderr to the test's,
/// and extra environment variables.
fn serve_command(config: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["serve", "--config"])
        .arg(config)
        .env_remove("SLUICE_CONFIG")
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A component exporting `classify` whose core function is `body` (it gets
/// the event handle in local 0 and returns a pointer to the answer), with
/// `pages` of linear memory, and `imports` (WAT import declarations) beside
/// the router's types. The types are the ones of `wit/`, imported from
/// `sluice:router/types` as the WIT `use` does.
pub fn wat_classifier(imports: &str, pages: u32, body: &str) -> Vec<u8> {
    let text = format!(
        r#"(component
  (import "sluice:router/types@0.1.0" (instance $types
    (export "event" (type (sub resource)))
    (type $p (enum "critical" "high" "medium" "low"))
    (export "priority" (type $pe (eq $p)))
    (type $r (record
      (field "agent" string)
      (field "workflow" (option string))
      (field "priority" $pe)
      (field "reason" string)
      (field "labels" (list string))))
    (export "route" (type $re (eq $r)))
    (type $d (variant (case "routes" (list $re)) (case "ignore" string)))
    (export "decision" (type (eq $d)))
  ))
  {imports}
  (alias export $types "event" (type $event))
  (alias export $types "decision" (type $decision))
  (core module $m
    (memory (export "memory") {pages})
    (func (export "classify") (param i32) (result i32)
      (local $i i32) (local $p i32)
      {body}))
  (core instance $i (instantiate $m))
  (func $classify (param "ev" (own $event)) (result (result $decision (error string)))
    (canon lift (core func $i "classify") (memory $i "memory")))
  (instance $classifier (export "classify" (func $classify)))
  (export "sluice:router/classifier@0.1.0" (instance $classifier))
)"#
    );
    wat::parse_str(&text).expect("the WAT component parses")
}

/// Runs the `sluice` binary with `args` (no `SLUICE_CONFIG` from the caller's
/// environment) and returns what it did.
pub fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env_remove("SLUICE_CONFIG")
        .output()
        .expect("run sluice")
}

/// POSTs a signed request to `{base}/hooks/{source}`, expects `202`, and
/// returns the new event's id.
pub async fn post_accepted(
    client: &Client<HttpConnector, Full<Bytes>>,
    base: &str,
    source: &str,
    signed: &Signed,
) -> String {
    let (status, resp) = post(
        client,
        &format!("{base}/hooks/{source}"),
        &signed.headers,
        signed.body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{source}: {resp}");
    resp["id"].as_str().expect("an id").to_owned()
}

/// Runs `sluice send` for one payload file to `url` (as `--event` when
/// given) and expects `202`.
pub fn send_accepted(config: &str, url: &str, source: &str, event: Option<&str>, file: &Path) {
    let mut args = vec!["send", "--config", config, "--source", source, "--url", url];
    if let Some(event) = event {
        args.extend(["--event", event]);
    }
    let file = file.to_str().expect("UTF-8 path");
    args.push(file);
    let sent = sluice(&args);
    let out = String::from_utf8_lossy(&sent.stdout).into_owned();
    assert!(
        sent.status.success() && out.starts_with("202"),
        "{out} {}",
        String::from_utf8_lossy(&sent.stderr)
    );
}

/// The whole gateway in-process (`sluice::serve`: intake and the router
/// workers) on a loopback port, routing with the rules its config loads.
pub struct RoutingGateway {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The gateway's store.
    pub store: std::sync::Arc<dyn Store>,
    /// The same store's dispatch role.
    pub dispatch: std::sync::Arc<dyn sluice::store::dispatch::DispatchStore>,
    /// The rule set the workers route with.
    pub rules: sluice::rules::SharedRuleSet,
    /// `http://127.0.0.1:PORT` of the admin API, when started with it.
    pub admin: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

impl RoutingGateway {
    /// Loads the config's rules (compile cache under its data dir) and serves.
    pub async fn start(config: Config) -> RoutingGateway {
        RoutingGateway::start_with(config, false).await
    }

    /// [`RoutingGateway::start`] with the admin API on a loopback port.
    pub async fn start_with_admin(config: Config) -> RoutingGateway {
        RoutingGateway::start_with(config, true).await
    }

    async fn start_with(config: Config, admin: bool) -> RoutingGateway {
        let cache = config.rules.cache_dir(&config.base_dir, config.data_dir());
        let engine = sluice::rules::wasm::WasmEngine::new(Some(cache)).expect("wasm engine");
        let set = config.load_rules(&engine).unwrap_or_else(|e| panic!("{e}"));
        let rules = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(set));
        let listener = TcpListener::bind(config.server.listen).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (state, _) = AppState::build(config).expect("state builds");
        let store = state.store.clone();
        let dispatch = state.dispatch.clone();
        let admin_server = if admin {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
            Some(sluice::admin::AdminServer::with_listener(&state.config, l).expect("admin token"))
        } else {
            None
        };
        let admin = admin_server
            .as_ref()
            .map(|a| format!("http://{}", a.local_addr().expect("admin addr")));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(sluice::serve_with_admin(
            state,
            rules.clone(),
            listener,
            admin_server,
            async move {
                let _ = stopped.await;
            },
        ));
        RoutingGateway {
            base: format!("http://{addr}"),
            store,
            dispatch,
            rules,
            admin,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops intake and the workers; returns once `serve` has closed the store.
    pub async fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        tokio::time::timeout(
            Duration::from_secs(10),
            self.server.take().expect("running"),
        )
        .await
        .expect("serve returns after shutdown")
        .expect("join")
        .expect("serve ran cleanly");
    }
}

impl Drop for RoutingGateway {
    fn drop(&mut self) {
        if let Some(t) = self.server.take() {
            t.abort();
        }
    }
}

/// The `/metrics` text of the gateway at `base` (`http://127.0.0.1:PORT`).
pub async fn metrics_text(client: &Client<HttpConnector, Full<Bytes>>, base: &str) -> String {
    let req = Request::get(format!("{base}/metrics"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = client.request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("UTF-8 metrics")
}
