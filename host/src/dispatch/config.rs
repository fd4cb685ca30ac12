//! `[agents.NAME]`, `[workflows.NAME]`, `[dispatch]` and `[admin]`: where
//! routed events go, and the operator's listener.
//!
//! An agent is one destination with its own transport (`http`, `nats`,
//! `exec`, or the local `outbox`), retry policy and limits. A workflow is a
//! named list of steps over agents. Every name a rule may route to must be
//! declared here: [`validate`] checks the routes' targets, and the rules'
//! grants, against these tables, so a typo is an error at `sluice check` and
//! at reload rather than at the first event.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{SecretSpec, duration, opt_duration};

/// How an agent receives its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    /// POST the signed envelope to `url`.
    Http,
    /// Publish the envelope to `subject` on a NATS JetStream server and wait
    /// for the stream's ack.
    Nats,
    /// Run `command` (no shell) with the envelope on stdin; exit 0 is success.
    Exec,
    /// Append the envelope and its signature headers as one JSON line to
    /// `outbox/NAME.jsonl` under the data dir (the embedded defaults' agents).
    Outbox,
}

impl AgentKind {
    /// The lower-case name used in the config and in output.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentKind::Http => "http",
            AgentKind::Nats => "nats",
            AgentKind::Exec => "exec",
            AgentKind::Outbox => "outbox",
        }
    }
}

/// A circuit breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failed attempts that open the breaker.
    pub failures: u32,
    /// How long it stays open before one probe is let through.
    #[serde(deserialize_with = "duration")]
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            cooldown: Duration::from_secs(30),
        }
    }
}

/// A rate limit on deliveries to one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRate {
    /// Sustained deliveries per second.
    pub per_second: u32,
    /// Burst size (defaults to `per_second`).
    pub burst: Option<u32>,
}

/// `[agents.NAME]`: one destination.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The transport.
    pub kind: AgentKind,
    /// `http`: the URL to POST to (`http://` or `https://`).
    pub url: Option<String>,
    /// `nats`: the server URL (`nats://host:port`).
    pub server: Option<String>,
    /// `nats`: the subject to publish to (a JetStream stream must cover it).
    pub subject: Option<String>,
    /// `exec`: the program and its arguments; no shell is involved.
    pub command: Option<Vec<String>>,
    /// `exec`: the environment the program gets (it starts empty), by name;
    /// a value is given literally.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `exec`: names of the gateway's own environment variables passed
    /// through as they are (e.g. `PATH`).
    #[serde(default)]
    pub env_pass: Vec<String>,
    /// Standard Webhooks signing secrets (`whsec_…`), newest first; several
    /// at once while a secret is rotated. Defaults to `dispatch.signing_secret`.
    pub signing_secrets: Option<Vec<SecretSpec>>,
    /// `http`: static request headers (no secrets: use `bearer`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `http`: a token sent as `Authorization: Bearer …`, from env or file.
    pub bearer: Option<SecretSpec>,
    /// Longest one attempt may take (connect, send, answer; or the program's
    /// run time).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Attempts before a delivery is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Age (since the event was received) past which a delivery still
    /// failing is dead-lettered, whatever its attempts.
    #[serde(default = "default_max_age", deserialize_with = "duration")]
    pub max_age: Duration,
    /// The first retry's delay ceiling; each further retry doubles it (full
    /// jitter: the delay is uniform in `[0, ceiling]`).
    #[serde(default = "default_backoff", deserialize_with = "duration")]
    pub backoff: Duration,
    /// The largest retry delay ceiling (and the longest `Retry-After` heeded).
    #[serde(default = "default_max_backoff", deserialize_with = "duration")]
    pub max_backoff: Duration,
    /// Deliveries in flight to this agent at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Deliveries per second, if limited.
    pub rate_limit: Option<AgentRate>,
    /// When the agent is taken to be down.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// `http`: the most bytes of the agent's answer read back (the rest is
    /// discarded; an answer over it is not passed to a workflow's next step).
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// `http`: may the URL reach private network ranges (RFC 1918, ULA, CGNAT)?
    #[serde(default)]
    pub allow_private_network: bool,
    /// `http`: may the URL reach loopback addresses?
    #[serde(default)]
    pub allow_loopback: bool,
    /// `http`: may the URL reach cloud metadata addresses (169.254.169.254 …)?
    #[serde(default)]
    pub allow_cloud_metadata: bool,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_attempts() -> u32 {
    8
}
fn default_max_age() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(600)
}
fn default_concurrency() -> usize {
    16
}
fn default_max_response() -> usize {
    64 * 1024
}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// The step's name (its part of the idempotency key); `step-N` (from 1)
    /// when not given.
    pub name: Option<String>,
    /// Deliver to this agent and wait for its success. `"$route"` means the
    /// agent the route names.
    pub agent: Option<String>,
    /// Deliver to all of these agents at once and wait for every success.
    pub parallel: Option<Vec<String>>,
    /// Wait this long.
    #[serde(default, deserialize_with = "opt_duration")]
    pub delay: Option<Duration>,
}

