//! The embedded store's dispatch role ([`DispatchStore`]): deliveries,
//! attempts, workflow runs and the dead-letter queue, in the same index and
//! through the same writer as the events.
//!
//! A delivery is claimed the way an event is: the claim sets its due time
//! to the lease's end, so a worker that dies leaves it to be claimed again
//! when the lease runs out (at least once, under the same idempotency key).

use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, StoreError};
use crate::decision::{Decision, Priority, Route};
use crate::dispatch::envelope::idempotency_key;
use crate::event::now_ms;
use crate::store::dispatch::{
    AttemptRecord, ClaimedDelivery, DeadLetter, DeliveryFilter, DeliveryLease, DeliveryStatus,
    DeliverySummary, DispatchCounts, DispatchStore, ReadyRun, RunSummary, Settle, StepDelivery,
    delivery_name,
};
use crate::store::log::RecordRef;

/// The dispatch tables (schema 4 adds them to schema 3's).
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deliveries (
    id             INTEGER PRIMARY KEY,
    event_seq      INTEGER NOT NULL,
    event_id       TEXT NOT NULL,
    agent          TEXT NOT NULL,
    route          TEXT NOT NULL,
    run_id         INTEGER,
    step           INTEGER,
    step_name      TEXT,
    input          TEXT,
    key            TEXT NOT NULL,
    priority       INTEGER NOT NULL,
    ordering_key   TEXT,
    status         TEXT NOT NULL DEFAULT 'queued',
    attempts       INTEGER NOT NULL DEFAULT 0,
    retry_base     INTEGER NOT NULL DEFAULT 0,
    due_at_ms      INTEGER NOT NULL,
    claimed_by     TEXT,
    created_at_ms  INTEGER NOT NULL,
    settled_at_ms  INTEGER,
    last_error     TEXT,
    answer         TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (agent, priority DESC, due_at_ms, id) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS deliveries_ordered
    ON deliveries (agent, ordering_key, event_seq, id)
    WHERE status = 'queued' AND ordering_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);
