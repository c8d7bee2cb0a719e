//! The `mqtt` sink: publishes rows to an MQTT 3.1.1 broker as JSON, one message per row or
//! one JSON array per batch, on topics rendered from column values (`alerts/{device}`).
//!
//! Delivery at `qos: 1` is at least once and never reported early: `write` returns only
//! after the broker acknowledged every message of the batch, so a batch the pipeline
//! counts as written is on the broker. At most `max_in_flight` messages await their
//! acknowledgement; beyond that publishing waits, which backpressures the pipeline.
//!
//! The broker connection runs in its own task. When the connection drops, rumqttc moves
//! every unacknowledged and unsent message to its `pending` queue, and would discard that
//! queue when the broker starts a fresh session. The task takes those messages out
//! before reconnecting and feeds them back in after, so a broker restart loses nothing;
//! a message whose acknowledgement was lost with the connection is sent again.

use std::collections::VecDeque;
use std::time::Duration;

use arrow::array::{RecordBatch, UInt32Array};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, Outgoing, Packet, QoS, Request};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weir_engine::config::ConfigErrors;
use weir_engine::metrics::OperatorMetrics;
use weir_engine::registry::{NodeContext, OperatorFactory, OutputSpec, PlannedOperator, Role};
use weir_engine::{OperatorError, OperatorInstance, Sink};

use crate::format::{TimestampFormat, json_array, json_lines};
use crate::mqtt::{ConnectionConfig, ConnectionMonitor, ConnectionPlan, qos_field};
use crate::rejects::RejectLog;
use crate::template::{Part, Rendered, Template, group_rows};

/// The drop reason of rows whose topic cannot be rendered (a null, empty or wildcard
/// value in a topic column).
pub const INVALID_TOPIC: &str = "invalid_topic";

/// How long `start` waits for the first connection, so a refused login fails the
/// pipeline at once. After that the sink goes on and the connection keeps retrying.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Builds `mqtt` sinks.
pub struct MqttSinkFactory;

/// The `config` of an `mqtt` sink, besides the connection fields of [`ConnectionConfig`]
/// that sit in the same map.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSinkConfig {
    /// The topic to publish to; `{column}` is replaced by the row's value of that column,
    /// e.g. `alerts/{device}`.
    pub topic: String,
    /// `json`: one message per row. `json_array`: one message per batch and topic, a JSON
    /// array of the rows.
    pub format: MessageFormat,
    /// 0 (at most once) or 1 (at least once: a batch is done when the broker acked it).
    pub qos: u8,
    /// Whether the broker keeps the last message of each topic for new subscribers.
    pub retain: bool,
    /// The most messages awaiting the broker's acknowledgement at once (1 to 65535).
    pub max_in_flight: u16,
    /// `rfc3339` strings (the default) or `epoch_ms` integers.
    pub timestamps: TimestampFormat,
}

impl Default for MqttSinkConfig {
    fn default() -> Self {
        MqttSinkConfig {
            topic: String::new(),
            format: MessageFormat::Json,
            qos: 1,
            retain: false,
            max_in_flight: 100,
            timestamps: TimestampFormat::Rfc3339,
        }
    }
}

/// How rows become messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageFormat {
    /// One JSON object per row, one message each.
    #[default]
    Json,
    /// The rows of a batch that share a topic, as one JSON array.
    JsonArray,
}

/// Parses `topic` against the input `schema`: a [`Template`] whose text holds no wildcard.
fn parse_topic(topic: &str, schema: &SchemaRef) -> Result<Template, String> {
    if topic.is_empty() {
        return Err("the mqtt sink needs a topic".to_owned());
    }
    let template = Template::parse("topic", topic, schema)?;
    for part in template.parts() {
        if let Part::Text(text) = part
            && text.contains(['+', '#', '\0'])
        {
            return Err(format!(
                "topic '{topic}' contains a wildcard or NUL: topics you publish to are plain \
                 names, without + or #"
            ));
        }
    }
    Ok(template)
}

/// Each row's topic, or why it has none.
fn render_topics(topic: &Template, batch: &RecordBatch) -> Result<Rendered, OperatorError> {
    topic.render(batch, |name, value| {
        if value.contains(['+', '#', '\0']) {
            Err(format!(
                "column '{name}' holds '{value}', and a topic must not contain + # or NUL"
            ))
        } else {
            Ok(())
        }
    })
}

