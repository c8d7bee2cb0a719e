//! The hub's storage: devices, deployments and settings, in SQLite or PostgreSQL.
//!
//! One set of migrations and queries serves both databases, through sqlx's `Any` driver
//! and the SQL the two share. Everything a hub keeps in memory is rebuilt from here, so
//! several hubs can share one PostgreSQL database: each write that can move a device's
//! desired state also bumps one change counter, in the same transaction, and every hub
//! watches that counter (see [`Store::generation`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row, SqlSafeStr};

use crate::error::StoreError;
use crate::identity::KeySlot;
use crate::protocol::{PipelineDocument, Report};

/// The columns [`device_from_row`] reads, as a literal for `concat!`.
macro_rules! device_columns {
    () => {
        "id, tags, nonce, primary_generation, secondary_generation, enabled, created_ms, \
         last_seen_ms, report, reported_ms"
    };
}

/// The columns [`deployment_from_row`] reads, as a literal for `concat!`.
macro_rules! deployment_columns {
    () => {
        "name, version, revision, priority, target_condition, pipelines, created_ms, updated_ms"
    };
}

/// The migrations, in order. Each is plain SQL that both databases accept.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "registry",
        include_str!("../migrations/0001_registry.sql"),
    ),
    (
        2,
        "fleet data",
        include_str!("../migrations/0002_fleet_data.sql"),
    ),
    (
        3,
        "compaction and the fleet's tables",
        include_str!("../migrations/0003_compaction.sql"),
    ),
    (
        4,
        "the columns of the fleet's tables",
        include_str!("../migrations/0004_stream_columns.sql"),
    ),
];

/// How long a SQLite connection waits for another writer before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the hub keeps its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file, created when missing.
    Sqlite(PathBuf),
    /// A database URL: `postgres://…` (or `sqlite://…`).
    Url(String),
}

impl Database {
    /// The database for `--database`, or the SQLite file in `data_dir` without it.
    pub fn choose(url: Option<&str>, data_dir: &Path) -> Database {
        match url {
            Some(url) => Database::Url(url.to_owned()),
            None => Database::Sqlite(data_dir.join("hub.db")),
        }
    }

    /// The URL sqlx connects to.
    fn url(&self) -> String {
        match self {
            Database::Sqlite(path) => format!("sqlite://{}?mode=rwc", path.display()),
            Database::Url(url) => url.clone(),
        }
    }

    /// What to call it in messages: never the password in a URL.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(path) => format!("SQLite database {}", path.display()),
            Database::Url(url) => redact_url(url),
        }
    }
}

/// A database URL with its passwords hidden: `postgres://user:secret@host/db?password=x`
/// as `postgres://user:***@host/db?password=***`.
fn redact_url(url: &str) -> String {
    let (address, query) = match url.split_once('?') {
        Some((address, query)) => (address, Some(query)),
        None => (url, None),
    };
    let mut redacted = match address.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((credentials, host)) => match credentials.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => address.to_owned(),
            },
            None => address.to_owned(),
        },
        None => address.to_owned(),
    };
    if let Some(query) = query {
        let parameters: Vec<String> = query
            .split('&')
            .map(|parameter| match parameter.split_once('=') {
                Some((name, _)) if name.to_ascii_lowercase().contains("password") => {
                    format!("{name}=***")
                }
                _ => parameter.to_owned(),
            })
            .collect();
        redacted.push('?');
        redacted.push_str(&parameters.join("&"));
    }
    redacted
}

/// Which database engine is behind the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// SQLite, one file.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A device as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceRecord {
    /// The device id.
    pub id: String,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// The random part of its key derivation.
    pub nonce: String,
    /// The generation of its primary key.
    pub primary_generation: u64,
    /// The generation of its secondary key.
    pub secondary_generation: u64,
    /// Whether it may connect.
    pub enabled: bool,
    /// When it was registered, in ms since the epoch.
    pub created_ms: i64,
    /// Its last heartbeat or report, in ms since the epoch.
    pub last_seen_ms: Option<i64>,
    /// Its last report.
    pub report: Option<Report>,
    /// When that report came, in ms since the epoch.
    pub reported_ms: Option<i64>,
}

impl DeviceRecord {
    /// What its keys are derived from, and whether it may connect.
    pub fn credentials(&self) -> DeviceCredentials {
        DeviceCredentials {
            id: self.id.clone(),
            nonce: self.nonce.clone(),
            primary_generation: self.primary_generation,
            secondary_generation: self.secondary_generation,
            enabled: self.enabled,
        }
    }
}

