//! Synthetic chains (placeholder).
