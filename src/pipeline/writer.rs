//! Stores one batch: immudb first (one transaction, the system of record), then PostgreSQL (one
//! statement), then the dead letters; only then are the batch's offsets marked done.
//!
//! Redelivery is made harmless here. immudb writes carry `KeyMustNotExist` preconditions: when
//! one fails, the keys that exist are read back and compared byte for byte with what we hold.
//! The same bytes mean the event is already stored (its transaction id is reused for PG);
//! different bytes are a conflict and go to the DLQ; the rest is written again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::batcher::Batch;
use super::consumer::InFlight;
use super::dlq::{DeadLetter, DlqProducer, ErrorClass, Stage};
use super::offsets::{OffsetTicket, OffsetTracker};
use super::record::SourceRecord;
use crate::event::AuditEvent;
use crate::immudb::{ImmudbClient, ImmudbError, KeyValue};
use crate::metrics::metrics;
use crate::postgres::{self, ReplicaRow};
use crate::resilience::{CircuitBreaker, Failure, RetryPolicy};
use tracing::Instrument;

/// A decoded, valid event waiting in a batch.
#[derive(Debug)]
pub struct ValidEvent {
    pub record: SourceRecord,
    pub event: AuditEvent,
    pub immudb_key: String,
    pub digest: [u8; 32],
}

/// One entry of a batch: a valid event to store, or a record already judged a dead letter.
#[derive(Debug)]
pub enum BatchItem {
    Valid(Box<ValidEvent>, OffsetTicket),
    Dead(Box<DeadLetter>, OffsetTicket),
}

impl BatchItem {
    fn payload_len(&self) -> usize {
        match self {
            BatchItem::Valid(event, _) => event.record.payload_bytes().len(),
            BatchItem::Dead(letter, _) => letter.record.payload_bytes().len(),
        }
    }

    fn offset(&self) -> i64 {
        match self {
            BatchItem::Valid(event, _) => event.record.offset,
            BatchItem::Dead(letter, _) => letter.record.offset,
        }
    }
}

/// Counts one store request (after its retries) by outcome.
fn count_operation<T, E>(
    counter: &prometheus::IntCounterVec,
    operation: &str,
    result: &Result<T, E>,
) {
    let status = if result.is_ok() { "ok" } else { "error" };
    counter.with_label_values(&[operation, status]).inc();
}

/// Lowest and highest offset of a batch (over all its partitions), for the batch span.
fn offset_range(items: &[BatchItem]) -> (i64, i64) {
    let offsets = items.iter().map(BatchItem::offset);
    let low = offsets.clone().min().unwrap_or(-1);
    let high = offsets.max().unwrap_or(-1);
    (low, high)
}

/// Feeds a store's breaker: a batch whose events all exhausted their retries at `stage` is a
/// failure; one that got anything through is a success.
fn record_outcome(breaker: &CircuitBreaker, fates: &[Fate], stage: Stage) {
    let exhausted = fates.iter().any(
        |f| matches!(f, Fate::Dead { class: ErrorClass::RetryExhausted, stage: s, .. } if *s == stage),
    );
    if exhausted {
        breaker.record_failure();
    } else {
        breaker.record_success();
    }
}

/// What happened to a batch, for logs and the caller's counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    pub stored: usize,
    pub duplicates: usize,
    pub dead_letters: usize,
    /// Events whose fate could not be confirmed (shutdown during a DLQ send); their offsets
    /// stay uncommitted and they are redelivered.
    pub unconfirmed: usize,
    pub immudb_tx: Option<u64>,
}

