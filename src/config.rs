//! Typed settings, layered as built-in defaults < config file (TOML) < environment.
//!
//! Every setting is declared once in [`SETTINGS`]: its dotted key (the config-file path), its
//! environment variable, its default and its meaning. That table drives loading, `check-config`
//! output and the README's configuration table, so they cannot drift apart. Values are parsed
//! and validated at start-up; an invalid one yields an error naming the variable, the key and
//! the reason. Secrets live in [`SecretString`] and are only ever printed as `[redacted]`; each
//! secret also accepts `<ENV>_FILE` (Kubernetes mounts secrets as files).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

/// immudb refuses a transaction with more entries than this (its default `MaxTxEntries`), and a
/// batch is written as one transaction.
pub const IMMUDB_MAX_TX_ENTRIES: usize = 1024;

/// Events per batch at most: each event takes two immudb entries (its `audit:` entry and its
/// `event:` uniqueness key), and a batch is one transaction.
pub const MAX_BATCH_SIZE: usize = IMMUDB_MAX_TX_ENTRIES / 2;

/// Prefix of environment variables passed through verbatim to librdkafka:
/// `KAFKA_PROP_SECURITY_PROTOCOL=SSL` sets `security.protocol=SSL`.
pub const KAFKA_PASSTHROUGH_PREFIX: &str = "KAFKA_PROP_";

/// One documented setting.
#[derive(Debug, Clone, Copy)]
pub struct SettingSpec {
    /// Dotted path in the config file (`[kafka] brokers = …` is `kafka.brokers`).
    pub key: &'static str,
    /// Environment variable that overrides the file.
    pub env: &'static str,
    /// Built-in default; `None` means "unset" (optional setting).
    pub default: Option<&'static str>,
    /// Secret: never printed, also read from `<env>_FILE`.
    pub secret: bool,
    /// What the setting does (README table and `check-config`).
    pub doc: &'static str,
}

const fn s(
    key: &'static str,
    env: &'static str,
    default: Option<&'static str>,
    doc: &'static str,
) -> SettingSpec {
    SettingSpec {
        key,
        env,
        default,
        secret: false,
        doc,
    }
}

const fn secret(key: &'static str, env: &'static str, doc: &'static str) -> SettingSpec {
    SettingSpec {
        key,
        env,
        default: None,
        secret: true,
        doc,
    }
}

