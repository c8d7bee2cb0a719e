//! MQTT ingest: how many ~100-byte messages per second flow from a publisher through
//! Mosquitto into a Weir pipeline (mqtt -> sql filter -> blackhole), against the same
//! publisher into a plain `mosquitto_sub`, the broker's own ceiling on this machine.
//!
//! `cargo bench --bench mqtt` starts a private Mosquitto on a free loopback port and, for
//! QoS 0 and then QoS 1, runs two plain subscribers (`mosquitto_sub`, and a minimal
//! rumqttc client) and Weir one after the other in one process, so the ratio of Weir's
//! rate to the faster plain subscriber's (the ceiling) is measured under the same
//! conditions. Each side's rate is the
//! message count over the time from the publisher's start to the last message counted by
//! the consumer; CPU time and peak RSS of the consumer process are read from `/proc`
//! while it runs.
//! See `README.md` here. Under `cargo test --benches` it runs a small smoke check.
//!
//! Every MQTT peer runs without Nagle's algorithm (`--nodelay`, as Weir's client and the
//! test broker do), so small acknowledgements are never held back.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weir_testkit::{Broker, free_port};

mod publisher;
mod subscriber;

/// The topic every message is published on.
const TOPIC: &str = "bench/dev-1/telemetry";

/// Weir must reach this share of the broker's ceiling at each QoS.
const TARGET_RATIO: f64 = 0.80;
/// Messages per measured run under `cargo bench`.
const BENCH_MESSAGES: u64 = 400_000;
/// Messages per run under `cargo test --benches`.
const SMOKE_MESSAGES: u64 = 5_000;
/// How long one run may take before it counts as stalled.
const RUN_LIMIT: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    if let Ok(spec) = std::env::var(subscriber::ROLE_VARIABLE) {
        return match subscriber::run(&spec) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("mqtt bench subscriber: error: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("mqtt bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    // Cargo passes `--bench` to harness-less benchmarks only under `cargo bench`.
    let judged = std::env::args().any(|arg| arg == "--bench");
    let messages = match std::env::var("MQTT_BENCH_MESSAGES") {
        Ok(text) => text
            .parse()
            .with_context(|| format!("MQTT_BENCH_MESSAGES={text} is not a count"))?,
        Err(_) if judged => BENCH_MESSAGES,
        Err(_) => SMOKE_MESSAGES,
    };
    let weir = PathBuf::from(env!("CARGO_BIN_EXE_weir"));
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/mqtt/pipeline.yaml");
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    // An unbounded queue and in-flight window as the broker's only tuning: Mosquitto
    // would otherwise drop QoS 0 messages beyond 1000 queued for a slow subscriber.
    let broker = Broker::start(dir.path(), "allow_anonymous true\nmax_queued_messages 0");
    let input = dir.path().join("messages.txt");
    write_messages(&input, messages)?;
    eprintln!(
        "mqtt bench: {messages} messages of {} bytes, broker on port {}",
        message_bytes(),
        broker.port()
    );

    let mut rows = Vec::new();
    for qos in [0u8, 1] {
        let mut plain = Vec::new();
        for consumer in [Plain::MosquittoSub, Plain::Rumqttc] {
            eprintln!("mqtt bench: QoS {qos}: {} ...", consumer.name());
            let measured = measure_plain(consumer, &broker, &input, messages, qos)?;
            eprintln!(
                "mqtt bench: QoS {qos}: {} {:.0} messages/s",
                consumer.name(),
                measured.rate()
            );
            plain.push((consumer.name(), measured));
        }
        eprintln!("mqtt bench: QoS {qos}: weir ...");
        let weir_run = measure_weir(&weir, &pipeline, &broker, &input, messages, qos)?;
        eprintln!(
            "mqtt bench: QoS {qos}: weir {:.0} messages/s",
            weir_run.rate()
        );
        rows.push((qos, plain, weir_run));
    }

    let mut met = true;
    println!();
    println!("| QoS | consumer | messages/s | wall s | CPU s | peak RSS MiB | share of ceiling |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (qos, plain, weir_run) in &rows {
        // The ceiling is the faster of the two plain subscribers.
        let ceiling = plain.iter().map(|(_, m)| m.rate()).fold(f64::MIN, f64::max);
        let ratio = weir_run.rate() / ceiling;
        met &= ratio >= TARGET_RATIO;
        let lines = plain
            .iter()
            .map(|(name, m)| (*name, m))
            .chain([("weir", weir_run)]);
        for (name, m) in lines {
            println!(
                "| {qos} | {name} | {:.0} | {:.3} | {:.2} | {:.1} | {:.1}% |",
                m.rate(),
                m.wall.as_secs_f64(),
                m.cpu_s,
                m.peak_rss_kib as f64 / 1024.0,
                m.rate() / ceiling * 100.0
            );
        }
    }
    println!();
    if judged {
        println!(
            "target: weir >= {:.0}% of the ceiling at QoS 0 and 1: {}",
            TARGET_RATIO * 100.0,
            if met { "met" } else { "MISSED" }
        );
    } else {
        println!("smoke run (debug build, {messages} messages): figures not judged");
    }
    Ok(ExitCode::SUCCESS)
}

/// One consumer's figures for one run.
struct Measured {
    messages: u64,
    wall: Duration,
    cpu_s: f64,
    peak_rss_kib: u64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.wall.as_secs_f64()
    }
}

/// A W1-style reading padded to about 100 bytes.
fn message(i: u64) -> String {
    format!(
        r#"{{"device":"dev-{:04}","ts":{},"temperature":{:.2},"humidity":{:.2},"seq":{i:010}}}"#,
        i % 1000,
        1_767_225_600_000u64 + i,
        20.0 + (i % 97) as f64 / 10.0,
        40.0 + (i % 53) as f64 / 10.0,
    )
}

