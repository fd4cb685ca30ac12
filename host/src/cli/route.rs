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

use super::ConfigArg;
use crate::decision::Decision;
use crate::event::{Event, ParsedEvent, Provider};
use crate::rules::RuleSet;
use crate::rules::config::RulesConfig;
use crate::rules::wasm::WasmEngine;

/// Arguments of `sluice route`.
#[derive(Debug, Clone, clap::Args)]
pub struct RouteArgs {
    /// The config file (its `[rules]` section says which rules load).
    #[command(flatten)]
    pub config: ConfigArg,
    /// The source the event would arrive on (`github`, `gitlab`, ...).
    #[arg(long)]
    pub source: String,
    /// The provider behind the source; defaults to the configured source's
    /// provider, or to the source name when it names a provider.
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

/// Runs `sluice route`.
pub fn run(args: RouteArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let provider = match &args.provider {
        Some(p) => {
            Provider::parse(p).with_context(|| format!("--provider: unknown provider {p:?}"))?
        }
        None => match config
            .sources
            .get(&args.source)
            .map(|s| s.provider)
            .or(Provider::parse(&args.source))
        {
            Some(p) => p,
            None => bail!(
                "source {:?} is not in {}; pass --provider",
                args.source,
                config.origin
            ),
        },
    };
    let cache = config.rules.cache_dir(&config.base_dir, config.data_dir());
    let report = route_file(
        &config.rules,
        &config.base_dir,
        &cache,
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

/// Loads the rule set `rules` describes and runs it once on the payload file.
#[allow(clippy::too_many_arguments)]
pub fn route_file(
    rules: &RulesConfig,
    base_dir: &Path,
    cache: &Path,
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
    let engine = WasmEngine::with_cache(Some(cache.to_path_buf()), &rules.cache, &rules.pool)?;
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
    crate::cli::write_decision(&report.decision, out)?;
    Ok(())
}
