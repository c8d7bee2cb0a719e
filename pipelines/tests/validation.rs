//! Validation of whole pipeline files: one test per class of problem, each asserting the
//! exact message, path, line and column users see, plus building and running a valid
//! pipeline. Fake operator factories stand in for the built-in ones so the tests pin this
//! crate's behaviour; one test runs the real registry to check SQL errors surface.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use weir_engine::arrow::array::{Float64Array, StringArray, TimestampMillisecondArray};
use weir_engine::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use weir_engine::arrow::record_batch::RecordBatch;
use weir_engine::config::{ConfigError, ConfigErrors, Location};
use weir_engine::graph::InputRef;
use weir_engine::metrics::EngineMetrics;
use weir_engine::metrics::OperatorMetrics;
use weir_engine::operator::Collector;
use weir_engine::registry::{
    NodeContext, OperatorFactory, OutputSpec, PlannedOperator, Role, StreamInfo,
};
use weir_engine::time::EventTimeSpec;
use weir_engine::{
    OperatorError, OperatorInstance, Registry, Sink, Source, SourceContext, Transform,
};
use weir_pipelines::{Diagnostic, ValidatedPipeline, load_and_validate, load_str, validate_str};

// ---------------------------------------------------------------------------------------
// Fake operators
// ---------------------------------------------------------------------------------------

/// `gen`: a source of `rows` sensor rows, with a `malformed` side port.
struct GenFactory;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenConfig {
    #[serde(default)]
    rows: u32,
    /// An event-time column the operator names itself.
    #[serde(default)]
    time_column: Option<String>,
}

fn sensor_schema() -> SchemaRef {
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

struct PlannedGen {
    rows: u32,
    schema: SchemaRef,
    time_column: Option<String>,
}

impl OperatorFactory for GenFactory {
    fn kind(&self) -> &'static str {
        "gen"
    }
    fn roles(&self) -> &'static [Role] {
        &[Role::Source]
    }
    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config: GenConfig = node
            .config
            .deserialize_into(node.config_path)
            .map_err(|e| vec![e])?;
        Ok(Box::new(PlannedGen {
            rows: config.rows,
            schema: node.schema.clone().unwrap_or_else(sensor_schema),
            time_column: config.time_column,
        }))
    }
}

impl PlannedOperator for PlannedGen {
    fn outputs(&self) -> Vec<OutputSpec> {
        let malformed = Arc::new(Schema::new(vec![Field::new("line", DataType::Utf8, false)]));
        vec![
            OutputSpec {
                name: "out".into(),
                stream: StreamInfo {
                    schema: self.schema.clone(),
                    event_time: self.time_column.clone(),
                },
                unwired_drop_reason: None,
            },
            OutputSpec {
                name: "malformed".into(),
                stream: StreamInfo {
                    schema: malformed,
                    event_time: None,
                },
                unwired_drop_reason: Some("malformed"),
            },
        ]
    }
    fn instantiate(
        self: Box<Self>,
        _metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        Ok(OperatorInstance::Source(Box::new(GenSource {
            rows: self.rows,
            schema: self.schema,
        })))
    }
}

struct GenSource {
    rows: u32,
    schema: SchemaRef,
}

#[async_trait]
impl Source for GenSource {
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError> {
        let n = self.rows as usize;
        let batch = RecordBatch::try_new(
            self.schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["d"; n])),
                Arc::new(TimestampMillisecondArray::from_iter_values(
                    (0..n as i64).map(|i| i * 1000),
                )),
                Arc::new(Float64Array::from_iter_values((0..n).map(|i| i as f64))),
            ],
        )?;
        ctx.emit(batch).await
    }
}

/// `pass`: a transform that forwards its first input; needs a `query`, and can check the
/// names its inputs arrive under.
struct PassFactory;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PassConfig {
    #[allow(dead_code)]
    query: String,
    #[serde(default)]
    expect_inputs: Option<Vec<String>>,
}

struct PlannedPass {
    stream: StreamInfo,
}

impl OperatorFactory for PassFactory {
    fn kind(&self) -> &'static str {
        "pass"
    }
    fn roles(&self) -> &'static [Role] {
        &[Role::Transform]
    }
    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config: PassConfig = node
            .config
            .deserialize_into(node.config_path)
            .map_err(|e| vec![e])?;
        let names: Vec<String> = node.inputs.iter().map(|i| i.name.clone()).collect();
        if let Some(expected) = config.expect_inputs
            && expected != names
        {
            return Err(vec![ConfigError::new(
                node.config_path,
                node.config.location,
                format!("inputs arrived as {}", names.join(", ")),
            )]);
        }
        Ok(Box::new(PlannedPass {
            stream: node.inputs[0].stream.clone(),
        }))
    }
}

impl PlannedOperator for PlannedPass {
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "out".into(),
                stream: self.stream.clone(),
                unwired_drop_reason: None,
            },
            OutputSpec {
                name: "late".into(),
                stream: self.stream.clone(),
                unwired_drop_reason: Some("late"),
            },
        ]
    }
    fn instantiate(
        self: Box<Self>,
        _metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        Ok(OperatorInstance::Transform(Box::new(Pass)))
    }
}

struct Pass;

#[async_trait]
impl Transform for Pass {
    async fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        out.emit(batch);
        Ok(())
    }
}

/// `print`: a sink that counts the rows it receives.
struct PrintFactory {
    rows: Arc<Mutex<usize>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Format {
    Table,
    Json,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrintConfig {
    #[serde(default)]
    #[allow(dead_code)]
    format: Option<Format>,
}

struct PlannedPrint {
    rows: Arc<Mutex<usize>>,
}

impl OperatorFactory for PrintFactory {
    fn kind(&self) -> &'static str {
        "print"
    }
    fn roles(&self) -> &'static [Role] {
        &[Role::Sink]
    }
    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let _: PrintConfig = node
            .config
            .deserialize_into(node.config_path)
            .map_err(|e| vec![e])?;
        Ok(Box::new(PlannedPrint {
            rows: self.rows.clone(),
        }))
    }
}

