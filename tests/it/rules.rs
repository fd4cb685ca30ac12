//! The rule runtime with real components (built by `plugins/build.sh`), real
//! rhai scripts and real corpus payloads: hostile guests are contained and
//! reported while the other rules keep serving, the breaker, merge modes,
//! failure policies, manifests, the shipped routing tables, and the router
//! workers on the real SQLite store, fed through verify and normalize.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::until_status;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use sluice::decision::{Decision, Priority, Route, RuleFailure, RuleOutcome, Verdict};
use sluice::event::{Event, EventStatus, ParsedEvent, Provider};
use sluice::ingress::normalize::{Naming, normalize};
use sluice::ingress::verify::Verifier;
use sluice::rules::breaker::BreakerState;
use sluice::rules::config::{BreakerConfig, FailurePolicy, MergeMode, PoolConfig, RulesConfig};
use sluice::rules::manifest::Manifest;
use sluice::rules::router::{self, RouterOptions};
use sluice::rules::wasm::WasmEngine;
use sluice::rules::{LoadError, Rule, RuleCode, RuleSet};
use sluice::store::{Appended, EventRecord, ListFilter, SqliteStore, Store};

// ---------------------------------------------------------------- helpers

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A component built by `plugins/build.sh`; a missing one fails the test.
fn component(name: &str) -> PathBuf {
    let p = repo().join("plugins/out").join(format!("{name}.wasm"));
    assert!(
        p.is_file(),
        "{} is missing: run plugins/build.sh first (CI runs it before the tests)",
        p.display()
    );
    p
}

fn corpus(rel: &str) -> Vec<u8> {
    let p = repo().join("../shared/corpus").join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("corpus payload {}: {e}", p.display()))
}

/// One engine for the whole test binary (the pooling allocator reserves
/// address space per engine), with its compile cache in cargo's tmp dir.
pub(crate) fn engine() -> &'static WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        WasmEngine::new(Some(
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("rule-cache"),
        ))
        .expect("wasm engine")
    })
}

fn event(provider: Provider, kind: &str, body: Vec<u8>) -> Arc<ParsedEvent> {
    Arc::new(ParsedEvent::new(Event::dry_run(
        provider.as_str(),
        provider,
        kind,
        None,
        body.into(),
    )))
}

fn github(kind: &str, rel: &str) -> Arc<ParsedEvent> {
    event(Provider::Github, kind, corpus(&format!("github/{rel}")))
}

fn gitlab(kind: &str, file: &str) -> Arc<ParsedEvent> {
    event(
        Provider::Gitlab,
        kind,
        corpus(&format!("gitlab/webhooks/{file}")),
    )
}

fn gitlab_edited(
    kind: &str,
    file: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Arc<ParsedEvent> {
    let mut v: serde_json::Value =
        serde_json::from_slice(&corpus(&format!("gitlab/webhooks/{file}"))).unwrap();
    edit(&mut v);
    event(Provider::Gitlab, kind, serde_json::to_vec(&v).unwrap())
}

pub(crate) fn issues_opened() -> Arc<ParsedEvent> {
    github("issues", "issues/opened.payload.json")
}

/// Loads one rule from manifest text; component/script paths in it are
/// absolute or relative to the repository root.
fn try_rule(text: &str) -> Result<Rule, LoadError> {
    let path = repo().join("inline-test.toml");
    let manifest = Manifest::parse(&path, text).map_err(|e| LoadError {
        file: e.file.clone(),
        rule: None,
        message: e.to_string(),
    })?;
    let rule = Rule::from_manifest(&manifest, &path, text, &RulesConfig::default(), engine())?;
    rule.check_tests(&manifest.tests, &path)?;
    Ok(rule)
}

fn rule(text: &str) -> Rule {
    try_rule(text).unwrap_or_else(|e| panic!("{e}"))
}

/// A fixture component rule. WASI is granted (with the host's empty context)
/// because rustup-built guests import it through Rust's std; the grant tests
/// below check what happens without it.
pub(crate) fn wasm(name: &str, extra: &str) -> Rule {
    rule(&format!(
        "name = \"{name}\"\ncomponent = {:?}\n[grants]\nwasi = true\n{extra}",
        component(name).display().to_string()
    ))
}

/// A rhai rule from inline script text.
pub(crate) fn rhai(name: &str, script: &str, extra: &str) -> Result<Rule, LoadError> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("rhai-rules");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.rhai"));
    std::fs::write(&file, script).unwrap();
    try_rule(&format!(
        "name = \"{name}\"\nscript = {:?}\n{extra}",
        file.display().to_string()
    ))
}

/// The well-behaved bench component: one medium route to `bench`.
fn good() -> Rule {
    wasm("bench-three-fields", "")
}

pub(crate) fn set(rules: Vec<Rule>) -> RuleSet {
    RuleSet::new(
        rules,
        MergeMode::Merge,
        FailurePolicy::Skip,
        &BreakerConfig::default(),
    )
}

pub(crate) fn agents(d: &Decision) -> Vec<(&str, Priority)> {
    d.routes
        .iter()
        .map(|r| (r.agent.as_str(), r.priority))
        .collect()
}

fn outcome<'a>(d: &'a Decision, rule: &str) -> &'a RuleOutcome {
    &d.rules
        .iter()
        .find(|r| r.rule == rule)
        .unwrap_or_else(|| panic!("no record for {rule}: {d:?}"))
        .outcome
}

fn failure<'a>(d: &'a Decision, rule: &str) -> &'a RuleFailure {
    match outcome(d, rule) {
        RuleOutcome::Failed(f) => f,
        other => panic!("{rule} did not fail: {other:?}"),
    }
}

fn route(agent: &str, priority: Priority, labels: &[&str]) -> Route {
    Route {
        agent: agent.into(),
        workflow: None,
        priority,
        reason: format!("{agent} at {}", priority.as_str()),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        ordering_key: None,
        payload: None,
    }
}

fn native_routes(name: &str, routes: Vec<Route>) -> Rule {
    Rule::native(name, move |_| Ok(Verdict::Routes(routes.clone())))
}

fn native_failing(name: &str) -> Rule {
    Rule::native(name, |_| Err(RuleFailure::Guest("always fails".into())))
}

// ---------------------------------------------------- hostile components

/// Runs a hostile rule beside a good component and a native rule, twice, and
/// checks that the good ones answer correctly each time.
fn contained(hostile: Rule, check: impl Fn(&RuleFailure)) {
    let name = hostile.name().to_owned();
    let native = native_routes("native", vec![route("native-agent", Priority::Low, &[])]);
    let rules = set(vec![hostile, good(), native]);
    for round in 0..2 {
        let d = rules.route(&issues_opened());
        check(failure(&d, &name));
        assert_eq!(
            agents(&d),
            vec![("bench", Priority::Medium), ("native-agent", Priority::Low)],
            "round {round}: the other rules must keep serving: {d:?}"
        );
        let RuleOutcome::Verdict(Verdict::Routes(rs)) = outcome(&d, "bench-three-fields") else {
            panic!()
        };
        assert_eq!(rs[0].reason, "issues.opened in Codertocat/Hello-World");
    }
}

#[test]
fn infinite_loop_times_out_within_its_deadline() {
    let rule = wasm("loop", "[limits]\ntimeout_ms = 50");
    let start = Instant::now();
    // On another thread, so a broken deadline fails this test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(rule.classify(&issues_opened())));
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the epoch deadline did not stop an infinite loop within 10 s");
    let took = start.elapsed();
    assert!(matches!(r, Err(RuleFailure::Timeout(_))), "{r:?}");
    assert!(
        took >= Duration::from_millis(50),
        "stopped before its deadline: {took:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "the deadline did not stop the loop in time: {took:?}"
    );
    contained(wasm("loop", "[limits]\ntimeout_ms = 20"), |f| {
        assert!(
            matches!(f, RuleFailure::Timeout(m) if m.contains("20 ms")),
            "{f:?}"
        )
    });
}

#[test]
fn memory_bomb_hits_the_memory_limit() {
    contained(
        wasm("membomb", "[limits]\nmemory_mb = 16\ntimeout_ms = 5000"),
        |f| {
            assert!(
                matches!(f, RuleFailure::Memory(m) if m.contains("16 MiB")),
                "{f:?}"
            )
        },
    );
}

#[test]
fn unbounded_recursion_is_a_stack_overflow_trap() {
    contained(wasm("recursion", "[limits]\ntimeout_ms = 5000"), |f| {
        assert!(
            matches!(f, RuleFailure::Trap(m) if m.contains("stack overflow")),
            "{f:?}"
        )
    });
}

#[test]
fn a_rule_that_sleeps_traps_at_once_instead_of_holding_a_worker() {
    // WASI's blocking calls run on the host, out of the epoch deadline's reach.
    let rule = wasm("sleep", "[limits]\ntimeout_ms = 100");
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || tx.send(rule.classify(&issues_opened())));
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a sleeping rule held its thread for 10 s");
    // The blocking trap on wasip2 builds; std's "cannot sleep" panic on the apt toolchain's.
    assert!(
        matches!(&r, Err(RuleFailure::Trap(m)) if m.contains("may not block") || m.contains("unreachable")),
        "{r:?}"
    );
    // Wide: a loaded machine may be slow to schedule, but the guest asked to
    // sleep far longer than this.
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "took {:?}",
        start.elapsed()
    );
    contained(wasm("sleep", ""), |f| {
        assert!(matches!(f, RuleFailure::Trap(_)), "{f:?}")
    });
}

#[test]
fn panicking_guest_is_a_trap_not_a_guest_error() {
    contained(wasm("trap", ""), |f| {
        assert!(
            matches!(f, RuleFailure::Trap(m) if m.contains("unreachable")),
            "{f:?}"
        )
    });
}

#[test]
fn guest_error_is_recorded_with_its_message() {
    contained(wasm("guest-error", ""), |f| {
        assert_eq!(
            f,
            &RuleFailure::Guest("hostile fixture: guest-error refuses issues events".into())
        )
    });
}

#[test]
fn huge_answers_are_bounded() {
    // Default shape: a million routes; needs ~105 MiB, so the memory limit stops it.
    contained(wasm("huge", "[limits]\ntimeout_ms = 5000"), |f| {
        assert!(
            matches!(f, RuleFailure::Memory(_) | RuleFailure::Trap(_)),
            "{f:?}"
        )
    });
    // Enough memory to build 100,000 routes: the host refuses the answer
    // before copying it (more bytes than the output limits could ever keep),
    // as an output-limit failure, not a trap.
    let over_fuel = |f: &RuleFailure| {
        assert!(
            matches!(f, RuleFailure::Output(m) if m.contains("bytes out of the sandbox")),
            "{f:?}"
        )
    };
    contained(
        wasm(
            "huge",
            "[limits]\ntimeout_ms = 5000\nmemory_mb = 128\n[config]\ncount = \"100000\"",
        ),
        over_fuel,
    );
    // Small enough to copy, but over the label limit.
    contained(
        wasm(
            "huge",
            "[limits]\ntimeout_ms = 5000\n[config]\nshape = \"labels\"\ncount = \"1000\"",
        ),
        |f| {
            assert!(
                matches!(f, RuleFailure::Output(m) if m.contains("1000 labels")),
                "{f:?}"
            )
        },
    );
    // A 4 MiB reason or ignore is more than the host copies out of a sandbox.
    for shape in ["reason", "ignore"] {
        let rule = wasm(
            "huge",
            &format!("[limits]\ntimeout_ms = 5000\n[config]\nshape = \"{shape}\"\nmib = \"4\""),
        );
        over_fuel(&rule.classify(&issues_opened()).unwrap_err());
    }
}

