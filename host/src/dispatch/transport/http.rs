//! `http` agents: POST the envelope to the agent's URL.
//!
//! The client is hyper-util's pooled legacy client over a
//! [`GuardedConnector`] for the agent's [`Egress`], so every new connection,
//! `http://` or `https://`, is checked against the address actually dialled.
//! `https://` goes through rustls (the ring provider, the webpki roots)
//! wrapped around that guarded connector. Redirects are not followed.
//!
//! No error text holds the URL (its path or query may carry a token) or any
//! of the answer's body (it may echo a secret): status, reason and the
//! transport's own error only.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};
use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::{Outcome, Request, Transport, json_answer, key};
use crate::dispatch::config::AgentConfig;
use crate::dispatch::guard::{Egress, GuardError, GuardedConnector};
use crate::secret::{Generate, load_all};

/// Headers sluice sets itself on every attempt; an agent's `headers` may
/// not name them.
const RESERVED: [&str; 9] = [
    "authorization",
    "connection",
    "content-length",
    "content-type",
    "host",
    "transfer-encoding",
    "webhook-id",
    "webhook-signature",
    "webhook-timestamp",
];

/// The pooled client an agent's attempts share.
type HttpClient = Client<HttpsConnector<GuardedConnector>, Full<Bytes>>;

/// An `http` agent's transport.
pub struct HttpTransport {
    client: HttpClient,
    uri: Uri,
    /// `content-type`, `user-agent`, the static headers and the bearer token
    /// (marked sensitive).
    headers: HeaderMap,
    timeout: Duration,
    max_response_bytes: usize,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the URL (a token may sit in it) nor the headers.
        f.debug_struct("HttpTransport")
            .field("timeout", &self.timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

impl HttpTransport {
    /// The transport of `http` agent `name`: checks its URL and headers,
    /// loads its bearer token (source `agent-NAME`, role `.bearer`) and
    /// builds its client.
    pub fn new(
        name: &str,
        agent: &AgentConfig,
        config: &crate::config::Config,
        generate: Generate,
    ) -> Result<HttpTransport, String> {
        let url_key = key(name, "url");
        let url = agent
            .url
            .as_deref()
            .ok_or_else(|| format!("{url_key}: an http agent needs `url`"))?;
        // The parse error alone: the URL is not echoed.
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url_key}: not a URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "{url_key}: expected an http:// or https:// URL with a host"
            ));
        }

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("sluice/", env!("CARGO_PKG_VERSION"))),
        );
        for (k, v) in &agent.headers {
            let at = key(name, &format!("headers.{k}"));
            let header = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("{at}: not a valid header name"))?;
            if RESERVED.contains(&header.as_str()) {
                let hint = if header == AUTHORIZATION {
                    " (a token goes in `bearer`, loaded from env or a file)"
                } else {
                    ""
                };
                return Err(format!("{at}: sluice sets this header itself{hint}"));
            }
            let value = HeaderValue::from_str(v)
                .map_err(|_| format!("{at}: not a valid header value (visible ASCII only)"))?;
            headers.append(header, value);
        }
        if let Some(spec) = &agent.bearer {
            let bearer_key = key(name, "bearer");
            let loaded = load_all(
                config,
                &format!("agent-{name}"),
                &bearer_key,
                ".bearer",
                crate::event::Provider::None,
                std::slice::from_ref(spec),
                generate,
            )
            .map_err(|e| e.to_string())?;
            let token = loaded
                .into_iter()
                .next()
                .ok_or_else(|| format!("{bearer_key}: no token loaded"))?;
            let mut value = b"Bearer ".to_vec();
            value.extend_from_slice(token.secret.expose());
            let mut value = HeaderValue::from_bytes(&value)
                .map_err(|_| format!("{bearer_key}: the token is not a valid header value"))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }

        let egress = Egress {
            allow_private_network: agent.allow_private_network,
            allow_loopback: agent.allow_loopback,
            allow_cloud_metadata: agent.allow_cloud_metadata,
        };
        let mut guarded = GuardedConnector::new(egress);
        // The TLS layer hands `https://` URIs down to the TCP connector.
        guarded.http_mut().enforce_http(false);
        guarded.http_mut().set_nodelay(true);
        guarded.http_mut().set_connect_timeout(Some(agent.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| format!("{url_key}: cannot set up TLS: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(guarded);
        let client = Client::builder(TokioExecutor::new()).build(connector);

        Ok(HttpTransport {
            client,
            uri,
            headers,
            timeout: agent.timeout,
            max_response_bytes: agent.max_response_bytes,
        })
    }

    fn request(&self, request: &Request) -> Result<http::Request<Full<Bytes>>, String> {
        let mut req = http::Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .body(Full::new(request.body.clone()))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let headers = req.headers_mut();
        headers.extend(self.headers.clone());
        for (name, value) in &request.headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a valid header name"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("header {name} is not a valid header value"))?;
            headers.insert(header, value);
        }
        Ok(req)
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn send(&self, request: &Request) -> Outcome {
        let req = match self.request(request) {
            Ok(req) => req,
            Err(error) => {
                return Outcome::Final {
                    status: None,
                    error,
                    response_bytes: 0,
                };
            }
        };
        let deadline = Instant::now() + self.timeout;
        let response = match tokio::time::timeout_at(deadline, self.client.request(req)).await {
            Err(_) => {
                return Outcome::retry(format!(
                    "timed out after {} waiting for the answer",
                    humantime::format_duration(self.timeout)
                ));
            }
            Ok(Err(e)) => return failed(&e),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let read = read_capped(response.into_body(), self.max_response_bytes, deadline).await;
        let response_bytes = read.bytes.len() as u64;
        classify(status, retry_after, read, response_bytes)
    }
}

/// The answer as read: at most the cap, and whether it was read whole.
struct Read {
    bytes: Vec<u8>,
    complete: bool,
}

/// Reads at most `cap` bytes of `body` before `deadline`. Past the cap (or
/// the deadline, or on an error) it stops and drops the body, which closes
/// the connection rather than reading the rest.
async fn read_capped(mut body: hyper::body::Incoming, cap: usize, deadline: Instant) -> Read {
    let mut bytes = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => {
                return Read {
                    bytes,
                    complete: true,
                };
            }
            Ok(Some(Err(_))) | Err(_) => {
                return Read {
                    bytes,
                    complete: false,
                };
            }
        };
        if let Ok(data) = frame.into_data() {
            let room = cap - bytes.len();
            if data.len() > room {
                bytes.extend_from_slice(&data[..room]);
                return Read {
                    bytes,
                    complete: false,
                };
            }
            bytes.extend_from_slice(&data);
        }
    }
}

