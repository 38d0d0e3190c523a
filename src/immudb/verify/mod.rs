//! Client-side verification of immudb's cryptographic proofs ("tamper evidence"): a batch
//! written, an entry read or a transaction fetched is accepted only when the server proves it
//! belongs to a history that extends the one the client already verified.
//!
//! Everything here is pure computation over the server's answers (no I/O), written from
//! immudb v1.10.0's Go sources; each function names the Go function it mirrors:
//!
//! - [`tx`]: tx header bytes, inner hash and `Alh` (header versions 0 and 1), KV and tx
//!   metadata bytes, entry digests (`TxEntryDigest_v1_1` / `_v1_2`), the 1-byte key and value
//!   prefixes immudb adds to plain key/values.
//! - [`htree`]: the Merkle tree of a transaction's entries (root `eH`) and its inclusion proof.
//! - [`ahtree`]: the accumulated hash tree over all Alhs: inclusion, consistency and
//!   last-inclusion proofs.
//! - [`dual`]: linear, linear-advance and dual proofs (`VerifyDualProof`).
//! - [`state`]: [`TrustedState`] and the ECDSA P-256 signature over database states.
//! - [`answers`]: whole answers (`VerifiableSet`, `VerifiableGet`, `VerifiableTxById`)
//!   checked against what was written or asked for.

pub mod ahtree;
pub mod answers;
pub mod dual;
mod error;
pub mod htree;
pub mod state;
pub mod tx;

#[doc(hidden)]
pub mod testkit;
#[cfg(test)]
mod tests;

pub use answers::{
    VerifyContext, header_alh, tx_holds_kv, verify_get_answer, verify_set_answer, verify_tx_answer,
};
pub use dual::{verify_dual_proof, verify_linear_advance_proof, verify_linear_proof};
pub use error::{DualProofCheck, EntryCheck, VerificationError};
pub use state::{
    StateSignature, StateVerifyingKey, TrustedState, state_bytes, verify_state_signature,
};
pub use tx::{Digest, Header};
