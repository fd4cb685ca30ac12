//! The embedded store: SQLite (bundled) in WAL mode with one writer thread.
//!
//! Every mutation goes to the writer, which drains whatever is queued (up to
//! `batch_max`) into one transaction and commits it with `synchronous = FULL`:
//! one fsync per batch, not per event (group commit). Each job runs inside its
//! own savepoint, so one failing job does not undo the others, and its caller
//! hears back only after the commit — an append is acknowledged only once it is
//! durable. Reads use a separate connection and never wait for the writer.
//!
//! Payloads do not go into SQLite: they go to the body log (`bodies.rs`), one
//! write and one `fdatasync` per batch, before the rows pointing at them
//! commit. Appends are a job kind of their own so the writer can check
//! duplicates, place bodies and write them once for the whole batch.
//!
//! Deduplication is the `dedup` table: one row per dedup key
//! ([`crate::event::dedup_key`]) naming the event that holds it. A provider's
//! id holds its key for good (`expires_at_ms` NULL); a body hash holds it until
//! `received_at_ms` + the dedup window, a deadline stored with the row, so the
//! window survives a restart, and a later copy past it takes the key over as
//! a new event. The schema's version is SQLite's `user_version`; a database
//! of another version is refused with a message, never half-read.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{Notify, oneshot};

use super::bodies::{self, BodyReader, BodyRef, BodyWriter};
use super::{
    Appended, Claimed, EventReader, EventRecord, EventSummary, Lease, ListFilter, RecordedDecision,
    Store, StoreError,
};
use crate::decision::Decision;
use crate::event::{Event, EventStatus, IdOrigin, Provider, now_ms};
use crate::ingress::NewEvent;

