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
                tracing::warn!(operation = what, attempt, retry_in_ms = delay.as_millis() as u64, %error, "transient failure; retrying");
            })
            .await;
        result.map_err(|error| Failure {
            error,
            attempts: attempts.load(Ordering::Relaxed),
        })
    }
}
