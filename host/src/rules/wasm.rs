//! WebAssembly component rules: the one place that owns wasmtime engine policy
//! (component model, epoch deadlines, pooling allocator or its on-demand
//! fallback, memory limits, wasmtime's compile cache) and the host side of
//! the `sluice:router` world in every version served ([`SERVED`]).
//!
//! Each served version has its own bindings module ([`v0_1`], [`v0_2`]); a
//! component is bound to the version whose `classifier` it exports. The
//! imports (`log`, `config`, the `event` resource) are the same in every
//! version, so their host side is written once ([`host_imports!`]) and
//! implemented for each version's traits.
//!
//! A rule is compiled and linked once per version ([`WasmRule`] holds its
//! `InstancePre`); every event gets a fresh `Store` and instance, so a trap,
//! a leak or state left by one event can never reach the next. This module
//! must never hand a guest anything its manifest did not grant, never reuse a
//! trapped instance, and never let a guest's output grow without bound.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    StoreLimits, StoreLimitsBuilder, Trap,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::decision::{Priority, Route, RuleFailure, Verdict};
use crate::event::ParsedEvent;
use crate::rules::config::{CacheConfig, Limits, PoolConfig, RulesConfig};
use crate::rules::log::{self, CallLog, RuleLog};
use crate::rules::manifest::Grants;
use crate::rules::output::{self, truncate};
use crate::rules::reads::{ReadLog, Reads};
use crate::rules::ready::{Filler, Made, ReadyPool};

/// The generated bindings of `wit/sluice-router@0.1.0` (world `rule`).
#[allow(missing_docs, clippy::all)]
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "wit/sluice-router@0.1.0",
        world: "rule",
        with: { "sluice:router/types.event": super::EventRef },
        // Host functions return `wasmtime::Result` so a bad resource handle
        // traps the guest instead of panicking the host.
        imports: { default: trappable },
    });
}

/// The generated bindings of `wit/sluice-router@0.2.0` (world `rule`): 0.1.0
/// plus a route's `ordering-key` and `payload`. Its `event` resource is the
/// same host type as 0.1.0's.
#[allow(missing_docs, clippy::all)]
pub mod v0_2 {
    wasmtime::component::bindgen!({
        path: "wit/sluice-router@0.2.0",
        world: "rule",
        with: { "sluice:router/types.event": super::EventRef },
        imports: { default: trappable },
    });
}

/// The versions of `sluice:router` this host serves, oldest first.
pub const SERVED: [WitVersion; 2] = [WitVersion::V0_1, WitVersion::V0_2];

/// A version of the `sluice:router` interface a component rule targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WitVersion {
    /// `sluice:router@0.1.0`: routes, ignores, errors.
    V0_1,
    /// `sluice:router@0.2.0`: routes gain `ordering-key` and `payload`.
    V0_2,
}

impl WitVersion {
    /// The version number, `0.1.0` or `0.2.0`.
    pub fn as_str(self) -> &'static str {
        match self {
            WitVersion::V0_1 => "0.1.0",
            WitVersion::V0_2 => "0.2.0",
        }
    }

    /// The export a component of this version has.
    pub fn export(self) -> &'static str {
        match self {
            WitVersion::V0_1 => "sluice:router/classifier@0.1.0",
            WitVersion::V0_2 => "sluice:router/classifier@0.2.0",
        }
    }

    /// The version whose `classifier` a component exports (the newest, if
    /// it exports several), or an error naming what it exports and the
    /// versions served.
    fn of(engine: &Engine, component: &Component) -> anyhow::Result<WitVersion> {
        let exports: Vec<String> = component
            .component_type()
            .exports(engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        if let Some(v) = SERVED
            .into_iter()
            .rev()
            .find(|v| exports.iter().any(|e| e == v.export()))
        {
            return Ok(v);
        }
        let served = SERVED.map(WitVersion::export).join(" or ");
        let found = if exports.is_empty() {
            "nothing".to_owned()
        } else {
            exports.join(", ")
        };
        bail!(
            "exports no interface version this host serves: a rule must export {served} \
             (it exports {found})"
        )
    }
}

impl std::fmt::Display for WitVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A component linked against the bindings of its version.
#[derive(Clone)]
enum Pre {
    V0_1(v0_1::RulePre<RuleState>),
    V0_2(v0_2::RulePre<RuleState>),
}

/// An instance of a component, called through the bindings of its version.
enum Instance {
    V0_1(v0_1::Rule),
    V0_2(v0_2::Rule),
}

impl Pre {
    fn new(
        version: WitVersion,
        pre: wasmtime::component::InstancePre<RuleState>,
    ) -> anyhow::Result<Pre> {
        let context = || format!("the component does not export {}", version.export());
        Ok(match version {
            WitVersion::V0_1 => Pre::V0_1(
                v0_1::RulePre::new(pre)
                    .map_err(anyhow::Error::from)
                    .with_context(context)?,
            ),
            WitVersion::V0_2 => Pre::V0_2(
                v0_2::RulePre::new(pre)
                    .map_err(anyhow::Error::from)
                    .with_context(context)?,
            ),
        })
    }

    fn version(&self) -> WitVersion {
        match self {
            Pre::V0_1(_) => WitVersion::V0_1,
            Pre::V0_2(_) => WitVersion::V0_2,
        }
    }

    fn engine(&self) -> &Engine {
        match self {
            Pre::V0_1(p) => p.instance_pre().engine(),
            Pre::V0_2(p) => p.instance_pre().engine(),
        }
    }

    fn instantiate(&self, store: &mut Store<RuleState>) -> wasmtime::Result<Instance> {
        Ok(match self {
            Pre::V0_1(p) => Instance::V0_1(p.instantiate(store)?),
            Pre::V0_2(p) => Instance::V0_2(p.instantiate(store)?),
        })
    }
}

/// How often the epoch ticker advances the engine's epoch while a call runs.
const TICK: Duration = Duration::from_millis(1);
/// How long the ticker stays awake after the last call ends before it
/// parks. Waking a parked ticker costs the next call a futex wake and, on a
/// busy machine, being preempted by the woken thread: measured at ~60 µs of
/// a reused-instance call 10 ms after the previous one (`sluice bench --gap
/// 10ms`, 2 loaded cores). Under steady traffic (10 events/s or more) the
/// ticker never parks; an idle gateway still has no thread waking once this
/// has passed.
const TICKER_LINGER: Duration = Duration::from_millis(100);
/// How often a lingering ticker (no call in flight) wakes. Ticking every
/// [`TICK`] while lingering cost ~170 µs of CPU per event at 100 events/s
/// (ten wake-ups per event); at this interval it is one. A call that starts
/// while the ticker sleeps gets its first tick up to this much later, so its
/// deadline can stretch by as much, never shrink.
const LINGER_TICK: Duration = Duration::from_millis(10);
/// WebAssembly stack per call; deep recursion traps with a stack overflow.
const MAX_WASM_STACK: usize = 512 << 10;

