//! `sluice send`: sign a payload exactly as the provider would (headers
//! included, a fresh delivery id each time) and POST it; with `--repeat` and
//! `--concurrency` it is a small load generator that reports latency and rate.
//!
//! Without a payload file, `--event NAME` picks a built-in sample (as `stripe
//! trigger` does): one per row of the shipped routing tables, under
//! `samples/`, each routed by the shipped rules to the agents [`SAMPLES`]
//! names (a test holds them to it). `--list` prints them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::ConfigArg;
use crate::config::{Config, GitlabMode};
use crate::event::Provider;
use crate::ingress::source::{Source, build_source};
use crate::ingress::verify::{Verifier, unix_now};
use crate::secret::{Generate, Secret, load_all};

/// Arguments of `sluice send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The configured source to send to.
    #[arg(long, short = 's', required_unless_present = "list")]
    source: Option<String>,
    /// With a payload file: the event kind header (`issues` for GitHub, `Push
    /// Hook` for GitLab, ...); for GitHub it defaults to the payload's folder
    /// name, as in the corpus layout. Without one: the built-in sample to send
    /// (`issues.opened`, `push`; see `--list`).
    #[arg(long, short = 'e')]
    event: Option<String>,
    /// The payload file (JSON). Without it, the built-in sample `--event`
    /// names, or a small sample for the provider.
    payload: Option<PathBuf>,
    /// Print the built-in samples and the agents the shipped rules route
    /// each to, then exit.
    #[arg(long, conflicts_with_all = ["payload", "event"])]
    list: bool,
    /// Send it this many times, each with a fresh delivery id.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Post here instead of `http://{server.listen}/hooks/{source}`.
    #[arg(long)]
    url: Option<String>,
}

/// One signed request, ready to post.
#[derive(Debug, Clone)]
pub struct Signed {
    /// Headers to send.
    pub headers: Vec<(HeaderName, String)>,
    /// The body to send (it may differ from the file where the provider puts the
    /// delivery id or a timestamp inside the body).
    pub body: Bytes,
}

/// A source set up for signing requests, as its provider would.
#[derive(Debug)]
pub struct Signer {
    /// The source, with its verifier's keys.
    pub source: Source,
    /// GitLab's X-Gitlab-Token is sent as-is; the verifier keeps only its digest.
    token: Option<Secret>,
}

impl Signer {
    /// Builds a signer for the configured source `name`, loading its secrets the
    /// same way `serve` does (generating a missing generated secret file).
    pub fn new(config: &Config, name: &str) -> anyhow::Result<Signer> {
        let sc = config.sources.get(name).with_context(|| {
            format!(
                "{}: no source {name:?} (known: {:?})",
                config.origin,
                config.sources.keys().collect::<Vec<_>>()
            )
        })?;
        let source = build_source(config, name, sc, Generate::IfMissing, &mut Vec::new())?;
        let token = match sc.provider {
            Provider::Gitlab if !sc.secret_specs().is_empty() => {
                let key = format!("sources.{name}.secret");
                let loaded = load_all(
                    config,
                    name,
                    &key,
                    "",
                    sc.provider,
                    &sc.secret_specs(),
                    Generate::IfMissing,
                )?;
                loaded.into_iter().next().map(|l| l.secret)
            }
            _ => None,
        };
        Ok(Signer { source, token })
    }

    /// Signs `body` as an event of `kind`, with a fresh delivery id.
    pub fn sign(&self, kind: &str, body: &Bytes) -> anyhow::Result<Signed> {
        sign(&self.source, self.token.as_ref(), kind, body)
    }
}

