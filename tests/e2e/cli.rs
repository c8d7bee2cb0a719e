//! Exit codes and messages of `weir validate` and `weir run`.

use crate::support::{repo, run, text, weir};

fn write(dir: &tempfile::TempDir, name: &str, yaml: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, yaml).expect("writes the pipeline");
    path
}

const BROKEN: &str = "\
version: 1
name: broken
sources:
  sensors:
    kind: generatr
    config: {devices: 2}
transforms:
  avg:
    kind: sql
    inputs: [sensorz]
    config: {query: SELECT 1}
sinks:
  out:
    kind: stdout
    inputs: [avg]
    config: {formt: json}
";

#[test]
fn validate_accepts_a_good_file_and_exits_zero() {
    let output = run(&[
        "validate",
        repo()
            .join("pipelines/examples/quickstart.yaml")
            .to_str()
            .unwrap(),
    ]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("ok: pipeline 'quickstart'"), "{stdout}");
}

#[test]
fn validate_notes_a_window_that_keeps_its_rows() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = write(
        &dir,
        "rows.yaml",
        "version: 1
name: rows
sources:
  s:
    kind: generator
    config: {devices: 2, count: 10}
transforms:
  every_row:
    kind: sql
    inputs: [s]
    window: {tumbling: 1m}
    config: {query: SELECT * FROM s}
  averaged:
    kind: sql
    inputs: [s]
    window: {tumbling: 1m}
    config: {query: \"SELECT device, avg(value) AS v FROM s GROUP BY device\"}
sinks:
  out: {kind: stdout, inputs: [every_row, averaged]}
",
    );
    let output = run(&["validate", file.to_str().unwrap()]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("note: every_row: its windows keep every row until they close"),
        "{stdout}"
    );
    assert!(!stdout.contains("note: averaged"), "{stdout}");
}

#[test]
fn validate_reports_every_problem_with_file_line_and_column_and_exits_78() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = write(&dir, "broken.yaml", BROKEN);
    let output = run(&["validate", file.to_str().unwrap()]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    let name = file.display().to_string();
    // The unknown kind, the dangling input and the misspelt field, each located.
    assert!(stderr.contains(&format!("{name}:5:11")), "{stderr}");
    assert!(stderr.contains("generatr"), "{stderr}");
    assert!(
        stderr.contains("generator"),
        "the hint lists the valid kinds: {stderr}"
    );
    assert!(stderr.contains(&format!("{name}:10:14")), "{stderr}");
    assert!(stderr.contains("sensorz"), "{stderr}");
    assert!(stderr.contains("formt"), "{stderr}");
    assert!(
        stderr.contains("format"),
        "the hint names the nearest field: {stderr}"
    );
    assert!(stderr.contains("problems found"), "{stderr}");
}

#[test]
fn run_refuses_an_invalid_file_with_exit_78_and_runs_nothing() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = write(&dir, "broken.yaml", BROKEN);
    let output = run(&["run", "--no-metrics", file.to_str().unwrap()]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
}

#[test]
fn a_missing_input_file_fails_the_run_with_exit_1_naming_pipeline_and_operator() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = write(
        &dir,
        "missing.yaml",
        "\
version: 1
name: missing-input
sources:
  readings:
    kind: file
    schema: {device: utf8, ts: timestamp_ms}
    config: {path: no-such-file.jsonl, format: json}
sinks:
  out: {kind: stdout, inputs: [readings]}
",
    );
    let output = run(&["run", "--no-metrics", file.to_str().unwrap()]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("missing-input"), "{stderr}");
    assert!(stderr.contains("readings"), "{stderr}");
    assert!(stderr.contains("no-such-file.jsonl"), "{stderr}");
}

#[test]
fn an_operator_failing_on_data_names_pipeline_and_operator_and_exits_1() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = write(
        &dir,
        "bad-cast.yaml",
        "\
version: 1
name: bad-cast
sources:
  readings:
    kind: generator
    config: {devices: 2, count: 10, realtime: false, seed: 1}
transforms:
  parse:
    kind: sql
    inputs: [readings]
    config: {query: \"SELECT device, CAST(device AS INT) AS n FROM readings\"}
sinks:
  out: {kind: stdout, inputs: [parse]}
",
    );
    let output = run(&["run", "--no-metrics", file.to_str().unwrap()]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline 'bad-cast': operator 'parse' failed"),
        "{stderr}"
    );
}

#[test]
fn several_pipelines_run_in_one_process() {
    let out = tempfile::tempdir().expect("a temp dir");
    let examples = repo().join("pipelines/examples");
    let output = weir()
        .args(["run", "--no-metrics"])
        .arg(examples.join("file-filter.yaml"))
        .arg(examples.join("hopping-parquet.yaml"))
        .env("WEIR_OUT_DIR", out.path())
        .output()
        .expect("weir runs");
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(out.path().join("hot-readings.jsonl").exists());
    // The pipeline checkpoints, so its Parquet output is written as parts.
    assert!(out.path().join("load-00000.parquet").exists());
}

#[test]
fn help_documents_every_subcommand_and_the_exit_codes() {
    let (stdout, _) = text(&run(&["--help"]));
    for needle in ["run", "validate", "Exit codes", "78"] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
    let (stdout, _) = text(&run(&["run", "--help"]));
    for needle in [
        "--metrics-addr",
        "WEIR_METRICS_ADDR",
        "--shutdown-timeout",
        "SIGTERM",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
}

#[test]
fn an_unknown_flag_is_a_usage_error_with_exit_2() {
    let output = run(&["run", "--no-such-flag", "x.yaml"]);
    assert_eq!(output.status.code(), Some(2));
}