/// The process's WebAssembly engine and its policy: one per process.
///
/// Holds the settings the engine is built from; the engine itself (with its
/// epoch ticker, linkers and compile cache worker) is built by the first
/// component load, so a process whose rules are all scripts, or that has no
/// rules, reserves no instance pool and runs no engine thread.
pub struct WasmEngine {
    pool: PoolConfig,
    /// Where wasmtime's compile cache lives, and its limits.
    cache: Option<(PathBuf, CacheConfig)>,
    core: OnceLock<Core>,
    /// Held while the engine is built, so two first loads build it once.
    building: Mutex<()>,
    /// Pool slots kept free of ready instances for calls (`rules.workers`).
    calls: AtomicUsize,
}

/// The built engine: what [`WasmEngine`] builds on first use.
struct Core {
    engine: Engine,
    /// Calls in flight; the epoch ticker runs only while there are any.
    epoch: Arc<EpochGate>,
    /// Links only what every rule may import: `sluice:router` log, config, types.
    linker: Linker<RuleState>,
    /// The same plus WASI preview 2 with an empty context, for rules granted `wasi`.
    wasi_linker: Linker<RuleState>,
    /// wasmtime's compile cache (shares its hit and miss counts with the engine).
    cache: Option<wasmtime::Cache>,
    allocator: Allocator,
    /// Makes ready instances and tears used ones down, off the event path.
    filler: Filler,
}

/// Where component instances get their memories and tables from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocator {
    /// The pooling allocator: the whole pool reserved (virtual memory) when
    /// the engine is built, slots reused per event. The fast path.
    Pooling,
    /// Memory mapped per instance, sized to what it uses: the fallback when
    /// the host cannot reserve the pool (`ulimit -v`, a small address space).
    OnDemand,
}

/// Hits and misses of the compile cache since the engine was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Components loaded from the cache.
    pub hits: usize,
    /// Components compiled and written to the cache.
    pub misses: usize,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine")
            .field("cache", &self.cache)
            .field("allocator", &self.allocator())
            .finish_non_exhaustive()
    }
}

impl WasmEngine {
    /// An engine with the default pool ceilings and cache limits; compiled
    /// components are cached under `cache_dir` (created on first use) when
    /// given.
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<WasmEngine> {
        WasmEngine::with_pool(cache_dir, &PoolConfig::default())
    }

    /// An engine with these pool ceilings (`[rules.pool]`), fixed for the
    /// engine's life, and the default cache limits.
    pub fn with_pool(
        cache_dir: Option<PathBuf>,
        ceilings: &PoolConfig,
    ) -> anyhow::Result<WasmEngine> {
        WasmEngine::with_cache(cache_dir, &CacheConfig::default(), ceilings)
    }

    /// An engine with these pool ceilings and compile cache limits
    /// (`[rules.cache]`). Checks the settings now; builds nothing until the
    /// first component loads.
    pub fn with_cache(
        cache_dir: Option<PathBuf>,
        cache: &CacheConfig,
        ceilings: &PoolConfig,
    ) -> anyhow::Result<WasmEngine> {
        ceilings.validate().map_err(anyhow::Error::msg)?;
        cache.validate().map_err(anyhow::Error::msg)?;
        Ok(WasmEngine {
            pool: ceilings.clone(),
            cache: cache_dir.map(|dir| (dir, cache.clone())),
            core: OnceLock::new(),
            building: Mutex::new(()),
            calls: AtomicUsize::new(RulesConfig::default().workers),
        })
    }

    /// The built engine, building it on first use.
    fn core(&self) -> anyhow::Result<&Core> {
        if let Some(core) = self.core.get() {
            return Ok(core);
        }
        let _building = self.building.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(core) = self.core.get() {
            return Ok(core);
        }
        let calls = self.calls.load(Ordering::Relaxed);
        let core = Core::build(&self.pool, self.cache.as_ref(), calls)?;
        Ok(self.core.get_or_init(|| core))
    }

    /// Which allocator the engine uses; `None` while no component has loaded
    /// (no engine is built yet).
    pub fn allocator(&self) -> Option<Allocator> {
        self.core.get().map(|c| c.allocator)
    }

    /// The compile cache's hits and misses so far (zero without a cache or
    /// before the engine is built).
    pub fn cache_stats(&self) -> CacheStats {
        match self.core.get().and_then(|c| c.cache.as_ref()) {
            Some(cache) => CacheStats {
                hits: cache.cache_hits(),
                misses: cache.cache_misses(),
            },
            None => CacheStats::default(),
        }
    }
}

