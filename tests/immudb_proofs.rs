//! Tamper evidence: immudb's proofs checked by our own verifier.
//!
//! - Against the real local immudb (`deploy/local/stack.sh up`), each test in a database of its
//!   own: verified batch writes (100 and 1000 entries), trusted states that advance, verified
//!   reads of old keys, dual proofs spanning many transactions, failures that must be
//!   classified as verification failures; a second immudb started with `--signingKey` for
//!   signed states; and the cost of verification.
//! - Offline, against real answers captured once into `tests/fixtures/proofs/` (by
//!   `captures_real_proofs_into_a_temp_dir`, copied by hand): they verify, and flipping any
//!   single byte of any part of them (exhaustively, every position) makes verification fail.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use audit_consumer::immudb::proto;
use audit_consumer::immudb::verify::testkit::{Flipper, for_each_flip};
use audit_consumer::immudb::verify::{
    StateVerifyingKey, TrustedState, VerificationError, VerifyContext, verify_get_answer,
    verify_set_answer,
};
use audit_consumer::immudb::{ImmudbClient, ImmudbConnectOptions, ImmudbError, KeyValue};
use prost::Message as _;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

const STACK_HINT: &str = "start the local stack with `bash deploy/local/stack.sh up` \
                          (and `eval \"$(bash deploy/local/stack.sh env)\"`)";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// immudb database names: lower-case letters, digits and `_`.
fn fresh_database() -> String {
    format!("p{:016x}", rand::random::<u64>())
}

fn options(database: &str, port: u16, password: &str) -> ImmudbConnectOptions {
    ImmudbConnectOptions {
        host: env_or("IMMUDB_HOST", "127.0.0.1"),
        port,
        database: database.to_owned(),
        username: env_or("IMMUDB_USERNAME", "immudb"),
        password: SecretString::from(password.to_owned()),
        tls: None,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(60),
        create_database: true,
        sync_frequency: None,
    }
}

fn local_port() -> u16 {
    let port = env_or("IMMUDB_PORT", "13322");
    port.parse()
        .unwrap_or_else(|_| panic!("IMMUDB_PORT={port} is not a port"))
}

/// A client on a brand-new database of the local immudb. Fails (never skips) when immudb is
/// not there.
async fn fresh_client() -> ImmudbClient {
    let password = env_or("IMMUDB_PASSWORD", "immudb-local-admin");
    let opts = options(&fresh_database(), local_port(), &password);
    let address = format!("{}:{}", opts.host, opts.port);
    match ImmudbClient::connect(opts).await {
        Ok(client) => client,
        Err(e) => panic!("cannot use immudb at {address}: {e}; {STACK_HINT}"),
    }
}

/// `n` key/values of `value_len` bytes each, covering every byte value.
fn batch(prefix: &str, n: usize, value_len: usize) -> Vec<KeyValue> {
    (0..n)
        .map(|i| KeyValue {
            key: format!("audit:{prefix}:{i:05}").into_bytes(),
            value: (0..value_len)
                .map(|j| ((i * 131 + j * 7) % 256) as u8)
                .collect(),
        })
        .collect()
}

fn is_verification_failure(e: &ImmudbError) -> bool {
    matches!(e, ImmudbError::VerificationFailed { .. }) && !e.is_transient()
}

// ---- the real server -----------------------------------------------------------------------

#[tokio::test]
async fn batches_of_100_and_1000_verify_against_the_previous_state() {
    let client = fresh_client().await;
    let fresh = TrustedState::fresh(&client.database());

    // First use: nothing to prove from yet.
    let first = batch("first", 3, 40);
    let (h1, s1) = client
        .verify_set_batch(&first, true, &fresh)
        .await
        .expect("first batch verifies on first use");
    assert_eq!((h1.id, s1.tx_id), (1, 1));

    let hundred = batch("hundred", 100, 600);
    let (h2, s2) = client
        .verify_set_batch(&hundred, true, &s1)
        .await
        .expect("100-entry batch verifies against tx 1");
    assert_eq!(h2.nentries, 100);
    assert_eq!(s2.tx_id, h2.id);
    assert!(s2.tx_id > s1.tx_id);

    let thousand = batch("thousand", 1000, 600);
    let (h3, s3) = client
        .verify_set_batch(&thousand, true, &s2)
        .await
        .expect("1000-entry batch verifies against the 100-entry one");
    assert_eq!(h3.nentries, 1000);
    assert_eq!(s3.tx_id, h3.id);

    // The verified state is the server's state.
    let current = client.current_state().await.expect("current state");
    assert_eq!(current.tx_id, s3.tx_id);
    assert_eq!(current.tx_hash, s3.tx_hash.to_vec());

    // The batch really is stored byte for byte.
    let stored = client
        .get_all(&[thousand[999].key.clone()])
        .await
        .expect("get_all");
    assert_eq!(stored[0].value, thousand[999].value);
    client.close().await;
}