/// Every setting the daemon reads, in README order.
pub const SETTINGS: &[SettingSpec] = &[
    s(
        "kafka.brokers",
        "KAFKA_BROKERS",
        Some("127.0.0.1:9092"),
        "Comma-separated bootstrap brokers.",
    ),
    s(
        "kafka.group_id",
        "KAFKA_GROUP_ID",
        Some("gacp-audit-trail-consumer"),
        "Consumer group shared by all replicas.",
    ),
    s(
        "kafka.topics",
        "KAFKA_TOPICS",
        Some(
            "audit.plant-lifecycle.v1,audit.financial.v1,audit.user-actions.v1,audit.system.v1,audit.access.v1",
        ),
        "Comma-separated topics to consume (`audit.access.v1` holds the read side's access events).",
    ),
    s(
        "kafka.dlq_topic",
        "KAFKA_DLQ_TOPIC",
        Some("audit.dlq.v1"),
        "Dead-letter topic for events that cannot be stored.",
    ),
    s(
        "kafka.auto_offset_reset",
        "KAFKA_AUTO_OFFSET_RESET",
        Some("earliest"),
        "Where a group with no committed offset starts: `earliest` (no event skipped) or `latest`.",
    ),
    s(
        "kafka.batch_size",
        "KAFKA_BATCH_SIZE",
        Some("100"),
        "Events per batch (one immudb transaction); 1..=512: each event takes two immudb entries (its audit entry and its event_id uniqueness key) and immudb allows 1,024 per transaction.",
    ),
    s(
        "kafka.batch_timeout",
        "KAFKA_BATCH_TIMEOUT",
        Some("1s"),
        "Flush a batch when its oldest event has waited this long (`500ms`, `5s`, `1m`).",
    ),
    s(
        "kafka.session_timeout",
        "KAFKA_SESSION_TIMEOUT",
        Some("30s"),
        "Group session timeout (`session.timeout.ms`).",
    ),
    s(
        "kafka.group_instance_id",
        "KAFKA_GROUP_INSTANCE_ID",
        None,
        "Static membership (`group.instance.id`): a member restarted under the same id gets its partitions back at once, not after the session timeout. Unique and stable per replica; a member stopped for good keeps its partitions until the session timeout.",
    ),
    s(
        "kafka.max_poll_interval",
        "KAFKA_MAX_POLL_INTERVAL",
        Some("300s"),
        "Longest gap between polls before the group evicts this member (`max.poll.interval.ms`).",
    ),
    s(
        "kafka.security_protocol",
        "KAFKA_SECURITY_PROTOCOL",
        Some("plaintext"),
        "`plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.",
    ),
    s(
        "kafka.ssl_ca_location",
        "KAFKA_SSL_CA_LOCATION",
        None,
        "CA bundle (PEM file) to verify the brokers.",
    ),
    s(
        "kafka.ssl_certificate_location",
        "KAFKA_SSL_CERTIFICATE_LOCATION",
        None,
        "Client certificate (PEM file) for mutual TLS.",
    ),
    s(
        "kafka.ssl_key_location",
        "KAFKA_SSL_KEY_LOCATION",
        None,
        "Client private key (PEM file) for mutual TLS.",
    ),
    s(
        "kafka.sasl_mechanism",
        "KAFKA_SASL_MECHANISM",
        None,
        "SASL mechanism, e.g. `SCRAM-SHA-512`.",
    ),
    s(
        "kafka.sasl_username",
        "KAFKA_SASL_USERNAME",
        None,
        "SASL user name.",
    ),
    secret(
        "kafka.sasl_password",
        "KAFKA_SASL_PASSWORD",
        "SASL password.",
    ),
    s(
        "immudb.host",
        "IMMUDB_HOST",
        Some("127.0.0.1"),
        "immudb server host.",
    ),
    s(
        "immudb.port",
        "IMMUDB_PORT",
        Some("3322"),
        "immudb gRPC port.",
    ),
    s(
        "immudb.database",
        "IMMUDB_DATABASE",
        Some("defaultdb"),
        "immudb database holding the audit trail.",
    ),
    s(
        "immudb.create_database",
        "IMMUDB_CREATE_DATABASE",
        Some("false"),
        "Create the database at start-up when it is missing (needs a user allowed to).",
    ),
    s(
        "immudb.sync_frequency",
        "IMMUDB_SYNC_FREQUENCY",
        Some("2ms"),
        "immudb's `syncFrequency` for a database the daemon creates (an existing one keeps its own; a longer one is warned about at start-up): how long a commit may wait for others to share its fsync, at most 1s. Commits stay durable; immudb's 20ms default delays every batch by 5 ms or more, since the daemon's transactions commit one at a time.",
    ),
    s(
        "immudb.username",
        "IMMUDB_USERNAME",
        Some("immudb"),
        "immudb user.",
    ),
    secret("immudb.password", "IMMUDB_PASSWORD", "immudb password."),
    s(
        "immudb.tls",
        "IMMUDB_TLS",
        Some("false"),
        "Connect to immudb over TLS.",
    ),
    s(
        "immudb.tls_ca_cert",
        "IMMUDB_TLS_CA_CERT",
        None,
        "CA certificate (PEM file) for immudb's TLS; system roots when unset.",
    ),
    s(
        "immudb.tls_domain",
        "IMMUDB_TLS_DOMAIN",
        None,
        "Server name expected in immudb's certificate (defaults to the host).",
    ),
    s(
        "immudb.tls_client_cert",
        "IMMUDB_TLS_CLIENT_CERT",
        None,
        "Client certificate (PEM file) for mutual TLS.",
    ),
    s(
        "immudb.tls_client_key",
        "IMMUDB_TLS_CLIENT_KEY",
        None,
        "Client key (PEM file) for mutual TLS.",
    ),
    s(
        "immudb.verify",
        "IMMUDB_VERIFY",
        Some("true"),
        "Write every batch with VerifiableSet and check every entry's inclusion and the dual proof from the trusted state.",
    ),
    s(
        "immudb.server_signing_key",
        "IMMUDB_SERVER_SIGNING_KEY",
        None,
        "immudb's state-signing public key (PEM file); when set, every verified state's signature is checked.",
    ),
    s(
        "audit.interval",
        "AUDIT_INTERVAL",
        Some("60s"),
        "Continuous audit: how often the server's state and a sample of rows are verified against the trusted state.",
    ),
    s(
        "audit.sample_size",
        "AUDIT_SAMPLE_SIZE",
        Some("10"),
        "Continuous audit: PostgreSQL rows re-verified against immudb per round.",
    ),
    s(
        "immudb.request_timeout",
        "IMMUDB_REQUEST_TIMEOUT",
        Some("10s"),
        "Deadline of one immudb request.",
    ),
    s(
        "postgres.host",
        "POSTGRES_HOST",
        Some("127.0.0.1"),
        "PostgreSQL host.",
    ),
    s(
        "postgres.port",
        "POSTGRES_PORT",
        Some("5432"),
        "PostgreSQL port.",
    ),
    s(
        "postgres.database",
        "POSTGRES_DATABASE",
        Some("audit"),
        "PostgreSQL database.",
    ),
    s(
        "postgres.username",
        "POSTGRES_USERNAME",
        Some("audit_writer"),
        "PostgreSQL user (INSERT and SELECT suffice).",
    ),
    secret(
        "postgres.password",
        "POSTGRES_PASSWORD",
        "PostgreSQL password.",
    ),
    s(
        "postgres.schema",
        "POSTGRES_SCHEMA",
        Some("public"),
        "Schema holding `audit_trail` (tests use one schema each).",
    ),
    s(
        "postgres.ssl_mode",
        "POSTGRES_SSL_MODE",
        Some("prefer"),
        "`disable`, `prefer`, `require`, `verify-ca` or `verify-full`.",
    ),
    s(
        "postgres.ssl_root_cert",
        "POSTGRES_SSL_ROOT_CERT",
        None,
        "CA certificate (PEM file) for `verify-ca`/`verify-full`.",
    ),
    s(
        "postgres.max_connections",
        "POSTGRES_MAX_CONNECTIONS",
        Some("8"),
        "Connection pool size (at least 2): `PIPELINE_POSTGRES_CONCURRENCY` of them write batches.",
    ),
    s(
        "retry.max_attempts",
        "RETRY_MAX_ATTEMPTS",
        Some("3"),
        "Retries of a transient store failure before the DLQ.",
    ),
    s(
        "retry.initial_delay",
        "RETRY_INITIAL_DELAY",
        Some("1s"),
        "First backoff delay.",
    ),
    s(
        "retry.max_delay",
        "RETRY_MAX_DELAY",
        Some("30s"),
        "Longest backoff delay.",
    ),
    s(
        "retry.multiplier",
        "RETRY_MULTIPLIER",
        Some("2"),
        "Backoff growth factor.",
    ),
    s(
        "dlq.max_consecutive_invalid",
        "DLQ_MAX_CONSECUTIVE_INVALID",
        Some("1000"),
        "Halt (instead of dead-lettering a whole broken topic) after this many invalid events in a row; 0 disables.",
    ),
    s(
        "circuit.failure_threshold",
        "CIRCUIT_FAILURE_THRESHOLD",
        Some("1"),
        "Consecutive batches that exhaust their retries before a store's circuit opens (consumption pauses).",
    ),
    s(
        "circuit.cooldown",
        "CIRCUIT_COOLDOWN",
        Some("5s"),
        "Wait between health probes of a store whose circuit is open.",
    ),
    s(
        "pipeline.max_in_flight_bytes",
        "PIPELINE_MAX_IN_FLIGHT_BYTES",
        Some("8388608"),
        "Payload bytes received but not yet stored; above it fetching pauses (bounded memory).",
    ),
    s(
        "pipeline.immudb_concurrency",
        "PIPELINE_IMMUDB_CONCURRENCY",
        Some("2"),
        "immudb transactions in flight at once, over all topics; more than immudb can run in parallel only makes each batch slower.",
    ),
    s(
        "pipeline.postgres_concurrency",
        "PIPELINE_POSTGRES_CONCURRENCY",
        Some("2"),
        "PostgreSQL batch statements in flight at once, over all topics; below `POSTGRES_MAX_CONNECTIONS`.",
    ),
    s(
        "http.stall_timeout",
        "HEALTH_STALL_TIMEOUT",
        Some("30s"),
        "Liveness fails when the consume loop's heartbeat is older than this.",
    ),
    s(
        "http.health_port",
        "HEALTH_PORT",
        Some("8080"),
        "Port of /health, /ready (and /metrics unless METRICS_PORT differs).",
    ),
    s(
        "http.metrics_port",
        "METRICS_PORT",
        Some("8080"),
        "Port of /metrics.",
    ),
    s(
        "http.bind_address",
        "HTTP_BIND_ADDRESS",
        Some("0.0.0.0"),
        "Address the HTTP sidecar listens on.",
    ),
    s(
        "api.port",
        "API_PORT",
        Some("8090"),
        "Port of `serve`: the read API under `/api/v1`, its OpenAPI document, `/health`, `/ready` and `/metrics`.",
    ),
    s(
        "api.bind_address",
        "API_BIND_ADDRESS",
        Some("0.0.0.0"),
        "Address `serve` listens on.",
    ),
    secret(
        "api.cursor_key",
        "API_CURSOR_KEY",
        "Key that authenticates pagination cursors (HMAC-SHA256), the same on every `serve` replica; at least 32 characters. Required by `serve`.",
    ),
    s(
        "api.access_topic",
        "API_ACCESS_TOPIC",
        Some("audit.access.v1"),
        "Kafka topic of the access event `serve` writes for every read (who, role, route, filters, rows); consumed by the write side like any audit topic (it is in the default `KAFKA_TOPICS`).",
    ),
    s(
        "api.query_timeout",
        "API_QUERY_TIMEOUT",
        Some("10s"),
        "Longest a query of `serve` may run (PostgreSQL `statement_timeout`).",
    ),
    s(
        "oidc.issuer",
        "OIDC_ISSUER",
        None,
        "Issuer of the bearer tokens `serve` accepts (their `iss`), e.g. `https://idp.example/realms/audit`. Required by `serve`.",
    ),
    s(
        "oidc.audience",
        "OIDC_AUDIENCE",
        Some("audit-api"),
        "Audience (`aud`) a token must name.",
    ),
    s(
        "oidc.roles_claim",
        "OIDC_ROLES_CLAIM",
        Some("realm_access.roles"),
        "Dotted path of the token claim that lists the caller's roles (`auditor`, `investigator`, `report_admin`).",
    ),
    s(
        "oidc.jwks_url",
        "OIDC_JWKS_URL",
        None,
        "The issuer's signing keys (JWKS); by default the `jwks_uri` of its discovery document.",
    ),
    s(
        "oidc.ca_cert",
        "OIDC_CA_CERT",
        None,
        "CA certificate (PEM file) for the identity provider's TLS; system roots when unset.",
    ),
    s(
        "log.level",
        "LOG_LEVEL",
        Some("info"),
        "`tracing` filter, e.g. `info` or `audit_consumer=debug,info`.",
    ),
    s(
        "log.format",
        "LOG_FORMAT",
        Some("json"),
        "`json` (one object per line) or `pretty`.",
    ),
    s(
        "instance_id",
        "INSTANCE_ID",
        None,
        "Name of this replica in logs, DLQ headers and `client.id`; defaults to HOSTNAME (the pod name).",
    ),
    s(
        "shutdown_timeout",
        "SHUTDOWN_TIMEOUT",
        Some("25s"),
        "Drain deadline on SIGTERM; keep it below the pod's terminationGracePeriodSeconds.",
    ),
];

