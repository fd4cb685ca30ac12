//! The embedded store: SQLite (bundled) in WAL mode with one writer thread.
//!
//! Every mutation goes to the writer, which drains whatever is queued (up to
//! `batch_max`) into one transaction and commits it with `synchronous = FULL`:
//! one fsync per batch, not per event (group commit). Each job runs inside its
//! own savepoint, so one failing job does not undo the others, and its caller
//! hears back only after the commit — an append is acknowledged only once it is
//! durable. Reads use a separate connection and never wait for the writer.

use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{Notify, oneshot};

use super::{Appended, Claimed, EventRecord, EventSummary, ListFilter, Store, StoreError};
use crate::decision::Decision;
use crate::event::{Event, EventStatus, Provider};
use crate::ingress::NewEvent;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    source          TEXT NOT NULL,
    provider        TEXT NOT NULL,
    kind            TEXT NOT NULL,
    action          TEXT,
    delivery_id     TEXT NOT NULL,
    received_at_ms  INTEGER NOT NULL,
    headers         TEXT NOT NULL,
    body            BLOB NOT NULL,
    size            INTEGER NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    available_at_ms INTEGER NOT NULL DEFAULT 0,
    claimed_by      TEXT,
    last_error      TEXT,
    UNIQUE (source, delivery_id)
);
CREATE INDEX IF NOT EXISTS events_work ON events (status, available_at_ms);
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
type Job = Box<dyn FnOnce(Option<&Connection>) -> (bool, Reply) + Send>;
type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    reader: Arc<Mutex<Connection>>,
    work: Arc<Notify>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path, batch_max: usize) -> Result<SqliteStore, StoreError> {
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
        conn.execute_batch(SCHEMA)?;
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(Duration::from_secs(10))?;

        let (tx, rx) = mpsc::channel::<Job>();
        let work = Arc::new(Notify::new());
        let notify = work.clone();
        let batch_max = batch_max.max(1);
        let thread = std::thread::Builder::new()
            .name("sluice-store-writer".into())
            .spawn(move || writer_loop(conn, rx, batch_max, &notify))
            .map_err(|e| StoreError::Backend(format!("cannot start writer thread: {e}")))?;
        Ok(SqliteStore {
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            reader: Arc::new(Mutex::new(reader)),
            work,
        })
    }

    /// Opens an existing database for reading only (the CLI's `events` commands).
    pub fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(conn)
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
        let job: Job = Box::new(move |conn| {
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
        let sender = self
            .writer
            .lock()
            .expect("writer lock")
            .clone()
            .ok_or(StoreError::Closed)?;
        sender.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&reader.lock().expect("reader lock")))
            .await
            .map_err(|e| StoreError::Backend(format!("reader task failed: {e}")))?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Job>, batch_max: usize, work: &Notify) {
    while let Ok(first) = rx.recv() {
        let mut jobs = Vec::with_capacity(64);
        jobs.push(first);
        while jobs.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let txn = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
            Ok(txn) => txn,
            Err(e) => {
                let err = StoreError::Backend(format!("cannot begin transaction: {e}"));
                for job in jobs {
                    let (_, reply) = job(None);
                    reply(Err(err.clone()));
                }
                continue;
            }
        };
        let replies: Vec<Reply> = jobs
            .into_iter()
            .map(|job| {
                if txn.execute_batch("SAVEPOINT job").is_err() {
                    return job(None).1;
                }
                let (ok, reply) = job(Some(&txn));
                // A failed job's partial writes are undone; the others stay in the batch.
                let end = if ok {
                    "RELEASE job"
                } else {
                    "ROLLBACK TO job; RELEASE job"
                };
                let _ = txn.execute_batch(end);
                reply
            })
            .collect();
        let commit = txn
            .commit()
            .map_err(|e| StoreError::Backend(format!("commit failed: {e}")));
        for reply in replies {
            reply(commit.clone());
        }
        work.notify_waiters();
    }
}