#[test]
fn ungranted_import_fails_to_load_naming_it() {
    let err = try_rule(&format!(
        "name = \"ungranted\"\ncomponent = {:?}",
        component("ungranted").display().to_string()
    ))
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("imports evil:net/socket@0.1.0, which is not granted"),
        "{msg}"
    );
    assert!(msg.starts_with("rule ungranted ("), "{msg}");
    assert!(msg.contains("ungranted.wasm"), "{msg}");
    // Granting WASI does not grant anything else.
    let err = try_rule(&format!(
        "name = \"ungranted\"\ncomponent = {:?}\n[grants]\nwasi = true",
        component("ungranted").display().to_string()
    ))
    .unwrap_err();
    assert!(err.to_string().contains("evil:net/socket@0.1.0"), "{err}");
}

/// The toolchain `plugins/build.sh` last built the fixtures with: `rustup`
/// (wasm32-wasip2, guests import WASI) or `apt` (no WASI at all).
fn guest_toolchain() -> String {
    let path = repo().join("plugins/out/TOOLCHAIN");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run plugins/build.sh)", path.display()))
        .trim()
        .to_string()
}

#[test]
fn wasi_is_refused_unless_granted_and_empty_when_granted() {
    // Refused without the grant, whatever toolchain built the fixtures: a
    // hand-written component that imports one WASI interface.
    let dir = tempfile::tempdir().unwrap();
    let env_import = r#"(import "wasi:cli/environment@0.2.6" (instance
    (export "get-arguments" (func (result (list string))))))"#;
    let component = crate::support::wat_classifier(env_import, 1, "(unreachable)");
    let path = dir.path().join("wants-env.wasm");
    std::fs::write(&path, component).unwrap();
    let manifest = format!(
        "name = \"wants-env\"\ncomponent = {:?}",
        path.display().to_string()
    );
    let err = try_rule(&manifest).unwrap_err().to_string();
    assert!(
        err.contains("imports wasi:cli/environment@0.2.6") && err.contains("[grants] wasi = true"),
        "{err}"
    );
    try_rule(&format!("{manifest}\n[grants]\nwasi = true"))
        .expect("granted, the same component loads");

    // Empty when granted: the probe (built only with real WASI) looks.
    let toolchain = guest_toolchain();
    let probe = repo().join("plugins/out/wasi-probe.wasm");
    match toolchain.as_str() {
        "rustup" => assert!(
            probe.is_file(),
            "{} is missing: run plugins/build.sh",
            probe.display()
        ),
        "apt" => {
            eprintln!(
                "NOTE: guests built by the apt toolchain import no WASI: the probe's view is not checked"
            );
            return;
        }
        other => panic!("plugins/out/TOOLCHAIN says {other:?}"),
    }
    let err = try_rule(&format!(
        "name = \"wasi-probe\"\ncomponent = {:?}",
        probe.display().to_string()
    ))
    .unwrap_err();
    assert!(err.to_string().contains("imports wasi:"), "{err}");
    assert!(err.to_string().contains("[grants] wasi = true"), "{err}");

    let rule = wasm("wasi-probe", "[limits]\ntimeout_ms = 2000");
    let Ok(Verdict::Routes(rs)) = rule.classify(&issues_opened()) else {
        panic!()
    };
    let labels = &rs[0].labels;
    for want in ["fs:denied", "env:empty", "env-vars:0", "net:denied"] {
        assert!(
            labels.iter().any(|l| l == want),
            "{want} missing in {labels:?} ({})",
            rs[0].reason
        );
    }
}

#[test]
fn a_reused_instance_serves_many_events_and_is_dropped_after_a_trap() {
    let rule = good();
    let RuleCode::Wasm(w) = rule.code() else {
        panic!()
    };
    let mut inst = w.reused_instance().unwrap();
    for _ in 0..100 {
        assert!(
            matches!(inst.classify(&issues_opened()), Ok(Verdict::Routes(rs)) if rs.len() == 1)
        );
    }
    let trap = wasm("trap", "");
    let RuleCode::Wasm(w) = trap.code() else {
        panic!()
    };
    let mut inst = w.reused_instance().unwrap();
    assert!(matches!(
        inst.classify(&issues_opened()),
        Err(RuleFailure::Trap(_))
    ));
    let again = inst.classify(&issues_opened());
    assert!(
        matches!(&again, Err(RuleFailure::Trap(m)) if m.contains("not reused")),
        "{again:?}"
    );
}

#[test]
fn host_calls_see_the_event_and_config() {
    // github-router reads kind, action and several pointers; its config renames agents.
    let rule = rule(&format!(
        "name = \"gh\"\ncomponent = {:?}\nproviders = [\"github\"]\n[grants]\nwasi = true\n[config]\ntriage_agent = \"my-triage\"",
        component("github-router").display().to_string()
    ));
    let Ok(Verdict::Routes(rs)) = rule.classify(&issues_opened()) else {
        panic!()
    };
    assert_eq!(rs[0].agent, "my-triage");
    assert!(
        rs[0].reason.contains("Codertocat/Hello-World"),
        "{}",
        rs[0].reason
    );
}

// ------------------------------------------------------------ rule sets

#[test]
fn circuit_breaker_switches_a_failing_rule_off_and_lets_it_back() {
    let breaker = BreakerConfig {
        failures: 3,
        cooldown_ms: 60_000,
    };
    let rules = RuleSet::new(
        vec![wasm("trap", ""), good()],
        MergeMode::Merge,
        FailurePolicy::Skip,
        &breaker,
    );
    for i in 0..3 {
        let d = rules.route(&issues_opened());
        assert!(
            matches!(failure(&d, "trap"), RuleFailure::Trap(_)),
            "call {i}"
        );
    }
    assert!(matches!(
        rules.breaker_state("trap"),
        Some(BreakerState::Open(_))
    ));
    for _ in 0..3 {
        let start = Instant::now();
        let d = rules.route(&issues_opened());
        assert!(
            matches!(failure(&d, "trap"), RuleFailure::Disabled(m) if m.contains("3 consecutive")),
            "{d:?}"
        );
        assert_eq!(agents(&d), vec![("bench", Priority::Medium)]);
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "a switched-off rule must not run"
        );
    }
    assert_eq!(
        rules.breaker_state("bench-three-fields"),
        Some(BreakerState::Closed)
    );

    // After the cool-down, one trial call; success closes the breaker.
    let flaky_fails = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = flaky_fails.clone();
    let flaky = Rule::native("flaky", move |_| {
        if f.load(std::sync::atomic::Ordering::SeqCst) {
            Err(RuleFailure::Trap("down".into()))
        } else {
            Ok(Verdict::Routes(vec![route("ok", Priority::Low, &[])]))
        }
    });
    let breaker = BreakerConfig {
        failures: 2,
        cooldown_ms: 100,
    };
    let rules = RuleSet::new(vec![flaky], MergeMode::Merge, FailurePolicy::Skip, &breaker);
    rules.route(&issues_opened());
    rules.route(&issues_opened());
    let d = rules.route(&issues_opened());
    assert!(matches!(failure(&d, "flaky"), RuleFailure::Disabled(_)));
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(rules.breaker_state("flaky"), Some(BreakerState::HalfOpen));
    flaky_fails.store(false, std::sync::atomic::Ordering::SeqCst);
    let d = rules.route(&issues_opened());
    assert_eq!(agents(&d), vec![("ok", Priority::Low)]);
    assert_eq!(rules.breaker_state("flaky"), Some(BreakerState::Closed));

    // Only one caller gets the trial, however long it runs: callers that
    // arrive after the cool-down has passed again, while the trial is still
    // in flight, stay switched off.
    let calls = Arc::new(AtomicU32::new(0));
    let release = Arc::new(AtomicBool::new(false));
    let slow = Rule::native("slow", {
        let (calls, release) = (calls.clone(), release.clone());
        move |_| {
            if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                // The trial: held until the test lets it go.
                let deadline = Instant::now() + Duration::from_secs(30);
                while !release.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Err(RuleFailure::Trap("still down".into()))
        }
    });
    let one = BreakerConfig {
        failures: 1,
        cooldown_ms: 50,
    };
    let rules = Arc::new(RuleSet::new(
        vec![slow],
        MergeMode::Merge,
        FailurePolicy::Skip,
        &one,
    ));
    rules.route(&issues_opened());
    let deadline = Instant::now() + Duration::from_secs(20);
    while rules.breaker_state("slow") != Some(BreakerState::HalfOpen) {
        assert!(Instant::now() < deadline, "the cool-down never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
    let trial = {
        let rules = rules.clone();
        std::thread::spawn(move || rules.route(&issues_opened()))
    };
    while calls.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the trial never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Three cool-downs pass with the trial still running.
    std::thread::sleep(Duration::from_millis(150));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let rules = rules.clone();
            std::thread::spawn(move || rules.route(&issues_opened()))
        })
        .collect();
    for w in workers {
        let d = w.join().unwrap();
        assert!(
            matches!(failure(&d, "slow"), RuleFailure::Disabled(_)),
            "{d:?}"
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one trial call in flight, not a second one"
    );
    release.store(true, Ordering::SeqCst);
    let d = trial.join().unwrap();
    assert!(matches!(failure(&d, "slow"), RuleFailure::Trap(_)));
    // The failed trial switched the rule off again for a whole cool-down.
    assert!(matches!(
        rules.breaker_state("slow"),
        Some(BreakerState::Open(_))
    ));
}

