//! Ad-hoc SQL for people looking at data: read-only queries on DataFusion over Arrow
//! tables, bounded in time, rows and memory, answered as JSON, CSV or Arrow IPC.
//!
//! The runtime's local API runs these over its retained streams ([`register_streams`]),
//! and the hub over the data its devices ship. Both answer a [`QueryRequest`] the same
//! way: [`Session::new`] makes a DataFusion context with a memory limit, the caller
//! registers its tables, [`Session::run`] checks the query is one read-only statement,
//! runs it within the timeout and keeps at most the row limit, and [`Answer::encode`]
//! writes the rows in the asked [`Format`]. Every failure is a [`QueryError`] whose
//! message says what is wrong, and which maps to one HTTP status.
//!
//! Both APIs check who asks the same way, with [`access`].

pub mod access;
#[cfg(feature = "engine")]
mod answer;
mod error;
mod request;
#[cfg(feature = "engine")]
mod session;

#[cfg(feature = "engine")]
pub use answer::{Answer, Column, Encoded, JsonAnswer, arrow_to_table};
pub use error::QueryError;
pub use request::{Format, Limits, QueryRequest};
#[cfg(feature = "engine")]
pub use session::{Session, register_streams};

/// The header that carries how many rows an answer holds (CSV and Arrow answers).
pub const ROW_COUNT_HEADER: &str = "weir-row-count";
/// The header that says the answer was cut at the row limit (`true` or `false`).
pub const TRUNCATED_HEADER: &str = "weir-truncated";
