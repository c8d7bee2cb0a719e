//! Checkpoints under `kill -9`: the runtime is killed at seeded random moments while its
//! input keeps coming, restarted each time, and its final output must equal what an
//! uninterrupted run makes of the same input: every window once, with the same values.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use weir_testkit::{Broker, flood};

use crate::support::Running;

const DEVICES: usize = 3;
/// Readings published each second, over `SECONDS` seconds.
const PER_SECOND: usize = 150;
const SECONDS: usize = 32;
const KILLS: usize = 6;
/// Event time of the first reading; readings are 20 ms of event time apart.
const START_MS: i64 = 1_767_225_600_000;
const STEP_MS: i64 = 20;

/// MQTT QoS 1 readings, a 10 s window per device, JSON lines out; checkpoints every
/// second.
fn pipeline(dir: &Path, broker: &Broker) -> std::path::PathBuf {
    let yaml = format!(
        r#"version: 1
name: kill-mqtt
checkpoint: {{interval: 1s}}
sources:
  readings:
    kind: mqtt
    schema: {{device: utf8, ts: timestamp_ms, value: int64}}
    event_time: {{column: ts, max_out_of_order: 1s}}
    config:
      url: "{url}"
      topics: ["kill/+/r"]
      topic_pattern: "kill/{{device}}/r"
      qos: 1
      client_id: weir-kill-readings
      clean_session: false
transforms:
  per_device:
    kind: sql
    inputs: [readings]
    window: {{tumbling: 10s}}
    config:
      query: SELECT device, count(*) AS n, sum(value) AS total FROM readings GROUP BY device
sinks:
  out:
    kind: file
    inputs: [per_device]
    config: {{path: "{out}", timestamps: epoch_ms}}
"#,
        url = broker.url(),
        out = dir.join("windows.jsonl").display(),
    );
    let file = dir.join("kill-mqtt.yaml");
    std::fs::write(&file, yaml).expect("the pipeline file is written");
    file
}

fn start(file: &Path, state: &Path) -> Running {
    let mut weir = Running::start(
        &[
            "run",
            file.to_str().expect("a UTF-8 path"),
            "--no-metrics",
            "--state-dir",
            state.to_str().expect("a UTF-8 path"),
        ],
        &[],
    );
    weir.wait_for_log("mqtt connected to", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("weir never connected: {:?}", weir.stderr_seen));
    weir
}

/// Reading `i`: its device, topic and payload.
fn reading(i: usize) -> (String, String, i64) {
    let device = format!("d{}", i % DEVICES);
    let ts = START_MS + i as i64 * STEP_MS;
    let value = (i as i64 * 7919) % 1000;
    (
        format!("kill/{device}/r"),
        format!(r#"{{"ts":{ts},"value":{value}}}"#),
        value,
    )
}

/// (device, window start) → (count, sum) of the readings `0..total`.
fn expected(total: usize) -> BTreeMap<(String, i64), (i64, i64)> {
    let mut windows = BTreeMap::new();
    for i in 0..total {
        let (_, _, value) = reading(i);
        let ts = START_MS + i as i64 * STEP_MS;
        let start = ts - ts.rem_euclid(10_000);
        let entry = windows
            .entry((format!("d{}", i % DEVICES), start))
            .or_insert((0, 0));
        entry.0 += 1;
        entry.1 += value;
    }
    windows
}

/// The windows in the output file; a window written twice fails the test.
fn written(path: &Path) -> BTreeMap<(String, i64), (i64, i64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut windows = BTreeMap::new();
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a torn or bad line {line:?}: {e}"));
        let key = (
            row["device"].as_str().expect("device").to_owned(),
            row["window_start"].as_i64().expect("window_start"),
        );
        let value = (
            row["n"].as_i64().expect("n"),
            row["total"].as_i64().expect("total"),
        );
        assert!(
            windows.insert(key.clone(), value).is_none(),
            "window {key:?} written twice"
        );
    }
    windows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_windows_survive_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(
        dir.path(),
        "allow_anonymous true\nmax_queued_messages 1000000",
    );
    let file = pipeline(dir.path(), &broker);
    let state = dir.path().join("state");
    let out = dir.path().join("windows.jsonl");

    let mut weir = start(&file, &state);
    let port = broker.port();
    let publisher = tokio::spawn(async move {
        for second in 0..SECONDS {
            let messages: Vec<(String, String)> = (second * PER_SECOND..(second + 1) * PER_SECOND)
                .map(|i| {
                    let (topic, payload, _) = reading(i);
                    (topic, payload)
                })
                .collect();
            flood(port, "kill-publisher", messages, 1)
                .await
                .expect("the readings reach the broker");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut random = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    for _ in 0..KILLS {
        let wait = random.random_range(1_500..4_500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        weir.child.kill().expect("kill -9");
        weir.child.wait().expect("the killed runtime is reaped");
        weir = start(&file, &state);
    }
    publisher.await.expect("the publisher finished");
    let total = SECONDS * PER_SECOND;
    // One more reading per device far ahead closes every window of the readings.
    let closers: Vec<(String, String)> = (0..DEVICES)
        .map(|d| {
            let ts = START_MS + 3_600_000;
            (
                format!("kill/d{d}/r"),
                format!(r#"{{"ts":{ts},"value":0}}"#),
            )
        })
        .collect();
    flood(port, "kill-publisher", closers, 1)
        .await
        .expect("the closers reach the broker");

    let want = expected(total);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while written(&out).len() < want.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} windows written: {:?}",
            written(&out).len(),
            want.len(),
            weir.stderr_seen
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    weir.signal("TERM");
    assert_eq!(weir.wait_exit(Duration::from_secs(30)), Some(0));
    let mut got = written(&out);
    // The drain closes the closers' windows too: one row per device, value 0.
    let closing: Vec<_> = got
        .keys()
        .filter(|(_, start)| *start >= START_MS + 3_600_000)
        .cloned()
        .collect();
    assert_eq!(closing.len(), DEVICES, "{closing:?}");
    for key in closing {
        assert_eq!(got.remove(&key), Some((1, 0)));
    }
    let missing: Vec<_> = want.keys().filter(|key| !got.contains_key(*key)).collect();
    assert!(missing.is_empty(), "windows missing: {missing:?}");
    assert_eq!(
        got, want,
        "every window once, with the values of an uninterrupted run"
    );
}
