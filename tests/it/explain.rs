//! Decisions that explain themselves: every rule record names the event
//! fields the rule read and the values it saw, through the shipped GitHub
//! component and the shipped GitLab rhai rule on real corpus payloads, bounded
//! whatever a rule does, never holding a header's value, kept when a rule
//! fails, and shown by `sluice route` and `sluice events show`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::decision::{
    Decision, MAX_READ_VALUE, MAX_READS, ReadKind, RuleFailure, RuleOutcome, RuleRecord, Verdict,
};
use sluice::event::{Event, ParsedEvent, Provider};

use crate::rules::{rhai, set, shipped, wasm};
use crate::support::{Env, ServeChild, corpus, send_accepted, sluice};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn payload(rel: &str) -> Value {
    let p = corpus().join(rel);
    let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_slice(&bytes).unwrap()
}

fn event(provider: Provider, kind: &str, body: &Value) -> Arc<ParsedEvent> {
    Arc::new(ParsedEvent::new(Event::dry_run(
        provider.as_str(),
        provider,
        kind,
        None,
        serde_json::to_vec(body).unwrap().into(),
    )))
}

fn record<'a>(d: &'a Decision, rule: &str) -> &'a RuleRecord {
    d.rules
        .iter()
        .find(|r| r.rule == rule)
        .unwrap_or_else(|| panic!("no record of {rule} in {d:?}"))
}

/// What the record says the rule saw at `pointer`: its type and value.
fn seen<'a>(r: &'a RuleRecord, pointer: &str) -> (ReadKind, Option<&'a str>) {
    let read = r
        .reads
        .iter()
        .find(|f| f.pointer == pointer)
        .unwrap_or_else(|| panic!("{} did not record reading {pointer}: {:?}", r.rule, r.reads));
    (read.kind, read.value.as_deref())
}

