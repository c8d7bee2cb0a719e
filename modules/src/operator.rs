//! The `module` operator kind: a source, transform or sink that runs outside the process.
//!
//! Planning checks the config and derives the outputs: a transform's main output has the
//! schema declared on the node (or its input's, for a module that keeps the shape), and
//! its `dead_letter` output carries the input rows of batches the module rejected or
//! failed on every attempt, with an `error` column. Instantiating starts the module's
//! supervisor, so a module is starting while the rest of the pipeline is built.
//!
//! Delivery: each batch gets an id and is sent until the module answers it (at least
//! once to the module); its answer is emitted once, so retries never duplicate rows
//! downstream. One batch is in flight per module, so a slow module backpressures the
//! pipeline.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;
use weir_engine::config::{ConfigErrors, choices_hint};
use weir_engine::ipc::{IpcError, IpcLimits, decode_within};
use weir_engine::metrics::{ModuleMetrics, OperatorMetrics};
use weir_engine::registry::{
    MAIN_PORT_NAME, NodeContext, OperatorFactory, OutputSpec, PlannedOperator, Role, StreamInfo,
};
use weir_engine::{
    Collector, OperatorError, OperatorInstance, Sink, Source, SourceContext, Transform,
};
use weir_module_sdk::client::Client;
use weir_module_sdk::client::ClientError;
use weir_module_sdk::{Endpoint, encode_stream};

use crate::config::{ModuleConfig, TransportKind};
use crate::runtime::{ContainerRuntime, LaunchSpec, Program, Transport};
use crate::source_endpoint::SourceEndpoint;
use crate::supervisor::{
    DependencyLookup, HttpHealthProbe, ModuleState, ModuleStatus, SupervisorConfig,
    SupervisorHandle, supervise,
};

/// The kind name in pipeline YAML.
pub const KIND: &str = "module";
/// The transform's side output for batches that could not be processed.
pub const DEAD_LETTER_PORT: &str = "dead_letter";
/// The column the dead-letter output adds to the input rows.
pub const ERROR_COLUMN: &str = "error";
/// The first wait before a batch is retried; it doubles per attempt, up to
/// [`MAX_RETRY_WAIT`].
const FIRST_RETRY_WAIT: Duration = Duration::from_millis(100);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);

/// What the runtime knows of one module, for `weir status` and `/status`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ModuleReport {
    /// The pipeline.
    pub pipeline: String,
    /// The module's node name.
    pub module: String,
    /// `docker` or `process`.
    pub runtime: String,
    /// Its state (`running`, `backoff`, ...).
    pub state: String,
    /// Restarts so far.
    pub restarts: u64,
    /// Why it is not running or not healthy.
    pub reason: Option<String>,
    /// The last run's exit code.
    pub last_exit_code: Option<i64>,
    /// Whether the last run was OOM-killed.
    pub last_exit_oom: bool,
}

/// Where modules run, shared by every module operator of a process: the runtimes, the
/// root of the module directories, and every module's status.
pub struct ModuleHost {
    root: PathBuf,
    /// `None` in a build without the `docker` feature.
    docker: Option<Arc<dyn ContainerRuntime>>,
    process: Arc<dyn ContainerRuntime>,
    modules: Mutex<BTreeMap<ModuleKey, (&'static str, watch::Receiver<ModuleStatus>)>>,
    policy: crate::policy::ModulePolicy,
}

/// Containers on the local Docker engine, connected on first use.
#[cfg(feature = "docker")]
fn docker_runtime() -> Option<Arc<dyn ContainerRuntime>> {
    Some(Arc::new(crate::runtime::LazyDocker::default()))
}

/// No container runtime: this build has no Docker support.
#[cfg(not(feature = "docker"))]
fn docker_runtime() -> Option<Arc<dyn ContainerRuntime>> {
    None
}

/// Why a container module cannot run in a build without the `docker` feature.
pub(crate) const NO_DOCKER: &str = "this build of weir cannot run container modules: it was \
     built without the `docker` feature; run the module as a process (`command:`), or use \
     the default build";

/// A module by pipeline and node name.
type ModuleKey = (String, String);

impl ModuleHost {
    /// Containers on the local Docker engine (connected on first use), processes as
    /// children, module directories under `root`.
    pub fn new(root: PathBuf) -> Self {
        crate::runtime::process::sweep_leftovers(&root);
        ModuleHost {
            root,
            docker: docker_runtime(),
            process: Arc::new(crate::runtime::ProcessRuntime::new()),
            modules: Mutex::default(),
            policy: crate::policy::ModulePolicy::permissive(),
        }
    }

