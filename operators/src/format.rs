//! Encoding helpers shared by the built-in sources and sinks: how batches become JSON lines
//! and tables, how timestamps are written, and how a node's `config` becomes a typed struct.
//!
//! The `stdout` and `file` sinks both print JSON lines, and both must write timestamps the
//! same way, so the choices live here once: timestamps are RFC 3339 strings in UTC (a
//! timestamp column without a time zone holds UTC instants in Weir) unless a sink asks for
//! integer epoch milliseconds, and null values are written as explicit `null`s so every
//! line carries every column. CSV output follows the same timestamp conventions; a null
//! is an empty field.

use std::borrow::Cow;
use std::io::Write;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::error::ArrowError;
use arrow::util::display::FormatOptions;
use arrow::util::pretty::pretty_format_batches_with_options;
use arrow_json::writer::{JsonArray, JsonFormat, LineDelimited};
use serde::Deserialize;
use weir_engine::time::event_times_ms;

/// The chrono format of a timestamp without a time zone: UTC, with as many fractional
/// digits as the value needs (none, 3, 6 or 9), e.g. `2026-01-01T00:00:00.250Z`.
const RFC3339_UTC: &str = "%Y-%m-%dT%H:%M:%S%.fZ";

/// The chrono format of a timestamp with a time zone: its offset, e.g. `+02:00`.
const RFC3339_OFFSET: &str = "%Y-%m-%dT%H:%M:%S%.f%:z";

/// How timestamps are written in JSON and CSV output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    /// RFC 3339 strings, e.g. `2026-01-01T00:00:00Z`.
    #[default]
    Rfc3339,
    /// Integer milliseconds since the Unix epoch.
    EpochMs,
}

/// Casts every top-level timestamp column to Int64 milliseconds since the epoch.
///
/// Finer units are floored to the millisecond. Timestamps nested inside structs or lists
/// are left as they are. The returned batch's schema names the same columns, retyped.
pub fn timestamps_to_epoch_ms(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    if !schema
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Timestamp(_, _)))
    {
        return Ok(batch.clone());
    }
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        match field.data_type() {
            DataType::Timestamp(_, _) => {
                let millis = event_times_ms(column).ok_or_else(|| {
                    ArrowError::CastError(format!("column '{}' is not a timestamp", field.name()))
                })?;
                columns.push(Arc::new(millis));
                fields.push(Arc::new(
                    Field::new(field.name(), DataType::Int64, field.is_nullable())
                        .with_metadata(field.metadata().clone()),
                ));
            }
            _ => {
                columns.push(column.clone());
                fields.push(field.clone());
            }
        }
    }
    let schema = Schema::new_with_metadata(fields, schema.metadata().clone());
    RecordBatch::try_new(Arc::new(schema), columns)
}

/// Appends `batch` to `out` as JSON lines: one object per row, every column present
/// (nulls as `null`), timestamps written as `timestamps` says.
pub fn write_json_lines<W: Write>(
    out: &mut W,
    batch: &RecordBatch,
    timestamps: TimestampFormat,
) -> Result<(), ArrowError> {
    write_json::<W, LineDelimited>(out, batch, timestamps)
}

/// `batch` with its timestamps as `timestamps` asks: unchanged for RFC 3339 (the
/// writers format them), as epoch-millisecond integers otherwise.
fn in_timestamp_format(
    batch: &RecordBatch,
    timestamps: TimestampFormat,
) -> Result<Cow<'_, RecordBatch>, ArrowError> {
    Ok(match timestamps {
        TimestampFormat::Rfc3339 => Cow::Borrowed(batch),
        TimestampFormat::EpochMs => Cow::Owned(timestamps_to_epoch_ms(batch)?),
    })
}

/// Writes `batch` to `out` in the JSON layout `F` (lines, or one array), with the
/// conventions of [`write_json_lines`].
fn write_json<W: Write, F: JsonFormat>(
    out: &mut W,
    batch: &RecordBatch,
    timestamps: TimestampFormat,
) -> Result<(), ArrowError> {
    let batch = in_timestamp_format(batch, timestamps)?;
    let mut writer = arrow_json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .with_timestamp_format(RFC3339_UTC.to_owned())
        .with_timestamp_tz_format(RFC3339_OFFSET.to_owned())
        .build::<_, F>(out);
    writer.write(&batch)?;
    writer.finish()
}

