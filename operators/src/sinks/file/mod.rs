//! The `file` sink: writes one stream as JSON lines, CSV or Parquet, to one file or, when
//! `path` names columns (`out/{device}/readings.csv`), to one file per distinct value.
//!
//! JSON lines and CSV go through a buffered writer and can append to an existing file (a
//! CSV header is written only into an empty file); Parquet (Snappy-compressed) writes a row
//! group every [`ROW_GROUP_ROWS`] rows as batches arrive and the footer when the stream
//! ends, so a Parquet file is readable only after a clean close. Encoding and disk writes
//! run on tokio's blocking pool so a slow disk never stalls the runtime's worker threads.
//!
//! A templated path partitions the stream the way Hive and Spark's `partitionBy` do: the
//! columns named in the path are not written into the files, since every row of a file
//! has the same values there. The text before the first placeholder, up to its last `/`,
//! is the sink's base directory, and no row may leave it: a rendered path that is
//! absolute, climbs out with `..` or names a directory is refused, and so is a row whose
//! placeholder value is null or empty. Refused rows are dropped, logged (throttled) and
//! counted as `invalid_path`, and the stream goes on. At most `max_open_files` files are
//! open at once; beyond that the least recently written one is closed and, for JSON and
//! CSV, reopened in append mode when its rows come back. A Parquet file cannot be reopened
//! (its footer ends it), so a templated Parquet sink keeps every file open and fails with
//! a clear message when the stream needs more than `max_open_files` of them.
//!
//! When the pipeline checkpoints, each epoch's output is final only once its checkpoint
//! completes: JSON lines and CSV files record their lengths at each barrier and are cut
//! back to them at recovery; Parquet and rotating output is written as parts renamed into
//! place per checkpoint ([`parts`]).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use arrow::array::UInt32Array;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use lru::LruCache;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::Deserialize;
use tracing::debug;
use weir_engine::checkpoint::{Epoch, NodeState, StateChanges};
use weir_engine::config::{ConfigErrors, HumanDuration, HumanSize};
use weir_engine::metrics::OperatorMetrics;
use weir_engine::registry::{NodeContext, OperatorFactory, OutputSpec, PlannedOperator, Role};
use weir_engine::{OperatorError, OperatorInstance, Sink};

use crate::format::{TimestampFormat, write_csv, write_json_lines};
use crate::rejects::RejectLog;
use crate::template::{Part, Rendered, Template, group_rows};

mod parts;

use parts::{Parts, next_part_number, part_paths};

/// The most rows in one Parquet row group; bounds the rows buffered in memory.
pub const ROW_GROUP_ROWS: usize = 128 * 1024;

/// The drop reason of rows whose path cannot be rendered or would leave the sink's base
/// directory.
pub const INVALID_PATH: &str = "invalid_path";

/// How many files a sink with a templated path keeps open at most, by default.
pub const DEFAULT_MAX_OPEN_FILES: usize = 64;

/// The size of the buffer in front of a JSON lines or CSV file.
const TEXT_BUFFER_BYTES: usize = 256 * 1024;

/// Builds `file` sinks.
pub struct FileSinkFactory;

/// The `config` of a `file` sink.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileSinkConfig {
    /// The file to write; relative paths are resolved against the pipeline file's
    /// directory. Missing parent directories are created. `{column}` placeholders make it
    /// a template: each row goes to the file its values name, e.g. `out/{device}.csv` or
    /// `out/{file}`; those columns are not written into the files. A rendered path must
    /// stay inside the directory before the first placeholder; rows whose path is null,
    /// empty, absolute or contains `..` are dropped and counted as `invalid_path`.
    pub path: String,
    /// `json` (JSON lines), `csv` (with a header row) or `parquet`.
    pub format: OutputFormat,
    /// JSON and CSV only: `rfc3339` strings (the default) or `epoch_ms` integers.
    pub timestamps: Option<TimestampFormat>,
    /// JSON and CSV only: add to the end of an existing file instead of replacing it (a
    /// CSV header is written only into an empty file).
    pub append: Option<bool>,
    /// With a templated path: the most files open at once (default 64). JSON and CSV
    /// files beyond it are closed least recently written first and reopened to append;
    /// Parquet files cannot be reopened, so needing more fails the sink.
    pub max_open_files: Option<usize>,
    /// Calls fsync on the files at every flush (the engine flushes every
    /// `flush_interval`, 1 s by default, and at the end), so what was flushed survives
    /// a power cut. Off by default: a flush then only hands the data to the OS.
    pub fsync: Option<bool>,
    /// Rolls a fixed path into numbered parts: `out/r.parquet` is written as
    /// `out/r-00000.parquet`, `out/r-00001.parquet`, … Each part is written under a
    /// hidden `.inprogress` name and renamed when it is complete (for Parquet: with its
    /// footer), so every part that carries the final name is readable.
    pub rotate: Option<RotateConfig>,
}

/// When a rotating file sink starts its next part; either bound, or both.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RotateConfig {
    /// Start a new part once the current one holds this much (e.g. `64MiB`).
    pub max_bytes: Option<HumanSize>,
    /// Start a new part once the current one has been open this long (e.g. `5m`),
    /// checked whenever the sink writes or flushes.
    pub interval: Option<HumanDuration>,
}

/// The encoding of the output file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// One JSON object per row.
    #[default]
    Json,
    /// Comma-separated values with a header row; nulls are empty fields.
    Csv,
    /// Apache Parquet, Snappy-compressed.
    Parquet,
}

impl OperatorFactory for FileSinkFactory {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn roles(&self) -> &'static [Role] {
        &[Role::Sink]
    }

    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config: FileSinkConfig = node.config()?;
        let mut errors = ConfigErrors::new();
        if node.inputs.len() != 1 {
            errors.push(
                node.error(format!(
                    "the file sink writes one stream but has {} inputs",
                    node.inputs.len()
                ))
                .with_hint(
                    "use one file sink per input, or merge the streams with a sql transform first",
                ),
            );
        }
        if config.path.trim().is_empty() {
            errors.push(
                node.field_error(&["path"], "the file sink needs a path")
                    .with_hint("add e.g. `path: out/readings.jsonl` under config"),
            );
        }
        if config.format == OutputFormat::Parquet {
            for key in ["timestamps", "append"] {
                if node.config.get(key).is_some() {
                    errors.push(
                        node.field_error(
                            &[key],
                            format!("{key} applies only to formats json and csv"),
                        )
                        .with_hint(format!("remove `{key}`, or set `format: json` or `csv`")),
                    );
                }
            }
        }
        if let Some(rotate) = &config.rotate {
            let bytes = rotate.max_bytes.map(|size| size.0);
            let interval = rotate.interval.map(std::time::Duration::from);
            if bytes.is_none() && interval.is_none() {
                errors.push(
                    node.field_error(&["rotate"], "rotate needs max_bytes, interval or both")
                        .with_hint("e.g. rotate: {max_bytes: 64MiB, interval: 5m}"),
                );
            }
            if bytes == Some(0) || interval.is_some_and(|i| i.is_zero()) {
                errors.push(node.field_error(
                    &["rotate"],
                    "rotate's max_bytes and interval must be more than zero",
                ));
            }
            if config.append == Some(true) {
                errors.push(
                    node.field_error(&["rotate"], "a rotating file sink cannot append")
                        .with_hint("each part is a new file; remove `append`"),
                );
            }
            if config.path.contains('{') {
                errors.push(
                    node.field_error(&["rotate"], "rotate applies only to a fixed path")
                        .with_hint("remove the {column} placeholders from path, or remove rotate"),
                );
            }
        }
        if config.max_open_files == Some(0) {
            errors.push(node.field_error(&["max_open_files"], "max_open_files must be at least 1"));
        }
        if !node.inputs_known {
            // An upstream could not be planned, so its schema is unknown: the template
            // cannot be checked against it, and the upstream's own errors speak.
            return Err(errors);
        }
        let target = match node.inputs {
            [input] if !config.path.trim().is_empty() => {
                target(node, &config, &input.stream.schema, &mut errors)
            }
            _ => None,
        };
        match target {
            Some((target, settings)) if errors.is_empty() => {
                Ok(Box::new(Plan { target, settings }))
            }
            _ => Err(errors),
        }
    }
}

