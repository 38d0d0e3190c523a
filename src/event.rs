//! The audit event: its Rust model, the validator that enforces the contract, the immudb key and
//! the payload digest.
//!
//! `schemas/audit-event.v1.schema.json` is the contract; this module must give the same verdict
//! as that schema on every payload (`tests/contract.rs` proves it on every fixture). Rules the
//! schema cannot express (payload size, UTF-8, nesting depth, duplicate member names) are
//! documented in the schema's `$comment` and applied to both sides by the contract test.
//!
//! [`decode`] parses each payload exactly once: a borrowing serde pass records, per known field,
//! what was found (absent, null, a value, or a value of the wrong JSON type) without failing
//! early, then a validation pass turns that into an owned [`AuditEvent`] or the first, specific
//! [`EventError`]. Unknown members are skipped but still pass through the parser, so they obey
//! the same depth and syntax rules as everything else.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveTime, TimeZone, Utc};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Largest payload accepted, in bytes.
///
/// immudb would take values up to 32 MiB, but one immudb transaction holds a whole batch (up to
/// 1024 entries) and travels in one gRPC message, and every payload may have to be re-published
/// unmodified to the DLQ: Kafka's default `message.max.bytes` is 1 MiB, so a larger event could
/// be neither batched safely nor dead-lettered. Real audit events are a few KiB at most.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Deepest nesting of arrays/objects (the top-level object counts as 1) that parses.
///
/// This is serde_json's recursion limit, not a choice of ours: it protects the stack, and the
/// contract test parses with the same parser, so both sides reject the same payloads.
pub const MAX_NESTING_DEPTH: usize = 127;

/// Limit for `entity_type`, which becomes part of the immudb key.
pub const MAX_ENTITY_TYPE_CHARS: usize = 64;
/// Limit for identifiers and short strings (ids, names, versions, metadata values).
pub const MAX_SHORT_CHARS: usize = 256;
/// Limit for free text (`reason`, `metadata.user_agent`).
pub const MAX_TEXT_CHARS: usize = 2048;
/// Most entries `compliance_flags` may hold.
pub const MAX_COMPLIANCE_FLAGS: usize = 64;
/// Limit for one compliance flag.
pub const MAX_COMPLIANCE_FLAG_CHARS: usize = 128;

/// How much of an offending value an error message echoes: enough to recognise it in a DLQ
/// header, never a whole payload.
const ECHO_CHARS: usize = 64;

/// One audit event as produced on the `audit.*.v1` topics, validated against the contract.
///
/// `Deserialize` runs the same validation as [`decode`] (minus the payload-level checks), so an
/// `AuditEvent` never holds data the contract rejects. Optional fields sent as `null` are
/// treated as absent; the original bytes, not this struct, are what immudb stores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEvent {
    /// Producer-assigned id; with `entity_type` it forms the immudb key and makes writes idempotent.
    pub event_id: Uuid,
    /// When the audited action happened, with the producer's UTC offset.
    pub timestamp: DateTime<FixedOffset>,
    /// Kind of entity acted upon (`plant`, `batch`, …); only `[A-Za-z0-9_.-]`, at most 64 chars.
    pub entity_type: String,
    /// Id of the entity acted upon.
    pub entity_id: String,
    /// What was done (`HARVEST`, `BATCH_RELEASED`, …).
    pub action: String,
    /// Who did it.
    pub user_id: String,
    /// Distributed-tracing id, when the producer had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Session in which the action happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// State before the change (any JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_value: Option<Value>,
    /// State after the change (any JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_value: Option<Value>,
    /// Why the change was made (GMP requires a reason for changes to records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Electronic signature backing the action (21 CFR Part 11 / EU GMP Annex 11).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature_id: Option<String>,
    /// Where the event came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<EventMetadata>,
    /// Human-readable name of `user_id` at the time of the action.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_display_name: Option<String>,
    /// Application module that produced the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Producer's risk classification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk_level: Option<RiskLevel>,
    /// Regulations or controls the event is relevant to (`GACP`, `21CFR11`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compliance_flags: Option<Vec<String>>,
    /// Ties together the events of one business operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Producing system.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_system: Option<String>,
    /// Version of the producer's event format.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_version: Option<String>,
    /// Broad class of event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<Category>,
}

/// Origin of an event. Members other than these are allowed in the payload but not modelled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// Producing component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Producer version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Client address as the producer saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// Client user agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// API version the client used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
}

/// Producer's risk classification of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RiskLevel {
    /// `HIGH`
    High,
    /// `MEDIUM`
    Medium,
    /// `LOW`
    Low,
}

impl RiskLevel {
    /// The contract's spelling (`HIGH`, `MEDIUM`, `LOW`), as stored in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "HIGH",
            Self::Medium => "MEDIUM",
            Self::Low => "LOW",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "HIGH" => Some(Self::High),
            "MEDIUM" => Some(Self::Medium),
            "LOW" => Some(Self::Low),
            _ => None,
        }
    }
}

/// Broad class of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Category {
    /// `USER_ACTION`
    UserAction,
    /// `SYSTEM_EVENT`
    SystemEvent,
    /// `COMPLIANCE_EVENT`
    ComplianceEvent,
    /// `SECURITY_EVENT`
    SecurityEvent,
    /// `BATCH_LIFECYCLE`
    BatchLifecycle,
}

impl Category {
    /// The contract's spelling (`USER_ACTION`, …), as stored in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UserAction => "USER_ACTION",
            Self::SystemEvent => "SYSTEM_EVENT",
            Self::ComplianceEvent => "COMPLIANCE_EVENT",
            Self::SecurityEvent => "SECURITY_EVENT",
            Self::BatchLifecycle => "BATCH_LIFECYCLE",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "USER_ACTION" => Some(Self::UserAction),
            "SYSTEM_EVENT" => Some(Self::SystemEvent),
            "COMPLIANCE_EVENT" => Some(Self::ComplianceEvent),
            "SECURITY_EVENT" => Some(Self::SecurityEvent),
            "BATCH_LIFECYCLE" => Some(Self::BatchLifecycle),
            _ => None,
        }
    }
}

