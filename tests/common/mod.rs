//! Test harness: every test owns its world on the real local stack (`deploy/local/stack.sh up`):
//! its own topics, consumer group, DLQ topic, immudb database and PostgreSQL schema, so tests
//! run in parallel and can be rerun. The daemon runs as the real binary in a child process.
//! Waiting is always on a condition with a deadline, never a bare sleep.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod idp;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use audit_consumer::immudb::{ImmudbClient, ImmudbConnectOptions};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::time::Instant;

/// Password of each test's least-privilege login (a member of `audit_writer`).
pub const WRITER_PASSWORD: &str = "audit-writer-test";

/// Password of each test's read-side login (a member of `audit_reader`).
pub const READER_PASSWORD: &str = "audit-reader-test";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Connection facts of the local stack (from `stack.sh env`, with its defaults).
#[derive(Debug, Clone)]
pub struct Stack {
    pub brokers: String,
    pub immudb_host: String,
    pub immudb_port: u16,
    pub immudb_user: String,
    pub immudb_password: String,
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_database: String,
    pub pg_user: String,
    pub pg_password: String,
    pub script: PathBuf,
}

impl Stack {
    pub fn from_env() -> Self {
        Stack {
            brokers: env_or("KAFKA_BROKERS", "127.0.0.1:19092"),
            immudb_host: env_or("IMMUDB_HOST", "127.0.0.1"),
            immudb_port: env_or("IMMUDB_PORT", "13322").parse().expect("IMMUDB_PORT"),
            immudb_user: env_or("IMMUDB_USERNAME", "immudb"),
            immudb_password: env_or("IMMUDB_PASSWORD", "immudb-local-admin"),
            pg_host: env_or("POSTGRES_HOST", "127.0.0.1"),
            pg_port: env_or("POSTGRES_PORT", "15432")
                .parse()
                .expect("POSTGRES_PORT"),
            pg_database: env_or("POSTGRES_DATABASE", "audit"),
            pg_user: env_or("POSTGRES_USERNAME", "postgres"),
            pg_password: env_or("POSTGRES_PASSWORD", "postgres"),
            script: PathBuf::from(env_or(
                "AUDIT_STACK_SCRIPT",
                concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/stack.sh"),
            )),
        }
    }
}

/// A fresh short id for names.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// One test's isolated world.
pub struct World {
    pub stack: Stack,
    pub id: String,
    pub topics: Vec<String>,
    pub dlq_topic: String,
    pub group: String,
    pub immudb_database: String,
    pub pg_schema: String,
    pub workdir: PathBuf,
}

impl World {
    /// Creates `topics` (each with `partitions`) and the DLQ topic, migrates a fresh PG schema.
    /// The immudb database is created by the daemon (IMMUDB_CREATE_DATABASE) or [`Self::immudb`].
    pub async fn new(topic_names: &[&str], partitions: i32) -> World {
        let stack = Stack::from_env();
        let id = unique("t");
        let topics: Vec<String> = topic_names
            .iter()
            .map(|name| format!("{id}.{name}"))
            .collect();
        let dlq_topic = format!("{id}.dlq");
        let workdir = std::env::temp_dir().join(format!("audit-consumer-test-{id}"));
        std::fs::create_dir_all(&workdir).expect("test workdir");
        let world = World {
            stack,
            group: format!("{id}-group"),
            immudb_database: id.clone(),
            pg_schema: id.clone(),
            id,
            topics,
            dlq_topic,
            workdir,
        };
        let mut all: Vec<(String, i32)> = world
            .topics
            .iter()
            .map(|t| (t.clone(), partitions))
            .collect();
        all.push((world.dlq_topic.clone(), 1));
        world.create_topics(&all).await;
        world.migrate();
        world.create_writer_login().await;
        world
    }

    /// The daemon's PostgreSQL login: a fresh role per test that only inherits `audit_writer`
    /// (INSERT and SELECT), so every test proves the daemon needs no more.
    async fn create_writer_login(&self) {
        let pg = self.pg().await;
        sqlx::query(&format!(
            "CREATE ROLE \"{}\" LOGIN PASSWORD '{WRITER_PASSWORD}' IN ROLE audit_writer",
            self.writer_user()
        ))
        .execute(&pg)
        .await
        .expect("create the test's writer login");
    }

