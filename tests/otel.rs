//! OTLP export end to end, in-process: the real `telemetry::init_with` exports to an OTLP/gRPC
//! receiver run by the test on port 0. One test only: the global subscriber can be installed
//! once per process, and this file is its own process.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use audit_consumer::config::{LogFormat, LogSettings};
use audit_consumer::telemetry::{self, MAX_LINKS_PER_BATCH, OtlpSettings};

const TRACE_1: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN_1: &str = "00f067aa0ba902b7";
const TRACE_2: &str = "0af7651916cd43dd8448eb211c80319c";
const SPAN_2: &str = "b7ad6b7169203331";
const SERVICE: &str = "audit-consumer-otel-test";

/// A collector stand-in: hands every export request to the test.
struct Receiver {
    requests: mpsc::Sender<ExportTraceServiceRequest>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests
            .send(request.into_inner())
            .await
            .map_err(|_| tonic::Status::unavailable("test finished"))?;
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A span as received, with the resource it came under.
struct Received {
    resource: Vec<KeyValue>,
    span: Span,
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|value: &AnyValue| value.value.as_ref())
}

fn string_attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key) {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn int_attr(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key) {
        Some(any_value::Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

/// A whole number sent either as a number or as its decimal text: tracing-opentelemetry 0.34
/// has no `record_u64`, so the pipeline's `usize`/`u64` fields arrive as strings.
fn number_attr(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key) {
        Some(any_value::Value::IntValue(i)) => Some(*i),
        Some(any_value::Value::StringValue(s)) => s.parse().ok(),
        _ => None,
    }
}

fn traceparent(trace_id: &str, span_id: &str) -> String {
    format!("00-{trace_id}-{span_id}-01")
}

/// Receives spans until every topic in `topics` has its batch span, or the deadline passes.
async fn batch_spans(
    requests: &mut mpsc::Receiver<ExportTraceServiceRequest>,
    topics: &[&str],
    deadline: Duration,
) -> Vec<Received> {
    let mut received = Vec::new();
    let has_all = |received: &Vec<Received>| {
        topics.iter().all(|topic| {
            received.iter().any(|r: &Received| {
                r.span.name == "batch"
                    && string_attr(&r.span.attributes, "topic").as_deref() == Some(*topic)
            })
        })
    };
    let until = tokio::time::Instant::now() + deadline;
    while !has_all(&received) {
        let request = tokio::time::timeout_at(until, requests.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no batch span for each of {topics:?} within {deadline:?}; got {:?}",
                    received.iter().map(|r| &r.span.name).collect::<Vec<_>>()
                )
            })
            .expect("the receiver stopped");
        for resource_spans in request.resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(Received {
                        resource: resource.clone(),
                        span,
                    });
                }
            }
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_the_batch_span_with_its_links_and_resource_over_otlp() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let endpoint = format!("http://{}", listener.local_addr().expect("local addr"));
    let (sender, mut requests) = mpsc::channel(64);
    let receiver = tokio::spawn(
        Server::builder()
            .add_service(TraceServiceServer::new(Receiver { requests: sender }))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );

    // Logs stay quiet unless TEST_LOG is set; exported spans do not depend on the log level.
    let level = if std::env::var_os("TEST_LOG").is_some() {
        "info"
    } else {
        "off"
    };
    let settings = LogSettings {
        level: level.to_owned(),
        format: LogFormat::Json,
    };
    telemetry::init_with(
        &settings,
        Some(OtlpSettings {
            endpoint,
            service_name: SERVICE.to_owned(),
        }),
    )
    .expect("OTLP export switched on");

    // Shaped like the pipeline's batch span (src/pipeline/writer.rs).
    let topic = "audit.events";
    let (size, first_offset, last_offset) = (3_usize, 10_i64, 12_i64);
    let span = tracing::info_span!(
        "batch",
        %topic,
        size,
        first_offset,
        last_offset,
        immudb_tx = tracing::field::Empty,
        links = tracing::field::Empty,
    );
    let headers = [
        traceparent(TRACE_1, SPAN_1),
        "00-not-a-traceparent-01".to_owned(),
        traceparent(TRACE_2, SPAN_2),
    ];
    telemetry::link_traceparents(&span, headers.iter().map(String::as_str));
    span.record("immudb_tx", 42_u64);
    span.in_scope(|| tracing::info!(stored = size, "batch done"));
    drop(span);

    // A flood of distinct producers (and repeats) is capped.
    let flood_topic = "audit.flood";
    let flood = tracing::info_span!(
        "batch",
        topic = %flood_topic,
        size = 400_usize,
        links = tracing::field::Empty,
    );
    let many: Vec<String> = (1..=200_u32)
        .map(|i| traceparent(&format!("{i:032x}"), &format!("{i:016x}")))
        .collect();
    telemetry::link_traceparents(&flood, many.iter().chain(many.iter()).map(String::as_str));
    drop(flood);

    // Flushes the batch processor; returns once the export has been answered (or timed out).
    telemetry::shutdown();

    // Well under the batch processor's 5 s schedule: only the flush in `shutdown` delivers
    // the spans in time.
    let received = batch_spans(&mut requests, &[topic, flood_topic], Duration::from_secs(2)).await;
    let find = |wanted: &str| {
        received
            .iter()
            .find(|r| {
                r.span.name == "batch"
                    && string_attr(&r.span.attributes, "topic").as_deref() == Some(wanted)
            })
            .expect("batch span received")
    };

    let batch = find(topic);
    assert_eq!(
        string_attr(&batch.resource, "service.name").as_deref(),
        Some(SERVICE)
    );
    assert_eq!(
        string_attr(&batch.resource, "service.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let attributes = &batch.span.attributes;
    assert_eq!(number_attr(attributes, "size"), Some(3));
    assert_eq!(int_attr(attributes, "first_offset"), Some(10));
    assert_eq!(int_attr(attributes, "last_offset"), Some(12));
    assert_eq!(number_attr(attributes, "immudb_tx"), Some(42));
    assert_eq!(int_attr(attributes, "links"), Some(2));
    assert!(
        batch.span.events.iter().any(|e| e.name == "batch done"),
        "the batch done event travels with the span"
    );
    let links: Vec<(String, String)> = batch
        .span
        .links
        .iter()
        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
        .collect();
    assert_eq!(
        links,
        vec![
            (TRACE_1.to_owned(), SPAN_1.to_owned()),
            (TRACE_2.to_owned(), SPAN_2.to_owned()),
        ],
        "one link per valid traceparent, malformed one skipped"
    );
    // The batch starts its own trace: links, not parenthood, tie it to the producers.
    assert!(batch.span.parent_span_id.is_empty());
    assert_ne!(hex::encode(&batch.span.trace_id), TRACE_1);

    let flood = find(flood_topic);
    assert_eq!(flood.span.links.len(), MAX_LINKS_PER_BATCH);
    assert_eq!(
        int_attr(&flood.span.attributes, "links"),
        Some(MAX_LINKS_PER_BATCH as i64)
    );
    assert_eq!(flood.span.dropped_links_count, 0);

    receiver.abort();
}
