//! Hot reload: one task that watches the rules directory, waits for files to
//! settle, rebuilds what changed off the async workers and swaps the whole
//! rule set at once.
//!
//! A [`Reloader`] owns the rule set `serve` routes with ([`SharedRuleSet`])
//! and a status board ([`RulesStatus`]) that `/status/rules` serves. Each
//! reload reads every manifest with its code file, keeps every rule whose
//! version (content hash) is unchanged as it is, compiles and tests only the
//! changed ones, and stores one new set. A rule that fails to read, compile
//! or pass its vectors keeps its previous version serving; the failure goes
//! to the log, the metrics and the status board. It never touches the store,
//! the network or an event: the router loads the set per event, so an event
//! in flight finishes on the set it started with.
//!
//! [`watch`] decides *when* to reload: a file renamed into place (how
//! editors replace files) is taken at once; a file written in place, or
//! removed (often the first step of a replacement), only once it has stayed
//! unchanged for the debounce window, so a half-written file is never read; a periodic rescan catches
//! changes no event reported (bind mounts, network file systems); `SIGHUP`
//! (through [`Reloader::force`]) reloads at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use notify::{EventKind, RecursiveMode, Watcher};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use crate::event::now_ms;
use crate::rules::config::RulesConfig;
use crate::rules::{
    LoadError, Rule, RuleSet, SharedRuleSet, WasmEngine, check_lease, manifest_paths,
    parse_manifest,
};

/// Whether a rule file is serving, failed, or waiting for its files to settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadState {
    /// Its current files are serving.
    Loaded,
    /// Its current files failed to load; `version` (if any) is still serving.
    Failed,
    /// One of its files is still being written; `version` (if any) is serving.
    Pending,
}

/// What the status board says about one manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStatus {
    /// The rule's name (the manifest's file stem while the manifest cannot be read).
    pub rule: String,
    /// The manifest file.
    pub manifest: PathBuf,
    /// The version serving, if any.
    pub version: Option<String>,
    /// When that version started serving (ms since the Unix epoch).
    pub serving_since_ms: Option<i64>,
    /// Whether the manifest's current files are what serves.
    pub state: LoadState,
    /// Why the current files did not load.
    pub error: Option<String>,
    /// The version that failed, when the files could be read.
    pub failed_version: Option<String>,
}

/// The status board: one entry per manifest, in rule order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesStatus {
    /// Every manifest, in the order its rules run.
    pub rules: Vec<RuleStatus>,
    /// Reloads run since start (the first load counts).
    pub reloads: u64,
    /// When the last reload finished (ms since the Unix epoch).
    pub last_reload_ms: Option<i64>,
    /// When the set serving now was swapped in (ms since the Unix epoch).
    pub swapped_at_ms: Option<i64>,
}

/// The status board as served, swapped whole after each reload.
pub type SharedStatus = Arc<ArcSwap<RulesStatus>>;

/// What one reload did, by rule name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Rules whose new version now serves (new rules included).
    pub loaded: Vec<String>,
    /// Rules whose files failed to load (their previous version, if any, serves).
    pub failed: Vec<String>,
    /// Rules removed with their manifest.
    pub removed: Vec<String>,
    /// Whether a new rule set was swapped in.
    pub swapped: bool,
}

/// The last thing read from one manifest.
struct Slot {
    name: String,
    /// The rule serving from this manifest, and since when.
    serving: Option<(Arc<Rule>, i64)>,
    /// Why its current files did not load, and which version they were.
    failed: Option<(Option<String>, String)>,
    pending: bool,
}

/// Loads the rules directory tolerantly and keeps it loaded: the one place
/// that builds the rule set `serve` routes with.
pub struct Reloader {
    config: RulesConfig,
    base_dir: PathBuf,
    dir: PathBuf,
    engine: Arc<WasmEngine>,
    rules: SharedRuleSet,
    status: SharedStatus,
    slots: Mutex<BTreeMap<PathBuf, Slot>>,
    force: Notify,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// A reloader over `config`'s rules directory (relative to `base_dir`)
    /// serving an empty set until the first [`Reloader::reload`]. Only the
    /// `[rules]` settings themselves can fail here; a bad rule never does.
    pub fn new(
        config: &RulesConfig,
        base_dir: &Path,
        engine: Arc<WasmEngine>,
    ) -> Result<Reloader, LoadError> {
        config
            .validate()
            .map_err(|m| LoadError::new(base_dir, None, m))?;
        Ok(Reloader {
            dir: config.rules_dir(base_dir),
            config: config.clone(),
            base_dir: base_dir.to_owned(),
            engine,
            rules: Arc::new(ArcSwap::from_pointee(RuleSet::new(
                Vec::new(),
                config.merge,
                config.on_error.clone(),
                &config.breaker,
            ))),
            status: SharedStatus::default(),
            slots: Mutex::new(BTreeMap::new()),
            force: Notify::new(),
        })
    }

