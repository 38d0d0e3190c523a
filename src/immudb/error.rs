//! Classification of immudb failures, done once here so the resilience layer only asks
//! [`ImmudbError::is_transient`].
//!
//! immudb maps most of its internal errors to gRPC `UNKNOWN` (plain Go errors) and a few to
//! odd codes (an expired session is `PERMISSION_DENIED`, a failed precondition is
//! `FAILED_PRECONDITION`), so the status *message* is consulted for the cases we can cause
//! ourselves before falling back to the code.

use tonic::{Code, Status};

/// gRPC codes worth retrying with backoff. Everything else is permanent for that request.
pub const TRANSIENT_CODES: &[Code] = &[
    // Server down, restarting or refusing connections; tonic also maps connect errors here.
    Code::Unavailable,
    // A deadline ran out on the server side; the same request can succeed once it catches up.
    Code::DeadlineExceeded,
    // tonic reports our own per-request timeout ("Timeout expired") and a stream reset by a
    // dying connection as CANCELLED; this client never cancels a call through a status.
    Code::Cancelled,
    // Overload (rate limiting, HTTP/2 ENHANCE_YOUR_CALM). Oversized messages share this code
    // but are recognised by their message first, since retrying cannot shrink them.
    Code::ResourceExhausted,
    // A concurrency conflict; gRPC's advice is to retry the whole operation.
    Code::Aborted,
    // immudb returns plain Go errors as UNKNOWN, among them transient ones (max active
    // transactions, tx pool exhausted, read conflicts) and broken connections. The permanent
    // ones a request of ours can trigger are recognised by message before this list is used.
    Code::Unknown,
];

/// A failed immudb operation, classified for the retry policy. Messages are the server's (or
/// tonic's) and never contain the password.
#[derive(Debug, thiserror::Error)]
pub enum ImmudbError {
    /// Retry with backoff: the server or the network cannot serve right now. Also used when
    /// the session was lost again right after being re-opened.
    #[error("immudb {op} failed transiently ({code:?}): {message}")]
    Transient {
        /// The operation that failed.
        op: &'static str,
        /// gRPC status code as received (or synthesised by tonic).
        code: Code,
        /// Server or transport message.
        message: String,
    },
    /// A `KeyMustNotExist` precondition did not hold: at least one key of the batch already
    /// exists, and nothing of the batch was written (the transaction is atomic).
    #[error("immudb {op}: precondition failed: {message}")]
    PreconditionFailed {
        /// The operation that failed.
        op: &'static str,
        /// Server message, e.g. `precondition failed: KeyMustNotExist`.
        message: String,
    },
    /// The request itself is unacceptable (too many entries, key or value too long, message
    /// too large, duplicate keys in one batch). Retrying the same request cannot help.
    #[error("immudb {op}: invalid request: {message}")]
    InvalidArgument {
        /// The operation that failed.
        op: &'static str,
        /// What is wrong with the request.
        message: String,
    },
    /// Bad credentials, inactive user or missing permission on the database. Not retryable
    /// until an operator fixes the configuration.
    #[error("immudb {op}: not authenticated or not authorised: {message}")]
    Unauthenticated {
        /// The operation that failed.
        op: &'static str,
        /// Server message (never includes the password).
        message: String,
    },
    /// The client configuration is unusable: bad address or TLS material, or a database that
    /// does not exist while creating it is not allowed.
    #[error("immudb configuration: {0}")]
    Config(String),
    /// Any other failure that retrying will not fix.
    #[error("immudb {op} failed ({code:?}): {message}")]
    Permanent {
        /// The operation that failed.
        op: &'static str,
        /// gRPC status code.
        code: Code,
        /// Server or transport message.
        message: String,
    },
    /// [`ImmudbClient::close`](super::ImmudbClient::close) was called on this client or a clone.
    #[error("immudb client is closed")]
    Closed,
    /// The server's answer did not prove what it claims: possible tampering with immudb's
    /// data, a forked or rolled-back history, or a wrong trusted state / signing key. Never
    /// transient. For a write, the transaction may nevertheless have been committed.
    #[error("immudb {op}: verification failed: {source}")]
    VerificationFailed {
        /// The operation whose answer failed verification.
        op: &'static str,
        /// The check that failed.
        #[source]
        source: super::verify::VerificationError,
    },
}

impl ImmudbError {
    /// True when the same request may succeed later, so a retry with backoff makes sense.
    pub fn is_transient(&self) -> bool {
        matches!(self, ImmudbError::Transient { .. })
    }
}

/// Message fragments of immudb (and grpc-go) errors that no retry can fix, whatever code they
/// arrive with (most arrive as UNKNOWN, which is otherwise transient).
const INVALID_REQUEST_MESSAGES: &[&str] = &[
    "max number of entries per tx exceeded",
    "max key length exceeded",
    "max value length exceeded",
    "duplicated key",
    "too many preconditions",
    "invalid precondition",
    "no entries provided",
    "illegal arguments",
    // grpc-go on the server: the request exceeds --max-recv-msg-size (RESOURCE_EXHAUSTED).
    "received message larger than max",
    // tonic on our side: a message exceeds our encode/decode limit (OUT_OF_RANGE).
    "message length too large",
];

