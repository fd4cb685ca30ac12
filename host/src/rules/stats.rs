//! Per-rule statistics over the latest recorded decisions: calls, failures
//! by kind and latency percentiles. `sluice rules ls` computes them from the
//! store itself; a running server serves the same at `/status/rules`.
//!
//! It only reads, through the store's read role.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::decision::RuleOutcome;
use crate::rules::breaker::BreakerState;
use crate::rules::reload::RulesStatus;
use crate::store::EventReader;

/// A rule's record over the latest decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// Decisions looked at.
    pub decisions: usize,
    /// Times the rule was run (skipped events excluded).
    pub calls: u64,
    /// Failures by kind (`trap`, `timeout`, `disabled`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Median call duration, in microseconds.
    pub p50_us: Option<u64>,
    /// 99th percentile call duration, in microseconds.
    pub p99_us: Option<u64>,
    /// The versions seen, newest first.
    pub versions: Vec<String>,
}

/// Every rule's record over the latest `limit` decisions, by rule name.
pub async fn record_by_rule(
    reader: &dyn EventReader,
    limit: usize,
) -> anyhow::Result<BTreeMap<String, Recorded>> {
    let decisions = reader.decisions(limit).await?;
    let mut by_rule: BTreeMap<String, (Recorded, Vec<u64>)> = BTreeMap::new();
    for d in &decisions {
        for r in &d.decision.rules {
            let (rec, durations) = by_rule.entry(r.rule.clone()).or_default();
            if !rec.versions.contains(&r.version) {
                rec.versions.push(r.version.clone());
            }
            match &r.outcome {
                RuleOutcome::Skipped => continue,
                RuleOutcome::Failed(f) => *rec.errors.entry(f.kind().to_owned()).or_default() += 1,
                RuleOutcome::Verdict(_) => {}
            }
            rec.calls += 1;
            durations.push(r.duration_us);
        }
    }
    Ok(by_rule
        .into_iter()
        .map(|(name, (mut rec, mut durations))| {
            durations.sort_unstable();
            rec.decisions = decisions.len();
            rec.p50_us = percentile(&durations, 50);
            rec.p99_us = percentile(&durations, 99);
            (name, rec)
        })
        .collect())
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: usize) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    Some(sorted[rank - 1])
}

/// What `/status/rules` answers: the status board (what each manifest loaded
/// as), each serving rule's circuit breaker, and each rule's record over the
/// latest decisions, so `sluice rules ls` can show the server's view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveStatus {
    /// The data directory the server serves (absolute), so a client can tell
    /// it is the server of its own config.
    pub data_dir: PathBuf,
    /// The status board.
    #[serde(flatten)]
    pub board: RulesStatus,
    /// Breaker state by rule name: `closed`, `open` or `half-open`.
    pub breakers: BTreeMap<String, String>,
    /// Each rule's record over the latest decisions (none when the store
    /// could not be read).
    pub recorded: Option<BTreeMap<String, Recorded>>,
}

/// A breaker state as `/status/rules` and `rules ls` name it.
pub fn breaker_name(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed => "closed",
        BreakerState::Open(_) => "open",
        BreakerState::HalfOpen => "half-open",
    }
}

/// How many of the latest decisions the statistics cover by default.
pub const DECISIONS: usize = 1000;
