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
//! so nothing waits on the filler.
//!
//! This module must never hand one instance to two events, never keep a
//! retired rule version's instances alive (the filler holds only weak
//! references to a rule's pool), and never let ready instances take the pool
//! slots the router workers need (all rules' ready instances together are
//! capped at `rules.pool.instances` less `rules.workers`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak, mpsc};

use anyhow::Context;
use metrics::{Counter, Gauge};

/// Stores waiting for the filler to drop them, past which an event drops its
/// own store inline rather than queue more (the filler is behind: a burst, or
/// a start function running to its deadline).
const MAX_PENDING_DROPS: usize = 64;

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
}

enum Job {
    /// Top up one rule version's ready instances, unless it is retired.
    Fill(Weak<dyn Refill>),
    /// Tear down a store an event is done with.
    Drop(Box<dyn Send>),
}

/// A rule version's pool as the filler sees it.
trait Refill: Send + Sync {
    fn refill(&self);
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
/// slots), then tops up the pools asked for, until every handle is gone.
fn run(rx: &mpsc::Receiver<Job>, counts: &Counts) {
    while let Ok(first) = rx.recv() {
        let mut fills = Vec::new();
        for job in std::iter::once(first).chain(rx.try_iter()) {
            match job {
                Job::Drop(item) => {
                    drop(item);
                    counts.pending_drops.fetch_sub(1, Ordering::Relaxed);
                }
                Job::Fill(pool) => fills.push(pool),
            }
        }
        for pool in fills {
            if let Some(pool) = pool.upgrade() {
                pool.refill();
            }
        }
    }
}

/// One place in the ready-instance budget; given back when it drops.
struct Token {
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
    gauge: Gauge,
    served: Counter,
    inline: Counter,
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
        });
        let pool = ReadyPool {
            shared,
            filler: filler.clone(),
        };
        pool.request_fill();
        pool
    }

    /// A ready instance, if one is; asks the filler to replace it either
    /// way. `None` means the caller instantiates inline.
    pub(crate) fn take(&self) -> Option<T> {
        let shared = &self.shared;
        let got = shared.items.lock().unwrap_or_else(|e| e.into_inner()).pop();
        self.request_fill();
        match got {
            Some((item, _token)) => {
                shared.served.increment(1);
                Some(item)
            }
            None => {
                shared.inline.increment(1);
                None
            }
        }
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

impl<T: Send + 'static> Refill for Shared<T> {
    fn refill(&self) {
        self.queued.store(false, Ordering::Release);
        // Only the filler thread adds instances, so the count it checks can
        // only fall while it makes the next one.
        while !self.broken.load(Ordering::Relaxed)
            && self.items.lock().unwrap_or_else(|e| e.into_inner()).len() < self.target
        {
            let Some(token) = self.filler.acquire(&self.gauge) else {
                return;
            };
            match (self.make)() {
                Made::Ready(item) => self
                    .items
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((item, token)),
                Made::NoRoom => return,
                Made::Failed(error) => {
                    self.broken.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        rule = %self.rule,
                        %error,
                        "cannot instantiate the rule ahead of time; each event instantiates it inline"
                    );
                    return;
                }
            }
        }
    }
}
