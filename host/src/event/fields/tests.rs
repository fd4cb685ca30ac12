//! Every read through the index must equal `Value::pointer` on the whole
//! parse: over every corpus payload, every pointer into it and pointers that
//! miss, and bodies built to hit the edges (escapes, duplicate keys, bodies
//! serde_json refuses).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde_json::{Value, json};

use super::Index;
use crate::event::{Event, ParsedEvent, Provider};

/// Pointers tried on every document besides the ones it holds.
const POINTERS: &[&str] = &[
    "",
    "/",
    "//",
    "action",
    "/action",
    "/action/",
    "/action/0",
    "/issue/labels",
    "/issue/labels/0",
    "/issue/labels/0/name",
    "/issue/labels/00",
    "/issue/labels/01",
    "/issue/labels/+0",
    "/issue/labels/-",
    "/issue/labels/-1",
    "/issue/labels/ 0",
    "/issue/labels/18446744073709551616",
    "/issue/labels/99",
    "/issue/user/login",
    "/issue/nope",
    "/repository/full_name",
    "/repository/owner/login",
    "/repository/owner/login/x",
    "/commits/0/author/name",
    "/commits/1/modified/0",
    "/object_attributes/action",
    "/project/path_with_namespace",
    "/a~1b",
    "/m~0n",
    "/~01",
    "/~10",
    "/~2",
    "/~",
    "/nope",
    "/nope/deeper",
    "/0",
    "/1/0",
];

/// Every pointer that names a value in `v`, below `prefix`.
fn paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let p = format!("{prefix}/{}", k.replace('~', "~0").replace('/', "~1"));
                paths(child, &p, out);
                out.push(format!("{p}/missing"));
                out.push(p);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                let p = format!("{prefix}/{i}");
                paths(child, &p, out);
                out.push(p);
            }
            out.push(format!("{prefix}/{}", a.len()));
            out.push(format!("{prefix}/0{}", a.len()));
        }
        _ => out.push(format!("{prefix}/0")),
    }
}

fn event(body: impl Into<Bytes>) -> ParsedEvent {
    ParsedEvent::new(Event::dry_run(
        "test",
        Provider::None,
        "test",
        None,
        body.into(),
    ))
}

/// Checks every pointer of interest on `body`; returns how many.
fn agrees(name: &str, body: &[u8]) -> usize {
    let whole: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut pointers: Vec<String> = POINTERS.iter().map(|p| p.to_string()).collect();
    paths(&whole, "", &mut pointers);
    let lazy = event(body.to_vec());
    let parsed = event(body.to_vec());
    parsed.payload();
    // The empty pointer parses the whole document, after which reads borrow
    // from it: it goes last.
    pointers.retain(|p| !p.is_empty());
    pointers.push(String::new());
    for p in &pointers {
        let want = whole.pointer(p);
        if !p.is_empty() && !matches!(lazy.index.get(), Some(Index::Whole)) {
            assert!(
                lazy.payload.get().is_none(),
                "{name}: parsed whole before {p:?}"
            );
        }
        assert_eq!(lazy.get(p).as_deref(), want, "{name}: {p:?}");
        assert_eq!(parsed.get(p).as_deref(), want, "{name}: {p:?} (parsed)");
    }
    assert_eq!(lazy.payload(), &whole, "{name}");
    pointers.len()
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus")
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            json_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
}

#[test]
fn every_corpus_payload_reads_as_the_whole_parse_does() {
    let mut files = Vec::new();
    json_files(&corpus(), &mut files);
    files.sort();
    let providers: std::collections::BTreeSet<_> = files
        .iter()
        .filter_map(|f| f.strip_prefix(corpus()).ok()?.iter().next())
        .collect();
    assert!(providers.len() >= 3, "{providers:?}");
    assert!(files.len() > 200, "{} corpus files", files.len());
    let mut pointers = 0;
    for file in &files {
        let body = std::fs::read(file).unwrap();
        assert!(
            matches!(event(body.clone()).index(), Index::Keys(_)),
            "{} is not indexed",
            file.display()
        );
        pointers += agrees(&file.display().to_string(), &body);
        // As the providers send them: compact.
        let compact = serde_json::to_vec(&serde_json::from_slice::<Value>(&body).unwrap()).unwrap();
        agrees(&file.display().to_string(), &compact);
    }
    assert!(pointers > 10_000, "{pointers} pointers");
}

