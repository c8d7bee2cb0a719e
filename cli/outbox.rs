//! `weir outbox check`: what an outbox file holds, or what recovery would keep of a
//! damaged one, without changing it.

use std::path::PathBuf;

use weir_outbox::{Check, Outbox};

use crate::exit::Outcome;

/// The outbox's limits, shared by `weir run` and `weir agent`.
#[derive(clap::Args, Debug, Clone)]
pub struct OutboxLimits {
    /// The most the `hub` sinks' outbox may hold, e.g. 512MiB; past it the oldest batches
    /// of the lowest-priority sinks are dropped and counted.
    #[arg(long, default_value = "512MiB", value_parser = crate::run::byte_size, value_name = "SIZE")]
    pub outbox_max_bytes: u64,

    /// Batches older than this are dropped from the outbox and counted.
    #[arg(long, default_value = "7d", value_parser = crate::run::positive_duration, value_name = "DURATION")]
    pub outbox_max_age: std::time::Duration,
}

impl OutboxLimits {
    /// As the outbox takes them.
    pub fn limits(&self) -> weir_outbox::Limits {
        weir_outbox::Limits {
            max_bytes: self.outbox_max_bytes,
            max_age: Some(self.outbox_max_age),
        }
    }
}

/// `weir outbox` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum OutboxCommand {
    /// Report the batches an outbox holds per stream (or, for a damaged file, how many
    /// intact batches recovery would keep and how many are lost). Changes nothing.
    Check {
        /// The outbox file.
        #[arg(value_name = "FILE")]
        path: PathBuf,
    },
}

/// Runs a `weir outbox` subcommand.
pub fn run(command: OutboxCommand) -> Outcome {
    let OutboxCommand::Check { path } = command;
    match Outbox::check(&path) {
        Ok(Check::Sound(stats, dead_letters)) => {
            println!(
                "{}: sound; {} batches, {} rows, {} bytes waiting",
                path.display(),
                stats.batches,
                stats.rows,
                stats.bytes
            );
            if !stats.streams.is_empty() {
                println!(
                    "{:<32} {:>8} {:>10} {:>12} {:>12}  OLDEST",
                    "STREAM", "PRIORITY", "BATCHES", "ROWS", "BYTES"
                );
            }
            for stream in stats.streams {
                let oldest = stream
                    .oldest_ms
                    .map(|ms| format!("{} ms since the epoch", ms))
                    .unwrap_or_else(|| "-".to_owned());
                println!(
                    "{:<32} {:>8} {:>10} {:>12} {:>12}  {oldest}",
                    stream.stream, stream.priority, stream.batches, stream.rows, stream.bytes
                );
            }
            if !dead_letters.is_empty() {
                println!(
                    "{} dead letters (refused for good or unreadable; not shipped):",
                    dead_letters.len()
                );
                println!(
                    "{:<32} {:>20} {:>10} {:>15}  REASON",
                    "STREAM", "SEQ", "ROWS", "AT_MS"
                );
                for letter in dead_letters {
                    println!(
                        "{:<32} {:>20} {:>10} {:>15}  {}",
                        letter.stream, letter.seq, letter.rows, letter.at_ms, letter.reason
                    );
                }
            }
            Outcome::Success
        }
        Ok(Check::Damaged {
            reason,
            batches,
            rows,
            broken,
        }) => Outcome::RuntimeFailure(format!(
            "{}: damaged ({reason}); opening it would keep {batches} intact batches \
             ({rows} rows) and lose {broken} damaged ones",
            path.display()
        )),
        Err(error) => Outcome::RuntimeFailure(error.to_string()),
    }
}
