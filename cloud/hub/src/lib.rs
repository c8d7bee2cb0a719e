//! `weir-hub`, Weir's cloud side: the device registry and identities, deployments sent
//! to devices chosen by tags, and the API that agents, the CLI and the dashboard use.
//!
//! The pieces, outside in:
//!
//! - [`server`] serves [`api`] over HTTP or HTTPS (rustls), with the dashboard's files;
//! - [`api`] checks who is calling ([`identity`]: admin token, device tokens) and answers
//!   from the [`hub::Hub`];
//! - the hub keeps the [`fleet::Fleet`] (each device's desired state) in memory, rebuilt
//!   from the [`store`] whenever its change generation moves, which is how several hubs
//!   sharing one PostgreSQL database see each other's changes;
//! - deployments target devices by a [`condition`] over their tags, and their pipelines
//!   are validated by the same code as `weir validate`;
//! - [`client::HubClient`] is the API's client, for the CLI and `weir agent`, speaking
//!   the [`protocol`]; [`uplink::HubUplink`] ships a device's `hub` sinks through it;
//! - the devices' shipped batches are kept by [`data`] as Parquet, with SQL over them,
//!   and queries forwarded to devices wait in the [`relay`].
//!
//! The service is the `server` feature (on by default). Without it the crate is what a
//! device needs: the [`protocol`], the [`client`], the [`uplink`] and the [`identity`] tokens, with none
//! of the database, the HTTP server or the pipeline validator.

pub mod client;
pub mod identity;
pub mod protocol;
pub mod uplink;

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod condition;
#[cfg(feature = "server")]
mod dashboard;
#[cfg(feature = "server")]
pub mod data;
#[cfg(feature = "server")]
pub mod error;
#[cfg(feature = "server")]
pub mod fleet;
#[cfg(feature = "server")]
pub mod hub;
#[cfg(feature = "server")]
pub mod limits;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod relay;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;

pub use client::{ClientError, Credentials, HubClient};
#[cfg(feature = "server")]
pub use hub::{Hub, HubConfig, SecretSource};
#[cfg(feature = "server")]
pub use server::{RunningHub, TlsFiles, serve};
pub use uplink::HubUplink;

/// The port the hub listens on by default.
pub const DEFAULT_PORT: u16 = 8700;
