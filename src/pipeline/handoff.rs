//! How the poll thread hands events to the pipeline, in the order they happened, without ever
//! blocking on it: events it cannot take yet are held here (the backpressure counts them), and
//! a revocation is a rendezvous — the pipeline is told one is coming (so a dispatcher waiting
//! for room stops waiting and reads on), the event follows the records polled before it, and
//! the poll thread waits for the reply that carries the offsets to commit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};

use super::backpressure::InFlight;
use super::consumer::ConsumerEvent;
use super::offsets::TopicPartition;
use crate::http::Health;

/// Set by the poll thread while a revocation waits for the pipeline, so the dispatcher does not
/// sit waiting for a writer's room while the event it must answer queues behind it.
#[derive(Debug, Default)]
pub struct RevocationSignal {
    pending: AtomicBool,
    notify: Notify,
}

impl RevocationSignal {
    fn raise(&self) {
        self.pending.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// The dispatcher took the revocation.
    pub fn clear(&self) {
        self.pending.store(false, Ordering::SeqCst);
    }

    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// Resolves once a revocation is pending (at once if one is).
    pub async fn raised(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_pending() {
                return;
            }
            notified.await;
        }
    }
}

/// The poll thread's queue towards the pipeline.
pub struct Handoff {
    events: mpsc::Sender<ConsumerEvent>,
    /// Events polled but not yet accepted by the pipeline (full channel), oldest first. Only the
    /// poll thread touches it; the mutex just makes the context `Sync`.
    held: Mutex<VecDeque<ConsumerEvent>>,
    in_flight: Arc<InFlight>,
    health: Arc<Health>,
    revocation: Arc<RevocationSignal>,
    /// The longest a revocation waits for the pipeline's answer; past it, the partitions are
    /// given up with nothing more committed (their events are redelivered to the next owner).
    revocation_deadline: Duration,
    /// The same for the final revocation when the consumer closes (the shutdown drain).
    close_deadline: Duration,
}

impl Handoff {
    pub fn new(
        events: mpsc::Sender<ConsumerEvent>,
        in_flight: Arc<InFlight>,
        health: Arc<Health>,
        revocation: Arc<RevocationSignal>,
        revocation_deadline: Duration,
        close_deadline: Duration,
    ) -> Self {
        Self {
            events,
            held: Mutex::new(VecDeque::new()),
            in_flight,
            health,
            revocation,
            revocation_deadline,
            close_deadline,
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, VecDeque<ConsumerEvent>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Events waiting for the pipeline.
    pub fn held_len(&self) -> usize {
        self.held().len()
    }

    /// Queues an event behind the ones already held.
    pub fn hold(&self, event: ConsumerEvent) {
        if let ConsumerEvent::Record(record) = &event {
            self.in_flight.add(record.payload_bytes().len());
        }
        self.held().push_back(event);
    }

    /// Hands held events to the pipeline until it is full. Returns false once the pipeline is
    /// gone.
    pub fn deliver_held(&self) -> bool {
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

    /// Drops the records never handed over (shutdown): not tracked, so never committed.
    pub fn drop_records(&self) {
        self.held()
            .retain(|event| !matches!(event, ConsumerEvent::Record(_)));
    }

    /// The revocation rendezvous: tells the pipeline, delivers the event after everything held
    /// and waits (beating) for the offsets to commit, at most its deadline (`closing`: the
    /// final revocation of a shutdown, which waits for the drain). `None` when the pipeline is
    /// gone or too late.
    pub fn revoke(
        &self,
        partitions: Vec<TopicPartition>,
        closing: bool,
    ) -> Option<Vec<(TopicPartition, i64)>> {
        let deadline = std::time::Instant::now()
            + if closing {
                self.close_deadline
            } else {
                self.revocation_deadline
            };
        let overdue = || {
            let late = std::time::Instant::now() >= deadline;
            if late {
                tracing::warn!(
                    "the pipeline did not answer the revocation in time; giving the partitions up \
                     with nothing more committed (their events are redelivered)"
                );
            }
            late
        };
        let (reply, mut answer) = oneshot::channel();
        self.revocation.raise();
        self.held()
            .push_back(ConsumerEvent::Revoked { partitions, reply });
        let delivered = loop {
            self.health.beat();
            if !self.deliver_held() {
                break false;
            }
            if self.held().is_empty() {
                break true;
            }
            if overdue() {
                break false;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let answer = delivered.then(|| {
            loop {
                self.health.beat();
                match answer.try_recv() {
                    Ok(offsets) => break Some(offsets),
                    Err(oneshot::error::TryRecvError::Empty) if overdue() => break None,
                    Err(oneshot::error::TryRecvError::Empty) => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(oneshot::error::TryRecvError::Closed) => break None,
                }
            }
        });
        self.revocation.clear();
        answer.flatten()
    }
}
