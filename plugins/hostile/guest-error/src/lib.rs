//! Hostile fixture `guest-error`: returns `Err` from `classify`.
//!
//! Not a trap: the instance is healthy and the call completed. Proves the host
//! records the message against the rule, applies its failure policy, and tells
//! this apart from a trap or a timeout.

use sluice_rule::prelude::*;

/// Fails every event, politely.
pub struct GuestError;

/// The error text, fixed so host tests can match it.
pub const MESSAGE: &str = "hostile fixture: guest-error refuses";

impl Rule for GuestError {
    fn classify(ev: &impl EventView) -> Result<Decision, String> {
        Err(format!("{MESSAGE} {} events", ev.kind()))
    }
}

export_rule!(GuestError);
