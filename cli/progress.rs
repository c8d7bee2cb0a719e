//! Periodic progress lines for long runs: rows read by the sources and written by the
//! sinks of each pipeline, with the rate since the last line.

use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;
use tracing::info;
use weir_engine::Role;
use weir_engine::metrics::EngineMetrics;
use weir_pipelines::ValidatedPipeline;

/// The counters that make up one pipeline's progress.
#[derive(Clone)]
pub struct PipelineProgress {
    name: String,
    read: Vec<IntCounter>,
    written: Vec<IntCounter>,
}

impl PipelineProgress {
    /// Resolves the source and sink counters of `pipeline`.
    pub fn new(pipeline: &ValidatedPipeline, metrics: &EngineMetrics) -> Self {
        let mut read = Vec::new();
        let mut written = Vec::new();
        for node in pipeline.nodes() {
            let series = metrics.operator(pipeline.name(), node.name());
            match node.role() {
                Role::Source => read.push(series.rows_out),
                Role::Sink => written.push(series.rows_in),
                Role::Transform => {}
            }
        }
        PipelineProgress {
            name: pipeline.name().to_owned(),
            read,
            written,
        }
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Rows read by all sources and rows written by all sinks so far.
    pub fn totals(&self) -> (u64, u64) {
        let sum = |counters: &[IntCounter]| counters.iter().map(IntCounter::get).sum();
        (sum(&self.read), sum(&self.written))
    }
}

/// Logs every pipeline's progress each `interval` until `stop` is cancelled.
pub async fn report(pipelines: Vec<PipelineProgress>, interval: Duration, stop: CancellationToken) {
    let mut last: Vec<(u64, u64)> = pipelines.iter().map(PipelineProgress::totals).collect();
    let mut last_at = Instant::now();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let elapsed = last_at.elapsed().as_secs_f64().max(f64::EPSILON);
        last_at = Instant::now();
        for (pipeline, previous) in pipelines.iter().zip(last.iter_mut()) {
            let (read, written) = pipeline.totals();
            let rate = (read - previous.0) as f64 / elapsed;
            info!(
                pipeline = %pipeline.name,
                rows_read = read,
                rows_written = written,
                "progress: {read} rows read ({rate:.0}/s), {written} rows written"
            );
            *previous = (read, written);
        }
    }
}
