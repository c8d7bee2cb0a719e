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
    in_flight: IntGaugeVec,
    ack_backlog: IntGaugeVec,
    state_keys: IntGaugeVec,
    state_bytes: IntGaugeVec,
    state_evictions: IntCounterVec,
    module_state: IntGaugeVec,
    module_healthy: IntGaugeVec,
    module_restarts: IntCounterVec,
    module_last_exit_code: IntGaugeVec,
    module_oom_kills: IntCounterVec,
    module_retries: IntCounterVec,
    module_dead_letters: IntCounterVec,
    retained_bytes: IntGaugeVec,
    retained_rows: IntGaugeVec,
    retained_evicted: IntCounterVec,
    tap_dropped: IntCounterVec,
    outbox: OutboxMetrics,
    checkpoints: CheckpointFamilies,
}

/// The checkpoint families, labelled by pipeline.
#[derive(Clone)]
struct CheckpointFamilies {
    last_completed_epoch: IntGaugeVec,
    duration: HistogramVec,
    bytes: IntGaugeVec,
    failures: IntCounterVec,
    last_completed_at: IntGaugeVec,
    age: IntGaugeVec,
}

impl CheckpointFamilies {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let pipeline = &["pipeline"];
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "weir_checkpoint_duration_seconds",
                "Time from a checkpoint's start to its commit in the state store",
            )
            .buckets(PROCESSING_BUCKETS.to_vec()),
            pipeline,
        )?;
        registry.register(Box::new(duration.clone()))?;
        Ok(CheckpointFamilies {
            last_completed_epoch: gauge(
                registry,
                "weir_checkpoint_last_completed_epoch",
                "The epoch of a pipeline's last complete checkpoint",
                pipeline,
            )?,
            duration,
            bytes: gauge(
                registry,
                "weir_checkpoint_bytes",
                "Bytes of state the last checkpoint wrote (only what changed since the one before)",
                pipeline,
            )?,
            failures: counter(
                registry,
                "weir_checkpoint_failures_total",
                "Checkpoints that failed, and state stores found damaged or unreadable, by reason",
                &["pipeline", "reason"],
            )?,
            last_completed_at: gauge(
                registry,
                "weir_checkpoint_last_completed_timestamp_seconds",
                "When a pipeline's last checkpoint completed, in seconds since the Unix epoch",
                pipeline,
            )?,
            age: gauge(
                registry,
                "weir_checkpoint_age_seconds",
                "Seconds since a pipeline's last checkpoint completed",
                pipeline,
            )?,
        })
    }
}

