//! The fleet's data: batches the devices' `hub` sinks ship, each stored once as a
//! Parquet file in an object store (a local directory by default, or an S3-compatible
//! bucket), and read-only SQL over all of them on DataFusion.
//!
//! A batch is identified by (device, pipeline, sink, sequence). The hub records each
//! batch it has stored; one sent again is acknowledged without being stored twice. Its
//! file's name is derived from that identity and the time the device stored it
//! (`pipeline=P/sink=S/date=D/device=ID/SEQ.parquet`), so a batch re-sent after the hub
//! crashed between writing the file and recording it overwrites the same file.
//!
//! Every file carries the batch's columns plus `hub_device` (the device that shipped it)
//! and `hub_arrived_at` (when the hub first stored it). Each (pipeline, sink) is a table
//! `"pipeline"."sink"`, and plain `sink` when no other pipeline has a sink of that name.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use tokio::sync::Semaphore;
use weir_engine::ipc::{IpcError, IpcLimits, decode_within};
use weir_query::{QueryError, Session};

use crate::error::StoreError;
use crate::store::{LeaseToken, Store};

/// Why a shipped batch could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Where the data is to be kept is not a location the hub can use.
    #[error("{0}")]
    Location(String),
    /// The store cannot be reached, or refuses the hub.
    #[error("cannot use the fleet's data store {location}: {message}")]
    Unreachable {
        /// The location, as configured.
        location: String,
        /// Why.
        message: String,
    },
    /// The batch is not Arrow IPC.
    #[error("the batch is not Arrow IPC: {0}")]
    BadBatch(String),
    /// The batch is Arrow IPC the hub does not take: past its limits, cut off, or in a
    /// codec it refuses.
    #[error("the batch is refused: {0}")]
    Refused(#[from] IpcError),
    /// The object store refused it.
    #[error("cannot store the batch: {0}")]
    Storage(String),
    /// The batch does not fit its table: a column the table has in another type, a
    /// column named like the hub's own, or a pipeline named like a namespace.
    #[error("{0}")]
    Conflict(String),
    /// A stored file does not read as Parquet.
    #[error("{object} is damaged: {message}")]
    Damaged {
        /// The file.
        object: String,
        /// Why it does not read.
        message: String,
    },
    /// The rows cannot be written as Parquet (a type Parquet has no place for).
    #[error("cannot write the batch as Parquet: {0}")]
    Encode(String),
    /// The database refused the record.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What became of a shipped batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// Stored now, with this many rows.
    Stored(u64),
    /// Stored before: acknowledged, not stored again.
    Duplicate,
}

/// One shipped batch's identity.
#[derive(Clone, Copy, Debug)]
pub struct BatchId<'a> {
    /// The device that shipped it.
    pub device: &'a str,
    /// Its pipeline.
    pub pipeline: &'a str,
    /// Its sink.
    pub sink: &'a str,
    /// Its place in the sink's stream.
    pub seq: u64,
    /// When the device stored it, ms since the Unix epoch (which day's directory).
    pub appended_ms: i64,
}

/// A day's directory of one device's batches is compacted once it holds this many files.
pub const COMPACT_MIN_FILES: usize = 16;

/// Files at least this large are left as they are.
const COMPACT_MAX_FILE_BYTES: u64 = 8 << 20;

/// The most a merged file gathers, as its rows take memory once decoded: what
/// compaction holds in memory at once (plus one input file).
pub const COMPACT_TARGET_BYTES: u64 = 64 << 20;

/// What a shipped batch may declare. A device's batches are a sink's output (aggregates,
/// typically thousands of rows); these leave room for far larger ones while keeping what
/// one request can make the hub allocate to a known amount.
pub const INGEST_LIMITS: IpcLimits = IpcLimits {
    max_rows: 8_000_000,
    max_columns: 1024,
    max_decoded_bytes: 512 << 20,
    allow_zstd: true,
    require_end_marker: true,
};

/// What one compaction pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Directories compacted.
    pub directories: usize,
    /// Files merged (and deleted).
    pub merged: usize,
}

/// Where the fleet's data is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetLocation {
    /// A directory on the hub's file system.
    Directory(PathBuf),
    /// An S3-compatible bucket.
    S3(S3Location),
}

/// An S3-compatible bucket and the prefix the fleet's data goes under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    /// The bucket.
    pub bucket: String,
    /// The key prefix, without slashes at either end (empty: the whole bucket).
    pub prefix: String,
    /// Settings on top of the `AWS_*` environment, by their `object_store` names
    /// (`aws_endpoint`, `aws_allow_http`, `aws_access_key_id`, …).
    pub settings: Vec<(String, String)>,
}

impl std::str::FromStr for FleetLocation {
    type Err = DataError;

    /// `s3://bucket[/prefix]`, `file:///directory`, or a plain directory path.
    fn from_str(text: &str) -> Result<FleetLocation, DataError> {
        let Some((scheme, rest)) = text.split_once("://") else {
            if text.trim().is_empty() {
                return Err(DataError::Location(
                    "the fleet's data location is empty: give a directory or s3://bucket/prefix"
                        .into(),
                ));
            }
            return Ok(FleetLocation::Directory(PathBuf::from(text)));
        };
        match scheme {
            "file" if rest.starts_with('/') => Ok(FleetLocation::Directory(PathBuf::from(rest))),
            "file" => Err(DataError::Location(format!(
                "{text}: a file URL needs an absolute path (file:///var/lib/weir-hub/fleet)"
            ))),
            "s3" | "s3a" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(DataError::Location(format!(
                        "{text}: name the bucket (s3://bucket/prefix)"
                    )));
                }
                let plain = |part: &str| {
                    part.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '='))
                };
                if !plain(bucket) {
                    return Err(DataError::Location(format!(
                        "{text}: a bucket name is letters, digits, '.', '_' and '-'"
                    )));
                }
                let parts: Vec<&str> = prefix.split('/').filter(|part| !part.is_empty()).collect();
                if let Some(part) = parts
                    .iter()
                    .find(|part| !plain(part) || **part == "." || **part == "..")
                {
                    return Err(DataError::Location(format!(
                        "{text}: `{part}` cannot be part of the prefix; use letters, digits, \
                         '.', '_', '-' and '=' between slashes"
                    )));
                }
                Ok(FleetLocation::S3(S3Location {
                    bucket: bucket.to_owned(),
                    prefix: parts.join("/"),
                    settings: Vec::new(),
                }))
            }
            other => Err(DataError::Location(format!(
                "{text}: the hub keeps fleet data in a directory or an S3-compatible bucket \
                 (s3://bucket/prefix), not in a `{other}` store"
            ))),
        }
    }
}

