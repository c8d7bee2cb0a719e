//! The fleet's data: batches the devices' `hub` sinks ship, each stored once as a
//! Parquet file in an object store (a local directory by default), and read-only SQL
//! over all of them on DataFusion.
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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use weir_query::{QueryError, Session};

use crate::error::StoreError;
use crate::store::Store;

/// Why a shipped batch could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The batch is not Arrow IPC.
    #[error("the batch is not Arrow IPC: {0}")]
    BadBatch(String),
    /// The object store refused it.
    #[error("cannot store the batch: {0}")]
    Storage(String),
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

/// What one compaction pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Directories compacted.
    pub directories: usize,
    /// Files merged (and deleted).
    pub merged: usize,
}

/// The fleet's stored data.
pub struct FleetData {
    objects: Arc<dyn ObjectStore>,
    root: PathBuf,
}

impl FleetData {
    /// Data kept under `dir` on the local file system.
    pub fn local(dir: &Path) -> Result<FleetData, DataError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| DataError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        let root = dir
            .canonicalize()
            .map_err(|e| DataError::Storage(format!("{}: {e}", dir.display())))?;
        let objects = LocalFileSystem::new_with_prefix(&root)
            .map_err(|e| DataError::Storage(e.to_string()))?;
        Ok(FleetData {
            objects: Arc::new(objects),
            root,
        })
    }

    /// Stores a shipped batch (zstd Arrow IPC, as the device's outbox holds it) once.
    pub async fn ingest(
        &self,
        store: &Store,
        id: BatchId<'_>,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<Ingested, DataError> {
        let seq = i64::try_from(id.seq).map_err(|_| DataError::BadBatch("seq too large".into()))?;
        if store.ingested(id.device, id.pipeline, id.sink, seq).await? {
            return Ok(Ingested::Duplicate);
        }
        let (_, batches) = weir_outbox::frame::decode_batches(payload)
            .map_err(|e| DataError::BadBatch(e.to_string()))?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let parquet = to_parquet(&batches, id.device, now_ms)?;
        let date = chrono::DateTime::from_timestamp_millis(id.appended_ms)
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
        self.objects
            .put(&object, parquet.into())
            .await
            .map_err(|e| DataError::Storage(e.to_string()))?;
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

    /// Merges the small files of each directory holding [`COMPACT_MIN_FILES`] or more
    /// into one, so queries open few files. The merged file is written before the small
    /// ones are deleted, and a batch sent again later is still known by its record, so
    /// compaction never loses a row nor lets one in twice. (A query running at the very
    /// moment between the write and the deletes can see those rows twice.)
    pub async fn compact(&self) -> Result<Compacted, DataError> {
        use futures::TryStreamExt;
        let objects: Vec<object_store::ObjectMeta> = self
            .objects
            .list(None)
            .try_collect()
            .await
            .map_err(|e| DataError::Storage(e.to_string()))?;
        let mut by_directory: std::collections::BTreeMap<String, Vec<object_store::ObjectMeta>> =
            std::collections::BTreeMap::new();
        for object in objects {
            let name = object.location.as_ref().to_owned();
            let small = object.size < COMPACT_MAX_FILE_BYTES;
            if name.ends_with(".parquet") && small {
                let directory = name.rsplit_once('/').map_or("", |(dir, _)| dir).to_owned();
                by_directory.entry(directory).or_default().push(object);
            }
        }
        let mut done = Compacted::default();
        for (directory, mut files) in by_directory {
            if files.len() < COMPACT_MIN_FILES {
                continue;
            }
            files.sort_by(|a, b| a.location.cmp(&b.location));
            let mut batches = Vec::new();
            for file in &files {
                let bytes = self
                    .objects
                    .get(&file.location)
                    .await
                    .map_err(|e| DataError::Storage(e.to_string()))?
                    .bytes()
                    .await
                    .map_err(|e| DataError::Storage(e.to_string()))?;
                let reader =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
                        .and_then(|builder| builder.build())
                        .map_err(|e| DataError::Storage(e.to_string()))?;
                for batch in reader {
                    batches.push(batch.map_err(|e| DataError::Storage(e.to_string()))?);
                }
            }
            let Some(schema) = batches.first().map(RecordBatch::schema) else {
                continue;
            };
            if batches.iter().any(|batch| batch.schema() != schema) {
                // A pipeline whose output changed shape mid-day: left as it is.
                continue;
            }
            let merged = write_parquet(&schema, &batches)?;
            let first = files[0]
                .location
                .filename()
                .unwrap_or("0")
                .trim_end_matches(".parquet");
            let last = files[files.len() - 1]
                .location
                .filename()
                .unwrap_or("0")
                .trim_end_matches(".parquet");
            let target = ObjectPath::from(format!("{directory}/{first}-{last}.parquet"));
            self.objects
                .put(&target, merged.into())
                .await
                .map_err(|e| DataError::Storage(e.to_string()))?;
            for file in &files {
                if file.location != target {
                    self.objects
                        .delete(&file.location)
                        .await
                        .map_err(|e| DataError::Storage(e.to_string()))?;
                }
            }
            done.directories += 1;
            done.merged += files.len();
        }
        Ok(done)
    }

    /// A query session with every shipped (pipeline, sink) registered as a table.
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
        let state = session.context().state();
        for (pipeline, sink) in &streams {
            let dir = self
                .root
                .join(format!("pipeline={pipeline}"))
                .join(format!("sink={sink}"));
            let url = ListingTableUrl::parse(format!("{}/", dir.display()))
                .map_err(|e| QueryError::Internal(e.to_string()))?;
            let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
                .with_file_extension(".parquet");
            let schema = options
                .infer_schema(&state, &url)
                .await
                .map_err(|e| QueryError::Internal(format!("cannot read {pipeline}.{sink}: {e}")))?;
            let config = ListingTableConfig::new(url)
                .with_listing_options(options)
                .with_schema(schema);
            let table = Arc::new(
                ListingTable::try_new(config).map_err(|e| QueryError::Internal(e.to_string()))?,
            );
            session.register_table(Some(pipeline), sink, table.clone())?;
            if streams.iter().filter(|(_, other)| other == sink).count() == 1 {
                session.register_table(None, sink, table)?;
            }
        }
        Ok(session)
    }
}

/// `batches` as one Parquet file (zstd), with the hub's two columns appended.
fn to_parquet(
    batches: &[RecordBatch],
    device: &str,
    arrived_ms: i64,
) -> Result<Vec<u8>, DataError> {
    let Some(first) = batches.first() else {
        return Err(DataError::BadBatch(
            "the batch holds no record batch".into(),
        ));
    };
    let mut fields: Vec<Field> = first
        .schema()
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
    write_parquet(&schema, &with_hub_columns)
}

/// `batches` as one Parquet file, zstd-compressed.
fn write_parquet(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, DataError> {
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, schema.clone(), Some(properties))
        .map_err(|e| DataError::Storage(e.to_string()))?;
    for batch in batches {
        writer
            .write(batch)
            .map_err(|e| DataError::Storage(e.to_string()))?;
    }
    writer
        .close()
        .map_err(|e| DataError::Storage(e.to_string()))?;
    Ok(out)
}
