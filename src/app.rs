//! The `run` command: connect the sinks, run the pipeline, stop cleanly on SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{self, TrustError};
use crate::config::{ImmudbSettings, Settings};
use crate::http::{self, Health};
use crate::immudb::StateVerifyingKey;
use crate::immudb::{ImmudbClient, ImmudbConnectOptions, ImmudbTls};
use crate::pipeline::immudb_write::ENTRIES_PER_EVENT;
use crate::pipeline::{self, Shared, Sinks, dlq::DlqProducer};
use crate::resilience::CircuitBreaker;
use crate::trust::{Trust, TrustStore};

/// Runs the daemon until a signal asks it to stop (exit 0) or a fatal error (exit 1).
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tracing::info!(
        instance = %settings.instance_id,
        group = %settings.kafka.group_id,
        topics = ?settings.kafka.topics,
        version = env!("CARGO_PKG_VERSION"),
        "audit-consumer starting"
    );

    let immudb_breaker = Arc::new(CircuitBreaker::new(
        "immudb",
        settings.circuit.failure_threshold,
        settings.circuit.cooldown,
    ));
    let pg_breaker = Arc::new(CircuitBreaker::new(
        "postgres",
        settings.circuit.failure_threshold,
        settings.circuit.cooldown,
    ));
    // A DLQ refusal that retrying cannot fix opens this one; its probe is the next send.
    let dlq_breaker = Arc::new(CircuitBreaker::new("dlq", 1, settings.circuit.cooldown));
    let health = Arc::new(Health::new(
        settings.http.stall_timeout,
        vec![
            immudb_breaker.clone(),
            pg_breaker.clone(),
            dlq_breaker.clone(),
        ],
    ));
    health.beat();
    let background = TaskTracker::new();
    let stop_background = CancellationToken::new();
    http::serve(
        &settings.http,
        health.clone(),
        stop_background.clone(),
        &background,
    )
    .await
    .context("starting the HTTP sidecar")?;

    let immudb = connect_immudb(&settings.immudb, &health, &shutdown).await?;
    let Some(immudb) = immudb else {
        stop_background.cancel();
        background.close();
        background.wait().await;
        return Ok(());
    };
    let entries = settings.kafka.batch_size * ENTRIES_PER_EVENT;
    if entries > immudb.limits().max_tx_entries {
        anyhow::bail!(
            "KAFKA_BATCH_SIZE={} needs {entries} immudb entries per transaction (two per event), \
             above the {} database {}'s maxTxEntries {}",
            settings.kafka.batch_size,
            if settings.immudb.create_database {
                "created"
            } else {
                "existing"
            },
            settings.immudb.database,
            immudb.limits().max_tx_entries
        );
    }
    // Lazy: the pool connects on first use, so a PostgreSQL outage at start-up is retried like
    // any other outage instead of crash-looping the pod.
    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(settings.postgres.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(
            settings
                .postgres
                .connect_options()
                .options([("search_path", settings.postgres.schema.as_str())]),
        );
    let dlq = DlqProducer::new(&settings.kafka, &settings.instance_id, dlq_breaker)
        .context("creating the DLQ producer")?;
    if !check_dlq(&settings, &health, &shutdown).await? {
        return Ok(());
    }

    let server_key = server_signing_key(&settings.immudb)?;
    let immudb = match &server_key {
        Some(key) => immudb.with_server_signing_key(*key),
        None => immudb,
    };
    let trust = if settings.immudb.verify {
        let store = TrustStore::new(pg.clone());
        let established = loop {
            match audit::establish_trust(&immudb, &store, server_key.as_ref()).await {
                Ok(established) => break established,
                Err(error @ (TrustError::Inconsistent { .. } | TrustError::BadSignature(_))) => {
                    return Err(error).context("establishing trust in immudb");
                }
                Err(TrustError::Immudb(error)) if !error.is_transient() => {
                    return Err(error).context("establishing trust in immudb");
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot establish trust in immudb yet; retrying")
                }
            }
            health.beat();
            tokio::select! {
                () = tokio::time::sleep(audit::STARTUP_RETRY) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        };
        let newest = established.current.tx_id;
        let trust = Arc::new(Trust::new(
            established.current,
            established.row,
            Box::new(store),
            Box::new(immudb.clone()),
        ));
        // Moves the shared row to the proven state (by compare-and-set); a failure here is
        // retried by the first batch.
        if let Err(error) = trust.settle(newest).await {
            if trust.tampered() {
                return Err(error).context("establishing trust in immudb");
            }
            tracing::warn!(%error, "cannot persist the trusted immudb state yet");
        }
        health.watch_trust(trust.clone());
        background.spawn(audit::run_continuous_audit(
            settings.audit,
            immudb.clone(),
            pg.clone(),
            trust.clone(),
            stop_background.clone(),
        ));
        Some(trust)
    } else {
        tracing::warn!("IMMUDB_VERIFY=false: batches are written without proofs");
        None
    };
    background.spawn(http::check_dependencies(
        health.clone(),
        immudb.clone(),
        pg.clone(),
        stop_background.clone(),
    ));

    let sinks = Sinks {
        immudb: immudb.clone(),
        pg: pg.clone(),
        dlq: dlq.clone(),
    };
    let shared = Shared {
        health,
        immudb_breaker,
        pg_breaker,
        trust,
    };
    let result = pipeline::run(&settings, sinks, &shared, shutdown).await;
    // What is left is bounded as a whole, so the exit stays within SHUTDOWN_TIMEOUT + a few
    // seconds even when a store or the broker does not answer.
    let cleanup = async {
        if let Some(trust) = &shared.trust
            && let Err(error) = trust.flush().await
        {
            tracing::warn!(%error, "cannot persist the newest trusted immudb state");
        }
        stop_background.cancel();
        background.close();
        let flush_dlq = dlq.clone();
        let _ = tokio::task::spawn_blocking(move || flush_dlq.flush(Duration::from_secs(1))).await;
        immudb.close().await;
        pg.close().await;
        background.wait().await;
    };
    if tokio::time::timeout(CLEANUP_TIMEOUT, cleanup)
        .await
        .is_err()
    {
        tracing::warn!("closing the stores timed out; exiting anyway");
    }
    result.context("pipeline stopped")?;
    tracing::info!("audit-consumer stopped cleanly");
    Ok(())
}

/// How long the steps after the pipeline's drain (persist the trusted state, flush the DLQ
/// producer, close the sessions) may take together.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Checks that the DLQ topic exists and can hold what the source topics may carry, retrying
/// while the brokers do not answer. Returns false when shutdown is requested first.
async fn check_dlq(
    settings: &Settings,
    health: &Health,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    loop {
        health.beat();
        match pipeline::dlq::check_topic_sizes(&settings.kafka).await {
            Ok(()) => return Ok(true),
            Err(error @ pipeline::dlq::DlqCheckError::Unreachable(_)) => {
                tracing::warn!(%error, "cannot check the DLQ topic yet; retrying");
            }
            Err(error) => return Err(error).context("checking the DLQ topic"),
        }
        tokio::select! {
            () = tokio::time::sleep(audit::STARTUP_RETRY) => {}
            () = shutdown.cancelled() => return Ok(false),
        }
    }
}

/// The immudb state-signing public key (`IMMUDB_SERVER_SIGNING_KEY`), when configured.
pub(crate) fn server_signing_key(
    settings: &ImmudbSettings,
) -> anyhow::Result<Option<StateVerifyingKey>> {
    let Some(path) = &settings.server_signing_key else {
        return Ok(None);
    };
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("IMMUDB_SERVER_SIGNING_KEY: reading {}", path.display()))?;
    let key = StateVerifyingKey::from_public_key_pem(&pem).with_context(|| {
        format!(
            "IMMUDB_SERVER_SIGNING_KEY: {} is not a P-256 public key",
            path.display()
        )
    })?;
    Ok(Some(key))
}

