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
