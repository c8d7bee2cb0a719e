//! The pipeline document, YAML version 1: its shape, and reading it from the located tree
//! with every problem collected rather than stopping at the first.
//!
//! Reading checks what can be checked without the operator registry: fields, types,
//! names, schemas, event time and windows. Kinds, wiring and operator configs are
//! checked by [`crate::plan`].

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use weir_engine::Role;
use weir_engine::arrow::datatypes::SchemaRef;
use weir_engine::config::{
    ConfigError, ConfigValue, HumanDuration, HumanSize, Key, Location, Value, choices_hint,
};
use weir_engine::observe::RetainSpec;
use weir_engine::registry::{MAIN_PORT_NAME, OnError};
use weir_engine::time::{EventTimeSpec, WindowSpec, is_event_time_type};

use crate::env::{EnvLookup, interpolate_tree};
use crate::schema::{parse_schema, type_name};

/// Why a node cannot declare a schema.
pub(crate) const SCHEMA_HINT: &str = "only sources and `module` transforms declare a schema; other nodes \
                           derive theirs from their inputs";

/// The document version this crate reads.
pub const VERSION: u32 = 1;

const TOP_FIELDS: &[&str] = &[
    "version",
    "name",
    "checkpoint",
    "sources",
    "transforms",
    "sinks",
];
const SOURCE_FIELDS: &[&str] = &["kind", "config", "schema", "event_time", "retain"];
const TRANSFORM_FIELDS: &[&str] = &[
    "kind",
    "inputs",
    "window",
    "schema",
    "config",
    "retain",
    "on_error",
    "parallelism",
    "partition_by",
];
const SINK_FIELDS: &[&str] = &["kind", "inputs", "config", "flush_interval"];
const ROLES: [Role; 3] = [Role::Source, Role::Transform, Role::Sink];

/// A pipeline document whose shape is valid. Kinds, wiring and operator configs are
/// checked when it is validated against a registry.
#[derive(Clone, Debug)]
pub struct Document {
    /// The file the document was read from (used in messages).
    pub file: PathBuf,
    /// The pipeline's name.
    pub name: String,
    /// Every node, sources first, then transforms, then sinks, each in document order.
    pub nodes: Vec<NodeSpec>,
    /// Where the name was written.
    pub name_location: Location,
    /// How often the pipeline checkpoints: `checkpoint.interval`, the default when
    /// absent, `None` when written as `0s` (checkpoints off).
    pub checkpoint_interval: Option<Duration>,
}

/// The pipeline's `checkpoint` section.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointYaml {
    /// Time from one checkpoint to the next; `0s` turns checkpoints off.
    interval: HumanDuration,
}

impl Document {
    /// The node called `name`, if any.
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|node| node.name == name)
    }
}

/// One node of a pipeline as declared.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The node's name, unique in the pipeline.
    pub name: String,
    /// The section it is declared in.
    pub role: Role,
    /// The operator kind.
    pub kind: String,
    /// The `config` value, `Null` (at the node's location) when absent.
    pub config: ConfigValue,
    /// The nodes (and ports) this node reads from, in order. Empty for sources.
    pub inputs: Vec<InputSpec>,
    /// The declared schema (sources, and transforms whose kind declares its output).
    pub schema: Option<SchemaRef>,
    /// Where `schema` was written.
    pub schema_location: Location,
    /// The declared event-time column (sources only).
    pub event_time: Option<EventTimeSpec>,
    /// The declared window (transforms only).
    pub window: Option<WindowSpec>,
    /// How much of the node's output to keep for queries (sources and transforms).
    pub retain: Option<RetainSpec>,
    /// What the transform does with rows that make it fail (transforms only).
    pub on_error: OnError,
    /// Where `on_error` was written.
    pub on_error_location: Location,
    /// How often the engine flushes the sink while it has unflushed writes (sinks only;
    /// the engine's default of 1 s when absent).
    pub flush_interval: Option<Duration>,
    /// How many instances of the transform run at once (transforms only; one when
    /// absent).
    pub parallelism: Parallelism,
    /// Where `parallelism` was written.
    pub parallelism_location: Location,
    /// The columns whose values choose the instance each row goes to (transforms only);
    /// the operator's own keys when absent.
    pub partition_by: Option<Vec<String>>,
    /// Where `partition_by` was written.
    pub partition_by_location: Location,
    /// Where the node's name was written.
    pub location: Location,
    /// Where the kind was written.
    pub kind_location: Location,
    /// Where the event-time column was written.
    pub event_time_location: Location,
    /// False when reading the node found a problem; such a node is not planned.
    pub(crate) sound: bool,
}