/// Reads `path` against the input `schema`: where rows go and which columns are written.
fn target(
    node: &NodeContext<'_>,
    config: &FileSinkConfig,
    schema: &SchemaRef,
    errors: &mut ConfigErrors,
) -> Option<(Target, Settings)> {
    let template = match Template::parse("path", &config.path, schema) {
        Ok(template) => template,
        Err(message) => {
            errors
                .push(node.field_error(&["path"], message).with_hint(
                    "e.g. `path: out/{device}.jsonl`; `{column}` names an input column",
                ));
            return None;
        }
    };
    let placeholders = template.columns();
    let keep: Vec<usize> = (0..schema.fields().len())
        .filter(|index| !placeholders.contains(index))
        .collect();
    let mut ok = true;
    if keep.is_empty() {
        ok = false;
        errors.push(
            node.field_error(
                &["path"],
                format!(
                    "path '{}' names every input column, so nothing is left to write into the \
                     files: the columns in the path are not written into them",
                    config.path
                ),
            )
            .with_hint("select a column twice in a sql transform to keep it in the files too"),
        );
    }
    let prefix = base_prefix(&template);
    if !placeholders.is_empty() {
        let sample = template.sample("x");
        if let Err(problem) = check_partition(&sample, prefix) {
            ok = false;
            errors.push(node.field_error(
                &["path"],
                format!("path '{}' cannot be used: {problem}", config.path),
            ));
        }
    }
    let written = match schema.project(&keep) {
        Ok(written) => SchemaRef::new(written),
        Err(e) => {
            errors.push(node.error(format!("cannot project the input: {e}")));
            return None;
        }
    };
    if config.format == OutputFormat::Csv {
        for field in written.fields() {
            if field.data_type().is_nested() {
                ok = false;
                errors.push(
                    node.field_error(
                        &["format"],
                        format!(
                            "format csv cannot hold column '{}' of type {}: csv fields are flat \
                             values",
                            field.name(),
                            field.data_type()
                        ),
                    )
                    .with_hint("flatten it in a sql transform, or write json or parquet"),
                );
            }
        }
    }
    if !ok {
        return None;
    }
    let settings = Settings {
        format: config.format,
        timestamps: config.timestamps.unwrap_or_default(),
        append: config.append.unwrap_or(false),
        max_open_files: config.max_open_files.unwrap_or(DEFAULT_MAX_OPEN_FILES),
        keep: (keep.len() < schema.fields().len()).then_some(keep),
        written,
        fsync: config.fsync.unwrap_or(false),
        rotate: config.rotate.clone(),
    };
    let target = match template.fixed() {
        Some(path) => Target::Fixed(node.base_dir.join(path)),
        None => Target::Template {
            template,
            base_dir: node.base_dir.to_owned(),
            prefix,
        },
    };
    Some((target, settings))
}

/// The length of a template's base directory: its text before the first placeholder, up to
/// and including the last `/` (0 when the path starts with a placeholder or a file name).
fn base_prefix(template: &Template) -> usize {
    match template.parts() {
        [Part::Text(text), Part::Column(_), ..] => text.rfind('/').map_or(0, |slash| slash + 1),
        _ => 0,
    }
}

/// Checks that `path`, a rendering of a template whose base directory is its first
/// `prefix` bytes, names a file inside that directory.
fn check_partition(path: &str, prefix: usize) -> Result<(), String> {
    let rest = &path[prefix..];
    let base = match &path[..prefix] {
        "" => "the pipeline's directory".to_owned(),
        base => format!("'{base}'"),
    };
    if rest.is_empty() {
        return Err(format!("path '{path}' is empty"));
    }
    if rest.starts_with('/') {
        return Err(format!("path '{path}' is absolute below {base}"));
    }
    if rest.contains('\0') {
        return Err(format!("path '{path}' contains NUL"));
    }
    if rest.split('/').any(|component| component == "..") {
        return Err(format!(
            "path '{path}' has a '..' component, which could leave {base}"
        ));
    }
    if matches!(rest.rsplit('/').next(), Some("" | ".")) {
        return Err(format!("path '{path}' names a directory, not a file"));
    }
    Ok(())
}

/// Where rows go.
enum Target {
    /// All to one file.
    Fixed(PathBuf),
    /// Each row to the file its values name, inside the base directory.
    Template {
        template: Template,
        /// The pipeline file's directory, which relative paths are resolved against.
        base_dir: PathBuf,
        /// The length of the template's base directory, see [`base_prefix`].
        prefix: usize,
    },
}

/// How files are written, whichever file it is.
struct Settings {
    format: OutputFormat,
    timestamps: TimestampFormat,
    append: bool,
    max_open_files: usize,
    /// The input columns written, when the path names some of them.
    keep: Option<Vec<usize>>,
    /// The schema of what is written.
    written: SchemaRef,
    fsync: bool,
    rotate: Option<RotateConfig>,
}

struct Plan {
    target: Target,
    settings: Settings,
}

impl PlannedOperator for Plan {
    fn outputs(&self) -> Vec<OutputSpec> {
        Vec::new()
    }

    fn instantiate(
        self: Box<Self>,
        metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        let Plan { target, settings } = *self;
        let rotation = match (&target, &settings.rotate) {
            (Target::Fixed(path), Some(rotate)) => Some(Rotation::new(path, rotate)?),
            _ => None,
        };
        let writers = Writers {
            settings,
            open: LruCache::unbounded(),
            opened: HashSet::new(),
            lengths: HashMap::new(),
            written: HashSet::new(),
        };
        let display = match &target {
            Target::Fixed(path) => path.display().to_string(),
            Target::Template { template, .. } => template.text().to_owned(),
        };
        Ok(OperatorInstance::Sink(Box::new(FileSink {
            rejects: RejectLog::new(
                format!("file sink {display}"),
                "row without a valid path",
                "rows without a valid path",
            ),
            display,
            files: Some(Files {
                target,
                writers,
                rotation,
                parts: None,
            }),
            metrics: metrics.clone(),
            snapshotted: false,
            closed_lengths: None,
            closed_parts: None,
        })))
    }
}

/// The open output file in its format.
enum Writer {
    Json {
        out: BufWriter<File>,
        timestamps: TimestampFormat,
    },
    Csv {
        out: BufWriter<File>,
        timestamps: TimestampFormat,
    },
    Parquet(Box<ArrowWriter<File>>),
}

/// One thing to do with the open files.
enum Step {
    Write(RecordBatch),
    Flush,
    /// A flush that also calls fsync (`fsync: true`).
    Sync,
    Close,
}

