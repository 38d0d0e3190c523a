//! The benchmark's isolated world on the local stack (topics, group, immudb database, PostgreSQL
//! schema, writer login), the daemon as a child process, and the probes read while it runs:
//! the group's committed offsets, the log end offsets, and the process's RSS and CPU.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};

/// Password of the world's least-privilege writer login (a member of `audit_writer`).
pub const WRITER_PASSWORD: &str = "audit-writer-e2e";

/// Topic suffixes and the entity types their events carry (the daemon's four topic writers).
pub const TOPICS: [&str; 4] = [
    "audit.plant-lifecycle.v1",
    "audit.financial.v1",
    "audit.user-actions.v1",
    "audit.system.v1",
];
/// Partitions per topic.
pub const PARTITIONS: i32 = 3;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Connection facts of the local stack (`deploy/local/stack.sh env`, with its defaults).
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
}

impl Stack {
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Stack {
            brokers: env_or("KAFKA_BROKERS", "127.0.0.1:19092"),
            immudb_host: env_or("IMMUDB_HOST", "127.0.0.1"),
            immudb_port: env_or("IMMUDB_PORT", "13322")
                .parse()
                .context("IMMUDB_PORT")?,
            immudb_user: env_or("IMMUDB_USERNAME", "immudb"),
            immudb_password: env_or("IMMUDB_PASSWORD", "immudb-local-admin"),
            pg_host: env_or("POSTGRES_HOST", "127.0.0.1"),
            pg_port: env_or("POSTGRES_PORT", "15432")
                .parse()
                .context("POSTGRES_PORT")?,
            pg_database: env_or("POSTGRES_DATABASE", "audit"),
            pg_user: env_or("POSTGRES_USERNAME", "postgres"),
            pg_password: env_or("POSTGRES_PASSWORD", "postgres"),
        })
    }
}

/// One benchmark run's isolated world.
pub struct World {
    pub stack: Stack,
    pub id: String,
    pub topics: Vec<String>,
    pub dlq_topic: String,
    pub group: String,
    pub immudb_database: String,
    pub pg_schema: String,
    /// Where the daemon logs go (kept after the run).
    pub logs: PathBuf,
}

