//! The write path's integrity verdicts in the shape the daemon is deployed in (several topics,
//! hostile input): an `event_id` reused under another entity type never reaches immudb, a tamper
//! finding of the continuous audit stops every writer, a read-only immudb login holds the stream
//! instead of draining it into the DLQ, a compressed record too large for the contract is parked
//! instead of wedging the consumer, and redelivered events are stored only with a proof.
//! None of these tests stops a shared server, so they run in parallel; each owns its world.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use audit_consumer::event::payload_sha256;
use audit_consumer::immudb::KeyValue;
use audit_consumer::pipeline::immudb_write::Candidate;
use common::*;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

const TOPICS: [&str; 4] = [
    "plant-lifecycle.v1",
    "financial.v1",
    "user-actions.v1",
    "system.v1",
];

fn record(topic: &str, id: Uuid, payload: &[u8]) -> TestRecord {
    TestRecord {
        topic: topic.to_owned(),
        partition: 0,
        key: Some(id.to_string().into_bytes()),
        payload: Some(payload.to_vec()),
        headers: vec![],
    }
}

/// The daemon's metric `name{labels}` summed over the series that carry all `labels`.
fn metric_sum(scrape: &str, name: &str, labels: &[&str]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Defect: an `event_id` that returns under another `entity_type` has another `audit:` key, so
/// `KeyMustNotExist` on that key alone let the copy into the system of record before PostgreSQL
/// noticed. The copy must end in the DLQ only, whether it arrives in a later batch of another
/// topic or in the same batch.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_id_reused_under_another_entity_type_never_reaches_immudb() {
    let world = World::new(&TOPICS[..2], 1).await;
    let (first_topic, other_topic) = (world.topics[0].clone(), world.topics[1].clone());
    let later = Uuid::new_v4();
    let same_batch = Uuid::new_v4();
    let plant = |id| event_json(id, "plant", 1);
    let batch = |id| event_json(id, "batch", 2);

    world
        .produce(&[record(&first_topic, later, &plant(later))])
        .await;
    let pg = world.pg().await;
    let daemon = world.start_daemon("a", &BTreeMap::new());
    world.wait_rows(&pg, 1, Duration::from_secs(60)).await;
    // A later batch of another topic reuses the id under another entity type; a batch of the
    // first topic carries an id twice with two entity types.
    world
        .produce(&[
            record(&other_topic, later, &batch(later)),
            record(&first_topic, same_batch, &plant(same_batch)),
            record(&first_topic, same_batch, &batch(same_batch)),
        ])
        .await;
    world.wait_committed_to_end(Duration::from_secs(60)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());

    let dlq = world.dlq_records(2, Duration::from_secs(20)).await;
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("UTF-8");
    let mut parked: Vec<(String, String, String)> = dlq
        .iter()
        .map(|r| {
            (
                text(r.payload.clone().unwrap_or_default()),
                r.headers["dlq.error.class"].clone(),
                r.headers["dlq.error.stage"].clone(),
            )
        })
        .collect();
    parked.sort();
    let mut expected = vec![
        (
            text(batch(later)),
            "conflict".to_owned(),
            "immudb".to_owned(),
        ),
        (
            text(batch(same_batch)),
            "conflict".to_owned(),
            "immudb".to_owned(),
        ),
    ];
    expected.sort();
    assert_eq!(parked, expected, "exactly the two copies are dead-lettered");

    let immudb = world.immudb().await;
    for id in [later, same_batch] {
        assert!(
            immudb
                .get(format!("audit:batch:{id}").as_bytes())
                .await
                .expect("get")
                .is_none(),
            "the conflicting copy of {id} was written to immudb"
        );
        let original = immudb
            .get(format!("audit:plant:{id}").as_bytes())
            .await
            .expect("get")
            .expect("the original is in immudb");
        assert_eq!(original.value, plant(id));
        let digest: Vec<u8> =
            sqlx::query_scalar("SELECT payload_sha256 FROM audit_trail WHERE event_id = $1")
                .bind(id)
                .fetch_one(&pg)
                .await
                .expect("row");
        assert_eq!(digest, payload_sha256(&plant(id)).to_vec());
    }
    assert_eq!(world.pg_count(&pg).await, 2);
}

