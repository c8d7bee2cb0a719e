//! Anomaly detector throughput: rows per second through the real `anomaly` transform, one
//! detector configuration at a time, on one core.
//!
//! `cargo bench --bench anomaly` plans each configuration through the built-in registry,
//! as a pipeline would, and feeds it batches of 8192 rows from 1000 series (keys
//! `dev-0000`..), timing only the transform. The process pins itself to CPU 0 first.
//! Under `cargo test --benches` it runs a small smoke check and judges nothing.

#[path = "../w1/data.rs"]
#[allow(dead_code)]
mod data;
#[path = "../support.rs"]
#[allow(dead_code)]
mod support;

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use weir_engine::arrow::array::{
    Float64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use weir_engine::arrow::datatypes::SchemaRef;
use weir_engine::registry::Role;
use weir_engine::{Collector, Transform, Watermark};

/// Rows per configuration under `cargo bench`.
const BENCH_ROWS: usize = 10_000_000;
/// Rows per configuration under `cargo test --benches`.
const SMOKE_ROWS: usize = 400_000;
const BATCH_ROWS: usize = 8192;
const SERIES: usize = 1000;

/// (name, config, target rows/s): the detectors, and the throughput floor each must keep
/// (issue 4 sets floors for `zscore`, `ewma`, `mad` and the default detector).
const CONFIGS: &[(&str, &str, Option<f64>)] = &[
    (
        "zscore (all earlier values)",
        "{value: v, key: device, detector: zscore}",
        Some(2_000_000.0),
    ),
    (
        "zscore (last 100 values)",
        "{value: v, key: device, detector: zscore, zscore: {window_rows: 100}}",
        Some(2_000_000.0),
    ),
    (
        "ewma (alpha 0.1)",
        "{value: v, key: device, detector: ewma}",
        Some(2_000_000.0),
    ),
    (
        "mad (last 100 values)",
        "{value: v, key: device, detector: mad}",
        Some(2_000_000.0),
    ),
    (
        "default (ensemble: forecast + likelihood + onset, range)",
        "{value: v, key: device, time: ts}",
        Some(200_000.0),
    ),
    (
        "forecast (daily season)",
        "{value: v, key: device, time: ts, detector: forecast}",
        None,
    ),
    ("range", "{value: v, key: device, detector: range}", None),
    (
        "iforest (50 trees of 128, shingle 4)",
        "{value: v, key: device, detector: iforest}",
        None,
    ),
];

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("anomaly bench: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let judged = std::env::args().any(|arg| arg == "--bench");
    let rows = if judged { BENCH_ROWS } else { SMOKE_ROWS };
    let pinned = support::pin_to_cpu0();
    let batches = batches(rows);
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    println!("| detector | rows | seconds | rows/s | target |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, config, target) in CONFIGS {
        let mut transform = transform(config)?;
        let started = Instant::now();
        let flagged = runtime.block_on(async {
            let mut flagged = 0usize;
            let mut out = Collector::new();
            for batch in &batches {
                transform.process_batch(0, batch.clone(), &mut out).await?;
                flagged += count_flags(&mut out);
            }
            transform.on_watermark(Watermark::END, &mut out).await?;
            flagged += count_flags(&mut out);
            Ok::<_, weir_engine::OperatorError>(flagged)
        })?;
        let elapsed = started.elapsed();
        let rate = rows as f64 / elapsed.as_secs_f64();
        println!(
            "| {name} | {rows} | {:.3} | {rate:.0} | {} |",
            elapsed.as_secs_f64(),
            match target {
                _ if !judged => "not judged".to_owned(),
                None => "none".to_owned(),
                Some(target) if rate >= *target => format!(">= {target:.0}: met"),
                Some(target) => format!(">= {target:.0}: MISSED"),
            }
        );
        if flagged == 0 {
            bail!("{name} flagged nothing: the data has spikes, so the detector is not running");
        }
    }
    if !pinned {
        println!("(could not pin to CPU 0; figures may use more than one core)");
    }
    Ok(())
}

fn schema() -> SchemaRef {
    support::readings_schema("v")
}

/// `rows` rows in batches: each series a noisy level with an occasional spike.
fn batches(rows: usize) -> Vec<RecordBatch> {
    let names: Vec<String> = (0..SERIES).map(|i| format!("dev-{i:04}")).collect();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..rows)
        .step_by(BATCH_ROWS)
        .map(|start| {
            let n = BATCH_ROWS.min(rows - start);
            let devices: Vec<&str> = (start..start + n)
                .map(|i| names[i % SERIES].as_str())
                .collect();
            let ts: Vec<i64> = (start..start + n)
                .map(|i| (i / SERIES) as i64 * 10)
                .collect();
            let values: Vec<f64> = (start..start + n)
                .map(|i| {
                    let spike = if i % 9973 == 0 { 50.0 } else { 0.0 };
                    20.0 + (i % SERIES) as f64 * 0.01 + next() + spike
                })
                .collect();
            RecordBatch::try_new(
                schema(),
                vec![
                    Arc::new(StringArray::from(devices)),
                    Arc::new(TimestampMillisecondArray::from(ts)),
                    Arc::new(Float64Array::from(values)),
                ],
            )
            .expect("columns match the schema")
        })
        .collect()
}

/// Plans and instantiates an `anomaly` transform from a YAML `config`, as a pipeline does.
fn transform(config: &str) -> Result<Box<dyn Transform>> {
    let registry = weir_operators::registry::builtin();
    let factory = registry
        .get(Role::Transform, "anomaly")
        .context("anomaly is registered")?;
    support::transform(factory.as_ref(), config, schema())
}

/// Rows flagged in what the transform emitted, emptying the collector.
fn count_flags(out: &mut Collector) -> usize {
    out.take_batches()
        .iter()
        .map(|(_, batch)| {
            batch
                .column_by_name("is_anomaly")
                .and_then(|c| {
                    c.as_any()
                        .downcast_ref::<weir_engine::arrow::array::BooleanArray>()
                })
                .map_or(0, |flags| flags.true_count())
        })
        .sum()
}