CREATE INDEX IF NOT EXISTS deliveries_run ON deliveries (run_id, step) WHERE run_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (settled_at_ms) WHERE status = 'dead';
CREATE TABLE IF NOT EXISTS attempts (
    delivery_id    INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,
    at_ms          INTEGER NOT NULL,
    outcome        TEXT NOT NULL,
    status         INTEGER,
    latency_us     INTEGER NOT NULL,
    error          TEXT,
    response_bytes INTEGER NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    id             INTEGER PRIMARY KEY,
    event_seq      INTEGER NOT NULL,
    event_id       TEXT NOT NULL,
    workflow       TEXT NOT NULL,
    route          TEXT NOT NULL,
    state          TEXT NOT NULL DEFAULT 'waiting',
    step           INTEGER NOT NULL DEFAULT 0,
    input          TEXT,
    due_at_ms      INTEGER NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    deadline_ms    INTEGER,
    timeout_ms     INTEGER,
    last_error     TEXT
);
CREATE INDEX IF NOT EXISTS runs_state ON runs (state, due_at_ms, id);
CREATE INDEX IF NOT EXISTS runs_workflow ON runs (workflow, state);
CREATE INDEX IF NOT EXISTS runs_event ON runs (event_id);
CREATE TABLE IF NOT EXISTS steps_done (
    run_id   INTEGER NOT NULL,
    step     INTEGER NOT NULL,
    name     TEXT NOT NULL,
    at_ms    INTEGER NOT NULL,
    answer   TEXT,
    PRIMARY KEY (run_id, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS agents_paused (
    agent  TEXT PRIMARY KEY,
    at_ms  INTEGER NOT NULL
);
";

/// Adds the columns an index written by an earlier build of schema 4
/// lacks (`CREATE TABLE IF NOT EXISTS` leaves an existing table as it is).
pub(super) fn add_missing_columns(conn: &Connection) -> Result<(), StoreError> {
    for (table, column, decl) in [
        ("deliveries", "retry_base", "INTEGER NOT NULL DEFAULT 0"),
        ("runs", "timeout_ms", "INTEGER"),
    ] {
        let present: bool = conn
            .prepare(&format!(
                "SELECT count(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .query_row([column], |r| r.get(0))?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

pub(super) fn priority_rank(p: Priority) -> i64 {
    match p {
        Priority::Low => 0,
        Priority::Medium => 1,
        Priority::High => 2,
        Priority::Critical => 3,
    }
}

pub(super) fn rank_priority(n: i64) -> Priority {
    match n {
        0 => Priority::Low,
        2 => Priority::High,
        3 => Priority::Critical,
        _ => Priority::Medium,
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(e.to_string()))
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Backend(format!("stored JSON: {e}")))
}

/// Queues what a decision implies, in the caller's transaction: a delivery
/// per plain route, a waiting run per workflow route. Returns how many rows
/// it queued.
pub(super) fn queue_routes(
    conn: &Connection,
    event_id: &str,
    decision: &Decision,
    now: i64,
) -> Result<usize, StoreError> {
    let routes = &decision.routes;
    if routes.is_empty() || decision.dead_letter.is_some() {
        return Ok(0);
    }
    let seq: i64 = conn
        .prepare_cached("SELECT seq FROM events WHERE id = ?1")?
        .query_row([event_id], |r| r.get(0))?;
    for route in routes {
        let route_json = json(route)?;
        match &route.workflow {
            None => {
                insert_delivery(
                    conn,
                    seq,
                    event_id,
                    route,
                    &route_json,
                    None,
                    &idempotency_key(event_id, route, None),
                    now,
                )?;
            }
            Some(workflow) => {
                conn.prepare_cached(
                    "INSERT INTO runs (event_seq, event_id, workflow, route, due_at_ms, created_at_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                )?
                .execute(params![seq, event_id, workflow, route_json, now])?;
            }
        }
    }
    Ok(routes.len())
}

/// Retention: removes an event's deliveries, their attempts, and its
/// workflow runs with their recorded steps, in the caller's transaction.
pub(super) fn forget_event(conn: &Connection, event_id: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_id = ?1)",
    )?
    .execute([event_id])?;
    conn.prepare_cached("DELETE FROM deliveries WHERE event_id = ?1")?
        .execute([event_id])?;
    conn.prepare_cached(
        "DELETE FROM steps_done WHERE run_id IN (SELECT id FROM runs WHERE event_id = ?1)",
    )?
    .execute([event_id])?;
    conn.prepare_cached("DELETE FROM runs WHERE event_id = ?1")?
        .execute([event_id])?;
    Ok(())
}

/// Where a step's delivery belongs: run, step index and name, and the input.
struct StepOf<'a> {
    run: i64,
    step: u32,
    name: &'a str,
    input: Option<&'a str>,
}

#[allow(clippy::too_many_arguments)]
fn insert_delivery(
    conn: &Connection,
    seq: i64,
    event_id: &str,
    route: &Route,
    route_json: &str,
    step: Option<StepOf<'_>>,
    key: &str,
    now: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO deliveries (event_seq, event_id, agent, route, run_id, step, step_name, input, \
         key, priority, ordering_key, due_at_ms, created_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)",
    )?
    .execute(params![
        seq,
        event_id,
        route.agent,
        route_json,
        step.as_ref().map(|s| s.run),
        step.as_ref().map(|s| s.step),
        step.as_ref().map(|s| s.name),
        step.as_ref().and_then(|s| s.input),
        key,
        priority_rank(route.priority),
        route.ordering_key,
        now,
    ])?;
    Ok(())
}

/// The claim: due, queued deliveries of one agent, most urgent first, then
/// by due time and arrival, skipping any whose ordering key has an earlier
/// delivery still unsettled (held by a worker or waiting to retry).
const CLAIM_DELIVERIES: &str = "
SELECT d.id FROM deliveries d
WHERE d.status = 'queued' AND d.agent = ?1 AND d.due_at_ms <= ?2
  AND (d.ordering_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM deliveries e
        WHERE e.status = 'queued' AND e.agent = d.agent AND e.ordering_key = d.ordering_key
          AND (e.event_seq < d.event_seq OR (e.event_seq = d.event_seq AND e.id < d.id))))
ORDER BY d.priority DESC, d.due_at_ms, d.id
LIMIT ?3";

/// A delivery row as claimed, before its event is read from the log.
struct ClaimRow {
    id: i64,
    event_seq: i64,
    at: RecordRef,
    route: String,
    step: Option<String>,
    input: Option<String>,
    key: String,
    attempt: u32,
    retry_base: u32,
    created_at_ms: i64,
}

/// Dead-letters a delivery row in the caller's transaction and fails its run.
fn kill_delivery(conn: &Connection, id: i64, reason: &str, now: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE deliveries SET status = 'dead', last_error = ?2, settled_at_ms = ?3, \
         claimed_by = NULL WHERE id = ?1",
    )?
    .execute(params![id, reason, now])?;
    conn.prepare_cached(
        "UPDATE runs SET state = 'failed', last_error = ?2 \
         WHERE id = (SELECT run_id FROM deliveries WHERE id = ?1) AND state = 'running'",
    )?
    .execute(params![id, format!("{}: {reason}", delivery_name(id))])?;
    Ok(())
}

