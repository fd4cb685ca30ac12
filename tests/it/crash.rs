//! Crash safety: thousands of concurrent events, SIGKILL mid-stream, restart on
//! the same data — every event that got a 202 is there, none twice. And the
//! event log's damage at start: a torn record at its tail is cut off, a
//! segment shorter than the index claims loses only the events past its end,
//! a record damaged behind the applied position is dead-lettered as lost,
//! never handed out; a kill during the index's replay of the log loses and
//! doubles nothing.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use sluice::event::EventStatus;
use sluice::store::log::{self, Record, RecordRef, ScanEnd};
use sluice::store::sqlite::{Options, SqliteStore};
use sluice::store::{Appended, ListFilter, Store};

use crate::store::event_with_body;
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

/// A body of its own for event `i`, so one read back from the wrong record
/// cannot pass.
fn body(i: usize) -> Bytes {
    Bytes::from(format!(r#"{{"action":"opened","n":{i}}}"#))
}

/// Event `i`: delivery `d{i}` of source `s`, with [`body`]`(i)`.
fn numbered(i: usize) -> sluice::ingress::NewEvent {
    event_with_body("s", &format!("d{i}"), "k", body(i))
}

/// Opens the store at `db` with segments rolling over past `segment_bytes`.
fn open(db: &Path, segment_bytes: u64) -> Arc<SqliteStore> {
    let options = Options {
        segment_bytes,
        ..Options::default()
    };
    Arc::new(SqliteStore::open_with(db, options).expect("the store opens"))
}

/// Appends events `range` ([`numbered`]), up to 1,024 at a time, and returns
/// each one's outcome.
async fn append_all(store: &Arc<SqliteStore>, range: Range<usize>) -> Vec<Appended> {
    let mut out = Vec::with_capacity(range.len());
    let all: Vec<usize> = range.collect();
    for window in all.chunks(1024) {
        let tasks: Vec<_> = window
            .iter()
            .map(|&i| {
                let store = store.clone();
                tokio::spawn(async move { store.append(numbered(i)).await.expect("append") })
            })
            .collect();
        for t in tasks {
            out.push(t.await.unwrap());
        }
    }
    out
}

/// Appends events `range`, each new, and returns each one's (id, body).
async fn store_new(store: &Arc<SqliteStore>, range: Range<usize>) -> Vec<(String, Bytes)> {
    let start = range.start;
    append_all(store, range)
        .await
        .into_iter()
        .enumerate()
        .map(|(k, a)| match a {
            Appended::Stored(id) => (id, body(start + k)),
            other => panic!("event {} is new: {other:?}", start + k),
        })
        .collect()
}

/// A closed store in a new temp dir holding events `range` in one segment:
/// the dir, the index path, the segment's path and each event's (id, body).
async fn closed_store_with(
    range: Range<usize>,
) -> (tempfile::TempDir, PathBuf, PathBuf, Vec<(String, Bytes)>) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    let seg = segment(&db, 1);
    let store = open(&db, log::SEGMENT_BYTES);
    let stored = store_new(&store, range).await;
    close(store);
    (dir, db, seg, stored)
}

/// Closes the store and lets go of its files.
fn close(store: Arc<SqliteStore>) {
    store.close();
    assert_eq!(Arc::strong_count(&store), 1, "the store is shared still");
}

/// Segment `n` of the log beside `db`.
fn segment(db: &Path, n: u32) -> PathBuf {
    log::segment_path(&log::dir_for(db), n)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("the file is there").len()
}

/// Every record of segment `n`, where it lies, and how the segment ends.
fn records(db: &Path, n: u32) -> (Vec<(RecordRef, Record)>, ScanEnd) {
    let mut out = Vec::new();
    let end = log::scan::<()>(&log::dir_for(db), n, 0, |at, rec| {
        out.push((at, rec));
        Ok(())
    })
    .expect("the segment reads")
    .expect("nothing stops the scan");
    (out, end)
}

/// Asserts that every segment of the log holds whole, valid records only,
/// and that they are the events `ids`.
fn assert_log_whole(db: &Path, ids: &[&str]) {
    let mut seen = Vec::new();
    for n in log::segments(&log::dir_for(db)).unwrap() {
        let (recs, end) = records(db, n);
        assert_eq!(
            end,
            ScanEnd::Clean(file_len(&segment(db, n))),
            "segment {n} holds whole records only"
        );
        seen.extend(recs.into_iter().map(|(_, r)| r.id));
    }
    seen.sort_unstable();
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    assert_eq!(seen, ids, "the log holds exactly these events");
}

/// Asserts that each event reads back with its body, and that the store
/// holds these events and no others.
async fn assert_holds(store: &SqliteStore, events: &[(String, Bytes)]) {
    for (id, body) in events {
        let rec = store
            .get(id)
            .await
            .unwrap_or_else(|e| panic!("{id} reads: {e}"))
            .unwrap_or_else(|| panic!("{id} is stored"));
        assert_eq!(&rec.event.body, body, "{id} reads back its own body");
    }
    let listed: HashSet<String> = store
        .list(&ListFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    let expected: HashSet<String> = events.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(listed, expected, "the store holds exactly these events");
}

/// An event's status and last error as the index holds them (the store's
/// `get` cannot hand out an event whose record is lost).
fn index_row(db: &Path, id: &str) -> (String, Option<String>) {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("the index opens read-only");
    conn.query_row(
        "SELECT status, last_error FROM events WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap_or_else(|e| panic!("{id} is in the index: {e}"))
}

/// Asserts that `id` is dead-lettered as lost, naming `segment` and `why`,
/// and that reading it is an error naming the segment, never a body.
async fn assert_lost(store: &SqliteStore, db: &Path, id: &str, segment: &Path, why: &str) {
    let name = segment.file_name().unwrap().to_str().unwrap();
    let (status, last_error) = index_row(db, id);
    let last_error = last_error.unwrap_or_default();
    assert_eq!(status, EventStatus::Dead.as_str(), "{id}: {last_error}");
    assert!(
        last_error.starts_with("lost:") && last_error.contains(name) && last_error.contains(why),
        "{id} is dead-lettered as lost from {name} ({why}): {last_error}"
    );
    match store.get(id).await {
        Ok(Some(rec)) => panic!("lost event {id} was read back as {:?}", rec.event.body),
        Ok(None) => panic!("lost event {id} left the index"),
        Err(e) => assert!(e.to_string().contains(name), "{id}: {e}"),
    }
}

/// Claims everything claimable, at most `batch` a time, for a lease that
/// outlasts the test; returns each claimed event's (id, body).
async fn claim_all(store: &SqliteStore, batch: usize) -> Vec<(String, Bytes)> {
    let mut out = Vec::new();
    loop {
        let got = store
            .claim("w", batch, Duration::from_secs(600))
            .await
            .expect("claim");
        if got.is_empty() {
            return out;
        }
        out.extend(got.into_iter().map(|c| (c.event.id, c.event.body)));
    }
}

/// Deletes the index beside the log, so the next start rebuilds it from the log.
fn remove_index(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", db.display()));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
}

/// The record the writer would have logged next for event `i`: after the
/// last one in segment `n`, never applied to the index (as when the writer
/// dies between the log's sync and the index commit).
fn unindexed_record(db: &Path, n: u32, i: usize) -> Record {
    let (recs, _) = records(db, n);
    let last = recs.last().expect("a record").1.clone();
    let ev = numbered(i);
    Record {
        seq: last.seq + 1,
        id: format!("evt_unindexed{i}"),
        delivery_id: ev.delivery_id().to_string(),
        body_sha256: ev.body_sha256().to_string(),
        dedup_key: ev.dedup_key(),
        body: ev.body().clone(),
        ..last
    }
}

/// How the bytes after the last record the index applied look at start.
#[derive(Debug, Clone, Copy)]
enum Tail {
    /// A whole record: it was written, it is replayed.
    Whole,
    /// The first `n` bytes of a record.
    Prefix(usize),
    /// A whole record whose frame claims more bytes than the file holds.
    LengthPastEnd,
    /// A whole record with one byte of its payload flipped.
    FlippedByte,
    /// Zeros, as a file extended but never written leaves them.
    Zeros,
}

impl Tail {
    fn bytes(self, rec: &Record) -> Vec<u8> {
        let mut frame = Vec::new();
        let len = rec.frame_into(&mut frame) as usize;
        match self {
            Tail::Whole => frame,
            Tail::Prefix(n) => frame[..n].to_vec(),
            Tail::LengthPastEnd => {
                frame[0..4].copy_from_slice(&(len as u32 + 100).to_le_bytes());
                frame
            }
            Tail::FlippedByte => {
                frame[len - 3] ^= 0x20; // in the body, at the payload's end
                frame
            }
            Tail::Zeros => vec![0; 4096],
        }
    }
}

/// A torn record at the log's tail (the newest segment's; written, never
/// applied to the index, so never acknowledged) is cut off at start and kept
/// beside the segment; every acknowledged event reads back, and appends after
/// it land right after the last whole record. A whole record there is
/// replayed instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_record_at_the_log_tail_is_cut_off_and_kept_aside() {
    let (_dir, db, seg, mut stored) = closed_store_with(0..20).await;
    let mut next = 20;
    for tail in [
        Tail::Whole,
        Tail::Prefix(5),
        Tail::Prefix(40),
        Tail::LengthPastEnd,
        Tail::FlippedByte,
        Tail::Zeros,
    ] {
        let clean_len = file_len(&seg);
        let rec = unindexed_record(&db, 1, next);
        next += 1;
        let torn = tail.bytes(&rec);
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        std::io::Write::write_all(&mut f, &torn).unwrap();
        drop(f);

        let store = open(&db, log::SEGMENT_BYTES);
        let aside = seg.with_extension(format!("seg.torn-{clean_len}"));
        if let Tail::Whole = tail {
            stored.push((rec.id.clone(), rec.body.clone()));
            assert_eq!(file_len(&seg), clean_len + torn.len() as u64);
            assert!(!aside.exists(), "nothing was cut");
        } else {
            assert_eq!(
                file_len(&seg),
                clean_len,
                "{tail:?}: the torn bytes are cut off"
            );
            assert_eq!(
                std::fs::read(&aside).unwrap_or_default(),
                torn,
                "{tail:?}: the torn bytes are kept in {}",
                aside.display()
            );
        }
        assert_holds(&store, &stored).await;
        let new = store_new(&store, next..next + 3).await;
        next += 3;
        stored.extend(new);
        assert_holds(&store, &stored).await;
        close(store);
        // The new records follow the last whole one: the segment is whole
        // records from start to end, every stored event among them.
        let ids: Vec<&str> = stored.iter().map(|(id, _)| id.as_str()).collect();
        assert_log_whole(&db, &ids);
    }
}

/// A flipped byte in a record the index has applied (an acknowledged
/// event's) is not cut off at start: the event stays, and is never handed
/// out with the damaged bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_the_index_applied_is_never_handed_out() {
    let (_dir, db, seg, stored) = closed_store_with(0..10).await;
    let (recs, _) = records(&db, 1);
    let (last_at, last) = recs.last().unwrap().clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    let len = bytes.len();
    bytes[len - 3] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();
    assert_eq!(last_at.end().offset, len as u64);

    let store = open(&db, log::SEGMENT_BYTES);
    assert_eq!(
        file_len(&seg),
        len as u64,
        "an acknowledged record is not cut off"
    );
    let claimed = claim_all(&store, 100).await;
    let kept: Vec<_> = stored
        .iter()
        .filter(|(id, _)| *id != last.id)
        .cloned()
        .collect();
    assert_eq!(
        sorted(claimed),
        sorted(kept),
        "the others are handed out intact"
    );
    assert_lost(&store, &db, &last.id, &seg, "checksum mismatch").await;
    assert_eq!(store.queue_depth().await.unwrap(), 9);
    close(store);
}

/// Damage in the middle of the newest segment is not a torn tail: an index
/// rebuilt from the log skips the damaged record and keeps every whole
/// record after it, and the segment is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_past_damage_mid_segment_keeps_the_records_after_it() {
    let (dir, db, seg, stored) = closed_store_with(0..10).await;
    let (recs, _) = records(&db, 1);
    let (at, damaged) = recs[4].clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[at.offset as usize + 40] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();
    remove_index(&db);

    let store = open(&db, log::SEGMENT_BYTES);
    assert_eq!(file_len(&seg), bytes.len() as u64, "nothing is cut");
    let kept: Vec<_> = stored
        .iter()
        .filter(|(id, _)| *id != damaged.id)
        .cloned()
        .collect();
    assert_holds(&store, &kept).await;
    assert!(
        !std::fs::read_dir(dir.path().join("s.log"))
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains("torn")),
        "no torn tail was set aside"
    );
    // New appends land after the whole segment and read back.
    let new = store_new(&store, 10..12).await;
    let mut all = kept.clone();
    all.extend(new);
    assert_holds(&store, &all).await;
    close(store);
}

