//! The embedded store's side of `sluice events export` and `import`
//! ([`crate::store::export`] defines the format).
//!
//! An export page is read in one read transaction of the read-only
//! connection, so each page is a consistent view while `serve` writes. An
//! import goes through the writer like an append: the events are framed as
//! log records under their own ids and written in one `write` and one
//! `fdatasync`, then indexed with their state (status, decision, deliveries,
//! runs) in one transaction. So an imported body is in the log like any
//! other, survives a restart and is removed by retention like any other;
//! and its dedup key is held, so the provider's copy sent again afterwards
//! is a duplicate. An import never routes or delivers anything itself: what
//! was pending comes back pending, queued deliveries come back queued.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::dispatch::{priority_rank, rank_priority};
use super::log::{LogReader, Record, RecordRef};
use super::{SqliteStore, StoreError, WriterState, apply_record, holder, set_applied};
use crate::event::{EventStatus, now_ms};
use crate::store::dispatch::{AttemptRecord, DeliveryStatus, delivery_name};
use crate::store::export::{
    Checked, ExportPage, ExportedDelivery, ExportedEvent, ExportedRun, ExportedStep, Imported,
    encode_body,
};

/// What the writer answers an import with: per event, in order.
type ImportReply = oneshot::Sender<Result<Vec<Result<Imported, StoreError>>, StoreError>>;

/// Exported events for the writer, each checked (or why not).
pub(super) struct ImportJob {
    items: Vec<Result<Checked, String>>,
    reply: ImportReply,
}

impl SqliteStore {
    /// Hands checked events to the writer and waits for them to be durable
    /// and indexed.
    pub(super) async fn import_events(
        &self,
        records: &[ExportedEvent],
    ) -> Result<Vec<Result<Imported, StoreError>>, StoreError> {
        let records = records.to_vec();
        // Hashing the bodies is CPU work: off the async workers.
        let items = tokio::task::spawn_blocking(move || {
            records.iter().map(ExportedEvent::check).collect::<Vec<_>>()
        })
        .await
        .map_err(|e| StoreError::Backend(format!("import check task failed: {e}")))?;
        let (reply, answer) = oneshot::channel();
        self.sender()?
            .send(super::Job::Import(ImportJob { items, reply }))
            .map_err(|_| StoreError::Closed)?;
        let out = answer.await.map_err(|_| StoreError::Closed)??;
        // Queued deliveries and pending events may be claimable now.
        self.signals.poke_all();
        self.work.notify_waiters();
        Ok(out)
    }
}

/// Runs an import job on the writer thread and answers it.
pub(super) fn run_import(w: &mut WriterState, job: ImportJob) {
    let ImportJob { items, reply } = job;
    let _ = reply.send(import_batch(w, items));
}

