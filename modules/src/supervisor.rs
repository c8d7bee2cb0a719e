//! Keeping a module alive: start it, check its health, and restart it by its policy,
//! with exponential backoff and jitter. Weir owns restarts (a container's own restart
//! policy is `no`), so all four policies do what they say, health included.
//!
//! | policy | clean exit (code 0) | failure (non-zero exit, OOM, start error) | unhealthy |
//! | --- | --- | --- | --- |
//! | `never` | stays stopped | stays failed | reported, left running |
//! | `on-failure` | stays stopped | restarted | reported, left running |
//! | `on-unhealthy` | stays stopped | restarted | restarted |
//! | `always` | restarted | restarted | restarted |
//!
//! A module that keeps failing is never abandoned: once its backoff reaches the cap it is
//! reported `failed`, with the reason and last exit, and still retried at the cap. The
//! supervisor reads time from tokio, so tests run it under a paused clock and check the
//! delays exactly.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use weir_engine::config::HumanDuration;
use weir_engine::metrics::ModuleMetrics;

use crate::runtime::{
    ContainerRuntime, ExitInfo, InstanceId, LaunchSpec, LogStream, RuntimeEvent, RuntimeHealth,
};

/// How often a starting module is checked, until its first check passes.
const STARTING_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// When a module is restarted (see the table in the module docs).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restarted.
    Never,
    /// Restarted when it fails (exits non-zero, is OOM-killed, cannot start).
    OnFailure,
    /// Restarted when it fails or turns unhealthy.
    OnUnhealthy,
    /// Restarted whenever it ends or turns unhealthy (the default, as in IoT Edge).
    #[default]
    Always,
}

impl RestartPolicy {
    fn restarts(self, end: &RunEnd) -> bool {
        match (self, end) {
            (_, RunEnd::Cancelled) | (RestartPolicy::Never, _) => false,
            (RestartPolicy::Always, _) => true,
            (_, RunEnd::Exited(exit)) => !exit.is_success(),
            (_, RunEnd::StartFailed(_)) => true,
            (RestartPolicy::OnFailure, RunEnd::Unhealthy) => false,
            (RestartPolicy::OnUnhealthy, RunEnd::Unhealthy) => true,
            // A run that stopped answering is a failed run, whatever its health says.
            (_, RunEnd::Hung(_)) => true,
        }
    }

    fn acts_on_unhealthy(self) -> bool {
        matches!(self, RestartPolicy::OnUnhealthy | RestartPolicy::Always)
    }
}

/// How long to wait before each restart.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    /// The first delay.
    pub initial: HumanDuration,
    /// Each further delay is this many times the one before.
    pub multiplier: f64,
    /// The longest delay: a module still failing is retried this often, for ever.
    pub max: HumanDuration,
    /// Each delay is shortened by a random share up to this (0 to 1), so that many
    /// devices restarting at once spread out.
    pub jitter: f64,
    /// A run healthy for this long starts the delays over from `initial`.
    pub reset_after: HumanDuration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: HumanDuration(Duration::from_secs(1)),
            multiplier: 2.0,
            max: HumanDuration(Duration::from_secs(300)),
            jitter: 0.2,
            reset_after: HumanDuration(Duration::from_secs(600)),
        }
    }
}

impl BackoffConfig {
    /// Every problem with the settings, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.initial.0.is_zero() {
            problems.push(("initial", "initial must be longer than 0s".to_owned()));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            problems.push(("multiplier", "multiplier must be at least 1".to_owned()));
        }
        if self.max.0 < self.initial.0 {
            problems.push(("max", "max must be at least initial".to_owned()));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            problems.push(("jitter", "jitter must be between 0 and 1".to_owned()));
        }
        problems
    }

    /// The delay before restart number `failures + 1` in a row, before jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = self.multiplier.powi(failures.min(1000) as i32);
        let seconds = self.initial.0.as_secs_f64() * factor;
        if seconds.is_finite() && seconds < self.max.0.as_secs_f64() {
            Duration::from_secs_f64(seconds)
        } else {
            self.max.0
        }
    }
}

/// How the module's health is checked.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between checks.
    pub interval: HumanDuration,
    /// How long one check may take.
    pub timeout: HumanDuration,
    /// Failed checks in a row that make the module unhealthy.
    pub retries: u32,
    /// After a start, failed checks do not count for this long (a module that passes a
    /// check sooner is running at once). Slow starters, such as Python modules loading
    /// their libraries, need it.
    pub start_period: HumanDuration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: HumanDuration(Duration::from_secs(5)),
            timeout: HumanDuration(Duration::from_secs(2)),
            retries: 3,
            start_period: HumanDuration(Duration::from_secs(10)),
        }
    }
}

