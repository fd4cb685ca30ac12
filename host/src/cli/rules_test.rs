//! `sluice rules test [RULE]`: run every test vector of every rule (or of one
//! rule), print pass or fail per vector, and for each failure the expected
//! and actual routes as a diff. Unlike loading for `serve`, it does not stop
//! at the first failure. It exits non-zero when any vector fails or any rule
//! does not load.
//!
//! It writes nothing but the compile cache; it never touches the store.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::bail;
use serde::Serialize;

use super::RulesDirArg;
use crate::decision::{Route, Verdict};
use crate::rules::catalog::Entry;
use crate::rules::manifest::{ExpectedRoute, TestVector};
use crate::rules::vectors::{self, VectorResult};

/// Arguments of `sluice rules test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The config and rules directory.
    #[command(flatten)]
    pub rules: RulesDirArg,
    /// Only this rule (by name).
    pub rule: Option<String>,
    /// One JSON document for scripts.
    #[arg(long)]
    pub json: bool,
}

/// One rule's vectors, as `--json` prints them.
#[derive(Debug, Serialize)]
pub struct RuleReport {
    /// The rule's name.
    pub rule: String,
    /// Its manifest.
    pub manifest: PathBuf,
    /// Its version, when it loaded.
    pub version: Option<String>,
    /// Why it did not load (no vector ran).
    pub load_error: Option<String>,
    /// One entry per vector, in manifest order.
    pub vectors: Vec<VectorReport>,
}

/// One vector's outcome.
#[derive(Debug, Serialize)]
pub struct VectorReport {
    /// Its index in the manifest (`test[i]`).
    pub index: usize,
    /// Its payload file.
    pub event: PathBuf,
    /// Its event kind.
    pub kind: String,
    /// Whether it passed.
    pub passed: bool,
    /// The routes it expects (empty with `expect_ignore`).
    pub expected: Vec<ExpectedRoute>,
    /// Whether it expects an ignore.
    pub expect_ignore: bool,
    /// What the rule answered, when it answered.
    pub got: Option<Verdict>,
    /// Why it could not run, or how the rule failed.
    pub error: Option<String>,
}

/// Runs `sluice rules test`.
pub fn run(args: TestArgs) -> anyhow::Result<()> {
    let config = args.rules.load()?;
    let (_engine, entries) = super::load_rule_entries(&config, args.rule.as_deref(), false)?;
    let reports: Vec<RuleReport> = entries.iter().map(test_rule).collect();
    super::emit(args.json, &reports, |out| print(&reports, out))?;
    let failed: usize = reports
        .iter()
        .map(|r| r.vectors.iter().filter(|v| !v.passed).count())
        .sum();
    let total: usize = reports.iter().map(|r| r.vectors.len()).sum();
    let broken = reports.iter().filter(|r| r.load_error.is_some()).count();
    if failed > 0 || broken > 0 {
        bail!("{failed} of {total} test vectors failed, {broken} rules did not load");
    }
    Ok(())
}

/// Runs one rule's vectors (none when it did not load).
pub fn test_rule(entry: &Entry) -> RuleReport {
    let mut report = RuleReport {
        rule: entry.name(),
        manifest: entry.manifest_path.clone(),
        version: None,
        load_error: None,
        vectors: Vec::new(),
    };
    let rule = match &entry.rule {
        Ok(rule) => rule,
        Err(e) => {
            report.load_error = Some(e.to_string());
            return report;
        }
    };
    report.version = Some(rule.version().to_owned());
    let dir = entry.manifest_path.parent().unwrap_or(Path::new("."));
    let tests = entry.manifest.as_ref().map(|m| &m.tests[..]).unwrap_or(&[]);
    for (index, t) in tests.iter().enumerate() {
        let result = vectors::run(rule, t, dir);
        report.vectors.push(vector_report(index, t, result));
    }
    report
}

fn vector_report(index: usize, t: &TestVector, result: VectorResult) -> VectorReport {
    let (got, error) = match result {
        VectorResult::Pass => (None, None),
        VectorResult::Mismatch { got, .. } => (Some(got), None),
        VectorResult::Error(e) => (None, Some(e)),
    };
    VectorReport {
        index,
        event: t.event.clone(),
        kind: t.kind.clone(),
        passed: got.is_none() && error.is_none(),
        expected: t.expect.clone(),
        expect_ignore: t.expect_ignore,
        got,
        error,
    }
}

