//! The NATS backend's index: a SQLite file per node, fed from the events
//! stream (a row per event) and the state bucket (status, attempts, the
//! decision), which listings read. It holds nothing that is not in the
//! streams: deleted, it is rebuilt from them at the next start.
//!
//! The node's own writes go in at once (so a node reads what it wrote);
//! every node's writes, its own included, arrive through two ordered
//! consumers, applied by revision so that a late or repeated copy never
//! overwrites a newer state. Written without syncing: a crash loses at most
//! the feed's last positions, and the feed applies those messages again.

use std::path::Path;
use std::sync::Mutex;

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use futures_util::StreamExt;
use rusqlite::{Connection, OptionalExtension, params};

use super::dispatch::{DeliveryState, priority_rank, rank_priority};
use super::{Meta, NatsStore, State, backend};
use crate::decision::Decision;
use crate::event::EventStatus;
use crate::store::dispatch::{
    AttemptRecord, DeadLetter, DeliveryFilter, DeliveryStatus, DeliverySummary, DispatchCounts,
    delivery_name,
};
use crate::store::{EventSummary, ListFilter, RecordedDecision, StoreError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id             TEXT PRIMARY KEY,
    seq            INTEGER,
    meta           TEXT,
    source         TEXT,
    kind           TEXT,
    action         TEXT,
    received_at_ms INTEGER,
    status         TEXT NOT NULL DEFAULT 'pending',
    attempts       INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT,
    decision       TEXT,
    dead_at_ms     INTEGER,
    rev            INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_seq ON events (seq);
CREATE INDEX IF NOT EXISTS events_unsettled ON events (status)
    WHERE status IN ('pending', 'claimed');
CREATE TABLE IF NOT EXISTS decisions (
    seq           INTEGER PRIMARY KEY,
    event_id      TEXT NOT NULL,
    decided_at_ms INTEGER NOT NULL,
    decision      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_event ON decisions (event_id);
CREATE TABLE IF NOT EXISTS deliveries (
    id            INTEGER PRIMARY KEY,
    event_id      TEXT NOT NULL,
    agent         TEXT NOT NULL,
    key           TEXT NOT NULL,
    priority      INTEGER NOT NULL,
    ordering_key  TEXT,
    status        TEXT NOT NULL,
    attempts      INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    due_at_ms     INTEGER,
    settled_at_ms INTEGER,
    last_error    TEXT,
    records       TEXT NOT NULL,
    rev           INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_agent ON deliveries (agent, status, due_at_ms);
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (settled_at_ms) WHERE status = 'dead';
-- The embedded index's shape for the admin API's reads (admin/queries.rs),
-- which run on either backend's index file.
CREATE VIEW IF NOT EXISTS attempts AS
    SELECT d.id AS delivery_id,
           json_extract(r.value, '$.attempt') AS attempt,
           json_extract(r.value, '$.status') AS status,
           json_extract(r.value, '$.latency_us') AS latency_us
    FROM deliveries d, json_each(d.records) r;
CREATE TABLE IF NOT EXISTS feed (
    name TEXT PRIMARY KEY,
    seq  INTEGER NOT NULL
);
";

/// This node's index.
#[derive(Debug)]
pub struct Index {
    conn: Mutex<Connection>,
}

fn err(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(format!("the NATS backend's local index: {e}"))
}

impl Index {
    /// Opens (or creates) the index at `path`.
    pub fn open(path: &Path) -> Result<Index, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("store.nats.index {}: {e}", path.display()))
            })?;
        }
        let conn = Connection::open(path).map_err(|e| {
            StoreError::Backend(format!("store.nats.index {}: {e}", path.display()))
        })?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Index {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        f(&self.conn.lock().expect("index lock")).map_err(err)
    }

    /// Records an event from its head message at stream sequence `seq`.
    pub(crate) fn insert_event(&self, meta: &Meta, seq: u64) -> Result<(), StoreError> {
        let json = serde_json::to_string(meta).expect("metadata serializes");
        self.with(|c| {
            c.execute(
                "INSERT INTO events (id, seq, meta, source, kind, action, received_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (id) DO UPDATE SET seq = ?2, meta = ?3, source = ?4, kind = ?5,
                     action = ?6, received_at_ms = ?7",
                params![
                    meta.event.id,
                    seq as i64,
                    json,
                    meta.event.source,
                    meta.event.kind,
                    meta.event.action,
                    meta.event.received_at_ms
                ],
            )
            .map(|_| ())
        })
    }

    /// Applies an event's state at revision `rev` (`None`: removed), unless
    /// the index already holds a newer one.
    pub(crate) fn apply_state(
        &self,
        id: &str,
        rev: u64,
        state: Option<&State>,
    ) -> Result<(), StoreError> {
        let Some(s) = state else {
            return self.remove(id);
        };
        let decision = s
            .decision
            .as_ref()
            .map(|d| serde_json::to_string(d).expect("decision serializes"));
        self.with(|c| {
            c.execute("INSERT OR IGNORE INTO events (id) VALUES (?1)", [id])?;
            let changed = c.execute(
                "UPDATE events SET status = ?2, attempts = ?3, last_error = ?4, decision = ?5,
                     dead_at_ms = ?6, rev = ?7
                 WHERE id = ?1 AND rev < ?7",
                params![
                    id,
                    s.status.as_str(),
                    s.attempts,
                    s.last_error,
                    decision,
                    s.dead_at_ms,
                    rev as i64
                ],
            )?;
            if changed > 0
                && s.status == EventStatus::Routed
                && let Some(d) = &decision
            {
                c.execute(
                    "INSERT OR IGNORE INTO decisions (seq, event_id, decided_at_ms, decision)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![rev as i64, id, crate::event::now_ms(), d],
                )?;
            }
            Ok(())
        })
    }

    /// Forgets an event and its decisions.
    pub(crate) fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("DELETE FROM events WHERE id = ?1", [id])?;
            c.execute("DELETE FROM decisions WHERE event_id = ?1", [id])
                .map(|_| ())
        })
    }

    /// Events matching `filter`, newest first.
    pub(crate) fn list(&self, filter: &ListFilter) -> Result<Vec<EventSummary>, StoreError> {
        let mut sql =
            String::from("SELECT meta, status, attempts FROM events e WHERE meta IS NOT NULL");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut arg = |sql: &mut String, clause: &str, v: rusqlite::types::Value| {
            args.push(v);
            sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
        };
        if let Some(s) = &filter.source {
            arg(&mut sql, " AND source = ?", s.clone().into());
        }
        if let Some(k) = &filter.kind {
            arg(&mut sql, " AND kind = ?", k.clone().into());
        }
        if let Some(st) = filter.status {
            arg(&mut sql, " AND status = ?", st.as_str().to_owned().into());
        }
        if let Some(t) = filter.since_ms {
            arg(&mut sql, " AND received_at_ms >= ?", t.into());
        }
        if let Some(rule) = &filter.rule_disabled {
            arg(
                &mut sql,
                " AND EXISTS (SELECT 1 FROM json_each(e.decision, '$.rules') AS r \
                 WHERE json_extract(r.value, '$.rule') = ? \
                 AND json_extract(r.value, '$.outcome.failed.kind') = 'disabled')",
                rule.clone().into(),
            );
        }
        let limit = if filter.limit == 0 {
            i64::MAX
        } else {
            filter.limit as i64
        };
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT {limit}"));
        let rows: Vec<(String, String, u32)> = self.with(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(meta, status, attempts)| {
                let meta: Meta = serde_json::from_str(&meta)
                    .map_err(|e| StoreError::Backend(format!("index row: {e}")))?;
                Ok(summary(
                    &meta,
                    EventStatus::parse(&status).unwrap_or(EventStatus::Pending),
                    attempts,
                ))
            })
            .collect()
    }

    /// Events waiting to be routed or being routed.
    pub(crate) fn unsettled(&self) -> Result<u64, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM events
                 WHERE meta IS NOT NULL AND status IN ('pending', 'claimed')",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
        })
    }

    /// The latest `limit` decisions, newest first.
    pub(crate) fn decisions(&self, limit: usize) -> Result<Vec<RecordedDecision>, StoreError> {
        let rows: Vec<(String, String)> = self.with(|c| {
            let mut stmt =
                c.prepare("SELECT event_id, decision FROM decisions ORDER BY seq DESC LIMIT ?1")?;
            let rows = stmt.query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(event_id, d)| {
                let decision: Decision = serde_json::from_str(&d)
                    .map_err(|e| StoreError::Backend(format!("index decision: {e}")))?;
                Ok(RecordedDecision { event_id, decision })
            })
            .collect()
    }

    /// Settled events received before `cutoff_ms` (dead letters only if
    /// dead-lettered before it too), oldest first: their metadata, head
    /// sequence, and whether each is a dead letter.
    pub(crate) fn expirable(&self, cutoff_ms: i64) -> Result<Vec<(Meta, u64, bool)>, StoreError> {
        let rows: Vec<(String, i64, String)> = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT meta, seq, status FROM events
                 WHERE meta IS NOT NULL AND received_at_ms < ?1
                   AND (status = 'routed' OR (status = 'dead' AND dead_at_ms < ?1))
                 ORDER BY seq",
            )?;
            let rows = stmt.query_map([cutoff_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })?;
        rows.into_iter()
            .map(|(meta, seq, status)| {
                let meta: Meta = serde_json::from_str(&meta)
                    .map_err(|e| StoreError::Backend(format!("index row: {e}")))?;
                Ok((meta, seq as u64, status == "dead"))
            })
            .collect()
    }

    /// Applies delivery `n`'s entry at revision `rev` (`None`: removed),
    /// unless the index already holds a newer one.
    pub(crate) fn apply_delivery(
        &self,
        n: i64,
        rev: u64,
        state: Option<&DeliveryState>,
    ) -> Result<(), StoreError> {
        let Some(s) = state else {
            return self.with(|c| {
                c.execute("DELETE FROM deliveries WHERE id = ?1", [n])
                    .map(|_| ())
            });
        };
        let records = serde_json::to_string(&s.records).expect("attempts serialize");
        self.with(|c| {
            c.execute(
                "INSERT INTO deliveries (id, event_id, agent, key, priority, ordering_key, status,
                     attempts, created_at_ms, due_at_ms, settled_at_ms, last_error, records, rev)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status,
                     attempts = excluded.attempts, due_at_ms = excluded.due_at_ms,
                     settled_at_ms = excluded.settled_at_ms, last_error = excluded.last_error,
                     records = excluded.records, rev = excluded.rev
                 WHERE excluded.rev > deliveries.rev",
                params![
                    n,
                    s.event_id,
                    s.route.agent,
                    s.key,
                    priority_rank(s.route.priority),
                    s.route.ordering_key,
                    s.status.as_str(),
                    s.attempts,
                    s.created_at_ms,
                    s.due_at_ms,
                    s.settled_at_ms,
                    s.last_error,
                    records,
                    rev as i64
                ],
            )
            .map(|_| ())
        })
    }

    /// The deliveries of an event.
    pub(crate) fn deliveries_of(&self, event_id: &str) -> Result<Vec<i64>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT id FROM deliveries WHERE event_id = ?1")?;
            let rows = stmt.query_map([event_id], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// Deliveries matching `filter`, newest first.
    pub(crate) fn deliveries(
        &self,
        filter: &DeliveryFilter,
    ) -> Result<Vec<DeliverySummary>, StoreError> {
        let mut sql = String::from(
            "SELECT id, event_id, agent, key, priority, ordering_key, status, attempts,
                 created_at_ms, due_at_ms, settled_at_ms, last_error FROM deliveries WHERE 1 = 1",
        );
        let mut args: Vec<String> = Vec::new();
        if let Some(a) = &filter.agent {
            args.push(a.clone());
            sql.push_str(&format!(" AND agent = ?{}", args.len()));
        }
        if let Some(s) = filter.status {
            args.push(s.as_str().to_owned());
            sql.push_str(&format!(" AND status = ?{}", args.len()));
        }
        if let Some(e) = &filter.event_id {
            args.push(e.clone());
            sql.push_str(&format!(" AND event_id = ?{}", args.len()));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", filter.limit.max(1)));
        self.with(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
                let status = DeliveryStatus::parse(&r.get::<_, String>(6)?)
                    .unwrap_or(DeliveryStatus::Queued);
                Ok(DeliverySummary {
                    id: delivery_name(r.get(0)?),
                    event_id: r.get(1)?,
                    agent: r.get(2)?,
                    run: None,
                    workflow: None,
                    step: None,
                    idempotency_key: r.get(3)?,
                    priority: rank_priority(r.get(4)?),
                    ordering_key: r.get(5)?,
                    status,
                    attempts: r.get(7)?,
                    created_at_ms: r.get(8)?,
                    due_at_ms: (status == DeliveryStatus::Queued)
                        .then(|| r.get(9))
                        .transpose()?
                        .flatten(),
                    settled_at_ms: r.get(10)?,
                    last_error: r.get(11)?,
                })
            })?;
            rows.collect()
        })
    }

    /// One delivery's attempts, in order.
    pub(crate) fn attempts(&self, n: i64) -> Result<Vec<AttemptRecord>, StoreError> {
        let records: Option<String> = self.with(|c| {
            c.query_row("SELECT records FROM deliveries WHERE id = ?1", [n], |r| {
                r.get(0)
            })
            .optional()
        })?;
        match records {
            Some(r) => serde_json::from_str(&r).map_err(|e| {
                StoreError::Backend(format!("index attempts of {}: {e}", delivery_name(n)))
            }),
            None => Ok(Vec::new()),
        }
    }

    /// Dead deliveries and dead events, newest first.
    pub(crate) fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut out: Vec<DeadLetter> = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, event_id, agent, last_error, settled_at_ms FROM deliveries
                 WHERE status = 'dead' ORDER BY settled_at_ms DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit as i64], |r| {
                Ok(DeadLetter {
                    id: delivery_name(r.get(0)?),
                    kind: "delivery",
                    event_id: r.get(1)?,
                    agent: Some(r.get(2)?),
                    reason: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                    at_ms: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                })
            })?;
            rows.collect()
        })?;
        let events: Vec<DeadLetter> = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, last_error, dead_at_ms FROM events
                 WHERE status = 'dead' ORDER BY dead_at_ms DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit as i64], |r| {
                Ok(DeadLetter {
                    id: r.get(0)?,
                    kind: "event",
                    event_id: r.get(0)?,
                    agent: None,
                    reason: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    at_ms: r.get::<_, Option<i64>>(2)?.unwrap_or(0),
                })
            })?;
            rows.collect()
        })?;
        out.extend(events);
        out.sort_by_key(|d| std::cmp::Reverse(d.at_ms));
        out.truncate(limit);
        Ok(out)
    }

    /// Queued deliveries by agent and the dead-letter count.
    pub(crate) fn dispatch_counts(&self) -> Result<DispatchCounts, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT agent, count(*) FROM deliveries WHERE status = 'queued' GROUP BY agent",
            )?;
            let queued = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                .collect::<rusqlite::Result<_>>()?;
            let dead: i64 = c.query_row(
                "SELECT (SELECT count(*) FROM deliveries WHERE status = 'dead')
                     + (SELECT count(*) FROM events WHERE status = 'dead')",
                [],
                |r| r.get(0),
            )?;
            Ok(DispatchCounts {
                queued,
                dead_letters: dead as u64,
                runs_open: 0,
            })
        })
    }

    /// The earliest due time of a delivery queued for `agent`, as far as
    /// this node knows, leaving out one waiting behind an earlier delivery
    /// of its ordering key (approximated by delivery number: a hint, the
    /// agent loop also polls).
    pub(crate) fn next_due(&self, agent: &str) -> Result<Option<i64>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT min(d.due_at_ms) FROM deliveries d
                 WHERE d.agent = ?1 AND d.status = 'queued'
                   AND (d.ordering_key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM deliveries e
                        WHERE e.status = 'queued' AND e.agent = d.agent
                          AND e.ordering_key = d.ordering_key AND e.id < d.id))",
                [agent],
                |r| r.get(0),
            )
        })
    }

    fn position(&self, name: &str) -> Result<u64, StoreError> {
        self.with(|c| {
            c.query_row("SELECT seq FROM feed WHERE name = ?1", [name], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|s| s.unwrap_or(0) as u64)
        })
    }

    fn advance(&self, name: &str, seq: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO feed (name, seq) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET seq = MAX(seq, ?2)",
                params![name, seq as i64],
            )
            .map(|_| ())
        })
    }
}

