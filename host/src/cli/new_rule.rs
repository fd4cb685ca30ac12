//! `sluice new rule NAME --lang rust|c|js|python|rhai`: write a skeleton
//! rule (code, manifest, test vectors and their payload) into the config's
//! rules directory (or `--dir`), such that `sluice rules test` passes right
//! after (for a component, once the one build command it prints has run).
//!
//! A component skeleton is a folder `NAME/` beside its manifest with the
//! code, the WIT it builds against and a `build.sh` that sources
//! `toolchain.sh` — both written out from this binary, so an empty directory
//! is enough. The toolchain installs from the package registries on the
//! first build (into `$SLUICE_TOOLS`, default `~/.cache/sluice/tools`), the
//! same recipes `plugins/build.sh` uses.
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
    /// A Rust crate on the guest SDK (`plugins/sdk-rust`): rustup's
    /// `wasm32-wasip2` target, else Debian's rust-web toolchain.
    Rust,
    /// C on wasi-libc with `wit-bindgen c` bindings (apt clang, crates.io
    /// wit-bindgen-cli).
    C,
    /// An ES module on QuickJS (npm componentize-qjs).
    Js,
    /// A Python module on CPython (PyPI componentize-py).
    Python,
    /// A rhai script: no build step.
    Rhai,
}

impl Lang {
    /// The name `build.sh` and the docs use.
    fn as_str(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::C => "c",
            Lang::Js => "js",
            Lang::Python => "python",
            Lang::Rhai => "rhai",
        }
    }
}

/// The guest SDK of this checkout, which a Rust skeleton depends on by path.
pub const RUST_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/sdk-rust");

/// The toolchain recipes a component skeleton's `build.sh` sources (the
/// same file `plugins/build.sh` sources).
const TOOLCHAIN_SH: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/toolchain.sh"));

/// The WIT package C, JavaScript and Python skeletons are built against
/// (`sluice:router@0.1.0`), written beside each of them (an empty directory
/// has no `wit/`).
const ROUTER_WIT: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/wit/sluice-router@0.1.0/router.wit"
));

/// The WIT package a Rust skeleton targets (`sluice:router@0.2.0`, as the
/// SDK it depends on does), written beside it for reference.
const ROUTER_WIT_0_2: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/wit/sluice-router@0.2.0/router.wit"
));

/// The one command that builds a component skeleton written into `dir`.
pub fn build_command(dir: &Path, name: &str) -> String {
    format!("bash {}", dir.join(name).join("build.sh").display())
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
    if args.lang != Lang::Rhai {
        println!("build it: {}", build_command(&dir, &args.name));
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
                (manifest_path.clone(), component_manifest(name, Lang::Rust)),
                (krate.join("Cargo.toml"), rust_cargo_toml(name, sdk)),
                (krate.join("src").join("lib.rs"), rust_lib(name)),
                example,
            ];
            files.extend(build_files(&krate, name, Lang::Rust));
            // The SDK's own lock file, so the skeleton builds with the versions
            // the SDK is tested with (and offline, when those are cached).
            if let Ok(lock) = std::fs::read_to_string(sdk.join("../Cargo.lock")) {
                files.push((krate.join("Cargo.lock"), lock));
            }
            files
        }
        Lang::C | Lang::Js | Lang::Python => {
            let folder = dir.join(name);
            let (file, code) = match lang {
                Lang::C => ("rule.c", c_source(name)),
                Lang::Js => ("rule.js", js_source(name)),
                // Its own folder: componentize-py packs every file under the
                // Python path into the component.
                _ => ("src/app.py", python_source(name)),
            };
            let mut files = vec![
                (manifest_path.clone(), component_manifest(name, lang)),
                (folder.join(file), code),
                example,
            ];
            files.extend(build_files(&folder, name, lang));
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

/// The WIT a skeleton in `lang` builds against: 0.2.0 for Rust (the SDK's),
/// 0.1.0 for the others (the host serves both).
fn wit_for(lang: Lang) -> &'static str {
    match lang {
        Lang::Rust => ROUTER_WIT_0_2,
        _ => ROUTER_WIT,
    }
}

/// `build.sh`, `toolchain.sh` and the WIT, in the component's folder.
fn build_files(folder: &Path, name: &str, lang: Lang) -> Vec<(PathBuf, String)> {
    vec![
        (folder.join("build.sh"), build_script(name, lang)),
        (folder.join("toolchain.sh"), TOOLCHAIN_SH.to_owned()),
        (
            folder.join("wit").join("router.wit"),
            wit_for(lang).to_owned(),
        ),
    ]
}

