//! Per-source intake record for the admin API's `/v1/sources`: when each
//! configured source last delivered, its last verification failure (time and
//! reason class only, never a signature or secret) and its refusals by
//! reason since start.
//!
//! The table is built once from the config, so recording takes one map
//! lookup; an accepted request then costs two atomic updates (no lock, so
//! concurrent requests of one busy source never wait on each other), and
//! only a refusal takes the source's lock. Nothing is allocated after a
//! reason's first refusal. Unknown source names are not recorded (they would let
//! anyone grow the map).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

/// What intake saw from one source since start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceRecord {
    /// Requests accepted (stored, or answered as duplicates).
    pub accepted: u64,
    /// When a request was last accepted (ms since the epoch).
    pub last_received_ms: Option<i64>,
    /// The last verification failure: when, and its reason class.
    pub last_verification_failure: Option<VerificationFailure>,
    /// Refused requests by reason (`unverified`, `too_large`, ...).
    pub rejections: BTreeMap<&'static str, u64>,
}

/// One verification failure, without anything the request carried.
#[derive(Debug, Clone, Serialize)]
pub struct VerificationFailure {
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// The reason class (`missing_header`, `mismatch`, `expired`, ...).
    pub reason: &'static str,
}

/// One source's counters.
#[derive(Debug, Default)]
struct Slot {
    accepted: AtomicU64,
    /// 0 until the first accepted request.
    last_received_ms: AtomicI64,
    refused: Mutex<Refused>,
}

/// What a refusal records.
#[derive(Debug, Default)]
struct Refused {
    last_verification_failure: Option<VerificationFailure>,
    rejections: BTreeMap<&'static str, u64>,
}

/// The per-source records, keyed by configured source name.
#[derive(Debug, Default)]
pub struct IntakeStats {
    by_source: HashMap<String, Slot>,
}

impl IntakeStats {
    /// An empty record for each of `sources`.
    pub fn new<'a>(sources: impl IntoIterator<Item = &'a String>) -> IntakeStats {
        IntakeStats {
            by_source: sources
                .into_iter()
                .map(|s| (s.clone(), Slot::default()))
                .collect(),
        }
    }

    /// Records one answered request: `outcome` is the metrics label
    /// (`accepted`, `duplicate`, `challenge`, or a refusal's), `unverified`
    /// the verification failure's class when that was the refusal.
    pub fn record(&self, source: &str, outcome: &'static str, unverified: Option<&'static str>) {
        let Some(slot) = self.by_source.get(source) else {
            return;
        };
        let now = crate::event::now_ms();
        match outcome {
            "accepted" | "duplicate" => {
                slot.accepted.fetch_add(1, Ordering::Relaxed);
                slot.last_received_ms.fetch_max(now, Ordering::Relaxed);
            }
            "challenge" => {}
            refused => {
                let mut r = slot.refused.lock().unwrap_or_else(|e| e.into_inner());
                *r.rejections.entry(refused).or_insert(0) += 1;
                if let Some(reason) = unverified {
                    r.last_verification_failure = Some(VerificationFailure { at_ms: now, reason });
                }
            }
        }
    }

    /// A copy of one source's record; `None` for a name not configured.
    pub fn get(&self, source: &str) -> Option<SourceRecord> {
        let slot = self.by_source.get(source)?;
        let refused = slot.refused.lock().unwrap_or_else(|e| e.into_inner());
        let last = slot.last_received_ms.load(Ordering::Relaxed);
        Some(SourceRecord {
            accepted: slot.accepted.load(Ordering::Relaxed),
            last_received_ms: (last != 0).then_some(last),
            last_verification_failure: refused.last_verification_failure.clone(),
            rejections: refused.rejections.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_per_source_and_ignores_unknown_names() {
        let names = ["github".to_string()];
        let stats = IntakeStats::new(&names);
        stats.record("github", "accepted", None);
        stats.record("github", "unverified", Some("mismatch"));
        stats.record("github", "unverified", Some("expired"));
        stats.record("nope", "accepted", None);
        let r = stats.get("github").expect("configured");
        assert_eq!(r.accepted, 1);
        assert!(r.last_received_ms.is_some());
        assert_eq!(r.rejections.get("unverified"), Some(&2));
        assert_eq!(
            r.last_verification_failure.expect("failure").reason,
            "expired"
        );
        assert!(stats.get("nope").is_none());
    }
}
