//! The `[rules]` section of the sluice config: where rules live, how their
//! answers merge, what a failure does, the default sandbox limits, the circuit
//! breaker and the router workers.
//!
//! This module only describes and validates settings; it never loads a rule,
//! touches the store or starts a task.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::rules::grants::Approvals;

/// The `[rules]` section of the main config.
///
/// Which rules load: every `*.toml` manifest directly inside `dir` (not in
/// sub-directories), in file-name order, unless `load` lists manifest names
/// (file stems), in which case exactly those load, in that order. Rule order
/// matters for `merge = "first"` and for the order of records in a decision.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct RulesConfig {
    /// The rules directory, relative to the config file's directory.
    pub dir: PathBuf,
    /// Manifest names to load, in order; absent means every manifest in `dir`.
    pub load: Option<Vec<String>>,
    /// How the answers of several rules combine.
    pub merge: MergeMode,
    /// What a failing rule does to the event unless its manifest says otherwise.
    pub on_error: FailurePolicy,
    /// Where compiled components are cached (relative to the config file's
    /// directory); absent means `<data_dir>/cache/wasm`, outside the rules
    /// directory so a watcher on it never sees cache writes.
    pub cache_dir: Option<PathBuf>,
    /// The compile cache's size limit and cleanup (`[rules.cache]`).
    pub cache: CacheConfig,
    /// Default sandbox limits; a manifest's `[limits]` overrides them per rule.
    pub limits: Limits,
    /// The per-rule circuit breaker.
    pub breaker: BreakerConfig,
    /// The ceilings of the WebAssembly instance pool, fixed when the engine
    /// is built (at start): a manifest asking for more is refused.
    pub pool: PoolConfig,
    /// The operator's approval of each rule's grants, by rule name
    /// (`[rules.grants.<rule>]`): a rule loads only when its approval covers
    /// everything its manifest's `[grants]` asks for.
    pub grants: Approvals,
    /// Number of router worker tasks.
    pub workers: usize,
    /// Events a worker leases per claim.
    pub batch: usize,
    /// How long a claim lasts before another worker may take the event, in ms.
    /// A worker renews the leases of its batch as it routes it; one event's
    /// worst case (the sum of the rules' `timeout_ms`) must be shorter, or
    /// the rule set is refused.
    pub lease_ms: u64,
    /// How long an idle worker waits for new work before polling again, in ms.
    pub poll_ms: u64,
    /// Routing attempts before a `dead-letter` failure really dead-letters.
    pub max_attempts: u32,
    /// First retry delay, in ms (doubles per attempt, with full jitter).
    pub retry_base_ms: u64,
    /// Longest retry delay, in ms.
    pub retry_max_ms: u64,
    /// How long after its arrival an event may still be deferred (put back
    /// without counting an attempt, because a rule is switched off or no
    /// instance is free), in ms. Past it a deferral counts as an attempt, so
    /// the failure policy (and the dead-letter queue) applies in the end.
    pub max_defer_ms: u64,
    /// How `serve` notices changed rule files (`[rules.reload]`).
    pub reload: ReloadConfig,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            dir: PathBuf::from("rules"),
            load: None,
            merge: MergeMode::Merge,
            on_error: FailurePolicy::Skip,
            cache_dir: None,
            cache: CacheConfig::default(),
            limits: Limits::default(),
            breaker: BreakerConfig::default(),
            pool: PoolConfig::default(),
            grants: Approvals::default(),
            workers: 2,
            batch: 16,
            lease_ms: 30_000,
            poll_ms: 1_000,
            max_attempts: 3,
            retry_base_ms: 1_000,
            retry_max_ms: 300_000,
            max_defer_ms: 86_400_000,
            reload: ReloadConfig::default(),
        }
    }
}

/// `[rules.reload]`: how `serve` notices changed rule files. `SIGHUP`
/// reloads whatever these say.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Watch the rules directory (file events, and the poll below); when
    /// false, rules change only on `SIGHUP`.
    pub watch: bool,
    /// How long a file written in place must stay unchanged before it is
    /// read, in ms. A file renamed into place is read at once.
    pub debounce_ms: u64,
    /// How often the directory is rescanned for changes no event reported
    /// (bind mounts, network file systems), in ms.
    pub poll_ms: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: true,
            debounce_ms: 300,
            poll_ms: 2_000,
        }
    }
}

/// How the verdicts of several rules combine into one set of routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MergeMode {
    /// Union by agent and workflow; the highest priority wins, labels are unioned.
    #[default]
    Merge,
    /// The routes of the first rule (in order) that returns any; the rules
    /// after it do not run and have no record in the decision. A failed rule
    /// whose policy is `default-agent` counts as returning that route.
    First,
}

