//! `sluice events export` and `sluice events import` as the real binary: a
//! gateway routes and delivers events (delivered, a finished workflow, a
//! dead delivery, one waiting to retry, an ignored event), is stopped, and
//! its export imported into a fresh data dir holds the same events, bodies,
//! decisions, delivery states and idempotency keys; the provider's copy
//! sent again to a server on the imported store is a duplicate; a second
//! import adds nothing; a bad line is refused by number; a body that is not
//! JSON comes back byte for byte.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};
use sluice::cli::send::Signed;

use crate::dispatch::{dispatch_env, http_agent};
use crate::support::{Env, ServeChild, client, post, sluice};

/// Outbox agents and two http agents at a closed port: one gives up at
/// once, one retries in an hour.
fn agents_env() -> Env {
    let dead = http_agent("dead", "http://127.0.0.1:9/", "max_attempts = 1");
    let later = http_agent(
        "later",
        "http://127.0.0.1:9/",
        "max_attempts = 5\nbackoff = \"1h\"\nmax_backoff = \"1h\"",
    );
    let env = dispatch_env(
        &format!("{dead}\n{later}"),
        "[workflows.two]\nsteps = [{ agent = \"first\" }, { agent = \"second\" }]\n",
    );
    env.declare_agents(&["inbox", "first", "second"]);
    env
}

fn config(env: &Env) -> String {
    env.config_path.to_str().expect("UTF-8 path").to_string()
}

/// Runs sluice and expects success; returns stdout and stderr.
fn ok(args: &[&str]) -> (String, String) {
    let out = sluice(args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "sluice {args:?}: {stderr}");
    (stdout, stderr)
}