#[tokio::test]
async fn successive_batches_advance_the_trusted_state() {
    let client = fresh_client().await;
    let origin = client
        .verify_set_batch(
            &batch("origin", 2, 10),
            true,
            &TrustedState::fresh(&client.database()),
        )
        .await
        .expect("origin")
        .1;
    let mut trusted = origin.clone();
    for round in 0..8 {
        let kvs = batch(&format!("round{round}"), 50, 300);
        let (header, next) = client
            .verify_set_batch(&kvs, true, &trusted)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(next.tx_id, trusted.tx_id + 1, "one transaction per batch");
        assert_eq!(header.id, next.tx_id);
        assert_ne!(next.tx_hash, trusted.tx_hash);
        // The state round-trips through its serialised form (how a daemon would persist it).
        let json = serde_json::to_string(&next).expect("serialise");
        trusted = serde_json::from_str(&json).expect("deserialise");
    }
    // An older trusted state still proves the newest transaction (dual proof over 9 txs).
    let (header, latest) = client
        .verify_set_batch(&batch("late", 10, 30), true, &origin)
        .await
        .expect("verifies from the origin too");
    assert_eq!(latest.tx_id, header.id);
    assert_eq!(latest.tx_id, trusted.tx_id + 1);
    client.close().await;
}

#[tokio::test]
async fn verified_get_of_an_older_key_verifies_against_the_latest_state() {
    let client = fresh_client().await;
    let fresh = TrustedState::fresh(&client.database());
    let old = batch("old", 20, 500);
    let (old_header, after_old) = client
        .verify_set_batch(&old, true, &fresh)
        .await
        .expect("old batch");
    let mut latest = after_old.clone();
    for round in 0..5 {
        latest = client
            .verify_set_batch(&batch(&format!("later{round}"), 30, 200), true, &latest)
            .await
            .expect("later batch")
            .1;
    }

    // Reading an old key against the latest state: the proof goes from the key's tx to the
    // trusted one, and the trusted state stays where it is.
    let (entry, state) = client
        .verified_get(&old[7].key, None, &latest)
        .await
        .expect("verified get")
        .expect("the key exists");
    assert_eq!(entry.value, old[7].value);
    assert_eq!(entry.tx, old_header.id);
    assert_eq!(state, latest);

    // At a given tx, and from an older state: the state advances to the entry's tx.
    let (entry, state) = client
        .verified_get(&old[19].key, Some(old_header.id), &after_old)
        .await
        .expect("verified get at tx")
        .expect("the key exists");
    assert_eq!(entry.value, old[19].value);
    assert_eq!(state.tx_id, old_header.id);

    // Reading a newer key from an older state advances it.
    let newer_key = b"audit:later4:00003".to_vec();
    let (_, advanced) = client
        .verified_get(&newer_key, None, &after_old)
        .await
        .expect("verified get of a newer key")
        .expect("exists");
    assert_eq!(advanced.tx_id, latest.tx_id);
    assert_eq!(advanced.tx_hash, latest.tx_hash);

    // First use works too; a missing key is None (immudb cannot prove absence).
    assert!(
        client
            .verified_get(&old[0].key, None, &fresh)
            .await
            .expect("first-use get")
            .is_some()
    );
    assert!(
        client
            .verified_get(b"audit:nope:0", None, &latest)
            .await
            .expect("missing key")
            .is_none()
    );

    // A whole transaction, verified both ways.
    let (tx, state) = client
        .verified_tx_by_id(old_header.id, &latest)
        .await
        .expect("verified tx by id");
    assert_eq!(tx.entries.len(), 20);
    assert_eq!(state, latest);
    client.close().await;
}

#[tokio::test]
async fn a_batch_after_50_other_transactions_still_verifies() {
    let client = fresh_client().await;
    let (_, trusted) = client
        .verify_set_batch(
            &batch("anchor", 5, 100),
            true,
            &TrustedState::fresh(&client.database()),
        )
        .await
        .expect("anchor");
    // 50 transactions the verifier never sees.
    for i in 0..50 {
        client
            .set_all(&batch(&format!("unseen{i}"), 1 + i % 7, 64), true)
            .await
            .expect("unverified write");
    }
    let (header, state) = client
        .verify_set_batch(&batch("after", 1000, 400), true, &trusted)
        .await
        .expect("a dual proof spanning 51 transactions verifies");
    assert_eq!(header.id, trusted.tx_id + 51);
    assert_eq!(state.tx_id, header.id);

    // The raw answer has the expected shape: inclusion of the anchor in the target's tree,
    // consistency between the two trees, a short linear proof.
    let answer = client
        .verifiable_tx_by_id(header.id, trusted.tx_id)
        .await
        .expect("verifiable tx");
    let dual = answer.dual_proof.expect("dual proof");
    assert!(!dual.inclusion_proof.is_empty());
    assert!(!dual.last_inclusion_proof.is_empty());
    assert_eq!(dual.linear_proof.map(|l| l.terms.len()), Some(2));
    client.close().await;
}

