//! The `sluice` command line: one file per command.

pub mod check;
pub mod events;
pub mod send;
pub mod serve;

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
    /// The config file (TOML). Without it, the embedded defaults (examples/sluice.toml).
    #[arg(long, short = 'c', env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    /// Loads the config this option names.
    pub fn load(&self) -> anyhow::Result<crate::config::Config> {
        Ok(crate::config::Config::load(self.config.as_deref())?)
    }
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
    /// Read stored events.
    #[command(subcommand)]
    Events(events::EventsCommand),
}

/// Runs a parsed command line.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(a) => serve::run(a).await,
        Command::Check(a) => check::run(a),
        Command::Send(a) => send::run(a).await,
        Command::Events(c) => events::run(c),
    }
}

/// A decision as indented text lines (for `events show` and `route`).
pub fn render_decision(d: &crate::decision::Decision) -> String {
    use crate::decision::{RuleOutcome, Verdict};
    let mut out = String::new();
    for r in &d.rules {
        let what = match &r.outcome {
            RuleOutcome::Verdict(Verdict::Routes(routes)) if routes.is_empty() => {
                "no routes".to_string()
            }
            RuleOutcome::Verdict(Verdict::Routes(routes)) => routes
                .iter()
                .map(|rt| format!("{} ({})", rt.agent, rt.priority.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
            RuleOutcome::Verdict(Verdict::Ignore(why)) => format!("ignore: {why}"),
            RuleOutcome::Failed(f) => format!("FAILED: {f}"),
            RuleOutcome::Skipped => "skipped (does not want this event)".to_string(),
        };
        out.push_str(&format!(
            "  rule {} @{} · {} µs · {what}\n",
            r.rule, r.version, r.duration_us
        ));
    }
    out.push_str("  routes:\n");
    for rt in &d.routes {
        let wf = rt
            .workflow
            .as_deref()
            .map(|w| format!(" workflow {w}"))
            .unwrap_or_default();
        let labels = if rt.labels.is_empty() {
            String::new()
        } else {
            format!(" [{}]", rt.labels.join(", "))
        };
        out.push_str(&format!(
            "    → {} ({}){wf}{labels}: {}\n",
            rt.agent,
            rt.priority.as_str(),
            rt.reason
        ));
    }
    if let Some(dl) = &d.dead_letter {
        out.push_str(&format!("  dead-lettered: {dl}\n"));
    }
    out
}
