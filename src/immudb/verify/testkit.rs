//! Test support shared by the unit tests and `tests/immudb_proofs.rs`; not part of the API.
//!
//! - [`Flipper`]: walks every byte of every field of a proof answer, one position per run, so a
//!   test can flip each byte in turn (exhaustively, not by sampling) and check verification
//!   fails.
//! - [`rfc6962`]: an in-memory accumulated hash tree that hands out the proofs immudb's ahtree
//!   would (RFC 6962 §2.1, the tree immudb builds), written from the RFC.
//! - [`Chain`]: a synthetic chain of transactions with chosen header versions, tx metadata and
//!   binary-linking lag, to exercise proof shapes a live v1.10 server never produces (header
//!   version 0, linear advance proofs).

use super::ahtree::leaf_for;
use super::htree::HTree;
use super::tx::{Digest, Header, encode_key, kv_digest, value_hash};
use crate::immudb::KeyValue;
use crate::immudb::proto;

/// Flips the byte at one position of a walk over a message's fields. Integers count as their
/// big-endian bytes (flipping byte k = XOR with `mask << 8k`), so "any byte of a header field"
/// covers ids, timestamps and counts too.
#[derive(Debug)]
pub struct Flipper {
    target: usize,
    seen: usize,
    mask: u8,
    hit: Option<String>,
}

impl Flipper {
    /// A walk that flips position `target` with `mask` (XOR).
    pub fn new(target: usize, mask: u8) -> Self {
        Flipper {
            target,
            seen: 0,
            mask,
            hit: None,
        }
    }

    /// The path of the flipped byte, once the walk reached the target.
    pub fn hit(&self) -> Option<&str> {
        self.hit.as_deref()
    }

    /// Positions walked so far.
    pub fn seen(&self) -> usize {
        self.seen
    }

    fn position(&mut self, len: usize) -> Option<usize> {
        let here = self.seen;
        self.seen += len;
        (self.hit.is_none() && self.target >= here && self.target < here + len)
            .then(|| self.target - here)
    }

    /// Every byte of a bytes field.
    pub fn bytes(&mut self, path: &str, bytes: &mut [u8]) {
        if let Some(i) = self.position(bytes.len()) {
            bytes[i] ^= self.mask;
            self.hit = Some(format!("{path}[{i}]"));
        }
    }

    /// Every byte of a string (flipping keeps UTF-8 valid for the ASCII names used here).
    pub fn string(&mut self, path: &str, text: &mut String) {
        let mut bytes = std::mem::take(text).into_bytes();
        self.bytes(path, &mut bytes);
        *text = String::from_utf8_lossy(&bytes).into_owned();
    }

    /// Every byte of a u64.
    pub fn u64(&mut self, path: &str, value: &mut u64) {
        if let Some(k) = self.position(8) {
            *value ^= u64::from(self.mask) << (8 * k);
            self.hit = Some(format!("{path}<byte {k}>"));
        }
    }

    /// Every byte of an i64.
    pub fn i64(&mut self, path: &str, value: &mut i64) {
        let mut bits = *value as u64;
        self.u64(path, &mut bits);
        *value = bits as i64;
    }

    /// Every byte of an i32.
    pub fn i32(&mut self, path: &str, value: &mut i32) {
        if let Some(k) = self.position(4) {
            *value = ((*value as u32) ^ (u32::from(self.mask) << (8 * k))) as i32;
            self.hit = Some(format!("{path}<byte {k}>"));
        }
    }

    /// Every term of a proof.
    pub fn terms(&mut self, path: &str, terms: &mut [Vec<u8>]) {
        for (i, term) in terms.iter_mut().enumerate() {
            self.bytes(&format!("{path}[{i}]"), term);
        }
    }

    /// A tx header: every field (all are hashed into its Alh).
    pub fn header(&mut self, path: &str, h: &mut proto::TxHeader) {
        self.u64(&format!("{path}.id"), &mut h.id);
        self.bytes(&format!("{path}.prev_alh"), &mut h.prev_alh);
        self.i64(&format!("{path}.ts"), &mut h.ts);
        self.i32(&format!("{path}.nentries"), &mut h.nentries);
        self.bytes(&format!("{path}.eh"), &mut h.eh);
        self.u64(&format!("{path}.bl_tx_id"), &mut h.bl_tx_id);
        self.bytes(&format!("{path}.bl_root"), &mut h.bl_root);
        self.i32(&format!("{path}.version"), &mut h.version);
        if let Some(md) = h.metadata.as_mut() {
            // A zero truncated tx id means "absent" in immudb's encoding, so only a non-zero
            // one is a hashed field; flipping a zero one *adds* the attribute, also hashed.
            self.u64(
                &format!("{path}.metadata.truncated_tx_id"),
                &mut md.truncated_tx_id,
            );
            self.bytes(&format!("{path}.metadata.extra"), &mut md.extra);
        }
    }

