//! Configuration: embedded defaults, then the file, then `SLUICE_*` env vars.
//!
//! The TOML is parsed into raw serde types (unknown keys rejected, every error
//! naming the file and the key path), then validated once into the types the
//! rest of the gateway uses. Secrets are never in the config text: a source
//! names where its secret lives (an env var or a file), and `secret.rs` loads it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use crate::dispatch::config::{AdminConfig, AgentConfig, DispatchConfig, WorkflowConfig};
use crate::event::Provider;
use crate::rules::RulesConfig;

/// The config the gateway runs on when no `--config` is given; also shipped as
/// `sluice.toml` at the top of the repository.
pub const EMBEDDED_DEFAULTS: &str = include_str!("../../sluice.toml");

/// The name errors use for the embedded defaults.
pub const EMBEDDED_NAME: &str = "<embedded defaults: sluice.toml>";

/// A config that could not be loaded; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    /// The file (or the embedded defaults, or an env var) at fault.
    pub file: String,
    /// The dotted key path at fault.
    pub key: String,
    /// What was expected.
    pub message: String,
}

impl ConfigError {
    fn new(file: &str, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole gateway config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener, data dir, limits and timeouts.
    #[serde(default)]
    pub server: ServerConfig,
    /// The per-IP shield in front of verification.
    #[serde(default)]
    pub shield: ShieldConfig,
    /// The embedded store.
    #[serde(default)]
    pub store: StoreConfig,
    /// Webhook sources by name: each serves `/hooks/{name}`.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    /// Routing rules.
    #[serde(default)]
    pub rules: RulesConfig,
    /// Where routed events go, by agent name.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentConfig>,
    /// Named, ordered steps over agents, by workflow name.
    #[serde(default)]
    pub workflows: BTreeMap<String, WorkflowConfig>,
    /// What every agent shares.
    #[serde(default)]
    pub dispatch: DispatchConfig,
    /// The operator's API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Where this config came from, for error messages.
    #[serde(skip)]
    pub origin: String,
    /// The directory relative paths in the file are resolved against.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on; env `SLUICE_LISTEN` overrides.
    pub listen: SocketAddr,
    /// Where the store, generated secrets and caches live; env `SLUICE_DATA` overrides.
    pub data_dir: PathBuf,
    /// Largest accepted body, in bytes (413 beyond). Sources may lower or raise it;
    /// Stripe, Slack and Linear sources default to 1 MiB.
    pub max_body_bytes: usize,
    /// Time a client has to send its request headers.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Time a client has to send its whole body.
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Most connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Most connections one client (an IPv4 address, an IPv6 /64) may hold at
    /// once; beyond it a new connection is closed unread. Trusted proxies are exempt.
    pub max_connections_per_client: usize,
    /// Body bytes all requests together may hold before verification; a request
    /// that does not fit answers 503 with `Retry-After` instead of being buffered.
    pub body_budget_bytes: usize,
    /// Of that budget, what one client (an IPv4 address, an IPv6 /64) may hold;
    /// unset: an eighth of the budget, but never less than the largest body a
    /// source accepts (see [`Config::body_budget_per_client`]).
    pub body_budget_per_client_bytes: Option<usize>,
    /// Proxies whose `X-Forwarded-For` is believed (CIDR), e.g. a tunnel on loopback.
    pub trusted_proxies: Vec<IpNet>,
    /// `text` or `json`; env `SLUICE_LOG_FORMAT` overrides.
    pub log_format: LogFormat,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:3847".parse().expect("valid default address"),
            data_dir: PathBuf::from("./data"),
            // GitHub caps payloads at 25 MB and never retries a refused delivery:
            // a lower cap would lose its largest pushes. Sources whose providers
            // send small bodies can lower it with `sources.X.max_body_bytes`.
            max_body_bytes: 25 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 2048,
            max_connections_per_client: 64,
            body_budget_bytes: 256 * 1024 * 1024,
            body_budget_per_client_bytes: None,
            trusted_proxies: Vec::new(),
            log_format: LogFormat::Text,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[shield]`: the per-IP rate limit checked before any crypto.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShieldConfig {
    /// Turn the shield off entirely.
    pub enabled: bool,
    /// Sustained requests per second per client IP.
    pub per_second: u32,
    /// Requests a client IP may send in a burst.
    pub burst: u32,
}

impl Default for ShieldConfig {
    fn default() -> Self {
        ShieldConfig {
            enabled: true,
            per_second: 100,
            burst: 500,
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The SQLite file, relative to the data dir.
    pub path: PathBuf,
    /// Most appends committed in one transaction (one fsync).
    pub batch_max: usize,
    /// How long a delivery known only by its body hash stays a duplicate (the
    /// store holds this window); also how long the in-memory dedup cache
    /// remembers a delivery.
    #[serde(deserialize_with = "duration")]
    pub dedup_ttl: Duration,
    /// Most delivery ids the in-memory dedup cache holds.
    pub dedup_capacity: u64,
    /// Most body and header bytes waiting for the store's writer; an event
    /// past it is answered 503 with `Retry-After` at once.
    pub queue_bytes: usize,
    /// Longest an event waits for the log to make it durable before it is
    /// answered 503 (`Retry-After`); the provider's retry is then a duplicate
    /// if the write finished after all.
    #[serde(deserialize_with = "duration")]
    pub append_timeout: Duration,
    /// Events older than this are removed with their decisions, and log
    /// segments holding only such events are deleted; dead letters stay this
    /// long after they were dead-lettered. `0s` keeps everything.
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    /// Which backend holds the log, the work queues and the index:
    /// `embedded` (the default: a body log and SQLite in the data dir) or
    /// `nats` (a NATS JetStream cluster several nodes share).
    pub backend: Backend,
    /// `[store.nats]`: the JetStream cluster, for `backend = "nats"`.
    pub nats: NatsConfig,
}

/// `store.backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The body log and SQLite index in the data dir: one process.
    #[default]
    Embedded,
    /// NATS JetStream: several nodes behind a load balancer.
    Nats,
}

/// `[store.nats]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// The servers, comma-separated (`nats://host:4222,nats://host2:4222`).
    pub url: String,
    /// A `.creds` file (JWT and NKey seed), relative to the data dir, for a
    /// server that asks for one.
    pub credentials: Option<PathBuf>,
    /// Replicas of every stream and bucket: 3 on a cluster (a write is
    /// acknowledged once a majority holds it), 1 on a single server (which
    /// must then run with `sync_interval: always` to be durable).
    pub replicas: usize,
    /// The names' prefix: streams `PREFIX_EVENTS`, …, subjects `prefix.…`.
    pub prefix: String,
    /// This node's local index file (relative to the data dir), fed from
    /// the streams; delete it to rebuild it.
    pub index: PathBuf,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            credentials: None,
            replicas: 1,
            prefix: "sluice".into(),
            index: PathBuf::from("nats-index.db"),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("sluice.db"),
            batch_max: 512,
            dedup_ttl: Duration::from_secs(24 * 3600),
            dedup_capacity: 20_000,
            queue_bytes: 64 * 1024 * 1024,
            append_timeout: Duration::from_secs(5),
            retention: Duration::from_secs(30 * 24 * 3600),
            backend: Backend::Embedded,
            nats: NatsConfig::default(),
        }
    }
}

