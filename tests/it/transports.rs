//! The four agent transports, each against the real thing: an axum agent on
//! 127.0.0.1 (and a raw TCP one that never stops answering), real programs,
//! a real `nats-server -js`, real files. Every attempt is bounded by the
//! agent's `timeout`, and every test by `WITHIN`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde_json::json;
use sluice::config::Config;
use sluice::dispatch::envelope::sign;
use sluice::dispatch::transport::{self, Outcome, Request, Transport};
use sluice::secret::{Generate, Secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// No test here may take longer.
const WITHIN: Duration = Duration::from_secs(30);

/// A signed request for `body`, with key `key`.
fn request(body: &[u8], key: &str) -> Request {
    let secret = Secret::new(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_vec());
    let headers = sign(body, key, 1_767_225_600, &[secret]).unwrap();
    Request {
        body: Bytes::copy_from_slice(body),
        headers,
        idempotency_key: key.to_string(),
    }
}

fn envelope(n: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "event": {"id": format!("evt_{n}"), "payload": {"text": "x".repeat(n % 7)}},
        "route": {"agent": "a"},
        "attempt": 1
    }))
    .unwrap()
}

/// A config with a data dir under `dir` and `agents` (TOML under
/// `[agents.NAME]` tables).
fn config(dir: &Path, agents: &str) -> Config {
    let text = format!(
        "[server]\ndata_dir = {:?}\n\n{agents}",
        dir.join("data").display().to_string()
    );
    Config::parse(&text, "test.toml").expect("test config parses")
}

/// The transport of agent `name` in `config`.
fn build(config: &Config, name: &str) -> Arc<dyn Transport> {
    transport::build(name, &config.agents[name], config, Generate::IfMissing)
        .unwrap_or_else(|e| panic!("agent {name} builds: {e}"))
}

async fn send(t: &dyn Transport, req: &Request) -> (Outcome, Duration) {
    let start = Instant::now();
    let outcome = tokio::time::timeout(WITHIN, t.send(req))
        .await
        .expect("the attempt ends in time");
    (outcome, start.elapsed())
}

fn assert_retry(outcome: &Outcome, status: Option<u16>, contains: &str) {
    match outcome {
        Outcome::Retry {
            status: s, error, ..
        } => {
            assert_eq!(*s, status, "{outcome:?}");
            assert!(error.contains(contains), "{error:?} lacks {contains:?}");
        }
        _ => panic!("expected retry ({contains}), got {outcome:?}"),
    }
}

fn assert_final(outcome: &Outcome, status: Option<u16>, contains: &str) {
    match outcome {
        Outcome::Final {
            status: s, error, ..
        } => {
            assert_eq!(*s, status, "{outcome:?}");
            assert!(error.contains(contains), "{error:?} lacks {contains:?}");
        }
        _ => panic!("expected final ({contains}), got {outcome:?}"),
    }
}

// ---------------------------------------------------------------- http

/// What the agent server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// An axum agent on 127.0.0.1:0 that records every request and answers by
/// path: `/ok` 200 with JSON, `/text` 200 with text, `/limited` 429 with
/// `Retry-After: 7`, `/down` 503, `/busy` 408, `/missing` 404, `/moved`
/// 302, `/slow` after 5 s.
async fn agent_server() -> (SocketAddr, Log) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            async move {
                let path = uri.path().to_string();
                seen.lock().unwrap().push(Seen {
                    path: path.clone(),
                    headers,
                    body,
                });
                match path.as_str() {
                    "/ok" => (
                        [("content-type", "application/json")],
                        r#"{"ok":true,"next":"triage"}"#,
                    )
                        .into_response(),
                    "/text" => "thanks".into_response(),
                    "/limited" => (
                        StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after", "7")],
                        "slow down",
                    )
                        .into_response(),
                    "/down" => (StatusCode::SERVICE_UNAVAILABLE, "token=hunter2").into_response(),
                    "/busy" => StatusCode::REQUEST_TIMEOUT.into_response(),
                    "/missing" => (StatusCode::NOT_FOUND, "no such hook").into_response(),
                    "/moved" => (StatusCode::FOUND, [("location", "http://169.254.169.254/")])
                        .into_response(),
                    "/slow" => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        "late".into_response()
                    }
                    _ => StatusCode::IM_A_TEAPOT.into_response(),
                }
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, log)
}