impl World {
    /// Creates the topics (4 × [`PARTITIONS`]) and the DLQ topic, migrates a fresh PostgreSQL
    /// schema and creates the writer login. The daemon creates its immudb database.
    pub async fn create(stack: Stack, out_dir: &Path) -> anyhow::Result<World> {
        let id = format!("e2e{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let logs = out_dir.join(format!("logs-{id}"));
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let world = World {
            topics: TOPICS.iter().map(|t| format!("{id}.{t}")).collect(),
            dlq_topic: format!("{id}.audit.dlq.v1"),
            group: format!("{id}-group"),
            immudb_database: id.clone(),
            pg_schema: id.clone(),
            id,
            stack,
            logs,
        };
        let mut topics: Vec<(String, i32)> = world
            .topics
            .iter()
            .map(|t| (t.clone(), PARTITIONS))
            .collect();
        topics.push((world.dlq_topic.clone(), 1));
        world.create_topics(&topics).await?;
        world.migrate(&world.pg_schema)?;
        let pg = world.superuser_pool(&world.pg_schema).await?;
        sqlx::query(&format!(
            "CREATE ROLE \"{}\" LOGIN PASSWORD '{WRITER_PASSWORD}' IN ROLE audit_writer",
            world.writer_user()
        ))
        .execute(&pg)
        .await
        .context("creating the writer login")?;
        pg.close().await;
        Ok(world)
    }

    async fn create_topics(&self, topics: &[(String, i32)]) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.stack.brokers)
            .create()
            .context("Kafka admin client")?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        let results = admin
            .create_topics(
                &new,
                &AdminOptions::new().operation_timeout(Some(KAFKA_TIMEOUT)),
            )
            .await
            .with_context(|| {
                format!(
                    "cannot reach Kafka at {} (run deploy/local/stack.sh up)",
                    self.stack.brokers
                )
            })?;
        for result in results {
            if let Err((topic, e)) = result {
                bail!("creating topic {topic}: {e}");
            }
        }
        Ok(())
    }

    /// Applies the migrations into `schema` with `audit-consumer migrate`, as the superuser.
    pub fn migrate(&self, schema: &str) -> anyhow::Result<()> {
        let mut env = self.daemon_env(1000, None);
        env.insert("POSTGRES_USERNAME".into(), self.stack.pg_user.clone());
        env.insert("POSTGRES_PASSWORD".into(), self.stack.pg_password.clone());
        env.insert("POSTGRES_SCHEMA".into(), schema.to_owned());
        let output = Command::new(env!("CARGO_BIN_EXE_audit-consumer"))
            .arg("migrate")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .output()
            .context("running audit-consumer migrate")?;
        if !output.status.success() {
            bail!(
                "migrate into {schema} failed: {}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// The daemon's PostgreSQL login in this world.
    pub fn writer_user(&self) -> String {
        format!("{}_writer", self.id)
    }

    /// The environment the daemon runs with.
    pub fn daemon_env(
        &self,
        batch_size: usize,
        session_timeout: Option<&str>,
    ) -> BTreeMap<String, String> {
        let s = &self.stack;
        let mut env: BTreeMap<String, String> = [
            ("KAFKA_BROKERS", s.brokers.clone()),
            ("KAFKA_TOPICS", self.topics.join(",")),
            ("KAFKA_DLQ_TOPIC", self.dlq_topic.clone()),
            ("KAFKA_GROUP_ID", self.group.clone()),
            ("KAFKA_BATCH_SIZE", batch_size.to_string()),
            ("KAFKA_BATCH_TIMEOUT", "1s".into()),
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
            ("HEALTH_PORT", "0".into()),
            ("METRICS_PORT", "0".into()),
            ("HTTP_BIND_ADDRESS", "127.0.0.1".into()),
            ("LOG_FORMAT", "json".into()),
            (
                "LOG_LEVEL",
                std::env::var("E2E_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if let Some(timeout) = session_timeout {
            env.insert("KAFKA_SESSION_TIMEOUT".into(), timeout.to_owned());
        }
        // Tuning experiments: librdkafka properties as they are (`KAFKA_PROP_FETCH_MAX_BYTES=…`),
        // any other daemon setting through `E2E_DAEMON_` (`E2E_DAEMON_PIPELINE_IMMUDB_CONCURRENCY=3`).
        for (key, value) in std::env::vars() {
            if key.starts_with("KAFKA_PROP_") {
                env.insert(key, value);
            } else if let Some(setting) = key.strip_prefix("E2E_DAEMON_") {
                env.insert(setting.to_owned(), value);
            }
        }
        env
    }

    /// PostgreSQL connect options inside `schema` for `user`.
    pub fn pg_options(&self, schema: &str, user: &str, password: &str) -> PgConnectOptions {
        let s = &self.stack;
        PgConnectOptions::new()
            .host(&s.pg_host)
            .port(s.pg_port)
            .database(&s.pg_database)
            .username(user)
            .password(password)
            .ssl_mode(PgSslMode::Disable)
            .options([("search_path", schema)])
    }

    /// A small superuser pool inside `schema`.
    pub async fn superuser_pool(&self, schema: &str) -> anyhow::Result<PgPool> {
        let options = self.pg_options(schema, &self.stack.pg_user, &self.stack.pg_password);
        PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .context("connecting to PostgreSQL (run deploy/local/stack.sh up)")
    }
}

/// The daemon as a child process (the release binary cargo built for the bench).
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(
        world: &World,
        name: &str,
        env: &BTreeMap<String, String>,
    ) -> anyhow::Result<Self> {
        let log = world.logs.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = Command::new(env!("CARGO_BIN_EXE_audit-consumer"))
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("INSTANCE_ID", name)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting the daemon")?;
        Ok(Daemon { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log's tail when the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the daemon exited ({status}); log {}:\n{}",
                self.log.display(),
                log_tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// SIGKILL: a crash at an arbitrary instant.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit (SIGKILL after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<(ExitStatus, Duration)> {
        let started = Instant::now();
        if let Some(status) = self.child.try_wait()? {
            return Ok((status, Duration::ZERO));
        }
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.child.id());
        }
        while started.elapsed() < timeout {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let status = self.child.wait()?;
        bail!("the daemon did not exit within {timeout:?} of SIGTERM (killed: {status})")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // An error path: stop it politely, then for good.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate(Duration::from_secs(30));
        }
    }
}

/// The last `lines` lines of a file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The JSON lines of a daemon log.
pub fn log_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// What /proc says about a process: resident set, its high-water mark, and CPU time.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
    pub cpu_seconds: f64,
}

/// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`, 100 on Linux in practice).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Reads /proc/PID/status and /proc/PID/stat; `None` once the process is gone.
pub fn proc_stats(pid: u32, ticks: f64) -> Option<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, cpu_seconds) = parse_stat(&stat, ticks)?;
    Some(ProcStats {
        rss_bytes: kb("VmRSS:"),
        hwm_bytes: kb("VmHWM:"),
        cpu_seconds,
    })
}

