//! W1, Weir's yardstick: per-device 10 s window aggregates over 5 million JSON readings.
//!
//! `cargo bench --bench w1` builds the release `weir`, generates the input under
//! `target/w1/` (once; later runs reuse it), pins itself and its children to CPU 0, and in
//! one run measures the floor (a hand-written single-threaded loop, `reference.rs`) and
//! `weir --threads 1 run benches/w1/pipeline.yaml` as a child process: wall time, CPU time
//! and peak RSS of the child, and the binary's size. It then checks that Weir's output
//! equals the floor's and judges the figures against W1's targets. See `README.md` here.
//!
//! Under `cargo test` (no `--bench` argument) it runs as a quick smoke check on a small
//! input and does not judge figures, since the binary is then a debug build.

// `cargo check/clippy --all-targets` builds this harness-less target with cfg(test), which
// keeps the shared modules' unit-test helpers but drops the tests that use them.
#[cfg_attr(test, allow(dead_code, unused_imports))]
mod checkpoints;
#[cfg_attr(test, allow(dead_code, unused_imports))]
mod cores;
#[cfg_attr(test, allow(dead_code, unused_imports))]
mod data;
#[cfg_attr(test, allow(dead_code, unused_imports))]
mod figures;
#[cfg_attr(test, allow(dead_code, unused_imports))]
mod reference;
#[path = "../support.rs"]
#[allow(dead_code)]
mod support;
#[cfg_attr(test, allow(dead_code, unused_imports))]
mod tap;

use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::resource::{UsageWho, getrusage};

use data::W1Spec;
use figures::{elf_loadable_bytes, thousands};
use reference::{REL_TOLERANCE, WINDOW_MS, WindowRow};
use support::{ensure_input, env_u64, pin_to_cpu0, target_dir};

