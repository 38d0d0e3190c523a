//! Stores one batch: immudb first (one verified transaction, the system of record), then
//! PostgreSQL (one statement), then the dead letters; then the commit rule
//! ([`Settlement`]) releases the offsets of what is settled.
//!
//! Two stages per topic: stage 1 writes batch n+1 to immudb while stage 2 replicates batch n to
//! PostgreSQL. A batch's rows wait in stage 2 until its transaction is *settled* on the shared
//! trusted state ([`Trust::settle`]). Once tampering is suspected, every batch of every topic is
//! held (never written, never committed) until the process is restarted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::batcher::Batch;
use super::consumer::InFlight;
use super::dlq::{DeadLetter, DlqProducer, ErrorClass, Stage};
use super::immudb_write::{Candidate, Hold, ImmudbWriter, Outcome};
use super::offsets::{OffsetTicket, OffsetTracker, Settlement};
use super::record::SourceRecord;
use crate::event::AuditEvent;
use crate::immudb::{ImmudbClient, ImmudbError};
use crate::metrics::metrics;
use crate::postgres::{self, ReplicaRow};
use crate::resilience::{CircuitBreaker, Failure, RetryPolicy};
use crate::trust::{Trust, TrustFailure};

/// A decoded, valid event waiting in a batch.
#[derive(Debug)]
pub struct ValidEvent {
    pub record: SourceRecord,
    pub event: AuditEvent,
    pub immudb_key: String,
    pub digest: [u8; 32],
}

impl ValidEvent {
    fn candidate(&self) -> Candidate<'_> {
        Candidate {
            event_id: self.event.event_id,
            audit_key: &self.immudb_key,
            payload: self.record.payload_bytes(),
            digest: &self.digest,
        }
    }
}

/// One entry of a batch: a valid event to store, or a record already judged a dead letter.
#[derive(Debug)]
pub enum BatchItem {
    Valid(Box<ValidEvent>, OffsetTicket),
    Dead(Box<DeadLetter>, OffsetTicket),
}

