//! Validating a document against the operator registry and planning it into the nodes
//! of an engine graph.
//!
//! Validation is pure and reports every problem it can find in one run: unknown kinds,
//! inputs that name no node or port, cycles, and whatever each factory's `plan` reports
//! about its config. Nodes are planned in topological order so each factory sees the
//! schemas of its inputs. A node whose own declaration or whose upstream failed is not
//! planned, so one mistake does not cascade into a screen of follow-on errors.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use weir_engine::arrow::datatypes::Schema;
use weir_engine::config::{ConfigError, Location, choices_hint};
use weir_engine::error::{OperatorError, PipelineError};
use weir_engine::graph::{InputRef, Pipeline, PipelineBuilder};
use weir_engine::metrics::EngineMetrics;
use weir_engine::observe::RetainSpec;
use weir_engine::registry::{
    InputStream, MAIN_PORT_NAME, NodeContext, OnError, OperatorFactory, OutputSpec, Partitionable,
    PeerNode, PlannedOperator, StreamInfo,
};
use weir_engine::time::EventTimeSpec;
use weir_engine::{Registry, Role};

use crate::spec::{Document, NodeSpec, check_event_time_column, role_noun};

/// A pipeline whose every node has been planned: ready to build and run.
pub struct ValidatedPipeline {
    name: String,
    file: PathBuf,
    name_location: Location,
    nodes: Vec<PlannedNode>,
    checkpoint_interval: Option<std::time::Duration>,
}

/// One planned node: what `weir describe` shows, and the operator ready to instantiate.
pub struct PlannedNode {
    name: String,
    role: Role,
    kind: String,
    inputs: Vec<InputRef>,
    outputs: Vec<OutputSpec>,
    event_time: Option<EventTimeSpec>,
    retain: Option<RetainSpec>,
    flush_interval: Option<std::time::Duration>,
    fingerprint: String,
    /// One planned operator per instance: one, or `parallelism` of them.
    operators: Vec<Box<dyn PlannedOperator>>,
    /// The input columns rows are routed to instances by, when it runs several.
    partition_keys: Vec<String>,
}

impl PlannedNode {
    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the node's operator says about how it will run (see
    /// [`PlannedOperator::notes`]).
    pub fn notes(&self) -> Vec<String> {
        let mut notes = self
            .operators
            .first()
            .map(|operator| operator.notes())
            .unwrap_or_default();
        if self.operators.len() > 1 {
            notes.push(format!(
                "it runs as {} instances, each row going to one by its {}",
                self.operators.len(),
                self.partition_keys.join(", ")
            ));
        }
        notes
    }

    /// How many instances of the node run at once.
    pub fn parallelism(&self) -> usize {
        self.operators.len()
    }

    /// The input columns whose values choose each row's instance; empty when one
    /// instance runs.
    pub fn partition_keys(&self) -> &[String] {
        &self.partition_keys
    }

    /// The section the node was declared in.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The operator kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The upstream ports this node reads, in declaration order.
    pub fn inputs(&self) -> &[InputRef] {
        &self.inputs
    }

    /// The output ports, main port first; empty for sinks. For sources the main port's
    /// event-time column is the effective one.
    pub fn outputs(&self) -> &[OutputSpec] {
        &self.outputs
    }

    /// The effective event-time declaration of a source: the one in the YAML, or the
    /// column the operator itself names (with no allowed lateness).
    pub fn event_time(&self) -> Option<&EventTimeSpec> {
        self.event_time.as_ref()
    }

    /// How much of the node's output is kept for queries, when it is retained.
    pub fn retain(&self) -> Option<RetainSpec> {
        self.retain
    }
}

impl fmt::Debug for PlannedNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlannedNode")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("kind", &self.kind)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("event_time", &self.event_time)
            .field("retain", &self.retain)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ValidatedPipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidatedPipeline")
            .field("name", &self.name)
            .field("file", &self.file)
            .field("nodes", &self.nodes)
            .finish()
    }
}

/// Why a validated pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An operator could not be created, e.g. a file sink could not create its file.
    #[error("{role} '{node}': {source}")]
    Operator {
        /// `source`, `transform` or `sink`.
        role: &'static str,
        /// The node's name.
        node: String,
        /// What went wrong.
        #[source]
        source: OperatorError,
    },
    /// The engine refused the wiring. Validation rules this out, so it means a bug.
    #[error(transparent)]
    Graph(#[from] PipelineError),
}

