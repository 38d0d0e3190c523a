//! Transaction headers and entries as immudb hashes them: the header's `Alh` (accumulated
//! linear hash), its inner hash, KV and tx metadata bytes, and entry digests — header versions
//! 0 and 1. Mirrors `embedded/store/tx.go`, `kv_metadata.go`, `tx_metadata.go` and
//! `verification.go` of immudb v1.10.0, and the proto conversions of `pkg/api/schema`.

use sha2::{Digest as _, Sha256};

use super::error::VerificationError;
use crate::immudb::proto;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// immudb's 1-byte prefix of plain key/value keys (`database.SetKeyPrefix`).
pub const SET_KEY_PREFIX: u8 = 0x00;
/// immudb's 1-byte prefix of plain values (`database.PlainValuePrefix`).
pub const PLAIN_VALUE_PREFIX: u8 = 0x00;

/// Longest `extra` tx metadata attribute immudb accepts (`maxExtraLen`).
const MAX_TX_METADATA_EXTRA: usize = 256;

// Attribute codes of `store.TxMetadata` and `store.KVMetadata`.
const TX_MD_TRUNCATED_UPTO: u8 = 0;
const TX_MD_EXTRA: u8 = 1;
const KV_MD_DELETED: u8 = 0;
const KV_MD_EXPIRES_AT: u8 = 1;
const KV_MD_NON_INDEXABLE: u8 = 2;

pub(crate) fn sha256(data: &[u8]) -> Digest {
    Sha256::digest(data).into()
}

/// Reads a digest from the wire, insisting on 32 bytes. immudb's own `DigestFromProto`
/// silently truncates or zero-pads; being strict only refuses answers no honest server sends.
pub(crate) fn digest(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<Digest, VerificationError> {
    bytes.try_into().map_err(|_| {
        VerificationError::Malformed(format!("{} is {} bytes, expected 32", what(), bytes.len()))
    })
}

/// Reads a list of digests (proof terms).
pub(crate) fn digests(terms: &[Vec<u8>], what: &str) -> Result<Vec<Digest>, VerificationError> {
    terms
        .iter()
        .enumerate()
        .map(|(i, t)| digest(t, || format!("{what} term {i}")))
        .collect()
}

/// The key immudb stores for a plain key/value (`database.EncodeKey`): `0x00 ‖ key`.
pub fn encode_key(key: &[u8]) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(key.len() + 1);
    encoded.push(SET_KEY_PREFIX);
    encoded.extend_from_slice(key);
    encoded
}

/// The hash immudb records for a plain value: SHA-256 of `0x00 ‖ value` (the value as
/// `database.EncodeEntrySpec` wraps it).
pub fn value_hash(value: &[u8]) -> Digest {
    let mut hasher = Sha256::new();
    hasher.update([PLAIN_VALUE_PREFIX]);
    hasher.update(value);
    hasher.finalize().into()
}

/// The bytes of KV metadata as hashed into entry digests (`store.KVMetadata.Bytes` after
/// `schema.KVMetadataFromProto`): attributes in code order, deleted (no payload), expires-at
/// (8-byte big-endian unix seconds), non-indexable (no payload). No metadata = no bytes.
pub fn kv_metadata_bytes(md: Option<&proto::KvMetadata>) -> Vec<u8> {
    let mut bytes = Vec::new();
    let Some(md) = md else { return bytes };
    if md.deleted {
        bytes.push(KV_MD_DELETED);
    }
    if let Some(expiration) = &md.expiration {
        bytes.push(KV_MD_EXPIRES_AT);
        // Go: uint64(time.Unix(expiresAt, 0).Unix()), i.e. the two's complement bits.
        bytes.extend_from_slice(&(expiration.expires_at as u64).to_be_bytes());
    }
    if md.non_indexable {
        bytes.push(KV_MD_NON_INDEXABLE);
    }
    bytes
}

/// The bytes of tx metadata (`store.TxMetadata.Bytes` after `schema.TxMetadataFromProto`):
/// truncated-up-to tx id when non-zero (8-byte big-endian), then `extra` when non-empty
/// (2-byte length ‖ bytes, at most 256).
pub fn tx_metadata_bytes(md: Option<&proto::TxMetadata>) -> Result<Vec<u8>, VerificationError> {
    let mut bytes = Vec::new();
    let Some(md) = md else { return Ok(bytes) };
    if md.truncated_tx_id > 0 {
        bytes.push(TX_MD_TRUNCATED_UPTO);
        bytes.extend_from_slice(&md.truncated_tx_id.to_be_bytes());
    }
    if !md.extra.is_empty() {
        if md.extra.len() > MAX_TX_METADATA_EXTRA {
            return Err(VerificationError::Malformed(format!(
                "tx metadata extra of {} bytes exceeds {MAX_TX_METADATA_EXTRA}",
                md.extra.len()
            )));
        }
        bytes.push(TX_MD_EXTRA);
        bytes.extend_from_slice(&(md.extra.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&md.extra);
    }
    Ok(bytes)
}

/// A tx header read from the wire and checked for shape, ready to hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Transaction id.
    pub id: u64,
    /// Alh of the previous transaction (zeros before tx 1).
    pub prev_alh: Digest,
    /// Commit time, unix seconds.
    pub ts: i64,
    /// Header version: 0 (no metadata, ≤ 65535 entries) or 1.
    pub version: u16,
    /// Tx metadata bytes (always empty in version 0).
    pub metadata: Vec<u8>,
    /// Number of entries.
    pub nentries: u32,
    /// Root of the Merkle tree of the entry digests.
    pub eh: Digest,
    /// Size of the binary-linking (accumulated hash) tree this header commits to.
    pub bl_tx_id: u64,
    /// Root of that tree.
    pub bl_root: Digest,
}

