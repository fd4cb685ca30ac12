//! Hostile fixture `trap`: panics in `classify`.
//!
//! Rules are built with `panic = "abort"`, so the panic becomes a wasm
//! `unreachable` trap. Proves the host keeps a trap apart from a guest error,
//! records it against the rule, never reuses the dead instance, and trips the
//! rule's circuit breaker when it keeps happening.

use sluice_rule::prelude::*;

/// Panics on every event.
pub struct Trap;

impl Rule for Trap {
    fn classify(ev: &impl EventView) -> Result<Decision, String> {
        panic!(
            "hostile fixture: trap while classifying a {} event",
            ev.kind()
        );
    }
}

export_rule!(Trap);
