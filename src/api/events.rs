//! `GET /api/v1/events` (search, keyset pages), `GET /api/v1/events/{event_id}` (one event with
//! its stored bytes, optionally proven now) and `GET /api/v1/entities/{type}/{id}/history` (an
//! entity's timeline with what each event changed).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use super::access::Access;
use super::auth::{ReadRole, Reader};
use super::cursor::{Cursor, Direction};
use super::error::{ApiError, Problem};
use super::params::{
    EventParams, FILTER_NAMES, Filters, HistoryParams, Order, Params, SearchParams,
};
use super::{ApiState, Caller};
use crate::metrics::metrics;
use crate::tools::compare::{ROW_COLUMNS, StoredRow};
use crate::tools::verify::{VerifyReport, prove_row};

const EVENTS_ROUTE: &str = "/api/v1/events";
const EVENT_ROUTE: &str = "/api/v1/events/{event_id}";
const HISTORY_ROUTE: &str = "/api/v1/entities/{entity_type}/{entity_id}/history";

/// One `audit_trail` row with its ingestion time.
#[derive(Debug, sqlx::FromRow)]
struct EventRow {
    #[sqlx(flatten)]
    stored: StoredRow,
    ingested_at: DateTime<Utc>,
}

/// Where an event came from in Kafka.
#[derive(Debug, Serialize, ToSchema)]
pub struct SourceView {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One audit event as stored in the queryable replica, with what is needed to prove it
/// against immudb (`immudb_key`, `immudb_tx`, `payload_sha256`).
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub event_id: Uuid,
    /// Event time, UTC, RFC 3339.
    pub event_timestamp: String,
    pub entity_type: String,
    pub entity_id: String,
    pub action: String,
    pub user_id: String,
    pub user_display_name: Option<String>,
    pub trace_id: Option<String>,
    pub session_id: Option<String>,
    pub correlation_id: Option<String>,
    pub old_value: Option<Value>,
    pub new_value: Option<Value>,
    pub reason: Option<String>,
    pub signature_id: Option<String>,
    pub metadata: Option<Value>,
    pub module: Option<String>,
    pub risk_level: Option<String>,
    pub compliance_flags: Option<Vec<String>>,
    pub source_system: Option<String>,
    pub event_version: Option<String>,
    pub category: Option<String>,
    /// The immudb key holding the original payload.
    pub immudb_key: String,
    /// The immudb transaction that wrote it.
    pub immudb_tx: i64,
    /// Whether the writer proved it when storing.
    pub immudb_verified: bool,
    /// SHA-256 of the original payload bytes, hex.
    pub payload_sha256: String,
    pub source: SourceView,
    /// When the row was stored, UTC, RFC 3339.
    pub ingested_at: String,
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl From<EventRow> for EventView {
    fn from(row: EventRow) -> Self {
        let s = row.stored;
        EventView {
            event_id: s.event_id,
            event_timestamp: time(s.event_timestamp),
            entity_type: s.entity_type,
            entity_id: s.entity_id,
            action: s.action,
            user_id: s.user_id,
            user_display_name: s.user_display_name,
            trace_id: s.trace_id,
            session_id: s.session_id,
            correlation_id: s.correlation_id,
            old_value: s.old_value,
            new_value: s.new_value,
            reason: s.reason,
            signature_id: s.signature_id,
            metadata: s.metadata,
            module: s.module,
            risk_level: s.risk_level,
            compliance_flags: s.compliance_flags,
            source_system: s.source_system,
            event_version: s.event_version,
            category: s.category,
            immudb_key: s.immudb_key,
            immudb_tx: s.immudb_tx,
            immudb_verified: s.immudb_verified,
            payload_sha256: hex::encode(&s.payload_sha256),
            source: SourceView {
                topic: s.source_topic,
                partition: s.source_partition,
                offset: s.source_offset,
            },
            ingested_at: time(row.ingested_at),
        }
    }
}

/// A page of search results.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// The next page of the same query, if there are more rows.
    pub next_cursor: Option<String>,
    /// The previous page of the same query, when this page was reached by a cursor.
    pub prev_cursor: Option<String>,
    pub limit: u32,
}

