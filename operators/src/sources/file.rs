//! The `file` source: JSON lines or CSV with a declared schema, read once or followed as
//! the file grows (`tail -F`).
//!
//! Speed comes from never looking at single lines on the happy path: the file is read in
//! chunks of whole lines and each chunk goes to a decoder in one call: flat JSON objects
//! to sonic-rs ([`super::flat_json`]), other JSON to arrow-json, CSV to arrow-csv. With
//! several worker threads, chunks decode on blocking threads while the next are read.
//! Only when a chunk fails to decode is it split into lines, and the bad ones are found
//! by bisection (decode each half with a fresh decoder, recurse into the half
//! that fails), so a rare bad line costs a few extra decodes instead of a per-line pass.
//! Malformed lines never stop the stream: each becomes a row on the `dead_letter` port
//! (file, line number, reason, raw text), and the good lines around it flow on.
//!
//! What counts as malformed: a line that is not valid JSON (or CSV with the schema's
//! number of fields), a value that does not convert to its column's type, a missing or
//! null value for a non-nullable column. Unknown JSON fields are ignored, so producers may
//! add fields without breaking readers. Blank lines are skipped.
//!
//! Limits, by design of the chunked fast path: a record must sit on one line (no
//! pretty-printed JSON, no quoted newlines in CSV); a JSON object that does span lines is
//! accepted when its chunk decodes as a whole, and reported line by line otherwise.
//!
//! `path` may be a glob pattern (`data/**/*.csv`: `*`, `?`, `[...]`, and `**` for any
//! depth of directories), so one source reads a whole folder: the matches are read one
//! after another in sorted path order, each as if it were the only file (a CSV header is
//! checked per file, line numbers restart, dead-letter rows name the file they came from).
//! Hidden files (names starting with `.`) match only a pattern that spells the dot.
//! The pattern is expanded when the pipeline starts; a pattern that matches no file fails
//! the start. `file_column` adds a column that names each row's file, relative to the
//! pattern's fixed base directory (the directories before the first wildcard), so the
//! rows can be told apart downstream and written back out per file (see the file sink's
//! `path` templates). Following (`follow`) works on one named file only.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::timezone::Tz;
use arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, StringArray, StringBuilder, TimestampMicrosecondArray,
    TimestampMillisecondArray, TimestampNanosecondArray, TimestampSecondArray, UInt64Array,
};
use arrow::compute::kernels::cast_utils::string_to_datetime;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use async_trait::async_trait;
use serde::Deserialize;
use tracing::{debug, info, warn};
use weir_engine::config::{ConfigErrors, HumanDuration};
use weir_engine::metrics::OperatorMetrics;
use weir_engine::registry::{
    NodeContext, OperatorFactory, OutputSpec, PlannedOperator, Role, StreamInfo,
};
use weir_engine::{OperatorError, OperatorInstance, Source, SourceContext};

use super::flat_json::FlatJson;
use crate::rejects::{DEAD_LETTER_PORT, RejectLog, outputs_with_dead_letter};

/// The `weir_operator_rejected_rows_total` reason of a malformed line.
pub const REJECTED_LINE: &str = "bad_line";

/// How much of the file one read takes; a chunk's whole lines are decoded in one call.
/// Unit tests use small chunks so that they cross chunk boundaries.
const CHUNK_BYTES: usize = if cfg!(test) { 4 << 10 } else { 2 << 20 };

/// A region of whole lines at least this large decodes on a blocking thread, beside the
/// reading of the next ones, when the runtime has more than one worker.
const PARALLEL_DECODE_BYTES: usize = if cfg!(test) { 1 << 10 } else { 64 << 10 };

/// The most bytes held for one unfinished line; a longer line is reported as malformed
/// and skipped, so a file without newlines cannot exhaust memory.
const MAX_LINE_BYTES: usize = if cfg!(test) { 64 << 10 } else { 64 << 20 };

/// Up to this many files, the source logs each file it finished at `info`; with more
/// (a pattern over a large folder) at `debug`, and a summary at `info` when all are read.
const LOG_EACH_FILE_UP_TO: usize = 8;

/// Builds `file` sources.
pub struct FileSourceFactory;

/// The `config` of a `file` source.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileSourceConfig {
    /// The file to read, or a glob pattern naming several (`data/**/*.csv`; `*`, `?`,
    /// `[...]`, and `**` for any depth of directories), read one after another in sorted
    /// path order. Relative paths are resolved against the pipeline file's directory. A
    /// pattern that matches no file fails the start, naming the pattern.
    pub path: String,
    /// `json` (one object per line) or `csv`.
    pub format: FileFormat,
    /// CSV options; only for `format: csv`.
    pub csv: Option<CsvOptions>,
    /// Keep reading as the file grows, following it through truncation and rotation; the
    /// stream then never ends. The file is read from its beginning either way. Only for a
    /// `path` that names one file, not a pattern.
    pub follow: bool,
    /// The most rows in one emitted batch.
    pub batch_rows: usize,
    /// With `follow`: how often to look for new data once the end is reached.
    pub poll_interval: HumanDuration,
    /// Adds a non-null `utf8` column of this name, after the schema's columns, holding the
    /// file each row came from: its path relative to the pattern's fixed base directory
    /// (the directories before the first wildcard), with `/` separators, e.g.
    /// `realKnownCause/nyc_taxi.csv`; for a `path` without wildcards, the file's name.
    pub file_column: Option<String>,
    /// How a pattern's files make the watermark. `per_file` (the default): each file has
    /// its own, and the source's is their minimum, so files not yet read hold it back
    /// and windows close only as the last file is read; files whose time ranges overlap
    /// never make each other's rows late. `in_order`: the files are in time order (daily
    /// logs), so one watermark runs across them and windows close as they are read; a
    /// row older than an earlier file's watermark is late.
    pub watermark: FileWatermark,
}

/// How the files of a pattern make the source's watermark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileWatermark {
    /// One watermark per file, combined by minimum.
    #[default]
    PerFile,
    /// One watermark across the files, in the order they are read.
    InOrder,
}

impl Default for FileSourceConfig {
    fn default() -> Self {
        FileSourceConfig {
            path: String::new(),
            format: FileFormat::Json,
            csv: None,
            follow: false,
            batch_rows: 8192,
            poll_interval: HumanDuration(Duration::from_millis(250)),
            file_column: None,
            watermark: FileWatermark::PerFile,
        }
    }
}

/// The encoding of a file's lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// One JSON object per line; unknown fields are ignored.
    #[default]
    Json,
    /// Comma- (or `delimiter`-) separated values, columns in the schema's order.
    Csv,
}

/// How a CSV file is laid out.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CsvOptions {
    /// Whether the first line names the columns; it must name the schema's columns in order.
    pub header: bool,
    /// The one ASCII character between fields.
    pub delimiter: String,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            header: true,
            delimiter: ",".to_owned(),
        }
    }
}

/// How lines are decoded, after validation.
#[derive(Clone, Copy, Debug)]
enum Decoding {
    Json,
    Csv { header: bool, delimiter: u8 },
}

/// What a file source reads.
#[derive(Clone, Debug)]
enum Input {
    /// One file, by name.
    File(PathBuf),
    /// Every file a glob pattern matches.
    Pattern {
        /// As written in the config, for messages.
        written: String,
        /// Resolved against the pipeline file's directory (escaped, so that its name
        /// cannot act as a pattern).
        pattern: String,
        /// The directories before the first wildcard, resolved; file names are relative
        /// to it.
        base: PathBuf,
    },
}

/// A file source whose config is valid.
#[derive(Clone, Debug)]
struct Plan {
    input: Input,
    decoding: Decoding,
    follow: bool,
    batch_rows: usize,
    poll_interval: Duration,
    /// The declared schema: what the files hold.
    schema: SchemaRef,
    /// What the source emits: the declared schema, then the file column if any.
    output: SchemaRef,
    file_column: Option<String>,
    event_time: Option<String>,
    watermark: FileWatermark,
}

impl OperatorFactory for FileSourceFactory {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn roles(&self) -> &'static [Role] {
        &[Role::Source]
    }

    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config: FileSourceConfig = node.config()?;
        Ok(Box::new(validate(&config, node)?))
    }
}

