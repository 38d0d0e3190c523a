//! `replay-dlq`: re-ingests dead letters once their cause is fixed.
//!
//! The DLQ topic is read with a consumer group of its own (default `<group_id>-dlq-replay`), from
//! the group's committed position (the beginning the first time, or always with
//! `--from-beginning`) up to the high watermark taken at start, so records dead-lettered while
//! the replay runs wait for the next one. Each record is decoded again; valid events go through
//! the pipeline's idempotent path: one immudb transaction with `KeyMustNotExist`, existing keys
//! read back and compared byte for byte (same bytes: already stored; other bytes: conflict),
//! then one `INSERT … ON CONFLICT DO NOTHING` into PostgreSQL with the same digest check. The
//! row gets the event's original topic, partition and offset from the DLQ headers.
//!
//! Nothing is dead-lettered again: records that are still invalid and conflicts are reported.
//! A second replay stores nothing new. After processing, the group's offsets are committed up
//! to the first record a `--reason`/`--stage` filter skipped in each partition (so another
//! filter can still replay it); `--dry-run` classifies without writing or committing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use secrecy::ExposeSecret;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::progress::Progress;
use super::{OutputFormat, ToolError, Verdict, connect_immudb, connect_postgres, print_json};
use crate::config::{KafkaSettings, Settings};
use crate::event::{self, AuditEvent, uniqueness_key, uniqueness_value};
use crate::immudb::{ImmudbClient, ImmudbError};
use crate::pipeline::dlq::headers;
use crate::pipeline::immudb_write::{
    Candidate as WriteCandidate, ENTRIES_PER_EVENT, Hold, ImmudbWriter, Outcome,
};
use crate::pipeline::record::SourceRecord;
use crate::postgres::{self, PgError, ReplicaRow};
use crate::resilience::RetryPolicy;
use crate::trust::{Trust, TrustFailure, TrustStore};
use futures::future::BoxFuture;

/// The error classes a dead letter can carry (`dlq.error.class`), for `--reason`.
pub const REASONS: [&str; 3] = ["invalid", "conflict", "retry_exhausted"];
/// The stages a dead letter can name (`dlq.error.stage`), for `--stage`.
pub const STAGES: [&str; 3] = ["decode", "immudb", "postgres"];
/// Records stored per immudb transaction / PostgreSQL statement (capped by the database's
/// per-transaction entry limit).
const CHUNK: usize = 500;
/// A partition that delivers nothing for this long before reaching its end means the broker is
/// not answering: the run cannot complete.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one metadata, watermark, committed-offset or commit request.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);
/// Problems listed in detail in the report.
const MAX_LISTED: usize = 1000;
/// Problems printed in the human report.
const MAX_PRINTED: usize = 50;

/// Arguments of `replay-dlq`.
#[derive(Debug, Clone, Default)]
pub struct ReplayArgs {
    /// Only records whose `dlq.error.class` is this.
    pub reason: Option<String>,
    /// Only records whose `dlq.error.stage` is this.
    pub stage: Option<String>,
    /// Classify without writing to the stores or committing offsets.
    pub dry_run: bool,
    /// The replay's consumer group; default `<kafka.group_id>-dlq-replay`.
    pub group: Option<String>,
    /// Ignore the group's committed offsets and read the whole topic.
    pub from_beginning: bool,
}

/// Counts for one (class, stage) of dead letters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReasonCounts {
    /// `dlq.error.class` of the records.
    pub class: String,
    /// `dlq.error.stage` of the records.
    pub stage: String,
    /// Records read (and selected by the filters).
    pub read: u64,
    /// Stored now in at least one store (with `--dry-run`: would be stored).
    pub stored: u64,
    /// Already in both stores with the same bytes.
    pub duplicate: u64,
    /// Still not a valid event, or still rejected by a store.
    pub still_invalid: u64,
    /// The same `event_id` is stored with different content.
    pub conflicting: u64,
}

/// A record that did not get stored.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// `still_invalid` or `conflicting`.
    pub kind: &'static str,
    /// DLQ partition of the record.
    pub dlq_partition: i32,
    /// DLQ offset of the record.
    pub dlq_offset: i64,
    /// Where the record came from originally (`topic/partition@offset`), from its headers.
    pub original: String,
    /// The event, when the payload decodes.
    pub event_id: Option<Uuid>,
    /// Why, one sentence.
    pub detail: String,
}

