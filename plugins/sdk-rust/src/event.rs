//! [`EventView`]: read access to one event, the seam between a rule and its host.
//!
//! Inside a component the host's [`Event`] resource implements it; in native
//! tests `JsonEvent` does. It must stay read-only: a rule observes an event, it
//! never changes what the host stored.

use crate::{Event, Value};

/// Read access to one stored event.
///
/// The required methods mirror the WIT `event` resource one to one. The provided
/// ones (`str`, `bool`, `int`, `float`, `has`, `action_is`) are typed shortcuts
/// over [`EventView::get`]; they return `None` when the pointer is missing *or*
/// the value has another JSON type, so a rule never has to match on [`Value`]
/// for the common cases.
pub trait EventView {
    /// The event's id in the sluice store (`evt_...`).
    fn id(&self) -> String;
    /// The configured source it arrived on (`github`, `gitlab-main`, ...).
    fn source(&self) -> String;
    /// The provider behind the source (`github`, `gitlab`, `stripe`, ...).
    fn provider(&self) -> String;
    /// The provider's event kind (`issues`, `Push Hook`, `invoice.paid`, ...).
    fn kind(&self) -> String;
    /// The action inside the kind, when the provider has one (`opened`, `merge`).
    fn action(&self) -> Option<String>;
    /// The provider's delivery id, or the SHA-256 of the body.
    fn delivery_id(&self) -> String;
    /// When sluice accepted it, in milliseconds since the Unix epoch.
    fn received_at(&self) -> u64;
    /// One request header by case-insensitive name.
    fn header(&self, name: &str) -> Option<String>;
    /// All stored request headers, names in lower case.
    fn headers(&self) -> Vec<(String, String)>;
    /// The value at an RFC 6901 JSON pointer (`/issue/labels/0/name`), if any.
    /// A JSON `null` is `Some(Value::Null)`; a missing field is `None`.
    fn get(&self, pointer: &str) -> Option<Value>;
    /// The payload as received. Prefer [`EventView::get`]: the host has already
    /// parsed the body, and copying it into the guest costs far more.
    fn body(&self) -> Vec<u8>;

    /// The string at `pointer`, or `None` if missing or not a string.
    fn str(&self, pointer: &str) -> Option<String> {
        match self.get(pointer)? {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The boolean at `pointer`, or `None` if missing or not a boolean.
    fn bool(&self, pointer: &str) -> Option<bool> {
        self.get(pointer)?.as_bool()
    }

    /// The integer at `pointer`, or `None` if missing or not an integer.
    fn int(&self, pointer: &str) -> Option<i64> {
        self.get(pointer)?.as_int()
    }

    /// The number at `pointer` (integer or float) as `f64`, or `None`.
    fn float(&self, pointer: &str) -> Option<f64> {
        self.get(pointer)?.as_float()
    }

    /// Whether `pointer` resolves to a value other than JSON `null`.
    fn has(&self, pointer: &str) -> bool {
        matches!(self.get(pointer), Some(v) if !v.is_null())
    }

    /// Whether the event's action is exactly `action`.
    fn action_is(&self, action: &str) -> bool {
        self.action().as_deref() == Some(action)
    }
}

impl EventView for Event {
    fn id(&self) -> String {
        Event::id(self)
    }
    fn source(&self) -> String {
        Event::source(self)
    }
    fn provider(&self) -> String {
        Event::provider(self)
    }
    fn kind(&self) -> String {
        Event::kind(self)
    }
    fn action(&self) -> Option<String> {
        Event::action(self)
    }
    fn delivery_id(&self) -> String {
        Event::delivery_id(self)
    }
    fn received_at(&self) -> u64 {
        Event::received_at(self)
    }
    fn header(&self, name: &str) -> Option<String> {
        Event::header(self, name)
    }
    fn headers(&self) -> Vec<(String, String)> {
        Event::headers(self)
    }
    fn get(&self, pointer: &str) -> Option<Value> {
        Event::get(self, pointer)
    }
    fn body(&self) -> Vec<u8> {
        Event::body(self)
    }
}