/// W1's targets. Throughput is per core: everything runs pinned to one CPU.
const TARGET_EVENTS_PER_S: f64 = 1_000_000.0;
/// Weir must reach this share of the hand-written floor's throughput, on one core.
const TARGET_FLOOR_RATIO: f64 = 0.75;
/// Peak resident memory of the `weir` process, in MiB.
const TARGET_RSS_MIB: f64 = 150.0;
/// Lines generated when running under `cargo test` rather than `cargo bench`.
const SMOKE_LINES: u64 = 50_000;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("w1: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the environment asks for.
struct Options {
    /// `W1_LINES`: input size.
    lines: u64,
    /// `W1_RUNS`: each side runs this many times and its best wall time counts.
    runs: u32,
    /// `W1_SKIP_FLOOR`: do not time the floor (its last output is still used for the check).
    skip_floor: bool,
    /// `W1_SHUFFLE_MS`: shuffle the input within this much event time.
    shuffle_ms: u64,
    /// `W1_STRICT`: exit non-zero when a target is missed, not only when outputs differ.
    strict: bool,
    /// `W1_TAP`: also time W1 with and without a live tap on its source.
    tap: bool,
    /// `W1_CHECKPOINTS`: also time W1 with checkpoints off and every second, and its
    /// recovery after a `kill -9`.
    checkpoints: bool,
    /// True under `cargo bench`; figures are judged only then.
    judged: bool,
}

impl Options {
    fn from_env() -> Result<Self> {
        // Cargo passes `--bench` to harness-less benchmarks only under `cargo bench`.
        let judged = std::env::args().any(|arg| arg == "--bench");
        let default_lines = if judged { 5_000_000 } else { SMOKE_LINES };
        let runs = env_u64("W1_RUNS", 1)?;
        if runs == 0 {
            bail!("W1_RUNS must be at least 1");
        }
        Ok(Options {
            lines: env_u64("W1_LINES", default_lines)?,
            runs: u32::try_from(runs).context("W1_RUNS is too large")?,
            skip_floor: env_flag("W1_SKIP_FLOOR"),
            shuffle_ms: env_u64("W1_SHUFFLE_MS", 0)?,
            strict: env_flag("W1_STRICT"),
            tap: env_flag("W1_TAP"),
            checkpoints: env_flag("W1_CHECKPOINTS"),
            judged,
        })
    }
}

/// True when the variable is set to anything but empty, `0` or `false`.
fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// The figures of one side's best run.
struct Measured {
    /// Best wall time.
    wall: Duration,
    /// User + system CPU time of the best run.
    cpu: Duration,
}

fn run() -> Result<ExitCode> {
    let options = Options::from_env()?;
    let weir = PathBuf::from(env!("CARGO_BIN_EXE_weir"));
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/w1/pipeline.yaml");
    let work = target_dir(&weir).join("w1");
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;

    // Counted before pinning, which hides the other CPUs from this process.
    let machine_cores = std::thread::available_parallelism().map_or(1, usize::from);
    let pinned = pin_to_cpu0();
    let spec = W1Spec {
        lines: options.lines,
        shuffle_within_ms: options.shuffle_ms,
        ..W1Spec::default()
    };
    let input = ensure_input(&work, &spec)?;
    let stem = input
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("w1")
        .to_owned();
    let floor_out = work.join(format!("{stem}.floor.jsonl"));
    let weir_out = work.join(format!("{stem}.weir.jsonl"));

    let floor = if options.skip_floor {
        None
    } else {
        Some(measure_floor(&input, &floor_out, options.runs)?)
    };
    let (weir_run, peak_rss_kib) = measure_weir(&weir, &pipeline, &input, &weir_out, options.runs)?;
    let binary_bytes = fs::metadata(&weir)
        .with_context(|| format!("cannot stat {}", weir.display()))?
        .len();
    let loadable_bytes = fs::read(&weir)
        .ok()
        .and_then(|elf| elf_loadable_bytes(&elf));
    let check = check_output(&input, &floor_out, &weir_out)?;

    let report = Report {
        options: &options,
        spec: &spec,
        pinned,
        floor: floor.as_ref(),
        weir: &weir_run,
        peak_rss_mib: peak_rss_kib as f64 / 1024.0,
        binary_bytes,
        loadable_bytes,
        check: &check,
    };
    let (table, mut targets_met) = report.render();
    print!("{table}");
    let by_cores = cores::measure(
        &weir,
        &pipeline,
        &input,
        &floor_out,
        &work,
        options.runs,
        machine_cores,
    )?;
    let (table, cores_met) = cores::render(
        &by_cores,
        spec.lines,
        floor.as_ref().map(|f| f.wall),
        weir_run.wall,
        options.judged,
    );
    print!("{table}");
    targets_met &= cores_met;
    if let Some(row) = by_cores
        .rows
        .iter()
        .find(|row| matches!(row.check, Check::Failed(_)))
    {
        eprintln!(
            "w1: error: the output of {} on {} core(s) differs from the floor's",
            row.tool, row.cores
        );
        return Ok(ExitCode::FAILURE);
    }
    if options.tap {
        let figures = tap::measure(&weir, &pipeline, &input, &weir_out, options.runs)?;
        let slower = figures.tapped.as_secs_f64() / figures.plain.as_secs_f64() - 1.0;
        println!(
            "{:<22} {:>14.3} s without, {:.3} s with a tap ({:+.1}%, target < +5%); the tap \
             read {} bytes",
            "tap overhead",
            figures.plain.as_secs_f64(),
            figures.tapped.as_secs_f64(),
            slower * 100.0,
            thousands(figures.tap_bytes as u64)
        );
    }

    if options.checkpoints {
        let figures =
            checkpoints::measure(&weir, &pipeline, &input, &weir_out, &work, options.runs)?;
        let slower = figures.every_second.as_secs_f64() / figures.off.as_secs_f64() - 1.0;
        println!(
            "{:<22} {:>14.3} s off, {:.3} s every 1s ({:+.1}%, target at most +10%)",
            "checkpoint overhead",
            figures.off.as_secs_f64(),
            figures.every_second.as_secs_f64(),
            slower * 100.0
        );
        println!(
            "{:<22} {:>14} taken, {:.1} ms mean, {:.1} ms longest, {} bytes mean",
            "checkpoints",
            figures.completed,
            figures.mean_ms,
            figures.max_ms,
            thousands(figures.mean_bytes as u64)
        );
        println!(
            "{:<22} {:>14.3} s from restart to the restored pipeline running (epoch {}), \
             {:.3} s to the end",
            "recovery after kill -9",
            figures.restore.as_secs_f64(),
            figures.resumed_epoch,
            figures.rest_of_run.as_secs_f64()
        );
        match check_output(&input, &floor_out, &weir_out)? {
            Check::Failed(mismatch) => {
                eprintln!(
                    "w1: error: after a kill -9 and a restart, weir's output {} differs from the floor's: {mismatch}",
                    weir_out.display()
                );
                return Ok(ExitCode::FAILURE);
            }
            Check::Passed(rows) => println!(
                "{:<22} {:>14} rows after the kill and restart, equal to the floor's",
                "recovered output", rows
            ),
            Check::Skipped => {}
        }
    }

    if let Check::Failed(mismatch) = &check {
        eprintln!(
            "w1: error: weir's output {} differs from the floor's {}: {mismatch}",
            weir_out.display(),
            floor_out.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    if options.strict && options.judged && !targets_met {
        eprintln!("w1: error: targets missed (W1_STRICT is set)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Times the hand-written loop, end to end: read, parse, aggregate, write.
fn measure_floor(input: &Path, output: &Path, runs: u32) -> Result<Measured> {
    let mut best: Option<Measured> = None;
    for run in 1..=runs {
        eprintln!("w1: floor run {run}/{runs} ...");
        // The floor runs on this (only) thread, so our own CPU time is the floor's.
        let before = getrusage(UsageWho::RUSAGE_SELF).context("getrusage failed")?;
        let started = Instant::now();
        let rows = reference::aggregate_file(input, WINDOW_MS)?;
        let file =
            File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
        reference::write_rows(&rows, file)
            .with_context(|| format!("cannot write {}", output.display()))?;
        let wall = started.elapsed();
        let after = getrusage(UsageWho::RUSAGE_SELF).context("getrusage failed")?;
        let cpu = cpu_time(&after).saturating_sub(cpu_time(&before));
        if best.as_ref().is_none_or(|b| wall < b.wall) {
            best = Some(Measured { wall, cpu });
        }
    }
    // `runs >= 1` is checked when options are read.
    best.context("no floor run was made")
}

/// Runs `weir --threads 1 run --no-metrics pipeline.yaml` `runs` times; returns the best
/// run and the peak RSS (KiB) of all runs.
fn measure_weir(
    weir: &Path,
    pipeline: &Path,
    input: &Path,
    output: &Path,
    runs: u32,
) -> Result<(Measured, i64)> {
    let mut best: Option<Measured> = None;
    for run in 1..=runs {
        eprintln!("w1: weir run {run}/{runs} ...");
        let before = getrusage(UsageWho::RUSAGE_CHILDREN).context("getrusage failed")?;
        let wall = run_weir(weir, pipeline, input, output, 1)?;
        let after = getrusage(UsageWho::RUSAGE_CHILDREN).context("getrusage failed")?;
        let cpu = cpu_time(&after).saturating_sub(cpu_time(&before));
        if best.as_ref().is_none_or(|b| wall < b.wall) {
            best = Some(Measured { wall, cpu });
        }
    }
    let peak_rss_kib = getrusage(UsageWho::RUSAGE_CHILDREN)
        .context("getrusage failed")?
        .max_rss();
    // `runs >= 1` is checked when options are read.
    let best = best.context("no weir run was made")?;
    Ok((best, peak_rss_kib))
}

/// Runs `weir --threads N run --no-metrics pipeline.yaml` once, writing `output` afresh;
/// returns the wall time of the whole process.
fn run_weir(
    weir: &Path,
    pipeline: &Path,
    input: &Path,
    output: &Path,
    threads: usize,
) -> Result<Duration> {
    // The sink must start from nothing: a leftover file would hide a run that wrote none.
    remove_output(output)?;
    let started = Instant::now();
    let status = Command::new(weir)
        .args(["--threads", &threads.to_string(), "run", "--no-metrics"])
        .arg(pipeline)
        .env("W1_INPUT", input)
        .env("W1_OUTPUT", output)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start {}", weir.display()))?;
    let wall = started.elapsed();
    if !status.success() {
        bail!(
            "`{} --threads {threads} run --no-metrics {}` failed ({status}); its messages are above",
            weir.display(),
            pipeline.display()
        );
    }
    Ok(wall)
}

/// Removes a run's output file, if there is one.
fn remove_output(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context(format!("cannot remove {}", path.display())),
    }
}

/// User plus system time of an rusage record.
fn cpu_time(usage: &nix::sys::resource::Usage) -> Duration {
    let micros = |tv: nix::sys::time::TimeVal| {
        let total = i128::from(tv.tv_sec()) * 1_000_000 + i128::from(tv.tv_usec());
        Duration::from_micros(u64::try_from(total).unwrap_or(0))
    };
    micros(usage.user_time()) + micros(usage.system_time())
}

/// The outcome of comparing Weir's output with the floor's.
enum Check {
    /// Same rows; holds how many.
    Passed(usize),
    /// The floor was skipped and no earlier floor output for this input exists.
    Skipped,
    /// The outputs differ.
    Failed(reference::Mismatch),
}

fn check_output(input: &Path, floor_out: &Path, weir_out: &Path) -> Result<Check> {
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    // A floor output older than the input belongs to an earlier input of the same name.
    let floor_fresh = match (modified(floor_out), modified(input)) {
        (Some(floor), Some(input)) => floor >= input,
        _ => false,
    };
    if !floor_fresh {
        return Ok(Check::Skipped);
    }
    let expected: Vec<WindowRow> = reference::read_rows_file(floor_out)?;
    let actual = reference::read_rows_file(weir_out)?;
    if expected.is_empty() {
        bail!("the floor produced no rows from {}", input.display());
    }
    Ok(
        match reference::compare(&expected, &actual, REL_TOLERANCE) {
            Ok(()) => Check::Passed(expected.len()),
            Err(mismatch) => Check::Failed(mismatch),
        },
    )
}

/// Everything the table shows.
struct Report<'a> {
    options: &'a Options,
    spec: &'a W1Spec,
    pinned: bool,
    floor: Option<&'a Measured>,
    weir: &'a Measured,
    peak_rss_mib: f64,
    binary_bytes: u64,
    loadable_bytes: Option<u64>,
    check: &'a Check,
}

impl Report<'_> {
    /// The table, and whether every judged target was met.
    fn render(&self) -> (String, bool) {
        let lines = self.spec.lines as f64;
        let weir_eps = lines / self.weir.wall.as_secs_f64();
        let floor_eps = self.floor.map(|f| lines / f.wall.as_secs_f64());
        let ratio = floor_eps.map(|floor| weir_eps / floor);
        let mut all_met = true;
        let mut verdict = |met: Option<bool>| match (self.options.judged, met) {
            (false, _) => "n/a".to_owned(),
            (true, None) => "-".to_owned(),
            (true, Some(true)) => "PASS".to_owned(),
            (true, Some(false)) => {
                all_met = false;
                "FAIL".to_owned()
            }
        };
        let eps_verdict = verdict(Some(weir_eps >= TARGET_EVENTS_PER_S));
        let ratio_verdict = verdict(ratio.map(|r| r >= TARGET_FLOOR_RATIO));
        let rss_verdict = verdict(Some(self.peak_rss_mib < TARGET_RSS_MIB));

        let mut t = String::new();
        let order = if self.spec.shuffle_within_ms == 0 {
            "in order".to_owned()
        } else {
            format!("shuffled within {} ms", self.spec.shuffle_within_ms)
        };
        let _ = writeln!(
            t,
            "\nW1: {} events ({} devices x {}/s, {} ms tumbling windows, {order}), \
             best of {} run(s), {}",
            thousands(self.spec.lines),
            self.spec.devices,
            self.spec.readings_per_device_per_second,
            WINDOW_MS,
            self.options.runs,
            if self.pinned {
                "pinned to CPU 0"
            } else {
                "NOT pinned"
            }
        );
        let _ = writeln!(
            t,
            "{:<22} {:>14} {:>14} {:>14}  verdict",
            "figure", "weir", "floor", "target"
        );
        let dash = || "-".to_owned();
        let mut row = |name: &str, weir: String, floor: String, target: &str, verdict: &str| {
            let _ = writeln!(
                t,
                "{name:<22} {weir:>14} {floor:>14} {target:>14}  {verdict}"
            );
        };
        row(
            "events/s",
            thousands(weir_eps.round() as u64),
            floor_eps.map_or_else(dash, |f| thousands(f.round() as u64)),
            ">= 1,000,000",
            &eps_verdict,
        );
        row(
            "wall s",
            format!("{:.3}", self.weir.wall.as_secs_f64()),
            self.floor
                .map_or_else(dash, |f| format!("{:.3}", f.wall.as_secs_f64())),
            "",
            "",
        );
        row(
            "CPU s",
            format!("{:.3}", self.weir.cpu.as_secs_f64()),
            self.floor
                .map_or_else(dash, |f| format!("{:.3}", f.cpu.as_secs_f64())),
            "",
            "",
        );
        row(
            "peak RSS MiB",
            format!("{:.1}", self.peak_rss_mib),
            dash(),
            "< 150",
            &rss_verdict,
        );
        row(
            "binary MiB",
            format!("{:.1}", self.binary_bytes as f64 / (1024.0 * 1024.0)),
            dash(),
            "",
            &format!("({} bytes)", thousands(self.binary_bytes)),
        );
        row(
            "  loaded (stripped) MiB",
            self.loadable_bytes
                .map_or_else(dash, |b| format!("{:.1}", b as f64 / (1024.0 * 1024.0))),
            dash(),
            "",
            "",
        );
        row(
            "weir/floor throughput",
            ratio.map_or_else(dash, |r| format!("{:.1}%", r * 100.0)),
            dash(),
            ">= 75%",
            &ratio_verdict,
        );
        let check = match self.check {
            Check::Passed(rows) => {
                format!("PASS ({rows} rows equal, floats within {REL_TOLERANCE:e} relative)")
            }
            Check::Skipped => "SKIPPED (W1_SKIP_FLOOR and no earlier floor output)".to_owned(),
            Check::Failed(m) => format!(
                "FAIL ({} missing, {} unexpected, {} duplicated, {} different)",
                m.missing, m.unexpected, m.duplicated, m.different
            ),
        };
        let _ = writeln!(t, "{:<22} {check}", "output check");
        if !self.options.judged {
            let _ = writeln!(
                t,
                "(smoke run: targets are judged only under `cargo bench --bench w1`)"
            );
        }
        (t, all_met)
    }
}
