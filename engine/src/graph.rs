//! Wiring operators into a runnable pipeline, and running it.
//!
//! [`PipelineBuilder`] takes operator instances with their declared outputs and named
//! inputs and connects them with bounded channels. [`Pipeline::run`] starts one tokio
//! task per operator and supervises them: the first failure cancels the sources, the
//! rest of the graph drains, and the failure is returned naming pipeline and operator.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span};

use crate::checkpoint::coordinator::{Coordinator, NodeEntry, NodeLink};
use crate::checkpoint::{CheckpointSettings, StateChanges, completed_after};
use crate::error::{OperatorError, PipelineError};
use crate::message::{Message, Watermark};
use crate::metrics::{EngineMetrics, OperatorMetrics};
use crate::observe::{RetainSpec, StreamView};
use crate::operator::{Collector, OperatorInstance, Sink, Source, SourceContext, Transform};
use crate::partition::KeyRouter;
use crate::ports::{
    Edge, InputChannel, InputEvent, InputMerger, OutputPort, OutputPorts, WatermarkGenerator,
};
use crate::registry::OutputSpec;
use crate::time::EventTimeSpec;

/// How many messages a channel between two operators holds before the producer waits.
///
/// Batches hold at most a few thousand rows, so this bounds the rows in flight per edge.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 16;

/// How often a sink that has written something is flushed, unless its node says
/// otherwise (`flush_interval`).
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// A reference to an upstream node's output port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputRef {
    /// The upstream node.
    pub node: String,
    /// The upstream node's port ([`crate::registry::MAIN_PORT_NAME`] for the main one).
    pub port: String,
}

struct NodeDef {
    name: String,
    instance: OperatorInstance,
    outputs: Vec<OutputSpec>,
    inputs: Vec<InputRef>,
    event_time: Option<EventTimeSpec>,
    /// For one of a partitioned node's instances: which, and how its rows are routed.
    partition: Option<Partitioning>,
}

/// One instance of a node that runs as several, each over the rows of its keys.
#[derive(Clone)]
struct Partitioning {
    /// Which instance, from 0.
    instance: usize,
    /// How many instances the node runs.
    of: usize,
    /// The input columns whose values route a row.
    keys: Vec<String>,
}

impl NodeDef {
    /// The name its checkpointed state is kept under: the node's, and for an instance of
    /// a partitioned node, `NODE#INSTANCE`.
    fn state_name(&self) -> String {
        match &self.partition {
            Some(partition) if partition.of > 1 => format!("{}#{}", self.name, partition.instance),
            _ => self.name.clone(),
        }
    }
}

/// Collects operators and their wiring, then builds a [`Pipeline`].
pub struct PipelineBuilder {
    name: String,
    nodes: Vec<NodeDef>,
    retained: HashMap<String, RetainSpec>,
    flush_intervals: HashMap<String, Duration>,
    fingerprints: HashMap<String, String>,
    checkpointing: Option<CheckpointSettings>,
    channel_capacity: usize,
}

