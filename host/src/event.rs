//! The stored event: what intake appends and what the router and rules read.
//!
//! An [`Event`] is only ever built by the store from a row it committed; new
//! events enter through [`crate::ingress::NewEvent`], which only verification
//! can produce. Nothing here parses payloads eagerly: the router wraps each
//! event in a [`ParsedEvent`] shared by every rule, which reads fields in
//! place and parses only what it returns.

mod fields;

use std::borrow::Cow;
use std::sync::OnceLock;

use bytes::Bytes;
use serde::Serialize;

/// Milliseconds since the Unix epoch: the one clock every timestamp sluice
/// stores or checks is read from.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Which verification scheme (and so which normalisation) a source uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// GitHub: `X-Hub-Signature-256`.
    Github,
    /// GitLab: `X-Gitlab-Token` and/or the signing token (Standard Webhooks).
    Gitlab,
    /// Any Standard Webhooks sender.
    StandardWebhooks,
    /// Stripe: `Stripe-Signature`.
    Stripe,
    /// Slack: `X-Slack-Signature` v0.
    Slack,
    /// Linear: `Linear-Signature`.
    Linear,
    /// A generic HMAC-SHA256 header.
    Hmac,
    /// No verification at all (local use only).
    None,
}

impl Provider {
    /// The name used in config, the store and rules.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitlab => "gitlab",
            Provider::StandardWebhooks => "standard-webhooks",
            Provider::Stripe => "stripe",
            Provider::Slack => "slack",
            Provider::Linear => "linear",
            Provider::Hmac => "hmac",
            Provider::None => "none",
        }
    }

    /// Every provider, for help texts and parsing.
    pub const ALL: [Provider; 8] = [
        Provider::Github,
        Provider::Gitlab,
        Provider::StandardWebhooks,
        Provider::Stripe,
        Provider::Slack,
        Provider::Linear,
        Provider::Hmac,
        Provider::None,
    ];

    /// Parses a provider name as written in config and the store.
    pub fn parse(name: &str) -> Option<Provider> {
        Provider::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an event's delivery id came from. It decides what makes two
/// deliveries the same one (see [`dedup_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdOrigin {
    /// The provider's id, covered by the signature (Standard Webhooks'
    /// `webhook-id`, GitLab's signed `webhook-id`, Stripe's event `id` and
    /// Slack's `event_id` in the signed body): nobody without the secret can
    /// reuse it for another body.
    Signed,
    /// The provider's id from a header the signature does not cover
    /// (`X-GitHub-Delivery`, `Linear-Delivery`, GitLab's `Idempotency-Key` in
    /// token mode, a generic source's `delivery_header`): anyone who saw one
    /// signed body can send it again under any id.
    Unsigned,
    /// No id was sent; the delivery id is `sha256:` + the body's hash.
    Body,
}

impl IdOrigin {
    /// The name stored in the database and printed by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            IdOrigin::Signed => "signed",
            IdOrigin::Unsigned => "unsigned",
            IdOrigin::Body => "body",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<IdOrigin> {
        [IdOrigin::Signed, IdOrigin::Unsigned, IdOrigin::Body]
            .into_iter()
            .find(|o| o.as_str() == s)
    }

    /// True when deliveries are the same only within the dedup window (a body
    /// hash: two identical alerts an hour apart are two events); a provider's
    /// id names one delivery for good.
    pub fn expires(self) -> bool {
        self == IdOrigin::Body
    }
}

/// The one formula for "the same delivery", shared by every store backend
/// (and fit to be a JetStream `Nats-Msg-Id`):
///
/// - signed id: `{source}:id:{delivery id}`;
/// - unsigned id: `{source}:idb:{body sha256}:{delivery id}` — the same id
///   with another body is another delivery (an id conflict, stored and
///   marked), so a replayed body under a chosen id cannot shadow the real one;
/// - no id: `{source}:b:{body sha256}`, a duplicate only within the store's
///   dedup window ([`IdOrigin::expires`]).
///
/// Source names hold no `:` and the hash has a fixed length, so the key is
/// unambiguous with the free-form delivery id last.
pub fn dedup_key(source: &str, origin: IdOrigin, delivery_id: &str, body_sha256: &str) -> String {
    match origin {
        IdOrigin::Signed => format!("{source}:id:{delivery_id}"),
        IdOrigin::Unsigned => format!("{source}:idb:{body_sha256}:{delivery_id}"),
        IdOrigin::Body => format!("{source}:b:{body_sha256}"),
    }
}

/// Where an event is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    /// Stored, waiting for the router.
    Pending,
    /// A router worker holds a lease on it.
    Claimed,
    /// Routed: a decision is recorded.
    Routed,
    /// Gave up after repeated failures; see the dead-letter list.
    Dead,
}