/// Appends `batch` to `out` as CSV rows, after a header row naming the columns when
/// `header` is set. Fields are comma-separated and quoted only when they need it, nulls are
/// empty fields, and timestamps are written as in JSON (see [`write_json_lines`]).
pub fn write_csv<W: Write>(
    out: W,
    batch: &RecordBatch,
    header: bool,
    timestamps: TimestampFormat,
) -> Result<(), ArrowError> {
    let batch = in_timestamp_format(batch, timestamps)?;
    let mut writer = arrow_csv::WriterBuilder::new()
        .with_header(header)
        .with_timestamp_format(RFC3339_UTC.to_owned())
        .with_timestamp_tz_format(RFC3339_OFFSET.to_owned())
        .build(out);
    writer.write(&batch)
}

/// `batch` as JSON lines, in a fresh buffer. See [`write_json_lines`].
pub fn json_lines(batch: &RecordBatch, timestamps: TimestampFormat) -> Result<Vec<u8>, ArrowError> {
    // JSON lines of typical sensor rows take about 80 bytes a row.
    let mut out = Vec::with_capacity(batch.num_rows() * 80);
    write_json_lines(&mut out, batch, timestamps)?;
    Ok(out)
}

/// `batch` as one JSON array of objects, with the conventions of [`write_json_lines`].
pub fn json_array(batch: &RecordBatch, timestamps: TimestampFormat) -> Result<Vec<u8>, ArrowError> {
    let mut out = Vec::with_capacity(batch.num_rows() * 80 + 2);
    write_json::<_, JsonArray>(&mut out, batch, timestamps)?;
    Ok(out)
}

/// How values are shown as text (tables, topic names): timestamps in RFC 3339, nulls as
/// `null`.
pub fn display_options() -> FormatOptions<'static> {
    FormatOptions::new()
        .with_null("null")
        .with_timestamp_format(Some(RFC3339_UTC))
        .with_timestamp_tz_format(Some(RFC3339_OFFSET))
}

