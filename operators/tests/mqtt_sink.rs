//! The `mqtt` sink, and MQTT over TLS, against a real Mosquitto. Pipelines are written in
//! YAML and built by the pipeline loader, as users run them; `mosquitto_sub` is the
//! independent peer that checks what reached the broker.

use std::path::Path;
use std::time::Duration;

use serde_json::Value as Json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_engine::PipelineError;
use weir_engine::metrics::EngineMetrics;
use weir_testkit::{Broker, Pki, WAIT};

/// A pipeline running in the background, with its own metrics registry.
struct Running {
    handle: JoinHandle<Result<(), PipelineError>>,
    cancel: CancellationToken,
    metrics: prometheus::Registry,
}

/// Validates `yaml` (files relative to `dir`), builds it and starts it.
fn start(yaml: &str, dir: &Path) -> Running {
    let registry = weir_operators::registry::builtin();
    let no_env = |_: &str| None;
    let validated =
        weir_pipelines::validate_str(&dir.join("pipeline.yaml"), yaml, &registry, &no_env, dir)
            .unwrap_or_else(|problems| panic!("the pipeline is invalid: {problems:#?}"));
    let metrics = prometheus::Registry::new();
    let pipeline = validated
        .build(&EngineMetrics::new(&metrics).expect("metrics register"))
        .expect("the pipeline builds");
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(pipeline.run(cancel.clone()));
    Running {
        handle,
        cancel,
        metrics,
    }
}

impl Running {
    /// Waits for the pipeline to end by itself and returns how it ended.
    async fn finish(self) -> Result<(), PipelineError> {
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("the pipeline ends in time")
            .expect("the pipeline task does not panic")
    }

