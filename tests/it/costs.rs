//! What rules cost the host, measured on a real `sluice serve` child: a
//! hostile answer's memory (its peak resident set, VmHWM), the epoch
//! ticker's wake-ups while nothing runs, and the events a switched-off rule
//! never saw (found again with `events ls`). The guests are hand-written WAT
//! components implementing `sluice:router/classifier@0.1.0`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use sluice::decision::{RuleFailure, RuleOutcome};
use sluice::store::EventRecord;
use sluice::store::sqlite::{SqliteStore, get_record};

use crate::support::{Env, ServeChild, client, metrics_text, post, wat_classifier};

/// Routes in the hostile answer, and the bytes of the one region every
/// route's reason points at: 2,000 × 60 KiB ≈ 120 MiB lifted into the host,
/// just under wasmtime's default hostcall fuel (128 MiB), from 200 KiB of
/// guest memory.
const HOSTILE_ROUTES: u32 = 2_000;
const REGION: u32 = 60 << 10;

/// `ok(routes([...]))`: HOSTILE_ROUTES routes (at 1024, 40 bytes each:
/// agent, workflow, priority, reason, labels), all with agent "a" (at 16)
/// and the reason at 128 KiB, REGION bytes long.
fn hostile() -> Vec<u8> {
    let body = format!(
        r#"(i32.store8 (i32.const 0) (i32.const 0))
      (i32.store8 (i32.const 4) (i32.const 0))
      (i32.store (i32.const 8) (i32.const 1024))
      (i32.store (i32.const 12) (i32.const {HOSTILE_ROUTES}))
      (i32.store8 (i32.const 16) (i32.const 97))
      (local.set $p (i32.const 1024))
      (block $done
        (loop $next
          (br_if $done (i32.ge_u (local.get $i) (i32.const {HOSTILE_ROUTES})))
          (i32.store (local.get $p) (i32.const 16))
          (i32.store offset=4 (local.get $p) (i32.const 1))
          (i32.store8 offset=8 (local.get $p) (i32.const 0))
          (i32.store8 offset=20 (local.get $p) (i32.const 2))
          (i32.store offset=24 (local.get $p) (i32.const 131072))
          (i32.store offset=28 (local.get $p) (i32.const {REGION}))
          (i32.store offset=32 (local.get $p) (i32.const 0))
          (i32.store offset=36 (local.get $p) (i32.const 0))
          (local.set $p (i32.add (local.get $p) (i32.const 40)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next)))
      (i32.const 0)"#
    );
    wat_classifier("", 4, &body)
}

/// A guest that never answers.
fn looping() -> Vec<u8> {
    wat_classifier("", 1, "(loop $spin (br $spin)) (i32.const 0)")
}

/// One field of /proc/PID/status (or a task's), as a number (kB for sizes).
fn status_field(status: &Path, field: &str) -> u64 {
    let text = std::fs::read_to_string(status).expect("read /proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {}", status.display()))
}

fn peak_rss_kib(pid: u32) -> u64 {
    status_field(Path::new(&format!("/proc/{pid}/status")), "VmHWM")
}

/// Writes a rule manifest and its component into the env's rules directory.
fn install_rule(env: &Env, name: &str, wasm: &[u8], limits: &str) {
    let dir = env.dir.path().join("rules");
    std::fs::write(dir.join(format!("{name}.wasm")), wasm).unwrap();
    std::fs::write(
        dir.join(format!("{name}.toml")),
        format!("name = \"{name}\"\ncomponent = \"{name}.wasm\"\n{limits}\n"),
    )
    .unwrap();
    env.approve(name, crate::support::APPROVE_ALL);
}