impl BatchItem {
    /// Payload bytes the item holds in flight.
    pub fn payload_len(&self) -> usize {
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

    /// Where the item's record came from.
    pub fn topic_partition(&self) -> super::offsets::TopicPartition {
        match self {
            BatchItem::Valid(event, _) => event.record.topic_partition(),
            BatchItem::Dead(letter, _) => letter.record.topic_partition(),
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

/// What happened to a batch, for logs and the caller's counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    pub stored: usize,
    pub duplicates: usize,
    pub dead_letters: usize,
    /// Events whose fate could not be confirmed (held at shutdown or behind the tamper latch,
    /// a DLQ send cut short); their offsets stay uncommitted and they are redelivered.
    pub unconfirmed: usize,
    pub immudb_tx: Option<u64>,
}

/// Why an event cannot be stored: what its dead letter's headers say.
#[derive(Debug, Clone)]
struct DeadCause {
    class: ErrorClass,
    stage: Stage,
    kind: &'static str,
    message: String,
    attempts: u32,
}

/// The fate of one valid event as the batch moves through the stores.
#[derive(Debug, Clone)]
enum Fate {
    Pending,
    /// In immudb at this transaction (written now or found there with the same bytes).
    InImmudb {
        tx: u64,
        written_now: bool,
        /// Proven: its entries' inclusion and the transaction's consistency with the trusted
        /// state.
        verified: bool,
    },
    /// Same `event_id` as an earlier event of this batch, with the same bytes: follows it.
    SameAs(usize),
    /// A same-bytes copy of an earlier event of the batch that was stored.
    Redelivered,
    /// Neither stored nor dead-lettered (held at shutdown or behind the tamper latch): its
    /// offset stays uncommitted and it is redelivered.
    Abandoned,
    Dead(DeadCause),
}

impl Fate {
    fn from_outcome(outcome: Outcome) -> Fate {
        let dead = |class, kind, message, attempts| {
            Fate::Dead(DeadCause {
                class,
                stage: Stage::Immudb,
                kind,
                message,
                attempts,
            })
        };
        match outcome {
            Outcome::Pending | Outcome::Held => Fate::Abandoned,
            Outcome::Stored { tx, now, verified } => Fate::InImmudb {
                tx,
                written_now: now,
                verified,
            },
            Outcome::Conflict(message) => dead(ErrorClass::Conflict, "conflict", message, 1),
            Outcome::Invalid(message) => dead(ErrorClass::Invalid, "rejected", message, 1),
            Outcome::Unavailable { message, attempts } => {
                dead(ErrorClass::RetryExhausted, "unavailable", message, attempts)
            }
        }
    }

    fn settlement(&self) -> Settlement {
        match self {
            Fate::InImmudb { .. } | Fate::Redelivered => Settlement::Stored,
            // Dead letters settle once the DLQ acknowledges them, not here.
            Fate::Pending | Fate::SameAs(_) | Fate::Abandoned | Fate::Dead(_) => {
                Settlement::Unsettled
            }
        }
    }
}

/// A valid event of a batch with its offset ticket and its fate so far.
struct Item {
    event: ValidEvent,
    ticket: OffsetTicket,
    fate: Fate,
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
    items: Vec<Item>,
    dead: Vec<(DeadLetter, OffsetTicket)>,
}

impl Staged {
    fn abandon_unsettled(&mut self) {
        for item in &mut self.items {
            if matches!(item.fate, Fate::Pending | Fate::InImmudb { .. }) {
                item.fate = Fate::Abandoned;
            }
        }
    }

    fn any(&self, predicate: impl Fn(&Fate) -> bool) -> bool {
        self.items.iter().any(|item| predicate(&item.fate))
    }
}

/// Everything a writer needs; shared by the per-topic writer tasks.
pub struct StoreContext {
    /// The trusted immudb state when writes are verified (`IMMUDB_VERIFY`).
    pub trust: Option<Arc<Trust>>,
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
    /// Fires when the process must stop even if a store or the DLQ is still unusable.
    pub hard_stop: CancellationToken,
}

impl Hold for StoreContext {
    /// Credentials, permissions, configuration: nothing about these events. Dead-lettering
    /// would drain the stream, so the batch waits behind an open circuit whose probe is a
    /// write permission check.
    fn store_refused<'a>(&'a self, why: &'a ImmudbError) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            tracing::error!(error = %why, "immudb refuses the batch for a reason that is not its data; holding it");
            self.immudb_breaker.trip();
            self.immudb_available().await
        })
    }
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
        let mut valid = Vec::with_capacity(size);
        let mut dead = Vec::new();
        for item in batch.items {
            match item {
                BatchItem::Valid(event, ticket) => valid.push((*event, ticket)),
                BatchItem::Dead(letter, ticket) => dead.push((*letter, ticket)),
            }
        }
        let fates = mark_in_batch_duplicates(valid.iter().map(|(event, _)| event));
        let items = valid
            .into_iter()
            .zip(fates)
            .map(|((event, ticket), fate)| Item {
                event,
                ticket,
                fate,
            })
            .collect();
        let mut staged = Staged {
            topic,
            size,
            bytes,
            span,
            started: std::time::Instant::now(),
            queued: std::time::Duration::ZERO,
            immudb_time: std::time::Duration::ZERO,
            postgres_time: std::time::Duration::ZERO,
            items,
            dead,
        };
        if staged.any(|fate| matches!(fate, Fate::Pending)) {
            let span = staged.span.clone();
            // Once tampering is suspected a batch is held before it takes a write slot, so
            // every topic's writer meets the latch, not only those holding the slots.
            if self.trust.as_deref().is_some_and(Trust::tampered) {
                self.hold_if_latched().instrument(span).await;
                staged.abandon_unsettled();
                return staged;
            }
            // The batch's clock starts with its first write. The time it spent parked, queued
            // for its topic's writer and waiting for an immudb slot is reported apart, as
            // `queued_ms`: it depends on the other topics' load, not on this batch.
            let slot = self.immudb_slots.acquire().await;
            staged.started = std::time::Instant::now();
            staged.queued = closed_at.elapsed();
            let held = self
                .immudb_stage(&mut staged)
                .instrument(span.clone())
                .await;
            drop(slot);
            if held {
                self.hold_if_latched().instrument(span).await;
            }
        }
        staged
    }

    /// Writes the batch's pending events; true when some were held (writes stopped).
    async fn immudb_stage(&self, staged: &mut Staged) -> bool {
        // While immudb's circuit is open the batch waits here (it is not dead-lettered); the
        // full queues behind it pause the consumer.
        if !self.immudb_available().await {
            staged.abandon_unsettled();
            return self.trust.as_deref().is_some_and(Trust::tampered);
        }
        let started = std::time::Instant::now();
        let pending: Vec<usize> = (0..staged.items.len())
            .filter(|&i| matches!(staged.items[i].fate, Fate::Pending))
            .collect();
        let candidates: Vec<Candidate<'_>> = pending
            .iter()
            .map(|&i| staged.items[i].event.candidate())
            .collect();
        let writer = ImmudbWriter {
            immudb: &self.immudb,
            trust: self.trust.as_deref(),
            retry: &self.retry,
            hold: self,
        };
        let outcomes = writer.write(&candidates).await;
        drop(candidates);
        staged.immudb_time = started.elapsed();
        metrics()
            .immudb_write_duration
            .observe(staged.immudb_time.as_secs_f64());
        let held = outcomes.contains(&Outcome::Held);
        let exhausted = outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Unavailable { .. }));
        let reached = outcomes.iter().any(|o| matches!(o, Outcome::Stored { .. }));
        for (i, outcome) in pending.into_iter().zip(outcomes) {
            staged.items[i].fate = Fate::from_outcome(outcome);
        }
        if exhausted {
            self.immudb_breaker.record_failure();
        } else if reached {
            self.immudb_breaker.record_success();
        }
        held
    }

    /// Once tampering is suspected, a batch is held here (neither written nor committed) until
    /// the process stops; an operator restarts it after investigating.
    async fn hold_if_latched(&self) {
        let Some(trust) = self.trust.as_deref().filter(|trust| trust.tampered()) else {
            return;
        };
        debug_assert!(trust.tampered());
        tracing::error!("tamper suspected: holding the batch until a restart");
        self.immudb_breaker.trip();
        self.hard_stop.cancelled().await;
    }

    /// Stage 2 of a batch: PostgreSQL, the dead letters, then the commit rule.
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

    /// Waits until the newest transaction of the batch is settled on the shared trusted state.
    /// False when the batch must not reach PostgreSQL (tamper suspected, or stopping first).
    async fn settle(&self, staged: &Staged) -> bool {
        let Some(trust) = self.trust.as_deref() else {
            return true;
        };
        let newest = staged
            .items
            .iter()
            .filter_map(|item| match item.fate {
                Fate::InImmudb {
                    tx, verified: true, ..
                } => Some(tx),
                _ => None,
            })
            .max();
        let Some(newest) = newest else { return true };
        loop {
            let failure = tokio::select! {
                settled = trust.settle(newest) => match settled {
                    Ok(()) => return true,
                    Err(failure) => failure,
                },
                () = self.hard_stop.cancelled() => return false,
            };
            match failure {
                TrustFailure::Tampered(_) => {
                    self.hold_if_latched().await;
                    return false;
                }
                TrustFailure::Postgres(error) => {
                    tracing::warn!(%error, "cannot persist the trusted immudb state; waiting for PostgreSQL");
                    self.pg_breaker.trip();
                    if !self.postgres_available().await {
                        return false;
                    }
                }
                TrustFailure::Immudb(error) => {
                    tracing::warn!(%error, "cannot prove the trusted state consistent yet; waiting for immudb");
                    self.immudb_breaker.trip();
                    if !self.immudb_available().await {
                        return false;
                    }
                }
            }
        }
    }

    async fn finish_items(&self, staged: &mut Staged) -> BatchReport {
        if staged.any(|fate| matches!(fate, Fate::InImmudb { .. })) {
            let writable = self.settle(staged).await && self.postgres_available().await;
            let slot = match writable {
                true => Some(self.postgres_slots.acquire().await),
                false => None,
            };
            // Latched while this batch waited for its turn: nothing more is written.
            let latched = self.trust.as_deref().is_some_and(Trust::tampered);
            if !writable || latched {
                drop(slot);
                staged.abandon_unsettled();
                if latched {
                    self.hold_if_latched().await;
                }
            } else {
                let started = std::time::Instant::now();
                let group: Vec<usize> = (0..staged.items.len())
                    .filter(|&i| matches!(staged.items[i].fate, Fate::InImmudb { .. }))
                    .collect();
                self.write_postgres_group(&mut staged.items, group).await;
                drop(slot);
                staged.postgres_time = started.elapsed();
                metrics()
                    .postgres_write_duration
                    .observe(staged.postgres_time.as_secs_f64());
                let exhausted = staged.any(|fate| {
                    matches!(
                        fate,
                        Fate::Dead(DeadCause {
                            class: ErrorClass::RetryExhausted,
                            stage: Stage::Postgres,
                            ..
                        })
                    )
                });
                if exhausted {
                    self.pg_breaker.record_failure();
                } else {
                    self.pg_breaker.record_success();
                }
            }
        }

        let mut report = BatchReport::default();
        let now = chrono::Utc::now();
        for i in 0..staged.items.len() {
            // Events that shared an event_id with an earlier one of the batch follow its fate.
            if let Fate::SameAs(first) = staged.items[i].fate {
                staged.items[i].fate = match &staged.items[first].fate {
                    fate @ (Fate::Dead(_) | Fate::Abandoned) => fate.clone(),
                    _ => Fate::Redelivered,
                };
            }
            let item = &staged.items[i];
            match item.fate {
                Fate::InImmudb {
                    tx,
                    written_now: true,
                    ..
                } => {
                    report.stored += 1;
                    report.immudb_tx = report.immudb_tx.max(Some(tx));
                    let age = (now - item.event.event.timestamp_utc())
                        .num_milliseconds()
                        .max(0);
                    metrics().event_age.observe(age as f64 / 1000.0);
                }
                Fate::InImmudb {
                    written_now: false, ..
                }
                | Fate::Redelivered => report.duplicates += 1,
                Fate::Abandoned => report.unconfirmed += 1,
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

        let mut settled = Vec::with_capacity(staged.items.len() + staged.dead.len());
        let mut dead = std::mem::take(&mut staged.dead);
        for item in std::mem::take(&mut staged.items) {
            let Item {
                event,
                ticket,
                fate,
            } = item;
            let Fate::Dead(cause) = fate else {
                settled.push((event.record.topic_partition(), ticket, fate.settlement()));
                continue;
            };
            tracing::warn!(
                event_id = %event.event.event_id,
                trace_id = event.event.trace_id.as_deref(),
                correlation_id = event.event.correlation_id.as_deref(),
                offset = event.record.offset,
                partition = event.record.partition,
                class = cause.class.as_str(),
                stage = cause.stage.as_str(),
                error = %cause.message,
                "event cannot be stored; dead-lettering it"
            );
            dead.push((
                DeadLetter {
                    record: event.record,
                    class: cause.class,
                    stage: cause.stage,
                    kind: cause.kind.to_owned(),
                    message: format!("event_id {}: {}", event.event.event_id, cause.message),
                    attempts: cause.attempts,
                },
                ticket,
            ));
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
            let settlement = if result.is_ok() {
                report.dead_letters += 1;
                metrics()
                    .dlq_events
                    .with_label_values(&[&staged.topic, letter.class.as_str()])
                    .inc();
                Settlement::DeadLettered
            } else {
                report.unconfirmed += 1;
                Settlement::Unsettled
            };
            settled.push((letter.record.topic_partition(), *ticket, settlement));
        }

        self.tracker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .finish(settled);
        self.progress.send_modify(|n| *n += 1);
        report
    }

    /// Waits until immudb's circuit is closed (probing it after each cool-down); false when
    /// the process must stop first, or for good once tampering is suspected.
    async fn immudb_available(&self) -> bool {
        if self.trust.as_deref().is_some_and(Trust::tampered) {
            return false;
        }
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

    /// The half-open probe of immudb's circuit: exercises what the writer needs (a write
    /// permission check that writes nothing), failing for good once tampering is suspected.
    async fn immudb_probe(&self) -> Result<(), String> {
        if self.trust.as_deref().is_some_and(Trust::tampered) {
            return Err(
                "verification failed: tamper suspected, restart after investigating".into(),
            );
        }
        self.immudb.write_probe().await.map_err(|e| e.to_string())
    }

    /// One statement for the group; bisection if PostgreSQL rejects it for a row it does not
    /// name.
    async fn write_postgres_group(&self, items: &mut [Item], mut group: Vec<usize>) {
        if group.is_empty() {
            return;
        }
        let result = {
            let rows: Vec<ReplicaRow<'_>> = group
                .iter()
                .map(|&i| {
                    let (tx, verified) = match items[i].fate {
                        Fate::InImmudb { tx, verified, .. } => (tx, verified),
                        _ => (0, false),
                    };
                    replica_row(&items[i].event, tx, verified)
                })
                .collect();
            loop {
                let result = self
                    .retry
                    .run("postgres insert", || {
                        postgres::insert_batch(&self.pg, &rows)
                    })
                    .await;
                count_operation(&metrics().postgres_operations, "insert", &result);
                match result {
                    // Privileges, a missing table, a read-only server: nothing about these
                    // rows. Dead-lettering would drain the stream; hold the batch behind an
                    // open circuit until an operator fixes the store.
                    Err(failure)
                        if !failure.error.is_transient() && !failure.error.is_data_error() =>
                    {
                        tracing::error!(error = %failure.error, sqlstate = failure.error.sqlstate(), "PostgreSQL refuses the batch for a reason that is not its data; holding it");
                        self.pg_breaker.trip();
                        if !self.postgres_available().await {
                            break None;
                        }
                    }
                    other => break Some(other),
                }
            }
        };
        let Some(result) = result else {
            for &i in &group {
                items[i].fate = Fate::Abandoned;
            }
            return;
        };
        match result {
            Ok(outcome) => {
                for position in outcome.conflicts {
                    items[group[position]].fate = Fate::Dead(DeadCause {
                        class: ErrorClass::Conflict,
                        stage: Stage::Postgres,
                        kind: "conflict",
                        message: "audit_trail already holds this event_id with a different payload digest".into(),
                        attempts: 1,
                    });
                }
            }
            Err(failure) if failure.error.is_transient() => {
                for &i in &group {
                    items[i].fate =
                        dead_fate(ErrorClass::RetryExhausted, Stage::Postgres, &failure);
                }
            }
            Err(failure) if group.len() == 1 => {
                items[group[0]].fate = dead_fate(ErrorClass::Invalid, Stage::Postgres, &failure);
            }
            Err(failure) => {
                tracing::warn!(error = %failure.error, size = group.len(), "PostgreSQL rejected the batch; bisecting to isolate the offending rows");
                let second = group.split_off(group.len() / 2);
                Box::pin(self.write_postgres_group(items, group)).await;
                Box::pin(self.write_postgres_group(items, second)).await;
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
fn mark_in_batch_duplicates<'a>(events: impl Iterator<Item = &'a ValidEvent>) -> Vec<Fate> {
    let mut first_by_id: HashMap<uuid::Uuid, (usize, [u8; 32], i64)> = HashMap::new();
    events
        .enumerate()
        .map(|(i, event)| match first_by_id.get(&event.event.event_id) {
            None => {
                first_by_id.insert(event.event.event_id, (i, event.digest, event.record.offset));
                Fate::Pending
            }
            Some(&(first, digest, _)) if digest == event.digest => Fate::SameAs(first),
            Some(&(_, _, offset)) => Fate::Dead(DeadCause {
                class: ErrorClass::Conflict,
                stage: Stage::Immudb,
                kind: "conflict",
                message: format!(
                    "same event_id as offset {offset} of this batch with different content"
                ),
                attempts: 0,
            }),
        })
        .collect()
}

fn dead_fate<E: std::fmt::Display>(class: ErrorClass, stage: Stage, failure: &Failure<E>) -> Fate {
    Fate::Dead(DeadCause {
        class,
        stage,
        kind: if class == ErrorClass::RetryExhausted {
            "unavailable"
        } else {
            "rejected"
        },
        message: failure.error.to_string(),
        attempts: failure.attempts,
    })
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
        let events = [
            valid(ONE, "plant", b"one", 0),
            valid(TWO, "plant", b"two", 1),
            valid(ONE, "plant", b"one", 2),
            valid(ONE, "plant", b"other", 3),
            // Same event_id under another entity_type: another immudb key, still a conflict.
            valid(TWO, "batch", b"two as a batch", 4),
        ];
        let fates = mark_in_batch_duplicates(events.iter());
        assert!(matches!(fates[0], Fate::Pending));
        assert!(matches!(fates[1], Fate::Pending));
        assert!(matches!(fates[2], Fate::SameAs(0)));
        for conflict in [3, 4] {
            assert!(matches!(
                fates[conflict],
                Fate::Dead(DeadCause {
                    class: ErrorClass::Conflict,
                    ..
                })
            ));
        }
    }

    #[test]
    fn only_events_in_both_stores_settle_here() {
        let stored = Fate::InImmudb {
            tx: 1,
            written_now: true,
            verified: true,
        };
        assert_eq!(stored.settlement(), Settlement::Stored);
        assert_eq!(Fate::Redelivered.settlement(), Settlement::Stored);
        assert_eq!(Fate::Abandoned.settlement(), Settlement::Unsettled);
        assert_eq!(
            Fate::from_outcome(Outcome::Held).settlement(),
            Settlement::Unsettled,
            "a held event never releases its offset"
        );
    }
}