fn import_batch(
    w: &mut WriterState,
    items: Vec<Result<Checked, String>>,
) -> Result<Vec<Result<Imported, StoreError>>, StoreError> {
    if w.behind {
        return Err(StoreError::Backend(
            "the index is behind the event log; open the store again (it replays the log) before importing"
                .into(),
        ));
    }
    let now = now_ms();
    let mut out: Vec<Option<Result<Imported, StoreError>>> = Vec::with_capacity(items.len());
    let mut fresh: Vec<(usize, Record, RecordRef, ExportedEvent)> = Vec::new();
    // Ids and dedup keys new in this job, for copies within it.
    let mut in_job: HashMap<String, String> = HashMap::new();
    let mut buf: Vec<u8> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let checked = match item {
            Ok(c) => c,
            Err(why) => {
                out.push(Some(Err(StoreError::Backend(why))));
                continue;
            }
        };
        let ev = checked.event;
        let held = match in_job
            .get(&ev.id)
            .or_else(|| in_job.get(&checked.dedup_key))
        {
            Some(id) => Some(id.clone()),
            None => held_by(&w.conn, &ev.id, &checked.dedup_key, now)?,
        };
        if let Some(id) = held {
            out.push(Some(Ok(Imported::AlreadyHeld(id))));
            continue;
        }
        let rec = Record {
            seq: w.next_seq,
            id: ev.id.clone(),
            source: ev.source.clone(),
            provider: ev.provider,
            kind: ev.kind.clone(),
            action: ev.action.clone(),
            delivery_id: ev.delivery_id.clone(),
            id_origin: ev.id_origin,
            body_sha256: checked.body_sha256,
            conflict_with: ev.conflict_with.clone(),
            dedup_until_ms: ev.id_origin.expires().then(|| {
                ev.received_at_ms
                    .saturating_add(i64::try_from(w.dedup_window.as_millis()).unwrap_or(i64::MAX))
            }),
            dedup_key: checked.dedup_key.clone(),
            received_at_ms: ev.received_at_ms,
            headers: ev.headers.clone(),
            body: checked.body,
        };
        w.next_seq += 1;
        let pending = buf.len() as u64;
        let len = rec.frame_into(&mut buf);
        let at = w.log.place(pending, len);
        in_job.insert(ev.id.clone(), ev.id.clone());
        in_job.insert(checked.dedup_key, ev.id.clone());
        out.push(None);
        fresh.push((i, rec, at, ev));
    }
    if !fresh.is_empty() {
        let segment = super::log::segment_path(&w.log_dir, w.log.segment());
        w.log.append(&buf).map_err(|e| {
            StoreError::Backend(format!(
                "cannot write the event log {}: {e}",
                segment.display()
            ))
        })?;
        if let Err(e) = w.log.file().sync_data() {
            // As the syncer: after a failed fsync nothing written since can be
            // trusted; the restart rebuilds the index from what the disk holds.
            tracing::error!(segment = %segment.display(), error = %e, "cannot sync the event log; aborting");
            std::process::abort();
        }
        let end = w.log.position();
        match index(&mut w.conn, &fresh, end, now) {
            Ok(pending) => {
                w.shared
                    .depth
                    .fetch_add(pending, std::sync::atomic::Ordering::Relaxed);
                if pending > 0 {
                    w.work.notify_waiters();
                }
                for (i, ..) in &fresh {
                    out[*i] = Some(Ok(Imported::Added));
                }
            }
            Err(e) => {
                // The log holds them: the next start replays them into the
                // index, as events not routed yet.
                w.behind = true;
                return Err(StoreError::Backend(format!(
                    "the imported events are in the event log but the index did not take them \
                     ({e}); they come back as pending events when the store is opened again"
                )));
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|o| o.expect("every event answered"))
        .collect())
}

/// The event that holds this id or this delivery now, if any.
fn held_by(conn: &Connection, id: &str, key: &str, now: i64) -> Result<Option<String>, StoreError> {
    if conn
        .prepare_cached("SELECT 1 FROM events WHERE id = ?1")?
        .exists([id])?
    {
        return Ok(Some(id.to_string()));
    }
    holder(conn, key, now)
}

/// Indexes the logged events with their state, in one transaction, and
/// moves the applied position past them. Returns how many are pending.
fn index(
    conn: &mut Connection,
    fresh: &[(usize, Record, RecordRef, ExportedEvent)],
    end: super::log::Position,
    now: i64,
) -> Result<i64, StoreError> {
    let txn = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut pending = 0;
    let mut next_seq = 0;
    for (_, rec, at, ev) in fresh {
        apply_record(&txn, rec, *at)?;
        if restore(&txn, rec.seq, ev, now)? {
            pending += 1;
        }
        next_seq = rec.seq + 1;
    }
    set_applied(&txn, end, next_seq)?;
    txn.commit()?;
    Ok(pending)
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(e.to_string()))
}

