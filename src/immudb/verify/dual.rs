//! The dual proof: transaction `target` extends the history that ended at transaction
//! `source`, i.e. the server did not rewrite anything the client already trusted. Mirrors
//! `VerifyDualProof`, `VerifyLinearProof` and `VerifyLinearAdvanceProof` of
//! `embedded/store/verification.go` (immudb v1.10.0), which combine:
//!
//! - the *linear* proof: the hash chain Alh(n) = H(n ‖ Alh(n-1) ‖ innerHash(n)) from a tx the
//!   target's binary-linking tree already covers up to the target itself;
//! - the *binary-linking* proofs over the accumulated hash tree (inclusion of the source,
//!   consistency of the source's tree with the target's, and the last leaf of the target's);
//! - the *linear advance* proof (v1.5+): that the part of the chain between the source's tree
//!   and the source is also in the target's tree. A v1.10 server always sends it when needed.

use super::ahtree;
use super::error::{DualProofCheck, VerificationError};
use super::tx::{Digest, Header, advance_linear_hash, digest, digests};
use crate::immudb::proto;

/// `store.VerifyLinearProof`: the chain of `terms` (Alh of `source_tx_id`, then the inner
/// hash of each following tx) leads from `source_alh` to `target_alh`.
pub fn verify_linear_proof(
    proof: &proto::LinearProof,
    source_tx_id: u64,
    target_tx_id: u64,
    source_alh: &Digest,
    target_alh: &Digest,
) -> Result<bool, VerificationError> {
    if proof.source_tx_id != source_tx_id
        || proof.target_tx_id != target_tx_id
        || source_tx_id == 0
        || source_tx_id > target_tx_id
    {
        return Ok(false);
    }
    if proof.terms.len() as u64 != target_tx_id - source_tx_id + 1 {
        return Ok(false);
    }
    let terms = digests(&proof.terms, "linear proof")?;
    let Some((first, rest)) = terms.split_first() else {
        return Ok(false);
    };
    if first != source_alh {
        return Ok(false);
    }
    let mut alh = *first;
    // Indexed rather than an open range: with `rest.len() == target - source` the ids stay
    // within `source+1..=target`, even for a hostile target of u64::MAX.
    for (i, inner) in rest.iter().enumerate() {
        alh = advance_linear_hash(&alh, source_tx_id + 1 + i as u64, inner);
    }
    Ok(alh == *target_alh)
}

/// `store.VerifyLinearAdvanceProof`: every tx strictly between `start_tx_id` and `end_tx_id`
/// is a leaf of the tree (`tree_size`, `tree_root`), and the chain through them ends at
/// `end_alh`. Not needed (and true) when the range is empty.
pub fn verify_linear_advance_proof(
    proof: Option<&proto::LinearAdvanceProof>,
    start_tx_id: u64,
    end_tx_id: u64,
    end_alh: &Digest,
    tree_root: &Digest,
    tree_size: u64,
) -> Result<bool, VerificationError> {
    if end_tx_id < start_tx_id {
        return Ok(false);
    }
    if end_tx_id <= start_tx_id + 1 {
        return Ok(true);
    }
    let Some(proof) = proof else {
        return Ok(false);
    };
    let span = end_tx_id - start_tx_id;
    if proof.linear_proof_terms.len() as u64 != span
        || proof.inclusion_proofs.len() as u64 != span - 1
    {
        return Ok(false);
    }
    let terms = digests(&proof.linear_proof_terms, "linear advance proof")?;
    let Some((first, rest)) = terms.split_first() else {
        return Ok(false);
    };
    // Alh of start+1, then advanced tx by tx; each one must be in the target's tree.
    let mut alh = *first;
    for (i, (inclusion, inner)) in proof.inclusion_proofs.iter().zip(rest).enumerate() {
        // span - 1 inclusion proofs: tx_id stays below end_tx_id.
        let tx_id = start_tx_id + 1 + i as u64;
        let inclusion = digests(&inclusion.terms, "linear advance inclusion proof")?;
        if !ahtree::verify_inclusion(
            &inclusion,
            tx_id,
            tree_size,
            &ahtree::leaf_for(&alh),
            tree_root,
        ) {
            return Ok(false);
        }
        alh = advance_linear_hash(&alh, tx_id + 1, inner);
    }
    Ok(alh == *end_alh)
}