/// Defect: the continuous audit's finding only set a flag; the writers kept going. Once
/// tampering is suspected, no writer of any topic may write again until a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_tamper_finding_of_the_audit_stops_every_writer_of_every_topic() {
    let world = World::new(&TOPICS, 1).await;
    let pg = world.pg().await;
    let overrides = BTreeMap::from([
        ("AUDIT_INTERVAL", "1s".to_owned()),
        // Every row is in the sample, so the altered one is found in the next round.
        ("AUDIT_SAMPLE_SIZE", "10000".to_owned()),
        ("KAFKA_BATCH_SIZE", "50".to_owned()),
    ]);
    let daemon = world.start_daemon("a", &overrides);
    let first = valid_corpus(&world, 400, 1);
    world.produce_corpus(&first).await;
    world.wait_rows(&pg, 400, Duration::from_secs(60)).await;

    // The replica is altered behind the daemon's back (a superuser disables the trigger); the
    // four topics keep streaming while the audit finds it.
    let (altered,): (Uuid,) = sqlx::query_as("SELECT event_id FROM audit_trail LIMIT 1")
        .fetch_one(&pg)
        .await
        .expect("a row");
    let mut tx = pg.begin().await.expect("begin");
    for sql in [
        "ALTER TABLE audit_trail DISABLE TRIGGER audit_trail_no_update_delete".to_owned(),
        format!(
            "UPDATE audit_trail SET payload_sha256 = sha256('forged') WHERE event_id = '{altered}'"
        ),
        "ALTER TABLE audit_trail ENABLE TRIGGER audit_trail_no_update_delete".to_owned(),
    ] {
        sqlx::query(&sql).execute(&mut *tx).await.expect(&sql);
    }
    tx.commit().await.expect("commit");
    let stream = tokio::spawn({
        let topics = world.topics.clone();
        let producer = world.producer();
        async move {
            let mut pace = tokio::time::interval(Duration::from_millis(100));
            for n in 0..300usize {
                pace.tick().await;
                let id = Uuid::new_v4();
                let topic = &topics[n % topics.len()];
                let payload = event_json(id, "plant", n);
                let record = FutureRecord::<[u8], [u8]>::to(topic)
                    .partition(0)
                    .payload(&payload);
                producer
                    .send(record, Duration::from_secs(10))
                    .await
                    .expect("produce");
            }
        }
    });

    let detected = wait_until(
        "the audit to report the altered row",
        Duration::from_secs(60),
        || async {
            daemon
                .log_lines()
                .into_iter()
                .find(|l| l["event"] == "tamper_suspected")
                .and_then(|l| l["timestamp"].as_str().map(str::to_owned))
        },
    )
    .await;
    let detected = chrono::DateTime::parse_from_rfc3339(&detected).expect("log timestamp");
    // Each topic's writer meets the latch and holds its batch; meanwhile nothing is written.
    wait_until(
        "every topic's writer to hold its batch behind the tamper latch",
        Duration::from_secs(60),
        || async {
            let late: i64 =
                sqlx::query_scalar("SELECT count(*) FROM audit_trail WHERE ingested_at > $1")
                    .bind(detected)
                    .fetch_one(&pg)
                    .await
                    .expect("count");
            assert_eq!(
                late, 0,
                "rows were written after the audit suspected tampering"
            );
            let held: std::collections::HashSet<String> = daemon
                .log_lines()
                .into_iter()
                .filter(|l| l["message"] == "tamper suspected: holding the batch until a restart")
                .filter_map(|l| l["span"]["topic"].as_str().map(str::to_owned))
                .collect();
            (held.len() == TOPICS.len()).then_some(())
        },
    )
    .await;
    let immudb = world.immudb().await;
    let tx_at_hold = immudb.current_state().await.expect("state").tx_id;
    stream.await.expect("stream");
    let addr = daemon.http_addr().await;
    let (status, body) = http_get(addr, "/ready").await.expect("ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("tamper suspected"), "{body}");
    assert_eq!(
        immudb.current_state().await.expect("state").tx_id,
        tx_at_hold,
        "immudb was written after every writer held"
    );
    let late: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_trail WHERE ingested_at > $1")
        .bind(detected)
        .fetch_one(&pg)
        .await
        .expect("count");
    assert_eq!(late, 0, "rows were written after tampering was suspected");
    assert!(daemon.terminate(Duration::from_secs(40)).await.success());
}

