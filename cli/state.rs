//! Checkpoint state on disk: where `weir run` keeps each pipeline's state store, opening
//! it for a run, and `weir state inspect`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info};
use weir_engine::checkpoint::{CheckpointSettings, StateStore};
use weir_engine::metrics::EngineMetrics;

use crate::exit::Outcome;

/// The file of pipeline `name`'s state store under `dir`.
pub fn store_path(dir: &Path, pipeline: &str) -> PathBuf {
    dir.join(format!("{pipeline}.checkpoints.redb"))
}

/// Opens pipeline `pipeline`'s store under `dir` for a run that checkpoints every
/// `interval`. A damaged store is moved aside, logged and counted, and the pipeline
/// starts afresh; only a directory that cannot be written stops it.
pub fn open_checkpoints(
    dir: &Path,
    pipeline: &str,
    interval: Duration,
    metrics: &EngineMetrics,
) -> Result<CheckpointSettings, String> {
    let metrics = metrics.checkpoint(pipeline);
    let path = store_path(dir, pipeline);
    let opened = StateStore::open(&path).map_err(|e| e.to_string())?;
    if let Some(damaged) = &opened.damaged {
        metrics.failed("damaged_store");
        error!(
            pipeline,
            "the state store {} cannot be read ({}): it was moved to {} and the pipeline starts \
             afresh, without the state of its last checkpoint",
            path.display(),
            damaged.reason,
            damaged.moved_to.display()
        );
    }
    if let Some(checkpoint) = opened.checkpoint.as_ref().filter(|c| !c.finished) {
        info!(
            pipeline,
            epoch = checkpoint.epoch,
            "resuming from the last complete checkpoint in {}",
            path.display()
        );
    }
    Ok(CheckpointSettings {
        store: Arc::new(opened.store),
        interval,
        restored: opened.checkpoint,
        metrics,
    })
}

/// `weir state` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum StateCommand {
    /// Show the checkpoints a state directory holds: per pipeline its last complete
    /// epoch and when it completed, and per node the parts and bytes of its state.
    Inspect {
        /// The state directory (`weir run --state-dir`).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Runs a `weir state` subcommand.
pub fn run(command: StateCommand) -> Outcome {
    let StateCommand::Inspect { dir } = command;
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) => return Outcome::RuntimeFailure(format!("cannot read {}: {e}", dir.display())),
    };
    let mut stores: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.to_string_lossy().ends_with(".checkpoints.redb"))
        .collect();
    stores.sort();
    if stores.is_empty() {
        println!("{}: no checkpoints", dir.display());
        return Outcome::Success;
    }
    let mut failed = false;
    for path in stores {
        let pipeline = path
            .file_name()
            .map(|name| {
                name.to_string_lossy()
                    .trim_end_matches(".checkpoints.redb")
                    .to_owned()
            })
            .unwrap_or_default();
        match StateStore::inspect(&path) {
            Ok(summary) if summary.epoch == 0 => println!("{pipeline}: no complete checkpoint"),
            Ok(summary) => {
                let completed = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(summary.completed_at_ms),
                );
                println!(
                    "{pipeline}: epoch {} completed {completed}{}, {} bytes on disk",
                    summary.epoch,
                    if summary.finished {
                        " (the run finished: the next starts afresh)"
                    } else {
                        ""
                    },
                    summary.file_bytes
                );
                println!("  {:<32} {:>10} {:>14}", "NODE", "PARTS", "BYTES");
                for node in summary.nodes {
                    println!("  {:<32} {:>10} {:>14}", node.node, node.parts, node.bytes);
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("{pipeline}: {e}");
            }
        }
    }
    if failed {
        Outcome::RuntimeFailure("some state stores could not be read".into())
    } else {
        Outcome::Success
    }
}
