//! Hostile fixture `sleep`: asks WASI to sleep for an hour in `classify`.
//!
//! Built for wasm32-wasip2, `thread::sleep` is a `wasi:io/poll` block on a
//! monotonic-clock pollable: the host would wait inside a host call, where the
//! epoch deadline is never checked. Proves the host refuses to block (a trap
//! at once) instead of holding a router worker for an hour. On the apt
//! toolchain's wasm32-unknown-unknown, std cannot sleep and panics: a trap too.

use std::time::Duration;

use sluice_rule::prelude::*;

/// Sleeps on every event.
pub struct Sleep;

impl Rule for Sleep {
    fn classify(ev: &impl EventView) -> Result<Decision, String> {
        std::thread::sleep(Duration::from_secs(3600));
        Ok(Decision::ignore(format!("woke up after a {} event", ev.kind())))
    }
}

export_rule!(Sleep);
