//! The rule-author commands as a user runs them (the real binary): `rules
//! test` runs every vector and diffs the failures, `rules ls` lists the rules
//! with what the store recorded about them, and `whatif` re-runs stored
//! events through a candidate rule set and names exactly the events a
//! changed rule moves.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bytes::Bytes;
use serde_json::Value;
use sluice::event::EventStatus;

use crate::support::{
    Env, RoutingGateway, ServeChild, client, corpus, post_accepted, sluice, until_status,
};

fn text(o: &Output) -> String {
    format!(
        "{}\n--- stderr\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A copy of the shipped rules (manifests, code, vector payloads) in `to`.
fn copy_shipped_rules(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    std::fs::create_dir_all(to.join("tests")).unwrap();
    for sub in ["", "tests"] {
        for f in std::fs::read_dir(from.join(sub)).unwrap() {
            let f = f.unwrap().path();
            if f.is_file() {
                std::fs::copy(&f, to.join(sub).join(f.file_name().unwrap())).unwrap();
            }
        }
    }
}

/// An environment whose config serves a copy of the shipped rules.
fn env_with_shipped_rules() -> (Env, PathBuf) {
    let env = Env::new(&format!(
        "\n[rules]\ndir = \"rules\"\ncache_dir = \"cache\"\n{}",
        crate::support::shipped_grants()
    ));
    let rules = env.dir.path().join("rules");
    copy_shipped_rules(&rules);
    (env, rules)
}

fn replace_in(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn rules_test_runs_every_vector_and_diffs_each_failure() {
    let (env, _) = env_with_shipped_rules();
    let config = env.config_path.to_str().unwrap();
    let ok = sluice(&["rules", "test", "--config", config]);
    assert!(ok.status.success(), "{}", text(&ok));
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        out.contains("github-router @") && out.contains("gitlab @"),
        "{out}"
    );
    assert!(!out.contains("FAIL"), "{out}");

    // Two broken vectors in a copy elsewhere (`--dir`): the first expects the
    // wrong priority, the later one the wrong agent. Both are reported.
    let other = env.dir.path().join("candidate");
    copy_shipped_rules(&other);
    let manifest = other.join("gitlab.toml");
    replace_in(
        &manifest,
        r#"expect = [{ agent = "ci-validation", priority = "medium", labels = ["branch:master"] }]"#,
        r#"expect = [{ agent = "ci-validation", priority = "high", labels = ["branch:master"] }]"#,
    );
    replace_in(
        &manifest,
        r#"expect = [{ agent = "mr-reviewer", priority = "low" }]"#,
        r#"expect = [{ agent = "review-bot", priority = "low" }]"#,
    );
    let dir = other.to_str().unwrap();
    let bad = sluice(&["rules", "test", "--config", config, "--dir", dir, "gitlab"]);
    assert!(!bad.status.success(), "{}", text(&bad));
    let out = String::from_utf8_lossy(&bad.stdout).into_owned();
    assert!(
        !out.contains("github-router"),
        "only the rule asked for:\n{out}"
    );
    let fails: Vec<_> = out.lines().filter(|l| l.contains("FAIL")).collect();
    assert_eq!(fails.len(), 2, "{out}");
    assert!(
        fails[0].contains("test[0] tests/gitlab-push.json (Push Hook)"),
        "{out}"
    );
    assert!(
        out.contains("~ ci-validation: priority expected high, got medium"),
        "{out}"
    );
    assert!(out.contains("- review-bot (low)"), "{out}");
    assert!(out.contains("+ mr-reviewer (low) [project:"), "{out}");
    assert!(out.contains("passed, 2 failed"), "{out}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("2 of"),
        "{}",
        text(&bad)
    );

    let json = sluice(&["rules", "test", "--config", config, "--dir", dir, "--json"]);
    assert!(!json.status.success());
    let doc: Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let gitlab = doc
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "gitlab")
        .unwrap();
    let failed: Vec<_> = gitlab["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["passed"] == false)
        .map(|v| v["index"].as_u64().unwrap())
        .collect();
    assert_eq!(failed.len(), 2, "{gitlab}");
    assert_eq!(failed[0], 0);
    let first = &gitlab["vectors"][0];
    assert_eq!(first["got"]["routes"][0]["priority"], "medium", "{first}");

    let missing = sluice(&["rules", "test", "--config", config, "nope"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("\"nope\""));
}

/// A GitLab push to `git_ref`, with its own `after` so each is a new delivery.
fn push(git_ref: &str, n: u8) -> Bytes {
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(corpus().join("gitlab/webhooks/push.json")).unwrap())
            .unwrap();
    v["ref"] = Value::String(git_ref.to_owned());
    v["after"] = Value::String(format!("{n:040x}"));
    Bytes::from(serde_json::to_vec(&v).unwrap())
}

fn corpus_body(file: &str) -> Bytes {
    Bytes::from(std::fs::read(corpus().join(file)).unwrap())
}

/// Stores the deliveries through the gateway and lets the router decide them
/// with the rules the config serves; returns the event ids in order.
async fn route_through_serve(env: &Env, deliveries: &[(&str, &str, Bytes)]) -> Vec<String> {
    let gw = RoutingGateway::start(env.config()).await;
    let http = client();
    let mut ids = Vec::new();
    for (source, kind, body) in deliveries {
        let signed = env.signer(source).sign(kind, body).expect("sign");
        ids.push(post_accepted(&http, &gw.base, source, &signed).await);
    }
    for id in &ids {
        until_status(&*gw.store, id, EventStatus::Routed).await;
    }
    gw.stop().await;
    ids
}

/// The must-show: events decided by the shipped rules, then a candidate
/// where the GitLab rule also sends `hotfix/*` pushes to the release
/// manager. `whatif` lists exactly the hotfix pushes, under that rule and
/// that change, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatif_names_exactly_the_events_a_changed_rule_moves() {
    let (env, rules) = env_with_shipped_rules();
    let deliveries = [
        ("gitlab", "Push Hook", push("refs/heads/master", 1)),
        ("gitlab", "Push Hook", push("refs/heads/hotfix/1.2", 2)),
        ("gitlab", "Push Hook", push("refs/heads/release/2.0", 3)),
        ("gitlab", "Push Hook", push("refs/heads/hotfix/1.3", 4)),
        ("gitlab", "Push Hook", push("refs/heads/hotfixes", 5)),
        (
            "gitlab",
            "Tag Push Hook",
            corpus_body("gitlab/webhooks/tag_push.json"),
        ),
        (
            "gitlab",
            "Merge Request Hook",
            corpus_body("gitlab/webhooks/merge_request.json"),
        ),
        (
            "github",
            "issues",
            corpus_body("github/issues/opened.payload.json"),
        ),
    ];
    let ids = route_through_serve(&env, &deliveries).await;
    let hotfixes = vec![ids[3].clone(), ids[1].clone()]; // newest first

    let candidate = env.dir.path().join("candidate");
    copy_shipped_rules(&candidate);
    replace_in(
        &candidate.join("gitlab.rhai"),
        r#"if branch.starts_with("release/") {"#,
        r#"if branch.starts_with("release/") || branch.starts_with("hotfix/") {"#,
    );
    let config = env.config_path.to_str().unwrap();
    let dir = candidate.to_str().unwrap();
    let db_before = std::fs::read(env.db()).unwrap();

    let run = sluice(&["whatif", "--config", config, "--rules", dir, "--json"]);
    assert!(run.status.success(), "{}", text(&run));
    let doc: Value = serde_json::from_slice(&run.stdout).expect("JSON");
    assert_eq!(doc["compared"], ids.len(), "{doc:#}");
    let changed: Vec<_> = doc["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(changed, hotfixes, "{doc:#}");
    assert_eq!(
        doc["groups"],
        serde_json::json!([{
            "rule": "gitlab",
            "change": "+release-manager(high)",
            "events": hotfixes,
        }]),
        "{doc:#}"
    );

    let run = sluice(&["whatif", "--config", config, "--rules", dir]);
    assert!(run.status.success(), "{}", text(&run));
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        out.contains(&format!(
            "gitlab: +release-manager(high) on 2 events: {}, {}",
            hotfixes[0], hotfixes[1]
        )),
        "{out}"
    );
    assert!(
        out.contains("8 events compared, 2 would route differently"),
        "{out}"
    );

    // Filters: another source has nothing to change; --limit keeps the newest.
    let gh = sluice(&[
        "whatif", "--config", config, "--rules", dir, "--source", "github", "--json",
    ]);
    let doc: Value = serde_json::from_slice(&gh.stdout).expect("JSON");
    assert_eq!(
        (
            doc["compared"].as_u64(),
            doc["changed"].as_array().map(Vec::len)
        ),
        (Some(1), Some(0))
    );
    let newest = sluice(&[
        "whatif", "--config", config, "--rules", dir, "--limit", "5", "--since", "1h", "--json",
    ]);
    let doc: Value = serde_json::from_slice(&newest.stdout).expect("JSON");
    assert_eq!(doc["compared"], 5, "{doc:#}");
    assert_eq!(doc["groups"][0]["events"], serde_json::json!([ids[3]]));
    let future = sluice(&[
        "whatif",
        "--config",
        config,
        "--rules",
        dir,
        "--since",
        "2999-01-01T00:00:00Z",
        "--json",
    ]);
    let doc: Value = serde_json::from_slice(&future.stdout).expect("JSON");
    assert_eq!(doc["compared"], 0, "{doc:#}");

    // The shipped rules as the candidate: nothing would change.
    let same = sluice(&[
        "whatif",
        "--config",
        config,
        "--rules",
        rules.to_str().unwrap(),
        "--json",
    ]);
    let doc: Value = serde_json::from_slice(&same.stdout).expect("JSON");
    assert_eq!(doc["changed"], serde_json::json!([]), "{doc:#}");

    assert!(
        std::fs::read(env.db()).unwrap() == db_before,
        "whatif wrote to the store"
    );
}

/// `rules ls`: names, versions, languages and sizes from the files (a broken
/// manifest listed with its error beside the others), calls and latency from
/// the decisions the router recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_ls_lists_files_and_recorded_calls() {
    let (env, rules) = env_with_shipped_rules();
    let deliveries = [
        ("gitlab", "Push Hook", push("refs/heads/master", 1)),
        ("gitlab", "Push Hook", push("refs/heads/main", 2)),
        (
            "gitlab",
            "Merge Request Hook",
            corpus_body("gitlab/webhooks/merge_request.json"),
        ),
        (
            "github",
            "issues",
            corpus_body("github/issues/opened.payload.json"),
        ),
    ];
    route_through_serve(&env, &deliveries).await;
    std::fs::write(
        rules.join("zz-broken.toml"),
        "name = \"zz-broken\"\nscript = \"missing.rhai\"\n",
    )
    .unwrap();
    let config = env.config_path.to_str().unwrap();
    let ls = sluice(&["rules", "ls", "--config", config, "--json"]);
    assert!(ls.status.success(), "{}", text(&ls));
    let doc: Value = serde_json::from_slice(&ls.stdout).expect("JSON");
    assert_eq!(doc["source"], "files", "no server runs: {doc:#}");
    let rows = &doc["rules"];
    let row = |name: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed: {rows:#}"))
            .clone()
    };
    let (gh, gl, broken) = (row("github-router"), row("gitlab"), row("zz-broken"));
    // The shipped component is built stripped (no `producers` section names
    // its language): its manifest says it.
    assert_eq!(gh["language"], "rust", "{gh:#}");
    assert_eq!(gl["language"], "rhai", "{gl:#}");
    assert_eq!(gh["state"], "ok");
    assert_eq!(gh["grant"], "approved", "{gh:#}");
    assert_eq!(gl["grant"], "approved", "{gl:#}");
    let refused = broken["grant"].as_str().unwrap();
    assert!(
        refused.contains("not approved") && refused.contains("[rules.grants.zz-broken]"),
        "{refused}"
    );
    assert_eq!(
        gl["size"].as_u64(),
        Some(std::fs::metadata(rules.join("gitlab.rhai")).unwrap().len())
    );
    assert_eq!(gl["recorded"]["calls"], 3, "{gl:#}");
    assert_eq!(gh["recorded"]["calls"], 1, "{gh:#}");
    assert_eq!(gl["recorded"]["decisions"], 4, "{gl:#}");
    assert!(gl["recorded"]["p50_us"].as_u64().unwrap() > 0, "{gl:#}");
    assert!(
        gl["recorded"]["p99_us"].as_u64() >= gl["recorded"]["p50_us"].as_u64(),
        "{gl:#}"
    );
    assert_eq!(gl["recorded"]["versions"][0], gl["version"], "{gl:#}");
    let state = broken["state"].as_str().unwrap();
    assert!(
        state.contains("missing.rhai") && state.contains("cannot read"),
        "{state}"
    );

    let text_ls = sluice(&["rules", "ls", "--config", config]);
    let out = String::from_utf8_lossy(&text_ls.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("gitlab ") && l.contains("rhai")),
        "{out}"
    );
    assert!(out.contains("over the last 4 recorded decisions"), "{out}");
    assert!(out.contains("(from the files: no server"), "{out}");
}

