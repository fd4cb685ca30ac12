//! Field reads by JSON pointer without building the payload's tree.
//!
//! A rule typically reads a few fields of a payload of many kilobytes, so
//! [`ParsedEvent::get`](super::ParsedEvent::get) answers from an index
//! instead of a `serde_json::Value` of the whole body: one pass over the body
//! checks that it is JSON exactly as `serde_json::from_slice::<Value>` would
//! (the same parser, the same depth limit, numbers and strings checked the
//! same way), and notes where each object key and its value sit — offsets
//! into the body, no copies, no allocation per value. A read then walks that
//! index along the pointer and parses only the value it returns.
//!
//! What a read answers must be exactly what `Value::pointer` on the parsed
//! body answers: RFC 6901 tokens (`~1`, `~0`, array indices as serde_json
//! reads them), the last of duplicate keys wins, and a body that is not JSON
//! reads as `null`. Where the index cannot be exact cheaply it falls back:
//! objects below arrays or under keys written with escapes are scanned from
//! their start (skipping values without parsing them), and a body serde_json
//! would read in its own special way (an object whose first key is its
//! raw-value marker), or one too large for 32-bit offsets, is parsed whole.
//! This module must never return a value the whole-document parse would not.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

/// The key serde_json's `Value` reads as "the rest is raw JSON in a string"
/// when it is an object's first key (its `raw_value` feature, which a
/// dependency turns on).
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// Marks an offset the index does not know (a key written with escapes).
const UNKNOWN: u32 = u32::MAX;

/// What one pass over the body found.
#[derive(Debug)]
pub(super) enum Index {
    /// The body is not JSON: it reads as `null`.
    Invalid,
    /// Only the whole-document parse is exact for this body.
    Whole,
    /// The body is JSON; its objects' keys are indexed.
    Keys(Keys),
}

/// Every key of every object reached from the root through object keys
/// alone, in document order (depth first).
#[derive(Debug)]
pub(super) struct Keys {
    /// Offset of the root value.
    root: u32,
    entries: Vec<Entry>,
}

/// One object member.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Offset of the key's first byte after its opening quote, or
    /// [`UNKNOWN`] when the key holds escapes (its bytes are not its text).
    key: u32,
    key_len: u32,
    /// Offset of the value's first byte ([`UNKNOWN`] with an escaped key).
    value: u32,
    /// Index of the next member of the same object (or one past the last):
    /// the members of the value, if it is an object, sit in between.
    next: u32,
}

impl Index {
    /// Checks and indexes `body` in one pass.
    pub(super) fn build(body: &[u8]) -> Index {
        if u32::try_from(body.len()).is_err() {
            return Index::Whole;
        }
        // Valid UTF-8 as a whole is what per-string checks of the slice
        // parser add up to: outside strings only ASCII is JSON anyway.
        let Ok(text) = std::str::from_utf8(body) else {
            return Index::Invalid;
        };
        let mut scan = Scan {
            body: text.as_bytes(),
            entries: Vec::new(),
            whole: false,
        };
        let root = skip_ws(scan.body, 0);
        let mut de = serde_json::Deserializer::from_str(text);
        let checked = Node {
            scan: &mut scan,
            at: Some(root),
        }
        .deserialize(&mut de)
        .and_then(|()| de.end());
        match checked {
            Err(_) => Index::Invalid,
            Ok(()) if scan.whole => Index::Whole,
            Ok(()) => Index::Keys(Keys {
                root: root as u32,
                entries: scan.entries,
            }),
        }
    }
}

impl Keys {
    /// The value at `pointer` (not empty) in `body`, which must be the body
    /// this index was built from.
    pub(super) fn get(&self, body: &[u8], pointer: &str) -> Option<Value> {
        let at = self.find(body, pointer.strip_prefix('/')?)?;
        let mut de = serde_json::Deserializer::from_slice(&body[at..]);
        Value::deserialize(&mut de).ok()
    }

    /// The offset of the value at the tokens of `path` (a pointer without
    /// its leading `/`).
    fn find(&self, body: &[u8], path: &str) -> Option<usize> {
        let mut at = self.root as usize;
        // The members of the object at `at`, while the index has them.
        let mut members = Some((0, self.entries.len()));
        for raw in path.split('/') {
            let token = unescape(raw);
            match body[at] {
                b'{' => {
                    let found =
                        members.and_then(|(first, end)| self.member(body, first, end, &token));
                    match found {
                        Some(Found::Member(i)) => {
                            let e = self.entries[i];
                            at = e.value as usize;
                            members = Some((i + 1, e.next as usize));
                        }
                        Some(Found::Missing) => return None,
                        None => {
                            at = scan_object(body, at, &token)?;
                            members = None;
                        }
                    }
                }
                b'[' => {
                    at = scan_array(body, at, parse_index(&token)?)?;
                    members = None;
                }
                _ => return None,
            }
        }
        Some(at)
    }

    /// The last member named `token` among those from `first` to `end`, or
    /// `None` when a key holds escapes (the index cannot compare it).
    fn member(&self, body: &[u8], first: usize, end: usize, token: &str) -> Option<Found> {
        let mut found = Found::Missing;
        let mut i = first;
        while i < end {
            let e = self.entries[i];
            if e.key == UNKNOWN {
                return None;
            }
            let key = &body[e.key as usize..(e.key + e.key_len) as usize];
            if key == token.as_bytes() {
                found = Found::Member(i);
            }
            i = e.next as usize;
        }
        Some(found)
    }
}

enum Found {
    Member(usize),
    Missing,
}

