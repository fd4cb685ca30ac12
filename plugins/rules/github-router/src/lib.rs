//! The GitHub routing table sluice ships (`rules/github-router.wasm`).
//!
//! | event                                        | condition                                   | agent          | priority |
//! |----------------------------------------------|---------------------------------------------|----------------|----------|
//! | `issues` `labeled`                           | label `agent-execute`                       | `coordinator`  | critical |
//! | `issue_comment` / `pull_request_review_comment` `created` | body starts with `/agent <cmd> [args]`, outside a code block | `coordinator` | critical |
//! | `issues` `opened`                            |                                             | `issue-triage` | high     |
//! | `issues` `assigned`                          |                                             | `issue-triage` | high     |
//! | `issues` `closed`                            |                                             | `issue-triage` | medium   |
//! | `pull_request` `opened`                      | not a draft                                 | `review-agent` | high     |
//! | `pull_request` `ready_for_review`            |                                             | `review-agent` | high     |
//! | `pull_request` `review_requested`            | not a draft                                 | `review-agent` | high     |
//! | `pull_request` `closed`                      | merged                                      | `deployment`   | medium   |
//! | `push`                                       | to the default branch, not a deletion       | `deployment`   | medium   |
//! | `workflow_run` `completed`                   | `failure`, `timed_out` or `startup_failure` | `guardian`     | high     |
//! | anything else                                | ignored, with a reason naming kind and action |              |          |
//!
//! The rows and priorities are the ones users asked for; every row has a
//! positive and a negative test vector in `rules/github-router.toml`, which
//! the host runs whenever it loads the rule.
//!
//! A `/agent` command is the comment's first line, indented by at most three
//! spaces: deeper indentation, a fence or a quote makes it Markdown code or a
//! quotation, which shows a command rather than gives one. The command word
//! becomes the label `command:<cmd>` (lower-cased) and the rest of the line
//! `args:<args>`; the SDK clamps labels and reasons to the host's limits, so
//! a long line costs some text, never the route.
//!
//! A merge arrives twice, as `pull_request` `closed` and, on the default
//! branch, as `push`. Both go to `deployment`, each with a `ref:` and a
//! `sha:<commit>` label (the merge commit and the pushed head are the same
//! commit), so the agent deduplicates by sha instead of this rule guessing
//! which one to drop.
//!
//! Routes about one issue or pull request (triage, labels, commands,
//! reviews) carry the ordering key `owner/repo#number` (interface 0.2.0), so
//! the agent gets one thread's events one at a time and in order; merges,
//! pushes and failed runs carry none.
//!
//! `/agent` commands are only taken from comment authors whose
//! `author_association` is `OWNER`, `MEMBER` or `COLLABORATOR`, and never from
//! bots: on a public repository anyone can comment, and an agent that answers
//! with `/agent ...` must not trigger itself. Labels need write access to add,
//! so `agent-execute` needs no such check.
//!
//! Config keys (all optional): `triage_agent`, `coordinator_agent`,
//! `review_agent`, `deployment_agent`, `escalation_agent` rename the agents;
//! `execute_label` (default `agent-execute`); `command_prefix` (default
//! `/agent`); `command_associations` (comma-separated, or `*` for anyone);
//! `allow_bot_commands` (`true` to accept commands from bots).
//!
//! The decisions live in [`decide`], generic over `EventView`, so `cargo test`
//! runs them natively over the real payloads in `shared/corpus/github/`.

use sluice_rule::prelude::*;

/// The GitHub routing rule.
pub struct GithubRouter;

impl Rule for GithubRouter {
    fn classify(ev: &impl EventView) -> Result<Decision, String> {
        Ok(decide(ev))
    }
}

export_rule!(GithubRouter);

/// Workflow run conclusions that need a person (or the guardian agent).
const FAILED_CONCLUSIONS: [&str; 3] = ["failure", "timed_out", "startup_failure"];

/// Route one GitHub event (kind = the `X-GitHub-Event` header value).
pub fn decide(ev: &impl EventView) -> Decision {
    let kind = ev.kind();
    let action = ev.action();
    let action = action.as_deref().unwrap_or("");
    match (kind.as_str(), action) {
        ("issues", "labeled") => labeled(ev),
        ("issues", "opened" | "assigned" | "closed") => issue(ev, action),
        ("issue_comment" | "pull_request_review_comment", "created") => comment_command(ev, &kind),
        ("pull_request", "opened" | "ready_for_review" | "review_requested") => review(ev, action),
        ("pull_request", "closed") => pull_request_closed(ev),
        ("push", _) => push(ev),
        ("workflow_run", "completed") => workflow_run_completed(ev),
        _ => Decision::ignore(format!("no route for {}", describe(&kind, action))),
    }
}

