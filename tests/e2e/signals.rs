//! SIGINT and SIGTERM drain in-flight data, close open windows and flush sinks.

use std::time::Duration;

use crate::support::{Running, read_json_lines};

const ENDLESS: &str = "\
version: 1
name: endless
sources:
  readings:
    kind: generator
    config: {devices: 3, interval: 50ms, realtime: true, seed: 5}
transforms:
  per_second:
    kind: sql
    inputs: [readings]
    window: {tumbling: 1s}
    config: {query: \"SELECT device, count(*) AS n FROM readings GROUP BY device\"}
sinks:
  raw:
    kind: file
    inputs: [readings]
    config: {path: raw.jsonl, format: json}
  windows:
    kind: file
    inputs: [per_second]
    config: {path: windows.jsonl, format: json}
";

fn drains_on(signal: &str) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("endless.yaml");
    std::fs::write(&file, ENDLESS).expect("writes the pipeline");
    let mut weir = Running::start(&["run", "--no-metrics", file.to_str().unwrap()], &[]);
    weir.wait_for_log("pipeline started", Duration::from_secs(30))
        .expect("the pipeline starts");
    std::thread::sleep(Duration::from_millis(1500));
    weir.signal(signal);
    let code = weir.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "stderr: {:?}", weir.stderr_seen);

    // Every generated row reached the raw sink, and every one of them was counted in a
    // window: the window that was still open at the signal was closed and flushed.
    let raw = read_json_lines(&dir.path().join("raw.jsonl"));
    let windows = read_json_lines(&dir.path().join("windows.jsonl"));
    assert!(raw.len() >= 30, "only {} rows in 1.5 s", raw.len());
    let counted: u64 = windows
        .iter()
        .map(|w| w["n"].as_u64().expect("a count"))
        .sum();
    assert_eq!(counted, raw.len() as u64, "windows: {windows:?}");
}

#[test]
fn sigterm_drains_and_flushes_then_exits_zero() {
    drains_on("TERM");
}

#[test]
fn sigint_drains_and_flushes_then_exits_zero() {
    drains_on("INT");
}
