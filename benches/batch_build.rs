//! Cost of the dispatcher's per-event work up to a flushed batch: decode and validate, key and
//! digest, offset tracking, batching, and the immudb key/value list of the batch. This is the
//! CPU the daemon spends per event besides the stores' I/O.
//!
//! `cargo bench --bench batch_build` (add `-- --quick` for a fast look).

use std::hint::black_box;
use std::time::Duration;

use audit_consumer::event::{decode, payload_sha256};
use audit_consumer::immudb::KeyValue;
use audit_consumer::pipeline::batcher::Batcher;
use audit_consumer::pipeline::offsets::{OffsetTracker, TopicPartition};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tokio::time::Instant;

const MEDIUM: &str = include_str!("../tests/fixtures/valid/plant_destroyed_with_witness.json");
const BATCH: usize = 1000;

/// 1,000 distinct payloads (fresh event ids) shaped like the medium fixture.
fn corpus() -> Vec<Vec<u8>> {
    let template: serde_json::Value = serde_json::from_str(MEDIUM).expect("fixture is JSON");
    (0..BATCH)
        .map(|_| {
            let mut event = template.clone();
            event["event_id"] = serde_json::Value::String(uuid::Uuid::new_v4().to_string());
            serde_json::to_vec(&event).expect("serialise")
        })
        .collect()
}

fn bench_batch_build(c: &mut Criterion) {
    let payloads = corpus();
    let tp = TopicPartition::new("audit.plant-lifecycle.v1", 0);
    let mut group = c.benchmark_group("batch_build");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("1000_events", |b| {
        b.iter_batched(
            || {
                (
                    OffsetTracker::new(),
                    Batcher::new(BATCH, Duration::from_secs(1)),
                )
            },
            |(mut tracker, mut batcher)| {
                let now = Instant::now();
                let mut flushed = None;
                for (offset, payload) in payloads.iter().enumerate() {
                    let event = decode(payload).expect("valid");
                    let ticket = tracker.received(&tp, offset as i64);
                    let item = (event.immudb_key(), payload_sha256(payload), payload, ticket);
                    flushed = batcher.push(&tp.topic, item, now);
                }
                let batch = flushed.expect("the 1000th event fills the batch");
                let kvs: Vec<KeyValue> = batch
                    .items
                    .iter()
                    .map(|(key, _, payload, _)| KeyValue {
                        key: key.as_bytes().to_vec(),
                        value: payload.to_vec(),
                    })
                    .collect();
                black_box(kvs)
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_batch_build);
criterion_main!(benches);
