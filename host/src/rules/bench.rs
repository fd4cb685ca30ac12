//! Measuring rules: the code `sluice bench` and the `rules` criterion bench
//! share, so both time a call the same way and compare it with the same
//! native baseline.
//!
//! - [`three_fields`] is the native Rust twin of the bench rule
//!   (`plugins/rules/bench-three-fields`, `rules/bench/three-fields.rhai`):
//!   it reads the kind, the action and `/repository/full_name` and returns
//!   one medium route to `bench`.
//! - [`percentiles`] times single calls after a warm-up.
//! - [`time_rule`] times a loaded rule with a fresh instance per event (the
//!   serving path, [`Rule::classify_with_reads`]) and, for a component, with
//!   one instance reused across events.
//! - [`load_costs`] times compiling a rule with no cache and loading it from
//!   wasmtime's compile cache.
//! - [`load_events`] reads provider payloads from a directory.
//!
//! Nothing here asserts a timing: it measures and reports. It never touches
//! the store or the network; the only files it writes are a compile cache in
//! a temporary directory, removed before it returns.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::decision::{Priority, Route, RuleFailure, Verdict};
use crate::event::{Event, ParsedEvent, Provider};
use crate::rules::config::{PoolConfig, RulesConfig};
use crate::rules::manifest::{Manifest, RuleSource};
use crate::rules::{Rule, RuleCode, WasmEngine};

/// The bench rule's logic as native Rust: the baseline every rule is
/// compared with.
pub fn three_fields(ev: &ParsedEvent) -> Result<Verdict, RuleFailure> {
    let kind = &ev.event.kind;
    let action = ev.event.action.as_deref();
    let repo = ev.get("/repository/full_name");
    let repo = repo.as_deref().and_then(serde_json::Value::as_str);
    Ok(Verdict::Routes(vec![Route {
        agent: "bench".into(),
        workflow: None,
        priority: Priority::Medium,
        reason: format!(
            "{kind}.{} in {}",
            action.unwrap_or("-"),
            repo.unwrap_or("?")
        ),
        labels: Vec::new(),
        ordering_key: None,
        payload: None,
    }]))
}

/// [`three_fields`] as a rule, called through [`Rule::classify`] like the others.
pub fn native_rule() -> Rule {
    Rule::native("bench-native", three_fields)
}

/// The median and 99th percentile of single calls, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// CPU time per call of every thread of the process, in microseconds:
    /// work moved off the calling thread (instances made ahead of time,
    /// stores torn down, the epoch ticker) still counts.
    pub cpu_us: f64,
}

impl Percentiles {
    /// This one's median over `base`'s.
    pub fn ratio(&self, base: &Percentiles) -> f64 {
        self.p50_us / base.p50_us
    }
}

/// Times `n` single calls of `f` (given the call's index) after `n / 10`
/// warm-up calls, back to back; `n` is at least 1.
pub fn percentiles(f: impl FnMut(usize), n: usize) -> Percentiles {
    paced(f, n, Duration::ZERO)
}

/// [`percentiles`] with the thread asleep for `gap` before each timed call
/// (not timed), as a server sees events arriving apart: caches go cold,
/// the core may idle, a parked epoch ticker must be woken.
pub fn paced(mut f: impl FnMut(usize), n: usize, gap: Duration) -> Percentiles {
    let n = n.max(1);
    for i in 0..n / 10 {
        f(i);
    }
    let cpu = process_cpu();
    let mut times: Vec<Duration> = (0..n)
        .map(|i| {
            if !gap.is_zero() {
                std::thread::sleep(gap);
            }
            let start = Instant::now();
            f(i);
            start.elapsed()
        })
        .collect();
    let cpu = process_cpu().saturating_sub(cpu);
    times.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Percentiles {
        p50_us: us(times[n / 2]),
        p99_us: us(times[(n * 99 / 100).min(n - 1)]),
        cpu_us: us(cpu) / n as f64,
    }
}

/// CPU time of every thread of this process so far: the scheduler's run
/// time per thread (`/proc/self/task/*/schedstat`), summed. Zero where
/// `/proc` has no such files.
pub fn process_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .flatten()
        // A thread may end between the listing and the read.
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// One rule timed on a set of events.
#[derive(Debug, Clone, Serialize)]
pub struct RuleTimes {
    /// A fresh instance per event, as sluice serves (for rhai: the serving
    /// call, which has no instance to keep).
    pub fresh: Percentiles,
    /// One instance reused across events (components only).
    pub reused: Option<Percentiles>,
    /// Calls that failed, out of the timed ones (each variant counted once).
    pub failures: usize,
}