/// What `?verify=true` proved, in fields and in words.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerificationView {
    /// `verified`, `mismatch`, `proof_failed` or `missing`.
    pub verdict: String,
    /// One paragraph saying what was proven (or what failed).
    pub statement: String,
    /// immudb's inclusion and dual proofs verified.
    pub proof_verified: bool,
    /// The trusted state the proof was checked against.
    pub trusted_tx: u64,
    /// Its accumulated hash (Alh), hex.
    pub trusted_tx_hash: String,
    /// Whether the server's signature over the proven state was checked.
    pub signed: bool,
    /// SHA-256 of the stored bytes equals the row's `payload_sha256`.
    pub digest_match: Option<bool>,
    /// Columns compared with the decoded stored value.
    pub fields_compared: usize,
    /// Columns that differ.
    pub fields_differing: Vec<String>,
    /// Every problem found.
    pub findings: Vec<String>,
}

/// One event with its stored bytes.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventDetail {
    pub event: EventView,
    /// The original payload exactly as stored in immudb (role `investigator`); its UTF-8 bytes
    /// hash to `payload_sha256`.
    pub payload: Option<String>,
    /// Why `payload` is absent.
    pub payload_withheld: Option<String>,
    /// Present with `?verify=true`.
    pub verification: Option<VerificationView>,
}

/// One change inside an event: a JSON path whose value differs between `old_value` and
/// `new_value`.
#[derive(Debug, Serialize, ToSchema, PartialEq)]
pub struct Change {
    /// Dotted path into the value (`""` for the whole value).
    pub path: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// One step of an entity's timeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryEntry {
    pub event: EventView,
    /// What this event changed (`old_value` → `new_value`).
    pub changes: Vec<Change>,
    /// Whether this event's `old_value` is the previous event's `new_value` (a gap or a
    /// divergence in the recorded history when false; absent for the first entry of a page).
    pub follows_previous: Option<bool>,
}

/// A page of an entity's timeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct History {
    pub entity_type: String,
    pub entity_id: String,
    pub entries: Vec<HistoryEntry>,
    pub next_cursor: Option<String>,
    pub prev_cursor: Option<String>,
}

/// Cancels the backend of a query whose request went away (a client that disconnects must not
/// leave its query running).
struct CancelOnDrop {
    pool: PgPool,
    pid: Option<i32>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let pool = self.pool.clone();
            tokio::spawn(async move {
                match sqlx::query("SELECT pg_cancel_backend($1)")
                    .bind(pid)
                    .execute(&pool)
                    .await
                {
                    Ok(_) => tracing::info!(pid, "query of a request that went away cancelled"),
                    Err(error) => tracing::warn!(pid, %error, "cannot cancel an abandoned query"),
                }
            });
        }
    }
}

/// Runs a page query; dropping the future (the client went away) cancels it in PostgreSQL.
async fn fetch_rows(
    pool: &PgPool,
    mut query: sqlx::QueryBuilder<'_, sqlx::Postgres>,
) -> Result<Vec<EventRow>, ApiError> {
    let mut conn = pool.acquire().await.map_err(ApiError::postgres)?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .map_err(ApiError::postgres)?;
    let mut guard = CancelOnDrop {
        pool: pool.clone(),
        pid: Some(pid),
    };
    let rows = query
        .build_query_as::<EventRow>()
        .fetch_all(&mut *conn)
        .await
        .map_err(ApiError::postgres);
    guard.pid = None;
    rows
}

/// A keyset page: rows of `filters` in `order`, `limit` of them, from `cursor`.
async fn page(
    pool: &PgPool,
    filters: &Filters,
    order: Order,
    limit: u32,
    cursor: Option<&Cursor>,
) -> Result<(Vec<EventRow>, bool), ApiError> {
    let backwards = cursor.is_some_and(|c| c.direction == Direction::Before);
    // Walk the index in the query's order, or against it for a previous page.
    let ascending = (order == Order::Asc) != backwards;
    let mut query = sqlx::QueryBuilder::new(format!(
        "SELECT {ROW_COLUMNS}, ingested_at FROM audit_trail WHERE TRUE"
    ));
    filters.push_conditions(&mut query);
    if let Some(cursor) = cursor {
        query.push(if ascending {
            " AND (event_timestamp, event_id) > ("
        } else {
            " AND (event_timestamp, event_id) < ("
        });
        query.push_bind(cursor.timestamp);
        query.push(", ");
        query.push_bind(cursor.event_id);
        query.push(")");
    }
    query.push(if ascending {
        " ORDER BY event_timestamp ASC, event_id ASC LIMIT "
    } else {
        " ORDER BY event_timestamp DESC, event_id DESC LIMIT "
    });
    query.push_bind(i64::from(limit) + 1);
    let mut rows = fetch_rows(pool, query).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    if backwards {
        rows.reverse();
    }
    Ok((rows, more))
}

