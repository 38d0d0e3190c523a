//! The `audit-consumer` command line: the daemon (`run`, the default) and its operator tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, FixedOffset};
use clap::builder::PossibleValuesParser;
use clap::{Args, Parser, Subcommand};

use audit_consumer::config::{Settings, Sources};
use audit_consumer::tools::{self, OutputFormat};
use audit_consumer::{postgres, telemetry};

#[derive(Parser)]
#[command(version, about = "Kafka → immudb → PostgreSQL audit-trail consumer")]
struct Cli {
    /// TOML config file (defaults < file < environment).
    #[arg(long, global = true, env = "AUDIT_CONFIG_FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume, store and commit until SIGTERM/SIGINT (the default).
    Run,
    /// Serve the read API (search, events, histories, proofs) until SIGTERM/SIGINT.
    Serve,
    /// Apply the PostgreSQL migrations (run with a role allowed to create tables).
    Migrate,
    /// Print the effective configuration with secrets redacted; exit 1 if it is invalid.
    CheckConfig,
    /// Prove one event's PostgreSQL row against immudb (proofs, digest, every column).
    ///
    /// Exit 0 verified, 1 a finding (mismatch, failed proof, missing), 2 usage or
    /// configuration error, 3 a store is unreachable.
    Verify {
        /// The event to prove.
        #[arg(long)]
        event_id: uuid::Uuid,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Compare PostgreSQL with immudb both ways; with --repair, restore the rows PostgreSQL lacks.
    ///
    /// Exit 0 clean (or everything missing was restored), 1 findings, 2 usage or configuration
    /// error, 3 a store is unreachable.
    Reconcile {
        /// Only events with event_timestamp at or after this instant (RFC 3339).
        #[arg(long, value_parser = parse_rfc3339)]
        since: Option<DateTime<FixedOffset>>,
        /// Only events with event_timestamp before this instant (RFC 3339).
        #[arg(long, value_parser = parse_rfc3339)]
        until: Option<DateTime<FixedOffset>>,
        /// Only rows consumed from this topic (skips the immudb → PostgreSQL direction).
        #[arg(long)]
        topic: Option<String>,
        /// Insert the events missing in PostgreSQL from immudb (never overwrites a row).
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Re-ingest dead letters once their cause is fixed (idempotent; nothing is re-dead-lettered).
    ///
    /// Exit 0 every selected record is stored, 1 some stay invalid or conflict, 2 usage or
    /// configuration error, 3 a store or the broker is unreachable.
    ReplayDlq {
        /// Only records with this dlq.error.class.
        #[arg(long, value_parser = PossibleValuesParser::new(tools::replay::REASONS))]
        reason: Option<String>,
        /// Only records with this dlq.error.stage.
        #[arg(long, value_parser = PossibleValuesParser::new(tools::replay::STAGES))]
        stage: Option<String>,
        /// Classify without writing to the stores or committing offsets.
        #[arg(long)]
        dry_run: bool,
        /// The replay's consumer group [default: <KAFKA_GROUP_ID>-dlq-replay].
        #[arg(long)]
        group: Option<String>,
        /// Read the whole DLQ, ignoring the group's committed offsets.
        #[arg(long)]
        from_beginning: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// Report format of the operator tools.
#[derive(Args)]
struct OutputArgs {
    /// Print one JSON document instead of the human report.
    #[arg(long)]
    json: bool,
}

fn parse_rfc3339(text: &str) -> Result<DateTime<FixedOffset>, String> {
    DateTime::parse_from_rfc3339(text)
        .map_err(|e| format!("{e}: expected RFC 3339, e.g. 2026-11-23T00:00:00Z"))
}

// See Cargo.toml: glibc malloc cost CPU and fragmented under the batch pipeline's allocations.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = match Settings::load(&Sources::process(cli.config.as_deref())) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::CheckConfig = command {
        print!("{}", loaded.render_redacted());
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    let settings = loaded.settings;
    let is_tool = matches!(
        command,
        Command::Verify { .. } | Command::Reconcile { .. } | Command::ReplayDlq { .. }
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if is_tool {
        return ExitCode::from(runtime.block_on(run_tool(&settings, command)));
    }
    {
        // Inside the runtime: the OTLP exporter's gRPC channel is spawned on it.
        let _in_runtime = runtime.enter();
        telemetry::init(&settings.log);
    }
    let result = runtime.block_on(async {
        match command {
            Command::Migrate => postgres::migrate(&settings.postgres)
                .await
                .context("applying PostgreSQL migrations"),
            Command::Run => audit_consumer::app::run(settings).await,
            Command::Serve => audit_consumer::api::serve(settings).await,
            Command::CheckConfig
            | Command::Verify { .. }
            | Command::Reconcile { .. }
            | Command::ReplayDlq { .. } => Ok(()),
        }
    });
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "audit-consumer failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Flush queued spans while the runtime still drives the exporter's connection.
    telemetry::shutdown();
    code
}

/// Runs an operator tool; returns its exit code (see `tools`). Its report goes to stdout, its
/// logs (warnings and errors only: the report is the output) to stderr.
async fn run_tool(settings: &Settings, command: Command) -> u8 {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .try_init();
    let (result, json) = match command {
        Command::Verify { event_id, output } => {
            let args = tools::verify::VerifyArgs { event_id };
            let format = OutputFormat { json: output.json };
            (
                tools::verify::run(settings, &args, format).await,
                output.json,
            )
        }
        Command::Reconcile {
            since,
            until,
            topic,
            repair,
            output,
        } => {
            let args = tools::reconcile::ReconcileArgs {
                since,
                until,
                topic,
                repair,
            };
            let format = OutputFormat { json: output.json };
            (
                tools::reconcile::run(settings, &args, format).await,
                output.json,
            )
        }
        Command::ReplayDlq {
            reason,
            stage,
            dry_run,
            group,
            from_beginning,
            output,
        } => {
            let args = tools::replay::ReplayArgs {
                reason,
                stage,
                dry_run,
                group,
                from_beginning,
            };
            let format = OutputFormat { json: output.json };
            (
                tools::replay::run(settings, &args, format).await,
                output.json,
            )
        }
        Command::Run | Command::Serve | Command::Migrate | Command::CheckConfig => {
            return tools::EXIT_USAGE;
        }
    };
    match result {
        Ok(verdict) => verdict.exit_code(),
        Err(error) => {
            if json {
                // A machine reading stdout gets a document even when there is no verdict.
                tools::print_json(&serde_json::json!({
                    "verdict": match error {
                        tools::ToolError::Usage(_) => "usage_error",
                        tools::ToolError::Incomplete(_) => "incomplete",
                    },
                    "exit_code": error.exit_code(),
                    "error": error.to_string(),
                }));
            }
            eprintln!("error: {error}");
            error.exit_code()
        }
    }
}
