//! The operator commands over the running server's admin API: `dlq ls|retry`,
//! `deliveries ls`, `sources ls`, `agents ls|pause|resume`, and `events
//! replay|tail`. They print what the API answers; `--json` prints it as is.

use std::io::Write;
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use serde_json::{Value, json};

use super::admin::{AdminArgs, AdminClient, encode};
use super::events::time;
use crate::admin::queries::{TailBatch, TailDecision, TailDelivery, TailEvent};

/// `sluice dlq ...`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List the dead letters, newest first.
    Ls {
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON array for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Retry one dead letter (`dlv_N` is sent again, `evt_…` routed again),
    /// or all of them.
    Retry {
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
        /// The dead letter (`dlv_N` or `evt_...`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// `sluice deliveries ...`.
#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List deliveries, newest first.
    Ls {
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
        /// Only to this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only in this status (queued, delivered, dead).
        #[arg(long)]
        status: Option<String>,
        /// Only of this event.
        #[arg(long)]
        event: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON array for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// `sluice sources ...`.
#[derive(Debug, Subcommand)]
pub enum SourcesCommand {
    /// Per source: events stored, last received, last verification failure,
    /// refusals since start.
    Ls {
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
        /// One JSON array for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// `sluice agents ...`.
#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Per agent: kind, paused, queued deliveries.
    Ls {
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
        /// One JSON array for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Hold deliveries to an agent (they wait; nothing is dropped).
    Pause {
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
        /// The agent.
        name: String,
    },
    /// Send an agent's deliveries again.
    Resume {
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
        /// The agent.
        name: String,
    },
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn when(v: &Value) -> String {
    v.as_i64().map_or_else(|| "-".into(), time)
}

/// A table column: its heading and how a row's cell reads.
type Column<'a> = (&'a str, &'a dyn Fn(&Value) -> String);

/// Prints `rows` as JSON, or as a table with these columns.
fn table(json: bool, rows: &Value, columns: &[Column<'_>]) -> anyhow::Result<()> {
    let rows = rows.as_array().cloned().unwrap_or_default();
    super::emit(json, &rows, |out| {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| columns.iter().map(|(_, f)| f(r)).collect())
            .collect();
        let widths: Vec<usize> = columns
            .iter()
            .enumerate()
            .map(|(i, (h, _))| {
                cells
                    .iter()
                    .map(|c| c[i].len())
                    .chain([h.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |out: &mut std::io::StdoutLock<'static>, cells: Vec<&str>| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    s.push_str(c);
                } else {
                    s.push_str(&format!("{c:w$}  ", w = widths[i]));
                }
            }
            writeln!(out, "{}", s.trim_end())
        };
        line(out, columns.iter().map(|(h, _)| *h).collect())?;
        for row in &cells {
            line(out, row.iter().map(String::as_str).collect())?;
        }
        Ok(())
    })
}

/// Runs `sluice dlq ...`.
pub async fn dlq(cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::Ls { admin, limit, json } => {
            let v = AdminClient::from_args(&admin)?
                .get(&format!("/v1/dlq?limit={limit}"))
                .await?;
            table(
                json,
                &v["dead_letters"],
                &[
                    ("ID", &|r| text(&r["id"])),
                    ("KIND", &|r| text(&r["kind"])),
                    ("EVENT", &|r| text(&r["event_id"])),
                    ("AGENT", &|r| text(&r["agent"])),
                    ("AT", &|r| when(&r["at_ms"])),
                    ("REASON", &|r| text(&r["reason"])),
                ],
            )
        }
        DlqCommand::Retry { admin, id, all } => {
            let client = AdminClient::from_args(&admin)?;
            if all {
                let v = client.post("/v1/dlq/retry-all").await?;
                println!(
                    "retried {}, failed {}",
                    text(&v["retried"]),
                    text(&v["failed"])
                );
                for f in v["failures"].as_array().into_iter().flatten() {
                    println!("  {}: {}", text(&f["id"]), text(&f["error"]));
                }
            } else {
                let id = id.unwrap_or_default();
                client
                    .post(&format!("/v1/dlq/{}/retry", encode(&id)))
                    .await?;
                println!("{id}: retrying");
            }
            Ok(())
        }
    }
}

/// Runs `sluice deliveries ...`.
pub async fn deliveries(cmd: DeliveriesCommand) -> anyhow::Result<()> {
    let DeliveriesCommand::Ls {
        admin,
        agent,
        status,
        event,
        limit,
        json,
    } = cmd;
    let mut path = format!("/v1/deliveries?limit={limit}");
    for (k, v) in [("agent", agent), ("status", status), ("event", event)] {
        if let Some(v) = v {
            path.push_str(&format!("&{k}={}", encode(&v)));
        }
    }
    let v = AdminClient::from_args(&admin)?.get(&path).await?;
    table(
        json,
        &v["deliveries"],
        &[
            ("ID", &|r| text(&r["id"])),
            ("EVENT", &|r| text(&r["event_id"])),
            ("AGENT", &|r| text(&r["agent"])),
            ("STATUS", &|r| text(&r["status"])),
            ("ATTEMPTS", &|r| text(&r["attempts"])),
            ("CREATED", &|r| when(&r["created_at_ms"])),
            ("LAST ERROR", &|r| text(&r["last_error"])),
        ],
    )
}

/// Runs `sluice sources ...`.
pub async fn sources(cmd: SourcesCommand) -> anyhow::Result<()> {
    let SourcesCommand::Ls { admin, json } = cmd;
    let v = AdminClient::from_args(&admin)?.get("/v1/sources").await?;
    table(
        json,
        &v["sources"],
        &[
            ("NAME", &|r| text(&r["name"])),
            ("PROVIDER", &|r| text(&r["provider"])),
            ("EVENTS", &|r| text(&r["events"])),
            ("LAST RECEIVED", &|r| when(&r["last_received_ms"])),
            ("LAST VERIFICATION FAILURE", &|r| {
                let f = &r["since_start"]["last_verification_failure"];
                if f.is_null() {
                    "-".into()
                } else {
                    format!("{} {}", when(&f["at_ms"]), text(&f["reason"]))
                }
            }),
            ("REFUSED SINCE START", &|r| {
                let by = r["since_start"]["rejections"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                if by.is_empty() {
                    "-".into()
                } else {
                    by.iter()
                        .map(|(k, n)| format!("{k}={n}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                }
            }),
        ],
    )
}

/// Runs `sluice agents ...`.
pub async fn agents(cmd: AgentsCommand) -> anyhow::Result<()> {
    match cmd {
        AgentsCommand::Ls { admin, json } => {
            let v = AdminClient::from_args(&admin)?.get("/v1/agents").await?;
            table(
                json,
                &v["agents"],
                &[
                    ("NAME", &|r| text(&r["name"])),
                    ("KIND", &|r| text(&r["kind"])),
                    ("PAUSED", &|r| text(&r["paused"])),
                    ("QUEUED", &|r| text(&r["queued"])),
                ],
            )
        }
        AgentsCommand::Pause { admin, name } => {
            AdminClient::from_args(&admin)?
                .post(&format!("/v1/agents/{}/pause", encode(&name)))
                .await?;
            println!("{name}: paused");
            Ok(())
        }
        AgentsCommand::Resume { admin, name } => {
            AdminClient::from_args(&admin)?
                .post(&format!("/v1/agents/{}/resume", encode(&name)))
                .await?;
            println!("{name}: resumed");
            Ok(())
        }
    }
}

/// Runs `sluice events replay ID`.
pub async fn replay(admin: &AdminArgs, id: &str) -> anyhow::Result<()> {
    AdminClient::from_args(admin)?
        .post(&format!("/v1/events/{}/replay", encode(id)))
        .await?;
    println!("{id}: requeued; it routes again through the rules serving now");
    Ok(())
}

/// How long each tail request waits for something new.
const TAIL_WAIT: Duration = Duration::from_secs(10);

/// Runs `sluice events tail`: one line per event, decision and settled
/// delivery, as they happen, until interrupted.
pub async fn tail(admin: &AdminArgs, json: bool) -> anyhow::Result<()> {
    let client = AdminClient::from_args(admin)?;
    let start = client.get("/v1/tail").await?;
    let Some(mut cursor) = start["cursor"].as_str().map(str::to_owned) else {
        bail!("admin API: /v1/tail answered without a cursor");
    };
    loop {
        let v = client
            .get_waiting(
                &format!(
                    "/v1/tail?after={}&wait={}",
                    encode(&cursor),
                    TAIL_WAIT.as_millis()
                ),
                TAIL_WAIT,
            )
            .await?;
        let batch: TailBatch = serde_json::from_value(v)?;
        let mut out = std::io::stdout().lock();
        for e in &batch.events {
            print_event(&mut out, json, e)?;
        }
        for d in &batch.decisions {
            print_decision(&mut out, json, d)?;
        }
        for d in &batch.deliveries {
            print_delivery(&mut out, json, d)?;
        }
        out.flush()?;
        cursor = batch.cursor;
    }
}

fn print_event(out: &mut impl Write, json: bool, e: &TailEvent) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", json!({"type": "event", "event": e}));
    }
    let kind = match &e.action {
        Some(a) => format!("{}.{a}", e.kind),
        None => e.kind.clone(),
    };
    writeln!(
        out,
        "{}  {}  {}  {kind}",
        time(e.received_at_ms),
        e.id,
        e.source
    )
}

fn print_decision(out: &mut impl Write, json: bool, d: &TailDecision) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", json!({"type": "decision", "decision": d}));
    }
    let at = time(d.decided_at_ms);
    if let Some(reason) = &d.decision.dead_letter {
        return writeln!(out, "{at}  {}  dead-letter: {reason}", d.event_id);
    }
    if d.decision.routes.is_empty() {
        return writeln!(out, "{at}  {}  routed nowhere", d.event_id);
    }
    for r in &d.decision.routes {
        writeln!(
            out,
            "{at}  {}  → {} ({}) queued",
            d.event_id,
            r.agent,
            r.priority.as_str()
        )?;
    }
    Ok(())
}

fn print_delivery(out: &mut impl Write, json: bool, d: &TailDelivery) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", json!({"type": "delivery", "delivery": d}));
    }
    let at = time(d.settled_at_ms);
    let status = d.http_status.map(|s| format!(" {s}")).unwrap_or_default();
    let took = d
        .latency_us
        .map(|us| format!(" in {} ms", us.div_ceil(1000)))
        .unwrap_or_default();
    match d.status.as_str() {
        "delivered" => writeln!(
            out,
            "{at}  {}  → {}: delivered{status}{took}",
            d.event_id, d.agent
        ),
        other => writeln!(
            out,
            "{at}  {}  → {}: {other}{status} after {} attempts: {}",
            d.event_id,
            d.agent,
            d.attempts,
            d.error.as_deref().unwrap_or("-")
        ),
    }
}
