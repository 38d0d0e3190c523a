//! Retries of transient store failures: exponential backoff with jitter (`backon`).
//!
//! Only errors the adapter classified as transient are retried; a permanent error returns at
//! once, because the same request would get the same answer.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};

use backon::{ExponentialBuilder, Retryable};

use crate::config::RetrySettings;

/// An error that knows whether retrying may help.
pub trait Transient {
    fn is_transient(&self) -> bool;
}

impl Transient for crate::postgres::PgError {
    fn is_transient(&self) -> bool {
        crate::postgres::PgError::is_transient(self)
    }
}

impl Transient for crate::immudb::ImmudbError {
    fn is_transient(&self) -> bool {
        crate::immudb::ImmudbError::is_transient(self)
    }
}

/// The last error of an operation and how many attempts were made.
#[derive(Debug)]
pub struct Failure<E> {
    pub error: E,
    pub attempts: u32,
}

/// The configured retry schedule.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    settings: RetrySettings,
}

impl RetryPolicy {
    pub fn new(settings: RetrySettings) -> Self {
        Self { settings }
    }

    /// The backoff schedule: `initial_delay × multiplier^n`, capped at `max_delay`, with jitter,
    /// `max_attempts` retries after the first try.
    pub fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.settings.initial_delay)
            .with_max_delay(self.settings.max_delay)
            .with_factor(self.settings.multiplier)
            .with_max_times(self.settings.max_attempts as usize)
            .with_jitter()
    }

    /// Runs `operation`, retrying transient failures on the schedule. `what` names the operation
    /// in the retry log lines.
    pub async fn run<T, E, F, Fut>(&self, what: &'static str, operation: F) -> Result<T, Failure<E>>
    where
        E: Transient + std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let attempts = AtomicU32::new(1);
        let result = operation
            .retry(self.backoff())
            .sleep(tokio::time::sleep)
            .when(|error: &E| error.is_transient())
            .notify(|error: &E, delay| {
                let attempt = attempts.fetch_add(1, Ordering::Relaxed);
                let stage = what.split_whitespace().next().unwrap_or(what);
                crate::metrics::metrics().retries.with_label_values(&[stage]).inc();
                tracing::warn!(operation = what, attempt, retry_in_ms = delay.as_millis() as u64, %error, "transient failure; retrying");
            })
            .await;
        result.map_err(|error| Failure {
            error,
            attempts: attempts.load(Ordering::Relaxed),
        })
    }
}

/// Where a store's circuit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests flow.
    Closed,
    /// One probe is checking whether the store is back.
    HalfOpen,
    /// The store failed; requests wait (and the consumer, through backpressure, pauses).
    Open,
}

impl CircuitState {
    /// The value of `audit_circuit_breaker_state`.
    pub fn gauge_value(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::HalfOpen => "half-open",
            CircuitState::Open => "open",
        }
    }
}

#[derive(Debug)]
struct BreakerInner {
    state: CircuitState,
    consecutive_failures: u32,
    /// While open: when the next probe may run.
    retry_at: tokio::time::Instant,
}

/// A circuit breaker per store: closed → open after `threshold` consecutive failed batches →
/// half-open probe (a health check, never a real batch) after `cooldown` → closed when the probe
/// succeeds. While it is open, writers hold their batch instead of dead-lettering it, so an
/// outage parks at most the batches that were in flight when it began.
pub struct CircuitBreaker {
    service: &'static str,
    threshold: u32,
    cooldown: std::time::Duration,
    inner: std::sync::Mutex<BreakerInner>,
    changed: tokio::sync::watch::Sender<CircuitState>,
}

/// Waiting for a circuit was abandoned because the process is stopping.
#[derive(Debug, thiserror::Error)]
#[error("stopped while the circuit was open")]
pub struct Stopped;

impl CircuitBreaker {
    pub fn new(service: &'static str, threshold: u32, cooldown: std::time::Duration) -> Self {
        crate::metrics::metrics()
            .circuit_breaker_state
            .with_label_values(&[service])
            .set(0);
        Self {
            service,
            threshold: threshold.max(1),
            cooldown,
            inner: std::sync::Mutex::new(BreakerInner {
                state: CircuitState::Closed,
                consecutive_failures: 0,
                retry_at: tokio::time::Instant::now(),
            }),
            changed: tokio::sync::watch::channel(CircuitState::Closed).0,
        }
    }

    /// The store this breaker guards.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// The wait between probes while open.
    pub fn cooldown(&self) -> std::time::Duration {
        self.cooldown
    }

    pub fn state(&self) -> CircuitState {
        self.lock().state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, inner: &mut BreakerInner, state: CircuitState) {
        if inner.state != state {
            match state {
                CircuitState::Open => tracing::error!(
                    service = self.service,
                    "circuit open: store unavailable; consumption pauses until it is back"
                ),
                CircuitState::HalfOpen => tracing::info!(
                    service = self.service,
                    "circuit half-open: probing the store"
                ),
                CircuitState::Closed => {
                    tracing::info!(service = self.service, "circuit closed: store is back")
                }
            }
        }
        inner.state = state;
        crate::metrics::metrics()
            .circuit_breaker_state
            .with_label_values(&[self.service])
            .set(state.gauge_value());
        self.changed.send_replace(state);
    }

    /// A batch reached the store.
    pub fn record_success(&self) {
        let mut inner = self.lock();
        inner.consecutive_failures = 0;
        self.set(&mut inner, CircuitState::Closed);
    }

