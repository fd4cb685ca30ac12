//! Defects found by an outside review of the dispatch core, each shown over
//! real loopback HTTP and a real store: a run of a workflow the config does
//! not declare waits forever; retrying a timed-out run's delivery from the
//! DLQ does not let the run go on; a first attempt past `max_age` is sent.

use std::time::{Duration, Instant};

use serde_json::json;
use sluice::store::dispatch::{DeliveryStatus, parse_delivery_name};

use crate::agent_server::{AgentServer, Script};
use crate::dispatch::{AGENT_SECRET, dispatch_env, http_agent, run_state, send, wait_for};
use crate::support::RoutingGateway;

/// A rule granted every workflow may name one the config does not declare
/// (as the docs allow for agents). Such a run is never started, since only
/// declared workflows get a concurrency slot, so it sits `waiting` forever
/// (counted in `sluice_workflow_runs_open`, never in the DLQ), where a
/// delivery to an undeclared agent is dead-lettered by the sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_an_undeclared_workflow_does_not_wait_forever() {
    let agents = AgentServer::start(AGENT_SECRET).await;
    let env = dispatch_env(&http_agent("x", &agents.url("x"), ""), "");
    let gw = RoutingGateway::start(env.config()).await;
    let id = send(
        &env,
        &gw.base,
        0,
        json!([{"agent": "x", "workflow": "nope"}]),
    )
    .await;
    run_state(&*gw.dispatch, &id, "failed", Duration::from_secs(10)).await;
    let runs = gw.dispatch.runs(&id).await.unwrap();
    assert!(
        runs[0].last_error.as_deref().unwrap_or("").contains("nope"),
        "the reason names the workflow: {runs:?}"
    );
    gw.stop().await;
}

/// A run that timed out while its step's delivery was retrying: the
/// delivery is dead-lettered and the run failed. `dlq retry` reopens the run
/// at that step and the delivery goes through, but the run keeps its old,
/// past deadline, so the next look at the runs fails it again and the next
/// step is never sent. The docs promise the run "goes on from the same step".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_timed_out_runs_delivery_lets_the_run_go_on() {
    let agents = AgentServer::start(AGENT_SECRET).await;
    agents.script(
        "slow",
        Script {
            down: true,
            ..Default::default()
        },
    );
    let env = dispatch_env(
        &[
            http_agent(
                "slow",
                &agents.url("slow"),
                "max_attempts = 1000\nbackoff = \"50ms\"\nmax_backoff = \"100ms\"\nbreaker = { failures = 1000 }",
            ),
            http_agent("report", &agents.url("report"), ""),
        ]
        .concat(),
        "[workflows.w]\ntimeout = \"1s\"\nsteps = [{ agent = \"$route\" }, { agent = \"report\" }]\n",
    );
    let gw = RoutingGateway::start(env.config()).await;
    let id = send(
        &env,
        &gw.base,
        0,
        json!([{"agent": "slow", "workflow": "w"}]),
    )
    .await;
    run_state(&*gw.dispatch, &id, "failed", Duration::from_secs(10)).await;
    let dead = wait_for(&*gw.dispatch, "slow", DeliveryStatus::Dead, 1).await;
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("timeout"),
        "{dead:?}"
    );
    // The agent is back; the operator retries the delivery.
    agents.script("slow", Script::default());
    assert!(
        gw.dispatch
            .retry_delivery(parse_delivery_name(&dead[0].id).unwrap())
            .await
            .unwrap()
    );
    wait_for(&*gw.dispatch, "slow", DeliveryStatus::Delivered, 1).await;
    agents
        .until(
            Duration::from_secs(10),
            "the run goes on to its next step after the retry",
            |seen| seen.iter().any(|r| r.agent == "report" && r.status == 200),
        )
        .await;
    run_state(&*gw.dispatch, &id, "done", Duration::from_secs(10)).await;
    gw.stop().await;
}

/// `max_age` is checked only when a failed attempt plans the next one: a
/// delivery whose first attempt comes after `max_age` (its agent was
/// paused, or backed up) is sent anyway, though the docs dead-letter a
/// delivery "when the next attempt would fall past `max_age` from the
/// event's receipt", and say `max_age` dead-letters a paused agent's
/// deliveries long before retention removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_attempt_past_max_age_is_dead_lettered_not_sent() {
    let agents = AgentServer::start(AGENT_SECRET).await;
    let env = dispatch_env(
        &http_agent("old", &agents.url("old"), "max_age = \"1s\""),
        "",
    );
    let gw = RoutingGateway::start(env.config()).await;
    gw.dispatch.set_paused("old", true).await.unwrap();
    send(&env, &gw.base, 0, json!([{"agent": "old"}])).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.dispatch.set_paused("old", false).await.unwrap();
    let start = Instant::now();
    let dead = loop {
        let rows = gw
            .dispatch
            .deliveries(&sluice::store::dispatch::DeliveryFilter {
                agent: Some("old".into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        if rows.iter().any(|r| r.status != DeliveryStatus::Queued) {
            break rows;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead[0].status, DeliveryStatus::Dead, "{dead:?}");
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("max_age"),
        "{dead:?}"
    );
    assert!(
        agents.seen().is_empty(),
        "nothing is sent past max_age: {:?}",
        agents.seen().len()
    );
    gw.stop().await;
}

/// `dlq retry` starts a delivery over at attempt 1, and the attempts table
/// is keyed by delivery and attempt with an upsert, so the retry's attempts
/// overwrite the stored record of the attempts that dead-lettered it: the
/// history an operator reads (`sluice deliveries ls`, the admin API) loses
/// the failures, though the docs say every attempt is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_retry_keeps_the_record_of_the_earlier_attempts() {
    let agents = AgentServer::start(AGENT_SECRET).await;
    agents.script(
        "down",
        Script {
            down: true,
            ..Default::default()
        },
    );
    let env = dispatch_env(
        &http_agent(
            "down",
            &agents.url("down"),
            "max_attempts = 2\nbreaker = { failures = 100 }",
        ),
        "",
    );
    let gw = RoutingGateway::start(env.config()).await;
    send(&env, &gw.base, 0, json!([{"agent": "down"}])).await;
    let dead = wait_for(&*gw.dispatch, "down", DeliveryStatus::Dead, 1).await;
    let id = parse_delivery_name(&dead[0].id).unwrap();
    let before = gw.dispatch.attempts(id).await.unwrap();
    assert_eq!(before.len(), 2, "{before:?}");
    agents.script("down", Script::default());
    assert!(gw.dispatch.retry_delivery(id).await.unwrap());
    wait_for(&*gw.dispatch, "down", DeliveryStatus::Delivered, 1).await;
    let after = gw.dispatch.attempts(id).await.unwrap();
    assert_eq!(
        after.iter().filter(|a| a.outcome == "retry").count(),
        2,
        "the two failed attempts are still on record after the retry: {after:?}"
    );
    assert_eq!(
        after.iter().filter(|a| a.outcome == "delivered").count(),
        1,
        "{after:?}"
    );
    gw.stop().await;
}
