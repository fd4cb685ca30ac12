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
/// Longest ordering key (interface 0.2.0), in bytes: as long as a label.
pub const MAX_ORDERING_KEY: usize = MAX_LABEL;
/// Largest shaped payload per route (interface 0.2.0), in bytes of compact
/// JSON text.
pub const MAX_PAYLOAD: usize = 16 << 10;

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
/// over-long agent or workflow name, too many or over-long labels, an empty
/// or over-long ordering key, or a payload over [`MAX_PAYLOAD`] make the
/// answer a failure (routing on a silently cut answer would be wrong);
/// over-long reasons are only truncated. Such an answer is its own failure
/// kind, [`RuleFailure::Output`], not a trap.
pub fn bound(mut routes: Vec<Route>) -> Result<Vec<Route>, RuleFailure> {
    check_count(routes.len())?;
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
        if let Some(k) = &r.ordering_key
            && (k.is_empty() || k.len() > MAX_ORDERING_KEY)
        {
            return Err(RuleFailure::Output(format!(
                "route {i} (agent {}): ordering key of {} bytes (1 to {MAX_ORDERING_KEY} allowed)",
                r.agent,
                k.len()
            )));
        }
        if let Some(p) = &r.payload {
            let len = json_len(p);
            if len > MAX_PAYLOAD {
                return Err(RuleFailure::Output(format!(
                    "route {i} (agent {}): payload of {len} bytes of JSON (the limit is {MAX_PAYLOAD})",
                    r.agent
                )));
            }
        }
        if r.reason.len() > MAX_REASON {
            r.reason = truncate(&r.reason, MAX_REASON).into_owned();
        }
    }
    Ok(routes)
}

/// Refuses an answer of more than [`MAX_ROUTES`] routes.
pub fn check_count(routes: usize) -> Result<(), RuleFailure> {
    if routes > MAX_ROUTES {
        return Err(RuleFailure::Output(format!(
            "answer too large: {routes} routes (the limit is {MAX_ROUTES})"
        )));
    }
    Ok(())
}

/// The length of `v` as compact JSON text, counted without building it.
pub fn json_len(v: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` into an infallible writer cannot fail.
    let _ = serde_json::to_writer(&mut count, v);
    count.0
}

/// A route's payload as a rule returned it (JSON text, interface 0.2.0),
/// parsed; `rule` and `agent` name the culprit when it is not JSON or is
/// over [`MAX_PAYLOAD`].
pub fn parse_payload(
    rule: &str,
    agent: &str,
    text: &str,
) -> Result<serde_json::Value, RuleFailure> {
    if text.len() > MAX_PAYLOAD {
        return Err(RuleFailure::Output(format!(
            "rule {rule}, route to agent {}: payload of {} bytes (the limit is {MAX_PAYLOAD})",
            truncate(agent, MAX_NAME),
            text.len()
        )));
    }
    serde_json::from_str(text).map_err(|e| {
        RuleFailure::Output(format!(
            "rule {rule}, route to agent {}: payload is not JSON: {e}",
            truncate(agent, MAX_NAME)
        ))
    })
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

    #[test]
    fn json_len_is_the_compact_text_length() {
        let v = serde_json::json!({"a": [1, "é", null], "b": {"c": true}});
        assert_eq!(json_len(&v), v.to_string().len());
    }

    #[test]
    fn payloads_must_be_json_within_the_limit() {
        assert_eq!(
            parse_payload("r", "a", r#"{"n":1}"#).unwrap(),
            serde_json::json!({"n": 1})
        );
        let e = parse_payload("my-rule", "triage", "{not json").unwrap_err();
        assert!(
            matches!(&e, RuleFailure::Output(m) if m.contains("my-rule") && m.contains("triage")),
            "{e:?}"
        );
        let big = format!("\"{}\"", "x".repeat(MAX_PAYLOAD));
        assert!(matches!(
            parse_payload("r", "a", &big),
            Err(RuleFailure::Output(_))
        ));
    }
}