#[test]
fn guest_errors_and_over_limit_answers_do_not_switch_a_rule_off() {
    let breaker = BreakerConfig {
        failures: 2,
        cooldown_ms: 60_000,
    };
    let erring = Rule::native("erring", |_| {
        Err(RuleFailure::Guest("no such field".into()))
    });
    let wide = native_routes(
        "wide",
        (0..100)
            .map(|i| route(&format!("agent-{i}"), Priority::Low, &[]))
            .collect(),
    );
    let rules = RuleSet::new(
        vec![erring, wide, wasm("trap", "")],
        MergeMode::Merge,
        FailurePolicy::Skip,
        &breaker,
    );
    for round in 0..5 {
        let d = rules.route(&issues_opened());
        assert!(
            matches!(failure(&d, "erring"), RuleFailure::Guest(_)),
            "round {round}: {d:?}"
        );
        let over = failure(&d, "wide");
        assert!(
            matches!(over, RuleFailure::Output(m) if m.contains("100 routes")),
            "round {round}: {over:?}"
        );
        assert_eq!(over.kind(), "output");
    }
    assert_eq!(rules.breaker_state("erring"), Some(BreakerState::Closed));
    assert_eq!(rules.breaker_state("wide"), Some(BreakerState::Closed));
    // Traps count: two of them switch the rule off.
    assert!(matches!(
        rules.breaker_state("trap"),
        Some(BreakerState::Open(_))
    ));
}

#[test]
fn merge_mode_unions_by_agent_and_workflow() {
    let mut with_workflow = route("coder", Priority::Low, &["w"]);
    with_workflow.workflow = Some("fix".into());
    let a = native_routes(
        "a",
        vec![
            route("triage", Priority::Low, &["k:1", "x"]),
            route("coder", Priority::High, &[]),
        ],
    );
    let b = native_routes(
        "b",
        vec![
            route("triage", Priority::Critical, &["x", "k:2"]),
            with_workflow,
        ],
    );
    let c = Rule::native("c", |_| Ok(Verdict::Ignore("not mine".into())));
    let d = set(vec![a, b, c]).route(&issues_opened());
    assert_eq!(d.routes.len(), 3, "{d:?}");
    let triage = &d.routes[0];
    assert_eq!(
        (triage.agent.as_str(), triage.priority),
        ("triage", Priority::Critical)
    );
    assert_eq!(
        triage.reason, "triage at critical",
        "the winning priority's reason is kept"
    );
    assert_eq!(triage.labels, vec!["k:1", "x", "k:2"]);
    assert_eq!(
        (d.routes[1].agent.as_str(), d.routes[1].workflow.as_deref()),
        ("coder", None)
    );
    assert_eq!(
        (d.routes[2].agent.as_str(), d.routes[2].workflow.as_deref()),
        ("coder", Some("fix"))
    );
    assert_eq!(d.rules.len(), 3);
    assert!(matches!(
        outcome(&d, "c"),
        RuleOutcome::Verdict(Verdict::Ignore(_))
    ));
}

#[test]
fn first_mode_takes_the_first_rule_with_routes() {
    let ignore = Rule::native("ignore", |_| Ok(Verdict::Ignore("no".into())));
    let empty = native_routes("empty", vec![]);
    let a = native_routes("a", vec![route("first", Priority::Low, &[])]);
    let b = native_routes("b", vec![route("second", Priority::Critical, &[])]);
    let rules = RuleSet::new(
        vec![ignore, empty, a, b],
        MergeMode::First,
        FailurePolicy::Skip,
        &BreakerConfig::default(),
    );
    let d = rules.route(&issues_opened());
    assert_eq!(agents(&d), vec![("first", Priority::Low)]);
    let ran: Vec<_> = d.rules.iter().map(|r| r.rule.as_str()).collect();
    assert_eq!(
        ran,
        vec!["ignore", "empty", "a"],
        "rules after the first match do not run"
    );
}

#[test]
fn providers_and_kinds_filter_which_rules_run() {
    let gh = native_routes("gh", vec![route("gh", Priority::Low, &[])])
        .for_providers([Provider::Github]);
    let issues =
        native_routes("issues", vec![route("iss", Priority::Low, &[])]).for_kinds(["issues"]);
    let gl = native_routes("gl", vec![route("gl", Priority::Low, &[])])
        .for_providers([Provider::Gitlab]);
    let rules = set(vec![gh, issues, gl]);
    let d = rules.route(&issues_opened());
    assert_eq!(
        agents(&d),
        vec![("gh", Priority::Low), ("iss", Priority::Low)]
    );
    assert_eq!(outcome(&d, "gl"), &RuleOutcome::Skipped);
    let d = rules.route(&gitlab("Push Hook", "push.json"));
    assert_eq!(agents(&d), vec![("gl", Priority::Low)]);
}

#[test]
fn failure_policies_skip_default_agent_and_dead_letter() {
    let ok = || native_routes("ok", vec![route("ok", Priority::Low, &[])]);
    let d = set(vec![native_failing("bad"), ok()]).route(&issues_opened());
    assert_eq!(agents(&d), vec![("ok", Priority::Low)]);
    assert_eq!(d.dead_letter, None);

    let bad = native_failing("bad").with_policy(FailurePolicy::DefaultAgent("human".into()));
    let d = set(vec![bad, ok()]).route(&issues_opened());
    assert_eq!(
        agents(&d),
        vec![("human", Priority::Medium), ("ok", Priority::Low)]
    );
    assert!(
        d.routes[0].reason.contains("rule bad failed"),
        "{}",
        d.routes[0].reason
    );

    // The set's default applies to rules without their own policy.
    let rules = RuleSet::new(
        vec![native_failing("bad"), ok()],
        MergeMode::Merge,
        FailurePolicy::DeadLetter,
        &BreakerConfig::default(),
    );
    let d = rules.route(&issues_opened());
    assert!(
        d.dead_letter
            .as_deref()
            .is_some_and(|r| r.contains("rule bad failed")),
        "{d:?}"
    );
}

#[test]
fn a_panicking_native_rule_is_a_trap() {
    let boom = Rule::native("boom", |_| panic!("kaboom"));
    let d = set(vec![boom, good()]).route(&issues_opened());
    assert!(matches!(failure(&d, "boom"), RuleFailure::Trap(m) if m.contains("kaboom")));
    assert_eq!(agents(&d), vec![("bench", Priority::Medium)]);
}

#[test]
fn decisions_name_rule_versions_by_content_hash() {
    let a = good();
    let b = wasm("bench-three-fields", "[config]\nx = \"1\"");
    assert_eq!(a.version().len(), 16);
    assert!(a.version().bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        a.version(),
        good().version(),
        "same manifest and code, same version"
    );
    assert_ne!(a.version(), b.version(), "config is part of the version");
    // The main config's default limits are part of it too.
    let text = format!(
        "name = \"g\"\ncomponent = {:?}\n[grants]\nwasi = true",
        component("bench-three-fields").display().to_string()
    );
    let path = repo().join("inline.toml");
    let m = Manifest::parse(&path, &text).unwrap();
    let mut slower = RulesConfig::default();
    slower.limits.timeout_ms += 1;
    let v1 = Rule::from_manifest(&m, &path, &text, &RulesConfig::default(), engine()).unwrap();
    let v2 = Rule::from_manifest(&m, &path, &text, &slower, engine()).unwrap();
    assert_ne!(
        v1.version(),
        v2.version(),
        "effective limits are part of the version"
    );
    let d = set(vec![a]).route(&issues_opened());
    assert_eq!(d.rules[0].version, good().version());
    assert!(d.rules[0].duration_us > 0);
}

// ------------------------------------------------------------------ rhai

#[test]
fn rhai_limits_stop_loops_recursion_and_huge_strings() {
    let d = |r: Result<Rule, LoadError>| set(vec![r.unwrap(), good()]).route(&issues_opened());

    let looping = d(rhai(
        "spin",
        "fn classify(event) { let n = 0; loop { n += 1; } }",
        "[limits]\nmax_operations = 10000\ntimeout_ms = 10000",
    ));
    assert!(
        matches!(failure(&looping, "spin"), RuleFailure::Timeout(m) if m.contains("operations"))
    );
    assert_eq!(agents(&looping), vec![("bench", Priority::Medium)]);

    // A big operation budget: the wall-clock deadline stops it.
    let start = Instant::now();
    let slow = d(rhai(
        "slow",
        "fn classify(event) { loop { } }",
        "[limits]\nmax_operations = 100000000000\ntimeout_ms = 30",
    ));
    assert!(
        matches!(failure(&slow, "slow"), RuleFailure::Timeout(m) if m.contains("30 ms")),
        "{slow:?}"
    );
    // Wide: 1e11 operations would take minutes; the 30 ms deadline ended it.
    assert!(start.elapsed() < Duration::from_secs(10));

    let deep = d(rhai(
        "deep",
        "fn dive(n) { dive(n + 1) }\nfn classify(event) { dive(0) }",
        "",
    ));
    assert!(
        matches!(failure(&deep, "deep"), RuleFailure::Trap(m) if m.contains("stack overflow")),
        "{deep:?}"
    );

    let big = d(rhai(
        "big",
        "fn classify(event) { let s = \"xxxxxxxx\"; loop { s += s; } }",
        "",
    ));
    assert!(
        matches!(failure(&big, "big"), RuleFailure::Memory(_)),
        "{big:?}"
    );

    let arr = d(rhai(
        "arr",
        "fn classify(event) { let a = []; loop { a.push(1); } }",
        "[limits]\nmax_array_size = 100",
    ));
    assert!(
        matches!(failure(&arr, "arr"), RuleFailure::Memory(_)),
        "{arr:?}"
    );
}

#[test]
fn rhai_throw_is_a_guest_error_and_bad_answers_are_traps() {
    let r = rhai(
        "thrower",
        "fn classify(event) { throw `cannot route ${event.kind}`; }",
        "",
    )
    .unwrap();
    let got = r.classify(&issues_opened());
    assert!(
        matches!(&got, Err(RuleFailure::Guest(m)) if m.starts_with("cannot route issues")),
        "{got:?}"
    );

    for (script, want) in [
        ("fn classify(event) { 42 }", "expected an array"),
        (
            "fn classify(event) { [#{ priority: \"high\" }] }",
            "missing agent",
        ),
        (
            "fn classify(event) { [#{ agent: \"a\", priority: \"urgent\" }] }",
            "priority \"urgent\"",
        ),
        (
            "fn classify(event) { [#{ agent: \"a\", agnet: \"b\" }] }",
            "unknown key \"agnet\"",
        ),
        ("fn classify(event) { #{ routes: [] } }", "#{ignore"),
    ] {
        let r = rhai("bad", script, "").unwrap();
        let got = r.classify(&issues_opened());
        assert!(
            matches!(&got, Err(RuleFailure::Trap(m)) if m.contains(want)),
            "{script}: {got:?}"
        );
    }
    let r = rhai("ign", "fn classify(event) { #{ ignore: \"nope\" } }", "").unwrap();
    assert_eq!(
        r.classify(&issues_opened()),
        Ok(Verdict::Ignore("nope".into()))
    );
}

