//! Behaviour of the `sql` transform, driven directly through its factory and a
//! [`Collector`]: planning errors, stateless queries and event-time windows.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use weir_engine::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, StringArray, TimestampMillisecondArray,
};
use weir_engine::arrow::datatypes::{
    DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, TimeUnit, TimestampMillisecondType,
};
use weir_engine::arrow::record_batch::RecordBatch;
use weir_engine::config::{ConfigErrors, ConfigValue};
use weir_engine::registry::{InputStream, NodeContext, StreamInfo};
use weir_engine::time::WindowSpec;
use weir_engine::{
    Collector, OperatorError, OperatorFactory, OperatorInstance, PlannedOperator, Role, Transform,
    Watermark,
};

use super::*;

const SECOND: i64 = 1000;

fn sensors_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device", DataType::Utf8, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        Field::new("temperature", DataType::Float64, false),
    ]))
}

fn input(name: &str, schema: SchemaRef, event_time: Option<&str>) -> InputStream {
    InputStream {
        name: name.to_owned(),
        stream: StreamInfo {
            schema,
            event_time: event_time.map(str::to_owned),
        },
    }
}

fn sensors() -> InputStream {
    input("sensors", sensors_schema(), Some("ts"))
}

fn tumbling(seconds: u64) -> Option<WindowSpec> {
    Some(WindowSpec::Tumbling {
        size: Duration::from_secs(seconds),
    })
}

fn plan_with(
    config: ConfigValue,
    inputs: &[InputStream],
    window: Option<WindowSpec>,
) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
    plan_on_error(config, inputs, window, weir_engine::registry::OnError::Fail)
}

fn plan_on_error(
    config: ConfigValue,
    inputs: &[InputStream],
    window: Option<WindowSpec>,
    on_error: weir_engine::registry::OnError,
) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
    let node = NodeContext {
        pipeline: "test",
        name: "t",
        role: Role::Transform,
        config: &config,
        config_path: "transforms.t.config",
        inputs,
        inputs_known: true,
        schema: None,
        event_time: None,
        window,
        on_error,
        base_dir: Path::new("."),
        peers: &[],
    };
    SqlFactory.plan(&node)
}

fn plan(
    query: &str,
    inputs: &[InputStream],
    window: Option<WindowSpec>,
) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
    plan_with(
        ConfigValue::map([("query", ConfigValue::string(query))]),
        inputs,
        window,
    )
}

fn errors_of(query: &str, inputs: &[InputStream], window: Option<WindowSpec>) -> ConfigErrors {
    match plan(query, inputs, window) {
        Ok(_) => panic!("query {query:?} was accepted"),
        Err(errors) => errors,
    }
}

fn transform(planned: Box<dyn PlannedOperator>) -> Box<dyn Transform> {
    match planned
        .instantiate(&weir_engine::metrics::OperatorMetrics::detached(
            "test", "node",
        ))
        .unwrap()
    {
        OperatorInstance::Transform(transform) => transform,
        _ => panic!("a sql node must build a transform"),
    }
}

fn build(query: &str, inputs: &[InputStream], window: Option<WindowSpec>) -> Box<dyn Transform> {
    transform(plan(query, inputs, window).unwrap())
}

/// A sensors batch of (device, ts in ms or null, temperature).
fn readings(rows: &[(&str, Option<i64>, f64)]) -> RecordBatch {
    let devices: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0)));
    let ts: ArrayRef = Arc::new(TimestampMillisecondArray::from(
        rows.iter().map(|r| r.1).collect::<Vec<_>>(),
    ));
    let temps: ArrayRef = Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2)));
    RecordBatch::try_new(sensors_schema(), vec![devices, ts, temps]).unwrap()
}

fn at(device: &str, seconds: i64, temperature: f64) -> (&str, Option<i64>, f64) {
    (device, Some(seconds * SECOND), temperature)
}

async fn push(t: &mut Box<dyn Transform>, input: usize, batch: RecordBatch) -> Collector {
    let mut out = Collector::new();
    t.process_batch(input, batch, &mut out).await.unwrap();
    out
}

async fn watermark(t: &mut Box<dyn Transform>, millis: i64) -> Collector {
    let mut out = Collector::new();
    t.on_watermark(Watermark(millis), &mut out).await.unwrap();
    out
}

fn strings(batch: &RecordBatch, column: &str) -> Vec<String> {
    let array = batch.column_by_name(column).unwrap();
    array
        .as_string::<i32>()
        .iter()
        .map(|v| v.unwrap().to_owned())
        .collect()
}

fn floats(batch: &RecordBatch, column: &str) -> Vec<f64> {
    let array = batch.column_by_name(column).unwrap();
    array.as_primitive::<Float64Type>().values().to_vec()
}

fn ints(batch: &RecordBatch, column: &str) -> Vec<i64> {
    let array = batch.column_by_name(column).unwrap();
    array.as_primitive::<Int64Type>().values().to_vec()
}

fn times(batch: &RecordBatch, column: &str) -> Vec<i64> {
    let array = batch.column_by_name(column).unwrap();
    array
        .as_primitive::<TimestampMillisecondType>()
        .values()
        .to_vec()
}

/// The main-port batches, concatenated.
fn main_rows(out: &mut Collector) -> Option<RecordBatch> {
    let batches: Vec<RecordBatch> = out
        .take_batches()
        .into_iter()
        .map(|(port, batch)| {
            assert_eq!(port, 0, "unexpected batch on port {port}");
            batch
        })
        .collect();
    let schema = batches.first()?.schema();
    Some(weir_engine::arrow::compute::concat_batches(&schema, &batches).unwrap())
}

/// One line per output row of a windowed device query: `start-end device n`.
fn window_lines(out: &mut Collector) -> Vec<String> {
    let mut lines = Vec::new();
    for (port, batch) in out.take_batches() {
        assert_eq!(port, 0);
        let starts = times(&batch, "window_start");
        let ends = times(&batch, "window_end");
        let devices = strings(&batch, "device");
        let counts = ints(&batch, "n");
        for row in 0..batch.num_rows() {
            lines.push(format!(
                "{}-{} {} {}",
                starts[row] / SECOND,
                ends[row] / SECOND,
                devices[row],
                counts[row]
            ));
        }
    }
    lines
}

const PER_DEVICE: &str = "SELECT device, count(*) AS n, avg(temperature) AS avg_t FROM sensors GROUP BY device ORDER BY device";

// ---- planning ----------------------------------------------------------------------

#[test]
fn stateless_plan_declares_the_query_schema_and_one_port() {
    let planned = plan(
        "SELECT device, temperature * 2 AS doubled FROM sensors WHERE temperature > 20",
        &[sensors()],
        None,
    )
    .unwrap();
    let outputs = planned.outputs();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].name, MAIN_PORT_NAME);
    let names: Vec<&str> = outputs[0]
        .stream
        .schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(names, vec!["device", "doubled"]);
    assert_eq!(outputs[0].stream.event_time, None);
}

#[test]
fn stateless_event_time_is_kept_only_when_the_column_passes_through() {
    let kept = plan(
        "SELECT ts, device FROM sensors WHERE temperature > 20",
        &[sensors()],
        None,
    );
    assert_eq!(
        kept.unwrap().outputs()[0].stream.event_time.as_deref(),
        Some("ts")
    );
    let aliased = plan(
        "SELECT s.ts AS ts FROM (SELECT * FROM sensors) AS s",
        &[sensors()],
        None,
    );
    assert_eq!(
        aliased.unwrap().outputs()[0].stream.event_time.as_deref(),
        Some("ts")
    );
    let shifted = plan(
        "SELECT ts + INTERVAL '1 second' AS ts FROM sensors",
        &[sensors()],
        None,
    );
    assert_eq!(shifted.unwrap().outputs()[0].stream.event_time, None);
    let renamed = plan("SELECT device AS ts FROM sensors", &[sensors()], None);
    assert_eq!(renamed.unwrap().outputs()[0].stream.event_time, None);
}

