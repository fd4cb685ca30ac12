//! The dispatcher: one loop per agent that claims its due deliveries and
//! makes attempts, and one loop that moves workflow runs from step to step.
//!
//! Per agent it holds the limits the config sets: at most `concurrency`
//! attempts in flight, at most `rate_limit` a second, and a circuit breaker
//! (after `breaker.failures` failed attempts in a row, nothing is sent for
//! `breaker.cooldown`, then one probe). When the agent is saturated, the
//! store hands out the most urgent deliveries first. Each agent has its own
//! loop, permits and breaker, so a slow or dead agent holds up nobody else,
//! and intake never waits for dispatch.
//!
//! An attempt's outcome decides the delivery's fate: delivered; retried
//! after an exponential backoff with full jitter (or the agent's
//! `Retry-After`, whichever is longer, up to `max_backoff`); or dead-lettered
//! when it failed for good, ran out of `max_attempts`, or the event grew
//! older than `max_age`. Every attempt is stored.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Semaphore, watch};

use crate::config::Config;
use crate::decision::Route;
use crate::dispatch::config::{AgentConfig, ROUTE_AGENT, StepAction, WorkflowConfig};
use crate::dispatch::envelope::{Envelope, Signer, idempotency_key};
use crate::dispatch::transport::{Outcome, Request, Transport};
use crate::event::now_ms;
use crate::rules::breaker::{Breaker, BreakerState, Outcome as BreakerOutcome};
use crate::secret::Generate;
use crate::store::dispatch::{
    AttemptRecord, ClaimedDelivery, DispatchStore, RUNS, Settle, StepDelivery, delivery_name,
};

/// How long a claimed delivery stays leased past its agent's timeout.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// The longest an idle loop sleeps without looking at the store again (a
/// safety net: wake-ups come from the store's signals and due times).
const IDLE: Duration = Duration::from_secs(30);
/// How often deliveries to undeclared agents are looked for.
const SWEEP: Duration = Duration::from_secs(30);
/// Most deliveries one claim takes.
const CLAIM_MAX: usize = 64;
/// How long shutdown waits for attempts in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// One agent as the dispatcher runs it.
pub struct AgentRuntime {
    /// The agent's name.
    pub name: String,
    /// Its config.
    pub config: AgentConfig,
    transport: Arc<dyn Transport>,
    signer: Signer,
    permits: Arc<Semaphore>,
    limiter: Option<DefaultDirectRateLimiter>,
    breaker: Breaker,
}

impl std::fmt::Debug for AgentRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRuntime")
            .field("name", &self.name)
            .field("kind", &self.config.kind)
            .finish()
    }
}

impl AgentRuntime {
    /// An agent over a transport, signing with `signer`.
    pub fn new(
        name: &str,
        config: AgentConfig,
        transport: Arc<dyn Transport>,
        signer: Signer,
    ) -> Self {
        let limiter = config.rate_limit.and_then(|r| {
            let per = std::num::NonZeroU32::new(r.per_second)?;
            let burst = r.burst.and_then(std::num::NonZeroU32::new).unwrap_or(per);
            Some(RateLimiter::direct(
                Quota::per_second(per).allow_burst(burst),
            ))
        });
        let breaker = Breaker::new(&crate::rules::config::BreakerConfig {
            failures: config.breaker.failures,
            cooldown_ms: config.breaker.cooldown.as_millis() as u64,
        });
        AgentRuntime {
            name: name.to_string(),
            permits: Arc::new(Semaphore::new(config.concurrency.max(1))),
            transport,
            signer,
            limiter,
            breaker,
            config,
        }
    }

    /// Whether the breaker is open (sending nothing) now.
    pub fn breaker_open(&self) -> bool {
        !matches!(self.breaker.state(), BreakerState::Closed)
    }
}

/// The delay ceiling before retry `attempt` (from 1): `backoff` doubled per
/// attempt, at most `max_backoff`.
fn backoff_ceiling(config: &AgentConfig, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(30);
    config
        .backoff
        .saturating_mul(1u32 << doublings)
        .min(config.max_backoff)
}