    /// The value of a gauge or counter of the sink node `node`.
    fn metric(&self, name: &str, node: &str) -> f64 {
        self.metrics
            .gather()
            .iter()
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric().iter())
            .filter(|metric| {
                metric
                    .get_label()
                    .iter()
                    .any(|label| label.name() == "operator" && label.value() == node)
            })
            // A sample is a gauge or a counter; the other reads as 0.
            .map(|metric| metric.get_gauge().get_value() + metric.get_counter().get_value())
            .sum()
    }

    async fn wait_metric(&self, name: &str, node: &str, wanted: impl Fn(f64) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !wanted(self.metric(name, node)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} of {node} stayed at {}",
                self.metric(name, node)
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Writes `rows` as JSON lines to `dir/readings.jsonl`.
fn readings_file(dir: &Path, rows: &[(&str, i64, f64)]) {
    let text: String = rows
        .iter()
        .map(|(device, ts, t)| format!(r#"{{"device":"{device}","ts":{ts},"temperature":{t}}}"#))
        .map(|line| line + "\n")
        .collect();
    std::fs::write(dir.join("readings.jsonl"), text).unwrap();
}

const FILE_SOURCE: &str = "\
sources:
  readings:
    kind: file
    schema: {device: utf8, ts: timestamp_ms, temperature: float64}
    config: {path: readings.jsonl, format: json}
";

fn json(payload: &str) -> Json {
    serde_json::from_str(payload).unwrap_or_else(|e| panic!("not JSON ({e}): {payload}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_published_one_per_message_on_their_topics() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "allow_anonymous true");
    let subscriber = broker.subscribe("alerts/#", 1, None);
    readings_file(
        dir.path(),
        &[
            ("d1", 1_000, 70.5),
            ("d2", 2_000, 20.0),
            ("d1", 3_000, 71.0),
        ],
    );
    let yaml = format!(
        "version: 1\nname: sink\n{FILE_SOURCE}sinks:\n  alerts:\n    kind: mqtt\n    \
         inputs: [readings]\n    config: {{url: \"{}\", topic: \"alerts/{{device}}\", qos: 1, \
         timestamps: epoch_ms}}\n",
        broker.url()
    );
    // The pipeline ends when the file is read; the sink ends only once the broker has acked.
    start(&yaml, dir.path()).finish().await.unwrap();
    let messages = subscriber.wait_for(3).await;
    let topics: Vec<&str> = messages.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, ["alerts/d1", "alerts/d2", "alerts/d1"]);
    assert_eq!(
        json(&messages[0].1),
        json(r#"{"device": "d1", "ts": 1000, "temperature": 70.5}"#)
    );
    assert_eq!(json(&messages[1].1)["temperature"], 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_become_json_arrays_per_topic_and_retained_messages_stay() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "allow_anonymous true");
    readings_file(
        dir.path(),
        &[("d1", 1_000, 1.0), ("d2", 2_000, 2.0), ("d1", 3_000, 3.0)],
    );
    let yaml = format!(
        "version: 1\nname: arrays\n{FILE_SOURCE}sinks:\n  out:\n    kind: mqtt\n    \
         inputs: [readings]\n    config: {{url: \"{}\", topic: \"state/{{device}}\", \
         format: json_array, qos: 0, retain: true}}\n",
        broker.url()
    );
    start(&yaml, dir.path()).finish().await.unwrap();
    // Subscribing after the fact: only retained messages can arrive.
    let subscriber = broker.subscribe("state/#", 0, None);
    let mut messages = subscriber.wait_for(2).await;
    messages.sort();
    assert_eq!(messages[0].0, "state/d1");
    let d1 = json(&messages[0].1);
    let temperatures: Vec<f64> = d1
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|row| row["temperature"].as_f64().unwrap())
        .collect();
    assert_eq!(temperatures, [1.0, 3.0]);
    assert_eq!(json(&messages[1].1)[0]["ts"], "1970-01-01T00:00:02Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_publishing_loses_nothing_across_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), "allow_anonymous true\nmax_queued_messages 0");
    // A persistent QoS 1 subscriber: the broker keeps its messages while it reconnects.
    let subscriber = broker.subscribe("load/#", 1, Some("checker"));
    const ROWS: usize = 3000;
    let yaml = format!(
        "version: 1\nname: restart\nsources:\n  gen:\n    kind: generator\n    config:\n      \
         devices: 3\n      interval: 2ms\n      count: {ROWS}\n      realtime: true\n      \
         batch_rows: 30\n      start: 2026-01-01T00:00:00Z\n      \
         fields: {{temperature: {{shape: constant, base: 1}}}}\n\
         sinks:\n  out:\n    kind: mqtt\n    inputs: [gen]\n    config:\n      url: \"{}\"\n      \
         topic: \"load/{{device}}\"\n      qos: 1\n      max_in_flight: 20\n      \
         reconnect_initial_delay: 50ms\n      reconnect_max_delay: 200ms\n      timestamps: epoch_ms\n",
        broker.url()
    );
    // 1000 ticks of 3 rows, paced 2 ms apart: the broker restarts mid-stream.
    let running = start(&yaml, dir.path());
    running
        .wait_metric("weir_operator_connected", "out", |v| v == 1.0)
        .await;
    running
        .wait_metric("weir_operator_rows_in_total", "out", |v| v >= 300.0)
        .await;
    broker.stop();
    running
        .wait_metric("weir_operator_connected", "out", |v| v == 0.0)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.resume();
    running
        .wait_metric("weir_operator_reconnects_total", "out", |v| v >= 1.0)
        .await;
    running.finish().await.unwrap();
    // At least once: a message whose ack was lost with the connection comes twice.
    let distinct = |messages: &[(String, String)]| {
        let mut keys: Vec<(String, i64)> = messages
            .iter()
            .map(|(topic, payload)| (topic.clone(), json(payload)["ts"].as_i64().unwrap()))
            .collect();
        keys.sort();
        keys.dedup();
        keys.len()
    };
    subscriber
        .wait_until("every row at least once", |messages| {
            distinct(messages) == ROWS
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_with_a_wrong_password_fails_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_password(dir.path(), "weir", "right");
    readings_file(dir.path(), &[("d1", 1, 1.0)]);
    let yaml = format!(
        "version: 1\nname: denied\n{FILE_SOURCE}sinks:\n  out:\n    kind: mqtt\n    \
         inputs: [readings]\n    config: {{url: \"{}\", topic: t, username: weir, \
         password: wrong}}\n",
        broker.url()
    );
    let error = start(&yaml, dir.path())
        .finish()
        .await
        .expect_err("a refused login fails the pipeline")
        .to_string();
    assert!(
        error.contains(&format!(
            "mqtt broker 127.0.0.1:{} refused the connection: bad user name or password",
            broker.port()
        )),
        "{error}"
    );
    assert!(error.contains("'out'"), "the error names the sink: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_carries_messages_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let broker = Broker::start_tls(dir.path(), &pki, true, "allow_anonymous true");
    let subscriber = broker.subscribe("out/#", 1, None);
    // mqtt (TLS) -> sql -> mqtt (TLS), both with a client certificate.
    let tls = "tls: {ca_file: ca.pem, cert_file: client.pem, key_file: client.key}";
    let yaml = format!(
        "version: 1\nname: tls\nsources:\n  inbound:\n    kind: mqtt\n    \
         schema: {{device: utf8, temperature: float64}}\n    config:\n      url: \"{url}\"\n      \
         topics: [in]\n      linger: 10ms\n      {tls}\n\
         transforms:\n  hot:\n    kind: sql\n    inputs: [inbound]\n    \
         config: {{query: \"SELECT device, temperature FROM inbound WHERE temperature > 50\"}}\n\
         sinks:\n  outbound:\n    kind: mqtt\n    inputs: [hot]\n    config:\n      \
         url: \"{url}\"\n      topic: \"out/{{device}}\"\n      {tls}\n",
        url = broker.url()
    );
    let running = start(&yaml, dir.path());
    running
        .wait_metric("weir_operator_connected", "inbound", |v| v == 1.0)
        .await;
    running
        .wait_metric("weir_operator_connected", "outbound", |v| v == 1.0)
        .await;
    // The source subscribes right after connecting; give the SUBACK a moment.
    let deadline = tokio::time::Instant::now() + WAIT;
    while subscriber.messages().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing came through TLS"
        );
        broker
            .publish(
                "in",
                &[
                    r#"{"device": "cold", "temperature": 10}"#,
                    r#"{"device": "boiler", "temperature": 90}"#,
                ],
                1,
            )
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let messages = subscriber.messages();
    assert!(
        messages.iter().all(|(topic, _)| topic == "out/boiler"),
        "{messages:?}"
    );
    assert_eq!(json(&messages[0].1)["temperature"], 90.0);
    running.cancel.cancel();
    running.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_broker_certificate_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let broker = Broker::start_tls(dir.path(), &pki, false, "allow_anonymous true");
    readings_file(dir.path(), &[("d1", 1, 1.0)]);
    let yaml = format!(
        "version: 1\nname: untrusted\n{FILE_SOURCE}sinks:\n  out:\n    kind: mqtt\n    \
         inputs: [readings]\n    config: {{url: \"{}\", topic: t, tls: {{ca_file: other-ca.pem}}}}\n",
        broker.url()
    );
    let error = start(&yaml, dir.path())
        .finish()
        .await
        .expect_err("an untrusted certificate fails the pipeline")
        .to_string();
    assert!(
        error.contains("certificate") && error.contains("tls.ca_file"),
        "{error}"
    );
}
