//! The per-rule circuit breaker: a rule that keeps failing is switched off for
//! a cool-down, then given one trial call.
//!
//! It only counts outcomes and answers "may this rule run now?"; it never runs
//! a rule, and it can only ever switch off a rule, never the host.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::rules::config::BreakerConfig;

/// Consecutive-failure breaker, lock-free so the routing path never waits on it.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    consecutive: AtomicU32,
    /// Nanoseconds since [`epoch`] until which the rule is off; 0 = closed.
    open_until: AtomicU64,
}

/// Whether a rule may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Running normally.
    Closed,
    /// Switched off for this long still.
    Open(Duration),
    /// The cool-down is over: the next call is a trial.
    HalfOpen,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Breaker {
    /// A closed breaker with these thresholds.
    pub fn new(config: &BreakerConfig) -> Self {
        Breaker {
            threshold: config.failures.max(1),
            cooldown: Duration::from_millis(config.cooldown_ms),
            consecutive: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return BreakerState::Closed;
        }
        let now = now_ns();
        if now < until {
            BreakerState::Open(Duration::from_nanos(until - now))
        } else {
            BreakerState::HalfOpen
        }
    }

    /// Asks to run the rule now. Like [`Breaker::state`], except that when the
    /// cool-down is over exactly one caller gets `HalfOpen` (the trial call):
    /// it pushes the reopening time a cool-down ahead, so the other workers see
    /// `Open` until the trial's outcome closes or reopens the breaker.
    pub fn admit(&self) -> BreakerState {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return BreakerState::Closed;
        }
        let now = now_ns();
        if now < until {
            return BreakerState::Open(Duration::from_nanos(until - now));
        }
        let next = now.saturating_add(u64::try_from(self.cooldown.as_nanos()).unwrap_or(u64::MAX));
        match self
            .open_until
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => BreakerState::HalfOpen,
            Err(0) => BreakerState::Closed,
            Err(other) => BreakerState::Open(Duration::from_nanos(other.saturating_sub(now))),
        }
    }

    /// Records a successful call: the breaker closes.
    pub fn success(&self) {
        self.consecutive.store(0, Ordering::Release);
        self.open_until.store(0, Ordering::Release);
    }

    /// Records a failed call; returns true when this failure switched the rule off.
    pub fn failure(&self) -> bool {
        let n = self
            .consecutive
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if n >= self.threshold {
            let until = now_ns()
                .saturating_add(u64::try_from(self.cooldown.as_nanos()).unwrap_or(u64::MAX));
            self.open_until.store(until, Ordering::Release);
            return true;
        }
        false
    }

    /// Consecutive failures so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Ordering::Acquire)
    }
}
