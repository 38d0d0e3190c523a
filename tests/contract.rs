//! The event contract: `schemas/audit-event.v1.schema.json` and `audit_consumer::event::decode`
//! give the same verdict on every fixture in `tests/fixtures/`, and every invalid fixture fails
//! for the reason `tests/fixtures/invalid/EXPECTED.tsv` names. No servers needed.
//!
//! The schema is checked twice: once with `format` as a pure annotation (JSON Schema 2020-12's
//! default, and what most producer-side validators do) and once with `format` asserted. Both
//! must agree with `decode`, which proves the schema's patterns carry every rule on their own
//! (impossible dates included) and that the `format` keywords never contradict them.
//!
//! The schema side applies the envelope rules JSON Schema cannot express, as the schema's
//! `$comment` states: at most `MAX_PAYLOAD_BYTES`, UTF-8, parseable by serde_json into a
//! `Value` (which also enforces the nesting limit and rejects out-of-range numbers), and unique
//! member names in the event object and in `metadata`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use audit_consumer::event::{AuditEvent, EventError, MAX_PAYLOAD_BYTES, decode};
use jsonschema::Validator;
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

const MIN_FIXTURES: usize = 30;

fn fixtures_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind)
}

/// `(file name, bytes)` of every fixture in `dir`, sorted, except `EXPECTED.tsv`.
fn fixtures(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fixtures_dir(kind);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .filter(|path| path.file_name().is_some_and(|n| n != "EXPECTED.tsv"))
        .map(|path| {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("UTF-8 file name")
                .to_owned();
            let bytes = std::fs::read(&path).expect("readable fixture");
            (name, bytes)
        })
        .collect();
    out.sort();
    out
}

struct Schemas {
    /// `format` as annotation only.
    annotating: Validator,
    /// `format` asserted (`date-time`, `uuid`).
    asserting: Validator,
}

fn schemas() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/audit-event.v1.schema.json");
        let text = std::fs::read_to_string(&path).expect("schema file");
        let schema: Value = serde_json::from_str(&text).expect("schema is JSON");
        let build = |formats: bool| {
            jsonschema::draft202012::options()
                .should_validate_formats(formats)
                .build(&schema)
                .expect("schema compiles")
        };
        Schemas {
            annotating: build(false),
            asserting: build(true),
        }
    })
}

/// The schema side's verdict, `Err` carrying why it rejects.
fn schema_verdict(validator: &Validator, payload: &[u8]) -> Result<(), String> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(format!("envelope: {} bytes", payload.len()));
    }
    let text = std::str::from_utf8(payload).map_err(|e| format!("envelope: {e}"))?;
    let value: Value = serde_json::from_str(text).map_err(|e| format!("does not parse: {e}"))?;
    if let Some(dup) = duplicate_member(text) {
        return Err(format!("envelope: duplicate member {dup:?}"));
    }
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{} at {}", shorten(&e.to_string()), e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// At most 100 characters, so a failure report stays readable.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(100) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    }
}

/// A member name repeated in the top-level object or in its `metadata` object. Written apart
/// from `decode`'s own bookkeeping so the two implementations check each other.
fn duplicate_member(text: &str) -> Option<String> {
    let Ok(names) = serde_json::from_str::<MemberNames>(text) else {
        return None;
    };
    let first_repeat = |names: &[String]| {
        let mut seen = HashSet::new();
        names.iter().find(|n| !seen.insert(n.as_str())).cloned()
    };
    first_repeat(&names.top)
        .or_else(|| first_repeat(&names.metadata).map(|name| format!("metadata.{name}")))
}

#[derive(Default)]
struct MemberNames {
    top: Vec<String>,
    metadata: Vec<String>,
}

impl<'de> Deserialize<'de> for MemberNames {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Top;
        impl<'de> Visitor<'de> for Top {
            type Value = MemberNames;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MemberNames, A::Error> {
                let mut names = MemberNames::default();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "metadata" {
                        names.metadata.extend(map.next_value::<ObjectNames>()?.0);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                    names.top.push(key);
                }
                Ok(names)
            }
        }
        d.deserialize_map(Top)
    }
}

/// Member names of an object; nothing for any other value.
struct ObjectNames(Vec<String>);

