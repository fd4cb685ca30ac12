//! Test rule `shaped` (interface `sluice:router@0.2.0`): answers every event
//! with one route to agent `shaped` that uses what 0.2.0 added. Its ordering
//! key is `<repository>#<number>` (the issue's or pull request's number, `-`
//! without one) and its payload the JSON object
//! `{"kind", "action", "repo", "number"}` shaped from the event.
//!
//! Config `payload_text`, when set, is sent as the payload text unchecked,
//! so tests can prove the host refuses a payload that is not JSON.

use serde_json::json;
use sluice_rule::prelude::*;

/// The shaping rule.
pub struct Shaped;

impl Rule for Shaped {
    fn classify(ev: &impl EventView) -> Result<Decision, String> {
        let repo = ev.str("/repository/full_name").unwrap_or_default();
        let number = ev
            .int("/issue/number")
            .or_else(|| ev.int("/pull_request/number"));
        let key = match number {
            Some(n) => format!("{repo}#{n}"),
            None => format!("{repo}#-"),
        };
        let route = Route::to("shaped")
            .reason(format!("{} shaped", ev.kind()))
            .ordering_key(key);
        let route = match config::get("payload_text") {
            Some(text) => route.payload_raw(text),
            None => route.payload_json(&json!({
                "kind": ev.kind(),
                "action": ev.action(),
                "repo": repo,
                "number": number,
            })),
        };
        Ok(route.into())
    }
}

export_rule!(Shaped);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_rule::JsonEvent;

    #[test]
    fn key_and_payload_come_from_the_event() {
        let ev = JsonEvent::new(
            "issues",
            json!({"action": "opened", "issue": {"number": 3}, "repository": {"full_name": "o/r"}}),
        );
        let d = Shaped::classify(&ev).unwrap();
        let r = &d.as_routes()[0];
        assert_eq!(r.ordering_key.as_deref(), Some("o/r#3"));
        let payload: serde_json::Value =
            serde_json::from_str(r.payload.as_deref().unwrap()).unwrap();
        assert_eq!(
            payload,
            json!({"kind": "issues", "action": "opened", "repo": "o/r", "number": 3})
        );
    }
}
