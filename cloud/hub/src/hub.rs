//! The hub's state: its store, its secret and admin token, the fleet it serves from
//! memory, and the background work that keeps that fleet current.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use weir_engine::Registry;
use weir_modules::{ModuleFactory, ModuleHost};
use weir_pipelines::{Diagnostic, PipelineSource};

use crate::data::{Compacted, FleetData, FleetLocation};
use crate::error::{StartError, StoreError};
use crate::fleet::{Fleet, FleetChange};
use crate::identity::{self, DeviceKey, HubSecret, KeySlot};
use crate::metrics::HubMetrics;
use crate::protocol::{Connection, PipelineDocument};
use crate::relay::QueryRelay;
use crate::store::{Database, DeviceCredentials, LeaseToken, Store};

/// The setting that holds the SHA-256 of a generated admin token.
const ADMIN_TOKEN_SETTING: &str = "admin_token_sha256";

/// How often heartbeats received are written, together.
const HEARTBEAT_FLUSH: Duration = Duration::from_secs(1);

/// Where the hub's secret comes from.
#[derive(Clone, Debug)]
pub enum SecretSource {
    /// A file holding it, created when missing.
    File(PathBuf),
    /// The secret itself, base64.
    Value(String),
}

/// How a hub runs.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Where it keeps its data (the SQLite database and the secret file by default).
    pub data_dir: PathBuf,
    /// Its database.
    pub database: Database,
    /// The secret device keys are derived from. Hubs sharing a database must share it.
    pub secret: SecretSource,
    /// The admin token; without one, a token is generated once and printed.
    pub admin_token: Option<String>,
    /// How often the hub looks for changes other hubs made to the shared database.
    pub sync_interval: Duration,
    /// A device that has not been heard from for this long is offline.
    pub offline_after: Duration,
    /// The longest a device's poll for its desired state is held open.
    pub max_poll_wait: Duration,
    /// Where the data devices ship is stored (`data_dir/fleet` by default).
    pub fleet_data: FleetLocation,
    /// The bounds on a query over the fleet's data; a request may ask for less.
    pub query_limits: weir_query::Limits,
    /// What the fleet may ask of this hub at once, and each device's quotas.
    pub limits: crate::limits::RequestLimits,
    /// The streams a device may ship to (any, by default).
    pub accept_streams: Vec<crate::limits::StreamRule>,
    /// How long the compaction lease lasts without renewal: a hub that stops while
    /// compacting holds the job up this long. Its files no record names are deleted
    /// only once twice as old.
    pub compaction_lease: Duration,
}

impl HubConfig {
    /// The defaults, keeping everything in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> HubConfig {
        let data_dir = data_dir.into();
        HubConfig {
            database: Database::Sqlite(data_dir.join("hub.db")),
            secret: SecretSource::File(data_dir.join("hub.secret")),
            fleet_data: FleetLocation::Directory(data_dir.join("fleet")),
            query_limits: weir_query::Limits::default(),
            data_dir,
            admin_token: None,
            sync_interval: Duration::from_secs(1),
            offline_after: Duration::from_secs(90),
            max_poll_wait: Duration::from_secs(60),
            compaction_lease: Duration::from_secs(5 * 60),
            limits: crate::limits::RequestLimits::default(),
            accept_streams: vec![crate::limits::StreamRule::any()],
        }
    }
}

/// A running hub's state, shared by its request handlers.
pub struct Hub {
    store: Store,
    secret: HubSecret,
    admin_digest: String,
    config: HubConfig,
    fleet: RwLock<Fleet>,
    changes: watch::Sender<i64>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// Heartbeats not written yet: each device's latest.
    heartbeats: Mutex<HashMap<String, i64>>,
    registry: Registry,
    metrics: HubMetrics,
    relay: QueryRelay,
    data: FleetData,
    /// This hub among those sharing the database (random, per start).
    instance: String,
    /// Counts requests against the configured limits.
    limiter: crate::limits::Limiter,
    /// The fleet's status as last computed, and when: `/status` and `/metrics` share it.
    status_cache: tokio::sync::Mutex<Option<StatusCacheEntry>>,
}

