//! W1 by core count: Weir beside DuckDB on one core and on two, in the same run as the
//! floor, each output checked against the floor's.
//!
//! DuckDB runs through `duckdb_w1.py` when Python can import `duckdb` (`pip install
//! duckdb`); its time is the query's own, from connecting to the output being written,
//! without Python's start-up, while Weir's is its whole process. The one-core runs stay
//! pinned to CPU 0 as the rest of the benchmark is; the two-core runs are allowed CPUs 0
//! and 1, and Weir runs with `--threads 2`, so `parallelism: auto` makes two instances.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::support::allow_cpus;
use super::{Check, TARGET_FLOOR_RATIO, check_output, remove_output, run_weir};
use anyhow::{Context, Result, bail};

/// One tool at one core count, best of the runs.
pub struct Row {
    pub tool: &'static str,
    pub cores: usize,
    pub wall: Duration,
    pub check: Check,
}

/// What was measured, and why DuckDB was not, when it was not.
pub struct Figures {
    pub rows: Vec<Row>,
    pub duckdb_missing: Option<String>,
}

impl Figures {
    /// The best wall time of `tool` on `cores`.
    pub fn wall(&self, tool: &str, cores: usize) -> Option<Duration> {
        self.rows
            .iter()
            .find(|row| row.tool == tool && row.cores == cores)
            .map(|row| row.wall)
    }
}

pub const DUCKDB: &str = "DuckDB";
pub const WEIR: &str = "weir";

/// Runs DuckDB on one core, then Weir and DuckDB on two (when this machine has two),
/// alternating `runs` times.
pub fn measure(
    weir: &Path,
    pipeline: &Path,
    input: &Path,
    floor_out: &Path,
    work: &Path,
    runs: u32,
    machine_cores: usize,
) -> Result<Figures> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/w1/duckdb_w1.py");
    let duckdb_missing = duckdb_missing();
    let mut contenders: Vec<(&'static str, usize)> = Vec::new();
    if duckdb_missing.is_none() {
        contenders.push((DUCKDB, 1));
    }
    if machine_cores >= 2 {
        contenders.push((WEIR, 2));
        if duckdb_missing.is_none() {
            contenders.push((DUCKDB, 2));
        }
    }
    let mut best: Vec<Option<Duration>> = vec![None; contenders.len()];
    for run in 1..=runs {
        for (index, &(tool, cores)) in contenders.iter().enumerate() {
            eprintln!("w1: {tool} on {cores} core(s), run {run}/{runs} ...");
            let output = out_path(work, input, tool, cores);
            remove_output(&output)?;
            allow_cpus(cores)?;
            let wall = match tool {
                DUCKDB => run_duckdb(&script, input, &output, cores),
                _ => run_weir(weir, pipeline, input, &output, cores),
            };
            allow_cpus(1)?;
            let wall = wall?;
            if best[index].is_none_or(|b| wall < b) {
                best[index] = Some(wall);
            }
        }
    }
    let mut rows = Vec::with_capacity(contenders.len());
    for (&(tool, cores), wall) in contenders.iter().zip(best) {
        let output = out_path(work, input, tool, cores);
        rows.push(Row {
            tool,
            cores,
            wall: wall.context("no run was made")?,
            check: check_output(input, floor_out, &output)?,
        });
    }
    Ok(Figures {
        rows,
        duckdb_missing,
    })
}

