//! `POST /hooks/{source}`: one request through limits, verification,
//! normalisation, dedup and the durable append, in that order.
//!
//! It answers 202 only after the store has committed the event. It never
//! echoes secrets or expected signatures, and its error bodies name the header
//! or limit at fault without leaking internals.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use bytes::BytesMut;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;

use super::budget::Reservation;
use super::normalize::{NormalizeError, normalize};
use super::shield::client;
use super::source::Source;
use crate::AppState;
use crate::event::{Provider, now_ms};
use crate::store::{Appended, StoreError};

/// Why a request was turned away before it became an event.
#[derive(Debug)]
enum Refusal {
    UnknownSource,
    Forbidden,
    RateLimited(std::time::Duration),
    TooLarge(usize),
    OverBudget,
    BodyTimeout,
    BadBody(String),
    Unverified(super::verify::VerifyError),
    Unusable(NormalizeError),
    StoreDown,
    /// The store's write queue is full or the log is slow: retry soon.
    StoreBusy,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            Refusal::UnknownSource => (StatusCode::NOT_FOUND, json!({"error": "unknown source"})),
            Refusal::Forbidden => (
                StatusCode::FORBIDDEN,
                json!({"error": "client address not allowed for this source"}),
            ),
            Refusal::RateLimited(wait) => {
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let mut r = (
                    StatusCode::TOO_MANY_REQUESTS,
                    Json(json!({"error": "rate limited"})),
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                return r;
            }
            Refusal::OverBudget => {
                return retry_soon("too many bodies in flight, retry later");
            }
            Refusal::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "body too large", "limit_bytes": limit}),
            ),
            Refusal::BodyTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                json!({"error": "body not received in time"}),
            ),
            Refusal::BadBody(detail) => (
                StatusCode::BAD_REQUEST,
                json!({"error": "body could not be read", "detail": detail}),
            ),
            Refusal::Unverified(e) => (
                StatusCode::UNAUTHORIZED,
                json!({"error": "verification failed", "reason": e.class(), "header": e.header()}),
            ),
            Refusal::Unusable(e) => (
                StatusCode::BAD_REQUEST,
                json!({"error": "unusable event", "detail": e.to_string()}),
            ),
            Refusal::StoreDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "store unavailable, retry later"}),
            ),
            Refusal::StoreBusy => return retry_soon("store busy, retry later"),
        };
        (status, Json(body)).into_response()
    }
}

/// A 503 that asks the sender to retry in a second or so.
fn retry_soon(error: &str) -> Response {
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": error })),
    )
        .into_response();
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(OVER_BUDGET_RETRY_SECS),
    );
    r
}

impl Refusal {
    /// The outcome label for metrics.
    fn outcome(&self) -> &'static str {
        match self {
            Refusal::UnknownSource => "unknown_source",
            Refusal::Forbidden => "forbidden",
            Refusal::RateLimited(_) => "rate_limited",
            Refusal::TooLarge(_) => "too_large",
            Refusal::OverBudget => "over_budget",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::BadBody(_) => "bad_body",
            Refusal::Unverified(_) => "unverified",
            Refusal::Unusable(_) => "unusable",
            Refusal::StoreDown => "store_unavailable",
            Refusal::StoreBusy => "store_busy",
        }
    }
}

/// The webhook endpoint.
pub async fn receive(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    // Only configured names become labels; anything else is "unknown".
    let label = state
        .sources
        .load()
        .get_key_value(&name)
        .map_or("unknown", |(k, _)| k.as_str())
        .to_string();
    let (outcome, response) = match accept(&state, &name, req).await {
        Ok(done) => {
            state.intake.record(&name, done.0, None);
            done
        }
        Err(refusal) => {
            tracing::debug!(source = %name, ?refusal, "request refused");
            let class = match &refusal {
                Refusal::Unverified(e) => Some(e.class()),
                _ => None,
            };
            if let Some(class) = class {
                metrics::counter!("sluice_verification_failures_total", "source" => label.clone(), "reason" => class)
                    .increment(1);
            }
            state.intake.record(&name, refusal.outcome(), class);
            (refusal.outcome(), refusal.into_response())
        }
    };
    metrics::counter!("sluice_ingress_requests_total", "source" => label, "outcome" => outcome)
        .increment(1);
    response
}