/// What authenticating a device needs, and no more: read on every device request, so
/// it leaves out the tags and the stored report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCredentials {
    /// The device id.
    pub id: String,
    /// The random part of its key derivation.
    pub nonce: String,
    /// The generation of its primary key.
    pub primary_generation: u64,
    /// The generation of its secondary key.
    pub secondary_generation: u64,
    /// Whether it may connect.
    pub enabled: bool,
}

impl DeviceCredentials {
    /// The generation of the key in `slot`.
    pub fn generation(&self, slot: KeySlot) -> u64 {
        match slot {
            KeySlot::Primary => self.primary_generation,
            KeySlot::Secondary => self.secondary_generation,
        }
    }
}

/// A deployment as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct DeploymentRecord {
    /// Its name.
    pub name: String,
    /// 1 when created, one more on each update.
    pub version: u64,
    /// The change generation this version was written at (unique across deployments).
    pub revision: i64,
    /// Higher wins where several deployments target a device.
    pub priority: i64,
    /// Which devices it targets.
    pub target_condition: String,
    /// What it runs.
    pub pipelines: Vec<PipelineDocument>,
    /// When it was created, in ms since the epoch.
    pub created_ms: i64,
    /// When this version was written, in ms since the epoch.
    pub updated_ms: i64,
}

/// A deployment to write.
#[derive(Clone, Debug)]
pub struct DeploymentDraft {
    /// Its name.
    pub name: String,
    /// Higher wins where several deployments target a device.
    pub priority: i64,
    /// Which devices it targets, already checked.
    pub target_condition: String,
    /// What it runs, already validated.
    pub pipelines: Vec<PipelineDocument>,
}

/// The hub's database.
#[derive(Clone, Debug)]
pub struct Store {
    /// For reads.
    pool: AnyPool,
    /// For writes: on SQLite one connection, on PostgreSQL the same pool as reads.
    writer: AnyPool,
    /// Which engine, for the few statements the two spell differently.
    backend: Backend,
}

/// A job's lease as its holder last took or renewed it: a step only the holder may take
/// is fenced by it ([`Store::repoint_batches`]). Two takings never give equal tokens: the
/// expiry moves forward with every one, and the holder is a hub's run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseToken {
    /// The lease.
    pub name: String,
    /// The lease's stored value when it was taken: expiry and holder.
    value: String,
}

impl LeaseToken {
    /// When the lease expires, ms since the Unix epoch by the database's clock.
    pub fn expires_ms(&self) -> i64 {
        self.value
            .get(..20)
            .and_then(|until| until.parse().ok())
            .unwrap_or(0)
    }
}

/// A SQLite connection as the hub wants it: WAL, and a generous busy timeout. Writes
/// are synchronous FULL: a commit (an acknowledged batch's record) is on disk before
/// the hub answers, and survives a power cut.
fn sqlite_pool(synchronous: &'static str) -> AnyPoolOptions {
    AnyPoolOptions::new().after_connect(move |connection, _| {
        Box::pin(async move {
            let busy = format!("PRAGMA busy_timeout = {}", SQLITE_BUSY_TIMEOUT.as_millis());
            sqlx::query(sqlx::AssertSqlSafe(busy))
                .execute(&mut *connection)
                .await?;
            // WAL: readers do not wait for the writer, and a commit is an append.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&mut *connection)
                .await?;
            let synchronous = format!("PRAGMA synchronous = {synchronous}");
            sqlx::query(sqlx::AssertSqlSafe(synchronous))
                .execute(&mut *connection)
                .await?;
            Ok(())
        })
    })
}

