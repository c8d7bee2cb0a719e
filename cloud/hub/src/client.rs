//! A client of the hub's API, for the `weir-hub` CLI, `weir agent` and the tests.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::identity::{DeviceKey, device_resource, sign_token};
use crate::protocol::{
    CreatedDevice, DeploymentDevice, DeploymentSpec, DeploymentView, DesiredState, DeviceKeys,
    DevicePatch, DeviceView, DiagnosticView, ErrorBody, FleetStatus, NewDevice, Report,
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

/// A client of one hub.
#[derive(Clone, Debug)]
pub struct HubClient {
    http: reqwest::Client,
    base: String,
    credentials: Credentials,
}

impl HubClient {
    /// A client of the hub at `url` (`http://…` or `https://…`). For HTTPS the system's
    /// trusted roots are used, and `ca_file` (PEM) is trusted as well when given.
    pub fn new(
        url: &str,
        credentials: Credentials,
        ca_file: Option<&Path>,
    ) -> Result<HubClient, ClientError> {
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
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ClientError::Setup(format!("cannot set up the HTTP client: {e}")))?;
        Ok(HubClient {
            http,
            base: url.trim_end_matches('/').to_owned(),
            credentials,
        })
    }

    /// The same hub and connection pool, other credentials: one process acting for many
    /// devices (a simulator, a gateway) shares its connections.
    pub fn with_credentials(&self, credentials: Credentials) -> HubClient {
        HubClient {
            http: self.http.clone(),
            base: self.base.clone(),
            credentials,
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
                let expiry = crate::protocol::now_secs() + DEVICE_TOKEN_LIFETIME.as_secs();
                sign_token(&device_resource(id), key, expiry)
            }
        }
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
        let mut request = self
            .http
            .request(method, &url)
            .header(reqwest::header::AUTHORIZATION, self.authorization())
            .timeout(timeout);
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            message: error_chain(&e),
        })?;
        let status = response.status();
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let (message, diagnostics) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => (body.error.message, body.error.diagnostics),
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

    // --- device -----------------------------------------------------------------------

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

/// An error with its causes, `a: b: c`: reqwest's own message alone says little.
fn error_chain(error: &dyn std::error::Error) -> String {
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