/// What a step does, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepAction {
    /// Deliver to these agents (one, or several in parallel) and wait for
    /// every one to succeed. `"$route"` stands for the route's agent.
    Deliver(Vec<String>),
    /// Wait.
    Delay(Duration),
}

/// The agent name in a step that stands for the route's own agent.
pub const ROUTE_AGENT: &str = "$route";

impl StepConfig {
    /// The step's action; `None` when it names none or more than one kind.
    pub fn action(&self) -> Option<StepAction> {
        match (&self.agent, &self.parallel, self.delay) {
            (Some(a), None, None) => Some(StepAction::Deliver(vec![a.clone()])),
            (None, Some(list), None) if !list.is_empty() => Some(StepAction::Deliver(list.clone())),
            (None, None, Some(d)) => Some(StepAction::Delay(d)),
            _ => None,
        }
    }
}

/// `[workflows.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowConfig {
    /// The steps, in order.
    pub steps: Vec<StepConfig>,
    /// Longest a run may take from its start; then its open deliveries are
    /// dead-lettered and the run fails.
    #[serde(default = "default_workflow_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Runs of this workflow in progress at once; more wait their turn.
    #[serde(default = "default_workflow_concurrency")]
    pub concurrency: usize,
}

fn default_workflow_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_workflow_concurrency() -> usize {
    16
}

impl WorkflowConfig {
    /// Step `i`'s name: its own, or `step-{i+1}`.
    pub fn step_name(&self, i: usize) -> String {
        self.steps
            .get(i)
            .and_then(|s| s.name.clone())
            .unwrap_or_else(|| format!("step-{}", i + 1))
    }
}

/// `[dispatch]`: what every agent shares.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// Run deliveries at all (off: decisions are recorded and deliveries
    /// queued, nothing is sent).
    pub enabled: bool,
    /// The signing secret of agents that name none.
    pub signing_secret: SecretSpec,
    /// Where `outbox` agents write, relative to the data dir.
    pub outbox_dir: PathBuf,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            enabled: true,
            signing_secret: SecretSpec {
                env: Some("SLUICE_SIGNING_SECRET".into()),
                file: None,
                generate: true,
            },
            outbox_dir: PathBuf::from("outbox"),
        }
    }
}

/// `[admin]`: the operator's API, on its own listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve it at all.
    pub enabled: bool,
    /// Where it listens (loopback by default).
    pub listen: SocketAddr,
    /// The bearer token every request must carry.
    pub token: SecretSpec,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 3848)),
            token: SecretSpec {
                env: Some("SLUICE_ADMIN_TOKEN".into()),
                file: None,
                generate: true,
            },
        }
    }
}

/// A fault in the dispatch tables: the dotted key and what is wrong.
pub type Fault = (String, String);

