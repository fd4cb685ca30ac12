//! Ready instances: component instances made ahead of time, off the event
//! path, each handed to exactly one event and then torn down off the event
//! path too.
//!
//! A fresh instance per event keeps events apart, but building one
//! (instantiation) and returning its pool slot afterwards (teardown) cost
//! several times the call itself. Here one engine-owned thread, the
//! *filler*, does both: it keeps up to `rules.pool.ready_per_rule`
//! instances ready per rule version, and drops the stores events are done
//! with. An event takes a ready instance when there is one and instantiates
//! inline when there is none (a burst, a rule whose start function fails),
//! so nothing waits on the filler. An event never wakes the filler either:
//! it leaves its used store and the refill request, and the epoch ticker,
//! which runs after every call anyway, passes them on.
//!
//! This module must never hand one instance to two events, never keep a
//! retired rule version's instances alive (the filler holds only weak
//! references to a rule's pool), and never let ready instances take the pool
//! slots the router workers need (all rules' ready instances together are
//! capped at `rules.pool.instances` less `rules.workers`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use metrics::{Counter, Gauge};

/// Stores waiting for the filler to drop them, past which an event drops its
/// own store inline rather than queue more (the filler is behind: a burst, or
/// a start function running to its deadline).
const MAX_PENDING_DROPS: usize = 64;

/// How long after an event last found no instance ready the filler waits
/// before making more for that rule. While events come faster than the
/// filler can make instances (a burst), each makes its own inline, and a
/// filler making instances beside them would only contend with them for
/// the engine's locks and the pool (measured back to back: more CPU per
/// event and more latency than inline alone). It fills again once the burst
/// is over.
const QUIET: Duration = Duration::from_micros(200);

/// What making one instance ahead of time came to.
pub(crate) enum Made<T> {
    /// An instance, ready for one event.
    Ready(T),
    /// No pool slot free now; try again after the next event.
    NoRoom,
    /// Instantiation fails for this rule version (a start function that
    /// traps, loops or exhausts memory). The pool stops filling, and every
    /// event instantiates inline, which reports the failure as it happens.
    Failed(String),
}

/// The engine's filler: a handle to its background thread. Cloned into each
/// rule's pool; the thread ends once the last handle is gone.
#[derive(Clone)]
pub(crate) struct Filler {
    tx: mpsc::Sender<Job>,
    counts: Arc<Counts>,
}

/// Engine-wide counts, shared with the filler thread.
struct Counts {
    /// Ready instances alive now, all rules together.
    ready: AtomicUsize,
    /// Pool slots in all (`rules.pool.instances`).
    slots: usize,
    /// Slots kept for calls on the event path (`rules.workers`).
    reserved: AtomicUsize,
    /// Stores handed to the filler to drop, not dropped yet.
    pending_drops: AtomicUsize,
    /// Whether the cap on ready instances has been reported.
    capped: AtomicBool,
    /// What the pools' miss times count from.
    base: Instant,
    /// Jobs events left for the filler without waking it (see
    /// [`Filler::kick`]).
    lazy: Mutex<Vec<Job>>,
    /// `lazy` has jobs.
    lazy_pending: AtomicBool,
}

enum Job {
    /// Top up one rule version's ready instances, unless it is retired.
    Fill(Weak<dyn Refill>),
    /// Tear down a store an event is done with.
    Drop(Box<dyn Send>),
}

/// A rule version's pool as the filler sees it.
trait Refill: Send + Sync {
    /// Tops the pool up; `Some(when)` to be asked again then, because
    /// events are still finding it empty.
    fn refill(&self) -> Option<Instant>;
}

impl std::fmt::Debug for Filler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filler")
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

