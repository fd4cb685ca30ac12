//! The bench rule in five languages: Rust, C, JavaScript and Python
//! components built from `plugins/` by `plugins/build.sh`, and the rhai
//! script in `rules/bench/`. Each is loaded through the host's own path
//! (manifest, grants, compile, the instance pool) with the shipped `[rules]`
//! defaults, held to the one shared list of vectors
//! (`rules/tests/three-fields.vectors.toml`), and compared with the others on
//! every payload in `rules/tests/`.
//!
//! JavaScript and Python compile for seconds the first time: every engine
//! here shares one compile cache directory, so later runs load them from it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use sluice::decision::{Priority, Route, Verdict};
use sluice::event::{Event, ParsedEvent, Provider};
use sluice::rules::config::PoolConfig;
use sluice::rules::manifest::{Manifest, TestVector};
use sluice::rules::wasm::Allocator;
use sluice::rules::{Rule, RuleSet, RulesConfig, WasmEngine};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The compile cache every engine in this file shares.
fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("language-cache")
}

/// (language, code file): the five implementations of the bench rule.
fn implementations() -> Vec<(&'static str, PathBuf)> {
    let out = repo().join("plugins/out");
    let list = vec![
        ("rust", out.join("bench-three-fields.wasm")),
        ("c", out.join("three-fields-c.wasm")),
        ("js", out.join("three-fields-js.wasm")),
        ("python", out.join("three-fields-py.wasm")),
        ("rhai", repo().join("rules/bench/three-fields.rhai")),
    ];
    for (lang, path) in &list {
        assert!(
            path.is_file(),
            "{lang}: {} is missing: run plugins/build.sh first (CI runs it before the tests)",
            path.display()
        );
    }
    list
}

/// A manifest for one implementation; the vectors come from the shared list.
fn manifest(lang: &str, code: &Path) -> String {
    let (key, grants) = if lang == "rhai" {
        ("script", "")
    } else {
        // Rust's wasm32-wasip2 std imports WASI (with an empty context); the
        // other languages import none, so the grant is unused there.
        ("component", "[grants]\nwasi = true\n")
    };
    format!(
        "name = \"three-fields-{lang}\"\n{key} = {:?}\nproviders = [\"github\", \"gitlab\"]\n{grants}",
        code.display().to_string()
    )
}

fn shared_vectors() -> (PathBuf, Vec<TestVector>) {
    #[derive(serde::Deserialize)]
    struct File {
        test: Vec<TestVector>,
    }
    let path = repo().join("rules/tests/three-fields.vectors.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let file: File = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(file.test.len() >= 5, "the shared list has its vectors");
    (path, file.test)
}

/// Every payload in rules/tests/, as an event: `<provider>-<kind>[-...].json`.
fn corpus() -> Vec<(String, Arc<ParsedEvent>)> {
    let mut files: Vec<_> = std::fs::read_dir(repo().join("rules/tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let mut parts = stem.split('-');
            let provider = Provider::parse(parts.next().unwrap()).unwrap();
            let kind = parts.next().unwrap();
            let body = Bytes::from(std::fs::read(&path).unwrap());
            let ev = Event::dry_run(provider.as_str(), provider, kind, None, body);
            (stem, Arc::new(ParsedEvent::new(ev)))
        })
        .collect()
}

/// What the bench rule must answer, worked out here from the event itself.
fn expected(ev: &ParsedEvent) -> Verdict {
    let repo = ev.get("/repository/full_name");
    let repo = repo.as_deref().and_then(|v| v.as_str()).unwrap_or("?");
    let action = ev.event.action.as_deref().unwrap_or("-");
    Verdict::Routes(vec![Route {
        agent: "bench".into(),
        workflow: None,
        priority: Priority::Medium,
        reason: format!("{}.{action} in {repo}", ev.event.kind),
        labels: vec![],
        ordering_key: None,
        payload: None,
    }])
}

#[test]
fn five_languages_pass_the_shared_vectors_and_agree_on_every_payload() {
    let dir = tempfile::tempdir().unwrap();
    let rules_dir = dir.path().join("rules");
    std::fs::create_dir(&rules_dir).unwrap();
    let impls = implementations();
    let names: Vec<String> = impls
        .iter()
        .map(|(lang, _)| format!("three-fields-{lang}"))
        .collect();
    for (lang, code) in &impls {
        let path = rules_dir.join(format!("three-fields-{lang}.toml"));
        std::fs::write(path, manifest(lang, code)).unwrap();
    }
    // The shipped `[rules]` (sluice.toml as embedded: pool ceilings, limits,
    // cache limits), approving each rule's grants.
    let shipped = sluice::config::Config::parse(
        sluice::config::EMBEDDED_DEFAULTS,
        sluice::config::EMBEDDED_NAME,
    )
    .expect("the embedded defaults parse")
    .rules;
    let names_str: Vec<&str> = names.iter().map(String::as_str).collect();
    let config = RulesConfig {
        load: Some(names.clone()),
        grants: crate::rules::approving(&names_str).grants,
        ..shipped
    };
    assert_eq!(config.pool, PoolConfig::default());
    let engine = WasmEngine::with_cache(Some(cache_dir()), &config.cache, &config.pool).unwrap();
    let started = Instant::now();
    let set = RuleSet::load(&config, dir.path(), &engine).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "loaded the five bench rules in {:?} (cache hits {}, misses {})",
        started.elapsed(),
        engine.cache_stats().hits,
        engine.cache_stats().misses
    );
    assert_eq!(
        engine.allocator(),
        Some(Allocator::Pooling),
        "the default pool must be what admits them, not the on-demand fallback"
    );
    let rules: Vec<&Rule> = set.rules().collect();
    assert_eq!(rules.len(), 5);

    let (vectors_path, vectors) = shared_vectors();
    for rule in &rules {
        rule.check_tests(&vectors, &vectors_path)
            .unwrap_or_else(|e| panic!("{}: {e}", rule.name()));
    }

    let events = corpus();
    assert!(events.len() >= 15, "rules/tests/ holds the corpus payloads");
    for (name, ev) in &events {
        let want = expected(ev);
        for rule in &rules {
            // Two calls each: a fresh instance per event gives the same answer
            // every time.
            for _ in 0..2 {
                let got = rule
                    .classify(ev)
                    .unwrap_or_else(|f| panic!("{} on {name}: {f}", rule.name()));
                assert_eq!(got, want, "{} on {name}", rule.name());
            }
        }
    }
}

