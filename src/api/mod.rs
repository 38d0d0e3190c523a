//! The read side: `audit-consumer serve`, the audit query API for auditors, QA managers and
//! inspectors. Stateless (it scales as its own Deployment), it reads PostgreSQL with a
//! SELECT-only login and immudb read-only, authenticates every call with an OpenID Connect
//! bearer token, and records every read of the trail as an access event on Kafka, which the
//! write side stores in the tamper-evident trail like any other event.
//!
//! ```text
//! GET /api/v1/events                                   search (filters, keyset pages)
//! GET /api/v1/events/{event_id}[?verify=true]          one event, its stored bytes, a proof
//! GET /api/v1/entities/{entity_type}/{entity_id}/history   an entity's timeline with changes
//! GET /api/v1/openapi.json                             this API, generated from the handlers
//! GET /health  /ready  /metrics
//! ```

pub mod access;
pub mod auth;
pub mod cursor;
pub mod error;
pub mod events;
pub mod params;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use self::access::AccessLog;
use self::auth::Verifier;
use self::cursor::CursorKey;
use crate::config::Settings;
use crate::http::Health;
use crate::immudb::ImmudbClient;
use crate::metrics::metrics;
use crate::trust::{Trust, TrustStore};

/// Everything a request needs.
pub struct ApiState {
    pub pg: sqlx::PgPool,
    pub immudb: ImmudbClient,
    /// Whether the server's state signatures are checked (`IMMUDB_SERVER_SIGNING_KEY`).
    pub immudb_signed: bool,
    /// The trusted state proofs are checked against; kept in memory only (the read side never
    /// writes the shared row).
    pub trust: Trust,
    pub verifier: Verifier,
    pub cursors: CursorKey,
    pub access: AccessLog,
    ready: Readiness,
}

/// Readiness, refreshed in the background so the probe answers at once.
#[derive(Default)]
struct Readiness {
    postgres: AtomicBool,
    immudb: AtomicBool,
    problems: std::sync::Mutex<Vec<String>>,
}

/// Who sent a request, for its access event: the request id (also sent back as
/// `x-request-id`), the peer address and the user agent.
#[derive(Debug, Clone)]
pub struct Caller {
    pub request_id: Uuid,
    pub client: Option<String>,
    pub user_agent: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct RequestId(Uuid);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let request_id = parts
            .extensions
            .get::<RequestId>()
            .map_or_else(Uuid::new_v4, |id| id.0);
        let client = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip().to_string());
        let user_agent = parts
            .headers
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(256).collect());
        Ok(Caller {
            request_id,
            client,
            user_agent,
        })
    }
}

/// The OpenAPI document's frame; the paths come from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "audit-consumer read API",
        description = "Search, read and prove the tamper-evident audit trail. Every call needs an \
            OpenID Connect bearer token; every read is itself recorded in the trail."
    ),
    modifiers(&BearerAuth),
    tags((name = "events", description = "The audit trail"))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.bearer_format = Some("JWT".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The API routes with their OpenAPI document, built from the same handler list so the two
/// cannot drift apart.
pub fn api_routes() -> (Router<Arc<ApiState>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(events::list_events))
        .routes(routes!(events::get_event))
        .routes(routes!(events::entity_history))
        .split_for_parts()
}

/// The whole router: the API, its document, the probes and the metrics.
pub fn router(state: Arc<ApiState>) -> Router {
    let (api, document) = api_routes();
    let document = Arc::new(document);
    api.route(
        "/api/v1/openapi.json",
        get(move || {
            let document = document.clone();
            async move { Json(document.as_ref().clone()) }
        }),
    )
    .route(
        "/health",
        get(|| async { Json(serde_json::json!({ "alive": true })) }),
    )
    .route("/ready", get(ready))
    .route(
        "/metrics",
        get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                metrics().render(),
            )
        }),
    )
    .fallback(|| async {
        error::ApiError::NotFound("no such route; see /api/v1/openapi.json".into())
    })
    .layer(middleware::from_fn(observe))
    .with_state(state)
}

/// Request id, metrics by route template and status, and the `x-request-id` header.
async fn observe(matched: Option<MatchedPath>, mut request: Request, next: Next) -> Response {
    let id = Uuid::new_v4();
    request.extensions_mut().insert(RequestId(id));
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let started = std::time::Instant::now();
    let mut response = next.run(request).await;
    let m = metrics();
    m.api_requests
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    m.api_request_duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    let mut not_ready = state
        .ready
        .problems
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if !state.verifier.keys_loaded().await {
        not_ready.push("identity provider: signing keys not loaded".into());
    }
    if state.trust.tampered() {
        not_ready.push("immudb: verification failed, tamper suspected".into());
    }
    let body = serde_json::json!({
        "ready": not_ready.is_empty(),
        "not_ready": not_ready,
        "checks": {
            "postgres": state.ready.postgres.load(Ordering::Relaxed),
            "immudb": state.ready.immudb.load(Ordering::Relaxed),
            "trusted_tx": state.trust.current().tx_id,
        },
    });
    let status = if not_ready.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Checks the stores every 2 s for `/ready`.
async fn check_readiness(state: Arc<ApiState>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let mut problems = Vec::new();
        let pg = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&state.pg),
        )
        .await;
        let pg_ok = matches!(pg, Ok(Ok(_)));
        if !pg_ok {
            problems.push("postgres: not reachable".to_owned());
        }
        let immudb = tokio::time::timeout(Duration::from_secs(2), state.immudb.health()).await;
        let immudb_ok = matches!(immudb, Ok(Ok(())));
        if !immudb_ok {
            problems.push("immudb: not reachable".to_owned());
        }
        state.ready.postgres.store(pg_ok, Ordering::Relaxed);
        state.ready.immudb.store(immudb_ok, Ordering::Relaxed);
        *state
            .ready
            .problems
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = problems;
    }
}