#[test]
fn windowed_plan_prepends_window_bounds_and_declares_a_late_port() {
    let planned = plan(PER_DEVICE, &[sensors()], tumbling(10)).unwrap();
    let outputs = planned.outputs();
    assert_eq!(outputs.len(), 2);
    let main = &outputs[0].stream;
    let names: Vec<&str> = main
        .schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(
        names,
        vec!["window_start", "window_end", "device", "n", "avg_t"]
    );
    let start = main.schema.field(0);
    assert_eq!(
        start.data_type(),
        &DataType::Timestamp(TimeUnit::Millisecond, None)
    );
    assert!(!start.is_nullable());
    assert_eq!(main.event_time.as_deref(), Some("window_start"));
    assert_eq!(outputs[1].name, "late");
    assert_eq!(outputs[1].stream, sensors().stream);
    assert_eq!(outputs[1].unwired_drop_reason, Some("late"));
    assert_eq!(outputs[0].unwired_drop_reason, None);
}

#[test]
fn unknown_column_is_named_with_the_input_columns() {
    let config = ConfigValue::map([(
        "query",
        ConfigValue::string("SELECT nosuch FROM sensors").at(weir_engine::config::Location {
            line: 7,
            column: 14,
        }),
    )]);
    let Err(errors) = plan_with(config, &[sensors()], None) else {
        panic!("an unknown column was accepted");
    };
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].message,
        "sql: no column named 'nosuch' in transform 't'; columns of sensors: device, ts, temperature"
    );
    assert_eq!(errors[0].path, "transforms.t.config.query");
    assert_eq!(
        (errors[0].location.line, errors[0].location.column),
        (7, 14)
    );
}

#[test]
fn misspelt_column_gets_the_nearest_name_as_hint() {
    let errors = errors_of("SELECT temperatur FROM sensors", &[sensors()], None);
    assert!(
        errors[0].message.contains("no column named 'temperatur'"),
        "{}",
        errors[0].message
    );
    assert_eq!(
        errors[0].hint.as_deref(),
        Some("did you mean 'temperature'?")
    );
    // Also in WHERE, and for qualified names.
    let errors = errors_of(
        "SELECT device FROM sensors WHERE sensors.tmp > 1",
        &[sensors()],
        None,
    );
    assert!(
        errors[0].message.contains("no column named 'tmp'"),
        "{}",
        errors[0].message
    );
}

#[test]
fn case_mismatches_hint_at_quoting_only_when_quotes_help() {
    let capitals = input(
        "sensors",
        Arc::new(Schema::new(vec![Field::new(
            "Temp",
            DataType::Float64,
            false,
        )])),
        None,
    );
    let errors = errors_of("SELECT Temp FROM sensors", &[capitals], None);
    assert_eq!(
        errors[0].hint.as_deref(),
        Some("unquoted names are lower-cased: write \"Temp\" in double quotes")
    );
    let errors = errors_of("SELECT \"Device\" FROM sensors", &[sensors()], None);
    assert_eq!(errors[0].hint.as_deref(), Some("did you mean 'device'?"));
    let errors = errors_of("SELECT nofunc(device) FROM sensors", &[sensors()], None);
    assert!(
        errors[0]
            .message
            .starts_with("sql: cannot plan the query of transform 't': ")
    );
    assert!(!errors[0].message.contains('\n'), "{}", errors[0].message);
}

#[test]
fn missing_table_lists_the_inputs() {
    let errors = errors_of("SELECT * FROM x", &[sensors()], None);
    assert_eq!(
        errors[0].message,
        "no table 'x' in transform 't'; its inputs are: sensors"
    );
    let errors = errors_of("SELECT * FROM sensor", &[sensors()], None);
    assert_eq!(errors[0].hint.as_deref(), Some("did you mean 'sensors'?"));
}

#[test]
fn syntax_errors_and_non_select_statements_are_rejected() {
    let errors = errors_of("SELEC device FROM sensors", &[sensors()], None);
    assert!(
        errors[0].message.starts_with("sql syntax error: "),
        "{}",
        errors[0].message
    );
    for statement in [
        "INSERT INTO sensors VALUES ('a', 1, 2.0)",
        "EXPLAIN SELECT * FROM sensors",
        "CREATE TABLE x (a INT)",
        "DROP TABLE sensors",
        "SELECT * INTO copy FROM sensors",
    ] {
        let errors = errors_of(statement, &[sensors()], None);
        assert!(
            errors[0].message.contains("runs only SELECT queries"),
            "{statement}: {}",
            errors[0].message
        );
    }
    let errors = errors_of(
        "SELECT * FROM sensors; SELECT * FROM sensors",
        &[sensors()],
        None,
    );
    assert!(
        errors[0].message.contains("several statements"),
        "{}",
        errors[0].message
    );
    let errors = errors_of("   ", &[sensors()], None);
    assert!(
        errors[0].message.contains("is empty"),
        "{}",
        errors[0].message
    );
}

#[test]
fn per_batch_constructs_without_a_window_are_rejected() {
    for (query, construct) in [
        (
            "SELECT device, avg(temperature) FROM sensors GROUP BY device",
            "an aggregate",
        ),
        ("SELECT count(*) FROM sensors", "an aggregate"),
        (
            "SELECT device, row_number() OVER (ORDER BY ts) FROM sensors",
            "a window function",
        ),
        ("SELECT * FROM sensors ORDER BY ts", "ORDER BY"),
        ("SELECT * FROM sensors LIMIT 5", "LIMIT"),
        ("SELECT DISTINCT device FROM sensors", "DISTINCT"),
        (
            "SELECT a.device FROM sensors a JOIN sensors b ON a.device = b.device",
            "a join",
        ),
        (
            "SELECT * FROM sensors WHERE temperature > (SELECT avg(temperature) FROM sensors)",
            "a subquery",
        ),
    ] {
        let errors = errors_of(query, &[sensors()], None);
        assert_eq!(errors.len(), 1, "{query}");
        assert!(
            errors[0].message.contains(construct),
            "{query}: {}",
            errors[0].message
        );
        assert!(
            errors[0].message.contains("has no window"),
            "{}",
            errors[0].message
        );
        assert!(
            errors[0]
                .hint
                .as_deref()
                .unwrap()
                .contains("window: {tumbling: 10s}")
        );
    }
    // The same queries are fine with a window.
    assert!(
        plan(
            "SELECT count(*) AS n FROM sensors",
            &[sensors()],
            tumbling(10)
        )
        .is_ok()
    );
}

#[test]
fn windows_need_event_time_on_every_input() {
    let bare = input("sensors", sensors_schema(), None);
    let errors = errors_of(PER_DEVICE, &[bare], tumbling(10));
    assert_eq!(
        errors[0].message,
        "windowed sql transform 't' needs an event-time column on input 'sensors'; declare event_time on its source"
    );
    let not_a_timestamp = input("sensors", sensors_schema(), Some("device"));
    let errors = errors_of(PER_DEVICE, &[not_a_timestamp], tumbling(10));
    assert!(
        errors[0].message.contains("not a timestamp"),
        "{}",
        errors[0].message
    );
}