impl<'de> Deserialize<'de> for ObjectNames {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Names;
        impl<'de> Visitor<'de> for Names {
            type Value = ObjectNames;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ObjectNames, A::Error> {
                let mut names = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    names.push(key);
                }
                Ok(ObjectNames(names))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ObjectNames, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ObjectNames(Vec::new()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<ObjectNames, E> {
                Ok(ObjectNames(Vec::new()))
            }
            fn visit_i64<E>(self, _: i64) -> Result<ObjectNames, E> {
                Ok(ObjectNames(Vec::new()))
            }
            fn visit_u64<E>(self, _: u64) -> Result<ObjectNames, E> {
                Ok(ObjectNames(Vec::new()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<ObjectNames, E> {
                Ok(ObjectNames(Vec::new()))
            }
            fn visit_str<E>(self, _: &str) -> Result<ObjectNames, E> {
                Ok(ObjectNames(Vec::new()))
            }
            fn visit_unit<E>(self) -> Result<ObjectNames, E> {
                Ok(ObjectNames(Vec::new()))
            }
        }
        d.deserialize_any(Names)
    }
}

/// Compares `decode` with both schema validators; returns one line per disagreement.
fn disagreements(name: &str, payload: &[u8]) -> Vec<String> {
    let decoded = decode(payload);
    let s = schemas();
    let mut out = Vec::new();
    for (label, validator) in [("schema", &s.annotating), ("schema+formats", &s.asserting)] {
        let schema = schema_verdict(validator, payload);
        match (&decoded, &schema) {
            (Ok(_), Ok(())) | (Err(_), Err(_)) => {}
            (Ok(_), Err(why)) => {
                out.push(format!("{name}: decode accepts, {label} rejects: {why}"))
            }
            (Err(e), Ok(())) => out.push(format!(
                "{name}: decode rejects ({}: {e}), {label} accepts",
                e.kind()
            )),
        }
    }
    out
}

fn assert_none(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn schema_is_valid_draft_2020_12() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/audit-event.v1.schema.json");
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("schema file")).expect("JSON");
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
        panic!("schema violates the 2020-12 meta-schema: {e}");
    }
}

#[test]
fn every_valid_fixture_is_accepted_by_schema_and_decode() {
    let valid = fixtures("valid");
    assert!(
        valid.len() >= MIN_FIXTURES,
        "only {} valid fixtures",
        valid.len()
    );
    let mut problems = Vec::new();
    for (name, payload) in &valid {
        problems.extend(disagreements(name, payload));
        if let Err(e) = decode(payload) {
            problems.push(format!("{name}: rejected ({}): {e}", e.kind()));
        }
    }
    assert_none(problems);
}

#[test]
fn every_invalid_fixture_is_rejected_by_schema_and_decode() {
    let invalid = fixtures("invalid");
    assert!(
        invalid.len() >= MIN_FIXTURES,
        "only {} invalid fixtures",
        invalid.len()
    );
    let mut problems = Vec::new();
    for (name, payload) in &invalid {
        problems.extend(disagreements(name, payload));
        if decode(payload).is_ok() {
            problems.push(format!("{name}: accepted by decode"));
        }
    }
    assert_none(problems);
}

/// `file → (kind, field)` from EXPECTED.tsv.
fn expected() -> BTreeMap<String, (String, Option<String>)> {
    let path = fixtures_dir("invalid").join("EXPECTED.tsv");
    let text = std::fs::read_to_string(&path).expect("EXPECTED.tsv");
    let mut map = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        let [file, kind, field] = cols[..] else {
            panic!(
                "EXPECTED.tsv line {}: want 3 tab-separated columns: {line:?}",
                n + 1
            );
        };
        let field = (field != "-").then(|| field.to_owned());
        let previous = map.insert(file.to_owned(), (kind.to_owned(), field));
        assert!(previous.is_none(), "EXPECTED.tsv lists {file} twice");
    }
    map
}

#[test]
fn every_invalid_fixture_fails_for_the_expected_reason() {
    let expected = expected();
    let invalid = fixtures("invalid");
    let on_disk: HashSet<&str> = invalid.iter().map(|(n, _)| n.as_str()).collect();
    let mut problems = Vec::new();
    for file in expected.keys() {
        if !on_disk.contains(file.as_str()) {
            problems.push(format!("{file}: in EXPECTED.tsv but not on disk"));
        }
    }
    for (name, payload) in &invalid {
        let Some((kind, field)) = expected.get(name) else {
            problems.push(format!("{name}: not listed in EXPECTED.tsv"));
            continue;
        };
        match decode(payload) {
            Ok(_) => problems.push(format!("{name}: accepted, expected {kind}")),
            Err(e) => {
                if e.kind() != kind || e.field() != field.as_deref() {
                    problems.push(format!(
                        "{name}: got {} / {:?} ({e}), expected {kind} / {field:?}",
                        e.kind(),
                        e.field()
                    ));
                }
                problems.extend(message_problems(name, &e, payload));
            }
        }
    }
    assert_none(problems);
}

/// Messages name their field, stay short, and never carry the payload.
fn message_problems(name: &str, e: &EventError, payload: &[u8]) -> Vec<String> {
    let msg = e.to_string();
    let mut out = Vec::new();
    if let Some(field) = e.field()
        && !msg.starts_with(&format!("`{field}`: "))
    {
        out.push(format!("{name}: message does not name `{field}`: {msg}"));
    }
    if msg.chars().count() > 300 {
        out.push(format!(
            "{name}: message is {} chars long",
            msg.chars().count()
        ));
    }
    if payload.len() > 100
        && let Ok(text) = std::str::from_utf8(payload)
        && msg.contains(text.trim())
    {
        out.push(format!("{name}: message contains the whole payload"));
    }
    out
}

