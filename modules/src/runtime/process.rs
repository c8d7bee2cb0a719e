//! The process runtime: modules as local executables, for devices without Docker.
//!
//! A process module gets the same protocol environment as a container, its own module
//! directory for the sockets, and its stdout and stderr read line by line (lines that
//! are not UTF-8 or never end are handled as for containers: see `log_lines.rs`). Stopping
//! sends SIGTERM and, after the grace period, SIGKILL. Limits go through util-linux's
//! `prlimit` wrapper: `memory` is an address-space limit (RLIMIT_AS), so a module that
//! passes it sees allocations fail rather than being OOM-killed, and `pids` is
//! RLIMIT_NPROC. `cpus` needs a container.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::owner::Owner;
use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, watch};

use super::log_lines::LineSplitter;
use super::{
    ContainerRuntime, ExitInfo, InstanceId, InstanceState, LaunchSpec, LogLine, LogStream, Program,
    RuntimeEvent, protocol_env,
};
use crate::error::RuntimeError;

/// Log lines kept per instance for a reader that subscribes late.
const KEPT_LOG_LINES: usize = 1000;

/// Runs modules as child processes of the runtime.
#[derive(Default)]
pub struct ProcessRuntime {
    instances: Mutex<HashMap<InstanceId, Arc<Instance>>>,
    next_id: AtomicU64,
}

/// One created process module.
struct Instance {
    spec: LaunchSpec,
    /// The process id once started.
    pid: Mutex<Option<u32>>,
    /// How it ended, once it has.
    exit: watch::Sender<Option<ExitInfo>>,
    logs: Mutex<LogBuffer>,
    events: broadcast::Sender<RuntimeEvent>,
}

/// Recent log lines, and the channel later lines go out on while the process's output
/// is open.
struct LogBuffer {
    kept: VecDeque<LogLine>,
    sender: Option<broadcast::Sender<LogLine>>,
    /// Output streams (stdout, stderr) not yet at their end.
    open: usize,
}

impl ProcessRuntime {
    /// A runtime with no instances.
    pub fn new() -> Self {
        Self::default()
    }

    fn instance(&self, id: &InstanceId) -> Result<Arc<Instance>, RuntimeError> {
        self.instances
            .lock()
            .expect("the instance table is never left poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| RuntimeError::NoSuchInstance(id.0.clone()))
    }

    /// The command line: the module's own, behind `prlimit` when it has limits.
    fn command_line(spec: &LaunchSpec) -> Result<Vec<String>, RuntimeError> {
        let Program::Process { command, .. } = &spec.program else {
            return Err(RuntimeError::Executable {
                program: spec.module.clone(),
                reason: "the process runtime runs local executables, and this module names an \
                         image (run it with the docker runtime)"
                    .to_owned(),
            });
        };
        let mut line = Vec::new();
        // util-linux's setpriv (beside prlimit) gives the module a parent-death signal:
        // a runtime killed with SIGKILL takes its process modules with it. Without it,
        // the next runtime on the module directory ends them (`sweep_leftovers`).
        if let Ok(setpriv) = resolve("setpriv", None) {
            line.extend([
                setpriv.display().to_string(),
                "--pdeathsig".to_owned(),
                "KILL".to_owned(),
                "--".to_owned(),
            ]);
        }
        if spec.limits.memory_bytes.is_some() || spec.limits.pids.is_some() {
            line.push("prlimit".to_owned());
            if let Some(bytes) = spec.limits.memory_bytes {
                line.push(format!("--as={bytes}"));
            }
            if let Some(pids) = spec.limits.pids {
                line.push(format!("--nproc={pids}"));
            }
            line.push("--".to_owned());
        }
        line.extend(command.iter().cloned());
        Ok(line)
    }
}

/// Finds `program` as the shell would: a path when it has a slash, else on `PATH`.
fn resolve(program: &str, working_dir: Option<&Path>) -> Result<PathBuf, String> {
    let executable = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let path = match working_dir {
            Some(dir) if Path::new(program).is_relative() => dir.join(program),
            _ => PathBuf::from(program),
        };
        return if !path.exists() {
            Err("no such file".to_owned())
        } else if executable(&path) {
            Ok(path)
        } else {
            Err("the file is not executable (chmod +x)".to_owned())
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| executable(path))
        .ok_or_else(|| "not found on PATH".to_owned())
}

#[async_trait]
impl ContainerRuntime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    async fn prepare(&self, spec: &LaunchSpec) -> Result<(), RuntimeError> {
        let line = Self::command_line(spec)?;
        let Program::Process {
            command,
            working_dir,
        } = &spec.program
        else {
            unreachable!("command_line accepts processes only");
        };
        let Some(program) = command.first() else {
            return Err(RuntimeError::Executable {
                program: String::new(),
                reason: "the command is empty".to_owned(),
            });
        };
        for needed in [&line[0], program] {
            resolve(needed, working_dir.as_deref()).map_err(|reason| RuntimeError::Executable {
                program: needed.clone(),
                reason,
            })?;
        }
        Ok(())
    }

