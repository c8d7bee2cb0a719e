//! Golden cases: `tests/golden/<case>/` holds a pipeline, its input and the expected
//! output. `WEIR_BLESS=1` rewrites the expected files from the current binary, except in
//! cases whose expected output a `generate.py` computes independently.

use std::path::Path;

use crate::support::{read_json_lines, repo, text, weir};

/// The batch sizes every case runs at: one row per batch (a watermark after every row),
/// a size that cuts windows at odd places, and the whole input in one batch. Lateness is
/// judged row by row, so all three must give the same output.
const BATCH_SIZES: [&str; 3] = ["1", "7", "8192"];

/// The instances each case's stateful transforms run as (`GOLDEN_PARALLELISM`): rows
/// routed by key to 2 or 4 instances must give what one instance gives.
const PARALLELISMS: [&str; 3] = ["1", "2", "4"];

fn check_case(case: &str) {
    for parallelism in PARALLELISMS {
        for batch_rows in BATCH_SIZES {
            check_case_at(
                case,
                &Run {
                    batch_rows,
                    parallelism,
                },
            );
        }
    }
}

/// How one run of a case is cut.
struct Run<'a> {
    batch_rows: &'a str,
    parallelism: &'a str,
}

impl std::fmt::Display for Run<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "batch_rows {}, parallelism {}",
            self.batch_rows, self.parallelism
        )
    }
}

fn check_case_at(case: &str, run: &Run<'_>) {
    let dir = repo().join("tests/golden").join(case);
    let out = tempfile::tempdir().expect("a temp dir");
    let output = weir()
        .args(["run", "--no-metrics"])
        .arg(dir.join("pipeline.yaml"))
        .env("GOLDEN_OUT", out.path())
        .env("GOLDEN_BATCH_ROWS", run.batch_rows)
        .env("GOLDEN_PARALLELISM", run.parallelism)
        .output()
        .expect("weir runs");
    let (stdout, stderr) = text(&output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{run}: stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    compare(
        &out.path().join("output.jsonl"),
        &dir.join("expected.jsonl"),
        run,
    );
    if dir.join("expected_late.jsonl").exists() {
        compare(
            &out.path().join("late.jsonl"),
            &dir.join("expected_late.jsonl"),
            run,
        );
    }
}

fn compare(actual: &Path, expected: &Path, run: &Run<'_>) {
    // A case with its own generator has an expected output computed independently of
    // Weir; blessing would replace that oracle with Weir's own answer.
    let independent = expected
        .parent()
        .is_some_and(|dir| dir.join("generate.py").exists());
    if std::env::var_os("WEIR_BLESS").is_some() && !independent {
        std::fs::copy(actual, expected).expect("blessing writes the expected file");
        return;
    }
    let actual_rows = read_json_lines(actual);
    let expected_rows = read_json_lines(expected);
    assert_eq!(
        actual_rows,
        expected_rows,
        "at {run}, {} differs from {}",
        actual.display(),
        expected.display()
    );
}

#[test]
fn golden_in_order() {
    check_case("in_order");
}

#[test]
fn golden_out_of_order_within_tolerance() {
    check_case("out_of_order");
}

#[test]
fn golden_late_rows_go_to_the_side_output() {
    check_case("late_rows");
}

#[test]
fn golden_hopping_windows_overlap() {
    check_case("hopping_overlap");
}

#[test]
fn golden_empty_windows_emit_nothing() {
    check_case("empty_windows");
}

#[test]
fn golden_rows_that_jump_back_are_late_row_by_row_at_any_batch_size() {
    check_case("late_mixed");
}

#[test]
fn golden_files_whose_times_overlap_do_not_make_each_other_late() {
    check_case("overlapping_files");
}

#[test]
fn golden_anomaly_zscore_follows_the_rule_over_window_aggregates() {
    check_case("anomaly_zscore");
}
