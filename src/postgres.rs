//! PostgreSQL, the queryable replica: pool, migrations, and the batch insert.
//!
//! A batch is one multi-row `INSERT … SELECT FROM UNNEST(…) ON CONFLICT (event_id) DO NOTHING
//! RETURNING event_id`: one round trip and one implicit transaction however large the batch.
//! `DO NOTHING` alone would hide a conflicting redelivery, so the rows it skipped are looked up
//! and their stored digest compared: the same digest is a harmless duplicate, a different one a
//! conflict that the caller dead-letters.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

use crate::config::PostgresSettings;
use crate::event::AuditEvent;

/// The embedded migrations (`migrations/`).
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// SQLSTATE classes and codes worth retrying: the server or the connection is in trouble, not the
/// data. Everything else (22 data exception, 23 integrity violation, 42 syntax/privilege, …) is
/// permanent: retrying the same rows gives the same answer.
const TRANSIENT_SQLSTATES: &[&str] = &[
    "08",    // connection exception: the server went away or refused us
    "40",    // transaction rollback: serialization failure or deadlock, safe to rerun
    "53",    // insufficient resources: disk full, out of memory, too many connections
    "57P01", // admin shutdown: the server is restarting
    "57P02", // crash shutdown
    "57P03", // cannot connect now: the server is starting up
    "57014", // query canceled, e.g. by statement_timeout under load
    "58",    // system error: I/O error on the server
];

/// A PostgreSQL failure, classified at the adapter.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Worth retrying with backoff: the connection or the server is in trouble.
    #[error("PostgreSQL unavailable: {0}")]
    Transient(#[source] sqlx::Error),
    /// Retrying the same statement gives the same answer (bad data, constraint, privilege).
    #[error("PostgreSQL rejected the statement: {0}")]
    Permanent(#[source] sqlx::Error),
}

impl PgError {
    /// Whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, PgError::Transient(_))
    }

    /// The row data itself is at fault (SQLSTATE class 22 data exception or 23 integrity
    /// constraint violation): isolating the offending rows makes sense. Any other permanent
    /// error (privileges, a missing table, a read-only server) is about the store, not the rows.
    pub fn is_data_error(&self) -> bool {
        self.sqlstate()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
    }

    /// The SQLSTATE, when the server sent one.
    pub fn sqlstate(&self) -> Option<String> {
        let (PgError::Transient(e) | PgError::Permanent(e)) = self;
        match e {
            sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }
}

impl From<sqlx::Error> for PgError {
    fn from(error: sqlx::Error) -> Self {
        let transient = match &error {
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                TRANSIENT_SQLSTATES
                    .iter()
                    .any(|prefix| code.starts_with(prefix))
            }),
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => true,
            _ => false,
        };
        if transient {
            PgError::Transient(error)
        } else {
            PgError::Permanent(error)
        }
    }
}

