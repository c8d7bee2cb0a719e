//! Built-in sinks.

pub mod file;
pub mod stdout;
