//! What the stores and Kafka can do on this machine without the daemon, with the same payloads
//! and batch size: immudb `set_all` (one transaction per batch, `KeyMustNotExist`, keys like
//! the daemon's), PostgreSQL `insert_batch` (the daemon's single UNNEST statement), each with
//! one writer and with four concurrent writers (one per topic, like the daemon), into fresh
//! databases and schemas; and a plain Kafka consumer reading the corpus back.
//!
//! The corpus is decoded chunk by chunk outside the timed sections (decoding is reported as
//! its own single-core rate), and the four runs alternate chunk by chunk so that background
//! noise on a shared machine spreads over all of them alike.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use audit_consumer::event::{AuditEvent, decode, payload_sha256};
use audit_consumer::immudb::{ImmudbClient, ImmudbConnectOptions, KeyValue};
use audit_consumer::postgres::{ReplicaRow, insert_batch};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::corpus::Corpus;
use crate::world::{WRITER_PASSWORD, World};

/// Events decoded and written per round; bounds the memory of decoded events.
const CHUNK: usize = 100_000;

/// Measured rates, events per second.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Limits {
    pub events: usize,
    pub immudb_1: f64,
    pub immudb_4: f64,
    pub postgres_1: f64,
    pub postgres_4: f64,
    pub kafka_consume: f64,
    pub kafka_consume_mib_s: f64,
    pub decode_1_core: f64,
}

impl Limits {
    pub fn immudb(&self) -> f64 {
        self.immudb_1.max(self.immudb_4)
    }

    pub fn postgres(&self) -> f64 {
        self.postgres_1.max(self.postgres_4)
    }

    /// immudb then PostgreSQL one after the other for every batch.
    pub fn sequential(&self) -> f64 {
        1.0 / (1.0 / self.immudb() + 1.0 / self.postgres())
    }

    /// The slowest of immudb, PostgreSQL and Kafka, and its name.
    pub fn slowest(&self) -> (&'static str, f64) {
        [
            ("immudb", self.immudb()),
            ("PostgreSQL", self.postgres()),
            ("Kafka consume", self.kafka_consume),
        ]
        .into_iter()
        .fold(
            ("none", f64::INFINITY),
            |a, b| if b.1 < a.1 { b } else { a },
        )
    }
}

