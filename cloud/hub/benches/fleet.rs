//! The hub under a simulated fleet: a release `weir-hub` (SQLite, the default) serving
//! `FLEET_DEVICES` (10,000) lightweight simulated agents in this process, on loopback.
//! Each agent long-polls its desired state, reports when it gets a new one, and sends a
//! heartbeat every `FLEET_HEARTBEAT` (30 s, spread over the fleet).
//!
//! Reports: registration rate; the hub's CPU and RSS (read from /proc) at rest under the
//! polls and heartbeats; p50/p99 latency of the device API's non-polling calls as the
//! agents see it (heartbeats, and the burst of reports after an update, apart); and the
//! time for a deployment update to reach 99 % and 100 % of the devices. Target: 99 % of
//! 10,000 within 10 s. The agents share the machine's two cores with the hub, so their
//! latencies include their own scheduling.
//!
//! ```sh
//! cargo bench -p weir-hub --bench fleet
//! ```
//!
//! `HUB_BIN` names another `weir-hub` binary. The bench needs about two file descriptors
//! per device in each process (`ulimit -n`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Semaphore};
use weir_hub::identity::DeviceKey;
use weir_hub::protocol::{DeploymentSpec, NewDevice, PipelineDocument, Report, ReportStatus};
use weir_hub::{Credentials, HubClient};

mod support;
use support::{env_or, rss_mib};

const ADMIN_TOKEN: &str = "weir_admin_fleet-bench";

/// Calls other than polls in flight at once, across the fleet: bounds the extra
/// connections beside the one poll each agent holds.
const CONCURRENT_CALLS: usize = 256;

/// `HUB_BIN`, or the `weir-hub` cargo built beside this bench.
fn hub_binary() -> PathBuf {
    std::env::var_os("HUB_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_weir-hub")),
        PathBuf::from,
    )
}

