//! The module side of the protocol: an HTTP/1.1 server on the socket or port the runtime
//! named, answering health checks and turning each request batch into answer batches
//! with the author's function.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow_array::RecordBatch;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::{
    ARROW_STREAM, ENV_MODULE_ADDR, ENV_MODULE_SOCKET, Endpoint, HEADER_ATTEMPT, HEADER_BATCH_ID,
    PATH_BATCHES, PATH_HEALTH, SdkError, decode_stream, encode_stream,
};

/// What the runtime said about a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchInfo {
    /// The batch's id: the same on every attempt, so side effects can be done once.
    pub batch_id: u64,
    /// 1 on the first attempt, 2 on the first retry, ...
    pub attempt: u32,
}

/// Why a module could not handle a batch.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The batch itself is bad: it goes to the pipeline's dead letters, not retried.
    #[error("{0}")]
    BadBatch(String),
    /// The module failed: the runtime retries the batch.
    #[error("{0}")]
    Failed(String),
}

/// The module's health as `GET /v1/health` reports it; healthy until told otherwise.
#[derive(Clone, Debug)]
pub struct Health(Arc<AtomicBool>);

impl Default for Health {
    fn default() -> Self {
        Health(Arc::new(AtomicBool::new(true)))
    }
}

impl Health {
    /// Reports the module healthy (`true`) or unhealthy (`false`).
    pub fn set(&self, healthy: bool) {
        self.0.store(healthy, Ordering::Relaxed);
    }

    /// Whether the module reports itself healthy.
    pub fn is_healthy(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

type Handler =
    dyn Fn(RecordBatch, &BatchInfo) -> Result<Vec<RecordBatch>, ModuleError> + Send + Sync;

struct App {
    handler: Arc<Handler>,
    health: Health,
}

/// Serves a transform module until SIGTERM or SIGINT: `handler` turns each batch into
/// zero or more batches of the module's output schema.
pub async fn serve_transform<F>(handler: F) -> Result<(), SdkError>
where
    F: Fn(RecordBatch, &BatchInfo) -> Result<Vec<RecordBatch>, ModuleError> + Send + Sync + 'static,
{
    serve_with(handler, Health::default()).await
}

/// Serves a sink module until SIGTERM or SIGINT: `handler` consumes each batch.
pub async fn serve_sink<F>(handler: F) -> Result<(), SdkError>
where
    F: Fn(RecordBatch, &BatchInfo) -> Result<(), ModuleError> + Send + Sync + 'static,
{
    serve_with(
        move |batch, info: &BatchInfo| handler(batch, info).map(|()| Vec::new()),
        Health::default(),
    )
    .await
}

/// The largest request body served, as the Python SDK's default: 256 MiB, or
/// `WEIR_MODULE_MAX_BODY_BYTES`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 << 20;

fn max_body_bytes() -> usize {
    std::env::var("WEIR_MODULE_MAX_BODY_BYTES")
        .ok()
        .and_then(|bytes| bytes.trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_BODY_BYTES)
}

/// Serves a module whose health the author controls through `health`.
pub async fn serve_with<F>(handler: F, health: Health) -> Result<(), SdkError>
where
    F: Fn(RecordBatch, &BatchInfo) -> Result<Vec<RecordBatch>, ModuleError> + Send + Sync + 'static,
{
    let endpoint = Endpoint::from_env(ENV_MODULE_SOCKET, ENV_MODULE_ADDR)?;
    let app = Arc::new(App {
        handler: Arc::new(handler),
        health,
    });
    let router = Router::new()
        .route(PATH_HEALTH, get(health_check))
        .route(PATH_BATCHES, post(batches))
        // Batches are as large as the pipeline makes them, within a bound: a larger
        // body is answered 413 before it is read.
        .layer(DefaultBodyLimit::max(max_body_bytes()))
        .with_state(app);
    let io = |operation: String| move |source| SdkError::Io { operation, source };
    match &endpoint {
        Endpoint::Unix(path) => {
            // A socket left by an earlier run would make bind fail.
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)
                .map_err(io(format!("listen on {}", path.display())))?;
            // Only the runtime (root or the directory's owner) and this module's own user
            // may call it.
            let listener = crate::peer::PeerCheckedListener::new(listener, path)
                .map_err(io(format!("read the owner of {}", path.display())))?;
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown_signal())
                .await
                .map_err(io(format!("serve on {endpoint}")))
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io(format!("listen on {addr}")))?;
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown_signal())
                .await
                .map_err(io(format!("serve on {endpoint}")))
        }
    }
}

/// Resolves on SIGTERM (how the runtime and Docker stop a module) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still dies of the default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn health_check(State(app): State<Arc<App>>) -> Response {
    if app.health.is_healthy() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy").into_response()
    }
}

async fn batches(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let info = BatchInfo {
        batch_id: number(HEADER_BATCH_ID).unwrap_or(0),
        attempt: number(HEADER_ATTEMPT).map_or(1, |a| a.min(u32::MAX as u64) as u32),
    };
    let batches = match decode_stream(&body) {
        Ok((_, batches)) => batches,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("the request body is not an Arrow IPC stream: {error}"),
            )
                .into_response();
        }
    };
    let handler = app.handler.clone();
    // The author's function may be slow: keep it off the threads that answer health checks.
    let handled = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for batch in batches {
            out.extend(handler(batch, &info)?);
        }
        Ok::<_, ModuleError>(out)
    })
    .await;
    let out = match handled {
        Ok(Ok(out)) => out,
        Ok(Err(ModuleError::BadBatch(message))) => {
            return (StatusCode::BAD_REQUEST, message).into_response();
        }
        Ok(Err(ModuleError::Failed(message))) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, message).into_response();
        }
        Err(_) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the module's handler panicked",
            )
                .into_response();
        }
    };
    let Some(first) = out.first() else {
        return StatusCode::OK.into_response();
    };
    let schema = first.schema();
    if let Some(other) = out.iter().find(|b| b.schema() != schema) {
        let message = format!(
            "the handler returned batches of two schemas: {schema:?} and {:?}",
            other.schema()
        );
        return (StatusCode::INTERNAL_SERVER_ERROR, message).into_response();
    }
    match encode_stream(&schema, &out) {
        Ok(bytes) => ([(header::CONTENT_TYPE, ARROW_STREAM)], bytes).into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {error}"),
        )
            .into_response(),
    }
}
