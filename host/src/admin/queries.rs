//! Reads the store's roles do not offer yet, for `/v1/sources`, `/v1/tail`
//! and looking a delivery up by id: plain `SELECT`s over a read-only
//! connection to the SQLite index (WAL lets them run while `serve` writes).
//!
//! They are the embedded backend's; another backend needs these as store
//! reads (`EventReader::count_by_source`, `::changes_since`,
//! `DispatchStore::delivery`). They never write.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::decision::Decision;
use crate::store::StoreError;

/// Most items of each kind one tail answer carries.
pub const TAIL_BATCH: usize = 200;

fn open(db: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", db.display())))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Runs a read on the blocking pool.
pub async fn read<T: Send + 'static>(
    db: &Path,
    f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let db = db.to_owned();
    tokio::task::spawn_blocking(move || f(&open(&db)?))
        .await
        .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
}

/// Events stored per source and the newest one's arrival.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceCounts {
    /// Events stored (retention removes old ones).
    pub events: u64,
    /// When the newest stored event arrived (ms since the epoch).
    pub last_received_ms: Option<i64>,
}

/// [`SourceCounts`] for every source that has stored events.
pub fn source_counts(conn: &Connection) -> Result<BTreeMap<String, SourceCounts>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT source, COUNT(*), MAX(received_at_ms) FROM events GROUP BY source")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            SourceCounts {
                events: r.get::<_, i64>(1)? as u64,
                last_received_ms: r.get(2)?,
            },
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The event a delivery (`dlv_<n>`'s `n`) carries; `None` when there is no
/// such delivery.
pub fn delivery_event(conn: &Connection, id: i64) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row("SELECT event_id FROM deliveries WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?)
}

/// Where a tail reader is: the last event and decision seen (their `seq`),
/// and the last settled delivery seen (its settle time, then its id).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Last `events.seq` seen.
    pub event: i64,
    /// Last `decisions.seq` seen.
    pub decision: i64,
    /// Settle time of the last settled delivery seen.
    pub settled_ms: i64,
    /// Its id.
    pub delivery: i64,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            self.event, self.decision, self.settled_ms, self.delivery
        )
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Cursor, String> {
        let n: Vec<i64> = s
            .split('.')
            .map(|p| p.parse::<i64>())
            .collect::<Result<_, _>>()
            .map_err(|_| format!("bad cursor {s:?}"))?;
        match n[..] {
            [event, decision, settled_ms, delivery] => Ok(Cursor {
                event,
                decision,
                settled_ms,
                delivery,
            }),
            _ => Err(format!("bad cursor {s:?}: expected four numbers")),
        }
    }
}

/// A newly stored event, as the tail shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TailEvent {
    /// The event id.
    pub id: String,
    /// The source.
    pub source: String,
    /// The kind.
    pub kind: String,
    /// The action, if any.
    pub action: Option<String>,
    /// When it arrived (ms since the epoch).
    pub received_at_ms: i64,
}

/// A newly recorded decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TailDecision {
    /// The event.
    pub event_id: String,
    /// When it was decided (ms since the epoch).
    pub decided_at_ms: i64,
    /// The decision.
    pub decision: Decision,
}

/// A delivery newly settled (delivered or dead-lettered).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TailDelivery {
    /// `dlv_<n>`.
    pub id: String,
    /// The event.
    pub event_id: String,
    /// The agent.
    pub agent: String,
    /// `delivered` or `dead`.
    pub status: String,
    /// When it settled (ms since the epoch).
    pub settled_at_ms: i64,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's HTTP status, if any.
    pub http_status: Option<u16>,
    /// The last attempt's duration, in microseconds.
    pub latency_us: Option<u64>,
    /// The last failure.
    pub error: Option<String>,
}

/// What happened after a cursor, and the cursor after it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TailBatch {
    /// Pass it back as `after` for what comes next.
    pub cursor: String,
    /// Events stored, in order.
    pub events: Vec<TailEvent>,
    /// Decisions recorded, in order.
    pub decisions: Vec<TailDecision>,
    /// Deliveries settled, in order.
    pub deliveries: Vec<TailDelivery>,
}

