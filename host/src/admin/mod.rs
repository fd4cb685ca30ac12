//! The operator's admin API: a JSON API under `/v1` on its own listener
//! (`[admin] listen`), every request behind `Authorization: Bearer <token>`.
//!
//! It reads and steers what the gateway holds: events with their decisions,
//! deliveries and workflow runs; replays and dead-letter retries; the rules
//! and their reload; per-source intake records; agents and their pause; and
//! a long-polled tail for `sluice events tail`. Its document is
//! `GET /v1/openapi.json`, kept beside the code and checked against the
//! routes by a test.
//!
//! It never serves without the token, never echoes it, and never shows a
//! secret or signature (the intake record keeps reason classes only).

mod handlers;
pub mod queries;
mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use tokio::net::TcpListener;

use crate::AppState;
use crate::config::Config;
use crate::event::Provider;
use crate::secret::{Generate, Loaded, Secret, SecretOrigin};

/// The OpenAPI 3.1 document served at `GET /v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The shortest token accepted, in bytes.
pub const MIN_TOKEN_BYTES: usize = 16;

/// The config key of the token, named in errors.
const TOKEN_KEY: &str = "admin.token";

/// An admin API error: a status and a message, served as `{"error": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 404 with a message.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// The status this error is served with.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        use crate::store::StoreError;
        let status = match &e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Busy(_) | StoreError::Closed => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::LeaseLost(_) => StatusCode::CONFLICT,
            StoreError::Backend(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            // The cause goes to the log, not to the client.
            tracing::error!(error = %e, "admin API: store read failed");
            return ApiError::new(status, "store failed; see the server log");
        }
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// What the admin handlers share.
pub struct Admin {
    /// The gateway's state.
    pub app: Arc<AppState>,
    /// The SQLite index the extra reads of [`queries`] open read-only (the
    /// embedded store's, or this node's index of the NATS backend).
    pub db: PathBuf,
    token: Secret,
}

/// Loads `[admin] token` as `serve` does (generating it under the data dir
/// when the config allows and `generate` says so) and refuses one shorter
/// than [`MIN_TOKEN_BYTES`], naming the key.
pub fn load_token(config: &Config, generate: Generate) -> anyhow::Result<Loaded> {
    let loaded = crate::secret::load_all(
        config,
        "admin",
        TOKEN_KEY,
        ".token",
        Provider::None,
        std::slice::from_ref(&config.admin.token),
        generate,
    )?
    .pop()
    .context("admin.token: no token configured")?;
    if loaded.secret.expose().len() < MIN_TOKEN_BYTES {
        anyhow::bail!(
            "{}: {TOKEN_KEY}: the admin token is shorter than {MIN_TOKEN_BYTES} bytes; use a longer one",
            config.origin
        );
    }
    Ok(loaded)
}

/// The admin listener with its token, ready to serve.
pub struct AdminServer {
    listener: TcpListener,
    token: Loaded,
}

impl std::fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServer")
            .field("listener", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl AdminServer {
    /// Loads the token (generating it if allowed) and binds `[admin] listen`.
    pub async fn bind(config: &Config) -> anyhow::Result<AdminServer> {
        let listen = config.admin.listen;
        let listener = TcpListener::bind(listen).await.with_context(|| {
            format!("{}: admin.listen: cannot listen on {listen}", config.origin)
        })?;
        AdminServer::with_listener(config, listener)
    }

    /// Loads the token (generating it if allowed) for a listener bound
    /// elsewhere (tests bind port 0).
    pub fn with_listener(config: &Config, listener: TcpListener) -> anyhow::Result<AdminServer> {
        let token = load_token(config, Generate::IfMissing)?;
        Ok(AdminServer { listener, token })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where the token came from (for the startup lines; never its value).
    pub fn token_origin(&self) -> &SecretOrigin {
        &self.token.origin
    }

    /// Serves the admin API until `shutdown` resolves.
    pub async fn run(
        self,
        state: Arc<AppState>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let server = state.config.server.clone();
        let router = router(state, self.token.secret);
        server::run(router, self.listener, &server, shutdown).await
    }
}

/// Every route: its method, its path and its handler. The router is built
/// from this table, and a test checks it against [`OPENAPI`].
fn routes() -> Vec<(&'static str, &'static str, MethodRouter<Arc<Admin>>)> {
    use axum::routing::{get, post};
    use handlers as h;
    vec![
        ("get", "/v1/openapi.json", get(h::openapi)),
        ("get", "/v1/events", get(h::events)),
        ("get", "/v1/events/{id}", get(h::event)),
        ("post", "/v1/events/{id}/replay", post(h::replay)),
        ("get", "/v1/deliveries", get(h::deliveries)),
        ("get", "/v1/deliveries/{id}", get(h::delivery)),
        ("get", "/v1/dlq", get(h::dlq)),
        ("post", "/v1/dlq/{id}/retry", post(h::dlq_retry)),
        ("post", "/v1/dlq/retry-all", post(h::dlq_retry_all)),
        ("get", "/v1/rules", get(h::rules)),
        ("post", "/v1/rules/reload", post(h::rules_reload)),
        ("get", "/v1/sources", get(h::sources)),
        ("get", "/v1/agents", get(h::agents)),
        ("post", "/v1/agents/{name}/pause", post(h::pause)),
        ("post", "/v1/agents/{name}/resume", post(h::resume)),
        ("get", "/v1/tail", get(h::tail)),
    ]
}

/// The `(method, path)` of every route served, in table order.
pub fn served_routes() -> Vec<(&'static str, &'static str)> {
    routes().into_iter().map(|(m, p, _)| (m, p)).collect()
}

/// The admin router over a ready state, requiring `token` on every request.
pub fn router(app: Arc<AppState>, token: Secret) -> Router {
    let db = app.config.index_path();
    let admin = Arc::new(Admin { app, db, token });
    let mut router = Router::new();
    for (_, path, handler) in routes() {
        router = router.route(path, handler);
    }
    router
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            admin.clone(),
            authorize,
        ))
        .with_state(admin)
}

/// Lets a request through only with `Authorization: Bearer <token>`,
/// compared in constant time. A missing and a wrong token get the same body.
async fn authorize(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    use subtle::ConstantTimeEq;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .map(<[u8]>::trim_ascii);
    let ok = given.is_some_and(|g| bool::from(g.ct_eq(admin.token.expose())));
    if ok {
        return next.run(req).await;
    }
    let mut r =
        ApiError::new(StatusCode::UNAUTHORIZED, "a valid bearer token is required").into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn every_route_is_documented_and_every_documented_route_is_served() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1"))
        );
        let mut documented = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("operations").keys() {
                if method != "parameters" {
                    documented.insert((method.clone(), path.clone()));
                }
            }
        }
        let served: BTreeSet<_> = served_routes()
            .into_iter()
            .map(|(m, p)| (m.to_owned(), p.to_owned()))
            .collect();
        assert_eq!(served, documented);
    }

    #[test]
    fn store_errors_map_to_statuses_without_internals() {
        use crate::store::StoreError;
        let e = ApiError::from(StoreError::NotFound("evt_x".into()));
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let e = ApiError::from(StoreError::Backend("/secret/path: disk I/O".into()));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.message.contains("/secret/path"));
    }
}