fn row_summary(row: &rusqlite::Row<'_>) -> rusqlite::Result<EventSummary> {
    let status: String = row.get("status")?;
    Ok(EventSummary {
        id: row.get("id")?,
        delivery_id: row.get("delivery_id")?,
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

fn row_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let provider: String = row.get("provider")?;
    let headers: String = row.get("headers")?;
    let body: Vec<u8> = row.get("body")?;
    Ok(Event {
        id: row.get("id")?,
        source: row.get("source")?,
        provider: Provider::parse(&provider).unwrap_or(Provider::None),
        kind: row.get("kind")?,
        action: row.get("action")?,
        delivery_id: row.get("delivery_id")?,
        received_at_ms: row.get("received_at_ms")?,
        headers: serde_json::from_str(&headers).unwrap_or_default(),
        body: Bytes::from(body),
    })
}

const EVENT_COLUMNS: &str = "id, source, provider, kind, action, delivery_id, received_at_ms, headers, body, \
                             size, status, attempts, last_error";

/// `get` on a plain connection, shared with the CLI's read-only access.
pub fn get_record(conn: &Connection, id: &str) -> Result<Option<EventRecord>, StoreError> {
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

/// `list` on a plain connection, shared with the CLI's read-only access.
pub fn list_summaries(
    conn: &Connection,
    filter: &ListFilter,
) -> Result<Vec<EventSummary>, StoreError> {
    let mut sql = String::from(
        "SELECT id, delivery_id, source, provider, kind, action, received_at_ms, size, status, attempts \
         FROM events WHERE 1 = 1",
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

#[async_trait]
impl Store for SqliteStore {
    async fn append(&self, ev: NewEvent) -> Result<Appended, StoreError> {
        self.write(move |conn| {
            let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
            let headers = serde_json::to_string(ev.headers()).expect("headers serialise");
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO events (id, source, provider, kind, action, delivery_id, received_at_ms, \
                     headers, body, size) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                     ON CONFLICT (source, delivery_id) DO NOTHING",
                )?
                .execute(params![
                    id,
                    ev.source(),
                    ev.provider().as_str(),
                    ev.kind(),
                    ev.action(),
                    ev.delivery_id(),
                    ev.received_at_ms(),
                    headers,
                    ev.body().as_ref(),
                    ev.body().len() as i64,
                ])?;
            if inserted == 1 {
                return Ok(Appended::Stored(id));
            }
            let existing: String = conn
                .prepare_cached("SELECT id FROM events WHERE source = ?1 AND delivery_id = ?2")?
                .query_row(params![ev.source(), ev.delivery_id()], |r| r.get(0))?;
            Ok(Appended::Duplicate(existing))
        })
        .await
    }

    async fn find_delivery(
        &self,
        source: &str,
        delivery_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let (source, delivery_id) = (source.to_string(), delivery_id.to_string());
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT id FROM events WHERE source = ?1 AND delivery_id = ?2")?
                .query_row(params![source, delivery_id], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |conn| get_record(conn, &id)).await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<EventSummary>, StoreError> {
        let filter = filter.clone();
        self.read(move |conn| list_summaries(conn, &filter)).await
    }

    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        let worker = worker.to_string();
        self.write(move |conn| {
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
            Ok(rows.into_iter().map(|(_, event, attempt)| Claimed { event, attempt }).collect())
        })
        .await
    }

    async fn complete(&self, id: &str, decision: &Decision) -> Result<(), StoreError> {
        let id = id.to_string();
        let json =
            serde_json::to_string(decision).map_err(|e| StoreError::Backend(e.to_string()))?;
        let at = decision.decided_at_ms;
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE events SET status = 'routed', claimed_by = NULL, last_error = NULL WHERE id = ?1",
                )?
                .execute([&id])?;
            if n == 0 {
                return Err(StoreError::NotFound(id));
            }
            conn.prepare_cached("INSERT INTO decisions (event_id, decided_at_ms, decision) VALUES (?1, ?2, ?3)")?
                .execute(params![id, at, json])?;
            Ok(())
        })
        .await
    }

    async fn retry_later(&self, id: &str, delay: Duration, error: &str) -> Result<(), StoreError> {
        let (id, error) = (id.to_string(), error.to_string());
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE events SET status = 'pending', claimed_by = NULL, available_at_ms = ?2, \
                     last_error = ?3 WHERE id = ?1",
                )?
                .execute(params![id, now_ms() + delay.as_millis() as i64, error])?;
            if n == 0 { Err(StoreError::NotFound(id)) } else { Ok(()) }
        })
        .await
    }

    async fn dead_letter(&self, id: &str, reason: &str) -> Result<(), StoreError> {
        let (id, reason) = (id.to_string(), reason.to_string());
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE events SET status = 'dead', claimed_by = NULL, last_error = ?2 WHERE id = ?1",
                )?
                .execute(params![id, reason])?;
            if n == 0 {
                return Err(StoreError::NotFound(id));
            }
            conn.prepare_cached(
                "INSERT INTO dead_letters (event_id, reason, at_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (event_id) DO UPDATE SET reason = excluded.reason, at_ms = excluded.at_ms",
            )?
            .execute(params![id, reason, now_ms()])?;
            Ok(())
        })
        .await
    }

    async fn requeue(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE events SET status = 'pending', claimed_by = NULL, available_at_ms = 0 WHERE id = ?1",
                )?
                .execute([&id])?;
            if n == 0 {
                return Err(StoreError::NotFound(id));
            }
            conn.prepare_cached("DELETE FROM dead_letters WHERE event_id = ?1")?.execute([&id])?;
            Ok(())
        })
        .await
    }

    async fn queue_depth(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
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