/// A raw HTTP/1.1 agent that answers 200 with a chunked JSON-looking body
/// that never ends, and reports how many body bytes it got out before the
/// client hung up.
async fn endless_server() -> (SocketAddr, tokio::sync::oneshot::Receiver<u64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        // Read the request head and its small body.
        let mut buf = vec![0u8; 64 * 1024];
        let _ = sock.read(&mut buf).await;
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
        sock.write_all(head.as_bytes()).await.unwrap();
        let chunk = format!("{:x}\r\n{}\r\n", 16 * 1024, "[".repeat(16 * 1024));
        let mut sent = 0u64;
        while sock.write_all(chunk.as_bytes()).await.is_ok() {
            sent += 16 * 1024;
            if sent > 1 << 30 {
                break;
            }
        }
        let _ = tx.send(sent);
    });
    (addr, rx)
}

fn http_agent(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[agents.{name}]\nkind = \"http\"\nurl = \"{url}\"\nallow_loopback = true\ntimeout = \"1s\"\n{extra}\n"
    )
}

#[tokio::test]
async fn http_answers_are_classified_and_headers_arrive() {
    let (addr, log) = agent_server().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "tok-123\n").unwrap();
    let mut agents = String::new();
    for path in [
        "ok", "text", "limited", "down", "busy", "missing", "moved", "slow",
    ] {
        let extra = format!(
            "bearer = {{ file = {:?} }}\n[agents.{path}.headers]\nx-team = \"core\"\n",
            token_file.display().to_string()
        );
        agents.push_str(&http_agent(path, &format!("http://{addr}/{path}"), &extra));
    }
    let config = config(dir.path(), &agents);
    let body = envelope(3);
    let req = request(&body, "msg_0001");

    let (ok, _) = send(&*build(&config, "ok"), &req).await;
    assert_eq!(
        ok,
        Outcome::Delivered {
            status: Some(200),
            answer: Some(json!({"ok": true, "next": "triage"})),
            response_bytes: 27,
        }
    );
    let (text, _) = send(&*build(&config, "text"), &req).await;
    assert_eq!(
        text,
        Outcome::Delivered {
            status: Some(200),
            answer: None,
            response_bytes: 6,
        }
    );
    let (limited, _) = send(&*build(&config, "limited"), &req).await;
    match &limited {
        Outcome::Retry {
            status,
            retry_after,
            error,
            ..
        } => {
            assert_eq!(*status, Some(429));
            assert_eq!(*retry_after, Some(Duration::from_secs(7)));
            assert_eq!(error, "HTTP 429 Too Many Requests");
        }
        other => panic!("429 should retry: {other:?}"),
    }
    let (down, _) = send(&*build(&config, "down"), &req).await;
    assert_retry(&down, Some(503), "HTTP 503 Service Unavailable");
    assert!(
        !down.error().unwrap().contains("hunter2"),
        "no body in errors"
    );
    let (busy, _) = send(&*build(&config, "busy"), &req).await;
    assert_retry(&busy, Some(408), "HTTP 408");
    let (missing, _) = send(&*build(&config, "missing"), &req).await;
    assert_final(&missing, Some(404), "HTTP 404 Not Found");
    let (moved, _) = send(&*build(&config, "moved"), &req).await;
    assert_final(&moved, Some(302), "redirects are not followed");
    let (slow, took) = send(&*build(&config, "slow"), &req).await;
    assert_retry(&slow, None, "timed out after 1s");
    assert!(
        took < Duration::from_secs(3),
        "bounded by the timeout: {took:?}"
    );

    let seen = log.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        8,
        "one request per agent, the redirect not followed"
    );
    for s in &seen {
        assert_eq!(s.body, body, "{}: body bytes arrive as sent", s.path);
        let h = |name: &str| {
            s.headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        for (name, value) in &req.headers {
            assert_eq!(&h(name), value, "{}: {name}", s.path);
        }
        assert_eq!(h("webhook-id"), "msg_0001");
        assert!(h("webhook-signature").starts_with("v1,"));
        assert_eq!(h("authorization"), "Bearer tok-123");
        assert_eq!(h("x-team"), "core");
        assert_eq!(h("content-type"), "application/json");
        assert_eq!(
            h("user-agent"),
            format!("sluice/{}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[tokio::test]
async fn http_answer_is_capped_and_the_rest_not_read() {
    let (addr, sent) = endless_server().await;
    let dir = tempfile::tempdir().unwrap();
    let agents = http_agent(
        "big",
        &format!("http://{addr}/"),
        "timeout = \"10s\"\nmax_response_bytes = 1000",
    )
    .replace("timeout = \"1s\"\n", "");
    let config = config(dir.path(), &agents);
    let (outcome, took) = send(&*build(&config, "big"), &request(&envelope(1), "msg_big")).await;
    assert_eq!(
        outcome,
        Outcome::Delivered {
            status: Some(200),
            answer: None,
            response_bytes: 1000,
        }
    );
    assert!(
        took < Duration::from_secs(5),
        "stopped at the cap, not the timeout: {took:?}"
    );
    let sent = tokio::time::timeout(WITHIN, sent).await.unwrap().unwrap();
    assert!(
        sent < 64 << 20,
        "the connection was dropped at the cap; the agent got {sent} bytes out"
    );
}

#[tokio::test]
async fn http_generated_bearer_lands_in_its_own_file() {
    let (addr, log) = agent_server().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &http_agent(
            "gen",
            &format!("http://{addr}/ok"),
            "bearer = { generate = true }",
        ),
    );
    let (outcome, _) = send(&*build(&config, "gen"), &request(b"{}", "msg_gen")).await;
    assert_eq!(outcome.kind(), "delivered", "{outcome:?}");
    let file = dir.path().join("data/secrets/agent-gen.bearer.key");
    let token = std::fs::read_to_string(&file).expect("generated token file");
    let seen = log.lock().unwrap()[0].headers["authorization"].clone();
    assert_eq!(seen.to_str().unwrap(), format!("Bearer {}", token.trim()));
}

#[tokio::test]
async fn http_config_errors_name_the_key_not_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[agents.a.headers]\nAuthorization = \"Bearer s3cret\"",
            "agents.a.headers.Authorization: sluice sets this header itself",
        ),
        (
            "[agents.a.headers]\nwebhook-id = \"x\"",
            "agents.a.headers.webhook-id",
        ),
        (
            "bearer = { env = \"SLUICE_TEST_NO_SUCH_TOKEN_VAR\" }",
            "agents.a.bearer: env var SLUICE_TEST_NO_SUCH_TOKEN_VAR is not set",
        ),
    ];
    for (extra, want) in cases {
        let config = config(dir.path(), &http_agent("a", "http://127.0.0.1:9/", extra));
        let err = transport::build("a", &config.agents["a"], &config, Generate::Preview)
            .err()
            .unwrap_or_else(|| panic!("{extra} should be refused"));
        assert!(err.contains(want), "{err:?} lacks {want:?}");
        assert!(!err.contains("s3cret"), "{err:?} shows a secret");
    }
}

