//! A delivery is stored once: again right away (cache), again after a restart
//! (store's unique key), and when many copies race in the same batch.

use bytes::Bytes;
use http::StatusCode;

use crate::support::{Env, Gateway, stored_events};

fn stored(env: &Env) -> usize {
    stored_events(env).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_delivery_stored_once_also_across_restart() {
    let env = Env::new("");
    let body = Bytes::from_static(br#"{"action":"opened","issue":{"number":42}}"#);
    let signed = env.signer("github").sign("issues", &body).unwrap();

    let gw = Gateway::start(env.config()).await;
    let (s, first) = gw.post_signed("github", &signed).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, again) = gw.post_signed("github", &signed).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["status"], "duplicate");
    assert_eq!(again["id"], first["id"]);
    gw.stop().await;

    // A new process has an empty cache: the store's unique key catches it.
    let gw = Gateway::start(env.config()).await;
    let (s, after) = gw.post_signed("github", &signed).await;
    assert_eq!(s, StatusCode::OK, "{after}");
    assert_eq!(after["status"], "duplicate");
    assert_eq!(after["id"], first["id"]);
    gw.stop().await;
    assert_eq!(stored(&env), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_copies_of_one_delivery_yield_one_event() {
    let env = Env::new("");
    let gw = std::sync::Arc::new(Gateway::start(env.config()).await);
    let body = Bytes::from_static(br#"{"action":"created","comment":{"body":"/agent fix"}}"#);
    let signed = env.signer("github").sign("issue_comment", &body).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (gw, signed) = (gw.clone(), signed.clone());
        tasks.push(tokio::spawn(async move {
            gw.post_signed("github", &signed).await
        }));
    }
    let mut accepted = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (s, b) = t.await.unwrap();
        match s {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::OK => assert_eq!(b["status"], "duplicate"),
            other => panic!("unexpected {other}: {b}"),
        }
        ids.insert(b["id"].as_str().unwrap().to_string());
    }
    assert_eq!(accepted, 1, "exactly one copy is accepted");
    assert_eq!(ids.len(), 1, "every copy names the same event");
    std::sync::Arc::try_unwrap(gw).ok().unwrap().stop().await;
    assert_eq!(stored(&env), 1);
}

/// A second generic source, signed and named like the first.
const SECOND_HMAC: &str = r#"
[sources.hmac-b]
provider = "hmac"
secret = { file = "hmac.key" }
header = "X-Signature"
prefix = "sha256="
encoding = "hex"
delivery_header = "X-Delivery"
kind_header = "X-Event"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_delivery_id_on_two_sources_is_two_events() {
    let env = Env::new(SECOND_HMAC);
    let gw = Gateway::start(env.config()).await;
    let body = Bytes::from_static(br#"{"type":"a.b"}"#);
    // The very same request (id, body, signature) on two sources: only the
    // source tells them apart.
    let a = env.signer("hmac").sign("a.b", &body).unwrap();
    let a = crate::support::with_header(&a, "x-delivery", Some("shared-delivery-1"));
    let (s, first) = gw.post_signed("hmac", &a).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{first}");
    let (s, b) = gw.post_signed("hmac", &a).await;
    assert_eq!(
        (s, b["status"].as_str()),
        (StatusCode::OK, Some("duplicate")),
        "the same id and body on one source dedups"
    );
    let (s, other) = gw.post_signed("hmac-b", &a).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{other}");
    assert_ne!(other["id"], first["id"]);
    assert!(other.get("conflict_with").is_none(), "{other}");
    gw.stop().await;
    let rows = stored_events(&env);
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.delivery_id == "shared-delivery-1"));
}
