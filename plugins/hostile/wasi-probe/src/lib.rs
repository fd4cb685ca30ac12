//! Hostile fixture `wasi-probe`: reports which WASI capabilities it was given.
//!
//! It tries to read `/etc/passwd`, to read `$HOME` (and counts the environment)
//! and to open a TCP connection to `127.0.0.1:1`, then returns one route to agent
//! `probe` whose labels say what happened:
//!
//! - `fs:denied` or `fs:open`
//! - `env:empty` or `env:set`, plus `env-vars:<n>`
//! - `net:denied` or `net:open` (a refused connection counts as `open`: the
//!   sandbox let the guest reach the host's network stack)
//!
//! and whose reason carries the error texts. The host links WASI with an empty
//! context, so every probe must come back denied or empty. Only meaningful when
//! built for `wasm32-wasip2`, where std really calls WASI; `build.sh` skips it on
//! the `wasm32-unknown-unknown` fallback, whose std denies all three without
//! asking the host and so would prove nothing.

use std::io::ErrorKind;

use sluice_rule::prelude::*;

/// Probes the sandbox.
pub struct WasiProbe;

impl Rule for WasiProbe {
    fn classify(_ev: &impl EventView) -> Result<Decision, String> {
        let (fs, fs_detail) = match std::fs::read_to_string("/etc/passwd") {
            Ok(text) => (
                "fs:open",
                format!("read {} bytes of /etc/passwd", text.len()),
            ),
            Err(e) => ("fs:denied", format!("/etc/passwd: {e}")),
        };
        let vars = std::env::vars_os().count();
        let (env, env_detail) = match std::env::var_os("HOME") {
            Some(home) => ("env:set", format!("HOME={}", home.to_string_lossy())),
            None if vars > 0 => ("env:set", "HOME unset".to_owned()),
            None => ("env:empty", "no environment".to_owned()),
        };
        let (net, net_detail) = match std::net::TcpStream::connect("127.0.0.1:1") {
            Ok(_) => ("net:open", "connected to 127.0.0.1:1".to_owned()),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                ("net:open", format!("127.0.0.1:1 refused: {e}"))
            }
            Err(e) => ("net:denied", format!("127.0.0.1:1: {e}")),
        };
        Ok(Route::to("probe")
            .priority(Priority::Low)
            .reason(format!("{fs_detail}; {env_detail}; {net_detail}"))
            .label(fs)
            .label(env)
            .label(format!("env-vars:{vars}"))
            .label(net)
            .into())
    }
}

export_rule!(WasiProbe);