impl HealthConfig {
    /// Every problem with the settings, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if self.interval.0.is_zero() {
            problems.push(("interval", "interval must be longer than 0s".to_owned()));
        }
        if self.timeout.0.is_zero() {
            problems.push(("timeout", "timeout must be longer than 0s".to_owned()));
        }
        if self.retries == 0 {
            problems.push(("retries", "retries must be at least 1".to_owned()));
        }
        problems
    }
}

/// Asks a running module whether it is healthy.
#[async_trait]
pub trait HealthProbe: Send {
    /// One check: `Err` says why the module is not healthy.
    async fn check(&mut self, timeout: Duration) -> Result<(), String>;
}

/// The protocol's health check: `GET /v1/health` answered `200`.
pub struct HttpHealthProbe(pub weir_module_sdk::client::Client);

#[async_trait]
impl HealthProbe for HttpHealthProbe {
    async fn check(&mut self, timeout: Duration) -> Result<(), String> {
        match self.0.health(timeout).await {
            Ok(answer) if answer.status.is_success() => Ok(()),
            Ok(answer) => Err(format!(
                "health check answered {}: {}",
                answer.status,
                answer.text()
            )),
            Err(error) => Err(format!("health check failed: {error}")),
        }
    }
}

/// Where a module is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleState {
    /// Being created and started, or waiting for its first passing health check.
    Starting,
    /// Running and healthy: batches flow.
    Running,
    /// Running, but failing its health checks.
    Unhealthy,
    /// Waiting to be restarted.
    Backoff,
    /// Failing: its backoff reached the cap (it is still retried there), or its policy
    /// does not restart it after a failure.
    Failed,
    /// Ended cleanly and not restarted, or stopped by the runtime.
    Stopped,
}

impl ModuleState {
    /// The lower-case name used in metrics and `weir status`.
    pub fn name(self) -> &'static str {
        match self {
            ModuleState::Starting => "starting",
            ModuleState::Running => "running",
            ModuleState::Unhealthy => "unhealthy",
            ModuleState::Backoff => "backoff",
            ModuleState::Failed => "failed",
            ModuleState::Stopped => "stopped",
        }
    }
}

/// What is known about a module now.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleStatus {
    /// Its state.
    pub state: ModuleState,
    /// Restarts so far.
    pub restarts: u64,
    /// Failures in a row (what the backoff grows with).
    pub failures: u32,
    /// How its last run ended.
    pub last_exit: Option<ExitInfo>,
    /// Why it is not running, or why it is unhealthy.
    pub reason: Option<String>,
    /// The wait before the next restart, in backoff.
    pub next_restart_in: Option<Duration>,
    /// Counts runs: a batch retried after a restart goes to a new generation.
    pub generation: u64,
    /// Whether the policy will never start it again (a terminal state).
    pub finished: bool,
}

impl ModuleStatus {
    fn new() -> Self {
        ModuleStatus {
            state: ModuleState::Starting,
            restarts: 0,
            failures: 0,
            last_exit: None,
            reason: None,
            next_restart_in: None,
            generation: 0,
            finished: false,
        }
    }

    /// Whether batches may be sent.
    pub fn is_ready(&self) -> bool {
        self.state == ModuleState::Running
    }
}

/// Everything a supervisor is told.
pub struct SupervisorConfig {
    /// When to restart.
    pub restart: RestartPolicy,
    /// How long to wait before restarts.
    pub backoff: BackoffConfig,
    /// How health is checked.
    pub health: HealthConfig,
    /// How long a stopping module gets before it is killed.
    pub stop_timeout: Duration,
    /// Seeds the jitter (tests fix it; the runtime uses the clock).
    pub seed: u64,
    /// Modules that must be running before this one first starts: each name with a
    /// lookup of its status (`None` while it is not registered yet).
    pub depends_on: Vec<(String, DependencyLookup)>,
}

/// Finds a module's status by name, once it exists.
pub type DependencyLookup = Box<dyn Fn() -> Option<watch::Receiver<ModuleStatus>> + Send + Sync>;

