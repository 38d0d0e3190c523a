//! The consume → decode → batch → store → commit loop.
//!
//! ```text
//! kafka-poll thread ──records, rebalances──▶ dispatcher ──batches──▶ one writer task per topic
//!        ▲                                     │ (decode, batch)           │ immudb → PG → DLQ
//!        └──────────── commits ◀── committer ◀─┴──── offsets done ◀────────┘
//! ```
//! Every queue is bounded, and so are the payload bytes in flight (`PIPELINE_MAX_IN_FLIGHT_BYTES`):
//! a slow store fills its topic's writer queue and parking, which stops the dispatcher, which
//! stops the poll thread, which stops fetching. A topic that is only briefly slower parks a few
//! batches instead, so the other topics' records behind it keep flowing.

pub mod backpressure;
pub mod batcher;
pub mod commits;
pub mod consumer;
pub mod dlq;
pub mod handoff;
pub mod immudb_write;
pub mod offsets;
pub mod record;
pub mod writer;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::error::KafkaError;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::batcher::{Batch, Batcher};
use self::consumer::{ConsumerCommand, ConsumerEvent, InFlight};
use self::dlq::{DeadLetter, DlqProducer, ErrorClass, Stage};
use self::handoff::RevocationSignal;
use self::offsets::{OffsetTracker, TopicPartition};
use self::record::SourceRecord;
use self::writer::{BatchItem, StoreContext, ValidEvent};
use crate::config::Settings;
use crate::event;
use crate::http::Health;
use crate::immudb::ImmudbClient;
use crate::resilience::{CircuitBreaker, RetryPolicy};

/// Why the pipeline stopped other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("cannot start the kafka poll thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the writer of topic {topic} stopped unexpectedly; its batches stay uncommitted")]
    WriterGone { topic: String },
    #[error(
        "halted: {count} invalid events in a row on {partition} (last at offset {offset}); a producer is \
         probably broken. Fix it, then restart (DLQ_MAX_CONSECUTIVE_INVALID={cap})"
    )]
    InvalidFlood {
        partition: TopicPartition,
        offset: i64,
        count: u64,
        cap: u64,
    },
}

/// The stores and the DLQ, connected.
pub struct Sinks {
    pub immudb: ImmudbClient,
    pub pg: sqlx::PgPool,
    pub dlq: DlqProducer,
}

/// State the pipeline shares with the HTTP sidecar.
pub struct Shared {
    pub health: Arc<Health>,
    pub immudb_breaker: Arc<CircuitBreaker>,
    pub pg_breaker: Arc<CircuitBreaker>,
    /// The trusted immudb state when writes are verified.
    pub trust: Option<Arc<crate::trust::Trust>>,
}

/// How long a revocation may take to drain its partitions before it answers with the positions
/// reached: a third of the session timeout, so that noticing the rebalance (a heartbeat, a
/// tenth of it), the drain and the second round of the cooperative protocol together end
/// within the session timeout (the new owner waits for all of it), and never more than the
/// shutdown timeout.
pub fn revocation_budget(settings: &Settings) -> Duration {
    (settings.kafka.session_timeout / 3).min(settings.shutdown_timeout)
}

