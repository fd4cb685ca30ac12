//! sluice: a webhook gateway with sandboxed, hot-reloaded routing rules.

pub mod cli;
pub mod decision;
pub mod event;
pub mod ingress;
pub mod rules;
pub mod store;