/// The schema this build reads and writes, kept in `PRAGMA user_version`
/// (0: the first store, deduplicating on a unique `(source, delivery_id)`).
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    source          TEXT NOT NULL,
    provider        TEXT NOT NULL,
    kind            TEXT NOT NULL,
    action          TEXT,
    delivery_id     TEXT NOT NULL,
    id_origin       TEXT NOT NULL,
    body_sha256     TEXT NOT NULL,
    conflict_with   TEXT,
    received_at_ms  INTEGER NOT NULL,
    headers         TEXT NOT NULL,
    body_segment    INTEGER NOT NULL,
    body_offset     INTEGER NOT NULL,
    size            INTEGER NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    available_at_ms INTEGER NOT NULL DEFAULT 0,
    claimed_by      TEXT,
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS events_work ON events (status, available_at_ms);
CREATE INDEX IF NOT EXISTS events_delivery ON events (source, delivery_id);
CREATE TABLE IF NOT EXISTS dedup (
    key           TEXT PRIMARY KEY,
    event_id      TEXT NOT NULL,
    expires_at_ms INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS decisions (
    seq        INTEGER PRIMARY KEY,
    event_id   TEXT NOT NULL,
    decided_at_ms INTEGER NOT NULL,
    decision   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_event ON decisions (event_id, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    event_id TEXT PRIMARY KEY,
    reason   TEXT NOT NULL,
    at_ms    INTEGER NOT NULL
);
";

/// A job for the writer: runs inside the batch transaction (or, given `None`,
/// does not run because the batch could not start), and returns whether it
/// succeeded and what to tell its caller once the commit's outcome is known.
type RunJob = Box<dyn FnOnce(Option<&Connection>) -> (bool, Reply) + Send>;
type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// What the writer thread takes.
enum Job {
    /// Append one event (deduplicated, body to the body log).
    Append(NewEvent, oneshot::Sender<Result<Appended, StoreError>>),
    /// Any other write, inside its own savepoint.
    Run(RunJob),
}

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    reader: Arc<Mutex<Connection>>,
    bodies: BodyReader,
    work: Arc<Notify>,
}

/// A read-only view of a store on disk (the CLI's `events` commands).
#[derive(Debug)]
pub struct ReadOnly {
    // A mutex only to be shared across threads (the read role is `Sync`);
    // the CLI reads from one task.
    conn: Mutex<Connection>,
    bodies: BodyReader,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, with the default
    /// dedup window for body-hash ids (`store.dedup_ttl`'s default).
    pub fn open(path: &Path, batch_max: usize) -> Result<SqliteStore, StoreError> {
        let window = crate::config::StoreConfig::default().dedup_ttl;
        SqliteStore::open_with_dedup_window(path, batch_max, window)
    }

    /// Opens (creating if needed) the database at `path`. A delivery known only
    /// by its body hash is a duplicate for `dedup_window` after the first copy
    /// was received; a provider's id stays a duplicate for good.
    pub fn open_with_dedup_window(
        path: &Path,
        batch_max: usize,
        dedup_window: Duration,
    ) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(10))?;
        check_schema(&conn, path)?;
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        // Expired body-hash keys are overwritten when their body comes again;
        // the rest are dropped here.
        conn.execute(
            "DELETE FROM dedup WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1",
            [now_ms()],
        )?;
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(Duration::from_secs(10))?;
        let body_dir = bodies::dir_for(path);
        let body_writer = BodyWriter::open(&body_dir).map_err(|e| {
            StoreError::Backend(format!("cannot open body log {}: {e}", body_dir.display()))
        })?;
        let body_reader = BodyReader::new(body_dir);

        let (tx, rx) = mpsc::channel::<Job>();
        let work = Arc::new(Notify::new());
        let notify = work.clone();
        let batch_max = batch_max.max(1);
        let thread = std::thread::Builder::new()
            .name("sluice-store-writer".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| {
                    writer_loop(conn, body_writer, rx, batch_max, dedup_window, &notify)
                });
                if std::panic::catch_unwind(run).is_err() {
                    // Without its writer the gateway could only answer 503 and
                    // lose what providers do not retry: stop, so a supervisor
                    // restarts it on the same data (nothing acknowledged is lost).
                    tracing::error!("the store writer panicked; aborting");
                    std::process::abort();
                }
            })
            .map_err(|e| StoreError::Backend(format!("cannot start writer thread: {e}")))?;
        Ok(SqliteStore {
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            reader: Arc::new(Mutex::new(reader)),
            bodies: body_reader,
            work,
        })
    }

    /// Opens an existing database for reading only (the CLI's `events` commands).
    pub fn open_read_only(path: &Path) -> Result<ReadOnly, StoreError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        check_schema(&conn, path)?;
        Ok(ReadOnly {
            conn: Mutex::new(conn),
            bodies: BodyReader::new(bodies::dir_for(path)),
        })
    }

    /// Stops the writer after it has committed everything queued.
    pub fn close(&self) {
        self.writer.lock().expect("writer lock").take();
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let job: RunJob = Box::new(move |conn| {
            let result = match conn {
                Some(conn) => f(conn),
                None => Err(StoreError::Backend(
                    "the batch transaction could not start".into(),
                )),
            };
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit: Result<(), StoreError>| {
                let _ = tx.send(commit.and(result));
            });
            (ok, reply)
        });
        let sender = self.sender()?;
        sender.send(Job::Run(job)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn sender(&self) -> Result<mpsc::Sender<Job>, StoreError> {
        self.writer
            .lock()
            .expect("writer lock")
            .clone()
            .ok_or(StoreError::Closed)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &BodyReader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        let bodies = self.bodies.clone();
        tokio::task::spawn_blocking(move || f(&reader.lock().expect("reader lock"), &bodies))
            .await
            .map_err(|e| StoreError::Backend(format!("reader task failed: {e}")))?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Refuses a database written with another schema, naming the file.
fn check_schema(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let has_events: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'events'",
        [],
        |r| r.get(0),
    )?;
    if has_events && version != SCHEMA_VERSION {
        let by = if version < SCHEMA_VERSION {
            "an older"
        } else {
            "a newer"
        };
        return Err(StoreError::Backend(format!(
            "{}: written by {by} sluice (store schema {version}; this build reads schema \
             {SCHEMA_VERSION}); move it and its .bodies directory aside to start an empty store, \
             or run the sluice that wrote it",
            path.display()
        )));
    }
    Ok(())
}

fn writer_loop(
    mut conn: Connection,
    mut bodies: BodyWriter,
    rx: mpsc::Receiver<Job>,
    batch_max: usize,
    dedup_window: Duration,
    work: &Notify,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = Vec::with_capacity(64);
        jobs.push(first);
        while jobs.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let (appends, runs): (Vec<_>, Vec<_>) =
            jobs.into_iter().partition(|j| matches!(j, Job::Append(..)));
        if let Err(e) = bodies.roll_if_full() {
            tracing::error!(error = %e, "cannot start a new body log segment; continuing in the current one");
        }
        let txn = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
            Ok(txn) => txn,
            Err(e) => {
                let err = StoreError::Backend(format!("cannot begin transaction: {e}"));
                for job in appends.into_iter().chain(runs) {
                    match job {
                        Job::Append(_, reply) => {
                            let _ = reply.send(Err(err.clone()));
                        }
                        Job::Run(job) => job(None).1(Err(err.clone())),
                    }
                }
                continue;
            }
        };
        let appended = append_batch(&txn, &mut bodies, appends, dedup_window);
        let replies: Vec<Reply> = runs
            .into_iter()
            .filter_map(|job| match job {
                Job::Run(job) => Some(job),
                Job::Append(..) => None,
            })
            .map(|job| {
                if savepoint(&txn, "SAVEPOINT job").is_err() {
                    return job(None).1;
                }
                let (ok, reply) = job(Some(&txn));
                // A failed job's partial writes are undone; the others stay in the batch.
                if !ok {
                    let _ = savepoint(&txn, "ROLLBACK TO job");
                }
                let _ = savepoint(&txn, "RELEASE job");
                reply
            })
            .collect();
        let commit = txn
            .commit()
            .map_err(|e| StoreError::Backend(format!("commit failed: {e}")));
        // Wake the workers only for new work: a wake-up after every write
        // (their own empty claims included) kept an idle gateway busy.
        let new_work = commit.is_ok()
            && appended
                .iter()
                .any(|(_, r)| matches!(r, Ok(Appended::Stored(_) | Appended::IdConflict { .. })));
        for (reply, result) in appended {
            let _ = reply.send(commit.clone().and(result));
        }
        for reply in replies {
            reply(commit.clone());
        }
        if new_work {
            work.notify_waiters();
        }
    }
}