impl PipelineBuilder {
    /// A builder for the pipeline called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        PipelineBuilder {
            name: name.into(),
            nodes: Vec::new(),
            retained: HashMap::new(),
            flush_intervals: HashMap::new(),
            fingerprints: HashMap::new(),
            checkpointing: None,
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
        }
    }

    /// Sets how many messages each channel holds.
    pub fn channel_capacity(mut self, capacity: usize) -> Self {
        self.channel_capacity = capacity.max(1);
        self
    }

    /// Adds an operator. `event_time` applies to sources: their watermarks are derived
    /// from that column of the main output.
    pub fn add_node(
        &mut self,
        name: impl Into<String>,
        instance: OperatorInstance,
        outputs: Vec<OutputSpec>,
        inputs: Vec<InputRef>,
        event_time: Option<EventTimeSpec>,
    ) {
        self.nodes.push(NodeDef {
            name: name.into(),
            instance,
            outputs,
            inputs,
            event_time,
            partition: None,
        });
    }

    /// Adds a transform that runs as `instances.len()` parallel instances. Each row of
    /// its inputs goes to one instance, chosen by a fixed hash of its `keys` columns, so
    /// each instance sees every row of its keys; watermarks, barriers and ends go to all.
    /// Its consumers read every instance, taking the minimum watermark and aligning
    /// checkpoint barriers across them. Each instance's state is checkpointed apart
    /// (`NODE#INSTANCE`); state taken at another parallelism is not restored.
    pub fn add_partitioned_node(
        &mut self,
        name: impl Into<String>,
        instances: Vec<OperatorInstance>,
        outputs: Vec<OutputSpec>,
        inputs: Vec<InputRef>,
        keys: Vec<String>,
    ) {
        let name = name.into();
        let of = instances.len();
        for (index, instance) in instances.into_iter().enumerate() {
            self.nodes.push(NodeDef {
                name: name.clone(),
                instance,
                outputs: outputs.clone(),
                inputs: inputs.clone(),
                event_time: None,
                partition: Some(Partitioning {
                    instance: index,
                    of,
                    keys: keys.clone(),
                }),
            });
        }
    }

    /// How many instances `parallelism: auto` runs: the worker threads of the tokio
    /// runtime this is called on (`weir --threads`), or the machine's cores outside one.
    pub fn auto_parallelism() -> usize {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime.metrics().num_workers(),
            Err(_) => std::thread::available_parallelism().map_or(1, usize::from),
        }
        .max(1)
    }

    /// Keeps the recent batches of `node`'s main output for queries, within `spec`.
    pub fn retain(&mut self, node: impl Into<String>, spec: RetainSpec) {
        self.retained.insert(node.into(), spec);
    }

    /// Flushes the sink `node` every `interval` while it has written something since
    /// the last flush, instead of every [`DEFAULT_FLUSH_INTERVAL`].
    pub fn flush_interval(&mut self, node: impl Into<String>, interval: Duration) {
        self.flush_intervals.insert(node.into(), interval);
    }

    /// Checkpoints the pipeline as `settings` say, restoring what they hold.
    pub fn checkpointing(&mut self, settings: CheckpointSettings) {
        self.checkpointing = Some(settings);
    }

    /// What identifies `node`'s configuration (kind and config): its checkpointed state
    /// is restored only into a node with the same fingerprint.
    pub fn fingerprint(&mut self, node: impl Into<String>, fingerprint: impl Into<String>) {
        self.fingerprints.insert(node.into(), fingerprint.into());
    }

    /// Connects the nodes. Fails when an input names no node or port, or when the graph
    /// has a cycle; the pipeline validator reports those with locations first.
    pub fn build(self, metrics: &EngineMetrics) -> Result<Pipeline, PipelineError> {
        let graph_error = |message: String| PipelineError::Graph {
            pipeline: self.name.clone(),
            message,
        };
        // Each node's definitions: one, or one per instance of a partitioned node.
        let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            groups.entry(node.name.as_str()).or_default().push(i);
        }
        for (name, defs) in &groups {
            let expected = self.nodes[defs[0]].partition.as_ref().map_or(1, |p| p.of);
            if defs.len() != expected {
                return Err(graph_error("two operators have the same name".into()));
            }
            if self.nodes[defs[0]].partition.is_some()
                && !matches!(self.nodes[defs[0]].instance, OperatorInstance::Transform(_))
            {
                return Err(graph_error(format!(
                    "'{name}' runs as several instances, but only transforms can"
                )));
            }
        }
        // The first definition of each node stands for it where instances do not matter.
        let index: HashMap<&str, usize> =
            groups.iter().map(|(name, defs)| (*name, defs[0])).collect();
        check_acyclic(&self.nodes, &index).map_err(&graph_error)?;
        if let Some(node) = self.retained.keys().find(|node| {
            index
                .get(node.as_str())
                .is_none_or(|&i| self.nodes[i].outputs.is_empty())
        }) {
            return Err(graph_error(format!(
                "'{node}' is retained, but it is not an operator with an output"
            )));
        }

        let mut views = Vec::new();
        // The instances of a node share its view: one stream to retain and to tap.
        let mut node_views: HashMap<&str, Arc<StreamView>> = HashMap::new();
        let mut ports: Vec<Vec<OutputPort>> = self
            .nodes
            .iter()
            .map(|node| {
                node.outputs
                    .iter()
                    .enumerate()
                    .map(|(port, spec)| OutputPort {
                        edges: Vec::new(),
                        unwired_drop_reason: spec.unwired_drop_reason,
                        view: (port == 0)
                            .then(|| {
                                node_views
                                    .entry(node.name.as_str())
                                    .or_insert_with(|| {
                                        let view = Arc::new(StreamView::new(
                                            &self.name,
                                            &node.name,
                                            spec.stream.schema.clone(),
                                            self.retained.get(&node.name).copied(),
                                            metrics.stream(&self.name, &node.name),
                                        ));
                                        views.push(view.clone());
                                        view
                                    })
                                    .clone()
                            })
                            .inspect(|view| view.add_producer()),
                    })
                    .collect()
            })
            .collect();
        // The channels into each instance of a partitioned consumer, gathered per
        // (producer definition, port, consumer, declared input) to become one edge.
        type Partitioned = Vec<(usize, mpsc::Sender<Message>)>;
        let mut partitioned: BTreeMap<(usize, usize, usize, usize), Partitioned> = BTreeMap::new();
        let mut receivers: Vec<Vec<InputChannel>> = Vec::with_capacity(self.nodes.len());
        for (consumer, node) in self.nodes.iter().enumerate() {
            let mut channels = Vec::with_capacity(node.inputs.len());
            for (declared, input) in node.inputs.iter().enumerate() {
                let producers = groups.get(input.node.as_str()).ok_or_else(|| {
                    graph_error(format!(
                        "'{}' reads from '{}', which does not exist",
                        node.name, input.node
                    ))
                })?;
                let port = self.nodes[producers[0]]
                    .outputs
                    .iter()
                    .position(|spec| spec.name == input.port)
                    .ok_or_else(|| {
                        graph_error(format!(
                            "'{}' reads from port '{}' of '{}', which has no such port",
                            node.name, input.port, input.node
                        ))
                    })?;
                for &upstream in producers {
                    let (tx, rx) = mpsc::channel(self.channel_capacity);
                    match &node.partition {
                        Some(partition) => {
                            // Keyed by the consumer's first instance, so its instances meet
                            // (add_partitioned_node adds a node's instances side by side).
                            let group = consumer - partition.instance;
                            partitioned
                                .entry((upstream, port, group, declared))
                                .or_default()
                                .push((partition.instance, tx));
                        }
                        None => ports[upstream][port].edges.push(Edge::Direct(tx)),
                    }
                    let depth = metrics.channel_depth(&self.name, &node.name, &input.node);
                    let producer = &self.nodes[upstream];
                    let idle_timeout = match producer.instance {
                        OperatorInstance::Source(_) => producer
                            .event_time
                            .as_ref()
                            .and_then(|spec| spec.idle_timeout),
                        _ => None,
                    };
                    channels.push(InputChannel::new(rx, depth, idle_timeout).for_input(declared));
                }
            }
            receivers.push(channels);
        }
        for ((upstream, port, consumer, _), mut senders) in partitioned {
            let Some(partition) = &self.nodes[consumer].partition else {
                continue;
            };
            senders.sort_by_key(|(instance, _)| *instance);
            let schema = &self.nodes[upstream].outputs[port].stream.schema;
            let router =
                KeyRouter::new(schema, &partition.keys, partition.of).map_err(|message| {
                    graph_error(format!("'{}': {message}", self.nodes[consumer].name))
                })?;
            let senders = senders.into_iter().map(|(_, sender)| sender).collect();
            ports[upstream][port]
                .edges
                .push(Edge::Partitioned(router, senders));
        }

        let mut nodes = self.nodes;
        let coordinator = match self.checkpointing {
            Some(settings) => Some(restore(
                &self.name,
                &mut nodes,
                &self.fingerprints,
                settings,
            )),
            None => None,
        };
        let cancel = CancellationToken::new();
        let mut tasks = Vec::with_capacity(nodes.len());
        for (index, ((node, ports), inputs)) in
            nodes.into_iter().zip(ports).zip(receivers).enumerate()
        {
            let link = coordinator
                .as_ref()
                .map(|coordinator| coordinator.link(index));
            let op_metrics = metrics.operator(&self.name, &node.name);
            let outputs = OutputPorts { ports };
            let runner = match node.instance {
                OperatorInstance::Source(source) => {
                    let watermarks = match &node.event_time {
                        Some(spec) => {
                            let schema = &node
                                .outputs
                                .first()
                                .ok_or_else(|| {
                                    graph_error(format!(
                                        "source '{}' declares no output",
                                        node.name
                                    ))
                                })?
                                .stream
                                .schema;
                            let column = schema.index_of(&spec.column).map_err(|_| {
                                graph_error(format!(
                                    "source '{}' has no event-time column '{}'",
                                    node.name, spec.column
                                ))
                            })?;
                            Some(WatermarkGenerator::new(spec, column))
                        }
                        None => None,
                    };
                    let ctx = SourceContext {
                        outputs,
                        watermarks,
                        cancel: cancel.clone(),
                        metrics: op_metrics.clone(),
                        rejects: None,
                        future_logged: false,
                        checkpoint: link,
                    };
                    NodeRunner::Source(source, ctx)
                }
                OperatorInstance::Transform(transform) => NodeRunner::Transform(
                    transform,
                    InputMerger::new(inputs),
                    outputs,
                    op_metrics.clone(),
                    link,
                ),
                OperatorInstance::Sink(sink) => {
                    let flush_interval = self
                        .flush_intervals
                        .get(&node.name)
                        .copied()
                        .unwrap_or(DEFAULT_FLUSH_INTERVAL);
                    NodeRunner::Sink(
                        sink,
                        InputMerger::new(inputs),
                        op_metrics.clone(),
                        flush_interval,
                        link,
                    )
                }
            };
            tasks.push((node.name, runner, op_metrics));
        }
        Ok(Pipeline {
            running: metrics.pipeline_running(&self.name),
            name: self.name,
            tasks,
            cancel,
            views,
            coordinator,
        })
    }
}

