//! Starting hubs for the tests, on SQLite or on PostgreSQL, and talking to them.
//!
//! PostgreSQL tests use the server at `WEIR_TEST_POSTGRES` (default
//! `postgres://weir:weir@127.0.0.1:5432/postgres`, what `.ci/run` sets up): each test
//! creates a database of its own there and drops it when it ends.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::Connection;
use weir_hub::data::FleetLocation;
use weir_hub::identity::DeviceKey;
use weir_hub::protocol::PipelineDocument;
use weir_hub::protocol::{CreatedDevice, DeploymentSpec, NewDevice};
use weir_hub::store::Database;
use weir_hub::{
    ClientError, Credentials, Hub, HubClient, HubConfig, RunningHub, SecretSource, TlsFiles,
};

/// The admin token the test hubs run with.
pub const ADMIN_TOKEN: &str = "weir_admin_test-token";

/// The PostgreSQL server the tests use, unless `WEIR_TEST_POSTGRES` names another.
const DEFAULT_POSTGRES: &str = "postgres://weir:weir@127.0.0.1:5432/postgres";

/// Which database a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    /// A SQLite file in the test's directory.
    Sqlite,
    /// A fresh database on the test PostgreSQL server.
    Postgres,
}

/// Runs a test body once on SQLite and once on PostgreSQL, as two tests.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::support::Db::Sqlite).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::support::Db::Postgres).await;
                }
            }
        )*
    };
}

/// A database for one test: a SQLite file, or a PostgreSQL database dropped at the end.
pub struct TestDatabase {
    pub database: Database,
    postgres: Option<(String, String)>,
}

impl TestDatabase {
    /// A new, empty database of kind `db`, SQLite ones in `dir`.
    pub async fn new(db: Db, dir: &Path) -> TestDatabase {
        match db {
            Db::Sqlite => TestDatabase {
                database: Database::Sqlite(dir.join("hub.db")),
                postgres: None,
            },
            Db::Postgres => {
                let server = std::env::var("WEIR_TEST_POSTGRES")
                    .unwrap_or_else(|_| DEFAULT_POSTGRES.to_owned());
                let name = format!("weir_hub_test_{}", unique());
                let mut connection = sqlx::PgConnection::connect(&server).await.unwrap_or_else(|e| {
                    panic!(
                        "the PostgreSQL tests need a server at {server} (set WEIR_TEST_POSTGRES; \
                         .ci/run starts one): {e}"
                    )
                });
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut connection)
                    .await
                    .expect("create the test database");
                let url = match server.rsplit_once('/') {
                    Some((base, _)) => format!("{base}/{name}"),
                    None => panic!("WEIR_TEST_POSTGRES must end in /DATABASE: {server}"),
                };
                TestDatabase {
                    database: Database::Url(url),
                    postgres: Some((server, name)),
                }
            }
        }
    }

    /// Drops a PostgreSQL database (every hub on it must be shut down).
    pub async fn drop_database(self) {
        if let Some((server, name)) = self.postgres {
            let mut connection = sqlx::PgConnection::connect(&server)
                .await
                .expect("connect to drop the test database");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut connection)
            .await
            .expect("drop the test database");
        }
    }
}

/// A name part unique to this process and call.
pub fn unique() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A hub serving on a free loopback port, with its admin client.
pub struct TestHub {
    /// The hub itself, for what the API does not reach (compaction).
    pub hub: std::sync::Arc<Hub>,
    pub running: RunningHub,
    pub admin: HubClient,
    pub url: String,
}

/// How a test hub is set up.
pub struct Setup<'a> {
    pub dir: &'a Path,
    pub database: &'a Database,
    pub admin_token: Option<&'a str>,
    pub tls: Option<TlsFiles>,
    pub ca_file: Option<PathBuf>,
    pub offline_after: Duration,
    pub sync_interval: Duration,
    /// Where the fleet's data goes (the default: `dir/fleet`).
    pub fleet_data: Option<FleetLocation>,
    /// The bounds on fleet queries.
    pub query_limits: weir_query::Limits,
    /// How long the compaction lease lasts.
    pub compaction_lease: Duration,
    /// What the fleet may ask of the hub.
    pub limits: weir_hub::limits::RequestLimits,
    /// The streams devices may ship to.
    pub accept_streams: Vec<weir_hub::limits::StreamRule>,
}

