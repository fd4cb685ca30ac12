//! Hostile fixture `loop`: `classify` never returns.
//!
//! Proves the host's epoch deadline: a tight loop with no host calls must trap
//! at the deadline (an async timeout around the call cannot stop it), the
//! instance must be thrown away, and the worker must go on with the next event.

use std::hint::black_box;

use sluice_rule::prelude::*;

/// Spins forever.
pub struct Loop;

impl Rule for Loop {
    fn classify(_ev: &impl EventView) -> Result<Decision, String> {
        let mut n: u64 = 0;
        loop {
            // Opaque to the optimizer, so the loop is really executed.
            n = black_box(n.wrapping_add(1));
        }
    }
}

export_rule!(Loop);