impl ValidatedPipeline {
    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file the pipeline was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Where the pipeline's name is written in its file.
    pub fn name_location(&self) -> Location {
        self.name_location
    }

    /// The nodes in topological order (every node after the nodes it reads from).
    pub fn nodes(&self) -> &[PlannedNode] {
        &self.nodes
    }

    /// The node called `name`, if any.
    pub fn node(&self, name: &str) -> Option<&PlannedNode> {
        self.nodes.iter().find(|node| node.name == name)
    }

    /// Instantiates every operator and wires them into a runnable pipeline.
    ///
    /// This is the first step that touches the outside world (files, sockets).
    pub fn build(self, metrics: &EngineMetrics) -> Result<Pipeline, BuildError> {
        self.build_checkpointed(metrics, None)
    }

    /// How often the pipeline checkpoints (`checkpoint.interval`); `None` when its YAML
    /// turns checkpoints off (`interval: 0s`).
    pub fn checkpoint_interval(&self) -> Option<std::time::Duration> {
        self.checkpoint_interval
    }

    /// As [`ValidatedPipeline::build`], checkpointing as `checkpoints` say and
    /// restoring what they hold.
    pub fn build_checkpointed(
        self,
        metrics: &EngineMetrics,
        checkpoints: Option<weir_engine::checkpoint::CheckpointSettings>,
    ) -> Result<Pipeline, BuildError> {
        let mut builder = PipelineBuilder::new(&self.name);
        if let Some(settings) = checkpoints {
            builder.checkpointing(settings);
        }
        for node in self.nodes {
            let operator_metrics = metrics.operator(&self.name, &node.name);
            let mut instances = node
                .operators
                .into_iter()
                .map(|operator| operator.instantiate(&operator_metrics))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| BuildError::Operator {
                    role: role_noun(node.role),
                    node: node.name.clone(),
                    source,
                })?;
            if let Some(spec) = node.retain {
                builder.retain(&node.name, spec);
            }
            if let Some(interval) = node.flush_interval {
                builder.flush_interval(&node.name, interval);
            }
            builder.fingerprint(&node.name, node.fingerprint);
            if instances.len() > 1 {
                builder.add_partitioned_node(
                    node.name,
                    instances,
                    node.outputs,
                    node.inputs,
                    node.partition_keys,
                );
            } else if let Some(instance) = instances.pop() {
                builder.add_node(
                    node.name,
                    instance,
                    node.outputs,
                    node.inputs,
                    node.event_time,
                );
            }
        }
        Ok(builder.build(metrics)?)
    }
}

/// What became of a node during validation.
enum State {
    /// Not planned: its declaration, kind or wiring has a problem, or an upstream failed.
    Skipped,
    /// Planned, with its outputs.
    Planned(Box<PlannedNode>),
}

