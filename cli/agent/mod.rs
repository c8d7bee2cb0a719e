//! `weir agent`: the runtime managed by a hub. It long-polls the hub for its desired
//! state, validates it, swaps its running pipelines (leaving unchanged ones alone),
//! reports the outcome with its pipelines' and modules' health, and sends heartbeats.
//! The last deployment it applied is kept on disk, so it boots into it, and keeps
//! running it, while the hub is out of reach.

mod pipelines;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weir_engine::metrics::EngineMetrics;
use weir_hub::identity::DeviceKey;
use weir_hub::protocol::{DesiredState, Report, ReportStatus, now_ms};
use weir_hub::{ClientError, Credentials, HubClient};
use weir_modules::ModuleHost;
use weir_operators::mqtt::{Backoff, BackoffBounds};

use crate::exit::Outcome;
use pipelines::PipelineSet;
use state::{Applied, StateDir};

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
    key: Option<String>,

    /// A PEM CA certificate to trust for an HTTPS hub, beside the system's roots.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,

    /// Where the agent keeps the last applied deployment (default: weir-agent-state).
    #[arg(long, env = "WEIR_AGENT_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Where to serve Prometheus metrics (`/metrics`), `/status` and `/healthz`.
    #[arg(long, env = "WEIR_METRICS_ADDR", default_value = crate::run::DEFAULT_METRICS_ADDR, value_name = "HOST:PORT")]
    metrics_addr: SocketAddr,

    /// Do not serve metrics at all.
    #[arg(long, conflicts_with = "metrics_addr")]
    no_metrics: bool,

    /// How long each poll for the desired state waits for a change.
    #[arg(long, default_value = "30s", value_parser = crate::run::humantime_duration, value_name = "DURATION")]
    poll_wait: Duration,

    /// How often to send a heartbeat.
    #[arg(long, default_value = "30s", value_parser = crate::run::humantime_duration, value_name = "DURATION")]
    heartbeat_interval: Duration,

    /// How long stopping a pipeline may take to drain.
    #[arg(long, default_value = "10s", value_parser = crate::run::humantime_duration, value_name = "DURATION")]
    shutdown_timeout: Duration,
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
    let client = match HubClient::new(
        &settings.hub,
        Credentials::Device {
            id: settings.device.clone(),
            key: settings.key.clone(),
        },
        settings.ca_file.as_deref(),
    ) {
        Ok(client) => client,
        Err(e) => return Outcome::RuntimeFailure(e.to_string()),
    };

    let registry = prometheus::Registry::new();
    let metrics = match EngineMetrics::new(&registry) {
        Ok(metrics) => metrics,
        Err(error) => return Outcome::RuntimeFailure(format!("cannot register metrics: {error}")),
    };
    let modules = Arc::new(ModuleHost::new(state.path().join("modules")));
    let stop_background = CancellationToken::new();
    if !args.no_metrics {
        match crate::http::serve(
            args.metrics_addr,
            registry.clone(),
            modules.clone(),
            stop_background.clone(),
        )
        .await
        {
            Ok((bound, _)) => info!("metrics: listening on http://{bound}/metrics"),
            Err(error) => {
                return Outcome::RuntimeFailure(format!(
                    "cannot serve metrics on {}: {error}; pick another address with \
                     --metrics-addr or pass --no-metrics",
                    args.metrics_addr
                ));
            }
        }
    }

    let (mut pipelines, mut ended) = PipelineSet::new(
        metrics,
        modules.clone(),
        state.path().join("files"),
        args.shutdown_timeout,
    );
    let device = settings.device.clone();

    // Boot into the last applied deployment, before the hub is even asked.
    let applied: Option<Applied> = state.load();
    if let Some(last) = &applied {
        let name = last
            .state
            .deployment
            .as_ref()
            .map_or("nothing", |d| d.name.as_str());
        info!(deployment = %name, etag = %last.state.etag, "starting the stored deployment");
        if let Err(problems) = apply_state(&mut pipelines, &last.state).await {
            // Valid when stored; the device's environment may have changed since.
            warn!("the stored deployment no longer starts:\n{problems}");
        }
    }

    let (desired_tx, mut desired_rx) = mpsc::channel::<DesiredState>(1);
    let (report_tx, report_rx) = watch::channel::<Option<Report>>(None);
    let poller = tokio::spawn(poll_desired(
        client.clone(),
        device.clone(),
        applied.as_ref().map(|a| a.state.etag.clone()),
        args.poll_wait,
        desired_tx,
    ));
    let reporter = tokio::spawn(send_reports(client.clone(), device.clone(), report_rx));
    let heartbeats = tokio::spawn(send_heartbeats(
        client.clone(),
        device.clone(),
        args.heartbeat_interval,
    ));

    // Where the agent stands, re-sent with fresh health whenever a pipeline ends.
    let mut current_report = applied.as_ref().map(|last| Report {
        revision: last.state.deployment.as_ref().map(|d| d.revision),
        status: ReportStatus::Applied,
        error: None,
        health: serde_json::Value::Null,
    });
    if let Some(report) = &mut current_report {
        report.health = health(&pipelines, &modules);
        report_tx.send_replace(Some(report.clone()));
    }

    let mut signals = crate::run::Signals::new();
    loop {
        tokio::select! {
            desired = desired_rx.recv() => {
                let Some(desired) = desired else { break };
                let revision = desired.deployment.as_ref().map(|d| d.revision);
                let name = desired.deployment.as_ref().map_or("nothing", |d| d.name.as_str()).to_owned();
                info!(deployment = %name, etag = %desired.etag, "new desired state");
                report_tx.send_replace(Some(Report {
                    revision,
                    status: ReportStatus::Applying,
                    error: None,
                    health: health(&pipelines, &modules),
                }));
                let report = match apply_state(&mut pipelines, &desired).await {
                    Ok(()) => {
                        let record = Applied { applied_ms: now_ms(), state: desired };
                        if let Err(message) = state.store(&record) {
                            warn!("{message}; a restart without the hub will not run it");
                        }
                        info!(deployment = %name, "applied");
                        Report { revision, status: ReportStatus::Applied, error: None, health: serde_json::Value::Null }
                    }
                    Err(problems) => {
                        warn!(deployment = %name, "refused; the running pipelines are unchanged:\n{problems}");
                        Report { revision, status: ReportStatus::Failed, error: Some(problems), health: serde_json::Value::Null }
                    }
                };
                let mut report = report;
                report.health = health(&pipelines, &modules);
                current_report = Some(report.clone());
                report_tx.send_replace(Some(report));
            }
            Some(end) = ended.recv() => {
                if pipelines.ended(end)
                    && let Some(report) = &mut current_report
                {
                    report.health = health(&pipelines, &modules);
                    report_tx.send_replace(Some(report.clone()));
                }
            }
            signal = signals.next() => {
                info!("received {signal}: stopping the pipelines");
                break;
            }
        }
    }
    poller.abort();
    heartbeats.abort();
    pipelines.stop_all().await;
    reporter.abort();
    stop_background.cancel();
    Outcome::Success
}

