//! The rule runtime: loaded rules, the rule set that runs them on an event,
//! and the policies around them (which rules want which events, how answers
//! merge, what a failure does, the circuit breaker).
//!
//! A [`RuleSet`] is immutable once built: hot reload builds a whole new set
//! with [`RuleSet::load`] and swaps it through an `ArcSwap` ([`SharedRuleSet`]),
//! so an event in flight finishes on the set it started with and every
//! decision names the rule versions that made it. Nothing here touches the
//! store or the network; a failing rule is recorded against that rule and can
//! never fail the host.

pub mod bench;
pub mod breaker;
pub mod catalog;
pub mod config;
pub mod grants;
pub mod log;
pub mod manifest;
pub mod output;
pub mod reads;
pub mod ready;
pub mod reload;
pub mod rhai;
pub mod router;
pub mod stats;
pub mod vectors;
pub mod wasm;

pub use self::config::RulesConfig;
pub use self::wasm::WasmEngine;

use std::collections::BTreeMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::decision::{
    Decision, Deferral, Priority, Route, RuleFailure, RuleOutcome, RuleRecord, Verdict,
};
use crate::event::{Event, ParsedEvent, Provider, now_ms};
use crate::rules::breaker::{Breaker, BreakerState, Outcome as BreakerOutcome};
use crate::rules::config::{BreakerConfig, FailurePolicy, MergeMode};
use crate::rules::grants::Scope;
use crate::rules::manifest::{Manifest, RuleSource, TestVector};
use crate::rules::reads::Reads;
use crate::rules::rhai::RhaiRule;
use crate::rules::wasm::WasmRule;

/// How long an event waits when the host had no capacity to run a rule; also
/// the shortest deferral of any kind.
const CAPACITY_RETRY: Duration = Duration::from_secs(1);

/// The rule set currently serving, swapped whole on reload.
pub type SharedRuleSet = Arc<ArcSwap<RuleSet>>;

/// A native Rust rule function (the bench baseline, tests, built-in rules).
pub type NativeFn = dyn Fn(&ParsedEvent) -> Result<Verdict, RuleFailure> + Send + Sync;

/// The code behind a rule.
pub enum RuleCode {
    /// A Rust function compiled into sluice.
    Native(Arc<NativeFn>),
    /// A WebAssembly component (boxed: it is much larger than the others).
    Wasm(Box<WasmRule>),
    /// A rhai script (boxed, like components).
    Rhai(Box<RhaiRule>),
}

impl fmt::Debug for RuleCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleCode::Native(_) => f.write_str("Native"),
            RuleCode::Wasm(w) => w.fmt(f),
            RuleCode::Rhai(r) => r.fmt(f),
        }
    }
}

/// One loaded rule: a name, a version (content hash) and its code.
#[derive(Debug)]
pub struct Rule {
    name: String,
    version: String,
    origin: PathBuf,
    providers: Vec<Provider>,
    kinds: Vec<String>,
    /// What its grants let it see and route to (everything for native rules).
    scope: Scope,
    on_error: Option<FailurePolicy>,
    /// The longest one call may run (`limits.timeout_ms`); none for native rules.
    timeout: Option<Duration>,
    code: RuleCode,
}

impl Rule {
    /// A native Rust rule. Its version is `native`, since its code is sluice's own.
    pub fn native(
        name: impl Into<String>,
        f: impl Fn(&ParsedEvent) -> Result<Verdict, RuleFailure> + Send + Sync + 'static,
    ) -> Rule {
        let name = name.into();
        Rule {
            origin: PathBuf::from(format!("native:{name}")),
            name,
            version: "native".into(),
            providers: Vec::new(),
            kinds: Vec::new(),
            scope: Scope::all(),
            on_error: None,
            timeout: None,
            code: RuleCode::Native(Arc::new(f)),
        }
    }

    /// Restricts the rule to these providers (empty: all).
    pub fn for_providers(mut self, providers: impl IntoIterator<Item = Provider>) -> Rule {
        self.providers = providers.into_iter().collect();
        self
    }

    /// Restricts the rule to these event kinds (empty: all).
    pub fn for_kinds(mut self, kinds: impl IntoIterator<Item = impl Into<String>>) -> Rule {
        self.kinds = kinds.into_iter().map(Into::into).collect();
        self
    }

    /// Sets this rule's failure policy, overriding the rule set's default.
    pub fn with_policy(mut self, policy: FailurePolicy) -> Rule {
        self.on_error = Some(policy);
        self
    }

