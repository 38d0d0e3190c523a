//! `reconcile`: compares the PostgreSQL replica with immudb, the system of record, both ways.
//!
//! 1. PostgreSQL → immudb: every row (keyset pages in `event_id` order) is looked up by its
//!    `immudb_key` in one `GetAll` per page. A row whose key immudb does not have is *missing in
//!    immudb* (critical: the replica claims an event the system of record never stored). A row
//!    whose `payload_sha256` is not the digest of the immudb value, or whose columns are not what
//!    that value decodes to, *differs*: that is tampering with the replica. It is reported and
//!    never overwritten, because the replica is append-only and the evidence must stay.
//! 2. immudb → PostgreSQL: every `audit:` key (scanned in key order, in pages) is looked up by
//!    `event_id`. One that PostgreSQL lacks is *missing in PostgreSQL*; with `--repair` it is
//!    inserted from the immudb value, the way the pipeline would have inserted it.
//!
//! Restored rows carry `source_topic = 'reconcile'`, `source_partition = 0`,
//! `source_offset = 0` (the Kafka coordinates are not in immudb and the table requires
//! non-negative values) and `immudb_verified = false`.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, FixedOffset, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::compare::{FieldCheck, ROW_COLUMNS, StoredRow, compare_fields, truncate};
use super::progress::Progress;
use super::{OutputFormat, ToolError, Verdict, connect_immudb, connect_postgres, print_json};
use crate::config::Settings;
use crate::event::{self, AuditEvent};
use crate::immudb::{Entry, ImmudbClient, ImmudbError};
use crate::postgres::{self, PgError, ReplicaRow};
use crate::resilience::{Failure, RetryPolicy};

/// Rows per PostgreSQL page (and keys per `GetAll`).
pub const PG_PAGE: i64 = 1000;
/// Entries per immudb `Scan` call: below immudb's default `--max-result-size` of 2500 so the
/// default server accepts it, and small enough that a page of ordinary events is a few MB.
pub const SCAN_PAGE: u64 = 1000;
/// The key prefix of every audit event in immudb.
pub const KEY_PREFIX: &str = "audit:";
/// `source_topic` of rows restored from immudb.
pub const REPAIR_TOPIC: &str = "reconcile";
/// Findings listed in detail; beyond it only the counts grow (a corrupt table must not make
/// the report unreadable or unbounded).
pub const MAX_LISTED_FINDINGS: usize = 1000;
/// Findings printed in the human report.
const MAX_PRINTED_FINDINGS: usize = 50;

/// Arguments of `reconcile`.
#[derive(Debug, Clone, Default)]
pub struct ReconcileArgs {
    /// Only events with `event_timestamp >= since`.
    pub since: Option<DateTime<FixedOffset>>,
    /// Only events with `event_timestamp < until`.
    pub until: Option<DateTime<FixedOffset>>,
    /// Only rows consumed from this topic (the immudb → PostgreSQL walk is then skipped:
    /// immudb does not record topics).
    pub topic: Option<String>,
    /// Insert the events missing in PostgreSQL from immudb.
    pub repair: bool,
}

/// The counts of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// PostgreSQL rows compared with immudb.
    pub rows_checked: u64,
    /// immudb entries scanned.
    pub immudb_entries_scanned: u64,
    /// Of those, written after the run started: possibly still on their way to PostgreSQL in a
    /// running daemon, so not judged.
    pub newer_than_start: u64,
    /// Events in immudb that PostgreSQL lacks.
    pub missing_in_postgres: u64,
    /// Of those, inserted now (`--repair`).
    pub repaired: u64,
    /// Rows whose digest or columns differ from immudb (tampering).
    pub differing: u64,
    /// Rows whose key immudb does not have (critical).
    pub missing_in_immudb: u64,
    /// immudb entries that are no valid event, whose key does not match their content, or
    /// whose `event_id` PostgreSQL holds under another key.
    pub other: u64,
}