/// Puts an indexed event (just added as pending, by [`apply_record`]) in
/// its exported state. Returns whether it is pending (to be routed).
fn restore(conn: &Connection, seq: i64, ev: &ExportedEvent, now: i64) -> Result<bool, StoreError> {
    let pending = matches!(ev.status, EventStatus::Pending | EventStatus::Claimed);
    let status = if pending {
        EventStatus::Pending
    } else {
        ev.status
    };
    conn.prepare_cached(
        "UPDATE events SET status = ?2, attempts = ?3, last_error = ?4 WHERE seq = ?1",
    )?
    .execute(params![seq, status.as_str(), ev.attempts, ev.last_error])?;
    if pending {
        // Its claims so far still count toward `rules.max_attempts`.
        conn.prepare_cached("UPDATE queue SET attempts = ?2 WHERE seq = ?1")?
            .execute(params![seq, ev.attempts])?;
    } else {
        conn.prepare_cached("DELETE FROM queue WHERE seq = ?1")?
            .execute([seq])?;
    }
    if status == EventStatus::Dead {
        conn.prepare_cached(
            "INSERT INTO dead_letters (event_id, reason, at_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (event_id) DO UPDATE SET reason = excluded.reason, at_ms = excluded.at_ms",
        )?
        .execute(params![
            ev.id,
            ev.last_error.as_deref().unwrap_or("dead-lettered"),
            ev.dead_at_ms.unwrap_or(now)
        ])?;
    }
    if let Some(decision) = &ev.decision {
        conn.prepare_cached(
            "INSERT INTO decisions (event_id, decided_at_ms, decision) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![
            ev.id,
            ev.decided_at_ms().unwrap_or(now),
            decision.get()
        ])?;
    }
    let mut runs: HashMap<&str, i64> = HashMap::new();
    for run in &ev.runs {
        let id: i64 = conn
            .prepare_cached(
                "INSERT INTO runs (event_seq, event_id, workflow, route, state, step, input, \
                 due_at_ms, created_at_ms, deadline_ms, timeout_ms, last_error) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) RETURNING id",
            )?
            .query_row(
                params![
                    seq,
                    ev.id,
                    run.workflow,
                    json(&run.route)?,
                    run.state,
                    run.step,
                    run.input.as_ref().map(|v| v.get()),
                    run.due_at_ms,
                    run.created_at_ms,
                    run.deadline_ms,
                    run.timeout_ms,
                    run.last_error
                ],
                |r| r.get(0),
            )?;
        for s in &run.steps_done {
            conn.prepare_cached(
                "INSERT INTO steps_done (run_id, step, name, at_ms, answer) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![id, s.step, s.name, s.at_ms, s.answer.as_ref().map(|v| v.get())])?;
        }
        runs.insert(run.id.as_str(), id);
    }
    for d in &ev.deliveries {
        // `check` made sure every run named is one of the event's.
        let run = d.run.as_deref().and_then(|r| runs.get(r).copied());
        let id: i64 = conn
            .prepare_cached(
                "INSERT INTO deliveries (event_seq, event_id, agent, route, run_id, step, step_name, \
                 input, key, priority, ordering_key, status, attempts, retry_base, due_at_ms, \
                 created_at_ms, settled_at_ms, last_error, answer) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19) \
                 RETURNING id",
            )?
            .query_row(
                params![
                    seq,
                    ev.id,
                    d.agent,
                    json(&d.route)?,
                    run,
                    d.step,
                    d.step_name,
                    d.input.as_ref().map(|v| v.get()),
                    d.idempotency_key,
                    priority_rank(d.priority),
                    d.ordering_key,
                    d.status.as_str(),
                    d.attempts,
                    d.retry_base,
                    d.due_at_ms.or(d.settled_at_ms).unwrap_or(now),
                    d.created_at_ms,
                    d.settled_at_ms,
                    d.last_error,
                    d.answer.as_ref().map(|v| v.get())
                ],
                |r| r.get(0),
            )?;
        for a in &d.attempt_records {
            conn.prepare_cached(
                "INSERT INTO attempts (delivery_id, attempt, at_ms, outcome, status, latency_us, \
                 error, response_bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
            )?
            .execute(params![
                id,
                a.attempt,
                a.at_ms,
                a.outcome,
                a.status,
                a.latency_us as i64,
                a.error,
                a.response_bytes as i64
            ])?;
        }
    }
    Ok(pending)
}

