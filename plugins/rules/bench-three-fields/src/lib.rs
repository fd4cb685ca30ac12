//! Benchmark rule: the smallest realistic amount of work a rule does.
//!
//! It reads exactly three fields — the kind, the action and
//! `/repository/full_name` through `get` — and returns one route to agent `bench`
//! at medium priority. The host's benches run the same logic as a native Rust
//! function and as a rhai script, so the three can be compared call for call:
//! keep it doing exactly this, or the comparison stops meaning anything.

use sluice_rule::prelude::*;

/// The benchmark rule.
pub struct BenchThreeFields;

impl Rule for BenchThreeFields {
    fn classify(ev: &impl EventView) -> Result<Decision, String> {
        let kind = ev.kind();
        let action = ev.action();
        let repo = ev.str("/repository/full_name");
        Ok(Route::to("bench")
            .priority(Priority::Medium)
            .reason(format!(
                "{kind}.{} in {}",
                action.as_deref().unwrap_or("-"),
                repo.as_deref().unwrap_or("?")
            ))
            .into())
    }
}

export_rule!(BenchThreeFields);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_rule::JsonEvent;

    #[test]
    fn one_medium_route_naming_the_repo() {
        let body = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../../shared/corpus/github/issues/opened.payload.json"
        ));
        // The corpus sits beside the repository on dev machines and in CI; fall
        // back to an inline payload elsewhere so the test still runs.
        let ev = match body {
            Ok(body) => JsonEvent::from_slice("issues", &body).unwrap(),
            Err(_) => JsonEvent::new(
                "issues",
                serde_json::json!({"action": "opened", "repository": {"full_name": "Codertocat/Hello-World"}}),
            ),
        };
        let d = BenchThreeFields::classify(&ev).unwrap();
        let [r] = d.as_routes() else { panic!("{d:?}") };
        assert_eq!(r.agent, "bench");
        assert_eq!(r.priority, Priority::Medium);
        assert_eq!(r.reason, "issues.opened in Codertocat/Hello-World");
    }
}
