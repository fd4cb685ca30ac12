//! Scale-out on NATS JetStream, with real processes only: `sluice serve`
//! nodes sharing a three-server `nats-server -js` cluster, deliveries to a
//! real agent server over loopback HTTP.
//!
//! - Two nodes take the same deliveries (a load balancer retrying on the
//!   other node) while one is SIGKILLed under load: every event that got a
//!   202 is routed once and reaches each of its agents under one
//!   idempotency key, the survivor taking over the dead node's claims.
//! - NATS servers are killed and restarted under load: one of three down,
//!   intake keeps answering 202; two down (no quorum), it answers 503 until
//!   quorum returns; nothing that got a 202 is lost.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use serde_json::json;
use sluice::store::Store;
use sluice::store::nats::{NatsOptions, NatsStore};

use crate::agent_server::{AgentServer, Script};
use crate::dispatch::{AGENT_SECRET, dispatch_env, http_agent};
use crate::nats_cluster::Nats;
use crate::support::{Env, ServeChild, client};
use sluice::cli::send::Signed;

/// A node's config: the dispatch test env routing as each body says, on
/// the cluster `nats` under `prefix`, with a 2 s routing lease (and ack
/// wait) so a dead node's claims come back quickly.
fn node_env(nats: &Nats, prefix: &str, agents: &str) -> Env {
    let env = dispatch_env(
        agents,
        &format!(
            "[store]\nbackend = \"nats\"\nappend_timeout = \"5s\"\n[store.nats]\nurl = {:?}\nreplicas = {}\nprefix = {prefix:?}\n",
            nats.url(),
            nats.len()
        ),
    );
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(
        &env.config_path,
        text.replacen("[rules]\n", "[rules]\nlease_ms = 2000\n", 1),
    )
    .unwrap();
    env
}

/// The body of event `n`, routed to `agents`.
fn body(n: usize, agents: &[&str]) -> Bytes {
    let routes: Vec<_> = agents
        .iter()
        .map(|a| json!({"agent": a, "priority": "medium", "reason": "test"}))
        .collect();
    Bytes::from(
        serde_json::to_vec(&json!({"type": "test.event", "n": n, "routes": routes})).unwrap(),
    )
}

