//! `weir run`: runs pipelines until their sources end or a signal asks them to stop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weir_engine::metrics::EngineMetrics;
use weir_modules::ModuleHost;

use crate::api::ApiArgs;
use crate::api::live::{LivePipelines, PipelineShape};
use crate::exit::Outcome;

/// Arguments of `weir run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Pipeline YAML files; all of them run in this process.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,

    #[command(flatten)]
    api: ApiArgs,

    /// Ship what `hub` sinks store to this directory instead of a hub (each batch a file
    /// `PIPELINE/SINK/SEQ.arrows`, written once however often it is sent).
    #[arg(long, value_name = "DIR")]
    ship_dir: Option<PathBuf>,

    /// The `hub` sinks' outbox file.
    #[arg(
        long,
        env = "WEIR_OUTBOX",
        default_value = "weir-outbox.redb",
        value_name = "FILE"
    )]
    outbox: PathBuf,

    #[command(flatten)]
    outbox_limits: crate::outbox::OutboxLimits,

    #[command(flatten)]
    module_policy: crate::module_policy::ModulePolicyArgs,

    /// Where each pipeline keeps its checkpoints (`PIPELINE.checkpoints.redb`), so a
    /// restart, even after a crash, resumes from the last complete one.
    #[arg(
        long,
        env = "WEIR_STATE_DIR",
        default_value = "weir-state",
        value_name = "DIR"
    )]
    state_dir: PathBuf,

    /// Once every pipeline has ended, keep serving the local API until SIGINT or SIGTERM,
    /// so retained streams can still be queried.
    #[arg(long, conflicts_with = "no_metrics")]
    keep_serving: bool,

    /// How often to log each pipeline's progress (rows read and written); 0s turns it off.
    #[arg(long, default_value = "30s", value_parser = humantime_duration, value_name = "DURATION")]
    progress_interval: Duration,

    /// How long a shutdown may take to drain in-flight data and flush sinks.
    #[arg(long, default_value = "10s", value_parser = humantime_duration, value_name = "DURATION")]
    shutdown_timeout: Duration,

    /// Keep the pages of start-up code resident. By default `weir` asks the kernel to
    /// reclaim its own code pages once the pipelines run (they fault back in as needed),
    /// so an idle device holds only the code its pipelines keep running.
    #[arg(long)]
    keep_start_up_code: bool,
}

pub(crate) fn humantime_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e}; write e.g. 500ms, 10s or 1m"))
}

/// A size written as `512MiB`, `1GB` or a number of bytes.
pub(crate) fn byte_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| format!("invalid size '{text}': write e.g. 512MiB or 2GB"))
}

/// A duration that must not be zero (an interval, a wait).
pub(crate) fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime_duration(text)? {
        duration if duration.is_zero() => Err("must be longer than zero; write e.g. 1s".to_owned()),
        duration => Ok(duration),
    }
}