/// Everything `replay-dlq` did, as printed with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// `clean` (everything selected is stored) or `findings`.
    pub verdict: &'static str,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// The DLQ topic.
    pub dlq_topic: String,
    /// The replay's consumer group.
    pub group: String,
    /// Records read up to the high watermark.
    pub records_read: u64,
    /// Records left alone by `--reason` / `--stage`.
    pub skipped_by_filter: u64,
    /// Counts per (class, stage).
    pub by_reason: Vec<ReasonCounts>,
    /// Totals over all reasons.
    pub total: ReasonCounts,
    /// Records that did not get stored, at most 1000.
    pub problems: Vec<Problem>,
    /// Whether problems were left out of the list.
    pub problems_truncated: bool,
    /// Offsets committed for the group, `partition → next offset`.
    pub committed: BTreeMap<i32, i64>,
    /// Whether the DLQ topic exists (it is created by the first dead letter).
    pub topic_exists: bool,
}

/// Runs `replay-dlq` and prints its report.
pub async fn run(
    settings: &Settings,
    args: &ReplayArgs,
    output: OutputFormat,
) -> Result<Verdict, ToolError> {
    for (value, allowed, flag) in [
        (&args.reason, &REASONS, "--reason"),
        (&args.stage, &STAGES, "--stage"),
    ] {
        if let Some(value) = value
            && !allowed.contains(&value.as_str())
        {
            return Err(ToolError::Usage(format!(
                "{flag} {value}: expected one of {}",
                allowed.join(", ")
            )));
        }
    }
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| format!("{}-dlq-replay", settings.kafka.group_id));
    let pg = connect_postgres(&settings.postgres).await?;
    let immudb = connect_immudb(&settings.immudb).await?;
    let consumer = replay_consumer(&settings.kafka, &settings.instance_id, &group)
        .map_err(|e| ToolError::Usage(format!("creating the DLQ consumer: {e}")))?;
    let trust = if settings.immudb.verify {
        let store = TrustStore::new(pg.clone());
        let established = crate::audit::establish_trust(&immudb, &store, None)
            .await
            .map_err(|e| match e {
                crate::audit::TrustError::Immudb(error) => {
                    ToolError::immudb("establishing trust in immudb", &error)
                }
                crate::audit::TrustError::Postgres(error) => {
                    ToolError::postgres("reading immudb_trusted_state", &error)
                }
                other => ToolError::Incomplete(format!("establishing trust in immudb: {other}")),
            })?;
        Some(Trust::new(
            established.current,
            established.row,
            Box::new(store),
            Box::new(immudb.clone()),
        ))
    } else {
        None
    };
    let mut replay = Replay {
        store: Store {
            immudb: immudb.clone(),
            pg: pg.clone(),
            retry: RetryPolicy::new(settings.retry),
            chunk: CHUNK.min((immudb.limits().max_tx_entries / ENTRIES_PER_EVENT).max(1)),
            trust,
        },
        args: args.clone(),
        counts: BTreeMap::new(),
        report: ReplayReport {
            verdict: "clean",
            dry_run: args.dry_run,
            dlq_topic: settings.kafka.dlq_topic.clone(),
            group,
            records_read: 0,
            skipped_by_filter: 0,
            by_reason: Vec::new(),
            total: ReasonCounts::default(),
            problems: Vec::new(),
            problems_truncated: false,
            committed: BTreeMap::new(),
            topic_exists: true,
        },
    };
    let result = replay.replay(&consumer).await;
    immudb.close().await;
    pg.close().await;
    result?;
    let mut report = replay.report;
    report.by_reason = replay.counts.into_values().collect();
    let mut total = ReasonCounts {
        class: "all".into(),
        stage: "all".into(),
        ..ReasonCounts::default()
    };
    for c in &report.by_reason {
        total.read += c.read;
        total.stored += c.stored;
        total.duplicate += c.duplicate;
        total.still_invalid += c.still_invalid;
        total.conflicting += c.conflicting;
    }
    let verdict = Verdict::from_findings(total.still_invalid + total.conflicting > 0);
    report.total = total;
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