/// The outcome of an answer with `status`.
fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    read: Read,
    response_bytes: u64,
) -> Outcome {
    let code = Some(status.as_u16());
    if status.is_success() {
        return Outcome::Delivered {
            status: code,
            answer: read.complete.then(|| json_answer(&read.bytes)).flatten(),
            response_bytes,
        };
    }
    let error = format!("HTTP {status}");
    if status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
    {
        return Outcome::Retry {
            status: code,
            error,
            retry_after,
            response_bytes,
        };
    }
    let error = if status.is_redirection() {
        format!("{error}: redirects are not followed")
    } else {
        error
    };
    Outcome::Final {
        status: code,
        error,
        response_bytes,
    }
}

/// The outcome of a request that got no answer: the guard's refusal is
/// final, anything else (no connection, a connection lost) may pass.
fn failed(e: &hyper_util::client::legacy::Error) -> Outcome {
    if let Some(guard) = guard_error(e) {
        return Outcome::fail(guard.to_string());
    }
    let what = if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    Outcome::retry(format!("{what}: {}", causes(e)))
}

/// The guard's error in `e`'s source chain, if it is there.
fn guard_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a GuardError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(g) = err.downcast_ref::<GuardError>() {
            return Some(g);
        }
        cur = err.source();
    }
    None
}

/// The causes under hyper-util's own error, joined (`tcp connect error:
/// Connection refused (os error 111)`), each said once.
fn causes(e: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = e.source();
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

/// `Retry-After` as a delay from `now`: delta-seconds, or an HTTP-date (a
/// date in the past is no delay). `None` when it is neither.
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for u64 is "a long time", not "none given".
        return Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let parse = |s: &str| parse_retry_after(&HeaderValue::from_str(s).unwrap(), now);
        assert_eq!(parse("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(parse("0"), Some(Duration::ZERO));
        // 2015-10-21 07:28:00 is `now`; a minute later is 60 s away.
        assert_eq!(
            parse("Wed, 21 Oct 2015 07:29:00 GMT"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse("Wed, 21 Oct 2015 07:27:00 GMT"), Some(Duration::ZERO));
        assert_eq!(
            parse("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse("soon"), None);
        assert_eq!(parse("-5"), None);
        assert_eq!(parse(""), None);
    }
}
