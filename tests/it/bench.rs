//! `sluice bench` as a user runs it (the real binary, real components built
//! from source in this repo, real payloads): a row per rule with its
//! latencies beside the native baseline as ratios, and a row per rule with
//! its size and load times. No timing is judged here (benches do that); only
//! that every figure is there and is a positive number.

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use sluice::cli::bench::{LATENCY_COLUMNS, LOAD_COLUMNS};

use crate::support::{Env, corpus, sluice};

fn text(o: &Output) -> String {
    format!(
        "{}\n--- stderr\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A rules directory with the shipped rules, the rhai bench rule and the
/// Rust bench component, and the shipped payloads in its `tests/`.
fn bench_env() -> Env {
    let env = Env::new("\n[rules]\ndir = \"rules\"\ncache_dir = \"cache\"\n");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let to = env.dir.path().join("rules");
    std::fs::create_dir_all(to.join("tests")).unwrap();
    for sub in ["", "tests"] {
        for f in std::fs::read_dir(repo.join("rules").join(sub)).unwrap() {
            let f = f.unwrap().path();
            if f.is_file() {
                std::fs::copy(&f, to.join(sub).join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    for f in ["three-fields.toml", "three-fields.rhai"] {
        let text = std::fs::read_to_string(repo.join("rules/bench").join(f)).unwrap();
        std::fs::write(to.join(f), text.replace("../tests/", "tests/")).unwrap();
    }
    let component = repo.join("plugins/out/bench-three-fields.wasm");
    assert!(component.is_file(), "run plugins/build.sh first");
    std::fs::write(
        to.join("rust.toml"),
        format!(
            "name = \"bench-three-fields-rust\"\ncomponent = {:?}\nproviders = [\"github\"]\n\
             [grants]\nwasi = true\n",
            component.display().to_string()
        ),
    )
    .unwrap();
    env
}

/// Splits a table line into its cells (columns are two or more spaces apart).
fn cells(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

const RULES: [&str; 4] = [
    "github-router",
    "gitlab",
    "bench-three-fields-rust",
    "bench-three-fields-rhai",
];

#[test]
fn bench_prints_a_row_per_rule_with_ratios_to_the_native_baseline() {
    let env = bench_env();
    let config = env.config_path.to_str().unwrap();
    let out = sluice(&["bench", "--config", config, "--calls", "30"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(stdout.contains("native baseline: "), "{stdout}");

    let head = lines
        .iter()
        .position(|l| l.starts_with("RULE") && l.contains("FRESH/NATIVE"))
        .unwrap_or_else(|| panic!("no latency table:\n{stdout}"));
    assert_eq!(cells(lines[head]), LATENCY_COLUMNS, "{stdout}");
    let rows: Vec<Vec<String>> = lines[head + 1..]
        .iter()
        .take_while(|l| !l.is_empty())
        .map(|l| cells(l))
        .collect();
    let mut names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    names.sort();
    let mut want = RULES.to_vec();
    want.sort();
    assert_eq!(names, want, "{stdout}");
    for row in &rows {
        assert_eq!(row.len(), LATENCY_COLUMNS.len(), "{row:?}\n{stdout}");
        assert_eq!(row[LATENCY_COLUMNS.len() - 1], "ok", "{row:?}");
        assert!(row[2].parse::<usize>().unwrap() > 0, "{row:?}");
        let col = |name: &str| &row[LATENCY_COLUMNS.iter().position(|c| *c == name).unwrap()];
        let mut ratios = vec!["FRESH/NATIVE"];
        if row[1] != "rhai" {
            ratios.extend(["REUSED/NATIVE", "FRESH/REUSED"]);
        }
        for name in ratios {
            let v = col(name);
            let n: f64 = v
                .strip_suffix('x')
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{name} is {v:?} in {row:?}"));
            assert!(n > 0.0, "{name} {v} in {row:?}");
        }
        let twin = row[0].starts_with("bench-three-fields");
        assert_eq!(
            col("BASELINE"),
            if twin { "twin" } else { "reference" },
            "{row:?}"
        );
    }

    let head = lines
        .iter()
        .position(|l| l.starts_with("RULE") && l.contains("COMPILE ms"))
        .unwrap_or_else(|| panic!("no load table:\n{stdout}"));
    assert_eq!(cells(lines[head]), LOAD_COLUMNS, "{stdout}");
    let rows: Vec<Vec<String>> = lines[head + 1..].iter().map(|l| cells(l)).collect();
    assert_eq!(rows.len(), RULES.len(), "{stdout}");
    for row in &rows {
        let number = |i: usize| row[i].parse::<f64>().unwrap_or_else(|_| panic!("{row:?}"));
        assert!(number(2) > 0.0 && number(3) > 0.0, "{row:?}");
        if row[1] == "rhai" {
            assert_eq!(row[4], "-", "{row:?}");
        } else {
            assert!(number(4) > 0.0, "a component loads from the cache: {row:?}");
        }
    }
}

#[test]
fn bench_json_has_positive_ratios_and_one_rule_on_request() {
    let env = bench_env();
    let config = env.config_path.to_str().unwrap();
    let out = sluice(&[
        "bench",
        "--config",
        config,
        "--calls",
        "20",
        "--rule",
        "bench-three-fields-rust",
        "--gap",
        "200us",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(report["gap_us"], 200, "{report:#}");
    let rules = report["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{report:#}");
    let r = &rules[0];
    assert_eq!(r["rule"], "bench-three-fields-rust");
    assert_eq!(r["native_twin"], true, "{r:#}");
    assert_eq!(r["failures"], 0, "{r:#}");
    // Only the GitHub payloads are for it.
    let github = std::fs::read_dir(env.dir.path().join("rules/tests"))
        .unwrap()
        .filter(|f| {
            f.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("github-")
        })
        .count();
    assert_eq!(r["events"], github, "{r:#}");
    for key in ["fresh_vs_native", "reused_vs_native", "fresh_vs_reused"] {
        assert!(r[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {r:#}");
    }
    for key in ["native", "fresh", "reused"] {
        let p = &r[key];
        assert!(
            p["p50_us"].as_f64().is_some_and(|v| v > 0.0),
            "{key}: {r:#}"
        );
        assert!(p["p99_us"].as_f64() >= p["p50_us"].as_f64(), "{key}: {r:#}");
    }
    assert!(
        r["load"]["compile_ms"].as_f64().is_some_and(|v| v > 0.0),
        "{r:#}"
    );
    assert!(
        r["load"]["cache_load_ms"].as_f64().is_some_and(|v| v > 0.0),
        "{r:#}"
    );

    let missing = sluice(&["bench", "--config", config, "--rule", "nope"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no rule named \"nope\""));
}

#[test]
fn bench_reads_payloads_in_the_repo_and_corpus_layouts() {
    use sluice::rules::bench::load_events;
    let kinds = |dir: &Path| -> Vec<(String, String, String)> {
        let events = load_events(dir).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(events.skipped.is_empty(), "{:?}", events.skipped);
        events
            .paths
            .iter()
            .zip(&events.events)
            .map(|(p, e)| {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                (
                    rel,
                    e.event.provider.as_str().to_owned(),
                    e.event.kind.clone(),
                )
            })
            .collect()
    };
    let has = |all: &[(String, String, String)], want: (&str, &str, &str)| {
        assert!(
            all.iter()
                .any(|(p, pr, k)| p == want.0 && pr == want.1 && k == want.2),
            "{want:?} not in {all:?}"
        );
    };
    // rules/tests: PROVIDER-KIND-….json; GitLab kinds from object_kind.
    let repo = kinds(&Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/tests"));
    has(
        &repo,
        (
            "github-issue_comment-created.json",
            "github",
            "issue_comment",
        ),
    );
    has(
        &repo,
        ("gitlab-merge_request.json", "gitlab", "Merge Request Hook"),
    );
    has(&repo, ("gitlab-tag_push.json", "gitlab", "Tag Push Hook"));
    // The corpus: GitHub's PROVIDER/KIND/ACTION.payload.json, GitLab's events.json.
    let github = kinds(&corpus().join("github"));
    has(&github, ("issues/labeled.payload.json", "github", "issues"));
    has(
        &github,
        (
            "workflow_run/completed.payload.json",
            "github",
            "workflow_run",
        ),
    );
    let gitlab = kinds(&corpus().join("gitlab"));
    has(&gitlab, ("webhooks/note_issue.json", "gitlab", "Note Hook"));
    has(
        &gitlab,
        ("webhooks/pipeline.json", "gitlab", "Pipeline Hook"),
    );
    // A folder that names no provider gives no events, and says so.
    let events = load_events(&corpus().join("github/issues")).unwrap();
    assert!(events.events.is_empty(), "no provider in the path: skipped");
    assert!(!events.skipped.is_empty());
}
