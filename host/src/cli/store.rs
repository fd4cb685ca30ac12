//! `sluice store stats`: sizes, counts and the oldest event, read without a
//! running server (the index is opened read-only; WAL lets it read while
//! `serve` writes).

use clap::Subcommand;

use super::{ConfigArg, emit};
use crate::store::sqlite::SqliteStore;

/// `sluice store ...`.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Events by status, queue depth, dead letters, the oldest and newest
    /// event, the index's and the log's size, and the retention in force.
    Stats {
        /// The config file.
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON document for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `sluice store ...`.
pub fn run(cmd: StoreCommand) -> anyhow::Result<()> {
    match cmd {
        StoreCommand::Stats { config, json } => {
            let config = config.load()?;
            let path = super::events::db_path(&config)?;
            let stats = SqliteStore::open_read_only(&path)?.stats()?;
            let retention = humantime::format_duration(config.store.retention).to_string();
            let doc = serde_json::json!({
                "index": path,
                "retention": retention,
                "stats": stats,
            });
            emit(json, &doc, |out| {
                use std::io::Write;
                let s = &stats;
                writeln!(
                    out,
                    "index         {} ({})",
                    path.display(),
                    bytes(s.index_bytes)
                )?;
                writeln!(
                    out,
                    "log           {} segment(s), {}",
                    s.log_segments,
                    bytes(s.log_bytes)
                )?;
                let statuses: Vec<String> = s
                    .by_status
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                writeln!(out, "events        {} ({})", s.events, statuses.join(", "))?;
                writeln!(out, "queue depth   {}", s.queue_depth)?;
                writeln!(out, "dead letters  {}", s.dead_letters)?;
                writeln!(out, "decisions     {}", s.decisions)?;
                writeln!(out, "oldest event  {}", when(s.oldest_received_at_ms))?;
                writeln!(out, "newest event  {}", when(s.newest_received_at_ms))?;
                writeln!(out, "retention     {retention}")
            })
        }
    }
}

fn when(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".to_string(), super::events::time)
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
