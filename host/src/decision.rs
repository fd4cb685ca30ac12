//! What rules decide: routes, ignores, errors, and the record the store keeps.
//!
//! These types are shared by the rule runtime (which produces them) and the
//! store (which records them); neither owns the other.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

/// How urgent a route is. Ordered so that `Critical` is the greatest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Handle when convenient.
    Low,
    /// The default.
    Medium,
    /// Ahead of medium and low.
    High,
    /// Ahead of everything.
    Critical,
}

impl Priority {
    /// The lower-case name used in rules and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Medium => "medium",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// Parses a priority name.
    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "low" => Some(Priority::Low),
            "medium" => Some(Priority::Medium),
            "high" => Some(Priority::High),
            "critical" => Some(Priority::Critical),
            _ => None,
        }
    }
}

/// One destination chosen for an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The agent that receives the event.
    pub agent: String,
    /// The workflow the agent should run, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// How urgent it is.
    pub priority: Priority,
    /// Why the rule chose it.
    #[serde(default)]
    pub reason: String,
    /// Free-form labels, `key:value` by convention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Deliveries to this agent with the same key go out one at a time, in
    /// the order their events arrived (interface 0.2.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
    /// What the agent gets as the envelope's `event.payload` instead of the
    /// whole body: a JSON value the rule shaped (interface 0.2.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

/// A rule's answer for one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Deliver to these routes.
    Routes(Vec<Route>),
    /// Deliberately ignored, with the reason.
    Ignore(String),
}

/// Why a rule produced no verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum RuleFailure {
    /// The rule returned an error value.
    #[error("rule returned an error: {0}")]
    Guest(String),
    /// The rule ran past its deadline or operation budget.
    #[error("rule ran past its deadline: {0}")]
    Timeout(String),
    /// The rule tried to take more memory than it may.
    #[error("rule exceeded its memory limit: {0}")]
    Memory(String),
    /// The rule trapped or otherwise broke (stack overflow, panic, a malformed answer).
    #[error("rule trapped: {0}")]
    Trap(String),
    /// The rule's answer (or a log line) went over the output limits: too
    /// many routes, an over-long name or label, or more bytes than the host
    /// copies out of a sandbox in one call.
    #[error("rule answered over the output limits: {0}")]
    Output(String),
    /// The rule is switched off by its circuit breaker.
    #[error("rule is switched off after repeated failures: {0}")]
    Disabled(String),
    /// The host had no capacity to run the rule (its instance pool was
    /// exhausted). Not the rule's failure: the event is routed again later.
    #[error("no capacity to run the rule: {0}")]
    Capacity(String),
    /// The rule routed outside its grant (an agent or workflow the
    /// operator did not approve): those routes were dropped, its others count.
    #[error("rule routed outside its grant: {0}")]
    Violation(String),
}

impl RuleFailure {
    /// A short name for the failure's kind (for output and metric labels).
    pub fn kind(&self) -> &'static str {
        match self {
            RuleFailure::Guest(_) => "guest",
            RuleFailure::Timeout(_) => "timeout",
            RuleFailure::Memory(_) => "memory",
            RuleFailure::Trap(_) => "trap",
            RuleFailure::Output(_) => "output",
            RuleFailure::Disabled(_) => "disabled",
            RuleFailure::Capacity(_) => "capacity",
            RuleFailure::Violation(_) => "violation",
        }
    }

    /// Whether the failure counts toward the rule's circuit breaker: only a
    /// rule that breaks the sandbox's bounds (trap, timeout, memory) does. An
    /// error value or an over-limit answer concerns one event's shape, and
    /// must not switch the rule off for every event. Nor does a grant
    /// violation: the host already dropped the offending routes, and
    /// switching the rule off would also drop its granted ones.
    pub fn counts_toward_breaker(&self) -> bool {
        matches!(
            self,
            RuleFailure::Trap(_) | RuleFailure::Timeout(_) | RuleFailure::Memory(_)
        )
    }
}

/// An event to route again later without counting an attempt: a rule it
/// needs is switched off (and its policy is `dead-letter`), or the host had
/// no capacity to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferral {
    /// How long to wait: the breaker's remaining open time, or a short pause.
    pub delay: std::time::Duration,
    /// Why, for the event's `last_error` and the log.
    pub reason: String,
}