/// Connects to immudb, retrying while it is unreachable (it may start after us). Returns
/// `None` when shutdown is requested first.
pub(crate) async fn connect_immudb(
    settings: &ImmudbSettings,
    health: &Health,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<ImmudbClient>> {
    let options = immudb_options(settings)?;
    let mut delay = Duration::from_millis(500);
    loop {
        health.beat();
        match ImmudbClient::connect(options.clone()).await {
            Ok(client) => return Ok(Some(client)),
            Err(error) if error.is_transient() => {
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "immudb not reachable yet");
            }
            Err(error) => return Err(error).context("connecting to immudb"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(None),
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// The immudb client options from the settings (reads the TLS files).
pub fn immudb_options(settings: &ImmudbSettings) -> anyhow::Result<ImmudbConnectOptions> {
    let read = |path: &Option<std::path::PathBuf>, what: &str| -> anyhow::Result<Option<Vec<u8>>> {
        path.as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("reading {what} {}", p.display())))
            .transpose()
    };
    let tls = match &settings.tls {
        Some(tls) => Some(ImmudbTls {
            ca_cert_pem: read(&tls.ca_cert, "IMMUDB_TLS_CA_CERT")?,
            domain: tls.domain.clone(),
            client_cert_pem: read(&tls.client_cert, "IMMUDB_TLS_CLIENT_CERT")?,
            client_key_pem: read(&tls.client_key, "IMMUDB_TLS_CLIENT_KEY")?,
        }),
        None => None,
    };
    Ok(ImmudbConnectOptions {
        host: settings.host.clone(),
        port: settings.port,
        database: settings.database.clone(),
        username: settings.username.clone(),
        password: settings.password.expose_secret().to_owned().into(),
        tls,
        connect_timeout: Duration::from_secs(5),
        request_timeout: settings.request_timeout,
        create_database: settings.create_database,
        sync_frequency: Some(settings.sync_frequency),
    })
}

pub(crate) async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = terminate => tracing::info!("SIGTERM received; draining"),
        result = tokio::signal::ctrl_c() => match result {
            Ok(()) => tracing::info!("SIGINT received; draining"),
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
        },
    }
    shutdown.cancel();
}