fn print(reports: &[RuleReport], out: &mut impl Write) -> std::io::Result<()> {
    for r in reports {
        match (&r.version, &r.load_error) {
            (_, Some(e)) => {
                writeln!(out, "{}  ({})", r.rule, r.manifest.display())?;
                writeln!(out, "  DOES NOT LOAD  {e}")?;
                continue;
            }
            (Some(v), None) => writeln!(out, "{} @{v}  ({})", r.rule, r.manifest.display())?,
            (None, None) => writeln!(out, "{}  ({})", r.rule, r.manifest.display())?,
        }
        if r.vectors.is_empty() {
            writeln!(out, "  (no test vectors)")?;
        }
        for v in &r.vectors {
            let what = format!("test[{}] {} ({})", v.index, v.event.display(), v.kind);
            if v.passed {
                writeln!(out, "  ok    {what}")?;
                continue;
            }
            writeln!(out, "  FAIL  {what}")?;
            if let Some(e) = &v.error {
                writeln!(out, "        {e}")?;
            }
            if let Some(got) = &v.got {
                for line in diff(&v.expected, v.expect_ignore, got) {
                    writeln!(out, "        {line}")?;
                }
            }
        }
    }
    let total: usize = reports.iter().map(|r| r.vectors.len()).sum();
    let failed: usize = reports
        .iter()
        .map(|r| r.vectors.iter().filter(|v| !v.passed).count())
        .sum();
    writeln!(
        out,
        "{} passed, {failed} failed ({} rules)",
        total - failed,
        reports.len()
    )
}

/// Expected against actual, one line per route: `  ` both, `- ` expected
/// only, `+ ` answered only, `~ ` the same agent with other fields (named).
pub fn diff(expected: &[ExpectedRoute], expect_ignore: bool, got: &Verdict) -> Vec<String> {
    let mut lines = Vec::new();
    let routes: &[Route] = match got {
        Verdict::Routes(rs) => rs,
        Verdict::Ignore(reason) => {
            if expect_ignore {
                return lines;
            }
            for e in expected {
                lines.push(format!("- {}", expected_text(e)));
            }
            if expected.is_empty() {
                lines.push("- no routes".into());
            }
            lines.push(format!("+ ignore ({reason})"));
            return lines;
        }
    };
    if expect_ignore {
        lines.push("- ignore".into());
        for r in routes {
            lines.push(format!("+ {}", route_text(r)));
        }
        if routes.is_empty() {
            lines.push("+ no routes".into());
        }
        return lines;
    }
    let mut used = vec![false; routes.len()];
    let mut missing = Vec::new();
    for e in expected {
        match (0..routes.len()).find(|&j| !used[j] && vectors::route_matches(e, &routes[j])) {
            Some(j) => {
                used[j] = true;
                lines.push(format!("  {}", route_text(&routes[j])));
            }
            None => missing.push(e),
        }
    }
    for e in missing {
        // The same agent answered with other fields: say which.
        match (0..routes.len()).find(|&j| !used[j] && routes[j].agent == e.agent) {
            Some(j) => {
                used[j] = true;
                lines.push(format!(
                    "~ {}: {}",
                    e.agent,
                    field_changes(e, &routes[j]).join("; ")
                ));
            }
            None => lines.push(format!("- {}", expected_text(e))),
        }
    }
    for (j, r) in routes.iter().enumerate() {
        if !used[j] {
            lines.push(format!("+ {}", route_text(r)));
        }
    }
    lines
}

fn field_changes(e: &ExpectedRoute, r: &Route) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(p) = e.priority
        && p != r.priority
    {
        out.push(format!(
            "priority expected {}, got {}",
            p.as_str(),
            r.priority.as_str()
        ));
    }
    if let Some(w) = &e.workflow
        && r.workflow.as_ref() != Some(w)
    {
        out.push(format!(
            "workflow expected {w}, got {}",
            r.workflow.as_deref().unwrap_or("none")
        ));
    }
    let missing: Vec<_> = e.labels.iter().filter(|l| !r.labels.contains(l)).collect();
    if !missing.is_empty() {
        out.push(format!("labels missing {missing:?} (got {:?})", r.labels));
    }
    out
}

fn expected_text(e: &ExpectedRoute) -> String {
    let mut s = e.agent.clone();
    if let Some(p) = e.priority {
        s.push_str(&format!(" ({})", p.as_str()));
    }
    if let Some(w) = &e.workflow {
        s.push_str(&format!(" workflow={w}"));
    }
    if !e.labels.is_empty() {
        s.push_str(&format!(" [{}]", e.labels.join(", ")));
    }
    s
}

fn route_text(r: &Route) -> String {
    let mut s = format!("{} ({})", r.agent, r.priority.as_str());
    if let Some(w) = &r.workflow {
        s.push_str(&format!(" workflow={w}"));
    }
    if !r.labels.is_empty() {
        s.push_str(&format!(" [{}]", r.labels.join(", ")));
    }
    s
}
