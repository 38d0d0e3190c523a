//! The immudb client against the real local immudb (`deploy/local/stack.sh up`); no mocks.
//! Each test works in a database of its own, created through the client.

use std::time::Duration;

use audit_consumer::immudb::{ImmudbClient, ImmudbConnectOptions, ImmudbError, KeyValue};
use secrecy::SecretString;

const STACK_HINT: &str = "start the local stack with `bash deploy/local/stack.sh up` \
                          (and `eval \"$(bash deploy/local/stack.sh env)\"`)";

fn init_tracing() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("info")
            .try_init();
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// immudb database names: lower-case letters, digits and `_`, at most 128 characters.
fn fresh_database() -> String {
    format!("t{:016x}", rand::random::<u64>())
}

fn options(database: &str, password: SecretString) -> ImmudbConnectOptions {
    let port = env_or("IMMUDB_PORT", "13322");
    ImmudbConnectOptions {
        host: env_or("IMMUDB_HOST", "127.0.0.1"),
        port: port
            .parse()
            .unwrap_or_else(|_| panic!("IMMUDB_PORT={port} is not a port")),
        database: database.to_owned(),
        username: env_or("IMMUDB_USERNAME", "immudb"),
        password,
        tls: None,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(30),
        create_database: true,
        sync_frequency: None,
    }
}

fn password() -> SecretString {
    SecretString::from(env_or("IMMUDB_PASSWORD", "immudb-local-admin"))
}

/// A client on a brand-new database. Fails (never skips) when immudb is not there.
async fn fresh_client() -> ImmudbClient {
    init_tracing();
    let opts = options(&fresh_database(), password());
    let address = format!("{}:{}", opts.host, opts.port);
    match ImmudbClient::connect(opts).await {
        Ok(client) => client,
        Err(e) => panic!("cannot use immudb at {address}: {e}; {STACK_HINT}"),
    }
}

fn kv(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.into(),
    }
}

/// Values that are not text: every byte value occurs, so nothing can be silently re-encoded.
fn binary_value(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 256) as u8)
        .collect()
}

#[tokio::test]
async fn one_transaction_of_1000_entries_reads_back_byte_identical() {
    let client = fresh_client().await;
    let kvs: Vec<KeyValue> = (0..1000)
        .map(|i| kv(format!("audit:test:{i:04}"), binary_value(i, 300 + i % 50)))
        .collect();

    let header = client.set_all(&kvs, true).await.expect("set_all");
    assert_eq!(
        header.nentries, 1000,
        "one transaction holds the whole batch"
    );
    assert!(header.id > 0);

    let keys: Vec<Vec<u8>> = kvs.iter().map(|kv| kv.key.clone()).collect();
    let entries = client.get_all(&keys).await.expect("get_all");
    assert_eq!(entries.len(), kvs.len());
    for (entry, expected) in entries.iter().zip(&kvs) {
        assert_eq!(entry.key, expected.key);
        assert_eq!(
            entry.value,
            expected.value,
            "value of {:?} changed",
            String::from_utf8_lossy(&entry.key)
        );
        assert_eq!(
            entry.tx, header.id,
            "every entry was written by the same transaction"
        );
        assert_eq!(entry.revision, 1);
    }

    // Missing keys are left out of the answer, not reported as errors.
    let mixed = vec![
        keys[0].clone(),
        b"audit:test:missing".to_vec(),
        keys[999].clone(),
    ];
    let found = client
        .get_all(&mixed)
        .await
        .expect("get_all with a missing key");
    let found_keys: Vec<&[u8]> = found.iter().map(|e| e.key.as_slice()).collect();
    assert_eq!(found_keys, vec![keys[0].as_slice(), keys[999].as_slice()]);

    let state = client.current_state().await.expect("current_state");
    assert!(state.tx_id >= header.id);
    client.health().await.expect("health");
    client.close().await;
}

#[tokio::test]
async fn batch_with_an_existing_key_fails_its_precondition_and_writes_nothing() {
    let client = fresh_client().await;
    let original = kv("audit:test:existing", b"{\"v\":1}".to_vec());
    client
        .set_all(std::slice::from_ref(&original), true)
        .await
        .expect("first write");

    let batch = vec![
        kv("audit:test:new-1", b"a".to_vec()),
        kv("audit:test:existing", b"{\"v\":2}".to_vec()),
        kv("audit:test:new-2", b"b".to_vec()),
    ];
    let err = client
        .set_all(&batch, true)
        .await
        .expect_err("an existing key must fail the batch");
    assert!(
        matches!(err, ImmudbError::PreconditionFailed { .. }),
        "got {err:?}"
    );
    assert!(!err.is_transient());

    let absent = vec![b"audit:test:new-1".to_vec(), b"audit:test:new-2".to_vec()];
    assert!(
        client.get_all(&absent).await.expect("get_all").is_empty(),
        "nothing of the batch was written"
    );
    assert!(
        client
            .get(b"audit:test:new-1")
            .await
            .expect("get")
            .is_none()
    );

    let history = client.history(&original.key).await.expect("history");
    assert_eq!(
        history.len(),
        1,
        "the existing key still has exactly one revision"
    );
    assert_eq!(history[0].value, original.value);
    assert_eq!(history[0].revision, 1);
    assert!(
        client
            .history(b"audit:test:never-written")
            .await
            .expect("history")
            .is_empty()
    );
    client.close().await;
}