fn sign(
    source: &Source,
    token: Option<&Secret>,
    kind: &str,
    body: &Bytes,
) -> anyhow::Result<Signed> {
    let mut headers: Vec<(HeaderName, String)> =
        vec![(http::header::CONTENT_TYPE, "application/json".into())];
    let mut add = |name: &str, value: String| {
        headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("valid"),
            value,
        ))
    };
    let id = uuid::Uuid::new_v4();
    let now = unix_now();
    let mut body = body.clone();
    match &source.verifier {
        Verifier::Github(v) => {
            add("user-agent", "GitHub-Hookshot/sluice-send".into());
            add("x-github-event", kind.to_string());
            add("x-github-delivery", id.to_string());
            add("x-github-hook-id", "1".into());
            let (h, sig) = v.sign(&body);
            add(h, sig);
        }
        Verifier::Gitlab(v) => {
            add("user-agent", "GitLab/17.0.0".into());
            add("x-gitlab-event", kind.to_string());
            add("x-gitlab-event-uuid", id.to_string());
            add("x-gitlab-webhook-uuid", uuid::Uuid::new_v4().to_string());
            add("x-gitlab-instance", "https://gitlab.example.com".into());
            add("idempotency-key", id.to_string());
            if let Some(token) = token.filter(|_| v.mode() != GitlabMode::Signature) {
                let token =
                    std::str::from_utf8(token.expose()).context("the GitLab token is not UTF-8")?;
                add("x-gitlab-token", token.to_string());
            }
            if let Some(signing) = v.signing().filter(|_| v.mode() != GitlabMode::Token) {
                for (h, val) in signing.sign(&id.to_string(), now, &body) {
                    add(h, val);
                }
            }
        }
        Verifier::Standard(v) => {
            for (h, val) in v.sign(&format!("msg_{}", id.simple()), now, &body) {
                add(h, val);
            }
        }
        Verifier::Stripe(v) => {
            add(
                "user-agent",
                "Stripe/1.0 (+https://stripe.com/docs/webhooks)".into(),
            );
            body = with_field(&body, "id", format!("evt_{}", id.simple()))?;
            let (h, sig) = v.sign(now, &body);
            add(h, sig);
        }
        Verifier::Slack(v) => {
            add(
                "user-agent",
                "Slackbot 1.0 (+https://api.slack.com/robots)".into(),
            );
            if body_has_field(&body, "event_id") {
                body = with_field(&body, "event_id", format!("Ev{}", id.simple()))?;
            }
            for (h, val) in v.sign(now, &body) {
                add(h, val);
            }
        }
        Verifier::Linear(v) => {
            add("user-agent", "Linear-Webhook".into());
            add("linear-delivery", id.to_string());
            add("linear-event", kind.to_string());
            body = with_field(&body, "webhookTimestamp", now * 1000)?;
            let (h, sig) = v.sign(&body);
            add(h, sig);
        }
        Verifier::Hmac(v) => {
            if let Some(h) = &source.naming.delivery_header {
                add(h.as_str(), id.to_string());
            }
            if let Some(h) = &source.naming.kind_header {
                add(h.as_str(), kind.to_string());
            }
            let (h, sig) = v.sign(&body);
            headers.push((h, sig));
        }
        Verifier::None => {}
    }
    Ok(Signed { headers, body })
}

fn body_has_field(body: &Bytes, field: &str) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.get(field).is_some())
}

fn with_field(
    body: &Bytes,
    field: &str,
    value: impl Into<serde_json::Value>,
) -> anyhow::Result<Bytes> {
    let mut doc: serde_json::Value =
        serde_json::from_slice(body).context("the payload is not JSON")?;
    let obj = doc
        .as_object_mut()
        .context("the payload is not a JSON object")?;
    obj.insert(field.to_string(), value.into());
    Ok(Bytes::from(serde_json::to_vec(&doc)?))
}

/// A built-in sample payload of one event, sent by `sluice send --event NAME`
/// when no payload file is given.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// The provider that sends it.
    pub provider: Provider,
    /// Its name for `--event`: `kind.action` for GitHub (`issues.opened`, or
    /// just `push`), GitLab's `object_kind` for GitLab (`push`, `note`), with a
    /// suffix where a row's condition needs a particular payload
    /// (`push.release`).
    pub name: &'static str,
    /// The event kind header it is sent with (`issues`, `Push Hook`).
    pub kind: &'static str,
    /// The agents the shipped rules route it to, in the order of the routes.
    pub agents: &'static [&'static str],
    /// The payload (JSON).
    pub body: &'static str,
}

/// One [`Sample`], its payload read from `samples/{dir}/{name}.json`.
macro_rules! sample {
    ($provider:ident, $dir:literal, $name:literal, $kind:literal, [$($agent:literal),+]) => {
        Sample {
            provider: Provider::$provider,
            name: $name,
            kind: $kind,
            agents: &[$($agent),+],
            body: include_str!(concat!("samples/", $dir, "/", $name, ".json")),
        }
    };
}

