//! The in-memory front of deduplication: recently seen `(source, delivery id)`
//! pairs, with a TTL. The store's unique key stays the authority (it survives
//! restarts); this cache only saves a store round trip for hot duplicates.
//! An id is inserted only after the store committed it.

use std::time::Duration;

use moka::sync::Cache;

/// Recently committed deliveries.
#[derive(Clone)]
pub struct Dedup {
    seen: Cache<String, String>,
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dedup({} entries)", self.seen.entry_count())
    }
}

fn key(source: &str, delivery_id: &str) -> String {
    let mut k = String::with_capacity(source.len() + delivery_id.len() + 1);
    k.push_str(source);
    k.push('\0');
    k.push_str(delivery_id);
    k
}

impl Dedup {
    /// A cache holding at most `capacity` ids, each for `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Dedup {
            seen: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The stored event id for a delivery seen recently.
    pub fn get(&self, source: &str, delivery_id: &str) -> Option<String> {
        self.seen.get(&key(source, delivery_id))
    }

    /// Remembers a delivery the store has committed.
    pub fn insert(&self, source: &str, delivery_id: &str, event_id: &str) {
        self.seen
            .insert(key(source, delivery_id), event_id.to_string());
    }
}
