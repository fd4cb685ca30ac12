//! The embedded store: an append-only event log (`log.rs`) as the durable
//! record, SQLite (bundled, WAL, `synchronous = NORMAL`) as its index and
//! work queue, a writer thread that owns both, and a syncer thread.
//!
//! The writer drains whatever is queued (up to `batch_max` jobs). The batch's
//! appends are deduplicated against the index, framed as log records and
//! written with one `write`. The same batch then applies the new records to
//! the index (event row, dedup key, work-queue row, and the log position
//! applied; all of them or none) and runs the other jobs (claims,
//! settlements), each in its own savepoint, in one transaction that commits
//! without a sync: what it holds can be rebuilt from the log, which is why
//! `NORMAL` is enough. The syncer then makes the batch's write durable with
//! one `fdatasync` (covering every batch written since its last one) and
//! answers the appends, in batch order, while the writer goes on. At start,
//! the log's tail past the applied position is replayed into the index; the
//! event's sequence number is the row key, so a replay interrupted and
//! started again applies nothing twice. Reads use a separate connection and
//! never wait for the writer.
//!
//! The work queue is its own table holding only unsettled events, keyed for
//! the claim order `(due_at_ms, seq)`: a claim is an index range scan of the
//! rows it takes, whatever the backlog; settling deletes the row. Its depth
//! is a counter, not a `count(*)`.
//!
//! Deduplication is the `dedup` table: one row per dedup key
//! ([`crate::event::dedup_key`]) naming the event that holds it. A provider's
//! id holds its key for good (`expires_at_ms` NULL); a body hash holds it
//! until `received_at_ms` + the dedup window, a deadline stored with the row
//! (and in the log record), so the window survives a restart. The index
//! schema's version is SQLite's `user_version`; a database of another version
//! is refused with a message, never half-read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;
use tokio::sync::{Notify, oneshot};

use super::log::{self, LogReader, LogWriter, Position, Record, RecordRef, ScanEnd};
use super::{
    Appended, Claimed, EventReader, EventRecord, EventSummary, Expired, Lease, ListFilter,
    RecordedDecision, Released, Store, StoreError,
};
use crate::decision::Decision;
use crate::event::{EventStatus, IdOrigin, now_ms};
use crate::ingress::NewEvent;

/// The schema this build reads and writes, kept in `PRAGMA user_version`
/// (0: the first store; 1: bodies in a side log, rows as the record; 2: the
/// event log as the record, dedup keyed by text; 3: dedup keyed by digest;
/// 4 adds the dispatch tables to 3, which is upgraded in place).
const SCHEMA_VERSION: i64 = 4;

mod dispatch;
mod export;

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
    log_segment     INTEGER NOT NULL,
    log_offset      INTEGER NOT NULL,
    log_len         INTEGER NOT NULL,
    size            INTEGER NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS events_delivery ON events (source, delivery_id);
