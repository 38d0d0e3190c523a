//! `verify --event-id ID`: proves one PostgreSQL row against immudb, for an inspector.
//!
//! The row names its immudb key and transaction. The entry is read with immudb's proofs (its
//! inclusion in that transaction, and that transaction's consistency with the trusted state
//! this deployment persisted), the value's SHA-256 is compared with the row's
//! `payload_sha256`, and the value is decoded and compared with every column that comes from
//! it. Only then is the row "verified"; the proven state becomes the new trusted state.

use serde::Serialize;
use uuid::Uuid;

use super::compare::{FieldCheck, ROW_COLUMNS, StoredRow, compare_fields, differing};
use super::{OutputFormat, ToolError, Verdict, connect_immudb, connect_postgres, hex, print_json};
use crate::config::Settings;
use crate::event;
use crate::immudb::{ImmudbError, TrustedState};
use crate::postgres::PgError;
use crate::trust::{Trust, TrustFailure, TrustStore};

/// Arguments of `verify`.
#[derive(Debug, Clone)]
pub struct VerifyArgs {
    /// The event to prove.
    pub event_id: Uuid,
}

/// Where the state the proof was checked against came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustSource {
    /// `immudb_trusted_state`: what this deployment verified before.
    Stored,
    /// Nothing was stored: the server's current state was taken on first use (TOFU).
    FirstUse,
}

/// The trusted state before and after the run.
#[derive(Debug, Clone, Serialize)]
pub struct TrustReport {
    /// Where the trusted state came from.
    pub source: TrustSource,
    /// The transaction the proof was checked against.
    pub trusted_tx: u64,
    /// The trusted transaction after the run (when the proof verified).
    pub trusted_tx_after: Option<u64>,
    /// Whether the state was persisted to `immudb_trusted_state`.
    pub saved: bool,
}

/// The digest comparison.
#[derive(Debug, Clone, Serialize)]
pub struct DigestReport {
    /// `payload_sha256` of the row, hex.
    pub postgres: String,
    /// SHA-256 of the immudb value, hex.
    pub immudb: String,
    /// Whether they are equal.
    #[serde(rename = "match")]
    pub matches: bool,
}

/// The latest revision of a key, from a plain read.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Revision {
    /// 1 for the first write of the key.
    pub revision: u64,
    /// The transaction that wrote it.
    pub tx: u64,
}

/// Everything `verify` found, as printed with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The event asked for.
    pub event_id: Uuid,
    /// `verified`, `mismatch`, `proof_failed` or `missing`.
    pub verdict: &'static str,
    /// The immudb database.
    pub immudb_database: String,
    /// The PostgreSQL schema holding `audit_trail`.
    pub postgres_schema: String,
    /// The row's `immudb_key` (absent when there is no row).
    pub immudb_key: Option<String>,
    /// The row's `immudb_tx`.
    pub immudb_tx: Option<i64>,
    /// The trusted state used.
    pub trust: Option<TrustReport>,
    /// Whether immudb's inclusion and dual proofs verified.
    pub proof_verified: bool,
    /// Why the proof is not verified, when it is not.
    pub proof_error: Option<String>,
    /// The digest comparison, when the value was read.
    pub digest: Option<DigestReport>,
    /// The key's latest revision (a later write of an audit key is a red flag).
    pub latest_revision: Option<Revision>,
    /// One entry per compared column.
    pub fields: Vec<FieldCheck>,
    /// The columns that differ.
    pub differing_fields: Vec<&'static str>,
    /// Every problem found, one sentence each.
    pub findings: Vec<String>,
}

/// Runs `verify` and prints its report.
pub async fn run(
    settings: &Settings,
    args: &VerifyArgs,
    output: OutputFormat,
) -> Result<Verdict, ToolError> {
    let pg = connect_postgres(&settings.postgres).await?;
    let immudb = connect_immudb(&settings.immudb).await?;
    let mut report = VerifyReport {
        event_id: args.event_id,
        verdict: "verified",
        immudb_database: immudb.database(),
        postgres_schema: settings.postgres.schema.clone(),
        immudb_key: None,
        immudb_tx: None,
        trust: None,
        proof_verified: false,
        proof_error: None,
        digest: None,
        latest_revision: None,
        fields: Vec::new(),
        differing_fields: Vec::new(),
        findings: Vec::new(),
    };
    let result = check(&pg, &immudb, args, &mut report).await;
    immudb.close().await;
    pg.close().await;
    result?;
    report.verdict = if report.findings.is_empty() {
        "verified"
    } else if report.immudb_key.is_none() {
        "missing"
    } else if !report.proof_verified {
        "proof_failed"
    } else {
        "mismatch"
    };
    if output.json {
        print_json(&report);
    } else {
        super::emit(&render_human(&report));
    }
    Ok(Verdict::from_findings(!report.findings.is_empty()))
}

