//! `nats` agents: publish the envelope to a JetStream subject and wait for
//! the stream's ack.
//!
//! The connection is made on the first attempt and kept (async-nats
//! reconnects it on its own); a failed connect is tried again on the next
//! attempt. The idempotency key goes as `Nats-Msg-Id`, so a repeat within
//! the stream's duplicate window is dropped by the server, and the
//! `webhook-*` headers travel as message headers.
//!
//! Errors never name the server URL: it may carry a user and password.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::{Outcome, Request, Transport, key};
use crate::dispatch::config::AgentConfig;

/// A `nats` agent's transport.
pub struct NatsTransport {
    server: String,
    subject: String,
    timeout: Duration,
    context: OnceCell<jetstream::Context>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the server: its URL may hold credentials.
        f.debug_struct("NatsTransport")
            .field("subject", &self.subject)
            .field("timeout", &self.timeout)
            .field("connected", &self.context.initialized())
            .finish_non_exhaustive()
    }
}

impl NatsTransport {
    /// The transport of `nats` agent `name`; nothing is connected yet.
    pub fn new(name: &str, agent: &AgentConfig) -> Result<NatsTransport, String> {
        let server = agent
            .server
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                format!(
                    "{}: a nats agent needs `server` (nats://host:port)",
                    key(name, "server")
                )
            })?;
        // Parsed here so a typo is a config error, not a retry forever.
        server.parse::<async_nats::ServerAddr>().map_err(|_| {
            format!(
                "{}: not a NATS server address (nats://host:port)",
                key(name, "server")
            )
        })?;
        let subject = agent
            .subject
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("{}: a nats agent needs `subject`", key(name, "subject")))?;
        if subject.contains(['*', '>', ' ', '\t', '\r', '\n'])
            || subject.split('.').any(str::is_empty)
        {
            return Err(format!(
                "{}: {subject:?} is not a subject to publish to (no wildcards, spaces or empty tokens)",
                key(name, "subject")
            ));
        }
        Ok(NatsTransport {
            server,
            subject,
            timeout: agent.timeout,
            context: OnceCell::new(),
        })
    }

    /// The JetStream context, connecting first if there is none yet.
    async fn context(&self) -> Result<&jetstream::Context, String> {
        self.context
            .get_or_try_init(|| async {
                let client = async_nats::ConnectOptions::new()
                    .name(concat!("sluice/", env!("CARGO_PKG_VERSION")))
                    .connection_timeout(self.timeout)
                    .connect(self.server.as_str())
                    .await
                    .map_err(|e| format!("cannot connect to the NATS server: {e}"))?;
                let mut context = jetstream::new(client);
                context.set_timeout(self.timeout);
                Ok(context)
            })
            .await
    }

    async fn publish(&self, request: &Request) -> Result<jetstream::publish::PublishAck, Outcome> {
        let retry = |error: String| Outcome::Retry {
            status: None,
            error,
            retry_after: None,
            response_bytes: 0,
        };
        let context = self.context().await.map_err(retry)?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            request.idempotency_key.as_str(),
        );
        for (name, value) in &request.headers {
            let header = name
                .parse::<async_nats::HeaderName>()
                .ok()
                .filter(|_| !value.contains(['\r', '\n']))
                .ok_or_else(|| {
                    Outcome::fail(format!("header {name} cannot be sent as a NATS header"))
                })?;
            headers.insert(header, value.as_str());
        }
        let publishing = context
            .publish_with_headers(self.subject.clone(), headers, request.body.clone())
            .await
            .map_err(|e| self.publish_error(e.kind(), &e))?;
        publishing
            .await
            .map_err(|e| self.publish_error(e.kind(), &e))
    }

    fn publish_error(&self, kind: PublishErrorKind, e: &dyn std::fmt::Display) -> Outcome {
        let subject = &self.subject;
        let (error, last) = match kind {
            PublishErrorKind::StreamNotFound => (
                format!("no JetStream stream covers subject {subject} (create one that does)"),
                false,
            ),
            PublishErrorKind::TimedOut => (
                format!(
                    "no JetStream ack within {}",
                    humantime::format_duration(self.timeout)
                ),
                false,
            ),
            PublishErrorKind::MaxPayloadExceeded => (
                format!("the envelope is larger than the NATS server's max_payload: {e}"),
                true,
            ),
            _ => (format!("JetStream publish to {subject} failed: {e}"), false),
        };
        if last {
            Outcome::Final {
                status: None,
                error,
                response_bytes: 0,
            }
        } else {
            Outcome::Retry {
                status: None,
                error,
                retry_after: None,
                response_bytes: 0,
            }
        }
    }
}

#[async_trait]
impl Transport for NatsTransport {
    async fn send(&self, request: &Request) -> Outcome {
        match tokio::time::timeout(self.timeout, self.publish(request)).await {
            Ok(Ok(_ack)) => Outcome::Delivered {
                status: None,
                answer: None,
                response_bytes: 0,
            },
            Ok(Err(outcome)) => outcome,
            Err(_) => Outcome::retry(format!(
                "timed out after {} (connecting, publishing or waiting for the JetStream ack)",
                humantime::format_duration(self.timeout)
            )),
        }
    }
}
