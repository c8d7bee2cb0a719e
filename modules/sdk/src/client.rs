//! The protocol's HTTP/1.1 client, over a Unix socket or TCP: the runtime calls modules
//! with it, and source modules push to the runtime with it.
//!
//! One [`Client`] holds one keep-alive connection and sends one request at a time on
//! it; a broken connection is dropped and the next request dials again.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::{
    ARROW_STREAM, Endpoint, HEADER_ATTEMPT, HEADER_BATCH_ID, HEADER_TIMEOUT_MS, PATH_BATCHES,
    PATH_HEALTH,
};

/// A request could not be made or was not answered.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The peer could not be reached, or the connection broke.
    #[error("{0}")]
    Unreachable(String),
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer's body is larger than the client takes.
    #[error("the answer is larger than the {limit} bytes allowed")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
}

/// The largest answer body a [`Client`] reads unless told otherwise.
pub const DEFAULT_MAX_ANSWER_BYTES: usize = 64 << 20;

/// An answer: its status and whole body.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
}

impl Answer {
    /// The body as text, for error messages (lossy, trimmed).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_owned()
    }
}

/// A keep-alive HTTP/1.1 connection to one endpoint.
pub struct Client {
    endpoint: Endpoint,
    sender: Option<SendRequest<Full<Bytes>>>,
    max_answer_bytes: usize,
}

impl Client {
    /// A client of `endpoint` that reads answers of up to [`DEFAULT_MAX_ANSWER_BYTES`];
    /// it dials on the first request.
    pub fn new(endpoint: Endpoint) -> Self {
        Client {
            endpoint,
            sender: None,
            max_answer_bytes: DEFAULT_MAX_ANSWER_BYTES,
        }
    }

    /// The same client, reading answers of up to `bytes`: a larger one is
    /// [`ClientError::TooLarge`], and no more of it is read.
    pub fn with_max_answer_bytes(mut self, bytes: usize) -> Self {
        self.max_answer_bytes = bytes;
        self
    }

    /// Where it sends.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// `GET /v1/health`.
    pub async fn health(&mut self, timeout: Duration) -> Result<Answer, ClientError> {
        self.send(Method::GET, PATH_HEALTH, &[], Bytes::new(), timeout)
            .await
    }

    /// `POST /v1/batches` with an IPC stream `body`.
    pub async fn post_batches(
        &mut self,
        body: Bytes,
        batch_id: u64,
        attempt: u32,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let headers = [
            (HEADER_BATCH_ID, batch_id.to_string()),
            (HEADER_ATTEMPT, attempt.to_string()),
            (HEADER_TIMEOUT_MS, timeout.as_millis().to_string()),
        ];
        self.send(Method::POST, PATH_BATCHES, &headers, body, timeout)
            .await
    }

    /// Sends one request and reads the whole answer within `timeout`. On any failure
    /// the connection is dropped, so a half-read answer never confuses the next one.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let exchange = self.exchange(method, path, headers, body);
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => {
                self.sender = None;
                Err(error)
            }
            Err(_) => {
                self.sender = None;
                Err(ClientError::Timeout(timeout))
            }
        }
    }

    async fn exchange(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Answer, ClientError> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "weir")
            .header(hyper::header::CONTENT_TYPE, ARROW_STREAM);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|error| ClientError::Unreachable(format!("bad request: {error}")))?;
        let endpoint = self.endpoint.clone();
        let broken = |error: hyper::Error| ClientError::Unreachable(format!("{endpoint}: {error}"));
        let sender = self.connection().await?;
        sender.ready().await.map_err(broken)?;
        let response = sender.send_request(request).await.map_err(broken)?;
        let status = response.status();
        let limit = self.max_answer_bytes;
        let body = http_body_util::Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<http_body_util::LengthLimitError>() {
                    ClientError::TooLarge { limit }
                } else {
                    ClientError::Unreachable(format!("{endpoint}: {error}"))
                }
            })?
            .to_bytes();
        Ok(Answer { status, body })
    }

    /// The open connection, dialling when there is none.
    async fn connection(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, ClientError> {
        if self.sender.as_ref().is_some_and(|s| s.is_closed()) {
            self.sender = None;
        }
        if self.sender.is_none() {
            let endpoint = &self.endpoint;
            let dial_error =
                |error: std::io::Error| ClientError::Unreachable(format!("{endpoint}: {error}"));
            let sender = match &self.endpoint {
                Endpoint::Unix(path) => {
                    let stream = tokio::net::UnixStream::connect(path)
                        .await
                        .map_err(dial_error)?;
                    handshake(stream).await?
                }
                Endpoint::Tcp(addr) => {
                    let stream = tokio::net::TcpStream::connect(addr)
                        .await
                        .map_err(dial_error)?;
                    // Small answers must not wait for Nagle's timer.
                    stream.set_nodelay(true).map_err(dial_error)?;
                    handshake(stream).await?
                }
            };
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("a connection was just made"))
    }
}

async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| ClientError::Unreachable(format!("handshake: {error}")))?;
    // The connection task ends when the peer closes or the sender is dropped.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A peer that answers every request on one connection with `body`.
    async fn answering(body: Vec<u8>) -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
        });
        Endpoint::Tcp(addr)
    }

    #[tokio::test]
    async fn an_answer_past_the_limit_is_refused() {
        let timeout = Duration::from_secs(10);
        let mut small = Client::new(answering(vec![7; 2048]).await).with_max_answer_bytes(2048);
        let answer = small.health(timeout).await.unwrap();
        assert_eq!(answer.body.len(), 2048);
        let mut small = Client::new(answering(vec![7; 2049]).await).with_max_answer_bytes(2048);
        let error = small.health(timeout).await.unwrap_err();
        assert!(
            matches!(error, ClientError::TooLarge { limit: 2048 }),
            "{error}"
        );
    }
}
