//! The client's trusted state (the last transaction it verified) and the server's ECDSA
//! P-256 signature over database states.
//!
//! immudb signs `schema.ImmutableState.ToBytes()` = len(db) as u32 ‖ db ‖ txId as u64 ‖
//! txHash (big-endian), hashed with SHA-256, as an ASN.1 DER `(r, s)` pair
//! (`pkg/signer/ecdsa.go`). The public key travels with the signature as an uncompressed SEC1
//! point, but a client must check against the key it was configured with
//! (`--server-signing-pub-key` in immudb's clients), never against the key the server sends.

use std::fmt;

use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use serde::{Deserialize, Serialize};

use super::error::VerificationError;
use super::tx::{Digest, digest};
use crate::immudb::proto;

/// What the client has verified so far of one database: its last verified transaction and
/// that transaction's Alh. Every later proof is checked against it, and each successful check
/// returns the next one. Persist it (it is serde-serialisable, hex in JSON) to carry trust
/// across restarts.
///
/// `tx_id == 0` means "nothing verified yet" ([`TrustedState::fresh`]): the first answer is
/// then accepted on first use (its internal consistency is checked, but nothing anchors it),
/// exactly as immudb's own SDKs do with an empty state. Anchor it out of band if that matters:
/// compare it with a state obtained elsewhere, or check the server's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedState {
    /// Database name as the server knows it (lower case).
    pub db: String,
    /// Last verified transaction; 0 when nothing is verified yet.
    pub tx_id: u64,
    /// Alh of `tx_id` (all zeros when `tx_id` is 0).
    #[serde(with = "hex_digest")]
    pub tx_hash: Digest,
    /// The server's signature over this state, when the server signs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<StateSignature>,
}

/// An immudb state signature as received (`schema.Signature`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSignature {
    /// The signer's public key as the server sent it, uncompressed SEC1. Informational only.
    #[serde(with = "hex_bytes")]
    pub public_key: Vec<u8>,
    /// ASN.1 DER ECDSA signature over SHA-256 of the state bytes.
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
}

impl From<&proto::Signature> for StateSignature {
    fn from(s: &proto::Signature) -> Self {
        StateSignature {
            public_key: s.public_key.clone(),
            signature: s.signature.clone(),
        }
    }
}

impl TrustedState {
    /// Nothing verified yet for `db`: the next verified call trusts the server's answer on
    /// first use.
    pub fn fresh(db: &str) -> Self {
        TrustedState {
            db: db.to_lowercase(),
            tx_id: 0,
            tx_hash: [0; 32],
            signature: None,
        }
    }

    /// True when nothing is verified yet.
    pub fn is_fresh(&self) -> bool {
        self.tx_id == 0
    }

    /// Takes a state from `CurrentState` as is. Unless its signature is then checked with
    /// [`verify_signature`](Self::verify_signature), this is trust on first use.
    pub fn from_proto(state: &proto::ImmutableState) -> Result<Self, VerificationError> {
        Ok(TrustedState {
            db: state.db.clone(),
            tx_id: state.tx_id,
            tx_hash: if state.tx_id == 0 && state.tx_hash.is_empty() {
                [0; 32]
            } else {
                digest(&state.tx_hash, || "state txHash".into())?
            },
            signature: state.signature.as_ref().map(StateSignature::from),
        })
    }

    /// The bytes immudb signs for this state (`ImmutableState.ToBytes`).
    pub fn signed_bytes(&self) -> Vec<u8> {
        state_bytes(&self.db, self.tx_id, &self.tx_hash)
    }

    /// Checks this state's signature against the server's configured public key.
    pub fn verify_signature(&self, key: &StateVerifyingKey) -> Result<(), VerificationError> {
        let signature = self
            .signature
            .as_ref()
            .ok_or_else(|| VerificationError::Signature("the state carries no signature".into()))?;
        key.verify(&self.signed_bytes(), &signature.signature)
    }
}

/// `ImmutableState.ToBytes`: u32 length of the database name ‖ name ‖ u64 tx id ‖ tx hash,
/// big-endian.
pub fn state_bytes(db: &str, tx_id: u64, tx_hash: &Digest) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(4 + db.len() + 8 + 32);
    bytes.extend_from_slice(&(db.len() as u32).to_be_bytes());
    bytes.extend_from_slice(db.as_bytes());
    bytes.extend_from_slice(&tx_id.to_be_bytes());
    bytes.extend_from_slice(tx_hash);
    bytes
}

/// The public half of the key immudb signs states with (`--signingKey` on the server).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StateVerifyingKey(VerifyingKey);

impl fmt::Debug for StateVerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let point = self.0.to_encoded_point(true);
        write!(f, "StateVerifyingKey({})", hex::encode(point.as_bytes()))
    }
}

impl StateVerifyingKey {
    /// From a PEM `PUBLIC KEY` (PKIX SubjectPublicKeyInfo), the format immudb's
    /// `--server-signing-pub-key` takes (`openssl ec -in key.pem -pubout`).
    pub fn from_public_key_pem(pem: &str) -> Result<Self, VerificationError> {
        VerifyingKey::from_public_key_pem(pem)
            .map(StateVerifyingKey)
            .map_err(|e| VerificationError::Signature(format!("not a P-256 public key PEM: {e}")))
    }

    /// From a SEC1 point (compressed or uncompressed, as in `Signature.publicKey`).
    pub fn from_sec1_bytes(bytes: &[u8]) -> Result<Self, VerificationError> {
        VerifyingKey::from_sec1_bytes(bytes)
            .map(StateVerifyingKey)
            .map_err(|e| VerificationError::Signature(format!("not a P-256 public key: {e}")))
    }