CREATE INDEX IF NOT EXISTS events_segment ON events (log_segment);
CREATE TABLE IF NOT EXISTS queue (
    seq        INTEGER PRIMARY KEY,
    due_at_ms  INTEGER NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT
);
CREATE INDEX IF NOT EXISTS queue_due ON queue (due_at_ms, seq);
CREATE TABLE IF NOT EXISTS dedup (
    key           BLOB PRIMARY KEY,
    seq           INTEGER NOT NULL,
    expires_at_ms INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS decisions (
    seq           INTEGER PRIMARY KEY,
    event_id      TEXT NOT NULL,
    decided_at_ms INTEGER NOT NULL,
    decision      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_event ON decisions (event_id, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    event_id TEXT PRIMARY KEY,
    reason   TEXT NOT NULL,
    at_ms    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS log_applied (
    one      INTEGER PRIMARY KEY CHECK (one = 1),
    segment  INTEGER NOT NULL,
    offset   INTEGER NOT NULL,
    next_seq INTEGER NOT NULL
);
";

/// How the embedded store behaves; [`Options::from_config`] takes the
/// `[store]` keys.
#[derive(Debug, Clone)]
pub struct Options {
    /// Most jobs handled in one batch (one log sync, one index commit).
    pub batch_max: usize,
    /// How long a delivery known only by its body hash stays a duplicate.
    pub dedup_window: Duration,
    /// Most body and header bytes waiting for the writer; an append past it
    /// is refused at once ([`StoreError::Busy`]).
    pub queue_bytes: usize,
    /// Longest an append waits for the log to be durable before it is
    /// answered [`StoreError::Busy`] (it may still be stored; a retry of it
    /// is then a duplicate).
    pub append_timeout: Duration,
    /// Where a log segment rolls over to the next (retention removes whole
    /// segments).
    pub segment_bytes: u64,
    /// Attempts an event gets (`rules.max_attempts`): a failed last attempt
    /// dead-letters it, and a claim past it (earlier claims never settled:
    /// their workers died mid-route) dead-letters it without handing it out.
    pub max_deliver: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options::from_config(
            &crate::config::StoreConfig::default(),
            &crate::rules::config::RulesConfig::default(),
        )
    }
}

impl Options {
    /// The options the `[store]` section and `rules.max_attempts` set.
    pub fn from_config(
        c: &crate::config::StoreConfig,
        rules: &crate::rules::config::RulesConfig,
    ) -> Options {
        Options {
            max_deliver: rules.max_attempts.max(1),
            batch_max: c.batch_max.max(1),
            dedup_window: c.dedup_ttl,
            queue_bytes: c.queue_bytes,
            append_timeout: c.append_timeout,
            segment_bytes: log::SEGMENT_BYTES,
        }
    }
}

/// A job for the writer: runs inside the batch transaction (or, given `None`,
/// does not run because the batch could not start), and returns whether it
/// succeeded and what to tell its caller once the commit's outcome is known.
type RunJob = Box<dyn FnOnce(Option<&Connection>) -> (bool, Reply) + Send>;
type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// What the writer thread takes.
enum Job {
    /// Append one event (deduplicated, to the log, then the index), with the
    /// bytes it holds of `store.queue_bytes`.
    Append(NewEvent, AppendReply, usize),
    /// Any other write, inside its own savepoint.
    Run(RunJob),
    /// Exported events to store as they were (`sluice events import`): to
    /// the log, then the index, in a write of their own.
    Import(export::ImportJob),
}

type AppendReply = oneshot::Sender<Result<Appended, StoreError>>;

/// The embedded store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    reader: Arc<Mutex<Connection>>,
    log: LogReader,
    work: Arc<Notify>,
    signals: super::dispatch::Signals,
    shared: Arc<Shared>,
    options: Options,
}

/// What the writer thread and the callers both keep count of.
#[derive(Debug, Default)]
struct Shared {
    /// Events in the work queue (waiting or held by a worker).
    depth: AtomicI64,
    /// Body and header bytes of appends the writer has not answered yet.
    queued_bytes: AtomicUsize,
}

/// A read-only view of a store on disk (the CLI's `events` commands).
#[derive(Debug)]
pub struct ReadOnly {
    // A mutex only to be shared across threads (the read role is `Sync`);
    // the CLI reads from one task.
    conn: Mutex<Connection>,
    log: LogReader,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store whose index is at `path`, with
    /// the default options but `batch_max`.
    pub fn open(path: &Path, batch_max: usize) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(
            path,
            Options {
                batch_max,
                ..Options::default()
            },
        )
    }

    /// Opens (creating if needed) the store at `path` with a dedup window
    /// for body-hash ids: a delivery known only by its body hash is a
    /// duplicate for `dedup_window` after the first copy was received; a
    /// provider's id stays a duplicate for good.
    pub fn open_with_dedup_window(
        path: &Path,
        batch_max: usize,
        dedup_window: Duration,
    ) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(
            path,
            Options {
                batch_max,
                dedup_window,
                ..Options::default()
            },
        )
    }

    /// Opens (creating if needed) the store whose index is at `path` and
    /// whose log is beside it (`sluice.db` → `sluice.log/`), replaying into
    /// the index whatever the log holds past what the index has applied.
    pub fn open_with(path: &Path, options: Options) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let log_dir = log::dir_for(path);
        // The log's lock first: a second process must not touch the index either.
        let mut writer = LogWriter::open(&log_dir, options.segment_bytes).map_err(|e| {
            StoreError::Backend(format!(
                "cannot open the event log {}: {e}",
                log_dir.display()
            ))
        })?;
        let mut conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // The dedup keys and the delivery index are looked up and written at
        // random: a page cache that holds more of them keeps those reads off
        // the disk (a bound, not a growth: 16 MiB).
        conn.pragma_update(None, "cache_size", -16_384)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        check_schema(&conn, path)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(dispatch::SCHEMA)?;
        dispatch::add_missing_columns(&conn)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        // Expired body-hash keys are overwritten when their body comes again;
        // the rest are dropped here.
        conn.execute(
            "DELETE FROM dedup WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1",
            [now_ms()],
        )?;
        let replayed = recover(&mut conn, &mut writer, &log_dir)?;
        // What the last process wrote but had not synced yet is in the page
        // cache only: make it durable before anything is answered from it.
        let (applied_at, next_seq) = applied(&conn)?;
        for n in log::segments(&log_dir)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", log_dir.display())))?
            .into_iter()
            .filter(|&n| n >= applied_at.segment)
        {
            let path = log::segment_path(&log_dir, n);
            std::fs::File::open(&path)
                .and_then(|f| f.sync_data())
                .map_err(|e| StoreError::Backend(format!("cannot sync {}: {e}", path.display())))?;
        }
        if replayed > 0 {
            tracing::info!(events = replayed, log = %log_dir.display(), "replayed the event log's tail into the index");
        }
        // Leases a process that ended left on events are void: this process
        // owns the store (the log's lock), so what they held is routed again
        // now rather than when the leases would have run out. The claims
        // still count toward the event's attempts.
        conn.execute(
            "UPDATE queue SET due_at_ms = ?1, claimed_by = NULL WHERE claimed_by IS NOT NULL",
            [now_ms()],
        )?;
        let depth: i64 = conn.query_row("SELECT count(*) FROM queue", [], |r| r.get(0))?;
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(Duration::from_secs(10))?;

        let shared = Arc::new(Shared {
            depth: AtomicI64::new(depth),
            queued_bytes: AtomicUsize::new(0),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let work = Arc::new(Notify::new());
        let (sync_tx, sync_rx) = mpsc::channel::<Synced>();
        let syncer_shared = shared.clone();
        let syncer = spawn_or_abort("sluice-store-sync", move || {
            syncer_loop(sync_rx, &syncer_shared)
        })?;
        let state = WriterState {
            conn,
            log: writer,
            log_dir: log_dir.clone(),
            behind: false,
            dedup_window: options.dedup_window,
            shared: shared.clone(),
            work: work.clone(),
            sync: sync_tx,
            next_seq,
        };
        let batch_max = options.batch_max.max(1);
        let thread = spawn_or_abort("sluice-store-writer", move || {
            writer_loop(state, rx, batch_max);
            // The writer has handed over its last batch; the syncer answers it.
            let _ = syncer.join();
        })?;
        Ok(SqliteStore {
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            reader: Arc::new(Mutex::new(reader)),
            log: LogReader::new(log_dir),
            work,
            signals: super::dispatch::Signals::default(),
            shared,
            options,
        })
    }

    /// Opens an existing store for reading only (the CLI's `events` commands).
    pub fn open_read_only(path: &Path) -> Result<ReadOnly, StoreError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        check_schema(&conn, path)?;
        Ok(ReadOnly {
            conn: Mutex::new(conn),
            log: LogReader::new(log::dir_for(path)),
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
        f: impl FnOnce(&Connection, &LogReader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || f(&reader.lock().expect("reader lock"), &log))
            .await
            .map_err(|e| StoreError::Backend(format!("reader task failed: {e}")))?
    }

    fn add_depth(&self, n: i64) {
        self.shared.depth.fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Starts one of the store's threads. Without it the gateway could only
/// answer 503 and lose what providers do not retry, so a panic in it stops
/// the process, for a supervisor to restart it on the same data (nothing
/// acknowledged is lost).
fn spawn_or_abort(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, StoreError> {
    let thread_name = name.to_string();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                tracing::error!(thread = %thread_name, "a store thread panicked; aborting");
                std::process::abort();
            }
        })
        .map_err(|e| StoreError::Backend(format!("cannot start the {name} thread: {e}")))
}

/// Refuses a database written with another schema, naming the file.
fn check_schema(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let has_events: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'events'",
        [],
        |r| r.get(0),
    )?;
    // Schema 4 only adds tables to 3: upgraded in place by creating them.
    if has_events && version != SCHEMA_VERSION && version != 3 {
        let by = if version < SCHEMA_VERSION {
            "an older"
        } else {
            "a newer"
        };
        return Err(StoreError::Backend(format!(
            "{}: written by {by} sluice (store schema {version}; this build reads schema \
             {SCHEMA_VERSION}); move it and the directories beside it of the same name \
             (.log, .bodies) aside to start an empty store, or run the sluice that wrote it",
            path.display()
        )));
    }
    Ok(())
}

/// How far the index has applied the log, and the next sequence number.
fn applied(conn: &Connection) -> Result<(Position, i64), StoreError> {
    let row = conn
        .query_row(
            "SELECT segment, offset, next_seq FROM log_applied WHERE one = 1",
            [],
            |r| {
                Ok((
                    Position {
                        segment: r.get(0)?,
                        offset: r.get::<_, i64>(1)? as u64,
                    },
                    r.get::<_, i64>(2)?,
                ))
            },
        )
        .optional()?;
    Ok(row.unwrap_or((Position::default(), 1)))
}

fn set_applied(conn: &Connection, at: Position, next_seq: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO log_applied (one, segment, offset, next_seq) VALUES (1, ?1, ?2, max(?3, 1)) \
         ON CONFLICT (one) DO UPDATE SET segment = excluded.segment, offset = excluded.offset, \
         next_seq = max(next_seq, excluded.next_seq)",
    )?
    .execute(params![at.segment, at.offset as i64, next_seq])?;
    Ok(())
}

/// Records applied per replay transaction: a kill during a long replay
/// loses at most this many records' work, redone at the next start.
const REPLAY_CHUNK: usize = 2_000;

/// Brings the index up to the log: replays every record past the applied
/// position, cuts a torn record off the newest segment's tail, and reports
/// (and marks) events the index points at but the log no longer holds.
/// Returns how many events were added.
fn recover(
    conn: &mut Connection,
    writer: &mut LogWriter,
    log_dir: &Path,
) -> Result<u64, StoreError> {
    let (from, _) = applied(conn)?;
    let newest = writer.segment();
    let segments = log::segments(log_dir)
        .map_err(|e| StoreError::Backend(format!("{}: {e}", log_dir.display())))?;
    if from.segment != 0 && !segments.contains(&from.segment) {
        tracing::error!(
            segment = %log::segment_path(log_dir, from.segment).display(),
            "the index has applied a log segment that is gone; events it held cannot be read"
        );
    }
    let mut added = 0u64;
    for &n in segments.iter().filter(|&&n| n >= from.segment) {
        let start = if n == from.segment { from.offset } else { 0 };
        let path = log::segment_path(log_dir, n);
        let len = std::fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        if len < start {
            let lost = mark_lost_beyond(conn, n, &path, len)?;
            tracing::error!(
                segment = %path.display(), bytes = len, index_applied = start, events_lost = lost,
                "log segment shorter than the index claims; the events past its end are dead-lettered as lost"
            );
            let end = if n == newest {
                cut_partial_record(conn, writer, log_dir, n, len)?
            } else {
                len
            };
            set_applied(
                conn,
                Position {
                    segment: n,
                    offset: end,
                },
                0,
            )?;
            continue;
        }
        let mut start = start;
        loop {
            let (end, n_added) = replay_segment(conn, log_dir, n, start)?;
            added += n_added;
            let ScanEnd::Invalid { at, file_len, why } = end else {
                break;
            };
            let next = log::resync(log_dir, n, at)
                .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
            match next {
                // Whole records follow: this is damage, not a torn tail.
                Some(next) => {
                    tracing::error!(
                        segment = %path.display(), at, bytes = next - at, %why,
                        "damaged bytes in the middle of the log; the records after them are replayed"
                    );
                    start = next;
                }
                None if n == newest => {
                    let aside = writer.cut_tail(at).map_err(|e| {
                        StoreError::Backend(format!(
                            "cannot cut the torn tail of {}: {e}",
                            path.display()
                        ))
                    })?;
                    tracing::warn!(
                        segment = %path.display(), at, bytes = file_len - at, %why, kept = %aside.display(),
                        "cut a torn record off the log's tail (it was never acknowledged)"
                    );
                    break;
                }
                None => {
                    tracing::error!(
                        segment = %path.display(), at, bytes = file_len - at, %why,
                        "damaged bytes at the end of an older log segment; no whole record follows them"
                    );
                    break;
                }
            }
        }
    }
    Ok(added)
}