#[test]
fn windowed_query_may_not_output_the_window_columns() {
    let errors = errors_of(
        "SELECT max(ts) AS window_end FROM sensors",
        &[sensors()],
        tumbling(10),
    );
    assert!(
        errors[0].message.contains("'window_end'"),
        "{}",
        errors[0].message
    );
}

#[test]
fn every_input_must_be_read_and_bad_windows_are_rejected() {
    let other = input("other", sensors_schema(), Some("ts"));
    let errors = errors_of("SELECT * FROM sensors", &[sensors(), other], None);
    assert!(
        errors[0]
            .message
            .contains("does not read its input 'other'"),
        "{}",
        errors[0].message
    );
    let sparse = Some(WindowSpec::Hopping {
        size: Duration::from_secs(5),
        slide: Duration::from_secs(10),
    });
    let errors = errors_of(PER_DEVICE, &[sensors()], sparse);
    assert_eq!(errors[0].path, "transforms.t.window");
    assert!(
        errors[0].message.contains("slides further"),
        "{}",
        errors[0].message
    );
}

#[test]
fn unknown_config_fields_are_rejected() {
    let config = ConfigValue::map([
        ("query", ConfigValue::string("SELECT * FROM sensors")),
        ("querry", ConfigValue::string("x")),
    ]);
    assert!(plan_with(config, &[sensors()], None).is_err());
    assert!(plan_with(ConfigValue::null(), &[sensors()], None).is_err());
}

// ---- stateless ---------------------------------------------------------------------

#[tokio::test]
async fn stateless_filter_and_projection() {
    let mut t = build(
        "SELECT device, temperature * 2 AS doubled FROM sensors WHERE temperature > 20",
        &[sensors()],
        None,
    );
    let mut out = push(
        &mut t,
        0,
        readings(&[at("a", 1, 10.0), at("b", 2, 25.0), at("c", 3, 30.5)]),
    )
    .await;
    let rows = main_rows(&mut out).unwrap();
    assert_eq!(strings(&rows, "device"), vec!["b", "c"]);
    assert_eq!(floats(&rows, "doubled"), vec![50.0, 61.0]);
    // A batch whose rows are all filtered out emits nothing.
    let mut out = push(&mut t, 0, readings(&[at("a", 4, 1.0)])).await;
    assert!(main_rows(&mut out).is_none());
}

#[tokio::test]
async fn stateless_plan_is_reused_over_many_batches() {
    let mut t = build(
        "SELECT device, temperature + 1 AS t1 FROM sensors WHERE temperature >= 50",
        &[sensors()],
        None,
    );
    for i in 0..200_i64 {
        let batch = readings(&[
            (&format!("d{i}"), Some(i), i as f64),
            ("x", Some(i), 50.0 + i as f64),
        ]);
        let mut out = push(&mut t, 0, batch).await;
        let rows = main_rows(&mut out).unwrap();
        // Each execution returns exactly this batch's passing rows, never earlier ones.
        let expected: Vec<String> = if i >= 50 {
            vec![format!("d{i}"), "x".into()]
        } else {
            vec!["x".into()]
        };
        assert_eq!(strings(&rows, "device"), expected, "batch {i}");
        assert_eq!(*floats(&rows, "t1").last().unwrap(), 51.0 + i as f64);
    }
}

#[tokio::test]
async fn stateless_union_of_two_inputs_passes_each_batch_through() {
    let other = input("other", sensors_schema(), Some("ts"));
    let mut t = build(
        "SELECT device FROM sensors UNION ALL SELECT device FROM other WHERE temperature > 0",
        &[sensors(), other],
        None,
    );
    let mut out = push(&mut t, 1, readings(&[at("o1", 1, 1.0), at("o2", 1, -1.0)])).await;
    assert_eq!(strings(&main_rows(&mut out).unwrap(), "device"), vec!["o1"]);
    let mut out = push(&mut t, 0, readings(&[at("s1", 1, -5.0)])).await;
    assert_eq!(strings(&main_rows(&mut out).unwrap(), "device"), vec!["s1"]);
}

#[tokio::test]
async fn stateless_bad_data_is_a_user_error_naming_the_input() {
    let mut t = build(
        "SELECT CAST(device AS INT) AS id FROM sensors",
        &[sensors()],
        None,
    );
    let mut out = push(&mut t, 0, readings(&[at("42", 1, 0.0)])).await;
    assert_eq!(
        main_rows(&mut out)
            .unwrap()
            .column(0)
            .as_primitive::<weir_engine::arrow::datatypes::Int32Type>()
            .value(0),
        42
    );
    let mut out = Collector::new();
    let error = t
        .process_batch(0, readings(&[at("not a number", 1, 0.0)]), &mut out)
        .await
        .unwrap_err();
    match error {
        OperatorError::User(message) => {
            assert!(message.contains("sql transform 't'"), "{message}");
            assert!(message.contains("input 'sensors'"), "{message}");
        }
        other => panic!("expected a user error, got {other:?}"),
    }
}

// ---- windows -----------------------------------------------------------------------

#[tokio::test]
async fn tumbling_window_in_order() {
    let mut t = build(PER_DEVICE, &[sensors()], tumbling(10));
    let mut out = push(
        &mut t,
        0,
        readings(&[at("a", 1, 10.0), at("b", 2, 20.0), at("a", 5, 30.0)]),
    )
    .await;
    assert!(
        out.take_batches().is_empty(),
        "nothing is emitted before the watermark"
    );
    push(&mut t, 0, readings(&[at("a", 11, 40.0)])).await;
    assert!(watermark(&mut t, 9_999).await.take_batches().is_empty());
    let mut out = watermark(&mut t, 10 * SECOND).await;
    let rows = main_rows(&mut out).unwrap();
    assert_eq!(times(&rows, "window_start"), vec![0, 0]);
    assert_eq!(times(&rows, "window_end"), vec![10 * SECOND, 10 * SECOND]);
    assert_eq!(strings(&rows, "device"), vec!["a", "b"]);
    assert_eq!(ints(&rows, "n"), vec![2, 1]);
    assert_eq!(floats(&rows, "avg_t"), vec![20.0, 20.0]);
    // The second window holds only its own row.
    let mut out = watermark(&mut t, 20 * SECOND).await;
    assert_eq!(window_lines(&mut out), vec!["10-20 a 1"]);
}

#[tokio::test]
async fn out_of_order_rows_within_tolerance_land_in_their_window() {
    let mut t = build(PER_DEVICE, &[sensors()], tumbling(10));
    push(&mut t, 0, readings(&[at("a", 12, 1.0)])).await;
    // Older than the previous row but the watermark has not passed its window yet.
    push(&mut t, 0, readings(&[at("a", 3, 1.0), at("b", 8, 1.0)])).await;
    let mut out = watermark(&mut t, 10 * SECOND).await;
    assert_eq!(window_lines(&mut out), vec!["0-10 a 1", "0-10 b 1"]);
    let mut out = watermark(&mut t, Watermark::END.millis()).await;
    assert_eq!(window_lines(&mut out), vec!["10-20 a 1"]);
}

