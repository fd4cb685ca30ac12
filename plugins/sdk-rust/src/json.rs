//! [`JsonEvent`]: an in-memory event over a parsed JSON payload, for native tests.
//!
//! It answers [`EventView`] the way the host does, so a rule's `classify` can run
//! under `cargo test` on real provider payloads. It is a test double: it never
//! verifies, normalizes or stores anything.

use crate::{EventView, Value};

/// An event built from a kind and a JSON payload (feature `json`).
///
/// The action defaults to the payload's top-level `"action"` string, which is
/// where GitHub, Stripe-style and most other providers keep it; set it
/// explicitly with [`JsonEvent::with_action`] when the host derives it elsewhere.
#[derive(Clone, Debug)]
pub struct JsonEvent {
    kind: String,
    action: Option<String>,
    payload: serde_json::Value,
    raw: Option<Vec<u8>>,
    id: String,
    source: String,
    provider: String,
    delivery_id: String,
    received_at: u64,
    headers: Vec<(String, String)>,
}

impl JsonEvent {
    /// An event of `kind` carrying `payload`. Source and provider are `test`,
    /// the ids are placeholders, and there are no headers.
    pub fn new(kind: impl Into<String>, payload: serde_json::Value) -> JsonEvent {
        let action = payload
            .get("action")
            .and_then(|a| a.as_str())
            .map(str::to_owned);
        JsonEvent {
            kind: kind.into(),
            action,
            payload,
            raw: None,
            id: "evt_test".to_owned(),
            source: "test".to_owned(),
            provider: "test".to_owned(),
            delivery_id: "test-delivery".to_owned(),
            received_at: 0,
            headers: Vec::new(),
        }
    }

    /// Parse `body` as the payload, keeping the exact bytes for
    /// [`EventView::body`].
    pub fn from_slice(kind: impl Into<String>, body: &[u8]) -> serde_json::Result<JsonEvent> {
        let mut ev = JsonEvent::new(kind, serde_json::from_slice(body)?);
        ev.raw = Some(body.to_vec());
        Ok(ev)
    }

    /// Override the action (`None` for kinds without one).
    pub fn with_action(mut self, action: Option<&str>) -> JsonEvent {
        self.action = action.map(str::to_owned);
        self
    }

    /// Set the source and the provider.
    pub fn with_source(mut self, source: &str, provider: &str) -> JsonEvent {
        self.source = source.to_owned();
        self.provider = provider.to_owned();
        self
    }

    /// Set the store id and the delivery id.
    pub fn with_ids(mut self, id: &str, delivery_id: &str) -> JsonEvent {
        self.id = id.to_owned();
        self.delivery_id = delivery_id.to_owned();
        self
    }

    /// Set the time sluice accepted the event (ms since the Unix epoch).
    pub fn with_received_at(mut self, millis: u64) -> JsonEvent {
        self.received_at = millis;
        self
    }

    /// Add a request header (stored with its name in lower case, as the host does).
    pub fn with_header(mut self, name: &str, value: &str) -> JsonEvent {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// The payload, mutable, to derive a variant of a real payload in a test.
    /// The raw body is re-serialized from it afterwards.
    pub fn payload_mut(&mut self) -> &mut serde_json::Value {
        self.raw = None;
        &mut self.payload
    }

    /// The payload.
    pub fn payload(&self) -> &serde_json::Value {
        &self.payload
    }
}

impl EventView for JsonEvent {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn source(&self) -> String {
        self.source.clone()
    }
    fn provider(&self) -> String {
        self.provider.clone()
    }
    fn kind(&self) -> String {
        self.kind.clone()
    }
    fn action(&self) -> Option<String> {
        self.action.clone()
    }
    fn delivery_id(&self) -> String {
        self.delivery_id.clone()
    }
    fn received_at(&self) -> u64 {
        self.received_at
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    fn headers(&self) -> Vec<(String, String)> {
        self.headers.clone()
    }
    fn get(&self, pointer: &str) -> Option<Value> {
        self.payload.pointer(pointer).map(Value::from)
    }
    fn body(&self) -> Vec<u8> {
        match &self.raw {
            Some(raw) => raw.clone(),
            None => serde_json::to_vec(&self.payload).unwrap_or_default(),
        }
    }
}

impl From<&serde_json::Value> for Value {
    fn from(v: &serde_json::Value) -> Value {
        use serde_json::Value as J;
        match v {
            J::Null => Value::Null,
            J::Bool(b) => Value::Boolean(*b),
            J::Number(n) => match n.as_i64() {
                Some(i) => Value::Integer(i),
                // u64 above i64::MAX, or a fraction.
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            J::String(s) => Value::Text(s.clone()),
            J::Array(_) | J::Object(_) => Value::Composite(v.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_like_the_host() {
        let ev = JsonEvent::new(
            "issues",
            json!({"action": "opened", "n": 3, "f": 1.5, "b": true, "z": null, "o": {"a": [1]}}),
        )
        .with_header("X-GitHub-Event", "issues");
        assert_eq!(ev.action().as_deref(), Some("opened"));
        assert!(ev.action_is("opened"));
        assert_eq!(ev.int("/n"), Some(3));
        assert_eq!(ev.float("/n"), Some(3.0));
        assert_eq!(ev.float("/f"), Some(1.5));
        assert_eq!(ev.int("/f"), None);
        assert_eq!(ev.bool("/b"), Some(true));
        assert_eq!(ev.str("/action").as_deref(), Some("opened"));
        assert_eq!(ev.str("/n"), None);
        assert_eq!(ev.get("/z"), Some(Value::Null));
        assert!(!ev.has("/z"));
        assert!(!ev.has("/missing"));
        assert_eq!(ev.get("/o"), Some(Value::Composite(r#"{"a":[1]}"#.into())));
        assert_eq!(ev.int("/o/a/0"), Some(1));
        assert_eq!(ev.header("x-github-event").as_deref(), Some("issues"));
    }

    #[test]
    fn keeps_raw_body_until_edited() {
        let raw = br#"{ "action" : "x" }"#;
        let mut ev = JsonEvent::from_slice("k", raw).unwrap();
        assert_eq!(ev.body(), raw);
        ev.payload_mut()["action"] = "y".into();
        assert_eq!(ev.body(), br#"{"action":"y"}"#);
    }
}
