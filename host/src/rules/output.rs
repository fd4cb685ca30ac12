//! The bounds on what a rule may answer: how many routes, how long names,
//! reasons and labels may be. Applied on the host after every call, whatever
//! the guest's language, so a rule can never hand the store or the
//! dispatcher an unbounded decision.
//!
//! This module only checks and trims values; it never runs a rule.

use std::borrow::Cow;

use crate::decision::{Route, RuleFailure};

/// Most routes one rule may return for one event.
pub const MAX_ROUTES: usize = 64;
/// Longest agent or workflow name, in bytes.
pub const MAX_NAME: usize = 128;
/// Longest reason kept (longer ones are truncated), in bytes.
pub const MAX_REASON: usize = 1024;
/// Most labels per route.
pub const MAX_LABELS: usize = 32;
/// Longest label, in bytes.
pub const MAX_LABEL: usize = 256;
/// Longest error message kept from a rule, in bytes.
pub const MAX_ERROR: usize = 1024;

/// `s` cut to at most `max` bytes on a character boundary, marked with `…`.
pub fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &s[..end]))
}

/// Checks a rule's routes against the bounds: too many routes, an empty or
/// over-long agent or workflow name, or too many or over-long labels make the
/// answer a failure (routing on a silently cut answer would be wrong);
/// over-long reasons are only truncated. Such an answer is its own failure
/// kind, [`RuleFailure::Output`], not a trap.
pub fn bound(mut routes: Vec<Route>) -> Result<Vec<Route>, RuleFailure> {
    if routes.len() > MAX_ROUTES {
        return Err(RuleFailure::Output(format!(
            "answer too large: {} routes (the limit is {MAX_ROUTES})",
            routes.len()
        )));
    }
    for (i, r) in routes.iter_mut().enumerate() {
        if r.agent.trim().is_empty() {
            return Err(RuleFailure::Output(format!("route {i}: empty agent name")));
        }
        if r.agent.len() > MAX_NAME {
            return Err(RuleFailure::Output(format!(
                "route {i}: agent name of {} bytes (the limit is {MAX_NAME})",
                r.agent.len()
            )));
        }
        if let Some(w) = &r.workflow
            && (w.is_empty() || w.len() > MAX_NAME)
        {
            return Err(RuleFailure::Output(format!(
                "route {i}: workflow name of {} bytes (1 to {MAX_NAME} allowed)",
                w.len()
            )));
        }
        if r.labels.len() > MAX_LABELS {
            return Err(RuleFailure::Output(format!(
                "route {i}: {} labels (the limit is {MAX_LABELS})",
                r.labels.len()
            )));
        }
        if let Some(l) = r.labels.iter().find(|l| l.len() > MAX_LABEL) {
            return Err(RuleFailure::Output(format!(
                "route {i}: a label of {} bytes (the limit is {MAX_LABEL})",
                l.len()
            )));
        }
        if r.reason.len() > MAX_REASON {
            r.reason = truncate(&r.reason, MAX_REASON).into_owned();
        }
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_cuts_on_a_char_boundary_within_the_limit() {
        assert_eq!(truncate("short", 10), "short");
        let s = "é".repeat(100);
        let t = truncate(&s, 11);
        assert!(t.len() <= 11 && t.ends_with('…'), "{t}");
        assert_eq!(t.trim_end_matches('…').chars().count(), 4);
    }
}