/// Checks the agents and workflows on their own (kinds have their keys,
/// numbers are positive, steps name declared agents).
pub fn validate(
    agents: &BTreeMap<String, AgentConfig>,
    workflows: &BTreeMap<String, WorkflowConfig>,
) -> Result<(), Fault> {
    let fault = |k: String, m: &str| Err((k, m.to_string()));
    for (name, a) in agents {
        let at = |k: &str| format!("agents.{name}.{k}");
        if name.is_empty() || name.starts_with('$') {
            return fault(
                format!("agents.{name}"),
                "an agent name may not be empty or start with `$`",
            );
        }
        match a.kind {
            AgentKind::Http => match a.url.as_deref() {
                None => return fault(at("url"), "an http agent needs `url`"),
                Some(u) => {
                    let uri: http::Uri = match u.parse() {
                        Ok(uri) => uri,
                        Err(e) => return fault(at("url"), &format!("not a URL: {e}")),
                    };
                    if !matches!(uri.scheme_str(), Some("http") | Some("https"))
                        || uri.host().is_none()
                    {
                        return fault(at("url"), "expected an http:// or https:// URL with a host");
                    }
                }
            },
            AgentKind::Nats => {
                if a.server.is_none() {
                    return fault(
                        at("server"),
                        "a nats agent needs `server` (nats://host:port)",
                    );
                }
                if a.subject.as_deref().is_none_or(str::is_empty) {
                    return fault(at("subject"), "a nats agent needs `subject`");
                }
            }
            AgentKind::Exec => {
                if a.command
                    .as_ref()
                    .is_none_or(|c| c.is_empty() || c[0].is_empty())
                {
                    return fault(
                        at("command"),
                        "an exec agent needs `command` = [\"program\", \"arg\", …]",
                    );
                }
            }
            AgentKind::Outbox => {}
        }
        if a.max_attempts == 0 {
            return fault(at("max_attempts"), "must be at least 1");
        }
        if a.concurrency == 0 {
            return fault(at("concurrency"), "must be at least 1");
        }
        if a.timeout.is_zero() {
            return fault(at("timeout"), "must be greater than 0");
        }
        if a.breaker.failures == 0 {
            return fault(at("breaker.failures"), "must be at least 1");
        }
        if a.breaker.cooldown.is_zero() {
            return fault(at("breaker.cooldown"), "must be greater than 0");
        }
        if let Some(r) = a.rate_limit
            && (r.per_second == 0 || r.burst == Some(0))
        {
            return fault(
                at("rate_limit"),
                "per_second and burst must be greater than 0",
            );
        }
    }
    for (name, w) in workflows {
        let at = |k: String| format!("workflows.{name}.{k}");
        if w.steps.is_empty() {
            return fault(at("steps".into()), "a workflow needs at least one step");
        }
        if w.concurrency == 0 {
            return fault(at("concurrency".into()), "must be at least 1");
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, s) in w.steps.iter().enumerate() {
            let Some(action) = s.action() else {
                return fault(
                    at(format!("steps[{i}]")),
                    "a step is exactly one of `agent = \"name\"`, `parallel = [\"a\", \"b\"]` or `delay = \"30s\"`",
                );
            };
            if !names.insert(w.step_name(i)) {
                return fault(at(format!("steps[{i}].name")), "step names must differ");
            }
            if let StepAction::Deliver(list) = action {
                let distinct: std::collections::BTreeSet<_> = list.iter().collect();
                if distinct.len() != list.len() {
                    return fault(
                        at(format!("steps[{i}].parallel")),
                        "names an agent twice (each agent gets one delivery per step)",
                    );
                }
                for agent in list {
                    if agent != ROUTE_AGENT && !agents.contains_key(&agent) {
                        return fault(
                            at(format!("steps[{i}]")),
                            &format!("no agent named {agent:?} is declared under [agents]"),
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
