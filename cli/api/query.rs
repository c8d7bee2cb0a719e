//! `POST /api/v1/query`: read-only SQL over the retained streams.
//!
//! The body is JSON (`{"sql": "SELECT …", "format": "csv", "max_rows": 100,
//! "timeout": "5s"}`) or, as `text/plain`, the SQL alone. The answer's format is the
//! body's `format`, else the `Accept` header's, else JSON. Queries forwarded by the hub
//! are answered by the same code ([`answer`]).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use weir_query::{Format, Limits, QueryError, QueryRequest, Session};

use super::ApiState;
use super::live::LivePipelines;

/// A query's answer, ready to send.
pub struct Encoded {
    /// The HTTP status.
    pub status: u16,
    /// The media type of `body`.
    pub content_type: &'static str,
    /// How many rows the answer holds, and whether they were cut at the limit.
    pub rows: Option<(usize, bool)>,
    /// The rows in the asked format, or the error as `{"error": …, "code": …}`.
    pub body: Vec<u8>,
}

impl Encoded {
    fn refusal(error: &QueryError) -> Self {
        let body = serde_json::json!({"error": error.to_string(), "code": error.code()});
        Encoded {
            status: error.status(),
            content_type: "application/json",
            rows: None,
            body: body.to_string().into_bytes(),
        }
    }

    /// The headers that go with the body, beside its media type.
    pub fn row_headers(&self) -> Vec<(&'static str, String)> {
        match self.rows {
            Some((count, truncated)) => vec![
                (weir_query::ROW_COUNT_HEADER, count.to_string()),
                (weir_query::TRUNCATED_HEADER, truncated.to_string()),
            ],
            None => Vec::new(),
        }
    }
}

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
        let answer = session.run(&request.sql, &limits).await?;
        let body = answer.encode(format)?;
        Ok::<_, QueryError>(Encoded {
            status: 200,
            content_type: format.content_type(),
            rows: Some((answer.row_count, answer.truncated)),
            body,
        })
    };
    run.await.unwrap_or_else(|error| Encoded::refusal(&error))
}

pub(super) async fn query(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let accepted = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .and_then(Format::from_accept);
    let encoded = match read_request(&headers, &body) {
        Ok(request) => answer(&state.pipelines, &state.limits, &request, accepted).await,
        Err(error) => Encoded::refusal(&error),
    };
    let mut response = (
        StatusCode::from_u16(encoded.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        encoded.body.clone(),
    )
        .into_response();
    let answer_headers = response.headers_mut();
    answer_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(encoded.content_type),
    );
    for (name, value) in encoded.row_headers() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            answer_headers.insert(name, value);
        }
    }
    response
}

fn read_request(headers: &HeaderMap, body: &[u8]) -> Result<QueryRequest, QueryError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if is_json {
        return serde_json::from_slice(body).map_err(|e| {
            QueryError::BadRequest(format!(
                "the body is not a query: {e}; send {{\"sql\": \"SELECT …\"}}"
            ))
        });
    }
    let sql = std::str::from_utf8(body)
        .map_err(|_| QueryError::BadRequest("the query is not UTF-8 text".to_owned()))?;
    Ok(QueryRequest::new(sql))
}
