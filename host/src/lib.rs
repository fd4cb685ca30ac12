//! sluice: a webhook gateway with sandboxed, hot-reloaded routing rules.
//!
//! The library exposes [`app`] (the axum router over a ready [`AppState`]) and
//! [`run`] (the HTTP server on a bound listener), so tests drive the gateway
//! over real loopback sockets on port 0 and the binary is a thin CLI on top.

// The gateway itself has no unsafe code (the workspace denies it; only
// benches opt out, for a clock call).
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod decision;
pub mod dispatch;
pub mod event;
pub mod ingress;
pub mod metrics;
pub mod rules;
pub mod secret;
pub mod server;
pub mod store;

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};

use crate::config::Config;
use crate::ingress::budget::BodyBudget;
use crate::ingress::dedup::Dedup;
use crate::ingress::shield::Shield;
use crate::ingress::source::{SecretReport, SourceError, Sources, build_sources};
use crate::rules::SharedRuleSet;
use crate::rules::reload::SharedStatus;
use crate::rules::router::RouterOptions;
use crate::secret::Generate;
use crate::store::dispatch::DispatchStore;
use crate::store::{SqliteStore, Store};

pub use server::run;

/// Everything the request path shares.
pub struct AppState {
    /// The validated config.
    pub config: Arc<Config>,
    /// Sources by name, with their verifiers and loaded secrets; swapped
    /// whole when `SIGHUP` re-reads the secret files.
    pub sources: ArcSwap<Sources>,
    /// The per-client shield.
    pub shield: Shield,
    /// Body bytes all requests together may hold before verification.
    pub body_budget: BodyBudget,
    /// The in-memory dedup cache.
    pub dedup: Dedup,
    /// The durable event log.
    pub store: Arc<dyn Store>,
    /// The same store's dispatch role: deliveries, attempts, workflow runs,
    /// the dead-letter queue.
    pub dispatch: Arc<dyn DispatchStore>,
    /// What each rule file loaded as, served at `/status/rules` (kept by the
    /// rules' [`Reloader`](crate::rules::reload::Reloader)).
    pub rules_status: SharedStatus,
    /// The rule set serving, once `serve` has loaded it (for the breaker
    /// states `/status/rules` reports).
    pub live_rules: std::sync::OnceLock<SharedRuleSet>,
    /// The rules' record over the latest decisions as `/status/rules` last
    /// read it, and when: read at most once a second, on the blocking pool.
    pub rules_recorded: tokio::sync::Mutex<Option<(std::time::Instant, RecordedByRule)>>,
    /// What intake saw per source since start (the admin API's `/v1/sources`).
    pub intake: crate::ingress::stats::IntakeStats,
    /// The rules' reloader, once `serve` has loaded the rules (the admin
    /// API's `POST /v1/rules/reload` runs it).
    pub reloader: std::sync::OnceLock<Arc<crate::rules::reload::Reloader>>,
    /// The store's read role where it is not a file this process opens
    /// read-only (the NATS backend); `None`: the embedded store's file.
    pub reader: Option<Arc<dyn crate::store::EventReader>>,
}