fn savepoint(conn: &Connection, sql: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute([])
}

type AppendReply = oneshot::Sender<Result<Appended, StoreError>>;

/// Deduplicates a batch of appends, writes the new bodies in one durable
/// write, then inserts their rows and dedup keys. Returns each caller's
/// answer, to be sent once the transaction's commit is known.
fn append_batch(
    conn: &Connection,
    bodies: &mut BodyWriter,
    appends: Vec<Job>,
    dedup_window: Duration,
) -> Vec<(AppendReply, Result<Appended, StoreError>)> {
    let mut answers = Vec::with_capacity(appends.len());
    let mut fresh: Vec<Fresh> = Vec::new();
    // A copy of a delivery that is new in this very batch gets the same
    // outcome as the first copy, decided only once that one is written.
    let mut copies: Vec<(AppendReply, usize)> = Vec::new();
    let mut in_batch: HashMap<String, usize> = HashMap::new();
    // Unsigned ids first seen in this batch, for conflicts within it.
    let mut ids_in_batch: HashMap<(String, String), String> = HashMap::new();
    let mut buf: Vec<u8> = Vec::new();
    let now = now_ms();
    for job in appends {
        let Job::Append(ev, reply) = job else {
            continue;
        };
        let key = ev.dedup_key();
        if let Some(&first) = in_batch.get(&key) {
            copies.push((reply, first));
            continue;
        }
        match seen(conn, &ev, &key, now, &ids_in_batch) {
            Ok(Seen::Duplicate(id)) => answers.push((reply, Ok(Appended::Duplicate(id)))),
            Err(e) => answers.push((reply, Err(e))),
            Ok(Seen::New { conflict_with }) => {
                let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
                let at = bodies.place(buf.len() as u64, ev.body().len());
                buf.extend_from_slice(ev.body());
                in_batch.insert(key.clone(), fresh.len());
                if ev.id_origin() == IdOrigin::Unsigned {
                    ids_in_batch
                        .entry((ev.source().to_string(), ev.delivery_id().to_string()))
                        .or_insert_with(|| id.clone());
                }
                let until = ev.dedup_until_ms(dedup_window);
                fresh.push(Fresh {
                    ev,
                    id,
                    at,
                    key,
                    until,
                    conflict_with,
                    reply,
                });
            }
        }
    }
    let written = bodies
        .append_durably(&buf)
        .map_err(|e| StoreError::Backend(format!("cannot write the body log: {e}")));
    let mut outcomes: Vec<Result<Appended, StoreError>> = Vec::with_capacity(fresh.len());
    for f in fresh {
        let result = match &written {
            Ok(()) => insert_row(conn, &f).map(|()| match f.conflict_with {
                None => Appended::Stored(f.id),
                Some(conflict_with) => Appended::IdConflict {
                    id: f.id,
                    conflict_with,
                },
            }),
            Err(e) => Err(e.clone()),
        };
        outcomes.push(result.clone());
        answers.push((f.reply, result));
    }
    for (reply, first) in copies {
        let result = match &outcomes[first] {
            Ok(stored) => Ok(Appended::Duplicate(stored.id().to_string())),
            Err(e) => Err(e.clone()),
        };
        answers.push((reply, result));
    }
    answers
}