fn sorted(mut v: Vec<(String, Bytes)>) -> Vec<(String, Bytes)> {
    v.sort();
    v
}

/// A newest segment cut short inside a record: the events past its end are
/// dead-lettered as lost (naming the segment), the rest are intact; new
/// appends land after the last whole record, where lost ones were, and read
/// back right while the lost ones still read as errors; the index rebuilt
/// from the log holds every kept and new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_segment_shorter_than_the_index_claims_loses_only_what_is_past_its_end() {
    let (_dir, db, seg, stored) = closed_store_with(0..12).await;
    let (recs, _) = records(&db, 1);
    let first_lost = recs[recs.len() - 4].0;
    let lost: Vec<String> = recs[recs.len() - 4..]
        .iter()
        .map(|(_, r)| r.id.clone())
        .collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(first_lost.offset + 5)
        .unwrap();
    let kept: Vec<_> = stored
        .iter()
        .filter(|(id, _)| !lost.contains(id))
        .cloned()
        .collect();

    let store = open(&db, log::SEGMENT_BYTES);
    for id in &lost {
        assert_lost(&store, &db, id, &seg, "past the end").await;
    }
    let dead: HashSet<String> = store
        .list(&ListFilter {
            status: Some(EventStatus::Dead),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(
        dead,
        lost.iter().cloned().collect(),
        "only the lost are dead"
    );
    for (id, body) in &kept {
        assert_eq!(&store.get(id).await.unwrap().unwrap().event.body, body);
    }
    let new = store_new(&store, 12..18).await;
    let (recs, end) = records(&db, 1);
    assert_eq!(
        end,
        ScanEnd::Clean(file_len(&seg)),
        "the new records follow the last whole one, not the cut one's bytes"
    );
    let first_new = recs
        .iter()
        .filter(|(_, r)| new.iter().any(|(id, _)| *id == r.id))
        .map(|(at, _)| at.offset)
        .min();
    assert_eq!(
        first_new,
        Some(first_lost.offset),
        "where the lost ones were"
    );
    let aside = seg.with_extension(format!("seg.torn-{}", first_lost.offset));
    assert_eq!(
        std::fs::read(&aside).unwrap_or_default().len(),
        5,
        "the cut bytes are kept"
    );
    for id in &lost {
        assert_lost(&store, &db, id, &seg, "past the end").await;
    }
    let mut live = kept.clone();
    live.extend(new.iter().cloned());
    assert_eq!(
        sorted(claim_all(&store, 100).await),
        sorted(live.clone()),
        "the kept and the new events are handed out, the lost ones not"
    );
    assert_eq!(store.queue_depth().await.unwrap(), live.len() as u64);
    // A provider's redelivery of a lost event is stored again; one of a kept
    // event is still its duplicate.
    let again = append_all(&store, 0..12).await;
    for (i, ((id, _), a)) in stored.iter().zip(&again).enumerate() {
        match a {
            Appended::Stored(new) if lost.contains(id) => live.push((new.clone(), body(i))),
            a => assert_eq!(a, &Appended::Duplicate(id.clone()), "{id}"),
        }
    }
    assert_eq!(live.len(), kept.len() + new.len() + lost.len());
    close(store);
    let ids: Vec<&str> = live.iter().map(|(id, _)| id.as_str()).collect();
    assert_log_whole(&db, &ids);

    // The index rebuilt from the log holds every kept and new event.
    remove_index(&db);
    let store = open(&db, log::SEGMENT_BYTES);
    assert_holds(&store, &live).await;
    close(store);
}

/// Damage the start-up check cannot see (it compares the segment the index
/// has applied up to with that position): an older segment cut short, and a
/// record zeroed in place behind the applied position. A claim dead-letters
/// those events as lost, naming the segment, and hands out the others intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_damaged_behind_the_applied_position_are_dead_lettered_at_claim() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.db");
    // Small segments, one batch at a time: a few records each.
    let store = open(&db, 2048);
    let mut stored = Vec::new();
    for i in 0..24 {
        stored.extend(store_new(&store, i..i + 1).await);
    }
    close(store);
    let segments = log::segments(&log::dir_for(&db)).unwrap();
    assert!(segments.len() >= 3, "segments: {segments:?}");
    // The oldest segment loses its last record's second half.
    let (oldest, newest) = (segments[0], *segments.last().unwrap());
    let (recs, _) = records(&db, oldest);
    let (cut, cut_rec) = recs.last().unwrap().clone();
    std::fs::OpenOptions::new()
        .write(true)
        .open(segment(&db, oldest))
        .unwrap()
        .set_len(cut.offset + u64::from(cut.len) / 2)
        .unwrap();
    // The newest one's first record reads as zeros, its length unchanged.
    let (recs, _) = records(&db, newest);
    assert!(
        recs.len() >= 2,
        "the newest segment holds {} records",
        recs.len()
    );
    let (zeroed, zeroed_rec) = recs[0].clone();
    let path = segment(&db, newest);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[zeroed.offset as usize..zeroed.end().offset as usize].fill(0);
    std::fs::write(&path, &bytes).unwrap();

    let store = open(&db, 2048);
    assert!(
        store
            .list(&ListFilter::default())
            .await
            .unwrap()
            .iter()
            .all(|s| s.status == EventStatus::Pending),
        "nothing is marked at start: the damage is behind the applied position"
    );
    let victims = [cut_rec.id.clone(), zeroed_rec.id.clone()];
    let kept: Vec<_> = stored
        .iter()
        .filter(|(id, _)| !victims.contains(id))
        .cloned()
        .collect();
    assert_eq!(
        sorted(claim_all(&store, 5).await),
        sorted(kept.clone()),
        "every other event is handed out intact"
    );
    assert_lost(
        &store,
        &db,
        &cut_rec.id,
        &segment(&db, oldest),
        "shorter than",
    )
    .await;
    assert_lost(&store, &db, &zeroed_rec.id, &path, "damaged").await;
    assert_eq!(store.queue_depth().await.unwrap(), kept.len() as u64);
    close(store);
}