/// The states a module can be in, as `weir_module_state` labels them.
pub const MODULE_STATES: &[&str] = &[
    "starting",
    "running",
    "unhealthy",
    "backoff",
    "failed",
    "stopped",
];

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
            in_flight: gauge(
                registry,
                "weir_operator_in_flight_messages",
                "Messages exchanged with the external peer and not yet acknowledged: received \
                 and not yet acked (sources), or sent and not yet acked by the peer (sinks)",
                op,
            )?,
            ack_backlog: gauge(
                registry,
                "weir_operator_ack_backlog",
                "Acknowledgements an operator has decided on but not yet written to its peer",
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
            module_state: gauge(
                registry,
                "weir_module_state",
                "1 for the state a module is in (starting, running, unhealthy, backoff, \
                 failed, stopped), 0 for the others",
                &["pipeline", "operator", "state"],
            )?,
            module_healthy: gauge(
                registry,
                "weir_module_healthy",
                "1 while a module passes its health checks, else 0",
                op,
            )?,
            module_restarts: counter(
                registry,
                "weir_module_restarts_total",
                "Times the runtime restarted a module",
                op,
            )?,
            module_last_exit_code: gauge(
                registry,
                "weir_module_last_exit_code",
                "The exit code of a module's last run (-1 when it had none: killed by a \
                 signal or never started)",
                op,
            )?,
            module_oom_kills: counter(
                registry,
                "weir_module_oom_kills_total",
                "Runs of a module that the kernel ended for passing its memory limit",
                op,
            )?,
            module_retries: counter(
                registry,
                "weir_module_retries_total",
                "Batches sent to a module again after it failed or did not answer",
                op,
            )?,
            module_dead_letters: counter(
                registry,
                "weir_module_dead_letter_batches_total",
                "Batches a module rejected or failed on every attempt, sent to dead_letter",
                op,
            )?,
            retained_bytes: gauge(
                registry,
                "weir_retained_bytes",
                "Memory the batches a retained stream keeps for queries hold, in bytes",
                op,
            )?,
            retained_rows: gauge(
                registry,
                "weir_retained_rows",
                "Rows a retained stream keeps for queries",
                op,
            )?,
            retained_evicted: counter(
                registry,
                "weir_retained_evicted_rows_total",
                "Rows a retained stream let go, by reason: `age` (older than its duration) \
                 or `bytes` (over its max_bytes)",
                &["pipeline", "operator", "reason"],
            )?,
            outbox: OutboxMetrics::new(registry)?,
            checkpoints: CheckpointFamilies::new(registry)?,
            tap_dropped: counter(
                registry,
                "weir_tap_dropped_rows_total",
                "Rows a tap on an operator's output did not show, because the tap's reader \
                 was slower than the stream or over its rate",
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
            in_flight: self.in_flight.clone(),
            ack_backlog: self.ack_backlog.clone(),
            state_keys: self.state_keys.clone(),
            state_bytes: self.state_bytes.clone(),
            state_evictions: self.state_evictions.clone(),
            module: ModuleFamilies {
                state: self.module_state.clone(),
                healthy: self.module_healthy.clone(),
                restarts: self.module_restarts.clone(),
                last_exit_code: self.module_last_exit_code.clone(),
                oom_kills: self.module_oom_kills.clone(),
                retries: self.module_retries.clone(),
                dead_letters: self.module_dead_letters.clone(),
            },
        }
    }

    /// The depth gauge of the channel from `input` into `operator`.
    pub fn channel_depth(&self, pipeline: &str, operator: &str, input: &str) -> IntGauge {
        self.channel_depth
            .with_label_values(&[pipeline, operator, input])
    }

    /// The series of the stream an operator emits: retention and taps.
    pub fn stream(&self, pipeline: &str, operator: &str) -> StreamMetrics {
        let labels = &[pipeline, operator];
        let evicted = |reason: &str| {
            self.retained_evicted
                .with_label_values(&[pipeline, operator, reason])
        };
        StreamMetrics {
            retained_bytes: self.retained_bytes.with_label_values(labels),
            retained_rows: self.retained_rows.with_label_values(labels),
            evicted_for_age: evicted("age"),
            evicted_for_bytes: evicted("bytes"),
            tap_dropped: self.tap_dropped.with_label_values(labels),
        }
    }

    /// The series of the process's outbox (the `hub` sinks').
    pub fn outbox(&self) -> OutboxMetrics {
        self.outbox.clone()
    }

    /// The checkpoint series of a pipeline.
    pub fn checkpoint(&self, pipeline: &str) -> crate::checkpoint::CheckpointMetrics {
        let families = &self.checkpoints;
        crate::checkpoint::CheckpointMetrics {
            last_completed_epoch: families.last_completed_epoch.with_label_values(&[pipeline]),
            duration: families.duration.with_label_values(&[pipeline]),
            bytes: families.bytes.with_label_values(&[pipeline]),
            failures: families.failures.clone(),
            pipeline: pipeline.to_owned(),
            last_completed_at: families.last_completed_at.with_label_values(&[pipeline]),
            age: families.age.with_label_values(&[pipeline]),
        }
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
    in_flight: IntGaugeVec,
    ack_backlog: IntGaugeVec,
    state_keys: IntGaugeVec,
    state_bytes: IntGaugeVec,
    state_evictions: IntCounterVec,
    module: ModuleFamilies,
}

/// The module metric families, kept until a module operator asks for its series.
#[derive(Clone)]
struct ModuleFamilies {
    state: IntGaugeVec,
    healthy: IntGaugeVec,
    restarts: IntCounterVec,
    last_exit_code: IntGaugeVec,
    oom_kills: IntCounterVec,
    retries: IntCounterVec,
    dead_letters: IntCounterVec,
}