impl std::fmt::Display for FleetLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FleetLocation::Directory(dir) => write!(f, "{}", dir.display()),
            FleetLocation::S3(s3) if s3.prefix.is_empty() => write!(f, "s3://{}", s3.bucket),
            FleetLocation::S3(s3) => write!(f, "s3://{}/{}", s3.bucket, s3.prefix),
        }
    }
}

/// How long an object store request is retried before it fails (object_store's default
/// is 3 minutes).
const STORE_RETRY_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest storing a batch may take, retries included: well inside a device's
/// 30-second request timeout, so it hears a clear 503 (and keeps the batch to send
/// again) rather than timing out.
const STORE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a table's schema is trusted before the files are read again: what another
/// hub sharing the store ingested in a new shape shows within this.
const SCHEMA_TTL: Duration = Duration::from_secs(60);

/// The URL queries know the fleet's store by: the store is registered under it in every
/// session, rooted at the configured location, so reads and writes name objects alike.
const QUERY_ROOT: &str = "weir-fleet://data/";

/// An object written and deleted at start, to learn that the hub may write there (its
/// name made unique per start, so hubs starting together do not trip on each other's).
const WRITE_CHECK: &str = "weir-hub-write-check";

/// Where unreadable files are moved, under the store's root: outside every table.
pub const QUARANTINE: &str = "quarantine";

/// What the hub's own columns start with; no shipped column may.
pub const HUB_COLUMN_PREFIX: &str = "hub_";

/// Names a pipeline cannot have on the hub: the query session's own namespaces. A
/// pipeline named `public` would otherwise decide what every unqualified table name
/// means.
pub const RESERVED_PIPELINES: [&str; 2] = [Session::DEFAULT_NAMESPACE, "information_schema"];

/// The fleet's stored data.
pub struct FleetData {
    /// The store, rooted at the location.
    objects: Arc<dyn ObjectStore>,
    /// The directory, when the store is the local file system: object_store writes
    /// files without syncing them, so the hub syncs each before it acknowledges.
    local_root: Option<PathBuf>,
    /// What is known of each table's schema, so a query does not read every file's footer.
    schemas: Arc<SchemaCache>,
    /// What a shipped batch may declare.
    ingest_limits: IpcLimits,
    /// Batches being decoded and converted to Parquet at once: each may take up to
    /// `ingest_limits.max_decoded_bytes`, so this bounds the memory ingest takes.
    converting: Arc<Semaphore>,
    /// See [`COMPACT_TARGET_BYTES`].
    compact_target_bytes: u64,
    /// A merged file no record names is deleted once it is this old: it was left by a
    /// pass that stopped before pointing the records at it. A younger one may be
    /// another hub's, about to be pointed at; past twice the lease, that hub's pointing
    /// would be refused.
    stale_merged_after_ms: i64,
    /// Files quarantined since start.
    quarantined: std::sync::atomic::AtomicU64,
    /// The columns each table is known to have taken (they only ever grow), so a batch
    /// in a known shape is admitted without asking the database.
    admitted: Mutex<HashMap<(String, String), SchemaRef>>,
}

/// Each table's schema as last read from its files, by (pipeline, sink).
#[derive(Debug, Default)]
struct SchemaCache(Mutex<HashMap<(String, String), KnownSchema>>);

/// A table's schema as last read from its files.
#[derive(Debug, Default)]
struct KnownSchema {
    /// The schema, and when it was read.
    read: Option<(SchemaRef, Instant)>,
    /// Bumped when a stored file brings a column the schema lacks; a schema read while
    /// it moved is not kept.
    generation: u64,
}

impl FleetData {
    /// Data kept under `dir` on the local file system.
    pub fn local(dir: &Path) -> Result<FleetData, DataError> {
        let unreachable = |message: String| DataError::Unreachable {
            location: dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| unreachable(format!("cannot create it: {e}")))?;
        let root = dir.canonicalize().map_err(|e| unreachable(e.to_string()))?;
        let objects =
            LocalFileSystem::new_with_prefix(&root).map_err(|e| unreachable(e.to_string()))?;
        let mut data = FleetData::new(Arc::new(objects));
        data.local_root = Some(root);
        Ok(data)
    }

    /// Opens the data at `location`, checking that the hub can list it and write to it:
    /// a bucket that does not exist, or credentials that do not allow both, stop the
    /// hub at start, not at the first batch.
    pub async fn open(location: &FleetLocation) -> Result<FleetData, DataError> {
        let unreachable = |message: String| DataError::Unreachable {
            location: location.to_string(),
            message,
        };
        let data = match location {
            FleetLocation::Directory(dir) => FleetData::local(dir)?,
            FleetLocation::S3(s3) => FleetData::new(FleetData::bucket(s3, location)?),
        };
        let check = ObjectPath::from(format!(
            "{WRITE_CHECK}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos())
        ));
        data.objects
            .list_with_delimiter(None)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        data.objects
            .put(
                &check,
                "the hub checks at start that it may write here".into(),
            )
            .await
            .map_err(|e| unreachable(format!("cannot write: {e}")))?;
        data.delete(&check)
            .await
            .map_err(|e| unreachable(format!("cannot delete: {e}")))?;
        Ok(data)
    }

