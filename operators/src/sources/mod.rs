//! Built-in sources.

pub mod file;
pub mod generator;
#[cfg(feature = "mqtt")]
pub mod mqtt;
