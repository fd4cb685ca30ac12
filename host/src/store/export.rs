//! The export format: what `sluice events export` writes and `sluice events
//! import` reads, one JSON object per line (JSONL), so that a store can be
//! backed up, or moved from the embedded backend to another one.
//!
//! The first line is a [`Header`] (`{"sluice_export":1,...}`) naming the
//! format version; every other line is one [`ExportedEvent`]: the event as
//! stored (id, metadata, kept headers, body), where it is in its life
//! (status, attempts, last error), its latest decision, and the deliveries
//! and workflow runs that decision made, with their state and attempts.
//!
//! The body is carried byte for byte: as the JSON text itself when it is a
//! JSON document on one line with no surrounding whitespace (what intake
//! stores), else base64 ([`BodyEncoding::Base64`]). Decisions, delivery
//! inputs and answers are the stored JSON text, never re-serialised. This
//! module only defines and checks the format; each backend reads and writes
//! it through [`super::EventReader::export_page`] and
//! [`super::Store::import`]. It never touches a backend itself.

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::decision::{Decision, Priority, Route};
use crate::event::{EventStatus, IdOrigin, Provider};
use crate::store::dispatch::{AttemptRecord, DeliveryStatus};

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The first line of an export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    /// The format version ([`FORMAT_VERSION`]).
    pub sluice_export: u32,
    /// The version of sluice that wrote it.
    pub sluice_version: String,
    /// When the export started (ms since the epoch).
    pub exported_at_ms: i64,
    /// Only events received at or after this time were exported, when set.
    #[serde(default)]
    pub since_ms: Option<i64>,
}

impl Header {
    /// The header of an export made now by this build.
    pub fn new(since_ms: Option<i64>) -> Header {
        Header {
            sluice_export: FORMAT_VERSION,
            sluice_version: env!("CARGO_PKG_VERSION").to_string(),
            exported_at_ms: crate::event::now_ms(),
            since_ms,
        }
    }

    /// Reads and checks a first line: it must be a header of a format this
    /// build knows. The error says what is wrong, for the caller to put
    /// beside the file and line.
    pub fn parse(line: &str) -> Result<Header, String> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let Some(version) = value.get("sluice_export") else {
            return Err(
                "not a sluice export: the first line has no \"sluice_export\" version".into(),
            );
        };
        if version.as_u64() != Some(u64::from(FORMAT_VERSION)) {
            return Err(format!(
                "export format {version}; this build reads format {FORMAT_VERSION}"
            ));
        }
        serde_json::from_value(value).map_err(|e| format!("bad header: {e}"))
    }
}

/// How an [`ExportedEvent`]'s `body` holds the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyEncoding {
    /// `body` is the body itself, a JSON document.
    #[default]
    Json,
    /// `body` is a string: the body's bytes in standard base64.
    Base64,
}

/// One event with everything the store knows of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportedEvent {
    /// The store's id (`evt_…`), kept by an import.
    pub id: String,
    /// The configured source.
    pub source: String,
    /// The provider behind it.
    pub provider: Provider,
    /// The event kind.
    pub kind: String,
    /// The action, if any.
    #[serde(default)]
    pub action: Option<String>,
    /// The provider's delivery id (or `sha256:` + the body hash).
    pub delivery_id: String,
    /// Whether the signature covered the delivery id.
    pub id_origin: IdOrigin,
    /// An earlier event of the same source with this unsigned delivery id
    /// and another body.
    #[serde(default)]
    pub conflict_with: Option<String>,
    /// Arrival, in milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// Headers kept for rules.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Hex SHA-256 of the body; an import recomputes it when absent and
    /// refuses a body that does not match it.
    #[serde(default)]
    pub body_sha256: Option<String>,
    /// How `body` holds the bytes.
    #[serde(default)]
    pub body_encoding: BodyEncoding,
    /// The body (see [`BodyEncoding`]).
    pub body: Box<RawValue>,
    /// Where the event is in its life (`claimed`: a router worker held it).
    pub status: EventStatus,
    /// Claims by router workers so far.
    #[serde(default)]
    pub attempts: u32,
    /// The last routing error, or a dead letter's reason.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When it was dead-lettered, for a dead event.
    #[serde(default)]
    pub dead_at_ms: Option<i64>,
    /// The latest decision, as stored.
    #[serde(default)]
    pub decision: Option<Box<RawValue>>,
    /// Its deliveries, in the order they were queued.
    #[serde(default)]
    pub deliveries: Vec<ExportedDelivery>,
    /// Its workflow runs, in the order they were started.
    #[serde(default)]
    pub runs: Vec<ExportedRun>,
}

