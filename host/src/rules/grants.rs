//! Grants: what a rule may see and where it may route, as its manifest asks
//! (`[grants]`) and the operator's config approves (`[rules.grants.<rule>]`).
//!
//! A rule's [`Scope`] is what its manifest asks for; the rule loads only when
//! the config's [`Approval`] covers all of it (and, when the approval pins a
//! version, only that version). The host then holds the rule to its scope:
//! it is never called for an event from a source or of a kind outside it,
//! and a route to an agent or workflow outside it is dropped and recorded as
//! a [`RuleFailure::Violation`]. This module only decides; it never runs a
//! rule, and it never widens a scope past what the manifest asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::decision::{Route, RuleFailure};
use crate::event::Event;
use crate::rules::LoadError;
use crate::rules::config::FailurePolicy;
use crate::rules::manifest::Manifest;

/// The name that stands for every name in a grant list.
pub const ANY: &str = "*";

/// A list of names in a grant (sources, kinds, agents or workflows); `"*"`
/// stands for every name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Names(pub Vec<String>);

impl Names {
    /// The list that allows every name.
    pub fn any() -> Names {
        Names(vec![ANY.to_owned()])
    }

    /// Whether the list allows `name`.
    pub fn allows(&self, name: &str) -> bool {
        self.0.iter().any(|n| n == ANY || n == name)
    }

    /// The names of `asked` this list does not cover (a `"*"` asked for is
    /// covered only by a `"*"`).
    pub fn missing(&self, asked: &Names) -> Vec<String> {
        if self.0.iter().any(|n| n == ANY) {
            return Vec::new();
        }
        asked
            .0
            .iter()
            .filter(|n| !self.0.contains(n))
            .cloned()
            .collect()
    }

    /// The first empty name, if any (an empty name is always a mistake).
    pub fn empty_entry(&self) -> Option<usize> {
        self.0.iter().position(|n| n.trim().is_empty())
    }
}

/// What a rule may see and do: its manifest's `[grants]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scope {
    /// Sources (the `{source}` of `/hooks/{source}`) whose events it sees.
    pub sources: Names,
    /// Event kinds it sees.
    pub kinds: Names,
    /// Agents it may route to.
    pub agents: Names,
    /// Workflows its routes may name.
    pub workflows: Names,
    /// WASI preview 2 imports (with the host's empty context).
    pub wasi: bool,
}

impl Scope {
    /// Everything: the scope of sluice's own native rules.
    pub fn all() -> Scope {
        Scope {
            sources: Names::any(),
            kinds: Names::any(),
            agents: Names::any(),
            workflows: Names::any(),
            wasi: true,
        }
    }

    /// Whether the rule may be called for this event.
    pub fn sees(&self, ev: &Event) -> bool {
        self.sources.allows(&ev.source) && self.kinds.allows(&ev.kind)
    }

    /// Splits a rule's routes into those inside the scope, which count, and
    /// a violation naming the ones outside it, which are dropped.
    pub fn split(&self, routes: Vec<Route>) -> (Vec<Route>, Option<RuleFailure>) {
        let mut dropped = Vec::new();
        let kept = routes
            .into_iter()
            .filter(|r| {
                let why = if !self.agents.allows(&r.agent) {
                    format!("agent {:?} (not in grants.agents)", r.agent)
                } else if let Some(w) = r.workflow.as_deref().filter(|w| !self.workflows.allows(w))
                {
                    format!(
                        "agent {:?} with workflow {w:?} (not in grants.workflows)",
                        r.agent
                    )
                } else {
                    return true;
                };
                dropped.push(why);
                false
            })
            .collect();
        let violation = (!dropped.is_empty()).then(|| {
            RuleFailure::Violation(format!(
                "dropped {} route{} outside the rule's grant: {}",
                dropped.len(),
                if dropped.len() == 1 { "" } else { "s" },
                dropped.join(", ")
            ))
        });
        (kept, violation)
    }
}

/// The operator's approval of one rule's grants, as written in the config
/// under `[rules.grants.<rule name>]`. A list left out approves nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Approval {
    /// Sources the rule may see (`"*"`: every source).
    pub sources: Names,
    /// Event kinds the rule may see (`"*"`: every kind).
    pub kinds: Names,
    /// Agents the rule may route to (`"*"`: every agent).
    pub agents: Names,
    /// Workflows the rule's routes may name (`"*"`: every workflow).
    pub workflows: Names,
    /// Whether the rule may import WASI (with the host's empty context).
    pub wasi: bool,
    /// The only rule version (its content hash, as `sluice check` and
    /// decisions show it) this approval covers; absent: any version.
    pub version: Option<String>,
}

/// Every rule's approval, by rule name (`[rules.grants]`), and the config
/// file they came from, which refusals name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Approvals {
    by_rule: BTreeMap<String, Approval>,
    #[serde(skip)]
    origin: Option<String>,
    /// The agent and workflow names the config declares, when known: a rule
    /// asking to route to another is refused at load.
    #[serde(skip)]
    declared: Option<(BTreeSet<String>, BTreeSet<String>)>,
}

impl Approvals {
    /// The approval of one rule, if the config has one.
    pub fn get(&self, rule: &str) -> Option<&Approval> {
        self.by_rule.get(rule)
    }

