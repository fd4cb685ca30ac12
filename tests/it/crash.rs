//! Crash safety: thousands of concurrent events, SIGKILL mid-stream, restart on
//! the same data — every event that got a 202 is there, none twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use sluice::store::sqlite::SqliteStore;

use crate::support::{Env, ServeChild, client, compact, corpus, header, post, stored_events};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_event() {
    const TOTAL: usize = 3000;
    const CONCURRENCY: usize = 64;
    let env = Env::new("");
    let signer = env.signer("github");
    let payload: serde_json::Value = serde_json::from_slice(&compact(
        &std::fs::read(corpus().join("github/issues/opened.payload.json")).unwrap(),
    ))
    .unwrap();
    // Every body differs, so a body read back from the wrong place cannot pass.
    let requests: Arc<Vec<_>> = Arc::new(
        (0..TOTAL)
            .map(|i| {
                let mut p = payload.clone();
                p["issue"]["number"] = i.into();
                signer
                    .sign(
                        "issues",
                        &bytes::Bytes::from(serde_json::to_vec(&p).unwrap()),
                    )
                    .unwrap()
            })
            .collect(),
    );
    let sent_body: HashMap<String, bytes::Bytes> = requests
        .iter()
        .map(|r| (header(r, "x-github-delivery"), r.body.clone()))
        .collect();

    let mut server = ServeChild::spawn(&env.config_path);
    let base = server.base.clone();
    let url = format!("{base}/hooks/github");
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (requests, next, acked, url) =
            (requests.clone(), next.clone(), acked.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut got = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(r) = requests.get(i) else { break };
                let mut req = http::Request::post(&url);
                for (h, v) in &r.headers {
                    req = req.header(h, v);
                }
                let req = req.body(http_body_util::Full::new(r.body.clone())).unwrap();
                let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(10), client.request(req)).await
                else {
                    continue; // killed mid-request: not acknowledged
                };
                let status = resp.status();
                let Ok(bytes) = http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .map(|b| b.to_bytes())
                else {
                    continue;
                };
                if status == StatusCode::ACCEPTED {
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    got.push((
                        header(r, "x-github-delivery"),
                        v["id"].as_str().unwrap().to_string(),
                    ));
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            got
        }));
    }
    // Kill once a good share is acknowledged, while requests are still in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) < TOTAL / 3 {
        assert!(
            Instant::now() < deadline,
            "too slow: {} acked",
            acked.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    let mut acknowledged: HashMap<String, String> = HashMap::new();
    for t in tasks {
        acknowledged.extend(t.await.unwrap());
    }
    assert!(
        acknowledged.len() >= TOTAL / 3,
        "acknowledged {}",
        acknowledged.len()
    );
    assert!(acknowledged.len() < TOTAL, "the kill must land mid-stream");

    // Restart on the same data; every acknowledged event is there, none doubled.
    let server = ServeChild::spawn(&env.config_path);
    let base = server.base.clone();
    let conn = SqliteStore::open_read_only(&env.db()).unwrap();
    let rows = stored_events(&env);
    let mut by_delivery: HashMap<&str, &str> = HashMap::new();
    for r in &rows {
        assert!(
            by_delivery.insert(&r.delivery_id, &r.id).is_none(),
            "delivery {} stored twice",
            r.delivery_id
        );
    }
    for (delivery, id) in &acknowledged {
        assert_eq!(
            by_delivery.get(delivery.as_str()),
            Some(&id.as_str()),
            "acknowledged delivery {delivery} lost"
        );
        let rec = sluice::store::sqlite::get_record(&conn, id)
            .unwrap()
            .unwrap();
        assert_eq!(
            rec.event.body, sent_body[delivery],
            "the body of {id} came back intact"
        );
    }
    assert!(rows.len() <= TOTAL);

    // The sender retries everything: acknowledged ones are duplicates, the rest land once.
    let client = client();
    let url = format!("{base}/hooks/github");
    for r in requests.iter() {
        let (s, b) = post(&client, &url, &r.headers, r.body.clone()).await;
        let delivery = header(r, "x-github-delivery");
        if acknowledged.contains_key(&delivery) {
            assert_eq!(s, StatusCode::OK, "{delivery}: {b}");
            assert_eq!(
                b["id"].as_str(),
                acknowledged.get(&delivery).map(String::as_str)
            );
        } else {
            assert!(s == StatusCode::ACCEPTED || s == StatusCode::OK, "{s}: {b}");
        }
    }
    let rows = stored_events(&env);
    assert_eq!(
        rows.len(),
        TOTAL,
        "after the retry, each delivery is stored exactly once"
    );
    drop(server);
}

/// `/readyz` answers within about a second even when the store cannot take a
/// write (here another process holds SQLite's write lock, so the writer waits
/// out its 10 s busy timeout): 503 in time, then 200 once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_in_time_when_the_store_cannot_write() {
    let env = Env::new("");
    let gw = crate::support::Gateway::start(env.config()).await;
    let get = || async {
        let req = http::Request::get(gw.url("/readyz"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let started = Instant::now();
        let status = gw
            .client
            .request(req)
            .await
            .expect("readyz answers")
            .status();
        (status, started.elapsed())
    };
    assert_eq!(get().await.0, StatusCode::OK);

    let blocker = rusqlite::Connection::open(env.db()).expect("open the store's file");
    blocker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let (status, took) = get().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < Duration::from_secs(3), "/readyz took {took:?}");

    blocker.execute_batch("ROLLBACK").expect("release the lock");
    drop(blocker);
    // The probe that timed out still waits in the writer's queue; ready
    // again once the writer has the lock.
    let deadline = Instant::now() + Duration::from_secs(30);
    while get().await.0 != StatusCode::OK {
        assert!(Instant::now() < deadline, "/readyz never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.stop().await;
}
