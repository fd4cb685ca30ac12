//! Router workers: the tasks that take stored events off the log, run the
//! current rule set on each, and record the decision.
//!
//! A worker claims a batch with a lease, routes each event on a blocking
//! thread (rules are synchronous and CPU-bound), then completes it, retries it
//! later, or dead-letters it as the failure policy says; an event whose rule
//! cannot run now (switched off, no capacity) is deferred without counting an
//! attempt. It renews the batch's leases as it goes. It never acknowledges
//! an event before its decision is stored, so a crash between claim and
//! decision leaves the event to be claimed again when the lease expires.
//! Workers never touch ingress and never hold a rule set across events: each
//! event loads the set current when it starts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::event::ParsedEvent;
use crate::rules::SharedRuleSet;
use crate::rules::config::RulesConfig;
use crate::store::{Claimed, Lease, Released, Store, StoreError};

/// How the workers lease, poll and retry (taken from [`RulesConfig`]).
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// Number of worker tasks.
    pub workers: usize,
    /// Events leased per claim.
    pub batch: usize,
    /// Lease length.
    pub lease: Duration,
    /// Longest idle wait before polling again.
    pub poll: Duration,
    /// First retry delay (doubled per attempt, full jitter).
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// How long after its arrival an event may still be deferred without
    /// counting an attempt.
    pub max_defer: Duration,
}

impl From<&RulesConfig> for RouterOptions {
    fn from(c: &RulesConfig) -> Self {
        RouterOptions {
            workers: c.workers.max(1),
            batch: c.batch.max(1),
            lease: Duration::from_millis(c.lease_ms),
            poll: Duration::from_millis(c.poll_ms.max(1)),
            retry_base: Duration::from_millis(c.retry_base_ms),
            retry_max: Duration::from_millis(c.retry_max_ms),
            max_defer: Duration::from_millis(c.max_defer_ms),
        }
    }
}

/// Runs `options.workers` router workers until `shutdown` turns true (or its
/// sender is dropped); returns once every worker has finished the event it
/// was routing. Events claimed but not yet routed are left to their leases.
pub async fn run(
    store: Arc<dyn Store>,
    rules: SharedRuleSet,
    options: RouterOptions,
    shutdown: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    for n in 0..options.workers {
        let worker = Worker {
            name: format!("router-{n}"),
            store: store.clone(),
            rules: rules.clone(),
            options: options.clone(),
            shutdown: shutdown.clone(),
        };
        tasks.spawn(worker.run());
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            tracing::error!(error = %e, "router worker ended abnormally");
        }
    }
}

struct Worker {
    name: String,
    store: Arc<dyn Store>,
    rules: SharedRuleSet,
    options: RouterOptions,
    shutdown: watch::Receiver<bool>,
}

