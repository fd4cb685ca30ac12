//! The routing table checked against the real GitHub payloads in
//! `shared/corpus/github/`. The corpus has no merged PR, failed run,
//! `agent-execute` label or `/agent` comment, so those cases take a real payload
//! and change the one field that matters, in memory; the files stay untouched.

use std::path::PathBuf;

use serde_json::{Value as Json, json};
use sluice_rule::JsonEvent;

use super::*;

/// `shared/corpus/`, beside the repository (or `$SLUICE_CORPUS`).
fn corpus() -> PathBuf {
    let dir = std::env::var_os("SLUICE_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../../shared/corpus")
        });
    assert!(
        dir.join("github").is_dir(),
        "GitHub corpus not found at {} (set SLUICE_CORPUS to the corpus folder)",
        dir.display()
    );
    dir
}

/// A corpus payload as an event; its folder is the `X-GitHub-Event` kind.
fn load(rel: &str) -> JsonEvent {
    let path = corpus().join("github").join(rel);
    let body = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let kind = rel.split('/').next().unwrap();
    JsonEvent::from_slice(kind, &body).unwrap()
}

fn with(rel: &str, pointer: &str, value: Json) -> JsonEvent {
    let mut ev = load(rel);
    *ev.payload_mut()
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{rel} has no {pointer}")) = value;
    ev
}

#[track_caller]
fn only_route(d: &Decision) -> &Route {
    match d.as_routes() {
        [r] => r,
        _ => panic!("expected exactly one route, got {d:?}"),
    }
}

#[track_caller]
fn assert_route<'a>(d: &'a Decision, agent: &str, priority: Priority) -> &'a Route {
    let r = only_route(d);
    assert_eq!((r.agent.as_str(), r.priority), (agent, priority), "{d:?}");
    assert!(!r.reason.is_empty());
    r
}

#[track_caller]
fn assert_ignored(d: &Decision, containing: &str) {
    let reason = d
        .ignore_reason()
        .unwrap_or_else(|| panic!("expected ignore, got {d:?}"));
    assert!(
        reason.contains(containing),
        "{reason:?} should mention {containing:?}"
    );
}

