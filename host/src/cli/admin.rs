//! The admin API's client for the operator commands (`dlq`, `deliveries`,
//! `sources`, `agents`, `events replay|tail`): where the API is, its token,
//! and one request at a time over hyper-util's client.
//!
//! The token is read as `serve` reads it (`[admin] token`, or env
//! `SLUICE_ADMIN_TOKEN`); it never generates one and never prints it.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::ConfigArg;
use crate::secret::{Generate, SecretOrigin};

/// The env var whose token overrides the config's.
pub const TOKEN_ENV: &str = "SLUICE_ADMIN_TOKEN";

/// How long one request may take, past any long-poll wait it asks for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the admin API is: the config, or `--admin URL`.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// The config file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// The admin API's base URL (default: `http://` + `admin.listen`).
    #[arg(long, value_name = "URL", env = "SLUICE_ADMIN")]
    pub admin: Option<String>,
}

/// A client of one admin API.
pub struct AdminClient {
    base: String,
    token: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// The client the arguments name, with the token loaded.
    pub fn from_args(args: &AdminArgs) -> anyhow::Result<AdminClient> {
        let config = args.config.load()?;
        let base = match &args.admin {
            Some(url) => url.trim_end_matches('/').trim_end_matches("/v1").to_owned(),
            None => match super::local_url(config.admin.listen) {
                Some(url) => url,
                None => bail!(
                    "{}: admin.listen has port 0 (chosen at start); pass --admin URL as `sluice serve` printed it",
                    config.origin
                ),
            },
        };
        let token = match std::env::var(TOKEN_ENV)
            .ok()
            .filter(|t| !t.trim().is_empty())
        {
            Some(t) => t.trim().to_owned(),
            None => {
                let loaded = crate::admin::load_token(&config, Generate::Preview)?;
                if let SecretOrigin::ToGenerate(path) = &loaded.origin {
                    bail!(
                        "{}: admin.token: {} does not exist yet (run `sluice serve` once, or set {TOKEN_ENV})",
                        config.origin,
                        path.display()
                    );
                }
                String::from_utf8(loaded.secret.expose().to_vec())
                    .context("admin.token: the token is not UTF-8")?
            }
        };
        Ok(AdminClient {
            base,
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// `GET path` (under the base URL, e.g. `/v1/dlq`).
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.request(Method::GET, path, REQUEST_TIMEOUT).await
    }

    /// `GET path` allowing `wait` more than the usual time (a long poll).
    pub async fn get_waiting(&self, path: &str, wait: Duration) -> anyhow::Result<Value> {
        self.request(Method::GET, path, REQUEST_TIMEOUT + wait)
            .await
    }

    /// `POST path` with no body.
    pub async fn post(&self, path: &str) -> anyhow::Result<Value> {
        self.request(Method::POST, path, REQUEST_TIMEOUT).await
    }

    async fn request(&self, method: Method, path: &str, within: Duration) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Full::new(Bytes::new()))
            .with_context(|| format!("bad admin URL {url}"))?;
        let ask = async {
            let resp = self.client.request(req).await.map_err(|e| {
                if refused(&e) {
                    anyhow::anyhow!(
                        "is `sluice serve` running? admin API at {} refused the connection",
                        self.base
                    )
                } else {
                    anyhow::anyhow!("admin API at {}: {e}", self.base)
                }
            })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .with_context(|| format!("admin API at {}: reading the answer", self.base))?
                .to_bytes();
            anyhow::Ok((status, body))
        };
        let (status, body) = tokio::time::timeout(within, ask).await.map_err(|_| {
            anyhow::anyhow!(
                "admin API at {} did not answer within {within:?}",
                self.base
            )
        })??;
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            let why = value["error"].as_str().unwrap_or("no detail");
            if status == StatusCode::UNAUTHORIZED {
                bail!(
                    "admin API at {}: 401: {why} (check admin.token or {TOKEN_ENV})",
                    self.base
                );
            }
            bail!("admin API at {}: {}: {why}", self.base, status.as_u16());
        }
        Ok(value)
    }
}

/// Whether a client error is a refused connection.
fn refused(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = s.source();
    }
    e.is_connect()
}

/// Percent-encodes a query value.
pub fn encode(v: &str) -> String {
    form_urlencoded::byte_serialize(v.as_bytes()).collect()
}
