//! Hostile fixture `huge`: returns a decision far too big to accept.
//!
//! Proves the host bounds what it takes back from a guest: a rule must not be
//! able to flood the decision log, the merge step or the dispatcher. Its own
//! config picks the shape (defaults in brackets):
//!
//! - `shape` [`routes`]: `routes` returns `count` routes to agent `huge`;
//!   `reason` returns one route whose reason is `mib` MiB long; `labels` returns
//!   one route with `count` labels; `ignore` returns an ignore whose reason is
//!   `mib` MiB long.
//! - `count` [1000000], `mib` [64].
//!
//! Guest memory needed at the peak, roughly: `routes` 110 bytes per route
//! (≈ 105 MiB for the default), `labels` 40 bytes per label, `reason`/`ignore`
//! `mib` MiB plus a little. Below that, the memory limit traps first, which is
//! also a valid outcome: the host must survive both.

use sluice_rule::prelude::*;

/// Answers with far too much.
pub struct Huge;

fn knob(key: &str, default: usize) -> usize {
    config::get(key)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl Rule for Huge {
    fn classify(ev: &impl EventView) -> Result<Decision, String> {
        let count = knob("count", 1_000_000);
        let bytes = knob("mib", 64) << 20;
        let shape = config::get_or("shape", "routes");
        Ok(match shape.as_str() {
            "routes" => Decision::Routes(
                (0..count)
                    .map(|_| Route::to("huge").priority(Priority::Low))
                    .collect(),
            ),
            "labels" => {
                let mut route =
                    Route::to("huge").reason(format!("{count} labels for {}", ev.kind()));
                route.labels = (0..count).map(|i| format!("n:{i}")).collect();
                route.into()
            }
            "reason" => Route::to("huge").reason("x".repeat(bytes)).into(),
            "ignore" => Decision::ignore("x".repeat(bytes)),
            other => return Err(format!("huge: unknown shape {other:?}")),
        })
    }
}

// Exported by hand, not with `export_rule!`: that clamps labels and reasons
// to the host's limits, and this fixture exists to prove the host's own
// bounds on an unclamped answer.
#[cfg(target_arch = "wasm32")]
const _: () = {
    use sluice_rule::bindings::exports::sluice::router::classifier::Guest;

    struct Unclamped;

    impl Guest for Unclamped {
        fn classify(ev: sluice_rule::Event) -> Result<Decision, String> {
            <Huge as Rule>::classify(&ev)
        }
    }

    sluice_rule::bindings::__export_rule_world!(Unclamped with_types_in sluice_rule::bindings);
};
