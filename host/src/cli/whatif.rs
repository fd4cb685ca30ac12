//! `sluice whatif --rules DIR`: re-run stored events through a candidate rule
//! set and show what would change against the decisions recorded for them:
//! the events whose merged routes differ, grouped by rule and change
//! (`gitlab: +release-manager(high) on 3 events: ...`), so a rule change is
//! reviewed on real traffic before it goes live.
//!
//! The candidate loads as `serve` would load it (the same `[rules]` config,
//! the directory swapped; vectors must pass). It reads the store through its
//! read role, opened read-only: nothing is ever written to it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Serialize;

use super::ConfigArg;
use crate::decision::{Decision, Route, RuleOutcome, Verdict};
use crate::event::ParsedEvent;
use crate::rules::RuleSet;
use crate::rules::wasm::WasmEngine;
use crate::store::sqlite::SqliteStore;
use crate::store::{EventReader, ListFilter};

/// Arguments of `sluice whatif`.
#[derive(Debug, clap::Args)]
pub struct WhatifArgs {
    /// The config file (its store, and the `[rules]` settings the candidate
    /// loads with).
    #[command(flatten)]
    pub config: ConfigArg,
    /// The candidate rules directory (every manifest in it loads).
    #[arg(long, value_name = "DIR")]
    pub rules: PathBuf,
    /// Only events of this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only events received since then: an RFC 3339 time
    /// (`2026-11-30T12:00:00Z`) or a span back from now (`2h`, `3days`).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// At most this many events, newest first (0: all).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub limit: usize,
    /// One JSON document for scripts.
    #[arg(long)]
    pub json: bool,
}

/// What `whatif` found, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The candidate rules: name and version.
    pub candidate: Vec<(String, String)>,
    /// Events re-run (they had a recorded decision).
    pub compared: usize,
    /// Events skipped because no decision is recorded for them yet.
    pub not_routed: Vec<String>,
    /// Events whose merged routes would change, with the changes.
    pub changed: Vec<ChangedEvent>,
    /// The same changes grouped by rule and change.
    pub groups: Vec<Group>,
}

/// One event whose routes would change.
#[derive(Debug, Serialize)]
pub struct ChangedEvent {
    /// The event.
    pub event_id: String,
    /// Its kind.
    pub kind: String,
    /// The merged routes recorded.
    pub before: Vec<Route>,
    /// The merged routes the candidate gives.
    pub after: Vec<Route>,
    /// What changed, per rule.
    pub changes: Vec<Change>,
}

/// One change one rule makes to one event's routes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Change {
    /// The rule (`(merged)` when no single rule's answer explains it).
    pub rule: String,
    /// `+agent(priority)`, `-agent`, `~agent priority low->high`, ...
    pub change: String,
}

/// Events that share one change.
#[derive(Debug, Serialize)]
pub struct Group {
    /// The rule.
    pub rule: String,
    /// The change.
    pub change: String,
    /// The events it moves, newest first.
    pub events: Vec<String>,
}

/// Runs `sluice whatif`.
pub async fn run(args: WhatifArgs) -> anyhow::Result<()> {
    let mut config = args.config.load()?;
    let db = super::events::db_path(&config)?;
    super::use_rules_dir(&mut config, &args.rules)?;
    let since_ms = args.since.as_deref().map(parse_since).transpose()?;
    let cache = config.rules.cache_dir(&config.base_dir, config.data_dir());
    let engine = WasmEngine::with_pool(Some(cache), &config.rules.pool)?;
    let set = RuleSet::load(&config.rules, &config.base_dir, &engine)
        .with_context(|| format!("candidate rules in {}", args.rules.display()))?;
    let reader = SqliteStore::open_read_only(&db)?;
    let filter = ListFilter {
        source: args.source.clone(),
        since_ms,
        limit: args.limit,
        ..Default::default()
    };
    let report = compare(&reader, &set, &filter).await?;
    super::emit(args.json, &report, |out| print(&report, out))?;
    Ok(())
}

/// Re-runs the events `filter` selects through `set` and compares each new
/// decision with the recorded one. Reads only.
pub async fn compare(
    reader: &dyn EventReader,
    set: &RuleSet,
    filter: &ListFilter,
) -> anyhow::Result<Report> {
    let mut report = Report {
        candidate: set
            .rules()
            .map(|r| (r.name().to_owned(), r.version().to_owned()))
            .collect(),
        compared: 0,
        not_routed: Vec::new(),
        changed: Vec::new(),
        groups: Vec::new(),
    };
    for summary in reader.list(filter).await? {
        let Some(record) = reader.get(&summary.id).await? else {
            continue; // gone since the listing
        };
        let Some(before) = record.decision else {
            report.not_routed.push(summary.id);
            continue;
        };
        report.compared += 1;
        let ev = Arc::new(ParsedEvent::new(record.event));
        let after = set.route(&ev);
        if let Some(changed) = diff_event(&summary.id, &summary.kind, &before, &after) {
            report.changed.push(changed);
        }
    }
    let mut groups: BTreeMap<&Change, Vec<String>> = BTreeMap::new();
    for c in &report.changed {
        for change in &c.changes {
            groups.entry(change).or_default().push(c.event_id.clone());
        }
    }
    report.groups = groups
        .into_iter()
        .map(|(c, events)| Group {
            rule: c.rule.clone(),
            change: c.change.clone(),
            events,
        })
        .collect();
    Ok(report)
}

/// What routes are compared by: agent and workflow, with priority and labels
/// (a route's reason is prose and may change freely).
type RouteKey = (String, Option<String>);
type RouteValue = (crate::decision::Priority, BTreeSet<String>);

