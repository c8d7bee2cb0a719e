//! What a tap costs: W1 with the local API serving, without and then with a live tap
//! on its `readings` source read as fast as it comes by another thread on another CPU.
//! Runs alternate (plain, tapped, plain, tapped, …) so both see the same machine, and
//! the best wall time of each counts. Enabled with `W1_TAP=1`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;

/// The best wall times without and with a tap, and the rows the tap read.
pub struct TapFigures {
    /// Best wall time with the API serving but nothing tapped.
    pub plain: Duration,
    /// Best wall time with a tap open on `readings`.
    pub tapped: Duration,
    /// Bytes the tap delivered in its best run.
    pub tap_bytes: usize,
}

/// Runs W1 `runs` times each way, alternating.
pub fn measure(
    weir: &Path,
    pipeline: &Path,
    input: &Path,
    output: &Path,
    runs: u32,
) -> Result<TapFigures> {
    let mut plain: Option<Duration> = None;
    let mut tapped: Option<(Duration, usize)> = None;
    for run in 1..=runs {
        for tap in [false, true] {
            eprintln!(
                "w1: tap run {run}/{runs} {} ...",
                if tap { "with a tap" } else { "without a tap" }
            );
            let (wall, bytes) = run_once(weir, pipeline, input, output, tap)?;
            if tap {
                if tapped.is_none_or(|(best, _)| wall < best) {
                    tapped = Some((wall, bytes));
                }
            } else if plain.is_none_or(|best| wall < best) {
                plain = Some(wall);
            }
        }
    }
    let (plain, (tapped, tap_bytes)) = (plain.context("no run")?, tapped.context("no run")?);
    Ok(TapFigures {
        plain,
        tapped,
        tap_bytes,
    })
}

fn run_once(
    weir: &Path,
    pipeline: &Path,
    input: &Path,
    output: &Path,
    tap: bool,
) -> Result<(Duration, usize)> {
    let _ = std::fs::remove_file(output);
    let started = Instant::now();
    let mut child = Command::new(weir)
        .args([
            "--threads",
            "1",
            "run",
            "--metrics-addr",
            "127.0.0.1:0",
            "--progress-interval",
            "0s",
        ])
        .arg(pipeline)
        .env("W1_INPUT", input)
        .env("W1_OUTPUT", output)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", weir.display()))?;
    let stderr = child.stderr.take().context("stderr is piped")?;
    let (addr_tx, addr_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("metrics: listening on http://").nth(1) {
                let addr = rest.split('/').next().unwrap_or_default().to_owned();
                let _ = addr_tx.send(addr);
            }
        }
    });
    let reader = if tap {
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .context("weir did not announce its API address")?;
        Some(std::thread::spawn(move || read_tap(&addr)))
    } else {
        None
    };
    let status = child.wait().context("cannot wait for weir")?;
    let wall = started.elapsed();
    if !status.success() {
        bail!("weir failed ({status})");
    }
    let bytes = match reader {
        Some(reader) => reader
            .join()
            .map_err(|_| anyhow::anyhow!("the tap reader panicked"))??,
        None => 0,
    };
    Ok((wall, bytes))
}

/// Opens a tap on `readings` at the highest rate and reads it to the end, from CPU 1.
fn read_tap(addr: &str) -> Result<usize> {
    let mut other = CpuSet::new();
    if other
        .set(1)
        .and_then(|()| sched_setaffinity(Pid::from_raw(0), &other))
        .is_err()
    {
        eprintln!("warning: the tap reader shares CPU 0 with weir");
    }
    // The API is up before the pipeline is registered: ask until the node is there.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = TcpStream::connect(addr).context("cannot reach weir's API")?;
        write!(
            stream,
            "GET /api/v1/tap/readings?rate=1000 HTTP/1.0\r\nHost: {addr}\r\n\r\n"
        )?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        if head.ends_with(b"200") {
            let mut body = Vec::new();
            let _ = stream.read_to_end(&mut body);
            return Ok(body.len());
        }
        if Instant::now() > deadline {
            bail!("the tap was refused: {}", String::from_utf8_lossy(&head));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
