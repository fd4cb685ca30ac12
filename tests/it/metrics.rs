//! `/metrics`: outcomes counted by configured source with the right values,
//! request data never a label, and histogram upkeep that runs without scrapes.
//!
//! The recorder is global to the test process, so each test here counts on a
//! source name no other test uses and checks exact values on it alone.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use crate::support::{Env, Gateway, post};

/// A source only this file's tests post to.
const PROBE: &str = r#"
[sources.metrics-probe]
provider = "github"
secret = { file = "github.key" }
"#;

/// The value of the sample `series` (name with labels, as rendered), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_outcomes_by_configured_source_only() {
    let env = Env::new(PROBE);
    let gw = Gateway::start(env.config()).await;
    let signer = env.signer("metrics-probe");
    let fresh = || {
        signer
            .sign(
                "ping",
                &Bytes::from(format!(r#"{{"zen":"{}"}}"#, uuid::Uuid::new_v4())),
            )
            .unwrap()
    };
    let (a, b) = (fresh(), fresh());
    for s in [&a, &b] {
        assert_eq!(
            gw.post_signed("metrics-probe", s).await.0,
            StatusCode::ACCEPTED
        );
    }
    assert_eq!(gw.post_signed("metrics-probe", &a).await.0, StatusCode::OK);
    let unsigned = crate::support::with_header(&a, "x-hub-signature-256", None);
    for _ in 0..3 {
        assert_eq!(
            gw.post_signed("metrics-probe", &unsigned).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let (s, _) = post(
        &gw.client,
        &gw.url("/hooks/made-up-name"),
        &[],
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let text = gw.metrics().await;
    for (series, want) in [
        (
            r#"sluice_ingress_requests_total{source="metrics-probe",outcome="accepted"}"#,
            2.0,
        ),
        (
            r#"sluice_ingress_requests_total{source="metrics-probe",outcome="duplicate"}"#,
            1.0,
        ),
        (
            r#"sluice_verification_failures_total{source="metrics-probe",reason="missing_header"}"#,
            3.0,
        ),
        (
            r#"sluice_dedup_hits_total{source="metrics-probe",layer="cache"}"#,
            1.0,
        ),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series} in:\n{text}");
    }
    // Other tests share the process-wide recorder: at least this test's one.
    let unknown = r#"sluice_ingress_requests_total{source="unknown",outcome="unknown_source"}"#;
    assert!(value(&text, unknown).is_some_and(|v| v >= 1.0), "{text}");
    let appends =
        value(&text, "sluice_store_append_seconds_count").expect("append latency histogram");
    assert!(appends >= 2.0, "two appends at least were timed: {text}");
    // The gauge is process-wide (another test's scrape may set it): present.
    assert!(value(&text, "sluice_queue_depth").is_some(), "{text}");
    assert!(
        !text.contains("made-up-name"),
        "request data must not become a label"
    );
    gw.stop().await;
}

/// Histogram samples are folded into buckets by a timer, so a gateway that is
/// never scraped does not keep every sample it ever recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histogram_upkeep_runs_without_a_scrape() {
    let env = Env::new(PROBE);
    let gw = Gateway::start(env.config()).await;
    let before = sluice::metrics::upkeep_runs();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sluice::metrics::upkeep_runs() < before + 2 {
        assert!(
            Instant::now() < deadline,
            "upkeep did not run on its own within 30 s ({} runs)",
            sluice::metrics::upkeep_runs() - before
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await;
}
