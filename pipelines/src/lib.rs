//! Weir's pipeline files: reading the YAML, validating it with precise errors, and
//! planning it into an engine graph.
//!
//! The flow is `load` → `validate` → `build`:
//!
//! - [`load_file`] / [`load_str`] read a YAML v1 document into a [`Document`],
//!   interpolating `${VAR}` from an injected environment and checking its shape.
//! - [`validate`] checks the document against the operator [`Registry`]: kinds, wiring,
//!   cycles, and every operator's own config (through its factory's `plan`), and returns a
//!   [`ValidatedPipeline`]. It is pure: no files, sockets or clocks.
//! - [`ValidatedPipeline::build`] instantiates the operators into a runnable
//!   [`weir_engine::graph::Pipeline`].
//!
//! Every step reports *all* the problems it finds as [`Diagnostic`]s with file, line,
//! column, path and hint. [`validate_file`] and [`load_and_validate`] run the whole
//! chain and report the problems of both steps together, which is what `weir validate`
//! wants: a file with an unknown field *and* an unknown kind reports both in one run.

mod diagnostic;
mod env;
mod plan;
pub mod schema;
mod spec;
mod yaml;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use weir_engine::Registry;
use weir_engine::config::{ConfigError, Location};

pub use diagnostic::Diagnostic;
pub use env::{EnvLookup, process_env};
pub use plan::{BuildError, PlannedNode, ValidatedPipeline};
pub use spec::{Document, InputSpec, NodeSpec, Parallelism, VERSION, role_noun};
pub use yaml::parse as parse_yaml;

/// Reads and shape-checks the pipeline file at `path`.
pub fn load_file(path: &Path, env: EnvLookup<'_>) -> Result<Document, Vec<Diagnostic>> {
    let text = read(path).map_err(|d| vec![d])?;
    load_str(path, &text, env)
}

/// Reads and shape-checks a pipeline document; `file` names it in messages.
pub fn load_str(file: &Path, text: &str, env: EnvLookup<'_>) -> Result<Document, Vec<Diagnostic>> {
    let root = yaml::parse(text).map_err(|e| vec![Diagnostic::from_config_error(file, e)])?;
    let (document, errors) = spec::parse_document(file, root, env);
    if errors.is_empty() {
        Ok(document)
    } else {
        Err(diagnostics(file, errors))
    }
}

/// Validates a loaded document against `registry` and plans every node.
///
/// `base_dir` is the directory relative paths in operator configs resolve against: the
/// pipeline file's directory (see [`base_dir`]).
pub fn validate(
    document: &Document,
    registry: &Registry,
    base_dir: &Path,
) -> Result<ValidatedPipeline, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    plan::check(document, registry, base_dir, &mut errors)
        .ok_or_else(|| diagnostics(&document.file, errors))
}

/// Loads and validates a pipeline document in one go, reporting the problems of both
/// steps together. Nodes whose declaration has a problem are not planned, nor is anything
/// downstream of them, so follow-on errors do not drown the real ones.
pub fn validate_str(
    file: &Path,
    text: &str,
    registry: &Registry,
    env: EnvLookup<'_>,
    base_dir: &Path,
) -> Result<ValidatedPipeline, Vec<Diagnostic>> {
    check_text(file, text, registry, env, base_dir).outcome
}

/// Loads and validates the pipeline file at `path`, relative paths resolving against
/// its directory.
pub fn validate_file(
    path: &Path,
    registry: &Registry,
    env: EnvLookup<'_>,
) -> Result<ValidatedPipeline, Vec<Diagnostic>> {
    let text = read(path).map_err(|d| vec![d])?;
    validate_str(path, &text, registry, env, &base_dir(path))
}

/// Loads and validates every pipeline file in `paths` (a directory stands for the
/// `*.yaml` and `*.yml` files in it), and checks that pipeline names are unique across
/// them. Returns the pipelines that passed and every problem found, sorted by file and
/// position.
pub fn load_and_validate<P: AsRef<Path>>(
    paths: impl IntoIterator<Item = P>,
    registry: &Registry,
    env: EnvLookup<'_>,
) -> (Vec<ValidatedPipeline>, Vec<Diagnostic>) {
    let mut problems = Vec::new();
    let mut sources = Vec::new();
    for file in expand(paths, &mut problems) {
        match read(&file) {
            Ok(text) => {
                let base = base_dir(&file);
                sources.push(PipelineSource { file, text, base });
            }
            Err(problem) => problems.push(problem),
        }
    }
    let (pipelines, mut found) = validate_sources(&sources, registry, env);
    problems.append(&mut found);
    diagnostic::sort(&mut problems);
    (pipelines, problems)
}