/// `rules ls` while `sluice serve` serves the data directory: load state,
/// breakers and statistics come from the server's `/status/rules`, and the
/// output says so; once the server is gone, from the files again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_ls_asks_the_running_server() {
    let (env, _) = env_with_shipped_rules();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.set_server(&[("listen", &format!("\"127.0.0.1:{port}\""))]);
    let config = env.config_path.to_str().unwrap();
    let mut server = ServeChild::spawn(&env.config_path);
    let signed = env
        .signer("github")
        .sign("issues", &corpus_body("github/issues/opened.payload.json"))
        .expect("sign");
    post_accepted(&client(), &server.base, "github", &signed).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let doc = loop {
        let ls = sluice(&["rules", "ls", "--config", config, "--json"]);
        assert!(ls.status.success(), "{}", text(&ls));
        let doc: Value = serde_json::from_slice(&ls.stdout).expect("JSON");
        let gh = doc["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "github-router")
            .cloned();
        if gh.is_some_and(|gh| gh["recorded"]["calls"] == 1) {
            break doc;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the routed event never showed: {doc:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(doc["source"], "server", "{doc:#}");
    assert_eq!(
        doc["server"],
        format!("http://127.0.0.1:{port}/status/rules"),
        "{doc:#}"
    );
    // The versions, states and breakers are the server's.
    let status: Value = {
        use http_body_util::BodyExt;
        let req = hyper::Request::get(format!("{}/status/rules", server.base))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let resp = client().request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).expect("JSON")
    };
    for name in ["github-router", "gitlab"] {
        let row = doc["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap();
        let served = status["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["rule"] == name)
            .unwrap();
        assert_eq!(row["version"], served["version"], "{row:#} {served:#}");
        assert_eq!(row["state"], "ok", "{row:#}");
        assert_eq!(row["breaker"], "closed", "{row:#}");
        assert_eq!(status["breakers"][name], "closed", "{status:#}");
    }
    let out = sluice(&["rules", "ls", "--config", config]);
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("(from the running server, http://127.0.0.1:"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("github-router ") && l.contains(" closed ")),
        "{out}"
    );

    server.kill();
    let ls = sluice(&["rules", "ls", "--config", config, "--json"]);
    let doc: Value = serde_json::from_slice(&ls.stdout).expect("JSON");
    assert_eq!(doc["source"], "files", "{doc:#}");
    assert_eq!(doc["rules"][0]["breaker"], Value::Null, "{doc:#}");
}

#[test]
fn component_language_comes_from_the_producers_section() {
    use sluice::rules::manifest::component_language;
    let tagged = wat::parse_str(
        r#"(component (core module (@producers (language "C" "17") (processed-by "clang" "19"))))"#,
    )
    .expect("wat");
    assert_eq!(component_language(&tagged).as_deref(), Some("c"));
    let bare = wat::parse_str("(component (core module))").expect("wat");
    assert_eq!(component_language(&bare), None);
    // A third party's component prints no control characters to the
    // operator's terminal: a producers name that is not a plain name is none.
    let hostile = wat::parse_str(
        r#"(component (core module (@producers (language "\1b[2J\1b]0;owned\07" "1"))))"#,
    )
    .expect("wat");
    assert_eq!(component_language(&hostile), None);
}

/// A manifest's `language` is a plain name, or the manifest is refused
/// naming the key.
#[test]
fn a_manifest_language_with_control_characters_is_refused() {
    use sluice::rules::manifest::Manifest;
    let path = Path::new("rules/x.toml");
    let ok = "name = \"x\"\ncomponent = \"x.wasm\"\nlanguage = \"javascript\"\n";
    assert_eq!(
        Manifest::parse(path, ok).unwrap().language.as_deref(),
        Some("javascript")
    );
    let bad = "name = \"x\"\ncomponent = \"x.wasm\"\nlanguage = \"\\u001b[31mrust\"\n";
    let e = Manifest::parse(path, bad).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("language"), "{e}");
    assert!(e.to_string().contains("rules/x.toml"), "{e}");
}

/// `new rule` in an empty directory with the embedded defaults, then `rules
/// test` in the same working directory: the skeleton's vectors pass. A
/// second `new rule` with the same name overwrites nothing.
#[test]
fn a_new_rhai_rule_passes_rules_test_right_away() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("SLUICE_CONFIG")
            .output()
            .expect("run sluice")
    };
    let new = run(&["new", "rule", "triage-helper", "--lang", "rhai"]);
    assert!(new.status.success(), "{}", text(&new));
    assert!(dir.path().join("rules/triage-helper.toml").is_file());
    assert!(dir.path().join("rules/triage-helper.rhai").is_file());
    let test = run(&["rules", "test", "triage-helper"]);
    assert!(test.status.success(), "{}", text(&test));
    let out = String::from_utf8_lossy(&test.stdout);
    assert!(out.contains("2 passed, 0 failed"), "{out}");

    let again = run(&["new", "rule", "triage-helper", "--lang", "rhai"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let bad = run(&["new", "rule", "Bad Name", "--lang", "rhai"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("name"),
        "{}",
        text(&bad)
    );
    let other = run(&[
        "new",
        "rule",
        "elsewhere",
        "--lang",
        "rhai",
        "--dir",
        "more",
    ]);
    assert!(other.status.success(), "{}", text(&other));
    assert!(dir.path().join("more/elsewhere.toml").is_file());
    let test = run(&["rules", "test", "--dir", "more"]);
    assert!(test.status.success(), "{}", text(&test));
}

/// `new rule --lang LANG` in an empty directory with the embedded defaults:
/// the one build command it prints makes the component (its toolchain comes
/// from `plugins/target/tools`, where `plugins/build.sh` installed it), and
/// `rules test` passes right after in the same working directory.
fn new_component_rule_builds_and_passes(lang: &str) {
    let dir = tempfile::tempdir().unwrap();
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/target/tools");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("SLUICE_CONFIG")
            .output()
            .expect("run sluice")
    };
    let name = format!("new-{lang}");
    let new = run(&["new", "rule", &name, "--lang", lang]);
    assert!(new.status.success(), "{}", text(&new));
    let out = String::from_utf8_lossy(&new.stdout).into_owned();
    let build = out
        .lines()
        .find_map(|l| l.strip_prefix("build it: "))
        .unwrap_or_else(|| panic!("names its build command: {out}"));
    // Before the build, the rule does not load (no component yet).
    let early = run(&["rules", "test", &name]);
    assert!(!early.status.success(), "{}", text(&early));
    // The WIT comes from the binary: an empty directory has none.
    assert!(
        dir.path()
            .join("rules")
            .join(&name)
            .join("wit/router.wit")
            .is_file()
    );
    let words: Vec<&str> = build.split_whitespace().collect();
    let built = Command::new(words[0])
        .args(&words[1..])
        .current_dir(dir.path())
        .env("SLUICE_TOOLS", &tools)
        .output()
        .expect("run the build command");
    assert!(built.status.success(), "{build}: {}", text(&built));
    let test = run(&["rules", "test", &name]);
    assert!(test.status.success(), "{}", text(&test));
    assert!(
        String::from_utf8_lossy(&test.stdout).contains("2 passed, 0 failed"),
        "{}",
        text(&test)
    );
}

#[test]
fn a_new_rust_rule_builds_with_one_command_and_passes_rules_test() {
    new_component_rule_builds_and_passes("rust");
}

#[test]
fn a_new_c_rule_builds_with_one_command_and_passes_rules_test() {
    new_component_rule_builds_and_passes("c");
}

#[test]
fn a_new_js_rule_builds_with_one_command_and_passes_rules_test() {
    new_component_rule_builds_and_passes("js");
}

#[test]
fn a_new_python_rule_builds_with_one_command_and_passes_rules_test() {
    new_component_rule_builds_and_passes("python");
}

/// A reader that goes away (`sluice rules test | head -1`) ends the command
/// quietly: no error, exit 0.
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    let (env, _) = env_with_shipped_rules();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["rules", "test", "--config"])
        .arg(&env.config_path)
        .env_remove("SLUICE_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    // Closed before the rules have even loaded: the first write fails.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}