    /// KV metadata: the expiry time (the flags are booleans, not bytes).
    pub fn kv_metadata(&mut self, path: &str, md: &mut Option<proto::KvMetadata>) {
        if let Some(expiration) = md.as_mut().and_then(|md| md.expiration.as_mut()) {
            self.i64(
                &format!("{path}.expiration.expires_at"),
                &mut expiration.expires_at,
            );
        }
    }

    /// A listed transaction. `v_len_checked(i)` says whether entry i's `v_len` is checked by
    /// the verification at hand: immudb does not hash it, so it is only checked where the
    /// value is known (written by the batch, or read).
    pub fn tx(&mut self, path: &str, tx: &mut proto::Tx, v_len_checked: &dyn Fn(usize) -> bool) {
        if let Some(h) = tx.header.as_mut() {
            self.header(&format!("{path}.header"), h);
        }
        for (i, e) in tx.entries.iter_mut().enumerate() {
            self.bytes(&format!("{path}.entries[{i}].key"), &mut e.key);
            self.bytes(&format!("{path}.entries[{i}].h_value"), &mut e.h_value);
            if v_len_checked(i) {
                self.i32(&format!("{path}.entries[{i}].v_len"), &mut e.v_len);
            }
            self.kv_metadata(&format!("{path}.entries[{i}].metadata"), &mut e.metadata);
            self.bytes(&format!("{path}.entries[{i}].value"), &mut e.value);
        }
        // kv_entries / z_entries are only filled with the RESOLVE entries spec, which this
        // client never asks for; verification ignores them, so they are not walked.
    }

    /// A dual proof: every part.
    pub fn dual(&mut self, path: &str, d: &mut proto::DualProof) {
        if let Some(h) = d.source_tx_header.as_mut() {
            self.header(&format!("{path}.source_tx_header"), h);
        }
        if let Some(h) = d.target_tx_header.as_mut() {
            self.header(&format!("{path}.target_tx_header"), h);
        }
        self.terms(&format!("{path}.inclusion_proof"), &mut d.inclusion_proof);
        self.terms(
            &format!("{path}.consistency_proof"),
            &mut d.consistency_proof,
        );
        // Only used when the target's blTxID > 0 (the server sends zeros otherwise).
        let target_bl = d.target_tx_header.as_ref().map_or(0, |h| h.bl_tx_id);
        if target_bl > 0 {
            self.bytes(&format!("{path}.target_bl_tx_alh"), &mut d.target_bl_tx_alh);
        }
        self.terms(
            &format!("{path}.last_inclusion_proof"),
            &mut d.last_inclusion_proof,
        );
        if let Some(l) = d.linear_proof.as_mut() {
            self.u64(
                &format!("{path}.linear_proof.source_tx_id"),
                &mut l.source_tx_id,
            );
            self.u64(
                &format!("{path}.linear_proof.target_tx_id"),
                &mut l.target_tx_id,
            );
            self.terms(&format!("{path}.linear_proof.terms"), &mut l.terms);
        }
        if let Some(a) = d.linear_advance_proof.as_mut() {
            self.terms(
                &format!("{path}.linear_advance_proof.linear_proof_terms"),
                &mut a.linear_proof_terms,
            );
            for (i, p) in a.inclusion_proofs.iter_mut().enumerate() {
                self.terms(
                    &format!("{path}.linear_advance_proof.inclusion_proofs[{i}]"),
                    &mut p.terms,
                );
            }
        }
    }

    /// The state signature (only meaningful when a server key is configured).
    pub fn signature(&mut self, path: &str, s: &mut Option<proto::Signature>) {
        if let Some(s) = s.as_mut() {
            // public_key is informational: verification uses the configured key.
            self.bytes(&format!("{path}.signature"), &mut s.signature);
        }
    }

    /// A Merkle inclusion proof of an entry.
    pub fn inclusion(&mut self, path: &str, p: &mut proto::InclusionProof) {
        self.i32(&format!("{path}.leaf"), &mut p.leaf);
        self.i32(&format!("{path}.width"), &mut p.width);
        self.terms(&format!("{path}.terms"), &mut p.terms);
    }
}