/// A batch between its two stages: written to immudb, waiting for PostgreSQL.
pub struct Staged {
    topic: String,
    size: usize,
    bytes: usize,
    span: tracing::Span,
    /// When its first write began (after any wait for an immudb slot): the batch duration runs
    /// from here to its offsets marked done, the wait between the stages included.
    started: std::time::Instant,
    /// From the batch's closing to its first write: parked, queued for its topic's writer and
    /// waiting for an immudb slot.
    queued: std::time::Duration,
    /// Time spent in the immudb write and the PostgreSQL write (queueing excluded).
    immudb_time: std::time::Duration,
    postgres_time: std::time::Duration,
    valid: Vec<ValidEvent>,
    tickets: Vec<OffsetTicket>,
    dead: Vec<(DeadLetter, OffsetTicket)>,
    fates: Vec<Fate>,
}

/// Gives up a whole group (shutdown while its store is unusable).
fn abandon_group(fates: &mut [Fate], group: &[usize]) {
    for &i in group {
        fates[i] = Fate::Abandoned;
    }
}

/// Gives up the events not settled yet (shutdown while a store is unusable): they stay
/// uncommitted and are redelivered.
fn abandon(fates: &mut [Fate]) {
    for fate in fates.iter_mut() {
        if matches!(fate, Fate::Pending | Fate::InImmudb { .. }) {
            *fate = Fate::Abandoned;
        }
    }
}

/// Everything a writer needs; shared by the per-topic writer tasks.
pub struct StoreContext {
    /// The trusted immudb state when writes are verified (`IMMUDB_VERIFY`).
    pub trust: Option<Arc<crate::trust::Trust>>,
    pub immudb_breaker: Arc<CircuitBreaker>,
    pub pg_breaker: Arc<CircuitBreaker>,
    /// Payload bytes in flight; a finished batch gives its bytes back.
    pub in_flight: Arc<InFlight>,
    pub immudb: ImmudbClient,
    pub pg: PgPool,
    pub dlq: DlqProducer,
    pub retry: RetryPolicy,
    /// immudb transactions in flight over all topics (`PIPELINE_IMMUDB_CONCURRENCY`). Each
    /// topic writes in order; this caps how many topics write at once, because on a busy
    /// server more concurrent transactions only make each one slower.
    pub immudb_slots: Semaphore,
    /// PostgreSQL batch statements in flight over all topics (`PIPELINE_POSTGRES_CONCURRENCY`).
    pub postgres_slots: Semaphore,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    /// Bumped after every batch so the committer and revocation waiters look again.
    pub progress: watch::Sender<u64>,
    /// Fires when the process must stop even if a DLQ write is still unconfirmed.
    pub hard_stop: CancellationToken,
}

/// The fate of one valid event as the batch moves through the stores.
#[derive(Debug, Clone)]
enum Fate {
    Pending,
    /// In immudb at this transaction (written now or found there with the same bytes).
    InImmudb {
        tx: u64,
        written_now: bool,
        /// Written with a verified transaction: inclusion and dual proof checked.
        verified: bool,
    },
    /// Same key as an earlier event of this batch, with the same bytes: follows that one.
    SameAs(usize),
    /// A same-bytes copy of an earlier event of the batch that was stored.
    Redelivered,
    /// Given up at shutdown while a store was unusable: neither stored nor dead-lettered, so
    /// its offset stays uncommitted and it is redelivered.
    Abandoned,
    Dead {
        class: ErrorClass,
        stage: Stage,
        kind: String,
        message: String,
        attempts: u32,
    },
}

impl StoreContext {
    /// Stores a batch and marks its offsets done, both stages back to back. Never fails: what
    /// cannot be stored is dead-lettered, and what cannot be dead-lettered stays uncommitted.
    pub async fn store_batch(&self, batch: Batch<BatchItem>) -> BatchReport {
        let staged = self.write_immudb_stage(batch).await;
        self.finish_stage(staged).await
    }