    /// Publishes the status board into `status` (the one `/status/rules`
    /// serves) instead of a board of its own.
    pub fn publish_to(mut self, status: SharedStatus) -> Reloader {
        self.status = status;
        self
    }

    /// The rule set it keeps current.
    pub fn rules(&self) -> &SharedRuleSet {
        &self.rules
    }

    /// The status board it keeps current.
    pub fn status(&self) -> &SharedStatus {
        &self.status
    }

    /// The rules directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Asks [`watch`] to reload now (what `SIGHUP` does).
    pub fn force(&self) {
        self.force.notify_one();
    }

    /// Reads every manifest now and swaps in the result. Blocking (it may
    /// compile): call it from `spawn_blocking` on a runtime.
    pub fn reload(&self) -> ReloadReport {
        self.reload_settled(&HashSet::new())
    }

    /// As [`Reloader::reload`], except that a rule one of whose files is in
    /// `unsettled` (still being written) keeps what it serves and is read later.
    pub fn reload_settled(&self, unsettled: &HashSet<PathBuf>) -> ReloadReport {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut report = ReloadReport::default();
        let listed = match manifest_paths(
            &RulesConfig {
                load: None,
                ..self.config.clone()
            },
            &self.dir,
        ) {
            Ok(found) => match &self.config.load {
                // Listed names are read whether or not they exist, so a
                // missing one is reported against its rule.
                Some(names) => names
                    .iter()
                    .map(|n| self.dir.join(format!("{n}.toml")))
                    .collect(),
                None => found,
            },
            Err(e) if slots.is_empty() => {
                // Nothing serves yet: an absent directory is simply empty.
                tracing::warn!(error = %e, "no rules loaded");
                Vec::new()
            }
            Err(e) => {
                // A directory that vanished for a moment (a checkout) must not
                // drop every rule: keep serving and look again later.
                tracing::error!(error = %e, "rules directory unreadable; rules unchanged");
                return report;
            }
        };
        let now = now_ms();
        let mut next = BTreeMap::new();
        // What each newly loaded rule replaced, to put back if the set is refused.
        let mut replaced = BTreeMap::new();
        for path in &listed {
            let prev = slots.remove(path);
            let slot = self.refresh(path, prev, unsettled, now, &mut replaced, &mut report);
            next.insert(path.clone(), slot);
        }
        for slot in std::mem::take(&mut *slots).into_values() {
            if let Some((rule, _)) = slot.serving {
                tracing::info!(rule = %rule.name(), version = %rule.version(), "rule removed with its manifest");
                metrics::counter!("sluice_rule_reloads_total", "outcome" => "removed").increment(1);
                metrics::gauge!("sluice_rule_version_info", "rule" => rule.name().to_owned(), "version" => rule.version().to_owned()).set(0.0);
                metrics::gauge!("sluice_rule_load_failed", "rule" => rule.name().to_owned())
                    .set(0.0);
                report.removed.push(rule.name().to_owned());
            }
        }
        self.refuse_duplicates(&listed, &mut next, &mut replaced, &mut report);
        self.refuse_over_lease(&listed, &mut next, &mut replaced, &mut report);
        for (path, old) in &replaced {
            let Some((rule, _)) = next.get(path).and_then(|s| s.serving.as_ref()) else {
                continue;
            };
            tracing::info!(rule = %rule.name(), version = %rule.version(), from = %path.display(), "rule version loaded");
            metrics::counter!("sluice_rule_reloads_total", "outcome" => "loaded").increment(1);
            if let Some((old, _)) = old {
                metrics::gauge!("sluice_rule_version_info", "rule" => old.name().to_owned(), "version" => old.version().to_owned()).set(0.0);
            }
            metrics::gauge!("sluice_rule_version_info", "rule" => rule.name().to_owned(), "version" => rule.version().to_owned()).set(1.0);
            report.loaded.push(rule.name().to_owned());
        }
        let rules: Vec<Arc<Rule>> = listed
            .iter()
            .filter_map(|p| next.get(p)?.serving.as_ref().map(|(r, _)| r.clone()))
            .collect();
        let current = self.rules.load();
        let unchanged = current.shared_rules().len() == rules.len()
            && current
                .shared_rules()
                .zip(&rules)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !unchanged {
            let set = RuleSet::carry_over(
                rules,
                self.config.merge,
                self.config.on_error.clone(),
                &self.config.breaker,
                Some(&current),
            );
            self.rules.store(Arc::new(set));
            report.swapped = true;
        }
        // A version serves from the moment its set is stored, not from when
        // its reload began (compiling takes a while).
        let swapped_at = now_ms();
        for path in replaced.keys() {
            if let Some((_, since)) = next.get_mut(path).and_then(|s| s.serving.as_mut()) {
                *since = swapped_at;
            }
        }
        let previous = self.status.load();
        self.status.store(Arc::new(RulesStatus {
            rules: listed
                .iter()
                .filter_map(|p| next.get(p).map(|s| status_of(p, s)))
                .collect(),
            reloads: previous.reloads + 1,
            last_reload_ms: Some(now_ms()),
            swapped_at_ms: if report.swapped {
                Some(swapped_at)
            } else {
                previous.swapped_at_ms
            },
        }));
        *slots = next;
        report
    }

