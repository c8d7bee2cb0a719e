//! The one place that names the runtime's Prometheus metrics.
//!
//! Operators never format metric names: they get an [`OperatorMetrics`] whose series are
//! resolved once, so counting on the hot path is an atomic add. Label values are
//! pipeline, operator and input names and fixed drop reasons, all bounded by the
//! configuration; no label takes unbounded values.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Processing-time buckets in seconds: 10 µs to 10 s.
const PROCESSING_BUCKETS: &[f64] = &[
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
];

/// The metric families of the dataflow runtime, registered once per process.
#[derive(Clone)]
pub struct EngineMetrics {
    rows_in: IntCounterVec,
    rows_out: IntCounterVec,
    batches_in: IntCounterVec,
    batches_out: IntCounterVec,
    errors: IntCounterVec,
    dropped: IntCounterVec,
    rejected: IntCounterVec,
    processing: HistogramVec,
    watermark: IntGaugeVec,
    channel_depth: IntGaugeVec,
    pipeline_running: IntGaugeVec,
    connected: IntGaugeVec,
    reconnects: IntCounterVec,
    state_keys: IntGaugeVec,
    state_bytes: IntGaugeVec,
    state_evictions: IntCounterVec,
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl EngineMetrics {
    /// Creates the families and registers them with `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let op = &["pipeline", "operator"];
        let processing = HistogramVec::new(
            HistogramOpts::new(
                "weir_operator_processing_seconds",
                "Time an operator spent handling one batch or watermark",
            )
            .buckets(PROCESSING_BUCKETS.to_vec()),
            op,
        )?;
        registry.register(Box::new(processing.clone()))?;
        Ok(EngineMetrics {
            rows_in: counter(
                registry,
                "weir_operator_rows_in_total",
                "Rows received by an operator",
                op,
            )?,
            rows_out: counter(
                registry,
                "weir_operator_rows_out_total",
                "Rows emitted by an operator",
                op,
            )?,
            batches_in: counter(
                registry,
                "weir_operator_batches_in_total",
                "Batches received by an operator",
                op,
            )?,
            batches_out: counter(
                registry,
                "weir_operator_batches_out_total",
                "Batches emitted by an operator",
                op,
            )?,
            errors: counter(
                registry,
                "weir_operator_errors_total",
                "Errors raised by an operator",
                op,
            )?,
            dropped: counter(
                registry,
                "weir_operator_dropped_rows_total",
                "Rows an operator dropped, by reason (late, malformed, ...)",
                &["pipeline", "operator", "reason"],
            )?,
            rejected: counter(
                registry,
                "weir_operator_rejected_rows_total",
                "Input an operator rejected as malformed, by reason; it goes to the dead-letter \
                 output when one is wired, and is otherwise also counted as dropped",
                &["pipeline", "operator", "reason"],
            )?,
            processing,
            watermark: gauge(
                registry,
                "weir_operator_watermark_milliseconds",
                "The latest watermark an operator has seen, in milliseconds since the epoch",
                op,
            )?,
            channel_depth: gauge(
                registry,
                "weir_channel_depth",
                "Messages waiting in the channel from `input` into `operator`",
                &["pipeline", "operator", "input"],
            )?,
            pipeline_running: gauge(
                registry,
                "weir_pipeline_running",
                "1 while a pipeline runs, 0 once it has stopped",
                &["pipeline"],
            )?,
            connected: gauge(
                registry,
                "weir_operator_connected",
                "1 while an operator is connected to its external peer (broker, hub), else 0",
                op,
            )?,
            reconnects: counter(
                registry,
                "weir_operator_reconnects_total",
                "Times an operator's connection to its external peer was lost and came back",
                op,
            )?,
            state_keys: gauge(
                registry,
                "weir_operator_state_keys",
                "Keys (e.g. series) a stateful operator holds state for",
                op,
            )?,
            state_bytes: gauge(
                registry,
                "weir_operator_state_bytes",
                "Memory a stateful operator's keyed state holds, in bytes (an estimate)",
                op,
            )?,
            state_evictions: counter(
                registry,
                "weir_operator_state_evictions_total",
                "Keys a stateful operator forgot because it held the most it may",
                op,
            )?,
        })
    }

