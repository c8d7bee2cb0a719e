//! `weir tap`: prints a live, rate-bounded sample of what a node of a running pipeline
//! emits, one JSON object per row, until the stream ends or Ctrl-C.

use std::io::Write;

use hyper::Method;

use crate::api::client::{self, ClientArgs, LocalClient};
use crate::exit::Outcome;

/// Arguments of `weir tap`.
#[derive(clap::Args, Debug)]
pub struct TapArgs {
    /// The source or transform whose output to show.
    #[arg(value_name = "NODE")]
    node: String,

    /// The pipeline, when several running pipelines have a node of that name.
    #[arg(long, value_name = "NAME")]
    pipeline: Option<String>,

    /// Show at most this many rows per second (1 to 1000); the rest are counted.
    #[arg(long, default_value_t = 10, value_name = "ROWS")]
    rate: u32,

    /// Stop after showing this many rows.
    #[arg(long, value_name = "ROWS")]
    limit: Option<u64>,

    #[command(flatten)]
    client: ClientArgs,
}

/// Streams the tap to standard output.
pub async fn run(args: TapArgs) -> Outcome {
    let client = LocalClient::new(&args.client);
    let mut query = vec![("rate", args.rate.to_string())];
    if let Some(pipeline) = &args.pipeline {
        query.push(("pipeline", pipeline.clone()));
    }
    let path = format!(
        "/api/v1/tap/{}{}",
        client::path_segment(&args.node),
        client::query_string(&query)
    );
    let mut response = match client.send(Method::GET, &path, None).await {
        Ok(response) => response,
        Err(error) => return Outcome::RuntimeFailure(error),
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut shown = 0u64;
    let mut stdout = std::io::stdout().lock();
    loop {
        let chunk = match client::next_chunk(&mut response).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => {
                eprintln!("weir tap: the connection closed");
                return Outcome::Success;
            }
            Err(error) => {
                return Outcome::RuntimeFailure(format!("the tap was cut off: {error}"));
            }
        };
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let event: serde_json::Value = match serde_json::from_slice(&line) {
                Ok(event) => event,
                Err(error) => {
                    return Outcome::RuntimeFailure(format!(
                        "the tap sent a line that is not JSON: {error}"
                    ));
                }
            };
            if let Some(rows) = event.get("rows").and_then(|rows| rows.as_array()) {
                for row in rows {
                    if writeln!(stdout, "{row}").is_err() {
                        // The reader went away (e.g. `| head`): that is the end.
                        return Outcome::Success;
                    }
                    shown += 1;
                    if args.limit.is_some_and(|limit| shown >= limit) {
                        let _ = stdout.flush();
                        return Outcome::Success;
                    }
                }
                let _ = stdout.flush();
            }
            if let Some(error) = event.get("error").and_then(|e| e.as_str()) {
                eprintln!("weir tap: {error}");
            }
            let dropped = event.get("dropped").and_then(|d| d.as_u64());
            if event.get("end").is_some() {
                eprintln!(
                    "weir tap: the stream ended; {shown} rows shown, {} not shown",
                    dropped.unwrap_or(0)
                );
                return Outcome::Success;
            }
            if let Some(dropped) = dropped {
                eprintln!(
                    "weir tap: {dropped} rows not shown so far (over --rate {}, or while \
                     this terminal was busy)",
                    args.rate
                );
            }
        }
    }
}