    /// Reads one manifest and its code; loads it if its version changed.
    fn refresh(
        &self,
        path: &Path,
        prev: Option<Slot>,
        unsettled: &HashSet<PathBuf>,
        now: i64,
        replaced: &mut BTreeMap<PathBuf, Option<(Arc<Rule>, i64)>>,
        report: &mut ReloadReport,
    ) -> Slot {
        let mut slot = prev.unwrap_or_else(|| Slot {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            serving: None,
            failed: None,
            pending: false,
        });
        slot.pending = unsettled.contains(path);
        if slot.pending {
            return slot;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                // A manifest named by `rules.load` that is gone: its rule goes
                // with it, as an unlisted manifest's does.
                if e.kind() == std::io::ErrorKind::NotFound && slot.serving.is_some() {
                    let gone = slot.serving.take();
                    if let Some((rule, _)) = &gone {
                        tracing::info!(rule = %rule.name(), version = %rule.version(), "rule removed with its manifest");
                        metrics::counter!("sluice_rule_reloads_total", "outcome" => "removed")
                            .increment(1);
                        report.removed.push(rule.name().to_owned());
                    }
                    replaced.insert(path.to_owned(), gone);
                }
                let e = LoadError::new(path, None, format!("cannot read: {e}"));
                fail(&mut slot, None, e, report);
                return slot;
            }
        };
        let manifest = match parse_manifest(path, &text) {
            Ok(m) => m,
            Err(e) => {
                fail(&mut slot, None, e, report);
                return slot;
            }
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let code_path = manifest.source(dir).path().to_owned();
        if unsettled.contains(&code_path) {
            slot.pending = true;
            return slot;
        }
        let bytes = match std::fs::read(&code_path) {
            Ok(b) => b,
            Err(e) => {
                let e = LoadError::new(
                    &code_path,
                    Some(&manifest.name),
                    format!("cannot read: {e}"),
                );
                fail(&mut slot, None, e, report);
                return slot;
            }
        };
        let version = Rule::version_for(&manifest, &text, &bytes, &self.config);
        if slot
            .serving
            .as_ref()
            .is_some_and(|(r, _)| r.version() == version)
        {
            slot.failed = None;
            return slot;
        }
        // A rule that failed is built again on every pass, even with the same
        // files: what failed it may lie elsewhere (a vector's payload, another
        // manifest's name, another rule's timeout). `fail` reports a repeated
        // failure only once.
        let started = Instant::now();
        // The operator's approval first: an unapproved rule's code never runs.
        let grants = &self.config.grants;
        let built = super::grants::approve(&manifest, path, grants)
            .and_then(|()| {
                Rule::from_code(&manifest, path, &text, bytes, &self.config, &self.engine)
            })
            .and_then(|rule| {
                super::grants::check_pin(rule.name(), rule.version(), path, grants).map(|()| rule)
            })
            .and_then(|rule| rule.check_tests(&manifest.tests, path).map(|()| rule));
        match built {
            Ok(rule) => {
                // A JavaScript or Python component's first compile takes
                // seconds; from the compile cache, milliseconds: both reported.
                let took = started.elapsed();
                tracing::info!(rule = %rule.name(), version = %rule.version(), took_ms = took.as_millis() as u64, "rule built and tested");
                metrics::gauge!("sluice_rule_build_seconds", "rule" => rule.name().to_owned())
                    .set(took.as_secs_f64());
                slot.name = rule.name().to_owned();
                replaced.insert(path.to_owned(), slot.serving.replace((Arc::new(rule), now)));
                slot.failed = None;
            }
            Err(e) => fail(&mut slot, Some(version), e, report),
        }
        slot
    }

