//! Developer tool for the local stack: produces a realistic audit corpus (plus some invalid
//! events and one conflicting duplicate), waits until the daemon has committed all of it, and
//! prints what ended up where: immudb, PostgreSQL, and the DLQ by reason.
//!
//! Reads the same environment as the daemon (`deploy/local/stack.sh env`); `make demo` drives it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::json;
use uuid::Uuid;

use audit_consumer::config::{Settings, Sources};
use audit_consumer::event::payload_sha256;
use audit_consumer::immudb::ImmudbClient;

#[derive(Parser)]
#[command(about = "Produce a sample audit corpus and report where it was stored")]
struct Args {
    /// Valid events to produce, spread over the configured topics.
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Partitions per topic when the topics are created.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// How long to wait for the daemon to commit everything.
    #[arg(long, default_value = "300s", value_parser = audit_consumer::config::parse_duration)]
    timeout: Duration,
}

/// Topic, key and payload of one record to produce.
type Outgoing = (String, Option<Vec<u8>>, Vec<u8>);

const ENTITY_TYPES: [&str; 4] = ["plant", "batch", "transaction", "user"];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(&Sources::process(None))?.settings;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args, settings))
}

async fn run(args: Args, settings: Settings) -> anyhow::Result<()> {
    let brokers = settings.kafka.brokers.join(",");
    create_topics(&brokers, &settings, args.partitions).await?;

    let mut ids = Vec::with_capacity(args.events);
    let mut records: Vec<Outgoing> = Vec::with_capacity(args.events + 16);
    for n in 0..args.events {
        let id = Uuid::new_v4();
        let topic = &settings.kafka.topics[n % settings.kafka.topics.len()];
        let entity_type = ENTITY_TYPES[n % ENTITY_TYPES.len()];
        ids.push((id, entity_type));
        records.push((
            topic.clone(),
            Some(id.to_string().into_bytes()),
            sample_event(id, entity_type, n),
        ));
    }
    let topic0 = settings.kafka.topics[0].clone();
    for (name, payload) in invalid_samples() {
        records.push((
            topic0.clone(),
            Some(format!("invalid-{name}").into_bytes()),
            payload,
        ));
    }
    // The first event again with one field changed: a conflict, never an overwrite.
    let (first_id, first_type) = ids[0];
    let mut altered: serde_json::Value =
        serde_json::from_slice(&sample_event(first_id, first_type, 0))?;
    altered["new_value"] = json!({"status": "ALTERED"});
    records.push((
        settings.kafka.topics[0].clone(),
        Some(first_id.to_string().into_bytes()),
        serde_json::to_vec(&altered)?,
    ));

    let started = Instant::now();
    produce(&brokers, &records).await?;
    println!(
        "produced {} records ({} valid, {} invalid, 1 conflicting duplicate) in {:.1}s",
        records.len(),
        args.events,
        invalid_samples().len(),
        started.elapsed().as_secs_f64()
    );

    let after_produce = Instant::now();
    wait_committed(&brokers, &settings, args.timeout).await?;
    let total = started.elapsed().as_secs_f64();
    println!(
        "the daemon stored and committed all of it {:.1}s after the last record was produced and \
         {total:.1}s after the first (≈{:.0} records/s end to end, consuming while they were produced)",
        after_produce.elapsed().as_secs_f64(),
        records.len() as f64 / total.max(0.001)
    );
    summary(&settings, &ids).await
}

async fn create_topics(brokers: &str, settings: &Settings, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let mut topics: Vec<NewTopic<'_>> = settings
        .kafka
        .topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    topics.push(NewTopic::new(
        &settings.kafka.dlq_topic,
        1,
        TopicReplication::Fixed(1),
    ));
    for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
        match result {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, e)) => bail!("creating topic {topic}: {e}"),
        }
    }
    Ok(())
}

async fn produce(brokers: &str, records: &[Outgoing]) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "10")
        .create()?;
    for chunk in records.chunks(5000) {
        let sends = chunk.iter().map(|(topic, key, payload)| {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
            if let Some(key) = key {
                record = record.key(key);
            }
            producer.send(record, Duration::from_secs(30))
        });
        for result in futures::future::join_all(sends).await {
            result.map_err(|(e, _)| e).context("producing")?;
        }
    }
    Ok(())
}