#[tokio::test]
async fn late_rows_go_to_the_late_port_and_the_rest_is_kept() {
    let mut t = build(PER_DEVICE, &[sensors()], tumbling(10));
    push(&mut t, 0, readings(&[at("a", 1, 1.0)])).await;
    window_lines(&mut watermark(&mut t, 10 * SECOND).await);
    // One late row (window [0, 10) closed) and one on time, in the same batch.
    let mut out = push(&mut t, 0, readings(&[at("late", 4, 1.0), at("b", 15, 1.0)])).await;
    let batches = out.take_batches();
    assert_eq!(batches.len(), 1);
    let (port, late) = &batches[0];
    assert_eq!(*port, 1);
    assert_eq!(late.schema(), sensors_schema());
    assert_eq!(strings(late, "device"), vec!["late"]);
    assert!(
        out.take_dropped().is_empty(),
        "the engine counts unwired late rows, not the transform"
    );
    // A batch that is entirely late goes out whole.
    let mut out = push(&mut t, 0, readings(&[at("x", 2, 1.0), at("y", 9, 1.0)])).await;
    let batches = out.take_batches();
    assert_eq!(
        (batches.len(), batches[0].0, batches[0].1.num_rows()),
        (1, 1, 2)
    );
    let mut out = watermark(&mut t, Watermark::END.millis()).await;
    assert_eq!(window_lines(&mut out), vec!["10-20 b 1"]);
}

#[tokio::test]
async fn windows_without_rows_emit_nothing_and_end_closes_everything_in_order() {
    let mut t = build(PER_DEVICE, &[sensors()], tumbling(10));
    push(
        &mut t,
        0,
        readings(&[at("a", 35, 1.0), at("a", 1, 1.0), at("b", 72, 1.0)]),
    )
    .await;
    let mut out = watermark(&mut t, Watermark::END.millis()).await;
    assert_eq!(
        window_lines(&mut out),
        vec!["0-10 a 1", "30-40 a 1", "70-80 b 1"]
    );
    // Everything closed: nothing is left to emit, and old rows are now late.
    assert!(
        watermark(&mut t, Watermark::END.millis())
            .await
            .take_batches()
            .is_empty()
    );
    let mut out = push(&mut t, 0, readings(&[at("c", 90, 1.0)])).await;
    assert_eq!(out.take_batches()[0].0, 1);
}

#[tokio::test]
async fn global_aggregate_emits_one_row_per_window_with_rows() {
    let mut t = build(
        "SELECT count(*) AS n, max(temperature) AS hi FROM sensors",
        &[sensors()],
        tumbling(10),
    );
    push(
        &mut t,
        0,
        readings(&[at("a", 1, 3.0), at("b", 2, 7.0), at("c", 25, 1.0)]),
    )
    .await;
    let mut out = watermark(&mut t, 30 * SECOND).await;
    let rows = main_rows(&mut out).unwrap();
    assert_eq!(times(&rows, "window_start"), vec![0, 20 * SECOND]);
    assert_eq!(ints(&rows, "n"), vec![2, 1]);
    assert_eq!(floats(&rows, "hi"), vec![7.0, 1.0]);
}

#[tokio::test]
async fn hopping_windows_count_a_row_in_every_window_that_covers_it() {
    let window = Some(WindowSpec::Hopping {
        size: Duration::from_secs(30),
        slide: Duration::from_secs(10),
    });
    let mut t = build(PER_DEVICE, &[sensors()], window);
    push(&mut t, 0, readings(&[at("a", 25, 1.0)])).await;
    push(&mut t, 0, readings(&[at("b", 31, 1.0)])).await;
    let mut out = watermark(&mut t, 30 * SECOND).await;
    assert_eq!(window_lines(&mut out), vec!["0-30 a 1"]);
    // Window [0, 30) has closed, so a row at 28s now counts only in [10, 40) and [20, 50).
    push(&mut t, 0, readings(&[at("c", 28, 1.0)])).await;
    let mut out = watermark(&mut t, Watermark::END.millis()).await;
    assert_eq!(
        window_lines(&mut out),
        vec![
            "10-40 a 1",
            "10-40 b 1",
            "10-40 c 1",
            "20-50 a 1",
            "20-50 b 1",
            "20-50 c 1",
            "30-60 b 1",
        ]
    );
}

#[tokio::test]
async fn a_batch_spanning_many_panes_is_split_in_arrival_order() {
    let mut t = build("SELECT device FROM sensors", &[sensors()], tumbling(1));
    // 40 rows over 20 one-second panes, arriving out of order.
    let rows: Vec<(String, i64)> = (0..40).map(|i| (format!("r{i}"), (i * 7) % 20)).collect();
    let batch_rows: Vec<(&str, Option<i64>, f64)> = rows
        .iter()
        .map(|(d, s)| (d.as_str(), Some(s * SECOND + 500), 0.0))
        .collect();
    push(&mut t, 0, readings(&batch_rows)).await;
    let mut out = watermark(&mut t, Watermark::END.millis()).await;
    let mut seen = Vec::new();
    for (port, batch) in out.take_batches() {
        assert_eq!(port, 0);
        let start = times(&batch, "window_start")[0];
        for device in strings(&batch, "device") {
            seen.push((start / SECOND, device));
        }
    }
    let mut expected: Vec<(i64, String)> = rows.iter().map(|(d, s)| (*s, d.clone())).collect();
    // Stable by pane: rows of one pane keep their arrival order.
    expected.sort_by_key(|(s, _)| *s);
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn rows_without_event_time_are_dropped_and_counted() {
    let mut t = build(PER_DEVICE, &[sensors()], tumbling(10));
    let mut out = push(
        &mut t,
        0,
        readings(&[("a", None, 1.0), at("b", 1, 1.0), ("c", None, 1.0)]),
    )
    .await;
    assert_eq!(out.take_dropped(), vec![("null_event_time", 2)]);
    let mut out = watermark(&mut t, Watermark::END.millis()).await;
    assert_eq!(window_lines(&mut out), vec!["0-10 b 1"]);
}

fn limits_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device", DataType::Utf8, false),
        Field::new(
            "at",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("limit_t", DataType::Float64, false),
    ]))
}

fn limits(rows: &[(&str, i64, f64)]) -> RecordBatch {
    RecordBatch::try_new(
        limits_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(TimestampMillisecondArray::from_iter_values(
                rows.iter().map(|r| r.1 * SECOND),
            )),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
        ],
    )
    .unwrap()
}

#[tokio::test]
async fn two_inputs_join_within_a_window() {
    let inputs = [sensors(), input("limits", limits_schema(), Some("at"))];
    let query = "SELECT s.device, count(*) AS n FROM sensors s JOIN limits l \
                 ON s.device = l.device WHERE s.temperature > l.limit_t \
                 GROUP BY s.device ORDER BY s.device";
    let planned = plan(query, &inputs, tumbling(10)).unwrap();
    assert_eq!(
        planned.outputs().len(),
        1,
        "no late port with several inputs"
    );
    let mut t = transform(planned);
    push(
        &mut t,
        0,
        readings(&[
            at("a", 1, 50.0),
            at("a", 2, 10.0),
            at("b", 3, 99.0),
            at("a", 12, 99.0),
        ]),
    )
    .await;
    push(
        &mut t,
        1,
        limits(&[("a", 5, 20.0), ("b", 6, 100.0), ("a", 15, 0.0)]),
    )
    .await;
    let mut out = watermark(&mut t, 10 * SECOND).await;
    assert_eq!(window_lines(&mut out), vec!["0-10 a 1"]);
    // Each window joins only its own rows: a's limit of 0 at 15s meets a's 99 at 12s.
    let mut out = watermark(&mut t, 20 * SECOND).await;
    assert_eq!(window_lines(&mut out), vec!["10-20 a 1"]);
    // With no late port, late rows are dropped and counted.
    let mut out = push(&mut t, 1, limits(&[("a", 3, 1.0)])).await;
    assert!(out.take_batches().is_empty());
    assert_eq!(out.take_dropped(), vec![("late", 1)]);
}