    /// The same host, running only what `policy` allows.
    pub fn with_policy(mut self, policy: crate::policy::ModulePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// A host whose modules all run on `runtime` (tests, with the fake).
    pub fn with_runtime(root: PathBuf, runtime: Arc<dyn ContainerRuntime>) -> Self {
        ModuleHost {
            root,
            docker: Some(runtime.clone()),
            process: runtime,
            modules: Mutex::default(),
            policy: crate::policy::ModulePolicy::permissive(),
        }
    }

    /// The module directory root: `$WEIR_MODULE_DIR`, else the system's temp directory.
    pub fn default_root() -> PathBuf {
        std::env::var_os("WEIR_MODULE_DIR").map_or_else(std::env::temp_dir, PathBuf::from)
    }

    /// Every module's status, by pipeline and name.
    pub fn reports(&self) -> Vec<ModuleReport> {
        let modules = self.modules.lock().expect("never poisoned");
        modules
            .iter()
            .map(|((pipeline, module), (runtime, status))| {
                let status = status.borrow();
                ModuleReport {
                    pipeline: pipeline.clone(),
                    module: module.clone(),
                    runtime: (*runtime).to_owned(),
                    state: status.state.name().to_owned(),
                    restarts: status.restarts,
                    reason: status.reason.clone(),
                    last_exit_code: status.last_exit.as_ref().and_then(|e| e.code),
                    last_exit_oom: status.last_exit.as_ref().is_some_and(|e| e.oom_killed),
                }
            })
            .collect()
    }

    fn status_of(&self, pipeline: &str, module: &str) -> Option<watch::Receiver<ModuleStatus>> {
        self.modules
            .lock()
            .expect("never poisoned")
            .get(&(pipeline.to_owned(), module.to_owned()))
            .map(|(_, status)| status.clone())
    }
}

/// What is wrong with a module's `depends_on`: a name that is not a node of the
/// pipeline, a node that is not a module, or modules that wait for each other.
fn dependency_problems(node: &NodeContext<'_>, depends_on: &[String]) -> ConfigErrors {
    let mut errors = ConfigErrors::new();
    let modules: Vec<&str> = node
        .peers
        .iter()
        .filter(|peer| peer.kind == KIND && peer.name != node.name)
        .map(|peer| peer.name)
        .collect();
    for (position, name) in depends_on.iter().enumerate() {
        let at = position.to_string();
        if name == node.name {
            errors.push(node.field_error(&["depends_on", &at], "a module cannot depend on itself"));
            continue;
        }
        match node.peers.iter().find(|peer| peer.name == name) {
            None => errors.push(
                node.field_error(
                    &["depends_on", &at],
                    format!("no node '{name}' in this pipeline"),
                )
                .with_hint(choices_hint(
                    name,
                    &modules,
                    "modules of this pipeline",
                )),
            ),
            Some(peer) if peer.kind != KIND => errors.push(node.field_error(
                &["depends_on", &at],
                format!(
                    "'{name}' is a {} node, not a module: depends_on names modules to run first",
                    peer.kind
                ),
            )),
            Some(_) => {}
        }
    }
    if let Some(cycle) = dependency_cycle(node, depends_on) {
        errors.push(node.field_error(
            &["depends_on"],
            format!(
                "modules wait for each other in a cycle and none would start: {}",
                cycle.join(" → ")
            ),
        ));
    }
    errors
}

/// A path of `depends_on` from this module back to itself, if there is one (itself
/// named directly is reported on its own).
fn dependency_cycle(node: &NodeContext<'_>, depends_on: &[String]) -> Option<Vec<String>> {
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Dependencies {
        depends_on: Vec<String>,
    }
    let dependencies_of = |name: &str| -> Vec<String> {
        node.peers
            .iter()
            .find(|peer| peer.name == name && peer.kind == KIND)
            .and_then(|peer| peer.config.deserialize_into::<Dependencies>("").ok())
            .map(|found| found.depends_on)
            .unwrap_or_default()
    };
    // Depth first from each dependency, with the path that led there.
    let mut stack: Vec<Vec<String>> = depends_on
        .iter()
        .filter(|name| *name != node.name)
        .map(|name| vec![node.name.to_owned(), name.clone()])
        .collect();
    let mut seen = std::collections::HashSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().expect("paths are never empty").clone();
        if !seen.insert(last.clone()) {
            continue;
        }
        for next in dependencies_of(&last) {
            let mut longer = path.clone();
            longer.push(next.clone());
            if next == node.name {
                return Some(longer);
            }
            stack.push(longer);
        }
    }
    None
}

/// Builds `module` nodes.
pub struct ModuleFactory {
    host: Arc<ModuleHost>,
}

impl ModuleFactory {
    /// A factory whose modules run on `host`.
    pub fn new(host: Arc<ModuleHost>) -> Self {
        ModuleFactory { host }
    }
}

impl OperatorFactory for ModuleFactory {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn roles(&self) -> &'static [Role] {
        &[Role::Source, Role::Transform, Role::Sink]
    }

