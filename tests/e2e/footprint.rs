//! What an idle `weir run` keeps resident: its start-up code is unmapped once the
//! pipelines run, and they go on running from the pages that fault back in.

use std::time::{Duration, Instant};

use crate::support::{Running, http_get, metric_value};

/// A realtime generator into one-second windows: each second exercises the code a
/// pipeline keeps running (a window closing, its aggregate finishing).
const PIPELINE: &str = r#"version: 1
name: idle
sources:
  readings:
    kind: generator
    config:
      devices: 10
      interval: 100ms
      realtime: true
      fields:
        temperature: {shape: sine, base: 60, amplitude: 5, period: 1m}
    event_time: {column: ts, max_out_of_order: 100ms}
transforms:
  per_device:
    kind: sql
    inputs: [readings]
    window: {tumbling: 1s}
    config:
      query: SELECT device, count(*) AS readings, avg(temperature) AS avg_t FROM readings GROUP BY device
sinks:
  drop:
    kind: blackhole
    inputs: [per_device]
"#;

/// The kB of one field of `/proc/PID/status`.
fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("a live process");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Windows the pipeline of the runtime at `addr` has emitted so far.
fn windows_out(addr: &str) -> f64 {
    let body = http_get(addr, "/metrics");
    metric_value(
        &body,
        "weir_operator_rows_out_total",
        &[("pipeline", "idle"), ("operator", "per_device")],
    )
    .unwrap_or(0.0)
}

#[test]
fn an_idle_pipeline_keeps_only_the_code_it_runs_mapped_and_keeps_running() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("idle.yaml");
    std::fs::write(&file, PIPELINE).expect("writes the pipeline");
    let start = |state: &str, extra: &[&str]| {
        let state_dir = dir.path().join(state);
        let mut args = vec![
            "run",
            file.to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:0",
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--progress-interval",
            "0s",
        ];
        args.extend_from_slice(extra);
        Running::start(&args, &[("RUST_LOG", "info,weir::start_up=debug")])
    };
    let mut unmapped = start("unmapped", &[]);
    let mut kept = start("kept", &["--keep-start-up-code"]);
    let unmapped_addr = unmapped.metrics_addr();
    let kept_addr = kept.metrics_addr();
    let line = unmapped
        .wait_for_log("unmapped ", Duration::from_secs(30))
        .expect("the runtime unmaps its start-up code once the pipeline runs");
    assert!(line.contains("MiB of start-up code"), "{line}");
    assert!(
        kept.wait_for_log("pipeline started", Duration::from_secs(30))
            .is_some()
    );

    // The unmapped runtime goes on closing windows from the code that faults back in.
    let windows_then = windows_out(&unmapped_addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    while windows_out(&unmapped_addr) < windows_then + 20.0 || windows_out(&kept_addr) < 20.0 {
        assert!(
            Instant::now() < deadline,
            "the pipelines stopped closing windows"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Both have run the same windows; the one that unmapped its start-up code holds far
    // fewer pages of its binary (in a debug build about half; 14 of 26 MiB in `dist`).
    let unmapped_kb = status_kb(unmapped.child.id(), "RssFile:");
    let kept_kb = status_kb(kept.child.id(), "RssFile:");
    assert!(
        unmapped_kb * 4 < kept_kb * 3,
        "file-backed RSS {unmapped_kb} kB with start-up code unmapped, {kept_kb} kB kept"
    );
    unmapped.signal("TERM");
    assert_eq!(unmapped.wait_exit(Duration::from_secs(20)), Some(0));
    kept.signal("TERM");
    assert_eq!(kept.wait_exit(Duration::from_secs(20)), Some(0));
}
