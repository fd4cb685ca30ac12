//! The HTTP server: a hyper accept loop in front of [`crate::app`].
//!
//! It owns the connection-level limits axum does not: a header read timeout
//! (slow-drip clients are cut off), a cap on header size and count, and a cap
//! on concurrent connections, overall and per client (an IPv4 address, an IPv6
//! /64; trusted proxies, which carry many clients, are exempt). Shutdown stops accepting and lets requests in
//! flight finish (bounded); closing the store is the caller's (see [`crate::serve`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::AppState;
use crate::ingress::shield::ClientKey;

/// Largest request head (request line and headers) accepted; beyond it, 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most headers in one request; beyond it, 431.
const MAX_HEADERS: usize = 100;
/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves the gateway on `listener` until `shutdown` resolves.
pub async fn run(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let router = crate::app(state.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(state.config.server.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(state.config.server.max_connections.max(1)));
    let per_client = PerClient::new(state.config.server.max_connections_per_client);

    let sweeper = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                state.shield.sweep();
            }
        })
    };

    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let peer_ip = peer.ip().to_canonical();
        let exempt = state
            .config
            .server
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer_ip));
        let per_client = if exempt {
            None
        } else {
            match per_client.hold(ClientKey::of(peer_ip)) {
                Some(held) => Some(held),
                None => {
                    // Closed unread: answering would cost what the cap saves.
                    tracing::debug!(%peer, "connection refused: client at its connection cap");
                    metrics::counter!("sluice_connections_refused_total", "reason" => "per_client")
                        .increment(1);
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(per_client);
            drop(permit);
        });
    }
    drop(listener);
    sweeper.abort();
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {DRAIN:?}; closing anyway");
    }
    Ok(())
}

/// Open connections per client, against `server.max_connections_per_client`.
#[derive(Clone)]
struct PerClient {
    cap: usize,
    open: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

/// One open connection counted against its client; uncounted on drop.
struct Held {
    key: ClientKey,
    open: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

impl PerClient {
    fn new(cap: usize) -> Self {
        PerClient {
            cap,
            open: Arc::default(),
        }
    }

    /// Counts one more connection for `key`, or `None` when it is at the cap.
    fn hold(&self, key: ClientKey) -> Option<Held> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(Held {
            key,
            open: self.open.clone(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                // Only clients with open connections take memory.
                open.remove(&self.key);
            }
        }
    }
}
