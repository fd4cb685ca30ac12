//! Hostile fixture `logflood`: writes `lines` log lines per call (config,
//! default 1,000), each with a 2 KiB message and 20 fields of 300 bytes, then
//! routes the event to agent `logflood` as if nothing happened.
//!
//! Proves the host bounds what a rule's logging costs it: lines past the
//! per-call cap and past the rule's rate are dropped and counted, the host's
//! log gets one warning saying how many, and the event keeps its route.

use sluice_rule::prelude::*;

/// Floods the host's log, then answers normally.
pub struct LogFlood;

impl Rule for LogFlood {
    fn classify(ev: &impl EventView) -> Result<Decision, String> {
        let lines: u32 = config::get_or("lines", "1000").parse().unwrap_or(1000);
        let filler = "x".repeat(2048);
        let fields: Vec<(String, String)> = (0..20)
            .map(|i| (format!("field{i}"), filler[..300].to_owned()))
            .collect();
        let fields: Vec<(&str, &str)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        for i in 0..lines {
            log::log(
                log::Level::Info,
                &format!("flood line {i} {filler}"),
                &fields,
            );
        }
        Ok(Route::to("logflood")
            .reason(format!("{} after {lines} log lines", ev.kind()))
            .into())
    }
}

export_rule!(LogFlood);