impl Writer {
    /// Opens `path` for writing: replacing it, or appending to it when `append`. Blocking.
    fn open(path: &Path, settings: &Settings, append: bool) -> Result<Writer, OperatorError> {
        let cannot = |doing: &str, e: std::io::Error| {
            OperatorError::io(format!("cannot {doing} {}", path.display()), e)
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| cannot("create the directory of", e))?;
        }
        let file = match (settings.format, append) {
            (OutputFormat::Json | OutputFormat::Csv, true) => {
                OpenOptions::new().create(true).append(true).open(path)
            }
            _ => File::create(path),
        }
        .map_err(|e| cannot("create", e))?;
        Ok(match settings.format {
            OutputFormat::Json => Writer::Json {
                out: BufWriter::with_capacity(TEXT_BUFFER_BYTES, file),
                timestamps: settings.timestamps,
            },
            OutputFormat::Csv => {
                let empty = file.metadata().map_err(|e| cannot("inspect", e))?.len() == 0;
                let mut out = BufWriter::with_capacity(TEXT_BUFFER_BYTES, file);
                if empty {
                    let header = RecordBatch::new_empty(settings.written.clone());
                    write_csv(&mut out, &header, true, settings.timestamps)
                        .map_err(|e| text_error(e, path))?;
                }
                Writer::Csv {
                    out,
                    timestamps: settings.timestamps,
                }
            }
            OutputFormat::Parquet => {
                let properties = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
                    .build();
                let writer = ArrowWriter::try_new(file, settings.written.clone(), Some(properties))
                    .map_err(|e| {
                        OperatorError::User(format!(
                            "cannot write {} as parquet: {e}",
                            path.display()
                        ))
                    })?;
                Writer::Parquet(Box::new(writer))
            }
        })
    }

    /// Calls fsync on the file, whose buffers are already written out. Blocking.
    fn sync_file(&self, path: &Path) -> Result<(), OperatorError> {
        let file = match self {
            Writer::Json { out, .. } | Writer::Csv { out, .. } => out.get_ref(),
            Writer::Parquet(writer) => writer.inner(),
        };
        file.sync_data()
            .map_err(|e| OperatorError::io(format!("cannot fsync {}", path.display()), e))
    }

    /// How many bytes the file holds, counting what is still buffered.
    fn size(&self) -> u64 {
        match self {
            Writer::Json { out, .. } | Writer::Csv { out, .. } => {
                let on_disk = out.get_ref().metadata().map_or(0, |m| m.len());
                on_disk + out.buffer().len() as u64
            }
            Writer::Parquet(writer) => (writer.bytes_written() + writer.in_progress_size()) as u64,
        }
    }

    /// Performs `step` on the file at `path`; blocking.
    fn perform(&mut self, step: Step, path: &Path) -> Result<(), OperatorError> {
        let display = path.display();
        let io = |doing: &str, e: std::io::Error| {
            OperatorError::io(format!("cannot {doing} {display}"), e)
        };
        let parquet = |e: parquet::errors::ParquetError| match e {
            parquet::errors::ParquetError::External(inner) => match inner
                .downcast::<std::io::Error>()
            {
                Ok(e) => io("write", *e),
                Err(inner) => OperatorError::External(format!("cannot write {display}: {inner}")),
            },
            other => OperatorError::Internal(format!("cannot write {display} as parquet: {other}")),
        };
        match (self, step) {
            (Writer::Json { out, .. } | Writer::Csv { out, .. }, Step::Sync) => {
                out.flush().map_err(|e| io("write", e))?;
                out.get_ref().sync_data().map_err(|e| io("fsync", e))
            }
            (Writer::Parquet(writer), Step::Sync) => {
                writer.flush().map_err(parquet)?;
                writer.inner().sync_data().map_err(|e| io("fsync", e))
            }
            (Writer::Json { out, timestamps }, Step::Write(batch)) => {
                write_json_lines(out, &batch, *timestamps).map_err(|e| text_error(e, path))
            }
            (Writer::Csv { out, timestamps }, Step::Write(batch)) => {
                write_csv(out, &batch, false, *timestamps).map_err(|e| text_error(e, path))
            }
            (Writer::Json { out, .. } | Writer::Csv { out, .. }, Step::Flush | Step::Close) => {
                out.flush().map_err(|e| io("write", e))
            }
            (Writer::Parquet(writer), Step::Write(batch)) => writer.write(&batch).map_err(parquet),
            // Ends the row group in progress so it is no longer held in memory; the file
            // becomes readable only when close writes the footer.
            (Writer::Parquet(writer), Step::Flush) => writer.flush().map_err(parquet),
            (Writer::Parquet(writer), Step::Close) => writer.finish().map(|_| ()).map_err(parquet),
        }
    }
}

/// An error of the JSON or CSV encoder writing to `path`.
fn text_error(error: arrow::error::ArrowError, path: &Path) -> OperatorError {
    match error {
        arrow::error::ArrowError::IoError(_, source) => {
            OperatorError::io(format!("cannot write {}", path.display()), source)
        }
        other => OperatorError::Arrow(other),
    }
}

/// The open files, least recently written first out when too many are open.
struct Writers {
    settings: Settings,
    open: LruCache<PathBuf, Writer>,
    /// Every file opened so far: reopening one appends to it.
    opened: HashSet<PathBuf>,
    /// The length of each file opened so far, as of its last sync or close: what a
    /// checkpoint records, so recovery can cut off what was written after it.
    lengths: HashMap<PathBuf, u64>,
    /// The files written since the last checkpoint.
    written: HashSet<PathBuf>,
}

impl Writers {
    /// The writer of `path`, opened (and another closed) if need be. Blocking.
    fn get(&mut self, path: &Path) -> Result<&mut Writer, OperatorError> {
        if !self.open.contains(path) {
            if self.open.len() >= self.settings.max_open_files {
                if self.settings.format == OutputFormat::Parquet {
                    return Err(OperatorError::User(format!(
                        "cannot write {}: the file sink already has {} parquet files open, \
                         and a parquet file cannot be reopened once closed; raise \
                         max_open_files, or write json or csv",
                        path.display(),
                        self.open.len()
                    )));
                }
                if let Some((old, mut writer)) = self.open.pop_lru() {
                    debug!("file sink: closing {} to open another file", old.display());
                    writer.perform(Step::Close, &old)?;
                }
            }
            let again = !self.opened.insert(path.to_owned());
            let writer = Writer::open(path, &self.settings, self.settings.append || again)?;
            self.written.insert(path.to_owned());
            debug!(
                "file sink: {} {}",
                if again { "reopened" } else { "opened" },
                path.display()
            );
            self.open.put(path.to_owned(), writer);
        }
        self.open.get_mut(path).ok_or_else(|| {
            OperatorError::Internal(format!("{} is not open after opening", path.display()))
        })
    }

    /// The written columns of `batch`.
    fn project(&self, batch: &RecordBatch) -> Result<RecordBatch, OperatorError> {
        Ok(match &self.settings.keep {
            Some(keep) => batch.project(keep)?,
            None => batch.clone(),
        })
    }

    fn flush(&mut self) -> Result<(), OperatorError> {
        let fsync = self.settings.fsync;
        for (path, writer) in self.open.iter_mut() {
            writer.perform(if fsync { Step::Sync } else { Step::Flush }, path)?;
        }
        Ok(())
    }

    /// Forgets a file that is finished for good (a part): it is never reopened.
    fn forget(&mut self, path: &Path) {
        self.opened.remove(path);
        self.lengths.remove(path);
        self.written.remove(path);
    }

    /// Closes the file at `path`, if it is open, and makes it durable when `fsync`.
    fn close_one(&mut self, path: &Path) -> Result<(), OperatorError> {
        if let Some(mut writer) = self.open.pop(path) {
            writer.perform(Step::Close, path)?;
            if self.settings.fsync {
                writer.sync_file(path)?;
            }
            self.lengths.insert(path.to_owned(), writer.size());
        }
        Ok(())
    }

    /// Makes every file durable and returns the length of each file written since the
    /// last checkpoint. Blocking.
    fn checkpoint(&mut self) -> Result<Vec<(PathBuf, u64)>, OperatorError> {
        for (path, writer) in self.open.iter_mut() {
            writer.perform(Step::Sync, path)?;
            self.lengths.insert(path.clone(), writer.size());
        }
        let mut written: Vec<(PathBuf, u64)> = self
            .written
            .drain()
            .filter_map(|path| {
                let length = *self.lengths.get(&path)?;
                Some((path, length))
            })
            .collect();
        written.sort();
        Ok(written)
    }