impl NodeSpec {
    /// The node's path in the document, e.g. `sources.sensors`.
    pub fn path(&self) -> String {
        format!("{}.{}", self.role.section(), self.name)
    }
}

/// A transform's `parallelism`: how many instances of it run at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parallelism {
    /// A fixed number of instances.
    Instances(NonZeroUsize),
    /// `auto`: one per worker thread of the runtime (see
    /// [`PipelineBuilder::auto_parallelism`](weir_engine::graph::PipelineBuilder::auto_parallelism)).
    Auto,
}

impl Default for Parallelism {
    fn default() -> Self {
        Parallelism::Instances(NonZeroUsize::MIN)
    }
}

impl Parallelism {
    /// How many instances run here and now.
    pub fn instances(self) -> usize {
        match self {
            Parallelism::Instances(n) => n.get(),
            Parallelism::Auto => weir_engine::graph::PipelineBuilder::auto_parallelism(),
        }
    }

    /// Whether it was written at all (anything but the default of one).
    pub fn is_declared(self) -> bool {
        self != Parallelism::default()
    }
}

/// One entry of a node's `inputs`: `node` or `node.port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputSpec {
    /// The upstream node.
    pub node: String,
    /// The upstream port, when one was named.
    pub port: Option<String>,
    /// Where the entry was written.
    pub location: Location,
}

impl InputSpec {
    /// The upstream port: the one named, or the main port.
    pub fn port_name(&self) -> &str {
        self.port.as_deref().unwrap_or(MAIN_PORT_NAME)
    }
}

/// The singular noun for a role, as used in messages: `source`, `transform`, `sink`.
pub fn role_noun(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Transform => "transform",
        Role::Sink => "sink",
    }
}

