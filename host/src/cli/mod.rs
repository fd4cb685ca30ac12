//! The `sluice` command line: one file per command.

pub mod admin;
pub mod bench;
pub mod check;
pub mod events;
pub mod export;
pub mod new_rule;
pub mod ops;
pub mod route;
pub mod rules_ls;
pub mod rules_test;
pub mod send;
pub mod serve;
pub mod store;
pub mod whatif;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// sluice: a webhook gateway with sandboxed routing rules.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The config file option every command shares.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// The config file (TOML). Without it, the embedded defaults (sluice.toml).
    #[arg(long, short = 'c', env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    /// Loads the config this option names.
    pub fn load(&self) -> anyhow::Result<crate::config::Config> {
        Ok(crate::config::Config::load(self.config.as_deref())?)
    }
}

/// The rules-directory option of the rule-author commands.
#[derive(Debug, Clone, clap::Args)]
pub struct RulesDirArg {
    /// The config file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Another rules directory instead of the config's `rules.dir` (every
    /// manifest in it loads; the rest of `[rules]` applies as configured).
    #[arg(long, value_name = "DIR", alias = "rules")]
    pub dir: Option<PathBuf>,
}

impl RulesDirArg {
    /// Loads the config, with `rules.dir` replaced when `--dir` is given.
    pub fn load(&self) -> anyhow::Result<crate::config::Config> {
        let mut config = self.config.load()?;
        if let Some(dir) = &self.dir {
            use_rules_dir(&mut config, dir)?;
        }
        Ok(config)
    }
}

/// Writes a read command's result to stdout: one JSON document with
/// `--json`, else the command's own text.
pub fn emit<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(&mut std::io::StdoutLock<'static>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, value)?;
        writeln!(out)?;
    } else {
        text(&mut out)?;
    }
    Ok(())
}

/// Loads each rule of the config's rules directory on its own, as the
/// rule-author commands see them (a broken rule is an entry with its error,
/// not a failure of the command), keeping only the rule named `only` when
/// given. `ready`: whether component rules keep instances made ahead of time
/// (`rules.pool.ready_per_rule`), as `serve` runs them; a command that calls
/// each rule a few times has no use for them. The engine is returned with
/// the entries, whose rules run on it.
pub fn load_rule_entries(
    config: &crate::config::Config,
    only: Option<&str>,
    ready: bool,
) -> anyhow::Result<(
    crate::rules::wasm::WasmEngine,
    Vec<crate::rules::catalog::Entry>,
)> {
    let cache = config.rules.cache_dir(&config.base_dir, config.data_dir());
    let mut pool = config.rules.pool.clone();
    if !ready {
        pool.ready_per_rule = 0;
    }
    let engine = crate::rules::wasm::WasmEngine::with_pool(Some(cache), &pool)?;
    let mut entries = crate::rules::catalog::load_each(&config.rules, &config.base_dir, &engine)?;
    if let Some(name) = only {
        entries.retain(|e| e.name() == name);
        if entries.is_empty() {
            anyhow::bail!(
                "no rule named {name:?} in {}",
                config.rules.rules_dir(&config.base_dir).display()
            );
        }
    }
    Ok((engine, entries))
}

/// Points the config's `[rules]` at another directory (relative to the
/// working directory): every manifest in it loads, in file-name order,
/// whatever `rules.load` lists for the configured one.
pub fn use_rules_dir(
    config: &mut crate::config::Config,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if !dir.is_dir() {
        anyhow::bail!("{}: not a rules directory", dir.display());
    }
    let dir = std::path::absolute(dir).with_context(|| format!("{}", dir.display()))?;
    config.rules.dir = dir;
    config.rules.load = None;
    Ok(())
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(serve::ServeArgs),
    /// Validate the config (and the secrets it names) without serving.
    Check(check::CheckArgs),
    /// Sign a payload the way the provider would and POST it (also a small load generator).
    Send(send::SendArgs),
    /// Read stored events; replay one, or follow them live.
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// The dead-letter queue of the running server: list, retry.
    #[command(subcommand)]
    Dlq(ops::DlqCommand),
    /// Deliveries to agents, from the running server.
    #[command(subcommand)]
    Deliveries(ops::DeliveriesCommand),
    /// Per-source intake, from the running server.
    #[command(subcommand)]
    Sources(ops::SourcesCommand),
    /// Agents of the running server: list, pause, resume.
    #[command(subcommand)]
    Agents(ops::AgentsCommand),
    /// The store's sizes, counts and oldest event.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Dry-run the rules on a payload and print each rule's decision with timings.
    Route(route::RouteArgs),
    /// Rule-author commands: list the rules, run their test vectors.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Write a skeleton: `sluice new rule NAME --lang rhai`.
    #[command(subcommand)]
    New(new_rule::NewCommand),
    /// Re-run stored events through a candidate rule set and show which
    /// routes would change against the recorded decisions (writes nothing).
    Whatif(whatif::WhatifArgs),
    /// Time each rule on real payloads (fresh and reused instance) beside a
    /// native Rust rule, as ratios; and its compile and cache-load times.
    Bench(bench::BenchArgs),
}

