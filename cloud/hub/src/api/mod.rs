//! The hub's HTTP API, versioned under `/api/v1`: the admin side (devices, deployments,
//! fleet status) and the device side (desired state, reports, heartbeats), with its
//! OpenAPI document, `/metrics` and `/healthz`.
//!
//! Who may call what:
//!
//! | caller | credentials | may |
//! | --- | --- | --- |
//! | admin | `Authorization: Bearer ADMIN_TOKEN` | everything |
//! | device | `Authorization: SharedAccessSignature sr=devices/ID&se=…&sig=…` | read its own desired state and forwarded queries, write its own reports, heartbeats and query answers |
//! | anyone | none | `/api/v1/openapi.json`, `/metrics`, `/healthz`, the dashboard's files |
//!
//! A request without valid credentials (missing, malformed, expired, tampered, or
//! signed with a key that has since been rotated) is answered 401; valid credentials
//! that do not allow the request (a device acting as another, a disabled device, a
//! device on the admin API) get 403.

mod admin;
mod data;
mod device;
mod queries;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequestParts, MatchedPath, OriginalUri, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::error::StoreError;
use crate::hub::Hub;
use crate::identity::{DeviceToken, KeySlot, TOKEN_PREFIX, TokenError};
use crate::protocol::now_secs;
use crate::protocol::{DiagnosticView, ErrorBody, ErrorDetail};

/// The largest request body: a deployment's pipelines are the big ones.
const MAX_BODY_BYTES: usize = 8 << 20;

/// The largest device report: a device may not fill the hub's database.
const MAX_REPORT_BYTES: usize = 256 << 10;

/// The largest batch a device ships.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// The largest answer a device sends to a forwarded query.
const MAX_QUERY_ANSWER_BYTES: usize = 64 << 20;

/// The API's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Weir hub API",
        description = "Devices, deployments and fleet status (admin token), and the device side: desired state, reports and heartbeats (device tokens)."
    ),
    paths(
        admin::list_devices,
        admin::create_device,
        admin::get_device,
        admin::patch_device,
        admin::delete_device,
        admin::put_tags,
        admin::get_keys,
        admin::rotate_key,
        admin::list_deployments,
        admin::create_deployment,
        admin::get_deployment,
        admin::put_deployment,
        admin::delete_deployment,
        admin::deployment_devices,
        admin::fleet_status,
        device::desired,
        device::report,
        device::heartbeat,
        queries::query_device,
        queries::poll_queries,
        queries::answer_query,
        data::ingest,
        data::query,
    ),
    modifiers(&SecuritySchemes)
)]
pub struct ApiDoc;

/// Declares the two credentials.
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin",
            utoipa::openapi::security::SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The hub's admin token."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "device",
            utoipa::openapi::security::SecurityScheme::ApiKey(ApiKey::Header(
                ApiKeyValue::with_description(
                    "Authorization",
                    "A device token: SharedAccessSignature sr=devices/ID&se=EXPIRY&sig=SIGNATURE",
                ),
            )),
        );
    }
}

/// The hub's routes.
pub fn router(hub: Arc<Hub>) -> Router {
    let api = Router::new()
        .route("/openapi.json", get(openapi))
        .route(
            "/devices",
            get(admin::list_devices).post(admin::create_device),
        )
        .route(
            "/devices/{id}",
            get(admin::get_device)
                .patch(admin::patch_device)
                .delete(admin::delete_device),
        )
        .route("/devices/{id}/tags", put(admin::put_tags))
        .route("/devices/{id}/keys", get(admin::get_keys))
        .route("/devices/{id}/keys/{slot}/rotate", post(admin::rotate_key))
        .route("/devices/{id}/desired", get(device::desired))
        .route(
            "/devices/{id}/report",
            post(device::report).layer(axum::extract::DefaultBodyLimit::max(MAX_REPORT_BYTES)),
        )
        .route("/devices/{id}/heartbeat", post(device::heartbeat))
        .route("/devices/{id}/query", post(queries::query_device))
        .route(
            "/devices/{id}/data/{pipeline}/{sink}/{seq}",
            post(data::ingest)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BATCH_BYTES))
                // Outside the body limit: a slot is taken before the body is read.
                .layer(axum::middleware::from_fn_with_state(
                    Arc::clone(&hub),
                    ingest_slot,
                )),
        )
        .route("/query", post(data::query))
        .route("/devices/{id}/queries", get(queries::poll_queries))
        .route(
            "/devices/{id}/queries/{query}/answer",
            post(queries::answer_query)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_QUERY_ANSWER_BYTES)),
        )
        .route(
            "/deployments",
            get(admin::list_deployments).post(admin::create_deployment),
        )
        .route(
            "/deployments/{name}",
            get(admin::get_deployment)
                .put(admin::put_deployment)
                .delete(admin::delete_deployment),
        )
        .route(
            "/deployments/{name}/devices",
            get(admin::deployment_devices),
        )
        .route("/status", get(admin::fleet_status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .nest("/api/v1", api)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(crate::dashboard::router())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&hub),
            observe,
        ))
        .with_state(hub)
}

