//! One group of events into immudb, the system of record: one transaction holding, per event,
//! its `audit:` entry (the payload bytes) and its `event:` entry (the payload's digest), each
//! under `KeyMustNotExist`, so an `event_id` exists once whatever its entity type and a
//! conflicting copy never reaches immudb. With a trusted state every transaction is verified.
//!
//! When a precondition fails, the existing entries are read back and **proven** (one verified
//! transaction read per transaction they are in): the same digest is a redelivery, stored with
//! its proof; another digest is a conflict. Shared by the pipeline's writer and `replay-dlq`.

use std::collections::{BTreeMap, HashMap};

use futures::future::BoxFuture;
use uuid::Uuid;

use crate::event::{uniqueness_key, uniqueness_value};
use crate::immudb::{Entry, ImmudbClient, ImmudbError, KeyValue, verify::tx_holds_kv};
use crate::metrics::metrics;
use crate::resilience::{Failure, RetryPolicy};
use crate::trust::{Trust, TrustFailure};

/// immudb entries one event takes: its `audit:` entry and its `event:` entry.
pub const ENTRIES_PER_EVENT: usize = 2;

/// Resolutions of existing keys one group may go through. Each one settles at least one event
/// or the server contradicts itself; the bound only guards against the latter.
const MAX_RESOLUTIONS: u32 = 4;

/// An event on its way to immudb.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub event_id: Uuid,
    /// `audit:{entity_type}:{event_id}`.
    pub audit_key: &'a str,
    /// The payload exactly as received: the `audit:` entry's value.
    pub payload: &'a [u8],
    /// SHA-256 of `payload`.
    pub digest: &'a [u8; 32],
}

impl Candidate<'_> {
    /// The two entries the event is written as.
    pub fn entries(&self) -> [KeyValue; ENTRIES_PER_EVENT] {
        [
            KeyValue {
                key: self.audit_key.as_bytes().to_vec(),
                value: self.payload.to_vec(),
            },
            KeyValue {
                key: uniqueness_key(self.event_id).into_bytes(),
                value: uniqueness_value(self.digest),
            },
        ]
    }
}

/// What became of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not written yet (only while a group is being written).
    Pending,
    /// In immudb at `tx`: written now, or found there with the same bytes. `verified`: proven
    /// against the trusted state (the inclusion of its entries and the transaction's
    /// consistency).
    Stored { tx: u64, now: bool, verified: bool },
    /// immudb holds this `event_id` (or this key) with other content; the copy is not stored.
    Conflict(String),
    /// immudb refuses this event for what it is (e.g. a key too long), after bisection.
    Invalid(String),
    /// immudb stayed unavailable through every retry. The events may nevertheless be in immudb
    /// (a reply lost after the commit); a later write finds and proves them.
    Unavailable { message: String, attempts: u32 },
    /// Nothing decided: writes are stopped (tamper suspected, or the process stops while
    /// immudb refuses the login). The events stay uncommitted.
    Held,
}

/// What a writer does when immudb refuses a write for a reason that is not the events' data
/// (credentials, missing permission, configuration).
pub trait Hold: Send + Sync {
    /// Resolves `true` once a write may be tried again, `false` to give up (the events are
    /// [`Outcome::Held`]).
    fn store_refused<'a>(&'a self, why: &'a ImmudbError) -> BoxFuture<'a, bool>;
}

/// The result of one write of a group, classified before anything acts on it.
enum SetResult {
    Written {
        tx: u64,
        verified: bool,
    },
    /// A `KeyMustNotExist` precondition failed: some event is already (partly) there.
    KeysExist,
    Stop(Stop),
    /// immudb refuses the group for its data (`InvalidArgument`): isolate the offender.
    Rejected(ImmudbError),
}

/// Why a group cannot go on.
enum Stop {
    /// A proof failed; the latch is set.
    Tampered,
    /// Transient failures through every retry.
    Exhausted(Failure<ImmudbError>),
    /// Not about the data: hold until the cause is fixed.
    Refused(ImmudbError),
}

