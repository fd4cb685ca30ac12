//! `sluice send`'s built-in samples: each one, routed by the shipped rules,
//! reaches exactly the agents its entry in `SAMPLES` names (so a sample that
//! drifts from the routing tables fails here), every agent the shipped rules
//! may route to has a sample, and `send --list` / an unknown `--event` say
//! which samples exist.

use std::collections::BTreeSet;
use std::path::Path;

use sluice::cli::route::route_file;
use sluice::cli::send::{SAMPLES, find_sample};
use sluice::event::Provider;

use crate::support::{Env, shipped_grants, sluice};

/// A config that loads the shipped `rules/` with the shipped approvals.
fn shipped_env() -> Env {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    Env::new(&format!(
        "\n[rules]\ndir = {:?}\ncache_dir = \"cache\"\n{}",
        shipped.display().to_string(),
        shipped_grants()
    ))
}

#[test]
fn every_builtin_sample_routes_to_the_agents_of_its_row() {
    let env = shipped_env();
    let config = env.config();
    let cache = config.rules.cache_dir(&config.base_dir, config.data_dir());
    let mut wrong = Vec::new();
    for s in SAMPLES {
        let file = env
            .dir
            .path()
            .join(format!("{}-{}.json", s.provider, s.name));
        std::fs::write(&file, s.body).unwrap();
        let run = route_file(
            &config.rules,
            &config.base_dir,
            &cache,
            s.provider.as_str(),
            s.provider,
            s.kind,
            None,
            &file,
        )
        .unwrap_or_else(|e| panic!("{} {}: {e:#}", s.provider, s.name));
        let agents: Vec<&str> = run
            .decision
            .routes
            .iter()
            .map(|r| r.agent.as_str())
            .collect();
        if agents != s.agents {
            wrong.push(format!(
                "{} {}: routed to {agents:?}, the table says {:?} ({:?})",
                s.provider, s.name, s.agents, run.decision.rules
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_samples_cover_every_agent_the_shipped_rules_route_to() {
    let config = shipped_env().config();
    for (rule, provider) in [
        ("github-router", Provider::Github),
        ("gitlab", Provider::Gitlab),
    ] {
        let approval = config.rules.grants.get(rule).expect("approved");
        let granted: BTreeSet<&str> = approval.agents.0.iter().map(String::as_str).collect();
        let sampled: BTreeSet<&str> = SAMPLES
            .iter()
            .filter(|s| s.provider == provider)
            .flat_map(|s| s.agents.iter().copied())
            .collect();
        assert_eq!(sampled, granted, "{rule}");
    }
    // Names are unique per provider, and every payload is a JSON object.
    let mut seen = BTreeSet::new();
    for s in SAMPLES {
        assert!(
            seen.insert((s.provider.as_str(), s.name)),
            "{} {}",
            s.provider,
            s.name
        );
        let doc: serde_json::Value = serde_json::from_str(s.body)
            .unwrap_or_else(|e| panic!("{} {}: {e}", s.provider, s.name));
        assert!(doc.is_object(), "{} {}", s.provider, s.name);
    }
}

#[test]
fn samples_are_found_by_name_or_unambiguous_kind() {
    let s = find_sample(Provider::Github, "issues.opened").unwrap();
    assert_eq!((s.kind, s.agents), ("issues", &["issue-triage"][..]));
    assert_eq!(
        find_sample(Provider::Gitlab, "Tag Push Hook").unwrap().name,
        "tag_push"
    );
    // `issues` is the header of several samples: it names none of them.
    let err = format!("{:#}", find_sample(Provider::Github, "issues").unwrap_err());
    assert!(
        err.contains("issues.opened") && err.contains("workflow_run.completed"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        find_sample(Provider::Stripe, "invoice.paid").unwrap_err()
    );
    assert!(err.contains("no built-in stripe samples"), "{err}");
}

#[test]
fn send_lists_the_samples_and_names_them_on_an_unknown_event() {
    let list = sluice(&["send", "--list"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let out = String::from_utf8_lossy(&list.stdout);
    assert_eq!(out.lines().count(), SAMPLES.len(), "{out}");
    for line in [
        "github issues.opened → issue-triage",
        "github workflow_run.completed → guardian",
        "gitlab push.release → ci-validation, release-manager",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} not in\n{out}");
    }

    let env = Env::new("");
    let path = env.config_path.to_str().unwrap();
    let bad = sluice(&[
        "send", "--config", path, "--source", "gitlab", "--event", "nope",
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("\"nope\"") && err.contains("tag_push") && err.contains("confidential_note"),
        "{err}"
    );
    assert!(!err.contains("issues.opened"), "{err}");
}
