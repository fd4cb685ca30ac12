//! The admin API over real loopback: the bearer token, the OpenAPI document
//! against the routes, an event's detail with its decision and deliveries,
//! replay, agent pause, the dead-letter retry of an unknown id, the sources'
//! intake record, the tail; and the operator commands run as the real binary
//! against a live `sluice serve`.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use sluice::event::EventStatus;

use crate::support::{
    ADMIN_TOKEN, Env, RoutingGateway, ServeChild, client, corpus, post, post_accepted, sluice,
    until_status, with_flipped_byte,
};

/// A test config serving the shipped rules (they route GitHub issues to
/// `issue-triage`).
fn shipped_env() -> Env {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    Env::new(&format!(
        "\n[rules]\ndir = {:?}\ncache_dir = \"cache\"\n{}",
        shipped.display().to_string(),
        crate::support::shipped_grants()
    ))
}

/// One admin request: status, headers and JSON body (or null).
pub async fn call(
    method: Method,
    url: &str,
    token: Option<&str>,
) -> (StatusCode, http::HeaderMap, Value) {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        client().request(req.body(Full::new(Bytes::new())).expect("request")),
    )
    .await
    .expect("answered in time")
    .expect("response");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn get(url: &str) -> Value {
    let (status, _, body) = call(Method::GET, url, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "GET {url}: {body}");
    body
}