/// The command name and CPU seconds (user + system) of a /proc/PID/stat line.
fn parse_stat(stat: &str, ticks: f64) -> Option<(&str, f64)> {
    // The command name is in parentheses and may contain spaces; the fields after it start
    // with field 3, `state`; utime and stime are fields 14 and 15.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((&stat[open + 1..close], (utime + stime) / ticks))
}

/// Committed offsets of the world's group and the log end offsets, summed over the partitions.
pub struct KafkaProbe {
    consumer: BaseConsumer,
    partitions: Vec<(String, i32)>,
}

impl KafkaProbe {
    pub fn new(world: &World) -> anyhow::Result<Self> {
        // Never subscribes, so it never joins the group: it only reads the group's offsets.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &world.stack.brokers)
            .set("group.id", &world.group)
            .set("enable.auto.commit", "false")
            .create()
            .context("probe consumer")?;
        let partitions = world
            .topics
            .iter()
            .flat_map(|t| (0..PARTITIONS).map(move |p| (t.clone(), p)))
            .collect();
        Ok(KafkaProbe {
            consumer,
            partitions,
        })
    }

    /// Sum of the committed offsets (a partition with nothing committed counts 0: the topics
    /// are fresh, so their low watermark is 0).
    pub fn committed(&self) -> anyhow::Result<i64> {
        let mut list = TopicPartitionList::new();
        for (topic, partition) in &self.partitions {
            list.add_partition(topic, *partition);
        }
        let committed = self
            .consumer
            .committed_offsets(list, KAFKA_TIMEOUT)
            .context("reading committed offsets")?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum())
    }

    /// Log end offsets per partition.
    pub fn end_offsets(&self) -> anyhow::Result<Vec<(String, i32, i64)>> {
        self.partitions
            .iter()
            .map(|(topic, partition)| {
                let (_, high) = self
                    .consumer
                    .fetch_watermarks(topic, *partition, KAFKA_TIMEOUT)
                    .with_context(|| format!("watermarks of {topic}[{partition}]"))?;
                Ok((topic.clone(), *partition, high))
            })
            .collect()
    }

    /// Sum of the log end offsets.
    pub fn end(&self) -> anyhow::Result<i64> {
        Ok(self.end_offsets()?.iter().map(|(_, _, high)| high).sum())
    }
}

/// CPU seconds used so far, by process group: the daemon, immudb, PostgreSQL (every backend),
/// Kafka (the broker's JVM), everything else; plus the machine's idle seconds (`/proc/stat`).
/// The difference of two readings says where a phase's CPU went.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CpuSplit {
    pub daemon: f64,
    pub immudb: f64,
    pub postgres: f64,
    pub kafka: f64,
    pub other: f64,
    pub idle: f64,
}

impl CpuSplit {
    pub fn read(ticks: f64) -> CpuSplit {
        let mut split = CpuSplit::default();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return split;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some((comm, seconds)) = parse_stat(&stat, ticks) else {
                continue;
            };
            // Only a JVM's command line says whether it is the broker.
            let is_kafka = || {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmdline| cmdline.windows(5).any(|w| w == b"kafka"))
            };
            let slot = if comm.starts_with("audit-consumer") {
                &mut split.daemon
            } else if comm == "immudb" {
                &mut split.immudb
            } else if comm == "postgres" {
                &mut split.postgres
            } else if comm == "java" && is_kafka() {
                &mut split.kafka
            } else {
                &mut split.other
            };
            *slot += seconds;
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/stat")
            && let Some(line) = stat.lines().find(|l| l.starts_with("cpu "))
        {
            let fields: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            // idle + iowait
            split.idle = (fields.get(3).unwrap_or(&0.0) + fields.get(4).unwrap_or(&0.0)) / ticks;
        }
        split
    }

    /// `self − earlier`.
    pub fn since(&self, earlier: &CpuSplit) -> CpuSplit {
        CpuSplit {
            daemon: self.daemon - earlier.daemon,
            immudb: self.immudb - earlier.immudb,
            postgres: self.postgres - earlier.postgres,
            kafka: self.kafka - earlier.kafka,
            other: self.other - earlier.other,
            idle: self.idle - earlier.idle,
        }
    }
}
