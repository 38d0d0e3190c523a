//! The read API's one error type: every failure becomes an RFC 9457 problem document
//! (`application/problem+json`) that says what the caller can act on and never anything about
//! the trail itself; the cause chain goes to the log.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A stable URI naming the kind of problem (relative to the API).
    #[serde(rename = "type")]
    pub kind: String,
    /// Short, human-readable summary of the kind.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// What went wrong in this request.
    pub detail: String,
    /// The query or path parameter at fault (bad input only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
}

/// What a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A parameter is unknown, malformed or out of range.
    #[error("{parameter}: {detail}")]
    BadParameter { parameter: String, detail: String },
    /// No bearer token, or one that does not verify.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// The token is valid but lacks the role the route needs.
    #[error("not authorised: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The access event could not be written: the read is refused (an unaudited read is a
    /// compliance defect).
    #[error("the read could not be recorded in the audit trail: {0}")]
    AccessNotRecorded(String),
    /// A store or the identity provider does not answer.
    #[error("{what} unavailable: {cause}")]
    Unavailable { what: &'static str, cause: String },
    /// Anything else; logged, never shown.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(parameter: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError::BadParameter {
            parameter: parameter.into(),
            detail: detail.into(),
        }
    }

    pub fn postgres(error: sqlx::Error) -> Self {
        match &error {
            // statement_timeout (57014): the query shape is too broad, not the store down.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("57014") => {
                ApiError::Unavailable {
                    what: "PostgreSQL",
                    cause: "the query ran past API_QUERY_TIMEOUT; narrow the filters".into(),
                }
            }
            _ => ApiError::Unavailable {
                what: "PostgreSQL",
                cause: error.to_string(),
            },
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadParameter { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::AccessNotRecorded(_) | ApiError::Unavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The document sent. Authentication and authorisation failures say only that; internal
    /// causes stay in the log.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        let (kind, title, detail, parameter) = match self {
            ApiError::BadParameter { parameter, detail } => (
                "bad-parameter",
                "Invalid request parameter",
                detail.clone(),
                Some(parameter.clone()),
            ),
            ApiError::Unauthenticated(_) => (
                "unauthenticated",
                "Authentication required",
                "a valid bearer token from the configured identity provider is required".into(),
                None,
            ),
            ApiError::Forbidden(needed) => (
                "forbidden",
                "Not authorised",
                format!("this request needs the role {needed}"),
                None,
            ),
            ApiError::NotFound(what) => ("not-found", "Not found", what.clone(), None),
            ApiError::AccessNotRecorded(_) => (
                "access-not-recorded",
                "Read not recorded",
                "the access could not be recorded in the audit trail, so nothing is returned; \
                 retry later"
                    .into(),
                None,
            ),
            ApiError::Unavailable { what, cause } if cause.contains("API_QUERY_TIMEOUT") => (
                "query-timeout",
                "Query too broad",
                format!("{what}: {cause}"),
                None,
            ),
            ApiError::Unavailable { what, .. } => (
                "unavailable",
                "Service unavailable",
                format!("{what} does not answer; retry later"),
                None,
            ),
            ApiError::Internal(_) => (
                "internal",
                "Internal error",
                "the request failed; the cause is logged".into(),
                None,
            ),
        };
        Problem {
            kind: format!("/problems/{kind}"),
            title: title.into(),
            status: status.as_u16(),
            detail,
            parameter,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::info!(error = %self, status = status.as_u16(), "request refused");
        }
        let mut response = (status, axum::Json(self.problem())).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"audit-api\", error=\"invalid_token\""),
            );
        }
        response
    }
}