    /// Stage 1 of a batch: decode bookkeeping, in-batch duplicates, and the immudb transaction.
    /// The pipeline runs it for batch n+1 while stage 2 replicates batch n to PostgreSQL.
    pub async fn write_immudb_stage(&self, batch: Batch<BatchItem>) -> Staged {
        let topic = batch.topic;
        let closed_at = batch.closed_at;
        let size = batch.items.len();
        let bytes: usize = batch.items.iter().map(BatchItem::payload_len).sum();
        let (first_offset, last_offset) = offset_range(&batch.items);
        // Integers as i64: the OTLP exporter sends unsigned fields as strings.
        let span = tracing::info_span!(
            "batch",
            %topic,
            size = size as i64,
            first_offset,
            last_offset,
            immudb_tx = tracing::field::Empty,
            links = tracing::field::Empty,
        );
        crate::telemetry::link_traceparents(
            &span,
            batch.items.iter().filter_map(|item| match item {
                BatchItem::Valid(event, _) => event.record.header_str("traceparent"),
                BatchItem::Dead(letter, _) => letter.record.header_str("traceparent"),
            }),
        );
        let mut staged = Staged {
            topic,
            size,
            bytes,
            span,
            started: std::time::Instant::now(),
            queued: std::time::Duration::ZERO,
            immudb_time: std::time::Duration::ZERO,
            postgres_time: std::time::Duration::ZERO,
            valid: Vec::with_capacity(size),
            tickets: Vec::with_capacity(size),
            dead: Vec::new(),
            fates: Vec::new(),
        };
        for item in batch.items {
            match item {
                BatchItem::Valid(event, ticket) => {
                    staged.valid.push(*event);
                    staged.tickets.push(ticket);
                }
                BatchItem::Dead(letter, ticket) => staged.dead.push((*letter, ticket)),
            }
        }
        staged.fates = mark_in_batch_duplicates(&staged.valid);
        if staged.fates.iter().any(|f| matches!(f, Fate::Pending)) {
            // The batch's clock starts with its first write. The time it spent parked, queued
            // for its topic's writer and waiting for an immudb slot is reported apart, as
            // `queued_ms`: it depends on the other topics' load, not on this batch.
            let _slot = self.immudb_slots.acquire().await;
            staged.started = std::time::Instant::now();
            staged.queued = closed_at.elapsed();
            let span = staged.span.clone();
            self.immudb_stage(&mut staged).instrument(span).await;
        }
        staged
    }

    async fn immudb_stage(&self, staged: &mut Staged) {
        // While immudb's circuit is open the batch waits here (it is not dead-lettered); the
        // full queues behind it pause the consumer.
        if !self.immudb_available().await {
            abandon(&mut staged.fates);
            return;
        }
        let started = std::time::Instant::now();
        self.write_immudb(&staged.valid, &mut staged.fates).await;
        staged.immudb_time = started.elapsed();
        metrics()
            .immudb_write_duration
            .observe(staged.immudb_time.as_secs_f64());
        record_outcome(&self.immudb_breaker, &staged.fates, Stage::Immudb);
    }

    /// Stage 2 of a batch: PostgreSQL, the dead letters, then its offsets are marked done.
    pub async fn finish_stage(&self, mut staged: Staged) -> BatchReport {
        let span = staged.span.clone();
        let report = self
            .finish_items(&mut staged)
            .instrument(span.clone())
            .await;
        if let Some(tx) = report.immudb_tx {
            span.record("immudb_tx", i64::try_from(tx).unwrap_or(i64::MAX));
        }
        self.in_flight.sub(staged.bytes);
        let topic = staged.topic.as_str();
        let m = metrics();
        m.batch_size.observe(staged.size as f64);
        m.event_processing_duration
            .with_label_values(&[topic])
            .observe(staged.started.elapsed().as_secs_f64());
        m.events_processed
            .with_label_values(&[topic, "stored"])
            .inc_by(report.stored as u64);
        m.events_processed
            .with_label_values(&[topic, "duplicate"])
            .inc_by(report.duplicates as u64);
        m.events_processed
            .with_label_values(&[topic, "dead_lettered"])
            .inc_by(report.dead_letters as u64);
        span.in_scope(|| {
            tracing::info!(
                stored = report.stored,
                duplicates = report.duplicates,
                dead_letters = report.dead_letters,
                unconfirmed = report.unconfirmed,
                immudb_tx = report.immudb_tx,
                elapsed_ms = staged.started.elapsed().as_millis() as u64,
                queued_ms = staged.queued.as_millis() as u64,
                immudb_ms = staged.immudb_time.as_millis() as u64,
                postgres_ms = staged.postgres_time.as_millis() as u64,
                "batch done"
            )
        });
        report
    }