impl Store {
    /// Connects to `database`, creating a SQLite file (and its directory) when missing,
    /// and brings its schema up to date.
    pub async fn open(database: &Database) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        if let Database::Sqlite(path) = database
            && let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let url = database.url();
        let options = AnyConnectOptions::from_str(&url).map_err(|e| StoreError::Connect {
            database: database.describe(),
            message: e.to_string(),
        })?;
        let backend = match options.database_url.scheme() {
            "sqlite" => Backend::Sqlite,
            "postgres" | "postgresql" => Backend::Postgres,
            other => {
                return Err(StoreError::Connect {
                    database: database.describe(),
                    message: format!(
                        "'{other}' databases are not supported: use postgres://… or a SQLite file"
                    ),
                });
            }
        };
        let connect = |options: AnyPoolOptions, connect: AnyConnectOptions| async move {
            options
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(connect)
                .await
                .map_err(|e| StoreError::Connect {
                    database: database.describe(),
                    message: e.to_string(),
                })
        };
        let (pool, writer) = match backend {
            // SQLite takes one writer at a time, and a writer that finds the database
            // busy sleeps and retries: every write goes through one connection, so
            // writes queue in the pool instead. Readers (WAL) never wait for it.
            Backend::Sqlite => {
                // FULL for the writer: in WAL mode each commit syncs the log. Readers
                // write nothing.
                let writer =
                    connect(sqlite_pool("FULL").max_connections(1), options.clone()).await?;
                let readers = connect(sqlite_pool("NORMAL").max_connections(8), options).await?;
                (readers, writer)
            }
            Backend::Postgres => {
                let pool = connect(AnyPoolOptions::new().max_connections(16), options).await?;
                (pool.clone(), pool)
            }
        };
        let store = Store {
            pool,
            writer,
            backend,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations not yet applied. Safe with several hubs starting at once:
    /// sqlx takes a database lock around it.
    async fn migrate(&self) -> Result<(), StoreError> {
        let migrations = MIGRATIONS
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect();
        Migrator::with_migrations(migrations)
            .run(&self.writer)
            .await
            .map_err(|e| StoreError::Migrate(e.to_string()))
    }

    /// The fleet's change generation: it grows with every change that can move a
    /// device's desired state (deployments, device tags, devices added or removed).
    pub async fn generation(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT generation FROM hub_changes WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("generation")?)
    }

    // --- devices ----------------------------------------------------------------------

