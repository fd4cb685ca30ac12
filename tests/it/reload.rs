//! Hot reload: rule files rewritten while `sluice serve` runs (by rename, in
//! place, by deleting and re-adding), bad rules at start and on reload,
//! `SIGHUP` for rules and rotated secrets, breaker state across reloads, and
//! how long a landed file takes to serve.
//!
//! Real files, a real `sluice serve` child (or the real watcher in-process),
//! real HTTP, a real SQLite store read back for the decisions.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;
use sluice::cli::send::Signer;
use sluice::event::{Event, ParsedEvent, Provider, now_ms};
use sluice::rules::RulesConfig;
use sluice::rules::breaker::BreakerState;
use sluice::rules::reload::{Reloader, RulesStatus, Watch};
use sluice::rules::wasm::WasmEngine;

use crate::support::{Env, ServeChild, client, post};

/// Long enough that a `sluice serve` on a loaded machine answers every poll.
const DEADLINE: Duration = Duration::from_secs(60);

/// Reload settings for the tests: a short debounce and poll, so a loop of
/// rewrites stays quick.
const RELOAD: &str = "\n[rules.reload]\ndebounce_ms = 300\npoll_ms = 500\n";

/// A rhai rule whose every version routes to an agent named after it. The
/// version is spelt only at the end of the file and padding sits before it,
/// so a file read half-written cannot route (and fails its vector).
fn flip_script(version: u32) -> String {
    format!(
        "fn classify(event) {{\n    if event.kind == \"check\" {{ version(); return [#{{ agent: \"checked\", priority: \"low\" }}]; }}\n    [#{{ agent: \"v\" + version(), priority: \"low\" }}]\n}}\n{}fn version() {{ \"{version}\" }}\n",
        "// padding, so that an in-place write takes many writes\n".repeat(80)
    )
}

const FLIP_MANIFEST: &str = r#"name = "flip"
script = "flip.rhai"
providers = ["github"]

[[test]]
event = "tests/check.json"
kind = "check"
expect = [{ agent = "checked" }]
"#;

/// An Env whose rules directory holds `flip` at version 0.
fn flip_env(extra: &str) -> Env {
    let env = Env::new(&format!("{RELOAD}{extra}"));
    // Every rule these tests write is approved for everything: grants are
    // tested on their own (tests/it/grants.rs).
    for rule in ["flip", "broken", "orphan"] {
        env.approve(rule, crate::support::APPROVE_ALL);
    }
    let rules = env.dir.path().join("rules");
    std::fs::create_dir_all(rules.join("tests")).unwrap();
    std::fs::write(rules.join("tests/check.json"), "{}").unwrap();
    std::fs::write(rules.join("flip.rhai"), flip_script(0)).unwrap();
    std::fs::write(rules.join("flip.toml"), FLIP_MANIFEST).unwrap();
    env
}

fn rules_dir(env: &Env) -> PathBuf {
    env.dir.path().join("rules")
}

/// Writes a file whole under a temporary name and renames it into place.
fn write_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Writes a file in place, a few hundred bytes at a time with pauses (well
/// under the debounce window), as a slow editor or a copy over the network
/// would: the file is half-written for a while.
fn write_in_place(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    for chunk in text.as_bytes().chunks(400) {
        f.write_all(chunk).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(15));
    }
}

async fn get_json(base: &str, path: &str) -> Value {
    let resp = reqwest_get(&format!("{base}{path}")).await;
    serde_json::from_str(&resp).unwrap_or(Value::Null)
}

