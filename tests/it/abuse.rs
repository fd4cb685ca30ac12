//! Bad input gets a clean 4xx or a timeout, and the server keeps serving:
//! oversized, truncated, non-UTF-8, deeply nested and empty bodies, absurd
//! headers, slow-drip clients, unknown sources, and the per-IP shield; one
//! client's share of connections and of the body bytes buffered before
//! verification; hostile signature headers and `X-Forwarded-For` values;
//! the store's back-pressure (a full write queue, an append past its
//! timeout): 503 with `Retry-After`, and nothing lost or doubled.

use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Env, Gateway, post};

async fn still_serving(gw: &Gateway, env: &Env) {
    let signed = env
        .signer("github")
        .sign(
            "ping",
            &Bytes::from(format!(r#"{{"zen":"{}"}}"#, uuid::Uuid::new_v4())),
        )
        .unwrap();
    let (s, b) = gw.post_signed("github", &signed).await;
    assert_eq!(s, StatusCode::ACCEPTED, "server still serves: {b}");
}

/// Writes raw bytes and reads what comes back until the server closes the
/// connection. The server may answer (413, 431) and close before it has read
/// everything, so a failed write is expected and what it answered is still
/// read. A server that leaves the connection open for `wait` fails the test:
/// a hang is never an answer.
async fn raw(gw: &Gateway, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    // Ok or Err both mean the server ended the connection (EOF or reset).
    let ended = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    assert!(
        ended.is_ok(),
        "the server neither answered nor closed within {wait:?}; read so far: {:.80}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// Sets both read timeouts to 1 s, for tests of what they cut off.
fn short_timeouts(env: &Env) {
    env.set_server(&[("header_timeout", r#""1s""#), ("body_timeout", r#""1s""#)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_clean_4xx() {
    let env = Env::new("");
    short_timeouts(&env);
    let gw = Gateway::start(env.config()).await;
    let signer = env.signer("github");

    // Oversized, declared and chunked.
    // (Over raw TCP: the server answers from Content-Length and closes without
    // reading the body, which an HTTP client mid-upload reports as an error.)
    let big = format!(
        "POST /hooks/github HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nx-hub-signature-256: sha256=00\r\n\r\n{}",
        1024 * 1024 + 1,
        "a".repeat(64 * 1024)
    );
    let resp = raw(&gw, big.as_bytes(), Duration::from_secs(30)).await;
    assert!(
        resp.starts_with("HTTP/1.1 413"),
        "declared oversize: {resp:.80}"
    );
    assert!(
        resp.contains(r#""limit_bytes":1048576"#),
        "names the limit: {resp}"
    );
    let head = "POST /hooks/github HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nx-hub-signature-256: sha256=00\r\n\r\n";
    let mut req = head.as_bytes().to_vec();
    for _ in 0..20 {
        req.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        req.extend(std::iter::repeat_n(b'a', 64 * 1024));
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(&gw, &req, Duration::from_secs(30)).await;
    assert!(
        resp.starts_with("HTTP/1.1 413"),
        "chunked oversize: {resp:.80}"
    );

    // Signed right, but not an event we can take.
    let cases: Vec<(&str, Bytes)> = vec![
        ("empty", Bytes::new()),
        (
            "non-UTF-8",
            Bytes::from_static(b"{\"action\":\"\xff\xfe\"}"),
        ),
        (
            "deeply nested",
            Bytes::from(format!("{}{}", "[".repeat(100_000), "]".repeat(100_000))),
        ),
        (
            "deeply nested object",
            Bytes::from(format!(
                "{{\"a\":{}1{}}}",
                "{\"a\":".repeat(5000),
                "}".repeat(5000)
            )),
        ),
        ("not JSON", Bytes::from_static(b"hello")),
        ("a JSON array", Bytes::from_static(b"[1,2,3]")),
        ("truncated JSON", Bytes::from_static(b"{\"action\":\"open")),
    ];
    for (what, body) in cases {
        let signed = signer.sign("issues", &body).unwrap();
        let (s, b) = gw.post_signed("github", &signed).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}: {b}");
        assert!(b["detail"].is_string(), "{what}: says why: {b}");
    }
    // A body shorter than its Content-Length: the read times out or fails cleanly.
    let t = Instant::now();
    let resp = raw(
        &gw,
        b"POST /hooks/github HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{\"a\":",
        Duration::from_secs(30),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 408"),
        "truncated body: {resp:.80}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "cut off before body_timeout"
    );
    still_serving(&gw, &env).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_headers_and_slow_clients_are_cut_off() {
    let env = Env::new("");
    short_timeouts(&env);
    let gw = Gateway::start(env.config()).await;

    let huge = format!(
        "POST /hooks/github HTTP/1.1\r\nhost: x\r\nx-junk: {}\r\ncontent-length: 2\r\n\r\n{{}}",
        "a".repeat(200_000)
    );
    // The server refuses after 64 KiB and closes with the rest unread, which
    // resets the connection: its 431 may be lost to the reset, but it must
    // end the connection, never wait for the rest.
    let resp = raw(&gw, huge.as_bytes(), Duration::from_secs(30)).await;
    assert!(
        resp.starts_with("HTTP/1.1 431") || resp.is_empty(),
        "huge header: {resp:.80}"
    );
    let mut many = String::from("POST /hooks/github HTTP/1.1\r\nhost: x\r\n");
    for i in 0..500 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("content-length: 2\r\n\r\n{}");
    // All of it fits in one read, so nothing is left unread: the 431 arrives.
    let resp = raw(&gw, many.as_bytes(), Duration::from_secs(30)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "500 headers: {resp:.80}");
    let bad_sig = raw(&gw, b"POST /hooks/github HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-hub-signature-256: sha256=\xff\xff\r\ncontent-length: 2\r\n\r\n{}", Duration::from_secs(30)).await;
    assert!(
        bad_sig.starts_with("HTTP/1.1 401") || bad_sig.starts_with("HTTP/1.1 400"),
        "binary header: {bad_sig:.80}"
    );

    // Slow drip: one byte of the request head every 200 ms (the head would
    // take 12 s), against a 1 s header_timeout.
    let t = Instant::now();
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let head = b"POST /hooks/github HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";
    let mut closed = false;
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        // Anything read (a 408, EOF or a reset) means the server ended it.
        if tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf))
            .await
            .is_ok()
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "the slow-drip client sent its whole head uncut");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "cut off before header_timeout (1 s): {:?}",
        t.elapsed()
    );

    // Slow body: headers on time, body never finishes.
    let t = Instant::now();
    let resp = raw(
        &gw,
        b"POST /hooks/github HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{",
        Duration::from_secs(30),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 408"), "slow body: {resp:.80}");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "cut off before body_timeout"
    );

    still_serving(&gw, &env).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_source_wrong_method_and_health() {
    let env = Env::new("");
    let gw = Gateway::start(env.config()).await;
    let (s, b) = post(
        &gw.client,
        &gw.url("/hooks/nope"),
        &[],
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    let get = |path: &str| {
        let req = http::Request::get(gw.url(path))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        gw.client.request(req)
    };
    assert_eq!(
        get("/hooks/github").await.unwrap().status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(get("/healthz").await.unwrap().status(), StatusCode::OK);
    assert_eq!(get("/readyz").await.unwrap().status(), StatusCode::OK);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shield_answers_429_with_retry_after_before_verifying() {
    let env = Env::new("");
    let text = std::fs::read_to_string(&env.config_path).unwrap().replace(
        "[shield]\nenabled = false",
        "[shield]\nenabled = true\nper_second = 1\nburst = 3",
    );
    std::fs::write(&env.config_path, text).unwrap();
    let gw = Gateway::start(env.config()).await;
    // The bucket refills one token a second: every second the requests take
    // may let one more through, so the check counts with the clock.
    let started = Instant::now();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    while retry_after.is_none() {
        assert!(statuses.len() < 50, "never limited: {statuses:?}");
        // Unsigned: the shield must answer before any verification happens.
        let req = http::Request::post(gw.url("/hooks/github"))
            .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let resp = gw.client.request(req).await.unwrap();
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            assert!(retry_after.is_some(), "429 without Retry-After");
        } else {
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{statuses:?}");
        }
        statuses.push(resp.status());
    }
    let refills = started.elapsed().as_secs() as usize + 1;
    let passed = statuses.len() - 1;
    assert!(
        (3..=3 + refills).contains(&passed),
        "burst 3 (+{refills} refilled): {passed} passed before the first 429"
    );
    let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&secs));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_and_trusted_proxy() {
    let env = Env::new("");
    let text = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace(
            "max_body_bytes = 1048576\n",
            "max_body_bytes = 1048576\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        )
        .replace(
            "provider = \"github\"\n",
            "provider = \"github\"\nallow_ips = [\"192.0.2.0/24\"]\n",
        );
    std::fs::write(&env.config_path, text).unwrap();
    let gw = Gateway::start(env.config()).await;
    let signed = env
        .signer("github")
        .sign("ping", &Bytes::from_static(br#"{"zen":"x"}"#))
        .unwrap();
    let (s, _) = gw.post_signed("github", &signed).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "loopback is not on the allow-list"
    );
    let via_proxy =
        crate::support::with_header(&signed, "x-forwarded-for", Some("203.0.113.9, 192.0.2.10"));
    let (s, b) = gw.post_signed("github", &via_proxy).await;
    assert_eq!(
        s,
        StatusCode::ACCEPTED,
        "client behind the trusted proxy is allowed: {b}"
    );
    // The right-most untrusted hop counts, with or without a port; a spoofed
    // left-most entry does not help a client outside the allow-list.
    let fresh = env
        .signer("github")
        .sign("ping", &Bytes::from_static(br#"{"zen":"y"}"#))
        .unwrap();
    let with_port = crate::support::with_header(&fresh, "x-forwarded-for", Some("192.0.2.77:4711"));
    assert_eq!(
        gw.post_signed("github", &with_port).await.0,
        StatusCode::ACCEPTED
    );
    let fresh = env
        .signer("github")
        .sign("ping", &Bytes::from_static(br#"{"zen":"z"}"#))
        .unwrap();
    let spoofed =
        crate::support::with_header(&fresh, "x-forwarded-for", Some("192.0.2.10, 203.0.113.9"));
    assert_eq!(
        gw.post_signed("github", &spoofed).await.0,
        StatusCode::FORBIDDEN
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_signature_entries_are_refused_unhashed() {
    let env = Env::new(
        r#"
[sources.standard-big]
provider = "standard-webhooks"
secret = { file = "standard.key" }
max_body_bytes = 8388608
"#,
    );
    let gw = Gateway::start(env.config()).await;
    let body = Bytes::from(format!(
        r#"{{"type":"big.event","pad":"{}"}}"#,
        "a".repeat(4 * 1024 * 1024)
    ));
    let signed = env.signer("standard-big").sign("big.event", &body).unwrap();
    let good = crate::support::header(&signed, "webhook-signature");
    let fake = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode([0xAB; 32])
    );
    // ~62 KB of entries (under the 64 KiB head limit): refused as malformed,
    // not hashed once per entry.
    let hostile = vec![fake.as_str(); 1300].join(" ");
    let req = crate::support::with_header(&signed, "webhook-signature", Some(&hostile));
    let (s, b) = gw.post_signed("standard-big", &req).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert_eq!(b["reason"], "malformed_header", "{b}");
    assert_eq!(b["header"], "webhook-signature", "{b}");
    // A full header with the right entry among wrong ones still verifies
    // (a 4 MiB body: verified off the async workers).
    let mut entries = vec![fake.as_str(); 15];
    entries.insert(7, good.as_str());
    let req = crate::support::with_header(&signed, "webhook-signature", Some(&entries.join(" ")));
    let (s, b) = gw.post_signed("standard-big", &req).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_forwarded_for_is_never_the_proxy() {
    let env = Env::new("");
    env.set_server(&[("trusted_proxies", r#"["127.0.0.1/32"]"#)]);
    // The proxy's own address is allowed: only a client that really is the
    // proxy may use that.
    let text = std::fs::read_to_string(&env.config_path).unwrap().replacen(
        "provider = \"github\"\n",
        "provider = \"github\"\nallow_ips = [\"127.0.0.1/32\", \"192.0.2.0/24\"]\n",
        1,
    );
    std::fs::write(&env.config_path, text).unwrap();
    let gw = Gateway::start(env.config()).await;
    let signer = env.signer("github");
    let sign = |zen: &str| {
        signer
            .sign("ping", &Bytes::from(format!(r#"{{"zen":"{zen}"}}"#)))
            .unwrap()
    };
    for (n, bad) in [
        "192.0.2.10\u{e9}",
        "caf\u{e9}",
        "not-an-address",
        "192.0.2.10, junk",
    ]
    .into_iter()
    .enumerate()
    {
        let req =
            crate::support::with_header(&sign(&format!("bad{n}")), "x-forwarded-for", Some(bad));
        let (s, b) = gw.post_signed("github", &req).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "X-Forwarded-For {bad:?}: {b}");
    }
    let ok = crate::support::with_header(&sign("good"), "x-forwarded-for", Some("192.0.2.10"));
    let (s, b) = gw.post_signed("github", &ok).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    gw.stop().await;
}

/// A connection to `to` from the loopback address `from` (all of 127/8 is
/// loopback on Linux, so each is another client).
async fn connect_from(from: [u8; 4], to: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends one request on `s` and reads its answer until close (or `wait`).
async fn exchange(s: &mut TcpStream, request: &[u8], wait: Duration) -> String {
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An unsigned request the gateway answers at once (401), closing after.
const UNSIGNED: &[u8] =
    b"POST /hooks/github HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}";

/// The first bytes the peer answers on `s` (empty when it closes).
async fn read_one(s: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// True when the peer closes `s` (or resets it) within `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    let env = Env::new("");
    env.set_server(&[
        // Idle connections must stay open on their own for the whole test.
        ("header_timeout", r#""60s""#),
        ("max_connections_per_client", "4"),
    ]);
    let gw = Gateway::start(env.config()).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from([127, 0, 0, 1], gw.addr).await);
    }
    // The fifth from the same address is closed unread (the kernel accepted it
    // into the backlog; the gateway drops it).
    let mut fifth = connect_from([127, 0, 0, 1], gw.addr).await;
    assert!(
        closed_within(&mut fifth, Duration::from_secs(20)).await,
        "a fifth connection from one address was kept open"
    );
    // Another address is still served, and so are the four held ones.
    let mut other = connect_from([127, 0, 0, 2], gw.addr).await;
    let resp = exchange(&mut other, UNSIGNED, Duration::from_secs(20)).await;
    assert!(resp.starts_with("HTTP/1.1 401"), "127.0.0.2: {resp:.80}");
    let resp = exchange(&mut held[0], UNSIGNED, Duration::from_secs(20)).await;
    assert!(resp.starts_with("HTTP/1.1 401"), "held: {resp:.80}");
    // Once they close, the address may connect again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut again = connect_from([127, 0, 0, 1], gw.addr).await;
        let resp = exchange(&mut again, UNSIGNED, Duration::from_secs(5)).await;
        if resp.starts_with("HTTP/1.1 401") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slots never came back: {resp:.80}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await;
}

/// One client holds at most its share of the body budget, so declaring large
/// bodies and sending nothing from one address does not turn everyone away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_spend_the_whole_body_budget() {
    let env = Env::new("");
    env.set_server(&[
        ("body_timeout", r#""60s""#),
        ("max_body_bytes", "1048576"),
        ("body_budget_bytes", "2097152"),
        ("body_budget_per_client_bytes", "1048576"),
    ]);
    let gw = Gateway::start(env.config()).await;
    let head = b"POST /hooks/github HTTP/1.1\r\nhost: x\r\ncontent-length: 700000\r\n\r\n";
    // Client A declares 700 kB twice and sends nothing: its second request
    // is over A's 1 MiB share (the budget itself still has room).
    let mut a1 = connect_from([127, 0, 0, 1], gw.addr).await;
    a1.write_all(head).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut a2 = connect_from([127, 0, 0, 1], gw.addr).await;
    a2.write_all(head).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(20), read_one(&mut a2))
        .await
        .expect("A's second request was waited on instead of refused");
    assert!(second.starts_with("HTTP/1.1 503"), "{second:.200}");
    // Client B, meanwhile, is received and verified (and refused as unsigned).
    let full = [
        &b"POST /hooks/github HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 700000\r\n\r\n"[..],
        &vec![b'a'; 700_000],
    ]
    .concat();
    let mut b = connect_from([127, 0, 0, 2], gw.addr).await;
    let answer = exchange(&mut b, &full, Duration::from_secs(20)).await;
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "client B: {answer:.200}"
    );
    drop((a1, a2));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_budget_spent_answers_503_before_reading() {
    let env = Env::new("");
    env.set_server(&[
        ("body_timeout", r#""60s""#),
        ("max_body_bytes", "1048576"),
        ("body_budget_bytes", "1048576"),
    ]);
    let gw = Gateway::start(env.config()).await;
    // Two requests each declaring 700 kB and sending none of it: the budget
    // holds one of them; the other must be turned away at once.
    let head = b"POST /hooks/github HTTP/1.1\r\nhost: x\r\ncontent-length: 700000\r\n\r\n";
    let mut a = connect_from([127, 0, 0, 1], gw.addr).await;
    let mut b = connect_from([127, 0, 0, 1], gw.addr).await;
    a.write_all(head).await.unwrap();
    b.write_all(head).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::select! {
            r = read_one(&mut a) => r,
            r = read_one(&mut b) => r,
        }
    })
    .await
    .expect("neither request was answered: both bodies were waited for");
    assert!(first.starts_with("HTTP/1.1 503"), "{first:.200}");
    let retry = first
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .expect("Retry-After");
    assert!(retry.trim().parse::<u64>().unwrap() >= 1, "{first}");
    // The budget comes back when the held request ends.
    drop((a, b));
    let full = [
        &b"POST /hooks/github HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 700000\r\n\r\n"[..],
        &vec![b'a'; 700_000],
    ]
    .concat();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = raw(&gw, &full, Duration::from_secs(5)).await;
        if resp.starts_with("HTTP/1.1 401") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "budget never came back: {resp:.80}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_serving(&gw, &env).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_payload_providers_default_to_one_mib() {
    let env = Env::new(
        r#"
[sources.stripe-big]
provider = "stripe"
secret = { file = "stripe.key" }
max_body_bytes = 4194304
"#,
    );
    env.set_server(&[("max_body_bytes", "26214400")]);
    let gw = Gateway::start(env.config()).await;
    let two_mib = 2 * 1024 * 1024;
    for source in ["stripe", "slack", "linear"] {
        // Declared: answered from Content-Length without reading the body.
        let req = format!(
            "POST /hooks/{source} HTTP/1.1\r\nhost: x\r\ncontent-length: {two_mib}\r\n\r\n{}",
            "a".repeat(1024)
        );
        let resp = raw(&gw, req.as_bytes(), Duration::from_secs(10)).await;
        assert!(resp.starts_with("HTTP/1.1 413"), "{source}: {resp:.80}");
        assert!(
            resp.contains(r#""limit_bytes":1048576"#),
            "{source}: {resp}"
        );
    }
    // GitHub keeps the server's 25 MiB; an explicit max_body_bytes wins.
    for source in ["github", "stripe-big"] {
        let req = [
            format!(
                "POST /hooks/{source} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {two_mib}\r\n\r\n"
            )
            .into_bytes(),
            vec![b'a'; two_mib],
        ]
        .concat();
        let resp = raw(&gw, &req, Duration::from_secs(20)).await;
        assert!(resp.starts_with("HTTP/1.1 401"), "{source}: {resp:.80}");
    }
    gw.stop().await;
}

/// POSTs a signed request to `/hooks/{source}`; returns the status, the
/// `Retry-After` header (if any) and the JSON body (or null).
async fn post_with_retry_after(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<Bytes>,
    >,
    url: &str,
    signed: &sluice::cli::send::Signed,
) -> Answer {
    use http_body_util::BodyExt as _;
    let mut req = http::Request::post(url);
    for (h, v) in &signed.headers {
        req = req.header(h, v.as_str());
    }
    let resp = client
        .request(
            req.body(http_body_util::Full::new(signed.body.clone()))
                .expect("request"),
        )
        .await
        .expect("response");
    let status = resp.status();
    let retry = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .map(|v| v.to_str().expect("ASCII Retry-After").to_owned());
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        retry,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// One answer: the status, the `Retry-After` header and the JSON body.
type Answer = (StatusCode, Option<String>, serde_json::Value);

/// POSTs every delivery to `url` at once, each on its own connection;
/// returns the answers in order (all within 60 s).
async fn burst(url: &str, deliveries: &[sluice::cli::send::Signed]) -> Vec<Answer> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let tasks: Vec<_> = deliveries
            .iter()
            .cloned()
            .map(|signed| {
                let url = url.to_owned();
                tokio::spawn(async move {
                    let client = crate::support::client();
                    post_with_retry_after(&client, &url, &signed).await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("join"));
        }
        out
    })
    .await
    .expect("the burst was answered within 60 s")
}

/// Asserts a store-busy refusal: 503, a whole number of seconds to wait, and
/// the documented error.
fn assert_store_busy(
    status: StatusCode,
    retry: &Option<String>,
    body: &serde_json::Value,
    what: &str,
) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {body}");
    let secs: u64 = retry
        .as_deref()
        .unwrap_or_else(|| panic!("{what}: a 503 without Retry-After"))
        .parse()
        .unwrap_or_else(|e| panic!("{what}: Retry-After {retry:?}: {e}"));
    assert!(secs >= 1, "{what}: Retry-After {secs}");
    assert_eq!(body["error"], "store busy, retry later", "{what}: {body}");
}

/// A real GitHub push payload, compacted, made unique by one added field so
/// each delivery's stored body can be told apart.
fn unique_push_body(n: usize) -> Bytes {
    let file = crate::support::corpus().join("github/push/payload.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(file).expect("corpus push payload")).unwrap();
    v["sluice_test_delivery"] = serde_json::json!(n);
    Bytes::from(serde_json::to_vec(&v).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_queue_answers_503_and_loses_nothing() {
    const BURST: usize = 128;
    let bodies: Vec<Bytes> = (0..BURST).map(unique_push_body).collect();
    let largest = bodies.iter().map(Bytes::len).max().unwrap();
    // Room for about one body: a second append while one waits for the
    // writer is refused. A long append timeout, so every 503 here is the
    // queue's (refused before it was queued), never a slow disk's.
    let env = Env::new(&format!(
        "\n[store]\nqueue_bytes = {largest}\nappend_timeout = \"60s\"\n"
    ));
    env.set_server(&[("max_connections_per_client", "1024")]);
    let gw = Gateway::start(env.config()).await;
    let signer = env.signer("github");
    let deliveries: Vec<sluice::cli::send::Signed> = bodies
        .iter()
        .map(|b| signer.sign("push", b).unwrap())
        .collect();
    let delivery_id =
        |s: &sluice::cli::send::Signed| crate::support::header(s, "x-github-delivery");

    // The whole burst at once, each on its own connection.
    let url = gw.url("/hooks/github");
    let answers = burst(&url, &deliveries).await;

    let mut accepted = Vec::new(); // (delivery index, event id)
    let mut refused = Vec::new(); // delivery index
    for (i, (status, retry, body)) in answers.iter().enumerate() {
        match *status {
            StatusCode::ACCEPTED => {
                let id = body["id"].as_str().expect("202 carries an id").to_owned();
                accepted.push((i, id));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_store_busy(*status, retry, body, &format!("delivery {i}"));
                refused.push(i);
            }
            other => panic!("delivery {i}: only 202 or a store-busy 503, got {other}: {body}"),
        }
    }
    assert!(
        !refused.is_empty(),
        "{BURST} concurrent deliveries against a one-body queue: none was refused"
    );
    assert!(
        !accepted.is_empty(),
        "every delivery of the burst was refused"
    );

    // Once the burst is over, the refused deliveries are taken on retry.
    for &i in &refused {
        let (status, retry, body) = post_with_retry_after(&gw.client, &url, &deliveries[i]).await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "retry of refused delivery {i}: {body} (Retry-After {retry:?})"
        );
        accepted.push((i, body["id"].as_str().expect("an id").to_owned()));
    }
    // A body larger than the whole queue is still taken when it comes alone:
    // the first append into an empty queue always passes.
    let mut big: serde_json::Value = serde_json::from_slice(&bodies[0]).unwrap();
    big["sluice_test_padding"] = serde_json::json!("x".repeat(2 * largest));
    let big = Bytes::from(serde_json::to_vec(&big).unwrap());
    let big_delivery = signer.sign("push", &big).unwrap();
    let (status, _, body) = post_with_retry_after(&gw.client, &url, &big_delivery).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "a lone body past queue_bytes: {body}"
    );
    let big_id = body["id"].as_str().expect("an id").to_owned();
    gw.stop().await;

    // Every acknowledged event is stored with its own body, each delivery once.
    let ro = sluice::store::sqlite::SqliteStore::open_read_only(&env.db()).unwrap();
    for (i, id) in &accepted {
        let rec = sluice::store::sqlite::get_record(&ro, id)
            .unwrap()
            .unwrap_or_else(|| {
                panic!("delivery {i}: event {id} was answered 202 but is not stored")
            });
        assert_eq!(
            rec.summary.delivery_id,
            delivery_id(&deliveries[*i]),
            "{id}"
        );
        assert_eq!(
            rec.event.body, bodies[*i],
            "delivery {i}: event {id} holds another body"
        );
    }
    let rec = sluice::store::sqlite::get_record(&ro, &big_id)
        .unwrap()
        .expect("the lone large event is stored");
    assert_eq!(rec.event.body, big);
    let stored = crate::support::stored_events(&env);
    let mut per_delivery = std::collections::HashMap::<String, usize>::new();
    for s in &stored {
        *per_delivery.entry(s.delivery_id.clone()).or_default() += 1;
    }
    assert_eq!(
        stored.len(),
        BURST + 1,
        "{} refused of {BURST}",
        refused.len()
    );
    for d in &deliveries {
        assert_eq!(
            per_delivery.get(&delivery_id(d)),
            Some(&1),
            "{}",
            delivery_id(d)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_past_its_timeout_is_503_yet_stored_once() {
    // No time at all. `timeout` polls the append once before its timer, and
    // the timer fires on the runtime's next 1 ms tick, so a write the log
    // finishes within that tick is still answered 202. A burst makes the
    // writer batch: the appends queued behind a batch's fsync are late.
    let env = Env::new("\n[store]\nappend_timeout = \"0s\"\n");
    assert_eq!(env.config().store.append_timeout, Duration::ZERO);
    let gw = Gateway::start(env.config()).await;
    let signer = env.signer("github");
    let url = gw.url("/hooks/github");

    let mut deliveries = Vec::new(); // (delivery, answer)
    for round in 0..5 {
        let signed: Vec<_> = (0..16)
            .map(|n| {
                signer
                    .sign("push", &unique_push_body(round * 100 + n))
                    .unwrap()
            })
            .collect();
        let answers = burst(&url, &signed).await;
        deliveries.extend(signed.into_iter().zip(answers));
        if deliveries
            .iter()
            .any(|(_, (s, _, _))| *s == StatusCode::SERVICE_UNAVAILABLE)
        {
            break;
        }
    }
    let mut late = Vec::new();
    for (signed, (status, retry, body)) in &deliveries {
        let what = crate::support::header(signed, "x-github-delivery");
        match *status {
            StatusCode::ACCEPTED => {}
            _ => {
                assert_store_busy(*status, retry, body, &what);
                late.push(signed.clone());
            }
        }
    }
    assert!(
        !late.is_empty(),
        "with append_timeout = 0s, {} appends in bursts of 16 were all answered in time",
        deliveries.len()
    );

    // The writes go on after the answers: every late event shows up in the
    // store, once.
    let wanted: std::collections::HashSet<String> = deliveries
        .iter()
        .map(|(s, _)| crate::support::header(s, "x-github-delivery"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let ids: std::collections::HashMap<String, String> = loop {
        let stored = crate::support::stored_events(&env);
        if stored.len() >= wanted.len() {
            assert_eq!(stored.len(), wanted.len(), "each delivery stored once");
            break stored.into_iter().map(|s| (s.delivery_id, s.id)).collect();
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} events reached the store in 20 s",
            stored.len(),
            wanted.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        ids.keys()
            .cloned()
            .collect::<std::collections::HashSet<_>>(),
        wanted,
        "each delivery stored once"
    );
    for (signed, (status, _, body)) in &deliveries {
        if *status == StatusCode::ACCEPTED {
            let delivery = crate::support::header(signed, "x-github-delivery");
            assert_eq!(body["id"], ids[&delivery].as_str(), "{body}");
        }
    }
    gw.stop().await;

    // The provider retries against a gateway with the default timeout: each
    // late delivery is a duplicate of what was stored, not a second event.
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(
        &env.config_path,
        text.replace("append_timeout = \"0s\"\n", ""),
    )
    .unwrap();
    assert_eq!(env.config().store.append_timeout, Duration::from_secs(5));
    let gw = Gateway::start(env.config()).await;
    let url = gw.url("/hooks/github");
    for signed in &late {
        let delivery = crate::support::header(signed, "x-github-delivery");
        let (status, _, body) = post_with_retry_after(&gw.client, &url, signed).await;
        assert_eq!(status, StatusCode::OK, "retry of {delivery}: {body}");
        assert_eq!(body["status"], "duplicate", "{body}");
        assert_eq!(body["id"], ids[&delivery].as_str(), "{body}");
    }
    gw.stop().await;

    let stored = crate::support::stored_events(&env);
    assert_eq!(stored.len(), wanted.len(), "no retry stored a second copy");
    let ro = sluice::store::sqlite::SqliteStore::open_read_only(&env.db()).unwrap();
    for signed in &late {
        let id = &ids[&crate::support::header(signed, "x-github-delivery")];
        let rec = sluice::store::sqlite::get_record(&ro, id).unwrap().unwrap();
        assert_eq!(rec.event.body, signed.body, "{id}");
    }
}