#[tokio::test]
async fn wrong_trusted_states_and_missing_signatures_are_verification_failures() {
    let client = fresh_client().await;
    let db = client.database();
    let (_, trusted) = client
        .verify_set_batch(&batch("a", 3, 10), true, &TrustedState::fresh(&db))
        .await
        .expect("first");
    client
        .set_all(&batch("b", 3, 10), true)
        .await
        .expect("second");

    // A trusted hash that is not the server's history: a forked or rewritten log.
    let mut forged = trusted.clone();
    forged.tx_hash[0] ^= 1;
    let err = client
        .verify_set_batch(&batch("c", 3, 10), true, &forged)
        .await
        .expect_err("a forged trusted state cannot be extended");
    assert!(is_verification_failure(&err), "{err}");
    assert!(
        err.to_string().contains("source header does not hash"),
        "{err}"
    );
    let err = client
        .verified_get(b"audit:a:00000", None, &forged)
        .await
        .expect_err("reads are checked against the forged state too");
    assert!(is_verification_failure(&err), "{err}");

    // A trusted state the server does not reach: history was rolled back (nothing written).
    let mut ahead = trusted.clone();
    ahead.tx_id += 1000;
    let err = client
        .verify_set_batch(&batch("d", 3, 10), true, &ahead)
        .await
        .expect_err("the server is behind the trusted state");
    assert!(is_verification_failure(&err), "{err}");
    assert!(err.to_string().contains("trusted tx"), "{err}");

    // Another database's state.
    let err = client
        .verify_set_batch(
            &batch("e", 3, 10),
            true,
            &TrustedState::fresh("someotherdb"),
        )
        .await
        .expect_err("wrong database");
    assert!(is_verification_failure(&err), "{err}");

    // A server key is configured but this server does not sign.
    let key = StateVerifyingKey::from_verifying_key(*signing_key().verifying_key());
    let strict = client.clone().with_server_signing_key(key);
    let err = strict
        .verify_set_batch(&batch("f", 3, 10), true, &trusted)
        .await
        .expect_err("unsigned state");
    assert!(is_verification_failure(&err), "{err}");
    assert!(err.to_string().contains("state signature invalid"), "{err}");

    // Precondition failures keep their own class.
    let err = client
        .verify_set_batch(&batch("a", 3, 10), true, &trusted)
        .await
        .expect_err("keys exist");
    assert!(
        matches!(err, ImmudbError::PreconditionFailed { .. }),
        "{err}"
    );
    client.close().await;
}

// ---- fixtures ------------------------------------------------------------------------------

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proofs")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct HexKv {
    key: String,
    value: String,
}

/// A captured `VerifiableSet` answer with what is needed to verify it offline.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SetFixture {
    description: String,
    immudb_version: String,
    db: String,
    kvs: Vec<HexKv>,
    trusted: TrustedState,
    /// The server's state-signing public key (PEM) when the answer is signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server_public_key_pem: Option<String>,
    /// `VerifiableTx`, protobuf bytes, hex.
    answer: String,
    expected: TrustedState,
}

/// A captured `VerifiableGet` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct GetFixture {
    description: String,
    immudb_version: String,
    db: String,
    key: String,
    at_tx: Option<u64>,
    trusted: TrustedState,
    /// `VerifiableEntry`, protobuf bytes, hex.
    answer: String,
    expected_value: String,
    expected: TrustedState,
}

fn hex_kvs(kvs: &[KeyValue]) -> Vec<HexKv> {
    kvs.iter()
        .map(|kv| HexKv {
            key: hex::encode(&kv.key),
            value: hex::encode(&kv.value),
        })
        .collect()
}

/// A set answer with its inputs, the unit the byte-flip loop walks.
#[derive(Clone, Debug)]
struct SetCase {
    db: String,
    kvs: Vec<KeyValue>,
    trusted: TrustedState,
    key: Option<StateVerifyingKey>,
    answer: proto::VerifiableTx,
}

impl SetCase {
    fn load(name: &str) -> (SetCase, TrustedState) {
        load_set_from(&fixture_dir().join(name))
    }

    fn verify(&self) -> Result<(proto::TxHeader, TrustedState), VerificationError> {
        let ctx = VerifyContext {
            db: &self.db,
            trusted: &self.trusted,
            server_key: self.key.as_ref(),
        };
        verify_set_answer(&ctx, &self.kvs, &self.answer)
    }

    /// Every byte of every part: the written keys and values, the trusted state, the tx
    /// header and entries, every part of the dual proof and the signature (when a key is
    /// configured). Not walked, because nothing covers them: a fresh trusted state's hash
    /// (not used on first use), `kv_entries`/`z_entries` (empty in a VerifiableSet answer),
    /// the signature's `public_key` (the configured key is used, never the sent one), and
    /// `target_bl_tx_alh` when the target's blTxID is 0 (see `Flipper::dual`).
    fn walk(f: &mut Flipper, case: &mut SetCase) {
        for (i, kv) in case.kvs.iter_mut().enumerate() {
            f.bytes(&format!("kvs[{i}].key"), &mut kv.key);
            f.bytes(&format!("kvs[{i}].value"), &mut kv.value);
        }
        f.string("db", &mut case.db);
        if !case.trusted.is_fresh() {
            f.u64("trusted.tx_id", &mut case.trusted.tx_id);
            f.bytes("trusted.tx_hash", &mut case.trusted.tx_hash);
        }
        if let Some(tx) = case.answer.tx.as_mut() {
            f.tx("answer.tx", tx, &|_| true);
        }
        if let Some(dual) = case.answer.dual_proof.as_mut() {
            f.dual("answer.dual_proof", dual);
        }
        if case.key.is_some() {
            f.signature("answer.signature", &mut case.answer.signature);
        }
    }
}