/// Posts a signed GitHub `issues` event with a distinct body; its status and id.
async fn post_issue(env: &Env, base: &str, n: usize) -> (StatusCode, Option<String>) {
    let body = format!(r#"{{"action":"opened","issue":{{"number":{n}}}}}"#);
    let signed = env
        .signer("github")
        .sign("issues", &bytes::Bytes::from(body))
        .unwrap();
    let (status, json) = tokio::time::timeout(
        Duration::from_secs(10),
        post(
            &client(),
            &format!("{base}/hooks/github"),
            &signed.headers,
            signed.body.clone(),
        ),
    )
    .await
    .expect("intake answers within 10 s");
    (status, json["id"].as_str().map(str::to_owned))
}

/// Waits (generously) until the event has a decision, and returns it.
async fn decided(env: &Env, id: &str) -> EventRecord {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if env.db().exists()
            && let Ok(ro) = SqliteStore::open_read_only(&env.db())
            && let Ok(Some(rec)) = get_record(&ro, id)
            && rec.decision.is_some()
        {
            return rec;
        }
        assert!(Instant::now() < deadline, "{id} was never routed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rule_failure<'a>(rec: &'a EventRecord, rule: &str) -> &'a RuleFailure {
    let d = rec.decision.as_ref().expect("decided");
    match d.rules.iter().find(|r| r.rule == rule).map(|r| &r.outcome) {
        Some(RuleOutcome::Failed(f)) => f,
        other => panic!("{rule} did not fail: {other:?} in {d:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_answer_costs_the_host_at_most_the_output_limits() {
    let env = Env::new("");
    install_rule(&env, "hostile", &hostile(), "");
    let server = ServeChild::spawn(&env.config_path);
    // The rule set is loaded and the store takes writes: the baseline.
    let ready = client()
        .request(
            http::Request::get(format!("{}/readyz", server.base))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .expect("readyz answers");
    assert_eq!(ready.status(), StatusCode::OK);
    let baseline = peak_rss_kib(server.pid());

    // Each answer would lift 2,000 × 60 KiB; intake keeps answering meanwhile.
    let mut ids = Vec::new();
    for n in 1..=8 {
        let (status, id) = post_issue(&env, &server.base, n).await;
        assert_eq!(status, StatusCode::ACCEPTED, "event {n}");
        ids.push(id.expect("an id"));
    }
    let mut records = Vec::new();
    for id in &ids {
        records.push(decided(&env, id).await);
    }
    // Each of the two router workers copies at most the fuel per call, plus
    // the guest's 4 pages; 16 MiB covers allocator arenas and the store.
    // Without the fuel cap, each call alone lifted ~120 MiB.
    let fuel_kib = (sluice::rules::wasm::hostcall_fuel() / 1024) as u64;
    let bound = baseline + 2 * (fuel_kib + 256) + 16 * 1024;
    let peak = peak_rss_kib(server.pid());
    eprintln!("peak RSS {peak} KiB, baseline {baseline} KiB, bound {bound} KiB");
    assert!(
        peak <= bound,
        "peak RSS {peak} KiB over the bound {bound} KiB (baseline {baseline} KiB, fuel {fuel_kib} KiB)"
    );
    for rec in &records {
        match rule_failure(rec, "hostile") {
            RuleFailure::Output(m) => assert!(m.contains("bytes"), "{m}"),
            other => panic!("expected an output-limit failure, got {other:?}"),
        }
    }
    // The failures were the answers' (not counted by the breaker): every
    // event ran the rule.
    let rec = decided(&env, ids.last().unwrap()).await;
    assert!(!matches!(
        rule_failure(&rec, "hostile"),
        RuleFailure::Disabled(_)
    ));
}

/// The voluntary context switches of the `sluice-epoch` thread of `pid`.
fn ticker_wakeups(pid: u32) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == "sluice-epoch") {
            return status_field(&dir.join("status"), "voluntary_ctxt_switches");
        }
    }
    panic!("no sluice-epoch thread in {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_ticks_only_while_a_guest_runs() {
    let env = Env::new("");
    install_rule(&env, "spin", &looping(), "[limits]\ntimeout_ms = 300");
    let server = ServeChild::spawn(&env.config_path);
    // Instances made ahead of time run guest code (start functions) under
    // the ticker too, and it lingers briefly after: let the rule's ready
    // instances be made, and the linger pass, before calling it idle.
    let settle = || async {
        let ready = "sluice_rule_ready_instances{rule=\"spin\"} 2";
        let deadline = Instant::now() + Duration::from_secs(20);
        while !metrics_text(&client(), &server.base).await.contains(ready) {
            assert!(Instant::now() < deadline, "no ready instances of spin");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    settle().await;
    let idle = |what: &'static str| {
        let before = ticker_wakeups(server.pid());
        // A wide window: a 1 ms ticker would wake ~2,000 times in it.
        std::thread::sleep(Duration::from_secs(2));
        let after = ticker_wakeups(server.pid());
        assert!(
            after - before <= 2,
            "{what}: the epoch ticker woke {} times in 2 s with no guest running",
            after - before
        );
    };
    idle("before any event");

    // A looping guest is still interrupted at its deadline.
    let before = ticker_wakeups(server.pid());
    let (status, id) = post_issue(&env, &server.base, 1).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let rec = decided(&env, &id.unwrap()).await;
    assert!(
        matches!(rule_failure(&rec, "spin"), RuleFailure::Timeout(_)),
        "{rec:?}"
    );
    let ran = ticker_wakeups(server.pid()) - before;
    assert!(
        ran >= 100,
        "the ticker ran {ran} ticks for a 300 ms deadline"
    );
    settle().await;
    idle("after the call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_ls_finds_the_events_a_switched_off_rule_never_saw() {
    let env = Env::new("[rules.breaker]\nfailures = 1\ncooldown_ms = 600000");
    install_rule(&env, "trapper", &wat_classifier("", 1, "(unreachable)"), "");
    let server = ServeChild::spawn(&env.config_path);
    let mut ids = Vec::new();
    for n in 0..3 {
        let (status, id) = post_issue(&env, &server.base, n).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let id = id.unwrap();
        decided(&env, &id).await;
        ids.push(id);
    }
    // The first event ran the rule (a trap, which switched it off); the
    // next two met the open breaker.
    assert!(matches!(
        rule_failure(&decided(&env, &ids[0]).await, "trapper"),
        RuleFailure::Trap(_)
    ));
    let ls = |rule: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "events",
                "ls",
                "--json",
                "--rule-disabled",
                rule,
                "--config",
            ])
            .arg(&env.config_path)
            .env_remove("SLUICE_CONFIG")
            .output()
            .expect("run sluice events ls");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ls("trapper"), vec![ids[2].clone(), ids[1].clone()]);
    assert!(ls("other").is_empty());
}
