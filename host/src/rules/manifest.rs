//! A rule's manifest: the small TOML file beside a rule (`rules/<name>.toml`)
//! that names its code, the events it wants, its config values, limits,
//! grants and test vectors.
//!
//! This module parses and validates manifests and nothing else: it never
//! compiles or runs a rule. Every error names the manifest file and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::decision::Priority;
use crate::event::Provider;
use crate::rules::config::{FailurePolicy, LimitOverrides};
use crate::rules::grants::{Names, Scope};

/// A parsed, validated manifest.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The rule's name, as recorded in decisions (`[a-z0-9_-]`, at most 64 bytes).
    pub name: String,
    /// A short human description.
    #[serde(default)]
    pub description: Option<String>,
    /// The language the rule is written in, as `rules ls` and `bench` show
    /// it (`rust`, `c`, `javascript`, `python`). Left out, it is read from a
    /// component's `producers` section, which not every toolchain fills in
    /// (a QuickJS component names the Rust its runtime is written in).
    #[serde(default)]
    pub language: Option<String>,
    /// A WebAssembly component (targeting `sluice:router/rule@0.1.0`),
    /// relative to the manifest.
    #[serde(default)]
    pub component: Option<PathBuf>,
    /// A rhai script, relative to the manifest.
    #[serde(default)]
    pub script: Option<PathBuf>,
    /// Providers the rule wants (`github`, `gitlab`, ...); empty means all.
    #[serde(default)]
    pub providers: Vec<String>,
    /// Event kinds the rule wants (`issues`, `Push Hook`, ...); empty means all.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// The failure policy for this rule, overriding `rules.on_error`.
    #[serde(default)]
    pub on_error: Option<FailurePolicy>,
    /// String values served to the rule's `config.get`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Limits overriding `rules.limits` for this rule.
    #[serde(default)]
    pub limits: LimitOverrides,
    /// What the rule asks to be granted: the sources and kinds it sees, the
    /// agents and workflows it routes to, imports beyond logging and config.
    /// The operator's config must approve all of it (`[rules.grants.<name>]`).
    #[serde(default)]
    pub grants: Grants,
    /// Test vectors: an event file and the routes the rule must return.
    #[serde(default, rename = "test")]
    pub tests: Vec<TestVector>,
}

/// What a manifest asks to be granted. A list left out asks for every name
/// (`"*"`), which the operator must then approve as `"*"`; list what the rule
/// needs instead, so the operator can approve exactly that. WASI is never
/// asked for unless `wasi = true`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Sources (the `{source}` of `/hooks/{source}`) whose events the rule
    /// may see. Left out: every source.
    #[serde(default)]
    pub sources: Option<Names>,
    /// Event kinds the rule may see. Left out: the rule's `kinds`, or every
    /// kind when it names none.
    #[serde(default)]
    pub kinds: Option<Names>,
    /// Agents the rule may route to. Left out: every agent.
    #[serde(default)]
    pub agents: Option<Names>,
    /// Workflows the rule's routes may name. Left out: every workflow.
    #[serde(default)]
    pub workflows: Option<Names>,
    /// WASI preview 2 imports, with an empty context: no files, no environment,
    /// no stdio, no sockets, no name lookup. Rust's `wasm32-wasip2` standard
    /// library imports WASI even when a rule never uses it.
    #[serde(default)]
    pub wasi: bool,
}

/// One test vector: feed `event` to the rule and compare the answer.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TestVector {
    /// The payload file, relative to the manifest.
    pub event: PathBuf,
    /// The provider of the event (defaults to the rule's first provider).
    #[serde(default)]
    pub provider: Option<String>,
    /// The event kind (the `X-GitHub-Event` / `X-Gitlab-Event` value).
    pub kind: String,
    /// The action, when the provider has one; read from the payload otherwise.
    #[serde(default)]
    pub action: Option<String>,
    /// Fields to change in the payload before the rule sees it, by JSON
    /// pointer (`"/pull_request/draft" = true`), so one real payload serves
    /// the vectors of every condition on it. The pointer's parent must exist.
    #[serde(default)]
    pub set: BTreeMap<String, serde_json::Value>,
    /// The routes expected, in any order (agent and priority must match).
    #[serde(default)]
    pub expect: Vec<ExpectedRoute>,
    /// Expect an explicit ignore instead of routes.
    #[serde(default)]
    pub expect_ignore: bool,
}