impl Stop {
    fn of(failure: Failure<ImmudbError>) -> Self {
        if matches!(failure.error, ImmudbError::VerificationFailed { .. }) {
            Stop::Tampered
        } else if failure.error.is_transient() {
            Stop::Exhausted(failure)
        } else {
            Stop::Refused(failure.error)
        }
    }
}

fn classify(failure: Failure<ImmudbError>) -> SetResult {
    match failure.error {
        ImmudbError::PreconditionFailed { .. } => SetResult::KeysExist,
        ImmudbError::InvalidArgument { .. } => SetResult::Rejected(failure.error),
        _ => SetResult::Stop(Stop::of(failure)),
    }
}

/// An existing entry an event's fate rests on, to be proven in its transaction.
struct Claim {
    index: usize,
    tx: u64,
    key: Vec<u8>,
    value: Vec<u8>,
    /// The outcome once proven.
    outcome: Outcome,
}

/// Writes groups of events to immudb.
pub struct ImmudbWriter<'a> {
    pub immudb: &'a ImmudbClient,
    /// The trusted state when writes are verified (`IMMUDB_VERIFY`).
    pub trust: Option<&'a Trust>,
    pub retry: &'a RetryPolicy,
    pub hold: &'a dyn Hold,
}

impl ImmudbWriter<'_> {
    /// Writes `events` (distinct `event_id`s) and returns each one's outcome, in order.
    pub async fn write(&self, events: &[Candidate<'_>]) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Pending; events.len()];
        self.write_group(events, &mut outcomes, (0..events.len()).collect())
            .await;
        outcomes
    }

    fn latched(&self) -> bool {
        self.trust.is_some_and(Trust::tampered)
    }

    async fn write_group(
        &self,
        events: &[Candidate<'_>],
        outcomes: &mut [Outcome],
        group: Vec<usize>,
    ) {
        let mut group = group;
        let mut resolutions = 0;
        while !group.is_empty() {
            // Checked before every write: once tampering is suspected nothing is written.
            if self.latched() {
                return set_all(outcomes, &group, Outcome::Held);
            }
            let stop = match self.set(events, &group).await {
                SetResult::Written { tx, verified } => {
                    let stored = Outcome::Stored {
                        tx,
                        now: true,
                        verified,
                    };
                    return set_all(outcomes, &group, stored);
                }
                SetResult::KeysExist if resolutions >= MAX_RESOLUTIONS => {
                    let unavailable = Outcome::Unavailable {
                        message: "immudb kept reporting existing keys that it does not return"
                            .into(),
                        attempts: resolutions,
                    };
                    return set_all(outcomes, &group, unavailable);
                }
                SetResult::KeysExist => {
                    resolutions += 1;
                    match self.resolve(events, outcomes, &group).await {
                        Ok(()) => {
                            group.retain(|&i| outcomes[i] == Outcome::Pending);
                            continue;
                        }
                        Err(stop) => stop,
                    }
                }
                SetResult::Stop(stop) => stop,
                SetResult::Rejected(error) if group.len() == 1 => {
                    outcomes[group[0]] = Outcome::Invalid(error.to_string());
                    return;
                }
                SetResult::Rejected(error) => {
                    tracing::warn!(%error, size = group.len(), "immudb rejected the batch; bisecting to isolate the offending events");
                    let second = group.split_off(group.len() / 2);
                    Box::pin(self.write_group(events, outcomes, group)).await;
                    Box::pin(self.write_group(events, outcomes, second)).await;
                    return;
                }
            };
            match stop {
                Stop::Tampered => return set_all(outcomes, &group, Outcome::Held),
                Stop::Exhausted(failure) => {
                    let unavailable = Outcome::Unavailable {
                        message: failure.error.to_string(),
                        attempts: failure.attempts,
                    };
                    return set_all(outcomes, &group, unavailable);
                }
                // Writes stopped while this group was being retried: hold, do not probe.
                Stop::Refused(_) if self.latched() => {
                    return set_all(outcomes, &group, Outcome::Held);
                }
                // A hold never spends a resolution: nothing was learnt about the events.
                Stop::Refused(error) => {
                    if !self.hold.store_refused(&error).await {
                        return set_all(outcomes, &group, Outcome::Held);
                    }
                }
            }
        }
    }

    /// One transaction for the group, verified when a trusted state is kept.
    async fn set(&self, events: &[Candidate<'_>], group: &[usize]) -> SetResult {
        let kvs: Vec<KeyValue> = group.iter().flat_map(|&i| events[i].entries()).collect();
        let Some(trust) = self.trust else {
            let result = self
                .retry
                .run("immudb set", || self.immudb.set_all(&kvs, true))
                .await;
            count("set", result.is_ok());
            return match result {
                Ok(header) => SetResult::Written {
                    tx: header.id,
                    verified: false,
                },
                Err(failure) => classify(failure),
            };
        };
        let base = trust.current();
        let result = self
            .retry
            .run("immudb set", || async {
                // Checked before every attempt: the latch may be set during a backoff.
                if trust.tampered() {
                    return Err(latched_error());
                }
                self.immudb.verify_set_batch(&kvs, true, &base).await
            })
            .await;
        count("set", result.is_ok());
        match result {
            Ok((header, verified)) => match trust.accept(&base, verified).await {
                Ok(()) => SetResult::Written {
                    tx: header.id,
                    verified: true,
                },
                Err(TrustFailure::Tampered(_)) => SetResult::Stop(Stop::Tampered),
                // Written and proven from `base`, but not yet linked with a newer state
                // another writer adopted: the next round finds the keys and proves them.
                Err(error) => {
                    tracing::warn!(%error, "cannot link a verified write with the current trusted state yet");
                    SetResult::KeysExist
                }
            },
            Err(failure) => {
                if let ImmudbError::VerificationFailed { .. } = &failure.error {
                    // Never retried into success: the latch stops every writer.
                    trust.suspect_tampering("verified batch write", &failure.error);
                }
                classify(failure)
            }
        }
    }

    /// Reads back the entries of `group` and settles the events found: the same digest is
    /// stored (once proven), another digest a conflict (once proven); the rest stays pending.
    async fn resolve(
        &self,
        events: &[Candidate<'_>],
        outcomes: &mut [Outcome],
        group: &[usize],
    ) -> Result<(), Stop> {
        let keys: Vec<Vec<u8>> = group
            .iter()
            .flat_map(|&i| {
                [
                    uniqueness_key(events[i].event_id).into_bytes(),
                    events[i].audit_key.as_bytes().to_vec(),
                ]
            })
            .collect();
        let existing = self
            .retry
            .run("immudb get_all", || self.immudb.get_all(&keys))
            .await;
        count("get_all", existing.is_ok());
        let found: HashMap<Vec<u8>, Entry> = existing
            .map_err(Stop::of)?
            .into_iter()
            .map(|entry| (entry.key.clone(), entry))
            .collect();
        let verified = self.trust.is_some();
        let mut claims = Vec::new();
        for &i in group {
            let event = &events[i];
            let unique_key = uniqueness_key(event.event_id).into_bytes();
            let ours = uniqueness_value(event.digest);
            let audit = found.get(event.audit_key.as_bytes());
            match (found.get(&unique_key), audit) {
                (Some(unique), _) if unique.value == ours => {
                    let stored = Outcome::Stored {
                        tx: unique.tx,
                        now: false,
                        verified,
                    };
                    // Same digest: same bytes, so the same audit key, in the same transaction.
                    claims.push(Claim {
                        index: i,
                        tx: unique.tx,
                        key: event.audit_key.as_bytes().to_vec(),
                        value: event.payload.to_vec(),
                        outcome: stored.clone(),
                    });
                    claims.push(Claim {
                        index: i,
                        tx: unique.tx,
                        key: unique_key,
                        value: ours,
                        outcome: stored,
                    });
                }
                (Some(unique), _) => claims.push(Claim {
                    index: i,
                    tx: unique.tx,
                    outcome: Outcome::Conflict(format!(
                        "immudb already holds event {} (tx {}) with another payload (sha256 {})",
                        event.event_id,
                        unique.tx,
                        String::from_utf8_lossy(&unique.value)
                    )),
                    key: unique_key,
                    value: unique.value.clone(),
                }),
                // Written before uniqueness keys existed: the audit entry alone decides.
                (None, Some(entry)) => claims.push(Claim {
                    index: i,
                    tx: entry.tx,
                    key: entry.key.clone(),
                    value: entry.value.clone(),
                    outcome: if entry.value == event.payload {
                        Outcome::Stored {
                            tx: entry.tx,
                            now: false,
                            verified,
                        }
                    } else {
                        Outcome::Conflict(format!(
                            "immudb already holds {} (tx {}) with different content",
                            event.audit_key, entry.tx
                        ))
                    },
                }),
                (None, None) => {}
            }
        }
        if let Some(trust) = self.trust {
            self.prove(trust, &claims).await?;
        }
        for claim in claims {
            outcomes[claim.index] = claim.outcome;
        }
        Ok(())
    }

    /// Proves every claim: one verified read per transaction, each claimed entry included in
    /// it. A server whose plain read names an entry its proven transaction does not hold is
    /// lying: tamper suspected.
    async fn prove(&self, trust: &Trust, claims: &[Claim]) -> Result<(), Stop> {
        let mut by_tx: BTreeMap<u64, Vec<&Claim>> = BTreeMap::new();
        for claim in claims {
            by_tx.entry(claim.tx).or_default().push(claim);
        }
        for (tx, claims) in by_tx {
            let base = trust.current();
            let answer = self
                .retry
                .run("immudb verified tx", || {
                    self.immudb.verified_tx_by_id(tx, &base)
                })
                .await;
            count("verified_tx", answer.is_ok());
            let (proven, state) = match answer {
                Ok(answer) => answer,
                Err(failure) => {
                    if let ImmudbError::VerificationFailed { .. } = &failure.error {
                        trust.suspect_tampering("proof of an existing entry", &failure.error);
                    }
                    return Err(Stop::of(failure));
                }
            };
            match trust.accept(&base, state).await {
                Ok(()) => {}
                Err(TrustFailure::Tampered(_)) => return Err(Stop::Tampered),
                Err(error) => {
                    return Err(Stop::Exhausted(Failure {
                        error: ImmudbError::Transient {
                            op: "link a proven transaction",
                            code: tonic::Code::Unavailable,
                            message: error.to_string(),
                        },
                        attempts: 1,
                    }));
                }
            }
            for claim in claims {
                match tx_holds_kv(&proven, &claim.key, &claim.value) {
                    Ok(true) => {}
                    Ok(false) => {
                        let detail = format!(
                            "{} read at tx {tx} is not in that proven transaction",
                            String::from_utf8_lossy(&claim.key)
                        );
                        trust.suspect_tampering("proof of an existing entry", &detail);
                        return Err(Stop::Tampered);
                    }
                    Err(error) => {
                        trust.suspect_tampering("proof of an existing entry", &error);
                        return Err(Stop::Tampered);
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a write attempted after the latch was set fails with (not transient: never retried).
fn latched_error() -> ImmudbError {
    ImmudbError::Permanent {
        op: "verified set",
        code: tonic::Code::Aborted,
        message: "writes are stopped: tamper suspected".into(),
    }
}

fn set_all(outcomes: &mut [Outcome], group: &[usize], outcome: Outcome) {
    for &i in group {
        outcomes[i] = outcome.clone();
    }
}

fn count(operation: &str, ok: bool) {
    let status = if ok { "ok" } else { "error" };
    metrics()
        .immudb_operations
        .with_label_values(&[operation, status])
        .inc();
}