    async fn finish_items(&self, staged: &mut Staged) -> BatchReport {
        let fates = &mut staged.fates;
        let valid = &staged.valid;
        if fates.iter().any(|f| matches!(f, Fate::InImmudb { .. })) {
            if !self.postgres_available().await {
                abandon(fates);
            } else {
                let _slot = self.postgres_slots.acquire().await;
                let started = std::time::Instant::now();
                self.write_postgres(valid, fates).await;
                staged.postgres_time = started.elapsed();
                metrics()
                    .postgres_write_duration
                    .observe(staged.postgres_time.as_secs_f64());
                record_outcome(&self.pg_breaker, fates, Stage::Postgres);
            }
        }

        let mut report = BatchReport::default();
        let now = chrono::Utc::now();
        for i in 0..fates.len() {
            // Events that shared an event_id with an earlier one of the batch follow its fate.
            if let Fate::SameAs(first) = fates[i] {
                fates[i] = match &fates[first] {
                    Fate::Dead { .. } | Fate::Abandoned => fates[first].clone(),
                    _ => Fate::Redelivered,
                };
            }
            match fates[i] {
                Fate::InImmudb {
                    tx,
                    written_now: true,
                    ..
                } => {
                    report.stored += 1;
                    report.immudb_tx = report.immudb_tx.max(Some(tx));
                    let age = (now - valid[i].event.timestamp_utc())
                        .num_milliseconds()
                        .max(0);
                    metrics().event_age.observe(age as f64 / 1000.0);
                }
                Fate::InImmudb {
                    written_now: false, ..
                }
                | Fate::Redelivered => report.duplicates += 1,
                _ => {}
            }
        }
        if let Some(tx) = report.immudb_tx {
            // Topic writers finish in any order: the gauge only moves forward.
            static LAST_TX: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
            let tx = i64::try_from(tx).unwrap_or(i64::MAX);
            let last = LAST_TX
                .fetch_max(tx, std::sync::atomic::Ordering::Relaxed)
                .max(tx);
            metrics().immudb_last_tx_id.set(last);
        }

        let mut dead = std::mem::take(&mut staged.dead);
        let mut done = Vec::with_capacity(staged.valid.len() + dead.len());
        let valid = std::mem::take(&mut staged.valid);
        let tickets = std::mem::take(&mut staged.tickets);
        let fates = std::mem::take(&mut staged.fates);
        for ((event, fate), ticket) in valid.into_iter().zip(fates).zip(tickets) {
            match fate {
                Fate::Dead {
                    class,
                    stage,
                    kind,
                    message,
                    attempts,
                } => {
                    tracing::warn!(
                        event_id = %event.event.event_id,
                        trace_id = event.event.trace_id.as_deref(),
                        correlation_id = event.event.correlation_id.as_deref(),
                        offset = event.record.offset,
                        partition = event.record.partition,
                        class = class.as_str(),
                        stage = stage.as_str(),
                        error = %message,
                        "event cannot be stored; dead-lettering it"
                    );
                    dead.push((
                        DeadLetter {
                            record: event.record,
                            class,
                            stage,
                            kind,
                            message: format!("event_id {}: {message}", event.event.event_id),
                            attempts,
                        },
                        ticket,
                    ))
                }
                Fate::Abandoned => report.unconfirmed += 1,
                _ => done.push((event.record.topic_partition(), ticket)),
            }
        }

        let sends = dead.iter().map(|(letter, _)| async move {
            if letter.stage == Stage::Decode {
                tracing::warn!(
                    partition = letter.record.partition,
                    offset = letter.record.offset,
                    kind = %letter.kind,
                    error = %letter.message,
                    "invalid event; dead-lettering it"
                );
            }
            self.dlq.send(letter, &self.hard_stop).await
        });
        let results = futures::future::join_all(sends).await;
        for ((letter, ticket), result) in dead.iter().zip(results) {
            if result.is_ok() {
                report.dead_letters += 1;
                metrics()
                    .dlq_events
                    .with_label_values(&[&staged.topic, letter.class.as_str()])
                    .inc();
                done.push((letter.record.topic_partition(), *ticket));
            } else {
                report.unconfirmed += 1;
            }
        }

        {
            let mut tracker = self
                .tracker
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (tp, ticket) in &done {
                tracker.completed(tp, *ticket);
            }
        }
        self.progress.send_modify(|n| *n += 1);
        report
    }

