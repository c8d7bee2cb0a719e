//! The endpoint a source module pushes its batches to (`POST /v1/batches` on the
//! runtime's socket). A push is answered only once the pipeline has taken the batch, so
//! a slow pipeline slows the module down instead of queueing in memory. A push that
//! repeats the `Weir-Batch-Id` of one already taken (a retry whose answer was lost) is
//! answered without being taken again.

use std::collections::{HashMap, VecDeque};
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
use weir_engine::ipc::IpcLimits;
use weir_module_sdk::peer::PeerCheckedListener;
use weir_module_sdk::{Endpoint, HEADER_BATCH_ID, PATH_BATCHES};

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
    limits: IpcLimits,
    batches: mpsc::Sender<Pushed>,
    taken: Mutex<TakenIds>,
}

/// The ids of the latest pushes, oldest first: taken, or being taken right now.
#[derive(Default)]
struct TakenIds {
    order: VecDeque<u64>,
    states: HashMap<u64, Taking>,
}

/// Where a push with a given id stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Taking {
    /// Its batches are going into the pipeline now.
    InProgress,
    /// All of them were taken.
    Taken,
}

impl TakenIds {
    /// Claims `id` for a push about to be taken; gives what already holds it instead.
    fn claim(&mut self, id: u64) -> Option<Taking> {
        if let Some(state) = self.states.get(&id) {
            return Some(*state);
        }
        self.states.insert(id, Taking::InProgress);
        self.order.push_back(id);
        while self.order.len() > REMEMBERED_IDS {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.states.remove(&oldest);
        }
        None
    }

    /// Settles a claimed push: taken, or released so that a retry takes it.
    fn settle(&mut self, id: u64, taken: bool) {
        if taken {
            if let Some(state) = self.states.get_mut(&id) {
                *state = Taking::Taken;
            }
        } else if self.states.remove(&id).is_some() {
            self.order.retain(|other| *other != id);
        }
    }
}