/// One problem, as listed in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// `differing`, `missing_in_immudb`, `missing_in_postgres`, `repaired`, `repair_failed`,
    /// `key_conflict` or `unreadable`.
    pub kind: &'static str,
    /// The event, when known.
    pub event_id: Option<Uuid>,
    /// The immudb key concerned.
    pub immudb_key: String,
    /// The transaction concerned (the row's, or the entry's).
    pub immudb_tx: Option<u64>,
    /// What differs, for `differing`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldCheck>,
    /// One sentence.
    pub detail: String,
}

/// Everything `reconcile` found, as printed with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct ReconcileReport {
    /// `clean` or `findings`.
    pub verdict: &'static str,
    /// The immudb database.
    pub immudb_database: String,
    /// The PostgreSQL schema.
    pub postgres_schema: String,
    /// The immudb transaction the scan was read at (at least).
    pub immudb_state_tx: u64,
    /// `--since`, RFC 3339.
    pub since: Option<String>,
    /// `--until`, RFC 3339.
    pub until: Option<String>,
    /// `--topic`.
    pub topic: Option<String>,
    /// `--repair`.
    pub repair: bool,
    /// Why the immudb → PostgreSQL walk did not run, when it did not.
    pub immudb_walk_skipped: Option<String>,
    /// The counts.
    pub summary: Summary,
    /// The findings, at most [`MAX_LISTED_FINDINGS`].
    pub findings: Vec<Finding>,
    /// Whether findings were left out of the list.
    pub findings_truncated: bool,
}

impl ReconcileReport {
    fn add(&mut self, finding: Finding) {
        if self.findings.len() < MAX_LISTED_FINDINGS {
            self.findings.push(finding);
        } else {
            self.findings_truncated = true;
        }
    }

    /// Whether anything is left for an operator: restored rows are not (that was the point).
    fn has_findings(&self) -> bool {
        let s = &self.summary;
        s.differing
            + s.missing_in_immudb
            + s.other
            + s.missing_in_postgres.saturating_sub(s.repaired)
            > 0
    }
}

/// Runs `reconcile` and prints its report.
pub async fn run(
    settings: &Settings,
    args: &ReconcileArgs,
    output: OutputFormat,
) -> Result<Verdict, ToolError> {
    if let (Some(since), Some(until)) = (args.since, args.until)
        && since >= until
    {
        return Err(ToolError::Usage(format!(
            "--since ({since}) must be before --until ({until})"
        )));
    }
    let pg = connect_postgres(&settings.postgres).await?;
    let immudb = connect_immudb(&settings.immudb).await?;
    let mut run = Reconciler {
        pg: pg.clone(),
        immudb: immudb.clone(),
        retry: RetryPolicy::new(settings.retry),
        args: args.clone(),
        progress: Progress::new(),
        report: ReconcileReport {
            verdict: "clean",
            immudb_database: immudb.database(),
            postgres_schema: settings.postgres.schema.clone(),
            immudb_state_tx: 0,
            since: args.since.map(|t| t.to_rfc3339()),
            until: args.until.map(|t| t.to_rfc3339()),
            topic: args.topic.clone(),
            repair: args.repair,
            immudb_walk_skipped: None,
            summary: Summary::default(),
            findings: Vec::new(),
            findings_truncated: false,
        },
    };
    let result = run.reconcile().await;
    run.progress.finish();
    immudb.close().await;
    pg.close().await;
    result?;
    let mut report = run.report;
    let verdict = Verdict::from_findings(report.has_findings());
    report.verdict = match verdict {
        Verdict::Clean => "clean",
        Verdict::Findings => "findings",
    };
    if output.json {
        print_json(&report);
    } else {
        super::emit(&render_human(&report));
    }
    Ok(verdict)
}

struct Reconciler {
    pg: PgPool,
    immudb: ImmudbClient,
    retry: RetryPolicy,
    args: ReconcileArgs,
    progress: Progress,
    report: ReconcileReport,
}

