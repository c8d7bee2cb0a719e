//! `POST /api/v1/query`: read-only SQL over the retained streams.
//!
//! The body is JSON (`{"sql": "SELECT …", "format": "csv", "max_rows": 100,
//! "timeout": "5s"}`) or, as `application/sql`, the SQL alone. The answer's format is the
//! body's `format`, else the `Accept` header's, else JSON. Queries forwarded by the hub
//! are answered by the same code ([`answer`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{AppendHeaders, IntoResponse, Response};
use weir_query::{Encoded, Format, Limits, QueryError, QueryRequest, Session};

use super::ApiState;
use super::live::LivePipelines;

/// Runs `request` over the retained streams of `pipelines` within `server` limits, and
/// writes the answer in the request's format, else `accepted`, else JSON.
pub async fn answer(
    pipelines: &LivePipelines,
    server: &Limits,
    request: &QueryRequest,
    accepted: Option<Format>,
) -> Encoded {
    let format = request.format.or(accepted).unwrap_or_default();
    let run = async {
        let limits = request.limits(server)?;
        let mut session = Session::new(&limits)?;
        weir_query::register_streams(&mut session, &pipelines.streams())?;
        session.run(&request.sql, &limits).await
    };
    match run.await {
        Ok(answer) => Encoded::answer(&answer, format),
        Err(error) => Encoded::refusal(&error),
    }
}

pub(super) async fn query(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(_running) = admit(&state.queries) else {
        return busy();
    };
    if let Err(refusal) = super::wait_for_start(&state.startup).await {
        return refusal;
    }
    let accepted = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .and_then(Format::from_accept);
    let encoded = match read_request(&headers, &body) {
        Ok(request) => answer(&state.pipelines, &state.limits, &request, accepted).await,
        Err(error) => Encoded::refusal(&error),
    };
    let status = StatusCode::from_u16(encoded.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, AppendHeaders(encoded.headers()), encoded.body).into_response()
}

/// Reads the body as JSON (`application/json`) or as SQL text (`application/sql`).
/// Any other type is refused: a web page can make a browser on the device send
/// `text/plain` or a form to the API without asking, but not these, so a page cannot
/// run queries through the device's browser.
fn read_request(headers: &HeaderMap, body: &[u8]) -> Result<QueryRequest, QueryError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
    match media_type.as_deref() {
        Some("application/json") => serde_json::from_slice(body).map_err(|e| {
            QueryError::BadRequest(format!(
                "the body is not a query: {e}; send {{\"sql\": \"SELECT …\"}}"
            ))
        }),
        Some("application/sql") => {
            let sql = std::str::from_utf8(body)
                .map_err(|_| QueryError::BadRequest("the query is not UTF-8 text".to_owned()))?;
            Ok(QueryRequest::new(sql))
        }
        other => Err(QueryError::UnsupportedMediaType(format!(
            "a query is sent as Content-Type: application/json ({{\"sql\": \"SELECT …\"}}) or application/sql (the SQL as text), not {}",
            other.map_or_else(|| "without a Content-Type".to_owned(), str::to_owned)
        ))),
    }
}

/// A permit to run one query while it is held, unless all are taken. A cancelled
/// request drops its permit with its query.
fn admit(queries: &Arc<tokio::sync::Semaphore>) -> Option<tokio::sync::OwnedSemaphorePermit> {
    Arc::clone(queries).try_acquire_owned().ok()
}

/// The 429 for a query that finds every permit taken.
fn busy() -> Response {
    let mut busy = super::error(
        StatusCode::TOO_MANY_REQUESTS,
        "busy",
        "as many queries as --max-concurrent-queries allows are running; retry in a moment",
    );
    busy.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    busy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_beyond_the_limit_are_refused_until_one_ends() {
        let queries = Arc::new(tokio::sync::Semaphore::new(2));
        let first = admit(&queries).expect("room for one");
        let _second = admit(&queries).expect("room for two");
        assert!(admit(&queries).is_none(), "full");
        let busy = busy();
        assert_eq!(busy.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(busy.headers()[header::RETRY_AFTER], "1");
        drop(first);
        assert!(
            admit(&queries).is_some(),
            "a finished query frees its place"
        );
    }
}
