//! Realistic audit events (300 B – 4 KB, the contract's fields, nested before/after values) and
//! the two producers: one at full speed for the pre-loaded corpus, one paced at a fixed rate
//! whose events carry their produce time as `timestamp`.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{FixedOffset, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use serde_json::{Value, json};
use uuid::Uuid;

/// One event of the corpus: which of the four topics it goes to, its id (the record key) and
/// its payload bytes.
pub struct CorpusEvent {
    pub topic: usize,
    pub id: Uuid,
    pub payload: Vec<u8>,
}

/// The pre-generated corpus, kept in memory so the produce rate measures Kafka and so the
/// limit runs store exactly the same bytes.
pub struct Corpus {
    pub events: Vec<CorpusEvent>,
}

impl Corpus {
    pub fn generate(count: usize, seed: u64) -> Corpus {
        let mut rng = StdRng::seed_from_u64(seed);
        let now = Utc::now();
        let events = (0..count)
            .map(|n| {
                let topic = n % 4;
                // Event times spread over the last hour, a quarter of them in CET.
                let at = now - chrono::Duration::milliseconds(rng.random_range(0..3_600_000));
                let timestamp = if n % 4 == 3 {
                    let cet = FixedOffset::east_opt(3600).expect("+01:00 is a valid offset");
                    at.with_timezone(&cet)
                        .to_rfc3339_opts(SecondsFormat::Millis, false)
                } else {
                    at.to_rfc3339_opts(SecondsFormat::Millis, true)
                };
                let id = random_v4(&mut rng);
                let payload = event_payload(&mut rng, id, topic, n, &timestamp, None);
                CorpusEvent { topic, id, payload }
            })
            .collect();
        Corpus { events }
    }

    pub fn bytes(&self) -> usize {
        self.events.iter().map(|e| e.payload.len()).sum()
    }

    /// Smallest, mean and largest payload in bytes.
    pub fn size_stats(&self) -> (usize, f64, usize) {
        let min = self
            .events
            .iter()
            .map(|e| e.payload.len())
            .min()
            .unwrap_or(0);
        let max = self
            .events
            .iter()
            .map(|e| e.payload.len())
            .max()
            .unwrap_or(0);
        let mean = self.bytes() as f64 / self.events.len().max(1) as f64;
        (min, mean, max)
    }
}

/// A v4 UUID from the seeded generator (reproducible corpora).
fn random_v4(rng: &mut StdRng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.random()).into_uuid()
}

const WORDS: &[&str] = &[
    "inspection",
    "observed",
    "humidity",
    "within",
    "tolerance",
    "per",
    "SOP-CULT-014",
    "batch",
    "released",
    "after",
    "QA",
    "review",
    "deviation",
    "closed",
    "witness",
    "signed",
    "label",
    "reprinted",
    "scale",
    "calibrated",
    "sample",
    "retained",
    "for",
    "stability",
    "testing",
    "ledger",
    "entry",
    "reconciled",
    "with",
    "invoice",
    "approved",
    "by",
    "controller",
    "the",
    "room",
    "temperature",
    "logged",
    "and",
    "checked",
    "against",
    "limits",
];

/// Free text of about `len` bytes (ASCII words).
fn text(rng: &mut StdRng, len: usize) -> String {
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    out.truncate(len);
    out
}

/// Entity type of an event on `topic` (index into the four topics).
fn entity_type(topic: usize, n: usize) -> &'static str {
    match topic {
        0 if n.is_multiple_of(8) => "batch",
        0 => "plant",
        1 => "transaction",
        2 => "user",
        _ => "system",
    }
}

