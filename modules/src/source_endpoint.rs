//! The endpoint a source module pushes its batches to (`POST /v1/batches` on the
//! runtime's socket). A push is answered only once the pipeline has taken the batch, so
//! a slow pipeline slows the module down instead of queueing in memory. A push that
//! repeats the `Weir-Batch-Id` of one already taken (a retry whose answer was lost) is
//! answered without being taken again.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_engine::OperatorError;
use weir_module_sdk::{Endpoint, HEADER_BATCH_ID, PATH_BATCHES, decode_stream};

/// Batch ids remembered for spotting repeated pushes.
const REMEMBERED_IDS: usize = 1024;

/// A pushed batch, and where to say whether the pipeline took it.
pub type Pushed = (RecordBatch, oneshot::Sender<bool>);

/// The running endpoint.
pub struct SourceEndpoint {
    batches: mpsc::Receiver<Pushed>,
    stop: CancellationToken,
    server: JoinHandle<()>,
}

struct Shared {
    schema: SchemaRef,
    batches: mpsc::Sender<Pushed>,
    taken: Mutex<TakenIds>,
}

/// The ids of the latest batches taken, oldest first.
#[derive(Default)]
struct TakenIds {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

impl TakenIds {
    fn contains(&self, id: u64) -> bool {
        self.set.contains(&id)
    }

    fn insert(&mut self, id: u64) {
        if self.set.insert(id) {
            self.order.push_back(id);
            if self.order.len() > REMEMBERED_IDS
                && let Some(oldest) = self.order.pop_front()
            {
                self.set.remove(&oldest);
            }
        }
    }
}

impl SourceEndpoint {
    /// Listens on `endpoint` for batches of `schema`.
    pub async fn bind(endpoint: &Endpoint, schema: SchemaRef) -> Result<Self, OperatorError> {
        let (sender, batches) = mpsc::channel(1);
        let router = Router::new()
            .route(PATH_BATCHES, post(push))
            .layer(DefaultBodyLimit::disable())
            .with_state(Arc::new(Shared {
                schema,
                batches: sender,
                taken: Mutex::default(),
            }));
        let stop = CancellationToken::new();
        let stopped = stop.clone().cancelled_owned();
        let server = match endpoint {
            Endpoint::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let listener = tokio::net::UnixListener::bind(path).map_err(|e| {
                    OperatorError::io(format!("cannot listen on {}", path.display()), e)
                })?;
                tokio::spawn(async move {
                    let _ = axum::serve(listener, router)
                        .with_graceful_shutdown(stopped)
                        .await;
                })
            }
            Endpoint::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| OperatorError::io(format!("cannot listen on {addr}"), e))?;
                tokio::spawn(async move {
                    let _ = axum::serve(listener, router)
                        .with_graceful_shutdown(stopped)
                        .await;
                })
            }
        };
        Ok(SourceEndpoint {
            batches,
            stop,
            server,
        })
    }

    /// The next pushed batch; `None` once the endpoint is closed.
    pub async fn next(&mut self) -> Option<Pushed> {
        self.batches.recv().await
    }

    /// Stops listening; pushes in progress are answered 503.
    pub async fn close(self) {
        self.stop.cancel();
        drop(self.batches);
        let _ = self.server.await;
    }
}

async fn push(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let batch_id = headers
        .get(HEADER_BATCH_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let seen = |id| shared.taken.lock().expect("never poisoned").contains(id);
    if batch_id.is_some_and(seen) {
        return StatusCode::OK.into_response();
    }
    let batches = match decode_stream(&body) {
        Ok((_, batches)) => batches,
        Err(error) => {
            let message = format!("the body is not an Arrow IPC stream: {error}");
            return (StatusCode::BAD_REQUEST, message).into_response();
        }
    };
    for batch in batches {
        let batch = match crate::operator::conform(&batch, &shared.schema) {
            Ok(batch) => batch,
            Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
        };
        let (taken, answer) = oneshot::channel();
        if shared.batches.send((batch, taken)).await.is_err() || answer.await != Ok(true) {
            return (StatusCode::SERVICE_UNAVAILABLE, "the pipeline is stopping").into_response();
        }
    }
    if let Some(id) = batch_id {
        shared.taken.lock().expect("never poisoned").insert(id);
    }
    StatusCode::OK.into_response()
}
