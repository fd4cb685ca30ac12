//! `sluice new rule NAME --lang rust|rhai`: write a skeleton rule (code,
//! manifest, test vectors and their payload) into the config's rules
//! directory (or `--dir`), such that `sluice rules test` passes right after
//! (for Rust, once the one build command it prints has run).
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
    /// A Rust crate on the guest SDK (`plugins/sdk-rust`), built into a
    /// component by one `cargo build` (needs the `wasm32-wasip2` target).
    Rust,
    /// A rhai script: no build step.
    Rhai,
}

/// The guest SDK of this checkout, which a Rust skeleton depends on by path.
pub const RUST_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/sdk-rust");

/// The command that builds a Rust skeleton written into `dir`.
pub fn rust_build_command(dir: &Path, name: &str) -> String {
    format!(
        "cargo build --release --target wasm32-wasip2 --manifest-path {}",
        dir.join(name).join("Cargo.toml").display()
    )
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
    if args.lang == Lang::Rust {
        println!("build it: {}", rust_build_command(&dir, &args.name));
    }
    println!("run `sluice rules test {}` to check it", args.name);
    Ok(())
}

/// Writes the skeleton of `name` into `dir` (created if missing); returns the
/// files written.
pub fn write_rule(dir: &Path, name: &str, lang: Lang) -> anyhow::Result<Vec<PathBuf>> {
    let manifest_path = dir.join(format!("{name}.toml"));
    let example = (
        dir.join("tests").join(format!("{name}-example.json")),
        EXAMPLE_PAYLOAD.to_owned(),
    );
    let files = match lang {
        Lang::Rust => {
            let sdk = Path::new(RUST_SDK);
            if !sdk.join("Cargo.toml").is_file() {
                bail!(
                    "the Rust guest SDK is not at {} (a Rust skeleton needs this sluice checkout)",
                    sdk.display()
                );
            }
            let krate = dir.join(name);
            let mut files = vec![
                (manifest_path.clone(), rust_manifest(name)),
                (krate.join("Cargo.toml"), rust_cargo_toml(name, sdk)),
                (krate.join("src").join("lib.rs"), rust_lib(name)),
                example,
            ];
            // The SDK's own lock file, so the skeleton builds with the versions
            // the SDK is tested with (and offline, when those are cached).
            if let Ok(lock) = std::fs::read_to_string(sdk.join("../Cargo.lock")) {
                files.push((krate.join("Cargo.lock"), lock));
            }
            files
        }
        Lang::Rhai => vec![
            (manifest_path.clone(), rhai_manifest(name)),
            (dir.join(format!("{name}.rhai")), rhai_script(name)),
            example,
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

/// The manifest keys after the code line, shared by every language.
fn manifest_rest(name: &str) -> String {
    format!(
        r#"providers = ["github"]
kinds = ["issues"]

[config]
agent = "{name}-agent"
"#
    )
}

/// The test vectors, shared by every language (the skeletons behave alike).
fn manifest_tests(name: &str) -> String {
    format!(
        r#"
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

fn rhai_manifest(name: &str) -> String {
    format!(
        r#"# The rule `{name}`: see {name}.rhai. Check it with `sluice rules test {name}`.
name = "{name}"
description = "What {name} routes (edit me)"
script = "{name}.rhai"
{}
[limits]
timeout_ms = 50
{}"#,
        manifest_rest(name),
        manifest_tests(name)
    )
}

fn rust_manifest(name: &str) -> String {
    let file = name.replace('-', "_");
    format!(
        r#"# The rule `{name}`: a Rust component, see {name}/src/lib.rs. Build it with
#   cargo build --release --target wasm32-wasip2 --manifest-path {name}/Cargo.toml
# then check it with `sluice rules test {name}`.
name = "{name}"
description = "What {name} routes (edit me)"
component = "{name}/target/wasm32-wasip2/release/{file}.wasm"
{}
[grants]
# Rust's wasm32-wasip2 std imports WASI even though the rule never uses it;
# the host links it with an empty context (no files, env, stdio or network).
wasi = true

[limits]
timeout_ms = 50
memory_mb = 16
{}"#,
        manifest_rest(name),
        manifest_tests(name)
    )
}

fn rust_cargo_toml(name: &str, sdk: &Path) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
sluice-rule = {{ path = {sdk:?} }}

# Its own workspace, even inside another project's tree.
[workspace]

# Small code compiles and instantiates faster; a panic traps, never unwinds.
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = true
panic = "abort"
"#,
        sdk = sdk.display().to_string()
    )
}

fn rust_lib(name: &str) -> String {
    format!(
        r#"//! The rule `{name}`: opened issues go to the agent named by the
//! manifest's `agent` config value; every other action is ignored.

use sluice_rule::prelude::*;

/// The rule.
pub struct Rule;

impl sluice_rule::Rule for Rule {{
    fn classify(ev: &impl EventView) -> Result<Decision, String> {{
        if ev.action().as_deref() != Some("opened") {{
            return Ok(Decision::ignore("not an opened issue"));
        }}
        let repo = ev.str("/repository/full_name").unwrap_or_default();
        Ok(Route::to(config::get_or("agent", "{name}-agent"))
            .priority(Priority::Medium)
            .reason(format!("issue opened in {{repo}}"))
            .label(format!("repo:{{repo}}"))
            .into())
    }}
}}

export_rule!(Rule);
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