/// `sluice rules ...`.
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Per rule: version, language, size, load state, and calls, errors and
    /// latency from the recorded decisions.
    Ls(rules_ls::LsArgs),
    /// Run the rules' test vectors, all of them, and show a diff for each
    /// that fails.
    Test(rules_test::TestArgs),
}

/// Runs a parsed command line.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(a) => serve::run(a).await,
        Command::Check(a) => check::run(a).await,
        Command::Send(a) => send::run(a).await,
        Command::Events(c) => events::run(c).await,
        Command::Dlq(c) => ops::dlq(c).await,
        Command::Deliveries(c) => ops::deliveries(c).await,
        Command::Sources(c) => ops::sources(c).await,
        Command::Agents(c) => ops::agents(c).await,
        Command::Store(c) => store::run(c),
        Command::Route(a) => route::run(a),
        Command::Rules(RulesCommand::Ls(a)) => rules_ls::run(a).await,
        Command::Rules(RulesCommand::Test(a)) => rules_test::run(a),
        Command::Whatif(a) => whatif::run(a).await,
        Command::New(c) => new_rule::run(c),
        Command::Bench(a) => bench::run(a),
    }
}

/// Writes a decision as text: one line per rule (name, version, duration,
/// outcome) followed by the fields behind its outcome, then the merged
/// routes (for `route` and `events show`).
pub fn write_decision(
    d: &crate::decision::Decision,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    use crate::decision::{RuleOutcome, Verdict};
    let width = d.rules.iter().map(|r| r.rule.len()).max().unwrap_or(4);
    for r in &d.rules {
        let outcome = match &r.outcome {
            RuleOutcome::Skipped => "skipped (not wanted or not granted)".to_owned(),
            RuleOutcome::Verdict(Verdict::Ignore(reason)) => format!("ignore: {reason}"),
            RuleOutcome::Verdict(Verdict::Routes(rs)) if rs.is_empty() => "no routes".to_owned(),
            RuleOutcome::Verdict(Verdict::Routes(rs)) => {
                let parts: Vec<_> = rs
                    .iter()
                    .map(|r| format!("{} ({})", r.agent, r.priority.as_str()))
                    .collect();
                format!("routes: {}", parts.join(", "))
            }
            RuleOutcome::Failed(f) => format!("FAILED {}: {f}", f.kind()),
        };
        writeln!(
            out,
            "  {:width$}  {}  {:>7} µs  {outcome}",
            r.rule, r.version, r.duration_us
        )?;
        if let Some(why) = explain(r) {
            writeln!(out, "  {:width$}    {why}", "")?;
        }
        if let Some(v) = &r.violation {
            writeln!(out, "  {:width$}  VIOLATION: {v}", "")?;
        }
    }
    if d.routes.is_empty() {
        writeln!(out, "routes: none")?;
    } else {
        writeln!(out, "routes:")?;
        for r in &d.routes {
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
    if let Some(reason) = &d.dead_letter {
        writeln!(out, "dead-letter: {reason}")?;
    }
    if let Some(defer) = &d.defer {
        writeln!(
            out,
            "deferred {} ms (not an attempt): {}",
            defer.delay.as_millis(),
            defer.reason
        )?;
    }
    Ok(())
}

/// One rule's outcome explained by the fields it read:
/// `coordinator, critical: kind = issues, action = labeled, /label/name = agent-execute`.
/// None when the rule read nothing (or was not run).
pub fn explain(r: &crate::decision::RuleRecord) -> Option<String> {
    use crate::decision::{RuleOutcome, Verdict};
    if r.reads.is_empty() && r.reads_dropped == 0 {
        return None;
    }
    let what = match &r.outcome {
        RuleOutcome::Skipped => return None,
        RuleOutcome::Verdict(Verdict::Routes(rs)) if rs.is_empty() => "no routes".to_owned(),
        RuleOutcome::Verdict(Verdict::Routes(rs)) => rs
            .iter()
            .map(|r| format!("{}, {}", r.agent, r.priority.as_str()))
            .collect::<Vec<_>>()
            .join("; "),
        RuleOutcome::Verdict(Verdict::Ignore(_)) => "ignore".to_owned(),
        RuleOutcome::Failed(_) => "read before failing".to_owned(),
    };
    let mut fields: Vec<String> = r.reads.iter().map(ToString::to_string).collect();
    if r.reads_dropped > 0 {
        fields.push(format!("and {} more reads not recorded", r.reads_dropped));
    }
    Some(format!("{what}: {}", fields.join(", ")))
}

/// `http://HOST:PORT` to reach a listener of this machine's server at
/// `listen` (an unspecified address is reached on loopback); `None` when the
/// port is 0, chosen by the server at start.
pub fn local_url(listen: std::net::SocketAddr) -> Option<String> {
    if listen.port() == 0 {
        return None;
    }
    let host = if listen.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    };
    Some(format!("http://{host}"))
}
