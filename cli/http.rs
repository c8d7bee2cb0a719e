//! The runtime's HTTP endpoint: `/metrics` in Prometheus text format, `/status` (the
//! modules' states as JSON, what `weir status` prints) and `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weir_modules::ModuleHost;

/// What the endpoint serves from.
#[derive(Clone)]
struct Served {
    registry: Registry,
    modules: Arc<ModuleHost>,
}

/// Binds `addr` and serves until `stop` is cancelled. Returns the bound address, which
/// differs from `addr` when its port is 0.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    modules: Arc<ModuleHost>,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(Served { registry, modules });
    let handle = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!("metrics endpoint stopped: {error}");
        }
    });
    Ok((bound, handle))
}

/// The body of `/status`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct StatusBody {
    /// Every module of every running pipeline.
    pub modules: Vec<weir_modules::ModuleReport>,
}

async fn status(State(served): State<Served>) -> impl IntoResponse {
    let body = StatusBody {
        modules: served.modules.reports(),
    };
    match serde_json::to_vec(&body) {
        Ok(json) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json,
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("cannot encode the status: {error}\n").into_bytes(),
        ),
    }
}

async fn metrics(State(served): State<Served>) -> impl IntoResponse {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&served.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("cannot encode metrics: {error}\n").into_bytes(),
        ),
    }
}