/// One expected route of a test vector.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedRoute {
    /// The agent.
    pub agent: String,
    /// The priority; any priority matches when absent.
    #[serde(default)]
    pub priority: Option<Priority>,
    /// The workflow; any workflow matches when absent.
    #[serde(default)]
    pub workflow: Option<String>,
    /// Labels the route must carry (it may carry others).
    #[serde(default)]
    pub labels: Vec<String>,
}

impl TestVector {
    /// The payload the rule is given: `body` with the vector's [`set`]
    /// changes applied. An error names the pointer at fault.
    ///
    /// [`set`]: TestVector::set
    pub fn payload(&self, body: Vec<u8>) -> Result<Vec<u8>, String> {
        if self.set.is_empty() {
            return Ok(body);
        }
        let mut doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| format!("`set` needs a JSON payload: {e}"))?;
        for (pointer, value) in &self.set {
            let bad = |m: &str| format!("set {pointer:?}: {m}");
            let (parent, last) = pointer
                .rsplit_once('/')
                .ok_or_else(|| bad("not a JSON pointer (it must start with '/')"))?;
            let key = last.replace("~1", "/").replace("~0", "~");
            match doc.pointer_mut(parent) {
                Some(serde_json::Value::Object(map)) => {
                    map.insert(key, value.clone());
                }
                Some(serde_json::Value::Array(items)) => {
                    let slot = key
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| items.get_mut(i))
                        .ok_or_else(|| bad("no such array element"))?;
                    *slot = value.clone();
                }
                Some(_) => return Err(bad("its parent is not an object or array")),
                None => return Err(bad("the payload has no parent for it")),
            }
        }
        serde_json::to_vec(&doc).map_err(|e| format!("set: {e}"))
    }
}

/// What a manifest points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleSource {
    /// A WebAssembly component file.
    Component(PathBuf),
    /// A rhai script file.
    Script(PathBuf),
}

impl RuleSource {
    /// The code file.
    pub fn path(&self) -> &Path {
        match self {
            RuleSource::Component(p) | RuleSource::Script(p) => p,
        }
    }
}