    /// One immudb transaction for the group, verified when a trusted state is kept: every
    /// entry's inclusion and the dual proof from the trusted state to the new transaction are
    /// checked before the batch counts as written, then the trusted state moves forward.
    /// Returns the transaction id and whether it was verified.
    async fn set_group(&self, kvs: &[KeyValue]) -> Result<(u64, bool), Failure<ImmudbError>> {
        let Some(trust) = &self.trust else {
            let header = self
                .retry
                .run("immudb set", || self.immudb.set_all(kvs, true))
                .await?;
            return Ok((header.id, false));
        };
        let trusted = trust.current();
        let (header, verified) = self
            .retry
            .run("immudb set", || {
                self.immudb.verify_set_batch(kvs, true, &trusted)
            })
            .await
            .inspect_err(|failure| {
                if matches!(failure.error, ImmudbError::VerificationFailed { .. }) {
                    trust.suspect_tampering("verified batch write", &failure.error);
                }
            })?;
        if let Err(error) = trust.advance(verified).await {
            // The proof held; only persisting the new anchor failed. The in-memory state moved
            // on, and the next batch persists a later one.
            tracing::warn!(%error, "cannot persist the trusted immudb state");
        }
        Ok((header.id, true))
    }

    /// Waits until immudb's circuit is closed (probing it after each cool-down); false when
    /// the process must stop first.
    async fn immudb_available(&self) -> bool {
        let probe = || self.immudb_probe();
        self.immudb_breaker
            .wait_closed(probe, &self.hard_stop)
            .await
            .is_ok()
    }

    /// Waits until PostgreSQL's circuit is closed; false when the process must stop first.
    async fn postgres_available(&self) -> bool {
        let probe = || async { sqlx::query("SELECT 1").execute(&self.pg).await.map(|_| ()) };
        self.pg_breaker
            .wait_closed(probe, &self.hard_stop)
            .await
            .is_ok()
    }

    /// The half-open probe of immudb's circuit: a health check, failing for good once a
    /// verification failed (tampering is not a transient condition).
    async fn immudb_probe(&self) -> Result<(), String> {
        if self.trust.as_ref().is_some_and(|trust| trust.tampered()) {
            return Err(
                "verification failed: tamper suspected, restart after investigating".into(),
            );
        }
        self.immudb.health().await.map_err(|e| e.to_string())
    }

    /// Writes every pending event to immudb, resolving redeliveries and conflicts.
    async fn write_immudb(&self, events: &[ValidEvent], fates: &mut [Fate]) {
        let pending: Vec<usize> = (0..events.len())
            .filter(|&i| matches!(fates[i], Fate::Pending))
            .collect();
        self.write_immudb_group(events, fates, pending).await;
    }

