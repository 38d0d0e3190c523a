//! Query parameters, parsed strictly: an unknown or repeated parameter, a malformed value, a
//! value out of range or a filter contradiction is a 400 that names the parameter. Values are
//! only ever bound into SQL, never spliced.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use utoipa::IntoParams;

use super::cursor::{Cursor, CursorError, CursorKey};
use super::error::ApiError;

/// Rows per page when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;
/// Rows per page at most.
pub const MAX_LIMIT: u32 = 1000;
/// Longest accepted filter value: longer ones cannot match a stored value.
const MAX_VALUE_CHARS: usize = 512;

/// The raw query string as name → value, each name at most once, every name known.
pub struct Params {
    values: BTreeMap<String, String>,
}

impl Params {
    /// Parses `raw` accepting only the names in `allowed`.
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Self, ApiError> {
        let mut values = BTreeMap::new();
        for (name, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            if !allowed.contains(&name.as_ref()) {
                return Err(ApiError::bad(
                    name.as_ref(),
                    format!("unknown parameter; accepted: {}", allowed.join(", ")),
                ));
            }
            if value.chars().count() > MAX_VALUE_CHARS {
                return Err(ApiError::bad(
                    name.as_ref(),
                    format!("longer than {MAX_VALUE_CHARS} characters"),
                ));
            }
            if values
                .insert(name.clone().into_owned(), value.into_owned())
                .is_some()
            {
                return Err(ApiError::bad(name.as_ref(), "given more than once"));
            }
        }
        Ok(Self { values })
    }

    pub fn text(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// A non-empty text value.
    fn value(&self, name: &str) -> Result<Option<String>, ApiError> {
        match self.text(name) {
            Some("") => Err(ApiError::bad(name, "empty")),
            other => Ok(other.map(str::to_owned)),
        }
    }

    fn one_of(&self, name: &str, allowed: &[&str]) -> Result<Option<String>, ApiError> {
        match self.value(name)? {
            Some(v) if !allowed.contains(&v.as_str()) => Err(ApiError::bad(
                name,
                format!("\"{v}\" is not one of {}", allowed.join(", ")),
            )),
            other => Ok(other),
        }
    }

    fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.value(name)?
            .map(|v| {
                DateTime::parse_from_rfc3339(&v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        ApiError::bad(
                            name,
                            format!(
                                "\"{v}\" is not an RFC 3339 time with an offset ({e}), e.g. \
                                 2026-12-01T00:00:00Z"
                            ),
                        )
                    })
            })
            .transpose()
    }

    /// `limit`: 1..=[`MAX_LIMIT`], default [`DEFAULT_LIMIT`].
    pub fn limit(&self) -> Result<u32, ApiError> {
        let Some(v) = self.value("limit")? else {
            return Ok(DEFAULT_LIMIT);
        };
        match v.parse::<u32>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad(
                "limit",
                format!("\"{v}\" is not a whole number from 1 to {MAX_LIMIT}"),
            )),
        }
    }

    /// `order`: `asc` (default for histories) or `desc`.
    pub fn order(&self, default: Order) -> Result<Order, ApiError> {
        Ok(match self.one_of("order", &["asc", "desc"])?.as_deref() {
            Some("asc") => Order::Asc,
            Some("desc") => Order::Desc,
            _ => default,
        })
    }

    /// `cursor`, checked against the query it must have come from.
    pub fn cursor(&self, key: &CursorKey, query: &[u8; 32]) -> Result<Option<Cursor>, ApiError> {
        self.value("cursor")?
            .map(|text| {
                key.decode(&text, query).map_err(|e| match e {
                    CursorError::Malformed => ApiError::bad("cursor", e.to_string()),
                    CursorError::Foreign => ApiError::bad("cursor", e.to_string()),
                })
            })
            .transpose()
    }
}

/// Sort order by event time (then `event_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    Asc,
    Desc,
}

/// The search filters of `GET /api/v1/events` (and exports, reports, the stream).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Filters {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_topic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingested_from: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingested_to: Option<DateTime<Utc>>,
}

