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
/// What `weir run` logs once its MQTT source is connected, and once a pipeline runs.
const CONNECTED: &str = "mqtt connected to";
const STARTED: &str = "pipeline started";
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

/// Starts `weir run` on `file` with its state under `state`, and waits for the log
/// line that says it is `ready`.
fn start(file: &Path, state: &Path, ready: &str) -> Running {
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
    weir.wait_for_log(ready, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("weir never logged {ready:?}: {:?}", weir.stderr_seen));
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

    let mut weir = start(&file, &state, CONNECTED);
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
        weir = start(&file, &state, CONNECTED);
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

/// Lines appended to the followed file: `FOLLOW_RATE` a second for `FOLLOW_SECONDS`.
const FOLLOW_RATE: usize = 150;
const FOLLOW_SECONDS: usize = 32;
/// Event time between lines: each 10 s window of a device holds about 17 lines.
const FOLLOW_STEP_MS: i64 = 200;

/// A followed JSON lines file, 10 s windows per device, scored by a per-device zscore,
/// JSON lines appended to the output (so a replay from the file's start would show as
/// windows written twice); checkpoints every second. The window and the detector each
/// run as `parallelism` instances.
fn follow_pipeline(dir: &Path, input: &Path, out: &Path, parallelism: usize) -> std::path::PathBuf {
    let yaml = format!(
        r#"version: 1
name: kill-follow
checkpoint: {{interval: 1s}}
sources:
  readings:
    kind: file
    schema: {{device: utf8, ts: timestamp_ms, value: int64}}
    event_time: {{column: ts, max_out_of_order: 1s}}
    config: {{path: "{input}", format: json, follow: true, poll_interval: 50ms}}
transforms:
  per_device:
    kind: sql
    inputs: [readings]
    window: {{tumbling: 10s}}
    parallelism: {parallelism}
    config:
      query: SELECT device, count(*) AS n, sum(value) AS total FROM readings GROUP BY device
  scored:
    kind: anomaly
    inputs: [per_device]
    parallelism: {parallelism}
    config: {{value: total, key: device, detector: zscore, zscore: {{min_history: 3}}}}
sinks:
  out:
    kind: file
    inputs: [scored]
    config: {{path: "{out}", timestamps: epoch_ms, append: true}}
"#,
        input = input.display(),
        out = out.display(),
    );
    let file = dir.join("kill-follow.yaml");
    std::fs::write(&file, yaml).expect("the pipeline file is written");
    file
}

/// Line `i` of the followed file; past `FOLLOW_RATE * FOLLOW_SECONDS`, one closer per
/// device far ahead in event time, which closes every window before it.
fn follow_line(i: usize) -> String {
    let total = FOLLOW_RATE * FOLLOW_SECONDS;
    let device = format!("d{}", i % DEVICES);
    if i >= total {
        let ts = START_MS + 3_600_000;
        return format!(r#"{{"device":"{device}","ts":{ts},"value":0}}"#);
    }
    let ts = START_MS + i as i64 * FOLLOW_STEP_MS;
    // Mostly steady, with the odd burst for the detector to score.
    let value = (i as i64 * 7919) % 100 + if i.is_multiple_of(397) { 5000 } else { 0 };
    format!(r#"{{"device":"{device}","ts":{ts},"value":{value}}}"#)
}

/// Every scored window in the output by (device, window start); a window written twice
/// fails the test.
fn scored_windows(path: &Path) -> BTreeMap<(String, i64), serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut windows = BTreeMap::new();
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a torn or bad line {line:?}: {e}"));
        let key = (
            row["device"].as_str().expect("device").to_owned(),
            row["window_start"].as_i64().expect("window_start"),
        );
        assert!(
            windows.insert(key.clone(), row).is_none(),
            "window {key:?} written twice"
        );
    }
    windows
}

/// Runs `file` until the output holds `windows` scored windows, then stops it with
/// SIGTERM, which drains the closers' windows too.
fn finish(mut weir: Running, out: &Path, windows: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while scored_windows(out).len() < windows {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {windows} windows written: {:?}",
            scored_windows(out).len(),
            weir.stderr_seen
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    weir.signal("TERM");
    assert_eq!(weir.wait_exit(Duration::from_secs(30)), Some(0));
}

#[test]
fn a_followed_file_scored_per_window_survives_kill_9_exactly_once() {
    followed_file_survives_kill_9(1);
}

#[test]
fn parallel_instances_checkpoint_their_own_keys_and_survive_kill_9_exactly_once() {
    // Each of two instances restores its own keys' windows and series after every kill,
    // and the output is what one uninterrupted instance makes of the file.
    followed_file_survives_kill_9(2);
}

/// Kills and restarts a runtime whose stateful transforms run as `parallelism`
/// instances, while the file it follows grows, and compares its output with an
/// uninterrupted single-instance run's.
fn followed_file_survives_kill_9(parallelism: usize) {
    use std::io::Write;
    let total = FOLLOW_RATE * FOLLOW_SECONDS;
    let lines: Vec<String> = (0..total + DEVICES).map(follow_line).collect();
    // Each device's windows over the readings, without the closers'.
    let windows = DEVICES * (total as i64 * FOLLOW_STEP_MS / 10_000) as usize;

    // The uninterrupted run, over the whole file.
    let reference = tempfile::tempdir().unwrap();
    let input = reference.path().join("readings.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = reference.path().join("scored.jsonl");
    let file = follow_pipeline(reference.path(), &input, &out, 1);
    finish(
        start(&file, &reference.path().join("state"), STARTED),
        &out,
        windows,
    );
    let want = scored_windows(&out);
    assert!(
        want.values().any(|row| row["is_anomaly"] == true),
        "the bursts should be anomalies"
    );

    // The file grows while the runtime is killed and restarted.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("readings.jsonl");
    std::fs::write(&input, "").unwrap();
    let out = dir.path().join("scored.jsonl");
    let file = follow_pipeline(dir.path(), &input, &out, parallelism);
    let state = dir.path().join("state");
    let mut weir = start(&file, &state, STARTED);
    let writer = {
        let lines = lines.clone();
        let input = input.clone();
        std::thread::spawn(move || {
            let mut appending = std::fs::OpenOptions::new()
                .append(true)
                .open(&input)
                .expect("the followed file opens");
            let per_tick = FOLLOW_RATE / 10;
            for chunk in lines[..total].chunks(per_tick) {
                let text: String = chunk.iter().map(|line| format!("{line}\n")).collect();
                appending
                    .write_all(text.as_bytes())
                    .expect("a chunk is appended");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut random = rand_chacha::ChaCha8Rng::seed_from_u64(23);
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(random.random_range(1_500..4_500)));
        weir.child.kill().expect("kill -9");
        weir.child.wait().expect("the killed runtime is reaped");
        weir = start(&file, &state, STARTED);
    }
    writer.join().expect("the writer finished");
    let closers: String = lines[total..]
        .iter()
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .and_then(|mut file| file.write_all(closers.as_bytes()))
        .expect("the closers are appended");
    finish(weir, &out, windows);
    let got = scored_windows(&out);
    let missing: Vec<_> = want.keys().filter(|key| !got.contains_key(*key)).collect();
    assert!(missing.is_empty(), "windows missing: {missing:?}");
    assert_eq!(
        got, want,
        "every window once, scored as in the uninterrupted run"
    );
}

#[test]
fn a_change_of_parallelism_starts_the_transforms_afresh_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("readings.jsonl");
    let lines: String = (0..600).map(|i| format!("{}\n", follow_line(i))).collect();
    std::fs::write(&input, lines).unwrap();
    let out = dir.path().join("scored.jsonl");
    let state = dir.path().join("state");
    let rescaled = "its parallelism changed since the last checkpoint";
    let mut logs = Vec::new();
    for parallelism in [1, 2, 4] {
        let file = follow_pipeline(dir.path(), &input, &out, parallelism);
        let mut weir = start(&file, &state, STARTED);
        // Past a checkpoint (every second) of the lines already in the file.
        std::thread::sleep(Duration::from_millis(2_500));
        weir.signal("TERM");
        assert_eq!(weir.wait_exit(Duration::from_secs(30)), Some(0));
        logs.push(weir.stderr_seen.join("\n"));
    }
    assert!(!logs[0].contains(rescaled), "{}", logs[0]);
    for (log, scale) in logs[1..].iter().zip(["1 to 2", "2 to 4"]) {
        for node in ["per_device", "scored"] {
            let said = log
                .lines()
                .filter(|line| line.contains(rescaled) && line.contains(node))
                .count();
            assert_eq!(said, 1, "from {scale} instances, {node}:\n{log}");
        }
        assert!(
            !log.contains("no longer in the pipeline"),
            "from {scale} instances:\n{log}"
        );
    }
}