impl Header {
    /// Checks the shape of a wire header (`schema.TxHeaderFromProto`, strictly): digests of 32
    /// bytes, a known version, a non-negative entry count that fits the version's field, no
    /// metadata in version 0.
    pub fn from_proto(h: &proto::TxHeader, what: &str) -> Result<Self, VerificationError> {
        let version = match h.version {
            0 => 0,
            1 => 1,
            v => {
                return Err(VerificationError::Unsupported(format!(
                    "{what}: tx header version {v}"
                )));
            }
        };
        let nentries = u32::try_from(h.nentries)
            .map_err(|_| VerificationError::Malformed(format!("{what}: {} entries", h.nentries)))?;
        if version == 0 && nentries > u32::from(u16::MAX) {
            return Err(VerificationError::Malformed(format!(
                "{what}: {nentries} entries in a version 0 header"
            )));
        }
        let metadata = tx_metadata_bytes(h.metadata.as_ref())?;
        if version == 0 && !metadata.is_empty() {
            return Err(VerificationError::Malformed(format!(
                "{what}: metadata in a version 0 header"
            )));
        }
        Ok(Header {
            id: h.id,
            prev_alh: digest(&h.prev_alh, || format!("{what} prevAlh"))?,
            ts: h.ts,
            version,
            metadata,
            nentries,
            eh: digest(&h.eh, || format!("{what} eH"))?,
            bl_tx_id: h.bl_tx_id,
            bl_root: digest(&h.bl_root, || format!("{what} blRoot"))?,
        })
    }

    /// `TxHeader.innerHash`: SHA-256 of ts ‖ version ‖ (v0: nentries as u16 | v1: mdLen ‖ md ‖
    /// nentries as u32) ‖ eH ‖ blTxID ‖ blRoot, all integers big-endian.
    pub fn inner_hash(&self) -> Digest {
        let mut hasher = Sha256::new();
        hasher.update(self.ts.to_be_bytes());
        hasher.update(self.version.to_be_bytes());
        if self.version == 0 {
            // Checked in from_proto: fits 16 bits.
            hasher.update((self.nentries as u16).to_be_bytes());
        } else {
            // At most 1 + 8 + 1 + 2 + 256 bytes, see tx_metadata_bytes.
            hasher.update((self.metadata.len() as u16).to_be_bytes());
            hasher.update(&self.metadata);
            hasher.update(self.nentries.to_be_bytes());
        }
        hasher.update(self.eh);
        hasher.update(self.bl_tx_id.to_be_bytes());
        hasher.update(self.bl_root);
        hasher.finalize().into()
    }

    /// `TxHeader.Alh`: SHA-256 of id ‖ prevAlh ‖ innerHash. The Alh of the last transaction is
    /// the database state (`ImmutableState.txHash`).
    pub fn alh(&self) -> Digest {
        advance_linear_hash(&self.prev_alh, self.id, &self.inner_hash())
    }
}

/// `store.advanceLinearHash`: the Alh of tx `tx_id` from the previous Alh and its inner hash.
pub(crate) fn advance_linear_hash(prev_alh: &Digest, tx_id: u64, inner_hash: &Digest) -> Digest {
    let mut hasher = Sha256::new();
    hasher.update(tx_id.to_be_bytes());
    hasher.update(prev_alh);
    hasher.update(inner_hash);
    hasher.finalize().into()
}

