//! The `module` operator's config: what to run, how to keep it alive, and how to call it.
//! Every field has a default but the program; `problems` reports every mistake at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use weir_engine::config::{HumanDuration, HumanSize};
use weir_engine::ipc::IpcLimits;

use crate::runtime::Limits;
use crate::supervisor::{BackoffConfig, HealthConfig, RestartPolicy};

/// Columns (nested fields included) an answer or push may have: far past any declared
/// output schema, and a bound on what its metadata makes the runtime allocate.
const MAX_ANSWER_COLUMNS: usize = 1024;

/// The `config` of a `kind: module` node.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModuleConfig {
    /// The container image (a container module). Without it, `command` runs as a local
    /// process.
    pub image: Option<String>,
    /// A `docker save` tarball loaded when `image` is not on the machine.
    pub image_archive: Option<PathBuf>,
    /// The command: the program and its arguments for a process module, or the image's
    /// command replaced for a container module.
    pub command: Option<Vec<String>>,
    /// A process module's working directory.
    pub working_dir: Option<PathBuf>,
    /// Environment variables for the module.
    pub env: BTreeMap<String, String>,
    /// When the runtime restarts the module: `never`, `on-failure`, `on-unhealthy`,
    /// `always` (default).
    pub restart: RestartPolicy,
    /// The health check (`GET /v1/health`).
    pub health: HealthConfig,
    /// Delays between restarts.
    pub backoff: BackoffConfig,
    /// Resource limits.
    pub limits: LimitsConfig,
    /// Docker's container create options, as a YAML object in the Engine API's shape
    /// (`HostConfig: {...}`, `Labels: {...}`), merged under what Weir sets.
    pub create_options: serde_json::Map<String, serde_json::Value>,
    /// `unix` sockets (default) or `tcp` on loopback.
    pub transport: TransportKind,
    /// How long one batch may take.
    pub timeout: HumanDuration,
    /// Attempts at a batch before it goes to `dead_letter`.
    pub max_attempts: u32,
    /// How long a stopping module gets before it is killed.
    pub stop_timeout: HumanDuration,
    /// The largest body the module may send: a transform's answer or a source's push,
    /// on the wire and once decoded.
    pub max_answer_bytes: HumanSize,
    /// The most rows one answer or push may hold.
    pub max_answer_rows: u64,
    /// Modules of the same pipeline that must be running before this one starts.
    pub depends_on: Vec<String>,
}

impl Default for ModuleConfig {
    fn default() -> Self {
        ModuleConfig {
            image: None,
            image_archive: None,
            command: None,
            working_dir: None,
            env: BTreeMap::new(),
            restart: RestartPolicy::default(),
            health: HealthConfig::default(),
            backoff: BackoffConfig::default(),
            limits: LimitsConfig::default(),
            create_options: serde_json::Map::new(),
            transport: TransportKind::default(),
            timeout: HumanDuration(Duration::from_secs(30)),
            max_attempts: 5,
            stop_timeout: HumanDuration(Duration::from_secs(10)),
            max_answer_bytes: HumanSize(weir_module_sdk::client::DEFAULT_MAX_ANSWER_BYTES as u64),
            max_answer_rows: 1_000_000,
            depends_on: Vec::new(),
        }
    }
}

/// How the runtime and the module reach each other.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Unix sockets in a directory shared with the module.
    #[default]
    Unix,
    /// TCP on 127.0.0.1, on ports the runtime picks.
    Tcp,
}

/// Resource limits as written.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Memory: `64MiB`, `1.5GB`, or a number of bytes.
    pub memory: Option<HumanSize>,
    /// CPUs, fractions allowed (containers only).
    pub cpus: Option<f64>,
    /// Processes and threads.
    pub pids: Option<i64>,
}

