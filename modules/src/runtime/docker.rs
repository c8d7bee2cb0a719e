//! The Docker runtime: module instances are containers, driven through the Engine API
//! with bollard over the engine's Unix socket.
//!
//! What Weir owns in a container, and overrides whatever `create_options` says:
//!
//! - the image and (when the module gives one) the command;
//! - the protocol's environment variables (`WEIR_MODULE_SOCKET`, ...), which win over
//!   the user's, which win over the ones in `create_options`;
//! - the restart policy, always `no`: the supervisor restarts modules, and a container
//!   Docker restarts behind its back would race it;
//! - `AutoRemove`, always off: the supervisor inspects a container after it ends;
//! - the bind mount of the module directory at [`CONTAINER_SOCKET_DIR`];
//! - the memory, CPU and process limits, when the module sets them;
//! - host networking for the TCP transport (the module listens on the host's loopback),
//!   unless `create_options` picks a network itself.
//!
//! Engines: the client starts at bollard's API version and falls back to the newest one
//! the engine offers, so Docker 20.10 (API 1.41, Debian 12's `docker.io`) works as well
//! as current engines. Only the Unix socket transport is built in (no TCP, TLS or SSH).
//!
//! Exit codes: Docker reports a container whose main process died of signal `n` as
//! exit code `128 + n`, the shell's convention. [`ExitInfo`] keeps that code and sets
//! `signal` to `n` for codes 129 to 192 (signals 1 to 64): the engine cannot tell such a
//! death from a process that chose to exit with, say, 137, and by that convention a
//! process that does means "I died of SIGKILL".
//!
//! OOM kills: Docker's `OOMKilled` flag is not reliable everywhere. Its OOM and exit
//! notices travel separately, and on some kernels and cgroup set-ups the flag comes late
//! or never. So a memory-limited container that died of SIGKILL is looked at twice: the
//! flag is re-read for a moment, and if it stays unset, the engine's event history
//! settles it. Every kill through the API (`docker kill`, or a `docker stop` past its
//! grace) leaves a `kill` event there, while the kernel's OOM killer leaves none, and
//! nothing else in a container sends SIGKILL to its main process.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerState, ContainerStateStatusEnum, EventMessage, HealthStatusEnum,
    HostConfig, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, ImportImageOptionsBuilder,
    InspectContainerOptions, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::{ClientVersion, Docker};