    /// Registers a device, and returns the change generation it was written at.
    /// [`StoreError::Conflict`] when the id is taken.
    pub async fn insert_device(&self, device: &DeviceRecord) -> Result<i64, StoreError> {
        let mut tx = self.writer.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO devices (id, tags, nonce, primary_generation, secondary_generation, \
             enabled, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&device.id)
        .bind(tags_json(&device.tags))
        .bind(&device.nonce)
        .bind(to_db(device.primary_generation))
        .bind(to_db(device.secondary_generation))
        .bind(i64::from(device.enabled))
        .bind(device.created_ms)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "a device with id '{}' already exists",
                device.id
            )));
        }
        let generation = bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(generation)
    }

    /// One device, if it exists.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| device_from_row(&row)).transpose()
    }

    /// A device's credentials, if it exists.
    pub async fn device_credentials(
        &self,
        id: &str,
    ) -> Result<Option<DeviceCredentials>, StoreError> {
        let row = sqlx::query(
            "SELECT id, nonce, primary_generation, secondary_generation, enabled \
             FROM devices WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(DeviceCredentials {
                id: row.try_get("id")?,
                nonce: row.try_get("nonce")?,
                primary_generation: from_db(row.try_get("primary_generation")?),
                secondary_generation: from_db(row.try_get("secondary_generation")?),
                enabled: row.try_get::<i64, _>("enabled")? != 0,
            })
        })
        .transpose()
    }

    /// Every device, by id.
    pub async fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(device_from_row).collect()
    }

    /// Every device's tags, as the fleet needs them.
    pub async fn device_tags(&self) -> Result<Vec<(String, BTreeMap<String, String>)>, StoreError> {
        let rows = sqlx::query("SELECT id, tags FROM devices")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let tags = tags_from_row(row, &id)?;
                Ok((id, tags))
            })
            .collect()
    }

    /// Removes a device, and returns the change generation that was; none when there
    /// was no such device.
    pub async fn delete_device(&self, id: &str) -> Result<Option<i64>, StoreError> {
        let mut tx = self.writer.begin().await?;
        let deleted = sqlx::query("DELETE FROM devices WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() == 0 {
            return Ok(None);
        }
        let generation = bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(Some(generation))
    }

    /// Changes some of a device's tags (`None` removes one) and returns the change
    /// generation and the tags now; none when there is no such device. A change made
    /// meanwhile by another request (or hub) is kept: the write only happens if the
    /// tags are still those read, and is otherwise done again on the new ones.
    pub async fn patch_tags(
        &self,
        id: &str,
        changes: &BTreeMap<String, Option<String>>,
    ) -> Result<Option<(i64, BTreeMap<String, String>)>, StoreError> {
        const ATTEMPTS: usize = 10;
        for _ in 0..ATTEMPTS {
            let Some(row) = sqlx::query("SELECT id, tags FROM devices WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
            else {
                return Ok(None);
            };
            let read: String = row.try_get("tags")?;
            let mut tags = tags_from_row(&row, id)?;
            for (name, value) in changes {
                match value {
                    Some(value) => tags.insert(name.clone(), value.clone()),
                    None => tags.remove(name),
                };
            }
            let mut tx = self.writer.begin().await?;
            let updated = sqlx::query("UPDATE devices SET tags = $1 WHERE id = $2 AND tags = $3")
                .bind(tags_json(&tags))
                .bind(id)
                .bind(&read)
                .execute(&mut *tx)
                .await?;
            if updated.rows_affected() == 0 {
                // Changed (or removed) since the read: start over from what is there.
                continue;
            }
            let generation = bump_generation(&mut tx).await?;
            tx.commit().await?;
            return Ok(Some((generation, tags)));
        }
        Err(StoreError::Conflict(format!(
            "the tags of device '{id}' changed {ATTEMPTS} times while being updated; try again"
        )))
    }

    /// Replaces a device's tags, and returns the change generation that was; none when
    /// there is no such device.
    pub async fn set_tags(
        &self,
        id: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.writer.begin().await?;
        let updated = sqlx::query("UPDATE devices SET tags = $1 WHERE id = $2")
            .bind(tags_json(tags))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if updated.rows_affected() == 0 {
            return Ok(None);
        }
        let generation = bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(Some(generation))
    }

    /// Enables or disables a device; false when there is no such device.
    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<bool, StoreError> {
        let updated = sqlx::query("UPDATE devices SET enabled = $1 WHERE id = $2")
            .bind(i64::from(enabled))
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(updated.rows_affected() > 0)
    }

    /// Moves the key in `slot` to its next generation, which revokes every token signed
    /// with the old one. The device as it is now; none when there is no such device.
    pub async fn rotate_key(
        &self,
        id: &str,
        slot: KeySlot,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let sql = match slot {
            KeySlot::Primary => {
                "UPDATE devices SET primary_generation = primary_generation + 1 WHERE id = $1"
            }
            KeySlot::Secondary => {
                "UPDATE devices SET secondary_generation = secondary_generation + 1 \
                 WHERE id = $1"
            }
        };
        sqlx::query(sql).bind(id).execute(&self.writer).await?;
        self.device(id).await
    }

    /// Stores a device's report and counts it as a sign of life.
    pub async fn record_report(
        &self,
        id: &str,
        report: &Report,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let json = serde_json::to_string(report).map_err(|e| StoreError::Corrupt {
            what: format!("the report of device '{id}'"),
            message: e.to_string(),
        })?;
        let updated = sqlx::query(
            "UPDATE devices SET report = $1, reported_ms = $2, last_seen_ms = $2 WHERE id = $3",
        )
        .bind(json)
        .bind(now_ms)
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(updated.rows_affected() > 0)
    }

    /// Records heartbeats: each device's latest time, in one transaction.
    pub async fn record_heartbeats(&self, beats: &[(String, i64)]) -> Result<(), StoreError> {
        if beats.is_empty() {
            return Ok(());
        }
        let mut tx = self.writer.begin().await?;
        for (id, at_ms) in beats {
            // Never move a device's time backwards (another hub may hold a later one).
            sqlx::query(
                "UPDATE devices SET last_seen_ms = $1 \
                 WHERE id = $2 AND (last_seen_ms IS NULL OR last_seen_ms < $1)",
            )
            .bind(at_ms)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // --- deployments ------------------------------------------------------------------

    /// Writes a deployment: creates it at version 1, or (unless `create_only`) updates
    /// it to the next version. [`StoreError::Conflict`] when `create_only` and it exists.
    pub async fn put_deployment(
        &self,
        draft: &DeploymentDraft,
        create_only: bool,
        now_ms: i64,
    ) -> Result<DeploymentRecord, StoreError> {
        let pipelines =
            serde_json::to_string(&draft.pipelines).map_err(|e| StoreError::Corrupt {
                what: format!("the pipelines of deployment '{}'", draft.name),
                message: e.to_string(),
            })?;
        let mut tx = self.writer.begin().await?;
        // The generation row is locked first, so concurrent writers of one deployment
        // (on several hubs) take turns and each gets its own version.
        let revision = bump_generation(&mut tx).await?;
        let existing = sqlx::query("SELECT version, created_ms FROM deployments WHERE name = $1")
            .bind(&draft.name)
            .fetch_optional(&mut *tx)
            .await?;
        let (version, created_ms) = match existing {
            Some(_) if create_only => {
                return Err(StoreError::Conflict(format!(
                    "a deployment named '{}' already exists: update it with PUT",
                    draft.name
                )));
            }
            Some(row) => {
                let version: i64 = row.try_get("version")?;
                let created_ms: i64 = row.try_get("created_ms")?;
                sqlx::query(
                    "UPDATE deployments SET version = $1, revision = $2, priority = $3, \
                     target_condition = $4, pipelines = $5, updated_ms = $6 WHERE name = $7",
                )
                .bind(version + 1)
                .bind(revision)
                .bind(draft.priority)
                .bind(&draft.target_condition)
                .bind(&pipelines)
                .bind(now_ms)
                .bind(&draft.name)
                .execute(&mut *tx)
                .await?;
                (version + 1, created_ms)
            }
            None => {
                sqlx::query(
                    "INSERT INTO deployments (name, version, revision, priority, \
                     target_condition, pipelines, created_ms, updated_ms) \
                     VALUES ($1, 1, $2, $3, $4, $5, $6, $6)",
                )
                .bind(&draft.name)
                .bind(revision)
                .bind(draft.priority)
                .bind(&draft.target_condition)
                .bind(&pipelines)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
                (1, now_ms)
            }
        };
        tx.commit().await?;
        Ok(DeploymentRecord {
            name: draft.name.clone(),
            version: from_db(version),
            revision,
            priority: draft.priority,
            target_condition: draft.target_condition.clone(),
            pipelines: draft.pipelines.clone(),
            created_ms,
            updated_ms: now_ms,
        })
    }

    /// One deployment, if it exists.
    pub async fn deployment(&self, name: &str) -> Result<Option<DeploymentRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            deployment_columns!(),
            " FROM deployments WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| deployment_from_row(&row)).transpose()
    }

    /// Every deployment, by name.
    pub async fn deployments(&self) -> Result<Vec<DeploymentRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            deployment_columns!(),
            " FROM deployments ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(deployment_from_row).collect()
    }

    /// Removes a deployment, and returns the change generation that was; none when
    /// there was no such deployment.
    pub async fn delete_deployment(&self, name: &str) -> Result<Option<i64>, StoreError> {
        let mut tx = self.writer.begin().await?;
        let deleted = sqlx::query("DELETE FROM deployments WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() == 0 {
            return Ok(None);
        }
        let generation = bump_generation(&mut tx).await?;
        tx.commit().await?;
        Ok(Some(generation))
    }

    // --- settings ---------------------------------------------------------------------

    /// A setting, if set.
    pub async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM hub_settings WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| row.try_get("value")).transpose()?)
    }

    /// Sets a setting unless it is set already, and returns the value that holds: of
    /// several hubs starting at once, the first one's.
    pub async fn setting_or_insert(&self, name: &str, value: &str) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO hub_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .execute(&self.writer)
        .await?;
        self.setting(name)
            .await?
            .ok_or_else(|| StoreError::Corrupt {
                what: format!("setting '{name}'"),
                message: "it was written and then not found".to_owned(),
            })
    }

    /// Whether batch `seq` of `device`'s `pipeline/sink` was stored already.
    pub async fn ingested(
        &self,
        device: &str,
        pipeline: &str,
        sink: &str,
        seq: i64,
    ) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT 1 FROM hub_ingested WHERE device = $1 AND pipeline = $2 AND sink = $3 AND seq = $4",
        )
        .bind(device)
        .bind(pipeline)
        .bind(sink)
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Records that batch `seq` of `device`'s `pipeline/sink` is stored as `object`.
    /// Recording it twice keeps the first record.
    pub async fn record_ingested(
        &self,
        device: &str,
        (pipeline, sink, seq): (&str, &str, i64),
        rows: i64,
        object: &str,
        arrived_ms: i64,
    ) -> Result<(), StoreError> {
        // One transaction: on SQLite, one commit to disk for both.
        let mut tx = self.writer.begin().await?;
        let directory = object
            .rsplit_once('/')
            .map_or("", |(directory, _)| directory);
        sqlx::query(
            "INSERT INTO hub_ingested \
             (device, pipeline, sink, seq, rows, object, directory, arrived_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (device, pipeline, sink, seq) DO NOTHING",
        )
        .bind(device)
        .bind(pipeline)
        .bind(sink)
        .bind(seq)
        .bind(rows)
        .bind(object)
        .bind(directory)
        .bind(arrived_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO hub_streams (pipeline, sink) VALUES ($1, $2) \
             ON CONFLICT (pipeline, sink) DO NOTHING",
        )
        .bind(pipeline)
        .bind(sink)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The directories of the batches that arrived at or after `since_ms`.
    pub async fn directories_ingested_since(
        &self,
        since_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT directory FROM hub_ingested WHERE arrived_ms >= $1 ORDER BY directory",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
    }

    /// The batches of `device`'s `pipeline/sink` in `directory`: each one's sequence
    /// number and the object that holds it.
    pub async fn batches_in(
        &self,
        device: &str,
        (pipeline, sink): (&str, &str),
        directory: &str,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, object FROM hub_ingested \
             WHERE device = $1 AND pipeline = $2 AND sink = $3 AND directory = $4",
        )
        .bind(device)
        .bind(pipeline)
        .bind(sink)
        .bind(directory)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    /// Points the batches of `device`'s `pipeline/sink` held by any of `objects` at
    /// `merged` instead, in one transaction.
    pub async fn repoint_batches(
        &self,
        device: &str,
        (pipeline, sink): (&str, &str),
        objects: &[String],
        merged: &str,
        fence: &LeaseToken,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        // The lease must still be as its holder took it, and unexpired by the database's
        // clock. On PostgreSQL the row stays locked until the commit, so no hub takes
        // the lease between this check and the records moving.
        let lock = match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        };
        let held = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT value FROM hub_settings WHERE name = $1{lock}"
        )))
        .bind(&fence.name)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| row.try_get::<String, _>(0))
        .transpose()?;
        let now: i64 = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {}", self.now_sql())))
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if held.as_deref() != Some(fence.value.as_str()) || fence.expires_ms() < now {
            return Err(StoreError::LeaseLost {
                lease: fence.name.clone(),
            });
        }
        for object in objects {
            sqlx::query(
                "UPDATE hub_ingested SET object = $1 \
                 WHERE device = $2 AND pipeline = $3 AND sink = $4 AND object = $5",
            )
            .bind(merged)
            .bind(device)
            .bind(pipeline)
            .bind(sink)
            .bind(object)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The database's clock, ms since the Unix epoch: what leases are judged by, so hubs
    /// whose clocks disagree still agree on who holds one.
    pub async fn database_now_ms(&self) -> Result<i64, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {}", self.now_sql())))
            .fetch_one(&self.writer)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// SQL for the database's clock in ms.
    fn now_sql(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS BIGINT)",
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// Takes or renews lease `name` for `holder` for `duration_ms` by the database's
    /// clock; gives the token that fences the holder's steps, or `None` when another
    /// holder has it.
    pub async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        duration_ms: i64,
    ) -> Result<Option<LeaseToken>, StoreError> {
        let now = self.database_now_ms().await?;
        let until = now.saturating_add(duration_ms);
        Ok(self
            .try_lease(name, holder, now, until)
            .await?
            .then(|| LeaseToken {
                name: name.to_owned(),
                value: lease_value(until, holder),
            }))
    }

    /// Takes or renews lease `name` for `holder` until `until_ms`, unless another holder
    /// has it past `now_ms`. Hubs sharing a database use it to do a job one at a time.
    ///
    /// The lease is a setting whose value is the expiry, zero-padded, then `:holder`, so
    /// "expired" is a string comparison both databases do alike.
    pub async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        // One statement: created if missing, else taken only when free or already ours.
        let taken = sqlx::query(
            "INSERT INTO hub_settings (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value \
             WHERE hub_settings.value < $3 OR substr(hub_settings.value, 22) = $4",
        )
        .bind(name)
        .bind(lease_value(until_ms, holder))
        .bind(format!("{now_ms:020}"))
        .bind(holder)
        .execute(&self.writer)
        .await?;
        Ok(taken.rows_affected() == 1)
    }

    /// The columns the table of `pipeline/sink` has taken, as
    /// [`Store::set_stream_columns`] last wrote them; `None` before its first batch.
    pub async fn stream_columns(
        &self,
        (pipeline, sink): (&str, &str),
    ) -> Result<Option<String>, StoreError> {
        let row =
            sqlx::query("SELECT columns FROM hub_stream_columns WHERE pipeline = $1 AND sink = $2")
                .bind(pipeline)
                .bind(sink)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|row| row.try_get(0)).transpose()?)
    }

    /// Sets the columns of `pipeline/sink` to `columns` if they are still `previous`
    /// (`None`: no columns yet); gives whether they were. Two hubs taking new columns for
    /// one table at once cannot both win: the loser reads them again.
    pub async fn set_stream_columns(
        &self,
        (pipeline, sink): (&str, &str),
        previous: Option<&str>,
        columns: &str,
    ) -> Result<bool, StoreError> {
        let done =
            match previous {
                None => sqlx::query(
                    "INSERT INTO hub_stream_columns (pipeline, sink, columns) VALUES ($1, $2, $3) \
                     ON CONFLICT (pipeline, sink) DO NOTHING",
                )
                .bind(pipeline)
                .bind(sink)
                .bind(columns)
                .execute(&self.writer)
                .await?,
                Some(previous) => {
                    sqlx::query(
                        "UPDATE hub_stream_columns SET columns = $3 \
                     WHERE pipeline = $1 AND sink = $2 AND columns = $4",
                    )
                    .bind(pipeline)
                    .bind(sink)
                    .bind(columns)
                    .bind(previous)
                    .execute(&self.writer)
                    .await?
                }
            };
        Ok(done.rows_affected() == 1)
    }

    /// The (pipeline, sink) streams `device` has shipped batches to.
    pub async fn device_streams(&self, device: &str) -> Result<Vec<(String, String)>, StoreError> {
        let rows =
            sqlx::query("SELECT DISTINCT pipeline, sink FROM hub_ingested WHERE device = $1")
                .bind(device)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    /// Every (pipeline, sink) devices have shipped data for.
    pub async fn shipped_streams(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT pipeline, sink FROM hub_streams ORDER BY pipeline, sink")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    /// Closes every connection (waiting for those in use).
    pub async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }
}