/// Loads the identity provider's keys (retrying until it answers), then refreshes them.
async fn keep_keys_fresh(state: Arc<ApiState>, stop: CancellationToken) {
    let mut delay = Duration::from_millis(500);
    loop {
        let wait = match state.verifier.refresh().await {
            Ok(_) => {
                delay = Duration::from_millis(500);
                auth::REFRESH_INTERVAL
            }
            Err(error) => {
                tracing::warn!(%error, "cannot load the identity provider's signing keys; retrying");
                delay = (delay * 2).min(Duration::from_secs(30));
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Runs `serve` until SIGTERM/SIGINT.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::app::cancel_on_signal(shutdown.clone()));
    // reqwest's rustls takes the process's provider; ring is the one already in the tree.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cursor_key = settings.api.cursor_key.clone().context(
        "API_CURSOR_KEY (api.cursor_key) is required by `serve`: a random key of at least 32 \
         characters, the same on every replica",
    )?;
    let verifier = Verifier::new(&settings.oidc).context("OIDC settings")?;
    tracing::info!(
        issuer = settings.oidc.issuer.as_deref().unwrap_or_default(),
        version = env!("CARGO_PKG_VERSION"),
        "audit-consumer serve starting"
    );

    let pg = sqlx::postgres::PgPoolOptions::new()
        .max_connections(settings.postgres.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(settings.postgres.connect_options().options([
            ("search_path", settings.postgres.schema.as_str()),
            (
                "statement_timeout",
                &settings.api.query_timeout.as_millis().to_string(),
            ),
            // The read side never writes: a misconfigured login that could is held to it here.
            ("default_transaction_read_only", "on"),
        ]));
    let health = Health::new(settings.http.stall_timeout, Vec::new());
    let Some(immudb) = crate::app::connect_immudb(&settings.immudb, &health, &shutdown).await?
    else {
        return Ok(());
    };
    let server_key = crate::app::server_signing_key(&settings.immudb)?;
    let immudb = match &server_key {
        Some(key) => immudb.with_server_signing_key(*key),
        None => immudb,
    };
    let store = TrustStore::new(pg.clone());
    let established = loop {
        match crate::audit::establish_trust(&immudb, &store, server_key.as_ref()).await {
            Ok(established) => break established,
            Err(
                error @ (crate::audit::TrustError::Inconsistent { .. }
                | crate::audit::TrustError::BadSignature(_)),
            ) => return Err(error).context("establishing trust in immudb"),
            Err(error) => tracing::warn!(%error, "cannot establish trust in immudb yet; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(crate::audit::STARTUP_RETRY) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    };
    let access = AccessLog::new(
        &settings.kafka,
        &settings.api.access_topic,
        &settings.instance_id,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let state = Arc::new(ApiState {
        pg: pg.clone(),
        immudb: immudb.clone(),
        immudb_signed: server_key.is_some(),
        trust: Trust::new(
            established.current,
            established.row,
            Box::new(store),
            Box::new(immudb.clone()),
        ),
        verifier,
        cursors: CursorKey::new(cursor_key),
        access,
        ready: Readiness::default(),
    });
    let background = CancellationToken::new();
    tokio::spawn(keep_keys_fresh(state.clone(), background.clone()));
    tokio::spawn(check_readiness(state.clone(), background.clone()));

    let listener = tokio::net::TcpListener::bind(SocketAddr::new(
        settings.api.bind_address,
        settings.api.port,
    ))
    .await
    .with_context(|| format!("binding API_PORT {}", settings.api.port))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "read API listening");
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let stopping = shutdown.clone();
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stopping.cancelled().await });
    // In-flight requests get SHUTDOWN_TIMEOUT to finish after the signal; then we leave.
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(settings.shutdown_timeout).await;
    };
    tokio::select! {
        served = server => served.context("serving the read API")?,
        () = deadline => tracing::warn!("requests still running at the shutdown deadline were cut off"),
    }
    background.cancel();
    immudb.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), pg.close()).await;
    tracing::info!("audit-consumer serve stopped");
    Ok(())
}
