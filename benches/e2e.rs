//! End-to-end load benchmark of the daemon on the local stack: the release binary, real Kafka,
//! immudb and PostgreSQL, an isolated world (its own topics, consumer group, DLQ topic, immudb
//! database, PostgreSQL schema and writer login, like the integration tests).
//!
//! ```sh
//! eval "$(bash deploy/local/stack.sh env)"      # bash deploy/local/stack.sh up, if it is down
//! cargo bench --bench e2e                        # 1,000,000 events, 60 s steady: ~15 min
//! E2E_EVENTS=200000 E2E_STEADY_SECS=30 cargo bench --bench e2e   # a quick look
//! ```
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it prints one line and exits 0.
//!
//! Phases:
//! 1. **Corpus and produce.** N realistic events (300 B – 4 KB, every field of the contract,
//!    nested `old_value`/`new_value`, metadata, risk level, compliance flags, category …) over
//!    four topics of 3 partitions each (12 in all), produced at full speed by an idempotent
//!    producer (acks=all, linger 10 ms, 1 MB batches): the produce rate.
//! 2. **Drain.** With the N events waiting in Kafka the daemon starts from the beginning
//!    (LOG_FORMAT=json, HEALTH_PORT=0, KAFKA_BATCH_SIZE, KAFKA_BATCH_TIMEOUT=1s). Every second
//!    the group's committed offsets (→ lag) and the daemon's RSS and CPU time are sampled.
//!    Reported: sustained events/s from the first to the last commit (timed by the daemon's
//!    `batch done` log lines, cross-checked by the samples), batch duration p50/p95/p99 (exact,
//!    the lines' `elapsed_ms`), peak RSS (VmHWM), CPU seconds per 1,000 events. Plot:
//!    `drain.png` (throughput, lag, RSS over time).
//! 3. **Steady.** A paced producer sends 50 % of the drain throughput for E2E_STEADY_SECS,
//!    each event's `timestamp` its produce time, entity type `steady`. End-to-end latency is
//!    PostgreSQL's `ingested_at − event_timestamp` over those rows (p50/p95/p99 with
//!    `percentile_cont`); lag, RSS and CPU are sampled.
//! 4. **Recovery.** The same rate again (entity type `recovery`); E2E_KILL_AFTER_SECS in, the
//!    daemon gets SIGKILL and is restarted at once while production goes on. Reported: restart
//!    → partitions assigned (its log), → first commit that advances, → caught up (lag back to
//!    the steady run's p95), and production stop → lag 0; the events redelivered after the
//!    crash (recognised as duplicates, not stored twice). Then SIGTERM and the time to exit,
//!    and a check that PostgreSQL holds exactly one row per produced event.
//! 5. **Limits** on the same machine with the same payloads and batch size, the daemon
//!    stopped: immudb `ImmudbClient::set_all` (one transaction per batch, `KeyMustNotExist`,
//!    the daemon's keys) into fresh databases, PostgreSQL `insert_batch` of `ReplicaRow`s from
//!    `event::decode` into fresh schemas, each with 1 writer and with 4 concurrent writers (one
//!    per topic, like the daemon; the better counts); a plain consumer reading the N events
//!    back; decode + validate on one core. The drain throughput is given as a ratio of the
//!    slowest limit and of the "sequential" limit 1/(1/immudb + 1/PostgreSQL).
//! 6. **Report.** A markdown table on stdout and in `target/e2e/report.md`, everything with the
//!    time series in `target/e2e/report.json`, the plot in `target/e2e/drain.png`, with the git
//!    commit and the machine (cores, memory, load average). The daemon logs stay in
//!    `target/e2e/logs-<world>/`; topics, databases and schemas are left on the throw-away
//!    stack.
//!
//! Environment (numbers may use `_` separators):
//!
//! | Variable | Default | Meaning |
//! |---|---|---|
//! | `E2E_EVENTS` | 1,000,000 | events in the corpus (drain run) |
//! | `E2E_STEADY_SECS` | 60 | length of the steady run |
//! | `E2E_BATCH_SIZE` | the daemon's default (100) | `KAFKA_BATCH_SIZE` of the daemon, and the limits' batch size |
//! | `E2E_STEADY_RATE` | 50 % of the drain throughput | events/s of the steady and recovery runs |
//! | `E2E_KILL_AFTER_SECS` | 20 | when the recovery run kills the daemon |
//! | `E2E_LIMIT_EVENTS` | `E2E_EVENTS` | events written by each limit run |
//! | `E2E_SESSION_TIMEOUT` | the daemon's default (30s) | `KAFKA_SESSION_TIMEOUT` of the daemon |
//! | `E2E_STATIC_MEMBERSHIP` | `1` | `1`: the daemon runs with `KAFKA_GROUP_INSTANCE_ID` (its restart after the SIGKILL takes its partitions back at once); `0`: dynamic membership (they wait for the session timeout) |
//! | `E2E_DRAIN_ONLY` | unset | `1`: stop after the drain run (tuning experiments) |
//! | `E2E_FONT` | DejaVu Sans | TrueType font for the plot's text |
//! | `E2E_LOG_LEVEL` | `info` | `LOG_LEVEL` of the daemon (its logs stay in `target/e2e/logs-*`) |
//! | `KAFKA_PROP_*` | none | passed to the daemon as they are (librdkafka tuning experiments) |
//! | `E2E_DAEMON_*` | none | passed to the daemon without the prefix (`E2E_DAEMON_PIPELINE_IMMUDB_CONCURRENCY=3`); the limits keep the daemon's defaults |
//!
//! Plus the stack's connection variables (`deploy/local/stack.sh env`, same defaults as the
//! tests). The machine should be otherwise quiet: every figure is shared with whatever else
//! runs (the report records the load average).

