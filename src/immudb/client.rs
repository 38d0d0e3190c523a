//! Session-based immudb client over our own gRPC stubs.
//!
//! One session per client (all clones share it). immudb deletes a session after
//! `--session-timeout` (2 min by default) without requests, or after `--max-session-age-time`
//! (unlimited by default) however busy, and forgets all sessions when it restarts. A
//! background KeepAlive covers the first case; a transparent re-open-and-retry (once per
//! request) covers them all.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::RwLock;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Response, Status};

use super::error::{
    ImmudbError, classify, error_chain, is_database_missing, is_key_not_found, is_no_more_entries,
    is_session_gone,
};
use super::proto::{self, immu_service_client::ImmuServiceClient};
use super::verify::{
    StateVerifyingKey, TrustedState, VerificationError, VerifyContext, verify_get_answer,
    verify_set_answer, verify_tx_answer,
};
use super::{Entry, State, TxHeader};

/// Largest message we send. Matches immudb's default `--max-recv-msg-size` (32 MiB): anything
/// bigger would be refused by the server anyway, so tonic refuses it locally first.
pub const MAX_ENCODING_MESSAGE_BYTES: usize = 32 << 20;

/// Largest message we accept. immudb values may be 32 MiB, and a response wraps a value with
/// key, metadata and framing, so this sits well above 32 MiB while still bounding memory.
pub const MAX_DECODING_MESSAGE_BYTES: usize = 64 << 20;

/// How often an idle session is kept alive. immudb closes a session after `--session-timeout`
/// (default 2 min) of inactivity; 30 s leaves three misses of slack.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Revisions [`ImmudbClient::history`] collects at most. Audit keys are written once, so more
/// than this signals misuse rather than an audit trail, and it bounds the memory used.
pub const MAX_HISTORY_REVISIONS: usize = 10_000;

/// Metadata header immudb reads the session id from.
const SESSION_HEADER: &str = "sessionid";

/// Database always present on an immudb server; a sysadmin session there can create others.
const BOOTSTRAP_DATABASE: &str = "defaultdb";

/// immudb prefixes every stored key and value with one byte of its own, so the usable
/// length is one less than the configured maximum.
const IMMUDB_INTERNAL_PREFIX_BYTES: usize = 1;

// immudb's defaults, used when the server does not report a setting.
const DEFAULT_MAX_TX_ENTRIES: u32 = 1024;
const DEFAULT_MAX_KEY_LEN: u32 = 1024;
const DEFAULT_MAX_VALUE_LEN: u32 = 32 << 20;
const DEFAULT_SYNC_FREQUENCY: Duration = Duration::from_millis(20);

type Grpc = ImmuServiceClient<Channel>;

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ImmudbConnectOptions {
    /// Server host name or IP address.
    pub host: String,
    /// gRPC port (immudb's default is 3322).
    pub port: u16,
    /// Database holding the audit trail. immudb lower-cases database names.
    pub database: String,
    /// User to open the session with.
    pub username: String,
    /// Password of `username`; never logged nor put into errors.
    pub password: SecretString,
    /// TLS settings; `None` for plaintext.
    pub tls: Option<ImmudbTls>,
    /// Deadline for establishing the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Deadline for each request, including a batch write.
    pub request_timeout: Duration,
    /// Create `database` when it does not exist (needs a sysadmin user).
    pub create_database: bool,
    /// How long immudb may hold a commit to share its fsync with later ones (its
    /// `syncFrequency`), for a database this client creates; `None` keeps immudb's 20 ms.
    /// Commits stay durable either way. An existing database keeps its own value, which is
    /// logged at connect, with a warning when it is longer than this one.
    pub sync_frequency: Option<Duration>,
}

/// TLS towards immudb. Server certificates are checked against the system roots plus
/// `ca_cert_pem` when given.
#[derive(Clone, Default)]
pub struct ImmudbTls {
    /// Extra CA certificate(s), PEM.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// Name expected in the server certificate; defaults to the host.
    pub domain: Option<String>,
    /// Client certificate for mutual TLS, PEM; requires `client_key_pem`.
    pub client_cert_pem: Option<Vec<u8>>,
    /// Client private key for mutual TLS, PEM; requires `client_cert_pem`.
    pub client_key_pem: Option<Vec<u8>>,
}

// Hand-written so the private key never ends up in a log line.
impl fmt::Debug for ImmudbTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImmudbTls")
            .field("ca_cert_pem", &self.ca_cert_pem.as_ref().map(|_| "<pem>"))
            .field("domain", &self.domain)
            .field(
                "client_cert_pem",
                &self.client_cert_pem.as_ref().map(|_| "<pem>"),
            )
            .field(
                "client_key_pem",
                &self.client_key_pem.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// One key/value to write. `value` is stored byte for byte as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// Key; must be non-empty and at most [`ImmudbLimits::max_key_len`] bytes.
    pub key: Vec<u8>,
    /// Value; at most [`ImmudbLimits::max_value_len`] bytes.
    pub value: Vec<u8>,
}