/// A node's fingerprint without the parallelism a partitioned node's carries.
fn without_parallelism(fingerprint: &str) -> &str {
    match fingerprint.rsplit_once(" parallelism=") {
        Some((rest, count)) if count.parse::<usize>().is_ok() => rest,
        _ => fingerprint,
    }
}

/// Restores every node whose fingerprint matches the checkpoint's and makes the
/// pipeline's coordinator. A node that changed, or whose state does not restore, starts
/// afresh (its old state is dropped at the first commit); a damaged checkpoint never
/// keeps the pipeline from starting.
///
/// Sinks go first: a sink that cannot go on from the checkpoint (a Parquet file cannot
/// be cut back) would lose what the sources already got past, so then every node
/// starts afresh and the run replays its input from the start.
fn restore(
    pipeline: &str,
    nodes: &mut [NodeDef],
    fingerprints: &HashMap<String, String>,
    settings: CheckpointSettings,
) -> Coordinator {
    let stored_epoch = settings
        .restored
        .as_ref()
        .map_or(0, |checkpoint| checkpoint.epoch);
    for node in nodes.iter_mut() {
        if let OperatorInstance::Sink(sink) = &mut node.instance {
            sink.checkpointing(stored_epoch);
        }
    }
    let restored = settings.restored.filter(|checkpoint| {
        if checkpoint.finished {
            info!(
                pipeline,
                epoch = checkpoint.epoch,
                "the last run finished: starting afresh"
            );
        }
        !checkpoint.finished
    });
    let epoch = restored.as_ref().map_or(0, |checkpoint| checkpoint.epoch);
    // An instance's state holds only the keys routed to it at its parallelism, so the
    // parallelism is part of what must match for it to be restored.
    let fingerprint_of = |node: &NodeDef| {
        let fingerprint = fingerprints.get(&node.name).cloned().unwrap_or_default();
        match &node.partition {
            Some(partition) if partition.of > 1 => {
                format!("{fingerprint} parallelism={}", partition.of)
            }
            _ => fingerprint,
        }
    };
    // The node a state name belongs to: `NODE`, or `NODE#INSTANCE` of a partitioned one.
    let node_of = |state_name: &str| -> String {
        match state_name.rsplit_once('#') {
            Some((node, instance)) if instance.parse::<usize>().is_ok() => node.to_owned(),
            _ => state_name.to_owned(),
        }
    };
    let mut kept = vec![false; nodes.len()];
    if let Some(checkpoint) = &restored {
        // State taken at another parallelism, said once per node however many of its
        // instances meet it.
        let mut rescaled: Vec<String> = Vec::new();
        let mut say_rescaled = |node: &str| {
            if !rescaled.iter().any(|said| said == node) {
                info!(pipeline, operator = %node, "its parallelism changed since the last checkpoint, and state is not redistributed: it starts afresh");
                rescaled.push(node.to_owned());
            }
        };
        for gone in checkpoint
            .nodes
            .keys()
            .filter(|name| !nodes.iter().any(|node| node.state_name() == **name))
        {
            let node = node_of(gone);
            if nodes.iter().any(|running| running.name == node) {
                say_rescaled(&node);
                continue;
            }
            info!(pipeline, operator = %gone, "no longer in the pipeline: its checkpointed state is dropped");
        }
        let sinks_first = {
            let mut order: Vec<usize> = (0..nodes.len()).collect();
            order.sort_by_key(|&index| !matches!(nodes[index].instance, OperatorInstance::Sink(_)));
            order
        };
        for index in sinks_first {
            let node = &mut nodes[index];
            let fingerprint = fingerprint_of(node);
            let is_sink = matches!(node.instance, OperatorInstance::Sink(_));
            match checkpoint.nodes.get(&node.state_name()) {
                Some((saved, state)) if *saved == fingerprint => {
                    let outcome = match &mut node.instance {
                        OperatorInstance::Source(source) => state
                            .whole()
                            .map_or(Ok(()), |position| source.restore(position)),
                        OperatorInstance::Transform(transform) => transform.restore(state),
                        OperatorInstance::Sink(sink) => sink.restore(state),
                    };
                    match outcome {
                        Ok(()) => {
                            info!(pipeline, operator = %node.name, "state restored from the last checkpoint");
                            kept[index] = true;
                        }
                        Err(restore_error) if is_sink => {
                            settings.metrics.failed("restore");
                            error!(pipeline, operator = %node.name, "{restore_error}: the whole pipeline starts afresh, from the start of its input");
                            kept.iter_mut().for_each(|kept| *kept = false);
                            break;
                        }
                        Err(restore_error) => {
                            settings.metrics.failed("restore");
                            error!(pipeline, operator = %node.name, "its checkpointed state does not restore ({restore_error}): it starts afresh");
                        }
                    }
                }
                Some((saved, _))
                    if without_parallelism(saved) == without_parallelism(&fingerprint) =>
                {
                    say_rescaled(&node.name);
                }
                Some(_) => {
                    info!(pipeline, operator = %node.name, "its kind or config changed since the last checkpoint: it starts afresh");
                }
                None => {}
            }
        }
    }
    let entries = nodes
        .iter()
        .zip(kept)
        .map(|(node, kept)| NodeEntry {
            name: node.state_name(),
            fingerprint: fingerprint_of(node),
            is_source: matches!(node.instance, OperatorInstance::Source(_)),
            pending: if kept {
                StateChanges::unchanged()
            } else {
                StateChanges::cleared()
            },
        })
        .collect();
    Coordinator::new(
        pipeline,
        settings.store,
        settings.interval,
        entries,
        epoch,
        settings.metrics,
    )
}

