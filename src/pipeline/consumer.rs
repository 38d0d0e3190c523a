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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use secrecy::ExposeSecret;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::offsets::TopicPartition;
use super::record::SourceRecord;
use crate::config::KafkaSettings;
use crate::http::Health;
use crate::metrics::metrics;

/// What the poll thread tells the pipeline, in the order it happened.
#[derive(Debug)]
pub enum ConsumerEvent {
    Record(SourceRecord),
    /// These partitions are being taken away. Reply with the final offsets to commit for them
    /// once their in-flight events are stored; the callback commits them before giving up.
    Revoked {
        partitions: Vec<TopicPartition>,
        reply: oneshot::Sender<Vec<(TopicPartition, i64)>>,
    },
    Assigned(Vec<TopicPartition>),
    /// An error the consumer cannot recover from by itself.
    Fatal(KafkaError),
}

/// What the pipeline asks of the poll thread.
#[derive(Debug)]
pub enum ConsumerCommand {
    /// Commit asynchronously (errors are logged by the commit callback). The final commit of a
    /// partition happens synchronously in the revocation callback.
    Commit(Vec<(TopicPartition, i64)>),
}

/// Payload bytes received from Kafka and not yet handled, shared by the poll thread (adds) and
/// the writers (subtract).
#[derive(Debug, Default)]
pub struct InFlight {
    bytes: AtomicI64,
}

impl InFlight {
    pub fn add(&self, bytes: usize) {
        let now = self.bytes.fetch_add(bytes as i64, Ordering::Relaxed) + bytes as i64;
        metrics().in_flight_bytes.set(now);
    }

    pub fn sub(&self, bytes: usize) {
        let now = self.bytes.fetch_sub(bytes as i64, Ordering::Relaxed) - bytes as i64;
        metrics().in_flight_bytes.set(now);
    }

    pub fn bytes(&self) -> i64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// The librdkafka context: forwards records and rebalances to the pipeline in order, pauses
/// under backpressure, reports lag, logs client errors.
pub struct PipelineContext {
    events: mpsc::Sender<ConsumerEvent>,
    /// Events polled but not yet accepted by the pipeline (full channel), oldest first. Only the
    /// poll thread touches it; the mutex just makes the context `Sync`.
    held: Mutex<VecDeque<ConsumerEvent>>,
    paused: AtomicBool,
    health: Arc<Health>,
    in_flight: Arc<InFlight>,
    max_in_flight_bytes: i64,
    /// Held events that make the poll thread pause fetching.
    pause_after_held: usize,
}

impl PipelineContext {
    fn held(&self) -> std::sync::MutexGuard<'_, VecDeque<ConsumerEvent>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues an event behind the ones already held.
    fn hold(&self, event: ConsumerEvent) {
        if let ConsumerEvent::Record(record) = &event {
            self.in_flight.add(record.payload_bytes().len());
        }
        self.held().push_back(event);
    }

    /// Hands held events to the pipeline until it is full. Returns false once the pipeline is gone.
    fn deliver_held(&self) -> bool {
        let mut held = self.held();
        while let Some(event) = held.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    held.push_front(event);
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    }

    /// Whether fetching should be paused, with hysteresis: pausing purges librdkafka's prefetch,
    /// so a pipeline that is merely busy for a moment must not trigger it. Pause when a whole
    /// batch worth of events is held or the byte cap is exceeded; resume only when nothing is
    /// held and the bytes fell below three quarters of the cap.
    fn backpressured(&self) -> bool {
        let held = self.held().len();
        let bytes = self.in_flight.bytes();
        if self.paused.load(Ordering::Relaxed) {
            held > 0 || bytes > self.max_in_flight_bytes / 4 * 3
        } else {
            held >= self.pause_after_held || bytes > self.max_in_flight_bytes
        }
    }

    /// Pauses or resumes every assigned partition to match the backpressure.
    fn apply_backpressure(&self, consumer: &BaseConsumer<Self>, wanted: bool) {
        if wanted == self.paused.load(Ordering::Relaxed) {
            return;
        }
        let assignment = match consumer.assignment() {
            Ok(assignment) => assignment,
            Err(error) => {
                tracing::warn!(%error, "cannot read the assignment to pause or resume");
                return;
            }
        };
        let result = if wanted {
            consumer.pause(&assignment)
        } else {
            consumer.resume(&assignment)
        };
        match result {
            Ok(()) => {
                self.paused.store(wanted, Ordering::Relaxed);
                metrics().consumer_paused.set(i64::from(wanted));
                tracing::debug!(
                    paused = wanted,
                    in_flight_bytes = self.in_flight.bytes(),
                    "fetching paused/resumed by backpressure"
                );
            }
            Err(error) => tracing::warn!(%error, "cannot pause or resume partitions"),
        }
    }

