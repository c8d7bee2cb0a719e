//! Built-in sinks.

pub mod blackhole;
pub mod file;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod stdout;