/// A lease's stored value: the expiry, zero-padded so that comparing text compares
/// times, then the holder.
fn lease_value(until_ms: i64, holder: &str) -> String {
    format!("{until_ms:020}:{holder}")
}

/// Bumps the fleet's change generation inside `tx` and returns the new value.
async fn bump_generation(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "UPDATE hub_changes SET generation = generation + 1 WHERE id = 1 RETURNING generation",
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.try_get("generation")?)
}

fn tags_json(tags: &BTreeMap<String, String>) -> String {
    // A map of strings always serialises.
    serde_json::to_string(tags).unwrap_or_else(|_| "{}".to_owned())
}

/// Counters are unsigned to Weir and BIGINT to the databases.
fn to_db(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_db(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn device_from_row(row: &sqlx::any::AnyRow) -> Result<DeviceRecord, StoreError> {
    let id: String = row.try_get("id")?;
    let tags = tags_from_row(row, &id)?;
    let report: Option<String> = row.try_get("report")?;
    let report = report
        .map(|json| serde_json::from_str(&json))
        .transpose()
        .map_err(|e| StoreError::Corrupt {
            what: format!("the report of device '{id}'"),
            message: e.to_string(),
        })?;
    Ok(DeviceRecord {
        tags,
        nonce: row.try_get("nonce")?,
        primary_generation: from_db(row.try_get("primary_generation")?),
        secondary_generation: from_db(row.try_get("secondary_generation")?),
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        created_ms: row.try_get("created_ms")?,
        last_seen_ms: row.try_get("last_seen_ms")?,
        report,
        reported_ms: row.try_get("reported_ms")?,
        id,
    })
}

fn tags_from_row(
    row: &sqlx::any::AnyRow,
    id: &str,
) -> Result<BTreeMap<String, String>, StoreError> {
    let tags: String = row.try_get("tags")?;
    serde_json::from_str(&tags).map_err(|e| StoreError::Corrupt {
        what: format!("the tags of device '{id}'"),
        message: e.to_string(),
    })
}

fn deployment_from_row(row: &sqlx::any::AnyRow) -> Result<DeploymentRecord, StoreError> {
    let name: String = row.try_get("name")?;
    let pipelines: String = row.try_get("pipelines")?;
    let pipelines = serde_json::from_str(&pipelines).map_err(|e| StoreError::Corrupt {
        what: format!("the pipelines of deployment '{name}'"),
        message: e.to_string(),
    })?;
    Ok(DeploymentRecord {
        version: from_db(row.try_get("version")?),
        revision: row.try_get("revision")?,
        priority: row.try_get("priority")?,
        target_condition: row.try_get("target_condition")?,
        pipelines,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_messages_hide_the_password() {
        assert_eq!(
            redact_url("postgres://weir:secret@db:5432/hub"),
            "postgres://weir:***@db:5432/hub"
        );
        assert_eq!(redact_url("postgres://db/hub"), "postgres://db/hub");
        assert_eq!(
            redact_url("postgres://db/hub?user=weir&password=secret&sslmode=require"),
            "postgres://db/hub?user=weir&password=***&sslmode=require"
        );
        assert_eq!(
            Database::choose(None, Path::new("/var/lib/weir-hub")).describe(),
            "SQLite database /var/lib/weir-hub/hub.db"
        );
    }

    #[tokio::test]
    async fn sqlite_writes_are_synced_before_they_are_acknowledged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&Database::Sqlite(dir.path().join("hub.db")))
            .await
            .expect("opens");
        let synchronous = |pool: AnyPool| async move {
            sqlx::query("PRAGMA synchronous")
                .fetch_one(&pool)
                .await
                .expect("reads")
                .try_get::<i64, _>(0)
                .expect("a number")
        };
        // 2 is FULL: every commit syncs the write-ahead log.
        assert_eq!(synchronous(store.writer.clone()).await, 2);
        let now = store.database_now_ms().await.expect("the clock");
        let ours = crate::protocol::now_ms();
        assert!((now - ours).abs() < 5_000, "database {now}, hub {ours}");
    }

    #[tokio::test]
    async fn a_hub_upgraded_to_migration_3_lists_its_streams_and_directories() {
        let dir = tempfile::tempdir().expect("temp dir");
        let database = Database::Sqlite(dir.path().join("hub.db"));
        let store = Store::open(&database).await.expect("opens");
        // The database as it was before migration 3, with batches in it.
        for statement in [
            "DROP TABLE hub_streams",
            "DROP INDEX hub_ingested_arrived",
            "ALTER TABLE hub_ingested DROP COLUMN directory",
            "DELETE FROM _sqlx_migrations WHERE version = 3",
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&store.writer)
                .await
                .expect(statement);
        }
        for (device, pipeline, sink, seq) in [
            ("a", "plant", "uplink", 0),
            ("a", "plant", "uplink", 1),
            ("b", "plant", "uplink", 0),
            ("b", "yard", "audit", 0),
        ] {
            sqlx::query(
                "INSERT INTO hub_ingested (device, pipeline, sink, seq, rows, object, arrived_ms) \
                 VALUES ($1, $2, $3, $4, 1, $5, 0)",
            )
            .bind(device)
            .bind(pipeline)
            .bind(sink)
            .bind(seq)
            .bind(format!(
                "pipeline={pipeline}/sink={sink}/date=2026-01-01/device={device}/{seq:020}.parquet"
            ))
            .execute(&store.writer)
            .await
            .expect("a batch");
        }
        store.close().await;

        let store = Store::open(&database).await.expect("migrates");
        let streams = store.shipped_streams().await.expect("lists");
        assert_eq!(
            streams,
            [
                ("plant".to_owned(), "uplink".to_owned()),
                ("yard".to_owned(), "audit".to_owned())
            ]
        );
        // Each batch's directory was filled in from its object.
        assert_eq!(
            store.directories_ingested_since(0).await.expect("lists"),
            [
                "pipeline=plant/sink=uplink/date=2026-01-01/device=a",
                "pipeline=plant/sink=uplink/date=2026-01-01/device=b",
                "pipeline=yard/sink=audit/date=2026-01-01/device=b",
            ]
        );
        store
            .record_ingested("c", ("dock", "uplink", 0), 1, "d/y", 1)
            .await
            .expect("records");
        assert_eq!(store.shipped_streams().await.expect("lists").len(), 3);
    }
}