/// An mqtt sink whose config is valid.
struct Plan {
    connection: ConnectionPlan,
    encoder: Encoder,
    qos: QoS,
    retain: bool,
    max_in_flight: u16,
}

/// Turns batches into messages: topics from the template, payloads as JSON.
struct Encoder {
    topic: Template,
    format: MessageFormat,
    timestamps: TimestampFormat,
}

/// A batch as messages, and why the rows that became none were rejected.
struct Encoded {
    messages: Vec<(String, Vec<u8>)>,
    rejected: Vec<String>,
}

impl Encoder {
    fn encode(&self, batch: &RecordBatch) -> Result<Encoded, OperatorError> {
        let mut rejected = Vec::new();
        let mut valid: Vec<u32> = Vec::with_capacity(batch.num_rows());
        let mut topics = Vec::with_capacity(batch.num_rows());
        for (row, topic) in render_topics(&self.topic, batch)?.into_iter().enumerate() {
            match topic {
                Ok(topic) => {
                    valid.push(row as u32);
                    topics.push(topic);
                }
                Err(problem) => rejected.push(problem),
            }
        }
        let kept = if rejected.is_empty() {
            batch.clone()
        } else {
            take_rows(batch, &valid)?
        };
        let messages = match self.format {
            MessageFormat::Json => {
                // The JSON writer escapes newlines in values: one line per row.
                let lines = json_lines(&kept, self.timestamps)?;
                let payloads = lines.split(|&b| b == b'\n').filter(|line| !line.is_empty());
                topics
                    .into_iter()
                    .zip(payloads)
                    .map(|(topic, payload)| (topic, payload.to_vec()))
                    .collect()
            }
            MessageFormat::JsonArray => {
                // Rows go to their topic's message, topics in order of first appearance.
                let groups = group_rows(topics.into_iter().map(Ok).collect());
                let mut messages = Vec::with_capacity(groups.len());
                for (topic, rows) in &groups {
                    let group = if groups.len() == 1 {
                        kept.clone()
                    } else {
                        take_rows(&kept, rows)?
                    };
                    messages.push((topic.clone(), json_array(&group, self.timestamps)?));
                }
                messages
            }
        };
        Ok(Encoded { messages, rejected })
    }
}

impl OperatorFactory for MqttSinkFactory {
    fn kind(&self) -> &'static str {
        "mqtt"
    }

    fn roles(&self) -> &'static [Role] {
        &[Role::Sink]
    }

    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let (connection, config): (ConnectionConfig, MqttSinkConfig) = node.config_split()?;
        let mut errors = ConfigErrors::new();
        let connection = connection.validate(node, &mut errors);
        let qos = qos_field(node, config.qos, &mut errors);
        if config.max_in_flight == 0 {
            errors.push(node.field_error(&["max_in_flight"], "max_in_flight must be at least 1"));
        }
        let topic = match node.inputs {
            // An upstream could not be planned, so its schema is unknown: the topic cannot
            // be checked against it, and the upstream's own errors speak.
            [_] if !node.inputs_known => None,
            [input] => match parse_topic(&config.topic, &input.stream.schema) {
                Ok(topic) => Some(topic),
                Err(message) => {
                    errors.push(
                        node.field_error(&["topic"], message)
                            .with_hint("e.g. `topic: alerts/{device}`"),
                    );
                    None
                }
            },
            inputs => {
                errors.push(
                    node.error(format!(
                        "the mqtt sink publishes one stream but has {} inputs",
                        inputs.len()
                    ))
                    .with_hint(
                        "use one mqtt sink per input, or merge the streams with a sql \
                         transform first",
                    ),
                );
                None
            }
        };
        match (connection, topic) {
            (Some(connection), Some(topic)) if errors.is_empty() => Ok(Box::new(Plan {
                connection,
                encoder: Encoder {
                    topic,
                    format: config.format,
                    timestamps: config.timestamps,
                },
                qos,
                retain: config.retain,
                max_in_flight: config.max_in_flight,
            })),
            _ => Err(errors),
        }
    }
}

