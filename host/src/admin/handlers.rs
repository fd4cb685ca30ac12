//! The admin API's handlers: each reads or steers through the store's roles
//! (and [`super::queries`] for what they lack), and answers JSON.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::queries::{self, Cursor};
use super::{Admin, ApiError};
use crate::event::EventStatus;
use crate::store::ListFilter;
use crate::store::dispatch::{DeliveryFilter, DeliveryStatus, delivery_name, parse_delivery_name};

/// A listing's limit that takes every row (SQLite's LIMIT is signed).
const UNBOUNDED: usize = usize::MAX >> 1;

type Answer = Result<Json<Value>, ApiError>;

/// The default page size of the listings.
const DEFAULT_LIMIT: usize = 50;
/// The largest page a listing serves.
const MAX_LIMIT: usize = 1000;
/// The longest a tail request waits for something new.
const MAX_WAIT: Duration = Duration::from_secs(10);
/// How often a waiting tail looks again.
const TAIL_POLL: Duration = Duration::from_millis(200);

fn limit(n: Option<usize>) -> usize {
    n.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT)
}

pub(super) async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], super::OPENAPI)
}

#[derive(Debug, Deserialize)]
pub(super) struct EventsQuery {
    source: Option<String>,
    kind: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn events(State(a): State<Arc<Admin>>, Query(q): Query<EventsQuery>) -> Answer {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(EventStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status: unknown event status {s:?} (pending, claimed, routed, dead)"
            ))
        })?),
    };
    let filter = ListFilter {
        source: q.source,
        kind: q.kind,
        status,
        limit: limit(q.limit),
        ..ListFilter::default()
    };
    Ok(Json(json!({ "events": a.app.store.list(&filter).await? })))
}

/// A delivery with its attempts.
async fn with_attempts(
    a: &Admin,
    d: crate::store::dispatch::DeliverySummary,
) -> Result<Value, ApiError> {
    let n = parse_delivery_name(&d.id).unwrap_or_default();
    let attempts = a.app.dispatch.attempts(n).await?;
    let mut v = serde_json::to_value(&d)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    v["attempts_made"] = v["attempts"].take();
    v["attempts"] = json!(attempts);
    Ok(v)
}

pub(super) async fn event(State(a): State<Arc<Admin>>, Path(id): Path<String>) -> Answer {
    let record = a
        .app
        .store
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no event {id}")))?;
    let payload = serde_json::from_slice::<Value>(&record.event.body).unwrap_or_else(|_| {
        Value::String(String::from_utf8_lossy(&record.event.body).into_owned())
    });
    let listed = a
        .app
        .dispatch
        .deliveries(&DeliveryFilter {
            event_id: Some(id.clone()),
            limit: MAX_LIMIT,
            ..DeliveryFilter::default()
        })
        .await?;
    let mut deliveries = Vec::with_capacity(listed.len());
    for d in listed {
        deliveries.push(with_attempts(&a, d).await?);
    }
    let runs = a.app.dispatch.runs(&id).await?;
    let mut v = json!(record);
    v["payload"] = payload;
    v["deliveries"] = json!(deliveries);
    v["runs"] = json!(runs);
    Ok(Json(v))
}

pub(super) async fn replay(State(a): State<Arc<Admin>>, Path(id): Path<String>) -> Answer {
    if a.app.store.get(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("no event {id}")));
    }
    a.app.store.requeue(&id).await?;
    Ok(Json(json!({ "id": id, "status": "requeued" })))
}

#[derive(Debug, Deserialize)]
pub(super) struct DeliveriesQuery {
    agent: Option<String>,
    status: Option<String>,
    event: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn deliveries(
    State(a): State<Arc<Admin>>,
    Query(q): Query<DeliveriesQuery>,
) -> Answer {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(DeliveryStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status: unknown delivery status {s:?} (queued, delivered, dead)"
            ))
        })?),
    };
    let filter = DeliveryFilter {
        agent: q.agent,
        status,
        event_id: q.event,
        limit: limit(q.limit),
    };
    Ok(Json(
        json!({ "deliveries": a.app.dispatch.deliveries(&filter).await? }),
    ))
}

/// The delivery `dlv_<n>` as listed, if it exists.
async fn find_delivery(
    a: &Admin,
    n: i64,
) -> Result<Option<crate::store::dispatch::DeliverySummary>, ApiError> {
    let Some(event) = queries::read(&a.db, move |c| queries::delivery_event(c, n)).await? else {
        return Ok(None);
    };
    let name = delivery_name(n);
    let listed = a
        .app
        .dispatch
        .deliveries(&DeliveryFilter {
            event_id: Some(event),
            limit: UNBOUNDED,
            ..DeliveryFilter::default()
        })
        .await?;
    Ok(listed.into_iter().find(|d| d.id == name))
}

pub(super) async fn delivery(State(a): State<Arc<Admin>>, Path(id): Path<String>) -> Answer {
    let found = match parse_delivery_name(&id) {
        Some(n) => find_delivery(&a, n).await?,
        None => None,
    };
    let d = found.ok_or_else(|| ApiError::not_found(format!("no delivery {id}")))?;
    Ok(Json(with_attempts(&a, d).await?))
}

#[derive(Debug, Deserialize)]
pub(super) struct LimitQuery {
    limit: Option<usize>,
}

pub(super) async fn dlq(State(a): State<Arc<Admin>>, Query(q): Query<LimitQuery>) -> Answer {
    Ok(Json(
        json!({ "dead_letters": a.app.dispatch.dead_letters(limit(q.limit)).await? }),
    ))
}

