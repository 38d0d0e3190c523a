//! The `audit-consumer` command line: the daemon (`run`, the default) and its operator tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use audit_consumer::config::{Settings, Sources};
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
    /// Apply the PostgreSQL migrations (run with a role allowed to create tables).
    Migrate,
    /// Print the effective configuration with secrets redacted; exit 1 if it is invalid.
    CheckConfig,
}

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
            Command::CheckConfig => Ok(()),
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
