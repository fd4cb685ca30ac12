//! Rule call latency on real corpus events, for a rule that reads three
//! fields (kind, action, `/repository/full_name`) and returns one route:
//!
//! - `native`: the same logic as a Rust function in the host (the baseline),
//! - `rhai`: `rules/bench/three-fields.rhai`,
//! - `wasm-reused`: the `bench-three-fields` component, one instance kept
//!   across calls (what a host without per-event isolation would pay),
//! - `wasm-fresh`: the same component with a fresh store and instance per
//!   event (what sluice does).
//!
//! Every variant goes through `Rule::classify` (or the reused instance) with
//! the payload already parsed, as the router shares one parse among all rules.
//! After criterion's report, a summary prints p50/p99 per call and the ratio
//! of each p50 to the native one, all measured in this run.
//!
//! `cargo bench --bench rules` (needs `plugins/build.sh` first);
//! `cargo bench --bench rules -- none` prints only the summary.
//! `SLUICE_PROFILE_FRESH=1` instead loops fresh-instance calls for 5 s, for
//! `perf record`.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use sluice::event::{Event, ParsedEvent, Provider};
use sluice::rules::bench::{self, Percentiles};
use sluice::rules::config::RulesConfig;
use sluice::rules::manifest::Manifest;
use sluice::rules::wasm::{ReusedInstance, WasmEngine};
use sluice::rules::{Rule, RuleCode};

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
            ev.payload(); // parsed once per event, shared by every rule
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

fn reused(rule: &Rule) -> ReusedInstance<'_> {
    let RuleCode::Wasm(w) = rule.code() else {
        unreachable!()
    };
    w.reused_instance().unwrap_or_else(|e| panic!("{e}"))
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
    let native = bench::time_native(events, n, Duration::ZERO);
    let rhai = bench::time_rule(&rules.rhai, events, n, Duration::ZERO).fresh;
    let mut inst = reused(&rules.wasm);
    let reused = bench::percentiles(|i| drop(black_box(inst.classify(ev(i)))), n);
    let fresh = bench::percentiles(|i| drop(black_box(rules.wasm.classify(ev(i)))), n / 4);
    println!(
        "\nrule reading three fields, one route; {} GitHub corpus events; per call:",
        events.len()
    );
    println!(
        "{:<28} {:>9} {:>9} {:>12} {:>8}",
        "variant", "p50 µs", "p99 µs", "p50/native", "target"
    );
    for (
        name,
        Percentiles {
            p50_us: p50,
            p99_us: p99,
        },
        target,
    ) in [
        ("native Rust fn (baseline)", native, None),
        ("rhai", rhai, Some(5.0)),
        ("Rust guest, reused instance", reused, Some(3.0)),
        ("Rust guest, fresh instance", fresh, Some(15.0)),
    ] {
        let ratio = p50 / native.p50_us;
        // Targets are p50 in µs, as docs/rules.md states them.
        let target = match target {
            Some(t) => format!("{}{t}", if p50 <= t { "≤" } else { "> " }),
            None => String::new(),
        };
        println!("{name:<28} {p50:>9.2} {p99:>9.2} {ratio:>11.1}x {target:>8}");
    }
}

fn main() {
    let engine = WasmEngine::new(Some(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/rule-cache"),
    ))
    .expect("wasm engine");
    let rules = rules(&engine);
    let events = events();
    if std::env::var_os("SLUICE_PROFILE_FRESH").is_some() {
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(5) {
            i += 1;
            black_box(rules.wasm.classify(&events[i % events.len()])).ok();
        }
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &rules, &events);
    c.final_summary();
    summary(&rules, &events);
}
