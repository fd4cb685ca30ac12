//! The store conformance suite (`store.rs`), unchanged, against the NATS
//! JetStream backend: on one server, and on a three-server cluster with
//! three replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sluice::store::Store;
use sluice::store::nats::{NatsOptions, NatsStore};

use crate::nats_cluster::Nats;
use crate::store::{conformance, dedup_conformance, work_queue_conformance};

/// Options for a store on `nats` under its own `prefix`, its index in `dir`.
pub fn options(nats: &Nats, prefix: &str, dir: &std::path::Path) -> NatsOptions {
    NatsOptions {
        url: nats.url(),
        credentials: None,
        replicas: nats.len(),
        prefix: prefix.to_owned(),
        index_path: dir.join(format!("{prefix}-index.db")),
        dedup_ttl: Duration::from_secs(24 * 3600),
        max_attempts: 3,
        ack_wait: Duration::from_secs(30),
        append_timeout: Duration::from_secs(5),
    }
}

async fn open(options: NatsOptions) -> Arc<dyn Store> {
    Arc::new(NatsStore::open(options).await.expect("open the NATS store"))
}

/// Every part of the suite, each on stores of its own prefix.
async fn suite(nats: &Nats) {
    let dir = tempfile::tempdir().unwrap();
    conformance(open(options(nats, "conf", dir.path())).await).await;
    let window = Duration::from_millis(1500);
    dedup_conformance(
        open(NatsOptions {
            dedup_ttl: window,
            ..options(nats, "dedup", dir.path())
        })
        .await,
        window,
    )
    .await;
    let n = AtomicUsize::new(0);
    work_queue_conformance(async || {
        let i = n.fetch_add(1, Ordering::Relaxed);
        open(options(nats, &format!("wq{i}"), dir.path())).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_store_conforms_on_one_server() {
    let nats = Nats::single().await;
    suite(&nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_store_conforms_on_a_three_server_cluster() {
    let nats = Nats::cluster().await;
    suite(&nats).await;
}

/// Moving from the embedded backend: what an embedded store exports, the
/// NATS backend imports with ids, bodies, state and dedup keys kept; a
/// routed event is not routed again, a pending one is, and a second import
/// adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_export_imports_into_the_nats_backend() {
    use sluice::event::EventStatus;
    use sluice::store::export::Imported;
    use sluice::store::{EventReader, SqliteStore};

    use crate::store::hmac_event;
    let dir = tempfile::tempdir().unwrap();
    let embedded = SqliteStore::open(&dir.path().join("s.db"), 64).unwrap();
    let routed = embedded
        .append(hmac_event("imp", Some("d-routed"), br#"{"n":1}"#))
        .await
        .unwrap();
    let pending = embedded
        .append(hmac_event(
            "imp",
            Some("d-pending"),
            br#"{ "n" : 2 ,"s":"\u00e9"}  "#,
        ))
        .await
        .unwrap();
    let claimed = embedded
        .claim("w", 1, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed[0].event.id, routed.id());
    let decision = sluice::decision::Decision {
        rules: vec![],
        routes: vec![],
        dead_letter: None,
        defer: None,
        decided_at_ms: 7,
    };
    embedded
        .complete(&claimed[0].lease(), &decision)
        .await
        .unwrap();
    embedded.close();
    let reader = SqliteStore::open_read_only(&dir.path().join("s.db")).unwrap();
    let page = reader.export_page(None, None, 100).await.unwrap();
    assert_eq!(page.events.len(), 2);

    let nats = Nats::single().await;
    let store = NatsStore::open(options(&nats, "imp", dir.path()))
        .await
        .unwrap();
    for e in &page.events {
        assert_eq!(store.import(e).await.unwrap(), Imported::Added, "{}", e.id);
    }
    for e in &page.events {
        assert_eq!(
            store.import(e).await.unwrap(),
            Imported::AlreadyHeld(e.id.clone()),
            "a second import adds nothing"
        );
    }
    let rec = Store::get(&store, routed.id()).await.unwrap().unwrap();
    assert_eq!(rec.summary.status, EventStatus::Routed);
    assert_eq!(rec.decision.as_ref().map(|d| d.decided_at_ms), Some(7));
    assert_eq!(&rec.event.body[..], br#"{"n":1}"#);
    let rec = Store::get(&store, pending.id()).await.unwrap().unwrap();
    assert_eq!(&rec.event.body[..], br#"{ "n" : 2 ,"s":"\u00e9"}  "#);
    // Only the pending one is routed again.
    let got = store.claim("w", 10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        got.iter().map(|c| c.event.id.as_str()).collect::<Vec<_>>(),
        vec![pending.id()]
    );
    // The same delivery sent again is a duplicate of the imported event.
    assert_eq!(
        store
            .append(hmac_event("imp", Some("d-routed"), br#"{"n":1}"#))
            .await
            .unwrap(),
        sluice::store::Appended::Duplicate(routed.id().to_owned())
    );
    store.close().await;
}

/// A body larger than the server's `max_payload` is stored in parts and
/// arrives whole, by `get` and by a claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_servers_max_payload_arrives_whole() {
    let nats = Nats::single_with("max_payload: 65536").await;
    let dir = tempfile::tempdir().unwrap();
    let store = NatsStore::open(options(&nats, "big", dir.path()))
        .await
        .unwrap();
    let filler: String = (0..300_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let body: &'static [u8] = Box::leak(
        format!("{{\"big\":\"{filler}\"}}")
            .into_bytes()
            .into_boxed_slice(),
    );
    let id = match store
        .append(crate::store::hmac_event("big", Some("b1"), body))
        .await
        .unwrap()
    {
        sluice::store::Appended::Stored(id) => id,
        other => panic!("{other:?}"),
    };
    let rec = Store::get(&store, &id).await.unwrap().unwrap();
    assert_eq!(rec.event.body.len(), body.len());
    assert_eq!(&rec.event.body[..], body);
    assert_eq!(rec.summary.size, body.len() as u64);
    // It went as parts (under the server's limit), not as one message.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut events = async_nats::jetstream::new(client)
        .get_stream("BIG_EVENTS")
        .await
        .unwrap();
    let stored = events.info().await.unwrap().state.messages;
    assert!(
        stored >= 6,
        "{stored} messages for a 300 KB body under a 64 KiB limit"
    );
    let claimed = store.claim("w", 1, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        &claimed[0].event.body[..],
        body,
        "a claim reassembles it too"
    );
    store.close().await;
}

/// `sluice check` on the NATS backend: it reaches the servers and says what
/// exists or will be created; replicas the cluster cannot hold, or no
/// server, are errors naming the key. The offline store reads say to ask a
/// node instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_check_verifies_the_nats_cluster() {
    let nats = Nats::single().await;
    let env = crate::support::Env::new("");
    let base = std::fs::read_to_string(&env.config_path).unwrap();
    let with = |url: &str, replicas: usize| {
        std::fs::write(
            &env.config_path,
            format!(
                "{base}\n[store]\nbackend = \"nats\"\n[store.nats]\nurl = {url:?}\nreplicas = {replicas}\nprefix = \"chk\"\n"
            ),
        )
        .unwrap();
    };
    let config = env.config_path.to_str().unwrap().to_owned();
    with(&nats.url(), 1);
    let ok = crate::support::sluice(&["check", "--config", &config]);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.contains("nats: connected to"), "{out}");
    assert!(
        out.contains("to be created at the first start, with 1 replicas: CHK_EVENTS"),
        "{out}"
    );
    with(&nats.url(), 3);
    let three = crate::support::sluice(&["check", "--config", &config]);
    let err = String::from_utf8_lossy(&three.stderr);
    assert!(!three.status.success());
    assert!(
        err.contains("store.nats.replicas = 3: cannot create a stream with that many replicas"),
        "{err}"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    with(&format!("nats://127.0.0.1:{port}"), 1);
    let down = crate::support::sluice(&["check", "--config", &config]);
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(!down.status.success());
    assert!(err.contains("store.nats.url nats://127.0.0.1:"), "{err}");
    let ls = crate::support::sluice(&["events", "ls", "--config", &config]);
    let err = String::from_utf8_lossy(&ls.stderr);
    assert!(!ls.status.success());
    assert!(err.contains("admin API"), "{err}");
}