/// A consumer of the DLQ in the replay's own group. Partitions are assigned, not subscribed:
/// no rebalance to wait for, and the group is only used to remember where the replay got to.
fn replay_consumer(
    settings: &KafkaSettings,
    instance_id: &str,
    group: &str,
) -> Result<BaseConsumer, KafkaError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", settings.brokers.join(","))
        .set("group.id", group)
        .set("client.id", format!("{instance_id}-dlq-replay"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        // The end of each partition is reported, so the replay knows when it is done.
        .set("enable.partition.eof", "true");
    for (name, value) in &settings.client_properties {
        config.set(name, value);
    }
    if let Some(password) = &settings.sasl_password {
        config.set("sasl.password", password.expose_secret());
    }
    config.create()
}

/// Where one DLQ partition is and may be committed to.
#[derive(Debug, Clone)]
struct PartitionState {
    /// First offset past the last record of the run (the high watermark at start).
    end: i64,
    /// Next offset to read.
    next: i64,
    /// The offset every record before which is fully handled (stored, reported, or a problem).
    committable: i64,
    /// The first record a filter skipped: the commit stops there.
    first_skipped: Option<i64>,
    done: bool,
}

struct Replay {
    store: Store,
    args: ReplayArgs,
    counts: BTreeMap<(String, String), ReasonCounts>,
    report: ReplayReport,
}

/// A dead letter selected for replay.
struct Letter {
    record: SourceRecord,
    class: String,
    stage: String,
}

impl Replay {
    async fn replay(&mut self, consumer: &BaseConsumer) -> Result<(), ToolError> {
        let topic = self.report.dlq_topic.clone();
        let Some(mut partitions) = self.positions(consumer, &topic)? else {
            self.report.topic_exists = false;
            return Ok(());
        };
        let mut assignment = TopicPartitionList::new();
        for (&p, state) in &partitions {
            if !state.done {
                assignment
                    .add_partition_offset(&topic, p, Offset::Offset(state.next))
                    .map_err(|e| ToolError::Incomplete(format!("assigning the DLQ: {e}")))?;
            }
        }
        if assignment.count() > 0 {
            consumer
                .assign(&assignment)
                .map_err(|e| ToolError::Incomplete(format!("assigning the DLQ: {e}")))?;
        }
        let total: i64 = partitions.values().map(|s| s.end - s.next).sum();
        let mut progress = Progress::new();
        let result = self
            .consume(consumer, &mut partitions, total, &mut progress)
            .await;
        progress.finish();
        // Even after a failure, what was handled is committed: a rerun continues from there.
        if !self.args.dry_run {
            self.commit(consumer, &topic, &partitions)?;
        }
        result
    }

    /// The partitions of the DLQ and where to read each from and to; `None` when the topic
    /// does not exist yet (nothing was ever dead-lettered).
    fn positions(
        &self,
        consumer: &BaseConsumer,
        topic: &str,
    ) -> Result<Option<BTreeMap<i32, PartitionState>>, ToolError> {
        let unreachable = |what: &str, e: KafkaError| {
            ToolError::Incomplete(format!("{what} of the DLQ topic {topic}: {e}"))
        };
        let metadata =
            tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), KAFKA_TIMEOUT))
                .map_err(|e| unreachable("reading the metadata", e))?;
        let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(None);
        };
        if meta.error().is_some() || meta.partitions().is_empty() {
            return Ok(None);
        }
        let ids: Vec<i32> = meta.partitions().iter().map(|p| p.id()).collect();
        let committed: HashMap<i32, i64> = if self.args.from_beginning {
            HashMap::new()
        } else {
            let mut list = TopicPartitionList::new();
            for &p in &ids {
                list.add_partition(topic, p);
            }
            tokio::task::block_in_place(|| consumer.committed_offsets(list, KAFKA_TIMEOUT))
                .map_err(|e| unreachable("reading the replay group's offsets", e))?
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect()
        };
        let mut out = BTreeMap::new();
        for p in ids {
            let (low, high) =
                tokio::task::block_in_place(|| consumer.fetch_watermarks(topic, p, KAFKA_TIMEOUT))
                    .map_err(|e| unreachable("reading the watermarks", e))?;
            let start = committed.get(&p).copied().unwrap_or(low).max(low);
            out.insert(
                p,
                PartitionState {
                    end: high,
                    next: start,
                    committable: start,
                    first_skipped: None,
                    done: start >= high,
                },
            );
        }
        Ok(Some(out))
    }

    async fn consume(
        &mut self,
        consumer: &BaseConsumer,
        partitions: &mut BTreeMap<i32, PartitionState>,
        total: i64,
        progress: &mut Progress,
    ) -> Result<(), ToolError> {
        let mut last_record = Instant::now();
        let mut chunk: Vec<Letter> = Vec::new();
        while partitions.values().any(|s| !s.done) {
            let polled = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(500)));
            match polled {
                None => {
                    if last_record.elapsed() > STALL_TIMEOUT {
                        return Err(ToolError::Incomplete(format!(
                            "the DLQ delivered nothing for {}s before its end",
                            STALL_TIMEOUT.as_secs()
                        )));
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    if let Some(state) = partitions.get_mut(&p) {
                        state.done = true;
                    }
                }
                Some(Err(e)) => {
                    // librdkafka reports broker trouble here and keeps retrying by itself; the
                    // stall timeout decides when to give up.
                    tracing::warn!(error = %e, "DLQ consumer error");
                    if last_record.elapsed() > STALL_TIMEOUT {
                        return Err(ToolError::Incomplete(format!("reading the DLQ: {e}")));
                    }
                }
                Some(Ok(message)) => {
                    last_record = Instant::now();
                    let Some(state) = partitions.get_mut(&message.partition()) else {
                        continue;
                    };
                    if state.done || message.offset() >= state.end {
                        // Dead-lettered after the start: left for the next replay.
                        state.done = true;
                        continue;
                    }
                    state.next = message.offset() + 1;
                    if state.next >= state.end {
                        state.done = true;
                    }
                    self.report.records_read += 1;
                    let record = SourceRecord::from_message(&message);
                    let class = record
                        .header_str(headers::ERROR_CLASS)
                        .unwrap_or("unknown")
                        .to_owned();
                    let stage = record
                        .header_str(headers::ERROR_STAGE)
                        .unwrap_or("unknown")
                        .to_owned();
                    let selected = self.args.reason.as_ref().is_none_or(|r| *r == class)
                        && self.args.stage.as_ref().is_none_or(|s| *s == stage);
                    if !selected {
                        self.report.skipped_by_filter += 1;
                        state.first_skipped.get_or_insert(record.offset);
                        continue;
                    }
                    chunk.push(Letter {
                        record,
                        class,
                        stage,
                    });
                }
            }
            let finished = partitions.values().all(|s| s.done);
            if chunk.len() >= self.store.chunk || (finished && !chunk.is_empty()) {
                self.process(std::mem::take(&mut chunk)).await?;
            }
            if chunk.is_empty() {
                // Everything read so far is handled.
                for state in partitions.values_mut() {
                    state.committable = state.next;
                }
            }
            let (read, skipped) = (self.report.records_read, self.report.skipped_by_filter);
            progress.update(|| {
                format!("replay-dlq: {read}/{total} records read, {skipped} skipped by the filters")
            });
        }
        Ok(())
    }

    fn commit(
        &mut self,
        consumer: &BaseConsumer,
        topic: &str,
        partitions: &BTreeMap<i32, PartitionState>,
    ) -> Result<(), ToolError> {
        let mut list = TopicPartitionList::new();
        for (&p, state) in partitions {
            let position = state
                .first_skipped
                .map_or(state.committable, |skipped| skipped.min(state.committable));
            list.add_partition_offset(topic, p, Offset::Offset(position))
                .map_err(|e| ToolError::Incomplete(format!("committing the replay: {e}")))?;
            self.report.committed.insert(p, position);
        }
        if list.count() == 0 {
            return Ok(());
        }
        tokio::task::block_in_place(|| consumer.commit(&list, CommitMode::Sync)).map_err(|e| {
            ToolError::Incomplete(format!("committing the replay group's offsets: {e}"))
        })
    }

    fn counts(&mut self, letter: &Letter) -> &mut ReasonCounts {
        self.counts
            .entry((letter.class.clone(), letter.stage.clone()))
            .or_insert_with(|| ReasonCounts {
                class: letter.class.clone(),
                stage: letter.stage.clone(),
                ..ReasonCounts::default()
            })
    }

    fn problem(
        &mut self,
        letter: &Letter,
        kind: &'static str,
        event_id: Option<Uuid>,
        detail: String,
    ) {
        let counts = self.counts(letter);
        match kind {
            "conflicting" => counts.conflicting += 1,
            _ => counts.still_invalid += 1,
        }
        if self.report.problems.len() >= MAX_LISTED {
            self.report.problems_truncated = true;
            return;
        }
        let r = &letter.record;
        let original = format!(
            "{}/{}@{}",
            r.header_str(headers::ORIGINAL_TOPIC).unwrap_or("?"),
            r.header_str(headers::ORIGINAL_PARTITION).unwrap_or("?"),
            r.header_str(headers::ORIGINAL_OFFSET).unwrap_or("?"),
        );
        self.report.problems.push(Problem {
            kind,
            dlq_partition: r.partition,
            dlq_offset: r.offset,
            original,
            event_id,
            detail,
        });
    }

    /// Decodes a chunk of dead letters and stores (or, dry, classifies) the valid ones.
    async fn process(&mut self, letters: Vec<Letter>) -> Result<(), ToolError> {
        let mut events: Vec<Candidate> = Vec::with_capacity(letters.len());
        let mut first_by_id: HashMap<Uuid, usize> = HashMap::new();
        let mut followers: Vec<(Letter, Uuid, usize)> = Vec::new();
        for letter in letters {
            self.counts(&letter).read += 1;
            let event = match event::decode(letter.record.payload_bytes()) {
                Ok(event) => event,
                Err(e) => {
                    self.problem(&letter, "still_invalid", None, format!("decode: {e}"));
                    continue;
                }
            };
            let digest = event::payload_sha256(letter.record.payload_bytes());
            // Copies of one event_id in a chunk (a record dead-lettered twice): the first is
            // stored, same-bytes copies follow it, different bytes conflict with it.
            if let Some(&first) = first_by_id.get(&event.event_id) {
                if events[first].digest == digest {
                    followers.push((letter, event.event_id, first));
                } else {
                    let detail = format!(
                        "same event_id as DLQ offset {} with different content",
                        events[first].letter.record.offset
                    );
                    self.problem(&letter, "conflicting", Some(event.event_id), detail);
                }
                continue;
            }
            first_by_id.insert(event.event_id, events.len());
            events.push(Candidate {
                key: event.immudb_key(),
                digest,
                event,
                letter,
                fate: Fate::Pending,
            });
        }
        if self.args.dry_run {
            self.store.classify(&mut events).await?;
        } else {
            self.store.store(&mut events).await?;
        }
        for candidate in &events {
            let id = candidate.event.event_id;
            match &candidate.fate {
                Fate::Stored => self.counts(&candidate.letter).stored += 1,
                Fate::Duplicate => self.counts(&candidate.letter).duplicate += 1,
                Fate::Pending => {}
                Fate::Invalid(detail) => {
                    self.problem(&candidate.letter, "still_invalid", Some(id), detail.clone())
                }
                Fate::Conflict(detail) => {
                    self.problem(&candidate.letter, "conflicting", Some(id), detail.clone())
                }
            }
        }
        for (letter, id, first) in followers {
            match &events[first].fate {
                Fate::Invalid(detail) => {
                    self.problem(&letter, "still_invalid", Some(id), detail.clone())
                }
                Fate::Conflict(detail) => {
                    self.problem(&letter, "conflicting", Some(id), detail.clone())
                }
                _ => self.counts(&letter).duplicate += 1,
            }
        }
        Ok(())
    }
}