fn check_acyclic(nodes: &[NodeDef], index: &HashMap<&str, usize>) -> Result<(), String> {
    // Depth-first search with colours: 0 unvisited, 1 on the stack, 2 done.
    fn visit(
        node: usize,
        nodes: &[NodeDef],
        index: &HashMap<&str, usize>,
        colour: &mut [u8],
    ) -> Result<(), String> {
        colour[node] = 1;
        for input in &nodes[node].inputs {
            let Some(&upstream) = index.get(input.node.as_str()) else {
                continue;
            };
            match colour[upstream] {
                1 => {
                    return Err(format!(
                        "'{}' and '{}' form a cycle",
                        nodes[node].name, input.node
                    ));
                }
                0 => visit(upstream, nodes, index, colour)?,
                _ => {}
            }
        }
        colour[node] = 2;
        Ok(())
    }
    let mut colour = vec![0u8; nodes.len()];
    for node in 0..nodes.len() {
        if colour[node] == 0 {
            visit(node, nodes, index, &mut colour)?;
        }
    }
    Ok(())
}

enum NodeRunner {
    Source(Box<dyn Source>, SourceContext),
    Transform(
        Box<dyn Transform>,
        InputMerger,
        OutputPorts,
        OperatorMetrics,
        Option<NodeLink>,
    ),
    Sink(
        Box<dyn Sink>,
        InputMerger,
        OperatorMetrics,
        Duration,
        Option<NodeLink>,
    ),
}