/// Runs sluice and expects failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = sluice(args);
    assert!(!out.status.success(), "sluice {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The event lines of an export (the header checked and left out).
fn events_of(text: &str) -> Vec<Value> {
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().expect("a header line")).unwrap();
    assert_eq!(header["sluice_export"], 1, "{header}");
    lines
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The raw event lines of an export, header left out.
fn event_lines(text: &str) -> Vec<String> {
    text.lines().skip(1).map(str::to_string).collect()
}

fn export(env: &Env) -> String {
    ok(&["events", "export", "--config", &config(env)]).0
}

/// An exported event with the store's own numbering of deliveries and runs
/// taken out (an import numbers them afresh): a delivery's run is named by
/// its place among the event's runs.
fn normalized(event: &Value) -> Value {
    let mut e = event.clone();
    let runs: Vec<Value> = e["runs"].as_array().cloned().unwrap_or_default();
    let place = |name: &Value| runs.iter().position(|r| &r["id"] == name);
    if let Some(ds) = e["deliveries"].as_array_mut() {
        for d in ds {
            d["id"] = Value::Null;
            d["run"] = json!(place(&d["run"]));
        }
    }
    if let Some(rs) = e["runs"].as_array_mut() {
        for r in rs {
            r["id"] = Value::Null;
        }
    }
    e
}

/// Signs and posts one body to `/hooks/standard`; the request is kept to
/// be sent again.
async fn send(env: &Env, base: &str, body: String) -> (String, Signed) {
    let signed = env
        .signer("standard")
        .sign("test.event", &Bytes::from(body))
        .expect("sign");
    let (status, answer) = post(
        &client(),
        &format!("{base}/hooks/standard"),
        &signed.headers,
        signed.body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    (answer["id"].as_str().expect("an id").to_string(), signed)
}

fn by_id<'a>(events: &'a [Value], id: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["id"] == id)
        .unwrap_or_else(|| panic!("{id} exported"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_imported_into_a_fresh_store_holds_the_same_events_and_state() {
    let env = agents_env();
    let mut server = ServeChild::spawn(&env.config_path);
    let route = |agent: &str, extra: &str| {
        format!(r#"{{"agent": "{agent}", "priority": "high", "reason": "test"{extra}}}"#)
    };
    // Bodies as a sender writes them (spaces, key order, 1.50), not as
    // serde would: the export must carry these bytes.
    let bodies = [
        format!(
            r#"{{"type": "test.event",  "n": 1.50, "routes": [{}]}}"#,
            route("inbox", "")
        ),
        format!(
            r#"{{"type":"test.event","n":2,"routes":[{}]}}"#,
            route("first", r#", "workflow": "two""#)
        ),
        format!(
            r#"{{"type":"test.event","n":3,"routes":[{}]}}"#,
            route("dead", "")
        ),
        format!(
            r#"{{"type":"test.event","n":4,"routes":[{}]}}"#,
            route("later", r#", "ordering_key": "k1""#)
        ),
        r#"{"type":"test.event","n":5}"#.to_string(),
    ];
    let mut sent = Vec::new();
    for body in &bodies {
        sent.push(send(&env, &server.base, body.clone()).await);
    }
    let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();

    // The export reads the store while the server runs: wait for the state
    // every event settles in.
    let deadline = Instant::now() + Duration::from_secs(30);
    let settled = |events: &[Value]| {
        events.len() == 5
            && events.iter().all(|e| e["status"] == "routed")
            && by_id(events, &ids[0])["deliveries"][0]["status"] == "delivered"
            && by_id(events, &ids[1])["runs"][0]["state"] == "done"
            && by_id(events, &ids[2])["deliveries"][0]["status"] == "dead"
            && by_id(events, &ids[3])["deliveries"][0]["attempts"] == 1
            && by_id(events, &ids[3])["deliveries"][0]["status"] == "queued"
            && by_id(events, &ids[3])["deliveries"][0]["attempt_records"]
                .as_array()
                .is_some_and(|a| a.len() == 1)
    };
    loop {
        let events = events_of(&export(&env));
        if settled(&events) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events settled within 30 s: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop();

    let file = env.dir.path().join("backup.jsonl");
    let file_arg = file.to_str().unwrap().to_string();
    let (_, said) = ok(&[
        "events",
        "export",
        "--config",
        &config(&env),
        "--out",
        &file_arg,
    ]);
    assert!(said.contains("exported 5 events"), "{said}");
    assert!(!Path::new(&format!("{file_arg}.partial")).exists());
    let exported = std::fs::read_to_string(&file).unwrap();
    let a = events_of(&exported);
    assert_eq!(
        a.iter()
            .map(|e| e["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ids,
        "every event, oldest first"
    );
    // The bodies as sent, byte for byte (JSON text carried as it is).
    for (line, body) in event_lines(&exported).iter().zip(&bodies) {
        assert!(line.contains(&format!(r#""body":{body}"#)), "{line}");
    }
    let e0 = &a[0];
    assert_eq!(e0["deliveries"][0]["agent"], "inbox");
    let key = e0["deliveries"][0]["idempotency_key"].as_str().unwrap();
    assert!(!key.is_empty());
    assert_eq!(
        a[1]["runs"][0]["steps_done"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
            .len(),
        2,
        "both steps recorded: {}",
        a[1]
    );
    assert!(a[2]["deliveries"][0]["last_error"].is_string(), "{}", a[2]);
    assert_eq!(a[3]["deliveries"][0]["ordering_key"], "k1");
    assert_eq!(a[4]["decision"]["routes"], json!([]));
    assert!(a[4]["deliveries"].as_array().unwrap().is_empty());

    // Into a fresh data dir.
    let fresh = agents_env();
    let (said, _) = ok(&["events", "import", "--config", &config(&fresh), &file_arg]);
    assert!(
        said.contains("imported 5 events") && said.contains("0 already held"),
        "{said}"
    );
    let listed: Vec<Value> = serde_json::from_str(
        &ok(&[
            "events",
            "ls",
            "--config",
            &config(&fresh),
            "--limit",
            "100",
            "--json",
        ])
        .0,
    )
    .unwrap();
    let mut listed_ids: Vec<&str> = listed.iter().map(|e| e["id"].as_str().unwrap()).collect();
    listed_ids.reverse();
    assert_eq!(listed_ids, ids, "the same events, by id");
    let b_text = export(&fresh);
    let b = events_of(&b_text);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(normalized(x), normalized(y), "the same event and state");
    }
    // The bodies came through the second store's log byte for byte too.
    for (line, body) in event_lines(&b_text).iter().zip(&bodies) {
        assert!(line.contains(&format!(r#""body":{body}"#)), "{line}");
    }

    // Again: nothing added, nothing changed.
    let (said, _) = ok(&["events", "import", "--config", &config(&fresh), &file_arg]);
    assert!(
        said.contains("imported 0 events") && said.contains("5 already held"),
        "{said}"
    );
    assert_eq!(event_lines(&export(&fresh)), event_lines(&b_text));

    // A server on the imported store: the provider's copy sent again is a
    // duplicate of the imported event; routed events are not routed again,
    // delivered ones not delivered again.
    let mut server = ServeChild::spawn(&fresh.config_path);
    let (first_id, first) = &sent[0];
    let (status, answer) = post(
        &client(),
        &format!("{}/hooks/standard", server.base),
        &first.headers,
        first.body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["status"], "duplicate");
    assert_eq!(answer["id"], first_id.as_str());
    // One process per data dir: an import while it serves is refused.
    let err = fails(&["events", "import", "--config", &config(&fresh), &file_arg]);
    assert!(
        err.contains("in use") && err.contains("stop `sluice serve`"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.stop();
    assert_eq!(
        event_lines(&export(&fresh)),
        event_lines(&b_text),
        "serving the imported store changed nothing that was settled"
    );
    assert!(
        !fresh.dir.path().join("data/outbox/inbox.jsonl").exists(),
        "a delivered delivery is not sent again"
    );
}

/// A valid export line, routed, with `body`.
fn line(id: &str, delivery: &str, body: &[u8]) -> String {
    json!({
        "id": id,
        "source": "github",
        "provider": "github",
        "kind": "issues",
        "action": "opened",
        "delivery_id": delivery,
        "id_origin": "unsigned",
        "received_at_ms": 1_790_000_000_000i64,
        "headers": [["x-github-event", "issues"]],
        "body_encoding": "base64",
        "body": base64::engine::general_purpose::STANDARD.encode(body),
        "status": "routed",
        "attempts": 1,
    })
    .to_string()
}

const HEADER: &str = r#"{"sluice_export":1,"sluice_version":"0.1.0","exported_at_ms":0}"#;

#[test]
fn a_bad_line_or_an_unknown_format_is_refused_by_line_number() {
    let env = Env::new("");
    let cfg = config(&env);
    let dir = env.dir.path();
    let write = |name: &str, lines: &[&str]| {
        let path = dir.join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path.to_str().unwrap().to_string()
    };

    let newer = write("newer.jsonl", &[r#"{"sluice_export":2}"#]);
    let err = fails(&["events", "import", "--config", &cfg, &newer]);
    assert!(
        err.contains("newer.jsonl: line 1") && err.contains("export format 2"),
        "{err}"
    );
    let headless = write("headless.jsonl", &[&line("evt_a", "d-a", b"{}")]);
    let err = fails(&["events", "import", "--config", &cfg, &headless]);
    assert!(
        err.contains("line 1") && err.contains("not a sluice export"),
        "{err}"
    );

    let good = line("evt_a", "d-a", br#"{"a":1}"#);
    let broken = write("broken.jsonl", &[HEADER, &good, "{\"id\": \"evt_b\","]);
    let err = fails(&["events", "import", "--config", &cfg, &broken]);
    assert!(
        err.contains("broken.jsonl: line 3") && err.contains("1 events before it imported"),
        "{err}"
    );
    // The line before it is in; a body that does not match its hash is not.
    let mut tampered: Value = serde_json::from_str(&line("evt_c", "d-c", b"{}")).unwrap();
    tampered["body_sha256"] = json!("00".repeat(32));
    let tampered = write("tampered.jsonl", &[HEADER, &good, &tampered.to_string()]);
    let err = fails(&["events", "import", "--config", &cfg, &tampered]);
    assert!(
        err.contains("tampered.jsonl: line 3")
            && err.contains("evt_c")
            && err.contains("does not match the body"),
        "{err}"
    );
    let ids: Vec<String> = events_of(&export(&env))
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["evt_a"]);
}

#[test]
fn a_body_that_is_not_json_comes_back_byte_for_byte() {
    let bodies: [&[u8]; 3] = [
        b"\x00\x01not json at all\xff\xfe\r\n",
        b"{\n  \"pretty\": true\n}\n",
        br#"{"plain":"json"}"#,
    ];
    let file_text = [
        HEADER.to_string(),
        line("evt_bin", "d-1", bodies[0]),
        line("evt_pretty", "d-2", bodies[1]),
        line("evt_plain", "d-3", bodies[2]),
    ]
    .join("\n");
    let first = Env::new("");
    let path = first.dir.path().join("in.jsonl");
    std::fs::write(&path, file_text).unwrap();
    ok(&[
        "events",
        "import",
        "--config",
        &config(&first),
        path.to_str().unwrap(),
    ]);
    // Through a second store, so the bytes cross the log twice.
    let out = first.dir.path().join("out.jsonl");
    ok(&[
        "events",
        "export",
        "--config",
        &config(&first),
        "--out",
        out.to_str().unwrap(),
    ]);
    let second = Env::new("");
    ok(&[
        "events",
        "import",
        "--config",
        &config(&second),
        out.to_str().unwrap(),
    ]);
    let events = events_of(&export(&second));
    assert_eq!(events.len(), 3);
    for (e, body) in events.iter().zip(bodies) {
        let bytes = match e["body_encoding"].as_str() {
            Some("base64") => base64::engine::general_purpose::STANDARD
                .decode(e["body"].as_str().unwrap())
                .unwrap(),
            _ => e["body"].to_string().into_bytes(),
        };
        assert_eq!(bytes, body, "{e}");
    }
    assert_eq!(events[2]["body_encoding"], "json", "JSON text as JSON");
    assert_eq!(events[2]["body"], json!({"plain": "json"}));
    let hashed = events[0]["body_sha256"].as_str().unwrap();
    use sha2::Digest;
    assert_eq!(hashed, hex::encode(sha2::Sha256::digest(bodies[0])));
}
