//! The gate every log line a rule writes passes through, whatever its
//! language (a component's `log` import, a script's `print` and `debug`).
//!
//! A line is cut to [`MAX_MESSAGE`] bytes and [`MAX_FIELDS`] fields; a call
//! writes at most [`MAX_LINES_PER_CALL`] lines; and a rule, over all its
//! calls on every worker, at most [`LINES_PER_SECOND`] a second after a
//! burst of [`BURST`] (a token bucket per rule version). Lines over either
//! bound are dropped and counted in `sluice_rule_log_lines_dropped_total`,
//! and a warning says how many were dropped, at most once per
//! [`REPORT_EVERY`] per rule, so the report cannot become the flood.
//!
//! This module only formats and filters lines; it never runs a rule.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tracing::Level;

use crate::rules::output::truncate;

/// Log lines one call may write before the rest of that call's are dropped.
pub const MAX_LINES_PER_CALL: u32 = 64;
/// Log lines a rule may write per second, across all its calls, once its
/// burst is spent.
pub const LINES_PER_SECOND: u32 = 50;
/// Log lines a rule may write at once before [`LINES_PER_SECOND`] applies.
pub const BURST: u32 = 200;
/// Longest message kept, in bytes.
pub const MAX_MESSAGE: usize = 1024;
/// Fields kept per line.
pub const MAX_FIELDS: usize = 16;
/// Longest field name kept, in bytes.
pub const MAX_FIELD_KEY: usize = 64;
/// Longest field value kept, in bytes.
pub const MAX_FIELD_VALUE: usize = 256;
/// How often, at most, a rule's dropped lines are reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// One rule's log: its name and the bucket all its calls share.
pub struct RuleLog {
    rule: Arc<str>,
    rate: DefaultDirectRateLimiter,
    report: DefaultDirectRateLimiter,
    /// Dropped lines not yet reported in a warning.
    unreported: AtomicU64,
}

impl std::fmt::Debug for RuleLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleLog")
            .field("rule", &self.rule)
            .finish_non_exhaustive()
    }
}

impl RuleLog {
    /// The log of the rule `rule`, with a full bucket.
    pub fn new(rule: Arc<str>) -> Arc<RuleLog> {
        let per_second = NonZeroU32::new(LINES_PER_SECOND).expect("LINES_PER_SECOND > 0");
        let burst = NonZeroU32::new(BURST).expect("BURST > 0");
        let report = Quota::with_period(REPORT_EVERY).expect("REPORT_EVERY > 0");
        Arc::new(RuleLog {
            rule,
            rate: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
            report: RateLimiter::direct(report),
            unreported: AtomicU64::new(0),
        })
    }

    /// The log of one call: lines go through it, and when it ends (dropped
    /// or [`CallLog::finish`]ed) its dropped lines are counted.
    pub fn call(self: &Arc<Self>) -> CallLog {
        CallLog {
            log: self.clone(),
            written: 0,
            dropped: 0,
        }
    }
}

/// The lines of one rule call.
#[derive(Debug)]
pub struct CallLog {
    log: Arc<RuleLog>,
    written: u32,
    dropped: u64,
}

impl CallLog {
    /// Writes one line at `level`, unless this call or the rule is over its
    /// bound; `fields` are `key=value` pairs shown with it.
    pub fn write<K: AsRef<str>, V: AsRef<str>>(
        &mut self,
        level: Level,
        message: &str,
        fields: &[(K, V)],
    ) {
        if self.written >= MAX_LINES_PER_CALL || self.log.rate.check().is_err() {
            self.dropped += 1;
            return;
        }
        self.written += 1;
        let rule = &*self.log.rule;
        let message = truncate(message, MAX_MESSAGE);
        let fields = fields
            .iter()
            .take(MAX_FIELDS)
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    truncate(k.as_ref(), MAX_FIELD_KEY),
                    truncate(v.as_ref(), MAX_FIELD_VALUE)
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
        match level {
            Level::TRACE => tracing::trace!(rule, fields, "{message}"),
            Level::DEBUG => tracing::debug!(rule, fields, "{message}"),
            Level::INFO => tracing::info!(rule, fields, "{message}"),
            Level::WARN => tracing::warn!(rule, fields, "{message}"),
            Level::ERROR => tracing::error!(rule, fields, "{message}"),
        }
    }

    /// Ends the call: counts its dropped lines, reports them if the rule has
    /// not reported for [`REPORT_EVERY`], and starts a new call's count.
    pub fn finish(&mut self) {
        let dropped = std::mem::take(&mut self.dropped);
        self.written = 0;
        if dropped == 0 {
            return;
        }
        let rule = &*self.log.rule;
        metrics::counter!("sluice_rule_log_lines_dropped_total", "rule" => rule.to_owned())
            .increment(dropped);
        self.log.unreported.fetch_add(dropped, Ordering::Relaxed);
        if self.log.report.check().is_ok() {
            let n = self.log.unreported.swap(0, Ordering::Relaxed);
            tracing::warn!(
                rule,
                dropped = n,
                "rule log: dropped {n} lines over the limits ({MAX_LINES_PER_CALL} a call, \
                 {LINES_PER_SECOND} a second after a burst of {BURST})"
            );
        }
    }
}

impl Drop for CallLog {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_keeps_its_first_lines_and_counts_the_rest() {
        let log = RuleLog::new("t".into());
        let mut call = log.call();
        for i in 0..MAX_LINES_PER_CALL + 10 {
            call.write(Level::INFO, &format!("line {i}"), &[("k", "v")]);
        }
        assert_eq!((call.written, call.dropped), (MAX_LINES_PER_CALL, 10));
        call.finish();
        assert_eq!((call.written, call.dropped), (0, 0));
        // The next call starts afresh while the rule's bucket still has room.
        call.write(Level::INFO, "again", &[] as &[(&str, &str)]);
        assert_eq!(call.written, 1);
    }
}