impl EventStatus {
    /// The name stored in the database and printed by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Pending => "pending",
            EventStatus::Claimed => "claimed",
            EventStatus::Routed => "routed",
            EventStatus::Dead => "dead",
        }
    }

    /// Parses a stored status name.
    pub fn parse(s: &str) -> Option<EventStatus> {
        [
            EventStatus::Pending,
            EventStatus::Claimed,
            EventStatus::Routed,
            EventStatus::Dead,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// One stored event, as the store returns it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// The store's id, `evt_` + a time-ordered UUID.
    pub id: String,
    /// The configured source name (the `{source}` in `/hooks/{source}`).
    pub source: String,
    /// The provider behind the source.
    pub provider: Provider,
    /// The provider's event kind (`issues`, `Push Hook`, `invoice.paid`).
    pub kind: String,
    /// The action inside the kind, when there is one.
    pub action: Option<String>,
    /// The provider's delivery id, or `sha256:` + the body hash.
    pub delivery_id: String,
    /// When sluice accepted it, in milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// Request headers kept for rules (lower-case names; credentials removed).
    pub headers: Vec<(String, String)>,
    /// The payload document (JSON; a form-encoded GitHub body is stored decoded).
    #[serde(skip)]
    pub body: Bytes,
}

impl Event {
    /// One stored header by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An event as the rules see it, shared by all of them: its payload is read
/// in place. The first field read (or [`ParsedEvent::scan`]) checks the body
/// and indexes its object keys in one pass; each [`ParsedEvent::get`] then
/// parses only the value it returns. The whole document is parsed only for
/// whoever asks for it ([`ParsedEvent::payload`], the empty pointer), once.
#[derive(Debug)]
pub struct ParsedEvent {
    /// The stored event.
    pub event: Event,
    index: OnceLock<fields::Index>,
    payload: OnceLock<serde_json::Value>,
}

impl ParsedEvent {
    /// Wraps a stored event; nothing is read until a rule asks.
    pub fn new(event: Event) -> Self {
        ParsedEvent {
            event,
            index: OnceLock::new(),
            payload: OnceLock::new(),
        }
    }

    /// Checks and indexes the body now, unless a read did already or the
    /// whole payload is parsed, so the field reads that follow cost only what
    /// they read (the router calls it before the first rule runs, outside
    /// every rule's deadline).
    pub fn scan(&self) {
        // Reads are served from the whole payload once it is parsed.
        if self.payload.get().is_none() {
            self.index();
        }
    }

    fn index(&self) -> &fields::Index {
        self.index
            .get_or_init(|| fields::Index::build(&self.event.body))
    }

    /// The whole payload, parsed on first use (`null` when the body is not
    /// JSON). Reading fields through [`ParsedEvent::get`] is cheaper.
    pub fn payload(&self) -> &serde_json::Value {
        self.payload.get_or_init(|| {
            if let Some(fields::Index::Invalid) = self.index.get() {
                return serde_json::Value::Null;
            }
            serde_json::from_slice(&self.event.body).unwrap_or(serde_json::Value::Null)
        })
    }

    /// The value at an RFC 6901 JSON pointer, exactly as
    /// `serde_json::Value::pointer` finds it in the parsed payload (the empty
    /// pointer is the whole document). Borrowed when the whole payload is
    /// parsed already; otherwise only this value is parsed, from the body.
    pub fn get(&self, pointer: &str) -> Option<Cow<'_, serde_json::Value>> {
        if pointer.is_empty() {
            return Some(Cow::Borrowed(self.payload()));
        }
        if let Some(whole) = self.payload.get() {
            return whole.pointer(pointer).map(Cow::Borrowed);
        }
        match self.index() {
            fields::Index::Invalid => None,
            fields::Index::Whole => self.payload().pointer(pointer).map(Cow::Borrowed),
            fields::Index::Keys(keys) => keys.get(&self.event.body, pointer).map(Cow::Owned),
        }
    }
}

impl Event {
    /// An event built straight from a payload, for dry runs (`sluice route`)
    /// and rule test vectors; it never reaches the store. The action is taken
    /// from the payload when not given (`/action`, or GitLab's
    /// `/object_attributes/action`), and the provider's event header is set
    /// to `kind`.
    pub fn dry_run(
        source: &str,
        provider: Provider,
        kind: &str,
        action: Option<String>,
        body: Bytes,
    ) -> Event {
        use sha2::Digest;
        let payload: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        let action = action.or_else(|| {
            let p = payload.as_ref()?;
            let a = p
                .get("action")
                .or_else(|| p.pointer("/object_attributes/action"))?;
            a.as_str().map(str::to_owned)
        });
        let mut headers = Vec::new();
        match provider {
            Provider::Github => headers.push(("x-github-event".to_owned(), kind.to_owned())),
            Provider::Gitlab => headers.push(("x-gitlab-event".to_owned(), kind.to_owned())),
            _ => {}
        }
        let received_at_ms = now_ms();
        Event {
            id: "evt_dry_run".to_owned(),
            source: source.to_owned(),
            provider,
            kind: kind.to_owned(),
            action,
            delivery_id: format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))),
            received_at_ms,
            headers,
            body,
        }
    }
}