use bytes::{Bytes, BytesMut};
use futures::stream::{self, BoxStream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::io::AsyncReadExt;

use super::log_lines::LineSplitter;
use super::{
    CONTAINER_SOCKET_DIR, ContainerRuntime, ExitInfo, InstanceId, InstanceState, LaunchSpec,
    LogLine, LogStream, Program, RuntimeEvent, RuntimeHealth, Transport, protocol_env,
};
use crate::error::RuntimeError;

/// The API version to fall back to when the engine refuses bollard's own and does not
/// say which it speaks: Docker 20.10's, the oldest engine Weir is tested against.
const FALLBACK_API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// The engine's socket when `DOCKER_HOST` is unset (bollard's default, which it keeps
/// private).
const DEFAULT_SOCKET: &str = "unix:///var/run/docker.sock";

/// bollard's timeout for an answer's headers (its own default). Streams (logs, events,
/// wait) get their headers at once and then run for as long as they need.
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// How long, and how often, a SIGKILLed container's `OOMKilled` flag is re-read before
/// the event history is asked (see the module docs).
const OOM_FLAG_GRACE: Duration = Duration::from_millis(500);
const OOM_FLAG_POLL: Duration = Duration::from_millis(100);

/// SIGKILL, the signal both the OOM killer and a forced stop send.
const SIGKILL: i32 = 9;

/// Chunk size for streaming an image archive to the engine.
const ARCHIVE_CHUNK: usize = 256 * 1024;

/// How long loading an image archive may take: the engine answers once it has read and
/// unpacked the whole archive, which for a large image on a slow device's disk takes
/// far longer than bollard's usual two minutes.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Runs modules as Docker containers. Cheap to clone: clones share one connection pool.
#[derive(Clone, Debug)]
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    /// Removes the module containers whose runtime is gone (it crashed or was killed
    /// before it removed them); gives how many. Containers of a runtime that still runs,
    /// on this host or in another PID namespace, are left alone.
    pub async fn sweep_leftovers(&self) -> Result<usize, RuntimeError> {
        use crate::runtime::owner::{OWNER_LABEL, Owner};
        let filters = HashMap::from([("label", vec![OWNER_LABEL])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let listed = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| docker_error("list module containers".to_owned(), e))?;
        let mut removed = 0;
        for container in listed {
            let owner = container
                .labels
                .as_ref()
                .and_then(|labels| labels.get(OWNER_LABEL))
                .and_then(|text| Owner::parse(text));
            let (Some(owner), Some(id)) = (owner, container.id) else {
                continue;
            };
            if !owner.is_gone() {
                continue;
            }
            let options = RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build();
            match self.docker.remove_container(&id, Some(options)).await {
                Ok(()) => removed += 1,
                Err(e) if is_no_such_container(&e) => {}
                Err(e) => return Err(docker_error(format!("remove leftover container {id}"), e)),
            }
        }
        if removed > 0 {
            tracing::info!("removed {removed} module containers a stopped runtime left behind");
        }
        Ok(removed)
    }

    /// Connects to the local engine: `DOCKER_HOST` when it is a `unix://` socket, else
    /// `/var/run/docker.sock`. Checks that the engine answers, and settles on an API
    /// version it speaks. Fails with [`RuntimeError::DockerUnavailable`] when there is no
    /// engine, when this user may not use its socket, or when `DOCKER_HOST` names a
    /// transport Weir does not speak (TCP, SSH).
    pub async fn connect() -> Result<Self, RuntimeError> {
        let host = std::env::var("DOCKER_HOST").unwrap_or_default();
        // bollard's local connector silently ignores a non-Unix DOCKER_HOST and would
        // talk to /var/run/docker.sock instead of the engine the user meant.
        if !host.is_empty() && !host.starts_with("unix://") {
            return Err(RuntimeError::DockerUnavailable(format!(
                "DOCKER_HOST={host} is not supported: Weir talks to the engine over its Unix \
                 socket only (unset DOCKER_HOST or set it to unix:///path/to/docker.sock)"
            )));
        }
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| RuntimeError::DockerUnavailable(error_chain(&e)))?;
        let docker = match docker.version().await {
            // The engine speaks bollard's version (or is older and does not check);
            // negotiating downgrades to what it reports when that is lower.
            Ok(_) => docker
                .negotiate_version()
                .await
                .map_err(|e| RuntimeError::DockerUnavailable(error_chain(&e)))?,
            // An engine older than bollard refuses every call made in bollard's version,
            // `/version` included, so bollard's own negotiation cannot work: start over
            // in the version the refusal names.
            Err(BollardError::DockerResponseServerError {
                status_code: 400,
                message,
            }) if message.contains("too new") => {
                let version = max_api_version(&message).unwrap_or(FALLBACK_API_VERSION);
                let socket = if host.is_empty() {
                    DEFAULT_SOCKET
                } else {
                    host.as_str()
                };
                let docker = Docker::connect_with_unix(socket, REQUEST_TIMEOUT_SECS, &version)
                    .map_err(|e| RuntimeError::DockerUnavailable(error_chain(&e)))?;
                docker.version().await.map_err(|e| {
                    RuntimeError::DockerUnavailable(format!(
                        "the engine refused API version {}.{}: {}",
                        version.major_version,
                        version.minor_version,
                        error_chain(&e)
                    ))
                })?;
                docker
            }
            Err(e) => return Err(RuntimeError::DockerUnavailable(error_chain(&e))),
        };
        let version = docker.client_version();
        tracing::debug!(
            api = %format!("{}.{}", version.major_version, version.minor_version),
            "connected to the Docker engine"
        );
        Ok(DockerRuntime { docker })
    }

    /// The bollard client, for what the runtime trait does not cover (tests build and
    /// export images with it).
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Loads a `docker save` tarball into the engine (`docker load`), streaming the file.
    async fn load_archive(&self, image: &str, archive: &Path) -> Result<(), RuntimeError> {
        let operation = || format!("load image archive {}", archive.display());
        let file = tokio::fs::File::open(archive)
            .await
            .map_err(|e| RuntimeError::io(operation(), e))?;
        // The file goes up in chunks, so a large image is never held in memory. After a
        // read error the body ends (with that error) instead of retrying the read.
        let body = stream::unfold(Some(file), |file| async move {
            let mut file = file?;
            let mut chunk = BytesMut::with_capacity(ARCHIVE_CHUNK);
            match file.read_buf(&mut chunk).await {
                Ok(0) => None,
                Ok(_) => Some((Ok::<Bytes, std::io::Error>(chunk.freeze()), Some(file))),
                Err(e) => Some((Err(e), None)),
            }
        });
        let options = ImportImageOptionsBuilder::default().quiet(true).build();
        let docker = self.docker.clone().with_timeout(LOAD_TIMEOUT);
        let mut progress = docker.import_image(options, bollard::body_try_stream(body), None);
        let mut loaded = Vec::new();
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) => {
                    if let Some(line) = info.stream {
                        let line = line.trim();
                        if !line.is_empty() {
                            loaded.push(line.to_owned());
                        }
                    }
                }
                Err(e) => return Err(docker_error(operation(), e)),
            }
        }
        tracing::info!(
            image,
            archive = %archive.display(),
            loaded = %loaded.join("; "),
            "loaded image archive"
        );
        Ok(())
    }

    /// Whether the engine has `image`.
    async fn has_image(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e) == Some(404) => Ok(false),
            Err(e) => Err(docker_error(format!("inspect image {image}"), e)),
        }
    }
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    fn kind(&self) -> &'static str {
        "docker"
    }

    async fn prepare(&self, spec: &LaunchSpec) -> Result<(), RuntimeError> {
        let (image, archive) = match &spec.program {
            Program::Image { image, archive, .. } => (image, archive),
            Program::Process { command, .. } => return Err(not_an_image(command)),
        };
        if self.has_image(image).await? {
            return Ok(());
        }
        let Some(archive) = archive else {
            return Err(RuntimeError::ImageMissing {
                image: image.clone(),
            });
        };
        self.load_archive(image, archive).await?;
        if self.has_image(image).await? {
            Ok(())
        } else {
            // The archive loaded, but held other images (or other tags) than this one.
            tracing::warn!(
                image,
                archive = %archive.display(),
                "the image archive does not hold the module's image"
            );
            Err(RuntimeError::ImageMissing {
                image: image.clone(),
            })
        }
    }

    async fn create(&self, spec: &LaunchSpec) -> Result<InstanceId, RuntimeError> {
        let operation = format!("create container {}", spec.name);
        let image = match &spec.program {
            Program::Image { image, .. } => image.clone(),
            Program::Process { command, .. } => return Err(not_an_image(command)),
        };
        // Bad options fail before anything on the machine changes.
        let mut body =
            parse_create_options(&spec.create_options).map_err(|message| RuntimeError::Docker {
                operation: operation.clone(),
                message: format!("create_options: {message}"),
            })?;
        let configured_user = match body.user.clone() {
            Some(user) => Some(user),
            None => self
                .docker
                .inspect_image(&image)
                .await
                .ok()
                .and_then(|inspected| inspected.config)
                .and_then(|config| config.user),
        };
        let socket_dir =
            prepare_socket_dir(&spec.socket_dir, container_user(configured_user.as_deref()))
                .await?;
        apply_launch_spec(&mut body, spec, &socket_dir);

        // A container left over with this name (Weir crashed, or was killed, before it
        // removed it) would make the name conflict.
        let leftover = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self
            .docker
            .remove_container(&spec.name, Some(leftover))
            .await
        {
            Ok(()) => tracing::info!(container = %spec.name, "removed a leftover container"),
            Err(e) if is_no_such_container(&e) => {}
            Err(e) => {
                return Err(docker_error(
                    format!("remove leftover container {}", spec.name),
                    e,
                ));
            }
        }

        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| {
                if is_no_such_image(&e) {
                    RuntimeError::ImageMissing {
                        image: image.clone(),
                    }
                } else {
                    docker_error(operation.clone(), e)
                }
            })?;
        for warning in &created.warnings {
            // E.g. "Your kernel does not support swap limit capabilities": the limits
            // asked for are not all in force.
            tracing::warn!(container = %spec.name, "docker: {warning}");
        }
        Ok(InstanceId(created.id))
    }

    async fn start(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        // Starting a running container answers 304, which bollard takes as success.
        self.docker
            .start_container(&id.0, None)
            .await
            .map_err(|e| container_error("start", id, e))
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<(), RuntimeError> {
        let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let options = StopContainerOptionsBuilder::default()
            .t(i32::try_from(seconds).unwrap_or(i32::MAX))
            .build();
        // The engine answers a stop once the container has ended, which can be the whole
        // grace period later: give this call that long and then some.
        let docker = self.docker.clone().with_timeout(Duration::from_secs(
            seconds.saturating_add(REQUEST_TIMEOUT_SECS),
        ));
        match docker.stop_container(&id.0, Some(options)).await {
            // A container that has already ended answers 304 (success to bollard); some
            // engines say "is not running" instead.
            Ok(()) => Ok(()),
            Err(BollardError::DockerResponseServerError { message, .. })
                if message.contains("is not running") =>
            {
                Ok(())
            }
            Err(e) => Err(container_error("stop", id, e)),
        }
    }

    async fn remove(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(&id.0, Some(options)).await {
            Ok(()) => Ok(()),
            // Already gone, or already being removed: what was asked for is (about to be)
            // true, and cleanup paths may remove twice.
            Err(e) if is_no_such_container(&e) => Ok(()),
            Err(BollardError::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already in progress") => Ok(()),
            Err(e) => Err(container_error("remove", id, e)),
        }
    }

    async fn inspect(&self, id: &InstanceId) -> Result<InstanceState, RuntimeError> {
        let state = self.container_state(id).await?;
        let ended = matches!(
            state.status,
            Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD)
        );
        let exit = match ended {
            true => Some(self.exit_of(id, &state).await),
            false => None,
        };
        Ok(InstanceState {
            running: state.running.unwrap_or(false),
            exit,
            health: state
                .health
                .as_ref()
                .and_then(|health| health.status)
                .and_then(runtime_health),
        })
    }

    async fn wait(&self, id: &InstanceId) -> Result<ExitInfo, RuntimeError> {
        // `not-running` answers at once for a container that has already ended (the
        // supervisor may come to wait after a quick crash), where `next-exit` would wait
        // forever. The other side of it: waiting on a created, unstarted container
        // answers at once too, so wait after `start`.
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut answers = self.docker.wait_container(&id.0, Some(options));
        let (code, wait_error) = match answers.next().await {
            Some(Ok(answer)) => (
                Some(answer.status_code),
                answer.error.and_then(|error| error.message),
            ),
            // bollard turns every non-zero exit into this error: it is an answer.
            Some(Err(BollardError::DockerContainerWaitError { error, code })) => {
                (Some(code), Some(error))
            }
            Some(Err(e)) => return Err(container_error("wait for", id, e)),
            // The engine closed the answer without a word: the inspection below says.
            None => (None, None),
        };
        let wait_error = wait_error.filter(|error| !error.is_empty());
        // The wait answer has only the code: the OOM flag and the engine's error are in
        // the container's state.
        match self.container_state(id).await {
            Ok(mut state) => {
                state.exit_code = state.exit_code.or(code);
                let mut exit = self.exit_of(id, &state).await;
                exit.error = exit.error.or(wait_error);
                Ok(exit)
            }
            // Removed in the meantime (by someone else): the code is all there is.
            Err(RuntimeError::NoSuchInstance(_)) if code.is_some() => Ok(ExitInfo {
                code,
                signal: code.and_then(signal_of),
                oom_killed: false,
                error: wait_error,
            }),
            Err(e) => Err(e),
        }
    }

    fn logs(&self, id: &InstanceId) -> BoxStream<'static, Result<LogLine, RuntimeError>> {
        // From the start (since 0, all lines), following until the container ends. On a
        // container that is not running, Docker returns what it has and ends at once.
        let options = LogsOptionsBuilder::default()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .build();
        let state = LogState {
            chunks: self.docker.logs(&id.0, Some(options)).boxed(),
            lines: LineSplitter::default(),
            ready: VecDeque::new(),
            id: id.clone(),
            done: false,
        };
        stream::unfold(state, |mut state| async move {
            loop {
                if let Some(item) = state.ready.pop_front() {
                    return Some((item, state));
                }
                if state.done {
                    return None;
                }
                match state.chunks.next().await {
                    Some(Ok(output)) => {
                        use bollard::container::LogOutput;
                        let (stream, bytes) = match output {
                            LogOutput::StdErr { message } => (LogStream::Stderr, message),
                            // A TTY container's output comes as one console stream.
                            LogOutput::StdOut { message }
                            | LogOutput::Console { message }
                            | LogOutput::StdIn { message } => (LogStream::Stdout, message),
                        };
                        state
                            .lines
                            .push(stream, &bytes, |line| state.ready.push_back(Ok(line)));
                    }
                    Some(Err(e)) => {
                        state.lines.finish(|line| state.ready.push_back(Ok(line)));
                        let error = container_error("read the logs of", &state.id, e);
                        state.ready.push_back(Err(error));
                        state.done = true;
                    }
                    None => {
                        state.lines.finish(|line| state.ready.push_back(Ok(line)));
                        state.done = true;
                    }
                }
            }
        })
        .boxed()
    }

    fn events(&self, id: &InstanceId) -> BoxStream<'static, RuntimeEvent> {
        // "From now on" means from this call, not from the stream's first poll (when
        // bollard sends the request): the engine replays what happened since.
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|now| format!("{}.{:09}", now.as_secs(), now.subsec_nanos()))
            .unwrap_or_else(|_| "0".to_owned());
        let filters = HashMap::from([
            ("container", vec![id.0.as_str()]),
            ("type", vec!["container"]),
        ]);
        let options = EventsOptionsBuilder::default()
            .since(&since)
            .filters(&filters)
            .build();
        let state = EventState {
            messages: self.docker.events(Some(options)).boxed(),
            runtime: self.clone(),
            id: id.clone(),
            oom_seen: false,
            done: false,
        };
        stream::unfold(state, |mut state| async move {
            while !state.done {
                let message = match state.messages.next().await {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => {
                        tracing::warn!(
                            container = %short_id(&state.id),
                            "docker events ended: {}",
                            error_chain(&e)
                        );
                        return None;
                    }
                    None => return None,
                };
                if let Some(event) = state.translate(&message).await {
                    return Some((event, state));
                }
            }
            None
        })
        .boxed()
    }
}