/// A manifest that could not be read or is invalid: `<file>: <key>: <message>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// The manifest file.
    pub file: PathBuf,
    /// The key path (`limits.timeout_ms`, `test[0].expect[1].priority`), if known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}: {}: {}", self.file.display(), key, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl Manifest {
    /// Reads and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError {
            file: path.to_owned(),
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Manifest::parse(path, &text)
    }

    /// Parses and validates manifest text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Manifest, ManifestError> {
        let err = |key: Option<String>, message: String| ManifestError {
            file: path.to_owned(),
            key,
            message,
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| err(None, crate::config::describe_toml_error(text, &e)))?;
        let manifest: Manifest = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = (key != ".").then_some(key);
            err(key, crate::config::describe_toml_error(text, e.inner()))
        })?;
        manifest
            .validate()
            .map_err(|(key, msg)| err(Some(key), msg))?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, msg: String| Err((key.to_owned(), msg));
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return bad(
                "name",
                format!(
                    "{:?} must be 1-64 characters of a-z, 0-9, '-' or '_'",
                    self.name
                ),
            );
        }
        if let Some(language) = &self.language
            && !is_language_name(language)
        {
            return bad(
                "language",
                format!("{language:?} must be 1-24 characters of a-z, 0-9, '+', '#', '.' or '-'"),
            );
        }
        match (&self.component, &self.script) {
            (Some(_), Some(_)) => {
                return bad(
                    "component",
                    "give either `component` or `script`, not both".into(),
                );
            }
            (None, None) => {
                return bad(
                    "component",
                    "missing: give `component = \"x.wasm\"` or `script = \"x.rhai\"`".into(),
                );
            }
            _ => {}
        }
        for (i, p) in self.providers.iter().enumerate() {
            if Provider::parse(p).is_none() {
                let known: Vec<_> = Provider::ALL.iter().map(|p| p.as_str()).collect();
                return bad(
                    &format!("providers[{i}]"),
                    format!("unknown provider {p:?} (known: {})", known.join(", ")),
                );
            }
        }
        for (list, names) in [
            ("sources", &self.grants.sources),
            ("kinds", &self.grants.kinds),
            ("agents", &self.grants.agents),
            ("workflows", &self.grants.workflows),
        ] {
            if let Some(i) = names.as_ref().and_then(Names::empty_entry) {
                return bad(&format!("grants.{list}[{i}]"), "must not be empty".into());
            }
        }
        for (i, t) in self.tests.iter().enumerate() {
            if let Some(p) = &t.provider
                && Provider::parse(p).is_none()
            {
                return bad(
                    &format!("test[{i}].provider"),
                    format!("unknown provider {p:?}"),
                );
            }
            if t.provider.is_none() && self.providers.is_empty() {
                return bad(
                    &format!("test[{i}].provider"),
                    "missing (the rule names no providers)".into(),
                );
            }
            if let Some(p) = t.set.keys().find(|p| !p.starts_with('/')) {
                return bad(
                    &format!("test[{i}].set"),
                    format!("{p:?} is not a JSON pointer (it must start with '/')"),
                );
            }
            if t.expect_ignore && !t.expect.is_empty() {
                return bad(
                    &format!("test[{i}].expect_ignore"),
                    "cannot be combined with `expect`".into(),
                );
            }
        }
        Ok(())
    }

    /// What the rule asks for, with the defaults of lists left out filled in.
    pub fn scope(&self) -> Scope {
        let g = &self.grants;
        let kinds = match (&g.kinds, self.kinds.is_empty()) {
            (Some(k), _) => k.clone(),
            (None, false) => Names(self.kinds.clone()),
            (None, true) => Names::any(),
        };
        Scope {
            sources: g.sources.clone().unwrap_or_else(Names::any),
            kinds,
            agents: g.agents.clone().unwrap_or_else(Names::any),
            workflows: g.workflows.clone().unwrap_or_else(Names::any),
            wasi: g.wasi,
        }
    }

    /// The rule's code, resolved against the manifest's directory.
    pub fn source(&self, manifest_dir: &Path) -> RuleSource {
        match (&self.component, &self.script) {
            (Some(c), _) => RuleSource::Component(manifest_dir.join(c)),
            (None, Some(s)) => RuleSource::Script(manifest_dir.join(s)),
            (None, None) => unreachable!("validate() requires component or script"),
        }
    }

    /// The language the rule is written in: `rhai` for a script, the
    /// manifest's `language`, else the one a component's `producers`
    /// section names, else `component`.
    pub fn language(&self, manifest_dir: &Path) -> String {
        match (self.source(manifest_dir), &self.language) {
            (RuleSource::Script(_), _) => "rhai".to_owned(),
            (RuleSource::Component(_), Some(language)) => language.clone(),
            (RuleSource::Component(path), None) => std::fs::read(path)
                .ok()
                .and_then(|bytes| component_language(&bytes))
                .unwrap_or_else(|| "component".to_owned()),
        }
    }
}

/// Whether `name` is a plain language name (`rust`, `c99`, `c++`, `c#`).
fn is_language_name(name: &str) -> bool {
    (1..=24).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+#.-".contains(&b))
}

/// The source language a component's toolchain recorded in its `producers`
/// custom sections (the component's own or its modules'), lower-cased:
/// `rust`, `c99`, ... `None` when no section names one.
pub fn component_language(bytes: &[u8]) -> Option<String> {
    use wasmparser::{KnownCustom, Parser, Payload};
    for payload in Parser::new(0).parse_all(bytes) {
        let Ok(Payload::CustomSection(section)) = payload else {
            continue;
        };
        let KnownCustom::Producers(reader) = section.as_known() else {
            continue;
        };
        for field in reader.into_iter().flatten() {
            if field.name != "language" {
                continue;
            }
            // A third party's bytes, printed to an operator's terminal: only
            // a plain name.
            if let Some(Ok(value)) = field.values.into_iter().next() {
                let name = value.name.to_lowercase();
                return is_language_name(&name).then_some(name);
            }
        }
    }
    None
}
