//! The `weir` binary: runs YAML pipelines over Arrow batches on an edge device.
//!
//! One file per subcommand; [`exit`] is the one place that maps outcomes to exit codes.

#[cfg(feature = "hub")]
mod agent;
mod api;
mod exit;
mod logging;
mod module_policy;
mod outbox;
mod progress;
mod query;
mod run;
mod start_up;
mod state;
mod status;
mod tap;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Weir: stream processing at the edge. Pipelines are YAML files wiring sources,
/// SQL and windowed transforms, and sinks over Apache Arrow record batches.
#[derive(Parser, Debug)]
#[command(name = "weir", version, propagate_version = true)]
#[command(after_help = exit::EXIT_CODES_HELP)]
struct Cli {
    /// Worker threads for the runtime; 1 runs everything on one thread. Default: one per core.
    #[arg(long, global = true, env = "WEIR_THREADS", value_name = "N")]
    threads: Option<usize>,

    /// Log format on standard error. The level is set with RUST_LOG (default `info`).
    #[arg(long, global = true, env = "WEIR_LOG_FORMAT", value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one or more pipelines in this process until their sources end or a signal arrives.
    ///
    /// On SIGINT or SIGTERM the sources stop, in-flight data drains, open windows close and
    /// sinks flush, within --shutdown-timeout. A second signal exits at once.
    Run(run::RunArgs),
    /// Check pipeline files and report every problem found, with file:line:column.
    ///
    /// Validation is offline: it checks structure, kinds, wiring, schemas and SQL, but does
    /// not open input files or connect to anything.
    Validate {
        /// Pipeline YAML files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Show what a running `weir run` or `weir agent` runs: pipelines, their operators,
    /// rows and retained streams, and modules (state, restarts, last exit and why).
    Status(status::StatusArgs),
    /// Run read-only SQL over the retained streams of a running `weir run` or `weir agent`.
    ///
    /// Every node with `retain:` is a table named after it (and `pipeline.node`). The
    /// answer prints as a table, or as JSON, CSV or Arrow IPC with --format.
    Query(query::QueryArgs),
    /// Show a live sample of what a node of a running pipeline emits, one JSON row per
    /// line, at most --rate rows per second; rows left out are counted on standard error.
    Tap(tap::TapArgs),
    /// Look into a hub sink's outbox file.
    #[command(subcommand)]
    Outbox(outbox::OutboxCommand),
    /// Look into the checkpoints of a state directory (`weir run --state-dir`).
    #[command(subcommand)]
    State(state::StateCommand),
    /// Run the pipelines a hub deploys to this device, and report on them.
    ///
    /// Long-polls the hub for this device's desired state, validates it, swaps the running
    /// pipelines (unchanged ones keep running), reports the outcome and sends heartbeats.
    /// The last applied deployment is kept in --state-dir, so the agent boots into it and
    /// keeps running it while the hub is out of reach.
    #[cfg(feature = "hub")]
    Agent(agent::AgentArgs),
    /// `weir agent` in a build without it: says so, and which feature brings it in.
    #[cfg(not(feature = "hub"))]
    #[command(hide = true)]
    Agent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let outcome = match cli.command {
        Command::Validate { files } => validate::run(&files),
        Command::Outbox(command) => outbox::run(command),
        Command::State(command) => state::run(command),
        Command::Run(args) => match runtime(cli.threads) {
            Ok(runtime) => runtime.block_on(run::run(args)),
            Err(error) => {
                exit::Outcome::RuntimeFailure(format!("cannot start the runtime: {error}"))
            }
        },
        #[cfg(feature = "hub")]
        Command::Agent(args) => match runtime(cli.threads) {
            Ok(runtime) => runtime.block_on(agent::run(args)),
            Err(error) => {
                exit::Outcome::RuntimeFailure(format!("cannot start the runtime: {error}"))
            }
        },
        #[cfg(not(feature = "hub"))]
        Command::Agent { .. } => {
            eprintln!(
                "error: this build of weir has no `agent`: it was built without the `hub` \
                 feature (build with `--features hub`)"
            );
            // A configuration problem: a service manager should not restart it.
            exit::Outcome::ConfigInvalid
        }
        Command::Status(args) => client_runtime(status::run(args)),
        Command::Query(args) => client_runtime(query::run(args)),
        Command::Tap(args) => client_runtime(tap::run(args)),
    };
    outcome.report()
}

/// Runs a client command (one that talks to a running runtime) on one thread.
fn client_runtime(command: impl std::future::Future<Output = exit::Outcome>) -> exit::Outcome {
    match runtime(Some(1)) {
        Ok(runtime) => runtime.block_on(command),
        Err(error) => exit::Outcome::RuntimeFailure(format!("cannot start the runtime: {error}")),
    }
}

fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.max(1))
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
}