/// An append that is new: its id, where its body goes and its dedup key.
struct Fresh {
    ev: NewEvent,
    id: String,
    at: BodyRef,
    key: String,
    until: Option<i64>,
    conflict_with: Option<String>,
    reply: AppendReply,
}

/// What the store already holds of a delivery.
enum Seen {
    /// The same delivery, stored as this event.
    Duplicate(String),
    /// Not this delivery; with an unsigned id, maybe an earlier event that
    /// came with the same id and another body.
    New { conflict_with: Option<String> },
}

fn seen(
    conn: &Connection,
    ev: &NewEvent,
    key: &str,
    now: i64,
    ids_in_batch: &HashMap<(String, String), String>,
) -> Result<Seen, StoreError> {
    if let Some(id) = holder(conn, key, now)? {
        return Ok(Seen::Duplicate(id));
    }
    if ev.id_origin() != IdOrigin::Unsigned {
        return Ok(Seen::New {
            conflict_with: None,
        });
    }
    // The same id and body under another origin (GitLab's Idempotency-Key
    // after the same delivery came signed) is still the same delivery.
    let earlier = conn
        .prepare_cached(
            "SELECT id, body_sha256 = ?3 FROM events WHERE source = ?1 AND delivery_id = ?2 \
             ORDER BY body_sha256 = ?3 DESC, seq LIMIT 1",
        )?
        .query_row(
            params![ev.source(), ev.delivery_id(), ev.body_sha256()],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)),
        )
        .optional()?;
    Ok(match earlier {
        Some((id, true)) => Seen::Duplicate(id),
        Some((id, false)) => Seen::New {
            conflict_with: Some(id),
        },
        None => Seen::New {
            conflict_with: ids_in_batch
                .get(&(ev.source().to_string(), ev.delivery_id().to_string()))
                .cloned(),
        },
    })
}

/// The event holding a dedup key at `now`, if any (an expired body-hash key
/// holds nothing).
fn holder(conn: &Connection, key: &str, now: i64) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT event_id FROM dedup WHERE key = ?1 \
             AND (expires_at_ms IS NULL OR expires_at_ms > ?2)",
        )?
        .query_row(params![key, now], |r| r.get(0))
        .optional()?)
}

