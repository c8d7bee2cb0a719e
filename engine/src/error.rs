//! Errors raised by operators while running, and by pipelines that contain them.

use arrow::error::ArrowError;

/// Why an operator failed while running.
///
/// The variants tell the supervisor where the fault lies: in the data or configuration
/// the user supplied, in an external system, or in Weir itself.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The data or the configuration cannot be processed as given.
    #[error("{0}")]
    User(String),
    /// A file, socket or other system resource failed.
    #[error("{context}: {source}")]
    Io {
        /// What the operator was doing, e.g. `cannot open /data/in.jsonl`.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An external system (broker, hub, container engine) failed or refused.
    #[error("{0}")]
    External(String),
    /// Arrow could not decode, encode or compute.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    /// A bug in Weir: an invariant did not hold.
    #[error("internal error: {0}")]
    Internal(String),
    /// Every consumer of this operator's output has gone away, so there is nobody to
    /// send to. Operators return this to stop quietly; it is not reported as a failure.
    #[error("downstream closed")]
    DownstreamClosed,
}

impl OperatorError {
    /// An I/O error with a sentence saying what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        OperatorError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Why a pipeline stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// One operator failed; the pipeline was stopped and drained.
    #[error("pipeline '{pipeline}': operator '{operator}' failed: {source}")]
    Operator {
        /// The pipeline's name.
        pipeline: String,
        /// The failing operator's name.
        operator: String,
        /// What went wrong.
        #[source]
        source: OperatorError,
    },
    /// An operator task panicked. This is always a bug in Weir or in an operator.
    #[error("pipeline '{pipeline}': operator '{operator}' panicked: {message}")]
    Panic {
        /// The pipeline's name.
        pipeline: String,
        /// The panicking operator's name.
        operator: String,
        /// The panic payload, when it was a string.
        message: String,
    },
    /// The graph handed to the builder is not runnable.
    #[error("pipeline '{pipeline}': {message}")]
    Graph {
        /// The pipeline's name.
        pipeline: String,
        /// What is wrong with the wiring.
        message: String,
    },
}
