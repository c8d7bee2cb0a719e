//! The client side of the local API, for `weir query`, `weir status` and `weir tap`.
//!
//! Plain HTTP/1.1 on hyper, which the server side already brings: the API is served on
//! the device itself, so the client needs no TLS and no connection pool, and a build
//! without the `hub` feature carries no second HTTP stack.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, header};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;

/// What [`path_segment`] leaves as it is: letters, digits, `-`, `_` and `~`. A dot is
/// encoded too, so no name can be the segment `..`.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'~');

/// Where the running runtime's API is, and how to get in.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// The local API address of the running `weir run` or `weir agent` (its --metrics-addr).
    #[arg(long, env = "WEIR_METRICS_ADDR", default_value = super::DEFAULT_API_ADDR, value_name = "HOST:PORT")]
    pub addr: SocketAddr,

    /// The runtime's API token, when it was started with one.
    #[arg(
        long,
        env = "WEIR_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

/// A client of one runtime's local API. Each call opens its own connection.
pub struct LocalClient {
    addr: SocketAddr,
    token: Option<String>,
}

/// A successful answer, its body still to be read.
pub type Answer = Response<Incoming>;

impl LocalClient {
    /// A client for the runtime `args` point at.
    pub fn new(args: &ClientArgs) -> Self {
        LocalClient {
            addr: args.addr,
            token: args.token.clone(),
        }
    }

    /// Sends `method` to `path` (already encoded, see [`path_segment`] and
    /// [`query_string`]) with `json` as its body, and returns the answer when it succeeded;
    /// otherwise says why, with the runtime's own message.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        json: Option<Vec<u8>>,
    ) -> Result<Answer, String> {
        let unreachable = |error: &dyn std::fmt::Display| {
            format!(
                "cannot reach weir at {}: {error} (is `weir run` or `weir agent` running \
                 there? see its --metrics-addr)",
                self.addr
            )
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            // The address as given: on loopback the API answers only a loopback `Host`.
            .header(header::HOST, self.addr.to_string());
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if json.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(json.unwrap_or_default())))
            .map_err(|error| format!("cannot ask weir for {path:?}: {error}"))?;
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|error| unreachable(&error))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| unreachable(&error))?;
        // The connection is driven beside the caller; it ends when the answer is read or
        // dropped.
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|error| unreachable(&error))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = match read_body(response).await {
            Ok(body) => String::from_utf8_lossy(&body).trim().to_owned(),
            Err(error) => format!("(the answer was cut off: {error})"),
        };
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|body| body.get("error")?.as_str().map(str::to_owned))
            .unwrap_or(text);
        Err(format!(
            "weir at {} answered {status}: {message}",
            self.addr
        ))
    }

    /// GETs `path` and reads its JSON answer.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let answer = self.send(Method::GET, path, None).await?;
        let body = read_body(answer)
            .await
            .map_err(|error| format!("weir at {} cut off its answer: {error}", self.addr))?;
        serde_json::from_slice(&body).map_err(|e| {
            format!(
                "weir at {} answered {path} with something else: {e}",
                self.addr
            )
        })
    }
}

/// The whole body of `answer`.
pub async fn read_body(answer: Answer) -> Result<Bytes, hyper::Error> {
    Ok(answer.into_body().collect().await?.to_bytes())
}

/// The next piece of `answer`'s body as it arrives; `None` at its end.
pub async fn next_chunk(answer: &mut Answer) -> Result<Option<Bytes>, hyper::Error> {
    while let Some(frame) = answer.body_mut().frame().await {
        // Trailers carry nothing the commands read.
        if let Ok(data) = frame?.into_data() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// `value` as one path segment (or query value), percent-encoded outside [`SEGMENT`].
pub fn path_segment(value: &str) -> String {
    utf8_percent_encode(value, SEGMENT).to_string()
}

/// `pairs` as a query string, with its leading `?` (empty for no pairs).
pub fn query_string(pairs: &[(&str, String)]) -> String {
    let mut text = String::new();
    for (index, (name, value)) in pairs.iter().enumerate() {
        text.push(if index == 0 { '?' } else { '&' });
        text.push_str(&path_segment(name));
        text.push('=');
        text.push_str(&path_segment(value));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_so_they_cannot_change_the_path_or_the_query() {
        assert_eq!(path_segment("raw_readings-1"), "raw_readings-1");
        assert_eq!(path_segment("a/../b?x=1&y"), "a%2F%2E%2E%2Fb%3Fx%3D1%26y");
        assert_eq!(
            query_string(&[("rate", "10".into()), ("pipeline", "plant a&b".into())]),
            "?rate=10&pipeline=plant%20a%26b"
        );
        assert_eq!(query_string(&[]), "");
    }
}
