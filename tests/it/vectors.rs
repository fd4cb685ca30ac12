//! The Standard Webhooks and GitHub documentation vectors, checked directly
//! against the verifiers at the vectors' own timestamps.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use sluice::ingress::verify::{Github, StandardWebhooks, Verifier, VerifyError};
use sluice::secret::Secret;

use crate::support::corpus;

fn vectors() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(corpus().join("standard-webhooks/vectors.json")).unwrap())
        .unwrap()
}

fn standard(secret: &str) -> Verifier {
    Verifier::Standard(
        StandardWebhooks::new(&[Secret::new(secret.as_bytes())], Duration::from_secs(300)).unwrap(),
    )
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

fn check(
    v: &Verifier,
    id: &str,
    ts: i64,
    sig: &str,
    payload: &str,
    now: i64,
) -> Result<(), VerifyError> {
    let h = headers(&[
        ("webhook-id", id),
        ("webhook-timestamp", &ts.to_string()),
        ("webhook-signature", sig),
    ]);
    v.verify_at(h, Bytes::from(payload.to_string()), now)
        .map(|_| ())
}

#[test]
fn standard_webhooks_sign_vectors_verify() {
    let doc = vectors();
    let vs = doc["sign_vectors"].as_array().unwrap();
    assert_eq!(vs.len(), 2);
    for vec in vs {
        let v = standard(vec["secret"].as_str().unwrap());
        let (id, ts) = (
            vec["msg_id"].as_str().unwrap(),
            vec["timestamp"].as_i64().unwrap(),
        );
        let (sig, payload) = (
            vec["webhook-signature"].as_str().unwrap(),
            vec["payload"].as_str().unwrap(),
        );
        check(&v, id, ts, sig, payload, ts).unwrap_or_else(|e| panic!("{}: {e}", vec["source"]));
        // Our signer produces exactly the published signature.
        let Verifier::Standard(s) = &v else {
            unreachable!()
        };
        let signed = s.sign(id, ts, payload.as_bytes());
        assert_eq!(signed[2].1, sig);
        // The same signature fails outside the tolerance window, both ways.
        assert_eq!(
            check(&v, id, ts, sig, payload, ts + 301),
            Err(VerifyError::Stale("webhook-timestamp"))
        );
        assert_eq!(
            check(&v, id, ts, sig, payload, ts - 301),
            Err(VerifyError::Stale("webhook-timestamp"))
        );
        // And for a different id or body.
        assert!(check(&v, "msg_other", ts, sig, payload, ts).is_err());
        assert!(check(&v, id, ts, sig, &format!("{payload} "), ts).is_err());
    }
}

#[test]
fn standard_webhooks_negative_vectors_fail() {
    let doc = vectors();
    let good = &doc["sign_vectors"][0];
    let rust = &doc["sign_vectors"][1];
    let negatives = doc["negative_vectors_from_tests"].as_array().unwrap();
    for (i, neg) in negatives.iter().enumerate() {
        let Some(sig) = neg["webhook-signature"].as_str() else {
            continue;
        };
        // The third negative is for the second vector's inputs.
        let vec = if i == 2 { rust } else { good };
        let v = standard(vec["secret"].as_str().unwrap());
        let ts = vec["timestamp"].as_i64().unwrap();
        let r = check(
            &v,
            vec["msg_id"].as_str().unwrap(),
            ts,
            sig,
            vec["payload"].as_str().unwrap(),
            ts,
        );
        assert!(r.is_err(), "{}: must fail", neg["what"]);
    }
}

#[test]
fn standard_webhooks_several_signatures_one_matching_passes() {
    let doc = vectors();
    let vec = &doc["sign_vectors"][0];
    let v = standard(vec["secret"].as_str().unwrap());
    let ts = vec["timestamp"].as_i64().unwrap();
    let real = vec["webhook-signature"].as_str().unwrap();
    let decoys = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let payload = vec["payload"].as_str().unwrap();
    let id = vec["msg_id"].as_str().unwrap();
    check(&v, id, ts, &format!("{decoys} {real}"), payload, ts).unwrap();
    check(&v, id, ts, &format!("{real} {decoys}"), payload, ts).unwrap();
    assert_eq!(
        check(&v, id, ts, decoys, payload, ts),
        Err(VerifyError::Mismatch("webhook-signature"))
    );
    // Only a v2 entry: no v1 to check at all.
    assert_eq!(
        check(
            &v,
            id,
            ts,
            "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            payload,
            ts
        ),
        Err(VerifyError::Malformed("webhook-signature"))
    );
}

#[test]
fn standard_webhooks_accepts_svix_header_aliases() {
    let doc = vectors();
    let vec = &doc["sign_vectors"][1];
    let v = standard(vec["secret"].as_str().unwrap());
    let ts = vec["timestamp"].as_i64().unwrap();
    let h = headers(&[
        ("svix-id", vec["msg_id"].as_str().unwrap()),
        ("svix-timestamp", &ts.to_string()),
        ("svix-signature", vec["webhook-signature"].as_str().unwrap()),
    ]);
    v.verify_at(
        h,
        Bytes::from(vec["payload"].as_str().unwrap().to_string()),
        ts,
    )
    .unwrap();
}

#[test]
fn github_documentation_vector() {
    let doc = vectors();
    let gh = &doc["github_docs_vector"];
    let v = Verifier::Github(Github::new(&[Secret::new(
        gh["secret"].as_str().unwrap().as_bytes(),
    )]));
    let sig = gh["X-Hub-Signature-256"].as_str().unwrap();
    let body = Bytes::from(gh["payload"].as_str().unwrap().to_string());
    v.verify_at(headers(&[("x-hub-signature-256", sig)]), body.clone(), 0)
        .unwrap();
    let Verifier::Github(g) = &v else {
        unreachable!()
    };
    assert_eq!(g.sign(&body).1, sig);
    // Upper-case hex is the same bytes; a missing prefix is malformed.
    let upper = format!(
        "sha256={}",
        sig.trim_start_matches("sha256=").to_uppercase()
    );
    v.verify_at(headers(&[("x-hub-signature-256", &upper)]), body.clone(), 0)
        .unwrap();
    assert_eq!(
        v.verify_at(
            headers(&[("x-hub-signature-256", sig.trim_start_matches("sha256="))]),
            body.clone(),
            0
        )
        .unwrap_err(),
        VerifyError::Malformed("X-Hub-Signature-256")
    );
    assert_eq!(
        v.verify_at(
            headers(&[("x-hub-signature-256", sig)]),
            Bytes::from_static(b"Hello, World?"),
            0
        )
        .unwrap_err(),
        VerifyError::Mismatch("X-Hub-Signature-256")
    );
}
