//! `sluice rules ls`: per rule its name, version, language, code size and
//! load state (from the files), and its calls, errors by kind and latency
//! over the last recorded decisions (from the store, through its read role).
//!
//! When a server answers `GET /status/rules` at the config's
//! `server.listen` for the same data directory, the load state, version,
//! breaker and statistics are the server's (what it serves, which may differ
//! from the files while a reload is pending or after one failed); else they
//! come from the files and the store. The output says which. It writes
//! nothing but the compile cache.

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use super::RulesDirArg;
use crate::rules::catalog::Entry;
use crate::rules::grants;

use crate::rules::reload::LoadState;
pub use crate::rules::stats::Recorded;
use crate::rules::stats::{LiveStatus, record_by_rule};
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
    /// The `sluice:router` interface version a component targets
    /// (`0.1.0`, `0.2.0`), when it loads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<&'static str>,
    /// The code file's size in bytes.
    pub size: Option<u64>,
    /// `ok`, or why the rule does not load.
    pub state: String,
    /// `approved`, or why the config's `[rules.grants]` does not approve
    /// what the manifest asks for (`serve` then refuses the rule).
    pub grant: Option<String>,
    /// Its circuit breaker (`closed`, `open`, `half-open`), from a server.
    pub breaker: Option<String>,
    /// What the recorded decisions say about it, when there is a store.
    pub recorded: Option<Recorded>,
}

/// Where the rows came from, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Listing {
    /// `server` (with its URL) or `files`.
    pub source: String,
    /// The server's `/status/rules`, when one answered.
    pub server: Option<String>,
    /// One row per rule.
    pub rules: Vec<RuleRow>,
}

/// Runs `sluice rules ls`.
pub async fn run(args: LsArgs) -> anyhow::Result<()> {
    let config = args.rules.load()?;
    let (_engine, entries) = super::load_rule_entries(&config, None, false)?;
    let live = from_server(&config).await;
    let db = config.data_dir().join(&config.store.path);
    let recorded = match &live {
        Some((_, live)) => live.recorded.clone(),
        None if db.exists() => {
            let reader = SqliteStore::open_read_only(&db)?;
            Some(record_by_rule(&reader, args.decisions).await?)
        }
        None => None,
    };
    let rows: Vec<RuleRow> = entries
        .iter()
        .map(|e| {
            let mut row = row(e);
            row.grant = e.manifest.as_ref().map(|m| {
                match grants::approve(m, &e.manifest_path, &config.rules.grants) {
                    Ok(()) => "approved".to_owned(),
                    Err(err) => err.message,
                }
            });
            if let Some((_, live)) = &live {
                serving(&mut row, live);
            }
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
    let listing = Listing {
        source: if live.is_some() { "server" } else { "files" }.to_owned(),
        server: live.as_ref().map(|(url, _)| url.clone()),
        rules: rows,
    };
    super::emit(args.json, &listing, |out| {
        print(&listing, recorded.is_some(), out)
    })?;
    Ok(())
}

/// The server's `/status/rules`, when a server answers at `server.listen`
/// within a second and serves this config's data directory.
async fn from_server(config: &crate::config::Config) -> Option<(String, LiveStatus)> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let url = format!("{}/status/rules", super::local_url(config.server.listen)?);
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let ask = async {
        let resp = client.get(url.parse().ok()?).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice::<LiveStatus>(&body).ok()
    };
    let live = tokio::time::timeout(std::time::Duration::from_secs(1), ask)
        .await
        .ok()??;
    let ours = std::path::absolute(config.data_dir()).ok()?;
    (live.data_dir == ours).then_some((url, live))
}

/// Takes the server's view of one rule: the version it serves, its load
/// state and its breaker.
fn serving(row: &mut RuleRow, live: &LiveStatus) {
    let Some(status) = live.board.rules.iter().find(|r| r.rule == row.name) else {
        row.state = "not loaded by the server".into();
        row.version = None;
        return;
    };
    row.version = status.version.clone();
    row.state = match (status.state, &status.error) {
        (LoadState::Loaded, _) => "ok".into(),
        (LoadState::Pending, _) => "pending (a file is being written)".into(),
        (LoadState::Failed, Some(e)) => e.clone(),
        (LoadState::Failed, None) => "failed".into(),
    };
    row.breaker = live.breakers.get(&row.name).cloned();
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
    let language = e.manifest.as_ref().map(|m| m.language(dir));
    RuleRow {
        name: e.name(),
        manifest: e.manifest_path.clone(),
        version: e.rule.as_ref().ok().map(|r| r.version().to_owned()),
        language,
        interface: e
            .rule
            .as_ref()
            .ok()
            .and_then(|r| r.interface())
            .map(|v| v.as_str()),
        size,
        state: match &e.rule {
            Ok(_) => "ok".to_owned(),
            Err(err) => err.to_string(),
        },
        grant: None,
        breaker: None,
        recorded: None,
    }
}

fn print(listing: &Listing, has_store: bool, out: &mut impl Write) -> std::io::Result<()> {
    let rows = &listing.rules;
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    writeln!(
        out,
        "{:width$}  {:<16}  {:<9}  {:>9}  {:>7}  {:>8}  {:>8}  {:<20}  {:<9}  {:<12}  STATE",
        "RULE",
        "VERSION",
        "LANGUAGE",
        "SIZE",
        "CALLS",
        "P50 µs",
        "P99 µs",
        "ERRORS",
        "BREAKER",
        "GRANT"
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
            "{:width$}  {:<16}  {:<9}  {:>9}  {calls:>7}  {p50:>8}  {p99:>8}  {errors:<20}  {:<9}  {:<12}  {}",
            r.name,
            r.version.as_deref().unwrap_or("-"),
            r.language.as_deref().unwrap_or("-"),
            r.size.map_or("-".into(), |s| s.to_string()),
            r.breaker.as_deref().unwrap_or("-"),
            match r.grant.as_deref() {
                None => "-",
                Some("approved") => "approved",
                Some(_) => "NOT APPROVED",
            },
            r.state
        )?;
        if let Some(why) = r.grant.as_deref().filter(|g| *g != "approved") {
            writeln!(out, "{:width$}  grant: {why}", "")?;
        }
    }
    match &listing.server {
        Some(url) => writeln!(
            out,
            "(from the running server, {url}: the versions it serves, their load state and breakers)"
        )?,
        None => writeln!(
            out,
            "(from the files: no server of this data directory answered; breakers unknown)"
        )?,
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
