//! The delivery envelope and its signature: signatures are checked with the
//! reference Standard Webhooks implementation (`standardwebhooks`), never
//! with sluice's own verifier, so a shared mistake cannot pass unseen.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::json;
use sluice::decision::{Priority, Route};
use sluice::dispatch::envelope::{self, Envelope, SignError, Signer, idempotency_key};
use sluice::event::{Event, Provider};
use sluice::secret::Secret;
use standardwebhooks::{Webhook, WebhookError};

use crate::support::corpus;

const KEY_A: [u8; 32] = [7; 32];
const KEY_B: [u8; 24] = [0xa5; 24];

fn whsec(key: &[u8]) -> String {
    format!("whsec_{}", B64.encode(key))
}

fn secrets() -> Vec<Secret> {
    vec![
        Secret::new(whsec(&KEY_A).into_bytes()),
        Secret::new(whsec(&KEY_B).into_bytes()),
    ]
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn route(agent: &str, workflow: Option<&str>) -> Route {
    Route {
        agent: agent.into(),
        workflow: workflow.map(Into::into),
        priority: Priority::High,
        reason: "new issue".into(),
        labels: vec!["repo:hello-world".into()],
        ordering_key: None,
        payload: None,
    }
}

fn issue_opened() -> (Event, Bytes) {
    let path = corpus().join("github/issues/opened.payload.json");
    let body = Bytes::from(std::fs::read(&path).expect("corpus payload"));
    let mut ev = Event::dry_run("github", Provider::Github, "issues", None, body.clone());
    ev.id = "evt_0190d5a2-7c1e-7000-8000-000000000001".into();
    ev.delivery_id = "72d3162e-cc78-11e3-81ab-4c9367dc0958".into();
    ev.received_at_ms = 1_767_225_600_123;
    (ev, body)
}

fn header_map(headers: &[(&'static str, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.insert(
            HeaderName::from_static(k),
            HeaderValue::from_str(v).expect("visible ASCII"),
        );
    }
    map
}

fn with_header(headers: &HeaderMap, name: &'static str, value: String) -> HeaderMap {
    let mut map = headers.clone();
    map.insert(name, HeaderValue::from_str(&value).unwrap());
    map
}

#[test]
fn envelope_json_has_the_documented_shape() {
    let (ev, body) = issue_opened();
    let r = route("triage", Some("label-issue"));
    let doc: serde_json::Value =
        serde_json::from_slice(&Envelope::new(&ev, &r, 2, Some("classify")).to_body()).unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let expected = json!({
        "event": {
            "id": "evt_0190d5a2-7c1e-7000-8000-000000000001",
            "source": "github",
            "provider": "github",
            "kind": "issues",
            "action": "opened",
            "delivery_id": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
            "received_at_ms": 1_767_225_600_123_i64,
            "payload": payload,
        },
        "route": {
            "agent": "triage",
            "workflow": "label-issue",
            "priority": "high",
            "reason": "new issue",
            "labels": ["repo:hello-world"],
        },
        "attempt": 2,
        "step": "classify",
    });
    assert_eq!(doc, expected);

    // A plain agent route: no `step`, no `workflow`.
    let plain = route("triage", None);
    let doc: serde_json::Value =
        serde_json::from_slice(&Envelope::new(&ev, &plain, 1, None).to_body()).unwrap();
    let top: Vec<&str> = doc
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(top, ["attempt", "event", "route"]);
    assert!(doc["route"].get("workflow").is_none());
}

#[test]
fn payload_is_embedded_verbatim_and_non_json_goes_as_a_string() {
    let (ev, body) = issue_opened();
    let r = route("triage", None);
    let out = Envelope::new(&ev, &r, 1, None).to_body();
    let raw = std::str::from_utf8(&body).unwrap().trim();
    assert!(
        std::str::from_utf8(&out).unwrap().contains(raw),
        "the stored JSON body is embedded as is"
    );

    let mut text = ev.clone();
    text.body = Bytes::from_static(b"payload=not json\xff");
    let doc: serde_json::Value =
        serde_json::from_slice(&Envelope::new(&text, &r, 1, None).to_body()).unwrap();
    assert_eq!(doc["event"]["payload"], json!("payload=not json\u{fffd}"));
}

#[test]
fn every_secret_verifies_alone_with_the_reference_library() {
    let (ev, _) = issue_opened();
    let r = route("triage", None);
    let env = Envelope::new(&ev, &r, 1, None);
    let body = env.to_body();
    let id = env.idempotency_key();
    let ts = now();
    let headers = envelope::sign(&body, &id, ts, &secrets()).unwrap();
    let names: Vec<&str> = headers.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        names,
        ["webhook-id", "webhook-timestamp", "webhook-signature"]
    );
    let map = header_map(&headers);
    assert_eq!(map["webhook-id"], id.as_str());
    assert_eq!(map["webhook-timestamp"], ts.to_string().as_str());
    let sig = map["webhook-signature"].to_str().unwrap();
    assert_eq!(sig.split(' ').count(), 2, "one entry per secret: {sig}");
    assert!(sig.split(' ').all(|e| e.starts_with("v1,")));

    for key in [&KEY_A[..], &KEY_B[..]] {
        let wh = Webhook::new(&whsec(key)).unwrap();
        wh.verify(&body, &map)
            .expect("verifies with one secret alone");
        // The reference signer produces exactly one of the entries.
        let own = wh.sign(&id, ts, &body).unwrap();
        assert!(sig.split(' ').any(|e| e == own), "{own} in {sig}");
    }
    // A secret that was never configured does not verify.
    let other = Webhook::new(&whsec(&[1; 32])).unwrap();
    assert!(matches!(
        other.verify(&body, &map),
        Err(WebhookError::InvalidSignature)
    ));
}

