//! How one delivery attempt reaches an agent: the [`Transport`] each agent
//! kind implements, what it is handed ([`Request`]) and what it answers
//! ([`Outcome`]).
//!
//! A transport makes one attempt and classifies its result; it never
//! retries, sleeps or counts. Retries, backoff, breakers and limits are the
//! dispatcher's, the same for every kind.
//!
//! One module per [`AgentKind`]: [`http`], [`exec`], [`nats`] and
//! [`outbox`]; [`build`] makes an agent's transport from its config.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::dispatch::config::{AgentConfig, AgentKind};

/// One attempt's request: the signed envelope and its headers.
#[derive(Debug, Clone)]
pub struct Request {
    /// The envelope as JSON (what is POSTed, published or piped to stdin).
    pub body: Bytes,
    /// `webhook-id`, `webhook-timestamp` and `webhook-signature`.
    pub headers: Vec<(&'static str, String)>,
    /// The idempotency key (the `webhook-id`): the same on every attempt of
    /// one delivery, so a receiver (or JetStream's duplicate window, as
    /// `Nats-Msg-Id`) drops a repeat.
    pub idempotency_key: String,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The agent took it (2xx, a JetStream ack, exit 0, a line written).
    Delivered {
        /// The HTTP status, where there is one.
        status: Option<u16>,
        /// The agent's answer when it is JSON (read up to the agent's
        /// `max_response_bytes`); a workflow passes it to its next step.
        answer: Option<serde_json::Value>,
        /// Bytes of answer read back.
        response_bytes: u64,
    },
    /// It failed in a way a later attempt may not: a timeout, a connection
    /// error, 429, 5xx, a non-zero exit, no JetStream ack.
    Retry {
        /// The HTTP status, where there is one.
        status: Option<u16>,
        /// What went wrong, for the attempt record (never a secret).
        error: String,
        /// The agent's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
        /// Bytes of answer read back.
        response_bytes: u64,
    },
    /// It failed for good: another 4xx, a refused address (the SSRF guard),
    /// an envelope the agent cannot take. The delivery is dead-lettered.
    Final {
        /// The HTTP status, where there is one.
        status: Option<u16>,
        /// What went wrong.
        error: String,
        /// Bytes of answer read back.
        response_bytes: u64,
    },
}

impl Outcome {
    /// A failure a later attempt may get past, with no HTTP status, answer
    /// or `Retry-After` (a timeout, a connection error, no ack).
    pub fn retry(error: impl Into<String>) -> Outcome {
        Outcome::Retry {
            status: None,
            error: error.into(),
            retry_after: None,
            response_bytes: 0,
        }
    }

    /// A failure for good, with no HTTP status or answer.
    pub fn fail(error: impl Into<String>) -> Outcome {
        Outcome::Final {
            status: None,
            error: error.into(),
            response_bytes: 0,
        }
    }

    /// The HTTP status of the attempt, if any.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Delivered { status, .. }
            | Outcome::Retry { status, .. }
            | Outcome::Final { status, .. } => *status,
        }
    }

    /// Bytes of answer read back.
    pub fn response_bytes(&self) -> u64 {
        match self {
            Outcome::Delivered { response_bytes, .. }
            | Outcome::Retry { response_bytes, .. }
            | Outcome::Final { response_bytes, .. } => *response_bytes,
        }
    }

    /// The error, for an attempt that failed.
    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Delivered { .. } => None,
            Outcome::Retry { error, .. } | Outcome::Final { error, .. } => Some(error),
        }
    }

    /// A short name: `delivered`, `retry` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Retry { .. } => "retry",
            Outcome::Final { .. } => "failed",
        }
    }
}

/// One agent's way of receiving deliveries. Implementations bound every
/// attempt by the agent's `timeout` themselves (a timeout is
/// [`Outcome::Retry`]).
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Makes one attempt.
    async fn send(&self, request: &Request) -> Outcome;
}

/// Builds the transport of agent `name` from its config: an HTTP client on
/// the guarded connector, a lazily connected JetStream publisher, a program
/// runner or an outbox file. `generate` says whether a generated bearer
/// token may be created (`serve`) or only previewed (`check`).
///
/// The error names the key at fault (`agents.NAME.url`) and what is wrong,
/// never a secret's value.
pub fn build(
    name: &str,
    agent: &AgentConfig,
    config: &crate::config::Config,
    generate: crate::secret::Generate,
) -> Result<Arc<dyn Transport>, String> {
    Ok(match agent.kind {
        AgentKind::Http => Arc::new(http::HttpTransport::new(name, agent, config, generate)?),
        AgentKind::Exec => Arc::new(exec::ExecTransport::new(name, agent)?),
        AgentKind::Nats => Arc::new(nats::NatsTransport::new(name, agent)?),
        AgentKind::Outbox => Arc::new(outbox::OutboxTransport::new(name, config)?),
    })
}

/// `agents.NAME.KEY`, as errors name a key.
fn key(name: &str, key: &str) -> String {
    format!("agents.{name}.{key}")
}

/// The answer as JSON, when it is JSON.
fn json_answer(bytes: &[u8]) -> Option<serde_json::Value> {
    serde_json::from_slice(bytes).ok()
}

pub mod exec;
pub mod http;
pub mod nats;
pub mod outbox;
