//! The hub and `weir agent` end to end: a hub on loopback and three agents, two of which
//! a deployment targets by tag. They run it and report success, swap on an update
//! (leaving the unchanged pipeline alone), never see a deployment the hub refuses, and
//! carry on while the hub is down, a restarted agent booting from its stored deployment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weir_hub::protocol::{DeploymentSpec, DeviceView, NewDevice, PipelineDocument, ReportStatus};
use weir_hub::{Credentials, Hub, HubClient, HubConfig, RunningHub};

use crate::support::{Running, http_get, metric_value};

const ADMIN_TOKEN: &str = "weir_admin_e2e";

/// A pipeline that runs until stopped: paced readings, counted by `/metrics`.
const COUNTER: &str = r#"version: 1
name: counter
sources:
  readings:
    kind: generator
    config:
      devices: 2
      interval: 20ms
      realtime: true
      fields:
        temperature: {shape: sine, base: 60, amplitude: 5, period: 1m}
sinks:
  nowhere:
    kind: stdout
    inputs: [readings]
    config: {format: json}
"#;

/// A pipeline that writes `rows` readings to `file` (under the agent's files
/// directory) and ends.
fn batch(rows: u32, file: &str) -> String {
    format!(
        r#"version: 1
name: batch
sources:
  readings:
    kind: generator
    config:
      devices: 1
      interval: 1s
      count: {rows}
      realtime: false
      start: 2026-01-01T00:00:00Z
      fields:
        temperature: {{shape: sine, base: 60, amplitude: 5, period: 1m}}
sinks:
  out:
    kind: file
    inputs: [readings]
    config: {{path: "out/{file}", format: json}}
"#
    )
}

fn spec(target: &str, documents: &[(&str, String)]) -> DeploymentSpec {
    DeploymentSpec {
        name: None,
        target_condition: target.to_owned(),
        priority: 0,
        pipelines: documents
            .iter()
            .map(|(name, yaml)| PipelineDocument {
                name: (*name).to_owned(),
                yaml: yaml.clone(),
            })
            .collect(),
    }
}

async fn start_hub(data_dir: &Path, addr: SocketAddr) -> RunningHub {
    let mut config = HubConfig::new(data_dir);
    config.admin_token = Some(ADMIN_TOKEN.to_owned());
    let opened = Hub::open(config).await.expect("open the hub");
    weir_hub::serve(opened.hub, addr, None)
        .await
        .expect("serve the hub")
}

/// A runtime for the test's own calls, and a hub on a free loopback port keeping its
/// data in a new temporary directory.
fn hub_in_a_temp_dir() -> (tokio::runtime::Runtime, tempfile::TempDir, RunningHub) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let hub = runtime.block_on(start_hub(
        &dir.path().join("hub"),
        "127.0.0.1:0".parse().expect("address"),
    ));
    (runtime, dir, hub)
}

fn start_agent(url: &str, id: &str, key: &str, state_dir: &Path) -> Running {
    // The sensor's environment makes a pipeline the hub accepted invalid on the device.
    let interval = if id.starts_with("sensor") {
        "soon"
    } else {
        "1s"
    };
    let state = state_dir.to_string_lossy().into_owned();
    Running::start(
        &[
            "agent",
            "--hub",
            url,
            "--device",
            id,
            "--state-dir",
            &state,
            "--metrics-addr",
            "127.0.0.1:0",
            "--poll-wait",
            "5s",
            "--heartbeat-interval",
            "1s",
        ],
        &[("WEIR_DEVICE_KEY", key), ("WEIR_E2E_INTERVAL", interval)],
    )
}

/// Waits up to 90 s for `check` to hold on the hub's view of `ids`.
fn wait_for_devices(
    runtime: &tokio::runtime::Runtime,
    admin: &HubClient,
    ids: &[&str],
    what: &str,
    check: impl Fn(&DeviceView) -> bool,
) -> Vec<DeviceView> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let devices: Vec<DeviceView> = ids
            .iter()
            .map(|id| runtime.block_on(admin.device(id)).expect("device"))
            .collect();
        if devices.iter().all(&check) {
            return devices;
        }
        assert!(Instant::now() < deadline, "{what}: {devices:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pipeline_health<'a>(device: &'a DeviceView, pipeline: &str) -> &'a serde_json::Value {
    device
        .report
        .as_ref()
        .and_then(|report| report.health["pipelines"].as_array())
        .and_then(|pipelines| pipelines.iter().find(|p| p["name"] == pipeline))
        .unwrap_or_else(|| panic!("no health for pipeline {pipeline}: {device:#?}"))
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|text| text.lines().count())
        .unwrap_or(0)
}

