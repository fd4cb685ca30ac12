//! Hostile fixture `recursion`: recurses without bound.
//!
//! Proves the host's stack limit (`max_wasm_stack`): the call must trap with
//! stack exhaustion instead of overflowing the host thread's stack. Frames are
//! kept small and free of addressable locals, so it is wasm's own call stack
//! that runs out first; if the host's limit were larger than the guest's 1 MiB
//! shadow stack, the guest would still trap on an out-of-bounds access.

use std::hint::black_box;

use sluice_rule::prelude::*;

/// Goes deeper forever.
pub struct Recursion;

#[inline(never)]
#[allow(unconditional_recursion)]
fn dive(depth: u64) -> u64 {
    // Using the result after the call (and hiding both values from the
    // optimizer) rules out tail calls and turning the recursion into a loop.
    black_box(dive(black_box(depth + 1))).wrapping_add(depth)
}

impl Rule for Recursion {
    fn classify(_ev: &impl EventView) -> Result<Decision, String> {
        let deepest = dive(0);
        Err(format!("unreachable: recursion returned at {deepest}"))
    }
}

export_rule!(Recursion);