#[tokio::test]
async fn http_guard_refuses_metadata_and_unallowed_loopback() {
    let (addr, log) = agent_server().await;
    let port = addr.port();
    let dir = tempfile::tempdir().unwrap();
    let agents = format!(
        "{}{}{}{}{}{}",
        http_agent("meta", "http://169.254.169.254/latest/meta-data/", ""),
        http_agent("meta_tls", "https://169.254.169.254/", ""),
        http_agent("tls_plain", &format!("https://127.0.0.1:{port}/ok"), ""),
        http_agent("open", &format!("http://127.0.0.1:{port}/ok"), ""),
        http_agent("shut", &format!("http://127.0.0.1:{port}/ok"), "")
            .replace("allow_loopback = true\n", ""),
        http_agent("named", &format!("http://localhost:{port}/ok"), "")
            .replace("allow_loopback = true\n", ""),
    );
    let config = config(dir.path(), &agents);
    let req = request(b"{}", "msg_ssrf");

    let (meta, _) = send(&*build(&config, "meta"), &req).await;
    assert_final(&meta, None, "169.254.169.254 (cloud metadata); refused");
    let (meta_tls, _) = send(&*build(&config, "meta_tls"), &req).await;
    assert_final(&meta_tls, None, "(cloud metadata); refused");
    let (shut, _) = send(&*build(&config, "shut"), &req).await;
    assert_final(&shut, None, "127.0.0.1 (loopback); refused");
    let (named, _) = send(&*build(&config, "named"), &req).await;
    assert_final(&named, None, "agent URL host localhost resolved to");
    assert!(
        log.lock().unwrap().is_empty(),
        "no refused request reached the agent"
    );

    let (open, _) = send(&*build(&config, "open"), &req).await;
    assert_eq!(open.kind(), "delivered", "{open:?}");
    // TLS to a plain-HTTP agent: the handshake fails, which may pass later.
    let (tls, _) = send(&*build(&config, "tls_plain"), &req).await;
    assert_retry(&tls, None, "cannot connect");
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn http_connection_refused_is_a_retry() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &http_agent("gone", &format!("http://{addr}/"), ""),
    );
    let (outcome, _) = send(&*build(&config, "gone"), &request(b"{}", "msg_gone")).await;
    assert_retry(&outcome, None, "cannot connect");
    assert!(outcome.error().unwrap().contains("refused"), "{outcome:?}");
}

