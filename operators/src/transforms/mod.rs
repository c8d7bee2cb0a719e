//! Built-in transforms.

pub mod anomaly;
pub mod sql;