/// What became of a valid event.
#[derive(Debug, Clone)]
enum Fate {
    Pending,
    /// Written now to at least one store (dry run: would be).
    Stored,
    /// Already in both stores with the same bytes.
    Duplicate,
    /// A store still rejects it.
    Invalid(String),
    /// Its event_id or key is stored with other content.
    Conflict(String),
}

struct Candidate {
    letter: Letter,
    event: AuditEvent,
    key: String,
    digest: [u8; 32],
    fate: Fate,
}

/// The stores, reached through the pipeline's own immudb writer and the same retry policy.
struct Store {
    immudb: ImmudbClient,
    pg: PgPool,
    retry: RetryPolicy,
    chunk: usize,
    /// The trusted state when writes are verified (`IMMUDB_VERIFY`), shared with the daemons
    /// through the same row.
    trust: Option<Trust>,
}

/// A tool does not wait for an operator: a login immudb refuses ends the run (exit 2 or 3).
#[derive(Default)]
struct GiveUp {
    refused: std::sync::Mutex<Option<String>>,
}

impl Hold for GiveUp {
    fn store_refused<'a>(&'a self, why: &'a ImmudbError) -> BoxFuture<'a, bool> {
        *self
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(why.to_string());
        Box::pin(async { false })
    }
}

impl Store {
    /// The idempotent write: immudb (per event: written now, or its transaction if the same
    /// bytes are there, proven), then PostgreSQL for every event immudb holds.
    async fn store(&self, events: &mut [Candidate]) -> Result<(), ToolError> {
        let hold = GiveUp::default();
        let writer = ImmudbWriter {
            immudb: &self.immudb,
            trust: self.trust.as_ref(),
            retry: &self.retry,
            hold: &hold,
        };
        let candidates: Vec<WriteCandidate<'_>> = events
            .iter()
            .map(|c| WriteCandidate {
                event_id: c.event.event_id,
                audit_key: &c.key,
                payload: c.letter.record.payload_bytes(),
                digest: &c.digest,
            })
            .collect();
        let outcomes = writer.write(&candidates).await;
        drop(candidates);
        let mut in_immudb: Vec<Option<(u64, bool, bool)>> = vec![None; events.len()];
        for (i, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Outcome::Stored { tx, now, verified } => in_immudb[i] = Some((tx, now, verified)),
                Outcome::Conflict(detail) => events[i].fate = Fate::Conflict(detail),
                Outcome::Invalid(detail) => {
                    events[i].fate = Fate::Invalid(format!("immudb: {detail}"))
                }
                Outcome::Unavailable { message, .. } => {
                    return Err(ToolError::Incomplete(format!(
                        "writing to immudb: {message}"
                    )));
                }
                Outcome::Held | Outcome::Pending => {
                    let why = hold
                        .refused
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .clone()
                        .unwrap_or_else(|| {
                            "immudb failed verification against the trusted state: tamper or \
                             rollback suspected"
                                .into()
                        });
                    return Err(ToolError::Usage(format!("writing to immudb: {why}")));
                }
            }
        }
        if let Some(trust) = &self.trust
            && let Some(newest) = in_immudb
                .iter()
                .flatten()
                .filter(|(_, _, verified)| *verified)
                .map(|(tx, _, _)| *tx)
                .max()
        {
            trust.settle(newest).await.map_err(|e| match e {
                TrustFailure::Tampered(detail) => ToolError::Usage(format!(
                    "the trusted immudb state: tamper suspected: {detail}"
                )),
                other => ToolError::Incomplete(format!("the trusted immudb state: {other}")),
            })?;
        }
        let group: Vec<usize> = (0..events.len())
            .filter(|&i| in_immudb[i].is_some())
            .collect();
        self.write_postgres(events, &in_immudb, group).await
    }

    /// Rows already in PostgreSQL are judged by digest first, so each event is counted as
    /// stored or duplicate exactly; the rest goes in with one `insert_batch`.
    async fn write_postgres(
        &self,
        events: &mut [Candidate],
        in_immudb: &[Option<(u64, bool, bool)>],
        group: Vec<usize>,
    ) -> Result<(), ToolError> {
        if group.is_empty() {
            return Ok(());
        }
        let existing = self.existing_digests(events, &group).await?;
        let mut to_insert = Vec::new();
        for i in group {
            let written_now = in_immudb[i].is_some_and(|(_, now, _)| now);
            match existing.get(&events[i].event.event_id) {
                Some(digest) if digest.as_slice() == events[i].digest.as_slice() => {
                    events[i].fate = if written_now {
                        Fate::Stored
                    } else {
                        Fate::Duplicate
                    };
                }
                Some(_) => {
                    events[i].fate = Fate::Conflict(
                        "audit_trail already holds this event_id with a different payload digest"
                            .into(),
                    );
                }
                None => to_insert.push(i),
            }
        }
        self.insert(events, in_immudb, to_insert).await
    }

    async fn existing_digests(
        &self,
        events: &[Candidate],
        group: &[usize],
    ) -> Result<HashMap<Uuid, Vec<u8>>, ToolError> {
        let ids: Vec<Uuid> = group.iter().map(|&i| events[i].event.event_id).collect();
        let (ids, pg) = (&ids, &self.pg);
        let rows = self
            .retry
            .run("postgres lookup", || async move {
                sqlx::query_as::<_, (Uuid, Vec<u8>)>(
                    "SELECT event_id, payload_sha256 FROM audit_trail WHERE event_id = ANY($1)",
                )
                .bind(ids)
                .fetch_all(pg)
                .await
                .map_err(PgError::from)
            })
            .await
            .map_err(|f| ToolError::postgres("reading audit_trail", &f.error))?;
        Ok(rows.into_iter().collect())
    }

    /// One statement; rows PostgreSQL rejects for their data are isolated by bisection, like
    /// the pipeline does, and stay invalid.
    async fn insert(
        &self,
        events: &mut [Candidate],
        in_immudb: &[Option<(u64, bool, bool)>],
        mut group: Vec<usize>,
    ) -> Result<(), ToolError> {
        if group.is_empty() {
            return Ok(());
        }
        let result = {
            let rows: Vec<ReplicaRow<'_>> = group
                .iter()
                .map(|&i| {
                    let (tx, _, verified) = in_immudb[i].unwrap_or((0, false, false));
                    replica_row(&events[i], tx, verified)
                })
                .collect();
            self.retry
                .run("postgres insert", || {
                    postgres::insert_batch(&self.pg, &rows)
                })
                .await
        };
        match result {
            Ok(outcome) => {
                let conflicts: HashSet<usize> =
                    outcome.conflicts.iter().map(|&p| group[p]).collect();
                for i in group {
                    events[i].fate = if conflicts.contains(&i) {
                        Fate::Conflict(
                            "audit_trail already holds this event_id with a different payload digest"
                                .into(),
                        )
                    } else {
                        Fate::Stored
                    };
                }
                Ok(())
            }
            Err(f) if f.error.is_data_error() && group.len() == 1 => {
                events[group[0]].fate = Fate::Invalid(format!("postgres: {}", f.error));
                Ok(())
            }
            Err(f) if f.error.is_data_error() => {
                let second = group.split_off(group.len() / 2);
                Box::pin(self.insert(events, in_immudb, group)).await?;
                Box::pin(self.insert(events, in_immudb, second)).await
            }
            Err(f) => Err(ToolError::postgres("writing to PostgreSQL", &f.error)),
        }
    }

    /// `--dry-run`: what [`store`](Self::store) would do, from reads only. It cannot foresee a
    /// store rejecting a row it has not seen.
    async fn classify(&self, events: &mut [Candidate]) -> Result<(), ToolError> {
        if events.is_empty() {
            return Ok(());
        }
        let keys: Vec<Vec<u8>> = events
            .iter()
            .flat_map(|c| {
                [
                    c.key.as_bytes().to_vec(),
                    uniqueness_key(c.event.event_id).into_bytes(),
                ]
            })
            .collect();
        let existing = self
            .retry
            .run("immudb get_all", || self.immudb.get_all(&keys))
            .await
            .map_err(|f| ToolError::immudb("reading from immudb", &f.error))?;
        let in_immudb: HashMap<&[u8], &[u8]> = existing
            .iter()
            .map(|e| (e.key.as_slice(), e.value.as_slice()))
            .collect();
        let all: Vec<usize> = (0..events.len()).collect();
        let in_pg = self.existing_digests(events, &all).await?;
        for c in events.iter_mut() {
            let immudb = in_immudb.get(c.key.as_bytes()).copied();
            let unique = in_immudb
                .get(uniqueness_key(c.event.event_id).as_bytes())
                .copied();
            let pg = in_pg.get(&c.event.event_id);
            c.fate = match (immudb, pg) {
                _ if unique.is_some_and(|value| value != uniqueness_value(&c.digest)) => {
                    Fate::Conflict(format!(
                        "immudb already holds event {} with another payload",
                        c.event.event_id
                    ))
                }
                (Some(value), _) if value != c.letter.record.payload_bytes() => Fate::Conflict(
                    format!("immudb already holds {} with different content", c.key),
                ),
                (_, Some(digest)) if digest.as_slice() != c.digest.as_slice() => Fate::Conflict(
                    "audit_trail already holds this event_id with a different payload digest"
                        .into(),
                ),
                (Some(_), Some(_)) => Fate::Duplicate,
                _ => Fate::Stored,
            };
        }
        Ok(())
    }
}

