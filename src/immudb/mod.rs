//! immudb, the system of record: our own thin gRPC client (no maintained Rust client exists).
//!
//! - [`proto`]: prost/tonic types generated from `proto/immudb.proto`, a minimal,
//!   wire-compatible subset of immudb's API (package `immudb.schema`, service `ImmuService`).
//! - [`ImmudbClient`]: session handling, batch writes in one transaction, reads.
//! - [`ImmudbError`]: failures classified for the retry policy ([`ImmudbError::is_transient`]).
//! - [`verify`]: client-side checks of immudb's proofs; the client's `verify_set_batch`,
//!   `verified_get` and `verified_tx_by_id` refuse any answer whose proofs fail, with
//!   [`ImmudbError::VerificationFailed`].
//!
//! Read results are the generated messages themselves ([`Entry`], [`TxHeader`], [`State`]):
//! they already carry exactly what immudb returned, which the proof verification needs.

mod client;
mod error;
pub mod verify;

/// Types and client stubs generated from `proto/immudb.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("immudb.schema");
}

pub use client::{
    ImmudbClient, ImmudbConnectOptions, ImmudbLimits, ImmudbTls, KEEPALIVE_INTERVAL, KeyValue,
    MAX_DECODING_MESSAGE_BYTES, MAX_ENCODING_MESSAGE_BYTES, MAX_HISTORY_REVISIONS,
};
pub use error::{ImmudbError, TRANSIENT_CODES};
pub use verify::{StateVerifyingKey, TrustedState, VerificationError};

/// A stored key/value as immudb returns it: `tx` (the transaction that wrote this value),
/// `key`, `value` (the bytes as written), `revision` (1 for the first write of the key).
pub use proto::Entry;
/// The database's current state: last transaction id (`tx_id`) and its hash (`tx_hash`).
pub use proto::ImmutableState as State;
/// Header of a committed transaction: `id`, `ts` (unix seconds), `nentries`, and the hashes
/// the proofs build on.
pub use proto::TxHeader;
/// An entry with the proofs of its inclusion in its transaction and of that transaction.
pub use proto::VerifiableEntry;
/// A transaction with its proofs: the `tx` (header and entry digests), the `dual_proof` from
/// the requested trusted tx, and the server's `signature` of the target state when it signs.
pub use proto::VerifiableTx;