/// Where one secret comes from. Its value never appears in the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// Read it from this environment variable.
    pub env: Option<String>,
    /// Read it from this file (relative to the config file).
    pub file: Option<PathBuf>,
    /// When `env` is unset (or alone), use a strong random secret generated into a
    /// 0600 file under the data dir. Off unless asked for: a secret named in the
    /// config but missing is an error, not a silent fallback.
    #[serde(default)]
    pub generate: bool,
}

/// GitLab's two ways of proving a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GitlabMode {
    /// `X-Gitlab-Token` must match a secret.
    Token,
    /// The signing token: `webhook-signature` the Standard Webhooks way.
    Signature,
    /// Either proof is enough.
    Either,
    /// Both must be present and valid.
    Both,
}

/// How a generic HMAC signature is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Lower- or upper-case hex.
    Hex,
    /// Standard base64.
    Base64,
}

/// An optional per-source limit, checked after verification.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained verified events per second.
    pub per_second: u32,
    /// Burst size.
    pub burst: u32,
}

/// `[sources.NAME]`: one webhook endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The verification scheme and normalisation.
    pub provider: Provider,
    /// One secret.
    pub secret: Option<SecretSpec>,
    /// Several secrets, all accepted (for rotation).
    pub secrets: Option<Vec<SecretSpec>>,
    /// GitLab: which proof is required.
    pub mode: Option<GitlabMode>,
    /// GitLab: the signing token(s), for `mode = "signature" | "either" | "both"`.
    pub signing_secrets: Option<Vec<SecretSpec>>,
    /// Replay window for timestamped schemes (Standard Webhooks, Stripe, Slack,
    /// GitLab signing, Linear).
    #[serde(default, deserialize_with = "opt_duration")]
    pub tolerance: Option<Duration>,
    /// Generic HMAC: the signature header.
    pub header: Option<String>,
    /// Generic HMAC: a prefix before the signature (`sha256=`).
    pub prefix: Option<String>,
    /// Generic HMAC: how the signature is encoded.
    pub encoding: Option<Encoding>,
    /// Generic HMAC: the header carrying the delivery id.
    pub delivery_header: Option<String>,
    /// Generic HMAC: the header carrying the event kind.
    pub kind_header: Option<String>,
    /// Overrides the provider's default body cap (see [`SourceConfig::max_body`]).
    pub max_body_bytes: Option<usize>,
    /// Only these client networks may post here (CIDR).
    pub allow_ips: Option<Vec<IpNet>>,
    /// Optional limit after verification. Off by default: GitHub never retries,
    /// so a 429 to a verified event loses it.
    pub rate_limit: Option<RateLimit>,
}

