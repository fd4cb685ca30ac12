//! `exec` agents: run a program with the envelope on stdin.
//!
//! The program is started directly (no shell) with an empty environment
//! apart from the agent's `env`, the gateway variables named in `env_pass`
//! and the signature headers as `WEBHOOK_ID`, `WEBHOOK_TIMESTAMP` and
//! `WEBHOOK_SIGNATURE`. Its stdout is the answer (up to
//! `max_response_bytes`; the rest is read and dropped so the program never
//! blocks on a full pipe); stderr is discarded. Exit 0 is delivered; a
//! program still running at the agent's `timeout` is killed.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, ChildStdout, Command};

use super::{Outcome, Request, Transport, json_answer, key};
use crate::dispatch::config::AgentConfig;

/// An `exec` agent's transport.
pub struct ExecTransport {
    program: String,
    args: Vec<String>,
    /// The literal `env` values.
    env: BTreeMap<String, String>,
    /// Gateway variables passed through, read at each run.
    env_pass: Vec<String>,
    timeout: Duration,
    max_response_bytes: usize,
}

impl std::fmt::Debug for ExecTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The `env` values may be a program's credentials: names only.
        f.debug_struct("ExecTransport")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("env_pass", &self.env_pass)
            .field("timeout", &self.timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish()
    }
}

impl ExecTransport {
    /// The transport of `exec` agent `name`.
    pub fn new(name: &str, agent: &AgentConfig) -> Result<ExecTransport, String> {
        let at = key(name, "command");
        let (program, args) = agent
            .command
            .as_deref()
            .and_then(|c| c.split_first())
            .filter(|(p, _)| !p.is_empty())
            .ok_or_else(|| {
                format!("{at}: an exec agent needs `command` = [\"program\", \"arg\", …]")
            })?;
        for (var, what) in agent
            .env
            .keys()
            .map(|k| (k, "env"))
            .chain(agent.env_pass.iter().map(|k| (k, "env_pass")))
        {
            if var.is_empty() || var.contains(['=', '\0']) {
                return Err(format!(
                    "{}: {var:?} is not an environment variable name",
                    key(name, what)
                ));
            }
        }
        if agent.env.values().any(|v| v.contains('\0')) {
            return Err(format!("{}: a value holds a NUL byte", key(name, "env")));
        }
        Ok(ExecTransport {
            program: program.clone(),
            args: args.to_vec(),
            env: agent.env.clone(),
            env_pass: agent.env_pass.clone(),
            timeout: agent.timeout,
            max_response_bytes: agent.max_response_bytes,
        })
    }

    fn command(&self, request: &Request) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env_clear()
            .envs(&self.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for name in &self.env_pass {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        for (name, value) in &request.headers {
            cmd.env(name.to_ascii_uppercase().replace('-', "_"), value);
        }
        cmd
    }
}

#[async_trait]
impl Transport for ExecTransport {
    async fn send(&self, request: &Request) -> Outcome {
        let mut child = match self.command(request).spawn() {
            Ok(child) => child,
            Err(e) => {
                let error = format!("cannot start {}: {e}", self.program);
                // Missing or not executable: no later attempt does better.
                return match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                        Outcome::Final {
                            status: None,
                            error,
                            response_bytes: 0,
                        }
                    }
                    _ => Outcome::Retry {
                        status: None,
                        error,
                        retry_after: None,
                        response_bytes: 0,
                    },
                };
            }
        };
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let cap = self.max_response_bytes;
        let run = async {
            let ((), read) = tokio::join!(feed(stdin, &request.body), read_capped(stdout, cap));
            (child.wait().await, read)
        };
        let ran = tokio::time::timeout(self.timeout, run).await;
        let (status, read) = match ran {
            Ok(done) => done,
            Err(_) => {
                // Reap it now rather than leave it to `kill_on_drop`.
                let _ = child.kill().await;
                return Outcome::retry(format!(
                    "timed out after {}; the program was killed",
                    humantime::format_duration(self.timeout)
                ));
            }
        };
        let (answer, complete) = read;
        let response_bytes = answer.len() as u64;
        match status {
            Ok(status) if status.success() => Outcome::Delivered {
                status: None,
                answer: complete.then(|| json_answer(&answer)).flatten(),
                response_bytes,
            },
            Ok(status) => Outcome::Retry {
                status: None,
                error: exit_error(status),
                retry_after: None,
                response_bytes,
            },
            Err(e) => Outcome::Retry {
                status: None,
                error: format!("cannot wait for {}: {e}", self.program),
                retry_after: None,
                response_bytes,
            },
        }
    }
}

/// Writes the body to the program's stdin and closes it. A program that
/// exits without reading it all is not an error here: its exit status says
/// how it went.
async fn feed(stdin: Option<ChildStdin>, body: &[u8]) {
    if let Some(mut stdin) = stdin {
        let _ = stdin.write_all(body).await;
        let _ = stdin.shutdown().await;
    }
}

/// Reads stdout to its end, keeping the first `cap` bytes; whether it was
/// all kept.
async fn read_capped(stdout: Option<ChildStdout>, cap: usize) -> (Vec<u8>, bool) {
    let Some(stdout) = stdout else {
        return (Vec::new(), true);
    };
    let mut kept = Vec::new();
    let mut limited = stdout.take(cap as u64);
    if limited.read_to_end(&mut kept).await.is_err() {
        return (kept, false);
    }
    // Past the cap: drain and drop, so the program is not stuck on a full pipe.
    let mut rest = limited.into_inner();
    let over = tokio::io::copy(&mut rest, &mut tokio::io::sink())
        .await
        .map_or(true, |n| n > 0);
    (kept, !over)
}

fn exit_error(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("ended: {status}"),
    }
}