#[tokio::test]
async fn a_window_with_rows_on_one_input_only_still_closes() {
    let inputs = [sensors(), input("limits", limits_schema(), Some("at"))];
    let query = "SELECT device, count(*) AS n FROM (SELECT device FROM sensors UNION ALL SELECT device FROM limits) GROUP BY device";
    let mut t = build(query, &inputs, tumbling(10));
    push(&mut t, 1, limits(&[("z", 5, 0.0)])).await;
    let mut out = watermark(&mut t, Watermark::END.millis()).await;
    assert_eq!(window_lines(&mut out), vec!["0-10 z 1"]);
}

#[tokio::test]
async fn runtime_failures_name_the_window() {
    // Computed at the close: the failure names the window.
    let mut t = build(
        "SELECT CAST(device AS INT) AS id FROM sensors",
        &[sensors()],
        tumbling(10),
    );
    push(&mut t, 0, readings(&[at("x", 1, 0.0)])).await;
    let mut out = Collector::new();
    let error = t
        .on_watermark(Watermark(10 * SECOND), &mut out)
        .await
        .unwrap_err();
    match error {
        OperatorError::User(message) => assert!(
            message.contains("window [1970-01-01T00:00:00.000Z, 1970-01-01T00:00:10.000Z)"),
            "{message}"
        ),
        other => panic!("expected a user error, got {other:?}"),
    }
    // Aggregated incrementally: the rows fail when they are folded into the state, at
    // the latest when the watermark passes their pane, and the failure names the input
    // and where in time.
    let mut t = build(
        "SELECT sum(CAST(device AS INT)) AS total FROM sensors",
        &[sensors()],
        tumbling(10),
    );
    push(&mut t, 0, readings(&[at("x", 1, 0.0)])).await;
    let error = t
        .on_watermark(Watermark(10 * SECOND), &mut out)
        .await
        .unwrap_err();
    match error {
        OperatorError::User(message) => assert!(
            message.contains(
                "input 'sensors' at [1970-01-01T00:00:00.000Z, 1970-01-01T00:00:10.000Z)"
            ),
            "{message}"
        ),
        other => panic!("expected a user error, got {other:?}"),
    }
}

#[tokio::test]
async fn window_rows_are_shared_not_copied() {
    // The window's single batch reaches DataFusion as the same buffers that came in.
    let mut t = build(
        "SELECT temperature FROM sensors",
        &[sensors()],
        tumbling(10),
    );
    let batch = readings(&[at("a", 1, 1.5), at("b", 2, 2.5)]);
    let values = batch.column(2).to_data().buffers()[0].as_ptr();
    push(&mut t, 0, batch).await;
    let mut out = watermark(&mut t, 10 * SECOND).await;
    let rows = out.take_batches().remove(0).1;
    assert_eq!(rows.column(2).to_data().buffers()[0].as_ptr(), values);
    assert_eq!(
        rows.column(2)
            .as_primitive::<Float64Type>()
            .values()
            .to_vec(),
        vec![1.5, 2.5]
    );
}

/// The W1 workload at unit scale: 5M rows over 50 s of event time from 1000 devices
/// through a 10 s tumbling window, aggregated per device. Measures the transform alone
/// (batches are generated beforehand). Run it in release:
/// `cargo test --release -p weir-operators w1_ -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "throughput measurement; run in release"]
async fn w1_windowed_aggregate_throughput() {
    const ROWS: usize = 5_000_000;
    const BATCH: usize = 8192;
    const DEVICES: usize = 1000;
    const SPAN_MS: i64 = 50_000;
    let names: Vec<String> = (0..DEVICES).map(|d| format!("device-{d:04}")).collect();
    let batches: Vec<RecordBatch> = (0..ROWS)
        .step_by(BATCH)
        .map(|first| {
            let rows = BATCH.min(ROWS - first);
            let devices =
                StringArray::from_iter_values((first..first + rows).map(|i| &names[i % DEVICES]));
            let ts = TimestampMillisecondArray::from_iter_values(
                (first..first + rows).map(|i| i as i64 * SPAN_MS / ROWS as i64),
            );
            let temps =
                Float64Array::from_iter_values((first..first + rows).map(|i| (i % 97) as f64));
            RecordBatch::try_new(
                sensors_schema(),
                vec![Arc::new(devices), Arc::new(ts), Arc::new(temps)],
            )
            .unwrap()
        })
        .collect();
    let query = "SELECT device, avg(temperature) AS avg_t, min(temperature) AS min_t, \
                 max(temperature) AS max_t, count(*) AS n FROM sensors GROUP BY device";
    let mut t = build(query, &[sensors()], tumbling(10));
    let mut out = Collector::new();
    let mut emitted = 0_i64;
    let started = std::time::Instant::now();
    for batch in batches {
        // As a source would: a watermark after every batch, 1 s behind the newest row.
        let newest = times(&batch, "ts").last().copied().unwrap();
        t.process_batch(0, batch, &mut out).await.unwrap();
        t.on_watermark(Watermark(newest - SECOND), &mut out)
            .await
            .unwrap();
        for (_, result) in out.take_batches() {
            emitted += ints(&result, "n").iter().sum::<i64>();
        }
    }
    t.on_watermark(Watermark::END, &mut out).await.unwrap();
    for (_, result) in out.take_batches() {
        emitted += ints(&result, "n").iter().sum::<i64>();
    }
    let elapsed = started.elapsed();
    assert_eq!(
        emitted, ROWS as i64,
        "every row is counted in exactly one window"
    );
    println!(
        "w1: {ROWS} rows in {elapsed:.2?}: {:.2}M rows/s",
        ROWS as f64 / elapsed.as_secs_f64() / 1e6
    );
}

// ---- incremental aggregation ---------------------------------------------------------

/// A transform built with its metrics kept, so tests can read its state gauges.
fn build_observed(
    query: &str,
    config: &[(&str, ConfigValue)],
    window: Option<WindowSpec>,
) -> (Box<dyn Transform>, weir_engine::metrics::StateMetrics) {
    let mut entries = vec![("query", ConfigValue::string(query))];
    entries.extend(config.iter().cloned());
    let planned = plan_with(ConfigValue::map(entries), &[sensors()], window).unwrap();
    let metrics = weir_engine::metrics::OperatorMetrics::detached("test", "observed");
    let state = metrics.state();
    match planned.instantiate(&metrics).unwrap() {
        OperatorInstance::Transform(transform) => (transform, state),
        _ => panic!("a sql node must build a transform"),
    }
}

fn hopping(size_s: u64, slide_s: u64) -> Option<WindowSpec> {
    Some(WindowSpec::Hopping {
        size: Duration::from_secs(size_s),
        slide: Duration::from_secs(slide_s),
    })
}

/// Deterministic readings over `seconds` of event time: 7 devices, values with ties,
/// rows slightly out of order, cut into batches of `batch_rows`.
fn mixed_readings(rows: usize, seconds: i64, batch_rows: usize) -> Vec<RecordBatch> {
    let all: Vec<(String, Option<i64>, f64)> = (0..rows)
        .map(|i| {
            let i = i as i64;
            let ts = (i * seconds * SECOND) / rows as i64 - (i % 3) * 250;
            (
                format!("d{}", i % 7),
                Some(ts.max(0)),
                ((i * 37) % 23) as f64 - 5.0,
            )
        })
        .collect();
    all.chunks(batch_rows)
        .map(|chunk| {
            let rows: Vec<(&str, Option<i64>, f64)> =
                chunk.iter().map(|(d, t, v)| (d.as_str(), *t, *v)).collect();
            readings(&rows)
        })
        .collect()
}