impl Core {
    fn build(
        ceilings: &PoolConfig,
        cache: Option<&(PathBuf, CacheConfig)>,
        calls: usize,
    ) -> anyhow::Result<Core> {
        let instances = ceilings.instances;
        let mut pool = PoolingAllocationConfig::default();
        // Sized per rule instance for the heaviest guest runtimes (CPython's
        // core instances, QuickJS's memories), so every language's rule can
        // have `instances` instances alive at once.
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(ceilings.core_instances_per_rule))
            .total_memories(instances.saturating_mul(ceilings.memories_per_rule))
            .total_tables(instances.saturating_mul(ceilings.tables_per_rule))
            .max_core_instances_per_component(ceilings.core_instances_per_rule)
            .max_memories_per_component(ceilings.memories_per_rule)
            .max_tables_per_component(ceilings.tables_per_rule)
            .table_elements(ceilings.table_elements)
            .max_memory_size(usize::try_from(ceilings.max_memory_mb << 20).unwrap_or(usize::MAX));
        // Resetting a slot after each event is most of a fresh instance's
        // cost (page faults on the next use, `madvise` on release). With
        // Linux's PAGEMAP_SCAN, wasmtime resets only the pages a guest dirtied
        // and keeps them resident; measured on the bench rule: fresh call
        // p50 ~25 µs → ~10 µs. Without it, keeping memory resident means a
        // `memset` of the whole kept region, which measured slower than
        // `madvise`, so nothing is kept.
        if PoolingAllocationConfig::is_pagemap_scan_available() {
            pool.pagemap_scan(wasmtime::Enabled::Yes)
                .linear_memory_keep_resident(4 << 20)
                .table_keep_resident(256 << 10);
        }

        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(MAX_WASM_STACK)
            .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(32))
            .parallel_compilation(true)
            .memory_init_cow(!ceilings.copy_memory_images);
        let cache = cache
            .map(|(dir, limits)| compile_cache(dir, limits))
            .transpose()?;
        config.cache(cache.clone());
        let (engine, allocator) = engine_with_fallback(&mut config, pool)?;
        let epoch = Arc::new(EpochGate::default());
        let slots = usize::try_from(instances).unwrap_or(usize::MAX);
        let filler = Filler::spawn(slots, calls)?;
        let _ = epoch.filler.set(filler.clone());
        spawn_ticker(&engine, epoch.clone())?;

        let mut linker = Linker::new(&engine);
        link_sluice(&mut linker)?;
        let mut wasi_linker = Linker::new(&engine);
        link_sluice(&mut wasi_linker)?;
        wasmtime_wasi::p2::add_to_linker_sync(&mut wasi_linker)
            .map_err(anyhow::Error::from)
            .context("linking WASI")?;
        forbid_blocking(&mut wasi_linker).context("linking WASI")?;

        Ok(Core {
            engine,
            epoch,
            linker,
            wasi_linker,
            cache,
            allocator,
            filler,
        })
    }
}

/// Links the `sluice:router` imports of every served version (their names
/// carry the version, so they live side by side in one linker).
fn link_sluice(linker: &mut Linker<RuleState>) -> anyhow::Result<()> {
    v0_1::Rule::add_to_linker::<_, HasSelf<RuleState>>(linker, |s| s)
        .map_err(anyhow::Error::from)
        .context("linking the sluice:router@0.1.0 imports")?;
    v0_2::Rule::add_to_linker::<_, HasSelf<RuleState>>(linker, |s| s)
        .map_err(anyhow::Error::from)
        .context("linking the sluice:router@0.2.0 imports")?;
    Ok(())
}

/// Builds the engine on the pooling allocator, or on on-demand allocation
/// when the host cannot reserve the pool. The pool reserves its whole slab
/// of virtual memory in `Engine::new` (about 4 GiB per memory slot by
/// default), so building it is the probe: under `ulimit -v` or in a small
/// address space it fails and nothing stays reserved. On demand, each memory
/// maps only what it uses plus a little room to grow, so bounds are checked
/// in code instead of by guard pages: slower, but it starts.
fn engine_with_fallback(
    config: &mut Config,
    pool: PoolingAllocationConfig,
) -> anyhow::Result<(Engine, Allocator)> {
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    match Engine::new(config) {
        Ok(engine) => {
            tracing::info!(allocator = "pooling", "wasm engine built");
            return Ok((engine, Allocator::Pooling));
        }
        Err(e) => tracing::warn!(
            allocator = "on-demand",
            error = %format!("{e:#}"),
            "cannot reserve the wasm instance pool (rules.pool); allocating instances on demand"
        ),
    }
    config
        .allocation_strategy(InstanceAllocationStrategy::OnDemand)
        .memory_reservation(0)
        .memory_guard_size(64 << 10)
        .memory_reservation_for_growth(1 << 20);
    let engine = Engine::new(config)
        .map_err(anyhow::Error::from)
        .context("creating the wasm engine (on-demand allocation)")?;
    tracing::info!(allocator = "on-demand", "wasm engine built");
    Ok((engine, Allocator::OnDemand))
}

/// wasmtime's compile cache in `dir` (created 0700: cache entries are
/// trusted as the binary is), with the `[rules.cache]` limits. A cleanup
/// runs on wasmtime's worker thread, off the load path.
fn compile_cache(dir: &Path, limits: &CacheConfig) -> anyhow::Result<wasmtime::Cache> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| {
            format!(
                "{}: cannot create the compile cache (rules.cache_dir)",
                dir.display()
            )
        })?;
    let dir =
        std::path::absolute(dir).with_context(|| format!("{}: rules.cache_dir", dir.display()))?;
    let mut config = wasmtime::CacheConfig::new();
    config
        .with_directory(dir.clone())
        .with_files_total_size_soft_limit(limits.max_size_mb.saturating_mul(1 << 20))
        .with_cleanup_interval(Duration::from_secs(limits.cleanup_interval_s));
    wasmtime::Cache::new(config)
        .map_err(anyhow::Error::from)
        .with_context(|| {
            format!(
                "{}: cannot use the compile cache (rules.cache_dir)",
                dir.display()
            )
        })
}

/// The message of the trap a rule gets for blocking.
pub const BLOCKING_TRAP: &str = "a rule may not block (wasi:io/poll): it has nothing to wait for";

/// Replaces WASI's blocking calls with traps. The sync WASI bindings block on
/// the host inside `pollable.block` and `poll`, where the epoch deadline is
/// never checked: a granted rule could sleep for as long as it asks and hold a
/// router worker. A rule has no I/O to wait for, so blocking is an error.
fn forbid_blocking(linker: &mut Linker<RuleState>) -> anyhow::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::DynPollable;
    linker.allow_shadowing(true);
    let mut poll = linker
        .instance("wasi:io/poll@0.2.12")
        .map_err(anyhow::Error::from)?;
    poll.func_wrap(
        "[method]pollable.block",
        |_, (_,): (Resource<DynPollable>,)| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(BLOCKING_TRAP))
        },
    )
    .map_err(anyhow::Error::from)?;
    poll.func_wrap(
        "poll",
        |_, (_,): (Vec<Resource<DynPollable>>,)| -> wasmtime::Result<(Vec<u32>,)> {
            Err(wasmtime::Error::msg(BLOCKING_TRAP))
        },
    )
    .map_err(anyhow::Error::from)?;
    linker.allow_shadowing(false);
    Ok(())
}

impl WasmEngine {
    /// The underlying wasmtime engine, built on first use.
    pub fn engine(&self) -> anyhow::Result<&Engine> {
        Ok(&self.core()?.engine)
    }

    /// The pool ceilings the engine was built with.
    pub fn pool(&self) -> &PoolConfig {
        &self.pool
    }

