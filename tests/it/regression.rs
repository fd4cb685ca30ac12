//! Regressions, one test per bug, named for the defect it pins down.
//!
//! Intake, "who an event is": which delivery ids the signature covers, what
//! makes two deliveries the same one, how long a body hash stays a duplicate,
//! and which bytes decide how a signed body is read.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sluice::cli::send::Signed;
use sluice::event::IdOrigin;
use sluice::store::EventRecord;
use sluice::store::sqlite::{SqliteStore, get_record};

use crate::support::{Env, Gateway, header, sluice, stored_events, with_header};

/// A GitHub source of its own, so its metric labels are this file's alone.
const POISON_SOURCE: &str = r#"
[sources.gh-poison]
provider = "github"
secrets = [{ file = "github.key" }]
"#;

fn record(env: &Env, id: &str) -> EventRecord {
    let ro = SqliteStore::open_read_only(&env.db()).expect("store opens read-only");
    get_record(&ro, id)
        .expect("get")
        .unwrap_or_else(|| panic!("{id} is stored"))
}

fn id_of(answer: &serde_json::Value) -> String {
    answer["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an id in {answer}"))
        .to_string()
}

fn header_map(signed: &Signed) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in &signed.headers {
        h.append(k.clone(), HeaderValue::from_str(v).unwrap());
    }
    h
}

/// Issue 7, item 2: GitHub signs the body, not `X-GitHub-Delivery`. Whoever
/// saw one signed body could post it under the GUID of a delivery still to
/// come, and the real delivery was then answered `duplicate` and lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_delivery_id_reused_with_another_body_is_stored_and_marked() {
    let env = Env::new(POISON_SOURCE);
    let gw = Gateway::start(env.config()).await;
    let signer = env.signer("gh-poison");
    let seen = signer
        .sign(
            "issues",
            &Bytes::from_static(br#"{"action":"closed","issue":{"number":1}}"#),
        )
        .unwrap();
    let real = signer
        .sign(
            "issues",
            &Bytes::from_static(br#"{"action":"opened","issue":{"number":2}}"#),
        )
        .unwrap();
    let guid = header(&real, "x-github-delivery");
    let replay = with_header(&seen, "x-github-delivery", Some(&guid));

    let (s, first) = gw.post_signed("gh-poison", &replay).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{first}");
    let (s, second) = gw.post_signed("gh-poison", &real).await;
    assert_eq!(
        s,
        StatusCode::ACCEPTED,
        "the real delivery is kept: {second}"
    );
    assert_ne!(id_of(&second), id_of(&first));
    assert_eq!(second["conflict_with"], first["id"], "{second}");
    // The same id with the same body is still one delivery, both ways.
    let (s, again) = gw.post_signed("gh-poison", &real).await;
    assert_eq!(
        (s, &again["id"]),
        (StatusCode::OK, &second["id"]),
        "{again}"
    );
    let (s, again) = gw.post_signed("gh-poison", &replay).await;
    assert_eq!((s, &again["id"]), (StatusCode::OK, &first["id"]), "{again}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"sluice_id_conflicts_total{source="gh-poison"} 1"#),
        "{metrics}"
    );
    gw.stop().await;

    assert_eq!(stored_events(&env).len(), 2);
    let rec = record(&env, &id_of(&second));
    assert_eq!(rec.event.action.as_deref(), Some("opened"));
    assert_eq!(rec.summary.delivery_id, guid);
    assert_eq!(rec.summary.id_origin, IdOrigin::Unsigned);
    assert_eq!(rec.summary.conflict_with, Some(id_of(&first)));
    assert_eq!(record(&env, &id_of(&first)).summary.conflict_with, None);

    let path = env.config_path.to_str().unwrap().to_string();
    let json = sluice(&[
        "events",
        "show",
        "--config",
        &path,
        &id_of(&second),
        "--json",
    ]);
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["event"]["conflict_with"], first["id"], "{doc}");
    assert_eq!(doc["event"]["id_origin"], "unsigned", "{doc}");
    let text = sluice(&["events", "show", "--config", &path, &id_of(&second)]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("id conflict") && text.contains(&id_of(&first)),
        "{text}"
    );
}

