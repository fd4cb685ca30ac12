//! `sluice rules ls`: per rule its name, version, language, code size and
//! load state (from the files), and its calls, errors by kind and latency
//! over the last recorded decisions (from the store, through its read role).
//!
//! It reads the rules directory and the store and writes nothing but the
//! compile cache. It does not ask a running server; the rules it lists are
//! the ones on disk, which a running server may not have loaded yet.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use super::RulesDirArg;
use crate::decision::RuleOutcome;
use crate::rules::catalog::{self, Entry};
use crate::rules::manifest::RuleSource;
use crate::rules::wasm::WasmEngine;
use crate::store::EventReader;
use crate::store::sqlite::SqliteStore;

/// Arguments of `sluice rules ls`.
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    /// The config and rules directory.
    #[command(flatten)]
    pub rules: RulesDirArg,
    /// How many of the latest recorded decisions the statistics cover.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub decisions: usize,
    /// One JSON array for scripts.
    #[arg(long)]
    pub json: bool,
}

/// One rule, as listed.
#[derive(Debug, Serialize)]
pub struct RuleRow {
    /// The rule's name (the manifest's file stem when it does not parse).
    pub name: String,
    /// Its manifest.
    pub manifest: PathBuf,
    /// Its version (content hash), when it loads.
    pub version: Option<String>,
    /// `rhai`, or the language a component's `producers` section names
    /// (`rust`, `c`, ...), else `component`.
    pub language: Option<String>,
    /// The code file's size in bytes.
    pub size: Option<u64>,
    /// `ok`, or why the rule does not load.
    pub state: String,
    /// What the recorded decisions say about it, when there is a store.
    pub recorded: Option<Recorded>,
}

/// A rule's record over the latest decisions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recorded {
    /// Decisions looked at.
    pub decisions: usize,
    /// Times the rule was run (skipped events excluded).
    pub calls: u64,
    /// Failures by kind (`trap`, `timeout`, `disabled`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Median call duration, in microseconds.
    pub p50_us: Option<u64>,
    /// 99th percentile call duration, in microseconds.
    pub p99_us: Option<u64>,
    /// The versions seen, newest first.
    pub versions: Vec<String>,
}

/// Runs `sluice rules ls`.
pub async fn run(args: LsArgs) -> anyhow::Result<()> {
    let config = args.rules.load()?;
    let cache = config.rules.cache_dir(&config.base_dir, config.data_dir());
    let engine = WasmEngine::with_pool(Some(cache), &config.rules.pool)?;
    let entries = catalog::load_each(&config.rules, &config.base_dir, &engine)?;
    let db = config.data_dir().join(&config.store.path);
    let recorded = if db.exists() {
        let reader = SqliteStore::open_read_only(&db)?;
        Some(record_by_rule(&reader, args.decisions).await?)
    } else {
        None
    };
    let rows: Vec<RuleRow> = entries
        .iter()
        .map(|e| {
            let mut row = row(e);
            if let Some(by_rule) = &recorded {
                row.recorded = Some(by_rule.get(&row.name).map_or_else(
                    || Recorded {
                        decisions: by_rule.values().map(|r| r.decisions).max().unwrap_or(0),
                        ..Default::default()
                    },
                    |r| r.clone(),
                ));
            }
            row
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
    } else {
        print(&rows, recorded.is_some(), &mut out)?;
    }
    Ok(())
}

fn row(e: &Entry) -> RuleRow {
    let code = e.code_path();
    let size = code
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.len());
    let dir = e
        .manifest_path
        .parent()
        .unwrap_or(std::path::Path::new("."));
    let language = e.manifest.as_ref().map(|m| match m.source(dir) {
        RuleSource::Script(_) => "rhai".to_owned(),
        RuleSource::Component(p) => std::fs::read(&p)
            .ok()
            .and_then(|b| component_language(&b))
            .unwrap_or_else(|| "component".to_owned()),
    });
    RuleRow {
        name: e.name(),
        manifest: e.manifest_path.clone(),
        version: e.rule.as_ref().ok().map(|r| r.version().to_owned()),
        language,
        size,
        state: match &e.rule {
            Ok(_) => "ok".to_owned(),
            Err(err) => err.to_string(),
        },
        recorded: None,
    }
}

