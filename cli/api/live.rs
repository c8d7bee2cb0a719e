//! The pipelines this runtime runs right now, as the local API shows them: their
//! operators and schemas, their state, and the streams that can be queried or tapped.
//!
//! `weir run` and `weir agent` register each pipeline when they start it and update its
//! state when it ends; the API reads from here, never from the running tasks.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weir_engine::Role;
use weir_engine::checkpoint::CheckpointMetrics;
use weir_engine::graph::Pipeline;
use weir_engine::metrics::{EngineMetrics, OperatorMetrics};
use weir_engine::observe::StreamView;
use weir_pipelines::{ValidatedPipeline, role_noun};

/// A pipeline's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineState {
    /// Its operators run.
    Running,
    /// Its sources ended and everything drained.
    Finished,
    /// An operator failed; see the error.
    Failed,
}

impl PipelineState {
    /// The state as written in reports and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineState::Running => "running",
            PipelineState::Finished => "finished",
            PipelineState::Failed => "failed",
        }
    }
}

/// The body of `GET /api/v1/pipelines`, what `weir status` prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusBody {
    /// Every pipeline, by name.
    pub pipelines: Vec<PipelineReport>,
    /// Every module of every pipeline.
    pub modules: Vec<weir_modules::ModuleReport>,
}

/// One pipeline in `GET /api/v1/pipelines`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PipelineReport {
    /// The pipeline's name.
    pub name: String,
    /// The file (or deployment document) it was read from.
    pub file: String,
    /// Its state.
    pub state: PipelineState,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When this run of it started, in ms since the Unix epoch.
    pub since_ms: i64,
    /// Its operators, every node after the nodes it reads from.
    pub operators: Vec<OperatorReport>,
    /// Its checkpoints, when it takes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointReport>,
}

/// A pipeline's checkpoints, as `/metrics` has them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// How often it checkpoints, e.g. `10s`.
    pub interval: String,
    /// The newest complete checkpoint (0: none yet).
    pub last_completed_epoch: u64,
    /// Seconds since it completed (0 when none has).
    pub age_seconds: i64,
    /// What the last checkpoint wrote, in bytes.
    pub last_bytes: u64,
    /// Checkpoints completed since the runtime started.
    pub completed: u64,
    /// Their mean duration, from barrier to commit, in ms.
    pub mean_duration_ms: f64,
    /// Checkpoints that failed, and state that could not be restored.
    pub failures: u64,
}

/// One operator in `GET /api/v1/pipelines`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OperatorReport {
    /// The node's name.
    pub name: String,
    /// `source`, `transform` or `sink`.
    pub role: String,
    /// The operator kind.
    pub kind: String,
    /// The nodes (`node` or `node.port`) it reads from.
    pub inputs: Vec<String>,
    /// The columns of its main output; empty for sinks.
    pub schema: Vec<ColumnReport>,
    /// Its event-time column, when its output has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    /// Rows it received so far.
    pub rows_in: u64,
    /// Rows it emitted so far.
    pub rows_out: u64,
    /// What it retains for queries, when it is retained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained: Option<RetainedReport>,
}

/// One column of an operator's output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ColumnReport {
    /// The column's name.
    pub name: String,
    /// Its Arrow type.
    #[serde(rename = "type")]
    pub data_type: String,
    /// Whether it may hold nulls.
    pub nullable: bool,
}

/// A retained stream's bounds and what it holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetainedReport {
    /// How long batches are kept, e.g. `15m`.
    pub duration: String,
    /// The most memory the kept batches may hold.
    pub max_bytes: u64,
    /// Rows held now.
    pub rows: u64,
    /// Memory held now.
    pub bytes: u64,
}

struct Node {
    name: String,
    role: Role,
    kind: String,
    inputs: Vec<String>,
    schema: Vec<ColumnReport>,
    event_time: Option<String>,
    metrics: OperatorMetrics,
    view: Option<Arc<StreamView>>,
}

struct Entry {
    checkpoint: Option<(Duration, CheckpointMetrics)>,
    file: String,
    state: PipelineState,
    error: Option<String>,
    since_ms: i64,
    nodes: Vec<Node>,
}

/// The pipelines this runtime runs; shared by the runner and the API.
#[derive(Default)]
pub struct LivePipelines {
    pipelines: RwLock<BTreeMap<String, Entry>>,
}

/// What a pipeline will show once started: read from its plan before it is built.
pub struct PipelineShape {
    name: String,
    file: String,
    nodes: Vec<Node>,
    checkpoint: Option<(Duration, CheckpointMetrics)>,
}