impl PlannedOperator for PlannedPrint {
    fn outputs(&self) -> Vec<OutputSpec> {
        Vec::new()
    }
    fn instantiate(
        self: Box<Self>,
        _metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        Ok(OperatorInstance::Sink(Box::new(Print { rows: self.rows })))
    }
}

struct Print {
    rows: Arc<Mutex<usize>>,
}

#[async_trait]
impl Sink for Print {
    async fn write(&mut self, _input: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        *self.rows.lock().unwrap() += batch.num_rows();
        Ok(())
    }
}

/// `save`: a sink whose file is created (relative to the pipeline's directory) when built.
struct SaveFactory;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveConfig {
    path: String,
}

struct PlannedSave {
    path: std::path::PathBuf,
}

impl OperatorFactory for SaveFactory {
    fn kind(&self) -> &'static str {
        "save"
    }
    fn roles(&self) -> &'static [Role] {
        &[Role::Sink]
    }
    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config: SaveConfig = node
            .config
            .deserialize_into(node.config_path)
            .map_err(|e| vec![e])?;
        Ok(Box::new(PlannedSave {
            path: node.base_dir.join(config.path),
        }))
    }
}

impl PlannedOperator for PlannedSave {
    fn outputs(&self) -> Vec<OutputSpec> {
        Vec::new()
    }
    fn instantiate(
        self: Box<Self>,
        _metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        std::fs::File::create(&self.path)
            .map_err(|e| OperatorError::io(format!("cannot create {}", self.path.display()), e))?;
        Ok(OperatorInstance::Sink(Box::new(Print {
            rows: Arc::default(),
        })))
    }
}

fn registry_counting(rows: Arc<Mutex<usize>>) -> Registry {
    let mut registry = Registry::new();
    registry.register(Arc::new(GenFactory));
    registry.register(Arc::new(PassFactory));
    registry.register(Arc::new(PrintFactory { rows }));
    registry.register(Arc::new(SaveFactory));
    registry
}

fn registry() -> Registry {
    registry_counting(Arc::default())
}