    /// Loads the rule a manifest describes. `manifest_text` is the manifest as
    /// read (it is part of the version hash: config values and limits change
    /// behaviour as much as code does).
    pub fn from_manifest(
        manifest: &Manifest,
        manifest_path: &Path,
        manifest_text: &str,
        defaults: &RulesConfig,
        engine: &WasmEngine,
    ) -> Result<Rule, LoadError> {
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        effective_limits(manifest, manifest_path, defaults, engine)?;
        let code_path = manifest.source(dir).path().to_owned();
        let bytes = std::fs::read(&code_path).map_err(|e| {
            LoadError::new(
                &code_path,
                Some(&manifest.name),
                format!("cannot read: {e}"),
            )
        })?;
        Rule::from_code(
            manifest,
            manifest_path,
            manifest_text,
            bytes,
            defaults,
            engine,
        )
    }

    /// Loads a rule from its manifest and the code bytes already read (hot
    /// reload reads them once, so the version it compares is the version
    /// it compiles).
    pub fn from_code(
        manifest: &Manifest,
        manifest_path: &Path,
        manifest_text: &str,
        bytes: Vec<u8>,
        defaults: &RulesConfig,
        engine: &WasmEngine,
    ) -> Result<Rule, LoadError> {
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        let limits = effective_limits(manifest, manifest_path, defaults, engine)?;
        let source = manifest.source(dir);
        let code_path = source.path().to_owned();
        let code_err = |message: String| LoadError::new(&code_path, Some(&manifest.name), message);
        let version = version_of(manifest_text, &bytes, &limits);
        let code = match source {
            RuleSource::Component(_) => RuleCode::Wasm(Box::new(
                engine
                    .load(
                        &manifest.name,
                        &bytes,
                        &manifest.grants,
                        manifest.config.clone(),
                        &limits,
                    )
                    .map_err(|e| code_err(format!("{e:#}")))?,
            )),
            RuleSource::Script(_) => {
                if manifest.grants.wasi {
                    return Err(LoadError::new(
                        manifest_path,
                        Some(&manifest.name),
                        "grants.wasi: only components can be granted WASI".into(),
                    ));
                }
                let text =
                    String::from_utf8(bytes).map_err(|_| code_err("not UTF-8 text".into()))?;
                RuleCode::Rhai(Box::new(
                    RhaiRule::compile(&manifest.name, &text, &limits, manifest.config.clone())
                        .map_err(|e| code_err(format!("{e:#}")))?,
                ))
            }
        };
        Ok(Rule {
            name: manifest.name.clone(),
            version,
            origin: code_path,
            providers: manifest
                .providers
                .iter()
                .filter_map(|p| Provider::parse(p))
                .collect(),
            kinds: manifest.kinds.clone(),
            scope: manifest.scope(),
            on_error: manifest.on_error.clone(),
            timeout: Some(Duration::from_millis(limits.timeout_ms)),
            code,
        })
    }

    /// The version a manifest and its code would load as: a content hash of
    /// everything that decides behaviour, so an unchanged rule is known
    /// without compiling it again.
    pub fn version_for(
        manifest: &Manifest,
        manifest_text: &str,
        bytes: &[u8],
        defaults: &RulesConfig,
    ) -> String {
        version_of(
            manifest_text,
            bytes,
            &defaults.limits.with(&manifest.limits),
        )
    }

    /// The rule's name, as recorded in decisions.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The rule's version: a content hash of its manifest and code
    /// (16 hex digits of SHA-256), or `native`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The file the rule's code came from (`native:<name>` for native rules).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The providers it wants (empty: all).
    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    /// The event kinds it wants (empty: all).
    pub fn kinds(&self) -> &[String] {
        &self.kinds
    }

    /// What its grants let it see and route to.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// Its own failure policy, if it sets one.
    pub fn on_error(&self) -> Option<&FailurePolicy> {
        self.on_error.as_ref()
    }

    /// The longest one call may run (`limits.timeout_ms`); `None` for native
    /// rules, which are sluice's own code.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The code behind it (benchmarks use this to reach a component directly).
    pub fn code(&self) -> &RuleCode {
        &self.code
    }

    /// The `sluice:router` interface version a component rule targets; none
    /// for scripts and native rules.
    pub fn interface(&self) -> Option<wasm::WitVersion> {
        match &self.code {
            RuleCode::Wasm(w) => Some(w.wit_version()),
            _ => None,
        }
    }

