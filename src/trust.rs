//! The trusted immudb state: what this deployment has verified, shared by the writers of one
//! process and, through PostgreSQL, by every replica.
//!
//! Two rules keep it a single history:
//! - **In a process**, a verified answer is only adopted against the state it was proven from.
//!   Concurrent writers prove from the same state; when another writer's newer state was adopted
//!   meanwhile, the two are linked by one more proof before either counts (a server that shows
//!   two writers two forks is caught here).
//! - **Across replicas**, the row in `immudb_trusted_state` only moves by compare-and-set from
//!   the state this process last read or wrote. When another replica moved it, the row's state
//!   and ours are proven consistent before the row moves again, so a replica anchored behind the
//!   others cannot carry the row onto a history forked between its anchor and theirs.
//!
//! A batch's rows go to PostgreSQL only once its transaction is *settled*: linked with the row.
//! A failed proof anywhere trips the tamper latch, which stops every writer until a restart.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::immudb::{ImmudbClient, ImmudbError, TrustedState};
use crate::metrics::metrics;
use crate::postgres::PgError;

/// Why the trusted state could not take a verified answer.
#[derive(Debug, thiserror::Error)]
pub enum TrustFailure {
    /// The answers contradict each other or the shared state: tamper or rollback suspected.
    /// The latch is set.
    #[error("tamper suspected: {0}")]
    Tampered(String),
    /// immudb could not be asked for the linking proof; nothing was decided.
    #[error("immudb unavailable for a consistency proof: {0}")]
    Immudb(ImmudbError),
    /// PostgreSQL could not be read or written; nothing was decided.
    #[error("PostgreSQL (trusted state): {0}")]
    Postgres(#[from] PgError),
}

/// Proves that two states of one database lie on one history.
pub trait Prover: Send + Sync {
    /// The state of transaction `tx`, proven consistent with `from` (in either direction: `tx`
    /// may be older than `from`). A proof that fails is [`ImmudbError::VerificationFailed`].
    fn state_at<'a>(
        &'a self,
        from: &'a TrustedState,
        tx: u64,
    ) -> BoxFuture<'a, Result<TrustedState, ImmudbError>>;
}

impl Prover for ImmudbClient {
    fn state_at<'a>(
        &'a self,
        from: &'a TrustedState,
        tx: u64,
    ) -> BoxFuture<'a, Result<TrustedState, ImmudbError>> {
        Box::pin(async move {
            // A blip of the connection must not decide a proof: retried a few times, briefly.
            let mut delay = std::time::Duration::from_millis(100);
            let mut answer = self.verified_tx_by_id(tx, from).await;
            for _ in 0..3 {
                match &answer {
                    Err(error) if error.is_transient() => {
                        tokio::time::sleep(delay).await;
                        delay *= 3;
                        answer = self.verified_tx_by_id(tx, from).await;
                    }
                    _ => break,
                }
            }
            let (proven, newest) = answer?;
            let header = proven
                .header
                .as_ref()
                .ok_or_else(|| ImmudbError::VerificationFailed {
                    op: "verified tx by id",
                    source: crate::immudb::VerificationError::Malformed("no header".into()),
                })?;
            if newest.tx_id == tx {
                return Ok(newest);
            }
            // `tx` is older than `from`: the proof went from it to `from`; its own state is
            // the header's Alh.
            let alh = crate::immudb::verify::header_alh(header).map_err(|source| {
                ImmudbError::VerificationFailed {
                    op: "verified tx by id",
                    source,
                }
            })?;
            Ok(TrustedState {
                db: from.db.clone(),
                tx_id: tx,
                tx_hash: alh,
                signature: None,
            })
        })
    }
}

/// What a compare-and-set of the shared row found.
#[derive(Debug, PartialEq, Eq)]
pub enum Swap {
    /// The row held the expected state and now holds the new one.
    Done,
    /// The row holds another state (another replica moved it): this one.
    Moved(TrustedState),
}

