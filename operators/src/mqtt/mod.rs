//! What every MQTT operator shares: the connection options (broker URL, client id,
//! credentials, TLS, keep-alive), their validation at plan time, and the rumqttc options
//! built from them at instantiate time.
//!
//! Users write the connection fields at the top level of an operator's `config`, beside
//! the operator's own, so the YAML stays flat; [`ConnectionConfig`] reads them from there.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, EventLoop, MqttOptions, QoS, TlsConfiguration,
    Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tracing::{debug, info, warn};
use weir_engine::OperatorError;
use weir_engine::config::{ConfigErrors, HumanDuration};
use weir_engine::metrics::ConnectionMetrics;
use weir_engine::registry::NodeContext;

use crate::backoff::{Backoff, BackoffBounds};

/// The largest packet MQTT can carry (the protocol's remaining-length limit). rumqttc drops
/// the connection on a bigger packet, so its limit is set this high and operators enforce
/// their own, smaller, `max_payload_bytes` by dead-lettering: a limit inside rumqttc would
/// make one oversize retained or queued message break the connection forever.
const MQTT_MAX_PACKET_BYTES: usize = 268_435_455;

/// The defaults of the connection options, in one place.
pub mod defaults {
    use std::time::Duration;

    /// The MQTT port without TLS.
    pub const PORT: u16 = 1883;
    /// The MQTT port with TLS.
    pub const TLS_PORT: u16 = 8883;
    /// How often the client pings an idle broker.
    pub const KEEP_ALIVE: Duration = Duration::from_secs(30);
    /// The first reconnect delay.
    pub const RECONNECT_INITIAL: Duration = Duration::from_secs(1);
    /// The longest reconnect delay.
    pub const RECONNECT_MAX: Duration = Duration::from_secs(30);
    /// Whether the broker forgets the session when the client disconnects.
    pub const CLEAN_SESSION: bool = true;
}

/// The broker address in a `url` field: `mqtt://host[:port]` or `mqtts://host[:port]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether the connection uses TLS (`mqtts`).
    pub tls: bool,
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]`; the error says what is wrong.
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let url = url.trim();
        let (rest, tls) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (rest, false)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (rest, true)
        } else {
            let scheme = url.split("://").next().filter(|_| url.contains("://"));
            return Err(match scheme {
                Some(scheme) => format!(
                    "url scheme '{scheme}' is not supported: write mqtt://host:port or mqtts://host:port"
                ),
                None => format!(
                    "url '{url}' has no scheme: write mqtt://host:port or mqtts://host:port"
                ),
            });
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(
                "the url must not hold credentials: use the username and password_env fields"
                    .to_owned(),
            );
        }
        if rest.contains(['/', '?', '#']) {
            return Err(format!(
                "url '{url}' has a path or query: write only mqtt://host:port"
            ));
        }
        let default_port = if tls {
            defaults::TLS_PORT
        } else {
            defaults::PORT
        };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            // IPv6: [::1]:1883
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("url '{url}' has an unclosed '[' in its host"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(format!("url '{url}' has text after the host")),
                },
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(format!("url '{url}' has no host"));
        }
        let port = match port {
            None => default_port,
            Some(text) => match text.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => {
                    return Err(format!(
                        "url '{url}' has port '{text}': a port is a number from 1 to 65535"
                    ));
                }
            },
        };
        Ok(BrokerUrl {
            host: host.to_owned(),
            port,
            tls,
        })
    }

    /// `host:port`, as shown in messages.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// TLS options for `mqtts` URLs. Without `ca_file` the system's trusted roots are used.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsOptions {
    /// PEM file of the certificate authorities that sign the broker's certificate.
    pub ca_file: Option<String>,
    /// PEM file of the client certificate chain, for brokers that require client auth.
    pub cert_file: Option<String>,
    /// PEM file of the client's private key; required with `cert_file`.
    pub key_file: Option<String>,
}

/// The connection fields of an MQTT operator's config, as written. Operators read them
/// from the same flat `config` map as their own fields (see
/// [`ConfigValue::deserialize_split`](weir_engine::config::ConfigValue::deserialize_split)).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionConfig {
    /// `mqtt://host:port` (default port 1883) or `mqtts://host:port` (8883).
    pub url: String,
    /// The MQTT client id; defaults to `weir-<pipeline>-<node>`.
    pub client_id: Option<String>,
    /// `false` with a stable `client_id` keeps the session (subscriptions, queued
    /// messages) while the pipeline is down.
    pub clean_session: bool,
    /// The user name to log in with.
    pub username: Option<String>,
    /// The password, written inline (prefer `password_env`).
    pub password: Option<String>,
    /// The environment variable holding the password.
    pub password_env: Option<String>,
    /// TLS files; only with `mqtts://`.
    pub tls: Option<TlsOptions>,
    /// How often to ping an idle broker; `0s` turns pings off.
    pub keep_alive: HumanDuration,
    /// The first delay before reconnecting; it doubles on each failed attempt.
    pub reconnect_initial_delay: HumanDuration,
    /// The longest delay before reconnecting.
    pub reconnect_max_delay: HumanDuration,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            url: String::new(),
            client_id: None,
            clean_session: defaults::CLEAN_SESSION,
            username: None,
            password: None,
            password_env: None,
            tls: None,
            keep_alive: HumanDuration(defaults::KEEP_ALIVE),
            reconnect_initial_delay: HumanDuration(defaults::RECONNECT_INITIAL),
            reconnect_max_delay: HumanDuration(defaults::RECONNECT_MAX),
        }
    }
}

