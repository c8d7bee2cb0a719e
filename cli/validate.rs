//! `weir validate`: checks pipeline files and prints every problem found.

use std::path::PathBuf;
use std::sync::Arc;

use weir_engine::Registry;
use weir_modules::{ModuleFactory, ModuleHost};
use weir_outbox::{HubSinkFactory, Shipping};

use crate::exit::Outcome;

/// Loads and validates `files` against the built-in operators and prints the result.
pub fn run(files: &[PathBuf]) -> Outcome {
    let modules = Arc::new(ModuleHost::new(ModuleHost::default_root()));
    match load(files, &modules, None) {
        Ok(pipelines) => {
            for pipeline in &pipelines {
                println!(
                    "ok: pipeline '{}' ({} operators)",
                    pipeline.name(),
                    pipeline.nodes().len()
                );
                for node in pipeline.nodes() {
                    for note in node.notes() {
                        println!("note: {}: {note}", node.name());
                    }
                }
            }
            Outcome::Success
        }
        Err(outcome) => outcome,
    }
}

/// Loads and validates `files`, printing every diagnostic to standard error. Shared by
/// `weir run`, which refuses to start anything when a single file is invalid.
pub fn load(
    files: &[PathBuf],
    modules: &Arc<ModuleHost>,
    shipping: Option<Arc<Shipping>>,
) -> Result<Vec<weir_pipelines::ValidatedPipeline>, Outcome> {
    let registry = registry(modules, shipping);
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

/// Every operator kind the binary knows: the built-in ones, and modules run on `modules`.
/// `hub` sinks ship through `shipping`; without it they validate but cannot start.
pub fn registry(modules: &Arc<ModuleHost>, shipping: Option<Arc<Shipping>>) -> Registry {
    let mut registry = weir_operators::registry::builtin();
    registry.register(Arc::new(ModuleFactory::new(modules.clone())));
    registry.register(Arc::new(HubSinkFactory::new(shipping)));
    registry
}
