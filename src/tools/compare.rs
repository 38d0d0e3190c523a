//! A PostgreSQL row compared with the immudb value it replicates, column by column.
//!
//! The immudb value is the original payload; every PG column that comes from the payload must
//! equal what decoding that payload gives today, in the form the batch insert
//! ([`crate::postgres::insert_batch`]) stores it. `verify` and `reconcile` share this code so
//! they can never disagree about what "the same" means.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::event::AuditEvent;

/// The columns of `audit_trail` the tools read, in [`StoredRow`] order.
pub const ROW_COLUMNS: &str = "event_id, event_timestamp, entity_type, entity_id, action, user_id, \
    user_display_name, trace_id, session_id, correlation_id, old_value, new_value, reason, \
    signature_id, metadata, module, risk_level, compliance_flags, source_system, event_version, \
    category, immudb_key, immudb_tx, immudb_verified, payload_sha256, source_topic, \
    source_partition, source_offset";

/// One `audit_trail` row as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredRow {
    /// Primary key, from the payload.
    pub event_id: Uuid,
    /// The payload's `timestamp` in UTC (microsecond precision: PostgreSQL's).
    pub event_timestamp: DateTime<Utc>,
    /// From the payload.
    pub entity_type: String,
    /// From the payload.
    pub entity_id: String,
    /// From the payload.
    pub action: String,
    /// From the payload.
    pub user_id: String,
    /// From the payload.
    pub user_display_name: Option<String>,
    /// From the payload.
    pub trace_id: Option<String>,
    /// From the payload.
    pub session_id: Option<String>,
    /// From the payload.
    pub correlation_id: Option<String>,
    /// From the payload (jsonb).
    pub old_value: Option<Value>,
    /// From the payload (jsonb).
    pub new_value: Option<Value>,
    /// From the payload.
    pub reason: Option<String>,
    /// From the payload.
    pub signature_id: Option<String>,
    /// The modelled members of the payload's `metadata` (jsonb).
    pub metadata: Option<Value>,
    /// From the payload.
    pub module: Option<String>,
    /// From the payload.
    pub risk_level: Option<String>,
    /// From the payload.
    pub compliance_flags: Option<Vec<String>>,
    /// From the payload.
    pub source_system: Option<String>,
    /// From the payload.
    pub event_version: Option<String>,
    /// From the payload.
    pub category: Option<String>,
    /// Where the payload is in immudb.
    pub immudb_key: String,
    /// The immudb transaction that wrote the payload.
    pub immudb_tx: i64,
    /// Whether the writer verified immudb's proof when storing.
    pub immudb_verified: bool,
    /// SHA-256 of the payload bytes.
    pub payload_sha256: Vec<u8>,
    /// Kafka topic the event was consumed from (`reconcile` for rows restored from immudb).
    pub source_topic: String,
    /// Kafka partition.
    pub source_partition: i32,
    /// Kafka offset.
    pub source_offset: i64,
}

/// The outcome of comparing one column.
#[derive(Debug, Clone, Serialize)]
pub struct FieldCheck {
    /// Column name.
    pub field: &'static str,
    /// Whether PostgreSQL holds what the immudb value says.
    #[serde(rename = "match")]
    pub matches: bool,
    /// The PostgreSQL value as JSON text (only for a mismatch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<String>,
    /// The value decoded from immudb as JSON text (only for a mismatch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub immudb: Option<String>,
}

/// Longest rendering of a value in a report; audit payloads may carry large JSON documents.
pub const MAX_SHOWN_CHARS: usize = 200;

/// Compares every payload-derived column of `row` (and its `immudb_key`) with `event`, the
/// decoded immudb value stored under `key`.
pub fn compare_fields(row: &StoredRow, event: &AuditEvent, key: &str) -> Vec<FieldCheck> {
    let mut checks = Vec::with_capacity(24);
    let mut push =
        |field: &'static str, matches: bool, pg: &dyn Fn() -> String, im: &dyn Fn() -> String| {
            checks.push(FieldCheck {
                field,
                matches,
                postgres: (!matches).then(|| truncate(&pg(), MAX_SHOWN_CHARS)),
                immudb: (!matches).then(|| truncate(&im(), MAX_SHOWN_CHARS)),
            });
        };
    macro_rules! text {
        ($field:ident) => {
            push(
                stringify!($field),
                row.$field == event.$field,
                &|| json_text(&row.$field),
                &|| json_text(&event.$field),
            )
        };
    }
    push(
        "event_id",
        row.event_id == event.event_id,
        &|| row.event_id.to_string(),
        &|| event.event_id.to_string(),
    );
    let event_time = event.timestamp_utc();
    push(
        "event_timestamp",
        same_instant(row.event_timestamp, event_time),
        &|| rfc3339(row.event_timestamp),
        &|| rfc3339(event_time),
    );
    text!(entity_type);
    text!(entity_id);
    text!(action);
    text!(user_id);
    text!(user_display_name);
    text!(trace_id);
    text!(session_id);
    text!(correlation_id);
    push(
        "old_value",
        option_json_equal(row.old_value.as_ref(), event.old_value.as_ref()),
        &|| json_text(&row.old_value),
        &|| json_text(&event.old_value),
    );
    push(
        "new_value",
        option_json_equal(row.new_value.as_ref(), event.new_value.as_ref()),
        &|| json_text(&row.new_value),
        &|| json_text(&event.new_value),
    );
    text!(reason);
    text!(signature_id);
    // The insert stores the modelled members only (unknown ones stay in the original bytes).
    let metadata = event
        .metadata
        .as_ref()
        .and_then(|m| serde_json::to_value(m).ok());
    push(
        "metadata",
        option_json_equal(row.metadata.as_ref(), metadata.as_ref()),
        &|| json_text(&row.metadata),
        &|| json_text(&metadata),
    );
    text!(module);
    let risk_level = event.risk_level.map(|r| r.as_str());
    push(
        "risk_level",
        row.risk_level.as_deref() == risk_level,
        &|| json_text(&row.risk_level),
        &|| json_text(&risk_level),
    );
    text!(compliance_flags);
    text!(source_system);
    text!(event_version);
    let category = event.category.map(|c| c.as_str());
    push(
        "category",
        row.category.as_deref() == category,
        &|| json_text(&row.category),
        &|| json_text(&category),
    );
    let expected_key = event.immudb_key();
    push(
        "immudb_key",
        row.immudb_key == key && row.immudb_key == expected_key,
        &|| json_text(&row.immudb_key),
        &|| {
            if key == expected_key {
                json_text(&key)
            } else {
                format!(
                    "{} (the event's own key is {expected_key})",
                    json_text(&key)
                )
            }
        },
    );
    checks
}