impl SourceEndpoint {
    /// Listens on `endpoint` for batches of `schema`, each push within `limits` (its
    /// body at most `limits.max_decoded_bytes` long, else 413).
    pub async fn bind(
        endpoint: &Endpoint,
        schema: SchemaRef,
        limits: IpcLimits,
    ) -> Result<Self, OperatorError> {
        let (sender, batches) = mpsc::channel(1);
        let max_body = usize::try_from(limits.max_decoded_bytes).unwrap_or(usize::MAX);
        let router = Router::new()
            .route(PATH_BATCHES, post(push))
            .layer(DefaultBodyLimit::max(max_body))
            .with_state(Arc::new(Shared {
                schema,
                limits,
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
                // Only the module's user (the owner of its private directory), the
                // runtime's own, or root may push.
                let listener = PeerCheckedListener::new(listener, path).map_err(|e| {
                    OperatorError::io(format!("cannot read the owner of {}", path.display()), e)
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
    let batches = match crate::operator::decode_answer(&body, &shared.limits) {
        Ok(batches) => batches,
        Err(error) => {
            let status = if error.is_over_limit() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return (status, format!("the push is refused: {error}")).into_response();
        }
    };
    let batches = match batches
        .iter()
        .map(|batch| crate::operator::conform(batch, &shared.schema))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(batches) => batches,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    if let Some(id) = batch_id {
        // Claimed before any batch is taken: a retry that arrives while the first try
        // is still being taken is told to wait, not taken a second time.
        match shared.taken.lock().expect("never poisoned").claim(id) {
            Some(Taking::Taken) => return StatusCode::OK.into_response(),
            Some(Taking::InProgress) => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "a push with this Weir-Batch-Id is being taken; send it again shortly",
                )
                    .into_response();
            }
            None => {}
        }
    }
    // Taken, and its id settled, on a task of its own: a module that hangs up mid-push
    // does not cancel it halfway, so the id says truly whether the whole push is in.
    let taking = tokio::spawn(async move {
        let mut taken = true;
        for batch in batches {
            let (took, answer) = oneshot::channel();
            if shared.batches.send((batch, took)).await.is_err() || answer.await != Ok(true) {
                taken = false;
                break;
            }
        }
        if let Some(id) = batch_id {
            shared
                .taken
                .lock()
                .expect("never poisoned")
                .settle(id, taken);
        }
        taken
    });
    if taking.await.unwrap_or(false) {
        StatusCode::OK.into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the pipeline is stopping").into_response()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::ipc::writer::StreamWriter;
    use weir_module_sdk::client::Client;
    use weir_module_sdk::encode_stream;

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]))
    }

    fn rows(n: i64) -> RecordBatch {
        RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from_iter_values(0..n))]).unwrap()
    }

    /// A pushed batch's answer, with the endpoint's side taking whatever arrives.
    async fn push_to(endpoint: &mut SourceEndpoint, client: &mut Client, body: Vec<u8>) -> u16 {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let push = client.post_batches(body.into(), id, 1, Duration::from_secs(10));
        let take = async {
            while let Some((_, taken)) = endpoint.next().await {
                let _ = taken.send(true);
            }
        };
        tokio::select! {
            answer = push => answer.unwrap().status.as_u16(),
            () = take => unreachable!("the endpoint stays open"),
        }
    }

    #[tokio::test]
    async fn pushes_past_the_limits_or_cut_off_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let socket = Endpoint::Unix(dir.path().join("runtime.sock"));
        let limits = IpcLimits {
            max_rows: 100,
            max_columns: 4,
            max_decoded_bytes: 64 << 10,
            allow_zstd: false,
            require_end_marker: true,
        };
        let mut endpoint = SourceEndpoint::bind(&socket, schema(), limits)
            .await
            .unwrap();
        let mut client = Client::new(socket);

        let whole = |n| encode_stream(&schema(), &[rows(n)]).unwrap();
        assert_eq!(push_to(&mut endpoint, &mut client, whole(100)).await, 200);
        // An empty body is a push of nothing.
        assert_eq!(push_to(&mut endpoint, &mut client, Vec::new()).await, 200);
        // Too many rows, and a body past max_decoded_bytes before it is even decoded.
        assert_eq!(push_to(&mut endpoint, &mut client, whole(101)).await, 413);
        let large: Vec<u8> = vec![0; 65 << 10];
        assert_eq!(push_to(&mut endpoint, &mut client, large).await, 413);
        // A stream without its end-of-stream marker (cut off between batches).
        let mut unfinished = Vec::new();
        {
            let mut writer = StreamWriter::try_new(&mut unfinished, &schema()).unwrap();
            writer.write(&rows(3)).unwrap();
            writer.flush().unwrap();
        }
        assert_eq!(push_to(&mut endpoint, &mut client, unfinished).await, 400);
        endpoint.close().await;
    }

    #[tokio::test]
    async fn a_push_is_taken_once_even_when_retried_while_in_progress_or_hung_up_on() {
        let dir = tempfile::tempdir().unwrap();
        let socket = Endpoint::Unix(dir.path().join("runtime.sock"));
        let mut endpoint = SourceEndpoint::bind(&socket, schema(), IpcLimits::generous())
            .await
            .unwrap();
        let body = || Bytes::from(encode_stream(&schema(), &[rows(2), rows(3)]).unwrap());
        // The module gives up waiting (hangs up) while the pipeline is slow to take the
        // push: it is taken whole all the same.
        let mut impatient = Client::new(socket.clone());
        let gave_up = impatient
            .post_batches(body(), 7, 1, Duration::from_millis(100))
            .await;
        assert!(gave_up.is_err(), "the pipeline has not taken it yet");
        // Its retry while the first try is still being taken is told to wait.
        let mut retrying = Client::new(socket.clone());
        let answer = retrying
            .post_batches(body(), 7, 2, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(answer.status.as_u16(), 503);
        let mut taken = 0;
        for _ in 0..2 {
            let (batch, took) = endpoint.next().await.unwrap();
            taken += batch.num_rows();
            took.send(true).unwrap();
        }
        assert_eq!(taken, 5);
        // Once taken, the same id is answered without being taken again.
        let answer = loop {
            let answer = retrying
                .post_batches(body(), 7, 3, Duration::from_secs(10))
                .await
                .unwrap();
            if answer.status.as_u16() != 503 {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(answer.status.as_u16(), 200);
        let nothing_more = tokio::time::timeout(Duration::from_millis(200), endpoint.next()).await;
        assert!(nothing_more.is_err(), "taken twice");
        endpoint.close().await;
    }
}