/// Makes `desired` the running set of pipelines.
async fn apply_state(pipelines: &mut PipelineSet, desired: &DesiredState) -> Result<(), String> {
    match &desired.deployment {
        Some(deployment) => {
            let swap = pipelines
                .apply(&deployment.name, &deployment.pipelines)
                .await?;
            info!(
                deployment = %deployment.name,
                version = deployment.version,
                "started {:?}, replaced {:?}, stopped {:?}, kept {:?}",
                swap.started, swap.replaced, swap.stopped, swap.kept
            );
            Ok(())
        }
        None => {
            pipelines.stop_all().await;
            Ok(())
        }
    }
}

/// The health the agent reports: its pipelines and modules.
fn health(pipelines: &PipelineSet, modules: &ModuleHost) -> serde_json::Value {
    serde_json::json!({
        "agent_version": env!("CARGO_PKG_VERSION"),
        "pipelines": pipelines.health(),
        "modules": modules.reports(),
    })
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
        match client.desired(&device, etag.as_deref(), wait).await {
            Ok(Some(state)) => {
                backoff.reset();
                etag = Some(state.etag.clone());
                if desired.send(state).await.is_err() {
                    return;
                }
            }
            Ok(None) => backoff.reset(),
            Err(error) => {
                let delay = backoff.next_delay();
                log_hub_error("poll for the desired state", &error, delay);
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
                // A newer report replaces this one; otherwise try this one again.
                let _ = tokio::time::timeout(delay, reports.changed()).await;
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
