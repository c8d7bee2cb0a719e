//! The `mqtt` source against a real Mosquitto: each test starts its own broker on a free
//! loopback port with a generated config (see `weir-testkit`), publishes with
//! `mosquitto_pub`, and runs the source in a pipeline whose sinks collect what arrives on
//! each port. Every wait is bounded, so a broken source fails a test instead of hanging.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_engine::config::{ConfigValue, Value};
use weir_engine::graph::{InputRef, PipelineBuilder};
use weir_engine::metrics::EngineMetrics;
use weir_engine::registry::{MAIN_PORT_NAME, NodeContext, Role};
use weir_engine::{OperatorError, OperatorInstance, PipelineError, Sink};
use weir_testkit::{Broker, WAIT, require_mosquitto};

/// The probe device: rows the tests publish only to learn that the subscription is live.
const PROBE: &str = "probe";

/// A YAML config read into the engine's config tree.
fn config(yaml: &str) -> ConfigValue {
    let value = weir_pipelines::parse_yaml(yaml).expect("test yaml parses");
    assert!(matches!(value.value, Value::Map(_)));
    value
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("site", DataType::Utf8, true),
        Field::new("device", DataType::Utf8, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("temperature", DataType::Float64, true),
    ]))
}

type Collected = Arc<Mutex<Vec<RecordBatch>>>;

struct Collect(Collected);

#[async_trait]
impl Sink for Collect {
    async fn write(&mut self, _input: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        self.0.lock().unwrap().push(batch);
        Ok(())
    }
}

/// Collects like [`Collect`], after holding its first batch of more than probes for
/// `stall`: downstream
/// backpressure, as a slow sink makes it.
struct StallThenCollect {
    collected: Collected,
    stall: Option<Duration>,
}

#[async_trait]
impl Sink for StallThenCollect {
    async fn write(&mut self, _input: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        let device = batch.column_by_name("device").unwrap().as_string::<i32>();
        let probes_only = device.iter().all(|d| d == Some(PROBE));
        if !probes_only && let Some(stall) = self.stall.take() {
            tokio::time::sleep(stall).await;
        }
        self.collected.lock().unwrap().push(batch);
        Ok(())
    }
}

/// A pipeline of one mqtt source and two collecting sinks, running in the background.
struct Running {
    main: Collected,
    dead: Collected,
    cancel: CancellationToken,
    handle: JoinHandle<Result<(), PipelineError>>,
    registry: prometheus::Registry,
}

fn start(yaml: &str) -> Running {
    start_stalled(yaml, None)
}

/// As [`start`], with the main port's sink holding its first batch for `stall`.
fn start_stalled(yaml: &str, stall: Option<Duration>) -> Running {
    let config = config(yaml);
    let registry = weir_operators::registry::builtin();
    let factory = registry
        .get(Role::Source, "mqtt")
        .expect("mqtt is registered");
    let node = NodeContext {
        pipeline: "test",
        name: "sensors",
        role: Role::Source,
        config: &config,
        config_path: "sources.sensors.config",
        inputs: &[],
        inputs_known: true,
        schema: Some(schema()),
        event_time: None,
        window: None,
        on_error: weir_engine::registry::OnError::Fail,
        base_dir: Path::new("."),
        peers: &[],
    };
    let planned = match factory.plan(&node) {
        Ok(planned) => planned,
        Err(errors) => panic!("config rejected: {errors:?}"),
    };
    let specs = planned.outputs();
    let instance = planned
        .instantiate(&weir_engine::metrics::OperatorMetrics::detached(
            "test", "node",
        ))
        .expect("source instantiates");
    let (main, dead) = (Collected::default(), Collected::default());
    let mut builder = PipelineBuilder::new("test");
    builder.add_node("src", instance, specs, vec![], None);
    for (name, port, sink) in [
        ("main", MAIN_PORT_NAME, &main),
        ("dead", "dead_letter", &dead),
    ] {
        let sink: Box<dyn Sink> = if name == "main" {
            Box::new(StallThenCollect {
                collected: sink.clone(),
                stall,
            })
        } else {
            Box::new(Collect(sink.clone()))
        };
        builder.add_node(
            name,
            OperatorInstance::Sink(sink),
            vec![],
            vec![InputRef {
                node: "src".into(),
                port: port.into(),
            }],
            None,
        );
    }
    let registry = prometheus::Registry::new();
    let metrics = EngineMetrics::new(&registry).unwrap();
    let pipeline = builder.build(&metrics).expect("pipeline builds");
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(pipeline.run(cancel.clone()));
    Running {
        main,
        dead,
        cancel,
        handle,
        registry,
    }
}

