//! Telemetry in one place: one `tracing` subscriber for the whole process — JSON (or pretty)
//! lines on stdout, plus OTLP span export when a collector is configured.
//!
//! OTLP is switched on by the standard `OTEL_EXPORTER_OTLP_ENDPOINT` variable (gRPC, usually
//! port 4317). Without it no OpenTelemetry code runs and no thread is started.

use std::collections::HashSet;
use std::sync::OnceLock;

use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, LogSettings};

/// The standard OpenTelemetry variable that switches OTLP export on (e.g. `http://otel-collector:4317`).
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The standard signal-specific variant; it wins over [`ENDPOINT_VAR`] when both are set.
pub const TRACES_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// The standard variable naming the service in exported resources.
pub const SERVICE_NAME_VAR: &str = "OTEL_SERVICE_NAME";
/// `service.name` when [`SERVICE_NAME_VAR`] is not set.
pub const DEFAULT_SERVICE_NAME: &str = "audit-consumer";
/// At most this many links per batch span: a batch of thousands of events must not produce a
/// span larger than the collector accepts (the SDK's own default limit is also 128).
pub const MAX_LINKS_PER_BATCH: usize = 128;

/// Targets never turned into exported spans: the exporter's own transport would otherwise trace
/// its exports, which are traced in turn, without end.
const OTLP_SILENCED: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
];

/// The provider behind the OTLP layer; set once, and only when export is on. Global because the
/// `tracing` subscriber that uses it is global too.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Where and as what to export spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector:4317` (`https://` for TLS).
    pub endpoint: String,
    /// `service.name` of the exported resource.
    pub service_name: String,
}

impl OtlpSettings {
    /// Export to `endpoint` as [`DEFAULT_SERVICE_NAME`].
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            service_name: DEFAULT_SERVICE_NAME.to_owned(),
        }
    }

    /// Reads the standard OpenTelemetry variables; `None` (export off) when no endpoint is set.
    pub fn from_env() -> Option<Self> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|value| value.trim().to_owned())
                .filter(|value| !value.is_empty())
        };
        let endpoint = var(TRACES_ENDPOINT_VAR).or_else(|| var(ENDPOINT_VAR))?;
        Some(Self {
            endpoint,
            service_name: var(SERVICE_NAME_VAR).unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned()),
        })
    }
}

/// Why OTLP export could not be switched on. Logging is installed all the same.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The gRPC exporter spawns its connection on the current tokio runtime.
    #[error("OTLP export needs a tokio runtime: call telemetry::init inside one")]
    NoRuntime,
    /// The endpoint or TLS setup was rejected.
    #[error("cannot build the OTLP exporter for {endpoint}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// Only the first subscriber of a process is kept; this one (and its exporter) is dropped.
    #[error("a tracing subscriber is already installed; OTLP export stays off")]
    AlreadyInitialised,
}

/// Installs the global subscriber, with OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
/// Logs go to stdout (the container runtime collects them). An invalid filter falls back to
/// `info` and says so, rather than running silent; so does an exporter that cannot be built.
///
/// With OTLP on, call it inside the tokio runtime (the gRPC channel lives there) and call
/// [`shutdown`] before the runtime is dropped.
pub fn init(settings: &LogSettings) {
    let otlp = OtlpSettings::from_env();
    let on = otlp.is_some();
    if let Err(e) = init_with(settings, otlp) {
        tracing::warn!(error = %error_chain(&e), "OTLP span export is off");
    }
    if on
        && let Ok(protocol) = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL")
        && protocol != "grpc"
    {
        // Only gRPC is built in; saying so beats a silent stream of failed exports.
        tracing::warn!(%protocol, "OTEL_EXPORTER_OTLP_PROTOCOL is not supported; exporting over gRPC");
    }
}

/// [`init`] with the OTLP settings given rather than read from the environment (tests, tools).
/// `None` installs logging only. Logging is installed even when this returns an error.
pub fn init_with(settings: &LogSettings, otlp: Option<OtlpSettings>) -> Result<(), TelemetryError> {
    let (filter, bad_filter) = match EnvFilter::try_new(&settings.level) {
        Ok(filter) => (filter, None),
        Err(e) => (EnvFilter::new("info"), Some(e.to_string())),
    };

    let mut otlp_error = None;
    let mut otlp_on = None;
    let otel_layer = match otlp.map(build_provider) {
        None => None,
        Some(Err(e)) => {
            otlp_error = Some(e);
            None
        }
        Some(Ok((provider, settings))) => {
            let tracer = provider.tracer(env!("CARGO_PKG_NAME"));
            otlp_on = Some((provider, settings));
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(otlp_filter()),
            )
        }
    };

    let fmt = tracing_subscriber::fmt::layer().with_target(true);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match settings.format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => fmt.with_filter(filter).boxed(),
    };
    // `fmt` first: the OTLP layer's type depends on the registry beneath it, the boxed one not.
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(otel_layer)
        .try_init()
        .is_ok();

    if let Some(reason) = bad_filter {
        tracing::warn!(level = %settings.level, %reason, "LOG_LEVEL is not a valid filter; using info");
    }
    if let Some(e) = otlp_error {
        return Err(e);
    }
    let Some((provider, otlp)) = otlp_on else {
        // A second initialisation (tests, subcommands) keeps the first subscriber.
        return Ok(());
    };
    if !installed {
        let _ = provider.shutdown();
        return Err(TelemetryError::AlreadyInitialised);
    }
    // Cannot be set already: only the one successful `try_init` of the process gets here.
    let _ = PROVIDER.set(provider);
    tracing::info!(endpoint = %otlp.endpoint, service_name = %otlp.service_name, "OTLP span export on");
    Ok(())
}

