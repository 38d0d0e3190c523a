//! Verification of whole server answers against what the client wrote or asked for and its
//! trusted state: a written batch (`VerifiableSet`), a read entry (`VerifiableGet`) and a
//! transaction (`VerifiableTxById`). Pure functions, so they can be checked offline against
//! captured answers; [`ImmudbClient`](crate::immudb::ImmudbClient) calls them after each RPC.

use std::collections::HashMap;

use super::dual::verify_dual_proof;
use super::error::{EntryCheck, VerificationError};
use super::htree::{self, HTree};
use super::state::{StateSignature, StateVerifyingKey, TrustedState, verify_state_signature};
use super::tx::{
    Digest, Header, digests, encode_key, kv_digest, kv_metadata_bytes, sha256, tx_entry_digest,
    value_hash,
};
use crate::immudb::KeyValue;
use crate::immudb::proto;

/// What a verification needs besides the answer: the database the answer must be about, the
/// trusted state to prove from, and the server's signing key when states must be signed.
#[derive(Clone, Copy, Debug)]
pub struct VerifyContext<'a> {
    /// Database name as the server knows it (lower case); it is part of the signed state.
    pub db: &'a str,
    /// The last state the client verified.
    pub trusted: &'a TrustedState,
    /// When set, every answer must carry a valid signature by this key over its target state.
    pub server_key: Option<&'a StateVerifyingKey>,
}

impl VerifyContext<'_> {
    fn check_database(&self) -> Result<(), VerificationError> {
        if self.trusted.db != self.db {
            return Err(VerificationError::TrustedState(format!(
                "it is for database '{}', not '{}'",
                self.trusted.db, self.db
            )));
        }
        Ok(())
    }

    /// The new trusted state after a verified answer whose proof target is `tx_id`/`alh`.
    fn advance(
        &self,
        tx_id: u64,
        alh: Digest,
        signature: Option<&proto::Signature>,
    ) -> Result<TrustedState, VerificationError> {
        if let Some(key) = self.server_key {
            verify_state_signature(key, self.db, tx_id, &alh, signature)?;
        }
        Ok(TrustedState {
            db: self.db.to_owned(),
            tx_id,
            tx_hash: alh,
            signature: signature.map(StateSignature::from),
        })
    }

    /// Proves `target` (already hashed to `target_alh`) from the trusted state. A fresh
    /// trusted state has nothing to prove from: the server's own proof from the target to
    /// itself is still checked, so a malformed answer fails, but trust starts here.
    fn prove_target(
        &self,
        proof: Option<&proto::DualProof>,
        target_id: u64,
        target_alh: &Digest,
    ) -> Result<(), VerificationError> {
        let proof =
            proof.ok_or_else(|| VerificationError::Malformed("dual proof missing".into()))?;
        if self.trusted.is_fresh() {
            return verify_dual_proof(proof, target_id, target_id, target_alh, target_alh);
        }
        if self.trusted.tx_id > target_id {
            return Err(VerificationError::TrustedState(format!(
                "the server answered with tx {target_id}, older than the trusted tx {}",
                self.trusted.tx_id
            )));
        }
        verify_dual_proof(
            proof,
            self.trusted.tx_id,
            target_id,
            &self.trusted.tx_hash,
            target_alh,
        )
    }
}