/// Opens a pool whose connections work inside the configured schema.
pub async fn connect(settings: &PostgresSettings) -> Result<PgPool, PgError> {
    let options = settings
        .connect_options()
        .options([("search_path", settings.schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Creates the schema if needed and applies the pending migrations (needs a role allowed to
/// create tables, roles and triggers, not the daemon's `audit_writer`). sqlx serialises
/// concurrent runs with an advisory lock, so replicas starting together are safe.
pub async fn migrate(settings: &PostgresSettings) -> Result<(), sqlx::migrate::MigrateError> {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(settings.connect_options())
        .await?;
    sqlx::query(&format!(
        "CREATE SCHEMA IF NOT EXISTS \"{}\"",
        settings.schema
    ))
    .execute(&admin)
    .await?;
    admin.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            settings
                .connect_options()
                .options([("search_path", settings.schema.as_str())]),
        )
        .await?;
    MIGRATOR.run(&pool).await?;
    pool.close().await;
    Ok(())
}

/// One event as it is replicated: the decoded event and where it came from and went to.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaRow<'a> {
    pub event: &'a AuditEvent,
    pub immudb_key: &'a str,
    pub immudb_tx: u64,
    pub immudb_verified: bool,
    pub payload_sha256: &'a [u8; 32],
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// What the batch insert did with each row.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InsertOutcome {
    /// Rows written now.
    pub inserted: usize,
    /// Rows already present with the same digest: redeliveries, nothing to do.
    pub duplicates: usize,
    /// Rows already present with a different digest, by index in the input: conflicts.
    pub conflicts: Vec<usize>,
}

/// Inserts the rows in one statement; see the module comment for conflict detection.
pub async fn insert_batch(
    pool: &PgPool,
    rows: &[ReplicaRow<'_>],
) -> Result<InsertOutcome, PgError> {
    if rows.is_empty() {
        return Ok(InsertOutcome::default());
    }
    let columns = Columns::from_rows(rows);
    let inserted: Vec<Uuid> = sqlx::query_scalar(INSERT_SQL)
        .bind(&columns.event_id)
        .bind(&columns.event_timestamp)
        .bind(&columns.entity_type)
        .bind(&columns.entity_id)
        .bind(&columns.action)
        .bind(&columns.user_id)
        .bind(&columns.user_display_name)
        .bind(&columns.trace_id)
        .bind(&columns.session_id)
        .bind(&columns.correlation_id)
        .bind(&columns.old_value)
        .bind(&columns.new_value)
        .bind(&columns.reason)
        .bind(&columns.signature_id)
        .bind(&columns.metadata)
        .bind(&columns.module)
        .bind(&columns.risk_level)
        .bind(&columns.compliance_flags)
        .bind(&columns.source_system)
        .bind(&columns.event_version)
        .bind(&columns.category)
        .bind(&columns.immudb_key)
        .bind(&columns.immudb_tx)
        .bind(&columns.immudb_verified)
        .bind(&columns.payload_sha256)
        .bind(&columns.source_topic)
        .bind(&columns.source_partition)
        .bind(&columns.source_offset)
        .fetch_all(pool)
        .await?;

    let mut outcome = InsertOutcome {
        inserted: inserted.len(),
        ..InsertOutcome::default()
    };
    if inserted.len() == rows.len() {
        return Ok(outcome);
    }
    let inserted: std::collections::HashSet<Uuid> = inserted.into_iter().collect();
    let skipped: Vec<usize> = (0..rows.len())
        .filter(|&i| !inserted.contains(&rows[i].event.event_id))
        .collect();
    let skipped_ids: Vec<Uuid> = skipped.iter().map(|&i| rows[i].event.event_id).collect();
    // A fresh statement sees rows committed concurrently by another replica, which the INSERT's
    // snapshot could not.
    let stored: HashMap<Uuid, Vec<u8>> = sqlx::query_as::<_, (Uuid, Vec<u8>)>(
        "SELECT event_id, payload_sha256 FROM audit_trail WHERE event_id = ANY($1)",
    )
    .bind(&skipped_ids)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    for i in skipped {
        let row = &rows[i];
        match stored.get(&row.event.event_id) {
            Some(digest) if digest.as_slice() == row.payload_sha256.as_slice() => {
                outcome.duplicates += 1
            }
            _ => outcome.conflicts.push(i),
        }
    }
    Ok(outcome)
}

/// Column-major copy of a batch, the shape `UNNEST` wants.
#[derive(Default)]
struct Columns<'a> {
    event_id: Vec<Uuid>,
    event_timestamp: Vec<chrono::DateTime<chrono::Utc>>,
    entity_type: Vec<&'a str>,
    entity_id: Vec<&'a str>,
    action: Vec<&'a str>,
    user_id: Vec<&'a str>,
    user_display_name: Vec<Option<&'a str>>,
    trace_id: Vec<Option<&'a str>>,
    session_id: Vec<Option<&'a str>>,
    correlation_id: Vec<Option<&'a str>>,
    old_value: Vec<Option<&'a serde_json::Value>>,
    new_value: Vec<Option<&'a serde_json::Value>>,
    reason: Vec<Option<&'a str>>,
    signature_id: Vec<Option<&'a str>>,
    metadata: Vec<Option<serde_json::Value>>,
    module: Vec<Option<&'a str>>,
    risk_level: Vec<Option<&'static str>>,
    // Postgres arrays must be rectangular, so text[] per row travels as a JSON array.
    compliance_flags: Vec<Option<serde_json::Value>>,
    source_system: Vec<Option<&'a str>>,
    event_version: Vec<Option<&'a str>>,
    category: Vec<Option<&'static str>>,
    immudb_key: Vec<&'a str>,
    immudb_tx: Vec<i64>,
    immudb_verified: Vec<bool>,
    payload_sha256: Vec<&'a [u8]>,
    source_topic: Vec<&'a str>,
    source_partition: Vec<i32>,
    source_offset: Vec<i64>,
}

impl<'a> Columns<'a> {
    fn from_rows(rows: &'a [ReplicaRow<'a>]) -> Self {
        let mut c = Columns::default();
        for row in rows {
            let e = row.event;
            c.event_id.push(e.event_id);
            c.event_timestamp.push(e.timestamp_utc());
            c.entity_type.push(&e.entity_type);
            c.entity_id.push(&e.entity_id);
            c.action.push(&e.action);
            c.user_id.push(&e.user_id);
            c.user_display_name.push(e.user_display_name.as_deref());
            c.trace_id.push(e.trace_id.as_deref());
            c.session_id.push(e.session_id.as_deref());
            c.correlation_id.push(e.correlation_id.as_deref());
            c.old_value.push(e.old_value.as_ref());
            c.new_value.push(e.new_value.as_ref());
            c.reason.push(e.reason.as_deref());
            c.signature_id.push(e.signature_id.as_deref());
            c.metadata.push(
                e.metadata
                    .as_ref()
                    .and_then(|m| serde_json::to_value(m).ok()),
            );
            c.module.push(e.module.as_deref());
            c.risk_level.push(e.risk_level.map(|r| r.as_str()));
            c.compliance_flags.push(
                e.compliance_flags
                    .as_ref()
                    .map(|flags| serde_json::Value::from(flags.clone())),
            );
            c.source_system.push(e.source_system.as_deref());
            c.event_version.push(e.event_version.as_deref());
            c.category.push(e.category.map(|cat| cat.as_str()));
            c.immudb_key.push(row.immudb_key);
            // immudb transaction ids start at 1 and stay far below i64::MAX.
            c.immudb_tx
                .push(i64::try_from(row.immudb_tx).unwrap_or(i64::MAX));
            c.immudb_verified.push(row.immudb_verified);
            c.payload_sha256.push(row.payload_sha256);
            c.source_topic.push(row.topic);
            c.source_partition.push(row.partition);
            c.source_offset.push(row.offset);
        }
        c
    }
}

const INSERT_SQL: &str = r#"
INSERT INTO audit_trail (
    event_id, event_timestamp, entity_type, entity_id, action, user_id, user_display_name,
    trace_id, session_id, correlation_id, old_value, new_value, reason, signature_id, metadata,
    module, risk_level, compliance_flags, source_system, event_version, category,
    immudb_key, immudb_tx, immudb_verified, payload_sha256, source_topic, source_partition,
    source_offset)
SELECT
    event_id, event_timestamp, entity_type, entity_id, action, user_id, user_display_name,
    trace_id, session_id, correlation_id, old_value, new_value, reason, signature_id, metadata,
    module, risk_level,
    CASE WHEN compliance_flags IS NULL THEN NULL
         ELSE ARRAY(SELECT jsonb_array_elements_text(compliance_flags)) END,
    source_system, event_version, category,
    immudb_key, immudb_tx, immudb_verified, payload_sha256, source_topic, source_partition,
    source_offset
FROM UNNEST(
    $1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::text[], $9::text[], $10::text[], $11::jsonb[], $12::jsonb[], $13::text[], $14::text[],
    $15::jsonb[], $16::text[], $17::text[], $18::jsonb[], $19::text[], $20::text[], $21::text[],
    $22::text[], $23::bigint[], $24::boolean[], $25::bytea[], $26::text[], $27::integer[],
    $28::bigint[]
) AS input (
    event_id, event_timestamp, entity_type, entity_id, action, user_id, user_display_name,
    trace_id, session_id, correlation_id, old_value, new_value, reason, signature_id, metadata,
    module, risk_level, compliance_flags, source_system, event_version, category,
    immudb_key, immudb_tx, immudb_verified, payload_sha256, source_topic, source_partition,
    source_offset)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"#;
