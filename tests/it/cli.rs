//! The binary as a user runs it: `check` on good and broken configs, and
//! `send` → `events ls` / `events show` against a running `serve`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Env, corpus};

fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env_remove("SLUICE_CONFIG")
        .output()
        .expect("run sluice")
}

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config", &path])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let base = loop {
        assert!(Instant::now() < deadline);
        let line = lines.next().unwrap().unwrap();
        if let Some(a) = line.strip_prefix("sluice listening on ") {
            break a.to_string();
        }
    };
    let payload = corpus().join("github/issues/opened.payload.json");
    let url = format!("{base}/hooks/github");
    let sent = sluice(&[
        "send",
        "--config",
        &path,
        "--source",
        "github",
        "--url",
        &url,
        payload.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&sent.stdout).into_owned();
    assert!(
        sent.status.success() && out.starts_with("202"),
        "{out} {}",
        String::from_utf8_lossy(&sent.stderr)
    );
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
    child.kill().unwrap();
    child.wait().unwrap();
}