async fn reqwest_get(url: &str) -> String {
    use http_body_util::BodyExt;
    let c = client();
    let resp = c
        .request(
            http::Request::get(url)
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .expect("GET");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

async fn status(base: &str) -> RulesStatusView {
    RulesStatusView(get_json(base, "/status/rules").await)
}

/// `/status/rules` as served.
struct RulesStatusView(Value);

impl RulesStatusView {
    fn rule(&self, name: &str) -> Option<&Value> {
        self.0["rules"]
            .as_array()?
            .iter()
            .find(|r| r["rule"] == name)
    }
    fn version(&self, name: &str) -> Option<String> {
        self.rule(name)?["version"].as_str().map(str::to_owned)
    }
}

/// Polls `/status/rules` until `done` holds; returns that status.
async fn until_status(
    base: &str,
    what: &str,
    done: impl Fn(&RulesStatusView) -> bool,
) -> RulesStatusView {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = status(base).await;
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            s.0
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `sluice serve` on `env`, once it serves its first version of `flip`
/// (returned).
async fn serve_flip(env: &Env) -> (ServeChild, String) {
    let server = ServeChild::spawn(&env.config_path);
    let v0 = until_status(&server.base, "flip v0", |s| s.version("flip").is_some())
        .await
        .version("flip")
        .unwrap();
    (server, v0)
}

/// Posts one signed GitHub `issues` event; the id if accepted.
async fn send(env: &Env, base: &str, n: u64) -> Option<String> {
    send_with(&env.signer("github"), base, n).await
}

async fn send_with(signer: &Signer, base: &str, n: u64) -> Option<String> {
    let signed = signer
        .sign(
            "issues",
            &Bytes::from(format!(r#"{{"action":"opened","n":{n}}}"#)),
        )
        .unwrap();
    let (s, b) = post(
        &client(),
        &format!("{base}/hooks/github"),
        &signed.headers,
        signed.body.clone(),
    )
    .await;
    (s == StatusCode::ACCEPTED).then(|| b["id"].as_str().expect("id").to_owned())
}

/// Every decision row per event id: (decided_at_ms, decision JSON).
fn decisions(env: &Env) -> BTreeMap<String, Vec<(i64, Value)>> {
    let conn =
        rusqlite::Connection::open_with_flags(env.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare("SELECT event_id, decided_at_ms, decision FROM decisions")
        .unwrap();
    let mut out: BTreeMap<String, Vec<(i64, Value)>> = BTreeMap::new();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .unwrap();
    for row in rows {
        let (id, at, d) = row.unwrap();
        out.entry(id)
            .or_default()
            .push((at, serde_json::from_str(&d).unwrap()));
    }
    out
}

async fn metrics(base: &str) -> String {
    reqwest_get(&format!("{base}/metrics")).await
}

/// The value of one metric line (by its name and labels as rendered), if present.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_rewritten_in_a_loop_while_events_flow_route_each_event_once_by_a_live_version() {
    let env = flip_env("");
    let server = ServeChild::spawn(&env.config_path);
    let base = server.base.clone();
    let rules = rules_dir(&env);
    let script = rules.join("flip.rhai");
    let manifest = rules.join("flip.toml");

    // What served when: (from ms, version hash or None while the rule is gone).
    let first = until_status(&base, "flip v0 to serve", |s| s.version("flip").is_some()).await;
    let mut timeline: Vec<(i64, Option<String>)> = vec![(
        first.rule("flip").unwrap()["serving_since_ms"]
            .as_i64()
            .unwrap(),
        first.version("flip"),
    )];
    let mut agent_of: BTreeMap<String, String> = BTreeMap::new();
    agent_of.insert(first.version("flip").unwrap(), "v0".into());

    // Events flow the whole time, each with the time it was sent.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (stop, base) = (stop.clone(), base.clone());
        let signer = env.signer("github");
        tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let at = now_ms();
                if let Some(id) = send_with(&signer, &base, n).await {
                    sent.push((id, at));
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        })
    };

    let mut version = 0;
    for round in 0..4 {
        for method in ["rename", "in-place", "delete-and-re-add"] {
            version += 1;
            let text = flip_script(version);
            let before = timeline.last().unwrap().1.clone();
            match method {
                "rename" => write_by_rename(&script, &text),
                "in-place" => {
                    let path = script.clone();
                    tokio::task::spawn_blocking(move || write_in_place(&path, &text))
                        .await
                        .unwrap();
                }
                _ => {
                    std::fs::remove_file(&manifest).unwrap();
                    let gone =
                        until_status(&base, "flip to be removed", |s| s.rule("flip").is_none())
                            .await;
                    timeline.push((gone.0["swapped_at_ms"].as_i64().unwrap(), None));
                    let path = script.clone();
                    tokio::task::spawn_blocking(move || write_in_place(&path, &text))
                        .await
                        .unwrap();
                    let path = manifest.clone();
                    tokio::task::spawn_blocking(move || write_in_place(&path, FLIP_MANIFEST))
                        .await
                        .unwrap();
                }
            }
            let s = until_status(
                &base,
                &format!("flip v{version} ({method}, round {round})"),
                |s| {
                    s.version("flip")
                        .is_some_and(|v| Some(&v) != before.as_ref())
                        || s.rule("flip").is_some_and(|r| r["state"] == "failed")
                },
            )
            .await;
            let r = s.rule("flip").unwrap();
            assert_eq!(
                r["state"], "loaded",
                "flip v{version} by {method} did not load cleanly: {r}"
            );
            let v = s.version("flip").unwrap();
            assert!(
                agent_of.insert(v.clone(), format!("v{version}")).is_none(),
                "version {v} seen twice"
            );
            timeline.push((r["serving_since_ms"].as_i64().unwrap(), Some(v)));
            // Let each version route some events before the next lands.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A little more traffic on the last version, then stop sending.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = sender.await.unwrap();
    assert!(sent.len() > 50, "only {} events were accepted", sent.len());

    // Wait until every accepted event has its decision.
    let deadline = Instant::now() + DEADLINE;
    let decided = loop {
        let d = decisions(&env);
        if sent.iter().all(|(id, _)| d.contains_key(id)) {
            break d;
        }
        assert!(Instant::now() < deadline, "not every event was routed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Live intervals: [from, next from] per state.
    let live: Vec<(i64, i64, Option<String>)> = timeline
        .iter()
        .enumerate()
        .map(|(i, (from, v))| {
            let until = timeline.get(i + 1).map_or(i64::MAX, |t| t.0);
            (*from, until, v.clone())
        })
        .collect();
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for (id, sent_at) in &sent {
        let rows = &decided[id];
        assert_eq!(rows.len(), 1, "event {id} was routed {} times", rows.len());
        let (decided_at, d) = &rows[0];
        let flip: Vec<&Value> = d["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["rule"] == "flip")
            .collect();
        let used = match flip.as_slice() {
            [] => None,
            [r] => {
                let v = r["version"].as_str().unwrap().to_owned();
                let agent = agent_of.get(&v).unwrap_or_else(|| {
                    panic!("event {id} routed by version {v}, never seen serving")
                });
                let routed: Vec<&str> = d["routes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["agent"].as_str().unwrap())
                    .collect();
                assert_eq!(routed, [agent.as_str()], "event {id} by {v}: {d}");
                Some(v)
            }
            _ => panic!("flip ran twice on {id}: {d}"),
        };
        // Routing started after the event was sent and before it was decided:
        // the version used must have been live somewhere in that window
        // (2 ms of slack for the millisecond clocks).
        let ok = live
            .iter()
            .any(|(from, until, v)| *v == used && *from <= decided_at + 2 && *until >= sent_at - 2);
        assert!(
            ok,
            "event {id} (sent {sent_at}, decided {decided_at}) used {used:?}, not live then: {timeline:?}"
        );
        *by_state
            .entry(used.map_or("none".into(), |v| agent_of[&v].clone()))
            .or_default() += 1;
    }
    // Nothing half-written was ever read: no load failed along the way.
    let m = metrics(&base).await;
    assert_eq!(
        metric(&m, "sluice_rule_reloads_total{outcome=\"failed\"}").unwrap_or(0.0),
        0.0,
        "a reload failed during the loop:\n{m}"
    );
    eprintln!("events per serving version: {by_state:?}");
}

/// Routes of the event's decision, once it has one.
async fn routed_to(env: &Env, id: &str) -> Vec<String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(rows) = decisions(env).get(id) {
            let (_, d) = rows.last().unwrap();
            return d["routes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["agent"].as_str().unwrap().to_owned())
                .collect();
        }
        assert!(Instant::now() < deadline, "event {id} never routed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rule_keeps_its_previous_version_serving_and_is_reported() {
    let env = flip_env("");
    let server = ServeChild::spawn(&env.config_path);
    let base = server.base.clone();
    let script = rules_dir(&env).join("flip.rhai");
    let good = until_status(&base, "flip v0", |s| s.version("flip").is_some()).await;
    let v0 = good.version("flip").unwrap();

    // A syntax error, and then a script that parses but fails its vector.
    for (bad, why) in [
        ("fn classify(event) { [#{ agent: ", "flip.rhai"),
        (
            "fn classify(event) { [#{ agent: \"wrong\", priority: \"low\" }] }",
            "test[0]",
        ),
    ] {
        write_by_rename(&script, bad);
        let s = until_status(&base, "the bad version to be refused", |s| {
            s.rule("flip").is_some_and(|r| {
                r["state"] == "failed" && r["error"].as_str().is_some_and(|e| e.contains(why))
            })
        })
        .await;
        assert_eq!(
            s.version("flip").as_deref(),
            Some(v0.as_str()),
            "the previous version serves: {}",
            s.0
        );
        let id = send(&env, &base, 1).await.expect("accepted");
        assert_eq!(routed_to(&env, &id).await, ["v0"]);
    }
    let m = metrics(&base).await;
    assert_eq!(
        metric(&m, "sluice_rule_reloads_total{outcome=\"failed\"}"),
        Some(2.0),
        "{m}"
    );
    // How long the version serving took to build (compile and vectors).
    let build = metric(&m, "sluice_rule_build_seconds{rule=\"flip\"}");
    assert!(build.is_some_and(|s| s > 0.0 && s < 60.0), "{m}");
    assert_eq!(
        metric(
            &m,
            &format!("sluice_rule_version_info{{rule=\"flip\",version=\"{v0}\"}}")
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "sluice_rule_load_failed{rule=\"flip\"}"),
        Some(1.0),
        "{m}"
    );

    // Fixed: the new version serves and the failure clears.
    write_by_rename(&script, &flip_script(7));
    let s = until_status(&base, "flip v7", |s| {
        s.rule("flip").is_some_and(|r| {
            r["state"] == "loaded" && s.version("flip").as_deref() != Some(v0.as_str())
        })
    })
    .await;
    let v7 = s.version("flip").unwrap();
    let id = send(&env, &base, 2).await.expect("accepted");
    assert_eq!(routed_to(&env, &id).await, ["v7"]);
    let m = metrics(&base).await;
    assert_eq!(
        metric(
            &m,
            &format!("sluice_rule_version_info{{rule=\"flip\",version=\"{v7}\"}}")
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            &format!("sluice_rule_version_info{{rule=\"flip\",version=\"{v0}\"}}")
        ),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "sluice_rule_load_failed{rule=\"flip\"}"),
        Some(0.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rule_at_start_is_skipped_and_reported_while_serve_runs() {
    let env = flip_env("");
    let rules = rules_dir(&env);
    std::fs::write(
        rules.join("broken.toml"),
        "name = \"broken\"\nscript = \"broken.rhai\"\n",
    )
    .unwrap();
    std::fs::write(rules.join("broken.rhai"), "fn classify(event) { [").unwrap();
    std::fs::write(
        rules.join("orphan.toml"),
        "name = \"orphan\"\ncomponent = \"missing.wasm\"\n",
    )
    .unwrap();

    // `check` still refuses the directory, naming the file at fault.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config"])
        .arg(&env.config_path)
        .env_remove("SLUICE_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success(), "check accepted a broken rule");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("broken.rhai"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let server = ServeChild::spawn(&env.config_path);
    let s = until_status(&server.base, "the first load", |s| s.rule("flip").is_some()).await;
    assert_eq!(s.rule("flip").unwrap()["state"], "loaded", "{}", s.0);
    for (rule, file) in [("broken", "broken.rhai"), ("orphan", "missing.wasm")] {
        let r = s
            .rule(rule)
            .unwrap_or_else(|| panic!("{rule} is on the board: {}", s.0));
        assert_eq!(r["state"], "failed", "{r}");
        assert!(r["version"].is_null(), "{r}");
        assert!(r["error"].as_str().unwrap().contains(file), "{r}");
    }
    let m = metrics(&server.base).await;
    assert_eq!(
        metric(&m, "sluice_rule_reloads_total{outcome=\"failed\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "sluice_rule_load_failed{rule=\"broken\"}"),
        Some(1.0),
        "{m}"
    );
    let id = send(&env, &server.base, 1).await.expect("accepted");
    assert_eq!(routed_to(&env, &id).await, ["v0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rules_and_rereads_rotated_secrets() {
    // No watching: only SIGHUP may change the rules.
    let env = flip_env("watch = false\n");
    let (server, v0) = serve_flip(&env).await;
    let base = server.base.clone();
    let old_signer = env.signer("github");
    let body = Bytes::from_static(br#"{"action":"opened"}"#);

    std::fs::write(env.dir.path().join("github.key"), "gh-rotated-secret").unwrap();
    write_by_rename(&rules_dir(&env).join("flip.rhai"), &flip_script(3));
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());

    let s = until_status(&base, "flip v3 after SIGHUP", |s| {
        s.version("flip").is_some_and(|v| v != v0)
    })
    .await;
    assert_eq!(s.rule("flip").unwrap()["state"], "loaded");
    // The new secret verifies (the signer reads the rotated file).
    let new_signer = env.signer("github");
    let deadline = Instant::now() + DEADLINE;
    let id = loop {
        let signed = new_signer.sign("issues", &body).unwrap();
        let (st, b) = post(
            &client(),
            &format!("{base}/hooks/github"),
            &signed.headers,
            signed.body.clone(),
        )
        .await;
        if st == StatusCode::ACCEPTED {
            break b["id"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the rotated secret never verified: {st} {b}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(routed_to(&env, &id).await, ["v3"]);
    // The replaced secret no longer does.
    let signed = old_signer.sign("issues", &body).unwrap();
    let (st, b) = post(
        &client(),
        &format!("{base}/hooks/github"),
        &signed.headers,
        signed.body.clone(),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{b}");
    // And the process is still the one we started.
    assert_eq!(reqwest_get(&format!("{base}/healthz")).await, "ok");
}

fn event(kind: &str) -> Arc<ParsedEvent> {
    Arc::new(ParsedEvent::new(Event::dry_run(
        "github",
        Provider::Github,
        kind,
        None,
        Bytes::from_static(b"{}"),
    )))
}

#[test]
fn breaker_state_carries_over_for_an_unchanged_version_and_starts_fresh_for_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let write = |name: &str, script: &str| {
        std::fs::write(rules.join(format!("{name}.rhai")), script).unwrap();
        std::fs::write(
            rules.join(format!("{name}.toml")),
            format!("name = \"{name}\"\nscript = \"{name}.rhai\"\nproviders = [\"github\"]\n"),
        )
        .unwrap();
    };
    // `brittle` loops forever on a `boom` event: a counted failure.
    write(
        "brittle",
        "fn classify(event) { if event.kind == \"boom\" { loop {} } [#{ agent: \"a\", priority: \"low\" }] }",
    );
    write(
        "steady",
        "fn classify(event) { [#{ agent: \"b\", priority: \"low\" }] }",
    );
    let all = crate::support::APPROVE_ALL;
    let mut config: RulesConfig = toml::from_str(&format!(
        "[grants.brittle]\n{all}\n[grants.steady]\n{all}\n"
    ))
    .unwrap();
    config.breaker.failures = 1;
    config.breaker.cooldown_ms = 600_000;
    let engine = Arc::new(WasmEngine::new(None).unwrap());
    let reloader = Reloader::new(&config, dir.path(), engine).unwrap();
    let first = reloader.reload();
    assert_eq!(first.loaded, ["brittle", "steady"]);
    let set = reloader.rules().load_full();
    let brittle = set.shared_rules().next().unwrap().clone();
    set.route(&event("boom"));
    assert!(matches!(
        set.breaker_state("brittle"),
        Some(BreakerState::Open(_))
    ));

    // Another rule changes: brittle's version is the same, its breaker stays open.
    write(
        "steady",
        "fn classify(event) { [#{ agent: \"c\", priority: \"low\" }] }",
    );
    let r = reloader.reload();
    assert_eq!(r.loaded, ["steady"]);
    assert!(r.swapped);
    let set = reloader.rules().load_full();
    assert!(
        matches!(set.breaker_state("brittle"), Some(BreakerState::Open(_))),
        "{:?}",
        set.breaker_state("brittle")
    );
    // Reused as it was, not rebuilt.
    assert!(Arc::ptr_eq(set.shared_rules().next().unwrap(), &brittle));

    // brittle itself changes: a new version, a closed breaker.
    write(
        "brittle",
        "fn classify(event) { [#{ agent: \"a\", priority: \"high\" }] }",
    );
    let r = reloader.reload();
    assert_eq!(r.loaded, ["brittle"]);
    let set = reloader.rules().load_full();
    assert_eq!(set.breaker_state("brittle"), Some(BreakerState::Closed));
    // Nothing changed: no new set.
    assert!(!reloader.reload().swapped);
}

/// Lands a new version of one rule file by rename and returns how long the
/// server took to serve it, from the status board's own clock.
async fn landing_to_serving(reloader: &Reloader, rule: &str, path: &Path, bytes: &[u8]) -> i64 {
    let before = version_of(&reloader.status().load(), rule);
    let tmp = path.with_extension("landing~");
    std::fs::write(&tmp, bytes).unwrap();
    let landed = now_ms();
    std::fs::rename(&tmp, path).unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = reloader.status().load();
        let r = s.rules.iter().find(|r| r.rule == rule).unwrap();
        assert!(r.error.is_none(), "{rule}: {:?}", r.error);
        if r.version != before {
            return r.serving_since_ms.unwrap() - landed;
        }
        assert!(Instant::now() < deadline, "{rule} never reloaded");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn version_of(s: &RulesStatus, rule: &str) -> Option<String> {
    s.rules.iter().find(|r| r.rule == rule)?.version.clone()
}

/// A valid component with one more custom section: a new version that no
/// compile cache has seen.
fn with_custom_section(component: &[u8], tag: &str) -> Vec<u8> {
    let name = b"sluice-reload-test";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = component.to_vec();
    out.push(0);
    let mut n = payload.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(&payload);
    out
}

/// Not a timing assertion: prints how long a landed file takes to serve, for
/// a rhai and a Rust (component) rule, through the real watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_latency_from_file_landing_to_serving_is_reported() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(rules.join("tests")).unwrap();
    for f in [
        "github-router.toml",
        "github-router.wasm",
        "gitlab.toml",
        "gitlab.rhai",
    ] {
        std::fs::copy(repo.join("rules").join(f), rules.join(f)).unwrap();
    }
    for f in std::fs::read_dir(repo.join("rules/tests")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, rules.join("tests").join(f.file_name().unwrap())).unwrap();
    }
    let mut config = RulesConfig::default();
    config.reload.debounce_ms = 300;
    config.grants = sluice::config::Config::parse(sluice::config::EMBEDDED_DEFAULTS, "sluice.toml")
        .expect("the embedded defaults parse")
        .rules
        .grants;
    let engine = Arc::new(WasmEngine::new(Some(dir.path().join("cache"))).unwrap());
    let reloader = Arc::new(Reloader::new(&config, dir.path(), engine).unwrap());
    let watch = Watch::start(reloader.clone());
    let first = reloader.reload();
    assert_eq!(first.failed, Vec::<String>::new());
    let watcher = tokio::spawn(watch.run());

    let script = std::fs::read_to_string(rules.join("gitlab.rhai")).unwrap();
    let wasm = std::fs::read(rules.join("github-router.wasm")).unwrap();
    let mut rhai_ms = Vec::new();
    let mut rust_ms = Vec::new();
    for i in 0..3 {
        let text = format!("{script}\n// reload {i}\n");
        rhai_ms.push(
            landing_to_serving(
                &reloader,
                "gitlab",
                &rules.join("gitlab.rhai"),
                text.as_bytes(),
            )
            .await,
        );
        let bytes = with_custom_section(&wasm, &format!("{i}"));
        rust_ms.push(
            landing_to_serving(
                &reloader,
                "github-router",
                &rules.join("github-router.wasm"),
                &bytes,
            )
            .await,
        );
    }
    // Back to a version compiled before: the compile cache answers.
    let cached = landing_to_serving(
        &reloader,
        "github-router",
        &rules.join("github-router.wasm"),
        &with_custom_section(&wasm, "0"),
    )
    .await;
    eprintln!(
        "reload latency, file landed (rename) to new version serving: rhai {rhai_ms:?} ms; \
         Rust component, fresh compile {rust_ms:?} ms, from the compile cache {cached} ms"
    );
    watcher.abort();
}

/// Build output and hidden files under the rules directory (a Rust rule's
/// `target/` built in place, `node_modules/`, `__pycache__/`, a build's
/// `.x.wasm.tmp`, an editor's swap file) never trigger a reload, by file
/// event or by the poll; a rule file still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_output_under_the_rules_directory_triggers_no_reload() {
    let env = flip_env("");
    let (server, v0) = serve_flip(&env).await;
    let base = server.base.clone();
    let reloads = |s: &RulesStatusView| s.0["reloads"].as_u64().unwrap();
    let rules = rules_dir(&env);
    // A rule's own folder appearing is worth a look (its code may be in
    // it); what a build then writes inside it is not.
    std::fs::create_dir_all(rules.join("my-rule/src")).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = reloads(&status(&base).await);

    for (i, dir) in [
        "my-rule/target/wasm32-wasip2/release",
        "node_modules/componentize-qjs",
        "my-rule/src/__pycache__",
        ".git",
    ]
    .iter()
    .enumerate()
    {
        let dir = rules.join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        for n in 0..20 {
            std::fs::write(dir.join(format!("out-{n}.bin")), format!("{i}-{n}")).unwrap();
        }
        write_by_rename(&dir.join("renamed.toml"), "name = \"not-a-rule\"");
    }
    write_in_place(&rules.join(".flip.rhai.swp"), "editor swap");
    write_by_rename(&rules.join(".my-rule.wasm.tmp"), "half a build");
    // Wide: past the debounce (300 ms) and several polls (500 ms).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = status(&base).await;
    assert_eq!(
        reloads(&s),
        before,
        "build output reloaded the rules: {}",
        s.0
    );
    assert_eq!(s.version("flip").as_deref(), Some(v0.as_str()));

    // The control: a rule's own file still reloads.
    write_by_rename(&rules.join("flip.rhai"), &flip_script(1));
    until_status(&base, "flip v1", |s| {
        s.version("flip").is_some_and(|v| v != v0) && reloads(s) > before
    })
    .await;
}