/// One delivery of an event to an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportedDelivery {
    /// Its name in the exporting store (`dlv_<n>`); an import numbers
    /// deliveries afresh (the idempotency key is what agents see).
    pub id: String,
    /// The agent.
    pub agent: String,
    /// The route as decided (what the envelope is built from).
    pub route: Route,
    /// The run it belongs to: an [`ExportedRun::id`] of the same event.
    #[serde(default)]
    pub run: Option<String>,
    /// The workflow, for a step's delivery.
    #[serde(default)]
    pub workflow: Option<String>,
    /// The step's index in its workflow.
    #[serde(default)]
    pub step: Option<u32>,
    /// The step's name.
    #[serde(default)]
    pub step_name: Option<String>,
    /// The previous step's answer, handed to this step.
    #[serde(default)]
    pub input: Option<Box<RawValue>>,
    /// The `webhook-id` every attempt carries.
    pub idempotency_key: String,
    /// How urgent.
    pub priority: Priority,
    /// The route's ordering key.
    #[serde(default)]
    pub ordering_key: Option<String>,
    /// Where it is.
    pub status: DeliveryStatus,
    /// Attempts made.
    #[serde(default)]
    pub attempts: u32,
    /// Attempts made before its last retry from the dead-letter queue.
    #[serde(default)]
    pub retry_base: u32,
    /// When it is next due, while queued.
    #[serde(default)]
    pub due_at_ms: Option<i64>,
    /// When it was queued.
    pub created_at_ms: i64,
    /// When it was delivered or dead-lettered.
    #[serde(default)]
    pub settled_at_ms: Option<i64>,
    /// The last failure.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The agent's JSON answer, once delivered.
    #[serde(default)]
    pub answer: Option<Box<RawValue>>,
    /// Every attempt recorded, in order.
    #[serde(default)]
    pub attempt_records: Vec<AttemptRecord>,
}

/// One workflow run of an event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportedRun {
    /// Its name in the exporting store (`run_<n>`); deliveries refer to it.
    pub id: String,
    /// The workflow.
    pub workflow: String,
    /// The route that started it.
    pub route: Route,
    /// `waiting`, `ready`, `running`, `done` or `failed`.
    pub state: String,
    /// The step it is on (from 0).
    #[serde(default)]
    pub step: u32,
    /// The answer handed to the step it is on.
    #[serde(default)]
    pub input: Option<Box<RawValue>>,
    /// When it is next due.
    pub due_at_ms: i64,
    /// When it was queued.
    pub created_at_ms: i64,
    /// When it fails if not done.
    #[serde(default)]
    pub deadline_ms: Option<i64>,
    /// The workflow's timeout when it started, in ms.
    #[serde(default)]
    pub timeout_ms: Option<i64>,
    /// Why it failed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Steps whose completion is recorded, in order.
    #[serde(default)]
    pub steps_done: Vec<ExportedStep>,
}

/// A recorded step completion of a workflow run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportedStep {
    /// The step's index.
    pub step: u32,
    /// The step's name.
    pub name: String,
    /// When it completed.
    pub at_ms: i64,
    /// The step's answer.
    #[serde(default)]
    pub answer: Option<Box<RawValue>>,
}

/// The run states a store records.
pub const RUN_STATES: [&str; 5] = ["waiting", "ready", "running", "done", "failed"];

/// One page of an export, oldest event first.
#[derive(Debug, Clone, Default)]
pub struct ExportPage {
    /// The events.
    pub events: Vec<ExportedEvent>,
    /// Events of the page that could not be exported (their log record is
    /// lost or unreadable): id and why.
    pub skipped: Vec<(String, String)>,
    /// Where the next page starts; `None` at the end.
    pub next: Option<String>,
}

/// What an import did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    /// Stored under its id, with its state.
    Added,
    /// Not stored: the store holds it already, under this id (its own, or
    /// another event's that is the same delivery).
    AlreadyHeld(String),
}

/// Encodes `body` the way an export holds it.
pub fn encode_body(body: &[u8]) -> (BodyEncoding, Box<RawValue>) {
    // Only text that reads back as exactly these bytes: one line (JSONL), no
    // whitespace around it (a parser drops it).
    let plain = !body.is_empty()
        && !body.first().is_some_and(u8::is_ascii_whitespace)
        && !body.last().is_some_and(u8::is_ascii_whitespace)
        && !body.iter().any(|&b| b == b'\n' || b == b'\r');
    if plain
        && let Ok(text) = std::str::from_utf8(body)
        && let Ok(raw) = RawValue::from_string(text.to_string())
    {
        return (BodyEncoding::Json, raw);
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(body);
    let raw = RawValue::from_string(serde_json::to_string(&b64).expect("a string serialises"))
        .expect("a JSON string is JSON");
    (BodyEncoding::Base64, raw)
}

/// An exported event checked for import: its body's bytes, hash and dedup key.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The event as exported.
    pub event: ExportedEvent,
    /// The body's bytes.
    pub body: Bytes,
    /// Hex SHA-256 of the body.
    pub body_sha256: String,
    /// The dedup key ([`crate::event::dedup_key`]).
    pub dedup_key: String,
}

