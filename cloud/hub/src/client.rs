//! A client of the hub's API, for the `weir-hub` CLI, `weir agent` and the tests.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use weir_query::access::is_loopback_name;

use crate::identity::{DeviceKey, device_resource, sign_token};
use crate::protocol::{
    ANSWER_STATUS_HEADER, APPENDED_MS_HEADER, CreatedDevice, DeploymentDevice, DeploymentSpec,
    DeploymentView, DesiredState, DeviceKeys, DevicePatch, DeviceView, DiagnosticView, ErrorBody,
    FleetStatus, ForwardedQuery, IngestAnswer, NewDevice, Report,
};

/// How long a device token the client signs is valid.
const DEVICE_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// How long a request may take, long polls aside (they get their wait on top).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How the client proves who it is. Its debug output shows no token or key.
#[derive(Clone)]
pub enum Credentials {
    /// The admin token.
    Admin(String),
    /// A device's id and one of its keys: each request carries a fresh token.
    Device {
        /// The device id.
        id: String,
        /// Its key.
        key: DeviceKey,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Admin(_) => f.write_str("Admin(..)"),
            Credentials::Device { id, .. } => write!(f, "Device {{ id: {id:?}, key: .. }}"),
        }
    }
}

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hub could not be reached.
    #[error("cannot reach the hub at {url}: {message}")]
    Unreachable {
        /// The hub's URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The hub answered with an error.
    #[error("the hub refused: {message} (HTTP {status})")]
    Refused {
        /// The status code.
        status: u16,
        /// The hub's message.
        message: String,
        /// For a refused deployment: each problem.
        diagnostics: Vec<DiagnosticView>,
    },
    /// The answer could not be read.
    #[error("the hub's answer cannot be read: {0}")]
    BadAnswer(String),
    /// The client could not be set up.
    #[error("{0}")]
    Setup(String),
    /// Plain HTTP to a hub that is not on this machine, without `--insecure-http`: the
    /// device keys, admin token and fleet data would cross the network in clear.
    #[error(
        "refusing plain HTTP to the hub at {url}: it is not on this machine, so tokens and data would cross the network unencrypted; use https://, or pass --insecure-http to accept that"
    )]
    InsecureHttp {
        /// The hub's URL.
        url: String,
    },
}

/// Whether a client may talk to the hub at `url` over it: HTTPS always, plain HTTP to a
/// loopback address (or `localhost`) always, and plain HTTP elsewhere only when
/// `insecure_http` says the user accepts it. A URL that does not parse is left for the
/// HTTP client to refuse with its own message.
pub fn check_transport(url: &str, insecure_http: bool) -> Result<(), ClientError> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Ok(());
    };
    if parsed.scheme() != "http" || insecure_http {
        return Ok(());
    }
    // An IPv6 host comes in brackets.
    let host = parsed.host_str().unwrap_or_default();
    if is_loopback_name(host.trim_start_matches('[').trim_end_matches(']')) {
        Ok(())
    } else {
        Err(ClientError::InsecureHttp {
            url: url.to_owned(),
        })
    }
}

impl ClientError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An HTTP client that speaks TLS through rustls (ring) with the system's trusted roots,
/// and `ca_file` (PEM) trusted as well when given; plain HTTP needs no set-up beyond it.
pub fn http_client(ca_file: Option<&Path>) -> Result<reqwest::Client, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system root rustls cannot use is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                ClientError::Setup(format!(
                    "cannot read CA certificates from {}: {e}",
                    path.display()
                ))
            })?;
        for cert in certs {
            roots.add(cert).map_err(|e| {
                ClientError::Setup(format!("bad CA certificate in {}: {e}", path.display()))
            })?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Setup(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| ClientError::Setup(format!("cannot set up the HTTP client: {e}")))
}

/// A client of one hub.
#[derive(Clone, Debug)]
pub struct HubClient {
    http: reqwest::Client,
    base: String,
    credentials: Credentials,
    /// How far the hub's clock is ahead of this machine's, in seconds, as its last
    /// answer's `Date` said: device tokens are signed by the hub's clock, so a device
    /// whose clock is not set yet (booted at 1970, before NTP) still gets in.
    clock_offset: Arc<AtomicI64>,
}

impl HubClient {
    /// A client of the hub at `url` (`https://…`, or `http://…` on this machine). For
    /// HTTPS the system's trusted roots are used, and `ca_file` (PEM) is trusted as well
    /// when given.
    pub fn new(
        url: &str,
        credentials: Credentials,
        ca_file: Option<&Path>,
    ) -> Result<HubClient, ClientError> {
        HubClient::with_transport(url, credentials, ca_file, false)
    }

