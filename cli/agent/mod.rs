//! `weir agent`: the runtime managed by a hub. It long-polls the hub for its desired
//! state, validates it, swaps its running pipelines (leaving unchanged ones alone),
//! reports the outcome with its pipelines' and modules' health, and sends heartbeats.
//! The last deployment it applied is kept on disk, so it boots into it, and keeps
//! running it, while the hub is out of reach.

mod pipelines;
mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weir_engine::metrics::EngineMetrics;
use weir_hub::client::check_transport;
use weir_hub::identity::DeviceKey;
use weir_hub::protocol::{DesiredState, Report, ReportStatus, now_ms};
use weir_hub::{ClientError, Credentials, HubClient};
use weir_modules::ModuleHost;
use weir_operators::backoff::{Backoff, BackoffBounds};

use crate::api::live::LivePipelines;
use crate::exit::Outcome;
use pipelines::PipelineSet;
use state::{Applied, StateDir};

/// How long a newly applied deployment gets to show that its pipelines start.
const SETTLE: Duration = Duration::from_secs(1);

/// The least time between two polls.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The waits after failed calls to the hub: doubling from 1 s to a minute, jittered.
const BACKOFF: BackoffBounds = BackoffBounds {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(60),
};

/// Arguments of `weir agent`.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// A YAML file with any of `hub`, `device`, `key`, `ca_file` and `state_dir`; flags
    /// and environment variables override it.
    #[arg(long, env = "WEIR_AGENT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// The hub's URL.
    #[arg(long, env = "WEIR_HUB_URL", value_name = "URL")]
    hub: Option<String>,

    /// This device's id, as registered at the hub.
    #[arg(long, env = "WEIR_DEVICE_ID", value_name = "ID")]
    device: Option<String>,

    /// One of this device's keys (base64), as the hub issued it.
    #[arg(
        long,
        env = "WEIR_DEVICE_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    key: Option<Secret>,

    /// A PEM CA certificate to trust for an HTTPS hub, beside the system's roots.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,

    /// Accept a plain `http://` hub that is not on this machine. Without it such a URL
    /// is refused: the device's tokens and data would cross the network unencrypted.
    #[arg(long)]
    insecure_http: bool,

    /// Where the agent keeps the last applied deployment (default: weir-agent-state).
    #[arg(long, env = "WEIR_AGENT_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    #[command(flatten)]
    api: crate::api::ApiArgs,

    #[command(flatten)]
    outbox_limits: crate::outbox::OutboxLimits,

    #[command(flatten)]
    module_policy: crate::module_policy::ModulePolicyArgs,

    /// How long each poll for the desired state waits for a change (whole seconds).
    #[arg(long, default_value = "30s", value_parser = crate::run::positive_duration, value_name = "DURATION")]
    poll_wait: Duration,

    /// How often to send a heartbeat.
    #[arg(long, default_value = "30s", value_parser = crate::run::positive_duration, value_name = "DURATION")]
    heartbeat_interval: Duration,

    /// How often to apply again a deployment that failed, or else restart pipelines that
    /// failed.
    #[arg(long, default_value = "30s", value_parser = crate::run::positive_duration, value_name = "DURATION")]
    retry_interval: Duration,

    /// How long stopping a pipeline may take to drain.
    #[arg(long, default_value = "10s", value_parser = crate::run::humantime_duration, value_name = "DURATION")]
    shutdown_timeout: Duration,

    /// Keep the pages of start-up code resident. By default `weir` asks the kernel to
    /// reclaim its own code pages once the pipelines run (they fault back in as needed),
    /// so an idle device holds only the code its pipelines keep running.
    #[arg(long)]
    keep_start_up_code: bool,
}

/// A flag's value that must not show in debug output (clap's `Args` are `Debug`).
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Secret(text.to_owned()))
    }
}

/// The agent's config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    hub: Option<String>,
    device: Option<String>,
    key: Option<String>,
    ca_file: Option<PathBuf>,
    state_dir: Option<PathBuf>,
}

/// What the agent runs with, flags and file merged.
struct Settings {
    hub: String,
    device: String,
    key: DeviceKey,
    ca_file: Option<PathBuf>,
    state_dir: PathBuf,
}