/// Waits until the group's committed offsets reach the end of every partition.
async fn wait_committed(
    brokers: &str,
    settings: &Settings,
    timeout: Duration,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", &settings.kafka.group_id)
        .create()?;
    let mut ends = Vec::new();
    for topic in &settings.kafka.topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for partition in metadata.topics()[0].partitions() {
            let (_, high) =
                consumer.fetch_watermarks(topic, partition.id(), Duration::from_secs(10))?;
            ends.push((topic.clone(), partition.id(), high));
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        let mut list = TopicPartitionList::new();
        for (topic, partition, _) in &ends {
            list.add_partition(topic, *partition);
        }
        let committed = consumer.committed_offsets(list, Duration::from_secs(10))?;
        let done = ends.iter().all(|(topic, partition, high)| {
            *high == 0
                || committed
                    .find_partition(topic, *partition)
                    .is_some_and(|e| e.offset() == Offset::Offset(*high))
        });
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the daemon did not commit everything within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn summary(settings: &Settings, ids: &[(Uuid, &str)]) -> anyhow::Result<()> {
    let immudb =
        ImmudbClient::connect(audit_consumer::app::immudb_options(&settings.immudb)?).await?;
    let mut in_immudb = 0usize;
    let mut single_revision = 0usize;
    for chunk in ids.chunks(1000) {
        let keys: Vec<Vec<u8>> = chunk
            .iter()
            .map(|(id, t)| format!("audit:{t}:{id}").into_bytes())
            .collect();
        for entry in immudb.get_all(&keys).await? {
            in_immudb += 1;
            single_revision += usize::from(entry.revision == 1);
        }
    }

    let pg = audit_consumer::postgres::connect(&settings.postgres).await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_trail")
        .fetch_one(&pg)
        .await?;
    let (first_id, first_type) = ids[0];
    let (key, tx, digest, topic, partition, offset): (String, i64, Vec<u8>, String, i32, i64) = sqlx::query_as(
        "SELECT immudb_key, immudb_tx, payload_sha256, source_topic, source_partition, source_offset \
         FROM audit_trail WHERE event_id = $1",
    )
    .bind(first_id)
    .fetch_one(&pg)
    .await?;
    let stored = immudb
        .get(key.as_bytes())
        .await?
        .context("the sample event is missing in immudb")?;

    let dlq = dlq_by_reason(settings)?;
    println!();
    println!("| store | count |");
    println!("|---|---|");
    println!("| valid events produced | {} |", ids.len());
    println!("| in immudb (one revision each) | {in_immudb} ({single_revision}) |");
    println!("| rows in PostgreSQL audit_trail | {rows} |");
    for ((class, stage), count) in &dlq {
        println!("| DLQ {class} at {stage} | {count} |");
    }
    println!();
    println!("sample event {first_id} ({first_type}) from {topic}[{partition}]@{offset}:");
    println!("  immudb key      {key}");
    println!(
        "  immudb tx       {tx} (entry tx {}, revision {})",
        stored.tx, stored.revision
    );
    println!("  payload_sha256  {}", hex::encode(&digest));
    println!(
        "  sha256(immudb)  {}",
        hex::encode(payload_sha256(&stored.value))
    );
    immudb.close().await;
    if in_immudb != ids.len()
        || rows as usize != ids.len()
        || payload_sha256(&stored.value).as_slice() != digest
    {
        bail!("the stores do not hold exactly the valid events");
    }
    Ok(())
}

fn dlq_by_reason(settings: &Settings) -> anyhow::Result<BTreeMap<(String, String), usize>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", settings.kafka.brokers.join(","))
        .set("group.id", format!("loadgen-dlq-{}", Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata =
        consumer.fetch_metadata(Some(&settings.kafka.dlq_topic), Duration::from_secs(10))?;
    let mut expected = 0;
    for partition in metadata.topics()[0].partitions() {
        let (low, high) = consumer.fetch_watermarks(
            &settings.kafka.dlq_topic,
            partition.id(),
            Duration::from_secs(10),
        )?;
        expected += high - low;
    }
    consumer.subscribe(&[&settings.kafka.dlq_topic])?;
    let mut counts = BTreeMap::new();
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen < expected && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        seen += 1;
        let header = |name: &str| {
            message
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == name))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        *counts
            .entry((header("dlq.error.class"), header("dlq.error.stage")))
            .or_insert(0) += 1;
    }
    Ok(counts)
}

/// A realistic event of 300 B – 4 KB with nested before/after values.
fn sample_event(id: Uuid, entity_type: &str, n: usize) -> Vec<u8> {
    let notes: String = "Observed during routine GACP inspection. ".repeat(n % 60);
    let action = ["CREATE", "UPDATE", "APPROVE", "HARVEST"][n % 4];
    let risk_level = ["LOW", "MEDIUM", "HIGH"][n % 3];
    json!({
        "event_id": id.to_string(),
        "timestamp": "2026-11-23T10:15:30.250+01:00",
        "entity_type": entity_type,
        "entity_id": format!("{entity_type}-{:05}", n % 5000),
        "action": action,
        "user_id": format!("user-{}", n % 50),
        "user_display_name": "Dr. Jana Nováková",
        "trace_id": format!("{:032x}", n),
        "correlation_id": format!("corr-{}", n / 10),
        "old_value": {"stage": "VEGETATIVE", "room": "B2", "readings": {"ph": 6.1, "ec": 1.8}},
        "new_value": {"stage": "FLOWERING", "room": "B2", "readings": {"ph": 6.0, "ec": 2.0}, "notes": notes},
        "reason": "Scheduled transition per SOP-CULT-014",
        "metadata": {"source": "cultivation-service", "version": "2.4.1", "ip_address": "10.0.4.17", "api_version": "v1"},
        "module": "cultivation",
        "risk_level": risk_level,
        "compliance_flags": ["GACP", "ALCOA+"],
        "source_system": "gacp-erp",
        "event_version": "1.0",
        "category": "USER_ACTION"
    })
    .to_string()
    .into_bytes()
}

fn invalid_samples() -> Vec<(&'static str, Vec<u8>)> {
    let good = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&sample_event(Uuid::new_v4(), "plant", 1)).unwrap_or_default();
        f(&mut v);
        serde_json::to_vec(&v).unwrap_or_default()
    };
    vec![
        ("not-json", b"this is not json".to_vec()),
        ("empty", Vec::new()),
        (
            "missing-user",
            good(&|v| {
                v.as_object_mut().map(|o| o.remove("user_id"));
            }),
        ),
        ("bad-uuid", good(&|v| v["event_id"] = json!("not-a-uuid"))),
        (
            "no-offset",
            good(&|v| v["timestamp"] = json!("2026-11-23T10:15:30")),
        ),
        ("bad-risk", good(&|v| v["risk_level"] = json!("CRITICAL"))),
        ("bad-category", good(&|v| v["category"] = json!("OTHER"))),
        (
            "entity-type-colon",
            good(&|v| v["entity_type"] = json!("plant:evil")),
        ),
    ]
}
