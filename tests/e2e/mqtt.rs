//! The MQTT example pipelines, run by the real `weir` binary against a test broker: what
//! goes in with `mosquitto_pub` must come out, computed right, at `mosquitto_sub`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use weir_testkit::{Broker, Subscriber};

use crate::support::{Running, repo};

/// 2026-01-01T00:00:00Z in epoch milliseconds: the first reading's event time.
pub(crate) const START_MS: i64 = 1_767_225_600_000;

/// One reading of the W1 workload, as the example expects it on `weir/w1/<device>/telemetry`.
pub(crate) struct Reading {
    pub(crate) device: String,
    pub(crate) ts: i64,
    pub(crate) temperature: f64,
    pub(crate) humidity: f64,
}

impl Reading {
    pub(crate) fn payload(&self) -> String {
        format!(
            r#"{{"ts": {}, "temperature": {}, "humidity": {}}}"#,
            self.ts, self.temperature, self.humidity
        )
    }
}

/// 25 s of readings, every 100 ms, from three devices.
fn readings() -> Vec<Reading> {
    let mut readings = Vec::new();
    for k in 0..250i64 {
        for d in 1..=3i64 {
            readings.push(Reading {
                device: format!("dev-{d}"),
                ts: START_MS + k * 100,
                temperature: 20.0 + d as f64 + (k % 7) as f64 * 0.25,
                humidity: 40.0 + (k % 5) as f64,
            });
        }
    }
    readings
}

/// The W1 aggregates of `readings`, keyed by (device, window_start).
pub(crate) fn expected_windows(readings: &[Reading]) -> BTreeMap<(String, i64), [f64; 5]> {
    let mut groups: BTreeMap<(String, i64), Vec<&Reading>> = BTreeMap::new();
    for reading in readings {
        let start = reading.ts - (reading.ts - START_MS).rem_euclid(10_000);
        groups
            .entry((reading.device.clone(), start))
            .or_default()
            .push(reading);
    }
    groups
        .into_iter()
        .map(|(key, rows)| {
            let n = rows.len() as f64;
            let temps = rows.iter().map(|r| r.temperature);
            let value = [
                n,
                temps.clone().sum::<f64>() / n,
                temps.clone().fold(f64::INFINITY, f64::min),
                temps.fold(f64::NEG_INFINITY, f64::max),
                rows.iter().map(|r| r.humidity).sum::<f64>() / n,
            ];
            (key, value)
        })
        .collect()
}

