//! The NATS backend's dispatch role against a real `nats-server -js`:
//! deliveries queued by routing, claimed per agent, retried after a delay,
//! dead-lettered and retried from the DLQ, one delivery per idempotency key
//! when an event is routed twice, and two nodes sharing the work.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use sluice::config::Config;
use sluice::decision::{Decision, Priority, Route};
use sluice::dispatch::envelope::idempotency_key;
use sluice::event::{Provider, now_ms};
use sluice::ingress::NewEvent;
use sluice::ingress::normalize::{Naming, normalize};
use sluice::ingress::verify::Verifier;
use sluice::store::dispatch::{
    AttemptRecord, DeliveryFilter, DeliveryStatus, DispatchStore, Settle, delivery_name,
};
use sluice::store::nats::{NatsOptions, NatsStore};
use sluice::store::{Appended, Store, StoreError};

use crate::nats_cluster::Nats;

/// A node's options: `prefix` shared by the nodes of one test, the index
/// its own; a one-second ack wait so a dead node's claims come back fast.
fn options(url: &str, prefix: &str, dir: &Path, node: &str) -> NatsOptions {
    NatsOptions {
        url: url.to_owned(),
        credentials: None,
        replicas: 1,
        prefix: prefix.to_owned(),
        index_path: dir.join(format!("{node}-index.db")),
        dedup_ttl: Duration::from_secs(3600),
        max_attempts: 5,
        ack_wait: Duration::from_secs(1),
        append_timeout: Duration::from_secs(5),
    }
}

/// Opens node `node` of the store under `prefix` on `server`.
async fn open_node(server: &Nats, prefix: &str, dir: &Path, node: &str) -> NatsStore {
    NatsStore::open(options(&server.url(), prefix, dir, node))
        .await
        .unwrap()
}