/// The delay before retrying after failed attempt `attempt`: uniform in
/// `[0, ceiling]` (full jitter), but never shorter than the agent's
/// `Retry-After` (itself capped at `max_backoff`).
fn retry_delay(config: &AgentConfig, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let ceiling = backoff_ceiling(config, attempt);
    let mut buf = [0u8; 8];
    let r = getrandom::fill(&mut buf)
        .map(|_| u64::from_le_bytes(buf))
        .unwrap_or(u64::MAX / 2);
    let jitter = ceiling.mul_f64(r as f64 / u64::MAX as f64);
    match retry_after {
        Some(after) => jitter.max(after.min(config.max_backoff)),
        None => jitter,
    }
}

/// What becomes of a delivery after attempt `attempt` ended in `outcome`.
fn settle_for(
    config: &AgentConfig,
    attempt: u32,
    received_at_ms: i64,
    outcome: &Outcome,
    now: i64,
) -> Settle {
    match outcome {
        Outcome::Delivered { answer, .. } => Settle::Delivered(answer.clone()),
        Outcome::Final { error, .. } => Settle::Dead(format!("failed for good: {error}")),
        Outcome::Retry {
            error, retry_after, ..
        } => {
            if attempt >= config.max_attempts {
                return Settle::Dead(format!(
                    "gave up after {attempt} attempts (max_attempts): {error}"
                ));
            }
            let delay = retry_delay(config, attempt, *retry_after);
            let at = now + delay.as_millis() as i64;
            let max_age = config.max_age.as_millis() as i64;
            if at - received_at_ms > max_age {
                return Settle::Dead(format!(
                    "gave up: the event would be older than max_age ({}) at the next attempt; last error: {error}",
                    humantime::format_duration(config.max_age)
                ));
            }
            Settle::RetryAt(at)
        }
    }
}

/// Everything the dispatcher runs.
pub struct Dispatcher {
    store: Arc<dyn DispatchStore>,
    agents: BTreeMap<String, Arc<AgentRuntime>>,
    workflows: BTreeMap<String, WorkflowConfig>,
    node: String,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("agents", &self.agents.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Dispatcher {
    /// Builds every agent of `config` (transport and signer); an agent that
    /// cannot be built (a bad URL, a missing secret) is an error naming it.
    pub fn build(
        config: &Config,
        store: Arc<dyn DispatchStore>,
        generate: Generate,
    ) -> Result<Dispatcher, String> {
        let agents = Dispatcher::build_agents(config, generate)?;
        Ok(Dispatcher::new(store, agents, config.workflows.clone()))
    }

    /// Builds every agent of `config` (what `sluice check` tries without
    /// generating secrets).
    pub fn build_agents(
        config: &Config,
        generate: Generate,
    ) -> Result<BTreeMap<String, Arc<AgentRuntime>>, String> {
        let mut agents = BTreeMap::new();
        for (name, agent) in &config.agents {
            let transport = crate::dispatch::transport::build(name, agent, config, generate)?;
            let signer = signer_for(config, name, agent, generate)?;
            agents.insert(
                name.clone(),
                Arc::new(AgentRuntime::new(name, agent.clone(), transport, signer)),
            );
        }
        Ok(agents)
    }

    /// A dispatcher over agents already built (tests, benches).
    pub fn new(
        store: Arc<dyn DispatchStore>,
        agents: BTreeMap<String, Arc<AgentRuntime>>,
        workflows: BTreeMap<String, WorkflowConfig>,
    ) -> Dispatcher {
        Dispatcher {
            store,
            agents,
            workflows,
            node: format!("dispatch-{}", std::process::id()),
        }
    }

    /// Runs every agent loop and the workflow loop until `stop` turns true,
    /// then waits (at most [`DRAIN`]) for attempts in flight.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        match self.store.release_claims().await {
            Ok(n) if n > 0 => {
                tracing::info!(
                    deliveries = n,
                    "deliveries left in flight by the last run go out again"
                )
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the last run's delivery claims; they go out when their leases end")
            }
        }
        let this = Arc::new(self);
        let mut tasks = Vec::new();
        for agent in this.agents.values() {
            tasks.push(tokio::spawn(agent_loop(
                this.clone(),
                agent.clone(),
                stop.clone(),
            )));
        }
        tasks.push(tokio::spawn(workflow_loop(this.clone(), stop.clone())));
        for t in tasks {
            if let Err(e) = t.await {
                tracing::error!(error = %e, "a dispatch loop ended abnormally");
            }
        }
    }
}

