//! The pipeline end to end on the real stack: Kafka → daemon → immudb + PostgreSQL (+ DLQ).
//! Run `deploy/local/stack.sh up` first (the README's test command does).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use audit_consumer::event::payload_sha256;
use audit_consumer::immudb::ImmudbClient;
use common::*;
use sqlx::PgPool;
use uuid::Uuid;

const TOPICS: [&str; 4] = [
    "plant-lifecycle.v1",
    "financial.v1",
    "user-actions.v1",
    "system.v1",
];

/// Every id is in PostgreSQL exactly once and in immudb with exactly one revision whose bytes
/// hash to the row's `payload_sha256`; nothing else is stored.
async fn assert_stored_exactly_once(
    world: &World,
    pg: &PgPool,
    immudb: &ImmudbClient,
    ids: &[Uuid],
    entity_type: &str,
) {
    let rows: Vec<(Uuid, Vec<u8>, String, i64)> =
        sqlx::query_as("SELECT event_id, payload_sha256, immudb_key, immudb_tx FROM audit_trail")
            .fetch_all(pg)
            .await
            .expect("read rows");
    let expected: HashSet<Uuid> = ids.iter().copied().collect();
    let stored: HashSet<Uuid> = rows.iter().map(|r| r.0).collect();
    assert_eq!(rows.len(), stored.len(), "duplicate rows");
    let missing: Vec<_> = expected.difference(&stored).take(5).collect();
    let extra: Vec<_> = stored.difference(&expected).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} rows missing (e.g. {missing:?}), {} unexpected (e.g. {extra:?}) in {}",
        expected.len().saturating_sub(stored.len()),
        stored.difference(&expected).count(),
        world.pg_schema
    );

    let by_key: HashMap<Vec<u8>, (Vec<u8>, i64)> = rows
        .iter()
        .map(|(_, digest, key, tx)| (key.clone().into_bytes(), (digest.clone(), *tx)))
        .collect();
    for chunk in ids.chunks(500) {
        let keys: Vec<Vec<u8>> = chunk
            .iter()
            .map(|id| format!("audit:{entity_type}:{id}").into_bytes())
            .collect();
        let entries = immudb.get_all(&keys).await.expect("immudb get_all");
        assert_eq!(entries.len(), keys.len(), "events missing in immudb");
        for entry in entries {
            let (digest, tx) = &by_key[&entry.key];
            assert_eq!(
                entry.revision,
                1,
                "a second immudb revision of {}",
                String::from_utf8_lossy(&entry.key)
            );
            assert_eq!(
                payload_sha256(&entry.value).as_slice(),
                digest.as_slice(),
                "digest mismatch"
            );
            assert_eq!(
                entry.tx as i64, *tx,
                "immudb_tx of the row is not the entry's transaction"
            );
        }
    }
}

/// Waits until the group's committed offsets reach the log end on every partition.
async fn wait_fully_committed(world: &World, timeout: Duration) {
    world.wait_committed_to_end(timeout).await;
}