/// Runs the pipelines in `args` to completion.
pub async fn run(args: RunArgs) -> Outcome {
    let policy = match args.module_policy.policy() {
        Ok(policy) => policy,
        Err(message) => return Outcome::RuntimeFailure(message),
    };
    let modules = Arc::new(ModuleHost::new(ModuleHost::default_root()).with_policy(policy));
    let registry = prometheus::Registry::new();
    let metrics = match EngineMetrics::new(&registry) {
        Ok(metrics) => metrics,
        Err(error) => return Outcome::RuntimeFailure(format!("cannot register metrics: {error}")),
    };
    let shipping = args.ship_dir.as_ref().map(|dir| {
        Arc::new(weir_outbox::Shipping::new(
            args.outbox.clone(),
            args.outbox_limits.limits(),
            Arc::new(weir_outbox::DirectoryUplink::new(dir)),
            metrics.outbox(),
        ))
    });
    let validated = match crate::validate::load(&args.files, &modules, shipping.clone()) {
        Ok(pipelines) => pipelines,
        Err(outcome) => return outcome,
    };
    // Caught from here on, so a signal during start-up drains what started.
    let mut signals = Signals::new();
    let stop_background = CancellationToken::new();
    let live = Arc::new(LivePipelines::default());
    let startup = crate::api::Startup::default();
    let http = match args
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
        Ok(served) => served.map(|(_, handle)| handle),
        Err(message) => return Outcome::RuntimeFailure(message),
    };

    let progress: Vec<_> = validated
        .iter()
        .map(|pipeline| crate::progress::PipelineProgress::new(pipeline, &metrics))
        .collect();
    if !args.progress_interval.is_zero() {
        tokio::spawn(crate::progress::report(
            progress.clone(),
            args.progress_interval,
            stop_background.clone(),
        ));
    }

    let mut pipelines = Vec::with_capacity(validated.len());
    for pipeline in validated {
        let name = pipeline.name().to_owned();
        let shape = PipelineShape::of(&pipeline, &metrics);
        let checkpoints = match pipeline.checkpoint_interval() {
            Some(interval) => {
                match crate::state::open_checkpoints(&args.state_dir, &name, interval, &metrics) {
                    Ok(settings) => Some(settings),
                    Err(message) => {
                        stop_background.cancel();
                        return Outcome::RuntimeFailure(format!("pipeline '{name}': {message}"));
                    }
                }
            }
            None => None,
        };
        match pipeline.build_checkpointed(&metrics, checkpoints) {
            Ok(built) => pipelines.push((shape, built)),
            Err(error) => {
                stop_background.cancel();
                return Outcome::RuntimeFailure(format!("pipeline '{name}': {error}"));
            }
        }
    }

    let shutdown = CancellationToken::new();
    let mut running = JoinSet::new();
    for (shape, pipeline) in pipelines {
        let name = pipeline.name().to_owned();
        live.started(shape, &pipeline);
        info!(pipeline = %name, "pipeline started");
        let token = shutdown.clone();
        running.spawn(async move { (name, pipeline.run(token).await) });
    }

    startup.end();
    tokio::spawn(crate::start_up::release(args.keep_start_up_code));

    let outcome = supervise(
        &mut running,
        &shutdown,
        args.shutdown_timeout,
        &progress,
        &live,
        &mut signals,
    )
    .await;
    if let Some(shipping) = &shipping {
        // What the hub sinks accepted is safe in the outbox either way; this only
        // saves waiting for the next start to ship it.
        let left = shipping.drain(args.shutdown_timeout).await;
        if left > 0 {
            warn!(
                "{left} batches are still in the outbox {}; they ship on the next start",
                shipping.path().display()
            );
        }
    }
    if args.keep_serving && http.is_some() && !matches!(outcome, Outcome::Interrupted) {
        info!(
            "every pipeline has ended; the local API keeps serving their retained streams \
             until SIGINT or SIGTERM (--keep-serving)"
        );
        let signal = signals.next().await;
        info!("received {signal}: stopping");
    }
    stop_background.cancel();
    if let Some(handle) = http {
        let _ = handle.await;
    }
    outcome
}

/// Waits for every pipeline, handling signals and the shutdown deadline.
async fn supervise(
    running: &mut JoinSet<(String, Result<(), weir_engine::PipelineError>)>,
    shutdown: &CancellationToken,
    deadline: Duration,
    progress: &[crate::progress::PipelineProgress],
    live: &LivePipelines,
    signals: &mut Signals,
) -> Outcome {
    let started = tokio::time::Instant::now();
    let finished = |name: &str| {
        let (read, written) = progress
            .iter()
            .find(|p| p.name() == name)
            .map_or((0, 0), |p| p.totals());
        info!(
            pipeline = %name,
            rows_read = read,
            rows_written = written,
            "pipeline finished: {read} rows read, {written} rows written in {:.2?}",
            started.elapsed()
        );
    };
    let mut failures: Vec<String> = Vec::new();
    let mut draining_since: Option<tokio::time::Instant> = None;
    loop {
        let deadline_passed = async {
            match draining_since {
                Some(since) => tokio::time::sleep_until(since + deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            joined = running.join_next() => match joined {
                None => break,
                Some(Ok((name, Ok(())))) => {
                    live.ended(&name, Ok(()));
                    finished(&name);
                }
                Some(Ok((name, Err(error)))) => {
                    live.ended(&name, Err(error.to_string()));
                    failures.push(error.to_string());
                    // One pipeline's failure is its own: the others keep running, and
                    // the exit status reports the failure once they end.
                    warn!(pipeline = %name, "pipeline failed; the other pipelines keep running");
                }
                Some(Err(join_error)) => failures.push(format!("a pipeline task failed: {join_error}")),
            },
            signal = signals.next() => {
                if draining_since.is_some() {
                    running.abort_all();
                    return Outcome::Interrupted;
                }
                info!("received {signal}: draining (deadline {})", humantime::format_duration(deadline));
                draining_since = Some(tokio::time::Instant::now());
                shutdown.cancel();
            }
            () = deadline_passed => {
                running.abort_all();
                failures.push(format!(
                    "shutdown did not finish within {}; in-flight data was dropped",
                    humantime::format_duration(deadline)
                ));
                break;
            }
        }
    }
    if failures.is_empty() {
        Outcome::Success
    } else {
        Outcome::RuntimeFailure(failures.join("\n"))
    }
}

/// SIGINT and SIGTERM as one stream of names. Both are caught from the moment this is
/// made: make it before anything a signal should not cut short, since until then a
/// signal ends the process at once.
pub(crate) struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub(crate) fn new() -> Self {
        #[cfg(unix)]
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            #[cfg(unix)]
            interrupt: signal(SignalKind::interrupt()).ok(),
            #[cfg(unix)]
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    pub(crate) async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            async fn received(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = received(&mut self.interrupt) => "SIGINT",
                () = received(&mut self.terminate) => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}