    /// Two manifests naming one rule: the later one (in rule order) is refused.
    fn refuse_duplicates(
        &self,
        listed: &[PathBuf],
        next: &mut BTreeMap<PathBuf, Slot>,
        replaced: &mut BTreeMap<PathBuf, Option<(Arc<Rule>, i64)>>,
        report: &mut ReloadReport,
    ) {
        let mut seen: HashMap<String, PathBuf> = HashMap::new();
        for path in listed {
            let Some(slot) = next.get_mut(path) else {
                continue;
            };
            let Some((rule, _)) = &slot.serving else {
                continue;
            };
            let name = rule.name().to_owned();
            if let Some(other) = seen.get(&name) {
                let e = LoadError::new(
                    path,
                    Some(&name),
                    format!("name: also used by {}", other.display()),
                );
                let version = Some(rule.version().to_owned());
                slot.serving = replaced.remove(path).flatten();
                fail(slot, version, e, report);
            } else {
                seen.insert(name, path.clone());
            }
        }
    }

    /// A set whose worst case outlives the routing lease is refused as a
    /// whole: every rule loaded by this reload goes back to what it replaced.
    fn refuse_over_lease(
        &self,
        listed: &[PathBuf],
        next: &mut BTreeMap<PathBuf, Slot>,
        replaced: &mut BTreeMap<PathBuf, Option<(Arc<Rule>, i64)>>,
        report: &mut ReloadReport,
    ) {
        let serving: Vec<(Arc<Rule>, PathBuf)> = listed
            .iter()
            .filter_map(|p| Some((next.get(p)?.serving.as_ref()?.0.clone(), p.clone())))
            .collect();
        let Err(e) = check_lease(
            &self.config,
            &self.base_dir,
            serving.iter().map(|(r, p)| (&**r, p.as_path())),
        ) else {
            return;
        };
        for (path, old) in std::mem::take(replaced) {
            if let Some(slot) = next.get_mut(&path) {
                let version = slot.serving.as_ref().map(|(r, _)| r.version().to_owned());
                slot.serving = old;
                fail(slot, version, e.clone(), report);
            }
        }
    }
}

/// Records a load failure against a slot (once per distinct failure).
fn fail(slot: &mut Slot, version: Option<String>, e: LoadError, report: &mut ReloadReport) {
    if let Some(name) = &e.rule {
        slot.name.clone_from(name);
    }
    let message = e.to_string();
    let again = slot
        .failed
        .as_ref()
        .is_some_and(|(v, m)| *v == version && *m == message);
    if !again {
        match &slot.serving {
            Some((rule, _)) => {
                tracing::error!(rule = %slot.name, error = %message, serving = %rule.version(), "rule failed to load; its previous version keeps serving")
            }
            None => {
                tracing::error!(rule = %slot.name, error = %message, "rule failed to load; it is not serving")
            }
        }
        metrics::counter!("sluice_rule_reloads_total", "outcome" => "failed").increment(1);
        report.failed.push(slot.name.clone());
    }
    metrics::gauge!("sluice_rule_load_failed", "rule" => slot.name.clone()).set(1.0);
    slot.failed = Some((version, message));
}

fn status_of(path: &Path, slot: &Slot) -> RuleStatus {
    if slot.failed.is_none() {
        metrics::gauge!("sluice_rule_load_failed", "rule" => slot.name.clone()).set(0.0);
    }
    RuleStatus {
        rule: slot.name.clone(),
        manifest: path.to_owned(),
        version: slot.serving.as_ref().map(|(r, _)| r.version().to_owned()),
        serving_since_ms: slot.serving.as_ref().map(|(_, t)| *t),
        state: if slot.pending {
            LoadState::Pending
        } else if slot.failed.is_some() {
            LoadState::Failed
        } else {
            LoadState::Loaded
        },
        error: slot.failed.as_ref().map(|(_, m)| m.clone()),
        failed_version: slot.failed.as_ref().and_then(|(v, _)| v.clone()),
    }
}