/// Per-request limits of the connected database, as usable by a client (immudb's own one-byte
/// prefixes already subtracted). Read once at connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImmudbLimits {
    /// Entries one transaction may hold (`maxTxEntries`, default 1024).
    pub max_tx_entries: usize,
    /// Longest key in bytes (`maxKeyLen` − 1, default 1023).
    pub max_key_len: usize,
    /// Longest value in bytes (`maxValueLen` − 1, default 32 MiB − 1). A whole request must
    /// also fit in [`MAX_ENCODING_MESSAGE_BYTES`].
    pub max_value_len: usize,
}

impl ImmudbLimits {
    fn from_settings(settings: Option<&proto::DatabaseNullableSettings>) -> Self {
        let read = |field: Option<&proto::NullableUint32>, default: u32| {
            usize::try_from(field.map_or(default, |v| v.value)).unwrap_or(usize::MAX)
        };
        let max_tx_entries = read(
            settings.and_then(|s| s.max_tx_entries.as_ref()),
            DEFAULT_MAX_TX_ENTRIES,
        );
        let max_key_len = read(
            settings.and_then(|s| s.max_key_len.as_ref()),
            DEFAULT_MAX_KEY_LEN,
        );
        let max_value_len = read(
            settings.and_then(|s| s.max_value_len.as_ref()),
            DEFAULT_MAX_VALUE_LEN,
        );
        ImmudbLimits {
            max_tx_entries,
            max_key_len: max_key_len.saturating_sub(IMMUDB_INTERNAL_PREFIX_BYTES),
            max_value_len: max_value_len.saturating_sub(IMMUDB_INTERNAL_PREFIX_BYTES),
        }
    }
}

/// An immudb client bound to one database through one session. Cheap to clone; clones share
/// the connection and the session and may be used from many tasks at once.
///
/// Dropping the last clone stops the KeepAlive task; the server then expires the session on
/// its own. Call [`close`](Self::close) for a clean shutdown.
#[derive(Clone)]
pub struct ImmudbClient {
    inner: Arc<Inner>,
    /// When set, verified operations also require the server's signature over each new state.
    server_key: Option<StateVerifyingKey>,
}

struct Inner {
    grpc: Grpc,
    database: String,
    username: String,
    password: SecretString,
    limits: ImmudbLimits,
    sync_frequency: Duration,
    /// Write-locked while a session is (re)opened, so concurrent callers that all saw the old
    /// session gone wait for the one re-open instead of opening a session each.
    session: RwLock<Session>,
    closed: AtomicBool,
    keepalive: CancellationToken,
    /// Cancels `keepalive` when the last clone goes away.
    _keepalive_guard: DropGuard,
}

#[derive(Clone)]
struct Session {
    id: MetadataValue<Ascii>,
    /// Bumped on every re-open, so a caller can tell whether someone already replaced the
    /// session it saw fail.
    generation: u64,
}

impl fmt::Debug for ImmudbClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImmudbClient")
            .field("database", &self.inner.database)
            .field("username", &self.inner.username)
            .field("limits", &self.inner.limits)
            .field("server_key", &self.server_key)
            .finish_non_exhaustive()
    }
}

impl ImmudbClient {
    /// Connects, opens a session on `opts.database` (creating the database first when it is
    /// missing and `opts.create_database` allows it), reads the database limits and starts the
    /// KeepAlive task. Must be called within a Tokio runtime.
    pub async fn connect(opts: ImmudbConnectOptions) -> Result<Self, ImmudbError> {
        let channel =
            build_endpoint(&opts)?
                .connect()
                .await
                .map_err(|e| ImmudbError::Transient {
                    op: "connect",
                    code: tonic::Code::Unavailable,
                    message: format!("{}:{}: {}", opts.host, opts.port, error_chain(&e)),
                })?;
        let grpc = ImmuServiceClient::new(channel)
            .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_ENCODING_MESSAGE_BYTES);

        log_server_version(&grpc).await;

        let creds = Credentials {
            username: &opts.username,
            password: &opts.password,
        };
        let session_id = match open_session_raw(&grpc, &creds, &opts.database).await {
            Ok(id) => id,
            Err(status) if is_database_missing(&status) => {
                if !opts.create_database {
                    return Err(ImmudbError::Config(format!(
                        "database '{}' does not exist and creating it is not enabled",
                        opts.database
                    )));
                }
                create_database(&grpc, &creds, &opts.database, opts.sync_frequency).await?;
                open_session(&grpc, &creds, &opts.database).await?
            }
            Err(status) => return Err(classify_open_session(&status, &opts.password)),
        };