/// Issue 7, item 2: a verified signature is a known MAC of a known body;
/// storing it (and showing it to rules) only helps an attacker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_headers_are_not_stored_once_verified() {
    let env = Env::new("");
    let gw = Gateway::start(env.config()).await;
    let cases: &[(&str, &str, &str)] = &[
        ("github", "issues", r#"{"action":"opened"}"#),
        ("gitlab-both", "Push Hook", r#"{"object_kind":"push"}"#),
        ("standard", "a.b", r#"{"type":"a.b"}"#),
        ("stripe", "x", r#"{"id":"evt_1","type":"x"}"#),
        (
            "slack",
            "x",
            r#"{"type":"event_callback","event_id":"Ev1","event":{"type":"message"}}"#,
        ),
        ("linear", "Issue", r#"{"action":"create","type":"Issue"}"#),
        ("hmac", "a.b", r#"{"type":"a.b"}"#),
    ];
    let mut ids = Vec::new();
    for (source, kind, body) in cases {
        let mut signed = env
            .signer(source)
            .sign(kind, &Bytes::from_static(body.as_bytes()))
            .unwrap();
        if *source == "github" {
            // GitHub also sends the SHA-1 signature.
            signed = with_header(&signed, "x-hub-signature", Some("sha1=0123"));
        }
        let (s, b) = gw.post_signed(source, &signed).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{source}: {b}");
        ids.push((*source, id_of(&b)));
    }
    gw.stop().await;
    for (source, id) in ids {
        let rec = record(&env, &id);
        let names: Vec<&str> = rec.event.headers.iter().map(|(k, _)| k.as_str()).collect();
        for proof in [
            "x-hub-signature",
            "x-hub-signature-256",
            "x-gitlab-token",
            "webhook-signature",
            "stripe-signature",
            "x-slack-signature",
            "linear-signature",
            "x-signature",
        ] {
            assert!(
                !names.contains(&proof),
                "{source} stored {proof}: {names:?}"
            );
        }
        assert!(!names.is_empty(), "{source}: other headers are kept");
    }
}

/// Issue 7, item 3: GitLab's signing mode accepted the `svix-*` aliases but
/// read only `webhook-id` as the delivery id, so a replay inside the window
/// with a fresh `Idempotency-Key` was a new event. The verifier now hands
/// over the id it checked, and GitLab takes only the `webhook-*` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_signing_mode_dedups_on_the_signed_id_and_refuses_svix_names() {
    let env = Env::new("");
    let gw = Gateway::start(env.config()).await;
    let body = Bytes::from_static(br#"{"object_kind":"push","ref":"refs/heads/main"}"#);
    let signed = env
        .signer("gitlab-signed")
        .sign("Push Hook", &body)
        .unwrap();

    let mut aliased = signed.clone();
    for (name, _) in &mut aliased.headers {
        if let Some(rest) = name.as_str().strip_prefix("webhook-") {
            *name = HeaderName::from_bytes(format!("svix-{rest}").as_bytes()).unwrap();
        }
    }
    for fresh in ["replay-1", "replay-2"] {
        let replay = with_header(&aliased, "idempotency-key", Some(fresh));
        let (s, b) = gw.post_signed("gitlab-signed", &replay).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "svix-* names for GitLab: {b}");
        assert_eq!(b["header"], "webhook-signature", "{b}");
    }

    let (s, first) = gw.post_signed("gitlab-signed", &signed).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{first}");
    let replay = with_header(&signed, "idempotency-key", Some("chosen-by-someone"));
    let replay = with_header(&replay, "x-gitlab-event-uuid", Some("chosen-too"));
    let (s, again) = gw.post_signed("gitlab-signed", &replay).await;
    assert_eq!((s, &again["id"]), (StatusCode::OK, &first["id"]), "{again}");
    gw.stop().await;
    let rec = record(&env, &id_of(&first));
    assert_eq!(rec.summary.delivery_id, header(&signed, "webhook-id"));
    assert_eq!(rec.summary.id_origin, IdOrigin::Signed);
    assert_eq!(stored_events(&env).len(), 1);

    // What the proof covered, as `Verified` reports it.
    let both = env.signer("gitlab-both");
    let s = both.sign("Push Hook", &body).unwrap();
    let v = both
        .source
        .verifier
        .verify(header_map(&s), s.body.clone())
        .unwrap();
    assert_eq!(v.signed_id(), Some(header(&s, "webhook-id").as_str()));
    let token = env.signer("gitlab");
    let s = token.sign("Push Hook", &body).unwrap();
    let v = token
        .source
        .verifier
        .verify(header_map(&s), s.body.clone())
        .unwrap();
    assert_eq!((v.signed_id(), v.body_signed()), (None, false));
    let gh = env.signer("github");
    let s = gh.sign("issues", &body).unwrap();
    let v = gh
        .source
        .verifier
        .verify(header_map(&s), s.body.clone())
        .unwrap();
    assert_eq!((v.signed_id(), v.body_signed()), (None, true));
}

/// Issue 7, item 5: `Content-Type` (unsigned) chose form decoding, so a
/// signed JSON body whose string holds `&payload=…` was read as a form
/// carrying other JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_bytes_decide_how_a_body_is_read() {
    let env = Env::new("");
    let gw = Gateway::start(env.config()).await;
    let body = Bytes::from_static(
        br#"{"action":"opened","note":"&payload=%7B%22action%22%3A%22deleted%22%7D&"}"#,
    );
    let signed = env.signer("github").sign("issues", &body).unwrap();
    let as_form = with_header(
        &signed,
        "content-type",
        Some("application/x-www-form-urlencoded"),
    );
    let (s, json_body) = gw.post_signed("github", &as_form).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{json_body}");

    // GitHub's real form deliveries still decode.
    let form = Bytes::from(format!(
        "payload={}",
        form_urlencoded::byte_serialize(br#"{"action":"labeled"}"#).collect::<String>()
    ));
    let signed = env.signer("github").sign("issues", &form).unwrap();
    let signed = with_header(
        &signed,
        "content-type",
        Some("application/x-www-form-urlencoded"),
    );
    let (s, form_body) = gw.post_signed("github", &signed).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{form_body}");

    // A provider that never sends forms gets none decoded.
    let form = Bytes::from_static(b"payload=%7B%22type%22%3A%22a.b%22%7D");
    let signed = env.signer("standard").sign("a.b", &form).unwrap();
    let signed = with_header(
        &signed,
        "content-type",
        Some("application/x-www-form-urlencoded"),
    );
    let (s, b) = gw.post_signed("standard", &signed).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    gw.stop().await;

    let rec = record(&env, &id_of(&json_body));
    assert_eq!(rec.event.action.as_deref(), Some("opened"));
    assert_eq!(rec.event.body, body);
    let rec = record(&env, &id_of(&form_body));
    assert_eq!(rec.event.action.as_deref(), Some("labeled"));
}

/// Issue 7, item 5: Linear signs the body, whose `type` is the kind; the
/// `Linear-Event` header is not signed and must not choose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linear_kind_comes_from_the_signed_body() {
    let env = Env::new("");
    let gw = Gateway::start(env.config()).await;
    let body = Bytes::from_static(br#"{"action":"create","type":"Issue","data":{"id":"x"}}"#);
    // The signer sends `Linear-Event: Comment`, as a tampered request would.
    let signed = env.signer("linear").sign("Comment", &body).unwrap();
    assert_eq!(header(&signed, "linear-event"), "Comment");
    let (s, b) = gw.post_signed("linear", &signed).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    gw.stop().await;
    assert_eq!(record(&env, &id_of(&b)).event.kind, "Issue");
}

/// Issue 7, item 7: a source without delivery ids deduplicated on the body
/// hash forever, so two identical alerts an hour apart were one event. The
/// body hash is a duplicate only within `store.dedup_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_hash_ids_dedup_only_within_the_window() {
    let env = Env::new("\n[store]\ndedup_ttl = \"2s\"\n");
    let gw = Gateway::start(env.config()).await;
    let body = Bytes::from_static(br#"{"type":"disk.full","host":"db1"}"#);
    let alert = env.signer("hmac").sign("disk.full", &body).unwrap();
    let alert = with_header(&alert, "x-delivery", None);

    let sent = Instant::now();
    let (s, first) = gw.post_signed("hmac", &alert).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{first}");
    let (s, again) = gw.post_signed("hmac", &alert).await;
    assert_eq!((s, &again["id"]), (StatusCode::OK, &first["id"]), "{again}");

    // Past the window the same body is a new event.
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        let (s, b) = gw.post_signed("hmac", &alert).await;
        if s == StatusCode::ACCEPTED {
            break b;
        }
        assert_eq!((s, &b["id"]), (StatusCode::OK, &first["id"]), "{b}");
        assert!(
            Instant::now() < deadline,
            "still a duplicate 30 s after a 2 s window"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        sent.elapsed() >= Duration::from_secs(2),
        "new before the window ended"
    );
    assert_ne!(second["id"], first["id"]);
    // And the new event holds the key for a window of its own.
    let (s, again) = gw.post_signed("hmac", &alert).await;
    assert_eq!(
        (s, &again["id"]),
        (StatusCode::OK, &second["id"]),
        "{again}"
    );
    gw.stop().await;
    assert_eq!(stored_events(&env).len(), 2);
}

/// Issue 7, item 7: the window is the store's, so a restart inside it (an
/// empty cache) still finds the duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_hash_window_survives_a_restart() {
    let env = Env::new("\n[store]\ndedup_ttl = \"1h\"\n");
    let body = Bytes::from_static(br#"{"type":"disk.full","host":"db2"}"#);
    let alert = env.signer("hmac").sign("disk.full", &body).unwrap();
    let alert = with_header(&alert, "x-delivery", None);
    let gw = Gateway::start(env.config()).await;
    let (s, first) = gw.post_signed("hmac", &alert).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{first}");
    gw.stop().await;
    let gw = Gateway::start(env.config()).await;
    let (s, again) = gw.post_signed("hmac", &alert).await;
    assert_eq!((s, &again["id"]), (StatusCode::OK, &first["id"]), "{again}");
    gw.stop().await;
    let rows = stored_events(&env);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id_origin, IdOrigin::Body);
}

/// Issue 7, items 2 and 7: the dedup key changed shape; a data dir written
/// with the old unique key is refused with a message naming it, never read
/// half-way.
#[test]
fn a_store_of_the_old_schema_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, \
         source TEXT NOT NULL, delivery_id TEXT NOT NULL, UNIQUE (source, delivery_id));",
    )
    .unwrap();
    drop(conn);
    let err = SqliteStore::open(&db, 8).unwrap_err().to_string();
    assert!(
        err.contains("old.db") && err.contains("older sluice"),
        "{err}"
    );
    let err = SqliteStore::open_read_only(&db).unwrap_err().to_string();
    assert!(err.contains("old.db"), "{err}");
}
