//! Proofs over the accumulated hash tree (immudb's "binary linking"): an append-only Merkle
//! tree whose i-th leaf is SHA-256(0x00 ‖ Alh of tx i). Every tx header commits to the tree
//! of all earlier transactions (`blTxID`, `blRoot`). Mirrors
//! `embedded/ahtree/verification.go` (tree positions are 1-based, as there).

use sha2::{Digest as _, Sha256};

use super::tx::Digest;

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

fn node_hash(left: &Digest, right: &Digest) -> Digest {
    let mut hasher = Sha256::new();
    hasher.update([NODE_PREFIX]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The leaf of the accumulated hash tree for a tx Alh (`store.leafFor`).
pub fn leaf_for(alh: &Digest) -> Digest {
    let mut hasher = Sha256::new();
    hasher.update([LEAF_PREFIX]);
    hasher.update(alh);
    hasher.finalize().into()
}

/// `ahtree.VerifyInclusion`: leaf `i` is in the tree of the first `j` leaves with root `root`.
pub fn verify_inclusion(proof: &[Digest], i: u64, j: u64, leaf: &Digest, root: &Digest) -> bool {
    if i > j || i == 0 || (i < j && proof.is_empty()) {
        return false;
    }
    eval_inclusion(proof, i, j, leaf) == *root
}

/// `ahtree.EvalInclusion`: the root the proof leads to.
fn eval_inclusion(proof: &[Digest], i: u64, j: u64, leaf: &Digest) -> Digest {
    let (mut i1, mut j1) = (i - 1, j - 1);
    let mut root = *leaf;
    for term in proof {
        root = if i1 % 2 == 0 && i1 != j1 {
            node_hash(&root, term)
        } else {
            node_hash(term, &root)
        };
        i1 >>= 1;
        j1 >>= 1;
    }
    root
}

/// `ahtree.VerifyConsistency`: the tree of `i` leaves with root `i_root` is a prefix of the
/// tree of `j` leaves with root `j_root`.
pub fn verify_consistency(
    proof: &[Digest],
    i: u64,
    j: u64,
    i_root: &Digest,
    j_root: &Digest,
) -> bool {
    if i > j || i == 0 || (i < j && proof.is_empty()) {
        return false;
    }
    if i == j && proof.is_empty() {
        return i_root == j_root;
    }
    let (ci, cj) = eval_consistency(proof, i, j);
    ci == *i_root && cj == *j_root
}

/// `ahtree.EvalConsistency`: both roots the proof leads to. `proof` is non-empty.
fn eval_consistency(proof: &[Digest], i: u64, j: u64) -> (Digest, Digest) {
    let (mut fn_, mut sn) = (i - 1, j - 1);
    // Skip the levels where the old tree's last node is a complete right subtree.
    while fn_ % 2 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (first, rest) = proof
        .split_first()
        .map_or(([0u8; 32], &[][..]), |(f, r)| (*f, r));
    let (mut ci, mut cj) = (first, first);
    for term in rest {
        if fn_ % 2 == 1 || fn_ == sn {
            ci = node_hash(term, &ci);
            cj = node_hash(term, &cj);
            while fn_ % 2 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            cj = node_hash(&cj, term);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    (ci, cj)
}

/// `ahtree.VerifyLastInclusion`: `leaf` is the last (i-th) leaf of the tree with root `root`.
pub fn verify_last_inclusion(proof: &[Digest], i: u64, leaf: &Digest, root: &Digest) -> bool {
    if i == 0 {
        return false;
    }
    let computed = proof.iter().fold(*leaf, |acc, term| node_hash(term, &acc));
    computed == *root
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::immudb::verify::testkit::rfc6962::*;

    fn leaves(n: usize) -> Vec<Digest> {
        (0..n)
            .map(|i| leaf_for(&Sha256::digest((i as u64).to_be_bytes()).into()))
            .collect()
    }

    #[test]
    fn inclusion_consistency_and_last_inclusion_hold_for_all_small_trees() {
        let all = leaves(40);
        for j in 1..=all.len() {
            let tree = &all[..j];
            let j_root = root(tree);
            for i in 1..=j {
                let proof = inclusion(i - 1, tree);
                assert!(
                    verify_inclusion(&proof, i as u64, j as u64, &tree[i - 1], &j_root),
                    "inclusion {i} in {j}"
                );
                let flipped = tree[i - 1].map(|b| b ^ 1);
                assert!(!verify_inclusion(
                    &proof, i as u64, j as u64, &flipped, &j_root
                ));

                let cproof = consistency(i, tree);
                let i_root = root(&tree[..i]);
                assert!(
                    verify_consistency(&cproof, i as u64, j as u64, &i_root, &j_root),
                    "consistency {i} to {j}"
                );
                if i < j {
                    let wrong = i_root.map(|b| b ^ 1);
                    assert!(!verify_consistency(
                        &cproof, i as u64, j as u64, &wrong, &j_root
                    ));
                }
            }
            let last = inclusion(j - 1, tree);
            assert!(verify_last_inclusion(
                &last,
                j as u64,
                &tree[j - 1],
                &j_root
            ));
            if j > 1 {
                assert!(!verify_last_inclusion(&last, j as u64, &tree[0], &j_root));
            }
        }
    }

    #[test]
    fn degenerate_arguments_fail() {
        let l = leaves(2);
        let r = root(&l);
        assert!(!verify_inclusion(&[], 0, 2, &l[0], &r));
        assert!(!verify_inclusion(&[], 1, 2, &l[0], &r));
        assert!(!verify_inclusion(&[l[1]], 3, 2, &l[0], &r));
        assert!(!verify_consistency(&[], 1, 2, &l[0], &r));
        assert!(!verify_consistency(&[r], 0, 2, &l[0], &r));
        assert!(!verify_last_inclusion(&[], 0, &l[0], &r));
    }
}