/// Times `rule` on `events` (taken in turn), `n` calls per variant. The
/// fresh variant goes through [`Rule::classify_with_reads`], the serving
/// path, so it times whatever instantiation strategy the rule uses.
pub fn time_rule(rule: &Rule, events: &[Arc<ParsedEvent>], n: usize, gap: Duration) -> RuleTimes {
    let ev = |i: usize| &events[i % events.len()];
    let mut failures = 0;
    let fresh = paced(
        |i| {
            let (r, reads) = rule.classify_with_reads(ev(i));
            failures += usize::from(r.is_err());
            drop(black_box((r, reads)));
        },
        n,
        gap,
    );
    let reused = match rule.code() {
        RuleCode::Wasm(w) => match w.reused_instance() {
            Ok(mut inst) => Some(paced(|i| drop(black_box(inst.classify(ev(i)))), n, gap)),
            Err(_) => None,
        },
        _ => None,
    };
    RuleTimes {
        fresh,
        reused,
        failures: failures.min(n),
    }
}

/// Times the native baseline on `events`, `n` calls, `gap` apart.
pub fn time_native(events: &[Arc<ParsedEvent>], n: usize, gap: Duration) -> Percentiles {
    let native = native_rule();
    paced(
        |i| drop(black_box(native.classify(&events[i % events.len()]))),
        n,
        gap,
    )
}

/// Whether `rule` answers exactly as [`three_fields`] on every event (so
/// the native baseline is its twin, doing the same work).
pub fn is_twin(rule: &Rule, events: &[Arc<ParsedEvent>]) -> bool {
    !events.is_empty()
        && events
            .iter()
            .all(|ev| rule.classify(ev) == three_fields(ev))
}

/// What loading one rule costs.
#[derive(Debug, Clone, Serialize)]
pub struct LoadCosts {
    /// Compiling (and linking) it with no compile cache, in milliseconds.
    pub compile_ms: f64,
    /// Loading it from wasmtime's compile cache, in milliseconds (components
    /// only; `None` for scripts or when the cache missed).
    pub cache_load_ms: Option<f64>,
}