    /// Delivers `event` after everything held, waiting (and beating) until the pipeline took
    /// it. Used from the rebalance callback, where order matters and the reply must follow.
    fn deliver_in_order(&self, event: ConsumerEvent) -> bool {
        self.held().push_back(event);
        loop {
            self.health.beat();
            if !self.deliver_held() {
                return false;
            }
            if self.held().is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
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
        let (reply, mut answer) = oneshot::channel();
        let event = ConsumerEvent::Revoked {
            partitions: partitions.clone(),
            reply,
        };
        // Records of these partitions polled earlier are held or queued ahead of this event.
        if !self.deliver_in_order(event) {
            return; // the pipeline is gone: nothing in flight can be committed anyway
        }
        let answer = loop {
            self.health.beat();
            match answer.try_recv() {
                Ok(offsets) => break Some(offsets),
                Err(oneshot::error::TryRecvError::Empty) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(oneshot::error::TryRecvError::Closed) => break None,
            }
        };
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
                if self.paused.load(Ordering::Relaxed)
                    && let Err(error) = consumer.pause(list)
                {
                    tracing::warn!(%error, "cannot pause newly assigned partitions");
                }
                self.hold(ConsumerEvent::Assigned(partitions));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(%error, partitions = offsets.count(), "offset commit failed; a later commit supersedes it")
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
        .set(
            "max.poll.interval.ms",
            settings.max_poll_interval.as_millis().to_string(),
        )
        // Bound what librdkafka prefetches (memory) while keeping batches fed.
        .set("queued.max.messages.kbytes", "8192")
        .set("fetch.max.bytes", "8388608")
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
        events: links.events,
        held: Mutex::new(VecDeque::new()),
        paused: AtomicBool::new(false),
        health: links.health,
        in_flight: links.in_flight,
        max_in_flight_bytes: i64::try_from(links.max_in_flight_bytes).unwrap_or(i64::MAX),
        pause_after_held: settings.batch_size,
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
                if !context.deliver_held() {
                    break;
                }
                // Short stalls (a busy writer) just stop polling: librdkafka's bounded prefetch
                // waits for us. Pausing would purge that prefetch and, on resume, leave the
                // fetcher asleep for up to a second. Only a stall that lasts (an open circuit)
                // pauses the partitions, so that polling — rebalances, max.poll.interval.ms —
                // goes on while Kafka holds the backlog.
                if context.backpressured() {
                    let since = *pressed_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() < PAUSE_AFTER_STALL
                        && !context.paused.load(Ordering::Relaxed)
                    {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    context.apply_backpressure(&consumer, true);
                } else {
                    pressed_since = None;
                    context.apply_backpressure(&consumer, false);
                }
                // While held events wait, poll briefly so they are handed over as soon as there is room.
                let timeout = if context.held().is_empty() { 50 } else { 5 };
                match consumer.poll(Duration::from_millis(timeout)) {
                    None => {}
                    Some(Ok(message)) => {
                        let record = SourceRecord::from_message(&message);
                        drop(message);
                        context.hold(ConsumerEvent::Record(record));
                    }
                    Some(Err(error)) if is_fatal(&error) => {
                        context.hold(ConsumerEvent::Fatal(error));
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "kafka consumer error; librdkafka retries by itself")
                    }
                }
            }
            while let Ok(command) = commands.try_recv() {
                run_command(&consumer, command);
            }
            // Records still held were never handed over: not tracked, so never committed.
            context
                .held()
                .retain(|event| !matches!(event, ConsumerEvent::Record(_)));
            tracing::info!("leaving the consumer group");
            drop(consumer);
        })
}

fn run_command(consumer: &BaseConsumer<PipelineContext>, command: ConsumerCommand) {
    match command {
        ConsumerCommand::Commit(offsets) => {
            // A commit queued before a revocation must not land after the revocation's final
            // commit and move the partition back for its new owner.
            let owned = consumer.assignment().unwrap_or_default();
            let offsets: Vec<_> = offsets
                .into_iter()
                .filter(|(tp, _)| owned.find_partition(&tp.topic, tp.partition).is_some())
                .collect();
            if offsets.is_empty() {
                return;
            }
            metrics().offsets_committed.inc_by(offsets.len() as u64);
            if let Err(error) = consumer.commit(&to_list(&offsets), CommitMode::Async) {
                tracing::warn!(%error, "offset commit could not be queued");
            }
        }
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
