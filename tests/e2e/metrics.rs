//! `/metrics` serves the documented series with the right values.

use std::time::{Duration, Instant};

use crate::support::{Running, http_get, metric_value, repo};

#[test]
fn metrics_report_rows_drops_latency_depth_and_state_per_operator() {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::copy(
        repo().join("pipelines/examples/data/sensors.jsonl"),
        dir.path().join("sensors.jsonl"),
    )
    .expect("copies the sample data");
    let file = dir.path().join("follow.yaml");
    std::fs::write(
        &file,
        "\
version: 1
name: follow
sources:
  readings:
    kind: file
    schema: {device: utf8, ts: timestamp_ms, temperature: float64, humidity: \"float64?\"}
    event_time: {column: ts, max_out_of_order: 1s}
    config: {path: sensors.jsonl, format: json, follow: true, poll_interval: 50ms}
transforms:
  warm:
    kind: sql
    inputs: [readings]
    config: {query: \"SELECT device, temperature FROM readings WHERE temperature > 70\"}
sinks:
  out:
    kind: file
    inputs: [warm]
    config: {path: out.jsonl, format: json}
",
    )
    .expect("writes the pipeline");
    // The address comes from the environment variable; port 0 picks a free port.
    let mut weir = Running::start(
        &["run", file.to_str().unwrap()],
        &[("WEIR_METRICS_ADDR", "127.0.0.1:0")],
    );
    let addr = weir.metrics_addr();

    let op = |name: &'static str| [("pipeline", "follow"), ("operator", name)];
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let body = http_get(&addr, "/metrics");
        let read = metric_value(&body, "weir_operator_rows_out_total", &op("readings"));
        if read == Some(240.0) || Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        metric_value(&body, "weir_operator_rows_out_total", &op("readings")),
        Some(240.0),
        "{body}"
    );
    assert_eq!(
        metric_value(&body, "weir_operator_rows_in_total", &op("warm")),
        Some(240.0),
        "{body}"
    );
    let dropped = [
        ("pipeline", "follow"),
        ("operator", "readings"),
        ("reason", "malformed"),
    ];
    assert_eq!(
        metric_value(&body, "weir_operator_dropped_rows_total", &dropped),
        Some(2.0),
        "{body}"
    );
    let rejected = [
        ("pipeline", "follow"),
        ("operator", "readings"),
        ("reason", "bad_line"),
    ];
    assert_eq!(
        metric_value(&body, "weir_operator_rejected_rows_total", &rejected),
        Some(2.0),
        "{body}"
    );
    let warm_out =
        metric_value(&body, "weir_operator_rows_out_total", &op("warm")).expect("warm emits");
    assert_eq!(
        metric_value(&body, "weir_operator_rows_in_total", &op("out")),
        Some(warm_out)
    );
    assert!(
        metric_value(&body, "weir_operator_batches_in_total", &op("out")).unwrap_or(0.0) >= 1.0
    );
    assert!(
        metric_value(&body, "weir_operator_processing_seconds_count", &op("warm")).unwrap_or(0.0)
            >= 1.0,
        "{body}"
    );
    assert!(
        body.contains("weir_operator_processing_seconds_bucket{"),
        "{body}"
    );
    assert!(body.contains("weir_operator_errors_total{"), "{body}");
    let depth = [
        ("pipeline", "follow"),
        ("operator", "warm"),
        ("input", "readings"),
    ];
    assert_eq!(
        metric_value(&body, "weir_channel_depth", &depth),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        metric_value(&body, "weir_pipeline_running", &[("pipeline", "follow")]),
        Some(1.0)
    );
    assert!(
        metric_value(&body, "weir_operator_watermark_milliseconds", &op("warm")).unwrap_or(0.0)
            > 1.7e12,
        "the watermark follows the event times: {body}"
    );
    assert_eq!(http_get(&addr, "/healthz").trim(), "ok");

    weir.signal("TERM");
    assert_eq!(weir.wait_exit(Duration::from_secs(15)), Some(0));
}