/// What happens to an event when a rule fails (trap, timeout, error, switched off).
///
/// In TOML: `"skip"`, `"dead-letter"` or `{ default-agent = "name" }`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Record the failure and carry on with the other rules' routes.
    #[default]
    Skip,
    /// Record the failure and route the event to this agent instead.
    DefaultAgent(String),
    /// Record the failure and send the event to the dead-letter queue (after
    /// the router's retries, since a timeout may be transient).
    DeadLetter,
}

impl fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailurePolicy::Skip => f.write_str("skip"),
            FailurePolicy::DeadLetter => f.write_str("dead-letter"),
            FailurePolicy::DefaultAgent(a) => write!(f, "default-agent = {a:?}"),
        }
    }
}

impl Serialize for FailurePolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            FailurePolicy::Skip => s.serialize_str("skip"),
            FailurePolicy::DeadLetter => s.serialize_str("dead-letter"),
            FailurePolicy::DefaultAgent(a) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("default-agent", a)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for FailurePolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PolicyVisitor;
        impl<'de> Visitor<'de> for PolicyVisitor {
            type Value = FailurePolicy;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""skip", "dead-letter" or { default-agent = "name" }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FailurePolicy, E> {
                match v {
                    "skip" => Ok(FailurePolicy::Skip),
                    "dead-letter" => Ok(FailurePolicy::DeadLetter),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FailurePolicy, A::Error> {
                let key: Option<String> = map.next_key()?;
                match key.as_deref() {
                    Some("default-agent") => {
                        let agent: String = map.next_value()?;
                        if agent.trim().is_empty() {
                            return Err(de::Error::custom("default-agent must name an agent"));
                        }
                        if let Some(extra) = map.next_key::<String>()? {
                            return Err(de::Error::unknown_field(&extra, &["default-agent"]));
                        }
                        Ok(FailurePolicy::DefaultAgent(agent))
                    }
                    Some(other) => Err(de::Error::unknown_field(other, &["default-agent"])),
                    None => Err(de::Error::custom("expected { default-agent = \"name\" }")),
                }
            }
        }
        d.deserialize_any(PolicyVisitor)
    }
}

/// Sandbox limits for one rule call. The defaults suit a rule that reads a
/// few fields; raise them per rule in its manifest when it needs more.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-clock budget of one call, in milliseconds (epoch deadline for
    /// components, a progress check for scripts).
    pub timeout_ms: u64,
    /// Linear memory a component may grow to, in MiB (at most
    /// `rules.pool.max_memory_mb`).
    pub memory_mb: u64,
    /// rhai: operations one call may run.
    pub max_operations: u64,
    /// rhai: function call nesting depth.
    pub max_call_levels: usize,
    /// rhai: longest string, in bytes.
    pub max_string_size: usize,
    /// rhai: largest array.
    pub max_array_size: usize,
    /// rhai: largest object map.
    pub max_map_size: usize,
    /// rhai: deepest expression nesting.
    pub max_expr_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout_ms: 100,
            memory_mb: 32,
            max_operations: 1_000_000,
            max_call_levels: 32,
            max_string_size: 1 << 20,
            max_array_size: 10_000,
            max_map_size: 10_000,
            max_expr_depth: 64,
        }
    }
}

/// Per-rule overrides of [`Limits`], as written in a manifest's `[limits]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // each field overrides the `Limits` field of the same name
pub struct LimitOverrides {
    pub timeout_ms: Option<u64>,
    pub memory_mb: Option<u64>,
    pub max_operations: Option<u64>,
    pub max_call_levels: Option<usize>,
    pub max_string_size: Option<usize>,
    pub max_array_size: Option<usize>,
    pub max_map_size: Option<usize>,
    pub max_expr_depth: Option<usize>,
}

impl Limits {
    /// The hard ceilings no config or manifest may exceed.
    pub const MAX_TIMEOUT_MS: u64 = 60_000;
    /// The largest memory a rule may be granted, in MiB.
    pub const MAX_MEMORY_MB: u64 = 1024;