impl PipelineShape {
    /// The shape of `pipeline`, whose operators count into `metrics`.
    pub fn of(pipeline: &ValidatedPipeline, metrics: &EngineMetrics) -> Self {
        let nodes = pipeline
            .nodes()
            .iter()
            .map(|node| {
                let main = node.outputs().first();
                Node {
                    name: node.name().to_owned(),
                    role: node.role(),
                    kind: node.kind().to_owned(),
                    inputs: node
                        .inputs()
                        .iter()
                        .map(|input| {
                            if input.port == weir_engine::registry::MAIN_PORT_NAME {
                                input.node.clone()
                            } else {
                                format!("{}.{}", input.node, input.port)
                            }
                        })
                        .collect(),
                    schema: main
                        .map(|port| {
                            port.stream
                                .schema
                                .fields()
                                .iter()
                                .map(|field| ColumnReport {
                                    name: field.name().clone(),
                                    data_type: field.data_type().to_string(),
                                    nullable: field.is_nullable(),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    event_time: main.and_then(|port| port.stream.event_time.clone()),
                    metrics: metrics.operator(pipeline.name(), node.name()),
                    view: None,
                }
            })
            .collect();
        PipelineShape {
            name: pipeline.name().to_owned(),
            file: pipeline.file().display().to_string(),
            nodes,
            checkpoint: pipeline
                .checkpoint_interval()
                .map(|interval| (interval, metrics.checkpoint(pipeline.name()))),
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl LivePipelines {
    /// Records that `pipeline`, of `shape`, has started; it replaces any earlier run of
    /// the same name.
    pub fn started(&self, shape: PipelineShape, pipeline: &Pipeline) {
        let mut nodes = shape.nodes;
        for view in pipeline.streams() {
            if let Some(node) = nodes.iter_mut().find(|node| node.name == view.node()) {
                node.view = Some(view.clone());
            }
        }
        write(&self.pipelines).insert(
            shape.name,
            Entry {
                checkpoint: shape.checkpoint,
                file: shape.file,
                state: PipelineState::Running,
                error: None,
                since_ms: weir_engine::time::wall_clock_ms(),
                nodes,
            },
        );
    }

    /// Records how pipeline `name` ended.
    pub fn ended(&self, name: &str, result: Result<(), String>) {
        if let Some(entry) = write(&self.pipelines).get_mut(name) {
            match result {
                Ok(()) => entry.state = PipelineState::Finished,
                Err(error) => {
                    entry.state = PipelineState::Failed;
                    entry.error = Some(error);
                }
            }
        }
    }

    /// Forgets pipeline `name` (it was stopped for good or replaced). Only the agent
    /// swaps pipelines while it runs.
    #[cfg(feature = "hub")]
    pub fn remove(&self, name: &str) {
        write(&self.pipelines).remove(name);
    }

    /// The state of pipeline `name`, with its error and start time, for the agent's
    /// reports.
    #[cfg(feature = "hub")]
    pub fn state(&self, name: &str) -> Option<(PipelineState, Option<String>, i64)> {
        read(&self.pipelines)
            .get(name)
            .map(|entry| (entry.state, entry.error.clone(), entry.since_ms))
    }

    /// Every stream of every pipeline, for queries and taps.
    pub fn streams(&self) -> Vec<Arc<StreamView>> {
        read(&self.pipelines)
            .values()
            .flat_map(|entry| entry.nodes.iter().filter_map(|node| node.view.clone()))
            .collect()
    }

    /// Lets retained streams that went quiet drop what has aged out.
    pub fn evict_expired(&self) {
        for view in self.streams() {
            view.evict_expired();
        }
    }

    /// The pipelines that failed, each as `NAME: ERROR`; empty when none did.
    pub fn failed(&self) -> Vec<String> {
        read(&self.pipelines)
            .iter()
            .filter(|(_, entry)| entry.state == PipelineState::Failed)
            .map(|(name, entry)| format!("{name}: {}", entry.error.as_deref().unwrap_or("failed")))
            .collect()
    }

    /// Every pipeline, as `GET /api/v1/pipelines` shows them.
    pub fn reports(&self) -> Vec<PipelineReport> {
        read(&self.pipelines)
            .iter()
            .map(|(name, entry)| PipelineReport {
                name: name.clone(),
                file: entry.file.clone(),
                state: entry.state,
                error: entry.error.clone(),
                since_ms: entry.since_ms,
                operators: entry.nodes.iter().map(Node::report).collect(),
                checkpoint: entry.checkpoint.as_ref().map(|(interval, metrics)| {
                    let completed = metrics.duration.get_sample_count();
                    CheckpointReport {
                        interval: humantime::format_duration(*interval).to_string(),
                        last_completed_epoch: u64::try_from(metrics.last_completed_epoch.get())
                            .unwrap_or(0),
                        age_seconds: metrics.age.get(),
                        last_bytes: u64::try_from(metrics.bytes.get()).unwrap_or(0),
                        completed,
                        mean_duration_ms: if completed == 0 {
                            0.0
                        } else {
                            metrics.duration.get_sample_sum() * 1000.0 / completed as f64
                        },
                        failures: metrics.failures_total(),
                    }
                }),
            })
            .collect()
    }
}

impl Node {
    fn report(&self) -> OperatorReport {
        OperatorReport {
            name: self.name.clone(),
            role: role_noun(self.role).to_owned(),
            kind: self.kind.clone(),
            inputs: self.inputs.clone(),
            schema: self.schema.clone(),
            event_time: self.event_time.clone(),
            rows_in: self.metrics.rows_in.get(),
            rows_out: self.metrics.rows_out.get(),
            retained: self.view.as_ref().and_then(|view| {
                let spec = view.retention()?;
                let usage = view.retained_usage();
                Some(RetainedReport {
                    duration: humantime::format_duration(spec.duration).to_string(),
                    max_bytes: spec.max_bytes,
                    rows: usage.rows,
                    bytes: usage.bytes,
                })
            }),
        }
    }
}
