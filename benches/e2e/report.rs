//! The run's figures: a markdown table (stdout and `report.md`), JSON with the time series
//! (`report.json`), and the drain plot (`drain.png`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;

use crate::limits::Limits;
use crate::sampler::Sample;

/// Exact percentiles (nearest rank) of a list of values.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut values: Vec<f64>) -> Percentiles {
        values.sort_by(f64::total_cmp);
        let rank = |p: f64| -> f64 {
            if values.is_empty() {
                return 0.0;
            }
            let i = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
            values[i]
        };
        Percentiles {
            count: values.len(),
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max: values.last().copied().unwrap_or(0.0),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub memory_bytes: u64,
    pub cpu_model: String,
    pub kernel: String,
    pub load_average_start: String,
    pub load_average_end: String,
}

impl Machine {
    pub fn read() -> Machine {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_bytes,
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            load_average_start: load_average(),
            load_average_end: String::new(),
        }
    }
}

/// The 1/5/15-minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Settings {
    pub events: usize,
    pub steady_secs: u64,
    pub batch_size: usize,
    pub kill_after_secs: u64,
    pub limit_events: usize,
    pub session_timeout: String,
    /// Static membership (`KAFKA_GROUP_INSTANCE_ID`) of the daemon, when on.
    pub group_instance_id: Option<String>,
    /// `KAFKA_PROP_*` passed to the daemon.
    pub daemon_properties: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CorpusFigures {
    pub events: usize,
    pub bytes: usize,
    pub min_bytes: usize,
    pub mean_bytes: f64,
    pub max_bytes: usize,
    pub produce_seconds: f64,
    pub produce_rate: f64,
    pub produce_mib_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Drain {
    /// Daemon start → everything committed.
    pub seconds: f64,
    pub first_commit_after_s: f64,
    /// Events/s from the first to the last batch (the daemon's own timestamps).
    pub sustained_rate: f64,
    /// Events/s from the first to the last sampled commit (cross-check, 1 s resolution).
    pub sampled_rate: f64,
    /// All events over the whole run, start-up included.
    pub overall_rate: f64,
    pub batch_ms: Percentiles,
    /// Before a batch's first write: parked, queued for its writer, waiting for an immudb slot.
    pub queued_ms: Percentiles,
    /// The immudb and the PostgreSQL write of each batch (no queueing).
    pub immudb_ms: Percentiles,
    pub postgres_ms: Percentiles,
    pub mean_batch_events: f64,
    /// Where the machine's CPU went from the daemon's start to the last commit.
    pub cpu_split: crate::world::CpuSplit,
    pub peak_rss_bytes: u64,
    pub max_sampled_rss_bytes: u64,
    pub cpu_seconds: f64,
    pub cpu_seconds_per_1000: f64,
    pub load_average: String,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Steady {
    pub target_rate: f64,
    pub sent: u64,
    pub achieved_rate: f64,
    pub latency_ms: Percentiles,
    pub lag: Percentiles,
    pub max_rss_bytes: u64,
    pub cpu_seconds_per_1000: f64,
    pub batch_ms: Percentiles,
    pub load_average: String,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Recovery {
    pub rate: f64,
    pub kill_at_s: f64,
    pub lag_at_kill: i64,
    pub restart_to_assigned_s: Option<f64>,
    pub restart_to_first_commit_s: f64,
    pub restart_to_caught_up_s: f64,
    pub caught_up_lag: i64,
    pub max_lag: i64,
    pub stop_to_lag0_s: f64,
    pub sent: u64,
    pub redelivered: u64,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub commit: String,
    pub date: String,
    pub machine: Machine,
    pub settings: Settings,
    pub corpus: CorpusFigures,
    pub drain: Drain,
    pub steady: Steady,
    pub recovery: Recovery,
    pub sigterm_exit_s: f64,
    pub rows_in_postgres: i64,
    pub events_produced: u64,
    pub limits: Limits,
    pub slowest_limit: String,
    pub drain_vs_slowest: f64,
    pub sequential_limit: f64,
    pub drain_vs_sequential: f64,
}

/// 1234567.8 → "1,234,568".
pub fn int(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn pct(p: &Percentiles) -> String {
    format!("{:.0} / {:.0} / {:.0} ({:.0})", p.p50, p.p95, p.p99, p.max)
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let s = &self.settings;
        let _ = writeln!(md, "# audit-consumer end-to-end benchmark\n");
        let _ = writeln!(
            md,
            "Commit `{}`, {}. Machine: {} cores ({}), {} memory, Linux {}; load average {} at start, {} at end.",
            self.commit,
            self.date,
            m.nproc,
            m.cpu_model,
            mib(m.memory_bytes as f64),
            m.kernel,
            m.load_average_start,
            m.load_average_end
        );
        let _ = writeln!(
            md,
            "Settings: {} events, batch size {}, 4 topics × 3 partitions, KAFKA_BATCH_TIMEOUT 1s, session timeout {}, {}, steady {} s, SIGKILL {} s into the recovery phase, limits over {} events{}.\n",
            int(s.events as f64),
            s.batch_size,
            s.session_timeout,
            s.group_instance_id.as_ref().map_or_else(
                || "dynamic group membership".to_owned(),
                |id| format!("static group membership (KAFKA_GROUP_INSTANCE_ID={id})")
            ),
            s.steady_secs,
            s.kill_after_secs,
            int(s.limit_events as f64),
            if s.daemon_properties.is_empty() {
                String::new()
            } else {
                format!("; daemon also given {}", s.daemon_properties.join(" "))
            }
        );
        let c = &self.corpus;
        let d = &self.drain;
        let st = &self.steady;
        let r = &self.recovery;
        let l = &self.limits;
        let rows: Vec<(&str, String, String)> = vec![
            (
                "Corpus",
                "events (payload min / mean / max)".into(),
                format!(
                    "{} ({} / {} / {} B, {})",
                    int(c.events as f64),
                    c.min_bytes,
                    int(c.mean_bytes),
                    int(c.max_bytes as f64),
                    mib(c.bytes as f64)
                ),
            ),
            (
                "Produce",
                "full speed, idempotent, acks=all".into(),
                format!(
                    "{} ev/s ({:.1} MiB/s, {:.1} s)",
                    int(c.produce_rate),
                    c.produce_mib_s,
                    c.produce_seconds
                ),
            ),
            (
                "Drain",
                "sustained, first → last commit".into(),
                format!(
                    "**{} ev/s** (sampled: {})",
                    int(d.sustained_rate),
                    int(d.sampled_rate)
                ),
            ),
            (
                "Drain",
                "whole run incl. start-up (first commit after)".into(),
                format!(
                    "{} ev/s, {:.1} s ({:.1} s)",
                    int(d.overall_rate),
                    d.seconds,
                    d.first_commit_after_s
                ),
            ),
            (
                "Drain",
                "batch duration (first write → offsets done) p50 / p95 / p99 (max), ms".into(),
                format!(
                    "{} over {} batches of {:.0} events on average",
                    pct(&d.batch_ms),
                    d.batch_ms.count,
                    d.mean_batch_events
                ),
            ),
            (
                "Drain",
                "machine CPU, daemon start → last commit: daemon / immudb / PostgreSQL / Kafka / other / idle".into(),
                {
                    let c = &d.cpu_split;
                    let total = c.daemon + c.immudb + c.postgres + c.kafka + c.other + c.idle;
                    let share = |v: f64| 100.0 * v / total.max(f64::MIN_POSITIVE);
                    format!(
                        "{:.0} / {:.0} / {:.0} / {:.0} / {:.0} / {:.0} % of {:.1} CPU s",
                        share(c.daemon),
                        share(c.immudb),
                        share(c.postgres),
                        share(c.kafka),
                        share(c.other),
                        share(c.idle),
                        total
                    )
                },
            ),
            (
                "Drain",
                "of which immudb write / PostgreSQL write p50 / p95 / p99 (max), ms".into(),
                format!("{} / {}", pct(&d.immudb_ms), pct(&d.postgres_ms)),
            ),
            (
                "Drain",
                "before the batch: closed → first write (parked, queued, waiting for an immudb slot) p50 / p95 / p99 (max), ms".into(),
                pct(&d.queued_ms),
            ),
            (
                "Drain",
                "peak RSS (VmHWM; max sampled)".into(),
                format!(
                    "{} ({})",
                    mib(d.peak_rss_bytes as f64),
                    mib(d.max_sampled_rss_bytes as f64)
                ),
            ),
            (
                "Drain",
                "CPU per 1,000 events (total)".into(),
                format!(
                    "{:.3} s ({:.1} s); load average {}",
                    d.cpu_seconds_per_1000, d.cpu_seconds, d.load_average
                ),
            ),
            (
                "Steady",
                "rate target / achieved".into(),
                format!(
                    "{} / {} ev/s ({} events)",
                    int(st.target_rate),
                    int(st.achieved_rate),
                    int(st.sent as f64)
                ),
            ),
            (
                "Steady",
                "end-to-end latency p50 / p95 / p99 (max), ms".into(),
                format!(
                    "**{}** over {} rows (PG ingested_at − event timestamp)",
                    pct(&st.latency_ms),
                    int(st.latency_ms.count as f64)
                ),
            ),
            (
                "Steady",
                "batch duration p50 / p95 / p99 (max), ms".into(),
                pct(&st.batch_ms),
            ),
            (
                "Steady",
                "lag p50 / p95 / max (sampled)".into(),
                format!(
                    "{} / {} / {}",
                    int(st.lag.p50),
                    int(st.lag.p95),
                    int(st.lag.max)
                ),
            ),
            (
                "Steady",
                "max RSS; CPU per 1,000 events".into(),
                format!(
                    "{}; {:.3} s; load average {}",
                    mib(st.max_rss_bytes as f64),
                    st.cpu_seconds_per_1000,
                    st.load_average
                ),
            ),
            (
                "Recovery",
                format!(
                    "SIGKILL {:.0} s into {} ev/s (lag then {}); restart → partitions assigned",
                    r.kill_at_s,
                    int(r.rate),
                    int(r.lag_at_kill as f64)
                ),
                r.restart_to_assigned_s
                    .map_or("not logged".into(), |s| format!("{s:.1} s")),
            ),
            (
                "Recovery",
                "restart → first commit that advances".into(),
                format!("**{:.1} s**", r.restart_to_first_commit_s),
            ),
            (
                "Recovery",
                format!(
                    "restart → caught up (lag ≤ {}, the steady p95)",
                    int(r.caught_up_lag as f64)
                ),
                format!(
                    "**{:.1} s** (max lag {})",
                    r.restart_to_caught_up_s,
                    int(r.max_lag as f64)
                ),
            ),
            (
                "Recovery",
                "production stopped → lag 0; redelivered events".into(),
                format!(
                    "{:.1} s; {} recognised as duplicates",
                    r.stop_to_lag0_s,
                    int(r.redelivered as f64)
                ),
            ),
            (
                "Shutdown",
                "SIGTERM → exit".into(),
                format!("{:.1} s", self.sigterm_exit_s),
            ),
            (
                "Integrity",
                "rows in PostgreSQL = events produced".into(),
                format!(
                    "{} = {} {}",
                    int(self.rows_in_postgres as f64),
                    int(self.events_produced as f64),
                    if self.rows_in_postgres as u64 == self.events_produced {
                        "✓"
                    } else {
                        "✗"
                    }
                ),
            ),
            (
                "Limit",
                "immudb set_all, 1 writer / 4 writers".into(),
                format!("{} / {} ev/s", int(l.immudb_1), int(l.immudb_4)),
            ),
            (
                "Limit",
                "PostgreSQL insert_batch, 1 writer / 4 writers".into(),
                format!("{} / {} ev/s", int(l.postgres_1), int(l.postgres_4)),
            ),
            (
                "Limit",
                "Kafka consume (one BaseConsumer)".into(),
                format!(
                    "{} ev/s ({:.1} MiB/s)",
                    int(l.kafka_consume),
                    l.kafka_consume_mib_s
                ),
            ),
            (
                "Limit",
                "decode + validate (one core)".into(),
                format!("{} ev/s", int(l.decode_1_core)),
            ),
            (
                "Ratio",
                format!("drain ÷ slowest limit ({})", self.slowest_limit),
                format!("**{:.2}**", self.drain_vs_slowest),
            ),
            (
                "Ratio",
                format!(
                    "drain ÷ sequential limit 1/(1/immudb + 1/PG) = {} ev/s",
                    int(self.sequential_limit)
                ),
                format!("**{:.2}**", self.drain_vs_sequential),
            ),
        ];
        let _ = writeln!(md, "| Phase | Measure | Value |");
        let _ = writeln!(md, "|---|---|---|");
        for (phase, measure, value) in rows {
            let _ = writeln!(md, "| {phase} | {measure} | {value} |");
        }
        md
    }
}

/// Registers a TrueType font for the plot's text; `false` when none is found (the plot is
/// then drawn without text).
fn register_font() -> bool {
    let candidates = [
        std::env::var("E2E_FONT").unwrap_or_default(),
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into(),
        "/usr/share/fonts/dejavu/DejaVuSans.ttf".into(),
        "/usr/share/fonts/TTF/DejaVuSans.ttf".into(),
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf".into(),
    ];
    for path in candidates.iter().filter(|p| !p.is_empty()) {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps fonts for the whole process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    eprintln!("e2e: no TrueType font found (set E2E_FONT); the plot has no text");
    false
}

fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}

/// Throughput (committed events/s between samples), lag and RSS over the drain run.
pub fn plot_drain(path: &Path, title: &str, samples: &[Sample]) -> anyhow::Result<()> {
    let text = register_font();
    let root = BitMapBackend::new(path, (1200, 960)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let root = if text {
        root.titled(title, ("sans-serif", 22)).map_err(plot_error)?
    } else {
        root
    };
    let panels = root.split_evenly((3, 1));
    let t_max = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let throughput: Vec<(f64, f64)> = samples
        .windows(2)
        .filter(|w| w[1].t > w[0].t)
        .map(|w| {
            let rate = (w[1].committed - w[0].committed) as f64 / (w[1].t - w[0].t);
            (w[1].t, rate.max(0.0))
        })
        .collect();
    let lag: Vec<(f64, f64)> = samples.iter().map(|s| (s.t, s.lag() as f64)).collect();
    let rss: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (s.t, s.rss_bytes as f64 / (1024.0 * 1024.0)))
        .collect();
    panel(
        &panels[0],
        "throughput (events/s committed)",
        &throughput,
        &BLUE,
        t_max,
        text,
    )?;
    panel(&panels[1], "lag (events)", &lag, &RED, t_max, text)?;
    panel(&panels[2], "daemon RSS (MiB)", &rss, &GREEN, t_max, text)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    caption: &str,
    points: &[(f64, f64)],
    color: &RGBColor,
    t_max: f64,
    text: bool,
) -> anyhow::Result<()> {
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.1;
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(caption, ("sans-serif", 18))
            .x_label_area_size(36)
            .y_label_area_size(80);
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(plot_error)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("seconds since the daemon started")
            .y_label_formatter(&|v| int(*v))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_error)?;
    }
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(plot_error)?;
    Ok(())
}