#[test]
fn rhai_sees_the_event_and_its_config() {
    let script = r#"
        fn classify(event) {
            [#{
                agent: config("agent"),
                priority: "low",
                workflow: (),
                reason: `${event.provider}/${event.source}/${event.kind}/${event.action}/${event.header("X-GitHub-Event")}`,
                labels: [
                    `num:${event.get("/issue/number")}`,
                    `login:${event.get("/issue/user").login}`,
                    `missing:${event.get("/nope") == ()}`,
                    `body:${event.body.len() > 1000}`,
                    `id:${event.delivery_id.starts_with("sha256:")}`,
                ],
            }]
        }
    "#;
    let r = rhai("reader", script, "[config]\nagent = \"from-config\"").unwrap();
    let Ok(Verdict::Routes(rs)) = r.classify(&issues_opened()) else {
        panic!()
    };
    assert_eq!(rs[0].agent, "from-config");
    assert_eq!(rs[0].reason, "github/github/issues/opened/issues");
    assert_eq!(
        rs[0].labels,
        vec![
            "num:1",
            "login:Codertocat",
            "missing:true",
            "body:true",
            "id:true"
        ]
    );
}

#[test]
fn rhai_reads_the_whole_payload_with_the_empty_pointer_and_fields_after_it() {
    let script = r#"
        fn classify(event) {
            let first = event.get("/repository/full_name");
            let doc = event.get("");
            let labels = [];
            for key in doc.keys() { labels.push(`key:${key}`); }
            labels.sort();
            labels.push(`doc:${doc.repository.full_name}`);
            labels.push(`first:${first}`);
            labels.push(`after:${event.get("/repository/full_name")}`);
            labels.push(`labels:${event.get("/issue/labels").len()}`);
            [#{ agent: "a", priority: "low", reason: "", labels: labels }]
        }
    "#;
    let r = rhai("whole", script, "").unwrap();
    let Ok(Verdict::Routes(rs)) = r.classify(&issues_opened()) else {
        panic!()
    };
    assert_eq!(
        rs[0].labels,
        vec![
            "key:action",
            "key:issue",
            "key:repository",
            "key:sender",
            "doc:Codertocat/Hello-World",
            "first:Codertocat/Hello-World",
            "after:Codertocat/Hello-World",
            "labels:1",
        ]
    );
}

#[test]
fn rhai_scripts_get_no_eval_and_no_imports() {
    let err = rhai("ev", "fn classify(event) { eval(\"1\") }", "")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rule ev (") && err.contains("ev.rhai"),
        "{err}"
    );
    // rhai is built without its module system: `import` does not parse.
    let err = rhai("imp", "fn classify(event) { import \"std\" as s; [] }", "")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rule imp (") && err.contains("line 1"),
        "{err}"
    );
    let err = rhai("nofn", "fn other(x) { x }", "")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no `fn classify(event)`"), "{err}");
    let err = rhai("syntax", "fn classify(event) { [ }", "")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rule syntax (") && err.contains("line 1"),
        "{err}"
    );
}

// ------------------------------------------------------- shipped rules

type Expected = Vec<(&'static str, Priority)>;

pub(crate) fn shipped() -> RuleSet {
    let wasm = repo().join("rules/github-router.wasm");
    assert!(
        wasm.is_file(),
        "{} is missing: run plugins/build.sh first (it copies the shipped component)",
        wasm.display()
    );
    RuleSet::load(&shipped_config(), &repo(), engine()).unwrap_or_else(|e| panic!("{e}"))
}

/// The shipped config's `[rules]` section: its approvals must cover the
/// shipped rules' grants.
fn shipped_config() -> RulesConfig {
    sluice::config::Config::parse(sluice::config::EMBEDDED_DEFAULTS, "sluice.toml")
        .expect("the embedded defaults parse")
        .rules
}

/// Default rules settings approving everything the named rules may ask for.
pub(crate) fn approving(rules: &[&str]) -> RulesConfig {
    let all: sluice::rules::grants::Approval =
        toml::from_str(crate::support::APPROVE_ALL).expect("APPROVE_ALL parses");
    RulesConfig {
        grants: rules.iter().map(|r| (r.to_string(), all.clone())).collect(),
        ..RulesConfig::default()
    }
}

#[test]
fn shipped_gitlab_rules_route_the_corpus() {
    let rules = shipped();
    let names: Vec<_> = rules.rules().map(|r| r.name()).collect();
    assert_eq!(names, vec!["github-router", "gitlab"], "file-name order");
    let cases: Vec<(Arc<ParsedEvent>, Expected)> = vec![
        (
            gitlab("Push Hook", "push.json"),
            vec![("ci-validation", Priority::Medium)],
        ),
        (
            gitlab("Tag Push Hook", "tag_push.json"),
            vec![("release-manager", Priority::High)],
        ),
        (
            gitlab("Merge Request Hook", "merge_request.json"),
            vec![("mr-reviewer", Priority::Medium)],
        ),
        (
            gitlab("Merge Request Hook", "group_merge_request.json"),
            vec![("mr-reviewer", Priority::Medium)],
        ),
        (
            gitlab("Pipeline Hook", "pipeline.json"),
            vec![("pipeline-monitor", Priority::Low)],
        ),
        (
            gitlab_edited("Pipeline Hook", "pipeline.json", |v| {
                v["object_attributes"]["status"] = "failed".into()
            }),
            vec![("pipeline-monitor", Priority::High)],
        ),
        (
            gitlab("Issue Hook", "issue.json"),
            vec![("issue-triage", Priority::Medium)],
        ),
        (
            gitlab("Confidential Issue Hook", "issue.json"),
            vec![("issue-triage", Priority::Medium)],
        ),
        (
            gitlab("Note Hook", "note_issue.json"),
            vec![("comment-handler", Priority::Medium)],
        ),
        (
            gitlab("Confidential Note Hook", "note_issue.json"),
            vec![("comment-handler", Priority::Medium)],
        ),
        // The agents' own accounts (the manifest's `agent_accounts`).
        (
            gitlab_edited("Note Hook", "note_issue.json", |v| {
                v["user"]["username"] = "sluice-agent".into()
            }),
            vec![],
        ),
        (
            gitlab("Note Hook", "note_merge_request.json"),
            vec![("comment-handler", Priority::Medium)],
        ),
        (
            gitlab("Note Hook", "note_commit.json"),
            vec![("comment-handler", Priority::Medium)],
        ),
        (
            gitlab_edited("Push Hook", "push.json", |v| {
                v["ref"] = "refs/heads/release/2.0".into()
            }),
            vec![
                ("ci-validation", Priority::Medium),
                ("release-manager", Priority::High),
            ],
        ),
        (
            gitlab_edited("Push Hook", "push.json", |v| {
                v["after"] = "0".repeat(40).into()
            }),
            vec![],
        ),
        (gitlab("Job Hook", "job.json"), vec![]),
    ];
    for (ev, want) in cases {
        let d = rules.route(&ev);
        assert_eq!(
            agents(&d),
            want,
            "{} {}: {d:#?}",
            ev.event.kind,
            String::from_utf8_lossy(&ev.event.body[..60])
        );
        assert_eq!(outcome(&d, "github-router"), &RuleOutcome::Skipped);
        assert!(
            d.rules
                .iter()
                .all(|r| !matches!(r.outcome, RuleOutcome::Failed(_))),
            "{d:?}"
        );
    }
    let d = rules.route(&gitlab("Push Hook", "push.json"));
    let labels = &d.routes[0].labels;
    assert!(labels.contains(&"branch:master".to_string()), "{labels:?}");
    assert!(
        labels.iter().any(|l| l.starts_with("project:")),
        "{labels:?}"
    );
}

#[test]
fn shipped_github_router_routes_the_corpus() {
    let rules = shipped();
    let cases = [
        (
            "issues",
            "issues/opened.payload.json",
            vec![("issue-triage", Priority::High)],
        ),
        (
            "issues",
            "issues/assigned.payload.json",
            vec![("issue-triage", Priority::High)],
        ),
        (
            "pull_request",
            "pull_request/ready_for_review.payload.json",
            vec![("review-agent", Priority::High)],
        ),
        (
            "pull_request",
            "pull_request/review_requested.payload.json",
            vec![("review-agent", Priority::High)],
        ),
        (
            "pull_request",
            "pull_request/opened.payload.json",
            vec![("review-agent", Priority::High)],
        ),
        (
            "push",
            "push/with-new-branch.payload.json",
            vec![("deployment", Priority::Medium)],
        ),
        ("push", "push/payload.json", vec![]),
        ("pull_request", "pull_request/labeled.payload.json", vec![]),
        (
            "workflow_run",
            "workflow_run/completed.payload.json",
            vec![],
        ),
        (
            "issue_comment",
            "issue_comment/created.payload.json",
            vec![],
        ),
        ("star", "star/created.payload.json", vec![]),
    ];
    for (kind, file, want) in cases {
        let d = rules.route(&github(kind, file));
        assert_eq!(agents(&d), want, "{file}: {d:#?}");
        assert_eq!(outcome(&d, "gitlab"), &RuleOutcome::Skipped);
        assert!(
            matches!(outcome(&d, "github-router"), RuleOutcome::Verdict(_)),
            "{file}: {d:?}"
        );
    }
    // The label that asks an agent to act, on a real payload with the label swapped in.
    let mut v: serde_json::Value =
        serde_json::from_slice(&corpus("github/issues/labeled.payload.json")).unwrap();
    v["label"]["name"] = "agent-execute".into();
    let d = rules.route(&event(
        Provider::Github,
        "issues",
        serde_json::to_vec(&v).unwrap(),
    ));
    assert_eq!(agents(&d), vec![("coordinator", Priority::Critical)]);
}

/// The Rust guest SDK clamps answers to its copy of the host's output limits
/// (`plugins/sdk-rust/src/limits.rs`): each side keeps one definition, and
/// this keeps the two equal.
#[test]
fn the_sdk_limits_are_the_hosts() {
    use sluice::rules::output;
    let path = repo().join("plugins/sdk-rust/src/limits.rs");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let sdk: std::collections::BTreeMap<&str, usize> = text
        .lines()
        .filter_map(|l| {
            let (name, value) = l.strip_prefix("pub const ")?.split_once(": usize = ")?;
            Some((
                name,
                value.trim_end_matches(';').replace('_', "").parse().ok()?,
            ))
        })
        .collect();
    let host = std::collections::BTreeMap::from([
        ("MAX_ROUTES", output::MAX_ROUTES),
        ("MAX_NAME", output::MAX_NAME),
        ("MAX_REASON", output::MAX_REASON),
        ("MAX_LABELS", output::MAX_LABELS),
        ("MAX_LABEL", output::MAX_LABEL),
        ("MAX_ERROR", output::MAX_ERROR),
        ("MAX_ORDERING_KEY", output::MAX_ORDERING_KEY),
        ("MAX_PAYLOAD", output::MAX_PAYLOAD),
        ("MAX_LOG_MESSAGE", sluice::rules::log::MAX_MESSAGE),
        ("MAX_LOG_FIELDS", sluice::rules::log::MAX_FIELDS),
        ("MAX_LOG_FIELD_KEY", sluice::rules::log::MAX_FIELD_KEY),
        ("MAX_LOG_FIELD_VALUE", sluice::rules::log::MAX_FIELD_VALUE),
    ]);
    assert_eq!(
        sdk,
        host,
        "{} and host/src/rules/{{output,log}}.rs",
        path.display()
    );
}

#[test]
fn the_bench_rhai_twin_matches_the_component() {
    let path = repo().join("rules/bench/three-fields.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let m = Manifest::parse(&path, &text).unwrap();
    let twin = Rule::from_manifest(&m, &path, &text, &RulesConfig::default(), engine()).unwrap();
    twin.check_tests(&m.tests, &path).unwrap();
    for (kind, file) in [
        ("issues", "issues/opened.payload.json"),
        ("pull_request", "pull_request/closed.payload.json"),
    ] {
        let ev = github(kind, file);
        assert_eq!(twin.classify(&ev), good().classify(&ev), "{file}");
    }
}

// ------------------------------------------------------------ manifests

fn manifest_err(text: &str) -> String {
    Manifest::parse(Path::new("rules/x.toml"), text)
        .unwrap_err()
        .to_string()
}

/// A vector's `set` edits a real payload by JSON pointer; a bad pointer is
/// refused naming the vector and the pointer.
#[test]
fn test_vector_edits_reach_the_rule_and_bad_ones_name_the_pointer() {
    let e = manifest_err(
        "name = \"x\"\nscript = \"x.rhai\"\nproviders = [\"github\"]\n[[test]]\n\
         event = \"e.json\"\nkind = \"issues\"\nset = { \"issue\" = 1 }",
    );
    assert!(
        e.starts_with("rules/x.toml: test[0].set: ") && e.contains("\"issue\""),
        "{e}"
    );
    let vector = |set: &str, agent: &str| {
        format!(
            "providers = [\"github\"]\n[[test]]\nevent = \"rules/tests/github-issues-opened.json\"\n\
             kind = \"issues\"\nset = {{ {set} }}\nexpect = [{{ agent = \"{agent}\", labels = [\"n:7\"] }}]"
        )
    };
    let script = "fn classify(event) { [#{ agent: event.get(\"/issue/title\"), \
                  labels: [`n:${event.get(\"/issue/number\")}`] }] }";
    rhai(
        "setter",
        script,
        &vector(
            "\"/issue/title\" = \"edited\", \"/issue/number\" = 7",
            "edited",
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Unedited, the real payload (issue #1) does not carry the label.
    let e = rhai(
        "setter",
        script,
        &vector("\"/issue/title\" = \"edited\"", "edited"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("expected routes [edited with labels [\"n:7\"]]"),
        "{e}"
    );
    let e = rhai("setter", script, &vector("\"/nope/deeper\" = 1", "x"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test[0]: set \"/nope/deeper\": the payload has no parent for it"),
        "{e}"
    );
}

#[test]
fn manifest_errors_name_the_file_and_key() {
    let base = "name = \"x\"\nscript = \"x.rhai\"\n";
    let e = manifest_err(&format!("{base}colour = \"red\""));
    assert!(
        e.starts_with("rules/x.toml: ") && e.contains("unknown field `colour`"),
        "{e}"
    );
    let e = manifest_err(&format!("{base}[limits]\ntimeout_ms = \"soon\""));
    assert!(e.starts_with("rules/x.toml: limits.timeout_ms: "), "{e}");
    let e = manifest_err(&format!("{base}[limits]\nfuel = 3"));
    assert!(
        e.starts_with("rules/x.toml: limits") && e.contains("fuel"),
        "{e}"
    );
    let e = manifest_err(&format!("{base}providers = [\"github\", \"gitbucket\"]"));
    assert!(
        e.starts_with("rules/x.toml: providers[1]: unknown provider \"gitbucket\""),
        "{e}"
    );
    let e = manifest_err(&format!("{base}[grants]\nnetwork = true"));
    assert!(
        e.starts_with("rules/x.toml: grants") && e.contains("network"),
        "{e}"
    );
    let e = manifest_err(&format!("{base}on_error = \"explode\""));
    assert!(e.starts_with("rules/x.toml: on_error: "), "{e}");
    let e = manifest_err(&format!(
        "{base}[[test]]\nevent = \"a.json\"\nkind = \"issues\"\nexpect = [{{ agent = \"a\", priority = \"urgent\" }}]"
    ));
    assert!(
        e.starts_with("rules/x.toml: test[0].expect[0].priority: "),
        "{e}"
    );
    let e = manifest_err("name = \"x\"");
    assert!(e.starts_with("rules/x.toml: component: missing"), "{e}");
    let e = manifest_err("name = \"X Y\"\nscript = \"x.rhai\"");
    assert!(e.starts_with("rules/x.toml: name: "), "{e}");
    let e = manifest_err("name = \"x\"\nscript = \"x.rhai\"\nproviders = [");
    assert!(
        e.starts_with("rules/x.toml: ") && e.contains("line 3"),
        "{e}"
    );

    let m = Manifest::parse(
        Path::new("x.toml"),
        &format!("{base}on_error = {{ default-agent = \"human\" }}"),
    )
    .unwrap();
    assert_eq!(
        m.on_error,
        Some(FailurePolicy::DefaultAgent("human".into()))
    );
}

#[test]
fn rule_set_load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let load = || {
        RuleSet::load(&approving(&["a", "b"]), dir.path(), engine())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };

    std::fs::write(rules.join("a.toml"), "name = \"a\"\nscript = \"a.rhai\"\n").unwrap();
    let e = load();
    assert!(
        e.contains("rule a (") && e.contains("a.rhai): cannot read"),
        "{e}"
    );

    std::fs::write(
        rules.join("a.rhai"),
        "fn classify(event) { [#{agent: \"a\"}] }",
    )
    .unwrap();
    std::fs::write(rules.join("b.toml"), "name = \"a\"\nscript = \"a.rhai\"\n").unwrap();
    let e = load();
    assert!(e.contains("b.toml") && e.contains("also used by"), "{e}");

    std::fs::write(
        rules.join("b.toml"),
        "name = \"b\"\nscript = \"a.rhai\"\n[limits]\ntimeout_ms = 0",
    )
    .unwrap();
    let e = load();
    assert!(e.contains("b.toml): limits.timeout_ms"), "{e}");

    // A failing test vector stops the load, naming the vector.
    std::fs::write(
        rules.join("ev.json"),
        corpus("github/issues/opened.payload.json"),
    )
    .unwrap();
    std::fs::write(
        rules.join("b.toml"),
        "name = \"b\"\nscript = \"a.rhai\"\nproviders = [\"github\"]\n[[test]]\nevent = \"ev.json\"\nkind = \"issues\"\nexpect = [{ agent = \"z\" }]",
    )
    .unwrap();
    let e = load();
    assert!(
        e.contains("b.toml): test[0]: ev.json: expected routes [z], got routes [a (medium)]"),
        "{e}"
    );

    std::fs::write(
        rules.join("b.toml"),
        "name = \"b\"\nscript = \"a.rhai\"\nproviders = [\"github\"]\n[[test]]\nevent = \"ev.json\"\nkind = \"issues\"\nexpect = [{ agent = \"a\", priority = \"medium\" }]",
    )
    .unwrap();
    let set = RuleSet::load(&approving(&["a", "b"]), dir.path(), engine()).unwrap();
    assert_eq!(
        set.rules().map(|r| r.name()).collect::<Vec<_>>(),
        vec!["a", "b"]
    );

    // An explicit list loads exactly those, in that order.
    let config = RulesConfig {
        load: Some(vec!["b".into(), "a".into()]),
        ..approving(&["a", "b"])
    };
    let set = RuleSet::load(&config, dir.path(), engine()).unwrap();
    assert_eq!(
        set.rules().map(|r| r.name()).collect::<Vec<_>>(),
        vec!["b", "a"]
    );
    let config = RulesConfig {
        load: Some(vec!["c".into()]),
        ..RulesConfig::default()
    };
    let e = RuleSet::load(&config, dir.path(), engine())
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.toml") && e.contains("does not exist"), "{e}");
}

#[test]
fn rules_config_defaults_and_rejects_unknown_keys() {
    let c: RulesConfig = toml::from_str("").unwrap();
    assert_eq!(c, RulesConfig::default());
    let c: RulesConfig = toml::from_str(
        "dir = \"r\"\nmerge = \"first\"\non_error = { default-agent = \"human\" }\nworkers = 4\n[limits]\ntimeout_ms = 20\n[breaker]\nfailures = 2",
    )
    .unwrap();
    assert_eq!(c.merge, MergeMode::First);
    assert_eq!(c.on_error, FailurePolicy::DefaultAgent("human".into()));
    assert_eq!(
        (
            c.workers,
            c.limits.timeout_ms,
            c.limits.memory_mb,
            c.breaker.failures
        ),
        (4, 20, 32, 2)
    );
    let e = toml::from_str::<RulesConfig>("wrokers = 4")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `wrokers`"), "{e}");
    let e = toml::from_str::<RulesConfig>("on_error = \"dead-letter\"\nmerge = \"all\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown variant `all`"), "{e}");
}

/// The entries of a wasmtime compile cache: the files under
/// `modules/<compiler>/` named by a hash alone (beside them wasmtime keeps
/// `.stats` files and temporary `.wip-*` files).
fn cache_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries = Vec::new();
    let Ok(compilers) = std::fs::read_dir(dir.join("modules")) else {
        return entries;
    };
    for compiler in compilers {
        for entry in std::fs::read_dir(compiler.unwrap().path()).unwrap() {
            let path = entry.unwrap().path();
            if !path.file_name().unwrap().to_string_lossy().contains('.') {
                entries.push(path);
            }
        }
    }
    entries
}

#[test]
fn the_compile_cache_is_used_on_the_next_load() {
    use sluice::rules::wasm::CacheStats;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "name = \"g\"\ncomponent = {:?}\n[grants]\nwasi = true",
        component("bench-three-fields").display().to_string()
    );
    let path = repo().join("inline.toml");
    let m = Manifest::parse(&path, &text).unwrap();
    let load = |engine: &WasmEngine| {
        let rule = Rule::from_manifest(&m, &path, &text, &RulesConfig::default(), engine).unwrap();
        assert!(matches!(
            rule.classify(&issues_opened()),
            Ok(Verdict::Routes(_))
        ));
    };
    let stats = |hits, misses| CacheStats { hits, misses };

    // The first load compiles and writes one entry.
    let engine = WasmEngine::new(Some(dir.path().to_owned())).unwrap();
    load(&engine);
    assert_eq!(engine.cache_stats(), stats(0, 1));
    let cached = cache_entries(dir.path());
    assert_eq!(cached.len(), 1, "{cached:?}");
    let written = std::fs::read(&cached[0]).unwrap();
    // The next load, by this engine or by a new one (a restart), reads it.
    load(&engine);
    assert_eq!(engine.cache_stats(), stats(1, 1));
    drop(engine);
    let engine = WasmEngine::new(Some(dir.path().to_owned())).unwrap();
    load(&engine);
    assert_eq!(engine.cache_stats(), stats(1, 0));
    assert_eq!(cache_entries(dir.path()), cached);

    // A corrupt entry is not trusted: the component is compiled again, runs,
    // and the entry is rewritten whole.
    std::fs::write(&cached[0], b"garbage").unwrap();
    load(&engine);
    assert_eq!(engine.cache_stats(), stats(1, 1));
    assert_eq!(std::fs::read(&cached[0]).unwrap(), written);
    // Likewise a torn one (the second half zeroed, as a crash could leave
    // it): it fails to decompress and is recompiled, not executed.
    let mut torn = written.clone();
    let mid = torn.len() / 2;
    torn[mid..].fill(0);
    std::fs::write(&cached[0], &torn).unwrap();
    load(&engine);
    assert_eq!(engine.cache_stats(), stats(1, 2));
    assert_eq!(std::fs::read(&cached[0]).unwrap(), written);
}

#[test]
fn the_compile_cache_deletes_its_oldest_entries_past_its_size_limit() {
    use sluice::rules::config::{CacheConfig, Limits};
    use sluice::rules::manifest::Grants;
    let bytes = std::fs::read(component("bench-three-fields")).unwrap();
    // The same component under distinct cache keys: a custom section
    // (ignored by the engine) that differs per copy.
    let variant = |i: usize| {
        let name = b"sluice-test";
        let payload = format!("{i:08}");
        let mut v = bytes.clone();
        v.push(0);
        v.push(u8::try_from(1 + name.len() + payload.len()).unwrap());
        v.push(u8::try_from(name.len()).unwrap());
        v.extend_from_slice(name);
        v.extend_from_slice(payload.as_bytes());
        v
    };
    let dir = tempfile::tempdir().unwrap();
    let limit = CacheConfig {
        max_size_mb: 1,
        cleanup_interval_s: 0,
    };
    let engine =
        WasmEngine::with_cache(Some(dir.path().to_owned()), &limit, &PoolConfig::default())
            .unwrap();
    let grants = Grants {
        wasi: true,
        ..Grants::default()
    };
    let load = |i: usize| {
        engine
            .load(
                "v",
                &variant(i),
                &grants,
                Default::default(),
                &Limits::default(),
            )
            .unwrap();
    };
    let size = |entries: &[PathBuf]| -> u64 {
        entries
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    };
    load(0);
    let one = size(&cache_entries(dir.path()));
    assert!(one > 0);
    // Enough copies to write twice the limit.
    let n = usize::try_from((2 << 20) / one + 1).unwrap();
    for i in 1..n {
        load(i);
    }
    assert_eq!(engine.cache_stats().misses, n);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let entries = cache_entries(dir.path());
        if size(&entries) <= 1 << 20 && entries.len() < n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cache still holds {} entries, {} bytes, after writing {n} of {one} bytes",
            entries.len(),
            size(&entries)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- CLI

#[test]
fn route_dry_run_prints_every_rule_and_the_merged_routes() {
    let wasm = repo().join("rules/github-router.wasm");
    assert!(
        wasm.is_file(),
        "{} is missing: run plugins/build.sh first",
        wasm.display()
    );
    let cache = tempfile::tempdir().unwrap();
    let config = RulesConfig {
        cache_dir: Some(cache.path().to_owned()),
        ..shipped_config()
    };
    let payload = repo().join("../shared/corpus/gitlab/webhooks/tag_push.json");
    let report = sluice::cli::route::route_file(
        &config,
        &repo(),
        cache.path(),
        "gitlab",
        Provider::Gitlab,
        "Tag Push Hook",
        None,
        &payload,
    )
    .unwrap();
    assert_eq!(
        agents(&report.decision),
        vec![("release-manager", Priority::High)]
    );
    let mut text = Vec::new();
    sluice::cli::route::print(&report, false, &mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("github-router") && text.contains("skipped"),
        "{text}"
    );
    assert!(text.contains("release-manager (high)"), "{text}");
    let mut json = Vec::new();
    sluice::cli::route::print(&report, true, &mut json).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v["decision"]["routes"][0]["agent"], "release-manager");
    assert_eq!(v["rule_set"].as_array().unwrap().len(), 2);
    assert_eq!(v["decision"]["rules"][1]["rule"], "gitlab");

    let e = sluice::cli::route::route_file(
        &config,
        &repo(),
        cache.path(),
        "gitlab",
        Provider::Gitlab,
        "x",
        None,
        Path::new("/nonexistent.json"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent.json"), "{e}");
}

// --------------------------------------------------------------- router

/// A fresh embedded store in `dir` (which must outlive it).
fn sqlite(dir: &tempfile::TempDir) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open(&dir.path().join("s.db"), 64).expect("open the store"))
}

fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

/// Stores a GitLab corpus payload the only way an event enters the store: a
/// verified request (the kind header, a fresh delivery id) normalised into a
/// `NewEvent` and appended. Returns the store's id.
async fn append_gitlab(store: &SqliteStore, kind: &str, file: &str) -> String {
    static DELIVERIES: AtomicU64 = AtomicU64::new(1);
    let delivery = format!("delivery-{}", DELIVERIES.fetch_add(1, Ordering::Relaxed));
    let mut headers = HeaderMap::new();
    headers.insert("x-gitlab-event", HeaderValue::from_str(kind).unwrap());
    headers.insert("idempotency-key", HeaderValue::from_str(&delivery).unwrap());
    let body = Bytes::from(corpus(&format!("gitlab/webhooks/{file}")));
    let verified = Verifier::None
        .verify_at(headers, body, now_ms())
        .expect("an unsigned source verifies");
    let new = normalize(
        "gitlab",
        Provider::Gitlab,
        &Naming::default(),
        verified,
        now_ms(),
    )
    .unwrap_or_else(|e| panic!("{file} normalises: {e}"));
    match store.append(new).await.expect("append") {
        Appended::Stored(id) => id,
        dup => panic!("{delivery} is a fresh delivery: {dup:?}"),
    }
}

async fn record(store: &SqliteStore, id: &str) -> EventRecord {
    store
        .get(id)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("{id} is stored"))
}

fn decision(rec: &EventRecord) -> &Decision {
    rec.decision
        .as_ref()
        .unwrap_or_else(|| panic!("{} has no decision: {rec:?}", rec.summary.id))
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn options() -> RouterOptions {
    RouterOptions {
        workers: 2,
        batch: 4,
        // Far longer than any routing here, even on a loaded machine: tests
        // that need an expired lease take one with a claim of their own.
        lease: Duration::from_secs(60),
        poll: Duration::from_millis(20),
        retry_base: Duration::from_millis(5),
        retry_max: Duration::from_millis(20),
        max_defer: Duration::from_secs(3600),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_workers_route_stored_events_and_stop_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir);
    let rules = Arc::new(ArcSwap::from_pointee(shipped()));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router::run(
        store.clone(),
        rules.clone(),
        options(),
        shutdown,
    ));

    let push = append_gitlab(&store, "Push Hook", "push.json").await;
    let tag = append_gitlab(&store, "Tag Push Hook", "tag_push.json").await;
    let note = append_gitlab(&store, "Note Hook", "note_issue.json").await;
    let push = until_status(store.as_ref(), &push, EventStatus::Routed).await;
    let tag = until_status(store.as_ref(), &tag, EventStatus::Routed).await;
    let note = until_status(store.as_ref(), &note, EventStatus::Routed).await;
    assert_eq!(
        agents(decision(&push)),
        vec![("ci-validation", Priority::Medium)]
    );
    assert_eq!(
        agents(decision(&tag)),
        vec![("release-manager", Priority::High)]
    );
    assert_eq!(
        agents(decision(&note)),
        vec![("comment-handler", Priority::Medium)]
    );
    for rec in [&push, &tag, &note] {
        assert_eq!(rec.summary.attempts, 1, "{rec:?}");
        assert_eq!(rec.last_error, None);
        let gitlab = decision(rec)
            .rules
            .iter()
            .find(|r| r.rule == "gitlab")
            .unwrap();
        assert_eq!(gitlab.version.len(), 16);
    }

    // A swapped rule set serves the next event.
    rules.store(Arc::new(set_of_one(native_routes(
        "swapped",
        vec![route("new", Priority::Low, &[])],
    ))));
    let next = append_gitlab(&store, "Push Hook", "push.json").await;
    let next = until_status(store.as_ref(), &next, EventStatus::Routed).await;
    assert_eq!(agents(decision(&next)), vec![("new", Priority::Low)]);

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("workers stop on shutdown")
        .unwrap();
}

fn set_of_one(rule: Rule) -> RuleSet {
    set(vec![rule])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_policy_retries_then_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir);
    // The rule always fails; its third call waits for the test, so the state
    // the two retries left behind can be read from the store mid-flight.
    let calls = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(AtomicBool::new(false));
    let failing = Rule::native("bad", {
        let (calls, gate) = (calls.clone(), gate.clone());
        move |_| {
            if calls.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
                let deadline = Instant::now() + Duration::from_secs(20);
                while !gate.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Err(RuleFailure::Guest("always fails".into()))
        }
    })
    .with_policy(FailurePolicy::DeadLetter);
    let rules = Arc::new(ArcSwap::from_pointee(set_of_one(failing)));
    // A lease far longer than the test: only `retry_later` can make the event
    // claimable again, so every attempt after the first is a retry.
    let options = RouterOptions {
        lease: Duration::from_secs(600),
        ..options()
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router::run(store.clone(), rules, options, shutdown));
    let id = append_gitlab(&store, "Push Hook", "push.json").await;

    until("the third attempt", || calls.load(Ordering::SeqCst) == 3).await;
    let mid = record(&store, &id).await;
    assert_eq!(mid.summary.status, EventStatus::Claimed);
    assert_eq!(
        mid.summary.attempts, 3,
        "max_attempts 3: two retries before the last attempt"
    );
    let retried = mid.last_error.as_deref().expect("the retry says why");
    assert!(
        retried.contains("rule bad failed") && retried.contains("always fails"),
        "{retried}"
    );
    assert!(mid.decision.is_none());

    gate.store(true, Ordering::SeqCst);
    let dead = until_status(store.as_ref(), &id, EventStatus::Dead).await;
    assert_eq!(dead.summary.attempts, 3, "no attempt after the DLQ");
    let reason = dead
        .last_error
        .as_deref()
        .expect("the dead letter says why");
    assert!(
        reason.contains("rule bad failed") && reason.contains("always fails"),
        "{reason}"
    );
    assert!(dead.decision.is_none());
    let listed = store
        .list(&ListFilter {
            status: Some(EventStatus::Dead),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec![id.as_str()]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// Replaying a dead letter runs the rules again with a fresh attempt budget:
/// the replay is a new start, not the fourth of three attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_is_routed_by_its_rules() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir);
    let fixed = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let rule = Rule::native("flaky", {
        let (fixed, calls) = (fixed.clone(), calls.clone());
        move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            if fixed.load(Ordering::SeqCst) {
                Ok(Verdict::Routes(vec![route("fixed", Priority::Low, &[])]))
            } else {
                Err(RuleFailure::Guest("broken until fixed".into()))
            }
        }
    })
    .with_policy(FailurePolicy::DeadLetter);
    let rules = Arc::new(ArcSwap::from_pointee(set_of_one(rule)));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router::run(store.clone(), rules, options(), shutdown));
    let id = append_gitlab(&store, "Push Hook", "push.json").await;
    let dead = until_status(store.as_ref(), &id, EventStatus::Dead).await;
    assert_eq!(dead.summary.attempts, 3);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // The rule is fixed; the operator replays the event.
    fixed.store(true, Ordering::SeqCst);
    store.requeue(&id).await.unwrap();
    let rec = until_status(store.as_ref(), &id, EventStatus::Routed).await;
    assert_eq!(agents(decision(&rec)), vec![("fixed", Priority::Low)]);
    assert_eq!(rec.summary.attempts, 1, "the replay starts a fresh count");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "the rule ran on the replay"
    );
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_claimed_by_a_crashed_worker_is_routed_after_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir);
    let id = append_gitlab(&store, "Issue Hook", "issue.json").await;
    // A worker claims it and dies before deciding.
    let claimed_at = Instant::now();
    let claimed = store
        .claim("crashed", 10, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(
        claimed
            .iter()
            .map(|c| (c.event.id.as_str(), c.attempt))
            .collect::<Vec<_>>(),
        vec![(id.as_str(), 1)]
    );
    let rules = Arc::new(ArcSwap::from_pointee(shipped()));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router::run(store.clone(), rules, options(), shutdown));
    let rec = until_status(store.as_ref(), &id, EventStatus::Routed).await;
    // The store keeps lease ends in whole milliseconds, so the lease may end
    // up to 1 ms before 200 ms have passed on this clock.
    assert!(
        claimed_at.elapsed() >= Duration::from_millis(199),
        "routed before the lease expired"
    );
    assert_eq!(rec.summary.attempts, 2);
    assert_eq!(
        agents(decision(&rec)),
        vec![("issue-triage", Priority::Medium)]
    );
    drop(stop); // dropping the sender also stops the workers
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_routing_never_finishes_is_dead_lettered_not_retried_forever() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir);
    let id = append_gitlab(&store, "Issue Hook", "issue.json").await;
    // Three workers in a row take it and die mid-route (as a host-crashing
    // event would make them); max_attempts is 3.
    for attempt in 1..=3 {
        let c = store
            .claim("crashed", 10, Duration::from_millis(30))
            .await
            .unwrap();
        assert_eq!(
            c.iter().map(|c| c.attempt).collect::<Vec<_>>(),
            vec![attempt]
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let routed = Arc::new(AtomicU32::new(0));
    let counter = routed.clone();
    let watcher = Rule::native("watcher", move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(Verdict::Routes(vec![]))
    });
    let rules = Arc::new(ArcSwap::from_pointee(set(vec![watcher])));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router::run(store.clone(), rules, options(), shutdown));
    let rec = until_status(store.as_ref(), &id, EventStatus::Dead).await;
    assert!(
        rec.last_error
            .as_deref()
            .is_some_and(|e| e.contains("never finished")),
        "{rec:?}"
    );
    assert!(rec.decision.is_none());
    assert_eq!(
        routed.load(Ordering::SeqCst),
        0,
        "the rules did not run a fourth time"
    );
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_keep_routing_past_a_looping_rule() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir);
    // The trap fixture's panic message goes through WASI stderr (the empty
    // context's sink) from a blocking thread inside the runtime.
    let rules = set(vec![
        wasm("loop", "[limits]\ntimeout_ms = 20"),
        wasm("trap", ""),
        good(),
    ]);
    let rules = Arc::new(ArcSwap::from_pointee(rules));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router::run(store.clone(), rules, options(), shutdown));
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(append_gitlab(&store, "Push Hook", "push.json").await);
    }
    let mut decisions = Vec::new();
    for id in &ids {
        let rec = until_status(store.as_ref(), id, EventStatus::Routed).await;
        decisions.push(decision(&rec).clone());
    }
    let count =
        |f: fn(&RuleFailure) -> bool| decisions.iter().filter(|d| f(failure(d, "loop"))).count();
    let timeouts = count(|f| matches!(f, RuleFailure::Timeout(_)));
    let disabled = count(|f| matches!(f, RuleFailure::Disabled(_)));
    // The breaker opens after five consecutive timeouts; with two workers a
    // sixth call may already be running when the fifth fails.
    assert!(
        timeouts >= 5 && timeouts + disabled == 6,
        "{timeouts} timeouts, {disabled} disabled"
    );
    for d in &decisions {
        assert!(matches!(
            failure(d, "trap"),
            RuleFailure::Trap(_) | RuleFailure::Disabled(_)
        ));
        assert_eq!(agents(d), vec![("bench", Priority::Medium)]);
    }
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[test]
fn rule_sets_serve_several_threads_at_once() {
    let rules = Arc::new(set(vec![
        wasm("trap", ""),
        good(),
        rhai("r", "fn classify(e) { [#{agent: e.kind}] }", "").unwrap(),
    ]));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let rules = rules.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    let d = rules.route(&issues_opened());
                    assert_eq!(
                        agents(&d),
                        vec![("bench", Priority::Medium), ("issues", Priority::Medium)]
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn backoff_grows_and_is_capped() {
    let base = Duration::from_millis(100);
    let max = Duration::from_secs(1);
    // Full jitter: attempt n waits uniformly in [0, min(max, base * 2^(n-1))].
    // Of 500 draws, the largest lies in the top quarter of that range unless
    // the range did not grow (a chance of 0.75^500 otherwise).
    for attempt in 1..30u32 {
        let cap = (base * 2u32.pow((attempt - 1).min(20))).min(max);
        let draws: Vec<Duration> = (0..500)
            .map(|_| router::backoff(attempt, base, max))
            .collect();
        let longest = *draws.iter().max().unwrap();
        assert!(
            longest <= cap,
            "attempt {attempt}: {longest:?} over {cap:?}"
        );
        assert!(
            longest >= cap.mul_f64(0.75),
            "attempt {attempt}: longest of 500 draws {longest:?}, range up to {cap:?}"
        );
    }
}

#[test]
fn rhai_depth_limits_are_capped_so_a_manifest_cannot_overflow_the_host_stack() {
    let mut config = RulesConfig::default();
    config.limits.max_call_levels = 500;
    let e = config.validate().unwrap_err();
    assert!(
        e.contains("rules.limits.max_call_levels") && e.contains("64"),
        "{e}"
    );
    let mut config = RulesConfig::default();
    config.limits.max_expr_depth = 10_000;
    assert!(config.validate().unwrap_err().contains("max_expr_depth"));
    let e = try_rule("name = \"deep\"\nscript = \"x.rhai\"\n[limits]\nmax_call_levels = 500\n")
        .unwrap_err();
    assert!(e.to_string().contains("max_call_levels"), "{e}");
}

// ------------------------------------------------ policies, leases and the pool

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_defers_dead_letter_events_without_counting_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir);
    // The rule traps once (switching itself off for the cool-down), then works.
    let calls = Arc::new(AtomicU32::new(0));
    let flaky = Rule::native("flaky", {
        let calls = calls.clone();
        move |_| {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(RuleFailure::Trap("down".into()))
            } else {
                Ok(Verdict::Routes(vec![route("ok", Priority::Low, &[])]))
            }
        }
    })
    .with_policy(FailurePolicy::DeadLetter);
    let breaker = BreakerConfig {
        failures: 1,
        cooldown_ms: 1_500,
    };
    let rules = Arc::new(ArcSwap::from_pointee(RuleSet::new(
        vec![flaky],
        MergeMode::Merge,
        FailurePolicy::DeadLetter,
        &breaker,
    )));
    // Retries far shorter than the cool-down: counted, they would run out
    // and dead-letter the event before the rule could run again.
    let options = RouterOptions {
        lease: Duration::from_secs(600),
        ..options()
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router::run(store.clone(), rules, options, shutdown));
    let id = append_gitlab(&store, "Push Hook", "push.json").await;

    let routed = until_status(store.as_ref(), &id, EventStatus::Routed).await;
    assert_eq!(agents(decision(&routed)), vec![("ok", Priority::Low)]);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the trap, then the trial");
    assert_eq!(
        routed.summary.attempts, 2,
        "the claims that met the open breaker are not attempts"
    );
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// Deferral has an end: an event deferred for longer than `max_defer` meets
/// its rule's failure policy, so a rule that stays switched off still
/// dead-letters its events in the end instead of holding them forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_deferred_past_the_limit_meet_the_failure_policy() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir);
    let down = Rule::native("down", |_| Err(RuleFailure::Trap("down".into())))
        .with_policy(FailurePolicy::DeadLetter);
    let breaker = BreakerConfig {
        failures: 1,
        cooldown_ms: 600_000,
    };
    let rules = Arc::new(ArcSwap::from_pointee(RuleSet::new(
        vec![down],
        MergeMode::Merge,
        FailurePolicy::DeadLetter,
        &breaker,
    )));
    let options = RouterOptions {
        max_defer: Duration::ZERO,
        ..options()
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router::run(store.clone(), rules, options, shutdown));
    let id = append_gitlab(&store, "Push Hook", "push.json").await;
    let dead = until_status(store.as_ref(), &id, EventStatus::Dead).await;
    assert_eq!(dead.summary.attempts, 3, "max_attempts counted claims");
    let reason = dead.last_error.as_deref().unwrap_or_default();
    assert!(
        reason.contains("deferred for longer than rules.max_defer_ms"),
        "{reason}"
    );
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_an_open_breaker_skipped_are_listed_for_replay() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir);
    let bad = Rule::native("bad", |_| Err(RuleFailure::Trap("down".into())));
    let ok = native_routes("ok", vec![route("ok", Priority::Low, &[])]);
    let breaker = BreakerConfig {
        failures: 1,
        cooldown_ms: 600_000,
    };
    let rules = Arc::new(ArcSwap::from_pointee(RuleSet::new(
        vec![bad, ok],
        MergeMode::Merge,
        FailurePolicy::Skip,
        &breaker,
    )));
    let options = RouterOptions {
        workers: 1,
        ..options()
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router::run(store.clone(), rules, options, shutdown));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = append_gitlab(&store, "Push Hook", "push.json").await;
        until_status(store.as_ref(), &id, EventStatus::Routed).await;
        ids.push(id);
    }
    let listed = |rule: &str| {
        let store = store.clone();
        let rule = rule.to_owned();
        async move {
            store
                .list(&ListFilter {
                    rule_disabled: Some(rule),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.id)
                .collect::<Vec<_>>()
        }
    };
    // The first event ran the rule (a trap); the next two met the open breaker.
    assert_eq!(listed("bad").await, vec![ids[2].clone(), ids[1].clone()]);
    assert!(listed("ok").await.is_empty());
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[test]
fn an_exhausted_instance_pool_defers_the_event_and_spares_the_breaker() {
    let pool = PoolConfig {
        instances: 1,
        ..PoolConfig::default()
    };
    let engine = WasmEngine::with_pool(None, &pool).unwrap();
    let path = component("bench-three-fields");
    let manifest = format!(
        "name = \"bench\"\ncomponent = {:?}\n[grants]\nwasi = true",
        path.display().to_string()
    );
    let manifest_path = repo().join("pool-test.toml");
    let m = Manifest::parse(&manifest_path, &manifest).unwrap();
    let rule = Rule::from_manifest(
        &m,
        &manifest_path,
        &manifest,
        &RulesConfig::default(),
        &engine,
    )
    .unwrap();
    let breaker = BreakerConfig {
        failures: 1,
        cooldown_ms: 60_000,
    };
    let rules = RuleSet::new(vec![rule], MergeMode::Merge, FailurePolicy::Skip, &breaker);
    let RuleCode::Wasm(w) = rules.rules().next().unwrap().code() else {
        panic!("a component")
    };
    // The pool's only instance is taken.
    let held = w.reused_instance().unwrap();
    let d = rules.route(&issues_opened());
    let defer = d.defer.as_ref().expect("deferred");
    assert!(defer.reason.contains("concurrent limit"), "{defer:?}");
    assert_eq!(rules.breaker_state("bench"), Some(BreakerState::Closed));
    drop(held);
    let d = rules.route(&issues_opened());
    assert!(d.defer.is_none(), "{d:?}");
    assert_eq!(agents(&d), vec![("bench", Priority::Medium)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_keeps_its_leases_while_routed_one_event_after_another() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir);
    // Five events of 600 ms each take 3 s, under one lease of 2 s: without
    // renewal the last ones expire mid-batch and the other worker takes them.
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(append_gitlab(&store, "Push Hook", "push.json").await);
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let slow = Rule::native("slow", {
        let seen = seen.clone();
        move |ev| {
            seen.lock().unwrap().push(ev.event.id.clone());
            std::thread::sleep(Duration::from_millis(600));
            Ok(Verdict::Routes(vec![route("ok", Priority::Low, &[])]))
        }
    });
    let rules = Arc::new(ArcSwap::from_pointee(set_of_one(slow)));
    let options = RouterOptions {
        workers: 2,
        batch: 5,
        lease: Duration::from_secs(2),
        ..options()
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router::run(store.clone(), rules, options, shutdown));
    for id in &ids {
        let rec = until_status(store.as_ref(), id, EventStatus::Routed).await;
        assert_eq!(rec.summary.attempts, 1, "{id} was claimed again");
    }
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want, "each event routed exactly once");
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[test]
fn a_rule_set_whose_worst_case_outlives_the_lease_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(rules.join("a.rhai"), "fn classify(event) { [] }").unwrap();
    for (name, timeout) in [("first", 700), ("second", 600)] {
        std::fs::write(
            rules.join(format!("{name}.toml")),
            format!("name = \"{name}\"\nscript = \"a.rhai\"\n[limits]\ntimeout_ms = {timeout}"),
        )
        .unwrap();
    }
    let config = RulesConfig {
        lease_ms: 1_200,
        ..approving(&["first", "second"])
    };
    let e = RuleSet::load(&config, dir.path(), engine())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rules.lease_ms = 1200")
            && e.contains("1300 ms")
            && e.contains("limits.timeout_ms")
            && e.contains("first 700 ms")
            && e.contains("second 600 ms"),
        "{e}"
    );
    let config = RulesConfig {
        lease_ms: 1_400,
        ..approving(&["first", "second"])
    };
    let set = RuleSet::load(&config, dir.path(), engine()).unwrap();
    assert_eq!(set.worst_case(), Duration::from_millis(1_300));
}