    /// Keeps `workers` pool slots free of ready instances, for the calls the
    /// router workers make (`rules.workers`; 2 unless set): all rules' ready
    /// instances together stay under `rules.pool.instances` less this.
    pub fn reserve_for_calls(&self, workers: usize) {
        self.calls.store(workers, Ordering::Relaxed);
        if let Some(core) = self.core.get() {
            core.filler.reserve(workers);
        }
    }

    /// Ready instances alive now, all rules together (0 before the engine
    /// is built).
    pub fn ready_instances(&self) -> usize {
        self.core.get().map_or(0, |c| c.filler.ready())
    }

    /// Compiles (or loads from the cache), checks and links one component.
    ///
    /// Fails when the component exports no served version of
    /// `sluice:router/classifier` ([`SERVED`]), or imports anything the
    /// manifest did not grant, naming the import. `name` and `config` are what the guest sees as its
    /// identity and `config.get` values.
    pub fn load(
        &self,
        name: &str,
        bytes: &[u8],
        grants: &Grants,
        config: BTreeMap<String, String>,
        limits: &Limits,
    ) -> anyhow::Result<WasmRule> {
        self.pool
            .admits(limits, "limits")
            .map_err(anyhow::Error::msg)?;
        let core = self.core()?;
        // With a cache configured, wasmtime looks the component up by its
        // bytes and the engine's settings before compiling it, and writes
        // what it compiles.
        let component = Component::new(&core.engine, bytes)
            .map_err(anyhow::Error::from)
            .map_err(|e| self.name_pool_ceiling(e))?;
        let version = WitVersion::of(&core.engine, &component)?;
        check_imports(&core.engine, &component, grants)?;
        let linker = if grants.wasi {
            &core.wasi_linker
        } else {
            &core.linker
        };
        let pre = linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)?;
        let pre = Pre::new(version, pre)?;
        let sandbox = Sandbox {
            info: Arc::new(RuleInfo {
                name: name.into(),
                config,
                log: RuleLog::new(name.into()),
            }),
            pre,
            epoch: core.epoch.clone(),
            timeout: Duration::from_millis(limits.timeout_ms),
            memory_bytes: usize::try_from(limits.memory_mb << 20).unwrap_or(usize::MAX),
            table_elements: self.pool.table_elements,
            per_rule: PerRule {
                core_instances: self.pool.core_instances_per_rule,
                memories: self.pool.memories_per_rule,
                tables: self.pool.tables_per_rule,
            },
        };
        let ready = usize::try_from(self.pool.ready_per_rule).unwrap_or(0);
        Ok(WasmRule::new(sandbox, ready, &core.filler))
    }

    /// A component refused by the pool for what one instance of it needs:
    /// wasmtime's message names the component's count and the ceiling; this
    /// adds the config key that sets the ceiling.
    fn name_pool_ceiling(&self, e: anyhow::Error) -> anyhow::Error {
        let text = format!("{e:#}");
        let key = if !text.contains("in the pooling allocator") {
            return e;
        } else if text.contains("core module instances") {
            ("core_instances_per_rule", self.pool.core_instances_per_rule)
        } else if text.contains("linear memories") {
            ("memories_per_rule", self.pool.memories_per_rule)
        } else if text.contains("tables") {
            ("tables_per_rule", self.pool.tables_per_rule)
        } else {
            return e;
        };
        e.context(format!(
            "over the instance pool's ceiling, rules.pool.{} = {}",
            key.0, key.1
        ))
    }
}

/// What one rule instance may hold, from `[rules.pool]`: the store's limits
/// repeat the pool's, so the on-demand allocator enforces them too.
#[derive(Debug, Clone, Copy)]
struct PerRule {
    core_instances: u32,
    memories: u32,
    tables: u32,
}

/// Counts the guest calls in flight, so the epoch ticker runs only while a
/// deadline can matter (and [`TICKER_LINGER`] after): an idle gateway has no
/// thread waking every [`TICK`].
/// A call's deadline is counted in ticks from its start, and ticks come only
/// while some call runs, so every running call still sees them.
#[derive(Debug, Default)]
struct EpochGate {
    state: Mutex<GateState>,
    wake: Condvar,
    /// Epoch increments so far (for tests and diagnostics).
    ticks: AtomicU64,
    /// Passes work that calls left for the ready-instance filler on to it
    /// after each tick, so the event path never wakes it (see
    /// [`Filler::kick`]).
    filler: OnceLock<Filler>,
}

#[derive(Debug, Default)]
struct GateState {
    in_flight: usize,
    /// The ticker waits on the condition variable (only then is it notified:
    /// a call that finds it awake costs no system call).
    parked: bool,
    /// When the last call in flight ended.
    last_exit: Option<Instant>,
}

/// How often a parked ticker checks whether its engine is gone: rules keep
/// engine handles after the `WasmEngine` drops, so the ticker lives as long
/// as any of them, and ends within this once the last one goes.
const PARKED_CHECK: Duration = Duration::from_secs(5);

impl EpochGate {
    /// Marks a call in flight until the guard drops; wakes the ticker if it
    /// is parked.
    fn enter(self: &Arc<Self>) -> InFlight {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.in_flight += 1;
        if state.parked {
            state.parked = false;
            self.wake.notify_one();
        }
        InFlight(self.clone())
    }

    /// Blocks while no call is in flight and none ended within
    /// [`TICKER_LINGER`]; then says how long to sleep after the next tick
    /// ([`TICK`] with a call in flight, [`LINGER_TICK`] while lingering).
    /// `None` once `alive` says the engine is gone.
    fn wait_for_calls(&self, alive: impl Fn() -> bool) -> Option<Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.in_flight == 0 {
            if state.last_exit.is_some_and(|t| t.elapsed() < TICKER_LINGER) {
                return Some(LINGER_TICK);
            }
            // Under the lock: a call leaves its work for the filler before
            // it leaves the gate, so none is stranded while the ticker parks.
            if let Some(filler) = self.filler.get() {
                filler.kick();
            }
            state.parked = true;
            state = self
                .wake
                .wait_timeout(state, PARKED_CHECK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if state.in_flight == 0 && !alive() {
                return None;
            }
        }
        state.parked = false;
        Some(TICK)
    }
}

/// A guest call in flight (see [`EpochGate`]).
struct InFlight(Arc<EpochGate>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.last_exit = Some(Instant::now());
        }
    }
}

impl WasmEngine {
    /// How many times the epoch has advanced since the engine was built. It
    /// advances only while a guest call is in flight.
    pub fn epoch_ticks(&self) -> u64 {
        self.core
            .get()
            .map_or(0, |c| c.epoch.ticks.load(Ordering::Relaxed))
    }
}