/// Defect: every hold of a batch behind the circuit spent one of the precondition rounds, and
/// the probe that closed the circuit (a KeepAlive) succeeded for a read-only login, so every
/// batch ended `retry_exhausted` in the DLQ and was committed. A login that may not write must
/// hold the stream: nothing dead-lettered, nothing committed, `/ready` 503; with a writing
/// login everything is then stored once.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_immudb_login_holds_the_stream_instead_of_dead_lettering_it() {
    let world = World::new(&TOPICS[..2], 2).await;
    world.immudb().await.close().await; // the database exists before the read-only login
    let (user, password) = world.immudb_login(1).await;
    let corpus = valid_corpus(&world, 400, 2);
    world.produce_corpus(&corpus).await;
    let read_only = BTreeMap::from([
        ("IMMUDB_USERNAME", user),
        ("IMMUDB_PASSWORD", password),
        ("IMMUDB_CREATE_DATABASE", "false".to_owned()),
        ("CIRCUIT_COOLDOWN", "500ms".to_owned()),
        ("KAFKA_BATCH_SIZE", "100".to_owned()),
    ]);
    let daemon = world.start_daemon("read-only", &read_only);
    let addr = daemon.http_addr().await;
    wait_until(
        "the immudb circuit to stay open through six write probes",
        Duration::from_secs(60),
        || async {
            let (_, scrape) = http_get(addr, "/metrics").await.ok()?;
            let parked = metric_sum(&scrape, "audit_dlq_events_total", &[]);
            assert_eq!(parked, 0.0, "events were dead-lettered: {scrape}");
            let failed_probes = daemon
                .log_lines()
                .iter()
                .filter(|l| {
                    l["message"] == "probe failed; circuit stays open" && l["service"] == "immudb"
                })
                .count();
            // More holds than the writer's resolution rounds (4): holds must not spend them.
            (failed_probes >= 6).then_some(())
        },
    )
    .await;
    let (status, body) = http_get(addr, "/ready").await.expect("ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("immudb"), "{body}");
    assert!(
        world.committed().values().all(Option::is_none),
        "offsets were committed past events that are not stored: {:?}",
        world.committed()
    );
    let pg = world.pg().await;
    assert_eq!(world.pg_count(&pg).await, 0);
    assert!(daemon.terminate(Duration::from_secs(40)).await.success());

    let writer = world.start_daemon("writer", &BTreeMap::new());
    world.wait_rows(&pg, 400, Duration::from_secs(60)).await;
    world.wait_committed_to_end(Duration::from_secs(60)).await;
    assert!(writer.terminate(Duration::from_secs(30)).await.success());
    assert_eq!(world.pg_count(&pg).await, 400);
    assert!(
        world
            .dlq_records(1, Duration::from_secs(3))
            .await
            .is_empty(),
        "nothing is dead-lettered"
    );
}

/// Defect: a record the broker accepted compressed (1.5 MB of JSON in zstd) is over the
/// contract's 1 MiB, and the DLQ producer's default 1,000,000-byte message limit refused it
/// locally for ever: every partition stopped and `/ready` stayed 200. It must be parked byte
/// for byte and the stream must go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_compressed_record_over_the_contracts_size_is_parked_and_the_stream_goes_on() {
    let world = World::new(&TOPICS[..1], 1).await;
    let topic = world.topics[0].clone();
    let before = valid_corpus(&world, 2500, 1);
    let after = valid_corpus(&world, 2500, 1);
    let id = Uuid::new_v4();
    let huge = serde_json::json!({
        "event_id": id.to_string(),
        "timestamp": "2026-11-23T10:00:00Z",
        "entity_type": "plant",
        "entity_id": "p-1",
        "action": "UPDATE",
        "user_id": "u-1",
        "new_value": {"notes": "the same line again and again ".repeat(52_000)},
    })
    .to_string()
    .into_bytes();
    assert!(huge.len() > 1_500_000);
    world.produce_corpus(&before).await;
    let zstd: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &world.stack.brokers)
        .set("compression.type", "zstd")
        .set("message.max.bytes", "4000000")
        .create()
        .expect("producer");
    zstd.send(
        FutureRecord::<[u8], [u8]>::to(&topic)
            .partition(0)
            .payload(&huge),
        Duration::from_secs(30),
    )
    .await
    .expect("the broker accepts the compressed record");
    world.produce_corpus(&after).await;

    let pg = world.pg().await;
    let daemon = world.start_daemon("a", &BTreeMap::new());
    world.wait_rows(&pg, 5000, Duration::from_secs(120)).await;
    world.wait_committed_to_end(Duration::from_secs(60)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    let dlq = world.dlq_records(1, Duration::from_secs(20)).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        dlq[0].payload.as_deref(),
        Some(huge.as_slice()),
        "parked byte for byte"
    );
    assert_eq!(dlq[0].headers["dlq.error.kind"], "too_large");
    assert_eq!(dlq[0].headers["dlq.original.offset"], "2500");
}

/// A DLQ topic that cannot hold what the source topics may carry is refused at start-up, with
/// both numbers in the message.
#[tokio::test(flavor = "multi_thread")]
async fn a_dlq_topic_smaller_than_the_source_topics_is_refused_at_start_up() {
    let world = World::new(&TOPICS[..1], 1).await;
    world
        .set_topic_config(&world.dlq_topic, "max.message.bytes", "100000")
        .await;
    let mut daemon = world.start_daemon("a", &BTreeMap::new());
    let status = daemon.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success());
    let log = std::fs::read_to_string(&daemon.log).expect("log");
    assert!(
        log.contains("100000") && log.contains("1048588") && log.contains(&world.dlq_topic),
        "the refusal names the topic and both sizes:\n{log}"
    );
}

