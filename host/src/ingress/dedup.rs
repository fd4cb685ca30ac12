//! The in-memory front of deduplication: recently committed dedup keys
//! ([`crate::event::dedup_key`]) and the events holding them, with a TTL. The
//! store's dedup table stays the authority (it survives restarts); this cache
//! only saves a store round trip for hot duplicates. A key is inserted only
//! after the store committed it, and a body-hash key carries the store's own
//! deadline, so the cache never calls a copy a duplicate the store would take.

use std::time::Duration;

use moka::sync::Cache;

use crate::event::now_ms;

/// Recently committed deliveries.
#[derive(Clone)]
pub struct Dedup {
    /// Dedup key → (event id, deadline in ms since the epoch, if any).
    seen: Cache<String, (String, Option<i64>)>,
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dedup({} entries)", self.seen.entry_count())
    }
}

impl Dedup {
    /// A cache holding at most `capacity` keys, each for at most `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Dedup {
            seen: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The stored event id for a dedup key seen recently and still held.
    pub fn get(&self, key: &str) -> Option<String> {
        let (id, until) = self.seen.get(key)?;
        match until {
            Some(until) if until <= now_ms() => {
                self.seen.invalidate(key);
                None
            }
            _ => Some(id),
        }
    }

    /// Remembers a key the store has committed, held until `until_ms` (or,
    /// with `None`, for as long as the cache keeps it).
    pub fn insert(&self, key: String, event_id: &str, until_ms: Option<i64>) {
        self.seen.insert(key, (event_id.to_string(), until_ms));
    }
}