/// Verifies a `VerifiableSet` answer for a batch written as `kvs` (without KV metadata):
///
/// 1. the transaction holds exactly the written keys, each once, with the SHA-256 of the
///    written value and no metadata (the Go SDK only checks single-key `VerifiedSet`; here
///    every entry of the batch is checked);
/// 2. every entry's Merkle inclusion proof leads to the header's `eH`;
/// 3. the dual proof links the trusted state to the new transaction (fresh state: see
///    [`TrustedState`]), and the signature when a server key is configured.
///
/// Returns the verified header and the new trusted state (the new transaction).
pub fn verify_set_answer(
    ctx: &VerifyContext<'_>,
    kvs: &[KeyValue],
    answer: &proto::VerifiableTx,
) -> Result<(proto::TxHeader, TrustedState), VerificationError> {
    ctx.check_database()?;
    let tx = answer
        .tx
        .as_ref()
        .ok_or_else(|| VerificationError::Malformed("transaction missing".into()))?;
    let header_proto = tx
        .header
        .as_ref()
        .ok_or_else(|| VerificationError::Malformed("transaction header missing".into()))?;
    let header = Header::from_proto(header_proto, "tx header")?;
    let tx_fail = |check: String| VerificationError::Tx {
        tx: header.id,
        check,
    };
    if header.nentries as usize != kvs.len() || tx.entries.len() != kvs.len() {
        return Err(tx_fail(format!(
            "holds {} entries ({} listed), {} were written",
            header.nentries,
            tx.entries.len(),
            kvs.len()
        )));
    }

    // Where each written key sits in the transaction (its leaf in the Merkle tree).
    let mut position: HashMap<&[u8], usize> = HashMap::with_capacity(tx.entries.len());
    for (index, entry) in tx.entries.iter().enumerate() {
        if position.insert(entry.key.as_slice(), index).is_some() {
            return Err(VerificationError::Entry {
                tx: header.id,
                index,
                check: EntryCheck::KeyRepeated,
            });
        }
    }
    // Check each written key/value against the server's listing, and compute its digest
    // from the bytes *we* wrote, at the position the server lists it.
    let mut ours: Vec<Option<Digest>> = vec![None; kvs.len()];
    for kv in kvs {
        let stored_key = encode_key(&kv.key);
        let index = *position
            .get(stored_key.as_slice())
            .ok_or_else(|| VerificationError::Tx {
                tx: header.id,
                check: format!(
                    "written key {:?} is not in the transaction",
                    String::from_utf8_lossy(&kv.key)
                ),
            })?;
        let entry = &tx.entries[index];
        let entry_fail = |check| VerificationError::Entry {
            tx: header.id,
            index,
            check,
        };
        if entry.h_value.as_slice() != value_hash(&kv.value) {
            return Err(entry_fail(EntryCheck::ValueHash));
        }
        // vLen is not hashed into the proofs; it is still the server's claim about our value.
        if usize::try_from(entry.v_len).ok() != Some(kv.value.len() + 1) {
            return Err(entry_fail(EntryCheck::ValueLength));
        }
        if !kv_metadata_bytes(entry.metadata.as_ref()).is_empty() {
            return Err(entry_fail(EntryCheck::Metadata));
        }
        if ours[index].is_some() {
            return Err(entry_fail(EntryCheck::KeyRepeated));
        }
        ours[index] = Some(kv_digest(header.version, &kv.key, None, &kv.value)?);
    }

    // The server's listing must rebuild eH (as `schema.TxFromProto` + `BuildHashTree` do in
    // the Go SDK); the inclusion proofs are then taken from that tree (`tx.Proof`).
    let listed = tx
        .entries
        .iter()
        .map(|e| tx_entry_digest(header.version, e))
        .collect::<Result<Vec<_>, _>>()?;
    let tree = HTree::build(&listed);
    if tree.root() != header.eh {
        return Err(VerificationError::Tx {
            tx: header.id,
            check: "the listed entries do not rebuild eH".into(),
        });
    }

    // Every written entry: its digest, computed from what we wrote, must lead to eH through
    // its inclusion proof (`htree.VerifyInclusion`). The Go SDK does this for one key in
    // `VerifiedSet`; here it is done for the whole batch.
    for (index, digest) in ours.iter().enumerate() {
        let entry_fail = |check| VerificationError::Entry {
            tx: header.id,
            index,
            check,
        };
        let digest = digest.ok_or(entry_fail(EntryCheck::Unexpected))?;
        let proof = tree
            .inclusion_proof(index)
            .ok_or(entry_fail(EntryCheck::InclusionProof))?;
        if !htree::verify_inclusion(index, listed.len(), &proof, &digest, &header.eh) {
            return Err(entry_fail(EntryCheck::InclusionProof));
        }
    }

    let alh = header.alh();
    ctx.prove_target(answer.dual_proof.as_ref(), header.id, &alh)?;
    let state = ctx.advance(header.id, alh, answer.signature.as_ref())?;
    Ok((header_proto.clone(), state))
}

