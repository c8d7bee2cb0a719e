//! Queries over small known tables: answers, limits, encodings and every kind of error.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Float64Array, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use weir_engine::metrics::StreamMetrics;
use weir_engine::observe::RetainSpec;

use super::*;
use crate::{Format, JsonAnswer};

fn readings(from: i64, rows: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("device", DataType::Utf8, false),
        Field::new("n", DataType::Int64, false),
        Field::new("temperature", DataType::Float64, true),
    ]));
    let n: Vec<i64> = (from..from + rows).collect();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                n.iter().map(|i| format!("d{}", i % 3)),
            )),
            Arc::new(Int64Array::from(n.clone())),
            Arc::new(Float64Array::from_iter(
                n.iter().map(|&i| (i % 7 != 0).then_some(i as f64 / 2.0)),
            )),
        ],
    )
    .unwrap()
}

fn session() -> Session {
    let session = Session::new(&Limits::default()).unwrap();
    let batches = vec![readings(0, 50), readings(50, 50)];
    session
        .register_batches(None, "readings", batches[0].schema(), batches)
        .unwrap();
    session
}

async fn run(session: &Session, sql: &str) -> Result<Answer, QueryError> {
    session.run(sql, &Limits::default()).await
}

fn json(answer: &Answer) -> JsonAnswer {
    serde_json::from_slice(&answer.encode(Format::Json).unwrap()).unwrap()
}

#[tokio::test]
async fn a_query_answers_with_its_rows_in_every_format() {
    let session = session();
    let answer = run(
        &session,
        "SELECT device, count(*) AS n, max(n) AS last FROM readings GROUP BY device ORDER BY device",
    )
    .await
    .unwrap();
    assert_eq!((answer.row_count, answer.truncated), (3, false));

    let body = json(&answer);
    assert_eq!(
        body.columns
            .iter()
            .map(|c| format!("{}:{}", c.name, c.data_type))
            .collect::<Vec<_>>(),
        ["device:Utf8", "n:Int64", "last:Int64"]
    );
    assert_eq!(
        serde_json::Value::Array(body.rows.into_iter().map(Into::into).collect()),
        serde_json::json!([
            {"device": "d0", "n": 34, "last": 99},
            {"device": "d1", "n": 33, "last": 97},
            {"device": "d2", "n": 33, "last": 98},
        ])
    );

    let csv = String::from_utf8(answer.encode(Format::Csv).unwrap()).unwrap();
    assert_eq!(csv, "device,n,last\nd0,34,99\nd1,33,97\nd2,33,98\n");

    let arrow = answer.encode(Format::Arrow).unwrap();
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(arrow), None).unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    assert_eq!(batches, answer.batches);
}

#[tokio::test]
async fn nulls_are_written_and_an_empty_answer_keeps_its_columns() {
    let session = session();
    let answer = run(&session, "SELECT n, temperature FROM readings WHERE n = 7")
        .await
        .unwrap();
    assert_eq!(
        serde_json::Value::Object(json(&answer).rows.remove(0)),
        serde_json::json!({"n": 7, "temperature": null})
    );
    let empty = run(&session, "SELECT n FROM readings WHERE n < 0")
        .await
        .unwrap();
    assert_eq!(empty.row_count, 0);
    assert_eq!(
        String::from_utf8(empty.encode(Format::Csv).unwrap()).unwrap(),
        "n\n"
    );
    assert_eq!(json(&empty).rows.len(), 0);
}

#[tokio::test]
async fn rows_past_the_limit_are_cut_and_the_answer_says_so() {
    let session = session();
    let limits = Limits {
        max_rows: 30,
        ..Limits::default()
    };
    let answer = session
        .run("SELECT n FROM readings ORDER BY n", &limits)
        .await
        .unwrap();
    assert_eq!((answer.row_count, answer.truncated), (30, true));
    let body = json(&answer);
    assert_eq!(body.rows.len(), 30);
    assert_eq!(body.rows[29]["n"], 29);
    // Exactly at the limit is not cut.
    let exact = session
        .run("SELECT n FROM readings WHERE n < 30", &limits)
        .await
        .unwrap();
    assert_eq!((exact.row_count, exact.truncated), (30, false));
}