fn fields_of(role: Role) -> &'static [&'static str] {
    match role {
        Role::Source => SOURCE_FIELDS,
        Role::Transform => TRANSFORM_FIELDS,
        Role::Sink => SINK_FIELDS,
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Reads a document from its tree. Always returns the best document it could read (nodes
/// with problems are kept, marked unsound, so references to them do not cascade into more
/// errors), together with every problem found.
pub(crate) fn parse_document(
    file: &Path,
    root: ConfigValue,
    env: EnvLookup<'_>,
) -> (Document, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let mut document = Document {
        file: file.to_owned(),
        name: String::new(),
        nodes: Vec::new(),
        name_location: Location::default(),
        checkpoint_interval: Some(weir_engine::checkpoint::DEFAULT_CHECKPOINT_INTERVAL),
    };
    let root_location = root.location;
    let entries = match root.value {
        Value::Map(entries) => entries,
        Value::Null => {
            errors.push(
                ConfigError::new("", root_location, "the file is empty")
                    .with_hint("a pipeline starts with 'version: 1' and 'name: NAME'"),
            );
            return (document, errors);
        }
        _ => {
            errors.push(
                ConfigError::new(
                    "",
                    root_location,
                    format!(
                        "expected a map with version, name, sources, transforms and sinks, \
                         found {}",
                        root.describe()
                    ),
                )
                .with_hint("a pipeline starts with 'version: 1' and 'name: NAME'"),
            );
            return (document, errors);
        }
    };

    let mut version_seen = false;
    let mut name_seen = false;
    let mut section_keys: HashMap<Role, Location> = HashMap::new();
    let mut declared: HashMap<String, (Role, Location)> = HashMap::new();
    for (key, mut value) in entries {
        match key.name.as_str() {
            "version" => {
                version_seen = true;
                interpolate_tree(&mut value, "version", env, &mut errors);
                match value.deserialize_into::<u32>("version") {
                    Ok(VERSION) => {}
                    Ok(other) => errors.push(
                        ConfigError::new(
                            "version",
                            value.location,
                            format!("unsupported version {other}"),
                        )
                        .with_hint(format!("this weir reads pipeline version {VERSION}")),
                    ),
                    Err(error) => errors.push(error),
                }
            }
            "name" => {
                name_seen = true;
                interpolate_tree(&mut value, "name", env, &mut errors);
                document.name_location = value.location;
                match value.deserialize_into::<String>("name") {
                    Ok(name) if is_pipeline_name(&name) => document.name = name,
                    Ok(name) => errors.push(
                        ConfigError::new(
                            "name",
                            value.location,
                            format!("invalid pipeline name '{name}'"),
                        )
                        .with_hint("use lower-case letters, digits, '-' and '_', e.g. boiler-room"),
                    ),
                    Err(error) => errors.push(error),
                }
            }
            "checkpoint" => {
                interpolate_tree(&mut value, "checkpoint", env, &mut errors);
                match value.deserialize_into::<CheckpointYaml>("checkpoint") {
                    Ok(spec) => {
                        let interval = Duration::from(spec.interval);
                        document.checkpoint_interval = (!interval.is_zero()).then_some(interval);
                    }
                    Err(error) => errors.push(error.with_hint(
                        "write e.g. 'checkpoint: {interval: 10s}', or 'interval: 0s' to turn checkpoints off",
                    )),
                }
            }
            "sources" | "transforms" | "sinks" => {
                let role = ROLES
                    .into_iter()
                    .find(|role| role.section() == key.name)
                    .unwrap_or(Role::Sink);
                section_keys.insert(role, key.location);
                parse_section(
                    role,
                    value,
                    env,
                    &mut declared,
                    &mut document.nodes,
                    &mut errors,
                );
            }
            other => errors.push(
                ConfigError::new(other, key.location, format!("unknown field '{other}'"))
                    .with_hint(choices_hint(other, TOP_FIELDS, "valid fields")),
            ),
        }
    }

    if !version_seen {
        errors.push(
            ConfigError::new("", root_location, "missing field 'version'")
                .with_hint(format!("add 'version: {VERSION}' at the top of the file")),
        );
    }
    if !name_seen {
        errors.push(
            ConfigError::new("", root_location, "missing field 'name'")
                .with_hint("add 'name: NAME'; the file name is not used as the pipeline name"),
        );
    }
    for (role, what) in [(Role::Source, "sources"), (Role::Sink, "sinks")] {
        if !document.nodes.iter().any(|node| node.role == role) {
            let location = section_keys.get(&role).copied().unwrap_or(root_location);
            errors.push(
                ConfigError::new(
                    role.section(),
                    location,
                    format!("the pipeline has no {what}"),
                )
                .with_hint(format!(
                    "declare at least one node under '{}'",
                    role.section()
                )),
            );
        }
    }
    // Nodes were pushed per section in document order; list sources, transforms, sinks.
    document.nodes.sort_by_key(|node| node.role);
    (document, errors)
}

fn is_pipeline_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn is_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_section(
    role: Role,
    value: ConfigValue,
    env: EnvLookup<'_>,
    declared: &mut HashMap<String, (Role, Location)>,
    nodes: &mut Vec<NodeSpec>,
    errors: &mut Vec<ConfigError>,
) {
    let section = role.section();
    let entries = match value.value {
        Value::Map(entries) => entries,
        Value::Null => return,
        _ => {
            errors.push(
                ConfigError::new(
                    section,
                    value.location,
                    format!(
                        "expected a map of node names to nodes, found {}",
                        value.describe()
                    ),
                )
                .with_hint(format!(
                    "write each {} as NAME: {{kind: KIND, ...}}",
                    role_noun(role)
                )),
            );
            return;
        }
    };
    for (key, value) in entries {
        if let Some((first_role, first)) = declared.get(&key.name) {
            errors.push(
                ConfigError::new(
                    child(section, &key.name),
                    key.location,
                    format!("node name '{}' is already used", key.name),
                )
                .with_hint(format!(
                    "the {} at {first} has this name; names must be unique across sources, \
                     transforms and sinks",
                    role_noun(*first_role)
                )),
            );
            continue;
        }
        declared.insert(key.name.clone(), (role, key.location));
        nodes.push(parse_node(role, &key, value, env, errors));
    }
}

/// How a source declares its event time.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventTimeYaml {
    /// The timestamp column holding each row's event time.
    column: String,
    /// How far out of order rows may arrive; 0s when absent.
    #[serde(default)]
    max_out_of_order: Option<HumanDuration>,
    /// How far past the wall clock an event time may be; any when absent.
    #[serde(default)]
    max_future: Option<HumanDuration>,
    /// How long without data before the watermark advances on the wall clock; never
    /// when absent.
    #[serde(default)]
    idle_timeout: Option<HumanDuration>,
}

/// How a transform declares its window.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum WindowYaml {
    /// `{tumbling: 1m}`
    Tumbling(HumanDuration),
    /// `{hopping: {size: 1m, slide: 10s}}`
    Hopping(HoppingYaml),
}

/// `retain: {duration: 15m, max_bytes: 64MB}`; either may be left out.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetainYaml {
    #[serde(default)]
    duration: Option<HumanDuration>,
    #[serde(default)]
    max_bytes: Option<HumanSize>,
}

