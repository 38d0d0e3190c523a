//! Tamper evidence at run time: the trusted state established at start-up, and the continuous
//! audit that keeps checking the server against it.
//!
//! At start-up the persisted trusted state is loaded and the server's current state must be
//! proven to extend it (a dual proof). A server whose history was rolled back or rewritten fails
//! that proof, and the daemon refuses to start rather than write on top of it. Then, every
//! `AUDIT_INTERVAL`, the same proof is checked against the server's newest state and a sample
//! of PostgreSQL rows is re-verified against immudb.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::AuditSettings;
use crate::event::payload_sha256;
use crate::immudb::{
    ImmudbClient, ImmudbError, StateVerifyingKey, TrustedState, VerificationError,
};
use crate::metrics::metrics;
use crate::trust::{Trust, TrustFailure, TrustStore};

/// Why trust could not be established at start-up.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(
        "immudb's current state is not consistent with the trusted state (tx {trusted_tx}): {source}; \
         tamper or rollback suspected, refusing to write"
    )]
    Inconsistent {
        trusted_tx: u64,
        #[source]
        source: ImmudbError,
    },
    #[error(
        "immudb's state signature does not verify with IMMUDB_SERVER_SIGNING_KEY: {0}; \
         tamper or rollback suspected, refusing to write"
    )]
    BadSignature(#[source] VerificationError),
    #[error("immudb: {0}")]
    Immudb(#[from] ImmudbError),
    #[error("PostgreSQL (trusted state): {0}")]
    Postgres(#[from] crate::postgres::PgError),
}

/// The trusted state established at start-up: the server's current state, proven to extend
/// the shared row (`row`, as loaded; `None` when no replica verified anything yet).
pub struct Established {
    pub current: TrustedState,
    pub row: Option<TrustedState>,
}

/// Loads the trusted state and proves the server's current state extends it. With no
/// persisted state (first start against this database) the server is trusted on first use,
/// and that is logged. Nothing is persisted here: the [`Trust`] built from the result moves the
/// shared row by compare-and-set.
pub async fn establish_trust(
    immudb: &ImmudbClient,
    store: &TrustStore,
    server_key: Option<&StateVerifyingKey>,
) -> Result<Established, TrustError> {
    let database = immudb.database().to_owned();
    let row = store.load(&database).await?;
    let trusted = match &row {
        Some(state) => state.clone(),
        None => {
            tracing::warn!(
                database = %database,
                "no trusted immudb state persisted yet: trusting the server's current state on first use"
            );
            TrustedState::fresh(&database)
        }
    };
    let current = immudb.current_state().await?;
    // With a configured key the server must sign its state, even an empty database's.
    if let Some(key) = server_key {
        let signed = TrustedState::from_proto(&current)
            .and_then(|state| state.verify_signature(key))
            .map_err(|error| {
                metrics().verification_failures.inc();
                tracing::error!(event = "tamper_suspected", %error, "immudb's state signature does not verify");
                TrustError::BadSignature(error)
            });
        signed?;
    }
    if current.tx_id == 0 && trusted.is_fresh() {
        return Ok(Established {
            current: trusted,
            row,
        });
    }
    match immudb.verified_tx_by_id(current.tx_id, &trusted).await {
        Ok((_, verified)) => {
            tracing::info!(
                trusted_tx = trusted.tx_id,
                current_tx = verified.tx_id,
                "immudb's current state is consistent with the trusted state"
            );
            Ok(Established {
                current: verified,
                row,
            })
        }
        Err(error @ ImmudbError::VerificationFailed { .. }) => {
            metrics().verification_failures.inc();
            tracing::error!(
                event = "tamper_suspected",
                trusted_tx = trusted.tx_id,
                server_tx = current.tx_id,
                %error,
                "immudb failed verification against the trusted state at start-up"
            );
            Err(TrustError::Inconsistent {
                trusted_tx: trusted.tx_id,
                source: error,
            })
        }
        Err(error) => Err(error.into()),
    }
}

/// Runs the continuous audit until `stop`.
pub async fn run_continuous_audit(
    settings: AuditSettings,
    immudb: ImmudbClient,
    pg: PgPool,
    trust: Arc<Trust>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(settings.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        if trust.tampered() {
            continue;
        }
        match audit_once(&settings, &immudb, &pg, &trust).await {
            Ok(checked) => {
                metrics()
                    .last_audit_timestamp
                    .set(chrono::Utc::now().timestamp());
                tracing::info!(
                    rows_checked = checked,
                    trusted_tx = trust.current().tx_id,
                    "continuous audit passed"
                );
            }
            Err(AuditFailure::Tampered(what, error)) => trust.suspect_tampering(&what, &error),
            // The trust layer already set the latch and logged why.
            Err(AuditFailure::Latched) => {}
            Err(AuditFailure::Unavailable(error)) => {
                tracing::warn!(%error, "continuous audit could not run this round")
            }
        }
    }
}

enum AuditFailure {
    Tampered(String, String),
    Latched,
    Unavailable(String),
}

impl From<TrustFailure> for AuditFailure {
    fn from(failure: TrustFailure) -> Self {
        match failure {
            TrustFailure::Tampered(_) => AuditFailure::Latched,
            other => AuditFailure::Unavailable(other.to_string()),
        }
    }
}

impl From<ImmudbError> for AuditFailure {
    fn from(error: ImmudbError) -> Self {
        match error {
            ImmudbError::VerificationFailed { .. } => {
                AuditFailure::Tampered("server state".into(), error.to_string())
            }
            other => AuditFailure::Unavailable(other.to_string()),
        }
    }
}

/// One round: the newest state against the trusted one, then a sample of rows.
async fn audit_once(
    settings: &AuditSettings,
    immudb: &ImmudbClient,
    pg: &PgPool,
    trust: &Trust,
) -> Result<usize, AuditFailure> {
    let current = immudb.current_state().await?;
    let trusted = trust.current();
    if current.tx_id > 0 {
        let (_, verified) = immudb.verified_tx_by_id(current.tx_id, &trusted).await?;
        let newest = verified.tx_id;
        trust.accept(&trusted, verified).await?;
        trust.settle(newest).await?;
    }
    // A random starting point in the primary key, wrapping around to the start: a cheap,
    // uniform-enough sample that covers the whole table when the sample is as large as it.
    let rows: Vec<(Uuid, String, i64, Vec<u8>)> = sqlx::query_as(
        "(SELECT event_id, immudb_key, immudb_tx, payload_sha256 FROM audit_trail \
          WHERE event_id >= $1 ORDER BY event_id LIMIT $2) \
         UNION ALL \
         (SELECT event_id, immudb_key, immudb_tx, payload_sha256 FROM audit_trail \
          WHERE event_id < $1 ORDER BY event_id LIMIT $2)",
    )
    .bind(Uuid::new_v4())
    .bind(i64::from(settings.sample_size))
    .fetch_all(pg)
    .await
    .map_err(|e| AuditFailure::Unavailable(e.to_string()))?;
    let rows = &rows[..rows.len().min(settings.sample_size as usize)];
    let trusted = trust.current();
    for (event_id, key, tx, digest) in rows {
        let at_tx = u64::try_from(*tx).ok();
        match immudb.verified_get(key.as_bytes(), at_tx, &trusted).await? {
            Some((entry, _)) if payload_sha256(&entry.value).as_slice() == digest.as_slice() => {}
            Some(_) => {
                return Err(AuditFailure::Tampered(
                    format!("row {event_id}"),
                    format!("payload_sha256 differs from the immudb value at {key} tx {tx}"),
                ));
            }
            None => {
                return Err(AuditFailure::Tampered(
                    format!("row {event_id}"),
                    format!("{key} at tx {tx} is missing in immudb"),
                ));
            }
        }
    }
    Ok(rows.len())
}

/// How long start-up waits between attempts while PostgreSQL or immudb is unreachable.
pub const STARTUP_RETRY: Duration = Duration::from_secs(2);
