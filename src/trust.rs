//! The trusted immudb state: loaded from and advanced in PostgreSQL, shared by the writers.
//!
//! Every verified immudb answer is proven consistent with the trusted state; the state then
//! moves forward to the answer's transaction. It is persisted outside immudb (a server cannot
//! vouch for itself) in `immudb_trusted_state`, a table whose trigger only lets it move forward,
//! so a restarted replica resumes from what was verified and a rolled-back server fails the next
//! proof instead of being trusted again. Replicas share the row: each advances it to the highest
//! transaction it has verified.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sqlx::PgPool;

use crate::immudb::TrustedState;
use crate::metrics::metrics;
use crate::postgres::PgError;

/// Persistence of the trusted state in PostgreSQL.
#[derive(Clone)]
pub struct TrustStore {
    pool: PgPool,
}

impl TrustStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The persisted state of `database`, if any was ever verified.
    pub async fn load(&self, database: &str) -> Result<Option<TrustedState>, PgError> {
        let row: Option<(i64, Vec<u8>, Option<serde_json::Value>)> = sqlx::query_as(
            "SELECT tx_id, tx_hash, signature FROM immudb_trusted_state WHERE immudb_database = $1",
        )
        .bind(database)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(tx_id, hash, signature)| {
            Some(TrustedState {
                db: database.to_owned(),
                tx_id: u64::try_from(tx_id).ok()?,
                tx_hash: hash.try_into().ok()?,
                signature: signature.and_then(|s| serde_json::from_value(s).ok()),
            })
        }))
    }

    /// Moves the persisted state forward to `state` (never backward: an older state from a
    /// slower replica is ignored).
    pub async fn advance(&self, state: &TrustedState) -> Result<(), PgError> {
        if state.is_fresh() {
            return Ok(());
        }
        let signature = state
            .signature
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok());
        sqlx::query(
            "INSERT INTO immudb_trusted_state (immudb_database, tx_id, tx_hash, signature) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (immudb_database) DO UPDATE \
             SET tx_id = EXCLUDED.tx_id, tx_hash = EXCLUDED.tx_hash, signature = EXCLUDED.signature, \
                 updated_at = now() \
             WHERE immudb_trusted_state.tx_id < EXCLUDED.tx_id",
        )
        .bind(&state.db)
        .bind(i64::try_from(state.tx_id).unwrap_or(i64::MAX))
        .bind(state.tx_hash.to_vec())
        .bind(signature)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Writes of the trusted state one `advance` call may make while it holds the persist lock.
const MAX_PERSIST_PASSES: usize = 2;

/// The trusted state in memory, shared by the writers and the continuous audit.
pub struct Trust {
    state: Mutex<TrustedState>,
    store: TrustStore,
    tampered: AtomicBool,
    /// The transaction of the newest state written to PostgreSQL by this process.
    persisted_tx: AtomicU64,
    /// Held by the one writer persisting; the others leave their newer state to it.
    persisting: tokio::sync::Mutex<()>,
}

impl Trust {
    pub fn new(initial: TrustedState, store: TrustStore) -> Self {
        metrics()
            .trusted_tx_id
            .set(i64::try_from(initial.tx_id).unwrap_or(i64::MAX));
        Self {
            persisted_tx: AtomicU64::new(initial.tx_id),
            state: Mutex::new(initial),
            store,
            tampered: AtomicBool::new(false),
            persisting: tokio::sync::Mutex::new(()),
        }
    }

    /// The state proofs are checked against now.
    pub fn current(&self) -> TrustedState {
        self.state().clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TrustedState> {
        // Every update is a single assignment: a panic elsewhere cannot leave it half-written.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adopts a newly verified state if it is ahead, and persists it. Writes are coalesced: while
    /// one writer persists, the others return at once and it then persists the newest state
    /// too, so the concurrent writers never queue on the row's lock and PostgreSQL sees at most
    /// one write in flight. The writer holding the lock makes at most [`MAX_PERSIST_PASSES`]
    /// writes, so a slow PostgreSQL cannot keep it (and its topic) there while the others keep
    /// moving; a newer state left over is persisted by the next call or by [`Trust::flush`].
    pub async fn advance(&self, verified: TrustedState) -> Result<(), PgError> {
        let ahead = {
            let mut state = self.state();
            let ahead = verified.tx_id > state.tx_id;
            if ahead {
                *state = verified.clone();
                metrics()
                    .trusted_tx_id
                    .set(i64::try_from(verified.tx_id).unwrap_or(i64::MAX));
            }
            ahead
        };
        if !ahead {
            return Ok(());
        }
        let mut passes = 0;
        // Re-checked after letting go of the lock: a state adopted while its holder was about
        // to let go would otherwise be left unpersisted.
        while passes < MAX_PERSIST_PASSES && self.unpersisted() {
            let Ok(_persisting) = self.persisting.try_lock() else {
                return Ok(());
            };
            while passes < MAX_PERSIST_PASSES && self.unpersisted() {
                self.persist_current().await?;
                passes += 1;
            }
        }
        Ok(())
    }

    /// Persists the newest verified state if it is not yet, waiting for a write in progress.
    /// Called once the writers have stopped, so a clean shutdown leaves the newest anchor.
    pub async fn flush(&self) -> Result<(), PgError> {
        let _persisting = self.persisting.lock().await;
        if self.unpersisted() {
            self.persist_current().await?;
        }
        Ok(())
    }

    fn unpersisted(&self) -> bool {
        self.state().tx_id > self.persisted_tx.load(Ordering::SeqCst)
    }

    async fn persist_current(&self) -> Result<(), PgError> {
        let newest = self.current();
        self.store.advance(&newest).await?;
        self.persisted_tx.fetch_max(newest.tx_id, Ordering::SeqCst);
        Ok(())
    }

    /// A proof failed: the server's history contradicts what was verified. Sticky until an
    /// operator restarts the daemon after investigating.
    pub fn suspect_tampering(&self, what: &str, error: &dyn std::fmt::Display) {
        self.tampered.store(true, Ordering::SeqCst);
        metrics().verification_failures.inc();
        tracing::error!(
            event = "tamper_suspected",
            check = what,
            %error,
            "immudb failed verification against the trusted state: consumption stops"
        );
    }

    /// Whether a verification failed since start.
    pub fn tampered(&self) -> bool {
        self.tampered.load(Ordering::SeqCst)
    }
}
