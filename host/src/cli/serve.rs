//! `sluice serve`: load the config, open the store, serve until a signal.

use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use super::ConfigArg;
use crate::AppState;
use crate::config::{Config, LogFormat};
use crate::event::Provider;
use crate::rules::wasm::WasmEngine;
use crate::secret::SecretOrigin;

/// Arguments of `sluice serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    config: ConfigArg,
}

/// Sets up `tracing` (env `RUST_LOG` filters; default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs `sluice serve`.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    init_logging(config.server.log_format);
    let listen = config.server.listen;
    announce_sources(&config);
    let (state, reports) = AppState::build(config)?;
    for r in &reports {
        if let SecretOrigin::Generated(path, created) = &r.origin {
            let verb = if *created {
                "generated"
            } else {
                "using generated"
            };
            println!(
                "secret for source {:?} ({}): {verb} file {}",
                r.source,
                r.key,
                path.display()
            );
        }
    }
    let engine = WasmEngine::with_cache(
        Some(
            state
                .config
                .rules
                .cache_dir(&state.config.base_dir, state.config.data_dir()),
        ),
        &state.config.rules.cache,
        &state.config.rules.pool,
    )?;
    let rules = state.config.load_rules(&engine)?;
    for r in rules.rules() {
        println!(
            "rule {} @{} from {}",
            r.name(),
            r.version(),
            r.origin().display()
        );
    }
    if rules.rules().len() == 0 {
        tracing::warn!(
            "no rules loaded from {}: events are stored but route nowhere",
            state
                .config
                .rules
                .rules_dir(&state.config.base_dir)
                .display()
        );
    }
    let rules = Arc::new(ArcSwap::from_pointee(rules));
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen / SLUICE_LISTEN)"))?;
    let addr = listener.local_addr()?;
    println!("sluice listening on http://{addr}");
    for name in state.sources.keys() {
        println!("  POST http://{addr}/hooks/{name}");
    }
    crate::serve(state, rules, listener, shutdown_signal()).await
}

fn announce_sources(config: &Config) {
    for (name, src) in &config.sources {
        if src.provider == Provider::None {
            tracing::warn!(
                source = %name,
                "source {name:?} has provider = \"none\": ANYONE can post events to /hooks/{name}; use it only locally"
            );
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}