#[test]
fn the_pool_ceilings_are_config_and_a_manifest_asking_for_more_is_refused() {
    let config: RulesConfig =
        toml::from_str("[pool]\ninstances = 4\nmax_memory_mb = 64\ntable_elements = 30000")
            .unwrap();
    assert_eq!(
        config.pool,
        PoolConfig {
            instances: 4,
            max_memory_mb: 64,
            table_elements: 30_000,
            ..PoolConfig::default()
        }
    );
    let engine = WasmEngine::with_pool(None, &config.pool).unwrap();
    let path = component("bench-three-fields");
    let manifest_path = repo().join("pool-test.toml");
    let load = |memory: u64| {
        let text = format!(
            "name = \"bench\"\ncomponent = {:?}\n[grants]\nwasi = true\n[limits]\nmemory_mb = {memory}",
            path.display().to_string()
        );
        let m = Manifest::parse(&manifest_path, &text).unwrap();
        Rule::from_manifest(&m, &manifest_path, &text, &config, &engine).map(|_| ())
    };
    let e = load(128).unwrap_err().to_string();
    assert!(
        e.contains("pool-test.toml")
            && e.contains("limits.memory_mb = 128")
            && e.contains("rules.pool.max_memory_mb = 64"),
        "{e}"
    );
    load(64).unwrap();
    // The defaults agree with each other, and the config's own limits must
    // fit the pool too.
    let e = RulesConfig {
        pool: PoolConfig {
            max_memory_mb: 16,
            ..PoolConfig::default()
        },
        ..RulesConfig::default()
    }
    .validate()
    .unwrap_err();
    assert!(
        e.contains("rules.limits.memory_mb = 32") && e.contains("rules.pool.max_memory_mb = 16"),
        "{e}"
    );
    RulesConfig::default().validate().unwrap();
}