/// A wired pipeline, ready to run.
pub struct Pipeline {
    name: String,
    tasks: Vec<(String, NodeRunner, OperatorMetrics)>,
    cancel: CancellationToken,
    running: prometheus::IntGauge,
    views: Vec<Arc<StreamView>>,
    coordinator: Option<Coordinator>,
}

impl Pipeline {
    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The main output stream of every source and transform, in the order they were
    /// added: for queries over retained streams and for taps, while the pipeline runs.
    pub fn streams(&self) -> &[Arc<StreamView>] {
        &self.views
    }

    /// Runs every operator until all sources have ended and the graph has drained.
    ///
    /// Cancelling `shutdown` asks the sources to stop; what is in flight still drains,
    /// open windows close and sinks flush. The first operator failure cancels the
    /// sources in the same way and is returned once the graph has drained.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), PipelineError> {
        let Pipeline {
            name,
            tasks,
            cancel,
            running,
            views: _,
            coordinator,
        } = self;
        running.set(1);
        let coordinator = coordinator.map(|coordinator| tokio::spawn(coordinator.run()));
        let forward = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => cancel.cancel(),
                    _ = cancel.cancelled() => {}
                }
            })
        };
        // Dropping the set (e.g. when a shutdown deadline passes) aborts every task.
        let mut set = JoinSet::new();
        let mut names = HashMap::new();
        for (operator, runner, metrics) in tasks {
            let span = info_span!("operator", pipeline = %name, operator = %operator);
            let handle = set.spawn(run_node(runner, metrics).instrument(span));
            names.insert(handle.id(), operator);
        }
        let mut failure: Option<PipelineError> = None;
        while let Some(joined) = set.join_next_with_id().await {
            let (operator, outcome) = match joined {
                Ok((id, outcome)) => (names.remove(&id).unwrap_or_default(), outcome.map_err(Some)),
                Err(join_error) => {
                    let operator = names.remove(&join_error.id()).unwrap_or_default();
                    if join_error.is_cancelled() {
                        (operator, Ok(()))
                    } else {
                        let message = panic_message(join_error.into_panic());
                        error!(pipeline = %name, operator = %operator, "operator panicked: {message}");
                        cancel.cancel();
                        failure.get_or_insert(PipelineError::Panic {
                            pipeline: name.clone(),
                            operator,
                            message,
                        });
                        continue;
                    }
                }
            };
            match outcome {
                Ok(()) | Err(Some(OperatorError::DownstreamClosed)) | Err(None) => {
                    debug!(pipeline = %name, operator = %operator, "operator finished");
                }
                Err(Some(source)) => {
                    error!(pipeline = %name, operator = %operator, "operator failed: {source}");
                    cancel.cancel();
                    failure.get_or_insert(PipelineError::Operator {
                        pipeline: name.clone(),
                        operator,
                        source,
                    });
                }
            }
        }
        forward.abort();
        if let Some(coordinator) = coordinator {
            // It commits the last epoch once every node has ended, and gives up when one
            // failed; either way it is done once the nodes are.
            let _ = coordinator.await;
        }
        running.set(0);
        failure.map_or(Ok(()), Err)
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