impl AuditEvent {
    /// The immudb key: `audit:{entity_type lower-cased}:{event_id}`, the UUID hyphenated and
    /// lower-case. Validation restricts `entity_type` to ASCII, so lower-casing is unambiguous
    /// and the key matches `^audit:[a-z0-9_.-]+:[0-9a-f-]{36}$`.
    pub fn immudb_key(&self) -> String {
        let mut key = String::with_capacity(6 + self.entity_type.len() + 1 + 36);
        key.push_str("audit:");
        key.extend(self.entity_type.chars().map(|c| c.to_ascii_lowercase()));
        key.push(':');
        let mut buf = Uuid::encode_buffer();
        key.push_str(self.event_id.hyphenated().encode_lower(&mut buf));
        key
    }

    /// The immudb key that makes `event_id` unique whatever the entity type: `event:{event_id}`
    /// (hyphenated, lower case), written in the same transaction as [`immudb_key`]
    /// (Self::immudb_key) with a `KeyMustNotExist` precondition, so a second copy of an id under
    /// another entity type is refused by immudb itself. Its value is [`uniqueness_value`].
    pub fn uniqueness_key(&self) -> String {
        uniqueness_key(self.event_id)
    }

    /// The event time in UTC, as stored in PostgreSQL's `timestamptz`.
    pub fn timestamp_utc(&self) -> DateTime<Utc> {
        self.timestamp.with_timezone(&Utc)
    }
}

/// Prefix of the per-event uniqueness keys in immudb (outside the `audit:` prefix).
pub const UNIQUENESS_PREFIX: &str = "event:";

/// `event:{event_id}`: see [`AuditEvent::uniqueness_key`].
pub fn uniqueness_key(event_id: Uuid) -> String {
    let mut buf = Uuid::encode_buffer();
    format!(
        "{UNIQUENESS_PREFIX}{}",
        event_id.hyphenated().encode_lower(&mut buf)
    )
}

/// The value of an event's uniqueness key: the payload's SHA-256 as 64 lower-case hex
/// characters, so a redelivery (same digest) is told from a conflict (another digest) and the
/// entry reads plainly in `immuclient`.
pub fn uniqueness_value(digest: &[u8; 32]) -> Vec<u8> {
    hex::encode(digest).into_bytes()
}

/// SHA-256 of the payload exactly as received: what PostgreSQL stores to prove a row against
/// the immudb value, and how a redelivered duplicate is told from a conflicting reuse of an id.
pub fn payload_sha256(payload: &[u8]) -> [u8; 32] {
    Sha256::digest(payload).into()
}

/// Parses and validates one payload. The only way the pipeline turns bytes into an event.
///
/// Every error is permanent for this payload (it goes to the DLQ, never retried).
pub fn decode(payload: &[u8]) -> Result<AuditEvent, EventError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(EventError::TooLarge {
            size: payload.len(),
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    if payload.is_empty() {
        return Err(EventError::Empty);
    }
    // Checked up front so the message can say where, and so serde_json can take the faster
    // `&str` path that skips re-validating every string.
    let text = std::str::from_utf8(payload).map_err(|e| EventError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    if text
        .bytes()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        return Err(EventError::Blank { len: payload.len() });
    }
    let top: Slot<RawEvent<'_>> = serde_json::from_str(text).map_err(parse_error)?;
    top_level(top)
}

fn parse_error(err: serde_json::Error) -> EventError {
    // serde_json reports its recursion limit as a syntax error; its Display text is the only
    // thing that tells it apart (a unit test pins this down).
    if err.to_string().starts_with("recursion limit exceeded") {
        EventError::TooDeep {
            line: err.line(),
            column: err.column(),
        }
    } else {
        EventError::NotJson {
            detail: err.to_string(),
        }
    }
}

/// The type of a JSON value, spelt as JSON Schema spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonType {
    /// `null`
    Null,
    /// `true` / `false`
    Boolean,
    /// any number
    Number,
    /// a string
    String,
    /// an array
    Array,
    /// an object
    Object,
}

impl fmt::Display for JsonType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Null => "null",
            Self::Boolean => "boolean",
            Self::Number => "number",
            Self::String => "string",
            Self::Array => "array",
            Self::Object => "object",
        })
    }
}

