//! An in-memory runtime for unit tests: each start plays the next scripted run (run until
//! stopped, exit after a while, get OOM-killed, fail to start), every call is recorded
//! with the time it was made, and time is tokio's, so tests under a paused clock check
//! backoff timings exactly without sleeping.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::{
    ContainerRuntime, ExitInfo, InstanceId, InstanceState, LaunchSpec, LogLine, Program,
    RuntimeEvent,
};
use crate::error::RuntimeError;

/// What one start of a fake instance does.
#[derive(Clone, Debug, PartialEq)]
pub enum FakeRun {
    /// Runs until stopped.
    UntilStopped,
    /// Exits with `code` after running for the duration.
    ExitAfter(Duration, i64),
    /// Is OOM-killed after running for the duration.
    OomAfter(Duration),
    /// `start` fails with this message.
    FailStart(String),
}

/// A runtime call, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeCall {
    /// `create` of the named instance.
    Create(String),
    /// `start`.
    Start(InstanceId),
    /// `stop`.
    Stop(InstanceId),
    /// `remove`.
    Remove(InstanceId),
}

/// The in-memory runtime. Cloning shares it, so a test keeps a handle on what the
/// supervisor drives.
#[derive(Clone, Default)]
pub struct FakeRuntime {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    script: VecDeque<FakeRun>,
    missing_images: HashSet<String>,
    calls: Vec<(Instant, FakeCall)>,
    instances: HashMap<InstanceId, FakeInstance>,
    next_id: u64,
}

struct FakeInstance {
    exit: watch::Sender<Option<ExitInfo>>,
    events: broadcast::Sender<RuntimeEvent>,
}

impl FakeRuntime {
    /// A runtime whose instances run until stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues what the next starts do, in order; once the script is played out,
    /// instances run until stopped.
    pub fn script(&self, runs: impl IntoIterator<Item = FakeRun>) {
        self.lock().script.extend(runs);
    }

    /// Makes `prepare` report `image` missing.
    pub fn without_image(&self, image: &str) {
        self.lock().missing_images.insert(image.to_owned());
    }

    /// Every call so far, with the time it was made.
    pub fn calls(&self) -> Vec<(Instant, FakeCall)> {
        self.lock().calls.clone()
    }

    /// The times of the `start` calls so far.
    pub fn start_times(&self) -> Vec<Instant> {
        self.calls()
            .into_iter()
            .filter(|(_, call)| matches!(call, FakeCall::Start(_)))
            .map(|(at, _)| at)
            .collect()
    }

    /// Instances created and not removed.
    pub fn live_instances(&self) -> usize {
        self.lock().instances.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("the fake's state is never left poisoned")
    }

    fn record(&self, call: FakeCall) {
        self.lock().calls.push((Instant::now(), call));
    }

    fn end(&self, id: &InstanceId, exit: ExitInfo) {
        let state = self.lock();
        if let Some(instance) = state.instances.get(id)
            && instance.exit.borrow().is_none()
        {
            if exit.oom_killed {
                let _ = instance.events.send(RuntimeEvent::OutOfMemory);
            }
            let _ = instance.events.send(RuntimeEvent::Exited(exit.clone()));
            instance.exit.send_replace(Some(exit));
        }
    }

    fn exit_of(&self, id: &InstanceId) -> Result<watch::Receiver<Option<ExitInfo>>, RuntimeError> {
        self.lock()
            .instances
            .get(id)
            .map(|i| i.exit.subscribe())
            .ok_or_else(|| RuntimeError::NoSuchInstance(id.0.clone()))
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    fn kind(&self) -> &'static str {
        "fake"
    }

    async fn prepare(&self, spec: &LaunchSpec) -> Result<(), RuntimeError> {
        if let Program::Image { image, .. } = &spec.program
            && self.lock().missing_images.contains(image)
        {
            return Err(RuntimeError::ImageMissing {
                image: image.clone(),
            });
        }
        Ok(())
    }

    async fn create(&self, spec: &LaunchSpec) -> Result<InstanceId, RuntimeError> {
        self.record(FakeCall::Create(spec.name.clone()));
        let mut state = self.lock();
        state.next_id += 1;
        let id = InstanceId(format!("{}-{}", spec.name, state.next_id));
        state.instances.insert(
            id.clone(),
            FakeInstance {
                exit: watch::Sender::new(None),
                events: broadcast::channel(16).0,
            },
        );
        Ok(id)
    }

    async fn start(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        self.record(FakeCall::Start(id.clone()));
        let run = self
            .lock()
            .script
            .pop_front()
            .unwrap_or(FakeRun::UntilStopped);
        let (after, exit) = match run {
            FakeRun::UntilStopped => return Ok(()),
            FakeRun::FailStart(message) => return Err(RuntimeError::Injected(message)),
            FakeRun::ExitAfter(after, code) => (
                after,
                ExitInfo {
                    code: Some(code),
                    ..ExitInfo::default()
                },
            ),
            FakeRun::OomAfter(after) => (
                after,
                ExitInfo {
                    code: Some(137),
                    signal: Some(9),
                    oom_killed: true,
                    error: None,
                },
            ),
        };
        let (runtime, id) = (self.clone(), id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            runtime.end(&id, exit);
        });
        Ok(())
    }

    async fn stop(&self, id: &InstanceId, _grace: Duration) -> Result<(), RuntimeError> {
        self.record(FakeCall::Stop(id.clone()));
        self.end(
            id,
            ExitInfo {
                code: Some(143),
                signal: Some(15),
                ..ExitInfo::default()
            },
        );
        Ok(())
    }

    async fn remove(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        self.record(FakeCall::Remove(id.clone()));
        self.lock().instances.remove(id);
        Ok(())
    }

    async fn inspect(&self, id: &InstanceId) -> Result<InstanceState, RuntimeError> {
        let exit = self.exit_of(id)?.borrow().clone();
        Ok(InstanceState {
            running: exit.is_none(),
            exit,
            health: None,
        })
    }

    async fn wait(&self, id: &InstanceId) -> Result<ExitInfo, RuntimeError> {
        let mut exit = self.exit_of(id)?;
        let ended = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| RuntimeError::NoSuchInstance(id.0.clone()))?;
        Ok(ended.clone().unwrap_or_default())
    }

    fn logs(&self, _id: &InstanceId) -> BoxStream<'static, Result<LogLine, RuntimeError>> {
        futures::stream::empty().boxed()
    }

    fn events(&self, id: &InstanceId) -> BoxStream<'static, RuntimeEvent> {
        let Some(receiver) = self.lock().instances.get(id).map(|i| i.events.subscribe()) else {
            return futures::stream::empty().boxed();
        };
        futures::stream::unfold(Some(receiver), |receiver| async move {
            let mut receiver = receiver?;
            match receiver.recv().await {
                Ok(event @ RuntimeEvent::Exited(_)) => Some((event, None)),
                Ok(event) => Some((event, Some(receiver))),
                Err(_) => None,
            }
        })
        .boxed()
    }
}