impl DockerRuntime {
    /// How an ended container ended, with its OOM kill confirmed as the module docs
    /// describe when the engine's flag is missing.
    async fn exit_of(&self, id: &InstanceId, state: &ContainerState) -> ExitInfo {
        let mut exit = exit_info(state);
        if !exit.oom_killed && exit.signal == Some(SIGKILL) {
            exit.oom_killed = self.killed_for_memory(id).await;
        }
        exit
    }

    /// Whether a container that died of SIGKILL without the `OOMKilled` flag was killed
    /// by the kernel for passing its memory limit: it has one, and either the flag
    /// turns up late or no one asked the engine to kill it.
    async fn killed_for_memory(&self, id: &InstanceId) -> bool {
        let memory_limited = match self
            .docker
            .inspect_container(&id.0, None::<InspectContainerOptions>)
            .await
        {
            Ok(response) => response
                .host_config
                .and_then(|host| host.memory)
                .is_some_and(|bytes| bytes > 0),
            Err(_) => return false,
        };
        if !memory_limited {
            return false;
        }
        let deadline = tokio::time::Instant::now() + OOM_FLAG_GRACE;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(OOM_FLAG_POLL).await;
            match self.container_state(id).await {
                Ok(state) if state.oom_killed == Some(true) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        match self.kill_requested(id).await {
            Ok(requested) => !requested,
            Err(e) => {
                tracing::debug!(
                    container = %short_id(id),
                    "could not read the engine's events to tell an OOM kill: {}",
                    error_chain(&e)
                );
                false
            }
        }
    }

    /// Whether the engine's event history holds a `kill` for the container: someone
    /// (Weir's stop, or a `docker kill`) asked for a signal through the API.
    async fn kill_requested(&self, id: &InstanceId) -> Result<bool, BollardError> {
        // With `until`, the engine answers from its history and closes the stream.
        let until = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|now| (now.as_secs() + 1).to_string())
            .unwrap_or_else(|_| "0".to_owned());
        let filters = HashMap::from([
            ("container", vec![id.0.as_str()]),
            ("type", vec!["container"]),
            ("event", vec!["kill"]),
        ]);
        let options = EventsOptionsBuilder::default()
            .since("0")
            .until(&until)
            .filters(&filters)
            .build();
        let mut history = self.docker.events(Some(options));
        match history.next().await {
            Some(Ok(_)) => Ok(true),
            Some(Err(e)) => Err(e),
            None => Ok(false),
        }
    }