    /// Cuts every file of `lengths` back to the length it had at the checkpoint being
    /// recovered, and has them reopened to append. Blocking.
    fn recover(&mut self, lengths: Vec<(PathBuf, u64)>) -> Result<(), OperatorError> {
        for (path, length) in lengths {
            match OpenOptions::new().write(true).open(&path) {
                Ok(file) => {
                    let now = file
                        .metadata()
                        .map_err(|e| {
                            OperatorError::io(format!("cannot inspect {}", path.display()), e)
                        })?
                        .len();
                    if now > length {
                        file.set_len(length)
                            .and_then(|()| file.sync_all())
                            .map_err(|e| {
                                OperatorError::io(format!("cannot truncate {}", path.display()), e)
                            })?;
                        debug!(
                            "file sink: {} cut back from {now} to {length} bytes, its length at the checkpoint",
                            path.display()
                        );
                    } else if now < length {
                        tracing::warn!(
                            "file sink: {} has {now} bytes, fewer than the {length} it had at the checkpoint: it was changed outside weir",
                            path.display()
                        );
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(
                        "file sink: {} is gone since the checkpoint; it is written anew",
                        path.display()
                    );
                }
                Err(error) => {
                    return Err(OperatorError::io(
                        format!("cannot open {}", path.display()),
                        error,
                    ));
                }
            }
            self.opened.insert(path.clone());
            self.lengths.insert(path, length);
        }
        Ok(())
    }

    /// Closes every file; the first failure is reported after trying them all.
    fn close(&mut self) -> Result<(), OperatorError> {
        let mut outcome = Ok(());
        while let Some((path, _)) = self.open.peek_lru() {
            let path = path.clone();
            let closed = self.close_one(&path);
            if outcome.is_ok() {
                outcome = closed;
            }
        }
        outcome
    }
}

/// Everything the sink writes with, moved to the blocking pool for each step.
struct Files {
    target: Target,
    writers: Writers,
    /// The parts of a fixed path that rotates, when the pipeline does not checkpoint.
    rotation: Option<Rotation>,
    /// Parquet and rotating output when the pipeline checkpoints: parts renamed into
    /// place as their checkpoints complete (see `parts.rs`).
    parts: Option<Parts>,
}

/// The numbered parts a rotating fixed path is written as.
struct Rotation {
    /// The configured path, e.g. `out/r.parquet`; parts are `out/r-00000.parquet`, ….
    path: PathBuf,
    max_bytes: Option<u64>,
    interval: Option<std::time::Duration>,
    /// The number of the part being written.
    part: u64,
    opened: std::time::Instant,
}

impl Rotation {
    /// Starts after the highest part already in the directory, so a restart never
    /// overwrites a finished part. Blocking.
    fn new(path: &Path, rotate: &RotateConfig) -> Result<Rotation, OperatorError> {
        Ok(Rotation {
            path: path.to_owned(),
            max_bytes: rotate.max_bytes.map(|size| size.0),
            interval: rotate.interval.map(std::time::Duration::from),
            part: next_part_number(path),
            opened: std::time::Instant::now(),
        })
    }

    /// The finished name of the part being written.
    fn finished(&self) -> PathBuf {
        part_paths(&self.path, self.part).1
    }

    /// Where the part being written is, until it is finished.
    fn in_progress(&self) -> PathBuf {
        part_paths(&self.path, self.part).0
    }

    /// Whether the part of `size` bytes is due to be finished.
    fn due(&self, size: u64) -> bool {
        size > 0
            && (self.max_bytes.is_some_and(|max| size >= max)
                || self
                    .interval
                    .is_some_and(|every| self.opened.elapsed() >= every))
    }
}

impl Files {
    /// Opens a fixed path's file if none was yet, so an empty stream still leaves a
    /// readable (Parquet) or empty (JSON, CSV with its header) file, and a path that
    /// cannot be written fails the start. Blocking.
    fn open_fixed(&mut self) -> Result<(), OperatorError> {
        if let Target::Fixed(path) = &self.target {
            let current = match (&mut self.parts, &self.rotation) {
                (Some(parts), _) => parts.current(path),
                (None, _) if !self.writers.opened.is_empty() => return Ok(()),
                (None, Some(rotation)) => rotation.in_progress(),
                (None, None) => path.clone(),
            };
            self.writers.get(&current)?;
        }
        Ok(())
    }

    /// Under checkpoints, the file rows for `path` go to: its part being written.
    fn destination(&mut self, path: &Path) -> PathBuf {
        match &mut self.parts {
            Some(parts) => parts.current(path),
            None => path.to_owned(),
        }
    }

    /// Counts `rows` written for `path` and finishes its part when its rotation is due.
    fn wrote(&mut self, path: &Path, rows: usize) -> Result<(), OperatorError> {
        if let Some(parts) = &mut self.parts {
            parts.wrote(path, rows);
        }
        self.roll_parts()
    }

    /// Finishes the parts whose rotation is due. Blocking.
    fn roll_parts(&mut self) -> Result<(), OperatorError> {
        let Some(parts) = &self.parts else {
            return Ok(());
        };
        let open = &self.writers.open;
        let due = parts.due(self.writers.settings.rotate.as_ref(), |file| {
            open.peek(file).map_or(0, Writer::size)
        });
        for path in due {
            self.seal_part(&path)?;
        }
        Ok(())
    }

    /// Finishes the part of `path`: closes it and makes it durable; it is renamed once
    /// the checkpoint after it completes. Blocking.
    fn seal_part(&mut self, path: &Path) -> Result<(), OperatorError> {
        let Some(parts) = &mut self.parts else {
            return Ok(());
        };
        let Some(file) = parts.in_progress(path) else {
            return Ok(());
        };
        self.writers.close_one(&file)?;
        if !self.writers.settings.fsync {
            File::open(&file)
                .and_then(|f| f.sync_all())
                .map_err(|e| OperatorError::io(format!("cannot fsync {}", file.display()), e))?;
        }
        self.writers.forget(&file);
        parts.seal(path);
        Ok(())
    }

    /// Barrier `epoch`: finishes every part holding rows and lists what waits to be
    /// renamed. Blocking.
    fn snapshot_parts(&mut self, epoch: Epoch) -> Result<StateChanges, OperatorError> {
        let with_rows = self
            .parts
            .as_ref()
            .map(Parts::with_rows)
            .unwrap_or_default();
        for path in with_rows {
            self.seal_part(&path)?;
        }
        match &mut self.parts {
            Some(parts) => Ok(parts.snapshot(epoch)),
            None => Ok(StateChanges::unchanged()),
        }
    }

    /// The end of the stream: finishes every part, and hands the parts over for the
    /// last snapshot and commit. Blocking.
    fn close_parts(&mut self) -> Result<Option<Parts>, OperatorError> {
        self.open_fixed()?;
        let all = self.parts.as_ref().map(Parts::all).unwrap_or_default();
        for path in all {
            self.seal_part(&path)?;
        }
        Ok(self.parts.take())
    }

    /// Finishes the part being written when its size or age says so, or always when
    /// `closing`; the next write opens the next part. Blocking.
    fn roll(&mut self, closing: bool) -> Result<(), OperatorError> {
        let Some(rotation) = &mut self.rotation else {
            return Ok(());
        };
        let current = rotation.in_progress();
        let size = self.writers.open.peek(&current).map_or(0, Writer::size);
        if !closing && !rotation.due(size) {
            return Ok(());
        }
        if !self.writers.open.contains(&current) {
            return Ok(());
        }
        self.writers.close_one(&current)?;
        let finished = rotation.finished();
        std::fs::rename(&current, &finished).map_err(|e| {
            OperatorError::io(
                format!(
                    "cannot rename {} to {}",
                    current.display(),
                    finished.display()
                ),
                e,
            )
        })?;
        if self.writers.settings.fsync
            && let Some(dir) = finished.parent().filter(|d| !d.as_os_str().is_empty())
        {
            File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| OperatorError::io(format!("cannot fsync {}", dir.display()), e))?;
        }
        debug!("file sink: finished part {}", finished.display());
        rotation.part += 1;
        rotation.opened = std::time::Instant::now();
        Ok(())
    }
}

