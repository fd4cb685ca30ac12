//! rhai script rules: the same contract as components, for rules that are a
//! few lines of routing table. A script defines `fn classify(event)` and
//! returns an array of route maps
//! (`#{agent: "x", priority: "high", workflow: (), reason: "..", labels: ["k:v"]}`),
//! `#{ignore: "reason"}`, or `()` for no routes; `throw` is a rule error.
//! A route map may also carry what interface 0.2.0 added to routes:
//! `ordering_key: "owner/repo#42"` and `payload: #{...}` (any value, sent to
//! the agent as JSON instead of the event's body).
//!
//! Each rule gets its own `rhai::Engine` carrying its limits (operations,
//! call depth, string/array/map sizes, expression depth, a wall-clock
//! deadline) and its AST is compiled once per version. This module must never
//! give a script `eval`, module imports, files or any host access beyond the
//! event, its config values and logging.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use rhai::{
    AST, CallFnOptions, Dynamic, EvalAltResult, ImmutableString, OptimizationLevel, Position, Scope,
};

use crate::decision::{Priority, Route, RuleFailure, Verdict};
use crate::event::ParsedEvent;
use crate::rules::config::Limits;
use crate::rules::log::{CallLog, RuleLog};
use crate::rules::output::{self, truncate};
use crate::rules::reads::{ReadLog, Reads};

/// How often (in operations) the wall-clock deadline is checked.
const DEADLINE_CHECK_EVERY: u64 = 256;

thread_local! {
    /// The deadline of the call running on this thread (a rule call never
    /// leaves its thread, so the progress callback reads it here).
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The log of the call running on this thread, which `print` and
    /// `debug` write through.
    static CALL_LOG: RefCell<Option<CallLog>> = const { RefCell::new(None) };
    /// The event fields the call running on this thread has read.
    static READS: RefCell<ReadLog> = const { RefCell::new(ReadLog::new()) };
}

/// A compiled rhai rule.
pub struct RhaiRule {
    name: Arc<str>,
    engine: rhai::Engine,
    ast: AST,
    limits: Limits,
    log: Arc<RuleLog>,
}

impl std::fmt::Debug for RhaiRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RhaiRule")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The event as a script sees it (type name `Event`).
#[derive(Debug, Clone)]
pub struct ScriptEvent(Arc<ParsedEvent>);

impl RhaiRule {
    /// Compiles `script` for the rule `name` with these limits and config values.
    pub fn compile(
        name: &str,
        script: &str,
        limits: &Limits,
        config: BTreeMap<String, String>,
    ) -> anyhow::Result<RhaiRule> {
        let log = RuleLog::new(name.into());
        let engine = build_engine(&log, limits, config);
        let ast = match engine.compile(script) {
            Ok(ast) => ast,
            Err(e) => bail!("{e}"),
        };
        if !ast
            .iter_functions()
            .any(|f| f.name == "classify" && f.params.len() == 1)
        {
            bail!("the script defines no `fn classify(event)`");
        }
        Ok(RhaiRule {
            name: name.into(),
            engine,
            ast,
            limits: limits.clone(),
            log,
        })
    }

    /// Classifies one event.
    pub fn classify(&self, ev: &Arc<ParsedEvent>) -> Result<Verdict, RuleFailure> {
        self.classify_with_reads(ev).0
    }

    /// Classifies one event, and says which event fields the script read
    /// (also when it failed).
    pub fn classify_with_reads(
        &self,
        ev: &Arc<ParsedEvent>,
    ) -> (Result<Verdict, RuleFailure>, Reads) {
        READS.with_borrow_mut(ReadLog::take);
        let timeout = Duration::from_millis(self.limits.timeout_ms);
        DEADLINE.set(Some(Instant::now() + timeout));
        CALL_LOG.set(Some(self.log.call()));
        let mut scope = Scope::new();
        // The top level is not re-run per event: a rule is its functions.
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        let result = self.engine.call_fn_with_options::<Dynamic>(
            options,
            &mut scope,
            &self.ast,
            "classify",
            (ScriptEvent(ev.clone()),),
        );
        DEADLINE.set(None);
        // Dropping the call's log counts (and may report) what it dropped.
        drop(CALL_LOG.take());
        let reads = READS.with_borrow_mut(ReadLog::take);
        let result = match result {
            Ok(value) => verdict(&self.name, value),
            Err(e) => Err(self.failure(*e)),
        };
        (result, reads)
    }

