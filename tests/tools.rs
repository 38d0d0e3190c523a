//! The operator tools (`verify`, `reconcile`, `replay-dlq`) as an operator runs them: the real
//! binary against the real stack, after the daemon filled the stores. Run
//! `deploy/local/stack.sh up` first (the README's test command does).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::time::Duration;

use common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// What a tool run printed and answered.
struct ToolRun {
    code: i32,
    stdout: String,
    stderr: String,
}

impl ToolRun {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON document ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    fn expect_code(&self, code: i32, what: &str) {
        assert_eq!(
            self.code, code,
            "{what}: exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
    }
}

/// Runs `audit-consumer <args>` with the world's daemon configuration (the least-privileged
/// writer login: the tools need no more), plus `extra` variables.
fn tool(world: &World, args: &[&str], extra: &[(&str, &str)]) -> ToolRun {
    let mut command = Command::new(env!("CARGO_BIN_EXE_audit-consumer"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(world.daemon_env(&BTreeMap::new()));
    for (name, value) in extra {
        command.env(name, value);
    }
    let output = tokio::task::block_in_place(|| command.output()).expect("run the tool");
    ToolRun {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn wait_rows(world: &World, pg: &PgPool, expected: i64) {
    world
        .wait_rows(pg, expected, Duration::from_secs(120))
        .await;
}

async fn wait_fully_committed(world: &World) {
    world.wait_committed_to_end(Duration::from_secs(120)).await;
}

/// Fills a one-topic world through the daemon and stops it; returns the stored ids.
async fn filled_world(events: usize) -> (World, PgPool, Vec<Uuid>) {
    let world = World::new(&["plant-lifecycle.v1"], 1).await;
    let corpus = valid_corpus(&world, events, 1);
    world.produce_corpus(&corpus).await;
    let daemon = world.start_daemon("a", &BTreeMap::new());
    let pg = world.pg().await;
    wait_rows(&world, &pg, events as i64).await;
    wait_fully_committed(&world).await;
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    (world, pg, corpus.into_iter().map(|(id, _)| id).collect())
}

/// Runs `statement` on audit_trail with its immutability trigger disabled: what a superuser
/// tampering behind the daemon's back does.
async fn behind_the_back(pg: &PgPool, statement: &str, ids: &[Uuid]) -> u64 {
    let mut tx = pg.begin().await.expect("begin");
    sqlx::query("ALTER TABLE audit_trail DISABLE TRIGGER audit_trail_no_update_delete")
        .execute(&mut *tx)
        .await
        .expect("disable trigger");
    let changed = sqlx::query(statement)
        .bind(ids)
        .execute(&mut *tx)
        .await
        .expect("tamper")
        .rows_affected();
    sqlx::query("ALTER TABLE audit_trail ENABLE TRIGGER audit_trail_no_update_delete")
        .execute(&mut *tx)
        .await
        .expect("enable trigger");
    tx.commit().await.expect("commit");
    changed
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_and_reconcile_report_a_row_altered_behind_the_daemons_back() {
    let (world, pg, ids) = filled_world(20).await;
    let (intact, victim) = (ids[3], ids[7]);

    let run = tool(&world, &["verify", "--event-id", &intact.to_string()], &[]);
    run.expect_code(0, "verify of an intact row");
    assert!(run.stdout.contains("VERIFIED"), "{}", run.stdout);
    let report = tool(
        &world,
        &["verify", "--event-id", &intact.to_string(), "--json"],
        &[],
    );
    report.expect_code(0, "verify --json of an intact row");
    let report = report.json();
    assert_eq!(report["verdict"], "verified");
    assert_eq!(report["proof_verified"], true);
    assert_eq!(report["digest"]["match"], true);
    assert_eq!(report["fields"].as_array().map(Vec::len), Some(22));
    // The proven state was persisted as the deployment's anchor.
    let trusted: Option<i64> =
        sqlx::query_scalar("SELECT tx_id FROM immudb_trusted_state WHERE immudb_database = $1")
            .bind(world.immudb_database.to_lowercase())
            .fetch_optional(&pg)
            .await
            .expect("read trusted state");
    assert!(trusted.is_some_and(|tx| tx > 0), "{trusted:?}");

    let changed = behind_the_back(
        &pg,
        r#"UPDATE audit_trail SET new_value = '{"stage": "HARVESTED"}' WHERE event_id = ANY($1)"#,
        &[victim],
    )
    .await;
    assert_eq!(changed, 1);

    let run = tool(&world, &["verify", "--event-id", &victim.to_string()], &[]);
    run.expect_code(1, "verify of the altered row");
    assert!(run.stdout.contains("new_value"), "{}", run.stdout);
    assert!(run.stdout.contains("DIFFERS"), "{}", run.stdout);
    assert!(run.stdout.contains("HARVESTED"), "{}", run.stdout);
    let report = tool(
        &world,
        &["verify", "--event-id", &victim.to_string(), "--json"],
        &[],
    );
    report.expect_code(1, "verify --json of the altered row");
    let report = report.json();
    assert_eq!(report["verdict"], "mismatch");
    // immudb itself is intact: its proof holds, PostgreSQL is what changed.
    assert_eq!(report["proof_verified"], true);
    assert_eq!(report["differing_fields"], serde_json::json!(["new_value"]));

    let run = tool(&world, &["reconcile"], &[]);
    run.expect_code(1, "reconcile with an altered row");
    assert!(run.stdout.contains(&victim.to_string()), "{}", run.stdout);
    assert!(run.stdout.contains("new_value"), "{}", run.stdout);
    let report = tool(&world, &["reconcile", "--json"], &[]);
    report.expect_code(1, "reconcile --json with an altered row");
    let report = report.json();
    let summary = &report["summary"];
    assert_eq!(summary["rows_checked"], 20);
    assert_eq!(summary["immudb_entries_scanned"], 20);
    assert_eq!(summary["differing"], 1);
    assert_eq!(summary["missing_in_immudb"], 0);
    assert_eq!(summary["missing_in_postgres"], 0);
    let findings = report["findings"].as_array().expect("findings");
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0]["kind"], "differing");
    assert_eq!(findings[0]["event_id"], victim.to_string());
    assert_eq!(findings[0]["fields"][0]["field"], "new_value");
    // The evidence is never overwritten.
    let still: Value = sqlx::query_scalar("SELECT new_value FROM audit_trail WHERE event_id = $1")
        .bind(victim)
        .fetch_one(&pg)
        .await
        .expect("read the altered row");
    assert_eq!(still, serde_json::json!({"stage": "HARVESTED"}));

    // A time window that excludes every event checks nothing and finds nothing.
    let report = tool(
        &world,
        &["reconcile", "--json", "--since", "2030-01-01T00:00:00Z"],
        &[],
    );
    report.expect_code(0, "reconcile of an empty window");
    assert_eq!(report.json()["summary"]["rows_checked"], 0);

    // An event the replica never had.
    tool(
        &world,
        &["verify", "--event-id", &Uuid::new_v4().to_string()],
        &[],
    )
    .expect_code(1, "verify of an unknown event");
    // Usage errors.
    tool(&world, &["verify", "--event-id", "not-a-uuid"], &[]).expect_code(2, "bad uuid");
    tool(&world, &["reconcile", "--since", "yesterday"], &[]).expect_code(2, "bad time");
    // A store that does not answer: no verdict.
    let run = tool(
        &world,
        &["verify", "--event-id", &intact.to_string(), "--json"],
        &[("IMMUDB_PORT", "1")],
    );
    run.expect_code(3, "verify with immudb unreachable");
    assert_eq!(run.json()["verdict"], "incomplete");
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_restores_rows_deleted_from_postgres() {
    // More than two pages each way (1,000 rows per PostgreSQL page and per immudb scan).
    const EVENTS: usize = 2300;
    let (world, pg, ids) = filled_world(EVENTS).await;
    let victims: Vec<Uuid> = ids.iter().step_by(EVENTS / 5).copied().collect();
    assert_eq!(victims.len(), 5);
    let before: Vec<(Uuid, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT event_id, immudb_tx, payload_sha256 FROM audit_trail WHERE event_id = ANY($1) \
         ORDER BY event_id",
    )
    .bind(&victims)
    .fetch_all(&pg)
    .await
    .expect("read victims");
    let deleted = behind_the_back(
        &pg,
        "DELETE FROM audit_trail WHERE event_id = ANY($1)",
        &victims,
    )
    .await;
    assert_eq!(deleted, 5);

    let report = tool(&world, &["reconcile", "--json"], &[]);
    report.expect_code(1, "reconcile with deleted rows");
    let report = report.json();
    assert_eq!(report["summary"]["rows_checked"], EVENTS - 5);
    assert_eq!(report["summary"]["immudb_entries_scanned"], EVENTS);
    assert_eq!(report["summary"]["missing_in_postgres"], 5);
    assert_eq!(report["summary"]["repaired"], 0);
    let reported: HashSet<String> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["kind"] == "missing_in_postgres")
        .filter_map(|f| f["event_id"].as_str().map(str::to_owned))
        .collect();
    let expected: HashSet<String> = victims.iter().map(Uuid::to_string).collect();
    assert_eq!(reported, expected);
    assert_eq!(
        world.pg_count(&pg).await,
        EVENTS as i64 - 5,
        "reconcile without --repair wrote"
    );

    let run = tool(&world, &["reconcile", "--repair"], &[]);
    run.expect_code(0, "reconcile --repair");
    assert!(run.stdout.contains("REPAIRED"), "{}", run.stdout);
    assert_eq!(world.pg_count(&pg).await, EVENTS as i64);
    let after: Vec<(Uuid, i64, Vec<u8>, String, i32, i64)> = sqlx::query_as(
        "SELECT event_id, immudb_tx, payload_sha256, source_topic, source_partition, source_offset \
         FROM audit_trail WHERE event_id = ANY($1) ORDER BY event_id",
    )
    .bind(&victims)
    .fetch_all(&pg)
    .await
    .expect("read restored rows");
    assert_eq!(after.len(), 5);
    for ((id, tx, digest), (id2, tx2, digest2, topic, partition, offset)) in
        before.iter().zip(&after)
    {
        assert_eq!(
            (id, tx, digest),
            (id2, tx2, digest2),
            "restored row differs"
        );
        assert_eq!((topic.as_str(), *partition, *offset), ("reconcile", 0, 0));
    }

    let run = tool(&world, &["reconcile"], &[]);
    run.expect_code(0, "reconcile after the repair");
    assert!(run.stdout.contains("CLEAN"), "{}", run.stdout);
    let report = tool(&world, &["reconcile", "--json"], &[]).json();
    assert_eq!(report["summary"]["rows_checked"], EVENTS);
    assert_eq!(report["summary"]["missing_in_postgres"], 0);
    // A restored row proves like any other.
    tool(
        &world,
        &["verify", "--event-id", &victims[0].to_string()],
        &[],
    )
    .expect_code(0, "verify of a restored row");
}

/// End offset of the world's DLQ topic (one partition).
fn dlq_end(world: &World) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &world.stack.brokers)
        .create()
        .expect("consumer");
    consumer
        .fetch_watermarks(&world.dlq_topic, 0, Duration::from_secs(10))
        .expect("watermarks")
        .1
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_dlq_stores_dead_letters_once_after_their_cause_is_fixed() {
    let world = World::new(&["plant-lifecycle.v1"], 1).await;
    let pg = world.pg().await;
    // A rule of the replica the contract does not have: these rows are dead-lettered with
    // class invalid, stage postgres (after immudb stored them).
    sqlx::query(
        "ALTER TABLE audit_trail ADD CONSTRAINT no_quarantine CHECK (entity_id NOT LIKE 'plant-4%')",
    )
    .execute(&pg)
    .await
    .expect("add constraint");
    let corpus = valid_corpus(&world, 300, 1);
    let mut records: Vec<TestRecord> = corpus.iter().map(|(_, r)| r.clone()).collect();
    for n in 0..3 {
        records.push(TestRecord {
            topic: world.topics[0].clone(),
            partition: 0,
            key: None,
            payload: Some(format!("not json {n}").into_bytes()),
            headers: vec![],
        });
    }
    world.produce(&records).await;
    // valid_corpus uses entity_id "plant-{n % 97}".
    let rejected: Vec<Uuid> = corpus
        .iter()
        .enumerate()
        .filter(|(n, _)| format!("{}", n % 97).starts_with('4'))
        .map(|(_, (id, _))| *id)
        .collect();
    let stored_first = (corpus.len() - rejected.len()) as i64;
    let daemon = world.start_daemon("a", &BTreeMap::new());
    wait_fully_committed(&world).await;
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    let dlq = world
        .dlq_records(rejected.len() + 3, Duration::from_secs(30))
        .await;
    assert_eq!(dlq.len(), rejected.len() + 3);
    assert_eq!(world.pg_count(&pg).await, stored_first);
    let dlq_size = dlq_end(&world);

    // The cause is fixed.
    sqlx::query("ALTER TABLE audit_trail DROP CONSTRAINT no_quarantine")
        .execute(&pg)
        .await
        .expect("drop constraint");

    let dry = tool(&world, &["replay-dlq", "--dry-run", "--json"], &[]);
    dry.expect_code(1, "dry run (the non-JSON records stay invalid)");
    let dry = dry.json();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["total"]["stored"], rejected.len());
    assert_eq!(dry["total"]["still_invalid"], 3);
    assert_eq!(dry["committed"], serde_json::json!({}));
    assert_eq!(world.pg_count(&pg).await, stored_first, "the dry run wrote");

    // A filter that selects nothing reads everything, stores nothing, and does not move the
    // group past the records it skipped.
    let none = tool(
        &world,
        &["replay-dlq", "--reason", "conflict", "--json"],
        &[],
    );
    none.expect_code(0, "replay of conflicts only");
    let none = none.json();
    assert_eq!(none["skipped_by_filter"], rejected.len() + 3);
    assert_eq!(none["total"]["read"], 0);
    assert_eq!(none["committed"]["0"], 0);

    let run = tool(&world, &["replay-dlq", "--json"], &[]);
    run.expect_code(1, "replay (the non-JSON records stay invalid)");
    let report = run.json();
    let by_reason = report["by_reason"].as_array().expect("by_reason");
    let reason = |stage: &str| {
        by_reason
            .iter()
            .find(|r| r["class"] == "invalid" && r["stage"] == stage)
            .unwrap_or_else(|| panic!("no invalid/{stage} line in {by_reason:?}"))
            .clone()
    };
    let postgres = reason("postgres");
    assert_eq!(postgres["read"], rejected.len());
    assert_eq!(postgres["stored"], rejected.len());
    assert_eq!(postgres["conflicting"], 0);
    let decode = reason("decode");
    assert_eq!(decode["read"], 3);
    assert_eq!(decode["still_invalid"], 3);
    assert_eq!(decode["stored"], 0);
    let problems = report["problems"].as_array().expect("problems");
    assert_eq!(problems.len(), 3);
    assert!(problems.iter().all(|p| p["kind"] == "still_invalid"));
    assert_eq!(report["committed"]["0"], dlq_size);

    // Each replayed event: one PG row with its original coordinates, one immudb revision.
    assert_eq!(world.pg_count(&pg).await, corpus.len() as i64);
    let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT event_id, source_topic, immudb_key FROM audit_trail WHERE event_id = ANY($1)",
    )
    .bind(&rejected)
    .fetch_all(&pg)
    .await
    .expect("read replayed rows");
    assert_eq!(rows.len(), rejected.len());
    let immudb = world.immudb().await;
    for (id, topic, key) in &rows {
        assert_eq!(topic, &world.topics[0], "{id}: source_topic");
        let history = immudb.history(key.as_bytes()).await.expect("history");
        assert_eq!(history.len(), 1, "{id}: immudb revisions");
    }
    // Nothing went back to the DLQ.
    assert_eq!(dlq_end(&world), dlq_size);

    // Again: the group is at the end, nothing is read.
    let again = tool(&world, &["replay-dlq", "--json"], &[]);
    again.expect_code(0, "second replay");
    let again = again.json();
    assert_eq!(again["records_read"], 0);
    assert_eq!(again["total"]["stored"], 0);
    // Even re-reading everything stores nothing new: the path is idempotent.
    let full = tool(&world, &["replay-dlq", "--from-beginning", "--json"], &[]);
    full.expect_code(1, "full re-read (the non-JSON records stay invalid)");
    let full = full.json();
    assert_eq!(full["total"]["stored"], 0);
    assert_eq!(full["total"]["duplicate"], rejected.len());
    assert_eq!(full["total"]["still_invalid"], 3);
    assert_eq!(world.pg_count(&pg).await, corpus.len() as i64);
    for (id, _, key) in &rows {
        let history = immudb.history(key.as_bytes()).await.expect("history");
        assert_eq!(
            history.len(),
            1,
            "{id}: immudb revisions after the second replay"
        );
    }
    let human = tool(
        &world,
        &["replay-dlq", "--from-beginning", "--dry-run"],
        &[],
    );
    human.expect_code(1, "human dry run");
    assert!(human.stdout.contains("STILL INVALID"), "{}", human.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_verified_events_and_verify_passes_on_a_hundred_random_rows() {
    let world = World::new(&["plant-lifecycle.v1", "financial.v1"], 2).await;
    let pg = world.pg().await;
    let corpus = valid_corpus(&world, 10_000, 2);
    world.produce_corpus(&corpus).await;
    let daemon = world.start_daemon("a", &BTreeMap::new());
    wait_rows(&world, &pg, 10_000).await;
    wait_fully_committed(&world).await;
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());

    let unverified = world.unverified_rows(&pg).await;
    assert_eq!(
        unverified, 0,
        "every row was written with a verified immudb transaction"
    );
    let sample: Vec<(Uuid,)> =
        sqlx::query_as("SELECT event_id FROM audit_trail ORDER BY random() LIMIT 100")
            .fetch_all(&pg)
            .await
            .expect("sample");
    assert_eq!(sample.len(), 100);
    for (id,) in sample {
        tool(&world, &["verify", "--event-id", &id.to_string()], &[])
            .expect_code(0, &format!("verify {id}"));
    }
}
