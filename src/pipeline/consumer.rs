//! The Kafka side: the group consumer, its rebalance hooks, and the thread that polls it.
//!
//! librdkafka calls the rebalance callback from inside `poll`, and a revocation must wait until
//! the revoked partitions' batches are stored and committed. So polling runs on its own OS
//! thread (never blocking the async runtime), and the callback stays thin: it sends the event to
//! the pipeline, blocks on the reply, and commits the offsets the reply carries before librdkafka
//! gives the partitions up. The same thread performs every other commit, so the consumer handle
//! is never shared with (or dropped on) an async task.

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

/// The librdkafka context: forwards rebalances to the pipeline and logs client errors.
pub struct PipelineContext {
    events: mpsc::Sender<ConsumerEvent>,
}

impl ClientContext for PipelineContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for PipelineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let partitions = partitions_of(list);
        tracing::info!(partitions = %describe(&partitions), "partitions revoked; draining them before hand-over");
        let (reply, answer) = oneshot::channel();
        let event = ConsumerEvent::Revoked { partitions, reply };
        if self.events.blocking_send(event).is_err() {
            return; // the pipeline is gone: nothing in flight can be committed anyway
        }
        match answer.blocking_recv() {
            Ok(offsets) if !offsets.is_empty() => {
                match consumer.commit(&to_list(&offsets), CommitMode::Sync) {
                    Ok(()) => {
                        tracing::info!(offsets = %describe_offsets(&offsets), "committed revoked partitions")
                    }
                    Err(error) => {
                        tracing::warn!(%error, "commit of revoked partitions failed; their events will be redelivered and deduplicated")
                    }
                }
            }
            Ok(_) | Err(_) => {}
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions = partitions_of(list);
                tracing::info!(partitions = %describe(&partitions), "partitions assigned");
                let _ = self
                    .events
                    .blocking_send(ConsumerEvent::Assigned(partitions));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(%error, partitions = offsets.count(), "offset commit failed; a later commit supersedes it");
        }
    }
}

/// Builds the consumer and subscribes to the configured topics.
pub fn create(
    settings: &KafkaSettings,
    instance_id: &str,
    events: mpsc::Sender<ConsumerEvent>,
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
        .set("queued.max.messages.kbytes", "16384")
        .set("fetch.max.bytes", "16777216")
        .set("enable.partition.eof", "false");
    for (name, value) in &settings.client_properties {
        config.set(name, value);
    }
    if let Some(password) = &settings.sasl_password {
        config.set("sasl.password", password.expose_secret());
    }
    let consumer: BaseConsumer<PipelineContext> =
        config.create_with_context(PipelineContext { events })?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Polls on a dedicated thread until `stop` fires, then closes the consumer (which leaves the
/// group, running the revocation callback once more).
pub fn spawn_poll_thread(
    consumer: BaseConsumer<PipelineContext>,
    events: mpsc::Sender<ConsumerEvent>,
    mut commands: mpsc::Receiver<ConsumerCommand>,
    stop: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kafka-poll".into())
        .spawn(move || {
            while !stop.is_cancelled() {
                while let Ok(command) = commands.try_recv() {
                    run_command(&consumer, command);
                }
                match consumer.poll(Duration::from_millis(50)) {
                    None => {}
                    Some(Ok(message)) => {
                        let record = SourceRecord::from_message(&message);
                        drop(message);
                        if events.blocking_send(ConsumerEvent::Record(record)).is_err() {
                            break;
                        }
                    }
                    Some(Err(error)) if is_fatal(&error) => {
                        let _ = events.blocking_send(ConsumerEvent::Fatal(error));
                        break;
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "kafka consumer error; librdkafka retries by itself")
                    }
                }
            }
            while let Ok(command) = commands.try_recv() {
                run_command(&consumer, command);
            }
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
