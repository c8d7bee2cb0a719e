//! The runtime's local HTTP API, on the metrics address (loopback by default):
//!
//! - `GET /metrics`: Prometheus text format.
//! - `GET /healthz`: the process serves (liveness). `GET /readyz`: every pipeline has
//!   started and none has failed (readiness).
//! - `GET /api/v1/pipelines`: pipelines, operators, schemas, state and modules.
//! - `POST /api/v1/query`: read-only SQL over the retained streams.
//! - `GET /api/v1/tap/{node}`: a rate-bounded live sample of a node's output.
//!
//! With a token set (`--api-token`), everything but the two probes needs
//! `Authorization: Bearer TOKEN`. Served on loopback, everything but the probes also
//! needs a loopback `Host` (an IP literal or `localhost`): a web page whose name an
//! attacker re-points at 127.0.0.1 (DNS rebinding) sends its own name, and is refused.

pub mod client;
pub mod live;
pub mod query;
mod tap;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weir_modules::ModuleHost;

use live::{LivePipelines, StatusBody};

/// How often retained streams that went quiet let go of what aged out.
const EVICTION_SWEEP: Duration = Duration::from_secs(1);

/// Whether the pipelines given at start have all been started. The API listens before
/// they are built, so that probes answer during a long start; queries and taps wait a
/// while for the start to end, so that a client that calls as soon as the address is
/// announced finds the streams rather than an empty runtime.
#[derive(Clone)]
pub struct Startup(Arc<tokio::sync::watch::Sender<bool>>);

/// How long a query or a tap waits for the pipelines to start before it is refused.
const STARTUP_WAIT: Duration = Duration::from_secs(10);

impl Default for Startup {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(false)))
    }
}

impl Startup {
    /// Marks the start as over: every pipeline given at start has been started.
    pub fn end(&self) {
        self.0.send_replace(true);
    }

    /// Whether the start is over.
    pub fn is_over(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits up to `limit` for the start to end; false when it has not by then.
    pub async fn wait(&self, limit: Duration) -> bool {
        let mut over = self.0.subscribe();
        tokio::time::timeout(limit, over.wait_for(|over| *over))
            .await
            .is_ok_and(|waited| waited.is_ok())
    }
}

/// Waits up to [`STARTUP_WAIT`] for the pipelines to start; the refusal to answer
/// when they have not, for a request that needs their streams.
pub async fn wait_for_start(startup: &Startup) -> Result<(), Response> {
    if startup.wait(STARTUP_WAIT).await {
        Ok(())
    } else {
        Err(still_starting())
    }
}

/// The refusal of a request that needs the pipelines while they are still starting.
fn still_starting() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "starting",
        "the pipelines are still starting; try again shortly",
    )
}

/// What the API serves from.
#[derive(Clone)]
pub struct ApiState {
    /// The runtime's metrics.
    pub registry: Registry,
    /// The running modules.
    pub modules: Arc<ModuleHost>,
    /// The running pipelines.
    pub pipelines: Arc<LivePipelines>,
    /// The SHA-256 of the bearer token, when one is required.
    pub token_digest: Option<Arc<str>>,
    /// The bounds on every query.
    pub limits: weir_query::Limits,
    /// Whether every pipeline given at start has been started.
    pub startup: Startup,
    /// One permit per query that may run at once.
    pub queries: Arc<tokio::sync::Semaphore>,
}

/// The local API's settings, shared by `weir run` and `weir agent`.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Where to serve the local API: /metrics, /healthz, /readyz and /api/v1 (queries,
    /// pipelines, taps). Port 0 picks a free port. Beyond loopback, set --api-token.
    #[arg(long, env = "WEIR_METRICS_ADDR", default_value = DEFAULT_API_ADDR, value_name = "HOST:PORT")]
    pub metrics_addr: SocketAddr,

    /// Do not serve the local API at all.
    #[arg(long, conflicts_with = "metrics_addr")]
    pub no_metrics: bool,

    /// A bearer token every request but /healthz and /readyz must carry
    /// (`Authorization: Bearer TOKEN`). Without it the API is open to whoever reaches
    /// its address.
    #[arg(
        long,
        env = "WEIR_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,

    /// The longest a query may run.
    #[arg(long, default_value = "30s", value_parser = crate::run::positive_duration, value_name = "DURATION")]
    pub query_timeout: Duration,

    /// The most rows a query answers with; the answer says when it was cut.
    #[arg(long, default_value_t = weir_query::Limits::DEFAULT_MAX_ROWS, value_name = "ROWS")]
    pub query_max_rows: usize,

    /// The most queries that run at once; more get 429 with Retry-After, so queries
    /// cannot starve the pipelines of CPU and memory.
    #[arg(long, default_value_t = DEFAULT_CONCURRENT_QUERIES, value_name = "N")]
    pub max_concurrent_queries: usize,
}

/// Queries that may run at once unless told otherwise: two per core of a small gateway.
pub const DEFAULT_CONCURRENT_QUERIES: usize = 4;

/// The address the local API listens on unless told otherwise: loopback only.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:9898";

impl ApiArgs {
    /// The bounds on every query.
    pub fn limits(&self) -> weir_query::Limits {
        weir_query::Limits {
            timeout: self.query_timeout,
            max_rows: self.query_max_rows.max(1),
            ..weir_query::Limits::default()
        }
    }

