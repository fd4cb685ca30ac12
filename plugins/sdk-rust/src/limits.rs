//! The host's bounds on what a rule may answer, and the clamp that keeps an
//! answer inside them.
//!
//! The host checks every answer against the same numbers
//! (`host/src/rules/output.rs`; a host test reads this file and fails when
//! the two sides disagree). An over-long label turns the host's view of the
//! whole answer into a failure, which costs the event all of its routes and
//! counts toward the rule's circuit breaker. So [`export_rule!`] passes every
//! answer through [`clamp_answer`] before it leaves the component: text that
//! only describes a route (labels, reasons, error messages) is cut at a
//! character boundary, and labels past [`MAX_LABELS`] are dropped.
//!
//! What decides *where* an event goes, or what the agent gets, is never cut:
//! an over-long agent or workflow name or ordering key, a payload over
//! [`MAX_PAYLOAD`], or more than [`MAX_ROUTES`] routes, still reaches the host
//! unchanged and is reported as the rule's failure, because delivering to a
//! truncated name or to a silently chosen subset of routes would be wrong.
//!
//! [`export_rule!`]: crate::export_rule

use crate::{Decision, Route};

/// Most routes one rule may return for one event.
pub const MAX_ROUTES: usize = 64;
/// Longest agent or workflow name, in bytes.
pub const MAX_NAME: usize = 128;
/// Longest reason kept (an ignore's or a route's), in bytes.
pub const MAX_REASON: usize = 1024;
/// Most labels per route.
pub const MAX_LABELS: usize = 32;
/// Longest label, in bytes.
pub const MAX_LABEL: usize = 256;
/// Longest error message kept from a rule, in bytes.
pub const MAX_ERROR: usize = 1024;
/// Longest ordering key, in bytes (as long as a label). Never cut: a longer
/// key fails the answer on the host.
pub const MAX_ORDERING_KEY: usize = 256;
/// Largest payload per route, in bytes of JSON text. Never cut: a larger one
/// fails the answer on the host.
pub const MAX_PAYLOAD: usize = 16_384;
/// Longest log message the host keeps, in bytes.
pub const MAX_LOG_MESSAGE: usize = 1024;
/// Most fields per log line the host keeps.
pub const MAX_LOG_FIELDS: usize = 16;
/// Longest log field name the host keeps, in bytes.
pub const MAX_LOG_FIELD_KEY: usize = 64;
/// Longest log field value the host keeps, in bytes.
pub const MAX_LOG_FIELD_VALUE: usize = 256;

/// The marker a cut string ends with, as on the host.
const ELLIPSIS: char = '…';

/// Cut `s` to at most `max` bytes on a character boundary, ending it with
/// `…` so a reader sees it was cut; shorter strings are left alone.
pub fn truncate(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max.saturating_sub(ELLIPSIS.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    if max >= ELLIPSIS.len_utf8() {
        s.push(ELLIPSIS);
    }
}

/// `route` with its reason and labels inside the bounds.
pub fn clamp_route(mut route: Route) -> Route {
    truncate(&mut route.reason, MAX_REASON);
    route.labels.truncate(MAX_LABELS);
    for label in &mut route.labels {
        truncate(label, MAX_LABEL);
    }
    route
}

/// `decision` with every reason and label inside the bounds.
pub fn clamp(decision: Decision) -> Decision {
    match decision {
        Decision::Routes(routes) => Decision::Routes(routes.into_iter().map(clamp_route).collect()),
        Decision::Ignore(mut reason) => {
            truncate(&mut reason, MAX_REASON);
            Decision::Ignore(reason)
        }
    }
}

/// What a component emits for a rule's answer: [`clamp`] on a decision,
/// an error message cut to [`MAX_ERROR`].
pub fn clamp_answer(answer: Result<Decision, String>) -> Result<Decision, String> {
    match answer {
        Ok(decision) => Ok(clamp(decision)),
        Err(mut message) => {
            truncate(&mut message, MAX_ERROR);
            Err(message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Priority;

    #[test]
    fn truncate_cuts_on_a_char_boundary_within_the_limit() {
        let mut s = "é".repeat(200);
        truncate(&mut s, MAX_LABEL);
        assert!(s.len() <= MAX_LABEL && s.ends_with('…'), "{s}");
        // 'é' is 2 bytes and '…' 3: 126 of them fit before the marker.
        assert_eq!(s.trim_end_matches('…').chars().count(), 126);
        let mut short = String::from("short");
        truncate(&mut short, 5);
        assert_eq!(short, "short");
    }

    #[test]
    fn clamp_keeps_routes_and_cuts_only_descriptive_text() {
        let long = "x".repeat(5_000);
        let labels = (0..40).map(|i| format!("l{i}:{long}"));
        let mut route = Route::to("coordinator")
            .priority(Priority::Critical)
            .reason(long.clone());
        for l in labels {
            route = route.label(l);
        }
        let d = clamp(Decision::routes([route.clone(), Route::to("other")]));
        let routes = d.as_routes();
        assert_eq!(routes.len(), 2);
        let r = &routes[0];
        assert_eq!(
            (r.agent.as_str(), r.priority),
            ("coordinator", Priority::Critical)
        );
        assert!(r.reason.len() <= MAX_REASON && r.reason.ends_with('…'));
        assert_eq!(r.labels.len(), MAX_LABELS);
        assert!(r.labels.iter().all(|l| l.len() <= MAX_LABEL));
        assert!(r.labels[3].starts_with("l3:xxx"));
        assert_eq!(routes[1], Route::to("other"));

        let ignored = clamp(Decision::ignore(long.clone()));
        assert!(ignored.ignore_reason().unwrap().len() <= MAX_REASON);
        let err = clamp_answer(Err(long)).unwrap_err();
        assert!(err.len() <= MAX_ERROR);
    }

    #[test]
    fn names_are_never_cut() {
        let name = "a".repeat(MAX_NAME + 10);
        let d = clamp(Route::to(name.clone()).workflow(name.clone()).into());
        assert_eq!(d.as_routes()[0].agent, name);
        assert_eq!(d.as_routes()[0].workflow.as_deref(), Some(name.as_str()));
    }
}