fn insert_row(conn: &Connection, f: &Fresh) -> Result<(), StoreError> {
    let ev = &f.ev;
    let headers = serde_json::to_string(ev.headers()).expect("headers serialise");
    conn.prepare_cached(
        "INSERT INTO events (id, source, provider, kind, action, delivery_id, id_origin, \
         body_sha256, conflict_with, received_at_ms, headers, body_segment, body_offset, size) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        f.id,
        ev.source(),
        ev.provider().as_str(),
        ev.kind(),
        ev.action(),
        ev.delivery_id(),
        ev.id_origin().as_str(),
        ev.body_sha256(),
        f.conflict_with,
        ev.received_at_ms(),
        headers,
        f.at.segment,
        f.at.offset as i64,
        f.at.len,
    ])?;
    // Only an expired key can be taken over; a live one was caught above.
    conn.prepare_cached(
        "INSERT INTO dedup (key, event_id, expires_at_ms) VALUES (?1, ?2, ?3) \
         ON CONFLICT (key) DO UPDATE SET event_id = excluded.event_id, \
         expires_at_ms = excluded.expires_at_ms",
    )?
    .execute(params![f.key, f.id, f.until])?;
    Ok(())
}

/// The condition under which a lease still holds: `?1` id, `?2` worker, `?3` attempt.
const HELD: &str = "WHERE id = ?1 AND status = 'claimed' AND claimed_by = ?2 AND attempts = ?3";

/// Moves an event to the dead-letter queue; with a lease, only while it holds.
fn mark_dead(
    conn: &Connection,
    id: &str,
    reason: &str,
    lease: Option<&Lease>,
) -> Result<(), StoreError> {
    let n = match lease {
        Some(l) => conn
            .prepare_cached(&format!("UPDATE events SET status = 'dead', claimed_by = NULL, last_error = ?4 {HELD}"))?
            .execute(params![l.event_id, l.worker, l.attempt, reason])?,
        None => conn
            .prepare_cached("UPDATE events SET status = 'dead', claimed_by = NULL, last_error = ?2 WHERE id = ?1")?
            .execute(params![id, reason])?,
    };
    if n == 0 {
        return Err(StoreError::LeaseLost(id.to_string()));
    }
    conn.prepare_cached(
        "INSERT INTO dead_letters (event_id, reason, at_ms) VALUES (?1, ?2, ?3) \
         ON CONFLICT (event_id) DO UPDATE SET reason = excluded.reason, at_ms = excluded.at_ms",
    )?
    .execute(params![id, reason, now_ms()])?;
    Ok(())
}

fn row_summary(row: &rusqlite::Row<'_>) -> rusqlite::Result<EventSummary> {
    let status: String = row.get("status")?;
    Ok(EventSummary {
        id: row.get("id")?,
        delivery_id: row.get("delivery_id")?,
        id_origin: IdOrigin::parse(&row.get::<_, String>("id_origin")?).unwrap_or(IdOrigin::Body),
        conflict_with: row.get("conflict_with")?,
        source: row.get("source")?,
        provider: row.get("provider")?,
        kind: row.get("kind")?,
        action: row.get("action")?,
        received_at_ms: row.get("received_at_ms")?,
        size: row.get::<_, i64>("size")? as u64,
        status: EventStatus::parse(&status).unwrap_or(EventStatus::Pending),
        attempts: row.get::<_, i64>("attempts")? as u32,
    })
}

/// An event row without its body, and where the body is.
fn row_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Event, BodyRef)> {
    let provider: String = row.get("provider")?;
    let headers: String = row.get("headers")?;
    let at = BodyRef {
        segment: row.get("body_segment")?,
        offset: row.get::<_, i64>("body_offset")? as u64,
        len: row.get("size")?,
    };
    let event = Event {
        id: row.get("id")?,
        source: row.get("source")?,
        provider: Provider::parse(&provider).unwrap_or(Provider::None),
        kind: row.get("kind")?,
        action: row.get("action")?,
        delivery_id: row.get("delivery_id")?,
        received_at_ms: row.get("received_at_ms")?,
        headers: serde_json::from_str(&headers).unwrap_or_default(),
        body: Bytes::new(),
    };
    Ok((event, at))
}