/// A get answer with its inputs.
#[derive(Clone, Debug)]
struct GetCase {
    db: String,
    key: Vec<u8>,
    at_tx: Option<u64>,
    trusted: TrustedState,
    answer: proto::VerifiableEntry,
}

impl GetCase {
    fn load(name: &str) -> (GetCase, Vec<u8>, TrustedState) {
        let path = fixture_dir().join(name);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let f: GetFixture = serde_json::from_str(&text).expect("get fixture");
        let answer =
            proto::VerifiableEntry::decode(hex::decode(&f.answer).expect("hex answer").as_slice())
                .expect("VerifiableEntry");
        (
            GetCase {
                db: f.db,
                key: hex::decode(&f.key).expect("hex key"),
                at_tx: f.at_tx,
                trusted: f.trusted,
                answer,
            },
            hex::decode(&f.expected_value).expect("hex value"),
            f.expected,
        )
    }

    fn verify(&self) -> Result<(proto::Entry, TrustedState), VerificationError> {
        let ctx = VerifyContext {
            db: &self.db,
            trusted: &self.trusted,
            server_key: None,
        };
        verify_get_answer(&ctx, &self.key, self.at_tx, &self.answer)
    }

    /// Every byte of every part, except what no proof covers: `entry.revision` and
    /// `entry.expired` (index bookkeeping, not hashed by immudb), the `v_len` of the *other*
    /// entries listed with the transaction (not hashed, and their values are unknown to the
    /// reader), and the unsigned answer's `signature` (absent).
    fn walk(f: &mut Flipper, case: &mut GetCase) {
        f.bytes("key", &mut case.key);
        if let Some(at_tx) = case.at_tx.as_mut() {
            f.u64("at_tx", at_tx);
        }
        f.string("db", &mut case.db);
        f.u64("trusted.tx_id", &mut case.trusted.tx_id);
        f.bytes("trusted.tx_hash", &mut case.trusted.tx_hash);
        let leaf = case
            .answer
            .inclusion_proof
            .as_ref()
            .map_or(usize::MAX, |p| p.leaf as usize);
        if let Some(entry) = case.answer.entry.as_mut() {
            f.u64("entry.tx", &mut entry.tx);
            f.bytes("entry.key", &mut entry.key);
            f.bytes("entry.value", &mut entry.value);
            f.kv_metadata("entry.metadata", &mut entry.metadata);
        }
        if let Some(vtx) = case.answer.verifiable_tx.as_mut() {
            if let Some(tx) = vtx.tx.as_mut() {
                f.tx("answer.verifiable_tx.tx", tx, &|i| i == leaf);
            }
            if let Some(dual) = vtx.dual_proof.as_mut() {
                f.dual("answer.verifiable_tx.dual_proof", dual);
            }
        }
        if let Some(proof) = case.answer.inclusion_proof.as_mut() {
            f.inclusion("answer.inclusion_proof", proof);
        }
    }
}

const SET_FIXTURE: &str = "set_5_kvs_from_tx4.json";
const GET_OLDER_FIXTURE: &str = "get_entry_older_than_trusted.json";
const GET_NEWER_FIXTURE: &str = "get_entry_newer_than_trusted.json";
const SIGNED_SET_FIXTURE: &str = "set_signed.json";