/// Runs `walk` over clones of `original`, flipping one position per run with each mask, and
/// hands every mutated clone to `check` with the flipped path. Returns the number of runs.
pub fn for_each_flip<T: Clone>(
    original: &T,
    masks: &[u8],
    walk: impl Fn(&mut Flipper, &mut T),
    mut check: impl FnMut(&str, &T),
) -> usize {
    let mut runs = 0;
    for &mask in masks {
        for target in 0.. {
            let mut mutated = original.clone();
            let mut flipper = Flipper::new(target, mask);
            walk(&mut flipper, &mut mutated);
            let Some(path) = flipper.hit() else { break };
            check(path, &mutated);
            runs += 1;
        }
    }
    runs
}

/// An accumulated hash tree written from RFC 6962 §2.1 (MTH, PATH, PROOF), the tree immudb's
/// ahtree builds. Leaves are already leaf hashes (`leaf_for(alh)`).
pub mod rfc6962 {
    use sha2::{Digest as _, Sha256};

    use super::Digest;

    fn node(left: &Digest, right: &Digest) -> Digest {
        let mut hasher = Sha256::new();
        hasher.update([1u8]);
        hasher.update(left);
        hasher.update(right);
        hasher.finalize().into()
    }

    /// Largest power of two strictly below `n` (n ≥ 2).
    fn split(n: usize) -> usize {
        1 << (usize::BITS - (n - 1).leading_zeros() - 1)
    }

    /// `MTH(D[n])`.
    pub fn root(leaves: &[Digest]) -> Digest {
        match leaves.len() {
            0 => [0; 32],
            1 => leaves[0],
            n => {
                let k = split(n);
                node(&root(&leaves[..k]), &root(&leaves[k..]))
            }
        }
    }

    /// `PATH(m, D[n])`: inclusion proof of 0-based leaf `m`, bottom-up.
    pub fn inclusion(m: usize, leaves: &[Digest]) -> Vec<Digest> {
        let n = leaves.len();
        if n <= 1 {
            return Vec::new();
        }
        let k = split(n);
        let (mut path, sibling) = if m < k {
            (inclusion(m, &leaves[..k]), root(&leaves[k..]))
        } else {
            (inclusion(m - k, &leaves[k..]), root(&leaves[..k]))
        };
        path.push(sibling);
        path
    }

    fn subproof(m: usize, leaves: &[Digest], complete: bool) -> Vec<Digest> {
        let n = leaves.len();
        if m == n {
            return if complete {
                Vec::new()
            } else {
                vec![root(leaves)]
            };
        }
        let k = split(n);
        let (mut proof, sibling) = if m <= k {
            (subproof(m, &leaves[..k], complete), root(&leaves[k..]))
        } else {
            (subproof(m - k, &leaves[k..], false), root(&leaves[..k]))
        };
        proof.push(sibling);
        proof
    }

    /// `PROOF(m, D[n])`, with the old root prepended when `m` is a power of two: the form
    /// immudb's `ConsistencyProof` returns and its verifier expects.
    pub fn consistency(m: usize, leaves: &[Digest]) -> Vec<Digest> {
        if m == leaves.len() {
            return Vec::new();
        }
        let mut proof = subproof(m, leaves, true);
        if m.is_power_of_two() {
            proof.insert(0, root(&leaves[..m]));
        }
        proof
    }
}

/// A synthetic history of transactions, each holding a few plain key/values.
#[derive(Clone, Debug)]
pub struct Chain {
    headers: Vec<proto::TxHeader>,
    kvs: Vec<Vec<KeyValue>>,
    alhs: Vec<Digest>,
    leaves: Vec<Digest>,
}

impl Chain {
    /// Builds txs 1..=n. `bl_of(id)` is the binary-linking size tx `id` commits to (< id,
    /// non-decreasing); `metadata_of(id)` its tx metadata (version 1 only).
    pub fn build(
        n: u64,
        version: i32,
        bl_of: impl Fn(u64) -> u64,
        metadata_of: impl Fn(u64) -> Option<proto::TxMetadata>,
    ) -> Chain {
        let mut chain = Chain {
            headers: Vec::new(),
            kvs: Vec::new(),
            alhs: Vec::new(),
            leaves: Vec::new(),
        };
        for id in 1..=n {
            let kvs: Vec<KeyValue> = (0..1 + id % 4)
                .map(|j| KeyValue {
                    key: format!("audit:test:{id}:{j}").into_bytes(),
                    value: format!("{{\"tx\":{id},\"n\":{j}}}").into_bytes(),
                })
                .collect();
            let digests: Vec<Digest> = kvs
                .iter()
                .map(|kv| kv_digest(version as u16, &kv.key, None, &kv.value).expect("digest"))
                .collect();
            let bl = bl_of(id);
            assert!(bl < id, "blTxID must precede the tx");
            let header = proto::TxHeader {
                id,
                prev_alh: chain.alhs.last().copied().unwrap_or([0; 32]).to_vec(),
                ts: 1_700_000_000 + id as i64,
                nentries: kvs.len() as i32,
                eh: HTree::build(&digests).root().to_vec(),
                bl_tx_id: bl,
                bl_root: rfc6962::root(&chain.leaves[..bl as usize]).to_vec(),
                version,
                metadata: metadata_of(id),
            };
            let alh = Header::from_proto(&header, "synthetic")
                .expect("header")
                .alh();
            chain.headers.push(header);
            chain.kvs.push(kvs);
            chain.alhs.push(alh);
            chain.leaves.push(leaf_for(&alh));
        }
        chain
    }

