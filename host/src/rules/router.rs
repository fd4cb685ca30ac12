//! Router workers: the tasks that take stored events off the log, run the
//! current rule set on each, and record the decision.
//!
//! A worker claims a batch with a lease, routes its events on the blocking
//! pool, several per hand-off (rules are synchronous and CPU-bound), then
//! records the batch's decisions in one write, or retries an event later or
//! dead-letters it as the failure policy says; an event whose rule cannot run
//! now (switched off, no capacity) is deferred without counting an attempt.
//! It renews the batch's leases as it goes. It never acknowledges
//! an event before its decision is stored, so a crash between claim and
//! decision leaves the event to be claimed again when the lease expires.
//! Workers never touch ingress and never hold a rule set across events: each
//! event loads the set current when it starts.

use std::collections::VecDeque;
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

    /// Routes a claimed batch and records its decisions in one write at the
    /// end. Events are routed in order, several to one hand-off to the
    /// blocking pool: as many as the rule set's worst case lets finish within
    /// half a lease. All the batch's leases were taken at once, so before each
    /// hand-off the worker renews them whenever what is left of them might not
    /// cover that hand-off's worst case with room to spare (the rule set
    /// refuses a worst case longer than the lease): no event of the batch
    /// expires while it waits its turn or its write, and none is routed twice.
    async fn route_batch(&self, claimed: Vec<Claimed>) {
        let leases: Vec<Lease> = claimed.iter().map(Claimed::lease).collect();
        let mut expires = Instant::now() + self.options.lease;
        let mut held = vec![true; claimed.len()];
        let mut done = Vec::with_capacity(claimed.len());
        let mut rest: VecDeque<(usize, Claimed)> = claimed.into_iter().enumerate().collect();
        let budget = self.options.lease / 2;
        while !rest.is_empty() {
            if self.stopping() {
                // Not routed: back to the queue as it was, no attempt spent.
                for (_, c) in rest.drain(..) {
                    if let Err(e) = self
                        .store
                        .defer(&c.lease(), Duration::ZERO, "the worker stopped")
                        .await
                    {
                        tracing::warn!(event = %c.event.id, error = %e, "cannot release the event; its lease will expire");
                    }
                }
                break;
            }
            let set = self.rules.load();
            let worst = set.worst_case();
            // A rule with no deadline (a native rule) gives no worst case to
            // plan by: one event per hand-off, the lease checked before each.
            let per_hand_off = if !set.bounded() {
                1
            } else {
                usize::try_from(
                    budget
                        .as_nanos()
                        .checked_div(worst.as_nanos())
                        .unwrap_or(u128::MAX),
                )
                .unwrap_or(usize::MAX)
                .max(1)
            };
            drop(set);
            // An event claimed before may be what crashed the worker that
            // held it: it goes alone, after the decisions made so far are
            // recorded, so a crash it causes again does not take them along.
            let mut chunk: Vec<(usize, Claimed)> = Vec::new();
            while let Some((_, c)) = rest.front() {
                let retried = c.attempt > 1;
                if chunk.len() == per_hand_off || (retried && !chunk.is_empty()) {
                    break;
                }
                chunk.push(rest.pop_front().expect("front"));
                if retried {
                    break;
                }
            }
            let n = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            let margin = worst.saturating_mul(n) + budget;
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
            let chunk: Vec<(usize, Claimed)> = chunk
                .into_iter()
                .filter(|(i, _)| {
                    if !held[*i] {
                        tracing::warn!(event = %leases[*i].event_id, "lease lost before routing; another worker has the event");
                    }
                    held[*i]
                })
                .collect();
            if chunk.iter().any(|(_, c)| c.attempt > 1) && !done.is_empty() {
                self.complete(std::mem::take(&mut done)).await;
            }
            let (decided, left) = self.route_chunk(chunk, budget).await;
            done.extend(decided);
            // A hand-off stops early when the rule set grew mid-way (a reload)
            // and the next event might not finish within the budget.
            for item in left.into_iter().rev() {
                rest.push_front(item);
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

    /// Routes events one after another in one hand-off to the blocking pool
    /// (each with the rule set current when it starts). The decisions to
    /// record are handed back (the batch's are recorded together); every
    /// other outcome is settled here.
    async fn route_chunk(
        &self,
        chunk: Vec<(usize, Claimed)>,
        budget: Duration,
    ) -> (
        Vec<(Lease, crate::decision::Decision)>,
        Vec<(usize, Claimed)>,
    ) {
        if chunk.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let rules = self.rules.clone();
        let routed = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut decided = Vec::with_capacity(chunk.len());
            let mut left = Vec::new();
            for (i, c) in chunk {
                let set = rules.load_full();
                if !decided.is_empty() && started.elapsed() + set.worst_case() > budget {
                    left.push((i, c));
                    continue;
                }
                let head = (c.lease(), c.event.received_at_ms);
                decided.push((head, set.route(&Arc::new(ParsedEvent::new(c.event)))));
            }
            (decided, left)
        })
        .await;
        let (decided, left) = match routed {
            Ok(routed) => routed,
            Err(e) => {
                // `RuleSet::route` catches rule panics; reaching here is a host
                // bug. The events' leases expire and they are claimed again.
                tracing::error!(error = %e, "routing panicked");
                return (Vec::new(), Vec::new());
            }
        };
        let mut out = Vec::with_capacity(decided.len());
        for ((lease, received_at_ms), decision) in decided {
            if let Some(d) = self.settle(lease, received_at_ms, decision).await {
                out.push(d);
            }
        }
        (out, left)
    }

    /// Acts on one event's decision: a decision to record is handed back; a
    /// deferral, retry or dead letter is settled here.
    async fn settle(
        &self,
        lease: Lease,
        received_at_ms: i64,
        decision: crate::decision::Decision,
    ) -> Option<(Lease, crate::decision::Decision)> {
        let id = lease.event_id.clone();
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
