//! What checkpoints cost: W1 with `checkpoint.interval` 0s (off) and 1s, alternating
//! `W1_RUNS` times each way so both see the same machine, the best wall time of each
//! counting; the checkpoints' duration and size as the runtime logs them; and recovery
//! after a `kill -9`: a run killed once it has completed a checkpoint, restarted, and
//! timed from its restart to the restored pipeline starting and to its end. The killed
//! run's output must still equal the floor's. Enabled with `W1_CHECKPOINTS=1`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The figures of the comparison.
pub struct CheckpointFigures {
    /// Best wall time with checkpoints off.
    pub off: Duration,
    /// Best wall time with a checkpoint every second.
    pub every_second: Duration,
    /// Checkpoints completed in that best run, with their mean and longest duration
    /// and mean size in bytes.
    pub completed: usize,
    pub mean_ms: f64,
    pub max_ms: f64,
    pub mean_bytes: f64,
    /// The killed run's restart: to the restored pipeline starting, and to its end.
    pub restore: Duration,
    pub rest_of_run: Duration,
    /// The epoch it resumed from.
    pub resumed_epoch: u64,
}

/// A logged checkpoint: its duration (ms) and bytes written.
type Logged = (f64, f64);

/// Runs the comparison and the recovery; `output` is left holding the killed and
/// resumed run's output, for the caller to check against the floor's.
pub fn measure(
    weir: &Path,
    pipeline: &Path,
    input: &Path,
    output: &Path,
    work: &Path,
    runs: u32,
) -> Result<CheckpointFigures> {
    let mut off: Option<Duration> = None;
    let mut on: Option<(Duration, Vec<Logged>)> = None;
    for run in 1..=runs {
        for interval in ["0s", "1s"] {
            eprintln!("w1: checkpoint run {run}/{runs} with interval {interval} ...");
            let state = work.join(format!("state-{interval}"));
            let _ = std::fs::remove_dir_all(&state);
            let _ = std::fs::remove_file(output);
            let started = Instant::now();
            let mut child = spawn(weir, pipeline, input, output, &state, interval)?;
            let lines = lines_of(&mut child)?;
            let logged: Vec<Logged> = lines.iter().filter_map(|line| checkpoint(line)).collect();
            let status = child.wait().context("cannot wait for weir")?;
            let wall = started.elapsed();
            if !status.success() {
                bail!("weir failed ({status}) with checkpoint interval {interval}");
            }
            if interval == "0s" {
                off = Some(off.map_or(wall, |best| best.min(wall)));
            } else if on.as_ref().is_none_or(|(best, _)| wall < *best) {
                on = Some((wall, logged));
            }
        }
    }
    let (off, (every_second, logged)) = (off.context("no run")?, on.context("no run")?);
    let durations: Vec<f64> = logged.iter().map(|(ms, _)| *ms).collect();
    let completed = logged.len();
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len().max(1) as f64;
    let sizes: Vec<f64> = logged.iter().map(|(_, bytes)| *bytes).collect();

    eprintln!(
        "w1: checkpoint recovery: a run killed after its first checkpoint, then restarted ..."
    );
    let state = work.join("state-recovery");
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(output);
    let mut child = spawn(weir, pipeline, input, output, &state, "1s")?;
    let lines = stream_lines(&mut child)?;
    let mut complete = 0;
    while complete < 1 {
        let line = lines
            .recv_timeout(Duration::from_secs(120))
            .context("the run ended before a checkpoint completed: use more W1_LINES")?;
        complete += usize::from(checkpoint(&line).is_some());
    }
    child.kill().context("kill -9")?;
    child.wait().context("cannot reap the killed weir")?;
    let restarted = Instant::now();
    let mut child = spawn(weir, pipeline, input, output, &state, "1s")?;
    let lines = stream_lines(&mut child)?;
    let mut resumed_epoch = 0;
    let restore = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(120))
            .context("the restarted run never started its pipeline")?;
        if let Some(epoch) = field(&line, "epoch").filter(|_| line.contains("resuming from")) {
            resumed_epoch = epoch as u64;
        }
        if line.contains("pipeline started") {
            break restarted.elapsed();
        }
    };
    let status = child.wait().context("cannot wait for weir")?;
    let rest_of_run = restarted.elapsed();
    if !status.success() {
        bail!("the restarted weir failed ({status})");
    }
    if resumed_epoch == 0 {
        bail!("the restarted run did not resume from a checkpoint");
    }
    Ok(CheckpointFigures {
        off,
        every_second,
        completed,
        mean_ms: mean(&durations),
        max_ms: durations.iter().copied().fold(0.0, f64::max),
        mean_bytes: mean(&sizes),
        restore,
        rest_of_run,
        resumed_epoch,
    })
}

fn spawn(
    weir: &Path,
    pipeline: &Path,
    input: &Path,
    output: &Path,
    state: &Path,
    interval: &str,
) -> Result<Child> {
    Command::new(weir)
        .args(["--threads", "1", "run", "--no-metrics", "--state-dir"])
        .arg(state)
        .arg(pipeline)
        .env("W1_INPUT", input)
        .env("W1_OUTPUT", output)
        .env("W1_CHECKPOINT_INTERVAL", interval)
        .env("RUST_LOG", "info,weir_engine::checkpoint=debug")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", weir.display()))
}

/// Every line the child logs, once it has closed its stderr.
fn lines_of(child: &mut Child) -> Result<Vec<String>> {
    let stderr = child.stderr.take().context("stderr is piped")?;
    Ok(BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .collect())
}

/// The child's log lines as they come.
fn stream_lines(child: &mut Child) -> Result<mpsc::Receiver<String>> {
    let stderr = child.stderr.take().context("stderr is piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// (duration ms, bytes) of a "checkpoint complete" log line.
fn checkpoint(line: &str) -> Option<Logged> {
    if !line.contains("checkpoint complete") {
        return None;
    }
    Some((field(line, "took_ms")?, field(line, "bytes")?))
}

/// The number logged as `name=N` in `line`.
fn field(line: &str, name: &str) -> Option<f64> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    let digits: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().ok()
}