/// Every main-port row, rendered as text and sorted: a batch-size independent picture
/// of a transform's output.
fn rendered(batches: &[RecordBatch]) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for batch in batches {
        let columns: Vec<ArrayRef> = batch.columns().to_vec();
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = columns
                .iter()
                .map(|column| {
                    weir_engine::arrow::util::display::array_value_to_string(column, row).unwrap()
                })
                .collect();
            lines.push(cells.join("|"));
        }
    }
    lines.sort();
    lines
}

/// Runs `batches` through `t` with a watermark 1 s behind the newest row after each, and
/// returns every result row.
async fn run_windows(t: &mut Box<dyn Transform>, batches: &[RecordBatch]) -> Vec<RecordBatch> {
    run_windows_restarting(t, batches, None).await
}

/// How often a test transform is replaced, and what with.
type Restarts<'a> = (usize, &'a mut dyn FnMut() -> Box<dyn Transform>);

/// As [`run_windows`]; with `restart`, every `every` batches the transform snapshots and
/// is replaced by a fresh one (from `fresh`) restored from the snapshots so far, as
/// after a crash right after a checkpoint.
async fn run_windows_restarting(
    t: &mut Box<dyn Transform>,
    batches: &[RecordBatch],
    mut restart: Option<Restarts<'_>>,
) -> Vec<RecordBatch> {
    let mut out = Collector::new();
    let mut results = Vec::new();
    let mut newest = i64::MIN;
    let mut stored = weir_engine::checkpoint::NodeState::default();
    for (index, batch) in batches.iter().enumerate() {
        if let Some((every, fresh)) = restart.as_mut()
            && index % *every == 0
        {
            stored.apply(&t.snapshot().unwrap());
            *t = fresh();
            t.restore(&stored).unwrap();
        }
        newest = newest.max(times(batch, "ts").into_iter().max().unwrap());
        t.process_batch(0, batch.clone(), &mut out).await.unwrap();
        t.on_watermark(Watermark(newest - SECOND), &mut out)
            .await
            .unwrap();
        results.extend(
            out.take_batches()
                .into_iter()
                .filter(|(p, _)| *p == 0)
                .map(|(_, b)| b),
        );
    }
    t.on_watermark(Watermark::END, &mut out).await.unwrap();
    results.extend(
        out.take_batches()
            .into_iter()
            .filter(|(p, _)| *p == 0)
            .map(|(_, b)| b),
    );
    results
}

/// The query over each window's rows, computed by DataFusion on a plain in-memory
/// table: the oracle that incremental state must agree with.
async fn reference(query: &str, rows: &[RecordBatch], size_s: i64, slide_s: i64) -> Vec<String> {
    use datafusion::datasource::MemTable;
    let mut starts = std::collections::BTreeSet::new();
    for batch in rows {
        for t in times(batch, "ts") {
            let last = t - t.rem_euclid(slide_s * SECOND);
            let mut start = last;
            while start > t - size_s * SECOND {
                starts.insert(start);
                start -= slide_s * SECOND;
            }
        }
    }
    let mut results = Vec::new();
    for start in starts {
        let end = start + size_s * SECOND;
        let inside: Vec<RecordBatch> = rows
            .iter()
            .map(|batch| {
                let ts = times(batch, "ts");
                let mask = weir_engine::arrow::array::BooleanArray::from_iter(
                    ts.iter().map(|t| Some(*t >= start && *t < end)),
                );
                weir_engine::arrow::compute::filter_record_batch(batch, &mask).unwrap()
            })
            .collect();
        let ctx = datafusion::prelude::SessionContext::new();
        let table = MemTable::try_new(sensors_schema(), vec![inside]).unwrap();
        ctx.register_table("sensors", Arc::new(table)).unwrap();
        let batches = ctx.sql(query).await.unwrap().collect().await.unwrap();
        for batch in batches {
            let rows = batch.num_rows();
            let mut columns: Vec<ArrayRef> = vec![
                Arc::new(TimestampMillisecondArray::from_value(start, rows)),
                Arc::new(TimestampMillisecondArray::from_value(end, rows)),
            ];
            columns.extend(batch.columns().iter().cloned());
            let mut fields = vec![
                Field::new(
                    "window_start",
                    DataType::Timestamp(TimeUnit::Millisecond, None),
                    false,
                ),
                Field::new(
                    "window_end",
                    DataType::Timestamp(TimeUnit::Millisecond, None),
                    false,
                ),
            ];
            fields.extend(batch.schema().fields().iter().map(|f| f.as_ref().clone()));
            let schema = Arc::new(Schema::new(fields));
            results.push(RecordBatch::try_new(schema, columns).unwrap());
        }
    }
    rendered(&results)
}

#[tokio::test]
async fn incremental_windows_agree_with_datafusion_over_the_windows_rows() {
    let queries = [
        "SELECT device, count(*) AS n, sum(temperature) AS s, avg(temperature) AS a, \
         min(temperature) AS lo, max(temperature) AS hi FROM sensors GROUP BY device",
        "SELECT device, round(stddev(temperature), 6) AS sd, round(var_pop(temperature), 6) AS vp, \
         count(DISTINCT temperature) AS distinct_t FROM sensors GROUP BY device",
        "SELECT count(*) AS n, median(temperature) AS m, \
         count(*) FILTER (WHERE temperature > 0) AS positive FROM sensors",
        "SELECT device, first_value(temperature ORDER BY ts) AS first_t, \
         last_value(temperature ORDER BY ts) AS last_t FROM sensors \
         WHERE temperature <> 3 GROUP BY device HAVING count(*) > 2",
        "SELECT CASE WHEN temperature > 5 THEN 'hot' ELSE 'cold' END AS band, \
         sum(temperature) * 2 AS doubled FROM sensors GROUP BY 1",
    ];
    for query in queries {
        let notes = plan(query, &[sensors()], tumbling(10)).unwrap().notes();
        assert!(
            !notes.iter().any(|note| note.contains("keep every row")),
            "{query} is aggregated incrementally: {notes:?}"
        );
    }
    let data = mixed_readings(700, 60, 13);
    for (size, slide) in [(10, 10), (30, 10), (25, 10)] {
        for query in queries {
            let (mut t, _) = build_observed(query, &[], hopping(size as u64, slide as u64));
            let ours = rendered(&run_windows(&mut t, &data).await);
            let oracle = reference(query, &data, size, slide).await;
            assert!(!ours.is_empty());
            assert_eq!(ours, oracle, "window {size}s/{slide}s, query {query}");
        }
    }
}

#[tokio::test]
async fn windows_restored_from_snapshots_give_the_uninterrupted_results() {
    let queries = [
        PER_DEVICE,
        "SELECT count(*) AS n, median(temperature) AS m FROM sensors",
        // No aggregate: the panes keep rows.
        "SELECT device, temperature FROM sensors WHERE temperature > 3",
    ];
    let data = mixed_readings(700, 60, 13);
    for window in [tumbling(10), hopping(30, 10)] {
        for query in queries {
            let (mut t, _) = build_observed(query, &[], window);
            let expected = rendered(&run_windows(&mut t, &data).await);
            let (mut t, _) = build_observed(query, &[], window);
            let mut fresh = || build_observed(query, &[], window).0;
            let restarted = run_windows_restarting(&mut t, &data, Some((7, &mut fresh))).await;
            assert!(!expected.is_empty());
            assert_eq!(rendered(&restarted), expected, "{window:?}, {query}");
        }
    }
}

