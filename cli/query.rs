//! `weir query`: runs read-only SQL over a running runtime's retained streams and prints
//! the answer as a table, JSON, CSV or Arrow IPC.

use std::io::{Read, Write};

use hyper::Method;
use weir_query::{Format, QueryRequest};

use crate::api::client::{self, ClientArgs, LocalClient};
use crate::exit::Outcome;

/// How `weir query` prints the answer.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Output {
    /// An aligned table for people.
    Table,
    /// The API's JSON answer (columns, rows, row_count, truncated).
    Json,
    /// CSV with a header line.
    Csv,
    /// An Arrow IPC stream, for other tools.
    Arrow,
}

/// Arguments of `weir query`.
#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// One SELECT over the retained streams, which are tables named after their nodes
    /// (also `pipeline.node`). `-` reads the query from standard input.
    #[arg(value_name = "SQL")]
    sql: String,

    /// How to print the answer.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    format: Output,

    /// Answer with at most this many rows (at most the runtime's --query-max-rows).
    #[arg(long, value_name = "ROWS")]
    max_rows: Option<usize>,

    /// Give up after this long, e.g. 5s (at most the runtime's --query-timeout).
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,

    #[command(flatten)]
    client: ClientArgs,
}

/// Sends the query and prints the answer.
pub async fn run(args: QueryArgs) -> Outcome {
    let sql = if args.sql == "-" {
        let mut text = String::new();
        if let Err(error) = std::io::stdin().read_to_string(&mut text) {
            return Outcome::RuntimeFailure(format!(
                "cannot read the query from standard input: {error}"
            ));
        }
        text
    } else {
        args.sql.clone()
    };
    let client = LocalClient::new(&args.client);
    let format = match args.format {
        Output::Table | Output::Arrow => Format::Arrow,
        Output::Json => Format::Json,
        Output::Csv => Format::Csv,
    };
    let request = QueryRequest {
        sql,
        format: Some(format),
        max_rows: args.max_rows,
        timeout: args.timeout.clone(),
    };
    let json = match serde_json::to_vec(&request) {
        Ok(json) => json,
        Err(error) => return Outcome::RuntimeFailure(format!("cannot write the query: {error}")),
    };
    let response = match client.send(Method::POST, "/api/v1/query", Some(json)).await {
        Ok(response) => response,
        Err(error) => return Outcome::RuntimeFailure(error),
    };
    let truncated = response
        .headers()
        .get(weir_query::TRUNCATED_HEADER)
        .is_some_and(|value| value == "true");
    let body = match client::read_body(response).await {
        Ok(body) => body,
        Err(error) => {
            return Outcome::RuntimeFailure(format!("the answer was cut off: {error}"));
        }
    };
    let printed = match args.format {
        Output::Table => print_table(&body),
        _ => std::io::stdout()
            .write_all(&body)
            .map_err(|e| format!("cannot write the answer: {e}")),
    };
    if let Err(error) = printed {
        return Outcome::RuntimeFailure(error);
    }
    if truncated {
        eprintln!(
            "weir query: the answer was cut at the row limit; narrow the query (WHERE, \
             LIMIT, GROUP BY) or raise --max-rows"
        );
    }
    Outcome::Success
}

fn print_table(arrow: &[u8]) -> Result<(), String> {
    let (table, rows) = weir_query::arrow_to_table(arrow)?;
    let noun = if rows == 1 { "row" } else { "rows" };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{table}\n({rows} {noun})")
        .map_err(|e| format!("cannot write the answer: {e}"))
}
