//! Where modules run: the [`ContainerRuntime`] trait, with Docker, local processes and an
//! in-memory fake behind it, so supervision is written once and tested without Docker.
//!
//! A runtime knows nothing of restart policies or the data protocol: it creates, starts,
//! stops, removes and inspects one module instance at a time, streams its logs, and
//! reports its events. The [`Supervisor`](crate::supervisor::Supervisor) decides when.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

#[cfg(feature = "docker")]
pub mod docker;
pub mod fake;
#[cfg(feature = "docker")]
mod lazy;
mod log_lines;
pub mod owner;
pub mod process;

#[cfg(feature = "docker")]
pub use docker::DockerRuntime;
pub use fake::{FakeCall, FakeRun, FakeRuntime};
#[cfg(feature = "docker")]
pub use lazy::LazyDocker;
pub use process::ProcessRuntime;

use crate::error::RuntimeError;

/// Where the module directory (with the protocol's sockets) appears inside a container.
pub const CONTAINER_SOCKET_DIR: &str = "/run/weir";

/// What to run for one module: everything a runtime needs to create an instance.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// The instance name: unique on the host (a container name), e.g. `weir-boiler-enrich`.
    pub name: String,
    /// The module's node name in its pipeline, for logs.
    pub module: String,
    /// The image or executable.
    pub program: Program,
    /// Environment variables the user asked for. The runtime adds the protocol's own
    /// (`WEIR_MODULE_SOCKET`, ...; see [`protocol_env`]).
    pub env: BTreeMap<String, String>,
    /// How the module and the runtime reach each other.
    pub transport: Transport,
    /// The host directory holding the module's sockets; bind-mounted at
    /// [`CONTAINER_SOCKET_DIR`] in a container.
    pub socket_dir: PathBuf,
    /// The module's role in its pipeline (`source`, `transform`, `sink`).
    pub role: &'static str,
    /// Memory, CPU and process limits.
    pub limits: Limits,
    /// Docker create options (the Engine API's container create body, as JSON), merged
    /// under the settings Weir owns. Empty for processes.
    pub create_options: serde_json::Map<String, serde_json::Value>,
    /// Labels put on the instance (containers).
    pub labels: BTreeMap<String, String>,
}

/// The image or executable of a module.
#[derive(Clone, Debug, PartialEq)]
pub enum Program {
    /// A container image, already on the machine or loaded from `archive` (a
    /// `docker save` tarball) when it is not.
    Image {
        /// `name:tag` or an image id.
        image: String,
        /// A tarball to `docker load` when the image is missing.
        archive: Option<PathBuf>,
        /// Overrides the image's command.
        command: Option<Vec<String>>,
    },
    /// A local executable and its arguments.
    Process {
        /// The program and its arguments.
        command: Vec<String>,
        /// The working directory (the runtime's own by default).
        working_dir: Option<PathBuf>,
    },
}

/// How the runtime and a module reach each other (see docs/module-protocol.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Unix sockets in the module directory: the default.
    Unix,
    /// TCP on the host's loopback: the module listens on `module`, the runtime on
    /// `runtime`. A container module on TCP shares the host's network.
    Tcp {
        /// Where the module listens.
        module: std::net::SocketAddr,
        /// Where the runtime listens for source modules.
        runtime: std::net::SocketAddr,
    },
}

/// Resource limits for a module.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// CPUs (fractions allowed).
    pub cpus: Option<f64>,
    /// Processes / threads.
    pub pids: Option<i64>,
}

/// A runtime's handle on one created instance (a container id, a process id).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InstanceId(pub String);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How an instance ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, when it exited by itself (128 + signal for a container killed by
    /// a signal, as Docker reports it).
    pub code: Option<i64>,
    /// The signal that killed it, when known.
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it for passing its memory limit.
    pub oom_killed: bool,
    /// An error the runtime reported about it (Docker's `State.Error`).
    pub error: Option<String>,
}

impl ExitInfo {
    /// Whether this is a clean exit (code 0), which `on-failure` does not restart.
    pub fn is_success(&self) -> bool {
        self.code == Some(0) && !self.oom_killed && self.signal.is_none()
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.oom_killed {
            f.write_str("killed for running out of memory (OOM)")?;
        } else if let Some(signal) = self.signal {
            write!(f, "killed by signal {signal}")?;
        } else if let Some(code) = self.code {
            write!(f, "exited with code {code}")?;
        } else {
            f.write_str("ended")?;
        }
        if let Some(error) = &self.error {
            write!(f, " ({error})")?;
        }
        Ok(())
    }
}

