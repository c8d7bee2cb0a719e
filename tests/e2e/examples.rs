//! Every example pipeline validates, and every one that reads no broker runs to completion
//! (the MQTT examples run against a test broker in `mqtt.rs`).

use crate::support::{repo, text, weir};

fn examples() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(repo().join("pipelines/examples"))
        .expect("the examples folder exists")
        .map(|entry| entry.expect("a readable entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected the example pipelines, found {files:?}"
    );
    files
}

/// The examples that need a broker: `mqtt-*.yaml`.
pub fn is_mqtt_example(file: &std::path::Path) -> bool {
    file.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with("mqtt-"))
}

#[test]
fn every_example_validates() {
    for file in examples() {
        let output = weir()
            .arg("validate")
            .arg(&file)
            // Out of the box: the MQTT examples default MQTT_URL to a local broker.
            .env_remove("MQTT_URL")
            .output()
            .expect("weir runs");
        let (stdout, stderr) = text(&output);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}:\n{stderr}",
            file.display()
        );
        assert!(stdout.starts_with("ok: pipeline '"), "{stdout}");
    }
}

#[test]
fn every_example_runs_to_completion() {
    let self_contained = examples().into_iter().filter(|file| !is_mqtt_example(file));
    for file in self_contained {
        let out = tempfile::tempdir().expect("a temp dir");
        let output = weir()
            .args(["run", "--no-metrics"])
            .arg(&file)
            .env("WEIR_OUT_DIR", out.path())
            .env("WEIR_ECHO_MODULE", crate::modules::echo_module())
            .output()
            .expect("weir runs");
        let (stdout, stderr) = text(&output);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}:\nstdout:\n{stdout}\nstderr:\n{stderr}",
            file.display()
        );
        let wrote_files = std::fs::read_dir(out.path()).expect("readable").count() > 0;
        assert!(
            !stdout.trim().is_empty() || wrote_files,
            "{} produced no output",
            file.display()
        );
    }
}

#[test]
fn quickstart_prints_one_table_row_per_device_and_minute() {
    let output = weir()
        .args(["run", "--no-metrics"])
        .arg(repo().join("pipelines/examples/quickstart.yaml"))
        .output()
        .expect("weir runs");
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    // 4 devices x 5 one-minute windows, each row starting with its window's start time.
    let rows = stdout
        .lines()
        .filter(|line| line.starts_with("| 2026-01-01T00:0"))
        .count();
    assert_eq!(rows, 20, "{stdout}");
    for device in ["dev-0000", "dev-0003"] {
        assert_eq!(stdout.matches(device).count(), 5, "{stdout}");
    }
}

#[test]
fn file_filter_example_reports_malformed_lines_with_their_numbers() {
    let out = tempfile::tempdir().expect("a temp dir");
    let output = weir()
        .args(["run", "--no-metrics"])
        .arg(repo().join("pipelines/examples/file-filter.yaml"))
        .env("WEIR_OUT_DIR", out.path())
        .output()
        .expect("weir runs");
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    // The sample file has two malformed lines, at lines 58 and 121.
    let rejected: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("dead letters are JSON lines"))
        .collect();
    let lines: Vec<u64> = rejected
        .iter()
        .map(|r| r["line"].as_u64().expect("a line number"))
        .collect();
    assert_eq!(lines, vec![58, 121], "{stdout}");
    let hot =
        std::fs::read_to_string(out.path().join("hot-readings.jsonl")).expect("the sink wrote");
    assert!(hot.lines().count() > 10);
    for line in hot.lines() {
        let row: serde_json::Value = serde_json::from_str(line).expect("JSON lines");
        assert!(
            row["temperature"].as_f64().expect("a number") > 70.0,
            "{line}"
        );
        assert!(
            row["ts"].is_i64(),
            "timestamps are epoch milliseconds: {line}"
        );
    }
}
