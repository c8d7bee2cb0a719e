//! Ad-hoc queries forwarded to a device: the admin asks (`POST /devices/{id}/query`),
//! the device's query poll takes the query (`GET /devices/{id}/queries`), runs it on its
//! own local API and posts the answer back (`POST /devices/{id}/queries/{query}/answer`),
//! which the hub returns to the admin as the device gave it.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use weir_query::QueryRequest;

use super::{ApiError, Caller, JsonBody, PathParams, QueryParams};
use crate::hub::Hub;
use crate::protocol::{ANSWER_STATUS_HEADER, ForwardedQuery};
use crate::relay::DeviceAnswer;

/// How long the hub waits for a device's answer beyond the query's own timeout: the
/// device must first take the query, and send its answer back.
const ANSWER_MARGIN: Duration = Duration::from_secs(5);

/// The longest the hub waits for an answer to a query that names no timeout (the
/// device's own `--query-timeout` then bounds it, which the hub does not know).
const UNBOUNDED_QUERY_WAIT: Duration = Duration::from_secs(300);

/// How often a waiting admin request checks that the device is still connected.
const CONNECTION_CHECK: Duration = Duration::from_secs(1);

/// The media types a device may answer with: the query formats and its JSON errors.
const ANSWER_TYPES: [&str; 3] = [
    "application/json",
    "text/csv; charset=utf-8",
    "application/vnd.apache.arrow.stream",
];

/// The longest a query poll waits when the device does not say.
const DEFAULT_QUERY_POLL_WAIT: Duration = Duration::from_secs(30);

/// Forwards a read-only SQL query to a connected device and answers with what the
/// device's local API answered: JSON, CSV or Arrow as asked, or the device's error.
/// A device that is not connected to this hub, disconnects before answering, or does not
/// answer within the query's timeout (plus 5 s; 5 min when it names none) gets 504.
#[utoipa::path(post, params(("id" = String, Path, description = "The device id")),
    path = "/api/v1/devices/{id}/query", request_body(content = Object, description = "A query: {\"sql\": \"SELECT …\", \"format\": \"json|csv|arrow\", \"max_rows\": N, \"timeout\": \"10s\"}"),
    security(("admin" = [])),
    responses((status = 200, description = "The device's answer, in the format asked"),
        (status = 400, body = crate::protocol::ErrorBody, description = "The device refused the query (bad SQL, not read-only)"),
        (status = 404, body = crate::protocol::ErrorBody),
        (status = 504, body = crate::protocol::ErrorBody, description = "The device is not connected, or did not answer in time")))]
pub async fn query_device(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(id): PathParams<String>,
    JsonBody(request): JsonBody<QueryRequest>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let last_seen = super::admin::find_device(&hub, &id).await?.last_seen_ms;
    let wait = match request.timeout.as_deref() {
        Some(text) => humantime::parse_duration(text.trim())
            .map_err(|_| {
                ApiError::BadRequest(format!(
                    "invalid timeout '{text}': write a number and a unit, e.g. 500ms or 10s"
                ))
            })?
            .min(UNBOUNDED_QUERY_WAIT),
        None => UNBOUNDED_QUERY_WAIT,
    }
    .saturating_add(ANSWER_MARGIN);
    if !hub.relay().is_connected(&id) {
        let seen = match last_seen {
            Some(ms) => format!(
                "last heard from {} s ago",
                (crate::protocol::now_ms() - ms).max(0) / 1000
            ),
            None => "never heard from".to_owned(),
        };
        return Err(ApiError::Rejected {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!(
                "device '{id}' is not connected to this hub ({seen}); its agent must be \
                 running and reach this hub to answer queries"
            ),
        });
    }
    let (query, mut answered) = hub.relay().forward(&id, request);
    // However this request ends (answered, timed out, or dropped by the admin's client),
    // the query does not stay queued for the device.
    let _queued = Queued {
        hub: &hub,
        device: &id,
        query: &query,
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut checks = tokio::time::interval(CONNECTION_CHECK);
    loop {
        tokio::select! {
            answer = &mut answered => {
                return match answer {
                    Ok(answer) => Ok(relayed(answer)),
                    Err(_) => Err(gone(&id, "stopped waiting for its answer")),
                };
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err(gone(&id, &format!(
                    "did not answer within {}",
                    humantime::format_duration(wait)
                )));
            }
            _ = checks.tick() => {
                if !hub.relay().is_connected(&id) {
                    return Err(gone(&id, "disconnected before it answered"));
                }
            }
        }
    }
}

/// 504 for device `id`, with why.
fn gone(id: &str, why: &str) -> ApiError {
    ApiError::Rejected {
        status: StatusCode::GATEWAY_TIMEOUT,
        message: format!("device '{id}' {why}"),
    }
}

/// A forwarded query, taken off the device's queue when its asker stops waiting.
struct Queued<'a> {
    hub: &'a Hub,
    device: &'a str,
    query: &'a str,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.hub.relay().cancel(self.device, self.query);
    }
}