impl Filler {
    /// Starts the filler thread for an engine with `slots` pool slots, of
    /// which `reserved` (shared with the engine, which may change it) are
    /// kept for calls on the event path.
    pub(crate) fn spawn(slots: usize, reserved: usize) -> anyhow::Result<Filler> {
        let (tx, rx) = mpsc::channel::<Job>();
        let counts = Arc::new(Counts {
            ready: AtomicUsize::new(0),
            slots,
            reserved: AtomicUsize::new(reserved),
            pending_drops: AtomicUsize::new(0),
            capped: AtomicBool::new(false),
            base: Instant::now(),
            lazy: Mutex::new(Vec::new()),
            lazy_pending: AtomicBool::new(false),
        });
        let thread_counts = counts.clone();
        std::thread::Builder::new()
            .name("sluice-ready".into())
            .spawn(move || run(&rx, &thread_counts))
            .context("starting the ready-instance filler")?;
        Ok(Filler { tx, counts })
    }

    /// Keeps `calls` pool slots free of ready instances (`rules.workers`).
    pub(crate) fn reserve(&self, calls: usize) {
        self.counts.reserved.store(calls, Ordering::Relaxed);
    }

    /// Ready instances alive now, all rules together.
    pub(crate) fn ready(&self) -> usize {
        self.counts.ready.load(Ordering::Relaxed)
    }

    /// Drops `item` on the filler thread, or here when the filler is behind.
    pub(crate) fn discard<T: Send + 'static>(&self, item: T) {
        let counts = &self.counts;
        if counts.pending_drops.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_DROPS {
            counts.pending_drops.fetch_sub(1, Ordering::Relaxed);
            return drop(item);
        }
        if let Err(mpsc::SendError(job)) = self.tx.send(Job::Drop(Box::new(item))) {
            counts.pending_drops.fetch_sub(1, Ordering::Relaxed);
            drop(job);
        }
    }

    /// Leaves jobs for the filler without waking it: waking a parked thread
    /// is a system call and, on a virtual machine, an interrupt to another
    /// CPU, measured as half of a ready-instance event at a steady pace.
    /// The epoch ticker, which runs after every call anyway, passes them on
    /// ([`Filler::kick`]).
    fn leave(&self, jobs: impl IntoIterator<Item = Job>) {
        let counts = &self.counts;
        counts
            .lazy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(jobs);
        counts.lazy_pending.store(true, Ordering::Release);
    }

    /// Passes the jobs events left to the filler, waking it. Called by the
    /// epoch ticker after each tick, so within a tick of the call that left
    /// them, and never on the event path.
    pub(crate) fn kick(&self) {
        let counts = &self.counts;
        if !counts.lazy_pending.swap(false, Ordering::AcqRel) {
            return;
        }
        let jobs = std::mem::take(&mut *counts.lazy.lock().unwrap_or_else(|e| e.into_inner()));
        for job in jobs {
            if let Err(mpsc::SendError(job)) = self.tx.send(job) {
                if let Job::Drop(_) = job {
                    counts.pending_drops.fetch_sub(1, Ordering::Relaxed);
                }
                drop(job);
            }
        }
    }

    /// Takes one slot of the ready-instance budget, if the cap allows.
    fn acquire(&self, gauge: &Gauge) -> Option<Token> {
        let counts = &self.counts;
        let cap = counts
            .slots
            .saturating_sub(counts.reserved.load(Ordering::Relaxed));
        let got = counts
            .ready
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            });
        if got.is_err() {
            if !counts.capped.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    cap,
                    "ready instances capped at rules.pool.instances less rules.workers; \
                     further events instantiate inline (raise rules.pool.instances or lower \
                     rules.pool.ready_per_rule)"
                );
            }
            return None;
        }
        gauge.increment(1.0);
        Some(Token {
            counts: counts.clone(),
            gauge: gauge.clone(),
        })
    }
}

