//! Dispatch over real loopback HTTP: every routed event reaches each of its
//! agents through failures, 429s and timeouts, with one idempotency key per
//! event, route and step on every attempt, signed so the reference Standard
//! Webhooks library verifies it; final failures land in the dead-letter
//! queue and a retry delivers them; workflows pass answers step to step;
//! ordering keys keep deliveries in arrival order; the SSRF guard refuses a
//! metadata address.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde_json::json;
use sluice::store::dispatch::{DeliveryFilter, DeliveryStatus, DispatchStore, parse_delivery_name};

use crate::agent_server::{AgentServer, Script};
use crate::support::{Env, RoutingGateway, client, post};

/// The agents' signing secret.
pub const AGENT_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A rule that routes each event as its body says: `{"routes": [...]}`.
pub const ROUTE_AS_TOLD: &str = r#"fn classify(event) {
    let routes = event.get("/routes");
    if routes == () { return #{ ignore: "no routes" }; }
    routes
}"#;

/// A test env whose `standard` source is routed by [`ROUTE_AS_TOLD`] to the
/// agents in `agents` (TOML under `[agents.*]`), plus `extra` TOML.
pub fn dispatch_env(agents: &str, extra: &str) -> Env {
    let env = Env::new("");
    let rules = env.dir.path().join("rules");
    std::fs::write(rules.join("route.rhai"), ROUTE_AS_TOLD).unwrap();
    std::fs::write(
        rules.join("route.toml"),
        "name = \"route\"\nscript = \"route.rhai\"\n[grants]\nsources = [\"standard\"]\nagents = [\"*\"]\nworkflows = [\"*\"]\n",
    )
    .unwrap();
    std::fs::write(env.dir.path().join("agent.key"), AGENT_SECRET).unwrap();
    let mut text = std::fs::read_to_string(&env.config_path).unwrap();
    text.push_str(&format!(
        "\n[rules]\ndir = {:?}\n[rules.grants.route]\nsources = [\"standard\"]\nkinds = [\"*\"]\nagents = [\"*\"]\nworkflows = [\"*\"]\n\n[dispatch]\nsigning_secret = {{ file = \"agent.key\" }}\n{agents}\n{extra}\n",
        rules.display().to_string()
    ));
    std::fs::write(&env.config_path, text).unwrap();
    env
}

/// An http agent at `url` with quick retries, loopback allowed.
pub fn http_agent(name: &str, url: &str, keys: &str) -> String {
    let mut text =
        format!("[agents.{name}]\nkind = \"http\"\nurl = {url:?}\nallow_loopback = true\n{keys}\n");
    for (key, default) in [
        ("backoff", "\"100ms\""),
        ("max_backoff", "\"2s\""),
        ("timeout", "\"1s\""),
    ] {
        if !keys
            .lines()
            .any(|l| l.split('=').next().map(str::trim) == Some(key))
        {
            text.push_str(&format!("{key} = {default}\n"));
        }
    }
    text
}