/// The applied position of the index at `db`, read the way another process
/// would: `None` while the index has no such row (or no file) yet.
fn applied_offset(conn: &rusqlite::Connection) -> Option<u64> {
    conn.query_row("SELECT offset FROM log_applied WHERE one = 1", [], |r| {
        r.get::<_, i64>(0)
    })
    .ok()
    .map(|o| o as u64)
}

/// Starts `sluice serve` on `env`'s data and SIGKILLs it as soon as its
/// index has applied the log past `past` bytes (at most 20 s); returns the
/// applied position it left.
fn kill_mid_replay(env: &Env, past: u64) -> u64 {
    let db = env.db();
    let mut server = ServeChild::start(&env.config_path);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut index = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "the replay never went past {past}"
        );
        if index.is_none() && db.exists() {
            index = rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .ok();
        }
        if let Some(at) = index.as_ref().and_then(applied_offset)
            && at > past
        {
            server.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    applied_offset(index.as_ref().expect("the index")).expect("an applied position")
}

/// A `sluice serve` SIGKILLed while it replays the log into an index
/// rebuilt from nothing, and again while the next one resumes: the start
/// after that finishes the replay, and every logged event is there exactly
/// once (ids, dedup keys), each in the work queue once, with its own body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_index_replay_loses_and_doubles_nothing() {
    let env = Env::new("");
    let db = env.db();
    let seg = segment(&db, 1);
    let mut stored: Vec<(String, Bytes)> = Vec::new();
    let mut caught = None;
    // The log grows until a kill lands mid-replay (the first size nearly always does).
    for more in [30_000, 60_000, 120_000] {
        let store = open(&db, log::SEGMENT_BYTES);
        stored.extend(store_new(&store, stored.len()..stored.len() + more).await);
        close(store);
        remove_index(&db);
        let log_end = file_len(&seg);
        let at = kill_mid_replay(&env, 0);
        assert!(at <= log_end);
        if at < log_end {
            caught = Some((at, log_end));
            break;
        }
    }
    let (at, log_end) = caught.expect("a kill landed mid-replay");
    // Killed again once the next start has gone further: it resumed there.
    let again = kill_mid_replay(&env, at);
    eprintln!("killed with {at}, then {again}, of {log_end} log bytes applied");

    let store = open(&db, log::SEGMENT_BYTES);
    let listed = store.list(&ListFilter::default()).await.unwrap();
    assert_eq!(listed.len(), stored.len(), "every logged event, once");
    let ids: HashSet<&str> = listed.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, stored.iter().map(|(id, _)| id.as_str()).collect());
    let deliveries: HashSet<&str> = listed.iter().map(|s| s.delivery_id.as_str()).collect();
    assert_eq!(deliveries.len(), stored.len(), "each delivery once");
    // Each dedup key names its one event: every delivery again is a duplicate of it.
    let again = append_all(&store, 0..stored.len()).await;
    for ((id, _), a) in stored.iter().zip(&again) {
        assert_eq!(a, &Appended::Duplicate(id.clone()));
    }
    // None was routed (the index was rebuilt): each is in the work queue, once.
    assert_eq!(store.queue_depth().await.unwrap(), stored.len() as u64);
    let claimed = claim_all(&store, 5_000).await;
    assert_eq!(claimed.len(), stored.len(), "each event is queued once");
    assert_eq!(sorted(claimed), sorted(stored.clone()), "with its own body");
    close(store);
}
