//! A rule's test vectors, one at a time: build the event a vector describes,
//! run the rule on it and compare the answer with what the vector expects.
//!
//! Loading (which stops at the first failing vector) and `sluice rules test`
//! (which runs them all and prints a diff) share this one runner, so both
//! judge a vector the same way. It never touches the store or the network.

use std::path::Path;
use std::sync::Arc;

use crate::decision::{Route, Verdict};
use crate::event::{Event, ParsedEvent, Provider};
use crate::rules::Rule;
use crate::rules::manifest::{ExpectedRoute, TestVector};

/// What one vector did.
#[derive(Debug, Clone)]
pub enum VectorResult {
    /// The rule answered as expected.
    Pass,
    /// The rule answered, but not as expected.
    Mismatch {
        /// What the vector expects, in words (`routes [a (high)]`, `an ignore`).
        expected: String,
        /// What the rule answered.
        got: Verdict,
    },
    /// The vector could not run (unreadable payload, a bad `set`, no
    /// provider) or the rule failed on it.
    Error(String),
}

impl VectorResult {
    /// Whether the vector passed.
    pub fn passed(&self) -> bool {
        matches!(self, VectorResult::Pass)
    }
}

/// Runs one vector; `dir` is the manifest's directory (payload paths are
/// relative to it).
pub fn run(rule: &Rule, t: &TestVector, dir: &Path) -> VectorResult {
    let path = dir.join(&t.event);
    let body = match std::fs::read(&path) {
        Ok(body) => body,
        Err(e) => return VectorResult::Error(format!("cannot read {}: {e}", path.display())),
    };
    let body = match t.payload(body) {
        Ok(body) => body,
        Err(e) => return VectorResult::Error(e),
    };
    let Some(provider) = t
        .provider
        .as_deref()
        .and_then(Provider::parse)
        .or_else(|| rule.providers().first().copied())
    else {
        return VectorResult::Error("no provider".into());
    };
    let ev = Event::dry_run(
        provider.as_str(),
        provider,
        &t.kind,
        t.action.clone(),
        body.into(),
    );
    // The host never calls a rule for a kind outside its grant, so such a
    // vector is judged as live traffic would be: no routes, without a call.
    // One that expects routes could never be met. (Sources are not checked:
    // a vector names a provider, not the operator's source name.)
    if !rule.scope().kinds.allows(&t.kind) {
        return if t.expect_ignore || t.expect.is_empty() {
            VectorResult::Pass
        } else {
            VectorResult::Error(format!(
                "{}: expects routes, but the rule is never called for kind {:?}, outside its grants.kinds",
                t.event.display(),
                t.kind
            ))
        };
    }
    let ev = Arc::new(ParsedEvent::new(ev));
    let got = match rule.classify(&ev) {
        Ok(got) => got,
        Err(f) => return VectorResult::Error(format!("{} failed: {f}", t.event.display())),
    };
    // A vector is held to the rule's grant, as live events are.
    if let Verdict::Routes(routes) = &got
        && let (_, Some(violation)) = rule.scope().split(routes.clone())
    {
        return VectorResult::Error(format!("{}: {violation}", t.event.display()));
    }
    match (&got, t.expect_ignore) {
        (Verdict::Ignore(_), true) => VectorResult::Pass,
        (Verdict::Routes(routes), false) if matches(&t.expect, routes) => VectorResult::Pass,
        _ => VectorResult::Mismatch {
            expected: if t.expect_ignore {
                "an ignore".to_owned()
            } else {
                describe_expected(&t.expect)
            },
            got,
        },
    }
}

/// Whether `routes` are exactly the expected ones, in any order: the same
/// number, each expected agent present with the priority, workflow and labels
/// the vector names (a route may carry more labels).
pub fn matches(expect: &[ExpectedRoute], routes: &[Route]) -> bool {
    if expect.len() != routes.len() {
        return false;
    }
    let mut used = vec![false; routes.len()];
    expect.iter().all(|e| {
        let found = routes
            .iter()
            .enumerate()
            .find(|(j, r)| !used[*j] && route_matches(e, r));
        found.map(|(j, _)| used[j] = true).is_some()
    })
}

/// Whether one route satisfies one expected route.
pub fn route_matches(e: &ExpectedRoute, r: &Route) -> bool {
    r.agent == e.agent
        && e.priority.is_none_or(|p| p == r.priority)
        && e.workflow
            .as_ref()
            .is_none_or(|w| r.workflow.as_ref() == Some(w))
        && e.labels.iter().all(|l| r.labels.contains(l))
}

/// The expected routes in words.
pub fn describe_expected(expect: &[ExpectedRoute]) -> String {
    let parts: Vec<_> = expect
        .iter()
        .map(|e| {
            let route = match e.priority {
                Some(p) => format!("{} ({})", e.agent, p.as_str()),
                None => e.agent.clone(),
            };
            if e.labels.is_empty() {
                route
            } else {
                format!("{route} with labels {:?}", e.labels)
            }
        })
        .collect();
    if parts.is_empty() {
        "no routes".into()
    } else {
        format!("routes [{}]", parts.join(", "))
    }
}

/// A verdict in words.
pub fn describe(v: &Verdict) -> String {
    match v {
        Verdict::Ignore(r) => format!("ignore ({r})"),
        Verdict::Routes(rs) if rs.is_empty() => "no routes".into(),
        Verdict::Routes(rs) => {
            let parts: Vec<_> = rs
                .iter()
                .map(|r| match r.labels.as_slice() {
                    [] => format!("{} ({})", r.agent, r.priority.as_str()),
                    labels => format!("{} ({}) {labels:?}", r.agent, r.priority.as_str()),
                })
                .collect();
            format!("routes [{}]", parts.join(", "))
        }
    }
}
