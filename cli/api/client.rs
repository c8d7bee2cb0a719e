//! The client side of the local API, for `weir query`, `weir status` and `weir tap`.

use std::net::SocketAddr;

use serde::de::DeserializeOwned;

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

/// A client of one runtime's local API.
pub struct LocalClient {
    http: reqwest::Client,
    addr: SocketAddr,
    token: Option<String>,
}

impl LocalClient {
    /// A client for the runtime `args` point at.
    pub fn new(args: &ClientArgs) -> Result<Self, String> {
        let http = weir_hub::client::http_client(None).map_err(|e| e.to_string())?;
        Ok(LocalClient {
            http,
            addr: args.addr,
            token: args.token.clone(),
        })
    }

    /// A request to `path` on the runtime, with the token when there is one.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self
            .http
            .request(method, format!("http://{}{path}", self.addr));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Sends `request` and returns the answer when it succeeded; otherwise says why,
    /// with the runtime's own message.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, String> {
        let response = request.send().await.map_err(|e| {
            format!(
                "cannot reach weir at {}: {} (is `weir run` or `weir agent` running there? \
                 see its --metrics-addr)",
                self.addr,
                weir_hub::client::error_chain(&e)
            )
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
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
        let response = self.send(self.request(reqwest::Method::GET, path)).await?;
        response.json().await.map_err(|e| {
            format!(
                "weir at {} answered {path} with something else: {e}",
                self.addr
            )
        })
    }
}
