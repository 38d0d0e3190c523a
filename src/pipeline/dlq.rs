//! The dead-letter topic: where an event that cannot be stored is parked, byte for byte, with
//! headers that say why. A dead letter counts as handled only once the broker has acknowledged
//! it (idempotent producer, `acks=all`), so the commit that passes its offset never outruns it.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

use super::record::SourceRecord;
use crate::config::KafkaSettings;

/// Why an event was dead-lettered (header `dlq.error.class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Not a valid event, or a store rejected it for what it contains. Never retried.
    Invalid,
    /// Same `event_id` already stored with different content.
    Conflict,
    /// A store stayed unavailable through every retry.
    RetryExhausted,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Invalid => "invalid",
            ErrorClass::Conflict => "conflict",
            ErrorClass::RetryExhausted => "retry_exhausted",
        }
    }
}

/// The step that failed (header `dlq.error.stage`). Replay resumes from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Decode,
    Immudb,
    Postgres,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Immudb => "immudb",
            Stage::Postgres => "postgres",
        }
    }
}

/// Header names on a dead letter. The record's own headers are kept as they were.
pub mod headers {
    pub const ORIGINAL_TOPIC: &str = "dlq.original.topic";
    pub const ORIGINAL_PARTITION: &str = "dlq.original.partition";
    pub const ORIGINAL_OFFSET: &str = "dlq.original.offset";
    pub const ORIGINAL_TIMESTAMP: &str = "dlq.original.timestamp";
    pub const ERROR_CLASS: &str = "dlq.error.class";
    pub const ERROR_STAGE: &str = "dlq.error.stage";
    pub const ERROR_KIND: &str = "dlq.error.kind";
    pub const ERROR_MESSAGE: &str = "dlq.error.message";
    pub const ATTEMPTS: &str = "dlq.attempts";
    pub const CONSUMER_GROUP: &str = "dlq.consumer.group";
    pub const CONSUMER_INSTANCE: &str = "dlq.consumer.instance";
    pub const FAILED_AT: &str = "dlq.failed.at";
}

/// An event on its way to the DLQ.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub record: SourceRecord,
    pub class: ErrorClass,
    pub stage: Stage,
    /// Short stable code of the cause (e.g. `missing_field`, `unavailable`).
    pub kind: String,
    /// Human-readable cause; never contains the payload.
    pub message: String,
    /// Store attempts made before giving up (0 for events rejected before any store).
    pub attempts: u32,
}

/// Produces dead letters and waits for their acknowledgement.
#[derive(Clone)]
pub struct DlqProducer {
    producer: FutureProducer,
    topic: String,
    group: String,
    instance: String,
}

/// How long one produce attempt may take before it is retried; a failed DLQ write blocks the
/// commit, it is never dropped.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl DlqProducer {
    /// Creates the idempotent producer with the consumer's connection and security settings.
    pub fn new(settings: &KafkaSettings, instance_id: &str) -> Result<Self, KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", settings.brokers.join(","))
            .set("client.id", format!("{instance_id}-dlq"))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            )
            .set("linger.ms", "5")
            .set("compression.type", "zstd");
        for (name, value) in &settings.client_properties {
            config.set(name, value);
        }
        if let Some(password) = &settings.sasl_password {
            config.set(
                "sasl.password",
                secrecy::ExposeSecret::expose_secret(password),
            );
        }
        Ok(Self {
            producer: config.create()?,
            topic: settings.dlq_topic.clone(),
            group: settings.group_id.clone(),
            instance: instance_id.to_owned(),
        })
    }

    /// The DLQ topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends one dead letter and returns once the broker has acknowledged it. Failures are
    /// retried with a capped backoff until acknowledged or `cancel` fires (then the caller must
    /// not treat the event as handled).
    pub async fn send(
        &self,
        letter: &DeadLetter,
        cancel: &CancellationToken,
    ) -> Result<(), DlqError> {
        let headers = self.headers_for(letter);
        let mut delay = Duration::from_millis(200);
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers.clone());
            if let Some(key) = letter.record.key.as_deref() {
                record = record.key(key);
            }
            if let Some(payload) = letter.record.payload.as_deref() {
                record = record.payload(payload);
            }
            let attempt = self.producer.send(record, DELIVERY_TIMEOUT);
            let result = tokio::select! {
                result = attempt => result,
                () = cancel.cancelled() => return Err(DlqError::Cancelled),
            };
            match result {
                Ok(_) => return Ok(()),
                Err((error, _)) => {
                    tracing::warn!(
                        topic = %letter.record.topic,
                        partition = letter.record.partition,
                        offset = letter.record.offset,
                        dlq_topic = %self.topic,
                        %error,
                        retry_in_ms = delay.as_millis() as u64,
                        "DLQ produce failed; the commit waits until it succeeds"
                    );
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => return Err(DlqError::Cancelled),
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    fn headers_for(&self, letter: &DeadLetter) -> OwnedHeaders {
        let record = &letter.record;
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let timestamp = record
            .timestamp_ms
            .map(|ms| ms.to_string())
            .unwrap_or_default();
        let attempts = letter.attempts.to_string();
        let failed_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let ours: [(&str, &str); 12] = [
            (headers::ORIGINAL_TOPIC, &record.topic),
            (headers::ORIGINAL_PARTITION, &partition),
            (headers::ORIGINAL_OFFSET, &offset),
            (headers::ORIGINAL_TIMESTAMP, &timestamp),
            (headers::ERROR_CLASS, letter.class.as_str()),
            (headers::ERROR_STAGE, letter.stage.as_str()),
            (headers::ERROR_KIND, &letter.kind),
            (headers::ERROR_MESSAGE, &letter.message),
            (headers::ATTEMPTS, &attempts),
            (headers::CONSUMER_GROUP, &self.group),
            (headers::CONSUMER_INSTANCE, &self.instance),
            (headers::FAILED_AT, &failed_at),
        ];
        ours.iter()
            .fold(record.owned_headers(), |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                })
            })
    }

    /// Waits for queued messages (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(error) = self.producer.flush(timeout) {
            tracing::warn!(%error, "DLQ producer did not flush in time");
        }
    }
}

/// A dead letter that could not be confirmed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("stopped before the DLQ acknowledged the record")]
    Cancelled,
}
