//! Grants: a rule's manifest asks for the sources and kinds it sees and the
//! agents and workflows it routes to; the config approves them by rule name
//! (and optionally pinned version). An unapproved rule does not load, a rule
//! is never called outside its grant, and a route outside it is dropped and
//! recorded as a violation while the rule's other routes, and the other
//! rules, still route the event — through `serve`, the router workers and
//! the real SQLite store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice::config::Config;
use sluice::decision::{Priority, RuleFailure, RuleOutcome, Verdict};
use sluice::event::{Event, EventStatus, ParsedEvent, Provider};
use sluice::rules::breaker::BreakerState;
use sluice::rules::config::{BreakerConfig, FailurePolicy, MergeMode, RulesConfig};
use sluice::rules::grants::Approval;
use sluice::rules::wasm::WasmEngine;
use sluice::rules::{Rule, RuleSet};

use crate::support::{
    Env, RoutingGateway, client, corpus, metrics_text, post_accepted, until_status,
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes a rhai rule (`<name>.rhai`) and its manifest (`<name>.toml`) into `dir`.
fn rhai_rule(dir: &Path, name: &str, script: &str, manifest_extra: &str) {
    std::fs::write(dir.join(format!("{name}.rhai")), script).unwrap();
    std::fs::write(
        dir.join(format!("{name}.toml")),
        format!("name = \"{name}\"\nscript = \"{name}.rhai\"\n{manifest_extra}\n"),
    )
    .unwrap();
}

fn approval(text: &str) -> Approval {
    toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn config_with(grants: &[(&str, &str)]) -> RulesConfig {
    RulesConfig {
        grants: grants
            .iter()
            .map(|(rule, text)| (rule.to_string(), approval(text)))
            .collect(),
        ..RulesConfig::default()
    }
}

fn engine() -> WasmEngine {
    WasmEngine::new(None).expect("wasm engine")
}

fn load_err(config: &RulesConfig, base: &Path) -> String {
    match RuleSet::load(config, base, &engine()) {
        Ok(set) => panic!(
            "expected a refusal, loaded {:?}",
            set.rules().map(|r| r.name().to_owned()).collect::<Vec<_>>()
        ),
        Err(e) => e.to_string(),
    }
}

/// A rule routing to one agent in its grant and one outside it, beside a
/// wasm rule routing only outside its grant and a rule with no violation,
/// under `serve`: each violation is recorded against its rule (in the
/// stored decision, in `events show`'s text, in `/metrics`), only the
/// offending routes are dropped, the event is routed by everything in grant,
/// and the breaker (one failure would open it) stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_outside_the_grant_is_a_violation_and_the_event_is_still_routed() {
    let env = Env::new("\n[rules]\ncache_dir = \"cache\"\n[rules.breaker]\nfailures = 1\n");
    let rules = env.dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    rhai_rule(
        &rules,
        "a-rogue",
        r#"fn classify(event) {
            [#{agent: "ci-validation", priority: "high"}, #{agent: "exfiltrate"}]
        }"#,
        "[grants]\nsources = [\"gitlab\"]\nagents = [\"ci-validation\"]\nworkflows = []",
    );
    rhai_rule(
        &rules,
        "c-helper",
        r#"fn classify(event) { [#{agent: "notify", priority: "low"}] }"#,
        "[grants]\nsources = [\"gitlab\"]\nagents = [\"notify\"]\nworkflows = []",
    );
    // A component whose only route (to `bench`) is outside its grant.
    let bench = repo().join("plugins/out/bench-three-fields.wasm");
    assert!(bench.is_file(), "{}: run plugins/build.sh", bench.display());
    std::fs::write(
        rules.join("b-wasm.toml"),
        format!(
            "name = \"b-wasm\"\ncomponent = {:?}\n[grants]\nsources = [\"gitlab\"]\nagents = [\"somebody-else\"]\nworkflows = []\nwasi = true\n",
            bench.display().to_string()
        ),
    )
    .unwrap();
    for rule in ["a-rogue", "c-helper"] {
        env.approve(
            rule,
            "sources = [\"gitlab\"]\nkinds = [\"*\"]\nagents = [\"ci-validation\", \"notify\"]",
        );
    }
    env.approve(
        "b-wasm",
        "sources = [\"gitlab\"]\nkinds = [\"*\"]\nagents = [\"somebody-else\"]\nwasi = true",
    );
    env.declare_agents(&["ci-validation", "notify", "somebody-else"]);

    let gw = RoutingGateway::start(env.config()).await;
    let (store, rules) = (gw.store.clone(), gw.rules.clone());

    let http = client();
    let payload = std::fs::read(corpus().join("gitlab/webhooks/push.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let mut decisions = Vec::new();
    for n in 0..2 {
        // A distinct body per event, so the second is not a duplicate.
        v["checkout_sha"] = serde_json::json!(format!("grant-test-{n}"));
        let body = Bytes::from(serde_json::to_vec(&v).unwrap());
        let signed = env.signer("gitlab").sign("Push Hook", &body).unwrap();
        let id = post_accepted(&http, &gw.base, "gitlab", &signed).await;
        let rec = until_status(&*store, &id, EventStatus::Routed).await;
        assert_eq!(rec.summary.attempts, 1);
        decisions.push(rec.decision.expect("a routed event has a decision"));
    }

    for d in &decisions {
        let routes: Vec<_> = d
            .routes
            .iter()
            .map(|r| (r.agent.as_str(), r.priority))
            .collect();
        assert_eq!(
            routes,
            vec![("ci-validation", Priority::High), ("notify", Priority::Low)],
            "only the routes in grant count: {d:#?}"
        );
        let record = |name: &str| d.rules.iter().find(|r| r.rule == name).unwrap();
        let rogue = record("a-rogue");
        match &rogue.outcome {
            RuleOutcome::Verdict(Verdict::Routes(kept)) => {
                assert_eq!(kept.len(), 1);
                assert_eq!(kept[0].agent, "ci-validation");
            }
            other => panic!("a-rogue: {other:?}"),
        }
        match &rogue.violation {
            Some(RuleFailure::Violation(m)) => {
                assert!(
                    m.contains("\"exfiltrate\"") && m.contains("grants.agents"),
                    "{m}"
                )
            }
            other => panic!("a-rogue's violation: {other:?}"),
        }
        let wasm = record("b-wasm");
        assert_eq!(wasm.outcome, RuleOutcome::Verdict(Verdict::Routes(vec![])));
        match &wasm.violation {
            Some(RuleFailure::Violation(m)) => assert!(m.contains("\"bench\""), "{m}"),
            other => panic!("b-wasm's violation: {other:?}"),
        }
        assert_eq!(record("c-helper").violation, None);

        // `events show` and `route` print the violation under its rule.
        let mut text = Vec::new();
        sluice::cli::write_decision(d, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("VIOLATION") && text.contains("exfiltrate"),
            "{text}"
        );
    }
    // A violation does not count toward the breaker (one failure would open it).
    for rule in ["a-rogue", "b-wasm"] {
        assert_eq!(
            rules.load().breaker_state(rule),
            Some(BreakerState::Closed),
            "{rule}"
        );
    }

    // Counted in /metrics under its own kind.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics_text(&http, &gw.base).await;
        let line = text.lines().find(|l| {
            l.starts_with("sluice_rule_failures_total{")
                && l.contains("rule=\"a-rogue\"")
                && l.contains("kind=\"violation\"")
        });
        if let Some(line) = line {
            assert!(line.ends_with(" 2"), "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "no violation counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    gw.stop().await;
}

/// A rule whose manifest asks for what the config does not approve does not
/// load; the message names the rule, its manifest, the grant key and what
/// is missing. Its code never runs (a vector that would fail is not reached).
#[test]
fn a_rule_asking_for_what_the_config_does_not_approve_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    rhai_rule(
        &rules,
        "third",
        r#"fn classify(event) { [#{agent: "triage"}] }"#,
        "[grants]\nsources = [\"github\", \"gh-private\"]\nkinds = [\"issues\"]\nagents = [\"triage\", \"pager\"]\nworkflows = []",
    );

    // No approval at all.
    let e = load_err(&RulesConfig::default(), dir.path());
    assert!(
        e.starts_with("rule third (") && e.contains("rules/third.toml"),
        "{e}"
    );
    assert!(
        e.contains("no [rules.grants.third]")
            && e.contains(r#"sources ["github", "gh-private"]"#)
            && e.contains(r#"agents ["triage", "pager"]"#),
        "{e}"
    );

    // An approval short of a source and an agent: both named, with the keys.
    let short = config_with(&[(
        "third",
        "sources = [\"github\"]\nkinds = [\"issues\"]\nagents = [\"triage\"]",
    )]);
    let e = load_err(&short, dir.path());
    assert!(
        e.contains(r#"grants.sources asks for ["gh-private"], which rules.grants.third.sources does not approve"#)
            && e.contains(r#"grants.agents asks for ["pager"], which rules.grants.third.agents does not approve"#)
            && !e.contains("grants.kinds"),
        "{e}"
    );

    // Approvals read from a config file name it.
    let from_file = Config::parse(
        "[rules.grants.third]\nsources = [\"github\", \"gh-private\"]\nkinds = [\"issues\"]\nagents = [\"triage\"]\n",
        "ops.toml",
    )
    .unwrap();
    let e = load_err(&from_file.rules, dir.path());
    assert!(
        e.contains("which rules.grants.third.agents (in ops.toml) does not approve"),
        "{e}"
    );
    let e = load_err(&Config::parse("", "ops.toml").unwrap().rules, dir.path());
    assert!(
        e.contains("the config (in ops.toml) has no [rules.grants.third]"),
        "{e}"
    );

    // A list left out of the manifest asks for every name: only "*" approves it.
    rhai_rule(
        &rules,
        "third",
        r#"fn classify(event) { [#{agent: "triage"}] }"#,
        "[grants]\nsources = [\"github\"]\nagents = [\"triage\"]",
    );
    let e = load_err(
        &config_with(&[(
            "third",
            "sources = [\"github\"]\nkinds = [\"issues\"]\nagents = [\"triage\"]",
        )]),
        dir.path(),
    );
    assert!(
        e.contains(r#"grants.kinds asks for ["*"]"#)
            && e.contains(r#"grants.workflows asks for ["*"]"#),
        "{e}"
    );
    let set = RuleSet::load(
        &config_with(&[(
            "third",
            "sources = [\"github\"]\nkinds = [\"*\"]\nagents = [\"triage\", \"more\"]\nworkflows = [\"*\"]",
        )]),
        dir.path(),
        &engine(),
    )
    .unwrap_or_else(|e| panic!("an approval wider than the request loads: {e}"));
    assert_eq!(set.rules().len(), 1);

    // WASI asked for and not approved.
    std::fs::remove_file(rules.join("third.toml")).unwrap();
    let bench = repo().join("plugins/out/bench-three-fields.wasm");
    std::fs::write(
        rules.join("comp.toml"),
        format!(
            "name = \"comp\"\ncomponent = {:?}\n[grants]\nsources = [\"*\"]\nkinds = [\"*\"]\nagents = [\"bench\"]\nworkflows = []\nwasi = true\n",
            bench.display().to_string()
        ),
    )
    .unwrap();
    let e = load_err(
        &config_with(&[(
            "comp",
            "sources = [\"*\"]\nkinds = [\"*\"]\nagents = [\"*\"]",
        )]),
        dir.path(),
    );
    assert!(
        e.contains("grants.wasi asks for WASI, which rules.grants.comp.wasi does not approve"),
        "{e}"
    );
    std::fs::remove_file(rules.join("comp.toml")).unwrap();

    // A test vector expecting a route outside the grant fails the load too.
    std::fs::write(
        rules.join("ev.json"),
        std::fs::read(corpus().join("github/issues/opened.payload.json")).unwrap(),
    )
    .unwrap();
    rhai_rule(
        &rules,
        "vec",
        r#"fn classify(event) { [#{agent: "pager"}] }"#,
        "providers = [\"github\"]\n[grants]\nsources = [\"*\"]\nkinds = [\"*\"]\nagents = [\"triage\"]\nworkflows = []\n[[test]]\nevent = \"ev.json\"\nkind = \"issues\"\nexpect = [{ agent = \"pager\" }]",
    );
    let e = load_err(&crate::rules::approving(&["vec"]), dir.path());
    assert!(
        e.contains("vec.toml): test[0]: ev.json") && e.contains("\"pager\" (not in grants.agents)"),
        "{e}"
    );
}

/// The config checks its approvals on their own: an approval naming a source
/// the config does not have, or a malformed pinned version, is refused with
/// the key.
#[test]
fn approvals_are_checked_against_the_config() {
    let e = Config::parse(
        "[sources.gh]\nprovider = \"github\"\nsecret = { env = \"X\" }\n[rules.grants.r]\nsources = [\"gh\", \"gihtub\"]\n",
        "test.toml",
    )
    .unwrap()
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("test.toml: rules.grants.r.sources[1]") && e.contains("\"gihtub\""),
        "{e}"
    );
    let e = Config::parse("[rules.grants.r]\nunknown = 1\n", "test.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("rules.grants.r") && e.contains("unknown"), "{e}");
    let c = config_with(&[("r", "version = \"not-a-hash\"")]);
    let e = c.validate().unwrap_err();
    assert!(e.starts_with("rules.grants.r.version"), "{e}");
}

/// An approval that pins a version covers only that version: the same rule
/// with its code changed is refused, naming the pin and both versions.
#[test]
fn a_pinned_version_covers_only_that_version() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let manifest = "[grants]\nsources = [\"*\"]\nkinds = [\"*\"]\nagents = [\"a\"]\nworkflows = []";
    rhai_rule(
        &rules,
        "pinned",
        r#"fn classify(event) { [#{agent: "a"}] }"#,
        manifest,
    );
    let open = "sources = [\"*\"]\nkinds = [\"*\"]\nagents = [\"a\"]";
    let set = RuleSet::load(&config_with(&[("pinned", open)]), dir.path(), &engine()).unwrap();
    let version = set.rules().next().unwrap().version().to_owned();

    let pin = format!("{open}\nversion = \"{version}\"");
    let pinned = config_with(&[("pinned", &pin)]);
    let set = RuleSet::load(&pinned, dir.path(), &engine()).expect("the pinned version loads");
    assert_eq!(set.rules().next().unwrap().version(), version);

    rhai_rule(
        &rules,
        "pinned",
        r#"fn classify(event) { [#{agent: "a", priority: "high"}] }"#,
        manifest,
    );
    let e = load_err(&pinned, dir.path());
    assert!(
        e.starts_with("rule pinned (")
            && e.contains("rules.grants.pinned.version pins")
            && e.contains(&format!("{version:?}")),
        "{e}"
    );
}

fn ev(source: &str, provider: Provider, kind: &str) -> Arc<ParsedEvent> {
    Arc::new(ParsedEvent::new(Event::dry_run(
        source,
        provider,
        kind,
        None,
        Bytes::from_static(b"{}"),
    )))
}

/// A rule is never called for an event from a source or of a kind outside its
/// grant: the rule throws whenever it runs, so any call would show as a
/// failure; outside its grant it is recorded as skipped, with no time spent.
#[test]
fn a_rule_is_never_called_outside_its_granted_sources_and_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    rhai_rule(
        &rules,
        "narrow",
        r#"fn classify(event) { throw "called for " + event.source + " " + event.kind; }"#,
        "[grants]\nsources = [\"gitlab\"]\nkinds = [\"Push Hook\"]\nagents = []\nworkflows = []",
    );
    let config = config_with(&[(
        "narrow",
        "sources = [\"gitlab\"]\nkinds = [\"Push Hook\", \"Tag Push Hook\"]",
    )]);
    let set = RuleSet::load(&config, dir.path(), &engine()).unwrap_or_else(|e| panic!("{e}"));
    let outcome = |e: &Arc<ParsedEvent>| {
        let d = set.route(e);
        let r = d.rules.into_iter().find(|r| r.rule == "narrow").unwrap();
        (r.outcome, r.duration_us)
    };
    // Another source of the same provider, another kind (even one the
    // config would approve: the rule did not ask for it), another provider.
    for e in [
        ev("gitlab-signed", Provider::Gitlab, "Push Hook"),
        ev("gitlab", Provider::Gitlab, "Tag Push Hook"),
        ev("github", Provider::Github, "Push Hook"),
    ] {
        assert_eq!(
            outcome(&e),
            (RuleOutcome::Skipped, 0),
            "{} {}",
            e.event.source,
            e.event.kind
        );
    }
    // Inside its grant it is called (and throws).
    match outcome(&ev("gitlab", Provider::Gitlab, "Push Hook")).0 {
        RuleOutcome::Failed(RuleFailure::Guest(m)) => {
            assert!(m.contains("called for gitlab Push Hook"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // Native rules are sluice's own code: no grant narrows them.
    let native = Rule::native("native", |_| Ok(Verdict::Ignore("seen".into())));
    let set = RuleSet::new(
        vec![native],
        MergeMode::Merge,
        FailurePolicy::Skip,
        &BreakerConfig::default(),
    );
    let d = set.route(&ev("anything", Provider::Github, "any"));
    assert_eq!(
        d.rules[0].outcome,
        RuleOutcome::Verdict(Verdict::Ignore("seen".into()))
    );
}

/// A rule's own failure policy routes too: a default agent outside what the
/// rule asks for would let a deliberate failure route past the grant.
#[test]
fn a_default_agent_outside_the_grant_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    rhai_rule(
        &rules,
        "sly",
        r#"fn classify(event) { throw "on purpose" }"#,
        "on_error = { default-agent = \"deployment\" }\n[grants]\nsources = [\"github\"]\nkinds = [\"issues\"]\nagents = [\"issue-triage\"]\nworkflows = []",
    );
    let approved = config_with(&[(
        "sly",
        "sources = [\"github\"]\nkinds = [\"issues\"]\nagents = [\"issue-triage\"]",
    )]);
    let e = load_err(&approved, dir.path());
    assert!(
        e.contains(
            r#"on_error default-agent "deployment" is not among what grants.agents asks for"#
        ),
        "{e}"
    );
}
