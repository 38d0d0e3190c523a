//! Every Prometheus metric of the daemon, defined in one place, in one registry.
//!
//! Names follow the specs (`audit_` prefix, units in the name). Buckets are chosen for the real
//! ranges: a batch takes milliseconds to seconds (seconds to minutes while retrying), an event
//! waits milliseconds to minutes between its timestamp and storage.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const EVENTS_PROCESSED: &str = "audit_events_processed_total";
pub const EVENT_PROCESSING_DURATION: &str = "audit_event_processing_duration_seconds";
pub const BATCH_SIZE: &str = "audit_batch_size";
pub const CONSUMER_LAG: &str = "audit_consumer_lag";
pub const IMMUDB_OPERATIONS: &str = "audit_immudb_operations_total";
pub const IMMUDB_WRITE_DURATION: &str = "audit_immudb_write_duration_seconds";
pub const POSTGRES_OPERATIONS: &str = "audit_postgres_operations_total";
pub const POSTGRES_WRITE_DURATION: &str = "audit_postgres_write_duration_seconds";
pub const CIRCUIT_BREAKER_STATE: &str = "audit_circuit_breaker_state";
pub const DLQ_EVENTS: &str = "audit_dlq_events_total";
pub const RETRIES: &str = "audit_retries_total";
pub const OFFSETS_COMMITTED: &str = "audit_offsets_committed_total";
pub const IMMUDB_LAST_TX_ID: &str = "audit_immudb_last_tx_id";
pub const EVENT_AGE: &str = "audit_event_age_seconds";
pub const IN_FLIGHT_BYTES: &str = "audit_in_flight_bytes";
pub const VERIFICATION_FAILURES: &str = "audit_verification_failures_total";
pub const TRUSTED_TX_ID: &str = "audit_trusted_tx_id";
pub const LAST_AUDIT_TIMESTAMP: &str = "audit_last_audit_timestamp_seconds";
pub const CONSUMER_PAUSED: &str = "audit_consumer_paused";
pub const API_REQUESTS: &str = "audit_api_requests_total";
pub const API_REQUEST_DURATION: &str = "audit_api_request_duration_seconds";
pub const API_ROWS_SERVED: &str = "audit_api_rows_served_total";
pub const API_ACCESS_EVENTS: &str = "audit_api_access_events_total";

/// Latency of one batch through a store or the whole pipeline: 1 ms … ~2 min.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Events per batch, up to immudb's 1,024 entries per transaction.
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 1024.0,
];
/// Event timestamp → stored: 10 ms … 1 day (replays and backlogs are old).
const AGE_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0,
];

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    /// `{topic, status}` with status `stored`, `duplicate` or `dead_lettered`.
    pub events_processed: IntCounterVec,
    pub event_processing_duration: HistogramVec,
    pub batch_size: Histogram,
    pub consumer_lag: IntGaugeVec,
    /// `{operation, status}` with status `ok` or `error`.
    pub immudb_operations: IntCounterVec,
    pub immudb_write_duration: Histogram,
    pub postgres_operations: IntCounterVec,
    pub postgres_write_duration: Histogram,
    /// `{service}`: 0 closed, 1 half-open, 2 open.
    pub circuit_breaker_state: IntGaugeVec,
    /// `{topic, reason}` with reason `invalid`, `conflict` or `retry_exhausted`.
    pub dlq_events: IntCounterVec,
    pub retries: IntCounterVec,
    pub offsets_committed: IntCounter,
    pub immudb_last_tx_id: IntGauge,
    pub event_age: Histogram,
    pub in_flight_bytes: IntGauge,
    pub consumer_paused: IntGauge,
    /// Proof checks that failed: a tampered or rolled-back immudb (critical).
    pub verification_failures: IntCounter,
    /// The immudb transaction our trusted state points at.
    pub trusted_tx_id: IntGauge,
    /// Unix time of the last completed continuous audit.
    pub last_audit_timestamp: IntGauge,
    /// Read API (`serve`): `{route, status}`.
    pub api_requests: IntCounterVec,
    /// Read API: `{route}`.
    pub api_request_duration: HistogramVec,
    /// Read API: trail rows returned, `{route}`.
    pub api_rows_served: IntCounterVec,
    /// Read API: access events, `{outcome}` = `recorded` or `failed`.
    pub api_access_events: IntCounterVec,
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("static metric definition")
}