/// Runs until `shutdown` fires (then drains, commits and leaves the group) or a fatal error.
pub async fn run(
    settings: &Settings,
    sinks: Sinks,
    shared: &Shared,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let kafka = &settings.kafka;
    let (events_tx, events) = mpsc::channel(kafka.batch_size * 2);
    let (commands_tx, commands) = mpsc::channel(64);
    let in_flight = Arc::new(InFlight::default());
    let revocation = Arc::new(RevocationSignal::default());
    let links = consumer::ConsumerLinks {
        events: events_tx,
        health: shared.health.clone(),
        in_flight: in_flight.clone(),
        max_in_flight_bytes: settings.pipeline.max_in_flight_bytes,
        revocation: revocation.clone(),
        // The pipeline answers within its budget; this only guards against a stuck dispatcher
        // (the drain deadline still answers a final revocation in time).
        revocation_deadline: revocation_budget(settings) + REVOCATION_GRACE,
        close_deadline: settings.shutdown_timeout + POLL_THREAD_GRACE,
    };
    let consumer = consumer::create(kafka, &settings.instance_id, links)?;
    let stop_polling = CancellationToken::new();
    let poll_thread = consumer::spawn_poll_thread(consumer, commands, stop_polling.clone())?;

    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let (progress, progress_rx) = watch::channel(0u64);
    // One deadline for the whole drain, counted from the signal: every wait that is still
    // pending when it passes (a revocation, a store behind an open circuit, an unconfirmed DLQ
    // write) is abandoned uncommitted and redelivered after the restart.
    let hard_stop = CancellationToken::new();
    let stop_deadline = Arc::new(std::sync::OnceLock::<Instant>::new());
    tokio::spawn({
        let shutdown = shutdown.clone();
        let hard_stop = hard_stop.clone();
        let stop_deadline = stop_deadline.clone();
        let timeout = settings.shutdown_timeout;
        async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = hard_stop.cancelled() => return,
            }
            let deadline = *stop_deadline.get_or_init(|| Instant::now() + timeout);
            tokio::time::sleep_until(deadline).await;
            hard_stop.cancel();
        }
    });
    let store = Arc::new(StoreContext {
        trust: shared.trust.clone(),
        immudb_breaker: shared.immudb_breaker.clone(),
        pg_breaker: shared.pg_breaker.clone(),
        in_flight,
        immudb: sinks.immudb,
        pg: sinks.pg,
        dlq: sinks.dlq,
        retry: RetryPolicy::new(settings.retry),
        immudb_slots: Semaphore::new(settings.pipeline.immudb_concurrency),
        postgres_slots: Semaphore::new(settings.pipeline.postgres_concurrency),
        tracker: tracker.clone(),
        progress,
        hard_stop: hard_stop.clone(),
    });
    let tasks = TaskTracker::new();
    tasks.spawn(commit_progress(
        tracker.clone(),
        progress_rx.clone(),
        commands_tx,
        stop_polling.clone(),
    ));

    let mut dispatcher = Dispatcher {
        settings,
        batcher: Batcher::new(kafka.batch_size, kafka.batch_timeout),
        writers: HashMap::new(),
        tasks: tasks.clone(),
        store,
        tracker,
        progress: progress_rx,
        invalid_runs: HashMap::new(),
        parked: HashMap::new(),
        interrupt: shutdown.clone(),
        hard_stop: hard_stop.clone(),
        revocation,
    };
    let outcome = dispatcher.consume(events, &shutdown).await;
    let (mut events, stop_reason) = match outcome {
        Ok(events) => (events, None),
        Err((events, error)) => (events, Some(error)),
    };

    // Drain: stop fetching, store what is in flight, answer the final revocation (the close of
    // the consumer) with the positions reached, and wait until the poll thread has left, all
    // within the deadline counted from the signal (or from now after a fatal error).
    shared.health.set_stopping();
    stop_polling.cancel();
    let deadline = *stop_deadline.get_or_init(|| Instant::now() + settings.shutdown_timeout);
    if !shutdown.is_cancelled() {
        // A fatal error: start the deadline here.
        tokio::spawn({
            let hard_stop = hard_stop.clone();
            async move {
                tokio::time::sleep_until(deadline).await;
                hard_stop.cancel();
            }
        });
    }
    dispatcher.interrupt = hard_stop.clone();
    dispatcher.flush_all().await;
    dispatcher.writers.clear();
    tasks.close();
    let mut writers_done = std::pin::pin!(tasks.wait());
    let mut finished = false;
    let mut parked_revocations: Vec<(Vec<TopicPartition>, oneshot::Sender<_>)> = Vec::new();
    // The final revocation comes when the poll thread closes the consumer; the loop ends when
    // the poll thread drops its end of the channel, or after the deadline plus a grace for
    // librdkafka's close.
    let give_up = deadline + POLL_THREAD_GRACE;
    loop {
        tokio::select! {
            () = &mut writers_done, if !finished => {
                finished = true;
                for (partitions, reply) in parked_revocations.drain(..) {
                    let _ = reply.send(dispatcher.release(&partitions));
                }
            }
            () = hard_stop.cancelled(), if !finished => {
                tracing::warn!("drain deadline reached; events still in flight stay uncommitted and will be redelivered");
                finished = true;
                for (partitions, reply) in parked_revocations.drain(..) {
                    let _ = reply.send(dispatcher.release(&partitions));
                }
            }
            () = tokio::time::sleep_until(give_up) => {
                tracing::warn!("the Kafka consumer did not close in time; leaving without it");
                break;
            }
            event = events.recv() => match event {
                None => break,
                Some(ConsumerEvent::Revoked { partitions, reply }) if finished => {
                    let _ = reply.send(dispatcher.release(&partitions));
                }
                Some(ConsumerEvent::Revoked { partitions, reply }) => parked_revocations.push((partitions, reply)),
                // Fetched after the stop: not tracked, so never committed; redelivered later.
                Some(_) => {}
            },
        }
    }
    if !finished {
        // The consumer closed without a final revocation (it had no assignment): nothing is left
        // to commit, but the stores still get the remaining time to finish what they started.
        let _ = tokio::time::timeout_at(deadline, tasks.wait()).await;
        hard_stop.cancel();
    }
    // A poll thread stuck in librdkafka (a close that cannot reach the coordinator) must not
    // hold the exit: it is left behind once the grace has passed.
    while !poll_thread.is_finished() && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !poll_thread.is_finished() {
        tracing::warn!("the Kafka poll thread did not finish in time; exiting without it");
    }
    tracing::info!("consumer stopped");
    match stop_reason {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// How long the poll thread waits beyond the revocation budget for the pipeline's answer.
const REVOCATION_GRACE: Duration = Duration::from_secs(2);

/// How long after the drain deadline the close of the Kafka consumer (its final commit and
/// leaving the group) may still take.
const POLL_THREAD_GRACE: Duration = Duration::from_secs(3);

/// Turns records into batches and hands them to the per-topic writers.
struct Dispatcher<'a> {
    settings: &'a Settings,
    batcher: Batcher<BatchItem>,
    writers: HashMap<String, mpsc::Sender<Batch<BatchItem>>>,
    tasks: TaskTracker,
    store: Arc<StoreContext>,
    tracker: Arc<Mutex<OffsetTracker>>,
    progress: watch::Receiver<u64>,
    /// Consecutive invalid events per partition, for the flood cap.
    invalid_runs: HashMap<TopicPartition, u64>,
    /// Full batches waiting, in order, for room in their topic's writer queue (at most
    /// `MAX_PARKED_PER_TOPIC` each).
    parked: HashMap<String, VecDeque<Batch<BatchItem>>>,
    /// Abandons a dispatch waiting on a full writer queue: the shutdown signal while consuming,
    /// the drain deadline while draining. An abandoned batch stays uncommitted.
    interrupt: CancellationToken,
    /// The drain deadline (from the shutdown signal): bounds a revocation too.
    hard_stop: CancellationToken,
    /// Raised by the poll thread while a revocation waits behind the records it already holds.
    revocation: Arc<RevocationSignal>,
}

