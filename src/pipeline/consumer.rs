//! The Kafka side: the group consumer, its rebalance hooks, and the thread that polls it.
//!
//! librdkafka calls the rebalance callback from inside `poll`, and a revocation must wait until
//! the revoked partitions' batches are stored and committed. So polling runs on its own OS
//! thread (never blocking the async runtime), and the callback stays thin: it sends the event to
//! the pipeline, blocks on the reply, and commits the offsets the reply carries before librdkafka
//! gives the partitions up. The same thread performs every other commit, so the consumer handle
//! is never shared with (or dropped on) an async task.
//!
//! The thread never blocks on the pipeline: when the pipeline is full (a slow store, an open
//! circuit) or too many payload bytes are in flight, it pauses every assigned partition and
//! keeps polling, so heartbeats, rebalances and `max.poll.interval.ms` are served while Kafka
//! holds the backlog. It resumes when the pipeline has room again.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use secrecy::ExposeSecret;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::backpressure::Backpressure;
pub use super::backpressure::InFlight;
use super::commits::Assignments;
use super::dlq::MAX_RECEIVED_BYTES;
use super::handoff::{Handoff, RevocationSignal};
use super::offsets::{Commit, TopicPartition};
use super::record::SourceRecord;
use crate::config::KafkaSettings;
use crate::http::Health;
use crate::metrics::metrics;

/// What the poll thread tells the pipeline, in the order it happened.
#[derive(Debug)]
pub enum ConsumerEvent {
    Record(SourceRecord),
    /// These partitions are being taken away. Reply with the final offsets to commit for them
    /// once their in-flight events are stored (or the drain's deadline passed); the callback
    /// commits them before giving up.
    Revoked {
        partitions: Vec<TopicPartition>,
        reply: oneshot::Sender<Vec<(TopicPartition, i64)>>,
    },
    /// These partitions are ours now, each under a new epoch.
    Assigned(Vec<(TopicPartition, u64)>),
    /// An error the consumer cannot recover from by itself.
    Fatal(KafkaError),
}

/// What the pipeline asks of the poll thread.
#[derive(Debug)]
pub enum ConsumerCommand {
    /// Commit asynchronously (the committer sends every position again periodically, since a
    /// failed async commit is not reported back). Commits of an assignment that ended are
    /// dropped. The final commit of a partition happens synchronously in the revocation
    /// callback.
    Commit(Vec<Commit>),
}

/// The commit bookkeeping only the poll thread touches.
#[derive(Default)]
struct CommitState {
    assignments: Assignments,
}

/// The librdkafka context: rebalance hooks, commit results and statistics, in front of the
/// handoff to the pipeline and the backpressure controller.
pub struct PipelineContext {
    handoff: Handoff,
    backpressure: Backpressure,
    commits: Mutex<CommitState>,
    health: Arc<Health>,
    /// Set when the poll thread closes the consumer: the last revocation is the shutdown's.
    closing: std::sync::atomic::AtomicBool,
}