impl ModuleConfig {
    /// Every problem with the config, as (field path, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut push = |field: &str, message: String| problems.push((field.to_owned(), message));
        match (&self.image, &self.command) {
            (None, None) => push(
                "image",
                "a module needs an `image` (a container) or a `command` (a local process)"
                    .to_owned(),
            ),
            (Some(image), _) if image.trim().is_empty() => {
                push("image", "image must not be empty".to_owned())
            }
            _ => {}
        }
        if self.command.as_ref().is_some_and(|c| c.is_empty()) {
            push(
                "command",
                "command must name a program, e.g. [./my-module, --flag]".to_owned(),
            );
        }
        #[cfg(feature = "docker")]
        if self.image.is_some()
            && let Err(message) = crate::runtime::docker::parse_create_options(&self.create_options)
        {
            // What `docker create` would refuse at start is a mistake `weir validate` shows.
            push("create_options", message);
        }
        #[cfg(not(feature = "docker"))]
        if self.image.is_some() {
            push("image", crate::operator::NO_DOCKER.to_owned());
        }
        if self.image.is_none() {
            if self.image_archive.is_some() {
                push(
                    "image_archive",
                    "image_archive loads an image: give `image` too".to_owned(),
                );
            }
            if !self.create_options.is_empty() {
                push(
                    "create_options",
                    "create_options are Docker's: a process module (no `image`) has none"
                        .to_owned(),
                );
            }
            if self.limits.cpus.is_some() {
                push(
                    "limits.cpus",
                    "a CPU limit needs a container: give `image`, or drop `cpus`".to_owned(),
                );
            }
        } else if self.working_dir.is_some() {
            push(
                "working_dir",
                "working_dir is for process modules; a container's is set in its image".to_owned(),
            );
        }
        if self
            .limits
            .cpus
            .is_some_and(|c| !(c > 0.0 && c.is_finite()))
        {
            push("limits.cpus", "cpus must be more than 0".to_owned());
        }
        if self.limits.pids.is_some_and(|p| p < 1) {
            push("limits.pids", "pids must be at least 1".to_owned());
        }
        if self.limits.memory.is_some_and(|m| m.0 < 4 * 1024 * 1024) {
            push(
                "limits.memory",
                "memory must be at least 4MiB (Docker's own minimum is 6MB)".to_owned(),
            );
        }
        for (field, message) in self.health.problems() {
            push(&format!("health.{field}"), message);
        }
        for (field, message) in self.backoff.problems() {
            push(&format!("backoff.{field}"), message);
        }
        if self.timeout.0.is_zero() {
            push("timeout", "timeout must be longer than 0s".to_owned());
        }
        if self.max_attempts == 0 {
            push("max_attempts", "max_attempts must be at least 1".to_owned());
        }
        if self.max_answer_bytes.0 < 1024 {
            push(
                "max_answer_bytes",
                "max_answer_bytes must be at least 1KiB".to_owned(),
            );
        }
        if self.max_answer_rows == 0 {
            push(
                "max_answer_rows",
                "max_answer_rows must be at least 1".to_owned(),
            );
        }
        problems
    }

    /// What the module's answers and pushes may declare. The end-of-stream marker is
    /// required: an answer cut off between two batches is not taken for a whole one.
    pub fn answer_limits(&self) -> IpcLimits {
        IpcLimits {
            max_rows: self.max_answer_rows,
            max_columns: MAX_ANSWER_COLUMNS,
            max_decoded_bytes: self.max_answer_bytes.0,
            // The protocol has no compression: both peers are on one host.
            allow_zstd: false,
            require_end_marker: true,
        }
    }

    /// The limits as the runtimes take them.
    pub fn limits(&self) -> Limits {
        Limits {
            memory_bytes: self.limits.memory.map(|m| m.0),
            cpus: self.limits.cpus,
            pids: self.limits.pids,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ModuleConfig, String> {
        let value: serde_json::Value = serde_json::from_str(yaml).map_err(|e| e.to_string())?;
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = parse(r#"{"command": ["./echo"]}"#).unwrap();
        assert_eq!(config.restart, RestartPolicy::Always);
        assert_eq!(config.backoff.initial.0, Duration::from_secs(1));
        assert_eq!(config.backoff.max.0, Duration::from_secs(300));
        assert_eq!(config.backoff.reset_after.0, Duration::from_secs(600));
        assert_eq!(config.timeout.0, Duration::from_secs(30));
        assert_eq!(config.max_attempts, 5);
        assert_eq!(config.max_answer_bytes.0, 64 * 1024 * 1024);
        assert_eq!(config.max_answer_rows, 1_000_000);
        assert_eq!(config.transport, TransportKind::Unix);
        assert!(config.problems().is_empty());
    }

    #[test]
    fn memory_sizes_read_as_people_write_them() {
        let config = parse(r#"{"image": "x", "limits": {"memory": "64MiB"}}"#).unwrap();
        assert_eq!(config.limits().memory_bytes, Some(64 * 1024 * 1024));
        let config = parse(r#"{"image": "x", "limits": {"memory": 10000000}}"#).unwrap();
        assert_eq!(config.limits().memory_bytes, Some(10_000_000));
        let error = parse(r#"{"image": "x", "limits": {"memory": "lots"}}"#).unwrap_err();
        assert!(error.contains("invalid size 'lots'"), "{error}");
    }

    #[test]
    fn every_problem_is_named() {
        let config = parse(
            r#"{"image_archive": "x.tar", "create_options": {"HostConfig": {}},
                "limits": {"cpus": 0, "pids": 0, "memory": 1024},
                "health": {"retries": 0}, "backoff": {"jitter": 2},
                "max_attempts": 0, "max_answer_bytes": "100B", "max_answer_rows": 0,
                "restart": "on-unhealthy"}"#,
        )
        .unwrap();
        let fields: Vec<String> = config.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "image",
                "image_archive",
                "create_options",
                "limits.cpus",
                "limits.cpus",
                "limits.pids",
                "limits.memory",
                "health.retries",
                "backoff.jitter",
                "max_attempts",
                "max_answer_bytes",
                "max_answer_rows"
            ]
        );
        let error = parse(r#"{"command": ["x"], "restart": "sometimes"}"#).unwrap_err();
        assert!(error.contains("on-unhealthy"), "{error}");
    }
}