/// Where a configured value came from (shown by `check-config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Env,
    EnvFile,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Default => "default",
            Source::File => "file",
            Source::Env => "env",
            Source::EnvFile => "env file",
        })
    }
}

/// A start-up configuration error. Its message names the setting and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{env} ({key}): {reason}")]
    Invalid {
        env: &'static str,
        key: &'static str,
        reason: String,
    },
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{var}: cannot read secret file {path}: {reason}")]
    SecretFile {
        var: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{key}: unknown setting in the config file")]
    UnknownKey { key: String },
    #[error("{0}")]
    Inconsistent(String),
}

/// Where the settings are read from; a seam so tests need no process environment.
pub struct Sources<'a> {
    /// Config file; `None` reads no file.
    pub file: Option<&'a Path>,
    /// A snapshot of the environment.
    pub env: BTreeMap<String, String>,
}

impl Sources<'_> {
    /// The process environment and an optional file.
    pub fn process(file: Option<&Path>) -> Sources<'_> {
        Sources {
            file,
            env: std::env::vars_os()
                .filter_map(|(name, value)| {
                    Some((name.into_string().ok()?, value.into_string().ok()?))
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
struct RawValue {
    value: String,
    source: Source,
}

/// The merged raw values before typing: one entry per [`SETTINGS`] key that has a value.
#[derive(Debug, Default)]
struct Layered {
    values: BTreeMap<&'static str, RawValue>,
    kafka_properties: BTreeMap<String, String>,
}

impl Layered {
    fn load(sources: &Sources<'_>) -> Result<Self, ConfigError> {
        let mut layered = Layered::default();
        for spec in SETTINGS {
            if let Some(default) = spec.default {
                layered.set(spec.key, default.to_owned(), Source::Default);
            }
        }
        if let Some(path) = sources.file {
            layered.apply_file(path)?;
        }
        layered.apply_env(&sources.env)?;
        Ok(layered)
    }

    fn set(&mut self, key: &'static str, value: String, source: Source) {
        self.values.insert(key, RawValue { value, source });
    }

    fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let file_error = |reason: String| ConfigError::File {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| file_error(e.message().to_owned()))?;
        let mut flat = Vec::new();
        flatten("", &table, &mut flat);
        for (key, value) in flat {
            if let Some(property) = key.strip_prefix("kafka.properties.") {
                self.kafka_properties.insert(property.to_owned(), value);
                continue;
            }
            if let Some(secret_key) = key.strip_suffix("_file") {
                let spec = SETTINGS
                    .iter()
                    .find(|spec| spec.secret && spec.key == secret_key)
                    .ok_or_else(|| ConfigError::UnknownKey { key: key.clone() })?;
                let secret = read_secret_file(&key, Path::new(&value))?;
                self.set(spec.key, secret, Source::File);
                continue;
            }
            let spec = SETTINGS
                .iter()
                .find(|spec| spec.key == key)
                .ok_or(ConfigError::UnknownKey { key })?;
            self.set(spec.key, value, Source::File);
        }
        Ok(())
    }

    fn apply_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        for spec in SETTINGS {
            if spec.secret {
                let file_var = format!("{}_FILE", spec.env);
                if let Some(path) = env.get(&file_var) {
                    let secret = read_secret_file(&file_var, Path::new(path))?;
                    self.set(spec.key, secret, Source::EnvFile);
                }
            }
            if let Some(value) = env.get(spec.env) {
                self.set(spec.key, value.clone(), Source::Env);
            }
        }
        // Instance id falls back to the pod name that Kubernetes puts in HOSTNAME.
        if !self.values.contains_key("instance_id")
            && let Some(hostname) = env.get("HOSTNAME").filter(|h| !h.is_empty())
        {
            self.set("instance_id", hostname.clone(), Source::Env);
        }
        // Kafka property names use dots where environment names need underscores.
        for (name, value) in env {
            if let Some(property) = name.strip_prefix(KAFKA_PASSTHROUGH_PREFIX) {
                let property = property.to_ascii_lowercase().replace('_', ".");
                self.kafka_properties.insert(property, value.clone());
            }
        }
        Ok(())
    }

    fn raw(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|raw| raw.value.as_str())
    }
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<(String, String)>) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            toml::Value::Table(inner) => flatten(&key, inner, out),
            toml::Value::String(text) => out.push((key, text.clone())),
            toml::Value::Array(items) => {
                let joined = items
                    .iter()
                    .map(|item| match item {
                        toml::Value::String(text) => text.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                out.push((key, joined));
            }
            other => out.push((key, other.to_string())),
        }
    }
}