    fn failure(&self, e: EvalAltResult) -> RuleFailure {
        match e {
            EvalAltResult::ErrorInFunctionCall(_, _, inner, _)
            | EvalAltResult::ErrorInModule(_, inner, _) => self.failure(*inner),
            EvalAltResult::ErrorTooManyOperations(pos) => RuleFailure::Timeout(format!(
                "ran more than {} operations{}",
                self.limits.max_operations,
                at(pos)
            )),
            EvalAltResult::ErrorTerminated(_, pos) => RuleFailure::Timeout(format!(
                "no answer within {} ms{}",
                self.limits.timeout_ms,
                at(pos)
            )),
            EvalAltResult::ErrorStackOverflow(pos) => RuleFailure::Trap(format!(
                "stack overflow: more than {} nested calls{}",
                self.limits.max_call_levels,
                at(pos)
            )),
            EvalAltResult::ErrorDataTooLarge(what, pos) => {
                RuleFailure::Memory(format!("{what} exceeds its limit{}", at(pos)))
            }
            EvalAltResult::ErrorRuntime(value, pos) => {
                let message = value
                    .into_immutable_string()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|t| t.to_owned());
                RuleFailure::Guest(format!(
                    "{}{}",
                    truncate(&message, output::MAX_ERROR),
                    at(pos)
                ))
            }
            other => {
                RuleFailure::Trap(truncate(&other.to_string(), output::MAX_ERROR).into_owned())
            }
        }
    }
}

fn at(pos: Position) -> String {
    if pos.is_none() {
        String::new()
    } else {
        format!(" (line {})", pos.line().unwrap_or(0))
    }
}