    /// The container's `State`; [`RuntimeError::NoSuchInstance`] when it is gone.
    async fn container_state(&self, id: &InstanceId) -> Result<ContainerState, RuntimeError> {
        let response = self
            .docker
            .inspect_container(&id.0, None::<InspectContainerOptions>)
            .await
            .map_err(|e| container_error("inspect", id, e))?;
        Ok(response.state.unwrap_or_default())
    }
}

/// The logs stream between polls.
struct LogState {
    chunks: BoxStream<'static, Result<bollard::container::LogOutput, BollardError>>,
    lines: LineSplitter,
    ready: VecDeque<Result<LogLine, RuntimeError>>,
    id: InstanceId,
    done: bool,
}

/// The events stream between polls.
struct EventState {
    messages: BoxStream<'static, Result<EventMessage, BollardError>>,
    runtime: DockerRuntime,
    id: InstanceId,
    /// An `oom` event came before the `die`.
    oom_seen: bool,
    /// The container died: the stream ends.
    done: bool,
}

impl EventState {
    /// The [`RuntimeEvent`] an engine event means, if any (most, like `attach` or
    /// `exec_start`, mean nothing to Weir).
    async fn translate(&mut self, message: &EventMessage) -> Option<RuntimeEvent> {
        let action = message.action.as_deref().unwrap_or_default();
        match action {
            "start" => Some(RuntimeEvent::Started),
            "oom" => {
                self.oom_seen = true;
                Some(RuntimeEvent::OutOfMemory)
            }
            "die" => {
                self.done = true;
                let code = message
                    .actor
                    .as_ref()
                    .and_then(|actor| actor.attributes.as_ref())
                    .and_then(|attributes| attributes.get("exitCode"))
                    .and_then(|code| code.parse::<i64>().ok());
                // The event has only the code; the state has the OOM flag and the
                // engine's error. The container may be gone already (AutoRemove, or a
                // quick `remove`): then the event is all there is.
                let mut exit = match self.runtime.container_state(&self.id).await {
                    Ok(mut state) => {
                        state.exit_code = code.or(state.exit_code);
                        state.oom_killed = Some(state.oom_killed == Some(true) || self.oom_seen);
                        self.runtime.exit_of(&self.id, &state).await
                    }
                    Err(_) => ExitInfo {
                        code,
                        signal: code.and_then(signal_of),
                        oom_killed: self.oom_seen,
                        error: None,
                    },
                };
                exit.oom_killed |= self.oom_seen;
                Some(RuntimeEvent::Exited(exit))
            }
            // Removed without having died (never started): nothing more will come.
            "destroy" => {
                self.done = true;
                None
            }
            _ => {
                let status = action.strip_prefix("health_status:")?.trim();
                let health = match status {
                    "healthy" => RuntimeHealth::Healthy,
                    "unhealthy" => RuntimeHealth::Unhealthy,
                    "starting" => RuntimeHealth::Starting,
                    _ => return None,
                };
                Some(RuntimeEvent::Health(health))
            }
        }
    }
}