    fn index(id: u64) -> usize {
        (id - 1) as usize
    }

    /// Header of tx `id`.
    pub fn header(&self, id: u64) -> &proto::TxHeader {
        &self.headers[Self::index(id)]
    }

    /// The key/values tx `id` wrote.
    pub fn kvs(&self, id: u64) -> &[KeyValue] {
        &self.kvs[Self::index(id)]
    }

    /// Alh of tx `id`.
    pub fn alh(&self, id: u64) -> Digest {
        self.alhs[Self::index(id)]
    }

    fn inner(&self, id: u64) -> Digest {
        Header::from_proto(self.header(id), "synthetic")
            .expect("header")
            .inner_hash()
    }

    fn terms(digests: Vec<Digest>) -> Vec<Vec<u8>> {
        digests.into_iter().map(|d| d.to_vec()).collect()
    }

    /// The dual proof immudb's `ImmuStore.DualProof` would build from `source` to `target`.
    pub fn dual_proof(&self, source: u64, target: u64) -> proto::DualProof {
        let s = self.header(source);
        let t = self.header(target);
        let tree = &self.leaves[..t.bl_tx_id as usize];
        let mut proof = proto::DualProof {
            source_tx_header: Some(s.clone()),
            target_tx_header: Some(t.clone()),
            target_bl_tx_alh: vec![0; 32],
            ..Default::default()
        };
        if source < t.bl_tx_id {
            proof.inclusion_proof = Self::terms(rfc6962::inclusion(Self::index(source), tree));
        }
        if s.bl_tx_id > 0 {
            proof.consistency_proof = Self::terms(rfc6962::consistency(s.bl_tx_id as usize, tree));
        }
        if t.bl_tx_id > 0 {
            proof.target_bl_tx_alh = self.alh(t.bl_tx_id).to_vec();
            proof.last_inclusion_proof =
                Self::terms(rfc6962::inclusion(Self::index(t.bl_tx_id), tree));
        }
        let start = source.max(t.bl_tx_id);
        let mut linear = vec![self.alh(start)];
        linear.extend((start + 1..=target).map(|id| self.inner(id)));
        proof.linear_proof = Some(proto::LinearProof {
            source_tx_id: start,
            target_tx_id: target,
            terms: Self::terms(linear),
        });
        // ImmuStore.LinearAdvanceProof(source.blTxID, min(source, target.blTxID), target.blTxID)
        let (adv_start, adv_end) = (s.bl_tx_id, source.min(t.bl_tx_id));
        if adv_end > adv_start + 1 {
            let mut terms = vec![self.alh(adv_start + 1)];
            let mut inclusion_proofs = Vec::new();
            for id in adv_start + 1..adv_end {
                inclusion_proofs.push(proto::InclusionProof {
                    terms: Self::terms(rfc6962::inclusion(Self::index(id), tree)),
                    ..Default::default()
                });
                terms.push(self.inner(id + 1));
            }
            proof.linear_advance_proof = Some(proto::LinearAdvanceProof {
                linear_proof_terms: Self::terms(terms),
                inclusion_proofs,
            });
        }
        proof
    }

    /// The `VerifiableSet` answer for tx `id` proven from `prove_since` (0: from itself).
    pub fn verifiable_tx(&self, id: u64, prove_since: u64) -> proto::VerifiableTx {
        let entries = self
            .kvs(id)
            .iter()
            .map(|kv| proto::TxEntry {
                key: encode_key(&kv.key),
                h_value: value_hash(&kv.value).to_vec(),
                v_len: kv.value.len() as i32 + 1,
                metadata: None,
                value: Vec::new(),
            })
            .collect();
        let source = if prove_since == 0 { id } else { prove_since };
        proto::VerifiableTx {
            tx: Some(proto::Tx {
                header: Some(self.header(id).clone()),
                entries,
                ..Default::default()
            }),
            dual_proof: Some(self.dual_proof(source, id)),
            signature: None,
        }
    }
}
