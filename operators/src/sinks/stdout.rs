//! The `stdout` sink: prints every batch it receives, as a table or as JSON lines.
//!
//! It is the sink of first pipelines and of `weir run … | head`, so output is flushed per
//! batch (it shows up at once), and a closed pipe ends the sink quietly instead of failing
//! the pipeline. Writing happens on tokio's blocking pool because a terminal or a pipe can
//! make stdout block for as long as the reader likes.

use std::io::Write;

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use serde::Deserialize;
use weir_engine::config::ConfigErrors;
use weir_engine::metrics::OperatorMetrics;
use weir_engine::registry::{NodeContext, OperatorFactory, OutputSpec, PlannedOperator, Role};
use weir_engine::{OperatorError, OperatorInstance, Sink};

use crate::format::{TimestampFormat, json_lines, pretty_table};

/// Builds `stdout` sinks.
pub struct StdoutFactory;

/// The `config` of a `stdout` sink.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StdoutConfig {
    /// `table` (a table with a header per batch) or `json` (JSON lines, timestamps as
    /// RFC 3339 strings).
    pub format: StdoutFormat,
}

/// How the `stdout` sink prints batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StdoutFormat {
    /// A text table with a header, one per batch.
    #[default]
    Table,
    /// One JSON object per row.
    Json,
}

impl OperatorFactory for StdoutFactory {
    fn kind(&self) -> &'static str {
        "stdout"
    }

    fn roles(&self) -> &'static [Role] {
        &[Role::Sink]
    }

    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config: StdoutConfig = node.config()?;
        Ok(Box::new(Plan {
            format: config.format,
        }))
    }
}

struct Plan {
    format: StdoutFormat,
}

impl PlannedOperator for Plan {
    fn outputs(&self) -> Vec<OutputSpec> {
        Vec::new()
    }

    fn instantiate(
        self: Box<Self>,
        _metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        Ok(OperatorInstance::Sink(Box::new(StdoutSink::new(
            self.format,
            Box::new(std::io::stdout()),
        ))))
    }
}

/// Prints batches to a writer: stdout in pipelines, a buffer in tests.
struct StdoutSink {
    format: StdoutFormat,
    /// `None` only while a blocking write holds it, or after the reader went away.
    out: Option<Box<dyn Write + Send>>,
}

impl StdoutSink {
    fn new(format: StdoutFormat, out: Box<dyn Write + Send>) -> Self {
        StdoutSink {
            format,
            out: Some(out),
        }
    }

    fn encode(&self, batch: &RecordBatch) -> Result<Vec<u8>, OperatorError> {
        Ok(match self.format {
            StdoutFormat::Table => pretty_table(batch)?.into_bytes(),
            StdoutFormat::Json => json_lines(batch, TimestampFormat::Rfc3339)?,
        })
    }

    /// Writes `bytes` (none: only flushes) on the blocking pool.
    async fn put(&mut self, bytes: Vec<u8>) -> Result<(), OperatorError> {
        let Some(mut out) = self.out.take() else {
            // The reader is gone; an earlier write said so already.
            return Err(OperatorError::DownstreamClosed);
        };
        let (out, written) = tokio::task::spawn_blocking(move || {
            // `Stdout::write_all` holds the stdout lock for the whole batch, so batches
            // from several inputs never interleave.
            let written = out.write_all(&bytes).and_then(|()| out.flush());
            (out, written)
        })
        .await
        .map_err(|e| OperatorError::Internal(format!("stdout write task failed: {e}")))?;
        match written {
            Ok(()) => {
                self.out = Some(out);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                Err(OperatorError::DownstreamClosed)
            }
            Err(e) => Err(OperatorError::io("cannot write to stdout", e)),
        }
    }
}

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&mut self, _input: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        let bytes = self.encode(&batch)?;
        self.put(bytes).await
    }

    async fn flush(&mut self) -> Result<(), OperatorError> {
        self.put(Vec::new()).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::format::test_support::{Decl, plan};

    /// A writer whose bytes the test can read, or one whose reader has gone.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>, bool);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.1 {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn batch() -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new("value", DataType::Float64, false),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from(vec!["a", "b"])),
                Arc::new(Float64Array::from(vec![1.0, 2.5])),
            ],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn prints_json_lines_per_batch_from_every_input() {
        let out = Shared::default();
        let mut sink = StdoutSink::new(StdoutFormat::Json, Box::new(out.clone()));
        sink.write(0, batch()).await.unwrap();
        sink.write(1, batch()).await.unwrap();
        sink.close().await.unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert_eq!(
            text.lines().nth(1),
            Some("{\"device\":\"b\",\"value\":2.5}")
        );
    }

    #[tokio::test]
    async fn prints_a_table_with_a_header() {
        let out = Shared::default();
        let mut sink = StdoutSink::new(StdoutFormat::Table, Box::new(out.clone()));
        sink.write(0, batch()).await.unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("| device | value |"), "{text}");
        assert!(text.contains("| b      | 2.5   |"), "{text}");
    }

    #[tokio::test]
    async fn a_closed_pipe_ends_the_sink_quietly() {
        let out = Shared(Arc::default(), true);
        let mut sink = StdoutSink::new(StdoutFormat::Json, Box::new(out));
        assert!(matches!(
            sink.write(0, batch()).await,
            Err(OperatorError::DownstreamClosed)
        ));
        assert!(matches!(
            sink.close().await,
            Err(OperatorError::DownstreamClosed)
        ));
    }

    #[test]
    fn config_defaults_to_table_and_rejects_unknown_formats() {
        assert!(plan(&StdoutFactory, Role::Sink, "", Decl::default()).is_ok());
        assert!(
            plan(
                &StdoutFactory,
                Role::Sink,
                "{format: json}",
                Decl::default()
            )
            .is_ok()
        );
        assert!(plan(&StdoutFactory, Role::Sink, "{format: xml}", Decl::default()).is_err());
    }
}