/// The filler thread: drops handed-over stores first (they free pool
/// slots), then tops up the pools asked for (or, during a burst, once it is
/// over), until every handle is gone.
fn run(rx: &mpsc::Receiver<Job>, counts: &Counts) {
    let mut deferred: Vec<(Instant, Weak<dyn Refill>)> = Vec::new();
    loop {
        let first = match deferred.iter().map(|(at, _)| *at).min() {
            None => match rx.recv() {
                Ok(job) => Some(job),
                Err(mpsc::RecvError) => return,
            },
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
        };
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = deferred.drain(..).partition(|(at, _)| *at <= now);
        deferred = later;
        let mut fills: Vec<Weak<dyn Refill>> = due.into_iter().map(|(_, pool)| pool).collect();
        for job in first.into_iter().chain(rx.try_iter()) {
            match job {
                Job::Drop(item) => {
                    drop(item);
                    counts.pending_drops.fetch_sub(1, Ordering::Relaxed);
                }
                Job::Fill(pool) => fills.push(pool),
            }
        }
        for weak in fills {
            if let Some(pool) = weak.upgrade()
                && let Some(at) = pool.refill()
                && !deferred.iter().any(|(_, w)| w.ptr_eq(&weak))
            {
                deferred.push((at, weak));
            }
        }
    }
}

/// One place in the ready-instance budget; given back when it drops.
pub(crate) struct Token {
    counts: Arc<Counts>,
    gauge: Gauge,
}

impl Drop for Token {
    fn drop(&mut self) {
        self.counts.ready.fetch_sub(1, Ordering::AcqRel);
        self.gauge.decrement(1.0);
    }
}

/// One rule version's ready instances. Dropping it (the rule version
/// retired) drops them: the filler holds only a weak reference.
pub(crate) struct ReadyPool<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    filler: Filler,
}

/// A function that makes one instance for the pool.
type Make<T> = Box<dyn Fn() -> Made<T> + Send + Sync>;

struct Shared<T> {
    items: Mutex<Vec<(T, Token)>>,
    target: usize,
    make: Make<T>,
    filler: Filler,
    rule: Arc<str>,
    /// A fill job is queued and has not started.
    queued: AtomicBool,
    /// Instantiation failed in the background: no more filling.
    broken: AtomicBool,
    /// When an event last found none ready, in ns from the filler's base
    /// (0: never).
    last_miss: AtomicU64,
    gauge: Gauge,
    served: Counter,
    inline: Counter,
    /// Events served by a ready instance, and by one made inline.
    served_n: AtomicU64,
    inline_n: AtomicU64,
}

impl<T: Send + 'static> ReadyPool<T> {
    /// A pool keeping `target` instances of rule `rule` ready, made by
    /// `make` on the filler thread; the first fill is queued now.
    pub(crate) fn new(
        rule: Arc<str>,
        target: usize,
        filler: &Filler,
        make: impl Fn() -> Made<T> + Send + Sync + 'static,
    ) -> ReadyPool<T> {
        let label = rule.to_string();
        let shared = Arc::new(Shared {
            items: Mutex::new(Vec::with_capacity(target)),
            target,
            make: Box::new(make),
            filler: filler.clone(),
            gauge: metrics::gauge!("sluice_rule_ready_instances", "rule" => label.clone()),
            served: metrics::counter!("sluice_rule_instances_total", "rule" => label.clone(), "from" => "ready"),
            inline: metrics::counter!("sluice_rule_instances_total", "rule" => label, "from" => "inline"),
            rule,
            queued: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            last_miss: AtomicU64::new(0),
            served_n: AtomicU64::new(0),
            inline_n: AtomicU64::new(0),
        });
        let pool = ReadyPool {
            shared,
            filler: filler.clone(),
        };
        pool.request_fill();
        pool
    }

    /// A ready instance, if one is; hand what is left of it to
    /// [`ReadyPool::give_back`] once the event is done with it. `None` means
    /// the caller instantiates inline (and the filler is asked to refill
    /// once events stop finding the pool empty).
    ///
    /// The token is the instance's share of the ready-instance budget: it
    /// goes back with the used store, and is released only once the store
    /// is torn down and its pool slot is free again, so instances waiting
    /// for teardown still count against the cap.
    pub(crate) fn take(&self) -> Option<(T, Token)> {
        let shared = &self.shared;
        let got = shared.items.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match got {
            Some(taken) => {
                shared.served.increment(1);
                shared.served_n.fetch_add(1, Ordering::Relaxed);
                Some(taken)
            }
            None => {
                shared.inline.increment(1);
                shared.inline_n.fetch_add(1, Ordering::Relaxed);
                let since = shared.filler.counts.base.elapsed().as_nanos();
                let since = u64::try_from(since).unwrap_or(u64::MAX).max(1);
                shared.last_miss.store(since, Ordering::Relaxed);
                self.request_fill();
                None
            }
        }
    }

    /// Hands a used instance (its store) to the filler to tear down, and
    /// asks it to make the one that replaces it, both without waking it
    /// (the epoch ticker does, within a tick); the pool slot just freed is
    /// the one the next instance takes.
    pub(crate) fn give_back<U: Send + 'static>(&self, used: U, token: Token) {
        let shared = &self.shared;
        let counts = &self.filler.counts;
        let mut jobs = Vec::with_capacity(2);
        // The store drops before its token (tuple fields drop in order).
        let used = (used, token);
        if counts.pending_drops.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_DROPS {
            counts.pending_drops.fetch_sub(1, Ordering::Relaxed);
            drop(used);
        } else {
            jobs.push(Job::Drop(Box::new(used)));
        }
        if !shared.broken.load(Ordering::Relaxed) && !shared.queued.swap(true, Ordering::AcqRel) {
            let weak: Weak<Shared<T>> = Arc::downgrade(shared);
            jobs.push(Job::Fill(weak));
        }
        self.filler.leave(jobs);
    }

    /// Events served so far by a ready instance, and by one made inline.
    pub(crate) fn served(&self) -> (u64, u64) {
        let shared = &self.shared;
        (
            shared.served_n.load(Ordering::Relaxed),
            shared.inline_n.load(Ordering::Relaxed),
        )
    }

    /// Ready instances now.
    pub(crate) fn len(&self) -> usize {
        self.shared
            .items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether background instantiation failed and the pool stopped filling.
    pub(crate) fn is_broken(&self) -> bool {
        self.shared.broken.load(Ordering::Relaxed)
    }

    fn request_fill(&self) {
        let shared = &self.shared;
        if shared.broken.load(Ordering::Relaxed) || shared.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Shared<T>> = Arc::downgrade(shared);
        if self.filler.tx.send(Job::Fill(weak)).is_err() {
            shared.queued.store(false, Ordering::Release);
        }
    }
}