/// The pool's per-rule ceilings refuse a component that needs more, when it
/// loads, naming what it needs and the config key that caps it.
#[test]
fn a_rule_needing_more_than_the_pool_ceilings_is_refused_naming_both() {
    let impls = implementations();
    let code = |lang: &str| impls.iter().find(|(l, _)| *l == lang).unwrap().1.clone();
    let load = |pool: PoolConfig, lang: &str| {
        let config = RulesConfig {
            pool,
            ..RulesConfig::default()
        };
        let engine =
            WasmEngine::with_cache(Some(cache_dir()), &config.cache, &config.pool).unwrap();
        let text = manifest(lang, &code(lang));
        let path = repo().join("rules/bench/pool-test.toml");
        let m = Manifest::parse(&path, &text).unwrap();
        Rule::from_manifest(&m, &path, &text, &config, &engine).map(|_| ())
    };
    // C is small: these ceilings hold it, and the refusals below are about
    // the heavier runtimes alone.
    let tight = PoolConfig {
        core_instances_per_rule: 16,
        memories_per_rule: 2,
        tables_per_rule: 2,
        ..PoolConfig::default()
    };
    load(tight.clone(), "c").unwrap_or_else(|e| panic!("{e}"));

    let e = load(tight.clone(), "python").unwrap_err().to_string();
    assert!(
        e.contains("three-fields-py.wasm")
            && e.contains("rules.pool.core_instances_per_rule = 16")
            && e.contains("contains 38 core module instances"),
        "{e}"
    );
    let e = load(
        PoolConfig {
            core_instances_per_rule: 64,
            ..tight.clone()
        },
        "js",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("three-fields-js.wasm")
            && e.contains("rules.pool.memories_per_rule = 2")
            && e.contains("contains 3 Wasm linear memories"),
        "{e}"
    );
    let e = load(
        PoolConfig {
            core_instances_per_rule: 64,
            memories_per_rule: 4,
            tables_per_rule: 1,
            ..tight
        },
        "c",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("rules.pool.tables_per_rule = 1") && e.contains("tables"),
        "{e}"
    );
    // And the config refuses ceilings it cannot use, naming the key.
    let e = RulesConfig {
        pool: PoolConfig {
            memories_per_rule: 0,
            ..PoolConfig::default()
        },
        ..RulesConfig::default()
    }
    .validate()
    .unwrap_err();
    assert!(e.contains("rules.pool.memories_per_rule"), "{e}");
}

/// With `rules.pool.copy_memory_images`, instances (ready ones and those
/// made inline) start from a copy of the component's memory instead of a
/// copy-on-write mapping: the answers must not change, for a small guest and
/// for one whose memory image is large.
#[test]
fn copied_memory_images_give_the_same_answers() {
    let impls = implementations();
    let config = RulesConfig {
        pool: PoolConfig {
            copy_memory_images: true,
            ..PoolConfig::default()
        },
        ..RulesConfig::default()
    };
    let engine = WasmEngine::with_cache(Some(cache_dir()), &config.cache, &config.pool).unwrap();
    let events = corpus();
    for lang in ["c", "js"] {
        let code = &impls.iter().find(|(l, _)| *l == lang).unwrap().1;
        let text = manifest(lang, code);
        let path = repo().join("rules/bench/copy-test.toml");
        let m = Manifest::parse(&path, &text).unwrap();
        let rule = Rule::from_manifest(&m, &path, &text, &config, &engine)
            .unwrap_or_else(|e| panic!("{lang}: {e}"));
        for round in 0..3 {
            for (name, ev) in &events {
                let got = rule
                    .classify(ev)
                    .unwrap_or_else(|f| panic!("{lang} on {name}: {f}"));
                assert_eq!(got, expected(ev), "{lang} on {name}, round {round}");
            }
            // Between rounds, time for the ready instances to be made.
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // Both paths ran: instances made inline (the first round outruns
        // the filler) and ready ones.
        let sluice::rules::RuleCode::Wasm(wasm) = rule.code() else {
            panic!("{lang} is a component")
        };
        let served = wasm.instances_served();
        assert!(served.ready > 0 && served.inline > 0, "{lang}: {served:?}");
    }
}