/// A running supervisor: its status, and the means to stop it and its module.
pub struct SupervisorHandle {
    status: watch::Receiver<ModuleStatus>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    hung: mpsc::UnboundedSender<(u64, String)>,
}

impl SupervisorHandle {
    /// A receiver of the module's status.
    pub fn status(&self) -> watch::Receiver<ModuleStatus> {
        self.status.clone()
    }

    /// Says that run `generation` of the module stopped answering (a batch timed out):
    /// that run is stopped and counts as failed, and the restart policy decides what
    /// follows, so a retry never goes to an instance that may still be working on the
    /// same batch. A report about an earlier run is ignored.
    pub fn report_hung(&self, generation: u64, reason: String) {
        let _ = self.hung.send((generation, reason));
    }

    /// Stops the module (within its stop timeout) and the supervisor.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SupervisorHandle {
    fn drop(&mut self) {
        // A supervisor dropped without shutdown still stops its module: the task sees
        // the cancellation and stops it before ending.
        self.cancel.cancel();
    }
}

/// Starts supervising the module `spec` on `runtime`.
pub fn supervise(
    runtime: Arc<dyn ContainerRuntime>,
    spec: LaunchSpec,
    config: SupervisorConfig,
    probe: Box<dyn HealthProbe>,
    metrics: Option<ModuleMetrics>,
) -> SupervisorHandle {
    let (status, receiver) = watch::channel(ModuleStatus::new());
    let cancel = CancellationToken::new();
    let (hung, hung_reports) = mpsc::unbounded_channel();
    let supervisor = Supervisor {
        hung: hung_reports,
        rng: ChaCha8Rng::seed_from_u64(config.seed),
        runtime,
        spec,
        config,
        probe,
        status,
        metrics,
        cancel: cancel.clone(),
    };
    SupervisorHandle {
        status: receiver,
        cancel,
        task: Some(tokio::spawn(supervisor.run())),
        hung,
    }
}

/// How one run of the module ended.
#[derive(Debug)]
enum RunEnd {
    /// It could not be prepared, created or started.
    StartFailed(String),
    /// It ended by itself.
    Exited(ExitInfo),
    /// It failed its health checks and the policy stopped it.
    Unhealthy,
    /// It stopped answering batches, and was stopped.
    Hung(String),
    /// The runtime is stopping it.
    Cancelled,
}

struct Supervisor {
    /// Reports of runs that stopped answering: (generation, why).
    hung: mpsc::UnboundedReceiver<(u64, String)>,
    runtime: Arc<dyn ContainerRuntime>,
    spec: LaunchSpec,
    config: SupervisorConfig,
    probe: Box<dyn HealthProbe>,
    status: watch::Sender<ModuleStatus>,
    metrics: Option<ModuleMetrics>,
    rng: ChaCha8Rng,
    cancel: CancellationToken,
}