/// What a runtime knows about an instance right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceState {
    /// Whether it is running.
    pub running: bool,
    /// How it ended, once it has.
    pub exit: Option<ExitInfo>,
    /// The runtime's own health verdict (a Docker `HEALTHCHECK`), when it has one.
    pub health: Option<RuntimeHealth>,
}

/// A runtime's own health verdict for an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeHealth {
    /// The check has not passed yet.
    Starting,
    /// The check passes.
    Healthy,
    /// The check failed its retries.
    Unhealthy,
}

/// Which stream a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line a module wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Where it was written.
    pub stream: LogStream,
    /// The line, without its newline.
    pub line: String,
}

/// Something that happened to an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// It started.
    Started,
    /// The kernel killed a process of it for memory.
    OutOfMemory,
    /// Its runtime health changed.
    Health(RuntimeHealth),
    /// It ended.
    Exited(ExitInfo),
}

/// Creates, runs and observes module instances. Implementations: [`DockerRuntime`],
/// [`ProcessRuntime`], [`FakeRuntime`].
#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// A short name for messages (`docker`, `process`, `fake`).
    fn kind(&self) -> &'static str;

    /// Makes sure `spec` can be created: the image is on the machine (loading its
    /// archive when it is not) or the executable exists. The error says what is missing
    /// and how to provide it.
    async fn prepare(&self, spec: &LaunchSpec) -> Result<(), RuntimeError>;

    /// Creates an instance of `spec`, not yet started. An instance left over with the
    /// same name (from a crashed runtime) is removed first.
    async fn create(&self, spec: &LaunchSpec) -> Result<InstanceId, RuntimeError>;

    /// Starts a created instance.
    async fn start(&self, id: &InstanceId) -> Result<(), RuntimeError>;

    /// Asks the instance to stop (SIGTERM), and kills it once `grace` has passed.
    /// Stopping an instance that already ended is not an error.
    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<(), RuntimeError>;

    /// Removes a stopped instance and what the runtime kept of it.
    async fn remove(&self, id: &InstanceId) -> Result<(), RuntimeError>;

    /// What the runtime knows about the instance now.
    async fn inspect(&self, id: &InstanceId) -> Result<InstanceState, RuntimeError>;

    /// Waits for the instance to end, and says how it did.
    async fn wait(&self, id: &InstanceId) -> Result<ExitInfo, RuntimeError>;

    /// The instance's output, line by line, from its start, until it ends.
    fn logs(&self, id: &InstanceId) -> BoxStream<'static, Result<LogLine, RuntimeError>>;

    /// The instance's events from now on, until it ends.
    fn events(&self, id: &InstanceId) -> BoxStream<'static, RuntimeEvent>;
}

/// The protocol's environment variables for a module whose directory appears at
/// `dir_in_module` (the host path for a process, [`CONTAINER_SOCKET_DIR`] in a
/// container).
pub fn protocol_env(spec: &LaunchSpec, dir_in_module: &Path) -> Vec<(String, String)> {
    let mut env = vec![
        ("WEIR_MODULE_NAME".to_owned(), spec.module.clone()),
        ("WEIR_MODULE_ROLE".to_owned(), spec.role.to_owned()),
    ];
    match &spec.transport {
        Transport::Unix => {
            let socket = |name: &str| dir_in_module.join(name).to_string_lossy().into_owned();
            env.push((
                weir_module_sdk::ENV_MODULE_SOCKET.to_owned(),
                socket(weir_module_sdk::MODULE_SOCKET_FILE),
            ));
            env.push((
                weir_module_sdk::ENV_RUNTIME_SOCKET.to_owned(),
                socket(weir_module_sdk::RUNTIME_SOCKET_FILE),
            ));
        }
        Transport::Tcp { module, runtime } => {
            env.push((
                weir_module_sdk::ENV_MODULE_ADDR.to_owned(),
                module.to_string(),
            ));
            env.push((
                weir_module_sdk::ENV_RUNTIME_ADDR.to_owned(),
                runtime.to_string(),
            ));
        }
    }
    env
}
