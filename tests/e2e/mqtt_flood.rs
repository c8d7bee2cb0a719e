//! The MQTT window example under a flood: 200,000 QoS 1 messages over 1000 device topics,
//! malformed ones mixed in, from a publisher as fast as Mosquitto takes them. Every
//! window must come out, equal field by field to what the test computes, both with
//! Weir up during the flood and with Weir started after it, draining the backlog that
//! its persistent session queued at the broker.

use std::io::Read;
use std::time::Duration;

use weir_testkit::{Broker, Subscriber, flood};

use crate::mqtt::{Reading, START_MS, assert_close, expected_windows, parse};
use crate::support::{Running, http_get, metric_value, repo};

const DEVICES: usize = 1000;
const MESSAGES: usize = 200_000;
/// Every this many messages, one is malformed.
const MALFORMED_EVERY: usize = 997;
/// Stock Mosquitto but for its queue limits: it would otherwise drop all but 1000 of
/// the messages queued for a subscriber that is behind or away.
const BROKER_CONFIG: &str = "allow_anonymous true\nmax_queued_messages 1000000";
/// The example's source: the operator whose connection series are checked.
const SOURCE: &str = "readings";

/// What the flood sends, and the readings among it.
struct Flood {
    messages: Vec<(String, String)>,
    readings: Vec<Reading>,
    malformed: usize,
}

/// One reading per device per second of event time over 200 s, sent round by round; the
/// order within a round is shuffled by up to 1 s of event time, inside the example's
/// allowance, so no reading is late. A last reading at 211 s moves the watermark past
/// the end of every window; it opens one more, which closes at shutdown.
fn flood_messages() -> Flood {
    let mut messages = Vec::with_capacity(MESSAGES + 1);
    let mut readings = Vec::with_capacity(MESSAGES + 1);
    let mut malformed = 0;
    for i in 0..MESSAGES {
        let (round, d) = ((i / DEVICES) as i64, i % DEVICES);
        let device = format!("dev-{d:04}");
        let topic = format!("weir/w1/{device}/telemetry");
        if i % MALFORMED_EVERY == MALFORMED_EVERY - 1 {
            let payload = match malformed % 3 {
                0 => "{not json".to_owned(),
                1 => format!(r#"{{"ts": "soon", "temperature": {d}}}"#),
                _ => "[1, 2, 3]".to_owned(),
            };
            messages.push((topic, payload));
            malformed += 1;
            continue;
        }
        // Multiples of 1/4 add up exactly, so the test's sums match DataFusion's.
        let noise = weir_testkit::noise(i as u64, 7);
        let reading = Reading {
            device,
            ts: START_MS + round * 1_000 + (d as i64 * 7919) % 1_000,
            temperature: 15.0 + (noise * 80.0).floor() * 0.25,
            humidity: 30.0 + (i % 40) as f64 * 0.5,
        };
        messages.push((topic, reading.payload()));
        readings.push(reading);
    }
    let last = Reading {
        device: "dev-0000".into(),
        ts: START_MS + 211_000,
        temperature: 99.0,
        humidity: 50.0,
    };
    messages.push(("weir/w1/dev-0000/telemetry".into(), last.payload()));
    Flood {
        messages,
        readings,
        malformed,
    }
}

/// `weir run` of the window example against `broker`, serving metrics on a free port.
fn start_example(broker: &Broker) -> (Running, String) {
    let file = repo().join("pipelines/examples/mqtt-window.yaml");
    let url = broker.url();
    let mut weir = Running::start(
        &[
            "run",
            file.to_str().expect("a UTF-8 path"),
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[("MQTT_URL", url.as_str())],
    );
    let addr = weir.metrics_addr();
    weir.wait_for_log("mqtt connected to", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("weir never connected: {:?}", weir.stderr_seen));
    (weir, addr)
}

/// Reads the process's stdout (the dead-letter sink) on a thread, so a full pipe never
/// holds the pipeline up.
fn collect_stdout(weir: &mut Running) -> std::thread::JoinHandle<String> {
    let mut stdout = weir.child.stdout.take().expect("stdout is piped");
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    })
}

fn source_metric(addr: &str, metric: &str) -> Option<f64> {
    metric_value(&http_get(addr, "/metrics"), metric, &[("operator", SOURCE)])
}

