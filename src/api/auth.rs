//! Who is asking: OpenID Connect bearer tokens (JWT) from the configured identity provider.
//!
//! A token is accepted only when its signature verifies with one of the issuer's published keys
//! (JWKS, fetched and cached; a token naming an unknown `kid` triggers one refresh, so a key
//! rotation needs no restart), its algorithm is asymmetric (`none` and HMAC are refused: an
//! HMAC "signature" checked with a public key would let anyone who knows the key forge one), and
//! its `iss`, `aud`, `exp` and `nbf` hold. The roles come from a configurable claim path.
//! Handlers take a role-checked extractor ([`Reader`]), so who may call a route shows in its
//! signature.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::RwLock;

use super::ApiState;
use super::error::ApiError;
use crate::config::OidcSettings;

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;
/// Unknown `kid`s refresh the keys at most this often (a flood of made-up ids cannot turn into
/// a flood of requests to the identity provider).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// A `kid` still unknown after a refresh is refused without another one for this long.
const UNKNOWN_KID_TTL: Duration = Duration::from_secs(30);
/// The keys are refreshed this often anyway (rotations that remove keys).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(300);

/// Signature algorithms a token may use: asymmetric ones only.
const ALLOWED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The roles of the read side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Search, read events and histories, verify; personal data redacted.
    Auditor,
    /// An auditor who also sees the original payloads, unredacted.
    Investigator,
    /// Reserved for compliance reports.
    ReportAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Auditor => "auditor",
            Role::Investigator => "investigator",
            Role::ReportAdmin => "report_admin",
        }
    }
}

/// The person behind a verified token.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `sub`: the identity provider's stable id of the person.
    pub subject: String,
    /// `preferred_username`, else `sub`.
    pub username: String,
    /// `name`, the printed name.
    pub name: Option<String>,
    /// The read-side roles the token carries.
    pub roles: Vec<Role>,
    /// `sid`: the login session.
    pub session: Option<String>,
}

impl Principal {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    fetched: Option<Instant>,
    /// Ids that were still unknown after a refresh, and when.
    unknown: HashMap<String, Instant>,
}

/// Verifies bearer tokens against the issuer's keys.
pub struct Verifier {
    issuer: String,
    audience: String,
    roles_claim: Vec<String>,
    jwks_url: RwLock<Option<String>>,
    http: reqwest::Client,
    keys: RwLock<Keys>,
    /// Serialises refreshes, so a burst of tokens with a new `kid` fetches once.
    refreshing: tokio::sync::Mutex<()>,
}

/// Why the issuer's keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("OIDC_ISSUER is required by `serve`")]
    NoIssuer,
    #[error("OIDC_CA_CERT: {0}")]
    CaCert(String),
    #[error("the identity provider: {0}")]
    Fetch(String),
}