    fn declares_output_schema(&self) -> bool {
        true
    }

    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config: ModuleConfig = node.config()?;
        let mut errors: ConfigErrors = config
            .problems()
            .into_iter()
            .map(|(field, message)| {
                let keys: Vec<&str> = field.split('.').collect();
                node.field_error(&keys, message)
            })
            .collect();
        errors.extend(dependency_problems(node, &config.depends_on));
        for (field, message) in self.host.policy.problems(&config, node.base_dir) {
            errors.push(node.field_error(&[&field], message));
        }
        let mut outputs = Vec::new();
        match node.role {
            Role::Source => match &node.schema {
                Some(schema) => outputs.push(main_output(schema.clone(), node)),
                None => errors.push(
                    node.error("a source module needs a `schema`: the columns it pushes")
                        .with_hint("add e.g. `schema: {device: utf8, value: float64}` to the node"),
                ),
            },
            Role::Transform => {
                let Some(first) = node.inputs.first() else {
                    errors.push(node.error("a module transform needs at least one input"));
                    return Err(errors);
                };
                if !node.inputs_known {
                    return Err(errors);
                }
                if let Some(other) = node
                    .inputs
                    .iter()
                    .find(|i| i.stream.schema.fields() != first.stream.schema.fields())
                {
                    errors.push(node.error(format!(
                        "the inputs of a module transform must share one schema, but '{}' and \
                         '{}' differ",
                        first.name, other.name
                    )));
                }
                let schema = node
                    .schema
                    .clone()
                    .unwrap_or_else(|| first.stream.schema.clone());
                outputs.push(main_output(schema, node));
                let mut fields = first.stream.schema.fields().to_vec();
                fields.push(Arc::new(Field::new(ERROR_COLUMN, DataType::Utf8, false)));
                outputs.push(OutputSpec {
                    name: DEAD_LETTER_PORT.to_owned(),
                    stream: StreamInfo {
                        schema: Arc::new(Schema::new(fields)),
                        event_time: first.stream.event_time.clone(),
                    },
                    unwired_drop_reason: Some("module_dead_letter"),
                });
            }
            Role::Sink => {}
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Box::new(PlannedModule {
            host: self.host.clone(),
            pipeline: node.pipeline.to_owned(),
            name: node.name.to_owned(),
            role: node.role,
            config,
            base_dir: node.base_dir.to_owned(),
            outputs,
        }))
    }
}

fn main_output(schema: SchemaRef, node: &NodeContext<'_>) -> OutputSpec {
    let event_time = node
        .event_time
        .as_ref()
        .map(|e| e.column.clone())
        .or_else(|| {
            node.inputs
                .first()
                .and_then(|i| i.stream.event_time.clone())
        })
        .filter(|column| schema.field_with_name(column).is_ok());
    OutputSpec {
        name: MAIN_PORT_NAME.to_owned(),
        stream: StreamInfo { schema, event_time },
        unwired_drop_reason: None,
    }
}

struct PlannedModule {
    host: Arc<ModuleHost>,
    pipeline: String,
    name: String,
    role: Role,
    config: ModuleConfig,
    base_dir: PathBuf,
    outputs: Vec<OutputSpec>,
}

impl PlannedOperator for PlannedModule {
    fn outputs(&self) -> Vec<OutputSpec> {
        self.outputs.clone()
    }