/// Where the shared trusted state lives.
pub trait TrustRow: Send + Sync {
    /// The persisted state of `database`, if any was ever verified.
    fn load<'a>(
        &'a self,
        database: &'a str,
    ) -> BoxFuture<'a, Result<Option<TrustedState>, PgError>>;
    /// Moves the row from `expected` (`None`: no row yet) to `new`, or says where it is.
    fn swap<'a>(
        &'a self,
        expected: Option<&'a TrustedState>,
        new: &'a TrustedState,
    ) -> BoxFuture<'a, Result<Swap, PgError>>;
}

/// The shared trusted state in PostgreSQL's `immudb_trusted_state` (a trigger lets it only move
/// forward).
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

    async fn compare_and_set(
        &self,
        expected: Option<&TrustedState>,
        new: &TrustedState,
    ) -> Result<Swap, PgError> {
        let signature = new
            .signature
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok());
        let tx = i64::try_from(new.tx_id).unwrap_or(i64::MAX);
        let changed = match expected {
            None => sqlx::query(
                "INSERT INTO immudb_trusted_state (immudb_database, tx_id, tx_hash, signature) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (immudb_database) DO NOTHING",
            )
            .bind(&new.db)
            .bind(tx)
            .bind(new.tx_hash.to_vec())
            .bind(signature)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            Some(old) => sqlx::query(
                "UPDATE immudb_trusted_state \
                 SET tx_id = $2, tx_hash = $3, signature = $4, updated_at = now() \
                 WHERE immudb_database = $1 AND tx_id = $5 AND tx_hash = $6",
            )
            .bind(&new.db)
            .bind(tx)
            .bind(new.tx_hash.to_vec())
            .bind(signature)
            .bind(i64::try_from(old.tx_id).unwrap_or(i64::MAX))
            .bind(old.tx_hash.to_vec())
            .execute(&self.pool)
            .await?
            .rows_affected(),
        };
        if changed == 1 {
            return Ok(Swap::Done);
        }
        match self.load(&new.db).await? {
            Some(current) => Ok(Swap::Moved(current)),
            // The row cannot disappear (a trigger refuses DELETE); an expected row that is not
            // there means the table was recreated behind our back.
            None => Err(PgError::Permanent(sqlx::Error::RowNotFound)),
        }
    }
}

impl TrustRow for TrustStore {
    fn load<'a>(
        &'a self,
        database: &'a str,
    ) -> BoxFuture<'a, Result<Option<TrustedState>, PgError>> {
        Box::pin(TrustStore::load(self, database))
    }

    fn swap<'a>(
        &'a self,
        expected: Option<&'a TrustedState>,
        new: &'a TrustedState,
    ) -> BoxFuture<'a, Result<Swap, PgError>> {
        Box::pin(self.compare_and_set(expected, new))
    }
}

/// The two states a process keeps: the newest it verified, and the row as it last saw it.
#[derive(Debug, Clone)]
struct Anchors {
    /// The newest verified state of this process; every adopted state lies on its history.
    current: TrustedState,
    /// The shared row as this process last read or wrote it (`None`: no row yet).
    row: Option<TrustedState>,
    /// Whether `row` is known to lie on `current`'s history. A row behind `current` stays so
    /// when `current` moves on (its history extends the old one); a row ahead of it does not,
    /// and must be linked again before it is relied on.
    row_linked: bool,
}

impl Anchors {
    /// Adopts `newer`, a state proven to extend `current`.
    fn adopt(&mut self, newer: TrustedState) {
        if self
            .row
            .as_ref()
            .is_some_and(|row| row.tx_id > self.current.tx_id)
        {
            self.row_linked = false;
        }
        metrics()
            .trusted_tx_id
            .set(i64::try_from(newer.tx_id).unwrap_or(i64::MAX));
        self.current = newer;
    }
}