        let settings = match grpc
            .clone()
            .get_database_settings_v2(with_session(
                proto::DatabaseSettingsRequest {},
                session_id.clone(),
            ))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                // No client will own this session: do not leave it to linger until expiry.
                let _ = grpc
                    .clone()
                    .close_session(with_session(proto::Empty {}, session_id))
                    .await;
                return Err(classify("read database settings", &status));
            }
        };
        let limits = ImmudbLimits::from_settings(settings.settings.as_ref());
        let sync_frequency = settings
            .settings
            .as_ref()
            .and_then(|s| s.sync_frequency.as_ref())
            .map_or(DEFAULT_SYNC_FREQUENCY, |ms| {
                Duration::from_millis(u64::try_from(ms.value).unwrap_or(0))
            });
        tracing::info!(database = %opts.database, ?limits, sync_frequency_ms = sync_frequency.as_millis() as u64, "immudb session opened");
        if let Some(wanted) = opts.sync_frequency
            && sync_frequency > wanted
        {
            // KeyMustNotExist transactions commit one after the other, so immudb never has a
            // second commit to share the fsync with: the wait is pure latency on every batch.
            tracing::warn!(
                database = %opts.database,
                sync_frequency_ms = sync_frequency.as_millis() as u64,
                wanted_ms = wanted.as_millis() as u64,
                "immudb holds every commit this long before its fsync, which slows each batch; \
                 run `immuadmin database update {} --sync-frequency={}ms`",
                opts.database,
                wanted.as_millis()
            );
        }

        let keepalive = CancellationToken::new();
        let inner = Arc::new(Inner {
            grpc,
            database: opts.database,
            username: opts.username,
            password: opts.password,
            limits,
            sync_frequency,
            session: RwLock::new(Session {
                id: session_id,
                generation: 0,
            }),
            closed: AtomicBool::new(false),
            _keepalive_guard: keepalive.clone().drop_guard(),
            keepalive: keepalive.clone(),
        });
        spawn_keepalive(Arc::downgrade(&inner), keepalive);
        Ok(ImmudbClient {
            inner,
            server_key: None,
        })
    }

    /// How long the connected database holds a commit before its fsync (immudb's
    /// `syncFrequency`), as read at connect.
    pub fn sync_frequency(&self) -> Duration {
        self.inner.sync_frequency
    }

    /// Limits of the connected database, to size batches and reject oversized events before
    /// they are sent.
    pub fn limits(&self) -> ImmudbLimits {
        self.inner.limits
    }

    /// Writes all `kvs` in ONE immudb transaction and returns its header
    /// (`nentries == kvs.len()`). With `must_not_exist`, every key carries a `KeyMustNotExist`
    /// precondition: if any key already exists the whole transaction is refused with
    /// [`ImmudbError::PreconditionFailed`] and nothing is written.
    ///
    /// The call returns once the transaction is committed and indexed, so reads see it at once.
    /// A transient error (e.g. a timeout) is ambiguous: the transaction may have committed. A
    /// retry with `must_not_exist` then fails its precondition, and the caller tells a
    /// duplicate from a conflict by reading the keys back with [`get_all`](Self::get_all).
    ///
    /// Requests immudb would refuse (empty batch, more than `max_tx_entries`, empty, long or
    /// duplicated keys, long values) are refused here as [`ImmudbError::InvalidArgument`]
    /// without a round trip.
    pub async fn set_all(
        &self,
        kvs: &[KeyValue],
        must_not_exist: bool,
    ) -> Result<TxHeader, ImmudbError> {
        self.validate_batch(kvs)?;
        self.call("set", |mut grpc, sid| {
            let request = with_session(set_request(kvs, must_not_exist), sid);
            async move { grpc.set(request).await }
        })
        .await
    }

    /// Reads the current value of each key that exists, in one snapshot. Missing keys are
    /// simply absent from the result (no error, no placeholder); entries come back in the order
    /// of `keys`. The whole response must fit in [`MAX_DECODING_MESSAGE_BYTES`], so read
    /// values of many megabytes one by one with [`get`](Self::get).
    pub async fn get_all(&self, keys: &[Vec<u8>]) -> Result<Vec<Entry>, ImmudbError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let entries = self
            .call("get all", |mut grpc, sid| {
                let request = with_session(
                    proto::KeyListRequest {
                        keys: keys.to_vec(),
                        since_tx: 0,
                    },
                    sid,
                );
                async move { grpc.get_all(request).await }
            })
            .await?;
        Ok(entries.entries)
    }

    /// Reads the current value of `key`; `None` when the key does not exist.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Entry>, ImmudbError> {
        self.get_at(key, None).await
    }

    /// Reads `key` as transaction `at_tx` wrote it (`None`: its current value); `None` when
    /// there is no such entry. A plain read: see [`verified_get`](Self::verified_get) for one
    /// with proofs.
    pub async fn get_at(
        &self,
        key: &[u8],
        at_tx: Option<u64>,
    ) -> Result<Option<Entry>, ImmudbError> {
        let result = self
            .call_raw("get", |mut grpc, sid| {
                let request = with_session(
                    proto::KeyRequest {
                        key: key.to_vec(),
                        at_tx: at_tx.unwrap_or(0),
                        ..Default::default()
                    },
                    sid,
                );
                async move { grpc.get(request).await }
            })
            .await?;
        match result {
            Ok(entry) => Ok(Some(entry)),
            Err(status) if is_key_not_found(&status) => Ok(None),
            Err(status) => Err(classify("get", &status)),
        }
    }

    /// All revisions of `key`, oldest first (empty when the key does not exist). Pages through
    /// the server's result-size limit; fails with [`ImmudbError::InvalidArgument`] past
    /// [`MAX_HISTORY_REVISIONS`].
    pub async fn history(&self, key: &[u8]) -> Result<Vec<Entry>, ImmudbError> {
        let mut revisions: Vec<Entry> = Vec::new();
        loop {
            let offset = revisions.len() as u64;
            let result = self
                .call_raw("history", |mut grpc, sid| {
                    // limit 0 = the server's page size (its MaxResultSize, 2500 by default),
                    // which the API does not tell; the end shows as an empty page or as
                    // "no more entries".
                    let request = with_session(
                        proto::HistoryRequest {
                            key: key.to_vec(),
                            offset,
                            ..Default::default()
                        },
                        sid,
                    );
                    async move { grpc.history(request).await }
                })
                .await?;
            let page = match result {
                Ok(page) => page.entries,
                Err(status) if is_key_not_found(&status) || is_no_more_entries(&status) => {
                    Vec::new()
                }
                Err(status) => return Err(classify("history", &status)),
            };
            if page.is_empty() {
                return Ok(revisions);
            }
            revisions.extend(page);
            if revisions.len() > MAX_HISTORY_REVISIONS {
                return Err(ImmudbError::InvalidArgument {
                    op: "history",
                    message: format!("key has more than {MAX_HISTORY_REVISIONS} revisions"),
                });
            }
        }
    }

    /// One page of the keys starting with `prefix`, in ascending key order, each with its
    /// current value: the keys strictly after `seek_key` (empty: from the first key), at most
    /// `limit` of them (0: the server's page size). `since_tx` makes the server wait until its
    /// index covers that transaction, so a page reflects at least that state (0: no wait).
    /// An empty page means the end. Deleted and expired keys are skipped by the server.
    ///
    /// immudb refuses a `limit` above its `--max-result-size` (2500 by default); that, and a
    /// page too large for [`MAX_DECODING_MESSAGE_BYTES`], fail as
    /// [`ImmudbError::InvalidArgument`], so a caller can retry with a smaller `limit`.
    pub async fn scan(
        &self,
        prefix: &[u8],
        seek_key: &[u8],
        limit: u64,
        since_tx: u64,
    ) -> Result<Vec<Entry>, ImmudbError> {
        let result = self
            .call_raw("scan", |mut grpc, sid| {
                let request = with_session(
                    proto::ScanRequest {
                        seek_key: seek_key.to_vec(),
                        prefix: prefix.to_vec(),
                        limit,
                        since_tx,
                        // Paging resumes after the last key of the previous page.
                        inclusive_seek: false,
                        ..Default::default()
                    },
                    sid,
                );
                async move { grpc.scan(request).await }
            })
            .await?;
        match result {
            Ok(entries) => Ok(entries.entries),
            Err(status) if is_no_more_entries(&status) => Ok(Vec::new()),
            // immudb sends this as UNKNOWN, which would otherwise read as transient: retrying
            // the same limit cannot help.
            Err(status) if status.message().contains("result size limit exceeded") => {
                Err(ImmudbError::InvalidArgument {
                    op: "scan",
                    message: status.message().to_owned(),
                })
            }
            Err(status) => Err(classify("scan", &status)),
        }
    }

    /// Requires, from now on, that every answer of the verified operations
    /// ([`verify_set_batch`](Self::verify_set_batch), [`verified_get`](Self::verified_get),
    /// [`verified_tx_by_id`](Self::verified_tx_by_id)) carries a valid signature by the server's
    /// state-signing key (immudb started with `--signingKey`). Applies to this handle and the
    /// clones made from it afterwards.
    pub fn with_server_signing_key(mut self, key: StateVerifyingKey) -> Self {
        self.server_key = Some(key);
        self
    }

    /// The database name as the server knows it (immudb lower-cases names when opening a
    /// session); it is part of every signed state and of [`TrustedState`].
    pub fn database(&self) -> String {
        self.inner.database.to_lowercase()
    }

    /// Writes all `kvs` in ONE transaction like [`set_all`](Self::set_all) (same validation
    /// and `KeyMustNotExist` preconditions) and returns the transaction with a dual proof from
    /// `prove_since_tx` (0: from the new transaction to itself). Nothing is verified here;
    /// see [`verify_set_batch`](Self::verify_set_batch).
    pub async fn verifiable_set_all(
        &self,
        kvs: &[KeyValue],
        must_not_exist: bool,
        prove_since_tx: u64,
    ) -> Result<proto::VerifiableTx, ImmudbError> {
        self.validate_batch(kvs)?;
        self.call("verifiable set", |mut grpc, sid| {
            let request = with_session(
                proto::VerifiableSetRequest {
                    set_request: Some(set_request(kvs, must_not_exist)),
                    prove_since_tx,
                },
                sid,
            );
            async move { grpc.verifiable_set(request).await }
        })
        .await
    }

    /// Reads `key` (its value as written by transaction `at_tx`, or its latest value) with the
    /// proofs of its inclusion and of its transaction from `prove_since_tx`. `None` when the
    /// key does not exist (immudb cannot prove absence). Nothing is verified here; see
    /// [`verified_get`](Self::verified_get).
    pub async fn verifiable_get(
        &self,
        key: &[u8],
        at_tx: Option<u64>,
        prove_since_tx: u64,
    ) -> Result<Option<proto::VerifiableEntry>, ImmudbError> {
        let result = self
            .call_raw("verifiable get", |mut grpc, sid| {
                let request = with_session(
                    proto::VerifiableGetRequest {
                        key_request: Some(proto::KeyRequest {
                            key: key.to_vec(),
                            at_tx: at_tx.unwrap_or(0),
                            ..Default::default()
                        }),
                        prove_since_tx,
                    },
                    sid,
                );
                async move { grpc.verifiable_get(request).await }
            })
            .await?;
        match result {
            Ok(entry) => Ok(Some(entry)),
            Err(status) if is_key_not_found(&status) => Ok(None),
            Err(status) => Err(classify("verifiable get", &status)),
        }
    }

    /// Transaction `tx` (header and the digests of all its entries) with a dual proof between
    /// it and `prove_since_tx`. Nothing is verified here; see
    /// [`verified_tx_by_id`](Self::verified_tx_by_id).
    pub async fn verifiable_tx_by_id(
        &self,
        tx: u64,
        prove_since_tx: u64,
    ) -> Result<proto::VerifiableTx, ImmudbError> {
        self.call("verifiable tx by id", |mut grpc, sid| {
            let request = with_session(
                proto::VerifiableTxRequest {
                    tx,
                    prove_since_tx,
                    ..Default::default()
                },
                sid,
            );
            async move { grpc.verifiable_tx_by_id(request).await }
        })
        .await
    }

    /// Writes `kvs` in one transaction (as [`set_all`](Self::set_all)) and verifies the
    /// server's proofs before returning: every written key/value is in the new transaction
    /// (its entry digest, computed here from the bytes we sent, is included in the tx's `eH`),
    /// the transaction extends the history of `trusted` (dual proof), and — with
    /// [`with_server_signing_key`](Self::with_server_signing_key) — the server signed the new
    /// state. Returns the header and the new trusted state to use for the next call.
    ///
    /// A fresh `trusted` ([`TrustedState::fresh`], tx 0) is trust on first use: the new
    /// transaction is checked against what was written and for internal consistency, but
    /// nothing links it to an earlier state.
    ///
    /// Failures: [`ImmudbError::VerificationFailed`] when a proof fails (never transient; the
    /// transaction may be committed all the same), otherwise as [`set_all`](Self::set_all).
    /// Concurrent callers may verify from the same trusted state; keep the returned state
    /// with the highest `tx_id`. Each returned state is proven to extend `trusted`, not yet
    /// each other: a later verified call from the kept state that covers the other
    /// transaction (e.g. [`verified_tx_by_id`](Self::verified_tx_by_id)) closes that gap.
    pub async fn verify_set_batch(
        &self,
        kvs: &[KeyValue],
        must_not_exist: bool,
        trusted: &TrustedState,
    ) -> Result<(TxHeader, TrustedState), ImmudbError> {
        let op = "verified set";
        let db = self.checked_database(op, trusted)?;
        let answer = self
            .verifiable_set_all(kvs, must_not_exist, trusted.tx_id)
            .await
            .map_err(|e| behind_trusted_state(op, e, trusted))?;
        let ctx = VerifyContext {
            db: &db,
            trusted,
            server_key: self.server_key.as_ref(),
        };
        verify_set_answer(&ctx, kvs, &answer)
            .map_err(|source| ImmudbError::VerificationFailed { op, source })
    }

    /// Reads `key` (as written by `at_tx`, or its latest value) and returns it only if the
    /// proofs verify: the entry is included in its transaction, that transaction and
    /// `trusted` are linked by a dual proof, and the state is signed when a server key is set.
    /// Returns the entry and the new trusted state (the entry's transaction when newer than
    /// `trusted`, else `trusted` unchanged); `None` when the key does not exist. A fresh
    /// `trusted` is trust on first use, as for [`verify_set_batch`](Self::verify_set_batch).
    pub async fn verified_get(
        &self,
        key: &[u8],
        at_tx: Option<u64>,
        trusted: &TrustedState,
    ) -> Result<Option<(Entry, TrustedState)>, ImmudbError> {
        let op = "verified get";
        let db = self.checked_database(op, trusted)?;
        let Some(answer) = self
            .verifiable_get(key, at_tx, trusted.tx_id)
            .await
            .map_err(|e| behind_trusted_state(op, e, trusted))?
        else {
            return Ok(None);
        };
        let ctx = VerifyContext {
            db: &db,
            trusted,
            server_key: self.server_key.as_ref(),
        };
        verify_get_answer(&ctx, key, at_tx, &answer)
            .map(Some)
            .map_err(|source| ImmudbError::VerificationFailed { op, source })
    }

    /// Fetches transaction `tx` and returns it only if it is linked to `trusted` by a dual
    /// proof (either direction), its listed entry digests rebuild its `eH`, and the state is
    /// signed when a server key is set. Returns the transaction and the new trusted state.
    pub async fn verified_tx_by_id(
        &self,
        tx: u64,
        trusted: &TrustedState,
    ) -> Result<(proto::Tx, TrustedState), ImmudbError> {
        let op = "verified tx by id";
        let db = self.checked_database(op, trusted)?;
        let answer = self
            .verifiable_tx_by_id(tx, trusted.tx_id)
            .await
            .map_err(|e| behind_trusted_state(op, e, trusted))?;
        let ctx = VerifyContext {
            db: &db,
            trusted,
            server_key: self.server_key.as_ref(),
        };
        verify_tx_answer(&ctx, tx, &answer)
            .map_err(|source| ImmudbError::VerificationFailed { op, source })
    }

    /// The database name, refusing a trusted state of another database before any request.
    fn checked_database(
        &self,
        op: &'static str,
        trusted: &TrustedState,
    ) -> Result<String, ImmudbError> {
        let db = self.database();
        if trusted.db != db {
            return Err(ImmudbError::VerificationFailed {
                op,
                source: VerificationError::TrustedState(format!(
                    "it is for database '{}', this client is on '{db}'",
                    trusted.db
                )),
            });
        }
        Ok(db)
    }

    /// Cheap readiness probe: a KeepAlive on our session. It proves the server answers and
    /// that our credentials still open a session on the database (re-opening it if needed).
    pub async fn health(&self) -> Result<(), ImmudbError> {
        self.call("keep alive", |mut grpc, sid| {
            let request = with_session(proto::Empty {}, sid);
            async move { grpc.keep_alive(request).await }
        })
        .await
        .map(|_| ())
    }

    /// Creates an immudb user with `permission` on `database` (1 read, 2 read+write, 254 admin).
    /// Needs a session of a user allowed to manage users (the sysadmin); the password must meet
    /// immudb's policy (8–32 characters with upper and lower case, a digit and a symbol). Used by
    /// the tests (a read-only login) and for least-privilege logins of the read side.
    pub async fn create_user(
        &self,
        username: &str,
        password: &SecretString,
        permission: u32,
        database: &str,
    ) -> Result<(), ImmudbError> {
        self.call("create user", |mut grpc, sid| {
            let request = with_session(
                proto::CreateUserRequest {
                    user: username.as_bytes().to_vec(),
                    password: password.expose_secret().as_bytes().to_vec(),
                    permission,
                    database: database.to_owned(),
                },
                sid,
            );
            async move { grpc.create_user(request).await }
        })
        .await
        .map(|_| ())
    }

    /// Probes whether this login may write, without writing: a `Set` whose `KeyMustExist`
    /// precondition names a key that does not exist. immudb checks the caller's permission
    /// before the preconditions, so a login that may write gets "precondition failed" (nothing
    /// committed) and one that may only read gets "permission denied". A KeepAlive would
    /// succeed for both, which is why it cannot close a circuit opened by a refused write.
    pub async fn write_probe(&self) -> Result<(), ImmudbError> {
        let absent = format!("audit-consumer:write-probe:{}", uuid::Uuid::new_v4()).into_bytes();
        let request = proto::SetRequest {
            kvs: vec![proto::KeyValue {
                key: b"audit-consumer:write-probe".to_vec(),
                value: Vec::new(),
                metadata: None,
            }],
            no_wait: false,
            preconditions: vec![proto::Precondition {
                precondition: Some(proto::precondition::Precondition::KeyMustExist(
                    proto::precondition::KeyMustExistPrecondition { key: absent },
                )),
            }],
        };
        match self
            .call("write probe", |mut grpc, sid| {
                let request = with_session(request.clone(), sid);
                async move { grpc.set(request).await }
            })
            .await
        {
            Err(ImmudbError::PreconditionFailed { .. }) => Ok(()),
            Ok(header) => Err(ImmudbError::Permanent {
                op: "write probe",
                code: tonic::Code::Internal,
                message: format!(
                    "immudb committed tx {} although its precondition cannot hold",
                    header.id
                ),
            }),
            Err(error) => Err(error),
        }
    }

    /// The database's current state: last committed transaction id and its accumulated hash.
    pub async fn current_state(&self) -> Result<State, ImmudbError> {
        self.call("current state", |mut grpc, sid| {
            let request = with_session(proto::Empty {}, sid);
            async move { grpc.current_state(request).await }
        })
        .await
    }

    /// Stops the KeepAlive task and closes the session on the server, best effort (failures
    /// are logged: the server expires the session anyway). Every later call on this client or
    /// its clones fails with [`ImmudbError::Closed`].
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.keepalive.cancel();
        let session = self.inner.session.read().await.clone();
        if let Err(status) = self.inner.close_session(session.id).await {
            tracing::debug!(error = %status.message(), "closing the immudb session failed");
        }
    }

    /// Test hook: closes the session on the server *without* telling the client, exactly like
    /// a server-side expiry or restart would. Not for production use.
    #[doc(hidden)]
    pub async fn close_session_behind_back_for_tests(&self) -> Result<(), ImmudbError> {
        let session = self.inner.session.read().await.clone();
        self.inner
            .close_session(session.id)
            .await
            .map_err(|s| classify("close session", &s))
    }

    fn validate_batch(&self, kvs: &[KeyValue]) -> Result<(), ImmudbError> {
        let limits = self.inner.limits;
        let invalid = |message: String| Err(ImmudbError::InvalidArgument { op: "set", message });
        if kvs.is_empty() {
            return invalid("empty batch".into());
        }
        if kvs.len() > limits.max_tx_entries {
            return invalid(format!(
                "{} entries exceed the database's {} entries per transaction",
                kvs.len(),
                limits.max_tx_entries
            ));
        }
        let mut seen = HashSet::with_capacity(kvs.len());
        for (index, kv) in kvs.iter().enumerate() {
            if kv.key.is_empty() {
                return invalid(format!("entry {index}: empty key"));
            }
            if kv.key.len() > limits.max_key_len {
                return invalid(format!(
                    "entry {index}: key of {} bytes exceeds {} bytes",
                    kv.key.len(),
                    limits.max_key_len
                ));
            }
            if kv.value.len() > limits.max_value_len {
                return invalid(format!(
                    "entry {index}: value of {} bytes exceeds {} bytes",
                    kv.value.len(),
                    limits.max_value_len
                ));
            }
            if !seen.insert(kv.key.as_slice()) {
                return invalid(format!("entry {index}: key repeated within the batch"));
            }
        }
        Ok(())
    }

    /// Runs a session-bound call, classifying any failure.
    async fn call<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, ImmudbError>
    where
        F: Fn(Grpc, MetadataValue<Ascii>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.call_raw(op, call)
            .await?
            .map_err(|status| classify(op, &status))
    }

    /// Runs a session-bound call; if the server no longer knows the session, re-opens it once
    /// and retries. The outer error is for session/closing trouble, the inner `Status` is the
    /// call's own failure, left to the caller to interpret (e.g. "key not found").
    async fn call_raw<T, F, Fut>(
        &self,
        op: &'static str,
        call: F,
    ) -> Result<Result<T, Status>, ImmudbError>
    where
        F: Fn(Grpc, MetadataValue<Ascii>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(ImmudbError::Closed);
        }
        let session = inner.session.read().await.clone();
        match call(inner.grpc.clone(), session.id.clone()).await {
            Ok(response) => return Ok(Ok(response.into_inner())),
            Err(status) if is_session_gone(&status) => {
                tracing::debug!(
                    op,
                    "immudb session is gone (expired or server restarted); re-opening it"
                );
            }
            Err(status) => return Ok(Err(status)),
        }
        let session = inner.reopen_session(session.generation).await?;
        match call(inner.grpc.clone(), session.id).await {
            Ok(response) => Ok(Ok(response.into_inner())),
            Err(status) if is_session_gone(&status) => Err(ImmudbError::Transient {
                op,
                code: status.code(),
                message: format!(
                    "session lost again right after re-opening it: {}",
                    status.message()
                ),
            }),
            Err(status) => Ok(Err(status)),
        }
    }
}