fn message_bytes() -> usize {
    message(0).len()
}

fn write_messages(path: &Path, count: u64) -> Result<()> {
    let mut out = BufWriter::new(File::create(path)?);
    for i in 0..count {
        writeln!(out, "{}", message(i))?;
    }
    out.flush()?;
    Ok(())
}

/// A subscriber that only receives: what the broker can deliver at most.
#[derive(Clone, Copy)]
enum Plain {
    /// Mosquitto's own C client.
    MosquittoSub,
    /// A minimal rumqttc client, the library Weir uses (`subscriber.rs`).
    Rumqttc,
}

impl Plain {
    fn name(self) -> &'static str {
        match self {
            Plain::MosquittoSub => "mosquitto_sub",
            Plain::Rumqttc => "rumqttc subscriber",
        }
    }

    /// The subscriber process, exiting after `messages` messages on `filter`.
    fn command(self, broker: &Broker, filter: &str, messages: u64, qos: u8) -> Result<Command> {
        let mut command = match self {
            Plain::MosquittoSub => {
                let mut command = Command::new("mosquitto_sub");
                command
                    .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
                    .args(["-q", &qos.to_string(), "-t", filter])
                    .args(["-C", &messages.to_string(), "--nodelay"]);
                command
            }
            Plain::Rumqttc => {
                let mut command = Command::new(std::env::current_exe()?);
                command.env(
                    subscriber::ROLE_VARIABLE,
                    format!("{},{qos},{messages},{filter}", broker.port()),
                );
                command
            }
        };
        command.stdout(Stdio::null());
        Ok(command)
    }
}

/// A plain subscriber: the publisher into it, until it has every message and exits.
fn measure_plain(
    consumer: Plain,
    broker: &Broker,
    input: &Path,
    messages: u64,
    qos: u8,
) -> Result<Measured> {
    let filter = "bench/+/telemetry";
    let before = broker.subscriptions_to(filter);
    let mut subscriber = consumer
        .command(broker, filter, messages, qos)?
        .spawn()
        .with_context(|| format!("{} does not start", consumer.name()))?;
    broker.wait_subscribed(filter, before);
    let started = Instant::now();
    let publisher = publisher::spawn(broker.port(), TOPIC, qos, input)?;
    let mut usage = Usage::default();
    let deadline = started + RUN_LIMIT;
    let status = loop {
        if let Some(status) = subscriber.try_wait()? {
            break status;
        }
        usage.sample(subscriber.id());
        if Instant::now() > deadline {
            let _ = subscriber.kill();
            bail!(
                "{} did not receive {messages} messages in {RUN_LIMIT:?}",
                consumer.name()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = started.elapsed();
    if !status.success() {
        bail!("{} exited with {status}", consumer.name());
    }
    finish(publisher)?;
    Ok(Measured {
        messages,
        wall,
        cpu_s: usage.cpu_s,
        peak_rss_kib: usage.peak_rss_kib,
    })
}

/// Weir: the publisher into `weir run` of the bench pipeline, counted at its sink.
fn measure_weir(
    weir: &Path,
    pipeline: &Path,
    broker: &Broker,
    input: &Path,
    messages: u64,
    qos: u8,
) -> Result<Measured> {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let before = broker.subscriptions_to("bench/+/telemetry");
    let mut child = Command::new(weir)
        .args(["run", "--metrics-addr", &metrics_addr])
        .arg(pipeline)
        .env("MQTT_URL", broker.url())
        .env("MQTT_QOS", qos.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("weir does not start")?;
    let filter = "bench/+/telemetry";
    broker.wait_subscribed(filter, before);
    let started = Instant::now();
    let publisher = publisher::spawn(broker.port(), TOPIC, qos, input)?;
    let mut counted = 0;
    let mut usage = Usage::default();
    let pid = child.id();
    wait_until("weir's sink counts everything", RUN_LIMIT, || {
        usage.sample(pid);
        counted = sink_rows(&metrics_addr).unwrap_or(counted);
        counted >= messages
    })?;
    let wall = started.elapsed();
    usage.sample(pid);
    finish(publisher)?;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait()?;
    if !status.success() {
        bail!("weir exited with {status}");
    }
    Ok(Measured {
        messages,
        wall,
        cpu_s: usage.cpu_s,
        peak_rss_kib: usage.peak_rss_kib,
    })
}

/// Waits for the publisher and checks it published everything.
fn finish(publisher: std::thread::JoinHandle<Result<u64>>) -> Result<()> {
    match publisher.join() {
        Ok(outcome) => outcome.map(|_| ()),
        Err(_) => bail!("the publisher panicked"),
    }
}

/// Rows the bench pipeline's sink has received, from `/metrics`.
fn sink_rows(addr: &str) -> Option<u64> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.lines()
        .find(|line| {
            line.starts_with("weir_operator_rows_in_total{")
                && line.contains(r#"operator="counted""#)
        })
        .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|rows| rows as u64)
}

/// The CPU time and peak RSS of a process, as last read from `/proc` while it ran.
#[derive(Default)]
struct Usage {
    cpu_s: f64,
    peak_rss_kib: u64,
}

impl Usage {
    /// Reads the process's figures again; a process that is gone keeps the last ones.
    fn sample(&mut self, pid: u32) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return;
        };
        // After the command name (which may hold spaces), utime and stime are the 12th
        // and 13th fields.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
            self.cpu_s = (user + system) as f64 / clock_ticks_per_second();
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if let Some(peak) = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        {
            self.peak_rss_kib = self.peak_rss_kib.max(peak);
        }
    }
}

/// The kernel's clock ticks per second for `/proc` CPU times (almost always 100).
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
