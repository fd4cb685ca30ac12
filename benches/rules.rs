//! Rule call latency on real corpus events, for a rule that reads three
//! fields (kind, action, `/repository/full_name`) and returns one route:
//!
//! - `native`: the same logic as a Rust function in the host (the baseline),
//! - `rhai`: `rules/bench/three-fields.rhai`,
//! - `wasm-reused`: the `bench-three-fields` component, one instance kept
//!   across calls (what a host without per-event isolation would pay),
//! - `wasm-fresh`: the same component with a fresh store and instance per
//!   event (what sluice does), taken from the rule's ready pool
//!   (`rules.pool.ready_per_rule`, made and torn down on the filler thread),
//! - `wasm-fresh-inline`: a fresh instance per event made and dropped on the
//!   calling thread (the ready pool off).
//!
//! Back to back, the filler cannot keep up with the calls (it does more work
//! per event than the call), so the summary also runs the fresh variants at a
//! steady 100 events/s, and reports beside each latency the CPU per event of
//! every thread of the process (the filler's instantiation and teardown, the
//! epoch ticker), so work moved off the event path is still counted.
//!
//! Every variant goes through `Rule::classify` (or the reused instance) with
//! the payload already indexed, as the router does once per event before the
//! rules run. After criterion's report, a summary prints p50/p99 per call and
//! the ratio of each p50 to the native one, all measured in this run.
//!
//! Two more groups time what reading the payload costs, on the GitHub
//! `issues` `opened` payload as GitHub sends it (compact, 11.6 KB), each
//! against parsing the whole payload into a `serde_json::Value` first (what
//! every event paid before field reads went through the index):
//!
//! - `payload-three-fields`: a fresh event, then `/action`, `/issue/labels`
//!   and `/repository/full_name` read with `ParsedEvent::get`: after the
//!   whole parse (`whole-parse`), through the index built on the first read
//!   (`index`), and on an event already indexed (`reads-only`: what each
//!   further rule on the same event pays);
//! - `route-issues-event`: the shipped rule set (`sluice.toml`'s `[rules]`:
//!   `rules/github-router.wasm`, `rules/gitlab.rhai`) routing a fresh event
//!   with `RuleSet::route`, with the payload parsed whole first or not.
//!
//! The summary prints their p50 and the ratio of each to the whole parse.
//!
//! `cargo bench --bench rules` (needs `plugins/build.sh` first);
//! `cargo bench --bench rules -- none` prints only the summary.
//! `SLUICE_PROFILE_FRESH=ready|inline` instead loops fresh-instance calls
//! for 5 s (from the ready pool, or made inline), for `perf record`;
//! `SLUICE_PROFILE_PACE_US=N` spaces them N µs apart.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use sluice::config::Config;
use sluice::event::{Event, ParsedEvent, Provider};
use sluice::rules::bench;
use sluice::rules::config::RulesConfig;
use sluice::rules::manifest::Manifest;
use sluice::rules::wasm::{ReusedInstance, WasmEngine, WasmRule};
use sluice::rules::{Rule, RuleCode, RuleSet};

