//! Delivery of routed events to agents over HTTP lives here.
//!
//! [`guard`] is the outbound-connection guard every delivery connection goes
//! through: it decides which addresses an agent URL may reach and makes sure
//! the address dialled is the address it checked. [`envelope`] is what a
//! delivery POSTs and how it is signed.

pub mod config;
pub mod dispatcher;
pub mod envelope;
pub mod guard;
pub mod transport;