/// The device's answer as the hub's: same status, media type, headers and body.
fn relayed(answer: DeviceAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, answer.body).into_response();
    let headers = response.headers_mut();
    // Only the media types of query answers pass: a device cannot make the hub serve
    // HTML or a script to the admin's browser.
    let content_type = ANSWER_TYPES
        .into_iter()
        .find(|known| *known == answer.content_type)
        .unwrap_or("application/octet-stream");
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (name, value) in [
        (weir_query::ROW_COUNT_HEADER, answer.row_count),
        (weir_query::TRUNCATED_HEADER, answer.truncated),
    ] {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(name, value);
        }
    }
    response
}

/// A device's poll for forwarded queries.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct QueryPoll {
    /// How long to wait for a query, in seconds (default 30, at most the hub's
    /// `--max-poll-wait`).
    wait: Option<u64>,
}

/// The queries forwarded to this device, waiting up to `wait` seconds for one: 200 with
/// them, or 204 when none came.
#[utoipa::path(get, path = "/api/v1/devices/{id}/queries",
    params(QueryPoll, ("id" = String, Path, description = "The device id")),
    security(("device" = [])),
    responses((status = 200, body = Vec<ForwardedQuery>), (status = 204),
        (status = 401, body = crate::protocol::ErrorBody), (status = 403, body = crate::protocol::ErrorBody)))]
pub async fn poll_queries(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(id): PathParams<String>,
    QueryParams(poll): QueryParams<QueryPoll>,
) -> Result<Response, ApiError> {
    caller.require_device(&id)?;
    let wait = poll
        .wait
        .map_or(DEFAULT_QUERY_POLL_WAIT, Duration::from_secs)
        .min(hub.config().max_poll_wait);
    let _slot = hub.limiter().poll(&id, "queries")?;
    let queries = hub.relay().take(&id, wait).await;
    if queries.is_empty() {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Ok(Json(queries).into_response())
    }
}

/// The device's answer to forwarded query `query`: the body, media type, and headers
/// its local API answered with, the status in `weir-answer-status`.
#[utoipa::path(post, path = "/api/v1/devices/{id}/queries/{query}/answer",
    params(("id" = String, Path, description = "The device id"),
        ("query" = String, Path, description = "The forwarded query's id")),
    request_body(content = Vec<u8>, description = "The answer as the device's local API gave it"),
    security(("device" = [])),
    responses((status = 204), (status = 404, body = crate::protocol::ErrorBody, description = "No one waits for this answer any more"),
        (status = 401, body = crate::protocol::ErrorBody), (status = 403, body = crate::protocol::ErrorBody)))]
pub async fn answer_query(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams((id, query)): PathParams<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require_device(&id)?;
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let status = text(ANSWER_STATUS_HEADER)
        .and_then(|status| status.parse::<u16>().ok())
        .filter(|status| (200..600).contains(status))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "the answer needs a {ANSWER_STATUS_HEADER} header with its HTTP status"
            ))
        })?;
    let answer = DeviceAnswer {
        status,
        content_type: text(header::CONTENT_TYPE.as_str())
            .unwrap_or_else(|| "application/octet-stream".to_owned()),
        row_count: text(weir_query::ROW_COUNT_HEADER),
        truncated: text(weir_query::TRUNCATED_HEADER),
        body,
    };
    if hub.relay().answer(&id, &query, answer) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "no one waits for an answer to query '{query}' any more (it timed out)"
        )))
    }
}