/// Sends one signed event to `/hooks/standard` routed along `routes`;
/// returns its event id.
pub async fn send(env: &Env, base: &str, n: usize, routes: serde_json::Value) -> String {
    let body = Bytes::from(
        serde_json::to_vec(&json!({"type": "test.event", "n": n, "routes": routes})).unwrap(),
    );
    let signed = env.signer("standard").sign("test.event", &body).unwrap();
    let (status, answer) = post(
        &client(),
        &format!("{base}/hooks/standard"),
        &signed.headers,
        signed.body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    answer["id"].as_str().expect("event id").to_string()
}

fn route(agent: &str) -> serde_json::Value {
    json!({"agent": agent, "priority": "medium", "reason": "test"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_its_agents_through_failures_429s_and_timeouts() {
    let agents = AgentServer::start(AGENT_SECRET).await;
    agents.script(
        "flaky",
        Script {
            fail_first: 2,
            ..Default::default()
        },
    );
    agents.script(
        "limited",
        Script {
            retry_after_first: Some(1),
            ..Default::default()
        },
    );
    agents.script(
        "stalling",
        Script {
            stall_first: Some(Duration::from_millis(1500)),
            ..Default::default()
        },
    );
    agents.script(
        "down",
        Script {
            down: true,
            ..Default::default()
        },
    );
    let env = dispatch_env(
        &[
            // Breakers that stay closed: this test is about retries.
            http_agent(
                "flaky",
                &agents.url("flaky"),
                "breaker = { failures = 100 }",
            ),
            http_agent("limited", &agents.url("limited"), ""),
            http_agent(
                "stalling",
                &agents.url("stalling"),
                "timeout = \"300ms\"\nbreaker = { failures = 100 }",
            ),
            http_agent(
                "down",
                &agents.url("down"),
                "max_attempts = 3\nbreaker = { failures = 100 }",
            ),
        ]
        .concat(),
        "",
    );
    let gw = RoutingGateway::start_with_admin(env.config()).await;
    const EVENTS: usize = 6;
    let mut ids = Vec::new();
    for n in 0..EVENTS {
        let mut routes = vec![route("flaky"), route("limited"), route("stalling")];
        if n < 2 {
            routes.push(route("down"));
        }
        ids.push(send(&env, &gw.base, n, json!(routes)).await);
    }
    agents
        .until(
            Duration::from_secs(30),
            "every event delivered to its three agents",
            |seen| {
                ["flaky", "limited", "stalling"].iter().all(|a| {
                    seen.iter()
                        .filter(|r| r.agent == *a && r.status == 200)
                        .count()
                        >= EVENTS
                })
            },
        )
        .await;

    let seen = agents.seen();
    assert!(
        seen.iter().all(|r| r.verified),
        "every attempt verifies with the reference library"
    );
    // One key per (event, agent), the same on every attempt; no two pairs share one.
    let mut keys: BTreeMap<(String, String), HashSet<String>> = BTreeMap::new();
    for r in &seen {
        let event = r.body["event"]["id"].as_str().unwrap().to_string();
        keys.entry((event, r.agent.clone()))
            .or_default()
            .insert(r.id.clone());
    }
    let all: Vec<&String> = keys.values().flatten().collect();
    assert_eq!(
        all.len(),
        keys.len(),
        "one webhook-id per event and agent: {keys:?}"
    );
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        all.len(),
        "ids differ between routes"
    );
    for a in ["flaky", "limited", "stalling"] {
        let delivered = agents.delivered(a);
        assert_eq!(
            delivered.len(),
            EVENTS,
            "{a}: each event delivered exactly once"
        );
        for r in &delivered {
            let attempts: Vec<_> = seen.iter().filter(|s| s.id == r.id).collect();
            let expected = match a {
                "flaky" => 3,
                _ => 2,
            };
            assert_eq!(attempts.len(), expected, "{a}: attempts of {}", r.id);
            assert_eq!(
                r.body["attempt"],
                json!(expected),
                "the envelope counts attempts"
            );
            if a == "limited" {
                let gap = attempts[1].at - attempts[0].at;
                assert!(
                    gap >= Duration::from_millis(950),
                    "Retry-After: 1 honoured, waited {gap:?}"
                );
            }
            if a == "flaky" {
                // Full jitter under a doubling ceiling: 100 ms, then 200 ms.
                let second = attempts[2].at - attempts[1].at;
                assert!(
                    second <= Duration::from_millis(200 + 400),
                    "backoff ceiling kept: {second:?}"
                );
            }
        }
    }
    // The attempts are stored with their outcomes.
    let dispatch: &dyn DispatchStore = gw.dispatch.as_ref();
    let stalled = dispatch
        .deliveries(&DeliveryFilter {
            agent: Some("stalling".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stalled.len(), EVENTS);
    let first = parse_delivery_name(&stalled[0].id).unwrap();
    let attempts = dispatch.attempts(first).await.unwrap();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0].outcome, "retry");
    assert!(
        attempts[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("timeout")
            || attempts[0]
                .error
                .as_deref()
                .unwrap_or("")
                .contains("timed out"),
        "{attempts:?}"
    );
    assert_eq!(attempts[1].outcome, "delivered");
    assert_eq!(attempts[1].status, Some(200));

    // The agent that is down: three attempts each, then the dead-letter queue.
    let dead = wait_for(&*gw.dispatch, "down", DeliveryStatus::Dead, 2).await;
    for d in &dead {
        assert!(
            d.last_error
                .as_deref()
                .unwrap()
                .contains("after 3 attempts"),
            "{d:?}"
        );
    }
    let dlq = gw.dispatch.dead_letters(100).await.unwrap();
    assert_eq!(
        dlq.iter().filter(|d| d.kind == "delivery").count(),
        2,
        "{dlq:?}"
    );
    // It comes back; a retry from the DLQ delivers.
    agents.script("down", Script::default());
    let admin = gw.admin.clone().expect("admin API");
    let (status, _, answer) = crate::admin::call(
        http::Method::POST,
        &format!("{admin}/v1/dlq/retry-all"),
        Some(crate::support::ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    wait_for(&*gw.dispatch, "down", DeliveryStatus::Delivered, 2).await;
    assert_eq!(agents.delivered("down").len(), 2);
    assert!(gw.dispatch.dead_letters(100).await.unwrap().is_empty());
    gw.stop().await;
}

/// Waits until the event's only run is in `state`; panics with the runs after `limit`.
pub async fn run_state(dispatch: &dyn DispatchStore, event: &str, state: &str, limit: Duration) {
    let start = std::time::Instant::now();
    loop {
        let runs = dispatch.runs(event).await.unwrap();
        if runs.first().is_some_and(|r| r.state == state) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "the run is not {state} after {limit:?}: {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `n` deliveries to `agent` are in `status`.
pub async fn wait_for(
    dispatch: &dyn DispatchStore,
    agent: &str,
    status: DeliveryStatus,
    n: usize,
) -> Vec<sluice::store::dispatch::DeliverySummary> {
    let start = std::time::Instant::now();
    loop {
        let rows = dispatch
            .deliveries(&DeliveryFilter {
                agent: Some(agent.into()),
                status: Some(status),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap();
        if rows.len() >= n {
            return rows;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{agent}: {} of {n} deliveries {status:?}",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_passes_each_answer_to_its_next_step() {
    let agents = AgentServer::start(AGENT_SECRET).await;
    agents.script(
        "plan",
        Script {
            answer: Some(json!({"plan": "fix it"})),
            ..Default::default()
        },
    );
    agents.script(
        "build",
        Script {
            fail_first: 1,
            answer: Some(json!({"built": true})),
            ..Default::default()
        },
    );
    agents.script(
        "test",
        Script {
            answer: Some(json!({"tested": true})),
            ..Default::default()
        },
    );
    let env = dispatch_env(
        &[
            http_agent("plan", &agents.url("plan"), ""),
            http_agent("build", &agents.url("build"), ""),
            http_agent("test", &agents.url("test"), ""),
            http_agent("report", &agents.url("report"), ""),
        ]
        .concat(),
        "[workflows.ship]\nsteps = [\n  { agent = \"$route\" },\n  { parallel = [\"build\", \"test\"] },\n  { delay = \"200ms\", name = \"settle\" },\n  { agent = \"report\" },\n]\n",
    );
    let gw = RoutingGateway::start(env.config()).await;
    let id = send(
        &env,
        &gw.base,
        0,
        json!([{"agent": "plan", "workflow": "ship", "priority": "high"}]),
    )
    .await;
    agents
        .until(Duration::from_secs(20), "the report step", |seen| {
            seen.iter().any(|r| r.agent == "report")
        })
        .await;
    let seen = agents.seen();
    let at = |agent: &str| {
        seen.iter()
            .find(|r| r.agent == agent && r.status == 200)
            .unwrap_or_else(|| panic!("{agent} got it"))
    };
    assert!(
        at("plan").body.get("input").is_none(),
        "the first step has no input"
    );
    assert_eq!(at("plan").body["step"], json!("step-1"));
    assert_eq!(at("build").body["input"], json!({"plan": "fix it"}));
    assert_eq!(at("test").body["input"], json!({"plan": "fix it"}));
    assert_eq!(
        at("report").body["input"],
        json!({"build": {"built": true}, "test": {"tested": true}})
    );
    assert!(
        at("report").at - at("build").at >= Duration::from_millis(200),
        "the delay step waited"
    );
    assert!(seen.iter().all(|r| r.verified));
    // Keys: one per step and agent, the same across the build step's retry.
    let build: HashSet<_> = seen
        .iter()
        .filter(|r| r.agent == "build")
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(build.len(), 1);
    assert_eq!(seen.iter().filter(|r| r.agent == "build").count(), 2);
    let runs = gw.dispatch.runs(&id).await.unwrap();
    assert_eq!(runs.len(), 1);
    run_state(&*gw.dispatch, &id, "done", Duration::from_secs(10)).await;
    let runs = gw.dispatch.runs(&id).await.unwrap();
    let names: Vec<_> = runs[0].steps_done.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["step-1", "step-2", "settle", "step-4"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordering_key_sends_one_at_a_time_in_arrival_order() {
    let agents = AgentServer::start(AGENT_SECRET).await;
    // Slow answers and room for many at once: without the key, they would overlap.
    agents.script(
        "ordered",
        Script {
            latency: Some(Duration::from_millis(30)),
            fail_first: 1,
            ..Default::default()
        },
    );
    let env = dispatch_env(
        &http_agent("ordered", &agents.url("ordered"), "concurrency = 16"),
        "",
    );
    let gw = RoutingGateway::start(env.config()).await;
    const EVENTS: usize = 8;
    let mut ids = Vec::new();
    for n in 0..EVENTS {
        let key = if n % 2 == 0 { "even" } else { "odd" };
        ids.push(
            send(
                &env,
                &gw.base,
                n,
                json!([{"agent": "ordered", "ordering_key": key}]),
            )
            .await,
        );
    }
    agents
        .until(Duration::from_secs(30), "all delivered", |seen| {
            seen.iter().filter(|r| r.status == 200).count() >= EVENTS
        })
        .await;
    for parity in [0, 1] {
        let order: Vec<u64> = agents
            .delivered("ordered")
            .iter()
            .map(|r| r.body["event"]["payload"]["n"].as_u64().unwrap())
            .filter(|n| *n % 2 == parity)
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(
            order, sorted,
            "deliveries of one key go out in arrival order"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssrf_guard_refuses_a_metadata_address() {
    let env = dispatch_env(
        "[agents.meta]\nkind = \"http\"\nurl = \"http://169.254.169.254/latest/meta-data/\"\n",
        "",
    );
    let gw = RoutingGateway::start(env.config()).await;
    send(&env, &gw.base, 0, json!([route("meta")])).await;
    let dead = wait_for(&*gw.dispatch, "meta", DeliveryStatus::Dead, 1).await;
    let why = dead[0].last_error.clone().unwrap();
    assert!(
        why.contains("169.254.169.254") && why.contains("metadata"),
        "{why}"
    );
    gw.stop().await;
}

#[test]
fn a_grant_naming_an_undeclared_agent_is_a_config_error() {
    let env = dispatch_env("", "");
    let mut text = std::fs::read_to_string(&env.config_path).unwrap();
    text.push_str("\n[rules.grants.other]\nsources = [\"standard\"]\nagents = [\"nobody\"]\n");
    std::fs::write(&env.config_path, text).unwrap();
    let err = sluice::config::Config::load(Some(&env.config_path))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rules.grants.other.agents[0]") && err.contains("\"nobody\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_dispatch_and_workflows_loses_nothing_and_records_no_step_twice() {
    use crate::support::ServeChild;
    const EVENTS: usize = 120;
    let agents = AgentServer::start(AGENT_SECRET).await;
    let slow = Script {
        latency: Some(Duration::from_millis(15)),
        ..Default::default()
    };
    for a in ["plain", "first", "second", "ordered"] {
        agents.script(a, slow.clone());
    }
    let env = dispatch_env(
        &[
            http_agent("plain", &agents.url("plain"), "concurrency = 4"),
            http_agent("first", &agents.url("first"), "concurrency = 4"),
            http_agent("second", &agents.url("second"), "concurrency = 4"),
            http_agent("ordered", &agents.url("ordered"), "concurrency = 8"),
        ]
        .concat(),
        "[workflows.two]\nsteps = [{ agent = \"first\" }, { agent = \"second\" }]\n",
    );
    let mut child = ServeChild::spawn(&env.config_path);
    let mut ids = Vec::new();
    for n in 0..EVENTS {
        let routes = json!([
            {"agent": "plain"},
            {"agent": "first", "workflow": "two"},
            {"agent": "ordered", "ordering_key": format!("k{}", n % 3)},
        ]);
        ids.push(send(&env, &child.base, n, routes).await);
    }
    // Kill it while deliveries and workflow steps are under way.
    agents
        .until(Duration::from_secs(30), "dispatch under way", |seen| {
            seen.iter().filter(|r| r.agent == "second").count() >= 5
        })
        .await;
    let before = agents.seen().len();
    child.kill();
    assert!(
        agents.delivered("second").len() < EVENTS && before < 4 * EVENTS,
        "killed mid-way ({before} attempts seen)"
    );
    let child = ServeChild::spawn(&env.config_path);
    agents
        .until(
            Duration::from_secs(60),
            "every delivery after the restart",
            |seen| {
                ["plain", "second", "ordered"].iter().all(|a| {
                    seen.iter()
                        .filter(|r| r.agent == *a && r.status == 200)
                        .map(|r| r.id.clone())
                        .collect::<HashSet<_>>()
                        .len()
                        >= EVENTS
                })
            },
        )
        .await;
    drop(child);
    let seen = agents.seen();
    assert!(seen.iter().all(|r| r.verified));
    for a in ["plain", "first", "second", "ordered"] {
        // Each event reached each agent under one key.
        let mut by_event: BTreeMap<String, HashSet<String>> = BTreeMap::new();
        for r in seen.iter().filter(|r| r.agent == a) {
            by_event
                .entry(r.body["event"]["id"].as_str().unwrap().into())
                .or_default()
                .insert(r.id.clone());
        }
        assert_eq!(by_event.len(), EVENTS, "{a}: every event");
        assert!(
            by_event.values().all(|k| k.len() == 1),
            "{a}: one key per event"
        );
    }
    // A workflow's second step never went out before its first was done.
    for r in seen.iter().filter(|r| r.agent == "second") {
        let event = &r.body["event"]["id"];
        let first_done = seen
            .iter()
            .filter(|f| f.agent == "first" && f.status == 200 && &f.body["event"]["id"] == event)
            .map(|f| f.at)
            .min()
            .expect("step one delivered");
        assert!(first_done <= r.at, "step two after step one");
        assert_eq!(r.body["input"], json!({"ok": true, "agent": "first"}));
    }
    // Ordered keys: first deliveries per key in arrival order.
    for k in 0..3u64 {
        let mut firsts = Vec::new();
        let mut got = HashSet::new();
        for r in seen
            .iter()
            .filter(|r| r.agent == "ordered" && r.status == 200)
        {
            let n = r.body["event"]["payload"]["n"].as_u64().unwrap();
            if n % 3 == k && got.insert(n) {
                firsts.push(n);
            }
        }
        let mut sorted = firsts.clone();
        sorted.sort();
        assert_eq!(firsts, sorted, "key k{k} in arrival order");
    }
    // Each run finished with both steps recorded once.
    let store = sluice::store::SqliteStore::open(&env.db(), 64).unwrap();
    for id in &ids {
        let runs = store.runs(id).await.unwrap();
        assert_eq!(runs.len(), 1, "{id}");
        let names: Vec<_> = runs[0].steps_done.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["step-1", "step-2"], "{id}: {runs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_keeps_its_deliveries_until_resumed() {
    let agents = AgentServer::start(AGENT_SECRET).await;
    let env = dispatch_env(&http_agent("held", &agents.url("held"), ""), "");
    let gw = RoutingGateway::start(env.config()).await;
    gw.dispatch.set_paused("held", true).await.unwrap();
    for n in 0..3 {
        send(&env, &gw.base, n, json!([route("held")])).await;
    }
    wait_for(&*gw.dispatch, "held", DeliveryStatus::Queued, 3).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(agents.seen().is_empty(), "nothing goes to a paused agent");
    gw.dispatch.set_paused("held", false).await.unwrap();
    wait_for(&*gw.dispatch, "held", DeliveryStatus::Delivered, 3).await;
    assert_eq!(agents.delivered("held").len(), 3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_sends_nothing_then_one_probe() {
    let agents = AgentServer::start(AGENT_SECRET).await;
    agents.script(
        "sick",
        Script {
            down: true,
            ..Default::default()
        },
    );
    let env = dispatch_env(
        &http_agent(
            "sick",
            &agents.url("sick"),
            "breaker = { failures = 3, cooldown = \"1500ms\" }\nbackoff = \"10ms\"\nmax_backoff = \"20ms\"\nmax_attempts = 100\nconcurrency = 1",
        ),
        "",
    );
    let gw = RoutingGateway::start(env.config()).await;
    for n in 0..4 {
        send(&env, &gw.base, n, json!([route("sick")])).await;
    }
    agents
        .until(Duration::from_secs(10), "three failures", |seen| {
            seen.len() >= 3
        })
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        agents.seen().len(),
        3,
        "the breaker opened after three failures in a row"
    );
    // After the cool-down: exactly one probe, which fails and re-opens it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        agents.seen().len(),
        4,
        "one probe once the cool-down is over"
    );
    // The agent recovers: the next probe succeeds and everything goes out.
    agents.script("sick", Script::default());
    wait_for(&*gw.dispatch, "sick", DeliveryStatus::Delivered, 4).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_agent_gets_the_most_urgent_first_and_no_more_than_its_limit() {
    let agents = AgentServer::start(AGENT_SECRET).await;
    agents.script(
        "busy",
        Script {
            latency: Some(Duration::from_millis(40)),
            ..Default::default()
        },
    );
    let env = dispatch_env(
        &http_agent("busy", &agents.url("busy"), "concurrency = 2"),
        "",
    );
    let gw = RoutingGateway::start(env.config()).await;
    // Queued while paused, in the opposite order of urgency.
    gw.dispatch.set_paused("busy", true).await.unwrap();
    let order = ["low", "medium", "high", "critical"];
    for (n, p) in order.iter().cycle().take(8).enumerate() {
        send(&env, &gw.base, n, json!([{"agent": "busy", "priority": p}])).await;
    }
    wait_for(&*gw.dispatch, "busy", DeliveryStatus::Queued, 8).await;
    gw.dispatch.set_paused("busy", false).await.unwrap();
    wait_for(&*gw.dispatch, "busy", DeliveryStatus::Delivered, 8).await;
    let got: Vec<String> = agents
        .delivered("busy")
        .iter()
        .map(|r| r.body["route"]["priority"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got,
        [
            "critical", "critical", "high", "high", "medium", "medium", "low", "low"
        ],
        "most urgent first"
    );
    assert!(
        agents.most_in_flight() <= 2,
        "{} at once",
        agents.most_in_flight()
    );
    assert_eq!(agents.most_in_flight(), 2, "the limit is used");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_past_its_timeout_fails_and_dead_letters_its_open_delivery() {
    let agents = AgentServer::start(AGENT_SECRET).await;
    agents.script(
        "never",
        Script {
            down: true,
            ..Default::default()
        },
    );
    let env = dispatch_env(
        &http_agent(
            "never",
            &agents.url("never"),
            "breaker = { failures = 1000 }",
        ),
        "[workflows.short]\ntimeout = \"700ms\"\nsteps = [{ agent = \"never\" }]\n",
    );
    let gw = RoutingGateway::start(env.config()).await;
    let id = send(
        &env,
        &gw.base,
        0,
        json!([{"agent": "never", "workflow": "short"}]),
    )
    .await;
    let dead = wait_for(&*gw.dispatch, "never", DeliveryStatus::Dead, 1).await;
    assert!(
        dead[0].last_error.as_deref().unwrap().contains("timeout"),
        "{dead:?}"
    );
    let runs = gw.dispatch.runs(&id).await.unwrap();
    assert_eq!(runs[0].state, "failed", "{runs:?}");
    gw.stop().await;
}

#[test]
fn bad_agent_and_workflow_keys_are_config_errors_naming_the_key() {
    for (agents, workflows, key) in [
        ("[agents.a]\nkind = \"http\"\n", "", "agents.a.url"),
        (
            "[agents.a]\nkind = \"exec\"\ncommand = []\n",
            "",
            "agents.a.command",
        ),
        (
            "[agents.a]\nkind = \"outbox\"\nbreaker = { cooldown = \"0s\" }\n",
            "",
            "agents.a.breaker.cooldown",
        ),
        (
            "[agents.a]\nkind = \"outbox\"\nmax_attempts = 0\n",
            "",
            "agents.a.max_attempts",
        ),
        (
            "[agents.a]\nkind = \"outbox\"\n",
            "[workflows.w]\nsteps = [{ parallel = [\"a\", \"a\"] }]\n",
            "workflows.w.steps[0].parallel",
        ),
        (
            "[agents.a]\nkind = \"outbox\"\n",
            "[workflows.w]\nsteps = [{ agent = \"b\" }]\n",
            "workflows.w.steps[0]",
        ),
        (
            "[agents.a]\nkind = \"outbox\"\n",
            "[workflows.w]\nsteps = [{ agent = \"a\", delay = \"1s\" }]\n",
            "workflows.w.steps[0]",
        ),
    ] {
        let env = dispatch_env(agents, workflows);
        let err = sluice::config::Config::load(Some(&env.config_path))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!(": {key}: ")), "{key}: {err}");
    }
}