/// Replays one segment from `start` into the index, committing every
/// [`REPLAY_CHUNK`] records together with the position reached.
fn replay_segment(
    conn: &mut Connection,
    log_dir: &Path,
    n: u32,
    start: u64,
) -> Result<(ScanEnd, u64), StoreError> {
    let mut added = 0u64;
    let mut chunk: Vec<(RecordRef, Record)> = Vec::with_capacity(REPLAY_CHUNK);
    let mut flush = |conn: &mut Connection, chunk: &mut Vec<(RecordRef, Record)>| {
        let txn = conn.transaction()?;
        let mut next_seq = 0;
        let mut end = None;
        for (at, rec) in chunk.drain(..) {
            if apply_record(&txn, &rec, at)? {
                added += 1;
            }
            next_seq = next_seq.max(rec.seq + 1);
            end = Some(at.end());
        }
        if let Some(end) = end {
            set_applied(&txn, end, next_seq)?;
        }
        txn.commit()?;
        Ok::<(), StoreError>(())
    };
    let scanned = log::scan(log_dir, n, start, |at, rec| {
        chunk.push((at, rec));
        if chunk.len() >= REPLAY_CHUNK {
            flush(conn, &mut chunk)?;
        }
        Ok::<(), StoreError>(())
    })
    .map_err(|e| {
        StoreError::Backend(format!("{}: {e}", log::segment_path(log_dir, n).display()))
    })?;
    let end = scanned?;
    flush(conn, &mut chunk)?;
    if let ScanEnd::Clean(len) = end {
        // An empty tail still moves the applied position (a new segment).
        let (at, _) = applied(conn)?;
        if at
            < (Position {
                segment: n,
                offset: len,
            })
        {
            set_applied(
                conn,
                Position {
                    segment: n,
                    offset: len,
                },
                0,
            )?;
        }
    }
    Ok((end, added))
}

/// Cuts the newest segment, `n`, found shorter than the index claims (`len`
/// bytes), back to the end of its last whole record: appends must not follow
/// part of a record, or a scan of the segment (an index rebuilt from the
/// log) would stop there and never reach them. Returns where it ends now.
fn cut_partial_record(
    conn: &Connection,
    writer: &mut LogWriter,
    log_dir: &Path,
    n: u32,
    len: u64,
) -> Result<u64, StoreError> {
    let path = log::segment_path(log_dir, n);
    // The records up to the last one the index holds whole are known good.
    let whole: i64 = conn.query_row(
        "SELECT coalesce(max(log_offset + log_len), 0) FROM events \
         WHERE log_segment = ?1 AND log_offset + log_len <= ?2",
        params![n, len as i64],
        |r| r.get(0),
    )?;
    let end = log::scan::<()>(log_dir, n, whole as u64, |_, _| Ok(()))
        .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?
        .unwrap_or(ScanEnd::Clean(len));
    let ScanEnd::Invalid { at, file_len, why } = end else {
        return Ok(len);
    };
    let aside = writer.cut_tail(at).map_err(|e| {
        StoreError::Backend(format!(
            "cannot cut the partial record off {}: {e}",
            path.display()
        ))
    })?;
    tracing::warn!(
        segment = %path.display(), at, bytes = file_len - at, %why, kept = %aside.display(),
        "cut the part of a lost record off the log's tail"
    );
    Ok(at)
}

