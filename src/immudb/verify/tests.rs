//! Proof shapes a live immudb v1.10 does not produce (header version 0, tx metadata, binary
//! linking that lags behind and so needs linear advance proofs), on synthetic chains built
//! with the test kit; plus the exact wording of the errors.

use super::testkit::{Chain, Flipper, for_each_flip};
use super::*;
use crate::immudb::{KeyValue, proto};

const N: u64 = 24;

fn normal_chain() -> Chain {
    Chain::build(N, 1, |id| id - 1, |_| None)
}

/// Binary linking lagging up to 4 txs behind, and tx metadata on two txs out of three.
fn lagging_chain() -> Chain {
    Chain::build(
        N,
        1,
        |id| (id - 1) / 5 * 5,
        |id| match id % 3 {
            0 => Some(proto::TxMetadata {
                truncated_tx_id: id / 2,
                extra: Vec::new(),
            }),
            1 => Some(proto::TxMetadata {
                truncated_tx_id: 0,
                extra: format!("extra-{id}").into_bytes(),
            }),
            _ => None,
        },
    )
}

fn v0_chain() -> Chain {
    Chain::build(N, 0, |id| id - 1, |_| None)
}

/// No binary linking at all: proofs are purely linear.
fn unlinked_chain() -> Chain {
    Chain::build(N, 1, |_| 0, |_| None)
}

fn chains() -> Vec<(&'static str, Chain)> {
    vec![
        ("normal", normal_chain()),
        ("lagging", lagging_chain()),
        ("v0", v0_chain()),
        ("unlinked", unlinked_chain()),
    ]
}

fn trusted(chain: &Chain, id: u64) -> TrustedState {
    TrustedState {
        db: "db".into(),
        tx_id: id,
        tx_hash: chain.alh(id),
        signature: None,
    }
}

#[derive(Clone, Debug)]
struct SetCase {
    kvs: Vec<KeyValue>,
    trusted: TrustedState,
    answer: proto::VerifiableTx,
}

impl SetCase {
    fn new(chain: &Chain, source: u64, target: u64) -> Self {
        SetCase {
            kvs: chain.kvs(target).to_vec(),
            trusted: if source == 0 {
                TrustedState::fresh("db")
            } else {
                trusted(chain, source)
            },
            answer: chain.verifiable_tx(target, source),
        }
    }

    fn verify(&self) -> Result<(proto::TxHeader, TrustedState), VerificationError> {
        let ctx = VerifyContext {
            db: "db",
            trusted: &self.trusted,
            server_key: None,
        };
        verify_set_answer(&ctx, &self.kvs, &self.answer)
    }

    fn walk(f: &mut Flipper, case: &mut SetCase) {
        for (i, kv) in case.kvs.iter_mut().enumerate() {
            f.bytes(&format!("kvs[{i}].key"), &mut kv.key);
            f.bytes(&format!("kvs[{i}].value"), &mut kv.value);
        }
        f.string("trusted.db", &mut case.trusted.db);
        if !case.trusted.is_fresh() {
            // A fresh state's hash is not used (trust on first use).
            f.u64("trusted.tx_id", &mut case.trusted.tx_id);
            f.bytes("trusted.tx_hash", &mut case.trusted.tx_hash);
        }
        if let Some(tx) = case.answer.tx.as_mut() {
            f.tx("answer.tx", tx, &|_| true);
        }
        if let Some(dual) = case.answer.dual_proof.as_mut() {
            f.dual("answer.dual_proof", dual);
        }
    }
}

#[test]
fn dual_proofs_verify_between_every_pair_of_transactions() {
    for (name, chain) in chains() {
        let mut advance_proofs = 0;
        for source in 1..=N {
            for target in source..=N {
                let proof = chain.dual_proof(source, target);
                advance_proofs += usize::from(proof.linear_advance_proof.is_some());
                verify_dual_proof(
                    &proof,
                    source,
                    target,
                    &chain.alh(source),
                    &chain.alh(target),
                )
                .unwrap_or_else(|e| panic!("{name} chain, {source} → {target}: {e}"));
            }
        }
        if name == "lagging" {
            assert!(
                advance_proofs > 50,
                "the lagging chain exercises linear advance proofs ({advance_proofs})"
            );
        } else {
            assert_eq!(advance_proofs, 0, "{name} chain");
        }
    }
}