#[path = "e2e/corpus.rs"]
mod corpus;
#[path = "e2e/limits.rs"]
mod limits;
#[path = "e2e/report.rs"]
mod report;
#[path = "e2e/sampler.rs"]
mod sampler;
#[path = "e2e/world.rs"]
mod world;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};

use crate::corpus::Corpus;
use crate::report::{Percentiles, Report, int};
use crate::sampler::{Sample, Sampler};
use crate::world::{Daemon, KafkaProbe, Stack, World, clock_ticks, log_lines, proc_stats};

struct Options {
    events: usize,
    steady_secs: u64,
    batch_size: usize,
    steady_rate: Option<f64>,
    kill_after_secs: u64,
    limit_events: usize,
    session_timeout: Option<String>,
    drain_only: bool,
    static_membership: bool,
}

fn number(name: &str) -> anyhow::Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => {
            let digits: String = v.chars().filter(|c| !matches!(c, '_' | ',')).collect();
            let n = digits
                .trim()
                .parse()
                .with_context(|| format!("{name}={v} is not a whole number"))?;
            Ok(Some(n))
        }
        Err(_) => Ok(None),
    }
}

impl Options {
    fn from_env() -> anyhow::Result<Options> {
        let events = number("E2E_EVENTS")?.unwrap_or(1_000_000) as usize;
        let daemon_batch_size = audit_consumer::config::default_of("kafka.batch_size")
            .and_then(|v| v.parse().ok())
            .context("KAFKA_BATCH_SIZE has a numeric default")?;
        let batch_size = number("E2E_BATCH_SIZE")?.unwrap_or(daemon_batch_size) as usize;
        if events == 0 || !(1..=1024).contains(&batch_size) {
            bail!("E2E_EVENTS must be positive and E2E_BATCH_SIZE within 1..=1024");
        }
        Ok(Options {
            events,
            steady_secs: number("E2E_STEADY_SECS")?.unwrap_or(60).max(1),
            batch_size,
            steady_rate: number("E2E_STEADY_RATE")?.map(|r| r.max(1) as f64),
            kill_after_secs: number("E2E_KILL_AFTER_SECS")?.unwrap_or(20).max(1),
            limit_events: number("E2E_LIMIT_EVENTS")?
                .map_or(events, |n| n as usize)
                .clamp(1, events),
            session_timeout: std::env::var("E2E_SESSION_TIMEOUT").ok(),
            drain_only: std::env::var("E2E_DRAIN_ONLY").is_ok_and(|v| v == "1"),
            static_membership: std::env::var("E2E_STATIC_MEMBERSHIP").map_or(true, |v| v != "0"),
        })
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("e2e: end-to-end load benchmark, skipped outside `cargo bench --bench e2e`");
        return ExitCode::SUCCESS;
    }
    // `cargo bench -- FILTER` hands the filter to every bench target: run only when it names us.
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| "e2e".contains(f.as_str())) {
        println!("e2e: skipped (filtered out)");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `target/e2e`, wherever the target directory is (CARGO_TARGET_DIR included).
fn out_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent()
        .map_or_else(|| tmp.clone(), PathBuf::from)
        .join("e2e")
}