/// The digest of one entry, the leaf of the tx's Merkle tree: `TxEntryDigest_v1_1` (header
/// version 0: SHA-256 of key ‖ hValue, metadata not allowed) or `TxEntryDigest_v1_2` (version
/// 1: SHA-256 of mdLen ‖ md ‖ keyLen ‖ key ‖ hValue, lengths as big-endian u16). `key` is the
/// stored key, prefix included.
pub fn entry_digest(
    version: u16,
    key: &[u8],
    metadata: &[u8],
    value_hash: &Digest,
) -> Result<Digest, VerificationError> {
    let mut hasher = Sha256::new();
    match version {
        0 => {
            if !metadata.is_empty() {
                return Err(VerificationError::Malformed(
                    "KV metadata in a version 0 transaction".into(),
                ));
            }
        }
        1 => {
            let md_len = u16::try_from(metadata.len()).map_err(|_| {
                VerificationError::Malformed(format!("KV metadata of {} bytes", metadata.len()))
            })?;
            let key_len = u16::try_from(key.len())
                .map_err(|_| VerificationError::Malformed(format!("key of {} bytes", key.len())))?;
            hasher.update(md_len.to_be_bytes());
            hasher.update(metadata);
            hasher.update(key_len.to_be_bytes());
        }
        v => {
            return Err(VerificationError::Unsupported(format!(
                "tx header version {v}"
            )));
        }
    }
    hasher.update(key);
    hasher.update(value_hash);
    Ok(hasher.finalize().into())
}

/// The digest of a plain key/value as the client wrote or read it (`EntrySpecDigest_v0/v1`
/// over `database.EncodeEntrySpec(key, md, value)`).
pub fn kv_digest(
    version: u16,
    key: &[u8],
    metadata: Option<&proto::KvMetadata>,
    value: &[u8],
) -> Result<Digest, VerificationError> {
    entry_digest(
        version,
        &encode_key(key),
        &kv_metadata_bytes(metadata),
        &value_hash(value),
    )
}

/// The digest of an entry as listed in a `Tx` (key with its prefix, value hash, metadata).
pub fn tx_entry_digest(version: u16, entry: &proto::TxEntry) -> Result<Digest, VerificationError> {
    let h_value = digest(&entry.h_value, || "entry hValue".into())?;
    entry_digest(
        version,
        &entry.key,
        &kv_metadata_bytes(entry.metadata.as_ref()),
        &h_value,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_metadata_bytes_follow_attribute_order() {
        let md = proto::KvMetadata {
            deleted: true,
            expiration: Some(proto::Expiration { expires_at: 0x0102 }),
            non_indexable: true,
        };
        assert_eq!(
            kv_metadata_bytes(Some(&md)),
            vec![0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 2]
        );
        assert!(kv_metadata_bytes(Some(&proto::KvMetadata::default())).is_empty());
        assert!(kv_metadata_bytes(None).is_empty());
    }

    #[test]
    fn tx_metadata_bytes_follow_attribute_order() {
        let md = proto::TxMetadata {
            truncated_tx_id: 7,
            extra: b"ab".to_vec(),
        };
        assert_eq!(
            tx_metadata_bytes(Some(&md)).unwrap(),
            vec![0, 0, 0, 0, 0, 0, 0, 0, 7, 1, 0, 2, b'a', b'b']
        );
        let too_long = proto::TxMetadata {
            truncated_tx_id: 0,
            extra: vec![0; 257],
        };
        assert!(tx_metadata_bytes(Some(&too_long)).is_err());
    }

    #[test]
    fn entry_digest_versions_differ_and_v0_refuses_metadata() {
        let h = value_hash(b"v");
        let v0 = entry_digest(0, b"\0k", &[], &h).unwrap();
        let v1 = entry_digest(1, b"\0k", &[], &h).unwrap();
        assert_ne!(v0, v1);
        // v0 is sha256(key ‖ hValue).
        let mut plain = b"\0k".to_vec();
        plain.extend_from_slice(&h);
        assert_eq!(v0, sha256(&plain));
        // v1 is sha256(0 ‖ 0 ‖ 0 ‖ 2 ‖ key ‖ hValue) without metadata.
        let mut framed = vec![0, 0, 0, 2];
        framed.extend_from_slice(b"\0k");
        framed.extend_from_slice(&h);
        assert_eq!(v1, sha256(&framed));
        assert!(entry_digest(0, b"\0k", &[2], &h).is_err());
        assert!(entry_digest(2, b"\0k", &[], &h).is_err());
    }

    #[test]
    fn header_shape_is_checked() {
        let good = proto::TxHeader {
            id: 1,
            prev_alh: vec![0; 32],
            ts: 1,
            nentries: 1,
            eh: vec![1; 32],
            bl_tx_id: 0,
            bl_root: vec![0; 32],
            version: 1,
            metadata: None,
        };
        assert!(Header::from_proto(&good, "h").is_ok());
        let mut short = good.clone();
        short.eh.pop();
        assert!(matches!(
            Header::from_proto(&short, "h"),
            Err(VerificationError::Malformed(_))
        ));
        let mut v2 = good.clone();
        v2.version = 2;
        assert!(matches!(
            Header::from_proto(&v2, "h"),
            Err(VerificationError::Unsupported(_))
        ));
        let mut negative = good.clone();
        negative.nentries = -1;
        assert!(Header::from_proto(&negative, "h").is_err());
        let mut v0_md = good;
        v0_md.version = 0;
        v0_md.metadata = Some(proto::TxMetadata {
            truncated_tx_id: 1,
            extra: Vec::new(),
        });
        assert!(Header::from_proto(&v0_md, "h").is_err());
    }
}