    /// Wraps a key already parsed.
    pub fn from_verifying_key(key: VerifyingKey) -> Self {
        StateVerifyingKey(key)
    }

    /// `signer.Verify`: `signature` is DER `(r, s)` over SHA-256 of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), VerificationError> {
        let signature = Signature::from_der(signature)
            .map_err(|e| VerificationError::Signature(format!("not a DER ECDSA signature: {e}")))?;
        self.0.verify(message, &signature).map_err(|_| {
            VerificationError::Signature("does not match the server's public key".into())
        })
    }
}

/// Checks the signature the server put on a state it returned (e.g. `VerifiableTx.signature`,
/// which signs the state at the proof's target tx).
pub fn verify_state_signature(
    key: &StateVerifyingKey,
    db: &str,
    tx_id: u64,
    tx_hash: &Digest,
    signature: Option<&proto::Signature>,
) -> Result<(), VerificationError> {
    let signature = signature.ok_or_else(|| {
        VerificationError::Signature(
            "the server sent no signature (is it started with --signingKey?)".into(),
        )
    })?;
    key.verify(&state_bytes(db, tx_id, tx_hash), &signature.signature)
}

mod hex_digest {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(digest: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(digest))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&text, &mut digest).map_err(D::Error::custom)?;
        Ok(digest)
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(&text).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer as _;

    use super::*;

    fn key(seed: u8) -> SigningKey {
        // Any scalar in range will do; avoids needing an OS RNG in unit tests.
        let mut bytes = [seed; 32];
        bytes[0] = 0x01;
        SigningKey::from_bytes(&bytes.into()).expect("valid scalar")
    }

    fn signed_state(signer: &SigningKey) -> TrustedState {
        let mut state = TrustedState {
            db: "auditdb".into(),
            tx_id: 57,
            tx_hash: [7; 32],
            signature: None,
        };
        // Sign the way immudb's signer does: ECDSA over SHA-256, DER-encoded.
        let signature: Signature = signer.sign(&state.signed_bytes());
        state.signature = Some(StateSignature {
            public_key: signer
                .verifying_key()
                .to_encoded_point(false)
                .as_bytes()
                .to_vec(),
            signature: signature.to_der().as_bytes().to_vec(),
        });
        state
    }

    #[test]
    fn state_bytes_layout() {
        let bytes = state_bytes("db", 0x0102, &[9; 32]);
        let mut expected = vec![0, 0, 0, 2, b'd', b'b', 0, 0, 0, 0, 0, 0, 1, 2];
        expected.extend_from_slice(&[9; 32]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn signature_verifies_with_the_right_key_only() {
        let signer = key(3);
        let state = signed_state(&signer);
        let good = StateVerifyingKey::from_verifying_key(*signer.verifying_key());
        state
            .verify_signature(&good)
            .expect("signed state verifies");

        let wrong = StateVerifyingKey::from_verifying_key(*key(4).verifying_key());
        assert!(matches!(
            state.verify_signature(&wrong),
            Err(VerificationError::Signature(_))
        ));

        let mut unsigned = state.clone();
        unsigned.signature = None;
        assert!(unsigned.verify_signature(&good).is_err());
    }

    #[test]
    fn any_flipped_byte_of_the_signed_state_or_signature_fails() {
        let signer = key(5);
        let state = signed_state(&signer);
        let good = StateVerifyingKey::from_verifying_key(*signer.verifying_key());

        // The database name, tx id and tx hash: every byte of what is signed.
        for i in 0..state.db.len() {
            let mut s = state.clone();
            let mut name = s.db.into_bytes();
            name[i] ^= 0x01;
            s.db = String::from_utf8(name).expect("ascii stays ascii");
            assert!(s.verify_signature(&good).is_err(), "db byte {i}");
        }
        for k in 0..8 {
            let mut s = state.clone();
            s.tx_id ^= 1 << (8 * k);
            assert!(s.verify_signature(&good).is_err(), "tx id byte {k}");
        }
        for i in 0..32 {
            let mut s = state.clone();
            s.tx_hash[i] ^= 0x01;
            assert!(s.verify_signature(&good).is_err(), "tx hash byte {i}");
        }
        let signature_len = state.signature.as_ref().map_or(0, |s| s.signature.len());
        for i in 0..signature_len {
            for mask in [0x01u8, 0x80] {
                let mut s = state.clone();
                if let Some(sig) = s.signature.as_mut() {
                    sig.signature[i] ^= mask;
                }
                assert!(
                    s.verify_signature(&good).is_err(),
                    "signature byte {i} ^ {mask:#x}"
                );
            }
        }
    }

    #[test]
    fn public_key_pem_round_trip() {
        use p256::pkcs8::{EncodePublicKey as _, LineEnding};
        let signer = key(6);
        let pem = signer
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("encode");
        let parsed = StateVerifyingKey::from_public_key_pem(&pem).expect("parse");
        assert_eq!(
            parsed,
            StateVerifyingKey::from_verifying_key(*signer.verifying_key())
        );
        assert!(StateVerifyingKey::from_public_key_pem("not a key").is_err());
    }

    #[test]
    fn trusted_state_serialises_as_hex() {
        let state = signed_state(&key(7));
        let json = serde_json::to_string(&state).expect("serialise");
        assert!(json.contains(&hex::encode([7u8; 32])));
        let back: TrustedState = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, state);
        let fresh: TrustedState = serde_json::from_str(
            r#"{"db":"x","tx_id":0,"tx_hash":"0000000000000000000000000000000000000000000000000000000000000000"}"#,
        )
        .expect("fresh state");
        assert!(fresh.is_fresh());
    }
}