/// Rules keep the engine alive: a rule used after the `WasmEngine` it was
/// loaded with has been dropped still has its deadline enforced.
/// The component `plugins/out/<component>.wasm` loaded as rule `name` on
/// `engine`, with WASI granted and `extra` manifest lines.
fn plugin_rule(engine: &WasmEngine, name: &str, component_name: &str, extra: &str) -> Rule {
    let manifest_path = repo().join(format!("{name}-test.toml"));
    let text = format!(
        "name = \"{name}\"\ncomponent = {:?}\n[grants]\nwasi = true{extra}",
        component(component_name).display().to_string()
    );
    let m = Manifest::parse(&manifest_path, &text).unwrap();
    Rule::from_manifest(&m, &manifest_path, &text, &RulesConfig::default(), engine).unwrap()
}

#[test]
fn a_rule_outliving_its_engine_struct_is_still_interrupted() {
    let engine = WasmEngine::new(None).unwrap();
    let rule = plugin_rule(&engine, "loop", "loop", "\n[limits]\ntimeout_ms = 50");
    drop(engine);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(rule.classify(&issues_opened())));
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a looping guest ran on with no epoch ticks");
    assert!(matches!(r, Err(RuleFailure::Timeout(_))), "{r:?}");
}

#[test]
fn the_epoch_advances_only_while_a_guest_call_is_in_flight() {
    // An engine of its own: the shared one serves the other tests' calls.
    let engine = WasmEngine::new(None).unwrap();
    let rule = plugin_rule(&engine, "loop", "loop", "\n[limits]\ntimeout_ms = 50");
    let idle = |what: &str| {
        // A tick already under way when the last call ended may still land.
        let mut before = engine.epoch_ticks();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let now = engine.epoch_ticks();
            if now == before {
                break;
            }
            before = now;
        }
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            engine.epoch_ticks(),
            before,
            "{what}: the epoch advanced with no call in flight"
        );
    };
    idle("before any call");
    let before = engine.epoch_ticks();
    let r = rule.classify(&issues_opened());
    assert!(matches!(r, Err(RuleFailure::Timeout(_))), "{r:?}");
    assert!(
        engine.epoch_ticks() - before >= 50,
        "a 50 ms deadline needs 50 ticks"
    );
    idle("after the call");
}