/// After a step's delivery settled as delivered: when every delivery of the
/// step is, records the step (once) and readies the run for the next.
fn maybe_complete_step(conn: &Connection, id: i64, now: i64) -> Result<bool, StoreError> {
    let Some((run, step, name)) = conn
        .prepare_cached(
            "SELECT run_id, step, step_name FROM deliveries WHERE id = ?1 AND run_id IS NOT NULL",
        )?
        .query_row([id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .optional()?
    else {
        return Ok(false);
    };
    let open: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM deliveries WHERE run_id = ?1 AND step = ?2 AND status != 'delivered'",
        )?
        .query_row(params![run, step], |r| r.get(0))?;
    if open > 0 {
        return Ok(false);
    }
    let answers: Vec<(String, Option<String>)> = conn
        .prepare_cached(
            "SELECT agent, answer FROM deliveries WHERE run_id = ?1 AND step = ?2 ORDER BY id",
        )?
        .query_map(params![run, step], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    // One agent: its answer as it is; several in parallel: by agent.
    let answer: Option<String> = if answers.len() == 1 {
        answers.into_iter().next().and_then(|(_, a)| a)
    } else {
        let mut map = serde_json::Map::new();
        for (agent, a) in answers {
            let v = match a {
                Some(a) => parse_json(&a)?,
                None => serde_json::Value::Null,
            };
            map.insert(agent, v);
        }
        Some(json(&serde_json::Value::Object(map))?)
    };
    let recorded = conn
        .prepare_cached(
            "INSERT INTO steps_done (run_id, step, name, at_ms, answer) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT DO NOTHING",
        )?
        .execute(params![run, step, name, now, answer])?;
    if recorded == 1 {
        conn.prepare_cached(
            "UPDATE runs SET state = 'ready', step = step + 1, input = ?3, due_at_ms = ?4 \
             WHERE id = ?1 AND step = ?2 AND state = 'running'",
        )?
        .execute(params![run, step, answer, now])?;
    }
    Ok(recorded == 1)
}

const SUMMARY: &str = "SELECT d.id, d.event_id, d.agent, d.run_id, r.workflow, d.step_name, d.key, \
    d.priority, d.ordering_key, d.status, d.attempts, d.created_at_ms, d.due_at_ms, d.settled_at_ms, \
    d.last_error FROM deliveries d LEFT JOIN runs r ON r.id = d.run_id";

fn summary_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliverySummary> {
    let status: String = r.get(9)?;
    let status = DeliveryStatus::parse(&status).unwrap_or(DeliveryStatus::Queued);
    Ok(DeliverySummary {
        id: delivery_name(r.get(0)?),
        event_id: r.get(1)?,
        agent: r.get(2)?,
        run: r.get::<_, Option<i64>>(3)?.map(|n| format!("run_{n}")),
        workflow: r.get(4)?,
        step: r.get(5)?,
        idempotency_key: r.get(6)?,
        priority: rank_priority(r.get(7)?),
        ordering_key: r.get(8)?,
        status,
        attempts: r.get::<_, i64>(10)? as u32,
        created_at_ms: r.get(11)?,
        due_at_ms: (status == DeliveryStatus::Queued)
            .then(|| r.get(12))
            .transpose()?,
        settled_at_ms: r.get(13)?,
        last_error: r.get(14)?,
    })
}

impl SqliteStore {
    async fn claim_delivery_rows(
        &self,
        agent: String,
        worker: String,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimRow>, StoreError> {
        self.write(move |conn| {
            let paused = conn
                .prepare_cached("SELECT 1 FROM agents_paused WHERE agent = ?1")?
                .exists([&agent])?;
            if paused {
                return Ok(Vec::new());
            }
            let now = now_ms();
            let until = now + lease.as_millis() as i64;
            let ids: Vec<i64> = conn
                .prepare_cached(CLAIM_DELIVERIES)?
                .query_map(params![agent, now, max as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut take = conn.prepare_cached(
                "UPDATE deliveries SET due_at_ms = ?2, attempts = attempts + 1, claimed_by = ?3 \
                 WHERE id = ?1 \
                 RETURNING attempts, event_seq, route, step_name, input, key, created_at_ms, retry_base",
            )?;
            let mut find = conn.prepare_cached(
                "SELECT log_segment, log_offset, log_len FROM events WHERE seq = ?1",
            )?;
            let mut out = Vec::with_capacity(ids.len());
            let mut orphans = Vec::new();
            for id in ids {
                let (attempt, event_seq, route, step, input, key, created_at_ms, retry_base) =
                    take.query_row(params![id, until, worker], |r| {
                        Ok((
                            r.get::<_, i64>(0)? as u32,
                            r.get::<_, i64>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, Option<String>>(3)?,
                            r.get::<_, Option<String>>(4)?,
                            r.get::<_, String>(5)?,
                            r.get::<_, i64>(6)?,
                            r.get::<_, i64>(7)? as u32,
                        ))
                    })?;
                let at = find
                    .query_row([event_seq], |r| {
                        Ok(RecordRef {
                            segment: r.get(0)?,
                            offset: r.get::<_, i64>(1)? as u64,
                            len: r.get(2)?,
                        })
                    })
                    .optional()?;
                match at {
                    Some(at) => out.push(ClaimRow {
                        id,
                        event_seq,
                        at,
                        route,
                        step,
                        input,
                        key,
                        attempt,
                        retry_base,
                        created_at_ms,
                    }),
                    None => orphans.push(id),
                }
            }
            drop((take, find));
            for id in orphans {
                kill_delivery(conn, id, "its event is gone (removed by retention)", now)?;
            }
            Ok(out)
        })
        .await
    }

    /// Kills a claimed delivery whose event cannot be read.
    async fn kill_unreadable(&self, id: i64, reason: String) {
        let _ = self
            .write(move |conn| kill_delivery(conn, id, &reason, now_ms()))
            .await;
    }
}

#[async_trait]
impl DispatchStore for SqliteStore {
    async fn release_claims(&self) -> Result<u64, StoreError> {
        let n = self
            .write(|conn| {
                Ok(conn
                    .prepare_cached(
                        "UPDATE deliveries SET due_at_ms = ?1, claimed_by = NULL \
                         WHERE status = 'queued' AND claimed_by IS NOT NULL",
                    )?
                    .execute([now_ms()])? as u64)
            })
            .await?;
        self.signals.poke_all();
        Ok(n)
    }

    async fn claim_deliveries(
        &self,
        agent: &str,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let rows = self
            .claim_delivery_rows(agent.to_string(), worker.to_string(), max, lease)
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let log = self.log.clone();
        let worker = worker.to_string();
        let (out, unreadable) = tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(rows.len());
            let mut unreadable = Vec::new();
            for row in rows {
                let event = match log.read(row.at, row.event_seq) {
                    Ok(rec) => rec.into_event(),
                    Err(e) => {
                        unreadable.push((row.id, format!("its event's log record: {e}")));
                        continue;
                    }
                };
                let parsed = (|| {
                    let route: Route = parse_json(&row.route)?;
                    let input = row.input.as_deref().map(parse_json).transpose()?;
                    Ok::<_, StoreError>((route, input))
                })();
                match parsed {
                    Ok((route, input)) => out.push(ClaimedDelivery {
                        id: row.id,
                        event,
                        route,
                        step: row.step,
                        input,
                        idempotency_key: row.key,
                        attempt: row.attempt,
                        round_attempt: row.attempt.saturating_sub(row.retry_base),
                        worker: worker.clone(),
                        created_at_ms: row.created_at_ms,
                    }),
                    Err(e) => unreadable.push((row.id, e.to_string())),
                }
            }
            (out, unreadable)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("log read task failed: {e}")))?;
        for (id, reason) in unreadable {
            tracing::error!(delivery = %delivery_name(id), %reason, "dead-lettering a delivery that cannot be read");
            self.kill_unreadable(id, reason).await;
        }
        Ok(out)
    }

    async fn settle_delivery(
        &self,
        lease: &DeliveryLease,
        attempt: &AttemptRecord,
        settle: Settle,
    ) -> Result<(), StoreError> {
        let (lease, attempt) = (lease.clone(), attempt.clone());
        let advanced = self
            .write(move |conn| {
                let Some(agent) = conn
                    .prepare_cached(
                        "SELECT agent FROM deliveries WHERE id = ?1 AND status = 'queued' \
                         AND claimed_by = ?2 AND attempts = ?3",
                    )?
                    .query_row(params![lease.id, lease.worker, lease.attempt], |r| {
                        r.get::<_, String>(0)
                    })
                    .optional()?
                else {
                    return Err(StoreError::LeaseLost(delivery_name(lease.id)));
                };
                conn.prepare_cached(
                    "INSERT INTO attempts (delivery_id, attempt, at_ms, outcome, status, latency_us, \
                     error, response_bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                     ON CONFLICT DO UPDATE SET at_ms = excluded.at_ms, outcome = excluded.outcome, \
                     status = excluded.status, latency_us = excluded.latency_us, \
                     error = excluded.error, response_bytes = excluded.response_bytes",
                )?
                .execute(params![
                    lease.id,
                    attempt.attempt,
                    attempt.at_ms,
                    attempt.outcome,
                    attempt.status,
                    attempt.latency_us as i64,
                    attempt.error,
                    attempt.response_bytes as i64
                ])?;
                let now = now_ms();
                match settle {
                    Settle::Delivered(answer) => {
                        let answer = answer.as_ref().map(json).transpose()?;
                        conn.prepare_cached(
                            "UPDATE deliveries SET status = 'delivered', settled_at_ms = ?2, \
                             answer = ?3, claimed_by = NULL, last_error = NULL WHERE id = ?1",
                        )?
                        .execute(params![lease.id, now, answer])?;
                        Ok((maybe_complete_step(conn, lease.id, now)?, agent))
                    }
                    Settle::RetryAt(at) => {
                        conn.prepare_cached(
                            "UPDATE deliveries SET due_at_ms = ?2, claimed_by = NULL, last_error = ?3 \
                             WHERE id = ?1",
                        )?
                        .execute(params![lease.id, at, attempt.error])?;
                        Ok((false, agent))
                    }
                    Settle::Dead(reason) => {
                        kill_delivery(conn, lease.id, &reason, now)?;
                        // A failed run frees a slot of its workflow.
                        Ok((true, agent))
                    }
                }
            })
            .await?;
        let (runs_moved, agent) = advanced;
        // A slot, an ordering key or a retry time of the agent changed.
        self.signals.poke(&agent);
        if runs_moved {
            self.signals.poke(crate::store::dispatch::RUNS);
        }
        Ok(())
    }

    async fn ready_runs(
        &self,
        max: usize,
        limits: &[(String, usize, Duration)],
    ) -> Result<Vec<ReadyRun>, StoreError> {
        let limits = limits.to_vec();
        self.write(move |conn| {
            let now = now_ms();
            // Past their deadline: failed, their open deliveries dead.
            let expired: Vec<(i64, String)> = conn
                .prepare_cached(
                    "SELECT id, workflow FROM runs WHERE state IN ('ready', 'running') \
                     AND deadline_ms IS NOT NULL AND deadline_ms <= ?1",
                )?
                .query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for (run, workflow) in expired {
                let why = format!("workflow {workflow} ran past its timeout");
                conn.prepare_cached(
                    "UPDATE deliveries SET status = 'dead', last_error = ?2, settled_at_ms = ?3, \
                     claimed_by = NULL WHERE run_id = ?1 AND status = 'queued'",
                )?
                .execute(params![run, why, now])?;
                conn.prepare_cached(
                    "UPDATE runs SET state = 'failed', last_error = ?2 WHERE id = ?1",
                )?
                .execute(params![run, why])?;
            }
            // Start waiting runs while their workflow has room.
            for (workflow, limit, timeout) in &limits {
                conn.prepare_cached(
                    "UPDATE runs SET state = 'ready', due_at_ms = ?3, deadline_ms = ?3 + ?4, timeout_ms = ?4 \
                     WHERE id IN (SELECT id FROM runs WHERE workflow = ?1 AND state = 'waiting' \
                     ORDER BY id LIMIT max(0, ?2 - (SELECT count(*) FROM runs \
                     WHERE workflow = ?1 AND state IN ('ready', 'running'))))",
                )?
                .execute(params![
                    workflow,
                    *limit as i64,
                    now,
                    timeout.as_millis() as i64
                ])?;
            }
            // Runs of a workflow the config does not declare (any more) get
            // no slot: made ready so the caller fails them with the reason.
            let waiting: Vec<String> = conn
                .prepare_cached("SELECT DISTINCT workflow FROM runs WHERE state = 'waiting'")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for workflow in waiting.iter().filter(|w| !limits.iter().any(|(n, ..)| n == *w)) {
                conn.prepare_cached(
                    "UPDATE runs SET state = 'ready', due_at_ms = ?2 WHERE workflow = ?1 AND state = 'waiting'",
                )?
                .execute(params![workflow, now])?;
            }
            let runs = conn
                .prepare_cached(
                    "SELECT id, workflow, event_id, route, step, input FROM runs \
                     WHERE state = 'ready' AND due_at_ms <= ?1 ORDER BY due_at_ms, id LIMIT ?2",
                )?
                .query_map(params![now, max as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Option<String>>(5)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            runs.into_iter()
                .map(|(id, workflow, event_id, route, step, input)| {
                    Ok(ReadyRun {
                        id,
                        workflow,
                        event_id,
                        route: parse_json(&route)?,
                        step: step as u32,
                        input: input.as_deref().map(parse_json).transpose()?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn start_step(
        &self,
        run: i64,
        step: u32,
        step_name: &str,
        deliveries: Vec<StepDelivery>,
    ) -> Result<(), StoreError> {
        let step_name = step_name.to_string();
        let agents: Vec<String> = deliveries.iter().map(|d| d.agent.clone()).collect();
        self.write(move |conn| {
            let Some((seq, event_id, route, input)) = conn
                .prepare_cached(
                    "UPDATE runs SET state = 'running' WHERE id = ?1 AND step = ?2 AND state = 'ready' \
                     RETURNING event_seq, event_id, route, input",
                )?
                .query_row(params![run, step], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                })
                .optional()?
            else {
                return Ok(());
            };
            let route: Route = parse_json(&route)?;
            let now = now_ms();
            for d in deliveries {
                let mut r = route.clone();
                r.agent = d.agent;
                let r_json = json(&r)?;
                insert_delivery(
                    conn,
                    seq,
                    &event_id,
                    &r,
                    &r_json,
                    Some(StepOf {
                        run,
                        step,
                        name: &step_name,
                        input: input.as_deref(),
                    }),
                    &d.idempotency_key,
                    now,
                )?;
            }
            Ok(())
        })
        .await?;
        for agent in &agents {
            self.signals.poke(agent);
        }
        Ok(())
    }

    async fn delay_step(
        &self,
        run: i64,
        step: u32,
        step_name: &str,
        until_ms: i64,
    ) -> Result<(), StoreError> {
        let step_name = step_name.to_string();
        self.write(move |conn| {
            let input: Option<Option<String>> = conn
                .prepare_cached(
                    "SELECT input FROM runs WHERE id = ?1 AND step = ?2 AND state = 'ready'",
                )?
                .query_row(params![run, step], |r| r.get(0))
                .optional()?;
            let Some(input) = input else { return Ok(()) };
            let recorded = conn
                .prepare_cached(
                    "INSERT INTO steps_done (run_id, step, name, at_ms, answer) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                )?
                .execute(params![run, step, step_name, now_ms(), input])?;
            if recorded == 1 {
                // The answer before the delay is passed on past it.
                conn.prepare_cached(
                    "UPDATE runs SET step = step + 1, due_at_ms = ?3 WHERE id = ?1 AND step = ?2",
                )?
                .execute(params![run, step, until_ms])?;
            }
            Ok(())
        })
        .await
    }

    async fn finish_run(&self, run: i64, failed: Option<&str>) -> Result<(), StoreError> {
        let failed = failed.map(str::to_string);
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE runs SET state = ?2, last_error = ?3 WHERE id = ?1 AND state IN ('ready', 'running')",
            )?
            .execute(params![
                run,
                if failed.is_some() { "failed" } else { "done" },
                failed
            ])?;
            Ok(())
        })
        .await
    }

    async fn deliveries(
        &self,
        filter: &DeliveryFilter,
    ) -> Result<Vec<DeliverySummary>, StoreError> {
        let f = filter.clone();
        self.read(move |conn, _| {
            let mut sql = format!("{SUMMARY} WHERE 1 = 1");
            let mut args: Vec<String> = Vec::new();
            if let Some(a) = &f.agent {
                args.push(a.clone());
                sql.push_str(&format!(" AND d.agent = ?{}", args.len()));
            }
            if let Some(s) = f.status {
                args.push(s.as_str().to_string());
                sql.push_str(&format!(" AND d.status = ?{}", args.len()));
            }
            if let Some(e) = &f.event_id {
                args.push(e.clone());
                sql.push_str(&format!(" AND d.event_id = ?{}", args.len()));
            }
            sql.push_str(&format!(" ORDER BY d.id DESC LIMIT {}", f.limit.max(1)));
            let rows = conn
                .prepare(&sql)?
                .query_map(rusqlite::params_from_iter(args.iter()), summary_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn attempts(&self, delivery: i64) -> Result<Vec<AttemptRecord>, StoreError> {
        self.read(move |conn, _| {
            Ok(conn
                .prepare_cached(
                    "SELECT attempt, at_ms, outcome, status, latency_us, error, response_bytes \
                     FROM attempts WHERE delivery_id = ?1 ORDER BY attempt",
                )?
                .query_map([delivery], |r| {
                    Ok(AttemptRecord {
                        attempt: r.get::<_, i64>(0)? as u32,
                        at_ms: r.get(1)?,
                        outcome: r.get(2)?,
                        status: r.get::<_, Option<i64>>(3)?.map(|s| s as u16),
                        latency_us: r.get::<_, i64>(4)? as u64,
                        error: r.get(5)?,
                        response_bytes: r.get::<_, i64>(6)? as u64,
                    })
                })?
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn runs(&self, event_id: &str) -> Result<Vec<RunSummary>, StoreError> {
        let event_id = event_id.to_string();
        self.read(move |conn, _| {
            let runs: Vec<(i64, String, String, i64, Option<String>)> = conn
                .prepare_cached(
                    "SELECT id, workflow, state, step, last_error FROM runs WHERE event_id = ?1 ORDER BY id",
                )?
                .query_map([&event_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<Result<_, _>>()?;
            runs.into_iter()
                .map(|(id, workflow, state, step, last_error)| {
                    let steps_done = conn
                        .prepare_cached(
                            "SELECT name, answer FROM steps_done WHERE run_id = ?1 ORDER BY step",
                        )?
                        .query_map([id], |r| {
                            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
                        })?
                        .collect::<Result<Vec<_>, _>>()?
                        .into_iter()
                        .map(|(n, a)| Ok((n, a.as_deref().map(parse_json).transpose()?)))
                        .collect::<Result<_, StoreError>>()?;
                    Ok(RunSummary {
                        id: format!("run_{id}"),
                        event_id: event_id.clone(),
                        workflow,
                        state,
                        step: step as u32,
                        steps_done,
                        last_error,
                    })
                })
                .collect()
        })
        .await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(move |conn, _| {
            let mut out: Vec<DeadLetter> = conn
                .prepare_cached(
                    "SELECT id, event_id, agent, last_error, settled_at_ms FROM deliveries \
                     WHERE status = 'dead' ORDER BY settled_at_ms DESC LIMIT ?1",
                )?
                .query_map([limit as i64], |r| {
                    Ok(DeadLetter {
                        id: delivery_name(r.get(0)?),
                        kind: "delivery",
                        event_id: r.get(1)?,
                        agent: Some(r.get(2)?),
                        reason: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                        at_ms: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                    })
                })?
                .collect::<Result<_, _>>()?;
            let events = conn
                .prepare_cached(
                    "SELECT event_id, reason, at_ms FROM dead_letters ORDER BY at_ms DESC LIMIT ?1",
                )?
                .query_map([limit as i64], |r| {
                    Ok(DeadLetter {
                        id: r.get(0)?,
                        kind: "event",
                        event_id: r.get(0)?,
                        agent: None,
                        reason: r.get(1)?,
                        at_ms: r.get(2)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            out.extend(events);
            out.sort_by_key(|d| std::cmp::Reverse(d.at_ms));
            out.truncate(limit);
            Ok(out)
        })
        .await
    }

    async fn retry_delivery(&self, delivery: i64) -> Result<bool, StoreError> {
        let retried = self
            .write(move |conn| {
                let agent: Option<String> = conn
                    .prepare_cached(
                        "UPDATE deliveries SET status = 'queued', retry_base = attempts, due_at_ms = ?2, \
                         claimed_by = NULL, settled_at_ms = NULL WHERE id = ?1 AND status = 'dead' \
                         RETURNING agent",
                    )?
                    .query_row(params![delivery, now_ms()], |r| r.get(0))
                    .optional()?;
                if agent.is_some() {
                    // The run it failed goes on from the same step.
                    conn.prepare_cached(
                        "UPDATE runs SET state = 'running', last_error = NULL, \
                         deadline_ms = CASE WHEN timeout_ms IS NULL THEN NULL ELSE ?2 + timeout_ms END \
                         WHERE id = (SELECT run_id FROM deliveries WHERE id = ?1) AND state = 'failed' \
                         AND step = (SELECT step FROM deliveries WHERE id = ?1)",
                    )?
                    .execute(params![delivery, now_ms()])?;
                }
                Ok(agent)
            })
            .await?;
        if let Some(agent) = &retried {
            self.signals.poke(agent);
        }
        Ok(retried.is_some())
    }

    async fn set_paused(&self, agent: &str, paused: bool) -> Result<(), StoreError> {
        let name = agent.to_string();
        let agent = agent.to_string();
        self.write(move |conn| {
            if paused {
                conn.prepare_cached(
                    "INSERT INTO agents_paused (agent, at_ms) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                )?
                .execute(params![agent, now_ms()])?;
            } else {
                conn.prepare_cached("DELETE FROM agents_paused WHERE agent = ?1")?
                    .execute([agent])?;
            }
            Ok(())
        })
        .await?;
        self.signals.poke(&name);
        Ok(())
    }

    async fn paused(&self) -> Result<Vec<String>, StoreError> {
        self.read(|conn, _| {
            Ok(conn
                .prepare_cached("SELECT agent FROM agents_paused ORDER BY agent")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn dispatch_counts(&self) -> Result<DispatchCounts, StoreError> {
        self.read(|conn, _| {
            let queued = conn
                .prepare_cached(
                    "SELECT agent, count(*) FROM deliveries WHERE status = 'queued' GROUP BY agent",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                .collect::<Result<_, _>>()?;
            let dead: i64 = conn.query_row(
                "SELECT (SELECT count(*) FROM deliveries WHERE status = 'dead') \
                 + (SELECT count(*) FROM dead_letters)",
                [],
                |r| r.get(0),
            )?;
            let runs_open: i64 = conn.query_row(
                "SELECT count(*) FROM runs WHERE state IN ('waiting', 'ready', 'running')",
                [],
                |r| r.get(0),
            )?;
            Ok(DispatchCounts {
                queued,
                dead_letters: dead as u64,
                runs_open: runs_open as u64,
            })
        })
        .await
    }

    fn delivery_signal(&self, agent: &str) -> tokio::sync::watch::Receiver<u64> {
        self.signals.subscribe(agent)
    }

    async fn next_due(&self, agent: &str) -> Result<Option<i64>, StoreError> {
        let agent = agent.to_string();
        self.read(move |conn, _| {
            if agent == crate::store::dispatch::RUNS {
                return Ok(conn
                    .prepare_cached(
                        "SELECT min(x) FROM ( \
                         SELECT min(due_at_ms) AS x FROM runs WHERE state = 'ready' \
                         UNION ALL SELECT min(deadline_ms) FROM runs WHERE state = 'running')",
                    )?
                    .query_row([], |r| r.get(0))?);
            }
            if conn
                .prepare_cached("SELECT 1 FROM agents_paused WHERE agent = ?1")?
                .exists([&agent])?
            {
                return Ok(None);
            }
            // Per priority, in the claim index's order; a delivery waiting
            // behind an earlier one of its ordering key does not count (the
            // earlier one's due time, or its settling, is what frees it).
            let mut stmt = conn.prepare_cached(
                "SELECT d.due_at_ms FROM deliveries d \
                 WHERE d.status = 'queued' AND d.agent = ?1 AND d.priority = ?2 \
                   AND (d.ordering_key IS NULL OR NOT EXISTS ( \
                        SELECT 1 FROM deliveries e \
                        WHERE e.status = 'queued' AND e.agent = d.agent \
                          AND e.ordering_key = d.ordering_key \
                          AND (e.event_seq < d.event_seq OR (e.event_seq = d.event_seq AND e.id < d.id)))) \
                 ORDER BY d.due_at_ms LIMIT 1",
            )?;
            let mut next: Option<i64> = None;
            for p in 0..4 {
                let due: Option<i64> = stmt
                    .query_row(params![agent, p], |r| r.get(0))
                    .optional()?;
                next = match (next, due) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            Ok(next)
        })
        .await
    }
}