impl PlannedOperator for Plan {
    fn outputs(&self) -> Vec<OutputSpec> {
        Vec::new()
    }

    fn instantiate(
        self: Box<Self>,
        metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        let mut options = self.connection.mqtt_options()?;
        options.set_inflight(self.max_in_flight);
        let (client, eventloop) = self
            .connection
            .client(options, usize::from(self.max_in_flight));
        let (delivery_tx, delivery) = watch::channel(Delivery::default());
        let rejects = RejectLog::new(
            format!("mqtt sink {}", self.connection.broker.address()),
            "row without a valid topic",
            "rows without a valid topic",
        );
        let publisher = Publisher {
            monitor: ConnectionMonitor::new(&self.connection, metrics.connection()),
            qos: self.qos,
            max_in_flight: usize::from(self.max_in_flight),
            unsent: VecDeque::new(),
            delivery: delivery_tx,
        };
        Ok(OperatorInstance::Sink(Box::new(MqttSink {
            plan: *self,
            client,
            start: Some((publisher, eventloop)),
            task: None,
            delivery,
            published: 0,
            metrics: metrics.clone(),
            rejects,
        })))
    }
}

/// What the connection task reports to the sink.
#[derive(Clone, Debug, Default)]
struct Delivery {
    /// Messages done: acknowledged by the broker (QoS 1) or written out (QoS 0).
    completed: u64,
    /// Whether the broker has accepted a connection yet.
    connected_once: bool,
    /// Why the connection gave up, when retrying cannot help.
    fatal: Option<String>,
}

/// The running mqtt sink.
struct MqttSink {
    plan: Plan,
    client: AsyncClient,
    /// The connection task, until `start` spawns it.
    start: Option<(Publisher, EventLoop)>,
    task: Option<JoinHandle<()>>,
    delivery: watch::Receiver<Delivery>,
    /// Messages handed to the client so far.
    published: u64,
    metrics: OperatorMetrics,
    /// Rows dropped for their topic, counted in the metrics as `invalid_topic`.
    rejects: RejectLog,
}

#[async_trait]
impl Sink for MqttSink {
    async fn start(&mut self) -> Result<(), OperatorError> {
        let Some((publisher, eventloop)) = self.start.take() else {
            return Ok(());
        };
        self.task = Some(tokio::spawn(publisher.drive(eventloop)));
        let outcome = tokio::time::timeout(
            FIRST_CONNECT_WAIT,
            self.delivery
                .wait_for(|d| d.connected_once || d.fatal.is_some()),
        )
        .await;
        let fatal = match outcome {
            Ok(Ok(delivery)) => delivery.fatal.clone(),
            // Not connected yet: the connection task keeps trying and logs why.
            Err(_) => None,
            Ok(Err(_)) => Some("the mqtt connection task ended".to_owned()),
        };
        match fatal {
            Some(message) => Err(OperatorError::External(message)),
            None => Ok(()),
        }
    }

