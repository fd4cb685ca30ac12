//! An idle gateway sleeps: with nothing to do, `sluice serve` wakes only for
//! its timers (the workers' poll, metrics upkeep), not in a loop of its own.
//!
//! Counted in wake-ups (context switches of all its threads), not CPU time,
//! so the check holds on a loaded machine: a 1 ms ticker alone would make
//! thousands in the window, the timers a few dozen.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use crate::support::{Env, ServeChild, client, post};

/// Context switches, voluntary and not, summed over the process's threads.
fn switches(pid: u32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let status =
            std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(rest) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += rest.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gateway_wakes_only_for_its_timers() {
    let env = Env::new("");
    let server = ServeChild::spawn(&env.config_path);
    // One event through intake and the router, so every part has started.
    let signed = env
        .signer("github")
        .sign("ping", &Bytes::from_static(br#"{"zen":"idle"}"#))
        .unwrap();
    let (s, b) = post(
        &client(),
        &format!("{}/hooks/github", server.base),
        &signed.headers,
        signed.body.clone(),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let window = Duration::from_secs(5);
    let (start, at) = (switches(server.pid()), Instant::now());
    tokio::time::sleep(window).await;
    let woke = switches(server.pid()) - start;
    let secs = at.elapsed().as_secs_f64();
    // Timers: 2 workers polling at 1/s, metrics upkeep at 1/s, tokio's own
    // housekeeping; a generous 40 a second over them all.
    assert!(
        (woke as f64) < 40.0 * secs,
        "an idle sluice serve switched {woke} times in {secs:.1} s"
    );
}
