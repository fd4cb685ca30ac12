//! Signature verification, one criterion group per verifier, on a real GitHub
//! `issues.opened` payload (compacted, as GitHub sends it), beside a bare
//! `Hmac<Sha256>` compute-and-verify of the same bytes.
//!
//! After criterion, a small table gives each verifier's cost as a multiple of
//! the bare HMAC. It is timed here, interleaved round by round and reduced to
//! the median, rather than read back from criterion's files: those live
//! wherever `CRITERION_HOME` points and do not exist in `--test` mode.
//!
//! A second table is the pre-auth worst case: a 4 MiB body whose signature
//! header holds as many wrong entries as are read (16) or far more (1,300),
//! no secret needed to send it. Its cost is given in MACs of the body: the
//! hostile request's time over one bare HMAC of the same body, in the same run.
//! It should be about one per configured key.
//!
//! `cargo bench --bench verify` for figures; `cargo test --release --benches`
//! runs each once as a smoke test.

use std::hint::black_box;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput};
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::Sha256;
use sluice::config::{Encoding, GitlabMode};
use sluice::ingress::verify::{
    DEFAULT_TOLERANCE, GenericHmac, Github, Gitlab, Linear, Slack, StandardWebhooks, Stripe,
    Verifier, unix_now,
};
use sluice::secret::Secret;

const PAYLOAD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/corpus/github/issues/opened.payload.json"
);

const HMAC_SECRET: &[u8] = b"It's a Secret to Everybody";

/// The corpus payload re-serialised compactly: GitHub sends no whitespace.
fn payload() -> Bytes {
    let text = std::fs::read(PAYLOAD).unwrap_or_else(|e| panic!("cannot read {PAYLOAD}: {e}"));
    let doc: serde_json::Value = serde_json::from_slice(&text).expect("corpus payload is JSON");
    Bytes::from(serde_json::to_vec(&doc).expect("re-serialise"))
}

/// `body` with one more top-level field (Linear signs its timestamp inside the body).
fn with_field(body: &Bytes, field: &str, value: serde_json::Value) -> Bytes {
    let mut doc: serde_json::Value = serde_json::from_slice(body).expect("JSON");
    doc.as_object_mut()
        .expect("object")
        .insert(field.into(), value);
    Bytes::from(serde_json::to_vec(&doc).expect("re-serialise"))
}

/// One verifier with a request it accepts.
struct Case {
    name: &'static str,
    verifier: Verifier,
    headers: HeaderMap,
    body: Bytes,
}

fn headers<'a>(pairs: impl IntoIterator<Item = (&'a str, String)>) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(&value).expect("header value"),
        );
    }
    map
}