impl<'a> Setup<'a> {
    /// The usual: the test admin token, plain HTTP, the secret in `dir`.
    pub fn new(dir: &'a Path, database: &'a Database) -> Setup<'a> {
        Setup {
            dir,
            database,
            admin_token: Some(ADMIN_TOKEN),
            tls: None,
            ca_file: None,
            offline_after: Duration::from_secs(90),
            sync_interval: Duration::from_millis(200),
            fleet_data: None,
            query_limits: weir_query::Limits::default(),
            compaction_lease: Duration::from_secs(300),
            limits: weir_hub::limits::RequestLimits::default(),
            accept_streams: vec![weir_hub::limits::StreamRule::any()],
        }
    }

    /// Opens and serves the hub.
    pub async fn start(self) -> (TestHub, Option<String>) {
        let mut config = HubConfig::new(self.dir);
        config.database = self.database.clone();
        config.secret = SecretSource::File(self.dir.join("hub.secret"));
        config.admin_token = self.admin_token.map(str::to_owned);
        config.offline_after = self.offline_after;
        config.sync_interval = self.sync_interval;
        if let Some(location) = self.fleet_data {
            config.fleet_data = location;
        }
        config.query_limits = self.query_limits;
        config.compaction_lease = self.compaction_lease;
        config.limits = self.limits;
        config.accept_streams = self.accept_streams;
        let opened = Hub::open(config).await.expect("open the hub");
        let hub = opened.hub.clone();
        let running = weir_hub::serve(
            opened.hub,
            "127.0.0.1:0".parse().expect("address"),
            self.tls.as_ref(),
        )
        .await
        .expect("serve the hub");
        let url = running.url();
        let token = self
            .admin_token
            .map(str::to_owned)
            .or_else(|| opened.generated_admin_token.clone())
            .unwrap_or_default();
        let admin = HubClient::new(&url, Credentials::Admin(token), self.ca_file.as_deref())
            .expect("admin client");
        (
            TestHub {
                hub,
                running,
                admin,
                url,
            },
            opened.generated_admin_token,
        )
    }
}

impl TestHub {
    /// A hub with the usual setup.
    pub async fn start(dir: &Path, database: &Database) -> TestHub {
        Setup::new(dir, database).start().await.0
    }

    /// A client acting as device `id` with `key`.
    pub fn device(&self, id: &str, key: &str) -> HubClient {
        HubClient::new(
            &self.url,
            Credentials::Device {
                id: id.to_owned(),
                key: DeviceKey::from_base64(key).expect("a device key"),
            },
            None,
        )
        .expect("device client")
    }

    /// Registers a device with `tags` and returns it with its keys.
    pub async fn register(&self, id: &str, tags: &[(&str, &str)]) -> CreatedDevice {
        self.admin
            .create_device(&NewDevice {
                id: id.to_owned(),
                tags: tags
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            })
            .await
            .expect("register the device")
    }

    /// A plain HTTP client for raw requests.
    pub fn raw(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_backend_preconfigured(
                rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
            .build()
            .expect("raw client")
    }

    /// Stops the hub.
    pub async fn stop(self) {
        self.running.shutdown().await;
    }
}

/// The status a refused request got.
pub fn refusal_status(result: Result<impl std::fmt::Debug, ClientError>) -> u16 {
    match result {
        Err(error) => error
            .status()
            .unwrap_or_else(|| panic!("not a refusal: {error}")),
        Ok(value) => panic!("expected a refusal, got {value:?}"),
    }
}

/// A deployment of `documents` (name, YAML) targeting `condition`.
pub fn deployment(condition: &str, priority: i64, documents: &[(&str, &str)]) -> DeploymentSpec {
    DeploymentSpec {
        name: None,
        target_condition: condition.to_owned(),
        priority,
        pipelines: documents
            .iter()
            .map(|(name, yaml)| PipelineDocument {
                name: (*name).to_owned(),
                yaml: (*yaml).to_owned(),
            })
            .collect(),
    }
}

/// A valid pipeline named `name`: generated readings filtered by SQL, to stdout.
pub fn pipeline(name: &str, threshold: u32) -> String {
    format!(
        r#"version: 1
name: {name}
sources:
  readings:
    kind: generator
    config:
      devices: 2
      interval: 1s
      realtime: true
      fields:
        temperature: {{shape: sine, base: 60, amplitude: 5, period: 10m, noise: 0.5}}
transforms:
  hot:
    kind: sql
    inputs: [readings]
    config:
      query: SELECT device, temperature FROM readings WHERE temperature > {threshold}
sinks:
  out:
    kind: stdout
    inputs: [hot]
"#
    )
}
