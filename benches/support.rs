//! What the end-to-end benchmarks share: pinning to one core, where their files go, W1's
//! generated input (`benches/w1/data.rs`), made once and reused, planning a transform
//! from YAML as a pipeline would, and reading sizes from the environment.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;

use weir_engine::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use weir_engine::metrics::OperatorMetrics;
use weir_engine::registry::{InputStream, NodeContext, Role, StreamInfo};
use weir_engine::time::WindowSpec;
use weir_engine::{OperatorFactory, OperatorInstance, Transform};

use crate::data::W1Spec;

/// Bumped whenever the generator's output changes, so stale inputs are not reused.
const GENERATOR_VERSION: u32 = 1;

/// The target directory the binary was built into (`<target>/<profile>/weir`), so the input
/// lands beside the build however `CARGO_TARGET_DIR` is set.
pub fn target_dir(weir: &Path) -> PathBuf {
    weir.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Pins this thread, and so every child spawned from it, to CPU 0, so throughput is per
/// core whatever the runtime does with threads. Returns whether it worked.
pub fn pin_to_cpu0() -> bool {
    let mut cpus = CpuSet::new();
    let result = cpus
        .set(0)
        .and_then(|()| sched_setaffinity(Pid::from_raw(0), &cpus));
    match result {
        Ok(()) => true,
        Err(errno) => {
            eprintln!("warning: cannot pin to CPU 0 ({errno}); figures may use more cores");
            false
        }
    }
}

/// Lets this thread, and the children it spawns next, run on CPUs `0..cores`: the
/// multi-core runs of a benchmark otherwise pinned to CPU 0.
pub fn allow_cpus(cores: usize) -> Result<()> {
    let mut cpus = CpuSet::new();
    for cpu in 0..cores {
        cpus.set(cpu).context("no such CPU")?;
    }
    sched_setaffinity(Pid::from_raw(0), &cpus).context("cannot set the CPU affinity")
}

/// The input file for `spec`, generated unless a complete one is already there.
///
/// Every generator parameter is in the file name, and the file is renamed into place only
/// once fully written, so an existing file is always the right one.
pub fn ensure_input(work: &Path, spec: &W1Spec) -> Result<PathBuf> {
    let name = format!(
        "w1-v{GENERATOR_VERSION}-{}lines-{}dev-{}hz-seed{}-shuffle{}ms.jsonl",
        spec.lines,
        spec.devices,
        spec.readings_per_device_per_second,
        spec.seed,
        spec.shuffle_within_ms
    );
    let path = work.join(name);
    if path.is_file() {
        eprintln!("reusing {}", path.display());
        return Ok(path);
    }
    eprintln!("generating {} ...", path.display());
    let started = Instant::now();
    let partial = path.with_extension("jsonl.partial");
    let file =
        File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let bytes = spec
        .write_to(&mut out)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|file| file.sync_all())
        .with_context(|| format!("cannot write {}", partial.display()))?;
    fs::rename(&partial, &path).with_context(|| format!("cannot create {}", path.display()))?;
    eprintln!(
        "generated {:.1} MiB in {:.1} s",
        bytes as f64 / (1024.0 * 1024.0),
        started.elapsed().as_secs_f64()
    );
    Ok(path)
}

/// Plans and instantiates a transform of `factory` from a YAML `config`, reading one
/// stream of `schema`, as a pipeline does.
pub fn transform(
    factory: &dyn OperatorFactory,
    config: &str,
    schema: SchemaRef,
) -> Result<Box<dyn Transform>> {
    windowed_transform(
        factory,
        config,
        schema,
        None,
        &OperatorMetrics::detached("bench", factory.kind()),
    )
}

/// [`transform`] with a window over the stream's `ts` event-time column, reporting into
/// `metrics`.
pub fn windowed_transform(
    factory: &dyn OperatorFactory,
    config: &str,
    schema: SchemaRef,
    window: Option<WindowSpec>,
    metrics: &OperatorMetrics,
) -> Result<Box<dyn Transform>> {
    let config = weir_pipelines::parse_yaml(config).context("the config is YAML")?;
    let inputs = [InputStream {
        name: "readings".into(),
        stream: StreamInfo {
            schema,
            event_time: window.map(|_| "ts".to_owned()),
        },
    }];
    let node = NodeContext {
        pipeline: "bench",
        name: factory.kind(),
        role: Role::Transform,
        config: &config,
        config_path: "transforms.bench.config",
        inputs: &inputs,
        inputs_known: true,
        schema: None,
        event_time: None,
        window,
        on_error: weir_engine::registry::OnError::Fail,
        base_dir: Path::new("."),
        peers: &[],
    };
    let planned = factory
        .plan(&node)
        .map_err(|errors| anyhow::anyhow!("invalid config: {errors:?}"))?;
    match planned.instantiate(metrics)? {
        OperatorInstance::Transform(transform) => Ok(transform),
        _ => bail!("{} is not a transform", factory.kind()),
    }
}

/// Readings as the benches feed them: `device`, `ts` (ms) and one float64 column `value`.
pub fn readings_schema(value: &str) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device", DataType::Utf8, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new(value, DataType::Float64, false),
    ]))
}

/// A whole number from the environment, or `default` when unset or empty.
pub fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => {
            text.trim().replace('_', "").parse().with_context(|| {
                format!("{name} must be a whole number, e.g. 5000000; got '{text}'")
            })
        }
        _ => Ok(default),
    }
}