impl Metrics {
    fn new() -> Self {
        let m = Metrics {
            registry: Registry::new(),
            events_processed: counter_vec(
                EVENTS_PROCESSED,
                "Events handled, by outcome.",
                &["topic", "status"],
            ),
            event_processing_duration: HistogramVec::new(
                HistogramOpts::new(
                    EVENT_PROCESSING_DURATION,
                    "Time to store one batch in both stores and the DLQ, from its first write to its offsets marked done.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["topic"],
            )
            .expect("static metric definition"),
            batch_size: histogram(BATCH_SIZE, "Events per batch.", BATCH_SIZE_BUCKETS),
            consumer_lag: IntGaugeVec::new(
                Opts::new(
                    CONSUMER_LAG,
                    "Messages between the committed offset and the log end.",
                ),
                &["topic", "partition"],
            )
            .expect("static metric definition"),
            immudb_operations: counter_vec(
                IMMUDB_OPERATIONS,
                "immudb requests, by outcome.",
                &["operation", "status"],
            ),
            immudb_write_duration: histogram(
                IMMUDB_WRITE_DURATION,
                "Time of one batch's immudb write, retries included.",
                DURATION_BUCKETS,
            ),
            postgres_operations: counter_vec(
                POSTGRES_OPERATIONS,
                "PostgreSQL statements, by outcome.",
                &["operation", "status"],
            ),
            postgres_write_duration: histogram(
                POSTGRES_WRITE_DURATION,
                "Time of one batch's PostgreSQL insert, retries included.",
                DURATION_BUCKETS,
            ),
            circuit_breaker_state: IntGaugeVec::new(
                Opts::new(CIRCUIT_BREAKER_STATE, "0 closed, 1 half-open, 2 open."),
                &["service"],
            )
            .expect("static metric definition"),
            dlq_events: counter_vec(
                DLQ_EVENTS,
                "Events parked in the dead-letter topic.",
                &["topic", "reason"],
            ),
            retries: counter_vec(RETRIES, "Retries of transient failures.", &["stage"]),
            offsets_committed: IntCounter::new(
                OFFSETS_COMMITTED,
                "Partition offset commits requested.",
            )
            .expect("static metric definition"),
            immudb_last_tx_id: IntGauge::new(IMMUDB_LAST_TX_ID, "Last immudb transaction written.")
                .expect("static metric definition"),
            event_age: histogram(
                EVENT_AGE,
                "Event timestamp to stored in both stores.",
                AGE_BUCKETS,
            ),
            in_flight_bytes: IntGauge::new(
                IN_FLIGHT_BYTES,
                "Payload bytes received and not yet handled.",
            )
            .expect("static metric definition"),
            consumer_paused: IntGauge::new(
                CONSUMER_PAUSED,
                "1 while fetching is paused by backpressure.",
            )
            .expect("static metric definition"),
            verification_failures: IntCounter::new(
                VERIFICATION_FAILURES,
                "immudb proofs that failed to verify.",
            )
            .expect("static metric definition"),
            trusted_tx_id: IntGauge::new(TRUSTED_TX_ID, "immudb transaction of the trusted state.")
                .expect("static metric definition"),
            last_audit_timestamp: IntGauge::new(
                LAST_AUDIT_TIMESTAMP,
                "Unix time of the last continuous audit.",
            )
            .expect("static metric definition"),
            api_requests: counter_vec(
                API_REQUESTS,
                "Read API requests, by route template and HTTP status.",
                &["route", "status"],
            ),
            api_request_duration: HistogramVec::new(
                HistogramOpts::new(
                    API_REQUEST_DURATION,
                    "Read API request time, from the request to the response's headers.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["route"],
            )
            .expect("static metric definition"),
            api_rows_served: counter_vec(
                API_ROWS_SERVED,
                "Audit trail rows returned by the read API.",
                &["route"],
            ),
            api_access_events: counter_vec(
                API_ACCESS_EVENTS,
                "Access events of reads, by outcome (a failed one refuses the read).",
                &["outcome"],
            ),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.events_processed.clone()),
            Box::new(m.event_processing_duration.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.consumer_lag.clone()),
            Box::new(m.immudb_operations.clone()),
            Box::new(m.immudb_write_duration.clone()),
            Box::new(m.postgres_operations.clone()),
            Box::new(m.postgres_write_duration.clone()),
            Box::new(m.circuit_breaker_state.clone()),
            Box::new(m.dlq_events.clone()),
            Box::new(m.retries.clone()),
            Box::new(m.offsets_committed.clone()),
            Box::new(m.immudb_last_tx_id.clone()),
            Box::new(m.event_age.clone()),
            Box::new(m.in_flight_bytes.clone()),
            Box::new(m.consumer_paused.clone()),
            Box::new(m.verification_failures.clone()),
            Box::new(m.trusted_tx_id.clone()),
            Box::new(m.last_audit_timestamp.clone()),
            Box::new(m.api_requests.clone()),
            Box::new(m.api_request_duration.clone()),
            Box::new(m.api_rows_served.clone()),
            Box::new(m.api_access_events.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for collector in collectors {
            m.registry
                .register(collector)
                .expect("metric names are unique");
        }
        for service in ["immudb", "postgres", "dlq"] {
            m.circuit_breaker_state.with_label_values(&[service]).set(0);
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}
