//! The device side of the API: a device long-polls its desired state, reports what it
//! made of it, and sends heartbeats. Each device may read and write only its own.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, Caller, JsonBody, PathParams, QueryParams};
use crate::hub::Hub;
use crate::protocol::{DesiredState, Report, now_ms};

/// How long a poll waits when the device does not say.
const DEFAULT_POLL_WAIT: Duration = Duration::from_secs(30);

/// A poll for the desired state.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Poll {
    /// The etag of the desired state the device has: the answer waits until it changes.
    /// Without it, the answer is immediate.
    etag: Option<String>,
    /// How long to wait for a change, in seconds (default 30, at most the hub's
    /// `--max-poll-wait`, 60 by default).
    wait: Option<u64>,
}

/// The device's desired state: the deployment it should run. With the `etag` it has,
/// the answer is held until the desired state changes (then 200), or until `wait`
/// seconds pass (then 304).
#[utoipa::path(get, path = "/api/v1/devices/{id}/desired", params(Poll, ("id" = String, Path, description = "The device id")),
    security(("device" = []), ("admin" = [])),
    responses((status = 200, body = DesiredState), (status = 304),
        (status = 401, body = crate::protocol::ErrorBody), (status = 403, body = crate::protocol::ErrorBody)))]
pub async fn desired(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(id): PathParams<String>,
    QueryParams(poll): QueryParams<Poll>,
) -> Result<Response, ApiError> {
    // The admin may look at any device's desired state; a device only at its own.
    if !matches!(caller, Caller::Admin) {
        caller.require_device(&id)?;
    }
    let wait = poll
        .wait
        .map_or(DEFAULT_POLL_WAIT, Duration::from_secs)
        .min(hub.config().max_poll_wait);
    let deadline = tokio::time::Instant::now() + wait;
    let _slot = match &caller {
        Caller::Admin => None,
        _ => Some(hub.limiter().poll(&id, "desired state")?),
    };
    // Subscribed before the first look, so a change in between is not missed.
    let mut changes = hub.subscribe();
    // A device registered through another hub may not have reached this one's fleet.
    if hub.with_fleet(|fleet| fleet.desired(&id)).is_none() {
        hub.refresh().await?;
    }
    loop {
        changes.borrow_and_update();
        let Some(state) = hub.with_fleet(|fleet| fleet.desired(&id)) else {
            return Err(ApiError::NotFound(format!(
                "no device '{id}' is registered"
            )));
        };
        if poll.etag.as_deref() != Some(state.etag.as_str()) {
            return Ok(with_etag(Json(&state).into_response(), &state.etag));
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            // Timed out, or the hub is shutting down: nothing new.
            Ok(Err(_)) | Err(_) => {
                return Ok(with_etag(
                    StatusCode::NOT_MODIFIED.into_response(),
                    &state.etag,
                ));
            }
        }
    }
}

fn with_etag(mut response: Response, etag: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

/// Records the device's report on its desired state: applying, applied, or failed with
/// the error, with the health of its pipelines and modules.
#[utoipa::path(post, params(("id" = String, Path, description = "The device id")),
    path = "/api/v1/devices/{id}/report", request_body = Report,
    security(("device" = [])),
    responses((status = 204), (status = 400, body = crate::protocol::ErrorBody),
        (status = 401, body = crate::protocol::ErrorBody), (status = 403, body = crate::protocol::ErrorBody)))]
pub async fn report(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(id): PathParams<String>,
    JsonBody(report): JsonBody<Report>,
) -> Result<StatusCode, ApiError> {
    caller.require_device(&id)?;
    // Every report is a write through the database's one writer: a device may not send
    // them faster than its rate.
    hub.limiter().report(&id, now_ms())?;
    hub.store().record_report(&id, &report, now_ms()).await?;
    if let Some(error) = &report.error {
        tracing::info!(device = %id, status = ?report.status, "device reports: {error}");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A sign of life: a device not heard from for the hub's `--offline-after` (90 s by
/// default) is shown offline.
#[utoipa::path(post, params(("id" = String, Path, description = "The device id")),
    path = "/api/v1/devices/{id}/heartbeat",
    security(("device" = [])),
    responses((status = 204), (status = 401, body = crate::protocol::ErrorBody),
        (status = 403, body = crate::protocol::ErrorBody)))]
pub async fn heartbeat(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(id): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_device(&id)?;
    hub.heartbeat(&id, now_ms());
    Ok(StatusCode::NO_CONTENT)
}