/// Per-rule statistics over the latest decisions, by rule name; `None` when
/// the store could not be read.
type RecordedByRule = Option<std::collections::BTreeMap<String, crate::rules::stats::Recorded>>;

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("sources", &self.sources.load().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl AppState {
    /// Loads secrets (generating those the config allows), opens the
    /// embedded store. [`AppState::open`] opens any backend.
    pub fn build(config: Config) -> anyhow::Result<(Arc<AppState>, Vec<SecretReport>)> {
        anyhow::ensure!(
            config.store.backend == crate::config::Backend::Embedded,
            "{}: store.backend = \"nats\" is opened with AppState::open",
            config.origin
        );
        let store = Arc::new(open_embedded(&config)?);
        AppState::with_store(config, store.clone(), store)
    }

    /// Loads secrets (generating those the config allows) and opens the
    /// configured store backend: the embedded one, or NATS JetStream.
    pub async fn open(config: Config) -> anyhow::Result<(Arc<AppState>, Vec<SecretReport>)> {
        match config.store.backend {
            crate::config::Backend::Embedded => AppState::build(config),
            crate::config::Backend::Nats => {
                let options = crate::store::nats::NatsOptions::from_config(&config);
                let store = crate::store::nats::NatsStore::open(options)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: [store.nats]: {e}", config.origin))?;
                let store = Arc::new(store);
                let (state, reports) = AppState::with_store(config, store.clone(), store.clone())?;
                let mut state = Arc::into_inner(state).expect("just built");
                state.reader = Some(store);
                Ok((Arc::new(state), reports))
            }
        }
    }

    /// The state over an open store (its log and dispatch roles).
    pub fn with_store(
        config: Config,
        store: Arc<dyn Store>,
        dispatch: Arc<dyn DispatchStore>,
    ) -> anyhow::Result<(Arc<AppState>, Vec<SecretReport>)> {
        crate::metrics::handle();
        let (sources, reports) = build_sources(&config, Generate::IfMissing)?;
        let state = AppState {
            shield: Shield::new(&config.shield),
            body_budget: BodyBudget::new(
                config.server.body_budget_bytes,
                config.body_budget_per_client(),
            ),
            dedup: Dedup::new(config.store.dedup_capacity, config.store.dedup_ttl),
            sources: ArcSwap::from_pointee(sources),
            dispatch,
            store,
            rules_status: SharedStatus::default(),
            live_rules: std::sync::OnceLock::new(),
            rules_recorded: tokio::sync::Mutex::new(None),
            intake: crate::ingress::stats::IntakeStats::new(config.sources.keys()),
            reloader: std::sync::OnceLock::new(),
            reader: None,
            config: Arc::new(config),
        };
        Ok((Arc::new(state), reports))
    }

    /// Reads every source's secrets again (rotation without a restart) and
    /// swaps the new sources in; requests already verifying finish with the
    /// old ones. On an error the old sources keep serving.
    pub fn reload_secrets(&self) -> Result<Vec<SecretReport>, SourceError> {
        let (sources, reports) = build_sources(&self.config, Generate::IfMissing)?;
        self.sources.store(Arc::new(sources));
        Ok(reports)
    }
}

/// Opens the embedded store the config names.
fn open_embedded(config: &Config) -> anyhow::Result<SqliteStore> {
    let db = config.data_dir().join(&config.store.path);
    SqliteStore::open_with(
        &db,
        crate::store::sqlite::Options::from_config(&config.store, &config.rules),
    )
    .map_err(|e| anyhow::anyhow!("{}: store.path: {e}", config.origin))
}

/// The HTTP routes over a ready state.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/hooks/{source}", post(ingress::handler::receive))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/status/rules", get(rules_status))
        .with_state(state)
}

/// Runs the whole gateway until `shutdown`: HTTP intake on `listener` and the
/// router workers routing what intake stores. On shutdown, intake stops first
/// (requests in flight finish), then the workers finish the event in hand, then
/// the store commits what is queued and closes.
pub async fn serve(
    state: Arc<AppState>,
    rules: SharedRuleSet,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_with_admin(state, rules, listener, None, shutdown).await
}

/// [`serve`], with the admin API on its own listener beside intake when
/// `admin` is given; it stops after intake has drained.
pub async fn serve_with_admin(
    state: Arc<AppState>,
    rules: SharedRuleSet,
    listener: tokio::net::TcpListener,
    admin: Option<admin::AdminServer>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = admin.map(|a| {
        tokio::spawn(a.run(state.clone(), async move {
            let _ = admin_stopped.await;
        }))
    });
    let (stop_router, router_stopped) = tokio::sync::watch::channel(false);
    let dispatcher = if state.config.dispatch.enabled {
        let d = crate::dispatch::dispatcher::Dispatcher::build(
            &state.config,
            state.dispatch.clone(),
            Generate::IfMissing,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Some(d)
    } else {
        tracing::warn!("dispatch.enabled = false: deliveries are queued, none is sent");
        None
    };
    let router = tokio::spawn(rules::router::run(
        state.store.clone(),
        rules,
        RouterOptions::from(&state.config.rules),
        router_stopped,
    ));
    let dispatcher = dispatcher.map(|d| tokio::spawn(d.run(stop_router.subscribe())));
    let retention = tokio::spawn(keep_retention(
        state.store.clone(),
        state.config.store.retention,
        stop_router.subscribe(),
    ));
    let served = run(state.clone(), listener, shutdown).await;
    let _ = stop_admin.send(());
    if let Some(admin) = admin {
        match admin.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "admin API ended with an error"),
            Err(e) => tracing::error!(error = %e, "admin API ended abnormally"),
        }
    }
    let _ = stop_router.send(true);
    if let Err(e) = router.await {
        tracing::error!(error = %e, "router ended abnormally");
    }
    if let Some(d) = dispatcher
        && let Err(e) = d.await
    {
        tracing::error!(error = %e, "dispatcher ended abnormally");
    }
    let _ = retention.await;
    state.store.close().await;
    served
}