/// The error for a process module given to the Docker runtime.
fn not_an_image(command: &[String]) -> RuntimeError {
    RuntimeError::Executable {
        program: command.join(" "),
        reason: "the Docker runtime runs container images, not local executables (give the \
                 module an `image`, or run it with the process runtime)"
            .to_owned(),
    }
}

/// Reads `create_options` (the Engine API's create body) into bollard's type, naming
/// the field that does not fit: an unknown one (which serde would silently drop, and
/// with it what the user meant) or one of the wrong type.
pub(crate) fn parse_create_options(
    options: &Map<String, Value>,
) -> Result<ContainerCreateBody, String> {
    // HostConfig first: the top-level check would otherwise report its errors without
    // saying which of its fields is wrong.
    if let Some(host_config) = options.get("HostConfig") {
        match host_config {
            Value::Object(fields) => check_fields::<HostConfig>("HostConfig.", fields)?,
            Value::Null => {}
            other => {
                return Err(format!(
                    "field `HostConfig` must be an object, not {}",
                    json_kind(other)
                ));
            }
        }
    }
    check_fields::<ContainerCreateBody>("", options)?;
    // Each field fits on its own, so the whole does too; this is a formality.
    serde_json::from_value(Value::Object(options.clone())).map_err(|e| e.to_string())
}

/// Checks each field of `fields` against the struct `T`: it must be one of `T`'s, and
/// its value must deserialize. Errors name the field as `{prefix}{field}`.
fn check_fields<T: DeserializeOwned>(
    prefix: &str,
    fields: &Map<String, Value>,
) -> Result<(), String> {
    let known = field_names::<T>();
    for (name, value) in fields {
        if !known.contains(&name.as_str()) {
            // The Engine matches names regardless of case, Weir does not: say which.
            let hint = known
                .iter()
                .find(|known| known.eq_ignore_ascii_case(name))
                .map(|known| format!(" (did you mean `{prefix}{known}`?)"))
                .unwrap_or_default();
            return Err(format!(
                "unknown field `{prefix}{name}`{hint}; create_options is the Docker Engine \
                 API's container create body, with its field names (Env, Labels, HostConfig, \
                 ...)"
            ));
        }
        let single = Map::from_iter([(name.clone(), value.clone())]);
        if let Err(e) = serde_json::from_value::<T>(Value::Object(single)) {
            return Err(format!("field `{prefix}{name}`: {e}"));
        }
    }
    Ok(())
}

/// The field names (as serialized) of a struct `T` that derives `Deserialize`.
///
/// A derived `Deserialize` hands its field list to `deserialize_struct`; this
/// deserializer only catches that list and gives up. It lets `create_options` name its
/// unknown fields, which bollard's types (rightly, for engine answers) ignore.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Fields(&'static [&'static str]);

    impl std::fmt::Display for Fields {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field list")
        }
    }

    impl std::error::Error for Fields {}

    impl serde::de::Error for Fields {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Fields(&[])
        }
    }

    struct Catch;

    impl<'de> serde::Deserializer<'de> for Catch {
        type Error = Fields;

        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
            Err(Fields(&[]))
        }

        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Fields> {
            Err(Fields(fields))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    match T::deserialize(Catch) {
        Err(Fields(fields)) => fields,
        Ok(_) => &[],
    }
}