type ConsumeResult =
    Result<mpsc::Receiver<ConsumerEvent>, (mpsc::Receiver<ConsumerEvent>, PipelineError)>;

impl Dispatcher<'_> {
    async fn consume(
        &mut self,
        mut events: mpsc::Receiver<ConsumerEvent>,
        shutdown: &CancellationToken,
    ) -> ConsumeResult {
        loop {
            let deadline = self.batcher.next_deadline();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(events),
                (topic, permit) = self.parked_ready() => match permit {
                    Some(permit) => self.send_parked(&topic, permit),
                    None => return Err((events, PipelineError::WriterGone { topic })),
                },
                () = sleep_until_opt(deadline) => {
                    for batch in self.batcher.take_due(Instant::now()) {
                        if let Err(error) = self.dispatch(batch).await {
                            return Err((events, error));
                        }
                    }
                }
                event = events.recv() => match event {
                    Some(ConsumerEvent::Record(record)) => {
                        if let Err(error) = self.accept(record).await {
                            return Err((events, error));
                        }
                    }
                    Some(ConsumerEvent::Revoked { partitions, reply }) => self.revoke(partitions, reply).await,
                    Some(ConsumerEvent::Assigned(epochs)) => {
                        let mut tracker = self.tracker();
                        for (tp, epoch) in &epochs {
                            tracker.assign(tp, *epoch);
                        }
                    }
                    Some(ConsumerEvent::Fatal(error)) => return Err((events, error.into())),
                    None => return Ok(events),
                },
            }
        }
    }

    /// Decodes a record and adds it to its topic's batch.
    async fn accept(&mut self, record: SourceRecord) -> Result<(), PipelineError> {
        let tp = record.topic_partition();
        let item = match event::decode(record.payload_bytes()) {
            Ok(event) => {
                self.invalid_runs.remove(&tp);
                let ticket = self.tracker().received(&tp, record.offset);
                let immudb_key = event.immudb_key();
                let digest = event::payload_sha256(record.payload_bytes());
                BatchItem::Valid(
                    Box::new(ValidEvent {
                        record,
                        event,
                        immudb_key,
                        digest,
                    }),
                    ticket,
                )
            }
            Err(error) => {
                let run = self.invalid_runs.entry(tp.clone()).or_insert(0);
                *run += 1;
                let cap = self.settings.dlq.max_consecutive_invalid;
                if cap > 0 && *run > cap {
                    return Err(PipelineError::InvalidFlood {
                        partition: tp,
                        offset: record.offset,
                        count: *run,
                        cap,
                    });
                }
                let ticket = self.tracker().received(&tp, record.offset);
                BatchItem::Dead(
                    Box::new(DeadLetter {
                        class: ErrorClass::Invalid,
                        stage: Stage::Decode,
                        kind: error.kind().to_owned(),
                        message: error.to_string(),
                        attempts: 0,
                        record,
                    }),
                    ticket,
                )
            }
        };
        let topic = match &item {
            BatchItem::Valid(event, _) => event.record.topic.clone(),
            BatchItem::Dead(letter, _) => letter.record.topic.clone(),
        };
        if let Some(batch) = self.batcher.push(&topic, item, Instant::now()) {
            self.dispatch(batch).await?;
        }
        Ok(())
    }

    /// Hands a batch to its topic's writer, starting the writer on first use. When that writer's
    /// queue is full the batch is parked behind the topic's earlier parked ones, and the
    /// dispatcher goes on: a topic that is briefly slower must not hold up the records of the
    /// others queued behind it in librdkafka's single queue (head-of-line blocking). A topic that
    /// stays behind (a store down) fills its parking and then the dispatcher waits for it: that
    /// wait stops the poll thread, which pauses fetching while Kafka keeps the backlog.
    async fn dispatch(&mut self, batch: Batch<BatchItem>) -> Result<(), PipelineError> {
        let topic = batch.topic.clone();
        if let Some(queue) = self.parked.get_mut(&topic) {
            // Batches of a topic keep their order: parked ones go first.
            queue.push_back(batch);
            if queue.len() > MAX_PARKED_PER_TOPIC {
                self.send_oldest_parked(&topic).await?;
            }
            return Ok(());
        }
        let writer = self
            .writers
            .entry(topic.clone())
            .or_insert_with(|| spawn_writer(&self.tasks, self.store.clone()));
        match writer.try_send(batch) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(batch)) => {
                self.parked.entry(topic).or_default().push_back(batch);
                Ok(())
            }
            // A writer only ends when its channel closes, so a send error means it panicked.
            // Its events stay pending for ever (nothing past them commits): stop.
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PipelineError::WriterGone { topic }),
        }
    }

    /// Hands a batch to its writer if its queue has room, else parks it (past the cap if need
    /// be), without waiting: for a revocation, which must not wait on a stuck writer.
    fn hand_over_or_park(&mut self, batch: Batch<BatchItem>) -> Result<(), PipelineError> {
        let topic = batch.topic.clone();
        if let Some(queue) = self.parked.get_mut(&topic) {
            queue.push_back(batch);
            return Ok(());
        }
        let writer = self
            .writers
            .entry(topic.clone())
            .or_insert_with(|| spawn_writer(&self.tasks, self.store.clone()));
        match writer.try_send(batch) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(batch)) => {
                self.parked.entry(topic).or_default().push_back(batch);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PipelineError::WriterGone { topic }),
        }
    }

    /// Sends the topic's oldest parked batch through a permit of its writer's queue.
    fn send_parked(&mut self, topic: &str, permit: mpsc::OwnedPermit<Batch<BatchItem>>) {
        let Some(queue) = self.parked.get_mut(topic) else {
            return;
        };
        if let Some(batch) = queue.pop_front() {
            permit.send(batch);
        }
        if queue.is_empty() {
            self.parked.remove(topic);
        }
    }

    /// Waits for room in the topic's writer queue and sends its oldest parked batch (or gives up
    /// at the interrupt: the batch stays parked, uncommitted).
    async fn send_oldest_parked(&mut self, topic: &str) -> Result<(), PipelineError> {
        let gone = || PipelineError::WriterGone {
            topic: topic.to_owned(),
        };
        let writer = self.writers.get(topic).cloned().ok_or_else(gone)?;
        tokio::select! {
            permit = writer.reserve_owned() => {
                self.send_parked(topic, permit.map_err(|_| gone())?);
                Ok(())
            }
            () = self.interrupt.cancelled() => Ok(()),
            // The revocation queued behind this record must be answered first; the parking
            // grows past its cap meanwhile by what the poll thread already holds.
            () = self.revocation.raised() => Ok(()),
        }
    }

    /// Sends the topic's parked batches in order, waiting for room in its writer's queue, until
    /// `until` (or the interrupt): what is still parked then stays parked, uncommitted.
    async fn unpark(&mut self, topic: &str, until: Instant) -> Result<(), PipelineError> {
        let Some(writer) = self.writers.get(topic).cloned() else {
            return match self.parked.contains_key(topic) {
                true => Err(PipelineError::WriterGone {
                    topic: topic.to_owned(),
                }),
                false => Ok(()),
            };
        };
        while self.parked.contains_key(topic) {
            tokio::select! {
                permit = writer.clone().reserve_owned() => {
                    let permit = permit.map_err(|_| PipelineError::WriterGone { topic: topic.to_owned() })?;
                    self.send_parked(topic, permit);
                }
                () = self.interrupt.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(until) => return Ok(()),
            }
        }
        Ok(())
    }

    /// Resolves when some parked batch's writer has room: returns its topic and the permit.
    fn parked_ready(
        &self,
    ) -> impl Future<Output = (String, Option<mpsc::OwnedPermit<Batch<BatchItem>>>)> + use<> {
        let waits: Vec<_> = self
            .parked
            .keys()
            .filter_map(|topic| {
                let writer = self.writers.get(topic)?.clone();
                let topic = topic.clone();
                Some(Box::pin(async move {
                    (topic, writer.reserve_owned().await.ok())
                }))
            })
            .collect();
        async move {
            if waits.is_empty() {
                std::future::pending().await
            } else {
                futures::future::select_all(waits).await.0
            }
        }
    }

    async fn flush_all(&mut self) {
        for batch in self.batcher.take_all() {
            if let Err(error) = self.dispatch(batch).await {
                tracing::error!(%error, "cannot flush during shutdown");
            }
        }
        let topics: Vec<String> = self.parked.keys().cloned().collect();
        let until = Instant::now() + self.settings.shutdown_timeout;
        for topic in topics {
            if let Err(error) = self.unpark(&topic, until).await {
                tracing::error!(%error, "cannot flush during shutdown");
            }
        }
    }

    /// Drains the revoked partitions within the revocation budget (and the drain deadline when
    /// stopping), then answers with the offsets to commit for them and forgets them. What did
    /// not drain in time stays uncommitted: its parked batches are dropped here and the next
    /// owner consumes it again (the stores recognise what was already written).
    async fn revoke(
        &mut self,
        partitions: Vec<TopicPartition>,
        reply: oneshot::Sender<Vec<(TopicPartition, i64)>>,
    ) {
        self.revocation.clear();
        let until = Instant::now() + revocation_budget(self.settings);
        let topics: HashSet<String> = partitions.iter().map(|tp| tp.topic.clone()).collect();
        for topic in &topics {
            // Never waits here: the topic's writer may be stuck behind an open circuit.
            let flushed = match self.batcher.take(topic) {
                Some(batch) => self.hand_over_or_park(batch),
                None => Ok(()),
            };
            if let Err(error) = flushed.and(self.unpark(topic, until).await) {
                tracing::error!(%error, "cannot flush a revoked partition's batch");
            }
        }
        let drained = tokio::select! {
            drained = wait_for(&mut self.progress, until, || {
                let tracker = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
                partitions.iter().all(|tp| tracker.pending_in(tp) == 0)
            }) => drained,
            () = self.hard_stop.cancelled() => false,
        };
        if !drained {
            tracing::warn!(
                partitions = partitions.len(),
                "revoked partitions did not drain in time; their unfinished events will be redelivered to the new owner"
            );
            self.drop_parked(&partitions);
        }
        let _ = reply.send(self.release(&partitions));
    }

    /// Drops the parked (not yet written) events of `partitions`: they will not be committed by
    /// this member, and their new owner consumes them again.
    fn drop_parked(&mut self, partitions: &[TopicPartition]) {
        let revoked: HashSet<&TopicPartition> = partitions.iter().collect();
        let mut released = 0;
        for queue in self.parked.values_mut() {
            for batch in queue.iter_mut() {
                batch.items.retain(|item| {
                    let keep = !revoked.contains(&item.topic_partition());
                    if !keep {
                        released += item.payload_len();
                    }
                    keep
                });
            }
            queue.retain(|batch| !batch.items.is_empty());
        }
        self.parked.retain(|_, queue| !queue.is_empty());
        self.store.in_flight.sub(released);
    }

    /// The commit positions of `partitions`, which are then forgotten.
    fn release(&mut self, partitions: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        for tp in partitions {
            self.invalid_runs.remove(tp);
        }
        let mut tracker = self.tracker();
        let offsets = partitions
            .iter()
            .filter_map(|tp| tracker.position(tp).map(|position| (tp.clone(), position)))
            .collect();
        for tp in partitions {
            tracker.revoke(tp);
        }
        offsets
    }

    fn tracker(&self) -> MutexGuard<'_, OffsetTracker> {
        // A panic while holding the lock cannot leave the tracker half-updated: every method is
        // a single map operation.
        self.tracker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Full batches queued per topic ahead of its writer; more wait parked in the dispatcher.