    /// Serves the API as these arguments say, unless `--no-metrics`. Returns the bound
    /// address, or a message for the user.
    pub async fn serve(
        &self,
        registry: Registry,
        modules: Arc<ModuleHost>,
        pipelines: Arc<LivePipelines>,
        startup: Startup,
        stop: CancellationToken,
    ) -> Result<Option<(SocketAddr, tokio::task::JoinHandle<()>)>, String> {
        if self.no_metrics {
            return Ok(None);
        }
        if self.query_max_rows == 0 {
            return Err("--query-max-rows must be at least 1".to_owned());
        }
        if self.max_concurrent_queries == 0 {
            return Err("--max-concurrent-queries must be at least 1".to_owned());
        }
        let token_digest = match self.api_token.as_deref().map(str::trim) {
            Some("") => return Err("--api-token is empty; give a token or leave it out".into()),
            Some(token) => Some(Arc::from(weir_query::access::token_digest(token))),
            None => {
                if !self.metrics_addr.ip().is_loopback() {
                    tracing::warn!(
                        "the local API listens on {} without a token: anyone who reaches \
                         it can query the streams; set --api-token",
                        self.metrics_addr
                    );
                }
                None
            }
        };
        let state = ApiState {
            registry,
            modules,
            pipelines,
            token_digest,
            limits: self.limits(),
            startup,
            queries: Arc::new(tokio::sync::Semaphore::new(self.max_concurrent_queries)),
        };
        let served = serve(self.metrics_addr, state, stop)
            .await
            .map_err(|error| {
                format!(
                    "cannot serve the local API on {}: {error}; pick another address with \
                 --metrics-addr or pass --no-metrics",
                    self.metrics_addr
                )
            })?;
        tracing::info!(
            "metrics: listening on http://{0}/metrics; local API on http://{0}/api/v1",
            served.0
        );
        Ok(Some(served))
    }
}

/// Binds `addr` and serves until `stop` is cancelled. Returns the bound address, which
/// differs from `addr` when its port is 0.
pub async fn serve(
    addr: SocketAddr,
    state: ApiState,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/pipelines", get(pipelines))
        .route("/api/v1/query", post(query::query))
        .route("/api/v1/tap/{node}", get(tap::tap))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .route_layer(middleware::from_fn_with_state(
            bound.ip().is_loopback(),
            check_host,
        ));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .merge(protected)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .with_state(state.clone());
    let sweep = {
        let (pipelines, stop) = (state.pipelines.clone(), stop.clone());
        async move {
            let mut every = tokio::time::interval(EVICTION_SWEEP);
            loop {
                tokio::select! {
                    _ = every.tick() => pipelines.evict_expired(),
                    () = stop.cancelled() => return,
                }
            }
        }
    };
    let handle = tokio::spawn(async move {
        tokio::spawn(sweep);
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!("local API stopped: {error}");
        }
    });
    Ok((bound, handle))
}

/// A JSON error answer: `{"error": MESSAGE, "code": CODE}`.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"error": message.into(), "code": code});
    (status, axum::Json(body)).into_response()
}

/// Whether `host` (a `Host` header: a name or IP literal, maybe with a port) names this
/// machine's loopback interface.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [IPv6]:port
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    weir_query::access::is_loopback_name(name)
}

/// On a loopback listener, refuses requests whose `Host` is not loopback (DNS
/// rebinding). HTTP/1.0 requests without a `Host` come from local tools and pass.
async fn check_host(
    State(loopback_listener): State<bool>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .map(|value| value.to_str().unwrap_or("?").to_owned());
    match host {
        Some(host) if loopback_listener && !is_loopback_host(&host) => error(
            StatusCode::FORBIDDEN,
            "host",
            format!(
                "this API serves on loopback and answers only requests for a loopback host \
                 (127.0.0.1, [::1] or localhost), not {host:?}"
            ),
        ),
        _ => next.run(request).await,
    }
}

async fn authorize(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let Some(digest) = &state.token_digest else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if weir_query::access::token_matches(token, digest) => next.run(request).await,
        Some(_) => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is not this runtime's API token",
        ),
        None => {
            let mut answer = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this API needs a bearer token: send `Authorization: Bearer TOKEN` \
                 (weir query/status/tap take --token or WEIR_API_TOKEN)",
            );
            answer
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
            answer
        }
    }
}

async fn ready(State(state): State<ApiState>) -> Response {
    if !state.startup.is_over() {
        return still_starting();
    }
    let failed = state.pipelines.failed();
    if failed.is_empty() {
        "ready\n".into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "failed",
            format!("pipelines failed: {}", failed.join("; ")),
        )
    }
}

async fn pipelines(State(state): State<ApiState>) -> Response {
    axum::Json(StatusBody {
        pipelines: state.pipelines.reports(),
        modules: state.modules.reports(),
    })
    .into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot encode metrics: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Startup, is_loopback_host};

    #[tokio::test]
    async fn a_request_during_start_up_waits_for_it_to_end_but_not_forever() {
        let startup = Startup::default();
        assert!(!startup.wait(Duration::from_millis(50)).await);
        let ending = startup.clone();
        let waiting = tokio::spawn(async move { startup.wait(Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        ending.end();
        assert!(waiting.await.unwrap());
        assert!(ending.is_over());
        // Once over, it stays over: later requests do not wait at all.
        assert!(ending.wait(Duration::ZERO).await);
    }

    #[test]
    fn only_loopback_hosts_pass_on_a_loopback_listener() {
        for host in [
            "127.0.0.1:9464",
            "127.0.0.1",
            "[::1]:9464",
            "localhost:9464",
            "LocalHost",
            "app.localhost:80",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:9464",
            "evil.example",
            "10.0.0.5:9464",
            "[2001:db8::1]:9464",
            "localhost.evil.example",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
