//! Sources: each `[sources.NAME]` built once at startup into what the request
//! path needs — its verifier with loaded secrets, its limits and its naming.

use std::collections::HashMap;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::HeaderName;
use ipnet::IpNet;

use super::normalize::Naming;
use super::verify::{
    DEFAULT_TOLERANCE, GenericHmac, Github, Gitlab, Linear, Slack, StandardWebhooks, Stripe,
    Verifier,
};
use crate::config::{Config, Encoding, GitlabMode, SourceConfig};
use crate::event::Provider;
use crate::secret::{self, Generate, Loaded, Secret, SecretOrigin};

/// Linear documents a one-minute window for `webhookTimestamp`.
const LINEAR_TOLERANCE: std::time::Duration = std::time::Duration::from_secs(60);

/// One source, ready for the request path.
#[derive(Debug)]
pub struct Source {
    /// The source's name (the `{source}` path segment).
    pub name: String,
    /// Its provider.
    pub provider: Provider,
    /// Its verifier, holding its secrets.
    pub verifier: Verifier,
    /// How its deliveries and kinds are named.
    pub naming: Naming,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// Allowed client networks; empty means any.
    pub allow_ips: Vec<IpNet>,
    /// Optional post-verification limit.
    pub limiter: Option<DefaultDirectRateLimiter>,
}

/// Where each loaded secret came from, for startup logs and `sluice check`.
#[derive(Debug, Clone)]
pub struct SecretReport {
    /// The source.
    pub source: String,
    /// The config key.
    pub key: String,
    /// The origin.
    pub origin: SecretOrigin,
}

/// A source that could not be built (a secret is missing or malformed).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

impl From<secret::SecretError> for SourceError {
    fn from(e: secret::SecretError) -> Self {
        SourceError(e.to_string())
    }
}

/// All sources by name.
pub type Sources = HashMap<String, Arc<Source>>;

/// Builds every configured source, loading (and, if allowed, generating) secrets.
pub fn build_sources(
    config: &Config,
    generate: Generate,
) -> Result<(Sources, Vec<SecretReport>), SourceError> {
    let mut sources = HashMap::new();
    let mut reports = Vec::new();
    for (name, sc) in &config.sources {
        let src = build_source(config, name, sc, generate, &mut reports)?;
        sources.insert(name.clone(), Arc::new(src));
    }
    Ok((sources, reports))
}

fn secrets_of(
    loaded: Vec<Loaded>,
    name: &str,
    key: &str,
    reports: &mut Vec<SecretReport>,
) -> Vec<Secret> {
    loaded
        .into_iter()
        .map(|l| {
            reports.push(SecretReport {
                source: name.to_string(),
                key: key.to_string(),
                origin: l.origin,
            });
            l.secret
        })
        .collect()
}

/// Builds one source.
pub fn build_source(
    config: &Config,
    name: &str,
    sc: &SourceConfig,
    generate: Generate,
    reports: &mut Vec<SecretReport>,
) -> Result<Source, SourceError> {
    let key = |k: &str| format!("sources.{name}.{k}");
    let primary_key = if sc.secret.is_some() {
        key("secret")
    } else {
        key("secrets")
    };
    let loaded = secret::load_all(
        config,
        name,
        &primary_key,
        "",
        sc.provider,
        &sc.secret_specs(),
        generate,
    )?;
    let secrets = secrets_of(loaded, name, &primary_key, reports);
    let tolerance = sc.tolerance.unwrap_or(DEFAULT_TOLERANCE);
    let bad_key = |k: String| {
        SourceError(format!(
            "{}: {k}: expected `whsec_` followed by a base64 key",
            config.origin
        ))
    };
    let verifier = match sc.provider {
        Provider::Github => Verifier::Github(Github::new(&secrets)),
        Provider::Gitlab => {
            let signing = match &sc.signing_secrets {
                Some(specs) if !specs.is_empty() => {
                    let k = key("signing_secrets");
                    let loaded = secret::load_all(
                        config,
                        name,
                        &k,
                        ".signing",
                        sc.provider,
                        specs,
                        generate,
                    )?;
                    let signing = secrets_of(loaded, name, &k, reports);
                    Some(StandardWebhooks::new(&signing, tolerance).map_err(|_| bad_key(k))?)
                }
                _ => None,
            };
            let mode = sc
                .mode
                // Both configured and no mode: require both, never silently ignore one.
                .unwrap_or(if signing.is_some() && !secrets.is_empty() {
                    GitlabMode::Both
                } else if signing.is_some() {
                    GitlabMode::Signature
                } else {
                    GitlabMode::Token
                });
            Verifier::Gitlab(Gitlab::new(mode, &secrets, signing))
        }
        Provider::StandardWebhooks => Verifier::Standard(
            StandardWebhooks::new(&secrets, tolerance).map_err(|_| bad_key(primary_key.clone()))?,
        ),
        Provider::Stripe => Verifier::Stripe(Stripe::new(&secrets, tolerance)),
        Provider::Slack => Verifier::Slack(Slack::new(&secrets, tolerance)),
        Provider::Linear => Verifier::Linear(Linear::new(
            &secrets,
            sc.tolerance.unwrap_or(LINEAR_TOLERANCE),
        )),
        Provider::Hmac => {
            let header = header_name(
                config,
                &key("header"),
                sc.header.as_deref().unwrap_or_default(),
            )?;
            Verifier::Hmac(GenericHmac::new(
                &secrets,
                header,
                sc.prefix.clone().unwrap_or_default(),
                sc.encoding.unwrap_or(Encoding::Hex),
            ))
        }
        Provider::None => Verifier::None,
    };
    let naming = Naming {
        delivery_header: sc
            .delivery_header
            .as_deref()
            .map(|h| header_name(config, &key("delivery_header"), h))
            .transpose()?,
        kind_header: sc
            .kind_header
            .as_deref()
            .map(|h| header_name(config, &key("kind_header"), h))
            .transpose()?,
    };
    let limiter = sc.rate_limit.as_ref().map(|rl| {
        let per_second = std::num::NonZeroU32::new(rl.per_second).expect("validated non-zero");
        let burst = std::num::NonZeroU32::new(rl.burst).expect("validated non-zero");
        RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
    });
    Ok(Source {
        name: name.to_string(),
        provider: sc.provider,
        verifier,
        naming,
        max_body_bytes: sc.max_body(&config.server),
        allow_ips: sc.allow_ips.clone().unwrap_or_default(),
        limiter,
    })
}

fn header_name(config: &Config, key: &str, value: &str) -> Result<HeaderName, SourceError> {
    HeaderName::from_bytes(value.as_bytes()).map_err(|_| {
        SourceError(format!(
            "{}: {key}: {value:?} is not a valid header name",
            config.origin
        ))
    })
}