/// Advances the epoch every [`TICK`] while a guest call is in flight, and
/// sleeps otherwise. Holds only a weak engine handle, and ends when the
/// engine's last handle (the `WasmEngine`'s or a rule's) goes.
fn spawn_ticker(engine: &Engine, gate: Arc<EpochGate>) -> anyhow::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("sluice-epoch".into())
        .spawn(move || {
            while let Some(next) = gate.wait_for_calls(|| weak.upgrade().is_some()) {
                let Some(engine) = weak.upgrade() else { break };
                engine.increment_epoch();
                gate.ticks.fetch_add(1, Ordering::Relaxed);
                drop(engine);
                std::thread::sleep(next);
                if let Some(filler) = gate.filler.get() {
                    filler.kick();
                }
            }
        })
        .context("starting the epoch ticker")?;
    Ok(())
}

/// Rejects a component that imports anything beyond what `grants` allows,
/// naming every import that is not granted (other than WASI first, since
/// those can never be granted).
fn check_imports(engine: &Engine, component: &Component, grants: &Grants) -> anyhow::Result<()> {
    let ty = component.component_type();
    let mut foreign = Vec::new();
    let mut wasi = Vec::new();
    for (name, _) in ty.imports(engine) {
        if name.starts_with("sluice:router/") {
            continue;
        }
        if name.starts_with("wasi:") {
            if !grants.wasi {
                wasi.push(name.to_owned());
            }
        } else {
            foreign.push(name.to_owned());
        }
    }
    let wasi_part = match wasi.as_slice() {
        [] => None,
        [one] => Some(one.clone()),
        [first, rest @ ..] => Some(format!("{first} (and {} more WASI interfaces)", rest.len())),
    };
    match (foreign.as_slice(), wasi_part) {
        ([], None) => Ok(()),
        ([], Some(w)) => {
            bail!("imports {w}, which is not granted (grant it with `[grants] wasi = true`)")
        }
        ([one], w) => bail!("imports {one}, which is not granted{}", also(w)),
        (many, w) => bail!(
            "imports {}, which are not granted{}",
            many.join(", "),
            also(w)
        ),
    }
}

fn also(wasi: Option<String>) -> String {
    wasi.map(|w| format!("; it also imports {w}, which needs `[grants] wasi = true`"))
        .unwrap_or_default()
}

/// What a guest sees of its rule: its name (for logs) and its config values.
#[derive(Debug)]
struct RuleInfo {
    name: Arc<str>,
    config: BTreeMap<String, String>,
    log: Arc<RuleLog>,
}

/// A compiled, linked component rule, ready to instantiate per event.
///
/// With `rules.pool.ready_per_rule` above 0 it keeps that many instances
/// made ahead of time (see [`crate::rules::ready`]): an event takes one,
/// uses it once, and hands its store back to be torn down off the event path.
pub struct WasmRule {
    sandbox: Arc<Sandbox>,
    ready: Option<ReadyPool<Fresh>>,
    filler: Filler,
}

/// Where a rule's events got their instances (see
/// [`WasmRule::instances_served`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstancesServed {
    /// Made ahead of time by the filler.
    pub ready: u64,
    /// Made on the event path, none being ready.
    pub inline: u64,
}

/// A store and the instance in it, not yet called.
type Fresh = (Store<RuleState>, Instance);

/// What every instance of one rule version is made from.
#[derive(Clone)]
struct Sandbox {
    info: Arc<RuleInfo>,
    pre: Pre,
    epoch: Arc<EpochGate>,
    timeout: Duration,
    memory_bytes: usize,
    table_elements: usize,
    per_rule: PerRule,
}

impl std::fmt::Debug for WasmRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRule")
            .field("name", &self.sandbox.info.name)
            .field("version", &self.sandbox.pre.version())
            .field("timeout", &self.sandbox.timeout)
            .field("ready", &self.ready.as_ref().map(ReadyPool::len))
            .finish()
    }
}

impl WasmRule {
    fn new(sandbox: Sandbox, ready: usize, filler: &Filler) -> WasmRule {
        let sandbox = Arc::new(sandbox);
        let ready = (ready > 0).then(|| {
            let ahead = sandbox.clone();
            ReadyPool::new(sandbox.info.name.clone(), ready, filler, move || {
                ahead.instantiate_ahead()
            })
        });
        WasmRule {
            sandbox,
            ready,
            filler: filler.clone(),
        }
    }

    /// The same compiled rule with its own pool of `ready` instances made
    /// ahead of time (0: every event instantiates inline and drops its
    /// store inline, as without the pool). For comparing the two in one run.
    pub fn with_ready(&self, ready: usize) -> WasmRule {
        let sandbox = (*self.sandbox).clone();
        WasmRule::new(sandbox, ready, &self.filler)
    }

    /// How many events so far took a ready instance, and how many had one
    /// made inline (both 0 without a ready pool).
    pub fn instances_served(&self) -> InstancesServed {
        let (ready, inline) = self.ready.as_ref().map_or((0, 0), ReadyPool::served);
        InstancesServed { ready, inline }
    }

    /// Instances of this rule version ready now (0 without a ready pool).
    pub fn ready_len(&self) -> usize {
        self.ready.as_ref().map_or(0, ReadyPool::len)
    }

    /// Whether this rule version instantiates ahead of time: it has a ready
    /// pool, and instantiating in the background has not failed.
    pub fn has_ready_pool(&self) -> bool {
        self.ready.as_ref().is_some_and(|r| !r.is_broken())
    }

    /// The interface version the component targets.
    pub fn wit_version(&self) -> WitVersion {
        self.sandbox.pre.version()
    }

    /// The wall-clock budget of one call.
    pub fn timeout(&self) -> Duration {
        self.sandbox.timeout
    }

    /// Classifies one event in a fresh store and instance.
    pub fn classify(&self, ev: &Arc<ParsedEvent>) -> Result<Verdict, RuleFailure> {
        self.classify_with_reads(ev).0
    }