/// The names of the columns that differ.
pub fn differing(checks: &[FieldCheck]) -> Vec<&'static str> {
    checks
        .iter()
        .filter(|c| !c.matches)
        .map(|c| c.field)
        .collect()
}

/// PostgreSQL keeps microseconds and sqlx truncates the nanoseconds a payload may carry, so two
/// instants less than a microsecond apart are the same stored value.
fn same_instant(stored: DateTime<Utc>, event: DateTime<Utc>) -> bool {
    (stored - event)
        .num_nanoseconds()
        .is_some_and(|nanos| nanos.abs() < 1_000)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn option_json_equal(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => json_equal(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// JSON equality as jsonb understands it: object member order is irrelevant and numbers are
/// compared by value. serde_json alone would call `100` (read back from jsonb's numeric) and
/// `1e2` (as sent) different.
pub fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                x == y
            } else if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
                x == y
            } else {
                match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => x == y,
                    _ => x == y,
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_equal(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

/// Any value rendered as compact JSON (`null` for `None`), so strings show their quotes and an
/// absent value cannot be mistaken for an empty one.
fn json_text<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("<unprintable: {e}>"))
}

/// The value for a report column, `-` when there is none.
pub fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// `text` cut to at most `max` characters, marked with `…` and the full length when cut.
pub fn truncate(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max).collect();
    format!("{cut}… ({count} chars)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_numbers_compare_by_value_and_members_by_name() {
        let sent: Value =
            serde_json::from_str(r#"{"a":1e2,"b":[1,2.50],"c":{"x":null}}"#).expect("json");
        let stored = json!({"c": {"x": null}, "b": [1, 2.5], "a": 100});
        assert!(json_equal(&sent, &stored));
        assert!(!json_equal(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!json_equal(&json!([1, 2]), &json!([2, 1])));
        assert!(!json_equal(&json!("1"), &json!(1)));
    }

    #[test]
    fn long_values_are_truncated_with_their_length() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc… (6 chars)");
    }

    fn row_for(event: &AuditEvent) -> StoredRow {
        StoredRow {
            event_id: event.event_id,
            event_timestamp: event.timestamp_utc(),
            entity_type: event.entity_type.clone(),
            entity_id: event.entity_id.clone(),
            action: event.action.clone(),
            user_id: event.user_id.clone(),
            user_display_name: event.user_display_name.clone(),
            trace_id: event.trace_id.clone(),
            session_id: event.session_id.clone(),
            correlation_id: event.correlation_id.clone(),
            old_value: event.old_value.clone(),
            new_value: event.new_value.clone(),
            reason: event.reason.clone(),
            signature_id: event.signature_id.clone(),
            metadata: event
                .metadata
                .as_ref()
                .and_then(|m| serde_json::to_value(m).ok()),
            module: event.module.clone(),
            risk_level: event.risk_level.map(|r| r.as_str().to_owned()),
            compliance_flags: event.compliance_flags.clone(),
            source_system: event.source_system.clone(),
            event_version: event.event_version.clone(),
            category: event.category.map(|c| c.as_str().to_owned()),
            immudb_key: event.immudb_key(),
            immudb_tx: 1,
            immudb_verified: false,
            payload_sha256: vec![0; 32],
            source_topic: "t".into(),
            source_partition: 0,
            source_offset: 0,
        }
    }

    #[test]
    fn a_faithful_row_matches_and_a_changed_column_is_named() {
        let payload = br#"{"event_id":"7f1c2d3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f","timestamp":"2026-01-01T01:00:00.123456789+01:00","entity_type":"Plant","entity_id":"p","action":"a","user_id":"u","new_value":{"n":1e2},"metadata":{"source":"s","extra":1},"risk_level":"HIGH","compliance_flags":["GACP"]}"#;
        let event = crate::event::decode(payload).expect("valid event");
        let key = event.immudb_key();
        let mut row = row_for(&event);
        // As PostgreSQL gives it back: microseconds, numbers normalised.
        row.event_timestamp = DateTime::parse_from_rfc3339("2026-01-01T00:00:00.123456Z")
            .expect("time")
            .with_timezone(&Utc);
        row.new_value = Some(json!({"n": 100}));
        let checks = compare_fields(&row, &event, &key);
        assert!(differing(&checks).is_empty(), "{checks:?}");

        row.new_value = Some(json!({"n": 101}));
        row.risk_level = Some("LOW".into());
        let checks = compare_fields(&row, &event, &key);
        assert_eq!(differing(&checks), ["new_value", "risk_level"]);
        let new_value = checks
            .iter()
            .find(|c| c.field == "new_value")
            .expect("check");
        assert_eq!(new_value.postgres.as_deref(), Some(r#"{"n":101}"#));
    }
}
