//! The per-rule circuit breaker: a rule that keeps failing is switched off for
//! a cool-down, then given one trial call.
//!
//! It only counts outcomes and answers "may this rule run now?"; it never runs
//! a rule, and it can only ever switch off a rule, never the host.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
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
    /// A trial call is running. Tracked apart from `open_until` so a trial
    /// that outlives the cool-down cannot let a second one start.
    trial: AtomicBool,
}

/// Whether a rule may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Running normally.
    Closed,
    /// Switched off for this long still (at least; a trial in flight keeps
    /// it off until the trial's outcome is known).
    Open(Duration),
    /// The cool-down is over: the next call is a trial.
    HalfOpen,
}

/// How a call that the breaker admitted ended, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The rule ran to an answer (routes, an ignore, or an error value of its
    /// own): it works, even if this event did not suit it.
    Ran,
    /// The rule broke the sandbox's bounds (trap, timeout, memory): counted.
    Broke,
    /// The rule did not run at all (the host had no capacity): not counted.
    NotRun,
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
            trial: AtomicBool::new(false),
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
        } else if self.trial.load(Ordering::Acquire) {
            BreakerState::Open(self.cooldown)
        } else {
            BreakerState::HalfOpen
        }
    }

    /// Asks to run the rule now. Like [`Breaker::state`], except that when the
    /// cool-down is over exactly one caller gets `HalfOpen` (the trial call):
    /// until that caller reports its outcome with [`Breaker::record`], every
    /// other caller sees `Open`, however long the trial takes. While a trial
    /// runs the time left is unknown; `Open` then says one cool-down.
    pub fn admit(&self) -> BreakerState {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return BreakerState::Closed;
        }
        let now = now_ns();
        if now < until {
            return BreakerState::Open(Duration::from_nanos(until - now));
        }
        match self
            .trial
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => BreakerState::HalfOpen,
            Err(_) => BreakerState::Open(self.cooldown),
        }
    }

    /// Records how an admitted call ended; `trial` says whether [`Breaker::admit`]
    /// answered it `HalfOpen`. Returns true when this outcome switched the
    /// rule off.
    pub fn record(&self, outcome: Outcome, trial: bool) -> bool {
        let opened = match outcome {
            Outcome::Ran => {
                self.consecutive.store(0, Ordering::Release);
                self.open_until.store(0, Ordering::Release);
                false
            }
            Outcome::Broke => {
                let n = self
                    .consecutive
                    .fetch_add(1, Ordering::AcqRel)
                    .saturating_add(1);
                if n >= self.threshold || trial {
                    let until = now_ns().saturating_add(
                        u64::try_from(self.cooldown.as_nanos()).unwrap_or(u64::MAX),
                    );
                    self.open_until.store(until, Ordering::Release);
                    true
                } else {
                    false
                }
            }
            Outcome::NotRun => false,
        };
        if trial {
            self.trial.store(false, Ordering::Release);
        }
        opened
    }

    /// Consecutive failures so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failures: u32, cooldown_ms: u64) -> Breaker {
        Breaker::new(&BreakerConfig {
            failures,
            cooldown_ms,
        })
    }

    #[test]
    fn a_trial_in_flight_keeps_the_breaker_open_past_its_cool_down() {
        // No cool-down at all: only the trial in flight keeps others out.
        let b = breaker(1, 0);
        assert!(b.record(Outcome::Broke, false));
        assert_eq!(b.admit(), BreakerState::HalfOpen);
        for _ in 0..3 {
            assert!(matches!(b.admit(), BreakerState::Open(_)));
        }
        b.record(Outcome::Ran, true);
        assert_eq!(b.admit(), BreakerState::Closed);
    }

    #[test]
    fn a_trial_that_did_not_run_lets_the_next_caller_try() {
        let b = breaker(1, 0);
        b.record(Outcome::Broke, false);
        assert_eq!(b.admit(), BreakerState::HalfOpen);
        assert!(!b.record(Outcome::NotRun, true));
        assert_eq!(b.admit(), BreakerState::HalfOpen);
        // A failed trial reopens at once, whatever the count.
        assert!(b.record(Outcome::Broke, true));
    }

    #[test]
    fn only_sandbox_breaks_count() {
        let b = breaker(2, 60_000);
        for _ in 0..5 {
            assert!(!b.record(Outcome::Ran, false));
            assert!(!b.record(Outcome::NotRun, false));
        }
        assert!(!b.record(Outcome::Broke, false));
        assert!(b.record(Outcome::Broke, false));
        assert!(matches!(b.admit(), BreakerState::Open(_)));
    }
}