/// Starts `weir run` on an example with `MQTT_URL` pointing at `broker`, and waits until
/// its source has subscribed.
fn run_example(name: &str, broker: &Broker) -> Running {
    let file = repo().join("pipelines/examples").join(name);
    let url = broker.url();
    let mut weir = Running::start(
        &["run", "--no-metrics", file.to_str().expect("a UTF-8 path")],
        &[("MQTT_URL", url.as_str())],
    );
    weir.wait_for_log("mqtt subscribed to", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{name} never subscribed: {:?}", weir.stderr_seen));
    weir
}

/// Publishes each (topic, payload) in order, one `mosquitto_pub` per run of one topic.
async fn publish_in_order(broker: &Broker, messages: &[(String, String)]) {
    let mut start = 0;
    while start < messages.len() {
        let topic = &messages[start].0;
        let end = messages[start..]
            .iter()
            .position(|(t, _)| t != topic)
            .map_or(messages.len(), |n| start + n);
        let payloads: Vec<&str> = messages[start..end]
            .iter()
            .map(|(_, p)| p.as_str())
            .collect();
        broker.publish(topic, &payloads, 1).await;
        start = end;
    }
}

pub(crate) fn parse(messages: &[(String, String)]) -> Vec<(String, Value)> {
    messages
        .iter()
        .map(|(topic, payload)| {
            let value = serde_json::from_str(payload)
                .unwrap_or_else(|e| panic!("{topic}: not JSON ({e}): {payload}"));
            (topic.clone(), value)
        })
        .collect()
}

pub(crate) fn assert_close(actual: &Value, expected: f64, what: &str) {
    let actual = actual
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {actual}"));
    assert!(
        (actual - expected).abs() < 1e-9,
        "{what}: {actual} != {expected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_window_example_publishes_the_w1_windows_of_what_it_receives() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "allow_anonymous true");
    let windows: Subscriber = broker.subscribe("weir/w1/+/window", 1, None);
    let mut weir = run_example("mqtt-window.yaml", &broker);

    let readings = readings();
    // Interleaved by event time in chunks of 1 s per device: within the example's 1 s
    // allowance for disorder, so no reading is late.
    let mut chunks: BTreeMap<(i64, String), Vec<String>> = BTreeMap::new();
    for r in &readings {
        let chunk = (r.ts - START_MS) / 1_000;
        chunks
            .entry((chunk, r.device.clone()))
            .or_default()
            .push(r.payload());
    }
    let mut messages: Vec<(String, String)> = Vec::new();
    for ((_, device), payloads) in chunks {
        let topic = format!("weir/w1/{device}/telemetry");
        messages.extend(payloads.into_iter().map(|p| (topic.clone(), p)));
    }
    // A reading at 31.5 s moves the watermark past 30 s: the three windows of every
    // device close. It opens a fourth window for dev-1, which closes at shutdown.
    let flush = Reading {
        device: "dev-1".into(),
        ts: START_MS + 31_500,
        temperature: 99.0,
        humidity: 50.0,
    };
    messages.push(("weir/w1/dev-1/telemetry".into(), flush.payload()));
    messages.push(("weir/w1/dev-1/telemetry".into(), "{not json".into()));
    publish_in_order(&broker, &messages).await;

    let expected = expected_windows(&readings);
    assert_eq!(expected.len(), 9);
    let received = parse(&windows.wait_for(9).await);
    assert_eq!(received.len(), 9, "{received:?}");
    for (topic, row) in &received {
        let device = row["device"].as_str().expect("a device").to_owned();
        assert_eq!(topic, &format!("weir/w1/{device}/window"));
        let start = row["window_start"].as_i64().expect("epoch ms");
        assert_eq!(row["window_end"].as_i64(), Some(start + 10_000));
        let want = expected
            .get(&(device.clone(), start))
            .unwrap_or_else(|| panic!("unexpected window {row}"));
        assert_eq!(row["count"].as_f64(), Some(want[0]), "{row}");
        assert_close(&row["avg_temperature"], want[1], "avg_temperature");
        assert_close(&row["min_temperature"], want[2], "min_temperature");
        assert_close(&row["max_temperature"], want[3], "max_temperature");
        assert_close(&row["avg_humidity"], want[4], "avg_humidity");
    }
    // The malformed reading is reported on the dead-letter sink (stdout), not fatal.
    weir.signal("TERM");
    assert_eq!(weir.wait_exit(Duration::from_secs(20)), Some(0));
    // Shutting down closes the open window and publishes it before the sink disconnects.
    let all = parse(&windows.wait_for(10).await);
    let last = &all[9].1;
    assert_eq!(last["device"], "dev-1");
    assert_eq!(last["window_start"].as_i64(), Some(START_MS + 30_000));
    assert_eq!(last["count"].as_f64(), Some(1.0));
    let mut stdout = String::new();
    use std::io::Read;
    weir.child
        .stdout
        .take()
        .expect("stdout is piped")
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(stdout.contains(r#""payload":"{not json""#), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_alerts_example_republishes_only_hot_readings() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "allow_anonymous true");
    let alerts = broker.subscribe("alerts/#", 1, None);
    let mut weir = run_example("mqtt-alerts.yaml", &broker);
    let messages: Vec<(String, String)> = [
        ("plant/north/boiler-1/telemetry", 91.5),
        ("plant/north/boiler-2/telemetry", 60.0),
        ("plant/south/pump-7/telemetry", 85.0),
    ]
    .iter()
    .map(|(topic, t)| {
        (
            topic.to_string(),
            format!(r#"{{"ts": {START_MS}, "temperature": {t}}}"#),
        )
    })
    .collect();
    publish_in_order(&broker, &messages).await;
    let received = parse(&alerts.wait_for(2).await);
    let topics: Vec<&str> = received.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, ["alerts/north/boiler-1", "alerts/south/pump-7"]);
    assert_eq!(received[1].1["reason"], "temperature above 80");
    assert_eq!(received[1].1["site"], "south");
    weir.signal("TERM");
    assert_eq!(weir.wait_exit(Duration::from_secs(20)), Some(0));
    assert_eq!(alerts.messages().len(), 2, "nothing else was published");
}

/// A quiet MQTT source publishes its last window without a later reading: after the
/// source's `idle_timeout` its watermark advances with the wall clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_mqtt_source_closes_its_last_window_after_its_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "allow_anonymous true");
    let windows: Subscriber = broker.subscribe("quiet/+/window", 1, None);
    let pipeline = dir.path().join("quiet.yaml");
    std::fs::write(
        &pipeline,
        format!(
            r#"version: 1
name: quiet
sources:
  readings:
    kind: mqtt
    schema: {{device: utf8, ts: timestamp_ms, temperature: float64}}
    event_time: {{column: ts, max_out_of_order: 1s, idle_timeout: 2s}}
    config: {{url: "{}", topics: ["quiet/+/telemetry"], topic_pattern: "quiet/{{device}}/telemetry", qos: 1}}
transforms:
  per_device:
    kind: sql
    inputs: [readings]
    window: {{tumbling: 10s}}
    config: {{query: "SELECT device, count(*) AS n FROM readings GROUP BY device"}}
sinks:
  windows:
    kind: mqtt
    inputs: [per_device]
    config: {{url: "{}", topic: "quiet/{{device}}/window", qos: 1, timestamps: epoch_ms}}
"#,
            broker.url(),
            broker.url()
        ),
    )
    .unwrap();
    let mut weir = Running::start(&["run", "--no-metrics", pipeline.to_str().unwrap()], &[]);
    weir.wait_for_log("mqtt subscribed to", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("never subscribed: {:?}", weir.stderr_seen));
    // 20 readings inside [30 s, 40 s), then silence: the watermark stops at 38.5 s.
    let payloads: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#"{{"ts": {}, "temperature": 20}}"#,
                START_MS + 30_000 + i * 500
            )
        })
        .collect();
    let payloads: Vec<&str> = payloads.iter().map(String::as_str).collect();
    broker.publish("quiet/dev-1/telemetry", &payloads, 1).await;
    // Without idleness nothing would come before shutdown; with it, the window closes
    // about 2 s after the last reading.
    let received = parse(&windows.wait_for(1).await);
    let row = &received[0].1;
    assert_eq!(row["window_start"].as_i64(), Some(START_MS + 30_000));
    assert_eq!(row["n"].as_i64(), Some(20), "{row}");
    assert!(
        weir.child.try_wait().unwrap().is_none(),
        "weir is still running"
    );
    weir.signal("TERM");
    assert_eq!(weir.wait_exit(Duration::from_secs(20)), Some(0));
}