impl Supervisor {
    async fn run(mut self) {
        if !self.await_dependencies().await {
            return;
        }
        loop {
            let started = Instant::now();
            let (end, healthy_at) = self.run_once().await;
            if matches!(end, RunEnd::Cancelled) {
                self.update(|s| {
                    s.state = ModuleState::Stopped;
                    s.reason = Some("stopped by the runtime".to_owned());
                    s.finished = true;
                });
                return;
            }
            let failed = match &end {
                RunEnd::Exited(exit) => !exit.is_success(),
                _ => true,
            };
            let reason = match &end {
                RunEnd::StartFailed(reason) => reason.clone(),
                RunEnd::Exited(exit) => exit.to_string(),
                RunEnd::Unhealthy => "stopped for failing its health checks".to_owned(),
                RunEnd::Hung(reason) => format!("stopped for not answering: {reason}"),
                RunEnd::Cancelled => unreachable!("handled above"),
            };
            let healthy_for = healthy_at.map_or(Duration::ZERO, |at| at.elapsed());
            if failed {
                tracing::warn!(module = %self.spec.module, ran_for = ?started.elapsed(), "module {reason}");
            } else {
                tracing::info!(module = %self.spec.module, ran_for = ?started.elapsed(), "module {reason}");
            }
            if !self.config.restart.restarts(&end) {
                self.update(|s| {
                    s.state = if failed {
                        ModuleState::Failed
                    } else {
                        ModuleState::Stopped
                    };
                    s.reason = Some(format!("{reason}; restart policy does not restart it"));
                    s.finished = true;
                });
                return;
            }
            let mut failures = self.status.borrow().failures;
            if healthy_for >= self.config.backoff.reset_after.0 {
                failures = 0;
            }
            let delay = self.jittered(self.config.backoff.delay(failures));
            let at_cap = self.config.backoff.delay(failures) >= self.config.backoff.max.0;
            self.update(|s| {
                s.failures = failures.saturating_add(1);
                s.state = if at_cap {
                    ModuleState::Failed
                } else {
                    ModuleState::Backoff
                };
                s.reason = Some(format!("{reason}; restarting in {delay:.1?}"));
                s.next_restart_in = Some(delay);
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.cancel.cancelled() => {
                    self.update(|s| {
                        s.state = ModuleState::Stopped;
                        s.next_restart_in = None;
                        s.finished = true;
                    });
                    return;
                }
            }
            self.update(|s| {
                s.restarts += 1;
                s.next_restart_in = None;
            });
            if let Some(metrics) = &self.metrics {
                metrics.restarts.inc();
            }
        }
    }

    /// Waits until every module this one depends on runs; false when cancelled first.
    async fn await_dependencies(&mut self) -> bool {
        let dependencies = std::mem::take(&mut self.config.depends_on);
        for (name, lookup) in dependencies {
            self.update(|s| {
                s.reason = Some(format!("waiting for module '{name}' (depends_on) to run"));
            });
            let ready = async {
                loop {
                    if let Some(mut status) = lookup() {
                        let _ = status.wait_for(|s| s.is_ready()).await;
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::select! {
                () = ready => {}
                () = self.cancel.cancelled() => {
                    self.update(|s| {
                        s.state = ModuleState::Stopped;
                        s.finished = true;
                    });
                    return false;
                }
            }
        }
        true
    }

    /// Shortens `delay` by a random share up to the jitter.
    fn jittered(&mut self, delay: Duration) -> Duration {
        let share = self.config.backoff.jitter * self.rng.random::<f64>();
        delay.mul_f64(1.0 - share)
    }

    fn update(&self, change: impl FnOnce(&mut ModuleStatus)) {
        self.status.send_modify(change);
        if let Some(metrics) = &self.metrics {
            let status = self.status.borrow();
            metrics.set_state(status.state.name());
            metrics
                .healthy
                .set(i64::from(status.state == ModuleState::Running));
        }
    }

    /// One run: create, start, watch until it ends, turns unhealthy (under a policy that
    /// acts on it) or is cancelled; then remove it. Also says when it first passed a
    /// health check.
    async fn run_once(&mut self) -> (RunEnd, Option<Instant>) {
        self.update(|s| {
            s.state = ModuleState::Starting;
            s.generation += 1;
        });
        let id = match self.start().await {
            Ok(id) => id,
            Err(reason) => return (RunEnd::StartFailed(reason), None),
        };
        self.forward_logs(&id);
        // Fused: the event stream ends with the instance, and the loop polls it again.
        let mut events = self.runtime.events(&id).fuse();
        let health = self.config.health;
        let start_period_ends = Instant::now() + health.start_period.0;
        // Until its first check passes, a starting module is checked every
        // STARTING_CHECK_INTERVAL (at most), so batches flow as soon as it listens.
        let mut checks = tokio::time::interval(health.interval.0.min(STARTING_CHECK_INTERVAL));
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failed_checks = 0u32;
        let mut healthy_at = None;
        let runtime = self.runtime.clone();
        let wait_id = id.clone();
        let exit = runtime.wait(&wait_id);
        tokio::pin!(exit);
        let end = loop {
            tokio::select! {
                exit = &mut exit => {
                    break RunEnd::Exited(exit.unwrap_or_else(|error| ExitInfo {
                        error: Some(error.to_string()),
                        ..ExitInfo::default()
                    }));
                }
                () = self.cancel.cancelled() => break RunEnd::Cancelled,
                Some((generation, reason)) = self.hung.recv() => {
                    if generation == self.status.borrow().generation {
                        tracing::warn!(module = %self.spec.module, "module stopped answering: {reason}");
                        break RunEnd::Hung(reason);
                    }
                }
                Some(event) = events.next() => {
                    if let RuntimeEvent::Health(RuntimeHealth::Unhealthy) = event
                        && self.unhealthy("the container's HEALTHCHECK reports unhealthy")
                    {
                        break RunEnd::Unhealthy;
                    }
                }
                _ = checks.tick() => {
                    match self.probe.check(health.timeout.0).await {
                        Ok(()) => {
                            failed_checks = 0;
                            if healthy_at.is_none() {
                                healthy_at = Some(Instant::now());
                                checks = tokio::time::interval_at(
                                    Instant::now() + health.interval.0,
                                    health.interval.0,
                                );
                                checks.set_missed_tick_behavior(
                                    tokio::time::MissedTickBehavior::Delay,
                                );
                            }
                            if self.status.borrow().state != ModuleState::Running {
                                tracing::info!(module = %self.spec.module, "module is running and healthy");
                            }
                            self.update(|s| {
                                s.state = ModuleState::Running;
                                s.reason = None;
                            });
                        }
                        Err(reason) => {
                            if Instant::now() < start_period_ends && healthy_at.is_none() {
                                continue;
                            }
                            failed_checks += 1;
                            // Before its first pass a module is starting, not unhealthy,
                            // until it has had `retries` checks.
                            if failed_checks >= health.retries
                                && self.unhealthy(&reason)
                            {
                                break RunEnd::Unhealthy;
                            }
                        }
                    }
                }
            }
        };
        if matches!(end, RunEnd::Unhealthy | RunEnd::Hung(_) | RunEnd::Cancelled)
            && let Err(error) = self.runtime.stop(&id, self.config.stop_timeout).await
        {
            tracing::warn!(module = %self.spec.module, "cannot stop module: {error}");
        }
        let end = match end {
            RunEnd::Exited(exit) => {
                RunEnd::Exited(exit_details(self.runtime.as_ref(), &id, exit).await)
            }
            other => other,
        };
        if let RunEnd::Exited(exit) = &end {
            if let Some(metrics) = &self.metrics {
                metrics.last_exit_code.set(exit.code.unwrap_or(-1));
                if exit.oom_killed {
                    metrics.oom_kills.inc();
                }
            }
            self.update(|s| s.last_exit = Some(exit.clone()));
        }
        if let Err(error) = self.runtime.remove(&id).await {
            tracing::warn!(module = %self.spec.module, "cannot remove module instance {id}: {error}");
        }
        (end, healthy_at)
    }

    /// Records that the module is unhealthy; true when the policy says to stop it.
    fn unhealthy(&self, reason: &str) -> bool {
        if self.status.borrow().state != ModuleState::Unhealthy {
            tracing::warn!(module = %self.spec.module, "module is unhealthy: {reason}");
        }
        self.update(|s| {
            s.state = ModuleState::Unhealthy;
            s.reason = Some(reason.to_owned());
        });
        self.config.restart.acts_on_unhealthy()
    }

    async fn start(&mut self) -> Result<InstanceId, String> {
        self.runtime
            .prepare(&self.spec)
            .await
            .map_err(|e| e.to_string())?;
        let id = self
            .runtime
            .create(&self.spec)
            .await
            .map_err(|e| format!("cannot create: {e}"))?;
        if let Err(error) = self.runtime.start(&id).await {
            let _ = self.runtime.remove(&id).await;
            return Err(format!("cannot start: {error}"));
        }
        Ok(id)
    }

    /// Forwards the instance's output into `tracing`, labelled with the module's name.
    fn forward_logs(&self, id: &InstanceId) {
        let mut logs = self.runtime.logs(id);
        let module = self.spec.module.clone();
        tokio::spawn(async move {
            while let Some(line) = logs.next().await {
                match line {
                    Ok(line) if line.stream == LogStream::Stderr => {
                        tracing::warn!(target: "weir::module", module = %module, "{}", line.line);
                    }
                    Ok(line) => {
                        tracing::info!(target: "weir::module", module = %module, "{}", line.line)
                    }
                    Err(error) => {
                        tracing::debug!(module = %module, "module logs ended: {error}");
                        break;
                    }
                }
            }
        });
    }
}

/// Fills in what `wait` may not know (an OOM kill) from an inspection.
async fn exit_details(runtime: &dyn ContainerRuntime, id: &InstanceId, exit: ExitInfo) -> ExitInfo {
    match runtime.inspect(id).await {
        Ok(state) => match state.exit {
            Some(inspected) => ExitInfo {
                oom_killed: exit.oom_killed || inspected.oom_killed,
                error: exit.error.or(inspected.error),
                ..exit
            },
            None => exit,
        },
        Err(_) => exit,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::runtime::{FakeCall, FakeRun, FakeRuntime, Limits, Program, Transport};

    /// A probe whose answer the test sets.
    #[derive(Clone)]
    struct Switch(Arc<AtomicBool>);

    impl Switch {
        fn healthy() -> Self {
            Switch(Arc::new(AtomicBool::new(true)))
        }
        fn set(&self, healthy: bool) {
            self.0.store(healthy, Ordering::Relaxed);
        }
    }

    #[async_trait]
    impl HealthProbe for Switch {
        async fn check(&mut self, _timeout: Duration) -> Result<(), String> {
            if self.0.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("answered 503".to_owned())
            }
        }
    }

    fn spec() -> LaunchSpec {
        LaunchSpec {
            name: "weir-test-m".to_owned(),
            module: "m".to_owned(),
            program: Program::Image {
                image: "weir/echo:test".to_owned(),
                archive: None,
                command: None,
            },
            env: Default::default(),
            transport: Transport::Unix,
            socket_dir: std::env::temp_dir(),
            role: "transform",
            limits: Limits::default(),
            create_options: Default::default(),
            labels: Default::default(),
        }
    }

    fn config(restart: RestartPolicy, jitter: f64, max_secs: u64) -> SupervisorConfig {
        SupervisorConfig {
            restart,
            backoff: BackoffConfig {
                jitter,
                max: HumanDuration(Duration::from_secs(max_secs)),
                ..BackoffConfig::default()
            },
            health: HealthConfig {
                interval: HumanDuration(Duration::from_secs(1)),
                ..HealthConfig::default()
            },
            stop_timeout: Duration::from_secs(10),
            seed: 7,
            depends_on: Vec::new(),
        }
    }

    /// Supervises `spec()` on `runtime` under `config`, with `probe` as its health.
    fn supervise_probed(
        runtime: &FakeRuntime,
        config: SupervisorConfig,
        probe: Switch,
    ) -> SupervisorHandle {
        supervise(
            Arc::new(runtime.clone()),
            spec(),
            config,
            Box::new(probe),
            None,
        )
    }

    /// Supervises a healthy `spec()` on `runtime` with `config(restart, jitter, max_secs)`.
    fn supervise_fake(
        runtime: &FakeRuntime,
        restart: RestartPolicy,
        jitter: f64,
        max_secs: u64,
    ) -> SupervisorHandle {
        supervise_probed(
            runtime,
            config(restart, jitter, max_secs),
            Switch::healthy(),
        )
    }

    /// The gaps between consecutive starts, in whole milliseconds.
    fn gaps(runtime: &FakeRuntime) -> Vec<u128> {
        runtime
            .start_times()
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect()
    }

    async fn wait_until(
        status: &mut watch::Receiver<ModuleStatus>,
        what: impl FnMut(&ModuleStatus) -> bool,
    ) -> ModuleStatus {
        tokio::time::timeout(Duration::from_secs(3600), status.wait_for(what))
            .await
            .expect("the status is reached within an hour of fake time")
            .expect("the supervisor is alive")
            .clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_loop_backs_off_exponentially_up_to_the_cap_and_keeps_retrying() {
        let runtime = FakeRuntime::new();
        runtime.script((0..8).map(|_| FakeRun::ExitAfter(Duration::ZERO, 1)));
        let handle = supervise_fake(&runtime, RestartPolicy::OnFailure, 0.0, 16);
        let mut status = handle.status();
        let at_cap = wait_until(&mut status, |s| s.restarts == 6).await;
        assert_eq!(gaps(&runtime), [1000, 2000, 4000, 8000, 16000, 16000]);
        // At the cap it is reported failing, with its last exit, and still retried.
        let failing = wait_until(&mut status, |s| s.state == ModuleState::Failed).await;
        assert!(at_cap.restarts >= 6 && !failing.finished);
        assert_eq!(failing.last_exit.as_ref().and_then(|e| e.code), Some(1));
        assert!(
            failing
                .reason
                .as_deref()
                .unwrap()
                .contains("exited with code 1")
        );
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_only_shortens_delays_and_is_deterministic_for_a_seed() {
        let mut runs = Vec::new();
        for _ in 0..2 {
            let runtime = FakeRuntime::new();
            runtime.script((0..6).map(|_| FakeRun::ExitAfter(Duration::ZERO, 1)));
            let handle = supervise_fake(&runtime, RestartPolicy::Always, 0.5, 300);
            wait_until(&mut handle.status(), |s| s.restarts == 5).await;
            handle.shutdown().await;
            runs.push(gaps(&runtime));
        }
        assert_eq!(runs[0], runs[1], "same seed, same delays");
        for (gap, full) in runs[0].iter().zip([1000u128, 2000, 4000, 8000, 16000]) {
            assert!(
                (full / 2..=full).contains(gap),
                "{gap} within [{}, {full}]",
                full / 2
            );
        }
        assert!(
            runs[0]
                .iter()
                .zip([1000u128, 2000, 4000, 8000, 16000])
                .any(|(g, f)| *g < f)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_healthy_run_starts_the_backoff_over() {
        let runtime = FakeRuntime::new();
        runtime.script([
            FakeRun::ExitAfter(Duration::ZERO, 1),
            FakeRun::ExitAfter(Duration::ZERO, 1),
            FakeRun::ExitAfter(Duration::from_secs(11 * 60), 1),
            FakeRun::ExitAfter(Duration::ZERO, 1),
        ]);
        let handle = supervise_fake(&runtime, RestartPolicy::OnFailure, 0.0, 300);
        wait_until(&mut handle.status(), |s| s.restarts == 4).await;
        // 1 s, 2 s, then the 11-minute healthy run (ended 1 s later: delays start over).
        assert_eq!(gaps(&runtime), [1000, 2000, 660_000 + 1000, 2000]);
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn each_policy_restarts_what_its_table_says() {
        // never: a failure stays failed.
        let runtime = FakeRuntime::new();
        runtime.script([FakeRun::ExitAfter(Duration::from_secs(2), 3)]);
        let handle = supervise_fake(&runtime, RestartPolicy::Never, 0.0, 300);
        let done = wait_until(&mut handle.status(), |s| s.finished).await;
        assert_eq!((done.state, done.restarts), (ModuleState::Failed, 0));
        assert!(done.reason.unwrap().contains("exited with code 3"));

        // on-failure: a clean exit stays stopped.
        let runtime = FakeRuntime::new();
        runtime.script([FakeRun::ExitAfter(Duration::from_secs(2), 0)]);
        let handle = supervise_fake(&runtime, RestartPolicy::OnFailure, 0.0, 300);
        let done = wait_until(&mut handle.status(), |s| s.finished).await;
        assert_eq!(
            (done.state, runtime.start_times().len()),
            (ModuleState::Stopped, 1)
        );

        // always: a clean exit is restarted.
        let runtime = FakeRuntime::new();
        runtime.script([FakeRun::ExitAfter(Duration::from_secs(2), 0)]);
        let handle = supervise_fake(&runtime, RestartPolicy::Always, 0.0, 300);
        wait_until(&mut handle.status(), |s| s.restarts == 1).await;
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn unhealthy_modules_are_restarted_under_on_unhealthy_and_reported_under_on_failure() {
        for (policy, restarted) in [
            (RestartPolicy::OnUnhealthy, true),
            (RestartPolicy::OnFailure, false),
        ] {
            let runtime = FakeRuntime::new();
            let probe = Switch::healthy();
            let handle = supervise_probed(&runtime, config(policy, 0.0, 300), probe.clone());
            let mut status = handle.status();
            wait_until(&mut status, |s| s.state == ModuleState::Running).await;
            probe.set(false);
            // Under on-unhealthy the Unhealthy state lasts no longer than the stop, so
            // wait for its consequence; under on-failure it stays.
            let seen = wait_until(&mut status, |s| {
                s.state == ModuleState::Unhealthy || s.state == ModuleState::Backoff
            })
            .await;
            let reason = seen.reason.unwrap();
            assert!(
                reason.contains("503") || reason.contains("failing its health checks"),
                "{reason}"
            );
            probe.set(true);
            tokio::time::sleep(Duration::from_secs(30)).await;
            let stops = runtime
                .calls()
                .iter()
                .filter(|(_, c)| matches!(c, FakeCall::Stop(_)))
                .count();
            assert_eq!(stops > 0, restarted, "{policy:?}");
            assert_eq!(status.borrow().restarts > 0, restarted, "{policy:?}");
            // Either way it is running and healthy again.
            assert_eq!(status.borrow().state, ModuleState::Running, "{policy:?}");
            handle.shutdown().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_reported_hung_is_stopped_and_the_policy_decides_what_follows() {
        for (policy, restarted) in [
            (RestartPolicy::Always, true),
            (RestartPolicy::OnFailure, true),
            (RestartPolicy::Never, false),
        ] {
            let runtime = FakeRuntime::new();
            let handle = supervise_fake(&runtime, policy, 0.0, 300);
            let mut status = handle.status();
            let running = wait_until(&mut status, |s| s.state == ModuleState::Running).await;
            // A report about a run that is already gone changes nothing.
            handle.report_hung(running.generation - 1, "an old run".into());
            handle.report_hung(
                running.generation,
                "batch 7 got no answer within 30s".into(),
            );
            let after = wait_until(&mut status, |s| {
                s.finished || (s.state == ModuleState::Running && s.generation > running.generation)
            })
            .await;
            let stops = runtime
                .calls()
                .iter()
                .filter(|(_, c)| matches!(c, FakeCall::Stop(_)))
                .count();
            assert_eq!(stops, 1, "{policy:?}");
            assert_eq!(after.restarts > 0, restarted, "{policy:?}");
            if !restarted {
                assert_eq!(after.state, ModuleState::Failed);
                assert!(
                    after.reason.unwrap().contains("not answering"),
                    "{policy:?}"
                );
            }
            handle.shutdown().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn oom_kills_and_missing_images_are_reported_with_their_reasons() {
        let runtime = FakeRuntime::new();
        runtime.script([FakeRun::OomAfter(Duration::from_secs(1))]);
        let handle = supervise_fake(&runtime, RestartPolicy::Never, 0.0, 300);
        let done = wait_until(&mut handle.status(), |s| s.finished).await;
        assert!(done.last_exit.unwrap().oom_killed);
        assert!(done.reason.unwrap().contains("out of memory (OOM)"));

        let runtime = FakeRuntime::new();
        runtime.without_image("weir/echo:test");
        let handle = supervise_fake(&runtime, RestartPolicy::Always, 0.0, 300);
        let backoff = wait_until(&mut handle.status(), |s| s.state == ModuleState::Backoff).await;
        let reason = backoff.reason.unwrap();
        assert!(
            reason.contains("`weir/echo:test` is not on this machine"),
            "{reason}"
        );
        assert_eq!(runtime.live_instances(), 0, "nothing was created");
        handle.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_and_removes_the_instance() {
        let runtime = FakeRuntime::new();
        let handle = supervise_fake(&runtime, RestartPolicy::Always, 0.0, 300);
        let mut status = handle.status();
        wait_until(&mut status, |s| s.state == ModuleState::Running).await;
        handle.shutdown().await;
        let calls: Vec<FakeCall> = runtime.calls().into_iter().map(|(_, c)| c).collect();
        assert!(matches!(
            calls.as_slice(),
            [
                FakeCall::Create(_),
                FakeCall::Start(_),
                FakeCall::Stop(_),
                FakeCall::Remove(_)
            ]
        ));
        assert_eq!(status.borrow().state, ModuleState::Stopped);
        assert_eq!(runtime.live_instances(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_module_starts_after_the_modules_it_depends_on_run() {
        let runtime = FakeRuntime::new();
        let first_probe = Switch::healthy();
        first_probe.set(false);
        let first = supervise_probed(
            &runtime,
            config(RestartPolicy::Always, 0.0, 300),
            first_probe.clone(),
        );
        let first_status = first.status();
        let mut second_config = config(RestartPolicy::Always, 0.0, 300);
        second_config.depends_on = vec![(
            "first".to_owned(),
            Box::new(move || Some(first_status.clone())),
        )];
        let mut second_spec = spec();
        second_spec.name = "weir-test-second".to_owned();
        let second = supervise(
            Arc::new(runtime.clone()),
            second_spec,
            second_config,
            Box::new(Switch::healthy()),
            None,
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let created = |runtime: &FakeRuntime| -> Vec<String> {
            runtime
                .calls()
                .into_iter()
                .filter_map(|(_, c)| match c {
                    FakeCall::Create(name) => Some(name),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(created(&runtime), ["weir-test-m"]);
        assert!(
            second
                .status()
                .borrow()
                .reason
                .as_deref()
                .unwrap()
                .contains("waiting for module 'first'")
        );
        first_probe.set(true);
        wait_until(&mut second.status(), |s| s.state == ModuleState::Running).await;
        assert_eq!(created(&runtime), ["weir-test-m", "weir-test-second"]);
        first.shutdown().await;
        second.shutdown().await;
    }
}