/// A DLQ write the broker refuses for good (the DLQ topic's limit lowered behind the daemon's
/// back) opens the DLQ circuit: `/ready` 503, the circuit gauge, nothing committed past the
/// record; once the topic is fixed the record is parked and the stream goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_dlq_the_broker_refuses_opens_its_circuit_and_commits_nothing_past_the_record() {
    let world = World::new(&TOPICS[..1], 1).await;
    let topic = world.topics[0].clone();
    let pg = world.pg().await;
    let overrides = BTreeMap::from([("CIRCUIT_COOLDOWN", "500ms".to_owned())]);
    let daemon = world.start_daemon("a", &overrides);
    let addr = daemon.http_addr().await;
    let first = valid_corpus(&world, 20, 1);
    world.produce_corpus(&first).await;
    world.wait_rows(&pg, 20, Duration::from_secs(60)).await;
    world
        .set_topic_config(&world.dlq_topic, "max.message.bytes", "1000")
        .await;
    // Not JSON and not compressible: the dead letter is far above the lowered limit.
    let garbage: Vec<u8> = (0..8192).map(|_| rand::random::<u8>()).collect();
    let garbage_record = TestRecord {
        topic: topic.clone(),
        partition: 0,
        key: None,
        payload: Some(garbage.clone()),
        headers: vec![],
    };
    world.produce(&[garbage_record]).await;
    let rest = valid_corpus(&world, 20, 1);
    world.produce_corpus(&rest).await;

    wait_until(
        "the DLQ circuit to open and /ready to say so",
        Duration::from_secs(60),
        || async {
            let (status, body) = http_get(addr, "/ready").await.ok()?;
            (status == 503 && body.contains("dlq")).then_some(())
        },
    )
    .await;
    let (_, scrape) = http_get(addr, "/metrics").await.expect("metrics");
    assert_eq!(
        metric_value(&scrape, "audit_circuit_breaker_state{service=\"dlq\"}"),
        Some(2.0),
        "{scrape}"
    );
    let committed = world.committed()[&(topic.clone(), 0)];
    assert!(
        committed.is_some_and(|offset| offset <= 20),
        "committed past the unparked record: {committed:?}"
    );

    world
        .set_topic_config(&world.dlq_topic, "max.message.bytes", "1048588")
        .await;
    world.wait_committed_to_end(Duration::from_secs(60)).await;
    let (status, body) = http_get(addr, "/ready").await.expect("ready");
    assert_eq!(status, 200, "{body}");
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    let dlq = world.dlq_records(1, Duration::from_secs(20)).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload.as_deref(), Some(garbage.as_slice()));
    assert_eq!(world.pg_count(&pg).await, 40);
}

/// Defect: an event found already in immudb (written before a crash, its PostgreSQL row not)
/// was compared with an unverified read and its row stored with `immudb_verified = false`.
/// With verification on, a redelivered event is proven before its row is written.
#[tokio::test(flavor = "multi_thread")]
async fn redelivered_events_found_in_immudb_are_proven_before_their_rows_are_written() {
    let world = World::new(&TOPICS[..1], 1).await;
    let corpus = valid_corpus(&world, 300, 1);
    // What a daemon killed between its immudb and its PostgreSQL write leaves behind, for the
    // first 200 events: 100 written by this version (audit entry and uniqueness key), 100 by a
    // version before uniqueness keys (audit entry only).
    let immudb = world.immudb().await;
    for (n, chunk) in corpus[..200].chunks(100).enumerate() {
        let payloads: Vec<Vec<u8>> = chunk
            .iter()
            .map(|(_, r)| r.payload.clone().expect("payload"))
            .collect();
        let events: Vec<_> = payloads
            .iter()
            .map(|p| audit_consumer::event::decode(p).expect("valid"))
            .collect();
        let keys: Vec<String> = events.iter().map(|e| e.immudb_key()).collect();
        let digests: Vec<[u8; 32]> = payloads.iter().map(|p| payload_sha256(p)).collect();
        let kvs: Vec<KeyValue> = (0..events.len())
            .flat_map(|i| {
                let candidate = Candidate {
                    event_id: events[i].event_id,
                    audit_key: &keys[i],
                    payload: &payloads[i],
                    digest: &digests[i],
                };
                let [audit, unique] = candidate.entries();
                if n == 0 {
                    vec![audit, unique]
                } else {
                    vec![audit]
                }
            })
            .collect();
        immudb.set_all(&kvs, true).await.expect("write");
    }
    world.produce_corpus(&corpus).await;
    let pg = world.pg().await;
    let daemon = world.start_daemon("a", &BTreeMap::new());
    world.wait_rows(&pg, 300, Duration::from_secs(60)).await;
    world.wait_committed_to_end(Duration::from_secs(60)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    assert_eq!(
        world.unverified_rows(&pg).await,
        0,
        "rows of redelivered events were stored without a proof"
    );
}
