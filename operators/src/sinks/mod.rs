//! Built-in sinks.

pub mod blackhole;
pub mod file;
pub mod mqtt;
pub mod stdout;