    /// The daemon's PostgreSQL user in this world.
    pub fn writer_user(&self) -> String {
        format!("{}_writer", self.id)
    }

    /// Creates one more topic of this world (e.g. the access topic of the read side).
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topics(&[(name.to_owned(), partitions)]).await;
    }

    /// A fresh SELECT-only PostgreSQL login (a member of `audit_reader`) for the read side.
    pub async fn reader_login(&self) -> (String, String) {
        let user = format!("{}_{}", self.id, unique("reader"));
        let pg = self.pg().await;
        sqlx::query(&format!(
            "CREATE ROLE \"{user}\" LOGIN PASSWORD '{READER_PASSWORD}' IN ROLE audit_reader"
        ))
        .execute(&pg)
        .await
        .expect("create the test's reader login");
        (user, READER_PASSWORD.to_owned())
    }

    async fn create_topics(&self, topics: &[(String, i32)]) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.stack.brokers)
            .create()
            .expect("admin client");
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        let results = admin
            .create_topics(
                &new,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot reach Kafka at {} (run deploy/local/stack.sh up): {e}",
                    self.stack.brokers
                )
            });
        for result in results {
            result.unwrap_or_else(|(topic, e)| panic!("creating topic {topic}: {e}"));
        }
    }

    /// Applies the migrations into this world's schema (as the stack's superuser).
    pub fn migrate(&self) {
        let output = Command::new(env!("CARGO_BIN_EXE_audit-consumer"))
            .arg("migrate")
            .envs(self.daemon_env(&BTreeMap::new()))
            .env("POSTGRES_USERNAME", &self.stack.pg_user)
            .env("POSTGRES_PASSWORD", &self.stack.pg_password)
            .output()
            .expect("run migrate");
        assert!(
            output.status.success(),
            "migrate failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The environment a daemon of this world runs with.
    pub fn daemon_env(&self, overrides: &BTreeMap<&str, String>) -> BTreeMap<String, String> {
        let s = &self.stack;
        let mut env: BTreeMap<String, String> = [
            ("KAFKA_BROKERS", s.brokers.clone()),
            ("KAFKA_TOPICS", self.topics.join(",")),
            ("KAFKA_DLQ_TOPIC", self.dlq_topic.clone()),
            ("KAFKA_GROUP_ID", self.group.clone()),
            ("KAFKA_BATCH_SIZE", "500".into()),
            ("KAFKA_BATCH_TIMEOUT", "200ms".into()),
            // A killed member's partitions move after the session timeout; keep tests quick.
            ("KAFKA_SESSION_TIMEOUT", "6s".into()),
            ("IMMUDB_HOST", s.immudb_host.clone()),
            ("IMMUDB_PORT", s.immudb_port.to_string()),
            ("IMMUDB_USERNAME", s.immudb_user.clone()),
            ("IMMUDB_PASSWORD", s.immudb_password.clone()),
            ("IMMUDB_DATABASE", self.immudb_database.clone()),
            ("IMMUDB_CREATE_DATABASE", "true".into()),
            ("POSTGRES_HOST", s.pg_host.clone()),
            ("POSTGRES_PORT", s.pg_port.to_string()),
            ("POSTGRES_DATABASE", s.pg_database.clone()),
            ("POSTGRES_USERNAME", self.writer_user()),
            ("POSTGRES_PASSWORD", WRITER_PASSWORD.into()),
            ("POSTGRES_SCHEMA", self.pg_schema.clone()),
            ("POSTGRES_SSL_MODE", "disable".into()),
            ("RETRY_INITIAL_DELAY", "100ms".into()),
            ("RETRY_MAX_DELAY", "1s".into()),
            ("HEALTH_PORT", "0".into()),
            ("METRICS_PORT", "0".into()),
            ("HTTP_BIND_ADDRESS", "127.0.0.1".into()),
            ("LOG_FORMAT", "json".into()),
            ("LOG_LEVEL", "info".into()),
            ("SHUTDOWN_TIMEOUT", "20s".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in overrides {
            env.insert((*k).to_owned(), v.clone());
        }
        env
    }

    /// Starts a daemon of this world; its logs go to a file in the test's workdir.
    pub fn start_daemon(&self, name: &str, overrides: &BTreeMap<&str, String>) -> Daemon {
        Daemon::start(self, name, overrides)
    }

    /// A superuser pool inside this world's schema.
    pub async fn pg(&self) -> PgPool {
        let s = &self.stack;
        let options = PgConnectOptions::new()
            .host(&s.pg_host)
            .port(s.pg_port)
            .database(&s.pg_database)
            .username(&s.pg_user)
            .password(&s.pg_password)
            .options([("search_path", self.pg_schema.as_str())]);
        PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .expect("connect to PostgreSQL (run deploy/local/stack.sh up)")
    }

    /// A client on this world's immudb database (created if missing).
    pub async fn immudb(&self) -> ImmudbClient {
        let s = &self.stack;
        ImmudbClient::connect(ImmudbConnectOptions {
            host: s.immudb_host.clone(),
            port: s.immudb_port,
            database: self.immudb_database.clone(),
            username: s.immudb_user.clone(),
            password: s.immudb_password.clone().into(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            create_database: true,
            // The daemon's default, so test databases commit like the daemon's.
            sync_frequency: Some(audit_consumer::config::default_duration(
                "immudb.sync_frequency",
            )),
        })
        .await
        .expect("connect to immudb (run deploy/local/stack.sh up)")
    }

    /// Creates an immudb login on this world's database (which must exist) with `permission`
    /// (1 read, 2 read+write), through the stack's admin; returns its user name and password.
    pub async fn immudb_login(&self, permission: u32) -> (String, String) {
        let admin = self.immudb().await;
        let user = unique("u");
        // immudb's policy: 8-32 characters with upper and lower case, a digit and a symbol.
        let password = "Test-login-1".to_owned();
        admin
            .create_user(
                &user,
                &password.clone().into(),
                permission,
                &self.immudb_database,
            )
            .await
            .expect("create an immudb user");
        admin.close().await;
        (user, password)
    }

    /// Sets one broker-side configuration entry of `topic` (e.g. `max.message.bytes`).
    pub async fn set_topic_config(&self, topic: &str, name: &str, value: &str) {
        use rdkafka::admin::{AlterConfig, ResourceSpecifier};
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.stack.brokers)
            .create()
            .expect("admin client");
        // AlterConfigs replaces the topic's whole dynamic configuration: carry the others over.
        let current = admin
            .describe_configs(
                &[ResourceSpecifier::Topic(topic)],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("describe configs")
            .pop()
            .expect("one resource")
            .expect("topic config");
        let mut config = AlterConfig::new(ResourceSpecifier::Topic(topic));
        let kept: Vec<(String, String)> = current
            .entries
            .iter()
            .filter(|e| !e.is_default && e.name != name)
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect();
        for (k, v) in &kept {
            config = config.set(k, v);
        }
        config = config.set(name, value);
        let results = admin
            .alter_configs(
                &[config],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("alter configs");
        for result in results {
            result.unwrap_or_else(|(resource, e)| panic!("altering {resource:?}: {e}"));
        }
    }

    /// A producer for test input (idempotent, acks=all, so the input is exactly what we sent).
    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.stack.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .expect("producer")
    }

    /// Produces the records of a corpus from [`valid_corpus`] (or built like it), in order.
    pub async fn produce_corpus(&self, corpus: &[(uuid::Uuid, TestRecord)]) {
        let records: Vec<TestRecord> = corpus.iter().map(|(_, r)| r.clone()).collect();
        self.produce(&records).await;
    }

    /// Produces records and waits for every acknowledgement.
    pub async fn produce(&self, records: &[TestRecord]) {
        let producer = self.producer();
        for chunk in records.chunks(2000) {
            let sends = chunk.iter().map(|r| {
                let mut record = FutureRecord::<[u8], [u8]>::to(&r.topic).partition(r.partition);
                if let Some(key) = r.key.as_deref() {
                    record = record.key(key);
                }
                if let Some(payload) = r.payload.as_deref() {
                    record = record.payload(payload);
                }
                if !r.headers.is_empty() {
                    let headers = r.headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                        h.insert(rdkafka::message::Header {
                            key: k,
                            value: Some(v.as_bytes()),
                        })
                    });
                    record = record.headers(headers);
                }
                producer.send(record, Duration::from_secs(30))
            });
            for result in futures::future::join_all(sends).await {
                result.expect("produce test record");
            }
        }
    }

    /// Committed offsets of this world's group, per topic partition (`None`: nothing committed).
    pub fn committed(&self) -> BTreeMap<(String, i32), Option<i64>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.stack.brokers)
            .set("group.id", &self.group)
            .create()
            .expect("consumer");
        let mut list = TopicPartitionList::new();
        for (topic, partitions) in self.partition_counts(&consumer) {
            for p in 0..partitions {
                list.add_partition(&topic, p);
            }
        }
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(10))
            .expect("committed offsets");
        committed
            .elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                };
                ((e.topic().to_owned(), e.partition()), offset)
            })
            .collect()
    }

    /// Waits until the group's committed offsets reach the log end of every partition (lag 0),
    /// measured against the end offsets at the time of the call.
    pub async fn wait_committed_to_end(&self, timeout: Duration) {
        let end = self.end_offsets();
        wait_until(
            "committed offsets to reach the log end offsets",
            timeout,
            || async {
                let committed = self.committed();
                end.iter()
                    .all(|(tp, high)| {
                        *high == 0 || committed.get(tp).copied().flatten() == Some(*high)
                    })
                    .then_some(())
            },
        )
        .await;
    }

    /// Log end offsets per topic partition.
    pub fn end_offsets(&self) -> BTreeMap<(String, i32), i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.stack.brokers)
            .create()
            .expect("consumer");
        let mut out = BTreeMap::new();
        for (topic, partitions) in self.partition_counts(&consumer) {
            for p in 0..partitions {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .expect("watermarks");
                out.insert((topic.clone(), p), high);
            }
        }
        out
    }

    fn partition_counts(&self, consumer: &BaseConsumer) -> Vec<(String, i32)> {
        self.topics
            .iter()
            .map(|topic| {
                let metadata = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(10))
                    .expect("metadata");
                let count = metadata.topics()[0].partitions().len() as i32;
                (topic.clone(), count)
            })
            .collect()
    }

    /// Commits `offset` for every partition of the world's topics in its group (the group must
    /// have no active member): "reset the group's offsets".
    pub fn reset_group_offsets(&self, offset: i64) {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.stack.brokers)
            .set("group.id", &self.group)
            .create()
            .expect("consumer");
        let mut list = TopicPartitionList::new();
        for (topic, partitions) in self.partition_counts(&consumer) {
            for p in 0..partitions {
                list.add_partition_offset(&topic, p, Offset::Offset(offset))
                    .expect("offset");
            }
        }
        consumer
            .commit(&list, rdkafka::consumer::CommitMode::Sync)
            .expect("reset offsets");
    }

    /// Reads the DLQ topic from the beginning until `expected` records arrived (or the deadline).
    pub async fn dlq_records(&self, expected: usize, timeout: Duration) -> Vec<DlqRecord> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.stack.brokers)
            .set("group.id", unique("dlq-reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&self.dlq_topic]).expect("subscribe");
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < expected && Instant::now() < deadline {
            let polled = tokio::task::block_in_place(|| {
                consumer.poll(Duration::from_millis(200)).map(|m| {
                    m.map(|m| DlqRecord {
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        headers: m
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|h| {
                                        (
                                            h.key.to_owned(),
                                            String::from_utf8_lossy(h.value.unwrap_or_default())
                                                .into_owned(),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                })
            });
            if let Some(record) = polled {
                out.push(record.expect("dlq record"));
            }
        }
        out
    }

    /// Waits until audit_trail holds at least `expected` rows.
    pub async fn wait_rows(&self, pg: &PgPool, expected: i64, timeout: Duration) {
        wait_until(
            &format!("{expected} rows in PostgreSQL"),
            timeout,
            || async { (self.pg_count(pg).await >= expected).then_some(()) },
        )
        .await;
    }

    /// Rows stored without a verified immudb transaction.
    pub async fn unverified_rows(&self, pg: &PgPool) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_trail WHERE NOT immudb_verified")
            .fetch_one(pg)
            .await
            .expect("count unverified rows")
    }

    /// Rows in this world's audit_trail.
    pub async fn pg_count(&self, pg: &PgPool) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_trail")
            .fetch_one(pg)
            .await
            .expect("count rows")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Logs are kept when the test failed, so the failure can be read (and always with
        // KEEP_TEST_LOGS set: a world shared with a task may be dropped outside the panic).
        if !std::thread::panicking() && std::env::var_os("KEEP_TEST_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.workdir);
        } else {
            eprintln!("test logs kept in {}", self.workdir.display());
        }
    }
}

/// A record to produce.
#[derive(Debug, Clone)]
pub struct TestRecord {
    pub topic: String,
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

/// A record read back from the DLQ.
#[derive(Debug, Clone)]
pub struct DlqRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// A valid event payload with the given id.
pub fn event_json(event_id: uuid::Uuid, entity_type: &str, n: usize) -> Vec<u8> {
    serde_json::json!({
        "event_id": event_id.to_string(),
        "timestamp": "2026-11-23T10:00:00.123+01:00",
        "entity_type": entity_type,
        "entity_id": format!("{entity_type}-{}", n % 97),
        "action": "UPDATE",
        "user_id": format!("user-{}", n % 13),
        "trace_id": format!("trace-{n}"),
        "old_value": {"stage": "VEGETATIVE", "n": n},
        "new_value": {"stage": "FLOWERING", "n": n + 1},
        "risk_level": "MEDIUM",
        "compliance_flags": ["GACP", "ALCOA+"],
        "metadata": {"source": "integration-test", "version": "1"},
        "category": "USER_ACTION"
    })
    .to_string()
    .into_bytes()
}

/// `count` valid events spread round-robin over the world's topics and partitions.
pub fn valid_corpus(world: &World, count: usize, partitions: i32) -> Vec<(uuid::Uuid, TestRecord)> {
    (0..count)
        .map(|n| {
            let id = uuid::Uuid::new_v4();
            let topic = &world.topics[n % world.topics.len()];
            let partition = ((n / world.topics.len()) as i32) % partitions;
            let record = TestRecord {
                topic: topic.clone(),
                partition,
                key: Some(id.to_string().into_bytes()),
                payload: Some(event_json(id, "plant", n)),
                headers: vec![],
            };
            (id, record)
        })
        .collect()
}

/// Polls `check` every 200 ms until it returns `Some`, or panics with `what` at the deadline.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The daemon as a child process.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    fn start(world: &World, name: &str, overrides: &BTreeMap<&str, String>) -> Daemon {
        let log = world.workdir.join(format!("{name}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("daemon log file");
        let child = Command::new(env!("CARGO_BIN_EXE_audit-consumer"))
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("INSTANCE_ID", name)
            .envs(world.daemon_env(overrides))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("start daemon");
        Daemon { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: a crash at an arbitrary instant.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit (at most `timeout`).
    pub async fn terminate(mut self, timeout: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait daemon") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {timeout:?} of SIGTERM; log: {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many log lines so far carry `message`.
    pub fn count_log(&self, message: &str) -> usize {
        self.log_lines()
            .iter()
            .filter(|l| l["message"] == message)
            .count()
    }

    /// Waits for the exit (no signal sent), at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait daemon") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {timeout:?}; log: {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The JSON log lines written so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `batch done` log lines of a daemon's log.
pub fn batch_lines(lines: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    lines
        .iter()
        .filter(|l| l.get("message").and_then(|m| m.as_str()) == Some("batch done"))
        .collect()
}

/// A plain HTTP/1.0 GET on loopback: status code and body (no client library needed).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::other("connect timeout"))??;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::other("read timeout"))??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

impl Daemon {
    /// The sidecar's address, from the daemon's "http sidecar listening" log line.
    pub async fn http_addr(&self) -> std::net::SocketAddr {
        wait_until(
            "the http sidecar to listen",
            Duration::from_secs(30),
            || {
                let addr = self
                    .log_lines()
                    .iter()
                    .find(|l| l["message"] == "http sidecar listening")
                    .and_then(|l| l["health"].as_str().and_then(|a| a.parse().ok()));
                async move { addr }
            },
        )
        .await
    }

    /// Resident set size of the daemon process in bytes (from /proc).
    pub fn rss_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

/// One sample's value from a Prometheus text scrape, e.g. `metric_value(&text, "audit_x{a=\"b\"}")`.
pub fn metric_value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// Runs the stack script (`stop immudb`, `start postgres`, …) for fault injection.
pub fn stack(world: &World, args: &[&str]) {
    let status = Command::new("bash")
        .arg(&world.stack.script)
        .args(args)
        .status()
        .expect("run stack.sh");
    assert!(status.success(), "stack.sh {args:?} failed");
}