fn parse_retain(
    value: &ConfigValue,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<RetainSpec> {
    if matches!(value.value, Value::Null) {
        return Some(RetainSpec::default());
    }
    let declared = match value.deserialize_into::<RetainYaml>(path) {
        Ok(declared) => declared,
        Err(error) => {
            errors.push(error.with_hint_if_none(
                "write e.g. retain: {duration: 15m, max_bytes: 64MB}; both are optional",
            ));
            return None;
        }
    };
    let defaults = RetainSpec::default();
    let spec = RetainSpec {
        duration: declared.duration.map_or(defaults.duration, Duration::from),
        max_bytes: declared.max_bytes.map_or(defaults.max_bytes, |size| size.0),
    };
    let before = errors.len();
    if spec.duration.is_zero() {
        let location = value.get("duration").map_or(value.location, |v| v.location);
        errors.push(
            ConfigError::new(
                child(path, "duration"),
                location,
                "a retained stream must keep its batches for longer than zero",
            )
            .with_hint("e.g. duration: 15m; remove `retain` to keep nothing"),
        );
    }
    if spec.max_bytes == 0 {
        let location = value
            .get("max_bytes")
            .map_or(value.location, |v| v.location);
        errors.push(
            ConfigError::new(
                child(path, "max_bytes"),
                location,
                "a retained stream needs room for at least one batch",
            )
            .with_hint("e.g. max_bytes: 64MB; remove `retain` to keep nothing"),
        );
    }
    (errors.len() == before).then_some(spec)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HoppingYaml {
    size: HumanDuration,
    slide: HumanDuration,
}

fn parse_node(
    role: Role,
    key: &Key,
    mut value: ConfigValue,
    env: EnvLookup<'_>,
    errors: &mut Vec<ConfigError>,
) -> NodeSpec {
    let path = child(role.section(), &key.name);
    let before = errors.len();
    let mut node = NodeSpec {
        name: key.name.clone(),
        role,
        kind: String::new(),
        config: ConfigValue::null().at(key.location),
        inputs: Vec::new(),
        schema: None,
        schema_location: key.location,
        event_time: None,
        window: None,
        retain: None,
        flush_interval: None,
        on_error: OnError::Fail,
        on_error_location: key.location,
        parallelism: Parallelism::default(),
        parallelism_location: key.location,
        partition_by: None,
        partition_by_location: key.location,
        location: key.location,
        kind_location: key.location,
        event_time_location: key.location,
        sound: false,
    };
    if !is_node_name(&key.name) {
        errors.push(
            ConfigError::new(
                &path,
                key.location,
                format!("invalid node name '{}'", key.name),
            )
            .with_hint(
                "node names become SQL table names: use letters, digits and '_', and do \
                     not start with a digit",
            ),
        );
    }
    interpolate_tree(&mut value, &path, env, errors);
    let entries = match value.value {
        Value::Map(entries) => entries,
        Value::Null => Vec::new(),
        _ => {
            errors.push(
                ConfigError::new(
                    &path,
                    value.location,
                    format!(
                        "expected a map with the node's kind and settings, found {}",
                        value.describe()
                    ),
                )
                .with_hint(format!("valid fields: {}", fields_of(role).join(", "))),
            );
            return node;
        }
    };

    let (mut kind_seen, mut inputs_seen) = (false, false);
    for (field, value) in entries {
        let field_path = child(&path, &field.name);
        match (field.name.as_str(), role) {
            ("kind", _) => {
                kind_seen = true;
                match value.deserialize_into::<String>(&field_path) {
                    Ok(kind) => {
                        node.kind = kind.trim().to_owned();
                        node.kind_location = value.location;
                    }
                    Err(error) => errors.push(error),
                }
            }
            ("config", _) => node.config = value,
            ("inputs", Role::Transform | Role::Sink) => {
                inputs_seen = true;
                node.inputs = parse_inputs(&value, &field_path, errors);
            }
            ("schema", Role::Source | Role::Transform) => {
                node.schema_location = field.location;
                node.schema = parse_schema(&value, &field_path, errors);
            }
            ("event_time", Role::Source) => {
                match value.deserialize_into::<EventTimeYaml>(&field_path) {
                    Ok(declared) => {
                        node.event_time = Some(EventTimeSpec {
                            column: declared.column,
                            max_out_of_order: declared
                                .max_out_of_order
                                .map_or(Duration::ZERO, Duration::from),
                            max_future: declared.max_future.map(Duration::from),
                            idle_timeout: declared.idle_timeout.map(Duration::from),
                        });
                        node.event_time_location =
                            value.get("column").map_or(value.location, |v| v.location);
                    }
                    Err(error) => errors.push(error),
                }
            }
            ("window", Role::Transform) => node.window = parse_window(&value, &field_path, errors),
            ("retain", Role::Source | Role::Transform) => {
                node.retain = parse_retain(&value, &field_path, errors);
            }
            ("on_error", Role::Transform) => {
                node.on_error_location = value.location;
                match value.deserialize_into::<String>(&field_path).as_deref() {
                    Ok("fail") => node.on_error = OnError::Fail,
                    Ok("dead_letter") => node.on_error = OnError::DeadLetter,
                    Ok(other) => errors.push(
                        ConfigError::new(
                            &field_path,
                            value.location,
                            format!("unknown on_error '{other}'"),
                        )
                        .with_hint("write on_error: fail (the default) or on_error: dead_letter"),
                    ),
                    Err(error) => errors.push(error.clone()),
                }
            }
            ("parallelism", Role::Transform) => {
                node.parallelism_location = value.location;
                if let Some(parallelism) = parse_parallelism(&value, &field_path, errors) {
                    node.parallelism = parallelism;
                }
            }
            ("partition_by", Role::Transform) => {
                node.partition_by_location = value.location;
                node.partition_by = parse_partition_by(&value, &field_path, errors);
            }
            ("flush_interval", Role::Sink) => {
                match value.deserialize_into::<HumanDuration>(&field_path) {
                    Ok(interval) if Duration::from(interval).is_zero() => errors.push(
                        ConfigError::new(
                            &field_path,
                            value.location,
                            "a sink's flush_interval must be longer than zero",
                        )
                        .with_hint("e.g. flush_interval: 1s"),
                    ),
                    Ok(interval) => node.flush_interval = Some(interval.into()),
                    Err(error) => errors.push(error),
                }
            }
            (
                name @ ("inputs" | "schema" | "event_time" | "window" | "retain" | "flush_interval"
                | "parallelism" | "partition_by"),
                _,
            ) => {
                errors.push(misplaced(role, name, &field_path, field.location));
            }
            (name, _) => errors.push(
                ConfigError::new(
                    &field_path,
                    field.location,
                    format!("unknown field '{name}'"),
                )
                .with_hint(choices_hint(name, fields_of(role), "valid fields")),
            ),
        }
    }
    if !kind_seen {
        errors.push(
            ConfigError::new(&path, key.location, "missing field 'kind'").with_hint(format!(
                "say which operator this {} is, e.g. kind: ...",
                role_noun(role)
            )),
        );
    }
    if role != Role::Source && !inputs_seen {
        errors.push(
            ConfigError::new(&path, key.location, "missing field 'inputs'")
                .with_hint("list the nodes this one reads from, e.g. inputs: [sensors]"),
        );
    }
    if let (Some(schema), Some(event_time)) = (&node.schema, &node.event_time) {
        errors.extend(check_event_time_column(
            schema,
            &event_time.column,
            &format!("{path}.event_time.column"),
            node.event_time_location,
            "the schema",
        ));
    }
    node.sound = errors.len() == before;
    node
}

/// A field that exists, but not in this section.
fn misplaced(role: Role, field: &str, path: &str, location: Location) -> ConfigError {
    let why = match field {
        "inputs" => {
            "sources read from outside the pipeline; to read from another node, declare this \
             one under 'transforms'"
        }
        "schema" => SCHEMA_HINT,
        "event_time" => "only sources declare event time; it flows downstream with the data",
        "retain" => "a sink emits no stream to keep; retain the node it reads from",
        "flush_interval" => "only sinks are flushed; set it on the sink that writes",
        "on_error" => "only transforms take on_error; sources send bad input to dead_letter",
        "parallelism" | "partition_by" => {
            "sources and sinks run as one instance; run the transform that does the work in \
             parallel"
        }
        _ => "windows belong on the transform that aggregates",
    };
    ConfigError::new(
        path,
        location,
        format!("a {} takes no '{field}'", role_noun(role)),
    )
    .with_hint(why)
}

const PARALLELISM_HINT: &str =
    "write a number of instances, e.g. parallelism: 2, or parallelism: auto for one per core";

/// `parallelism: N` (at least 1) or `parallelism: auto`.
fn parse_parallelism(
    value: &ConfigValue,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Parallelism> {
    if let Value::String(text) = &value.value
        && text.trim() == "auto"
    {
        return Some(Parallelism::Auto);
    }
    match value.deserialize_into::<usize>(path) {
        Ok(count) => match NonZeroUsize::new(count) {
            Some(count) => Some(Parallelism::Instances(count)),
            None => {
                errors.push(
                    ConfigError::new(path, value.location, "parallelism must be at least 1")
                        .with_hint(PARALLELISM_HINT),
                );
                None
            }
        },
        Err(_) => {
            errors.push(
                ConfigError::new(
                    path,
                    value.location,
                    format!(
                        "expected a number of instances or 'auto', found {}",
                        value.describe()
                    ),
                )
                .with_hint(PARALLELISM_HINT),
            );
            None
        }
    }
}

/// `partition_by: [column, ...]`: a non-empty list of distinct column names.
fn parse_partition_by(
    value: &ConfigValue,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Vec<String>> {
    const HINT: &str = "list the input columns that route rows, e.g. partition_by: [device]";
    let columns = match value.deserialize_into::<Vec<String>>(path) {
        Ok(columns) => columns,
        Err(error) => {
            errors.push(error.with_hint_if_none(HINT));
            return None;
        }
    };
    if columns.is_empty() {
        errors.push(
            ConfigError::new(path, value.location, "'partition_by' is empty").with_hint(HINT),
        );
        return None;
    }
    for (index, column) in columns.iter().enumerate() {
        if columns[..index].contains(column) {
            errors.push(
                ConfigError::new(
                    path,
                    value.location,
                    format!("'partition_by' names column '{column}' twice"),
                )
                .with_hint(HINT),
            );
            return None;
        }
    }
    Some(columns)
}

fn parse_inputs(value: &ConfigValue, path: &str, errors: &mut Vec<ConfigError>) -> Vec<InputSpec> {
    let items = match &value.value {
        Value::Seq(items) if !items.is_empty() => items,
        Value::Seq(_) => {
            errors.push(
                ConfigError::new(path, value.location, "'inputs' is empty")
                    .with_hint("list the nodes this one reads from, e.g. inputs: [sensors]"),
            );
            return Vec::new();
        }
        _ => {
            errors.push(
                ConfigError::new(
                    path,
                    value.location,
                    format!("expected a list of node names, found {}", value.describe()),
                )
                .with_hint("write it as a list, e.g. inputs: [sensors]"),
            );
            return Vec::new();
        }
    };
    let mut inputs: Vec<InputSpec> = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{index}]");
        let text = match item.deserialize_into::<String>(&item_path) {
            Ok(text) => text,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        let text = text.trim();
        let (node, port) = match text.split_once('.') {
            Some((node, port)) => (node, Some(port)),
            None => (text, None),
        };
        let malformed = node.is_empty() || port.is_some_and(|p| p.is_empty() || p.contains('.'));
        if malformed {
            errors.push(
                ConfigError::new(&item_path, item.location, format!("invalid input '{text}'"))
                    .with_hint(
                        "write 'node' to read a node's main output or 'node.port' for another port",
                    ),
            );
            continue;
        }
        let input = InputSpec {
            node: node.to_owned(),
            port: port.map(str::to_owned),
            location: item.location,
        };
        if inputs
            .iter()
            .any(|seen| seen.node == input.node && seen.port_name() == input.port_name())
        {
            errors.push(
                ConfigError::new(
                    &item_path,
                    item.location,
                    format!("input '{text}' is listed twice"),
                )
                .with_hint("list each input once"),
            );
            continue;
        }
        inputs.push(input);
    }
    inputs
}

fn parse_window(
    value: &ConfigValue,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<WindowSpec> {
    let declared = match value.deserialize_into::<WindowYaml>(path) {
        Ok(declared) => declared,
        Err(error) => {
            errors
                .push(error.with_hint_if_none(
                    "write {tumbling: 1m} or {hopping: {size: 1m, slide: 10s}}",
                ));
            return None;
        }
    };
    let min = Duration::from_millis(1);
    match declared {
        WindowYaml::Tumbling(HumanDuration(size)) => {
            let at = value.get("tumbling").map_or(value.location, |v| v.location);
            if size < min {
                errors.push(
                    ConfigError::new(
                        format!("{path}.tumbling"),
                        at,
                        "the window size must be at least 1ms",
                    )
                    .with_hint("write a duration such as 10s or 1m"),
                );
                return None;
            }
            Some(WindowSpec::Tumbling { size })
        }
        WindowYaml::Hopping(HoppingYaml {
            size: HumanDuration(size),
            slide: HumanDuration(slide),
        }) => {
            let hopping = value.get("hopping");
            let at = |field: &str| {
                hopping
                    .and_then(|h| h.get(field))
                    .or(hopping)
                    .map_or(value.location, |v| v.location)
            };
            for (field, duration) in [("size", size), ("slide", slide)] {
                if duration < min {
                    errors.push(
                        ConfigError::new(
                            format!("{path}.hopping.{field}"),
                            at(field),
                            format!("the window {field} must be at least 1ms"),
                        )
                        .with_hint("write a duration such as 10s or 1m"),
                    );
                    return None;
                }
            }
            if size.as_nanos() % slide.as_nanos() != 0 {
                errors.push(
                    ConfigError::new(
                        format!("{path}.hopping.slide"),
                        at("slide"),
                        format!(
                            "the window size {} is not a multiple of the slide {}",
                            humantime::format_duration(size),
                            humantime::format_duration(slide)
                        ),
                    )
                    .with_hint(
                        "pick a slide that divides the size evenly, e.g. size 1m with slide 10s",
                    ),
                );
                return None;
            }
            Some(WindowSpec::Hopping { size, slide })
        }
    }
}

/// Checks that `column` exists in `schema` and holds timestamps. `what` names the schema
/// in messages: `the schema`, `the output of 'sensors'`.
pub(crate) fn check_event_time_column(
    schema: &SchemaRef,
    column: &str,
    path: &str,
    location: Location,
    what: &str,
) -> Option<ConfigError> {
    match schema.field_with_name(column) {
        Err(_) => {
            let columns: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            Some(
                ConfigError::new(
                    path,
                    location,
                    format!("event-time column '{column}' is not in {what}"),
                )
                .with_hint(choices_hint(column, &columns, "columns")),
            )
        }
        Ok(field) if !is_event_time_type(field.data_type()) => Some(
            ConfigError::new(
                path,
                location,
                format!(
                    "event-time column '{column}' is {}, not a timestamp",
                    type_name(field.data_type())
                ),
            )
            .with_hint(
                "declare it as timestamp_ms (or timestamp_s, timestamp_us, timestamp_ns) in the \
                 schema",
            ),
        ),
        Ok(_) => None,
    }
}

/// Adds a hint to an error that has none.
trait WithHintIfNone {
    fn with_hint_if_none(self, hint: &str) -> Self;
}

impl WithHintIfNone for ConfigError {
    fn with_hint_if_none(mut self, hint: &str) -> Self {
        self.hint.get_or_insert_with(|| hint.to_owned());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> (Document, Vec<ConfigError>) {
        let root = crate::yaml::parse(text).unwrap();
        parse_document(Path::new("p.yaml"), root, &|_| None)
    }

    #[test]
    fn inputs_take_a_node_or_node_dot_port_once_each() {
        let (document, errors) = read(
            "version: 1\nname: p\nsinks:\n  out: {kind: k, inputs: [a, a.side, 'b.', a.b.c, a, .x]}\n\
             sources:\n  a: {kind: k}\n",
        );
        let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "invalid input 'b.'",
                "invalid input 'a.b.c'",
                "input 'a' is listed twice",
                "invalid input '.x'",
            ]
        );
        let out = document.node("out").unwrap();
        assert_eq!(
            out.inputs
                .iter()
                .map(|i| (i.node.as_str(), i.port_name()))
                .collect::<Vec<_>>(),
            [("a", "out"), ("a", "side")]
        );
        assert!(!out.sound);
        assert!(document.node("a").unwrap().sound);
        // Sources are listed first whatever order the sections were written in.
        let names: Vec<&str> = document.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "out"]);
    }

    #[test]
    fn absent_config_is_null_at_the_node() {
        let (document, errors) = read(
            "version: 1\nname: p\nsources:\n  a: {kind: k}\nsinks:\n  b: {kind: k, inputs: [a]}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let a = document.node("a").unwrap();
        assert_eq!(a.config.value, Value::Null);
        assert_eq!(a.config.location, Location { line: 4, column: 3 });
    }

    #[test]
    fn a_node_with_a_missing_variable_is_not_sound() {
        let (document, errors) = read(
            "version: 1\nname: p\nsources:\n  a: {kind: k, config: {url: \"${URL}\"}}\n\
             sinks:\n  b: {kind: k, inputs: [a]}\n",
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "sources.a.config.url");
        assert!(!document.node("a").unwrap().sound);
        assert!(document.node("b").unwrap().sound);
    }

    #[test]
    fn missing_kind_and_inputs_point_at_the_node() {
        let (_, errors) =
            read("version: 1\nname: p\nsources:\n  a: {}\nsinks:\n  b:\n    kind: k\n");
        let got: Vec<(&str, Location, &str)> = errors
            .iter()
            .map(|e| (e.path.as_str(), e.location, e.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "sources.a",
                    Location { line: 4, column: 3 },
                    "missing field 'kind'"
                ),
                (
                    "sinks.b",
                    Location { line: 6, column: 3 },
                    "missing field 'inputs'"
                ),
            ]
        );
    }
}
