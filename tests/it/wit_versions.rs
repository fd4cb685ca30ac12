//! The host serves every version of the `sluice:router` interface at once:
//! the golden 0.1.0 component (`tests/fixtures/golden-0.1.0/`, built before
//! the SDK moved on and never rebuilt) and 0.2.0 components from
//! `plugins/build.sh` load into one rule set and route the same event; what
//! 0.2.0 added to a route (ordering key, payload) reaches the decision, and
//! is bounded; a component exporting no served version is refused by name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice::decision::{Priority, RuleFailure, RuleOutcome, Verdict};
use sluice::event::{Event, ParsedEvent, Provider};
use sluice::rules::manifest::Manifest;
use sluice::rules::output;
use sluice::rules::wasm::WitVersion;
use sluice::rules::{LoadError, Rule, RuleCode, RulesConfig};

use crate::rules::{engine, set};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden_dir() -> PathBuf {
    repo().join("tests/fixtures/golden-0.1.0")
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

/// Loads the rule a manifest at `path` with `text` describes, and runs its
/// vectors.
fn load(path: &Path, text: &str) -> Result<Rule, LoadError> {
    let manifest = Manifest::parse(path, text).map_err(|e| LoadError {
        file: e.file.clone(),
        rule: None,
        message: e.to_string(),
    })?;
    let rule = Rule::from_manifest(&manifest, path, text, &RulesConfig::default(), engine())?;
    rule.check_tests(&manifest.tests, path)?;
    Ok(rule)
}

fn golden() -> Rule {
    let path = golden_dir().join("golden-three-fields.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    load(&path, &text).unwrap_or_else(|e| panic!("{e}"))
}

/// The 0.2.0 test rule `shaped`, with these extra manifest lines.
fn shaped(name: &str, extra: &str) -> Result<Rule, LoadError> {
    let text = format!(
        "name = {name:?}\ncomponent = {:?}\n[grants]\nwasi = true\n{extra}",
        component("shaped").display().to_string()
    );
    load(&repo().join("inline-test.toml"), &text)
}

fn rhai(name: &str, script: &str) -> Rule {
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("rule.rhai");
    std::fs::write(&code, script).unwrap();
    let text = format!("name = {name:?}\nscript = \"rule.rhai\"\n");
    load(&dir.path().join("rule.toml"), &text).unwrap_or_else(|e| panic!("{e}"))
}

fn version(rule: &Rule) -> Option<WitVersion> {
    match rule.code() {
        RuleCode::Wasm(w) => Some(w.wit_version()),
        _ => None,
    }
}

fn issues_opened() -> Arc<ParsedEvent> {
    let body = std::fs::read(repo().join("rules/tests/github-issues-opened.json")).unwrap();
    Arc::new(ParsedEvent::new(Event::dry_run(
        "github",
        Provider::Github,
        "issues",
        None,
        body.into(),
    )))
}

#[track_caller]
fn output_failure(got: Result<Verdict, RuleFailure>) -> String {
    match got {
        Err(RuleFailure::Output(m)) => m,
        other => panic!("expected an output failure, got {other:?}"),
    }
}

#[test]
fn a_0_1_and_a_0_2_component_route_one_event_side_by_side() {
    let old = golden();
    let new = shaped("shaped", "").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(version(&old), Some(WitVersion::V0_1));
    assert_eq!(version(&new), Some(WitVersion::V0_2));

    let rules = set(vec![old, new]);
    let ev = issues_opened();
    let d = rules.route(&ev);
    for rec in &d.rules {
        assert!(
            matches!(rec.outcome, RuleOutcome::Verdict(Verdict::Routes(_))),
            "{}: {:?}",
            rec.rule,
            rec.outcome
        );
    }
    let [bench, shaped] = d.routes.as_slice() else {
        panic!("two routes expected: {:?}", d.routes)
    };
    // 0.1.0: the answer it always gave, and nothing 0.2.0 added.
    assert_eq!(
        (bench.agent.as_str(), bench.priority),
        ("bench", Priority::Medium)
    );
    assert_eq!(bench.reason, "issues.opened in Codertocat/Hello-World");
    assert_eq!((&bench.ordering_key, &bench.payload), (&None, &None));
    // 0.2.0: its ordering key and shaped payload arrive in the decision.
    assert_eq!(shaped.agent, "shaped");
    assert_eq!(
        shaped.ordering_key.as_deref(),
        Some("Codertocat/Hello-World#1")
    );
    assert_eq!(
        shaped.payload,
        Some(serde_json::json!({
            "kind": "issues", "action": "opened", "repo": "Codertocat/Hello-World", "number": 1
        }))
    );
    // Both survive the decision's own serialization (the store keeps it).
    let back: sluice::decision::Decision =
        serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
    assert_eq!(back.routes, d.routes);
}

#[test]
fn a_payload_that_is_not_json_fails_the_answer_naming_rule_and_agent() {
    let rule = shaped("bad-payload", "[config]\npayload_text = \"{not json\"\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let m = output_failure(rule.classify(&issues_opened()));
    assert!(
        m.contains("bad-payload") && m.contains("shaped") && m.contains("not JSON"),
        "{m}"
    );
    // In a rule set it is that rule's failure; the other rule still routes.
    let d = set(vec![golden(), rule]).route(&issues_opened());
    assert_eq!(d.routes.len(), 1, "{:?}", d.routes);
    let rec = d.rules.iter().find(|r| r.rule == "bad-payload").unwrap();
    assert!(
        matches!(&rec.outcome, RuleOutcome::Failed(RuleFailure::Output(_))),
        "{:?}",
        rec.outcome
    );
}

#[test]
fn a_payload_over_the_limit_fails_the_answer() {
    let big = format!("\"{}\"", "x".repeat(output::MAX_PAYLOAD));
    let rule = shaped(
        "big-payload",
        &format!("[config]\npayload_text = {:?}\n", big),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let m = output_failure(rule.classify(&issues_opened()));
    assert!(m.contains("big-payload") && m.contains("limit"), "{m}");
}

#[test]
fn a_component_exporting_no_served_version_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    // The smallest valid component: a header and no sections, so it exports
    // nothing at all.
    let code = dir.path().join("empty.wasm");
    std::fs::write(&code, b"\0asm\x0d\x00\x01\x00").unwrap();
    let path = dir.path().join("empty.toml");
    let err = load(&path, "name = \"empty\"\ncomponent = \"empty.wasm\"\n")
        .map(|_| ())
        .expect_err("an empty component must be refused");
    let text = err.to_string();
    assert_eq!(err.file, code, "{text}");
    for part in [
        "empty.wasm",
        "sluice:router/classifier@0.1.0",
        "sluice:router/classifier@0.2.0",
        "exports nothing",
    ] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }
}

#[test]
fn rhai_routes_carry_an_ordering_key_and_a_payload() {
    let rule = rhai(
        "rhai-shaped",
        r#"fn classify(event) {
            let n = event.get("/issue/number");
            [#{agent: "a", ordering_key: `${event.get("/repository/full_name")}#${n}`,
               payload: #{kind: event.kind, number: n, tags: ["x", ()], ok: true, ratio: 0.5}},
             #{agent: "b", ordering_key: (), payload: ()}]
        }"#,
    );
    let Ok(Verdict::Routes(routes)) = rule.classify(&issues_opened()) else {
        panic!("routes expected")
    };
    assert_eq!(
        routes[0].ordering_key.as_deref(),
        Some("Codertocat/Hello-World#1")
    );
    assert_eq!(
        routes[0].payload,
        Some(serde_json::json!({
            "kind": "issues", "number": 1, "tags": ["x", null], "ok": true, "ratio": 0.5
        }))
    );
    assert_eq!(
        (&routes[1].ordering_key, &routes[1].payload),
        (&None, &None)
    );

    let rule = rhai(
        "rhai-long-key",
        &format!(
            "fn classify(event) {{ [#{{agent: \"a\", ordering_key: \"{}\"}}] }}",
            "k".repeat(output::MAX_ORDERING_KEY + 1)
        ),
    );
    let m = output_failure(rule.classify(&issues_opened()));
    assert!(m.contains("ordering key"), "{m}");

    let rule = rhai(
        "rhai-fn-payload",
        "fn classify(event) { [#{agent: \"a\", payload: Fn(\"classify\")}] }",
    );
    let m = output_failure(rule.classify(&issues_opened()));
    assert!(
        m.contains("rhai-fn-payload") && m.contains("agent a"),
        "{m}"
    );
}