/// One pipeline document held in memory: where it is said to come from (for messages),
/// its text, and the directory its relative paths resolve against.
#[derive(Clone, Debug)]
pub struct PipelineSource {
    /// The name messages give the document, such as `deployments/plant/filter.yaml`.
    pub file: PathBuf,
    /// The YAML text.
    pub text: String,
    /// The directory relative paths resolve against.
    pub base: PathBuf,
}

/// Validates documents held in memory as [`load_and_validate`] does files: each one on
/// its own, and their pipeline names unique across them. Used where pipelines do not
/// come from local files, such as a deployment sent to the hub.
pub fn validate_sources(
    sources: &[PipelineSource],
    registry: &Registry,
    env: EnvLookup<'_>,
) -> (Vec<ValidatedPipeline>, Vec<Diagnostic>) {
    let mut pipelines = Vec::new();
    let mut problems = Vec::new();
    let mut names: HashMap<String, (PathBuf, Location)> = HashMap::new();
    for PipelineSource { file, text, base } in sources {
        let Checked { name, outcome } = check_text(file, text, registry, env, base);
        let mut duplicate = false;
        if let Some((name, location)) = name {
            if let Some((first, first_location)) = names.get(&name) {
                duplicate = true;
                problems.push(Diagnostic::from_config_error(
                    file,
                    ConfigError::new(
                        "name",
                        location,
                        format!(
                            "pipeline name '{name}' is already used by {}:{first_location}",
                            first.display()
                        ),
                    )
                    .with_hint("pipeline names must be unique across files: rename one of them"),
                ));
            } else {
                names.insert(name, (file.clone(), location));
            }
        }
        match outcome {
            Ok(pipeline) if !duplicate => pipelines.push(pipeline),
            Ok(_) => {}
            Err(found) => problems.extend(found),
        }
    }
    diagnostic::sort(&mut problems);
    (pipelines, problems)
}

/// The directory relative paths in a pipeline file resolve against: the file's own.
pub fn base_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The outcome of the whole chain for one document.
struct Checked {
    /// The pipeline's name and where it is written, when the document has a valid one
    /// (even if other parts failed), so names are compared across files.
    name: Option<(String, Location)>,
    outcome: Result<ValidatedPipeline, Vec<Diagnostic>>,
}

/// Runs the whole chain for one document.
fn check_text(
    file: &Path,
    text: &str,
    registry: &Registry,
    env: EnvLookup<'_>,
    base_dir: &Path,
) -> Checked {
    let root = match yaml::parse(text) {
        Ok(root) => root,
        Err(error) => {
            return Checked {
                name: None,
                outcome: Err(vec![Diagnostic::from_config_error(file, error)]),
            };
        }
    };
    let (document, mut errors) = spec::parse_document(file, root, env);
    let name = (!document.name.is_empty()).then(|| (document.name.clone(), document.name_location));
    let outcome = plan::check(&document, registry, base_dir, &mut errors)
        .ok_or_else(|| diagnostics(file, errors));
    Checked { name, outcome }
}

fn diagnostics(file: &Path, errors: Vec<ConfigError>) -> Vec<Diagnostic> {
    let mut found: Vec<Diagnostic> = errors
        .into_iter()
        .map(|error| Diagnostic::from_config_error(file, error))
        .collect();
    diagnostic::sort(&mut found);
    found
}

fn read(path: &Path) -> Result<String, Diagnostic> {
    std::fs::read_to_string(path)
        .map_err(|e| Diagnostic::file_error(path, format!("cannot read the pipeline file: {e}")))
}

/// The files `paths` stand for: files as given, directories as their YAML files, sorted.
fn expand<P: AsRef<Path>>(
    paths: impl IntoIterator<Item = P>,
    problems: &mut Vec<Diagnostic>,
) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        let path = path.as_ref();
        if !path.is_dir() {
            files.push(path.to_owned());
            continue;
        }
        match std::fs::read_dir(path) {
            Ok(entries) => {
                let mut found: Vec<PathBuf> = entries
                    .filter_map(|entry| entry.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.is_file()
                            && p.extension()
                                .is_some_and(|ext| ext == "yaml" || ext == "yml")
                    })
                    .collect();
                found.sort();
                if found.is_empty() {
                    problems.push(
                        Diagnostic::file_error(path, "the directory holds no pipeline files")
                            .with_hint("pipeline files end in .yaml or .yml"),
                    );
                }
                files.extend(found);
            }
            Err(e) => problems.push(Diagnostic::file_error(
                path,
                format!("cannot read the directory: {e}"),
            )),
        }
    }
    files
}