impl Running {
    /// (device, temperature) of every row on the main port except probes.
    fn rows(&self) -> Vec<(String, Option<f64>)> {
        let mut rows = Vec::new();
        for batch in self.main.lock().unwrap().iter() {
            let device = batch.column_by_name("device").unwrap().as_string::<i32>();
            let temp = batch
                .column_by_name("temperature")
                .unwrap()
                .as_primitive::<Float64Type>();
            for i in 0..batch.num_rows() {
                if device.value(i) != PROBE {
                    let t = (!temp.is_null(i)).then(|| temp.value(i));
                    rows.push((device.value(i).to_owned(), t));
                }
            }
        }
        rows
    }

    /// The device of every row on the main port except probes, in arrival order.
    fn devices(&self) -> Vec<String> {
        self.rows().into_iter().map(|(device, _)| device).collect()
    }

    fn probes(&self) -> usize {
        self.main
            .lock()
            .unwrap()
            .iter()
            .map(|b| {
                let device = b.column_by_name("device").unwrap().as_string::<i32>();
                device.iter().filter(|d| *d == Some(PROBE)).count()
            })
            .sum()
    }

    /// (topic, error) of every dead-letter row.
    fn dead(&self) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        for batch in self.dead.lock().unwrap().iter() {
            let topic = batch.column(0).as_string::<i32>();
            let error = batch.column(1).as_string::<i32>();
            for i in 0..batch.num_rows() {
                rows.push((topic.value(i).to_owned(), error.value(i).to_owned()));
            }
        }
        rows
    }

    /// `weir_operator_rejected_rows_total` of the source, by reason.
    fn rejected(&self) -> Vec<(String, u64)> {
        let mut counts: Vec<(String, u64)> = self
            .registry
            .gather()
            .iter()
            .filter(|family| family.name() == "weir_operator_rejected_rows_total")
            .flat_map(|family| family.get_metric().iter())
            .map(|metric| {
                let reason = metric
                    .get_label()
                    .iter()
                    .find(|label| label.name() == "reason")
                    .map(|label| label.value().to_owned())
                    .unwrap_or_default();
                (reason, metric.get_counter().get_value() as u64)
            })
            .collect();
        counts.sort();
        counts
    }

    /// Publishes probes on `topic` until one arrives: the subscription is then live.
    async fn wait_subscribed(&self, broker: &Broker, topic: &str, probe: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.probes() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the source never received a probe"
            );
            assert!(!self.handle.is_finished(), "the pipeline stopped early");
            broker.publish(topic, &[probe], 0).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    async fn wait_for(&self, what: &str, done: impl Fn(&Running) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {} rows, dead {:?}",
                self.rows().len(),
                self.dead()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Cancels the pipeline and waits for it to drain.
    async fn stop(self) -> Self {
        self.cancel.cancel();
        let outcome = tokio::time::timeout(WAIT, &mut { self.handle })
            .await
            .expect("the pipeline stops after cancel")
            .expect("the pipeline task does not panic");
        outcome.expect("the pipeline ends cleanly");
        Running {
            handle: tokio::spawn(async { Ok(()) }),
            ..self
        }
    }
}

/// Runs the source of `yaml` (a persistent session) until it has subscribed on topic
/// `s`, then stops it: the broker keeps the session and queues for it from now on.
async fn make_session(broker: &Broker, yaml: &str) {
    let first = start(yaml);
    first.wait_subscribed(broker, "s", &probe_json()).await;
    first.stop().await;
}