/// Why DuckDB cannot run here, or `None` when it can.
fn duckdb_missing() -> Option<String> {
    let probe = Command::new("python3")
        .args(["-c", "import duckdb"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match probe {
        Ok(status) if status.success() => None,
        Ok(_) => Some("python3 cannot import duckdb (pip install duckdb)".into()),
        Err(error) => Some(format!("cannot run python3: {error}")),
    }
}

fn out_path(work: &Path, input: &Path, tool: &str, cores: usize) -> std::path::PathBuf {
    let stem = input.file_stem().and_then(|s| s.to_str()).unwrap_or("w1");
    work.join(format!("{stem}.{}-{cores}core.jsonl", tool.to_lowercase()))
}

/// The query time `duckdb_w1.py` reports.
fn run_duckdb(script: &Path, input: &Path, output: &Path, threads: usize) -> Result<Duration> {
    let result = Command::new("python3")
        .arg(script)
        .arg(input)
        .arg(output)
        .arg(threads.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot start python3")?;
    let stdout = String::from_utf8_lossy(&result.stdout);
    if !result.status.success() {
        bail!("duckdb_w1.py failed ({}): {stdout}", result.status);
    }
    let seconds: f64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("seconds="))
        .context("duckdb_w1.py printed no time")?
        .trim()
        .parse()
        .context("duckdb_w1.py printed a time that is not a number")?;
    Ok(Duration::from_secs_f64(seconds))
}

/// The table of events/s per tool and core count, and whether the parallelism targets
/// were met: Weir on one core at least 75% of the floor's throughput and at least as
/// fast as DuckDB on one thread, and Weir on two cores at least as fast as DuckDB on two.
pub fn render(
    figures: &Figures,
    lines: u64,
    floor: Option<Duration>,
    weir_one_core: Duration,
    judged: bool,
) -> (String, bool) {
    use std::fmt::Write as _;
    let events = |wall: Duration| lines as f64 / wall.as_secs_f64();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nW1 by core count (each output checked against the floor's)"
    );
    let _ = writeln!(
        t,
        "{:<34} {:>5} {:>9} {:>12} {:>9}",
        "tool", "cores", "wall s", "events/s", "vs floor"
    );
    let mut line = |tool: &str, cores: usize, wall: Duration, check: &str| {
        let share = floor.map_or_else(
            || "-".to_owned(),
            |floor| format!("{:.0}%", floor.as_secs_f64() / wall.as_secs_f64() * 100.0),
        );
        let _ = writeln!(
            t,
            "{tool:<34} {cores:>5} {:>9.3} {:>12} {share:>9}  {check}",
            wall.as_secs_f64(),
            crate::figures::thousands(events(wall).round() as u64)
        );
    };
    if let Some(floor) = floor {
        line("floor (hand-written loop)", 1, floor, "");
    }
    line("weir --threads 1", 1, weir_one_core, "");
    for row in &figures.rows {
        let name = match (row.tool, row.cores) {
            (DUCKDB, 1) => "DuckDB, 1 thread (query time)".to_owned(),
            (DUCKDB, n) => format!("DuckDB, {n} threads (query time)"),
            (_, n) => format!("weir --threads {n}, parallelism auto"),
        };
        let check = match &row.check {
            Check::Passed(_) => "output equal",
            Check::Skipped => "output not checked",
            Check::Failed(_) => "OUTPUT DIFFERS",
        };
        line(&name, row.cores, row.wall, check);
    }
    if let Some(why) = &figures.duckdb_missing {
        let _ = writeln!(t, "DuckDB not run: {why}");
    }
    let mut all_met = true;
    let mut judge = |what: &str, met: Option<bool>| {
        let verdict = match (judged, met) {
            (false, _) => "n/a",
            (true, None) => "-",
            (true, Some(true)) => "PASS",
            (true, Some(false)) => {
                all_met = false;
                "FAIL"
            }
        };
        let _ = writeln!(t, "{what:<60} {verdict}");
    };
    judge(
        "weir on 1 core >= 75% of the floor's events/s",
        floor.map(|floor| floor.as_secs_f64() / weir_one_core.as_secs_f64() >= TARGET_FLOOR_RATIO),
    );
    judge(
        "weir on 1 core at least as fast as DuckDB on 1 thread",
        figures.wall(DUCKDB, 1).map(|duck| weir_one_core <= duck),
    );
    judge(
        "weir on 2 cores at least as fast as DuckDB on 2 threads",
        figures
            .wall(WEIR, 2)
            .zip(figures.wall(DUCKDB, 2))
            .map(|(weir, duck)| weir <= duck),
    );
    (t, all_met)
}
