//! The `hub` sink ([`HubSinkFactory`]) and the durable outbox behind it: every batch is stored, fsynced, before it
//! counts as accepted; batches are read back in order for shipping and deleted only once
//! acknowledged; explicit limits of bytes and age drop the oldest data first, lowest
//! priority first, and count what they drop.
//!
//! The store is one [redb](https://docs.rs/redb) file. Each batch is a checksummed
//! [`frame`] holding zstd-compressed Arrow IPC, keyed by its stream (`pipeline/sink`) and
//! sequence number; a small index beside it lets the outbox start without reading the
//! batches. A file that redb cannot open (cut at a random byte, pages torn) is moved
//! aside and its intact frames are salvaged into a new file: what is intact is kept, the
//! broken frames are counted, and the runtime still starts. See [`Outbox::open`].

pub mod frame;
mod sink;
mod store;

pub use sink::{
    DirectoryUplink, HubSinkConfig, HubSinkFactory, ShipError, Shipping, ShippingStats, Uplink,
};
pub use store::{
    Check, DeadLetter, Limits, MAX_DEAD_LETTERS, Outbox, PLAUSIBLE_SINCE_MS, Recovery, Settled,
    Stats, Stored, StreamStats,
};

use std::path::PathBuf;

/// Why the outbox failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The file could not be read or written.
    #[error("outbox {path}: {message}")]
    Storage {
        /// The outbox file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A batch could not be encoded.
    #[error("cannot encode a batch for the outbox: {0}")]
    Encode(String),
    /// A stored batch could not be decoded.
    #[error("cannot decode a batch from the outbox: {0}")]
    Decode(String),
}
