//! `sluice bench`: per rule of the rules directory, its latency on real
//! payloads with a fresh instance per event (what sluice serves) and with one
//! instance reused, beside the native Rust bench rule timed on the same
//! events in the same run, as ratios; per rule also its code size, its
//! compile time with no cache and its load time from the compile cache.
//!
//! Rules load the way `rules test` loads them (each on its own, so a broken
//! one is a row of its own). Each rule is timed on the events it wants (its
//! providers, kinds and grants). The measuring code is
//! [`crate::rules::bench`], shared with `cargo bench --bench rules`.
//!
//! It writes nothing but compile caches: the config's (as `rules test` does)
//! and, for the load timings, a temporary one it removes. It never touches
//! the store.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Serialize;

use super::RulesDirArg;
use crate::event::ParsedEvent;
use crate::rules::bench::{self, LoadCosts, Percentiles};
use crate::rules::catalog::Entry;

/// Arguments of `sluice bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The config and rules directory.
    #[command(flatten)]
    pub rules: RulesDirArg,
    /// Only this rule (by name).
    #[arg(long = "rule", value_name = "R")]
    pub rule: Option<String>,
    /// The payloads to time the rules on: `PROVIDER-KIND-….json` files (as
    /// in `rules/tests/`) or `PROVIDER/KIND/ACTION.payload.json` (the GitHub
    /// corpus layout). Default: the `tests/` folder of the rules directory.
    #[arg(long, value_name = "DIR")]
    pub events: Option<PathBuf>,
    /// Timed calls per rule and variant (after a tenth as many warm-up calls).
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub calls: usize,
    /// Sleep this long before each timed call (not timed), as a server sees
    /// events arriving apart (`10ms` is 100 events/s); `0` times calls back
    /// to back.
    #[arg(long, default_value = "0", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub gap: std::time::Duration,
    /// One JSON document for scripts.
    #[arg(long)]
    pub json: bool,
}

/// The whole report, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The events directory.
    pub events_dir: PathBuf,
    /// Payloads read from it.
    pub events: usize,
    /// Files in it that were not used, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Timed calls per rule and variant.
    pub calls: usize,
    /// The pause before each timed call, in microseconds.
    pub gap_us: u64,
    /// What the native baseline is.
    pub baseline: &'static str,
    /// One row per rule.
    pub rules: Vec<RuleRow>,
}

const BASELINE: &str = "the native Rust bench-three-fields fn (kind, action, /repository/full_name, \
     one route), timed on the same events in the same run";

/// One rule's figures.
#[derive(Debug, Serialize)]
pub struct RuleRow {
    /// Its name.
    pub rule: String,
    /// `rhai`, or the language its component's `producers` section names.
    pub language: Option<String>,
    /// Its code file's size, in bytes.
    pub size: Option<u64>,
    /// `ok`, `no events` (none of the payloads is for it), or why it does not load.
    pub state: String,
    /// The events it was timed on.
    pub events: usize,
    /// Whether it answered exactly as the native baseline on every event
    /// (the baseline is then its twin; otherwise only a reference).
    pub native_twin: bool,
    /// The native baseline on the same events.
    pub native: Option<Percentiles>,
    /// A fresh instance per event (the serving path).
    pub fresh: Option<Percentiles>,
    /// One instance reused across events (components).
    pub reused: Option<Percentiles>,
    /// Fresh p50 over native p50.
    pub fresh_vs_native: Option<f64>,
    /// Reused p50 over native p50.
    pub reused_vs_native: Option<f64>,
    /// Fresh p50 over reused p50: what per-event isolation costs.
    pub fresh_vs_reused: Option<f64>,
    /// Timed calls that failed.
    pub failures: usize,
    /// Compile and cache-load times.
    pub load: Option<LoadCosts>,
}

/// Runs `sluice bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let config = args.rules.load()?;
    let rules_dir = config.rules.rules_dir(&config.base_dir);
    let events_dir = args
        .events
        .clone()
        .unwrap_or_else(|| rules_dir.join("tests"));
    if !events_dir.is_dir() {
        bail!(
            "{}: no events directory (give one with --events DIR)",
            events_dir.display()
        );
    }
    let events = bench::load_events(&events_dir)?;
    if events.events.is_empty() {
        bail!("{}: no payloads found", events_dir.display());
    }
    // The compile cache the host uses, so timing starts from what serving
    // would load; the compile and cache figures use engines of their own.
    let (_engine, entries) = super::load_rule_entries(&config, args.rule.as_deref(), true)?;
    let calls = args.calls.max(1);
    let rows = entries
        .iter()
        .map(|e| measure(e, &events.events, calls, args.gap, &config))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = Report {
        events_dir,
        events: events.events.len(),
        skipped: events.skipped,
        calls,
        gap_us: u64::try_from(args.gap.as_micros()).unwrap_or(u64::MAX),
        baseline: BASELINE,
        rules: rows,
    };
    super::emit(args.json, &report, |out| print(&report, out))?;
    Ok(())
}