fn read_secret_file(var: &str, path: &Path) -> Result<String, ConfigError> {
    let content = std::fs::read_to_string(path).map_err(|e| ConfigError::SecretFile {
        var: var.to_owned(),
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    // Files written by editors or `echo` end with a newline that is not part of the secret.
    Ok(content.trim_end_matches(['\n', '\r']).to_owned())
}

/// Where a group with no committed offset starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
}

impl OffsetReset {
    /// The librdkafka value.
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

/// Kafka consumer, DLQ producer and batching.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: Vec<String>,
    pub group_id: String,
    pub topics: Vec<String>,
    pub dlq_topic: String,
    pub auto_offset_reset: OffsetReset,
    pub batch_size: usize,
    pub batch_timeout: Duration,
    pub session_timeout: Duration,
    pub max_poll_interval: Duration,
    /// Connection and security properties, applied to the consumer and the DLQ producer alike.
    pub client_properties: BTreeMap<String, String>,
    pub sasl_password: Option<SecretString>,
}

/// TLS towards immudb.
#[derive(Debug, Clone)]
pub struct ImmudbTlsSettings {
    pub ca_cert: Option<PathBuf>,
    pub domain: Option<String>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// immudb, the system of record.
#[derive(Debug, Clone)]
pub struct ImmudbSettings {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub create_database: bool,
    /// immudb's commit grouping window for a database created here.
    pub sync_frequency: Duration,
    pub username: String,
    pub password: SecretString,
    pub tls: Option<ImmudbTlsSettings>,
    pub request_timeout: Duration,
    /// Verified writes and proofs against the trusted state.
    pub verify: bool,
    /// The server's state-signing public key (PEM file).
    pub server_signing_key: Option<PathBuf>,
}

/// The continuous audit.
#[derive(Debug, Clone, Copy)]
pub struct AuditSettings {
    pub interval: Duration,
    pub sample_size: u32,
}

/// PostgreSQL TLS mode (libpq's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgSslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// PostgreSQL, the queryable replica.
#[derive(Debug, Clone)]
pub struct PostgresSettings {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub username: String,
    pub password: SecretString,
    pub schema: String,
    pub ssl_mode: PgSslMode,
    pub ssl_root_cert: Option<PathBuf>,
    pub max_connections: u32,
}

/// Backoff for transient store failures.
#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub multiplier: f32,
}

/// Dead-letter policy.
#[derive(Debug, Clone, Copy)]
pub struct DlqSettings {
    /// 0 disables the cap.
    pub max_consecutive_invalid: u64,
}

/// The HTTP sidecar.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub bind_address: std::net::IpAddr,
    pub health_port: u16,
    pub metrics_port: u16,
    pub stall_timeout: Duration,
}

/// Circuit breakers of the stores.
#[derive(Debug, Clone, Copy)]
pub struct CircuitSettings {
    pub failure_threshold: u32,
    pub cooldown: Duration,
}

/// How much the pipeline holds and writes at once.
#[derive(Debug, Clone, Copy)]
pub struct PipelineSettings {
    /// Payload bytes in flight before fetching pauses.
    pub max_in_flight_bytes: u64,
    /// immudb transactions in flight at once, over all topics.
    pub immudb_concurrency: usize,
    /// PostgreSQL batch statements in flight at once, over all topics.
    pub postgres_concurrency: usize,
}