/// Verifies a `VerifiableGet` answer for plain key `key` (read at `at_tx`, or its latest
/// value): the entry's digest, computed from the key asked for and the value returned, is
/// included in the `eH` of the transaction that wrote it, that transaction is linked to the
/// trusted state by the dual proof (in whichever direction), the transaction listed with the
/// answer is that same transaction, and the signature checks when a server key is configured.
///
/// Returns the entry and the new trusted state: the entry's transaction when it is newer
/// than the trusted one, otherwise the trusted state unchanged (`VerifiedGet` semantics).
pub fn verify_get_answer(
    ctx: &VerifyContext<'_>,
    key: &[u8],
    at_tx: Option<u64>,
    answer: &proto::VerifiableEntry,
) -> Result<(proto::Entry, TrustedState), VerificationError> {
    ctx.check_database()?;
    let entry = answer
        .entry
        .as_ref()
        .ok_or_else(|| VerificationError::Malformed("entry missing".into()))?;
    if entry.referenced_by.is_some() {
        return Err(VerificationError::Unsupported(
            "entries read through a reference".into(),
        ));
    }
    let vtx = answer
        .verifiable_tx
        .as_ref()
        .ok_or_else(|| VerificationError::Malformed("verifiable tx missing".into()))?;
    let dual = vtx
        .dual_proof
        .as_ref()
        .ok_or_else(|| VerificationError::Malformed("dual proof missing".into()))?;
    let inclusion = answer
        .inclusion_proof
        .as_ref()
        .ok_or_else(|| VerificationError::Malformed("inclusion proof missing".into()))?;

    let entry_tx = at_tx.unwrap_or(entry.tx);
    if entry.tx != entry_tx {
        return Err(VerificationError::Tx {
            tx: entry.tx,
            check: format!(
                "entry read at tx {entry_tx} claims to be written by tx {}",
                entry.tx
            ),
        });
    }
    // Which header of the dual proof is the entry's transaction depends on the direction.
    let trusted = ctx.trusted;
    let entry_is_target = trusted.tx_id <= entry_tx;
    let (entry_header_proto, what) = if entry_is_target {
        (dual.target_tx_header.as_ref(), "dual proof target header")
    } else {
        (dual.source_tx_header.as_ref(), "dual proof source header")
    };
    let entry_header_proto = entry_header_proto
        .ok_or_else(|| VerificationError::Malformed(format!("{what} missing")))?;
    let entry_header = Header::from_proto(entry_header_proto, what)?;
    if entry_header.id != entry_tx {
        return Err(VerificationError::Tx {
            tx: entry_tx,
            check: format!("the proof's header is for tx {}", entry_header.id),
        });
    }
    if entry.key != key {
        return Err(VerificationError::Entry {
            tx: entry_tx,
            index: 0,
            check: EntryCheck::Key,
        });
    }

    let leaf = usize::try_from(inclusion.leaf).ok();
    let width = usize::try_from(inclusion.width).ok();
    let (Some(leaf), Some(width)) = (leaf, width) else {
        return Err(VerificationError::Malformed(format!(
            "inclusion proof leaf {} of width {}",
            inclusion.leaf, inclusion.width
        )));
    };
    let entry_fail = |check| VerificationError::Entry {
        tx: entry_tx,
        index: leaf,
        check,
    };
    // Pin the tree shape: a proof for a tree of another width can fold to the same root.
    if width != entry_header.nentries as usize {
        return Err(entry_fail(EntryCheck::InclusionProof));
    }
    let digest = kv_digest(
        entry_header.version,
        key,
        entry.metadata.as_ref(),
        &entry.value,
    )?;
    let terms = digests(&inclusion.terms, "entry inclusion proof")?;
    if !htree::verify_inclusion(leaf, width, &terms, &digest, &entry_header.eh) {
        return Err(entry_fail(EntryCheck::InclusionProof));
    }

    // The transaction listed with the answer must be the proven one.
    if let Some(tx) = &vtx.tx {
        verify_listed_tx(tx, &entry_header, entry_header_proto)?;
        // And the listing must show, at the proven leaf, the entry read.
        if let Some(listed) = tx.entries.get(leaf) {
            if listed.key != encode_key(key) {
                return Err(entry_fail(EntryCheck::Key));
            }
            if listed.h_value.as_slice() != value_hash(&entry.value) {
                return Err(entry_fail(EntryCheck::ValueHash));
            }
            if usize::try_from(listed.v_len).ok() != Some(entry.value.len() + 1) {
                return Err(entry_fail(EntryCheck::ValueLength));
            }
        }
    }

    let entry_alh = entry_header.alh();
    let new_state = if ctx.trusted.is_fresh() {
        verify_dual_proof(dual, entry_tx, entry_tx, &entry_alh, &entry_alh)?;
        ctx.advance(entry_tx, entry_alh, vtx.signature.as_ref())?
    } else if entry_is_target {
        verify_dual_proof(dual, trusted.tx_id, entry_tx, &trusted.tx_hash, &entry_alh)?;
        ctx.advance(entry_tx, entry_alh, vtx.signature.as_ref())?
    } else {
        verify_dual_proof(dual, entry_tx, trusted.tx_id, &entry_alh, &trusted.tx_hash)?;
        // The server signs the proof's target: the trusted state itself.
        ctx.advance(trusted.tx_id, trusted.tx_hash, vtx.signature.as_ref())?
    };
    Ok((entry.clone(), new_state))
}