/// One page of the export: events after sequence number `after`, oldest
/// first, read in one read transaction.
pub(super) fn page(
    conn: &Connection,
    log: &LogReader,
    since_ms: Option<i64>,
    after: Option<&str>,
    limit: usize,
) -> Result<ExportPage, StoreError> {
    let after: i64 = match after {
        None => 0,
        Some(s) => s.parse().map_err(|_| {
            StoreError::Backend(format!("export cursor {s:?} is not one of this store's"))
        })?,
    };
    let limit = limit.max(1);
    let txn = conn.unchecked_transaction()?;
    // An index of schema 3 (before dispatch) has no dispatch tables until
    // a writer opens it.
    let dispatch: bool = txn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'deliveries'",
        [],
        |r| r.get(0),
    )?;
    struct Row {
        seq: i64,
        id: String,
        conflict_with: Option<String>,
        body_sha256: String,
        at: RecordRef,
        status: String,
        attempts: i64,
        last_error: Option<String>,
        dead_at_ms: Option<i64>,
    }
    let rows: Vec<Row> = txn
        .prepare_cached(
            "SELECT e.seq, e.id, e.conflict_with, e.body_sha256, e.log_segment, e.log_offset, \
             e.log_len, CASE WHEN q.claimed_by IS NOT NULL THEN 'claimed' ELSE e.status END, \
             coalesce(q.attempts, e.attempts), e.last_error, d.at_ms \
             FROM events e LEFT JOIN queue q ON q.seq = e.seq \
             LEFT JOIN dead_letters d ON d.event_id = e.id \
             WHERE e.seq > ?1 AND e.received_at_ms >= ?2 ORDER BY e.seq LIMIT ?3",
        )?
        .query_map(
            params![after, since_ms.unwrap_or(i64::MIN), limit as i64],
            |r| {
                Ok(Row {
                    seq: r.get(0)?,
                    id: r.get(1)?,
                    conflict_with: r.get(2)?,
                    body_sha256: r.get(3)?,
                    at: RecordRef {
                        segment: r.get(4)?,
                        offset: r.get::<_, i64>(5)? as u64,
                        len: r.get(6)?,
                    },
                    status: r.get(7)?,
                    attempts: r.get(8)?,
                    last_error: r.get(9)?,
                    dead_at_ms: r.get(10)?,
                })
            },
        )?
        .collect::<Result<_, _>>()?;
    let mut out = ExportPage {
        next: (rows.len() == limit).then(|| rows[rows.len() - 1].seq.to_string()),
        ..ExportPage::default()
    };
    for row in rows {
        let rec = match log.read(row.at, row.seq) {
            Ok(rec) => rec,
            Err(e) => {
                out.skipped.push((row.id, e.to_string()));
                continue;
            }
        };
        let status = EventStatus::parse(&row.status).ok_or_else(|| {
            StoreError::Backend(format!("event {}: unknown status {:?}", row.id, row.status))
        })?;
        let decision: Option<String> = txn
            .prepare_cached(
                "SELECT decision FROM decisions WHERE event_id = ?1 ORDER BY seq DESC LIMIT 1",
            )?
            .query_row([&row.id], |r| r.get(0))
            .optional()?;
        let (deliveries, runs) = if dispatch {
            (deliveries(&txn, &row.id)?, runs(&txn, &row.id)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let (body_encoding, body) = encode_body(&rec.body);
        out.events.push(ExportedEvent {
            id: row.id,
            source: rec.source,
            provider: rec.provider,
            kind: rec.kind,
            action: rec.action,
            delivery_id: rec.delivery_id,
            id_origin: rec.id_origin,
            conflict_with: row.conflict_with,
            received_at_ms: rec.received_at_ms,
            headers: rec.headers,
            body_sha256: Some(row.body_sha256),
            body_encoding,
            body,
            status,
            attempts: row.attempts as u32,
            last_error: row.last_error,
            dead_at_ms: row.dead_at_ms,
            decision: decision.map(raw).transpose()?,
            deliveries,
            runs,
        });
    }
    Ok(out)
}

/// Stored JSON text, as it is.
fn raw(text: String) -> Result<Box<serde_json::value::RawValue>, StoreError> {
    serde_json::value::RawValue::from_string(text)
        .map_err(|e| StoreError::Backend(format!("stored JSON: {e}")))
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Backend(format!("stored JSON: {e}")))
}

