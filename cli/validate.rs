//! `weir validate`: checks pipeline files and prints every problem found.

use std::path::PathBuf;

use crate::exit::Outcome;

/// Loads and validates `files` against the built-in operators and prints the result.
pub fn run(files: &[PathBuf]) -> Outcome {
    match load(files) {
        Ok(pipelines) => {
            for pipeline in &pipelines {
                println!(
                    "ok: pipeline '{}' ({} operators)",
                    pipeline.name(),
                    pipeline.nodes().len()
                );
            }
            Outcome::Success
        }
        Err(outcome) => outcome,
    }
}

/// Loads and validates `files`, printing every diagnostic to standard error. Shared by
/// `weir run`, which refuses to start anything when a single file is invalid.
pub fn load(files: &[PathBuf]) -> Result<Vec<weir_pipelines::ValidatedPipeline>, Outcome> {
    let registry = weir_operators::registry::builtin();
    let env = |name: &str| std::env::var(name).ok();
    let (pipelines, diagnostics) = weir_pipelines::load_and_validate(files, &registry, &env);
    if diagnostics.is_empty() {
        return Ok(pipelines);
    }
    for diagnostic in &diagnostics {
        eprintln!("{diagnostic}");
    }
    let count = diagnostics.len();
    eprintln!(
        "error: {count} problem{} found; nothing was run",
        if count == 1 { "" } else { "s" }
    );
    Err(Outcome::ConfigInvalid)
}