/// Reads the body a row points at.
fn with_body(bodies: &BodyReader, (mut event, at): (Event, BodyRef)) -> Result<Event, StoreError> {
    let body = bodies.read(at).map_err(|e| {
        StoreError::Backend(format!(
            "cannot read the body of {} from the body log: {e}",
            event.id
        ))
    })?;
    event.body = Bytes::from(body);
    Ok(event)
}

const EVENT_COLUMNS: &str = "id, source, provider, kind, action, delivery_id, id_origin, \
                             conflict_with, received_at_ms, headers, body_segment, body_offset, \
                             size, status, attempts, last_error";

/// `get`, for the store and for the CLI's read-only access.
pub fn get_record(ro: &ReadOnly, id: &str) -> Result<Option<EventRecord>, StoreError> {
    record(&ro.conn.lock().expect("reader lock"), &ro.bodies, id)
}

/// `list`, for the store and for the CLI's read-only access.
pub fn list_summaries(ro: &ReadOnly, filter: &ListFilter) -> Result<Vec<EventSummary>, StoreError> {
    summaries(&ro.conn.lock().expect("reader lock"), filter)
}

#[async_trait]
impl EventReader for ReadOnly {
    async fn get(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        get_record(self, id)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<EventSummary>, StoreError> {
        list_summaries(self, filter)
    }

    async fn decisions(&self, limit: usize) -> Result<Vec<RecordedDecision>, StoreError> {
        recent_decisions(&self.conn.lock().expect("reader lock"), limit)
    }
}

fn recent_decisions(conn: &Connection, limit: usize) -> Result<Vec<RecordedDecision>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut stmt =
        conn.prepare("SELECT event_id, decision FROM decisions ORDER BY seq DESC LIMIT ?1")?;
    let rows = stmt.query_map([limit], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (event_id, text) = row?;
        // A decision written by another version of sluice that this one
        // cannot read is left out of the statistics, not an error.
        if let Ok(decision) = serde_json::from_str::<Decision>(&text) {
            out.push(RecordedDecision { event_id, decision });
        }
    }
    Ok(out)
}

fn record(
    conn: &Connection,
    bodies: &BodyReader,
    id: &str,
) -> Result<Option<EventRecord>, StoreError> {
    let row = conn
        .query_row(
            &format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = ?1"),
            [id],
            |row| {
                Ok((
                    row_summary(row)?,
                    row_event(row)?,
                    row.get::<_, Option<String>>("last_error")?,
                ))
            },
        )
        .optional()?;
    let Some((summary, event, last_error)) = row else {
        return Ok(None);
    };
    let event = with_body(bodies, event)?;
    let decision: Option<String> = conn
        .query_row(
            "SELECT decision FROM decisions WHERE event_id = ?1 ORDER BY seq DESC LIMIT 1",
            [id],
            |r| r.get(0),
        )
        .optional()?;
    let decision = decision.and_then(|d| serde_json::from_str::<Decision>(&d).ok());
    Ok(Some(EventRecord {
        summary,
        event,
        decision,
        last_error,
    }))
}

