//! `sluice serve`: load the config, open the store, serve until a signal.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use super::ConfigArg;
use crate::AppState;
use crate::config::{Config, LogFormat};
use crate::event::Provider;
use crate::rules::RulesConfig;
use crate::rules::reload::{Reloader, Watch};
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
    let (state, reports) = AppState::open(config).await?;
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
    let (reloader, watch) = load_rules(&state)?;
    let rules = reloader.rules().clone();
    // Registered before the address is printed: from then on a SIGHUP
    // reloads instead of ending the process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    let watcher = tokio::spawn(watch.run());
    let hup_state = state.clone();
    let on_hangup = tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: re-reading secret files and rules");
            match hup_state.reload_secrets() {
                Ok(reports) => tracing::info!(secrets = reports.len(), "secrets re-read"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot re-read secrets; the previous ones keep serving")
                }
            }
            reloader.force();
        }
    });
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen / SLUICE_LISTEN)"))?;
    let admin = if state.config.admin.enabled {
        let admin = crate::admin::AdminServer::bind(&state.config).await?;
        let addr = admin.local_addr()?;
        println!(
            "admin API on http://{addr}/v1 (bearer token: {})",
            token_origin(admin.token_origin())
        );
        Some(admin)
    } else {
        None
    };
    let addr = listener.local_addr()?;
    println!("sluice listening on http://{addr}");
    for name in state.sources.load().keys() {
        println!("  POST http://{addr}/hooks/{name}");
    }
    let served = crate::serve_with_admin(state, rules, listener, admin, shutdown_signal()).await;
    watcher.abort();
    on_hangup.abort();
    served
}

/// The rules as `serve` runs them: the engine over the config's compile
/// cache with room kept for the router workers' calls, every rule of
/// `rules.dir` loaded tolerantly, and the set published to `state` for
/// `/status/rules`. Spawn [`Watch::run`] to follow later changes to the
/// directory. Call it on a multi-threaded runtime's worker (compiling blocks).
pub fn load_rules(state: &AppState) -> anyhow::Result<(Arc<Reloader>, Watch)> {
    let config = &state.config;
    let engine = WasmEngine::with_cache(
        Some(config.rules.cache_dir(&config.base_dir, config.data_dir())),
        &config.rules.cache,
        &config.rules.pool,
    )?;
    engine.reserve_for_calls(config.rules.workers);
    let (reloader, watch) = start_rules(state, engine)?;
    let _ = state.live_rules.set(reloader.rules().clone());
    let _ = state.reloader.set(reloader.clone());
    Ok((reloader, watch))
}

/// Loads the rules tolerantly (a bad rule is skipped and reported, not
/// fatal) and points the status board at the reloader that keeps them.
fn start_rules(state: &AppState, engine: WasmEngine) -> anyhow::Result<(Arc<Reloader>, Watch)> {
    let config = &state.config;
    let dir = config.rules.rules_dir(&config.base_dir);
    if config.rules != RulesConfig::default() && !dir.is_dir() {
        anyhow::bail!(
            "{}: rules.dir: the rules directory {} does not exist",
            config.origin,
            dir.display()
        );
    }
    let reloader = Arc::new(
        Reloader::new(&config.rules, &config.base_dir, Arc::new(engine))?
            .publish_to(state.rules_status.clone()),
    );
    // Watching starts before the first load, so a file that lands while
    // the rules load is seen.
    let watch = Watch::start(reloader.clone());
    // Compiling is CPU-bound: the async worker this runs on hands its other
    // work to the others meanwhile, as every later reload runs off them.
    let report = tokio::task::block_in_place(|| reloader.reload());
    let status = reloader.status().load();
    for r in &status.rules {
        match (&r.version, &r.error) {
            (Some(v), None) => println!("rule {} @{v} from {}", r.rule, r.manifest.display()),
            (_, Some(e)) => println!("rule {} NOT LOADED: {e}", r.rule),
            (None, None) => {}
        }
    }
    if reloader.rules().load().rules().len() == 0 {
        tracing::warn!(
            "no rules loaded from {}: events are stored but route nowhere",
            dir.display()
        );
    }
    if !report.failed.is_empty() {
        tracing::warn!(failed = ?report.failed, "serving without the rules that failed to load; see /status/rules");
    }
    Ok((reloader, watch))
}

/// Where the admin token came from, for the startup line (never its value).
fn token_origin(origin: &SecretOrigin) -> String {
    match origin {
        SecretOrigin::Env(var) => format!("env {var}"),
        SecretOrigin::File(path) => format!("file {}", path.display()),
        SecretOrigin::Generated(path, true) => format!("generated file {}", path.display()),
        SecretOrigin::Generated(path, false) | SecretOrigin::ToGenerate(path) => {
            format!("file {}", path.display())
        }
    }
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