fn describe(kind: &str, action: &str) -> String {
    if action.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}.{action}")
    }
}

fn agent(key: &str, default: &str) -> String {
    config::get_or(key, default)
}

fn repo(ev: &impl EventView) -> String {
    ev.str("/repository/full_name")
        .unwrap_or_else(|| "an unknown repository".to_owned())
}

/// `route` with the ordering key `owner/repo#number`, so one issue's or pull
/// request's events reach the agent one at a time, in order. Left without a
/// key when the repository or number is missing, or the key would be over
/// the host's limit.
fn in_order(route: Route, ev: &impl EventView, number: i64) -> Route {
    match ev.str("/repository/full_name") {
        Some(repo) if number > 0 => {
            let key = format!("{repo}#{number}");
            if key.len() <= sluice_rule::limits::MAX_ORDERING_KEY {
                route.ordering_key(key)
            } else {
                route
            }
        }
        _ => route,
    }
}

fn issue(ev: &impl EventView, action: &str) -> Decision {
    let number = ev.int("/issue/number").unwrap_or_default();
    let priority = if action == "closed" {
        Priority::Medium
    } else {
        Priority::High
    };
    let mut route = Route::to(agent("triage_agent", "issue-triage"))
        .priority(priority)
        .reason(format!("issue #{number} {action} in {}", repo(ev)))
        .label_kv("trigger", action);
    if action == "assigned"
        && let Some(assignee) = ev.str("/assignee/login")
    {
        route = route.label_kv("assignee", &assignee);
    }
    in_order(route, ev, number).into()
}

fn labeled(ev: &impl EventView) -> Decision {
    let wanted = config::get_or("execute_label", "agent-execute");
    let label = ev.str("/label/name").unwrap_or_default();
    if !label.eq_ignore_ascii_case(&wanted) {
        return Decision::ignore(format!("issues.labeled with {label:?}, not {wanted:?}"));
    }
    let number = ev.int("/issue/number").unwrap_or_default();
    let route = Route::to(agent("coordinator_agent", "coordinator"))
        .priority(Priority::Critical)
        .reason(format!("issue #{number} in {} labeled {label}", repo(ev)))
        .label_kv("label", &label);
    in_order(route, ev, number).into()
}

fn comment_command(ev: &impl EventView, kind: &str) -> Decision {
    let prefix = config::get_or("command_prefix", "/agent");
    let body = ev.str("/comment/body").unwrap_or_default();
    let Some((command, args)) = parse_command(&body, &prefix) else {
        return Decision::ignore(format!("{kind}.created without a {prefix} command"));
    };
    if command.is_empty() {
        return Decision::ignore(format!("{kind}.created with an empty {prefix} command"));
    }
    let author = ev.str("/comment/user/login").unwrap_or_default();
    if ev.str("/comment/user/type").as_deref() == Some("Bot")
        && config::get("allow_bot_commands").as_deref() != Some("true")
    {
        return Decision::ignore(format!(
            "{prefix} {command} from bot {author} is not accepted"
        ));
    }
    let association = ev.str("/comment/author_association").unwrap_or_default();
    if !trusted(&association) {
        return Decision::ignore(format!(
            "{prefix} {command} from {author} ({association}) is not accepted"
        ));
    }
    let number = ev
        .int("/issue/number")
        .or_else(|| ev.int("/pull_request/number"))
        .unwrap_or_default();
    let mut route = Route::to(agent("coordinator_agent", "coordinator"))
        .priority(Priority::Critical)
        .reason(format!(
            "{prefix} {command} by {author} on #{number} in {}",
            repo(ev)
        ))
        .label_kv("command", &command);
    if !args.is_empty() {
        route = route.label_kv("args", args);
    }
    in_order(route, ev, number).into()
}