/// Validates `document` against `registry`, collecting every problem into `errors`.
/// Returns the pipeline only when no problem was found (including earlier ones already in
/// `errors`, so callers can pass in what reading the document found).
pub(crate) fn check(
    document: &Document,
    registry: &Registry,
    base_dir: &Path,
    errors: &mut Vec<ConfigError>,
) -> Option<ValidatedPipeline> {
    let nodes = &document.nodes;
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| (node.name.as_str(), i))
        .collect();

    // Each node's factory, when its kind exists for its section.
    let factories: Vec<Option<&dyn OperatorFactory>> = nodes
        .iter()
        .map(|node| check_kind(node, registry, errors))
        .collect();

    // Each node's upstream node indices, when every input names a node with outputs.
    let upstreams: Vec<Option<Vec<usize>>> = nodes
        .iter()
        .map(|node| resolve_inputs(node, nodes, &index, errors))
        .collect();

    let peers: Vec<PeerNode<'_>> = nodes
        .iter()
        .map(|node| PeerNode {
            name: &node.name,
            kind: &node.kind,
            config: &node.config,
        })
        .collect();

    let in_cycle = report_cycles(nodes, &upstreams, errors);
    let order = topological_order(nodes.len(), &upstreams, &in_cycle);

    let mut states: Vec<Option<State>> = (0..nodes.len()).map(|_| None).collect();
    for &i in &order {
        let node = &nodes[i];
        // Nodes with unplanned or unresolved upstreams are still planned, with unknown
        // input schemas, so that their own mistakes are reported in the same run.
        let ready = node.sound && !in_cycle[i];
        let state = match (factories[i], ready) {
            (Some(factory), true) => plan_node(
                document,
                (node, &peers),
                factory,
                &upstreams[i],
                &states,
                base_dir,
                errors,
            ),
            _ => State::Skipped,
        };
        states[i] = Some(state);
    }

    if !errors.is_empty() {
        return None;
    }
    let mut planned = Vec::with_capacity(order.len());
    for i in order {
        match states[i].take() {
            Some(State::Planned(node)) => planned.push(*node),
            // Without errors every node is planned; this guards the invariant anyway.
            _ => {
                errors.push(ConfigError::new(
                    nodes[i].path(),
                    nodes[i].location,
                    "internal error: node was not planned",
                ));
                return None;
            }
        }
    }
    Some(ValidatedPipeline {
        name: document.name.clone(),
        file: document.file.clone(),
        name_location: document.name_location,
        nodes: planned,
        checkpoint_interval: document.checkpoint_interval,
    })
}

fn check_kind<'r>(
    node: &NodeSpec,
    registry: &'r Registry,
    errors: &mut Vec<ConfigError>,
) -> Option<&'r dyn OperatorFactory> {
    if node.kind.is_empty() {
        // Missing or mistyped `kind`: reading the document reported it.
        return None;
    }
    let noun = role_noun(node.role);
    let valid = registry.kinds_for(node.role);
    let path = format!("{}.kind", node.path());
    let elsewhere = registry.roles_of(&node.kind);
    match registry.get(node.role, &node.kind) {
        None if let Some(feature) = registry.left_out_feature(node.role, &node.kind) => {
            errors.push(
                ConfigError::new(
                    path,
                    node.kind_location,
                    format!(
                        "this build of weir has no '{}' {noun}: it was built without the \
                         `{feature}` feature",
                        node.kind
                    ),
                )
                .with_hint(format!(
                    "the default build has it; or build with `--features {feature}`"
                )),
            );
            None
        }
        Some(factory) => {
            // Only a kind whose output Weir cannot derive (a module) declares it.
            if node.role == Role::Transform
                && node.schema.is_some()
                && !factory.declares_output_schema()
            {
                errors.push(
                    ConfigError::new(
                        format!("{}.schema", node.path()),
                        node.schema_location,
                        format!("a '{}' transform takes no 'schema'", node.kind),
                    )
                    .with_hint(crate::spec::SCHEMA_HINT),
                );
            }
            Some(factory.as_ref())
        }
        None if !elsewhere.is_empty() => {
            let roles: Vec<&str> = elsewhere.iter().map(|r| role_noun(*r)).collect();
            errors.push(
                ConfigError::new(
                    path,
                    node.kind_location,
                    format!("'{}' is not a {noun} kind", node.kind),
                )
                .with_hint(format!(
                    "'{}' is a {} kind; valid {noun} kinds: {}",
                    node.kind,
                    roles.join(" and "),
                    valid.join(", ")
                )),
            );
            None
        }
        None => {
            errors.push(
                ConfigError::new(
                    path,
                    node.kind_location,
                    format!("unknown {noun} kind '{}'", node.kind),
                )
                .with_hint(choices_hint(
                    &node.kind,
                    &valid,
                    &format!("valid {noun} kinds"),
                )),
            );
            None
        }
    }
}