/// One listing row from an event's metadata and state.
pub(crate) fn summary(meta: &Meta, status: EventStatus, attempts: u32) -> EventSummary {
    let e = &meta.event;
    EventSummary {
        id: e.id.clone(),
        delivery_id: e.delivery_id.clone(),
        id_origin: meta.id_origin,
        conflict_with: meta.conflict_with.clone(),
        source: e.source.clone(),
        provider: e.provider.as_str().to_owned(),
        kind: e.kind.clone(),
        action: e.action.clone(),
        received_at_ms: e.received_at_ms,
        size: meta.size,
        status,
        attempts,
    }
}

/// Starts the two feeds of `store`'s index, each from where it left off.
pub(super) async fn feed(
    store: &NatsStore,
) -> Result<Vec<tokio::task::JoinHandle<()>>, StoreError> {
    let names = &store.names;
    let events = store
        .js
        .get_stream(&names.events)
        .await
        .map_err(|e| backend(&format!("stream {}", names.events), e))?;
    let state_stream = format!("KV_{}", names.state);
    let state = store
        .js
        .get_stream(&state_stream)
        .await
        .map_err(|e| backend(&format!("stream {state_stream}"), e))?;
    let deliveries_stream = format!("KV_{}", names.deliveries_state);
    let deliveries = store
        .js
        .get_stream(&deliveries_stream)
        .await
        .map_err(|e| backend(&format!("stream {deliveries_stream}"), e))?;
    let mut tasks = Vec::new();
    for (name, stream, filter) in [
        ("events", events, format!("{}.ev.*", names.prefix)),
        ("state", state, format!("$KV.{}.>", names.state)),
        (
            "deliveries",
            deliveries,
            format!("$KV.{}.d.*", names.deliveries_state),
        ),
    ] {
        let index = store.index.clone();
        let from = index.position(name)? + 1;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| backend(&format!("index feed {filter}"), e))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| backend(&format!("index feed {filter}"), e))?;
        let key_prefix = format!("$KV.{}.", names.state);
        let delivery_prefix = format!("$KV.{}.d.", names.deliveries_state);
        tasks.push(tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                let Ok(m) = m else { continue };
                let Ok(info) = m.info() else { continue };
                let seq = info.stream_sequence;
                let applied = if name == "events" {
                    super::decode_head(&m.payload)
                        .and_then(|(meta, _)| index.insert_event(&meta, seq))
                } else if name == "deliveries" {
                    apply_delivery_message(&index, &m, &delivery_prefix, seq)
                } else {
                    let id = m.subject.as_str().strip_prefix(&key_prefix).unwrap_or("");
                    let removed = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("KV-Operation"))
                        .is_some_and(|op| op.as_str() != "PUT");
                    if removed {
                        index.remove(id)
                    } else {
                        match serde_json::from_slice::<State>(&m.payload) {
                            Ok(s) => index.apply_state(id, seq, Some(&s)),
                            Err(e) => Err(StoreError::Backend(e.to_string())),
                        }
                    }
                };
                if let Err(e) = applied.and_then(|()| index.advance(name, seq)) {
                    tracing::warn!(feed = name, error = %e, "index feed could not apply a message");
                }
            }
        }));
    }
    Ok(tasks)
}

/// Applies one message of the deliveries bucket's stream.
fn apply_delivery_message(
    index: &Index,
    m: &async_nats::jetstream::Message,
    prefix: &str,
    seq: u64,
) -> Result<(), StoreError> {
    let Some(n) = m
        .subject
        .as_str()
        .strip_prefix(prefix)
        .and_then(|n| n.parse::<i64>().ok())
    else {
        return Ok(());
    };
    let removed = m
        .headers
        .as_ref()
        .and_then(|h| h.get("KV-Operation"))
        .is_some_and(|op| op.as_str() != "PUT");
    if removed {
        return index.apply_delivery(n, seq, None);
    }
    match serde_json::from_slice::<DeliveryState>(&m.payload) {
        Ok(s) => index.apply_delivery(n, seq, Some(&s)),
        Err(e) => Err(StoreError::Backend(format!("{}: {e}", delivery_name(n)))),
    }
}
