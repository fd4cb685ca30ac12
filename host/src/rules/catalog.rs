//! The rules directory rule by rule, for the rule-author commands (`sluice
//! rules ls|test`): each manifest is read and its rule built on its own, so
//! one broken rule is reported beside the others instead of hiding them.
//!
//! It never runs test vectors (the caller decides how) and never builds a
//! [`RuleSet`](crate::rules::RuleSet): serving loads through
//! [`RuleSet::load`](crate::rules::RuleSet::load).

use std::path::{Path, PathBuf};

use crate::rules::manifest::{Manifest, RuleSource};
use crate::rules::{LoadError, Rule, RulesConfig, WasmEngine, manifest_paths};

/// One manifest of the rules directory and what became of it.
#[derive(Debug)]
pub struct Entry {
    /// The manifest file.
    pub manifest_path: PathBuf,
    /// The parsed manifest, when it parses.
    pub manifest: Option<Manifest>,
    /// The rule built from it, or why it could not be.
    pub rule: Result<Rule, LoadError>,
}

impl Entry {
    /// The rule's name: the manifest's, else the file stem.
    pub fn name(&self) -> String {
        match &self.manifest {
            Some(m) => m.name.clone(),
            None => self
                .manifest_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// The code file the manifest names, when it parses.
    pub fn code_path(&self) -> Option<PathBuf> {
        let m = self.manifest.as_ref()?;
        let dir = self.manifest_path.parent().unwrap_or(Path::new("."));
        Some(match m.source(dir) {
            RuleSource::Component(p) | RuleSource::Script(p) => p,
        })
    }
}

/// Reads every manifest `config` loads from its directory (resolved against
/// `base_dir`) and builds each rule on its own. An error only when the
/// directory itself cannot be read or `rules.load` names a missing manifest.
pub fn load_each(
    config: &RulesConfig,
    base_dir: &Path,
    engine: &WasmEngine,
) -> Result<Vec<Entry>, LoadError> {
    let dir = config.rules_dir(base_dir);
    let paths = manifest_paths(config, &dir)?;
    Ok(paths
        .into_iter()
        .map(|path| load_one(config, path, engine))
        .collect())
}

fn load_one(config: &RulesConfig, path: PathBuf, engine: &WasmEngine) -> Entry {
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            return Entry {
                rule: Err(LoadError::new(&path, None, format!("cannot read: {e}"))),
                manifest_path: path,
                manifest: None,
            };
        }
    };
    let manifest = match Manifest::parse(&path, &text) {
        Ok(m) => m,
        Err(e) => {
            let message = match &e.key {
                Some(k) => format!("{k}: {}", e.message),
                None => e.message.clone(),
            };
            return Entry {
                rule: Err(LoadError::new(&e.file, None, message)),
                manifest_path: path,
                manifest: None,
            };
        }
    };
    let rule = Rule::from_manifest(&manifest, &path, &text, config, engine);
    Entry {
        manifest_path: path,
        manifest: Some(manifest),
        rule,
    }
}