/// Posts a signed request to `base`: the status and event id, or `None`
/// when the node did not answer (it is dead).
async fn deliver(base: &str, signed: &Signed) -> Option<(StatusCode, String)> {
    let mut req = http::Request::post(format!("{base}/hooks/standard"));
    for (h, v) in &signed.headers {
        req = req.header(h, v.as_str());
    }
    let req = req
        .body(http_body_util::Full::new(signed.body.clone()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(15), client().request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .ok()?
        .to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    Some((status, answer["id"].as_str().unwrap_or_default().to_owned()))
}

/// A store on the cluster under `prefix` (a node of its own, for reading).
async fn reader(nats: &Nats, prefix: &str, dir: &std::path::Path) -> NatsStore {
    NatsStore::open(NatsOptions {
        url: nats.url(),
        credentials: None,
        replicas: nats.len(),
        prefix: prefix.to_owned(),
        index_path: dir.join("reader-index.db"),
        dedup_ttl: Duration::from_secs(3600),
        max_attempts: 3,
        ack_wait: Duration::from_secs(2),
        append_timeout: Duration::from_secs(5),
    })
    .await
    .expect("open a reader on the cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_the_work_and_the_survivor_takes_over_a_killed_nodes() {
    const EVENTS: usize = 150;
    let nats = Nats::cluster().await;
    let agents = AgentServer::start(AGENT_SECRET).await;
    agents.script(
        "alpha",
        Script {
            latency: Some(Duration::from_millis(10)),
            ..Default::default()
        },
    );
    // Slow enough that the node killed has deliveries to beta in flight.
    agents.script(
        "beta",
        Script {
            latency: Some(Duration::from_millis(150)),
            ..Default::default()
        },
    );
    let declared = [
        http_agent("alpha", &agents.url("alpha"), "concurrency = 4"),
        http_agent("beta", &agents.url("beta"), "concurrency = 4"),
    ]
    .concat();
    let a_env = node_env(&nats, "two", &declared);
    let b_env = node_env(&nats, "two", &declared);
    let mut a = ServeChild::spawn(&a_env.config_path);
    let b = ServeChild::spawn(&b_env.config_path);
    // Both nodes verify with the same source secret (the test env's).
    let signer = a_env.signer("standard");
    let mut accepted: HashSet<String> = HashSet::new();
    let mut killed_at = None;
    for n in 0..EVENTS {
        let signed = signer
            .sign("test.event", &body(n, &["alpha", "beta"]))
            .unwrap();
        // The load balancer sends to A, and again to B (a retry).
        let mut ids = Vec::new();
        for base in [&a.base, &b.base] {
            if let Some((status, id)) = deliver(base, &signed).await {
                assert!(
                    status == StatusCode::ACCEPTED || status == StatusCode::OK,
                    "event {n}: {status}"
                );
                ids.push(id);
            }
        }
        assert!(!ids.is_empty(), "event {n}: neither node answered");
        assert!(
            ids.windows(2).all(|w| w[0] == w[1]),
            "event {n}: both nodes answer with the one event id: {ids:?}"
        );
        accepted.insert(ids[0].clone());
        if killed_at.is_none() && agents.delivered("beta").len() >= 20 {
            a.kill();
            killed_at = Some(n);
        }
    }
    let killed_at = killed_at.expect("node A was killed under load");
    assert!(
        killed_at < EVENTS - 20,
        "killed mid-way (after event {killed_at})"
    );
    agents
        .until(
            Duration::from_secs(90),
            "every event at both agents",
            |seen| {
                ["alpha", "beta"].iter().all(|agent| {
                    seen.iter()
                        .filter(|r| r.agent == *agent && r.status == 200)
                        .map(|r| r.body["event"]["id"].as_str().unwrap_or("").to_owned())
                        .collect::<HashSet<_>>()
                        .is_superset(&accepted)
                })
            },
        )
        .await;
    let seen = agents.seen();
    assert!(seen.iter().all(|r| r.verified), "every delivery verifies");
    for agent in ["alpha", "beta"] {
        let mut keys: BTreeMap<String, HashSet<String>> = BTreeMap::new();
        for r in seen.iter().filter(|r| r.agent == agent) {
            keys.entry(r.body["event"]["id"].as_str().unwrap().to_owned())
                .or_default()
                .insert(r.id.clone());
        }
        assert_eq!(
            keys.keys().cloned().collect::<HashSet<_>>(),
            accepted,
            "{agent}: exactly the accepted events"
        );
        assert!(
            keys.values().all(|k| k.len() == 1),
            "{agent}: one idempotency key per event"
        );
    }
    // The survivor took over what the killed node held: a delivery A had
    // out to beta when it died went again, from B, under the same key.
    let beta_keys: HashSet<&str> = seen
        .iter()
        .filter(|r| r.agent == "beta")
        .map(|r| r.id.as_str())
        .collect();
    assert!(
        beta_keys.iter().any(|k| agents.arrivals("beta", k) >= 2),
        "no delivery the killed node held was sent again"
    );
    // Routed once: one decision per event, whichever node made it.
    let dir = tempfile::tempdir().unwrap();
    let store = reader(&nats, "two", dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let decided = sluice::store::EventReader::decisions(&store, 10 * EVENTS)
            .await
            .unwrap();
        let mut per_event: HashMap<String, usize> = HashMap::new();
        for d in &decided {
            *per_event.entry(d.event_id.clone()).or_default() += 1;
        }
        if per_event.len() == accepted.len() {
            assert!(
                per_event.values().all(|n| *n == 1),
                "an event was routed twice"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reader's index holds {} of {} decisions",
            per_event.len(),
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &accepted {
        let rec = store.get(id).await.unwrap().expect("held");
        assert_eq!(
            rec.summary.status,
            sluice::event::EventStatus::Routed,
            "{id}"
        );
    }
    store.close().await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_answers_503_without_quorum_and_loses_nothing_that_got_a_202() {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let mut nats = Nats::cluster().await;
    let agents = AgentServer::start(AGENT_SECRET).await;
    let env = node_env(
        &nats,
        "quorum",
        &http_agent("sink", &agents.url("sink"), ""),
    );
    let node = ServeChild::spawn(&env.config_path);
    let accepted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let statuses: Arc<Mutex<Vec<(usize, StatusCode)>>> = Arc::default();
    // Load, one event after another, through every phase; a 503 is
    // retried later as a sender would, under a new body.
    let phase = Arc::new(AtomicUsize::new(0));
    let load = {
        let (accepted, statuses, phase, base) = (
            accepted.clone(),
            statuses.clone(),
            phase.clone(),
            node.base.clone(),
        );
        let signer = env.signer("standard");
        tokio::spawn(async move {
            let mut n = 0;
            while phase.load(Relaxed) < 4 {
                let signed = signer.sign("test.event", &body(n, &["sink"])).unwrap();
                let p = phase.load(Relaxed);
                if let Some((status, id)) = deliver(&base, &signed).await {
                    // A request that spans a change of phase counts in neither.
                    let p = if phase.load(Relaxed) == p {
                        p
                    } else {
                        usize::MAX
                    };
                    statuses.lock().unwrap().push((p, status));
                    if status == StatusCode::ACCEPTED {
                        accepted.lock().unwrap().insert(id);
                    } else {
                        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "event {n}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                n += 1;
            }
        })
    };
    let count = |p: usize, s: StatusCode| {
        statuses
            .lock()
            .unwrap()
            .iter()
            .filter(|(q, t)| *q == p && *t == s)
            .count()
    };
    let wait_for = async |p: usize, s: StatusCode, n: usize, what: &str| {
        let start = Instant::now();
        while count(p, s) < n {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{what}: {:?}",
                statuses
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(q, _)| *q == p)
                    .count()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // All three up.
    wait_for(0, StatusCode::ACCEPTED, 20, "202s with all servers up").await;
    // One of three down: intake keeps answering 202.
    nats.kill(2);
    phase.store(1, Relaxed);
    wait_for(1, StatusCode::ACCEPTED, 40, "202s with one server down").await;
    // Two of three down, no quorum: 503s.
    nats.kill(1);
    phase.store(2, Relaxed);
    wait_for(2, StatusCode::SERVICE_UNAVAILABLE, 3, "503s without quorum").await;
    // Quorum back: 202s again.
    nats.restart(1).await;
    phase.store(3, Relaxed);
    wait_for(3, StatusCode::ACCEPTED, 20, "202s once quorum returned").await;
    nats.restart(2).await;
    phase.store(4, Relaxed);
    load.await.unwrap();
    assert_eq!(
        count(1, StatusCode::SERVICE_UNAVAILABLE),
        0,
        "one server down: no 503"
    );
    let accepted = accepted.lock().unwrap().clone();
    // Nothing that got a 202 is lost: each is held and delivered.
    agents
        .until(
            Duration::from_secs(90),
            "every accepted event delivered",
            |seen| {
                seen.iter()
                    .filter(|r| r.agent == "sink" && r.status == 200)
                    .map(|r| r.body["event"]["id"].as_str().unwrap_or("").to_owned())
                    .collect::<HashSet<_>>()
                    .is_superset(&accepted)
            },
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let store = reader(&nats, "quorum", dir.path()).await;
    for id in &accepted {
        assert!(store.get(id).await.unwrap().is_some(), "{id} is held");
    }
    store.close().await;
    drop(node);
}