/// How often retention runs (and first, this long after start).
const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes what is older than `retention` (`store.retention`; zero keeps
/// everything) every [`RETENTION_EVERY`] until `stop` turns true.
async fn keep_retention(
    store: Arc<dyn Store>,
    retention: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if retention.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RETENTION_EVERY) => {}
            _ = stop.changed() => return,
        }
        let age = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = crate::event::now_ms().saturating_sub(age);
        // A long first pass over a large store must not hold up shutdown:
        // what it removed so far stays removed.
        let pass = tokio::select! {
            pass = store.expire(cutoff) => pass,
            _ = stop.changed() => return,
        };
        match pass {
            Ok(gone) if gone.events > 0 || gone.segments > 0 => {
                ::metrics::counter!("sluice_retention_removed_events_total").increment(gone.events);
                tracing::info!(
                    events = gone.events,
                    dead_letters = gone.dead_letters,
                    segments = gone.segments,
                    "retention removed events older than store.retention"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention pass failed; trying again later"),
        }
    }
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> String {
    // Per stage: events waiting to be routed, deliveries waiting per agent,
    // workflow runs open, and the dead-letter queue (events and deliveries).
    if let Ok(counts) = state.dispatch.dispatch_counts().await {
        for name in state.config.agents.keys() {
            let queued = counts
                .queued
                .iter()
                .find(|(a, _)| a == name)
                .map_or(0, |(_, n)| *n);
            ::metrics::gauge!("sluice_deliveries_queued", "agent" => name.clone())
                .set(queued as f64);
        }
        ::metrics::gauge!("sluice_workflow_runs_open").set(counts.runs_open as f64);
        ::metrics::gauge!("sluice_dlq_size").set(counts.dead_letters as f64);
    }
    crate::metrics::render(state.store.queue_depth().await.ok())
}

/// What `/status/rules` serves (and the admin API's `GET /v1/rules`).
pub async fn rules_status(
    State(state): State<Arc<AppState>>,
) -> axum::Json<crate::rules::stats::LiveStatus> {
    use crate::rules::stats::{DECISIONS, LiveStatus, breaker_name, record_by_rule};
    let breakers = state
        .live_rules
        .get()
        .map(|set| {
            let set = set.load();
            set.rules()
                .filter_map(|r| {
                    set.breaker_state(r.name())
                        .map(|b| (r.name().to_owned(), breaker_name(b).to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    let data_dir = state.config.data_dir();
    let recorded = {
        let mut cached = state.rules_recorded.lock().await;
        match &*cached {
            Some((at, recorded)) if at.elapsed() < std::time::Duration::from_secs(1) => {
                recorded.clone()
            }
            _ => {
                let recorded = match &state.reader {
                    Some(reader) => record_by_rule(reader.as_ref(), DECISIONS).await.ok(),
                    None => {
                        // SQLite reads block: on the blocking pool, not a
                        // runtime worker.
                        let db = data_dir.join(&state.config.store.path);
                        let handle = tokio::runtime::Handle::current();
                        tokio::task::spawn_blocking(move || {
                            let reader = SqliteStore::open_read_only(&db).ok()?;
                            handle.block_on(record_by_rule(&reader, DECISIONS)).ok()
                        })
                        .await
                        .ok()
                        .flatten()
                    }
                };
                *cached = Some((std::time::Instant::now(), recorded.clone()));
                recorded
            }
        }
    };
    axum::Json(LiveStatus {
        data_dir: std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_owned()),
        board: (**state.rules_status.load()).clone(),
        breakers,
        recorded,
    })
}

/// How long `/readyz` waits for the store to take a write: a load balancer's
/// probe needs an answer, and a store that cannot write within this is not
/// ready, whatever it would say later.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    match tokio::time::timeout(READY_WITHIN, state.store.ready()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "store not writable");
            (StatusCode::SERVICE_UNAVAILABLE, "store not writable")
        }
        Err(_) => {
            tracing::warn!(
                within_ms = READY_WITHIN.as_millis() as u64,
                "store took no write in time"
            );
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "store not writable in time",
            )
        }
    }
}