    async fn write(&mut self, _input: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        let Encoded { messages, rejected } = self.plan.encoder.encode(&batch)?;
        for problem in &rejected {
            self.rejects.note(
                format_args!("topic '{}'", self.plan.encoder.topic.text()),
                problem,
            );
        }
        self.metrics.dropped(INVALID_TOPIC, rejected.len() as u64);
        for (topic, payload) in messages {
            if self
                .client
                .publish(topic, self.plan.qos, self.plan.retain, payload)
                .await
                .is_err()
            {
                return Err(self.task_gone());
            }
            self.published += 1;
        }
        if self.plan.qos == QoS::AtLeastOnce {
            self.wait_until_delivered().await?;
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<(), OperatorError> {
        self.rejects.summarise();
        if self.task.is_none() {
            return Ok(());
        }
        self.wait_until_delivered().await?;
        let _ = self.client.disconnect().await;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        Ok(())
    }
}

impl MqttSink {
    /// Waits until the broker has every message published so far.
    async fn wait_until_delivered(&mut self) -> Result<(), OperatorError> {
        let published = self.published;
        let delivery = self
            .delivery
            .wait_for(|d| d.completed >= published || d.fatal.is_some())
            .await
            .map_err(|_| OperatorError::Internal("the mqtt connection task ended".to_owned()))?;
        match &delivery.fatal {
            Some(message) => Err(OperatorError::External(message.clone())),
            None => Ok(()),
        }
    }

    /// The error to report when the connection task is no longer there to publish.
    fn task_gone(&self) -> OperatorError {
        match &self.delivery.borrow().fatal {
            Some(message) => OperatorError::External(message.clone()),
            None => OperatorError::Internal("the mqtt connection task ended".to_owned()),
        }
    }
}

/// The rows of `batch` at `indices`.
fn take_rows(batch: &RecordBatch, indices: &[u32]) -> Result<RecordBatch, OperatorError> {
    let indices = UInt32Array::from(indices.to_vec());
    Ok(arrow::compute::take_record_batch(batch, &indices)?)
}

/// The connection task: polls the rumqttc event loop, counts completed messages, and
/// carries unacknowledged messages over reconnects.
struct Publisher {
    monitor: ConnectionMonitor,
    qos: QoS,
    max_in_flight: usize,
    /// Messages taken out of rumqttc when the connection dropped, to send again.
    unsent: VecDeque<Request>,
    delivery: watch::Sender<Delivery>,
}

impl Publisher {
    async fn drive(mut self, mut eventloop: EventLoop) {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.monitor.connected();
                    self.delivery.send_modify(|d| d.connected_once = true);
                    self.carry_over(ack.session_present);
                }
                Ok(Event::Incoming(Packet::PubAck(_))) if self.qos == QoS::AtLeastOnce => {
                    self.delivery.send_modify(|d| d.completed += 1);
                }
                Ok(Event::Outgoing(Outgoing::Publish(_))) if self.qos == QoS::AtMostOnce => {
                    self.delivery.send_modify(|d| d.completed += 1);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(ConnectionError::RequestsDone) => {
                    self.monitor.closed();
                    return;
                }
                Ok(_) => {}
                Err(error) => {
                    // rumqttc parked every unacknowledged and unsent message in `pending`,
                    // and clears it when the broker starts a fresh session: keep them.
                    self.unsent.extend(eventloop.pending.drain(..));
                    match self.monitor.failed(&error) {
                        Err(message) => {
                            self.delivery.send_modify(|d| d.fatal = Some(message));
                            return;
                        }
                        Ok(delay) => tokio::time::sleep(delay).await,
                    }
                }
            }
            self.refill(&mut eventloop);
            self.monitor
                .metrics()
                .in_flight
                .set(i64::from(eventloop.state.inflight()));
        }
    }

    /// After a reconnect: in a fresh session the carried-over messages are new messages
    /// (rumqttc numbers them again); in a resumed one they are resent as duplicates of
    /// the same packet ids, as MQTT requires.
    fn carry_over(&mut self, session_present: bool) {
        for request in &mut self.unsent {
            if let Request::Publish(publish) = request {
                if session_present {
                    publish.dup = publish.qos != QoS::AtMostOnce;
                } else {
                    publish.pkid = 0;
                    publish.dup = false;
                }
            }
        }
        // Acks for the messages of an earlier connection mean nothing to this one.
        self.unsent
            .retain(|request| matches!(request, Request::Publish(_)));
    }