/// What kind of JSON value this is, for messages.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The user a container runs as, as numbers: `User` from `create_options`, else the
/// image's. `None` for a user given by name (only the image's /etc/passwd knows it).
/// No user at all is root.
fn container_user(configured: Option<&str>) -> Option<(u32, Option<u32>)> {
    let user = configured.map(str::trim).filter(|u| !u.is_empty());
    let Some(user) = user else {
        return Some((0, Some(0)));
    };
    let (uid, gid) = match user.split_once(':') {
        Some((uid, gid)) => (uid, Some(gid)),
        None => (user, None),
    };
    let uid = uid.parse().ok()?;
    match gid {
        Some(gid) => Some((uid, Some(gid.parse().ok()?))),
        None => Some((uid, None)),
    }
}

/// Makes the module directory exist, private to the module's user, and returns its
/// absolute path: Docker takes a relative bind source for a volume name.
///
/// The directory holds the sockets both sides listen on, so no other local user may
/// create, replace or reach them: it is `0700`, owned by the container's user (the
/// runtime, as root, gives it to that user; root still reaches it). Only when that
/// cannot be done (a user known by name only, or a runtime that is not root and not
/// that user) is it left open to everyone, sticky, with a warning.
async fn prepare_socket_dir(
    dir: &Path,
    user: Option<(u32, Option<u32>)>,
) -> Result<PathBuf, RuntimeError> {
    use std::os::unix::fs::MetadataExt;
    let operation = || format!("prepare module directory {}", dir.display());
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| RuntimeError::io(operation(), e))?;
    // The directory was made by the runtime: its owner is the runtime's user.
    let runtime_uid = tokio::fs::metadata(dir)
        .await
        .map_err(|e| RuntimeError::io(operation(), e))?
        .uid();
    let mode = match user {
        Some((uid, _)) if uid == runtime_uid || uid == 0 => 0o700,
        Some((uid, gid)) if runtime_uid == 0 => {
            std::os::unix::fs::chown(dir, Some(uid), gid)
                .map_err(|e| RuntimeError::io(operation(), e))?;
            0o700
        }
        _ => {
            tracing::warn!(
                dir = %dir.display(),
                "the module's container runs as a user the runtime cannot give its \
                 directory to (a user named rather than numbered, or a runtime that is not \
                 root): its sockets' directory is left open to every local user (sticky)"
            );
            0o1777
        }
    };
    // create_dir_all obeys the umask; the mode has to be set afterwards.
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .await
        .map_err(|e| RuntimeError::io(operation(), e))?;
    let absolute = tokio::fs::canonicalize(dir)
        .await
        .map_err(|e| RuntimeError::io(operation(), e))?;
    // `Binds` is `source:target[:options]`: a colon in the source cannot be written.
    if absolute.to_str().is_none_or(|path| path.contains(':')) {
        return Err(RuntimeError::io(
            operation(),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a module directory bind-mounted into a container must be a UTF-8 path \
                 without ':'",
            ),
        ));
    }
    Ok(absolute)
}

/// Lays what Weir owns over the user's create body (see the module docs).
fn apply_launch_spec(body: &mut ContainerCreateBody, spec: &LaunchSpec, socket_dir: &Path) {
    if let Program::Image { image, command, .. } = &spec.program {
        body.image = Some(image.clone());
        if let Some(command) = command {
            body.cmd = Some(command.clone());
        }
    }

    let protocol = protocol_env(spec, Path::new(CONTAINER_SOCKET_DIR));
    body.env = Some(merge_env(
        body.env.take().unwrap_or_default(),
        spec.env
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .chain(protocol),
    ));

    let labels = body.labels.get_or_insert_with(HashMap::new);
    labels.extend(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));

    let host = body.host_config.get_or_insert_with(HostConfig::default);
    host.restart_policy = Some(RestartPolicy {
        name: Some(RestartPolicyNameEnum::NO),
        maximum_retry_count: None,
    });
    host.auto_remove = Some(false);
    host.binds
        .get_or_insert_with(Vec::new)
        .push(format!("{}:{CONTAINER_SOCKET_DIR}", socket_dir.display()));
    if let Some(memory) = spec.limits.memory_bytes {
        let memory = i64::try_from(memory).unwrap_or(i64::MAX);
        host.memory = Some(memory);
        // Memory plus swap: equal to the memory, so the limit is not doubled by swap.
        host.memory_swap = Some(memory);
    }
    if let Some(cpus) = spec.limits.cpus {
        // A float to integer `as` saturates (and NaN becomes 0, which Docker reads as
        // "no limit").
        host.nano_cpus = Some((cpus * 1e9).round() as i64);
    }
    if let Some(pids) = spec.limits.pids {
        host.pids_limit = Some(pids);
    }
    if matches!(spec.transport, Transport::Tcp { .. }) {
        let names_network = host.network_mode.as_deref().is_some_and(|m| !m.is_empty())
            || body
                .networking_config
                .as_ref()
                .and_then(|config| config.endpoints_config.as_ref())
                .is_some_and(|endpoints| !endpoints.is_empty());
        if !names_network {
            host.network_mode = Some("host".to_owned());
        }
    }
}

/// `base` (`NAME=value` entries, or `NAME` to unset) with `overrides` laid over it: a
/// later value for a name replaces the earlier one in place, so each name appears once.
/// (Duplicates would leave the winner to whichever end of the list a program's getenv
/// reads from.)
fn merge_env(base: Vec<String>, overrides: impl Iterator<Item = (String, String)>) -> Vec<String> {
    fn name(entry: &str) -> &str {
        entry.split_once('=').map_or(entry, |(name, _)| name)
    }
    let mut merged: Vec<String> = Vec::with_capacity(base.len());
    let entries = base
        .into_iter()
        .chain(overrides.map(|(name, value)| format!("{name}={value}")));
    for entry in entries {
        match merged.iter_mut().find(|old| name(old) == name(&entry)) {
            Some(old) => *old = entry,
            None => merged.push(entry),
        }
    }
    merged
}

