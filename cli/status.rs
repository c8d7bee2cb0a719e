//! `weir status`: asks a running `weir run` for its modules' states and prints them.

use std::net::SocketAddr;
use std::time::Duration;

use weir_module_sdk::Endpoint;
use weir_module_sdk::client::Client;

use crate::exit::Outcome;
use crate::http::StatusBody;

/// Arguments of `weir status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The address the running `weir run` serves metrics on.
    #[arg(long, env = "WEIR_METRICS_ADDR", default_value = crate::run::DEFAULT_METRICS_ADDR, value_name = "HOST:PORT")]
    addr: SocketAddr,

    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Fetches `/status` from `args.addr` and prints it.
pub async fn run(args: StatusArgs) -> Outcome {
    let mut client = Client::new(Endpoint::Tcp(args.addr));
    let answer = client
        .send(
            hyper::Method::GET,
            "/status",
            &[],
            Default::default(),
            Duration::from_secs(5),
        )
        .await;
    let body = match answer {
        Ok(answer) if answer.status.is_success() => answer.body,
        Ok(answer) => {
            return Outcome::RuntimeFailure(format!(
                "{} answered /status with {}: {}",
                args.addr,
                answer.status,
                answer.text()
            ));
        }
        Err(error) => {
            return Outcome::RuntimeFailure(format!(
                "cannot reach weir at {}: {error} (is `weir run` running, with --metrics-addr {}?)",
                args.addr, args.addr
            ));
        }
    };
    let status: StatusBody = match serde_json::from_slice(&body) {
        Ok(status) => status,
        Err(error) => {
            return Outcome::RuntimeFailure(format!(
                "{} answered /status with something that is not weir's status: {error}",
                args.addr
            ));
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
        return Outcome::Success;
    }
    if status.modules.is_empty() {
        println!("no modules are running");
        return Outcome::Success;
    }
    println!(
        "{:<16} {:<16} {:<8} {:<10} {:>8} {:>9}  REASON",
        "PIPELINE", "MODULE", "RUNTIME", "STATE", "RESTARTS", "LAST EXIT"
    );
    for module in status.modules {
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
    Outcome::Success
}