async fn run_node(runner: NodeRunner, metrics: OperatorMetrics) -> Result<(), OperatorError> {
    let outcome = match runner {
        NodeRunner::Source(mut source, mut ctx) => {
            let mut outcome = source.run(&mut ctx).await;
            if outcome.is_ok()
                && let Some(link) = &ctx.checkpoint
            {
                match source.snapshot() {
                    Ok(position) => link.ended(
                        position.map_or_else(StateChanges::unchanged, StateChanges::whole),
                        !ctx.cancel.is_cancelled(),
                    ),
                    Err(snapshot_error) => outcome = Err(snapshot_error),
                }
            }
            // The end of the stream follows even a failure, so downstream drains what it has.
            ctx.outputs.send_end().await;
            outcome
        }
        NodeRunner::Transform(transform, inputs, outputs, metrics, link) => {
            run_transform(transform, inputs, outputs, &metrics, link).await
        }
        NodeRunner::Sink(sink, inputs, metrics, flush_interval, link) => {
            run_sink(sink, inputs, &metrics, flush_interval, link).await
        }
    };
    if matches!(&outcome, Err(e) if !matches!(e, OperatorError::DownstreamClosed)) {
        metrics.errors.inc();
    }
    outcome
}

async fn forward(
    collector: &mut Collector,
    outputs: &mut OutputPorts,
    metrics: &OperatorMetrics,
) -> Result<(), OperatorError> {
    for (reason, rows) in collector.dropped.drain(..) {
        metrics.dropped(reason, rows);
    }
    for (port, batch) in collector.batches.drain(..) {
        outputs.send_batch(port, batch, metrics).await?;
    }
    Ok(())
}