impl Worker {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow() || self.shutdown.has_changed().is_err()
    }

    async fn run(mut self) {
        let mut store_errors = 0u32;
        while !self.stopping() {
            match self
                .store
                .claim(&self.name, self.options.batch, self.options.lease)
                .await
            {
                Ok(claimed) if claimed.is_empty() => {
                    store_errors = 0;
                    let wait = self.store.wait_for_work(self.options.poll);
                    tokio::select! {
                        _ = wait => {}
                        _ = self.shutdown.changed() => {}
                    }
                }
                Ok(claimed) => {
                    store_errors = 0;
                    self.route_batch(claimed).await;
                }
                Err(e) => {
                    store_errors = store_errors.saturating_add(1);
                    let delay = backoff(
                        store_errors,
                        Duration::from_millis(100),
                        Duration::from_secs(10),
                    );
                    tracing::warn!(worker = %self.name, error = %e, ?delay, "claim failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.changed() => {}
                    }
                }
            }
        }
    }

    /// Routes a claimed batch one event after another and records its
    /// decisions in one write at the end. All its leases were taken at once,
    /// so before each event the worker renews the batch's leases whenever
    /// what is left of them might not cover this event's worst case (the rule
    /// set refuses a worst case longer than the lease) with room to spare: no
    /// event of the batch expires while it waits its turn or its write, and
    /// none is routed twice.
    async fn route_batch(&self, claimed: Vec<Claimed>) {
        let leases: Vec<Lease> = claimed.iter().map(Claimed::lease).collect();
        let mut expires = Instant::now() + self.options.lease;
        let mut held = vec![true; claimed.len()];
        let mut done = Vec::with_capacity(claimed.len());
        for (i, c) in claimed.into_iter().enumerate() {
            if self.stopping() {
                break;
            }
            let worst = self.rules.load().worst_case();
            let margin = worst + self.options.lease / 2;
            if expires.saturating_duration_since(Instant::now()) < margin {
                let renewed_at = Instant::now();
                // The events routed so far wait for the batch's write, so
                // their leases are renewed too, with those still to route.
                match self.store.extend(&leases, self.options.lease).await {
                    Ok(still) => {
                        held.copy_from_slice(&still);
                        expires = renewed_at + self.options.lease;
                    }
                    Err(e) => {
                        tracing::warn!(worker = %self.name, error = %e, "cannot renew leases");
                    }
                }
            }
            if !held[i] {
                tracing::warn!(event = %leases[i].event_id, "lease lost before routing; another worker has the event");
                continue;
            }
            // An event claimed before may be what crashed the worker that held
            // it: the decisions made so far are recorded before it runs, so a
            // crash it causes again does not take them along.
            if c.attempt > 1 && !done.is_empty() {
                self.complete(std::mem::take(&mut done)).await;
            }
            if let Some(decided) = self.route_one(c).await {
                done.push(decided);
            }
        }
        self.complete(done).await;
    }

    /// Records the batch's decisions in one write. An event whose decision
    /// is not recorded is routed again once its lease expires.
    async fn complete(&self, done: Vec<(Lease, crate::decision::Decision)>) {
        if done.is_empty() {
            return;
        }
        match self.store.complete_all(&done).await {
            Ok(results) => {
                for ((lease, _), result) in done.iter().zip(results) {
                    match result {
                        Ok(()) => {}
                        // Routing outlived the lease and another worker has the event now.
                        Err(e @ StoreError::LeaseLost(_)) => {
                            tracing::warn!(event = %lease.event_id, error = %e, "decision dropped")
                        }
                        Err(e) => {
                            tracing::error!(event = %lease.event_id, error = %e, "cannot record the decision")
                        }
                    }
                }
            }
            // The leases will expire and the events be routed again.
            Err(e) => {
                tracing::error!(events = done.len(), error = %e, "cannot record the decisions")
            }
        }
    }

    /// Routes one event. A decision to record is handed back (the batch's
    /// are recorded together); every other outcome is settled here.
    async fn route_one(&self, claimed: Claimed) -> Option<(Lease, crate::decision::Decision)> {
        let lease = claimed.lease();
        let id = lease.event_id.clone();
        let received_at_ms = claimed.event.received_at_ms;
        let set = self.rules.load_full();
        let ev = Arc::new(ParsedEvent::new(claimed.event));
        let decision = match tokio::task::spawn_blocking(move || set.route(&ev)).await {
            Ok(d) => d,
            Err(e) => {
                // `RuleSet::route` catches rule panics; reaching here is a host bug.
                let reason = format!("routing panicked: {e}");
                tracing::error!(event = %id, %reason);
                self.retry_or_dead_letter(&lease, &reason).await;
                return None;
            }
        };
        if let Some(defer) = &decision.defer {
            let waited = crate::event::now_ms().saturating_sub(received_at_ms);
            if u128::try_from(waited).unwrap_or(0) > self.options.max_defer.as_millis() {
                // Deferred long enough: from now on it is the rule's failure,
                // so the attempts run out and the policy applies.
                let reason = format!(
                    "{}; deferred for longer than rules.max_defer_ms ({} ms)",
                    defer.reason,
                    self.options.max_defer.as_millis()
                );
                self.retry_or_dead_letter(&lease, &reason).await;
                return None;
            }
            tracing::info!(event = %id, delay = ?defer.delay, reason = %defer.reason, "routing deferred; not an attempt");
            metrics::counter!("sluice_routing_deferred_total").increment(1);
            if let Err(e) = self.store.defer(&lease, defer.delay, &defer.reason).await {
                tracing::error!(event = %id, error = %e, "cannot release the event; its lease will expire");
            }
            return None;
        }
        record_metrics(&decision);
        if let Some(reason) = &decision.dead_letter {
            self.retry_or_dead_letter(&lease, reason).await;
            return None;
        }
        tracing::debug!(event = %id, routes = decision.routes.len(), "routed");
        Some((lease, decision))
    }

    /// A failed attempt: released to be routed again after a backoff, or
    /// dead-lettered by the store when it was the last one allowed.
    async fn retry_or_dead_letter(&self, lease: &Lease, reason: &str) {
        let (id, attempt) = (&lease.event_id, lease.attempt);
        let delay = backoff(attempt, self.options.retry_base, self.options.retry_max);
        match self.store.retry_later(lease, delay, reason).await {
            Ok(Released::Retrying) => {
                tracing::info!(event = %id, attempt, ?delay, %reason, "routing failed; retrying later")
            }
            Ok(Released::DeadLettered) => {
                tracing::warn!(event = %id, attempt, %reason, "routing failed on its last attempt; dead-lettered");
                metrics::counter!("sluice_dead_letters_total").increment(1);
            }
            Err(e) => {
                tracing::error!(event = %id, error = %e, "cannot release the event; its lease will expire")
            }
        }
    }
}

/// Per-rule latency and failures, and the event's outcome, for `/metrics`.
fn record_metrics(decision: &crate::decision::Decision) {
    use crate::decision::RuleOutcome;
    for r in &decision.rules {
        match &r.outcome {
            RuleOutcome::Skipped => continue,
            RuleOutcome::Failed(f) => {
                let kind = f.kind();
                metrics::counter!("sluice_rule_failures_total", "rule" => r.rule.clone(), "kind" => kind).increment(1);
            }
            RuleOutcome::Verdict(_) => {}
        }
        if let Some(v) = &r.violation {
            metrics::counter!("sluice_rule_failures_total", "rule" => r.rule.clone(), "kind" => v.kind()).increment(1);
        }
        metrics::histogram!("sluice_rule_duration_seconds", "rule" => r.rule.clone())
            .record(r.duration_us as f64 / 1e6);
    }
    let outcome = if decision.dead_letter.is_some() {
        "failed"
    } else {
        "routed"
    };
    metrics::counter!("sluice_events_routed_total", "outcome" => outcome).increment(1);
}

/// Exponential backoff with full jitter: uniform in `[0, min(max, base * 2^(n-1))]`.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let r = getrandom::u64().unwrap_or(u64::MAX / 2);
    let nanos = u64::try_from(exp.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(if nanos == 0 { 0 } else { r % (nanos + 1) })
}