    /// The store is unusable whatever the retry count (bad credentials, missing privileges):
    /// open at once.
    pub fn trip(&self) {
        let mut inner = self.lock();
        inner.consecutive_failures = inner.consecutive_failures.max(self.threshold);
        inner.retry_at = tokio::time::Instant::now() + self.cooldown;
        self.set(&mut inner, CircuitState::Open);
    }

    /// A batch failed transiently through all its retries.
    pub fn record_failure(&self) {
        let mut inner = self.lock();
        inner.consecutive_failures += 1;
        if inner.consecutive_failures >= self.threshold {
            inner.retry_at = tokio::time::Instant::now() + self.cooldown;
            self.set(&mut inner, CircuitState::Open);
        }
    }

    /// Returns once the circuit is closed. While it is open, one waiter probes the store with
    /// `probe` after each cool-down; the others wait for the outcome.
    pub async fn wait_closed<F, Fut, E>(
        &self,
        mut probe: F,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<(), Stopped>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let mut changes = self.changed.subscribe();
        loop {
            let (state, retry_at) = {
                let inner = self.lock();
                (inner.state, inner.retry_at)
            };
            match state {
                CircuitState::Closed => return Ok(()),
                CircuitState::HalfOpen => {
                    tokio::select! {
                        _ = changes.changed() => {}
                        () = stop.cancelled() => return Err(Stopped),
                    }
                }
                CircuitState::Open => {
                    tokio::select! {
                        () = tokio::time::sleep_until(retry_at) => {}
                        () = stop.cancelled() => return Err(Stopped),
                    }
                    let won = {
                        let mut inner = self.lock();
                        let due = inner.state == CircuitState::Open
                            && inner.retry_at <= tokio::time::Instant::now();
                        if due {
                            self.set(&mut inner, CircuitState::HalfOpen);
                        }
                        due
                    };
                    if won {
                        let outcome = tokio::select! {
                            outcome = probe() => outcome,
                            () = stop.cancelled() => {
                                let mut inner = self.lock();
                                self.set(&mut inner, CircuitState::Open);
                                return Err(Stopped);
                            }
                        };
                        let mut inner = self.lock();
                        match outcome {
                            Ok(()) => {
                                inner.consecutive_failures = 0;
                                self.set(&mut inner, CircuitState::Closed);
                            }
                            Err(error) => {
                                tracing::warn!(service = self.service, %error, "probe failed; circuit stays open");
                                inner.retry_at = tokio::time::Instant::now() + self.cooldown;
                                self.set(&mut inner, CircuitState::Open);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    fn settings() -> RetrySettings {
        RetrySettings {
            max_attempts: 3,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            multiplier: 2.0,
        }
    }

    #[derive(Debug)]
    struct Flaky;
    impl std::fmt::Display for Flaky {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("flaky")
        }
    }
    impl Transient for Flaky {
        fn is_transient(&self) -> bool {
            true
        }
    }

    /// The delays between attempts follow 1 s × 2^n within backon's jitter (each delay is
    /// stretched by a random factor in [1, 2)), capped at the maximum.
    #[tokio::test(start_paused = true)]
    async fn backoff_follows_the_configured_schedule_within_jitter() {
        for _ in 0..20 {
            let attempts = std::sync::Mutex::new(Vec::new());
            let policy = RetryPolicy::new(settings());
            let result: Result<(), Failure<Flaky>> = policy
                .run("test", || {
                    attempts
                        .lock()
                        .expect("lock")
                        .push(tokio::time::Instant::now());
                    async { Err(Flaky) }
                })
                .await;
            let failure = result.expect_err("always fails");
            assert_eq!(failure.attempts, 4, "first try + 3 retries");
            let times = attempts.into_inner().expect("lock");
            let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
            for (n, gap) in gaps.iter().enumerate() {
                let base = Duration::from_secs(1 << n);
                assert!(
                    *gap >= base && *gap < base * 2,
                    "retry {n}: {gap:?} outside [{base:?}, {:?})",
                    base * 2
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_capped_at_the_max_delay() {
        let mut s = settings();
        s.max_attempts = 8;
        s.max_delay = Duration::from_secs(5);
        let attempts = std::sync::Mutex::new(Vec::new());
        let _ = RetryPolicy::new(s)
            .run("test", || {
                attempts
                    .lock()
                    .expect("lock")
                    .push(tokio::time::Instant::now());
                async { Err::<(), _>(Flaky) }
            })
            .await;
        let times = attempts.into_inner().expect("lock");
        for w in times.windows(2) {
            assert!(
                w[1] - w[0] <= Duration::from_secs(10),
                "{:?} above twice the cap",
                w[1] - w[0]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_probes_after_cooldown_and_closes() {
        let breaker = CircuitBreaker::new("immudb", 2, Duration::from_secs(5));
        let stop = CancellationToken::new();
        breaker.record_failure();
        assert_eq!(breaker.state(), CircuitState::Closed, "below the threshold");
        breaker.record_failure();
        assert_eq!(breaker.state(), CircuitState::Open);

        let started = tokio::time::Instant::now();
        let probes = std::sync::atomic::AtomicU32::new(0);
        breaker
            .wait_closed(
                || {
                    let n = probes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async move { if n == 0 { Err("still down") } else { Ok(()) } }
                },
                &stop,
            )
            .await
            .expect("closes");
        assert_eq!(
            probes.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "one failed probe, one good"
        );
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(10),
            "a probe per cool-down"
        );
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_on_an_open_breaker_stops_on_shutdown() {
        let breaker = CircuitBreaker::new("postgres", 1, Duration::from_secs(5));
        breaker.record_failure();
        let stop = CancellationToken::new();
        stop.cancel();
        let result = breaker
            .wait_closed(|| async { Err::<(), _>("down") }, &stop)
            .await;
        assert!(result.is_err());
    }
}