// ---------------------------------------------------------------- exec

fn exec_agent(name: &str, command: &[&str], extra: &str) -> String {
    format!("[agents.{name}]\nkind = \"exec\"\ncommand = {command:?}\ntimeout = \"2s\"\n{extra}\n")
}

#[tokio::test]
async fn exec_runs_the_program_with_stdin_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stdin.json");
    let script = format!("cat > '{}'; echo '{{\"ok\":true}}'", file.display());
    let agents = format!(
        "{}{}{}{}",
        exec_agent("cat", &["/bin/sh", "-c", &script], "env_pass = [\"PATH\"]"),
        exec_agent("fail", &["/bin/sh", "-c", "exit 3"], ""),
        exec_agent("missing", &["/no/such/program"], ""),
        exec_agent(
            "loud",
            &["/bin/sh", "-c", "head -c 5000000 /dev/zero; echo done >&2"],
            "env_pass = [\"PATH\"]\nmax_response_bytes = 100",
        ),
    );
    let config = config(dir.path(), &agents);
    let body = envelope(5);
    let req = request(&body, "msg_exec");

    let (outcome, _) = send(&*build(&config, "cat"), &req).await;
    assert_eq!(
        outcome,
        Outcome::Delivered {
            status: None,
            answer: Some(json!({"ok": true})),
            response_bytes: 12,
        }
    );
    assert_eq!(std::fs::read(&file).unwrap(), body, "stdin is the body");

    let (fail, _) = send(&*build(&config, "fail"), &req).await;
    assert_retry(&fail, None, "exit status 3");
    let (missing, _) = send(&*build(&config, "missing"), &req).await;
    assert_final(&missing, None, "cannot start /no/such/program");
    let (loud, took) = send(&*build(&config, "loud"), &req).await;
    assert_eq!(
        loud,
        Outcome::Delivered {
            status: None,
            answer: None,
            response_bytes: 100,
        }
    );
    assert!(
        took < Duration::from_secs(2),
        "the rest was drained: {took:?}"
    );
}