fn cases(body: &Bytes, now: i64) -> Vec<Case> {
    let id = "2d7f5a1c-3b8e-4f6a-9c1d-0e2b4a6c8d0f";
    let whsec = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([7u8; 32])
    );
    let plain = [Secret::new(HMAC_SECRET)];
    let whsec_secret = [Secret::new(whsec.as_bytes())];

    let github = Github::new(&plain);
    let (h, sig) = github.sign(body);
    let github_headers = headers([
        ("user-agent", "GitHub-Hookshot/044aadd".to_string()),
        ("x-github-event", "issues".into()),
        ("x-github-delivery", id.into()),
        ("x-github-hook-id", "1".into()),
        (h, sig),
    ]);

    let token = "glwht-3f9a1c0e5b7d2468ace0";
    let gitlab_token = Gitlab::new(GitlabMode::Token, &[Secret::new(token)], None);
    let gitlab_token_headers = headers([
        ("user-agent", "GitLab/17.0.0".to_string()),
        ("x-gitlab-event", "Issue Hook".into()),
        ("x-gitlab-event-uuid", id.into()),
        ("idempotency-key", id.into()),
        ("x-gitlab-token", token.into()),
    ]);

    let signing = StandardWebhooks::new(&whsec_secret, DEFAULT_TOLERANCE).expect("whsec key");
    let signed = signing.sign(id, now, body);
    let gitlab_signing = Gitlab::new(
        GitlabMode::Signature,
        &[],
        Some(StandardWebhooks::new(&whsec_secret, DEFAULT_TOLERANCE).expect("whsec key")),
    );
    let gitlab_signing_headers = headers(
        [
            ("user-agent", "GitLab/17.0.0".to_string()),
            ("x-gitlab-event", "Issue Hook".into()),
            ("x-gitlab-event-uuid", id.into()),
            ("idempotency-key", id.into()),
        ]
        .into_iter()
        .chain(signed),
    );

    let standard = StandardWebhooks::new(&whsec_secret, DEFAULT_TOLERANCE).expect("whsec key");
    let standard_headers = headers(standard.sign(&format!("msg_{id}"), now, body));

    let stripe = Stripe::new(&whsec_secret, DEFAULT_TOLERANCE);
    let (h, sig) = stripe.sign(now, body);
    let stripe_headers = headers([
        (
            "user-agent",
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)".into(),
        ),
        (h, sig),
    ]);

    let slack = Slack::new(&plain, DEFAULT_TOLERANCE);
    let slack_headers = headers(
        [(
            "user-agent",
            "Slackbot 1.0 (+https://api.slack.com/robots)".to_string(),
        )]
        .into_iter()
        .chain(slack.sign(now, body)),
    );

    // Linear checks `webhookTimestamp` inside the signed body, so the body has one.
    let linear_body = with_field(body, "webhookTimestamp", (now * 1000).into());
    let linear = Linear::new(&plain, Duration::from_secs(60));
    let (h, sig) = linear.sign(&linear_body);
    let linear_headers = headers([
        ("user-agent", "Linear-Webhook".to_string()),
        ("linear-delivery", id.into()),
        ("linear-event", "Issue".into()),
        (h, sig),
    ]);

    let hmac_hex = GenericHmac::new(
        &plain,
        HeaderName::from_static("x-signature"),
        "sha256=".into(),
        Encoding::Hex,
    );
    let (h, sig) = hmac_hex.sign(body);
    let mut hmac_headers = headers([("x-delivery-id", id.to_string())]);
    hmac_headers.insert(h, HeaderValue::from_str(&sig).expect("header value"));

    let cases = vec![
        Case {
            name: "github",
            verifier: Verifier::Github(github),
            headers: github_headers,
            body: body.clone(),
        },
        Case {
            name: "gitlab-token",
            verifier: Verifier::Gitlab(gitlab_token),
            headers: gitlab_token_headers,
            body: body.clone(),
        },
        Case {
            name: "gitlab-signing",
            verifier: Verifier::Gitlab(gitlab_signing),
            headers: gitlab_signing_headers,
            body: body.clone(),
        },
        Case {
            name: "standard-webhooks",
            verifier: Verifier::Standard(standard),
            headers: standard_headers,
            body: body.clone(),
        },
        Case {
            name: "stripe",
            verifier: Verifier::Stripe(stripe),
            headers: stripe_headers,
            body: body.clone(),
        },
        Case {
            name: "slack",
            verifier: Verifier::Slack(slack),
            headers: slack_headers,
            body: body.clone(),
        },
        Case {
            name: "linear",
            verifier: Verifier::Linear(linear),
            headers: linear_headers,
            body: linear_body,
        },
        Case {
            name: "hmac-hex",
            verifier: Verifier::Hmac(hmac_hex),
            headers: hmac_headers,
            body: body.clone(),
        },
    ];
    for case in &cases {
        if let Err(e) = case
            .verifier
            .verify_at(case.headers.clone(), case.body.clone(), now)
        {
            panic!("{}: the signed request does not verify: {e}", case.name);
        }
    }
    cases
}

/// The baseline: what a hand-written receiver does, key included.
struct Bare {
    body: Bytes,
    tag: [u8; 32],
}

impl Bare {
    fn new(body: &Bytes) -> Self {
        let mut mac = Hmac::<Sha256>::new_from_slice(HMAC_SECRET).expect("any key length");
        mac.update(body);
        Bare {
            body: body.clone(),
            tag: mac.finalize().into_bytes().into(),
        }
    }

    fn check(&self) -> bool {
        let mut mac = Hmac::<Sha256>::new_from_slice(HMAC_SECRET).expect("any key length");
        mac.update(&self.body);
        mac.verify_slice(&self.tag).is_ok()
    }
}