async fn run_transform(
    mut transform: Box<dyn Transform>,
    mut inputs: InputMerger,
    mut outputs: OutputPorts,
    metrics: &OperatorMetrics,
    link: Option<NodeLink>,
) -> Result<(), OperatorError> {
    let mut collector = Collector::new();
    let mut forwarded = Watermark::START;
    let outcome = async {
        loop {
            match inputs.next().await {
                InputEvent::Batch(input, batch) => {
                    metrics.rows_in.inc_by(batch.num_rows() as u64);
                    metrics.batches_in.inc();
                    let started = Instant::now();
                    transform
                        .process_batch(input, batch, &mut collector)
                        .await?;
                    metrics.processing.observe(started.elapsed().as_secs_f64());
                    forward(&mut collector, &mut outputs, metrics).await?;
                }
                InputEvent::Watermark(watermark) => {
                    metrics.watermark.set(watermark.millis());
                    let started = Instant::now();
                    transform.on_watermark(watermark, &mut collector).await?;
                    metrics.processing.observe(started.elapsed().as_secs_f64());
                    forward(&mut collector, &mut outputs, metrics).await?;
                    let downstream = transform.output_watermark(watermark);
                    if downstream > forwarded {
                        forwarded = downstream;
                        outputs.send_watermark(downstream).await?;
                    }
                }
                // Consumers stop waiting for this operator's watermark while its inputs
                // are idle, as they would for a quiet source.
                InputEvent::Idle(idle) => outputs.send_idle(idle).await?,
                // Everything before the barrier has been processed and its results
                // sent: the barrier follows them downstream.
                InputEvent::Barrier(epoch) => {
                    if let Some(link) = &link {
                        link.snapshot(epoch, transform.snapshot()?);
                    }
                    outputs.send_barrier(epoch).await?;
                }
                InputEvent::End => {
                    // The end of the stream is the final watermark: every window closes.
                    transform
                        .on_watermark(Watermark::END, &mut collector)
                        .await?;
                    forward(&mut collector, &mut outputs, metrics).await?;
                    transform.on_close(&mut collector).await?;
                    forward(&mut collector, &mut outputs, metrics).await?;
                    if let Some(link) = &link {
                        link.ended(transform.snapshot()?, true);
                    }
                    return Ok(());
                }
            }
        }
    }
    .await;
    outputs.send_end().await;
    outcome
}