fn git_commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit} (with uncommitted changes)")
    } else {
        commit
    }
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long the drain may go without a commit before the run is given up.
const STALL: Duration = Duration::from_secs(120);

/// The newest ERROR line of a daemon log (message and error), for a failure message.
fn last_error(log: &std::path::Path) -> String {
    log_lines(log)
        .iter()
        .rev()
        .find(|l| l["level"] == "ERROR")
        .map_or_else(
            || "none logged".into(),
            |l| format!("{} ({})", l["message"], l["error"]),
        )
}

/// A `batch done` line of the daemon's log.
struct BatchLine {
    at: DateTime<Utc>,
    events: u64,
    duplicates: u64,
    /// Stage 1 start → stage 2 end, the wait between the stages included.
    elapsed_ms: f64,
    /// Closed → stage 1 start: parked, queued for the topic's writer, waiting for an immudb slot.
    queued_ms: f64,
    immudb_ms: f64,
    postgres_ms: f64,
}

fn batch_lines(log: &std::path::Path) -> Vec<BatchLine> {
    log_lines(log)
        .iter()
        .filter(|l| l["message"] == "batch done")
        .filter_map(|l| {
            let at = DateTime::parse_from_rfc3339(l["timestamp"].as_str()?).ok()?;
            let n = |f: &str| l[f].as_u64().unwrap_or(0);
            Some(BatchLine {
                at: at.with_timezone(&Utc),
                events: n("stored") + n("duplicates") + n("dead_letters"),
                duplicates: n("duplicates"),
                elapsed_ms: l["elapsed_ms"].as_f64()?,
                queued_ms: l["queued_ms"].as_f64().unwrap_or(0.0),
                immudb_ms: l["immudb_ms"].as_f64().unwrap_or(0.0),
                postgres_ms: l["postgres_ms"].as_f64().unwrap_or(0.0),
            })
        })
        .collect()
}

