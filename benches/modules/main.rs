//! What a module costs: W1's pipeline with and without the example echo module (a process
//! module) between its source and its window, at 1k- and 8k-row batches, and each
//! batch's round trip through the module (p50 / p99).
//!
//! `cargo bench --bench modules` runs both pipelines with `weir --threads 1` pinned to
//! one core (the module process inherits the pinning, so it shares that core) over W1's
//! generated input (`MODULES_LINES`, default 2,000,000), best of `MODULES_RUNS` (3)
//! alternating runs each, then times single batches
//! through the module operator in this process. Under `cargo test --benches` it runs a
//! small smoke check and judges nothing. `WEIR_BIN` points it at another `weir` build
//! (the echo module is taken from beside it).

#[path = "../w1/data.rs"]
#[allow(dead_code)]
mod data;
#[path = "../support.rs"]
#[allow(dead_code)]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use data::W1Spec;
use weir_engine::Collector;
use weir_engine::arrow::array::{
    Float64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use weir_engine::arrow::datatypes::SchemaRef;

/// The issue's bound: the echo module may cost at most this share of the throughput at
/// 8k-row batches.
const MAX_COST_AT_8K: f64 = 0.25;
/// Round trips timed per batch size.
const ROUND_TRIPS: usize = 300;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("modules bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let judged = std::env::args().any(|arg| arg == "--bench");
    let lines = support::env_u64("MODULES_LINES", if judged { 2_000_000 } else { 20_000 })?;
    // WEIR_BIN runs another build of `weir` (and the echo module beside it), e.g. a
    // release build measured by a quick debug build of this harness.
    let weir = std::env::var_os("WEIR_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_weir")), PathBuf::from);
    let echo = echo_module(&weir)?;
    let work = support::target_dir(&weir).join("modules-bench");
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let pinned = support::pin_to_cpu0();
    let input = support::ensure_input(
        &work,
        &W1Spec {
            lines,
            ..W1Spec::default()
        },
    )?;

    println!(
        "| batch rows | without the module (rows/s) | with the echo module (rows/s) | cost | target |"
    );
    println!("| ---: | ---: | ---: | ---: | --- |");
    let runs = u32::try_from(support::env_u64("MODULES_RUNS", if judged { 3 } else { 1 })?.max(1))
        .context("MODULES_RUNS is too large")?;
    for batch_rows in [1024usize, 8192] {
        // Runs alternate between the two pipelines, and each keeps its best time, so a
        // burst of load elsewhere on the machine does not decide the comparison.
        let (mut without, mut with) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..runs {
            without = without.min(time_pipeline(&weir, &work, &input, batch_rows, None)?);
            with = with.min(time_pipeline(
                &weir,
                &work,
                &input,
                batch_rows,
                Some(&echo),
            )?);
        }
        let (rate_without, rate_with) = (lines as f64 / without, lines as f64 / with);
        let cost = 1.0 - rate_with / rate_without;
        let target = match (judged, batch_rows) {
            (false, _) => "not judged".to_owned(),
            (true, 8192) if cost <= MAX_COST_AT_8K => {
                format!("<= {:.0} %: met", MAX_COST_AT_8K * 100.0)
            }
            (true, 8192) => format!("<= {:.0} %: MISSED", MAX_COST_AT_8K * 100.0),
            (true, _) => "none".to_owned(),
        };
        println!(
            "| {batch_rows} | {rate_without:.0} | {rate_with:.0} | {:.1} % | {target} |",
            cost * 100.0
        );
    }

    println!();
    println!("| batch rows | round trips | p50 | p99 | rows/s through the module alone |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for batch_rows in [1024usize, 8192] {
        let (p50, p99, rate) = runtime.block_on(round_trips(&echo, &work, batch_rows))?;
        println!(
            "| {batch_rows} | {ROUND_TRIPS} | {:.0} µs | {:.0} µs | {rate:.0} |",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
    if !pinned {
        println!("(could not pin to CPU 0; figures may use more than one core)");
    }
    Ok(())
}

/// The echo module built in the same profile as `weir`, building it when it is missing.
fn echo_module(weir: &Path) -> Result<PathBuf> {
    let echo = weir.with_file_name("weir-echo-module");
    if !echo.exists() {
        let profile = weir
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .unwrap_or("debug");
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args(["build", "-p", "weir-echo-module"]);
        if profile == "release" {
            build.arg("--release");
        }
        let status = build.status().context("cargo runs")?;
        if !status.success() || !echo.exists() {
            bail!("cannot build the echo module: cargo build -p weir-echo-module failed");
        }
    }
    Ok(echo)
}

/// Runs W1's source and window over `input` in `batch_rows` batches, with the echo
/// module between them when `echo` is given; returns the wall time in seconds.
fn time_pipeline(
    weir: &Path,
    work: &Path,
    input: &Path,
    batch_rows: usize,
    echo: Option<&Path>,
) -> Result<f64> {
    let module = match echo {
        Some(echo) => format!(
            "  echo:\n    kind: module\n    inputs: [readings]\n    config: {{command: [\"{}\"], health: {{interval: 1s}}}}\n",
            echo.display()
        ),
        None => String::new(),
    };
    let window_input = if echo.is_some() { "echo" } else { "readings" };
    let pipeline = work.join(format!(
        "pipeline-{batch_rows}-{}.yaml",
        if echo.is_some() { "echo" } else { "plain" }
    ));
    std::fs::write(
        &pipeline,
        format!(
            r#"version: 1
name: modules-bench
sources:
  readings:
    kind: file
    schema: {{device: utf8, ts: timestamp_ms, temperature: float64, humidity: float64}}
    event_time: {{column: ts, max_out_of_order: 1s}}
    config: {{path: "{input}", format: json, batch_rows: {batch_rows}}}
transforms:
{module}  per_device:
    kind: sql
    inputs: [{window_input}]
    window: {{tumbling: 10s}}
    config:
      query: >-
        SELECT device, count(*) AS "count", avg(temperature) AS avg_temperature,
               min(temperature) AS min_temperature, max(temperature) AS max_temperature,
               avg(humidity) AS avg_humidity
        FROM {window_input} GROUP BY device
sinks:
  out:
    kind: blackhole
    inputs: [per_device]
"#,
            input = input.display()
        ),
    )?;
    let started = Instant::now();
    let output = Command::new(weir)
        .args([
            "--threads",
            "1",
            "run",
            "--no-metrics",
            "--progress-interval",
            "0s",
        ])
        .arg(&pipeline)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .context("weir runs")?;
    let seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!(
            "weir failed on {}: {}",
            pipeline.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(seconds)
}

fn schema() -> SchemaRef {
    support::readings_schema("temperature")
}

/// Times `ROUND_TRIPS` batches of `rows` rows through the echo module operator; returns
/// p50, p99 and rows per second.
async fn round_trips(echo: &Path, work: &Path, rows: usize) -> Result<(Duration, Duration, f64)> {
    let batch = RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| format!("dev-{:04}", i % 1000)),
            )),
            Arc::new(TimestampMillisecondArray::from_iter_values(
                (0..rows as i64).map(|i| i * 10),
            )),
            Arc::new(Float64Array::from_iter_values(
                (0..rows).map(|i| 20.0 + (i % 7) as f64),
            )),
        ],
    )?;
    let host = Arc::new(weir_modules::ModuleHost::new(work.to_owned()));
    let factory = weir_modules::ModuleFactory::new(host);
    let config = format!(
        "{{command: [\"{}\"], health: {{interval: 1s}}}}",
        echo.display()
    );
    let mut transform = support::transform(&factory, &config, schema())?;
    let mut out = Collector::new();
    // The first batch waits for the module to start; it is not timed.
    transform.process_batch(0, batch.clone(), &mut out).await?;
    out.take_batches();
    let mut times = Vec::with_capacity(ROUND_TRIPS);
    let started = Instant::now();
    for _ in 0..ROUND_TRIPS {
        let sent = Instant::now();
        transform.process_batch(0, batch.clone(), &mut out).await?;
        times.push(sent.elapsed());
        let answered: usize = out.take_batches().iter().map(|(_, b)| b.num_rows()).sum();
        if answered != rows {
            bail!("the echo module answered {answered} rows for {rows}");
        }
    }
    let rate = (ROUND_TRIPS * rows) as f64 / started.elapsed().as_secs_f64();
    transform.on_close(&mut out).await?;
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.5), at(0.99), rate))
}