/// CPU seconds (user + system) and current and peak RSS in MiB of process `pid`.
fn usage(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or(Vec::new(), |(_, rest)| rest.split(' ').collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after the name.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let (rss, peak) = rss_mib(&pid.to_string());
    (cpu, rss, peak)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn pipeline(threshold: u32) -> DeploymentSpec {
    let yaml = format!(
        "version: 1\nname: hot\nsources:\n  readings:\n    kind: generator\n    config:\n      \
         devices: 2\n      interval: 1s\n      realtime: true\n      fields:\n        \
         temperature: {{shape: sine, base: 60, amplitude: 5, period: 10m}}\ntransforms:\n  \
         hot:\n    kind: sql\n    inputs: [readings]\n    config:\n      query: SELECT * FROM \
         readings WHERE temperature > {threshold}\nsinks:\n  out:\n    kind: stdout\n    \
         inputs: [hot]\n"
    );
    DeploymentSpec {
        name: None,
        target_condition: "fleet = 'bench'".to_owned(),
        priority: 0,
        pipelines: vec![PipelineDocument {
            name: "hot".to_owned(),
            yaml,
        }],
    }
}

struct Fleet {
    /// Per agent, when it received each etag.
    received: Vec<Mutex<Vec<(String, Instant)>>>,
    /// Latencies of heartbeats, and of reports (which come in bursts, at each rollout).
    heartbeats: Mutex<Vec<Duration>>,
    reports: Mutex<Vec<Duration>>,
    calls: Semaphore,
    errors: AtomicUsize,
}

impl Fleet {
    /// Agents that have received `etag`, and when each did.
    async fn arrivals(&self, etag: &str) -> Vec<Instant> {
        let mut times = Vec::new();
        for agent in &self.received {
            if let Some((_, at)) = agent.lock().await.iter().find(|(e, _)| e == etag) {
                times.push(*at);
            }
        }
        times
    }
}

async fn timed<T, E: std::fmt::Display>(
    fleet: &Fleet,
    into: &Mutex<Vec<Duration>>,
    call: impl std::future::Future<Output = Result<T, E>>,
) {
    let _permit = fleet.calls.acquire().await;
    let started = Instant::now();
    match call.await {
        Ok(_) => into.lock().await.push(started.elapsed()),
        Err(e) => {
            if fleet.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                eprintln!("device call failed: {e}");
            }
        }
    }
}

/// One simulated agent: poll, report what arrives, heartbeat on its own schedule.
async fn agent(
    index: usize,
    id: String,
    client: HubClient,
    fleet: Arc<Fleet>,
    heartbeat: Duration,
) {
    let beats = {
        let (client, fleet, id) = (client.clone(), Arc::clone(&fleet), id.clone());
        tokio::spawn(async move {
            // Spread the fleet's heartbeats over the interval.
            let offset = heartbeat.mul_f64((index % 1000) as f64 / 1000.0);
            tokio::time::sleep(offset).await;
            let mut ticks = tokio::time::interval(heartbeat);
            loop {
                ticks.tick().await;
                timed(&fleet, &fleet.heartbeats, client.heartbeat(&id)).await;
            }
        })
    };
    let mut etag: Option<String> = None;
    loop {
        match client
            .desired(&id, etag.as_deref(), Duration::from_secs(30))
            .await
        {
            Ok(Some(state)) => {
                fleet.received[index]
                    .lock()
                    .await
                    .push((state.etag.clone(), Instant::now()));
                let report = Report {
                    revision: state.deployment.as_ref().map(|d| d.revision),
                    status: ReportStatus::Applied,
                    error: None,
                    health: serde_json::Value::Null,
                };
                etag = Some(state.etag);
                timed(&fleet, &fleet.reports, client.report(&id, &report)).await;
            }
            Ok(None) => {}
            Err(e) => {
                if fleet.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("poll failed: {e}");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        if beats.is_finished() {
            return;
        }
    }
}

/// Waits until at least `share` of the agents have `etag`, or `limit` passes.
async fn wait_for(fleet: &Fleet, etag: &str, share: f64, limit: Duration) -> Vec<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        let arrivals = fleet.arrivals(etag).await;
        if arrivals.len() as f64 >= share * fleet.received.len() as f64 || Instant::now() > deadline
        {
            return arrivals;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn main() {
    let devices: usize = env_or("FLEET_DEVICES", 10_000);
    let heartbeat = Duration::from_secs(env_or("FLEET_HEARTBEAT", 30));
    let binary = hub_binary();
    assert!(binary.exists(), "{} not found (HUB_BIN)", binary.display());
    let data = tempfile::tempdir().expect("temp dir");
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("address").port()
    };
    let mut hub: Child = Command::new(&binary)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data.path())
        .env("WEIR_HUB_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start weir-hub");
    let pid = hub.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(run(port, pid, devices, heartbeat));
    // The agents go first, so they do not report the hub going away.
    runtime.shutdown_timeout(Duration::from_secs(2));
    let _ = hub.kill();
    let _ = hub.wait();
    result.expect("the bench ran");
}

async fn run(port: u16, pid: u32, devices: usize, heartbeat: Duration) -> Result<(), String> {
    let url = format!("http://127.0.0.1:{port}");
    let admin = HubClient::new(&url, Credentials::Admin(ADMIN_TOKEN.to_owned()), None)
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    while admin.status().await.is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            return Err("the hub did not start".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Register the fleet, 64 at a time.
    let started = Instant::now();
    let registering = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::with_capacity(devices);
    for i in 0..devices {
        let (admin, registering) = (admin.clone(), Arc::clone(&registering));
        tasks.push(tokio::spawn(async move {
            let _permit = registering.acquire().await;
            let device = NewDevice {
                id: format!("dev-{i:05}"),
                tags: [
                    ("fleet", "bench".to_owned()),
                    ("rack", (i % 10).to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            };
            admin.create_device(&device).await
        }));
    }
    let mut keys = Vec::with_capacity(devices);
    for task in tasks {
        let created = task
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        keys.push((created.device.id, created.keys.primary));
    }
    let registration = started.elapsed();
    println!(
        "registered {devices} devices in {:.1} s ({:.0}/s)",
        registration.as_secs_f64(),
        devices as f64 / registration.as_secs_f64()
    );

    let v1 = admin
        .put_deployment("bench", &pipeline(60))
        .await
        .map_err(|e| e.to_string())?;
    let fleet = Arc::new(Fleet {
        received: (0..devices).map(|_| Mutex::new(Vec::new())).collect(),
        heartbeats: Mutex::new(Vec::new()),
        reports: Mutex::new(Vec::new()),
        calls: Semaphore::new(CONCURRENT_CALLS),
        errors: AtomicUsize::new(0),
    });
    let started = Instant::now();
    for (index, (id, key)) in keys.into_iter().enumerate() {
        let key = DeviceKey::from_base64(&key).map_err(|e| e.to_string())?;
        let client = admin.with_credentials(Credentials::Device {
            id: id.clone(),
            key,
        });
        tokio::spawn(agent(index, id, client, Arc::clone(&fleet), heartbeat));
        // Connect in waves: the listen backlog is finite.
        if index % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let first = format!("r{}", v1.revision);
    let arrived = wait_for(&fleet, &first, 1.0, Duration::from_secs(120)).await;
    println!(
        "{} of {devices} agents connected and got version 1 in {:.1} s",
        arrived.len(),
        started.elapsed().as_secs_f64()
    );

    // At rest: polls held, heartbeats coming.
    fleet.heartbeats.lock().await.clear();
    fleet.reports.lock().await.clear();
    let (cpu_before, _, _) = usage(pid);
    let rest = heartbeat.min(Duration::from_secs(30));
    tokio::time::sleep(rest).await;
    let (cpu_after, rss, _) = usage(pid);
    println!(
        "at rest for {} s: hub CPU {:.1} % of one core, RSS {rss:.0} MiB",
        rest.as_secs(),
        100.0 * (cpu_after - cpu_before) / rest.as_secs_f64()
    );

    // The update: from the PUT until 99 % and 100 % of the agents have it.
    let (cpu_before, _, _) = usage(pid);
    let update_started = Instant::now();
    let v2 = admin
        .put_deployment("bench", &pipeline(70))
        .await
        .map_err(|e| e.to_string())?;
    let second = format!("r{}", v2.revision);
    let mut arrivals = wait_for(&fleet, &second, 1.0, Duration::from_secs(120)).await;
    arrivals.sort();
    let reached = |share: f64| -> Option<Duration> {
        let needed = (share * devices as f64).ceil() as usize;
        arrivals
            .get(needed.checked_sub(1)?)
            .map(|at| at.duration_since(update_started))
    };
    let (cpu_after, rss, peak) = usage(pid);
    let show = |d: Option<Duration>| {
        d.map_or("not reached".to_owned(), |d| {
            format!("{:.2} s", d.as_secs_f64())
        })
    };
    println!(
        "update reached 99 % of {devices} devices in {}, 100 % in {} (target: 99 % within 10 s)",
        show(reached(0.99)),
        show(reached(1.0))
    );
    println!(
        "during the rollout: hub CPU {:.2} s; RSS {rss:.0} MiB, peak {peak:.0} MiB",
        cpu_after - cpu_before
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (what, calls) in [
        (
            "heartbeats (steady, spread over the interval)",
            &fleet.heartbeats,
        ),
        (
            "reports (10,000 in a burst after the update)",
            &fleet.reports,
        ),
    ] {
        let mut latencies = calls.lock().await.clone();
        latencies.sort();
        println!(
            "device API, {what}: {} calls, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            latencies.len(),
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
    }
    println!("{} failed calls", fleet.errors.load(Ordering::Relaxed));
    Ok(())
}