const WRITER_QUEUE: usize = 1;

/// Full batches a topic may park before the dispatcher waits for it. Enough to ride out one
/// slow transaction of a topic while the others flow; a store that is down fills it in seconds
/// and backpressure takes over.
const MAX_PARKED_PER_TOPIC: usize = 4;

/// One writer per topic: batches of a topic are stored strictly in order; topics run in
/// parallel.
fn spawn_writer(tasks: &TaskTracker, store: Arc<StoreContext>) -> mpsc::Sender<Batch<BatchItem>> {
    let (tx, mut batches) = mpsc::channel::<Batch<BatchItem>>(WRITER_QUEUE);
    // Two stages per topic, each strictly in order: immudb for batch n+1 overlaps PostgreSQL for
    // batch n. Offsets are only marked done by the second stage, so the commit rule holds.
    let (staged_tx, mut staged) = mpsc::channel(1);
    let immudb_stage = store.clone();
    tasks.spawn(async move {
        while let Some(batch) = batches.recv().await {
            let batch = immudb_stage.write_immudb_stage(batch).await;
            if staged_tx.send(batch).await.is_err() {
                return;
            }
        }
    });
    tasks.spawn(async move {
        while let Some(batch) = staged.recv().await {
            store.finish_stage(batch).await;
        }
    });
    tx
}