fn validate(config: &FileSourceConfig, node: &NodeContext<'_>) -> Result<Plan, ConfigErrors> {
    let mut errors = ConfigErrors::new();
    if node.schema.is_none() {
        errors.push(
            node.error("the file source needs a declared schema")
                .with_hint(
                    "add e.g. `schema: {device: utf8, ts: timestamp_ms, temperature: float64}`",
                ),
        );
    }
    if config.path.trim().is_empty() {
        errors.push(
            node.field_error(&["path"], "the file source needs a path")
                .with_hint("add e.g. `path: data/readings.jsonl` under config"),
        );
    }
    if config.batch_rows == 0 {
        errors.push(node.field_error(&["batch_rows"], "batch_rows must be at least 1"));
    }
    if config.poll_interval.0 < Duration::from_millis(1) {
        errors.push(node.field_error(&["poll_interval"], "poll_interval must be at least 1ms"));
    }
    let decoding = match (config.format, &config.csv) {
        (FileFormat::Json, Some(_)) => {
            errors.push(
                node.field_error(&["csv"], "csv options apply only to format csv")
                    .with_hint("remove `csv`, or set `format: csv`"),
            );
            Decoding::Json
        }
        (FileFormat::Json, None) => Decoding::Json,
        (FileFormat::Csv, options) => {
            let options = options.clone().unwrap_or_default();
            let delimiter = match options.delimiter.as_bytes() {
                [byte] if byte.is_ascii() && !matches!(byte, b'\n' | b'\r' | b'"') => *byte,
                _ => {
                    errors.push(
                        node.field_error(
                            &["csv", "delimiter"],
                            format!(
                                "delimiter '{}' is not one ASCII character",
                                options.delimiter
                            ),
                        )
                        .with_hint("write e.g. \",\", \";\" or \"\\t\""),
                    );
                    b','
                }
            };
            if let Some(schema) = &node.schema {
                for field in schema.fields() {
                    if field.data_type().is_nested() {
                        errors.push(node.error(format!(
                            "csv cannot hold column '{}' of type {}: csv columns are flat values",
                            field.name(),
                            field.data_type()
                        )));
                    }
                }
            }
            Decoding::Csv {
                header: options.header,
                delimiter,
            }
        }
    };
    let input = if is_pattern(&config.path) {
        if let Err(e) = glob::Pattern::new(&config.path) {
            errors.push(
                node.field_error(
                    &["path"],
                    format!(
                        "path '{}' is not a valid pattern: {} (at character {})",
                        config.path,
                        e.msg,
                        e.pos + 1
                    ),
                )
                .with_hint("write e.g. `data/**/*.csv`; `[[]` matches a literal '['"),
            );
        }
        if config.follow {
            errors.push(
                node.field_error(
                    &["follow"],
                    format!(
                        "follow reads one growing file, but path '{}' is a pattern",
                        config.path
                    ),
                )
                .with_hint("name one file in `path`, or remove `follow`"),
            );
        }
        pattern_input(node.base_dir, &config.path)
    } else {
        Input::File(node.base_dir.join(&config.path))
    };
    if let Some(name) = &config.file_column {
        if name.trim().is_empty() {
            errors.push(node.field_error(&["file_column"], "file_column must name a column"));
        } else if let Some(schema) = &node.schema
            && schema.index_of(name).is_ok()
        {
            errors.push(
                node.field_error(
                    &["file_column"],
                    format!("file_column '{name}' is also a column of the schema"),
                )
                .with_hint("choose another name for the file column"),
            );
        }
    }
    let Some(schema) = node.schema.clone() else {
        return Err(errors);
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let output = match &config.file_column {
        Some(name) => {
            let mut fields = schema.fields().to_vec();
            fields.push(Arc::new(Field::new(name, DataType::Utf8, false)));
            Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
        }
        None => schema.clone(),
    };
    Ok(Plan {
        input,
        decoding,
        follow: config.follow,
        watermark: config.watermark,
        batch_rows: config.batch_rows,
        poll_interval: config.poll_interval.0,
        schema,
        output,
        file_column: config.file_column.clone(),
        event_time: node.event_time.as_ref().map(|spec| spec.column.clone()),
    })
}

/// Whether `path` holds a glob wildcard.
fn is_pattern(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// A pattern resolved against `base_dir`, the pipeline file's directory.
fn pattern_input(base_dir: &Path, written: &str) -> Input {
    let fixed: Vec<&str> = written
        .split('/')
        .take_while(|component| !is_pattern(component))
        .collect();
    let fixed = match fixed.as_slice() {
        // `/*.csv`: the root.
        [""] => "/".to_owned(),
        fixed => fixed.join("/"),
    };
    let pattern = if Path::new(written).is_absolute() {
        written.to_owned()
    } else {
        let base = glob::Pattern::escape(&base_dir.to_string_lossy());
        Path::new(&base)
            .join(written)
            .to_string_lossy()
            .into_owned()
    };
    Input::Pattern {
        written: written.to_owned(),
        pattern,
        base: base_dir.join(fixed),
    }
}

/// `path` without `.` components, so paths spelt with and without `./` compare equal.
fn without_dots(path: &Path) -> PathBuf {
    path.components()
        .filter(|component| *component != Component::CurDir)
        .collect()
}

/// The files to read, in order, each with its name for the file column.
fn resolve(input: &Input) -> Result<VecDeque<(PathBuf, Arc<str>)>, OperatorError> {
    let (written, pattern, base) = match input {
        Input::File(path) => {
            let name = path
                .file_name()
                .map_or_else(|| path.to_string_lossy(), |name| name.to_string_lossy());
            return Ok(VecDeque::from([(path.clone(), Arc::from(name.as_ref()))]));
        }
        Input::Pattern {
            written,
            pattern,
            base,
        } => (written, pattern, base),
    };
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let matches = glob::glob_with(pattern, options).map_err(|e| {
        OperatorError::User(format!("path '{written}' is not a valid pattern: {e}"))
    })?;
    let mut files = Vec::new();
    for found in matches {
        let path = found.map_err(|e| {
            OperatorError::io(
                format!(
                    "cannot read {} while matching '{written}'",
                    e.path().display()
                ),
                std::io::Error::from(e),
            )
        })?;
        if path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(OperatorError::User(format!(
            "no file matches path '{written}' (looked in {})",
            base.display()
        )));
    }
    files.sort();
    let base = without_dots(base);
    Ok(files
        .into_iter()
        .map(|path| {
            let name = without_dots(&path)
                .strip_prefix(&base)
                .map(|relative| {
                    relative
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/")
                })
                .unwrap_or_else(|_| path.to_string_lossy().into_owned());
            (path, Arc::from(name))
        })
        .collect())
}

/// The schema of the dead-letter port: where each malformed line was, why, and its text.
pub fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("file", DataType::Utf8, false),
        Field::new("line", DataType::UInt64, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("raw", DataType::Utf8, false),
    ]))
}

impl PlannedOperator for Plan {
    fn outputs(&self) -> Vec<OutputSpec> {
        outputs_with_dead_letter(
            StreamInfo {
                schema: self.output.clone(),
                event_time: self.event_time.clone(),
            },
            dead_letter_schema(),
        )
    }

    fn instantiate(
        self: Box<Self>,
        _metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        let mut pending = resolve(&self.input)?;
        let count = pending.len();
        let Some((path, name)) = pending.pop_front() else {
            return Err(OperatorError::Internal(
                "the file source resolved no file".into(),
            ));
        };
        let file = File::open(&path)
            .map_err(|e| OperatorError::io(format!("cannot open {}", path.display()), e))?;
        let identity = file.metadata().ok().and_then(|meta| identity(&meta));
        let display = path.display().to_string();
        let reader = LineDecoder::new(&self);
        let report = match &self.input {
            Input::File(_) => RejectLog::new(display.clone(), "malformed line", "malformed lines"),
            Input::Pattern { written, .. } => {
                info!("file source: {count} files match '{written}'");
                RejectLog::new(
                    format!("files matching '{written}'"),
                    "malformed line",
                    "malformed lines",
                )
            }
        };
        Ok(OperatorInstance::Source(Box::new(FileSource {
            report,
            label: Arc::new(FileLabel { name, display }),
            path,
            name_column: None,
            pending,
            files: count,
            rows: 0,
            total_rows: 0,
            plan: *self,
            reader,
            file: Some(file),
            identity,
            offset: 0,
            buf: Vec::new(),
            no_newline_before: 0,
            next_line: 1,
            skipping: false,
            decoders: weir_engine::graph::PipelineBuilder::auto_parallelism(),
            queue: VecDeque::new(),
            spare_buffers: Vec::new(),
        })))
    }
}

/// What identifies a file independently of its name, to notice rotation.
type FileId = (u64, u64);

#[cfg(unix)]
fn identity(meta: &std::fs::Metadata) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn identity(_meta: &std::fs::Metadata) -> Option<FileId> {
    None
}

/// A malformed line, bound for the dead-letter port.
#[derive(Debug)]
struct BadLine {
    line: u64,
    error: String,
    raw: String,
}

/// What one region of whole lines decoded into.
#[derive(Debug, Default)]
struct Decoded {
    batches: Vec<RecordBatch>,
    bad: Vec<BadLine>,
    /// The lines were good but not all flat: the fast path is off from now on.
    not_flat: bool,
}

/// Decodes regions of whole lines into batches, isolating malformed lines.
#[derive(Clone)]
struct LineDecoder {
    decoding: Decoding,
    schema: SchemaRef,
    /// The schema with every column nullable, to name the columns a line left out.
    relaxed: SchemaRef,
    /// The schema CSV is decoded with: timestamp columns as text, see [`parse_timestamps`].
    csv_text: SchemaRef,
    batch_rows: usize,
    /// The next line of a CSV file with a header is the header.
    header_pending: bool,
    /// The fast path for JSON lines of flat objects, while the input suits it.
    flat: Option<FlatJson>,
}

impl LineDecoder {
    fn new(plan: &Plan) -> Self {
        let relaxed = Schema::new(
            plan.schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        );
        let csv_text = Schema::new(
            plan.schema
                .fields()
                .iter()
                .map(|f| match f.data_type() {
                    DataType::Timestamp(_, _) => f.as_ref().clone().with_data_type(DataType::Utf8),
                    _ => f.as_ref().clone(),
                })
                .collect::<Vec<_>>(),
        );
        LineDecoder {
            decoding: plan.decoding,
            schema: plan.schema.clone(),
            relaxed: Arc::new(relaxed),
            csv_text: Arc::new(csv_text),
            batch_rows: plan.batch_rows,
            header_pending: matches!(plan.decoding, Decoding::Csv { header: true, .. }),
            flat: match plan.decoding {
                Decoding::Json => FlatJson::new(&plan.schema, plan.batch_rows),
                Decoding::Csv { .. } => None,
            },
        }
    }

    /// Expects a header again: the file is new or was truncated.
    fn restart(&mut self) {
        self.header_pending = matches!(self.decoding, Decoding::Csv { header: true, .. });
    }

    /// Decodes `region`, whole lines whose first is line number `first_line`.
    fn decode_region(
        &mut self,
        region: &[u8],
        first_line: u64,
        file: &str,
    ) -> Result<Decoded, OperatorError> {
        let (region, first_line) = match self.take_header(region, first_line, file)? {
            Some(rest) => rest,
            None => return Ok(Decoded::default()),
        };
        if region.is_empty() {
            return Ok(Decoded::default());
        }
        if let Some(batches) = self.flat.as_ref().and_then(|flat| flat.decode(region)) {
            return Ok(Decoded {
                batches,
                ..Decoded::default()
            });
        }
        if let Ok(batches) = self.decode_all(region) {
            // Good input that is not flat (a string timestamp, a second object on a
            // line) will likely stay so, and each try costs a partial parse.
            let not_flat = self.flat.take().is_some();
            if not_flat {
                debug!("JSON lines are not all flat objects: decoding with arrow-json only");
            }
            return Ok(Decoded {
                batches,
                bad: Vec::new(),
                not_flat,
            });
        }
        self.isolate_bad_lines(region, first_line)
    }

