//! `weir outbox check` on a sound outbox and on one cut short.

use std::sync::Arc;

use weir_engine::arrow::array::Int64Array;
use weir_engine::arrow::datatypes::{DataType, Field, Schema};
use weir_engine::arrow::record_batch::RecordBatch;
use weir_outbox::{Limits, Outbox};

use crate::support::{run, text};

#[test]
fn outbox_check_reports_what_is_there_and_what_a_damaged_file_would_keep() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("outbox.redb");
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    {
        let (outbox, _) = Outbox::open(&path, Limits::default()).expect("opens");
        outbox.register("plant/hub", 5).expect("registers");
        for i in 0..3 {
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from_iter_values(i * 10..i * 10 + 10))],
            )
            .expect("a batch");
            outbox
                .append("plant/hub", &[batch], 1_800_000_000_000)
                .expect("appends");
        }
    }
    let file = path.to_str().expect("utf-8");
    let output = run(&["outbox", "check", file]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains(": sound; 3 batches, 30 rows"), "{stdout}");
    let line = stdout
        .lines()
        .find(|line| line.starts_with("plant/hub"))
        .expect("a line for the stream");
    assert_eq!(
        line.split_whitespace().take(4).collect::<Vec<_>>(),
        ["plant/hub", "5", "3", "30"]
    );

    let bytes = std::fs::read(&path).expect("reads");
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).expect("cuts");
    let output = run(&["outbox", "check", file]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("damaged") && stderr.contains("would keep 3 intact batches (30 rows)"),
        "{stderr}"
    );
    // Checking changed nothing: the file is still the cut one.
    assert_eq!(
        std::fs::read(&path).expect("reads").len(),
        bytes.len() - 1000
    );
}

/// Every window of a generated hour, shipped through a `hub` sink to a directory.
fn windows_pipeline(dir: &std::path::Path) -> std::path::PathBuf {
    let file = dir.join("ship.yaml");
    std::fs::write(
        &file,
        r#"version: 1
name: plant
sources:
  readings:
    kind: generator
    config:
      devices: 5
      interval: 1s
      count: 18000
      realtime: false
      start: 2026-01-01T00:00:00Z
      batch_rows: 500
      fields:
        temperature: {shape: sine, base: 60, amplitude: 5, period: 10m}
    event_time: {column: ts}
transforms:
  per_minute:
    kind: sql
    inputs: [readings]
    window: {tumbling: 1m}
    config:
      query: SELECT device, count(*) AS n, avg(temperature) AS avg_t FROM readings GROUP BY device
sinks:
  uplink:
    kind: hub
    inputs: [per_minute]
    config: {priority: 1}
"#,
    )
    .expect("writes the pipeline");
    file
}

/// Runs `pipeline` shipping to the directory `ship` from `outbox`.
fn run_shipping(
    pipeline: &std::path::Path,
    ship: &std::path::Path,
    outbox: &std::path::Path,
) -> std::process::Output {
    run(&[
        "run",
        pipeline.to_str().unwrap(),
        "--no-metrics",
        "--ship-dir",
        ship.to_str().unwrap(),
        "--outbox",
        outbox.to_str().unwrap(),
    ])
}

/// Runs [`windows_pipeline`] with `extra` flags while its uplink is down (a "directory"
/// under a plain file cannot be created), so everything stays in `outbox`.
fn run_with_the_uplink_down(
    dir: &std::path::Path,
    outbox: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let file = windows_pipeline(dir);
    let blocked = dir.join("not-a-dir");
    std::fs::write(&blocked, b"").expect("writes");
    let mut args = vec![
        "run".to_owned(),
        file.display().to_string(),
        "--no-metrics".to_owned(),
        "--ship-dir".to_owned(),
        blocked.join("shipped").display().to_string(),
        "--outbox".to_owned(),
        outbox.display().to_string(),
        "--shutdown-timeout".to_owned(),
        "1s".to_owned(),
    ];
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&args)
}

/// A pipeline of the same name and sink as [`windows_pipeline`] that produces nothing:
/// running it lets the shipper drain what an earlier run left in the outbox.
fn drain_pipeline(dir: &std::path::Path) -> std::path::PathBuf {
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, b"").expect("writes");
    let drain = dir.join("drain.yaml");
    std::fs::write(
        &drain,
        format!(
            r#"version: 1
name: plant
sources:
  nothing:
    kind: file
    schema: {{device: utf8}}
    config: {{path: "{}", format: json}}
sinks:
  uplink:
    kind: hub
    inputs: [nothing]
"#,
            empty.display()
        ),
    )
    .expect("writes");
    drain
}