    async fn create(&self, spec: &LaunchSpec) -> Result<InstanceId, RuntimeError> {
        Self::command_line(spec)?;
        let id = InstanceId(format!(
            "{}-{}",
            spec.name,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        ));
        let instance = Instance {
            spec: spec.clone(),
            pid: Mutex::new(None),
            exit: watch::Sender::new(None),
            logs: Mutex::new(LogBuffer {
                kept: VecDeque::new(),
                sender: Some(broadcast::channel(KEPT_LOG_LINES).0),
                open: 0,
            }),
            events: broadcast::channel(64).0,
        };
        self.instances
            .lock()
            .expect("the instance table is never left poisoned")
            .insert(id.clone(), Arc::new(instance));
        Ok(id)
    }

    async fn start(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        let instance = self.instance(id)?;
        let spec = &instance.spec;
        let line = Self::command_line(spec)?;
        std::fs::create_dir_all(&spec.socket_dir).map_err(|error| {
            RuntimeError::io(format!("create {}", spec.socket_dir.display()), error)
        })?;
        let mut command = tokio::process::Command::new(&line[0]);
        command
            .args(&line[1..])
            .envs(&spec.env)
            .envs(protocol_env(spec, &spec.socket_dir))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A process group of its own: stopping the module stops what it started,
            // and a runtime that starts after a crash can find and end it.
            .process_group(0)
            .kill_on_drop(true);
        if let Program::Process {
            working_dir: Some(dir),
            ..
        } = &spec.program
        {
            command.current_dir(dir);
        }
        let mut child = command.spawn().map_err(|error| RuntimeError::Executable {
            program: line.join(" "),
            reason: error.to_string(),
        })?;
        *instance.pid.lock().expect("never poisoned") = child.id();
        record_owner(&spec.socket_dir, child.id());
        for (stream, reader) in [
            (
                LogStream::Stdout,
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
            (
                LogStream::Stderr,
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
        ] {
            let Some(reader) = reader else { continue };
            instance.logs.lock().expect("never poisoned").open += 1;
            let instance = instance.clone();
            tokio::spawn(async move {
                // Bytes, not `lines()`: a line that is not UTF-8 must not end the reader.
                let mut reader = reader;
                let mut lines = LineSplitter::default();
                let mut chunk = vec![0; 8192];
                let publish = |line: LogLine| {
                    let mut logs = instance.logs.lock().expect("never poisoned");
                    if logs.kept.len() == KEPT_LOG_LINES {
                        logs.kept.pop_front();
                    }
                    logs.kept.push_back(line.clone());
                    if let Some(sender) = &logs.sender {
                        let _ = sender.send(line);
                    }
                };
                while let Ok(read @ 1..) = reader.read(&mut chunk).await {
                    lines.push(stream, &chunk[..read], publish);
                }
                lines.finish(publish);
                // The last output stream to end ends the log readers' streams.
                let mut logs = instance.logs.lock().expect("never poisoned");
                logs.open -= 1;
                if logs.open == 0 {
                    logs.sender = None;
                }
            });
        }
        let _ = instance.events.send(RuntimeEvent::Started);
        let waiter = instance.clone();
        tokio::spawn(async move {
            let mut exit = match child.wait().await {
                Ok(status) => ExitInfo {
                    code: status.code().map(i64::from),
                    signal: status.signal(),
                    oom_killed: false,
                    error: None,
                },
                Err(error) => ExitInfo {
                    error: Some(format!("waiting for the process failed: {error}")),
                    ..ExitInfo::default()
                },
            };
            // Without a cgroup the kernel does not OOM-kill a process module: its
            // allocations fail under the address-space limit. Say so, rather than
            // leave a bare abort unexplained (and never claim an OOM kill).
            if let Some(limit) = waiter.spec.limits.memory_bytes
                && !exit.is_success()
                && exit.error.is_none()
            {
                exit.error = Some(format!(
                    "it ran under a {} MiB address-space limit: a failed allocation is the \
                     likely cause",
                    limit >> 20
                ));
            }
            let _ = waiter.events.send(RuntimeEvent::Exited(exit.clone()));
            waiter.exit.send_replace(Some(exit));
        });
        Ok(())
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<(), RuntimeError> {
        let instance = self.instance(id)?;
        let Some(pid) = *instance.pid.lock().expect("never poisoned") else {
            return Ok(());
        };
        let mut exit = instance.exit.subscribe();
        if exit.borrow().is_some() {
            return Ok(());
        }
        let pid = Pid::from_raw(pid as i32);
        // The module's whole process group: what it started goes with it.
        let _ = killpg(pid, Signal::SIGTERM);
        if tokio::time::timeout(grace, exit.wait_for(Option::is_some))
            .await
            .is_err()
        {
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = exit.wait_for(Option::is_some).await;
        }
        Ok(())
    }

    async fn remove(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        self.stop(id, Duration::ZERO).await?;
        self.instances.lock().expect("never poisoned").remove(id);
        Ok(())
    }

    async fn inspect(&self, id: &InstanceId) -> Result<InstanceState, RuntimeError> {
        let instance = self.instance(id)?;
        let started = instance.pid.lock().expect("never poisoned").is_some();
        let exit = instance.exit.borrow().clone();
        Ok(InstanceState {
            running: started && exit.is_none(),
            exit,
            health: None,
        })
    }

    async fn wait(&self, id: &InstanceId) -> Result<ExitInfo, RuntimeError> {
        let instance = self.instance(id)?;
        let mut exit = instance.exit.subscribe();
        let ended = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| RuntimeError::NoSuchInstance(id.0.clone()))?;
        Ok(ended.clone().unwrap_or_default())
    }

    fn logs(&self, id: &InstanceId) -> BoxStream<'static, Result<LogLine, RuntimeError>> {
        let instance = match self.instance(id) {
            Ok(instance) => instance,
            Err(error) => return futures::stream::iter([Err(error)]).boxed(),
        };
        let (kept, receiver) = {
            let logs = instance.logs.lock().expect("never poisoned");
            (
                logs.kept.clone(),
                logs.sender.as_ref().map(|s| s.subscribe()),
            )
        };
        let later = futures::stream::unfold(receiver, |receiver| async move {
            let mut receiver = receiver?;
            loop {
                match receiver.recv().await {
                    Ok(line) => return Some((Ok(line), Some(receiver))),
                    // A slow reader misses lines rather than holding the module up.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        futures::stream::iter(kept.into_iter().map(Ok))
            .chain(later)
            .boxed()
    }

    fn events(&self, id: &InstanceId) -> BoxStream<'static, RuntimeEvent> {
        let Ok(instance) = self.instance(id) else {
            return futures::stream::empty().boxed();
        };
        let receiver = instance.events.subscribe();
        let ended = instance.exit.borrow().clone();
        if let Some(exit) = ended {
            return futures::stream::iter([RuntimeEvent::Exited(exit)]).boxed();
        }
        futures::stream::unfold(Some(receiver), |receiver| async move {
            let mut receiver = receiver?;
            loop {
                match receiver.recv().await {
                    Ok(event @ RuntimeEvent::Exited(_)) => return Some((event, None)),
                    Ok(event) => return Some((event, Some(receiver))),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }
}

/// The file in a process module's directory that says which runtime started which
/// process group: `RUNTIME MODULE`, each an [`Owner`].
const OWNER_FILE: &str = "owner";

/// What every module directory's name starts with, under the module root.
pub const MODULE_DIR_PREFIX: &str = "weir-mod-";

/// Records in the module's directory that this runtime started process `pid` (the
/// leader of its group), for [`sweep_leftovers`] after a crash.
fn record_owner(dir: &Path, pid: Option<u32>) {
    let (Some(runtime), Some(module)) = (Owner::current(), pid.and_then(Owner::of_process)) else {
        return;
    };
    if let Err(error) = std::fs::write(dir.join(OWNER_FILE), format!("{runtime} {module}\n")) {
        tracing::warn!(dir = %dir.display(), "cannot record the module's owner: {error}");
    }
}

/// Ends the process modules, and removes the module directories, that a runtime which
/// is gone left under `root` (it was killed before it could stop them); gives how many
/// process groups were ended. What a running runtime started is left alone.
pub fn sweep_leftovers(root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut ended = 0;
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(MODULE_DIR_PREFIX)
        {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        let mut owners = text.split_whitespace().map(Owner::parse);
        let (Some(Some(runtime)), Some(Some(module))) = (owners.next(), owners.next()) else {
            continue;
        };
        if !runtime.is_gone() {
            continue;
        }
        if !module.is_gone() {
            let _ = killpg(Pid::from_raw(module.pid() as i32), Signal::SIGKILL);
            ended += 1;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    if ended > 0 {
        tracing::info!("ended {ended} process modules a stopped runtime left running");
    }
    ended
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::runtime::{Limits, Transport};

    fn spec(command: &[&str], dir: &Path) -> LaunchSpec {
        LaunchSpec {
            name: "weir-test-proc".to_owned(),
            module: "proc".to_owned(),
            program: Program::Process {
                command: command.iter().map(|s| (*s).to_owned()).collect(),
                working_dir: None,
            },
            env: BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]),
            transport: Transport::Unix,
            socket_dir: dir.to_owned(),
            role: "transform",
            limits: Limits::default(),
            create_options: Default::default(),
            labels: Default::default(),
        }
    }

    async fn started(runtime: &ProcessRuntime, spec: &LaunchSpec) -> InstanceId {
        runtime.prepare(spec).await.expect("prepared");
        let id = runtime.create(spec).await.expect("created");
        runtime.start(&id).await.expect("started");
        id
    }

    #[tokio::test]
    async fn output_is_read_line_by_line_and_stop_terminates_gracefully() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = ProcessRuntime::new();
        let spec = spec(
            &[
                "sh",
                "-c",
                // The trap goes first: the test stops the process once it has read
                // both lines.
                "trap 'echo bye; exit 0' TERM; echo \"$GREETING $WEIR_MODULE_ROLE\"; \
                 echo oops >&2; while true; do sleep 0.05; done",
            ],
            dir.path(),
        );
        let id = started(&runtime, &spec).await;
        let mut logs = runtime.logs(&id);
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let line = tokio::time::timeout(Duration::from_secs(10), logs.next())
                .await
                .expect("a line within 10s")
                .expect("the stream is open")
                .expect("a line");
            seen.push((line.stream, line.line));
        }
        seen.sort_by_key(|(stream, _)| *stream == LogStream::Stderr);
        assert_eq!(
            seen,
            [
                (LogStream::Stdout, "hello transform".to_owned()),
                (LogStream::Stderr, "oops".to_owned())
            ]
        );
        assert!(runtime.inspect(&id).await.unwrap().running);
        runtime.stop(&id, Duration::from_secs(5)).await.unwrap();
        let exit = runtime.wait(&id).await.unwrap();
        assert_eq!(exit.code, Some(0), "the TERM trap ran: {exit:?}");
        runtime.remove(&id).await.unwrap();
        assert!(matches!(
            runtime.inspect(&id).await,
            Err(RuntimeError::NoSuchInstance(_))
        ));
    }

    #[tokio::test]
    async fn output_that_is_not_utf8_does_not_stop_the_log_reader() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = ProcessRuntime::new();
        let spec = spec(
            &[
                "sh",
                "-c",
                "printf 'bad \\377 byte\\n'; sleep 0.2; echo after; printf unfinished",
            ],
            dir.path(),
        );
        let id = started(&runtime, &spec).await;
        let mut logs = runtime.logs(&id);
        let mut seen = Vec::new();
        while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(10), logs.next()).await
        {
            seen.push(line.expect("a line").line);
        }
        assert_eq!(seen, ["bad \u{FFFD} byte", "after", "unfinished"]);
        runtime.wait(&id).await.unwrap();
    }

    #[tokio::test]
    async fn exit_codes_and_kills_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = ProcessRuntime::new();
        let id = started(&runtime, &spec(&["sh", "-c", "exit 3"], dir.path())).await;
        let exit = runtime.wait(&id).await.unwrap();
        assert_eq!(
            (exit.code, exit.signal, exit.is_success()),
            (Some(3), None, false)
        );

        // A process that ignores SIGTERM is killed once the grace period is over.
        let id = started(
            &runtime,
            &spec(
                &["sh", "-c", "trap '' TERM; while true; do sleep 0.05; done"],
                dir.path(),
            ),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        runtime.stop(&id, Duration::from_millis(300)).await.unwrap();
        let exit = runtime.wait(&id).await.unwrap();
        assert_eq!(exit.signal, Some(9), "{exit:?}");
        assert_eq!(exit.to_string(), "killed by signal 9");
    }

    #[tokio::test]
    async fn missing_or_unrunnable_programs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = ProcessRuntime::new();
        let error = runtime
            .prepare(&spec(&["./no-such-module"], dir.path()))
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot run `./no-such-module`: no such file"
        );
        let error = runtime
            .prepare(&spec(&["no-such-module-on-path"], dir.path()))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("not found on PATH"), "{error}");
        let text = dir.path().join("data.txt");
        std::fs::write(&text, "not a program").unwrap();
        let error = runtime
            .prepare(&spec(&[text.to_str().unwrap()], dir.path()))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("not executable"), "{error}");
    }

    #[test]
    fn limits_run_the_module_under_prlimit_with_a_parent_death_signal() {
        let dir = std::env::temp_dir();
        let mut limited = spec(&["./module", "--flag"], &dir);
        limited.limits = Limits {
            memory_bytes: Some(64 << 20),
            cpus: None,
            pids: Some(32),
        };
        // setpriv comes first where it is installed (util-linux, as prlimit).
        let wrapper: Vec<String> = match resolve("setpriv", None) {
            Ok(setpriv) => vec![
                setpriv.display().to_string(),
                "--pdeathsig".into(),
                "KILL".into(),
                "--".into(),
            ],
            Err(_) => Vec::new(),
        };
        let expected = |rest: &[&str]| -> Vec<String> {
            wrapper
                .iter()
                .cloned()
                .chain(rest.iter().map(|part| (*part).to_owned()))
                .collect()
        };
        assert_eq!(
            ProcessRuntime::command_line(&limited).unwrap(),
            expected(&[
                "prlimit",
                "--as=67108864",
                "--nproc=32",
                "--",
                "./module",
                "--flag"
            ])
        );
        assert_eq!(
            ProcessRuntime::command_line(&spec(&["./module"], &dir)).unwrap(),
            expected(&["./module"])
        );
    }
}