#[tokio::test]
async fn a_window_snapshot_writes_only_the_panes_that_changed() {
    let (mut t, _) = build_observed(PER_DEVICE, &[], tumbling(10));
    let first = t.snapshot().unwrap();
    assert!(
        first.bytes() > 0,
        "the first snapshot replaces the store's state"
    );
    // Rows in three panes, then more rows in the last one only.
    push(
        &mut t,
        0,
        readings(&[at("a", 1, 1.0), at("b", 12, 2.0), at("c", 25, 3.0)]),
    )
    .await;
    let three = t.snapshot().unwrap();
    push(&mut t, 0, readings(&[at("a", 26, 4.0)])).await;
    let one = t.snapshot().unwrap();
    assert_eq!((three.parts(), one.parts()), (3, 1));
    assert!(
        one.bytes() < three.bytes(),
        "{} vs {}",
        one.bytes(),
        three.bytes()
    );
    assert!(t.snapshot().unwrap().is_unchanged());
    // Closing the first window deletes its pane and records the watermark.
    watermark(&mut t, 10 * SECOND).await;
    let closed = t.snapshot().unwrap();
    let mut stored = weir_engine::checkpoint::NodeState::default();
    for changes in [first, three, one, closed] {
        stored.apply(&changes);
    }
    assert_eq!(stored.entries().count(), 3, "two panes and the watermark");

    // The end of the stream closes every window, but a run resumed from the last
    // snapshot goes on from the last real watermark: new rows are not late.
    let mut ended = watermark(&mut t, Watermark::END.millis()).await;
    assert_eq!(window_lines(&mut ended).len(), 3);
    let mut after_end = stored.clone();
    after_end.apply(&t.snapshot().unwrap());
    let (mut resumed, _) = build_observed(PER_DEVICE, &[], tumbling(10));
    resumed.restore(&after_end).unwrap();
    let mut out = push(&mut resumed, 0, readings(&[at("a", 31, 1.0)])).await;
    assert!(
        out.take_batches().is_empty(),
        "a row after the last watermark is on time"
    );

    // A snapshot of other accumulator state is refused, and the transform stays
    // usable. Pane [0 s, 10 s) is folded into state when the watermark passes it, and
    // kept for the window [0 s, 20 s).
    let (mut hopping_t, _) = build_observed(PER_DEVICE, &[], hopping(20, 10));
    push(&mut hopping_t, 0, readings(&[at("a", 1, 1.0)])).await;
    watermark(&mut hopping_t, 10 * SECOND).await;
    let mut folded = weir_engine::checkpoint::NodeState::default();
    folded.apply(&hopping_t.snapshot().unwrap());
    let query = "SELECT device, count(*) AS n FROM sensors GROUP BY device";
    let (mut other, _) = build_observed(query, &[], hopping(20, 10));
    let error = other.restore(&folded).unwrap_err().to_string();
    assert!(
        error.contains("cannot be used") && error.contains("accumulator state"),
        "{error}"
    );
    push(&mut other, 0, readings(&[at("a", 1, 1.0)])).await;
    let mut out = watermark(&mut other, 10 * SECOND).await;
    assert_eq!(window_lines(&mut out).len(), 1);
}