    /// Whether the rule wants this event (provider and kind filters) and is
    /// granted it (source and kind): the host never calls it otherwise.
    pub fn wants(&self, ev: &Event) -> bool {
        (self.providers.is_empty() || self.providers.contains(&ev.provider))
            && (self.kinds.is_empty() || self.kinds.contains(&ev.kind))
            && self.scope.sees(ev)
    }

    /// Runs the rule on one event. A panic in host code is caught and
    /// reported as a trap, so one rule can never take a worker down.
    pub fn classify(&self, ev: &Arc<ParsedEvent>) -> Result<Verdict, RuleFailure> {
        self.classify_with_reads(ev).0
    }

    /// Runs the rule on one event, and says which event fields it read (for
    /// component and script rules; a native rule reports none).
    pub fn classify_with_reads(
        &self,
        ev: &Arc<ParsedEvent>,
    ) -> (Result<Verdict, RuleFailure>, Reads) {
        let run = || match &self.code {
            RuleCode::Native(f) => {
                let verdict = f(ev).and_then(|v| match v {
                    Verdict::Routes(r) => output::bound(r).map(Verdict::Routes),
                    ignore => Ok(ignore),
                });
                (verdict, Reads::default())
            }
            RuleCode::Wasm(w) => w.classify_with_reads(ev),
            RuleCode::Rhai(r) => r.classify_with_reads(ev),
        };
        std::panic::catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let failure = RuleFailure::Trap(format!("host panicked while running the rule: {msg}"));
            (Err(failure), Reads::default())
        })
    }

    /// Runs the rule's test vectors; the first mismatch is an error naming the vector.
    pub fn check_tests(&self, tests: &[TestVector], manifest_path: &Path) -> Result<(), LoadError> {
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        for (i, t) in tests.iter().enumerate() {
            let message = match vectors::run(self, t, dir) {
                vectors::VectorResult::Pass => continue,
                vectors::VectorResult::Error(m) => m,
                vectors::VectorResult::Mismatch { expected, got } => format!(
                    "{}: expected {expected}, got {}",
                    t.event.display(),
                    vectors::describe(&got)
                ),
            };
            return Err(LoadError::new(
                manifest_path,
                Some(&self.name),
                format!("test[{i}]: {message}"),
            ));
        }
        Ok(())
    }
}

/// A rule's limits (the config's defaults with its manifest's overrides),
/// refused when invalid or, for a component, larger than the pool admits.
fn effective_limits(
    manifest: &Manifest,
    manifest_path: &Path,
    defaults: &RulesConfig,
    engine: &WasmEngine,
) -> Result<config::Limits, LoadError> {
    let limits = defaults.limits.with(&manifest.limits);
    limits
        .validate()
        .map_err(|e| LoadError::new(manifest_path, Some(&manifest.name), format!("limits.{e}")))?;
    if manifest.component.is_some() {
        engine
            .pool()
            .admits(&limits, "limits")
            .map_err(|e| LoadError::new(manifest_path, Some(&manifest.name), e))?;
    }
    Ok(limits)
}

/// The version covers everything that decides behaviour: the manifest, the
/// code, and the effective limits (the main config's defaults can change them
/// without touching the manifest).
fn version_of(manifest_text: &str, bytes: &[u8], limits: &config::Limits) -> String {
    let mut hash = Sha256::new();
    hash.update(manifest_text.as_bytes());
    hash.update([0]);
    hash.update(bytes);
    hash.update([0]);
    hash.update(serde_json::to_vec(limits).expect("limits serialise"));
    hex::encode(&hash.finalize()[..8])
}

