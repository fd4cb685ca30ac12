//! The record of which event fields one rule run read, and what it saw:
//! the host answers every accessor a guest calls, so it can note each one as
//! it answers. The record goes into the rule's [`RuleRecord`] so a decision
//! explains itself (`events show`, `route`) and can be compared across rule
//! versions.
//!
//! Recording must stay cheap beside the lookup it follows (no extra parsing;
//! names and values up to 24 bytes are kept inline) and bounded whatever the rule
//! does: at most [`MAX_READS`] distinct fields, values cut to
//! [`MAX_READ_VALUE`] bytes, objects and arrays by type only. It must never
//! record a header's value, nor the raw body.
//!
//! [`RuleRecord`]: crate::decision::RuleRecord

use compact_str::{CompactString, ToCompactString};

use crate::decision::{FieldRead, MAX_READ_POINTER, MAX_READ_VALUE, MAX_READS, ReadKind};

/// The fields one rule run has read so far. Lives in the call's own state
/// (the wasm store, or the rhai call's thread), so nothing is shared.
#[derive(Debug, Default)]
pub struct ReadLog {
    reads: Vec<FieldRead>,
    dropped: u32,
}

/// What one rule run read: the fields recorded, and how many reads were
/// past the cap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    /// The distinct fields read, in the order first read.
    pub fields: Vec<FieldRead>,
    /// Reads of further fields, counted but not recorded.
    pub dropped: u32,
}

impl ReadLog {
    /// An empty log.
    pub const fn new() -> ReadLog {
        ReadLog {
            reads: Vec::new(),
            dropped: 0,
        }
    }

    /// Whether this read needs recording: false for a field already
    /// recorded; past the cap, counts the read as dropped.
    fn admit(&mut self, pointer: &str) -> bool {
        let pointer = cut(pointer, MAX_READ_POINTER);
        if self.reads.iter().any(|r| r.pointer == pointer) {
            return false;
        }
        if self.reads.len() >= MAX_READS {
            self.dropped = self.dropped.saturating_add(1);
            return false;
        }
        true
    }

    fn push(&mut self, mut pointer: CompactString, kind: ReadKind, value: Option<&str>) {
        let (value, mut truncated) = match value {
            Some(v) => {
                let cut = cut(v, MAX_READ_VALUE);
                (Some(CompactString::from(cut)), cut.len() < v.len())
            }
            None => (None, false),
        };
        // The name read is the guest's too: a pointer of a megabyte must not
        // become a megabyte in every stored decision.
        let kept = cut(&pointer, MAX_READ_POINTER).len();
        if kept < pointer.len() {
            pointer.truncate(kept);
            truncated = true;
        }
        self.reads.push(FieldRead {
            pointer,
            kind,
            value,
            truncated,
        });
    }

    /// A JSON pointer into the payload and what it matched. Objects and
    /// arrays are recorded by type, not content.
    pub fn json<S>(&mut self, pointer: S, found: Option<&serde_json::Value>)
    where
        S: AsRef<str> + Into<CompactString>,
    {
        use serde_json::Value as J;
        if !self.admit(pointer.as_ref()) {
            return;
        }
        let number;
        let (kind, value) = match found {
            None => (ReadKind::Absent, None),
            Some(J::Null) => (ReadKind::Null, None),
            Some(J::Bool(b)) => (ReadKind::Bool, Some(if *b { "true" } else { "false" })),
            Some(J::Number(n)) => {
                number = n.to_compact_string();
                (ReadKind::Number, Some(number.as_str()))
            }
            Some(J::String(s)) => (ReadKind::String, Some(s.as_str())),
            Some(J::Object(_)) => (ReadKind::Object, None),
            Some(J::Array(_)) => (ReadKind::Array, None),
        };
        self.push(pointer.into(), kind, value);
    }

    /// An event field read through its own accessor (`kind`, `action`, ...).
    pub fn text(&mut self, field: &'static str, found: Option<&str>) {
        if !self.admit(field) {
            return;
        }
        let kind = match found {
            Some(_) => ReadKind::String,
            None => ReadKind::Absent,
        };
        self.push(CompactString::const_new(field), kind, found);
    }

    /// A numeric event field read through its own accessor (`received_at`).
    pub fn number(&mut self, field: &'static str, found: i64) {
        if self.admit(field) {
            let value = found.to_compact_string();
            self.push(
                CompactString::const_new(field),
                ReadKind::Number,
                Some(&value),
            );
        }
    }

    /// A field whose value is never recorded (`body`, `headers`).
    pub fn withheld(&mut self, field: &'static str) {
        if self.admit(field) {
            self.push(CompactString::const_new(field), ReadKind::Withheld, None);
        }
    }

    /// One header by name: whether it was there, never its value.
    pub fn header(&mut self, name: &str, present: bool) {
        let mut pointer = CompactString::const_new("header:");
        pointer.extend(name.chars().map(|c| c.to_ascii_lowercase()));
        if !self.admit(&pointer) {
            return;
        }
        let kind = if present {
            ReadKind::Withheld
        } else {
            ReadKind::Absent
        };
        self.push(pointer, kind, None);
    }

    /// Takes what was recorded, leaving the log empty.
    pub fn take(&mut self) -> Reads {
        let log = std::mem::take(self);
        Reads {
            fields: log.reads,
            dropped: log.dropped,
        }
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_cut_on_a_character_boundary() {
        let mut log = ReadLog::default();
        let long = "é".repeat(MAX_READ_VALUE);
        log.json("/title", Some(&serde_json::Value::String(long)));
        let reads = log.take();
        let value = reads.fields[0].value.as_deref().unwrap();
        assert!(value.len() <= MAX_READ_VALUE && value.chars().all(|c| c == 'é'));
        assert!(reads.fields[0].truncated);
    }

    #[test]
    fn long_pointers_and_header_names_are_cut() {
        let mut log = ReadLog::default();
        let long = format!("/{}", "k".repeat(700_000));
        log.json(long.as_str(), None);
        log.json(long.as_str(), None);
        log.header(&"x".repeat(10_000), true);
        let reads = log.take();
        assert_eq!(reads.fields.len(), 2, "the same long pointer once");
        for f in &reads.fields {
            assert!(f.pointer.len() <= MAX_READ_POINTER, "{}", f.pointer.len());
            assert!(f.truncated);
        }
    }

    #[test]
    fn a_field_read_twice_is_recorded_once() {
        let mut log = ReadLog::default();
        log.text("kind", Some("issues"));
        log.text("kind", Some("issues"));
        log.json("/a", None);
        log.json("/a", None);
        let reads = log.take();
        assert_eq!(reads.fields.len(), 2);
        assert_eq!(reads.dropped, 0);
    }
}