fn text(d: &Decision) -> String {
    let mut out = Vec::new();
    sluice::cli::write_decision(d, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn github_component_records_the_fields_behind_its_answer() {
    let rules = shipped();
    // The real payload: labeled `bug`, which the table ignores.
    let mut body = payload("github/issues/labeled.payload.json");
    let d = rules.route(&event(Provider::Github, "issues", &body));
    let r = record(&d, "github-router");
    assert!(
        matches!(r.outcome, RuleOutcome::Verdict(Verdict::Ignore(_))),
        "{r:?}"
    );
    assert_eq!(seen(r, "kind"), (ReadKind::String, Some("issues")));
    assert_eq!(seen(r, "action"), (ReadKind::String, Some("labeled")));
    assert_eq!(seen(r, "/label/name"), (ReadKind::String, Some("bug")));
    assert_eq!(r.reads_dropped, 0);
    // The GitLab rule does not want a GitHub event: not run, nothing read.
    let gitlab = record(&d, "gitlab");
    assert!(matches!(gitlab.outcome, RuleOutcome::Skipped) && gitlab.reads.is_empty());

    // The same event labeled `agent-execute` goes to the coordinator, and the
    // record says which fields (and values) that rests on, in reading order.
    body["label"]["name"] = json!("agent-execute");
    let d = rules.route(&event(Provider::Github, "issues", &body));
    let r = record(&d, "github-router");
    let pointers: Vec<_> = r.reads.iter().map(|f| f.pointer.as_str()).collect();
    assert_eq!(
        &pointers[..3],
        ["kind", "action", "/label/name"],
        "{pointers:?}"
    );
    assert_eq!(
        seen(r, "/label/name"),
        (ReadKind::String, Some("agent-execute"))
    );
    let number = body["issue"]["number"].to_string();
    assert_eq!(
        seen(r, "/issue/number"),
        (ReadKind::Number, Some(number.as_str()))
    );
    assert_eq!(
        seen(r, "/repository/full_name"),
        (ReadKind::String, body["repository"]["full_name"].as_str())
    );
    // The stored form (what `events show --json` and a comparison read).
    let stored = serde_json::to_value(&d).unwrap();
    let reads = &stored["rules"][0]["reads"];
    assert!(
        reads.as_array().unwrap().contains(
            &json!({"pointer": "/label/name", "type": "string", "value": "agent-execute"})
        ),
        "{reads}"
    );
    let back: Decision = serde_json::from_value(stored).unwrap();
    assert_eq!(back.rules, d.rules);
    let shown = text(&d);
    assert!(
        shown.contains(
            "coordinator, critical: kind = issues, action = labeled, /label/name = agent-execute"
        ),
        "{shown}"
    );
}

#[test]
fn gitlab_script_records_the_fields_behind_its_answer() {
    let rules = shipped();
    let body = payload("gitlab/webhooks/pipeline.json");
    let d = rules.route(&event(Provider::Gitlab, "Pipeline Hook", &body));
    let r = record(&d, "gitlab");
    let RuleOutcome::Verdict(Verdict::Routes(routes)) = &r.outcome else {
        panic!("{r:?}")
    };
    assert_eq!(routes[0].agent, "pipeline-monitor");
    assert_eq!(seen(r, "kind"), (ReadKind::String, Some("Pipeline Hook")));
    let attrs = &body["object_attributes"];
    assert_eq!(
        seen(r, "/object_attributes/status"),
        (ReadKind::String, attrs["status"].as_str())
    );
    let id = attrs["id"].to_string();
    assert_eq!(
        seen(r, "/object_attributes/id"),
        (ReadKind::Number, Some(id.as_str()))
    );
    assert_eq!(
        seen(r, "/project/path_with_namespace"),
        (
            ReadKind::String,
            body["project"]["path_with_namespace"].as_str()
        )
    );
    // Read three times by the script, recorded once.
    let times = r
        .reads
        .iter()
        .filter(|f| f.pointer == "/project/path_with_namespace")
        .count();
    assert_eq!(times, 1, "{:?}", r.reads);
    let line = format!(
        "pipeline-monitor, {}: kind = Pipeline Hook, /object_attributes/status = {}",
        routes[0].priority.as_str(),
        attrs["status"].as_str().unwrap()
    );
    let shown = text(&d);
    assert!(shown.contains(&line), "{line:?} not in\n{shown}");

    // A merge request: booleans are recorded as what they are.
    let body = payload("gitlab/webhooks/merge_request.json");
    let d = rules.route(&event(Provider::Gitlab, "Merge Request Hook", &body));
    let r = record(&d, "gitlab");
    let draft = &body["object_attributes"]["draft"];
    if let Some(draft) = draft.as_bool() {
        assert_eq!(
            seen(r, "/object_attributes/draft"),
            (ReadKind::Bool, Some(if draft { "true" } else { "false" }))
        );
    }
}

#[test]
fn reads_are_bounded_and_objects_recorded_by_type() {
    let script = "fn classify(event) {\n\
                  for i in 0..1000 { event.get(`/n${i}`); }\n\
                  event.get(\"/n0\");\n\
                  #{ ignore: \"read a thousand fields\" }\n\
                  }";
    let many = rhai("thousand", script, "").unwrap_or_else(|e| panic!("{e}"));
    let body = payload("github/issues/opened.payload.json");
    let d = set(vec![many]).route(&event(Provider::Github, "issues", &body));
    let r = record(&d, "thousand");
    assert_eq!(r.reads.len(), MAX_READS);
    assert_eq!(r.reads[0].pointer, "/n0");
    assert_eq!(seen(r, "/n0"), (ReadKind::Absent, None));
    // 1,000 distinct fields, the cap recorded; the repeat of /n0 is no new field.
    assert_eq!(r.reads_dropped as usize, 1000 - MAX_READS);
    let shown = text(&d);
    assert!(
        shown.contains(&format!("and {} more reads not recorded", 1000 - MAX_READS)),
        "{shown}"
    );

    let shapes = "fn classify(event) {\n\
                  event.get(\"/issue\"); event.get(\"/issue/labels\");\n\
                  event.get(\"/repository/pulls_url\"); event.get(\"/issue/closed_at\");\n\
                  [] }";
    let shapes = rhai("shapes", shapes, "").unwrap_or_else(|e| panic!("{e}"));
    let d = set(vec![shapes]).route(&event(Provider::Github, "issues", &body));
    let r = record(&d, "shapes");
    assert_eq!(seen(r, "/issue"), (ReadKind::Object, None));
    assert_eq!(seen(r, "/issue/labels"), (ReadKind::Array, None));
    assert_eq!(seen(r, "/issue/closed_at"), (ReadKind::Null, None));
    let url = body["repository"]["pulls_url"].as_str().unwrap();
    assert!(url.len() > MAX_READ_VALUE, "the corpus URL is long: {url}");
    let read = r
        .reads
        .iter()
        .find(|f| f.pointer == "/repository/pulls_url");
    let read = read.expect("pulls_url recorded");
    let value = read.value.as_deref().unwrap();
    assert!(read.truncated && value.len() <= MAX_READ_VALUE && url.starts_with(value));
    // An object's content never reaches the record.
    let stored = serde_json::to_string(&d).unwrap();
    assert!(
        !stored.contains(body["issue"]["title"].as_str().unwrap()),
        "{stored}"
    );
    assert!(!stored.contains(url), "{stored}");
}

#[test]
fn header_values_and_the_body_are_never_recorded() {
    let script = "fn classify(event) {\n\
                  let t = event.header(\"X-Api-Token\");\n\
                  event.header(\"x-missing\");\n\
                  let b = event.body;\n\
                  [] }";
    let rule = rhai("headers", script, "").unwrap_or_else(|e| panic!("{e}"));
    let body = payload("github/issues/opened.payload.json");
    let mut ev = Event::dry_run(
        "github",
        Provider::Github,
        "issues",
        None,
        serde_json::to_vec(&body).unwrap().into(),
    );
    ev.headers
        .push(("x-api-token".into(), "tok_s3cr3t_never_stored".into()));
    let d = set(vec![rule]).route(&Arc::new(ParsedEvent::new(ev)));
    let r = record(&d, "headers");
    assert_eq!(seen(r, "header:x-api-token"), (ReadKind::Withheld, None));
    assert_eq!(seen(r, "header:x-missing"), (ReadKind::Absent, None));
    assert_eq!(seen(r, "body"), (ReadKind::Withheld, None));
    let stored = serde_json::to_string(&d).unwrap();
    assert!(!stored.contains("s3cr3t"), "{stored}");
    assert!(!text(&d).contains("s3cr3t"));
}

#[test]
fn a_failing_rule_records_what_it_read_before_failing() {
    let body = payload("github/issues/opened.payload.json");
    // The trap fixture reads the kind, then panics.
    let d = set(vec![wasm("trap", "")]).route(&event(Provider::Github, "issues", &body));
    let r = record(&d, "trap");
    assert!(
        matches!(r.outcome, RuleOutcome::Failed(RuleFailure::Trap(_))),
        "{r:?}"
    );
    assert_eq!(seen(r, "kind"), (ReadKind::String, Some("issues")));

    let script =
        "fn classify(event) { if event.get(\"/action\") == \"opened\" { throw \"no\" } [] }";
    let rule = rhai("throws", script, "").unwrap_or_else(|e| panic!("{e}"));
    let d = set(vec![rule]).route(&event(Provider::Github, "issues", &body));
    let r = record(&d, "throws");
    assert!(
        matches!(r.outcome, RuleOutcome::Failed(RuleFailure::Guest(_))),
        "{r:?}"
    );
    assert_eq!(seen(r, "/action"), (ReadKind::String, Some("opened")));
    assert!(
        text(&d).contains("read before failing: /action = opened"),
        "{}",
        text(&d)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Through the binary: `serve` with the shipped rules routes a signed event,
/// `events show` explains the route by its fields (and `--json` carries
/// them), and `route` (the dry run) shows the same.
#[test]
fn events_show_and_route_explain_a_route_by_its_fields() {
    let env = Env::new("");
    env.approve("github-router", crate::support::APPROVE_ALL);
    env.declare_agents(&crate::support::SHIPPED_AGENTS);
    let rules_dir = env.dir.path().join("rules");
    for name in ["github-router.toml", "github-router.wasm"] {
        std::fs::copy(repo().join("rules").join(name), rules_dir.join(name)).unwrap();
    }
    copy_dir(&repo().join("rules/tests"), &rules_dir.join("tests"));
    let mut body = payload("github/issues/labeled.payload.json");
    body["label"]["name"] = json!("agent-execute");
    let file = env.dir.path().join("labeled.json");
    std::fs::write(&file, serde_json::to_vec(&body).unwrap()).unwrap();
    let path = env.config_path.to_str().unwrap().to_owned();
    let want =
        "coordinator, critical: kind = issues, action = labeled, /label/name = agent-execute";

    let dry = sluice(&[
        "route",
        "--config",
        &path,
        "--source",
        "github",
        "--event",
        "issues",
        file.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success() && out.contains(want),
        "{out}{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let dry = sluice(&[
        "route",
        "--config",
        &path,
        "--source",
        "github",
        "--event",
        "issues",
        "--json",
        file.to_str().unwrap(),
    ]);
    let doc: Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert!(
        doc["decision"]["rules"][0]["reads"].as_array().is_some_and(
            |r| r.contains(&json!({"pointer": "action", "type": "string", "value": "labeled"}))
        ),
        "{doc}"
    );

    let server = ServeChild::spawn(&env.config_path);
    let url = format!("{}/hooks/github", server.base);
    send_accepted(&path, &url, "github", Some("issues"), &file);
    let ls = sluice(&["events", "ls", "--config", &path, "--json"]);
    let rows: Vec<Value> = serde_json::from_slice(&ls.stdout).unwrap();
    let id = rows[0]["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let doc: Value = loop {
        let show = sluice(&["events", "show", "--config", &path, &id, "--json"]);
        let doc: Value = serde_json::from_slice(&show.stdout).unwrap();
        if doc["event"]["status"] == "routed" || Instant::now() > deadline {
            break doc;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(doc["event"]["status"], "routed", "{doc}");
    let reads = &doc["decision"]["rules"][0]["reads"];
    assert!(
        reads.as_array().is_some_and(|r| r.contains(
            &json!({"pointer": "/label/name", "type": "string", "value": "agent-execute"})
        )),
        "{doc}"
    );
    let show = sluice(&["events", "show", "--config", &path, &id]);
    let out = String::from_utf8_lossy(&show.stdout);
    assert!(out.contains(want), "{out}");
    drop(server);
}