/// A pointer token as serde_json's `Value::pointer` decodes it (`~1` first,
/// then `~0`).
fn unescape(token: &str) -> Cow<'_, str> {
    if token.contains('~') {
        Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
    } else {
        Cow::Borrowed(token)
    }
}

/// An array index token as serde_json's `Value::pointer` reads one.
fn parse_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
        return None;
    }
    token.parse().ok()
}

/// JSON whitespace, as serde_json skips it.
fn skip_ws(body: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\t' | b'\r') = body.get(at) {
        at += 1;
    }
    at
}

/// The offset of the value in `raw`, a slice of `body`.
fn offset_in(body: &[u8], raw: &RawValue) -> usize {
    raw.get().as_ptr() as usize - body.as_ptr() as usize
}

/// The last member named `token` of the object at `at`, found by reading its
/// keys and skipping its values (the body is known to be JSON).
fn scan_object(body: &[u8], at: usize, token: &str) -> Option<usize> {
    struct Seek<'t>(&'t str);
    impl<'de> Visitor<'de> for Seek<'_> {
        type Value = Option<&'de RawValue>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(same) = map.next_key_seed(KeyIs(self.0))? {
                if same {
                    found = Some(map.next_value::<&RawValue>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(&body[at..]);
    let raw = de.deserialize_map(Seek(token)).ok()??;
    Some(offset_in(body, raw))
}

/// Element `index` of the array at `at`, skipping the others.
fn scan_array(body: &[u8], at: usize, index: usize) -> Option<usize> {
    struct Seek(usize);
    impl<'de> Visitor<'de> for Seek {
        type Value = Option<&'de RawValue>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut i = 0;
            while i < self.0 {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(None);
                }
                i += 1;
            }
            let found = seq.next_element::<&RawValue>()?;
            // The rest still has to be read for the array to end well.
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(&body[at..]);
    let raw = de.deserialize_seq(Seek(index)).ok()??;
    Some(offset_in(body, raw))
}

/// Whether a key equals a decoded pointer token.
struct KeyIs<'t>(&'t str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

/// The state of the checking pass.
struct Scan<'b> {
    body: &'b [u8],
    entries: Vec<Entry>,
    /// An object starts with serde_json's raw-value marker.
    whole: bool,
}

/// One value in the checking pass. Every value goes through
/// `deserialize_any`, as it does when serde_json builds a `Value`, so the
/// pass accepts exactly what that parse accepts; nothing is kept but the
/// members of objects whose offset is known.
struct Node<'s, 'b> {
    scan: &'s mut Scan<'b>,
    /// Where the value starts, when known: an object there is indexed.
    at: Option<usize>,
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// Visitor methods for scalars, which the pass only checks.
macro_rules! accept {
    ($($method:ident($ty:ty)),*) => {$(
        fn $method<E: de::Error>(self, _: $ty) -> Result<(), E> {
            Ok(())
        }
    )*};
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    accept!(
        visit_bool(bool),
        visit_i64(i64),
        visit_u64(u64),
        visit_f64(f64),
        visit_str(&str)
    );
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Node {
                scan: &mut *self.scan,
                at: None,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let scan = self.scan;
        let indexed = self.at.is_some();
        let mut first = true;
        while let Some(key) = map.next_key_seed(KeyAt(scan.body))? {
            if first && key.marker {
                scan.whole = true;
            }
            first = false;
            if !indexed {
                map.next_value_seed(Node {
                    scan: &mut *scan,
                    at: None,
                })?;
                continue;
            }
            let value = key.end.and_then(|end| {
                // `"key"`, whitespace, `:`, whitespace, then the value.
                let colon = skip_ws(scan.body, end + 1);
                (scan.body.get(colon) == Some(&b':')).then(|| skip_ws(scan.body, colon + 1))
            });
            let slot = scan.entries.len();
            scan.entries.push(match (key.start, value) {
                (Some(start), Some(value)) => Entry {
                    key: start as u32,
                    key_len: (key.end.unwrap_or(start) - start) as u32,
                    value: value as u32,
                    next: 0,
                },
                _ => Entry {
                    key: UNKNOWN,
                    key_len: 0,
                    value: UNKNOWN,
                    next: 0,
                },
            });
            map.next_value_seed(Node {
                scan: &mut *scan,
                at: value,
            })?;
            scan.entries[slot].next = scan.entries.len() as u32;
        }
        Ok(())
    }
}

/// A key in the checking pass: where it sits, when it is its bytes.
struct KeySpan {
    /// Offset of its first byte (after the quote) and of its closing quote,
    /// when the key has no escapes.
    start: Option<usize>,
    end: Option<usize>,
    /// It is serde_json's raw-value marker.
    marker: bool,
}

/// Reads a key the way serde_json's `Value` does (`deserialize_str`).
struct KeyAt<'b>(&'b [u8]);

impl<'de> DeserializeSeed<'de> for KeyAt<'_> {
    type Value = KeySpan;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<KeySpan, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyAt<'_> {
    type Value = KeySpan;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<KeySpan, E> {
        let start = (key.as_ptr() as usize).wrapping_sub(self.0.as_ptr() as usize);
        // Borrowed keys are slices of the body; anything else is treated as
        // an escaped key.
        if start > self.0.len() || start + key.len() > self.0.len() {
            return self.visit_str(key);
        }
        Ok(KeySpan {
            start: Some(start),
            end: Some(start + key.len()),
            marker: key == RAW_VALUE_TOKEN,
        })
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<KeySpan, E> {
        Ok(KeySpan {
            start: None,
            end: None,
            marker: key == RAW_VALUE_TOKEN,
        })
    }
}

#[cfg(test)]
mod tests;