/// Captures real answers into a temp dir (printed), after checking they verify offline
/// exactly as the fixture tests will load them. The committed fixtures were copied from such
/// a run by hand; this test never writes into the source tree.
#[tokio::test]
async fn captures_real_proofs_into_a_temp_dir() {
    let client = fresh_client().await;
    let db = client.database();
    let mut written: Vec<Vec<KeyValue>> = Vec::new();
    for i in 0..11 {
        let kvs = batch(&format!("tx{}", i + 1), 1 + i % 3, 24 + i);
        client.set_all(&kvs, true).await.expect("history");
        written.push(kvs);
    }
    let (_, at4) = client
        .verified_tx_by_id(4, &TrustedState::fresh(&db))
        .await
        .expect("state at tx 4");

    // A batch of 5 proven from tx 4: inclusion of tx 4 in tx 12's tree, consistency of tx 4's
    // tree (3 leaves) with tx 12's (11 leaves), last inclusion of tx 11, linear proof 11 → 12.
    let kvs = batch("captured", 5, 48);
    let answer = client
        .verifiable_set_all(&kvs, true, at4.tx_id)
        .await
        .expect("verifiable set");
    let ctx = VerifyContext {
        db: &db,
        trusted: &at4,
        server_key: None,
    };
    let (header, at12) = verify_set_answer(&ctx, &kvs, &answer).expect("captured set verifies");
    assert_eq!(header.id, 12);
    let set_fixture = SetFixture {
        description: "VerifiableSet of 5 key/values (tx 12) proven from trusted tx 4, after 11 \
                      single-client transactions of 1-3 entries"
            .into(),
        immudb_version: "v1.10.0".into(),
        db: db.clone(),
        kvs: hex_kvs(&kvs),
        trusted: at4.clone(),
        server_public_key_pem: None,
        answer: hex::encode(answer.encode_to_vec()),
        expected: at12.clone(),
    };

    // An entry of tx 2 read against trusted tx 12 (the entry's tx is the proof's source), at
    // an explicit tx.
    let old_key = written[1][1].key.clone();
    let older = client
        .verifiable_get(&old_key, Some(2), at12.tx_id)
        .await
        .expect("verifiable get")
        .expect("exists");
    let ctx = VerifyContext {
        db: &db,
        trusted: &at12,
        server_key: None,
    };
    let (entry, state) =
        verify_get_answer(&ctx, &old_key, Some(2), &older).expect("older get verifies");
    assert_eq!(state, at12);
    let get_older = GetFixture {
        description: "VerifiableGet of a key written by tx 2, at tx 2, proven against trusted \
                      tx 12"
            .into(),
        immudb_version: "v1.10.0".into(),
        db: db.clone(),
        key: hex::encode(&old_key),
        at_tx: Some(2),
        trusted: at12.clone(),
        answer: hex::encode(older.encode_to_vec()),
        expected_value: hex::encode(&entry.value),
        expected: state,
    };

    // An entry of tx 12 read against trusted tx 4 (the entry's tx is the proof's target).
    let new_key = kvs[3].key.clone();
    let newer = client
        .verifiable_get(&new_key, None, at4.tx_id)
        .await
        .expect("verifiable get")
        .expect("exists");
    let ctx = VerifyContext {
        db: &db,
        trusted: &at4,
        server_key: None,
    };
    let (entry, state) =
        verify_get_answer(&ctx, &new_key, None, &newer).expect("newer get verifies");
    assert_eq!(state, at12);
    let get_newer = GetFixture {
        description: "VerifiableGet of a key written by tx 12 (latest value), proven against \
                      trusted tx 4"
            .into(),
        immudb_version: "v1.10.0".into(),
        db: db.clone(),
        key: hex::encode(&new_key),
        at_tx: None,
        trusted: at4,
        answer: hex::encode(newer.encode_to_vec()),
        expected_value: hex::encode(&entry.value),
        expected: state,
    };

    let dir = std::env::temp_dir().join("audit-consumer-proof-capture");
    fs::create_dir_all(&dir).expect("capture dir");
    for (name, json) in [
        (SET_FIXTURE, serde_json::to_string_pretty(&set_fixture)),
        (GET_OLDER_FIXTURE, serde_json::to_string_pretty(&get_older)),
        (GET_NEWER_FIXTURE, serde_json::to_string_pretty(&get_newer)),
    ] {
        let path = dir.join(name);
        fs::write(&path, json.expect("json") + "\n").expect("write capture");
        println!("captured {}", path.display());
    }
    // What is written loads and verifies exactly like the committed fixtures.
    let (case, expected) = load_set_from(&dir.join(SET_FIXTURE));
    assert_eq!(case.verify().expect("reloaded").1, expected);
    client.close().await;
}

fn load_set_from(path: &Path) -> (SetCase, TrustedState) {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let f: SetFixture = serde_json::from_str(&text).expect("parse");
    let answer = proto::VerifiableTx::decode(hex::decode(&f.answer).expect("hex").as_slice())
        .expect("decode");
    let kvs = f
        .kvs
        .iter()
        .map(|kv| KeyValue {
            key: hex::decode(&kv.key).expect("hex"),
            value: hex::decode(&kv.value).expect("hex"),
        })
        .collect();
    let key = f
        .server_public_key_pem
        .as_deref()
        .map(|pem| StateVerifyingKey::from_public_key_pem(pem).expect("key"));
    (
        SetCase {
            db: f.db,
            kvs,
            trusted: f.trusted,
            key,
            answer,
        },
        f.expected,
    )
}

#[test]
fn captured_proofs_verify_offline() {
    for name in [SET_FIXTURE, SIGNED_SET_FIXTURE] {
        let (case, expected) = SetCase::load(name);
        let (header, state) = case.verify().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(state, expected, "{name}");
        assert_eq!(header.id, expected.tx_id, "{name}");
    }
    for name in [GET_OLDER_FIXTURE, GET_NEWER_FIXTURE] {
        let (case, value, expected) = GetCase::load(name);
        let (entry, state) = case.verify().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(entry.value, value, "{name}");
        assert_eq!(state, expected, "{name}");
    }
}

