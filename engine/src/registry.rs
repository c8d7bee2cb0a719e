//! The one registry that maps kind names (`generator`, `sql`, `file`, …) to the factories
//! that validate a node's configuration and build the running operator.
//!
//! Planning and building are separate steps: [`OperatorFactory::plan`] is pure (it
//! checks the config and derives the output schemas, so `weir validate` can run it
//! without touching files or the network) and [`PlannedOperator::instantiate`] creates
//! the running operator.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;

use crate::config::{ConfigError, ConfigErrors, ConfigValue};
use crate::error::OperatorError;
use crate::metrics::OperatorMetrics;
use crate::operator::OperatorInstance;
use crate::time::{EventTimeSpec, WindowSpec};

/// The section of a pipeline a node is declared in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Declared under `sources`.
    Source,
    /// Declared under `transforms`.
    Transform,
    /// Declared under `sinks`.
    Sink,
}

impl Role {
    /// The YAML section name for this role.
    pub fn section(self) -> &'static str {
        match self {
            Role::Source => "sources",
            Role::Transform => "transforms",
            Role::Sink => "sinks",
        }
    }
}

/// What is known about a stream before the pipeline runs.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamInfo {
    /// The Arrow schema of every batch on the stream.
    pub schema: SchemaRef,
    /// The name of the event-time column, if the stream has one.
    pub event_time: Option<String>,
}

/// One output port of a planned operator.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputSpec {
    /// The port name. The main port is [`MAIN_PORT_NAME`]; side ports have their own
    /// names and are wired as `node.port`.
    pub name: String,
    /// The stream the port carries.
    pub stream: StreamInfo,
    /// The reason under which rows are counted as dropped when nothing consumes this port
    /// (e.g. `late` or `malformed`). `None` for the main port.
    pub unwired_drop_reason: Option<&'static str>,
}

/// The name of every operator's main output port.
pub const MAIN_PORT_NAME: &str = "out";

/// One input of a node, as the factory sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct InputStream {
    /// The name this input goes by inside the operator, e.g. a SQL table name: the
    /// upstream node's name, or `node_port` for a side port.
    pub name: String,
    /// The stream's schema and event-time column.
    pub stream: StreamInfo,
}

/// What a transform does with rows that make it fail (`on_error`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// The error fails the pipeline (the default).
    #[default]
    Fail,
    /// The rows that fail are isolated and sent to the node's `dead_letter` port with
    /// the error; the rest go on.
    DeadLetter,
}

/// Everything a factory may look at when planning one node.
pub struct NodeContext<'a> {
    /// The pipeline's name.
    pub pipeline: &'a str,
    /// The node's name.
    pub name: &'a str,
    /// The section the node is declared in.
    pub role: Role,
    /// The node's `config` value ([`crate::config::Value::Null`] when absent).
    pub config: &'a ConfigValue,
    /// The path of `config` inside the document, e.g. `sources.sensors.config`.
    pub config_path: &'a str,
    /// The node's inputs, in declaration order (empty for sources).
    pub inputs: &'a [InputStream],
    /// False when an upstream node could not be planned: its input streams then have empty
    /// schemas, and the factory should report only problems that do not depend on them.
    /// The planner discards whatever a factory returns in that case except its errors.
    pub inputs_known: bool,
    /// The schema declared on the node (sources, and transforms whose kind declares its
    /// output, see [`OperatorFactory::declares_output_schema`]).
    pub schema: Option<SchemaRef>,
    /// The event-time column declared on the node (sources).
    pub event_time: Option<EventTimeSpec>,
    /// The window declared on the node (transforms).
    pub window: Option<WindowSpec>,
    /// What the node does with rows it fails on (transforms: `on_error`).
    pub on_error: OnError,
    /// The directory relative paths in the config are resolved against.
    pub base_dir: &'a Path,
    /// Every node of the pipeline, this one included: for a kind whose config names
    /// other nodes (a module's `depends_on`).
    pub peers: &'a [PeerNode<'a>],
}

/// A node of the pipeline as another node's factory sees it.
#[derive(Clone, Copy, Debug)]
pub struct PeerNode<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its kind.
    pub kind: &'a str,
    /// Its `config`.
    pub config: &'a ConfigValue,
}

