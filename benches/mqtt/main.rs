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
//!
//! Then the backlog drain: a persistent session at the broker holds 500,000 queued QoS 1
//! messages (queued while its consumer was away), and the consumer comes back to drain
//! them, once as the plain rumqttc subscriber and once as `weir run` of the same
//! pipeline; the rate is the message count over the time from the consumer's start to
//! its last message.
//!
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

mod subscriber;

/// The topic every message is published on.
const TOPIC: &str = "bench/dev-1/telemetry";

/// Weir must reach this share of the broker's ceiling at each QoS.
const TARGET_RATIO: f64 = 0.80;
/// Messages per measured run under `cargo bench`.
const BENCH_MESSAGES: u64 = 400_000;
/// Messages per run under `cargo test --benches`.
const SMOKE_MESSAGES: u64 = 5_000;
/// Messages queued for the backlog drain under `cargo bench`.
const BACKLOG_MESSAGES: u64 = 500_000;
/// The filter every consumer subscribes to.
const FILTER: &str = "bench/+/telemetry";
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
    let count = |variable: &str, bench: u64| -> Result<u64> {
        match std::env::var(variable) {
            Ok(text) => text
                .parse()
                .with_context(|| format!("{variable}={text} is not a count")),
            Err(_) if judged => Ok(bench),
            Err(_) => Ok(SMOKE_MESSAGES),
        }
    };
    let messages = count("MQTT_BENCH_MESSAGES", BENCH_MESSAGES)?;
    let backlog = count("MQTT_BENCH_BACKLOG", BACKLOG_MESSAGES)?;
    let weir = PathBuf::from(env!("CARGO_BIN_EXE_weir"));
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/mqtt/pipeline.yaml");
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    // An unbounded queue and in-flight window as the broker's only tuning: Mosquitto
    // would otherwise drop QoS 0 messages beyond 1000 queued for a slow subscriber.
    let broker = Broker::start(dir.path(), "allow_anonymous true\nmax_queued_messages 0");
    let input = dir.path().join("messages.txt");
    write_messages(&input, messages.max(backlog))?;
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

    eprintln!("mqtt bench: backlog of {backlog} QoS 1 messages ...");
    let drained_plain = measure_backlog(Backlog::Rumqttc, &broker, &input, backlog)?;
    eprintln!(
        "mqtt bench: backlog: rumqttc subscriber {:.0} messages/s",
        drained_plain.rate()
    );
    let drained_weir = measure_backlog(Backlog::Weir(&weir, &pipeline), &broker, &input, backlog)?;
    eprintln!(
        "mqtt bench: backlog: weir {:.0} messages/s",
        drained_weir.rate()
    );

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
            println!("| {qos} | {name} | {} |", m.cells(ceiling));
        }
    }
    println!();
    println!("| backlog drain | messages/s | wall s | CPU s | peak RSS MiB | share of rumqttc |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let backlog_ratio = drained_weir.rate() / drained_plain.rate();
    for (name, m) in [
        ("rumqttc subscriber", &drained_plain),
        ("weir", &drained_weir),
    ] {
        println!("| {name} | {} |", m.cells(drained_plain.rate()));
    }
    println!();
    if judged {
        println!(
            "target: weir >= {:.0}% of the ceiling at QoS 0 and 1: {}",
            TARGET_RATIO * 100.0,
            if met { "met" } else { "MISSED" }
        );
        println!(
            "target: weir drains a backlog at >= {:.0}% of the rumqttc subscriber's rate: {}",
            TARGET_RATIO * 100.0,
            if backlog_ratio >= TARGET_RATIO {
                "met"
            } else {
                "MISSED"
            }
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

    /// The table cells after the consumer's name, with the share of `ceiling` msg/s.
    fn cells(&self, ceiling: f64) -> String {
        format!(
            "{:.0} | {:.3} | {:.2} | {:.1} | {:.1}%",
            self.rate(),
            self.wall.as_secs_f64(),
            self.cpu_s,
            self.peak_rss_kib as f64 / 1024.0,
            self.rate() / ceiling * 100.0
        )
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
        self.command_in_session(broker, filter, messages, qos, "")
    }

    /// As [`Plain::command`], keeping a persistent session under client id `session`
    /// unless it is empty.
    fn command_in_session(
        self,
        broker: &Broker,
        filter: &str,
        messages: u64,
        qos: u8,
        session: &str,
    ) -> Result<Command> {
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
                    format!("{},{qos},{messages},{session},{filter}", broker.port()),
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
    let filter = FILTER;
    let before = broker.subscriptions_to(filter);
    let mut subscriber = consumer
        .command(broker, filter, messages, qos)?
        .spawn()
        .with_context(|| format!("{} does not start", consumer.name()))?;
    broker.wait_subscribed(filter, before);
    let started = Instant::now();
    let publisher = spawn_publisher(broker.port(), qos, input, messages)?;
    let mut usage = Usage::default();
    let wall = wait_exit(
        &mut subscriber,
        &mut usage,
        started,
        consumer.name(),
        messages,
    )?;
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
    let before = broker.subscriptions_to(FILTER);
    let child = weir_command(weir, pipeline, broker, &metrics_addr, qos, true)
        .spawn()
        .context("weir does not start")?;
    broker.wait_subscribed(FILTER, before);
    let started = Instant::now();
    let publisher = spawn_publisher(broker.port(), qos, input, messages)?;
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
    stop(child)?;
    Ok(Measured {
        messages,
        wall,
        cpu_s: usage.cpu_s,
        peak_rss_kib: usage.peak_rss_kib,
    })
}

/// `weir run` of the bench pipeline at `qos`, with a clean or a persistent session.
fn weir_command(
    weir: &Path,
    pipeline: &Path,
    broker: &Broker,
    metrics_addr: &str,
    qos: u8,
    clean_session: bool,
) -> Command {
    let mut command = Command::new(weir);
    command
        .args(["run", "--metrics-addr", metrics_addr])
        .arg(pipeline)
        .env("MQTT_URL", broker.url())
        .env("MQTT_QOS", qos.to_string())
        .env("MQTT_CLEAN_SESSION", clean_session.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    command
}

/// Stops `weir run` as a user would (SIGTERM) and checks it shut down cleanly.
fn stop(mut child: std::process::Child) -> Result<()> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait()?;
    if !status.success() {
        bail!("weir exited with {status}");
    }
    Ok(())
}

/// A consumer of the backlog drain.
enum Backlog<'a> {
    /// The plain rumqttc subscriber.
    Rumqttc,
    /// `weir run` of the pipeline.
    Weir(&'a Path, &'a Path),
}

/// A persistent session made, `messages` queued for it while its consumer is away, and
/// the consumer started again to drain them: timed from its start to its last message.
fn measure_backlog(
    consumer: Backlog<'_>,
    broker: &Broker,
    input: &Path,
    messages: u64,
) -> Result<Measured> {
    const SESSION: &str = "bench-backlog";
    /// The client id in `pipeline.yaml`.
    const WEIR_SESSION: &str = "weir-bench";
    let before = broker.subscriptions_to(FILTER);
    // The first run makes the session and its subscription, then leaves.
    match consumer {
        Backlog::Rumqttc => {
            let status = Plain::Rumqttc
                .command_in_session(broker, FILTER, 0, 1, SESSION)?
                .status()?;
            if !status.success() {
                bail!("the rumqttc subscriber could not make its session: {status}");
            }
        }
        Backlog::Weir(weir, pipeline) => {
            let addr = format!("127.0.0.1:{}", free_port());
            let child = weir_command(weir, pipeline, broker, &addr, 1, false).spawn()?;
            broker.wait_subscribed(FILTER, before);
            stop(child)?;
        }
    }
    broker.wait_subscribed(FILTER, before);
    finish(spawn_publisher(broker.port(), 1, input, messages)?)?;

    let started = Instant::now();
    let mut usage = Usage::default();
    let (wall, session) = match consumer {
        Backlog::Rumqttc => {
            let mut subscriber = Plain::Rumqttc
                .command_in_session(broker, FILTER, messages, 1, SESSION)?
                .spawn()?;
            let name = Plain::Rumqttc.name();
            let wall = wait_exit(&mut subscriber, &mut usage, started, name, messages)?;
            (wall, SESSION)
        }
        Backlog::Weir(weir, pipeline) => {
            let addr = format!("127.0.0.1:{}", free_port());
            let child = weir_command(weir, pipeline, broker, &addr, 1, false).spawn()?;
            let pid = child.id();
            let mut counted = 0;
            wait_until("weir drains the backlog", RUN_LIMIT, || {
                usage.sample(pid);
                counted = sink_rows(&addr).unwrap_or(counted);
                counted >= messages
            })?;
            usage.sample(pid);
            let wall = started.elapsed();
            stop(child)?;
            (wall, WEIR_SESSION)
        }
    };
    end_session(broker, session)?;
    Ok(Measured {
        messages,
        wall,
        cpu_s: usage.cpu_s,
        peak_rss_kib: usage.peak_rss_kib,
    })
}

/// Waits for a plain subscriber to exit after its `messages`, sampling its usage; returns
/// the time since `started`. Fails if it exits badly or takes longer than [`RUN_LIMIT`].
fn wait_exit(
    subscriber: &mut std::process::Child,
    usage: &mut Usage,
    started: Instant,
    name: &str,
    messages: u64,
) -> Result<Duration> {
    let status = loop {
        if let Some(status) = subscriber.try_wait()? {
            break status;
        }
        usage.sample(subscriber.id());
        if started.elapsed() > RUN_LIMIT {
            let _ = subscriber.kill();
            bail!("{name} did not receive {messages} messages in {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = started.elapsed();
    if !status.success() {
        bail!("{name} exited with {status}");
    }
    Ok(wall)
}

/// Ends the persistent session of `client_id`, so the broker stops queueing for it: a
/// clean-session connection under the same id (`mosquitto_pub` of an empty message on a
/// topic nothing subscribes to).
fn end_session(broker: &Broker, client_id: &str) -> Result<()> {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .args(["-i", client_id, "-t", "bench/session-end", "-n"])
        .status()
        .context("mosquitto_pub does not start")?;
    if !status.success() {
        bail!("mosquitto_pub could not end the session of {client_id}: {status}");
    }
    Ok(())
}

/// Publishes the first `count` lines of `input` on [`TOPIC`] at `qos`, on a thread of its
/// own; the handle yields once the broker has every message.
fn spawn_publisher(
    port: u16,
    qos: u8,
    input: &Path,
    count: u64,
) -> Result<std::thread::JoinHandle<Result<u64>>> {
    let messages: Vec<(String, String)> = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read {}", input.display()))?
        .lines()
        .take(usize::try_from(count).unwrap_or(usize::MAX))
        .map(|line| (TOPIC.to_owned(), line.to_owned()))
        .collect();
    Ok(std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(weir_testkit::flood(
                port,
                &format!("bench-publisher-{port}"),
                messages,
                qos,
            ))
            .map_err(|error| anyhow::anyhow!(error))
    }))
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