    fn instantiate(
        self: Box<Self>,
        metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        let module = Module::start(*self, metrics.module())?;
        Ok(match module.role {
            Role::Source => OperatorInstance::Source(Box::new(ModuleSource { module })),
            Role::Transform => OperatorInstance::Transform(Box::new(ModuleTransform { module })),
            Role::Sink => OperatorInstance::Sink(Box::new(ModuleSink { module })),
        })
    }
}

/// A started module and the means to call it: what every role shares.
struct Module {
    name: String,
    role: Role,
    supervisor: Option<SupervisorHandle>,
    status: watch::Receiver<ModuleStatus>,
    client: Client,
    timeout: Duration,
    max_attempts: u32,
    /// What an answer or a push may declare.
    answer_limits: IpcLimits,
    /// The id the next batch gets: counting up from a random start chosen when the
    /// operator starts, so ids do not repeat across restarts of the runtime (a module
    /// that dedups by id would otherwise drop new batches as repeats).
    next_batch_id: u64,
    /// The run that timed out on a batch, until a newer one is ready.
    replaced: Option<u64>,
    metrics: ModuleMetrics,
    /// Where a source module pushes to.
    runtime_endpoint: Endpoint,
    output_schema: Option<SchemaRef>,
    /// The module directory; removed when the operator goes.
    _dir: tempfile::TempDir,
}

/// The batches of a module's answer or push: an empty body is none, anything else a
/// whole IPC stream within `limits`.
pub(crate) fn decode_answer(body: &[u8], limits: &IpcLimits) -> Result<Vec<RecordBatch>, IpcError> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    decode_within(body, limits).map(|(_, batches)| batches)
}

/// Where a run's batch ids start: random in the lower half of the range (so counting up
/// from it never wraps), a "run id" that keeps ids of different runs apart.
fn first_batch_id() -> u64 {
    use rand::Rng;
    rand::rng().random_range(1..1u64 << 62)
}

/// What became of one batch.
enum Delivery {
    /// The module answered: these are its batches.
    Answered(Vec<RecordBatch>),
    /// The module rejected the batch, or failed on every attempt: why.
    DeadLetter(String),
}