/// `(command, args)` when `body` starts with `prefix` as a whole word, outside
/// Markdown code: the first non-blank line, indented by at most three spaces
/// (four spaces or a tab make an indented code block; a fence, quote or
/// inline code does not start with the prefix at all). The command is
/// ASCII-lower-cased and the args trimmed.
pub fn parse_command<'a>(body: &'a str, prefix: &str) -> Option<(String, &'a str)> {
    let line = body.lines().find(|l| !l.trim().is_empty())?;
    let unindented = line.trim_start_matches(' ');
    if line.len() - unindented.len() > 3 || unindented.starts_with('\t') {
        return None;
    }
    let rest = unindented.strip_prefix(prefix)?;
    if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        return None; // `/agents`, `/agent-x`: another command
    }
    let rest = rest.trim();
    let (command, args) = match rest.split_once(char::is_whitespace) {
        Some((command, args)) => (command, args.trim()),
        None => (rest, ""),
    };
    Some((command.to_ascii_lowercase(), args))
}

fn trusted(association: &str) -> bool {
    let allowed = config::get_or("command_associations", "OWNER,MEMBER,COLLABORATOR");
    allowed.trim() == "*"
        || allowed
            .split(',')
            .any(|a| a.trim().eq_ignore_ascii_case(association))
}

fn review(ev: &impl EventView, action: &str) -> Decision {
    let number = ev.int("/pull_request/number").unwrap_or_default();
    if action != "ready_for_review" && ev.bool("/pull_request/draft") == Some(true) {
        return Decision::ignore(format!(
            "pull_request.{action}: #{number} is a draft; review starts at ready_for_review"
        ));
    }
    let mut route = Route::to(agent("review_agent", "review-agent"))
        .priority(Priority::High)
        .reason(format!("pull request #{number} {action} in {}", repo(ev)))
        .label_kv("trigger", action);
    if action == "review_requested" {
        let reviewer = ev
            .str("/requested_reviewer/login")
            .or_else(|| ev.str("/requested_team/slug"));
        if let Some(reviewer) = reviewer {
            route = route.label_kv("reviewer", &reviewer);
        }
    }
    in_order(route, ev, number).into()
}

fn pull_request_closed(ev: &impl EventView) -> Decision {
    let number = ev.int("/pull_request/number").unwrap_or_default();
    if ev.bool("/pull_request/merged") != Some(true) {
        return Decision::ignore(format!(
            "pull_request.closed: #{number} closed without merging"
        ));
    }
    let base = ev.str("/pull_request/base/ref").unwrap_or_default();
    let mut route = Route::to(agent("deployment_agent", "deployment"))
        .priority(Priority::Medium)
        .reason(format!(
            "pull request #{number} merged into {base} in {}",
            repo(ev)
        ))
        .label("trigger:merge")
        .label_kv("ref", &base);
    if let Some(sha) = ev.str("/pull_request/merge_commit_sha") {
        route = route.label_kv("sha", &sha);
    }
    route.into()
}

fn push(ev: &impl EventView) -> Decision {
    let git_ref = ev.str("/ref").unwrap_or_default();
    let Some(default_branch) = ev.str("/repository/default_branch") else {
        return Decision::ignore("push: payload has no repository.default_branch");
    };
    let Some(branch) = git_ref
        .strip_prefix("refs/heads/")
        .filter(|b| *b == default_branch)
    else {
        return Decision::ignore(format!(
            "push to {git_ref}, not the default branch {default_branch}"
        ));
    };
    if ev.bool("/deleted") == Some(true) {
        return Decision::ignore(format!("push deleting {git_ref}"));
    }
    let mut route = Route::to(agent("deployment_agent", "deployment"))
        .priority(Priority::Medium)
        .reason(format!("push to {branch} in {}", repo(ev)))
        .label("trigger:push")
        .label_kv("ref", branch);
    if let Some(sha) = ev.str("/after") {
        route = route.label_kv("sha", &sha);
    }
    route.into()
}

fn workflow_run_completed(ev: &impl EventView) -> Decision {
    let conclusion = ev.str("/workflow_run/conclusion").unwrap_or_default();
    let name = ev
        .str("/workflow_run/name")
        .filter(|n| !n.is_empty())
        .or_else(|| ev.str("/workflow_run/path"))
        .unwrap_or_default();
    if !FAILED_CONCLUSIONS.contains(&conclusion.as_str()) {
        return Decision::ignore(format!(
            "workflow_run.completed: {name} concluded {conclusion:?}"
        ));
    }
    let mut route = Route::to(agent("escalation_agent", "guardian"))
        .priority(Priority::High)
        .reason(format!("workflow {name} {conclusion} in {}", repo(ev)))
        .label_kv("conclusion", &conclusion)
        .label_kv("workflow", &name);
    if let Some(branch) = ev.str("/workflow_run/head_branch") {
        route = route.label_kv("branch", &branch);
    }
    route.into()
}

#[cfg(test)]
mod tests;