    /// The series of one operator.
    pub fn operator(&self, pipeline: &str, operator: &str) -> OperatorMetrics {
        let labels = &[pipeline, operator];
        OperatorMetrics {
            pipeline: pipeline.to_owned(),
            operator: operator.to_owned(),
            rows_in: self.rows_in.with_label_values(labels),
            rows_out: self.rows_out.with_label_values(labels),
            batches_in: self.batches_in.with_label_values(labels),
            batches_out: self.batches_out.with_label_values(labels),
            errors: self.errors.with_label_values(labels),
            processing: self.processing.with_label_values(labels),
            watermark: self.watermark.with_label_values(labels),
            dropped: self.dropped.clone(),
            rejected: self.rejected.clone(),
            connected: self.connected.clone(),
            reconnects: self.reconnects.clone(),
            state_keys: self.state_keys.clone(),
            state_bytes: self.state_bytes.clone(),
            state_evictions: self.state_evictions.clone(),
        }
    }

    /// The depth gauge of the channel from `input` into `operator`.
    pub fn channel_depth(&self, pipeline: &str, operator: &str, input: &str) -> IntGauge {
        self.channel_depth
            .with_label_values(&[pipeline, operator, input])
    }

    /// The running flag of a pipeline.
    pub fn pipeline_running(&self, pipeline: &str) -> IntGauge {
        self.pipeline_running.with_label_values(&[pipeline])
    }
}

/// The series of one operator, resolved once.
#[derive(Clone)]
pub struct OperatorMetrics {
    pipeline: String,
    operator: String,
    /// Rows received.
    pub rows_in: IntCounter,
    /// Rows emitted.
    pub rows_out: IntCounter,
    /// Batches received.
    pub batches_in: IntCounter,
    /// Batches emitted.
    pub batches_out: IntCounter,
    /// Errors raised, including ones the operator recovered from.
    pub errors: IntCounter,
    /// Time spent per batch or watermark.
    pub processing: Histogram,
    /// The latest watermark seen.
    pub watermark: IntGauge,
    dropped: IntCounterVec,
    rejected: IntCounterVec,
    connected: IntGaugeVec,
    reconnects: IntCounterVec,
    state_keys: IntGaugeVec,
    state_bytes: IntGaugeVec,
    state_evictions: IntCounterVec,
}

/// The keyed-state series of a stateful operator.
#[derive(Clone)]
pub struct StateMetrics {
    /// Keys held.
    pub keys: IntGauge,
    /// Bytes held (an estimate).
    pub bytes: IntGauge,
    /// Keys evicted.
    pub evictions: IntCounter,
}

/// The connection series of an operator that talks to an external peer.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// 1 while connected, 0 otherwise.
    pub connected: IntGauge,
    /// Connections lost and regained.
    pub reconnects: IntCounter,
}

impl OperatorMetrics {
    /// Counts dropped rows under `reason`.
    pub fn dropped(&self, reason: &str, rows: u64) {
        if rows > 0 {
            self.dropped
                .with_label_values(&[self.pipeline.as_str(), self.operator.as_str(), reason])
                .inc_by(rows);
        }
    }

    /// Counts input rejected as malformed under `reason` (e.g. `bad_payload`).
    pub fn rejected(&self, reason: &str, rows: u64) {
        if rows > 0 {
            self.rejected
                .with_label_values(&[self.pipeline.as_str(), self.operator.as_str(), reason])
                .inc_by(rows);
        }
    }

    /// The connection series, created on first use so that operators without an external
    /// peer do not report a connection.
    pub fn connection(&self) -> ConnectionMetrics {
        let labels = &[self.pipeline.as_str(), self.operator.as_str()];
        ConnectionMetrics {
            connected: self.connected.with_label_values(labels),
            reconnects: self.reconnects.with_label_values(labels),
        }
    }

    /// The keyed-state series, created on first use so that stateless operators do not
    /// report state.
    pub fn state(&self) -> StateMetrics {
        let labels = &[self.pipeline.as_str(), self.operator.as_str()];
        StateMetrics {
            keys: self.state_keys.with_label_values(labels),
            bytes: self.state_bytes.with_label_values(labels),
            evictions: self.state_evictions.with_label_values(labels),
        }
    }

    /// Metrics that are registered nowhere, for operators run outside a pipeline in tests.
    pub fn detached(pipeline: &str, operator: &str) -> Self {
        let registry = Registry::new();
        EngineMetrics::new(&registry)
            .expect("fresh registry accepts the engine's metric families")
            .operator(pipeline, operator)
    }
}