#[test]
fn reasons_are_distinct_and_cover_every_kind() {
    let expected = expected();
    let reasons: HashSet<_> = expected.values().collect();
    assert!(
        reasons.len() >= MIN_FIXTURES,
        "only {} distinct (kind, field) pairs",
        reasons.len()
    );
    let kinds: HashSet<&str> = expected.values().map(|(k, _)| k.as_str()).collect();
    for kind in [
        "empty",
        "not_utf8",
        "not_json",
        "too_deep",
        "not_object",
        "duplicate_field",
        "missing_field",
        "wrong_type",
        "empty_field",
        "too_long",
        "too_many_items",
        "nul_character",
        "invalid_uuid",
        "timestamp_no_offset",
        "invalid_timestamp",
        "invalid_enum",
        "invalid_entity_type",
    ] {
        assert!(kinds.contains(kind), "no invalid fixture for kind {kind}");
    }
}

/// Too big to keep in the repository, so built here: the size limit is exact, on both sides.
#[test]
fn payload_size_limit_is_exact() {
    let (_, base) = fixtures("valid")
        .into_iter()
        .find(|(n, _)| n == "minimal_required_only.json")
        .expect("minimal fixture");
    let padded = |len: usize| {
        // Trailing whitespace keeps the JSON valid while reaching any size.
        let mut p = base.clone();
        p.resize(len, b' ');
        p
    };
    let at_limit = padded(MAX_PAYLOAD_BYTES);
    assert!(decode(&at_limit).is_ok());
    assert_none(disagreements("at_limit", &at_limit));

    let over = padded(MAX_PAYLOAD_BYTES + 1);
    let e = decode(&over).expect_err("over the limit");
    assert_eq!(e.kind(), "too_large");
    assert_eq!(e.field(), None);
    assert_eq!(
        e.to_string(),
        format!(
            "payload is {} bytes, above the {MAX_PAYLOAD_BYTES}-byte limit",
            MAX_PAYLOAD_BYTES + 1
        )
    );
    assert_none(disagreements("over_limit", &over));
}

#[test]
fn immudb_keys_of_valid_fixtures_have_the_documented_shape() {
    // The schema crate's ECMA-262 regex engine, so the check needs no extra dependency.
    let key_shape = jsonschema::validator_for(&serde_json::json!({
        "type": "string",
        "pattern": "^audit:[a-z0-9_.-]+:[0-9a-f-]{36}$"
    }))
    .expect("pattern compiles");
    let mut problems = Vec::new();
    for (name, payload) in fixtures("valid") {
        let Ok(event) = decode(&payload) else {
            continue; // reported by the validity test
        };
        let key = event.immudb_key();
        if !key_shape.is_valid(&Value::String(key.clone())) {
            problems.push(format!("{name}: bad key {key:?}"));
        }
        let want = format!(
            "audit:{}:{}",
            event.entity_type.to_ascii_lowercase(),
            event.event_id.hyphenated()
        );
        if key != want {
            problems.push(format!("{name}: key {key:?}, expected {want:?}"));
        }
    }
    assert_none(problems);
}

/// `AuditEvent`'s `Deserialize` validates exactly like `decode`, and `Serialize` output
/// decodes back to the same event.
#[test]
fn serde_paths_agree_with_decode() {
    let mut problems = Vec::new();
    for kind in ["valid", "invalid"] {
        for (name, payload) in fixtures(kind) {
            let Ok(text) = std::str::from_utf8(&payload) else {
                continue;
            };
            let via_serde = serde_json::from_str::<AuditEvent>(text);
            match (decode(&payload), via_serde) {
                (Ok(a), Ok(b)) if a == b => {
                    let json = serde_json::to_vec(&a).expect("serializes");
                    match decode(&json) {
                        Ok(c) if c == a => {}
                        other => problems.push(format!("{name}: round trip gave {other:?}")),
                    }
                }
                (Err(_), Err(_)) => {}
                (a, b) => problems.push(format!("{name}: decode {a:?}, serde {b:?}")),
            }
        }
    }
    assert_none(problems);
}

