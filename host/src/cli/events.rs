//! `sluice events ls|show`: read the store without a running server.
//! It opens the SQLite file read-only; WAL lets it read while `serve` writes.
//! `sluice events replay|tail` act through the running server's admin API
//! (see [`super::ops`]); `sluice events export|import` are in
//! [`super::export`].

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::json;

use super::ConfigArg;
use crate::config::Config;
use crate::event::EventStatus;
use crate::store::sqlite::{SqliteStore, get_record, list_summaries};
use crate::store::{EventSummary, ListFilter};

/// `sluice events ...`.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// List stored events, newest first.
    Ls {
        /// The config file.
        #[command(flatten)]
        config: ConfigArg,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only this status (pending, claimed, routed, dead).
        #[arg(long)]
        status: Option<String>,
        /// Only events this rule did not see because its circuit breaker had
        /// switched it off (their latest decision records it as disabled), to
        /// replay them once the rule is fixed.
        #[arg(long, value_name = "RULE")]
        rule_disabled: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// One JSON array for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show one event with its headers and decision.
    Show {
        /// The config file.
        #[command(flatten)]
        config: ConfigArg,
        /// The event id (`evt_...`).
        id: String,
        /// One JSON document for scripts (includes the payload).
        #[arg(long)]
        json: bool,
    },
    /// Route a stored event again through the rules serving now (asks the
    /// running server). Its new deliveries carry the same idempotency keys
    /// as the first routing's, so agents can drop repeats.
    Replay {
        /// Where the admin API is.
        #[command(flatten)]
        admin: super::admin::AdminArgs,
        /// The event id (`evt_...`).
        id: String,
    },
    /// Write every stored event, oldest first, with its decision and its
    /// deliveries' and workflow runs' state, as JSON lines: a backup, or
    /// the way to another store backend. Reads the store file read-only,
    /// so it works while `sluice serve` runs.
    Export(super::export::ExportArgs),
    /// Store the events of an export file in the configured store, with
    /// their ids, bodies, decisions and delivery state; events it holds
    /// already are skipped. Run it while `sluice serve` is stopped.
    Import(super::export::ImportArgs),
    /// Follow new events, their decisions and delivery outcomes as they
    /// happen (asks the running server), until interrupted.
    Tail {
        /// Where the admin API is.
        #[command(flatten)]
        admin: super::admin::AdminArgs,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// The SQLite file of the config's data dir; an error when there is none yet.
pub(crate) fn db_path(config: &Config) -> anyhow::Result<PathBuf> {
    if config.store.backend == crate::config::Backend::Nats {
        bail!(
            "{}: store.backend = \"nats\": this command reads the embedded store's file; \
             on a cluster ask a node's admin API (`sluice events tail`, `sluice deliveries ls`, \
             `sluice dlq ls`, `GET /v1/events`)",
            config.origin
        );
    }
    let path = config.data_dir().join(&config.store.path);
    if !path.exists() {
        bail!(
            "no store at {} (has `sluice serve` run with this config and data dir?)",
            path.display()
        );
    }
    Ok(path)
}

pub(crate) fn time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Runs `sluice events ...`.
pub async fn run(cmd: EventsCommand) -> anyhow::Result<()> {
    match cmd {
        EventsCommand::Replay { admin, id } => return super::ops::replay(&admin, &id).await,
        EventsCommand::Tail { admin, json } => return super::ops::tail(&admin, json).await,
        EventsCommand::Export(args) => return super::export::export(args).await,
        EventsCommand::Import(args) => return super::export::import(args).await,
        EventsCommand::Ls {
            config,
            source,
            kind,
            status,
            rule_disabled,
            limit,
            json,
        } => {
            let config = config.load()?;
            let conn = SqliteStore::open_read_only(&db_path(&config)?)?;
            let status = match status.as_deref() {
                None => None,
                Some(s) => Some(EventStatus::parse(s).with_context(|| {
                    format!("--status {s:?}: expected pending, claimed, routed or dead")
                })?),
            };
            let rows = list_summaries(
                &conn,
                &ListFilter {
                    source,
                    kind,
                    status,
                    rule_disabled,
                    since_ms: None,
                    limit,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_table(&rows);
            }
        }
        EventsCommand::Show { config, id, json } => {
            let config = config.load()?;
            let conn = SqliteStore::open_read_only(&db_path(&config)?)?;
            let rec = get_record(&conn, &id)?.with_context(|| format!("no event with id {id}"))?;
            if json {
                let payload: serde_json::Value =
                    serde_json::from_slice(&rec.event.body).unwrap_or(serde_json::Value::Null);
                let doc = json!({
                    "event": rec.summary,
                    "headers": rec.event.headers,
                    "decision": rec.decision,
                    "last_error": rec.last_error,
                    "payload": payload,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                let s = &rec.summary;
                println!("id           {}", s.id);
                println!("delivery id  {} ({})", s.delivery_id, s.id_origin.as_str());
                if let Some(earlier) = &s.conflict_with {
                    println!(
                        "id conflict  the same delivery id came earlier with another body: {earlier}"
                    );
                }
                println!("source       {} ({})", s.source, s.provider);
                println!("kind         {}", s.kind);
                println!("action       {}", s.action.as_deref().unwrap_or("-"));
                println!("received     {}", time(s.received_at_ms));
                println!("size         {} bytes", s.size);
                println!(
                    "status       {} (claims: {})",
                    s.status.as_str(),
                    s.attempts
                );
                if let Some(e) = &rec.last_error {
                    println!("last error   {e}");
                }
                println!("headers");
                for (k, v) in &rec.event.headers {
                    println!("  {k}: {v}");
                }
                match &rec.decision {
                    None => println!("decision     (none yet)"),
                    Some(d) => {
                        println!("decision     at {}", time(d.decided_at_ms));
                        crate::cli::write_decision(d, &mut std::io::stdout().lock())?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn print_table(rows: &[EventSummary]) {
    println!(
        "{:<36}  {:<24}  {:<10}  {:<22}  {:<16}  {:>8}  {:<7}  DELIVERY",
        "ID", "RECEIVED", "SOURCE", "KIND", "ACTION", "SIZE", "STATUS"
    );
    for r in rows {
        println!(
            "{:<36}  {:<24}  {:<10}  {:<22}  {:<16}  {:>8}  {:<7}  {}",
            r.id,
            time(r.received_at_ms),
            r.source,
            r.kind,
            r.action.as_deref().unwrap_or("-"),
            r.size,
            r.status.as_str(),
            r.delivery_id
        );
    }
}