/// A rhai engine with the rule's limits, its config values and the `Event` type.
fn build_engine(
    log: &Arc<RuleLog>,
    limits: &Limits,
    config: BTreeMap<String, String>,
) -> rhai::Engine {
    let mut engine = rhai::Engine::new();
    engine
        .set_optimization_level(OptimizationLevel::Simple)
        .set_max_operations(limits.max_operations)
        .set_max_call_levels(limits.max_call_levels)
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(limits.max_array_size)
        .set_max_map_size(limits.max_map_size)
        .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth)
        // No string interner: rhai would otherwise hash every string a call
        // binds with `let` or builds by interpolation into one cache behind a
        // write lock that all the rule's concurrent calls share, and evict
        // from it by a scan once it is full; events' strings rarely repeat.
        .set_max_strings_interned(0)
        .disable_symbol("eval");

    engine.on_progress(|ops| {
        if ops % DEADLINE_CHECK_EVERY == 0
            && let Some(deadline) = DEADLINE.get()
            && Instant::now() >= deadline
        {
            return Some(Dynamic::from("deadline"));
        }
        None
    });
    let l = log.clone();
    engine.on_print(move |s| write_log(&l, tracing::Level::INFO, s, &[]));
    let l = log.clone();
    engine.on_debug(move |s, _src, pos| {
        let line = pos.line().unwrap_or(0).to_string();
        write_log(&l, tracing::Level::DEBUG, s, &[("line", line.as_str())]);
    });

    let config = Arc::new(config);
    engine.register_fn("config", move |key: &str| -> Dynamic {
        config
            .get(key)
            .map(|v| Dynamic::from(v.clone()))
            .unwrap_or(Dynamic::UNIT)
    });

    engine
        .register_type_with_name::<ScriptEvent>("Event")
        .register_get("id", |e: &mut ScriptEvent| {
            read_text("id", Some(&e.0.event.id));
            ImmutableString::from(e.0.event.id.as_str())
        })
        .register_get("source", |e: &mut ScriptEvent| {
            read_text("source", Some(&e.0.event.source));
            ImmutableString::from(e.0.event.source.as_str())
        })
        .register_get("provider", |e: &mut ScriptEvent| {
            read_text("provider", Some(e.0.event.provider.as_str()));
            ImmutableString::from(e.0.event.provider.as_str())
        })
        .register_get("kind", |e: &mut ScriptEvent| {
            read_text("kind", Some(&e.0.event.kind));
            ImmutableString::from(e.0.event.kind.as_str())
        })
        .register_get("action", |e: &mut ScriptEvent| {
            read_text("action", e.0.event.action.as_deref());
            e.0.event
                .action
                .as_deref()
                .map(|a| Dynamic::from(ImmutableString::from(a)))
                .unwrap_or(Dynamic::UNIT)
        })
        .register_get("delivery_id", |e: &mut ScriptEvent| {
            read_text("delivery_id", Some(&e.0.event.delivery_id));
            ImmutableString::from(e.0.event.delivery_id.as_str())
        })
        .register_get("received_at", |e: &mut ScriptEvent| {
            READS.with_borrow_mut(|r| r.number("received_at", e.0.event.received_at_ms));
            e.0.event.received_at_ms
        })
        .register_get("body", |e: &mut ScriptEvent| {
            READS.with_borrow_mut(|r| r.withheld("body"));
            String::from_utf8_lossy(&e.0.event.body).into_owned()
        })
        .register_fn("header", |e: &mut ScriptEvent, name: &str| {
            let value = e.0.event.header(name);
            READS.with_borrow_mut(|r| r.header(name, value.is_some()));
            value
                .map(|v| Dynamic::from(v.to_owned()))
                .unwrap_or(Dynamic::UNIT)
        })
        .register_fn("get", |e: &mut ScriptEvent, pointer: &str| -> Dynamic {
            let found = e.0.get(pointer);
            READS.with_borrow_mut(|r| r.json(pointer, found.as_deref()));
            found
                .as_deref()
                .map(json_to_dynamic)
                .unwrap_or(Dynamic::UNIT)
        });
    engine
}

/// Notes that the running call read an event field through its accessor.
fn read_text(field: &'static str, value: Option<&str>) {
    READS.with_borrow_mut(|r| r.text(field, value));
}

/// Writes a `print`/`debug` line through the running call's log (or, outside
/// a call, through a log of its own).
fn write_log(log: &Arc<RuleLog>, level: tracing::Level, message: &str, fields: &[(&str, &str)]) {
    CALL_LOG.with_borrow_mut(|call| match call {
        Some(call) => call.write(level, message, fields),
        None => log.call().write(level, message, fields),
    });
}

/// A JSON value as a rhai value: null → `()`, numbers → int or float,
/// arrays → arrays, objects → object maps.
fn json_to_dynamic(v: &serde_json::Value) -> Dynamic {
    use serde_json::Value as J;
    match v {
        J::Null => Dynamic::UNIT,
        J::Bool(b) => Dynamic::from_bool(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Dynamic::from(ImmutableString::from(s.as_str())),
        J::Array(a) => Dynamic::from_array(a.iter().map(json_to_dynamic).collect()),
        J::Object(o) => Dynamic::from_map(
            o.iter()
                .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
                .collect(),
        ),
    }
}

/// Converts a script's answer into a verdict, rejecting anything malformed.
/// The answer is taken apart, never copied: it is the script's last use of it.
/// A payload that has no JSON form is an output failure naming `rule` and
/// the route's agent.
fn verdict(rule: &str, value: Dynamic) -> Result<Verdict, RuleFailure> {
    let bad = |m: String| RuleFailure::Trap(format!("bad answer: {m}"));
    if value.is_unit() {
        return Ok(Verdict::Routes(Vec::new()));
    }
    if value.is_map() {
        let mut map = value.cast::<rhai::Map>();
        if map.len() != 1 && map.contains_key("ignore") {
            return Err(bad("#{ignore: ..} takes no other keys".into()));
        }
        let Some(reason) = map.remove("ignore") else {
            return Err(bad(
                "a map answer must be #{ignore: \"reason\"}; routes go in an array".into(),
            ));
        };
        let reason = reason
            .into_immutable_string()
            .map_err(|t| bad(format!("ignore reason is a {t}, not a string")))?;
        return Ok(Verdict::Ignore(
            truncate(&reason, output::MAX_REASON).into_owned(),
        ));
    }
    if !value.is_array() {
        return Err(bad(format!(
            "expected an array of routes or #{{ignore: ..}}, got {}",
            value.type_name()
        )));
    }
    let items = value.cast::<rhai::Array>();
    if items.len() > output::MAX_ROUTES {
        return Err(RuleFailure::Trap(format!(
            "answer too large: {} routes (the limit is {})",
            items.len(),
            output::MAX_ROUTES
        )));
    }
    let routes = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let (mut route, payload) = route(item).map_err(|m| bad(format!("route {i}: {m}")))?;
            if let Some(payload) = payload {
                route.payload = Some(payload_json(rule, &route.agent, &payload)?);
            }
            Ok(route)
        })
        .collect::<Result<Vec<_>, RuleFailure>>()?;
    output::bound(routes).map(Verdict::Routes)
}