fn criterion_groups(c: &mut Criterion, cases: &[Case], bare: &Bare, now: i64) {
    let mut group = c.benchmark_group("bare-hmac");
    group.throughput(Throughput::Bytes(bare.body.len() as u64));
    group.bench_function("compute+verify", |b| {
        b.iter(|| assert!(black_box(bare).check()))
    });
    group.finish();

    for case in cases {
        let mut group = c.benchmark_group(case.name);
        group.throughput(Throughput::Bytes(case.body.len() as u64));
        // `verify_at` takes the header map by value; cloning it is setup, not timed.
        group.bench_function("verify", |b| {
            b.iter_batched(
                || case.headers.clone(),
                |h| {
                    case.verifier
                        .verify_at(h, black_box(case.body.clone()), now)
                        .expect("verifies")
                },
                BatchSize::SmallInput,
            )
        });
        group.finish();
    }
}

/// Nanoseconds per call of one batch of `iters`, setup outside the clock.
fn time_case(case: &Case, iters: usize, now: i64) -> f64 {
    let inputs: Vec<HeaderMap> = (0..iters).map(|_| case.headers.clone()).collect();
    let mut outputs = Vec::with_capacity(iters);
    let start = Instant::now();
    for h in inputs {
        outputs.push(
            case.verifier
                .verify_at(h, black_box(case.body.clone()), now),
        );
    }
    let ns = start.elapsed().as_nanos() as f64 / iters as f64;
    assert!(outputs.iter().all(Result::is_ok), "{} failed", case.name);
    ns
}

fn time_bare(bare: &Bare, iters: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        assert!(black_box(bare).check());
    }
    start.elapsed().as_nanos() as f64 / iters as f64
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Interleaves every case round by round (so a noisy moment on the shared
/// machine hits all of them alike) and prints the median cost of each.
fn ratio_table(cases: &[Case], bare: &Bare, now: i64, rounds: usize, iters: usize) {
    let mut bare_ns = Vec::with_capacity(rounds);
    let mut case_ns = vec![Vec::with_capacity(rounds); cases.len()];
    for _ in 0..rounds {
        bare_ns.push(time_bare(bare, iters));
        for (case, ns) in cases.iter().zip(&mut case_ns) {
            ns.push(time_case(case, iters, now));
        }
    }
    let base = median(bare_ns);
    println!();
    println!(
        "payload {} bytes (compact GitHub issues.opened); median of {rounds} interleaved rounds of {iters} calls",
        bare.body.len()
    );
    println!(
        "{:<20} {:>9}  {:>18}",
        "verifier", "ns/op", "ratio-to-bare-hmac"
    );
    println!("{:<20} {:>9.0}  {:>18.2}", "bare-hmac", base, 1.0);
    for (case, ns) in cases.iter().zip(case_ns) {
        let ns = median(ns);
        println!("{:<20} {:>9.0}  {:>18.2}", case.name, ns, ns / base);
    }
}

/// The hostile body: large, so the MAC dominates the cost.
const HOSTILE_BODY_BYTES: usize = 4 * 1024 * 1024;

/// One unauthenticated request built to cost as much as it can.
struct Hostile {
    name: &'static str,
    keys: usize,
    verifier: Verifier,
    headers: HeaderMap,
}

fn whsec(n: u8) -> Secret {
    Secret::new(
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([n; 32])
        )
        .as_bytes(),
    )
}

fn hostile_cases(now: i64) -> Vec<Hostile> {
    let one = [whsec(7)];
    let two = [whsec(7), whsec(8)];
    let b64 = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode([0xAB; 32])
    );
    let standard_headers = |n: usize| {
        headers([
            ("webhook-id", "msg_hostile".to_string()),
            ("webhook-timestamp", now.to_string()),
            ("webhook-signature", vec![b64.as_str(); n].join(" ")),
        ])
    };
    let stripe_sig = format!(
        "t={now},{}",
        vec![format!("v1={}", hex::encode([0xAB; 32])); 16].join(",")
    );
    let standard = |keys: &[Secret]| StandardWebhooks::new(keys, DEFAULT_TOLERANCE).expect("keys");
    vec![
        Hostile {
            name: "standard, 16 entries",
            keys: 1,
            verifier: Verifier::Standard(standard(&one)),
            headers: standard_headers(16),
        },
        Hostile {
            name: "standard, 1300 entries",
            keys: 1,
            verifier: Verifier::Standard(standard(&one)),
            headers: standard_headers(1300),
        },
        Hostile {
            name: "standard, 16 entries",
            keys: 2,
            verifier: Verifier::Standard(standard(&two)),
            headers: standard_headers(16),
        },
        Hostile {
            name: "stripe, 16 entries",
            keys: 1,
            verifier: Verifier::Stripe(Stripe::new(&one, DEFAULT_TOLERANCE)),
            headers: headers([("stripe-signature", stripe_sig)]),
        },
        Hostile {
            name: "gitlab-signing, 16 entries",
            keys: 1,
            verifier: Verifier::Gitlab(Gitlab::new(
                GitlabMode::Signature,
                &[],
                Some(standard(&one)),
            )),
            headers: standard_headers(16),
        },
    ]
}