fn resolve_inputs(
    node: &NodeSpec,
    nodes: &[NodeSpec],
    index: &HashMap<&str, usize>,
    errors: &mut Vec<ConfigError>,
) -> Option<Vec<usize>> {
    let readable: Vec<&str> = nodes
        .iter()
        .filter(|n| n.role != Role::Sink)
        .map(|n| n.name.as_str())
        .collect();
    let mut upstreams = Vec::with_capacity(node.inputs.len());
    let mut resolved = true;
    for (position, input) in node.inputs.iter().enumerate() {
        let path = format!("{}.inputs[{position}]", node.path());
        match index.get(input.node.as_str()) {
            Some(&u) if nodes[u].role == Role::Sink => {
                errors.push(
                    ConfigError::new(
                        path,
                        input.location,
                        format!("'{}' is a sink and has no output to read", input.node),
                    )
                    .with_hint(format!(
                        "read from a source or transform: {}",
                        readable.join(", ")
                    )),
                );
                resolved = false;
            }
            Some(&u) => upstreams.push(u),
            None => {
                errors.push(
                    ConfigError::new(
                        path,
                        input.location,
                        format!("unknown input '{}'", input.node),
                    )
                    .with_hint(choices_hint(
                        &input.node,
                        &readable,
                        "nodes that can be read",
                    )),
                );
                resolved = false;
            }
        }
    }
    resolved.then_some(upstreams)
}

/// Reports each cycle once and returns which nodes are on one.
///
/// Cycles are the strongly connected components with more than one node, or one node
/// that reads itself (Tarjan's algorithm, recursive: pipelines have few nodes).
fn report_cycles(
    nodes: &[NodeSpec],
    upstreams: &[Option<Vec<usize>>],
    errors: &mut Vec<ConfigError>,
) -> Vec<bool> {
    struct Tarjan<'a> {
        edges: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        components: Vec<Vec<usize>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in &self.edges[v] {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(index) if self.on_stack[w] => self.low[v] = self.low[v].min(index),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                self.components.push(component);
            }
        }
    }

    // Edges point from a node to the nodes it reads from; only resolved inputs count, but
    // a node with some unresolved inputs still contributes the ones that resolved.
    let edges: Vec<Vec<usize>> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| match &upstreams[i] {
            Some(ups) => ups.clone(),
            None => node
                .inputs
                .iter()
                .filter_map(|input| nodes.iter().position(|n| n.name == input.node))
                .filter(|&u| nodes[u].role != Role::Sink)
                .collect(),
        })
        .collect();
    let mut tarjan = Tarjan {
        edges: &edges,
        index: vec![None; nodes.len()],
        low: vec![0; nodes.len()],
        on_stack: vec![false; nodes.len()],
        stack: Vec::new(),
        next: 0,
        components: Vec::new(),
    };
    for v in 0..nodes.len() {
        if tarjan.index[v].is_none() {
            tarjan.visit(v);
        }
    }

    let mut in_cycle = vec![false; nodes.len()];
    let mut components = tarjan.components;
    components.iter_mut().for_each(|c| c.sort_unstable());
    components.sort();
    for component in components {
        let start = component[0];
        if component.len() == 1 && !edges[start].contains(&start) {
            continue;
        }
        for &v in &component {
            in_cycle[v] = true;
        }
        let walk = cycle_through(start, &edges, &component);
        // `walk` follows "reads from" edges; data flows the other way round.
        let mut flow = vec![nodes[start].name.as_str()];
        flow.extend(walk[1..].iter().rev().map(|&v| nodes[v].name.as_str()));
        flow.push(&nodes[start].name);
        let node = &nodes[start];
        let target = walk.get(1).copied().unwrap_or(start);
        let position = node
            .inputs
            .iter()
            .position(|input| input.node == nodes[target].name)
            .unwrap_or(0);
        let location = node
            .inputs
            .get(position)
            .map_or(node.location, |i| i.location);
        errors.push(
            ConfigError::new(
                format!("{}.inputs[{position}]", node.path()),
                location,
                format!("inputs form a cycle: {}", flow.join(" -> ")),
            )
            .with_hint("a pipeline's data must flow one way: remove one of these inputs"),
        );
    }
    in_cycle
}

/// A shortest closed walk from `start` back to itself along `edges` inside `component`,
/// without repeating `start` at the end: `[start, a, b]` means start reads a, a reads b and
/// b reads start.
fn cycle_through(start: usize, edges: &[Vec<usize>], component: &[usize]) -> Vec<usize> {
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &w in edges[v].iter().filter(|w| component.contains(w)) {
            if w == start {
                // Back from v through the BFS parents; the chain ends at start, which
                // has no parent.
                let mut walk = vec![v];
                while let Some(&p) = parent.get(walk.last().unwrap_or(&start)) {
                    walk.push(p);
                }
                walk.reverse();
                return walk;
            }
            if let std::collections::hash_map::Entry::Vacant(slot) = parent.entry(w) {
                slot.insert(v);
                queue.push_back(w);
            }
        }
    }
    vec![start]
}

