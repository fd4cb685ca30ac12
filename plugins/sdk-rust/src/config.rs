//! The rule's own config values, from its manifest and the host config.
//!
//! In a component, [`get`] asks the host. Natively (in tests) it reads a
//! per-thread map that [`set`] and [`clear`] fill, so each test sets exactly the
//! config it exercises and parallel tests cannot see each other's values.

/// One value by key, or `None` if the rule's config does not set it.
pub fn get(key: &str) -> Option<String> {
    #[cfg(target_arch = "wasm32")]
    {
        crate::bindings::sluice::router::config::get(key)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        native::VALUES.with(|values| values.borrow().get(key).cloned())
    }
}

/// The value for `key`, or `default` when it is unset or empty.
pub fn get_or(key: &str, default: &str) -> String {
    get(key)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Set a value for native tests (this thread only). Not available in a
/// component, where config comes from the host alone.
#[cfg(not(target_arch = "wasm32"))]
pub fn set(key: &str, value: &str) {
    native::VALUES.with(|values| {
        values.borrow_mut().insert(key.to_owned(), value.to_owned());
    });
}

/// Forget every value [`set`] on this thread.
#[cfg(not(target_arch = "wasm32"))]
pub fn clear() {
    native::VALUES.with(|values| values.borrow_mut().clear());
}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::cell::RefCell;
    use std::collections::HashMap;

    thread_local! {
        pub(super) static VALUES: RefCell<HashMap<String, String>> = RefCell::new(HashMap::new());
    }
}
