//! The agent's running pipelines, swapped as a whole when a new deployment arrives:
//! pipelines whose definition did not change keep running untouched, the others are
//! drained and replaced.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_engine::metrics::EngineMetrics;
use weir_hub::protocol::PipelineDocument;
use weir_modules::ModuleHost;
use weir_pipelines::{PipelineSource, ValidatedPipeline};

use crate::api::live::{LivePipelines, PipelineShape, PipelineState};

/// A pipeline's state, as the agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PipelineHealth {
    /// The pipeline's name.
    pub name: String,
    /// `running`, `finished` (its sources ended) or `failed`.
    pub state: &'static str,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When this run of it started, ms since the Unix epoch: a pipeline left untouched
    /// by a new deployment keeps its time.
    pub since_ms: i64,
}

/// A pipeline task ended: which one (by name and the start it belongs to), and how.
pub struct Ended {
    name: String,
    start: u64,
    result: Result<(), String>,
}

/// What an apply changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swap {
    /// Pipelines started that did not run before.
    pub started: Vec<String>,
    /// Pipelines restarted with a new definition.
    pub replaced: Vec<String>,
    /// Pipelines stopped because the deployment no longer has them.
    pub stopped: Vec<String>,
    /// Pipelines left running untouched.
    pub kept: Vec<String>,
}

struct Running {
    /// The document it was built from: the same text means the same pipeline.
    source: PipelineSource,
    /// Which start this is, to tell a stale end from the current one.
    start: u64,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// The pipelines the agent runs.
pub struct PipelineSet {
    running: BTreeMap<String, Running>,
    /// Where `hub` sinks ship.
    shipping: Arc<weir_outbox::Shipping>,
    /// Their state, operators and streams, as the local API shows them.
    live: Arc<LivePipelines>,
    metrics: EngineMetrics,
    modules: Arc<ModuleHost>,
    /// Where relative paths in deployed pipelines resolve.
    base_dir: PathBuf,
    /// Where each pipeline's checkpoints are kept, so a restart or a redeploy goes on
    /// from them.
    checkpoint_dir: PathBuf,
    shutdown_timeout: Duration,
    ended_tx: mpsc::UnboundedSender<Ended>,
    starts: u64,
}

impl PipelineSet {
    /// An empty set. Pipeline ends are announced on the returned channel; pass each one
    /// to [`PipelineSet::ended`].
    pub fn new(
        shipping: Arc<weir_outbox::Shipping>,
        live: Arc<LivePipelines>,
        metrics: EngineMetrics,
        modules: Arc<ModuleHost>,
        base_dir: PathBuf,
        checkpoint_dir: PathBuf,
        shutdown_timeout: Duration,
    ) -> (PipelineSet, mpsc::UnboundedReceiver<Ended>) {
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let set = PipelineSet {
            running: BTreeMap::new(),
            shipping,
            live,
            metrics,
            modules,
            base_dir,
            checkpoint_dir,
            shutdown_timeout,
            ended_tx,
            starts: 0,
        };
        (set, ended_rx)
    }

