//! A folder in, a folder out: a `file` source over a glob pattern names each row's file,
//! and a `file` sink with a `{file}` path template writes every input file's rows to the
//! file of the same relative path (the Numenta Anomaly Benchmark layout).

use std::path::Path;

use crate::support::{text, weir};

const PIPELINE: &str = "\
version: 1
name: per-file
sources:
  series:
    kind: file
    schema: {timestamp: utf8, value: float64}
    config: {path: \"data/**/*.csv\", format: csv, file_column: file}
transforms:
  score:
    kind: sql
    inputs: [series]
    config:
      query: SELECT file, timestamp, value * 2 AS anomaly_score FROM series
sinks:
  out:
    kind: file
    inputs: [score]
    config: {path: \"out/{file}\", format: csv}
";

/// The input files: relative path and `(timestamp, value)` rows.
fn inputs() -> Vec<(&'static str, Vec<(String, f64)>)> {
    let series = |start: usize, rows: usize, scale: f64| {
        (start..start + rows)
            .map(|i| (format!("2014-04-01 00:{:02}:00", i % 60), i as f64 * scale))
            .collect::<Vec<_>>()
    };
    vec![
        ("realKnownCause/nyc_taxi.csv", series(0, 50, 1.5)),
        (
            "realKnownCause/machine_temperature.csv",
            series(10, 7, -0.25),
        ),
        ("artificialNoAnomaly/flat.csv", series(0, 3, 0.0)),
    ]
}

fn write_input(dir: &Path, name: &str, rows: &[(String, f64)]) {
    let path = dir.join("data").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut text = "timestamp,value\n".to_owned();
    for (timestamp, value) in rows {
        text.push_str(&format!("{timestamp},{value}\n"));
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_folder_of_csv_files_is_written_back_out_one_file_per_input_file() {
    let dir = tempfile::tempdir().expect("a temp dir");
    for (name, rows) in inputs() {
        write_input(dir.path(), name, &rows);
    }
    let pipeline = dir.path().join("per-file.yaml");
    std::fs::write(&pipeline, PIPELINE).unwrap();
    let output = weir()
        .args(["run", "--no-metrics"])
        .arg(&pipeline)
        .output()
        .expect("weir runs");
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let mut written = 0;
    for (name, rows) in inputs() {
        let path = dir.path().join("out").join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("timestamp,anomaly_score"), "{name}");
        let got: Vec<(String, f64)> = lines
            .map(|line| {
                let (timestamp, score) = line.split_once(',').expect("two fields");
                (timestamp.to_owned(), score.parse().expect("a number"))
            })
            .collect();
        let expected: Vec<(String, f64)> = rows.into_iter().map(|(t, v)| (t, v * 2.0)).collect();
        assert_eq!(got, expected, "{name}: every row, in the input's order");
        written += 1;
    }
    let outputs = std::fs::read_dir(dir.path().join("out/realKnownCause"))
        .unwrap()
        .count();
    assert_eq!((written, outputs), (3, 2), "no other files were written");
}