/// Dead-letters the events whose records lie past `len` in segment `n`
/// (the file `path`), naming the file as a claim that cannot read one does.
fn mark_lost_beyond(conn: &Connection, n: u32, path: &Path, len: u64) -> Result<u64, StoreError> {
    let ids: Vec<String> = conn
        .prepare(
            "SELECT id FROM events WHERE log_segment = ?1 AND log_offset + log_len > ?2 \
             AND status != 'dead'",
        )?
        .query_map(params![n, len as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in &ids {
        mark_lost(
            conn,
            id,
            &format!(
                "{}: its log record is past the end of the segment ({len} bytes)",
                path.display()
            ),
        )?;
    }
    Ok(ids.len() as u64)
}

/// Dead-letters an event whose log record is gone or damaged, with a reason
/// starting `lost:`, and frees its dedup key: the provider's redelivery of
/// it is stored again instead of answered as a duplicate of what cannot be
/// read. Returns whether it left the work queue.
fn mark_lost(conn: &Connection, id: &str, why: &str) -> Result<bool, StoreError> {
    let dequeued = mark_dead(conn, id, &format!("lost: {why}"), None)?;
    let row: Option<(String, String, String, String)> = conn
        .prepare_cached(
            "SELECT source, id_origin, delivery_id, body_sha256 FROM events WHERE id = ?1",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    if let Some((source, origin, delivery, sha)) = row {
        let origin = IdOrigin::parse(&origin).unwrap_or(IdOrigin::Body);
        let key = crate::event::dedup_key(&source, origin, &delivery, &sha);
        conn.prepare_cached(
            "DELETE FROM dedup WHERE key = ?1 AND seq = (SELECT seq FROM events WHERE id = ?2)",
        )?
        .execute(params![key_digest(&key), id])?;
    }
    Ok(dequeued)
}

/// Adds one logged event to the index (row, dedup key, work-queue row);
/// does nothing for an event already there. Returns whether it was added.
fn apply_record(conn: &Connection, rec: &Record, at: RecordRef) -> Result<bool, StoreError> {
    let added =
        conn.prepare_cached(
            "INSERT INTO events (seq, id, source, provider, kind, action, delivery_id, id_origin, \
             body_sha256, conflict_with, received_at_ms, log_segment, log_offset, log_len, size) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
             ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            rec.seq,
            rec.id,
            rec.source,
            rec.provider.as_str(),
            rec.kind,
            rec.action,
            rec.delivery_id,
            rec.id_origin.as_str(),
            rec.body_sha256,
            rec.conflict_with,
            rec.received_at_ms,
            at.segment,
            at.offset as i64,
            at.len,
            rec.body.len() as i64,
        ])? == 1;
    if !added {
        return Ok(false);
    }
    // Only an expired key can be taken over; a live one was caught before
    // the record was written.
    conn.prepare_cached(
        "INSERT INTO dedup (key, seq, expires_at_ms) VALUES (?1, ?2, ?3) \
         ON CONFLICT (key) DO UPDATE SET seq = excluded.seq, \
         expires_at_ms = excluded.expires_at_ms",
    )?
    .execute(params![
        key_digest(&rec.dedup_key),
        rec.seq,
        rec.dedup_until_ms
    ])?;
    conn.prepare_cached("INSERT INTO queue (seq, due_at_ms) VALUES (?1, ?2)")?
        .execute(params![rec.seq, rec.received_at_ms])?;
    Ok(true)
}

/// What the writer thread owns.
struct WriterState {
    conn: Connection,
    log: LogWriter,
    log_dir: PathBuf,
    /// The index missed records the log holds (an index write failed): they
    /// are replayed before the next batch is deduplicated against it.
    behind: bool,
    dedup_window: Duration,
    shared: Arc<Shared>,
    work: Arc<Notify>,
    /// The syncer: makes each batch's log write durable, then answers its
    /// appends, in batch order.
    sync: mpsc::Sender<Synced>,
    /// The next sequence number, past every one ever framed (a batch whose
    /// write failed used its numbers too: they are never handed out twice).
    next_seq: i64,
}

/// A batch's appends, to be answered once `file` (the segment the batch was
/// written to, if it wrote anything) is durable.
struct Synced {
    file: Option<Arc<std::fs::File>>,
    answers: Vec<Answer>,
}

/// The syncer thread: one `fdatasync` for every batch written since the last
/// one, then their answers, in order. The writer goes on with the next batch
/// (indexing, claims, settlements) meanwhile, so a sync's wait overlaps the
/// writer's work instead of adding to it. A duplicate's answer waits behind
/// the sync of the batch before it, so a 200 never precedes the durability of
/// the copy it points at.
fn syncer_loop(rx: mpsc::Receiver<Synced>, shared: &Shared) {
    while let Ok(first) = rx.recv() {
        let mut round = vec![first];
        while let Ok(more) = rx.try_recv() {
            round.push(more);
        }
        let mut synced: Vec<Arc<std::fs::File>> = Vec::new();
        for file in round.iter().filter_map(|s| s.file.as_ref()) {
            if synced.iter().any(|f| Arc::ptr_eq(f, file)) {
                continue;
            }
            if let Err(e) = file.sync_data() {
                // After a failed fsync the kernel may have dropped the pages and
                // report the next one as a success: nothing written since can
                // be trusted, and the index already names it. Stop; the restart
                // rebuilds the index from what the disk really holds.
                tracing::error!(error = %e, "cannot sync the event log; aborting");
                std::process::abort();
            }
            synced.push(file.clone());
        }
        for batch in round {
            send_answers(batch.answers, shared);
        }
    }
}

fn writer_loop(mut w: WriterState, rx: mpsc::Receiver<Job>, batch_max: usize) {
    while let Ok(first) = rx.recv() {
        let mut jobs = Vec::with_capacity(64);
        jobs.push(first);
        while jobs.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let (imports, jobs): (Vec<_>, Vec<_>) =
            jobs.into_iter().partition(|j| matches!(j, Job::Import(..)));
        let (appends, runs): (Vec<_>, Vec<_>) =
            jobs.into_iter().partition(|j| matches!(j, Job::Append(..)));
        if let Err(e) = w.log.roll_if_full() {
            let next = log::segment_path(&w.log_dir, w.log.segment() + 1);
            tracing::error!(segment = %next.display(), error = %e, "cannot start a new log segment; continuing in the current one");
        }
        if w.behind {
            match recover(&mut w.conn, &mut w.log, &w.log_dir) {
                Ok(_) => {
                    w.behind = false;
                    if let Ok((_, n)) = applied(&w.conn) {
                        w.next_seq = w.next_seq.max(n);
                    }
                    // Replay adds and may dead-letter events: count again.
                    if let Ok(n) = w
                        .conn
                        .query_row("SELECT count(*) FROM queue", [], |r| r.get::<_, i64>(0))
                    {
                        w.shared.depth.store(n, Ordering::Relaxed);
                    }
                }
                Err(e) => tracing::error!(error = %e, "the index is still behind the log"),
            }
        }
        for job in imports {
            if let Job::Import(job) = job {
                export::run_import(&mut w, job);
            }
        }
        // The appends are written once `log_batch` returns; their callers hear
        // back from the syncer once the write is durable, after the index
        // commit below (which does not sync: a crash before it is mended by
        // the replay at start), whatever its outcome.
        let (answers, logged) = log_batch(&mut w, appends);
        let synced = Synced {
            file: (!logged.is_empty()).then(|| w.log.file()),
            answers,
        };
        let txn = match w
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        {
            Ok(txn) => txn,
            Err(e) => {
                let err = StoreError::Backend(format!("cannot begin transaction: {e}"));
                w.behind |= !logged.is_empty();
                let _ = w.sync.send(synced);
                for job in runs {
                    if let Job::Run(job) = job {
                        job(None).1(Err(err.clone()));
                    }
                }
                continue;
            }
        };
        // The batch's records go in whole or not at all (a half-indexed event,
        // its row without its queue entry, would never be routed and the
        // replay would take it as done); the other jobs keep their own fate.
        let mut applied_ok = savepoint(&txn, "SAVEPOINT logged").is_ok();
        for (rec, at) in &logged {
            if !applied_ok {
                break;
            }
            if let Err(e) = apply_record(&txn, rec, *at) {
                tracing::error!(event = %rec.id, error = %e, "cannot index a logged event; it is replayed from the log");
                applied_ok = false;
            }
        }
        if applied_ok
            && !logged.is_empty()
            && let Err(e) = set_applied(&txn, w.log.position(), logged[logged.len() - 1].0.seq + 1)
        {
            tracing::error!(error = %e, "cannot record the applied log position");
            applied_ok = false;
        }
        if !applied_ok {
            let _ = savepoint(&txn, "ROLLBACK TO logged");
        }
        let _ = savepoint(&txn, "RELEASE logged");
        let replies: Vec<Reply> = runs
            .into_iter()
            .filter_map(|job| match job {
                Job::Run(job) => Some(job),
                Job::Append(..) | Job::Import(..) => None,
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
        let indexed = applied_ok && commit.is_ok();
        if indexed {
            w.shared
                .depth
                .fetch_add(logged.len() as i64, Ordering::Relaxed);
        } else if !logged.is_empty() {
            w.behind = true;
        }
        let _ = w.sync.send(synced);
        for reply in replies {
            reply(commit.clone());
        }
        // Wake the workers only for new work: a wake-up after every write
        // (their own empty claims included) kept an idle gateway busy.
        if indexed && !logged.is_empty() {
            w.work.notify_waiters();
        }
    }
}

fn savepoint(conn: &Connection, sql: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute([])
}

/// An append's caller, its answer, and the bytes it held in the queue.
type Answer = (AppendReply, Result<Appended, StoreError>, usize);

/// Deduplicates a batch of appends against the index and each other, and
/// writes the new events to the log in one write. Returns every caller's
/// answer (sent once the write is durable and the index has them too, so a
/// 202's id can be read at once) and the records written, to be applied to
/// the index.
fn log_batch(w: &mut WriterState, appends: Vec<Job>) -> (Vec<Answer>, Vec<(Record, RecordRef)>) {
    let mut answers: Vec<Answer> = Vec::with_capacity(appends.len());
    let mut fresh: Vec<(Record, RecordRef, AppendReply, usize)> = Vec::new();
    // A copy of a delivery that is new in this very batch gets the same
    // outcome as the first copy, decided only once that one is written.
    let mut copies: Vec<(AppendReply, usize, usize)> = Vec::new();
    let mut in_batch: HashMap<String, usize> = HashMap::new();
    // Unsigned ids first seen in this batch, for conflicts within it.
    let mut ids_in_batch: HashMap<(String, String), String> = HashMap::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut next_seq = w.next_seq;
    if w.behind {
        let err =
            StoreError::Backend("the index is behind the event log and cannot catch up".into());
        return (answer_all(appends, &err), Vec::new());
    }
    let now = now_ms();
    for job in appends {
        let Job::Append(ev, reply, bytes) = job else {
            continue;
        };
        let key = ev.dedup_key();
        if let Some(&first) = in_batch.get(&key) {
            copies.push((reply, first, bytes));
            continue;
        }
        match seen(&w.conn, &ev, &key, now, &ids_in_batch) {
            Ok(Seen::Duplicate(id)) => answers.push((reply, Ok(Appended::Duplicate(id)), bytes)),
            Err(e) => answers.push((reply, Err(e), bytes)),
            Ok(Seen::New { conflict_with }) => {
                let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
                if ev.id_origin() == IdOrigin::Unsigned {
                    ids_in_batch
                        .entry((ev.source().to_string(), ev.delivery_id().to_string()))
                        .or_insert_with(|| id.clone());
                }
                let rec = Record {
                    seq: next_seq,
                    id,
                    source: ev.source().to_string(),
                    provider: ev.provider(),
                    kind: ev.kind().to_string(),
                    action: ev.action().map(str::to_string),
                    delivery_id: ev.delivery_id().to_string(),
                    id_origin: ev.id_origin(),
                    body_sha256: ev.body_sha256().to_string(),
                    conflict_with,
                    dedup_until_ms: ev.dedup_until_ms(w.dedup_window),
                    dedup_key: key.clone(),
                    received_at_ms: ev.received_at_ms(),
                    headers: ev.headers().to_vec(),
                    body: ev.body().clone(),
                };
                next_seq += 1;
                let pending = buf.len() as u64;
                let len = rec.frame_into(&mut buf);
                let at = w.log.place(pending, len);
                in_batch.insert(key, fresh.len());
                fresh.push((rec, at, reply, bytes));
            }
        }
    }
    w.next_seq = next_seq;
    let segment = log::segment_path(&w.log_dir, w.log.segment());
    let written = w.log.append(&buf).map_err(|e| {
        StoreError::Backend(format!(
            "cannot write the event log {}: {e}",
            segment.display()
        ))
    });
    let mut outcomes: Vec<Result<Appended, StoreError>> = Vec::with_capacity(fresh.len());
    let mut logged = Vec::with_capacity(fresh.len());
    for (rec, at, reply, bytes) in fresh {
        let result = written.clone().map(|()| match &rec.conflict_with {
            None => Appended::Stored(rec.id.clone()),
            Some(conflict_with) => Appended::IdConflict {
                id: rec.id.clone(),
                conflict_with: conflict_with.clone(),
            },
        });
        outcomes.push(result.clone());
        answers.push((reply, result, bytes));
        if written.is_ok() {
            logged.push((rec, at));
        }
    }
    for (reply, first, bytes) in copies {
        let result = match &outcomes[first] {
            Ok(stored) => Ok(Appended::Duplicate(stored.id().to_string())),
            Err(e) => Err(e.clone()),
        };
        answers.push((reply, result, bytes));
    }
    (answers, logged)
}

/// The same error for every append in `jobs`.
fn answer_all(jobs: Vec<Job>, err: &StoreError) -> Vec<Answer> {
    jobs.into_iter()
        .filter_map(|job| match job {
            Job::Append(_, reply, bytes) => Some((reply, Err(err.clone()), bytes)),
            Job::Run(_) | Job::Import(_) => None,
        })
        .collect()
}

/// Sends the appends' answers and gives their bytes back to the queue budget.
fn send_answers(answers: Vec<Answer>, shared: &Shared) {
    for (reply, result, bytes) in answers {
        shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        let _ = reply.send(result);
    }
}

/// What an append holds in the writer's queue, against `store.queue_bytes`.
fn queued_size(ev: &NewEvent) -> usize {
    ev.body().len()
        + ev.headers()
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
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
    // after the same delivery came signed) is still the same delivery; an
    // event whose log record was lost is no delivery to match.
    let earlier = conn
        .prepare_cached(
            "SELECT id, body_sha256 = ?3 FROM events WHERE source = ?1 AND delivery_id = ?2 \
             AND NOT (status = 'dead' AND last_error LIKE 'lost:%') \
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
            "SELECT e.id FROM dedup d JOIN events e ON e.seq = d.seq WHERE d.key = ?1 \
             AND (d.expires_at_ms IS NULL OR d.expires_at_ms > ?2)",
        )?
        .query_row(params![key_digest(key), now], |r| r.get(0))
        .optional()?)
}

/// The dedup table's key for a dedup key: the first 16 bytes of its SHA-256.
/// A key is a hundred bytes or so (source, origin, body hash, delivery id)
/// and is looked up and inserted at random; a short fixed-size key keeps that
/// B-tree smaller (rows of about 35 bytes instead of about 160), so more of it
/// stays in the page cache. A
/// collision of 128 bits is not a practical concern.
fn key_digest(key: &str) -> [u8; 16] {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The condition under which a lease still holds on a queue row:
/// `?1` event id, `?2` worker, `?3` attempt.
const HELD: &str = "WHERE seq = (SELECT seq FROM events WHERE id = ?1) \
                    AND claimed_by = ?2 AND attempts = ?3";

/// Records a decision under a lease: `Ok(Ok(()))` settled, `Ok(Err(LeaseLost))`
/// when the lease no longer holds (nothing written), `Err` when the index failed.
fn settle_routed(
    conn: &Connection,
    lease: &Lease,
    decision: &Decision,
    json: &str,
) -> Result<Result<(), StoreError>, StoreError> {
    let decided_at_ms = decision.decided_at_ms;
    let n = conn
        .prepare_cached(&format!("DELETE FROM queue {HELD}"))?
        .execute(params![lease.event_id, lease.worker, lease.attempt])?;
    if n == 0 {
        return Ok(Err(StoreError::LeaseLost(lease.event_id.clone())));
    }
    conn.prepare_cached(
        "UPDATE events SET status = 'routed', attempts = ?2, last_error = NULL WHERE id = ?1",
    )?
    .execute(params![lease.event_id, lease.attempt])?;
    conn.prepare_cached(
        "INSERT INTO decisions (event_id, decided_at_ms, decision) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![lease.event_id, decided_at_ms, json])?;
    // The deliveries the decision implies, in the same write.
    dispatch::queue_routes(conn, &lease.event_id, decision, decided_at_ms)?;
    Ok(Ok(()))
}

/// Moves an event to the dead-letter queue; with a lease, only while it
/// holds. Returns whether the event left the work queue.
fn mark_dead(
    conn: &Connection,
    id: &str,
    reason: &str,
    lease: Option<&Lease>,
) -> Result<bool, StoreError> {
    let dequeued = match lease {
        Some(l) => {
            let n = conn
                .prepare_cached(&format!("DELETE FROM queue {HELD}"))?
                .execute(params![l.event_id, l.worker, l.attempt])?;
            if n == 0 {
                return Err(StoreError::LeaseLost(id.to_string()));
            }
            true
        }
        None => {
            conn.prepare_cached(
                "DELETE FROM queue WHERE seq = (SELECT seq FROM events WHERE id = ?1)",
            )?
            .execute([id])?
                == 1
        }
    };
    let n = conn
        .prepare_cached(
            "UPDATE events SET status = 'dead', last_error = ?2, \
             attempts = coalesce(?3, attempts) WHERE id = ?1",
        )?
        .execute(params![id, reason, lease.map(|l| l.attempt)])?;
    if n == 0 {
        return Err(StoreError::NotFound(id.to_string()));
    }
    conn.prepare_cached(
        "INSERT INTO dead_letters (event_id, reason, at_ms) VALUES (?1, ?2, ?3) \
         ON CONFLICT (event_id) DO UPDATE SET reason = excluded.reason, at_ms = excluded.at_ms",
    )?
    .execute(params![id, reason, now_ms()])?;
    Ok(dequeued)
}

/// An index row's summary columns, the queue's view of it folded in.
const SUMMARY_COLUMNS: &str = "e.id, e.delivery_id, e.id_origin, e.conflict_with, e.source, \
     e.provider, e.kind, e.action, e.received_at_ms, e.size, \
     CASE WHEN q.claimed_by IS NOT NULL THEN 'claimed' ELSE e.status END AS status, \
     coalesce(q.attempts, e.attempts) AS attempts, e.last_error, \
     e.seq, e.log_segment, e.log_offset, e.log_len";

const SUMMARY_FROM: &str = "FROM events e LEFT JOIN queue q ON q.seq = e.seq";

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

/// Where a row says its record is.
fn row_record_ref(row: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, RecordRef)> {
    Ok((
        row.get("seq")?,
        RecordRef {
            segment: row.get("log_segment")?,
            offset: row.get::<_, i64>("log_offset")? as u64,
            len: row.get("log_len")?,
        },
    ))
}

/// `get`, for the store and for the CLI's read-only access.
pub fn get_record(ro: &ReadOnly, id: &str) -> Result<Option<EventRecord>, StoreError> {
    record(&ro.conn.lock().expect("reader lock"), &ro.log, id)
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

    async fn export_page(
        &self,
        since_ms: Option<i64>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<super::ExportPage, StoreError> {
        export::page(
            &self.conn.lock().expect("reader lock"),
            &self.log,
            since_ms,
            after,
            limit,
        )
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

fn record(conn: &Connection, log: &LogReader, id: &str) -> Result<Option<EventRecord>, StoreError> {
    let row = conn
        .query_row(
            &format!("SELECT {SUMMARY_COLUMNS} {SUMMARY_FROM} WHERE e.id = ?1"),
            [id],
            |row| {
                Ok((
                    row_summary(row)?,
                    row_record_ref(row)?,
                    row.get::<_, Option<String>>("last_error")?,
                ))
            },
        )
        .optional()?;
    let Some((summary, (seq, at), last_error)) = row else {
        return Ok(None);
    };
    let event = log
        .read(at, seq)
        .map_err(|e| StoreError::Backend(format!("cannot read event {id} from the log: {e}")))?
        .into_event();
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
    let mut sql = format!("SELECT {SUMMARY_COLUMNS} {SUMMARY_FROM} WHERE 1 = 1");
    let mut args: Vec<String> = Vec::new();
    if let Some(s) = &filter.source {
        args.push(s.clone());
        sql.push_str(&format!(" AND e.source = ?{}", args.len()));
    }
    if let Some(k) = &filter.kind {
        args.push(k.clone());
        sql.push_str(&format!(" AND e.kind = ?{}", args.len()));
    }
    if let Some(st) = filter.status {
        args.push(st.as_str().to_string());
        sql.push_str(&format!(
            " AND (CASE WHEN q.claimed_by IS NOT NULL THEN 'claimed' ELSE e.status END) = ?{}",
            args.len()
        ));
    }
    if let Some(since) = filter.since_ms {
        args.push(since.to_string());
        sql.push_str(&format!(
            " AND e.received_at_ms >= CAST(?{} AS INTEGER)",
            args.len()
        ));
    }
    if let Some(rule) = &filter.rule_disabled {
        args.push(rule.clone());
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM json_each((SELECT decision FROM decisions \
             WHERE event_id = e.id ORDER BY seq DESC LIMIT 1), '$.rules') AS r \
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
    sql.push_str(&format!(" ORDER BY e.seq DESC LIMIT {limit}"));
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
    /// Puts a held event back in the queue after `delay`, with `why` as its
    /// last error; a counted attempt that was the last one allowed
    /// dead-letters it instead.
    async fn release(
        &self,
        lease: &Lease,
        delay: Duration,
        why: &str,
        attempt: Attempt,
    ) -> Result<Released, StoreError> {
        let (lease, why) = (lease.clone(), why.to_string());
        let give_back = match attempt {
            Attempt::Counted if lease.attempt >= self.options.max_deliver => {
                let reason = format!(
                    "{why} (attempt {} of {})",
                    lease.attempt, self.options.max_deliver
                );
                self.write(move |conn| mark_dead(conn, &lease.event_id, &reason, Some(&lease)))
                    .await?;
                self.add_depth(-1);
                return Ok(Released::DeadLettered);
            }
            Attempt::Counted => 0,
            Attempt::GivenBack => 1,
        };
        self.write(move |conn| {
            let n = conn
                .prepare_cached(&format!(
                    "UPDATE queue SET claimed_by = NULL, due_at_ms = ?4, \
                     attempts = max(attempts - ?5, 0) {HELD}"
                ))?
                .execute(params![
                    lease.event_id,
                    lease.worker,
                    lease.attempt,
                    now_ms() + delay.as_millis() as i64,
                    give_back
                ])?;
            if n == 0 {
                return Err(StoreError::LeaseLost(lease.event_id));
            }
            conn.prepare_cached("UPDATE events SET last_error = ?2 WHERE id = ?1")?
                .execute(params![lease.event_id, why])?;
            Ok(Released::Retrying)
        })
        .await
    }

    /// Leases up to `max` due rows of the work queue: `(seq, attempts, id, where)`.
    async fn claim_rows(
        &self,
        worker: String,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<(i64, u32, String, RecordRef)>, StoreError> {
        let max_deliver = self.options.max_deliver;
        self.write(move |conn| {
            let now = now_ms();
            let until = now + lease.as_millis() as i64;
            // The batch goes out in claim order (the worker routes it in
            // that order); the lease overwrites the due time it is read by.
            let due: Vec<i64> = conn
                .prepare_cached(CLAIM_ORDER)?
                .query_map(params![now, max as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut take = conn.prepare_cached(
                "UPDATE queue SET due_at_ms = ?2, attempts = attempts + 1, claimed_by = ?1 \
                 WHERE seq = ?3 RETURNING attempts",
            )?;
            let mut find = conn.prepare_cached(
                "SELECT id, log_segment, log_offset, log_len FROM events WHERE seq = ?1",
            )?;
            let mut out = Vec::with_capacity(due.len());
            let mut spent = Vec::new();
            for seq in due {
                let attempts = take.query_row(params![worker, until, seq], |r| {
                    Ok(r.get::<_, i64>(0)? as u32)
                })?;
                if attempts > max_deliver {
                    spent.push((seq, attempts));
                    continue;
                }
                let (id, at) = find.query_row([seq], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        RecordRef {
                            segment: r.get(1)?,
                            offset: r.get::<_, i64>(2)? as u64,
                            len: r.get(3)?,
                        },
                    ))
                })?;
                out.push((seq, attempts, id, at));
            }
            drop((take, find));
            // Earlier claims never settled: each worker that took the event
            // died or lost its lease mid-route (a crash it may cause itself).
            // It is not handed out again.
            for (seq, attempts) in &spent {
                let id: String =
                    conn.query_row("SELECT id FROM events WHERE seq = ?1", [seq], |r| r.get(0))?;
                let reason = format!("routing never finished in {} claims", attempts - 1);
                tracing::error!(event = %id, %reason, "dead-lettering event");
                mark_dead(conn, &id, &reason, None)?;
            }
            Ok((out, spent.len()))
        })
        .await
        .map(|(out, spent)| {
            if spent > 0 {
                ::metrics::counter!("sluice_dead_letters_total").increment(spent as u64);
                self.add_depth(-(spent as i64));
            }
            out
        })
    }
}

/// The claim order: the work queue's due rows (`?1` now), by due time then
/// arrival, at most `?2` of them, read off the `queue_due` index in order.
const CLAIM_ORDER: &str =
    "SELECT seq FROM queue WHERE due_at_ms <= ?1 ORDER BY due_at_ms, seq LIMIT ?2";

/// Events examined per retention transaction, so a long pass never holds
/// the writer for long.
const EXPIRE_CHUNK: usize = 1_000;

/// How far arrival order and sequence order may disagree: an event is
/// stamped on arrival and numbered when its batch is written, at most
/// `store.append_timeout` later. A scan in sequence order stops this far past
/// the cut-off.
const ARRIVAL_SLACK_MS: i64 = 60_000;

impl SqliteStore {
    async fn expire_events(&self, cutoff_ms: i64) -> Result<Expired, StoreError> {
        let mut total = Expired::default();
        let mut after = 0i64;
        loop {
            let (chunk, next, done) = self
                .write(move |conn| expire_chunk(conn, cutoff_ms, after))
                .await?;
            total.events += chunk.events;
            total.dead_letters += chunk.dead_letters;
            after = next;
            if done {
                break;
            }
        }
        let unused: Vec<u32> = self
            .write(|conn| {
                let newest: Option<u32> = conn
                    .query_row("SELECT segment FROM log_applied WHERE one = 1", [], |r| {
                        r.get(0)
                    })
                    .optional()?;
                let mut used =
                    conn.prepare_cached("SELECT count(*) > 0 FROM events WHERE log_segment = ?1")?;
                let mut unused = Vec::new();
                for (n, _) in log_files(&log_dir_of(conn)?)? {
                    if Some(n) < newest && !used.query_row([n], |r| r.get::<_, bool>(0))? {
                        unused.push(n);
                    }
                }
                Ok(unused)
            })
            .await?;
        let dir = self.log.dir().to_path_buf();
        for n in unused {
            let path = log::segment_path(&dir, n);
            self.log.forget(n);
            match std::fs::remove_file(&path) {
                Ok(()) => total.segments += 1,
                Err(e) => {
                    tracing::warn!(segment = %path.display(), error = %e, "cannot remove an expired log segment")
                }
            }
        }
        Ok(total)
    }
}

/// The log directory of the index `conn` is open on.
fn log_dir_of(conn: &Connection) -> Result<PathBuf, StoreError> {
    let path = conn
        .path()
        .ok_or_else(|| StoreError::Backend("the index has no file".into()))?;
    Ok(log::dir_for(Path::new(path)))
}

/// The segment files in `dir` with their sizes, oldest first.
fn log_files(dir: &Path) -> Result<Vec<(u32, u64)>, StoreError> {
    let io = |e: std::io::Error| StoreError::Backend(format!("{}: {e}", dir.display()));
    log::segments(dir)
        .map_err(io)?
        .into_iter()
        .map(|n| {
            let len = std::fs::metadata(log::segment_path(dir, n))
                .map_err(io)?
                .len();
            Ok((n, len))
        })
        .collect()
}

/// What retention reads of one event.
struct ExpiryRow {
    seq: i64,
    id: String,
    received_at_ms: i64,
    status: String,
    source: String,
    id_origin: String,
    delivery_id: String,
    body_sha256: String,
    dead_at_ms: Option<i64>,
    /// Still in the work queue: acknowledged and not settled yet.
    queued: bool,
}

/// What one retention transaction removed.
struct ExpiredChunk {
    events: u64,
    dead_letters: u64,
}

/// One retention step over the events after `after` in sequence order:
/// returns what it removed, where to go on, and whether it is done.
fn expire_chunk(
    conn: &Connection,
    cutoff_ms: i64,
    after: i64,
) -> Result<(ExpiredChunk, i64, bool), StoreError> {
    let rows: Vec<ExpiryRow> = conn
        .prepare_cached(
            "SELECT e.seq, e.id, e.received_at_ms, e.status, e.source, e.id_origin, \
             e.delivery_id, e.body_sha256, d.at_ms, q.seq IS NOT NULL FROM events e \
             LEFT JOIN dead_letters d ON d.event_id = e.id \
             LEFT JOIN queue q ON q.seq = e.seq \
             WHERE e.seq > ?1 ORDER BY e.seq LIMIT ?2",
        )?
        .query_map(params![after, EXPIRE_CHUNK as i64], |r| {
            Ok(ExpiryRow {
                seq: r.get(0)?,
                id: r.get(1)?,
                received_at_ms: r.get(2)?,
                status: r.get(3)?,
                source: r.get(4)?,
                id_origin: r.get(5)?,
                delivery_id: r.get(6)?,
                body_sha256: r.get(7)?,
                dead_at_ms: r.get(8)?,
                queued: r.get(9)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut out = ExpiredChunk {
        events: 0,
        dead_letters: 0,
    };
    let mut last = after;
    let mut done = rows.len() < EXPIRE_CHUNK;
    for row in rows {
        let (seq, id) = (row.seq, row.id);
        last = seq;
        if row.received_at_ms >= cutoff_ms.saturating_add(ARRIVAL_SLACK_MS) {
            done = true;
            break;
        }
        if row.received_at_ms >= cutoff_ms {
            continue;
        }
        let dead = row.status == EventStatus::Dead.as_str();
        if dead && row.dead_at_ms.is_some_and(|at| at >= cutoff_ms) {
            continue;
        }
        // An event not routed yet is kept until it is settled: routed, or
        // dead-lettered when its attempts run out.
        if row.queued {
            continue;
        }
        let origin = IdOrigin::parse(&row.id_origin).unwrap_or(IdOrigin::Body);
        let key = crate::event::dedup_key(&row.source, origin, &row.delivery_id, &row.body_sha256);
        conn.prepare_cached("DELETE FROM dedup WHERE key = ?1 AND seq = ?2")?
            .execute(params![key_digest(&key), seq])?;
        conn.prepare_cached("DELETE FROM decisions WHERE event_id = ?1")?
            .execute([&id])?;
        conn.prepare_cached("DELETE FROM dead_letters WHERE event_id = ?1")?
            .execute([&id])?;
        dispatch::forget_event(conn, &id)?;
        conn.prepare_cached("DELETE FROM events WHERE seq = ?1")?
            .execute([seq])?;
        out.events += 1;
        out.dead_letters += u64::from(dead);
    }
    Ok((out, last, done))
}

/// What `sluice store stats` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Events in the index.
    pub events: u64,
    /// Events by status.
    pub by_status: std::collections::BTreeMap<String, u64>,
    /// Events waiting to be routed or being routed.
    pub queue_depth: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Decisions recorded.
    pub decisions: u64,
    /// The oldest event's arrival (milliseconds since the epoch).
    pub oldest_received_at_ms: Option<i64>,
    /// The newest event's arrival.
    pub newest_received_at_ms: Option<i64>,
    /// The index file and its WAL, in bytes.
    pub index_bytes: u64,
    /// Log segment files.
    pub log_segments: u64,
    /// Their total size in bytes.
    pub log_bytes: u64,
    /// How far the index has applied the log.
    pub applied_segment: u32,
    /// The offset in that segment.
    pub applied_offset: u64,
}

impl ReadOnly {
    /// How SQLite runs a claim's scan of the work queue, one
    /// `EXPLAIN QUERY PLAN` line per step: it must read the `queue_due`
    /// index in order, never sort the due rows, so that a claim costs the
    /// same at any backlog.
    pub fn claim_plan(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn.lock().expect("reader lock");
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {CLAIM_ORDER}"))?;
        let steps = stmt.query_map(params![0i64, 1i64], |r| r.get::<_, String>(3))?;
        Ok(steps.collect::<Result<_, _>>()?)
    }

    /// Sizes, counts and the oldest event.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        let conn = self.conn.lock().expect("reader lock");
        let count = |sql: &str| -> Result<u64, StoreError> {
            Ok(conn.query_row(sql, [], |r| r.get::<_, i64>(0))? as u64)
        };
        let mut by_status = std::collections::BTreeMap::new();
        let mut stmt = conn.prepare(&format!(
            "SELECT CASE WHEN q.claimed_by IS NOT NULL THEN 'claimed' ELSE e.status END AS st, \
             count(*) {SUMMARY_FROM} GROUP BY st"
        ))?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (st, n) = row?;
            by_status.insert(st, n as u64);
        }
        let (oldest, newest) = conn.query_row(
            "SELECT (SELECT received_at_ms FROM events ORDER BY seq LIMIT 1), \
             (SELECT received_at_ms FROM events ORDER BY seq DESC LIMIT 1)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let (applied_at, _) = applied(&conn)?;
        let index_path = conn.path().map(PathBuf::from).unwrap_or_default();
        let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let index_bytes =
            size(index_path.clone()) + size(PathBuf::from(format!("{}-wal", index_path.display())));
        let files = log_files(self.log.dir())?;
        Ok(Stats {
            events: by_status.values().sum(),
            by_status,
            queue_depth: count("SELECT count(*) FROM queue")?,
            dead_letters: count("SELECT count(*) FROM dead_letters")?,
            decisions: count("SELECT count(*) FROM decisions")?,
            oldest_received_at_ms: oldest,
            newest_received_at_ms: newest,
            index_bytes,
            log_segments: files.len() as u64,
            log_bytes: files.iter().map(|(_, len)| len).sum(),
            applied_segment: applied_at.segment,
            applied_offset: applied_at.offset,
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn append(&self, ev: NewEvent) -> Result<Appended, StoreError> {
        let bytes = queued_size(&ev);
        let queued = self.shared.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if queued > 0 && queued + bytes > self.options.queue_bytes {
            self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return Err(StoreError::Busy(format!(
                "the store's write queue holds {queued} bytes, past store.queue_bytes ({})",
                self.options.queue_bytes
            )));
        }
        let (tx, rx) = oneshot::channel();
        if let Err(e) = self.sender().and_then(|s| {
            s.send(Job::Append(ev, tx, bytes))
                .map_err(|_| StoreError::Closed)
        }) {
            self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return Err(e);
        }
        match tokio::time::timeout(self.options.append_timeout, rx).await {
            Ok(answer) => answer.map_err(|_| StoreError::Closed)?,
            Err(_) => Err(StoreError::Busy(format!(
                "the event log did not make the event durable within store.append_timeout ({} ms)",
                self.options.append_timeout.as_millis()
            ))),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |conn, log| record(conn, log, &id)).await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<EventSummary>, StoreError> {
        let filter = filter.clone();
        self.read(move |conn, _| summaries(conn, &filter)).await
    }

    async fn holds(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.read(move |conn, _| {
            Ok(conn
                .prepare_cached(
                    "SELECT 1 FROM events WHERE id = ?1 \
                     AND NOT (status = 'dead' AND last_error LIKE 'lost:%')",
                )?
                .exists([id])?)
        })
        .await
    }

    async fn claim(
        &self,
        worker: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        let rows = self.claim_rows(worker.to_string(), max, lease).await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let log = self.log.clone();
        let worker_name = worker.to_string();
        let (claimed, unreadable) = tokio::task::spawn_blocking(move || {
            let mut claimed = Vec::with_capacity(rows.len());
            let mut unreadable: Vec<(String, u32, log::LogError)> = Vec::new();
            for (seq, attempt, id, at) in rows {
                match log.read(at, seq) {
                    Ok(rec) => claimed.push(Claimed {
                        event: rec.into_event(),
                        attempt,
                        worker: worker_name.clone(),
                    }),
                    Err(e) => unreadable.push((id, attempt, e)),
                }
            }
            (claimed, unreadable)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("log read task failed: {e}")))?;
        for (id, attempt, e) in unreadable {
            let reason = e.to_string();
            if let log::LogError::Io { .. } = e {
                // The record may be fine (too many open files, a passing I/O
                // error): try again later. It counts as an attempt, so an error
                // that does not pass dead-letters the event in the end.
                tracing::warn!(event = %id, %reason, "cannot read an event's log record now; retrying later");
                let lease = Lease {
                    event_id: id,
                    worker: worker.to_string(),
                    attempt,
                };
                let _ = self
                    .release(&lease, Duration::from_secs(1), &reason, Attempt::Counted)
                    .await;
                continue;
            }
            // Gone, short or damaged: it would fail every claim forever.
            // Dead-letter it with the reason, and hand out the others.
            tracing::error!(event = %id, %reason, "dead-lettering an event whose log record is lost");
            if let Ok(true) = self.write(move |conn| mark_lost(conn, &id, &reason)).await {
                self.add_depth(-1);
            }
        }
        Ok(claimed)
    }

    async fn complete(&self, lease: &Lease, decision: &Decision) -> Result<(), StoreError> {
        let done = [(lease.clone(), decision.clone())];
        self.complete_all(&done).await?.remove(0)
    }

    async fn complete_all(
        &self,
        done: &[(Lease, Decision)],
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let rows = done
            .iter()
            .map(|(lease, decision)| {
                let json = serde_json::to_string(decision)
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                Ok((lease.clone(), decision.clone(), json))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let results = self
            .write(move |conn| {
                rows.iter()
                    .map(|(lease, decision, json)| settle_routed(conn, lease, decision, json))
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await?;
        let settled = results.iter().filter(|r| r.is_ok()).count();
        self.add_depth(-(settled as i64));
        for ((_, decision), result) in done.iter().zip(&results) {
            if result.is_err() || decision.dead_letter.is_some() {
                continue;
            }
            for route in &decision.routes {
                match route.workflow {
                    Some(_) => self.signals.poke(super::dispatch::RUNS),
                    None => self.signals.poke(&route.agent),
                }
            }
        }
        Ok(results)
    }

    async fn retry_later(
        &self,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> Result<Released, StoreError> {
        self.release(lease, delay, error, Attempt::Counted).await
    }

    async fn defer(&self, lease: &Lease, delay: Duration, reason: &str) -> Result<(), StoreError> {
        self.release(lease, delay, reason, Attempt::GivenBack)
            .await
            .map(|_| ())
    }

    async fn extend(&self, leases: &[Lease], lease: Duration) -> Result<Vec<bool>, StoreError> {
        let leases = leases.to_vec();
        self.write(move |conn| {
            let until = now_ms() + lease.as_millis() as i64;
            let mut stmt =
                conn.prepare_cached(&format!("UPDATE queue SET due_at_ms = ?4 {HELD}"))?;
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
            .await?;
        self.add_depth(-1);
        Ok(())
    }

    async fn requeue(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        let added = self
            .write(move |conn| {
                let n = conn
                    .prepare_cached(
                        "UPDATE events SET status = 'pending', attempts = 0 WHERE id = ?1",
                    )?
                    .execute([&id])?;
                if n == 0 {
                    return Err(StoreError::NotFound(id));
                }
                let queued: bool = conn
                    .prepare_cached(
                        "SELECT count(*) > 0 FROM queue WHERE seq = (SELECT seq FROM events WHERE id = ?1)",
                    )?
                    .query_row([&id], |r| r.get(0))?;
                conn.prepare_cached(
                    "INSERT INTO queue (seq, due_at_ms) SELECT seq, 0 FROM events WHERE id = ?1 \
                     ON CONFLICT (seq) DO UPDATE SET due_at_ms = 0, attempts = 0, claimed_by = NULL",
                )?
                .execute([&id])?;
                conn.prepare_cached("DELETE FROM dead_letters WHERE event_id = ?1")?
                    .execute([&id])?;
                Ok(!queued)
            })
            .await?;
        if added {
            self.add_depth(1);
        }
        self.work.notify_waiters();
        Ok(())
    }

    async fn expire(&self, cutoff_ms: i64) -> Result<Expired, StoreError> {
        self.expire_events(cutoff_ms).await
    }

    async fn queue_depth(&self) -> Result<u64, StoreError> {
        Ok(self.shared.depth.load(Ordering::Relaxed).max(0) as u64)
    }

    async fn ready(&self) -> Result<(), StoreError> {
        // A write through the writer proves the index takes commits.
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

    async fn import(&self, record: &super::ExportedEvent) -> Result<super::Imported, StoreError> {
        self.import_all(std::slice::from_ref(record))
            .await?
            .pop()
            .unwrap_or(Err(StoreError::Closed))
    }

    async fn import_all(
        &self,
        records: &[super::ExportedEvent],
    ) -> Result<Vec<Result<super::Imported, StoreError>>, StoreError> {
        self.import_events(records).await
    }
}