#[tokio::test]
async fn a_session_closed_behind_the_clients_back_is_reopened_transparently() {
    let client = fresh_client().await;
    client
        .set_all(&[kv("audit:test:before", b"1".to_vec())], true)
        .await
        .expect("write");

    client
        .close_session_behind_back_for_tests()
        .await
        .expect("close the session server-side");
    // The server no longer knows the session the client holds.
    let again = client.close_session_behind_back_for_tests().await;
    assert!(
        again.is_err(),
        "the session should already be gone, got {again:?}"
    );

    // Several callers hit the dead session at once; they share one re-open.
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get(b"audit:test:before").await })
        })
        .collect();
    for reader in readers {
        let entry = reader
            .await
            .expect("task")
            .expect("get after the session was lost");
        assert_eq!(entry.map(|e| e.value), Some(b"1".to_vec()));
    }
    client
        .set_all(&[kv("audit:test:after", b"2".to_vec())], true)
        .await
        .expect("write after re-open");

    // And the client now holds a live session again.
    client
        .close_session_behind_back_for_tests()
        .await
        .expect("the re-opened session exists");
    client.health().await.expect("health re-opens once more");
    client.close().await;
}

#[tokio::test]
async fn a_created_database_commits_at_the_requested_sync_frequency_and_an_existing_one_keeps_its_own()
 {
    init_tracing();
    let database = fresh_database();
    let connect = |wanted: Option<Duration>| {
        let mut opts = options(&database, password());
        opts.sync_frequency = wanted;
        ImmudbClient::connect(opts)
    };
    let created = connect(Some(Duration::from_millis(3)))
        .await
        .expect("connect");
    assert_eq!(created.sync_frequency(), Duration::from_millis(3));
    let again = connect(Some(Duration::from_millis(1)))
        .await
        .expect("reconnect");
    assert_eq!(
        again.sync_frequency(),
        Duration::from_millis(3),
        "an existing database keeps its setting"
    );
    let plain = fresh_client().await;
    assert_eq!(
        plain.sync_frequency(),
        Duration::from_millis(20),
        "without a wish immudb creates the database with its own default"
    );
    for client in [created, again, plain] {
        client.close().await;
    }
}

#[tokio::test]
async fn a_one_mib_value_round_trips() {
    let client = fresh_client().await;
    let big = kv("audit:test:big", binary_value(42, 1 << 20));
    client
        .set_all(std::slice::from_ref(&big), true)
        .await
        .expect("write 1 MiB");

    let entry = client.get(&big.key).await.expect("get").expect("present");
    assert_eq!(entry.value.len(), big.value.len());
    assert!(entry.value == big.value, "1 MiB value changed on the way");
    let entries = client
        .get_all(std::slice::from_ref(&big.key))
        .await
        .expect("get_all");
    assert!(entries.len() == 1 && entries[0].value == big.value);
    client.close().await;
}

#[tokio::test]
async fn a_bad_password_is_a_permanent_error_that_does_not_reveal_it() {
    init_tracing();
    let wrong = format!("wrong-password-{:08x}", rand::random::<u32>());
    let opts = options(&fresh_database(), SecretString::from(wrong.clone()));
    let address = format!("{}:{}", opts.host, opts.port);
    let err = ImmudbClient::connect(opts)
        .await
        .expect_err("a wrong password must not connect");
    assert!(
        !matches!(
            err,
            ImmudbError::Transient {
                code: tonic::Code::Unavailable,
                ..
            }
        ),
        "immudb is not reachable at {address}: {err}; {STACK_HINT}"
    );
    assert!(
        matches!(err, ImmudbError::Unauthenticated { .. }),
        "got {err:?}"
    );
    assert!(!err.is_transient());
    assert!(
        !err.to_string().contains(&wrong),
        "password leaked into Display: {err}"
    );
    assert!(
        !format!("{err:?}").contains(&wrong),
        "password leaked into Debug: {err:?}"
    );
}

#[tokio::test]
async fn a_missing_database_is_a_config_error_when_creating_is_off() {
    init_tracing();
    let mut opts = options(&fresh_database(), password());
    opts.create_database = false;
    let err = ImmudbClient::connect(opts)
        .await
        .expect_err("the database does not exist");
    assert!(
        matches!(err, ImmudbError::Config(_)),
        "got {err:?}; {STACK_HINT}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn requests_immudb_would_refuse_are_refused_as_invalid() {
    let client = fresh_client().await;
    let limits = client.limits();
    assert_eq!(
        limits.max_tx_entries, 1024,
        "immudb's default entries per transaction"
    );
    assert_eq!(limits.max_key_len, 1023);

    let too_many: Vec<KeyValue> = (0..=limits.max_tx_entries)
        .map(|i| kv(format!("k{i}"), b"v".to_vec()))
        .collect();
    let err = client
        .set_all(&too_many, true)
        .await
        .expect_err("too many entries");
    assert!(
        matches!(err, ImmudbError::InvalidArgument { .. }) && !err.is_transient(),
        "got {err:?}"
    );

    let duplicated = vec![kv("k", b"1".to_vec()), kv("k", b"2".to_vec())];
    let err = client
        .set_all(&duplicated, false)
        .await
        .expect_err("duplicate keys");
    assert!(
        matches!(err, ImmudbError::InvalidArgument { .. }),
        "got {err:?}"
    );

    client.close().await;
    let err = client.get(b"k").await.expect_err("closed");
    assert!(matches!(err, ImmudbError::Closed));
}
