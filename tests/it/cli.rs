//! The binary as a user runs it: `check` on good and broken configs, and
//! `send` → `events ls` / `events show` against a running `serve`.

use std::time::{Duration, Instant};

use crate::support::{Env, ServeChild, corpus, send_accepted, sluice};

#[test]
fn check_reports_ok_and_broken_configs_by_file_and_key() {
    let env = Env::new("");
    let path = env.config_path.to_str().unwrap();
    let ok = sluice(&["check", "--config", path]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(out.contains("source github: provider github"), "{out}");

    let broken = env.dir.path().join("broken.toml");
    std::fs::write(&broken, "[server]\nlisten = \"127.0.0.1:1\"\n[sources.gh]\nprovider = \"github\"\nsecret = { env = \"X\" }\ncolour = \"blue\"\n").unwrap();
    let bad = sluice(&["check", "--config", broken.to_str().unwrap()]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("broken.toml") && err.contains("sources.gh") && err.contains("colour"),
        "{err}"
    );
}

#[test]
fn send_then_events_ls_and_show() {
    let env = Env::new("");
    let path = env.config_path.to_str().unwrap().to_string();
    let server = ServeChild::spawn(&env.config_path);
    let base = server.base.clone();
    let payload = corpus().join("github/issues/opened.payload.json");
    let url = format!("{base}/hooks/github");
    send_accepted(&path, &url, "github", None, &payload);
    let load = sluice(&[
        "send",
        "--config",
        &path,
        "--source",
        "github",
        "--event",
        "issues",
        "--url",
        &url,
        "--repeat",
        "50",
        "--concurrency",
        "8",
        payload.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&load.stdout).into_owned();
    assert!(load.status.success() && out.contains("202: 50"), "{out}");

    let ls = sluice(&[
        "events", "ls", "--config", &path, "--kind", "issues", "--limit", "100", "--json",
    ]);
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(rows.len(), 51);
    assert!(
        rows.iter()
            .all(|r| r["action"] == "opened" && r["source"] == "github")
    );
    let id = rows[0]["id"].as_str().unwrap();
    // The router records a decision (with no rules loaded: no routes).
    let deadline = Instant::now() + Duration::from_secs(20);
    let doc: serde_json::Value = loop {
        let show = sluice(&["events", "show", "--config", &path, id, "--json"]);
        let doc: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
        if doc["event"]["status"] == "routed" || Instant::now() > deadline {
            break doc;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(doc["event"]["status"], "routed", "{doc}");
    assert_eq!(doc["decision"]["routes"], serde_json::json!([]));
    assert_eq!(doc["event"]["id"], id);
    assert_eq!(doc["payload"]["action"], "opened");
    let text = sluice(&["events", "show", "--config", &path, id]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("x-github-event: issues"));
    let missing = sluice(&["events", "show", "--config", &path, "evt_nope"]);
    assert!(!missing.status.success());

    // The store's own figures agree with what was listed.
    let stats = sluice(&["store", "stats", "--config", &path, "--json"]);
    assert!(
        stats.status.success(),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    let s = &doc["stats"];
    assert_eq!(s["events"], 51, "{doc:#}");
    assert_eq!(s["log_segments"], 1, "{doc:#}");
    let body = std::fs::metadata(&payload).unwrap().len();
    assert!(s["log_bytes"].as_u64().unwrap() > 51 * body, "{doc:#}");
    assert_eq!(
        s["oldest_received_at_ms"],
        rows.last().unwrap()["received_at_ms"],
        "{doc:#}"
    );
    assert_eq!(doc["retention"], "30days");
    let text = String::from_utf8_lossy(&sluice(&["store", "stats", "--config", &path]).stdout)
        .into_owned();
    assert!(
        text.contains("events        51 (") && text.contains("retention     30days"),
        "{text}"
    );
    drop(server);
}

/// A server a test started goes away with the test, even when the test fails
/// half-way: the guard kills and reaps it on drop (also while unwinding).
#[test]
fn a_started_server_is_killed_when_its_test_fails() {
    let env = Env::new("");
    let pid = std::sync::Mutex::new(0u32);
    let failed = std::panic::catch_unwind(|| {
        let server = ServeChild::spawn(&env.config_path);
        *pid.lock().unwrap() = server.pid();
        panic!("an assertion fails while the server runs");
    });
    assert!(failed.is_err());
    let pid = *pid.lock().unwrap();
    assert_ne!(pid, 0, "the server started");
    // Reaped, not a zombie: the process entry is gone.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "sluice serve (pid {pid}) outlived the failed test"
    );
}

/// The README's test command (what CI runs) also runs the guest crates' own
/// tests: the SDK and the routing tables are tested natively, not only as
/// components.
#[test]
fn the_test_command_runs_the_guest_crates_tests() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = std::fs::read_to_string(repo.join("scripts/test")).unwrap();
    let runs_guest_tests = script.lines().any(|l| {
        let mut words = l.split_whitespace();
        words.next() == Some("plugins/build.sh") && words.any(|w| w == "--test")
    });
    assert!(runs_guest_tests, "scripts/test:\n{script}");
    let ci = std::fs::read_to_string(repo.join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == "scripts/test"),
        ".ci/run calls the README's test command:\n{ci}"
    );
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    assert!(
        readme.contains("```sh\nscripts/test\n```"),
        "README names it"
    );
}