/// `batch` as a text table with a header, timestamps in RFC 3339 and nulls as `null`,
/// followed by a newline.
pub fn pretty_table(batch: &RecordBatch) -> Result<String, ArrowError> {
    let table =
        pretty_format_batches_with_options(std::slice::from_ref(batch), &display_options())?;
    Ok(format!("{table}\n"))
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers for the operator tests in this crate: configs written as YAML, and a tiny
    //! pipeline that runs a planned source into collecting sinks.

    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use arrow::array::{Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
    use async_trait::async_trait;
    use weir_engine::config::{ConfigErrors, ConfigValue};
    use weir_engine::graph::{InputRef, PipelineBuilder};
    use weir_engine::metrics::EngineMetrics;
    use weir_engine::registry::{
        InputStream, MAIN_PORT_NAME, NodeContext, OperatorFactory, PlannedOperator, Role,
    };
    use weir_engine::time::EventTimeSpec;
    use weir_engine::{OperatorError, OperatorInstance, Sink};

    /// The schema of [`readings`]: `device` (text, nullable), `ts` (ms) and
    /// `temperature`.
    pub(crate) fn readings_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            Field::new("temperature", DataType::Float64, true),
        ]))
    }

    /// One reading per entry of `devices`, a second apart from ts 0, temperatures 20, 21, ...
    pub(crate) fn readings(devices: &[Option<&str>]) -> RecordBatch {
        let n = devices.len();
        RecordBatch::try_new(
            readings_schema(),
            vec![
                Arc::new(StringArray::from(devices.to_vec())),
                Arc::new(TimestampMillisecondArray::from(
                    (0..n as i64).map(|i| 1_000 * i).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    (0..n).map(|i| 20.0 + i as f64).collect::<Vec<_>>(),
                )),
            ],
        )
        .expect("columns match the schema")
    }

    /// A YAML document read into a [`ConfigValue`] by the pipeline loader's own reader.
    pub(crate) fn yaml(text: &str) -> ConfigValue {
        if text.trim().is_empty() {
            return ConfigValue::null();
        }
        weir_pipelines::parse_yaml(text).expect("test YAML parses")
    }

    /// What a node declares besides its `config`.
    #[derive(Default)]
    pub(crate) struct Decl<'a> {
        pub(crate) schema: Option<SchemaRef>,
        pub(crate) event_time: Option<EventTimeSpec>,
        pub(crate) inputs: Vec<InputStream>,
        pub(crate) base_dir: Option<&'a Path>,
        /// An upstream could not be planned, so the inputs' schemas are empty.
        pub(crate) inputs_unknown: bool,
    }

    /// Plans a node of `factory` with the given YAML config.
    pub(crate) fn plan(
        factory: &dyn OperatorFactory,
        role: Role,
        config: &str,
        decl: Decl<'_>,
    ) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config = yaml(config);
        let base_dir = decl.base_dir.unwrap_or(Path::new("."));
        let config_path = format!("{}.node.config", role.section());
        let node = NodeContext {
            pipeline: "test",
            name: "node",
            role,
            config: &config,
            config_path: &config_path,
            inputs: &decl.inputs,
            inputs_known: !decl.inputs_unknown,
            schema: decl.schema,
            event_time: decl.event_time,
            window: None,
            on_error: weir_engine::registry::OnError::Fail,
            base_dir,
            peers: &[],
        };
        factory.plan(&node)
    }

    /// The batches a collecting sink received.
    pub(crate) type Collected = Arc<Mutex<Vec<RecordBatch>>>;

    /// A sink that keeps every batch it receives. In a checkpointed run its state is how
    /// many rows it had at each barrier over all runs, and what it restores is kept in
    /// `restored`.
    pub(crate) struct Collect {
        batches: Collected,
        restored: Arc<Mutex<Option<u64>>>,
    }

    #[async_trait]
    impl Sink for Collect {
        async fn write(&mut self, _input: usize, batch: RecordBatch) -> Result<(), OperatorError> {
            self.batches.lock().expect("collector lock").push(batch);
            Ok(())
        }

        async fn snapshot(
            &mut self,
            _epoch: weir_engine::checkpoint::Epoch,
        ) -> Result<weir_engine::checkpoint::StateChanges, OperatorError> {
            // Counted over runs: what the checkpoint it resumed from had, and this run's.
            let before = self.restored.lock().expect("collector lock").unwrap_or(0);
            let rows: usize = self
                .batches
                .lock()
                .expect("collector lock")
                .iter()
                .map(RecordBatch::num_rows)
                .sum();
            Ok(weir_engine::checkpoint::StateChanges::whole(
                (before + rows as u64).to_le_bytes().to_vec(),
            ))
        }

        fn restore(
            &mut self,
            state: &weir_engine::checkpoint::NodeState,
        ) -> Result<(), OperatorError> {
            let rows = state
                .whole()
                .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                .map(u64::from_le_bytes);
            *self.restored.lock().expect("collector lock") = rows;
            Ok(())
        }
    }

    /// What a source emitted on its main port and on its second port (if it has one).
    #[derive(Clone)]
    pub(crate) struct Outputs {
        pub(crate) main: Collected,
        pub(crate) side: Collected,
        /// In a checkpointed run: how many main rows the checkpoint it resumed from had
        /// received, so the rows after them are this run's.
        pub(crate) restored_main_rows: Arc<Mutex<Option<u64>>>,
    }

    /// Runs a planned source into collecting sinks until it ends or `shutdown` fires.
    pub(crate) async fn run_source(
        planned: Box<dyn PlannedOperator>,
        event_time: Option<EventTimeSpec>,
        shutdown: tokio_util::sync::CancellationToken,
        outputs: &Outputs,
    ) -> Result<(), weir_engine::PipelineError> {
        run_source_with(planned, event_time, shutdown, outputs, None).await
    }

    /// As [`run_source`], checkpointing every `interval` into the state store at `store`
    /// and resuming from the checkpoint it holds.
    pub(crate) async fn run_source_checkpointed(
        planned: Box<dyn PlannedOperator>,
        store: &Path,
        interval: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
        outputs: &Outputs,
    ) -> Result<(), weir_engine::PipelineError> {
        run_source_with(planned, None, shutdown, outputs, Some((store, interval))).await
    }

    async fn run_source_with(
        planned: Box<dyn PlannedOperator>,
        event_time: Option<EventTimeSpec>,
        shutdown: tokio_util::sync::CancellationToken,
        outputs: &Outputs,
        checkpoint: Option<(&Path, std::time::Duration)>,
    ) -> Result<(), weir_engine::PipelineError> {
        let specs = planned.outputs();
        let instance = planned
            .instantiate(&weir_engine::metrics::OperatorMetrics::detached(
                "test", "node",
            ))
            .expect("source instantiates");
        let mut builder = PipelineBuilder::new("test");
        let ports: Vec<String> = specs.iter().map(|spec| spec.name.clone()).collect();
        builder.add_node("src", instance, specs, vec![], event_time);
        let wire = |port: &str| {
            vec![InputRef {
                node: "src".into(),
                port: port.into(),
            }]
        };
        builder.add_node(
            "main",
            OperatorInstance::Sink(Box::new(Collect {
                batches: outputs.main.clone(),
                restored: outputs.restored_main_rows.clone(),
            })),
            vec![],
            wire(MAIN_PORT_NAME),
            None,
        );
        if let Some(side) = ports.get(1) {
            builder.add_node(
                "side",
                OperatorInstance::Sink(Box::new(Collect {
                    batches: outputs.side.clone(),
                    restored: Arc::default(),
                })),
                vec![],
                wire(side),
                None,
            );
        }
        let metrics = EngineMetrics::new(&prometheus::Registry::new()).expect("metrics");
        if let Some((path, interval)) = checkpoint {
            let opened = weir_engine::checkpoint::StateStore::open(path).expect("state store");
            builder.checkpointing(weir_engine::checkpoint::CheckpointSettings {
                store: Arc::new(opened.store),
                interval,
                restored: opened.checkpoint,
                metrics: metrics.checkpoint("test"),
            });
        }
        builder.build(&metrics)?.run(shutdown).await
    }

    impl Outputs {
        pub(crate) fn new() -> Self {
            Outputs {
                main: Collected::default(),
                side: Collected::default(),
                restored_main_rows: Arc::default(),
            }
        }

        /// Rows received on the main port.
        pub(crate) fn main_rows(&self) -> usize {
            self.main.lock().unwrap().iter().map(|b| b.num_rows()).sum()
        }

        /// Everything received on the main port, in one batch.
        pub(crate) fn main_batch(&self) -> RecordBatch {
            concat(&self.main)
        }

        /// Everything received on the second port, in one batch.
        pub(crate) fn side_batch(&self) -> RecordBatch {
            concat(&self.side)
        }
    }

    fn concat(collected: &Collected) -> RecordBatch {
        let batches = collected.lock().unwrap();
        let schema = batches.first().expect("at least one batch").schema();
        arrow::compute::concat_batches(&schema, batches.iter()).expect("same schema")
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{Field, Schema, TimeUnit};

    use super::*;

    fn sample() -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            Field::new("value", DataType::Float64, true),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from(vec![Some("a"), None])),
                Arc::new(TimestampMillisecondArray::from(vec![
                    1_767_225_600_000,
                    1_767_225_600_250,
                ])),
                Arc::new(Float64Array::from(vec![Some(1.5), None])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn json_lines_write_rfc3339_utc_and_explicit_nulls() {
        let text =
            String::from_utf8(json_lines(&sample(), TimestampFormat::Rfc3339).unwrap()).unwrap();
        assert_eq!(
            text,
            "{\"device\":\"a\",\"ts\":\"2026-01-01T00:00:00Z\",\"value\":1.5}\n\
             {\"device\":null,\"ts\":\"2026-01-01T00:00:00.250Z\",\"value\":null}\n"
        );
    }

    #[test]
    fn json_lines_write_epoch_ms_as_integers() {
        let text =
            String::from_utf8(json_lines(&sample(), TimestampFormat::EpochMs).unwrap()).unwrap();
        assert!(
            text.starts_with("{\"device\":\"a\",\"ts\":1767225600000,"),
            "{text}"
        );
    }

    #[test]
    fn epoch_ms_floors_finer_units_and_keeps_time_zones() {
        use arrow::array::TimestampNanosecondArray;
        let ns = TimestampNanosecondArray::from(vec![1_500_999_999, -1]).with_timezone("+02:00");
        let schema = Schema::new(vec![Field::new("t", ns.data_type().clone(), false)]);
        let batch = RecordBatch::try_new(Arc::new(schema), vec![Arc::new(ns)]).unwrap();
        let out = timestamps_to_epoch_ms(&batch).unwrap();
        assert_eq!(out.schema().field(0).data_type(), &DataType::Int64);
        let millis = out.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(millis.values().to_vec(), vec![1_500, -1]);
    }

    #[test]
    fn timestamps_with_a_zone_keep_their_offset() {
        let ts = TimestampMillisecondArray::from(vec![0]).with_timezone("+02:00");
        let schema = Schema::new(vec![Field::new("t", ts.data_type().clone(), false)]);
        let batch = RecordBatch::try_new(Arc::new(schema), vec![Arc::new(ts)]).unwrap();
        let text =
            String::from_utf8(json_lines(&batch, TimestampFormat::Rfc3339).unwrap()).unwrap();
        assert_eq!(text, "{\"t\":\"1970-01-01T02:00:00+02:00\"}\n");
    }

    #[test]
    fn csv_has_an_optional_header_empty_nulls_and_json_timestamps() {
        let mut out = Vec::new();
        write_csv(&mut out, &sample(), true, TimestampFormat::Rfc3339).unwrap();
        write_csv(&mut out, &sample(), false, TimestampFormat::EpochMs).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "device,ts,value\n\
             a,2026-01-01T00:00:00Z,1.5\n\
             ,2026-01-01T00:00:00.250Z,\n\
             a,1767225600000,1.5\n\
             ,1767225600250,\n"
        );
    }

    #[test]
    fn table_has_a_header_and_rfc3339_timestamps() {
        let table = pretty_table(&sample()).unwrap();
        assert!(table.contains("| device | ts"), "{table}");
        assert!(table.contains("2026-01-01T00:00:00.250Z"), "{table}");
        assert!(table.contains("null"), "{table}");
    }
}