#[test]
fn flipping_any_byte_of_a_captured_set_proof_fails() {
    for name in [SET_FIXTURE, SIGNED_SET_FIXTURE] {
        let (case, _) = SetCase::load(name);
        let runs = for_each_flip(&case, &[0x01, 0xff], SetCase::walk, |path, mutated| {
            if let Ok((header, _)) = mutated.verify() {
                panic!("{name}: flipping {path} went unnoticed (tx {})", header.id);
            }
        });
        println!("{name}: {runs} single-byte flips, all refused");
        assert!(runs > 1000, "{name}: only {runs} positions");
    }
}

#[test]
fn flipping_any_byte_of_captured_get_proofs_fails() {
    for name in [GET_OLDER_FIXTURE, GET_NEWER_FIXTURE] {
        let (case, _, _) = GetCase::load(name);
        let runs = for_each_flip(&case, &[0x01, 0xff], GetCase::walk, |path, mutated| {
            if mutated.verify().is_ok() {
                panic!("{name}: flipping {path} went unnoticed");
            }
        });
        println!("{name}: {runs} single-byte flips, all refused");
        assert!(runs > 1000, "{name}: only {runs} positions");
    }
}

#[test]
fn errors_on_captured_proofs_name_the_failed_check() {
    let (case, _, _) = GetCase::load(GET_NEWER_FIXTURE);
    let mut tampered = case.clone();
    if let Some(p) = tampered.answer.inclusion_proof.as_mut() {
        p.terms[0][5] ^= 0x20;
    }
    let leaf = case.answer.inclusion_proof.as_ref().map_or(0, |p| p.leaf);
    let err = tampered.verify().map(|_| ()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("entry {leaf} of tx 12: inclusion proof does not lead to eH")
    );

    let (case, _) = SetCase::load(SET_FIXTURE);
    let mut tampered = case.clone();
    if let Some(d) = tampered.answer.dual_proof.as_mut() {
        d.consistency_proof[0][0] ^= 1;
    }
    assert_eq!(
        tampered.verify().map(|_| ()).unwrap_err().to_string(),
        "dual proof from tx 4 to tx 12: consistency proof fails"
    );
    let mut tampered = case;
    tampered.kvs[2].value[0] ^= 1;
    assert!(matches!(
        tampered.verify(),
        Err(VerificationError::Entry { tx: 12, .. })
    ));
}

// ---- a server that signs its states --------------------------------------------------------

fn signing_key() -> p256::ecdsa::SigningKey {
    loop {
        // rand's bytes, since p256 here has no OS RNG feature; retry the rare out-of-range.
        if let Ok(key) = p256::ecdsa::SigningKey::from_bytes(&rand::random::<[u8; 32]>().into()) {
            return key;
        }
    }
}

/// The private key as the SEC1 `EC PRIVATE KEY` PEM immudb's `--signingKey` reads (Go's
/// `x509.ParseECPrivateKey`), which insists on the optional named-curve parameter that
/// RustCrypto's `to_sec1_pem` leaves out ("x509: unknown elliptic curve"). RFC 5915:
/// SEQUENCE { version 1, OCTET STRING d, [0] OID prime256v1, [1] BIT STRING public point }.
fn sec1_pem_with_curve(key: &p256::ecdsa::SigningKey) -> String {
    use p256::pkcs8::LineEnding;
    use p256::pkcs8::der::pem;

    const PRIME256V1: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let point = key.verifying_key().to_encoded_point(false);
    let mut body = vec![0x02, 0x01, 0x01, 0x04, 0x20];
    body.extend_from_slice(&key.to_bytes());
    body.extend_from_slice(&[0xa0, PRIME256V1.len() as u8]);
    body.extend_from_slice(&PRIME256V1);
    body.extend_from_slice(&[0xa1, 0x44, 0x03, 0x42, 0x00]);
    body.extend_from_slice(point.as_bytes());
    let mut der = vec![0x30, body.len() as u8];
    der.extend_from_slice(&body);
    pem::encode_string("EC PRIVATE KEY", LineEnding::LF, &der).expect("pem")
}

/// The immudb binary `deploy/local/stack.sh` built (same version and cache as the stack).
fn immudb_binary() -> PathBuf {
    if let Ok(path) = std::env::var("AUDIT_IMMUDB_BIN") {
        return PathBuf::from(path);
    }
    let go_mod = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local/immudb/go.mod");
    let text = fs::read_to_string(&go_mod).expect("deploy/local/immudb/go.mod");
    let version = text
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("require"), Some("github.com/codenotary/immudb"), Some(v)) => {
                    Some(v.to_owned())
                }
                _ => None,
            }
        })
        .expect("immudb version in go.mod");
    let cache = std::env::var("AUDIT_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/audit-consumer")
        });
    let path = cache.join(format!("immudb-{version}")).join("immudb");
    assert!(
        path.is_file(),
        "{} not found; {STACK_HINT} (it builds the binary)",
        path.display()
    );
    path
}

/// A second immudb on a free port with its own data dir and a signing key; killed and removed
/// when dropped (also when the test panics).
struct SigningServer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

const SIGNING_SERVER_PASSWORD: &str = "signed-immudb-test";

