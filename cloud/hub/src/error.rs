//! The hub's errors: the store's, and the ones that stop a hub from starting.

use std::path::PathBuf;

/// A problem with the hub's database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or opened.
    #[error("cannot open {database}: {message}")]
    Connect {
        /// The database, without its password.
        database: String,
        /// What went wrong.
        message: String,
    },
    /// The schema could not be brought up to date.
    #[error("cannot migrate the hub's database: {0}")]
    Migrate(String),
    /// The database's directory could not be created.
    #[error("cannot create {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The write would replace something that exists.
    #[error("{0}")]
    Conflict(String),
    /// A stored value does not read back.
    #[error("{what} in the hub's database cannot be read: {message}")]
    Corrupt {
        /// What it was.
        what: String,
        /// Why it cannot be read.
        message: String,
    },
    /// A job's lease was lost (it expired, or another hub took it) before a step only
    /// its holder may take: the step was not taken.
    #[error("the {lease} lease is no longer held by this hub")]
    LeaseLost {
        /// The lease.
        lease: String,
    },
    /// Any other database error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A problem that stops the hub from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The hub's secret or admin token.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// Where the fleet's shipped data is kept.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// The TLS certificate or key.
    #[error("TLS: {0}")]
    Tls(String),
    /// The listening address.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
}
