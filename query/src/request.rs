//! What a query asks for, and the bounds a server puts on every query.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::QueryError;

/// How an answer is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A JSON object with the columns, the rows as objects, the row count and whether the
    /// rows were cut at the limit. See [`crate::JsonAnswer`].
    #[default]
    Json,
    /// CSV with a header line.
    Csv,
    /// An Arrow IPC stream.
    Arrow,
}

impl Format {
    /// Every format, as written in requests.
    pub const NAMES: &'static str = "json, csv or arrow";

    /// The media type of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }

    /// The format an `Accept` header asks for, if it names one of ours.
    pub fn from_accept(accept: &str) -> Option<Format> {
        accept
            .split(',')
            .find_map(|media| match media.split(';').next().unwrap_or("").trim() {
                "application/json" => Some(Format::Json),
                "text/csv" => Some(Format::Csv),
                "application/vnd.apache.arrow.stream" => Some(Format::Arrow),
                _ => None,
            })
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            "arrow" => Ok(Format::Arrow),
            other => Err(format!(
                "unknown format '{other}': choose {}",
                Format::NAMES
            )),
        }
    }
}

/// The body of `POST /api/v1/query`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    /// One read-only SQL statement: a `SELECT`, `WITH … SELECT`, `VALUES` or `EXPLAIN`.
    pub sql: String,
    /// How to write the answer. When absent, the `Accept` header decides, then JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// At most this many rows come back; the server's limit when absent, and never more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<usize>,
    /// Give up after this long, e.g. `500ms` or `10s`; the server's timeout when absent,
    /// and never longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

impl QueryRequest {
    /// A request for `sql` with the server's defaults.
    pub fn new(sql: impl Into<String>) -> Self {
        QueryRequest {
            sql: sql.into(),
            ..QueryRequest::default()
        }
    }

    /// The bounds this query runs within: the request's own, checked against `server`'s.
    pub fn limits(&self, server: &Limits) -> Result<Limits, QueryError> {
        let max_rows = match self.max_rows {
            None => server.max_rows,
            Some(0) => {
                return Err(QueryError::BadRequest(
                    "max_rows must be at least 1".to_owned(),
                ));
            }
            Some(rows) if rows > server.max_rows => {
                return Err(QueryError::BadRequest(format!(
                    "max_rows {rows} is over this server's limit of {} rows",
                    server.max_rows
                )));
            }
            Some(rows) => rows,
        };
        let timeout = match &self.timeout {
            None => server.timeout,
            Some(text) => {
                let timeout = humantime::parse_duration(text.trim()).map_err(|_| {
                    QueryError::BadRequest(format!(
                        "invalid timeout '{text}': write a number and a unit, e.g. 500ms or 10s"
                    ))
                })?;
                if timeout.is_zero() {
                    return Err(QueryError::BadRequest(
                        "timeout must be longer than zero".to_owned(),
                    ));
                }
                if timeout > server.timeout {
                    return Err(QueryError::BadRequest(format!(
                        "timeout {} is over this server's limit of {}",
                        humantime::format_duration(timeout),
                        humantime::format_duration(server.timeout)
                    )));
                }
                timeout
            }
        };
        Ok(Limits {
            timeout,
            max_rows,
            memory_bytes: server.memory_bytes,
        })
    }
}

/// The bounds on one query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Planning and running together take at most this long.
    pub timeout: Duration,
    /// At most this many rows are kept; the answer says when there were more.
    pub max_rows: usize,
    /// Joins, sorts and aggregations may hold at most this much memory.
    pub memory_bytes: usize,
}

impl Limits {
    /// The timeout when none is configured: 30 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
    /// The row limit when none is configured.
    pub const DEFAULT_MAX_ROWS: usize = 10_000;
    /// The memory limit when none is configured: 256 MiB.
    pub const DEFAULT_MEMORY_BYTES: usize = 256 * 1024 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Limits::DEFAULT_TIMEOUT,
            max_rows: Limits::DEFAULT_MAX_ROWS,
            memory_bytes: Limits::DEFAULT_MEMORY_BYTES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_may_lower_the_server_bounds_but_not_raise_them() {
        let server = Limits {
            timeout: Duration::from_secs(10),
            max_rows: 100,
            memory_bytes: 1 << 20,
        };
        let mut request = QueryRequest::new("SELECT 1");
        assert_eq!(request.limits(&server).unwrap(), server);
        request.max_rows = Some(5);
        request.timeout = Some("250ms".into());
        let limits = request.limits(&server).unwrap();
        assert_eq!(
            (limits.max_rows, limits.timeout),
            (5, Duration::from_millis(250))
        );
        request.max_rows = Some(101);
        assert_eq!(
            request.limits(&server).unwrap_err().to_string(),
            "max_rows 101 is over this server's limit of 100 rows"
        );
        request.max_rows = None;
        request.timeout = Some("1m".into());
        assert_eq!(
            request.limits(&server).unwrap_err().to_string(),
            "timeout 1m is over this server's limit of 10s"
        );
        request.timeout = Some("soon".into());
        assert!(
            request
                .limits(&server)
                .unwrap_err()
                .to_string()
                .starts_with("invalid timeout 'soon'")
        );
    }

    #[test]
    fn formats_are_named_in_requests_and_in_accept_headers() {
        assert_eq!("CSV".parse::<Format>(), Ok(Format::Csv));
        assert_eq!(
            "xml".parse::<Format>(),
            Err("unknown format 'xml': choose json, csv or arrow".to_owned())
        );
        assert_eq!(
            Format::from_accept("text/html, application/vnd.apache.arrow.stream;q=0.9"),
            Some(Format::Arrow)
        );
        assert_eq!(Format::from_accept("*/*"), None);
        let request: QueryRequest =
            serde_json::from_str(r#"{"sql": "SELECT 1", "format": "csv"}"#).unwrap();
        assert_eq!(request.format, Some(Format::Csv));
        assert!(serde_json::from_str::<QueryRequest>(r#"{"query": "SELECT 1"}"#).is_err());
    }
}