fn measure(
    e: &Entry,
    events: &[Arc<ParsedEvent>],
    calls: usize,
    gap: std::time::Duration,
    config: &crate::config::Config,
) -> anyhow::Result<RuleRow> {
    let code = e.code_path();
    let mut row = RuleRow {
        rule: e.name(),
        language: None,
        size: code
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len()),
        state: "ok".into(),
        events: 0,
        native_twin: false,
        native: None,
        fresh: None,
        reused: None,
        fresh_vs_native: None,
        reused_vs_native: None,
        fresh_vs_reused: None,
        failures: 0,
        load: None,
    };
    let dir = e.manifest_path.parent().unwrap_or(Path::new("."));
    row.language = e.manifest.as_ref().map(|m| m.language(dir));
    let rule = match &e.rule {
        Ok(rule) => rule,
        Err(err) => {
            row.state = err.to_string();
            return Ok(row);
        }
    };
    if let Some(manifest) = &e.manifest {
        let text = std::fs::read_to_string(&e.manifest_path)
            .with_context(|| format!("{}", e.manifest_path.display()))?;
        row.load = Some(bench::load_costs(
            manifest,
            &e.manifest_path,
            &text,
            &config.rules,
            &config.rules.pool,
        )?);
    }
    let mine: Vec<Arc<ParsedEvent>> = events
        .iter()
        .filter(|ev| rule.wants(&ev.event))
        .cloned()
        .collect();
    row.events = mine.len();
    if mine.is_empty() {
        row.state = "no events".into();
        return Ok(row);
    }
    row.native_twin = bench::is_twin(rule, &mine);
    let native = bench::time_native(&mine, calls, gap);
    let times = bench::time_rule(rule, &mine, calls, gap);
    row.fresh_vs_native = Some(times.fresh.ratio(&native));
    row.reused_vs_native = times.reused.map(|r| r.ratio(&native));
    row.fresh_vs_reused = times.reused.map(|r| times.fresh.ratio(&r));
    row.native = Some(native);
    row.fresh = Some(times.fresh);
    row.reused = times.reused;
    row.failures = times.failures;
    Ok(row)
}

/// The column heads of the latency table, in order (tests read them).
pub const LATENCY_COLUMNS: [&str; 13] = [
    "RULE",
    "LANGUAGE",
    "EVENTS",
    "NATIVE P50/P99 µs",
    "REUSED P50/P99 µs",
    "FRESH P50/P99 µs",
    "FRESH CPU µs",
    "REUSED/NATIVE",
    "FRESH/NATIVE",
    "FRESH/REUSED",
    "BASELINE",
    "FAILED",
    "STATE",
];

/// The column heads of the load table, in order.
pub const LOAD_COLUMNS: [&str; 5] = ["RULE", "LANGUAGE", "SIZE", "COMPILE ms", "CACHE LOAD ms"];

fn print(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    let pair = |p: &Option<Percentiles>| {
        p.map_or("-".to_owned(), |p| {
            format!("{:.2}/{:.2}", p.p50_us, p.p99_us)
        })
    };
    let ratio = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{r:.1}x"));
    let latency: Vec<Vec<String>> = report
        .rules
        .iter()
        .map(|r| {
            vec![
                r.rule.clone(),
                r.language.clone().unwrap_or_else(|| "-".into()),
                r.events.to_string(),
                pair(&r.native),
                pair(&r.reused),
                pair(&r.fresh),
                r.fresh
                    .map_or("-".to_owned(), |p| format!("{:.2}", p.cpu_us)),
                ratio(r.reused_vs_native),
                ratio(r.fresh_vs_native),
                ratio(r.fresh_vs_reused),
                match (&r.native, r.native_twin) {
                    (None, _) => "-".into(),
                    (Some(_), true) => "twin".into(),
                    (Some(_), false) => "reference".into(),
                },
                r.failures.to_string(),
                r.state.clone(),
            ]
        })
        .collect();
    writeln!(
        out,
        "{} events from {} ({} files skipped); {} timed calls per rule and variant, {}",
        report.events,
        report.events_dir.display(),
        report.skipped.len(),
        report.calls,
        match report.gap_us {
            0 => "back to back".to_owned(),
            us => format!("{us} µs apart"),
        }
    )?;
    writeln!(out, "native baseline: {}", report.baseline)?;
    writeln!(
        out,
        "  twin: the rule answered exactly as the baseline on every event (same work); \
         reference: it does other work, the baseline is only a yardstick"
    )?;
    writeln!(
        out,
        "FRESH CPU: CPU time of every thread of the process per fresh call, so instances \
         made and torn down off the event path count"
    )?;
    writeln!(out)?;
    table(&LATENCY_COLUMNS, &latency, out)?;
    writeln!(out)?;
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    let load: Vec<Vec<String>> = report
        .rules
        .iter()
        .map(|r| {
            vec![
                r.rule.clone(),
                r.language.clone().unwrap_or_else(|| "-".into()),
                r.size.map_or("-".into(), |s| s.to_string()),
                ms(r.load.as_ref().map(|l| l.compile_ms)),
                ms(r.load.as_ref().and_then(|l| l.cache_load_ms)),
            ]
        })
        .collect();
    table(&LOAD_COLUMNS, &load, out)
}

/// Writes an aligned table: text columns to the left, figures to the right,
/// two spaces apart; the last column unpadded.
fn table(heads: &[&str], rows: &[Vec<String>], out: &mut impl Write) -> std::io::Result<()> {
    let widths: Vec<usize> = (0..heads.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([heads[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let numeric = |i: usize| {
        rows.iter()
            .all(|r| r[i] == "-" || r[i].starts_with(|c: char| c.is_ascii_digit()))
    };
    let line = |cells: Vec<&str>, out: &mut dyn Write| -> std::io::Result<()> {
        let last = cells.len() - 1;
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            if i == last {
                s.push_str(c);
            } else if numeric(i) && i > 0 {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
                s.push_str("  ");
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(heads.to_vec(), out)?;
    for r in rows {
        line(r.iter().map(String::as_str).collect(), out)?;
    }
    Ok(())
}