impl<T: Send + 'static> Drop for ReadyPool<T> {
    /// A retired rule version's ready instances are torn down on the filler
    /// thread, like used ones.
    fn drop(&mut self) {
        self.shared.broken.store(true, Ordering::Relaxed);
        let items =
            std::mem::take(&mut *self.shared.items.lock().unwrap_or_else(|e| e.into_inner()));
        for item in items {
            self.filler.discard(item);
        }
    }
}

impl<T: Send + 'static> Shared<T> {
    /// When the filler may make instances again, if events found the pool
    /// empty less than [`QUIET`] ago.
    fn busy_until(&self) -> Option<Instant> {
        let miss = self.last_miss.load(Ordering::Relaxed);
        if miss == 0 {
            return None;
        }
        let at = self.filler.counts.base + Duration::from_nanos(miss) + QUIET;
        (at > Instant::now()).then_some(at)
    }
}

impl<T: Send + 'static> Refill for Shared<T> {
    fn refill(&self) -> Option<Instant> {
        // Cleared first: a take from now on asks again, so none is missed.
        self.queued.store(false, Ordering::Release);
        // Only the filler thread adds instances, so the count it checks can
        // only fall while it makes the next one.
        loop {
            if self.broken.load(Ordering::Relaxed)
                || self.items.lock().unwrap_or_else(|e| e.into_inner()).len() >= self.target
            {
                break;
            }
            if let Some(at) = self.busy_until() {
                // Marked queued again: events in the burst need not ask.
                self.queued.store(true, Ordering::Release);
                return Some(at);
            }
            let Some(token) = self.filler.acquire(&self.gauge) else {
                break;
            };
            match (self.make)() {
                Made::Ready(item) => self
                    .items
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((item, token)),
                Made::NoRoom => break,
                Made::Failed(error) => {
                    self.broken.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        rule = %self.rule,
                        %error,
                        "cannot instantiate the rule ahead of time; each event instantiates it inline"
                    );
                    break;
                }
            }
        }
        None
    }
}
