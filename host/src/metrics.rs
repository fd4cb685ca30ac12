//! Prometheus metrics: one recorder for the process, rendered at `GET /metrics`.
//!
//! Labels are only ever configured names (sources, rules) or fixed outcome
//! classes, never request data, so a client cannot blow up cardinality.
//!
//! Histogram samples sit in the recorder until upkeep folds them into their
//! buckets. Upkeep runs on a timer of its own, not only when `/metrics` is
//! scraped, so memory stays flat on a gateway nobody scrapes.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often upkeep folds histogram samples into buckets. One wake-up a
/// second is nothing next to the samples a busy second would otherwise keep.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Timer-driven upkeep runs so far, for tests and debugging.
static UPKEEPS: AtomicU64 = AtomicU64::new(0);

/// Latency buckets in seconds, from 10 µs (a rule call) to 10 s.
const BUCKETS: [f64; 13] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.1, 1.0, 10.0,
];

/// Installs the recorder on first use and returns its handle.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
            .expect("buckets are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding program's);
        // then this one stays empty and /metrics shows only the queue depth.
        let _ = metrics::set_global_recorder(recorder);
        let upkeep = handle.clone();
        let started = std::thread::Builder::new()
            .name("sluice-metrics".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                    UPKEEPS.fetch_add(1, Ordering::Relaxed);
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "no metrics upkeep thread: histograms are folded only when /metrics is scraped");
        }
        handle
    })
}

/// How many times the timer has run upkeep since the recorder was installed.
pub fn upkeep_runs() -> u64 {
    UPKEEPS.load(Ordering::Relaxed)
}

/// The text exposition, with the current queue depth.
pub fn render(queue_depth: Option<u64>) -> String {
    let h = handle();
    h.run_upkeep();
    if let Some(depth) = queue_depth {
        metrics::gauge!("sluice_queue_depth").set(depth as f64);
    }
    h.render()
}
