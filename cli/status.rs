//! `weir status`: asks a running `weir run` or `weir agent` for its pipelines (operators,
//! rows, retained streams) and modules, and prints them.

use crate::api::client::{ClientArgs, LocalClient};
use crate::api::live::{PipelineReport, StatusBody};
use crate::exit::Outcome;

/// Arguments of `weir status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print the API's JSON instead of tables.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    client: ClientArgs,
}

/// Fetches `/api/v1/pipelines` and prints it.
pub async fn run(args: StatusArgs) -> Outcome {
    let client = LocalClient::new(&args.client);
    let status: StatusBody = match client.get_json("/api/v1/pipelines").await {
        Ok(status) => status,
        Err(error) => return Outcome::RuntimeFailure(error),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
        return Outcome::Success;
    }
    print_pipelines(&status.pipelines);
    println!();
    print_modules(&status.modules);
    Outcome::Success
}

fn print_pipelines(pipelines: &[PipelineReport]) {
    if pipelines.is_empty() {
        println!("no pipelines are running");
        return;
    }
    for pipeline in pipelines {
        let error = pipeline
            .error
            .as_deref()
            .map(|error| format!(": {error}"))
            .unwrap_or_default();
        println!(
            "pipeline {} ({}): {}{error}",
            pipeline.name,
            pipeline.file,
            pipeline.state.as_str()
        );
        if let Some(checkpoint) = &pipeline.checkpoint {
            let last = match checkpoint.last_completed_epoch {
                0 => "none complete yet".to_owned(),
                epoch => format!(
                    "epoch {epoch} {} s ago, {}",
                    checkpoint.age_seconds,
                    human_bytes(checkpoint.last_bytes)
                ),
            };
            println!(
                "  checkpoints every {}: {last}; {} taken, {:.1} ms on average, {} failed",
                checkpoint.interval,
                checkpoint.completed,
                checkpoint.mean_duration_ms,
                checkpoint.failures
            );
        }
        println!(
            "  {:<20} {:<9} {:<12} {:>12} {:>12}  RETAINED",
            "OPERATOR", "ROLE", "KIND", "ROWS IN", "ROWS OUT"
        );
        for operator in &pipeline.operators {
            let retained = operator
                .retained
                .as_ref()
                .map(|r| {
                    format!(
                        "{} rows, {} of {}, for {}",
                        r.rows,
                        human_bytes(r.bytes),
                        human_bytes(r.max_bytes),
                        r.duration
                    )
                })
                .unwrap_or_else(|| "-".to_owned());
            println!(
                "  {:<20} {:<9} {:<12} {:>12} {:>12}  {retained}",
                operator.name, operator.role, operator.kind, operator.rows_in, operator.rows_out
            );
        }
    }
}

fn print_modules(modules: &[weir_modules::ModuleReport]) {
    if modules.is_empty() {
        println!("no modules are running");
        return;
    }
    println!(
        "{:<16} {:<16} {:<8} {:<10} {:>8} {:>9}  REASON",
        "PIPELINE", "MODULE", "RUNTIME", "STATE", "RESTARTS", "LAST EXIT"
    );
    for module in modules {
        let last_exit = match (module.last_exit_code, module.last_exit_oom) {
            (_, true) => "oom".to_owned(),
            (Some(code), false) => code.to_string(),
            (None, false) => "-".to_owned(),
        };
        println!(
            "{:<16} {:<16} {:<8} {:<10} {:>8} {:>9}  {}",
            module.pipeline,
            module.module,
            module.runtime,
            module.state,
            module.restarts,
            last_exit,
            module.reason.as_deref().unwrap_or("")
        );
    }
}

/// `1.5 MiB`-style sizes.
fn human_bytes(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}