/// Exports the spans still queued and stops the exporter; waits at most 5 s. A no-op without
/// OTLP, and after the first call. Call it while the tokio runtime is still running, ideally from
/// outside it (in `main` after `block_on` returns): it blocks, and the export it waits for runs
/// on the runtime. From a multi-threaded runtime's task it moves off the worker first; on a
/// current-thread runtime it cannot, and gives up after the timeout.
pub fn shutdown() {
    let Some(provider) = PROVIDER.get() else {
        return;
    };
    let stop = || provider.shutdown();
    let result = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(stop),
        _ => stop(),
    };
    match result {
        Ok(()) | Err(opentelemetry_sdk::error::OTelSdkError::AlreadyShutdown) => {}
        Err(e) => tracing::warn!(error = %e, "OTLP exporter did not flush cleanly"),
    }
}

/// Links the batch span to the traces of its events (W3C `traceparent` headers), so a trace
/// started by a producer shows the batch that stored its event. Malformed headers are skipped,
/// duplicates linked once, and at most [`MAX_LINKS_PER_BATCH`] links are added; the number added
/// is recorded in the span's `links` field. Without an OTLP exporter this does nothing.
pub fn link_traceparents<'a>(span: &tracing::Span, traceparents: impl Iterator<Item = &'a str>) {
    // Parsing costs something per event; skip it when nothing would export the links.
    if PROVIDER.get().is_none() || span.is_disabled() {
        return;
    }
    let mut seen = HashSet::new();
    let mut linked = 0_usize;
    for context in traceparents
        .filter_map(parse_traceparent)
        .filter(|cx| seen.insert((cx.trace_id(), cx.span_id())))
        .take(MAX_LINKS_PER_BATCH)
    {
        span.add_link(context);
        linked += 1;
    }
    if linked > 0 {
        // As i64: tracing-opentelemetry exports u64/usize fields as strings, i64 as numbers.
        span.record("links", linked as i64);
    }
}

/// Parses a W3C `traceparent` (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`) into a
/// remote span context. `None` for anything the Trace Context spec says to ignore: wrong
/// length or separators, upper-case or non-hex digits, version `ff`, all-zero ids. Versions
/// above `00` are read by their `00` prefix, as the spec asks.
pub fn parse_traceparent(header: &str) -> Option<SpanContext> {
    let header = header.trim();
    let bytes = header.as_bytes();
    // Checked byte by byte so the slicing below is on ASCII and cannot panic.
    let lower_hex = |range: std::ops::Range<usize>| {
        bytes[range]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    if bytes.len() < 55
        || !lower_hex(0..2)
        || !lower_hex(3..35)
        || !lower_hex(36..52)
        || !lower_hex(53..55)
        || [2, 35, 52].iter().any(|&i| bytes[i] != b'-')
    {
        return None;
    }
    let version = &header[0..2];
    let rest_ok = match version {
        "ff" => false,
        "00" => bytes.len() == 55,
        _ => bytes.len() == 55 || bytes[55] == b'-',
    };
    if !rest_ok {
        return None;
    }
    let trace_id = TraceId::from_hex(&header[3..35]).ok()?;
    let span_id = SpanId::from_hex(&header[36..52]).ok()?;
    let flags = u8::from_str_radix(&header[53..55], 16).ok()?;
    let context = SpanContext::new(
        trace_id,
        span_id,
        // Only the sampled bit is defined for version 00.
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

/// Builds the exporter and provider; must run inside the tokio runtime.
fn build_provider(otlp: OtlpSettings) -> Result<(SdkTracerProvider, OtlpSettings), TelemetryError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TelemetryError::NoRuntime);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(otlp.endpoint.clone())
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: otlp.endpoint.clone(),
            source,
        })?;
    // `Resource::builder` also reads OTEL_RESOURCE_ATTRIBUTES (pod, namespace, environment).
    let resource = Resource::builder()
        .with_service_name(otlp.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    // The SDK's stable batch processor: a bounded queue drained by its own thread, whose
    // shutdown has a timeout; the gRPC I/O itself runs on the tokio runtime.
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build();
    Ok((provider, otlp))
}

/// Exported spans: `info` and above whatever LOG_LEVEL says, so quieter logs do not cost the
/// traces, minus the exporter's own transport.
fn otlp_filter() -> EnvFilter {
    let mut directives = String::from("info");
    for target in OTLP_SILENCED {
        directives.push(',');
        directives.push_str(target);
        directives.push_str("=off");
    }
    EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_a_valid_traceparent_as_a_remote_sampled_context() {
        let cx = parse_traceparent(VALID).expect("valid");
        assert_eq!(
            cx.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(cx.span_id(), SpanId::from_hex("00f067aa0ba902b7").unwrap());
        assert!(cx.is_sampled());
        assert!(cx.is_remote());
    }

    #[test]
    fn reads_a_future_version_by_its_prefix() {
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert!(parse_traceparent(future).is_some());
    }

    #[test]
    fn ignores_malformed_traceparents_without_panicking() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
            "é0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "accepted {bad:?}");
        }
    }
}