    /// Makes `documents` (of `deployment`) the running set.
    ///
    /// Everything is validated first: on any problem nothing changes and the problems
    /// are returned, as `weir validate` prints them. Then the pipelines that changed or
    /// went away are drained (building touches the outside world: a file sink opens its
    /// file, a module starts, so the old run must be gone first), and the new ones are
    /// built and started. If one fails to build, the pipelines stopped for this apply are
    /// started again from their old definitions and the error is returned.
    pub async fn apply(
        &mut self,
        deployment: &str,
        documents: &[PipelineDocument],
    ) -> Result<Swap, String> {
        let sources: Vec<PipelineSource> = documents
            .iter()
            .map(|document| PipelineSource {
                file: PathBuf::from(deployment).join(format!("{}.yaml", document.name)),
                text: document.yaml.clone(),
                base: self.base_dir.clone(),
            })
            .collect();
        let wanted = self.validate(&sources)?;

        let mut swap = Swap {
            stopped: self
                .running
                .keys()
                .filter(|name| !wanted.contains_key(*name))
                .cloned()
                .collect(),
            ..Swap::default()
        };
        let mut to_start = Vec::new();
        for (name, (source, pipeline)) in wanted {
            // The same text is the same pipeline: left as it is, running, finished or
            // failed. A new definition starts it over.
            match self.running.get(&name) {
                Some(running) if running.source.text == source.text => swap.kept.push(name),
                Some(_) => {
                    swap.replaced.push(name.clone());
                    to_start.push((name, source, pipeline));
                }
                None => {
                    swap.started.push(name.clone());
                    to_start.push((name, source, pipeline));
                }
            }
        }

        let mut stopped = Vec::new();
        for name in swap.stopped.iter().chain(&swap.replaced) {
            if let Some(source) = self.stop(name).await {
                stopped.push(source);
            }
        }
        let mut failure = None;
        for (name, source, pipeline) in to_start {
            if let Err(e) = self.start(name, source, pipeline) {
                failure = Some(e);
                break;
            }
        }
        let Some(failure) = failure else {
            return Ok(swap);
        };
        // Back to what ran before: the new pipelines started so far go, the old ones
        // come back.
        for name in swap.started.iter().chain(&swap.replaced) {
            self.stop(name).await;
        }
        if let Err(problems) = self.restore(&stopped) {
            tracing::error!("could not restart the previous pipelines: {problems}");
        }
        Err(failure)
    }

    /// Restarts every pipeline that failed, from its definition: what a supervisor does
    /// for a crashed service. Returns the names restarted.
    pub async fn restart_failed(&mut self) -> Vec<String> {
        let failed: Vec<String> = self
            .running
            .keys()
            .filter(|name| {
                self.live
                    .state(name)
                    .is_some_and(|(state, ..)| state == PipelineState::Failed)
            })
            .cloned()
            .collect();
        let mut sources = Vec::new();
        for name in &failed {
            if let Some(source) = self.stop(name).await {
                sources.push(source);
            }
        }
        if let Err(problems) = self.restore(&sources) {
            tracing::warn!("could not restart failed pipelines: {problems}");
        }
        failed
    }

    /// Validates and starts `sources` again (pipelines stopped earlier).
    fn restore(&mut self, sources: &[PipelineSource]) -> Result<(), String> {
        if sources.is_empty() {
            return Ok(());
        }
        let pipelines = self.validate(sources)?;
        let mut problems = Vec::new();
        for (name, (source, pipeline)) in pipelines {
            if let Err(e) = self.start(name, source, pipeline) {
                problems.push(e);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// Validates `sources` with the device's environment: each pipeline by name, with
    /// the document it came from.
    fn validate(
        &self,
        sources: &[PipelineSource],
    ) -> Result<BTreeMap<String, (PipelineSource, ValidatedPipeline)>, String> {
        let registry = crate::validate::registry(&self.modules, Some(self.shipping.clone()));
        let (validated, diagnostics) =
            weir_pipelines::validate_sources(sources, &registry, &weir_pipelines::process_env);
        if !diagnostics.is_empty() {
            let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
            return Err(lines.join("\n"));
        }
        // With no problems every document passed, in order.
        Ok(validated
            .into_iter()
            .zip(sources)
            .map(|(pipeline, source)| (pipeline.name().to_owned(), (source.clone(), pipeline)))
            .collect())
    }

    /// Builds `pipeline` and starts it; says why when it cannot be built.
    fn start(
        &mut self,
        name: String,
        source: PipelineSource,
        pipeline: ValidatedPipeline,
    ) -> Result<(), String> {
        let shape = PipelineShape::of(&pipeline, &self.metrics);
        let checkpoints = pipeline
            .checkpoint_interval()
            .map(|interval| {
                crate::state::open_checkpoints(&self.checkpoint_dir, &name, interval, &self.metrics)
            })
            .transpose()
            .map_err(|e| format!("pipeline '{name}': {e}"))?;
        let pipeline = pipeline
            .build_checkpointed(&self.metrics, checkpoints)
            .map_err(|e| format!("pipeline '{name}': {e}"))?;
        self.live.started(shape, &pipeline);
        self.starts += 1;
        let start = self.starts;
        let cancel = CancellationToken::new();
        let ended = self.ended_tx.clone();
        let task = {
            let cancel = cancel.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let result = pipeline.run(cancel).await.map_err(|e| e.to_string());
                let _ = ended.send(Ended {
                    name,
                    start,
                    result,
                });
            })
        };
        tracing::info!(pipeline = %name, "pipeline started");
        self.running.insert(
            name,
            Running {
                source,
                start,
                cancel,
                task: Some(task),
            },
        );
        Ok(())
    }

    /// Drains pipeline `name` and forgets it; past the shutdown timeout it is aborted.
    /// Returns the document it ran from.
    async fn stop(&mut self, name: &str) -> Option<PipelineSource> {
        let mut running = self.running.remove(name)?;
        running.cancel.cancel();
        if let Some(mut task) = running.task.take()
            && tokio::time::timeout(self.shutdown_timeout, &mut task)
                .await
                .is_err()
        {
            tracing::warn!(
                pipeline = %name,
                "did not drain within {}; stopped without draining",
                humantime::format_duration(self.shutdown_timeout)
            );
            task.abort();
        }
        tracing::info!(pipeline = %name, "pipeline stopped");
        self.live.remove(name);
        Some(running.source)
    }

    /// Drains every pipeline.
    pub async fn stop_all(&mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            self.stop(&name).await;
        }
    }

