//! A real local agent for dispatch tests: an HTTP server on a loopback port
//! that verifies every delivery with the reference Standard Webhooks library
//! (`standardwebhooks`, not sluice's verifier), records it, and answers as
//! each agent's script says: fail the first attempts, answer 429 with
//! `Retry-After`, stall past the sender's timeout, or fail until told not to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use standardwebhooks::Webhook;

/// How one agent answers.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Answer 503 to the first this many attempts of each delivery.
    pub fail_first: u32,
    /// Answer 429 with `Retry-After: n` (seconds) to each delivery's first attempt.
    pub retry_after_first: Option<u64>,
    /// Stall this long before answering each delivery's first attempt (then
    /// answer 504: the sender has given up by then).
    pub stall_first: Option<Duration>,
    /// Answer 500 to everything while set.
    pub down: bool,
    /// Answer this JSON on success (default `{"ok": true, "agent": NAME}`).
    pub answer: Option<serde_json::Value>,
    /// Stall this long before every answer.
    pub latency: Option<Duration>,
}

/// One delivery attempt as the agent saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The agent (the URL path's last segment).
    pub agent: String,
    /// `webhook-id`.
    pub id: String,
    /// When it arrived.
    pub at: Instant,
    /// The envelope.
    pub body: serde_json::Value,
    /// Whether the reference library verified its signature.
    pub verified: bool,
    /// What the agent answered.
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    in_flight: usize,
    most_in_flight: usize,
    scripts: HashMap<String, Script>,
    seen: Vec<Received>,
    attempts: HashMap<(String, String), u32>,
}

/// The running agent server.
#[derive(Clone)]
pub struct AgentServer {
    /// Where it listens.
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    secret: String,
}

impl AgentServer {
    /// Starts a server whose deliveries must verify with `secret` (`whsec_…`).
    pub async fn start(secret: &str) -> AgentServer {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let server = AgentServer {
            addr: "127.0.0.1:0".parse().unwrap(),
            inner,
            secret: secret.to_string(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/agents/{agent}", post(receive))
            .with_state(server.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        AgentServer { addr, ..server }
    }

    /// The URL of one agent.
    pub fn url(&self, agent: &str) -> String {
        format!("http://{}/agents/{agent}", self.addr)
    }

    /// Sets an agent's script.
    pub fn script(&self, agent: &str, script: Script) {
        self.inner
            .lock()
            .unwrap()
            .scripts
            .insert(agent.to_string(), script);
    }

    /// The most requests it was answering at once.
    pub fn most_in_flight(&self) -> usize {
        self.inner.lock().unwrap().most_in_flight
    }

    /// Requests that arrived for `agent` under key `id`, answered or not
    /// (a sender that died mid-request is counted too).
    pub fn arrivals(&self, agent: &str, id: &str) -> u32 {
        self.inner
            .lock()
            .unwrap()
            .attempts
            .get(&(agent.to_owned(), id.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Every attempt seen so far.
    pub fn seen(&self) -> Vec<Received> {
        self.inner.lock().unwrap().seen.clone()
    }

    /// The attempts an agent answered 2xx.
    pub fn delivered(&self, agent: &str) -> Vec<Received> {
        self.seen()
            .into_iter()
            .filter(|r| r.agent == agent && (200..300).contains(&r.status))
            .collect()
    }

    /// Waits until `done` holds over what was seen, or panics after `limit`.
    pub async fn until(&self, limit: Duration, what: &str, done: impl Fn(&[Received]) -> bool) {
        let start = Instant::now();
        loop {
            if done(&self.seen()) {
                return;
            }
            if start.elapsed() > limit {
                let seen = self.seen();
                panic!(
                    "timed out after {limit:?} waiting for {what}; {} attempts seen: {:?}",
                    seen.len(),
                    seen.iter()
                        .map(|r| (&r.agent, &r.id, r.status))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn receive(
    State(server): State<AgentServer>,
    Path(agent): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    let verified = Webhook::new(&server.secret)
        .map(|wh| wh.verify(&body, &headers).is_ok())
        .unwrap_or(false);
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let (script, n) = {
        let mut inner = server.inner.lock().unwrap();
        let script = inner.scripts.get(&agent).cloned().unwrap_or_default();
        inner.in_flight += 1;
        inner.most_in_flight = inner.most_in_flight.max(inner.in_flight);
        let n = inner
            .attempts
            .entry((agent.clone(), id.clone()))
            .and_modify(|n| *n += 1)
            .or_insert(1);
        (script, *n)
    };
    if let Some(l) = script.latency {
        tokio::time::sleep(l).await;
    }
    if let Some(stall) = script.stall_first.filter(|_| n == 1) {
        // Recorded as it arrives, as a failure: the sender gives up first.
        server.inner.lock().unwrap().seen.push(Received {
            agent,
            id,
            at,
            body: envelope,
            verified,
            status: 504,
        });
        tokio::time::sleep(stall).await;
        server.inner.lock().unwrap().in_flight -= 1;
        return (StatusCode::GATEWAY_TIMEOUT, "stalled").into_response();
    }
    let (status, response) = if script.down || n <= script.fail_first {
        (
            503,
            (StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
        )
    } else if n == 1
        && let Some(secs) = script.retry_after_first
    {
        (
            429,
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", secs.to_string())],
                "slow down",
            )
                .into_response(),
        )
    } else {
        let answer = script
            .answer
            .clone()
            .unwrap_or_else(|| serde_json::json!({"ok": true, "agent": agent}));
        (200, axum::Json(answer).into_response())
    };
    let mut inner = server.inner.lock().unwrap();
    inner.in_flight -= 1;
    inner.seen.push(Received {
        agent,
        id,
        at,
        body: envelope,
        verified,
        status,
    });
    response
}