    /// One group of events: `KeyMustNotExist` write, then resolution of existing keys, then
    /// bisection if immudb rejects the group for a reason it does not pin to one entry.
    async fn write_immudb_group(
        &self,
        events: &[ValidEvent],
        fates: &mut [Fate],
        mut group: Vec<usize>,
    ) {
        // Each round either writes the group or removes at least one existing key from it; the
        // bound only guards against a server that keeps contradicting itself.
        for _round in 0..4 {
            if group.is_empty() {
                return;
            }
            let kvs: Vec<KeyValue> = group
                .iter()
                .map(|&i| KeyValue {
                    key: events[i].immudb_key.as_bytes().to_vec(),
                    value: events[i].record.payload_bytes().to_vec(),
                })
                .collect();
            let result = self.set_group(&kvs).await;
            count_operation(&metrics().immudb_operations, "set", &result);
            match result {
                Ok((tx, verified)) => {
                    for &i in &group {
                        fates[i] = Fate::InImmudb {
                            tx,
                            written_now: true,
                            verified,
                        };
                    }
                    return;
                }
                // The server's answer contradicts the trusted state: tampering or a rollback.
                // Never retried into success: consumption stops until an operator intervenes.
                Err(Failure {
                    error: ImmudbError::VerificationFailed { .. },
                    ..
                }) => {
                    self.immudb_breaker.trip();
                    // Waits until shutdown: the probe fails for good once tampering is suspected.
                    self.immudb_available().await;
                    return abandon_group(fates, &group);
                }
                Err(Failure {
                    error: ImmudbError::PreconditionFailed { .. },
                    ..
                }) => match self.resolve_existing(events, fates, &group).await {
                    Ok(()) => group.retain(|&i| matches!(fates[i], Fate::Pending)),
                    Err(failure) => return mark_dead(fates, &group, Stage::Immudb, &failure),
                },
                Err(failure) if failure.error.is_transient() => {
                    return mark_dead(fates, &group, Stage::Immudb, &failure);
                }
                // Credentials, permissions, configuration: nothing about these events.
                // Dead-lettering would drain the stream; hold the batch behind an open circuit.
                Err(failure) if !matches!(failure.error, ImmudbError::InvalidArgument { .. }) => {
                    tracing::error!(error = %failure.error, "immudb refuses the batch for a reason that is not its data; holding it");
                    self.immudb_breaker.trip();
                    if !self.immudb_available().await {
                        return abandon_group(fates, &group);
                    }
                }
                Err(failure) if group.len() == 1 => {
                    fates[group[0]] = dead_fate(ErrorClass::Invalid, Stage::Immudb, &failure);
                    return;
                }
                Err(failure) => {
                    tracing::warn!(error = %failure.error, size = group.len(), "immudb rejected the batch; bisecting to isolate the offending events");
                    let second = group.split_off(group.len() / 2);
                    Box::pin(self.write_immudb_group(events, fates, group)).await;
                    Box::pin(self.write_immudb_group(events, fates, second)).await;
                    return;
                }
            }
        }
        let failure = Failure {
            error: "immudb kept reporting existing keys that it does not return".to_owned(),
            attempts: 4,
        };
        mark_dead(fates, &group, Stage::Immudb, &failure);
    }