/// Every node not on or behind a cycle, each after the nodes it reads from; ties go in
/// document order so plans and messages are stable.
fn topological_order(
    count: usize,
    upstreams: &[Option<Vec<usize>>],
    in_cycle: &[bool],
) -> Vec<usize> {
    let mut placed = vec![false; count];
    let mut order = Vec::with_capacity(count);
    loop {
        let mut progressed = false;
        for i in 0..count {
            if placed[i] || in_cycle[i] {
                continue;
            }
            let ready = upstreams[i]
                .as_deref()
                .unwrap_or(&[])
                .iter()
                .all(|&u| placed[u]);
            if ready {
                placed[i] = true;
                order.push(i);
                progressed = true;
            }
        }
        if !progressed {
            return order;
        }
    }
}

fn plan_node(
    document: &Document,
    (node, peers): (&NodeSpec, &[PeerNode<'_>]),
    factory: &dyn OperatorFactory,
    upstreams: &Option<Vec<usize>>,
    states: &[Option<State>],
    base_dir: &Path,
    errors: &mut Vec<ConfigError>,
) -> State {
    let mut streams = Vec::with_capacity(node.inputs.len());
    let mut refs = Vec::with_capacity(node.inputs.len());
    let mut inputs_known = true;
    for (position, input) in node.inputs.iter().enumerate() {
        let upstream = upstreams
            .as_ref()
            .and_then(|ups| ups.get(position).copied());
        let port = input.port_name();
        // Inside the operator (e.g. as a SQL table) a side port goes by `node_port`.
        let name = if port == MAIN_PORT_NAME {
            input.node.clone()
        } else {
            format!("{}_{port}", input.node)
        };
        let output = match upstream.and_then(|u| states[u].as_ref()) {
            Some(State::Planned(upstream)) => {
                let found = upstream.outputs.iter().find(|o| o.name == port);
                if found.is_none() {
                    let ports: Vec<&str> =
                        upstream.outputs.iter().map(|o| o.name.as_str()).collect();
                    errors.push(
                        ConfigError::new(
                            format!("{}.inputs[{position}]", node.path()),
                            input.location,
                            format!("'{}' has no port '{port}'", input.node),
                        )
                        .with_hint(choices_hint(
                            port,
                            &ports,
                            &format!("ports of '{}'", input.node),
                        )),
                    );
                }
                found
            }
            _ => None,
        };
        let stream = match output {
            Some(output) => output.stream.clone(),
            None => {
                // Plan the node anyway so its own mistakes are reported in this run too.
                inputs_known = false;
                StreamInfo {
                    schema: Arc::new(Schema::empty()),
                    event_time: None,
                }
            }
        };
        streams.push(InputStream { name, stream });
        refs.push(InputRef {
            node: input.node.clone(),
            port: port.to_owned(),
        });
    }

    let config_path = format!("{}.config", node.path());
    let context = NodeContext {
        pipeline: &document.name,
        name: &node.name,
        role: node.role,
        config: &node.config,
        config_path: &config_path,
        inputs: &streams,
        inputs_known,
        schema: node.schema.clone(),
        event_time: node.event_time.clone(),
        window: node.window,
        on_error: node.on_error,
        base_dir,
        peers,
    };
    if !inputs_known {
        if let Err(problems) = factory.plan(&context) {
            errors.extend(problems);
        }
        return State::Skipped;
    }
    let operator = match factory.plan(&context) {
        Ok(operator) => operator,
        Err(problems) => {
            if problems.is_empty() {
                errors.push(ConfigError::new(
                    config_path,
                    node.config.location,
                    format!(
                        "the {} kind '{}' rejected this node without saying why",
                        role_noun(node.role),
                        node.kind
                    ),
                ));
            }
            errors.extend(problems);
            return State::Skipped;
        }
    };
    let mut outputs = operator.outputs();
    if node.on_error == OnError::DeadLetter && !outputs.iter().any(|o| o.name == "dead_letter") {
        errors.push(
            ConfigError::new(
                format!("{}.on_error", node.path()),
                node.on_error_location,
                format!(
                    "transform kind '{}' cannot send failing rows to a dead_letter port",
                    node.kind
                ),
            )
            .with_hint("remove on_error, or use a sql transform"),
        );
        return State::Skipped;
    }

    let mut event_time = None;
    if node.role == Role::Source {
        let Some(main) = outputs.first_mut() else {
            errors.push(ConfigError::new(
                node.path(),
                node.location,
                format!(
                    "internal error: source kind '{}' planned no output",
                    node.kind
                ),
            ));
            return State::Skipped;
        };
        match &node.event_time {
            Some(declared) => {
                let problem = check_event_time_column(
                    &main.stream.schema,
                    &declared.column,
                    &format!("{}.event_time.column", node.path()),
                    node.event_time_location,
                    &format!("the output of '{}'", node.name),
                );
                if let Some(problem) = problem {
                    errors.push(problem);
                    return State::Skipped;
                }
                main.stream.event_time = Some(declared.column.clone());
                event_time = Some(declared.clone());
            }
            None => {
                event_time = main.stream.event_time.clone().map(|column| EventTimeSpec {
                    column,
                    max_out_of_order: std::time::Duration::ZERO,
                    ..EventTimeSpec::default()
                });
            }
        }
    }

    let Some(partition_keys) = partition_keys(node, operator.as_ref(), &streams, errors) else {
        return State::Skipped;
    };
    let mut operators = vec![operator];
    let instances = if partition_keys.is_empty() {
        1
    } else {
        node.parallelism.instances()
    };
    while operators.len() < instances {
        match factory.plan(&context) {
            Ok(operator) => operators.push(operator),
            // The same config planned a moment ago; a factory that now refuses it is
            // reported rather than trusted.
            Err(problems) => {
                errors.extend(problems);
                return State::Skipped;
            }
        }
    }
    let mut fingerprint = fingerprint(node);
    if instances > 1 {
        fingerprint.push_str(&format!("\npartition_by: {partition_keys:?}"));
    }

    State::Planned(Box::new(PlannedNode {
        name: node.name.clone(),
        role: node.role,
        kind: node.kind.clone(),
        inputs: refs,
        outputs,
        event_time,
        retain: node.retain,
        flush_interval: node.flush_interval,
        fingerprint,
        operators,
        partition_keys: if instances > 1 {
            partition_keys
        } else {
            Vec::new()
        },
    }))
}

/// The columns a transform's rows are routed to its instances by: its `partition_by`,
/// checked against what its operator allows, or the operator's own keys. Empty when
/// the node declares neither `parallelism` nor `partition_by`; `None` after reporting
/// why it cannot be partitioned as declared.
fn partition_keys(
    node: &NodeSpec,
    operator: &dyn PlannedOperator,
    inputs: &[InputStream],
    errors: &mut Vec<ConfigError>,
) -> Option<Vec<String>> {
    if node.role != Role::Transform
        || (!node.parallelism.is_declared() && node.partition_by.is_none())
    {
        return Some(Vec::new());
    }
    let (path, location) = match &node.partition_by {
        Some(_) => (
            format!("{}.partition_by", node.path()),
            node.partition_by_location,
        ),
        None => (
            format!("{}.parallelism", node.path()),
            node.parallelism_location,
        ),
    };
    let refuse = |message: String, hint: &str| {
        ConfigError::new(path.clone(), location, message).with_hint(hint.to_owned())
    };
    match (operator.partitionable(), &node.partition_by) {
        (Partitionable::No(reason), _) => {
            errors.push(refuse(
                format!(
                    "transform '{}' ({}) cannot run as parallel instances, because {reason}",
                    node.name, node.kind
                ),
                "remove parallelism and partition_by, or split the work into a transform that can",
            ));
            None
        }
        (Partitionable::GroupedBy(keys), None) => Some(keys),
        (Partitionable::GroupedBy(keys), Some(declared)) => {
            let strays: Vec<&str> = declared
                .iter()
                .filter(|column| !keys.contains(column))
                .map(String::as_str)
                .collect();
            if strays.is_empty() {
                return Some(declared.clone());
            }
            errors.push(refuse(
                format!(
                    "transform '{}' keeps its state per {}, so rows cannot be routed by {}: \
                     one group's rows would be split over instances",
                    node.name,
                    keys.join(", "),
                    strays.join(", ")
                ),
                &format!(
                    "partition by some of {}, or leave partition_by out to use all of them",
                    keys.join(", ")
                ),
            ));
            None
        }
        (Partitionable::AnyKeys, None) => {
            errors.push(refuse(
                format!(
                    "transform '{}' keeps no state by key, so it needs partition_by to say how \
                     rows are spread over its instances",
                    node.name
                ),
                "add e.g. partition_by: [device], naming columns with many distinct values",
            ));
            None
        }
        (Partitionable::AnyKeys, Some(declared)) => {
            let mut missing = Vec::new();
            for input in inputs {
                let schema = &input.stream.schema;
                for column in declared {
                    if schema.index_of(column).is_err() {
                        missing.push(format!("'{column}' is not a column of '{}'", input.name));
                    }
                }
            }
            if missing.is_empty() {
                return Some(declared.clone());
            }
            errors.push(refuse(
                format!(
                    "transform '{}' cannot be partitioned by {}: {}",
                    node.name,
                    declared.join(", "),
                    missing.join("; ")
                ),
                "partition by columns that every input has",
            ));
            None
        }
    }
}

/// What a node's checkpointed state is valid for: its kind, inputs and everything it
/// was configured with, without the places they were written (a comment added above a
/// node keeps its state).
fn fingerprint(node: &NodeSpec) -> String {
    fn value(text: &mut String, config: &weir_engine::config::ConfigValue) {
        use std::fmt::Write as _;
        use weir_engine::config::Value;
        match &config.value {
            Value::Null => text.push('~'),
            Value::Bool(b) => write!(text, "{b}").unwrap_or_default(),
            Value::Int(i) => write!(text, "{i}").unwrap_or_default(),
            Value::Float(f) => write!(text, "{f:?}").unwrap_or_default(),
            Value::String(s) => write!(text, "{s:?}").unwrap_or_default(),
            Value::Seq(items) => {
                text.push('[');
                for item in items {
                    value(text, item);
                    text.push(',');
                }
                text.push(']');
            }
            Value::Map(entries) => {
                text.push('{');
                for (key, item) in entries {
                    write!(text, "{:?}:", key.name).unwrap_or_default();
                    value(text, item);
                    text.push(',');
                }
                text.push('}');
            }
        }
    }
    let mut text = format!("{} {}\ninputs: ", node.role.section(), node.kind);
    for input in &node.inputs {
        text.push_str(&format!("{input:?} "));
    }
    text.push_str("\nconfig: ");
    value(&mut text, &node.config);
    text.push_str(&format!(
        "\nwindow: {:?}\nevent_time: {:?}\non_error: {:?}\nschema: {:?}",
        node.window,
        node.event_time,
        node.on_error,
        node.schema.as_ref().map(|schema| schema
            .fields()
            .iter()
            .map(|f| format!("{}:{}", f.name(), f.data_type()))
            .collect::<Vec<_>>()),
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycle_through_finds_the_shortest_loop_back() {
        // 0 reads 1 and 2, 1 reads 2, 2 reads 0: the shortest way back is 0 -> 2 -> 0.
        let edges = vec![vec![1, 2], vec![2], vec![0]];
        assert_eq!(cycle_through(0, &edges, &[0, 1, 2]), [0, 2]);
        let self_loop = vec![vec![0]];
        assert_eq!(cycle_through(0, &self_loop, &[0]), [0]);
    }

    #[test]
    fn topological_order_puts_readers_after_what_they_read() {
        // 0 reads 2, 1 reads nothing, 2 reads 1, 3 is on a cycle, 4 reads 3.
        let upstreams = vec![
            Some(vec![2]),
            Some(vec![]),
            Some(vec![1]),
            Some(vec![3]),
            Some(vec![3]),
        ];
        let in_cycle = [false, false, false, true, false];
        assert_eq!(topological_order(5, &upstreams, &in_cycle), [1, 2, 0]);
    }
}