fn settings(args: &AgentArgs) -> Result<Settings, String> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            serde_saphyr::from_str::<ConfigFile>(&text)
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => ConfigFile::default(),
    };
    let missing = |what: &str, flag: &str, env: &str| {
        format!("the agent needs {what}: pass {flag}, set {env}, or put it in --config")
    };
    let hub = args
        .hub
        .clone()
        .or(file.hub)
        .ok_or_else(|| missing("the hub's URL", "--hub", "WEIR_HUB_URL"))?;
    let device = args
        .device
        .clone()
        .or(file.device)
        .ok_or_else(|| missing("its device id", "--device", "WEIR_DEVICE_ID"))?;
    let key = args
        .key
        .clone()
        .map(|secret| secret.0)
        .or(file.key)
        .ok_or_else(|| missing("its device key", "--key", "WEIR_DEVICE_KEY"))?;
    let key = DeviceKey::from_base64(&key).map_err(|e| format!("the device key: {e}"))?;
    Ok(Settings {
        hub,
        device,
        key,
        ca_file: args.ca_file.clone().or(file.ca_file),
        state_dir: args
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from("weir-agent-state")),
    })
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(args: AgentArgs) -> Outcome {
    let settings = match settings(&args) {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("error: {message}");
            return Outcome::ConfigInvalid;
        }
    };
    let state = match StateDir::open(&settings.state_dir) {
        Ok(state) => state,
        Err(message) => return Outcome::RuntimeFailure(message),
    };
    let client = match HubClient::with_transport(
        &settings.hub,
        Credentials::Device {
            id: settings.device.clone(),
            key: settings.key.clone(),
        },
        settings.ca_file.as_deref(),
        args.insecure_http,
    ) {
        Ok(client) => client,
        Err(e @ ClientError::InsecureHttp { .. }) => {
            eprintln!("error: {e}");
            return Outcome::ConfigInvalid;
        }
        Err(e) => return Outcome::RuntimeFailure(e.to_string()),
    };
    if check_transport(&settings.hub, false).is_err() {
        warn!(hub = %settings.hub, "--insecure-http: talking to the hub over plain HTTP");
    }

    let registry = prometheus::Registry::new();
    let metrics = match EngineMetrics::new(&registry) {
        Ok(metrics) => metrics,
        Err(error) => return Outcome::RuntimeFailure(format!("cannot register metrics: {error}")),
    };
    let policy = match args.module_policy.policy() {
        Ok(policy) => policy,
        Err(message) => return Outcome::RuntimeFailure(message),
    };
    let modules = Arc::new(ModuleHost::new(state.path().join("modules")).with_policy(policy));
    // Caught from here on, so a signal while the stored deployment starts stops it cleanly.
    let mut signals = crate::run::Signals::new();
    let stop_background = CancellationToken::new();
    let live = Arc::new(LivePipelines::default());
    let startup = crate::api::Startup::default();
    if let Err(message) = args
        .api
        .serve(
            registry.clone(),
            modules.clone(),
            live.clone(),
            startup.clone(),
            stop_background.clone(),
        )
        .await
    {
        return Outcome::RuntimeFailure(message);
    }

    // The hub sinks' outbox lives with the agent's state, so it survives restarts.
    let shipping = Arc::new(weir_outbox::Shipping::new(
        state.path().join("outbox.redb"),
        args.outbox_limits.limits(),
        Arc::new(weir_hub::HubUplink::new(
            client.clone(),
            settings.device.clone(),
        )),
        metrics.outbox(),
    ));
    let (pipelines, ended) = PipelineSet::new(
        shipping,
        live.clone(),
        metrics,
        modules.clone(),
        state.path().join("files"),
        state.path().join("checkpoints"),
        args.shutdown_timeout,
    );
    let device = settings.device.clone();

    let (report_tx, report_rx) = watch::channel::<Option<Report>>(None);
    let mut agent = Agent {
        pipelines,
        ended,
        modules,
        state,
        reports: report_tx,
        target: None,
        apply_error: None,
        outbox_reported: serde_json::Value::Null,
        keep_start_up_code: args.keep_start_up_code,
    };

    // Boot into the last applied deployment, before the hub is even asked. If it no
    // longer starts (the device's environment changed), the hub hears so, and is asked
    // for the desired state afresh.
    let mut poll_from = None;
    if let Some(last) = agent.state.load() {
        let name = deployment_name(&last.state).to_owned();
        info!(deployment = %name, etag = %last.state.etag, "starting the stored deployment");
        let etag = last.state.etag.clone();
        if agent.apply(last.state, false).await {
            poll_from = Some(etag);
        }
    }
    // Ready once the stored deployment (if any) has been started: the agent then runs
    // what it last knew, with or without the hub.
    startup.end();

    let (desired_tx, mut desired_rx) = mpsc::channel::<DesiredState>(1);
    let poller = tokio::spawn(poll_desired(
        client.clone(),
        device.clone(),
        poll_from,
        args.poll_wait,
        desired_tx,
    ));
    let reporter = tokio::spawn(send_reports(client.clone(), device.clone(), report_rx));
    let queries = tokio::spawn(answer_queries(
        client.clone(),
        device.clone(),
        live.clone(),
        args.api.limits(),
        args.poll_wait,
    ));
    let heartbeats = tokio::spawn(send_heartbeats(
        client.clone(),
        device.clone(),
        args.heartbeat_interval,
    ));

    let mut retries = tokio::time::interval_at(
        tokio::time::Instant::now() + args.retry_interval,
        args.retry_interval,
    );
    retries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            desired = desired_rx.recv() => {
                let Some(desired) = desired else { break };
                info!(deployment = %deployment_name(&desired), etag = %desired.etag, "new desired state");
                agent.apply(desired, true).await;
            }
            Some(end) = agent.ended.recv() => {
                if agent.pipelines.ended(end) {
                    agent.report();
                }
            }
            _ = retries.tick() => {
                agent.retry().await;
                // The outbox moves on its own: the hub hears of it at this pace.
                agent.report_if_outbox_moved();
            }
            signal = signals.next() => {
                info!("received {signal}: stopping the pipelines");
                break;
            }
        }
    }
    poller.abort();
    queries.abort();
    heartbeats.abort();
    agent.pipelines.stop_all().await;
    reporter.abort();
    stop_background.cancel();
    Outcome::Success
}