/// A generic-provider event received now, with an unsigned delivery id.
fn new_event(delivery: &str) -> NewEvent {
    let mut h = HeaderMap::new();
    h.insert("x-delivery", HeaderValue::from_str(delivery).unwrap());
    let naming = Naming {
        delivery_header: Some(HeaderName::from_static("x-delivery")),
        kind_header: None,
    };
    let verified = Verifier::None
        .verify_at(h, Bytes::from_static(br#"{"n":1}"#), 0)
        .unwrap();
    normalize("src", Provider::Hmac, &naming, verified, now_ms()).unwrap()
}

fn route(agent: &str, priority: Priority) -> Route {
    Route {
        agent: agent.into(),
        workflow: None,
        priority,
        reason: "test".into(),
        labels: vec![],
        ordering_key: None,
        payload: None,
    }
}

fn decision(routes: Vec<Route>) -> Decision {
    Decision {
        rules: vec![],
        routes,
        dead_letter: None,
        defer: None,
        decided_at_ms: now_ms(),
    }
}

async fn append(store: &NatsStore, delivery: &str) -> String {
    match store.append(new_event(delivery)).await.unwrap() {
        Appended::Stored(id) => id,
        other => panic!("expected a new event, got {other:?}"),
    }
}

/// Appends an event and routes it along `routes`, as a router would.
async fn routed(store: &NatsStore, delivery: &str, routes: Vec<Route>) -> String {
    let id = append(store, delivery).await;
    let claimed = store
        .claim("router", 16, Duration::from_secs(30))
        .await
        .unwrap();
    let c = claimed
        .into_iter()
        .find(|c| c.event.id == id)
        .expect("the event is claimable");
    store.complete(&c.lease(), &decision(routes)).await.unwrap();
    id
}

fn record(attempt: u32, outcome: &str, error: Option<&str>) -> AttemptRecord {
    AttemptRecord {
        attempt,
        at_ms: now_ms(),
        outcome: outcome.into(),
        status: error.map(|_| 503),
        latency_us: 1_000,
        error: error.map(str::to_owned),
        response_bytes: 0,
    }
}

/// Claims for `agent` until something comes or `within` passes.
async fn claim_within(
    store: &NatsStore,
    agent: &str,
    worker: &str,
    lease: Duration,
    within: Duration,
) -> Vec<sluice::store::dispatch::ClaimedDelivery> {
    let start = Instant::now();
    loop {
        let got = store
            .claim_deliveries(agent, worker, 16, lease)
            .await
            .unwrap();
        if !got.is_empty() || start.elapsed() > within {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unique_prefix(name: &str) -> String {
    format!("t{}-{name}", std::process::id())
}

#[tokio::test]
async fn deliveries_retry_after_their_delay_die_and_come_back_from_the_dlq() {
    let server = Nats::single().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("life");
    let store = open_node(&server, &prefix, dir.path(), "a").await;
    let alpha = route("alpha", Priority::Medium);
    let beta = route("beta", Priority::High);
    let mut flow = route("alpha", Priority::Low);
    flow.workflow = Some("ship".into());
    let event = routed(&store, "d-1", vec![alpha.clone(), beta.clone(), flow]).await;

    // One delivery per route, under the deterministic key.
    let got = store
        .claim_deliveries("alpha", "w1", 16, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "one delivery to alpha is claimable");
    let d = &got[0];
    assert_eq!(d.event.id, event);
    assert_eq!(d.event.body.as_ref(), br#"{"n":1}"#);
    assert_eq!(d.idempotency_key, idempotency_key(&event, &alpha, None));
    assert_eq!((d.attempt, d.round_attempt), (1, 1));
    let n = d.id;
    assert!(
        store
            .claim_deliveries("alpha", "w2", 16, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty(),
        "a held delivery is not handed out twice"
    );

    // A workflow route is dead-lettered with the reason, not dropped.
    let dead = store.dead_letters(10).await.unwrap();
    let wf = dead
        .iter()
        .find(|x| {
            x.event_id == event && x.agent.as_deref() == Some("alpha") && x.id != delivery_name(n)
        })
        .expect("the workflow route is in the DLQ");
    assert!(
        wf.reason.contains("workflows need the embedded backend"),
        "{}",
        wf.reason
    );

    // A retry in 1.5 s: not claimable before.
    let due = now_ms() + 1_500;
    store
        .settle_delivery(
            &d.lease(),
            &record(1, "retry", Some("HTTP 503")),
            Settle::RetryAt(due),
        )
        .await
        .unwrap();
    assert!(
        store
            .claim_deliveries("alpha", "w1", 16, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty(),
        "a retry is not claimable before its time"
    );
    let again = claim_within(
        &store,
        "alpha",
        "w1",
        Duration::from_secs(30),
        Duration::from_secs(6),
    )
    .await;
    assert_eq!(again.len(), 1, "the retry comes back");
    let claimed_at = now_ms();
    assert!(
        claimed_at >= due - 50,
        "claimed {} ms early",
        due - claimed_at
    );
    let d2 = &again[0];
    assert_eq!((d2.id, d2.attempt, d2.round_attempt), (n, 2, 2));
    assert_eq!(d2.idempotency_key, d.idempotency_key);

    // An old lease cannot settle it.
    let lost = store
        .settle_delivery(
            &d.lease(),
            &record(1, "delivered", None),
            Settle::Delivered(None),
        )
        .await;
    assert!(matches!(lost, Err(StoreError::LeaseLost(_))), "{lost:?}");

    // Dead: listed in the DLQ, with a copy on the DLQ stream.
    store
        .settle_delivery(
            &d2.lease(),
            &record(2, "failed", Some("HTTP 410")),
            Settle::Dead("failed for good: HTTP 410".into()),
        )
        .await
        .unwrap();
    let dead = store.dead_letters(10).await.unwrap();
    let entry = dead
        .iter()
        .find(|x| x.id == delivery_name(n))
        .expect("the dead delivery is listed");
    assert_eq!(entry.kind, "delivery");
    assert_eq!(entry.reason, "failed for good: HTTP 410");
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let dlq = js
        .get_stream(format!(
            "{}_DLQ",
            prefix.to_ascii_uppercase().replace('-', "_")
        ))
        .await
        .unwrap();
    let copy = dlq
        .get_last_raw_message_by_subject(&format!("{prefix}.dlq.delivery.alpha"))
        .await
        .unwrap();
    assert_eq!(
        copy.headers.get("Sluice-Delivery").unwrap().as_str(),
        n.to_string()
    );
    assert!(
        !store.retry_delivery(n + 1000).await.unwrap(),
        "no such delivery"
    );

    // Retried from the DLQ: the same delivery and key, a fresh round.
    assert!(store.retry_delivery(n).await.unwrap());
    assert!(!store.retry_delivery(n).await.unwrap(), "not dead any more");
    let third = claim_within(
        &store,
        "alpha",
        "w1",
        Duration::from_secs(30),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(third.len(), 1);
    let d3 = &third[0];
    assert_eq!((d3.id, d3.attempt, d3.round_attempt), (n, 3, 1));
    assert_eq!(d3.idempotency_key, d.idempotency_key);
    store
        .settle_delivery(
            &d3.lease(),
            &record(3, "delivered", None),
            Settle::Delivered(None),
        )
        .await
        .unwrap();
    let attempts = store.attempts(n).await.unwrap();
    let seen: Vec<(u32, &str)> = attempts
        .iter()
        .map(|a| (a.attempt, a.outcome.as_str()))
        .collect();
    assert_eq!(seen, [(1, "retry"), (2, "failed"), (3, "delivered")]);
    let listed = store
        .deliveries(&DeliveryFilter {
            agent: Some("alpha".into()),
            status: Some(DeliveryStatus::Delivered),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].attempts, listed[0].settled_at_ms.is_some()),
        (3, true)
    );
    assert!(
        store
            .claim_deliveries("alpha", "w1", 16, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty(),
        "nothing left for alpha"
    );

    // Beta's delivery carries its priority; counts see it queued.
    let counts = store.dispatch_counts().await.unwrap();
    assert_eq!(counts.queued, vec![("beta".to_string(), 1)]);
    let b = store
        .claim_deliveries("beta", "w1", 16, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].route.priority, Priority::High);
    store.close().await;
}

#[tokio::test]
async fn the_most_urgent_delivery_is_claimed_first_and_a_paused_agent_gets_none() {
    let server = Nats::single().await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_node(&server, &unique_prefix("prio"), dir.path(), "a").await;
    let low = routed(&store, "p-1", vec![route("alpha", Priority::Low)]).await;
    let critical = routed(&store, "p-2", vec![route("alpha", Priority::Critical)]).await;
    let medium = routed(&store, "p-3", vec![route("alpha", Priority::Medium)]).await;
    store.set_paused("alpha", true).await.unwrap();
    assert_eq!(store.paused().await.unwrap(), ["alpha"]);
    assert!(
        store
            .claim_deliveries("alpha", "w", 1, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
    store.set_paused("alpha", false).await.unwrap();
    assert!(store.paused().await.unwrap().is_empty());
    let mut order = Vec::new();
    for _ in 0..3 {
        let got = store
            .claim_deliveries("alpha", "w", 1, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        order.push(got[0].event.id.clone());
    }
    assert_eq!(order, [critical, medium, low]);
    store.close().await;
}

#[tokio::test]
async fn an_event_routed_twice_keeps_one_delivery_per_agent() {
    let server = Nats::single().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("twice");
    let routes = vec![
        route("alpha", Priority::Medium),
        route("beta", Priority::Low),
    ];
    let a = open_node(&server, &prefix, dir.path(), "a").await;
    let id = append(&a, "t-1").await;
    // Node A publishes the deliveries, as `complete` does first, and dies
    // before the state says routed.
    let claimed = a
        .claim("router-a", 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claimed[0].event.id, id);
    a.queue_routes(&id, &decision(routes.clone()))
        .await
        .unwrap();
    drop(a);
    // Node B routes it again once the ack wait lets the event go.
    let b = open_node(&server, &prefix, dir.path(), "b").await;
    let start = Instant::now();
    let c = loop {
        let got = b
            .claim("router-b", 1, Duration::from_secs(30))
            .await
            .unwrap();
        if let Some(c) = got.into_iter().next() {
            break c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the event never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((c.event.id.as_str(), c.attempt), (id.as_str(), 2));
    b.complete(&c.lease(), &decision(routes.clone()))
        .await
        .unwrap();
    // An operator replay within the duplicate window routes it a third time.
    b.requeue(&id).await.unwrap();
    let c = claim_event(&b, &id).await;
    b.complete(&c.lease(), &decision(routes.clone()))
        .await
        .unwrap();

    for r in &routes {
        let got = b
            .claim_deliveries(&r.agent, "w", 16, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(got.len(), 1, "exactly one delivery to {}", r.agent);
        assert_eq!(got[0].idempotency_key, idempotency_key(&id, r, None));
    }
    let listed = b
        .deliveries(&DeliveryFilter {
            event_id: Some(id.clone()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    b.close().await;
}

async fn claim_event(store: &NatsStore, id: &str) -> sluice::store::Claimed {
    let start = Instant::now();
    loop {
        let got = store
            .claim("router", 16, Duration::from_secs(30))
            .await
            .unwrap();
        if let Some(c) = got.into_iter().find(|c| c.event.id == id) {
            return c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{id} never claimable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_nodes_share_deliveries_and_take_over_lapsed_claims() {
    let server = Nats::single().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("nodes");
    let a = open_node(&server, &prefix, dir.path(), "a").await;
    let b = open_node(&server, &prefix, dir.path(), "b").await;
    // B's loop is woken by A's queueing.
    let mut signal = b.delivery_signal("alpha");
    signal.borrow_and_update();
    let first = routed(&a, "n-1", vec![route("alpha", Priority::Medium)]).await;
    tokio::time::timeout(Duration::from_secs(2), signal.changed())
        .await
        .expect("node B is woken when node A queues")
        .unwrap();

    // A claims with a short lease and never settles: B gets it once the
    // lease lapses, not before.
    let held = a
        .claim_deliveries("alpha", "node-a", 16, Duration::from_millis(800))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].event.id, first);
    assert!(
        b.claim_deliveries("alpha", "node-b", 16, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
    let taken = claim_within(
        &b,
        "alpha",
        "node-b",
        Duration::from_secs(30),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(taken.len(), 1, "node B takes the lapsed claim");
    assert_eq!((taken[0].id, taken[0].attempt), (held[0].id, 2));
    let late = a
        .settle_delivery(
            &held[0].lease(),
            &record(1, "delivered", None),
            Settle::Delivered(None),
        )
        .await;
    assert!(matches!(late, Err(StoreError::LeaseLost(_))), "{late:?}");
    b.settle_delivery(
        &taken[0].lease(),
        &record(2, "delivered", None),
        Settle::Delivered(None),
    )
    .await
    .unwrap();
    // A's index hears of it through the feed.
    let start = Instant::now();
    loop {
        let seen = a
            .deliveries(&DeliveryFilter {
                event_id: Some(first.clone()),
                limit: 5,
                ..Default::default()
            })
            .await
            .unwrap();
        if seen
            .first()
            .is_some_and(|d| d.status == DeliveryStatus::Delivered)
        {
            assert_eq!(seen[0].attempts, 2);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "A's index never saw the delivery settle: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A node that dies holding a delivery: the ack wait gives it to B.
    let second = routed(&b, "n-2", vec![route("alpha", Priority::Medium)]).await;
    let held = a
        .claim_deliveries("alpha", "node-a", 16, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].event.id, second);
    drop(a);
    let start = Instant::now();
    let taken = claim_within(
        &b,
        "alpha",
        "node-b",
        Duration::from_secs(30),
        Duration::from_secs(8),
    )
    .await;
    assert_eq!(taken.len(), 1, "node B takes a dead node's claim");
    assert_eq!(taken[0].id, held[0].id);
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "not before the ack wait"
    );
    b.close().await;
}

#[test]
fn workflows_are_refused_with_the_nats_backend() {
    let text = "[store]\nbackend = \"nats\"\n\n[agents.build]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/\"\n\n\
                [workflows.ship]\nsteps = [{ agent = \"build\" }]\n";
    let e = Config::parse(text, "test.toml")
        .and_then(|c| c.validate().map(|_| c))
        .expect_err("workflows with the nats backend are refused")
        .to_string();
    assert!(e.contains("workflows.ship"), "{e}");
    assert!(e.contains("embedded backend"), "{e}");
    let embedded = text.replace("backend = \"nats\"", "backend = \"embedded\"");
    Config::parse(&embedded, "test.toml")
        .unwrap()
        .validate()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_on_two_nodes_deliver_everything_through_retries() {
    use crate::agent_server::{AgentServer, Script};
    use crate::dispatch::{AGENT_SECRET, http_agent};
    use sluice::dispatch::dispatcher::Dispatcher;
    use std::sync::Arc;

    let server = Nats::single().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("run");
    let agents = AgentServer::start(AGENT_SECRET).await;
    // Every delivery's first attempt fails: each goes through a retry.
    agents.script(
        "alpha",
        Script {
            fail_first: 1,
            ..Default::default()
        },
    );
    let key = dir.path().join("agent.key");
    std::fs::write(&key, AGENT_SECRET).unwrap();
    let text = format!(
        "[server]\ndata_dir = {:?}\n\n[dispatch]\nsigning_secret = {{ file = {:?} }}\n\n{}",
        dir.path().display().to_string(),
        key.display().to_string(),
        // A breaker that stays closed: every first attempt fails on purpose.
        http_agent(
            "alpha",
            &agents.url("alpha"),
            "breaker = { failures = 1000, cooldown = \"1s\" }"
        )
    );
    let config = Config::parse(&text, "test.toml").unwrap();
    config.validate().unwrap();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut nodes = Vec::new();
    let mut runs = Vec::new();
    for node in ["a", "b"] {
        let store = Arc::new(open_node(&server, &prefix, dir.path(), node).await);
        let d =
            Dispatcher::build(&config, store.clone(), sluice::secret::Generate::IfMissing).unwrap();
        runs.push(tokio::spawn(d.run(stop.clone())));
        nodes.push(store);
    }
    // Events routed on both nodes, while both dispatchers run.
    let mut events = Vec::new();
    for n in 0..10 {
        let node = &nodes[n % 2];
        events.push(
            routed(
                node,
                &format!("r-{n}"),
                vec![route("alpha", Priority::Medium)],
            )
            .await,
        );
    }
    agents
        .until(Duration::from_secs(20), "every event delivered", |seen| {
            let ok: std::collections::HashSet<_> = seen
                .iter()
                .filter(|r| r.status == 200)
                .map(|r| r.id.clone())
                .collect();
            ok.len() >= events.len()
        })
        .await;
    let seen = agents.seen();
    assert!(seen.iter().all(|r| r.verified), "every attempt is signed");
    // One idempotency key per event, the one the store derives.
    let want: std::collections::BTreeSet<String> = events
        .iter()
        .map(|e| idempotency_key(e, &route("alpha", Priority::Medium), None))
        .collect();
    let got: std::collections::BTreeSet<String> = seen.iter().map(|r| r.id.clone()).collect();
    assert_eq!(got, want);
    // Both nodes' listings agree: everything delivered in two attempts.
    for store in &nodes {
        let start = Instant::now();
        loop {
            let done = store
                .deliveries(&DeliveryFilter {
                    status: Some(DeliveryStatus::Delivered),
                    limit: 100,
                    ..Default::default()
                })
                .await
                .unwrap();
            if done.len() == events.len() {
                assert!(done.iter().all(|d| d.attempts == 2), "{done:?}");
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{} delivered: {done:?}",
                done.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop_tx.send(true).unwrap();
    for r in runs {
        r.await.unwrap();
    }
    for store in nodes {
        store.close().await;
    }
}

#[tokio::test]
async fn deliveries_sharing_an_ordering_key_go_one_at_a_time_in_arrival_order() {
    let server = Nats::single().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("order");
    let a = open_node(&server, &prefix, dir.path(), "a").await;
    let b = open_node(&server, &prefix, dir.path(), "b").await;
    let keyed = |key: &str| {
        let mut r = route("alpha", Priority::Medium);
        r.ordering_key = Some(key.into());
        r
    };
    // Arrival order: e1, e2, e3 (e2 routed first), then one of another key.
    let e1 = append(&a, "o-1").await;
    let e2 = append(&a, "o-2").await;
    let e3 = append(&a, "o-3").await;
    let claimed = a
        .claim("router", 16, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    for id in [&e2, &e1, &e3] {
        let c = claimed.iter().find(|c| &c.event.id == id).unwrap();
        a.complete(&c.lease(), &decision(vec![keyed("k")]))
            .await
            .unwrap();
    }
    let other = routed(&a, "o-4", vec![keyed("j")]).await;

    let first = a
        .claim_deliveries("alpha", "wa", 16, Duration::from_secs(30))
        .await
        .unwrap();
    let ids: Vec<&str> = first.iter().map(|d| d.event.id.as_str()).collect();
    assert_eq!(ids.len(), 2, "one per key: {ids:?}");
    assert!(
        ids.contains(&e1.as_str()) && ids.contains(&other.as_str()),
        "{ids:?}"
    );
    let held = first.iter().find(|d| d.event.id == e1).unwrap();
    // Another node gets nothing of key k while e1 is unsettled, even
    // through a retry.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        b.claim_deliveries("alpha", "wb", 16, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
    a.settle_delivery(
        &held.lease(),
        &record(1, "retry", Some("HTTP 503")),
        Settle::RetryAt(now_ms() + 300),
    )
    .await
    .unwrap();
    let again = claim_within(
        &b,
        "alpha",
        "wb",
        Duration::from_secs(30),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].event.id, e1, "the retry keeps its place");
    b.settle_delivery(
        &again[0].lease(),
        &record(2, "delivered", None),
        Settle::Delivered(None),
    )
    .await
    .unwrap();
    // Then e2, then e3, each only once the one before settled.
    for want in [&e2, &e3] {
        let got = claim_within(
            &b,
            "alpha",
            "wb",
            Duration::from_secs(30),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(got.len(), 1, "one at a time");
        assert_eq!(&got[0].event.id, want);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            a.claim_deliveries("alpha", "wa", 16, Duration::from_secs(30))
                .await
                .unwrap()
                .is_empty(),
            "nothing else of key k while {want} is out"
        );
        b.settle_delivery(
            &got[0].lease(),
            &record(1, "delivered", None),
            Settle::Delivered(None),
        )
        .await
        .unwrap();
    }
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn an_agent_name_that_is_no_subject_token_still_gets_its_deliveries() {
    let server = Nats::single().await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_node(&server, &unique_prefix("names"), dir.path(), "a").await;
    // A rule may name any agent; dots, spaces and '>' are subject syntax.
    let odd = "ops.team >*";
    let event = routed(
        &store,
        "x-1",
        vec![route(odd, Priority::High), route("ops", Priority::High)],
    )
    .await;
    let got = store
        .claim_deliveries(odd, "w", 16, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].event.id.as_str(), got[0].route.agent.as_str()),
        (event.as_str(), odd)
    );
    let plain = store
        .claim_deliveries("ops", "w", 16, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(plain.len(), 1, "the plain name's queue is its own");
    assert_eq!(plain[0].route.agent, "ops");
    store.close().await;
}
