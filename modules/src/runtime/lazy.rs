//! The Docker runtime, connected on first use: a pipeline without container modules
//! never touches the engine, and one with them fails its first start with a clear
//! message when the engine is not there.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::OnceCell;

use super::{
    ContainerRuntime, DockerRuntime, ExitInfo, InstanceId, InstanceState, LaunchSpec, LogLine,
    RuntimeEvent,
};
use crate::error::RuntimeError;

/// A [`DockerRuntime`] made on the first call that needs it.
#[derive(Default)]
pub struct LazyDocker {
    docker: OnceCell<DockerRuntime>,
}

impl LazyDocker {
    async fn docker(&self) -> Result<&DockerRuntime, RuntimeError> {
        self.docker
            .get_or_try_init(|| async {
                let docker = DockerRuntime::connect().await?;
                // What a runtime that crashed left behind goes before anything starts.
                if let Err(error) = docker.sweep_leftovers().await {
                    tracing::warn!("cannot remove leftover module containers: {error}");
                }
                Ok(docker)
            })
            .await
    }

    /// The connected runtime, for the calls made after `prepare` (which connects).
    fn connected(&self) -> Result<&DockerRuntime, RuntimeError> {
        self.docker
            .get()
            .ok_or_else(|| RuntimeError::DockerUnavailable("not connected yet".to_owned()))
    }
}

#[async_trait]
impl ContainerRuntime for LazyDocker {
    fn kind(&self) -> &'static str {
        "docker"
    }

    async fn prepare(&self, spec: &LaunchSpec) -> Result<(), RuntimeError> {
        self.docker().await?.prepare(spec).await
    }

    async fn create(&self, spec: &LaunchSpec) -> Result<InstanceId, RuntimeError> {
        self.docker().await?.create(spec).await
    }

    async fn start(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        self.docker().await?.start(id).await
    }

    async fn stop(&self, id: &InstanceId, grace: Duration) -> Result<(), RuntimeError> {
        self.docker().await?.stop(id, grace).await
    }

    async fn remove(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        self.docker().await?.remove(id).await
    }

    async fn inspect(&self, id: &InstanceId) -> Result<InstanceState, RuntimeError> {
        self.docker().await?.inspect(id).await
    }

    async fn wait(&self, id: &InstanceId) -> Result<ExitInfo, RuntimeError> {
        self.docker().await?.wait(id).await
    }

    fn logs(&self, id: &InstanceId) -> BoxStream<'static, Result<LogLine, RuntimeError>> {
        match self.connected() {
            Ok(docker) => docker.logs(id),
            Err(error) => futures::stream::iter([Err(error)]).boxed(),
        }
    }

    fn events(&self, id: &InstanceId) -> BoxStream<'static, RuntimeEvent> {
        match self.connected() {
            Ok(docker) => docker.events(id),
            Err(_) => futures::stream::empty().boxed(),
        }
    }
}
