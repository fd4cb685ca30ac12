//! `outbox` agents: append each delivery as one JSON line to
//! `<data_dir>/<dispatch.outbox_dir>/NAME.jsonl`.
//!
//! A line is `{"agent": …, "at_ms": …, "headers": {"webhook-id": …, …},
//! "envelope": …}` with the envelope embedded as the JSON it is, byte for
//! byte. Each line is one `write` on a file opened with `O_APPEND`, and the
//! writers of one file (in this process, whichever transport they belong
//! to) take turns, so a line never interleaves with another. The file is
//! opened per line, so an operator may move it away at any time.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{Outcome, Request, Transport};

/// One lock per outbox file, shared by every transport writing to it (a
/// reload builds new transports while old ones may still be writing).
static LOCKS: LazyLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = LazyLock::new(Default::default);

/// An `outbox` agent's transport.
#[derive(Debug)]
pub struct OutboxTransport {
    agent: String,
    path: PathBuf,
    lock: Arc<Mutex<()>>,
}

/// One line of an outbox file.
#[derive(Serialize)]
struct Line<'a> {
    agent: &'a str,
    at_ms: i64,
    headers: BTreeMap<&'a str, &'a str>,
    envelope: &'a RawValue,
}

impl OutboxTransport {
    /// The transport of `outbox` agent `name`; the file and its directory
    /// are created on the first delivery.
    pub fn new(name: &str, config: &crate::config::Config) -> Result<OutboxTransport, String> {
        // The name becomes a file name: keep it one plain path component.
        if name.is_empty()
            || name.starts_with('.')
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "agents.{name}: an outbox agent's name is its file name: use letters, digits, `-`, `_` and `.` (not first)"
            ));
        }
        let path = config
            .data_dir()
            .join(&config.dispatch.outbox_dir)
            .join(format!("{name}.jsonl"));
        let lock = LOCKS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(path.clone())
            .or_default()
            .clone();
        Ok(OutboxTransport {
            agent: name.to_string(),
            path,
            lock,
        })
    }
}

/// Appends `line` to `path` in one write, creating the file and its
/// directory if need be.
fn append(path: &Path, line: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    file.write_all(line)?;
    file.flush()
}

#[async_trait]
impl Transport for OutboxTransport {
    async fn send(&self, request: &Request) -> Outcome {
        let envelope = match serde_json::from_slice::<&RawValue>(&request.body) {
            Ok(raw) => raw,
            Err(e) => {
                return Outcome::fail(format!("the envelope is not JSON: {e}"));
            }
        };
        let at_ms = crate::event::now_ms();
        let line = Line {
            agent: &self.agent,
            at_ms,
            headers: request
                .headers
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect(),
            envelope,
        };
        let mut bytes = serde_json::to_vec(&line).expect("string keys and valid JSON");
        // The envelope embeds the payload byte for byte, line breaks of a
        // pretty-printed body included. Outside strings (where JSON escapes
        // them) they are whitespace: a space is the same JSON, on one line.
        for b in bytes.iter_mut() {
            if matches!(*b, b'\n' | b'\r') {
                *b = b' ';
            }
        }
        bytes.push(b'\n');
        let path = self.path.clone();
        let lock = self.lock.clone();
        let written = tokio::task::spawn_blocking(move || {
            let _turn = lock.lock().unwrap_or_else(|e| e.into_inner());
            append(&path, &bytes)
        })
        .await;
        match written {
            Ok(Ok(())) => Outcome::Delivered {
                status: None,
                answer: None,
                response_bytes: 0,
            },
            Ok(Err(e)) => Outcome::retry(format!("cannot append to {}: {e}", self.path.display())),
            Err(e) => Outcome::retry(format!("writing {} failed: {e}", self.path.display())),
        }
    }
}
