//! Fault injection on the real stack: stores stopped for a minute under a steady stream, the
//! broker restarted, members killed and added. These tests stop shared servers, so they run one
//! at a time (a process-wide lock) and in their own test binary (cargo runs binaries one after
//! another, so no other test sees the outage). Each measured recovery time is printed and
//! appended to `$CARGO_TARGET_TMPDIR/recovery.txt`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use audit_consumer::immudb::KeyValue;
use common::*;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const TOPICS: [&str; 2] = ["plant-lifecycle.v1", "financial.v1"];

/// One fault-injection test at a time (an async lock: each test has its own runtime, and the
/// guard is held across awaits).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Restarts a stopped server when the test ends, whatever happened, so one failure does not
/// cascade into the next test.
struct Outage<'a> {
    world: &'a World,
    service: &'static str,
    restored: bool,
}

impl<'a> Outage<'a> {
    fn begin(world: &'a World, service: &'static str) -> Self {
        stack(world, &["stop", service]);
        Outage {
            world,
            service,
            restored: false,
        }
    }

    fn end(&mut self) {
        stack(self.world, &["start", self.service]);
        self.restored = true;
    }
}

impl Drop for Outage<'_> {
    fn drop(&mut self) {
        if !self.restored {
            stack(self.world, &["start", self.service]);
        }
    }
}

/// Overrides that make retries and probes quick, so an outage is detected in seconds.
fn fast_failure() -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("RETRY_MAX_ATTEMPTS", "2".to_owned()),
        ("RETRY_INITIAL_DELAY", "200ms".to_owned()),
        ("RETRY_MAX_DELAY", "1s".to_owned()),
        ("CIRCUIT_COOLDOWN", "1s".to_owned()),
        ("IMMUDB_REQUEST_TIMEOUT", "3s".to_owned()),
        ("KAFKA_BATCH_SIZE", "200".to_owned()),
    ])
}