/// Where the password comes from, resolved at instantiate time.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Password {
    Inline(String),
    Env(String),
}

/// TLS files resolved against the pipeline directory.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TlsFiles {
    ca_file: Option<PathBuf>,
    client: Option<(PathBuf, PathBuf)>,
}

/// A validated connection, ready to build rumqttc options from.
#[derive(Clone, Debug)]
pub struct ConnectionPlan {
    /// The broker.
    pub broker: BrokerUrl,
    /// The MQTT client id.
    pub client_id: String,
    /// Whether the session is clean.
    pub clean_session: bool,
    username: Option<String>,
    password: Option<Password>,
    tls: Option<TlsFiles>,
    keep_alive: Duration,
    /// The reconnect backoff bounds.
    pub backoff: BackoffBounds,
}

impl ConnectionConfig {
    /// Checks the connection fields without touching files, the network or the
    /// environment, pushing every problem onto `errors`. `None` when something is wrong.
    pub fn validate(
        &self,
        node: &NodeContext<'_>,
        errors: &mut ConfigErrors,
    ) -> Option<ConnectionPlan> {
        let before = errors.len();
        let broker = match BrokerUrl::parse(&self.url) {
            Ok(broker) => Some(broker),
            Err(message) => {
                let message = if self.url.trim().is_empty() {
                    "the mqtt operator needs a broker url".to_owned()
                } else {
                    message
                };
                errors.push(
                    node.field_error(&["url"], message)
                        .with_hint("e.g. `url: mqtt://127.0.0.1:1883`"),
                );
                None
            }
        };
        let client_id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("weir-{}-{}", node.pipeline, node.name));
        if client_id.is_empty() || client_id.len() > 65535 {
            errors.push(node.field_error(
                &["client_id"],
                "client_id must be between 1 and 65535 bytes long",
            ));
        }
        let password = match (&self.password, &self.password_env) {
            (Some(_), Some(_)) => {
                errors.push(
                    node.field_error(&["password_env"], "give password or password_env, not both")
                        .with_hint("prefer password_env, so the secret stays out of the file"),
                );
                None
            }
            (Some(password), None) => Some(Password::Inline(password.clone())),
            (None, Some(var)) if var.trim().is_empty() || var.contains('=') => {
                errors.push(node.field_error(
                    &["password_env"],
                    format!("'{var}' is not an environment variable name"),
                ));
                None
            }
            (None, Some(var)) => Some(Password::Env(var.clone())),
            (None, None) => None,
        };
        if (self.password.is_some() || self.password_env.is_some()) && self.username.is_none() {
            errors.push(
                node.field_error(&["username"], "a password needs a username")
                    .with_hint("add `username: ...` under config"),
            );
        }
        let tls = match (&self.tls, &broker) {
            (Some(_), Some(broker)) if !broker.tls => {
                errors.push(
                    node.field_error(&["tls"], "tls options apply only to mqtts:// urls")
                        .with_hint("write the url as mqtts://host:8883, or remove `tls`"),
                );
                None
            }
            (Some(options), _) => {
                let resolve = |file: &String| node.base_dir.join(file);
                let client = match (&options.cert_file, &options.key_file) {
                    (Some(cert), Some(key)) => Some((resolve(cert), resolve(key))),
                    (None, None) => None,
                    (Some(_), None) => {
                        errors.push(node.field_error(
                            &["tls", "key_file"],
                            "tls.cert_file needs tls.key_file: add the client's private key",
                        ));
                        None
                    }
                    (None, Some(_)) => {
                        errors.push(node.field_error(
                            &["tls", "cert_file"],
                            "tls.key_file needs tls.cert_file: add the client certificate",
                        ));
                        None
                    }
                };
                Some(TlsFiles {
                    ca_file: options.ca_file.as_ref().map(resolve),
                    client,
                })
            }
            (None, _) => None,
        };
        let keep_alive = self.keep_alive.0;
        let (initial, max) = (self.reconnect_initial_delay.0, self.reconnect_max_delay.0);
        if !keep_alive.is_zero() && keep_alive < Duration::from_secs(1) {
            errors.push(
                node.field_error(&["keep_alive"], "keep_alive must be 0 (off) or at least 1s"),
            );
        }
        if initial < Duration::from_millis(1) {
            errors.push(node.field_error(
                &["reconnect_initial_delay"],
                "reconnect_initial_delay must be at least 1ms",
            ));
        }
        if max < initial {
            errors.push(node.field_error(
                &["reconnect_max_delay"],
                "reconnect_max_delay must not be shorter than reconnect_initial_delay",
            ));
        }
        if errors.len() > before {
            return None;
        }
        Some(ConnectionPlan {
            broker: broker?,
            client_id,
            clean_session: self.clean_session,
            username: self.username.clone(),
            password,
            tls,
            keep_alive,
            backoff: BackoffBounds { initial, max },
        })
    }
}