fn summaries(conn: &Connection, filter: &ListFilter) -> Result<Vec<EventSummary>, StoreError> {
    let mut sql = String::from(
        "SELECT id, delivery_id, id_origin, conflict_with, source, provider, kind, action, \
         received_at_ms, size, status, attempts FROM events WHERE 1 = 1",
    );
    let mut args: Vec<String> = Vec::new();
    if let Some(s) = &filter.source {
        args.push(s.clone());
        sql.push_str(&format!(" AND source = ?{}", args.len()));
    }
    if let Some(k) = &filter.kind {
        args.push(k.clone());
        sql.push_str(&format!(" AND kind = ?{}", args.len()));
    }
    if let Some(st) = filter.status {
        args.push(st.as_str().to_string());
        sql.push_str(&format!(" AND status = ?{}", args.len()));
    }
    if let Some(since) = filter.since_ms {
        args.push(since.to_string());
        sql.push_str(&format!(
            " AND received_at_ms >= CAST(?{} AS INTEGER)",
            args.len()
        ));
    }
    if let Some(rule) = &filter.rule_disabled {
        args.push(rule.clone());
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM json_each((SELECT decision FROM decisions \
             WHERE event_id = events.id ORDER BY seq DESC LIMIT 1), '$.rules') AS r \
             WHERE json_extract(r.value, '$.rule') = ?{} \
             AND json_extract(r.value, '$.outcome.failed.kind') = 'disabled')",
            args.len()
        ));
    }
    let limit = if filter.limit == 0 {
        i64::MAX
    } else {
        filter.limit as i64
    };
    sql.push_str(&format!(" ORDER BY seq DESC LIMIT {limit}"));
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), row_summary)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Whether releasing a claim keeps the attempt it counted.
#[derive(Clone, Copy)]
enum Attempt {
    /// A retry: the attempt counts toward `max_attempts`.
    Counted,
    /// A deferral (the rule was switched off, no instance was free): the
    /// claim's attempt is given back.
    GivenBack,
}