impl Verifier {
    /// A verifier for `settings`; no key is loaded yet (see [`refresh`](Self::refresh)).
    pub fn new(settings: &OidcSettings) -> Result<Self, KeysError> {
        let issuer = settings.issuer.clone().ok_or(KeysError::NoIssuer)?;
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5));
        if let Some(path) = &settings.ca_cert {
            let pem = std::fs::read(path)
                .map_err(|e| KeysError::CaCert(format!("reading {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| KeysError::CaCert(format!("{}: {e}", path.display())))?;
            http = http.tls_certs_only(certs);
        }
        Ok(Self {
            issuer: issuer.trim_end_matches('/').to_owned(),
            audience: settings.audience.clone(),
            roles_claim: settings.roles_claim.clone(),
            jwks_url: RwLock::new(settings.jwks_url.clone()),
            http: http
                .build()
                .map_err(|e| KeysError::Fetch(format!("building the HTTP client: {e}")))?,
            keys: RwLock::new(Keys::default()),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether any signing key is loaded (readiness).
    pub async fn keys_loaded(&self) -> bool {
        !self.keys.read().await.by_kid.is_empty()
    }

    /// Fetches the issuer's keys (discovering the JWKS URL first when it is not configured).
    pub async fn refresh(&self) -> Result<usize, KeysError> {
        let _one = self.refreshing.lock().await;
        let url = self.jwks_url().await?;
        let set: JwkSet = self.get_json(&url).await?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            // Encryption keys and keys without an id cannot sign tokens we can select.
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                continue;
            }
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    by_kid.insert(kid, (key, alg));
                }
                Err(error) => tracing::warn!(%kid, %error, "skipping a JWKS key"),
            }
        }
        let count = by_kid.len();
        let mut keys = self.keys.write().await;
        keys.by_kid = by_kid;
        keys.fetched = Some(Instant::now());
        tracing::info!(keys = count, jwks = %url, "identity provider signing keys loaded");
        Ok(count)
    }

    async fn jwks_url(&self) -> Result<String, KeysError> {
        if let Some(url) = self.jwks_url.read().await.clone() {
            return Ok(url);
        }
        let discovery: Value = self
            .get_json(&format!("{}/.well-known/openid-configuration", self.issuer))
            .await?;
        if discovery["issuer"]
            .as_str()
            .map(|i| i.trim_end_matches('/'))
            != Some(&self.issuer)
        {
            return Err(KeysError::Fetch(format!(
                "the discovery document names issuer {}, not OIDC_ISSUER {}",
                discovery["issuer"], self.issuer
            )));
        }
        let url = discovery["jwks_uri"]
            .as_str()
            .ok_or_else(|| KeysError::Fetch("the discovery document has no jwks_uri".into()))?
            .to_owned();
        *self.jwks_url.write().await = Some(url.clone());
        Ok(url)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, KeysError> {
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| KeysError::Fetch(format!("GET {url}: {e}")))?;
        if !response.status().is_success() {
            return Err(KeysError::Fetch(format!(
                "GET {url}: HTTP {}",
                response.status()
            )));
        }
        response
            .json()
            .await
            .map_err(|e| KeysError::Fetch(format!("GET {url}: {e}")))
    }

    /// The key a token names, refreshing once when the `kid` is unknown (a rotation).
    async fn key_for(&self, kid: &str) -> Result<(DecodingKey, Option<Algorithm>), ApiError> {
        let unknown = || ApiError::Unauthenticated(format!("unknown signing key {kid}"));
        {
            let keys = self.keys.read().await;
            if let Some(found) = keys.by_kid.get(kid) {
                return Ok(found.clone());
            }
            if keys
                .unknown
                .get(kid)
                .is_some_and(|at| at.elapsed() < UNKNOWN_KID_TTL)
            {
                return Err(unknown());
            }
        }
        let recently = {
            // Serialised with the refresh itself: a burst of tokens with a new kid fetches once.
            let _one = self.refreshing.lock().await;
            self.keys
                .read()
                .await
                .fetched
                .is_some_and(|at| at.elapsed() < MIN_REFRESH_INTERVAL)
        };
        if !recently && let Err(error) = self.refresh().await {
            tracing::warn!(%error, "refreshing the identity provider's keys failed");
        }
        let mut keys = self.keys.write().await;
        if let Some(found) = keys.by_kid.get(kid) {
            return Ok(found.clone());
        }
        keys.unknown.retain(|_, at| at.elapsed() < UNKNOWN_KID_TTL);
        keys.unknown.insert(kid.to_owned(), Instant::now());
        Err(unknown())
    }

    /// Verifies a bearer token and returns who it names.
    pub async fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let unauthenticated = |why: String| ApiError::Unauthenticated(why);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| unauthenticated(format!("token header: {e}")))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(unauthenticated(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| unauthenticated("the token names no signing key (kid)".into()))?;
        let (key, key_alg) = self.key_for(&kid).await?;
        if key_alg.is_some_and(|alg| alg != header.alg) {
            return Err(unauthenticated(format!(
                "key {kid} is for {key_alg:?}, the token says {:?}",
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| unauthenticated(format!("token: {e}")))?;
        let claims = data.claims;
        let subject = claims["sub"].as_str().unwrap_or_default().to_owned();
        let mut roles_value = &claims;
        for part in &self.roles_claim {
            roles_value = &roles_value[part.as_str()];
        }
        let roles = roles_value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|role| match role {
                "auditor" => Some(Role::Auditor),
                "investigator" => Some(Role::Investigator),
                "report_admin" => Some(Role::ReportAdmin),
                _ => None,
            })
            .collect();
        Ok(Principal {
            username: claims["preferred_username"]
                .as_str()
                .unwrap_or(&subject)
                .to_owned(),
            name: claims["name"].as_str().map(str::to_owned),
            session: claims["sid"].as_str().map(str::to_owned),
            subject,
            roles,
        })
    }
}

/// The bearer token of a request.
fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthenticated("no Authorization header".into()))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("Authorization is not text".into()))?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::Unauthenticated("Authorization is not a bearer token".into()))
}

/// How much of the trail a reader sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadRole {
    /// Rows, histories and proofs; not the original payloads.
    Auditor,
    /// Also the original payloads.
    Investigator,
}

impl ReadRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadRole::Auditor => Role::Auditor.as_str(),
            ReadRole::Investigator => Role::Investigator.as_str(),
        }
    }
}

/// A caller allowed to read the trail: role `auditor` or `investigator`.
#[derive(Debug, Clone)]
pub struct Reader {
    pub principal: Principal,
    pub role: ReadRole,
}

impl FromRequestParts<Arc<ApiState>> for Reader {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)?;
        if !state.verifier.keys_loaded().await {
            return Err(ApiError::Unavailable {
                what: "the identity provider",
                cause: "its signing keys are not loaded yet".into(),
            });
        }
        let principal = state.verifier.verify(token).await?;
        let role = if principal.has(Role::Investigator) {
            ReadRole::Investigator
        } else if principal.has(Role::Auditor) {
            ReadRole::Auditor
        } else {
            return Err(ApiError::Forbidden("auditor or investigator".into()));
        };
        Ok(Reader { principal, role })
    }
}