    /// As [`HubClient::new`]; with `insecure_http` (what `--insecure-http` asks for),
    /// plain HTTP to a hub on another machine is accepted too.
    pub fn with_transport(
        url: &str,
        credentials: Credentials,
        ca_file: Option<&Path>,
        insecure_http: bool,
    ) -> Result<HubClient, ClientError> {
        check_transport(url, insecure_http)?;
        let http = http_client(ca_file)?;
        Ok(HubClient {
            http,
            base: url.trim_end_matches('/').to_owned(),
            credentials,
            clock_offset: Arc::default(),
        })
    }

    /// The same hub and connection pool, other credentials: one process acting for many
    /// devices (a simulator, a gateway) shares its connections.
    pub fn with_credentials(&self, credentials: Credentials) -> HubClient {
        HubClient {
            http: self.http.clone(),
            base: self.base.clone(),
            credentials,
            clock_offset: self.clock_offset.clone(),
        }
    }

    /// The hub's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn authorization(&self) -> String {
        match &self.credentials {
            Credentials::Admin(token) => format!("Bearer {token}"),
            Credentials::Device { id, key } => {
                let hub_now = crate::protocol::now_secs()
                    .saturating_add_signed(self.clock_offset.load(Ordering::Relaxed));
                let expiry = hub_now + DEVICE_TOKEN_LIFETIME.as_secs();
                sign_token(&device_resource(id), key, expiry)
            }
        }
    }

    /// Sends the request `build` makes (signing it as it builds). Refused for a token
    /// signed by a clock far off the hub's, it is built and sent once more, signed by the
    /// hub's clock as the refusal's `Date` gave it.
    async fn send_signed(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let mut retried = false;
        loop {
            let response = build().send().await.map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                message: error_chain(&e),
            })?;
            if self.learn_clock(&response)
                && response.status() == StatusCode::UNAUTHORIZED
                && !retried
            {
                retried = true;
                continue;
            }
            return Ok(response);
        }
    }

    /// Takes the hub's clock from `response`'s `Date`; gives whether it moved by more
    /// than the skew tokens allow (a token signed before may have been refused for it).
    fn learn_clock(&self, response: &reqwest::Response) -> bool {
        let Some(hub_now) = response
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|date| date.to_str().ok())
            .and_then(|date| httpdate::parse_http_date(date).ok())
            .and_then(|date| date.duration_since(std::time::UNIX_EPOCH).ok())
        else {
            return false;
        };
        let offset = i64::try_from(hub_now.as_secs()).unwrap_or(i64::MAX)
            - i64::try_from(crate::protocol::now_secs()).unwrap_or(i64::MAX);
        let before = self.clock_offset.swap(offset, Ordering::Relaxed);
        if offset.abs_diff(0) > crate::identity::TOKEN_CLOCK_SKEW && before == 0 {
            tracing::warn!(
                "this machine's clock is {offset} s off the hub's at {}: signing by the \
                 hub's (is NTP running?)",
                self.base
            );
        }
        offset.abs_diff(before) > crate::identity::TOKEN_CLOCK_SKEW
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&(impl Serialize + ?Sized)>,
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}/api/v1{path}", self.base);
        let response = self
            .send_signed(|| {
                let mut request = self
                    .http
                    .request(method.clone(), &url)
                    .header(reqwest::header::AUTHORIZATION, self.authorization())
                    .timeout(timeout);
                if !query.is_empty() {
                    request = request.query(query);
                }
                if let Some(body) = body {
                    request = request.json(body);
                }
                request
            })
            .await?;
        let status = response.status();
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        // A device's own error, relayed for a forwarded query, is `{"error": "…"}`.
        let relayed = || {
            serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|body| body.get("error")?.as_str().map(str::to_owned))
        };
        let (message, diagnostics) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => (body.error.message, body.error.diagnostics),
            Err(_) if relayed().is_some() => (relayed().unwrap_or_default(), Vec::new()),
            Err(_) if text.trim().is_empty() => (
                status.canonical_reason().unwrap_or("error").to_owned(),
                Vec::new(),
            ),
            Err(_) => (text.trim().to_owned(), Vec::new()),
        };
        Err(ClientError::Refused {
            status: status.as_u16(),
            message,
            diagnostics,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let response = self
            .send(method, path, query, body, REQUEST_TIMEOUT)
            .await?;
        response
            .json()
            .await
            .map_err(|e| ClientError::BadAnswer(error_chain(&e)))
    }

    async fn call_empty(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<(), ClientError> {
        self.send(method, path, &[], body, REQUEST_TIMEOUT)
            .await
            .map(drop)
    }

    // --- admin ------------------------------------------------------------------------

    /// Devices, optionally only those matching a target condition and having a tag
    /// (`NAME=VALUE`, or `NAME` for any value).
    pub async fn devices(
        &self,
        condition: Option<&str>,
        tag: Option<&str>,
    ) -> Result<Vec<DeviceView>, ClientError> {
        let query: Vec<(&str, String)> = [("condition", condition), ("tag", tag)]
            .into_iter()
            .filter_map(|(name, value)| Some((name, value?.to_owned())))
            .collect();
        self.call(Method::GET, "/devices", &query, None::<&()>)
            .await
    }

    /// Registers a device.
    pub async fn create_device(&self, device: &NewDevice) -> Result<CreatedDevice, ClientError> {
        self.call(Method::POST, "/devices", &[], Some(device)).await
    }

    /// One device.
    pub async fn device(&self, id: &str) -> Result<DeviceView, ClientError> {
        self.call(Method::GET, &format!("/devices/{id}"), &[], None::<&()>)
            .await
    }

    /// Changes a device's tags or whether it is enabled.
    pub async fn patch_device(
        &self,
        id: &str,
        patch: &DevicePatch,
    ) -> Result<DeviceView, ClientError> {
        self.call(Method::PATCH, &format!("/devices/{id}"), &[], Some(patch))
            .await
    }

    /// Removes a device.
    pub async fn delete_device(&self, id: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &format!("/devices/{id}"), None::<&()>)
            .await
    }

    /// A device's keys.
    pub async fn device_keys(&self, id: &str) -> Result<DeviceKeys, ClientError> {
        self.call(
            Method::GET,
            &format!("/devices/{id}/keys"),
            &[],
            None::<&()>,
        )
        .await
    }

    /// Replaces one of a device's keys (`primary` or `secondary`).
    pub async fn rotate_key(&self, id: &str, slot: &str) -> Result<DeviceKeys, ClientError> {
        let path = format!("/devices/{id}/keys/{slot}/rotate");
        self.call(Method::POST, &path, &[], None::<&()>).await
    }

    /// Every deployment.
    pub async fn deployments(&self) -> Result<Vec<DeploymentView>, ClientError> {
        self.call(Method::GET, "/deployments", &[], None::<&()>)
            .await
    }

    /// One deployment.
    pub async fn deployment(&self, name: &str) -> Result<DeploymentView, ClientError> {
        self.call(
            Method::GET,
            &format!("/deployments/{name}"),
            &[],
            None::<&()>,
        )
        .await
    }

    /// Creates or updates a deployment.
    pub async fn put_deployment(
        &self,
        name: &str,
        spec: &DeploymentSpec,
    ) -> Result<DeploymentView, ClientError> {
        self.call(
            Method::PUT,
            &format!("/deployments/{name}"),
            &[],
            Some(spec),
        )
        .await
    }

    /// Removes a deployment.
    pub async fn delete_deployment(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &format!("/deployments/{name}"), None::<&()>)
            .await
    }

    /// The devices a deployment targets, with their reports.
    pub async fn deployment_devices(
        &self,
        name: &str,
    ) -> Result<Vec<DeploymentDevice>, ClientError> {
        let path = format!("/deployments/{name}/devices");
        self.call(Method::GET, &path, &[], None::<&()>).await
    }

    /// The fleet at a glance.
    pub async fn status(&self) -> Result<FleetStatus, ClientError> {
        self.call(Method::GET, "/status", &[], None::<&()>).await
    }

    /// Runs `request` on device `id` through the hub, and returns the device's answer.
    /// With no timeout named, the hub waits up to 5 minutes for the device.
    pub async fn query_device(
        &self,
        id: &str,
        request: &weir_query::QueryRequest,
    ) -> Result<QueryAnswer, ClientError> {
        let path = format!("/devices/{id}/query");
        self.post_query(&path, request, Duration::from_secs(300))
            .await
    }

    /// Runs read-only SQL over the data the fleet shipped. With no timeout named, the
    /// hub's own `--query-timeout` bounds it, and the client waits up to an hour for it
    /// rather than give up first.
    pub async fn query(
        &self,
        request: &weir_query::QueryRequest,
    ) -> Result<QueryAnswer, ClientError> {
        self.post_query("/query", request, Duration::from_secs(3600))
            .await
    }

    /// POSTs `request` to `path`, waiting for its timeout (or `unnamed` without one) on
    /// top of the usual request timeout.
    async fn post_query(
        &self,
        path: &str,
        request: &weir_query::QueryRequest,
        unnamed: Duration,
    ) -> Result<QueryAnswer, ClientError> {
        let query_timeout = request
            .timeout
            .as_deref()
            .and_then(|text| humantime::parse_duration(text.trim()).ok())
            .unwrap_or(unnamed);
        let response = self
            .send(
                Method::POST,
                path,
                &[],
                Some(request),
                REQUEST_TIMEOUT.saturating_add(query_timeout),
            )
            .await?;
        query_answer(response).await
    }

    // --- device -----------------------------------------------------------------------

    /// Ships one stored batch of device `id` (zstd Arrow IPC as its outbox holds it).
    pub async fn ship(
        &self,
        id: &str,
        (pipeline, sink, seq): (&str, &str, u64),
        appended_ms: i64,
        payload: Vec<u8>,
    ) -> Result<IngestAnswer, ClientError> {
        let path = format!("/devices/{id}/data/{pipeline}/{sink}/{seq}");
        let headers = [(APPENDED_MS_HEADER, appended_ms.to_string())];
        self.post_bytes(&path, &headers, payload)
            .await?
            .json()
            .await
            .map_err(|e| ClientError::BadAnswer(error_chain(&e)))
    }

    /// The queries forwarded to device `id`, waiting up to `wait` for one; empty when
    /// none came.
    pub async fn forwarded_queries(
        &self,
        id: &str,
        wait: Duration,
    ) -> Result<Vec<ForwardedQuery>, ClientError> {
        let response = self
            .send(
                Method::GET,
                &format!("/devices/{id}/queries"),
                &[("wait", wait.as_secs().to_string())],
                None::<&()>,
                REQUEST_TIMEOUT + wait,
            )
            .await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(Vec::new());
        }
        response
            .json()
            .await
            .map_err(|e| ClientError::BadAnswer(error_chain(&e)))
    }

    /// Sends device `id`'s answer to forwarded query `query`: the HTTP status, media
    /// type and body its local API answered with.
    pub async fn answer_query(
        &self,
        id: &str,
        query: &str,
        status: u16,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<(), ClientError> {
        let mut all: Vec<(&str, String)> = vec![(ANSWER_STATUS_HEADER, status.to_string())];
        all.extend(headers.iter().map(|(name, value)| (*name, value.clone())));
        let path = format!("/devices/{id}/queries/{query}/answer");
        self.post_bytes(&path, &all, body).await.map(drop)
    }

    /// POSTs `body` as it is to `path` under `/api/v1` with `headers`; a refusal is an
    /// error with the hub's text.
    async fn post_bytes(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<reqwest::Response, ClientError> {
        let body = bytes::Bytes::from(body);
        let response = self
            .send_signed(|| {
                let mut request = self
                    .http
                    .post(format!("{}/api/v1{path}", self.base))
                    .header(reqwest::header::AUTHORIZATION, self.authorization())
                    .timeout(REQUEST_TIMEOUT)
                    .body(body.clone());
                for (name, value) in headers {
                    request = request.header(*name, value);
                }
                request
            })
            .await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        Err(ClientError::Refused {
            status: status.as_u16(),
            message: response.text().await.unwrap_or_default(),
            diagnostics: Vec::new(),
        })
    }

    /// Device `id`'s desired state. With the `etag` it has, waits up to `wait` for a
    /// change, and answers `None` when there was none.
    pub async fn desired(
        &self,
        id: &str,
        etag: Option<&str>,
        wait: Duration,
    ) -> Result<Option<DesiredState>, ClientError> {
        let mut query = vec![("wait", wait.as_secs().to_string())];
        if let Some(etag) = etag {
            query.push(("etag", etag.to_owned()));
        }
        let response = self
            .send(
                Method::GET,
                &format!("/devices/{id}/desired"),
                &query,
                None::<&()>,
                REQUEST_TIMEOUT + wait,
            )
            .await?;
        if response.status() == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        response
            .json()
            .await
            .map(Some)
            .map_err(|e| ClientError::BadAnswer(error_chain(&e)))
    }

    /// Sends device `id`'s report.
    pub async fn report(&self, id: &str, report: &Report) -> Result<(), ClientError> {
        self.call_empty(Method::POST, &format!("/devices/{id}/report"), Some(report))
            .await
    }

    /// Sends device `id`'s heartbeat.
    pub async fn heartbeat(&self, id: &str) -> Result<(), ClientError> {
        self.call_empty(
            Method::POST,
            &format!("/devices/{id}/heartbeat"),
            None::<&()>,
        )
        .await
    }
}

/// A query's answer as the hub sent it.
async fn query_answer(response: reqwest::Response) -> Result<QueryAnswer, ClientError> {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(reqwest::header::CONTENT_TYPE.as_str()).unwrap_or_default();
    let truncated = header(weir_query::TRUNCATED_HEADER).as_deref() == Some("true");
    let body = response
        .bytes()
        .await
        .map_err(|e| ClientError::BadAnswer(error_chain(&e)))?;
    Ok(QueryAnswer {
        content_type,
        truncated,
        body: body.to_vec(),
    })
}

/// A query's answer: the fleet's, or a device's to a forwarded query.
#[derive(Clone, Debug)]
pub struct QueryAnswer {
    /// Its media type: JSON, CSV or Arrow IPC, as asked.
    pub content_type: String,
    /// Whether the rows were cut at the device's row limit.
    pub truncated: bool,
    /// The answer.
    pub body: Vec<u8>,
}

/// An error with its causes, `a: b: c`: reqwest's own message alone says little.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod transport_tests {
    use super::*;

    #[test]
    fn plain_http_is_refused_beyond_this_machine_unless_accepted() {
        for url in [
            "https://hub.example.com",
            "http://127.0.0.1:8700",
            "http://127.3.4.5",
            "http://[::1]:8700/",
            "http://localhost:8700",
            "http://LOCALHOST.",
            "http://hub.localhost",
        ] {
            assert!(check_transport(url, false).is_ok(), "{url}");
        }
        for url in [
            "http://hub.example.com",
            "http://10.0.0.5:8700",
            "http://[2001:db8::1]",
            "http://localhost.example.com",
        ] {
            let error = check_transport(url, false).unwrap_err().to_string();
            assert!(
                error.contains(url) && error.contains("--insecure-http"),
                "{error}"
            );
            assert!(check_transport(url, true).is_ok(), "{url}");
        }
        let refused = HubClient::new("http://10.0.0.5:8700", Credentials::Admin("t".into()), None);
        assert!(matches!(refused, Err(ClientError::InsecureHttp { .. })));
        assert!(
            HubClient::with_transport(
                "http://10.0.0.5:8700",
                Credentials::Admin("t".into()),
                None,
                true
            )
            .is_ok()
        );
    }
}

