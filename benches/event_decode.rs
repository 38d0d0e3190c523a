//! Cost of turning one Kafka payload into a validated event, and of its digest.
//!
//! The consumer must sustain >10,000 events/s on 2 cores with room left for Kafka, immudb and
//! PostgreSQL I/O, so decode should stay at a few µs per event. Inputs are real fixtures, so
//! the numbers follow the contract as it evolves.
//!
//! `cargo bench --bench event_decode` (add `-- --quick` for a fast look).

use std::hint::black_box;

use audit_consumer::event::{decode, payload_sha256};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const SMALL: &[u8] = include_bytes!("../tests/fixtures/valid/system_event_lowercase_t_and_z.json");
const MEDIUM: &[u8] = include_bytes!("../tests/fixtures/valid/plant_destroyed_with_witness.json");
const LARGE: &[u8] = include_bytes!("../tests/fixtures/valid/coa_received_large.json");

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, payload) in [("small", SMALL), ("medium", MEDIUM), ("large", LARGE)] {
        // A fixture that stopped decoding would make the numbers meaningless.
        if let Err(e) = decode(payload) {
            panic!("{name} fixture no longer decodes: {e}");
        }
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_function(format!("{name}_{}B", payload.len()), |b| {
            b.iter(|| decode(black_box(payload)))
        });
    }
    group.finish();
}

/// Parsing the same bytes into a plain `serde_json::Value`, with no validation: the floor that
/// `decode` should stay near (it must build `Value`s for `old_value`/`new_value` anyway).
fn bench_value_baseline(c: &mut Criterion) {
    let mut group = c.benchmark_group("baseline_serde_json_value");
    for (name, payload) in [("small", SMALL), ("medium", MEDIUM), ("large", LARGE)] {
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_function(format!("{name}_{}B", payload.len()), |b| {
            b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(payload)).is_ok())
        });
    }
    group.finish();
}

fn bench_digest(c: &mut Criterion) {
    let payload: Vec<u8> = MEDIUM.iter().copied().cycle().take(1024).collect();
    let mut group = c.benchmark_group("payload_sha256");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.bench_function("1024B", |b| b.iter(|| payload_sha256(black_box(&payload))));
    group.finish();
}

criterion_group!(benches, bench_decode, bench_value_baseline, bench_digest);
criterion_main!(benches);
