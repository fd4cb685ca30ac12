//! `sluice route`: dry-run the rules on a payload file and print each rule's
//! decision (name, version, outcome, duration) and the merged routes.
//!
//! It builds the event in memory and never touches the store, the network or
//! any agent: it only loads the rule set the config names and runs it once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::decision::{Decision, RuleFailure, RuleOutcome, Verdict};
use crate::event::{Event, ParsedEvent, Provider};
use crate::rules::RuleSet;
use crate::rules::config::RulesConfig;
use crate::rules::wasm::WasmEngine;

/// Arguments of `sluice route`.
#[derive(Debug, Clone, clap::Args)]
pub struct RouteArgs {
    /// The sluice config file (its `[rules]` section says which rules load).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The source the event would arrive on (`github`, `gitlab-main`, ...).
    #[arg(long)]
    pub source: String,
    /// The provider behind the source; defaults to the source name when it is one.
    #[arg(long)]
    pub provider: Option<String>,
    /// The event kind (the `X-GitHub-Event` / `X-Gitlab-Event` header value).
    #[arg(long = "event", value_name = "KIND")]
    pub kind: String,
    /// The action; read from the payload when not given.
    #[arg(long)]
    pub action: Option<String>,
    /// The payload file (JSON).
    #[arg(value_name = "PAYLOAD.json")]
    pub payload: PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What one dry run did, as printed by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    /// The event as the rules saw it.
    pub event: Event,
    /// The rules loaded, in order.
    pub rule_set: Vec<LoadedRule>,
    /// How long loading (compiling or reading the cache) took, in microseconds.
    pub load_us: u64,
    /// The decision: per-rule records and merged routes.
    pub decision: Decision,
}

/// One loaded rule, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct LoadedRule {
    /// Its name.
    pub name: String,
    /// Its version (content hash).
    pub version: String,
    /// The file its code came from.
    pub origin: PathBuf,
}

/// Runs `sluice route`. Reads only the `[rules]` section of the config file.
pub fn run(args: RouteArgs) -> anyhow::Result<()> {
    let (rules, base_dir) = rules_section(&args.config)?;
    let provider = match &args.provider {
        Some(p) => {
            Provider::parse(p).with_context(|| format!("--provider: unknown provider {p:?}"))?
        }
        None => match Provider::parse(&args.source) {
            Some(p) => p,
            None => bail!(
                "cannot tell the provider of source {:?}; pass --provider",
                args.source
            ),
        },
    };
    let report = route_file(
        &rules,
        &base_dir,
        &args.source,
        provider,
        &args.kind,
        args.action,
        &args.payload,
    )?;
    let mut out = std::io::stdout().lock();
    print(&report, args.json, &mut out)?;
    Ok(())
}

/// The `[rules]` section of a config file and the directory paths in it are
/// relative to. (The full `Config` loader replaces this on integration.)
fn rules_section(path: &Path) -> anyhow::Result<(RulesConfig, PathBuf)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
    let rules = match table.get("rules") {
        Some(v) => {
            let rules: RulesConfig = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
                anyhow::anyhow!("{}: rules.{}: {}", path.display(), e.path(), e.inner())
            })?;
            rules
        }
        None => RulesConfig::default(),
    };
    let base = path
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((rules, base))
}

/// Loads the rule set `rules` describes and runs it once on the payload file.
pub fn route_file(
    rules: &RulesConfig,
    base_dir: &Path,
    source: &str,
    provider: Provider,
    kind: &str,
    action: Option<String>,
    payload: &Path,
) -> anyhow::Result<DryRun> {
    let body =
        std::fs::read(payload).with_context(|| format!("{}: cannot read", payload.display()))?;
    if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        bail!("{}: not a JSON document", payload.display());
    }
    let cache = rules.cache_dir(base_dir);
    let engine = WasmEngine::new(Some(cache))?;
    let start = Instant::now();
    let set = RuleSet::load(rules, base_dir, &engine)?;
    let load_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    let event = Event::dry_run(source, provider, kind, action, body.into());
    let ev = Arc::new(ParsedEvent::new(event));
    let decision = set.route(&ev);
    let rule_set = set
        .rules()
        .map(|r| LoadedRule {
            name: r.name().into(),
            version: r.version().into(),
            origin: r.origin().into(),
        })
        .collect();
    let event = Arc::try_unwrap(ev)
        .map(|p| p.event)
        .unwrap_or_else(|p| p.event.clone());
    Ok(DryRun {
        event,
        rule_set,
        load_us,
        decision,
    })
}

/// Prints a dry run as text or as one JSON document.
pub fn print(report: &DryRun, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, report)?;
        writeln!(out)?;
        return Ok(());
    }
    let ev = &report.event;
    writeln!(
        out,
        "event: {} {} {}{}  ({} rules loaded in {} µs)",
        ev.source,
        ev.provider,
        ev.kind,
        ev.action
            .as_deref()
            .map(|a| format!(".{a}"))
            .unwrap_or_default(),
        report.rule_set.len(),
        report.load_us
    )?;
    let width = report
        .decision
        .rules
        .iter()
        .map(|r| r.rule.len())
        .max()
        .unwrap_or(4);
    for r in &report.decision.rules {
        let outcome = match &r.outcome {
            RuleOutcome::Skipped => "skipped (does not want this event)".to_owned(),
            RuleOutcome::Verdict(Verdict::Ignore(reason)) => format!("ignore: {reason}"),
            RuleOutcome::Verdict(Verdict::Routes(rs)) if rs.is_empty() => "no routes".to_owned(),
            RuleOutcome::Verdict(Verdict::Routes(rs)) => {
                let parts: Vec<_> = rs
                    .iter()
                    .map(|r| format!("{} ({})", r.agent, r.priority.as_str()))
                    .collect();
                format!("routes: {}", parts.join(", "))
            }
            RuleOutcome::Failed(f) => format!("FAILED {}: {f}", failure_kind(f)),
        };
        writeln!(
            out,
            "  {:width$}  {}  {:>7} µs  {outcome}",
            r.rule, r.version, r.duration_us
        )?;
    }
    if report.decision.routes.is_empty() {
        writeln!(out, "routes: none")?;
    } else {
        writeln!(out, "routes:")?;
        for r in &report.decision.routes {
            let workflow = r
                .workflow
                .as_deref()
                .map(|w| format!(" workflow={w}"))
                .unwrap_or_default();
            let labels = if r.labels.is_empty() {
                String::new()
            } else {
                format!(" [{}]", r.labels.join(", "))
            };
            writeln!(
                out,
                "  {} ({}){workflow}{labels}: {}",
                r.agent,
                r.priority.as_str(),
                r.reason
            )?;
        }
    }
    if let Some(reason) = &report.decision.dead_letter {
        writeln!(out, "dead-letter: {reason}")?;
    }
    Ok(())
}

fn failure_kind(f: &RuleFailure) -> &'static str {
    match f {
        RuleFailure::Guest(_) => "guest error",
        RuleFailure::Timeout(_) => "timeout",
        RuleFailure::Memory(_) => "memory",
        RuleFailure::Trap(_) => "trap",
        RuleFailure::Disabled(_) => "disabled",
    }
}