/// The read side (`serve`).
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub port: u16,
    pub bind_address: std::net::IpAddr,
    /// HMAC key of the pagination cursors; `serve` refuses to start without it.
    pub cursor_key: Option<SecretString>,
    pub access_topic: String,
    pub query_timeout: Duration,
}

/// The identity provider whose tokens `serve` accepts.
#[derive(Debug, Clone)]
pub struct OidcSettings {
    /// `serve` refuses to start without it.
    pub issuer: Option<String>,
    pub audience: String,
    /// The claim path, split at the dots.
    pub roles_claim: Vec<String>,
    pub jwks_url: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Logging.
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub immudb: ImmudbSettings,
    pub postgres: PostgresSettings,
    pub retry: RetrySettings,
    pub audit: AuditSettings,
    pub circuit: CircuitSettings,
    pub pipeline: PipelineSettings,
    pub dlq: DlqSettings,
    pub http: HttpSettings,
    pub api: ApiSettings,
    pub oidc: OidcSettings,
    pub log: LogSettings,
    pub instance_id: String,
    pub shutdown_timeout: Duration,
}

/// Settings plus where each value came from, for `check-config`.
pub struct LoadedSettings {
    pub settings: Settings,
    layered: Layered,
}

impl LoadedSettings {
    /// The effective configuration, one `key = value  # ENV (source)` line per setting, secrets
    /// redacted.
    pub fn render_redacted(&self) -> String {
        let mut out = String::new();
        for spec in SETTINGS {
            let (value, source) = match self.layered.values.get(spec.key) {
                Some(raw) if spec.secret => ("[redacted]".to_owned(), raw.source.to_string()),
                Some(raw) => (raw.value.clone(), raw.source.to_string()),
                None if spec.key == "instance_id" => {
                    (self.settings.instance_id.clone(), "derived".into())
                }
                None => ("(unset)".to_owned(), "default".to_owned()),
            };
            out.push_str(&format!(
                "{:<34} = {:<40} # {} ({})\n",
                spec.key, value, spec.env, source
            ));
        }
        for (name, value) in &self.layered.kafka_properties {
            let shown = if is_secret_property(name) {
                "[redacted]"
            } else {
                value
            };
            out.push_str(&format!("kafka.properties.{name} = {shown}\n"));
        }
        out
    }
}

/// librdkafka properties that carry credentials.
fn is_secret_property(name: &str) -> bool {
    ["password", "secret", "key.pem", "token"]
        .iter()
        .any(|needle| name.contains(needle))
}

impl Settings {
    /// Loads and validates the configuration from `sources`.
    pub fn load(sources: &Sources<'_>) -> Result<LoadedSettings, ConfigError> {
        let layered = Layered::load(sources)?;
        let settings = Settings::from_layered(&layered)?;
        Ok(LoadedSettings { settings, layered })
    }

