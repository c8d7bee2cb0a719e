//! The fleet's data over the API: devices ship their `hub` sinks' batches in, each
//! stored once; the admin runs read-only SQL over all of it.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{AppendHeaders, IntoResponse, Response};
use weir_query::{Encoded, Format, QueryError, QueryRequest};

use super::{ApiError, Caller, PathParams};
use crate::data::{BatchId, DataError, Ingested};
use crate::hub::Hub;
use crate::limits::Quota;
use crate::protocol::{APPENDED_MS_HEADER, IngestAnswer, now_ms};

/// Stores one batch a device's `hub` sink shipped: the zstd Arrow IPC its outbox holds,
/// with the time the device stored it in `weir-appended-ms`. A batch sent again (same
/// device, pipeline, sink and sequence number) is acknowledged and not stored twice.
#[utoipa::path(post, path = "/api/v1/devices/{id}/data/{pipeline}/{sink}/{seq}",
    params(("id" = String, Path, description = "The device id"),
        ("pipeline" = String, Path, description = "The shipping pipeline"),
        ("sink" = String, Path, description = "The shipping sink"),
        ("seq" = u64, Path, description = "The batch's sequence number in its sink's stream")),
    request_body(content = Vec<u8>, description = "Arrow IPC stream (zstd), as the outbox stores it"),
    security(("device" = [])),
    responses((status = 200, body = IngestAnswer), (status = 400, body = crate::protocol::ErrorBody),
        (status = 401, body = crate::protocol::ErrorBody), (status = 403, body = crate::protocol::ErrorBody),
        (status = 413, description = "The batch declares more rows, columns or decoded bytes than the hub takes", body = crate::protocol::ErrorBody),
        (status = 429, description = "The hub takes as many batches as it may at once, or the device shipped its bytes for the day: send it again after Retry-After", body = crate::protocol::ErrorBody),
        (status = 422, description = "The rows do not fit their table (a column of another type, a hub_* column, a reserved pipeline name) or cannot be stored as Parquet", body = crate::protocol::ErrorBody),
        (status = 503, description = "The fleet's data store is unavailable: send the batch again later", body = crate::protocol::ErrorBody)))]
pub async fn ingest(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams((id, pipeline, sink, seq)): PathParams<(String, String, String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<IngestAnswer>, ApiError> {
    caller.require_device(&id)?;
    for (what, name) in [("pipeline", &pipeline), ("sink", &sink)] {
        let fits = !name.is_empty()
            && name.len() <= 128
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !fits {
            return Err(ApiError::BadRequest(format!(
                "'{name}' is not a {what} name: letters, digits, '_' and '-'"
            )));
        }
    }
    let appended_ms = headers
        .get(APPENDED_MS_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i64>().ok())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "a batch needs a {APPENDED_MS_HEADER} header: when the device stored it, ms \
                 since the Unix epoch"
            ))
        })?;
    // The device's quotas: streams (read from the database the first time), bytes a day.
    let limiter = hub.limiter();
    if !limiter.knows_streams(&id) {
        limiter.know_streams(&id, hub.store().device_streams(&id).await?);
    }
    let deployed = hub.with_fleet(|fleet| fleet.ships(&id, (&pipeline, &sink)));
    if !limiter.accepts(
        &hub.config().accept_streams,
        &id,
        (&pipeline, &sink),
        deployed,
    ) {
        hub.metrics().refused("not-accepted");
        return Err(ApiError::Rejected {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!(
                "the hub does not take {pipeline}/{sink} from device '{id}': it is not a hub \
                 sink of the device's deployment (see weir-hub serve --accept-streams)"
            ),
        });
    }
    let day = now_ms().div_euclid(86_400_000);
    match limiter.charge(&id, (&pipeline, &sink), body.len() as u64, day) {
        Ok(()) => {}
        Err(Quota::Later(busy)) => {
            hub.metrics().refused("quota");
            return Err(ApiError::Busy(busy));
        }
        Err(Quota::Refused(message)) => {
            hub.metrics().refused("quota");
            return Err(ApiError::Rejected {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message,
            });
        }
    }
    let id = BatchId {
        device: &id,
        pipeline: &pipeline,
        sink: &sink,
        seq,
        appended_ms,
    };
    let body_len = body.len();
    match hub.data().ingest(hub.store(), id, body, now_ms()).await {
        Ok(Ingested::Stored(rows)) => {
            hub.metrics().ingested(rows, body_len);
            Ok(Json(IngestAnswer { stored: true, rows }))
        }
        Ok(Ingested::Duplicate) => Ok(Json(IngestAnswer {
            stored: false,
            rows: 0,
        })),
        Err(DataError::BadBatch(message)) => {
            hub.metrics().refused("malformed");
            Err(ApiError::BadRequest(message))
        }
        Err(DataError::Refused(why)) => {
            let (status, reason) = if why.is_over_limit() {
                (StatusCode::PAYLOAD_TOO_LARGE, "over-limit")
            } else {
                (StatusCode::BAD_REQUEST, "malformed")
            };
            hub.metrics().refused(reason);
            Err(ApiError::Rejected {
                status,
                message: DataError::Refused(why).to_string(),
            })
        }
        Err(error @ (DataError::Encode(_) | DataError::Conflict(_))) => {
            hub.metrics().refused("conflict");
            Err(ApiError::Rejected {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: error.to_string(),
            })
        }
        Err(DataError::Store(error)) => Err(error.into()),
        Err(other) => {
            // The object store is away (an S3 outage): the device keeps the batch in its
            // outbox and sends it again.
            tracing::error!("{other}");
            Err(ApiError::Rejected {
                status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
                message: "the hub cannot store data right now; send the batch again later".into(),
            })
        }
    }
}

/// Read-only SQL over the data the fleet shipped: each (pipeline, sink) is a table
/// `"pipeline"."sink"` (and `sink` when unique), with `hub_device` and `hub_arrived_at`
/// columns. The body and the answers are those of a device's own `/api/v1/query`.
#[utoipa::path(post, path = "/api/v1/query",
    request_body(content = Object, description = "A query: {\"sql\": \"SELECT …\", \"format\": \"json|csv|arrow\", \"max_rows\": N, \"timeout\": \"10s\"}"),
    security(("admin" = [])),
    responses((status = 200, description = "The rows, in the format asked"),
        (status = 400, description = "Bad SQL, not read-only, or a bad request"),
        (status = 504, description = "The query did not finish within its timeout")))]
pub async fn query(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let accepted = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .and_then(Format::from_accept);
    let run = async {
        let request: QueryRequest = serde_json::from_slice(&body).map_err(|e| {
            QueryError::BadRequest(format!(
                "the body is not a query: {e}; send {{\"sql\": \"SELECT …\"}}"
            ))
        })?;
        let format = request.format.or(accepted).unwrap_or_default();
        let limits = request.limits(&hub.config().query_limits)?;
        // Reading the tables' schemas (from a slow store, say) counts against the
        // query's time too.
        let answer = tokio::time::timeout(limits.timeout, async {
            let session = hub.data().session(hub.store(), &limits).await?;
            session.run(&request.sql, &limits).await
        })
        .await
        .map_err(|_| QueryError::Timeout(limits.timeout))??;
        Ok::<_, QueryError>(Encoded::answer(&answer, format))
    };
    let encoded = run.await.unwrap_or_else(|error| Encoded::refusal(&error));
    let status = StatusCode::from_u16(encoded.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok((status, AppendHeaders(encoded.headers()), encoded.body).into_response())
}