    /// Reads back the keys of `group` and settles those that exist: same bytes → stored,
    /// different bytes → conflict.
    async fn resolve_existing(
        &self,
        events: &[ValidEvent],
        fates: &mut [Fate],
        group: &[usize],
    ) -> Result<(), Failure<ImmudbError>> {
        let keys: Vec<Vec<u8>> = group
            .iter()
            .map(|&i| events[i].immudb_key.as_bytes().to_vec())
            .collect();
        let existing = self
            .retry
            .run("immudb get_all", || self.immudb.get_all(&keys))
            .await;
        count_operation(&metrics().immudb_operations, "get_all", &existing);
        let existing = existing?;
        let by_key: HashMap<&[u8], usize> = group
            .iter()
            .map(|&i| (events[i].immudb_key.as_bytes(), i))
            .collect();
        for entry in existing {
            let Some(&i) = by_key.get(entry.key.as_slice()) else {
                continue;
            };
            fates[i] = if entry.value.as_slice() == events[i].record.payload_bytes() {
                Fate::InImmudb {
                    tx: entry.tx,
                    written_now: false,
                    verified: false,
                }
            } else {
                Fate::Dead {
                    class: ErrorClass::Conflict,
                    stage: Stage::Immudb,
                    kind: "conflict".into(),
                    message: format!(
                        "immudb already holds {} (tx {}) with different content",
                        events[i].immudb_key, entry.tx
                    ),
                    attempts: 1,
                }
            };
        }
        Ok(())
    }

    /// Replicates every event that is in immudb to PostgreSQL.
    async fn write_postgres(&self, events: &[ValidEvent], fates: &mut [Fate]) {
        let group: Vec<usize> = (0..events.len())
            .filter(|&i| matches!(fates[i], Fate::InImmudb { .. }))
            .collect();
        self.write_postgres_group(events, fates, group).await;
    }

    /// One statement for the group; bisection if PostgreSQL rejects it for a row it does not
    /// name.
    async fn write_postgres_group(
        &self,
        events: &[ValidEvent],
        fates: &mut [Fate],
        mut group: Vec<usize>,
    ) {
        if group.is_empty() {
            return;
        }
        let rows: Vec<ReplicaRow<'_>> = group
            .iter()
            .map(|&i| {
                let (tx, verified) = match fates[i] {
                    Fate::InImmudb { tx, verified, .. } => (tx, verified),
                    _ => (0, false),
                };
                replica_row(&events[i], tx, verified)
            })
            .collect();
        let result = loop {
            let result = self
                .retry
                .run("postgres insert", || {
                    postgres::insert_batch(&self.pg, &rows)
                })
                .await;
            count_operation(&metrics().postgres_operations, "insert", &result);
            match result {
                // Privileges, a missing table, a read-only server: nothing about these rows.
                // Dead-lettering would drain the stream; hold the batch behind an open circuit
                // until an operator fixes the store.
                Err(failure) if !failure.error.is_transient() && !failure.error.is_data_error() => {
                    tracing::error!(error = %failure.error, sqlstate = failure.error.sqlstate(), "PostgreSQL refuses the batch for a reason that is not its data; holding it");
                    self.pg_breaker.trip();
                    if !self.postgres_available().await {
                        return abandon_group(fates, &group);
                    }
                }
                other => break other,
            }
        };
        match result {
            Ok(outcome) => {
                for position in outcome.conflicts {
                    let i = group[position];
                    fates[i] = Fate::Dead {
                        class: ErrorClass::Conflict,
                        stage: Stage::Postgres,
                        kind: "conflict".into(),
                        message: "audit_trail already holds this event_id with a different payload digest".into(),
                        attempts: 1,
                    };
                }
            }
            Err(failure) if failure.error.is_transient() => {
                mark_dead(fates, &group, Stage::Postgres, &failure)
            }
            Err(failure) if group.len() == 1 => {
                fates[group[0]] = dead_fate(ErrorClass::Invalid, Stage::Postgres, &failure);
            }
            Err(failure) => {
                tracing::warn!(error = %failure.error, size = group.len(), "PostgreSQL rejected the batch; bisecting to isolate the offending rows");
                let second = group.split_off(group.len() / 2);
                Box::pin(self.write_postgres_group(events, fates, group)).await;
                Box::pin(self.write_postgres_group(events, fates, second)).await;
            }
        }
    }
}