async fn check(
    pg: &sqlx::PgPool,
    immudb: &crate::immudb::ImmudbClient,
    args: &VerifyArgs,
    report: &mut VerifyReport,
) -> Result<(), ToolError> {
    let row: Option<StoredRow> = sqlx::query_as(&format!(
        "SELECT {ROW_COLUMNS} FROM audit_trail WHERE event_id = $1"
    ))
    .bind(args.event_id)
    .fetch_optional(pg)
    .await
    .map_err(|e| ToolError::postgres("reading the row", &PgError::from(e)))?;
    let Some(row) = row else {
        report
            .findings
            .push("PostgreSQL has no row with this event_id".into());
        return Ok(());
    };
    report.immudb_key = Some(row.immudb_key.clone());
    report.immudb_tx = Some(row.immudb_tx);
    let db = immudb.database();

    let store = TrustStore::new(pg.clone());
    let stored = store
        .load(&db)
        .await
        .map_err(|e| ToolError::postgres("reading immudb_trusted_state", &e))?;
    let (trusted, source) = match stored.clone() {
        Some(state) => (state, TrustSource::Stored),
        None => {
            let current = immudb
                .current_state()
                .await
                .map_err(|e| ToolError::immudb("reading immudb's current state", &e))?;
            match TrustedState::from_proto(&current) {
                Ok(state) => (state, TrustSource::FirstUse),
                Err(e) => {
                    report.proof_error =
                        Some(format!("the server's current state is malformed: {e}"));
                    report
                        .findings
                        .push(format!("immudb's current state is malformed: {e}"));
                    return Ok(());
                }
            }
        }
    };
    let mut trust = TrustReport {
        source,
        trusted_tx: trusted.tx_id,
        trusted_tx_after: None,
        saved: false,
    };

    let Some(proven) = prove_row(immudb, &row, &trusted, report).await? else {
        report.trust = Some(trust);
        return Ok(());
    };
    // The proof holds whatever PostgreSQL says: immudb's state is proven, so it is the new
    // anchor, moved by compare-and-set like the daemon's (a row another replica moved meanwhile
    // is proven consistent first).
    trust.trusted_tx_after = Some(proven.tx_id);
    let anchors = Trust::new(
        trusted.clone(),
        stored,
        Box::new(store),
        Box::new(immudb.clone()),
    );
    let newest = proven.tx_id;
    let saved = match anchors.accept(&trusted, proven.clone()).await {
        Ok(()) => anchors.settle(newest).await,
        Err(failure) => Err(failure),
    };
    match saved {
        Ok(()) => trust.saved = !proven.is_fresh(),
        Err(TrustFailure::Tampered(detail)) => {
            report.proof_error = Some(detail.clone());
            report.findings.push(format!(
                "the proven state contradicts the shared trusted state: {detail}"
            ));
        }
        Err(e) => eprintln!("warning: the trusted state could not be saved: {e}"),
    }
    report.trust = Some(trust);
    Ok(())
}

/// Proves `row` against immudb from `trusted`: the entry at the row's key and transaction is
/// read with its proofs, its SHA-256 compared with `payload_sha256`, its decoded value compared
/// with every column, and its key checked for later revisions. Every problem goes to
/// `report.findings`. Returns the proven state when the proofs held. Shared by `verify` and the
/// read API's `?verify=true`.
pub async fn prove_row(
    immudb: &crate::immudb::ImmudbClient,
    row: &StoredRow,
    trusted: &TrustedState,
    report: &mut VerifyReport,
) -> Result<Option<TrustedState>, ToolError> {
    let Ok(tx) = u64::try_from(row.immudb_tx) else {
        report.findings.push(format!(
            "immudb_tx {} is not a transaction id",
            row.immudb_tx
        ));
        return Ok(None);
    };
    let key = row.immudb_key.as_bytes();
    let verified = match immudb.verified_get(key, Some(tx), trusted).await {
        Ok(Some(found)) => Some(found),
        Ok(None) => {
            report.proof_error = Some(format!("no entry for the key at tx {tx}"));
            report.findings.push(format!(
                "immudb has no entry for {} written by tx {tx}",
                row.immudb_key
            ));
            None
        }
        Err(ImmudbError::VerificationFailed { source, .. }) => {
            report.proof_error = Some(source.to_string());
            report.findings.push(format!(
                "immudb's proof FAILED against trusted tx {}: {source}",
                trusted.tx_id
            ));
            None
        }
        // The key or tx came from the row; immudb refusing them is about the row, not the tool.
        Err(e @ (ImmudbError::InvalidArgument { .. } | ImmudbError::Permanent { .. })) => {
            report.proof_error = Some(e.to_string());
            report.findings.push(format!(
                "immudb refused to prove {} at tx {tx}: {e}",
                row.immudb_key
            ));
            None
        }
        Err(e) => return Err(ToolError::immudb("verified read from immudb", &e)),
    };
    let Some((entry, proven)) = verified else {
        return Ok(None);
    };
    report.proof_verified = true;

    let digest = event::payload_sha256(&entry.value);
    let digest_matches = digest.as_slice() == row.payload_sha256.as_slice();
    report.digest = Some(DigestReport {
        postgres: hex(&row.payload_sha256),
        immudb: hex(&digest),
        matches: digest_matches,
    });
    if !digest_matches {
        report
            .findings
            .push("payload_sha256 differs from the SHA-256 of the immudb value".into());
    }
    match event::decode(&entry.value) {
        Ok(decoded) => {
            report.fields = compare_fields(row, &decoded, &row.immudb_key);
            report.differing_fields = differing(&report.fields);
            if !report.differing_fields.is_empty() {
                report.findings.push(format!(
                    "PostgreSQL differs from immudb in: {}",
                    report.differing_fields.join(", ")
                ));
            }
        }
        Err(e) => report
            .findings
            .push(format!("the immudb value is not a valid event: {e}")),
    }

    // An audit key is written once. A later revision means the proven value is not what a
    // plain read returns today: worth an inspector's attention even if this row is intact.
    match immudb.get(key).await {
        Ok(Some(latest)) => {
            report.latest_revision = Some(Revision {
                revision: latest.revision,
                tx: latest.tx,
            });
            if latest.tx != entry.tx {
                report.findings.push(format!(
                    "the key was written again after tx {}: revision {} at tx {}",
                    entry.tx, latest.revision, latest.tx
                ));
            }
        }
        Ok(None) => report
            .findings
            .push("a plain read no longer finds the key (deleted or expired)".into()),
        Err(e) => return Err(ToolError::immudb("reading the key's latest revision", &e)),
    }

    Ok(Some(proven))
}