/// The built-in samples: one per row of the shipped routing tables
/// (`plugins/rules/github-router/src/lib.rs`, `rules/gitlab.rhai`), trimmed
/// from real provider payloads to what the rules read and the usual
/// identifying fields.
pub const SAMPLES: &[Sample] = &[
    sample!(
        Github,
        "github",
        "issues.labeled",
        "issues",
        ["coordinator"]
    ),
    sample!(
        Github,
        "github",
        "issue_comment.created",
        "issue_comment",
        ["coordinator"]
    ),
    sample!(
        Github,
        "github",
        "pull_request_review_comment.created",
        "pull_request_review_comment",
        ["coordinator"]
    ),
    sample!(
        Github,
        "github",
        "issues.opened",
        "issues",
        ["issue-triage"]
    ),
    sample!(
        Github,
        "github",
        "issues.assigned",
        "issues",
        ["issue-triage"]
    ),
    sample!(
        Github,
        "github",
        "issues.closed",
        "issues",
        ["issue-triage"]
    ),
    sample!(
        Github,
        "github",
        "pull_request.opened",
        "pull_request",
        ["review-agent"]
    ),
    sample!(
        Github,
        "github",
        "pull_request.ready_for_review",
        "pull_request",
        ["review-agent"]
    ),
    sample!(
        Github,
        "github",
        "pull_request.review_requested",
        "pull_request",
        ["review-agent"]
    ),
    sample!(
        Github,
        "github",
        "pull_request.closed",
        "pull_request",
        ["deployment"]
    ),
    sample!(Github, "github", "push", "push", ["deployment"]),
    sample!(
        Github,
        "github",
        "workflow_run.completed",
        "workflow_run",
        ["guardian"]
    ),
    sample!(Gitlab, "gitlab", "push", "Push Hook", ["ci-validation"]),
    sample!(
        Gitlab,
        "gitlab",
        "push.release",
        "Push Hook",
        ["ci-validation", "release-manager"]
    ),
    sample!(
        Gitlab,
        "gitlab",
        "tag_push",
        "Tag Push Hook",
        ["release-manager"]
    ),
    sample!(
        Gitlab,
        "gitlab",
        "merge_request",
        "Merge Request Hook",
        ["mr-reviewer"]
    ),
    sample!(
        Gitlab,
        "gitlab",
        "pipeline",
        "Pipeline Hook",
        ["pipeline-monitor"]
    ),
    sample!(Gitlab, "gitlab", "issue", "Issue Hook", ["issue-triage"]),
    sample!(
        Gitlab,
        "gitlab",
        "confidential_issue",
        "Confidential Issue Hook",
        ["issue-triage"]
    ),
    sample!(Gitlab, "gitlab", "note", "Note Hook", ["comment-handler"]),
    sample!(
        Gitlab,
        "gitlab",
        "confidential_note",
        "Confidential Note Hook",
        ["comment-handler"]
    ),
];

/// The built-in sample of `provider` that `event` names: a sample's name, or
/// an event kind header only one sample is sent with (`tag_push` or `Tag Push
/// Hook`). The error lists the provider's samples.
pub fn find_sample(provider: Provider, event: &str) -> anyhow::Result<&'static Sample> {
    let own = || SAMPLES.iter().filter(move |s| s.provider == provider);
    if let Some(s) = own().find(|s| s.name == event) {
        return Ok(s);
    }
    let by_kind: Vec<&Sample> = own().filter(|s| s.kind == event).collect();
    if let [s] = by_kind[..] {
        return Ok(s);
    }
    let names: Vec<&str> = own().map(|s| s.name).collect();
    if names.is_empty() {
        bail!("--event {event:?}: there are no built-in {provider} samples; pass a payload file");
    }
    bail!(
        "--event {event:?}: no built-in {provider} sample of that name (available: {})",
        names.join(", ")
    )
}

/// Writes one line per built-in sample: `github issues.opened → issue-triage`.
pub fn write_list(out: &mut impl std::io::Write) -> std::io::Result<()> {
    for s in SAMPLES {
        writeln!(out, "{} {} → {}", s.provider, s.name, s.agents.join(", "))?;
    }
    Ok(())
}

/// The payload sent when neither a payload file nor `--event` is given (and,
/// for providers without [`SAMPLES`], whatever `--event` is).
fn sample(provider: Provider) -> (&'static str, &'static str) {
    match provider {
        Provider::Github => (
            "ping",
            r#"{"zen":"Keep it logically awesome.","hook_id":1,"hook":{"type":"Repository","id":1,"active":true,"events":["*"]}}"#,
        ),
        Provider::Gitlab => (
            "Push Hook",
            r#"{"object_kind":"push","ref":"refs/heads/main","checkout_sha":"da1560886d4f094c3e6c9ef40349f7d38b5d27d7","project":{"path_with_namespace":"group/project","default_branch":"main"},"commits":[],"total_commits_count":0}"#,
        ),
        Provider::Stripe => (
            "invoice.paid",
            r#"{"id":"evt_sample","object":"event","type":"invoice.paid","data":{"object":{"id":"in_1","object":"invoice"}}}"#,
        ),
        Provider::Slack => (
            "event_callback",
            r#"{"type":"event_callback","event_id":"Ev0","event":{"type":"app_mention","text":"hello"}}"#,
        ),
        Provider::Linear => (
            "Issue",
            r#"{"action":"create","type":"Issue","data":{"id":"1","title":"Sample"}}"#,
        ),
        _ => (
            "sample.created",
            r#"{"type":"sample.created","timestamp":"2026-01-01T00:00:00Z","data":{"id":1}}"#,
        ),
    }
}

