//! Ready instances (`rules.pool.ready_per_rule`): instances made ahead of
//! time off the event path, each used by one event. Isolation between events
//! holds with them, a rule whose instantiation fails still fails as it did,
//! a burst drains them and the filler refills them, and a retired rule
//! version's ready instances are released.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::decision::{RuleFailure, Verdict};
use sluice::event::{Event, ParsedEvent, Provider};
use sluice::rules::config::RulesConfig;
use sluice::rules::manifest::Manifest;
use sluice::rules::wasm::WasmRule;
use sluice::rules::{Rule, RuleCode};

use crate::support::{Env, ServeChild, client, metrics_text, post, wat_classifier};

/// Long enough for a loaded machine; every wait polls a condition.
const DEADLINE: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn call_count() -> PathBuf {
    let p = repo().join("plugins/out/call-count.wasm");
    assert!(
        p.is_file(),
        "{} is missing: run plugins/build.sh first",
        p.display()
    );
    p
}

fn issue(n: usize) -> Arc<ParsedEvent> {
    let body = format!(r#"{{"action":"opened","issue":{{"number":{n}}}}}"#);
    Arc::new(ParsedEvent::new(Event::dry_run(
        "github",
        Provider::Github,
        "issues",
        None,
        body.into_bytes().into(),
    )))
}

/// Loads a rule from manifest text on the test binary's shared engine
/// (default pool: 2 ready instances per rule).
fn load(path: &Path, text: &str) -> Rule {
    let manifest = Manifest::parse(path, text).unwrap_or_else(|e| panic!("{e}"));
    Rule::from_manifest(
        &manifest,
        path,
        text,
        &RulesConfig::default(),
        crate::rules::engine(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn counting_rule() -> Rule {
    let text = format!(
        "name = \"count\"\ncomponent = {:?}\n[grants]\nwasi = true",
        call_count().display().to_string()
    );
    load(&repo().join("ready-count.toml"), &text)
}

fn wasm(rule: &Rule) -> &WasmRule {
    match rule.code() {
        RuleCode::Wasm(w) => w,
        other => panic!("not a component: {other:?}"),
    }
}

/// Polls `done` until it holds, failing after [`DEADLINE`].
fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The reason of the one route the counting rule answers with.
fn reason(out: Result<Verdict, RuleFailure>) -> String {
    match out {
        Ok(Verdict::Routes(routes)) if routes.len() == 1 => routes[0].reason.clone(),
        other => panic!("expected one route, got {other:?}"),
    }
}

#[test]
fn every_event_gets_an_instance_of_its_own_with_ready_instances_on() {
    let rule = counting_rule();
    let w = wasm(&rule);
    assert!(w.has_ready_pool());
    // Events that each find the pool full take a ready instance...
    for n in 0..20 {
        until("the pool to refill", || w.ready_len() == 2);
        assert_eq!(reason(rule.classify(&issue(n))), "call 1", "event {n}");
    }
    // ...and so do events back to back, ready or made inline.
    for n in 0..200 {
        assert_eq!(reason(rule.classify(&issue(n))), "call 1", "event {n}");
    }
    // The guest does count: one instance kept across calls climbs.
    let mut kept = w.reused_instance().unwrap();
    let ev = issue(0);
    let counts: Vec<String> = (0..3).map(|_| reason(kept.classify(&ev))).collect();
    assert_eq!(counts, ["call 1", "call 2", "call 3"]);
}

#[test]
fn a_burst_drains_the_ready_instances_and_the_filler_refills_them() {
    let rule = counting_rule();
    let w = wasm(&rule);
    until("the first fill", || w.ready_len() == 2);
    let mut took_ready = false;
    for n in 0..100 {
        took_ready |= w.ready_len() > 0;
        assert_eq!(reason(rule.classify(&issue(n))), "call 1");
    }
    assert!(took_ready);
    until("the pool to refill after the burst", || w.ready_len() == 2);
    // A rule built with the pool off keeps none, and still isolates.
    let off = w.with_ready(0);
    assert!(!off.has_ready_pool());
    for n in 0..5 {
        assert_eq!(reason(off.classify(&issue(n))), "call 1");
        assert_eq!(off.ready_len(), 0);
    }
}

/// A component whose core module runs `start` when instantiated.
fn with_start(start: &str) -> Vec<u8> {
    // The classify body closes its function, then declares the start
    // function and `start`, whose closing parenthesis the template supplies.
    wat_classifier(
        "",
        1,
        &format!("(i32.const 0)) (func $start {start}) (start $start"),
    )
}

fn write_component(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

#[test]
fn a_start_function_that_fails_fails_each_event_as_before_and_never_wedges_the_filler() {
    let (_trap_dir, trap) = write_component("start-trap", &with_start("(unreachable)"));
    let (_loop_dir, spin) = write_component("start-loop", &with_start("(loop $l (br $l))"));
    let load_start = |name: &str, path: &Path| {
        let text = format!(
            "name = \"{name}\"\ncomponent = {:?}\n[limits]\ntimeout_ms = 50",
            path.display().to_string()
        );
        load(&repo().join(format!("{name}.toml")), &text)
    };
    let trapping = load_start("start-trap", &trap);
    let looping = load_start("start-loop", &spin);
    // The filler tries each once, sees it fail, and stops filling them.
    until("the filler to give up on both", || {
        !wasm(&trapping).has_ready_pool() && !wasm(&looping).has_ready_pool()
    });
    for n in 0..3 {
        match trapping.classify(&issue(n)) {
            Err(RuleFailure::Trap(m)) => assert!(m.contains("unreachable"), "{m}"),
            other => panic!("a trapping start function: {other:?}"),
        }
        match looping.classify(&issue(n)) {
            Err(RuleFailure::Timeout(m)) => assert!(m.contains("50 ms"), "{m}"),
            other => panic!("a looping start function: {other:?}"),
        }
    }
    assert_eq!(wasm(&trapping).ready_len(), 0);
    // The filler still serves other rules.
    let counting = counting_rule();
    until("a healthy rule's pool to fill", || {
        wasm(&counting).ready_len() == 2
    });
    assert_eq!(reason(counting.classify(&issue(0))), "call 1");
}

#[test]
fn ready_per_rule_is_checked_and_named() {
    let config: RulesConfig = toml::from_str("[pool]\nready_per_rule = 65").unwrap();
    let e = config.validate().unwrap_err();
    assert!(e.contains("rules.pool.ready_per_rule"), "{e}");
    let config: RulesConfig = toml::from_str("[pool]\nready_per_rule = 0").unwrap();
    config.validate().unwrap();
}

/// One series of a `/metrics` text, as a number.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Polls the gateway's `/metrics` until `done` holds for it.
async fn until_metrics(base: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = metrics_text(&client(), base).await;
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const READY: &str = "sluice_rule_ready_instances{rule=\"count\"}";
const FROM_READY: &str = "sluice_rule_instances_total{rule=\"count\",from=\"ready\"}";

fn count_manifest(version: u32) -> String {
    format!(
        "name = \"count\"\ncomponent = \"count.wasm\"\n[grants]\nwasi = true\n[config]\nversion = \"{version}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_rule_version_releases_its_ready_instances() {
    let env = Env::new("[rules.reload]\ndebounce_ms = 100\npoll_ms = 200\n");
    env.approve("count", crate::support::APPROVE_ALL);
    let rules = env.dir.path().join("rules");
    std::fs::copy(call_count(), rules.join("count.wasm")).unwrap();
    let manifest = rules.join("count.toml");
    std::fs::write(&manifest, count_manifest(0)).unwrap();
    let server = ServeChild::spawn(&env.config_path);
    let base = server.base.clone();
    until_metrics(&base, "two ready instances", |t| {
        metric(t, READY) == Some(2.0)
    })
    .await;

    // Events are served from them (the serve child counts by rule).
    let signed = env
        .signer("github")
        .sign(
            "issues",
            &bytes::Bytes::from_static(b"{\"action\":\"opened\"}"),
        )
        .unwrap();
    let (status, _) = post(
        &client(),
        &format!("{base}/hooks/github"),
        &signed.headers,
        signed.body.clone(),
    )
    .await;
    assert_eq!(status, http::StatusCode::ACCEPTED);
    until_metrics(&base, "an event served by a ready instance", |t| {
        metric(t, FROM_READY).is_some_and(|n| n >= 1.0)
    })
    .await;

    // Each new version fills its own; the one it replaces lets go of its
    // own, so the count settles at one version's worth, not one per reload.
    let loaded = "sluice_rule_reloads_total{outcome=\"loaded\"}";
    for version in 1..=3 {
        let before = metric(&metrics_text(&client(), &base).await, loaded).unwrap_or(0.0);
        let tmp = manifest.with_extension("tmp~");
        std::fs::write(&tmp, count_manifest(version)).unwrap();
        std::fs::rename(&tmp, &manifest).unwrap();
        until_metrics(&base, "the new version to load", |t| {
            metric(t, loaded).is_some_and(|n| n > before)
        })
        .await;
    }
    until_metrics(&base, "ready instances of the live version only", |t| {
        metric(t, READY) == Some(2.0)
    })
    .await;

    // Removing the rule releases them all.
    std::fs::remove_file(&manifest).unwrap();
    until_metrics(&base, "no ready instances once the rule is gone", |t| {
        metric(t, READY) == Some(0.0)
    })
    .await;
}

#[test]
fn a_ready_instance_gets_its_whole_deadline_from_the_moment_it_is_called() {
    // 50 ms for the counting rule; its ready instances are made now.
    let text = format!(
        "name = \"count-deadline\"\ncomponent = {:?}\n[grants]\nwasi = true\n[limits]\ntimeout_ms = 50",
        call_count().display().to_string()
    );
    let counting = load(&repo().join("ready-deadline.toml"), &text);
    until("the pool to fill", || wasm(&counting).ready_len() == 2);
    // A guest that loops to its 200 ms deadline moves the engine's epoch
    // far past the 50 ms the ready instances would have had from their
    // making.
    let (_dir, spin) = write_component(
        "spin",
        &wat_classifier("", 1, "(loop $l (br $l)) (i32.const 0)"),
    );
    let looping = load(
        &repo().join("ready-spin.toml"),
        &format!(
            "name = \"ready-spin\"\ncomponent = {:?}\n[limits]\ntimeout_ms = 200",
            spin.display().to_string()
        ),
    );
    let engine = crate::rules::engine();
    let before = engine.epoch_ticks();
    assert!(matches!(
        looping.classify(&issue(0)),
        Err(RuleFailure::Timeout(_))
    ));
    assert!(engine.epoch_ticks() - before >= 100);
    assert_eq!(wasm(&counting).ready_len(), 2);
    assert_eq!(reason(counting.classify(&issue(1))), "call 1");
}

#[test]
fn ready_instances_leave_the_workers_their_pool_slots() {
    use sluice::rules::config::PoolConfig;
    use sluice::rules::wasm::WasmEngine;
    // 4 slots, 2 kept for the workers: 3 rules wanting 2 each get 2 in all.
    let pool = PoolConfig {
        instances: 4,
        ..PoolConfig::default()
    };
    let engine = WasmEngine::with_pool(None, &pool).unwrap();
    engine.reserve_for_calls(2);
    let rules: Vec<Rule> = (0..3)
        .map(|i| {
            let path = repo().join(format!("ready-cap-{i}.toml"));
            let text = format!(
                "name = \"cap-{i}\"\ncomponent = {:?}\n[grants]\nwasi = true",
                call_count().display().to_string()
            );
            let manifest = Manifest::parse(&path, &text).unwrap();
            Rule::from_manifest(&manifest, &path, &text, &RulesConfig::default(), &engine).unwrap()
        })
        .collect();
    until("two ready instances in all", || {
        engine.ready_instances() == 2
    });
    let held: usize = rules.iter().map(|r| wasm(r).ready_len()).sum();
    assert_eq!(held, 2);
    // The two slots left serve the workers' calls, ready or not.
    for (n, rule) in rules.iter().enumerate() {
        assert_eq!(reason(rule.classify(&issue(n))), "call 1");
    }
    drop(rules);
    until("every ready instance released", || {
        engine.ready_instances() == 0
    });
}
