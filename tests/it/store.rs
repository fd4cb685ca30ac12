//! The store conformance suite: every backend must pass it. It runs against
//! the embedded SQLite store here; a NATS JetStream backend runs the same
//! `conformance`, `dedup_conformance` and `work_queue_conformance` functions
//! (the last one's parts each on an empty store of their own).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use sluice::decision::{Decision, Priority, Route, RuleOutcome, RuleRecord, Verdict};
use sluice::event::{EventStatus, IdOrigin, Provider};
use sluice::ingress::NewEvent;
use sluice::ingress::normalize::{Naming, normalize};
use sluice::ingress::verify::{StandardWebhooks, Verifier};
use sluice::store::{Appended, Claimed, ListFilter, Released, SqliteStore, Store, StoreError};

fn event(source: &str, delivery: &str, kind: &str) -> NewEvent {
    event_with_body(
        source,
        delivery,
        kind,
        Bytes::from_static(br#"{"action":"opened","n":1}"#),
    )
}

/// An event of the generic provider with an unsigned delivery id, a kind
/// header and `body`.
pub(crate) fn event_with_body(source: &str, delivery: &str, kind: &str, body: Bytes) -> NewEvent {
    let mut h = HeaderMap::new();
    h.insert(
        HeaderName::from_static("x-delivery"),
        HeaderValue::from_str(delivery).unwrap(),
    );
    h.insert(
        HeaderName::from_static("x-event"),
        HeaderValue::from_str(kind).unwrap(),
    );
    let naming = Naming {
        delivery_header: Some(HeaderName::from_static("x-delivery")),
        kind_header: Some(HeaderName::from_static("x-event")),
    };
    let verified = Verifier::None.verify_at(h, body, 0).unwrap();
    normalize(source, Provider::Hmac, &naming, verified, 1_700_000_000_000).unwrap()
}

fn decision() -> Decision {
    let route = Route {
        agent: "triage".into(),
        workflow: None,
        priority: Priority::High,
        reason: "test".into(),
        labels: vec!["k:v".into()],
        ordering_key: None,
        payload: None,
    };
    Decision {
        rules: vec![RuleRecord {
            rule: "r".into(),
            version: "abc".into(),
            outcome: RuleOutcome::Verdict(Verdict::Routes(vec![route.clone()])),
            violation: None,
            duration_us: 3,
            reads: Vec::new(),
            reads_dropped: 0,
        }],
        routes: vec![route],
        dead_letter: None,
        defer: None,
        decided_at_ms: 1,
    }
}

/// Claims up to ten events for `worker` with a lease long enough not to expire.
async fn claim(store: &dyn Store, worker: &str) -> Vec<Claimed> {
    store
        .claim(worker, 10, Duration::from_secs(60))
        .await
        .unwrap()
}

/// Claims for `worker` until something is claimable (at most 20 s).
async fn claim_when_ready(store: &dyn Store, worker: &str) -> Vec<Claimed> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = claim(store, worker).await;
        if !got.is_empty() {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing became claimable within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The behaviour every store backend must have.
pub async fn conformance(store: Arc<dyn Store>) {
    // Append and dedup by (source, delivery id).
    let a = store.append(event("s1", "d1", "k1")).await.unwrap();
    let Appended::Stored(id1) = a.clone() else {
        panic!("first append stores: {a:?}")
    };
    assert_eq!(
        store.append(event("s1", "d1", "k1")).await.unwrap(),
        Appended::Duplicate(id1.clone())
    );
    let Appended::Stored(id2) = store.append(event("s2", "d1", "k2")).await.unwrap() else {
        panic!("other source is new")
    };
    assert_ne!(id1, id2);

    // Get and list.
    let rec = store.get(&id1).await.unwrap().unwrap();
    assert_eq!(rec.event.kind, "k1");
    assert_eq!(rec.event.action.as_deref(), Some("opened"));
    assert_eq!(&rec.event.body[..], br#"{"action":"opened","n":1}"#);
    assert_eq!(rec.summary.status, EventStatus::Pending);
    assert!(store.get("evt_missing").await.unwrap().is_none());
    let all = store
        .list(&ListFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec![id2.as_str(), id1.as_str()],
        "newest first"
    );
    let only = store
        .list(&ListFilter {
            source: Some("s2".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(only.len(), 1);
    let by_kind = store
        .list(&ListFilter {
            kind: Some("k1".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_kind.len(), 1);
    assert_eq!(store.queue_depth().await.unwrap(), 2);

    // Claim leases in order; a leased event is not claimed twice.
    let claimed = store.claim("w1", 1, Duration::from_secs(60)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].event.id, id1, "oldest first");
    assert_eq!(claimed[0].attempt, 1);
    let second = claim(store.as_ref(), "w2").await;
    assert_eq!(
        second
            .iter()
            .map(|c| c.event.id.as_str())
            .collect::<Vec<_>>(),
        vec![id2.as_str()]
    );
    assert!(claim(store.as_ref(), "w3").await.is_empty());

    // Complete records the decision, under the lease that claimed it.
    let stale = sluice::store::Lease {
        attempt: 7,
        ..claimed[0].lease()
    };
    assert!(matches!(
        store.complete(&stale, &decision()).await,
        Err(StoreError::LeaseLost(_))
    ));
    store
        .complete(&claimed[0].lease(), &decision())
        .await
        .unwrap();
    assert!(
        matches!(
            store.complete(&claimed[0].lease(), &decision()).await,
            Err(StoreError::LeaseLost(_))
        ),
        "a settled event cannot be settled again"
    );
    let rec = store.get(&id1).await.unwrap().unwrap();
    assert_eq!(rec.summary.status, EventStatus::Routed);
    assert_eq!(rec.decision, Some(decision()));

    // Retry later: not claimable until the delay passes. The delay is wide, so
    // the check right after cannot outlive it on a loaded machine.
    let retried_at = std::time::Instant::now();
    store
        .retry_later(&second[0].lease(), Duration::from_secs(2), "agent down")
        .await
        .unwrap();
    assert!(claim(store.as_ref(), "w1").await.is_empty());
    let again = claim_when_ready(store.as_ref(), "w1").await;
    assert!(
        retried_at.elapsed() >= Duration::from_millis(1_999),
        "claimable before its delay"
    );
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(
        store
            .get(&id2)
            .await
            .unwrap()
            .unwrap()
            .last_error
            .as_deref(),
        Some("agent down")
    );

    // Dead letter, then operator replay makes it routable again.
    store
        .dead_letter(&again[0].lease(), "gave up")
        .await
        .unwrap();
    assert_eq!(
        store.get(&id2).await.unwrap().unwrap().summary.status,
        EventStatus::Dead
    );
    let dead = store
        .list(&ListFilter {
            status: Some(EventStatus::Dead),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    store.requeue(&id2).await.unwrap();
    let replayed = claim(store.as_ref(), "w1").await;
    assert_eq!(
        replayed.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        vec![1],
        "a replay starts a fresh attempt count"
    );

    // A crashed worker's lease expires and the event is claimed again.
    let Appended::Stored(id3) = store.append(event("s1", "d3", "k1")).await.unwrap() else {
        panic!()
    };
    let crashed_at = std::time::Instant::now();
    let crashed = store
        .claim("crashy", 10, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(
        crashed
            .iter()
            .map(|c| c.event.id.as_str())
            .collect::<Vec<_>>(),
        vec![id3.as_str()]
    );
    assert!(claim(store.as_ref(), "w1").await.is_empty());
    let c = claim_when_ready(store.as_ref(), "w1").await;
    assert!(
        crashed_at.elapsed() >= Duration::from_millis(1_999),
        "claimable before the lease expired"
    );
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].event.id, id3);
    assert_eq!(c[0].attempt, 2);
    // The crashed worker comes back late: its outcome must not overwrite the new claim's.
    let late = crashed[0].lease();
    assert!(matches!(
        store.retry_later(&late, Duration::ZERO, "late").await,
        Err(StoreError::LeaseLost(_))
    ));
    assert!(matches!(
        store.dead_letter(&late, "late").await,
        Err(StoreError::LeaseLost(_))
    ));
    assert_eq!(
        store.get(&id3).await.unwrap().unwrap().summary.status,
        EventStatus::Claimed
    );
    store.complete(&c[0].lease(), &decision()).await.unwrap();

    // Unknown ids are errors, not silent no-ops.
    let missing = sluice::store::Lease {
        event_id: "evt_missing".into(),
        worker: "w1".into(),
        attempt: 1,
    };
    assert!(store.complete(&missing, &decision()).await.is_err());
    assert!(store.requeue("evt_missing").await.is_err());
    store.ready().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_data_dir_serves_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let first = SqliteStore::open(&dir.path().join("s.db"), 8).unwrap();
    let second = SqliteStore::open(&dir.path().join("s.db"), 8)
        .unwrap_err()
        .to_string();
    assert!(
        second.contains("in use by another sluice process"),
        "{second}"
    );
    first.close();
    SqliteStore::open(&dir.path().join("s.db"), 8).expect("free again once the first closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("s.db"), 64).unwrap());
    conformance(store.clone()).await;
    store.close();
    // Reopened, everything is still there.
    let store = SqliteStore::open(&dir.path().join("s.db"), 64).unwrap();
    assert_eq!(store.list(&ListFilter::default()).await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_group_commit_takes_concurrent_appends() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("s.db"), 128).unwrap());
    let mut tasks = Vec::new();
    for i in 0..500 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .append(event("s", &format!("d{}", i % 250), "k"))
                .await
                .unwrap()
        }));
    }
    let mut stored = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Appended::Stored(_)) {
            stored += 1;
        }
    }
    assert_eq!(stored, 250);
    assert_eq!(store.list(&ListFilter::default()).await.unwrap().len(), 250);
}

/// Waiting workers are woken by new work, not by each other's empty claims
/// (which kept an idle gateway's workers and writer waking each other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_workers_wake_for_new_work_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("s.db"), 64).unwrap());
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_for_work(Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        assert!(claim(store.as_ref(), "w").await.is_empty());
        store.ready().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiter.is_finished(),
        "empty claims and no-op writes woke a waiting worker"
    );
    // New work wakes it (appended until it does: it may have started waiting late).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while !waiter.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "new events did not wake the waiting worker"
        );
        n += 1;
        store
            .append(event("s", &format!("wake-{n}"), "k"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.close();
}

/// An event of the generic provider with `body`, its id (when given) from an
/// unsigned header.
pub(crate) fn hmac_event(source: &str, delivery: Option<&str>, body: &'static [u8]) -> NewEvent {
    let mut h = HeaderMap::new();
    if let Some(d) = delivery {
        h.insert("x-delivery", HeaderValue::from_str(d).unwrap());
    }
    let naming = Naming {
        delivery_header: Some(HeaderName::from_static("x-delivery")),
        kind_header: None,
    };
    let verified = Verifier::None
        .verify_at(h, Bytes::from_static(body), 0)
        .unwrap();
    normalize(
        source,
        Provider::Hmac,
        &naming,
        verified,
        sluice::event::now_ms(),
    )
    .unwrap()
}

/// A Standard Webhooks event whose id the signature covers.
fn signed_event(id: &str, body: &'static [u8]) -> NewEvent {
    let secret = [sluice::secret::Secret::new(
        b"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".to_vec(),
    )];
    let scheme = StandardWebhooks::new(&secret, Duration::from_secs(300)).unwrap();
    let now = sluice::ingress::verify::unix_now();
    let mut h = HeaderMap::new();
    for (k, v) in scheme.sign(id, now, body) {
        h.insert(k, HeaderValue::from_str(&v).unwrap());
    }
    let verified = Verifier::Standard(scheme)
        .verify_at(h, Bytes::from_static(body), now)
        .unwrap();
    let ev = normalize(
        "std",
        Provider::StandardWebhooks,
        &Naming::default(),
        verified,
        sluice::event::now_ms(),
    )
    .unwrap();
    assert_eq!(ev.id_origin(), IdOrigin::Signed);
    ev
}

/// What "the same delivery" means, for every backend: an unsigned id is the
/// same delivery only with the same body (another body is stored, marked as
/// a conflict); a signed id is the same delivery whatever the body; a body
/// hash is the same delivery only within the dedup window.
pub async fn dedup_conformance(store: Arc<dyn Store>, window: Duration) {
    let a = store
        .append(hmac_event("u", Some("d1"), br#"{"n":1}"#))
        .await
        .unwrap();
    let Appended::Stored(first) = a.clone() else {
        panic!("first append stores: {a:?}")
    };
    assert_eq!(
        store
            .append(hmac_event("u", Some("d1"), br#"{"n":1}"#))
            .await
            .unwrap(),
        Appended::Duplicate(first.clone())
    );
    let other = store
        .append(hmac_event("u", Some("d1"), br#"{"n":2}"#))
        .await
        .unwrap();
    let Appended::IdConflict { id, conflict_with } = other.clone() else {
        panic!("another body under the same unsigned id is its own event: {other:?}")
    };
    assert_eq!(conflict_with, first);
    let rec = store.get(&id).await.unwrap().unwrap();
    assert_eq!(rec.summary.conflict_with.as_deref(), Some(first.as_str()));
    assert_eq!(rec.summary.id_origin, IdOrigin::Unsigned);

    let Appended::Stored(signed) = store
        .append(signed_event("msg_1", br#"{"type":"a"}"#))
        .await
        .unwrap()
    else {
        panic!("a new signed id stores")
    };
    assert_eq!(
        store
            .append(signed_event("msg_1", br#"{"type":"b"}"#))
            .await
            .unwrap(),
        Appended::Duplicate(signed)
    );

    let started = std::time::Instant::now();
    let Appended::Stored(hashed) = store
        .append(hmac_event("h", None, br#"{"alert":1}"#))
        .await
        .unwrap()
    else {
        panic!("a new body stores")
    };
    let deadline = started + window + Duration::from_secs(30);
    loop {
        match store
            .append(hmac_event("h", None, br#"{"alert":1}"#))
            .await
            .unwrap()
        {
            Appended::Duplicate(id) => {
                assert_eq!(id, hashed);
                assert!(std::time::Instant::now() < deadline, "window never ended");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Appended::Stored(id) => {
                assert_ne!(id, hashed);
                assert!(started.elapsed() >= window, "new inside the window");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_dedups_by_what_the_signature_covers() {
    let dir = tempfile::tempdir().unwrap();
    let window = Duration::from_millis(1500);
    let store = Arc::new(
        SqliteStore::open_with_dedup_window(&dir.path().join("s.db"), 64, window).unwrap(),
    );
    dedup_conformance(store.clone(), window).await;
}

/// The ids of claimed events, in the order the claim handed them out.
fn ids(claimed: &[Claimed]) -> Vec<&str> {
    claimed.iter().map(|c| c.event.id.as_str()).collect()
}

/// Appends an event of the generic provider stamped now, under its own
/// delivery id; returns its id.
async fn append_now(store: &dyn Store, delivery: &str) -> String {
    match store
        .append(hmac_event("q", Some(delivery), br#"{"n":1}"#))
        .await
        .unwrap()
    {
        Appended::Stored(id) => id,
        other => panic!("{delivery} is new: {other:?}"),
    }
}

/// `defer` gives the claim's attempt back (the next claim has the same
/// attempt number); `retry_later` counts it.
pub async fn defer_gives_the_attempt_back(store: Arc<dyn Store>) {
    let id = append_now(store.as_ref(), "defer").await;
    let first = claim(store.as_ref(), "w1").await;
    assert_eq!(ids(&first), vec![id.as_str()]);
    assert_eq!(first[0].attempt, 1);
    store
        .defer(&first[0].lease(), Duration::ZERO, "rule switched off")
        .await
        .unwrap();
    let again = claim_when_ready(store.as_ref(), "w2").await;
    assert_eq!(again[0].attempt, 1, "a deferral is not an attempt");
    store
        .retry_later(&again[0].lease(), Duration::ZERO, "agent down")
        .await
        .unwrap();
    let retried = claim_when_ready(store.as_ref(), "w1").await;
    assert_eq!(retried[0].attempt, 2, "a retry is an attempt");
    store
        .defer(&retried[0].lease(), Duration::ZERO, "no capacity")
        .await
        .unwrap();
    let after = claim_when_ready(store.as_ref(), "w2").await;
    assert_eq!(
        after[0].attempt, 2,
        "a deferral after a retry keeps the retry's count"
    );
    assert!(matches!(
        store
            .defer(&retried[0].lease(), Duration::ZERO, "late")
            .await,
        Err(StoreError::LeaseLost(_))
    ));
    store
        .complete(&after[0].lease(), &decision())
        .await
        .unwrap();
    assert_eq!(
        store.get(&id).await.unwrap().unwrap().summary.attempts,
        2,
        "the routed event's attempts count the retry, not the deferrals"
    );
}

/// `extend` renews the leases that still hold, and only those: a lease that
/// lapsed and was claimed again, or whose event was settled, is not renewed.
pub async fn extend_renews_only_held_leases(store: Arc<dyn Store>) {
    let a = append_now(store.as_ref(), "extend-a").await;
    let b = append_now(store.as_ref(), "extend-b").await;
    let held = claim(store.as_ref(), "w1").await;
    assert_eq!(ids(&held), vec![a.as_str(), b.as_str()]);
    let leases: Vec<_> = held.iter().map(Claimed::lease).collect();
    assert_eq!(
        store
            .extend(&leases, Duration::from_secs(60))
            .await
            .unwrap(),
        vec![true, true]
    );
    store.complete(&leases[0], &decision()).await.unwrap();
    assert_eq!(
        store
            .extend(&leases, Duration::from_secs(60))
            .await
            .unwrap(),
        vec![false, true],
        "a settled event's lease is not renewed"
    );

    // A renewed lease outlives the one the claim took.
    let c = append_now(store.as_ref(), "extend-c").await;
    let short = store.claim("w1", 10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(ids(&short), vec![c.as_str()]);
    assert_eq!(
        store
            .extend(&[short[0].lease()], Duration::from_secs(60))
            .await
            .unwrap(),
        vec![true]
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(
        claim(store.as_ref(), "w2").await.is_empty(),
        "a renewed lease lapsed at the claim's first expiry"
    );

    // A lease that lapses and is claimed again is gone for good.
    let d = append_now(store.as_ref(), "extend-d").await;
    let lapsing = store
        .claim("w1", 10, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(ids(&lapsing), vec![d.as_str()]);
    let reclaimed = claim_when_ready(store.as_ref(), "w2").await;
    assert_eq!(ids(&reclaimed), vec![d.as_str()]);
    assert_eq!(
        store
            .extend(
                &[lapsing[0].lease(), reclaimed[0].lease(), short[0].lease()],
                Duration::from_secs(60)
            )
            .await
            .unwrap(),
        vec![false, true, true]
    );
    assert!(matches!(
        store.complete(&lapsing[0].lease(), &decision()).await,
        Err(StoreError::LeaseLost(_))
    ));
    store
        .complete(&reclaimed[0].lease(), &decision())
        .await
        .unwrap();
}

/// `queue_depth` counts the stored events not yet settled (waiting or
/// claimed): it drops on complete and dead-letter, rises on requeue, and a
/// duplicate, a retry or a deferral leaves it as it is.
pub async fn queue_depth_counts_unsettled_events(store: Arc<dyn Store>) {
    let depth = async || store.queue_depth().await.unwrap();
    assert_eq!(depth().await, 0);
    let a = append_now(store.as_ref(), "depth-a").await;
    let b = append_now(store.as_ref(), "depth-b").await;
    let c = append_now(store.as_ref(), "depth-c").await;
    assert_eq!(depth().await, 3);
    assert!(matches!(
        store
            .append(hmac_event("q", Some("depth-a"), br#"{"n":1}"#))
            .await
            .unwrap(),
        Appended::Duplicate(_)
    ));
    assert_eq!(depth().await, 3, "a duplicate is not queued");
    let held = store.claim("w1", 2, Duration::from_secs(60)).await.unwrap();
    assert_eq!(ids(&held), vec![a.as_str(), b.as_str()]);
    assert_eq!(depth().await, 3, "claimed events are not settled");
    // Past c's arrival millisecond, so b's new due time orders after c's.
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .retry_later(&held[1].lease(), Duration::ZERO, "agent down")
        .await
        .unwrap();
    assert_eq!(depth().await, 3);
    store.complete(&held[0].lease(), &decision()).await.unwrap();
    assert_eq!(depth().await, 2);
    let next = claim_when_ready(store.as_ref(), "w1").await;
    assert_eq!(
        ids(&next),
        vec![c.as_str(), b.as_str()],
        "b is due since its retry"
    );
    store
        .defer(&next[0].lease(), Duration::ZERO, "no capacity")
        .await
        .unwrap();
    assert_eq!(depth().await, 2);
    store
        .dead_letter(&next[1].lease(), "gave up")
        .await
        .unwrap();
    assert_eq!(depth().await, 1);
    store.requeue(&a).await.unwrap();
    assert_eq!(depth().await, 2, "a replayed event is queued again");
    store.requeue(&b).await.unwrap();
    assert_eq!(depth().await, 3, "a replayed dead letter is queued again");
    store.requeue(&c).await.unwrap();
    assert_eq!(depth().await, 3, "replaying a queued event queues it once");
    let all = claim(store.as_ref(), "w2").await;
    assert_eq!(all.len(), 3);
    for c in &all {
        store.complete(&c.lease(), &decision()).await.unwrap();
    }
    assert_eq!(depth().await, 0);
}

/// Claims hand out events by due time, then arrival: within one claim's
/// batch too, as a worker routes its batch in the order it gets it.
pub async fn claim_order_is_due_time_then_arrival(store: Arc<dyn Store>) {
    // Stamped at the same instant: due together, claimed in arrival order.
    let mut same = Vec::new();
    for d in ["order-a", "order-b", "order-c"] {
        let Appended::Stored(id) = store.append(event("o", d, "k")).await.unwrap() else {
            panic!("{d} is new")
        };
        same.push(id);
    }
    let first = store.claim("w1", 2, Duration::from_secs(60)).await.unwrap();
    assert_eq!(ids(&first), vec![same[0].as_str(), same[1].as_str()]);
    let rest = claim(store.as_ref(), "w1").await;
    assert_eq!(ids(&rest), vec![same[2].as_str()]);

    // Released in the order c, a (each due when released), b later still,
    // then a new arrival: due order, whatever the arrival order.
    let wait = || tokio::time::sleep(Duration::from_millis(5));
    store
        .retry_later(&rest[0].lease(), Duration::ZERO, "agent down")
        .await
        .unwrap();
    wait().await;
    store
        .retry_later(&first[0].lease(), Duration::ZERO, "agent down")
        .await
        .unwrap();
    wait().await;
    store
        .retry_later(&first[1].lease(), Duration::from_secs(5), "agent down")
        .await
        .unwrap();
    wait().await;
    let late = append_now(store.as_ref(), "order-late").await;
    let batch = claim(store.as_ref(), "w2").await;
    assert_eq!(
        ids(&batch),
        vec![same[2].as_str(), same[0].as_str(), late.as_str()],
        "one claim's batch is in due order"
    );
    for c in &batch {
        store
            .retry_later(&c.lease(), Duration::from_secs(60), "later")
            .await
            .unwrap();
    }
    let b = claim_when_ready(store.as_ref(), "w3").await;
    assert_eq!(ids(&b), vec![same[1].as_str()], "due once its delay passed");
}

/// A dead-lettered event leaves the work queue (never claimed again) and is
/// listed as dead, its reason the last error.
pub async fn dead_letter_leaves_the_queue(store: Arc<dyn Store>) {
    let x = append_now(store.as_ref(), "dead-x").await;
    let first = claim(store.as_ref(), "w1").await;
    assert_eq!(ids(&first), vec![x.as_str()]);
    store
        .retry_later(&first[0].lease(), Duration::ZERO, "agent down")
        .await
        .unwrap();
    let again = claim_when_ready(store.as_ref(), "w1").await;
    assert_eq!(ids(&again), vec![x.as_str()]);
    let y = append_now(store.as_ref(), "dead-y").await;
    store
        .dead_letter(&again[0].lease(), "payload rejected")
        .await
        .unwrap();
    assert_eq!(store.queue_depth().await.unwrap(), 1);
    let dead = store
        .list(&ListFilter {
            status: Some(EventStatus::Dead),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        dead.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec![x.as_str()]
    );
    assert_eq!(dead[0].status, EventStatus::Dead);
    assert_eq!(dead[0].attempts, 2);
    let rec = store.get(&x).await.unwrap().unwrap();
    assert_eq!(rec.summary.status, EventStatus::Dead);
    assert_eq!(rec.last_error.as_deref(), Some("payload rejected"));
    assert!(matches!(
        store.dead_letter(&again[0].lease(), "twice").await,
        Err(StoreError::LeaseLost(_))
    ));
    let rest = claim(store.as_ref(), "w2").await;
    assert_eq!(ids(&rest), vec![y.as_str()], "a dead letter is not claimed");
    store.complete(&rest[0].lease(), &decision()).await.unwrap();
    assert!(claim(store.as_ref(), "w2").await.is_empty());
    assert_eq!(store.queue_depth().await.unwrap(), 0);
}

/// `expire(cutoff)` removes exactly the settled events received before the
/// cutoff, with their decisions and dedup keys, except a dead letter
/// dead-lettered at or after the cutoff; newer events stay, and so does an
/// older one not routed yet (it goes once settled). Returns the ids it
/// expected removed.
pub async fn expire_removes_what_arrived_before_the_cutoff(store: Arc<dyn Store>) -> Vec<String> {
    let routed = append_now(store.as_ref(), "exp-routed").await;
    let dead_early = append_now(store.as_ref(), "exp-dead-early").await;
    let dead_late = append_now(store.as_ref(), "exp-dead-late").await;
    let pending = append_now(store.as_ref(), "exp-pending").await;
    let held = store.claim("w1", 3, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        ids(&held),
        vec![routed.as_str(), dead_early.as_str(), dead_late.as_str()]
    );
    store.complete(&held[0].lease(), &decision()).await.unwrap();
    store
        .dead_letter(&held[1].lease(), "before the cutoff")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cutoff = sluice::event::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let newer = append_now(store.as_ref(), "exp-newer").await;
    store
        .dead_letter(&held[2].lease(), "after the cutoff")
        .await
        .unwrap();
    assert_eq!(store.queue_depth().await.unwrap(), 2);

    let expired = store.expire(cutoff).await.unwrap();
    assert_eq!(
        (expired.events, expired.dead_letters),
        (2, 1),
        "{expired:?}"
    );
    for id in [&routed, &dead_early] {
        assert!(store.get(id).await.unwrap().is_none(), "{id} expired");
    }
    assert_eq!(
        store.get(&pending).await.unwrap().unwrap().summary.status,
        EventStatus::Pending,
        "an unrouted event is kept past the cutoff"
    );
    let kept = store.get(&dead_late).await.unwrap().unwrap();
    assert_eq!(kept.summary.status, EventStatus::Dead);
    assert_eq!(kept.last_error.as_deref(), Some("after the cutoff"));
    assert_eq!(
        store.get(&newer).await.unwrap().unwrap().summary.status,
        EventStatus::Pending
    );
    let all = store.list(&ListFilter::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec![newer.as_str(), pending.as_str(), dead_late.as_str()]
    );
    assert_eq!(store.queue_depth().await.unwrap(), 2);
    let left = claim(store.as_ref(), "w2").await;
    assert_eq!(ids(&left), vec![pending.as_str(), newer.as_str()]);
    assert_eq!(
        store.expire(cutoff).await.unwrap(),
        sluice::store::Expired::default(),
        "a second pass finds nothing while the old one is being routed"
    );
    // Once routed, the old one goes too.
    store.complete(&left[0].lease(), &decision()).await.unwrap();
    let expired = store.expire(cutoff).await.unwrap();
    assert_eq!(expired.events, 1, "{expired:?}");
    assert!(store.get(&pending).await.unwrap().is_none());
    // Its dedup key went with it: the same delivery again is a new event.
    let again = append_now(store.as_ref(), "exp-routed").await;
    assert_ne!(again, routed);
    vec![routed, dead_early, pending]
}

/// The work-queue semantics every backend must have, each part on a store
/// of its own that `open` makes empty.
pub async fn work_queue_conformance(open: impl AsyncFn() -> Arc<dyn Store>) {
    defer_gives_the_attempt_back(open().await).await;
    extend_renews_only_held_leases(open().await).await;
    queue_depth_counts_unsettled_events(open().await).await;
    claim_order_is_due_time_then_arrival(open().await).await;
    dead_letter_leaves_the_queue(open().await).await;
    expire_removes_what_arrived_before_the_cutoff(open().await).await;
    the_last_attempt_dead_letters(open().await).await;
    claims_past_the_last_attempt_dead_letter(open().await).await;
}

/// The backend owns the attempt count: a failed attempt is retried until the
/// last one allowed (three by default), which dead-letters the event.
pub async fn the_last_attempt_dead_letters(store: Arc<dyn Store>) {
    let id = append_now(store.as_ref(), "d-nak").await;
    for attempt in 1..=3u32 {
        let c = store.claim("w", 1, Duration::from_secs(60)).await.unwrap();
        assert_eq!(ids(&c), vec![id.as_str()]);
        assert_eq!(c[0].attempt, attempt);
        let released = store
            .retry_later(&c[0].lease(), Duration::ZERO, "agent down")
            .await
            .unwrap();
        let expected = if attempt < 3 {
            Released::Retrying
        } else {
            Released::DeadLettered
        };
        assert_eq!(released, expected, "attempt {attempt}");
    }
    assert!(claim(store.as_ref(), "w").await.is_empty());
    let rec = store.get(&id).await.unwrap().unwrap();
    assert_eq!(rec.summary.status, EventStatus::Dead);
    assert!(
        rec.last_error
            .as_deref()
            .unwrap_or("")
            .contains("agent down"),
        "{:?}",
        rec.last_error
    );
    assert_eq!(store.queue_depth().await.unwrap(), 0);
}

/// Claims whose workers never settled (they died mid-route) count too: the
/// claim after the last one allowed dead-letters the event instead of
/// handing it out again.
pub async fn claims_past_the_last_attempt_dead_letter(store: Arc<dyn Store>) {
    let id = append_now(store.as_ref(), "d-crashy").await;
    for attempt in 1..=3u32 {
        let c = claim_when_ready(store.as_ref(), "crashy").await;
        assert_eq!((ids(&c), c[0].attempt), (vec![id.as_str()], attempt));
        // Not settled: the next claim waits for this lease to lapse.
        store
            .extend(&[c[0].lease()], Duration::from_millis(50))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert!(claim(store.as_ref(), "w").await.is_empty());
    let rec = store.get(&id).await.unwrap().unwrap();
    assert_eq!(rec.summary.status, EventStatus::Dead);
    assert_eq!(
        rec.last_error.as_deref(),
        Some("routing never finished in 3 claims")
    );
    assert_eq!(store.queue_depth().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_work_queue_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let opened = std::sync::atomic::AtomicUsize::new(0);
    work_queue_conformance(async || {
        let n = opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let store = SqliteStore::open(&dir.path().join(format!("{n}/s.db")), 64).unwrap();
        let store: Arc<dyn Store> = Arc::new(store);
        store
    })
    .await;
}

/// Retention takes an expired event's decisions with it, and the store
/// reopened holds what the pass left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_expire_drops_decisions_for_good() {
    use sluice::store::EventReader;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let store = Arc::new(SqliteStore::open(&path, 64).unwrap());
    let gone = expire_removes_what_arrived_before_the_cutoff(store.clone()).await;
    let reader = SqliteStore::open_read_only(&path).unwrap();
    let decided: Vec<String> = reader
        .decisions(100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.event_id)
        .collect();
    assert!(
        gone.iter().all(|id| !decided.contains(id)),
        "an expired event's decision is still listed: {decided:?}"
    );
    store.close();
    let store = SqliteStore::open(&path, 64).unwrap();
    assert_eq!(store.list(&ListFilter::default()).await.unwrap().len(), 3);
    assert_eq!(store.queue_depth().await.unwrap(), 2);
}

/// A claim reads the work queue's `queue_due` index in claim order: a range
/// scan of the rows it takes, never a sort of every due row.
#[test]
fn sqlite_claim_reads_the_due_index_without_sorting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    SqliteStore::open(&path, 8).unwrap().close();
    let plan = SqliteStore::open_read_only(&path)
        .unwrap()
        .claim_plan()
        .unwrap();
    assert!(
        plan.iter()
            .any(|step| step.contains("USING COVERING INDEX queue_due")),
        "{plan:?}"
    );
    assert!(
        !plan.iter().any(|step| step.contains("TEMP B-TREE")),
        "{plan:?}"
    );
}

/// An event whose index write fails half-way (its row in, its queue entry
/// not) is not committed half: the batch's records are indexed whole or
/// not at all, and the replay from the log mends it, so it is routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_half_indexed_event_is_mended_by_the_replay() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let store = SqliteStore::open(&db, 64).unwrap();
    let body = |tag: &str| Bytes::from(format!("{{\"tag\":\"{tag}\"}}"));
    let id = |a: Appended| match a {
        Appended::Stored(id) => id,
        other => panic!("{other:?}"),
    };
    let a = id(store
        .append(event_with_body("s", "a", "k", body("a")))
        .await
        .unwrap());
    let side = rusqlite::Connection::open(&db).unwrap();
    side.busy_timeout(Duration::from_secs(10)).unwrap();
    side.execute_batch(
        "CREATE TRIGGER inject BEFORE INSERT ON queue BEGIN SELECT RAISE(ABORT, 'injected'); END;",
    )
    .unwrap();
    let b = id(store
        .append(event_with_body("s", "b", "k", body("b")))
        .await
        .unwrap());
    side.execute_batch("DROP TRIGGER inject;").unwrap();
    let c = id(store
        .append(event_with_body("s", "c", "k", body("c")))
        .await
        .unwrap());
    let claimed: Vec<String> = store
        .claim("w", 10, Duration::from_secs(30))
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.event.id)
        .collect();
    assert_eq!(claimed, vec![a, b, c]);
    assert_eq!(store.queue_depth().await.unwrap(), 3);
}