impl Files {
    /// Performs `step`; blocking. A write returns why the rows it dropped have no path.
    fn perform(&mut self, step: Step) -> Result<Vec<String>, OperatorError> {
        match step {
            Step::Write(batch) => self.write(&batch),
            Step::Flush | Step::Sync => {
                self.writers.flush()?;
                self.roll(false)?;
                self.roll_parts().map(|()| Vec::new())
            }
            Step::Close => {
                self.open_fixed()?;
                self.roll(true)?;
                self.writers.close().map(|()| Vec::new())
            }
        }
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<Vec<String>, OperatorError> {
        let (template, base_dir, prefix) = match &self.target {
            Target::Fixed(path) => {
                let path = path.clone();
                let file = match &self.rotation {
                    Some(rotation) => rotation.in_progress(),
                    None => self.destination(&path),
                };
                let written = self.writers.project(batch)?;
                self.writers
                    .get(&file)?
                    .perform(Step::Write(written), &file)?;
                self.writers.written.insert(file);
                self.roll(false)?;
                self.wrote(&path, batch.num_rows())?;
                return Ok(Vec::new());
            }
            Target::Template {
                template,
                base_dir,
                prefix,
            } => (template, base_dir, *prefix),
        };
        let rendered: Rendered = template
            .render(batch, |_, _| Ok(()))?
            .into_iter()
            .map(|path| path.and_then(|path| check_partition(&path, prefix).map(|()| path)))
            .collect();
        let problems: Vec<String> = rendered
            .iter()
            .filter_map(|path| path.as_ref().err().cloned())
            .collect();
        let groups = group_rows(rendered);
        let written = self.writers.project(batch)?;
        let whole = groups.len() == 1 && problems.is_empty();
        let base_dir = base_dir.clone();
        for (path, rows) in groups {
            let rows = if whole {
                written.clone()
            } else {
                arrow::compute::take_record_batch(&written, &UInt32Array::from(rows))?
            };
            let path = base_dir.join(path);
            let file = self.destination(&path);
            let count = rows.num_rows();
            self.writers.get(&file)?.perform(Step::Write(rows), &file)?;
            self.writers.written.insert(file);
            self.wrote(&path, count)?;
        }
        Ok(problems)
    }
}

/// The running file sink.
struct FileSink {
    /// The path or template, for messages.
    display: String,
    /// `None` while a blocking step holds it, and after close or a failed step.
    files: Option<Files>,
    metrics: OperatorMetrics,
    /// Rows dropped for their path, counted in the metrics as `invalid_path`.
    rejects: RejectLog,
    /// Whether a checkpoint holds this sink's file lengths yet (the first snapshot
    /// replaces whatever an earlier, unrelated run left).
    snapshotted: bool,
    /// The files' lengths when the sink closed, for the last snapshot.
    closed_lengths: Option<Vec<(PathBuf, u64)>>,
    /// Under checkpoints, the parts left to rename once the sink has closed.
    closed_parts: Option<Parts>,
}

/// The prefix of a file's key in the sink's checkpointed state; the path follows.
const LENGTH_KEY: &[u8] = b"length/";

impl FileSink {
    /// Whether the sink writes parts renamed per checkpoint.
    fn in_parts(&self) -> bool {
        self.files
            .as_ref()
            .is_some_and(|files| files.parts.is_some())
    }