fn reading(device: &str, ts: i64, temperature: f64) -> String {
    format!(r#"{{"device": "{device}", "ts": {ts}, "temperature": {temperature}}}"#)
}

fn probe_json() -> String {
    format!(r#"{{"device": "{PROBE}", "ts": 0}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_round_trip_into_batches() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "allow_anonymous true");
    let pipeline = start(&format!(
        "url: {}\ntopics: [plant/boiler]\nbatch_rows: 4\nlinger: 20ms\n",
        broker.url()
    ));
    pipeline
        .wait_subscribed(&broker, "plant/boiler", &probe_json())
        .await;
    let payloads: Vec<String> = (0..10)
        .map(|i| reading(&format!("d{i}"), i, i as f64))
        .collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    broker.publish("plant/boiler", &refs, 1).await;
    pipeline.wait_for("10 rows", |p| p.rows().len() == 10).await;
    let rows = pipeline.rows();
    for (i, (device, temperature)) in rows.iter().enumerate() {
        assert_eq!(device, &format!("d{i}"));
        assert_eq!(*temperature, Some(i as f64));
    }
    // batch_rows bounds the batches.
    assert!(
        pipeline
            .main
            .lock()
            .unwrap()
            .iter()
            .all(|b| b.num_rows() <= 4)
    );
    assert!(pipeline.dead().is_empty());
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_and_topic_pattern_fill_columns() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "allow_anonymous true");
    let pipeline = start(&format!(
        "url: {}\ntopics: [\"plant/+/+/telemetry\", \"lab/#\"]\n\
         topic_pattern: \"plant/{{site}}/{{device}}/telemetry\"\nqos: 0\nlinger: 20ms\n",
        broker.url()
    ));
    pipeline
        .wait_subscribed(&broker, "plant/x/probe/telemetry", r#"{"ts": 0}"#)
        .await;
    broker
        .publish(
            "plant/north/boiler/telemetry",
            &[r#"{"ts": 1, "temperature": 70.5}"#],
            1,
        )
        .await;
    broker
        .publish(
            "plant/south/pump/telemetry",
            &[r#"{"ts": 2, "temperature": 20}"#],
            1,
        )
        .await;
    // Subscribed, but not of the pattern's shape: dead letter.
    broker.publish("lab/bench/1", &[r#"{"ts": 3}"#], 1).await;
    // Not subscribed at all.
    broker
        .publish("plant/north/boiler/status", &[r#"{"ts": 4}"#], 1)
        .await;
    pipeline
        .wait_for("2 rows and 1 dead letter", |p| {
            p.rows().len() == 2 && p.dead().len() == 1
        })
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let batches = pipeline.main.lock().unwrap().clone();
    let all = arrow::compute::concat_batches(&schema(), &batches).unwrap();
    let site = all.column(0).as_string::<i32>();
    let device = all.column(1).as_string::<i32>();
    let pairs: Vec<(&str, &str)> = (0..all.num_rows())
        .filter(|&i| device.value(i) != PROBE)
        .map(|i| (site.value(i), device.value(i)))
        .collect();
    assert_eq!(pairs, [("north", "boiler"), ("south", "pump")]);
    assert_eq!(
        pipeline.dead(),
        [(
            "lab/bench/1".to_owned(),
            "topic does not match topic_pattern".to_owned()
        )]
    );
    assert_eq!(pipeline.rejected(), [("topic_mismatch".to_owned(), 1)]);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_go_to_dead_letter_and_good_ones_arrive() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "allow_anonymous true");
    let pipeline = start(&format!(
        "url: {}\ntopics: [s]\nmax_payload_bytes: 200\nlinger: 30ms\n",
        broker.url()
    ));
    pipeline.wait_subscribed(&broker, "s", &probe_json()).await;
    let big = format!(
        r#"{{"device": "big", "ts": 1, "pad": "{}"}}"#,
        "x".repeat(300)
    );
    let payloads = [
        reading("a", 1, 1.0),
        "{not json".to_owned(),
        reading("b", 2, 2.0),
        r#"{"device": "c", "ts": "yesterday-ish"}"#.to_owned(),
        r#"{"device": "d", "temperature": 4.0}"#.to_owned(),
        big,
        reading("e", 5, 5.0),
    ];
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    broker.publish("s", &refs, 1).await;
    pipeline
        .wait_for("3 good rows and 4 dead letters", |p| {
            p.rows().len() == 3 && p.dead().len() == 4
        })
        .await;
    let devices: Vec<String> = pipeline.devices();
    assert_eq!(devices, ["a", "b", "e"]);
    let errors: Vec<String> = pipeline.dead().into_iter().map(|(_, e)| e).collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("exceeds max_payload_bytes")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e == "missing value for non-nullable column 'ts'"),
        "{errors:?}"
    );
    assert_eq!(
        pipeline.rejected(),
        [("bad_payload".to_owned(), 3), ("too_large".to_owned(), 1)]
    );
    let pipeline = pipeline.stop().await;
    assert_eq!(pipeline.rows().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_survives_a_broker_restart() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), "allow_anonymous true");
    let pipeline = start(&format!(
        "url: {}\ntopics: [s]\nclient_id: weir-restart\nclean_session: false\n\
         reconnect_initial_delay: 100ms\nreconnect_max_delay: 500ms\nlinger: 20ms\n",
        broker.url()
    ));
    pipeline.wait_subscribed(&broker, "s", &probe_json()).await;
    let first: Vec<String> = (0..5).map(|i| reading(&format!("a{i}"), i, 0.0)).collect();
    broker
        .publish(
            "s",
            &first.iter().map(String::as_str).collect::<Vec<_>>(),
            1,
        )
        .await;
    pipeline
        .wait_for("the first 5 rows", |p| p.rows().len() == 5)
        .await;
    broker.restart();
    // Published while the source is still reconnecting: the persisted session queues them.
    let second: Vec<String> = (0..5).map(|i| reading(&format!("b{i}"), i, 0.0)).collect();
    broker
        .publish(
            "s",
            &second.iter().map(String::as_str).collect::<Vec<_>>(),
            1,
        )
        .await;
    pipeline
        .wait_for("all 10 rows", |p| p.rows().len() >= 10)
        .await;
    let mut devices: Vec<String> = pipeline.devices();
    devices.sort();
    devices.dedup();
    assert_eq!(devices.len(), 10, "{devices:?}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_keeps_messages_while_weir_is_down() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "allow_anonymous true");
    let yaml = format!(
        "url: {}\ntopics: [s]\nclient_id: weir-persistent\nclean_session: false\nlinger: 20ms\n",
        broker.url()
    );
    make_session(&broker, &yaml).await;
    let missed: Vec<String> = (0..5).map(|i| reading(&format!("m{i}"), i, 1.0)).collect();
    broker
        .publish(
            "s",
            &missed.iter().map(String::as_str).collect::<Vec<_>>(),
            1,
        )
        .await;
    let second = start(&yaml);
    second
        .wait_for("the 5 queued rows", |p| p.rows().len() == 5)
        .await;
    assert_eq!(second.devices(), ["m0", "m1", "m2", "m3", "m4"]);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_the_pipeline_clearly() {
    require_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_password(dir.path(), "weir", "right");
    let pipeline = start(&format!(
        "url: {}\ntopics: [s]\nusername: weir\npassword: wrong\n\
         reconnect_initial_delay: 100ms\n",
        broker.url()
    ));
    let outcome = tokio::time::timeout(WAIT, pipeline.handle)
        .await
        .expect("the pipeline fails instead of retrying forever")
        .unwrap();
    let error = outcome
        .expect_err("a wrong password fails the pipeline")
        .to_string();
    assert!(
        error.contains(&format!(
            "mqtt broker 127.0.0.1:{} refused the connection: ",
            broker.port()
        )),
        "{error}"
    );
    // Mosquitto refuses a wrong password as "not authorised" on MQTT 3.1.1.
    assert!(error.contains("bad user name or password"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_throughput_is_not_capped_by_the_brokers_inflight_window() {
    require_mosquitto();
    // Mosquitto sends at most 20 unacked QoS 1 messages to a client; waiting for a full
    // batch or the long linger while holding acks would stall at 20 messages per linger.
    let dir = tempfile::tempdir().unwrap();
    // An unbounded queue: Mosquitto would otherwise drop what exceeds 1000 queued messages
    // when the publisher outruns us, hiding how fast the source really is.
    let broker = Broker::start(dir.path(), "allow_anonymous true\nmax_queued_messages 0");
    let pipeline = start(&format!(
        "url: {}\ntopics: [s]\nbatch_rows: 1000\nlinger: 1s\n",
        broker.url()
    ));
    pipeline.wait_subscribed(&broker, "s", &probe_json()).await;
    let payloads: Vec<String> = (0..2000).map(|i| reading("t", i, 0.0)).collect();
    let started = std::time::Instant::now();
    broker
        .publish(
            "s",
            &payloads.iter().map(String::as_str).collect::<Vec<_>>(),
            1,
        )
        .await;
    pipeline
        .wait_for("2000 rows", |p| p.rows().len() >= 2000)
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_sessions_backlog_drains_completely() {
    require_mosquitto();
    // On a resumed session Mosquitto sends its queue well past its in-flight window of
    // 20. The source once stalled for good there: acks went through rumqttc's request
    // channel, which its event loop drains one per turn, so the channel filled, the
    // source waited on it and the connection task waited on the source.
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "allow_anonymous true\nmax_queued_messages 0");
    let yaml = format!(
        "url: {}\ntopics: [s]\nclient_id: weir-backlog\nclean_session: false\n",
        broker.url()
    );
    make_session(&broker, &yaml).await;
    const QUEUED: usize = 30_000;
    let messages: Vec<(String, String)> = (0..QUEUED)
        .map(|i| ("s".to_owned(), reading(&format!("q{i}"), i as i64, 1.0)))
        .collect();
    let sent = weir_testkit::flood(broker.port(), "backlog-publisher", messages, 1)
        .await
        .expect("the broker queues the backlog");
    assert_eq!(sent, QUEUED as u64);

    let second = start(&yaml);
    second
        .wait_for("the whole backlog", |p| p.rows().len() >= QUEUED)
        .await;
    let expected: Vec<String> = (0..QUEUED).map(|i| format!("q{i}")).collect();
    assert_eq!(
        second.devices(),
        expected,
        "every queued message once, in order"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_held_back_by_downstream_loses_nothing_and_stays_connected() {
    require_mosquitto();
    // A sink stalled for 4 s fills the channels until the connection task waits to hand
    // a message over, for longer than 1.5 keep-alives. It keeps pinging meanwhile (a
    // broker may drop a client it has not heard from for that long; Mosquitto 2.0.11
    // was not seen to), and every message arrives once the sink moves again.
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "allow_anonymous true\nmax_queued_messages 0");
    let pipeline = start_stalled(
        &format!(
            "url: {}\ntopics: [s]\nkeep_alive: 1s\nbatch_rows: 1\nlinger: 1ms\n",
            broker.url()
        ),
        Some(Duration::from_secs(4)),
    );
    pipeline.wait_subscribed(&broker, "s", &probe_json()).await;
    let payloads: Vec<String> = (0..200)
        .map(|i| reading(&format!("b{i}"), i, 0.0))
        .collect();
    broker
        .publish(
            "s",
            &payloads.iter().map(String::as_str).collect::<Vec<_>>(),
            1,
        )
        .await;
    pipeline
        .wait_for("200 rows after the stall", |p| p.rows().len() >= 200)
        .await;
    let log = broker.log();
    assert!(
        !log.contains("exceeded timeout"),
        "the broker dropped the source as dead while it was held back:\n{log}"
    );
    let expected: Vec<String> = (0..200).map(|i| format!("b{i}")).collect();
    assert_eq!(pipeline.devices(), expected);
    pipeline.stop().await;
}