impl NodeContext<'_> {
    /// Deserializes the node's `config` into `T`. An absent `config` reads as an empty
    /// map, so config structs with `#[serde(default)]` get their defaults.
    pub fn config<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigErrors> {
        self.config
            .deserialize_into::<T>(self.config_path)
            .map_err(|error| vec![error])
    }

    /// Reads the node's `config` into two typed values that share its map: `A` takes the
    /// keys it declares (e.g. the MQTT connection fields), `B` the rest. See
    /// [`ConfigValue::deserialize_split`].
    pub fn config_split<A: serde::de::DeserializeOwned, B: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<(A, B), ConfigErrors> {
        self.config.deserialize_split(self.config_path)
    }

    /// A problem with the config value at `keys` (e.g. `["fields", "temperature",
    /// "step"]`), located at the deepest of those keys that was written, or at the whole
    /// `config`.
    pub fn field_error(&self, keys: &[&str], message: impl Into<String>) -> ConfigError {
        let mut location = self.config.location;
        let mut value = Some(self.config);
        for key in keys {
            value = value.and_then(|v| v.get(key));
            if let Some(found) = value {
                location = found.location;
            }
        }
        ConfigError::new(
            format!("{}.{}", self.config_path, keys.join(".")),
            location,
            message,
        )
    }

    /// A problem with the node itself (not one config field), e.g. a missing `schema`.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        let path = self
            .config_path
            .strip_suffix(".config")
            .unwrap_or(self.config_path);
        ConfigError::new(path, self.config.location, message)
    }
}

/// Whether a transform can run as parallel instances (`parallelism` in YAML), each fed
/// the rows of some keys by a hash of `partition_by` columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Partitionable {
    /// Rows are handled one by one, so any key columns of the inputs give the same rows.
    AnyKeys,
    /// Rows that share the values of these input columns (a windowed query's GROUP BY
    /// columns, an anomaly detector's series key) must meet in one instance. Partition
    /// keys must be some of them; all of them are the default.
    GroupedBy(Vec<String>),
    /// It cannot run as parallel instances; the reason completes "because …".
    No(String),
}

/// A node whose configuration is valid, ready to be built.
pub trait PlannedOperator: Send {
    /// The output ports, main port first. Empty for sinks.
    fn outputs(&self) -> Vec<OutputSpec>;

    /// What a user should know about how the node will run, e.g. that a window keeps
    /// every row rather than aggregates. `weir validate` prints these.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// Whether the transform can run as parallel instances, and on which keys. Sources
    /// and sinks are not asked.
    fn partitionable(&self) -> Partitionable {
        Partitionable::No("its kind keeps state over all of its rows".into())
    }

    /// Builds the running operator, with its metric series. May open files or sockets.
    fn instantiate(
        self: Box<Self>,
        metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError>;
}

/// Validates one kind of node and builds its operator.
pub trait OperatorFactory: Send + Sync {
    /// The kind name used in YAML.
    fn kind(&self) -> &'static str;

    /// The sections this kind may be declared in.
    fn roles(&self) -> &'static [Role];

    /// Checks the node's configuration and derives its outputs, reporting every problem
    /// found. Must not touch files, sockets or the clock.
    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors>;

    /// Whether a transform of this kind takes its output schema from the node's
    /// `schema`, because Weir cannot derive it (a module). Other transforms derive
    /// theirs from their inputs, and declaring one is an error.
    fn declares_output_schema(&self) -> bool {
        false
    }
}

/// Maps (section, kind name) to factories. One kind name may mean different operators in
/// different sections, e.g. the `file` source and the `file` sink.
#[derive(Clone, Default)]
pub struct Registry {
    factories: BTreeMap<(Role, &'static str), Arc<dyn OperatorFactory>>,
    /// Kinds this build of Weir leaves out, with the Cargo feature that brings each in, so a
    /// pipeline that names one is told why rather than that the kind does not exist.
    left_out: BTreeMap<(Role, &'static str), &'static str>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a factory under each of its roles. A later factory of the same role and kind
    /// replaces an earlier one.
    pub fn register(&mut self, factory: Arc<dyn OperatorFactory>) {
        for role in factory.roles() {
            self.factories
                .insert((*role, factory.kind()), factory.clone());
        }
    }

    /// Records that this build leaves out `kind` in the section of `role`, and that the
    /// Cargo feature `feature` brings it in.
    pub fn leave_out(&mut self, role: Role, kind: &'static str, feature: &'static str) {
        self.left_out.insert((role, kind), feature);
    }

    /// The Cargo feature that would bring `kind` into the section of `role`, when this build
    /// leaves it out.
    pub fn left_out_feature(&self, role: Role, kind: &str) -> Option<&'static str> {
        self.left_out
            .iter()
            .find(|((r, k), _)| *r == role && *k == kind)
            .map(|(_, feature)| *feature)
    }

    /// The factory for `kind` in the section of `role`, if any.
    pub fn get(&self, role: Role, kind: &str) -> Option<&Arc<dyn OperatorFactory>> {
        self.factories
            .iter()
            .find(|((r, k), _)| *r == role && *k == kind)
            .map(|(_, factory)| factory)
    }

    /// The sections in which `kind` exists, for hints when it is used in the wrong one.
    pub fn roles_of(&self, kind: &str) -> Vec<Role> {
        self.factories
            .keys()
            .filter(|(_, k)| *k == kind)
            .map(|(role, _)| *role)
            .collect()
    }

    /// The kinds that may be declared in the given section, sorted.
    pub fn kinds_for(&self, role: Role) -> Vec<&'static str> {
        self.factories
            .keys()
            .filter(|(r, _)| *r == role)
            .map(|(_, kind)| *kind)
            .collect()
    }
}