/// One event payload. Sizes follow a skewed mix: 30 % small system-style events (300–700 B),
/// 55 % typical changes with before/after values (700–1,600 B), 15 % large ones (1.6–4 KB, long
/// notes). `entity_override` marks the paced phases' events (`steady`, `recovery`).
pub fn event_payload(
    rng: &mut StdRng,
    id: Uuid,
    topic: usize,
    n: usize,
    timestamp: &str,
    entity_override: Option<&str>,
) -> Vec<u8> {
    let entity = entity_override.unwrap_or_else(|| entity_type(topic, n));
    let pick = rng.random_range(0.0..1.0);
    let trace_id = format!("{:032x}", rng.random::<u128>());
    let mut event = if pick < 0.30 {
        let (action, category) = [
            ("CONFIG_CHANGED", "SYSTEM_EVENT"),
            ("LOGIN", "SECURITY_EVENT"),
            ("BACKUP_COMPLETED", "SYSTEM_EVENT"),
            ("EXPORT", "COMPLIANCE_EVENT"),
        ][rng.random_range(0..4)];
        json!({
            "event_id": id.to_string(),
            "timestamp": timestamp,
            "entity_type": entity,
            "entity_id": format!("{entity}-{:05}", rng.random_range(0..20_000)),
            "action": action,
            "user_id": format!("svc-{}", rng.random_range(0..8)),
            "trace_id": trace_id,
            "risk_level": "LOW",
            "category": category
        })
    } else {
        let action = ["CREATE", "UPDATE", "APPROVE", "TRANSITION", "SIGN"][rng.random_range(0..5)];
        let risk = ["LOW", "MEDIUM", "HIGH"][rng.random_range(0..3)];
        let user = rng.random_range(0..500);
        let display_name = ["Dr. Jana Nováková", "Max Müller", "Ana López", "Li Wei"][user % 4];
        json!({
            "event_id": id.to_string(),
            "timestamp": timestamp,
            "entity_type": entity,
            "entity_id": format!("{entity}-{:05}", rng.random_range(0..20_000)),
            "action": action,
            "user_id": format!("user-{user}"),
            "user_display_name": display_name,
            "trace_id": trace_id,
            "session_id": format!("sess-{:016x}", rng.random::<u64>()),
            "correlation_id": format!("corr-{}", n / 10),
            "old_value": {
                "stage": "VEGETATIVE",
                "room": format!("B{}", rng.random_range(1..9)),
                "readings": {"ph": 6.1, "ec": 1.8, "temp_c": 24.5},
                "quantity": rng.random_range(1..1000)
            },
            "new_value": {
                "stage": "FLOWERING",
                "room": format!("B{}", rng.random_range(1..9)),
                "readings": {"ph": 6.0, "ec": 2.0, "temp_c": 23.9},
                "quantity": rng.random_range(1..1000)
            },
            "reason": "Scheduled transition per SOP-CULT-014",
            "signature_id": format!("sig-{:08x}", rng.random::<u32>()),
            "metadata": {
                "source": "cultivation-service",
                "version": "2.4.1",
                "ip_address": format!("10.0.{}.{}", rng.random_range(0..255), rng.random_range(1..255)),
                "user_agent": "gacp-erp/2.4.1 (linux; x86_64)",
                "api_version": "v1"
            },
            "module": "cultivation",
            "risk_level": risk,
            "compliance_flags": ["GACP", "ALCOA+", "21CFR11"],
            "source_system": "gacp-erp",
            "event_version": "1.0",
            "category": "USER_ACTION"
        })
    };
    let target: usize = if pick < 0.30 {
        rng.random_range(300..700)
    } else if pick < 0.85 {
        rng.random_range(700..1600)
    } else {
        rng.random_range(1600..4000)
    };
    let base = serde_json::to_vec(&event).unwrap_or_default().len();
    // `"reason":"…"` (small) or `"notes":"…"` inside new_value adds 11 bytes of framing.
    let pad = target.saturating_sub(base + 12);
    if pad > 0 {
        let filler = Value::String(text(rng, pad));
        if pick < 0.30 {
            event["reason"] = filler;
        } else {
            event["new_value"]["notes"] = filler;
        }
    }
    serde_json::to_vec(&event).unwrap_or_default()
}

/// Counts deliveries and keeps the first failure.
#[derive(Default)]
pub struct Deliveries {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub first_error: Mutex<Option<String>>,
}

#[derive(Clone, Default)]
pub struct CountingContext(pub Arc<Deliveries>);

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.0.first_error.lock() {
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

/// An idempotent producer (acks=all) with large batches.
pub fn producer(brokers: &str) -> anyhow::Result<ThreadedProducer<CountingContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "10")
        .set("batch.size", "1000000")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create_with_context(CountingContext::default())
        .context("creating the producer")
}

/// Sends one record, waiting while librdkafka's queue is full.
fn send(
    producer: &ThreadedProducer<CountingContext>,
    topic: &str,
    key: &[u8],
    payload: &[u8],
) -> anyhow::Result<()> {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => bail!("producing to {topic}: {e}"),
        }
    }
}

fn finish(producer: &ThreadedProducer<CountingContext>, expected: u64) -> anyhow::Result<()> {
    producer
        .flush(Duration::from_secs(120))
        .context("flushing the producer")?;
    let d = &producer.context().0;
    let failed = d.failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = d.first_error.lock().ok().and_then(|f| f.clone());
        bail!("{failed} records were not delivered; first error: {first:?}");
    }
    let ok = d.ok.load(Ordering::Relaxed);
    if ok != expected {
        bail!("{ok} records acknowledged, {expected} sent");
    }
    Ok(())
}

/// Produces the whole corpus as fast as the producer goes; returns the time until every
/// record was acknowledged.
pub fn produce_all(brokers: &str, topics: &[String], corpus: &Corpus) -> anyhow::Result<Duration> {
    let producer = producer(brokers)?;
    let started = Instant::now();
    let mut key = Uuid::encode_buffer();
    for event in &corpus.events {
        let key = event.id.hyphenated().encode_lower(&mut key);
        send(
            &producer,
            &topics[event.topic],
            key.as_bytes(),
            &event.payload,
        )?;
    }
    finish(&producer, corpus.events.len() as u64)?;
    Ok(started.elapsed())
}

/// What a paced producer did.
#[derive(Debug, Clone, Copy)]
pub struct Paced {
    pub sent: u64,
    pub elapsed: Duration,
}

/// Produces `rate` events per second, round-robin over the topics, until `stop` is set or
/// `duration` passed. Each event's `timestamp` is its produce time (RFC 3339, millis, Z) and
/// its entity type is `entity`, so its rows can be found in PostgreSQL.
pub fn produce_paced(
    brokers: &str,
    topics: &[String],
    rate: f64,
    duration: Option<Duration>,
    stop: &AtomicBool,
    entity: &str,
    seed: u64,
) -> anyhow::Result<Paced> {
    let producer = producer(brokers)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut key = Uuid::encode_buffer();
    loop {
        let elapsed = started.elapsed();
        if stop.load(Ordering::Relaxed) || duration.is_some_and(|d| elapsed >= d) {
            break;
        }
        let due = (elapsed.as_secs_f64() * rate) as u64;
        while sent < due {
            let topic = (sent % topics.len() as u64) as usize;
            let id = random_v4(&mut rng);
            let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
            let payload = event_payload(&mut rng, id, topic, sent as usize, &now, Some(entity));
            let key = id.hyphenated().encode_lower(&mut key);
            send(&producer, &topics[topic], key.as_bytes(), &payload)?;
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = started.elapsed();
    finish(&producer, sent)?;
    Ok(Paced { sent, elapsed })
}