    /// These limits with a manifest's overrides applied.
    pub fn with(&self, o: &LimitOverrides) -> Limits {
        Limits {
            timeout_ms: o.timeout_ms.unwrap_or(self.timeout_ms),
            memory_mb: o.memory_mb.unwrap_or(self.memory_mb),
            max_operations: o.max_operations.unwrap_or(self.max_operations),
            max_call_levels: o.max_call_levels.unwrap_or(self.max_call_levels),
            max_string_size: o.max_string_size.unwrap_or(self.max_string_size),
            max_array_size: o.max_array_size.unwrap_or(self.max_array_size),
            max_map_size: o.max_map_size.unwrap_or(self.max_map_size),
            max_expr_depth: o.max_expr_depth.unwrap_or(self.max_expr_depth),
        }
    }

    /// Highest `max_call_levels` allowed (rhai calls recurse on the host stack).
    pub const MAX_CALL_LEVELS: usize = 64;
    /// Highest `max_expr_depth` allowed (rhai parses nested expressions recursively).
    pub const MAX_EXPR_DEPTH: usize = 128;

    /// Checks the limits are usable, naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.timeout_ms == 0 || self.timeout_ms > Self::MAX_TIMEOUT_MS {
            return Err(format!(
                "timeout_ms: must be between 1 and {}",
                Self::MAX_TIMEOUT_MS
            ));
        }
        if self.memory_mb == 0 || self.memory_mb > Self::MAX_MEMORY_MB {
            return Err(format!(
                "memory_mb: must be between 1 and {}",
                Self::MAX_MEMORY_MB
            ));
        }
        // rhai recurses on the host's stack for calls and nested expressions:
        // past these bounds a script could overflow a 2 MiB worker thread's
        // stack and abort the process (measured: ~400 trivial call levels).
        for (key, v, max) in [
            ("max_operations", self.max_operations as usize, usize::MAX),
            (
                "max_call_levels",
                self.max_call_levels,
                Self::MAX_CALL_LEVELS,
            ),
            ("max_string_size", self.max_string_size, usize::MAX),
            ("max_array_size", self.max_array_size, usize::MAX),
            ("max_map_size", self.max_map_size, usize::MAX),
            ("max_expr_depth", self.max_expr_depth, Self::MAX_EXPR_DEPTH),
        ] {
            if v == 0 || v > max {
                return Err(format!("{key}: must be between 1 and {max}"));
            }
        }
        Ok(())
    }
}

/// The per-rule circuit breaker: after `failures` consecutive failures a rule
/// is switched off for `cooldown_ms`, then given one trial call.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures that switch a rule off (traps, timeouts and
    /// memory exhaustion; a rule's own error values and over-limit answers
    /// do not count).
    pub failures: u32,
    /// How long a switched-off rule stays off, in milliseconds.
    pub cooldown_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            cooldown_ms: 30_000,
        }
    }
}

/// The compile cache (`[rules.cache]`): wasmtime's own cache of compiled
/// components under `rules.cache_dir`. Entries are keyed by the component's
/// bytes and the engine's settings; a background worker deletes the least
/// recently used ones once the directory grows past `max_size_mb`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Soft limit of the cache directory's size, in MiB: past it, a cleanup
    /// deletes the oldest entries until it is under 70 % of the limit.
    pub max_size_mb: u64,
    /// Shortest time between two cleanups, in seconds (a cleanup runs after
    /// a new entry is written, at most this often).
    pub cleanup_interval_s: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_size_mb: 512,
            cleanup_interval_s: 3_600,
        }
    }
}

impl CacheConfig {
    /// Checks the values are usable, naming the key under `rules.cache.`.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_size_mb == 0 || self.max_size_mb > 1 << 20 {
            return Err("rules.cache.max_size_mb: must be between 1 and 1048576".into());
        }
        Ok(())
    }
}

/// The ceilings of the pooling allocator every component instance comes
/// from. The pool reserves (virtual) memory for all of it when the engine is
/// built, so these are fixed for the life of the process; rules' limits must
/// fit inside them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Component instances alive at once (one per rule call in flight); at
    /// least `rules.workers`. A call that finds the pool full is routed again
    /// later, not counted as a failure.
    pub instances: u32,
    /// The largest linear memory of any instance, in MiB: the ceiling of
    /// every rule's `limits.memory_mb`.
    pub max_memory_mb: u64,
    /// The most elements of any table, in the pool and in each store's limits.
    pub table_elements: usize,
    /// Core module instances one rule instance may have. A Rust or C rule has
    /// about 3, a JavaScript one (QuickJS) about 11, a Python one (CPython)
    /// about 38. The pool holds `instances` times this many; a component
    /// that needs more is refused when it loads.
    pub core_instances_per_rule: u32,
    /// Linear memories one rule instance may define (JavaScript: 3; Rust, C,
    /// Python: 1). The pool reserves `instances` times this many slots.
    pub memories_per_rule: u32,
    /// Tables one rule instance may define (Rust, Python: 2; JavaScript: 3).
    /// The pool reserves `instances` times this many.
    pub tables_per_rule: u32,
    /// Instances made ahead of time per component rule version, off the
    /// event path, each used for one event; 0 instantiates on the event
    /// path. They hold pool slots: all rules' ready instances together are
    /// capped at run time at `instances` less `rules.workers`.
    pub ready_per_rule: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            instances: 128,
            max_memory_mb: Limits::MAX_MEMORY_MB,
            table_elements: 20_000,
            core_instances_per_rule: 64,
            memories_per_rule: 4,
            tables_per_rule: 16,
            ready_per_rule: 2,
        }
    }
}