fn component_manifest(name: &str, lang: Lang) -> String {
    let (what, code, grants, limits) = match lang {
        Lang::Rust => (
            "a Rust component",
            format!("{name}/src/lib.rs"),
            "[grants]
# Rust's wasm32-wasip2 std imports WASI even though the rule never uses it;
# the host links it with an empty context (no files, env, stdio or network).
# (Built with Debian's toolchain instead, it imports none.)
wasi = true
",
            "memory_mb = 16\n",
        ),
        Lang::C => (
            "a C component",
            format!("{name}/rule.c"),
            "",
            "memory_mb = 16\n",
        ),
        Lang::Js => (
            "a JavaScript component (QuickJS)",
            format!("{name}/rule.js"),
            "",
            "# QuickJS starts with ~1.4 MiB of memory; leave it room for the heap.\nmemory_mb = 32\n",
        ),
        _ => (
            "a Python component (CPython)",
            format!("{name}/src/app.py"),
            "",
            "# CPython starts with ~12 MiB of memory; leave it room for the heap.\nmemory_mb = 64\n",
        ),
    };
    format!(
        r#"# The rule `{name}`: {what}, see {code}. Build it with
#   bash {name}/build.sh
# (its toolchain installs on first use), then check it with
# `sluice rules test {name}`.
name = "{name}"
description = "What {name} routes (edit me)"
component = "{name}/{name}.wasm"
language = "{lang}"
{}
{grants}
[limits]
timeout_ms = 100
{limits}{}"#,
        manifest_rest(name),
        manifest_tests(name),
        lang = lang.as_str()
    )
}