impl ConnectionPlan {
    /// The rumqttc client and its event loop, with `options` as [`ConnectionPlan::mqtt_options`]
    /// made them and then adjusted by the operator, and room for `requests` queued
    /// requests between the two.
    pub fn client(&self, options: MqttOptions, requests: usize) -> (AsyncClient, EventLoop) {
        let (client, mut eventloop) = AsyncClient::new(options, requests);
        // MQTT packets are small (a PUBACK is 4 bytes): Nagle's algorithm would hold
        // them back behind unacknowledged data, adding latency for no gain.
        eventloop.network_options.set_tcp_nodelay(true);
        (client, eventloop)
    }

    /// Builds the rumqttc options: reads the password from the environment and the TLS
    /// files from disk, so errors about them surface when the pipeline starts.
    pub fn mqtt_options(&self) -> Result<MqttOptions, OperatorError> {
        let mut options = MqttOptions::new(
            self.client_id.clone(),
            self.broker.host.clone(),
            self.broker.port,
        );
        options
            .set_clean_session(self.clean_session)
            .set_keep_alive(self.keep_alive)
            .set_max_packet_size(MQTT_MAX_PACKET_BYTES, 10 * 1024);
        if let Some(username) = &self.username {
            let password = match &self.password {
                None => String::new(),
                Some(Password::Inline(password)) => password.clone(),
                Some(Password::Env(var)) => std::env::var(var).map_err(|_| {
                    OperatorError::User(format!(
                        "environment variable {var} (password_env) is not set or not valid \
                         unicode: export it before starting the pipeline"
                    ))
                })?,
            };
            options.set_credentials(username.clone(), password);
        }
        if self.broker.tls {
            let config = self.tls_config()?;
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(config),
            )));
        }
        Ok(options)
    }

    /// The rustls client config, with the ring provider installed explicitly.
    fn tls_config(&self) -> Result<rustls::ClientConfig, OperatorError> {
        let files = self.tls.clone().unwrap_or(TlsFiles {
            ca_file: None,
            client: None,
        });
        let mut roots = rustls::RootCertStore::empty();
        match &files.ca_file {
            Some(path) => {
                for cert in read_certs(path, "tls.ca_file")? {
                    roots.add(cert).map_err(|e| {
                        OperatorError::User(format!(
                            "tls.ca_file {}: the certificate is not usable as a root: {e}",
                            path.display()
                        ))
                    })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(native.certs);
                if added == 0 {
                    return Err(OperatorError::User(
                        "no trusted root certificates found on this system: set tls.ca_file to \
                         the authority that signs the broker's certificate"
                            .to_owned(),
                    ));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| OperatorError::Internal(format!("rustls protocol versions: {e}")))?
            .with_root_certificates(roots);
        match &files.client {
            None => Ok(builder.with_no_client_auth()),
            Some((cert_file, key_file)) => {
                let chain = read_certs(cert_file, "tls.cert_file")?;
                let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
                    OperatorError::User(format!(
                        "tls.key_file {}: cannot read a PEM private key: {e}",
                        key_file.display()
                    ))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    OperatorError::User(format!(
                        "tls.cert_file {} and tls.key_file {} do not form a usable client \
                         identity: {e}",
                        cert_file.display(),
                        key_file.display()
                    ))
                })
            }
        }
    }
}