/// The series of a module operator: its supervision and its batches' retries.
#[derive(Clone)]
pub struct ModuleMetrics {
    /// One gauge per state in [`MODULE_STATES`] order.
    states: Vec<IntGauge>,
    /// 1 while health checks pass.
    pub healthy: IntGauge,
    /// Restarts.
    pub restarts: IntCounter,
    /// The last run's exit code.
    pub last_exit_code: IntGauge,
    /// OOM kills.
    pub oom_kills: IntCounter,
    /// Batches sent again.
    pub retries: IntCounter,
    /// Batches sent to dead_letter.
    pub dead_letters: IntCounter,
}

impl ModuleMetrics {
    /// Sets the state gauge of `state` (one of [`MODULE_STATES`]) to 1 and the others to 0.
    pub fn set_state(&self, state: &str) {
        for (name, gauge) in MODULE_STATES.iter().zip(&self.states) {
            gauge.set(i64::from(*name == state));
        }
    }
}

/// The series of one operator's output stream: what retention holds and lets go, and
/// what taps could not show.
#[derive(Clone)]
pub struct StreamMetrics {
    /// Bytes retained for queries.
    pub retained_bytes: IntGauge,
    /// Rows retained for queries.
    pub retained_rows: IntGauge,
    /// Rows let go for being older than the retention's duration.
    pub evicted_for_age: IntCounter,
    /// Rows let go to stay within the retention's max_bytes.
    pub evicted_for_bytes: IntCounter,
    /// Rows taps dropped.
    pub tap_dropped: IntCounter,
}

impl StreamMetrics {
    /// Series registered nowhere, for streams observed outside a pipeline in tests.
    pub fn detached(pipeline: &str, operator: &str) -> Self {
        EngineMetrics::new(&Registry::new())
            .expect("fresh registry accepts the engine's metric families")
            .stream(pipeline, operator)
    }
}

/// The outbox of the `hub` sinks: what waits, what went, and what its limits dropped.
/// Streams (`pipeline/sink`) are bounded by the configuration.
#[derive(Clone)]
pub struct OutboxMetrics {
    /// Batches waiting, per stream.
    pub batches: IntGaugeVec,
    /// Rows waiting, per stream.
    pub rows: IntGaugeVec,
    /// Bytes waiting, per stream (as stored: compressed).
    pub bytes: IntGaugeVec,
    /// Age of the oldest batch waiting, per stream, in seconds.
    pub oldest_age_seconds: IntGaugeVec,
    /// Rows stored, per stream.
    pub appended_rows: IntCounterVec,
    /// Rows sent to the receiver, per stream: every attempt, acknowledged or not.
    pub shipped_rows: IntCounterVec,
    /// Rows the receiver acknowledged (and the outbox then deleted), per stream.
    pub acked_rows: IntCounterVec,
    /// Sends that failed and will be tried again, per stream.
    pub retries: IntCounterVec,
    /// Rows the limits dropped, by reason: `bytes` (the outbox was full) or `age`.
    pub dropped_rows: IntCounterVec,
    /// Batches found when a damaged outbox was recovered: `kept` or `lost`.
    pub recovered_batches: IntCounterVec,
}