    /// Checks and strips the CSV header when one is due. `None`: nothing but blank lines.
    fn take_header<'a>(
        &mut self,
        region: &'a [u8],
        first_line: u64,
        file: &str,
    ) -> Result<Option<(&'a [u8], u64)>, OperatorError> {
        let Decoding::Csv { delimiter, .. } = self.decoding else {
            return Ok(Some((region, first_line)));
        };
        if !self.header_pending {
            return Ok(Some((region, first_line)));
        }
        let mut start = 0;
        let mut line = first_line;
        while start < region.len() {
            let end = memchr::memchr(b'\n', &region[start..]).map_or(region.len(), |i| start + i);
            let text = trim_line_end(&region[start..end]);
            let rest = (end + 1).min(region.len());
            if is_blank(text) {
                start = rest;
                line += 1;
                continue;
            }
            let mut decoder = arrow_csv::ReaderBuilder::new(self.schema.clone())
                .with_header(true)
                .with_header_validation(true)
                .with_delimiter(delimiter)
                .build_decoder();
            decoder
                .decode(text)
                .and_then(|_| decoder.decode(&[]))
                .map_err(|e| {
                    OperatorError::User(format!(
                        "{file}:{line}: the csv header does not match the declared schema ({}): \
                         declare the schema's columns in the file's order, or set csv.header: false",
                        reason(&e)
                    ))
                })?;
            self.header_pending = false;
            return Ok(Some((&region[rest..], line + 1)));
        }
        Ok(None)
    }

    /// Decodes `bytes` as a whole into batches of at most `batch_rows` rows.
    fn decode_all(&self, bytes: &[u8]) -> Result<Vec<RecordBatch>, ArrowError> {
        match self.decoding {
            Decoding::Json => decode_json_lines(&self.schema, self.batch_rows, bytes),
            Decoding::Csv { delimiter, .. } => self.decode_csv(delimiter, bytes),
        }
    }

    fn decode_csv(&self, delimiter: u8, bytes: &[u8]) -> Result<Vec<RecordBatch>, ArrowError> {
        let mut decoder = arrow_csv::ReaderBuilder::new(self.csv_text.clone())
            .with_header(false)
            .with_delimiter(delimiter)
            .with_batch_size(self.batch_rows)
            .build_decoder();
        let mut text_batches = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let used = decoder.decode(rest)?;
            rest = &rest[used..];
            if decoder.capacity() == 0 {
                text_batches.extend(decoder.flush()?);
            } else if used == 0 {
                return Err(stalled());
            }
        }
        // An empty input tells the CSV reader the last record is complete.
        decoder.decode(&[])?;
        text_batches.extend(decoder.flush()?);
        text_batches
            .into_iter()
            .map(|batch| self.parse_csv_timestamps(batch))
            .collect()
    }

    /// Turns the text of a CSV batch's timestamp columns into timestamps.
    fn parse_csv_timestamps(&self, batch: RecordBatch) -> Result<RecordBatch, ArrowError> {
        let mut columns = batch.columns().to_vec();
        for (column, field) in columns.iter_mut().zip(self.schema.fields()) {
            if let DataType::Timestamp(unit, zone) = field.data_type() {
                *column =
                    parse_timestamps(column.as_string::<i32>(), *unit, zone.clone(), field.name())?;
            }
        }
        RecordBatch::try_new(self.schema.clone(), columns)
    }

    /// Finds the malformed lines of a region that failed to decode, keeping the good ones.
    fn isolate_bad_lines(&self, region: &[u8], first_line: u64) -> Result<Decoded, OperatorError> {
        let lines = line_spans(region, first_line);
        let mut decoded = Decoded::default();
        let mut good = Vec::new();
        // Bisection, left half first so rows keep their order.
        let mut pending = Vec::new();
        pending.push(0..lines.len());
        while let Some(range) = pending.pop() {
            if range.is_empty() {
                continue;
            }
            let bytes = &region[lines[range.start].1.start..lines[range.end - 1].1.end];
            match self.decode_all(bytes) {
                Ok(batches) => good.extend(batches),
                Err(error) if range.len() == 1 => {
                    let (line, span) = &lines[range.start];
                    decoded.bad.push(BadLine {
                        line: *line,
                        error: self.explain(&error, bytes),
                        raw: String::from_utf8_lossy(&region[span.clone()]).into_owned(),
                    });
                }
                Err(_) => {
                    let middle = range.start + range.len() / 2;
                    pending.push(middle..range.end);
                    pending.push(range.start..middle);
                }
            }
        }
        decoded.batches = self.rebatch(good)?;
        Ok(decoded)
    }

    /// Bisection leaves many small batches; downstream is faster with few big ones.
    fn rebatch(&self, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, OperatorError> {
        if batches.len() <= 1 {
            return Ok(batches);
        }
        let all = arrow::compute::concat_batches(&self.schema, &batches)?;
        let mut out = Vec::with_capacity(all.num_rows().div_ceil(self.batch_rows));
        let mut offset = 0;
        while offset < all.num_rows() {
            let rows = self.batch_rows.min(all.num_rows() - offset);
            out.push(all.slice(offset, rows));
            offset += rows;
        }
        Ok(out)
    }

    /// Why one line failed, in words a user can act on.
    fn explain(&self, error: &ArrowError, line: &[u8]) -> String {
        let text = reason(error);
        if matches!(self.decoding, Decoding::Csv { .. }) {
            return self.without_csv_positions(&text);
        }
        if matches!(self.decoding, Decoding::Json) && text.contains("non-nullable") {
            // Arrow names the column only in its debug form; decoding the line again with
            // every column nullable shows which required values are absent.
            if let Ok(batches) = decode_json_lines(&self.relaxed, self.batch_rows, line) {
                let missing: Vec<&str> = self
                    .schema
                    .fields()
                    .iter()
                    .zip(batches.first().map(|b| b.columns()).unwrap_or_default())
                    .filter(|(field, column)| !field.is_nullable() && column.null_count() > 0)
                    .map(|(field, _)| field.name().as_str())
                    .collect();
                if !missing.is_empty() {
                    return format!(
                        "missing value for non-nullable column '{}'",
                        missing.join("', '")
                    );
                }
            }
        }
        text
    }
}

/// Decodes JSON `bytes` with arrow-json, the reference decoder, into batches of at most
/// `batch_rows` rows of `schema`.
pub(super) fn decode_json_lines(
    schema: &SchemaRef,
    batch_rows: usize,
    bytes: &[u8],
) -> Result<Vec<RecordBatch>, ArrowError> {
    let mut decoder = arrow_json::ReaderBuilder::new(schema.clone())
        .with_batch_size(batch_rows)
        .build_decoder()?;
    let mut batches = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let used = decoder.decode(rest)?;
        rest = &rest[used..];
        if !rest.is_empty() {
            // The decoder stops early only when a batch is full.
            match decoder.flush()? {
                Some(batch) => batches.push(batch),
                None if used == 0 => return Err(stalled()),
                None => {}
            }
        }
    }
    batches.extend(decoder.flush()?);
    Ok(batches)
}

fn stalled() -> ArrowError {
    ArrowError::ComputeError("the decoder made no progress".to_owned())
}

/// Reads CSV timestamps: an integer counts the column's unit since the epoch, any other
/// text must be a date-time Arrow understands (RFC 3339 and the usual variants; without an
/// offset it is in the column's time zone, or UTC). Empty text is null.
///
/// arrow-csv itself reads only the text forms, but sensor CSV often carries epoch integers.
fn parse_timestamps(
    text: &StringArray,
    unit: TimeUnit,
    zone: Option<Arc<str>>,
    column: &str,
) -> Result<ArrayRef, ArrowError> {
    let tz: Tz = zone.as_deref().unwrap_or("+00:00").parse()?;
    let unreadable = |value: &str| {
        let unit = match unit {
            TimeUnit::Second => "seconds",
            TimeUnit::Millisecond => "milliseconds",
            TimeUnit::Microsecond => "microseconds",
            TimeUnit::Nanosecond => "nanoseconds",
        };
        ArrowError::ParseError(format!(
            "cannot read '{value}' in column '{column}' as a timestamp: write an RFC 3339 time \
             or an integer count of {unit} since the epoch"
        ))
    };
    let mut values = Vec::with_capacity(text.len());
    for value in text.iter() {
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            values.push(None);
            continue;
        };
        if let Ok(count) = value.parse::<i64>() {
            values.push(Some(count));
            continue;
        }
        let date = string_to_datetime(&tz, value).map_err(|_| unreadable(value))?;
        values.push(Some(match unit {
            TimeUnit::Second => date.timestamp(),
            TimeUnit::Millisecond => date.timestamp_millis(),
            TimeUnit::Microsecond => date.timestamp_micros(),
            TimeUnit::Nanosecond => date
                .timestamp_nanos_opt()
                .ok_or_else(|| unreadable(value))?,
        }));
    }
    Ok(match unit {
        TimeUnit::Second => Arc::new(TimestampSecondArray::from(values).with_timezone_opt(zone)),
        TimeUnit::Millisecond => {
            Arc::new(TimestampMillisecondArray::from(values).with_timezone_opt(zone))
        }
        TimeUnit::Microsecond => {
            Arc::new(TimestampMicrosecondArray::from(values).with_timezone_opt(zone))
        }
        TimeUnit::Nanosecond => {
            Arc::new(TimestampNanosecondArray::from(values).with_timezone_opt(zone))
        }
    })
}

impl LineDecoder {
    /// arrow-csv counts lines and columns from 0 within what it was given (one line here),
    /// and repeats the row: drop both, and name the column instead.
    fn without_csv_positions(&self, text: &str) -> String {
        let text = text.split(". Row data:").next().unwrap_or(text);
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        let next = |rest: &str| {
            [rest.find(" line "), rest.find(" column ")]
                .into_iter()
                .flatten()
                .min()
        };
        while let Some(at) = next(rest) {
            let (head, tail) = rest.split_at(at);
            let word = if tail.starts_with(" line ") {
                " line "
            } else {
                " column "
            };
            let digits = tail[word.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .count();
            if digits == 0 {
                out.push_str(head);
                out.push_str(word);
                rest = &tail[word.len()..];
                continue;
            }
            let number = &tail[word.len()..word.len() + digits];
            let after = &tail[word.len() + digits..];
            // "… for line 0, …" / "… at line 0" / "… for column 2 …"
            let head = head
                .strip_suffix(" for")
                .or_else(|| head.strip_suffix(" at"))
                .unwrap_or(head);
            out.push_str(head);
            if word == " column " {
                let name = number
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| self.schema.fields().get(i))
                    .map_or(number.to_owned(), |f| format!("'{}'", f.name()));
                out.push_str(" in column ");
                out.push_str(&name);
            }
            rest = after;
        }
        out.push_str(rest);
        out
    }
}