fn keyed(routes: &[Route]) -> BTreeMap<RouteKey, RouteValue> {
    routes
        .iter()
        .map(|r| {
            (
                (r.agent.clone(), r.workflow.clone()),
                (r.priority, r.labels.iter().cloned().collect()),
            )
        })
        .collect()
}

fn diff_event(id: &str, kind: &str, before: &Decision, after: &Decision) -> Option<ChangedEvent> {
    let (old, new) = (keyed(&before.routes), keyed(&after.routes));
    let dead_letter_changed = before.dead_letter.is_some() != after.dead_letter.is_some();
    if old == new && !dead_letter_changed {
        return None;
    }
    let mut changes = Vec::new();
    let mut rules: Vec<&str> = before.rules.iter().map(|r| r.rule.as_str()).collect();
    for r in &after.rules {
        if !rules.contains(&r.rule.as_str()) {
            rules.push(&r.rule);
        }
    }
    for rule in rules {
        let outcome = |d: &Decision| {
            d.rules
                .iter()
                .find(|r| r.rule == rule)
                .map(|r| r.outcome.clone())
        };
        let (was, now) = (outcome(before), outcome(after));
        let routes_of = |o: &Option<RuleOutcome>| match o {
            Some(RuleOutcome::Verdict(Verdict::Routes(rs))) => keyed(rs),
            _ => BTreeMap::new(),
        };
        for change in route_changes(&routes_of(&was), &routes_of(&now)) {
            changes.push(Change {
                rule: rule.to_owned(),
                change,
            });
        }
        let failed = |o: &Option<RuleOutcome>| match o {
            Some(RuleOutcome::Failed(f)) => Some(f.kind()),
            _ => None,
        };
        match (failed(&was), failed(&now)) {
            (None, Some(kind)) => changes.push(Change {
                rule: rule.to_owned(),
                change: format!("now fails ({kind})"),
            }),
            (Some(kind), None) => changes.push(Change {
                rule: rule.to_owned(),
                change: format!("no longer fails ({kind})"),
            }),
            _ => {}
        }
    }
    if changes.is_empty() || dead_letter_changed {
        // A failure policy or the merge explains it, not one rule's answer.
        let mut merged = route_changes(&old, &new);
        if dead_letter_changed {
            merged.push(if after.dead_letter.is_some() {
                "+dead-letter".to_owned()
            } else {
                "-dead-letter".to_owned()
            });
        }
        changes.extend(merged.into_iter().map(|change| Change {
            rule: "(merged)".to_owned(),
            change,
        }));
    }
    Some(ChangedEvent {
        event_id: id.to_owned(),
        kind: kind.to_owned(),
        before: before.routes.clone(),
        after: after.routes.clone(),
        changes,
    })
}

fn route_changes(
    old: &BTreeMap<RouteKey, RouteValue>,
    new: &BTreeMap<RouteKey, RouteValue>,
) -> Vec<String> {
    let name = |(agent, workflow): &RouteKey| match workflow {
        Some(w) => format!("{agent}/{w}"),
        None => agent.clone(),
    };
    let mut out = Vec::new();
    for (key, (p, _)) in new {
        if !old.contains_key(key) {
            out.push(format!("+{}({})", name(key), p.as_str()));
        }
    }
    for key in old.keys() {
        if !new.contains_key(key) {
            out.push(format!("-{}", name(key)));
        }
    }
    for (key, (p_old, l_old)) in old {
        let Some((p_new, l_new)) = new.get(key) else {
            continue;
        };
        if p_old != p_new {
            out.push(format!(
                "~{} priority {}->{}",
                name(key),
                p_old.as_str(),
                p_new.as_str()
            ));
        }
        let added: Vec<_> = l_new.difference(l_old).map(String::as_str).collect();
        let removed: Vec<_> = l_old.difference(l_new).map(String::as_str).collect();
        if !added.is_empty() || !removed.is_empty() {
            let mut parts = Vec::new();
            if !added.is_empty() {
                parts.push(format!("+[{}]", added.join(", ")));
            }
            if !removed.is_empty() {
                parts.push(format!("-[{}]", removed.join(", ")));
            }
            out.push(format!("~{} labels {}", name(key), parts.join(" ")));
        }
    }
    out
}

/// `--since`: an RFC 3339 time, or a span back from now.
pub(crate) fn parse_since(s: &str) -> anyhow::Result<i64> {
    let at = match humantime::parse_rfc3339_weak(s) {
        Ok(t) => t,
        Err(_) => match humantime::parse_duration(s) {
            Ok(span) => SystemTime::now().checked_sub(span).unwrap_or(UNIX_EPOCH),
            Err(_) => bail!(
                "--since {s:?}: expected an RFC 3339 time (2026-11-30T12:00:00Z) or a span (2h, 3days)"
            ),
        },
    };
    let ms = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis();
    Ok(i64::try_from(ms).unwrap_or(i64::MAX))
}

fn print(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    let rules: Vec<_> = r
        .candidate
        .iter()
        .map(|(n, v)| format!("{n}@{v}"))
        .collect();
    writeln!(out, "candidate rules: {}", rules.join(", "))?;
    write!(
        out,
        "{} events compared, {} would route differently",
        r.compared,
        r.changed.len()
    )?;
    if r.not_routed.is_empty() {
        writeln!(out)?;
    } else {
        writeln!(out, " ({} not routed yet, skipped)", r.not_routed.len())?;
    }
    for g in &r.groups {
        let n = g.events.len();
        writeln!(
            out,
            "{}: {} on {n} event{}: {}",
            g.rule,
            g.change,
            if n == 1 { "" } else { "s" },
            g.events.join(", ")
        )?;
    }
    Ok(())
}