/// What one rule did with one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleOutcome {
    /// The rule answered.
    Verdict(Verdict),
    /// The rule failed; the failure policy decided what happened instead.
    Failed(RuleFailure),
    /// The rule does not want this provider/kind, or is not granted this
    /// source/kind, and was not run.
    Skipped,
}

/// The record of one rule run, as stored beside the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRecord {
    /// The rule's name.
    pub rule: String,
    /// The rule version: the content hash of what was loaded.
    pub version: String,
    /// What it did. A verdict holds only the routes that counted.
    pub outcome: RuleOutcome,
    /// Set when the rule answered with routes outside its grant: a
    /// [`RuleFailure::Violation`] naming the routes the host dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub violation: Option<RuleFailure>,
    /// Wall time of the call, in microseconds.
    pub duration_us: u64,
    /// The event fields the rule read, in the order it first read them
    /// (at most [`MAX_READS`]), with the values it saw: what the outcome
    /// was decided on. Also kept when the rule failed, up to the failure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reads: Vec<FieldRead>,
    /// Reads of fields past the first [`MAX_READS`]: counted (each read),
    /// not recorded.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reads_dropped: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The most distinct fields recorded per rule run; more are only counted.
pub const MAX_READS: usize = 32;

/// The most bytes of a scalar value recorded per read; longer values are cut
/// (at a character boundary) and marked `truncated`.
pub const MAX_READ_VALUE: usize = 64;
/// Longest field name (JSON pointer or accessor) kept per read, in bytes.
pub const MAX_READ_POINTER: usize = 256;

/// One field a rule read from an event, and what it saw there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldRead {
    /// What was read: a JSON pointer into the payload (`/label/name`), an
    /// event field by name (`kind`, `action`, `source`, `provider`, `id`,
    /// `delivery_id`, `received_at`, `body`, `headers`), or a header as
    /// `header:<name>` (lower-case). Inline up to 24 bytes, as are values:
    /// recording a read costs no allocation in the common case.
    pub pointer: CompactString,
    /// The type of what was there.
    #[serde(rename = "type")]
    pub kind: ReadKind,
    /// For a string, number or boolean, the value seen (cut to
    /// [`MAX_READ_VALUE`] bytes); none for anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<CompactString>,
    /// Set when `value` was cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// The type of the value a rule read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadKind {
    /// Nothing there: the pointer matched nothing, or the field was unset.
    Absent,
    /// JSON `null`.
    Null,
    /// A boolean.
    Bool,
    /// A number.
    Number,
    /// A string.
    String,
    /// An object (recorded by type only).
    Object,
    /// An array (recorded by type only).
    Array,
    /// Present, but its value is never recorded: header values (they may
    /// carry credentials) and the raw body.
    Withheld,
}

impl std::fmt::Display for FieldRead {
    /// `pointer = value` as the text output shows it (`/action = labeled`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ellipsis = if self.truncated { "…" } else { "" };
        match (&self.value, self.kind) {
            (Some(v), _) => write!(f, "{} = {v}{ellipsis}", self.pointer),
            (None, ReadKind::Absent) => write!(f, "{} absent", self.pointer),
            (None, ReadKind::Null) => write!(f, "{} = null", self.pointer),
            (None, ReadKind::Object) => write!(f, "{} = {{…}}", self.pointer),
            (None, ReadKind::Array) => write!(f, "{} = […]", self.pointer),
            (None, _) => write!(f, "{} (value not recorded)", self.pointer),
        }
    }
}

/// The router's decision for one event: every rule's record and the merged routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Per-rule records, in rule order.
    pub rules: Vec<RuleRecord>,
    /// The merged routes the event goes to.
    pub routes: Vec<Route>,
    /// Set when the failure policy sent the event to the dead-letter queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
    /// Set when the event must be routed again later, not recorded: a
    /// deferral is never stored and never counts as an attempt.
    #[serde(skip)]
    pub defer: Option<Deferral>,
    /// When the decision was made, in milliseconds since the Unix epoch.
    pub decided_at_ms: i64,
}