/// The names [`Filters::parse`] reads.
pub const FILTER_NAMES: &[&str] = &[
    "entity_type",
    "entity_id",
    "user_id",
    "action",
    "category",
    "risk_level",
    "trace_id",
    "correlation_id",
    "source_topic",
    "from",
    "to",
    "ingested_from",
    "ingested_to",
];

impl Filters {
    pub fn parse(params: &Params) -> Result<Self, ApiError> {
        let filters = Filters {
            entity_type: params.value("entity_type")?,
            entity_id: params.value("entity_id")?,
            user_id: params.value("user_id")?,
            action: params.value("action")?,
            category: params.one_of(
                "category",
                &[
                    "USER_ACTION",
                    "SYSTEM_EVENT",
                    "COMPLIANCE_EVENT",
                    "SECURITY_EVENT",
                    "BATCH_LIFECYCLE",
                ],
            )?,
            risk_level: params.one_of("risk_level", &["HIGH", "MEDIUM", "LOW"])?,
            trace_id: params.value("trace_id")?,
            correlation_id: params.value("correlation_id")?,
            source_topic: params.value("source_topic")?,
            from: params.time("from")?,
            to: params.time("to")?,
            ingested_from: params.time("ingested_from")?,
            ingested_to: params.time("ingested_to")?,
        };
        for (start, end, name) in [
            (filters.from, filters.to, "from"),
            (filters.ingested_from, filters.ingested_to, "ingested_from"),
        ] {
            if let (Some(start), Some(end)) = (start, end)
                && start >= end
            {
                return Err(ApiError::bad(
                    name,
                    format!("{start} is not before the end of the range {end}"),
                ));
            }
        }
        if filters.entity_id.is_some() && filters.entity_type.is_none() {
            return Err(ApiError::bad(
                "entity_id",
                "needs entity_type too (an entity is named by both)",
            ));
        }
        Ok(filters)
    }

    /// A fingerprint of the filters and order, which binds a cursor to its query.
    pub fn fingerprint(&self, route: &str, order: Order) -> [u8; 32] {
        let canonical = serde_json::json!({ "route": route, "filters": self, "order": order });
        Sha256::digest(canonical.to_string().as_bytes()).into()
    }

    /// Appends `AND …` conditions for every filter, values bound.
    pub fn push_conditions(&self, query: &mut sqlx::QueryBuilder<'_, sqlx::Postgres>) {
        let text = [
            ("entity_type", &self.entity_type),
            ("entity_id", &self.entity_id),
            ("user_id", &self.user_id),
            ("action", &self.action),
            ("category", &self.category),
            ("risk_level", &self.risk_level),
            ("trace_id", &self.trace_id),
            ("correlation_id", &self.correlation_id),
            ("source_topic", &self.source_topic),
        ];
        for (column, value) in text {
            if let Some(value) = value {
                query.push(format_args!(" AND {column} = "));
                query.push_bind(value.clone());
            }
        }
        let times = [
            ("event_timestamp >= ", self.from),
            ("event_timestamp < ", self.to),
            ("ingested_at >= ", self.ingested_from),
            ("ingested_at < ", self.ingested_to),
        ];
        for (condition, value) in times {
            if let Some(value) = value {
                query.push(format_args!(" AND {condition}"));
                query.push_bind(value);
            }
        }
    }
}

/// Query parameters of `GET /api/v1/events`, for the OpenAPI document (the handler parses
/// them strictly with [`Params`]).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct SearchParams {
    /// Entity type, e.g. `plant`.
    entity_type: Option<String>,
    /// Entity id (with `entity_type`).
    entity_id: Option<String>,
    /// Who acted.
    user_id: Option<String>,
    /// What was done, e.g. `UPDATE`.
    action: Option<String>,
    /// `USER_ACTION`, `SYSTEM_EVENT`, `COMPLIANCE_EVENT`, `SECURITY_EVENT` or `BATCH_LIFECYCLE`.
    category: Option<String>,
    /// `HIGH`, `MEDIUM` or `LOW`.
    risk_level: Option<String>,
    trace_id: Option<String>,
    correlation_id: Option<String>,
    /// The Kafka topic the event came from.
    source_topic: Option<String>,
    /// Event time, inclusive (RFC 3339 with an offset).
    from: Option<String>,
    /// Event time, exclusive (RFC 3339 with an offset).
    to: Option<String>,
    /// Ingestion time, inclusive.
    ingested_from: Option<String>,
    /// Ingestion time, exclusive.
    ingested_to: Option<String>,
    /// `asc` or `desc` (default) by event time.
    order: Option<String>,
    /// Rows per page, 1 to 1000 (default 100).
    limit: Option<u32>,
    /// Opaque cursor from `next_cursor` / `prev_cursor` of the same query.
    cursor: Option<String>,
}