/// The cursors around a page.
fn cursors(
    state: &ApiState,
    rows: &[EventRow],
    more: bool,
    cursor: Option<&Cursor>,
    query: &[u8; 32],
) -> (Option<String>, Option<String>) {
    let edge = |row: &EventRow, direction| {
        state.cursors.encode(
            &Cursor {
                direction,
                timestamp: row.stored.event_timestamp,
                event_id: row.stored.event_id,
            },
            query,
        )
    };
    let backwards = cursor.is_some_and(|c| c.direction == Direction::Before);
    // Going forward, "more" means a next page; going backwards, a previous one. The page we
    // came from always lies on the other side.
    let (has_next, has_prev) = match cursor {
        None => (more, false),
        Some(_) if backwards => (true, more),
        Some(_) => (more, true),
    };
    let next = has_next
        .then(|| rows.last().map(|r| edge(r, Direction::After)))
        .flatten();
    let prev = has_prev
        .then(|| rows.first().map(|r| edge(r, Direction::Before)))
        .flatten();
    (next, prev)
}

/// Search the audit trail.
///
/// Filters combine with AND; results are ordered by event time (then `event_id`) and paged by
/// an opaque cursor (keyset pagination: a deep page costs what the first does).
#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "events",
    params(SearchParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 400, description = "A parameter is invalid (named in `parameter`)", body = Problem),
        (status = 401, description = "No valid bearer token", body = Problem),
        (status = 403, description = "The token lacks the auditor or investigator role", body = Problem),
        (status = 503, description = "A store, the identity provider or the access log is unavailable", body = Problem),
    )
)]
pub async fn list_events(
    State(state): State<Arc<ApiState>>,
    reader: Reader,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<EventPage>, ApiError> {
    let mut allowed = FILTER_NAMES.to_vec();
    allowed.extend(["order", "limit", "cursor"]);
    let params = Params::parse(raw.as_deref(), &allowed)?;
    let filters = Filters::parse(&params)?;
    let order = params.order(Order::Desc)?;
    let limit = params.limit()?;
    let fingerprint = filters.fingerprint(EVENTS_ROUTE, order);
    let cursor = params.cursor(&state.cursors, &fingerprint)?;
    let (rows, more) = page(&state.pg, &filters, order, limit, cursor.as_ref()).await?;
    let (next_cursor, prev_cursor) = cursors(&state, &rows, more, cursor.as_ref(), &fingerprint);
    state
        .access
        .record(&Access {
            principal: &reader.principal,
            role: reader.role,
            route: EVENTS_ROUTE,
            target: "events".into(),
            parameters: json!({ "filters": filters, "order": order, "limit": limit, "paged": cursor.is_some() }),
            rows: rows.len(),
            request_id: caller.request_id,
            client: caller.client.clone(),
            user_agent: caller.user_agent.clone(),
        })
        .await?;
    served(EVENTS_ROUTE, rows.len());
    Ok(Json(EventPage {
        events: rows.into_iter().map(EventView::from).collect(),
        next_cursor,
        prev_cursor,
        limit,
    }))
}

fn served(route: &str, rows: usize) {
    metrics()
        .api_rows_served
        .with_label_values(&[route])
        .inc_by(rows as u64);
}

/// One event: its row, the original payload as stored in immudb, and with `?verify=true` a
/// proof checked now against the trusted state.
#[utoipa::path(
    get,
    path = "/api/v1/events/{event_id}",
    tag = "events",
    params(("event_id" = Uuid, Path, description = "The event's id"), EventParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The event", body = EventDetail),
        (status = 400, description = "A parameter is invalid", body = Problem),
        (status = 401, description = "No valid bearer token", body = Problem),
        (status = 403, description = "The token lacks the auditor or investigator role", body = Problem),
        (status = 404, description = "No such event", body = Problem),
        (status = 503, description = "A store, the identity provider or the access log is unavailable", body = Problem),
    )
)]
pub async fn get_event(
    State(state): State<Arc<ApiState>>,
    reader: Reader,
    caller: Caller,
    Path(event_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<EventDetail>, ApiError> {
    let event_id = Uuid::parse_str(&event_id)
        .map_err(|_| ApiError::bad("event_id", format!("\"{event_id}\" is not a UUID")))?;
    let params = Params::parse(raw.as_deref(), &["verify"])?;
    let verify = match params.text("verify") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad(
                "verify",
                format!("\"{other}\" is not true or false"),
            ));
        }
    };
    let mut query = sqlx::QueryBuilder::new(format!(
        "SELECT {ROW_COLUMNS}, ingested_at FROM audit_trail WHERE event_id = "
    ));
    query.push_bind(event_id);
    let row = fetch_rows(&state.pg, query)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound(format!("no event {event_id}")))?;

    let (payload, payload_withheld) = match reader.role {
        ReadRole::Investigator => {
            let tx = u64::try_from(row.stored.immudb_tx).ok();
            let entry = state
                .immudb
                .get_at(row.stored.immudb_key.as_bytes(), tx)
                .await
                .map_err(|e| ApiError::Unavailable {
                    what: "immudb",
                    cause: e.to_string(),
                })?;
            match entry {
                Some(entry) => (
                    Some(String::from_utf8_lossy(&entry.value).into_owned()),
                    None,
                ),
                None => (
                    None,
                    Some(format!(
                        "immudb has no entry {} at tx {}",
                        row.stored.immudb_key, row.stored.immudb_tx
                    )),
                ),
            }
        }
        ReadRole::Auditor => (
            None,
            Some("the original payload is shown to the investigator role only".into()),
        ),
    };
    let verification = if verify {
        Some(verify_row(&state, &row.stored).await?)
    } else {
        None
    };
    state
        .access
        .record(&Access {
            principal: &reader.principal,
            role: reader.role,
            route: EVENT_ROUTE,
            target: event_id.to_string(),
            parameters: json!({ "verify": verify, "payload": payload.is_some() }),
            rows: 1,
            request_id: caller.request_id,
            client: caller.client.clone(),
            user_agent: caller.user_agent.clone(),
        })
        .await?;
    served(EVENT_ROUTE, 1);
    Ok(Json(EventDetail {
        event: EventView::from(row),
        payload,
        payload_withheld,
        verification,
    }))
}

