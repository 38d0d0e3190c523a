//! Reads are writes too: every answer that carries trail data is preceded by an access event
//! (who, with which role, which route and filters, how many rows) on `API_ACCESS_TOPIC`, which
//! the write side stores like any audit event. The event is acknowledged by the broker
//! (`acks=all`, idempotent) before the response is sent; if it cannot be, the read fails.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use uuid::Uuid;

use super::auth::{Principal, ReadRole};
use super::error::ApiError;
use crate::config::KafkaSettings;
use crate::metrics::metrics;

/// How long a read waits for its access event's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What a read did, for its access event.
pub struct Access<'a> {
    pub principal: &'a Principal,
    pub role: ReadRole,
    /// The route template, e.g. `/api/v1/events/{event_id}`.
    pub route: &'static str,
    /// What was read: `events` (a search), an event id, `entity:{type}:{id}`.
    pub target: String,
    /// The parameters of the request.
    pub parameters: Value,
    pub rows: usize,
    /// The request's id (also in the response's `x-request-id`).
    pub request_id: Uuid,
    pub client: Option<String>,
    pub user_agent: Option<String>,
}

/// Produces access events.
#[derive(Clone)]
pub struct AccessLog {
    producer: FutureProducer,
    topic: String,
}

impl AccessLog {
    /// The producer, with the write side's connection and security settings.
    pub fn new(kafka: &KafkaSettings, topic: &str, instance: &str) -> Result<Self, ApiError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", kafka.brokers.join(","))
            .set("client.id", format!("{instance}-access"))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", ACK_TIMEOUT.as_millis().to_string());
        for (name, value) in &kafka.client_properties {
            config.set(name, value);
        }
        if let Some(password) = &kafka.sasl_password {
            config.set(
                "sasl.password",
                secrecy::ExposeSecret::expose_secret(password),
            );
        }
        Ok(Self {
            producer: config
                .create()
                .map_err(|e| ApiError::Internal(format!("access event producer: {e}")))?,
            topic: topic.to_owned(),
        })
    }

    /// Writes the access event and waits for the broker's acknowledgement.
    pub async fn record(&self, access: &Access<'_>) -> Result<(), ApiError> {
        let payload = event(access).to_string();
        let key = access.principal.subject.clone();
        let record = FutureRecord::to(&self.topic)
            .key(key.as_bytes())
            .payload(payload.as_bytes());
        let result = self.producer.send(record, ACK_TIMEOUT).await;
        let outcome = if result.is_ok() { "recorded" } else { "failed" };
        metrics()
            .api_access_events
            .with_label_values(&[outcome])
            .inc();
        result.map(|_| ()).map_err(|(error, _)| {
            ApiError::AccessNotRecorded(format!("topic {}: {error}", self.topic))
        })
    }
}

/// The access event, in the event contract (`schemas/audit-event.v1.schema.json`).
pub fn event(access: &Access<'_>) -> Value {
    let principal = access.principal;
    let mut metadata = json!({
        "source": "audit-consumer serve",
        "version": env!("CARGO_PKG_VERSION"),
        "api_version": "v1",
    });
    if let Some(client) = &access.client {
        metadata["ip_address"] = json!(client);
    }
    if let Some(agent) = &access.user_agent {
        metadata["user_agent"] = json!(agent);
    }
    let mut event = json!({
        "event_id": Uuid::new_v4().to_string(),
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "entity_type": "audit_trail",
        "entity_id": access.target,
        "action": "READ",
        "user_id": principal.subject,
        "category": "SECURITY_EVENT",
        "risk_level": "LOW",
        "module": "read-api",
        "source_system": "audit-consumer",
        "event_version": "1",
        "correlation_id": access.request_id.to_string(),
        "compliance_flags": ["ALCOA+", "21CFR11"],
        "new_value": {
            "route": access.route,
            "role": access.role.as_str(),
            "username": principal.username,
            "parameters": access.parameters,
            "rows_returned": access.rows,
        },
        "metadata": metadata,
    });
    if let Some(name) = &principal.name {
        event["user_display_name"] = json!(name);
    }
    if let Some(session) = &principal.session {
        event["session_id"] = json!(session);
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::auth::Role;

    #[test]
    fn an_access_event_is_a_valid_audit_event() {
        let principal = Principal {
            subject: "5b7f-sub".into(),
            username: "alice".into(),
            name: Some("Alice Auditor".into()),
            roles: vec![Role::Auditor],
            session: Some("sid-1".into()),
        };
        let access = Access {
            principal: &principal,
            role: ReadRole::Auditor,
            route: "/api/v1/events",
            target: "events".into(),
            parameters: json!({"user_id": "u-1"}),
            rows: 3,
            request_id: Uuid::new_v4(),
            client: Some("10.0.0.1".into()),
            user_agent: Some("curl/8".into()),
        };
        let bytes = event(&access).to_string().into_bytes();
        let decoded = crate::event::decode(&bytes).expect("the contract accepts it");
        assert_eq!(decoded.user_id, "5b7f-sub");
        assert_eq!(decoded.action, "READ");
        assert_eq!(
            decoded.new_value.as_ref().expect("new_value")["rows_returned"],
            3
        );
    }
}