#[tokio::test]
async fn only_one_read_only_statement_is_run() {
    let session = session();
    for (sql, expected) in [
        (
            "CREATE TABLE t AS SELECT 1",
            "queries are read-only: `CREATE TABLE …` is not allowed; send a SELECT",
        ),
        (
            "INSERT INTO readings VALUES ('x', 1, 1.0)",
            "queries are read-only: `INSERT INTO …` is not allowed; send a SELECT",
        ),
        (
            "DROP TABLE readings",
            "queries are read-only: `DROP TABLE …` is not allowed; send a SELECT",
        ),
        (
            "SET datafusion.execution.batch_size = 1",
            "queries are read-only: `SET datafusion.execution.batch_size …` is not allowed; send a SELECT",
        ),
    ] {
        let error = run(&session, sql).await.unwrap_err();
        assert_eq!((error.code(), error.status()), ("read_only", 400), "{sql}");
        assert_eq!(error.to_string(), expected);
    }
    let error = run(&session, "SELECT 1; SELECT 2").await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "send one statement at a time; this request holds 2"
    );
    let error = run(&session, "  ").await.unwrap_err();
    assert_eq!(error.code(), "bad_request");
    // The table is still there and unchanged.
    let answer = run(&session, "SELECT count(*) AS rows FROM readings")
        .await
        .unwrap();
    assert_eq!(json(&answer).rows[0]["rows"], 100);
    // EXPLAIN of a query reads nothing and is allowed.
    run(&session, "EXPLAIN SELECT n FROM readings")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_bad_query_names_what_is_wrong() {
    let session = session();
    let error = run(&session, "SELEC n FROM readings").await.unwrap_err();
    assert_eq!((error.code(), error.status()), ("sql", 400));
    assert!(
        error.to_string().starts_with("SQL syntax error: "),
        "{error}"
    );
    assert!(error.to_string().contains("SELEC"), "{error}");

    let error = run(&session, "SELECT n FROM readngs").await.unwrap_err();
    assert_eq!(error.code(), "sql");
    assert!(error.to_string().contains("readngs"), "{error}");
    assert!(error.to_string().ends_with("; tables: readings"), "{error}");

    let error = run(&session, "SELECT temprature FROM readings")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "sql");
    assert!(error.to_string().contains("temprature"), "{error}");
    assert!(error.to_string().contains("temperature"), "{error}");
}

#[tokio::test]
async fn a_query_past_its_timeout_is_stopped() {
    let session = session();
    let limits = Limits {
        timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    // 100^5 = 10 billion rows through a cross join: far longer than 200 ms. The join
    // only computes (its tables are in memory), so this also shows the query yields.
    let started = std::time::Instant::now();
    let error = session
        .run(
            "SELECT count(*) FROM readings a, readings b, readings c, readings d, readings e \
             WHERE a.n + b.n + c.n + d.n + e.n = -1",
            &limits,
        )
        .await
        .unwrap_err();
    assert_eq!((error.code(), error.status()), ("timeout", 504));
    assert_eq!(
        error.to_string(),
        "the query did not finish within 200ms; narrow it (WHERE, LIMIT) or allow a longer timeout"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_query_over_its_memory_limit_fails_instead_of_spilling() {
    let limits = Limits {
        memory_bytes: 64 * 1024,
        ..Limits::default()
    };
    let session = Session::new(&limits).unwrap();
    let batches: Vec<RecordBatch> = (0..20).map(|i| readings(i * 5000, 5000)).collect();
    session
        .register_batches(None, "readings", batches[0].schema(), batches)
        .unwrap();
    let error = session
        .run("SELECT * FROM readings ORDER BY temperature DESC", &limits)
        .await
        .unwrap_err();
    assert_eq!((error.code(), error.status()), ("memory", 422), "{error}");
    assert!(
        error
            .to_string()
            .starts_with("the query needs more memory than it may use"),
        "{error}"
    );
}

#[tokio::test]
async fn retained_streams_are_tables_and_unretained_ones_say_how_to_retain() {
    let schema = readings(0, 1).schema();
    let view = |pipeline: &str, node: &str, retain: bool| {
        Arc::new(StreamView::new(
            pipeline,
            node,
            schema.clone(),
            retain.then(RetainSpec::default),
            StreamMetrics::detached(pipeline, node),
        ))
    };
    let streams = vec![
        view("public", "totals", true),
        view("information_schema", "odd", true),
        view("plant", "readings", true),
        view("plant", "raw", false),
        view("boiler-room", "alerts", true),
        view("yard", "alerts", true),
    ];
    let mut session = Session::new(&Limits::default()).unwrap();
    register_streams(&mut session, &streams).unwrap();
    assert_eq!(
        session.table_names(),
        [
            "boiler-room.alerts",
            "odd",
            "plant.readings",
            "readings",
            "totals",
            "yard.alerts"
        ]
    );
    let answer = run(&session, "SELECT count(*) AS n FROM \"boiler-room\".alerts")
        .await
        .unwrap();
    assert_eq!(json(&answer).rows[0]["n"], 0);
    let error = run(&session, "SELECT * FROM raw").await.unwrap_err();
    assert!(
        error
            .to_string()
            .ends_with("'raw' of pipeline 'plant' is not retained; add `retain: {duration: 15m, max_bytes: 64MB}` to it to query it"),
        "{error}"
    );
}