/// The signer of an agent: its own secrets, or `dispatch.signing_secret`.
fn signer_for(
    config: &Config,
    name: &str,
    agent: &AgentConfig,
    generate: Generate,
) -> Result<Signer, String> {
    let (owner, key, specs) = match &agent.signing_secrets {
        Some(specs) => (
            format!("agent-{name}"),
            format!("agents.{name}.signing_secrets"),
            specs.clone(),
        ),
        None => (
            "dispatch".to_string(),
            "dispatch.signing_secret".to_string(),
            vec![config.dispatch.signing_secret.clone()],
        ),
    };
    let loaded = crate::secret::load_all(
        config,
        &owner,
        &key,
        ".signing",
        crate::event::Provider::StandardWebhooks,
        &specs,
        generate,
    )
    .map_err(|e| e.to_string())?;
    let secrets: Vec<_> = loaded.into_iter().map(|l| l.secret).collect();
    Signer::new(&secrets).map_err(|e| format!("{}: {key}: {e}", config.origin))
}

async fn agent_loop(d: Arc<Dispatcher>, agent: Arc<AgentRuntime>, mut stop: watch::Receiver<bool>) {
    let mut signal = d.store.delivery_signal(&agent.name);
    let lease = agent.config.timeout + LEASE_MARGIN;
    let breaker_gauge =
        ::metrics::gauge!("sluice_agent_breaker_open", "agent" => agent.name.clone());
    loop {
        if *stop.borrow() {
            break;
        }
        signal.borrow_and_update();
        // The breaker: nothing goes out while it is open; once the cool-down
        // is over, one probe.
        let probe = match agent.breaker.state() {
            BreakerState::Closed => false,
            BreakerState::Open(left) => {
                breaker_gauge.set(1.0);
                tokio::select! {
                    _ = tokio::time::sleep(left.min(Duration::from_secs(1))) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            BreakerState::HalfOpen => true,
        };
        // Claim only what can go out now, so the rest stays in the store's
        // priority order for the next free slot.
        let free = agent.permits.available_permits();
        if free == 0 {
            let permit = tokio::select! {
                p = agent.permits.clone().acquire_owned() => p,
                _ = stop.changed() => continue,
            };
            drop(permit);
            continue;
        }
        // A rate-limited agent takes its token before it claims, one at a
        // time: a claim's lease must not run out while it waits its turn.
        if let Some(limiter) = &agent.limiter {
            tokio::select! {
                _ = limiter.until_ready() => {}
                _ = stop.changed() => continue,
            }
        }
        let want = if probe || agent.limiter.is_some() {
            1
        } else {
            free.min(CLAIM_MAX)
        };
        let claimed = match d
            .store
            .claim_deliveries(&agent.name, &d.node, want, lease)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(agent = %agent.name, error = %e, "cannot claim deliveries; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if claimed.is_empty() {
            let nap = idle_for(d.store.next_due(&agent.name).await);
            tokio::select! {
                _ = signal.changed() => {}
                _ = tokio::time::sleep(nap) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        for delivery in claimed {
            let trial = probe && matches!(agent.breaker.admit(), BreakerState::HalfOpen);
            let Ok(permit) = agent.permits.clone().acquire_owned().await else {
                break;
            };
            let d = d.clone();
            let agent = agent.clone();
            tokio::spawn(async move {
                attempt(&d, &agent, delivery, trial).await;
                drop(permit);
            });
        }
    }
    // Let attempts in flight finish (bounded); a delivery cut off here is
    // claimed again after restart, under the same idempotency key.
    let all = agent.config.concurrency.max(1) as u32;
    let _ = tokio::time::timeout(DRAIN, agent.permits.acquire_many(all)).await;
}

/// How long an idle loop sleeps: until the next due time, at most [`IDLE`]
/// (signals wake it sooner). The store's next due time counts only what a
/// claim could take (not a delivery waiting behind an earlier one of its
/// ordering key, nothing of a paused agent), so a time already past means
/// one came due since the claim: look again at once.
fn idle_for(next_due: Result<Option<i64>, crate::store::StoreError>) -> Duration {
    match next_due {
        Ok(Some(at)) => {
            let ahead = at - now_ms();
            Duration::from_millis(ahead.max(0) as u64 + 1).min(IDLE)
        }
        Ok(None) => IDLE,
        Err(_) => Duration::from_secs(1),
    }
}

/// Makes one attempt at a claimed delivery and settles it.
async fn attempt(d: &Dispatcher, agent: &AgentRuntime, delivery: ClaimedDelivery, trial: bool) {
    let started_ms = now_ms();
    let started = Instant::now();
    // Too old to send at all (its agent was paused or backed up past it):
    // dead-lettered without an attempt on the wire.
    let age = started_ms - delivery.event.received_at_ms;
    if age > agent.config.max_age.as_millis() as i64 {
        if trial {
            agent.breaker.record(BreakerOutcome::NotRun, true);
        }
        let reason = format!(
            "gave up: the event is older than max_age ({}) before this attempt",
            humantime::format_duration(agent.config.max_age)
        );
        let record = AttemptRecord {
            attempt: delivery.attempt,
            at_ms: started_ms,
            outcome: "failed".into(),
            status: None,
            latency_us: 0,
            error: Some(reason.clone()),
            response_bytes: 0,
        };
        ::metrics::counter!("sluice_dispatch_dead_letters_total", "agent" => agent.name.clone())
            .increment(1);
        if let Err(e) = d
            .store
            .settle_delivery(&delivery.lease(), &record, Settle::Dead(reason))
            .await
        {
            tracing::warn!(agent = %agent.name, delivery = %delivery_name(delivery.id), error = %e, "cannot settle a delivery");
        }
        return;
    }
    let envelope = Envelope::new(
        &delivery.event,
        &delivery.route,
        delivery.attempt,
        delivery.step.as_deref(),
    )
    .with_input(delivery.input.as_ref());
    let body = envelope.to_body();
    let headers = agent
        .signer
        .sign(&body, &delivery.idempotency_key, started_ms / 1000);
    let request = Request {
        body: body.into(),
        headers,
        idempotency_key: delivery.idempotency_key.clone(),
    };
    // The transport bounds the attempt by the agent's timeout; this bound
    // only catches a transport that does not.
    let outcome = match tokio::time::timeout(
        agent.config.timeout + Duration::from_secs(5),
        agent.transport.send(&request),
    )
    .await
    {
        Ok(o) => o,
        Err(_) => Outcome::retry(format!(
            "no answer within the timeout ({})",
            humantime::format_duration(agent.config.timeout)
        )),
    };
    let latency = started.elapsed();
    // A failed attempt counts toward the breaker only when it says the agent
    // is unwell (timeouts, connection errors, 5xx). A 429 is a working agent
    // asking for room (its `Retry-After` is honoured per delivery), and a
    // final 4xx is an answer from a working agent.
    let breaker_outcome = match &outcome {
        Outcome::Retry { status, .. } if *status != Some(429) => BreakerOutcome::Broke,
        _ => BreakerOutcome::Ran,
    };
    if agent.breaker.record(breaker_outcome, trial) {
        tracing::warn!(agent = %agent.name, cooldown = ?agent.config.breaker.cooldown, "agent breaker opened: deliveries wait");
    }
    if !agent.breaker_open() {
        ::metrics::gauge!("sluice_agent_breaker_open", "agent" => agent.name.clone()).set(0.0);
    }
    ::metrics::counter!("sluice_dispatch_attempts_total", "agent" => agent.name.clone(), "outcome" => outcome.kind())
        .increment(1);
    ::metrics::histogram!("sluice_dispatch_attempt_seconds", "agent" => agent.name.clone())
        .record(latency.as_secs_f64());
    let now = now_ms();
    let settle = settle_for(
        &agent.config,
        delivery.round_attempt,
        delivery.event.received_at_ms,
        &outcome,
        now,
    );
    match &settle {
        Settle::Delivered(_) => {
            let e2e = (now - delivery.event.received_at_ms).max(0) as f64 / 1000.0;
            ::metrics::histogram!("sluice_delivery_end_to_end_seconds", "agent" => agent.name.clone())
                .record(e2e);
        }
        Settle::Dead(reason) => {
            ::metrics::counter!("sluice_dispatch_dead_letters_total", "agent" => agent.name.clone())
                .increment(1);
            tracing::warn!(agent = %agent.name, delivery = %delivery_name(delivery.id), event = %delivery.event.id, %reason, "delivery dead-lettered");
        }
        Settle::RetryAt(_) => {
            tracing::debug!(agent = %agent.name, delivery = %delivery_name(delivery.id), error = outcome.error().unwrap_or(""), "delivery attempt failed; retrying later");
        }
    }
    let record = AttemptRecord {
        attempt: delivery.attempt,
        at_ms: started_ms,
        outcome: outcome.kind().to_string(),
        status: outcome.status(),
        latency_us: latency.as_micros() as u64,
        error: outcome.error().map(str::to_string),
        response_bytes: outcome.response_bytes(),
    };
    if let Err(e) = d
        .store
        .settle_delivery(&delivery.lease(), &record, settle)
        .await
    {
        tracing::warn!(agent = %agent.name, delivery = %delivery_name(delivery.id), error = %e, "cannot settle a delivery; it will be sent again when its lease ends");
    }
}

async fn workflow_loop(d: Arc<Dispatcher>, mut stop: watch::Receiver<bool>) {
    let mut signal = d.store.delivery_signal(RUNS);
    let limits: Vec<(String, usize, Duration)> = d
        .workflows
        .iter()
        .map(|(n, w)| (n.clone(), w.concurrency, w.timeout))
        .collect();
    let mut last_sweep = Instant::now();
    loop {
        if *stop.borrow() {
            return;
        }
        signal.borrow_and_update();
        if last_sweep.elapsed() >= SWEEP {
            last_sweep = Instant::now();
            sweep_undeclared(&d).await;
        }
        let runs = match d.store.ready_runs(256, &limits).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read workflow runs; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let busy = !runs.is_empty();
        for run in runs {
            let Some(workflow) = d.workflows.get(&run.workflow) else {
                let why = format!(
                    "workflow {:?} is not declared under [workflows]",
                    run.workflow
                );
                let _ = d.store.finish_run(run.id, Some(&why)).await;
                continue;
            };
            let i = run.step as usize;
            let Some(step) = workflow.steps.get(i) else {
                let _ = d.store.finish_run(run.id, None).await;
                continue;
            };
            let name = workflow.step_name(i);
            let result = match step.action() {
                Some(StepAction::Deliver(agents)) => {
                    let deliveries = agents
                        .iter()
                        .map(|a| {
                            let agent = if a == ROUTE_AGENT {
                                run.route.agent.clone()
                            } else {
                                a.clone()
                            };
                            let route = Route {
                                agent: agent.clone(),
                                ..run.route.clone()
                            };
                            StepDelivery {
                                idempotency_key: idempotency_key(
                                    &run.event_id,
                                    &route,
                                    Some(&name),
                                ),
                                agent,
                            }
                        })
                        .collect();
                    d.store
                        .start_step(run.id, run.step, &name, deliveries)
                        .await
                }
                Some(StepAction::Delay(delay)) => {
                    d.store
                        .delay_step(run.id, run.step, &name, now_ms() + delay.as_millis() as i64)
                        .await
                }
                None => {
                    d.store
                        .finish_run(run.id, Some("a step of no known kind"))
                        .await
                }
            };
            if let Err(e) = result {
                tracing::warn!(run = run.id, error = %e, "cannot move a workflow run; trying again");
            }
        }
        if busy {
            continue;
        }
        let nap = idle_for(d.store.next_due(RUNS).await).min(SWEEP);
        tokio::select! {
            _ = signal.changed() => {}
            _ = tokio::time::sleep(nap) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Dead-letters queued deliveries to agents the config does not declare
/// (the config changed since they were routed, or a rule granted every
/// agent named one that does not exist): no loop would ever send them.
async fn sweep_undeclared(d: &Dispatcher) {
    let Ok(counts) = d.store.dispatch_counts().await else {
        return;
    };
    for (agent, _) in counts.queued {
        if d.agents.contains_key(&agent) {
            continue;
        }
        let Ok(claimed) = d
            .store
            .claim_deliveries(&agent, &d.node, CLAIM_MAX, LEASE_MARGIN)
            .await
        else {
            continue;
        };
        for c in claimed {
            let reason = format!("agent {agent:?} is not declared under [agents]");
            let record = AttemptRecord {
                attempt: c.attempt,
                at_ms: now_ms(),
                outcome: "failed".into(),
                status: None,
                latency_us: 0,
                error: Some(reason.clone()),
                response_bytes: 0,
            };
            let _ = d
                .store
                .settle_delivery(&c.lease(), &record, Settle::Dead(reason))
                .await;
        }
    }
}
