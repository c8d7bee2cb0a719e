//! Serving the hub: HTTP, or HTTPS with rustls from PEM certificate and key files, with
//! the background work started beside it and a graceful stop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::task::JoinHandle;

use crate::error::StartError;
use crate::hub::Hub;

/// How long requests in flight (long polls among them) get to finish on a stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A certificate chain and its private key, PEM files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A hub serving requests.
pub struct RunningHub {
    /// The address it listens on (with the port chosen, when 0 was asked for).
    pub addr: SocketAddr,
    /// Whether it speaks HTTPS.
    pub tls: bool,
    hub: Arc<Hub>,
    handle: Handle,
    server: JoinHandle<std::io::Result<()>>,
    background: Vec<JoinHandle<()>>,
}

impl RunningHub {
    /// The hub's URL, `http://ADDR` or `https://ADDR`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Waits until the server stops by itself (it only does on an error).
    pub async fn wait(&mut self) -> std::io::Result<()> {
        match (&mut self.server).await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Stops taking requests, lets those in flight finish (briefly), writes the pending
    /// heartbeats and closes the database.
    pub async fn shutdown(self) {
        self.handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
        let _ = self.server.await;
        for task in &self.background {
            task.abort();
        }
        self.hub.flush_heartbeats().await;
        self.hub.store().close().await;
    }
}

/// Starts serving `hub` on `listen`, over TLS when `tls` is given.
pub async fn serve(
    hub: Arc<Hub>,
    listen: SocketAddr,
    tls: Option<&TlsFiles>,
) -> Result<RunningHub, StartError> {
    let listener = std::net::TcpListener::bind(listen).map_err(|source| StartError::Listen {
        address: listen.to_string(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| StartError::Listen {
            address: listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        address: listen.to_string(),
        source,
    })?;
    let app = crate::api::router(Arc::clone(&hub)).into_make_service();
    let handle = Handle::new();
    let server = match tls {
        Some(files) => {
            let config = RustlsConfig::from_config(Arc::new(server_config(files)?));
            let server = axum_server::from_tcp_rustls(listener, config).handle(handle.clone());
            tokio::spawn(server.serve(app))
        }
        None => {
            let server = axum_server::from_tcp(listener).handle(handle.clone());
            tokio::spawn(server.serve(app))
        }
    };
    let background = hub.spawn_background();
    Ok(RunningHub {
        addr,
        tls: tls.is_some(),
        hub,
        handle,
        server,
        background,
    })
}

/// A rustls server configuration from PEM files, on the ring provider.
fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, StartError> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error("certificate", &files.cert, &e))?;
    if certs.is_empty() {
        return Err(StartError::Tls(format!(
            "{} holds no certificate",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| pem_error("private key", &files.key, &e))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            StartError::Tls(format!(
                "the certificate {} and key {} do not work together: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })
}

fn pem_error(what: &str, path: &Path, error: &rustls::pki_types::pem::Error) -> StartError {
    StartError::Tls(format!(
        "cannot read a {what} from {}: {error}",
        path.display()
    ))
}