/// The immudb and PostgreSQL limits over the first `count` events of the corpus.
pub async fn stores(
    world: &World,
    corpus: Arc<Corpus>,
    count: usize,
    batch: usize,
) -> anyhow::Result<Limits> {
    let immudb_1 = immudb_client(world, &format!("{}seq", world.id)).await?;
    let immudb_4 = immudb_client(world, &format!("{}par", world.id)).await?;
    let pg_1 = writer_pool(world, &format!("{}_limseq", world.id)).await?;
    let pg_4 = writer_pool(world, &format!("{}_limpar", world.id)).await?;
    let topics: Arc<Vec<String>> = Arc::new(world.topics.clone());

    let (mut decode_time, mut imm1, mut imm4, mut pg1, mut pg4) = Default::default();
    let count = count.min(corpus.events.len());
    let mut start = 0;
    while start < count {
        let end = (start + CHUNK).min(count);
        let started = Instant::now();
        let mut events = Vec::with_capacity(end - start);
        for (i, e) in corpus.events[start..end].iter().enumerate() {
            let event = decode(&e.payload)
                .map_err(|err| anyhow::anyhow!("corpus event {} is invalid: {err}", start + i))?;
            events.push(event);
        }
        decode_time += started.elapsed();
        let chunk = Arc::new(Chunk {
            start,
            keys: events.iter().map(AuditEvent::immudb_key).collect(),
            digests: corpus.events[start..end]
                .iter()
                .map(|e| payload_sha256(&e.payload))
                .collect(),
            events,
            corpus: corpus.clone(),
            topics: topics.clone(),
        });
        imm1 += run_immudb(&immudb_1, &chunk, 1, batch).await?;
        imm4 += run_immudb(&immudb_4, &chunk, 4, batch).await?;
        pg1 += run_postgres(&pg_1, &chunk, 1, batch).await?;
        pg4 += run_postgres(&pg_4, &chunk, 4, batch).await?;
        println!(
            "  limits: {end}/{count} events (immudb 1/4 writers {:.0}/{:.0} ev/s, PostgreSQL 1/4 {:.0}/{:.0} ev/s)",
            end as f64 / secs(imm1),
            end as f64 / secs(imm4),
            end as f64 / secs(pg1),
            end as f64 / secs(pg4)
        );
        start = end;
    }
    immudb_1.close().await;
    immudb_4.close().await;
    pg_1.close().await;
    pg_4.close().await;
    let rate = |d: Duration| count as f64 / secs(d);
    Ok(Limits {
        events: count,
        immudb_1: rate(imm1),
        immudb_4: rate(imm4),
        postgres_1: rate(pg1),
        postgres_4: rate(pg4),
        decode_1_core: rate(decode_time),
        ..Limits::default()
    })
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

/// A decoded slice of the corpus, shared by the writer tasks.
struct Chunk {
    start: usize,
    events: Vec<AuditEvent>,
    keys: Vec<String>,
    digests: Vec<[u8; 32]>,
    corpus: Arc<Corpus>,
    topics: Arc<Vec<String>>,
}

impl Chunk {
    /// Indices (into the chunk) per writer: all in corpus order for one writer, by topic for
    /// four (the daemon runs one writer per topic).
    fn lanes(&self, writers: usize) -> Vec<Vec<usize>> {
        let mut lanes = vec![Vec::new(); writers];
        for i in 0..self.events.len() {
            let topic = self.corpus.events[self.start + i].topic;
            lanes[topic % writers].push(i);
        }
        lanes
    }
}

async fn immudb_client(world: &World, database: &str) -> anyhow::Result<ImmudbClient> {
    let s = &world.stack;
    ImmudbClient::connect(ImmudbConnectOptions {
        host: s.immudb_host.clone(),
        port: s.immudb_port,
        database: database.to_owned(),
        username: s.immudb_user.clone(),
        password: s.immudb_password.clone().into(),
        tls: None,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(60),
        create_database: true,
        // The daemon's setting: the limit is measured with the server settings it runs with.
        sync_frequency: Some(audit_consumer::config::default_duration(
            "immudb.sync_frequency",
        )),
    })
    .await
    .with_context(|| format!("connecting to immudb database {database}"))
}

/// A fresh migrated schema and a pool of the world's writer login in it (the daemon's pool
/// size, 8).
async fn writer_pool(world: &World, schema: &str) -> anyhow::Result<PgPool> {
    world.migrate(schema)?;
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(world.pg_options(schema, &world.writer_user(), WRITER_PASSWORD))
        .await
        .with_context(|| format!("connecting to PostgreSQL schema {schema}"))
}

/// Writes the chunk with `writers` concurrent tasks; returns the wall time.
async fn run_immudb(
    client: &ImmudbClient,
    chunk: &Arc<Chunk>,
    writers: usize,
    batch: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let tasks: Vec<_> = chunk
        .lanes(writers)
        .into_iter()
        .map(|lane| {
            let client = client.clone();
            let chunk = chunk.clone();
            tokio::spawn(async move {
                for indices in lane.chunks(batch) {
                    let kvs: Vec<KeyValue> = indices
                        .iter()
                        .map(|&i| KeyValue {
                            key: chunk.keys[i].as_bytes().to_vec(),
                            value: chunk.corpus.events[chunk.start + i].payload.clone(),
                        })
                        .collect();
                    client.set_all(&kvs, true).await.context("immudb set_all")?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await.context("immudb writer task")??;
    }
    Ok(started.elapsed())
}

/// Inserts the chunk with `writers` concurrent tasks; returns the wall time.
async fn run_postgres(
    pool: &PgPool,
    chunk: &Arc<Chunk>,
    writers: usize,
    batch: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let tasks: Vec<_> = chunk
        .lanes(writers)
        .into_iter()
        .map(|lane| {
            let pool = pool.clone();
            let chunk = chunk.clone();
            tokio::spawn(async move {
                for (n, indices) in lane.chunks(batch).enumerate() {
                    let rows: Vec<ReplicaRow<'_>> = indices
                        .iter()
                        .map(|&i| {
                            let at = chunk.start + i;
                            let topic = chunk.corpus.events[at].topic;
                            ReplicaRow {
                                event: &chunk.events[i],
                                immudb_key: &chunk.keys[i],
                                immudb_tx: n as u64 + 1,
                                immudb_verified: false,
                                payload_sha256: &chunk.digests[i],
                                topic: &chunk.topics[topic],
                                partition: (at % 3) as i32,
                                offset: at as i64,
                            }
                        })
                        .collect();
                    let outcome = insert_batch(&pool, &rows)
                        .await
                        .map_err(|e| anyhow::anyhow!("PostgreSQL insert_batch: {e}"))?;
                    if outcome.inserted != rows.len() {
                        bail!("inserted {} of {} rows", outcome.inserted, rows.len());
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await.context("PostgreSQL writer task")??;
    }
    Ok(started.elapsed())
}

/// Reads every corpus record back with a plain consumer (fresh group, the daemon's fetch
/// settings) up to the end offsets the corpus produced; events/s and MiB/s from the first
/// record to the last.
pub fn kafka_consume(
    world: &World,
    ends: &[(String, i32, i64)],
) -> anyhow::Result<(f64, f64, usize)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &world.stack.brokers)
        .set("group.id", format!("{}-raw", world.id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("queued.max.messages.kbytes", "16384")
        .set("fetch.max.bytes", "16777216")
        .create()
        .context("raw consumer")?;
    let mut list = TopicPartitionList::new();
    let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
    for (topic, partition, high) in ends {
        list.add_partition_offset(topic, *partition, Offset::Beginning)?;
        if *high > 0 {
            remaining.insert((topic.clone(), *partition), *high);
        }
    }
    consumer.assign(&list).context("assign")?;
    let expected: i64 = ends.iter().map(|(_, _, h)| h).sum();
    let (mut count, mut bytes) = (0usize, 0usize);
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            bail!("raw consume: {count} of {expected} records after 600 s");
        }
        let Some(message) = consumer.poll(Duration::from_secs(1)) else {
            continue;
        };
        let message = message.context("raw consume")?;
        let key = (message.topic().to_owned(), message.partition());
        let Some(&high) = remaining.get(&key) else {
            continue;
        };
        if message.offset() < high {
            first.get_or_insert_with(Instant::now);
            count += 1;
            bytes += message.payload().map_or(0, <[u8]>::len);
        }
        if message.offset() + 1 >= high {
            remaining.remove(&key);
        }
    }
    let elapsed = first.map_or(Duration::ZERO, |f| f.elapsed());
    Ok((
        count as f64 / secs(elapsed),
        bytes as f64 / (1024.0 * 1024.0) / secs(elapsed),
        count,
    ))
}