async fn wait_rows(world: &World, pg: &PgPool, expected: i64, timeout: Duration) {
    world.wait_rows(pg, expected, timeout).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stores_every_event_once_in_both_stores_and_commits_to_the_end() {
    let world = World::new(&TOPICS, 3).await;
    let corpus = valid_corpus(&world, 5000, 3);
    world.produce_corpus(&corpus).await;
    let daemon = world.start_daemon("a", &BTreeMap::new());

    let pg = world.pg().await;
    wait_rows(&world, &pg, 5000, Duration::from_secs(120)).await;
    wait_fully_committed(&world, Duration::from_secs(30)).await;
    let status = daemon.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status:?}");

    let ids: Vec<Uuid> = corpus.iter().map(|(id, _)| *id).collect();
    assert_stored_exactly_once(&world, &pg, &world.immudb().await, &ids, "plant").await;
    // IMMUDB_VERIFY is on by default: every batch was written with a verified transaction.
    let unverified = world.unverified_rows(&pg).await;
    assert_eq!(
        unverified, 0,
        "rows written without a verified immudb transaction"
    );
    let trusted: i64 = sqlx::query_scalar("SELECT tx_id FROM immudb_trusted_state")
        .fetch_one(&pg)
        .await
        .expect("the trusted state is persisted");
    let max_tx: i64 = sqlx::query_scalar("SELECT max(immudb_tx) FROM audit_trail")
        .fetch_one(&pg)
        .await
        .expect("max tx");
    assert!(
        trusted >= max_tx,
        "trusted tx {trusted} behind the newest written tx {max_tx}"
    );
    let committed = world.committed();
    for (tp, high) in world.end_offsets() {
        assert_eq!(committed[&tp], Some(high), "committed offset of {tp:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_from_the_beginning_adds_no_revision_and_no_row() {
    let world = World::new(&TOPICS[..2], 2).await;
    let corpus = valid_corpus(&world, 1200, 2);
    world.produce_corpus(&corpus).await;
    let pg = world.pg().await;

    let first = world.start_daemon("first", &BTreeMap::new());
    wait_rows(&world, &pg, 1200, Duration::from_secs(60)).await;
    wait_fully_committed(&world, Duration::from_secs(30)).await;
    assert!(first.terminate(Duration::from_secs(30)).await.success());

    world.reset_group_offsets(0);
    let second = world.start_daemon("second", &BTreeMap::new());
    wait_fully_committed(&world, Duration::from_secs(60)).await;
    let log = second.log.clone();
    assert!(second.terminate(Duration::from_secs(30)).await.success());

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let batches = batch_lines(&lines);
    let stored: u64 = batches
        .iter()
        .map(|b| b["stored"].as_u64().unwrap_or(0))
        .sum();
    let duplicates: u64 = batches
        .iter()
        .map(|b| b["duplicates"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(stored, 0, "the replay wrote new immudb entries");
    assert_eq!(
        duplicates, 1200,
        "every replayed event is recognised as already stored"
    );
    let ids: Vec<Uuid> = corpus.iter().map(|(id, _)| *id).collect();
    assert_stored_exactly_once(&world, &pg, &world.immudb().await, &ids, "plant").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicting_redelivery_goes_to_the_dlq_and_the_original_is_untouched() {
    let world = World::new(&TOPICS[..1], 1).await;
    let topic = world.topics[0].clone();
    let id = Uuid::new_v4();
    let original = event_json(id, "plant", 1);
    let mut altered: serde_json::Value = serde_json::from_slice(&original).expect("json");
    altered["new_value"] = serde_json::json!({"stage": "HARVESTED"});
    let altered = serde_json::to_vec(&altered).expect("json");
    let record = |payload: &[u8]| TestRecord {
        topic: topic.clone(),
        partition: 0,
        key: Some(id.to_string().into_bytes()),
        payload: Some(payload.to_vec()),
        headers: vec![],
    };
    world.produce(&[record(&original)]).await;
    let pg = world.pg().await;
    let daemon = world.start_daemon("a", &BTreeMap::new());
    wait_rows(&world, &pg, 1, Duration::from_secs(60)).await;
    // The altered copy arrives in a later batch, as a tampering or buggy producer would send it.
    world.produce(&[record(&altered), record(&original)]).await;
    wait_fully_committed(&world, Duration::from_secs(60)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());

    let dlq = world.dlq_records(1, Duration::from_secs(20)).await;
    assert_eq!(dlq.len(), 1, "exactly the altered copy is dead-lettered");
    assert_eq!(dlq[0].payload.as_deref(), Some(altered.as_slice()));
    assert_eq!(dlq[0].headers["dlq.error.class"], "conflict");
    assert_eq!(dlq[0].headers["dlq.original.offset"], "1");

    let immudb = world.immudb().await;
    let history = immudb
        .history(format!("audit:plant:{id}").as_bytes())
        .await
        .expect("history");
    assert_eq!(history.len(), 1, "the original keeps its single revision");
    assert_eq!(history[0].value, original);
    let digest: Vec<u8> =
        sqlx::query_scalar("SELECT payload_sha256 FROM audit_trail WHERE event_id = $1")
            .bind(id)
            .fetch_one(&pg)
            .await
            .expect("row");
    assert_eq!(digest, payload_sha256(&original).to_vec());
    assert_eq!(world.pg_count(&pg).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_events_go_to_the_dlq_byte_identical_and_offsets_move_past_them() {
    let world = World::new(&TOPICS[..1], 1).await;
    let topic = world.topics[0].clone();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/invalid");
    let mut invalid: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("fixtures")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.ends_with(".tsv") && !n.ends_with(".md"))
        })
        .map(|p| {
            (
                p.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_owned(),
                std::fs::read(&p).expect("read fixture"),
            )
        })
        .collect();
    invalid.sort();
    assert!(invalid.len() >= 30, "expected at least 30 invalid fixtures");

    // valid, invalid, valid, invalid, …, valid: each invalid one sits between stored events.
    let mut records = Vec::new();
    let mut valid_ids = Vec::new();
    let mut expected_dlq: HashMap<i64, (String, Vec<u8>)> = HashMap::new();
    for (n, (name, payload)) in invalid.iter().enumerate() {
        let id = Uuid::new_v4();
        valid_ids.push(id);
        records.push(TestRecord {
            topic: topic.clone(),
            partition: 0,
            key: Some(id.to_string().into_bytes()),
            payload: Some(event_json(id, "plant", n)),
            headers: vec![],
        });
        expected_dlq.insert(records.len() as i64, (name.clone(), payload.clone()));
        records.push(TestRecord {
            topic: topic.clone(),
            partition: 0,
            key: Some(format!("bad-{name}").into_bytes()),
            payload: Some(payload.clone()),
            headers: vec![(
                "traceparent".into(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            )],
        });
    }
    let last = Uuid::new_v4();
    valid_ids.push(last);
    records.push(TestRecord {
        topic: topic.clone(),
        partition: 0,
        key: None,
        payload: Some(event_json(last, "plant", 999)),
        headers: vec![],
    });
    world.produce(&records).await;

    let pg = world.pg().await;
    let daemon = world.start_daemon("a", &BTreeMap::new());
    wait_fully_committed(&world, Duration::from_secs(60)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());

    assert_stored_exactly_once(&world, &pg, &world.immudb().await, &valid_ids, "plant").await;
    let dlq = world
        .dlq_records(expected_dlq.len(), Duration::from_secs(30))
        .await;
    assert_eq!(dlq.len(), expected_dlq.len());
    for record in dlq {
        let offset: i64 = record.headers["dlq.original.offset"]
            .parse()
            .expect("offset header");
        let (name, payload) = &expected_dlq[&offset];
        assert_eq!(
            record.payload.as_deref(),
            Some(payload.as_slice()),
            "{name}: value not byte-identical"
        );
        assert_eq!(
            record.key.as_deref(),
            Some(format!("bad-{name}").as_bytes()),
            "{name}: key"
        );
        assert_eq!(record.headers["dlq.error.class"], "invalid", "{name}");
        assert_eq!(record.headers["dlq.error.stage"], "decode", "{name}");
        assert_eq!(record.headers["dlq.original.topic"], topic, "{name}");
        assert_eq!(record.headers["dlq.original.partition"], "0", "{name}");
        assert_eq!(record.headers["dlq.consumer.group"], world.group, "{name}");
        assert_eq!(record.headers["dlq.consumer.instance"], "a", "{name}");
        assert_eq!(record.headers["dlq.attempts"], "0", "{name}");
        assert!(!record.headers["dlq.error.kind"].is_empty(), "{name}");
        assert!(!record.headers["dlq.error.message"].is_empty(), "{name}");
        assert!(record.headers.contains_key("dlq.failed.at"), "{name}");
        assert!(
            record.headers.contains_key("dlq.original.timestamp"),
            "{name}"
        );
        assert_eq!(
            record.headers["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "{name}: original headers are kept"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_invalid_events_halts_instead_of_draining_the_topic() {
    let world = World::new(&TOPICS[..1], 1).await;
    let topic = world.topics[0].clone();
    let records: Vec<TestRecord> = (0..30)
        .map(|n| TestRecord {
            topic: topic.clone(),
            partition: 0,
            key: None,
            payload: Some(format!("not json {n}").into_bytes()),
            headers: vec![],
        })
        .collect();
    world.produce(&records).await;
    let mut overrides = BTreeMap::new();
    overrides.insert("DLQ_MAX_CONSECUTIVE_INVALID", "10".to_owned());
    let mut daemon = world.start_daemon("a", &overrides);
    wait_until("the daemon to halt", Duration::from_secs(60), || {
        let running = daemon.is_running();
        async move { (!running).then_some(()) }
    })
    .await;
    let log = std::fs::read_to_string(&daemon.log).expect("log");
    assert!(
        log.contains("invalid events in a row"),
        "the halt names its reason: {log}"
    );
    let committed = world.committed();
    let position = committed[&(topic.clone(), 0)].unwrap_or(0);
    assert!(
        position <= 10,
        "at most the capped run was passed, committed {position}"
    );
    let dlq = world.dlq_records(30, Duration::from_secs(5)).await;
    assert!(
        dlq.len() <= 10,
        "{} records were dead-lettered past the cap",
        dlq.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_commits_and_a_restart_reprocesses_nothing() {
    let world = World::new(&TOPICS[..2], 2).await;
    let pg = world.pg().await;
    let daemon = world.start_daemon("a", &BTreeMap::new());
    // A steady stream: 200 events every 100 ms while the daemon runs (a pacing clock, not a
    // wait: the SIGTERM lands while events are still arriving).
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    let mut produced = Vec::new();
    for round in 0..15 {
        pace.tick().await;
        let corpus = valid_corpus(&world, 200, 2);
        world.produce_corpus(&corpus).await;
        produced.extend(corpus.into_iter().map(|(id, _)| id));
        if round == 10 {
            wait_rows(&world, &pg, 1, Duration::from_secs(60)).await;
        }
    }
    let started = tokio::time::Instant::now();
    let status = daemon.terminate(Duration::from_secs(25)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "drain took {:?}",
        started.elapsed()
    );

    // Everything consumed before the signal is committed: the committed position of every
    // partition is exactly one past the highest stored offset, with no gap below it.
    let stored: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT source_topic, source_partition, source_offset FROM audit_trail")
            .fetch_all(&pg)
            .await
            .expect("rows");
    let mut per_partition: BTreeMap<(String, i32), Vec<i64>> = BTreeMap::new();
    for (topic, partition, offset) in stored {
        per_partition
            .entry((topic, partition))
            .or_default()
            .push(offset);
    }
    let committed = world.committed();
    for (tp, mut offsets) in per_partition {
        offsets.sort_unstable();
        let expected: Vec<i64> = (0..offsets.len() as i64).collect();
        assert_eq!(offsets, expected, "{tp:?}: stored offsets have a gap");
        assert_eq!(
            committed[&tp],
            Some(offsets.len() as i64),
            "{tp:?}: stored but not committed"
        );
    }

    let restarted = world.start_daemon("b", &BTreeMap::new());
    wait_fully_committed(&world, Duration::from_secs(60)).await;
    let log = restarted.log.clone();
    assert!(restarted.terminate(Duration::from_secs(30)).await.success());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let duplicates: u64 = batch_lines(&lines)
        .iter()
        .map(|b| b["duplicates"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(duplicates, 0, "the restart reprocessed committed events");
    assert_stored_exactly_once(&world, &pg, &world.immudb().await, &produced, "plant").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn survives_repeated_sigkill_without_loss_or_duplicates() {
    let world = World::new(&TOPICS, 3).await;
    let corpus = valid_corpus(&world, 20_000, 3);
    world.produce_corpus(&corpus).await;
    let pg = world.pg().await;
    let mut overrides = BTreeMap::new();
    // Small batches so that kills land between immudb and PostgreSQL writes and mid-commit.
    overrides.insert("KAFKA_BATCH_SIZE", "200".to_owned());
    let mut kills = 0;
    let mut last_count = 0;
    while kills < 5 {
        let daemon = world.start_daemon(&format!("run{kills}"), &overrides);
        // Kill at a point that moves with the data: after 1,000–3,500 more rows.
        let step = 1000 + (rand::random::<u64>() % 2500) as i64;
        let target = (last_count + step).min(19_000);
        wait_rows(&world, &pg, target, Duration::from_secs(120)).await;
        daemon.kill();
        kills += 1;
        last_count = world.pg_count(&pg).await;
    }
    let daemon = world.start_daemon("final", &overrides);
    wait_rows(&world, &pg, 20_000, Duration::from_secs(180)).await;
    wait_fully_committed(&world, Duration::from_secs(60)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    let ids: Vec<Uuid> = corpus.iter().map(|(id, _)| *id).collect();
    assert_stored_exactly_once(&world, &pg, &world.immudb().await, &ids, "plant").await;
    // Events redelivered after a kill between their immudb and PostgreSQL writes were proven
    // before their rows were written.
    assert_eq!(
        world.unverified_rows(&pg).await,
        0,
        "rows stored without a proof"
    );
}

/// A static member (`KAFKA_GROUP_INSTANCE_ID`) restarted after a SIGKILL takes its partitions
/// back at once. A dynamic one waits for the killed member's session to expire (60 s here), so
/// new events stored well within that prove the hand-back, and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread")]
async fn a_static_member_restarted_after_sigkill_does_not_wait_for_its_session_timeout() {
    let world = World::new(&TOPICS[..1], 3).await;
    let pg = world.pg().await;
    let mut overrides = BTreeMap::new();
    overrides.insert("KAFKA_GROUP_INSTANCE_ID", format!("{}-member-0", world.id));
    overrides.insert("KAFKA_SESSION_TIMEOUT", "60s".to_owned());
    let before = valid_corpus(&world, 600, 3);
    world.produce_corpus(&before).await;
    let daemon = world.start_daemon("before", &overrides);
    wait_rows(&world, &pg, 600, Duration::from_secs(60)).await;
    wait_fully_committed(&world, Duration::from_secs(60)).await;
    daemon.kill();

    let after = valid_corpus(&world, 600, 3);
    world.produce_corpus(&after).await;
    let daemon = world.start_daemon("after", &overrides);
    // Less than the 60 s session timeout, with a wide margin for a loaded machine.
    wait_rows(&world, &pg, 1200, Duration::from_secs(40)).await;
    wait_fully_committed(&world, Duration::from_secs(40)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    let ids: Vec<Uuid> = before.iter().chain(&after).map(|(id, _)| *id).collect();
    assert_stored_exactly_once(&world, &pg, &world.immudb().await, &ids, "plant").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_share_partitions_and_hand_over_without_loss() {
    let world = World::new(&TOPICS[..1], 6).await;
    let topic = world.topics[0].clone();
    let pg = world.pg().await;
    let a = world.start_daemon("a", &BTreeMap::new());
    let b = world.start_daemon("b", &BTreeMap::new());
    // Partitions are shared: after the cooperative rebalance settles, each member owns some.
    let owned = |daemon: &Daemon| -> HashSet<String> {
        let mut owned = HashSet::new();
        for line in daemon.log_lines() {
            let message = line["message"].as_str().unwrap_or_default();
            let partitions = line["partitions"]
                .as_str()
                .unwrap_or_default()
                .split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_owned);
            match message {
                "partitions assigned" => owned.extend(partitions),
                "partitions revoked; draining them before hand-over" => {
                    for p in partitions.collect::<Vec<_>>() {
                        owned.remove(&p);
                    }
                }
                _ => {}
            }
        }
        owned
    };
    wait_until(
        "both daemons to own partitions",
        Duration::from_secs(60),
        || {
            let (owned_a, owned_b) = (owned(&a), owned(&b));
            async move {
                (!owned_a.is_empty()
                    && !owned_b.is_empty()
                    && owned_a.len() + owned_b.len() == 6
                    && owned_a.is_disjoint(&owned_b))
                .then_some(())
            }
        },
    )
    .await;

    let mut produced = Vec::new();
    let mut first = valid_corpus(&world, 3000, 6);
    world.produce_corpus(&first).await;
    produced.extend(first.drain(..).map(|(id, _)| id));
    wait_rows(&world, &pg, 3000, Duration::from_secs(90)).await;
    assert!(
        !batch_lines(&a.log_lines()).is_empty(),
        "daemon a stored nothing"
    );
    assert!(
        !batch_lines(&b.log_lines()).is_empty(),
        "daemon b stored nothing"
    );

    // Stop one mid-stream: its partitions move to the other with no loss and no duplicates.
    let second = valid_corpus(&world, 3000, 6);
    produced.extend(second.iter().map(|(id, _)| *id));
    let (half, rest) = second.split_at(1500);
    world.produce_corpus(half).await;
    assert!(a.terminate(Duration::from_secs(30)).await.success());
    world.produce_corpus(rest).await;
    wait_rows(&world, &pg, 6000, Duration::from_secs(90)).await;
    wait_fully_committed(&world, Duration::from_secs(60)).await;
    assert!(b.terminate(Duration::from_secs(30)).await.success());
    let _ = topic;
    assert_stored_exactly_once(&world, &pg, &world.immudb().await, &produced, "plant").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_a_store_rejects_are_isolated_and_dead_lettered_while_the_rest_flows() {
    let world = World::new(&TOPICS[..1], 2).await;
    let pg = world.pg().await;
    // A rule the replica enforces and the contract does not: PostgreSQL rejects these rows for
    // good (SQLSTATE 23514), whatever the retries.
    sqlx::query("ALTER TABLE audit_trail ADD CONSTRAINT no_quarantine CHECK (entity_id NOT LIKE 'plant-4%')")
        .execute(&pg)
        .await
        .expect("add constraint");
    let corpus = valid_corpus(&world, 970, 2);
    world.produce_corpus(&corpus).await;
    // valid_corpus uses entity_id "plant-{n % 97}": those starting with 4 are rejected.
    let rejected: HashSet<Uuid> = corpus
        .iter()
        .enumerate()
        .filter(|(n, _)| format!("{}", n % 97).starts_with('4'))
        .map(|(_, (id, _))| *id)
        .collect();
    assert!(!rejected.is_empty());
    let daemon = world.start_daemon("a", &BTreeMap::new());
    wait_fully_committed(&world, Duration::from_secs(120)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());

    let dlq = world
        .dlq_records(rejected.len(), Duration::from_secs(30))
        .await;
    assert_eq!(dlq.len(), rejected.len());
    for record in &dlq {
        let payload: serde_json::Value =
            serde_json::from_slice(record.payload.as_deref().unwrap_or_default()).expect("json");
        let id: Uuid = payload["event_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("event_id");
        assert!(
            rejected.contains(&id),
            "{id} was dead-lettered but is valid for PostgreSQL"
        );
        assert_eq!(record.headers["dlq.error.stage"], "postgres");
        assert_eq!(record.headers["dlq.error.class"], "invalid");
        assert!(
            record.headers["dlq.error.message"].contains("no_quarantine"),
            "{}",
            record.headers["dlq.error.message"]
        );
    }
    let stored: Vec<Uuid> = corpus
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !rejected.contains(id))
        .collect();
    assert_eq!(world.pg_count(&pg).await as usize, stored.len());
    assert_stored_exactly_once(&world, &pg, &world.immudb().await, &stored, "plant").await;
}
