//! Structured logging into the host's log, tagged with the rule's name.
//!
//! In a component every call crosses into the host, so log what explains a
//! decision, not every field read. Natively (in tests) lines go to stderr.

pub use crate::bindings::sluice::router::log::Level;

/// Write one line with `key`/`value` fields.
pub fn log(level: Level, message: &str, fields: &[(&str, &str)]) {
    #[cfg(target_arch = "wasm32")]
    {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        crate::bindings::sluice::router::log::log(level, message, &fields);
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
