//! The operations surface of a running daemon: probes and a live `/metrics` scrape whose values
//! agree with what the stores hold. (Probes under a store outage are in `tests/resilience.rs`.)

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

/// Sum of every sample of `name` whose label set contains all of `labels` (`k="v"` pieces).
fn sum_metric(scrape: &str, name: &str, labels: &[&str]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|label| rest.contains(label)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_answer_and_metrics_agree_with_the_stores() {
    let world = World::new(&["plant-lifecycle.v1", "financial.v1"], 2).await;
    let pg = world.pg().await;
    let daemon = world.start_daemon("a", &BTreeMap::new());
    let addr = daemon.http_addr().await;
    wait_until(
        "/health and /ready 200",
        Duration::from_secs(60),
        || async {
            let health = http_get(addr, "/health").await.ok()?;
            let ready = http_get(addr, "/ready").await.ok()?;
            (health.0 == 200 && ready.0 == 200).then_some(())
        },
    )
    .await;
    let (_, ready_body) = http_get(addr, "/ready").await.expect("/ready");
    let ready: serde_json::Value = serde_json::from_str(&ready_body).expect("/ready is JSON");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["checks"]["circuits"]["immudb"], "closed");

    // 2,000 valid events, 5 invalid ones and one conflicting copy.
    let corpus = valid_corpus(&world, 2000, 2);
    let mut records: Vec<TestRecord> = corpus.iter().map(|(_, r)| r.clone()).collect();
    for n in 0..5 {
        records.push(TestRecord {
            topic: world.topics[0].clone(),
            partition: 0,
            key: None,
            payload: Some(format!("{{\"broken\": {n}").into_bytes()),
            headers: vec![],
        });
    }
    world.produce(&records).await;
    wait_until("the first half stored", Duration::from_secs(60), || async {
        (world.pg_count(&pg).await >= 1000).then_some(())
    })
    .await;
    let (_, first) = &corpus[0];
    let mut altered: serde_json::Value =
        serde_json::from_slice(first.payload.as_deref().unwrap_or_default()).expect("json");
    altered["action"] = serde_json::json!("DELETE");
    world
        .produce(&[TestRecord {
            payload: Some(serde_json::to_vec(&altered).expect("json")),
            ..first.clone()
        }])
        .await;

    world.wait_committed_to_end(Duration::from_secs(60)).await;
    // librdkafka reports lag every 5 s; wait for the report that follows the last commit.
    let scrape = wait_until(
        "consumer lag 0 on every partition",
        Duration::from_secs(30),
        || async {
            let (status, scrape) = http_get(addr, "/metrics").await.ok()?;
            let partitions = scrape
                .lines()
                .filter(|l| l.starts_with("audit_consumer_lag{"))
                .count();
            (status == 200
                && partitions == 4
                && sum_metric(&scrape, "audit_consumer_lag", &[]) == 0.0)
                .then_some(scrape)
        },
    )
    .await;

    let rows = world.pg_count(&pg).await as f64;
    assert_eq!(rows, 2000.0);
    assert_eq!(
        sum_metric(
            &scrape,
            "audit_events_processed_total",
            &["status=\"stored\""]
        ),
        rows,
        "stored = rows in PG"
    );
    assert_eq!(
        sum_metric(&scrape, "audit_dlq_events_total", &["reason=\"invalid\""]),
        5.0
    );
    assert_eq!(
        sum_metric(&scrape, "audit_dlq_events_total", &["reason=\"conflict\""]),
        1.0
    );
    assert_eq!(
        sum_metric(
            &scrape,
            "audit_events_processed_total",
            &["status=\"dead_lettered\""]
        ),
        6.0
    );
    assert_eq!(
        sum_metric(&scrape, "audit_batch_size_sum", &[]),
        2006.0,
        "every record went through a batch"
    );
    assert!(
        sum_metric(
            &scrape,
            "audit_immudb_operations_total",
            &["operation=\"set\"", "status=\"ok\""]
        ) > 0.0
    );
    assert!(
        sum_metric(
            &scrape,
            "audit_postgres_operations_total",
            &["operation=\"insert\"", "status=\"ok\""]
        ) > 0.0
    );
    let max_tx: Option<i64> = sqlx::query_scalar("SELECT max(immudb_tx) FROM audit_trail")
        .fetch_one(&pg)
        .await
        .expect("max tx");
    assert_eq!(
        metric_value(&scrape, "audit_immudb_last_tx_id"),
        max_tx.map(|t| t as f64)
    );
    assert!(metric_value(&scrape, "audit_offsets_committed_total").unwrap_or(0.0) > 0.0);
    assert_eq!(
        metric_value(&scrape, "audit_circuit_breaker_state{service=\"immudb\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&scrape, "audit_circuit_breaker_state{service=\"postgres\"}"),
        Some(0.0)
    );
    assert_eq!(metric_value(&scrape, "audit_consumer_paused"), Some(0.0));
    assert_eq!(
        metric_value(&scrape, "audit_in_flight_bytes"),
        Some(0.0),
        "nothing in flight once committed"
    );
    assert!(sum_metric(&scrape, "audit_event_age_seconds_count", &[]) >= 2000.0);
    assert!(metric_value(&scrape, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0);
    assert!(metric_value(&scrape, "process_open_fds").unwrap_or(0.0) > 0.0);
    assert!(
        sum_metric(
            &scrape,
            "audit_event_processing_duration_seconds_count",
            &[]
        ) > 0.0
    );

    // `scripts/test.sh` runs `promtool check metrics` on this live scrape.
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("metrics-scrape.txt");
    std::fs::write(&path, &scrape).expect("save the scrape");
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_to_their_own_port_when_configured() {
    let world = World::new(&["system.v1"], 1).await;
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let metrics_port = free.local_addr().expect("addr").port();
    drop(free);
    let overrides = BTreeMap::from([("METRICS_PORT", metrics_port.to_string())]);
    let daemon = world.start_daemon("a", &overrides);
    let health_addr = daemon.http_addr().await;
    let metrics_addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let (status, body) = wait_until(
        "/metrics on its own port",
        Duration::from_secs(30),
        || async { http_get(metrics_addr, "/metrics").await.ok() },
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("audit_circuit_breaker_state"));
    let (status, _) = http_get(health_addr, "/metrics")
        .await
        .expect("health listener");
    assert_eq!(status, 404, "/metrics is no longer on the probe port");
    let (status, _) = http_get(health_addr, "/health")
        .await
        .expect("health listener");
    assert_eq!(status, 200);
    assert!(daemon.terminate(Duration::from_secs(30)).await.success());
}