impl PoolConfig {
    /// The most ready instances one rule version may keep.
    pub const MAX_READY_PER_RULE: u32 = 64;

    /// Checks the ceilings are usable, naming the key under `rules.pool.`.
    pub fn validate(&self) -> Result<(), String> {
        if self.instances == 0 || self.instances > 10_000 {
            return Err("rules.pool.instances: must be between 1 and 10000".into());
        }
        if self.max_memory_mb == 0 || self.max_memory_mb > Limits::MAX_MEMORY_MB {
            return Err(format!(
                "rules.pool.max_memory_mb: must be between 1 and {}",
                Limits::MAX_MEMORY_MB
            ));
        }
        if self.table_elements == 0 || self.table_elements > 10_000_000 {
            return Err("rules.pool.table_elements: must be between 1 and 10000000".into());
        }
        for (key, value) in [
            ("core_instances_per_rule", self.core_instances_per_rule),
            ("memories_per_rule", self.memories_per_rule),
            ("tables_per_rule", self.tables_per_rule),
        ] {
            if value == 0 || value > 1_000 {
                return Err(format!("rules.pool.{key}: must be between 1 and 1000"));
            }
        }
        if self.ready_per_rule > Self::MAX_READY_PER_RULE {
            return Err(format!(
                "rules.pool.ready_per_rule: must be between 0 and {}",
                Self::MAX_READY_PER_RULE
            ));
        }
        Ok(())
    }

    /// Checks that rule limits fit inside the pool, naming both values.
    /// `key` is where the limits come from (`rules.limits`, `limits`).
    pub fn admits(&self, limits: &Limits, key: &str) -> Result<(), String> {
        if limits.memory_mb > self.max_memory_mb {
            return Err(format!(
                "{key}.memory_mb = {} is over the instance pool's ceiling, \
                 rules.pool.max_memory_mb = {}",
                limits.memory_mb, self.max_memory_mb
            ));
        }
        Ok(())
    }
}

impl RulesConfig {
    /// The rules directory, resolved against the config file's directory.
    pub fn rules_dir(&self, base_dir: &Path) -> PathBuf {
        base_dir.join(&self.dir)
    }

    /// The compile cache directory: `cache_dir` resolved against the config
    /// file's directory, else `<data_dir>/cache/wasm`.
    pub fn cache_dir(&self, base_dir: &Path, data_dir: &Path) -> PathBuf {
        match &self.cache_dir {
            Some(dir) => base_dir.join(dir),
            None => data_dir.join("cache").join("wasm"),
        }
    }

    /// Checks values serde cannot, naming the key under `rules.`.
    pub fn validate(&self) -> Result<(), String> {
        self.limits
            .validate()
            .map_err(|e| format!("rules.limits.{e}"))?;
        self.pool.validate()?;
        self.cache.validate()?;
        self.pool.admits(&self.limits, "rules.limits")?;
        if self.breaker.failures == 0 {
            return Err("rules.breaker.failures: must be at least 1".into());
        }
        if self.workers == 0 {
            return Err("rules.workers: must be at least 1".into());
        }
        if self.workers > self.pool.instances as usize {
            return Err(format!(
                "rules.workers = {} is more than rules.pool.instances = {}: \
                 each worker runs one instance at a time",
                self.workers, self.pool.instances
            ));
        }
        if self.batch == 0 {
            return Err("rules.batch: must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return Err("rules.max_attempts: must be at least 1".into());
        }
        if self.lease_ms < 1_000 {
            return Err("rules.lease_ms: must be at least 1000".into());
        }
        for (rule, approval) in self.grants.iter() {
            approval.validate(&format!("rules.grants.{rule}"))?;
        }
        if self.reload.poll_ms < 100 {
            return Err("rules.reload.poll_ms: must be at least 100".into());
        }
        Ok(())
    }
}