/// Reads every PEM certificate in `path`; at least one must be there.
fn read_certs(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, OperatorError> {
    let unreadable = |e: &dyn std::fmt::Display| {
        OperatorError::User(format!(
            "{field} {}: cannot read PEM certificates: {e}",
            path.display()
        ))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(&e))?;
    if certs.is_empty() {
        return Err(unreadable(&"the file holds no certificate"));
    }
    Ok(certs)
}

/// Reads a `qos` field: 0 (at most once) or 1 (at least once). Anything else is pushed
/// onto `errors`, and QoS 1 stands in so the rest of the config is still checked.
pub fn qos_field(node: &NodeContext<'_>, qos: u8, errors: &mut ConfigErrors) -> QoS {
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        other => {
            errors.push(
                node.field_error(&["qos"], format!("qos {other} is not supported"))
                    .with_hint("use 0 (at most once) or 1 (at least once)"),
            );
            QoS::AtLeastOnce
        }
    }
}

/// Whether a connection error will not go away by retrying, and what to tell the user.
///
/// A broker that refuses the credentials or the client id will refuse them again; retrying
/// forever would hide the problem behind a quiet, idle pipeline.
pub fn fatal_connection_error(error: &ConnectionError, broker: &BrokerUrl) -> Option<String> {
    if let ConnectionError::Tls(tls) = error {
        return fatal_tls_error(tls, broker);
    }
    let ConnectionError::ConnectionRefused(code) = error else {
        return None;
    };
    let why = match code {
        ConnectReturnCode::BadUserNamePassword => "bad user name or password",
        // Mosquitto answers a wrong password on MQTT 3.1.1 with "not authorised".
        ConnectReturnCode::NotAuthorized => {
            "bad user name or password, or this client is not authorised"
        }
        ConnectReturnCode::BadClientId => "client id rejected",
        ConnectReturnCode::RefusedProtocolVersion => "protocol version 3.1.1 not supported",
        ConnectReturnCode::ServiceUnavailable | ConnectReturnCode::Success => return None,
    };
    Some(format!(
        "mqtt broker {} refused the connection: {why}",
        broker.address()
    ))
}