fn run() -> anyhow::Result<()> {
    let opts = Options::from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = out_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut report = Report {
        commit: git_commit(),
        date: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        machine: report::Machine::read(),
        settings: report::Settings {
            events: opts.events,
            steady_secs: opts.steady_secs,
            batch_size: opts.batch_size,
            kill_after_secs: opts.kill_after_secs,
            limit_events: opts.limit_events,
            session_timeout: opts
                .session_timeout
                .clone()
                .unwrap_or_else(|| "30s (default)".into()),
            group_instance_id: None,
            daemon_properties: std::env::vars()
                .filter(|(k, _)| k.starts_with("KAFKA_PROP_"))
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        },
        ..Report::default()
    };
    let stack = Stack::from_env()?;
    let brokers = stack.brokers.clone();
    let world = runtime.block_on(World::create(stack, &out))?;
    println!(
        "e2e: world {} (daemon logs in {}); load average {}",
        world.id,
        world.logs.display(),
        report.machine.load_average_start
    );
    let mut env = world.daemon_env(opts.batch_size, opts.session_timeout.as_deref());
    if opts.static_membership {
        env.insert(
            "KAFKA_GROUP_INSTANCE_ID".into(),
            format!("{}-daemon-0", world.id),
        );
    }
    report.settings.group_instance_id = env.get("KAFKA_GROUP_INSTANCE_ID").cloned();
    let ticks = clock_ticks();
    let probe = KafkaProbe::new(&world)?;

    // 1. Corpus and produce.
    let started = Instant::now();
    let corpus = Arc::new(Corpus::generate(opts.events, 0x00a0_d17e));
    let (min, mean, max) = corpus.size_stats();
    println!(
        "corpus: {} events, {} / {:.0} / {} B (min / mean / max), generated in {:.1} s",
        int(opts.events as f64),
        min,
        mean,
        max,
        started.elapsed().as_secs_f64()
    );
    let produce_time = corpus::produce_all(&brokers, &world.topics, &corpus)?;
    let ends = probe.end_offsets()?;
    let total: i64 = ends.iter().map(|(_, _, high)| high).sum();
    if total != opts.events as i64 {
        bail!(
            "the topics hold {total} records, {} were produced",
            opts.events
        );
    }
    let p = produce_time.as_secs_f64();
    report.corpus = report::CorpusFigures {
        events: opts.events,
        bytes: corpus.bytes(),
        min_bytes: min,
        mean_bytes: mean,
        max_bytes: max,
        produce_seconds: p,
        produce_rate: opts.events as f64 / p,
        produce_mib_s: corpus.bytes() as f64 / (1024.0 * 1024.0) / p,
    };
    println!(
        "produce: {} ev/s ({:.1} s)",
        int(report.corpus.produce_rate),
        p
    );

    // 2. Drain.
    let cpu_before = world::CpuSplit::read(ticks);
    let origin = Instant::now();
    let mut daemon = Daemon::start(&world, "e2e-daemon", &env)?;
    let sampler = Sampler::start(&world, daemon.pid(), Duration::from_secs(1), origin)?;
    let mut printed = 0;
    let mut progress = (0, Instant::now());
    wait_for(
        "the daemon to commit the corpus",
        Duration::from_secs(120 + opts.events as u64 / 500),
        || {
            daemon.ensure_running()?;
            let latest = sampler.latest();
            if let Some(s) = latest {
                if s.committed > progress.0 {
                    progress = (s.committed, Instant::now());
                } else if progress.1.elapsed() > STALL {
                    bail!(
                        "no commit for {STALL:?} at {} of {total}; the daemon's last error: {}",
                        s.committed,
                        last_error(&daemon.log)
                    );
                }
            }
            if sampler.len() >= printed + 10 {
                printed = sampler.len();
                if let Some(s) = latest {
                    println!(
                        "  drain: {:>4.0} s, committed {} of {}, RSS {:.0} MiB",
                        s.t,
                        int(s.committed as f64),
                        int(total as f64),
                        s.rss_bytes as f64 / (1024.0 * 1024.0)
                    );
                }
            }
            Ok(latest.filter(|s| s.committed >= total))
        },
    )?;
    let drain_seconds = origin.elapsed().as_secs_f64();
    let drain_cpu = world::CpuSplit::read(ticks).since(&cpu_before);
    let stats = proc_stats(daemon.pid(), ticks).unwrap_or_default();
    let drain_samples = sampler.stop();
    let drain_batches = batch_lines(&daemon.log);
    report.drain = drain_figures(
        &drain_batches,
        &drain_samples,
        drain_seconds,
        opts.events,
        stats,
        drain_cpu,
    );
    let d = &report.drain;
    println!(
        "drain: {} ev/s sustained, batches p50/p95/p99 {:.0}/{:.0}/{:.0} ms (immudb p95 {:.0}, PostgreSQL p95 {:.0}), peak RSS {:.0} MiB, {:.3} CPU s per 1,000 events",
        int(d.sustained_rate),
        d.batch_ms.p50,
        d.batch_ms.p95,
        d.batch_ms.p99,
        d.immudb_ms.p95,
        d.postgres_ms.p95,
        d.peak_rss_bytes as f64 / (1024.0 * 1024.0),
        d.cpu_seconds_per_1000
    );
    let plot = out.join("drain.png");
    report::plot_drain(
        &plot,
        &format!(
            "audit-consumer drain: {} events, batch {} ({})",
            int(opts.events as f64),
            opts.batch_size,
            report.commit
        ),
        &drain_samples,
    )?;

    if opts.drain_only {
        std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
        let (status, _) = daemon.terminate(Duration::from_secs(30))?;
        println!("E2E_DRAIN_ONLY: stopped after the drain (daemon exit {status})");
        return Ok(());
    }

    // 3. Steady.
    let rate = opts
        .steady_rate
        .unwrap_or((report.drain.sustained_rate * 0.5).round())
        .max(1.0);
    std::thread::sleep(Duration::from_secs(2));
    let batches_before = drain_batches.len();
    let steady_origin = Instant::now();
    let cpu_before = proc_stats(daemon.pid(), ticks)
        .unwrap_or_default()
        .cpu_seconds;
    let sampler = Sampler::start(&world, daemon.pid(), Duration::from_secs(1), steady_origin)?;
    println!("steady: {} ev/s for {} s", int(rate), opts.steady_secs);
    let never = AtomicBool::new(false);
    let steady = corpus::produce_paced(
        &brokers,
        &world.topics,
        rate,
        Some(Duration::from_secs(opts.steady_secs)),
        &never,
        "steady",
        1,
    )?;
    let produced_until = steady_origin.elapsed().as_secs_f64();
    wait_for(
        "the steady run to be committed",
        Duration::from_secs(120),
        || {
            daemon.ensure_running()?;
            Ok(sampler
                .latest()
                .filter(|s| s.t > produced_until && s.lag() == 0))
        },
    )?;
    let steady_samples = sampler.stop();
    let cpu_after = proc_stats(daemon.pid(), ticks)
        .unwrap_or_default()
        .cpu_seconds;
    let latency = runtime.block_on(latency(&world, "steady"))?;
    let steady_batches: Vec<f64> = batch_lines(&daemon.log)
        .iter()
        .skip(batches_before)
        .map(|b| b.elapsed_ms)
        .collect();
    report.steady = report::Steady {
        target_rate: rate,
        sent: steady.sent,
        achieved_rate: steady.sent as f64 / steady.elapsed.as_secs_f64(),
        latency_ms: latency,
        lag: Percentiles::of(
            steady_samples
                .iter()
                .filter(|s| s.t <= produced_until)
                .map(|s| s.lag() as f64)
                .collect(),
        ),
        max_rss_bytes: steady_samples
            .iter()
            .map(|s| s.rss_bytes)
            .max()
            .unwrap_or(0),
        cpu_seconds_per_1000: (cpu_after - cpu_before) / steady.sent.max(1) as f64 * 1000.0,
        batch_ms: Percentiles::of(steady_batches),
        load_average: report::load_average(),
        samples: steady_samples,
    };
    let st = &report.steady;
    println!(
        "steady: latency p50/p95/p99 {:.0}/{:.0}/{:.0} ms over {} rows, lag p95 {}",
        st.latency_ms.p50,
        st.latency_ms.p95,
        st.latency_ms.p99,
        st.latency_ms.count,
        int(st.lag.p95)
    );

    // 4. Recovery.
    let caught_up_lag = (report.steady.lag.p95 as i64).max(1);
    std::thread::sleep(Duration::from_secs(2));
    let rec_origin = Instant::now();
    let sampler = Sampler::start(&world, daemon.pid(), Duration::from_millis(200), rec_origin)?;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (brokers, topics, stop) = (brokers.clone(), world.topics.clone(), stop.clone());
        std::thread::spawn(move || {
            corpus::produce_paced(&brokers, &topics, rate, None, &stop, "recovery", 2)
        })
    };
    println!(
        "recovery: {} ev/s, SIGKILL after {} s",
        int(rate),
        opts.kill_after_secs
    );
    std::thread::sleep(Duration::from_secs(opts.kill_after_secs));
    daemon.ensure_running()?;
    let kill_at = rec_origin.elapsed().as_secs_f64();
    daemon.kill();
    let restart_wall = Utc::now();
    let mut daemon = Daemon::start(&world, "e2e-daemon-restarted", &env)?;
    let restart_at = rec_origin.elapsed().as_secs_f64();
    sampler.set_pid(daemon.pid());
    let committed_at_kill = probe.committed()?;
    let lag_at_kill = probe.end()? - committed_at_kill;
    let first_commit = wait_for(
        "the restarted daemon's first commit",
        Duration::from_secs(300),
        || {
            daemon.ensure_running()?;
            Ok(sampler
                .latest()
                .filter(|s| s.t > restart_at && s.committed > committed_at_kill))
        },
    )?;
    let caught_up = wait_for(
        "the restarted daemon to catch up",
        Duration::from_secs(600),
        || {
            daemon.ensure_running()?;
            Ok(sampler
                .latest()
                .filter(|s| s.t > first_commit.t && s.lag() <= caught_up_lag))
        },
    )?;
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let recovery = producer
        .join()
        .map_err(|_| anyhow::anyhow!("the recovery producer panicked"))??;
    let stopped_at = rec_origin.elapsed().as_secs_f64();
    let zero = wait_for(
        "lag 0 after the recovery run",
        Duration::from_secs(120),
        || {
            daemon.ensure_running()?;
            Ok(sampler
                .latest()
                .filter(|s| s.t > stopped_at && s.lag() == 0))
        },
    )?;
    let rec_samples = sampler.stop();
    let restarted_lines = log_lines(&daemon.log);
    let assigned = restarted_lines
        .iter()
        .find(|l| l["message"] == "partitions assigned")
        .and_then(|l| DateTime::parse_from_rfc3339(l["timestamp"].as_str()?).ok())
        .map(|at| (at.with_timezone(&Utc) - restart_wall).as_seconds_f64());
    report.recovery = report::Recovery {
        rate,
        kill_at_s: kill_at,
        lag_at_kill,
        restart_to_assigned_s: assigned,
        restart_to_first_commit_s: first_commit.t - restart_at,
        restart_to_caught_up_s: caught_up.t - restart_at,
        caught_up_lag,
        max_lag: rec_samples.iter().map(Sample::lag).max().unwrap_or(0),
        stop_to_lag0_s: zero.t - stopped_at,
        sent: recovery.sent,
        redelivered: batch_lines(&daemon.log).iter().map(|b| b.duplicates).sum(),
        samples: rec_samples,
    };
    let r = &report.recovery;
    println!(
        "recovery: restart → first commit {:.1} s, → caught up {:.1} s (partitions assigned after {}), {} redelivered",
        r.restart_to_first_commit_s,
        r.restart_to_caught_up_s,
        r.restart_to_assigned_s
            .map_or("?".into(), |s| format!("{s:.1} s")),
        r.redelivered
    );
    let (status, took) = daemon.terminate(Duration::from_secs(30))?;
    if !status.success() {
        bail!("the daemon exited with {status} after SIGTERM");
    }
    report.sigterm_exit_s = took.as_secs_f64();
    report.events_produced = opts.events as u64 + steady.sent + recovery.sent;
    report.rows_in_postgres = runtime.block_on(async {
        let pg = world.superuser_pool(&world.pg_schema).await?;
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_trail")
            .fetch_one(&pg)
            .await?;
        pg.close().await;
        anyhow::Ok(rows)
    })?;

    // 5. Limits.
    println!(
        "limits: {} events, batch {}",
        int(opts.limit_events as f64),
        opts.batch_size
    );
    let mut limits = runtime.block_on(limits::stores(
        &world,
        corpus.clone(),
        opts.limit_events,
        opts.batch_size,
    ))?;
    let (kafka, kafka_mib, read) = limits::kafka_consume(&world, &ends)?;
    if read != opts.events {
        bail!("the raw consumer read {read} of {} records", opts.events);
    }
    limits.kafka_consume = kafka;
    limits.kafka_consume_mib_s = kafka_mib;
    let (slowest, slowest_rate) = limits.slowest();
    report.slowest_limit = format!("{slowest}, {} ev/s", int(slowest_rate));
    report.drain_vs_slowest = report.drain.sustained_rate / slowest_rate;
    report.sequential_limit = limits.sequential();
    report.drain_vs_sequential = report.drain.sustained_rate / limits.sequential();
    report.limits = limits;

    // 6. Report.
    report.machine.load_average_end = report::load_average();
    let md = report.markdown();
    println!("\n{md}");
    std::fs::write(out.join("report.md"), &md)?;
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    println!(
        "written: {}, {}, {}",
        out.join("report.md").display(),
        out.join("report.json").display(),
        plot.display()
    );
    Ok(())
}

