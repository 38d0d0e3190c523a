//! What can fail when checking immudb's proofs, named precisely enough that an operator can
//! tell *which* check refused the server's answer.
//!
//! A verification failure is never transient: the server (or something between us and it)
//! returned data that does not prove what it claims. Retrying cannot make a forged proof
//! verify; the right reaction is to stop and investigate.

use std::fmt;

/// A proof, a header or a signature did not check out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerificationError {
    /// The answer lacks a part the proof needs, or a part has an impossible shape (a digest
    /// that is not 32 bytes, a negative count, …).
    #[error("malformed proof: {0}")]
    Malformed(String),
    /// The answer uses a format this verifier does not implement (a tx header version other
    /// than 0 or 1, a reference entry).
    #[error("unsupported by the verifier: {0}")]
    Unsupported(String),
    /// The transaction as a whole does not match what was written or asked for.
    #[error("tx {tx}: {check}")]
    Tx {
        /// Transaction id as claimed by the server.
        tx: u64,
        /// What does not match.
        check: String,
    },
    /// One entry of a transaction failed a check. `index` is the entry's position inside the
    /// transaction (its leaf in the tx's Merkle tree).
    #[error("entry {index} of tx {tx}: {check}")]
    Entry {
        /// Transaction id.
        tx: u64,
        /// Position of the entry in the transaction.
        index: usize,
        /// The check that failed.
        check: EntryCheck,
    },
    /// The dual proof linking two transactions failed one of its checks.
    #[error("dual proof from tx {source_tx} to tx {target_tx}: {check}")]
    DualProof {
        /// The older transaction (usually the trusted state).
        source_tx: u64,
        /// The newer transaction.
        target_tx: u64,
        /// The check that failed.
        check: DualProofCheck,
    },
    /// The server's ECDSA signature over the database state is missing or wrong.
    #[error("state signature invalid: {0}")]
    Signature(String),
    /// The trusted state given cannot be used with this answer (another database, or the
    /// server is behind it, which means history was rewritten or rolled back).
    #[error("trusted state: {0}")]
    TrustedState(String),
}

/// The per-entry checks, in the order they run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryCheck {
    /// The transaction holds an entry that the batch did not write.
    Unexpected,
    /// The same key appears twice among the transaction's entries.
    KeyRepeated,
    /// The entry's value hash is not the SHA-256 of the value written (or read).
    ValueHash,
    /// The entry's recorded value length is not the length of the value written.
    ValueLength,
    /// The entry carries KV metadata (deletion, expiry, non-indexable) nobody wrote.
    Metadata,
    /// The entry's key differs from the one asked for.
    Key,
    /// The Merkle inclusion proof of the entry does not lead to the tx's `eH`.
    InclusionProof,
}

impl fmt::Display for EntryCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntryCheck::Unexpected => "entry was not written by this batch",
            EntryCheck::KeyRepeated => "key appears twice in the transaction",
            EntryCheck::ValueHash => "value hash differs from the value",
            EntryCheck::ValueLength => "value length differs from the value",
            EntryCheck::Metadata => "unexpected KV metadata",
            EntryCheck::Key => "key differs from the key asked for",
            EntryCheck::InclusionProof => "inclusion proof does not lead to eH",
        })
    }
}

/// The checks of immudb's `VerifyDualProof` (embedded/store/verification.go), in its order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DualProofCheck {
    /// The proof is absent or lacks a header or the linear proof.
    Missing(&'static str),
    /// The proof's source header is for another transaction.
    SourceHeaderId(u64),
    /// The proof's target header is for another transaction.
    TargetHeaderId(u64),
    /// Source after target, or source tx 0.
    Order,
    /// The source header does not hash to the source Alh (the trusted state's hash).
    SourceAlh,
    /// The target header does not hash to the target Alh.
    TargetAlh,
    /// The source tx's Alh is not included in the target's binary-linking tree.
    InclusionProof,
    /// The source's binary-linking tree is not a prefix of the target's.
    ConsistencyProof,
    /// `TargetBlTxAlh` is not the last leaf of the target's binary-linking tree.
    LastInclusionProof,
    /// The linear hash chain does not lead to the target Alh.
    LinearProof,
    /// The linear chain consumed by the target's binary-linking tree is not in that tree.
    LinearAdvanceProof,
}

impl fmt::Display for DualProofCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DualProofCheck::Missing(what) => write!(f, "{what} missing"),
            DualProofCheck::SourceHeaderId(id) => write!(f, "source header is for tx {id}"),
            DualProofCheck::TargetHeaderId(id) => write!(f, "target header is for tx {id}"),
            DualProofCheck::Order => f.write_str("source tx is 0 or after the target tx"),
            DualProofCheck::SourceAlh => {
                f.write_str("source header does not hash to the source Alh")
            }
            DualProofCheck::TargetAlh => {
                f.write_str("target header does not hash to the target Alh")
            }
            DualProofCheck::InclusionProof => f.write_str("inclusion proof fails"),
            DualProofCheck::ConsistencyProof => f.write_str("consistency proof fails"),
            DualProofCheck::LastInclusionProof => f.write_str("last inclusion proof fails"),
            DualProofCheck::LinearProof => f.write_str("linear proof fails"),
            DualProofCheck::LinearAdvanceProof => f.write_str("linear advance proof fails"),
        }
    }
}
