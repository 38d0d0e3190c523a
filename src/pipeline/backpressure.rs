//! When to stop fetching: payload bytes in flight and events the pipeline could not take yet,
//! with hysteresis, because pausing purges librdkafka's prefetch and a pipeline that is merely
//! busy for a moment must not trigger it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

use crate::metrics::metrics;

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

/// Pauses and resumes every assigned partition to follow the pipeline's load.
pub struct Backpressure {
    paused: AtomicBool,
    in_flight: Arc<InFlight>,
    max_in_flight_bytes: i64,
    /// Held events that make the poll thread pause fetching.
    pause_after_held: usize,
}

impl Backpressure {
    pub fn new(
        in_flight: Arc<InFlight>,
        max_in_flight_bytes: u64,
        pause_after_held: usize,
    ) -> Self {
        Self {
            paused: AtomicBool::new(false),
            in_flight,
            max_in_flight_bytes: i64::try_from(max_in_flight_bytes).unwrap_or(i64::MAX),
            pause_after_held,
        }
    }

    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    /// Whether fetching is paused now.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Whether fetching should be paused with `held` events waiting: pause when a whole batch
    /// worth of events is held or the byte cap is exceeded; resume only when nothing is held
    /// and the bytes fell below three quarters of the cap.
    pub fn wanted(&self, held: usize) -> bool {
        let bytes = self.in_flight.bytes();
        if self.is_paused() {
            held > 0 || bytes > self.max_in_flight_bytes / 4 * 3
        } else {
            held >= self.pause_after_held || bytes > self.max_in_flight_bytes
        }
    }

    /// Pauses or resumes every assigned partition to match `wanted`.
    pub fn apply<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, wanted: bool) {
        if wanted == self.is_paused() {
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
}