/// What identifies one state of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode,
    })
}

/// Every file under `dir` (a few levels down: test vectors sit in a
/// sub-directory) with its stamp.
fn scan(dir: &Path) -> BTreeMap<PathBuf, Stamp> {
    fn walk(dir: &Path, depth: u32, out: &mut BTreeMap<PathBuf, Stamp>) {
        let Ok(read) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in read.flatten() {
            if is_not_rule_input(&entry.file_name()) {
                continue;
            }
            let path = entry.path();
            if path.is_dir() {
                if depth < 4 {
                    walk(&path, depth + 1, out);
                }
            } else if let Some(s) = stamp(&path) {
                out.insert(path, s);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, 0, &mut out);
    out
}

/// Names under the rules directory that no rule is read from: build output
/// (`target/` of a Rust rule built in place, `node_modules/`,
/// `__pycache__/`) and hidden files and folders (a build's `.x.wasm.tmp`,
/// an editor's swap file). A build writing thousands of files there is no
/// reason to reload, nor to stat them on every poll.
fn is_not_rule_input(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    name.starts_with(b".") || [&b"target"[..], b"node_modules", b"__pycache__"].contains(&name)
}

/// Whether `path` lies under `dir` in a place [`is_not_rule_input`] skips.
fn outside_rule_inputs(dir: &Path, path: &Path) -> bool {
    path.strip_prefix(dir)
        .is_ok_and(|rel| rel.iter().any(is_not_rule_input))
}

/// How a file-system event bears on when to reload.
enum Change {
    /// Written in place: read once it has been still for the debounce window.
    Written,
    /// Renamed into place: complete as it is, read at once.
    Settled,
    /// Nothing that changes content (reads, closes).
    None,
}

fn classify(kind: &EventKind) -> Change {
    use notify::event::{CreateKind, ModifyKind};
    match kind {
        EventKind::Modify(ModifyKind::Name(_)) | EventKind::Create(CreateKind::Folder) => {
            Change::Settled
        }
        // A removal is often the first step of a replacement (unlink, create,
        // write: how `git` checks a file out), so it waits out the debounce
        // window like a write instead of reloading half-way through.
        EventKind::Remove(_)
        | EventKind::Create(_)
        | EventKind::Modify(_)
        | EventKind::Any
        | EventKind::Other => Change::Written,
        EventKind::Access(_) => Change::None,
    }
}

/// The rules directory under watch: file events buffered since
/// [`Watch::start`] and the directory as it was then. Start it *before* the
/// first [`Reloader::reload`], so nothing that lands in between goes unseen.
pub struct Watch {
    reloader: Arc<Reloader>,
    events: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    watcher: Option<notify::RecommendedWatcher>,
    baseline: BTreeMap<PathBuf, Stamp>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("dir", &self.reloader.dir)
            .field("watching", &self.watcher.is_some())
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// Starts watching `reloader`'s directory (unless `rules.reload.watch`
    /// is false) and takes the baseline the rescans compare against.
    pub fn start(reloader: Arc<Reloader>) -> Watch {
        let dir = reloader.dir.clone();
        let (tx, events) = mpsc::unbounded_channel();
        let watcher = if reloader.config.reload.watch {
            let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let _ = tx.send(res);
            })
            .and_then(|mut w| w.watch(&dir, RecursiveMode::Recursive).map(|()| w));
            match watcher {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the rules directory; polling it instead");
                    None
                }
            }
        } else {
            None
        };
        Watch {
            baseline: scan(&reloader.dir),
            reloader,
            events,
            watcher,
        }
    }

    /// Runs until the task is dropped: reloads whenever the rules directory
    /// changes (see the module header) or [`Reloader::force`] is called.
    /// With `rules.reload.watch = false`, only `force` reloads.
    pub async fn run(self) {
        let Watch {
            reloader,
            mut events,
            watcher: _watcher,
            baseline,
        } = self;
        run(reloader, &mut events, baseline).await;
    }
}

