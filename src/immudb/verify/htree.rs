//! The Merkle tree over the entries of one transaction, whose root is the header's `eH`.
//! Mirrors `embedded/htree/htree.go`: leaves are SHA-256(0x00 ‖ entry digest), inner nodes
//! SHA-256(0x01 ‖ left ‖ right), and a node without a sibling moves up a level unchanged.

use sha2::{Digest as _, Sha256};

use super::tx::Digest;

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

fn leaf_hash(digest: &Digest) -> Digest {
    let mut hasher = Sha256::new();
    hasher.update([LEAF_PREFIX]);
    hasher.update(digest);
    hasher.finalize().into()
}

fn node_hash(left: &Digest, right: &Digest) -> Digest {
    let mut hasher = Sha256::new();
    hasher.update([NODE_PREFIX]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// Number of bits needed to represent `x` (Go's `bits.Len`).
fn bit_len(x: usize) -> u32 {
    usize::BITS - x.leading_zeros()
}

/// A transaction's Merkle tree, built from its entry digests (`htree.BuildWith`).
#[derive(Clone, Debug)]
pub struct HTree {
    /// `levels[0]` are the leaf hashes; the last level holds the root.
    levels: Vec<Vec<Digest>>,
}

impl HTree {
    /// Builds the tree. An empty transaction has no tree; immudb then uses SHA-256 of nothing
    /// as the root.
    pub fn build(digests: &[Digest]) -> Self {
        let mut levels = vec![digests.iter().map(leaf_hash).collect::<Vec<_>>()];
        while let Some(level) = levels.last().filter(|level| level.len() > 1) {
            let next = level
                .chunks(2)
                .filter_map(|pair| match pair {
                    [left, right] => Some(node_hash(left, right)),
                    // Odd node out: carried up as is.
                    [single] => Some(*single),
                    _ => None, // chunks(2) yields one or two items
                })
                .collect();
            levels.push(next);
        }
        HTree { levels }
    }

    /// Number of leaves.
    pub fn width(&self) -> usize {
        self.levels.first().map_or(0, Vec::len)
    }

    /// The root, `eH` of the transaction.
    pub fn root(&self) -> Digest {
        match self.levels.last().and_then(|level| level.first()) {
            Some(root) => *root,
            None => Sha256::digest([]).into(),
        }
    }

    /// The inclusion proof of leaf `i` (`HTree.InclusionProof`): the sibling subtree roots
    /// from the leaf upwards; `None` when `i` is out of range.
    pub fn inclusion_proof(&self, i: usize) -> Option<Vec<Digest>> {
        let width = self.width();
        if i >= width {
            return None;
        }
        let mut terms = Vec::new();
        let (mut m, mut n, mut offset) = (i, width, 0usize);
        if width == 1 {
            return Some(terms);
        }
        loop {
            // Split the current range at the largest power of two below its size; the proof
            // takes the root of the half that does not hold the leaf.
            let k = 1usize << (bit_len(n - 1) - 1);
            let (l, r) = if m < k {
                let lr = (offset + k, offset + n - 1);
                n = k;
                lr
            } else {
                let lr = (offset, offset + k - 1);
                m -= k;
                n -= k;
                offset += k;
                lr
            };
            let layer = bit_len(r - l) as usize;
            let index = l >> layer;
            terms.push(*self.levels.get(layer)?.get(index)?);
            if n < 1 || (n == 1 && m == 0) {
                // Collected top-down; the verifier walks bottom-up.
                terms.reverse();
                return Some(terms);
            }
        }
    }
}

/// `htree.VerifyInclusion`: recomputes the root from the entry digest at `leaf` of a tree of
/// `width` leaves and the proof terms, and compares it with `root`. The walk must also end
/// exactly at the root position, so a proof for another shape of tree fails.
pub fn verify_inclusion(
    leaf: usize,
    width: usize,
    terms: &[Digest],
    digest: &Digest,
    root: &Digest,
) -> bool {
    if width == 0 || leaf >= width {
        return false;
    }
    let mut computed = leaf_hash(digest);
    let (mut i, mut r) = (leaf, width - 1);
    for term in terms {
        computed = if i % 2 == 0 && i != r {
            node_hash(&computed, term)
        } else {
            node_hash(term, &computed)
        };
        i /= 2;
        r /= 2;
    }
    i == r && computed == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digests(n: usize) -> Vec<Digest> {
        (0..n)
            .map(|i| Sha256::digest((i as u64).to_be_bytes()).into())
            .collect()
    }

    #[test]
    fn every_leaf_of_every_width_proves_against_the_root() {
        for width in 1..=70 {
            let ds = digests(width);
            let tree = HTree::build(&ds);
            for (i, d) in ds.iter().enumerate() {
                let proof = tree.inclusion_proof(i).expect("leaf in range");
                assert!(
                    verify_inclusion(i, width, &proof, d, &tree.root()),
                    "width {width} leaf {i}"
                );
                // Wrong leaf position, wrong width, wrong digest: all fail.
                if width > 1 {
                    assert!(!verify_inclusion(
                        (i + 1) % width,
                        width,
                        &proof,
                        d,
                        &tree.root()
                    ));
                }
                // (A wrong width alone may still fold to the root, e.g. leaf 0 of 3 vs 4:
                // callers pin the width to the header's entry count.)
                let flipped = d.map(|b| b ^ 1);
                assert!(!verify_inclusion(i, width, &proof, &flipped, &tree.root()));
            }
            assert!(tree.inclusion_proof(width).is_none());
        }
    }

    #[test]
    fn root_of_small_trees_matches_the_definition() {
        let ds = digests(3);
        let expected = node_hash(
            &node_hash(&leaf_hash(&ds[0]), &leaf_hash(&ds[1])),
            &leaf_hash(&ds[2]),
        );
        assert_eq!(HTree::build(&ds).root(), expected);
        assert_eq!(HTree::build(&ds[..1]).root(), leaf_hash(&ds[0]));
        assert_eq!(HTree::build(&[]).root(), <Digest>::from(Sha256::digest([])));
    }
}
