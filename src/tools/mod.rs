//! Operator tools over the stores the daemon fills: prove one event (`verify`), compare the
//! replica with the system of record and restore what PostgreSQL lost (`reconcile`), and
//! re-ingest dead letters once their cause is fixed (`replay-dlq`).
//!
//! Each tool prints a report for a human (or one JSON document with `--json`) on stdout and
//! answers with an exit code a script can act on:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | clean: everything checked is consistent (or was repaired / stored) |
//! | 1 | a finding: tampering, a mismatch, something missing, records that stay invalid |
//! | 2 | usage or configuration error (bad argument, bad credentials, missing database) |
//! | 3 | could not complete: a store or the broker is unreachable |
//!
//! They read the same configuration as `run` (including `IMMUDB_SERVER_SIGNING_KEY`: with it,
//! every proof must also carry the server's valid state signature) and act with the daemon's
//! own least privileges (SELECT and INSERT on `audit_trail`).

/// Appends one line to a report being rendered into a `String` (formatting into a `String`
/// cannot fail, so the `fmt::Result` is dropped here once).
macro_rules! out {
    ($o:expr) => {
        $o.push('\n')
    };
    ($o:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($o, $($arg)*);
    }};
}

pub mod compare;
pub mod progress;
pub mod reconcile;
pub mod replay;
pub mod verify;

use std::time::Duration;

use sqlx::PgPool;

use crate::config::{ImmudbSettings, PostgresSettings};
use crate::immudb::{ImmudbClient, ImmudbError, StateVerifyingKey};
use crate::postgres::{self, PgError};

/// Exit code: everything checked is consistent.
pub const EXIT_CLEAN: u8 = 0;
/// Exit code: at least one finding (tamper, mismatch, missing, still invalid).
pub const EXIT_FINDING: u8 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the tool could not complete (a store or the broker is unreachable).
pub const EXIT_INCOMPLETE: u8 = 3;

/// What a completed tool run concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to report.
    Clean,
    /// Something an operator must look at.
    Findings,
}

impl Verdict {
    /// The process exit code for this verdict.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Clean => EXIT_CLEAN,
            Verdict::Findings => EXIT_FINDING,
        }
    }

    /// `Findings` when `found`, else `Clean`.
    pub fn from_findings(found: bool) -> Self {
        if found {
            Verdict::Findings
        } else {
            Verdict::Clean
        }
    }
}

/// Why a tool could not give a verdict.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// A bad argument or configuration (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A store or the broker failed (exit 3); nothing was concluded.
    #[error("{0}")]
    Incomplete(String),
}

impl ToolError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ToolError::Usage(_) => EXIT_USAGE,
            ToolError::Incomplete(_) => EXIT_INCOMPLETE,
        }
    }

    /// An immudb failure while working: configuration problems are the operator's to fix
    /// (exit 2), anything else means the run could not complete (exit 3).
    pub fn immudb(what: &str, error: &ImmudbError) -> Self {
        match error {
            ImmudbError::Config(_) | ImmudbError::Unauthenticated { .. } => {
                ToolError::Usage(format!("{what}: {error}"))
            }
            _ => ToolError::Incomplete(format!("{what}: {error}")),
        }
    }

    /// A PostgreSQL failure while working; see [`ToolError::immudb`].
    pub fn postgres(what: &str, error: &PgError) -> Self {
        // 28: bad credentials; 3D: no such database; 42: missing table/privilege (not migrated
        // or the wrong schema). The operator fixes these; retrying later will not.
        let config = error
            .sqlstate()
            .is_some_and(|code| ["28", "3D", "42"].iter().any(|c| code.starts_with(c)));
        if config {
            ToolError::Usage(format!("{what}: {error}"))
        } else {
            ToolError::Incomplete(format!("{what}: {error}"))
        }
    }
}

/// How a tool prints its report.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputFormat {
    /// One JSON document on stdout instead of the human report.
    pub json: bool,
}

/// Connects to immudb once, without the daemon's wait-for-the-server loop: a tool run against
/// an unreachable store should say so at once (exit 3). It never creates the database: a tool
/// pointed at a database that does not exist is misconfigured.
pub async fn connect_immudb(settings: &ImmudbSettings) -> Result<ImmudbClient, ToolError> {
    let mut options = crate::app::immudb_options(settings)
        .map_err(|e| ToolError::Usage(format!("immudb settings: {e:#}")))?;
    options.create_database = false;
    // Read before connecting: a bad key file is a configuration error, whatever the server.
    let server_key = match &settings.server_signing_key {
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                ToolError::Usage(format!(
                    "IMMUDB_SERVER_SIGNING_KEY: reading {}: {e}",
                    path.display()
                ))
            })?;
            let key = StateVerifyingKey::from_public_key_pem(&pem).map_err(|e| {
                ToolError::Usage(format!(
                    "IMMUDB_SERVER_SIGNING_KEY: {}: {e}",
                    path.display()
                ))
            })?;
            Some(key)
        }
        None => None,
    };
    let client = ImmudbClient::connect(options)
        .await
        .map_err(|e| ToolError::immudb("connecting to immudb", &e))?;
    // With the key, every verified answer must carry the server's valid state signature.
    Ok(match server_key {
        Some(key) => client.with_server_signing_key(key),
        None => client,
    })
}

/// Connects to PostgreSQL (inside the configured schema) and checks that the audit table is
/// readable, so a wrong schema is reported as such rather than as missing rows.
pub async fn connect_postgres(settings: &PostgresSettings) -> Result<PgPool, ToolError> {
    let pool = tokio::time::timeout(Duration::from_secs(30), postgres::connect(settings))
        .await
        .map_err(|_| ToolError::Incomplete("connecting to PostgreSQL: timed out".into()))?
        .map_err(|e| ToolError::postgres("connecting to PostgreSQL", &e))?;
    sqlx::query("SELECT 1 FROM audit_trail LIMIT 1")
        .execute(&pool)
        .await
        .map_err(|e| ToolError::postgres("reading audit_trail", &PgError::from(e)))?;
    Ok(pool)
}

/// Prints a report as one pretty JSON document on stdout.
pub fn print_json<T: serde::Serialize>(report: &T) {
    match serde_json::to_string_pretty(report) {
        Ok(text) => emit(&(text + "\n")),
        Err(e) => eprintln!("cannot render the report as JSON: {e}"),
    }
}

/// Writes a rendered report to stdout. A reader that went away (`| head`) is not worth a
/// panic: the exit code still carries the verdict.
pub fn emit(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Lower-case hex of a digest, for reports.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}