    /// Runs `work` on the files on tokio's blocking pool; the sink is unusable after it
    /// fails.
    async fn blocking<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut Files) -> Result<T, OperatorError> + Send + 'static,
    ) -> Result<T, OperatorError> {
        let Some(mut files) = self.files.take() else {
            return Err(OperatorError::Internal(format!(
                "the file sink for {} was used after it closed or failed",
                self.display
            )));
        };
        let (files, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = work(&mut files);
            (files, outcome)
        })
        .await
        .map_err(|e| OperatorError::Internal(format!("file write task failed: {e}")))?;
        if outcome.is_ok() {
            self.files = Some(files);
        }
        outcome
    }

    async fn run(&mut self, step: Step) -> Result<(), OperatorError> {
        let Some(mut files) = self.files.take() else {
            return Err(OperatorError::Internal(format!(
                "the file sink for {} was used after it closed or failed",
                self.display
            )));
        };
        let closing = matches!(step, Step::Close);
        let (files, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = files.perform(step);
            (files, outcome)
        })
        .await
        .map_err(|e| OperatorError::Internal(format!("file write task failed: {e}")))?;
        if outcome.is_ok() && !closing {
            self.files = Some(files);
        }
        let problems = outcome?;
        for problem in &problems {
            self.rejects
                .note(format_args!("path '{}'", self.display), problem);
        }
        self.metrics.dropped(INVALID_PATH, problems.len() as u64);
        if closing {
            self.rejects.summarise();
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for FileSink {
    /// Parquet and rotating output are written as parts renamed into place as their
    /// checkpoints complete; JSON lines and CSV files are cut back at recovery instead.
    fn checkpointing(&mut self, _completed: Epoch) {
        if let Some(files) = self.files.as_mut()
            && (files.writers.settings.format == OutputFormat::Parquet
                || files.writers.settings.rotate.is_some())
        {
            files.parts = Some(Parts::default());
            files.rotation = None;
        }
    }

    async fn start(&mut self) -> Result<(), OperatorError> {
        self.blocking(Files::open_fixed).await
    }

    async fn write(&mut self, _input: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        self.run(Step::Write(batch)).await
    }

    async fn flush(&mut self) -> Result<(), OperatorError> {
        self.run(Step::Flush).await
    }

    async fn close(&mut self) -> Result<(), OperatorError> {
        if self.in_parts() {
            let parts = self
                .blocking(|files| {
                    let parts = files.close_parts()?;
                    files.writers.close()?;
                    Ok(parts)
                })
                .await?;
            self.files = None;
            self.closed_parts = parts;
            self.rejects.summarise();
            return Ok(());
        }
        // The files' lengths before the close, for the last snapshot.
        let lengths = self.blocking(|files| files.writers.checkpoint()).await?;
        self.run(Step::Close).await?;
        self.closed_lengths = Some(lengths);
        Ok(())
    }

    async fn commit(&mut self, epoch: Epoch) -> Result<(), OperatorError> {
        if let Some(mut parts) = self.closed_parts.take() {
            let (parts, outcome) = tokio::task::spawn_blocking(move || {
                let outcome = parts.commit(epoch);
                (parts, outcome)
            })
            .await
            .map_err(|e| OperatorError::Internal(format!("file commit task failed: {e}")))?;
            self.closed_parts = Some(parts);
            return outcome;
        }
        if !self.in_parts() {
            return Ok(());
        }
        self.blocking(move |files| match files.parts.as_mut() {
            Some(parts) => parts.commit(epoch),
            None => Ok(()),
        })
        .await
    }

    async fn snapshot(&mut self, epoch: Epoch) -> Result<StateChanges, OperatorError> {
        if let Some(parts) = self.closed_parts.as_mut() {
            return Ok(parts.snapshot(epoch));
        }
        if self.in_parts() {
            return self
                .blocking(move |files| files.snapshot_parts(epoch))
                .await;
        }
        let lengths = match self.closed_lengths.take() {
            Some(lengths) => lengths,
            None => self.blocking(|files| files.writers.checkpoint()).await?,
        };
        let mut changes = if self.snapshotted {
            StateChanges::unchanged()
        } else {
            StateChanges::cleared()
        };
        self.snapshotted = true;
        for (path, length) in lengths {
            let mut key = LENGTH_KEY.to_vec();
            key.extend_from_slice(path.as_os_str().as_bytes());
            changes.put(key, length.to_be_bytes().to_vec());
        }
        Ok(changes)
    }

    fn restore(&mut self, state: &NodeState) -> Result<(), OperatorError> {
        let Some(files) = self.files.as_mut() else {
            return Err(OperatorError::Internal(
                "the file sink restored after it closed".into(),
            ));
        };
        if files.parts.is_some() {
            let renamed = Parts::recover(state).map_err(|reason| {
                OperatorError::User(format!("file sink {}: {reason}", self.display))
            })?;
            debug!(
                "file sink {}: {renamed} parts of completed checkpoints renamed into place",
                self.display
            );
            return Ok(());
        }
        let mut lengths = Vec::new();
        for (key, value) in state.entries() {
            let (Some(path), Ok(length)) =
                (key.strip_prefix(LENGTH_KEY), <[u8; 8]>::try_from(value))
            else {
                return Err(OperatorError::Internal(format!(
                    "file sink {}: its checkpointed state has an entry it does not know",
                    self.display
                )));
            };
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(path));
            lengths.push((path, u64::from_be_bytes(length)));
        }
        files.writers.recover(lengths)?;
        self.snapshotted = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use weir_engine::registry::{InputStream, StreamInfo};

    use super::*;
    use crate::format::test_support::{Decl, plan};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            Field::new("value", DataType::Float64, true),
        ]))
    }

    fn batch(first: i64) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from(vec!["a", "b"])),
                Arc::new(TimestampMillisecondArray::from(vec![first, first + 1000])),
                Arc::new(Float64Array::from(vec![Some(1.5), None])),
            ],
        )
        .unwrap()
    }

    fn input() -> InputStream {
        InputStream {
            name: "upstream".into(),
            stream: StreamInfo {
                schema: schema(),
                event_time: Some("ts".into()),
            },
        }
    }

    fn sink(dir: &tempfile::TempDir, config: &str) -> Box<dyn Sink> {
        sink_with(dir, config, &OperatorMetrics::detached("test", "node"))
    }

    fn sink_with(
        dir: &tempfile::TempDir,
        config: &str,
        metrics: &OperatorMetrics,
    ) -> Box<dyn Sink> {
        let decl = Decl {
            inputs: vec![input()],
            base_dir: Some(dir.path()),
            ..Decl::default()
        };
        let planned = plan(&FileSinkFactory, Role::Sink, config, decl).unwrap();
        match planned.instantiate(metrics).unwrap() {
            OperatorInstance::Sink(sink) => sink,
            _ => panic!("the file sink builds a sink"),
        }
    }

    /// Rows of `device` values `devices`, timestamps from `first` a second apart, values
    /// 0, 1, ...
    fn rows(devices: &[Option<&str>], first: i64) -> RecordBatch {
        let n = devices.len();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from(devices.to_vec())),
                Arc::new(TimestampMillisecondArray::from(
                    (0..n as i64).map(|i| first + 1000 * i).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    (0..n).map(|i| Some(i as f64)).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn read(dir: &tempfile::TempDir, path: &str) -> String {
        std::fs::read_to_string(dir.path().join(path))
            .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
    }

    fn plan_errors(config: &str, schema: SchemaRef) -> Vec<String> {
        let decl = Decl {
            inputs: vec![InputStream {
                name: "upstream".into(),
                stream: StreamInfo {
                    schema,
                    event_time: None,
                },
            }],
            ..Decl::default()
        };
        match plan(&FileSinkFactory, Role::Sink, config, decl) {
            Ok(_) => panic!("config should be rejected: {config}"),
            Err(errors) => errors
                .iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect(),
        }
    }

    #[tokio::test]
    async fn writes_json_lines_into_new_directories() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink(&dir, "{path: out/deep/r.jsonl}");
        sink.write(0, batch(1_767_225_600_000)).await.unwrap();
        sink.close().await.unwrap();
        let text = std::fs::read_to_string(dir.path().join("out/deep/r.jsonl")).unwrap();
        assert_eq!(
            text,
            "{\"device\":\"a\",\"ts\":\"2026-01-01T00:00:00Z\",\"value\":1.5}\n\
             {\"device\":\"b\",\"ts\":\"2026-01-01T00:00:01Z\",\"value\":null}\n"
        );
    }

    #[tokio::test]
    async fn recovery_cuts_each_file_back_to_its_checkpointed_length() {
        for config in [
            "{path: r.jsonl}",
            "{path: r.csv, format: csv}",
            "{path: \"p/{device}.jsonl\"}",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut stored = NodeState::default();
            let mut first = sink(&dir, config);
            first.start().await.unwrap();
            first
                .write(0, rows(&[Some("a"), Some("b")], 0))
                .await
                .unwrap();
            stored.apply(&first.snapshot(1).await.unwrap());
            first.write(0, rows(&[Some("a")], 1_000)).await.unwrap();
            // Only the files written since are in the next checkpoint.
            let second = first.snapshot(2).await.unwrap();
            assert_eq!(second.parts(), 1, "{config}");
            // Written after the last checkpoint that completed, then killed.
            first
                .write(0, rows(&[Some("b"), Some("b")], 9_000))
                .await
                .unwrap();
            first.flush().await.unwrap();
            drop(first);

            let mut again = sink(&dir, config);
            again.restore(&stored).unwrap();
            again.start().await.unwrap();
            again
                .write(0, rows(&[Some("a"), Some("b")], 1_000))
                .await
                .unwrap();
            again.close().await.unwrap();
            let reference = tempfile::tempdir().unwrap();
            let mut expected = sink(&reference, config);
            expected.start().await.unwrap();
            expected
                .write(0, rows(&[Some("a"), Some("b")], 0))
                .await
                .unwrap();
            expected
                .write(0, rows(&[Some("a"), Some("b")], 1_000))
                .await
                .unwrap();
            expected.close().await.unwrap();
            for file in ["r.jsonl", "r.csv", "p/a.jsonl", "p/b.jsonl"] {
                if reference.path().join(file).exists() {
                    assert_eq!(read(&dir, file), read(&reference, file), "{config}: {file}");
                }
            }
        }
    }

    /// The `ts` values of every finished part in `dir`, by part name; fails on any
    /// in-progress file left behind.
    fn parts_in(dir: &tempfile::TempDir) -> Vec<(String, Vec<i64>)> {
        listing(dir)
            .into_iter()
            .map(|name| {
                assert!(!name.ends_with(".inprogress"), "{name} is left in progress");
                let file = File::open(dir.path().join(&name)).unwrap();
                let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                    .unwrap_or_else(|e| panic!("{name} is not readable parquet: {e}"))
                    .build()
                    .unwrap();
                let times = reader
                    .flat_map(|b| {
                        b.unwrap()
                            .column(1)
                            .as_any()
                            .downcast_ref::<TimestampMillisecondArray>()
                            .unwrap()
                            .values()
                            .to_vec()
                    })
                    .collect();
                (name, times)
            })
            .collect()
    }

    #[tokio::test]
    async fn parquet_parts_are_renamed_as_checkpoints_complete_and_a_crash_leaves_each_row_once() {
        let config = "{path: r.parquet, format: parquet}";
        // The run is killed after barrier 2, with part 1 finished for it and part 2 being
        // written; checkpoint 2 either completed (its commit had not run) or did not.
        for completed in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let mut first = sink(&dir, config);
            first.checkpointing(0);
            first.start().await.unwrap();
            let mut stored = NodeState::default();
            first.write(0, batch(0)).await.unwrap();
            stored.apply(&first.snapshot(1).await.unwrap());
            first.commit(1).await.unwrap();
            assert_eq!(
                parts_in(&dir),
                [("r-00000.parquet".to_owned(), vec![0, 1000])]
            );
            first.write(0, batch(10_000)).await.unwrap();
            let at_two = first.snapshot(2).await.unwrap();
            if completed == 2 {
                stored.apply(&at_two);
            }
            first.write(0, batch(20_000)).await.unwrap();
            first.flush().await.unwrap();
            drop(first);

            // The restart replays what came after the checkpoint it restores.
            let mut second = sink(&dir, config);
            second.checkpointing(completed);
            second.restore(&stored).unwrap();
            second.start().await.unwrap();
            if completed == 1 {
                second.write(0, batch(10_000)).await.unwrap();
            }
            second.write(0, batch(20_000)).await.unwrap();
            second.close().await.unwrap();
            let last = second.snapshot(3).await.unwrap();
            assert!(!last.is_unchanged());
            second.commit(3).await.unwrap();
            let parts = parts_in(&dir);
            let every: Vec<i64> = parts.iter().flat_map(|(_, ts)| ts.clone()).collect();
            assert_eq!(
                every,
                [0, 1000, 10_000, 11_000, 20_000, 21_000],
                "completed {completed}: {parts:?}"
            );
            let names: Vec<&str> = parts.iter().map(|(name, _)| name.as_str()).collect();
            let expected: &[&str] = if completed == 2 {
                &["r-00000.parquet", "r-00001.parquet", "r-00002.parquet"]
            } else {
                &["r-00000.parquet", "r-00001.parquet"]
            };
            assert_eq!(names, expected, "completed {completed}");
        }
    }

    #[tokio::test]
    async fn checkpointed_parts_of_a_templated_path_roll_at_each_barrier() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink(&dir, "{path: 'out/{device}.parquet', format: parquet}");
        sink.checkpointing(0);
        sink.start().await.unwrap();
        sink.write(0, rows(&[Some("a"), Some("a"), Some("b")], 0))
            .await
            .unwrap();
        let out = dir.path().join("out");
        let names = |dir: &Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            names(&out),
            [".a-00000.parquet.inprogress", ".b-00000.parquet.inprogress"]
        );
        // The barrier finishes both parts; they take their names once it completes.
        sink.snapshot(1).await.unwrap();
        sink.write(0, rows(&[Some("a")], 5000)).await.unwrap();
        sink.commit(1).await.unwrap();
        assert_eq!(
            names(&out),
            [
                ".a-00001.parquet.inprogress",
                "a-00000.parquet",
                "b-00000.parquet"
            ]
        );
        sink.close().await.unwrap();
        sink.snapshot(2).await.unwrap();
        sink.commit(2).await.unwrap();
        assert_eq!(
            names(&out),
            ["a-00000.parquet", "a-00001.parquet", "b-00000.parquet"]
        );
        let rows_of = |name: &str| parquet_rows(&out.join(name));
        assert_eq!(
            (
                rows_of("a-00000.parquet"),
                rows_of("a-00001.parquet"),
                rows_of("b-00000.parquet")
            ),
            (2, 1, 1)
        );
    }

    #[tokio::test]
    async fn writes_epoch_ms_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        for first in [0, 5000] {
            let mut sink = sink(&dir, "{path: r.jsonl, timestamps: epoch_ms, append: true}");
            sink.write(0, batch(first)).await.unwrap();
            sink.flush().await.unwrap();
            sink.close().await.unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join("r.jsonl")).unwrap();
        let ts: Vec<i64> = text
            .lines()
            .map(|line| {
                serde_json::from_str::<serde_json::Value>(line).unwrap()["ts"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ts, vec![0, 1000, 5000, 6000]);
    }

    #[tokio::test]
    async fn json_without_append_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.jsonl"), "old\n").unwrap();
        let mut sink = sink(&dir, "{path: r.jsonl}");
        sink.write(0, batch(0)).await.unwrap();
        sink.close().await.unwrap();
        let text = std::fs::read_to_string(dir.path().join("r.jsonl")).unwrap();
        assert!(!text.contains("old") && text.lines().count() == 2, "{text}");
    }

    #[tokio::test]
    async fn parquet_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink(&dir, "{path: r.parquet, format: parquet}");
        sink.write(0, batch(0)).await.unwrap();
        sink.flush().await.unwrap();
        sink.write(0, batch(10_000)).await.unwrap();
        sink.close().await.unwrap();
        let file = File::open(dir.path().join("r.parquet")).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        assert_eq!(
            reader.metadata().num_row_groups(),
            2,
            "flush ends a row group"
        );
        let batches: Vec<RecordBatch> = reader.build().unwrap().map(Result::unwrap).collect();
        let all = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
        assert_eq!(all.schema(), schema());
        let expected =
            arrow::compute::concat_batches(&schema(), &[batch(0), batch(10_000)]).unwrap();
        assert_eq!(all, expected);
    }

    #[tokio::test]
    async fn an_empty_stream_still_makes_a_readable_parquet_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink(&dir, "{path: r.parquet, format: parquet}");
        sink.close().await.unwrap();
        let file = File::open(dir.path().join("r.parquet")).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 0);
    }

    #[test]
    fn plan_rejects_several_inputs_and_json_options_on_parquet() {
        let decl = Decl {
            inputs: vec![input(), input()],
            ..Decl::default()
        };
        let config = "{path: r.parquet, format: parquet, timestamps: epoch_ms, append: true}";
        let errors = plan(&FileSinkFactory, Role::Sink, config, decl)
            .err()
            .unwrap();
        let messages: Vec<_> = errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "the file sink writes one stream but has 2 inputs",
                "timestamps applies only to formats json and csv",
                "append applies only to formats json and csv",
            ]
        );
        assert_eq!(errors[0].path, "sinks.node");
    }

    #[tokio::test]
    async fn csv_has_one_header_even_when_appending() {
        let dir = tempfile::tempdir().unwrap();
        for first in [0, 5000] {
            let mut sink = sink(&dir, "{path: r.csv, format: csv, append: true}");
            sink.write(0, batch(first)).await.unwrap();
            sink.close().await.unwrap();
        }
        assert_eq!(
            read(&dir, "r.csv"),
            "device,ts,value\n\
             a,1970-01-01T00:00:00Z,1.5\n\
             b,1970-01-01T00:00:01Z,\n\
             a,1970-01-01T00:00:05Z,1.5\n\
             b,1970-01-01T00:00:06Z,\n"
        );
        let mut empty = sink(&dir, "{path: empty.csv, format: csv, timestamps: epoch_ms}");
        empty.close().await.unwrap();
        assert_eq!(
            read(&dir, "empty.csv"),
            "device,ts,value\n",
            "an empty stream"
        );
    }

    #[tokio::test]
    async fn a_templated_path_partitions_rows_and_leaves_its_columns_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("out/a")).unwrap();
        std::fs::write(dir.path().join("out/a/r.csv"), "stale\n").unwrap();
        let mut sink = sink(
            &dir,
            "{path: \"out/{device}/r.csv\", format: csv, timestamps: epoch_ms}",
        );
        sink.write(0, rows(&[Some("a"), Some("b"), Some("a")], 0))
            .await
            .unwrap();
        sink.write(0, rows(&[Some("a"), Some("deep/c")], 10_000))
            .await
            .unwrap();
        sink.close().await.unwrap();
        assert_eq!(
            read(&dir, "out/a/r.csv"),
            "ts,value\n0,0.0\n2000,2.0\n10000,0.0\n",
            "the stale file is replaced; rows keep their order"
        );
        assert_eq!(read(&dir, "out/b/r.csv"), "ts,value\n1000,1.0\n");
        assert_eq!(read(&dir, "out/deep/c/r.csv"), "ts,value\n11000,1.0\n");
    }

    #[tokio::test]
    async fn files_beyond_max_open_files_are_closed_and_reopened_to_append() {
        let dir = tempfile::tempdir().unwrap();
        for format in ["csv", "json"] {
            let config = format!(
                "{{path: \"{format}/{{device}}\", format: {format}, max_open_files: 1, \
                 timestamps: epoch_ms}}"
            );
            let mut sink = sink(&dir, &config);
            for (round, device) in ["a", "b", "a", "b", "a"].into_iter().enumerate() {
                let first = 10_000 * round as i64;
                sink.write(0, rows(&[Some(device)], first)).await.unwrap();
            }
            sink.close().await.unwrap();
        }
        assert_eq!(
            read(&dir, "csv/a"),
            "ts,value\n0,0.0\n20000,0.0\n40000,0.0\n"
        );
        assert_eq!(read(&dir, "csv/b"), "ts,value\n10000,0.0\n30000,0.0\n");
        assert_eq!(
            read(&dir, "json/b"),
            "{\"ts\":10000,\"value\":0.0}\n{\"ts\":30000,\"value\":0.0}\n"
        );
    }

    #[tokio::test]
    async fn parquet_partitions_stay_open_and_too_many_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let mut capped = sink(
            &dir,
            "{path: \"p/{device}.parquet\", format: parquet, max_open_files: 2}",
        );
        capped
            .write(0, rows(&[Some("a"), Some("b"), Some("a")], 0))
            .await
            .unwrap();
        let error = capped
            .write(0, rows(&[Some("c")], 0))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("p/c.parquet") && error.contains("raise max_open_files"),
            "{error}"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut open = sink(&dir, "{path: \"p/{device}.parquet\", format: parquet}");
        open.write(0, rows(&[Some("a"), Some("b"), Some("a")], 0))
            .await
            .unwrap();
        open.close().await.unwrap();
        let file = File::open(dir.path().join("p/a.parquet")).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let columns: Vec<_> = reader
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(columns, ["ts", "value"]);
        assert_eq!(reader.metadata().file_metadata().num_rows(), 2);
    }

    #[tokio::test]
    async fn rows_whose_path_would_leave_the_base_directory_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let registry = prometheus::Registry::new();
        let metrics = weir_engine::metrics::EngineMetrics::new(&registry)
            .unwrap()
            .operator("test", "node");
        let mut sink = sink_with(&dir, "{path: \"out/{device}\", format: csv}", &metrics);
        let devices = [
            Some("../escaped"),
            Some("/abs"),
            None,
            Some("ok"),
            Some("x/.."),
            Some("dir/"),
            Some("sub/./fine"),
        ];
        sink.write(0, rows(&devices, 0)).await.unwrap();
        sink.close().await.unwrap();
        assert_eq!(read(&dir, "out/ok"), "ts,value\n1970-01-01T00:00:03Z,3.0\n");
        assert_eq!(
            read(&dir, "out/sub/fine"),
            "ts,value\n1970-01-01T00:00:06Z,6.0\n"
        );
        assert!(!dir.path().join("escaped").exists());
        assert!(!dir.path().join("out/x").exists());
        let dropped: f64 = registry
            .gather()
            .iter()
            .filter(|family| family.name() == "weir_operator_dropped_rows_total")
            .flat_map(|family| family.get_metric())
            .filter(|metric| {
                metric
                    .get_label()
                    .iter()
                    .any(|l| l.name() == "reason" && l.value() == INVALID_PATH)
            })
            .map(|metric| metric.get_counter().get_value())
            .sum();
        assert_eq!(dropped, 5.0);
    }

    #[test]
    fn check_partition_keeps_paths_inside_the_base_directory() {
        assert_eq!(check_partition("out/a/b.csv", 4), Ok(()));
        assert_eq!(
            check_partition("a..b/c", 0),
            Ok(()),
            "'..' inside a name is fine"
        );
        for (path, prefix, why) in [
            ("out//etc/passwd", 4, "absolute"),
            ("out/../x", 4, "'..'"),
            ("out/a/", 4, "directory"),
            ("out/a/.", 4, "directory"),
            ("out/", 4, "empty"),
            ("x\0", 0, "NUL"),
        ] {
            let error = check_partition(path, prefix).unwrap_err();
            assert!(error.contains(why), "{path}: {error}");
        }
    }

    #[test]
    fn plan_checks_the_template_against_the_input() {
        let errors = plan_errors("{path: \"out/{nope}.csv\", max_open_files: 0}", schema());
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("sinks.node.config.max_open_files: "));
        assert!(
            errors[1]
                .starts_with("sinks.node.config.path: path 'out/{nope}.csv' names column 'nope'")
        );
        let errors = plan_errors("{path: \"{device}/{ts}/{value}\"}", schema());
        assert!(errors[0].contains("names every input column"), "{errors:?}");
        let errors = plan_errors("{path: \"out/{device}/../x\"}", schema());
        assert!(errors[0].contains("'..' component"), "{errors:?}");
        let nested = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new_list(
                "values",
                Field::new_list_field(DataType::Float64, true),
                true,
            ),
        ]));
        let errors = plan_errors("{path: \"{device}.csv\", format: csv}", nested.clone());
        assert!(
            errors[0]
                .starts_with("sinks.node.config.format: format csv cannot hold column 'values'"),
            "{errors:?}"
        );
        // JSON holds nested values.
        let decl = Decl {
            inputs: vec![InputStream {
                name: "upstream".into(),
                stream: StreamInfo {
                    schema: nested,
                    event_time: None,
                },
            }],
            ..Decl::default()
        };
        assert!(
            plan(
                &FileSinkFactory,
                Role::Sink,
                "{path: \"{device}.json\"}",
                decl
            )
            .is_ok()
        );
    }

    #[test]
    fn an_unplanned_upstream_leaves_the_template_unchecked() {
        let decl = Decl {
            inputs: vec![InputStream {
                name: "upstream".into(),
                stream: StreamInfo {
                    schema: Arc::new(Schema::empty()),
                    event_time: None,
                },
            }],
            inputs_unknown: true,
            ..Decl::default()
        };
        let errors = plan(&FileSinkFactory, Role::Sink, "{path: \"out/{file}\"}", decl)
            .err()
            .unwrap();
        assert!(errors.is_empty(), "{errors:?}");
    }

    /// The finished and in-progress files in `dir`, sorted.
    fn listing(dir: &tempfile::TempDir) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn parquet_rows(path: &Path) -> usize {
        let file = File::open(path).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap_or_else(|e| panic!("{} is not readable parquet: {e}", path.display()));
        reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum()
    }

    #[tokio::test]
    async fn parquet_rolls_by_size_into_parts_that_are_each_readable() {
        let dir = tempfile::tempdir().unwrap();
        let config = "{path: r.parquet, format: parquet, rotate: {max_bytes: 1}}";
        let mut sink = sink(&dir, config);
        sink.start().await.unwrap();
        assert_eq!(listing(&dir), vec![".r-00000.parquet.inprogress"]);
        for first in [0, 10_000, 20_000] {
            sink.write(0, batch(first)).await.unwrap();
        }
        // Every write filled a part past max_bytes: three finished parts, none open.
        assert_eq!(
            listing(&dir),
            vec!["r-00000.parquet", "r-00001.parquet", "r-00002.parquet"]
        );
        for part in ["r-00000.parquet", "r-00001.parquet", "r-00002.parquet"] {
            assert_eq!(parquet_rows(&dir.path().join(part)), batch(0).num_rows());
        }
        sink.close().await.unwrap();
        // A restart goes on after the last part instead of overwriting it.
        let mut again = sink_with(&dir, config, &OperatorMetrics::detached("test", "node"));
        again.write(0, batch(30_000)).await.unwrap();
        again.close().await.unwrap();
        assert_eq!(
            listing(&dir).last().map(String::as_str),
            Some("r-00003.parquet")
        );
        assert_eq!(
            parquet_rows(&dir.path().join("r-00003.parquet")),
            batch(0).num_rows()
        );
    }

    #[tokio::test]
    async fn json_rolls_by_time_at_a_flush_and_the_close_finishes_the_last_part() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = sink(
            &dir,
            "{path: out.jsonl, rotate: {interval: 50ms, max_bytes: 1GiB}, fsync: true}",
        );
        sink.write(0, batch(0)).await.unwrap();
        sink.flush().await.unwrap();
        assert_eq!(listing(&dir), vec![".out-00000.jsonl.inprogress"]);
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        sink.flush().await.unwrap();
        assert_eq!(listing(&dir), vec!["out-00000.jsonl"]);
        sink.write(0, batch(10_000)).await.unwrap();
        sink.close().await.unwrap();
        assert_eq!(listing(&dir), vec!["out-00000.jsonl", "out-00001.jsonl"]);
        let lines = |name: &str| read(&dir, name).lines().count();
        assert_eq!(lines("out-00000.jsonl"), batch(0).num_rows());
        assert_eq!(lines("out-00001.jsonl"), batch(0).num_rows());
    }

    #[test]
    fn rotate_needs_a_bound_a_fixed_path_and_no_append() {
        let errors = plan_errors("{path: a.jsonl, rotate: {}}", schema());
        assert!(
            errors[0].contains("rotate needs max_bytes, interval or both"),
            "{errors:?}"
        );
        let errors = plan_errors(
            "{path: a.jsonl, append: true, rotate: {interval: 1m}}",
            schema(),
        );
        assert!(errors[0].contains("cannot append"), "{errors:?}");
        let errors = plan_errors(
            "{path: \"{device}.jsonl\", rotate: {interval: 1m}}",
            schema(),
        );
        assert!(errors[0].contains("fixed path"), "{errors:?}");
        let errors = plan_errors("{path: a.jsonl, rotate: {max_bytes: 0}}", schema());
        assert!(errors[0].contains("more than zero"), "{errors:?}");
    }
}