/// How often every committable position is committed again, moved or not.
const RECOMMIT_INTERVAL: Duration = Duration::from_secs(5);

/// Commits whatever became committable after each batch, and every position again every
/// [`RECOMMIT_INTERVAL`]: an async commit that failed is not reported back by rust-rdkafka
/// (no commit callback for manual commits), and an idle partition would keep showing the lag
/// of a commit that was lost. Committing a position again is idempotent.
async fn commit_progress(
    tracker: Arc<Mutex<OffsetTracker>>,
    mut progress: watch::Receiver<u64>,
    commands: mpsc::Sender<ConsumerCommand>,
    stop: CancellationToken,
) {
    let mut again = tokio::time::interval(RECOMMIT_INTERVAL);
    again.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    again.tick().await;
    loop {
        let everything = tokio::select! {
            changed = progress.changed() => if changed.is_err() { return } else { false },
            _ = again.tick() => true,
            () = stop.cancelled() => return,
        };
        let commits = {
            let mut tracker = tracker.lock().unwrap_or_else(|p| p.into_inner());
            if everything {
                tracker.take_commits();
                tracker.current_commits()
            } else {
                tracker.take_commits()
            }
        };
        if !commits.is_empty()
            && commands
                .send(ConsumerCommand::Commit(commits))
                .await
                .is_err()
        {
            return;
        }
    }
}

/// Waits until `done()` holds, re-checking after every batch, at the latest until `deadline`.
async fn wait_for(
    progress: &mut watch::Receiver<u64>,
    deadline: Instant,
    mut done: impl FnMut() -> bool,
) -> bool {
    loop {
        if done() {
            return true;
        }
        tokio::select! {
            changed = progress.changed() => if changed.is_err() { return done() },
            () = tokio::time::sleep_until(deadline) => return done(),
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