fn env(name: &str) -> Option<String> {
    match name {
        "ROWS" => Some("7".into()),
        "BAD_ROWS" => Some("many".into()),
        "QUERY" => Some("SELECT * FROM sensors".into()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

const FILE: &str = "pipes/boiler.yaml";

fn problems(text: &str) -> Vec<Diagnostic> {
    match validate_str(Path::new(FILE), text, &registry(), &env, Path::new("pipes")) {
        Ok(pipeline) => panic!("expected problems, got {pipeline:?}"),
        Err(found) => found,
    }
}

fn valid(text: &str) -> ValidatedPipeline {
    validate_str(Path::new(FILE), text, &registry(), &env, Path::new("pipes"))
        .unwrap_or_else(|found| panic!("expected a valid pipeline, got:\n{}", render(&found)))
}

fn render(found: &[Diagnostic]) -> String {
    found.iter().map(|d| format!("{d}\n")).collect()
}

/// The only problem found.
fn only(text: &str) -> Diagnostic {
    let found = problems(text);
    assert_eq!(
        found.len(),
        1,
        "expected one problem, got:\n{}",
        render(&found)
    );
    found.into_iter().next().unwrap()
}

/// The 1-based line and column of the `nth` (from 0) occurrence of `needle` in `text`.
fn pos_nth(text: &str, needle: &str, nth: usize) -> Location {
    let offset = text
        .match_indices(needle)
        .nth(nth)
        .unwrap_or_else(|| panic!("{needle:?} occurs fewer than {} times", nth + 1))
        .0;
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    Location {
        line: line as u32,
        column: column as u32,
    }
}

/// Where the only occurrence of `needle` is.
fn pos(text: &str, needle: &str) -> Location {
    assert_eq!(text.matches(needle).count(), 1, "{needle:?} is not unique");
    pos_nth(text, needle, 0)
}

fn at(line: u32, column: u32) -> Location {
    Location { line, column }
}

#[track_caller]
fn assert_problem(
    d: &Diagnostic,
    location: Location,
    path: &str,
    message: &str,
    hint: Option<&str>,
) {
    assert_eq!(d.file, Path::new(FILE));
    assert_eq!(
        (
            d.location,
            d.path.as_str(),
            d.message.as_str(),
            d.hint.as_deref()
        ),
        (location, path, message, hint),
        "\n{d}"
    );
}

const PIPELINE: &str = "\
version: 1
name: boiler-room
sources:
  sensors:
    kind: gen
    config: {rows: 3}
    schema: {device: utf8, ts: timestamp_ms, temperature: float64}
    event_time: {column: ts, max_out_of_order: 5s}
transforms:
  per_minute:
    kind: pass
    inputs: [sensors]
    window: {tumbling: 1m}
    config: {query: \"SELECT 1\"}
sinks:
  out: {kind: print, inputs: [per_minute], config: {format: table}}
";

/// PIPELINE with `from` replaced by `to` (which must occur exactly once).
fn with(from: &str, to: &str) -> String {
    assert_eq!(PIPELINE.matches(from).count(), 1, "{from:?} is not unique");
    PIPELINE.replace(from, to)
}

// ---------------------------------------------------------------------------------------
// A valid pipeline
// ---------------------------------------------------------------------------------------

#[test]
fn a_valid_pipeline_plans_every_node_in_order() {
    let pipeline = valid(PIPELINE);
    assert_eq!(pipeline.name(), "boiler-room");
    let nodes: Vec<(&str, Role, &str)> = pipeline
        .nodes()
        .iter()
        .map(|n| (n.name(), n.role(), n.kind()))
        .collect();
    assert_eq!(
        nodes,
        [
            ("sensors", Role::Source, "gen"),
            ("per_minute", Role::Transform, "pass"),
            ("out", Role::Sink, "print"),
        ]
    );
    let sensors = &pipeline.nodes()[0];
    assert_eq!(
        sensors.event_time(),
        Some(&EventTimeSpec {
            column: "ts".into(),
            max_out_of_order: Duration::from_secs(5),
            ..EventTimeSpec::default()
        })
    );
    assert_eq!(
        sensors.outputs()[0].stream.event_time.as_deref(),
        Some("ts")
    );
    assert_eq!(
        pipeline.nodes()[2].inputs(),
        [InputRef {
            node: "per_minute".into(),
            port: "out".into(),
        }]
    );
}

#[test]
fn load_str_returns_the_document_as_declared() {
    let document = load_str(Path::new(FILE), PIPELINE, &env).unwrap();
    assert_eq!(document.name, "boiler-room");
    let transform = document.node("per_minute").unwrap();
    assert_eq!(
        transform.window,
        Some(weir_engine::time::WindowSpec::Tumbling {
            size: Duration::from_secs(60)
        })
    );
    let schema = document.node("sensors").unwrap().schema.clone().unwrap();
    assert_eq!(schema, sensor_schema());
    assert_eq!(transform.kind_location, pos(PIPELINE, "pass"));
}

#[test]
fn a_built_pipeline_runs_end_to_end() {
    let rows = Arc::new(Mutex::new(0));
    let text = with("{rows: 3}", "{rows: \"${ROWS}\"}");
    let pipeline = validate_str(
        Path::new(FILE),
        &text,
        &registry_counting(rows.clone()),
        &env,
        Path::new("."),
    )
    .unwrap();
    let metrics = EngineMetrics::new(&prometheus::Registry::new()).unwrap();
    let runnable = pipeline.build(&metrics).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(runnable.run(tokio_util::sync::CancellationToken::new()))
        .unwrap();
    assert_eq!(
        *rows.lock().unwrap(),
        7,
        "ROWS=7 arrives through the environment"
    );
}

#[test]
fn build_errors_name_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    let text = with(
        "{kind: print, inputs: [per_minute], config: {format: table}}",
        "{kind: save, inputs: [per_minute], config: {path: no/such/dir/out.txt}}",
    );
    std::fs::write(&file, text).unwrap();
    let pipeline = weir_pipelines::validate_file(&file, &registry(), &env).unwrap();
    let metrics = EngineMetrics::new(&prometheus::Registry::new()).unwrap();
    let error = pipeline
        .build(&metrics)
        .err()
        .expect("the sink cannot create its file");
    let expected = format!(
        "sink 'out': cannot create {}: ",
        dir.path().join("no/such/dir/out.txt").display()
    );
    let message = error.to_string();
    assert!(message.starts_with(&expected), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");
}

// ---------------------------------------------------------------------------------------
// One test per class of problem
// ---------------------------------------------------------------------------------------

#[test]
fn yaml_syntax_error_reports_the_parser_position() {
    let text = "version: 1\nname: p\nsources:\n  s: {kind: gen\n";
    let d = only(text);
    assert_problem(
        &d,
        at(4, 6),
        "",
        "unclosed bracket '{'",
        Some("fix the YAML syntax at this place"),
    );
    assert_eq!(
        d.to_string(),
        "pipes/boiler.yaml:4:6: unclosed bracket '{'\n  hint: fix the YAML syntax at this place"
    );
}

#[test]
fn unknown_field_suggests_the_nearest_name() {
    let text = with("    window: {tumbling: 1m}", "    windw: {tumbling: 1m}");
    let d = only(&text);
    assert_problem(
        &d,
        pos(&text, "windw"),
        "transforms.per_minute.windw",
        "unknown field 'windw'",
        Some(
            "did you mean 'window'? valid fields: kind, inputs, window, schema, config, retain, on_error, parallelism, partition_by",
        ),
    );
    assert_eq!(
        d.to_string(),
        "pipes/boiler.yaml:13:5: transforms.per_minute.windw: unknown field 'windw'\n  \
         hint: did you mean 'window'? valid fields: kind, inputs, window, schema, config, retain, on_error, \
         parallelism, partition_by"
    );

    // Inside an operator's config the factory reports it, through the same deserializer.
    let text = with("{query: \"SELECT 1\"}", "{qurey: \"SELECT 1\"}");
    assert_problem(
        &only(&text),
        pos(&text, "qurey"),
        "transforms.per_minute.config.qurey",
        "unknown field 'qurey'",
        Some("did you mean 'query'? valid fields: query, expect_inputs"),
    );

    // At the top level too.
    let text = format!("{PIPELINE}sink: {{}}\n");
    assert_problem(
        &only(&text),
        at(17, 1),
        "sink",
        "unknown field 'sink'",
        Some(
            "did you mean 'sinks'? valid fields: version, name, checkpoint, sources, transforms, sinks",
        ),
    );
}

#[test]
fn unknown_kind_lists_the_kinds_of_its_section() {
    let text = with("kind: gen", "kind: gne");
    assert_problem(
        &only(&text),
        pos(&text, "gne"),
        "sources.sensors.kind",
        "unknown source kind 'gne'",
        Some("did you mean 'gen'? valid source kinds: gen"),
    );

    let text = with("{kind: print,", "{kind: pass,");
    assert_problem(
        &only(&text),
        pos_nth(&text, "pass", 1),
        "sinks.out.kind",
        "'pass' is not a sink kind",
        Some("'pass' is a transform kind; valid sink kinds: print, save"),
    );
}

#[test]
fn a_kind_this_build_left_out_names_the_feature_that_brings_it_in() {
    let mut slim = registry();
    slim.leave_out(Role::Source, "mqtt", "mqtt");
    let problems_in_slim =
        |text: &str| match validate_str(Path::new(FILE), text, &slim, &env, Path::new("pipes")) {
            Ok(pipeline) => panic!("expected problems, got {pipeline:?}"),
            Err(found) => found,
        };
    let text = with("kind: gen", "kind: mqtt");
    let found = problems_in_slim(&text);
    assert_eq!(found.len(), 1, "{}", render(&found));
    assert_problem(
        &found[0],
        pos(&text, "mqtt"),
        "sources.sensors.kind",
        "this build of weir has no 'mqtt' source: it was built without the `mqtt` feature",
        Some("the default build has it; or build with `--features mqtt`"),
    );
    // Left out as a source only: as a sink it is an unknown kind, as before.
    let text = with("{kind: print,", "{kind: mqtt,");
    let found = problems_in_slim(&text);
    assert!(
        found[0].message.starts_with("unknown sink kind 'mqtt'"),
        "{}",
        render(&found)
    );
}

#[test]
fn unknown_input_names_the_nodes_that_can_be_read() {
    let text = with("inputs: [sensors]", "inputs: [sensor]");
    assert_problem(
        &only(&text),
        pos(&text, "sensor]"),
        "transforms.per_minute.inputs[0]",
        "unknown input 'sensor'",
        Some("did you mean 'sensors'? nodes that can be read: sensors, per_minute"),
    );

    let text = with("inputs: [sensors]", "inputs: [sensors, out]");
    assert_problem(
        &only(&text),
        pos(&text, "out]"),
        "transforms.per_minute.inputs[1]",
        "'out' is a sink and has no output to read",
        Some("read from a source or transform: sensors, per_minute"),
    );
}

#[test]
fn unknown_port_lists_the_ports_of_the_node() {
    let text = with("inputs: [sensors]", "inputs: [sensors.malformd]");
    assert_problem(
        &only(&text),
        pos(&text, "sensors.malformd"),
        "transforms.per_minute.inputs[0]",
        "'sensors' has no port 'malformd'",
        Some("did you mean 'malformed'? ports of 'sensors': out, malformed"),
    );
}

#[test]
fn side_ports_arrive_as_node_port() {
    let text = with(
        "    inputs: [sensors]\n    window: {tumbling: 1m}\n    config: {query: \"SELECT 1\"}",
        "    inputs: [sensors, sensors.malformed]\n    \
         config: {query: q, expect_inputs: [sensors, sensors_malformed]}",
    );
    let pipeline = valid(&text);
    assert_eq!(
        pipeline.nodes()[1].inputs(),
        [
            InputRef {
                node: "sensors".into(),
                port: "out".into()
            },
            InputRef {
                node: "sensors".into(),
                port: "malformed".into()
            },
        ]
    );
}

#[test]
fn cycles_are_reported_once_with_their_nodes() {
    let text = "\
version: 1
name: loop
sources:
  sensors: {kind: gen}
transforms:
  a: {kind: pass, inputs: [sensors, c], config: {query: q}}
  b: {kind: pass, inputs: [a], config: {query: q}}
  c: {kind: pass, inputs: [b], config: {query: q}}
  d: {kind: pass, inputs: [d], config: {query: q}}
sinks:
  out: {kind: print, inputs: [c, d]}
";
    let found = problems(text);
    assert_eq!(found.len(), 2, "{}", render(&found));
    assert_problem(
        &found[0],
        at(6, 37),
        "transforms.a.inputs[1]",
        "inputs form a cycle: a -> b -> c -> a",
        Some("a pipeline's data must flow one way: remove one of these inputs"),
    );
    assert_problem(
        &found[1],
        at(9, 28),
        "transforms.d.inputs[0]",
        "inputs form a cycle: d -> d",
        Some("a pipeline's data must flow one way: remove one of these inputs"),
    );
}

#[test]
fn wrong_value_types_say_what_was_expected() {
    // An environment value arrives as a string and is parsed when it is a number...
    valid(&with("{rows: 3}", "{rows: \"${ROWS}\"}"));
    // ...and reported where it was written when it is not.
    let text = with("{rows: 3}", "{rows: \"${BAD_ROWS}\"}");
    assert_problem(
        &only(&text),
        pos(&text, "\"${BAD_ROWS}\""),
        "sources.sensors.config.rows",
        "expected an integer, found a string \"many\"",
        None,
    );

    let text = with("inputs: [sensors]", "inputs: sensors");
    assert_problem(
        &only(&text),
        pos_nth(&text, "sensors", 1),
        "transforms.per_minute.inputs",
        "expected a list of node names, found a string \"sensors\"",
        Some("write it as a list, e.g. inputs: [sensors]"),
    );

    let text = with("format: table", "format: [table]");
    assert_problem(
        &only(&text),
        pos(&text, "[table]"),
        "sinks.out.config.format",
        "expected one of table, json, found a list",
        None,
    );
}

#[test]
fn bad_schema_type_lists_the_valid_types() {
    let text = with("temperature: float64", "temperature: flaot64");
    assert_problem(
        &only(&text),
        pos(&text, "flaot64"),
        "sources.sensors.schema.temperature",
        "unknown type 'flaot64'",
        Some(
            "did you mean 'float64'? valid types: bool, int8, int16, int32, int64, uint8, \
             uint16, uint32, uint64, float32, float64, utf8, string, large_utf8, binary, \
             date32, timestamp_s, timestamp_ms, timestamp_us, timestamp_ns; add '?' to make a \
             column nullable",
        ),
    );
    // Nullable columns are declared with a trailing '?'.
    let text = with("temperature: float64", "temperature: \"float64?\"");
    let document = load_str(Path::new(FILE), &text, &env).unwrap();
    let schema = document.node("sensors").unwrap().schema.clone().unwrap();
    assert!(schema.field_with_name("temperature").unwrap().is_nullable());
    assert!(!schema.field_with_name("ts").unwrap().is_nullable());
}

#[test]
fn event_time_problems_point_at_the_column() {
    let text = with("{column: ts,", "{column: time,");
    assert_problem(
        &only(&text),
        pos(&text, "time,"),
        "sources.sensors.event_time.column",
        "event-time column 'time' is not in the schema",
        Some("columns: device, ts, temperature"),
    );

    let text = with("{column: ts,", "{column: device,");
    assert_problem(
        &only(&text),
        pos(&text, "device,"),
        "sources.sensors.event_time.column",
        "event-time column 'device' is utf8, not a timestamp",
        Some(
            "declare it as timestamp_ms (or timestamp_s, timestamp_us, timestamp_ns) in the \
             schema",
        ),
    );

    // Without a declared schema the column is checked against what the operator produces.
    let text = with(
        "    schema: {device: utf8, ts: timestamp_ms, temperature: float64}\n",
        "",
    )
    .replace("{column: ts,", "{column: tss,");
    assert_problem(
        &only(&text),
        pos(&text, "tss"),
        "sources.sensors.event_time.column",
        "event-time column 'tss' is not in the output of 'sensors'",
        Some("did you mean 'ts'? columns: device, ts, temperature"),
    );

    let text = with(
        "{column: ts, max_out_of_order: 5s}",
        "{max_out_of_order: 5s}",
    );
    assert_problem(
        &only(&text),
        pos(&text, "{max_out_of_order"),
        "sources.sensors.event_time",
        "missing field 'column'",
        None,
    );

    let text = with("max_out_of_order: 5s", "max_out_of_order: 5 parsecs");
    let d = only(&text);
    assert_eq!(
        (d.location, d.path.as_str()),
        (
            pos(&text, "5 parsecs"),
            "sources.sensors.event_time.max_out_of_order"
        )
    );
    assert!(d.message.starts_with("invalid duration '5 parsecs'"), "{d}");
}

#[test]
fn an_operator_named_event_time_column_is_kept() {
    let text = with(
        "    config: {rows: 3}\n    schema: {device: utf8, ts: timestamp_ms, temperature: float64}\n    event_time: {column: ts, max_out_of_order: 5s}\n",
        "    config: {time_column: ts}\n",
    );
    let pipeline = valid(&text);
    assert_eq!(
        pipeline.nodes()[0].event_time(),
        Some(&EventTimeSpec {
            column: "ts".into(),
            max_out_of_order: Duration::ZERO,
            ..EventTimeSpec::default()
        })
    );
    // Downstream sees it too.
    assert_eq!(
        pipeline.nodes()[1].outputs()[0]
            .stream
            .event_time
            .as_deref(),
        Some("ts")
    );
}

#[test]
fn misplaced_fields_and_bad_windows_are_reported() {
    let text = with(
        "    event_time: {column: ts, max_out_of_order: 5s}\n",
        "    event_time: {column: ts, max_out_of_order: 5s}\n    window: {tumbling: 1m}\n",
    );
    assert_problem(
        &only(&text),
        pos_nth(&text, "window", 0),
        "sources.sensors.window",
        "a source takes no 'window'",
        Some("windows belong on the transform that aggregates"),
    );

    let text = with("{tumbling: 1m}", "{hopping: {size: 1m, slide: 7s}}");
    assert_problem(
        &only(&text),
        pos(&text, "7s"),
        "transforms.per_minute.window.hopping.slide",
        "the window size 1m is not a multiple of the slide 7s",
        Some("pick a slide that divides the size evenly, e.g. size 1m with slide 10s"),
    );

    // Only a module transform declares its output schema; others derive theirs.
    let text = with(
        "    window: {tumbling: 1m}\n",
        "    window: {tumbling: 1m}\n    schema: {device: utf8}\n",
    );
    assert_problem(
        &only(&text),
        pos(&text, "schema: {device: utf8}"),
        "transforms.per_minute.schema",
        "a 'pass' transform takes no 'schema'",
        Some(
            "only sources and `module` transforms declare a schema; other nodes derive theirs \
             from their inputs",
        ),
    );

    let text = with("{tumbling: 1m}", "{tumbeling: 1m}");
    assert_problem(
        &only(&text),
        pos(&text, "tumbeling"),
        "transforms.per_minute.window.tumbeling",
        "unknown value 'tumbeling'",
        Some("did you mean 'tumbling'? valid values: tumbling, hopping"),
    );
}

#[test]
fn missing_env_var_is_reported_where_it_is_used() {
    let text = with("{query: \"SELECT 1\"}", "{query: \"${SQL_QUERY}\"}");
    assert_problem(
        &only(&text),
        pos(&text, "\"${SQL_QUERY}\""),
        "transforms.per_minute.config.query",
        "environment variable 'SQL_QUERY' is not set",
        Some("set SQL_QUERY or write ${SQL_QUERY:-default}"),
    );
}

#[test]
fn env_defaults_and_escapes_apply() {
    let text = with("kind: gen", "kind: ${SOURCE_KIND:-gen}")
        .replace("\"SELECT 1\"", "\"${QUERY} -- costs $$5\"");
    let document = load_str(Path::new(FILE), &text, &env).unwrap();
    assert_eq!(document.node("sensors").unwrap().kind, "gen");
    let query = document
        .node("per_minute")
        .unwrap()
        .config
        .get("query")
        .unwrap();
    assert_eq!(query.as_str(), Some("SELECT * FROM sensors -- costs $5"));
    valid(&text);
}

#[test]
fn duplicate_node_names_are_rejected() {
    let text = format!("{PIPELINE}  sensors: {{kind: print, inputs: [per_minute]}}\n");
    assert_problem(
        &only(&text),
        at(17, 3),
        "sinks.sensors",
        "node name 'sensors' is already used",
        Some(
            "the source at 4:3 has this name; names must be unique across sources, transforms \
             and sinks",
        ),
    );
}

#[test]
fn duplicate_pipeline_names_across_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), PIPELINE).unwrap();
    std::fs::write(dir.path().join("b.yml"), PIPELINE).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a pipeline").unwrap();
    let (pipelines, found) = load_and_validate([dir.path()], &registry(), &env);
    assert_eq!(pipelines.len(), 1);
    assert_eq!(pipelines[0].file(), dir.path().join("a.yaml"));
    assert_eq!(found.len(), 1, "{}", render(&found));
    assert_eq!(found[0].file, dir.path().join("b.yml"));
    assert_eq!(
        (found[0].location, found[0].path.as_str()),
        (at(2, 7), "name")
    );
    assert_eq!(
        found[0].message,
        format!(
            "pipeline name 'boiler-room' is already used by {}:2:7",
            dir.path().join("a.yaml").display()
        )
    );
}

#[test]
fn only_version_1_is_read() {
    let text = with("version: 1", "version: 2");
    assert_problem(
        &only(&text),
        at(1, 10),
        "version",
        "unsupported version 2",
        Some("this weir reads pipeline version 1"),
    );
    let text = with("version: 1\n", "");
    assert_problem(
        &only(&text),
        at(1, 1),
        "",
        "missing field 'version'",
        Some("add 'version: 1' at the top of the file"),
    );
}

#[test]
fn names_are_checked() {
    let text = with("name: boiler-room", "name: Boiler Room");
    assert_problem(
        &only(&text),
        at(2, 7),
        "name",
        "invalid pipeline name 'Boiler Room'",
        Some("use lower-case letters, digits, '-' and '_', e.g. boiler-room"),
    );
    let text = with("  out: {", "  2out: {");
    assert_problem(
        &only(&text),
        pos(&text, "2out"),
        "sinks.2out",
        "invalid node name '2out'",
        Some(
            "node names become SQL table names: use letters, digits and '_', and do not start \
             with a digit",
        ),
    );
}

#[test]
fn a_pipeline_needs_a_source_and_a_sink() {
    let text = "version: 1\nname: empty\nsources: {}\n";
    let found = problems(text);
    assert_eq!(found.len(), 2, "{}", render(&found));
    assert_problem(
        &found[0],
        at(1, 1),
        "sinks",
        "the pipeline has no sinks",
        Some("declare at least one node under 'sinks'"),
    );
    assert_problem(
        &found[1],
        at(3, 1),
        "sources",
        "the pipeline has no sources",
        Some("declare at least one node under 'sources'"),
    );
}

#[test]
fn problems_upstream_do_not_cascade() {
    // The source's kind is wrong, so the schemas downstream are unknown. The transform's
    // own mistake (its config lacks the query) is still reported, but nothing that would
    // only follow from the unknown schemas: two problems, and none about the sink.
    let text = with("kind: gen", "kind: nope").replace("{query: \"SELECT 1\"}", "{}");
    let found = problems(&text);
    assert_eq!(found.len(), 2, "{}", render(&found));
    assert_problem(
        &found[0],
        pos(&text, "nope"),
        "sources.sensors.kind",
        "unknown source kind 'nope'",
        Some("valid source kinds: gen"),
    );
    assert_eq!(found[1].path, "transforms.per_minute.config");
    assert_eq!(found[1].message, "missing field 'query'");
}

#[test]
fn every_problem_in_a_file_is_reported_in_one_run() {
    let text = "\
version: 1
name: many
colour: blue
sources:
  sensors:
    kind: gen
    schema: {device: utf8, ts: timestmp_ms}
    window: {tumbling: 1m}
  other-source:
    kind: gen
transforms:
  per_minute:
    kind: sqll
    inputs: [sensor]
    window: {hopping: {size: 1m, slide: 7s}}
  enrich:
    kind: pass
    inputs: [other_sauce]
    config: {query: \"${ENRICH_QUERY}\"}
sinks:
  out: {kind: print, inputs: [per_minute, enrich], config: {format: table}, batch: 5}
";
    assert_eq!(pos(text, "batch"), at(21, 77));
    let found = problems(text);
    let got: Vec<(u32, u32, &str)> = found
        .iter()
        .map(|d| (d.location.line, d.location.column, d.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (3, 1, "unknown field 'colour'"),
            (7, 32, "unknown type 'timestmp_ms'"),
            (8, 5, "a source takes no 'window'"),
            (9, 3, "invalid node name 'other-source'"),
            (13, 11, "unknown transform kind 'sqll'"),
            (14, 14, "unknown input 'sensor'"),
            (
                15,
                41,
                "the window size 1m is not a multiple of the slide 7s"
            ),
            (18, 14, "unknown input 'other_sauce'"),
            (19, 21, "environment variable 'ENRICH_QUERY' is not set"),
            (21, 77, "unknown field 'batch'"),
        ],
        "\n{}",
        render(&found)
    );
}

// ---------------------------------------------------------------------------------------
// The real registry
// ---------------------------------------------------------------------------------------

#[test]
fn sql_naming_a_missing_column_is_reported_with_the_transform() {
    let text = "\
version: 1
name: sql-check
sources:
  sensors:
    kind: generator
    config: {count: 10, realtime: false}
transforms:
  hot:
    kind: sql
    inputs: [sensors]
    config: {query: \"SELECT nosuch FROM sensors\"}
sinks:
  out: {kind: stdout, inputs: [hot]}
";
    let registry = weir_operators::registry::builtin();
    let found = validate_str(Path::new(FILE), text, &registry, &env, Path::new("."))
        .expect_err("the query names a missing column");
    assert_eq!(found.len(), 1, "{}", render(&found));
    let d = &found[0];
    assert_eq!(d.path, "transforms.hot.config.query", "{d}");
    // The operator points at the query's value.
    assert_eq!(d.location, at(11, 21), "{d}");
    assert!(
        d.message.contains("nosuch") && d.message.contains("hot"),
        "{d}"
    );
}

// ---------------------------------------------------------------------------------------
// Retained streams
// ---------------------------------------------------------------------------------------

#[test]
fn retain_takes_a_duration_and_a_size_each_with_a_default() {
    use weir_engine::observe::RetainSpec;
    let pipeline = valid(&with(
        "    event_time: {column: ts, max_out_of_order: 5s}\n",
        "    event_time: {column: ts, max_out_of_order: 5s}\n    retain: {duration: 5m, max_bytes: 8MiB}\n",
    ));
    assert_eq!(
        pipeline.nodes()[0].retain(),
        Some(RetainSpec {
            duration: Duration::from_secs(300),
            max_bytes: 8 * 1024 * 1024,
        })
    );
    assert_eq!(pipeline.nodes()[1].retain(), None);
    let defaults = valid(&with(
        "    window: {tumbling: 1m}\n",
        "    window: {tumbling: 1m}\n    retain: {}\n",
    ));
    assert_eq!(defaults.nodes()[1].retain(), Some(RetainSpec::default()));
    assert_eq!(
        RetainSpec::default(),
        RetainSpec {
            duration: Duration::from_secs(15 * 60),
            max_bytes: 64 * 1024 * 1024,
        }
    );
}

#[test]
fn bad_retention_bounds_are_named_where_they_are_written() {
    let text = with(
        "    event_time: {column: ts, max_out_of_order: 5s}\n",
        "    event_time: {column: ts, max_out_of_order: 5s}\n    retain: {duration: 0s, max_bytes: lots}\n",
    );
    let found = problems(&text);
    assert_eq!(found.len(), 1, "{}", render(&found));
    assert!(
        found[0].message.contains("invalid size 'lots'"),
        "{}",
        found[0]
    );
    assert!(
        found[0].path.starts_with("sources.sensors.retain"),
        "{}",
        found[0]
    );

    let text = with(
        "    event_time: {column: ts, max_out_of_order: 5s}\n",
        "    event_time: {column: ts, max_out_of_order: 5s}\n    retain: {duration: 0s}\n",
    );
    assert_problem(
        &only(&text),
        pos(&text, "0s}"),
        "sources.sensors.retain.duration",
        "a retained stream must keep its batches for longer than zero",
        Some("e.g. duration: 15m; remove `retain` to keep nothing"),
    );

    let text = with(
        "    event_time: {column: ts, max_out_of_order: 5s}\n",
        "    event_time: {column: ts, max_out_of_order: 5s}\n    retain: {keep: 5m}\n",
    );
    assert_problem(
        &only(&text),
        pos(&text, "keep"),
        "sources.sensors.retain.keep",
        "unknown field 'keep'",
        Some("valid fields: duration, max_bytes"),
    );
}

#[test]
fn a_sink_cannot_be_retained() {
    let text = with(
        "  out: {kind: print, inputs: [per_minute], config: {format: table}}",
        "  out: {kind: print, inputs: [per_minute], config: {format: table}, retain: {}}",
    );
    assert_problem(
        &only(&text),
        pos(&text, "retain"),
        "sinks.out.retain",
        "a sink takes no 'retain'",
        Some("a sink emits no stream to keep; retain the node it reads from"),
    );
}

#[test]
fn event_time_takes_max_future_and_idle_timeout() {
    let pipeline = valid(&with(
        "max_out_of_order: 5s}",
        "max_out_of_order: 5s, max_future: 1h, idle_timeout: 30s}",
    ));
    assert_eq!(
        pipeline.nodes()[0].event_time(),
        Some(&EventTimeSpec {
            column: "ts".into(),
            max_out_of_order: Duration::from_secs(5),
            max_future: Some(Duration::from_secs(3600)),
            idle_timeout: Some(Duration::from_secs(30)),
        })
    );
}

#[test]
fn flush_interval_belongs_to_sinks_and_is_more_than_zero() {
    valid(&with(
        "config: {format: table}}",
        "config: {format: table}, flush_interval: 250ms}",
    ));
    let text = with(
        "config: {format: table}}",
        "config: {format: table}, flush_interval: 0s}",
    );
    let found = only(&text);
    assert_eq!(found.path, "sinks.out.flush_interval");
    assert_eq!(
        found.message,
        "a sink's flush_interval must be longer than zero"
    );
    let text = with(
        "    inputs: [sensors]\n",
        "    inputs: [sensors]\n    flush_interval: 1s\n",
    );
    let found = only(&text);
    assert_eq!(found.message, "a transform takes no 'flush_interval'");
}

#[test]
fn on_error_is_fail_or_dead_letter_and_needs_a_dead_letter_port() {
    valid(&with(
        "    inputs: [sensors]\n",
        "    inputs: [sensors]\n    on_error: fail\n",
    ));
    let text = with(
        "    inputs: [sensors]\n",
        "    inputs: [sensors]\n    on_error: skip\n",
    );
    let found = only(&text);
    assert_eq!(found.path, "transforms.per_minute.on_error");
    assert_eq!(found.message, "unknown on_error 'skip'");
    // The fake `pass` kind declares no dead_letter port, so it cannot honour it.
    let text = with(
        "    inputs: [sensors]\n",
        "    inputs: [sensors]\n    on_error: dead_letter\n",
    );
    let found = only(&text);
    assert_eq!(
        found.message,
        "transform kind 'pass' cannot send failing rows to a dead_letter port"
    );
}

// ---------------------------------------------------------------------------------------
// Parallel instances
// ---------------------------------------------------------------------------------------

/// A pipeline of built-in operators whose transform `t` is `transform` (indented under it).
fn builtin_pipeline(transform: &str) -> String {
    format!(
        "\
version: 1
name: parallel
sources:
  sensors:
    kind: file
    schema: {{device: utf8, site: utf8, ts: timestamp_ms, temperature: float64}}
    event_time: {{column: ts}}
    config: {{path: readings.jsonl, format: json}}
transforms:
  t:
{transform}
sinks:
  out: {{kind: blackhole, inputs: [t]}}
"
    )
}

fn validate_builtin(text: &str) -> Result<ValidatedPipeline, Vec<Diagnostic>> {
    let registry = weir_operators::registry::builtin();
    validate_str(Path::new(FILE), text, &registry, &env, Path::new("."))
}

/// The only problem `text` has, with the built-in operators.
fn only_builtin(text: &str) -> Diagnostic {
    let found = validate_builtin(text).expect_err("the pipeline has a problem");
    assert_eq!(found.len(), 1, "{}", render(&found));
    found.into_iter().next().unwrap()
}

const GROUPED: &str = "    kind: sql
    inputs: [sensors]
    window: {tumbling: 10s}
    config: {query: \"SELECT device, avg(temperature) AS t FROM sensors GROUP BY device\"}";

#[test]
fn a_windowed_query_runs_in_parallel_by_its_group_columns() {
    let text = builtin_pipeline(&format!("{GROUPED}\n    parallelism: 3"));
    let pipeline = validate_builtin(&text).unwrap_or_else(|found| panic!("{}", render(&found)));
    let node = pipeline.node("t").expect("the transform");
    assert_eq!(node.parallelism(), 3);
    assert_eq!(node.partition_keys(), ["device"]);
    assert!(
        node.notes()
            .iter()
            .any(|note| note.contains("3 instances") && note.contains("device")),
        "{:?}",
        node.notes()
    );
    // Without `parallelism` it runs once, whatever it could do.
    let single = validate_builtin(&builtin_pipeline(GROUPED)).unwrap();
    assert_eq!(single.node("t").unwrap().parallelism(), 1);
    assert!(single.node("t").unwrap().partition_keys().is_empty());
    // `auto` is one per core here, outside a runtime.
    let auto = validate_builtin(&builtin_pipeline(&format!(
        "{GROUPED}\n    parallelism: auto"
    )))
    .unwrap();
    assert_eq!(
        auto.node("t").unwrap().parallelism(),
        std::thread::available_parallelism().map_or(1, usize::from)
    );
}

#[test]
fn partition_keys_must_keep_each_group_in_one_instance() {
    let text = builtin_pipeline(&format!(
        "{GROUPED}\n    parallelism: 2\n    partition_by: [site]"
    ));
    let d = only_builtin(&text);
    assert_eq!(d.path, "transforms.t.partition_by", "{d}");
    assert_eq!(d.location, pos(&text, "[site]"), "{d}");
    assert_eq!(
        d.message,
        "transform 't' keeps its state per device, so rows cannot be routed by site: one \
         group's rows would be split over instances"
    );
    assert_eq!(
        d.hint.as_deref(),
        Some("partition by some of device, or leave partition_by out to use all of them")
    );
}

#[test]
fn a_transform_whose_state_spans_keys_cannot_run_in_parallel() {
    for (transform, why) in [
        (
            "    kind: sql\n    inputs: [sensors]\n    window: {tumbling: 10s}\n    config: \
             {query: \"SELECT device, avg(temperature) AS a FROM sensors GROUP BY device ORDER \
             BY a LIMIT 1\"}",
            "LIMIT",
        ),
        (
            "    kind: sql\n    inputs: [sensors]\n    window: {tumbling: 10s}\n    config: \
             {query: \"SELECT count(*) AS n FROM sensors\"}",
            "aggregates the whole window",
        ),
        (
            "    kind: anomaly\n    inputs: [sensors]\n    config: {value: temperature, \
             detector: zscore}",
            "one series",
        ),
    ] {
        let text = builtin_pipeline(&format!("{transform}\n    parallelism: 2"));
        let d = only_builtin(&text);
        assert_eq!(d.path, "transforms.t.parallelism", "{d}");
        assert_eq!(d.location, pos(&text, "2\n"), "{d}");
        assert!(
            d.message.contains("cannot run as parallel instances") && d.message.contains(why),
            "{d}"
        );
    }
    // An anomaly detector with a series key runs per key.
    let keyed = validate_builtin(&builtin_pipeline(
        "    kind: anomaly\n    inputs: [sensors]\n    config: {value: temperature, key: device, \
         detector: zscore}\n    parallelism: 2",
    ))
    .unwrap_or_else(|found| panic!("{}", render(&found)));
    assert_eq!(keyed.node("t").unwrap().partition_keys(), ["device"]);
}

#[test]
fn a_stateless_transform_in_parallel_names_its_partition_columns() {
    let stateless = "    kind: sql\n    inputs: [sensors]\n    config: {query: \"SELECT device, \
                     temperature FROM sensors WHERE temperature > 0.5\"}\n    parallelism: 2";
    let d = only_builtin(&builtin_pipeline(stateless));
    assert_eq!(d.path, "transforms.t.parallelism", "{d}");
    assert!(d.message.contains("needs partition_by"), "{d}");
    let text = builtin_pipeline(&format!("{stateless}\n    partition_by: [nosuch]"));
    let d = only_builtin(&text);
    assert_eq!(d.path, "transforms.t.partition_by", "{d}");
    assert!(
        d.message.contains("'nosuch' is not a column of 'sensors'"),
        "{d}"
    );
    let routed = validate_builtin(&builtin_pipeline(&format!(
        "{stateless}\n    partition_by: [site, device]"
    )))
    .unwrap_or_else(|found| panic!("{}", render(&found)));
    assert_eq!(
        routed.node("t").unwrap().partition_keys(),
        ["site", "device"]
    );
}

#[test]
fn parallelism_is_a_count_or_auto_and_belongs_to_transforms() {
    for (written, message) in [
        ("0", "parallelism must be at least 1"),
        ("many", "expected a number of instances or 'auto', found"),
    ] {
        let text = builtin_pipeline(&format!("{GROUPED}\n    parallelism: {written}"));
        let d = only_builtin(&text);
        assert_eq!(d.path, "transforms.t.parallelism", "{d}");
        assert!(d.message.starts_with(message), "{d}");
        assert_eq!(
            d.hint.as_deref(),
            Some(
                "write a number of instances, e.g. parallelism: 2, or parallelism: auto for one per core"
            )
        );
    }
    let d = only_builtin(&builtin_pipeline(GROUPED).replace(
        "out: {kind: blackhole, inputs: [t]}",
        "out: {kind: blackhole, inputs: [t], parallelism: 2}",
    ));
    assert_eq!(d.path, "sinks.out.parallelism", "{d}");
    assert_eq!(d.message, "a sink takes no 'parallelism'");
    let d = only_builtin(&builtin_pipeline(&format!(
        "{GROUPED}\n    partition_by: [device, device]"
    )));
    assert!(d.message.contains("names column 'device' twice"), "{d}");
}