#[test]
fn set_answers_verify_from_any_earlier_state_and_on_first_use() {
    for (name, chain) in chains() {
        for target in 1..=N {
            for source in 0..target {
                let case = SetCase::new(&chain, source, target);
                let (header, state) = case
                    .verify()
                    .unwrap_or_else(|e| panic!("{name} chain, {source} → {target}: {e}"));
                assert_eq!(header.id, target);
                assert_eq!(state.tx_id, target);
                assert_eq!(state.tx_hash, chain.alh(target));
            }
        }
    }
}

#[test]
fn flipping_any_byte_of_a_synthetic_set_answer_fails() {
    // (chain, source, target): a linear advance proof with metadata in both headers; a v0
    // chain; an unlinked chain; first use on the lagging chain.
    let lagging = lagging_chain();
    let cases = [
        ("lagging 9 → 21", SetCase::new(&lagging, 9, 21)),
        ("lagging 13 → 14", SetCase::new(&lagging, 13, 14)),
        ("lagging first use of 22", SetCase::new(&lagging, 0, 22)),
        ("v0 3 → 20", SetCase::new(&v0_chain(), 3, 20)),
        ("unlinked 5 → 11", SetCase::new(&unlinked_chain(), 5, 11)),
    ];
    let advance = cases[0]
        .1
        .answer
        .dual_proof
        .as_ref()
        .and_then(|d| d.linear_advance_proof.as_ref());
    assert!(
        advance.is_some_and(|a| a.inclusion_proofs.len() >= 2),
        "the first case carries a linear advance proof"
    );
    for (name, case) in cases {
        case.verify()
            .unwrap_or_else(|e| panic!("{name}: the unflipped case must verify: {e}"));
        let runs = for_each_flip(&case, &[0x01, 0xff], SetCase::walk, |path, mutated| {
            assert!(
                mutated.verify().is_err(),
                "{name}: flipping {path} went unnoticed"
            );
        });
        assert!(runs > 500, "{name}: only {runs} positions walked");
    }
}

#[test]
fn removing_or_adding_proof_terms_fails() {
    let chain = lagging_chain();
    let case = SetCase::new(&chain, 9, 21);
    type Edit = fn(&mut proto::DualProof);
    let edits: [(&str, Edit); 8] = [
        ("drop inclusion term", |d| {
            d.inclusion_proof.pop();
        }),
        ("extra inclusion term", |d| {
            d.inclusion_proof.push(vec![0; 32])
        }),
        ("drop consistency term", |d| {
            d.consistency_proof.pop();
        }),
        ("drop last inclusion term", |d| {
            d.last_inclusion_proof.pop();
        }),
        ("drop linear term", |d| {
            if let Some(l) = d.linear_proof.as_mut() {
                l.terms.pop();
            }
        }),
        ("no linear proof", |d| d.linear_proof = None),
        ("no linear advance proof", |d| d.linear_advance_proof = None),
        ("drop an advance inclusion proof", |d| {
            if let Some(a) = d.linear_advance_proof.as_mut() {
                a.inclusion_proofs.pop();
            }
        }),
    ];
    for (name, edit) in edits {
        let mut mutated = case.clone();
        if let Some(dual) = mutated.answer.dual_proof.as_mut() {
            edit(dual);
        }
        assert!(mutated.verify().is_err(), "{name} went unnoticed");
    }
}

#[test]
fn errors_name_the_failed_check() {
    let chain = normal_chain();

    let mut case = SetCase::new(&chain, 10, 17);
    if let Some(d) = case.answer.dual_proof.as_mut() {
        d.inclusion_proof[0][0] ^= 1;
    }
    assert_eq!(
        case.verify().map(|_| ()).unwrap_err().to_string(),
        "dual proof from tx 10 to tx 17: inclusion proof fails"
    );

    let mut case = SetCase::new(&chain, 10, 17);
    if let Some(d) = case.answer.dual_proof.as_mut() {
        d.consistency_proof[0][0] ^= 1;
    }
    assert_eq!(
        case.verify().map(|_| ()).unwrap_err().to_string(),
        "dual proof from tx 10 to tx 17: consistency proof fails"
    );

    // A tampered value in the batch: the server's record no longer matches what was written.
    let mut case = SetCase::new(&chain, 10, 19);
    case.kvs[3].value.push(b'!');
    assert_eq!(
        case.verify().map(|_| ()).unwrap_err().to_string(),
        "entry 3 of tx 19: value hash differs from the value"
    );

    // A server that rewrote an entry of its listing (and of the batch as we see it) but could
    // not recompute eH without breaking the header's Alh.
    let mut case = SetCase::new(&chain, 10, 19);
    if let Some(tx) = case.answer.tx.as_mut() {
        let forged = b"forged".to_vec();
        tx.entries[2].h_value = tx::value_hash(&forged).to_vec();
        tx.entries[2].v_len = forged.len() as i32 + 1;
    }
    case.kvs[2].value = b"forged".to_vec();
    assert_eq!(
        case.verify().map(|_| ()).unwrap_err().to_string(),
        "tx 19: the listed entries do not rebuild eH"
    );

    // Proving from a state the answer is older than.
    let case = SetCase::new(&chain, 0, 5);
    let ctx = VerifyContext {
        db: "db",
        trusted: &trusted(&chain, 9),
        server_key: None,
    };
    let err = verify_set_answer(&ctx, &case.kvs, &case.answer).map(|_| ());
    assert!(
        matches!(err, Err(VerificationError::TrustedState(_))),
        "{err:?}"
    );

    let sig = VerificationError::Signature("does not match the server's public key".into());
    assert_eq!(
        sig.to_string(),
        "state signature invalid: does not match the server's public key"
    );
}