#[tokio::test]
async fn incremental_state_holds_groups_not_rows() {
    use super::window::MINI_BATCH_ROWS;
    let (mut t, state) = build_observed(PER_DEVICE, &[], tumbling(3600));
    // 6,000 batches of 50 rows over 7 devices, all in one window: the rows are folded
    // into state every MINI_BATCH_ROWS, so the pane keeps at most that many rows on top
    // of at most 7 groups per state batch and 17 state batches before a merge.
    let total = 300_000;
    let mut most = 0;
    for batch in mixed_readings(total, 3000, 50) {
        push(&mut t, 0, batch).await;
        most = most.max(state.keys.get());
    }
    assert!(
        most as usize >= MINI_BATCH_ROWS - 50,
        "rows are gathered: {most}"
    );
    assert!(
        most as usize <= MINI_BATCH_ROWS + 50 + 7 * 17,
        "gathered rows are bounded and folded: {most}"
    );
    let mut out = watermark(&mut t, Watermark::END.millis()).await;
    let counts: i64 = window_lines(&mut out)
        .iter()
        .map(|line| line.rsplit(' ').next().unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(counts, total as i64);
    assert_eq!((state.keys.get(), state.bytes.get()), (0, 0));

    // A pane the watermark has passed keeps one state row per group while the windows
    // over it stay open.
    let (mut t, state) = build_observed(PER_DEVICE, &[], hopping(3600, 1800));
    for batch in mixed_readings(20_000, 1800, 50) {
        push(&mut t, 0, batch).await;
    }
    assert_eq!(state.keys.get(), 20_000, "rows gathered, not yet folded");
    let mut out = watermark(&mut t, 1800 * SECOND).await;
    assert_eq!(
        window_lines(&mut out).len(),
        7,
        "window [-1800 s, 1800 s) closed"
    );
    assert_eq!(state.keys.get(), 7, "one state row per device");
    assert!(state.bytes.get() < 16 << 10, "{} bytes", state.bytes.get());

    // A query without an aggregate keeps its rows, and says so.
    let (mut rows, state) = build_observed("SELECT device FROM sensors", &[], tumbling(3600));
    for batch in mixed_readings(1000, 10, 100) {
        push(&mut rows, 0, batch).await;
    }
    assert_eq!(state.keys.get(), 1000);
    assert!(state.bytes.get() > 1000);
}

#[test]
fn validate_notes_say_which_windows_keep_rows_or_values() {
    let notes = |query: &str| plan(query, &[sensors()], tumbling(10)).unwrap().notes();
    let per_device = notes(PER_DEVICE);
    assert!(per_device.is_empty(), "{per_device:?}");
    let buffered = notes("SELECT device, temperature FROM sensors");
    assert!(buffered[0].contains("keep every row"), "{buffered:?}");
    let valued =
        notes("SELECT device, array_agg(temperature) AS all_t FROM sensors GROUP BY device");
    assert!(valued[0].contains("array_agg"), "{valued:?}");
    assert!(plan(PER_DEVICE, &[sensors()], None).is_err());
}

#[tokio::test]
async fn rows_past_max_state_bytes_are_dropped_and_counted() {
    let (mut t, state) = build_observed(
        "SELECT device, temperature FROM sensors",
        &[("max_state_bytes", ConfigValue::string("1KiB"))],
        tumbling(10),
    );
    let mut dropped = 0;
    for batch in mixed_readings(2000, 5, 100) {
        let mut out = push(&mut t, 0, batch).await;
        dropped += out
            .take_dropped()
            .iter()
            .map(|(r, n)| {
                assert_eq!(*r, "state_limit");
                n
            })
            .sum::<u64>();
    }
    assert!(dropped >= 1000, "{dropped} rows dropped");
    let kept = state.keys.get() as u64;
    assert_eq!(kept + dropped, 2000, "every row is kept or counted");
    // Closing the windows frees the state, and rows are taken again.
    watermark(&mut t, Watermark::END.millis()).await;
    assert_eq!(state.bytes.get(), 0);
}

#[tokio::test]
async fn a_window_after_a_window_counts_every_upstream_row() {
    let mut hop = build(
        "SELECT device, count(*) AS n FROM sensors GROUP BY device",
        &[sensors()],
        hopping(30, 10),
    );
    let upstream = hop_schema_input(&hop_planned_schema());
    let mut tumble = build(
        "SELECT device, sum(n) AS n FROM hop GROUP BY device",
        &[upstream],
        tumbling(60),
    );
    let data = mixed_readings(3000, 300, 17);
    let mut out = Collector::new();
    let mut newest = i64::MIN;
    let (mut upstream_rows, mut downstream_rows, mut late) = (0_i64, 0_i64, 0_usize);
    for batch in data.into_iter().map(Some).chain([None]) {
        let watermark = match &batch {
            Some(batch) => {
                newest = newest.max(times(batch, "ts").into_iter().max().unwrap());
                hop.process_batch(0, batch.clone(), &mut out).await.unwrap();
                Watermark(newest - SECOND)
            }
            None => Watermark::END,
        };
        hop.on_watermark(watermark, &mut out).await.unwrap();
        let forwarded = hop.output_watermark(watermark);
        let mut down = Collector::new();
        for (port, result) in out.take_batches() {
            assert_eq!(port, 0, "no row is late upstream");
            upstream_rows += ints(&result, "n").iter().sum::<i64>();
            tumble.process_batch(0, result, &mut down).await.unwrap();
        }
        tumble.on_watermark(forwarded, &mut down).await.unwrap();
        for (port, result) in down.take_batches() {
            if port == 1 {
                late += result.num_rows();
            } else {
                downstream_rows += ints(&result, "n").iter().sum::<i64>();
            }
        }
    }
    assert_eq!(late, 0, "no window result is late downstream");
    assert_eq!(
        upstream_rows,
        3 * 3000,
        "each row is in three hopping windows"
    );
    assert_eq!(downstream_rows, upstream_rows);
}

fn hop_planned_schema() -> SchemaRef {
    plan(
        "SELECT device, count(*) AS n FROM sensors GROUP BY device",
        &[sensors()],
        hopping(30, 10),
    )
    .unwrap()
    .outputs()[0]
        .stream
        .schema
        .clone()
}

fn hop_schema_input(schema: &SchemaRef) -> InputStream {
    input("hop", Arc::clone(schema), Some("window_start"))
}

#[test]
fn the_forwarded_watermark_waits_for_the_earliest_open_window() {
    let tumbling_10 = build(PER_DEVICE, &[sensors()], tumbling(10));
    assert_eq!(
        tumbling_10.output_watermark(Watermark(25_000)),
        Watermark(20_000)
    );
    assert_eq!(
        tumbling_10.output_watermark(Watermark(20_000)),
        Watermark(20_000)
    );
    assert_eq!(tumbling_10.output_watermark(Watermark::END), Watermark::END);
}

// ---- on_error: dead_letter -----------------------------------------------------------

fn dead_lettering(query: &str, window: Option<WindowSpec>) -> Box<dyn Transform> {
    let config = ConfigValue::map([("query", ConfigValue::string(query))]);
    let planned = plan_on_error(
        config,
        &[sensors()],
        window,
        weir_engine::registry::OnError::DeadLetter,
    )
    .unwrap();
    let names: Vec<String> = planned.outputs().iter().map(|o| o.name.clone()).collect();
    let expected: &[&str] = if window.is_some() {
        &["out", "late", "dead_letter"]
    } else {
        &["out", "dead_letter"]
    };
    assert_eq!(names, expected);
    transform(planned)
}

/// The dead-letter rows emitted on `port`, as (input, error, raw) triples.
fn dead_letters(batches: &[(usize, RecordBatch)], port: usize) -> Vec<(String, String, String)> {
    batches
        .iter()
        .filter(|(p, _)| *p == port)
        .flat_map(|(_, batch)| {
            let (inputs, errors, raws) = (
                strings(batch, "input"),
                strings(batch, "error"),
                strings(batch, "raw"),
            );
            (0..batch.num_rows())
                .map(|row| (inputs[row].clone(), errors[row].clone(), raws[row].clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn a_bad_value_goes_to_dead_letter_and_the_rest_of_the_batch_goes_on() {
    let mut t = dead_lettering("SELECT CAST(device AS INT) AS id FROM sensors", None);
    let rows: Vec<String> = (0..40)
        .map(|i| {
            if i == 13 || i == 30 {
                "n/a".into()
            } else {
                i.to_string()
            }
        })
        .collect();
    let batch = readings(&rows.iter().map(|d| at(d, 1, 0.0)).collect::<Vec<_>>());
    let mut out = push(&mut t, 0, batch).await;
    let batches = out.take_batches();
    let ids: Vec<i32> = batches
        .iter()
        .filter(|(port, _)| *port == 0)
        .flat_map(|(_, b)| {
            b.column(0)
                .as_primitive::<weir_engine::arrow::datatypes::Int32Type>()
                .values()
                .to_vec()
        })
        .collect();
    let expected: Vec<i32> = (0..40).filter(|i| *i != 13 && *i != 30).collect();
    assert_eq!(ids, expected, "the good rows, in order");
    let dead = dead_letters(&batches, 1);
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (input, error, raw) in &dead {
        assert_eq!(input, "sensors");
        assert!(error.contains("n/a"), "{error}");
        assert!(raw.contains(r#""device":"n/a""#), "{raw}");
    }
}

#[tokio::test]
async fn a_windowed_aggregate_isolates_bad_rows_and_counts_the_rest() {
    let mut t = dead_lettering(
        "SELECT sum(CAST(device AS INT)) AS total, count(*) AS n FROM sensors",
        tumbling(10),
    );
    let mut out = push(
        &mut t,
        0,
        readings(&[at("1", 1, 0.0), at("x", 2, 0.0), at("5", 3, 0.0)]),
    )
    .await;
    assert!(
        out.take_batches().is_empty(),
        "the rows are gathered, and folded when the watermark passes their pane"
    );
    let mut out = watermark(&mut t, Watermark::END.millis()).await;
    let batches = out.take_batches();
    let dead = dead_letters(&batches, 2);
    assert_eq!(dead.len(), 1);
    assert!(dead[0].2.contains(r#""device":"x""#), "{dead:?}");
    let rows = batches
        .iter()
        .find(|(port, _)| *port == 0)
        .map(|(_, batch)| batch.clone())
        .unwrap();
    assert_eq!((ints(&rows, "total"), ints(&rows, "n")), (vec![6], vec![2]));
}

#[tokio::test]
async fn a_buffered_window_isolates_bad_rows_at_its_close_and_sends_each_once() {
    // No aggregate, so the window keeps its rows and runs the query only at the close.
    let mut t = dead_lettering(
        "SELECT CAST(device AS INT) AS id FROM sensors",
        hopping(20, 10),
    );
    push(
        &mut t,
        0,
        readings(&[at("1", 1, 0.0), at("x", 2, 0.0), at("5", 3, 0.0)]),
    )
    .await;
    push(&mut t, 0, readings(&[at("7", 12, 0.0)])).await;
    let mut out = watermark(&mut t, Watermark::END.millis()).await;
    let batches = out.take_batches();
    let dead = dead_letters(&batches, 2);
    // Pane [0, 10) feeds two windows; its bad row is sent once and then forgotten.
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].2.contains(r#""device":"x""#), "{dead:?}");
    let mut windows: Vec<(i64, Vec<i32>)> = Vec::new();
    for (_, batch) in batches.iter().filter(|(port, _)| *port == 0) {
        let start = times(batch, "window_start")[0] / SECOND;
        let ids = batch
            .column_by_name("id")
            .unwrap()
            .as_primitive::<weir_engine::arrow::datatypes::Int32Type>()
            .values()
            .to_vec();
        match windows.last_mut() {
            Some((last, kept)) if *last == start => kept.extend(ids),
            _ => windows.push((start, ids)),
        }
    }
    assert_eq!(
        windows,
        vec![(-10, vec![1, 5]), (0, vec![1, 5, 7]), (10, vec![7])]
    );
}