impl Reconciler {
    async fn reconcile(&mut self) -> Result<(), ToolError> {
        // Read before the walks: everything stored up to here must show up in the scan.
        let state = self
            .retry
            .run("immudb current state", || self.immudb.current_state())
            .await
            .map_err(|f| ToolError::immudb("reading immudb's current state", &f.error))?;
        self.report.immudb_state_tx = state.tx_id;
        self.postgres_to_immudb().await?;
        if self.args.topic.is_some() {
            self.report.immudb_walk_skipped = Some(
                "--topic given: immudb does not record the source topic, so events missing in \
                 PostgreSQL cannot be attributed to a topic"
                    .into(),
            );
        } else {
            self.immudb_to_postgres(state.tx_id).await?;
        }
        Ok(())
    }

    /// Walk 1: every PostgreSQL row in the filters against immudb.
    async fn postgres_to_immudb(&mut self) -> Result<(), ToolError> {
        let mut after: Option<Uuid> = None;
        loop {
            let rows = self.pg_page(after).await?;
            let Some(last) = rows.last() else {
                return Ok(());
            };
            after = Some(last.event_id);
            let mut keys: Vec<Vec<u8>> = rows
                .iter()
                .map(|r| r.immudb_key.clone().into_bytes())
                .collect();
            keys.sort_unstable();
            keys.dedup();
            let entries = self.get_all(keys).await?;
            let by_key: HashMap<&[u8], &Entry> =
                entries.iter().map(|e| (e.key.as_slice(), e)).collect();
            for row in &rows {
                self.check_row(row, by_key.get(row.immudb_key.as_bytes()).copied());
            }
            self.report.summary.rows_checked += rows.len() as u64;
            let s = &self.report.summary;
            let (checked, differing, missing) = (s.rows_checked, s.differing, s.missing_in_immudb);
            self.progress.update(|| {
                format!(
                    "reconcile: PostgreSQL → immudb  {checked} rows checked, {differing} differing, \
                     {missing} missing in immudb"
                )
            });
            if (rows.len() as i64) < PG_PAGE {
                return Ok(());
            }
        }
    }

    /// One keyset page of rows after `after`, in the filters. Two statements rather than an
    /// `$1 IS NULL OR …` predicate, so every page is an index range scan on the primary key.
    async fn pg_page(&self, after: Option<Uuid>) -> Result<Vec<StoredRow>, ToolError> {
        let mut conditions = Vec::new();
        let mut n = 0;
        let mut param = || {
            n += 1;
            format!("${n}")
        };
        if after.is_some() {
            conditions.push(format!("event_id > {}", param()));
        }
        if self.args.since.is_some() {
            conditions.push(format!("event_timestamp >= {}", param()));
        }
        if self.args.until.is_some() {
            conditions.push(format!("event_timestamp < {}", param()));
        }
        if self.args.topic.is_some() {
            conditions.push(format!("source_topic = {}", param()));
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM audit_trail {filter} ORDER BY event_id LIMIT {PG_PAGE}"
        );
        let mut query = sqlx::query_as::<_, StoredRow>(&sql);
        if let Some(after) = after {
            query = query.bind(after);
        }
        if let Some(since) = self.args.since {
            query = query.bind(since.with_timezone(&Utc));
        }
        if let Some(until) = self.args.until {
            query = query.bind(until.with_timezone(&Utc));
        }
        if let Some(topic) = &self.args.topic {
            query = query.bind(topic);
        }
        query
            .fetch_all(&self.pg)
            .await
            .map_err(|e| ToolError::postgres("reading audit_trail", &PgError::from(e)))
    }