/// Waits until the source's `metric` satisfies `done`.
async fn wait_metric(addr: &str, metric: &str, done: impl Fn(f64) -> bool) {
    let deadline = tokio::time::Instant::now() + weir_testkit::WAIT;
    loop {
        let value = source_metric(addr, metric);
        if value.is_some_and(&done) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{metric} of {SOURCE} is {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every window the flood's readings make is published, and equals the test's
/// aggregate; the malformed messages went to dead letter; every message was acked.
async fn check_windows(load: &Flood, windows: &Subscriber, weir: &mut Running, addr: &str) {
    let stdout = collect_stdout(weir);
    let expected = expected_windows(&load.readings);
    assert_eq!(expected.len(), 20 * DEVICES);
    let received = parse(&windows.wait_for_stream(expected.len()).await);
    let mut seen = std::collections::BTreeSet::new();
    for (topic, row) in &received[..expected.len()] {
        let device = row["device"].as_str().expect("a device").to_owned();
        assert_eq!(topic, &format!("weir/w1/{device}/window"));
        let start = row["window_start"].as_i64().expect("epoch ms");
        assert_eq!(row["window_end"].as_i64(), Some(start + 10_000), "{row}");
        let want = expected
            .get(&(device.clone(), start))
            .unwrap_or_else(|| panic!("unexpected window {row}"));
        assert!(
            seen.insert((device, start)),
            "window published twice: {row}"
        );
        assert_eq!(row["count"].as_f64(), Some(want[0]), "{row}");
        assert_close(&row["avg_temperature"], want[1], "avg_temperature");
        assert_close(&row["min_temperature"], want[2], "min_temperature");
        assert_close(&row["max_temperature"], want[3], "max_temperature");
        assert_close(&row["avg_humidity"], want[4], "avg_humidity");
    }
    // Every message was acked: none waits at the broker or in Weir.
    wait_metric(addr, "weir_operator_connected", |v| v == 1.0).await;
    wait_metric(addr, "weir_operator_in_flight_messages", |v| v == 0.0).await;
    wait_metric(addr, "weir_operator_ack_backlog", |v| v == 0.0).await;
    let body = http_get(addr, "/metrics");
    let rejected = metric_value(
        &body,
        "weir_operator_rejected_rows_total",
        &[("operator", SOURCE), ("reason", "bad_payload")],
    );
    assert_eq!(rejected, Some(load.malformed as f64));
    let rows = metric_value(
        &body,
        "weir_operator_rows_out_total",
        &[("operator", SOURCE)],
    );
    // Readings and dead letters: every message came out of the source.
    assert_eq!(rows, Some(load.messages.len() as f64));

    // Shutting down publishes the window the last reading opened.
    weir.signal("TERM");
    assert_eq!(weir.wait_exit(Duration::from_secs(30)), Some(0));
    let all = parse(&windows.wait_for(expected.len() + 1).await);
    let last = &all[expected.len()].1;
    assert_eq!(last["device"], "dev-0000");
    assert_eq!(last["window_start"].as_i64(), Some(START_MS + 210_000));
    assert_eq!(last["count"].as_f64(), Some(1.0));
    let dead_letters = stdout.join().expect("stdout reader");
    assert_eq!(
        dead_letters.lines().count(),
        load.malformed,
        "one dead-letter row per malformed message"
    );
    assert!(dead_letters.contains(r#""payload":"{not json""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_window_comes_out_of_a_flood_while_weir_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), BROKER_CONFIG);
    let windows = broker.subscribe("weir/w1/+/window", 1, None);
    let before = broker.subscriptions_to("weir/w1/+/telemetry");
    let (mut weir, addr) = start_example(&broker);
    broker.wait_subscribed("weir/w1/+/telemetry", before);

    let load = flood_messages();
    let sent = flood(broker.port(), "flood", load.messages.clone(), 1)
        .await
        .expect("the flood reaches the broker");
    assert_eq!(sent, MESSAGES as u64 + 1);
    check_windows(&load, &windows, &mut weir, &addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_window_comes_out_of_a_backlog_replayed_from_the_persistent_session() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), BROKER_CONFIG);
    // The first run makes the session and its subscription, then Weir goes away.
    let before = broker.subscriptions_to("weir/w1/+/telemetry");
    let (mut weir, _) = start_example(&broker);
    broker.wait_subscribed("weir/w1/+/telemetry", before);
    weir.signal("TERM");
    assert_eq!(weir.wait_exit(Duration::from_secs(30)), Some(0));
    drop(weir);
    let subscribed = broker.subscriptions_to("weir/w1/+/telemetry");

    // The broker queues the whole flood for the session.
    let load = flood_messages();
    let sent = flood(broker.port(), "flood", load.messages.clone(), 1)
        .await
        .expect("the flood reaches the broker");
    assert_eq!(sent, MESSAGES as u64 + 1);

    let windows = broker.subscribe("weir/w1/+/window", 1, None);
    let (mut weir, addr) = start_example(&broker);
    check_windows(&load, &windows, &mut weir, &addr).await;
    assert_eq!(
        broker.subscriptions_to("weir/w1/+/telemetry"),
        subscribed,
        "the second run resumed the session instead of subscribing again"
    );
}
