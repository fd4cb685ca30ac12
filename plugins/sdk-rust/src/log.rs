//! Structured logging into the host's log, tagged with the rule's name.
//!
//! In a component every call crosses into the host, so log what explains a
//! decision, not every field read. Natively (in tests) lines go to stderr.
//!
//! A line is clamped to what the host keeps ([`crate::limits`]) before it
//! crosses: the host would cut it anyway, and what one call may copy out of
//! the sandbox is bounded, so an unclamped multi-megabyte line would cost
//! the call (and the event its routes).

pub use crate::bindings::sluice::router::log::Level;

/// Write one line with `key`/`value` fields.
pub fn log(level: Level, message: &str, fields: &[(&str, &str)]) {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::limits::{
            MAX_LOG_FIELD_KEY, MAX_LOG_FIELD_VALUE, MAX_LOG_FIELDS, MAX_LOG_MESSAGE, truncate,
        };
        let clamped = |s: &str, max: usize| {
            let mut s = s.to_owned();
            truncate(&mut s, max);
            s
        };
        let fields: Vec<(String, String)> = fields
            .iter()
            .take(MAX_LOG_FIELDS)
            .map(|(k, v)| {
                (
                    clamped(k, MAX_LOG_FIELD_KEY),
                    clamped(v, MAX_LOG_FIELD_VALUE),
                )
            })
            .collect();
        let message = clamped(message, MAX_LOG_MESSAGE);
        crate::bindings::sluice::router::log::log(level, &message, &fields);
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let fields: String = fields.iter().map(|(k, v)| format!(" {k}={v:?}")).collect();
        eprintln!("[{level:?}] {message}{fields}");
    }
}

/// Log `message` at [`Level::Trace`].
pub fn trace(message: &str) {
    log(Level::Trace, message, &[]);
}

/// Log `message` at [`Level::Debug`].
pub fn debug(message: &str) {
    log(Level::Debug, message, &[]);
}

/// Log `message` at [`Level::Info`].
pub fn info(message: &str) {
    log(Level::Info, message, &[]);
}

/// Log `message` at [`Level::Warn`].
pub fn warn(message: &str) {
    log(Level::Warn, message, &[]);
}

/// Log `message` at [`Level::Error`].
pub fn error(message: &str) {
    log(Level::Error, message, &[]);
}