/// Message fragments meaning the credentials or permissions are wrong.
const AUTH_MESSAGES: &[&str] = &[
    "invalid user name or password",
    "user is not active",
    "does not have permission",
    "permission denied",
];

/// Message fragments meaning the configured database cannot be used as named (immudb sends
/// these as UNKNOWN).
const CONFIG_MESSAGES: &[&str] = &[
    "database does not exist",
    // "unrecognized character in database name", "database name length outside of limits", ...
    "database name",
    "database is reserved",
];

/// True when the server no longer knows our session: it expired after inactivity, was closed,
/// or the server restarted. immudb says `session not found` (as PERMISSION_DENIED) from its
/// auth interceptor and `no session found` from its session manager.
pub(crate) fn is_session_gone(status: &Status) -> bool {
    let message = status.message();
    message.contains("session not found") || message.contains("no session found")
}

/// True when immudb refused to open a session because the database does not exist.
pub(crate) fn is_database_missing(status: &Status) -> bool {
    status.message().contains("database does not exist")
}

/// True when a read found no such key (immudb: `tbtree: key not found`, code UNKNOWN).
pub(crate) fn is_key_not_found(status: &Status) -> bool {
    status.code() == Code::NotFound || status.message().contains("key not found")
}

/// True when a History page starts exactly past the last revision (immudb:
/// `tbtree: no more entries`, code UNKNOWN; further past the end it returns an empty page).
pub(crate) fn is_no_more_entries(status: &Status) -> bool {
    status.message().contains("no more entries")
}

/// Classifies a failed call. `op` names the operation for the error message.
pub(crate) fn classify(op: &'static str, status: &Status) -> ImmudbError {
    let code = status.code();
    let message = status.message().to_owned();

    if is_session_gone(status) {
        // Only reached after the one transparent re-open did not help. Checked first because
        // immudb sends it as PERMISSION_DENIED, which would otherwise read as bad credentials.
        return ImmudbError::Transient { op, code, message };
    }
    if code == Code::FailedPrecondition && message.contains("precondition failed") {
        return ImmudbError::PreconditionFailed { op, message };
    }
    if INVALID_REQUEST_MESSAGES.iter().any(|m| message.contains(m))
        || matches!(code, Code::InvalidArgument | Code::OutOfRange)
    {
        return ImmudbError::InvalidArgument { op, message };
    }
    if AUTH_MESSAGES.iter().any(|m| message.contains(m))
        || matches!(code, Code::Unauthenticated | Code::PermissionDenied)
    {
        return ImmudbError::Unauthenticated { op, message };
    }
    if CONFIG_MESSAGES.iter().any(|m| message.contains(m)) {
        return ImmudbError::Config(format!("{op}: {message}"));
    }
    if message.contains("can not create new session") {
        // The server's session limit ("...: max sessions number reached"). Arrives as
        // INTERNAL, yet other clients' sessions expire: worth waiting for.
        return ImmudbError::Transient { op, code, message };
    }
    if TRANSIENT_CODES.contains(&code) {
        ImmudbError::Transient { op, code, message }
    } else {
        ImmudbError::Permanent { op, code, message }
    }
}

/// Renders an error with its whole `source()` chain: tonic's transport errors say only
/// "transport error" at the top, the useful part (connection refused, bad certificate) is
/// further down.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Wrappers often repeat their cause's text; say it once.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precondition_failure_is_its_own_class() {
        let status = Status::failed_precondition("precondition failed: KeyMustNotExist");
        assert!(matches!(
            classify("set", &status),
            ImmudbError::PreconditionFailed { .. }
        ));
    }

    #[test]
    fn limits_reported_as_unknown_are_not_transient() {
        let status = Status::unknown("max number of entries per tx exceeded");
        let err = classify("set", &status);
        assert!(matches!(err, ImmudbError::InvalidArgument { .. }));
        assert!(!err.is_transient());
    }

    #[test]
    fn oversized_message_is_not_retried() {
        let status = Status::resource_exhausted("grpc: received message larger than max (5 vs. 4)");
        assert!(!classify("set", &status).is_transient());
    }

    #[test]
    fn unavailable_and_timeouts_are_transient() {
        assert!(classify("set", &Status::unavailable("connection refused")).is_transient());
        assert!(classify("set", &Status::cancelled("Timeout expired")).is_transient());
        assert!(
            classify(
                "set",
                &Status::unknown("max active transactions limit exceeded")
            )
            .is_transient()
        );
    }

    #[test]
    fn bad_credentials_are_not_transient() {
        let err = classify(
            "open session",
            &Status::unknown("invalid user name or password"),
        );
        assert!(matches!(err, ImmudbError::Unauthenticated { .. }));
    }

    #[test]
    fn unusable_database_names_are_configuration_errors() {
        let status =
            Status::unknown("punctuation marks and symbols are not allowed in database name");
        assert!(matches!(
            classify("create database", &status),
            ImmudbError::Config(_)
        ));
        assert!(matches!(
            classify("open session", &Status::unknown("database does not exist")),
            ImmudbError::Config(_)
        ));
    }

    #[test]
    fn session_gone_is_recognised() {
        assert!(is_session_gone(&Status::permission_denied(
            "session not found"
        )));
        assert!(is_session_gone(&Status::invalid_argument(
            "no session found"
        )));
        assert!(!is_session_gone(&Status::unavailable("connection refused")));
    }
}