    /// Classifies one event in a fresh store and instance, and says which
    /// event fields the rule read (also when it failed). The instance is a
    /// ready one when the rule has one, else made here; either way no other
    /// event ever sees it.
    pub fn classify_with_reads(
        &self,
        ev: &Arc<ParsedEvent>,
    ) -> (Result<Verdict, RuleFailure>, Reads) {
        let sandbox = &*self.sandbox;
        // Instantiation runs guest code too (start functions), under the
        // same deadline.
        let _in_flight = sandbox.epoch.enter();
        let taken = self.ready.as_ref().and_then(ReadyPool::take);
        let (mut store, rule, token) = match taken {
            Some(((mut store, rule), token)) => {
                sandbox.arm(&mut store);
                (store, rule, Some(token))
            }
            None => {
                let mut store = sandbox.new_store();
                match sandbox.pre.instantiate(&mut store) {
                    Ok(rule) => (store, rule, None),
                    Err(e) => return (Err(sandbox.failure(&store, e)), Reads::default()),
                }
            }
        };
        let result = sandbox.call(&mut store, &rule, ev);
        let state = store.data_mut();
        // Dropped log lines are reported now, on the event's thread, not
        // when the store is torn down on the filler's.
        state.log.finish();
        let reads = state.reads.take();
        // With none ready the filler is behind (a burst): an event that made
        // its own instance tears it down here rather than queue more work
        // for the filler, which would only contend with it.
        if let (Some(ready), Some(token)) = (&self.ready, token) {
            ready.give_back((store, rule), token);
        }
        (result, reads)
    }

    /// An instance kept alive across calls. Only for benchmarks: it gives up
    /// the isolation between events that `classify` guarantees.
    pub fn reused_instance(&self) -> Result<ReusedInstance<'_>, RuleFailure> {
        let sandbox = &*self.sandbox;
        let _in_flight = sandbox.epoch.enter();
        let mut store = sandbox.new_store();
        match sandbox.pre.instantiate(&mut store) {
            Ok(instance) => Ok(ReusedInstance {
                rule: sandbox,
                store,
                instance,
                poisoned: false,
            }),
            Err(e) => Err(sandbox.failure(&store, e)),
        }
    }
}

impl Sandbox {
    /// Makes an instance on the filler thread, under the rule's deadline
    /// (the epoch ticks while it runs, as for a call).
    ///
    /// One filler thread makes every rule's instances and tears down their
    /// stores: a rule whose start function takes over half its timeout would
    /// hold it for that long per instance, so such a rule is left to
    /// instantiate inline, on its own events' time.
    fn instantiate_ahead(&self) -> Made<Fresh> {
        let _in_flight = self.epoch.enter();
        let mut store = self.new_store();
        let started = std::time::Instant::now();
        match self.pre.instantiate(&mut store) {
            Ok(_) if started.elapsed() > self.timeout / 2 => Made::Failed(format!(
                "instantiation took {} ms, over half the rule's {} ms timeout",
                started.elapsed().as_millis(),
                self.timeout.as_millis()
            )),
            Ok(rule) => Made::Ready((store, rule)),
            Err(e) if e.is::<wasmtime::PoolConcurrencyLimitError>() => Made::NoRoom,
            Err(e) => Made::Failed(self.failure(&store, e).to_string()),
        }
    }

    /// Readies an instance made ahead of time for the call about to start:
    /// the deadline counts from now, and the per-call state (log budget,
    /// read record, output budget) starts empty, as in a store made now.
    fn arm(&self, store: &mut Store<RuleState>) {
        store.set_epoch_deadline(self.deadline_ticks());
        store.set_hostcall_fuel(hostcall_fuel());
        let state = store.data_mut();
        state.log = self.info.log.call();
        state.reads = ReadLog::default();
    }

    /// A store with this rule's limits and deadline already set.
    fn new_store(&self) -> Store<RuleState> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.memory_bytes)
            .table_elements(self.table_elements)
            .instances(self.per_rule.core_instances as usize)
            .tables(self.per_rule.tables as usize)
            .memories(self.per_rule.memories as usize)
            .trap_on_grow_failure(true)
            .build();
        let state = RuleState {
            table: ResourceTable::new(),
            limits: MemoryGuard {
                inner: limits,
                exceeded: false,
                total: 0,
                cap: self.memory_bytes,
            },
            wasi: None,
            info: self.info.clone(),
            log: self.info.log.call(),
            reads: ReadLog::default(),
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        store.set_hostcall_fuel(hostcall_fuel());
        store.set_epoch_deadline(self.deadline_ticks());
        store.epoch_deadline_trap();
        store
    }

    fn deadline_ticks(&self) -> u64 {
        // +1: the first tick may come at once.
        u64::try_from(self.timeout.as_micros().div_ceil(TICK.as_micros()))
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    fn call(
        &self,
        store: &mut Store<RuleState>,
        rule: &Instance,
        ev: &Arc<ParsedEvent>,
    ) -> Result<Verdict, RuleFailure> {
        store.data_mut().log.finish();
        let handle = store
            .data_mut()
            .table
            .push(EventRef(ev.clone()))
            .map_err(|e| RuleFailure::Trap(format!("cannot hand the event to the rule: {e}")))?;
        let answer = match rule {
            Instance::V0_1(r) => r
                .sluice_router_classifier()
                .call_classify(&mut *store, handle)
                .map(|a| a.map(verdict_v0_1)),
            Instance::V0_2(r) => r
                .sluice_router_classifier()
                .call_classify(&mut *store, handle)
                .map(|a| a.map(|d| verdict_v0_2(&self.info.name, d))),
        };
        match answer {
            Ok(Ok(verdict)) => verdict,
            Ok(Err(message)) => Err(RuleFailure::Guest(
                truncate(&message, output::MAX_ERROR).into_owned(),
            )),
            Err(e) => Err(self.failure(store, e)),
        }
    }

    /// Maps a wasmtime error to what the rule did wrong.
    fn failure(&self, store: &Store<RuleState>, e: wasmtime::Error) -> RuleFailure {
        if e.is::<wasmtime::PoolConcurrencyLimitError>() {
            return RuleFailure::Capacity(e.to_string());
        }
        if is_hostcall_fuel_exhausted(&e) {
            return RuleFailure::Output(format!(
                "the answer or a log call copies more than {} bytes out of the sandbox",
                hostcall_fuel()
            ));
        }
        let trap = e.downcast_ref::<Trap>().copied();
        if trap == Some(Trap::Interrupt) {
            return RuleFailure::Timeout(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ));
        }
        if store.data().limits.exceeded {
            return RuleFailure::Memory(format!(
                "linear memory limit of {} MiB reached",
                self.memory_bytes >> 20
            ));
        }
        let message = match trap {
            Some(Trap::StackOverflow) => "stack overflow (call stack exhausted)".to_owned(),
            Some(t) => t.to_string(),
            None => {
                let root = e.root_cause().to_string();
                let top = e.to_string();
                if root == top {
                    top
                } else {
                    format!("{top}: {root}")
                }
            }
        };
        RuleFailure::Trap(truncate(&message, output::MAX_ERROR).into_owned())
    }
}