/// Sends one dead letter again: `dlv_<n>` with fresh attempts, `evt_…`
/// through the rules again.
async fn retry_one(a: &Admin, id: &str) -> Result<(), ApiError> {
    if id.starts_with("evt_") {
        let record = a
            .app
            .store
            .get(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no event {id}")))?;
        if record.summary.status != EventStatus::Dead {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "event {id} is not a dead letter (it is {})",
                    record.summary.status.as_str()
                ),
            ));
        }
        a.app.store.requeue(id).await?;
        return Ok(());
    }
    let n = parse_delivery_name(id).ok_or_else(|| {
        ApiError::not_found(format!("no dead letter {id} (expected dlv_N or evt_…)"))
    })?;
    if a.app.dispatch.retry_delivery(n).await? {
        return Ok(());
    }
    match queries::read(&a.db, move |c| queries::delivery_event(c, n)).await? {
        None => Err(ApiError::not_found(format!("no delivery {id}"))),
        Some(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("delivery {id} is not a dead letter"),
        )),
    }
}

pub(super) async fn dlq_retry(State(a): State<Arc<Admin>>, Path(id): Path<String>) -> Answer {
    retry_one(&a, &id).await?;
    Ok(Json(json!({ "id": id, "status": "retrying" })))
}

pub(super) async fn dlq_retry_all(State(a): State<Arc<Admin>>) -> Answer {
    let dead = a.app.dispatch.dead_letters(UNBOUNDED).await?;
    let (mut retried, mut failed) = (0u64, Vec::new());
    for d in &dead {
        match retry_one(&a, &d.id).await {
            Ok(()) => retried += 1,
            Err(e) => failed.push(json!({ "id": d.id, "error": e.message })),
        }
    }
    Ok(Json(
        json!({ "retried": retried, "failed": failed.len(), "failures": failed }),
    ))
}

pub(super) async fn rules(State(a): State<Arc<Admin>>) -> impl IntoResponse {
    crate::rules_status(State(a.app.clone())).await
}

pub(super) async fn rules_reload(State(a): State<Arc<Admin>>) -> Answer {
    let reloader = a.app.reloader.get().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server has no rules reloader (not started by `sluice serve`)",
        )
    })?;
    let report = tokio::task::spawn_blocking(move || reloader.reload())
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reload failed: {e}"),
            )
        })?;
    Ok(Json(json!({
        "loaded": report.loaded,
        "failed": report.failed,
        "removed": report.removed,
        "swapped": report.swapped,
        "status": **a.app.rules_status.load(),
    })))
}

pub(super) async fn sources(State(a): State<Arc<Admin>>) -> Answer {
    let counts = queries::read(&a.db, queries::source_counts).await?;
    let mut out = Vec::new();
    for (name, src) in &a.app.config.sources {
        let stored = counts.get(name).cloned().unwrap_or_default();
        let intake = a.app.intake.get(name).unwrap_or_default();
        out.push(json!({
            "name": name,
            "provider": src.provider,
            "events": stored.events,
            "last_received_ms": stored.last_received_ms.max(intake.last_received_ms),
            "since_start": intake,
        }));
    }
    Ok(Json(json!({ "sources": out })))
}

pub(super) async fn agents(State(a): State<Arc<Admin>>) -> Answer {
    let paused = a.app.dispatch.paused().await?;
    let counts = a.app.dispatch.dispatch_counts().await?;
    let out: Vec<Value> = a
        .app
        .config
        .agents
        .iter()
        .map(|(name, cfg)| {
            json!({
                "name": name,
                "kind": cfg.kind.as_str(),
                "paused": paused.contains(name),
                "queued": counts.queued.iter().find(|(n, _)| n == name).map_or(0, |(_, q)| *q),
            })
        })
        .collect();
    Ok(Json(json!({ "agents": out })))
}

async fn set_paused(a: &Admin, name: &str, paused: bool) -> Answer {
    if !a.app.config.agents.contains_key(name) {
        return Err(ApiError::not_found(format!(
            "no agent {name:?} in the config"
        )));
    }
    a.app.dispatch.set_paused(name, paused).await?;
    Ok(Json(json!({ "name": name, "paused": paused })))
}

pub(super) async fn pause(State(a): State<Arc<Admin>>, Path(name): Path<String>) -> Answer {
    set_paused(&a, &name, true).await
}

pub(super) async fn resume(State(a): State<Arc<Admin>>, Path(name): Path<String>) -> Answer {
    set_paused(&a, &name, false).await
}

#[derive(Debug, Deserialize)]
pub(super) struct TailQuery {
    after: Option<String>,
    wait: Option<u64>,
}

pub(super) async fn tail(State(a): State<Arc<Admin>>, Query(q): Query<TailQuery>) -> Answer {
    let Some(after) = q.after else {
        let now = queries::read(&a.db, queries::cursor_now).await?;
        return Ok(Json(json!(queries::TailBatch {
            cursor: now.to_string(),
            ..Default::default()
        })));
    };
    let after: Cursor = after
        .parse()
        .map_err(|e: String| ApiError::bad_request(format!("after: {e}")))?;
    let wait = Duration::from_millis(q.wait.unwrap_or(0)).min(MAX_WAIT);
    let until = tokio::time::Instant::now() + wait;
    loop {
        let batch = queries::read(&a.db, move |c| queries::changes_since(c, after)).await?;
        if !batch.is_empty() || tokio::time::Instant::now() + TAIL_POLL > until {
            return Ok(Json(json!(batch)));
        }
        tokio::time::sleep(TAIL_POLL).await;
    }
}