#[test]
fn the_epoch_ticker_lingers_after_a_call_then_parks() {
    // Waking a parked ticker costs the next call a futex wake and a likely
    // preemption; under steady traffic it stays awake between calls.
    let engine = WasmEngine::new(None).unwrap();
    let rule = plugin_rule(&engine, "bench", "bench-three-fields", "");
    assert!(rule.classify(&issues_opened()).is_ok());
    let after_call = engine.epoch_ticks();
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine.epoch_ticks() < after_call + 5 {
        assert!(
            Instant::now() < deadline,
            "the ticker stopped with the call: {} ticks after it",
            engine.epoch_ticks() - after_call
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // And it parks: a window longer than the linger with no tick (it ticks
    // every 10 ms while lingering), then a quiet second.
    let mut before = engine.epoch_ticks();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = engine.epoch_ticks();
        if now == before {
            break;
        }
        assert!(Instant::now() < deadline, "the ticker never parked");
        before = now;
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(engine.epoch_ticks(), before, "the ticker woke with no call");
}

/// A worker told to stop mid-batch records what it routed and gives the rest
/// back as they were, without spending an attempt: a restart routes them as
/// first tries, and a graceful stop never walks an event toward the dead
/// letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_mid_batch_gives_the_rest_back_unspent() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir);
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(append_gitlab(&store, "Push Hook", "push.json").await);
    }
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slow = Rule::native("slow", {
        let started = started.clone();
        move |_| {
            started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
            Ok(Verdict::Routes(vec![route("ok", Priority::Low, &[])]))
        }
    });
    let rules = Arc::new(ArcSwap::from_pointee(set_of_one(slow)));
    let options = RouterOptions {
        workers: 1,
        batch: 4,
        ..options()
    };
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router::run(store.clone(), rules, options, shutdown));
    until("the first event to be routing", || {
        started.load(std::sync::atomic::Ordering::SeqCst) >= 1
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap();
    let routed = started.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        routed < ids.len(),
        "the stop came mid-batch: {routed} routed"
    );
    for (k, id) in ids.iter().enumerate() {
        let rec = store.get(id).await.unwrap().unwrap();
        if k < routed {
            assert_eq!(rec.summary.status, EventStatus::Routed, "{id}");
        } else {
            assert_eq!(rec.summary.status, EventStatus::Pending, "{id}");
            assert_eq!(rec.summary.attempts, 0, "{id}: the stop spent no attempt");
        }
    }
    let again = store.claim("w", 10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(again.len(), ids.len() - routed);
    assert!(again.iter().all(|c| c.attempt == 1), "first tries again");
}