/// How a container ended, from its state.
fn exit_info(state: &ContainerState) -> ExitInfo {
    let code = state.exit_code;
    ExitInfo {
        code,
        signal: code.and_then(signal_of),
        oom_killed: state.oom_killed.unwrap_or(false),
        error: state.error.clone().filter(|error| !error.is_empty()),
    }
}

/// The signal behind an exit code of `128 + n` (see the module docs).
fn signal_of(code: i64) -> Option<i32> {
    if (129..=128 + 64).contains(&code) {
        i32::try_from(code - 128).ok()
    } else {
        None
    }
}

/// Docker's health status as Weir's; `none` (no check) is no verdict.
fn runtime_health(status: HealthStatusEnum) -> Option<RuntimeHealth> {
    match status {
        HealthStatusEnum::STARTING => Some(RuntimeHealth::Starting),
        HealthStatusEnum::HEALTHY => Some(RuntimeHealth::Healthy),
        HealthStatusEnum::UNHEALTHY => Some(RuntimeHealth::Unhealthy),
        HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
    }
}

/// The highest API version named in an engine's "client version X is too new. Maximum
/// supported API version is 1.41" refusal.
fn max_api_version(message: &str) -> Option<ClientVersion> {
    let (_, rest) = message.split_once("Maximum supported API version is")?;
    let version = rest.trim().trim_end_matches('.');
    let (major, minor) = version.split_once('.')?;
    let minor: String = minor.chars().take_while(char::is_ascii_digit).collect();
    Some(ClientVersion {
        major_version: major.trim().parse().ok()?,
        minor_version: minor.parse().ok()?,
    })
}