/// Produces `per_tick` events every 100 ms until `stop`; returns the ids produced.
fn steady_stream(
    world: Arc<World>,
    per_tick: usize,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<Uuid>> {
    tokio::spawn(async move {
        let mut produced = Vec::new();
        let mut pace = tokio::time::interval(Duration::from_millis(100));
        while !stop.is_cancelled() {
            pace.tick().await;
            let corpus = valid_corpus(&world, per_tick, 3);
            world.produce_corpus(&corpus).await;
            produced.extend(corpus.into_iter().map(|(id, _)| id));
        }
        produced
    })
}

fn record_figure(line: &str) {
    eprintln!("{line}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("recovery.txt");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
}

/// Event ids named in the DLQ (its records are our own valid payloads).
fn dlq_ids(records: &[DlqRecord]) -> Vec<(Uuid, String, String)> {
    records
        .iter()
        .filter_map(|r| {
            let payload: serde_json::Value = serde_json::from_slice(r.payload.as_deref()?).ok()?;
            let id = payload["event_id"].as_str()?.parse().ok()?;
            Some((
                id,
                r.headers["dlq.error.class"].clone(),
                r.headers["dlq.error.stage"].clone(),
            ))
        })
        .collect()
}

/// Every produced event is accounted for exactly once: stored once in both stores, or parked in
/// the DLQ (and then not in PostgreSQL).
async fn assert_no_loss_no_duplicates(world: &World, produced: &[Uuid]) -> usize {
    let pg = world.pg().await;
    let dlq_count = world.dlq_records(usize::MAX, Duration::from_secs(5)).await;
    let parked = dlq_ids(&dlq_count);
    let parked_ids: HashSet<Uuid> = parked.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(
        parked_ids.len(),
        parked.len(),
        "an event was dead-lettered twice"
    );
    for (id, class, _) in &parked {
        assert_eq!(class, "retry_exhausted", "{id} dead-lettered as {class}");
    }
    let rows: Vec<(Uuid,)> = sqlx::query_as("SELECT event_id FROM audit_trail")
        .fetch_all(&pg)
        .await
        .expect("rows");
    let stored: HashSet<Uuid> = rows.iter().map(|r| r.0).collect();
    assert_eq!(stored.len(), rows.len());
    let expected: HashSet<Uuid> = produced
        .iter()
        .copied()
        .filter(|id| !parked_ids.contains(id))
        .collect();
    assert!(
        stored.is_disjoint(&parked_ids),
        "an event is both stored and dead-lettered"
    );
    assert_eq!(
        stored.len(),
        expected.len(),
        "stored {} of {} expected",
        stored.len(),
        expected.len()
    );
    assert_eq!(
        stored, expected,
        "stored events differ from the produced ones"
    );

    let immudb = world.immudb().await;
    let stored: Vec<Uuid> = stored.into_iter().collect();
    for chunk in stored.chunks(500) {
        let keys: Vec<Vec<u8>> = chunk
            .iter()
            .map(|id| format!("audit:plant:{id}").into_bytes())
            .collect();
        let entries = immudb.get_all(&keys).await.expect("get_all");
        assert_eq!(entries.len(), keys.len(), "stored rows missing in immudb");
        assert!(
            entries.iter().all(|e| e.revision == 1),
            "a second immudb revision"
        );
    }
    parked.len()
}

/// The shared outage scenario: a steady stream, `service` down for `outage`, then back.
async fn store_outage(service: &'static str, outage: Duration) {
    let _serial = serial().await;
    let world = Arc::new(World::new(&TOPICS, 3).await);
    let pg = world.pg().await;
    let mut daemon = world.start_daemon("a", &fast_failure());
    let addr = daemon.http_addr().await;
    wait_until("/ready 200", Duration::from_secs(60), || async {
        matches!(http_get(addr, "/ready").await, Ok((200, _))).then_some(())
    })
    .await;

    let stop_stream = CancellationToken::new();
    let stream = steady_stream(world.clone(), 50, stop_stream.clone());
    wait_until("the first rows", Duration::from_secs(60), || async {
        (world.pg_count(&pg).await > 0).then_some(())
    })
    .await;

    let mut fault = Outage::begin(&world, service);
    let down_at = Instant::now();
    let body = wait_until(
        "/ready 503 naming the store",
        Duration::from_secs(30),
        || async {
            match http_get(addr, "/ready").await {
                Ok((503, body)) if body.contains(service) => Some(body),
                _ => None,
            }
        },
    )
    .await;
    record_figure(&format!(
        "{service} outage: /ready turned 503 after {:.1}s: {body}",
        down_at.elapsed().as_secs_f64()
    ));
    wait_until(
        "the circuit to open and fetching to pause",
        Duration::from_secs(60),
        || async {
            let scrape = http_get(addr, "/metrics")
                .await
                .map(|(_, b)| b)
                .unwrap_or_default();
            let open = metric_value(
                &scrape,
                &format!("audit_circuit_breaker_state{{service=\"{service}\"}}"),
            ) == Some(2.0);
            let paused = metric_value(&scrape, "audit_consumer_paused") == Some(1.0);
            (open && paused).then_some(())
        },
    )
    .await;

    // While paused: liveness stays green and memory does not grow, whatever arrives on Kafka.
    let rss_paused = daemon.rss_bytes();
    let mut rss_max = rss_paused;
    let mut pace = tokio::time::interval(Duration::from_secs(1));
    while down_at.elapsed() < outage {
        pace.tick().await;
        let (status, _) = http_get(addr, "/health")
            .await
            .expect("/health answers during the outage");
        assert_eq!(
            status, 200,
            "liveness must not fail because a store is down"
        );
        rss_max = rss_max.max(daemon.rss_bytes());
        assert!(daemon.is_running());
    }
    record_figure(&format!(
        "{service} outage: RSS {} MiB when paused, at most {} MiB during {}s paused",
        rss_paused >> 20,
        rss_max >> 20,
        outage.as_secs()
    ));
    assert!(
        rss_max <= rss_paused + (16 << 20),
        "RSS grew from {rss_paused} to {rss_max} bytes while paused"
    );

    fault.end();
    let back_at = Instant::now();
    wait_until(
        "/ready 200 after the store returned",
        Duration::from_secs(60),
        || async { matches!(http_get(addr, "/ready").await, Ok((200, _))).then_some(()) },
    )
    .await;
    let ready_after = back_at.elapsed();
    stop_stream.cancel();
    let produced = stream.await.expect("stream task");
    world.wait_committed_to_end(Duration::from_secs(180)).await;
    let lag_zero_after = back_at.elapsed();
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    let parked = assert_no_loss_no_duplicates(&world, &produced).await;
    record_figure(&format!(
        "{service} outage of {}s: /ready true {:.1}s and lag 0 {:.1}s after the store returned; \
         {} events produced, {parked} parked in the DLQ (retry_exhausted), the rest stored once",
        outage.as_secs(),
        ready_after.as_secs_f64(),
        lag_zero_after.as_secs_f64(),
        produced.len()
    ));
    // At most the batches in flight when the outage began are parked: one per topic writer
    // plus the one queued behind it.
    assert!(
        parked <= TOPICS.len() * 2 * 200,
        "{parked} events parked: the stream was drained into the DLQ"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn immudb_down_for_a_minute_pauses_and_recovers_without_loss() {
    store_outage("immudb", Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_down_for_a_minute_pauses_and_recovers_without_loss() {
    store_outage("postgres", Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_restart_mid_stream_loses_nothing() {
    let _serial = serial().await;
    let world = Arc::new(World::new(&TOPICS, 3).await);
    let pg = world.pg().await;
    let daemon = world.start_daemon("a", &BTreeMap::new());
    let stop_stream = CancellationToken::new();
    let stream = steady_stream(world.clone(), 50, stop_stream.clone());
    wait_until("the first rows", Duration::from_secs(60), || async {
        (world.pg_count(&pg).await > 0).then_some(())
    })
    .await;
    let restarted_at = Instant::now();
    stack(&world, &["restart", "kafka"]);
    let rows_at_restart = world.pg_count(&pg).await;
    wait_until(
        "progress after the broker came back",
        Duration::from_secs(120),
        || async { (world.pg_count(&pg).await > rows_at_restart + 500).then_some(()) },
    )
    .await;
    stop_stream.cancel();
    let produced = stream.await.expect("stream task");
    world.wait_committed_to_end(Duration::from_secs(120)).await;
    record_figure(&format!(
        "kafka restart: lag 0 {:.1}s after the restart began; {} events",
        restarted_at.elapsed().as_secs_f64(),
        produced.len()
    ));
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    let parked = assert_no_loss_no_duplicates(&world, &produced).await;
    assert_eq!(parked, 0, "a broker restart must not dead-letter anything");
}

#[tokio::test(flavor = "multi_thread")]
async fn three_members_one_killed_one_added_store_200k_events_exactly_once() {
    let _serial = serial().await;
    let world = World::new(&["plant-lifecycle.v1"], 12).await;
    let pg = world.pg().await;
    let corpus = valid_corpus(&world, 200_000, 12);
    world.produce_corpus(&corpus).await;
    let ids: Vec<Uuid> = corpus.into_iter().map(|(id, _)| id).collect();
    let started = Instant::now();
    let a = world.start_daemon("a", &BTreeMap::new());
    let b = world.start_daemon("b", &BTreeMap::new());
    let c = world.start_daemon("c", &BTreeMap::new());
    wait_until(
        "a third of the events",
        Duration::from_secs(300),
        || async { (world.pg_count(&pg).await > 60_000).then_some(()) },
    )
    .await;
    b.kill();
    wait_until("half of the events", Duration::from_secs(300), || async {
        (world.pg_count(&pg).await > 100_000).then_some(())
    })
    .await;
    let d = world.start_daemon("d", &BTreeMap::new());
    wait_until("all 200,000 rows", Duration::from_secs(600), || async {
        (world.pg_count(&pg).await >= 200_000).then_some(())
    })
    .await;
    world.wait_committed_to_end(Duration::from_secs(120)).await;
    record_figure(&format!(
        "3 members, 12 partitions, 200,000 events, one killed and one added: all committed after {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    for daemon in [a, c, d] {
        assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    }
    assert_eq!(assert_no_loss_no_duplicates(&world, &ids).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_refusing_for_privileges_holds_batches_instead_of_draining_into_the_dlq() {
    let _serial = serial().await;
    let world = World::new(&TOPICS[..1], 1).await;
    let pg = world.pg().await;
    // A misconfiguration, not bad data: the daemon's role may no longer insert (SQLSTATE 42501).
    sqlx::query("REVOKE INSERT ON audit_trail FROM audit_writer")
        .execute(&pg)
        .await
        .expect("revoke");
    let corpus = valid_corpus(&world, 300, 1);
    world.produce_corpus(&corpus).await;
    let daemon = world.start_daemon("a", &fast_failure());
    let addr = daemon.http_addr().await;
    wait_until(
        "/ready to name the open postgres circuit",
        Duration::from_secs(60),
        || async {
            match http_get(addr, "/ready").await {
                Ok((503, body)) if body.contains("postgres: circuit") => Some(()),
                _ => None,
            }
        },
    )
    .await;
    // Several probe-and-retry rounds fail; none of them may dead-letter anything.
    wait_until(
        "repeated refused inserts",
        Duration::from_secs(60),
        || async {
            let (_, scrape) = http_get(addr, "/metrics").await.ok()?;
            let refused = metric_value(
                &scrape,
                "audit_postgres_operations_total{operation=\"insert\",status=\"error\"}",
            )?;
            (refused >= 3.0).then_some(())
        },
    )
    .await;
    assert!(
        world
            .dlq_records(1, Duration::from_secs(2))
            .await
            .is_empty(),
        "a misconfiguration drained events into the DLQ"
    );
    assert!(
        world
            .committed()
            .values()
            .all(|offset| offset.is_none_or(|o| o == 0)),
        "committed past unstored events"
    );

    sqlx::query("GRANT INSERT ON audit_trail TO audit_writer")
        .execute(&pg)
        .await
        .expect("grant");
    world.wait_committed_to_end(Duration::from_secs(60)).await;
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
    let ids: Vec<Uuid> = corpus.iter().map(|(id, _)| *id).collect();
    assert_eq!(assert_no_loss_no_duplicates(&world, &ids).await, 0);
}

/// Copies a directory tree (the immudb data dir) with `cp -a`.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(
        status.success(),
        "copying {} to {}",
        from.display(),
        to.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolled_back_immudb_is_refused_by_the_daemon_and_its_audit() {
    let _serial = serial().await;
    let world = Arc::new(World::new(&TOPICS[..1], 1).await);
    let pg = world.pg().await;
    let stack_dir = std::path::PathBuf::from(
        std::env::var("AUDIT_STACK_DIR").unwrap_or_else(|_| "/tmp/audit-consumer-stack".into()),
    );
    let data = stack_dir.join("immudb").join("data");
    let snapshot = std::env::temp_dir().join(unique("immudb-snapshot-"));
    let overrides = BTreeMap::from([("AUDIT_INTERVAL", "1s".to_owned())]);

    let first = valid_corpus(&world, 300, 1);
    world.produce_corpus(&first).await;
    let daemon = world.start_daemon("a", &overrides);
    wait_until("the first 300 rows", Duration::from_secs(60), || async {
        (world.pg_count(&pg).await >= 300).then_some(())
    })
    .await;

    // The attacker's copy of the data directory at tx N.
    {
        let mut outage = Outage::begin(&world, "immudb");
        copy_tree(&data, &snapshot);
        outage.end();
    }
    // The daemon keeps writing to tx M > N and trusts M.
    let second = valid_corpus(&world, 300, 1);
    world.produce_corpus(&second).await;
    wait_until("600 rows", Duration::from_secs(120), || async {
        (world.pg_count(&pg).await >= 600).then_some(())
    })
    .await;
    let trusted_before: i64 = sqlx::query_scalar("SELECT tx_id FROM immudb_trusted_state")
        .fetch_one(&pg)
        .await
        .expect("trusted state");

    // Roll immudb back to the copy.
    {
        let mut outage = Outage::begin(&world, "immudb");
        std::fs::remove_dir_all(&data).expect("remove data");
        copy_tree(&snapshot, &data);
        outage.end();
    }
    std::fs::remove_dir_all(&snapshot).ok();

    // Writing stops and the daemon says why: /ready names the tampering, the counter moves,
    // new events are not stored on top of the rolled-back history.
    let addr = daemon.http_addr().await;
    let third = valid_corpus(&world, 50, 1);
    world.produce_corpus(&third).await;
    wait_until(
        "/ready to report the failed verification",
        Duration::from_secs(60),
        || async {
            match http_get(addr, "/ready").await {
                Ok((503, body)) if body.contains("tamper suspected") => Some(()),
                _ => None,
            }
        },
    )
    .await;
    let (_, scrape) = http_get(addr, "/metrics").await.expect("metrics");
    assert!(metric_value(&scrape, "audit_verification_failures_total").unwrap_or(0.0) >= 1.0);
    assert!(
        matches!(http_get(addr, "/health").await, Ok((200, _))),
        "tampering must not restart-loop the pod"
    );
    let log = std::fs::read_to_string(&daemon.log).expect("log");
    assert!(
        log.contains("tamper_suspected"),
        "the critical event is logged"
    );
    assert_eq!(
        world.pg_count(&pg).await,
        600,
        "nothing is written on top of a rolled-back immudb"
    );
    let trusted_after: i64 = sqlx::query_scalar("SELECT tx_id FROM immudb_trusted_state")
        .fetch_one(&pg)
        .await
        .expect("trusted state");
    assert_eq!(
        trusted_after, trusted_before,
        "the trusted state never moves back"
    );
    assert!(daemon.terminate(Duration::from_secs(40)).await.success());

    // `verify` refuses an event written after the copy: the server no longer proves it.
    let (late_id, _) = &second[0];
    let verify = std::process::Command::new(env!("CARGO_BIN_EXE_audit-consumer"))
        .args(["verify", "--event-id", &late_id.to_string()])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(world.daemon_env(&BTreeMap::new()))
        .output()
        .expect("run verify");
    assert_eq!(
        verify.status.code(),
        Some(1),
        "verify must fail against the rolled-back server:\n{}\n{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // A restart refuses to start against the rolled-back server.
    let mut restarted = world.start_daemon("b", &overrides);
    wait_until(
        "the restarted daemon to refuse and exit",
        Duration::from_secs(60),
        || {
            let running = restarted.is_running();
            async move { (!running).then_some(()) }
        },
    )
    .await;
    let log = std::fs::read_to_string(&restarted.log).expect("log");
    assert!(
        log.contains("tamper or rollback suspected"),
        "the refusal says why: {log}"
    );
    assert_eq!(world.pg_count(&pg).await, 600);
}

/// The immudb data directory of the local stack.
fn immudb_data_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(
        std::env::var("AUDIT_STACK_DIR").unwrap_or_else(|_| "/tmp/audit-consumer-stack".into()),
    )
    .join("immudb")
    .join("data")
}

/// An attacker's copy of immudb's data directory as it is now (immudb stopped for the copy).
fn snapshot_immudb(world: &World) -> std::path::PathBuf {
    let snapshot = std::env::temp_dir().join(unique("immudb-snapshot-"));
    let mut outage = Outage::begin(world, "immudb");
    copy_tree(&immudb_data_dir(), &snapshot);
    outage.end();
    snapshot
}

/// Replaces immudb's data directory by an older copy: a rollback of the system of record.
fn roll_back_immudb(world: &World, snapshot: &std::path::Path) {
    let data = immudb_data_dir();
    let mut outage = Outage::begin(world, "immudb");
    std::fs::remove_dir_all(&data).expect("remove data");
    copy_tree(snapshot, &data);
    outage.end();
    std::fs::remove_dir_all(snapshot).ok();
}

/// The shared trusted state row.
async fn trusted_row(pg: &sqlx::PgPool) -> (i64, Vec<u8>) {
    sqlx::query_as("SELECT tx_id, tx_hash FROM immudb_trusted_state")
        .fetch_one(pg)
        .await
        .expect("trusted state")
}

/// PostgreSQL rows whose entry exists in immudb's *current* history beyond `fork_point`: rows
/// written on top of a rolled-back server.
async fn rows_on_the_fork(world: &World, pg: &sqlx::PgPool, fork_point: u64) -> Vec<String> {
    let keys: Vec<(String,)> = sqlx::query_as("SELECT immudb_key FROM audit_trail")
        .fetch_all(pg)
        .await
        .expect("keys");
    let immudb = world.immudb().await;
    let mut on_fork = Vec::new();
    for chunk in keys.chunks(500) {
        let keys: Vec<Vec<u8>> = chunk.iter().map(|(k,)| k.clone().into_bytes()).collect();
        for entry in immudb.get_all(&keys).await.expect("get_all") {
            if entry.tx > fork_point {
                on_fork.push(String::from_utf8_lossy(&entry.key).into_owned());
            }
        }
    }
    on_fork
}

/// A rollback while all four topics stream: every writer stops on its own failed proof or on
/// the latch another one set, and nothing is written on top of the rolled-back history.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_under_four_streaming_topics_stops_every_writer() {
    let _serial = serial().await;
    let topics = [
        "plant-lifecycle.v1",
        "financial.v1",
        "user-actions.v1",
        "system.v1",
    ];
    let world = Arc::new(World::new(&topics, 3).await);
    let pg = world.pg().await;
    let daemon = world.start_daemon(
        "a",
        &BTreeMap::from([("KAFKA_BATCH_SIZE", "50".to_owned())]),
    );
    let stop_stream = CancellationToken::new();
    let stream = steady_stream(world.clone(), 20, stop_stream.clone());
    wait_until("the first rows", Duration::from_secs(60), || async {
        (world.pg_count(&pg).await > 200).then_some(())
    })
    .await;
    let immudb = world.immudb().await;
    let fork_point = immudb.current_state().await.expect("state").tx_id;
    immudb.close().await;
    let snapshot = snapshot_immudb(&world);
    wait_until(
        "rows past the snapshot",
        Duration::from_secs(60),
        || async {
            let (tx, _) = trusted_row(&pg).await;
            (tx as u64 > fork_point + 8).then_some(())
        },
    )
    .await;
    roll_back_immudb(&world, &snapshot);

    wait_until(
        "every topic's writer to hold behind the tamper latch",
        Duration::from_secs(60),
        || async {
            let held: HashSet<String> = daemon
                .log_lines()
                .into_iter()
                .filter(|l| l["message"] == "tamper suspected: holding the batch until a restart")
                .filter_map(|l| l["span"]["topic"].as_str().map(str::to_owned))
                .collect();
            (held.len() == topics.len()).then_some(())
        },
    )
    .await;
    let trusted = trusted_row(&pg).await;
    let rows = world.pg_count(&pg).await;
    stop_stream.cancel();
    stream.await.expect("stream");
    let addr = daemon.http_addr().await;
    let (status, body) = http_get(addr, "/ready").await.expect("ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("tamper suspected"), "{body}");
    assert_eq!(
        world.pg_count(&pg).await,
        rows,
        "rows written after every writer held"
    );
    assert_eq!(trusted_row(&pg).await, trusted, "the trusted state moved");
    let on_fork = rows_on_the_fork(&world, &pg, fork_point).await;
    assert!(
        on_fork.is_empty(),
        "rows written on top of the rollback: {on_fork:?}"
    );
    assert!(daemon.terminate(Duration::from_secs(40)).await.success());
}

/// Two replicas share one trusted state. One (A) is anchored behind the other (B); immudb is
/// rolled back to a point between their anchors and grown past both. A's own anchor is a prefix
/// of the forked history, so its proof alone holds: it must check the shared row's newer state
/// before moving it, and neither replica may store a row or move the row onto the fork.
#[tokio::test(flavor = "multi_thread")]
async fn a_lagging_replica_never_moves_the_shared_trusted_state_onto_a_forked_history() {
    let _serial = serial().await;
    let world = World::new(&["a.v1", "b.v1"], 1).await;
    let pg = world.pg().await;
    let (topic_a, topic_b) = (world.topics[0].clone(), world.topics[1].clone());
    let replica = |topic: &str, group: &str| {
        BTreeMap::from([
            ("KAFKA_TOPICS", topic.to_owned()),
            ("KAFKA_GROUP_ID", format!("{}-{group}", world.group)),
            // No audit round moves an anchor during the test: only the writes do.
            ("AUDIT_INTERVAL", "1h".to_owned()),
        ])
    };
    let for_topic = |topic: &str, n: usize| -> Vec<TestRecord> {
        (0..n)
            .map(|i| {
                let id = Uuid::new_v4();
                TestRecord {
                    topic: topic.to_owned(),
                    partition: 0,
                    key: None,
                    payload: Some(event_json(id, "plant", i)),
                    headers: vec![],
                }
            })
            .collect()
    };

    let b = world.start_daemon("b", &replica(&topic_b, "b"));
    world.produce(&for_topic(&topic_b, 100)).await;
    world.wait_rows(&pg, 100, Duration::from_secs(60)).await;
    // A starts now: its anchor is the state B left, and A stays idle.
    let a = world.start_daemon("a", &replica(&topic_a, "a"));
    wait_until("A to join its group", Duration::from_secs(60), || async {
        (a.count_log("partitions assigned") > 0).then_some(())
    })
    .await;
    world.produce(&for_topic(&topic_b, 100)).await;
    world.wait_rows(&pg, 200, Duration::from_secs(60)).await;
    let immudb = world.immudb().await;
    let fork_point = immudb.current_state().await.expect("state").tx_id;
    immudb.close().await;
    let snapshot = snapshot_immudb(&world);
    world.produce(&for_topic(&topic_b, 100)).await;
    world.wait_rows(&pg, 300, Duration::from_secs(60)).await;
    let immudb = world.immudb().await;
    let newest = immudb.current_state().await.expect("state").tx_id;
    immudb.close().await;
    wait_until(
        "B to persist its newest state",
        Duration::from_secs(30),
        || async { (trusted_row(&pg).await.0 as u64 == newest).then_some(()) },
    )
    .await;
    let anchored = trusted_row(&pg).await;

    // The rollback, then an attacker grows the old history past both anchors.
    roll_back_immudb(&world, &snapshot);
    let attacker = world.immudb().await;
    for n in 0..(newest - fork_point + 5) {
        attacker
            .set_all(
                &[KeyValue {
                    key: format!("fork:{n}").into_bytes(),
                    value: b"forged".to_vec(),
                }],
                false,
            )
            .await
            .expect("grow the fork");
    }
    attacker.close().await;

    world.produce(&for_topic(&topic_a, 10)).await;
    world.produce(&for_topic(&topic_b, 10)).await;
    // Each replica handles its batch: it suspects tampering, or (the defect) stores it.
    let from_topic = |topic: String| {
        let pg = pg.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_trail WHERE source_topic = $1")
                .bind(topic)
                .fetch_one(&pg)
                .await
                .expect("count")
        }
    };
    for (daemon, topic, stored_before) in [(&a, &topic_a, 0), (&b, &topic_b, 300)] {
        wait_until(
            "each replica to handle its batch on the forked history",
            Duration::from_secs(60),
            || async {
                let suspected = daemon
                    .log_lines()
                    .iter()
                    .any(|l| l["event"] == "tamper_suspected");
                let stored = from_topic(topic.clone()).await > stored_before;
                (suspected || stored).then_some(())
            },
        )
        .await;
    }
    assert_eq!(
        trusted_row(&pg).await,
        anchored,
        "the shared trusted state was moved onto the forked history"
    );
    assert_eq!(
        from_topic(topic_a.clone()).await,
        0,
        "A stored rows proven only against its own stale anchor"
    );
    for daemon in [&a, &b] {
        assert!(
            daemon
                .log_lines()
                .iter()
                .any(|l| l["event"] == "tamper_suspected"),
            "a replica did not suspect tampering: {}",
            daemon.log.display()
        );
    }
    assert_eq!(world.pg_count(&pg).await, 300);
    assert!(a.terminate(Duration::from_secs(40)).await.success());
    assert!(b.terminate(Duration::from_secs(40)).await.success());
}

/// A rebalance while immudb is down: the member losing partitions cannot store their batches,
/// yet its revocation ends within its deadline (the new owner gets them within the session
/// timeout), and a SIGTERM during a revocation still exits within SHUTDOWN_TIMEOUT + 5 s.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebalance_while_immudb_is_down_is_bounded_and_so_is_a_sigterm_during_it() {
    let _serial = serial().await;
    let world = Arc::new(World::new(&TOPICS, 3).await);
    let session = Duration::from_secs(10);
    let shutdown = Duration::from_secs(10);
    let mut overrides = fast_failure();
    overrides.insert("KAFKA_SESSION_TIMEOUT", "10s".to_owned());
    overrides.insert("SHUTDOWN_TIMEOUT", "10s".to_owned());
    overrides.insert("KAFKA_BATCH_SIZE", "50".to_owned());
    let daemon = world.start_daemon("a", &overrides);
    let addr = daemon.http_addr().await;
    let stop_stream = CancellationToken::new();
    let stream = steady_stream(world.clone(), 20, stop_stream.clone());
    let pg = world.pg().await;
    wait_until("the first rows", Duration::from_secs(60), || async {
        (world.pg_count(&pg).await > 0).then_some(())
    })
    .await;
    let _outage = Outage::begin(&world, "immudb");
    // Until the writers' queues and parking are full and fetching is paused: the revocation
    // must not wait on any of them.
    wait_until(
        "the immudb circuit to open and fetching to pause",
        Duration::from_secs(60),
        || async {
            let (_, scrape) = http_get(addr, "/metrics").await.ok()?;
            let open = metric_value(&scrape, "audit_circuit_breaker_state{service=\"immudb\"}")
                == Some(2.0);
            let paused = metric_value(&scrape, "audit_consumer_paused") == Some(1.0);
            (open && paused).then_some(())
        },
    )
    .await;

    // Another member joins: the daemon must give partitions up while its batches are stuck.
    let joined = Instant::now();
    let newcomer = join_group(&world, session * 3).await;
    let took = joined.elapsed();
    record_figure(&format!(
        "rebalance with immudb down: the new member was assigned {} partitions after {:.1}s",
        newcomer.1,
        took.as_secs_f64()
    ));
    assert!(
        took < session && newcomer.1 > 0,
        "the new member owned {} partitions after {took:?}: the rebalance must end within the \
         session timeout ({session:?})",
        newcomer.1
    );

    // It leaves (the daemon takes its partitions back) and joins again; the daemon gets a
    // SIGTERM in the middle of that second revocation.
    // Cooperative rebalances also log empty assignments: count those that gave partitions.
    let gains = |daemon: &Daemon| {
        daemon
            .log_lines()
            .iter()
            .filter(|l| {
                l["message"] == "partitions assigned" && l["partitions"].as_str() != Some("")
            })
            .count()
    };
    let assigned_before = gains(&daemon);
    drop(newcomer);
    wait_until(
        "the daemon to take the partitions back",
        Duration::from_secs(30),
        || async { (gains(&daemon) > assigned_before).then_some(()) },
    )
    .await;
    let rejoin = tokio::spawn({
        let world = world.clone();
        async move { join_group(&world, session * 3).await.1 }
    });
    wait_until(
        "the daemon to start revoking",
        Duration::from_secs(30),
        || async {
            (daemon.count_log("partitions revoked; draining them before hand-over") >= 2)
                .then_some(())
        },
    )
    .await;
    let signalled = Instant::now();
    let status = daemon.terminate(shutdown + Duration::from_secs(10)).await;
    let exit_took = signalled.elapsed();
    record_figure(&format!(
        "SIGTERM during a revocation with immudb down: exited after {:.1}s",
        exit_took.as_secs_f64()
    ));
    assert!(
        exit_took < shutdown + Duration::from_secs(5),
        "exit took {exit_took:?}"
    );
    assert!(status.success(), "{status:?}");
    stop_stream.cancel();
    stream.await.expect("stream");
    rejoin.await.expect("rejoin");
}

/// A plain group member on a blocking thread: joins the world's group and polls until it owns
/// partitions (at most `timeout`). Returns the consumer (dropping it leaves the group) and how
/// many partitions it owns.
async fn join_group(world: &World, timeout: Duration) -> (rdkafka::consumer::BaseConsumer, usize) {
    use rdkafka::consumer::Consumer;
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &world.stack.brokers)
        .set("group.id", &world.group)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "10000")
        // Like the daemon's (a tenth of the session): it learns of the second round in time.
        .set("heartbeat.interval.ms", "1000")
        .create()
        .expect("consumer");
    let topics: Vec<&str> = world.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).expect("subscribe");
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let _ = consumer.poll(Duration::from_millis(100));
            let owned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
            if owned > 0 || std::time::Instant::now() > deadline {
                return (consumer, owned);
            }
        }
    })
    .await
    .expect("join thread")
}
