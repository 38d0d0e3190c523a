//! The HTTP sidecar the kubelet and Prometheus talk to: `/health`, `/ready`, `/metrics`.
//!
//! Probes never touch a store on the request path: a background task checks immudb and
//! PostgreSQL every couple of seconds and the handlers read the cached result, so both probes
//! answer in microseconds even while a store hangs.
//! - `/health` (liveness): the consume loop's heartbeat is fresh. It beats while paused too, so
//!   a store outage never makes the kubelet restart the pods.
//! - `/ready` (readiness): in the consumer group, immudb and PostgreSQL answer, no circuit open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::resilience::{CircuitBreaker, CircuitState};

/// Shared liveness and readiness facts, written by the pipeline and the dependency checker.
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the last heartbeat of the consume loop.
    heartbeat_ms: AtomicU64,
    stall_after: Duration,
    in_group: AtomicBool,
    immudb_ok: AtomicBool,
    postgres_ok: AtomicBool,
    stopping: AtomicBool,
    breakers: Vec<Arc<CircuitBreaker>>,
    trust: std::sync::OnceLock<Arc<crate::trust::Trust>>,
}

impl Health {
    /// `stall_after`: how old the heartbeat may get before liveness fails.
    pub fn new(stall_after: Duration, breakers: Vec<Arc<CircuitBreaker>>) -> Self {
        Self {
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            stall_after,
            in_group: AtomicBool::new(false),
            immudb_ok: AtomicBool::new(false),
            postgres_ok: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            breakers,
            trust: std::sync::OnceLock::new(),
        }
    }

    /// Readiness also reports a failed verification (tamper suspected).
    pub fn watch_trust(&self, trust: Arc<crate::trust::Trust>) {
        let _ = self.trust.set(trust);
    }

    /// The consume loop is moving.
    pub fn beat(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.heartbeat_ms.store(now, Ordering::Relaxed);
    }

    fn heartbeat_age(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)))
    }

    /// The consumer has joined its group (an assignment, possibly empty, was received).
    pub fn set_in_group(&self, in_group: bool) {
        self.in_group.store(in_group, Ordering::Relaxed);
    }

    /// The daemon is draining: not ready for new work.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Liveness verdict and the heartbeat's age.
    pub fn liveness(&self) -> (bool, Duration) {
        let age = self.heartbeat_age();
        (age <= self.stall_after, age)
    }

    /// Readiness verdict and what is not ready.
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        let mut not_ready = Vec::new();
        if self.stopping.load(Ordering::Relaxed) {
            not_ready.push("stopping".to_owned());
        }
        if !self.in_group.load(Ordering::Relaxed) {
            not_ready.push("kafka: not in the consumer group".to_owned());
        }
        if !self.immudb_ok.load(Ordering::Relaxed) {
            not_ready.push("immudb: not reachable".to_owned());
        }
        if !self.postgres_ok.load(Ordering::Relaxed) {
            not_ready.push("postgres: not reachable".to_owned());
        }
        let tampered = self.trust.get().is_some_and(|trust| trust.tampered());
        if tampered {
            not_ready.push("immudb: verification failed, tamper suspected".to_owned());
        }
        let mut circuits = serde_json::Map::new();
        for breaker in &self.breakers {
            let state = breaker.state();
            if state != CircuitState::Closed {
                not_ready.push(format!("{}: circuit {}", breaker.service(), state.as_str()));
            }
            circuits.insert(breaker.service().to_owned(), json!(state.as_str()));
        }
        let ready = not_ready.is_empty();
        let body = json!({
            "ready": ready,
            "not_ready": not_ready,
            "checks": {
                "kafka_group": self.in_group.load(Ordering::Relaxed),
                "immudb": self.immudb_ok.load(Ordering::Relaxed),
                "postgres": self.postgres_ok.load(Ordering::Relaxed),
                "verification_failed": tampered,
                "circuits": circuits,
            }
        });
        (ready, body)
    }
}

/// Checks the stores in the background, forever (until `stop`), so probes stay instant.
pub async fn check_dependencies(
    health: Arc<Health>,
    immudb: crate::immudb::ImmudbClient,
    pg: sqlx::PgPool,
    stop: CancellationToken,
) {
    const TIMEOUT: Duration = Duration::from_secs(2);
    loop {
        let immudb_ok = matches!(
            tokio::time::timeout(TIMEOUT, immudb.health()).await,
            Ok(Ok(()))
        );
        let pg_ok = matches!(
            tokio::time::timeout(TIMEOUT, sqlx::query("SELECT 1").execute(&pg)).await,
            Ok(Ok(_))
        );
        health.immudb_ok.store(immudb_ok, Ordering::Relaxed);
        health.postgres_ok.store(pg_ok, Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn health_handler(State(health): State<Arc<Health>>) -> Response {
    let (alive, age) = health.liveness();
    let status = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"alive": alive, "heartbeat_age_ms": age.as_millis() as u64});
    (status, axum::Json(body)).into_response()
}

async fn ready_handler(State(health): State<Arc<Health>>) -> Response {
    let (ready, body) = health.readiness();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics_handler() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::metrics().render(),
    )
        .into_response()
}

/// Where the sidecar listens.
#[derive(Debug, Clone, Copy)]
pub struct Listeners {
    pub health: SocketAddr,
    pub metrics: SocketAddr,
}

/// Binds the sidecar (one listener, or two when the metrics port differs) and serves until
/// `stop`. Returns the bound addresses (port 0 picks a free port: the tests use that).
pub async fn serve(
    settings: &crate::config::HttpSettings,
    health: Arc<Health>,
    stop: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> std::io::Result<Listeners> {
    let probes = Router::new()
        .route("/health", get(health_handler))
        .route("/ready", get(ready_handler))
        .with_state(health);
    let metrics = Router::new().route("/metrics", get(metrics_handler));
    let health_listener =
        tokio::net::TcpListener::bind(SocketAddr::new(settings.bind_address, settings.health_port))
            .await?;
    let health_addr = health_listener.local_addr()?;
    let metrics_addr = if settings.metrics_port == settings.health_port {
        spawn_server(tasks, health_listener, probes.merge(metrics), stop);
        health_addr
    } else {
        let metrics_listener = tokio::net::TcpListener::bind(SocketAddr::new(
            settings.bind_address,
            settings.metrics_port,
        ))
        .await?;
        let addr = metrics_listener.local_addr()?;
        spawn_server(tasks, health_listener, probes, stop.clone());
        spawn_server(tasks, metrics_listener, metrics, stop);
        addr
    };
    tracing::info!(health = %health_addr, metrics = %metrics_addr, "http sidecar listening");
    Ok(Listeners {
        health: health_addr,
        metrics: metrics_addr,
    })
}

fn spawn_server(
    tasks: &tokio_util::task::TaskTracker,
    listener: tokio::net::TcpListener,
    router: Router,
    stop: CancellationToken,
) {
    tasks.spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "http sidecar failed");
        }
    });
}
