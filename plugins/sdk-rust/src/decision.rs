//! Builders for what a rule returns: [`Route`], [`Decision`] and [`Priority`].
//!
//! These only construct the WIT records; merging routes across rules is the
//! host's job. Keeping them inside the host's bounds is [`crate::limits`]'s,
//! applied once where the answer leaves the component.

use crate::{Decision, Priority, Route};

impl Route {
    /// A route to `agent` with priority [`Priority::Medium`], no workflow, an
    /// empty reason, no labels, no ordering key and no payload; refine it with
    /// the builder methods.
    pub fn to(agent: impl Into<String>) -> Route {
        Route {
            agent: agent.into(),
            workflow: None,
            priority: Priority::Medium,
            reason: String::new(),
            labels: Vec::new(),
            ordering_key: None,
            payload: None,
        }
    }

    /// Deliver this agent's events that share `key` one at a time, in the
    /// order they arrived (for example `owner/repo#42` for one issue). At
    /// most [`MAX_ORDERING_KEY`](crate::limits::MAX_ORDERING_KEY) bytes.
    pub fn ordering_key(mut self, key: impl Into<String>) -> Route {
        self.ordering_key = Some(key.into());
        self
    }

    /// Send the agent this JSON value instead of the event's whole body.
    /// At most [`MAX_PAYLOAD`](crate::limits::MAX_PAYLOAD) bytes as JSON text.
    /// Needs the `json` feature.
    #[cfg(feature = "json")]
    pub fn payload_json(self, payload: &serde_json::Value) -> Route {
        self.payload_raw(payload.to_string())
    }

    /// Send the agent this JSON text instead of the event's whole body. The
    /// host refuses the whole answer when it does not parse as JSON; prefer
    /// [`Route::payload_json`] where the `json` feature can be had.
    pub fn payload_raw(mut self, json: impl Into<String>) -> Route {
        self.payload = Some(json.into());
        self
    }

    /// Set how urgent the delivery is.
    pub fn priority(mut self, priority: Priority) -> Route {
        self.priority = priority;
        self
    }

    /// Ask the agent to run the named workflow.
    pub fn workflow(mut self, workflow: impl Into<String>) -> Route {
        self.workflow = Some(workflow.into());
        self
    }

    /// Say why the rule chose this route, for people reading decisions.
    pub fn reason(mut self, reason: impl Into<String>) -> Route {
        self.reason = reason.into();
        self
    }

    /// Add one free-form label, by convention `key:value`.
    pub fn label(mut self, label: impl Into<String>) -> Route {
        self.labels.push(label.into());
        self
    }

    /// Add the label `key:value`.
    pub fn label_kv(self, key: &str, value: &str) -> Route {
        self.label(format!("{key}:{value}"))
    }

    /// Whether the route carries exactly this label.
    pub fn has_label(&self, label: &str) -> bool {
        self.labels.iter().any(|l| l == label)
    }

    /// The value of the first `key:value` label with this key.
    pub fn label_value(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
    }
}

impl Decision {
    /// Deliver to exactly one route.
    pub fn route(route: Route) -> Decision {
        Decision::Routes(vec![route])
    }

    /// Deliver to these routes (none at all means "nothing to do").
    pub fn routes(routes: impl IntoIterator<Item = Route>) -> Decision {
        Decision::Routes(routes.into_iter().collect())
    }

    /// Deliberately ignore the event, saying why.
    pub fn ignore(reason: impl Into<String>) -> Decision {
        Decision::Ignore(reason.into())
    }

    /// The routes chosen; empty for an ignore.
    pub fn as_routes(&self) -> &[Route] {
        match self {
            Decision::Routes(routes) => routes,
            Decision::Ignore(_) => &[],
        }
    }

    /// The reason, if this is an ignore.
    pub fn ignore_reason(&self) -> Option<&str> {
        match self {
            Decision::Ignore(reason) => Some(reason),
            Decision::Routes(_) => None,
        }
    }

    /// Whether this is an explicit ignore.
    pub fn is_ignore(&self) -> bool {
        matches!(self, Decision::Ignore(_))
    }
}

impl From<Route> for Decision {
    fn from(route: Route) -> Decision {
        Decision::route(route)
    }
}

impl From<Vec<Route>> for Decision {
    fn from(routes: Vec<Route>) -> Decision {
        Decision::Routes(routes)
    }
}

impl Priority {
    /// Parse `critical`, `high`, `medium` or `low` (ASCII case-insensitive), for
    /// priorities read from [`crate::config`].
    pub fn parse(s: &str) -> Option<Priority> {
        [
            Priority::Critical,
            Priority::High,
            Priority::Medium,
            Priority::Low,
        ]
        .into_iter()
        .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// The WIT name of this priority.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_fills_every_field() {
        let r = Route::to("coordinator")
            .priority(Priority::Critical)
            .workflow("fix")
            .reason("because")
            .label("a:b")
            .label_kv("command", "deploy");
        assert_eq!(r.agent, "coordinator");
        assert_eq!(r.workflow.as_deref(), Some("fix"));
        assert_eq!(r.priority, Priority::Critical);
        assert_eq!(r.reason, "because");
        assert_eq!(r.labels, ["a:b", "command:deploy"]);
        assert_eq!(r.label_value("command"), Some("deploy"));
        assert_eq!(r.label_value("comm"), None);
        assert!(r.has_label("a:b"));
    }

    #[test]
    fn defaults_are_medium_and_empty() {
        let r = Route::to("x");
        assert_eq!(r.priority, Priority::Medium);
        assert!(r.workflow.is_none() && r.reason.is_empty() && r.labels.is_empty());
        assert!(r.ordering_key.is_none() && r.payload.is_none());
    }

    #[test]
    fn ordering_key_and_payload() {
        let r = Route::to("x")
            .ordering_key("o/r#7")
            .payload_raw(r#"{"n":7}"#);
        assert_eq!(r.ordering_key.as_deref(), Some("o/r#7"));
        assert_eq!(r.payload.as_deref(), Some(r#"{"n":7}"#));
    }

    #[cfg(feature = "json")]
    #[test]
    fn payload_json_is_compact_json_text() {
        let r = Route::to("x").payload_json(&serde_json::json!({"a": [1, "b"]}));
        assert_eq!(r.payload.as_deref(), Some(r#"{"a":[1,"b"]}"#));
    }

    #[test]
    fn decisions() {
        let d: Decision = Route::to("x").into();
        assert_eq!(d.as_routes().len(), 1);
        assert!(!d.is_ignore());
        let d = Decision::ignore("no");
        assert_eq!(d.ignore_reason(), Some("no"));
        assert!(d.as_routes().is_empty());
        assert_eq!(Decision::routes([]), Decision::Routes(vec![]));
    }

    #[test]
    fn priorities_round_trip() {
        for p in [
            Priority::Critical,
            Priority::High,
            Priority::Medium,
            Priority::Low,
        ] {
            assert_eq!(Priority::parse(p.as_str()), Some(p));
        }
        assert_eq!(Priority::parse(" HIGH "), Some(Priority::High));
        assert_eq!(Priority::parse("urgent"), None);
    }
}
