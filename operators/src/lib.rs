//! Weir's built-in operators: sources, transforms and sinks, and [`registry::builtin`],
//! the one list that registers them.

pub mod backoff;
pub mod format;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod registry;
pub mod rejects;
pub mod sinks;
pub mod sources;
pub mod template;
pub mod transforms;
