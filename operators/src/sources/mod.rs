//! Built-in sources.

pub mod file;
mod flat_json;
pub mod generator;
#[cfg(feature = "mqtt")]
pub mod mqtt;