const EVENTS: [(&str, &str); 6] = [
    ("issues", "issues/opened.payload.json"),
    ("issues", "issues/labeled.payload.json"),
    ("pull_request", "pull_request/opened.payload.json"),
    ("pull_request", "pull_request/closed.payload.json"),
    ("issue_comment", "issue_comment/created.payload.json"),
    ("workflow_run", "workflow_run/completed.payload.json"),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn events() -> Vec<Arc<ParsedEvent>> {
    EVENTS
        .iter()
        .map(|(kind, file)| {
            let path = repo().join("../shared/corpus/github").join(file);
            let body = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let ev = Arc::new(ParsedEvent::new(Event::dry_run(
                "github",
                Provider::Github,
                kind,
                None,
                body.into(),
            )));
            ev.scan(); // indexed once per event, shared by every rule
            ev
        })
        .collect()
}

fn load(engine: &WasmEngine, path: PathBuf, text: &str) -> Rule {
    let manifest = Manifest::parse(&path, text).unwrap_or_else(|e| panic!("{e}"));
    Rule::from_manifest(&manifest, &path, text, &RulesConfig::default(), engine)
        .unwrap_or_else(|e| panic!("{e}"))
}

struct Rules {
    native: Rule,
    rhai: Rule,
    wasm: Rule,
}

fn rules(engine: &WasmEngine) -> Rules {
    let component = repo().join("plugins/out/bench-three-fields.wasm");
    assert!(
        component.is_file(),
        "{} is missing: run plugins/build.sh first",
        component.display()
    );
    let wasm = load(
        engine,
        repo().join("bench-three-fields.toml"),
        &format!(
            "name = \"bench\"\ncomponent = {:?}\n[grants]\nwasi = true",
            component.display().to_string()
        ),
    );
    let rhai_manifest = repo().join("rules/bench/three-fields.toml");
    let rhai = load(
        engine,
        rhai_manifest.clone(),
        &std::fs::read_to_string(&rhai_manifest).unwrap(),
    );
    Rules {
        native: bench::native_rule(),
        rhai,
        wasm,
    }
}

fn wasm(rule: &Rule) -> &WasmRule {
    let RuleCode::Wasm(w) = rule.code() else {
        unreachable!()
    };
    w
}

fn reused(rule: &Rule) -> ReusedInstance<'_> {
    wasm(rule)
        .reused_instance()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn bench(c: &mut Criterion, rules: &Rules, events: &[Arc<ParsedEvent>]) {
    // Every variant answers the same on every event, or comparing them means nothing.
    for ev in events {
        let want = rules.native.classify(ev);
        assert_eq!(
            rules.rhai.classify(ev),
            want,
            "rhai differs on {}",
            ev.event.kind
        );
        assert_eq!(
            rules.wasm.classify(ev),
            want,
            "wasm differs on {}",
            ev.event.kind
        );
    }
    let mut group = c.benchmark_group("rule-three-fields");
    for (name, rule) in [
        ("native", &rules.native),
        ("rhai", &rules.rhai),
        ("wasm-fresh", &rules.wasm),
    ] {
        group.bench_function(name, |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % events.len();
                black_box(rule.classify(black_box(&events[i])))
            })
        });
    }
    let inline = wasm(&rules.wasm).with_ready(0);
    group.bench_function("wasm-fresh-inline", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % events.len();
            black_box(inline.classify(black_box(&events[i])))
        })
    });
    let mut inst = reused(&rules.wasm);
    group.bench_function("wasm-reused", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % events.len();
            black_box(inst.classify(black_box(&events[i])))
        })
    });
    group.finish();
}