    fn from_layered(l: &Layered) -> Result<Self, ConfigError> {
        let kafka = KafkaSettings {
            brokers: list(l, "kafka.brokers")?,
            group_id: required(l, "kafka.group_id")?,
            topics: list(l, "kafka.topics")?,
            dlq_topic: required(l, "kafka.dlq_topic")?,
            auto_offset_reset: choice(
                l,
                "kafka.auto_offset_reset",
                &[
                    ("earliest", OffsetReset::Earliest),
                    ("latest", OffsetReset::Latest),
                ],
            )?,
            batch_size: number(l, "kafka.batch_size", 1, MAX_BATCH_SIZE as u64)? as usize,
            batch_timeout: duration(l, "kafka.batch_timeout")?,
            session_timeout: duration(l, "kafka.session_timeout")?,
            max_poll_interval: duration(l, "kafka.max_poll_interval")?,
            client_properties: kafka_client_properties(l)?,
            sasl_password: optional(l, "kafka.sasl_password").map(SecretString::from),
        };
        if kafka.topics.contains(&kafka.dlq_topic) {
            return Err(invalid(
                "kafka.dlq_topic",
                format!(
                    "`{}` is also a consumed topic; dead letters would be consumed again",
                    kafka.dlq_topic
                ),
            ));
        }

        let immudb_tls = if boolean(l, "immudb.tls")? {
            Some(ImmudbTlsSettings {
                ca_cert: optional(l, "immudb.tls_ca_cert").map(PathBuf::from),
                domain: optional(l, "immudb.tls_domain"),
                client_cert: optional(l, "immudb.tls_client_cert").map(PathBuf::from),
                client_key: optional(l, "immudb.tls_client_key").map(PathBuf::from),
            })
        } else {
            None
        };
        if let Some(tls) = &immudb_tls
            && tls.client_cert.is_some() != tls.client_key.is_some()
        {
            return Err(ConfigError::Inconsistent(
                "IMMUDB_TLS_CLIENT_CERT and IMMUDB_TLS_CLIENT_KEY must be set together".into(),
            ));
        }
        let immudb = ImmudbSettings {
            host: required(l, "immudb.host")?,
            port: number(l, "immudb.port", 1, u16::MAX as u64)? as u16,
            database: required(l, "immudb.database")?,
            create_database: boolean(l, "immudb.create_database")?,
            sync_frequency: parse_with(l, "immudb.sync_frequency", |v| {
                // Longer than a second would time batch writes out rather than group them.
                parse_duration(v).and_then(|d| {
                    if d > Duration::from_secs(1) {
                        Err(format!("{v} is above the maximum 1s"))
                    } else {
                        Ok(d)
                    }
                })
            })?,
            username: required(l, "immudb.username")?,
            password: required_secret(l, "immudb.password")?,
            tls: immudb_tls,
            request_timeout: duration(l, "immudb.request_timeout")?,
            verify: boolean(l, "immudb.verify")?,
            server_signing_key: optional(l, "immudb.server_signing_key").map(PathBuf::from),
        };

        let postgres = PostgresSettings {
            host: required(l, "postgres.host")?,
            port: number(l, "postgres.port", 1, u16::MAX as u64)? as u16,
            database: required(l, "postgres.database")?,
            username: required(l, "postgres.username")?,
            password: required_secret(l, "postgres.password")?,
            schema: identifier(l, "postgres.schema")?,
            ssl_mode: choice(
                l,
                "postgres.ssl_mode",
                &[
                    ("disable", PgSslMode::Disable),
                    ("prefer", PgSslMode::Prefer),
                    ("require", PgSslMode::Require),
                    ("verify-ca", PgSslMode::VerifyCa),
                    ("verify-full", PgSslMode::VerifyFull),
                ],
            )?,
            ssl_root_cert: optional(l, "postgres.ssl_root_cert").map(PathBuf::from),
            max_connections: number(l, "postgres.max_connections", 2, 1000)? as u32,
        };

        let retry = RetrySettings {
            max_attempts: number(l, "retry.max_attempts", 0, 100)? as u32,
            initial_delay: duration(l, "retry.initial_delay")?,
            max_delay: duration(l, "retry.max_delay")?,
            multiplier: float(l, "retry.multiplier", 1.0, 10.0)? as f32,
        };
        if retry.max_delay < retry.initial_delay {
            return Err(ConfigError::Inconsistent(
                "RETRY_MAX_DELAY must not be shorter than RETRY_INITIAL_DELAY".into(),
            ));
        }

        let pipeline = PipelineSettings {
            max_in_flight_bytes: number(l, "pipeline.max_in_flight_bytes", 1 << 20, 1 << 40)?,
            immudb_concurrency: number(l, "pipeline.immudb_concurrency", 1, 64)? as usize,
            postgres_concurrency: number(l, "pipeline.postgres_concurrency", 1, 64)? as usize,
        };
        if pipeline.postgres_concurrency >= postgres.max_connections as usize {
            return Err(ConfigError::Inconsistent(format!(
                "PIPELINE_POSTGRES_CONCURRENCY ({}) must be below POSTGRES_MAX_CONNECTIONS ({}): \
                 the trusted-state writes, readiness checks and audits need a connection too",
                pipeline.postgres_concurrency, postgres.max_connections
            )));
        }

        let http = HttpSettings {
            bind_address: parse_with(l, "http.bind_address", |v| {
                v.parse()
                    .map_err(|_| format!("\"{v}\" is not an IP address"))
            })?,
            health_port: number(l, "http.health_port", 0, u16::MAX as u64)? as u16,
            metrics_port: number(l, "http.metrics_port", 0, u16::MAX as u64)? as u16,
            stall_timeout: duration(l, "http.stall_timeout")?,
        };

        let api = ApiSettings {
            port: number(l, "api.port", 0, u16::MAX as u64)? as u16,
            bind_address: parse_with(l, "api.bind_address", |v| {
                v.parse()
                    .map_err(|_| format!("\"{v}\" is not an IP address"))
            })?,
            cursor_key: optional(l, "api.cursor_key").map(SecretString::from),
            access_topic: required(l, "api.access_topic")?,
            query_timeout: duration(l, "api.query_timeout")?,
        };
        if let Some(key) = &api.cursor_key
            && key.expose_secret().len() < 32
        {
            return Err(invalid(
                "api.cursor_key",
                "shorter than 32 characters; use a random key (e.g. `openssl rand -hex 32`)".into(),
            ));
        }
        let oidc = OidcSettings {
            issuer: optional(l, "oidc.issuer"),
            audience: required(l, "oidc.audience")?,
            roles_claim: required(l, "oidc.roles_claim")?
                .split('.')
                .map(str::to_owned)
                .collect(),
            jwks_url: optional(l, "oidc.jwks_url"),
            ca_cert: optional(l, "oidc.ca_cert").map(PathBuf::from),
        };
        if oidc.roles_claim.iter().any(String::is_empty) {
            return Err(invalid(
                "oidc.roles_claim",
                "a dotted claim path without empty parts, e.g. realm_access.roles".into(),
            ));
        }

        let log = LogSettings {
            level: required(l, "log.level")?,
            format: choice(
                l,
                "log.format",
                &[("json", LogFormat::Json), ("pretty", LogFormat::Pretty)],
            )?,
        };

        Ok(Settings {
            kafka,
            immudb,
            postgres,
            retry,
            audit: AuditSettings {
                interval: duration(l, "audit.interval")?,
                sample_size: number(l, "audit.sample_size", 0, 10_000)? as u32,
            },
            circuit: CircuitSettings {
                failure_threshold: number(l, "circuit.failure_threshold", 1, 1000)? as u32,
                cooldown: duration(l, "circuit.cooldown")?,
            },
            pipeline,
            dlq: DlqSettings {
                max_consecutive_invalid: number(l, "dlq.max_consecutive_invalid", 0, u64::MAX)?,
            },
            http,
            api,
            oidc,
            log,
            instance_id: optional(l, "instance_id").unwrap_or_else(|| "audit-consumer".to_owned()),
            shutdown_timeout: duration(l, "shutdown_timeout")?,
        })
    }
}

/// The security settings become librdkafka properties; explicit `kafka.properties` win so
/// users can set anything librdkafka knows without a new release.
fn kafka_client_properties(l: &Layered) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut props = BTreeMap::new();
    let protocol = choice(
        l,
        "kafka.security_protocol",
        &[
            ("plaintext", "plaintext"),
            ("ssl", "ssl"),
            ("sasl_plaintext", "sasl_plaintext"),
            ("sasl_ssl", "sasl_ssl"),
        ],
    )?;
    props.insert("security.protocol".to_owned(), protocol.to_owned());
    for (key, property) in [
        ("kafka.ssl_ca_location", "ssl.ca.location"),
        ("kafka.ssl_certificate_location", "ssl.certificate.location"),
        ("kafka.ssl_key_location", "ssl.key.location"),
        ("kafka.sasl_mechanism", "sasl.mechanisms"),
        ("kafka.sasl_username", "sasl.username"),
        ("kafka.group_instance_id", "group.instance.id"),
    ] {
        if let Some(value) = optional(l, key) {
            props.insert(property.to_owned(), value);
        }
    }
    if protocol.starts_with("sasl") && optional(l, "kafka.sasl_mechanism").is_none() {
        return Err(invalid(
            "kafka.security_protocol",
            format!("`{protocol}` needs KAFKA_SASL_MECHANISM"),
        ));
    }
    for (name, value) in &l.kafka_properties {
        props.insert(name.clone(), value.clone());
    }
    Ok(props)
}