/// The rows the `counter` pipeline has generated, from an agent's `/metrics`.
fn counted(addr: &str) -> f64 {
    let body = http_get(addr, "/metrics");
    metric_value(
        &body,
        "weir_operator_rows_out_total",
        &[("pipeline", "counter"), ("operator", "readings")],
    )
    .unwrap_or(0.0)
}

/// Asserts the `counter` pipeline behind `addr` is generating rows.
fn assert_counting(addr: &str, when: &str) {
    let before = counted(addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    while counted(addr) <= before {
        assert!(Instant::now() < deadline, "the counter stood still {when}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn agents_run_what_the_hub_deploys_and_carry_on_without_it() {
    let (runtime, dir, hub) = hub_in_a_temp_dir();
    let hub_addr = hub.addr;
    let url = hub.url();
    let admin = HubClient::new(&url, Credentials::Admin(ADMIN_TOKEN.to_owned()), None)
        .expect("admin client");

    let mut agents = Vec::new();
    let mut keys = Vec::new();
    let state_dir = |id: &str| -> PathBuf { dir.path().join("agents").join(id) };
    for (id, role) in [
        ("gw-a", "gateway"),
        ("gw-b", "gateway"),
        ("sensor-c", "sensor"),
    ] {
        let created = runtime
            .block_on(
                admin.create_device(&NewDevice {
                    id: id.to_owned(),
                    tags: [("site", "plant-1"), ("role", role)]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                }),
            )
            .expect("register");
        agents.push(start_agent(&url, id, &created.keys.primary, &state_dir(id)));
        keys.push(created.keys.primary);
    }
    let addrs: Vec<String> = agents.iter_mut().map(Running::metrics_addr).collect();

    // Deploy to the gateways: both run it and report success; the sensor does not.
    let v1 = runtime
        .block_on(admin.put_deployment(
            "gateways",
            &spec(
                "role = 'gateway'",
                &[
                    ("counter", COUNTER.to_owned()),
                    ("batch", batch(20, "batch.jsonl")),
                ],
            ),
        ))
        .expect("deploy");
    assert_eq!(v1.rollout.targeted, 2);
    let applied_v1 = |d: &DeviceView| {
        d.report
            .as_ref()
            .is_some_and(|r| r.revision == Some(v1.revision) && r.status == ReportStatus::Applied)
    };
    let gateways = wait_for_devices(&runtime, &admin, &["gw-a", "gw-b"], "v1 applied", |d| {
        applied_v1(d) && pipeline_health(d, "batch")["state"] == "finished"
    });
    let view = runtime
        .block_on(admin.deployment("gateways"))
        .expect("deployment");
    assert_eq!((view.rollout.succeeded, view.rollout.failed), (2, 0));
    assert_eq!(view.status, "complete");
    for id in ["gw-a", "gw-b"] {
        assert_eq!(
            lines(&state_dir(id).join("files/out/batch.jsonl")),
            20,
            "{id}"
        );
    }
    let sensor = wait_for_devices(&runtime, &admin, &["sensor-c"], "sensor reports", |d| {
        d.report
            .as_ref()
            .is_some_and(|r| r.status == ReportStatus::Applied)
    });
    assert_eq!(sensor[0].report.as_ref().and_then(|r| r.revision), None);
    assert!(!state_dir("sensor-c").join("files/out").exists());
    assert_counting(&addrs[0], "on gw-a");
    let counter_since = pipeline_health(&gateways[0], "counter")["since_ms"].clone();

    // Update one pipeline: both swap it, and leave the other running untouched.
    let v2 = runtime
        .block_on(admin.put_deployment(
            "gateways",
            &spec(
                "role = 'gateway'",
                &[
                    ("counter", COUNTER.to_owned()),
                    ("batch", batch(30, "batch-v2.jsonl")),
                ],
            ),
        ))
        .expect("update");
    assert_eq!(v2.version, 2);
    let gateways = wait_for_devices(&runtime, &admin, &["gw-a", "gw-b"], "v2 applied", |d| {
        d.report
            .as_ref()
            .is_some_and(|r| r.revision == Some(v2.revision) && r.status == ReportStatus::Applied)
            && pipeline_health(d, "batch")["state"] == "finished"
    });
    for (id, device) in ["gw-a", "gw-b"].iter().zip(&gateways) {
        assert_eq!(
            lines(&state_dir(id).join("files/out/batch-v2.jsonl")),
            30,
            "{id}"
        );
        // The first batch did not run again.
        assert_eq!(
            lines(&state_dir(id).join("files/out/batch.jsonl")),
            20,
            "{id}"
        );
        assert_eq!(device.desired.as_ref().map(|d| d.version), Some(2));
    }
    assert_eq!(
        pipeline_health(&gateways[0], "counter")["since_ms"],
        counter_since,
        "the unchanged pipeline was restarted"
    );

    // A broken pipeline is refused by the hub, and the devices keep version 2.
    let broken = COUNTER.replace("kind: stdout", "kind: no-such-sink");
    let refused = runtime.block_on(admin.put_deployment(
        "gateways",
        &spec("role = 'gateway'", &[("counter", broken)]),
    ));
    let error = refused.expect_err("a broken deployment was accepted");
    assert_eq!(error.status(), Some(422), "{error}");
    let view = runtime
        .block_on(admin.deployment("gateways"))
        .expect("deployment");
    assert_eq!(view.version, 2);

    // A pipeline the hub accepts (it checks `${WEIR_E2E_INTERVAL:-1s}` with its default)
    // but the sensor cannot run (its environment says `soon`): the sensor reports the
    // failure with the validator's message, and the rollout counts it.
    let sensors = runtime
        .block_on(
            admin.put_deployment(
                "sensors",
                &spec(
                    "role = 'sensor'",
                    &[(
                        "paced",
                        batch(5, "paced.jsonl")
                            .replace("interval: 1s", "interval: ${WEIR_E2E_INTERVAL:-1s}"),
                    )],
                ),
            ),
        )
        .expect("the hub accepts it");
    let failed = wait_for_devices(&runtime, &admin, &["sensor-c"], "sensor fails", |d| {
        d.report.as_ref().is_some_and(|r| {
            r.revision == Some(sensors.revision) && r.status == ReportStatus::Failed
        })
    });
    let error = failed[0]
        .report
        .as_ref()
        .and_then(|r| r.error.clone())
        .unwrap_or_default();
    assert!(
        error.contains("sensors/paced.yaml") && error.contains("soon"),
        "{error}"
    );
    let view = runtime
        .block_on(admin.deployment("sensors"))
        .expect("deployment");
    assert_eq!((view.rollout.targeted, view.rollout.failed), (1, 1));
    assert_eq!(view.status, "failing");
    assert!(!state_dir("sensor-c").join("files/out").exists());

    // The hub goes away: the agents keep running.
    runtime.block_on(hub.shutdown());
    for addr in &addrs[..2] {
        assert_counting(addr, "with the hub down");
    }

    // An agent restarted while the hub is down boots from its stored deployment.
    let restarted = {
        let mut first = agents.remove(0);
        first.signal("TERM");
        assert_eq!(first.wait_exit(Duration::from_secs(30)), Some(0));
        start_agent(&url, "gw-a", &keys[0], &state_dir("gw-a"))
    };
    let mut restarted = restarted;
    let addr = restarted.metrics_addr();
    restarted
        .wait_for_log("starting the stored deployment", Duration::from_secs(30))
        .expect("the agent boots from its stored deployment");
    assert_counting(&addr, "after a restart without the hub");
    assert!(
        restarted
            .wait_for_log("cannot poll for the desired state", Duration::from_secs(30))
            .is_some(),
        "the agent should say the hub is out of reach"
    );

    // The hub comes back (same address, same data): the agents reconnect and take the
    // next update.
    let hub = runtime.block_on(start_hub(&dir.path().join("hub"), hub_addr));
    let v3 = runtime
        .block_on(admin.put_deployment(
            "gateways",
            &spec(
                "role = 'gateway'",
                &[
                    ("counter", COUNTER.to_owned()),
                    ("batch", batch(40, "batch-v3.jsonl")),
                ],
            ),
        ))
        .expect("update after the restart");
    // Reconnecting waits out the backoff, at most a minute.
    wait_for_devices(&runtime, &admin, &["gw-a", "gw-b"], "v3 applied", |d| {
        d.report
            .as_ref()
            .is_some_and(|r| r.revision == Some(v3.revision) && r.status == ReportStatus::Applied)
    });
    for id in ["gw-a", "gw-b"] {
        assert_eq!(
            lines(&state_dir(id).join("files/out/batch-v3.jsonl")),
            40,
            "{id}"
        );
    }
    drop(restarted);
    drop(agents);
    runtime.block_on(hub.shutdown());
}

/// A pipeline whose readings the device retains, so the hub can ask about them.
const RETAINED: &str = r#"version: 1
name: retained
sources:
  readings:
    kind: generator
    config:
      devices: 2
      interval: 1s
      count: 120
      realtime: false
      start: 2026-01-01T00:00:00Z
      fields:
        temperature: {shape: sine, base: 60, amplitude: 5, period: 1m}
    retain: {}
sinks:
  nowhere:
    kind: blackhole
    inputs: [readings]
"#;

#[test]
fn an_admin_queries_a_connected_device_through_the_hub() {
    let (runtime, dir, hub) = hub_in_a_temp_dir();
    let url = hub.url();
    let admin = HubClient::new(&url, Credentials::Admin(ADMIN_TOKEN.to_owned()), None)
        .expect("admin client");
    let mut keys = Vec::new();
    for id in ["edge-1", "edge-2"] {
        let created = runtime
            .block_on(admin.create_device(&NewDevice {
                id: id.to_owned(),
                tags: [("fleet".to_owned(), "q".to_owned())].into(),
            }))
            .expect("register");
        keys.push(created.keys.primary);
    }
    // Only edge-1 runs an agent; edge-2 stays offline.
    let mut agent = start_agent(&url, "edge-1", &keys[0], &dir.path().join("edge-1"));
    agent.metrics_addr();
    runtime
        .block_on(admin.put_deployment(
            "retained",
            &spec("fleet = 'q'", &[("retained", RETAINED.to_owned())]),
        ))
        .expect("deploy");
    wait_for_devices(&runtime, &admin, &["edge-1"], "applied", |d| {
        d.report
            .as_ref()
            .is_some_and(|r| r.status == ReportStatus::Applied)
            && pipeline_health(d, "retained")["state"] == "finished"
    });

    let mut request = weir_query::QueryRequest::new(
        "SELECT device, count(*) AS n FROM readings GROUP BY device ORDER BY device",
    );
    request.format = Some(weir_query::Format::Csv);
    let answer = runtime
        .block_on(admin.query_device("edge-1", &request))
        .expect("the device answers");
    assert_eq!(answer.content_type, "text/csv; charset=utf-8");
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        "device,n\ndev-0000,60\ndev-0001,60\n"
    );

    // The device's own refusal comes back as it gave it.
    let bad = weir_query::QueryRequest::new("SELECT nope FROM readings");
    let error = runtime
        .block_on(admin.query_device("edge-1", &bad))
        .expect_err("bad SQL");
    assert_eq!(error.status(), Some(400), "{error}");
    assert!(error.to_string().contains("nope"), "{error}");

    // An offline device is refused at once with 504, not left hanging.
    let started = Instant::now();
    let error = runtime
        .block_on(admin.query_device("edge-2", &request))
        .expect_err("offline");
    assert_eq!(error.status(), Some(504), "{error}");
    assert!(
        error.to_string().contains("'edge-2' is not connected"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Only an admin may forward queries: a device may not, even to itself.
    let device = admin.with_credentials(Credentials::Device {
        id: "edge-1".to_owned(),
        key: weir_hub::identity::DeviceKey::from_base64(&keys[0]).expect("a key"),
    });
    let error = runtime
        .block_on(device.query_device("edge-1", &request))
        .expect_err("a device is refused");
    assert_eq!(error.status(), Some(403), "{error}");

    // Once the agent is gone the device stops answering, and the hub says so.
    drop(agent);
    std::thread::sleep(weir_hub::relay::CONNECTED_GRACE + Duration::from_secs(1));
    let error = runtime
        .block_on(admin.query_device("edge-1", &request))
        .expect_err("disconnected");
    assert_eq!(error.status(), Some(504), "{error}");
}

/// Paced readings of 3 devices every 100 ms, `count` of them (from `start` when given),
/// aggregated per second and shipped to the hub by a `hub` sink with `sink_config`.
fn paced_windows(name: &str, count: u32, start: Option<&str>, sink_config: &str) -> String {
    let start = start
        .map(|at| format!("\n      start: {at}"))
        .unwrap_or_default();
    format!(
        r#"version: 1
name: {name}
sources:
  readings:
    kind: generator
    config:
      devices: 3
      interval: 100ms
      count: {count}
      realtime: true{start}
      fields:
        temperature: {{shape: sine, base: 60, amplitude: 5, period: 1m}}
    event_time: {{column: ts}}
transforms:
  per_second:
    kind: sql
    inputs: [readings]
    window: {{tumbling: 1s}}
    config:
      query: SELECT device, count(*) AS n FROM readings GROUP BY device
sinks:
  uplink:
    kind: hub
    inputs: [per_second]
    config: {sink_config}
"#
    )
}

/// The hub's answer to `sql` over the fleet's data, as CSV lines (header first); none
/// while no table exists yet (nothing has arrived: a checkpointing sink ships a batch
/// only once its checkpoint completes).
fn fleet_csv(runtime: &tokio::runtime::Runtime, admin: &HubClient, sql: &str) -> Vec<String> {
    let mut request = weir_query::QueryRequest::new(sql);
    request.format = Some(weir_query::Format::Csv);
    let answer = match runtime.block_on(admin.query(&request)) {
        Ok(answer) => answer,
        Err(error) if error.to_string().contains("tables: none") => return Vec::new(),
        Err(error) => panic!("{sql}: {error}"),
    };
    String::from_utf8(answer.body)
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn what_a_hub_sink_ships_through_a_hub_outage_is_stored_once_and_queryable() {
    let (runtime, dir, mut hub) = hub_in_a_temp_dir();
    let hub_addr = hub.addr;
    let url = hub.url();
    let admin = HubClient::new(&url, Credentials::Admin(ADMIN_TOKEN.to_owned()), None)
        .expect("admin client");
    let created = runtime
        .block_on(admin.create_device(&NewDevice {
            id: "edge-1".to_owned(),
            tags: [("fleet".to_owned(), "ship".to_owned())].into(),
        }))
        .expect("register");
    let mut agent = start_agent(
        &url,
        "edge-1",
        &created.keys.primary,
        &dir.path().join("edge-1"),
    );
    let agent_addr = agent.metrics_addr();
    runtime
        .block_on(admin.put_deployment(
            "plant",
            &spec(
                "fleet = 'ship'",
                &[("plant", paced_windows("plant", 120, None, "{}"))],
            ),
        ))
        .expect("deploy");
    wait_for_devices(&runtime, &admin, &["edge-1"], "applied", |d| {
        d.report
            .as_ref()
            .is_some_and(|r| r.status == ReportStatus::Applied)
    });

    // The hub goes away while the pipeline runs: its windows wait in the outbox.
    runtime.block_on(hub.shutdown());
    let retried = |addr: &str| {
        metric_value(
            &http_get(addr, "/metrics"),
            "weir_outbox_retries_total",
            &[("stream", "plant/uplink")],
        )
        .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while retried(&agent_addr) < 1.0 {
        assert!(Instant::now() < deadline, "the agent never tried to ship");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(5));
    hub = runtime.block_on(start_hub(&dir.path().join("hub"), hub_addr));

    // Back: everything arrives, each window once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let totals = loop {
        let lines = fleet_csv(
            &runtime,
            &admin,
            "SELECT count(*) AS windows, sum(n) AS rows, \
             count(DISTINCT device || CAST(window_start AS VARCHAR)) AS distinct_windows, \
             min(hub_device) AS shipper FROM plant.uplink",
        );
        if lines
            .get(1)
            .is_some_and(|line| line.split(',').nth(1) == Some("120"))
        {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "not everything arrived: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let fields: Vec<&str> = totals[1].split(',').collect();
    assert_eq!(fields[0], fields[2], "a window stored twice: {totals:?}");
    assert_eq!(fields[3], "edge-1");
    // 4 s of readings in 1 s windows, per device: 4 or 5 windows each.
    let windows: usize = fields[0].parse().expect("a count");
    assert!((12..=15).contains(&windows), "{totals:?}");
    // The device's report to the hub carries its outbox's figures.
    let device = runtime.block_on(admin.device("edge-1")).expect("device");
    let outbox = &device.report.as_ref().expect("a report").health["outbox"];
    for figure in [
        "batches",
        "rows",
        "bytes",
        "appended_rows",
        "shipped_rows",
        "acked_rows",
        "retries",
    ] {
        assert!(outbox[figure].as_u64().is_some(), "{figure}: {outbox}");
    }
    assert!(
        outbox["dropped_rows"]["bytes"].as_u64().is_some(),
        "{outbox}"
    );
    // Shipped and acknowledged: nothing waits any more. What failed during the outage
    // was sent twice: shipped counts both sends, acknowledged only the one that landed.
    let body = http_get(&agent_addr, "/metrics");
    let figure = |name: &str| {
        metric_value(&body, name, &[("stream", "plant/uplink")])
            .unwrap_or_else(|| panic!("{name} is missing: {body}"))
    };
    assert_eq!(figure("weir_outbox_batches"), 0.0, "{body}");
    assert_eq!(
        figure("weir_outbox_acked_rows_total"),
        figure("weir_outbox_appended_rows_total"),
        "{body}"
    );
    assert!(
        figure("weir_outbox_shipped_rows_total") > figure("weir_outbox_acked_rows_total"),
        "{body}"
    );
    drop(agent);
    runtime.block_on(hub.shutdown());
}

/// Kills the agent `kills` times at seeded random moments `pause` apart, restarting it
/// each time; the hub goes away at the second kill and comes back on its address at
/// the fourth. Returns the agent's last run and the hub.
#[allow(clippy::too_many_arguments)]
fn kill_through_a_hub_outage(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    hub: RunningHub,
    mut agent: Running,
    restart: impl Fn() -> Running,
    kills: usize,
    pause: std::ops::Range<u64>,
    seed: u64,
) -> (Running, Option<RunningHub>) {
    use rand::{Rng, SeedableRng};
    let hub_addr = hub.addr;
    let mut hub = Some(hub);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for round in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.random_range(pause.clone())));
        match round {
            1 => {
                if let Some(running) = hub.take() {
                    runtime.block_on(running.shutdown());
                }
            }
            3 => hub = Some(runtime.block_on(start_hub(&dir.join("hub"), hub_addr))),
            _ => {}
        }
        agent.signal("KILL");
        agent.wait_exit(Duration::from_secs(10));
        agent = restart();
        agent.metrics_addr();
    }
    (agent, hub)
}

/// The windows `table` holds at the hub, once its rows reach `rows`: the CSV line of
/// (windows, rows, distinct windows, least and most rows in a window).
fn stored_windows(
    runtime: &tokio::runtime::Runtime,
    admin: &HubClient,
    table: &str,
    rows: u64,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = fleet_csv(
            runtime,
            admin,
            &format!(
                "SELECT count(*) AS windows, sum(n) AS rows, \
                 count(DISTINCT device || CAST(window_start AS VARCHAR)) AS distinct_windows, \
                 min(n) AS least, max(n) AS most FROM {table}"
            ),
        );
        if let Some(line) = lines.get(1).filter(|line| {
            line.split(',')
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n >= rows)
        }) {
            return line.clone();
        }
        assert!(
            Instant::now() < deadline,
            "not every window arrived: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn windows_are_stored_once_through_agent_kills_and_a_hub_outage() {
    let (runtime, dir, hub) = hub_in_a_temp_dir();
    let url = hub.url();
    let admin = HubClient::new(&url, Credentials::Admin(ADMIN_TOKEN.to_owned()), None)
        .expect("admin client");
    let created = runtime
        .block_on(admin.create_device(&NewDevice {
            id: "edge-k".to_owned(),
            tags: [("fleet".to_owned(), "kill".to_owned())].into(),
        }))
        .expect("register");
    let state = dir.path().join("edge-k");
    let mut agent = start_agent(&url, "edge-k", &created.keys.primary, &state);
    agent.metrics_addr();
    runtime
        .block_on(admin.put_deployment(
            "line",
            &spec(
                "fleet = 'kill'",
                // Each window's batch numbered by its window, from a fixed start.
                &[(
                    "line",
                    paced_windows(
                        "line",
                        180,
                        Some("2026-01-01T00:00:00Z"),
                        "{sequence_by: window_start}",
                    ),
                )],
            ),
        ))
        .expect("deploy");
    wait_for_devices(&runtime, &admin, &["edge-k"], "applied", |d| {
        d.report
            .as_ref()
            .is_some_and(|r| r.status == ReportStatus::Applied)
    });
    // SIGKILL at random moments; each restart boots from the stored deployment and
    // produces the windows from the start again. Meanwhile the hub goes away for a while
    // (two kills long) and comes back on the same address.
    let restart = || start_agent(&url, "edge-k", &created.keys.primary, &state);
    let (agent, hub) =
        kill_through_a_hub_outage(&runtime, dir.path(), hub, agent, restart, 4, 800..3000, 42);
    // The last run goes to the end: every window, each once.
    let line = stored_windows(
        &runtime,
        &admin,
        "line.uplink",
        180,
        Duration::from_secs(60),
    );
    assert_eq!(line, "18,180,18,10,10");
    drop(agent);
    if let Some(running) = hub {
        runtime.block_on(running.shutdown());
    }
}

#[test]
fn checkpointed_windows_reach_the_hub_once_through_kill_9_and_a_hub_outage() {
    let (runtime, dir, hub) = hub_in_a_temp_dir();
    let url = hub.url();
    let admin = HubClient::new(&url, Credentials::Admin(ADMIN_TOKEN.to_owned()), None)
        .expect("admin client");
    let created = runtime
        .block_on(admin.create_device(&NewDevice {
            id: "edge-c".to_owned(),
            tags: [("fleet".to_owned(), "checkpoint".to_owned())].into(),
        }))
        .expect("register");
    let state = dir.path().join("edge-c");
    let mut agent = start_agent(&url, "edge-c", &created.keys.primary, &state);
    agent.metrics_addr();
    // 35 s of readings; no `sequence_by`: the checkpoints alone keep every window once.
    let pipeline = paced_windows("plant", 1050, Some("2026-01-01T00:00:00Z"), "{}").replacen(
        "sources:",
        "checkpoint: {interval: 1s}\nsources:",
        1,
    );
    runtime
        .block_on(admin.put_deployment(
            "plant",
            &spec("fleet = 'checkpoint'", &[("plant", pipeline)]),
        ))
        .expect("deploy");
    wait_for_devices(&runtime, &admin, &["edge-c"], "applied", |d| {
        d.report
            .as_ref()
            .is_some_and(|r| r.status == ReportStatus::Applied)
    });
    // SIGKILL at random moments over the run; each restart goes on from the last
    // checkpoint. The hub is away from the second kill to the fourth.
    let restart = || start_agent(&url, "edge-c", &created.keys.primary, &state);
    let (agent, hub) = kill_through_a_hub_outage(
        &runtime,
        dir.path(),
        hub,
        agent,
        restart,
        6,
        2_000..5_000,
        7,
    );
    // 35 s of readings of 3 devices, 10 a second each: 105 windows of 10, each once.
    let line = stored_windows(
        &runtime,
        &admin,
        "plant.uplink",
        1050,
        Duration::from_secs(90),
    );
    assert_eq!(line, "105,1050,105,10,10");
    drop(agent);
    if let Some(running) = hub {
        runtime.block_on(running.shutdown());
    }
}

#[test]
fn the_agent_refuses_plain_http_to_a_remote_hub_unless_told_to_accept_it() {
    let state = tempfile::tempdir().expect("a temp dir");
    let key = "A".repeat(43);
    let agent = |extra: &[&str]| {
        let state = state.path().to_string_lossy().into_owned();
        let mut args = vec![
            "agent",
            "--hub",
            // TEST-NET-1: never on this machine, and nothing answers there.
            "http://192.0.2.1:8700",
            "--device",
            "gw-1",
            "--state-dir",
            &state,
            "--metrics-addr",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Running::start(&args, &[("WEIR_DEVICE_KEY", &key)])
    };
    let mut refused = agent(&[]);
    assert_eq!(refused.wait_exit(Duration::from_secs(30)), Some(78));
    let said = refused
        .wait_for_log("refusing plain HTTP", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{:?}", refused.stderr_seen));
    assert!(said.contains("--insecure-http"), "{said}");

    let mut accepted = agent(&["--insecure-http"]);
    let warned = accepted.wait_for_log("--insecure-http", Duration::from_secs(30));
    assert!(warned.is_some(), "{:?}", accepted.stderr_seen);
    assert_eq!(
        accepted.wait_exit(Duration::from_millis(500)),
        None,
        "it runs and keeps trying the hub"
    );
    accepted.signal("TERM");
    accepted.wait_exit(Duration::from_secs(30));
}