/// Starts a [`Watch`] and runs it (for a reloader already loaded: a change
/// made before this call may go unseen until the next one).
pub async fn watch(reloader: Arc<Reloader>) {
    Watch::start(reloader).run().await;
}

async fn run(
    reloader: Arc<Reloader>,
    events: &mut mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    mut last_scan: BTreeMap<PathBuf, Stamp>,
) {
    let settings = reloader.config.reload.clone();
    let debounce = Duration::from_millis(settings.debounce_ms);
    let poll = Duration::from_millis(settings.poll_ms);
    let dir = reloader.dir.clone();
    // Paths written in place, with their last change and the stamp they had.
    let mut dirty: HashMap<PathBuf, (Instant, Option<Stamp>)> = HashMap::new();
    let mut urgent = false;
    let mut forced = false;
    let mut next_poll = Instant::now() + poll;
    loop {
        let wake = if urgent || forced {
            Instant::now()
        } else {
            let settle = dirty.values().map(|(t, _)| *t + debounce).min();
            let poll_at = settings.watch.then_some(next_poll);
            match (settle, poll_at) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => Instant::now() + Duration::from_secs(3600),
            }
        };
        tokio::select! {
            Some(ev) = events.recv() => {
                let mut next = Some(ev);
                while let Some(ev) = next {
                    note(&dir, ev, &mut dirty, &mut urgent);
                    next = events.try_recv().ok();
                }
            }
            () = reloader.force.notified() => forced = true,
            () = tokio::time::sleep_until(wake.into()) => {}
        }
        let now = Instant::now();
        if settings.watch && now >= next_poll {
            let current = scan(&dir);
            for (path, s) in &current {
                if last_scan.get(path) != Some(s) {
                    dirty.entry(path.clone()).or_insert((now, Some(*s)));
                }
            }
            for gone in last_scan.keys().filter(|p| !current.contains_key(*p)) {
                dirty.entry(gone.clone()).or_insert((now, None));
            }
            last_scan = current;
            next_poll = now + poll;
        }
        let mut unsettled = HashSet::new();
        let mut settled_any = false;
        for (path, (since, seen)) in dirty.iter_mut() {
            let s = stamp(path);
            if s != *seen {
                // Still changing (or changed with no event): wait again.
                *since = now;
                *seen = s;
            }
            if now.duration_since(*since) >= debounce {
                settled_any = true;
            } else {
                unsettled.insert(path.clone());
            }
        }
        let ready = settled_any && unsettled.is_empty();
        if !(forced || urgent || ready) {
            continue;
        }
        dirty.retain(|p, _| unsettled.contains(p));
        forced = false;
        urgent = false;
        // The baseline for the next rescan is taken before reading, so a
        // change made while the reload runs is seen by the next one.
        last_scan = scan(&dir);
        let r = reloader.clone();
        let started = Instant::now();
        match tokio::task::spawn_blocking(move || r.reload_settled(&unsettled)).await {
            Ok(report) if report.swapped || !report.failed.is_empty() => {
                tracing::info!(loaded = ?report.loaded, failed = ?report.failed, removed = ?report.removed, took = ?started.elapsed(), "rules reloaded");
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "rule reload panicked; rules unchanged"),
        }
    }
}

/// Folds one file-system event into the debounce state.
fn note(
    dir: &Path,
    ev: notify::Result<notify::Event>,
    dirty: &mut HashMap<PathBuf, (Instant, Option<Stamp>)>,
    urgent: &mut bool,
) {
    let mut ev = match ev {
        Ok(ev) => ev,
        Err(e) => {
            // Lost events (a queue overflow): read everything again.
            tracing::warn!(error = %e, "rules directory watch error; reloading");
            *urgent = true;
            return;
        }
    };
    // An event about build output alone is no change; one naming no path
    // at all (a rescan request) still counts.
    let named = !ev.paths.is_empty();
    ev.paths.retain(|p| !outside_rule_inputs(dir, p));
    if named && ev.paths.is_empty() {
        return;
    }
    match classify(&ev.kind) {
        Change::Settled => {
            for p in &ev.paths {
                dirty.remove(p);
            }
            *urgent = true;
        }
        Change::Written => {
            let now = Instant::now();
            for p in ev.paths {
                let s = stamp(&p);
                dirty.insert(p, (now, s));
            }
        }
        Change::None => {}
    }
}