/// Verifies a `VerifiableTxById` answer for transaction `tx_id`: the header is linked to the
/// trusted state by the dual proof (either direction), the listed entries (when the server
/// lists all of them, as it does by default) rebuild `eH`, and the signature when a server key
/// is configured. Returns the transaction and the new trusted state (as for
/// [`verify_get_answer`]).
pub fn verify_tx_answer(
    ctx: &VerifyContext<'_>,
    tx_id: u64,
    answer: &proto::VerifiableTx,
) -> Result<(proto::Tx, TrustedState), VerificationError> {
    ctx.check_database()?;
    let tx = answer
        .tx
        .as_ref()
        .ok_or_else(|| VerificationError::Malformed("transaction missing".into()))?;
    let header_proto = tx
        .header
        .as_ref()
        .ok_or_else(|| VerificationError::Malformed("transaction header missing".into()))?;
    let header = Header::from_proto(header_proto, "tx header")?;
    if header.id != tx_id {
        return Err(VerificationError::Tx {
            tx: tx_id,
            check: format!("the server returned tx {}", header.id),
        });
    }
    verify_listed_tx(tx, &header, header_proto)?;
    let dual = answer
        .dual_proof
        .as_ref()
        .ok_or_else(|| VerificationError::Malformed("dual proof missing".into()))?;
    let alh = header.alh();
    let trusted = ctx.trusted;
    let new_state = if trusted.is_fresh() {
        verify_dual_proof(dual, tx_id, tx_id, &alh, &alh)?;
        ctx.advance(tx_id, alh, answer.signature.as_ref())?
    } else if trusted.tx_id <= tx_id {
        verify_dual_proof(dual, trusted.tx_id, tx_id, &trusted.tx_hash, &alh)?;
        ctx.advance(tx_id, alh, answer.signature.as_ref())?
    } else {
        verify_dual_proof(dual, tx_id, trusted.tx_id, &alh, &trusted.tx_hash)?;
        ctx.advance(trusted.tx_id, trusted.tx_hash, answer.signature.as_ref())?
    };
    Ok((tx.clone(), new_state))
}

/// A `Tx` listed beside a proof must be the proven transaction: same header, and — when all
/// its entries are listed — entries that rebuild `eH`.
fn verify_listed_tx(
    tx: &proto::Tx,
    header: &Header,
    header_proto: &proto::TxHeader,
) -> Result<(), VerificationError> {
    // Compared by hash when the encodings differ, so an absent and an empty tx metadata (both
    // sent by immudb, with the same meaning) do not trip the check.
    if let Some(listed) = tx.header.as_ref().filter(|listed| *listed != header_proto)
        && Header::from_proto(listed, "listed tx header")?.alh() != header.alh()
    {
        return Err(VerificationError::Tx {
            tx: header.id,
            check: "the listed header differs from the proven header".into(),
        });
    }
    if tx.entries.is_empty() {
        return Ok(());
    }
    if tx.entries.len() != header.nentries as usize {
        return Err(VerificationError::Tx {
            tx: header.id,
            check: format!(
                "{} entries listed, the header says {}",
                tx.entries.len(),
                header.nentries
            ),
        });
    }
    let mut leaves = Vec::with_capacity(tx.entries.len());
    for (index, entry) in tx.entries.iter().enumerate() {
        // With `RAW_VALUE` the stored value (immudb's prefix included) is listed too.
        if !entry.value.is_empty() {
            let fail = |check| VerificationError::Entry {
                tx: header.id,
                index,
                check,
            };
            if entry.h_value.as_slice() != sha256(&entry.value) {
                return Err(fail(EntryCheck::ValueHash));
            }
            if usize::try_from(entry.v_len).ok() != Some(entry.value.len()) {
                return Err(fail(EntryCheck::ValueLength));
            }
        }
        leaves.push(tx_entry_digest(header.version, entry)?);
    }
    if HTree::build(&leaves).root() != header.eh {
        return Err(VerificationError::Tx {
            tx: header.id,
            check: "the listed entries do not rebuild eH".into(),
        });
    }
    Ok(())
}

/// The Alh (accumulated hash) of a transaction header: the state a proof to it ends in.
pub fn header_alh(header: &proto::TxHeader) -> Result<Digest, VerificationError> {
    Ok(Header::from_proto(header, "tx header")?.alh())
}

/// Whether `tx` (as returned by [`verify_tx_answer`], which checked that its listed entries
/// rebuild the header's `eH`) holds the plain key/value `key` = `value` without metadata.
/// A transaction whose entries are not all listed proves nothing and is refused.
pub fn tx_holds_kv(tx: &proto::Tx, key: &[u8], value: &[u8]) -> Result<bool, VerificationError> {
    let header = tx
        .header
        .as_ref()
        .ok_or_else(|| VerificationError::Malformed("transaction header missing".into()))?;
    if tx.entries.len() != header.nentries as usize {
        return Err(VerificationError::Tx {
            tx: header.id,
            check: format!(
                "{} of its {} entries listed: cannot prove which keys it holds",
                tx.entries.len(),
                header.nentries
            ),
        });
    }
    let stored_key = encode_key(key);
    let h_value = value_hash(value);
    Ok(tx.entries.iter().any(|entry| {
        entry.key == stored_key
            && entry.h_value.as_slice() == h_value.as_slice()
            && kv_metadata_bytes(entry.metadata.as_ref()).is_empty()
    }))
}
