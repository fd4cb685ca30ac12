//! Every GitHub and GitLab corpus payload, pretty and compact, is accepted when
//! signed right and refused when the signature, token, timestamp or one body
//! byte is wrong, or the header is missing.

use bytes::Bytes;
use http::StatusCode;
use sluice::event::EventStatus;
use sluice::ingress::verify::Verifier;
use sluice::store::ListFilter;
use sluice::store::sqlite::{SqliteStore, list_summaries};

use crate::support::{
    Env, Gateway, compact, github_payloads, gitlab_payloads, header, stored_events,
    with_flipped_byte, with_header,
};

fn unauthorized(status: StatusCode, body: &serde_json::Value, what: &str) {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
    assert!(
        body["reason"].is_string() && body["header"].is_string(),
        "{what}: 401 names a reason and header: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_corpus_accepted_when_signed_and_refused_otherwise() {
    let env = Env::new("");
    let gw = Gateway::start(env.config()).await;
    let signer = env.signer("github");
    let payloads = github_payloads();
    assert!(
        payloads.len() > 90,
        "the corpus has ~100 GitHub payloads, found {}",
        payloads.len()
    );
    let mut accepted = 0;
    for (kind, file) in &payloads {
        let raw = Bytes::from(std::fs::read(file).expect("payload"));
        for body in [raw.clone(), compact(&raw)] {
            let what = format!("{} ({kind}, {} bytes)", file.display(), body.len());
            let signed = signer.sign(kind, &body).expect("sign");
            let (status, resp) = gw.post_signed("github", &signed).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{what}: {resp}");
            assert!(
                resp["id"].as_str().is_some_and(|id| id.starts_with("evt_")),
                "{what}: {resp}"
            );
            accepted += 1;

            // A fresh delivery for each refusal, so dedup can't be what refuses it.
            let fresh = signer.sign(kind, &body).expect("sign");
            let sig = header(&fresh, "x-hub-signature-256");
            let mut wrong = sig.into_bytes();
            let last = wrong.len() - 1;
            wrong[last] = if wrong[last] == b'0' { b'1' } else { b'0' };
            let (s, b) = gw
                .post_signed(
                    "github",
                    &with_header(
                        &fresh,
                        "x-hub-signature-256",
                        Some(std::str::from_utf8(&wrong).unwrap()),
                    ),
                )
                .await;
            unauthorized(s, &b, &format!("{what}: wrong signature"));
            let (s, b) = gw
                .post_signed("github", &with_flipped_byte(&fresh, body.len() / 2))
                .await;
            unauthorized(s, &b, &format!("{what}: one body byte changed"));
            let (s, b) = gw
                .post_signed("github", &with_header(&fresh, "x-hub-signature-256", None))
                .await;
            unauthorized(s, &b, &format!("{what}: header missing"));
            assert_eq!(b["reason"], "missing_header");
        }
    }
    gw.stop().await;

    // What was acknowledged is what is stored, normalised from the headers.
    let rows = stored_events(&env);
    assert_eq!(rows.len(), accepted);
    assert!(
        rows.iter()
            .all(|r| r.status == EventStatus::Pending && r.provider == "github")
    );
    let opened = rows
        .iter()
        .filter(|r| r.kind == "issues" && r.action.as_deref() == Some("opened"))
        .count();
    assert!(opened >= 2, "issues/opened normalised to kind+action");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_secret_rotation_accepts_either_secret() {
    let env = Env::new("");
    let gw = Gateway::start(env.config()).await;
    let body = Bytes::from_static(br#"{"zen":"rotate","hook_id":7}"#);
    // Sign with the old secret only: a config naming just it signs for us.
    std::fs::copy(
        env.dir.path().join("github-old.key"),
        env.dir.path().join("github.key"),
    )
    .unwrap();
    let old = env.signer("github").sign("ping", &body).unwrap();
    let (s, b) = gw.post_signed("github", &old).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_corpus_accepted_with_token_and_signing_token() {
    let env = Env::new("");
    let gw = Gateway::start(env.config()).await;
    let token = env.signer("gitlab");
    let signing = env.signer("gitlab-signed");
    let both = env.signer("gitlab-both");
    let payloads = gitlab_payloads();
    assert!(payloads.len() >= 15);
    for (kind, file) in &payloads {
        let raw = Bytes::from(std::fs::read(file).expect("payload"));
        for body in [raw.clone(), compact(&raw)] {
            let what = format!("{} ({kind})", file.display());

            // The secret token.
            let ok = token.sign(kind, &body).unwrap();
            let (s, b) = gw.post_signed("gitlab", &ok).await;
            assert_eq!(s, StatusCode::ACCEPTED, "{what}: {b}");
            let bad = token.sign(kind, &body).unwrap();
            let (s, b) = gw
                .post_signed(
                    "gitlab",
                    &with_header(&bad, "x-gitlab-token", Some("glpat-like-token-valuf")),
                )
                .await;
            unauthorized(s, &b, &format!("{what}: wrong token"));
            let (s, b) = gw
                .post_signed("gitlab", &with_header(&bad, "x-gitlab-token", None))
                .await;
            unauthorized(s, &b, &format!("{what}: token missing"));

            // The signing token (Standard Webhooks over the raw body).
            let ok = signing.sign(kind, &body).unwrap();
            assert_eq!(header(&ok, "webhook-id"), header(&ok, "idempotency-key"));
            let (s, b) = gw.post_signed("gitlab-signed", &ok).await;
            assert_eq!(s, StatusCode::ACCEPTED, "{what}: {b}");
            let fresh = signing.sign(kind, &body).unwrap();
            let (s, b) = gw
                .post_signed("gitlab-signed", &with_flipped_byte(&fresh, 10))
                .await;
            unauthorized(s, &b, &format!("{what}: body byte changed"));
            let old_ts = (sluice::ingress::verify::unix_now() - 3600).to_string();
            let (s, b) = gw
                .post_signed(
                    "gitlab-signed",
                    &with_header(&fresh, "webhook-timestamp", Some(&old_ts)),
                )
                .await;
            unauthorized(s, &b, &format!("{what}: stale timestamp"));
            assert_eq!(b["reason"], "stale_timestamp");
            let (s, b) = gw
                .post_signed(
                    "gitlab-signed",
                    &with_header(&fresh, "webhook-signature", None),
                )
                .await;
            unauthorized(s, &b, &format!("{what}: signature missing"));
            // A token alone does not satisfy a source that requires the signature.
            let (s, b) = gw
                .post_signed(
                    "gitlab-signed",
                    &with_header(
                        &token.sign(kind, &body).unwrap(),
                        "x-gitlab-token",
                        Some("glpat-like-token-value"),
                    ),
                )
                .await;
            unauthorized(s, &b, &format!("{what}: token where signature is required"));

            // Both required: each alone is refused.
            let ok = both.sign(kind, &body).unwrap();
            let (s, b) = gw.post_signed("gitlab-both", &ok).await;
            assert_eq!(s, StatusCode::ACCEPTED, "{what}: {b}");
            let fresh = both.sign(kind, &body).unwrap();
            let (s, b) = gw
                .post_signed("gitlab-both", &with_header(&fresh, "x-gitlab-token", None))
                .await;
            unauthorized(s, &b, &format!("{what}: both: token missing"));
            let (s, b) = gw
                .post_signed(
                    "gitlab-both",
                    &with_header(&fresh, "webhook-signature", None),
                )
                .await;
            unauthorized(s, &b, &format!("{what}: both: signature missing"));
        }
    }
    gw.stop().await;
    let conn = SqliteStore::open_read_only(&env.db()).unwrap();
    let rows = list_summaries(
        &conn,
        &ListFilter {
            kind: Some("Merge Request Hook".into()),
            limit: 0,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        rows.iter().any(|r| r.action.as_deref() == Some("open")),
        "MR action from object_attributes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_providers_sign_and_verify_end_to_end() {
    let env = Env::new("");
    let gw = Gateway::start(env.config()).await;
    let cases: &[(&str, &str, &str)] = &[
        (
            "standard",
            "invoice.paid",
            r#"{"type":"invoice.paid","timestamp":"2026-01-01T00:00:00Z","data":{"id":1}}"#,
        ),
        (
            "stripe",
            "charge.succeeded",
            r#"{"id":"evt_1","object":"event","type":"charge.succeeded","data":{"object":{}}}"#,
        ),
        (
            "slack",
            "event_callback",
            r#"{"type":"event_callback","event_id":"Ev1","event":{"type":"app_mention","text":"hi"}}"#,
        ),
        (
            "linear",
            "Issue",
            r#"{"action":"create","type":"Issue","data":{"id":"x"},"webhookTimestamp":0}"#,
        ),
        ("hmac", "thing.done", r#"{"action":"done","data":{}}"#),
    ];
    for (source, kind, body) in cases {
        let signer = env.signer(source);
        let body = Bytes::from_static(body.as_bytes());
        let ok = signer.sign(kind, &body).unwrap();
        let (s, b) = gw.post_signed(source, &ok).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{source}: {b}");
        let fresh = signer.sign(kind, &body).unwrap();
        let (s, b) = gw.post_signed(source, &with_flipped_byte(&fresh, 3)).await;
        unauthorized(s, &b, &format!("{source}: one byte changed"));
    }
    // Stale timestamps for the timestamped schemes.
    let old = sluice::ingress::verify::unix_now() - 3600;
    // Signed correctly, at a timestamp outside the window: only the window
    // can refuse it.
    let stripe_body = Bytes::from_static(br#"{"id":"evt_2","type":"x"}"#);
    let stripe_signer = env.signer("stripe");
    let Verifier::Stripe(stripe_scheme) = &stripe_signer.source.verifier else {
        panic!("the stripe source verifies with Stripe's scheme")
    };
    let (name, value) = stripe_scheme.sign(old, &stripe_body);
    let stripe = sluice::cli::send::Signed {
        headers: vec![
            (http::header::CONTENT_TYPE, "application/json".into()),
            (http::HeaderName::from_static("stripe-signature"), value),
        ],
        body: stripe_body,
    };
    assert_eq!(name, "Stripe-Signature");
    let (s, b) = gw.post_signed("stripe", &stripe).await;
    unauthorized(s, &b, "stripe: stale timestamp");
    assert_eq!(b["reason"], "stale_timestamp");
    let slack = env
        .signer("slack")
        .sign(
            "x",
            &Bytes::from_static(
                br#"{"type":"event_callback","event_id":"Ev9","event":{"type":"message"}}"#,
            ),
        )
        .unwrap();
    let (s, b) = gw
        .post_signed(
            "slack",
            &with_header(&slack, "x-slack-request-timestamp", Some(&old.to_string())),
        )
        .await;
    unauthorized(s, &b, "slack: stale timestamp");
    assert_eq!(b["reason"], "stale_timestamp");
    gw.stop().await;

    let rows = stored_events(&env);
    let kind_of = |src: &str| {
        rows.iter()
            .find(|r| r.source == src)
            .map(|r| r.kind.clone())
            .unwrap()
    };
    assert_eq!(kind_of("standard"), "invoice.paid");
    assert_eq!(kind_of("stripe"), "charge.succeeded");
    assert_eq!(kind_of("slack"), "app_mention");
    assert_eq!(kind_of("linear"), "Issue");
    assert_eq!(kind_of("hmac"), "thing.done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_form_encoded_body_is_stored_as_its_json_payload() {
    let env = Env::new("");
    let gw = Gateway::start(env.config()).await;
    let json = r#"{"action":"opened","issue":{"number":1}}"#;
    let form: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", json)
        .finish();
    let body = Bytes::from(form);
    let signed = env.signer("github").sign("issues", &body).unwrap();
    let signed = with_header(
        &signed,
        "content-type",
        Some("application/x-www-form-urlencoded"),
    );
    let (s, b) = gw.post_signed("github", &signed).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    gw.stop().await;
    let conn = SqliteStore::open_read_only(&env.db()).unwrap();
    let rec = sluice::store::sqlite::get_record(&conn, b["id"].as_str().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(rec.summary.action.as_deref(), Some("opened"));
    assert_eq!(&rec.event.body[..], json.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_token_is_never_stored() {
    let env = Env::new("");
    let gw = Gateway::start(env.config()).await;
    let signed = env
        .signer("gitlab")
        .sign(
            "Push Hook",
            &Bytes::from_static(br#"{"object_kind":"push"}"#),
        )
        .unwrap();
    let (s, b) = gw.post_signed("gitlab", &signed).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    gw.stop().await;
    let db = std::fs::read(env.db()).unwrap();
    let wal = std::fs::read(env.dir.path().join("data/sluice.db-wal")).unwrap_or_default();
    let needle = b"glpat-like-token-value";
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "the X-Gitlab-Token value reached the database"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_with_unsigned_fresh_ids_are_still_caught() {
    let env = Env::new("");
    let gw = Gateway::start(env.config()).await;
    // GitLab signing token: webhook-id is signed; a fresh Idempotency-Key is not.
    let body = Bytes::from_static(br#"{"object_kind":"push","ref":"refs/heads/main"}"#);
    let signed = env
        .signer("gitlab-signed")
        .sign("Push Hook", &body)
        .unwrap();
    let (s, first) = gw.post_signed("gitlab-signed", &signed).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{first}");
    let replay = with_header(&signed, "idempotency-key", Some("a-fresh-unsigned-key"));
    let replay = with_header(&replay, "x-gitlab-event-uuid", Some("another-fresh-one"));
    let (s, again) = gw.post_signed("gitlab-signed", &replay).await;
    assert_eq!((s, &again["id"]), (StatusCode::OK, &first["id"]), "{again}");

    // Linear: a signed body without webhookTimestamp has no replay protection.
    let linear = env.signer("linear");
    let ok = linear
        .sign(
            "Issue",
            &Bytes::from_static(br#"{"action":"create","type":"Issue"}"#),
        )
        .unwrap();
    let mut doc: serde_json::Value = serde_json::from_slice(&ok.body).unwrap();
    doc.as_object_mut().unwrap().remove("webhookTimestamp");
    let stripped = Bytes::from(serde_json::to_vec(&doc).unwrap());
    let key = std::fs::read(env.dir.path().join("linear.key")).unwrap();
    let resigned = sluice::ingress::verify::Linear::new(
        &[sluice::secret::Secret::new(key)],
        std::time::Duration::from_secs(60),
    )
    .sign(&stripped)
    .1;
    let mut bare = with_header(&ok, "linear-signature", Some(&resigned));
    bare.body = stripped;
    let (s, b) = gw.post_signed("linear", &bare).await;
    unauthorized(s, &b, "linear without webhookTimestamp");
    assert_eq!(b["header"], "webhookTimestamp");
    gw.stop().await;
}