/// Proves a row now against the trusted state (what `audit-consumer verify` does).
async fn verify_row(state: &ApiState, row: &StoredRow) -> Result<VerificationView, ApiError> {
    let trusted = state.trust.current();
    let mut report = VerifyReport {
        event_id: row.event_id,
        verdict: "verified",
        immudb_database: state.immudb.database(),
        postgres_schema: String::new(),
        immudb_key: Some(row.immudb_key.clone()),
        immudb_tx: Some(row.immudb_tx),
        trust: None,
        proof_verified: false,
        proof_error: None,
        digest: None,
        latest_revision: None,
        fields: Vec::new(),
        differing_fields: Vec::new(),
        findings: Vec::new(),
    };
    let proven = prove_row(&state.immudb, row, &trusted, &mut report)
        .await
        .map_err(|e| ApiError::Unavailable {
            what: "immudb",
            cause: e.to_string(),
        })?;
    if let Some(proven) = proven {
        // The read side only keeps the newer state in memory; it never writes the shared row.
        if let Err(error) = state.trust.accept(&trusted, proven).await {
            report.findings.push(format!(
                "the proven state is not consistent with the trusted one: {error}"
            ));
        }
    }
    let verdict = if report.findings.is_empty() {
        "verified"
    } else if !report.proof_verified {
        "proof_failed"
    } else {
        "mismatch"
    };
    let signed = trusted.signature.is_some() && state.immudb_signed;
    let statement = if verdict == "verified" {
        format!(
            "The entry {key} is included in immudb transaction {tx}, and transaction {tx} is \
             consistent with the trusted state at transaction {trusted_tx} (dual proof); the \
             SHA-256 of the stored bytes equals payload_sha256, and all {n} columns equal the \
             stored event. {signature}",
            key = row.immudb_key,
            tx = row.immudb_tx,
            trusted_tx = trusted.tx_id,
            n = report.fields.len(),
            signature = if signed {
                "The server's signature over the state was checked."
            } else {
                "The state is not signed by the server (no state-signing key configured)."
            }
        )
    } else {
        format!("NOT VERIFIED: {}", report.findings.join("; "))
    };
    Ok(VerificationView {
        verdict: verdict.into(),
        statement,
        proof_verified: report.proof_verified,
        trusted_tx: trusted.tx_id,
        trusted_tx_hash: hex::encode(trusted.tx_hash),
        signed,
        digest_match: report.digest.as_ref().map(|d| d.matches),
        fields_compared: report.fields.len(),
        fields_differing: report
            .differing_fields
            .iter()
            .map(|f| (*f).to_owned())
            .collect(),
        findings: report.findings,
    })
}