impl OutboxMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let stream = &["stream"];
        Ok(OutboxMetrics {
            batches: gauge(
                registry,
                "weir_outbox_batches",
                "Batches waiting in the outbox",
                stream,
            )?,
            rows: gauge(
                registry,
                "weir_outbox_rows",
                "Rows waiting in the outbox",
                stream,
            )?,
            bytes: gauge(
                registry,
                "weir_outbox_bytes",
                "Bytes waiting in the outbox, as stored (compressed Arrow IPC)",
                stream,
            )?,
            oldest_age_seconds: gauge(
                registry,
                "weir_outbox_oldest_age_seconds",
                "Age of the oldest batch waiting in the outbox",
                stream,
            )?,
            appended_rows: counter(
                registry,
                "weir_outbox_appended_rows_total",
                "Rows stored in the outbox (fsynced)",
                stream,
            )?,
            shipped_rows: counter(
                registry,
                "weir_outbox_shipped_rows_total",
                "Rows sent to the receiver, every attempt counted, acknowledged or not",
                stream,
            )?,
            acked_rows: counter(
                registry,
                "weir_outbox_acked_rows_total",
                "Rows the receiver acknowledged, then deleted from the outbox",
                stream,
            )?,
            retries: counter(
                registry,
                "weir_outbox_retries_total",
                "Sends that failed and will be tried again",
                stream,
            )?,
            dropped_rows: counter(
                registry,
                "weir_outbox_dropped_rows_total",
                "Rows the outbox's limits dropped, by reason: bytes (full) or age",
                &["reason"],
            )?,
            recovered_batches: counter(
                registry,
                "weir_outbox_recovered_batches_total",
                "Batches found when a damaged outbox was recovered, kept or lost",
                &["outcome"],
            )?,
        })
    }
}

/// The keyed-state series of a stateful operator.
///
/// The parallel instances of a partitioned node share one series, so each reports what
/// it holds through [`StateMetrics::hold`], which adds the change since its own last
/// report: the gauges then show the node's total.
#[derive(Clone)]
pub struct StateMetrics {
    /// Keys held (read it; report through [`StateMetrics::hold`]).
    pub keys: IntGauge,
    /// Bytes held, an estimate (read it; report through [`StateMetrics::hold`]).
    pub bytes: IntGauge,
    /// Keys evicted.
    pub evictions: IntCounter,
    /// What this instance last reported: keys, bytes.
    held: (i64, i64),
}

impl StateMetrics {
    /// Reports that this instance now holds `keys` keys in about `bytes` bytes.
    pub fn hold(&mut self, keys: i64, bytes: i64) {
        self.keys.add(keys - self.held.0);
        self.bytes.add(bytes - self.held.1);
        self.held = (keys, bytes);
    }
}

/// The connection series of an operator that talks to an external peer.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// 1 while connected, 0 otherwise.
    pub connected: IntGauge,
    /// Connections lost and regained.
    pub reconnects: IntCounter,
    /// Messages exchanged with the peer and not yet acknowledged.
    pub in_flight: IntGauge,
    /// Acknowledgements decided on and not yet written to the peer.
    pub ack_backlog: IntGauge,
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
            in_flight: self.in_flight.with_label_values(labels),
            ack_backlog: self.ack_backlog.with_label_values(labels),
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
            held: (0, 0),
        }
    }

    /// The module series, created on first use so that only modules report them.
    pub fn module(&self) -> ModuleMetrics {
        let labels = &[self.pipeline.as_str(), self.operator.as_str()];
        let families = &self.module;
        ModuleMetrics {
            states: MODULE_STATES
                .iter()
                .map(|state| {
                    families.state.with_label_values(&[
                        self.pipeline.as_str(),
                        self.operator.as_str(),
                        state,
                    ])
                })
                .collect(),
            healthy: families.healthy.with_label_values(labels),
            restarts: families.restarts.with_label_values(labels),
            last_exit_code: families.last_exit_code.with_label_values(labels),
            oom_kills: families.oom_kills.with_label_values(labels),
            retries: families.retries.with_label_values(labels),
            dead_letters: families.dead_letters.with_label_values(labels),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_sharing_a_state_series_add_up_to_the_node_total() {
        let metrics = EngineMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let operator = metrics.operator("p", "w");
        let (mut first, mut second) = (operator.state(), operator.state());
        first.hold(3, 300);
        second.hold(5, 500);
        assert_eq!((first.keys.get(), first.bytes.get()), (8, 800));
        // Each report replaces that instance's own share, not the total.
        first.hold(1, 100);
        assert_eq!((second.keys.get(), second.bytes.get()), (6, 600));
        second.hold(0, 0);
        assert_eq!(
            (operator.state().keys.get(), operator.state().bytes.get()),
            (1, 100)
        );
    }
}