    /// The bucket `s3` names, rooted at its prefix.
    fn bucket(
        s3: &S3Location,
        location: &FleetLocation,
    ) -> Result<Arc<dyn ObjectStore>, DataError> {
        let unreachable = |message: String| DataError::Unreachable {
            location: location.to_string(),
            message,
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&s3.bucket)
            .with_retry(RetryConfig {
                retry_timeout: STORE_RETRY_TIMEOUT,
                ..RetryConfig::default()
            });
        for (key, value) in &s3.settings {
            let key: AmazonS3ConfigKey = key
                .parse()
                .map_err(|_| DataError::Location(format!("`{key}` is not an S3 setting")))?;
            builder = builder.with_config(key, value);
        }
        let bucket = builder.build().map_err(|e| unreachable(e.to_string()))?;
        Ok(if s3.prefix.is_empty() {
            Arc::new(bucket)
        } else {
            Arc::new(PrefixStore::new(bucket, s3.prefix.as_str()))
        })
    }

    fn new(objects: Arc<dyn ObjectStore>) -> FleetData {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        FleetData {
            objects,
            local_root: None,
            schemas: Arc::default(),
            ingest_limits: INGEST_LIMITS,
            converting: Arc::new(Semaphore::new(cores)),
            compact_target_bytes: COMPACT_TARGET_BYTES,
            stale_merged_after_ms: 2 * 5 * 60 * 1000,
            quarantined: std::sync::atomic::AtomicU64::new(0),
            admitted: Mutex::default(),
        }
    }

    /// The same data, with other limits on what a shipped batch may declare.
    pub fn with_ingest_limits(mut self, limits: IpcLimits) -> FleetData {
        self.ingest_limits = limits;
        self
    }

    /// The same data, compacted under a lease of `lease`.
    pub fn with_compaction_lease(mut self, lease: Duration) -> FleetData {
        self.stale_merged_after_ms = i64::try_from(lease.as_millis())
            .unwrap_or(i64::MAX / 2)
            .saturating_mul(2);
        self
    }

    /// The same data, compacted into merged files of about `bytes` (decoded) each.
    pub fn with_compact_target(mut self, bytes: u64) -> FleetData {
        self.compact_target_bytes = bytes;
        self
    }