#[tokio::test]
async fn exec_environment_is_only_what_was_named() {
    let dir = tempfile::tempdir().unwrap();
    let req = request(b"{}", "msg_env");
    // `env` run by a shell that sends its output to a file (the answer is
    // not JSON, so it would not come back).
    let out = dir.path().join("env.txt");
    let agents = exec_agent(
        "env",
        &[
            "/bin/sh",
            "-c",
            &format!("/usr/bin/env > '{}'", out.display()),
        ],
        "env_pass = [\"PATH\", \"SLUICE_TEST_SURELY_UNSET\"]\n[agents.env.env]\nGREETING = \"hello world\"",
    );
    let config = config(dir.path(), &agents);
    let (outcome, _) = send(&*build(&config, "env"), &req).await;
    assert_eq!(outcome.kind(), "delivered", "{outcome:?}");
    let text = std::fs::read_to_string(&out).unwrap();
    let got: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        // The shell itself sets these three.
        .filter(|(k, _)| !matches!(*k, "PWD" | "SHLVL" | "_"))
        .collect();
    let path = std::env::var("PATH").unwrap();
    let mut want = BTreeMap::from([("GREETING", "hello world"), ("PATH", path.as_str())]);
    for (name, value) in &req.headers {
        let var = name.to_ascii_uppercase().replace('-', "_");
        want.insert(Box::leak(var.into_boxed_str()), value.as_str());
    }
    assert_eq!(got, want);
    assert!(want.contains_key("WEBHOOK_SIGNATURE"));
}

#[tokio::test]
async fn exec_timeout_kills_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > '{}'; exec /bin/sleep 30", pid_file.display());
    let agents = exec_agent("sleepy", &["/bin/sh", "-c", &script], "")
        .replace("timeout = \"2s\"", "timeout = \"500ms\"");
    let config = config(dir.path(), &agents);
    let (outcome, took) = send(&*build(&config, "sleepy"), &request(b"{}", "msg_sleep")).await;
    assert_retry(
        &outcome,
        None,
        "timed out after 500ms; the program was killed",
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let proc = PathBuf::from(format!("/proc/{}", pid.trim()));
    assert!(!proc.exists(), "the program (pid {}) is gone", pid.trim());
}

// ---------------------------------------------------------------- nats

fn nats_agent(name: &str, server: &str, subject: &str) -> String {
    format!(
        "[agents.{name}]\nkind = \"nats\"\nserver = \"{server}\"\nsubject = \"{subject}\"\ntimeout = \"2s\"\n"
    )
}

#[tokio::test]
async fn nats_publishes_to_jetstream_once_per_key() {
    let server = crate::nats_cluster::Nats::single().await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "DELIVERIES".into(),
            subjects: vec!["agents.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let agents = format!(
        "{}{}",
        nats_agent("bus", &server.url(), "agents.bus"),
        nats_agent("nowhere", &server.url(), "unstreamed.bus"),
    );
    let config = config(dir.path(), &agents);
    let bus = build(&config, "bus");
    let body = envelope(4);
    let req = request(&body, "msg_nats_1");

    let (outcome, _) = send(&*bus, &req).await;
    assert_eq!(
        outcome,
        Outcome::Delivered {
            status: None,
            answer: None,
            response_bytes: 0,
        }
    );
    let msg = stream.get_raw_message(1).await.unwrap();
    assert_eq!(msg.subject.as_str(), "agents.bus");
    assert_eq!(msg.payload, body);
    let headers = msg.headers;
    assert_eq!(headers.get("Nats-Msg-Id").unwrap().as_str(), "msg_nats_1");
    for (name, value) in &req.headers {
        assert_eq!(headers.get(*name).unwrap().as_str(), value, "{name}");
    }

    // The same key again is acked and dropped; another key is kept.
    let (again, _) = send(&*bus, &req).await;
    assert_eq!(again.kind(), "delivered", "{again:?}");
    let mut info = js.get_stream("DELIVERIES").await.unwrap();
    assert_eq!(info.info().await.unwrap().state.messages, 1);
    let (other, _) = send(&*bus, &request(&body, "msg_nats_2")).await;
    assert_eq!(other.kind(), "delivered", "{other:?}");
    assert_eq!(info.info().await.unwrap().state.messages, 2);

    let (nowhere, _) = send(&*build(&config, "nowhere"), &req).await;
    assert_retry(
        &nowhere,
        None,
        "no JetStream stream covers subject unstreamed.bus",
    );
}