/// Drain figures from the daemon's batch lines and the samples.
fn drain_figures(
    batches: &[BatchLine],
    samples: &[Sample],
    seconds: f64,
    events: usize,
    stats: world::ProcStats,
    cpu_split: world::CpuSplit,
) -> report::Drain {
    // First → last batch: the events after the first batch over the time between them.
    let sustained_rate = match (batches.first(), batches.last()) {
        (Some(first), Some(last)) if last.at > first.at => {
            let after_first: u64 = batches.iter().map(|b| b.events).sum::<u64>() - first.events;
            after_first as f64 / (last.at - first.at).as_seconds_f64()
        }
        _ => events as f64 / seconds,
    };
    let first = samples.iter().find(|s| s.committed > 0);
    let last = samples.last();
    let sampled_rate = match (first, last) {
        (Some(f), Some(l)) if l.t > f.t => (l.committed - f.committed) as f64 / (l.t - f.t),
        _ => 0.0,
    };
    let total_events: u64 = batches.iter().map(|b| b.events).sum();
    report::Drain {
        seconds,
        first_commit_after_s: first.map_or(0.0, |s| s.t),
        sustained_rate,
        sampled_rate,
        overall_rate: events as f64 / seconds,
        batch_ms: Percentiles::of(batches.iter().map(|b| b.elapsed_ms).collect()),
        queued_ms: Percentiles::of(batches.iter().map(|b| b.queued_ms).collect()),
        immudb_ms: Percentiles::of(batches.iter().map(|b| b.immudb_ms).collect()),
        postgres_ms: Percentiles::of(batches.iter().map(|b| b.postgres_ms).collect()),
        mean_batch_events: total_events as f64 / batches.len().max(1) as f64,
        cpu_split,
        peak_rss_bytes: stats.hwm_bytes,
        max_sampled_rss_bytes: samples.iter().map(|s| s.rss_bytes).max().unwrap_or(0),
        cpu_seconds: stats.cpu_seconds,
        cpu_seconds_per_1000: stats.cpu_seconds / events as f64 * 1000.0,
        load_average: report::load_average(),
        samples: samples.to_vec(),
    }
}

/// End-to-end latency (ms) of the rows of `entity_type`: PostgreSQL's `ingested_at` minus the
/// event's own timestamp, which the paced producer set to the produce time.
async fn latency(world: &World, entity_type: &str) -> anyhow::Result<Percentiles> {
    let pg = world.superuser_pool(&world.pg_schema).await?;
    let (count, p50, p95, p99, max): (i64, Option<f64>, Option<f64>, Option<f64>, Option<f64>) =
        sqlx::query_as(
            "SELECT count(*), \
                    percentile_cont(0.50) WITHIN GROUP (ORDER BY ms), \
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY ms), \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), \
                    max(ms) \
             FROM (SELECT extract(epoch FROM ingested_at - event_timestamp)::float8 * 1000 AS ms \
                   FROM audit_trail WHERE entity_type = $1) AS latencies",
        )
        .bind(entity_type)
        .fetch_one(&pg)
        .await
        .context("querying the end-to-end latency")?;
    pg.close().await;
    Ok(Percentiles {
        count: count as usize,
        p50: p50.unwrap_or(0.0),
        p95: p95.unwrap_or(0.0),
        p99: p99.unwrap_or(0.0),
        max: max.unwrap_or(0.0),
    })
}
