//! Write Weir modules in Rust. This crate owns the module protocol
//! (docs/module-protocol.md): Arrow IPC stream bodies over HTTP/1.1, on a Unix socket or
//! TCP. A module author writes a function from a batch to batches and hands it to
//! [`serve_transform`]; the runtime side (`weir-modules`) uses the same constants,
//! codec and [`client::Client`], so both ends cannot drift apart.
//!
//! ```no_run
//! use weir_module_sdk::{BatchInfo, ModuleError, serve_transform};
//! use weir_module_sdk::arrow_array::RecordBatch;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), weir_module_sdk::SdkError> {
//!     serve_transform(|batch: RecordBatch, _info: &BatchInfo| -> Result<Vec<RecordBatch>, ModuleError> {
//!         Ok(vec![batch])
//!     })
//!     .await
//! }
//! ```

pub mod client;
mod codec;
pub mod peer;
mod server;

pub use codec::{decode_stream, encode_stream};
pub use server::{BatchInfo, Health, ModuleError, serve_sink, serve_transform, serve_with};
pub use {arrow_array, arrow_schema};

/// The Unix socket the module listens on (transport `unix`).
pub const ENV_MODULE_SOCKET: &str = "WEIR_MODULE_SOCKET";
/// The `host:port` the module listens on (transport `tcp`).
pub const ENV_MODULE_ADDR: &str = "WEIR_MODULE_ADDR";
/// The Unix socket the runtime listens on, for source modules.
pub const ENV_RUNTIME_SOCKET: &str = "WEIR_RUNTIME_SOCKET";
/// The `host:port` the runtime listens on, for source modules.
pub const ENV_RUNTIME_ADDR: &str = "WEIR_RUNTIME_ADDR";
/// The module's node name in its pipeline.
pub const ENV_MODULE_NAME: &str = "WEIR_MODULE_NAME";
/// The module's role: `source`, `transform` or `sink`.
pub const ENV_MODULE_ROLE: &str = "WEIR_MODULE_ROLE";

/// The module's socket file in the module directory.
pub const MODULE_SOCKET_FILE: &str = "module.sock";
/// The runtime's socket file in the module directory.
pub const RUNTIME_SOCKET_FILE: &str = "runtime.sock";

/// The content type of every batch body.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";
/// The header naming a batch, the same on every attempt.
pub const HEADER_BATCH_ID: &str = "weir-batch-id";
/// The header counting attempts at a batch, from 1.
pub const HEADER_ATTEMPT: &str = "weir-attempt";
/// The header telling a module how long the runtime waits for its answer, in ms.
pub const HEADER_TIMEOUT_MS: &str = "weir-timeout-ms";
/// The health endpoint.
pub const PATH_HEALTH: &str = "/v1/health";
/// The batch endpoint (on the module for transforms and sinks, on the runtime for
/// sources).
pub const PATH_BATCHES: &str = "/v1/batches";

/// Where a peer listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket.
    Unix(std::path::PathBuf),
    /// A TCP address.
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

impl Endpoint {
    /// The endpoint named by the socket variable `socket_var` or, failing that, the
    /// address variable `addr_var`.
    pub fn from_env(socket_var: &str, addr_var: &str) -> Result<Self, SdkError> {
        if let Some(path) = std::env::var_os(socket_var) {
            return Ok(Endpoint::Unix(path.into()));
        }
        match std::env::var(addr_var) {
            Ok(addr) => addr
                .parse()
                .map(Endpoint::Tcp)
                .map_err(|_| SdkError::Environment(format!("{addr_var}={addr} is not host:port"))),
            Err(_) => Err(SdkError::Environment(format!(
                "neither {socket_var} nor {addr_var} is set: a module is started by the Weir \
                 runtime, which sets them"
            ))),
        }
    }
}

/// A module could not serve.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The environment does not say where to listen.
    #[error("{0}")]
    Environment(String),
    /// Binding or serving failed.
    #[error("{operation}: {source}")]
    Io {
        /// What was being done.
        operation: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