fn render_human(r: &VerifyReport) -> String {
    let mut o = String::new();
    out!(o, "verify event {}", r.event_id);
    let Some(key) = &r.immudb_key else {
        out!(
            o,
            "  PostgreSQL  no row with this event_id in schema \"{}\"",
            r.postgres_schema
        );
        out!(o, "verdict: MISSING — nothing to verify");
        return o;
    };
    out!(
        o,
        "  PostgreSQL  schema \"{}\": immudb_key {key}, immudb_tx {}",
        r.postgres_schema,
        r.immudb_tx.unwrap_or_default()
    );
    if let Some(trust) = &r.trust {
        match trust.source {
            TrustSource::Stored => out!(
                o,
                "  trust       trusted state of database \"{}\" from immudb_trusted_state: tx {}",
                r.immudb_database,
                trust.trusted_tx
            ),
            TrustSource::FirstUse => out!(
                o,
                "  trust       NO trusted state was stored for database \"{}\": the server's current \
                 state (tx {}) is trusted on first use",
                r.immudb_database,
                trust.trusted_tx
            ),
        }
    }
    let tx = r.immudb_tx.unwrap_or_default();
    if r.proof_verified {
        let trusted = r.trust.as_ref().map_or(0, |t| t.trusted_tx);
        out!(
            o,
            "  proof       VERIFIED: the entry is included in tx {tx}, and tx {tx} is consistent with \
             trusted tx {trusted} (dual proof)"
        );
    } else {
        out!(
            o,
            "  proof       FAILED: {}",
            r.proof_error.as_deref().unwrap_or("not verified")
        );
    }
    if let Some(d) = &r.digest {
        if d.matches {
            out!(
                o,
                "  digest      ok: SHA-256 of the immudb value = payload_sha256 = {}",
                d.postgres
            );
        } else {
            out!(
                o,
                "  digest      DIFFERS: immudb value {} / payload_sha256 {}",
                d.immudb,
                d.postgres
            );
        }
    }
    if let Some(latest) = r.latest_revision {
        out!(
            o,
            "  revisions   latest revision {} (tx {})",
            latest.revision,
            latest.tx
        );
    }
    if !r.fields.is_empty() {
        let differ = r.differing_fields.len();
        if differ == 0 {
            out!(o, "  fields      {} compared, all equal", r.fields.len());
        } else {
            out!(
                o,
                "  fields      {} compared, {differ} DIFFER: {}",
                r.fields.len(),
                r.differing_fields.join(", ")
            );
        }
        for f in &r.fields {
            if f.matches {
                out!(o, "                {:<18} ok", f.field);
            } else {
                out!(o, "                {:<18} DIFFERS", f.field);
                out!(
                    o,
                    "                  PostgreSQL: {}",
                    f.postgres.as_deref().unwrap_or("")
                );
                out!(
                    o,
                    "                  immudb:     {}",
                    f.immudb.as_deref().unwrap_or("")
                );
            }
        }
    }
    if let Some(trust) = &r.trust
        && let Some(after) = trust.trusted_tx_after
    {
        out!(
            o,
            "  trust       trusted state now tx {after}{}",
            if trust.saved {
                " (saved)"
            } else {
                " (NOT saved)"
            }
        );
    }
    if r.findings.is_empty() {
        let anchor = match r.trust.as_ref().map(|t| t.source) {
            Some(TrustSource::FirstUse) => " (anchored on a state trusted on first use)",
            _ => "",
        };
        out!(
            o,
            "verdict: VERIFIED — the PostgreSQL row is exactly what immudb proves{anchor}"
        );
    } else {
        out!(o, "verdict: {}", r.verdict.to_uppercase().replace('_', " "));
        for finding in &r.findings {
            out!(o, "  - {finding}");
        }
    }
    o
}