/// Runs `sluice send`.
pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    if args.list {
        write_list(&mut std::io::stdout().lock())?;
        return Ok(());
    }
    let source_name = args
        .source
        .as_deref()
        .context("--source is required (or --list)")?;
    let config = args.config.load()?;
    let signer = Signer::new(&config, source_name)?;
    let source = &signer.source;
    let (mut default_kind, mut sample_body) = sample(source.provider);
    let mut event = args.event.clone();
    if args.payload.is_none()
        && let Some(name) = event.as_deref()
        && name != default_kind
        && SAMPLES.iter().any(|s| s.provider == source.provider)
    {
        let s = find_sample(source.provider, name)?;
        (default_kind, sample_body, event) = (s.kind, s.body, None);
    }
    let body = match &args.payload {
        Some(p) => Bytes::from(
            std::fs::read(p).with_context(|| format!("cannot read payload {}", p.display()))?,
        ),
        None => Bytes::from_static(sample_body.as_bytes()),
    };
    let kind = match (&event, &args.payload) {
        (Some(k), _) => k.clone(),
        (None, Some(p)) if source.provider == Provider::Github => p
            .parent()
            .and_then(|d| d.file_name())
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .context("--event is required (the X-GitHub-Event value)")?,
        (None, Some(_)) if matches!(source.provider, Provider::Gitlab | Provider::Linear) => {
            bail!("--event is required for a {} source", source.provider)
        }
        _ => default_kind.to_string(),
    };
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}/hooks/{source_name}", config.server.listen));
    let uri: http::Uri = url.parse().with_context(|| format!("bad --url {url:?}"))?;

    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.concurrency.max(1))
        .build_http();
    let report = load(
        &client,
        &uri,
        &signer,
        &kind,
        &body,
        args.repeat.max(1),
        args.concurrency.max(1),
    )
    .await?;
    if args.repeat <= 1 {
        let (status, text) = report.last.clone().unwrap_or_default();
        println!("{status} {text}");
        if !(200..300).contains(&status) {
            bail!("the gateway answered {status}");
        }
    } else {
        report.print();
    }
    Ok(())
}

/// What a run of sends saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Responses by status code.
    pub by_status: std::collections::BTreeMap<u16, usize>,
    /// Transport errors (connection refused, reset).
    pub errors: usize,
    /// Latency of each completed request.
    pub latencies: Vec<Duration>,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// The last status and body seen.
    pub last: Option<(u16, String)>,
}

impl LoadReport {
    fn print(&self) {
        let mut lat = self.latencies.clone();
        lat.sort();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        let done: usize = self.by_status.values().sum();
        println!(
            "sent {} in {:.2?}: {:.0} req/s · p50 {:.2?} · p99 {:.2?} · transport errors {}",
            done + self.errors,
            self.elapsed,
            done as f64 / self.elapsed.as_secs_f64().max(1e-9),
            pct(0.50),
            pct(0.99),
            self.errors
        );
        for (status, n) in &self.by_status {
            println!("  {status}: {n}");
        }
    }
}

async fn load(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &http::Uri,
    signer: &Signer,
    kind: &str,
    body: &Bytes,
    repeat: usize,
    concurrency: usize,
) -> anyhow::Result<LoadReport> {
    // Sign everything first so signing does not count against the gateway.
    let signed = (0..repeat)
        .map(|_| signer.sign(kind, body))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let signed = Arc::new(signed);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.min(repeat) {
        let (client, uri, signed, next) =
            (client.clone(), uri.clone(), signed.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = LoadReport::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(s) = signed.get(i) else { break };
                let mut req = Request::post(uri.clone());
                for (h, v) in &s.headers {
                    req = req.header(
                        h,
                        HeaderValue::from_str(v).expect("signed headers are visible ASCII"),
                    );
                }
                let req = req.body(Full::new(s.body.clone())).expect("valid request");
                let t = Instant::now();
                match client.request(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let text = resp
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        r.latencies.push(t.elapsed());
                        *r.by_status.entry(status).or_default() += 1;
                        r.last = Some((status, String::from_utf8_lossy(&text).into_owned()));
                    }
                    Err(_) => r.errors += 1,
                }
            }
            r
        }));
    }
    let mut total = LoadReport::default();
    for t in tasks {
        let r = t.await?;
        total.errors += r.errors;
        total.latencies.extend(r.latencies);
        for (k, v) in r.by_status {
            *total.by_status.entry(k).or_default() += v;
        }
        total.last = r.last.or(total.last);
    }
    total.elapsed = start.elapsed();
    if total.by_status.is_empty() && total.errors > 0 {
        bail!(
            "could not reach {uri} ({} connection errors); is `sluice serve` running?",
            total.errors
        );
    }
    Ok(total)
}
