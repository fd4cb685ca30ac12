//! Test rule `call-count`: answers every event with one route whose reason
//! is `call N`, N being how many times this instance has been called.
//!
//! The count lives in the instance's memory, so it is 1 on every event for
//! as long as the host gives each event a fresh instance (with its ready
//! instances too), and climbs the moment an instance is ever reused.

use std::sync::atomic::{AtomicU32, Ordering};

use sluice_rule::prelude::*;

/// Calls of this instance so far.
static CALLS: AtomicU32 = AtomicU32::new(0);

/// The counting rule.
pub struct CallCount;

impl Rule for CallCount {
    fn classify(_ev: &impl EventView) -> Result<Decision, String> {
        let n = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Route::to("counter").reason(format!("call {n}")).into())
    }
}

export_rule!(CallCount);