#[cfg(test)]
mod clock_tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The `se` (expiry) of the device token in a raw request.
    fn token_expiry(request: &str) -> u64 {
        let header = request
            .lines()
            .find(|line| line.to_ascii_lowercase().starts_with("authorization:"))
            .expect("an Authorization header");
        let se = header.split("se=").nth(1).expect("an expiry");
        se.split('&')
            .next()
            .unwrap()
            .trim()
            .parse()
            .expect("digits")
    }

    #[tokio::test]
    async fn a_token_refused_for_a_clock_far_off_is_signed_again_by_the_hubs() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A hub whose clock reads a day ahead of this machine's (as a device booted at
        // 1970 would see any hub): it refuses a token that has expired by its clock.
        let hub_now = crate::protocol::now_secs() + 86_400;
        let server = tokio::spawn(async move {
            let date =
                httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(hub_now));
            let mut expiries = Vec::new();
            for _ in 0..2 {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = vec![0u8; 8192];
                let read = stream.read(&mut request).await.unwrap();
                let expiry = token_expiry(&String::from_utf8_lossy(&request[..read]));
                expiries.push(expiry);
                let status = if expiry <= hub_now {
                    "401 Unauthorized"
                } else {
                    "204 No Content"
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ndate: {date}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                stream.write_all(answer.as_bytes()).await.unwrap();
            }
            expiries
        });
        let key = DeviceKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        let client = HubClient::new(
            &format!("http://{addr}"),
            Credentials::Device {
                id: "edge-1".into(),
                key,
            },
            None,
        )
        .unwrap();
        client
            .heartbeat("edge-1")
            .await
            .expect("signed again by the hub's clock");
        let expiries = server.await.unwrap();
        assert!(expiries[0] <= hub_now, "{expiries:?}");
        assert!(expiries[1] > hub_now, "{expiries:?}");
    }
}