/// Beyond the fixtures: every known field (and an unknown one, and each `metadata` member) set
/// to each of a catalogue of awkward values, or removed, gets the same verdict on both sides.
#[test]
fn field_value_matrix_agrees_with_schema() {
    let (_, base) = fixtures("valid")
        .into_iter()
        .find(|(n, _)| n == "minimal_required_only.json")
        .expect("minimal fixture");
    let base: serde_json::Map<String, Value> = serde_json::from_slice(&base).expect("object");
    let fields = [
        "event_id",
        "timestamp",
        "entity_type",
        "entity_id",
        "action",
        "user_id",
        "trace_id",
        "session_id",
        "old_value",
        "new_value",
        "reason",
        "signature_id",
        "metadata",
        "user_display_name",
        "module",
        "risk_level",
        "compliance_flags",
        "correlation_id",
        "source_system",
        "event_version",
        "category",
        "x_unknown",
    ];
    let metadata_members = [
        "source",
        "version",
        "ip_address",
        "user_agent",
        "api_version",
        "x",
    ];
    let values = awkward_values();

    let mut problems = Vec::new();
    let mut check = |label: String, event: &serde_json::Map<String, Value>| {
        let payload = serde_json::to_vec(event).expect("serializes");
        problems.extend(disagreements(&label, &payload));
    };
    for field in fields {
        let mut event = base.clone();
        event.remove(field);
        check(format!("without {field}"), &event);
        for value in &values {
            let mut event = base.clone();
            event.insert(field.to_owned(), value.clone());
            check(format!("{field} = {}", shorten(&value.to_string())), &event);
        }
    }
    for member in metadata_members {
        for value in &values {
            let mut event = base.clone();
            event.insert(
                "metadata".to_owned(),
                serde_json::json!({ member: value.clone() }),
            );
            check(
                format!("metadata.{member} = {}", shorten(&value.to_string())),
                &event,
            );
        }
    }
    assert_none(problems);
}

fn awkward_values() -> Vec<Value> {
    use serde_json::json;
    let s = |n: usize, c: char| Value::String(std::iter::repeat_n(c, n).collect());
    let flags = |n: usize| Value::Array(std::iter::repeat_n(json!("F"), n).collect());
    let mut values = vec![
        json!(null),
        json!(true),
        json!(0),
        json!(-1.5),
        json!(""),
        json!(" "),
        json!("a"),
        json!([]),
        json!({}),
        json!(["GACP"]),
        json!([""]),
        json!([1]),
        json!([null]),
        json!({"source": "x", "other": [1, {"a": null}]}),
        json!({"source": 1}),
        json!({"source": null}),
        json!({"user_agent": s(2049, 'a')}),
        json!("a\u{0}b"),
        json!({"k": ["a\u{0}"]}),
        json!([[[["deep"]]]]),
        flags(64),
        flags(65),
        json!([s(128, 'f')]),
        json!([s(129, 'f')]),
    ];
    for text in [
        "HIGH",
        "MEDIUM",
        "LOW",
        "high",
        "CRITICAL",
        "USER_ACTION",
        "SYSTEM_EVENT",
        "COMPLIANCE_EVENT",
        "SECURITY_EVENT",
        "BATCH_LIFECYCLE",
        "user_action",
        "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        "3F2504E0-4F89-11D3-9A0C-0305E82C3301",
        "3f2504e04f8911d39a0c0305e82c3301",
        "{3f2504e0-4f89-11d3-9a0c-0305e82c3301}",
        "3f2504e0-4f89-11d3-9a0c-0305e82c330",
        "3f2504e0_4f89_11d3_9a0c_0305e82c3301",
        "2024-02-29T12:00:00Z",
        "2023-02-29T12:00:00Z",
        "2000-02-29T00:00:00Z",
        "2100-02-29T00:00:00Z",
        "0000-02-29T00:00:00Z",
        "2024-06-30T23:59:59+14:00",
        "2024-06-31T00:00:00Z",
        "2024-05-01T10:00:00",
        "2024-05-01T10:00:00.5",
        "2024-05-01T10:00:00+05:30",
        "2024-05-01t10:00:00z",
        "2024-05-01T10:00:00.123456789-00:00",
        "2024-05-01T10:00:00.1234567890Z",
        "2016-12-31T23:59:60Z",
        "2024-05-01T10:00:00+0530",
        "2024-05-01T10:00:00+23:59",
        "2024-05-01T10:00:00-23:60",
        "2024-05-01T10:60:00Z",
        "2024-00-10T10:00:00Z",
        "2024-05-00T10:00:00Z",
        "2024-05-01T10:00:00Z ",
        " 2024-05-01T10:00:00Z",
        "2024-05-01T10:00Z",
        "+2024-05-01T10:00:00Z",
        "Plant.Batch-1_x",
        "plant:x",
        "plant x",
        "plant\n",
        "pflanze_größe",
    ] {
        values.push(json!(text));
    }
    for (n, c) in [
        (64, 'p'),
        (65, 'p'),
        (128, 'f'),
        (256, 'é'),
        (257, 'é'),
        (256, '🌱'),
        (257, '🌱'),
        (2048, 'ü'),
        (2049, 'ü'),
    ] {
        values.push(s(n, c));
    }
    values
}