/// A rule set that could not be built, naming the file (and rule) at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadError {
    /// The manifest, component or script at fault.
    pub file: PathBuf,
    /// The rule, when known.
    pub rule: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl LoadError {
    pub(crate) fn new(file: &Path, rule: Option<&str>, message: String) -> LoadError {
        LoadError {
            file: file.to_owned(),
            rule: rule.map(str::to_owned),
            message,
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(rule) => write!(f, "rule {rule} ({}): {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// A rule in a set. The rule and its breaker are shared, so a reload that
/// keeps a rule's version keeps its breaker state too.
struct Entry {
    rule: Arc<Rule>,
    policy: FailurePolicy,
    breaker: Arc<Breaker>,
}

/// An immutable set of rules and the policies that combine their answers.
pub struct RuleSet {
    entries: Vec<Entry>,
    merge: MergeMode,
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleSet")
            .field(
                "rules",
                &self
                    .entries
                    .iter()
                    .map(|e| (&e.rule.name, &e.rule.version))
                    .collect::<Vec<_>>(),
            )
            .field("merge", &self.merge)
            .finish()
    }
}

impl RuleSet {
    /// A set of already built rules. A rule without its own failure policy
    /// gets `on_error`.
    pub fn new(
        rules: Vec<Rule>,
        merge: MergeMode,
        on_error: FailurePolicy,
        breaker: &BreakerConfig,
    ) -> RuleSet {
        let rules = rules.into_iter().map(Arc::new).collect();
        RuleSet::carry_over(rules, merge, on_error, breaker, None)
    }

    /// A set of shared rules (hot reload reuses unchanged ones). A rule that
    /// `previous` holds at the same name and version keeps its breaker, state
    /// and all; any other rule starts with a closed one.
    pub fn carry_over(
        rules: Vec<Arc<Rule>>,
        merge: MergeMode,
        on_error: FailurePolicy,
        breaker: &BreakerConfig,
        previous: Option<&RuleSet>,
    ) -> RuleSet {
        let entries = rules
            .into_iter()
            .map(|rule| {
                let kept = previous.and_then(|p| {
                    p.entries
                        .iter()
                        .find(|e| e.rule.name == rule.name && e.rule.version == rule.version)
                        .map(|e| e.breaker.clone())
                });
                Entry {
                    policy: rule.on_error.clone().unwrap_or_else(|| on_error.clone()),
                    breaker: kept.unwrap_or_else(|| Arc::new(Breaker::new(breaker))),
                    rule,
                }
            })
            .collect();
        RuleSet { entries, merge }
    }

    /// The rules, shared (hot reload keeps the unchanged ones).
    pub fn shared_rules(&self) -> impl ExactSizeIterator<Item = &Arc<Rule>> {
        self.entries.iter().map(|e| &e.rule)
    }

    /// A set with no rules: every event is routed nowhere.
    pub fn empty() -> RuleSet {
        RuleSet {
            entries: Vec::new(),
            merge: MergeMode::Merge,
        }
    }

    /// Builds a complete rule set from the `[rules]` config: reads every
    /// manifest (see [`RulesConfig`] for which), compiles each rule, runs its
    /// test vectors, and fails on the first problem, naming the file.
    /// `base_dir` is the directory of the config file (`dir` is relative to it).
    pub fn load(
        config: &RulesConfig,
        base_dir: &Path,
        engine: &WasmEngine,
    ) -> Result<RuleSet, LoadError> {
        config
            .validate()
            .map_err(|m| LoadError::new(base_dir, None, m))?;
        let dir = config.rules_dir(base_dir);
        let manifests = manifest_paths(config, &dir)?;
        let mut rules = Vec::with_capacity(manifests.len());
        let mut seen = BTreeMap::new();
        for path in manifests {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| LoadError::new(&path, None, format!("cannot read: {e}")))?;
            let manifest = parse_manifest(&path, &text)?;
            if let Some(other) = seen.insert(manifest.name.clone(), path.clone()) {
                return Err(LoadError::new(
                    &path,
                    Some(&manifest.name),
                    format!("name: also used by {}", other.display()),
                ));
            }
            grants::approve(&manifest, &path, &config.grants)?;
            let rule = Rule::from_manifest(&manifest, &path, &text, config, engine)?;
            grants::check_pin(&rule.name, &rule.version, &path, &config.grants)?;
            rule.check_tests(&manifest.tests, &path)?;
            rules.push((rule, path));
        }
        check_lease(
            config,
            base_dir,
            rules.iter().map(|(r, p)| (r, p.as_path())),
        )?;
        let rules = rules.into_iter().map(|(rule, _)| rule).collect();
        Ok(RuleSet::new(
            rules,
            config.merge,
            config.on_error.clone(),
            &config.breaker,
        ))
    }

    /// The longest one event may take to route: the sum of the rules'
    /// timeouts, as they run one after another (native rules count as none).
    pub fn worst_case(&self) -> Duration {
        self.entries.iter().filter_map(|e| e.rule.timeout).sum()
    }

    /// Whether every rule has a deadline, so [`RuleSet::worst_case`] bounds
    /// an event's routing (a native rule has none).
    pub fn bounded(&self) -> bool {
        self.entries.iter().all(|e| e.rule.timeout.is_some())
    }

    /// The rules, in order.
    pub fn rules(&self) -> impl ExactSizeIterator<Item = &Rule> {
        self.entries.iter().map(|e| &*e.rule)
    }

    /// How answers merge.
    pub fn merge_mode(&self) -> MergeMode {
        self.merge
    }

    /// The circuit breaker state of a rule, by name.
    pub fn breaker_state(&self, rule: &str) -> Option<BreakerState> {
        self.entries
            .iter()
            .find(|e| e.rule.name == rule)
            .map(|e| e.breaker.state())
    }

    /// Runs every rule that wants the event and merges their answers. Never
    /// fails: a rule's failure is recorded against it and handled by its policy.
    /// When a rule cannot run now (switched off under `dead-letter`, or no
    /// instance free), the decision carries a [`Deferral`] instead: the event
    /// is to be routed again later, and the rest of the decision is moot.
    pub fn route(&self, ev: &Arc<ParsedEvent>) -> Decision {
        let mut records = Vec::with_capacity(self.entries.len());
        let mut routes: Vec<Route> = Vec::new();
        let mut dead_letter = None;
        let mut defer = None;
        for entry in &self.entries {
            let rule = &entry.rule;
            if !rule.wants(&ev.event) {
                records.push(RuleRecord {
                    rule: rule.name.clone(),
                    version: rule.version.clone(),
                    outcome: RuleOutcome::Skipped,
                    violation: None,
                    duration_us: 0,
                    reads: Vec::new(),
                    reads_dropped: 0,
                });
                continue;
            }
            // The payload is checked and indexed once per event, before the
            // first rule that wants it starts, so no rule's deadline or
            // duration pays for it; each field read then parses only its value.
            ev.scan();
            let start = Instant::now();
            let mut reads = Reads::default();
            let result = match entry.breaker.admit() {
                BreakerState::Open(left) => {
                    let failures = entry.breaker.consecutive_failures();
                    if entry.policy == FailurePolicy::DeadLetter {
                        // Not a counted attempt: the retries would run out long
                        // before the cool-down does, dead-lettering events the
                        // rule never saw. Try again once it may run.
                        defer = Some(Deferral {
                            // At least a second: a cool-down that is (nearly)
                            // over, or a trial still in flight, must not make
                            // the workers reclaim the event in a tight loop.
                            delay: left.max(CAPACITY_RETRY),
                            reason: format!(
                                "rule {} is switched off after {failures} consecutive failures",
                                rule.name
                            ),
                        });
                        break;
                    }
                    Err(RuleFailure::Disabled(format!(
                        "{failures} consecutive failures; retried in {} s",
                        left.as_secs() + 1
                    )))
                }
                state @ (BreakerState::Closed | BreakerState::HalfOpen) => {
                    let trial = state == BreakerState::HalfOpen;
                    let (r, seen) = rule.classify_with_reads(ev);
                    reads = seen;
                    let outcome = match &r {
                        Err(RuleFailure::Capacity(_)) => BreakerOutcome::NotRun,
                        Err(f) if f.counts_toward_breaker() => BreakerOutcome::Broke,
                        _ => BreakerOutcome::Ran,
                    };
                    if entry.breaker.record(outcome, trial) {
                        tracing::warn!(
                            rule = %rule.name,
                            version = %rule.version,
                            failures = entry.breaker.consecutive_failures(),
                            "rule switched off by its circuit breaker"
                        );
                    }
                    if let Err(RuleFailure::Capacity(why)) = &r {
                        // A host limit, not the rule's failure: no policy applies.
                        defer = Some(Deferral {
                            delay: CAPACITY_RETRY,
                            reason: format!("rule {}: {why}", rule.name),
                        });
                        break;
                    }
                    r
                }
            };
            let duration_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
            let before = routes.len();
            let mut violation = None;
            let outcome = match result {
                Ok(verdict) => {
                    let verdict = match verdict {
                        // Routes outside the grant are dropped, the others count.
                        Verdict::Routes(rs) => {
                            let (kept, broke) = rule.scope.split(rs);
                            if let Some(v) = &broke {
                                tracing::warn!(rule = %rule.name, version = %rule.version, event = %ev.event.id, violation = %v, "rule routed outside its grant");
                            }
                            violation = broke;
                            for r in &kept {
                                merge_route(&mut routes, r.clone());
                            }
                            Verdict::Routes(kept)
                        }
                        ignore => ignore,
                    };
                    RuleOutcome::Verdict(verdict)
                }
                Err(failure) => {
                    if !matches!(failure, RuleFailure::Disabled(_)) {
                        tracing::warn!(rule = %rule.name, version = %rule.version, event = %ev.event.id, %failure, "rule failed");
                    }
                    match &entry.policy {
                        FailurePolicy::Skip => {}
                        FailurePolicy::DefaultAgent(agent) => merge_route(
                            &mut routes,
                            Route {
                                agent: agent.clone(),
                                workflow: None,
                                priority: Priority::Medium,
                                reason: format!("rule {} failed: {failure}", rule.name),
                                labels: vec![format!("rule-failed:{}", rule.name)],
                                ordering_key: None,
                                payload: None,
                            },
                        ),
                        FailurePolicy::DeadLetter => {
                            dead_letter.get_or_insert_with(|| {
                                format!("rule {} failed: {failure}", rule.name)
                            });
                        }
                    }
                    RuleOutcome::Failed(failure)
                }
            };
            records.push(RuleRecord {
                rule: rule.name.clone(),
                version: rule.version.clone(),
                outcome,
                violation,
                duration_us,
                reads: reads.fields,
                reads_dropped: reads.dropped,
            });
            if self.merge == MergeMode::First && routes.len() > before {
                break;
            }
        }
        Decision {
            rules: records,
            routes,
            dead_letter,
            defer,
            decided_at_ms: now_ms(),
        }
    }
}

/// Adds a route, merging with an existing one for the same agent and
/// workflow: the higher priority (and its reason) wins, labels are unioned,
/// and the first rule (in rule order) to set an ordering key or a payload
/// keeps it; a later rule's only fills one left unset.
fn merge_route(routes: &mut Vec<Route>, new: Route) {
    match routes
        .iter_mut()
        .find(|r| r.agent == new.agent && r.workflow == new.workflow)
    {
        Some(existing) => {
            if new.priority > existing.priority {
                existing.priority = new.priority;
                existing.reason = new.reason;
            }
            for label in new.labels {
                if !existing.labels.contains(&label) {
                    existing.labels.push(label);
                }
            }
            if existing.ordering_key.is_none() {
                existing.ordering_key = new.ordering_key;
            }
            if existing.payload.is_none() {
                existing.payload = new.payload;
            }
        }
        None => routes.push(new),
    }
}

/// Refuses a rule set whose worst case for one event (every rule at its
/// timeout, one after another) would outlive the lease the event is routed
/// under: another worker would claim it mid-route. Names the keys to change.
pub(crate) fn check_lease<'a>(
    config: &RulesConfig,
    base_dir: &Path,
    rules: impl Iterator<Item = (&'a Rule, &'a Path)> + Clone,
) -> Result<(), LoadError> {
    let worst: Duration = rules.clone().filter_map(|(r, _)| r.timeout).sum();
    let lease = Duration::from_millis(config.lease_ms);
    if worst < lease {
        return Ok(());
    }
    let parts: Vec<_> = rules
        .filter_map(|(r, path)| {
            r.timeout
                .map(|t| format!("{} {} ms ({})", r.name, t.as_millis(), path.display()))
        })
        .collect();
    Err(LoadError::new(
        base_dir,
        None,
        format!(
            "rules.lease_ms = {} is not longer than one event's worst case, {} ms: the sum of \
             the rules' limits.timeout_ms ({}); raise rules.lease_ms or lower the timeouts",
            config.lease_ms,
            worst.as_millis(),
            parts.join(", ")
        ),
    ))
}

/// Parses a manifest into a [`LoadError`] naming the file and key at fault.
pub(crate) fn parse_manifest(path: &Path, text: &str) -> Result<Manifest, LoadError> {
    Manifest::parse(path, text).map_err(|e| LoadError {
        file: e.file.clone(),
        rule: None,
        message: match &e.key {
            Some(k) => format!("{k}: {}", e.message),
            None => e.message.clone(),
        },
    })
}

/// The manifests `config` loads from `dir`, in load order: the ones `load`
/// names, else every `*.toml` directly inside `dir`, by file name.
pub fn manifest_paths(config: &RulesConfig, dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    if let Some(names) = &config.load {
        return names
            .iter()
            .map(|n| {
                let p = dir.join(format!("{n}.toml"));
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(LoadError::new(
                        &p,
                        Some(n),
                        "rules.load names a rule whose manifest does not exist".into(),
                    ))
                }
            })
            .collect();
    }
    let read = std::fs::read_dir(dir)
        .map_err(|e| LoadError::new(dir, None, format!("cannot read the rules directory: {e}")))?;
    let mut paths = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| {
            LoadError::new(dir, None, format!("cannot read the rules directory: {e}"))
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "toml") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}