#[test]
fn a_signature_is_required_once_a_server_key_is_configured() {
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::{Signature, SigningKey};

    let chain = normal_chain();
    let mut case = SetCase::new(&chain, 4, 8);
    let signer = SigningKey::from_bytes(&[0x11; 32].into()).expect("scalar");
    let key = StateVerifyingKey::from_verifying_key(*signer.verifying_key());
    let ctx = |trusted: &TrustedState| -> (TrustedState, Option<StateVerifyingKey>) {
        (trusted.clone(), Some(key))
    };
    let (trusted, server_key) = ctx(&case.trusted);
    let verify = |case: &SetCase| {
        let ctx = VerifyContext {
            db: "db",
            trusted: &trusted,
            server_key: server_key.as_ref(),
        };
        verify_set_answer(&ctx, &case.kvs, &case.answer)
    };
    assert!(matches!(
        verify(&case),
        Err(VerificationError::Signature(_))
    ));

    let signed: Signature = signer.sign(&state_bytes("db", 8, &chain.alh(8)));
    case.answer.signature = Some(proto::Signature {
        public_key: Vec::new(),
        signature: signed.to_der().as_bytes().to_vec(),
    });
    let (_, state) = verify(&case).expect("signed answer verifies");
    state
        .verify_signature(&key)
        .expect("the new state keeps its signature");

    for_each_flip(
        &case,
        &[0x01],
        |f, c| f.signature("answer.signature", &mut c.answer.signature),
        |path, mutated| assert!(verify(mutated).is_err(), "flipping {path} went unnoticed"),
    );
}

#[test]
fn hostile_ids_and_shapes_fail_without_panicking() {
    let chain = normal_chain();
    let base = SetCase::new(&chain, 3, 9);
    let extremes = [0u64, 1, u64::MAX - 1, u64::MAX];
    for &id in &extremes {
        for &other in &extremes {
            let mut case = base.clone();
            case.trusted.tx_id = id;
            if let Some(d) = case.answer.dual_proof.as_mut() {
                if let Some(h) = d.target_tx_header.as_mut() {
                    h.id = other;
                    h.bl_tx_id = id;
                }
                if let Some(l) = d.linear_proof.as_mut() {
                    l.source_tx_id = id;
                    l.target_tx_id = other;
                }
            }
            if let Some(h) = case.answer.tx.as_mut().and_then(|t| t.header.as_mut()) {
                h.id = other;
            }
            assert!(case.verify().is_err(), "ids {id}/{other}");
        }
    }
    // The linear and linear advance proofs alone, at the top of the id space.
    let terms = vec![vec![0u8; 32]; 2];
    let linear = proto::LinearProof {
        source_tx_id: u64::MAX - 1,
        target_tx_id: u64::MAX,
        terms,
    };
    assert!(
        !verify_linear_proof(&linear, u64::MAX - 1, u64::MAX, &[0; 32], &[1; 32]).expect("shape")
    );
    let advance = proto::LinearAdvanceProof {
        linear_proof_terms: vec![vec![0u8; 32]; 3],
        inclusion_proofs: vec![proto::InclusionProof::default(); 2],
    };
    assert!(
        !verify_linear_advance_proof(
            Some(&advance),
            u64::MAX - 3,
            u64::MAX,
            &[0; 32],
            &[0; 32],
            5
        )
        .expect("shape")
    );
    // Digests of the wrong size are malformed, not silently padded (Go's DigestFromProto pads).
    let mut case = base.clone();
    if let Some(d) = case.answer.dual_proof.as_mut() {
        d.inclusion_proof[0].pop();
    }
    assert!(matches!(
        case.verify(),
        Err(VerificationError::Malformed(_))
    ));
}