impl Module {
    fn start(planned: PlannedModule, metrics: ModuleMetrics) -> Result<Self, OperatorError> {
        let PlannedModule {
            host,
            pipeline,
            name,
            role,
            config,
            base_dir,
            outputs,
        } = planned;
        let dir = std::fs::create_dir_all(&host.root)
            .and_then(|()| {
                tempfile::Builder::new()
                    .prefix(crate::runtime::process::MODULE_DIR_PREFIX)
                    .tempdir_in(&host.root)
            })
            .map_err(|e| {
                OperatorError::io(
                    format!(
                        "cannot create a module directory in {}",
                        host.root.display()
                    ),
                    e,
                )
            })?;
        let (transport, module_endpoint, runtime_endpoint) = match config.transport {
            TransportKind::Unix => (
                Transport::Unix,
                Endpoint::Unix(dir.path().join(weir_module_sdk::MODULE_SOCKET_FILE)),
                Endpoint::Unix(dir.path().join(weir_module_sdk::RUNTIME_SOCKET_FILE)),
            ),
            TransportKind::Tcp => {
                let module = free_loopback_port()?;
                let runtime = free_loopback_port()?;
                (
                    Transport::Tcp { module, runtime },
                    Endpoint::Tcp(module),
                    Endpoint::Tcp(runtime),
                )
            }
        };
        let resolve = |path: &PathBuf| {
            if path.is_relative() {
                base_dir.join(path)
            } else {
                path.clone()
            }
        };
        let program = match &config.image {
            Some(image) => Program::Image {
                image: image.clone(),
                archive: config.image_archive.as_ref().map(resolve),
                command: config.command.clone(),
            },
            None => {
                let mut command = config.command.clone().unwrap_or_default();
                // A relative program path is relative to the pipeline file, like other
                // paths in it; a bare name is looked up on PATH.
                if let Some(program) = command.first_mut()
                    && program.contains('/')
                    && PathBuf::from(&*program).is_relative()
                {
                    *program = resolve(&PathBuf::from(&*program))
                        .to_string_lossy()
                        .into_owned();
                }
                Program::Process {
                    command,
                    working_dir: config.working_dir.as_ref().map(resolve),
                }
            }
        };
        let runtime = match program {
            // `weir validate` refuses an image in a build without Docker; this is the
            // same answer for a caller that did not validate.
            Program::Image { .. } => host
                .docker
                .clone()
                .ok_or_else(|| OperatorError::User(format!("module '{name}': {NO_DOCKER}")))?,
            Program::Process { .. } => host.process.clone(),
        };
        let owner = crate::runtime::owner::Owner::current();
        let spec = LaunchSpec {
            name: container_name(&pipeline, &name, owner.as_ref()),
            module: name.clone(),
            program,
            env: config.env.clone(),
            transport,
            socket_dir: dir.path().to_owned(),
            role: role_name(role),
            limits: config.limits(),
            create_options: config.create_options.clone(),
            labels: BTreeMap::from_iter(
                [
                    ("io.weir.pipeline".to_owned(), pipeline.clone()),
                    ("io.weir.module".to_owned(), name.clone()),
                ]
                .into_iter()
                .chain(owner.map(|owner| {
                    (
                        crate::runtime::owner::OWNER_LABEL.to_owned(),
                        owner.to_string(),
                    )
                })),
            ),
        };
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let dependencies: Vec<(String, DependencyLookup)> = config
            .depends_on
            .iter()
            .map(|name| {
                let (host, pipeline, dependency) = (host.clone(), pipeline.clone(), name.clone());
                let lookup: DependencyLookup =
                    Box::new(move || host.status_of(&pipeline, &dependency));
                (name.clone(), lookup)
            })
            .collect();
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(OperatorError::Internal(
                "modules are started inside the async runtime".to_owned(),
            ));
        }
        let supervisor = supervise(
            runtime.clone(),
            spec,
            SupervisorConfig {
                restart: config.restart,
                backoff: config.backoff,
                health: config.health,
                stop_timeout: config.stop_timeout.0,
                seed,
                depends_on: dependencies,
            },
            Box::new(HttpHealthProbe(Client::new(module_endpoint.clone()))),
            Some(metrics.clone()),
        );
        let status = supervisor.status();
        host.modules
            .lock()
            .expect("never poisoned")
            .insert((pipeline, name.clone()), (runtime.kind(), status.clone()));
        Ok(Module {
            name,
            role,
            supervisor: Some(supervisor),
            status,
            client: Client::new(module_endpoint).with_max_answer_bytes(
                usize::try_from(config.max_answer_bytes.0).unwrap_or(usize::MAX),
            ),
            timeout: config.timeout.0,
            max_attempts: config.max_attempts,
            answer_limits: config.answer_limits(),
            next_batch_id: first_batch_id(),
            replaced: None,
            metrics,
            runtime_endpoint,
            output_schema: outputs.first().map(|o| o.stream.schema.clone()),
            _dir: dir,
        })
    }

    /// Waits until the module can take batches. With `after` set, waits (a while) for a
    /// run newer than that generation, so a retry does not go to a module that has
    /// crashed but is not yet seen to be down.
    async fn ready(&mut self, after: Option<(u64, Duration)>) -> Result<(), OperatorError> {
        if let Some(hung) = self.replaced.take() {
            // A run that timed out is being stopped: only a newer one takes batches.
            let replaced = self
                .status
                .wait_for(|s| s.finished || (s.is_ready() && s.generation > hung));
            let _ = replaced.await;
        } else if let Some((generation, wait)) = after {
            let newer = self
                .status
                .wait_for(|s| s.finished || (s.is_ready() && s.generation > generation));
            let _ = tokio::time::timeout(wait, newer).await;
        }
        let status = self
            .status
            .wait_for(|s| s.is_ready() || s.finished)
            .await
            .map_err(|_| OperatorError::Internal("the module's supervisor ended".to_owned()))?
            .clone();
        if status.finished {
            return Err(OperatorError::External(format!(
                "module '{}' is {}: {}",
                self.name,
                status.state.name(),
                status.reason.as_deref().unwrap_or("no reason given")
            )));
        }
        Ok(())
    }

    /// Sends `batch` until the module answers it, it is rejected, or the attempts run out.
    async fn deliver(&mut self, batch: &RecordBatch) -> Result<Delivery, OperatorError> {
        let body = Bytes::from(encode_stream(&batch.schema(), std::slice::from_ref(batch))?);
        let batch_id = self.next_batch_id;
        self.next_batch_id = self.next_batch_id.wrapping_add(1).max(1);
        let mut after = None;
        let mut last_error = String::new();
        for attempt in 1..=self.max_attempts {
            self.ready(after).await?;
            let generation = self.status.borrow().generation;
            let answer = self
                .client
                .post_batches(body.clone(), batch_id, attempt, self.timeout)
                .await;
            let retryable = match answer {
                Ok(answer) if answer.status.is_success() => {
                    return Ok(match decode_answer(&answer.body, &self.answer_limits) {
                        Ok(batches) => match self.conform_all(batches) {
                            Ok(batches) => Delivery::Answered(batches),
                            Err(reason) => Delivery::DeadLetter(reason),
                        },
                        Err(error) => {
                            Delivery::DeadLetter(format!("the module's answer is refused: {error}"))
                        }
                    });
                }
                Err(error @ ClientError::TooLarge { .. }) => {
                    // The same batch would be answered the same way again.
                    return Ok(Delivery::DeadLetter(format!(
                        "the module's answer is refused: {error} (max_answer_bytes)"
                    )));
                }
                Ok(answer) if answer.status.is_client_error() => {
                    return Ok(Delivery::DeadLetter(format!(
                        "the module rejected the batch ({}): {}",
                        answer.status,
                        answer.text()
                    )));
                }
                Ok(answer) => format!("the module failed ({}): {}", answer.status, answer.text()),
                Err(ClientError::Timeout(timeout)) => {
                    // The instance may still be working on the batch (hung, or slow): it
                    // is failed under the restart policy, and the retry goes to the next
                    // one, never to this one.
                    let reason = format!("batch {batch_id} got no answer within {timeout:?}");
                    if let Some(supervisor) = &self.supervisor {
                        supervisor.report_hung(generation, reason.clone());
                    }
                    self.replaced = Some(generation);
                    format!("the module did not answer: {reason}")
                }
                Err(error) => format!("the module did not answer: {error}"),
            };
            tracing::warn!(
                module = %self.name,
                batch_id,
                attempt,
                max_attempts = self.max_attempts,
                "{retryable}"
            );
            last_error = retryable;
            if attempt < self.max_attempts {
                self.metrics.retries.inc();
                let wait = FIRST_RETRY_WAIT
                    .saturating_mul(1 << (attempt - 1).min(16))
                    .min(MAX_RETRY_WAIT);
                after = Some((generation, wait));
            }
        }
        Ok(Delivery::DeadLetter(format!(
            "failed {} attempts; the last: {last_error}",
            self.max_attempts
        )))
    }

    /// The module's answer in its declared output schema.
    fn conform_all(&self, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, String> {
        match &self.output_schema {
            Some(schema) => batches.iter().map(|b| conform(b, schema)).collect(),
            None => Ok(batches),
        }
    }

    /// The rows of `batch` with the reason they could not be processed.
    fn dead_letter(batch: &RecordBatch, reason: &str) -> Result<RecordBatch, OperatorError> {
        let mut fields = batch.schema().fields().to_vec();
        fields.push(Arc::new(Field::new(ERROR_COLUMN, DataType::Utf8, false)));
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        columns.push(Arc::new(StringArray::from(vec![reason; batch.num_rows()])));
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns,
        )?)
    }

    async fn shutdown(&mut self) {
        if let Some(supervisor) = self.supervisor.take() {
            supervisor.shutdown().await;
        }
    }
}