impl SigningServer {
    fn start(key_pem: &str) -> SigningServer {
        let dir = std::env::temp_dir().join(format!(
            "audit-consumer-signed-immudb-{:08x}",
            rand::random::<u32>()
        ));
        fs::create_dir_all(dir.join("data")).expect("server dir");
        let key_path = dir.join("signing-key.pem");
        fs::write(&key_path, key_pem).expect("write key");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = fs::File::create(dir.join("immudb.log")).expect("log file");
        let child = Command::new(immudb_binary())
            .current_dir(&dir)
            .args(["--dir", &dir.join("data").to_string_lossy()])
            .args(["--address", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--pgsql-server=false",
                "--metrics-server=false",
                "--web-server=false",
            ])
            .args([
                "--admin-password",
                SIGNING_SERVER_PASSWORD,
                "--force-admin-password",
            ])
            .args(["--signingKey", &key_path.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start immudb");
        SigningServer { child, dir, port }
    }

    async fn client(&self) -> ImmudbClient {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let opts = options(&fresh_database(), self.port, SIGNING_SERVER_PASSWORD);
            match ImmudbClient::connect(opts).await {
                Ok(client) => return client,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(%e, "signing immudb not ready yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    let log = fs::read_to_string(self.dir.join("immudb.log")).unwrap_or_default();
                    panic!("signing immudb did not come up: {e}\n{log}");
                }
            }
        }
    }
}

impl Drop for SigningServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_signing_server_s_states_verify_with_its_key_only() {
    use p256::pkcs8::{EncodePublicKey as _, LineEnding};

    let signing = signing_key();
    let key_pem = sec1_pem_with_curve(&signing);
    let public_pem = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("public pem");
    let key = StateVerifyingKey::from_public_key_pem(&public_pem).expect("key");
    let wrong = StateVerifyingKey::from_verifying_key(*signing_key().verifying_key());

    let server = SigningServer::start(&key_pem);
    let client = server.client().await.with_server_signing_key(key);
    let db = client.database();

    // CurrentState is signed by the server: check it the way immudb's clients do.
    let current = TrustedState::from_proto(&client.current_state().await.expect("state"))
        .expect("state shape");
    current
        .verify_signature(&key)
        .expect("CurrentState signature");
    assert!(current.verify_signature(&wrong).is_err());

    let (_, s1) = client
        .verify_set_batch(&batch("signed1", 10, 100), true, &TrustedState::fresh(&db))
        .await
        .expect("signed first batch");
    s1.verify_signature(&key)
        .expect("new state carries a valid signature");
    let kvs = batch("signed2", 200, 300);
    let answer = client
        .verifiable_set_all(&kvs, true, s1.tx_id)
        .await
        .expect("signed verifiable set");
    let ctx = VerifyContext {
        db: &db,
        trusted: &s1,
        server_key: Some(&key),
    };
    let (_, s2) = verify_set_answer(&ctx, &kvs, &answer).expect("signed answer verifies");
    s2.verify_signature(&key).expect("signed state");
    let (entry, s3) = client
        .verified_get(&kvs[5].key, None, &s2)
        .await
        .expect("signed get")
        .expect("exists");
    assert_eq!(entry.value, kvs[5].value);
    assert_eq!(s3.tx_id, s2.tx_id);

    // The wrong key refuses the same server's answers.
    let impostor = client.clone().with_server_signing_key(wrong);
    let err = impostor
        .verify_set_batch(&batch("signed3", 3, 10), true, &s2)
        .await
        .expect_err("wrong key");
    assert!(is_verification_failure(&err), "{err}");
    assert!(err.to_string().contains("state signature invalid"), "{err}");
    let ctx = VerifyContext {
        db: &db,
        trusted: &s1,
        server_key: Some(&wrong),
    };
    assert!(matches!(
        verify_set_answer(&ctx, &kvs, &answer),
        Err(VerificationError::Signature(_))
    ));

    // Capture: a small signed answer with the public key, for the offline tests.
    let small = batch("signedcapture", 3, 32);
    let signed_answer = client
        .verifiable_set_all(&small, true, s2.tx_id)
        .await
        .expect("signed capture");
    let ctx = VerifyContext {
        db: &db,
        trusted: &s2,
        server_key: Some(&key),
    };
    let (_, expected) = verify_set_answer(&ctx, &small, &signed_answer).expect("verifies");
    let fixture = SetFixture {
        description: "VerifiableSet of 3 key/values from an immudb started with --signingKey \
                      (a key generated by the test), proven from the previous signed state"
            .into(),
        immudb_version: "v1.10.0".into(),
        db: db.clone(),
        kvs: hex_kvs(&small),
        trusted: s2,
        server_public_key_pem: Some(public_pem),
        answer: hex::encode(signed_answer.encode_to_vec()),
        expected,
    };
    let dir = std::env::temp_dir().join("audit-consumer-proof-capture");
    fs::create_dir_all(&dir).expect("capture dir");
    let path = dir.join(SIGNED_SET_FIXTURE);
    fs::write(
        &path,
        serde_json::to_string_pretty(&fixture).expect("json") + "\n",
    )
    .expect("write");
    println!("captured {}", path.display());