/// A setting's built-in default as written in [`SETTINGS`]; `None` when it has none.
///
/// # Panics
/// When `key` is not a declared setting.
pub fn default_of(key: &str) -> Option<&'static str> {
    spec(key).default
}

/// A duration setting's built-in default, parsed.
///
/// # Panics
/// When `key` is not a declared setting, has no default, or its default is not a duration.
pub fn default_duration(key: &str) -> Duration {
    let text = default_of(key).unwrap_or_else(|| panic!("setting {key} has no default"));
    parse_duration(text).unwrap_or_else(|e| panic!("the default of {key}: {e}"))
}

fn spec(key: &str) -> &'static SettingSpec {
    SETTINGS
        .iter()
        .find(|spec| spec.key == key)
        .unwrap_or_else(|| panic!("setting {key} is not declared in SETTINGS"))
}

fn invalid(key: &str, reason: String) -> ConfigError {
    let spec = spec(key);
    ConfigError::Invalid {
        env: spec.env,
        key: spec.key,
        reason,
    }
}

fn optional(l: &Layered, key: &str) -> Option<String> {
    l.raw(key)
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

fn required(l: &Layered, key: &str) -> Result<String, ConfigError> {
    optional(l, key).ok_or_else(|| invalid(key, "must not be empty".into()))
}

fn required_secret(l: &Layered, key: &str) -> Result<SecretString, ConfigError> {
    // Secrets are not trimmed: leading or trailing spaces may be part of a password.
    match l.raw(key) {
        Some(value) if !value.is_empty() => Ok(SecretString::from(value.to_owned())),
        _ => Err(invalid(
            key,
            format!("must be set (directly or through {}_FILE)", spec(key).env),
        )),
    }
}

fn parse_with<T>(
    l: &Layered,
    key: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    let value = required(l, key)?;
    parse(&value).map_err(|reason| invalid(key, reason))
}

fn list(l: &Layered, key: &str) -> Result<Vec<String>, ConfigError> {
    let items: Vec<String> = required(l, key)?
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect();
    if items.is_empty() {
        return Err(invalid(key, "must list at least one entry".into()));
    }
    Ok(items)
}

fn number(l: &Layered, key: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    parse_with(l, key, |v| {
        let n: u64 = v
            .parse()
            .map_err(|_| format!("\"{v}\" is not a whole number"))?;
        if n < min {
            return Err(format!("{n} is below the minimum {min}"));
        }
        if n > max {
            return Err(format!("{n} is above the maximum {max}"));
        }
        Ok(n)
    })
}

fn float(l: &Layered, key: &str, min: f64, max: f64) -> Result<f64, ConfigError> {
    parse_with(l, key, |v| {
        let n: f64 = v.parse().map_err(|_| format!("\"{v}\" is not a number"))?;
        if !(min..=max).contains(&n) {
            return Err(format!("{n} is outside {min}..={max}"));
        }
        Ok(n)
    })
}

fn boolean(l: &Layered, key: &str) -> Result<bool, ConfigError> {
    choice(
        l,
        key,
        &[("true", true), ("false", false), ("1", true), ("0", false)],
    )
}

fn choice<T: Copy>(l: &Layered, key: &str, options: &[(&str, T)]) -> Result<T, ConfigError> {
    parse_with(l, key, |v| {
        let lowered = v.to_ascii_lowercase();
        options
            .iter()
            .find(|(name, _)| *name == lowered)
            .map(|(_, value)| *value)
            .ok_or_else(|| {
                let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
                format!("\"{v}\" is not one of {}", names.join(", "))
            })
    })
}

fn identifier(l: &Layered, key: &str) -> Result<String, ConfigError> {
    parse_with(l, key, |v| {
        let valid = v.len() <= 63
            && v.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && v.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid {
            Ok(v.to_owned())
        } else {
            Err(format!(
                "\"{v}\" is not a lower-case SQL identifier ([a-z_][a-z0-9_]*, at most 63 chars)"
            ))
        }
    })
}

fn duration(l: &Layered, key: &str) -> Result<Duration, ConfigError> {
    parse_with(l, key, parse_duration)
}

/// Parses `250ms`, `5s`, `2m`, `1h`. Deliberately strict: a bare number or "5 seconds" is
/// ambiguous or a typo, and a wrong timeout is worse than a refused start.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let expected = || {
        format!(
            "\"{text}\" is not a duration; expected a whole number with a unit ms, s, m or h (e.g. 5s)"
        )
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(expected)?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| expected())?;
    let millis = match unit {
        "ms" => n,
        "s" => n.saturating_mul(1_000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        _ => return Err(expected()),
    };
    Ok(Duration::from_millis(millis))
}