/// `batch` in `schema`: the same column names and types, in order. Only nullability may
/// differ (Arrow writers in other languages mark every column nullable); a null in a
/// column declared non-null is an error.
pub(crate) fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, String> {
    let describe = |schema: &Schema| {
        schema
            .fields()
            .iter()
            .map(|f| format!("{}: {}", f.name(), f.data_type()))
            .collect::<Vec<_>>()
    };
    let (got, want) = (describe(&batch.schema()), describe(schema));
    if got != want {
        return Err(format!(
            "the module's batch has columns [{}], but its declared schema is [{}]",
            got.join(", "),
            want.join(", ")
        ));
    }
    RecordBatch::try_new(schema.clone(), batch.columns().to_vec())
        .map_err(|error| format!("the module's batch does not fit its declared schema: {error}"))
}

/// A free TCP port on 127.0.0.1, for a module or the runtime to listen on.
fn free_loopback_port() -> Result<std::net::SocketAddr, OperatorError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|e| OperatorError::io("cannot find a free port on 127.0.0.1", e))
}

/// A container name unique to the pipeline and node, in Docker's allowed characters.
/// `weir-PIPELINE-NODE-RUNTIME`: the runtime's part keeps two runtimes on one host that
/// run the same pipeline from taking each other's containers for leftovers.
fn container_name(
    pipeline: &str,
    node: &str,
    owner: Option<&crate::runtime::owner::Owner>,
) -> String {
    let clean = |text: &str| -> String {
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    match owner {
        Some(owner) => format!("weir-{}-{}-{}", clean(pipeline), clean(node), owner.tag()),
        None => format!("weir-{}-{}", clean(pipeline), clean(node)),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Transform => "transform",
        Role::Sink => "sink",
    }
}

/// A module as a transform. One batch is in flight at a time, and `process_batch`
/// returns once the module has answered it: a checkpoint barrier that follows passes
/// only after the module answered everything before it, so a checkpoint never leaves a
/// batch half-processed inside a module.
struct ModuleTransform {
    module: Module,
}

#[async_trait]
impl Transform for ModuleTransform {
    async fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        match self.module.deliver(&batch).await? {
            Delivery::Answered(batches) => {
                for answer in batches {
                    out.emit(answer);
                }
            }
            Delivery::DeadLetter(reason) => {
                tracing::error!(module = %self.module.name, rows = batch.num_rows(), "batch sent to dead_letter: {reason}");
                self.module.metrics.dead_letters.inc();
                out.emit_to(1, Module::dead_letter(&batch, &reason)?);
            }
        }
        Ok(())
    }

    async fn on_close(&mut self, _out: &mut Collector) -> Result<(), OperatorError> {
        self.module.shutdown().await;
        Ok(())
    }
}