    /// Hands carried-over messages back to rumqttc, no more than the in-flight window
    /// allows: rumqttc sends `pending` ahead of everything and without flow control,
    /// and more than a window of new packet ids at once would collide.
    fn refill(&mut self, eventloop: &mut EventLoop) {
        while !self.unsent.is_empty()
            && eventloop.network.is_some()
            && eventloop.pending.len() + usize::from(eventloop.state.inflight())
                < self.max_in_flight
        {
            if let Some(request) = self.unsent.pop_front() {
                eventloop.pending.push_back(request);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use weir_engine::registry::{InputStream, StreamInfo};

    use super::*;
    use crate::format::test_support::{Decl, plan};
    use crate::format::test_support::{readings, readings_schema};

    fn schema() -> SchemaRef {
        readings_schema()
    }

    fn batch(devices: &[Option<&str>]) -> RecordBatch {
        readings(devices)
    }

    fn errors(config: &str) -> String {
        match plan(
            &MqttSinkFactory,
            Role::Sink,
            config,
            Decl {
                inputs: vec![InputStream {
                    name: "upstream".into(),
                    stream: StreamInfo {
                        schema: schema(),
                        event_time: None,
                    },
                }],
                ..Decl::default()
            },
        ) {
            Ok(_) => panic!("config should be rejected: {config}"),
            Err(errors) => errors.iter().map(|e| format!("{e}\n")).collect(),
        }
    }

    #[test]
    fn topics_refuse_wildcards_in_their_text_and_their_values() {
        let err = |t: &str| parse_topic(t, &schema()).unwrap_err();
        assert!(err("a/+/{device}").contains("wildcard"));
        assert!(err("a/#").contains("wildcard"));
        assert!(err("").contains("needs a topic"));
        assert!(err("a/{nope}").contains("column 'nope', which the input does not have"));
        let template = parse_topic("alerts/{device}", &schema()).unwrap();
        let topics = render_topics(
            &template,
            &batch(&[Some("d1"), None, Some("a+b"), Some("c#")]),
        )
        .unwrap();
        assert_eq!(topics[0].as_deref(), Ok("alerts/d1"));
        assert_eq!(topics[1], Err("column 'device' is null".to_owned()));
        for row in [2, 3] {
            assert!(
                topics[row]
                    .as_ref()
                    .unwrap_err()
                    .contains("must not contain"),
                "{:?}",
                topics[row]
            );
        }
    }

    fn encoder(topic: &str, format: MessageFormat, timestamps: TimestampFormat) -> Encoder {
        Encoder {
            topic: parse_topic(topic, &schema()).unwrap(),
            format,
            timestamps,
        }
    }

    fn text(messages: &[(String, Vec<u8>)]) -> Vec<(&str, &str)> {
        messages
            .iter()
            .map(|(t, p)| (t.as_str(), std::str::from_utf8(p).unwrap()))
            .collect()
    }

    #[test]
    fn one_message_per_row_skips_rows_without_a_topic() {
        let encoded = encoder("a/{device}", MessageFormat::Json, TimestampFormat::EpochMs)
            .encode(&batch(&[Some("d1"), None, Some("d2")]))
            .unwrap();
        assert_eq!(
            text(&encoded.messages),
            vec![
                ("a/d1", r#"{"device":"d1","ts":0,"temperature":20.0}"#),
                ("a/d2", r#"{"device":"d2","ts":2000,"temperature":22.0}"#),
            ]
        );
        assert_eq!(encoded.rejected, vec!["column 'device' is null".to_owned()]);
    }

    #[test]
    fn json_arrays_group_rows_by_topic_in_order_of_appearance() {
        let rows = batch(&[Some("b"), Some("a"), Some("b")]);
        let encoded = encoder(
            "x/{device}",
            MessageFormat::JsonArray,
            TimestampFormat::Rfc3339,
        )
        .encode(&rows)
        .unwrap();
        assert_eq!(
            text(&encoded.messages),
            vec![
                (
                    "x/b",
                    r#"[{"device":"b","ts":"1970-01-01T00:00:00Z","temperature":20.0},{"device":"b","ts":"1970-01-01T00:00:02Z","temperature":22.0}]"#
                ),
                (
                    "x/a",
                    r#"[{"device":"a","ts":"1970-01-01T00:00:01Z","temperature":21.0}]"#
                ),
            ]
        );
        let whole = encoder("fixed", MessageFormat::JsonArray, TimestampFormat::EpochMs)
            .encode(&rows)
            .unwrap();
        assert_eq!(whole.messages.len(), 1);
        assert!(whole.rejected.is_empty());
    }

    #[test]
    fn invalid_configs_report_every_problem() {
        let text = errors("url: ftp://h\ntopic: \"a/{nope}\"\nqos: 2\nmax_in_flight: 0\n");
        for needle in [
            "scheme 'ftp'",
            "column 'nope'",
            "qos 2 is not supported",
            "max_in_flight must be at least 1",
        ] {
            assert!(text.contains(needle), "missing '{needle}' in:\n{text}");
        }
        let typo = errors("url: mqtt://h\ntopic: a\nretian: true\n");
        assert!(typo.contains("did you mean 'retain'?"), "{typo}");
        let missing = errors("url: mqtt://h\n");
        assert!(missing.contains("needs a topic"), "{missing}");
    }
}