impl PostgresSettings {
    /// sqlx connection options (the password is handed over, never formatted into a URL).
    pub fn connect_options(&self) -> sqlx::postgres::PgConnectOptions {
        use sqlx::postgres::{PgConnectOptions, PgSslMode as Mode};
        let mode = match self.ssl_mode {
            PgSslMode::Disable => Mode::Disable,
            PgSslMode::Prefer => Mode::Prefer,
            PgSslMode::Require => Mode::Require,
            PgSslMode::VerifyCa => Mode::VerifyCa,
            PgSslMode::VerifyFull => Mode::VerifyFull,
        };
        let mut options = PgConnectOptions::new()
            .host(&self.host)
            .port(self.port)
            .database(&self.database)
            .username(&self.username)
            .password(self.password.expose_secret())
            .ssl_mode(mode)
            .application_name("audit-consumer");
        if let Some(cert) = &self.ssl_root_cert {
            options = options.ssl_root_cert(cert);
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads with both passwords set, then `pairs` applied on top.
    fn load_env(pairs: &[(&str, &str)]) -> Result<LoadedSettings, ConfigError> {
        let mut env = BTreeMap::from([
            ("IMMUDB_PASSWORD".to_owned(), "immudb-secret".to_owned()),
            ("POSTGRES_PASSWORD".to_owned(), "pg-secret".to_owned()),
        ]);
        env.extend(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        Settings::load(&Sources { file: None, env })
    }

    fn error_of(pairs: &[(&str, &str)]) -> String {
        match load_env(pairs) {
            Ok(_) => panic!("expected {pairs:?} to be rejected"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let settings = load_env(&[]).expect("defaults load").settings;
        assert_eq!(settings.kafka.batch_size, 100);
        assert_eq!(settings.kafka.group_id, "gacp-audit-trail-consumer");
        assert_eq!(
            settings.kafka.topics.len(),
            5,
            "four audit topics and the access topic"
        );
        assert_eq!(settings.retry.max_attempts, 3);
        assert_eq!(settings.shutdown_timeout, Duration::from_secs(25));
    }

    #[test]
    fn bad_values_name_the_setting_and_reason() {
        assert_eq!(
            error_of(&[("KAFKA_BATCH_SIZE", "0")]),
            "KAFKA_BATCH_SIZE (kafka.batch_size): 0 is below the minimum 1"
        );
        assert_eq!(
            error_of(&[("KAFKA_BATCH_SIZE", "5000")]),
            "KAFKA_BATCH_SIZE (kafka.batch_size): 5000 is above the maximum 512"
        );
        assert_eq!(
            error_of(&[
                ("PIPELINE_POSTGRES_CONCURRENCY", "8"),
                ("POSTGRES_MAX_CONNECTIONS", "8")
            ]),
            "PIPELINE_POSTGRES_CONCURRENCY (8) must be below POSTGRES_MAX_CONNECTIONS (8): \
             the trusted-state writes, readiness checks and audits need a connection too"
        );
        assert!(
            error_of(&[("KAFKA_BATCH_TIMEOUT", "5 seconds")]).starts_with(
                "KAFKA_BATCH_TIMEOUT (kafka.batch_timeout): \"5 seconds\" is not a duration"
            )
        );
        assert_eq!(
            error_of(&[("KAFKA_BROKERS", " , ")]),
            "KAFKA_BROKERS (kafka.brokers): must list at least one entry"
        );
        assert!(
            error_of(&[("IMMUDB_PORT", "http")])
                .starts_with("IMMUDB_PORT (immudb.port): \"http\" is not a whole number")
        );
        assert!(
            error_of(&[("KAFKA_AUTO_OFFSET_RESET", "smallest")])
                .contains("not one of earliest, latest")
        );
        assert!(
            error_of(&[("KAFKA_DLQ_TOPIC", "audit.system.v1")]).contains("also a consumed topic")
        );
    }

    #[test]
    fn static_membership_is_opt_in() {
        let dynamic = load_env(&[]).expect("defaults load").settings;
        assert!(
            !dynamic
                .kafka
                .client_properties
                .contains_key("group.instance.id")
        );
        let fixed = load_env(&[("KAFKA_GROUP_INSTANCE_ID", "audit-consumer-0")])
            .expect("loads")
            .settings;
        assert_eq!(
            fixed.kafka.client_properties["group.instance.id"],
            "audit-consumer-0"
        );
    }

    #[test]
    fn missing_secret_is_named() {
        assert_eq!(
            error_of(&[("IMMUDB_PASSWORD", "")]),
            "IMMUDB_PASSWORD (immudb.password): must be set (directly or through IMMUDB_PASSWORD_FILE)"
        );
    }

    #[test]
    fn durations_are_strict() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["5", "5 s", "s", "", "-1s", "1.5s", "5sec"] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn env_overrides_file_and_secret_files_are_read() {
        let dir =
            std::env::temp_dir().join(format!("audit-consumer-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("config.toml");
        let secret = dir.join("password");
        std::fs::write(&secret, "from-file-secret\n").expect("write secret");
        std::fs::write(
            &file,
            "[kafka]\nbatch_size = 10\ntopics = [\"a.v1\", \"b.v1\"]\n[kafka.properties]\n\"fetch.max.bytes\" = \"1048576\"\n[postgres]\npassword = \"p\"\n",
        )
        .expect("write config");
        let env = BTreeMap::from([
            ("KAFKA_BATCH_SIZE".to_owned(), "20".to_owned()),
            (
                "IMMUDB_PASSWORD_FILE".to_owned(),
                secret.to_string_lossy().into_owned(),
            ),
            (
                "KAFKA_PROP_SOCKET_KEEPALIVE_ENABLE".to_owned(),
                "true".to_owned(),
            ),
        ]);
        let loaded = Settings::load(&Sources {
            file: Some(&file),
            env,
        })
        .expect("loads");
        assert_eq!(loaded.settings.kafka.batch_size, 20);
        assert_eq!(loaded.settings.kafka.topics, ["a.v1", "b.v1"]);
        assert_eq!(
            loaded.settings.immudb.password.expose_secret(),
            "from-file-secret"
        );
        assert_eq!(
            loaded.settings.kafka.client_properties["fetch.max.bytes"],
            "1048576"
        );
        assert_eq!(
            loaded.settings.kafka.client_properties["socket.keepalive.enable"],
            "true"
        );
        let rendered = loaded.render_redacted();
        assert!(!rendered.contains("from-file-secret"), "{rendered}");
        assert!(rendered.contains("immudb.password"), "{rendered}");
        assert!(rendered.contains("[redacted]"), "{rendered}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir =
            std::env::temp_dir().join(format!("audit-consumer-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("config.toml");
        std::fs::write(&file, "[kafka]\nbatch_sise = 10\n").expect("write config");
        let err = Settings::load(&Sources {
            file: Some(&file),
            env: BTreeMap::new(),
        })
        .err()
        .expect("typo rejected");
        assert_eq!(
            err.to_string(),
            "kafka.batch_sise: unknown setting in the config file"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