fn summary(rules: &Rules, events: &[Arc<ParsedEvent>]) {
    let n = 20_000;
    let ev = |i: usize| &events[i % events.len()];
    let b2b = Duration::ZERO;
    let native = bench::time_native(events, n, b2b);
    let rhai = bench::paced(|i| drop(black_box(rules.rhai.classify(ev(i)))), n, b2b);
    let mut inst = reused(&rules.wasm);
    let reused = bench::paced(|i| drop(black_box(inst.classify(ev(i)))), n, b2b);
    let inline = wasm(&rules.wasm).with_ready(0);
    let fresh_inline = bench::paced(|i| drop(black_box(inline.classify(ev(i)))), n / 4, b2b);
    let served = || wasm(&rules.wasm).instances_served();
    let before = served();
    let fresh_ready = bench::paced(|i| drop(black_box(rules.wasm.classify(ev(i)))), n / 4, b2b);
    let ready_b2b = served();
    // The issue's steady pace: 100 events/s, 1,000 events per variant.
    let sleep = Duration::from_millis(10);
    // Under `cargo test` (no `--bench`), a few, so the test run stays short.
    let paced = if std::env::args().any(|a| a == "--bench") {
        1_000
    } else {
        20
    };
    let reused_paced = bench::paced(|i| drop(black_box(inst.classify(ev(i)))), paced, sleep);
    let inline_paced = bench::paced(|i| drop(black_box(inline.classify(ev(i)))), paced, sleep);
    let ready_paced = bench::paced(
        |i| drop(black_box(rules.wasm.classify(ev(i)))),
        paced,
        sleep,
    );
    let ready_sleep = served();
    let share = |a: sluice::rules::wasm::InstancesServed,
                 b: sluice::rules::wasm::InstancesServed| {
        let ready = b.ready - a.ready;
        100.0 * ready as f64 / (ready + b.inline - a.inline).max(1) as f64
    };
    println!(
        "\nrule reading three fields, one route; {} GitHub corpus events; per call:",
        events.len()
    );
    println!(
        "{:<40} {:>8} {:>8} {:>11} {:>11} {:>8} {:>8}",
        "variant", "p50 µs", "p99 µs", "p50/native", "p50/reused", "CPU µs", "target"
    );
    let rows = [
        ("native Rust fn (baseline)", &native, &reused, None),
        ("rhai", &rhai, &reused, Some(5.0)),
        ("Rust guest, reused instance", &reused, &reused, Some(3.0)),
        ("Rust guest, fresh, inline", &fresh_inline, &reused, None),
        (
            "Rust guest, fresh, ready pool",
            &fresh_ready,
            &reused,
            Some(15.0),
        ),
        (
            "at 100 events/s: reused instance",
            &reused_paced,
            &reused_paced,
            None,
        ),
        (
            "at 100 events/s: fresh, inline",
            &inline_paced,
            &reused_paced,
            None,
        ),
        (
            "at 100 events/s: fresh, ready pool",
            &ready_paced,
            &reused_paced,
            None,
        ),
    ];
    for (name, m, base, target) in rows {
        // Targets are p50 in µs, as docs/rules.md states them.
        let target = match target {
            Some(t) => format!("{}{t}", if m.p50_us <= t { "≤" } else { "> " }),
            None => String::new(),
        };
        println!(
            "{name:<40} {:>8.2} {:>8.2} {:>10.1}x {:>10.2}x {:>8.2} {target:>8}",
            m.p50_us,
            m.p99_us,
            m.ratio(&native),
            m.ratio(base),
            m.cpu_us
        );
    }
    println!(
        "(p50/reused: against the reused instance at the same pace; aim for the \
         fresh instance: ≤ 3x. CPU µs: all threads of the process per call.)"
    );
    println!(
        "events served by a ready instance: back to back {:.0} %, at 100/s {:.0} %",
        share(before, ready_b2b),
        share(ready_b2b, ready_sleep),
    );
}

/// The fields a typical rule reads.
const THREE_FIELDS: [&str; 3] = ["/action", "/issue/labels", "/repository/full_name"];

/// The GitHub `issues` `opened` payload as GitHub sends it (compact) or as
/// the corpus stores it (pretty-printed).
fn issue_event(compact: bool) -> Event {
    let path = repo().join("../shared/corpus/github/issues/opened.payload.json");
    let mut body = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if compact {
        let doc: serde_json::Value = serde_json::from_slice(&body).expect("corpus JSON");
        body = serde_json::to_vec(&doc).expect("serialises");
    }
    Event::dry_run("github", Provider::Github, "issues", None, body.into())
}

fn three_fields(ev: &ParsedEvent) {
    for pointer in THREE_FIELDS {
        black_box(ev.get(black_box(pointer)));
    }
}

/// A fresh event with its payload parsed whole, as every event was before
/// field reads went through the index.
fn parsed_whole(event: &Event) -> Arc<ParsedEvent> {
    let ev = Arc::new(ParsedEvent::new(event.clone()));
    ev.payload();
    ev
}

/// The shipped rule set, loaded as `sluice serve` loads it.
fn shipped_rules(engine: &WasmEngine) -> RuleSet {
    let config = Config::load(Some(&repo().join("sluice.toml"))).unwrap_or_else(|e| panic!("{e}"));
    config.load_rules(engine).unwrap_or_else(|e| panic!("{e}"))
}

/// The payload-reading variants, by name, for criterion and the summary.
type Variant<'a> = (&'static str, Box<dyn Fn() + 'a>);

fn payload_variants<'a>(event: &'a Event, indexed: &'a ParsedEvent) -> [Variant<'a>; 3] {
    [
        (
            "whole-parse",
            Box::new(|| three_fields(&parsed_whole(event))),
        ),
        (
            "index",
            Box::new(|| three_fields(&ParsedEvent::new(event.clone()))),
        ),
        ("reads-only", Box::new(|| three_fields(indexed))),
    ]
}