/// The source language a component's toolchain recorded in its `producers`
/// custom sections (the component's own or its modules'), lower-cased:
/// `rust`, `c`, ... `None` when no section names one.
pub fn component_language(bytes: &[u8]) -> Option<String> {
    use wasmparser::{KnownCustom, Parser, Payload};
    for payload in Parser::new(0).parse_all(bytes) {
        let Ok(Payload::CustomSection(section)) = payload else {
            continue;
        };
        let KnownCustom::Producers(reader) = section.as_known() else {
            continue;
        };
        for field in reader.into_iter().flatten() {
            if field.name != "language" {
                continue;
            }
            if let Some(Ok(value)) = field.values.into_iter().next() {
                return Some(value.name.to_lowercase());
            }
        }
    }
    None
}

async fn record_by_rule(
    reader: &dyn EventReader,
    limit: usize,
) -> anyhow::Result<BTreeMap<String, Recorded>> {
    let decisions = reader.decisions(limit).await?;
    let mut by_rule: BTreeMap<String, (Recorded, Vec<u64>)> = BTreeMap::new();
    for d in &decisions {
        for r in &d.decision.rules {
            let (rec, durations) = by_rule.entry(r.rule.clone()).or_default();
            if !rec.versions.contains(&r.version) {
                rec.versions.push(r.version.clone());
            }
            match &r.outcome {
                RuleOutcome::Skipped => continue,
                RuleOutcome::Failed(f) => *rec.errors.entry(f.kind().to_owned()).or_default() += 1,
                RuleOutcome::Verdict(_) => {}
            }
            rec.calls += 1;
            durations.push(r.duration_us);
        }
    }
    Ok(by_rule
        .into_iter()
        .map(|(name, (mut rec, mut durations))| {
            durations.sort_unstable();
            rec.decisions = decisions.len();
            rec.p50_us = percentile(&durations, 50);
            rec.p99_us = percentile(&durations, 99);
            (name, rec)
        })
        .collect())
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: usize) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    Some(sorted[rank - 1])
}

fn print(rows: &[RuleRow], has_store: bool, out: &mut impl Write) -> std::io::Result<()> {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    writeln!(
        out,
        "{:width$}  {:<16}  {:<9}  {:>9}  {:>7}  {:>8}  {:>8}  {:<20}  STATE",
        "RULE", "VERSION", "LANGUAGE", "SIZE", "CALLS", "P50 µs", "P99 µs", "ERRORS"
    )?;
    for r in rows {
        let (calls, p50, p99, errors) = match &r.recorded {
            Some(rec) => (
                rec.calls.to_string(),
                rec.p50_us.map_or("-".into(), |v| v.to_string()),
                rec.p99_us.map_or("-".into(), |v| v.to_string()),
                if rec.errors.is_empty() {
                    "-".to_owned()
                } else {
                    rec.errors
                        .iter()
                        .map(|(k, n)| format!("{k}:{n}"))
                        .collect::<Vec<_>>()
                        .join(",")
                },
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        writeln!(
            out,
            "{:width$}  {:<16}  {:<9}  {:>9}  {calls:>7}  {p50:>8}  {p99:>8}  {errors:<20}  {}",
            r.name,
            r.version.as_deref().unwrap_or("-"),
            r.language.as_deref().unwrap_or("-"),
            r.size.map_or("-".into(), |s| s.to_string()),
            r.state
        )?;
    }
    match rows.iter().find_map(|r| r.recorded.as_ref()) {
        Some(rec) => writeln!(
            out,
            "(calls, errors and latency over the last {} recorded decisions)",
            rec.decisions
        ),
        None if has_store => Ok(()),
        None => writeln!(out, "(no store yet: no recorded decisions)"),
    }
}