#[test]
fn escapes_in_keys_and_pointers() {
    let bodies: &[&str] = &[
        r#"{"a/b": 1, "m~n": 2, "~1": 3, "/": 4, "": 5, "~": 6, "~2": 7}"#,
        r#"{"a\/b": 1, "m\u007en": {"x": [1, {"y": 2}]}, "q\"": 3, "plain": {"k": 4}}"#,
        r#"{"outer": {"in\u0074er": {"deep": true}, "other": 1}, "after": {"z": null}}"#,
        r#"{"arr": [{"k\u0041": 1, "kA": 2}, {"a/b": [3]}], "é": "ü", "日本": {"語": 1}}"#,
        r#"{"\ud83d\ude00": "emoji key", "s": "\ud83d\ude00"}"#,
    ];
    for body in bodies {
        agrees(body, body.as_bytes());
    }
    let ev = event(bodies[1].as_bytes().to_vec());
    assert_eq!(ev.get("/a~1b").as_deref(), Some(&json!(1)));
    assert_eq!(ev.get("/m~0n/x/1/y").as_deref(), Some(&json!(2)));
}

#[test]
fn the_last_of_duplicate_keys_wins() {
    let body = r#"{"a": 1, "b": {"c": 1, "c": {"d": 2}}, "a": {"x": [1, 2]},
        "arr": [{"k": 1, "k": 2}], "b": {"c": {"d": 3}, "e": 4}}"#;
    // The same with a key written with an escape at the root, which the
    // index cannot compare, and one deeper down.
    let escaped = body.replacen(r#""arr""#, r#""\u0061rr""#, 1);
    let deeper = body.replacen(r#""e""#, r#""\u0065""#, 1);
    for body in [body, &escaped, &deeper] {
        agrees(body, body.as_bytes());
        let ev = event(body.as_bytes().to_vec());
        assert!(matches!(ev.index(), Index::Keys(_)));
        assert_eq!(ev.get("/a/x/1").as_deref(), Some(&json!(2)));
        assert_eq!(ev.get("/b/c/d").as_deref(), Some(&json!(3)));
        assert_eq!(ev.get("/b/e").as_deref(), Some(&json!(4)));
        assert_eq!(ev.get("/arr/0/k").as_deref(), Some(&json!(2)));
    }
    let body = r#"{"dup\u0041": 1, "dupA": 2, "dupA": 3, "dup\u0041": {"x": 4}}"#;
    agrees(body, body.as_bytes());
    let ev = event(body.as_bytes().to_vec());
    assert_eq!(ev.get("/dupA/x").as_deref(), Some(&json!(4)));
}

#[test]
fn a_body_serde_json_refuses_reads_as_null() {
    let deep = |n: usize| format!("{{\"a\":{}1{}}}", "[".repeat(n), "]".repeat(n));
    let mut bodies: Vec<Vec<u8>> = [
        "",
        "   ",
        "not json",
        "action=opened",
        r#"{"action": "opened"} trailing"#,
        r#"{"action": "opened""#,
        r#"{"action": "opened",}"#,
        r#"{"action": "opened", "n": 1e400}"#,
        r#"{"action": "opened", "n": -1e400}"#,
        r#"{"action": "opened", "s": "\ud800"}"#,
        r#"{"action": "opened", "s": "\udc00\ud800"}"#,
        r#"{"action": "opened", "s": "\x"}"#,
        "{\"action\": \"opened\", \"s\": \"tab\there\"}",
        "\u{feff}{\"action\": \"opened\"}",
        r#"{"action": "opened", "n": 01}"#,
        r#"{"action": "opened", "n": 1.}"#,
        r#"{"action": "opened", "n": NaN}"#,
    ]
    .iter()
    .map(|b| b.as_bytes().to_vec())
    .collect();
    bodies.push(b"{\"action\": \"opened\", \"s\": \"\xff\"}".to_vec());
    bodies.push(b"{\"action\": \"opened\", \"\xc3\": 1}".to_vec());
    for n in [125, 126, 127, 128, 200] {
        bodies.push(deep(n).into_bytes());
    }
    for body in &bodies {
        let name = String::from_utf8_lossy(body);
        agrees(&name, body);
        if serde_json::from_slice::<Value>(body).is_err() {
            let ev = event(body.clone());
            assert_eq!(ev.get("/action"), None, "{name}");
            assert_eq!(ev.get("").as_deref(), Some(&Value::Null), "{name}");
        }
    }
    // The limit sits where serde_json's does: some of these parse.
    assert!(serde_json::from_slice::<Value>(deep(125).as_bytes()).is_ok());
    assert!(serde_json::from_slice::<Value>(deep(200).as_bytes()).is_err());
}

#[test]
fn documents_that_are_not_objects() {
    for body in [
        "[1, [2, 3], {\"a\": [4]}]",
        "  \"text\"  ",
        "42",
        "-0.5e-3",
        "null",
        "true",
        "[]",
        "{}",
        "{\"a\": {}, \"b\": []}",
        "[{\"a\": 1, \"a\": 2}]",
    ] {
        agrees(body, body.as_bytes());
    }
}

#[test]
fn numbers_read_as_the_whole_parse_reads_them() {
    let body = r#"{"i": -9223372036854775808, "u": 18446744073709551615,
        "big": 18446744073709551616, "f": 1.5e300, "z": -0, "e": 1E2, "t": 0.1}"#;
    agrees("numbers", body.as_bytes());
}