fn criterion_hostile(c: &mut Criterion, body: &Bytes, now: i64) {
    let bare = Bare::new(body);
    let mut group = c.benchmark_group("pre-auth-worst-case");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("bare hmac of the body", |b| {
        b.iter(|| assert!(black_box(&bare).check()))
    });
    for case in hostile_cases(now) {
        group.bench_function(format!("{}, {} key(s)", case.name, case.keys), |b| {
            b.iter_batched(
                || case.headers.clone(),
                |h| {
                    case.verifier
                        .verify_at(h, black_box(body.clone()), now)
                        .expect_err("hostile")
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn time_hostile(case: &Hostile, body: &Bytes, iters: usize, now: i64) -> f64 {
    let inputs: Vec<HeaderMap> = (0..iters).map(|_| case.headers.clone()).collect();
    let start = Instant::now();
    for h in inputs {
        let r = case.verifier.verify_at(h, black_box(body.clone()), now);
        assert!(r.is_err(), "{}: a hostile request verified", case.name);
    }
    start.elapsed().as_nanos() as f64 / iters as f64
}

/// The pre-auth worst case in MACs of the body, interleaved round by round
/// with a bare HMAC of the same body.
fn hostile_table(body: &Bytes, now: i64, rounds: usize, iters: usize) {
    let bare = Bare::new(body);
    let cases = hostile_cases(now);
    let mut bare_ns = Vec::with_capacity(rounds);
    let mut case_ns = vec![Vec::with_capacity(rounds); cases.len()];
    for _ in 0..rounds {
        bare_ns.push(time_bare(&bare, iters));
        for (case, ns) in cases.iter().zip(&mut case_ns) {
            ns.push(time_hostile(case, body, iters, now));
        }
    }
    let base = median(bare_ns);
    println!();
    println!(
        "pre-auth worst case: {} MiB body, wrong signatures, no secret; median of {rounds} interleaved rounds of {iters} calls",
        body.len() / (1024 * 1024)
    );
    println!(
        "{:<28} {:>4} {:>12}  {:>14}",
        "request", "keys", "ms/request", "MACs of body"
    );
    println!(
        "{:<28} {:>4} {:>12.2}  {:>14.2}",
        "bare hmac of the body",
        1,
        base / 1e6,
        1.0
    );
    for (case, ns) in cases.iter().zip(case_ns) {
        let ns = median(ns);
        println!(
            "{:<28} {:>4} {:>12.2}  {:>14.2}",
            case.name,
            case.keys,
            ns / 1e6,
            ns / base
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench_mode = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    let listing = args.iter().any(|a| a == "--list");

    let body = payload();
    let now = unix_now();
    let cases = cases(&body, now);
    let bare = Bare::new(&body);

    let big = Bytes::from(vec![b'x'; HOSTILE_BODY_BYTES]);
    let mut c = Criterion::default().configure_from_args();
    criterion_groups(&mut c, &cases, &bare, now);
    criterion_hostile(&mut c, &big, now);
    c.final_summary();

    if listing {
        return;
    }
    // In test mode only prove the table code runs.
    let (rounds, iters) = if bench_mode { (15, 3000) } else { (1, 10) };
    ratio_table(&cases, &bare, now, rounds, iters);
    let (rounds, iters) = if bench_mode { (9, 5) } else { (1, 1) };
    hostile_table(&big, now, rounds, iters);
}