/// A component instance reused across events; benchmarks only (see
/// [`WasmRule::reused_instance`]). After a failure it refuses further calls.
pub struct ReusedInstance<'a> {
    rule: &'a Sandbox,
    store: Store<RuleState>,
    instance: Instance,
    poisoned: bool,
}

impl ReusedInstance<'_> {
    /// Classifies one event on the kept instance.
    pub fn classify(&mut self, ev: &Arc<ParsedEvent>) -> Result<Verdict, RuleFailure> {
        if self.poisoned {
            return Err(RuleFailure::Trap(
                "instance failed earlier; not reused".into(),
            ));
        }
        let _in_flight = self.rule.epoch.enter();
        self.store.set_epoch_deadline(self.rule.deadline_ticks());
        let out = self.rule.call(&mut self.store, &self.instance, ev);
        // Each call starts with an empty record, as a fresh instance would.
        drop(self.store.data_mut().reads.take());
        if matches!(
            out,
            Err(RuleFailure::Trap(_)
                | RuleFailure::Timeout(_)
                | RuleFailure::Memory(_)
                | RuleFailure::Output(_))
        ) {
            self.poisoned = true;
        }
        out
    }
}

/// The most bytes one lift may copy out of a sandbox (wasmtime's "hostcall
/// fuel", set per store): the largest answer the output limits allow — every
/// route at its longest agent, workflow, reason, labels, ordering key and
/// payload (interface 0.2.0, the larger answer of the served versions), counted as
/// wasmtime counts (string bytes, and each list element at the size of its
/// host type) — or the largest log call kept, whichever is more. A hostile
/// answer (a list of routes all pointing at one large region of guest memory)
/// then costs the host at most this much before it fails, instead of the
/// 128 MiB wasmtime allows by default; anything over it is past what the host
/// would keep anyway. About 1.7 MB (1 MiB of it payloads).
pub fn hostcall_fuel() -> usize {
    use std::mem::size_of;
    use v0_2::sluice::router::types as wit;
    let labels = output::MAX_LABELS * (size_of::<String>() + output::MAX_LABEL);
    let route = size_of::<wit::Route>()
        + 2 * output::MAX_NAME
        + output::MAX_REASON
        + labels
        + output::MAX_ORDERING_KEY
        + output::MAX_PAYLOAD;
    let answer = size_of::<Result<wit::Decision, String>>() + output::MAX_ROUTES * route;
    let field = size_of::<(String, String)>() + log::MAX_FIELD_KEY + log::MAX_FIELD_VALUE;
    let log = log::MAX_MESSAGE + log::MAX_FIELDS * field;
    answer.max(log)
}

/// Whether wasmtime refused to lift more than [`hostcall_fuel`]. Its error
/// type for this is private, so it is known by its message (pinned by the
/// hostile-answer test in `tests/it/costs.rs`).
fn is_hostcall_fuel_exhausted(e: &wasmtime::Error) -> bool {
    e.chain().any(|c| {
        c.to_string()
            .contains("fuel allocated for hostcalls has been exhausted")
    })
}

/// Converts a 0.1.0 guest's decision to the host's, enforcing the output
/// limits. Its routes carry no ordering key and no payload.
fn verdict_v0_1(decision: v0_1::sluice::router::types::Decision) -> Result<Verdict, RuleFailure> {
    use v0_1::sluice::router::types as wit;
    match decision {
        wit::Decision::Ignore(reason) => Ok(ignore(&reason)),
        wit::Decision::Routes(routes) => {
            let routes = routes
                .into_iter()
                .map(|r| Route {
                    agent: r.agent,
                    workflow: r.workflow,
                    priority: r.priority.into(),
                    reason: r.reason,
                    labels: r.labels,
                    ordering_key: None,
                    payload: None,
                })
                .collect();
            output::bound(routes).map(Verdict::Routes)
        }
    }
}

/// Converts a 0.2.0 guest's decision to the host's, enforcing the output
/// limits: a payload must parse as JSON and stay under
/// [`output::MAX_PAYLOAD`], else the answer is an output failure naming
/// `rule` and the route's agent.
fn verdict_v0_2(
    rule: &str,
    decision: v0_2::sluice::router::types::Decision,
) -> Result<Verdict, RuleFailure> {
    use v0_2::sluice::router::types as wit;
    match decision {
        wit::Decision::Ignore(reason) => Ok(ignore(&reason)),
        wit::Decision::Routes(routes) => {
            // Before parsing any payload: a hostile answer's count is refused
            // without the work.
            output::check_count(routes.len())?;
            let routes = routes
                .into_iter()
                .map(|r| {
                    let payload = r
                        .payload
                        .map(|p| output::parse_payload(rule, &r.agent, &p))
                        .transpose()?;
                    Ok(Route {
                        agent: r.agent,
                        workflow: r.workflow,
                        priority: r.priority.into(),
                        reason: r.reason,
                        labels: r.labels,
                        ordering_key: r.ordering_key,
                        payload,
                    })
                })
                .collect::<Result<Vec<_>, RuleFailure>>()?;
            output::bound(routes).map(Verdict::Routes)
        }
    }
}

fn ignore(reason: &str) -> Verdict {
    Verdict::Ignore(truncate(reason, output::MAX_REASON).into_owned())
}

/// The event handed to a guest: a shared reference to the parsed event.
#[derive(Debug, Clone)]
pub struct EventRef(Arc<ParsedEvent>);

/// Caps the sum of all of a store's linear memories (StoreLimits caps each
/// memory alone, and a component may have several), and records whether a
/// memory limit stopped the guest, so the failure reads `Memory` rather than
/// the trap the guest hit afterwards.
struct MemoryGuard {
    inner: StoreLimits,
    exceeded: bool,
    /// Bytes of all linear memories together.
    total: usize,
    /// The rule's memory limit, for all memories together.
    cap: usize,
}

