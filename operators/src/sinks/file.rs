//! The `file` sink: writes one stream to a file as JSON lines or Parquet.
//!
//! JSON lines go through a buffered writer and can append to an existing file; Parquet
//! (Snappy-compressed) writes a row group every [`ROW_GROUP_ROWS`] rows as batches arrive
//! and the footer when the stream ends, so a Parquet file is readable only after a clean
//! close. Encoding and disk writes run on tokio's blocking pool so a slow disk never
//! stalls the runtime's worker threads.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::Deserialize;
use weir_engine::config::ConfigErrors;
use weir_engine::metrics::OperatorMetrics;
use weir_engine::registry::{NodeContext, OperatorFactory, OutputSpec, PlannedOperator, Role};
use weir_engine::{OperatorError, OperatorInstance, Sink};

use crate::format::{TimestampFormat, field_error, node_config, node_error, write_json_lines};

/// The most rows in one Parquet row group; bounds the rows buffered in memory.
pub const ROW_GROUP_ROWS: usize = 128 * 1024;

/// The size of the buffer in front of a JSON lines file.
const JSON_BUFFER_BYTES: usize = 256 * 1024;

/// Builds `file` sinks.
pub struct FileSinkFactory;

/// The `config` of a `file` sink.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileSinkConfig {
    /// The file to write; relative paths are resolved against the pipeline file's
    /// directory. Missing parent directories are created.
    pub path: String,
    /// `json` (JSON lines) or `parquet`.
    pub format: OutputFormat,
    /// JSON only: `rfc3339` strings (the default) or `epoch_ms` integers.
    pub timestamps: Option<TimestampFormat>,
    /// JSON only: add to the end of an existing file instead of replacing it.
    pub append: Option<bool>,
}

/// The encoding of the output file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// One JSON object per row.
    #[default]
    Json,
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
        let config: FileSinkConfig = node_config(node)?;
        let mut errors = ConfigErrors::new();
        if node.inputs.len() != 1 {
            errors.push(
                node_error(
                    node,
                    format!(
                        "the file sink writes one stream but has {} inputs",
                        node.inputs.len()
                    ),
                )
                .with_hint(
                    "use one file sink per input, or merge the streams with a sql transform first",
                ),
            );
        }
        if config.path.trim().is_empty() {
            errors.push(
                field_error(node, &["path"], "the file sink needs a path")
                    .with_hint("add e.g. `path: out/readings.jsonl` under config"),
            );
        }
        if config.format == OutputFormat::Parquet {
            for key in ["timestamps", "append"] {
                if node.config.get(key).is_some() {
                    errors.push(
                        field_error(node, &[key], format!("{key} applies only to format json"))
                            .with_hint(format!("remove `{key}`, or set `format: json`")),
                    );
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Box::new(Plan {
            path: node.base_dir.join(&config.path),
            format: config.format,
            timestamps: config.timestamps.unwrap_or_default(),
            append: config.append.unwrap_or(false),
            schema: node.inputs[0].stream.schema.clone(),
        }))
    }
}

struct Plan {
    path: PathBuf,
    format: OutputFormat,
    timestamps: TimestampFormat,
    append: bool,
    schema: SchemaRef,
}

impl PlannedOperator for Plan {
    fn outputs(&self) -> Vec<OutputSpec> {
        Vec::new()
    }

    fn instantiate(
        self: Box<Self>,
        _metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        let display = self.path.display().to_string();
        let cannot = |doing: &str, e: std::io::Error| {
            OperatorError::io(format!("cannot {doing} {display}"), e)
        };
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| cannot("create the directory of", e))?;
        }
        let file = match (self.format, self.append) {
            (OutputFormat::Json, true) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path),
            _ => File::create(&self.path),
        }
        .map_err(|e| cannot("create", e))?;
        let writer = match self.format {
            OutputFormat::Json => Writer::Json {
                out: BufWriter::with_capacity(JSON_BUFFER_BYTES, file),
                timestamps: self.timestamps,
            },
            OutputFormat::Parquet => {
                let properties = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
                    .build();
                let writer = ArrowWriter::try_new(file, self.schema.clone(), Some(properties))
                    .map_err(|e| {
                        OperatorError::User(format!("cannot write {display} as parquet: {e}"))
                    })?;
                Writer::Parquet(Box::new(writer))
            }
        };
        Ok(OperatorInstance::Sink(Box::new(FileSink {
            display,
            writer: Some(writer),
        })))
    }
}

/// The open output file in its format.
enum Writer {
    Json {
        out: BufWriter<File>,
        timestamps: TimestampFormat,
    },
    Parquet(Box<ArrowWriter<File>>),
}

/// One thing to do with the open file.
enum Step {
    Write(RecordBatch),
    Flush,
    Close,
}

impl Writer {
    /// Performs `step`; blocking. Errors are worded for the file named `display`.
    fn perform(&mut self, step: Step, display: &str) -> Result<(), OperatorError> {
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
            (Writer::Json { out, timestamps }, Step::Write(batch)) => {
                write_json_lines(out, &batch, *timestamps).map_err(|e| match e {
                    arrow::error::ArrowError::IoError(_, source) => io("write", source),
                    other => OperatorError::Arrow(other),
                })
            }
            (Writer::Json { out, .. }, Step::Flush | Step::Close) => {
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

/// The running file sink.
struct FileSink {
    display: String,
    /// `None` while a blocking step holds it, and after close or a failed step.
    writer: Option<Writer>,
}

impl FileSink {
    async fn run(&mut self, step: Step) -> Result<(), OperatorError> {
        let Some(mut writer) = self.writer.take() else {
            return Err(OperatorError::Internal(format!(
                "the file sink for {} was used after it closed or failed",
                self.display
            )));
        };
        let display = self.display.clone();
        let closing = matches!(step, Step::Close);
        let (writer, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = writer.perform(step, &display);
            (writer, outcome)
        })
        .await
        .map_err(|e| OperatorError::Internal(format!("file write task failed: {e}")))?;
        if outcome.is_ok() && !closing {
            self.writer = Some(writer);
        }
        outcome
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&mut self, _input: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        self.run(Step::Write(batch)).await
    }

    async fn flush(&mut self) -> Result<(), OperatorError> {
        self.run(Step::Flush).await
    }

    async fn close(&mut self) -> Result<(), OperatorError> {
        self.run(Step::Close).await
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
            Field::new("device", DataType::Utf8, false),
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
        let decl = Decl {
            inputs: vec![input()],
            base_dir: Some(dir.path()),
            ..Decl::default()
        };
        let planned = plan(&FileSinkFactory, Role::Sink, config, decl).unwrap();
        match planned
            .instantiate(&weir_engine::metrics::OperatorMetrics::detached(
                "test", "node",
            ))
            .unwrap()
        {
            OperatorInstance::Sink(sink) => sink,
            _ => panic!("the file sink builds a sink"),
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
                "timestamps applies only to format json",
                "append applies only to format json",
            ]
        );
        assert_eq!(errors[0].path, "sinks.node");
    }
}
