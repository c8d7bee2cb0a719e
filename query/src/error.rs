//! Why a query got no answer, worded for the person who wrote it.

use std::time::Duration;

/// Why a query failed. Each kind maps to one HTTP status and a short code, so every
/// server that runs queries answers the same way.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request itself is wrong: no SQL, a bad format, limit or timeout.
    #[error("{0}")]
    BadRequest(String),
    /// The body is of a media type the endpoint does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The statement would change something; queries only read.
    #[error("{0}")]
    ReadOnly(String),
    /// The SQL does not parse or plan: bad syntax, an unknown table, column or function.
    #[error("{0}")]
    Sql(String),
    /// The query did not finish in time.
    #[error(
        "the query did not finish within {}; narrow it (WHERE, LIMIT) or allow a longer timeout",
        humantime::format_duration(*.0)
    )]
    Timeout(Duration),
    /// The query needed more memory than its limit.
    #[error("{0}")]
    Memory(String),
    /// The query planned but failed while running, e.g. a failed cast.
    #[error("{0}")]
    Execution(String),
    /// Something went wrong on the server's side.
    #[error("{0}")]
    Internal(String),
}

impl QueryError {
    /// The HTTP status that answers this error.
    pub fn status(&self) -> u16 {
        match self {
            QueryError::BadRequest(_) | QueryError::ReadOnly(_) | QueryError::Sql(_) => 400,
            QueryError::UnsupportedMediaType(_) => 415,
            QueryError::Timeout(_) => 504,
            QueryError::Memory(_) | QueryError::Execution(_) => 422,
            QueryError::Internal(_) => 500,
        }
    }

    /// A short, stable name for the kind of error, for programs that read answers.
    pub fn code(&self) -> &'static str {
        match self {
            QueryError::BadRequest(_) => "bad_request",
            QueryError::UnsupportedMediaType(_) => "unsupported_media_type",
            QueryError::ReadOnly(_) => "read_only",
            QueryError::Sql(_) => "sql",
            QueryError::Timeout(_) => "timeout",
            QueryError::Memory(_) => "memory",
            QueryError::Execution(_) => "execution",
            QueryError::Internal(_) => "internal",
        }
    }
}