/// The one build command's script: source the embedded toolchain recipes,
/// build, and rename the component into place (a rules-directory watcher
/// never reads a half-written file).
fn build_script(name: &str, lang: Lang) -> String {
    let file = name.replace('-', "_");
    let build = match lang {
        Lang::Rust => format!(
            r#"tc_rust
tc_cargo "$here" build --release --target-dir "$here/target"
core="$here/target/$RUST_TARGET/release/{file}.wasm"
if [ "$RUST_TOOLCHAIN" = rustup ]; then
    cp "$core" "$tmp"
else
    tc_wasm_tools
    "$WASM_TOOLS" component new "$core" -o "$tmp"
fi"#
        ),
        Lang::C => r#"tc_c
tc_build_c "$here/wit" rule "$tmp" "$here/rule.c""#
            .to_owned(),
        Lang::Js => r#"tc_js
tc_build_js "$here/wit" rule "$tmp" "$here/rule.js""#
            .to_owned(),
        _ => r#"tc_python
tc_build_py "$here/wit" rule "$tmp" "$here/src" app"#
            .to_owned(),
    };
    format!(
        r#"#!/usr/bin/env bash
# Builds the rule `{name}` ({lang}) into {name}.wasm beside this script.
# Its toolchain installs on first use from the package registries into
# $SLUICE_TOOLS (default ~/.cache/sluice/tools): see toolchain.sh, written by
# `sluice new rule` from the same recipes sluice's own plugins/build.sh uses.
set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
# shellcheck source=/dev/null
source "$here/toolchain.sh"
tmp="$here/.{name}.wasm.tmp"
trap 'rm -f "$tmp"' EXIT
{build}
mv -f "$tmp" "$here/{name}.wasm"
echo "built $here/{name}.wasm"
"#,
        lang = lang.as_str()
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
        let number = ev.int("/issue/number").unwrap_or_default();
        Ok(Route::to(config::get_or("agent", "{name}-agent"))
            .priority(Priority::Medium)
            .reason(format!("issue opened in {{repo}}"))
            .label(format!("repo:{{repo}}"))
            // One issue's events reach the agent one at a time, in order.
            .ordering_key(format!("{{repo}}#{{number}}"))
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

fn c_source(name: &str) -> String {
    format!(
        r#"// The rule `{name}`: opened issues go to the agent named by the
// manifest's `agent` config value; every other action is ignored.
//
// rule.h is generated from wit/router.wit by `wit-bindgen c` at build time.
// Strings the rule returns are malloc'd: the bindings free them once the host
// has copied them. No stdio: wasi-libc then imports no WASI at all.

#include <stdlib.h>
#include <string.h>

#include "rule.h"

// A new string: `prefix` followed by `s`.
static rule_string_t joined(const char *prefix, const rule_string_t *s) {{
    size_t n = strlen(prefix);
    rule_string_t out = {{malloc(n + s->len + 1), n + s->len}};
    if (out.ptr == NULL) abort();
    memcpy(out.ptr, prefix, n);
    memcpy(out.ptr + n, s->ptr, s->len);
    return out;
}}

bool exports_sluice_router_classifier_classify(exports_sluice_router_classifier_own_event_t ev,
                                               exports_sluice_router_classifier_decision_t *ret,
                                               rule_string_t *err) {{
    (void)err; // return false with *err set to fail the event
    sluice_router_types_borrow_event_t event = sluice_router_types_borrow_event(ev);
    rule_string_t action;
    bool opened = false;
    if (sluice_router_types_method_event_action(event, &action)) {{
        opened = action.len == 6 && memcmp(action.ptr, "opened", 6) == 0;
        rule_string_free(&action);
    }}
    rule_string_t repo = {{NULL, 0}};
    if (opened) {{
        rule_string_t pointer;
        rule_string_set(&pointer, "/repository/full_name");
        sluice_router_types_value_t value;
        if (sluice_router_types_method_event_get(event, &pointer, &value)) {{
            if (value.tag == SLUICE_ROUTER_TYPES_VALUE_TEXT) {{
                repo = value.val.text; // now ours to free
            }} else {{
                sluice_router_types_value_free(&value);
            }}
        }}
    }}
    // The event arrives owned: release it before returning.
    sluice_router_types_event_drop_own(ev);

    if (!opened) {{
        ret->tag = SLUICE_ROUTER_TYPES_DECISION_IGNORE;
        rule_string_dup(&ret->val.ignore, "not an opened issue");
        return true;
    }}
    sluice_router_types_route_t *route = calloc(1, sizeof *route);
    rule_string_t *label = calloc(1, sizeof *label);
    if (route == NULL || label == NULL) abort();
    rule_string_t key;
    rule_string_set(&key, "agent");
    if (!sluice_router_config_get(&key, &route->agent) || route->agent.len == 0) {{
        rule_string_free(&route->agent);
        rule_string_dup(&route->agent, "{name}-agent");
    }}
    route->priority = SLUICE_ROUTER_TYPES_PRIORITY_MEDIUM;
    route->reason = joined("issue opened in ", &repo);
    *label = joined("repo:", &repo);
    route->labels.ptr = label;
    route->labels.len = 1;
    rule_string_free(&repo);
    ret->tag = SLUICE_ROUTER_TYPES_DECISION_ROUTES;
    ret->val.routes.ptr = route;
    ret->val.routes.len = 1;
    return true;
}}
"#
    )
}

fn js_source(name: &str) -> String {
    format!(
        r#"// The rule `{name}`: opened issues go to the agent named by the
// manifest's `agent` config value; every other action is ignored.
//
// Built by componentize-qjs (QuickJS) against wit/router.wit. An option is
// the value or null, a variant is {{ tag, val }}, an enum its case name; throw
// a string to fail the event.

import config from "sluice:router/config@0.1.0";

export const classifier = {{
  classify(ev) {{
    // The event arrives owned: release it before returning.
    try {{
      if (ev.action() !== "opened") {{
        return {{ tag: "ignore", val: "not an opened issue" }};
      }}
      const v = ev.get("/repository/full_name");
      const repo = v !== null && v.tag === "text" ? v.val : "";
      return {{
        tag: "routes",
        val: [
          {{
            agent: config.get("agent") || "{name}-agent",
            workflow: null,
            priority: "medium",
            reason: `issue opened in ${{repo}}`,
            labels: [`repo:${{repo}}`],
          }},
        ],
      }};
    }} finally {{
      ev[Symbol.dispose]();
    }}
  }},
}};
"#
    )
}

fn python_source(name: &str) -> String {
    format!(
        r#""""The rule `{name}`: opened issues go to the agent named by the
manifest's `agent` config value; every other action is ignored.

Built by componentize-py (CPython) against wit/router.wit, which generates
the `wit_world` package imported below. Raise componentize_py_types.Err(str)
to fail the event.
"""

from wit_world import exports
from wit_world.imports import config, types


class Classifier(exports.Classifier):
    def classify(self, ev: types.Event) -> types.Decision:
        # The event arrives owned: release it before returning.
        with ev:
            action = ev.action()
            value = ev.get("/repository/full_name")
        if action != "opened":
            return types.Decision_Ignore("not an opened issue")
        repo = value.value if isinstance(value, types.Value_Text) else ""
        route = types.Route(
            agent=config.get("agent") or "{name}-agent",
            workflow=None,
            priority=types.Priority.MEDIUM,
            reason=f"issue opened in {{repo}}",
            labels=[f"repo:{{repo}}"],
        )
        return types.Decision_Routes([route])
"#
    )
}