/// Counts and times each request under its route's pattern (never the raw path, whose
/// ids would make a series per device).
async fn observe(State(hub): State<Arc<Hub>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // Only methods the API knows become labels: anything else would add a series per
    // made-up method.
    let method: &'static str = match request.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    hub.metrics().observe_request(
        method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Holds one of the hub's ingest slots while a batch's body is read and stored: past
/// `--max-concurrent-ingest` at once, a batch gets 429 before its body is read.
async fn ingest_slot(State(hub): State<Arc<Hub>>, request: Request, next: Next) -> Response {
    match hub.limiter().ingest() {
        Ok(_slot) => next.run(request).await,
        Err(busy) => {
            hub.metrics().refused("busy");
            ApiError::Busy(busy).into_response()
        }
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Result<Response, ApiError> {
    if hub.metrics().fleet_due(crate::protocol::now_ms()) {
        admin::update_fleet_metrics(&hub).await?;
    }
    hub.metrics().set_quarantined(hub.data().quarantined());
    let mut response = hub.metrics().render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(response)
}

async fn not_found(method: axum::http::Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::NotFound(format!(
        "no API route {method} {} (see /api/v1/openapi.json)",
        uri.path()
    ))
}

async fn method_not_allowed(method: axum::http::Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::Rejected {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!(
            "{} does not take {method} (see /api/v1/openapi.json)",
            uri.path()
        ),
    }
}

/// An error answer: its status, and a JSON body that says what went wrong.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the request is malformed or invalid.
    BadRequest(String),
    /// 401: no valid credentials.
    Unauthorized(String),
    /// 403: valid credentials that do not allow this.
    Forbidden(String),
    /// 404.
    NotFound(String),
    /// 409: it exists already.
    Conflict(String),
    /// 422: a deployment whose pipelines do not validate.
    Invalid {
        /// A summary.
        message: String,
        /// Every problem.
        diagnostics: Vec<DiagnosticView>,
    },
    /// Another status, from a request the framework could not take (a body too large,
    /// a method the route does not have).
    Rejected {
        /// The status.
        status: StatusCode,
        /// Why.
        message: String,
    },
    /// 429: past a limit of the hub's; the caller sends it again after a while.
    Busy(crate::limits::Busy),
    /// 500: the hub's own failure (logged; the caller is told only that it happened).
    Internal(String),
}

impl From<crate::limits::Busy> for ApiError {
    fn from(busy: crate::limits::Busy) -> Self {
        ApiError::Busy(busy)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(message) => ApiError::Conflict(message),
            other => {
                tracing::error!("{other}");
                ApiError::Internal(other.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = match &self {
            ApiError::Busy(busy) => Some(busy.retry_after.as_secs().max(1)),
            _ => None,
        };
        let (status, message, diagnostics) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m, Vec::new()),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m, Vec::new()),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m, Vec::new()),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m, Vec::new()),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m, Vec::new()),
            ApiError::Invalid {
                message,
                diagnostics,
            } => (StatusCode::UNPROCESSABLE_ENTITY, message, diagnostics),
            ApiError::Rejected { status, message } => (status, message, Vec::new()),
            ApiError::Busy(busy) => (StatusCode::TOO_MANY_REQUESTS, busy.message, Vec::new()),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the hub failed to answer; its log says why".to_owned(),
                Vec::new(),
            ),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                status: status.as_u16(),
                message,
                diagnostics,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer, SharedAccessSignature"),
            );
        }
        response
    }
}

/// Reads a JSON body, answering 400 with serde's message (which names the field and
/// position) when it does not fit.
pub struct JsonBody<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(rejected(rejection.status(), rejection.body_text())),
        }
    }
}

/// Reads the query string, answering 400 in JSON when it does not fit.
pub struct QueryParams<T>(pub T);

