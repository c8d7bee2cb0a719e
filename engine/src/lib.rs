//! Weir's dataflow runtime: pipelines of operators over Apache Arrow record batches.
//!
//! A pipeline is a DAG of operators. Each operator runs as its own tokio task and talks
//! to its neighbours over bounded channels that carry [`Message`]s in band: record
//! batches, watermarks and the end of the stream. A slow consumer therefore slows its
//! producers instead of growing memory.
//!
//! The engine knows no concrete operator, no YAML and no Docker. Operators implement one
//! of the role traits in [`operator`]; a [`registry::Registry`] maps kind names to
//! factories that validate a [`config::ConfigValue`] and build the running operator; the
//! [`graph::PipelineBuilder`] wires instances into a runnable [`graph::Pipeline`].

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod graph;
pub mod ipc;
pub mod message;
pub mod metrics;
pub mod observe;
pub mod operator;
mod partition;
mod ports;
pub mod registry;
pub mod time;

pub use error::{OperatorError, PipelineError};
pub use message::{Message, Watermark};
pub use operator::{
    Collector, FUTURE_EVENT_TIME, OperatorInstance, RejectEncoder, Sink, Source, SourceContext,
    Transform,
};
pub use registry::{OperatorFactory, PlannedOperator, Registry, Role};

/// Re-exported so every crate names Arrow through the engine's single version.
pub use arrow;