/// `store.VerifyDualProof`: `proof` shows that tx `target_tx_id` (Alh `target_alh`) extends
/// the history ending at tx `source_tx_id` (Alh `source_alh`). The error names the first
/// check that failed.
pub fn verify_dual_proof(
    proof: &proto::DualProof,
    source_tx_id: u64,
    target_tx_id: u64,
    source_alh: &Digest,
    target_alh: &Digest,
) -> Result<(), VerificationError> {
    let fail = |check| VerificationError::DualProof {
        source_tx: source_tx_id,
        target_tx: target_tx_id,
        check,
    };
    let source_proto = proof
        .source_tx_header
        .as_ref()
        .ok_or_else(|| fail(DualProofCheck::Missing("source header")))?;
    let target_proto = proof
        .target_tx_header
        .as_ref()
        .ok_or_else(|| fail(DualProofCheck::Missing("target header")))?;
    if source_proto.id != source_tx_id {
        return Err(fail(DualProofCheck::SourceHeaderId(source_proto.id)));
    }
    if target_proto.id != target_tx_id {
        return Err(fail(DualProofCheck::TargetHeaderId(target_proto.id)));
    }
    if source_tx_id == 0 || source_tx_id > target_tx_id {
        return Err(fail(DualProofCheck::Order));
    }
    let source = Header::from_proto(source_proto, "dual proof source header")?;
    let target = Header::from_proto(target_proto, "dual proof target header")?;
    if source.alh() != *source_alh {
        return Err(fail(DualProofCheck::SourceAlh));
    }
    if target.alh() != *target_alh {
        return Err(fail(DualProofCheck::TargetAlh));
    }

    if source_tx_id < target.bl_tx_id {
        let inclusion = digests(&proof.inclusion_proof, "dual proof inclusion proof")?;
        if !ahtree::verify_inclusion(
            &inclusion,
            source_tx_id,
            target.bl_tx_id,
            &ahtree::leaf_for(source_alh),
            &target.bl_root,
        ) {
            return Err(fail(DualProofCheck::InclusionProof));
        }
    }

    if source.bl_tx_id > 0 {
        let consistency = digests(&proof.consistency_proof, "dual proof consistency proof")?;
        if !ahtree::verify_consistency(
            &consistency,
            source.bl_tx_id,
            target.bl_tx_id,
            &source.bl_root,
            &target.bl_root,
        ) {
            return Err(fail(DualProofCheck::ConsistencyProof));
        }
    }

    // Go reads TargetBlTxAlh through DigestFromProto even when unused; only insist on its
    // shape when it takes part in a check.
    let target_bl_tx_alh = if target.bl_tx_id > 0 {
        let alh = digest(&proof.target_bl_tx_alh, || {
            "dual proof targetBlTxAlh".into()
        })?;
        let last = digests(
            &proof.last_inclusion_proof,
            "dual proof last inclusion proof",
        )?;
        if !ahtree::verify_last_inclusion(
            &last,
            target.bl_tx_id,
            &ahtree::leaf_for(&alh),
            &target.bl_root,
        ) {
            return Err(fail(DualProofCheck::LastInclusionProof));
        }
        alh
    } else {
        [0; 32]
    };

    let linear = proof
        .linear_proof
        .as_ref()
        .ok_or_else(|| fail(DualProofCheck::Missing("linear proof")))?;
    if source_tx_id < target.bl_tx_id {
        // The target's tree already covers the source: the chain starts at the tree's last
        // leaf, and the advance proof covers source.blTxID..source.
        if !verify_linear_proof(
            linear,
            target.bl_tx_id,
            target_tx_id,
            &target_bl_tx_alh,
            target_alh,
        )? {
            return Err(fail(DualProofCheck::LinearProof));
        }
        if !verify_linear_advance_proof(
            proof.linear_advance_proof.as_ref(),
            source.bl_tx_id,
            source_tx_id,
            source_alh,
            &target.bl_root,
            target.bl_tx_id,
        )? {
            return Err(fail(DualProofCheck::LinearAdvanceProof));
        }
    } else {
        // The chain starts at the source itself; the advance proof covers the part between
        // the source's tree and the target's tree.
        if !verify_linear_proof(linear, source_tx_id, target_tx_id, source_alh, target_alh)? {
            return Err(fail(DualProofCheck::LinearProof));
        }
        if !verify_linear_advance_proof(
            proof.linear_advance_proof.as_ref(),
            source.bl_tx_id,
            target.bl_tx_id,
            &target_bl_tx_alh,
            &target.bl_root,
            target.bl_tx_id,
        )? {
            return Err(fail(DualProofCheck::LinearAdvanceProof));
        }
    }
    Ok(())
}