/// The (device, window start) of every row shipped to `dir`, with each row's count.
fn shipped_windows(dir: &std::path::Path) -> Vec<(String, i64, i64)> {
    use weir_engine::arrow::array::{AsArray, TimestampMillisecondArray};
    use weir_engine::arrow::datatypes::Int64Type;
    let mut rows = Vec::new();
    let stream = dir.join("plant/uplink");
    let mut files: Vec<_> = std::fs::read_dir(&stream)
        .expect("the stream's directory")
        .map(|entry| entry.expect("an entry").path())
        .collect();
    files.sort();
    for file in files {
        let bytes = std::fs::read(&file).expect("reads a batch");
        let (_, batches) = weir_outbox::frame::decode_batches(&bytes).expect("Arrow IPC");
        for batch in batches {
            let starts = batch
                .column_by_name("window_start")
                .expect("window_start")
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .expect("ms timestamps");
            let devices = batch
                .column_by_name("device")
                .expect("device")
                .as_string::<i32>();
            let counts = batch
                .column_by_name("n")
                .expect("n")
                .as_primitive::<Int64Type>();
            for i in 0..batch.num_rows() {
                rows.push((
                    devices.value(i).to_owned(),
                    starts.value(i),
                    counts.value(i),
                ));
            }
        }
    }
    rows
}

#[test]
fn a_hub_sink_ships_every_window_exactly_once_through_its_outbox() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = windows_pipeline(dir.path());
    let ship = dir.path().join("shipped");
    let outbox = dir.path().join("outbox.redb");
    let output = run_shipping(&file, &ship, &outbox);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let mut windows = shipped_windows(&ship);
    windows.sort();
    // 18,000 readings of 5 devices: an hour each, 60 one-minute windows of 60 readings.
    assert_eq!(windows.len(), 300);
    let expected: Vec<(String, i64, i64)> = (0..5)
        .flat_map(|device| {
            (0..60).map(move |minute| {
                (
                    format!("dev-{device:04}"),
                    1_767_225_600_000 + minute * 60_000,
                    60,
                )
            })
        })
        .collect();
    assert_eq!(windows, expected);
    // Shipped and acknowledged: the outbox is empty.
    let output = run(&["outbox", "check", outbox.to_str().unwrap()]);
    let (stdout, _) = text(&output);
    assert!(stdout.contains("sound; 0 batches, 0 rows"), "{stdout}");
}

#[test]
fn a_hub_sink_with_nowhere_to_ship_says_how_to_give_it_somewhere() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = windows_pipeline(dir.path());
    let output = run(&["run", file.to_str().unwrap(), "--no-metrics"]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the hub sink has nowhere to ship") && stderr.contains("--ship-dir"),
        "{stderr}"
    );
}

#[test]
fn a_full_outbox_drops_exactly_its_oldest_windows_and_ships_the_rest_later() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let outbox = dir.path().join("outbox.redb");
    let output = run_with_the_uplink_down(dir.path(), &outbox, &["--outbox-max-bytes", "16KiB"]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("the outbox is full"), "{stderr}");
    assert!(stderr.contains("still in the outbox"), "{stderr}");
    let check = run(&["outbox", "check", outbox.to_str().unwrap()]);
    let (stdout, _) = text(&check);
    let kept_rows: usize = stdout
        .split(" rows")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|rows| rows.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    // Each window is one row per device; some went, some stayed.
    assert!(
        kept_rows > 0 && kept_rows < 300 && kept_rows.is_multiple_of(5),
        "{stdout}"
    );

    // The uplink comes back; a pipeline of the same name and sink that produces nothing
    // new lets the shipper drain what was kept.
    let drain = drain_pipeline(dir.path());
    let ship = dir.path().join("shipped");
    let output = run_shipping(&drain, &ship, &outbox);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let mut windows = shipped_windows(&ship);
    windows.sort_by_key(|(device, start, _)| (*start, device.clone()));
    assert_eq!(windows.len(), kept_rows, "exactly what the outbox kept");
    // Oldest first: what is missing is the earliest windows, and nothing after them.
    let last = 1_767_225_600_000 + 59 * 60_000;
    let first_kept = last - (kept_rows as i64 / 5 - 1) * 60_000;
    let expected: Vec<(String, i64, i64)> = (0..kept_rows as i64 / 5)
        .flat_map(|minute| {
            (0..5).map(move |device| (format!("dev-{device:04}"), first_kept + minute * 60_000, 60))
        })
        .collect();
    assert_eq!(windows, expected);
}

#[test]
fn an_outbox_cut_at_a_random_byte_still_starts_and_ships_what_is_intact() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().expect("a temp dir");
    let outbox = dir.path().join("outbox.redb");
    let output = run_with_the_uplink_down(dir.path(), &outbox, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output).1);
    // A power cut tore the file: it ends at a random byte.
    let bytes = std::fs::read(&outbox).expect("reads");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let cut = rng.random_range(bytes.len() / 4..bytes.len() - 1);
    std::fs::write(&outbox, &bytes[..cut]).expect("cuts");

    let ship = dir.path().join("shipped");
    let output = run_shipping(&drain_pipeline(dir.path()), &ship, &outbox);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("the outbox was damaged"), "{stderr}");
    // It starts, and ships exactly what was intact: rows of the hour, each once, as
    // many as the recovery said it kept.
    let kept: usize = stderr
        .split("intact batches (")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|rows| rows.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    let windows = shipped_windows(&ship);
    let mut distinct = windows.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), windows.len(), "a window shipped twice");
    assert_eq!(windows.len(), kept, "{stderr}");
    assert!(kept > 0, "{stderr}");
    assert!(windows.iter().all(|(_, start, n)| {
        *n == 60 && (1_767_225_600_000..1_767_225_600_000 + 3_600_000).contains(start)
    }));
}