impl TailBatch {
    /// Whether nothing happened.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.decisions.is_empty() && self.deliveries.is_empty()
    }
}

/// The cursor at the store's present: a tail from it shows only what comes.
pub fn cursor_now(conn: &Connection) -> Result<Cursor, StoreError> {
    let max = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0));
    let settled_ms = max("SELECT COALESCE(MAX(settled_at_ms), 0) FROM deliveries")?;
    Ok(Cursor {
        event: max("SELECT COALESCE(MAX(seq), 0) FROM events")?,
        decision: max("SELECT COALESCE(MAX(seq), 0) FROM decisions")?,
        settled_ms,
        delivery: max("SELECT COALESCE(MAX(id), 0) FROM deliveries")?,
    })
}

/// Everything after `after` (at most [`TAIL_BATCH`] of each kind).
pub fn changes_since(conn: &Connection, after: Cursor) -> Result<TailBatch, StoreError> {
    let mut next = after;
    let mut batch = TailBatch::default();
    let limit = TAIL_BATCH as i64;
    {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, id, source, kind, action, received_at_ms FROM events \
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = stmt.query(params![after.event, limit])?;
        while let Some(r) = rows.next()? {
            next.event = r.get(0)?;
            batch.events.push(TailEvent {
                id: r.get(1)?,
                source: r.get(2)?,
                kind: r.get(3)?,
                action: r.get(4)?,
                received_at_ms: r.get(5)?,
            });
        }
    }
    {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, event_id, decided_at_ms, decision FROM decisions \
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = stmt.query(params![after.decision, limit])?;
        while let Some(r) = rows.next()? {
            next.decision = r.get(0)?;
            let text: String = r.get(3)?;
            let Ok(decision) = serde_json::from_str::<Decision>(&text) else {
                continue;
            };
            batch.decisions.push(TailDecision {
                event_id: r.get(1)?,
                decided_at_ms: r.get(2)?,
                decision,
            });
        }
    }
    {
        // A delivery settles once (a retry from the dead letters settles it
        // again later, with a later time): the settle time, then the id,
        // orders them.
        let mut stmt = conn.prepare_cached(
            "SELECT d.id, d.event_id, d.agent, d.status, d.settled_at_ms, d.attempts, d.last_error, \
                    a.status, a.latency_us \
             FROM deliveries d \
             LEFT JOIN attempts a ON a.delivery_id = d.id AND a.attempt = \
                 (SELECT MAX(attempt) FROM attempts WHERE delivery_id = d.id) \
             WHERE d.settled_at_ms IS NOT NULL \
               AND (d.settled_at_ms > ?1 OR (d.settled_at_ms = ?1 AND d.id > ?2)) \
             ORDER BY d.settled_at_ms, d.id LIMIT ?3",
        )?;
        let mut rows = stmt.query(params![after.settled_ms, after.delivery, limit])?;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let settled: i64 = r.get(4)?;
            next.settled_ms = settled;
            next.delivery = id;
            batch.deliveries.push(TailDelivery {
                id: crate::store::dispatch::delivery_name(id),
                event_id: r.get(1)?,
                agent: r.get(2)?,
                status: r.get(3)?,
                settled_at_ms: settled,
                attempts: r.get::<_, i64>(5)? as u32,
                error: r.get(6)?,
                http_status: r.get::<_, Option<i64>>(7)?.map(|s| s as u16),
                latency_us: r.get::<_, Option<i64>>(8)?.map(|l| l as u64),
            });
        }
    }
    batch.cursor = next.to_string();
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_junk() {
        let c = Cursor {
            event: 3,
            decision: 2,
            settled_ms: 1_700_000_000_000,
            delivery: 9,
        };
        assert_eq!(c.to_string().parse::<Cursor>(), Ok(c));
        assert!("1.2.3".parse::<Cursor>().is_err());
        assert!("a.b.c.d".parse::<Cursor>().is_err());
    }
}