#[test]
fn tampering_fails_reference_verification() {
    let (ev, _) = issue_opened();
    let r = route("triage", None);
    let env = Envelope::new(&ev, &r, 1, None);
    let body = env.to_body();
    let id = env.idempotency_key();
    let ts = now();
    let signer = Signer::new(&secrets()).unwrap();
    let map = header_map(&signer.sign(&body, &id, ts));

    let mut tampered_body = body.clone();
    let at = tampered_body.iter().position(|&b| b == b'1').unwrap();
    tampered_body[at] = b'2';
    // Within the reference's 5-minute tolerance, so only the MAC can refuse it.
    let later = with_header(&map, "webhook-timestamp", (ts + 1).to_string());
    let other_id = with_header(&map, "webhook-id", format!("{id}0"));

    for key in [&KEY_A[..], &KEY_B[..]] {
        let wh = Webhook::new(&whsec(key)).unwrap();
        wh.verify(&body, &map).expect("untampered verifies");
        for (what, b, h) in [
            ("body", &tampered_body, &map),
            ("timestamp", &body, &later),
            ("id", &body, &other_id),
        ] {
            assert!(
                matches!(wh.verify(b, h), Err(WebhookError::InvalidSignature)),
                "a tampered {what} must not verify"
            );
        }
    }
}

#[test]
fn idempotency_key_is_per_event_route_and_step_not_per_attempt() {
    let (ev, _) = issue_opened();
    let r = route("triage", Some("label-issue"));
    let keys: Vec<String> = (1..=3)
        .map(|attempt| Envelope::new(&ev, &r, attempt, Some("classify")).idempotency_key())
        .collect();
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    let key = &keys[0];
    assert_eq!(key, &idempotency_key(&ev.id, &r, Some("classify")));
    assert!(key.starts_with("msg_") && key.len() == 4 + 32, "{key}");
    assert!(key[4..].bytes().all(|b| b.is_ascii_hexdigit()));

    // Priority, reason and labels do not name the route.
    let mut reworded = r.clone();
    reworded.priority = Priority::Low;
    reworded.reason = "other".into();
    reworded.labels.clear();
    assert_eq!(key, &idempotency_key(&ev.id, &reworded, Some("classify")));

    let differs = [
        idempotency_key("evt_other", &r, Some("classify")),
        idempotency_key(
            &ev.id,
            &route("reviewer", Some("label-issue")),
            Some("classify"),
        ),
        idempotency_key(&ev.id, &route("triage", Some("other")), Some("classify")),
        idempotency_key(&ev.id, &route("triage", None), Some("classify")),
        idempotency_key(&ev.id, &r, Some("summarise")),
        idempotency_key(&ev.id, &r, None),
        // Length prefixes keep field boundaries apart.
        idempotency_key(&ev.id, &route("triagelabel-issue", None), Some("classify")),
        idempotency_key(&ev.id, &route("triage", Some("")), Some("classify")),
    ];
    for (i, k) in differs.iter().enumerate() {
        assert_ne!(k, key, "variant {i}");
        for other in &differs[i + 1..] {
            assert_ne!(k, other);
        }
    }
}

#[test]
fn bad_secrets_are_refused_without_showing_them() {
    assert_eq!(Signer::new(&[]).unwrap_err(), SignError::NoSecret);
    let bad = Secret::new(b"whsec_not*base64!".to_vec());
    let err = Signer::new(&[secrets()[0].clone(), bad]).unwrap_err();
    assert_eq!(err, SignError::BadKey(1));
    assert!(!err.to_string().contains("not*base64"), "{err}");
    let many = vec![secrets()[0].clone(); 17];
    assert_eq!(Signer::new(&many).unwrap_err(), SignError::TooMany(17));

    let signer = Signer::new(&secrets()).unwrap();
    let debug = format!("{signer:?}");
    assert!(!debug.contains(&B64.encode(KEY_A)), "{debug}");
    assert!(!debug.contains(&B64.encode(KEY_B)), "{debug}");
}