/// A module as a sink.
struct ModuleSink {
    module: Module,
}

#[async_trait]
impl Sink for ModuleSink {
    async fn write(&mut self, _input: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        if let Delivery::DeadLetter(reason) = self.module.deliver(&batch).await? {
            // A sink has no outputs: the rows are counted and logged.
            tracing::error!(module = %self.module.name, rows = batch.num_rows(), "batch dropped: {reason}");
            self.module.metrics.dead_letters.inc();
            return Err(OperatorError::External(format!(
                "module '{}' could not take a batch of {} rows: {reason}",
                self.module.name,
                batch.num_rows()
            )));
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<(), OperatorError> {
        self.module.shutdown().await;
        Ok(())
    }
}

/// A module as a source: it pushes batches to an endpoint the runtime serves.
struct ModuleSource {
    module: Module,
}

#[async_trait]
impl Source for ModuleSource {
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError> {
        let schema =
            self.module.output_schema.clone().ok_or_else(|| {
                OperatorError::Internal("a source module has a schema".to_owned())
            })?;
        let mut endpoint = SourceEndpoint::bind(
            &self.module.runtime_endpoint,
            schema,
            self.module.answer_limits,
        )
        .await?;
        let mut status = self.module.status.clone();
        let result = loop {
            tokio::select! {
                () = ctx.cancelled() => break Ok(()),
                finished = async { status.wait_for(|s| s.finished).await.map(|s| s.clone()) } => {
                    // The module ended for good (a clean exit its policy does not
                    // restart): its stream is over.
                    break match finished {
                        Ok(s) if s.state == ModuleState::Stopped => Ok(()),
                        Ok(s) => Err(OperatorError::External(format!(
                            "module '{}' failed: {}",
                            self.module.name,
                            s.reason.as_deref().unwrap_or("no reason given")
                        ))),
                        Err(_) => Ok(()),
                    };
                }
                // A module pushes what it has and keeps no position Weir could resume
                // from: its barriers carry none.
                epoch = ctx.barrier_requested() => {
                    if let Err(error) = ctx.checkpoint(epoch, None).await {
                        break Err(error);
                    }
                }
                pushed = endpoint.next() => {
                    let Some((batch, taken)) = pushed else { break Ok(()) };
                    let emitted = ctx.emit(batch).await;
                    let _ = taken.send(emitted.is_ok());
                    emitted?;
                }
            }
        };
        endpoint.close().await;
        self.module.shutdown().await;
        result
    }
}