impl Inner {
    /// Replaces the session that the caller saw fail, unless another caller already did.
    async fn reopen_session(&self, failed_generation: u64) -> Result<Session, ImmudbError> {
        let mut current = self.session.write().await;
        if current.generation == failed_generation {
            let creds = Credentials {
                username: &self.username,
                password: &self.password,
            };
            let id = open_session(&self.grpc, &creds, &self.database).await?;
            *current = Session {
                id,
                generation: failed_generation + 1,
            };
            tracing::info!(database = %self.database, "immudb session re-opened");
        }
        Ok(current.clone())
    }

    async fn close_session(&self, id: MetadataValue<Ascii>) -> Result<(), Status> {
        let request = with_session(proto::Empty {}, id);
        self.grpc.clone().close_session(request).await.map(|_| ())
    }
}

struct Credentials<'a> {
    username: &'a str,
    password: &'a SecretString,
}

fn build_endpoint(opts: &ImmudbConnectOptions) -> Result<Endpoint, ImmudbError> {
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    // An IPv6 literal needs brackets inside a URI.
    let host = if opts.host.contains(':') && !opts.host.starts_with('[') {
        format!("[{}]", opts.host)
    } else {
        opts.host.clone()
    };
    let uri = format!("{scheme}://{host}:{}", opts.port);
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| ImmudbError::Config(format!("invalid immudb address {uri}: {e}")))?
        .connect_timeout(opts.connect_timeout)
        .timeout(opts.request_timeout)
        .tcp_nodelay(true);
    if let Some(tls) = &opts.tls {
        endpoint = endpoint
            .tls_config(tls_config(tls)?)
            .map_err(|e| ImmudbError::Config(format!("immudb TLS: {}", error_chain(&e))))?;
    }
    Ok(endpoint)
}

