//! `sluice new rule NAME --lang rhai`: write a skeleton rule (code, manifest,
//! one test vector and its payload) into the config's rules directory (or
//! `--dir`), such that `sluice rules test` passes right after.
//!
//! It only creates files, and never overwrites one: a name already taken is
//! an error naming the file.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::RulesDirArg;
use crate::rules::manifest::Manifest;

/// `sluice new ...`.
#[derive(Debug, clap::Subcommand)]
pub enum NewCommand {
    /// A skeleton rule with a manifest and a passing test vector.
    Rule(NewRuleArgs),
}

/// The languages a skeleton can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A rhai script: no build step.
    Rhai,
}

/// Arguments of `sluice new rule`.
#[derive(Debug, clap::Args)]
pub struct NewRuleArgs {
    /// The config and rules directory the skeleton goes into.
    #[command(flatten)]
    pub rules: RulesDirArg,
    /// The rule's name (a-z, 0-9, '-', '_').
    pub name: String,
    /// The language.
    #[arg(long, value_enum)]
    pub lang: Lang,
}

/// Runs `sluice new ...`.
pub fn run(cmd: NewCommand) -> anyhow::Result<()> {
    let NewCommand::Rule(args) = cmd;
    // `--dir` may name a directory still to be made.
    let dir = match &args.rules.dir {
        Some(dir) => dir.clone(),
        None => {
            let config = args.rules.config.load()?;
            config.rules.rules_dir(&config.base_dir)
        }
    };
    let files = write_rule(&dir, &args.name, args.lang)?;
    for f in &files {
        println!("created {}", f.display());
    }
    println!("run `sluice rules test {}` to check it", args.name);
    Ok(())
}

/// Writes the skeleton of `name` into `dir` (created if missing); returns the
/// files written.
pub fn write_rule(dir: &Path, name: &str, lang: Lang) -> anyhow::Result<Vec<PathBuf>> {
    let manifest_path = dir.join(format!("{name}.toml"));
    let files = match lang {
        Lang::Rhai => vec![
            (manifest_path.clone(), rhai_manifest(name)),
            (dir.join(format!("{name}.rhai")), rhai_script(name)),
            (
                dir.join("tests").join(format!("{name}-example.json")),
                EXAMPLE_PAYLOAD.to_owned(),
            ),
        ],
    };
    // The manifest is checked before anything is written, so a bad name is
    // refused with the manifest's own message.
    Manifest::parse(&manifest_path, &files[0].1)
        .map_err(|e| anyhow::anyhow!("rule {name:?}: {e}"))?;
    if let Some((taken, _)) = files.iter().find(|(p, _)| p.exists()) {
        bail!("{} already exists; pick another name", taken.display());
    }
    let mut written = Vec::new();
    for (path, text) in files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

const EXAMPLE_PAYLOAD: &str = r#"{
  "action": "opened",
  "issue": { "number": 1, "title": "An example issue", "labels": [] },
  "repository": { "full_name": "example/repo" },
  "sender": { "login": "someone", "type": "User" }
}
"#;

fn rhai_manifest(name: &str) -> String {
    format!(
        r#"# The rule `{name}`: see {name}.rhai. Check it with `sluice rules test {name}`.
name = "{name}"
description = "What {name} routes (edit me)"
script = "{name}.rhai"
providers = ["github"]
kinds = ["issues"]

[config]
agent = "{name}-agent"

[limits]
timeout_ms = 50

# Each vector feeds a payload to the rule and names the routes it must return.
[[test]]
event = "tests/{name}-example.json"
kind = "issues"
expect = [{{ agent = "{name}-agent", priority = "medium", labels = ["repo:example/repo"] }}]

[[test]] # another action is ignored
event = "tests/{name}-example.json"
kind = "issues"
set = {{ "/action" = "closed" }}
expect_ignore = true
"#
    )
}

fn rhai_script(name: &str) -> String {
    format!(
        r#"// The rule `{name}`: opened issues go to the agent named by the
// manifest's `agent` config value. `event.get("/json/pointer")` reads the
// payload; return a list of routes, or #{{ ignore: "why" }}.

fn classify(event) {{
    if event.get("/action") != "opened" {{
        return #{{ ignore: `issue ${{event.get("/action")}}, not opened` }};
    }}
    let repo = event.get("/repository/full_name");
    [#{{
        agent: config("agent"),
        priority: "medium",
        reason: `issue #${{event.get("/issue/number")}} opened in ${{repo}}`,
        labels: [`repo:${{repo}}`],
    }}]
}}
"#
    )
}