async fn run_sink(
    mut sink: Box<dyn Sink>,
    mut inputs: InputMerger,
    metrics: &OperatorMetrics,
    flush_interval: Duration,
    mut link: Option<NodeLink>,
) -> Result<(), OperatorError> {
    sink.start().await?;
    let mut completed = link.as_ref().map(|link| link.completed.clone());
    let mut committed = completed
        .as_ref()
        .map_or(0, |completed| *completed.borrow());
    // Written but not yet flushed: the timer flushes only then, so an idle sink does no
    // work, and a closed window reaches its file within one interval.
    let mut unflushed = false;
    let mut flush_at = tokio::time::Instant::now() + flush_interval;
    loop {
        let event = tokio::select! {
            event = inputs.next() => event,
            () = tokio::time::sleep_until(flush_at), if unflushed => {
                sink.flush().await?;
                unflushed = false;
                continue;
            }
            epoch = completed_after(&mut completed, committed) => {
                committed = epoch;
                sink.commit(epoch).await?;
                continue;
            }
        };
        match event {
            InputEvent::Batch(input, batch) => {
                metrics.rows_in.inc_by(batch.num_rows() as u64);
                metrics.batches_in.inc();
                let started = Instant::now();
                sink.write(input, batch).await?;
                metrics.processing.observe(started.elapsed().as_secs_f64());
                if !unflushed {
                    unflushed = true;
                    flush_at = tokio::time::Instant::now() + flush_interval;
                }
            }
            InputEvent::Watermark(watermark) => {
                metrics.watermark.set(watermark.millis());
                sink.on_watermark(watermark).await?;
            }
            InputEvent::Idle(_) => {}
            // What came before the barrier is made durable before anything after it is
            // written.
            InputEvent::Barrier(epoch) => {
                sink.flush().await?;
                unflushed = false;
                if let Some(link) = &link {
                    link.snapshot(epoch, sink.snapshot(epoch).await?);
                }
            }
            InputEvent::End => {
                sink.on_watermark(Watermark::END).await?;
                sink.close().await?;
                let Some(link) = link.take() else {
                    return Ok(());
                };
                // The epoch the last checkpoint will have: the one in flight, or the next.
                let completed_now = completed.as_ref().map_or(committed, |c| *c.borrow());
                let requested = *link.requested.borrow();
                let last = if requested > completed_now {
                    requested
                } else {
                    completed_now + 1
                };
                link.ended(sink.snapshot(last).await?, true);
                drop(link);
                // The pipeline's last checkpoint is written once every node has ended;
                // the coordinator then stops. Commit what it completed.
                if let Some(mut completed) = completed {
                    while completed.changed().await.is_ok() {}
                    let epoch = *completed.borrow();
                    if epoch > committed {
                        sink.commit(epoch).await?;
                    }
                }
                return Ok(());
            }
        }
    }
}
