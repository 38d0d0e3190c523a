//! The dead-letter topic: where an event that cannot be stored is parked, byte for byte, with
//! headers that say why. A dead letter counts as handled only once the broker has acknowledged
//! it (idempotent producer, `acks=all`), so the commit that passes its offset never outruns it.
//!
//! The producer is sized for the largest record the consumer can receive (a record the broker
//! took compressed may be far larger once decompressed), and start-up refuses a DLQ topic whose
//! `max.message.bytes` is below the source topics'. A send the broker or the producer refuses
//! for good (a missing topic, an ACL, a record still too large, a fatal idempotence error)
//! opens the DLQ circuit: `/ready` turns 503 and nothing is committed past the record, while
//! the send is retried every cool-down until the cause is fixed.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

use super::record::SourceRecord;
use crate::config::KafkaSettings;
use crate::resilience::CircuitBreaker;

/// The largest record batch the consumer accepts, decompressed (librdkafka's
/// `receive.message.max.bytes`, its default made explicit): the consumer sets it, and the DLQ
/// producer is sized from it, so anything the consumer can hand over can be parked.
pub const MAX_RECEIVED_BYTES: usize = 100_000_000;

/// Room for a dead letter's headers (the original ones and ours) above its payload.
const HEADER_ALLOWANCE: usize = 1 << 20;

/// Why the DLQ cannot be used as configured (start-up).
#[derive(Debug, thiserror::Error)]
pub enum DlqCheckError {
    #[error(
        "KAFKA_DLQ_TOPIC {dlq_topic} accepts records of at most {dlq_max} bytes \
         (max.message.bytes), but topic {source_topic} accepts {source_max}: a dead letter of \
         it could not be parked. Raise the DLQ topic's max.message.bytes to at least {source_max}"
    )]
    TooSmall {
        dlq_topic: String,
        dlq_max: u64,
        source_topic: String,
        source_max: u64,
    },
    #[error("KAFKA_DLQ_TOPIC {0} does not exist; create it before starting")]
    Missing(String),
    #[error(
        "not allowed to read the configuration of topic {topic} ({code}): grant the consumer's \
         principal DESCRIBE_CONFIGS on it"
    )]
    NotAuthorized {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("cannot read topic configurations from the brokers: {0}")]
    Unreachable(#[source] KafkaError),
}

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
    /// Replaced when librdkafka reports a fatal error (the idempotent producer is then unusable).
    producer: Arc<RwLock<FutureProducer>>,
    config: ClientConfig,
    topic: String,
    group: String,
    instance: String,
    breaker: Arc<CircuitBreaker>,
    /// Dead letters blocked now; the circuit closes when it falls back to 0.
    blocked: Arc<std::sync::atomic::AtomicUsize>,
}

/// How long one produce attempt may take before it is retried; a failed DLQ write blocks the
/// commit, it is never dropped.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A dead letter not acknowledged for this long counts as blocked (opens the DLQ circuit)
/// whatever its errors say: an ACL or a broker that never acknowledges shows only as timeouts.
const BLOCKED_AFTER: Duration = Duration::from_secs(60);

/// One dead letter's part in the DLQ circuit (see [`DlqProducer::send`]).
struct BlockedLetter<'a> {
    producer: &'a DlqProducer,
    counted: bool,
}

impl<'a> BlockedLetter<'a> {
    fn new(producer: &'a DlqProducer) -> Self {
        Self {
            producer,
            counted: false,
        }
    }

    /// Counts this letter as blocked and opens the circuit; true the first time.
    fn block(&mut self) -> bool {
        self.producer.breaker.trip();
        if self.counted {
            return false;
        }
        self.counted = true;
        self.producer
            .blocked
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        true
    }
}

impl Drop for BlockedLetter<'_> {
    fn drop(&mut self) {
        if self.counted
            && self
                .producer
                .blocked
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
                == 1
        {
            // The last blocked letter went through: no other letter may close it before.
            self.producer.breaker.record_success();
        }
    }
}

impl DlqProducer {
    /// Creates the idempotent producer with the consumer's connection and security settings.
    /// `breaker` is the DLQ circuit (opened by a refusal that retrying cannot fix).
    pub fn new(
        settings: &KafkaSettings,
        instance_id: &str,
        breaker: Arc<CircuitBreaker>,
    ) -> Result<Self, KafkaError> {
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
        // Checked locally against the *uncompressed* record: librdkafka's 1,000,000-byte default
        // refused for ever a record the broker had taken compressed. After the pass-through
        // properties, so they cannot undersize it.
        let received = settings
            .client_properties
            .get("receive.message.max.bytes")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(MAX_RECEIVED_BYTES);
        config.set(
            "message.max.bytes",
            (received + HEADER_ALLOWANCE).min(1_000_000_000).to_string(),
        );
        Ok(Self {
            producer: Arc::new(RwLock::new(config.create()?)),
            config,
            topic: settings.dlq_topic.clone(),
            group: settings.group_id.clone(),
            instance: instance_id.to_owned(),
            breaker,
            blocked: Arc::default(),
        })
    }

    fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// After a fatal error librdkafka refuses every later send: start a new producer.
    fn replace_if_fatal(&self, used: &FutureProducer) {
        let Some((code, reason)) = used.client().fatal_error() else {
            return;
        };
        tracing::error!(?code, %reason, "the DLQ producer hit a fatal error; starting a new one");
        match self.config.create::<FutureProducer>() {
            Ok(fresh) => {
                let old = std::mem::replace(
                    &mut *self
                        .producer
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                    fresh,
                );
                // Destroying a librdkafka handle blocks while it purges: not on a runtime worker.
                std::thread::spawn(move || drop(old));
            }
            Err(error) => tracing::error!(%error, "cannot start a new DLQ producer"),
        }
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
        let first_attempt = std::time::Instant::now();
        // This letter's share of the DLQ circuit: counted once it is blocked, released (and
        // the circuit closed when no letter is blocked any more) when it goes through or the
        // process gives it up.
        let mut blocked = BlockedLetter::new(self);
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers.clone());
            if let Some(key) = letter.record.key.as_deref() {
                record = record.key(key);
            }
            if let Some(payload) = letter.record.payload.as_deref() {
                record = record.payload(payload);
            }
            let producer = self.producer();
            let attempt = producer.send(record, DELIVERY_TIMEOUT);
            let result = tokio::select! {
                result = attempt => result,
                () = cancel.cancelled() => return Err(DlqError::Cancelled),
            };
            let error = match result {
                Ok(_) => return Ok(()),
                Err((error, _)) => error,
            };
            let permanent = is_permanent(&error);
            // Retrying the same record will not help until an operator acts (a refusal), or
            // it has not helped for long (an ACL or a broker that never acknowledges shows as
            // a timeout): say so where it is seen (/ready, the circuit gauge, its alert) and
            // keep the commit back.
            if (permanent || first_attempt.elapsed() > BLOCKED_AFTER) && blocked.block() {
                tracing::error!(
                    topic = %letter.record.topic,
                    partition = letter.record.partition,
                    offset = letter.record.offset,
                    dlq_topic = %self.topic,
                    %error,
                    "the DLQ refuses the record; nothing is committed past it until this is fixed"
                );
            }
            if permanent {
                self.replace_if_fatal(&producer);
            }
            tracing::warn!(
                topic = %letter.record.topic,
                partition = letter.record.partition,
                offset = letter.record.offset,
                dlq_topic = %self.topic,
                %error,
                permanent,
                retry_in_ms = delay.as_millis() as u64,
                "DLQ produce failed; the commit waits until it succeeds"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => return Err(DlqError::Cancelled),
            }
            delay = (delay * 2).min(if permanent {
                self.breaker.cooldown()
            } else {
                Duration::from_secs(10)
            });
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
        if let Err(error) = self.producer().flush(timeout) {
            tracing::warn!(%error, "DLQ producer did not flush in time");
        }
    }
}

/// Produce errors that no retry of the same record fixes: the record is too large for the
/// producer or the topic, the topic is missing or not ours to write, or the idempotent producer
/// failed for good.
fn is_permanent(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::MessageBatchTooLarge
                | Code::InvalidRecord
                | Code::UnknownTopic
                | Code::UnknownTopicOrPartition
                | Code::TopicAuthorizationFailed
                | Code::ClusterAuthorizationFailed
                | Code::TransactionalIdAuthorizationFailed
                | Code::Fatal
                | Code::InvalidProducerEpoch
                | Code::ProducerFenced
                | Code::OutOfOrderSequenceNumber
                | Code::UnsupportedForMessageFormat
                | Code::PolicyViolation
        )
    )
}

/// Reads `max.message.bytes` of the DLQ topic and of the source topics, and refuses a DLQ that
/// could not hold what the source topics accept. Source topics that do not exist yet are
/// skipped (the consumer waits for them).
pub async fn check_topic_sizes(settings: &KafkaSettings) -> Result<(), DlqCheckError> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", settings.brokers.join(","));
    for (name, value) in &settings.client_properties {
        config.set(name, value);
    }
    if let Some(password) = &settings.sasl_password {
        config.set(
            "sasl.password",
            secrecy::ExposeSecret::expose_secret(password),
        );
    }
    let admin: AdminClient<DefaultClientContext> =
        config.create().map_err(DlqCheckError::Unreachable)?;
    let topics: Vec<&str> = std::iter::once(settings.dlq_topic.as_str())
        .chain(settings.topics.iter().map(String::as_str))
        .collect();
    let specifiers: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let not_authorized = |code: &RDKafkaErrorCode| {
        matches!(
            code,
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
        )
    };
    let results = admin
        .describe_configs(
            &specifiers,
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|error| match error {
            KafkaError::AdminOp(code) if not_authorized(&code) => DlqCheckError::NotAuthorized {
                topic: settings.dlq_topic.clone(),
                code,
            },
            other => DlqCheckError::Unreachable(other),
        })?;
    let mut sizes = Vec::with_capacity(topics.len());
    for (topic, result) in topics.iter().zip(results) {
        let size = match result {
            Ok(resource) => resource
                .get("max.message.bytes")
                .and_then(|entry| entry.value.as_deref())
                .and_then(|v| v.parse::<u64>().ok()),
            Err(RDKafkaErrorCode::UnknownTopicOrPartition) => None,
            Err(code) if not_authorized(&code) => {
                return Err(DlqCheckError::NotAuthorized {
                    topic: (*topic).to_owned(),
                    code,
                });
            }
            Err(code) => {
                return Err(DlqCheckError::Unreachable(KafkaError::AdminOp(code)));
            }
        };
        sizes.push((*topic, size));
    }
    let Some(dlq_max) = sizes[0].1 else {
        return Err(DlqCheckError::Missing(settings.dlq_topic.clone()));
    };
    let largest = sizes[1..]
        .iter()
        .filter_map(|(topic, size)| Some((*topic, (*size)?)))
        .max_by_key(|(_, size)| *size);
    match largest {
        Some((topic, source_max)) if source_max > dlq_max => Err(DlqCheckError::TooSmall {
            dlq_topic: settings.dlq_topic.clone(),
            dlq_max,
            source_topic: topic.to_owned(),
            source_max,
        }),
        _ => Ok(()),
    }
}

/// A dead letter that could not be confirmed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("stopped before the DLQ acknowledged the record")]
    Cancelled,
}