fn deliveries(conn: &Connection, event_id: &str) -> Result<Vec<ExportedDelivery>, StoreError> {
    struct Row {
        id: i64,
        agent: String,
        route: String,
        run: Option<i64>,
        workflow: Option<String>,
        step: Option<u32>,
        step_name: Option<String>,
        input: Option<String>,
        key: String,
        priority: i64,
        ordering_key: Option<String>,
        status: String,
        attempts: u32,
        retry_base: u32,
        due_at_ms: i64,
        created_at_ms: i64,
        settled_at_ms: Option<i64>,
        last_error: Option<String>,
        answer: Option<String>,
    }
    let rows: Vec<Row> = conn
        .prepare_cached(
            "SELECT d.id, d.agent, d.route, d.run_id, r.workflow, d.step, d.step_name, d.input, \
             d.key, d.priority, d.ordering_key, d.status, d.attempts, d.retry_base, d.due_at_ms, \
             d.created_at_ms, d.settled_at_ms, d.last_error, d.answer \
             FROM deliveries d LEFT JOIN runs r ON r.id = d.run_id \
             WHERE d.event_id = ?1 ORDER BY d.id",
        )?
        .query_map([event_id], |r| {
            Ok(Row {
                id: r.get(0)?,
                agent: r.get(1)?,
                route: r.get(2)?,
                run: r.get(3)?,
                workflow: r.get(4)?,
                step: r.get(5)?,
                step_name: r.get(6)?,
                input: r.get(7)?,
                key: r.get(8)?,
                priority: r.get(9)?,
                ordering_key: r.get(10)?,
                status: r.get(11)?,
                attempts: r.get(12)?,
                retry_base: r.get(13)?,
                due_at_ms: r.get(14)?,
                created_at_ms: r.get(15)?,
                settled_at_ms: r.get(16)?,
                last_error: r.get(17)?,
                answer: r.get(18)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    rows.into_iter()
        .map(|row| {
            let status = DeliveryStatus::parse(&row.status).ok_or_else(|| {
                StoreError::Backend(format!(
                    "delivery {}: unknown status {:?}",
                    delivery_name(row.id),
                    row.status
                ))
            })?;
            let attempt_records = conn
                .prepare_cached(
                    "SELECT attempt, at_ms, outcome, status, latency_us, error, response_bytes \
                     FROM attempts WHERE delivery_id = ?1 ORDER BY attempt",
                )?
                .query_map([row.id], |r| {
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
                .collect::<Result<_, _>>()?;
            Ok(ExportedDelivery {
                id: delivery_name(row.id),
                agent: row.agent,
                route: parse(&row.route)?,
                run: row.run.map(|n| format!("run_{n}")),
                workflow: row.workflow,
                step: row.step,
                step_name: row.step_name,
                input: row.input.map(raw).transpose()?,
                idempotency_key: row.key,
                priority: rank_priority(row.priority),
                ordering_key: row.ordering_key,
                status,
                attempts: row.attempts,
                retry_base: row.retry_base,
                due_at_ms: (status == DeliveryStatus::Queued).then_some(row.due_at_ms),
                created_at_ms: row.created_at_ms,
                settled_at_ms: row.settled_at_ms,
                last_error: row.last_error,
                answer: row.answer.map(raw).transpose()?,
                attempt_records,
            })
        })
        .collect()
}

fn runs(conn: &Connection, event_id: &str) -> Result<Vec<ExportedRun>, StoreError> {
    struct Row {
        id: i64,
        workflow: String,
        route: String,
        state: String,
        step: u32,
        input: Option<String>,
        due_at_ms: i64,
        created_at_ms: i64,
        deadline_ms: Option<i64>,
        timeout_ms: Option<i64>,
        last_error: Option<String>,
    }
    let rows: Vec<Row> = conn
        .prepare_cached(
            "SELECT id, workflow, route, state, step, input, due_at_ms, created_at_ms, \
             deadline_ms, timeout_ms, last_error FROM runs WHERE event_id = ?1 ORDER BY id",
        )?
        .query_map([event_id], |r| {
            Ok(Row {
                id: r.get(0)?,
                workflow: r.get(1)?,
                route: r.get(2)?,
                state: r.get(3)?,
                step: r.get(4)?,
                input: r.get(5)?,
                due_at_ms: r.get(6)?,
                created_at_ms: r.get(7)?,
                deadline_ms: r.get(8)?,
                timeout_ms: r.get(9)?,
                last_error: r.get(10)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    rows.into_iter()
        .map(|row| {
            let steps_done = conn
                .prepare_cached(
                    "SELECT step, name, at_ms, answer FROM steps_done WHERE run_id = ?1 ORDER BY step",
                )?
                .query_map([row.id], |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .map(|(step, name, at_ms, answer)| {
                    Ok(ExportedStep {
                        step,
                        name,
                        at_ms,
                        answer: answer.map(raw).transpose()?,
                    })
                })
                .collect::<Result<_, StoreError>>()?;
            Ok(ExportedRun {
                id: format!("run_{}", row.id),
                workflow: row.workflow,
                route: parse(&row.route)?,
                state: row.state,
                step: row.step,
                input: row.input.map(raw).transpose()?,
                due_at_ms: row.due_at_ms,
                created_at_ms: row.created_at_ms,
                deadline_ms: row.deadline_ms,
                timeout_ms: row.timeout_ms,
                last_error: row.last_error,
                steps_done,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::IdOrigin;
    use crate::store::{EventReader, Store};

    /// An exported event with a body that is not JSON, routed, for the
    /// store's own round trip.
    fn exported(id: &str, body: &[u8]) -> ExportedEvent {
        let (body_encoding, body) = encode_body(body);
        ExportedEvent {
            id: id.into(),
            source: "github".into(),
            provider: crate::event::Provider::Github,
            kind: "issues".into(),
            action: Some("opened".into()),
            delivery_id: format!("d-{id}"),
            id_origin: IdOrigin::Unsigned,
            conflict_with: None,
            received_at_ms: 1_700_000_000_000,
            headers: vec![("x-github-event".into(), "issues".into())],
            body_sha256: None,
            body_encoding,
            body,
            status: EventStatus::Routed,
            attempts: 1,
            last_error: None,
            dead_at_ms: None,
            decision: None,
            deliveries: vec![],
            runs: vec![],
        }
    }

    #[tokio::test]
    async fn an_import_survives_a_restart_and_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sluice.db");
        let store = SqliteStore::open(&db, 16).unwrap();
        let events = [
            exported("evt_a", b"\x00binary\xff\n"),
            exported("evt_b", br#"{"a":1}"#),
            exported("evt_a", b"again"),
        ];
        let out = store.import_all(&events).await.unwrap();
        assert_eq!(out[0].as_ref().unwrap(), &Imported::Added);
        assert_eq!(out[1].as_ref().unwrap(), &Imported::Added);
        assert_eq!(
            out[2].as_ref().unwrap(),
            &Imported::AlreadyHeld("evt_a".into())
        );
        assert_eq!(store.queue_depth().await.unwrap(), 0, "routed: not queued");
        store.close();
        drop(store);
        // The index rebuilt from the log alone still has the bodies.
        std::fs::remove_file(&db).unwrap();
        for side in ["sluice.db-wal", "sluice.db-shm"] {
            let _ = std::fs::remove_file(dir.path().join(side));
        }
        let store = SqliteStore::open(&db, 16).unwrap();
        store.close();
        drop(store);
        let ro = SqliteStore::open_read_only(&db).unwrap();
        let page = ro.export_page(None, None, 10).await.unwrap();
        assert_eq!(page.events.len(), 2);
        assert_eq!(
            page.events[0].body_bytes().unwrap(),
            &b"\x00binary\xff\n"[..]
        );
        assert_eq!(page.events[1].body.get(), r#"{"a":1}"#);
    }
}