    /// Stores a shipped batch (zstd Arrow IPC, as the device's outbox holds it) once.
    pub async fn ingest(
        &self,
        store: &Store,
        id: BatchId<'_>,
        payload: bytes::Bytes,
        now_ms: i64,
    ) -> Result<Ingested, DataError> {
        let seq = i64::try_from(id.seq).map_err(|_| DataError::BadBatch("seq too large".into()))?;
        if RESERVED_PIPELINES.contains(&id.pipeline) {
            return Err(DataError::Conflict(format!(
                "a pipeline cannot be named `{}` on the hub: it is a namespace of the fleet's \
                 tables; rename the pipeline",
                id.pipeline
            )));
        }
        if store.ingested(id.device, id.pipeline, id.sink, seq).await? {
            return Ok(Ingested::Duplicate);
        }
        // Decoding and encoding are CPU work of up to the limits' size: off the async
        // workers, a few at a time.
        let _permit = self
            .converting
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| DataError::Storage("the hub is shutting down".into()))?;
        let limits = self.ingest_limits;
        let device = id.device.to_owned();
        let (rows, parquet, schema) = tokio::task::spawn_blocking(move || {
            let (_, batches) = decode_within(&payload, &limits)?;
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            let (parquet, schema) = to_parquet(&batches, &device, now_ms)?;
            Ok::<_, DataError>((rows, parquet, schema))
        })
        .await
        .map_err(|e| DataError::Encode(format!("converting the batch failed: {e}")))??;
        drop(_permit);
        self.admit_columns(store, (id.pipeline, id.sink), &schema)
            .await?;
        // A device whose clock was not set when it stored the batch (booted at 1970,
        // before NTP), or runs far ahead, says nothing true about its day: the batch is
        // filed by its arrival.
        let plausible = weir_outbox::PLAUSIBLE_SINCE_MS..=now_ms.saturating_add(86_400_000);
        let filed_ms = if plausible.contains(&id.appended_ms) {
            id.appended_ms
        } else {
            now_ms
        };
        let date = chrono::DateTime::from_timestamp_millis(filed_ms)
            .unwrap_or_default()
            .format("%Y-%m-%d")
            .to_string();
        let object = ObjectPath::from_iter([
            format!("pipeline={}", id.pipeline),
            format!("sink={}", id.sink),
            format!("date={date}"),
            format!("device={}", id.device),
            format!("{:020}.parquet", id.seq),
        ]);
        tokio::time::timeout(STORE_TIMEOUT, self.objects.put(&object, parquet.into()))
            .await
            .map_err(|_| {
                DataError::Storage(format!(
                    "the store did not take it within {STORE_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| DataError::Storage(e.to_string()))?;
        self.make_durable(&object).await?;
        self.schemas
            .forget_unless_it_holds((id.pipeline, id.sink), &schema);
        store
            .record_ingested(
                id.device,
                (id.pipeline, id.sink, seq),
                rows as i64,
                object.as_ref(),
                now_ms,
            )
            .await?;
        Ok(Ingested::Stored(rows as u64))
    }

    /// Checks that `schema` (a stored file's, with the hub's columns) fits the table of
    /// `pipeline/sink`: no column it shares with the table has another type. Its new
    /// columns become the table's.
    async fn admit_columns(
        &self,
        store: &Store,
        (pipeline, sink): (&str, &str),
        schema: &Schema,
    ) -> Result<(), DataError> {
        let key = (pipeline.to_owned(), sink.to_owned());
        let shipped: Vec<&arrow::datatypes::FieldRef> = schema
            .fields()
            .iter()
            .filter(|field| !field.name().starts_with(HUB_COLUMN_PREFIX))
            .collect();
        let fits = |known: &Schema| {
            shipped.iter().all(|field| {
                known
                    .field_with_name(field.name())
                    .is_ok_and(|known| known.data_type() == field.data_type())
            })
        };
        if self
            .lock_admitted()
            .get(&key)
            .is_some_and(|known| fits(known))
        {
            return Ok(());
        }
        // Another hub may take new columns for the same table at once: whoever loses
        // the compare-and-set reads the columns again.
        for _ in 0..8 {
            let text = store.stream_columns((pipeline, sink)).await?;
            let mut columns: Vec<arrow::datatypes::FieldRef> = match &text {
                Some(text) => decode_columns(text)?.fields().to_vec(),
                None => Vec::new(),
            };
            let mut grew = text.is_none();
            for field in &shipped {
                match columns.iter().find(|known| known.name() == field.name()) {
                    Some(known) if known.data_type() != field.data_type() => {
                        return Err(DataError::Conflict(format!(
                            "column `{}` is {} in this batch, but {} in the table \
                             {pipeline}.{sink}: a column keeps its type (give the new one \
                             another name)",
                            field.name(),
                            field.data_type(),
                            known.data_type()
                        )));
                    }
                    Some(_) => {}
                    None => {
                        columns.push(Arc::clone(field));
                        grew = true;
                    }
                }
            }
            let known = Arc::new(Schema::new(columns));
            if !grew
                || store
                    .set_stream_columns((pipeline, sink), text.as_deref(), &encode_columns(&known)?)
                    .await?
            {
                self.lock_admitted().insert(key, known);
                return Ok(());
            }
        }
        Err(DataError::Storage(format!(
            "the columns of {pipeline}.{sink} keep changing under other hubs"
        )))
    }

    fn lock_admitted(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), SchemaRef>> {
        self.admitted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Merges the small files of `directory`, [`COMPACT_MIN_FILES`] or more at a time,
    /// into files of up to [`COMPACT_TARGET_BYTES`], so queries open few files; returns
    /// how many were merged. ([`crate::Hub::compact_once`] picks the directories.)
    ///
    /// Every batch's record names the file that holds it, and that is what decides:
    /// - a file some record names is merged; the merged file is written, the records are
    ///   pointed at it (one transaction), and only then are the small files deleted;
    /// - a file no record names any more (left by a pass that stopped between pointing
    ///   the records and deleting, or a merged file written by a pass that stopped
    ///   before pointing them) only repeats rows held elsewhere, and is deleted;
    /// - a batch's file with no record at all (being stored right now, or the hub
    ///   stopped before recording it) is left alone: sent again, it is stored once.
    ///
    /// So a pass that stops anywhere loses no row and, once the next pass has run,
    /// leaves none twice. (A query running in between can see some rows twice.)
    ///
    /// Only the holder of the compaction lease compacts, and `fence` is its token: the
    /// records are pointed at a merged file only while the lease is still as it took it,
    /// and a merged file no record names is deleted only once it is older than
    /// twice the compaction lease (by the database's clock), so a hub that lost its lease
    /// midway can neither repoint records nor delete another hub's file in the making.
    pub async fn compact_directory(
        &self,
        store: &Store,
        directory: &str,
        fence: &LeaseToken,
    ) -> Result<usize, DataError> {
        use futures::TryStreamExt;
        let Some((pipeline, sink, device)) = directory_stream(directory) else {
            return Ok(0);
        };
        let batches = store
            .batches_in(device, (pipeline, sink), directory)
            .await?;
        let named: std::collections::HashSet<&str> =
            batches.iter().map(|(_, object)| object.as_str()).collect();
        let recorded: std::collections::HashSet<i64> =
            batches.iter().map(|(seq, _)| *seq).collect();
        let stale_before = store.database_now_ms().await? - self.stale_merged_after_ms;
        let prefix = ObjectPath::from(directory);
        let listed: Vec<object_store::ObjectMeta> = self
            .objects
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| DataError::Storage(e.to_string()))?;
        let mut live: Vec<object_store::ObjectMeta> = Vec::new();
        let mut stale = Vec::new();
        for file in listed {
            let Some(stem) = file.location.prefix_match(&prefix).and_then(|mut rest| {
                match (rest.next(), rest.next()) {
                    (Some(name), None) => name.as_ref().strip_suffix(".parquet").map(str::to_owned),
                    _ => None,
                }
            }) else {
                continue;
            };
            if named.contains(file.location.as_ref()) {
                if file.size < COMPACT_MAX_FILE_BYTES {
                    live.push(file);
                }
            } else if merged_name(&stem)
                .is_some_and(|_| file.last_modified.timestamp_millis() < stale_before)
                || batch_name(&stem).is_some_and(|seq| recorded.contains(&seq))
            {
                stale.push(file);
            }
        }
        for file in &stale {
            self.delete(&file.location)
                .await
                .map_err(|e| DataError::Storage(e.to_string()))?;
        }
        live.sort_by(|a, b| a.location.cmp(&b.location));
        // Groups are sized by what their rows take decoded, not by their compressed
        // files: a few megabytes of zstd can hold gigabytes of repeated values. Each
        // file is read once, and a group is merged before the next file would take it
        // past the target.
        let mut merged = 0;
        let mut group = Group::default();
        for file in live {
            let batches = match self.read_parquet(&file.location).await {
                Ok(batches) => batches,
                Err(DataError::Damaged { object, message }) => {
                    self.quarantine(&file.location, &message).await?;
                    tracing::error!("quarantined {object}, which does not read: {message}");
                    continue;
                }
                Err(other) => return Err(other),
            };
            let bytes: u64 = batches
                .iter()
                .map(|batch| batch.get_array_memory_size() as u64)
                .sum();
            if !group.files.is_empty() && group.bytes + bytes > self.compact_target_bytes {
                merged += self
                    .merge(
                        store,
                        (device, pipeline, sink),
                        directory,
                        std::mem::take(&mut group),
                        fence,
                    )
                    .await?;
            }
            group.files.push(file);
            group.batches.extend(batches);
            group.bytes += bytes;
        }
        merged += self
            .merge(store, (device, pipeline, sink), directory, group, fence)
            .await?;
        Ok(merged)
    }

    /// The rows of the Parquet file `object`.
    async fn read_parquet(&self, object: &ObjectPath) -> Result<Vec<RecordBatch>, DataError> {
        let bytes = self
            .objects
            .get(object)
            .await
            .map_err(|e| DataError::Storage(e.to_string()))?
            .bytes()
            .await
            .map_err(|e| DataError::Storage(e.to_string()))?;
        let damaged = |e: &dyn std::fmt::Display| DataError::Damaged {
            object: object.to_string(),
            message: e.to_string(),
        };
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|builder| builder.build())
            .map_err(|e| damaged(&e))?;
        reader.map(|batch| batch.map_err(|e| damaged(&e))).collect()
    }

    /// Merges a group of files (sorted) of `directory` into one, when it has at least
    /// [`COMPACT_MIN_FILES`]; returns how many were merged.
    async fn merge(
        &self,
        store: &Store,
        (device, pipeline, sink): (&str, &str, &str),
        directory: &str,
        Group { files, batches, .. }: Group,
        fence: &LeaseToken,
    ) -> Result<usize, DataError> {
        if files.len() < COMPACT_MIN_FILES {
            return Ok(0);
        }
        let Some(schema) = batches.first().map(RecordBatch::schema) else {
            return Ok(0);
        };
        if batches.iter().any(|batch| batch.schema() != schema) {
            // A pipeline whose output changed shape mid-day: left as it is.
            return Ok(0);
        }
        // Named after the first and last batch it holds (merged files included).
        let span = |file: &object_store::ObjectMeta| {
            let stem = file
                .location
                .filename()
                .unwrap_or_default()
                .trim_end_matches(".parquet");
            merged_name(stem).or_else(|| batch_name(stem).map(|seq| (seq, seq)))
        };
        let (Some((first, _)), Some((_, last))) = (span(&files[0]), span(&files[files.len() - 1]))
        else {
            return Ok(0);
        };
        let target = ObjectPath::from(format!("{directory}/{first:020}-{last:020}.parquet"));
        if files.iter().any(|file| file.location == target) {
            // Only if the files were already merged as they are: nothing to do.
            return Ok(0);
        }
        let merged = write_parquet(&schema, &batches)?;
        drop(batches);
        self.objects
            .put(&target, merged.into())
            .await
            .map_err(|e| DataError::Storage(e.to_string()))?;
        // On disk before any record names it instead of its inputs.
        self.make_durable(&target).await?;
        let inputs: Vec<String> = files.iter().map(|file| file.location.to_string()).collect();
        store
            .repoint_batches(device, (pipeline, sink), &inputs, target.as_ref(), fence)
            .await?;
        for file in &files {
            self.delete(&file.location)
                .await
                .map_err(|e| DataError::Storage(e.to_string()))?;
        }
        Ok(files.len())
    }

    /// Moves the unreadable file `object` under `quarantine/` (same path), where queries
    /// do not read it and an operator can look at it; counted in
    /// `weir_hub_quarantined_files`.
    async fn quarantine(&self, object: &ObjectPath, why: &str) -> Result<(), DataError> {
        let to = ObjectPath::from(format!("{QUARANTINE}/{object}"));
        self.objects
            .rename(object, &to)
            .await
            .map_err(|e| DataError::Storage(format!("cannot quarantine {object} ({why}): {e}")))?;
        self.quarantined
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Files this hub has quarantined since it started.
    pub fn quarantined(&self) -> u64 {
        self.quarantined.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Syncs a file just written to the local file system, and the directories that
    /// hold it up to the root (they may be new), so that it survives a power cut. An
    /// object store (S3) answers a write only once it is durable.
    async fn make_durable(&self, object: &ObjectPath) -> Result<(), DataError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        let path = object
            .parts()
            .fold(root.clone(), |path, part| path.join(part.as_ref()));
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(&path)?.sync_all()?;
            for dir in path.ancestors().skip(1) {
                std::fs::File::open(dir)?.sync_all()?;
                if dir == root {
                    break;
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(|e| DataError::Storage(e.to_string()))?
        .map_err(|e| DataError::Storage(format!("cannot sync {object} to disk: {e}")))
    }

    /// Deletes `object`; one already gone is fine.
    async fn delete(&self, object: &ObjectPath) -> object_store::Result<()> {
        match self.objects.delete(object).await {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            done => done,
        }
    }

    /// A query session with every shipped (pipeline, sink) as a table
    /// `"pipeline"."sink"`, and `sink` where no other pipeline has one of that name.
    /// A table is built, and its schema read, only when a query names it.
    pub async fn session(
        &self,
        store: &Store,
        limits: &weir_query::Limits,
    ) -> Result<Session, QueryError> {
        let session = Session::new(limits)?;
        let streams = store
            .shipped_streams()
            .await
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        let root =
            ListingTableUrl::parse(QUERY_ROOT).map_err(|e| QueryError::Internal(e.to_string()))?;
        session
            .context()
            .register_object_store(root.as_ref(), self.objects.clone());
        let mut namespaces: BTreeMap<String, BTreeMap<String, (String, String)>> = BTreeMap::new();
        for (pipeline, sink) in &streams {
            let stream = (pipeline.clone(), sink.clone());
            // The session's own namespaces are not a pipeline's: data such a pipeline
            // shipped before the hub refused the names goes by plain names only, and
            // cannot decide what another table's plain name means.
            if !RESERVED_PIPELINES.contains(&pipeline.as_str()) {
                namespaces
                    .entry(pipeline.clone())
                    .or_default()
                    .insert(sink.clone(), stream.clone());
            }
            if streams.iter().filter(|(_, other)| other == sink).count() == 1 {
                namespaces
                    .entry(Session::DEFAULT_NAMESPACE.to_owned())
                    .or_default()
                    .insert(sink.clone(), stream);
            }
        }
        // Schemas are read with a state of their own (the session's runtime, so its store
        // and memory limit): the session's state holds the catalog that will hold these
        // providers, and a provider holding it would never be freed.
        let reading = datafusion::execution::SessionStateBuilder::new()
            .with_runtime_env(session.context().runtime_env())
            .build();
        for (namespace, tables) in namespaces {
            let provider = FleetTables {
                tables,
                schemas: self.schemas.clone(),
                state: reading.clone(),
            };
            session.register_schema(&namespace, Arc::new(provider))?;
        }
        Ok(session)
    }
}

impl SchemaCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), KnownSchema>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A table's schema, read from its files less than [`SCHEMA_TTL`] ago; or, to read
    /// it again, the generation to [`SchemaCache::keep`] what is read under.
    fn get(&self, key: &(String, String)) -> Result<SchemaRef, u64> {
        let schemas = self.lock();
        let Some(known) = schemas.get(key) else {
            return Err(0);
        };
        match &known.read {
            Some((schema, read)) if read.elapsed() < SCHEMA_TTL => Ok(schema.clone()),
            _ => Err(known.generation),
        }
    }

    /// Keeps `schema`, read from the files, unless a file with a new column was stored
    /// since [`SchemaCache::get`] gave `generation`: the read may have missed it.
    fn keep(&self, key: (String, String), generation: u64, schema: SchemaRef) {
        let mut schemas = self.lock();
        let known = schemas.entry(key).or_default();
        if known.generation == generation {
            known.read = Some((schema, Instant::now()));
        }
    }

    /// After a file of `schema` was stored: a table whose known schema lacks one of its
    /// columns is read again at the next query.
    fn forget_unless_it_holds(&self, (pipeline, sink): (&str, &str), schema: &Schema) {
        let mut schemas = self.lock();
        let known = schemas
            .entry((pipeline.to_owned(), sink.to_owned()))
            .or_default();
        let holds = |known: &SchemaRef| {
            schema.fields().iter().all(|field| {
                known.field_with_name(field.name()).is_ok_and(|known| {
                    known.data_type() == field.data_type() && known.metadata() == field.metadata()
                })
            })
        };
        if !known.read.as_ref().is_some_and(|(known, _)| holds(known)) {
            // Also when nothing is known yet: a query reading the files right now may
            // have missed this one.
            known.read = None;
            known.generation += 1;
        }
    }
}

/// One namespace of the fleet's tables, each built when a query names it, so a query
/// reads the schemas of the tables it uses and no others.
struct FleetTables {
    /// Table name → (pipeline, sink).
    tables: BTreeMap<String, (String, String)>,
    schemas: Arc<SchemaCache>,
    /// A state on the session's runtime, with the fleet's store: schemas are read with it.
    state: datafusion::execution::SessionState,
}

impl std::fmt::Debug for FleetTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetTables")
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl SchemaProvider for FleetTables {
    fn table_names(&self) -> Vec<String> {
        self.tables.keys().cloned().collect()
    }

    fn table_exist(&self, name: &str) -> bool {
        self.tables.contains_key(name)
    }

    /// Without building the table: listing tables (`information_schema.tables`, the
    /// dashboard's table picker) reads no schema.
    async fn table_type(
        &self,
        name: &str,
    ) -> datafusion::error::Result<Option<datafusion::datasource::TableType>> {
        Ok(self
            .tables
            .contains_key(name)
            .then_some(datafusion::datasource::TableType::Base))
    }

    async fn table(&self, name: &str) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        let Some((pipeline, sink)) = self.tables.get(name) else {
            return Ok(None);
        };
        let url = ListingTableUrl::parse(format!("{QUERY_ROOT}pipeline={pipeline}/sink={sink}/"))?;
        let options =
            ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        let key = (pipeline.clone(), sink.clone());
        let schema = match self.schemas.get(&key) {
            Ok(schema) => schema,
            Err(generation) => {
                let schema = options.infer_schema(&self.state, &url).await.map_err(|e| {
                    e.context(format!("cannot read the files of {pipeline}.{sink}"))
                })?;
                // A file written before a column was added lacks it: its rows read it as
                // null, so no column of the table can promise otherwise.
                let schema = Arc::new(Schema::new_with_metadata(
                    schema
                        .fields()
                        .iter()
                        .map(|field| field.as_ref().clone().with_nullable(true))
                        .collect::<Vec<_>>(),
                    schema.metadata().clone(),
                ));
                self.schemas.keep(key, generation, schema.clone());
                schema
            }
        };
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(schema);
        Ok(Some(Arc::new(ListingTable::try_new(config)?)))
    }
}

/// Files of one directory read for merging, with their rows.
#[derive(Default)]
struct Group {
    /// The files, in order.
    files: Vec<object_store::ObjectMeta>,
    /// Their rows.
    batches: Vec<RecordBatch>,
    /// What the rows take in memory.
    bytes: u64,
}

/// The sequence number a batch's file is named after: 20 digits.
fn batch_name(stem: &str) -> Option<i64> {
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

/// The first and last sequence numbers a merged file is named after: `FIRST-LAST`.
fn merged_name(stem: &str) -> Option<(i64, i64)> {
    let (first, last) = stem.split_once('-')?;
    Some((batch_name(first)?, batch_name(last)?))
}

/// The (pipeline, sink, device) of a directory `pipeline=P/sink=S/date=D/device=ID`.
fn directory_stream(directory: &str) -> Option<(&str, &str, &str)> {
    let mut parts = directory.split('/');
    let pipeline = parts.next()?.strip_prefix("pipeline=")?;
    let sink = parts.next()?.strip_prefix("sink=")?;
    parts.next()?.strip_prefix("date=")?;
    let device = parts.next()?.strip_prefix("device=")?;
    parts.next().is_none().then_some((pipeline, sink, device))
}

/// `batches` as one Parquet file (zstd), with the hub's two columns appended, and its
/// schema.
fn to_parquet(
    batches: &[RecordBatch],
    device: &str,
    arrived_ms: i64,
) -> Result<(Vec<u8>, SchemaRef), DataError> {
    let Some(first) = batches.first() else {
        return Err(DataError::BadBatch(
            "the batch holds no record batch".into(),
        ));
    };
    let first_schema = first.schema();
    if let Some(field) = first_schema
        .fields()
        .iter()
        .find(|f| f.name().to_ascii_lowercase().starts_with(HUB_COLUMN_PREFIX))
    {
        return Err(DataError::Conflict(format!(
            "the batch has a column `{}`: names starting with `{HUB_COLUMN_PREFIX}` are the \
             hub's own (`hub_device`, `hub_arrived_at`); rename it",
            field.name()
        )));
    }
    let mut fields: Vec<Field> = first_schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("hub_device", DataType::Utf8, false));
    fields.push(Field::new(
        "hub_arrived_at",
        DataType::Timestamp(TimeUnit::Millisecond, None),
        false,
    ));
    let schema = Arc::new(Schema::new(fields));
    let mut with_hub_columns = Vec::with_capacity(batches.len());
    for batch in batches {
        let rows = batch.num_rows();
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        columns.push(Arc::new(StringArray::from_iter_values(
            std::iter::repeat_n(device, rows),
        )));
        columns.push(Arc::new(TimestampMillisecondArray::from_iter_values(
            std::iter::repeat_n(arrived_ms, rows),
        )));
        let batch = RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| DataError::BadBatch(e.to_string()))?;
        with_hub_columns.push(batch);
    }
    Ok((write_parquet(&schema, &with_hub_columns)?, schema))
}

/// A table's columns as [`Store::set_stream_columns`] keeps them: the Arrow IPC schema
/// message, base64, so the text does not depend on how Arrow prints a type.
fn encode_columns(schema: &Schema) -> Result<String, DataError> {
    use base64::Engine;
    let bytes = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema)
        .and_then(|writer| writer.into_inner())
        .map_err(|e| DataError::Encode(e.to_string()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The columns [`encode_columns`] wrote.
fn decode_columns(text: &str) -> Result<SchemaRef, DataError> {
    use base64::Engine;
    let unreadable = |message: String| {
        DataError::Store(StoreError::Corrupt {
            what: "the recorded columns of a fleet table".into(),
            message,
        })
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| unreadable(e.to_string()))?;
    match decode_within(&bytes, &IpcLimits::generous()) {
        Ok((Some(schema), _)) => Ok(schema),
        Ok((None, _)) => Err(unreadable("no schema".into())),
        Err(e) => Err(unreadable(e.to_string())),
    }
}

/// `batches` as one Parquet file, zstd-compressed.
fn write_parquet(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, DataError> {
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, schema.clone(), Some(properties))
        .map_err(|e| DataError::Encode(e.to_string()))?;
    for batch in batches {
        writer
            .write(batch)
            .map_err(|e| DataError::Encode(e.to_string()))?;
    }
    writer
        .close()
        .map_err(|e| DataError::Encode(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(bucket: &str, prefix: &str) -> FleetLocation {
        FleetLocation::S3(S3Location {
            bucket: bucket.into(),
            prefix: prefix.into(),
            settings: Vec::new(),
        })
    }

    #[test]
    fn locations_are_directories_or_s3_buckets() {
        let parse = |text: &str| text.parse::<FleetLocation>();
        assert_eq!(
            parse("weir-hub-data/fleet").unwrap(),
            FleetLocation::Directory("weir-hub-data/fleet".into())
        );
        assert_eq!(
            parse("file:///var/lib/weir/fleet").unwrap(),
            FleetLocation::Directory("/var/lib/weir/fleet".into())
        );
        assert_eq!(parse("s3://plant-data").unwrap(), s3("plant-data", ""));
        assert_eq!(
            parse("s3://plant-data/hub/fleet/").unwrap(),
            s3("plant-data", "hub/fleet")
        );
        assert_eq!(parse("s3a://b/p").unwrap(), s3("b", "p"));
        assert_eq!(
            parse("s3://plant-data/hub/fleet/").unwrap().to_string(),
            "s3://plant-data/hub/fleet"
        );
        assert_eq!(
            parse("s3://plant-data").unwrap().to_string(),
            "s3://plant-data"
        );

        let refused = |text: &str| parse(text).unwrap_err().to_string();
        assert!(
            refused("s3://").contains("name the bucket"),
            "{}",
            refused("s3://")
        );
        assert!(refused("s3:///prefix").contains("name the bucket"));
        assert!(refused("gs://bucket/fleet").contains("not in a `gs` store"));
        assert!(refused("file://relative/dir").contains("absolute path"));
        assert!(refused(" ").contains("empty"));
        // A prefix is plain parts between single slashes, as object keys take them.
        assert_eq!(parse("s3://b//a//c/").unwrap(), s3("b", "a/c"));
        assert!(refused("s3://b/~hub").contains("`~hub` cannot be part of the prefix"));
        assert!(refused("s3://b/a/../c").contains("`..` cannot be part of the prefix"));
        assert!(refused("s3://b/a?x=1").contains("`a?x=1` cannot be part"));
        assert!(refused("s3://b#x/a").contains("a bucket name is"));
    }

    /// A shipped batch of `rows` rows whose text compresses to almost nothing: what a
    /// device sends when a column repeats one long value.
    fn compressible_batch(rows: usize) -> bytes::Bytes {
        let schema = Arc::new(Schema::new(vec![Field::new("note", DataType::Utf8, false)]));
        let note = "x".repeat(1000);
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from_iter_values(
                std::iter::repeat_n(note.as_str(), rows),
            ))],
        )
        .unwrap();
        weir_outbox::frame::encode_batch(&batch).unwrap().into()
    }

    #[tokio::test]
    async fn compaction_groups_are_sized_by_decoded_bytes() {
        use futures::TryStreamExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&crate::store::Database::choose(None, dir.path()))
            .await
            .unwrap();
        // 40 files of about 100 KB decoded each, a few KB on disk: by their stored size
        // all would go into one merged file.
        let target = 2_500_000;
        let data = FleetData::local(&dir.path().join("fleet"))
            .unwrap()
            .with_compact_target(target);
        for seq in 0..40 {
            let id = BatchId {
                device: "edge-a",
                pipeline: "plant",
                sink: "notes",
                seq,
                appended_ms: 1_767_225_600_000,
            };
            let stored = data
                .ingest(&store, id, compressible_batch(100), 1_767_225_600_000)
                .await
                .unwrap();
            assert_eq!(stored, Ingested::Stored(100));
        }
        let directory = "pipeline=plant/sink=notes/date=2026-01-01/device=edge-a";
        // One file is damaged: it is quarantined, and the rest are merged.
        let damaged = format!("{directory}/00000000000000000005.parquet");
        std::fs::write(dir.path().join("fleet").join(&damaged), b"not parquet").unwrap();
        let fence = store
            .take_lease("compaction", "test", 60_000)
            .await
            .unwrap()
            .unwrap();
        let merged = data
            .compact_directory(&store, directory, &fence)
            .await
            .unwrap();
        assert!(merged >= 32, "{merged} files merged");
        assert_eq!(data.quarantined(), 1);
        assert!(dir.path().join("fleet/quarantine").join(&damaged).exists());
        let files: Vec<object_store::ObjectMeta> = data
            .objects
            .list(Some(&ObjectPath::from(directory)))
            .try_collect()
            .await
            .unwrap();
        let mut rows = 0;
        let mut merged_files = 0;
        for file in &files {
            let batches = data.read_parquet(&file.location).await.unwrap();
            rows += batches.iter().map(RecordBatch::num_rows).sum::<usize>();
            let stem = file
                .location
                .filename()
                .unwrap()
                .trim_end_matches(".parquet");
            if let Some((first, last)) = merged_name(stem) {
                // Each input holds at least 100 KB of text.
                merged_files += 1;
                let inputs = last - first + 1;
                assert!(
                    inputs as u64 <= target / 100_000,
                    "{} merges {inputs}",
                    file.location
                );
            }
        }
        assert!(merged_files >= 2, "{files:?}");
        assert_eq!(rows, 3900);
    }

    #[tokio::test]
    async fn an_unknown_s3_setting_is_named() {
        let mut location = s3("bucket", "");
        if let FleetLocation::S3(s3) = &mut location {
            s3.settings
                .push(("aws_endpoit".into(), "http://127.0.0.1:1".into()));
        }
        let Err(error) = FleetData::open(&location).await else {
            panic!("a misspelled setting opened");
        };
        assert_eq!(error.to_string(), "`aws_endpoit` is not an S3 setting");
    }

    #[test]
    fn a_schema_is_read_again_only_when_a_file_brings_a_new_column() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = FleetData::local(dir.path()).expect("opens");
        let cache = &data.schemas;
        let key = ("plant".to_owned(), "uplink".to_owned());
        let field = |name: &str| Field::new(name, DataType::Int64, false);
        let keep =
            |generation: u64, schema: Schema| cache.keep(key.clone(), generation, Arc::new(schema));
        assert_eq!(cache.get(&key).err(), Some(0));
        keep(0, Schema::new(vec![field("a"), field("b")]));
        cache.forget_unless_it_holds(("plant", "uplink"), &Schema::new(vec![field("b")]));
        assert!(cache.get(&key).is_ok());
        // Another table's files do not touch it.
        cache.forget_unless_it_holds(("plant", "other"), &Schema::new(vec![field("c")]));
        assert!(cache.get(&key).is_ok());
        // Nullability aside (every column of a table is nullable), a column of another
        // type changes the table.
        let nullable_b = Field::new("b", DataType::Int64, true);
        cache.forget_unless_it_holds(("plant", "uplink"), &Schema::new(vec![nullable_b]));
        assert!(cache.get(&key).is_ok());
        let b_as_text = Field::new("b", DataType::Utf8, false);
        cache.forget_unless_it_holds(("plant", "uplink"), &Schema::new(vec![b_as_text]));
        let generation = cache.get(&key).expect_err("read again");
        assert_eq!(generation, 1);

        // A query that began reading before a file with a new column was stored keeps
        // nothing: the next query reads the files again.
        cache.forget_unless_it_holds(("plant", "uplink"), &Schema::new(vec![field("d")]));
        keep(generation, Schema::new(vec![field("a"), field("b")]));
        assert_eq!(cache.get(&key).err(), Some(2));
    }
}
