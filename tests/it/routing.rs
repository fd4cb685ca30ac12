//! End to end: signed corpus deliveries over loopback HTTP into `serve` with
//! the shipped rules; the router workers route what intake stored, and the
//! decisions are read back from the store, live and after shutdown.

use std::path::Path;

use bytes::Bytes;
use http::StatusCode;
use sluice::decision::{Priority, RuleOutcome};
use sluice::event::EventStatus;
use sluice::rules::breaker::BreakerState;
use sluice::rules::output;
use sluice::store::{SqliteStore, Store};

use crate::support::{Env, RoutingGateway, client, corpus, post, post_accepted, until_status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_deliveries_are_routed_by_the_shipped_rules() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let env = Env::new(&format!(
        "\n[rules]\ndir = {:?}\ncache_dir = \"cache\"\n{}",
        shipped.display().to_string(),
        crate::support::shipped_grants()
    ));
    let config = env.config();
    let cache = config.rules.cache_dir(&config.base_dir, config.data_dir());
    assert!(cache.starts_with(env.dir.path()), "{}", cache.display());
    let gw = RoutingGateway::start(config).await;
    let versions: Vec<(String, String)> = gw
        .rules
        .load()
        .rules()
        .map(|r| (r.name().to_string(), r.version().to_string()))
        .collect();
    assert_eq!(
        versions.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        vec!["github-router", "gitlab"]
    );
    let store = gw.store.clone();

    // (source, kind, corpus file, the rule that answers, the merged routes)
    let cases = [
        (
            "github",
            "issues",
            "github/issues/opened.payload.json",
            "github-router",
            vec![("issue-triage", Priority::High)],
        ),
        (
            "github",
            "pull_request",
            "github/pull_request/ready_for_review.payload.json",
            "github-router",
            vec![("review-agent", Priority::High)],
        ),
        (
            "gitlab",
            "Tag Push Hook",
            "gitlab/webhooks/tag_push.json",
            "gitlab",
            vec![("release-manager", Priority::High)],
        ),
        (
            "gitlab",
            "Push Hook",
            "gitlab/webhooks/push.json",
            "gitlab",
            vec![("ci-validation", Priority::Medium)],
        ),
    ];
    let http = client();
    let mut ids = Vec::new();
    for (source, kind, file, _, _) in &cases {
        let body = Bytes::from(std::fs::read(corpus().join(file)).expect("corpus payload"));
        let signed = env.signer(source).sign(kind, &body).expect("sign");
        let (status, resp) = post(
            &http,
            &format!("{}/hooks/{source}", gw.base),
            &signed.headers,
            signed.body.clone(),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{file}: {resp}");
        ids.push(
            resp["id"]
                .as_str()
                .expect("the 202 names the event")
                .to_string(),
        );
    }

    let mut decided = Vec::new();
    for (id, (_, kind, file, answering, want)) in ids.iter().zip(&cases) {
        let rec = until_status(&*store, id, EventStatus::Routed).await;
        assert_eq!(&rec.event.kind, kind);
        assert_eq!(rec.summary.attempts, 1, "{file}");
        assert_eq!(rec.last_error, None, "{file}");
        let d = rec.decision.expect("a routed event has a decision");
        let routes: Vec<_> = d
            .routes
            .iter()
            .map(|r| (r.agent.as_str(), r.priority))
            .collect();
        assert_eq!(&routes, want, "{file}: {d:#?}");
        let recorded: Vec<_> = d
            .rules
            .iter()
            .map(|r| (r.rule.clone(), r.version.clone()))
            .collect();
        assert_eq!(recorded, versions, "{file}: every loaded rule, by version");
        for r in &d.rules {
            assert!(
                r.version.len() == 16 && r.version.bytes().all(|b| b.is_ascii_hexdigit()),
                "{file}: {} version {:?}",
                r.rule,
                r.version
            );
            if r.rule == *answering {
                assert!(
                    matches!(r.outcome, RuleOutcome::Verdict(_)) && r.duration_us > 0,
                    "{file}: {r:?}"
                );
            } else {
                assert_eq!(r.outcome, RuleOutcome::Skipped, "{file}");
                assert_eq!(r.duration_us, 0, "{file}: a skipped rule does not run");
            }
        }
        decided.push(d);
    }

    gw.stop().await;
    drop(store);

    // What the workers decided is on disk once `serve` has closed the store.
    let reopened = SqliteStore::open(&env.db(), 64).expect("reopen the store");
    for (id, d) in ids.iter().zip(&decided) {
        let rec = reopened.get(id).await.expect("get").expect("stored");
        assert_eq!(rec.summary.status, EventStatus::Routed);
        assert_eq!(rec.decision.as_ref(), Some(d));
    }
}

/// `/agent` and 300 characters, several times, through `serve` and the shipped
/// component: each event keeps its coordinator route (the SDK clamps the
/// labels and reason to the host's limits instead of the host failing the
/// whole answer), and the rule's breaker never opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_agent_commands_keep_their_routes_and_the_breaker_closed() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let env = Env::new(&format!(
        "\n[rules]\ndir = {:?}\ncache_dir = \"cache\"\n{}",
        shipped.display().to_string(),
        crate::support::shipped_grants()
    ));
    let config = env.config();
    let threshold = config.rules.breaker.failures as usize;
    let gw = RoutingGateway::start(config).await;

    let mut payload: serde_json::Value = serde_json::from_slice(
        &std::fs::read(corpus().join("github/issue_comment/created.payload.json")).unwrap(),
    )
    .unwrap();
    let http = client();
    let signer = env.signer("github");
    let mut ids = Vec::new();
    // Twice the breaker's threshold, so an answer the host refused would open it.
    for i in 0..2 * threshold {
        payload["comment"]["body"] = match i % 2 {
            0 => format!("/agent fix {i} {}", "x".repeat(300)),
            _ => format!("/agent {} {i}", "é".repeat(300)),
        }
        .into();
        let body = Bytes::from(serde_json::to_vec(&payload).unwrap());
        let signed = signer.sign("issue_comment", &body).expect("sign");
        ids.push(post_accepted(&http, &gw.base, "github", &signed).await);
    }
    for id in &ids {
        let rec = until_status(&*gw.store, id, EventStatus::Routed).await;
        let d = rec.decision.expect("a routed event has a decision");
        let rule = d.rules.iter().find(|r| r.rule == "github-router").unwrap();
        assert!(
            matches!(rule.outcome, RuleOutcome::Verdict(_)),
            "{id}: {:?}",
            rule.outcome
        );
        let routes: Vec<_> = d
            .routes
            .iter()
            .map(|r| (r.agent.as_str(), r.priority))
            .collect();
        assert_eq!(routes, vec![("coordinator", Priority::Critical)], "{id}");
        let route = &d.routes[0];
        assert!(route.labels.iter().any(|l| l.starts_with("command:")));
        for l in &route.labels {
            assert!(l.len() <= output::MAX_LABEL, "{} bytes: {l}", l.len());
        }
    }
    assert_eq!(
        gw.rules.load().breaker_state("github-router"),
        Some(BreakerState::Closed)
    );
    gw.stop().await;
}
