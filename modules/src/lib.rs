//! Weir's external operators. A module is an operator that runs outside the `weir`
//! process, as a container (Docker, through bollard) or a local process, and exchanges
//! Arrow batches with the pipeline over the module protocol (docs/module-protocol.md,
//! implemented by `weir-module-sdk`).
//!
//! - [`runtime`]: the [`ContainerRuntime`](runtime::ContainerRuntime) trait and its
//!   Docker, process and fake implementations.
//! - [`supervisor`]: starts a module, checks its health, and restarts it by its policy
//!   with exponential backoff.
//! - [`operator`]: the `module` operator kind (source, transform, sink).

pub mod config;
pub mod error;
pub mod operator;
pub mod policy;
pub mod runtime;
mod source_endpoint;
pub mod supervisor;

pub use operator::{ModuleFactory, ModuleHost, ModuleReport};
pub use policy::ModulePolicy;