fn tls_config(tls: &ImmudbTls) -> Result<ClientTlsConfig, ImmudbError> {
    let mut config = ClientTlsConfig::new().with_native_roots();
    if let Some(ca) = &tls.ca_cert_pem {
        config = config.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    match (&tls.client_cert_pem, &tls.client_key_pem) {
        (Some(cert), Some(key)) => config = config.identity(Identity::from_pem(cert, key)),
        (None, None) => {}
        _ => {
            return Err(ImmudbError::Config(
                "immudb mutual TLS needs both a client certificate and a client key".into(),
            ));
        }
    }
    Ok(config)
}

/// Logs the server version once; purely informational, so failures are only logged.
async fn log_server_version(grpc: &Grpc) {
    match grpc.clone().server_info(proto::ServerInfoRequest {}).await {
        Ok(info) => tracing::info!(version = %info.get_ref().version, "connected to immudb"),
        Err(status) => tracing::debug!(error = %status.message(), "immudb ServerInfo failed"),
    }
}

async fn open_session_raw(
    grpc: &Grpc,
    creds: &Credentials<'_>,
    database: &str,
) -> Result<MetadataValue<Ascii>, Status> {
    let response = grpc
        .clone()
        .open_session(proto::OpenSessionRequest {
            username: creds.username.as_bytes().to_vec(),
            password: creds.password.expose_secret().as_bytes().to_vec(),
            database_name: database.to_owned(),
        })
        .await?
        .into_inner();
    MetadataValue::try_from(response.session_id.as_str()).map_err(|_| {
        Status::internal("immudb returned a session id that is not valid ASCII metadata")
    })
}

async fn open_session(
    grpc: &Grpc,
    creds: &Credentials<'_>,
    database: &str,
) -> Result<MetadataValue<Ascii>, ImmudbError> {
    open_session_raw(grpc, creds, database)
        .await
        .map_err(|status| classify_open_session(&status, creds.password))
}

/// Classifies an OpenSession failure, scrubbing the password from the message should a
/// server ever echo it.
fn classify_open_session(status: &Status, password: &SecretString) -> ImmudbError {
    let password = password.expose_secret();
    if password.is_empty() || !status.message().contains(password) {
        return classify("open session", status);
    }
    let scrubbed = Status::new(
        status.code(),
        status.message().replace(password, "[redacted]"),
    );
    classify("open session", &scrubbed)
}

/// Creates `database` through a short-lived session on the bootstrap database. Creating is
/// idempotent (`if_not_exists`), so racing daemons do not fail each other.
async fn create_database(
    grpc: &Grpc,
    creds: &Credentials<'_>,
    database: &str,
    sync_frequency: Option<Duration>,
) -> Result<(), ImmudbError> {
    let settings = sync_frequency.map(|every| proto::DatabaseNullableSettings {
        sync_frequency: Some(proto::NullableMilliseconds {
            value: i64::try_from(every.as_millis()).unwrap_or(i64::MAX),
        }),
        ..Default::default()
    });
    let admin = open_session(grpc, creds, BOOTSTRAP_DATABASE).await?;
    let created = grpc
        .clone()
        .create_database_v2(with_session(
            proto::CreateDatabaseRequest {
                name: database.to_owned(),
                settings,
                if_not_exists: true,
            },
            admin.clone(),
        ))
        .await
        .map_err(|s| classify("create database", &s));
    if let Err(status) = grpc
        .clone()
        .close_session(with_session(proto::Empty {}, admin))
        .await
    {
        tracing::debug!(error = %status.message(), "closing the bootstrap immudb session failed");
    }
    let created = created?.into_inner();
    tracing::info!(database = %created.name, already_existed = created.already_existed, "immudb database ensured");
    Ok(())
}

fn set_request(kvs: &[KeyValue], must_not_exist: bool) -> proto::SetRequest {
    let preconditions = if must_not_exist {
        kvs.iter()
            .map(|kv| proto::Precondition {
                precondition: Some(proto::precondition::Precondition::KeyMustNotExist(
                    proto::precondition::KeyMustNotExistPrecondition {
                        key: kv.key.clone(),
                    },
                )),
            })
            .collect()
    } else {
        Vec::new()
    };
    proto::SetRequest {
        kvs: kvs
            .iter()
            .map(|kv| proto::KeyValue {
                key: kv.key.clone(),
                value: kv.value.clone(),
                metadata: None,
            })
            .collect(),
        // Wait for indexing: preconditions and reads right after the write must see it.
        no_wait: false,
        preconditions,
    }
}

fn with_session<T>(message: T, session_id: MetadataValue<Ascii>) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(SESSION_HEADER, session_id);
    request
}