/// Every GitHub payload in the corpus, and what the table says about it.
#[test]
fn whole_corpus() {
    let routed: &[(&str, &str, Priority)] = &[
        ("issues/opened.payload.json", "issue-triage", Priority::High),
        (
            "issues/opened.with-empty-body.payload.json",
            "issue-triage",
            Priority::High,
        ),
        (
            "issues/opened.with-organization.payload.json",
            "issue-triage",
            Priority::High,
        ),
        (
            "issues/opened.with-transfer.payload.json",
            "issue-triage",
            Priority::High,
        ),
        (
            "issues/assigned.payload.json",
            "issue-triage",
            Priority::High,
        ),
        (
            "issues/assigned.with-installation.payload.json",
            "issue-triage",
            Priority::High,
        ),
        (
            "issues/assigned.with-organization.payload.json",
            "issue-triage",
            Priority::High,
        ),
        (
            "pull_request/opened.payload.json",
            "review-agent",
            Priority::High,
        ),
        (
            "pull_request/opened.with-null-body.json",
            "review-agent",
            Priority::High,
        ),
        (
            "pull_request/opened.with-organization.payload.json",
            "review-agent",
            Priority::High,
        ),
        (
            "pull_request/ready_for_review.payload.json",
            "review-agent",
            Priority::High,
        ),
        (
            "pull_request/ready_for_review.with-installation.payload.json",
            "review-agent",
            Priority::High,
        ),
        (
            "pull_request/ready_for_review.with-organization.payload.json",
            "review-agent",
            Priority::High,
        ),
        (
            "pull_request/review_requested.payload.json",
            "review-agent",
            Priority::High,
        ),
        (
            "push/with-new-branch.payload.json",
            "deployment",
            Priority::Medium,
        ),
        (
            "push/with-no-username-committer.payload.json",
            "deployment",
            Priority::Medium,
        ),
    ];
    let root = corpus().join("github");
    let mut seen = 0;
    let mut routed_seen = 0;
    let mut kinds: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    kinds.sort();
    for kind_dir in kinds {
        let kind = kind_dir.file_name().unwrap().to_str().unwrap().to_owned();
        let mut files: Vec<_> = std::fs::read_dir(&kind_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files
            .iter()
            .filter(|f| f.extension().is_some_and(|x| x == "json"))
        {
            let rel = format!("{kind}/{}", file.file_name().unwrap().to_str().unwrap());
            let ev = load(&rel);
            let d = GithubRouter::classify(&ev).unwrap();
            seen += 1;
            match routed.iter().find(|(f, ..)| *f == rel) {
                Some((_, agent, priority)) => {
                    routed_seen += 1;
                    assert_route(&d, agent, *priority);
                }
                None => {
                    let action = ev.action().unwrap_or_default();
                    assert_ignored(&d, &describe(&kind, &action));
                }
            }
        }
    }
    assert_eq!(
        routed_seen,
        routed.len(),
        "a routed file is missing from the corpus"
    );
    assert!(seen > 200, "only {seen} payloads found");
}

#[test]
fn issue_opened_names_issue_and_repo() {
    let d = decide(&load("issues/opened.payload.json"));
    let r = assert_route(&d, "issue-triage", Priority::High);
    assert_eq!(r.reason, "issue #1 opened in Codertocat/Hello-World");
    assert_eq!(r.labels, ["trigger:opened"]);
    assert!(r.workflow.is_none());
}

/// Routes about one issue or pull request carry `owner/repo#number`, so its
/// events reach the agent in order; deployments and escalations carry none.
#[test]
fn issue_and_pull_request_routes_are_ordered_per_thread() {
    let key = |d: &Decision| only_route(d).ordering_key.clone();
    let d = decide(&load("issues/opened.payload.json"));
    assert_eq!(key(&d).as_deref(), Some("Codertocat/Hello-World#1"));
    let d = decide(&with(
        "issues/labeled.payload.json",
        "/label/name",
        json!("agent-execute"),
    ));
    assert!(key(&d).is_some_and(|k| k.ends_with("#1")), "{d:?}");
    let d = decide(&load("pull_request/review_requested.payload.json"));
    assert_eq!(key(&d).as_deref(), Some("Codertocat/Hello-World#2"));
    let d = decide(&with(
        "pull_request/closed.payload.json",
        "/pull_request/merged",
        json!(true),
    ));
    assert_eq!(key(&d), None);
    // No repository name, no key (the route stays).
    let d = decide(&with(
        "issues/opened.payload.json",
        "/repository",
        json!({}),
    ));
    assert_eq!(key(&d), None);
    // A key past the host's limit is left off rather than failing the answer.
    let long = "o/".to_owned() + &"r".repeat(sluice_rule::limits::MAX_ORDERING_KEY);
    let d = decide(&with(
        "issues/opened.payload.json",
        "/repository/full_name",
        json!(long),
    ));
    assert_eq!(key(&d), None);
}

#[test]
fn issues_assigned_and_closed_go_to_the_issue_agent() {
    let d = decide(&load("issues/assigned.payload.json"));
    let r = assert_route(&d, "issue-triage", Priority::High);
    assert_eq!(r.labels, ["trigger:assigned", "assignee:Codertocat"]);
    // The corpus has no closed issue: the opened one, closed.
    let d = decide(&load("issues/opened.payload.json").with_action(Some("closed")));
    assert_eq!(
        assert_route(&d, "issue-triage", Priority::Medium).labels,
        ["trigger:closed"]
    );
    for ignored in ["unassigned", "reopened", "edited"] {
        let d = decide(&load(&format!("issues/{ignored}.payload.json")));
        assert_ignored(&d, &format!("issues.{ignored}"));
    }
}

#[test]
fn agent_execute_label_on_an_issue_is_critical() {
    let rel = "issues/labeled.payload.json";
    let d = decide(&with(rel, "/label/name", json!("agent-execute")));
    let r = assert_route(&d, "coordinator", Priority::Critical);
    assert_eq!(r.labels, ["label:agent-execute"]);
    // GitHub label names are case-insensitive.
    let d = decide(&with(rel, "/label/name", json!("Agent-Execute")));
    assert_route(&d, "coordinator", Priority::Critical);
    // The table routes the label on issues only.
    let d = decide(&with(
        "pull_request/labeled.payload.json",
        "/label/name",
        json!("agent-execute"),
    ));
    assert_ignored(&d, "pull_request.labeled");
    assert_ignored(
        &decide(&load("issues/labeled.payload.json")),
        "issues.labeled",
    );
    // Removing the label is not a request to act.
    let d = decide(&with(
        "issues/unlabeled.payload.json",
        "/label/name",
        json!("agent-execute"),
    ));
    assert_ignored(&d, "issues.unlabeled");
}

#[test]
fn agent_command_is_parsed_into_labels() {
    let rel = "issue_comment/created.payload.json";
    let d = decide(&with(
        rel,
        "/comment/body",
        json!("/agent Fix the flaky test\r\nThanks!"),
    ));
    let r = assert_route(&d, "coordinator", Priority::Critical);
    assert_eq!(r.labels, ["command:fix", "args:the flaky test"]);
    assert_eq!(
        r.reason,
        "/agent fix by Codertocat on #1 in Codertocat/Hello-World"
    );

    for body in ["  /agent rebase", "\n   /agent rebase"] {
        let d = decide(&with(rel, "/comment/body", json!(body)));
        assert_eq!(
            assert_route(&d, "coordinator", Priority::Critical).labels,
            ["command:rebase"],
            "{body:?}"
        );
    }
    // A review comment on a pull request's diff is a comment too.
    let d = decide(&with(
        "pull_request_review_comment/created.payload.json",
        "/comment/body",
        json!("/agent explain this line"),
    ));
    let r = assert_route(&d, "coordinator", Priority::Critical);
    assert_eq!(r.labels, ["command:explain", "args:this line"]);
    assert_eq!(
        r.reason,
        "/agent explain by Codertocat on #2 in Codertocat/Hello-World"
    );
    assert_ignored(
        &decide(&load("pull_request_review_comment/created.payload.json")),
        "pull_request_review_comment.created",
    );

    for body in [
        "/agents rebase",
        "please /agent rebase",
        "/agent",
        "/agent   \nrebase",
        // Markdown code and quotes show a command; they do not give one.
        "    /agent rebase",
        "\t/agent rebase",
        "```\n/agent rebase\n```",
        "~~~\n/agent rebase\n~~~",
        "`/agent rebase`",
        "> /agent rebase",
    ] {
        let d = decide(&with(rel, "/comment/body", json!(body)));
        assert_ignored(&d, "issue_comment.created");
    }
    // The real comment is plain text.
    assert_ignored(&decide(&load(rel)), "issue_comment.created");
    // Edits and deletions do not re-run a command.
    let d = decide(&with(
        "issue_comment/edited.payload.json",
        "/comment/body",
        json!("/agent fix"),
    ));
    assert_ignored(&d, "issue_comment.edited");
}

/// `/agent` and 300 characters: the labels and reason the component emits
/// fit the host's limits, and the route is still there.
#[test]
fn long_commands_are_clamped_not_dropped() {
    for body in [
        format!("/agent {}", "x".repeat(300)),
        format!("/agent fix {}", "é".repeat(300)),
        format!("/agent {} {}", "c".repeat(300), "a".repeat(2_000)),
    ] {
        let ev = with(
            "issue_comment/created.payload.json",
            "/comment/body",
            json!(body),
        );
        let d = GithubRouter::answer(&ev).unwrap();
        let r = assert_route(&d, "coordinator", Priority::Critical);
        assert!(r.reason.len() <= sluice_rule::limits::MAX_REASON, "{r:?}");
        assert!(r.labels.len() <= sluice_rule::limits::MAX_LABELS, "{r:?}");
        for l in &r.labels {
            assert!(
                l.len() <= sluice_rule::limits::MAX_LABEL,
                "{} bytes: {l}",
                l.len()
            );
        }
        assert!(r.label_value("command").is_some(), "{r:?}");
    }
}

#[test]
fn agent_command_needs_a_trusted_human() {
    let mut ev = with(
        "issue_comment/created.payload.json",
        "/comment/body",
        json!("/agent fix"),
    );
    ev.payload_mut()["comment"]["author_association"] = json!("NONE");
    assert_ignored(&decide(&ev), "is not accepted");
    config::set("command_associations", "*");
    assert_route(&decide(&ev), "coordinator", Priority::Critical);
    config::clear();

    let mut ev = with(
        "issue_comment/created.payload.json",
        "/comment/body",
        json!("/agent fix"),
    );
    ev.payload_mut()["comment"]["user"]["type"] = json!("Bot");
    assert_ignored(&decide(&ev), "from bot");
    config::set("allow_bot_commands", "true");
    assert_route(&decide(&ev), "coordinator", Priority::Critical);
    config::clear();
}

#[test]
fn pull_request_reviews() {
    let d = decide(&with(
        "pull_request/opened.payload.json",
        "/pull_request/draft",
        json!(true),
    ));
    assert_ignored(&d, "draft");
    let d = decide(&with(
        "pull_request/review_requested.payload.json",
        "/pull_request/draft",
        json!(true),
    ));
    assert_ignored(&d, "pull_request.review_requested: #2 is a draft");
    let d = decide(&load("pull_request/opened.payload.json"));
    assert_eq!(
        assert_route(&d, "review-agent", Priority::High).labels,
        ["trigger:opened"]
    );
    let d = decide(&load("pull_request/review_requested.payload.json"));
    let r = assert_route(&d, "review-agent", Priority::High);
    assert_eq!(r.labels, ["trigger:review_requested", "reviewer:octocat"]);
    let d = decide(&load("pull_request/ready_for_review.payload.json"));
    assert_eq!(only_route(&d).labels, ["trigger:ready_for_review"]);
    for ignored in [
        "synchronize",
        "converted_to_draft",
        "review_request_removed",
        "reopened",
    ] {
        let d = decide(&load(&format!("pull_request/{ignored}.payload.json")));
        assert_ignored(&d, &format!("pull_request.{ignored}"));
    }
}

#[test]
fn merged_pull_requests_deploy() {
    let rel = "pull_request/closed.payload.json";
    assert_ignored(&decide(&load(rel)), "closed without merging");
    let merged = with(rel, "/pull_request/merged", json!(true));
    let r = assert_route(&decide(&merged), "deployment", Priority::Medium).clone();
    assert_eq!(
        r.labels,
        [
            "trigger:merge",
            "ref:master",
            "sha:c4295bd74fb0f4fda03689c3df3f2803b658fd85"
        ]
    );
    // Merged is the whole condition; the agent sees the branch in `ref:`.
    let mut other = merged;
    other.payload_mut()["pull_request"]["base"]["ref"] = json!("release-1.x");
    let d = decide(&other);
    let r = assert_route(&d, "deployment", Priority::Medium);
    assert_eq!(r.label_value("ref"), Some("release-1.x"));
}

#[test]
fn push_to_default_branch_deploys() {
    let d = decide(&load("push/with-new-branch.payload.json"));
    let r = assert_route(&d, "deployment", Priority::Medium);
    assert_eq!(
        r.labels,
        [
            "trigger:push",
            "ref:master",
            "sha:6113728f27ae82c7b1a177c8d03f9e96e0adf246"
        ]
    );
    // A tag, another branch, a branch deletion, a branch merely prefixed alike.
    assert_ignored(
        &decide(&load("push/payload.json")),
        "push to refs/tags/simple-tag",
    );
    for git_ref in [
        "refs/heads/feature",
        "refs/heads/master-old",
        "refs/tags/master",
    ] {
        let d = decide(&with(
            "push/with-new-branch.payload.json",
            "/ref",
            json!(git_ref),
        ));
        assert_ignored(&d, "not the default branch");
    }
    let d = decide(&with(
        "push/with-new-branch.payload.json",
        "/deleted",
        json!(true),
    ));
    assert_ignored(&d, "push deleting refs/heads/master");
}

#[test]
fn failed_workflow_runs_escalate() {
    let rel = "workflow_run/completed.payload.json";
    assert_ignored(&decide(&load(rel)), "concluded \"success\"");
    for conclusion in ["failure", "timed_out", "startup_failure"] {
        let d = decide(&with(rel, "/workflow_run/conclusion", json!(conclusion)));
        let r = assert_route(&d, "guardian", Priority::High);
        assert_eq!(
            r.labels,
            [
                format!("conclusion:{conclusion}"),
                "workflow:.github/workflows/test.yml".to_owned(),
                "branch:master".to_owned()
            ]
        );
    }
    for conclusion in [
        json!("success"),
        json!("cancelled"),
        json!("skipped"),
        json!("neutral"),
        json!("action_required"),
        Json::Null,
    ] {
        assert_ignored(
            &decide(&with(rel, "/workflow_run/conclusion", conclusion)),
            "workflow_run",
        );
    }
    // `requested` runs have not finished, whatever their conclusion field says.
    let d = decide(&with(
        "workflow_run/requested.payload.json",
        "/workflow_run/conclusion",
        json!("failure"),
    ));
    assert_ignored(&d, "workflow_run.requested");
}

#[test]
fn agent_names_come_from_config() {
    config::set("triage_agent", "triage-bot");
    config::set("review_agent", "");
    let d = decide(&load("issues/opened.payload.json"));
    assert_eq!(only_route(&d).agent, "triage-bot");
    // An empty value falls back to the default instead of routing to "".
    let d = decide(&load("pull_request/opened.payload.json"));
    assert_eq!(only_route(&d).agent, "review-agent");
    config::clear();
}

#[test]
fn unknown_kinds_and_odd_payloads_never_panic() {
    assert_ignored(
        &decide(&JsonEvent::new("ping", json!({"zen": "x"}))),
        "no route for ping",
    );
    let kinds = [
        "issues",
        "pull_request",
        "issue_comment",
        "pull_request_review_comment",
        "push",
        "workflow_run",
        "x",
    ];
    let actions = [
        "opened",
        "labeled",
        "created",
        "closed",
        "completed",
        "assigned",
        "ready_for_review",
        "review_requested",
        "",
    ];
    let payloads = [
        json!({}),
        json!(null),
        json!([1, 2]),
        json!({"label": 3, "comment": {"body": 5}}),
    ];
    for kind in kinds {
        for action in actions {
            for payload in &payloads {
                let ev = JsonEvent::new(kind, payload.clone())
                    .with_action(Some(action).filter(|a| !a.is_empty()));
                let _ = decide(&ev);
            }
        }
    }
}

#[test]
fn command_parsing() {
    assert_eq!(
        parse_command("/agent fix it", "/agent"),
        Some(("fix".into(), "it"))
    );
    assert_eq!(
        parse_command("/agent\tFIX", "/agent"),
        Some(("fix".into(), ""))
    );
    assert_eq!(parse_command("/agent", "/agent"), Some(("".into(), "")));
    assert_eq!(parse_command("/agentfix", "/agent"), None);
    assert_eq!(parse_command("", "/agent"), None);
    assert_eq!(
        parse_command("\n\n/agent a b  c \nd", "/agent"),
        Some(("a".into(), "b  c"))
    );
    assert_eq!(parse_command("!bot go", "!bot"), Some(("go".into(), "")));
    // Up to three spaces is a paragraph; four is an indented code block.
    assert_eq!(
        parse_command("   /agent go", "/agent"),
        Some(("go".into(), ""))
    );
    assert_eq!(parse_command("    /agent go", "/agent"), None);
    assert_eq!(parse_command(" \t/agent go", "/agent"), None);
    assert_eq!(parse_command("```sh\n/agent go\n```", "/agent"), None);
}

/// The decision for every corpus payload, to read the table in action:
/// `cargo test -p github-router -- --ignored --nocapture print_corpus_decisions`.
#[test]
#[ignore]
fn print_corpus_decisions() {
    let root = corpus().join("github");
    for kind in std::fs::read_dir(&root).unwrap() {
        let kind = kind.unwrap().path();
        for f in std::fs::read_dir(&kind).unwrap() {
            let f = f.unwrap().path();
            let rel = f.strip_prefix(&root).unwrap().to_str().unwrap().to_owned();
            println!("{rel}: {:?}", decide(&load(&rel)));
        }
    }
}