    /// `GetAll` for a page; a page whose answer is too large for one message is split.
    async fn get_all(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Entry>, ToolError> {
        let mut pending = vec![keys];
        let mut out = Vec::new();
        while let Some(keys) = pending.pop() {
            match self
                .retry
                .run("immudb get_all", || self.immudb.get_all(&keys))
                .await
            {
                Ok(entries) => out.extend(entries),
                Err(Failure {
                    error: ImmudbError::InvalidArgument { .. },
                    ..
                }) if keys.len() > 1 => {
                    let mut first = keys;
                    let second = first.split_off(first.len() / 2);
                    pending.push(first);
                    pending.push(second);
                }
                Err(f) => return Err(ToolError::immudb("reading from immudb", &f.error)),
            }
        }
        Ok(out)
    }

    fn check_row(&mut self, row: &StoredRow, entry: Option<&Entry>) {
        let row_tx = u64::try_from(row.immudb_tx).ok();
        let Some(entry) = entry else {
            self.report.summary.missing_in_immudb += 1;
            self.report.add(Finding {
                kind: "missing_in_immudb",
                event_id: Some(row.event_id),
                immudb_key: row.immudb_key.clone(),
                immudb_tx: row_tx,
                fields: Vec::new(),
                detail: "immudb has no such key: the replica holds an event the system of record \
                         does not"
                    .into(),
            });
            return;
        };
        let mut differing: Vec<FieldCheck> = Vec::new();
        let digest = event::payload_sha256(&entry.value);
        if digest.as_slice() != row.payload_sha256.as_slice() {
            differing.push(FieldCheck {
                field: "payload_sha256",
                matches: false,
                postgres: Some(super::hex(&row.payload_sha256)),
                immudb: Some(super::hex(&digest)),
            });
        }
        if row_tx != Some(entry.tx) {
            differing.push(FieldCheck {
                field: "immudb_tx",
                matches: false,
                postgres: Some(row.immudb_tx.to_string()),
                immudb: Some(format!("{} (revision {})", entry.tx, entry.revision)),
            });
        }
        let mut detail = String::new();
        match event::decode(&entry.value) {
            Ok(decoded) => differing.extend(
                compare_fields(row, &decoded, &row.immudb_key)
                    .into_iter()
                    .filter(|c| !c.matches),
            ),
            Err(e) => detail = format!("; the immudb value is not a valid event: {e}"),
        }
        if differing.is_empty() && detail.is_empty() {
            return;
        }
        self.report.summary.differing += 1;
        let names: Vec<&str> = differing.iter().map(|c| c.field).collect();
        self.report.add(Finding {
            kind: "differing",
            event_id: Some(row.event_id),
            immudb_key: row.immudb_key.clone(),
            immudb_tx: row_tx,
            detail: format!(
                "PostgreSQL differs from immudb in: {}{detail}",
                names.join(", ")
            ),
            fields: differing,
        });
    }

    /// Walk 2: every `audit:` key of immudb against PostgreSQL.
    async fn immudb_to_postgres(&mut self, since_tx: u64) -> Result<(), ToolError> {
        let mut seek: Vec<u8> = Vec::new();
        let mut limit = SCAN_PAGE;
        loop {
            let page = match self
                .retry
                .run("immudb scan", || {
                    self.immudb
                        .scan(KEY_PREFIX.as_bytes(), &seek, limit, since_tx)
                })
                .await
            {
                Ok(page) => page,
                // The server's result-size limit is lower than ours, or the page does not fit
                // one message: ask for less.
                Err(Failure {
                    error: ImmudbError::InvalidArgument { .. },
                    ..
                }) if limit > 1 => {
                    limit /= 2;
                    continue;
                }
                Err(f) => return Err(ToolError::immudb("scanning immudb", &f.error)),
            };
            let Some(last) = page.last() else {
                return Ok(());
            };
            seek = last.key.clone();
            self.report.summary.immudb_entries_scanned += page.len() as u64;
            self.check_entries(&page, since_tx).await?;
            let s = &self.report.summary;
            let (scanned, missing, repaired) =
                (s.immudb_entries_scanned, s.missing_in_postgres, s.repaired);
            self.progress.update(|| {
                format!(
                    "reconcile: immudb → PostgreSQL  {scanned} entries scanned, {missing} missing in \
                     PostgreSQL, {repaired} repaired"
                )
            });
        }
    }

    async fn check_entries(&mut self, page: &[Entry], start_tx: u64) -> Result<(), ToolError> {
        // Entries in the time filter, decoded, with their event id.
        let mut candidates: Vec<(&Entry, AuditEvent)> = Vec::with_capacity(page.len());
        for entry in page {
            // A running daemon writes immudb first and PostgreSQL next: an entry newer than the
            // state read at start may simply not have reached PostgreSQL yet.
            if entry.tx > start_tx {
                self.report.summary.newer_than_start += 1;
                continue;
            }
            let key = String::from_utf8_lossy(&entry.key);
            let event = match event::decode(&entry.value) {
                Ok(event) => event,
                Err(e) => {
                    self.other(
                        entry,
                        None,
                        format!("the immudb value is not a valid event: {e}"),
                    );
                    continue;
                }
            };
            if event.immudb_key() != key {
                self.other(
                    entry,
                    Some(event.event_id),
                    format!(
                        "the key does not match its value, whose key would be {}",
                        event.immudb_key()
                    ),
                );
                continue;
            }
            let at = event.timestamp_utc();
            if self.args.since.is_some_and(|since| at < since)
                || self.args.until.is_some_and(|until| at >= until)
            {
                continue;
            }
            candidates.push((entry, event));
        }
        if candidates.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = candidates.iter().map(|(_, e)| e.event_id).collect();
        let (ids, pg) = (&ids, &self.pg);
        let stored: HashMap<Uuid, String> = self
            .retry
            .run("postgres lookup", || async move {
                sqlx::query_as::<_, (Uuid, String)>(
                    "SELECT event_id, immudb_key FROM audit_trail WHERE event_id = ANY($1)",
                )
                .bind(ids)
                .fetch_all(pg)
                .await
                .map_err(PgError::from)
            })
            .await
            .map_err(|f| ToolError::postgres("reading audit_trail", &f.error))?
            .into_iter()
            .collect();
        // The uniqueness key says which copy of an event_id immudb accepted: a copy it names
        // with another digest is never restored.
        let unique_keys: Vec<Vec<u8>> = candidates
            .iter()
            .map(|(_, e)| e.uniqueness_key().into_bytes())
            .collect();
        let accepted: HashMap<Vec<u8>, Vec<u8>> = self
            .get_all(unique_keys)
            .await?
            .into_iter()
            .map(|entry| (entry.key, entry.value))
            .collect();
        let mut missing: Vec<(&Entry, AuditEvent)> = Vec::new();
        let mut seen = HashSet::new();
        for (entry, event) in candidates {
            let unique = accepted.get(event.uniqueness_key().as_bytes());
            if let Some(value) = unique
                && *value != event::uniqueness_value(&event::payload_sha256(&entry.value))
            {
                self.report.summary.other += 1;
                self.report.add(Finding {
                    kind: "key_conflict",
                    event_id: Some(event.event_id),
                    immudb_key: String::from_utf8_lossy(&entry.key).into_owned(),
                    immudb_tx: Some(entry.tx),
                    fields: Vec::new(),
                    detail: format!(
                        "{} names another payload for this event_id: this copy is not the one \
                         immudb accepted and is never restored",
                        event.uniqueness_key()
                    ),
                });
                continue;
            }
            match stored.get(&event.event_id) {
                Some(key) if key.as_bytes() == entry.key.as_slice() => {}
                Some(key) => {
                    let detail = format!(
                        "PostgreSQL holds this event_id under another key, {key}: the same event_id \
                         was stored with another entity_type"
                    );
                    self.report.summary.other += 1;
                    self.report.add(Finding {
                        kind: "key_conflict",
                        event_id: Some(event.event_id),
                        immudb_key: String::from_utf8_lossy(&entry.key).into_owned(),
                        immudb_tx: Some(entry.tx),
                        fields: Vec::new(),
                        detail,
                    });
                }
                // Two keys of one page with the same event_id: the first one is restored, the
                // second is a key conflict once the first is in.
                None if !seen.insert(event.event_id) => {
                    self.other(
                        entry,
                        Some(event.event_id),
                        "another key of immudb carries the same event_id".into(),
                    );
                }
                None => missing.push((entry, event)),
            }
        }
        self.report.summary.missing_in_postgres += missing.len() as u64;
        if !self.args.repair {
            for (entry, event) in &missing {
                self.report.add(Finding {
                    kind: "missing_in_postgres",
                    event_id: Some(event.event_id),
                    immudb_key: String::from_utf8_lossy(&entry.key).into_owned(),
                    immudb_tx: Some(entry.tx),
                    fields: Vec::new(),
                    detail: "in immudb, not in PostgreSQL (run with --repair to restore it)".into(),
                });
            }
            return Ok(());
        }
        self.repair(&missing).await
    }

    /// Inserts the missing events as the pipeline would have, in one statement; rows
    /// PostgreSQL rejects for their content are then tried one by one so the rest gets in.
    async fn repair(&mut self, missing: &[(&Entry, AuditEvent)]) -> Result<(), ToolError> {
        if missing.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = missing
            .iter()
            .map(|(e, _)| String::from_utf8_lossy(&e.key).into_owned())
            .collect();
        let digests: Vec<[u8; 32]> = missing
            .iter()
            .map(|(e, _)| event::payload_sha256(&e.value))
            .collect();
        let rows: Vec<ReplicaRow<'_>> = missing
            .iter()
            .enumerate()
            .map(|(i, (entry, event))| ReplicaRow {
                event,
                immudb_key: &keys[i],
                immudb_tx: entry.tx,
                immudb_verified: false,
                payload_sha256: &digests[i],
                topic: REPAIR_TOPIC,
                partition: 0,
                offset: 0,
            })
            .collect();
        let groups: Vec<Vec<usize>> = match self.insert(&rows).await? {
            Ok(outcome) => {
                self.record_insert(missing, &outcome.conflicts, (0..rows.len()).collect());
                return Ok(());
            }
            Err(_) => (0..rows.len()).map(|i| vec![i]).collect(),
        };
        for group in groups {
            let one: Vec<ReplicaRow<'_>> = group.iter().map(|&i| rows[i]).collect();
            match self.insert(&one).await? {
                Ok(outcome) => self.record_insert(missing, &outcome.conflicts, group),
                Err(error) => {
                    let (entry, event) = &missing[group[0]];
                    self.report.summary.other += 1;
                    self.report.add(Finding {
                        kind: "repair_failed",
                        event_id: Some(event.event_id),
                        immudb_key: keys[group[0]].clone(),
                        immudb_tx: Some(entry.tx),
                        fields: Vec::new(),
                        detail: format!("PostgreSQL refused the restored row: {error}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// One insert with retries: `Ok(Err(_))` is PostgreSQL refusing the rows' data.
    async fn insert(
        &self,
        rows: &[ReplicaRow<'_>],
    ) -> Result<Result<postgres::InsertOutcome, PgError>, ToolError> {
        match self
            .retry
            .run("postgres insert", || postgres::insert_batch(&self.pg, rows))
            .await
        {
            Ok(outcome) => Ok(Ok(outcome)),
            Err(f) if f.error.is_data_error() => Ok(Err(f.error)),
            Err(f) => Err(ToolError::postgres("restoring rows", &f.error)),
        }
    }

    /// Books an insert of `group` (indexes into `missing`); `conflicts` index into `group`.
    fn record_insert(
        &mut self,
        missing: &[(&Entry, AuditEvent)],
        conflicts: &[usize],
        group: Vec<usize>,
    ) {
        let conflicting: HashSet<usize> = conflicts.iter().map(|&p| group[p]).collect();
        for i in group {
            let (entry, event) = &missing[i];
            let key = String::from_utf8_lossy(&entry.key).into_owned();
            if conflicting.contains(&i) {
                // Written concurrently (the daemon caught up) with other content.
                self.report.summary.other += 1;
                self.report.add(Finding {
                    kind: "repair_failed",
                    event_id: Some(event.event_id),
                    immudb_key: key,
                    immudb_tx: Some(entry.tx),
                    fields: Vec::new(),
                    detail: "a row with this event_id and another digest appeared meanwhile".into(),
                });
            } else {
                // Inserted now, or inserted meanwhile with the same bytes: present either way.
                self.report.summary.repaired += 1;
                self.report.add(Finding {
                    kind: "repaired",
                    event_id: Some(event.event_id),
                    immudb_key: key,
                    immudb_tx: Some(entry.tx),
                    fields: Vec::new(),
                    detail: "was missing in PostgreSQL; restored from immudb".into(),
                });
            }
        }
    }

    fn other(&mut self, entry: &Entry, event_id: Option<Uuid>, detail: String) {
        self.report.summary.other += 1;
        self.report.add(Finding {
            kind: "unreadable",
            event_id,
            immudb_key: String::from_utf8_lossy(&entry.key).into_owned(),
            immudb_tx: Some(entry.tx),
            fields: Vec::new(),
            detail,
        });
    }
}

fn render_human(r: &ReconcileReport) -> String {
    let mut o = String::new();
    out!(
        o,
        "reconcile  PostgreSQL schema \"{}\"  ⇄  immudb database \"{}\" (state tx {})",
        r.postgres_schema,
        r.immudb_database,
        r.immudb_state_tx
    );
    let mut filters = Vec::new();
    if let Some(since) = &r.since {
        filters.push(format!("event_timestamp >= {since}"));
    }
    if let Some(until) = &r.until {
        filters.push(format!("event_timestamp < {until}"));
    }
    if let Some(topic) = &r.topic {
        filters.push(format!("source_topic = {topic}"));
    }
    if !filters.is_empty() {
        out!(o, "  filters: {}", filters.join(", "));
    }
    if let Some(why) = &r.immudb_walk_skipped {
        out!(o, "  immudb → PostgreSQL walk skipped: {why}");
    }
    if !r.findings.is_empty() {
        out!(o);
        for f in r.findings.iter().take(MAX_PRINTED_FINDINGS) {
            let id = super::compare::or_dash(f.event_id);
            let tx = super::compare::or_dash(f.immudb_tx);
            out!(
                o,
                "  {:<19} {id}  {}  tx {tx}",
                f.kind.to_uppercase().replace('_', " "),
                truncate(&f.immudb_key, 80)
            );
            out!(o, "      {}", f.detail);
            for field in &f.fields {
                out!(
                    o,
                    "      {:<16} PostgreSQL: {}",
                    field.field,
                    field.postgres.as_deref().unwrap_or("")
                );
                out!(
                    o,
                    "      {:<16} immudb:     {}",
                    "",
                    field.immudb.as_deref().unwrap_or("")
                );
            }
        }
        let more = r.findings.len().saturating_sub(MAX_PRINTED_FINDINGS);
        if more > 0 || r.findings_truncated {
            out!(
                o,
                "  … more findings not shown (use --json for up to {MAX_LISTED_FINDINGS})"
            );
        }
    }
    let s = &r.summary;
    out!(o);
    out!(
        o,
        "  {:<34} {:>10}",
        "rows checked (PostgreSQL)",
        s.rows_checked
    );
    out!(
        o,
        "  {:<34} {:>10}",
        "entries scanned (immudb)",
        s.immudb_entries_scanned
    );
    if s.newer_than_start > 0 {
        out!(
            o,
            "  {:<34} {:>10}",
            "  written after the start (skipped)",
            s.newer_than_start
        );
    }
    out!(
        o,
        "  {:<34} {:>10}",
        "missing in PostgreSQL",
        s.missing_in_postgres
    );
    out!(o, "  {:<34} {:>10}", "repaired", s.repaired);
    out!(o, "  {:<34} {:>10}", "differing (tamper)", s.differing);
    out!(
        o,
        "  {:<34} {:>10}",
        "missing in immudb (critical)",
        s.missing_in_immudb
    );
    out!(o, "  {:<34} {:>10}", "other findings", s.other);
    if r.has_findings() {
        out!(
            o,
            "verdict: FINDINGS — the replica does not match the system of record"
        );
    } else if s.repaired > 0 {
        out!(
            o,
            "verdict: REPAIRED — the replica now matches the system of record"
        );
    } else {
        out!(
            o,
            "verdict: CLEAN — the replica matches the system of record"
        );
    }
    o
}