/// The trusted state in memory, shared by the writers and the continuous audit.
pub struct Trust {
    anchors: Mutex<Anchors>,
    row_store: Box<dyn TrustRow>,
    prover: Box<dyn Prover>,
    tampered: AtomicBool,
    /// The highest transaction known to lie on the shared row's history (persisted by us, or
    /// proven to be a prefix of the row). Batches wait for it before their PostgreSQL stage.
    settled: watch::Sender<u64>,
    /// Flips once, when tampering is first suspected; writers wait on it.
    latch: watch::Sender<bool>,
    /// Held by the one task persisting; the others wait for `settled` to move.
    persisting: tokio::sync::Mutex<()>,
}

impl Trust {
    /// `current` was proven from `row` (the shared row as loaded at start-up, `None` when there
    /// was none); nothing is persisted yet.
    pub fn new(
        current: TrustedState,
        row: Option<TrustedState>,
        row_store: Box<dyn TrustRow>,
        prover: Box<dyn Prover>,
    ) -> Self {
        metrics()
            .trusted_tx_id
            .set(i64::try_from(current.tx_id).unwrap_or(i64::MAX));
        let settled = row.as_ref().map_or(0, |r| r.tx_id.min(current.tx_id));
        Self {
            // `current` was proven from `row`: the row is a prefix of its history.
            anchors: Mutex::new(Anchors {
                current,
                row,
                row_linked: true,
            }),
            row_store,
            prover,
            tampered: AtomicBool::new(false),
            settled: watch::channel(settled).0,
            latch: watch::channel(false).0,
            persisting: tokio::sync::Mutex::new(()),
        }
    }

    /// The state proofs are checked against now. Keep it: [`accept`](Self::accept) needs it.
    pub fn current(&self) -> TrustedState {
        self.anchors().current.clone()
    }