    /// Takes note that a pipeline ended by itself. Returns whether that changed its
    /// health (a stale end, of a pipeline since replaced, changes nothing).
    pub fn ended(&mut self, ended: Ended) -> bool {
        let Some(running) = self.running.get_mut(&ended.name) else {
            return false;
        };
        if running.start != ended.start {
            return false;
        }
        running.task = None;
        match &ended.result {
            Ok(()) => tracing::info!(pipeline = %ended.name, "pipeline finished"),
            Err(error) => tracing::error!(pipeline = %ended.name, "pipeline failed: {error}"),
        }
        self.live.ended(&ended.name, ended.result);
        true
    }

    /// The pipelines among `names` that failed, each as `pipeline 'NAME': ERROR`.
    pub fn failures<'a>(&self, names: impl IntoIterator<Item = &'a String>) -> Vec<String> {
        names
            .into_iter()
            .filter_map(|name| match self.live.state(name)? {
                (PipelineState::Failed, error, _) => {
                    Some(format!("pipeline '{name}': {}", error.unwrap_or_default()))
                }
                _ => None,
            })
            .collect()
    }

    /// The `hub` sinks' outbox at a glance, for the report: what waits, what was
    /// stored, sent, acknowledged and retried, and what the limits dropped.
    pub fn outbox(&self) -> serde_json::Value {
        match self.shipping.stats() {
            None => serde_json::Value::Null,
            Some(stats) => serde_json::json!({
                "batches": stats.outbox.batches,
                "rows": stats.outbox.rows,
                "bytes": stats.outbox.bytes,
                "oldest_ms": stats.outbox.oldest_ms,
                "appended_rows": stats.outbox.appended_rows,
                "shipped_rows": stats.shipped_rows,
                "acked_rows": stats.outbox.acked_rows,
                "retries": stats.retries,
                "dropped_rows": {
                    "bytes": stats.outbox.dropped_rows_bytes,
                    "age": stats.outbox.dropped_rows_age,
                    "refused": stats.outbox.dead_lettered_rows,
                },
                "dead_letters": stats.outbox.dead_letters,
            }),
        }
    }

    /// The pipelines' names.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.running.keys()
    }

    /// Every pipeline's health.
    pub fn health(&self) -> Vec<PipelineHealth> {
        self.running
            .keys()
            .filter_map(|name| {
                let (state, error, since_ms) = self.live.state(name)?;
                Some(PipelineHealth {
                    name: name.clone(),
                    state: state.as_str(),
                    error,
                    since_ms,
                })
            })
            .collect()
    }
}