/// The row the pipeline would have written: the event's original Kafka coordinates come from
/// the DLQ headers (the DLQ record's own when they are missing or unusable).
fn replica_row(c: &Candidate, tx: u64, verified: bool) -> ReplicaRow<'_> {
    let r = &c.letter.record;
    let topic = r.header_str(headers::ORIGINAL_TOPIC).unwrap_or(&r.topic);
    let partition = r
        .header_str(headers::ORIGINAL_PARTITION)
        .and_then(|p| p.parse::<i32>().ok())
        .filter(|p| *p >= 0);
    let offset = r
        .header_str(headers::ORIGINAL_OFFSET)
        .and_then(|o| o.parse::<i64>().ok())
        .filter(|o| *o >= 0);
    let (topic, partition, offset) = match (partition, offset) {
        (Some(p), Some(o)) => (topic, p, o),
        _ => (r.topic.as_str(), r.partition, r.offset),
    };
    ReplicaRow {
        event: &c.event,
        immudb_key: &c.key,
        immudb_tx: tx,
        immudb_verified: verified,
        payload_sha256: &c.digest,
        topic,
        partition,
        offset,
    }
}

fn render_human(r: &ReplayReport) -> String {
    let mut o = String::new();
    out!(
        o,
        "replay-dlq  topic \"{}\"  group \"{}\"{}",
        r.dlq_topic,
        r.group,
        if r.dry_run {
            "  (DRY RUN: nothing written, nothing committed)"
        } else {
            ""
        }
    );
    out!(
        o,
        "  {} records read up to the high watermark, {} skipped by the filters",
        r.records_read,
        r.skipped_by_filter
    );
    if !r.topic_exists {
        out!(
            o,
            "  the DLQ topic does not exist: nothing was ever dead-lettered"
        );
    }
    let stored = if r.dry_run { "would store" } else { "stored" };
    out!(o);
    out!(
        o,
        "  {:<16} {:<9} {:>7} {:>11} {:>10} {:>14} {:>12}",
        "class",
        "stage",
        "read",
        stored,
        "duplicate",
        "still invalid",
        "conflicting"
    );
    for c in r.by_reason.iter().chain(std::iter::once(&r.total)) {
        out!(
            o,
            "  {:<16} {:<9} {:>7} {:>11} {:>10} {:>14} {:>12}",
            c.class,
            c.stage,
            c.read,
            c.stored,
            c.duplicate,
            c.still_invalid,
            c.conflicting
        );
    }
    if !r.problems.is_empty() {
        out!(o);
        for p in r.problems.iter().take(MAX_PRINTED) {
            let id = super::compare::or_dash(p.event_id);
            out!(
                o,
                "  {:<14} DLQ {}@{}  from {}  event {id}",
                p.kind.to_uppercase().replace('_', " "),
                p.dlq_partition,
                p.dlq_offset,
                p.original
            );
            out!(o, "      {}", super::compare::truncate(&p.detail, 300));
        }
        if r.problems.len() > MAX_PRINTED || r.problems_truncated {
            out!(o, "  … more not shown (use --json for up to {MAX_LISTED})");
        }
    }
    if !r.committed.is_empty() {
        let positions: Vec<String> = r
            .committed
            .iter()
            .map(|(p, o)| format!("partition {p} → {o}"))
            .collect();
        out!(o);
        out!(o, "  committed for the group: {}", positions.join(", "));
    }
    if r.total.still_invalid + r.total.conflicting > 0 {
        out!(
            o,
            "verdict: FINDINGS — some dead letters cannot be stored (listed above)"
        );
    } else if r.dry_run {
        out!(
            o,
            "verdict: CLEAN — every selected dead letter can be stored"
        );
    } else {
        out!(o, "verdict: CLEAN — every selected dead letter is stored");
    }
    o
}