/// The HTTP status of an engine refusal.
fn status_of(error: &BollardError) -> Option<u16> {
    match error {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Whether the engine refused a call because the container does not exist. Not every
/// 404 means that: starting a container whose network is gone is a 404 too ("network
/// plant not found").
fn is_no_such_container(error: &BollardError) -> bool {
    matches!(
        error,
        BollardError::DockerResponseServerError { status_code: 404, message }
            if message.to_ascii_lowercase().contains("no such container")
    )
}

/// Whether the engine refused a call because the image does not exist.
fn is_no_such_image(error: &BollardError) -> bool {
    matches!(
        error,
        BollardError::DockerResponseServerError { status_code: 404, message }
            if message.to_ascii_lowercase().contains("no such image")
    )
}

/// A failed call on a container: `{verb} container {id}`, or
/// [`RuntimeError::NoSuchInstance`] when it is gone.
fn container_error(verb: &str, id: &InstanceId, error: BollardError) -> RuntimeError {
    if is_no_such_container(&error) {
        RuntimeError::NoSuchInstance(id.0.clone())
    } else {
        docker_error(format!("{verb} container {}", short_id(id)), error)
    }
}

/// A failed engine call. Failing to reach the engine at all is
/// [`RuntimeError::DockerUnavailable`]; everything else is [`RuntimeError::Docker`].
fn docker_error(operation: String, error: BollardError) -> RuntimeError {
    match error {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => RuntimeError::Docker {
            operation,
            message: if message.is_empty() {
                format!("the engine answered HTTP {status_code}")
            } else {
                message
            },
        },
        BollardError::SocketNotFoundError(_)
        | BollardError::IOError { .. }
        | BollardError::HyperLegacyError { .. } => {
            RuntimeError::DockerUnavailable(format!("{operation}: {}", error_chain(&error)))
        }
        other => RuntimeError::Docker {
            operation,
            message: error_chain(&other),
        },
    }
}

/// An error and its causes, `outer: inner: ...` (bollard's transport errors say little
/// at the top: "client error (Connect)").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A container id as Docker shows it (12 characters), for messages.
fn short_id(id: &InstanceId) -> &str {
    id.0.get(..12).unwrap_or(&id.0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::runtime::Limits;

    fn spec(options: Value) -> LaunchSpec {
        LaunchSpec {
            name: "weir-test".to_owned(),
            module: "enrich".to_owned(),
            program: Program::Image {
                image: "weir/enrich:1".to_owned(),
                archive: None,
                command: Some(vec!["serve".to_owned()]),
            },
            env: BTreeMap::from([
                ("A".to_owned(), "user".to_owned()),
                ("WEIR_MODULE_NAME".to_owned(), "spoofed".to_owned()),
            ]),
            transport: Transport::Unix,
            socket_dir: PathBuf::from("/tmp/weir/enrich"),
            role: "transform",
            limits: Limits::default(),
            create_options: match options {
                Value::Object(map) => map,
                _ => Map::new(),
            },
            labels: BTreeMap::from([("weir.module".to_owned(), "enrich".to_owned())]),
        }
    }

    fn body_for(spec: &LaunchSpec) -> ContainerCreateBody {
        let mut body = parse_create_options(&spec.create_options).expect("options parse");
        apply_launch_spec(&mut body, spec, Path::new("/tmp/weir/enrich"));
        body
    }

    #[test]
    fn weir_settings_win_over_create_options() {
        let mut spec = spec(serde_json::json!({
            "Env": ["A=options", "B=options"],
            "Labels": {"x": "y", "weir.module": "other"},
            "HostConfig": {
                "RestartPolicy": {"Name": "always"},
                "Binds": ["/data:/data:ro"],
                "ReadonlyRootfs": true,
            },
        }));
        spec.limits = Limits {
            memory_bytes: Some(32 << 20),
            cpus: Some(0.5),
            pids: Some(64),
        };
        let body = body_for(&spec);
        assert_eq!(body.image.as_deref(), Some("weir/enrich:1"));
        assert_eq!(body.cmd, Some(vec!["serve".to_owned()]));
        let env = body.env.unwrap();
        assert_eq!(env[0], "A=user");
        assert_eq!(env[1], "B=options");
        assert!(env.contains(&"WEIR_MODULE_NAME=enrich".to_owned()));
        assert!(env.contains(&"WEIR_MODULE_SOCKET=/run/weir/module.sock".to_owned()));
        assert_eq!(
            env.iter()
                .filter(|e| e.starts_with("WEIR_MODULE_NAME="))
                .count(),
            1
        );
        let labels = body.labels.unwrap();
        assert_eq!(labels["x"], "y");
        assert_eq!(labels["weir.module"], "enrich");
        let host = body.host_config.unwrap();
        assert_eq!(
            host.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::NO)
        );
        assert_eq!(
            host.binds.unwrap(),
            vec![
                "/data:/data:ro".to_owned(),
                "/tmp/weir/enrich:/run/weir".to_owned()
            ]
        );
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.memory, Some(32 << 20));
        assert_eq!(host.memory_swap, Some(32 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.pids_limit, Some(64));
        assert_eq!(host.network_mode, None);
    }

    #[test]
    fn tcp_modules_share_the_host_network_unless_told_otherwise() {
        let tcp = Transport::Tcp {
            module: "127.0.0.1:7001".parse().unwrap(),
            runtime: "127.0.0.1:7002".parse().unwrap(),
        };
        let mut plain = spec(serde_json::json!({}));
        plain.transport = tcp.clone();
        let host = body_for(&plain).host_config.unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("host"));

        let mut named = spec(serde_json::json!({"HostConfig": {"NetworkMode": "plant"}}));
        named.transport = tcp;
        let host = body_for(&named).host_config.unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("plant"));
    }

    #[test]
    fn container_users_are_read_as_numbers_where_they_are_numbers() {
        assert_eq!(container_user(None), Some((0, Some(0))));
        assert_eq!(container_user(Some("")), Some((0, Some(0))));
        assert_eq!(container_user(Some("1000")), Some((1000, None)));
        assert_eq!(container_user(Some("1000:2000")), Some((1000, Some(2000))));
        assert_eq!(container_user(Some("nobody")), None);
        assert_eq!(container_user(Some("1000:staff")), None);
    }

    #[tokio::test]
    async fn the_socket_directory_is_private_to_the_modules_user() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let me = std::fs::metadata(dir.path()).unwrap().uid();
        let mine = dir.path().join("mine");
        prepare_socket_dir(&mine, Some((me, None))).await.unwrap();
        let meta = std::fs::metadata(&mine).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o700, me));
        let named = dir.path().join("named");
        prepare_socket_dir(&named, None).await.unwrap();
        assert_eq!(std::fs::metadata(&named).unwrap().mode() & 0o7777, 0o1777);
        if me == 0 {
            // As root, the directory is given to the container's user.
            let theirs = dir.path().join("theirs");
            prepare_socket_dir(&theirs, Some((1000, Some(1000))))
                .await
                .unwrap();
            let meta = std::fs::metadata(&theirs).unwrap();
            assert_eq!(
                (meta.mode() & 0o7777, meta.uid(), meta.gid()),
                (0o700, 1000, 1000)
            );
        }
    }

    #[test]
    fn bad_create_options_name_the_field() {
        let error = |options: Value| {
            let Value::Object(map) = options else {
                unreachable!()
            };
            parse_create_options(&map).unwrap_err()
        };
        let e = error(serde_json::json!({"HostConfig": {"Memory": "lots"}}));
        assert!(e.contains("`HostConfig.Memory`"), "{e}");
        let e = error(serde_json::json!({"Labels": ["x"]}));
        assert!(e.contains("`Labels`"), "{e}");
        let e = error(serde_json::json!({"labels": {"x": "y"}}));
        assert!(
            e.contains("unknown field `labels`") && e.contains("`Labels`"),
            "{e}"
        );
        let e = error(serde_json::json!({"HostConfig": {"Membory": 5}}));
        assert!(e.contains("unknown field `HostConfig.Membory`"), "{e}");
        let e = error(serde_json::json!({"HostConfig": "host"}));
        assert!(e.contains("`HostConfig` must be an object"), "{e}");
    }

    #[test]
    fn field_names_come_from_the_derive() {
        let fields = field_names::<ContainerCreateBody>();
        assert!(fields.contains(&"HostConfig") && fields.contains(&"Env"));
        assert!(field_names::<HostConfig>().contains(&"ReadonlyRootfs"));
    }

    #[test]
    fn env_merges_by_name() {
        let merged = merge_env(
            vec!["A=1".into(), "B=2".into(), "C".into()],
            [
                ("B".to_owned(), "3".to_owned()),
                ("D".to_owned(), "4".to_owned()),
            ]
            .into_iter(),
        );
        assert_eq!(merged, vec!["A=1", "B=3", "C", "D=4"]);
    }

    #[test]
    fn exit_codes_above_128_are_signals() {
        assert_eq!(signal_of(137), Some(9));
        assert_eq!(signal_of(143), Some(15));
        assert_eq!(signal_of(128), None);
        assert_eq!(signal_of(3), None);
        assert_eq!(signal_of(255), None);
    }

    #[test]
    fn max_api_version_reads_the_refusal() {
        let version = max_api_version(
            "client version 1.53 is too new. Maximum supported API version is 1.41",
        )
        .unwrap();
        assert_eq!((version.major_version, version.minor_version), (1, 41));
        assert!(max_api_version("something else").is_none());
    }
}