/// The body cap of providers whose payloads are small (Stripe, Slack, Linear).
pub const SMALL_BODY_BYTES: usize = 1024 * 1024;

impl SourceConfig {
    /// The largest body this source accepts: its own `max_body_bytes`, else 1 MiB
    /// for providers that send small payloads (Stripe, Slack, Linear: a large
    /// body there can only be hostile), else `server.max_body_bytes`.
    pub fn max_body(&self, server: &ServerConfig) -> usize {
        self.max_body_bytes.unwrap_or(match self.provider {
            Provider::Stripe | Provider::Slack | Provider::Linear => {
                SMALL_BODY_BYTES.min(server.max_body_bytes)
            }
            _ => server.max_body_bytes,
        })
    }

    /// The primary secrets, `secret` or `secrets`, whichever is set.
    pub fn secret_specs(&self) -> Vec<SecretSpec> {
        match (&self.secret, &self.secrets) {
            (Some(one), _) => vec![one.clone()],
            (None, Some(many)) => many.clone(),
            (None, None) => Vec::new(),
        }
    }
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!("expected a duration like \"10s\" or \"5m\": {e}"))
    })
}

pub(crate) fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

impl Config {
    /// Loads `path`, or the embedded defaults when `None`, then applies env overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (text, origin, base_dir) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    ConfigError::new(
                        &p.display().to_string(),
                        "(file)",
                        format!("cannot read: {e}"),
                    )
                })?;
                let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
                (text, p.display().to_string(), base)
            }
            None => (
                EMBEDDED_DEFAULTS.to_string(),
                EMBEDDED_NAME.to_string(),
                PathBuf::from("."),
            ),
        };
        let mut config = Config::parse(&text, &origin)?;
        config.base_dir = base_dir;
        config.apply_env()?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; `origin` names it in errors. No env overrides, no validation.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::new(origin, "(syntax)", describe_toml_error(text, &e)))?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            // Someone told that secrets stay out of the config may still paste one
            // in place of `{ env = ... }`; serde's message would quote it back.
            let under_secret = SECRET_KEYS
                .iter()
                .any(|k| key.split('.').any(|part| part.starts_with(k)));
            let message = describe_toml_error(text, e.inner());
            // Unknown-field messages name only keys; any other could quote the value.
            let message = if under_secret && !e.inner().message().starts_with("unknown field") {
                SECRET_SHAPE.to_string()
            } else {
                message
            };
            ConfigError::new(
                origin,
                if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message,
            )
        })?;
        config.origin = origin.to_string();
        config.rules.grants.set_origin(origin);
        config.rules.grants.set_declared(
            config.agents.keys().cloned().collect(),
            config.workflows.keys().cloned().collect(),
        );
        Ok(config)
    }

    fn apply_env(&mut self) -> Result<(), ConfigError> {
        if let Ok(v) = std::env::var("SLUICE_LISTEN") {
            self.server.listen = v.parse().map_err(|e| {
                ConfigError::new(
                    "env SLUICE_LISTEN",
                    "server.listen",
                    format!("expected host:port, got {v:?}: {e}"),
                )
            })?;
        }
        if let Ok(v) = std::env::var("SLUICE_DATA") {
            self.server.data_dir = PathBuf::from(v);
        }
        if let Ok(v) = std::env::var("SLUICE_LOG_FORMAT") {
            self.server.log_format = match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::new(
                        "env SLUICE_LOG_FORMAT",
                        "server.log_format",
                        format!("expected \"text\" or \"json\", got {v:?}"),
                    ));
                }
            };
        }
        Ok(())
    }

    /// The SQLite file listings read: the embedded store's index, or this
    /// node's index of the NATS backend.
    pub fn index_path(&self) -> PathBuf {
        match self.store.backend {
            Backend::Embedded => self.data_dir().join(&self.store.path),
            Backend::Nats => self.data_dir().join(&self.store.nats.index),
        }
    }

    /// Checks what serde cannot: cross-key rules per provider.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: String, msg: &str| Err(ConfigError::new(&self.origin, key, msg));
        if self.server.max_body_bytes == 0 {
            return err("server.max_body_bytes".into(), "must be greater than 0");
        }
        if self.server.max_connections_per_client == 0 {
            return err(
                "server.max_connections_per_client".into(),
                "must be greater than 0",
            );
        }
        if self.server.body_budget_bytes == 0 {
            return err("server.body_budget_bytes".into(), "must be greater than 0");
        }
        if self.server.body_budget_bytes > u32::MAX as usize {
            return err(
                "server.body_budget_bytes".into(),
                "must be at most 4294967295 (4 GiB)",
            );
        }
        if let Some(share) = self.server.body_budget_per_client_bytes {
            if share > self.server.body_budget_bytes {
                return err(
                    "server.body_budget_per_client_bytes".into(),
                    "must be at most server.body_budget_bytes",
                );
            }
            let largest = self.largest_body();
            if share < largest {
                return err(
                    "server.body_budget_per_client_bytes".into(),
                    &format!(
                        "must be at least the largest body a source accepts ({largest} bytes): \
                         such deliveries could never be received"
                    ),
                );
            }
        }
        if !(1..=5).contains(&self.store.nats.replicas) {
            return err("store.nats.replicas".into(), "must be 1 to 5");
        }
        if self.store.nats.prefix.is_empty()
            || !self
                .store
                .nats
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return err(
                "store.nats.prefix".into(),
                "must be letters, digits, '_' or '-' (it names streams and subjects)",
            );
        }
        // The NATS backend has no workflow runs yet: a workflow route would
        // only be dead-lettered, so the config is refused up front.
        if self.store.backend == Backend::Nats
            && let Some(name) = self.workflows.keys().next()
        {
            return err(
                format!("workflows.{name}"),
                "workflows need the embedded backend for now (store.backend = \"embedded\"); \
                 store.backend = \"nats\" does not run them",
            );
        }
        if self.shield.enabled && (self.shield.per_second == 0 || self.shield.burst == 0) {
            return err(
                "shield.per_second".into(),
                "must be greater than 0 (or set shield.enabled = false)",
            );
        }
        // An approval naming a source this config does not have is a typo
        // that would silently keep its rule from ever seeing an event.
        for (rule, approval) in self.rules.grants.iter() {
            if let Some((i, s)) = approval.sources.0.iter().enumerate().find(|(_, s)| {
                s.as_str() != crate::rules::grants::ANY && !self.sources.contains_key(*s)
            }) {
                let known: Vec<_> = self.sources.keys().map(String::as_str).collect();
                return Err(ConfigError::new(
                    &self.origin,
                    format!("rules.grants.{rule}.sources[{i}]"),
                    format!(
                        "{s:?} is not a configured source (sources: {})",
                        known.join(", ")
                    ),
                ));
            }
        }
        crate::dispatch::config::validate(&self.agents, &self.workflows)
            .map_err(|(key, message)| ConfigError::new(&self.origin, key, message))?;
        // An approval naming an agent or workflow this config does not
        // declare would route to nowhere: refused here, not at the first event.
        for (rule, approval) in self.rules.grants.iter() {
            for (list, names, declared) in [
                (
                    "agents",
                    &approval.agents,
                    self.agents.keys().collect::<Vec<_>>(),
                ),
                (
                    "workflows",
                    &approval.workflows,
                    self.workflows.keys().collect(),
                ),
            ] {
                if let Some((i, n)) =
                    names.0.iter().enumerate().find(|(_, n)| {
                        n.as_str() != crate::rules::grants::ANY && !declared.contains(n)
                    })
                {
                    return Err(ConfigError::new(
                        &self.origin,
                        format!("rules.grants.{rule}.{list}[{i}]"),
                        format!(
                            "{n:?} is not declared under [{list}] (declared: {})",
                            declared
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        }
        for (name, src) in &self.sources {
            let at = |k: &str| format!("sources.{name}.{k}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return err(
                    format!("sources.{name}"),
                    "a source name may hold only letters, digits, '-' and '_'",
                );
            }
            if src.secret.is_some() && src.secrets.is_some() {
                return err(at("secrets"), "set either `secret` or `secrets`, not both");
            }
            let named: Vec<(String, &SecretSpec)> = match (&src.secret, &src.secrets) {
                (Some(one), _) => vec![("secret".to_string(), one)],
                (None, Some(many)) => many
                    .iter()
                    .enumerate()
                    .map(|(i, sp)| (format!("secrets[{i}]"), sp))
                    .collect(),
                (None, None) => Vec::new(),
            }
            .into_iter()
            .chain(
                src.signing_secrets
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(|(i, sp)| (format!("signing_secrets[{i}]"), sp)),
            )
            .collect();
            for (key, spec) in named {
                let problem = if spec.env.is_some() && spec.file.is_some() {
                    Some("a secret comes from `env` or `file`, not both")
                } else if spec.env.is_none() && spec.file.is_none() && !spec.generate {
                    Some("expected `env = \"VAR\"`, `file = \"path\"` or `generate = true`")
                } else if spec.file.is_some() && spec.generate {
                    Some("`generate` goes with `env` (or alone), not with `file`")
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return err(at(&key), problem);
                }
            }
            let has_primary = !src.secret_specs().is_empty();
            let has_signing = src.signing_secrets.as_ref().is_some_and(|s| !s.is_empty());
            let only_for = |key: &str, set: bool, provider: &str| -> Result<(), ConfigError> {
                if set {
                    Err(ConfigError::new(
                        &self.origin,
                        at(key),
                        format!("only applies to provider = \"{provider}\""),
                    ))
                } else {
                    Ok(())
                }
            };
            if src.provider != Provider::Gitlab {
                only_for("mode", src.mode.is_some(), "gitlab")?;
                only_for("signing_secrets", src.signing_secrets.is_some(), "gitlab")?;
            }
            if src.provider != Provider::Hmac {
                only_for("header", src.header.is_some(), "hmac")?;
                only_for("prefix", src.prefix.is_some(), "hmac")?;
                only_for("encoding", src.encoding.is_some(), "hmac")?;
                only_for("delivery_header", src.delivery_header.is_some(), "hmac")?;
                only_for("kind_header", src.kind_header.is_some(), "hmac")?;
            }
            match src.provider {
                Provider::None => {
                    if has_primary {
                        return err(
                            at("secret"),
                            "provider \"none\" verifies nothing and takes no secret",
                        );
                    }
                }
                Provider::Gitlab => {
                    let mode = src.mode.unwrap_or(if has_signing && has_primary {
                        GitlabMode::Both
                    } else if has_signing {
                        GitlabMode::Signature
                    } else {
                        GitlabMode::Token
                    });
                    let needs_token = matches!(
                        mode,
                        GitlabMode::Token | GitlabMode::Both | GitlabMode::Either
                    );
                    let needs_signing = matches!(
                        mode,
                        GitlabMode::Signature | GitlabMode::Both | GitlabMode::Either
                    );
                    if mode == GitlabMode::Either {
                        if !has_primary && !has_signing {
                            return err(
                                at("secret"),
                                "mode \"either\" needs `secret` (token) or `signing_secrets`",
                            );
                        }
                    } else {
                        if needs_token && !has_primary {
                            return err(
                                at("secret"),
                                "expected the X-Gitlab-Token secret (`secret` or `secrets`)",
                            );
                        }
                        if needs_signing && !has_signing {
                            return err(
                                at("signing_secrets"),
                                "expected the GitLab signing token(s)",
                            );
                        }
                    }
                }
                Provider::Hmac => {
                    if !has_primary {
                        return err(at("secret"), "expected `secret` or `secrets`");
                    }
                    if src.header.is_none() {
                        return err(
                            at("header"),
                            "expected the signature header name, e.g. \"X-Signature\"",
                        );
                    }
                }
                _ => {
                    if !has_primary {
                        return err(at("secret"), "expected `secret` or `secrets`");
                    }
                }
            }
            if src.max_body_bytes == Some(0) {
                return err(at("max_body_bytes"), "must be greater than 0");
            }
            if src.max_body(&self.server) > self.server.body_budget_bytes {
                return err(
                    "server.body_budget_bytes".into(),
                    &format!(
                        "must be at least the largest body a source accepts ({} bytes for sources.{name}): \
                         its largest deliveries could never be received",
                        src.max_body(&self.server)
                    ),
                );
            }
            if let Some(rl) = &src.rate_limit
                && (rl.per_second == 0 || rl.burst == 0)
            {
                return err(
                    at("rate_limit"),
                    "per_second and burst must be greater than 0",
                );
            }
        }
        Ok(())
    }

    /// Loads the rule set the config names. A config that says nothing about
    /// rules and has no `rules/` directory beside it routes with no rules (and
    /// says so); a rules directory named in the config must exist.
    pub fn load_rules(
        &self,
        engine: &crate::rules::wasm::WasmEngine,
    ) -> Result<crate::rules::RuleSet, crate::rules::LoadError> {
        let dir = self.rules.rules_dir(&self.base_dir);
        // Approvals alone (the embedded defaults approve the shipped rules)
        // do not make a rules directory expected.
        let unset = RulesConfig {
            grants: Default::default(),
            ..self.rules.clone()
        } == RulesConfig::default();
        if unset && !dir.exists() {
            tracing::warn!(dir = %dir.display(), "no [rules] in {} and no rules directory: events are stored but not routed", self.origin);
            return Ok(crate::rules::RuleSet::empty());
        }
        crate::rules::RuleSet::load(&self.rules, &self.base_dir, engine)
    }

    /// The largest body any source accepts.
    pub fn largest_body(&self) -> usize {
        self.sources
            .values()
            .map(|s| s.max_body(&self.server))
            .max()
            .unwrap_or(self.server.max_body_bytes)
    }

    /// What one client may hold of the body budget: the configured share, or
    /// an eighth of the budget raised to the largest body a source accepts.
    pub fn body_budget_per_client(&self) -> usize {
        self.server.body_budget_per_client_bytes.unwrap_or_else(|| {
            (self.server.body_budget_bytes / 8)
                .max(self.largest_body())
                .min(self.server.body_budget_bytes)
        })
    }

    /// The data directory (store, generated secrets, caches).
    pub fn data_dir(&self) -> &Path {
        &self.server.data_dir
    }

    /// A path from the config file, resolved against the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// Keys whose values name where a secret lives.
const SECRET_KEYS: [&str; 6] = [
    "secret",
    "secrets",
    "signing_secrets",
    "signing_secret",
    "bearer",
    "token",
];

/// What a secret key expects; said instead of echoing what was found there.
const SECRET_SHAPE: &str = "expected { env = \"VAR\" }, { file = \"path\" }, { env = \"VAR\", generate = true } \
                            or { generate = true } (a list of them for `secrets`); a secret's value never goes in the config";

/// The parser's message on one line with the line number, without the excerpt
/// of the file that toml's own `Display` adds (it could hold a pasted secret).
pub(crate) fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{message} (line {line})")
        }
        None => message,
    }
}
