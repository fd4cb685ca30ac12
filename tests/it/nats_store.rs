//! The store conformance suite (`store.rs`), unchanged, against the NATS
//! JetStream backend: on one server, and on a three-server cluster with
//! three replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sluice::store::Store;
use sluice::store::nats::{NatsOptions, NatsStore};

use crate::nats_cluster::Nats;
use crate::store::{conformance, dedup_conformance, work_queue_conformance};

/// Options for a store on `nats` under its own `prefix`, its index in `dir`.
pub fn options(nats: &Nats, prefix: &str, dir: &std::path::Path) -> NatsOptions {
    NatsOptions {
        url: nats.url(),
        credentials: None,
        replicas: nats.len(),
        prefix: prefix.to_owned(),
        index_path: dir.join(format!("{prefix}-index.db")),
        dedup_ttl: Duration::from_secs(24 * 3600),
        max_attempts: 3,
        ack_wait: Duration::from_secs(30),
        append_timeout: Duration::from_secs(5),
    }
}

async fn open(options: NatsOptions) -> Arc<dyn Store> {
    Arc::new(NatsStore::open(options).await.expect("open the NATS store"))
}

/// Every part of the suite, each on stores of its own prefix.
async fn suite(nats: &Nats) {
    let dir = tempfile::tempdir().unwrap();
    conformance(open(options(nats, "conf", dir.path())).await).await;
    let window = Duration::from_millis(1500);
    dedup_conformance(
        open(NatsOptions {
            dedup_ttl: window,
            ..options(nats, "dedup", dir.path())
        })
        .await,
        window,
    )
    .await;
    let n = AtomicUsize::new(0);
    work_queue_conformance(async || {
        let i = n.fetch_add(1, Ordering::Relaxed);
        open(options(nats, &format!("wq{i}"), dir.path())).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_store_conforms_on_one_server() {
    let nats = Nats::single().await;
    suite(&nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_store_conforms_on_a_three_server_cluster() {
    let nats = Nats::cluster().await;
    suite(&nats).await;
}