impl SqliteStore {
    /// Puts a held event back to pending after `delay`, with `why` as its last error.
    async fn release(
        &self,
        lease: &Lease,
        delay: Duration,
        why: &str,
        attempt: Attempt,
    ) -> Result<(), StoreError> {
        let (lease, why) = (lease.clone(), why.to_string());
        let give_back = match attempt {
            Attempt::Counted => 0,
            Attempt::GivenBack => 1,
        };
        self.write(move |conn| {
            let n = conn
                .prepare_cached(&format!(
                    "UPDATE events SET status = 'pending', claimed_by = NULL, available_at_ms = ?4, \
                     last_error = ?5, attempts = max(attempts - ?6, 0) {HELD}"
                ))?
                .execute(params![
                    lease.event_id,
                    lease.worker,
                    lease.attempt,
                    now_ms() + delay.as_millis() as i64,
                    why,
                    give_back
                ])?;
            if n == 0 { Err(StoreError::LeaseLost(lease.event_id)) } else { Ok(()) }
        })
        .await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn append(&self, ev: NewEvent) -> Result<Appended, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(Job::Append(ev, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn get(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |conn, bodies| record(conn, bodies, &id))
            .await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<EventSummary>, StoreError> {
        let filter = filter.clone();
        self.read(move |conn, _| summaries(conn, &filter)).await
    }

    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        let worker = worker.to_string();
        let worker_name = worker.clone();
        let rows = self.write(move |conn| {
            let now = now_ms();
            let until = now + lease.as_millis() as i64;
            let mut stmt = conn.prepare_cached(&format!(
                "UPDATE events SET status = 'claimed', attempts = attempts + 1, claimed_by = ?1, \
                 available_at_ms = ?2 WHERE seq IN (SELECT seq FROM events \
                 WHERE status IN ('pending', 'claimed') AND available_at_ms <= ?3 ORDER BY seq LIMIT ?4) \
                 RETURNING {EVENT_COLUMNS}, seq"
            ))?;
            let mut rows = stmt
                .query_map(params![worker, until, now, max as i64], |row| {
                    Ok((row.get::<_, i64>("seq")?, row_event(row)?, row.get::<_, i64>("attempts")? as u32))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.sort_by_key(|(seq, _, _)| *seq);
            Ok(rows)
        })
        .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let bodies = self.bodies.clone();
        let (claimed, unreadable) = tokio::task::spawn_blocking(move || {
            let mut claimed = Vec::with_capacity(rows.len());
            let mut unreadable: Vec<(String, String)> = Vec::new();
            for (_, event, attempt) in rows {
                let id = event.0.id.clone();
                match with_body(&bodies, event) {
                    Ok(event) => claimed.push(Claimed {
                        event,
                        attempt,
                        worker: worker_name.clone(),
                    }),
                    Err(e) => unreadable.push((id, e.to_string())),
                }
            }
            (claimed, unreadable)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("body read task failed: {e}")))?;
        // An event whose body cannot be read would fail every claim forever:
        // dead-letter it with the reason, and hand out the others.
        for (id, reason) in unreadable {
            tracing::error!(event = %id, %reason, "dead-lettering an event whose body cannot be read");
            let _ = self
                .write(move |conn| mark_dead(conn, &id, &reason, None))
                .await;
        }
        Ok(claimed)
    }

    async fn complete(&self, lease: &Lease, decision: &Decision) -> Result<(), StoreError> {
        let lease = lease.clone();
        let json =
            serde_json::to_string(decision).map_err(|e| StoreError::Backend(e.to_string()))?;
        let at = decision.decided_at_ms;
        self.write(move |conn| {
            let n = conn
                .prepare_cached(&format!(
                    "UPDATE events SET status = 'routed', claimed_by = NULL, last_error = NULL {HELD}"
                ))?
                .execute(params![lease.event_id, lease.worker, lease.attempt])?;
            if n == 0 {
                return Err(StoreError::LeaseLost(lease.event_id));
            }
            conn.prepare_cached("INSERT INTO decisions (event_id, decided_at_ms, decision) VALUES (?1, ?2, ?3)")?
                .execute(params![lease.event_id, at, json])?;
            Ok(())
        })
        .await
    }

    async fn retry_later(
        &self,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> Result<(), StoreError> {
        self.release(lease, delay, error, Attempt::Counted).await
    }

    async fn defer(&self, lease: &Lease, delay: Duration, reason: &str) -> Result<(), StoreError> {
        self.release(lease, delay, reason, Attempt::GivenBack).await
    }

    async fn extend(&self, leases: &[Lease], lease: Duration) -> Result<Vec<bool>, StoreError> {
        let leases = leases.to_vec();
        self.write(move |conn| {
            let until = now_ms() + lease.as_millis() as i64;
            let mut stmt =
                conn.prepare_cached(&format!("UPDATE events SET available_at_ms = ?4 {HELD}"))?;
            leases
                .iter()
                .map(|l| Ok(stmt.execute(params![l.event_id, l.worker, l.attempt, until])? == 1))
                .collect()
        })
        .await
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), StoreError> {
        let (lease, reason) = (lease.clone(), reason.to_string());
        self.write(move |conn| mark_dead(conn, &lease.event_id, &reason, Some(&lease)))
            .await
    }

    async fn requeue(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE events SET status = 'pending', claimed_by = NULL, available_at_ms = 0, \
                     attempts = 0 WHERE id = ?1",
                )?
                .execute([&id])?;
            if n == 0 {
                return Err(StoreError::NotFound(id));
            }
            conn.prepare_cached("DELETE FROM dead_letters WHERE event_id = ?1")?
                .execute([&id])?;
            Ok(())
        })
        .await?;
        self.work.notify_waiters();
        Ok(())
    }

    async fn queue_depth(&self) -> Result<u64, StoreError> {
        self.read(|conn, _| {
            let n: i64 = conn.query_row(
                "SELECT count(*) FROM events WHERE status = 'pending' \
                 OR (status = 'claimed' AND available_at_ms <= ?1)",
                [now_ms()],
                |r| r.get(0),
            )?;
            Ok(n as u64)
        })
        .await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        // A write through the writer proves the database takes commits.
        self.write(|conn| {
            conn.execute_batch("CREATE TABLE IF NOT EXISTS readiness (x INTEGER)")?;
            Ok(())
        })
        .await
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.work.notified()).await;
    }

    async fn close(&self) {
        // The writer drains its queue and commits before the thread ends.
        SqliteStore::close(self);
    }
}