async fn accept(
    state: &AppState,
    name: &str,
    req: Request,
) -> Result<(&'static str, Response), Refusal> {
    // 1. Limits: the shield and the allow-list before anything costly.
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let client = client(peer, req.headers(), &state.config.server.trusted_proxies);
    state.shield.check(client).map_err(Refusal::RateLimited)?;
    let source = state
        .sources
        .load()
        .get(name)
        .cloned()
        .ok_or(Refusal::UnknownSource)?;
    if !source.allow_ips.is_empty() && !client.is_in(&source.allow_ips) {
        return Err(Refusal::Forbidden);
    }
    let (parts, body) = req.into_parts();
    let limit = source.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Refusal::TooLarge(limit));
    }
    // A declared length is reserved whole before a byte is read.
    let declared = declared.map_or(0, |n| n as usize);
    let mut reserved = state
        .body_budget
        .reserve(client.key(), declared)
        .ok_or(Refusal::OverBudget)?;
    let body = tokio::time::timeout(
        state.config.server.body_timeout,
        read_body(body, limit, declared, &mut reserved),
    )
    .await
    .map_err(|_| Refusal::BodyTimeout)??;

    // 2. Verify on the raw bytes.
    // The reservation goes with the body: it returns only once verification
    // is done with it, even when this request is dropped meanwhile.
    let verified = verify(&source, parts.headers, body, reserved)
        .await
        .map_err(Refusal::Unverified)?;
    if let Some(limiter) = &source.limiter {
        limiter.check().map_err(|nu| {
            Refusal::RateLimited(nu.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            )))
        })?;
    }

    // 3. Normalise.
    let event = normalize(
        &source.name,
        source.provider,
        &source.naming,
        verified,
        now_ms(),
    )
    .map_err(Refusal::Unusable)?;
    if source.provider == Provider::Slack && event.kind() == "url_verification" {
        return Ok(("challenge", slack_challenge(event.body())));
    }

    // 4. Dedup, in memory first; the store's dedup table is the authority.
    let key = event.dedup_key();
    // A cached id whose event is gone (lost with its log record, or removed
    // by retention) is no duplicate: the store decides this copy's fate.
    if let Some(id) = state.dedup.get(&key)
        && state.store.holds(&id).await.unwrap_or(true)
    {
        metrics::counter!("sluice_dedup_hits_total", "source" => source.name.clone(), "layer" => "cache").increment(1);
        return Ok(("duplicate", duplicate(&id)));
    }
    let delivery_id = event.delivery_id().to_string();
    let until = event.dedup_until_ms(state.config.store.dedup_ttl);

    // 5. Durable append; only now is the event acknowledged.
    let started = std::time::Instant::now();
    let appended = state.store.append(event).await.map_err(|e| match e {
        StoreError::Busy(_) => {
            tracing::warn!(source = %source.name, error = %e, "append refused");
            Refusal::StoreBusy
        }
        e => {
            tracing::error!(source = %source.name, error = %e, "append failed");
            Refusal::StoreDown
        }
    })?;
    metrics::histogram!("sluice_store_append_seconds").record(started.elapsed().as_secs_f64());
    match (&appended, until) {
        // A copy of a body-hash delivery is held only until the first copy's
        // deadline, which the store keeps: not cached under this copy's.
        (Appended::Duplicate(_), Some(_)) => {}
        _ => state.dedup.insert(key, appended.id(), until),
    }
    Ok(match appended {
        Appended::Stored(id) => (
            "accepted",
            (
                StatusCode::ACCEPTED,
                Json(json!({"status": "accepted", "id": id})),
            )
                .into_response(),
        ),
        Appended::IdConflict { id, conflict_with } => {
            // The same unsigned id came with another body: one of the two is
            // a replay under a chosen id, or the sender reused it. Both are
            // kept and routed; this one is marked.
            tracing::warn!(
                source = %source.name,
                delivery_id = %delivery_id,
                event = %id,
                conflict_with = %conflict_with,
                "delivery id already used by another event with a different body; stored as its own event"
            );
            metrics::counter!("sluice_id_conflicts_total", "source" => source.name.clone())
                .increment(1);
            (
                "accepted",
                (
                    StatusCode::ACCEPTED,
                    Json(json!({"status": "accepted", "id": id, "conflict_with": conflict_with})),
                )
                    .into_response(),
            )
        }
        Appended::Duplicate(id) => {
            metrics::counter!("sluice_dedup_hits_total", "source" => source.name.clone(), "layer" => "store").increment(1);
            ("duplicate", duplicate(&id))
        }
    })
}

/// Seconds a request refused for want of body budget is told to wait.
const OVER_BUDGET_RETRY_SECS: u64 = 2;

/// Bodies larger than this are verified on the blocking pool: hashing a large
/// body would hold an async worker, and every connection it serves, meanwhile.
const VERIFY_INLINE_MAX: usize = 64 * 1024;

/// Reads the body up to `limit`, holding budget for every byte read.
async fn read_body(
    body: axum::body::Body,
    limit: usize,
    declared: usize,
    reserved: &mut Reservation,
) -> Result<Bytes, Refusal> {
    let mut body = Limited::new(body, limit);
    let mut buf = BytesMut::with_capacity(declared.min(limit));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                Refusal::TooLarge(limit)
            } else {
                Refusal::BadBody(e.to_string())
            }
        })?;
        if let Ok(data) = frame.into_data() {
            if !reserved.grow_to(buf.len() + data.len()) {
                return Err(Refusal::OverBudget);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Verifies off the async workers when the body is large; `reserved` (the
/// body's share of the budget) is released when verification is done.
async fn verify(
    source: &Arc<Source>,
    headers: http::HeaderMap,
    body: Bytes,
    reserved: Reservation,
) -> Result<super::verify::Verified, super::verify::VerifyError> {
    if body.len() <= VERIFY_INLINE_MAX {
        let verified = source.verifier.verify(headers, body);
        drop(reserved);
        return verified;
    }
    let source = source.clone();
    let verify = move || {
        let verified = source.verifier.verify(headers, body);
        drop(reserved);
        verified
    };
    match tokio::task::spawn_blocking(verify).await {
        Ok(verified) => verified,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn duplicate(id: &str) -> Response {
    (
        StatusCode::OK,
        Json(json!({"status": "duplicate", "id": id})),
    )
        .into_response()
}

/// Slack checks a new Events API URL by sending a signed `url_verification`
/// and expecting its `challenge` back; it is not an event to store.
fn slack_challenge(body: &Bytes) -> Response {
    let challenge = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("challenge")
                .and_then(|c| c.as_str())
                .map(str::to_string)
        })
        .unwrap_or_default();
    (StatusCode::OK, Json(json!({"challenge": challenge}))).into_response()
}