/// Keeps the session alive while the client is idle. Holds only a weak reference, so it never
/// keeps the client alive; it ends on [`ImmudbClient::close`] or when the last clone drops.
fn spawn_keepalive(client: Weak<Inner>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(KEEPALIVE_INTERVAL);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick fires at once; the session was just opened.
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let Some(inner) = client.upgrade() else { break };
            let client = ImmudbClient {
                inner,
                server_key: None,
            };
            match stop.run_until_cancelled(client.health()).await {
                None | Some(Ok(())) | Some(Err(ImmudbError::Closed)) => {}
                Some(Err(error)) => tracing::warn!(%error, "immudb session keep-alive failed"),
            }
        }
        tracing::debug!("immudb keep-alive task stopped");
    });
}

/// immudb refuses a proof from a tx it does not have with a plain "illegal state" error.
/// Against a trusted state the client verified earlier, that means the server lost or rolled
/// back history: a verification failure, not an invalid request.
fn behind_trusted_state(
    op: &'static str,
    error: ImmudbError,
    trusted: &TrustedState,
) -> ImmudbError {
    let rolled_back = trusted.tx_id > 0
        && matches!(&error, ImmudbError::Permanent { message, .. } | ImmudbError::Transient { message, .. } | ImmudbError::InvalidArgument { message, .. } if message.contains("illegal state"));
    if rolled_back {
        ImmudbError::VerificationFailed {
            op,
            source: VerificationError::TrustedState(format!(
                "the server does not have the trusted tx {} any more ({error})",
                trusted.tx_id
            )),
        }
    } else {
        error
    }
}