/// Times loading the rule `manifest` describes, through [`Rule::from_code`]:
/// once on an engine without a cache (a cold compile), and, for a
/// component, a second time on an engine whose cache (in a temporary
/// directory) the first load of that engine filled.
pub fn load_costs(
    manifest: &Manifest,
    manifest_path: &Path,
    manifest_text: &str,
    rules: &RulesConfig,
    pool: &PoolConfig,
) -> anyhow::Result<LoadCosts> {
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let source = manifest.source(dir);
    let bytes =
        std::fs::read(source.path()).with_context(|| format!("{}", source.path().display()))?;
    let load = |engine: &WasmEngine| -> anyhow::Result<f64> {
        let start = Instant::now();
        let rule = Rule::from_code(
            manifest,
            manifest_path,
            manifest_text,
            bytes.clone(),
            rules,
            engine,
        )?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        drop(rule);
        Ok(ms)
    };
    let cold = WasmEngine::with_pool(None, pool)?;
    let is_component = matches!(source, RuleSource::Component(_));
    if is_component {
        cold.engine()?; // the engine itself is built once per process, not per rule
    }
    let compile_ms = load(&cold)?;
    if !is_component {
        return Ok(LoadCosts {
            compile_ms,
            cache_load_ms: None,
        });
    }
    let cache = TempDir::new()?;
    let warm = WasmEngine::with_pool(Some(cache.0.clone()), pool)?;
    warm.engine()?;
    load(&warm)?; // fills the cache
    let hits = warm.cache_stats().hits;
    let ms = load(&warm)?;
    let cache_load_ms = (warm.cache_stats().hits > hits).then_some(ms);
    Ok(LoadCosts {
        compile_ms,
        cache_load_ms,
    })
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random name: {e}"))?;
        let dir = std::env::temp_dir().join(format!("sluice-bench-{}", hex::encode(bytes)));
        std::fs::create_dir(&dir).with_context(|| format!("{}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Provider payloads read from a directory, each checked and indexed once.
#[derive(Debug, Default)]
pub struct Events {
    /// The events, in path order.
    pub events: Vec<Arc<ParsedEvent>>,
    /// The file each came from, by index.
    pub paths: Vec<PathBuf>,
    /// Files skipped, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Reads every `*.json` payload under `dir` (three levels deep), in either
/// layout:
///
/// - `PROVIDER-KIND-….json` (the repo's `rules/tests/`): provider and kind
///   from the file name;
/// - `PROVIDER/KIND/ACTION.payload.json` (the corpus's GitHub layout): from
///   the folder names;
/// - `PROVIDER/…/NAME.json` beside an `events.json` mapping file names to
///   kinds (the corpus's GitLab layout).
///
/// A GitLab payload with no kind from its name takes it from its
/// `object_kind` (`merge_request` → `Merge Request Hook`). The action comes
/// from the payload, as for test vectors. Files that give no provider or
/// kind, or that are not JSON, are skipped and listed.
pub fn load_events(dir: &Path) -> anyhow::Result<Events> {
    let mut files = Vec::new();
    collect(dir, 3, &mut files).with_context(|| format!("{}: events directory", dir.display()))?;
    files.sort();
    let mut out = Events::default();
    let mut maps: BTreeMap<PathBuf, BTreeMap<String, String>> = BTreeMap::new();
    for path in files {
        let body = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
        let Ok(payload) = serde_json::from_slice::<serde_json::Value>(&body) else {
            out.skipped.push((path, "not JSON".into()));
            continue;
        };
        let parent = path.parent().unwrap_or(dir).to_owned();
        let map = maps
            .entry(parent.clone())
            .or_insert_with(|| kind_map(&parent));
        match provider_and_kind(dir, &path, &payload, map) {
            Some((provider, kind)) => {
                let ev = ParsedEvent::new(Event::dry_run(
                    provider.as_str(),
                    provider,
                    &kind,
                    None,
                    body.into(),
                ));
                ev.scan(); // indexed once, as the router does before the rules run
                out.events.push(Arc::new(ev));
                out.paths.push(path);
            }
            None => out
                .skipped
                .push((path, "no provider or kind in its path".into())),
        }
    }
    Ok(out)
}

fn collect(dir: &Path, depth: usize, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if depth > 1 {
                collect(&path, depth - 1, files)?;
            }
        } else if path.extension().is_some_and(|x| x == "json")
            && path.file_name().is_some_and(|n| n != "events.json")
        {
            files.push(path);
        }
    }
    Ok(())
}

/// A folder's `events.json` (file name → kind), empty when there is none.
fn kind_map(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read(dir.join("events.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn provider_and_kind(
    root: &Path,
    path: &Path,
    payload: &serde_json::Value,
    map: &BTreeMap<String, String>,
) -> Option<(Provider, String)> {
    let file = path.file_name()?.to_str()?;
    let stem = file
        .strip_suffix(".payload.json")
        .or(file.strip_suffix(".json"))?;
    let folders: Vec<&str> = path
        .strip_prefix(root)
        .ok()?
        .parent()?
        .iter()
        .filter_map(|c| c.to_str())
        .collect();
    // PROVIDER-KIND-….json
    let mut parts = stem.splitn(3, '-');
    if let (Some(p), Some(kind)) = (parts.next().and_then(Provider::parse), parts.next()) {
        return match p {
            Provider::Gitlab => gitlab_kind(payload).map(|k| (p, k)),
            _ => Some((p, kind.to_owned())),
        };
    }
    // PROVIDER/…/NAME.json (or the root itself named for its provider)
    let provider = folders
        .iter()
        .copied()
        .chain(root.file_name().and_then(|n| n.to_str()))
        .find_map(Provider::parse)?;
    if let Some(kind) = map.get(file) {
        return Some((provider, kind.clone()));
    }
    if provider == Provider::Gitlab {
        return gitlab_kind(payload).map(|k| (provider, k));
    }
    // PROVIDER/KIND/ACTION.payload.json
    let kind = *folders.last()?;
    (Provider::parse(kind).is_none()).then(|| (provider, kind.to_owned()))
}

/// The `X-Gitlab-Event` value GitLab sends with a payload of this `object_kind`.
fn gitlab_kind(payload: &serde_json::Value) -> Option<String> {
    let kind = payload.get("object_kind")?.as_str()?;
    if kind == "build" {
        return Some("Job Hook".into());
    }
    let words: Vec<String> = kind
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect())
                .unwrap_or_default()
        })
        .collect();
    Some(format!("{} Hook", words.join(" ")))
}