fn replica_row(event: &ValidEvent, tx: u64, verified: bool) -> ReplicaRow<'_> {
    ReplicaRow {
        event: &event.event,
        immudb_key: &event.immudb_key,
        immudb_tx: tx,
        immudb_verified: verified,
        payload_sha256: &event.digest,
        topic: &event.record.topic,
        partition: event.record.partition,
        offset: event.record.offset,
    }
}

/// The first occurrence of each `event_id` stays pending; later ones with the same bytes follow
/// it, with different bytes they are conflicts. Keyed by `event_id` (PostgreSQL's identity), not
/// by the immudb key: two copies that differ in `entity_type` have different immudb keys but
/// must not both be written.
fn mark_in_batch_duplicates(events: &[ValidEvent]) -> Vec<Fate> {
    let mut first_by_id: HashMap<uuid::Uuid, usize> = HashMap::with_capacity(events.len());
    events
        .iter()
        .enumerate()
        .map(|(i, event)| match first_by_id.get(&event.event.event_id) {
            None => {
                first_by_id.insert(event.event.event_id, i);
                Fate::Pending
            }
            Some(&first) if events[first].digest == event.digest => Fate::SameAs(first),
            Some(&first) => Fate::Dead {
                class: ErrorClass::Conflict,
                stage: Stage::Immudb,
                kind: "conflict".into(),
                message: format!(
                    "same event_id as offset {} of this batch with different content",
                    events[first].record.offset
                ),
                attempts: 0,
            },
        })
        .collect()
}

fn dead_fate<E: std::fmt::Display>(class: ErrorClass, stage: Stage, failure: &Failure<E>) -> Fate {
    Fate::Dead {
        class,
        stage,
        kind: if class == ErrorClass::RetryExhausted {
            "unavailable".into()
        } else {
            "rejected".into()
        },
        message: failure.error.to_string(),
        attempts: failure.attempts,
    }
}

/// The whole group failed the same way: transient after every retry, or no way to isolate.
fn mark_dead<E: std::fmt::Display>(
    fates: &mut [Fate],
    group: &[usize],
    stage: Stage,
    failure: &Failure<E>,
) {
    for &i in group {
        fates[i] = dead_fate(ErrorClass::RetryExhausted, stage, failure);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(id: &str, entity_type: &str, payload: &[u8], offset: i64) -> ValidEvent {
        let json = format!(
            r#"{{"event_id":"{id}","timestamp":"2026-01-01T00:00:00Z","entity_type":"{entity_type}","entity_id":"p","action":"a","user_id":"u"}}"#
        );
        let event = crate::event::decode(json.as_bytes()).expect("valid event");
        let key = event.immudb_key();
        ValidEvent {
            record: SourceRecord {
                topic: "t".into(),
                partition: 0,
                offset,
                timestamp_ms: None,
                key: None,
                payload: Some(payload.to_vec()),
                headers: vec![],
            },
            event,
            immudb_key: key,
            digest: crate::event::payload_sha256(payload),
        }
    }

    const ONE: &str = "7f1c2d3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f";
    const TWO: &str = "0b6f4a1e-2c3d-4e5f-8a9b-1c2d3e4f5a6b";

    #[test]
    fn in_batch_duplicates_follow_the_first_and_differences_conflict() {
        let events = vec![
            valid(ONE, "plant", b"one", 0),
            valid(TWO, "plant", b"two", 1),
            valid(ONE, "plant", b"one", 2),
            valid(ONE, "plant", b"other", 3),
            // Same event_id under another entity_type: another immudb key, still a conflict.
            valid(TWO, "batch", b"two as a batch", 4),
        ];
        let fates = mark_in_batch_duplicates(&events);
        assert!(matches!(fates[0], Fate::Pending));
        assert!(matches!(fates[1], Fate::Pending));
        assert!(matches!(fates[2], Fate::SameAs(0)));
        for conflict in [3, 4] {
            assert!(matches!(
                fates[conflict],
                Fate::Dead {
                    class: ErrorClass::Conflict,
                    ..
                }
            ));
        }
    }
}