/// The agent's pipelines and what it tells the hub about them.
struct Agent {
    pipelines: PipelineSet,
    ended: mpsc::UnboundedReceiver<pipelines::Ended>,
    modules: Arc<ModuleHost>,
    state: StateDir,
    reports: watch::Sender<Option<Report>>,
    /// The desired state last received (or booted from).
    target: Option<DesiredState>,
    /// Why applying `target` failed; the previous pipelines still run.
    apply_error: Option<String>,
    /// The outbox's figures as last reported.
    outbox_reported: serde_json::Value,
    /// Whether to keep start-up code resident after applying (`--keep-start-up-code`).
    keep_start_up_code: bool,
}

impl Agent {
    /// Applies `desired` (storing it on success when `store`), lets what it started
    /// settle, and reports. Returns whether it applied.
    async fn apply(&mut self, desired: DesiredState, store: bool) -> bool {
        let name = deployment_name(&desired).to_owned();
        self.target = Some(desired.clone());
        self.apply_error = None;
        self.send(ReportStatus::Applying, None);
        let outcome = match &desired.deployment {
            Some(deployment) => {
                self.pipelines
                    .apply(&deployment.name, &deployment.pipelines)
                    .await
            }
            None => {
                self.pipelines.stop_all().await;
                Ok(pipelines::Swap::default())
            }
        };
        match outcome {
            Ok(swap) => {
                info!(
                    deployment = %name,
                    "applied: started {:?}, replaced {:?}, stopped {:?}, kept {:?}",
                    swap.started, swap.replaced, swap.stopped, swap.kept
                );
                if !swap.started.is_empty() || !swap.replaced.is_empty() {
                    tokio::spawn(crate::start_up::release(self.keep_start_up_code));
                }
                // A pipeline that cannot even start (a file that is not there, a
                // refused connection) fails within moments: wait that long, so the
                // report says so rather than "applied".
                let deadline = tokio::time::Instant::now() + SETTLE;
                while let Ok(Some(end)) = tokio::time::timeout_at(deadline, self.ended.recv()).await
                {
                    self.pipelines.ended(end);
                }
                if store {
                    let record = Applied {
                        applied_ms: now_ms(),
                        state: desired,
                    };
                    if let Err(message) = self.state.store(&record) {
                        warn!("{message}; a restart without the hub will not run it");
                    }
                }
                self.report();
                true
            }
            Err(problems) => {
                warn!(deployment = %name, "not applied; the running pipelines are unchanged:\n{problems}");
                self.apply_error = Some(problems);
                self.report();
                false
            }
        }
    }

    /// Every `--retry-interval`: applies again a desired state that failed (its cause
    /// may have gone: an environment variable set, a port freed), or else restarts the
    /// pipelines that failed.
    async fn retry(&mut self) {
        if self.apply_error.is_some()
            && let Some(desired) = self.target.clone()
        {
            info!(deployment = %deployment_name(&desired), "applying again");
            self.apply(desired, true).await;
            return;
        }
        let restarted = self.pipelines.restart_failed().await;
        if !restarted.is_empty() {
            info!("restarted failed pipelines {restarted:?}");
            self.report();
        }
    }

    /// Reports where the agent stands: the apply's error if it failed, else `failed`
    /// with the errors of failed pipelines, else `applied`; with fresh health.
    fn report(&self) {
        let failures = self.pipelines.failures(self.pipelines.names());
        match (&self.apply_error, failures.is_empty()) {
            (Some(problems), _) => self.send(ReportStatus::Failed, Some(problems.clone())),
            (None, true) => self.send(ReportStatus::Applied, None),
            (None, false) => self.send(ReportStatus::Failed, Some(failures.join("\n"))),
        }
    }

    /// Reports again when the outbox's figures changed since the last report.
    fn report_if_outbox_moved(&mut self) {
        let now = self.pipelines.outbox();
        if now != self.outbox_reported {
            self.outbox_reported = now;
            self.report();
        }
    }