    fn anchors(&self) -> std::sync::MutexGuard<'_, Anchors> {
        // Every update is a single assignment: a panic elsewhere cannot leave it half-written.
        self.anchors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes `verified`, an answer proven from `base` (what [`current`](Self::current) returned
    /// before the request). When the current state moved meanwhile, `verified` and the current
    /// state are first proven to lie on one history (again, if it moves during that proof).
    /// Fails with [`TrustFailure::Tampered`] (and sets the latch) when they do not.
    pub async fn accept(
        &self,
        base: &TrustedState,
        verified: TrustedState,
    ) -> Result<(), TrustFailure> {
        // The state `verified` is known to share a history with.
        let mut linked = base.clone();
        loop {
            self.check_latch()?;
            let current = {
                let mut anchors = self.anchors();
                if anchors.current == linked {
                    if verified.tx_id > anchors.current.tx_id {
                        anchors.adopt(verified);
                    }
                    return Ok(());
                }
                anchors.current.clone()
            };
            // Another writer's state was adopted after ours was proven from an older one.
            self.link(&current, &verified, "concurrent verified answers")
                .await?;
            if verified.tx_id <= current.tx_id {
                // A prefix of `current`, hence of every later current state (each extends it).
                return Ok(());
            }
            linked = current;
        }
    }

    /// Proves that `a` and `b` (states of one database) lie on one history; a failed proof sets
    /// the latch.
    async fn link(
        &self,
        a: &TrustedState,
        b: &TrustedState,
        what: &str,
    ) -> Result<(), TrustFailure> {
        let (older, newer) = if a.tx_id <= b.tx_id { (a, b) } else { (b, a) };
        let fork = |detail: String| {
            let failure = TrustFailure::Tampered(format!("{what}: {detail}"));
            self.suspect_tampering(what, &failure);
            Err(failure)
        };
        if older.tx_id == newer.tx_id {
            if older.tx_hash == newer.tx_hash {
                return Ok(());
            }
            return fork(format!("two different states of tx {}", older.tx_id));
        }
        if older.is_fresh() {
            return Ok(());
        }
        match self.prover.state_at(older, newer.tx_id).await {
            Ok(proven) if proven.tx_hash == newer.tx_hash => Ok(()),
            Ok(_) => fork(format!(
                "tx {} proven from tx {} is not the state verified before",
                newer.tx_id, older.tx_id
            )),
            Err(error @ ImmudbError::VerificationFailed { .. }) => fork(format!(
                "tx {} does not extend tx {}: {error}",
                newer.tx_id, older.tx_id
            )),
            Err(error) => Err(TrustFailure::Immudb(error)),
        }
    }

    /// Waits until `tx` lies on the shared row's history, persisting the newest state (one task
    /// at a time; the others find their transaction covered by its write). Fails with
    /// [`TrustFailure::Tampered`] when the row and this process's history diverge.
    pub async fn settle(&self, tx: u64) -> Result<(), TrustFailure> {
        loop {
            self.check_latch()?;
            if *self.settled.borrow() >= tx {
                return Ok(());
            }
            let _persisting = tokio::select! {
                guard = self.persisting.lock() => guard,
                () = self.latched() => continue,
            };
            if *self.settled.borrow() >= tx {
                return Ok(());
            }
            self.persist().await?;
        }
    }

    /// Persists the newest state if it is not yet settled (a clean shutdown leaves the newest
    /// anchor).
    pub async fn flush(&self) -> Result<(), TrustFailure> {
        let newest = self.current().tx_id;
        self.settle(newest).await
    }

    /// Moves the row to the current state by compare-and-set, proving consistency with whatever
    /// another replica put there first. Called with `persisting` held.
    async fn persist(&self) -> Result<(), TrustFailure> {
        loop {
            self.check_latch()?;
            let Anchors {
                current,
                row,
                row_linked,
            } = self.anchors().clone();
            if current.is_fresh() {
                return Ok(());
            }
            let Some(row) = row else {
                match self.row_store.swap(None, &current).await? {
                    Swap::Done => self.wrote_row(&current),
                    Swap::Moved(theirs) => self.saw_row(theirs),
                }
                continue;
            };
            if !row_linked {
                self.link(&current, &row, "the shared trusted state")
                    .await?;
                let mut anchors = self.anchors();
                // Still the row we linked, and either the same current state or one that
                // extends a current state the row is behind.
                if anchors.row.as_ref() == Some(&row)
                    && (anchors.current == current || row.tx_id <= current.tx_id)
                {
                    anchors.row_linked = true;
                }
                continue;
            }
            if row.tx_id >= current.tx_id {
                // The row is ahead (or equal) and on our history: what we verified is settled,
                // and the row's state becomes ours.
                let mut anchors = self.anchors();
                if anchors.current != current {
                    continue;
                }
                if row.tx_id > current.tx_id {
                    anchors.adopt(row.clone());
                    anchors.row_linked = true;
                }
                drop(anchors);
                self.mark_settled(row.tx_id);
                return Ok(());
            }
            // Behind us and a prefix of our history: move it to our current state.
            match self.row_store.swap(Some(&row), &current).await? {
                Swap::Done => {
                    self.wrote_row(&current);
                    return Ok(());
                }
                Swap::Moved(theirs) => self.saw_row(theirs),
            }
        }
    }

    /// The row now holds `written`, a state of our history.
    fn wrote_row(&self, written: &TrustedState) {
        {
            let mut anchors = self.anchors();
            anchors.row = Some(written.clone());
            // `written` was current when it was written; any later current state extends it.
            anchors.row_linked = true;
        }
        self.mark_settled(written.tx_id);
    }

    /// Another replica moved the row to `theirs`: it must be linked before it is relied on.
    fn saw_row(&self, theirs: TrustedState) {
        let mut anchors = self.anchors();
        anchors.row = Some(theirs);
        anchors.row_linked = false;
    }

    fn mark_settled(&self, tx: u64) {
        self.settled.send_if_modified(|settled| {
            let moved = tx > *settled;
            *settled = (*settled).max(tx);
            moved
        });
    }

    fn check_latch(&self) -> Result<(), TrustFailure> {
        if self.tampered() {
            return Err(TrustFailure::Tampered(
                "an earlier verification failed; writes stay stopped until a restart".into(),
            ));
        }
        Ok(())
    }

    /// A proof failed: the server's history contradicts what was verified. Sets the latch,
    /// sticky until an operator restarts the daemon after investigating.
    pub fn suspect_tampering(&self, what: &str, error: &dyn std::fmt::Display) {
        self.tampered.store(true, Ordering::SeqCst);
        self.latch.send_replace(true);
        metrics().verification_failures.inc();
        tracing::error!(
            event = "tamper_suspected",
            check = what,
            %error,
            "immudb failed verification against the trusted state: every writer stops until a restart"
        );
    }

    /// Whether tampering is suspected (the latch is set).
    pub fn tampered(&self) -> bool {
        self.tampered.load(Ordering::SeqCst)
    }

    /// Resolves once tampering is suspected.
    pub async fn latched(&self) {
        let mut latch = self.latch.subscribe();
        let _ = latch.wait_for(|set| *set).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    /// A server's history as a map tx → Alh per branch; a proof between two states holds when
    /// both are on the branch the server serves for the newer one.
    #[derive(Default)]
    struct History {
        /// The Alh of each tx on the history the prover answers from.
        served: Mutex<HashMap<u64, [u8; 32]>>,
        proofs: std::sync::atomic::AtomicUsize,
    }

    fn state(tx: u64, branch: u8) -> TrustedState {
        TrustedState {
            db: "db".into(),
            tx_id: tx,
            tx_hash: [branch.wrapping_mul(31).wrapping_add(tx as u8); 32],
            signature: None,
        }
    }

    impl History {
        fn serve(&self, branch: u8, txs: std::ops::RangeInclusive<u64>) {
            let mut served = self.served.lock().unwrap();
            for tx in txs {
                served.insert(tx, state(tx, branch).tx_hash);
            }
        }
    }

    impl Prover for Arc<History> {
        fn state_at<'a>(
            &'a self,
            from: &'a TrustedState,
            tx: u64,
        ) -> BoxFuture<'a, Result<TrustedState, ImmudbError>> {
            Box::pin(async move {
                self.proofs.fetch_add(1, Ordering::SeqCst);
                let served = self.served.lock().unwrap();
                let fail = || ImmudbError::VerificationFailed {
                    op: "test",
                    source: crate::immudb::VerificationError::TrustedState("fork".into()),
                };
                if served.get(&from.tx_id) != Some(&from.tx_hash) {
                    return Err(fail());
                }
                let hash = *served.get(&tx).ok_or_else(fail)?;
                Ok(TrustedState {
                    db: "db".into(),
                    tx_id: tx,
                    tx_hash: hash,
                    signature: None,
                })
            })
        }
    }

