//! End-to-end W1 on small data: the real `weir` binary runs `benches/w1/pipeline.yaml` and
//! its output must equal the hand-written reference aggregate, on ordered input and on input
//! shuffled within the pipeline's declared out-of-orderness.
//!
//! The generator and the reference are the benchmark's own (`benches/w1/`), so the test and
//! the benchmark cannot drift apart; their unit tests run as part of this test binary.

// The benchmark uses a few helpers this test does not (and the other way round).
#[allow(dead_code)]
#[path = "../benches/w1/data.rs"]
mod data;
#[allow(dead_code)]
#[path = "../benches/w1/figures.rs"]
mod figures;
#[allow(dead_code)]
#[path = "../benches/w1/reference.rs"]
mod reference;

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use data::{W1_EPOCH_MS, W1Spec};
use reference::{REL_TOLERANCE, WINDOW_MS, WindowRow};

/// 50 devices x 20 readings/s x 30 s: three full windows, small enough for a debug build.
fn small_spec(shuffle_within_ms: u64) -> W1Spec {
    W1Spec {
        devices: 50,
        readings_per_device_per_second: 20,
        lines: 50 * 20 * 30,
        seed: 7,
        shuffle_within_ms,
    }
}

fn pipeline() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/w1/pipeline.yaml")
}

fn write_input(spec: &W1Spec, path: &Path) {
    let mut out = BufWriter::new(File::create(path).unwrap());
    spec.write_to(&mut out).unwrap();
}

/// Runs the W1 pipeline with the real binary on one thread and returns its output rows.
fn run_weir(input: &Path, output: &Path) -> Vec<WindowRow> {
    run_weir_on(input, output, 1, "auto")
}

/// Runs the W1 pipeline on `threads` worker threads, its window and detector as
/// `parallelism` instances, and returns its output rows.
fn run_weir_on(input: &Path, output: &Path, threads: usize, parallelism: &str) -> Vec<WindowRow> {
    let result = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["--threads", &threads.to_string(), "run", "--no-metrics"])
        .arg(pipeline())
        .env("W1_PARALLELISM", parallelism)
        .env("W1_INPUT", input)
        .env("W1_OUTPUT", output)
        .env("WEIR_STATE_DIR", output.with_extension("state"))
        .output()
        .expect("cannot start weir");
    assert!(
        result.status.success(),
        "weir failed ({}):\nstdout:\n{}\nstderr:\n{}",
        result.status,
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    reference::read_rows_file(output).unwrap()
}

fn assert_same(expected: &[WindowRow], actual: &[WindowRow], what: &str) {
    if let Err(mismatch) = reference::compare(expected, actual, REL_TOLERANCE) {
        panic!("{what}: {mismatch}");
    }
}

#[test]
fn weir_output_equals_the_reference_aggregate() {
    let dir = tempfile::tempdir().unwrap();
    let spec = small_spec(0);
    let input = dir.path().join("readings.jsonl");
    write_input(&spec, &input);

    let expected = reference::aggregate_file(&input, WINDOW_MS).unwrap();
    // Guard the reference itself: 50 devices x 3 windows, each with 20/s x 10 s readings.
    assert_eq!(expected.len(), 150);
    assert!(expected.iter().all(|row| row.count == 200));
    assert_eq!(expected[0].window_start, W1_EPOCH_MS);
    assert_eq!(expected[149].window_end, W1_EPOCH_MS + 30_000);

    let actual = run_weir(&input, &dir.path().join("out.jsonl"));
    assert_same(&expected, &actual, "weir vs reference");
}

#[test]
fn input_shuffled_within_one_second_gives_the_same_output() {
    let dir = tempfile::tempdir().unwrap();
    let ordered = dir.path().join("ordered.jsonl");
    let shuffled = dir.path().join("shuffled.jsonl");
    write_input(&small_spec(0), &ordered);
    write_input(&small_spec(1000), &shuffled);
    assert_ne!(
        fs::read(&ordered).unwrap(),
        fs::read(&shuffled).unwrap(),
        "the shuffled input must differ from the ordered one"
    );

    let from_ordered = run_weir(&ordered, &dir.path().join("ordered.out.jsonl"));
    let from_shuffled = run_weir(&shuffled, &dir.path().join("shuffled.out.jsonl"));
    // Averages may differ in their last bits (rows are summed in another order); every
    // key, count, min and max must be exactly equal.
    assert_same(&from_ordered, &from_shuffled, "shuffled vs ordered input");
    assert_eq!(
        from_shuffled.len(),
        150,
        "no window may be lost to lateness"
    );
    let exact = |rows: &[WindowRow]| {
        let mut keys: Vec<_> = rows
            .iter()
            .map(|r| {
                let bits = (r.min_temperature.to_bits(), r.max_temperature.to_bits());
                (
                    r.device.clone(),
                    r.window_start,
                    r.window_end,
                    r.count,
                    bits,
                )
            })
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(exact(&from_ordered), exact(&from_shuffled));
    let expected = reference::aggregate_file(&shuffled, WINDOW_MS).unwrap();
    assert_same(
        &expected,
        &from_shuffled,
        "weir vs reference on shuffled input",
    );
}

#[test]
fn weir_output_is_the_same_at_any_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("readings.jsonl");
    write_input(&small_spec(1000), &input);
    let expected = reference::aggregate_file(&input, WINDOW_MS).unwrap();
    // Two threads decode chunks in the background and run `auto` as two instances; four
    // instances share two threads.
    for (threads, parallelism) in [(2, "auto"), (2, "4"), (1, "2")] {
        let output = dir
            .path()
            .join(format!("out-{threads}-{parallelism}.jsonl"));
        let actual = run_weir_on(&input, &output, threads, parallelism);
        assert_same(
            &expected,
            &actual,
            &format!("{threads} threads, parallelism {parallelism}"),
        );
    }
}