/// Why a payload is not a valid audit event. Every variant is permanent for that payload.
///
/// Messages name the field and echo at most 64 characters of the offending value (escaped), so
/// they are safe for logs and DLQ headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// Zero bytes.
    #[error("payload is empty")]
    Empty,
    /// Only JSON whitespace.
    #[error("payload is empty ({len} bytes of whitespace only)")]
    Blank {
        /// Payload size in bytes.
        len: usize,
    },
    /// Above [`MAX_PAYLOAD_BYTES`].
    #[error("payload is {size} bytes, above the {limit}-byte limit")]
    TooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// Not UTF-8 (JSON must be).
    #[error("payload is not valid UTF-8 at byte {offset}")]
    NotUtf8 {
        /// Byte offset of the first invalid sequence.
        offset: usize,
    },
    /// Not well-formed JSON (syntax, trailing data, number out of range, lone surrogate, …).
    #[error("payload is not JSON: {detail}")]
    NotJson {
        /// The parser's description, with line and column.
        detail: String,
    },
    /// Nested deeper than [`MAX_NESTING_DEPTH`].
    #[error(
        "payload is nested too deeply (at most {MAX_NESTING_DEPTH} levels of arrays/objects), at line {line} column {column}"
    )]
    TooDeep {
        /// Line where the limit was hit.
        line: usize,
        /// Column where the limit was hit.
        column: usize,
    },
    /// JSON, but not an object at the top level.
    #[error("payload is a JSON {found}, expected an object")]
    NotObject {
        /// What the top level is.
        found: JsonType,
    },
    /// A member name appears twice in the event or in `metadata`; parsers disagree on which
    /// value wins, so the record would be ambiguous.
    #[error("`{field}`: duplicate field")]
    DuplicateField {
        /// The repeated member (`metadata.` prefixed when inside `metadata`).
        field: Cow<'static, str>,
    },
    /// A required field is absent.
    #[error("`{field}`: missing required field")]
    MissingField {
        /// The missing field.
        field: &'static str,
    },
    /// A field holds the wrong JSON type (including `null` for a required field).
    #[error("`{field}`: expected {expected}, got {found}")]
    WrongType {
        /// The field (`compliance_flags[2]`, `metadata.source` for nested ones).
        field: Cow<'static, str>,
        /// What the contract wants.
        expected: &'static str,
        /// What was there.
        found: JsonType,
    },
    /// A string that must not be empty is empty.
    #[error("`{field}`: must not be empty")]
    EmptyField {
        /// The field.
        field: Cow<'static, str>,
    },
    /// A string is longer than its limit (counted in Unicode code points, as JSON Schema does).
    #[error("`{field}`: {chars} characters, above the {limit}-character limit")]
    TooLong {
        /// The field.
        field: Cow<'static, str>,
        /// Its length in code points.
        chars: usize,
        /// The limit.
        limit: usize,
    },
    /// An array holds more items than allowed.
    #[error("`{field}`: {items} items, above the {limit}-item limit")]
    TooManyItems {
        /// The field.
        field: &'static str,
        /// How many items it holds.
        items: usize,
        /// The limit.
        limit: usize,
    },
    /// A string contains U+0000, which PostgreSQL cannot store in `text` or `jsonb`; accepting
    /// it would fail the whole batch's INSERT instead of this one event.
    #[error("`{field}`: contains a NUL character (U+0000), which PostgreSQL cannot store")]
    NulCharacter {
        /// The field (for `old_value`/`new_value`, anywhere inside them).
        field: Cow<'static, str>,
    },
    /// `event_id` is not a hyphenated UUID.
    #[error("`{field}`: not a UUID: {value}")]
    InvalidUuid {
        /// The field.
        field: &'static str,
        /// The value, escaped and truncated.
        value: String,
    },
    /// `timestamp` is a date-time without `Z` or `±hh:mm`; its instant would be a guess.
    #[error("`{field}`: missing UTC offset (expected Z or ±hh:mm): {value}")]
    TimestampNoOffset {
        /// The field.
        field: &'static str,
        /// The value, escaped and truncated.
        value: String,
    },
    /// `timestamp` is not an RFC 3339 date-time, or names a date that does not exist.
    #[error("`{field}`: {problem}: {value}")]
    InvalidTimestamp {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
        /// The value, escaped and truncated.
        value: String,
    },
    /// A value outside an enumeration.
    #[error("`{field}`: unknown value {value} (expected {expected})")]
    InvalidEnum {
        /// The field.
        field: &'static str,
        /// The value, escaped and truncated.
        value: String,
        /// The allowed values, for the message.
        expected: &'static str,
    },
    /// `entity_type` holds a character that cannot appear in an immudb key segment.
    #[error(
        "`{field}`: character {ch:?} at position {position} is not allowed (only A-Z a-z 0-9 _ . -)"
    )]
    InvalidEntityType {
        /// The field.
        field: &'static str,
        /// The first offending character.
        ch: char,
        /// Its position, in characters from 0.
        position: usize,
    },
}

impl EventError {
    /// The field the error is about, if it is about one (`metadata.source`,
    /// `compliance_flags[1]` for nested ones).
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Empty
            | Self::Blank { .. }
            | Self::TooLarge { .. }
            | Self::NotUtf8 { .. }
            | Self::NotJson { .. }
            | Self::TooDeep { .. }
            | Self::NotObject { .. } => None,
            Self::DuplicateField { field }
            | Self::WrongType { field, .. }
            | Self::EmptyField { field }
            | Self::TooLong { field, .. }
            | Self::NulCharacter { field } => Some(field),
            Self::MissingField { field }
            | Self::TooManyItems { field, .. }
            | Self::InvalidUuid { field, .. }
            | Self::TimestampNoOffset { field, .. }
            | Self::InvalidTimestamp { field, .. }
            | Self::InvalidEnum { field, .. }
            | Self::InvalidEntityType { field, .. } => Some(field),
        }
    }

    /// A short, stable code for logs, metrics labels and DLQ headers.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty | Self::Blank { .. } => "empty",
            Self::TooLarge { .. } => "too_large",
            Self::NotUtf8 { .. } => "not_utf8",
            Self::NotJson { .. } => "not_json",
            Self::TooDeep { .. } => "too_deep",
            Self::NotObject { .. } => "not_object",
            Self::DuplicateField { .. } => "duplicate_field",
            Self::MissingField { .. } => "missing_field",
            Self::WrongType { .. } => "wrong_type",
            Self::EmptyField { .. } => "empty_field",
            Self::TooLong { .. } => "too_long",
            Self::TooManyItems { .. } => "too_many_items",
            Self::NulCharacter { .. } => "nul_character",
            Self::InvalidUuid { .. } => "invalid_uuid",
            Self::TimestampNoOffset { .. } => "timestamp_no_offset",
            Self::InvalidTimestamp { .. } => "invalid_timestamp",
            Self::InvalidEnum { .. } => "invalid_enum",
            Self::InvalidEntityType { .. } => "invalid_entity_type",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing: what was found at each known member, before any judgement.

/// What a member held. Wrong types are recorded rather than raised so that validation can
/// report them per field and in a fixed order, after the whole payload is known to parse.
#[derive(Debug, Default)]
enum Slot<T> {
    #[default]
    Absent,
    Null,
    Present(T),
    Wrong(JsonType),
}

/// How a parsed type reacts to each JSON shape; anything it does not accept is drained (still
/// through the parser, so depth and syntax limits hold) and recorded as [`Slot::Wrong`].
trait Shaped<'de>: Sized {
    /// Whether `from_str` wants the string; lets non-string slots skip copying escaped strings.
    const WANTS_STR: bool = false;

    fn from_str(_s: Cow<'de, str>) -> Slot<Self> {
        Slot::Wrong(JsonType::String)
    }

    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Slot<Self>, A::Error> {
        while seq.next_element::<Slot<Skipped>>()?.is_some() {}
        Ok(Slot::Wrong(JsonType::Array))
    }

    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Slot<Self>, A::Error> {
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value::<Slot<Skipped>>()?;
        }
        Ok(Slot::Wrong(JsonType::Object))
    }
}