    #[derive(Default)]
    struct Row(Mutex<Option<TrustedState>>);

    impl TrustRow for Arc<Row> {
        fn load<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Option<TrustedState>, PgError>> {
            Box::pin(async move { Ok(self.0.lock().unwrap().clone()) })
        }

        fn swap<'a>(
            &'a self,
            expected: Option<&'a TrustedState>,
            new: &'a TrustedState,
        ) -> BoxFuture<'a, Result<Swap, PgError>> {
            Box::pin(async move {
                let mut row = self.0.lock().unwrap();
                if row.as_ref() == expected {
                    *row = Some(new.clone());
                    Ok(Swap::Done)
                } else {
                    Ok(Swap::Moved(row.clone().expect("a row")))
                }
            })
        }
    }

    fn trust(
        history: &Arc<History>,
        row: &Arc<Row>,
        current: TrustedState,
        loaded: Option<TrustedState>,
    ) -> Trust {
        Trust::new(
            current,
            loaded,
            Box::new(row.clone()),
            Box::new(history.clone()),
        )
    }

    #[tokio::test]
    async fn an_answer_proven_from_the_current_state_is_adopted_without_another_proof() {
        let history = Arc::new(History::default());
        history.serve(0, 1..=20);
        let row = Arc::new(Row::default());
        let trust = trust(&history, &row, state(10, 0), None);
        let base = trust.current();
        trust.accept(&base, state(12, 0)).await.expect("accept");
        assert_eq!(trust.current(), state(12, 0));
        assert_eq!(history.proofs.load(Ordering::SeqCst), 0);
        trust.settle(12).await.expect("settle");
        assert_eq!(*row.0.lock().unwrap(), Some(state(12, 0)));
    }

    #[tokio::test]
    async fn concurrent_answers_on_one_history_are_linked_then_adopted() {
        let history = Arc::new(History::default());
        history.serve(0, 1..=20);
        let row = Arc::new(Row::default());
        let trust = trust(&history, &row, state(10, 0), None);
        let base = trust.current();
        trust.accept(&base, state(11, 0)).await.expect("first");
        // The second writer proved tx 12 from tx 10 while tx 11 was adopted.
        trust.accept(&base, state(12, 0)).await.expect("second");
        assert_eq!(trust.current(), state(12, 0));
        assert_eq!(
            history.proofs.load(Ordering::SeqCst),
            1,
            "one linking proof"
        );
        // An older answer proven from the old base is linked, not adopted.
        trust.accept(&base, state(11, 0)).await.expect("older");
        assert_eq!(trust.current(), state(12, 0));
    }

    #[tokio::test]
    async fn concurrent_answers_on_two_forks_trip_the_latch() {
        let history = Arc::new(History::default());
        // The server answered writer one from branch 0 and writer two from branch 1, both
        // extending tx 10; it serves branch 1 for the linking proof.
        history.serve(0, 1..=10);
        history.serve(1, 11..=20);
        let row = Arc::new(Row::default());
        let trust = trust(&history, &row, state(10, 0), None);
        let base = trust.current();
        trust.accept(&base, state(11, 0)).await.expect("first");
        let second = trust.accept(&base, state(12, 1)).await;
        assert!(
            matches!(second, Err(TrustFailure::Tampered(_))),
            "{second:?}"
        );
        assert!(trust.tampered());
        assert_eq!(trust.current(), state(11, 0), "the fork is not adopted");
        let later = trust.accept(&trust.current(), state(12, 0)).await;
        assert!(
            matches!(later, Err(TrustFailure::Tampered(_))),
            "the latch holds"
        );
        assert!(matches!(
            trust.settle(11).await,
            Err(TrustFailure::Tampered(_))
        ));
    }

    #[tokio::test]
    async fn a_row_moved_ahead_on_our_history_settles_us_without_a_write() {
        let history = Arc::new(History::default());
        history.serve(0, 1..=30);
        let row = Arc::new(Row(Mutex::new(Some(state(5, 0)))));
        let trust = trust(&history, &row, state(5, 0), Some(state(5, 0)));
        trust
            .accept(&state(5, 0), state(10, 0))
            .await
            .expect("accept");
        // Another replica moved the row to tx 20 meanwhile.
        *row.0.lock().unwrap() = Some(state(20, 0));
        trust.settle(10).await.expect("settle");
        assert_eq!(*row.0.lock().unwrap(), Some(state(20, 0)));
        assert_eq!(
            trust.current(),
            state(20, 0),
            "the row's newer state is adopted"
        );
    }

    /// A prover whose first proof is computed when asked but answered only once the test
    /// opens the gate: lets a test move the trusted state while a link is in flight.
    struct Gated {
        inner: Arc<History>,
        calls: std::sync::atomic::AtomicUsize,
        entered: tokio::sync::Notify,
        gate: tokio::sync::Semaphore,
    }

    impl Prover for Arc<Gated> {
        fn state_at<'a>(
            &'a self,
            from: &'a TrustedState,
            tx: u64,
        ) -> BoxFuture<'a, Result<TrustedState, ImmudbError>> {
            Box::pin(async move {
                let answer = self.inner.state_at(from, tx).await;
                if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    self.entered.notify_one();
                    self.gate.acquire().await.expect("gate").forget();
                }
                answer
            })
        }
    }

    fn gated(history: &Arc<History>) -> Arc<Gated> {
        Arc::new(Gated {
            inner: history.clone(),
            calls: std::sync::atomic::AtomicUsize::new(0),
            entered: tokio::sync::Notify::new(),
            gate: tokio::sync::Semaphore::new(0),
        })
    }

    #[tokio::test]
    async fn an_answer_linked_to_a_state_that_moved_on_is_linked_again() {
        let history = Arc::new(History::default());
        // Branch 0 up to tx 12, then the fork (branch 1) that one writer was shown.
        history.serve(0, 1..=12);
        history.serve(1, 13..=20);
        let prover = gated(&history);
        let row = Arc::new(Row::default());
        let trust = Arc::new(Trust::new(
            state(10, 0),
            None,
            Box::new(row.clone()),
            Box::new(prover.clone()),
        ));
        let base = trust.current();
        trust.accept(&base, state(11, 0)).await.expect("writer b");
        let a = tokio::spawn({
            let trust = trust.clone();
            let base = base.clone();
            async move { trust.accept(&base, state(15, 1)).await }
        });
        // Writer a links tx 15 with tx 11 (a common prefix) while writer c adopts tx 13.
        prover.entered.notified().await;
        trust
            .accept(&state(11, 0), state(13, 0))
            .await
            .expect("writer c");
        prover.gate.add_permits(10);
        let a = a.await.expect("task");
        assert!(matches!(a, Err(TrustFailure::Tampered(_))), "{a:?}");
        assert_eq!(trust.current(), state(13, 0), "the fork is not adopted");
    }

    #[tokio::test]
    async fn a_row_linked_before_the_current_state_moved_onto_a_fork_is_linked_again() {
        let history = Arc::new(History::default());
        history.serve(0, 1..=130);
        let prover = gated(&history);
        let row = Arc::new(Row(Mutex::new(Some(state(100, 0)))));
        let trust = Arc::new(Trust::new(
            state(100, 0),
            Some(state(100, 0)),
            Box::new(row.clone()),
            Box::new(prover.clone()),
        ));
        trust
            .accept(&state(100, 0), state(102, 0))
            .await
            .expect("accept");
        // Another replica moved the row to tx 120 of the genuine history.
        *row.0.lock().unwrap() = Some(state(120, 0));
        let settling = tokio::spawn({
            let trust = trust.clone();
            async move { trust.settle(102).await }
        });
        // The link of tx 102 with the row's tx 120 is answered from the genuine history; before
        // it returns, immudb is rolled back to tx 105 and grown, and a writer adopts tx 125 of
        // the fork (proven from tx 102, a common prefix).
        prover.entered.notified().await;
        history.serve(1, 106..=130);
        trust
            .accept(&state(102, 0), state(125, 1))
            .await
            .expect("proven from its own anchor");
        prover.gate.add_permits(10);
        let settled = settling.await.expect("task");
        assert!(
            matches!(settled, Err(TrustFailure::Tampered(_))),
            "{settled:?}"
        );
        assert_eq!(
            *row.0.lock().unwrap(),
            Some(state(120, 0)),
            "the row never holds a forked state"
        );
    }

    #[tokio::test]
    async fn a_lagging_anchor_never_moves_the_row_onto_a_fork() {
        let history = Arc::new(History::default());
        // The row holds tx 20 of branch 0; the server was rolled back to tx 12 and grown on
        // branch 1. This replica's anchor is tx 8, a prefix of both.
        history.serve(0, 1..=12);
        history.serve(1, 13..=30);
        let row = Arc::new(Row(Mutex::new(Some(state(20, 0)))));
        let trust = trust(&history, &row, state(8, 0), Some(state(8, 0)));
        trust
            .accept(&state(8, 0), state(25, 1))
            .await
            .expect("proven from its own anchor");
        let settled = trust.settle(25).await;
        assert!(
            matches!(settled, Err(TrustFailure::Tampered(_))),
            "{settled:?}"
        );
        assert_eq!(
            *row.0.lock().unwrap(),
            Some(state(20, 0)),
            "the row never holds a forked state"
        );
        assert!(trust.tampered());
    }
}
