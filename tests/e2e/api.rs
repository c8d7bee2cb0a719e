//! The runtime's local API through the real binary: `weir query` over retained streams
//! checked against what the generator wrote, retention bounds under a fast source,
//! `weir status`, `weir tap`, the probes, and the documented errors (bad SQL, timeout,
//! a missing or wrong token).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::{Running, http_get, http_request, metric_value, read_json_lines, text, weir};

/// Readings from 3 devices, 1 s apart in event time, both written to a file and
/// retained: the file is what the generator produced, to check queries against.
fn recorded(dir: &Path, rows: u64) -> std::path::PathBuf {
    let file = dir.join("recorded.yaml");
    std::fs::write(
        &file,
        format!(
            r#"version: 1
name: recorded
sources:
  readings:
    kind: generator
    config:
      devices: 3
      interval: 1s
      count: {rows}
      realtime: false
      start: 2026-01-01T00:00:00Z
      seed: 11
      batch_rows: 64
      fields:
        temperature: {{shape: sine, base: 60, amplitude: 5, period: 10m, noise: 0.5}}
    event_time: {{column: ts}}
    retain: {{duration: 1h, max_bytes: 16MB}}
transforms:
  per_minute:
    kind: sql
    inputs: [readings]
    window: {{tumbling: 1m}}
    config:
      query: SELECT device, count(*) AS n, max(temperature) AS hottest FROM readings GROUP BY device
    retain: {{}}
sinks:
  out:
    kind: file
    inputs: [readings]
    config: {{path: readings.jsonl, format: json}}
"#
        ),
    )
    .expect("writes the pipeline");
    file
}