/// A route's `payload` value as JSON (rhai's serde form: maps → objects,
/// arrays → arrays, `()` → null). A value with no JSON form (a function
/// pointer, an event) fails the answer.
fn payload_json(rule: &str, agent: &str, v: &Dynamic) -> Result<serde_json::Value, RuleFailure> {
    rhai::serde::from_dynamic::<serde_json::Value>(v).map_err(|e| {
        RuleFailure::Output(format!(
            "rule {rule}, route to agent {}: payload has no JSON form: {e}",
            truncate(agent, output::MAX_NAME)
        ))
    })
}

/// One route map, and its `payload` value still as the script made it.
fn route(item: Dynamic) -> Result<(Route, Option<Dynamic>), String> {
    let type_name = item.type_name();
    let Some(map) = item.try_cast::<rhai::Map>() else {
        return Err(format!("expected a map, got {type_name}"));
    };
    let string = |key: &str, v: Dynamic| -> Result<String, String> {
        v.into_immutable_string()
            .map(String::from)
            .map_err(|t| format!("{key} is a {t}, not a string"))
    };
    let mut route = Route {
        agent: String::new(),
        workflow: None,
        priority: Priority::Medium,
        reason: String::new(),
        labels: Vec::new(),
        ordering_key: None,
        payload: None,
    };
    let mut has_agent = false;
    let mut payload = None;
    for (key, v) in map {
        match key.as_str() {
            "agent" => {
                route.agent = string("agent", v)?;
                has_agent = true;
            }
            "workflow" if v.is_unit() => {}
            "workflow" => route.workflow = Some(string("workflow", v)?),
            "priority" => {
                let p = v
                    .into_immutable_string()
                    .map_err(|t| format!("priority is a {t}, not a string"))?;
                route.priority = Priority::parse(&p).ok_or_else(|| {
                    format!("priority {p:?} is not one of critical, high, medium, low")
                })?;
            }
            "reason" => route.reason = string("reason", v)?,
            "labels" => {
                let labels = v
                    .try_cast::<rhai::Array>()
                    .ok_or("labels is not an array")?;
                route.labels = labels
                    .into_iter()
                    .map(|l| string("label", l))
                    .collect::<Result<_, _>>()?;
            }
            "ordering_key" if v.is_unit() => {}
            "ordering_key" => route.ordering_key = Some(string("ordering_key", v)?),
            "payload" if v.is_unit() => {}
            "payload" => payload = Some(v),
            other => {
                return Err(format!(
                    "unknown key {other:?} (known: agent, workflow, priority, reason, labels, \
                     ordering_key, payload)"
                ));
            }
        }
    }
    if !has_agent {
        return Err("missing agent".into());
    }
    Ok((route, payload))
}