impl ExportedEvent {
    /// The body's bytes, decoded.
    pub fn body_bytes(&self) -> Result<Bytes, String> {
        match self.body_encoding {
            BodyEncoding::Json => Ok(Bytes::copy_from_slice(self.body.get().as_bytes())),
            BodyEncoding::Base64 => {
                let text: String = serde_json::from_str(self.body.get())
                    .map_err(|e| format!("body: base64 expected in a string: {e}"))?;
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map(Bytes::from)
                    .map_err(|e| format!("body: bad base64: {e}"))
            }
        }
    }

    /// Checks what an import relies on: the body matches its hash, the
    /// decision is one this build reads, runs and deliveries are in known
    /// states and refer to runs of this event.
    pub fn check(&self) -> Result<Checked, String> {
        use sha2::Digest;
        let body = self.body_bytes()?;
        let sha = hex::encode(sha2::Sha256::digest(&body));
        if let Some(given) = &self.body_sha256
            && !given.eq_ignore_ascii_case(&sha)
        {
            return Err(format!(
                "body_sha256 {given} does not match the body (its SHA-256 is {sha})"
            ));
        }
        if let Some(d) = &self.decision {
            serde_json::from_str::<Decision>(d.get())
                .map_err(|e| format!("decision: not one this build reads: {e}"))?;
        }
        for run in &self.runs {
            if !RUN_STATES.contains(&run.state.as_str()) {
                return Err(format!(
                    "run {}: unknown state {:?} (expected one of {})",
                    run.id,
                    run.state,
                    RUN_STATES.join(", ")
                ));
            }
        }
        for d in &self.deliveries {
            if let Some(run) = &d.run
                && !self.runs.iter().any(|r| &r.id == run)
            {
                return Err(format!(
                    "delivery {}: its run {run} is not among the event's runs",
                    d.id
                ));
            }
        }
        let dedup_key =
            crate::event::dedup_key(&self.source, self.id_origin, &self.delivery_id, &sha);
        Ok(Checked {
            event: self.clone(),
            body,
            body_sha256: sha,
            dedup_key,
        })
    }

    /// The latest decision's time, if there is a decision.
    pub fn decided_at_ms(&self) -> Option<i64> {
        let d = self.decision.as_ref()?;
        serde_json::from_str::<Decision>(d.get())
            .ok()
            .map(|d| d.decided_at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_read_back_as_the_same_bytes() {
        // As a line is written: the struct serialised straight (going
        // through a `Value` would parse the raw body and re-print it).
        #[derive(Serialize, Deserialize)]
        struct Line {
            encoding: BodyEncoding,
            body: Box<RawValue>,
        }
        for body in [
            &br#"{"a":1,"b":[1.50,"x"]}"#[..],
            b"{\n  \"a\": 1\n}",
            b" {}",
            b"not json",
            b"\x00\xff\xfe",
            b"",
            b"\"a string\"",
        ] {
            let (encoding, raw) = encode_body(body);
            let line = serde_json::to_string(&Line {
                encoding,
                body: raw,
            })
            .unwrap();
            assert!(!line.contains('\n'));
            let back: Line = serde_json::from_str(&line).unwrap();
            let ev = ExportedEvent {
                id: "evt_1".into(),
                source: "s".into(),
                provider: Provider::Github,
                kind: "k".into(),
                action: None,
                delivery_id: "d".into(),
                id_origin: IdOrigin::Unsigned,
                conflict_with: None,
                received_at_ms: 0,
                headers: vec![],
                body_sha256: None,
                body_encoding: back.encoding,
                body: back.body,
                status: EventStatus::Pending,
                attempts: 0,
                last_error: None,
                dead_at_ms: None,
                decision: None,
                deliveries: vec![],
                runs: vec![],
            };
            assert_eq!(ev.body_bytes().unwrap(), body, "{line}");
        }
        assert_eq!(encode_body(br#"{"a":1}"#).0, BodyEncoding::Json);
        assert_eq!(encode_body(b"{\n}").0, BodyEncoding::Base64);
    }

    #[test]
    fn a_header_of_another_format_is_refused() {
        assert!(Header::parse(&serde_json::to_string(&Header::new(None)).unwrap()).is_ok());
        let e = Header::parse(r#"{"sluice_export":2}"#).unwrap_err();
        assert!(
            e.contains("format 2") && e.contains("reads format 1"),
            "{e}"
        );
        let e = Header::parse(r#"{"id":"evt_1"}"#).unwrap_err();
        assert!(e.contains("not a sluice export"), "{e}");
        assert!(Header::parse("{nope").unwrap_err().contains("not JSON"));
    }
}