impl<T, S> FromRequestParts<S> for QueryParams<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(QueryParams(value)),
            Err(rejection) => Err(rejected(rejection.status(), rejection.body_text())),
        }
    }
}

/// Reads the path's parameters, answering in JSON when they do not fit.
pub struct PathParams<T>(pub T);

impl<T, S> FromRequestParts<S> for PathParams<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(PathParams(value)),
            Err(rejection) => Err(rejected(rejection.status(), rejection.body_text())),
        }
    }
}

fn rejected(status: StatusCode, message: String) -> ApiError {
    match status {
        StatusCode::BAD_REQUEST => ApiError::BadRequest(message),
        status => ApiError::Rejected { status, message },
    }
}

/// Who is calling.
pub enum Caller {
    /// The admin token's holder.
    Admin,
    /// A device, authenticated by its token: its id.
    Device(String),
}

impl FromRequestParts<Arc<Hub>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, hub: &Arc<Hub>) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::Unauthorized(
                "this request needs an Authorization header: 'Bearer ADMIN_TOKEN', or a \
                 device's 'SharedAccessSignature …' token"
                    .to_owned(),
            ));
        };
        let value = value.to_str().map_err(|_| {
            ApiError::Unauthorized("the Authorization header is not text".to_owned())
        })?;
        if let Some(token) = value.strip_prefix("Bearer ") {
            return if hub.is_admin_token(token.trim()) {
                Ok(Caller::Admin)
            } else {
                Err(ApiError::Unauthorized(
                    "the admin token is not valid".to_owned(),
                ))
            };
        }
        if value.starts_with(TOKEN_PREFIX.trim_end()) {
            return authenticate_device(hub, value).await.map(Caller::Device);
        }
        Err(ApiError::Unauthorized(
            "unknown Authorization scheme: use 'Bearer ADMIN_TOKEN' or a device's \
             'SharedAccessSignature …' token"
                .to_owned(),
        ))
    }
}

/// Checks a device token against the keys of the device it names.
async fn authenticate_device(hub: &Hub, header: &str) -> Result<String, ApiError> {
    let token = DeviceToken::parse(header).map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    let Some(id) = token.device_id() else {
        return Err(ApiError::Unauthorized(format!(
            "the token is for '{}'; a device token's resource is devices/DEVICE_ID",
            token.resource
        )));
    };
    // An unknown device and a wrong signature get the same answer, so ids cannot be
    // probed; the hub's log tells them apart.
    let not_valid = || {
        ApiError::Unauthorized(format!(
            "the token is not signed with a current key of device '{id}'"
        ))
    };
    let Some(device) = hub.store().device_credentials(id).await? else {
        tracing::debug!(device = %id, "token for an unknown device");
        return Err(not_valid());
    };
    let primary = hub.device_key(&device, KeySlot::Primary);
    let secondary = hub.device_key(&device, KeySlot::Secondary);
    token
        .verify(&[&primary, &secondary], now_secs())
        .map_err(|e| match e {
            TokenError::BadSignature => {
                tracing::debug!(device = %id, "token with a bad signature");
                not_valid()
            }
            other => ApiError::Unauthorized(other.to_string()),
        })?;
    if !device.enabled {
        return Err(ApiError::Forbidden(format!("device '{id}' is disabled")));
    }
    Ok(device.id)
}

impl Caller {
    /// Refuses anyone but the admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Device(device) => Err(ApiError::Forbidden(format!(
                "device '{device}' may not use the admin API"
            ))),
        }
    }

    /// Refuses anyone but device `id` itself.
    pub fn require_device(&self, id: &str) -> Result<(), ApiError> {
        match self {
            Caller::Device(device) if device == id => Ok(()),
            Caller::Device(device) => Err(ApiError::Forbidden(format!(
                "device '{device}' may not act as device '{id}'"
            ))),
            Caller::Admin => Err(ApiError::Forbidden(format!(
                "only device '{id}' itself may do this, with its own token"
            ))),
        }
    }
}

/// A validator's diagnostic as the API shows it.
pub fn diagnostic_view(diagnostic: &weir_pipelines::Diagnostic) -> DiagnosticView {
    DiagnosticView {
        file: diagnostic.file.display().to_string(),
        line: diagnostic.location.line,
        column: diagnostic.location.column,
        path: diagnostic.path.clone(),
        message: diagnostic.message.clone(),
        hint: diagnostic.hint.clone(),
        text: diagnostic.to_string(),
    }
}