/// An Arrow error's message without its category prefix, starting lower-case.
fn reason(error: &ArrowError) -> String {
    let text = match error {
        ArrowError::JsonError(s)
        | ArrowError::CsvError(s)
        | ArrowError::ParseError(s)
        | ArrowError::CastError(s)
        | ArrowError::InvalidArgumentError(s) => s.clone(),
        other => other.to_string(),
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "unreadable line".to_owned(),
    }
}

/// The non-blank lines of `region` with their numbers and byte ranges (without the line
/// ending).
/// How many lines `region` holds, counting an unterminated last one.
fn line_count(region: &[u8]) -> u64 {
    let newlines = memchr::memchr_iter(b'\n', region).count() as u64;
    newlines + u64::from(region.last().is_some_and(|&b| b != b'\n'))
}

fn line_spans(region: &[u8], first_line: u64) -> Vec<(u64, Range<usize>)> {
    let mut spans = Vec::new();
    let mut start = 0;
    for (line, piece) in (first_line..).zip(region.split(|&b| b == b'\n')) {
        let text = trim_line_end(piece);
        if !is_blank(text) {
            spans.push((line, start..start + text.len()));
        }
        start += piece.len() + 1;
    }
    spans
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// What became of the file at `path` since it was opened.
enum FileState {
    /// Still the same file, not shorter than what was read.
    Same,
    /// Shorter than what was read: it was truncated and is being rewritten.
    Truncated,
    /// The name now points at another file: it was rotated.
    Replaced,
    /// Nothing has the name right now (mid-rotation).
    Missing,
}

/// Where a file source stands, for a checkpoint: how far its lines have been emitted,
/// and the rows counted so far.
#[derive(Debug, serde::Serialize, Deserialize)]
struct FilePosition {
    #[serde(flatten)]
    at: ReadPoint,
    rows: u64,
    total_rows: u64,
}

/// The running file source.
struct FileSource {
    plan: Plan,
    /// The file being read.
    path: PathBuf,
    /// How rows of the file being read are named: in logs, dead letters, the file column.
    label: Arc<FileLabel>,
    /// The file column's values for the file last emitted from, at least as many as the
    /// last batch had.
    name_column: Option<(Arc<FileLabel>, ArrayRef)>,
    /// The files still to read after this one, in order.
    pending: VecDeque<(PathBuf, Arc<str>)>,
    /// How many files the source reads in all.
    files: usize,
    /// Rows emitted from the file last emitted from, and from all files before it.
    rows: u64,
    total_rows: u64,
    reader: LineDecoder,
    /// `None` only while a blocking read holds it.
    file: Option<File>,
    identity: Option<FileId>,
    /// Bytes read from the current file.
    offset: u64,
    /// Read but not yet decoded: the start of a line that has not ended yet.
    buf: Vec<u8>,
    /// `buf` holds no newline before this index, so a long line is scanned once.
    no_newline_before: usize,
    /// The number of the line `buf` starts with, from 1.
    next_line: u64,
    /// Discarding the rest of an over-long line.
    skipping: bool,
    report: RejectLog,
    /// How many threads decode regions at once: the runtime's workers. With one,
    /// regions are decoded on the source's own task.
    decoders: usize,
    /// Read but not yet emitted, oldest first: regions decoding in the background, and
    /// the ends of the files they came from.
    queue: VecDeque<Queued>,
    /// Buffers regions were decoded from, to read into again.
    spare_buffers: Vec<Vec<u8>>,
}

/// A file as emitted rows name it.
#[derive(Debug)]
struct FileLabel {
    /// In the file column: relative to the pattern's base directory.
    name: Arc<str>,
    /// The path as shown in logs and dead-letter rows.
    display: String,
}

/// A place in the input: the file, which file it is, and a line start in it. What a
/// checkpoint saves is the place before the oldest thing read but not yet emitted.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
struct ReadPoint {
    path: PathBuf,
    identity: Option<FileId>,
    /// Bytes of the file before the place (lines emitted, or skipped as too long).
    offset: u64,
    next_line: u64,
    header_pending: bool,
    skipping: bool,
}

/// Read but not yet emitted, with where reading stood before it.
enum Queued {
    /// A region of whole lines decoding on a blocking thread: what it decoded into, and
    /// the buffer that held it.
    Region {
        task: tokio::task::JoinHandle<(Result<Decoded, OperatorError>, Vec<u8>)>,
        label: Arc<FileLabel>,
        from: ReadPoint,
    },
    /// The end of a file (of several): once its rows are out, it is logged and the next
    /// file's event time starts.
    FileEnd {
        label: Arc<FileLabel>,
        from: ReadPoint,
        more_files: bool,
    },
}

impl Queued {
    fn from(&self) -> &ReadPoint {
        match self {
            Queued::Region { from, .. } | Queued::FileEnd { from, .. } => from,
        }
    }
}

impl FileSource {
    fn io_error(&self, doing: &str, error: std::io::Error) -> OperatorError {
        OperatorError::io(format!("cannot {doing} {}", self.label.display), error)
    }

    /// Appends up to [`CHUNK_BYTES`] from the file to `buf`; returns how many (0 at the end).
    async fn read_chunk(&mut self) -> Result<usize, OperatorError> {
        let file = self.file.take().ok_or_else(|| {
            OperatorError::Internal("file source read without an open file".into())
        })?;
        let mut buf = std::mem::take(&mut self.buf);
        let (file, buf, read) = tokio::task::spawn_blocking(move || {
            buf.reserve(CHUNK_BYTES);
            let read = (&file).take(CHUNK_BYTES as u64).read_to_end(&mut buf);
            (file, buf, read)
        })
        .await
        .map_err(|e| OperatorError::Internal(format!("file read task failed: {e}")))?;
        self.file = Some(file);
        self.buf = buf;
        let read = read.map_err(|e| self.io_error("read", e))?;
        self.offset += read as u64;
        Ok(read)
    }

    /// Decodes and emits the whole lines in `buf`; at the end of a file that will not grow,
    /// the unterminated last line too.
    async fn drain_lines(
        &mut self,
        ctx: &mut SourceContext,
        at_end: bool,
    ) -> Result<(), OperatorError> {
        if self.skipping {
            match memchr::memchr(b'\n', &self.buf) {
                Some(newline) => {
                    self.buf.drain(..=newline);
                    self.next_line += 1;
                    self.skipping = false;
                }
                None => {
                    self.clear_buffer();
                    return Ok(());
                }
            }
        }
        // Only bytes read since the last look can hold a newline.
        let unseen = &self.buf[self.no_newline_before..];
        let end = match memchr::memrchr(b'\n', unseen) {
            _ if at_end => self.buf.len(),
            Some(newline) => self.no_newline_before + newline + 1,
            None => {
                self.no_newline_before = self.buf.len();
                if self.buf.len() > MAX_LINE_BYTES {
                    // Its report goes out in reading order, after what is queued.
                    self.emit_queued(ctx).await?;
                    self.skip_long_line(ctx).await?;
                }
                return Ok(());
            }
        };
        if end == 0 {
            return Ok(());
        }
        let mut end = end;
        if self.reader.header_pending {
            // The header is checked as it is read, so the lines after it may decode in
            // the background.
            let region = &self.buf[..end];
            let (used, next_line) =
                match self
                    .reader
                    .take_header(region, self.next_line, &self.label.display)?
                {
                    Some((rest, next_line)) => (end - rest.len(), next_line),
                    None => (end, self.next_line + line_count(region)),
                };
            self.buf.drain(..used);
            self.next_line = next_line;
            end -= used;
            if end == 0 {
                self.no_newline_before = self.buf.len();
                return Ok(());
            }
        }
        let lines = line_count(&self.buf[..end]);
        if self.decoders > 1 && end >= PARALLEL_DECODE_BYTES {
            self.decode_in_background(ctx, end).await?;
            self.no_newline_before = self.buf.len();
            self.next_line += lines;
            return Ok(());
        }
        self.emit_queued(ctx).await?;
        let decoded =
            self.reader
                .decode_region(&self.buf[..end], self.next_line, &self.label.display)?;
        self.buf.drain(..end);
        // What is left is the start of a line: no newline in it.
        self.no_newline_before = self.buf.len();
        self.next_line += lines;
        let label = Arc::clone(&self.label);
        self.emit(ctx, decoded, &label).await
    }

    /// Decodes the first `end` bytes of `buf` (whole lines, no header due) on a blocking
    /// thread and takes them out of `buf`. Up to [`FileSource::max_in_flight`] regions
    /// decode while the next ones are read, of this file or the next; when that many are
    /// in flight, the oldest is emitted first, so rows go out in reading order.
    async fn decode_in_background(
        &mut self,
        ctx: &mut SourceContext,
        end: usize,
    ) -> Result<(), OperatorError> {
        loop {
            let in_flight = self
                .queue
                .iter()
                .filter(|queued| matches!(queued, Queued::Region { .. }))
                .count();
            if in_flight < self.max_in_flight() {
                break;
            }
            self.emit_oldest(ctx).await?;
        }
        #[cfg(test)]
        tests::BACKGROUND_REGIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let from = self.read_point();
        // The region leaves in `buf` itself; reading goes on in a spare buffer.
        let mut next = self.spare_buffers.pop().unwrap_or_default();
        next.clear();
        next.extend_from_slice(&self.buf[end..]);
        let region = std::mem::replace(&mut self.buf, next);
        let (mut reader, file, first_line) = (
            self.reader.clone(),
            self.label.display.clone(),
            self.next_line,
        );
        let task = tokio::task::spawn_blocking(move || {
            let decoded = reader.decode_region(&region[..end], first_line, &file);
            (decoded, region)
        });
        self.queue.push_back(Queued::Region {
            task,
            label: Arc::clone(&self.label),
            from,
        });
        Ok(())
    }

    /// Emits the oldest thing queued, waiting for it to decode if it is a region.
    async fn emit_oldest(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError> {
        // Each item counts as emitted only once it leaves the queue: until then a
        // checkpoint saves the place before it.
        match self.queue.front_mut() {
            None => Ok(()),
            Some(Queued::Region { task, label, .. }) => {
                let label = Arc::clone(label);
                let (decoded, buffer) = task.await.map_err(|e| {
                    OperatorError::Internal(format!("file decode task failed: {e}"))
                })?;
                self.queue.pop_front();
                if self.spare_buffers.len() < self.max_in_flight() {
                    self.spare_buffers.push(buffer);
                }
                let decoded = decoded?;
                if decoded.not_flat {
                    self.reader.flat = None;
                }
                self.emit(ctx, decoded, &label).await
            }
            Some(Queued::FileEnd {
                label, more_files, ..
            }) => {
                let (label, more_files) = (Arc::clone(label), *more_files);
                self.queue.pop_front();
                self.finish_file(&label);
                if self.plan.watermark == FileWatermark::PerFile {
                    // Each file's watermark is its own; the last one releases it.
                    ctx.restart_event_time();
                    ctx.hold_watermarks(more_files);
                }
                Ok(())
            }
        }
    }

    /// How many regions may decode in the background at once: two per decoder, so that
    /// decoders stay busy while this task emits and reads.
    fn max_in_flight(&self) -> usize {
        2 * self.decoders
    }

    /// Emits everything queued, in order.
    async fn emit_queued(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError> {
        while !self.queue.is_empty() {
            self.emit_oldest(ctx).await?;
        }
        Ok(())
    }

    /// Where reading stands now, counting `buf` as not read.
    fn read_point(&self) -> ReadPoint {
        ReadPoint {
            path: self.path.clone(),
            identity: self.identity,
            offset: self.offset - self.buf.len() as u64,
            next_line: self.next_line,
            header_pending: self.reader.header_pending,
            skipping: self.skipping,
        }
    }

    /// Emits what a region of `file` decoded into: rows, then dead letters.
    async fn emit(
        &mut self,
        ctx: &mut SourceContext,
        decoded: Decoded,
        file: &Arc<FileLabel>,
    ) -> Result<(), OperatorError> {
        for batch in decoded.batches {
            self.rows += batch.num_rows() as u64;
            let batch = self.with_file_column(batch, file)?;
            ctx.emit(batch).await?;
        }
        if decoded.bad.is_empty() {
            return Ok(());
        }
        let rows = decoded.bad.len();
        let mut files = StringBuilder::with_capacity(rows, rows * file.display.len());
        let mut errors = StringBuilder::new();
        let mut raws = StringBuilder::new();
        let mut numbers = Vec::with_capacity(rows);
        for bad in &decoded.bad {
            match &self.plan.input {
                Input::File(_) => self
                    .report
                    .note(format_args!("line {}", bad.line), &bad.error),
                Input::Pattern { .. } => self.report.note(
                    format_args!("line {} of {}", bad.line, file.name),
                    &bad.error,
                ),
            }
            files.append_value(&file.display);
            numbers.push(bad.line);
            errors.append_value(&bad.error);
            raws.append_value(&bad.raw);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(files.finish()),
            Arc::new(UInt64Array::from(numbers)),
            Arc::new(errors.finish()),
            Arc::new(raws.finish()),
        ];
        let batch = RecordBatch::try_new(dead_letter_schema(), columns)?;
        ctx.count_rejected(REJECTED_LINE, rows as u64);
        ctx.emit_to(DEAD_LETTER_PORT, batch).await
    }

    /// Reports a line too long to keep and discards it up to its end.
    async fn skip_long_line(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError> {
        let head = String::from_utf8_lossy(&self.buf[..self.buf.len().min(1024)]).into_owned();
        self.clear_buffer();
        self.skipping = true;
        let bad = BadLine {
            line: self.next_line,
            error: format!("line is longer than {MAX_LINE_BYTES} bytes"),
            raw: head,
        };
        let label = Arc::clone(&self.label);
        let decoded = Decoded {
            bad: vec![bad],
            ..Decoded::default()
        };
        self.emit(ctx, decoded, &label).await
    }

    /// `batch` with the file column, when the source has one.
    fn with_file_column(
        &mut self,
        batch: RecordBatch,
        file: &Arc<FileLabel>,
    ) -> Result<RecordBatch, OperatorError> {
        if self.plan.file_column.is_none() {
            return Ok(batch);
        }
        let rows = batch.num_rows();
        let column = match &self.name_column {
            Some((named, column)) if Arc::ptr_eq(named, file) && column.len() >= rows => {
                column.slice(0, rows)
            }
            _ => {
                let column: ArrayRef = Arc::new(StringArray::from_iter_values(
                    std::iter::repeat_n(file.name.as_ref(), rows),
                ));
                self.name_column = Some((Arc::clone(file), column.clone()));
                column
            }
        };
        let mut columns = batch.columns().to_vec();
        columns.push(column);
        Ok(RecordBatch::try_new(self.plan.output.clone(), columns)?)
    }

    /// Logs how many rows `file`, whose rows are all out, held.
    fn finish_file(&mut self, file: &FileLabel) {
        if self.files <= LOG_EACH_FILE_UP_TO {
            info!("file source read {} rows from {}", self.rows, file.display);
        } else {
            debug!("file source read {} rows from {}", self.rows, file.display);
        }
        self.total_rows += self.rows;
        self.rows = 0;
    }

    /// Opens the next file; `false` when every file has been read.
    async fn next_file(&mut self) -> Result<bool, OperatorError> {
        let Some((path, name)) = self.pending.pop_front() else {
            if let Input::Pattern { written, .. } = &self.plan.input {
                info!(
                    "file source read {} rows from {} files matching '{written}'",
                    self.total_rows, self.files
                );
            }
            return Ok(false);
        };
        let display = path.display().to_string();
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file.into_std().await,
            Err(e) => return Err(OperatorError::io(format!("cannot open {display}"), e)),
        };
        self.identity = file.metadata().ok().and_then(|meta| identity(&meta));
        self.file = Some(file);
        self.path = path;
        self.label = Arc::new(FileLabel { name, display });
        self.start_over();
        Ok(true)
    }

    async fn check_file(&self) -> Result<FileState, OperatorError> {
        match tokio::fs::metadata(&self.path).await {
            Ok(meta) => {
                let now = identity(&meta);
                Ok(if now.is_some() && now != self.identity {
                    FileState::Replaced
                } else if meta.len() < self.offset {
                    FileState::Truncated
                } else {
                    FileState::Same
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileState::Missing),
            Err(e) => Err(self.io_error("inspect", e)),
        }
    }

    /// Starts over on the same file, which was truncated.
    fn rewind(&mut self) -> Result<(), OperatorError> {
        info!(
            "{} was truncated; reading it again from the start",
            self.label.display
        );
        if let Some(file) = &mut self.file {
            file.seek(SeekFrom::Start(0)).map_err(|e| {
                OperatorError::io(format!("cannot rewind {}", self.label.display), e)
            })?;
        }
        self.start_over();
        Ok(())
    }

    /// Switches to the file that now has the name; `false` when it vanished meanwhile.
    async fn reopen(&mut self) -> Result<bool, OperatorError> {
        let file = match tokio::fs::File::open(&self.path).await {
            Ok(file) => file.into_std().await,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(self.io_error("open", e)),
        };
        let meta = file.metadata().map_err(|e| self.io_error("inspect", e))?;
        info!(
            "{} was replaced (rotated); reading the new file",
            self.label.display
        );
        self.identity = identity(&meta);
        self.file = Some(file);
        self.start_over();
        Ok(true)
    }

    fn clear_buffer(&mut self) {
        self.buf.clear();
        self.no_newline_before = 0;
    }

    fn start_over(&mut self) {
        self.offset = 0;
        self.clear_buffer();
        self.next_line = 1;
        self.skipping = false;
        self.reader.restart();
    }

    /// Waits one poll interval, or until a checkpoint wants a barrier (it is taken);
    /// `true` when the pipeline is stopping instead.
    async fn wait(&mut self, ctx: &mut SourceContext) -> Result<bool, OperatorError> {
        tokio::select! {
            biased;
            _ = ctx.cancelled() => Ok(true),
            epoch = ctx.barrier_requested() => {
                let position = self.snapshot()?;
                ctx.checkpoint(epoch, position).await?;
                Ok(false)
            }
            _ = tokio::time::sleep(self.plan.poll_interval) => Ok(false),
        }
    }

    /// Takes the barrier of a checkpoint that asked for one, between two batches.
    async fn take_barrier(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError> {
        if let Some(epoch) = ctx.barrier_due() {
            let position = self.snapshot()?;
            ctx.checkpoint(epoch, position).await?;
        }
        Ok(())
    }

    /// Goes on from `position`: the file it names, at its offset. A file replaced or cut
    /// shorter since is read from its start, as when that happens while running.
    fn resume(&mut self, position: FilePosition) -> Result<(), OperatorError> {
        let FilePosition {
            at: position,
            rows,
            total_rows,
        } = position;
        if position.path != self.path {
            let Some(index) = self
                .pending
                .iter()
                .position(|(path, _)| *path == position.path)
            else {
                warn!(
                    "{} was being read at the checkpoint and no longer matches: reading from the first file",
                    position.path.display()
                );
                return Ok(());
            };
            self.pending.drain(..index);
            let Some((path, name)) = self.pending.pop_front() else {
                return Ok(());
            };
            let file = File::open(&path)
                .map_err(|e| OperatorError::io(format!("cannot open {}", path.display()), e))?;
            self.identity = file.metadata().ok().and_then(|meta| identity(&meta));
            let display = path.display().to_string();
            self.label = Arc::new(FileLabel { name, display });
            self.file = Some(file);
            self.path = path;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(OperatorError::Internal(
                "file source restored without a file".into(),
            ));
        };
        let length = file
            .metadata()
            .map_err(|e| OperatorError::io(format!("cannot inspect {}", self.label.display), e))?
            .len();
        if position.identity.is_some() && position.identity != self.identity {
            warn!(
                "{} was replaced since the checkpoint: reading the new file from its start",
                self.label.display
            );
            return Ok(());
        }
        if length < position.offset {
            warn!(
                "{} is shorter than at the checkpoint ({length} < {} bytes): reading it from its start",
                self.label.display, position.offset
            );
            return Ok(());
        }
        file.seek(SeekFrom::Start(position.offset))
            .map_err(|e| OperatorError::io(format!("cannot seek in {}", self.label.display), e))?;
        self.offset = position.offset;
        self.next_line = position.next_line;
        self.reader.header_pending = position.header_pending;
        self.skipping = position.skipping;
        self.rows = rows;
        self.total_rows = total_rows;
        info!(
            "{}: resuming at byte {} (line {})",
            self.label.display, self.offset, self.next_line
        );
        Ok(())
    }

    /// Follows the file at its end: returns `true` when the pipeline is stopping.
    async fn at_end_of_followed_file(
        &mut self,
        ctx: &mut SourceContext,
    ) -> Result<bool, OperatorError> {
        self.report.summarise_if_due();
        match self.check_file().await? {
            FileState::Same | FileState::Missing => self.wait(ctx).await,
            FileState::Truncated => {
                self.rewind()?;
                Ok(false)
            }
            FileState::Replaced => {
                // The writer may have appended to the old file just before renaming it.
                if self.read_chunk().await? > 0 {
                    self.drain_lines(ctx, false).await?;
                    return Ok(false);
                }
                self.drain_lines(ctx, true).await?;
                self.emit_queued(ctx).await?;
                if self.reopen().await? {
                    Ok(false)
                } else {
                    self.wait(ctx).await
                }
            }
        }
    }
}

#[async_trait]
impl Source for FileSource {
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError> {
        ctx.set_rejects(
            DEAD_LETTER_PORT,
            crate::rejects::rows_as_dead_letters(dead_letter_schema()),
        );
        let per_file = self.plan.watermark == FileWatermark::PerFile;
        // Files still to come hold the watermark back: their rows may be older.
        ctx.hold_watermarks(per_file && !self.pending.is_empty());
        let outcome = async {
            while !ctx.is_cancelled() {
                self.take_barrier(ctx).await?;
                if self.read_chunk().await? > 0 {
                    self.drain_lines(ctx, false).await?;
                    continue;
                }
                if self.plan.follow {
                    // Waiting at the end: what is still decoding goes out first.
                    self.emit_queued(ctx).await?;
                    if self.at_end_of_followed_file(ctx).await? {
                        return Ok(());
                    }
                    continue;
                }
                self.drain_lines(ctx, true).await?;
                // The next file is read while this one's last regions decode; its end is
                // handled once they are out.
                self.queue.push_back(Queued::FileEnd {
                    label: Arc::clone(&self.label),
                    from: self.read_point(),
                    more_files: self.pending.len() > 1,
                });
                if self.pending.is_empty() {
                    self.emit_queued(ctx).await?;
                }
                if !self.next_file().await? {
                    return Ok(());
                }
            }
            Ok(())
        }
        .await;
        self.report.summarise();
        outcome
    }

    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, OperatorError> {
        // What is queued was read but not emitted: it is read again after a restore.
        let at = match self.queue.front() {
            Some(queued) => queued.from().clone(),
            None => self.read_point(),
        };
        let position = FilePosition {
            at,
            rows: self.rows,
            total_rows: self.total_rows,
        };
        serde_json::to_vec(&position).map(Some).map_err(|e| {
            OperatorError::Internal(format!("cannot encode the file source's position: {e}"))
        })
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), OperatorError> {
        let position: FilePosition = serde_json::from_slice(state).map_err(|e| {
            OperatorError::User(format!(
                "the checkpointed position of the file source does not read: {e}"
            ))
        })?;
        self.resume(position)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use arrow::datatypes::{Float64Type, TimestampMillisecondType, UInt64Type};
    use tokio_util::sync::CancellationToken;
    use weir_engine::time::EventTimeSpec;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::format::test_support::{Decl, Outputs, plan, run_source, run_source_checkpointed};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            Field::new("temperature", DataType::Float64, false),
        ]))
    }

    fn event_time() -> EventTimeSpec {
        EventTimeSpec {
            column: "ts".into(),
            max_out_of_order: Duration::from_secs(1),
            ..EventTimeSpec::default()
        }
    }

    fn planned(dir: &tempfile::TempDir, config: &str) -> Box<dyn PlannedOperator> {
        let decl = Decl {
            schema: Some(schema()),
            event_time: Some(event_time()),
            base_dir: Some(dir.path()),
            ..Decl::default()
        };
        plan(&FileSourceFactory, Role::Source, config, decl).unwrap()
    }

    async fn read(dir: &tempfile::TempDir, config: &str) -> Outputs {
        let outputs = Outputs::new();
        run_source(
            planned(dir, config),
            Some(event_time()),
            CancellationToken::new(),
            &outputs,
        )
        .await
        .unwrap();
        outputs
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) {
        std::fs::write(dir.path().join(name), text).unwrap();
    }

    fn temperatures(batch: &RecordBatch) -> Vec<f64> {
        batch
            .column(2)
            .as_primitive::<Float64Type>()
            .values()
            .to_vec()
    }

    #[tokio::test]
    async fn reads_json_lines_with_blank_lines_and_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for i in 0..20_000 {
            text.push_str(&format!(
                "{{\"device\":\"d{}\",\"ts\":{},\"temperature\":{i}.5,\"extra\":true}}\n",
                i % 3,
                1_000 + i
            ));
            if i % 5000 == 0 {
                text.push_str("\n  \r\n");
            }
        }
        // The last line has no newline.
        text.push_str("{\"device\":\"last\",\"ts\":\"2026-01-01T00:00:00Z\",\"temperature\":1}");
        write(&dir, "in.jsonl", &text);
        let outputs = read(&dir, "{path: in.jsonl, batch_rows: 1000}").await;
        let batches = outputs.main.lock().unwrap().clone();
        assert!(batches.iter().all(|b| b.num_rows() <= 1000));
        let all = outputs.main_batch();
        assert_eq!(all.num_rows(), 20_001);
        let temperature = temperatures(&all);
        assert_eq!(temperature[0], 0.5);
        assert_eq!(temperature[19_999], 19_999.5);
        let ts = all.column(1).as_primitive::<TimestampMillisecondType>();
        assert_eq!(ts.value(20_000), 1_767_225_600_000);
        assert!(outputs.side.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn reads_csv_with_a_header_and_a_delimiter() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir,
            "in.csv",
            "device;ts;temperature\r\nd1;2026-01-01T00:00:00Z;20.5\r\n\r\nd2;1767225601000;21\r\n",
        );
        let outputs = read(&dir, "{path: in.csv, format: csv, csv: {delimiter: ';'}}").await;
        let all = outputs.main_batch();
        assert_eq!(all.num_rows(), 2);
        assert_eq!(temperatures(&all), vec![20.5, 21.0]);
        assert_eq!(all.column(0).as_string::<i32>().value(1), "d2");
        let ts = all.column(1).as_primitive::<TimestampMillisecondType>();
        assert_eq!(
            ts.values().to_vec(),
            vec![1_767_225_600_000, 1_767_225_601_000]
        );
    }

    #[tokio::test]
    async fn csv_header_must_match_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir, "in.csv", "ts,device,temperature\n1,d,2\n");
        let outputs = Outputs::new();
        let planned = planned(&dir, "{path: in.csv, format: csv}");
        let error = run_source(planned, None, CancellationToken::new(), &outputs)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("in.csv:1: the csv header does not match"),
            "{error}"
        );
    }

    #[test]
    fn regions_decoded_in_the_background_give_what_one_decoder_gives() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for i in 0..3000 {
            match i {
                // Bad lines, blank lines and a CRLF line, spread over many regions.
                7 | 1499 | 2998 => text.push_str("{\"device\":\"d\",\"ts\":\n"),
                640 => text.push_str("\n \r\n"),
                _ if i % 333 == 0 => text.push_str(&format!(
                    "{{\"device\":\"d{i}\",\"ts\":{i},\"temperature\":{i}}}\r\n"
                )),
                _ => text.push_str(&format!(
                    "{{\"device\":\"d{}\",\"ts\":{i},\"temperature\":{i}}}\n",
                    i % 5
                )),
            }
        }
        write(&dir, "in.jsonl", &text);
        let read_with = |workers: usize| {
            let runtime = runtime(workers);
            let before = BACKGROUND_REGIONS.load(Ordering::Relaxed);
            let outputs = runtime.block_on(read(&dir, "{path: in.jsonl, batch_rows: 1000}"));
            let background = BACKGROUND_REGIONS.load(Ordering::Relaxed) - before;
            (outputs.main_batch(), outputs.side_batch(), background)
        };
        let (one_rows, one_bad, _) = read_with(1);
        for workers in [2, 3] {
            let (rows, bad, background) = read_with(workers);
            assert_eq!(rows, one_rows, "{workers} decoders");
            assert_eq!(bad, one_bad, "{workers} decoders");
            assert!(
                background > 10,
                "{workers} decoders: {background} regions in the background"
            );
        }
        assert_eq!(one_rows.num_rows(), 2996);
        let numbers = one_bad
            .column(1)
            .as_primitive::<UInt64Type>()
            .values()
            .to_vec();
        // Entry i is line i + 1 up to the two blank lines 641 and 642, and i + 2 after.
        assert_eq!(numbers, vec![8, 1501, 3000]);
    }

    /// Counts the regions decoded on blocking threads, to show a test took that path.
    pub(super) static BACKGROUND_REGIONS: AtomicUsize = AtomicUsize::new(0);

    fn runtime(workers: usize) -> tokio::runtime::Runtime {
        match workers {
            1 => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            n => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n)
                .enable_all()
                .build(),
        }
        .expect("a runtime")
    }

    #[test]
    fn a_checkpoint_taken_while_regions_decode_holds_only_emitted_lines() {
        let line = |i: u32| format!("{{\"device\":\"d\",\"ts\":{i},\"temperature\":{i}}}\n");
        // One file, and a pattern whose files end while the next ones are being read.
        let one = tempfile::tempdir().unwrap();
        write(
            &one,
            "in.jsonl",
            &(1..=20_000).map(line).collect::<String>(),
        );
        resumes_exactly_once(
            &one,
            "{path: in.jsonl, batch_rows: 64}",
            20_000,
            &[3_000, 9_000],
        );
        let many = tempfile::tempdir().unwrap();
        for file in 0..8 {
            let lines = (file * 2_500 + 1..=(file + 1) * 2_500)
                .map(line)
                .collect::<String>();
            write(&many, &format!("in-{file}.jsonl"), &lines);
        }
        let pattern = "{path: \"in-*.jsonl\", batch_rows: 64, file_column: file}";
        resumes_exactly_once(&many, pattern, 20_000, &[2_400, 2_600, 11_000]);
    }

    /// Reads `config` in runs that are stopped once they have emitted each of `stops`
    /// rows, each resuming from the last one's checkpoint (taken every millisecond, so
    /// while regions decode), and checks that the rows that count, up to each resumed
    /// checkpoint and then the last run's, are temperatures 1..=`lines`, each once.
    fn resumes_exactly_once(dir: &tempfile::TempDir, config: &str, lines: u32, stops: &[usize]) {
        let store = dir.path().join("state.redb");
        let runtime = runtime(2);
        let before = BACKGROUND_REGIONS.load(Ordering::Relaxed);
        let mut seen: Vec<f64> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for stop_after in stops.iter().copied().map(Some).chain([None]) {
            let outputs = Outputs::new();
            let cancel = CancellationToken::new();
            let planned = planned(dir, config);
            runtime.block_on(async {
                let watched = outputs.clone();
                let stop = {
                    let cancel = cancel.clone();
                    async move {
                        let Some(rows) = stop_after else { return };
                        while watched.main_rows() < rows {
                            tokio::task::yield_now().await;
                        }
                        cancel.cancel();
                    }
                };
                let interval = Duration::from_millis(1);
                let run =
                    run_source_checkpointed(planned, &store, interval, cancel.clone(), &outputs);
                let (ran, ()) = tokio::join!(run, stop);
                ran.unwrap();
            });
            let restored = outputs.restored_main_rows.lock().unwrap().unwrap_or(0) as usize;
            // This run resumed from what the one before had by its last checkpoint.
            assert!(
                restored <= seen.len(),
                "{config}: {restored} > {}",
                seen.len()
            );
            seen.truncate(restored);
            names.truncate(restored);
            let batch = outputs.main_batch();
            seen.extend(temperatures(&batch));
            if let Some(column) = batch.column_by_name("file") {
                names.extend(strings(column));
            }
        }
        let expected: Vec<f64> = (1..=lines).map(f64::from).collect();
        assert_eq!(seen.len(), expected.len(), "{config}");
        assert!(
            seen == expected,
            "{config}: every line exactly once, in order"
        );
        if !names.is_empty() {
            // Each row names its file: line i is in file (i - 1) / 2500.
            for (i, name) in names.iter().enumerate() {
                assert_eq!(
                    *name,
                    format!("in-{}.jsonl", i / 2_500),
                    "{config}: row {i}"
                );
            }
        }
        assert!(
            BACKGROUND_REGIONS.load(Ordering::Relaxed) - before > 10,
            "{config}"
        );
    }

    #[tokio::test]
    async fn malformed_json_lines_go_to_the_dead_letter_port() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines: Vec<String> = (0..1000)
            .map(|i| format!("{{\"device\":\"d\",\"ts\":{i},\"temperature\":{i}}}"))
            .collect();
        lines[10] = "{\"device\":\"d\",\"ts\":10,\"temperature\":".into();
        lines[500] = "{\"device\":\"d\",\"ts\":500,\"temperature\":\"hot\"}".into();
        lines[501] = "{\"device\":\"d\",\"ts\":501}".into();
        lines[998] = "not json at all".into();
        write(&dir, "in.jsonl", &(lines.join("\n") + "\n"));
        let outputs = read(&dir, "{path: in.jsonl, batch_rows: 100}").await;
        let good = outputs.main_batch();
        assert_eq!(good.num_rows(), 996);
        let expected: Vec<f64> = (0..1000)
            .filter(|i| ![10, 500, 501, 998].contains(i))
            .map(f64::from)
            .collect();
        assert_eq!(temperatures(&good), expected, "good rows arrive in order");
        let dead = outputs.side_batch();
        let numbers = dead
            .column(1)
            .as_primitive::<UInt64Type>()
            .values()
            .to_vec();
        assert_eq!(numbers, vec![11, 501, 502, 999]);
        let errors = dead.column(2).as_string::<i32>();
        assert!(
            errors.value(1).contains("temperature"),
            "{}",
            errors.value(1)
        );
        assert_eq!(
            errors.value(2),
            "missing value for non-nullable column 'temperature'"
        );
        assert!(
            dead.column(0)
                .as_string::<i32>()
                .value(0)
                .ends_with("in.jsonl")
        );
        assert_eq!(
            dead.column(3).as_string::<i32>().value(3),
            "not json at all"
        );
    }

    #[tokio::test]
    async fn malformed_csv_lines_go_to_the_dead_letter_port() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir, "in.csv", "d,1,1.5\nd,2\nd,3,warm\nd,4,4.5\n");
        let outputs = read(&dir, "{path: in.csv, format: csv, csv: {header: false}}").await;
        assert_eq!(temperatures(&outputs.main_batch()), vec![1.5, 4.5]);
        let dead = outputs.side_batch();
        let numbers = dead
            .column(1)
            .as_primitive::<UInt64Type>()
            .values()
            .to_vec();
        assert_eq!(numbers, vec![2, 3]);
        assert_eq!(dead.column(3).as_string::<i32>().value(1), "d,3,warm");
        let errors = dead.column(2).as_string::<i32>();
        assert_eq!(
            errors.value(0),
            "incorrect number of fields, expected 3 got 2"
        );
        assert_eq!(
            errors.value(1),
            "error while parsing value 'warm' as type 'Float64' in column 'temperature'"
        );
    }

    #[tokio::test]
    async fn follow_reads_appended_lines_and_survives_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        write(
            &dir,
            "in.jsonl",
            "{\"device\":\"a\",\"ts\":1,\"temperature\":1}\n",
        );
        let outputs = Outputs::new();
        let cancel = CancellationToken::new();
        let planned = planned(&dir, "{path: in.jsonl, follow: true, poll_interval: 5ms}");
        let run = tokio::spawn({
            let (outputs, cancel) = (outputs.clone(), cancel.clone());
            async move { run_source(planned, Some(event_time()), cancel, &outputs).await }
        });
        let wait_for = |rows: usize| {
            let watched = outputs.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while watched.main_rows() < rows {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await
                .expect("rows arrive in time");
            }
        };
        wait_for(1).await;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        // A line written in two parts is decoded once it is complete.
        file.write_all(b"{\"device\":\"a\",\"ts\":2,").unwrap();
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        file.write_all(b"\"temperature\":2}\n").unwrap();
        wait_for(2).await;
        // Truncate and write a shorter file: reading starts over.
        std::fs::write(&path, "{\"device\":\"b\",\"ts\":3,\"temperature\":3}\n").unwrap();
        wait_for(3).await;
        cancel.cancel();
        run.await.unwrap().unwrap();
        assert_eq!(temperatures(&outputs.main_batch()), vec![1.0, 2.0, 3.0]);
    }

    #[tokio::test]
    async fn a_followed_file_resumes_after_the_last_line_it_emitted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let line = |t: u32| format!("{{\"device\":\"a\",\"ts\":{t},\"temperature\":{t}}}\n");
        // Three lines and the start of a fourth, not yet complete when the run stops.
        write(
            &dir,
            "in.jsonl",
            &format!("{}{}{}{{\"device\":\"a\",", line(1), line(2), line(3)),
        );
        let store = dir.path().join("state.redb");
        let run_until = |rows: usize| {
            let planned = planned(&dir, "{path: in.jsonl, follow: true, poll_interval: 5ms}");
            let store = store.clone();
            async move {
                let outputs = Outputs::new();
                let cancel = CancellationToken::new();
                let watched = outputs.clone();
                let stop = {
                    let cancel = cancel.clone();
                    async move {
                        tokio::time::timeout(Duration::from_secs(10), async {
                            while watched.main_rows() < rows {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        })
                        .await
                        .expect("rows arrive in time");
                        // Long enough for a checkpoint after the last row.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        cancel.cancel();
                    }
                };
                let (ran, ()) = tokio::join!(
                    run_source_checkpointed(
                        planned,
                        &store,
                        Duration::from_millis(5),
                        cancel.clone(),
                        &outputs
                    ),
                    stop
                );
                ran.unwrap();
                temperatures(&outputs.main_batch())
            }
        };
        assert_eq!(run_until(3).await, vec![1.0, 2.0, 3.0]);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(format!("\"ts\":4,\"temperature\":4}}\n{}", line(5)).as_bytes())
            .unwrap();
        assert_eq!(run_until(2).await, vec![4.0, 5.0]);
        // Truncated while no run was reading it: read from its start.
        std::fs::write(&path, line(6)).unwrap();
        assert_eq!(run_until(1).await, vec![6.0]);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn follow_moves_on_to_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        write(
            &dir,
            "in.jsonl",
            "{\"device\":\"a\",\"ts\":1,\"temperature\":1}\n",
        );
        let outputs = Outputs::new();
        let cancel = CancellationToken::new();
        let planned = planned(&dir, "{path: in.jsonl, follow: true, poll_interval: 5ms}");
        let run = tokio::spawn({
            let (outputs, cancel) = (outputs.clone(), cancel.clone());
            async move { run_source(planned, None, cancel, &outputs).await }
        });
        let rows = || outputs.main_rows();
        tokio::time::timeout(Duration::from_secs(10), async {
            while rows() < 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        // The old file gets a last line without a newline, then is renamed away.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"{\"device\":\"a\",\"ts\":2,\"temperature\":2}")
            .unwrap();
        std::fs::rename(&path, dir.path().join("in.jsonl.1")).unwrap();
        std::fs::write(&path, "{\"device\":\"b\",\"ts\":3,\"temperature\":3}\n").unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while rows() < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        cancel.cancel();
        run.await.unwrap().unwrap();
        assert_eq!(temperatures(&outputs.main_batch()), vec![1.0, 2.0, 3.0]);
    }

    #[tokio::test]
    async fn an_overlong_line_is_reported_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let good = |i: u32| format!("{{\"device\":\"d\",\"ts\":{i},\"temperature\":{i}}}\n");
        let long = format!("{{\"device\":\"{}\"}}\n", "x".repeat(MAX_LINE_BYTES * 2));
        write(&dir, "in.jsonl", &(good(1) + &long + &good(3)));
        let outputs = read(&dir, "{path: in.jsonl}").await;
        assert_eq!(temperatures(&outputs.main_batch()), vec![1.0, 3.0]);
        let dead = outputs.side_batch();
        assert_eq!(dead.column(1).as_primitive::<UInt64Type>().value(0), 2);
        let error = dead.column(2).as_string::<i32>().value(0);
        assert!(error.starts_with("line is longer than"), "{error}");
        assert!(dead.column(3).as_string::<i32>().value(0).len() <= 1024);
    }

    #[test]
    fn a_missing_file_fails_at_instantiate_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let error = match planned(&dir, "{path: nope.jsonl}").instantiate(
            &weir_engine::metrics::OperatorMetrics::detached("test", "node"),
        ) {
            Err(error) => error.to_string(),
            Ok(_) => panic!("a missing file must not instantiate"),
        };
        assert!(
            error.starts_with("cannot open ") && error.contains("nope.jsonl"),
            "{error}"
        );
    }

    #[test]
    fn plan_requires_a_schema_and_rejects_bad_options() {
        let errors = plan(
            &FileSourceFactory,
            Role::Source,
            "{format: json, csv: {header: true}, batch_rows: 0}",
            Decl::default(),
        )
        .err()
        .unwrap();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "sources.node",
                "sources.node.config.path",
                "sources.node.config.batch_rows",
                "sources.node.config.csv"
            ]
        );
        let decl = Decl {
            schema: Some(schema()),
            ..Decl::default()
        };
        let errors = plan(
            &FileSourceFactory,
            Role::Source,
            "{path: x.csv, format: csv, csv: {delimiter: ';;'}}",
            decl,
        )
        .err()
        .unwrap();
        assert_eq!(errors[0].path, "sources.node.config.csv.delimiter");
    }

    /// Writes `text` at `name` under `base`, creating directories.
    fn put(base: &Path, name: &str, text: &str) {
        let path = base.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// Runs a source planned against `base` as the pipeline's directory.
    async fn run_in(base: &Path, config: &str) -> (Outputs, Result<(), String>) {
        let decl = Decl {
            schema: Some(schema()),
            base_dir: Some(base),
            ..Decl::default()
        };
        let planned = plan(&FileSourceFactory, Role::Source, config, decl).unwrap();
        let outputs = Outputs::new();
        let outcome = run_source(planned, None, CancellationToken::new(), &outputs)
            .await
            .map_err(|e| e.to_string());
        (outputs, outcome)
    }

    fn strings(column: &ArrayRef) -> Vec<String> {
        column
            .as_string::<i32>()
            .iter()
            .map(|v| v.unwrap().to_owned())
            .collect()
    }

    #[test]
    fn a_pattern_reads_every_match_in_path_order_naming_each_file() {
        let dir = tempfile::tempdir().unwrap();
        // The pipeline's directory has a name that would be a pattern itself.
        let base = dir.path().join("pipe[1]");
        let csv = |first: usize, rows: usize| {
            let mut text = "device,ts,temperature\n".to_owned();
            for i in first..first + rows {
                text.push_str(&format!("d,{i},{i}\n"));
            }
            text
        };
        put(&base, "data/b/2.csv", &csv(300, 2));
        // Larger than a chunk, so files end and start mid-way through reads.
        put(&base, "data/a/1.csv", &csv(0, 250));
        put(&base, "data/a/sub/0.csv", &csv(250, 50));
        put(&base, "data/top.csv", &csv(302, 1));
        put(&base, "data/a/notes.txt", "not csv");
        put(&base, "data/.hidden.csv", "not, even, csv\n");
        put(
            &base,
            "data/dir.csv/inner.txt",
            "a directory that matches is skipped",
        );
        let config = "{path: \"data/**/*.csv\", format: csv, file_column: file, batch_rows: 100}";
        // With more workers, files are read while the regions of the one before decode.
        for workers in [1, 2, 3] {
            let before = BACKGROUND_REGIONS.load(Ordering::Relaxed);
            let (outputs, outcome) = runtime(workers).block_on(run_in(&base, config));
            outcome.unwrap();
            if workers > 1 {
                assert!(BACKGROUND_REGIONS.load(Ordering::Relaxed) > before);
            }
            read_every_csv_match_in_order(&outputs);
        }
    }

    fn read_every_csv_match_in_order(outputs: &Outputs) {
        let all = outputs.main_batch();
        assert_eq!(
            temperatures(&all),
            (0..303).map(f64::from).collect::<Vec<_>>(),
            "files in sorted path order, rows in file order"
        );
        assert_eq!(
            all.schema().field(3),
            &Field::new("file", DataType::Utf8, false)
        );
        let files = strings(all.column(3));
        let expected: Vec<String> = [
            ("a/1.csv", 250),
            ("a/sub/0.csv", 50),
            ("b/2.csv", 2),
            ("top.csv", 1),
        ]
        .into_iter()
        .flat_map(|(name, rows)| std::iter::repeat_n(name.to_owned(), rows))
        .collect();
        assert_eq!(files, expected);
        assert!(outputs.side.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_absolute_pattern_names_files_relative_to_its_fixed_directories() {
        let dir = tempfile::tempdir().unwrap();
        put(
            dir.path(),
            "nab/realKnownCause/nyc_taxi.csv",
            "device,ts,temperature\nd,1,1\n",
        );
        put(
            dir.path(),
            "nab/artificial/flat.csv",
            "device,ts,temperature\nd,2,2\n",
        );
        let pattern = format!("{}/nab/*/*.csv", dir.path().display());
        let elsewhere = tempfile::tempdir().unwrap();
        let config = format!("{{path: \"{pattern}\", format: csv, file_column: source}}");
        let (outputs, outcome) = run_in(elsewhere.path(), &config).await;
        outcome.unwrap();
        assert_eq!(
            strings(outputs.main_batch().column(3)),
            ["artificial/flat.csv", "realKnownCause/nyc_taxi.csv"]
        );
    }

    #[tokio::test]
    async fn bad_lines_name_their_file_and_each_header_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let header = "device,ts,temperature\n";
        put(dir.path(), "in/1.csv", &format!("{header}d,1,1\nd,2,2\n"));
        put(
            dir.path(),
            "in/2.csv",
            &format!("{header}d,3,3\nd,4,warm\nd,5,5\n"),
        );
        let (outputs, outcome) = run_in(dir.path(), "{path: in/*.csv, format: csv}").await;
        outcome.unwrap();
        assert_eq!(
            temperatures(&outputs.main_batch()),
            vec![1.0, 2.0, 3.0, 5.0]
        );
        let dead = outputs.side_batch();
        assert!(
            dead.column(0)
                .as_string::<i32>()
                .value(0)
                .ends_with("in/2.csv"),
            "{:?}",
            dead.column(0)
        );
        assert_eq!(dead.column(1).as_primitive::<UInt64Type>().value(0), 3);

        put(dir.path(), "in/3.csv", "ts,device,temperature\n1,d,6\n");
        let (outputs, outcome) = run_in(dir.path(), "{path: in/*.csv, format: csv}").await;
        let error = outcome.unwrap_err();
        assert!(
            error.contains("in/3.csv:1: the csv header does not match"),
            "{error}"
        );
        assert_eq!(outputs.main_rows(), 4, "the earlier files were read");
    }

    #[test]
    fn a_pattern_that_matches_nothing_fails_at_start_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        put(dir.path(), "data/readme.txt", "");
        let error = match planned(&dir, "{path: \"data/**/*.csv\"}").instantiate(
            &weir_engine::metrics::OperatorMetrics::detached("test", "node"),
        ) {
            Err(error) => error.to_string(),
            Ok(_) => panic!("an empty match must not instantiate"),
        };
        assert!(
            error.starts_with("no file matches path 'data/**/*.csv'"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_single_file_s_file_column_holds_its_name() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir,
            "in.jsonl",
            "{\"device\":\"d\",\"ts\":1,\"temperature\":1}\n",
        );
        let planned = planned(&dir, "{path: in.jsonl, file_column: origin}");
        let schema = planned.outputs()[0].stream.schema.clone();
        assert_eq!(schema.fields().len(), 4);
        assert_eq!(
            schema.field(3),
            &Field::new("origin", DataType::Utf8, false)
        );
        let outputs = read(&dir, "{path: in.jsonl, file_column: origin}").await;
        assert_eq!(strings(outputs.main_batch().column(3)), ["in.jsonl"]);
    }

    #[test]
    fn plan_rejects_follow_on_a_pattern_bad_patterns_and_clashing_file_columns() {
        let decl = || Decl {
            schema: Some(schema()),
            ..Decl::default()
        };
        let errors = plan(
            &FileSourceFactory,
            Role::Source,
            "{path: \"logs/*.jsonl\", follow: true, file_column: device}",
            decl(),
        )
        .err()
        .unwrap();
        let found: Vec<_> = errors
            .iter()
            .map(|e| (e.path.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "sources.node.config.follow",
                    "follow reads one growing file, but path 'logs/*.jsonl' is a pattern"
                ),
                (
                    "sources.node.config.file_column",
                    "file_column 'device' is also a column of the schema"
                ),
            ]
        );
        let errors = plan(
            &FileSourceFactory,
            Role::Source,
            "{path: \"logs/[a.jsonl\"}",
            decl(),
        )
        .err()
        .unwrap();
        assert_eq!(errors[0].path, "sources.node.config.path");
        assert!(
            errors[0].message.contains("is not a valid pattern"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn outputs_declare_main_and_dead_letter_ports() {
        let dir = tempfile::tempdir().unwrap();
        let outputs = planned(&dir, "{path: in.jsonl}").outputs();
        assert_eq!(outputs[0].stream.event_time.as_deref(), Some("ts"));
        assert_eq!(outputs[1].name, "dead_letter");
        assert_eq!(outputs[1].unwired_drop_reason, Some("malformed"));
        assert_eq!(outputs[1].stream.schema, dead_letter_schema());
    }
}