/// Starts `weir run FILE --keep-serving` and waits for its pipelines to end.
fn run_and_keep_serving(file: &Path, extra: &[&str]) -> (Running, String) {
    let mut args = vec![
        "run",
        file.to_str().expect("utf-8 path"),
        "--keep-serving",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let mut weir = Running::start(&args, &[]);
    let addr = weir.metrics_addr();
    weir.wait_for_log("every pipeline has ended", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the pipelines end: {:?}", weir.stderr_seen));
    (weir, addr)
}

/// Runs `weir ARGS --addr ADDR`; returns the exit code, stdout and stderr.
fn client(addr: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = weir()
        .args(args)
        .args(["--addr", addr])
        .output()
        .expect("weir runs");
    let (stdout, stderr) = text(&output);
    (output.status.code(), stdout, stderr)
}

#[test]
fn queries_over_retained_streams_return_exactly_what_the_generator_produced() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (_weir, addr) = run_and_keep_serving(&recorded(dir.path(), 600), &[]);

    // Every row, as JSON: the same rows the file sink wrote.
    let (code, stdout, stderr) = client(
        &addr,
        &[
            "query",
            "--format",
            "json",
            "SELECT device, CAST(ts AS VARCHAR) AS ts, temperature FROM readings",
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let answer: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON answer");
    assert_eq!(answer["row_count"], 600);
    assert_eq!(answer["truncated"], false);
    let mut queried: Vec<serde_json::Value> = answer["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|row| {
            serde_json::json!({
                "device": row["device"],
                "temperature": row["temperature"],
                // The file sink writes timestamps as RFC 3339 with a Z.
                "ts": row["ts"].as_str().expect("ts").replace(' ', "T") + "Z",
            })
        })
        .collect();
    queried.sort_by_key(|row| row.to_string());
    let written: Vec<serde_json::Value> = read_json_lines(&dir.path().join("readings.jsonl"))
        .into_iter()
        .map(|row| {
            serde_json::json!({
                "device": row["device"],
                "temperature": row["temperature"],
                "ts": row["ts"],
            })
        })
        .collect();
    assert_eq!(queried.len(), written.len());
    assert_eq!(queried, written);

    // An aggregate as a table, and the windowed transform's own retained output agrees.
    let (code, stdout, stderr) = client(
        &addr,
        &[
            "query",
            "SELECT device, count(*) AS n, min(ts) AS first, max(ts) AS last \
             FROM readings GROUP BY device ORDER BY device",
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    for device in ["dev-0000", "dev-0001", "dev-0002"] {
        assert!(
            stdout.contains(&format!(
                "| {device} | 200 | 2026-01-01T00:00:00 | 2026-01-01T00:03:19 |"
            )),
            "{stdout}"
        );
    }
    assert!(stdout.trim_end().ends_with("(3 rows)"), "{stdout}");
    let (code, stdout, stderr) = client(
        &addr,
        &[
            "query",
            "--format",
            "csv",
            "SELECT sum(n) AS rows, count(*) AS windows FROM recorded.per_minute",
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "rows,windows\n600,12\n");

    // The row limit cuts the answer and says so.
    let (code, stdout, stderr) = client(
        &addr,
        &[
            "query",
            "--format",
            "csv",
            "--max-rows",
            "5",
            "SELECT n FROM per_minute",
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.lines().count(), 6, "a header and 5 rows: {stdout}");
    assert!(stderr.contains("cut at the row limit"), "{stderr}");
}

#[test]
fn bad_queries_get_the_documented_errors() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (_weir, addr) = run_and_keep_serving(&recorded(dir.path(), 300), &[]);

    let (code, _, stderr) = client(&addr, &["query", "SELECT nope FROM readings"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("400 Bad Request") && stderr.contains("nope"),
        "{stderr}"
    );
    let (code, _, stderr) = client(&addr, &["query", "SELECT * FROM sensors"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("sensors") && stderr.contains("tables: per_minute, readings"),
        "{stderr}"
    );
    let (code, _, stderr) = client(&addr, &["query", "DROP TABLE readings"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("queries are read-only"), "{stderr}");
    let (code, _, stderr) = client(
        &addr,
        &[
            "query",
            "--timeout",
            "200ms",
            "SELECT count(*) FROM readings a, readings b, readings c, readings d \
             WHERE a.temperature + b.temperature + c.temperature + d.temperature < 0",
        ],
    );
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("504") && stderr.contains("did not finish within 200ms"),
        "{stderr}"
    );
    // The API answers errors in JSON with a code.
    let (status, body) = http_request(
        &addr,
        "POST",
        "/api/v1/query",
        &["Content-Type: application/json"],
        r#"{"sql": "SELEC 1"}"#,
    );
    assert_eq!(status, 400, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(error["code"], "sql");
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .starts_with("SQL syntax error"),
        "{body}"
    );
    // application/sql bodies are SQL, and Accept picks the format.
    let (status, body) = http_request(
        &addr,
        "POST",
        "/api/v1/query",
        &[
            "Accept: text/csv",
            "Content-Type: application/sql; charset=utf-8",
        ],
        "SELECT count(*) AS n FROM readings",
    );
    assert_eq!((status, body.as_str()), (200, "n\n300\n"));
    // A page whose name was re-pointed at 127.0.0.1 (DNS rebinding) sends its own name
    // as Host, and is refused; the probes still answer.
    for (path, expected) in [("/api/v1/pipelines", "403"), ("/healthz", "200")] {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&addr).expect("connects");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: rebound.example:9464\r\nConnection: close\r\n\r\n"
        )
        .expect("sends");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("reads");
        assert!(
            answer.split_whitespace().nth(1) == Some(expected),
            "{path}: {answer}"
        );
        if expected == "403" {
            assert!(answer.contains("loopback host"), "{answer}");
        }
    }
    // What a web page can make a browser send without asking (text/plain, a form, no
    // type at all) is refused, so a page cannot query through a browser on the device.
    for content_type in [
        Some("Content-Type: text/plain"),
        Some("Content-Type: application/x-www-form-urlencoded"),
        None,
    ] {
        let headers: Vec<&str> = content_type.into_iter().collect();
        let (status, body) = http_request(
            &addr,
            "POST",
            "/api/v1/query",
            &headers,
            "SELECT count(*) AS n FROM readings",
        );
        assert_eq!(status, 415, "{content_type:?}: {body}");
        assert!(body.contains("application/sql"), "{body}");
    }
}

#[test]
fn a_token_guards_everything_but_the_probes() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (_weir, addr) = run_and_keep_serving(&recorded(dir.path(), 30), &["--api-token", "s3cret"]);

    let (code, _, stderr) = client(&addr, &["query", "SELECT 1"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("401 Unauthorized") && stderr.contains("needs a bearer token"),
        "{stderr}"
    );
    let (code, _, stderr) = client(&addr, &["query", "--token", "wrong", "SELECT 1"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not this runtime's API token"), "{stderr}");
    let (code, stdout, stderr) = client(
        &addr,
        &[
            "query",
            "--token",
            "s3cret",
            "--format",
            "csv",
            "SELECT count(*) AS n FROM readings",
        ],
    );
    assert_eq!((code, stdout.as_str()), (Some(0), "n\n30\n"), "{stderr}");
    for path in ["/metrics", "/api/v1/pipelines"] {
        let (status, body) = http_request(&addr, "GET", path, &[], "");
        assert_eq!(status, 401, "{path}: {body}");
    }
    for path in ["/healthz", "/readyz"] {
        let (status, _) = http_request(&addr, "GET", path, &[], "");
        assert_eq!(status, 200, "{path}");
    }
    let (status, _) = http_request(
        &addr,
        "GET",
        "/metrics",
        &["Authorization: Bearer s3cret"],
        "",
    );
    assert_eq!(status, 200);
}

#[test]
fn status_lists_pipelines_operators_schemas_and_retention() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (_weir, addr) = run_and_keep_serving(&recorded(dir.path(), 90), &[]);

    let (code, stdout, stderr) = client(&addr, &["status"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("pipeline recorded ("), "{stdout}");
    assert!(stdout.contains("): finished"), "{stdout}");
    let readings = stdout
        .lines()
        .find(|line| line.trim_start().starts_with("readings"))
        .expect("a line for readings");
    assert!(readings.contains("generator"), "{readings}");
    assert!(readings.contains("90 rows,"), "{readings}");
    assert!(readings.contains("of 15.3 MiB, for 1h"), "{readings}");
    assert!(stdout.contains("no modules are running"), "{stdout}");

    let body: serde_json::Value =
        serde_json::from_str(&http_get(&addr, "/api/v1/pipelines")).expect("JSON");
    let pipeline = &body["pipelines"][0];
    assert_eq!(pipeline["name"], "recorded");
    assert_eq!(pipeline["state"], "finished");
    let operators = pipeline["operators"].as_array().expect("operators");
    let names: Vec<&str> = operators
        .iter()
        .map(|op| op["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["readings", "per_minute", "out"]);
    assert_eq!(operators[0]["rows_out"], 90);
    assert_eq!(operators[0]["event_time"], "ts");
    assert_eq!(
        operators[1]["schema"],
        serde_json::json!([
            {"name": "window_start", "type": "Timestamp(ms)", "nullable": false},
            {"name": "window_end", "type": "Timestamp(ms)", "nullable": false},
            {"name": "device", "type": "Utf8", "nullable": false},
            {"name": "n", "type": "Int64", "nullable": false},
            {"name": "hottest", "type": "Float64", "nullable": true},
        ])
    );
    assert_eq!(operators[2]["inputs"], serde_json::json!(["readings"]));
    assert_eq!(operators[2]["schema"], serde_json::json!([]));
    // It checkpoints by default, and its end took a last checkpoint.
    let checkpoint = &pipeline["checkpoint"];
    assert_eq!(checkpoint["interval"], "10s", "{checkpoint}");
    assert!(
        checkpoint["last_completed_epoch"].as_u64() >= Some(1),
        "{checkpoint}"
    );
    assert!(checkpoint["completed"].as_u64() >= Some(1), "{checkpoint}");
    assert!(checkpoint["last_bytes"].as_u64() > Some(0), "{checkpoint}");
    assert_eq!(checkpoint["failures"], 0, "{checkpoint}");
    assert!(
        stdout.contains("  checkpoints every 10s: epoch "),
        "{stdout}"
    );
    assert_eq!(http_get(&addr, "/readyz"), "ready\n");
}

#[test]
fn retention_stays_within_its_bounds_under_a_fast_source() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("fast.yaml");
    // Two million rows as fast as they come, retained within 1 MiB.
    std::fs::write(
        &file,
        r#"version: 1
name: fast
sources:
  readings:
    kind: generator
    config:
      devices: 100
      interval: 1s
      count: 2000000
      realtime: false
      batch_rows: 1000
      fields:
        temperature: {shape: sine, base: 60, amplitude: 5, period: 10m}
    retain: {duration: 1h, max_bytes: 1MiB}
sinks:
  none:
    kind: blackhole
    inputs: [readings]
"#,
    )
    .expect("writes the pipeline");
    let mut weir = Running::start(
        &[
            "run",
            file.to_str().unwrap(),
            "--keep-serving",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let addr = weir.metrics_addr();
    let bound = 1024.0 * 1024.0;
    let labels = [("pipeline", "fast"), ("operator", "readings")];
    let mut samples = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let body = http_get(&addr, "/metrics");
        if let Some(bytes) = metric_value(&body, "weir_retained_bytes", &labels) {
            assert!(bytes <= bound, "{bytes} retained bytes, over {bound}");
            samples += 1;
        }
        let emitted = metric_value(&body, "weir_operator_rows_out_total", &labels);
        if emitted == Some(2_000_000.0) {
            let retained = metric_value(&body, "weir_retained_rows", &labels).unwrap();
            let evicted = metric_value(
                &body,
                "weir_retained_evicted_rows_total",
                &[labels[0], labels[1], ("reason", "bytes")],
            )
            .unwrap();
            // Nothing is lost silently: what is not held was counted as evicted.
            assert_eq!(retained + evicted, 2_000_000.0);
            assert!(retained > 0.0 && retained < 100_000.0, "{retained}");
            let (code, stdout, stderr) = client(
                &addr,
                &[
                    "query",
                    "--format",
                    "csv",
                    "SELECT count(*) AS n FROM readings",
                ],
            );
            assert_eq!(code, Some(0), "{stderr}");
            assert_eq!(stdout, format!("n\n{retained}\n"));
            break;
        }
        assert!(Instant::now() < deadline, "the source did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(samples > 0);
    drop(weir);
}

#[test]
fn a_tap_shows_a_bounded_sample_and_counts_the_rest() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("paced.yaml");
    // 50 devices every 20 ms: 2,500 rows a second, far over the tap's rate.
    std::fs::write(
        &file,
        r#"version: 1
name: paced
sources:
  readings:
    kind: generator
    config:
      devices: 50
      interval: 20ms
      realtime: true
      fields:
        temperature: {shape: sine, base: 60, amplitude: 5, period: 1m}
transforms:
  hot:
    kind: sql
    inputs: [readings]
    config: {query: "SELECT device, temperature FROM readings WHERE temperature > 0"}
sinks:
  none:
    kind: blackhole
    inputs: [hot]
"#,
    )
    .expect("writes the pipeline");
    let mut weir = Running::start(
        &[
            "run",
            file.to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let addr = weir.metrics_addr();
    let started = Instant::now();
    let (code, stdout, stderr) = client(&addr, &["tap", "hot", "--rate", "20", "--limit", "40"]);
    let took = started.elapsed();
    assert_eq!(code, Some(0), "{stderr}");
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON row"))
        .collect();
    assert_eq!(rows.len(), 40);
    for row in &rows {
        assert!(row["device"].as_str().unwrap().starts_with("dev-"), "{row}");
        assert!(row["temperature"].as_f64().is_some(), "{row}");
    }
    // 40 rows at 20 a second: the first second's 20 at once, the rest over a second more.
    assert!(took >= Duration::from_millis(800), "{took:?}");
    assert!(stderr.contains("rows not shown so far"), "{stderr}");
    let body = http_get(&addr, "/metrics");
    let dropped = metric_value(
        &body,
        "weir_tap_dropped_rows_total",
        &[("pipeline", "paced"), ("operator", "hot")],
    )
    .unwrap_or(0.0);
    assert!(dropped > 100.0, "{dropped}");

    // A sink has no output to tap; an unknown node is named with the ones that exist.
    let (code, _, stderr) = client(&addr, &["tap", "none"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("404") && stderr.contains("nodes with output: hot, readings"),
        "{stderr}"
    );
    // Bad parameters are answered in JSON like every other error.
    for query in ["rate=abc", "rate=0", "every=1s"] {
        let (status, body) =
            http_request(&addr, "GET", &format!("/api/v1/tap/hot?{query}"), &[], "");
        assert_eq!(status, 400, "{query}: {body}");
        let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
        assert_eq!(error["code"], "bad_request", "{query}: {body}");
    }
    weir.signal("TERM");
    assert_eq!(weir.wait_exit(Duration::from_secs(30)), Some(0));
}

#[test]
fn the_readmes_query_against_the_quickstart_prints_what_the_readme_shows() {
    let readme = std::fs::read_to_string(crate::support::repo().join("README.md")).expect("README");
    let command = readme
        .lines()
        .find(|line| line.starts_with("cargo run -- query "))
        .expect("the README shows a weir query");
    let sql = command
        .split('"')
        .nth(1)
        .expect("the query is in double quotes");
    let after = &readme[readme.find(command).unwrap()..];
    let shown = after
        .split("```\n")
        .nth(2)
        .expect("the answer follows in a code block");

    let quickstart = crate::support::repo().join("pipelines/examples/quickstart.yaml");
    let (_weir, addr) = run_and_keep_serving(&quickstart, &[]);
    let (code, stdout, stderr) = client(&addr, &["query", sql]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, shown);
}
