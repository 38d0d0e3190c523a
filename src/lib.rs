//! audit-consumer: Kafka audit events → immudb (system of record) → PostgreSQL (queryable replica).
//!
//! The binary (`src/main.rs`) is a thin CLI over these modules; integration tests use them directly.

pub mod api;
pub mod app;
pub mod audit;
pub mod config;
pub mod event;
pub mod http;
pub mod immudb;
pub mod metrics;
pub mod pipeline;
pub mod postgres;
pub mod resilience;
pub mod telemetry;
pub mod tools;
pub mod trust;