#[test]
fn serde_jsons_raw_value_marker_reads_as_it_does() {
    for body in [
        r#"{"$serde_json::private::RawValue": "[1, {\"a\": 2}]"}"#,
        r#"{"x": {"$serde_json::private::RawValue": "{\"a\": [3]}"}, "y": 1}"#,
        r#"{"x": {"$serde_json::private::RawValue": 5}}"#,
        r#"{"x": {"y": 1, "$serde_json::private::RawValue": "[1]"}}"#,
        r#"[{"$serde_json::private::RawValue": "7"}]"#,
    ] {
        agrees(body, body.as_bytes());
    }
}

#[test]
fn reads_after_the_whole_parse_borrow_it() {
    let ev = event(r#"{"a": {"b": [1, 2]}}"#.as_bytes().to_vec());
    assert!(matches!(
        ev.get("/a/b/1"),
        Some(std::borrow::Cow::Owned(Value::Number(_)))
    ));
    ev.payload();
    assert!(matches!(
        ev.get("/a/b/1"),
        Some(std::borrow::Cow::Borrowed(_))
    ));
}

mod generated {
    //! Documents written as text, so they can repeat keys and spell one key
    //! two ways (with and without escapes), as no `Value` can.

    use proptest::prelude::*;

    use super::{Value, agrees, event};

    /// Key text and a way to write it.
    const KEYS: [(&str, &str); 11] = [
        ("a", r#""a""#),
        ("a", r#""\u0061""#),
        ("b", r#""b""#),
        ("a/b", r#""a/b""#),
        ("a/b", r#""a\/b""#),
        ("m~n", r#""m~n""#),
        ("", r#""""#),
        ("q\"", r#""q\"""#),
        ("é", r#""é""#),
        ("é", r#""\u00e9""#),
        ("0", r#""0""#),
    ];

    const SCALARS: [&str; 11] = [
        "null",
        "true",
        "0",
        "-1",
        "1.5e3",
        "18446744073709551616",
        r#""s""#,
        r#""\u00e9\n""#,
        r#""""#,
        "{}",
        "[]",
    ];

    #[derive(Debug, Clone)]
    enum Doc {
        Scalar(usize),
        Array(Vec<Doc>),
        Object(Vec<(usize, Doc)>),
    }

    fn doc() -> impl Strategy<Value = Doc> {
        let leaf = (0..SCALARS.len()).prop_map(Doc::Scalar);
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Doc::Array),
                prop::collection::vec((0..KEYS.len(), inner), 0..7).prop_map(Doc::Object),
            ]
        })
    }

    fn write(doc: &Doc, pretty: bool, out: &mut String) {
        let gap = if pretty { "\n  " } else { "" };
        match doc {
            Doc::Scalar(i) => out.push_str(SCALARS[*i]),
            Doc::Array(items) => {
                out.push('[');
                for (n, item) in items.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    out.push_str(gap);
                    write(item, pretty, out);
                }
                out.push_str(gap);
                out.push(']');
            }
            Doc::Object(members) => {
                out.push('{');
                for (n, (key, value)) in members.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    out.push_str(gap);
                    out.push_str(KEYS[*key].1);
                    out.push_str(if pretty { " : " } else { ":" });
                    write(value, pretty, out);
                }
                out.push_str(gap);
                out.push('}');
            }
        }
    }

    /// Pointers from the key set and a few indices, two levels deep.
    fn pointers() -> Vec<String> {
        let tokens: Vec<String> = KEYS
            .iter()
            .map(|(k, _)| k.replace('~', "~0").replace('/', "~1"))
            .chain(["1", "2", "00", "-"].map(String::from))
            .collect();
        let mut out = Vec::new();
        for a in &tokens {
            out.push(format!("/{a}"));
            for b in &tokens {
                out.push(format!("/{a}/{b}"));
            }
        }
        out
    }

    proptest! {
        #[test]
        fn reads_agree_with_the_whole_parse(doc in doc(), pretty in any::<bool>()) {
            let mut text = String::new();
            write(&doc, pretty, &mut text);
            agrees(&text, text.as_bytes());
            let whole: Value = serde_json::from_slice(text.as_bytes()).unwrap_or(Value::Null);
            let ev = event(text.clone().into_bytes());
            for p in pointers() {
                let got = ev.get(&p);
                prop_assert_eq!(got.as_deref(), whole.pointer(&p), "{} {}", text, p);
            }
        }
    }
}
