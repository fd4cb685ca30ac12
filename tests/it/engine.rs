//! The WebAssembly engine as a running `sluice serve` sees it: built only when
//! a component rule loads, and able to start where the instance pool cannot
//! be reserved (`ulimit -v`), falling back to on-demand allocation.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Env, ServeChild, corpus, send_accepted, sluice};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The names of the threads of process `pid`.
fn threads(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let comm = task.expect("task").path().join("comm");
        if let Ok(name) = std::fs::read_to_string(comm) {
            names.push(name.trim().to_owned());
        }
    }
    names
}

/// An env whose rules directory holds the shipped GitHub component rule.
fn with_component_rule() -> Env {
    let env = Env::new("\n[rules]\ndir = \"rules\"\n");
    env.approve("github-router", crate::support::APPROVE_ALL);
    env.declare_agents(&crate::support::SHIPPED_AGENTS);
    let rules = env.dir.path().join("rules");
    for file in ["github-router.toml", "github-router.wasm"] {
        std::fs::copy(repo().join("rules").join(file), rules.join(file)).expect(file);
    }
    let vectors = rules.join("tests");
    std::fs::create_dir(&vectors).unwrap();
    for entry in std::fs::read_dir(repo().join("rules/tests")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, vectors.join(path.file_name().unwrap())).unwrap();
    }
    env
}

/// Sends the corpus's `issues opened` to the server and waits (at most 60 s)
/// for its decision; returns the decision's routes.
fn routes_of_one_event(env: &Env, base: &str) -> serde_json::Value {
    let config = env.config_path.to_str().unwrap();
    let payload = corpus().join("github/issues/opened.payload.json");
    let url = format!("{base}/hooks/github");
    send_accepted(config, &url, "github", None, &payload);
    let ls = sluice(&["events", "ls", "--config", config, "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&ls.stdout).unwrap();
    let id = rows[0]["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let show = sluice(&["events", "show", "--config", config, &id, "--json"]);
        let doc: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
        if doc["event"]["status"] == "routed" {
            return doc["decision"]["routes"].clone();
        }
        assert!(Instant::now() < deadline, "not routed within 60 s: {doc}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `text` without ANSI colour sequences.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The serve log (stderr, redirected to a file, without colours) once it
/// contains `needle`.
fn wait_for_log(log: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = plain(&std::fs::read_to_string(log).unwrap_or_default());
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log within 60 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_starts_and_routes_where_the_instance_pool_cannot_be_reserved() {
    let env = with_component_rule();
    let log = env.dir.path().join("serve.log");
    // 4 GB of address space: far less than the pool reserves (about 1 TiB
    // of virtual memory for the default 128 instances), plenty for the rest.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -v 4000000 && exec \"$0\" serve --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .arg(&env.config_path)
        .env_remove("SLUICE_CONFIG")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    let server = ServeChild::spawn_command(cmd);
    let routes = routes_of_one_event(&env, &server.base);
    assert!(
        routes.as_array().is_some_and(|r| !r.is_empty()),
        "the component rule routed nothing: {routes}"
    );
    let text = wait_for_log(&log, "wasm engine built");
    assert!(
        text.contains("cannot reserve the wasm instance pool")
            && text.contains("allocator=\"on-demand\""),
        "{text}"
    );
    // The engine runs (its epoch ticker is the engine's own thread).
    assert!(threads(server.pid()).iter().any(|t| t == "sluice-epoch"));
    drop(server);

    // Without the limit the same server uses the pool, and says so.
    let log = env.dir.path().join("serve-unlimited.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["serve", "--config"])
        .arg(&env.config_path)
        .env_remove("SLUICE_CONFIG")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    let server = ServeChild::spawn_command(cmd);
    let text = wait_for_log(&log, "wasm engine built");
    assert!(text.contains("allocator=\"pooling\""), "{text}");
    drop(server);
}

#[test]
fn check_starts_where_the_instance_pool_cannot_be_reserved() {
    let env = with_component_rule();
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4000000 && exec \"$0\" check --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .arg(&env.config_path)
        .env_remove("SLUICE_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("rule github-router"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_engine_runs_while_only_scripts_are_loaded() {
    let env = Env::new("\n[rules]\ndir = \"rules\"\n");
    env.approve("three-fields", crate::support::APPROVE_ALL);
    let rules = env.dir.path().join("rules");
    std::fs::copy(
        repo().join("rules/bench/three-fields.rhai"),
        rules.join("three-fields.rhai"),
    )
    .unwrap();
    std::fs::write(
        rules.join("three-fields.toml"),
        "name = \"three-fields\"\nscript = \"three-fields.rhai\"\nproviders = [\"github\"]\n",
    )
    .unwrap();
    let server = ServeChild::spawn(&env.config_path);
    // The rhai rule serves (the event is routed by it) ...
    let routes = routes_of_one_event(&env, &server.base);
    assert_eq!(routes[0]["agent"], "bench", "{routes}");
    // ... and no engine was built for it: no epoch ticker, no cache worker.
    let names = threads(server.pid());
    assert!(!names.is_empty());
    assert!(
        !names.iter().any(|t| t == "sluice-epoch"),
        "an engine was built with no component rule: threads {names:?}"
    );
    assert!(
        !env.dir.path().join("data/cache/wasm").exists(),
        "the compile cache was opened with no component rule"
    );
}

#[test]
fn the_cache_limits_are_read_from_the_config_and_checked_by_name() {
    let env = Env::new("\n[rules.cache]\nmax_size_mb = 64\ncleanup_interval_s = 60\n");
    let cache = env.config().rules.cache;
    assert_eq!((cache.max_size_mb, cache.cleanup_interval_s), (64, 60));
    let env = Env::new("\n[rules.cache]\nmax_size_mb = 0\n");
    let out = sluice(&["check", "--config", env.config_path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("rules.cache.max_size_mb"),
        "{err}"
    );
}