impl PipelineContext {
    fn commits(&self) -> std::sync::MutexGuard<'_, CommitState> {
        self.commits
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ClientContext for PipelineContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // -1 is librdkafka's internal "unassigned" partition; negative lag is "unknown".
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics()
                        .consumer_lag
                        .with_label_values(&[topic, &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for PipelineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let partitions = partitions_of(list);
        tracing::info!(partitions = %describe(&partitions), "partitions revoked; draining them before hand-over");
        // Records of these partitions polled earlier are held or queued ahead of the event.
        let closing = self.closing.load(std::sync::atomic::Ordering::SeqCst);
        let answer = self.handoff.revoke(partitions.clone(), closing);
        self.commits().assignments.revoke(&partitions);
        for tp in &partitions {
            let _ = metrics()
                .consumer_lag
                .remove_label_values(&[&tp.topic, &tp.partition.to_string()]);
        }
        if let Some(offsets) = answer.filter(|offsets| !offsets.is_empty()) {
            metrics().offsets_committed.inc_by(offsets.len() as u64);
            match consumer.commit(&to_list(&offsets), CommitMode::Sync) {
                Ok(()) => {
                    tracing::info!(offsets = %describe_offsets(&offsets), "committed revoked partitions")
                }
                Err(error) => tracing::warn!(
                    %error,
                    "commit of revoked partitions failed; their events will be redelivered and deduplicated"
                ),
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions = partitions_of(list);
                tracing::info!(partitions = %describe(&partitions), "partitions assigned");
                self.health.set_in_group(true);
                // New partitions join the pause while the pipeline is backpressured.
                if self.backpressure.is_paused()
                    && let Err(error) = consumer.pause(list)
                {
                    tracing::warn!(%error, "cannot pause newly assigned partitions");
                }
                let epochs = self.commits().assignments.assign(&partitions);
                self.handoff.hold(ConsumerEvent::Assigned(epochs));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(%error, partitions = offsets.count(), "offset commit failed; the committer sends it again");
        }
    }
}

/// How long the pipeline may stay full before the partitions are paused.
const PAUSE_AFTER_STALL: Duration = Duration::from_secs(5);

/// What the consumer shares with the rest of the daemon.
pub struct ConsumerLinks {
    pub events: mpsc::Sender<ConsumerEvent>,
    pub health: Arc<Health>,
    pub in_flight: Arc<InFlight>,
    pub max_in_flight_bytes: u64,
    pub revocation: Arc<RevocationSignal>,
    /// How long the revocation callback waits for the pipeline at most.
    pub revocation_deadline: Duration,
    /// The same when the consumer closes (the shutdown drain answers the final revocation).
    pub close_deadline: Duration,
}

/// Builds the consumer and subscribes to the configured topics.
pub fn create(
    settings: &KafkaSettings,
    instance_id: &str,
    links: ConsumerLinks,
) -> KafkaResult<BaseConsumer<PipelineContext>> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", settings.brokers.join(","))
        .set("group.id", &settings.group_id)
        .set("client.id", instance_id)
        // Offsets are committed by the pipeline, and only for events durably stored (or
        // acknowledged by the DLQ). librdkafka's auto-commit would commit what was merely polled.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", settings.auto_offset_reset.as_str())
        // Producers may write transactionally; aborted audit events must never be stored.
        .set("isolation.level", "read_committed")
        // Incremental rebalancing: a member joining or leaving moves only the partitions that
        // must move, the others keep flowing.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set(
            "session.timeout.ms",
            settings.session_timeout.as_millis().to_string(),
        )
        // A member learns of a rebalance at its next heartbeat: a tenth of the session (3 s by
        // default, librdkafka's own) leaves the revocation its budget within the session.
        .set(
            "heartbeat.interval.ms",
            (settings.session_timeout.as_millis() / 10)
                .max(100)
                .to_string(),
        )
        .set(
            "max.poll.interval.ms",
            settings.max_poll_interval.as_millis().to_string(),
        )
        // Bound what librdkafka prefetches (memory) while keeping batches fed.
        .set("queued.max.messages.kbytes", "8192")
        .set("fetch.max.bytes", "8388608")
        // The largest (decompressed) record batch we accept; the DLQ producer is sized from it.
        .set("receive.message.max.bytes", MAX_RECEIVED_BYTES.to_string())
        // A full prefetch queue postpones the partition's next fetch by this much (1 s by
        // default): after a short stall the queue would run dry long before the fetcher woke.
        .set("fetch.queue.backoff.ms", "20")
        .set("enable.partition.eof", "false")
        // Per-partition consumer lag for `audit_consumer_lag`.
        .set("statistics.interval.ms", "5000");
    for (name, value) in &settings.client_properties {
        config.set(name, value);
    }
    if let Some(password) = &settings.sasl_password {
        config.set("sasl.password", password.expose_secret());
    }
    let context = PipelineContext {
        handoff: Handoff::new(
            links.events,
            links.in_flight.clone(),
            links.health.clone(),
            links.revocation,
            links.revocation_deadline,
            links.close_deadline,
        ),
        backpressure: Backpressure::new(
            links.in_flight,
            links.max_in_flight_bytes,
            settings.batch_size,
        ),
        commits: Mutex::new(CommitState::default()),
        health: links.health,
        closing: std::sync::atomic::AtomicBool::new(false),
    };
    let consumer: BaseConsumer<PipelineContext> = config.create_with_context(context)?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Polls on a dedicated thread until `stop` fires, then closes the consumer (which leaves the
/// group, running the revocation callback once more).
pub fn spawn_poll_thread(
    consumer: BaseConsumer<PipelineContext>,
    mut commands: mpsc::Receiver<ConsumerCommand>,
    stop: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kafka-poll".into())
        .spawn(move || {
            let context = consumer.context();
            let mut pressed_since: Option<std::time::Instant> = None;
            while !stop.is_cancelled() {
                context.health.beat();
                while let Ok(command) = commands.try_recv() {
                    run_command(&consumer, command);
                }
                if !context.handoff.deliver_held() {
                    break;
                }
                // Short stalls (a busy writer) just stop polling: librdkafka's bounded prefetch
                // waits for us. Pausing would purge that prefetch and, on resume, leave the
                // fetcher asleep for up to a second. Only a stall that lasts (an open circuit)
                // pauses the partitions, so that polling — rebalances, max.poll.interval.ms —
                // goes on while Kafka holds the backlog.
                let held = context.handoff.held_len();
                if context.backpressure.wanted(held) {
                    let since = *pressed_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() < PAUSE_AFTER_STALL && !context.backpressure.is_paused() {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    context.backpressure.apply(&consumer, true);
                } else {
                    pressed_since = None;
                    context.backpressure.apply(&consumer, false);
                }
                // While held events wait, poll briefly so they are handed over as soon as there is room.
                let timeout = if held == 0 { 50 } else { 5 };
                match consumer.poll(Duration::from_millis(timeout)) {
                    None => {}
                    Some(Ok(message)) => {
                        let record = SourceRecord::from_message(&message);
                        drop(message);
                        context.handoff.hold(ConsumerEvent::Record(record));
                    }
                    Some(Err(error)) if is_fatal(&error) => {
                        context.handoff.hold(ConsumerEvent::Fatal(error));
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "kafka consumer error; librdkafka retries by itself")
                    }
                }
            }
            while let Ok(command) = commands.try_recv() {
                run_command(&consumer, command);
            }
            context.handoff.drop_records();
            context
                .closing
                .store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::info!("leaving the consumer group");
            drop(consumer);
        })
}

fn run_command(consumer: &BaseConsumer<PipelineContext>, command: ConsumerCommand) {
    match command {
        ConsumerCommand::Commit(commits) => {
            let offsets = consumer.context().commits().assignments.current(commits);
            commit_async(consumer, &offsets);
        }
    }
}

fn commit_async(consumer: &BaseConsumer<PipelineContext>, offsets: &[(TopicPartition, i64)]) {
    if offsets.is_empty() {
        return;
    }
    metrics().offsets_committed.inc_by(offsets.len() as u64);
    if let Err(error) = consumer.commit(&to_list(offsets), CommitMode::Async) {
        tracing::warn!(%error, "offset commit could not be queued; the committer sends it again");
    }
}

/// Errors after which this consumer instance cannot go on (the others are retried inside
/// librdkafka: broker down, transport failures, rebalances).
fn is_fatal(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::Fatal
                | Code::InvalidGroupId
                | Code::GroupAuthorizationFailed
                | Code::TopicAuthorizationFailed
                | Code::SaslAuthenticationFailed
                | Code::Authentication
        )
    )
}

fn partitions_of(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

fn to_list(offsets: &[(TopicPartition, i64)]) -> TopicPartitionList {
    let mut list = TopicPartitionList::with_capacity(offsets.len());
    for (tp, offset) in offsets {
        // Offsets are validated non-negative positions produced by the tracker.
        let _ = list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset));
    }
    list
}

fn describe(partitions: &[TopicPartition]) -> String {
    partitions
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn describe_offsets(offsets: &[(TopicPartition, i64)]) -> String {
    offsets
        .iter()
        .map(|(tp, offset)| format!("{tp}@{offset}"))
        .collect::<Vec<_>>()
        .join(",")
}
