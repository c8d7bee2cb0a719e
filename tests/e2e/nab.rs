//! `benches/nab/run.sh` end to end: the NAB pipeline (`benches/nab/detector.yaml`, the
//! default detector) over a folder of NAB-layout series writes one result file per
//! series, row for row, and its scores single out the anomaly it should.

use std::path::Path;

use weir_testkit::noise;

use crate::support::{repo, test_state_dir, text};

const START_MS: i64 = 1_396_310_400_000; // 2014-04-01 00:00:00 UTC
const FIVE_MINUTES_MS: i64 = 300_000;
const ROWS: usize = 2016; // one week of 5-minute readings
const SPIKE_ROW: usize = 1800;

/// `YYYY-MM-DD HH:MM:SS` of a time in April 2014 (NAB's timestamp format).
fn timestamp(ms: i64) -> String {
    let seconds = (ms - START_MS) / 1000;
    let (day, rest) = (seconds / 86_400, seconds % 86_400);
    format!(
        "2014-04-{:02} {:02}:{:02}:{:02}",
        day + 1,
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// (relative path, values): a daily cycle with noise and one spike far above anything
/// before it, and bounded noise around a constant with no anomaly at all.
fn series() -> Vec<(&'static str, Vec<f64>)> {
    let daily = (0..ROWS)
        .map(|i| {
            let hour = (i % 288) as f64 / 12.0;
            let cycle = 50.0 + 20.0 * (hour / 24.0 * std::f64::consts::TAU).sin();
            let spike = if i == SPIKE_ROW { 100.0 } else { 0.0 };
            cycle + noise(i as u64, 1) * 2.0 + spike
        })
        .collect();
    let calm = (0..ROWS).map(|i| 10.0 + noise(i as u64, 2)).collect();
    vec![
        ("realKnownCause/daily_with_spike.csv", daily),
        ("artificialNoAnomaly/calm.csv", calm),
    ]
}

fn write_series(data: &Path, name: &str, values: &[f64]) {
    let path = data.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut text = "timestamp,value\n".to_owned();
    for (i, value) in values.iter().enumerate() {
        let ts = timestamp(START_MS + i as i64 * FIVE_MINUTES_MS);
        text.push_str(&format!("{ts},{value}\n"));
    }
    std::fs::write(path, text).unwrap();
}

/// NAB's canonical timestamp text: `T` as a space, no `Z`.
fn canonical(ts: &str) -> String {
    ts.replace('T', " ").trim_end_matches('Z').to_owned()
}

#[test]
fn run_sh_scores_every_series_row_for_row_and_singles_out_the_spike() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (data, out) = (dir.path().join("data"), dir.path().join("out"));
    for (name, values) in series() {
        write_series(&data, name, &values);
    }
    let output = std::process::Command::new(repo().join("benches/nab/run.sh"))
        .arg(&data)
        .arg(&out)
        .env("WEIR_BIN", env!("CARGO_BIN_EXE_weir"))
        .env("WEIR_STATE_DIR", test_state_dir())
        .output()
        .expect("run.sh runs");
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("wrote 2 result files"), "{stderr}");
    for (name, values) in series() {
        let written = std::fs::read_to_string(out.join(name))
            .unwrap_or_else(|e| panic!("no result file for {name}: {e}"));
        let mut lines = written.lines();
        assert_eq!(lines.next(), Some("timestamp,anomaly_score"), "{name}");
        let rows: Vec<(String, f64)> = lines
            .map(|line| {
                let (ts, score) = line.split_once(',').expect("two fields");
                (canonical(ts), score.parse().expect("a number"))
            })
            .collect();
        assert_eq!(rows.len(), values.len(), "{name}: one row per input row");
        for (i, (ts, score)) in rows.iter().enumerate() {
            assert_eq!(
                *ts,
                timestamp(START_MS + i as i64 * FIVE_MINUTES_MS),
                "{name}: row {i} in input order"
            );
            assert!(
                (0.0..=1.0).contains(score),
                "{name}: row {i} scores {score}"
            );
        }
        // After the first day (NAB's probation is 15 %), what stands out.
        let (top_row, top) = rows
            .iter()
            .enumerate()
            .skip(288)
            .map(|(i, (_, score))| (i, *score))
            .fold(
                (0, f64::MIN),
                |best, row| if row.1 > best.1 { row } else { best },
            );
        if name.contains("spike") {
            assert_eq!((top_row, top), (SPIKE_ROW, 1.0), "{name}");
        } else {
            assert!(
                top < 0.5,
                "{name}: a calm series peaks at {top} (row {top_row})"
            );
        }
    }
}