/// The differences between two JSON values, as dotted paths.
pub fn changes(old: Option<&Value>, new: Option<&Value>) -> Vec<Change> {
    fn walk(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<Change>) {
        match (old, new) {
            (Some(Value::Object(a)), Some(Value::Object(b))) => {
                let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                keys.sort();
                keys.dedup();
                for key in keys {
                    let child = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    walk(&child, a.get(key), b.get(key), out);
                }
            }
            (a, b) if a == b => {}
            (a, b) => out.push(Change {
                path: path.to_owned(),
                old: a.cloned(),
                new: b.cloned(),
            }),
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

/// An entity's timeline, oldest first by default, with what each event changed.
#[utoipa::path(
    get,
    path = "/api/v1/entities/{entity_type}/{entity_id}/history",
    tag = "events",
    params(
        ("entity_type" = String, Path, description = "Entity type, e.g. `plant`"),
        ("entity_id" = String, Path, description = "Entity id"),
        HistoryParams
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of the entity's history", body = History),
        (status = 400, description = "A parameter is invalid", body = Problem),
        (status = 401, description = "No valid bearer token", body = Problem),
        (status = 403, description = "The token lacks the auditor or investigator role", body = Problem),
        (status = 503, description = "A store, the identity provider or the access log is unavailable", body = Problem),
    )
)]
pub async fn entity_history(
    State(state): State<Arc<ApiState>>,
    reader: Reader,
    caller: Caller,
    Path((entity_type, entity_id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Json<History>, ApiError> {
    let params = Params::parse(raw.as_deref(), &["order", "limit", "cursor"])?;
    let order = params.order(Order::Asc)?;
    let limit = params.limit()?;
    let filters = Filters {
        entity_type: Some(entity_type.clone()),
        entity_id: Some(entity_id.clone()),
        ..Filters::default()
    };
    let fingerprint = filters.fingerprint(HISTORY_ROUTE, order);
    let cursor = params.cursor(&state.cursors, &fingerprint)?;
    let (rows, more) = page(&state.pg, &filters, order, limit, cursor.as_ref()).await?;
    let (next_cursor, prev_cursor) = cursors(&state, &rows, more, cursor.as_ref(), &fingerprint);
    state
        .access
        .record(&Access {
            principal: &reader.principal,
            role: reader.role,
            route: HISTORY_ROUTE,
            target: format!("entity:{entity_type}:{entity_id}"),
            parameters: json!({ "order": order, "limit": limit, "paged": cursor.is_some() }),
            rows: rows.len(),
            request_id: caller.request_id,
            client: caller.client.clone(),
            user_agent: caller.user_agent.clone(),
        })
        .await?;
    served(HISTORY_ROUTE, rows.len());
    let mut entries: Vec<HistoryEntry> = Vec::with_capacity(rows.len());
    let mut previous_new: Option<Option<Value>> = None;
    for row in rows {
        let stored = &row.stored;
        let changes = changes(stored.old_value.as_ref(), stored.new_value.as_ref());
        // In time order the previous event's result should be this one's starting point.
        let follows_previous = match order {
            Order::Asc => previous_new
                .as_ref()
                .map(|previous| *previous == stored.old_value),
            Order::Desc => None,
        };
        previous_new = Some(stored.new_value.clone());
        entries.push(HistoryEntry {
            event: EventView::from(row),
            changes,
            follows_previous,
        });
    }
    if order == Order::Desc {
        // Newest first: an entry follows the one listed after it.
        for i in 0..entries.len().saturating_sub(1) {
            let older_new = entries[i + 1].event.new_value.clone();
            entries[i].follows_previous = Some(older_new == entries[i].event.old_value);
        }
    }
    Ok(Json(History {
        entity_type,
        entity_id,
        entries,
        next_cursor,
        prev_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_name_every_differing_path() {
        let old = json!({"stage": "VEGETATIVE", "n": 1, "room": {"id": 3, "temp": 21}});
        let new = json!({"stage": "FLOWERING", "n": 1, "room": {"id": 3, "temp": 24}, "note": "x"});
        let found = changes(Some(&old), Some(&new));
        let paths: Vec<&str> = found.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, vec!["note", "room.temp", "stage"]);
        assert_eq!(found[0].old, None);
        assert_eq!(found[2].new, Some(json!("FLOWERING")));
        assert!(changes(Some(&old), Some(&old)).is_empty());
        assert_eq!(
            changes(None, Some(&json!(5))),
            vec![Change {
                path: String::new(),
                old: None,
                new: Some(json!(5))
            }]
        );
    }
}