/// A value nobody wants (unknown members, surplus items); parsing it only checks it.
enum Skipped {}

impl Shaped<'_> for Skipped {}

impl<'de> Shaped<'de> for Cow<'de, str> {
    const WANTS_STR: bool = true;

    fn from_str(s: Cow<'de, str>) -> Slot<Self> {
        Slot::Present(s)
    }
}

impl<'de, T: Shaped<'de>> Deserialize<'de> for Slot<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // `deserialize_any` on every level keeps serde_json's recursion guard in force, exactly
        // as when parsing into `serde_json::Value`.
        deserializer.deserialize_any(SlotVisitor(PhantomData))
    }
}

struct SlotVisitor<T>(PhantomData<T>);

impl<'de, T: Shaped<'de>> Visitor<'de> for SlotVisitor<T> {
    type Value = Slot<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Slot<T>, E> {
        Ok(Slot::Wrong(JsonType::Boolean))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Slot<T>, E> {
        Ok(Slot::Wrong(JsonType::Number))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Slot<T>, E> {
        Ok(Slot::Wrong(JsonType::Number))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Slot<T>, E> {
        Ok(Slot::Wrong(JsonType::Number))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Slot<T>, E> {
        Ok(T::from_str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Slot<T>, E> {
        if T::WANTS_STR {
            Ok(T::from_str(Cow::Owned(v.to_owned())))
        } else {
            Ok(Slot::Wrong(JsonType::String))
        }
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Slot<T>, E> {
        Ok(T::from_str(Cow::Owned(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Slot<T>, E> {
        Ok(Slot::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Slot<T>, E> {
        Ok(Slot::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Slot<T>, A::Error> {
        T::from_seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Slot<T>, A::Error> {
        T::from_map(map)
    }
}

/// A member name, borrowed from the payload unless it contained escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Member names seen in one object, to catch duplicates.
#[derive(Default)]
struct Members<'de> {
    known: u32,
    // A set, not a list: a payload of thousands of distinct unknown members must stay linear.
    unknown: HashSet<Cow<'de, str>>,
    duplicate: Option<Cow<'static, str>>,
}

impl<'de> Members<'de> {
    /// True the first time known member `index` is seen.
    fn first_known(&mut self, index: usize, path: &'static str) -> bool {
        let bit = 1u32 << index;
        if self.known & bit != 0 {
            self.duplicate.get_or_insert(Cow::Borrowed(path));
            false
        } else {
            self.known |= bit;
            true
        }
    }

    fn unknown(&mut self, key: Cow<'de, str>, prefix: &str) {
        if self.duplicate.is_none() && self.unknown.contains(&key) {
            self.duplicate = Some(Cow::Owned(format!("{prefix}{}", truncate(&key))));
        } else {
            self.unknown.insert(key);
        }
    }
}

// Indices of the known top-level members. String-typed ones come first so they can live in one
// array and be validated by one table-driven path.
const EVENT_ID: usize = 0;
const TIMESTAMP: usize = 1;
const ENTITY_TYPE: usize = 2;
const ENTITY_ID: usize = 3;
const ACTION: usize = 4;
const USER_ID: usize = 5;
const TRACE_ID: usize = 6;
const SESSION_ID: usize = 7;
const REASON: usize = 8;
const SIGNATURE_ID: usize = 9;
const USER_DISPLAY_NAME: usize = 10;
const MODULE: usize = 11;
const RISK_LEVEL: usize = 12;
const CORRELATION_ID: usize = 13;
const SOURCE_SYSTEM: usize = 14;
const EVENT_VERSION: usize = 15;
const CATEGORY: usize = 16;
const STRING_FIELDS: usize = 17;
const OLD_VALUE: usize = 17;
const NEW_VALUE: usize = 18;
const METADATA: usize = 19;
const COMPLIANCE_FLAGS: usize = 20;

const FIELD_NAMES: [&str; 21] = [
    "event_id",
    "timestamp",
    "entity_type",
    "entity_id",
    "action",
    "user_id",
    "trace_id",
    "session_id",
    "reason",
    "signature_id",
    "user_display_name",
    "module",
    "risk_level",
    "correlation_id",
    "source_system",
    "event_version",
    "category",
    "old_value",
    "new_value",
    "metadata",
    "compliance_flags",
];

fn field_index(key: &str) -> Option<usize> {
    Some(match key {
        "event_id" => EVENT_ID,
        "timestamp" => TIMESTAMP,
        "entity_type" => ENTITY_TYPE,
        "entity_id" => ENTITY_ID,
        "action" => ACTION,
        "user_id" => USER_ID,
        "trace_id" => TRACE_ID,
        "session_id" => SESSION_ID,
        "reason" => REASON,
        "signature_id" => SIGNATURE_ID,
        "user_display_name" => USER_DISPLAY_NAME,
        "module" => MODULE,
        "risk_level" => RISK_LEVEL,
        "correlation_id" => CORRELATION_ID,
        "source_system" => SOURCE_SYSTEM,
        "event_version" => EVENT_VERSION,
        "category" => CATEGORY,
        "old_value" => OLD_VALUE,
        "new_value" => NEW_VALUE,
        "metadata" => METADATA,
        "compliance_flags" => COMPLIANCE_FLAGS,
        _ => return None,
    })
}

const META_FIELDS: usize = 5;
/// Full paths, so errors inside `metadata` name the nested field.
const META_PATHS: [&str; META_FIELDS] = [
    "metadata.source",
    "metadata.version",
    "metadata.ip_address",
    "metadata.user_agent",
    "metadata.api_version",
];
const META_LIMITS: [usize; META_FIELDS] = [
    MAX_SHORT_CHARS,
    MAX_SHORT_CHARS,
    MAX_SHORT_CHARS,
    MAX_TEXT_CHARS,
    MAX_SHORT_CHARS,
];

fn meta_index(key: &str) -> Option<usize> {
    Some(match key {
        "source" => 0,
        "version" => 1,
        "ip_address" => 2,
        "user_agent" => 3,
        "api_version" => 4,
        _ => return None,
    })
}

#[derive(Default)]
struct RawEvent<'de> {
    strings: [Slot<Cow<'de, str>>; STRING_FIELDS],
    // `null` parses to `None`, which is the contract's "null = absent".
    old_value: Option<Value>,
    new_value: Option<Value>,
    metadata: Slot<RawMetadata<'de>>,
    compliance_flags: Slot<RawFlags<'de>>,
    members: Members<'de>,
}

impl<'de> Shaped<'de> for RawEvent<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Slot<Self>, A::Error> {
        let mut ev = RawEvent::default();
        while let Some(Key(key)) = map.next_key()? {
            let Some(index) = field_index(&key) else {
                ev.members.unknown(key, "");
                map.next_value::<Slot<Skipped>>()?;
                continue;
            };
            if !ev.members.first_known(index, FIELD_NAMES[index]) {
                map.next_value::<Slot<Skipped>>()?;
                continue;
            }
            match index {
                OLD_VALUE => ev.old_value = map.next_value()?,
                NEW_VALUE => ev.new_value = map.next_value()?,
                METADATA => ev.metadata = map.next_value()?,
                COMPLIANCE_FLAGS => ev.compliance_flags = map.next_value()?,
                _ => ev.strings[index] = map.next_value()?,
            }
        }
        Ok(Slot::Present(ev))
    }
}

#[derive(Default)]
struct RawMetadata<'de> {
    strings: [Slot<Cow<'de, str>>; META_FIELDS],
    members: Members<'de>,
}

impl<'de> Shaped<'de> for RawMetadata<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Slot<Self>, A::Error> {
        let mut meta = RawMetadata::default();
        while let Some(Key(key)) = map.next_key()? {
            match meta_index(&key) {
                Some(i) if meta.members.first_known(i, META_PATHS[i]) => {
                    meta.strings[i] = map.next_value()?;
                }
                Some(_) => {
                    map.next_value::<Slot<Skipped>>()?;
                }
                None => {
                    meta.members.unknown(key, "metadata.");
                    map.next_value::<Slot<Skipped>>()?;
                }
            }
        }
        Ok(Slot::Present(meta))
    }
}

struct RawFlags<'de> {
    items: Vec<Slot<Cow<'de, str>>>,
    /// Items in the payload; only the first `MAX_COMPLIANCE_FLAGS + 1` are kept.
    total: usize,
}

impl<'de> Shaped<'de> for RawFlags<'de> {
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Slot<Self>, A::Error> {
        let mut items = Vec::new();
        let mut total = 0;
        loop {
            let more = if total <= MAX_COMPLIANCE_FLAGS {
                seq.next_element()?.map(|item| items.push(item)).is_some()
            } else {
                seq.next_element::<Slot<Skipped>>()?.is_some()
            };
            if !more {
                break;
            }
            total += 1;
        }
        Ok(Slot::Present(RawFlags { items, total }))
    }
}

// ---------------------------------------------------------------------------------------------
// Validation: from what was found to an `AuditEvent` or the first specific error.

fn top_level(top: Slot<RawEvent<'_>>) -> Result<AuditEvent, EventError> {
    match top {
        Slot::Present(raw) => raw.validate(),
        Slot::Wrong(found) => Err(EventError::NotObject { found }),
        Slot::Null | Slot::Absent => Err(EventError::NotObject {
            found: JsonType::Null,
        }),
    }
}

impl<'de> Deserialize<'de> for AuditEvent {
    /// Validates like [`decode`], minus the payload-level checks (size, UTF-8, depth), which
    /// belong to the bytes rather than the value. Needs a self-describing format (JSON).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        top_level(Slot::<RawEvent<'de>>::deserialize(deserializer)?).map_err(de::Error::custom)
    }
}

impl RawEvent<'_> {
    fn validate(self) -> Result<AuditEvent, EventError> {
        if let Some(field) = self.members.duplicate {
            return Err(EventError::DuplicateField { field });
        }
        let [
            event_id,
            timestamp,
            entity_type,
            entity_id,
            action,
            user_id,
            trace_id,
            session_id,
            reason,
            signature_id,
            user_display_name,
            module,
            risk_level,
            correlation_id,
            source_system,
            event_version,
            category,
        ] = self.strings;

        let event_id = {
            // Length is left to the UUID check, which gives the more useful message.
            let s = required(event_id, "event_id", usize::MAX)?;
            parse_uuid(&s).ok_or_else(|| EventError::InvalidUuid {
                field: "event_id",
                value: echo(&s),
            })?
        };
        let timestamp = parse_timestamp(&required(timestamp, "timestamp", usize::MAX)?)?;
        let entity_type = {
            let s = required(entity_type, "entity_type", usize::MAX)?;
            check_entity_type(&s)?;
            s.into_owned()
        };
        let entity_id = required(entity_id, "entity_id", MAX_SHORT_CHARS)?.into_owned();
        let action = required(action, "action", MAX_SHORT_CHARS)?.into_owned();
        let user_id = required(user_id, "user_id", MAX_SHORT_CHARS)?.into_owned();

        let trace_id = optional(trace_id, "trace_id", MAX_SHORT_CHARS)?;
        let session_id = optional(session_id, "session_id", MAX_SHORT_CHARS)?;
        let old_value = check_value(self.old_value, "old_value")?;
        let new_value = check_value(self.new_value, "new_value")?;
        let reason = optional(reason, "reason", MAX_TEXT_CHARS)?;
        let signature_id = optional(signature_id, "signature_id", MAX_SHORT_CHARS)?;
        let metadata = metadata(self.metadata)?;
        let user_display_name = optional(user_display_name, "user_display_name", MAX_SHORT_CHARS)?;
        let module = optional(module, "module", MAX_SHORT_CHARS)?;
        let risk_level = enumeration(
            risk_level,
            "risk_level",
            RiskLevel::parse,
            "HIGH, MEDIUM or LOW",
        )?;
        let compliance_flags = compliance_flags(self.compliance_flags)?;
        let correlation_id = optional(correlation_id, "correlation_id", MAX_SHORT_CHARS)?;
        let source_system = optional(source_system, "source_system", MAX_SHORT_CHARS)?;
        let event_version = optional(event_version, "event_version", MAX_SHORT_CHARS)?;
        let category = enumeration(
            category,
            "category",
            Category::parse,
            "USER_ACTION, SYSTEM_EVENT, COMPLIANCE_EVENT, SECURITY_EVENT or BATCH_LIFECYCLE",
        )?;

        Ok(AuditEvent {
            event_id,
            timestamp,
            entity_type,
            entity_id,
            action,
            user_id,
            trace_id,
            session_id,
            old_value,
            new_value,
            reason,
            signature_id,
            metadata,
            user_display_name,
            module,
            risk_level,
            compliance_flags,
            correlation_id,
            source_system,
            event_version,
            category,
        })
    }
}

const A_STRING: &str = "a string";

fn required<'de>(
    slot: Slot<Cow<'de, str>>,
    field: &'static str,
    limit: usize,
) -> Result<Cow<'de, str>, EventError> {
    match slot {
        Slot::Absent => Err(EventError::MissingField { field }),
        Slot::Null => Err(wrong_type(field, A_STRING, JsonType::Null)),
        Slot::Wrong(found) => Err(wrong_type(field, A_STRING, found)),
        Slot::Present(s) if s.is_empty() => Err(EventError::EmptyField {
            field: Cow::Borrowed(field),
        }),
        Slot::Present(s) => {
            check_text(&s, field, limit)?;
            Ok(s)
        }
    }
}

fn optional(
    slot: Slot<Cow<'_, str>>,
    field: &'static str,
    limit: usize,
) -> Result<Option<String>, EventError> {
    match slot {
        Slot::Absent | Slot::Null => Ok(None),
        Slot::Wrong(found) => Err(wrong_type(field, A_STRING, found)),
        Slot::Present(s) => {
            check_text(&s, field, limit)?;
            Ok(Some(s.into_owned()))
        }
    }
}

fn enumeration<T>(
    slot: Slot<Cow<'_, str>>,
    field: &'static str,
    parse: fn(&str) -> Option<T>,
    expected: &'static str,
) -> Result<Option<T>, EventError> {
    match slot {
        Slot::Absent | Slot::Null => Ok(None),
        Slot::Wrong(found) => Err(wrong_type(field, A_STRING, found)),
        Slot::Present(s) => parse(&s).map(Some).ok_or_else(|| EventError::InvalidEnum {
            field,
            value: echo(&s),
            expected,
        }),
    }
}

fn wrong_type(field: &'static str, expected: &'static str, found: JsonType) -> EventError {
    EventError::WrongType {
        field: Cow::Borrowed(field),
        expected,
        found,
    }
}

/// Length in code points (JSON Schema's `maxLength`) and no NUL.
fn check_text(s: &str, field: &'static str, limit: usize) -> Result<(), EventError> {
    check_text_at(s, || Cow::Borrowed(field), limit)
}

fn check_text_at(
    s: &str,
    field: impl Fn() -> Cow<'static, str>,
    limit: usize,
) -> Result<(), EventError> {
    // Bytes bound code points from above, so counting is needed only for long strings.
    if s.len() > limit {
        let chars = s.chars().count();
        if chars > limit {
            return Err(EventError::TooLong {
                field: field(),
                chars,
                limit,
            });
        }
    }
    if s.as_bytes().contains(&0) {
        return Err(EventError::NulCharacter { field: field() });
    }
    Ok(())
}

/// `old_value`/`new_value` may hold any JSON that PostgreSQL's `jsonb` accepts.
fn check_value(value: Option<Value>, field: &'static str) -> Result<Option<Value>, EventError> {
    fn has_nul(v: &Value) -> bool {
        match v {
            Value::String(s) => s.as_bytes().contains(&0),
            Value::Array(items) => items.iter().any(has_nul),
            Value::Object(members) => members
                .iter()
                .any(|(k, v)| k.as_bytes().contains(&0) || has_nul(v)),
            Value::Null | Value::Bool(_) | Value::Number(_) => false,
        }
    }
    match value {
        Some(v) if has_nul(&v) => Err(EventError::NulCharacter {
            field: Cow::Borrowed(field),
        }),
        other => Ok(other),
    }
}

fn metadata(slot: Slot<RawMetadata<'_>>) -> Result<Option<EventMetadata>, EventError> {
    let raw = match slot {
        Slot::Absent | Slot::Null => return Ok(None),
        Slot::Wrong(found) => return Err(wrong_type("metadata", "an object", found)),
        Slot::Present(raw) => raw,
    };
    if let Some(field) = raw.members.duplicate {
        return Err(EventError::DuplicateField { field });
    }
    let mut out: [Option<String>; META_FIELDS] = Default::default();
    for (i, slot) in raw.strings.into_iter().enumerate() {
        out[i] = optional(slot, META_PATHS[i], META_LIMITS[i])?;
    }
    let [source, version, ip_address, user_agent, api_version] = out;
    Ok(Some(EventMetadata {
        source,
        version,
        ip_address,
        user_agent,
        api_version,
    }))
}

fn compliance_flags(slot: Slot<RawFlags<'_>>) -> Result<Option<Vec<String>>, EventError> {
    const FIELD: &str = "compliance_flags";
    let raw = match slot {
        Slot::Absent | Slot::Null => return Ok(None),
        Slot::Wrong(found) => return Err(wrong_type(FIELD, "an array of strings", found)),
        Slot::Present(raw) => raw,
    };
    if raw.total > MAX_COMPLIANCE_FLAGS {
        return Err(EventError::TooManyItems {
            field: FIELD,
            items: raw.total,
            limit: MAX_COMPLIANCE_FLAGS,
        });
    }
    let mut flags = Vec::with_capacity(raw.items.len());
    for (i, item) in raw.items.into_iter().enumerate() {
        let path = || Cow::Owned(format!("{FIELD}[{i}]"));
        match item {
            Slot::Present(s) if s.is_empty() => {
                return Err(EventError::EmptyField { field: path() });
            }
            Slot::Present(s) => {
                check_text_at(&s, path, MAX_COMPLIANCE_FLAG_CHARS)?;
                flags.push(s.into_owned());
            }
            Slot::Null | Slot::Absent => {
                return Err(EventError::WrongType {
                    field: path(),
                    expected: A_STRING,
                    found: JsonType::Null,
                });
            }
            Slot::Wrong(found) => {
                return Err(EventError::WrongType {
                    field: path(),
                    expected: A_STRING,
                    found,
                });
            }
        }
    }
    Ok(Some(flags))
}

/// Only the canonical hyphenated form: `Uuid::try_parse` would also take the simple, braced
/// and URN forms, which the schema's pattern does not.
fn parse_uuid(s: &str) -> Option<Uuid> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let shape_ok = b.iter().enumerate().all(|(i, &c)| match i {
        8 | 13 | 18 | 23 => c == b'-',
        _ => c.is_ascii_hexdigit(),
    });
    if shape_ok {
        Uuid::try_parse(s).ok()
    } else {
        None
    }
}

fn check_entity_type(s: &str) -> Result<(), EventError> {
    const FIELD: &str = "entity_type";
    if let Some(pos) = s
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
    {
        // `pos` is a byte offset of a character boundary: everything before it is ASCII.
        let ch = s[pos..]
            .chars()
            .next()
            .unwrap_or(char::REPLACEMENT_CHARACTER);
        return Err(EventError::InvalidEntityType {
            field: FIELD,
            ch,
            position: pos,
        });
    }
    // All ASCII now, so bytes are characters.
    if s.len() > MAX_ENTITY_TYPE_CHARS {
        return Err(EventError::TooLong {
            field: Cow::Borrowed(FIELD),
            chars: s.len(),
            limit: MAX_ENTITY_TYPE_CHARS,
        });
    }
    Ok(())
}

/// RFC 3339 `date-time` with an explicit offset, exactly the grammar of the schema's pattern:
/// `YYYY-MM-DD` `T` `hh:mm:ss` [`.` 1–9 digits] (`Z` | `±hh:mm`), `T`/`Z` in either case, no
/// leap second (chrono cannot represent `:60` faithfully and producers smear them anyway).
/// chrono's own RFC 3339 parser is laxer (it takes a space for `T`), hence the hand parser.
fn parse_timestamp(s: &str) -> Result<DateTime<FixedOffset>, EventError> {
    const FIELD: &str = "timestamp";
    let invalid = |problem| EventError::InvalidTimestamp {
        field: FIELD,
        problem,
        value: echo(s),
    };
    const NOT_RFC3339: &str =
        "not an RFC 3339 date-time (expected YYYY-MM-DDThh:mm:ss[.fraction](Z|±hh:mm))";

    let b = s.as_bytes();
    let digits = |from: usize, to: usize| -> Option<u32> {
        b.get(from..to)?.iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let at = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));

    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        digits(0, 4),
        digits(5, 7),
        digits(8, 10),
        digits(11, 13),
        digits(14, 16),
        digits(17, 19),
    ) else {
        return Err(invalid(NOT_RFC3339));
    };
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt") && at(13, b":") && at(16, b":")) {
        return Err(invalid(NOT_RFC3339));
    }

    let mut i = 19;
    let mut nanos = 0;
    if at(i, b".") {
        let start = i + 1;
        let end = start + b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
        let count = end - start;
        if count == 0 || count > 9 {
            return Err(invalid(
                "fractional seconds must have 1 to 9 digits (RFC 3339, nanosecond precision)",
            ));
        }
        nanos = digits(start, end).unwrap_or(0) * 10u32.pow(9 - count as u32);
        i = end;
    }

    let offset_seconds = match &b[i..] {
        [] => {
            return Err(EventError::TimestampNoOffset {
                field: FIELD,
                value: echo(s),
            });
        }
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (Some(oh), Some(om)) = (digits(i + 1, i + 3), digits(i + 4, i + 6)) else {
                return Err(invalid(NOT_RFC3339));
            };
            if oh > 23 || om > 59 {
                return Err(invalid("UTC offset out of range"));
            }
            let magnitude = (oh * 3600 + om * 60) as i32;
            if *sign == b'-' { -magnitude } else { magnitude }
        }
        _ => return Err(invalid(NOT_RFC3339)),
    };

    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return Err(invalid("month or day out of range"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(invalid("time of day out of range (no leap seconds)"));
    }
    // Only the calendar check is left: the grammar already bounds every component.
    let date =
        NaiveDate::from_ymd_opt(year as i32, month, day).ok_or_else(|| invalid("no such date"))?;
    let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)
        .ok_or_else(|| invalid("time of day out of range"))?;
    let offset =
        FixedOffset::east_opt(offset_seconds).ok_or_else(|| invalid("UTC offset out of range"))?;
    offset
        .from_local_datetime(&date.and_time(time))
        .single()
        .ok_or_else(|| invalid("not representable"))
}

/// At most [`ECHO_CHARS`] characters of `s`.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(ECHO_CHARS) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

/// `s` quoted and escaped for a log line or header, truncated with `…` when long.
fn echo(s: &str) -> String {
    let head = truncate(s);
    if head.len() < s.len() {
        format!("{head:?}…")
    } else {
        format!("{head:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"event_id":"3F2504E0-4F89-11D3-9A0C-0305E82C3301","timestamp":"2024-05-01T10:00:00.5+02:00","entity_type":"Plant.Batch_1","entity_id":"P-1","action":"HARVEST","user_id":"u1"}"#;

    fn with(field: &str, json: &str) -> String {
        let mut v: serde_json::Map<String, Value> = serde_json::from_str(MINIMAL).unwrap();
        v.insert(field.to_owned(), serde_json::from_str(json).unwrap());
        serde_json::to_string(&v).unwrap()
    }

    fn err(payload: &str) -> EventError {
        decode(payload.as_bytes()).unwrap_err()
    }

    #[test]
    fn immudb_key_lowercases_entity_type_and_uuid() {
        let ev = decode(MINIMAL.as_bytes()).unwrap();
        assert_eq!(
            ev.immudb_key(),
            "audit:plant.batch_1:3f2504e0-4f89-11d3-9a0c-0305e82c3301"
        );
    }

    #[test]
    fn timestamp_keeps_offset_and_converts_to_utc() {
        let ev = decode(MINIMAL.as_bytes()).unwrap();
        assert_eq!(ev.timestamp.offset().local_minus_utc(), 7200);
        assert_eq!(
            ev.timestamp_utc().to_rfc3339(),
            "2024-05-01T08:00:00.500+00:00"
        );
    }

    #[test]
    fn payload_sha256_matches_known_digest() {
        assert_eq!(
            hex::encode(payload_sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex::encode(payload_sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn messages_are_specific() {
        assert_eq!(err("").to_string(), "payload is empty");
        assert_eq!(
            err(&with("event_id", r#""abc""#)).to_string(),
            "`event_id`: not a UUID: \"abc\""
        );
        let e = err(&with("timestamp", r#""2024-05-01T10:00:00""#));
        assert_eq!(e.kind(), "timestamp_no_offset");
        assert!(e.to_string().starts_with("`timestamp`: missing UTC offset"));
        assert_eq!(
            err(&with("risk_level", r#""CRITICAL""#)).to_string(),
            "`risk_level`: unknown value \"CRITICAL\" (expected HIGH, MEDIUM or LOW)"
        );
        let mut bytes = MINIMAL.as_bytes().to_vec();
        bytes[17] = 0xff;
        assert_eq!(
            decode(&bytes).unwrap_err().to_string(),
            "payload is not valid UTF-8 at byte 17"
        );
        let big = vec![b' '; 2_000_000];
        assert_eq!(
            decode(&big).unwrap_err().to_string(),
            "payload is 2000000 bytes, above the 1048576-byte limit"
        );
        let no_user: String = MINIMAL.replace(r#","user_id":"u1""#, "");
        assert_eq!(
            err(&no_user).to_string(),
            "`user_id`: missing required field"
        );
        assert_eq!(
            err(&with("user_id", "null")).to_string(),
            "`user_id`: expected a string, got null"
        );
        assert_eq!(
            err(&with("metadata", r#"{"source": 7}"#)).field(),
            Some("metadata.source")
        );
        assert_eq!(
            err(&with("compliance_flags", r#"["GACP", 1]"#)).to_string(),
            "`compliance_flags[1]`: expected a string, got number"
        );
        assert_eq!(
            err(&with("entity_type", r#""plant:x""#)).to_string(),
            "`entity_type`: character ':' at position 5 is not allowed (only A-Z a-z 0-9 _ . -)"
        );
    }

    #[test]
    fn echoed_values_are_truncated() {
        let long = format!("\"{}\"", "x".repeat(10_000));
        let msg = err(&with("event_id", &long)).to_string();
        assert!(msg.len() < 120, "{msg}");
        assert!(msg.ends_with('…'));
    }

    #[test]
    fn nesting_limit_is_serde_jsons() {
        let nested = |depth: usize| {
            // The event object is level 1, so `old_value` adds `depth - 1` levels.
            let inner = format!("{}{}", "[".repeat(depth - 1), "]".repeat(depth - 1));
            with("old_value", "0").replace("\"old_value\":0", &format!("\"old_value\":{inner}"))
        };
        assert!(decode(nested(MAX_NESTING_DEPTH).as_bytes()).is_ok());
        let e = err(&nested(MAX_NESTING_DEPTH + 1));
        assert_eq!(e.kind(), "too_deep", "{e}");
        // Unknown members are skipped through the same guard.
        let deep_unknown = MINIMAL.replace(
            "{\"event_id\"",
            &format!(
                "{{\"x\":{}{},\"event_id\"",
                "[".repeat(200),
                "]".repeat(200)
            ),
        );
        assert_eq!(err(&deep_unknown).kind(), "too_deep");
    }

    #[test]
    fn null_optionals_are_absent() {
        let ev = decode(with("risk_level", "null").as_bytes()).unwrap();
        assert_eq!(ev.risk_level, None);
        let ev = decode(with("old_value", "null").as_bytes()).unwrap();
        assert_eq!(ev.old_value, None);
    }

    #[test]
    fn timestamps_follow_rfc3339_strictly() {
        for ok in [
            "2024-02-29T00:00:00Z",
            "2000-02-29t23:59:59.123456789z",
            "2024-05-01T10:00:00-00:00",
            "2024-05-01T10:00:00+05:30",
        ] {
            assert!(parse_timestamp(ok).is_ok(), "{ok}");
        }
        for bad in [
            "2023-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2024-04-31T00:00:00Z",
            "2024-05-01 10:00:00Z",
            "2024-05-01T24:00:00Z",
            "2016-12-31T23:59:60Z",
            "2024-05-01T10:00:00.Z",
            "2024-05-01T10:00:00.1234567890Z",
            "2024-05-01T10:00:00+0200",
            "2024-05-01T10:00:00+24:00",
            "2024-05-01",
            "",
        ] {
            assert_eq!(
                parse_timestamp(bad).unwrap_err().kind(),
                "invalid_timestamp",
                "{bad}"
            );
        }
    }

    #[test]
    fn duplicates_are_rejected() {
        let dup = MINIMAL.replace(r#""user_id":"u1""#, r#""user_id":"u1","user_id":"u2""#);
        assert_eq!(err(&dup).field(), Some("user_id"));
        let dup = MINIMAL.replace("{", r#"{"x":1,"x":2,"#);
        assert_eq!(err(&dup).field(), Some("x"));
    }

    #[test]
    fn serialize_then_deserialize_round_trips() {
        let ev = decode(with("metadata", r#"{"source":"mes","extra":[1,2]}"#).as_bytes()).unwrap();
        let json = serde_json::to_string(&ev).unwrap();
        let back: AuditEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(ev, back);
        assert!(serde_json::from_str::<AuditEvent>(r#"{"event_id":"x"}"#).is_err());
    }
}