/// The fleet's status as computed at a fleet generation, at a time (ms).
pub type StatusCacheEntry = (i64, i64, crate::protocol::FleetStatus);

/// A hub that has just been opened.
pub struct Opened {
    /// The hub.
    pub hub: Arc<Hub>,
    /// The admin token, when this start generated it: shown once, never stored.
    pub generated_admin_token: Option<String>,
    /// Whether this start created the hub's secret file.
    pub created_secret: bool,
}

/// How often the shipped data's small files are looked at for compaction.
const COMPACT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The lease that lets one hub at a time compact ([`HubConfig::compaction_lease`] says
/// for how long without renewing).
const COMPACT_LEASE: &str = "compaction_lease";

/// How far back a hub's first pass looks (and the most a later one does).
const COMPACT_LOOKBACK_MS: i64 = 2 * 24 * 3600 * 1000;

/// The overlap between passes, covering batches being stored while a pass began.
const COMPACT_MARGIN_MS: i64 = 60 * 1000;

impl Hub {
    /// Opens the store (migrating it), loads or creates the secret and the admin token,
    /// and loads the fleet.
    pub async fn open(config: HubConfig) -> Result<Opened, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StoreError::Io {
            path: config.data_dir.clone(),
            source,
        })?;
        let store = Store::open(&config.database).await?;
        let (secret, created_secret) = match &config.secret {
            SecretSource::File(path) => HubSecret::load_or_create(path)?,
            SecretSource::Value(text) => (HubSecret::from_base64(text)?, false),
        };
        let (admin_digest, generated_admin_token) = match &config.admin_token {
            Some(token) => (identity::admin_token_digest(token), None),
            None => {
                let token = identity::generate_admin_token()?;
                let digest = identity::admin_token_digest(&token);
                let stored = store
                    .setting_or_insert(ADMIN_TOKEN_SETTING, &digest)
                    .await?;
                // Ours only if no earlier start (or another hub) had set one.
                let generated = (stored == digest).then_some(token);
                (stored, generated)
            }
        };
        let modules = Arc::new(ModuleHost::new(config.data_dir.join("modules")));
        let mut registry = weir_operators::registry::builtin();
        registry.register(Arc::new(ModuleFactory::new(modules)));
        // Deployments may ship to the hub; the hub itself never runs them.
        registry.register(Arc::new(weir_outbox::HubSinkFactory::new(None)));
        let data = FleetData::open(&config.fleet_data)
            .await?
            .with_compaction_lease(config.compaction_lease);
        let (changes, _) = watch::channel(-1);
        let config_limits = config.limits;
        let hub = Arc::new(Hub {
            store,
            secret,
            admin_digest,
            config,
            fleet: RwLock::new(Fleet::default()),
            changes,
            reloading: tokio::sync::Mutex::new(()),
            heartbeats: Mutex::default(),
            registry,
            metrics: HubMetrics::new(),
            relay: QueryRelay::default(),
            data,
            instance: identity::instance_id()?,
            limiter: crate::limits::Limiter::new(config_limits),
            status_cache: tokio::sync::Mutex::new(None),
        });
        hub.reload().await?;
        Ok(Opened {
            hub,
            generated_admin_token,
            created_secret,
        })
    }

    /// Starts the background work: following the store's change generation, and
    /// writing heartbeats. Abort the handles to stop it.
    pub fn spawn_background(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let sync = {
            let hub = Arc::clone(self);
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(hub.config.sync_interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    if let Err(e) = hub.refresh().await {
                        tracing::warn!("cannot read the fleet's changes: {e}");
                    }
                }
            })
        };
        let heartbeats = {
            let hub = Arc::clone(self);
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(HEARTBEAT_FLUSH);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    hub.flush_heartbeats().await;
                }
            })
        };
        let compaction = {
            let hub = Arc::clone(self);
            tokio::spawn(async move {
                // The first pass a while after start, not at once.
                let mut ticks = tokio::time::interval_at(
                    tokio::time::Instant::now() + COMPACT_INTERVAL,
                    COMPACT_INTERVAL,
                );
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut since = crate::protocol::now_ms() - COMPACT_LOOKBACK_MS;
                loop {
                    ticks.tick().await;
                    let started = crate::protocol::now_ms();
                    since = since.max(started - COMPACT_LOOKBACK_MS);
                    if hub.compact_once(since).await.is_some() {
                        // Batches whose record was written after the pass read them
                        // arrived at most a store timeout before it began.
                        since = started - COMPACT_MARGIN_MS;
                    }
                }
            })
        };
        vec![sync, heartbeats, compaction]
    }

    /// One compaction pass over the directories that received batches since `since_ms`
    /// (never the whole store), if this hub holds the compaction lease: hubs sharing a
    /// database compact one at a time, so two never merge the same files. The lease is
    /// renewed before each directory, and a hub that finds it lost stops. A directory
    /// that fails is logged and left for a later batch to bring back. `None` when the
    /// pass did not run or stopped.
    pub async fn compact_once(&self, since_ms: i64) -> Option<Compacted> {
        self.hold_compaction_lease().await?;
        let directories = match self.store.directories_ingested_since(since_ms).await {
            Ok(directories) => directories,
            Err(e) => {
                tracing::warn!("cannot find the shipped data to compact: {e}");
                return None;
            }
        };
        let mut done = Compacted::default();
        for directory in directories {
            let fence = self.hold_compaction_lease().await?;
            match self
                .data
                .compact_directory(&self.store, &directory, &fence)
                .await
            {
                Ok(0) => {}
                Ok(files) => {
                    done.directories += 1;
                    done.merged += files;
                }
                Err(e) => tracing::warn!("cannot compact the shipped data in {directory}: {e}"),
            }
        }
        if done.merged > 0 {
            tracing::info!(
                "compacted {} files of shipped data in {} directories",
                done.merged,
                done.directories
            );
        }
        Some(done)
    }

    /// Takes or renews the compaction lease for [`HubConfig::compaction_lease`], by the
    /// database's clock; gives the token that fences this hub's compaction steps.
    async fn hold_compaction_lease(&self) -> Option<LeaseToken> {
        match self
            .store
            .take_lease(
                COMPACT_LEASE,
                &self.instance,
                i64::try_from(self.config.compaction_lease.as_millis()).unwrap_or(i64::MAX),
            )
            .await
        {
            Ok(token) => token,
            Err(e) => {
                tracing::warn!("cannot take the compaction lease: {e}");
                None
            }
        }
    }

    /// Counts requests against the configured limits.
    pub fn limiter(&self) -> &crate::limits::Limiter {
        &self.limiter
    }

    /// The fleet's status as last computed: (fleet generation, when, status).
    pub fn status_cache(&self) -> &tokio::sync::Mutex<Option<StatusCacheEntry>> {
        &self.status_cache
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The hub's configuration.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// The data the devices ship.
    pub fn data(&self) -> &FleetData {
        &self.data
    }

    /// The queries forwarded to devices, waiting for their answers.
    pub fn relay(&self) -> &QueryRelay {
        &self.relay
    }

    /// The hub's metrics.
    pub fn metrics(&self) -> &HubMetrics {
        &self.metrics
    }

    /// Reads the fleet. `read` must be quick: polls wait while the fleet changes.
    pub fn with_fleet<R>(&self, read: impl FnOnce(&Fleet) -> R) -> R {
        read(&self.fleet.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Changes to the fleet: the receiver sees each new generation.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.changes.subscribe()
    }

    /// Takes in a change this hub wrote at `generation`: applied in place when nothing
    /// came in between, otherwise by reading the whole fleet again.
    pub async fn applied(&self, generation: i64, change: FleetChange) -> Result<(), StoreError> {
        let in_place = self
            .fleet
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .apply(generation, change);
        if in_place {
            self.changes.send_replace(generation);
            Ok(())
        } else {
            self.reload().await
        }
    }

    /// Takes in a change to the deployments this hub wrote at `generation`.
    pub async fn deployments_changed(&self, generation: i64) -> Result<(), StoreError> {
        let deployments = self.store.deployments().await?;
        self.applied(generation, FleetChange::Deployments(deployments))
            .await
    }

    /// Reads the whole fleet again if the store's change generation moved past this
    /// hub's: another hub changed it. Runs every `sync_interval`.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let generation = self.store.generation().await?;
        if generation > self.with_fleet(|fleet| fleet.generation) {
            self.reload().await?;
        }
        Ok(())
    }

    /// Reads the whole fleet from the store.
    async fn reload(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        // Read at or after `generation`: a change made meanwhile is applied again on
        // top (changes are idempotent), or picked up by the next refresh.
        let generation = self.store.generation().await?;
        if generation <= self.with_fleet(|fleet| fleet.generation) && *self.changes.borrow() != -1 {
            return Ok(());
        }
        let deployments = self.store.deployments().await?;
        let tags = self.store.device_tags().await?;
        let fleet = Fleet::new(generation, deployments, tags);
        {
            let mut current = self.fleet.write().unwrap_or_else(|e| e.into_inner());
            // A change applied in place while this read ran may be newer.
            if fleet.generation >= current.generation {
                *current = fleet;
            }
        }
        self.changes.send_replace(generation);
        Ok(())
    }

    /// Checks a deployment's pipelines with the validator `weir validate` uses: the same
    /// operators, the same messages. Files are named `DEPLOYMENT/DOCUMENT.yaml`.
    ///
    /// The hub cannot know each device's environment, so it validates with an empty
    /// one: `${VAR:-default}` is checked with its default, and `${VAR}` without a
    /// default is refused.
    pub fn validate_pipelines(
        &self,
        deployment: &str,
        pipelines: &[PipelineDocument],
    ) -> Vec<Diagnostic> {
        let sources: Vec<PipelineSource> = pipelines
            .iter()
            .map(|document| PipelineSource {
                file: Path::new(deployment).join(format!("{}.yaml", document.name)),
                text: document.yaml.clone(),
                base: PathBuf::from("."),
            })
            .collect();
        let no_env = |_: &str| None;
        let (_, diagnostics) = weir_pipelines::validate_sources(&sources, &self.registry, &no_env);
        diagnostics
    }

    /// The key in `slot` of `device`.
    pub fn device_key(&self, device: &DeviceCredentials, slot: KeySlot) -> DeviceKey {
        self.secret
            .device_key(&device.id, &device.nonce, slot, device.generation(slot))
    }

    /// Whether `token` is the admin token.
    pub fn is_admin_token(&self, token: &str) -> bool {
        identity::admin_token_matches(token, &self.admin_digest)
    }

    /// Notes a heartbeat from `device`; it is written within a second.
    pub fn heartbeat(&self, device: &str, at_ms: i64) {
        let mut pending = self.heartbeats.lock().unwrap_or_else(|e| e.into_inner());
        pending.insert(device.to_owned(), at_ms);
    }

    /// Writes the heartbeats noted since the last flush.
    pub async fn flush_heartbeats(&self) {
        let beats: Vec<(String, i64)> = {
            let mut pending = self.heartbeats.lock().unwrap_or_else(|e| e.into_inner());
            pending.drain().collect()
        };
        if let Err(e) = self.store.record_heartbeats(&beats).await {
            tracing::warn!("cannot record {} heartbeats: {e}", beats.len());
            // Keep them for the next flush, unless a newer one came meanwhile.
            let mut pending = self.heartbeats.lock().unwrap_or_else(|e| e.into_inner());
            for (device, at_ms) in beats {
                pending.entry(device).or_insert(at_ms);
            }
        }
    }

    /// Whether a device last heard from at `last_seen_ms` is online now.
    pub fn connection(&self, last_seen_ms: Option<i64>, now_ms: i64) -> Connection {
        match last_seen_ms {
            None => Connection::Never,
            Some(seen) => {
                let limit =
                    i64::try_from(self.config.offline_after.as_millis()).unwrap_or(i64::MAX);
                if now_ms.saturating_sub(seen) <= limit {
                    Connection::Online
                } else {
                    Connection::Offline
                }
            }
        }
    }
}
