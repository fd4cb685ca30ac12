//! What a rule's logging may cost the host: lines per call and per rule are
//! capped for scripts (`print`, `debug`) and components (the `log` import)
//! alike, dropped lines are counted in a metric and reported in one warning,
//! and the event keeps its routes.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metrics_exporter_prometheus::PrometheusBuilder;
use sluice::decision::{Decision, Priority};
use sluice::rules::log::{BURST, LINES_PER_SECOND, MAX_LINES_PER_CALL};
use sluice::rules::{Rule, RuleSet};

use crate::rules::{agents, issues_opened, rhai, wasm};

/// A writer into a shared buffer, for the test's own subscriber.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What running `f` on this thread logged and counted.
struct Captured {
    /// Every log line, as JSON.
    lines: Vec<serde_json::Value>,
    /// The Prometheus text of the metrics recorded meanwhile.
    metrics: String,
}

impl Captured {
    /// Lines a rule wrote (not the host's own lines about it).
    fn written_by(&self, rule: &str, marker: &str) -> usize {
        self.lines
            .iter()
            .filter(|l| {
                l["fields"]["rule"] == rule
                    && l["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(marker))
            })
            .count()
    }

    /// The host's warnings that lines of `rule` were dropped, with their counts.
    fn drop_reports(&self, rule: &str) -> Vec<u64> {
        self.lines
            .iter()
            .filter(|l| l["fields"]["rule"] == rule && l["level"] == "WARN")
            .filter_map(|l| l["fields"]["dropped"].as_u64())
            .collect()
    }

    /// The value of `sluice_rule_log_lines_dropped_total` for `rule`.
    fn dropped_metric(&self, rule: &str) -> u64 {
        let series = format!("sluice_rule_log_lines_dropped_total{{rule=\"{rule}\"}} ");
        self.metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0)
    }
}

fn capture<T>(f: impl FnOnce() -> T) -> (T, Captured) {
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let out = metrics::with_local_recorder(&recorder, || {
        tracing::subscriber::with_default(subscriber, f)
    });
    let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (
        out,
        Captured {
            lines,
            metrics: handle.render(),
        },
    )
}

/// Routes `calls` events through `rules`; checks each keeps its route.
fn run(rules: &RuleSet, calls: usize, agent: &'static str) -> Captured {
    let (decisions, captured) = capture(|| {
        (0..calls)
            .map(|_| rules.route(&issues_opened()))
            .collect::<Vec<Decision>>()
    });
    for d in &decisions {
        assert_eq!(agents(d), vec![(agent, Priority::Medium)], "{d:?}");
    }
    captured
}

/// The most lines a rule may write in `elapsed` seconds.
fn rate_bound(elapsed: f64) -> usize {
    BURST as usize + (f64::from(LINES_PER_SECOND) * elapsed).ceil() as usize
}

/// Checks the caps on a rule that tries `per_call` lines in every call,
/// `marker` being in each line it writes.
fn check_capped(rule: Rule, per_call: usize, marker: &str, agent: &'static str) {
    let name = rule.name().to_owned();
    let rules = crate::rules::set(vec![rule]);
    let started = Instant::now();

    // One call: only its first MAX_LINES_PER_CALL lines get through, and one
    // warning says how many did not.
    let one = run(&rules, 1, agent);
    assert_eq!(one.written_by(&name, marker), MAX_LINES_PER_CALL as usize);
    let dropped = (per_call - MAX_LINES_PER_CALL as usize) as u64;
    assert_eq!(
        one.drop_reports(&name),
        vec![dropped],
        "one warning with the count"
    );
    assert_eq!(one.dropped_metric(&name), dropped);

    // Many calls, each within the per-call cap's reach: the rule's bucket
    // holds the total to its burst plus its rate.
    let calls = 20;
    let many = run(&rules, calls, agent);
    let elapsed = started.elapsed().as_secs_f64();
    let written = one.written_by(&name, marker) + many.written_by(&name, marker);
    assert!(
        (calls + 1) * (MAX_LINES_PER_CALL as usize) > rate_bound(elapsed),
        "the run must ask for more than the rate allows to prove it ({elapsed:.2} s)"
    );
    assert!(
        written <= rate_bound(elapsed),
        "{written} lines in {elapsed:.2} s (at most {} allowed)",
        rate_bound(elapsed)
    );
    let later = many.written_by(&name, marker);
    assert_eq!(
        many.dropped_metric(&name) as usize,
        calls * per_call - later,
        "every dropped line is counted"
    );
    // The reports are limited too: the first call above already reported,
    // so this short run adds no warning.
    assert_eq!(many.drop_reports(&name), Vec::<u64>::new());
}

#[test]
fn rhai_print_and_debug_are_capped_per_call_and_per_rule() {
    let per_call = 1000;
    let rule = rhai(
        "printer",
        &format!(
            "fn classify(event) {{
                for i in 0..{per_call} {{
                    if i % 2 == 0 {{ print(`flood ${{i}}`); }} else {{ debug(`flood ${{i}}`); }}
                }}
                [#{{ agent: \"printer\" }}]
            }}"
        ),
        // A generous deadline: this is about logging, not about time.
        "[limits]\ntimeout_ms = 5000",
    )
    .unwrap();
    check_capped(rule, per_call, "flood", "printer");
}

#[test]
fn component_log_lines_are_capped_per_call_and_per_rule() {
    // A generous deadline: this is about logging, not about time.
    let rule = wasm(
        "logflood",
        "[config]\nlines = \"300\"\n[limits]\ntimeout_ms = 5000",
    );
    check_capped(rule, 300, "flood line", "logflood");
}