#[tokio::test]
async fn nats_without_a_server_is_a_retry() {
    // Fail loudly here too when the binary is missing, like the test above.
    let _ = crate::nats_cluster::binary();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &nats_agent("bus", &format!("nats://127.0.0.1:{port}"), "agents.bus"),
    );
    let bus = build(&config, "bus");
    let (outcome, took) = send(&*bus, &request(b"{}", "msg_x")).await;
    assert_eq!(outcome.kind(), "retry", "{outcome:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

// ---------------------------------------------------------------- outbox

#[tokio::test]
async fn outbox_lines_never_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "[agents.local]\nkind = \"outbox\"\n");
    // Two transports of one agent (as across a reload), writing at once.
    let a = build(&config, "local");
    let b = build(&config, "local");
    let big = |n: usize| {
        serde_json::to_vec(
            &json!({"event": {"id": format!("evt_{n}"), "pad": "y".repeat(200_000)}, "attempt": 1}),
        )
        .unwrap()
    };
    let mut tasks = Vec::new();
    for n in 0..40 {
        let t = if n % 2 == 0 { a.clone() } else { b.clone() };
        let req = request(&big(n), &format!("msg_{n}"));
        tasks.push(tokio::spawn(async move { t.send(&req).await }));
    }
    for t in tasks {
        let outcome = tokio::time::timeout(WITHIN, t).await.unwrap().unwrap();
        assert_eq!(
            outcome,
            Outcome::Delivered {
                status: None,
                answer: None,
                response_bytes: 0,
            }
        );
    }
    let text = std::fs::read_to_string(dir.path().join("data/outbox/local.jsonl")).unwrap();
    let mut ids = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("every line is JSON");
        assert_eq!(v["agent"], "local");
        assert!(v["at_ms"].as_i64().unwrap() > 1_700_000_000_000);
        let id = v["envelope"]["event"]["id"].as_str().unwrap().to_string();
        let n: usize = id.trim_start_matches("evt_").parse().unwrap();
        assert_eq!(v["headers"]["webhook-id"], format!("msg_{n}"));
        assert!(
            v["headers"]["webhook-signature"]
                .as_str()
                .unwrap()
                .starts_with("v1,")
        );
        assert_eq!(serde_json::to_vec(&v["envelope"]).unwrap(), big(n));
        ids.push(n);
    }
    ids.sort();
    assert_eq!(ids, (0..40).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_outbox_line_stays_one_line_for_a_pretty_printed_payload() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "[agents.local]\nkind = \"outbox\"\n");
    let local = build(&config, "local");
    let body = b"{\"event\": {\n  \"id\": \"evt_1\",\r\n  \"text\": \"a\\nb\"\n}, \"attempt\": 1}";
    let outcome = local.send(&request(body, "msg_1")).await;
    assert_eq!(outcome.kind(), "delivered", "{outcome:?}");
    let text = std::fs::read_to_string(dir.path().join("data/outbox/local.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
    let sent: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        v["envelope"], sent,
        "the same JSON, escapes inside strings kept"
    );
}