/// Polls `GET url` until `ok` holds of the answer (at most 20 s).
async fn until(url: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = get(url).await;
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within 20 s: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn issue_opened() -> Bytes {
    Bytes::from(
        std::fs::read(corpus().join("github/issues/opened.payload.json")).expect("corpus payload"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_the_token_and_shows_replays_pauses_and_sources() {
    let env = shipped_env();
    let gw = RoutingGateway::start_with_admin(env.config()).await;
    let admin = gw.admin.clone().expect("admin listener");
    let url = |p: &str| format!("{admin}{p}");

    // The token: missing and wrong get the same 401; right gets in.
    let (status, headers, missing) = call(Method::GET, &url("/v1/events"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
    let wrong_token = "not-the-admin-token-at-all-000000";
    let (status, _, wrong) = call(Method::GET, &url("/v1/events"), Some(wrong_token)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing, wrong);
    assert!(!wrong.to_string().contains(wrong_token));
    let (status, _, _) = call(Method::GET, &url("/v1/openapi.json"), None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the document needs the token too"
    );
    get(&url("/v1/events")).await;

    // The document lists every route served, and only those.
    let doc = get(&url("/v1/openapi.json")).await;
    let paths = doc["paths"].as_object().expect("paths");
    let mut documented = 0;
    for (path, ops) in paths {
        documented += ops.as_object().expect("ops").len();
        let _ = path;
    }
    let served = sluice::admin::served_routes();
    for (method, path) in &served {
        assert!(
            paths.get(*path).and_then(|o| o.get(*method)).is_some(),
            "{method} {path} is not documented"
        );
    }
    assert_eq!(
        documented,
        served.len(),
        "documented routes that are not served"
    );

    // An event routed: its detail shows the decision and the deliveries.
    let signed = env
        .signer("github")
        .sign("issues", &issue_opened())
        .expect("sign");
    let id = post_accepted(&client(), &gw.base, "github", &signed).await;
    until_status(gw.store.as_ref(), &id, EventStatus::Routed).await;
    let detail = until(&url(&format!("/v1/events/{id}")), "a delivery", |v| {
        v["deliveries"].as_array().is_some_and(|d| !d.is_empty())
    })
    .await;
    assert_eq!(detail["id"], id.as_str());
    assert_eq!(detail["decision"]["routes"][0]["agent"], "issue-triage");
    assert_eq!(detail["deliveries"][0]["agent"], "issue-triage");
    assert!(detail["deliveries"][0]["attempts"].is_array());
    assert_eq!(detail["payload"]["action"], "opened", "the body, as JSON");
    let first_key = detail["deliveries"][0]["idempotency_key"].clone();

    // Replay routes it again: a second decision queues a second delivery
    // with the same idempotency key.
    let (status, _, body) = call(
        Method::POST,
        &url(&format!("/v1/events/{id}/replay")),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let again = until(
        &url(&format!("/v1/events/{id}")),
        "a second delivery",
        |v| v["deliveries"].as_array().is_some_and(|d| d.len() == 2),
    )
    .await;
    for d in again["deliveries"].as_array().unwrap() {
        assert_eq!(d["idempotency_key"], first_key);
    }
    let (status, _, body) = call(
        Method::POST,
        &url("/v1/events/evt_nope/replay"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());

    // Pause and resume show in /v1/agents; an unknown agent is a 404.
    let paused = |v: &Value, name: &str| {
        v["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .map(|a| a["paused"].clone())
    };
    let (status, _, _) = call(
        Method::POST,
        &url("/v1/agents/issue-triage/pause"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let agents = get(&url("/v1/agents")).await;
    assert_eq!(paused(&agents, "issue-triage"), Some(Value::Bool(true)));
    assert_eq!(paused(&agents, "coordinator"), Some(Value::Bool(false)));
    call(
        Method::POST,
        &url("/v1/agents/issue-triage/resume"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(
        paused(&get(&url("/v1/agents")).await, "issue-triage"),
        Some(Value::Bool(false))
    );
    let (status, _, _) = call(
        Method::POST,
        &url("/v1/agents/nobody/pause"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Retrying a dead letter that does not exist.
    for unknown in ["dlv_999999", "evt_nope", "junk"] {
        let (status, _, _) = call(
            Method::POST,
            &url(&format!("/v1/dlq/{unknown}/retry")),
            Some(ADMIN_TOKEN),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}");
    }
    let (status, _, body) = call(Method::POST, &url("/v1/dlq/retry-all"), Some(ADMIN_TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["retried"], 0);

    // Sources: the stored count, and a forged request's refusal by class.
    let forged = with_flipped_byte(&signed, 10);
    let (status, _) = post(
        &client(),
        &format!("{}/hooks/github", gw.base),
        &forged.headers,
        forged.body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let sources = get(&url("/v1/sources")).await;
    let github = sources["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "github")
        .expect("github listed")
        .clone();
    assert_eq!(github["events"], 1);
    assert!(github["last_received_ms"].as_i64().is_some());
    assert_eq!(github["since_start"]["rejections"]["unverified"], 1);
    assert!(github["since_start"]["last_verification_failure"]["reason"].is_string());
    assert!(!sources.to_string().contains("gh-current-secret"));

    // Tail: from the present cursor, a new event shows up.
    let start = get(&url("/v1/tail")).await;
    let cursor = start["cursor"].as_str().expect("cursor").to_owned();
    let body = Bytes::from(
        issue_opened()
            .to_vec()
            .into_iter()
            .chain(*b" ")
            .collect::<Vec<u8>>(),
    );
    let next = env.signer("github").sign("issues", &body).expect("sign");
    let poll = tokio::spawn({
        let u = url(&format!("/v1/tail?after={cursor}&wait=8000"));
        async move { get(&u).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = post_accepted(&client(), &gw.base, "github", &next).await;
    let batch = poll.await.expect("tail");
    assert_eq!(batch["events"][0]["id"], second.as_str(), "{batch}");
    assert_ne!(batch["cursor"], cursor.as_str());

    // The rules, as /status/rules serves them.
    let rules = get(&url("/v1/rules")).await;
    assert!(rules["rules"].is_array(), "{rules}");
    assert!(
        rules["recorded"]["github-router"]["decisions"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "the first routing and the replay are recorded: {rules}"
    );

    gw.stop().await;
}

#[tokio::test]
async fn a_short_admin_token_is_refused_naming_the_key() {
    let env = Env::new("");
    std::fs::write(env.dir.path().join("admin.key"), "short").unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = sluice::admin::AdminServer::with_listener(&env.config(), l)
        .expect_err("a 5-byte token is refused")
        .to_string();
    assert!(err.contains("admin.token"), "{err}");
    assert!(!err.contains("short\""), "{err}");
}

/// Runs `sluice ARGS --config C --admin URL` and returns stdout; panics with
/// stderr when it fails.
fn run_ok(args: &[&str], config: &Path, admin: &str) -> String {
    let mut all: Vec<&str> = args.to_vec();
    let config = config.to_str().unwrap();
    all.extend(["--config", config, "--admin", admin]);
    let out = sluice(&all);
    assert!(
        out.status.success(),
        "sluice {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_work_against_a_live_server() {
    let env = shipped_env();
    let server = ServeChild::spawn(&env.config_path);
    assert!(
        server.admin.ends_with("/v1"),
        "admin URL printed: {:?}",
        server.admin
    );
    let admin = server.admin.clone();
    let signed = env
        .signer("github")
        .sign("issues", &issue_opened())
        .expect("sign");
    let id = post_accepted(&client(), &server.base, "github", &signed).await;

    let cfg = env.config_path.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    let deliveries = loop {
        let out = run_ok(
            &["deliveries", "ls", "--json", "--event", &id],
            &cfg,
            &admin,
        );
        let v = json_of(&out);
        if v.as_array().is_some_and(|a| !a.is_empty()) {
            break v;
        }
        assert!(Instant::now() < deadline, "a delivery of {id} within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(deliveries[0]["agent"], "issue-triage");
    assert_eq!(deliveries[0]["event_id"], id.as_str());

    let dlq = json_of(&run_ok(&["dlq", "ls", "--json"], &cfg, &admin));
    assert!(dlq.is_array(), "{dlq}");

    let out = run_ok(&["agents", "pause", "issue-triage"], &cfg, &admin);
    assert!(out.contains("paused"), "{out}");
    let agents = json_of(&run_ok(&["agents", "ls", "--json"], &cfg, &admin));
    let triage = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "issue-triage")
        .expect("listed");
    assert_eq!(triage["paused"], true);

    let sources = json_of(&run_ok(&["sources", "ls", "--json"], &cfg, &admin));
    let github = sources
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "github")
        .expect("listed");
    assert_eq!(github["events"], 1);

    // An unknown dead letter is an error naming it.
    let out = sluice(&[
        "dlq",
        "retry",
        "dlv_424242",
        "--config",
        cfg.to_str().unwrap(),
        "--admin",
        &admin,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));

    // No server: a clear error.
    drop(server);
    let out = sluice(&[
        "deliveries",
        "ls",
        "--config",
        cfg.to_str().unwrap(),
        "--admin",
        &admin,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is `sluice serve` running?"), "{err}");
}