    client.close().await;
    drop(server);
}

// ---- cost --------------------------------------------------------------------------------

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// 20 batches of 1000 entries written with `set_all` and, interleaved, 20 written and
/// verified (`verifiable_set_all` + local verification = `verify_set_batch`). Prints the
/// figures; asserts only correctness. Meaningful in a release build:
/// `cargo test --release --test immudb_proofs verification_cost -- --nocapture`.
#[tokio::test]
async fn verification_cost_of_1000_entry_batches() {
    const BATCHES: usize = 20;
    const ENTRIES: usize = 1000;
    let client = fresh_client().await;
    let db = client.database();
    let mut trusted = TrustedState::fresh(&db);
    // Warm-up, and the first-use anchor.
    client
        .set_all(&batch("warm", ENTRIES, 600), true)
        .await
        .expect("warm-up");
    trusted = client
        .verify_set_batch(&batch("warmv", ENTRIES, 600), true, &trusted)
        .await
        .expect("warm-up verified")
        .1;

    let (mut plain, mut rpc, mut local) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for i in 0..BATCHES {
        let kvs = batch(&format!("plain{i}"), ENTRIES, 600);
        let start = Instant::now();
        let header = client.set_all(&kvs, true).await.expect("set_all");
        plain += start.elapsed();
        assert_eq!(header.nentries as usize, ENTRIES);

        let kvs = batch(&format!("verified{i}"), ENTRIES, 600);
        let start = Instant::now();
        let answer = client
            .verifiable_set_all(&kvs, true, trusted.tx_id)
            .await
            .expect("verifiable_set_all");
        rpc += start.elapsed();
        let start = Instant::now();
        let ctx = VerifyContext {
            db: &db,
            trusted: &trusted,
            server_key: None,
        };
        let (header, next) = verify_set_answer(&ctx, &kvs, &answer).expect("verifies");
        local += start.elapsed();
        assert_eq!(header.nentries as usize, ENTRIES);
        assert_eq!(next.tx_id, header.id);
        trusted = next;
    }
    let per = |d: Duration| millis(d) / BATCHES as f64;
    let rate = |d: Duration| (BATCHES * ENTRIES) as f64 / d.as_secs_f64();
    println!(
        "{BATCHES} batches x {ENTRIES} entries (600-byte values), {} build:",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "  set_all                       {:7.1} ms/batch  {:9.0} events/s",
        per(plain),
        rate(plain)
    );
    println!(
        "  verify_set_batch              {:7.1} ms/batch  {:9.0} events/s",
        per(rpc + local),
        rate(rpc + local)
    );
    println!("    of which VerifiableSet RPC  {:7.1} ms/batch", per(rpc));
    println!(
        "    of which local verification {:7.2} ms/batch",
        per(local)
    );
    client.close().await;
}

/// The daemon checks a signing server's states with the configured public key: the right key
/// starts it, a wrong one is refused at start-up with a message that says so.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_refuses_a_signing_server_whose_key_is_not_the_configured_one() {
    use p256::pkcs8::{EncodePublicKey as _, LineEnding};

    let signing = signing_key();
    let server = SigningServer::start(&sec1_pem_with_curve(&signing));
    let _ready = server.client().await;
    let world = common::World::new(&["signed.v1"], 1).await;
    let dir = std::env::temp_dir().join(common::unique("signing-keys-"));
    fs::create_dir_all(&dir).expect("dir");
    let right = dir.join("right.pem");
    let wrong = dir.join("wrong.pem");
    let pem = |key: &p256::ecdsa::SigningKey| {
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem")
    };
    fs::write(&right, pem(&signing)).expect("write");
    fs::write(&wrong, pem(&signing_key())).expect("write");
    let overrides = |key: &Path| {
        std::collections::BTreeMap::from([
            ("IMMUDB_PORT", server.port.to_string()),
            ("IMMUDB_PASSWORD", SIGNING_SERVER_PASSWORD.to_owned()),
            (
                "IMMUDB_SERVER_SIGNING_KEY",
                key.to_string_lossy().into_owned(),
            ),
        ])
    };

    let mut refused = world.start_daemon("wrong-key", &overrides(&wrong));
    common::wait_until(
        "the daemon to refuse the server",
        Duration::from_secs(60),
        || {
            let running = refused.is_running();
            async move { (!running).then_some(()) }
        },
    )
    .await;
    let log = fs::read_to_string(&refused.log).expect("log");
    assert!(
        log.contains("tamper or rollback suspected") && log.contains("signature"),
        "{log}"
    );

    let accepted = world.start_daemon("right-key", &overrides(&right));
    let addr = accepted.http_addr().await;
    common::wait_until(
        "/ready with the right key",
        Duration::from_secs(60),
        || async { matches!(common::http_get(addr, "/ready").await, Ok((200, _))).then_some(()) },
    )
    .await;
    assert!(accepted.terminate(Duration::from_secs(30)).await.success());
    fs::remove_dir_all(&dir).ok();
}