    fn send(&self, status: ReportStatus, error: Option<String>) {
        let revision = self
            .target
            .as_ref()
            .and_then(|target| target.deployment.as_ref())
            .map(|deployment| deployment.revision);
        self.reports.send_replace(Some(Report {
            revision,
            status,
            error,
            health: serde_json::json!({
                "agent_version": env!("CARGO_PKG_VERSION"),
                "pipelines": self.pipelines.health(),
                "modules": self.modules.reports(),
                "outbox": self.pipelines.outbox(),
            }),
        }));
    }
}

fn deployment_name(desired: &DesiredState) -> &str {
    desired
        .deployment
        .as_ref()
        .map_or("nothing", |deployment| deployment.name.as_str())
}

/// Long-polls the hub, passing on each new desired state. Errors are retried with
/// backoff; refused credentials are logged as what they are.
async fn poll_desired(
    client: HubClient,
    device: String,
    mut etag: Option<String>,
    wait: Duration,
    desired: mpsc::Sender<DesiredState>,
) {
    let mut backoff = Backoff::for_client(BACKOFF, &device);
    loop {
        let asked = tokio::time::Instant::now();
        match client.desired(&device, etag.as_deref(), wait).await {
            Ok(Some(state)) => {
                backoff.reset();
                etag = Some(state.etag.clone());
                if desired.send(state).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                backoff.reset();
                // A hub that holds polls for less than a second (or not at all) must
                // not be asked in a tight loop.
                tokio::time::sleep_until(asked + MIN_POLL_INTERVAL).await;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                log_hub_error("poll for the desired state", &error, delay);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Answers the queries an admin forwards through the hub (`weir-hub query --device`),
/// each as this runtime's local API would, and sends the answers back.
async fn answer_queries(
    client: HubClient,
    device: String,
    live: Arc<LivePipelines>,
    limits: weir_query::Limits,
    wait: Duration,
) {
    let mut backoff = Backoff::for_client(BACKOFF, &device);
    loop {
        let asked = tokio::time::Instant::now();
        match client.forwarded_queries(&device, wait).await {
            Ok(queries) if queries.is_empty() => {
                backoff.reset();
                // A hub that holds polls briefly (or not at all) is not asked in a tight loop.
                tokio::time::sleep_until(asked + MIN_POLL_INTERVAL).await;
            }
            Ok(queries) => {
                backoff.reset();
                for query in queries {
                    let (client, device, live) = (client.clone(), device.clone(), live.clone());
                    tokio::spawn(async move {
                        info!(query = %query.id, "answering a query forwarded by the hub");
                        let encoded =
                            crate::api::query::answer(&live, &limits, &query.request, None).await;
                        let mut headers = encoded.row_headers();
                        headers.push(("content-type", encoded.content_type.to_owned()));
                        if let Err(error) = client
                            .answer_query(
                                &device,
                                &query.id,
                                encoded.status,
                                &headers,
                                encoded.body,
                            )
                            .await
                        {
                            warn!(query = %query.id, "cannot send the answer to the hub: {error}");
                        }
                    });
                }
            }
            Err(error) => {
                let delay = backoff.next_delay();
                log_hub_error("poll for forwarded queries", &error, delay);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Sends the latest report whenever it changes, retrying until the hub takes it: only
/// the newest one matters.
async fn send_reports(
    client: HubClient,
    device: String,
    mut reports: watch::Receiver<Option<Report>>,
) {
    let mut backoff = Backoff::for_client(BACKOFF, &device);
    loop {
        let Some(report) = reports.borrow_and_update().clone() else {
            if reports.changed().await.is_err() {
                return;
            }
            continue;
        };
        match client.report(&device, &report).await {
            Ok(()) => {
                backoff.reset();
                if reports.changed().await.is_err() {
                    return;
                }
            }
            Err(error) => {
                let delay = backoff.next_delay();
                log_hub_error("send a report", &error, delay);
                // The whole delay, even when a newer report comes (it replaces this one
                // in the meantime): a hub that refuses, or answers 429, is not sent
                // reports as fast as they change.
                tokio::time::sleep(delay).await;
                reports.mark_changed();
            }
        }
    }
}

async fn send_heartbeats(client: HubClient, device: String, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(error) = client.heartbeat(&device).await {
            tracing::debug!("heartbeat: {error}");
        }
    }
}

fn log_hub_error(what: &str, error: &ClientError, delay: Duration) {
    let retry = humantime::format_duration(Duration::from_secs(delay.as_secs().max(1)));
    match error.status() {
        Some(401 | 403) => tracing::error!(
            "cannot {what}: {error}; check the device id and key (retrying in {retry})"
        ),
        _ => warn!("cannot {what}: {error} (retrying in {retry})"),
    }
}
