//! Property tests for verification and normalisation: no input panics, a
//! signature verifies exactly when it was made with a configured key over
//! exactly these bytes, and whatever normalises has sane names.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use sluice::event::Provider;
use sluice::ingress::normalize::{Naming, normalize};
use sluice::ingress::verify::{Github, Slack, StandardWebhooks, Stripe, Verifier};
use sluice::secret::Secret;

fn headers(pairs: &[(String, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
    h
}

fn header_strategy() -> impl Strategy<Value = Vec<(String, String)>> {
    let names = prop::sample::select(vec![
        "x-hub-signature-256",
        "x-github-event",
        "x-github-delivery",
        "x-gitlab-event",
        "x-gitlab-token",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "stripe-signature",
        "x-slack-signature",
        "x-slack-request-timestamp",
        "linear-signature",
        "content-type",
        "idempotency-key",
        "linear-event",
        "linear-delivery",
        "x-hub-signature",
        "svix-signature",
    ]);
    // Values reach past the 256-byte bound on names half of the time.
    prop::collection::vec((names.prop_map(str::to_string), "[ -~]{0,400}"), 0..8)
}

fn verifiers() -> Vec<Verifier> {
    let s = [Secret::new(b"k1".to_vec()), Secret::new(b"k2".to_vec())];
    let w = [Secret::new(
        b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_vec(),
    )];
    vec![
        Verifier::Github(Github::new(&s)),
        Verifier::Standard(StandardWebhooks::new(&w, Duration::from_secs(300)).unwrap()),
        Verifier::Stripe(Stripe::new(&s, Duration::from_secs(300))),
        Verifier::Slack(Slack::new(&s, Duration::from_secs(300))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_requests_never_verify_and_never_panic(hs in header_strategy(), body in prop::collection::vec(any::<u8>(), 0..512)) {
        for v in verifiers() {
            prop_assert!(v.verify_at(headers(&hs), Bytes::from(body.clone()), 1_700_000_000).is_err());
        }
    }

    #[test]
    fn github_signature_holds_for_exact_bytes_only(body in prop::collection::vec(any::<u8>(), 1..2048), flip in any::<prop::sample::Index>(), key in 0usize..3) {
        let keys = [Secret::new(b"k1".to_vec()), Secret::new(b"k2".to_vec())];
        let v = Github::new(&keys);
        let signer = Github::new(&[Secret::new(if key == 2 { b"k3".to_vec() } else { format!("k{}", key + 1).into_bytes() })]);
        let (_, sig) = signer.sign(&body);
        let verifier = Verifier::Github(v);
        let h = headers(&[("x-hub-signature-256".into(), sig)]);
        prop_assert_eq!(verifier.verify_at(h.clone(), Bytes::from(body.clone()), 0).is_ok(), key < 2);
        let mut changed = body.clone();
        let i = flip.index(changed.len());
        changed[i] ^= 0x80;
        prop_assert!(verifier.verify_at(h, Bytes::from(changed), 0).is_err());
    }

    #[test]
    fn standard_signature_holds_within_window_only(body in prop::collection::vec(any::<u8>(), 0..1024), id in "[a-zA-Z0-9_]{1,40}", skew in -1000i64..1000) {
        let w = [Secret::new(b"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".to_vec())];
        let s = StandardWebhooks::new(&w, Duration::from_secs(300)).unwrap();
        let ts = 1_700_000_000;
        let h: Vec<(String, String)> = s.sign(&id, ts, &body).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let v = Verifier::Standard(s);
        prop_assert_eq!(v.verify_at(headers(&h), Bytes::from(body.clone()), ts + skew).is_ok(), skew.abs() <= 300);
    }

    #[test]
    fn normalisation_never_panics_and_names_stay_bounded(
        hs in header_strategy(),
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            "\\{\"action\":\"[a-z]{0,300}\",\"type\":\"[a-z.]{0,400}\",\"id\":\"[a-z]{0,300}\",\"object_attributes\":\\{\"action\":\"[a-z]{0,10}\"\\}\\}".prop_map(String::into_bytes),
        ],
        p in prop::sample::select(Provider::ALL.to_vec()),
    ) {
        let verified = Verifier::None.verify_at(headers(&hs), Bytes::from(body), 0).unwrap();
        if let Ok(ev) = normalize("src", p, &Naming::default(), verified, 0) {
            prop_assert!(!ev.kind().is_empty() && ev.kind().len() <= 256);
            prop_assert!(ev.action().is_none_or(|a| !a.is_empty() && a.len() <= 256));
            prop_assert!(!ev.delivery_id().is_empty() && ev.delivery_id().len() <= 256);
            prop_assert!(ev.headers().iter().all(|(k, _)| !sluice::ingress::verify::PROOF_HEADERS.contains(&k.as_str())));
        }
    }
}