/// Query parameters of the entity history.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct HistoryParams {
    /// `asc` (default) or `desc` by event time.
    order: Option<String>,
    /// Rows per page, 1 to 1000 (default 100).
    limit: Option<u32>,
    /// Opaque cursor from `next_cursor` / `prev_cursor` of the same history.
    cursor: Option<String>,
}

/// Query parameters of one event.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct EventParams {
    /// `true`: prove the event now against the trusted state and say what was proven.
    verify: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Filters, ApiError> {
        let mut allowed = FILTER_NAMES.to_vec();
        allowed.extend(["order", "limit", "cursor"]);
        Filters::parse(&Params::parse(Some(raw), &allowed)?)
    }

    fn parameter(error: ApiError) -> String {
        match error {
            ApiError::BadParameter { parameter, .. } => parameter,
            other => panic!("not a parameter error: {other}"),
        }
    }

    #[test]
    fn bad_input_names_the_parameter() {
        assert_eq!(parameter(parse("colour=red").unwrap_err()), "colour");
        assert_eq!(parameter(parse("from=yesterday").unwrap_err()), "from");
        assert_eq!(
            parameter(parse("from=2026-12-02T00:00:00Z&to=2026-12-01T00:00:00Z").unwrap_err()),
            "from"
        );
        assert_eq!(parameter(parse("action=a&action=b").unwrap_err()), "action");
        assert_eq!(
            parameter(parse("risk_level=EXTREME").unwrap_err()),
            "risk_level"
        );
        assert_eq!(parameter(parse("entity_id=x").unwrap_err()), "entity_id");
        assert_eq!(parameter(parse("user_id=").unwrap_err()), "user_id");
        let limit = |raw: &str| {
            Params::parse(Some(raw), &["limit"])
                .and_then(|p| p.limit())
                .map_err(parameter)
        };
        assert_eq!(limit("limit=1001"), Err("limit".to_owned()));
        assert_eq!(limit("limit=0"), Err("limit".to_owned()));
        assert_eq!(limit("limit=ten"), Err("limit".to_owned()));
        assert_eq!(limit("limit=1000"), Ok(1000));
        assert_eq!(limit(""), Ok(DEFAULT_LIMIT));
    }

    #[test]
    fn filters_keep_injection_strings_as_values() {
        let filters = parse("user_id=x%27%20OR%20%271%27%3D%271").expect("parsed");
        assert_eq!(filters.user_id.as_deref(), Some("x' OR '1'='1"));
        let mut query = sqlx::QueryBuilder::new("SELECT 1 FROM audit_trail WHERE TRUE");
        filters.push_conditions(&mut query);
        assert_eq!(
            query.sql(),
            "SELECT 1 FROM audit_trail WHERE TRUE AND user_id = $1"
        );
    }

    #[test]
    fn the_fingerprint_changes_with_filters_and_order_only() {
        let a = parse("user_id=u&limit=10").expect("a");
        let b = parse("user_id=u&limit=20").expect("b");
        let c = parse("user_id=v").expect("c");
        assert_eq!(
            a.fingerprint("/api/v1/events", Order::Desc),
            b.fingerprint("/api/v1/events", Order::Desc)
        );
        assert_ne!(
            a.fingerprint("/api/v1/events", Order::Desc),
            c.fingerprint("/api/v1/events", Order::Desc)
        );
        assert_ne!(
            a.fingerprint("/api/v1/events", Order::Desc),
            a.fingerprint("/api/v1/events", Order::Asc)
        );
    }
}