/// TLS failures that the same configuration will hit again: an untrusted or mismatched
/// broker certificate, or a client certificate the broker refuses.
fn fatal_tls_error(error: &rumqttc::TlsError, broker: &BrokerUrl) -> Option<String> {
    let address = broker.address();
    let rustls_error = match error {
        rumqttc::TlsError::TLS(inner) => Some(inner),
        // The handshake reports rustls' error wrapped in an I/O error.
        rumqttc::TlsError::Io(io) => io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
        rumqttc::TlsError::DNSName(_) => {
            return Some(format!(
                "mqtt broker {address}: '{}' is not a valid TLS server name",
                broker.host
            ));
        }
        _ => None,
    }?;
    match rustls_error {
        rustls::Error::InvalidCertificate(why) => Some(format!(
            "mqtt broker {address}: its TLS certificate is not trusted ({why:?}): check that \
             tls.ca_file holds the authority that signed it and that the url's host is a \
             name in the certificate"
        )),
        rustls::Error::AlertReceived(alert) => {
            use rustls::AlertDescription as A;
            match alert {
                A::BadCertificate
                | A::CertificateRequired
                | A::UnknownCA
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::AccessDenied => Some(format!(
                    "mqtt broker {address} refused the TLS client certificate ({alert:?}): \
                     check tls.cert_file and tls.key_file"
                )),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Follows one client's connection to its broker: logs each change of state once (not
/// every retry), keeps the connection metrics, and paces reconnects.
pub struct ConnectionMonitor {
    broker: BrokerUrl,
    backoff: Backoff<ChaCha8Rng>,
    metrics: ConnectionMetrics,
    ever_connected: bool,
    failing: bool,
}

impl ConnectionMonitor {
    /// A monitor for the connection `plan` describes, reporting into `metrics`.
    pub fn new(plan: &ConnectionPlan, metrics: ConnectionMetrics) -> Self {
        metrics.connected.set(0);
        metrics.in_flight.set(0);
        metrics.ack_backlog.set(0);
        ConnectionMonitor {
            broker: plan.broker.clone(),
            backoff: Backoff::for_client(plan.backoff, &plan.client_id),
            metrics,
            ever_connected: false,
            failing: false,
        }
    }

    /// The broker accepted the connection.
    pub fn connected(&mut self) {
        let address = self.broker.address();
        let attempts = self.backoff.attempts();
        match (self.ever_connected, self.failing) {
            (false, false) => info!("mqtt connected to {address}"),
            (false, true) => info!("mqtt connected to {address} after {attempts} attempts"),
            (true, _) => {
                self.metrics.reconnects.inc();
                info!("mqtt reconnected to {address} after {attempts} attempts");
            }
        }
        self.metrics.connected.set(1);
        self.backoff.reset();
        self.ever_connected = true;
        self.failing = false;
    }

    /// The connection failed or could not be made. Returns how long to wait before the
    /// next attempt, or the message to fail with when retrying cannot help.
    pub fn failed(&mut self, error: &ConnectionError) -> Result<Duration, String> {
        self.metrics.connected.set(0);
        if let Some(message) = fatal_connection_error(error, &self.broker) {
            return Err(message);
        }
        let address = self.broker.address();
        if !self.failing {
            self.failing = true;
            if self.ever_connected {
                warn!("mqtt connection to {address} lost: {error}; retrying");
            } else {
                warn!("mqtt cannot connect to {address}: {error}; retrying");
            }
        }
        let delay = self.backoff.next_delay();
        debug!("mqtt reconnecting to {address} in {delay:?}");
        Ok(delay)
    }

    /// The connection was closed on purpose.
    pub fn closed(&self) {
        self.metrics.connected.set(0);
    }

    /// The connection series it keeps, for the counts only the operator knows (messages
    /// in flight, acks waiting to be written).
    pub fn metrics(&self) -> &ConnectionMetrics {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports() {
        assert_eq!(
            BrokerUrl::parse("mqtt://broker.local").unwrap(),
            BrokerUrl {
                host: "broker.local".into(),
                port: 1883,
                tls: false
            }
        );
        let tls = BrokerUrl::parse("mqtts://10.0.0.1:9999/").unwrap();
        assert_eq!(
            (tls.host.as_str(), tls.port, tls.tls),
            ("10.0.0.1", 9999, true)
        );
        assert_eq!(BrokerUrl::parse("mqtts://h").unwrap().port, 8883);
        let v6 = BrokerUrl::parse("mqtt://[::1]:1884").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 1884));
        assert_eq!(v6.address(), "[::1]:1884");
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let err = |url: &str| BrokerUrl::parse(url).unwrap_err();
        assert!(err("tcp://h:1883").contains("scheme 'tcp'"));
        assert!(err("h:1883").contains("no scheme"));
        assert!(err("mqtt://h:0").contains("from 1 to 65535"));
        assert!(err("mqtt://h:99999").contains("from 1 to 65535"));
        assert!(err("mqtt://h:x").contains("port 'x'"));
        assert!(err("mqtt://:1883").contains("no host"));
        assert!(err("mqtt://u:p@h").contains("credentials"));
        assert!(err("mqtt://h/topic").contains("path"));
    }

    #[test]
    fn refused_credentials_are_fatal_other_errors_are_not() {
        let broker = BrokerUrl::parse("mqtt://127.0.0.1:1883").unwrap();
        let refused = ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword);
        assert_eq!(
            fatal_connection_error(&refused, &broker).as_deref(),
            Some("mqtt broker 127.0.0.1:1883 refused the connection: bad user name or password")
        );
        let denied = ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized);
        assert!(
            fatal_connection_error(&denied, &broker)
                .unwrap()
                .contains("bad user name or password")
        );
        let busy = ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable);
        assert_eq!(fatal_connection_error(&busy, &broker), None);
        assert_eq!(
            fatal_connection_error(&ConnectionError::NetworkTimeout, &broker),
            None
        );
    }
}
