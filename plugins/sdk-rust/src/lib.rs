//! `sluice-rule`: the guest SDK for writing sluice routing rules in Rust.
//!
//! A rule is a WebAssembly component that exports `sluice:router/classifier@0.2.0`
//! (the WIT package in `wit/sluice-router@0.2.0/` at the top of the repository;
//! the host still serves components built against 0.1.0 by earlier versions of
//! this crate).
//! The host hands it one stored event at a time and the rule answers with the
//! routes that should receive it, an explicit ignore, or an error. This crate
//! generates the bindings for that contract and adds the few helpers that make a
//! rule a handful of lines:
//!
//! ```
//! use sluice_rule::prelude::*;
//!
//! struct Triage;
//!
//! impl Rule for Triage {
//!     fn classify(ev: &impl EventView) -> Result<Decision, String> {
//!         if ev.kind() == "issues" && ev.action().as_deref() == Some("opened") {
//!             let repo = ev.str("/repository/full_name").unwrap_or_default();
//!             return Ok(Route::to("issue-triage")
//!                 .priority(Priority::Medium)
//!                 .reason(format!("new issue in {repo}"))
//!                 .into());
//!         }
//!         Ok(Decision::ignore("not a new issue"))
//!     }
//! }
//!
//! export_rule!(Triage);
//! ```
//!
//! Rules are written against [`EventView`], not the WIT resource directly: inside
//! the component it is implemented by [`Event`]; with the `json` feature,
//! [`JsonEvent`] implements it over a `serde_json::Value`, so the same `classify`
//! runs natively under `cargo test` on real payloads. [`log`] and [`config`] work
//! natively too (stderr and a per-thread map), so tests need no host.
//!
//! This crate must never widen what a rule can reach: it imports only `log` and
//! `config`, which every rule is granted. Anything more belongs in a new WIT
//! version, not in a helper here.
#![deny(missing_docs)]

mod decision;
mod event;
#[cfg(feature = "json")]
mod json;
mod value;

pub mod config;
pub mod limits;
pub mod log;

/// The bindings `wit-bindgen` generates for world `sluice:router/rule@0.2.0`.
///
/// Everything a rule needs is re-exported at the crate root; reach in here only
/// for the raw generated items (for example the export trait, to export a
/// component by hand instead of with [`export_rule!`]).
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/sluice-router@0.2.0",
        world: "rule",
        // `export_rule!` expands in the rule's crate, so the generated export
        // macro must be public and must find these bindings by absolute path.
        pub_export_macro: true,
        export_macro_name: "__export_rule_world",
        default_bindings_module: "::sluice_rule::bindings",
        additional_derives: [PartialEq],
    });
}

pub use bindings::sluice::router::types::{Decision, Event, Priority, Route, Value};
pub use event::EventView;
#[cfg(feature = "json")]
pub use json::JsonEvent;

/// A routing rule: the one function a rule author writes.
///
/// Export it from a `cdylib` crate with [`export_rule!`]. The function is generic
/// over [`EventView`] so the very same code runs inside the component (on the
/// host's [`Event`]) and in native tests (on a [`JsonEvent`]).
pub trait Rule {
    /// Decide where `ev` goes: routes, an explicit [`Decision::ignore`], or an
    /// `Err` that the host records against the rule and handles by its failure
    /// policy. A panic traps the instance; return `Err` for expected failures.
    fn classify(ev: &impl EventView) -> Result<Decision, String>;

    /// What the component hands the host for `ev`: [`Rule::classify`]'s
    /// answer with its labels, reasons and error text clamped to the host's
    /// [`limits`], so descriptive text that runs long never costs the event
    /// its routes. [`export_rule!`] calls this; native tests can too.
    fn answer(ev: &impl EventView) -> Result<Decision, String> {
        limits::clamp_answer(Self::classify(ev))
    }
}

/// Export a [`Rule`] as this component's `sluice:router/classifier@0.2.0`.
///
/// Use it once, at the top level of a `cdylib` crate:
///
/// ```
/// use sluice_rule::{Decision, EventView, Rule};
///
/// struct IgnoreAll;
///
/// impl Rule for IgnoreAll {
///     fn classify(ev: &impl EventView) -> Result<Decision, String> {
///         Ok(Decision::ignore(format!("{} is not routed", ev.kind())))
///     }
/// }
///
/// sluice_rule::export_rule!(IgnoreAll);
/// ```
///
/// The answer goes out through [`Rule::answer`], clamped to the host's
/// [`limits`]. It expands to nothing on native targets, so the crate still
/// builds and tests with plain `cargo test`.
#[macro_export]
macro_rules! export_rule {
    ($rule:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct SluiceRuleExport;

            impl $crate::bindings::exports::sluice::router::classifier::Guest for SluiceRuleExport {
                fn classify(
                    ev: $crate::Event,
                ) -> ::core::result::Result<$crate::Decision, ::std::string::String> {
                    // `ev` is owned (see the WIT) and dropped here, which hands the
                    // resource back to the host before the call returns.
                    <$rule as $crate::Rule>::answer(&ev)
                }
            }

    $crate::bindings::__export_rule_world!(SluiceRuleExport with_types_in $crate::bindings);
        };
    };
}

/// Everything a rule usually needs, for `use sluice_rule::prelude::*;`.
pub mod prelude {
    pub use crate::{Decision, EventView, Priority, Route, Rule, Value, config, export_rule, log};
}