fn route_variants<'a>(event: &'a Event, set: &'a RuleSet) -> [Variant<'a>; 2] {
    [
        (
            "whole-parse",
            Box::new(|| drop(black_box(set.route(&parsed_whole(event))))),
        ),
        (
            "index",
            Box::new(|| {
                drop(black_box(
                    set.route(&Arc::new(ParsedEvent::new(event.clone()))),
                ))
            }),
        ),
    ]
}

fn payload_bench(c: &mut Criterion, set: &RuleSet) {
    let event = issue_event(true);
    let indexed = ParsedEvent::new(event.clone());
    indexed.scan();
    // The index answers as the whole parse does, or timing it means nothing.
    let whole = parsed_whole(&event);
    for pointer in THREE_FIELDS {
        assert_eq!(indexed.get(pointer), whole.get(pointer), "{pointer}");
    }
    let fresh = Arc::new(ParsedEvent::new(event.clone()));
    assert_eq!(set.route(&fresh).routes, set.route(&whole).routes);
    let mut group = c.benchmark_group("payload-three-fields");
    for (name, f) in payload_variants(&event, &indexed) {
        group.bench_function(name, |b| b.iter(&f));
    }
    group.finish();
    let mut group = c.benchmark_group("route-issues-event");
    for (name, f) in route_variants(&event, set) {
        group.bench_function(name, |b| b.iter(&f));
    }
    group.finish();
}

fn payload_summary(set: &RuleSet) {
    // Under `cargo test` (no `--bench`), a few, so the test run stays short.
    let n = if std::env::args().any(|a| a == "--bench") {
        20_000
    } else {
        20
    };
    println!("\nreading the GitHub issues payload; p50 per event, in this run:");
    println!(
        "{:<52} {:>8} {:>8} {:>14}",
        "variant", "p50 µs", "p99 µs", "whole/this"
    );
    for compact in [true, false] {
        let event = issue_event(compact);
        let indexed = ParsedEvent::new(event.clone());
        indexed.scan();
        let form = if compact {
            format!("compact, {} B", event.body.len())
        } else {
            format!("pretty, {} B", event.body.len())
        };
        let rows =
            payload_variants(&event, &indexed)
                .into_iter()
                .map(|(name, f)| (format!("three fields ({form}): {name}"), f, n))
                .chain(route_variants(&event, set).into_iter().map(|(name, f)| {
                    (format!("shipped rules route it ({form}): {name}"), f, n / 4)
                }));
        let mut whole = None;
        for (name, f, n) in rows {
            let m = bench::percentiles(|_| f(), n);
            if name.ends_with("whole-parse") {
                whole = Some(m);
            }
            let ratio = whole.map(|w| w.ratio(&m)).unwrap_or(1.0);
            println!(
                "{name:<52} {:>8.2} {:>8.2} {:>13.1}x",
                m.p50_us, m.p99_us, ratio
            );
        }
    }
    println!("(whole/this: the whole-parse p50 over this one; above 1 is faster.)");
}

fn main() {
    let engine = WasmEngine::new(Some(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/rule-cache"),
    ))
    .expect("wasm engine");
    let rules = rules(&engine);
    let events = events();
    if let Some(mode) = std::env::var_os("SLUICE_PROFILE_FRESH") {
        // `inline`: the ready pool off; anything else: on. Calls spaced
        // SLUICE_PROFILE_PACE_US apart when set, else back to back.
        let pace = std::env::var("SLUICE_PROFILE_PACE_US")
            .ok()
            .and_then(|us| us.parse().ok())
            .map(Duration::from_micros);
        let inline = wasm(&rules.wasm).with_ready(0);
        let rule = if mode == "inline" {
            &inline
        } else {
            wasm(&rules.wasm)
        };
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(5) {
            i += 1;
            black_box(rule.classify(&events[i % events.len()])).ok();
            if let Some(gap) = pace {
                std::thread::sleep(gap);
            }
        }
        eprintln!("{i} calls");
        return;
    }
    let set = shipped_rules(&engine);
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &rules, &events);
    payload_bench(&mut c, &set);
    c.final_summary();
    summary(&rules, &events);
    payload_summary(&set);
}