impl ResourceLimiter for MemoryGuard {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.total.saturating_sub(current).saturating_add(desired);
        if total > self.cap {
            self.exceeded = true;
            return Err(wasmtime::Error::msg(format!(
                "linear memories would total {total} bytes, over the rule's limit of {} bytes",
                self.cap
            )));
        }
        let r = self.inner.memory_growing(current, desired, maximum);
        match r {
            Ok(true) => self.total = total,
            _ => self.exceeded = true,
        }
        r
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.exceeded = true;
        self.inner.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// The data of one store: everything a guest can reach through its imports.
pub struct RuleState {
    table: ResourceTable,
    limits: MemoryGuard,
    /// Built on the first WASI call only, so rules that never touch WASI
    /// never pay for it.
    wasi: Option<WasiCtx>,
    info: Arc<RuleInfo>,
    log: CallLog,
    /// The event fields this call has read.
    reads: ReadLog,
}

/// An empty WASI context: no files, environment, arguments, stdio or network.
fn empty_wasi() -> WasiCtx {
    WasiCtx::builder()
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build()
}

impl WasiView for RuleState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: self.wasi.get_or_insert_with(empty_wasi),
            table: &mut self.table,
        }
    }
}

/// The host side of the imports every version shares (`types` with the
/// `event` resource, `log`, `config`), for version module `$v`. Each
/// version's bindgen makes its own traits and `value`/`level` types, so the
/// one body is implemented once per version; the resource itself is the same
/// host type ([`EventRef`]) in all of them.
macro_rules! host_imports {
    ($v:ident) => {
        const _: () = {
            use $v::sluice::router::{config as wit_config, log as wit_log, types as wit_types};

            impl wit_types::Host for RuleState {}

            impl wit_types::HostEvent for RuleState {
                fn id(&mut self, ev: Resource<EventRef>) -> wasmtime::Result<String> {
                    let id = &self.table.get(&ev)?.0.event.id;
                    self.reads.text("id", Some(id));
                    Ok(id.clone())
                }

                fn source(&mut self, ev: Resource<EventRef>) -> wasmtime::Result<String> {
                    let source = &self.table.get(&ev)?.0.event.source;
                    self.reads.text("source", Some(source));
                    Ok(source.clone())
                }

                fn provider(&mut self, ev: Resource<EventRef>) -> wasmtime::Result<String> {
                    let provider = self.table.get(&ev)?.0.event.provider.as_str();
                    self.reads.text("provider", Some(provider));
                    Ok(provider.to_owned())
                }

                fn kind(&mut self, ev: Resource<EventRef>) -> wasmtime::Result<String> {
                    let kind = &self.table.get(&ev)?.0.event.kind;
                    self.reads.text("kind", Some(kind));
                    Ok(kind.clone())
                }

                fn action(&mut self, ev: Resource<EventRef>) -> wasmtime::Result<Option<String>> {
                    let action = &self.table.get(&ev)?.0.event.action;
                    self.reads.text("action", action.as_deref());
                    Ok(action.clone())
                }

                fn delivery_id(&mut self, ev: Resource<EventRef>) -> wasmtime::Result<String> {
                    let id = &self.table.get(&ev)?.0.event.delivery_id;
                    self.reads.text("delivery_id", Some(id));
                    Ok(id.clone())
                }

                fn received_at(&mut self, ev: Resource<EventRef>) -> wasmtime::Result<u64> {
                    let at = self.table.get(&ev)?.0.event.received_at_ms;
                    self.reads.number("received_at", at);
                    Ok(u64::try_from(at).unwrap_or(0))
                }

                fn header(
                    &mut self,
                    ev: Resource<EventRef>,
                    name: String,
                ) -> wasmtime::Result<Option<String>> {
                    let value = self.table.get(&ev)?.0.event.header(&name);
                    self.reads.header(&name, value.is_some());
                    Ok(value.map(str::to_owned))
                }

                fn headers(
                    &mut self,
                    ev: Resource<EventRef>,
                ) -> wasmtime::Result<Vec<(String, String)>> {
                    let headers = &self.table.get(&ev)?.0.event.headers;
                    self.reads.withheld("headers");
                    Ok(headers.clone())
                }

                fn get(
                    &mut self,
                    ev: Resource<EventRef>,
                    pointer: String,
                ) -> wasmtime::Result<Option<wit_types::Value>> {
                    let found = self.table.get(&ev)?.0.get(&pointer);
                    let value = found.as_deref().map(to_wit_value);
                    self.reads.json(pointer, found.as_deref());
                    Ok(value)
                }

                fn body(&mut self, ev: Resource<EventRef>) -> wasmtime::Result<Vec<u8>> {
                    let body = &self.table.get(&ev)?.0.event.body;
                    self.reads.withheld("body");
                    Ok(body.to_vec())
                }

                fn drop(&mut self, ev: Resource<EventRef>) -> wasmtime::Result<()> {
                    self.table.delete(ev)?;
                    Ok(())
                }
            }

            /// A JSON value as the WIT `value` variant (arrays and objects as compact JSON).
            fn to_wit_value(v: &serde_json::Value) -> wit_types::Value {
                use serde_json::Value as J;
                match v {
                    J::Null => wit_types::Value::Null,
                    J::Bool(b) => wit_types::Value::Boolean(*b),
                    J::Number(n) => match n.as_i64() {
                        Some(i) => wit_types::Value::Integer(i),
                        None => wit_types::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
                    },
                    J::String(s) => wit_types::Value::Text(s.clone()),
                    J::Array(_) | J::Object(_) => wit_types::Value::Composite(v.to_string()),
                }
            }

            impl wit_log::Host for RuleState {
                fn log(
                    &mut self,
                    level: wit_log::Level,
                    message: String,
                    fields: Vec<(String, String)>,
                ) -> wasmtime::Result<()> {
                    let level = match level {
                        wit_log::Level::Trace => tracing::Level::TRACE,
                        wit_log::Level::Debug => tracing::Level::DEBUG,
                        wit_log::Level::Info => tracing::Level::INFO,
                        wit_log::Level::Warn => tracing::Level::WARN,
                        wit_log::Level::Error => tracing::Level::ERROR,
                    };
                    self.log.write(level, &message, &fields);
                    Ok(())
                }
            }

            impl wit_config::Host for RuleState {
                fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
                    Ok(self.info.config.get(&key).cloned())
                }
            }

            impl From<wit_types::Priority> for Priority {
                fn from(p: wit_types::Priority) -> Priority {
                    match p {
                        wit_types::Priority::Critical => Priority::Critical,
                        wit_types::Priority::High => Priority::High,
                        wit_types::Priority::Medium => Priority::Medium,
                        wit_types::Priority::Low => Priority::Low,
                    }
                }
            }
        };
    };
}

host_imports!(v0_1);
host_imports!(v0_2);

/// The rule set is shared across worker threads.
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<WasmRule>();
    is_send_sync::<WasmEngine>();
};