    /// Every approval, by rule name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Approval)> {
        self.by_rule.iter()
    }

    /// Names the config file the approvals came from, for refusals.
    pub fn set_origin(&mut self, origin: &str) {
        self.origin = Some(origin.to_owned());
    }

    /// Records the agents and workflows the config declares (`[agents]`,
    /// `[workflows]`), which every name a rule asks to route to must be.
    pub fn set_declared(&mut self, agents: BTreeSet<String>, workflows: BTreeSet<String>) {
        self.declared = Some((agents, workflows));
    }

    /// ` (in <file>)`, or nothing when the file is not known.
    fn in_file(&self) -> String {
        self.origin
            .as_deref()
            .map(|o| format!(" (in {o})"))
            .unwrap_or_default()
    }
}

impl FromIterator<(String, Approval)> for Approvals {
    fn from_iter<I: IntoIterator<Item = (String, Approval)>>(iter: I) -> Self {
        Approvals {
            by_rule: iter.into_iter().collect(),
            origin: None,
            declared: None,
        }
    }
}

impl Approval {
    /// Checks values serde cannot; `key` is `rules.grants.<rule>`.
    pub fn validate(&self, key: &str) -> Result<(), String> {
        for (list, names) in self.lists() {
            if let Some(i) = names.empty_entry() {
                return Err(format!("{key}.{list}[{i}]: must not be empty"));
            }
        }
        if let Some(v) = &self.version
            && (v.is_empty() || !v.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!(
                "{key}.version: {v:?} is not a rule version (hex digits, as `sluice check` prints)"
            ));
        }
        Ok(())
    }

    fn lists(&self) -> [(&'static str, &Names); 4] {
        [
            ("sources", &self.sources),
            ("kinds", &self.kinds),
            ("agents", &self.agents),
            ("workflows", &self.workflows),
        ]
    }
}

/// Refuses a rule whose grants the config does not approve, naming the
/// rule, the manifest, every grant key short of approval and what is missing.
/// Runs before the rule is compiled: an unapproved rule's code is never run.
pub fn approve(
    manifest: &Manifest,
    manifest_path: &Path,
    approvals: &Approvals,
) -> Result<(), LoadError> {
    let scope = manifest.scope();
    let name = &manifest.name;
    let key = format!("rules.grants.{name}");
    let in_file = approvals.in_file();
    let refuse = |message: String| Err(LoadError::new(manifest_path, Some(name), message));
    let Some(approval) = approvals.get(name) else {
        return refuse(format!(
            "not approved: the config{in_file} has no [{key}]; the rule asks for {}",
            describe(&scope)
        ));
    };
    let mut missing = Vec::new();
    // The rule's own failure policy routes too: its default agent must be
    // one it asks for, or a deliberate failure would route outside the grant.
    if let Some(FailurePolicy::DefaultAgent(agent)) = &manifest.on_error
        && !scope.agents.allows(agent)
    {
        missing.push(format!(
            "on_error default-agent {agent:?} is not among what grants.agents asks for"
        ));
    }
    let asked = [
        ("sources", &scope.sources),
        ("kinds", &scope.kinds),
        ("agents", &scope.agents),
        ("workflows", &scope.workflows),
    ];
    for ((list, asked), (_, approved)) in asked.into_iter().zip(approval.lists()) {
        let short = approved.missing(asked);
        if !short.is_empty() {
            missing.push(format!(
                "grants.{list} asks for {}, which {key}.{list}{in_file} does not approve",
                quoted(&short)
            ));
        }
    }
    if let Some((agents, workflows)) = &approvals.declared {
        for (list, asked, declared) in [
            ("agents", &scope.agents, agents),
            ("workflows", &scope.workflows, workflows),
        ] {
            let unknown: Vec<String> = asked
                .0
                .iter()
                .filter(|n| n.as_str() != ANY && !declared.contains(n.as_str()))
                .cloned()
                .collect();
            if !unknown.is_empty() {
                missing.push(format!(
                    "grants.{list} names {}, which the config{in_file} does not declare under [{list}]",
                    quoted(&unknown)
                ));
            }
        }
    }
    if scope.wasi && !approval.wasi {
        missing.push(format!(
            "grants.wasi asks for WASI, which {key}.wasi{in_file} does not approve"
        ));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        refuse(format!("not approved: {}", missing.join("; ")))
    }
}

/// Refuses a rule whose version is not the one its approval pins.
pub fn check_pin(
    name: &str,
    version: &str,
    manifest_path: &Path,
    approvals: &Approvals,
) -> Result<(), LoadError> {
    match approvals.get(name).and_then(|a| a.version.as_deref()) {
        Some(pinned) if pinned != version => Err(LoadError::new(
            manifest_path,
            Some(name),
            format!(
                "rules.grants.{name}.version{} pins {pinned:?}, but the rule is version \
                 {version:?} (its manifest, code or limits changed): review it, then \
                 update the pin",
                approvals.in_file()
            ),
        )),
        _ => Ok(()),
    }
}

/// A scope in words, for messages: `sources ["github"], kinds ["*"], ...`.
pub fn describe(scope: &Scope) -> String {
    let mut s = format!(
        "sources {}, kinds {}, agents {}, workflows {}",
        quoted(&scope.sources.0),
        quoted(&scope.kinds.0),
        quoted(&scope.agents.0),
        quoted(&scope.workflows.0)
    );
    if scope.wasi {
        s.push_str(", wasi");
    }
    s
}

fn quoted(names: &[String]) -> String {
    let parts: Vec<_> = names.iter().map(|n| format!("{n:?}")).collect();
    format!("[{}]", parts.join(", "))
}
