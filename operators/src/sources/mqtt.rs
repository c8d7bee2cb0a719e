//! The `mqtt` source: subscribes to topic filters on an MQTT 3.1.1 broker and turns the
//! messages into record batches of a declared schema.
//!
//! Messages are gathered until `batch_rows` of them are waiting or the oldest has waited
//! `linger`, then their payloads are decoded in one call to Arrow's JSON or CSV decoder.
//! Only when that fails is each message decoded alone, to find the bad ones; those go to
//! the `dead_letter` port (topic, reason, payload) and never stop the stream. Segments of
//! the topic can fill utf8 columns through `topic_pattern` (`plant/{site}/{device}`).
//!
//! Delivery is at least once with `qos: 1`: acks are manual, and a message is acked only
//! after the batch holding it was accepted downstream (or after it went to dead letter).
//! A crash between the two redelivers the message. With `clean_session: false` and a
//! stable `client_id` the broker also queues messages while Weir is down.
//!
//! The broker connection runs in its own task so keep-alive pings and acks flow while
//! the source waits on backpressure; it reconnects with exponential backoff and jitter,
//! and gives up only when the broker refuses the credentials or a subscription.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, RecordBatch, StringArray, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use async_trait::async_trait;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Outgoing, Packet, PubAck, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tracing::{debug, info};
use weir_engine::checkpoint::{Epoch, completed_after};
use weir_engine::config::{ConfigErrors, HumanDuration};
use weir_engine::metrics::{ConnectionMetrics, OperatorMetrics};
use weir_engine::registry::{
    NodeContext, OperatorFactory, OutputSpec, PlannedOperator, Role, StreamInfo,
};
use weir_engine::{OperatorError, OperatorInstance, Source, SourceContext};

use super::flat_json::FlatJson;
use crate::mqtt::{BrokerUrl, ConnectionConfig, ConnectionMonitor, ConnectionPlan, qos_field};
use crate::rejects::{DEAD_LETTER_PORT, RejectLog, outputs_with_dead_letter};

/// `weir_operator_rejected_rows_total` reasons: a payload over `max_payload_bytes`, ...
pub const REJECTED_TOO_LARGE: &str = "too_large";
/// ... a message whose topic does not fit `topic_pattern`, ...
pub const REJECTED_TOPIC: &str = "topic_mismatch";
/// ... and a payload that does not decode into the schema.
pub const REJECTED_PAYLOAD: &str = "bad_payload";

/// How much of an oversize payload is kept in its dead-letter row.
const OVERSIZE_EXCERPT_BYTES: usize = 1024;

/// With QoS 1, a batch is also emitted once no message arrived for this long. The broker
/// sends only a few unacked messages at a time (Mosquitto: 20) and then waits for acks, so
/// waiting for `batch_rows` or `linger` with acks held would cap throughput at one
/// broker window per linger.
const QOS1_IDLE_FLUSH: Duration = Duration::from_millis(5);

/// How long a cancelled source waits for its acks and disconnect to reach the broker.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

/// Builds `mqtt` sources.
pub struct MqttSourceFactory;

/// The `config` of an `mqtt` source, besides the connection fields of
/// [`ConnectionConfig`] that sit in the same map.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// The topic filters to subscribe to; `+` matches one level, `#` the rest.
    pub topics: Vec<String>,
    /// Fills utf8 columns from topic levels, e.g. `plant/{site}/{device}/telemetry`; `+`
    /// matches a level without keeping it. Messages on topics that do not match go to
    /// dead letter.
    pub topic_pattern: Option<String>,
    /// How payloads are encoded.
    pub format: PayloadFormat,
    /// 0 (at most once) or 1 (at least once: acked after downstream accepted the batch).
    pub qos: u8,
    /// Emit a batch once this many messages are waiting.
    pub batch_rows: usize,
    /// Emit a batch once its oldest message has waited this long.
    pub linger: HumanDuration,
    /// Payloads larger than this go to dead letter.
    pub max_payload_bytes: usize,
    /// While the pipeline checkpoints, a QoS 1 message is acknowledged only once the
    /// checkpoint after it has completed, so a crash before then has the broker send it
    /// again. When this many acknowledgements are held, or the stream pauses with some
    /// held, the source asks for a checkpoint at once: keep it below the broker's
    /// inflight window (Mosquitto's `max_inflight_messages`, 20 by default), which stops
    /// sending while that many are unacknowledged.
    pub max_held_acks: usize,
}

impl Default for MqttSourceConfig {
    fn default() -> Self {
        MqttSourceConfig {
            topics: Vec::new(),
            topic_pattern: None,
            format: PayloadFormat::Json,
            qos: 1,
            batch_rows: 1000,
            linger: HumanDuration(Duration::from_millis(50)),
            max_payload_bytes: 1 << 20,
            max_held_acks: 16,
        }
    }
}

/// How a message's payload is encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// One JSON object per message; unknown fields are ignored.
    #[default]
    Json,
    /// A JSON array of objects per message, one row each.
    JsonArray,
    /// CSV lines without a header, columns in the schema's order (topic columns left
    /// out); one record per line.
    Csv,
}

/// One level of a `topic_pattern`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    /// Must equal the topic level.
    Literal(String),
    /// `+`: any one level, not kept.
    Any,
    /// `{name}`: any one level, kept in column `name`.
    Capture(String),
}

/// A parsed `topic_pattern`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TopicPattern {
    levels: Vec<Level>,
}

impl TopicPattern {
    fn parse(pattern: &str) -> Result<TopicPattern, String> {
        let mut levels = Vec::new();
        for level in pattern.split('/') {
            levels.push(if level == "+" {
                Level::Any
            } else if let Some(name) = level.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
                if name.is_empty() || name.contains(['{', '}']) {
                    return Err(format!("'{level}' is not a {{column}} placeholder"));
                }
                Level::Capture(name.to_owned())
            } else if level.contains(['{', '}', '+', '#']) {
                return Err(format!(
                    "level '{level}' mixes text with a placeholder or wildcard: a level is \
                     all text, +, or one {{column}}"
                ));
            } else {
                Level::Literal(level.to_owned())
            });
        }
        Ok(TopicPattern { levels })
    }

    fn columns(&self) -> impl Iterator<Item = &str> {
        self.levels.iter().filter_map(|level| match level {
            Level::Capture(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The captured levels in pattern order, or `None` when the topic does not match.
    fn captures<'t>(&self, topic: &'t str) -> Option<Vec<&'t str>> {
        let parts: Vec<&str> = topic.split('/').collect();
        if parts.len() != self.levels.len() {
            return None;
        }
        let mut captured = Vec::new();
        for (level, part) in self.levels.iter().zip(parts) {
            match level {
                Level::Literal(text) if text != part => return None,
                Level::Capture(_) => captured.push(part),
                _ => {}
            }
        }
        Some(captured)
    }
}

/// Why a topic filter is not valid, per MQTT 3.1.1 section 4.7.
fn filter_problem(filter: &str) -> Option<String> {
    if filter.is_empty() {
        return Some("a topic filter must not be empty".to_owned());
    }
    if filter.contains('\0') {
        return Some(format!("topic filter '{filter}' contains a NUL character"));
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Some(format!(
                "topic filter '{filter}': '#' must be a whole level and the last one"
            ));
        }
        if level.contains('+') && *level != "+" {
            return Some(format!(
                "topic filter '{filter}': '+' must be a whole level"
            ));
        }
    }
    None
}

/// An mqtt source whose config is valid.
#[derive(Clone, Debug)]
struct Plan {
    connection: ConnectionPlan,
    topics: Vec<String>,
    qos: QoS,
    decoder: PayloadDecoder,
    batch_rows: usize,
    linger: Duration,
    max_held_acks: usize,
    event_time: Option<String>,
}

impl OperatorFactory for MqttSourceFactory {
    fn kind(&self) -> &'static str {
        "mqtt"
    }

    fn roles(&self) -> &'static [Role] {
        &[Role::Source]
    }

    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let (connection, config) = node.config_split()?;
        Ok(Box::new(validate(&connection, &config, node)?))
    }
}

fn validate(
    connection: &ConnectionConfig,
    config: &MqttSourceConfig,
    node: &NodeContext<'_>,
) -> Result<Plan, ConfigErrors> {
    let mut errors = ConfigErrors::new();
    let connection = connection.validate(node, &mut errors);
    if node.schema.is_none() {
        errors.push(
            node.error("the mqtt source needs a declared schema")
                .with_hint(
                    "add e.g. `schema: {device: utf8, ts: timestamp_ms, temperature: float64}`",
                ),
        );
    }
    if config.topics.is_empty() {
        errors.push(
            node.field_error(&["topics"], "the mqtt source needs at least one topic")
                .with_hint("add e.g. `topics: [\"plant/+/boiler\"]` under config"),
        );
    }
    for problem in config.topics.iter().filter_map(|t| filter_problem(t)) {
        errors.push(node.field_error(&["topics"], problem));
    }
    let qos = qos_field(node, config.qos, &mut errors);
    if config.batch_rows == 0 {
        errors.push(node.field_error(&["batch_rows"], "batch_rows must be at least 1"));
    }
    if config.linger.0 < Duration::from_millis(1) {
        errors.push(node.field_error(&["linger"], "linger must be at least 1ms"));
    }
    if config.max_held_acks == 0 {
        errors.push(node.field_error(&["max_held_acks"], "max_held_acks must be at least 1"));
    }
    if config.max_payload_bytes == 0 {
        errors.push(node.field_error(
            &["max_payload_bytes"],
            "max_payload_bytes must be at least 1",
        ));
    }
    let pattern = match config.topic_pattern.as_deref().map(TopicPattern::parse) {
        None => None,
        Some(Ok(pattern)) => Some(pattern),
        Some(Err(problem)) => {
            errors.push(node.field_error(&["topic_pattern"], format!("topic_pattern: {problem}")));
            None
        }
    };
    let mut topic_columns: Vec<String> = Vec::new();
    if let (Some(pattern), Some(schema)) = (&pattern, &node.schema) {
        for name in pattern.columns() {
            if topic_columns.iter().any(|c| c == name) {
                errors.push(node.field_error(
                    &["topic_pattern"],
                    format!("topic_pattern names column '{name}' twice"),
                ));
                continue;
            }
            match schema.field_with_name(name) {
                Err(_) => {
                    let names: Vec<&str> =
                        schema.fields().iter().map(|f| f.name().as_str()).collect();
                    errors.push(
                        node.field_error(
                            &["topic_pattern"],
                            format!("topic_pattern names column '{name}', which the schema does not declare"),
                        )
                        .with_hint(format!(
                            "declare `{name}: utf8` in the schema; it has {}",
                            names.join(", ")
                        )),
                    );
                }
                Ok(field) if field.data_type() != &DataType::Utf8 => errors.push(node.field_error(
                    &["topic_pattern"],
                    format!(
                        "topic_pattern fills column '{name}', which is {} in the schema: topic \
                         columns must be utf8",
                        field.data_type()
                    ),
                )),
                Ok(_) => {}
            }
            topic_columns.push(name.to_owned());
        }
    }
    if let Some(schema) = &node.schema {
        if schema
            .fields()
            .iter()
            .all(|f| topic_columns.contains(f.name()))
        {
            errors.push(node.error(
                "every schema column comes from the topic: declare at least one payload column",
            ));
        }
        if config.format == PayloadFormat::Csv {
            for field in schema.fields().iter().filter(|f| f.data_type().is_nested()) {
                errors.push(node.error(format!(
                    "csv cannot hold column '{}' of type {}: csv columns are flat values",
                    field.name(),
                    field.data_type()
                )));
            }
        }
    }
    let (Some(schema), Some(connection)) = (node.schema.clone(), connection) else {
        return Err(errors);
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let payload_schema = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .filter(|f| !topic_columns.contains(f.name()))
            .cloned()
            .collect::<Vec<_>>(),
    ));
    Ok(Plan {
        connection,
        topics: config.topics.clone(),
        qos,
        decoder: PayloadDecoder {
            flat: flat_fast_path(config.format, &payload_schema),
            format: config.format,
            schema: schema.clone(),
            payload_schema,
            pattern,
            max_payload_bytes: config.max_payload_bytes,
        },
        batch_rows: config.batch_rows,
        linger: config.linger.0,
        max_held_acks: config.max_held_acks,
        event_time: node.event_time.as_ref().map(|spec| spec.column.clone()),
    })
}

/// The schema of the dead-letter port: the message's topic, why it was rejected, and its
/// payload as text (invalid UTF-8 replaced; oversize payloads cut to their first KiB).
pub fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("topic", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("payload", DataType::Utf8, false),
    ]))
}

impl PlannedOperator for Plan {
    fn outputs(&self) -> Vec<OutputSpec> {
        outputs_with_dead_letter(
            StreamInfo {
                schema: self.decoder.schema.clone(),
                event_time: self.event_time.clone(),
            },
            dead_letter_schema(),
        )
    }

    fn instantiate(
        self: Box<Self>,
        metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        let mut options = self.connection.mqtt_options()?;
        options.set_manual_acks(true);
        // Only the subscription and the disconnect go through rumqttc's requests; acks
        // take their own way (see `Connection`).
        let (client, eventloop) = self.connection.client(options, 16);
        Ok(OperatorInstance::Source(Box::new(MqttSource {
            report: RejectLog::new(
                format!("mqtt {}", self.connection.broker.address()),
                "malformed message",
                "malformed messages",
            ),
            plan: *self,
            client,
            eventloop: Some(eventloop),
            connection_metrics: metrics.connection(),
            held: HeldAcks::default(),
        })))
    }
}

/// A message rejected by the decoder, bound for the dead-letter port.
#[derive(Debug, PartialEq)]
struct BadMessage {
    topic: String,
    /// The metric reason, one of the `REJECTED_*` constants.
    reason: &'static str,
    error: String,
    payload: String,
}

/// Decodes one message payload in `format` into rows of `schema`, as an `mqtt` source
/// without topic columns would: for tools, and for fuzzing the decoders with what a
/// broker may deliver. The error says why the payload would be dead-lettered.
pub fn decode_payload(
    format: PayloadFormat,
    schema: SchemaRef,
    payload: &[u8],
) -> Result<RecordBatch, String> {
    let decoder = PayloadDecoder {
        flat: flat_fast_path(format, &schema),
        format,
        payload_schema: schema.clone(),
        schema,
        pattern: None,
        max_payload_bytes: usize::MAX,
    };
    decoder.decode_payloads(&[payload]).map(|(batch, _)| batch)
}

/// Decodes the payloads of a batch of messages into the declared schema.
#[derive(Clone, Debug)]
struct PayloadDecoder {
    format: PayloadFormat,
    /// The declared schema: the output.
    schema: SchemaRef,
    /// The declared schema without the topic columns: what payloads hold.
    payload_schema: SchemaRef,
    pattern: Option<TopicPattern>,
    max_payload_bytes: usize,
    /// The fast path for messages of one flat JSON object each; arrow-json takes the rest.
    flat: Option<FlatJson>,
}

/// The flat JSON fast path for `json` payloads of `schema`, when they can take it.
fn flat_fast_path(format: PayloadFormat, schema: &SchemaRef) -> Option<FlatJson> {
    match format {
        // One batch per call, however many messages it decodes.
        PayloadFormat::Json => FlatJson::new(schema, usize::MAX),
        PayloadFormat::JsonArray | PayloadFormat::Csv => None,
    }
}

impl PayloadDecoder {
    /// Decodes `messages` into one batch (`None` when no message was good) and the
    /// rejected messages.
    fn decode(
        &self,
        messages: &[Publish],
    ) -> Result<(Option<RecordBatch>, Vec<BadMessage>), OperatorError> {
        let mut bad = Vec::new();
        let mut good: Vec<(&Publish, Vec<&str>)> = Vec::with_capacity(messages.len());
        for message in messages {
            match self.precheck(message) {
                Ok(captures) => good.push((message, captures)),
                Err((reason, error)) => bad.push(bad_message(message, reason, error)),
            }
        }
        if good.is_empty() {
            return Ok((None, bad));
        }
        let payloads: Vec<&[u8]> = good.iter().map(|(m, _)| m.payload.as_ref()).collect();
        // Happy path: every payload in one decoder call.
        let (payload_batch, kept, counts) = match self.decode_payloads(&payloads) {
            Ok((batch, counts)) => (batch, good, counts),
            Err(_) => {
                let mut batches = Vec::new();
                let mut kept = Vec::new();
                let mut counts = Vec::new();
                for (message, captures) in good {
                    match self.decode_payloads(&[message.payload.as_ref()]) {
                        Ok((batch, rows)) => {
                            batches.push(batch);
                            counts.extend(rows);
                            kept.push((message, captures));
                        }
                        Err(error) => bad.push(bad_message(message, REJECTED_PAYLOAD, error)),
                    }
                }
                if kept.is_empty() {
                    return Ok((None, bad));
                }
                let batch = arrow::compute::concat_batches(&self.payload_schema, &batches)?;
                (batch, kept, counts)
            }
        };
        let batch = self.with_topic_columns(payload_batch, &kept, &counts)?;
        Ok(((batch.num_rows() > 0).then_some(batch), bad))
    }

    /// Checks what can be checked without decoding; returns the captured topic levels.
    /// Otherwise the metric reason and the message for dead letter.
    fn precheck<'m>(&self, message: &'m Publish) -> Result<Vec<&'m str>, (&'static str, String)> {
        if message.payload.len() > self.max_payload_bytes {
            return Err((
                REJECTED_TOO_LARGE,
                format!(
                    "payload of {} bytes exceeds max_payload_bytes ({})",
                    message.payload.len(),
                    self.max_payload_bytes
                ),
            ));
        }
        match &self.pattern {
            None => Ok(Vec::new()),
            Some(pattern) => pattern.captures(&message.topic).ok_or_else(|| {
                (
                    REJECTED_TOPIC,
                    "topic does not match topic_pattern".to_owned(),
                )
            }),
        }
    }

    /// Decodes payloads into one batch of the payload schema, with each payload's row count.
    fn decode_payloads(&self, payloads: &[&[u8]]) -> Result<(RecordBatch, Vec<usize>), String> {
        let (batch, counts) = match self.format {
            PayloadFormat::Json => {
                let mut joined = Vec::with_capacity(payloads.iter().map(|p| p.len() + 1).sum());
                for payload in payloads {
                    if payload.iter().all(u8::is_ascii_whitespace) {
                        return Err("empty payload: expected one json object".to_owned());
                    }
                    joined.extend_from_slice(payload);
                    joined.push(b'\n');
                }
                // A message per line, each one object: one row each, else arrow-json says why.
                let flat = self
                    .flat
                    .as_ref()
                    .and_then(|flat| flat.decode(&joined))
                    .and_then(|batches| match <[RecordBatch; 1]>::try_from(batches) {
                        Ok([batch]) if batch.num_rows() == payloads.len() => Some(batch),
                        _ => None,
                    });
                if let Some(batch) = flat {
                    return Ok((batch, vec![1; payloads.len()]));
                }
                // One row of room beyond one per message shows a message holding more.
                let batch = self.decode_json(payloads.len() + 1, |decoder| {
                    let mut rest = &joined[..];
                    while !rest.is_empty() {
                        let used = decoder.decode(rest)?;
                        if used == 0 {
                            return Err(ArrowError::JsonError(
                                "expected one json object per message, found more".to_owned(),
                            ));
                        }
                        rest = &rest[used..];
                    }
                    Ok(())
                })?;
                if batch.num_rows() != payloads.len() {
                    return Err(if payloads.len() == 1 {
                        format!(
                            "expected one json object per message, found {}",
                            batch.num_rows()
                        )
                    } else {
                        "messages and rows do not pair up".to_owned()
                    });
                }
                (batch, vec![1; payloads.len()])
            }
            PayloadFormat::JsonArray => {
                let mut rows = Vec::new();
                let mut counts = Vec::with_capacity(payloads.len());
                for payload in payloads {
                    let objects: Vec<serde_json::Map<String, serde_json::Value>> =
                        serde_json::from_slice(payload)
                            .map_err(|e| format!("expected a json array of objects: {e}"))?;
                    counts.push(objects.len());
                    rows.extend(objects);
                }
                let batch = self.decode_json(rows.len(), |decoder| decoder.serialize(&rows))?;
                (batch, counts)
            }
            PayloadFormat::Csv => {
                let mut joined = Vec::new();
                let mut counts = Vec::with_capacity(payloads.len());
                for payload in payloads {
                    let mut count = 0;
                    for line in payload.split(|&b| b == b'\n') {
                        let line = line.strip_suffix(b"\r").unwrap_or(line);
                        if !line.iter().all(u8::is_ascii_whitespace) {
                            joined.extend_from_slice(line);
                            joined.push(b'\n');
                            count += 1;
                        }
                    }
                    counts.push(count);
                }
                (self.decode_csv(&joined, counts.iter().sum())?, counts)
            }
        };
        if batch.num_rows() != counts.iter().sum::<usize>() {
            return Err("messages and rows do not pair up".to_owned());
        }
        Ok((batch, counts))
    }

    /// Runs a fresh JSON decoder over what `feed` gives it, returning every row in one batch.
    fn decode_json(
        &self,
        rows: usize,
        feed: impl FnOnce(&mut arrow_json::reader::Decoder) -> Result<(), ArrowError>,
    ) -> Result<RecordBatch, String> {
        let mut decoder = arrow_json::ReaderBuilder::new(self.payload_schema.clone())
            .with_batch_size(rows.max(1))
            .build_decoder()
            .map_err(|e| reason(&e))?;
        feed(&mut decoder).map_err(|e| reason(&e))?;
        match decoder.flush() {
            Ok(Some(batch)) => Ok(batch),
            Ok(None) => Ok(RecordBatch::new_empty(self.payload_schema.clone())),
            Err(e) => Err(self.explain_json(&e)),
        }
    }

    /// Decodes `rows` CSV records, one a line, into one batch.
    fn decode_csv(&self, bytes: &[u8], rows: usize) -> Result<RecordBatch, String> {
        let mut decoder = arrow_csv::ReaderBuilder::new(self.payload_schema.clone())
            .with_header(false)
            .with_batch_size(rows.max(1))
            .build_decoder();
        let mut rest = bytes;
        while !rest.is_empty() {
            let used = decoder.decode(rest).map_err(|e| reason(&e))?;
            if used == 0 {
                return Err("the csv decoder made no progress".to_owned());
            }
            rest = &rest[used..];
        }
        decoder.decode(&[]).map_err(|e| reason(&e))?;
        match decoder.flush().map_err(|e| reason(&e))? {
            Some(batch) => Ok(batch),
            None => Ok(RecordBatch::new_empty(self.payload_schema.clone())),
        }
    }

    /// Arrow names a missing non-nullable column only in a debug dump; name it plainly.
    fn explain_json(&self, error: &ArrowError) -> String {
        let text = reason(error);
        if !text.contains("non-nullable") {
            return text;
        }
        let missing: Vec<&str> = self
            .payload_schema
            .fields()
            .iter()
            .filter(|f| !f.is_nullable() && text.contains(&format!("\"{}\"", f.name())))
            .map(|f| f.name().as_str())
            .collect();
        match missing.as_slice() {
            [] => text,
            names => format!(
                "missing value for non-nullable column '{}'",
                names.join("', '")
            ),
        }
    }

    /// Adds the topic columns, repeating each message's captures over its rows, and puts
    /// every column in the declared order.
    fn with_topic_columns(
        &self,
        payload: RecordBatch,
        messages: &[(&Publish, Vec<&str>)],
        counts: &[usize],
    ) -> Result<RecordBatch, OperatorError> {
        let Some(pattern) = &self.pattern else {
            return Ok(payload.with_schema(self.schema.clone())?);
        };
        let names: Vec<&str> = pattern.columns().collect();
        let rows = payload.num_rows();
        let mut builders: Vec<StringBuilder> = names
            .iter()
            .map(|_| StringBuilder::with_capacity(rows, rows * 8))
            .collect();
        for ((_, captures), count) in messages.iter().zip(counts) {
            for (builder, value) in builders.iter_mut().zip(captures) {
                for _ in 0..*count {
                    builder.append_value(value);
                }
            }
        }
        let mut topic_columns: Vec<Option<ArrayRef>> = builders
            .into_iter()
            .map(|mut b| Some(Arc::new(b.finish()) as ArrayRef))
            .collect();
        let mut payload_columns = payload.columns().iter();
        let mut columns = Vec::with_capacity(self.schema.fields().len());
        for field in self.schema.fields() {
            let column = match names.iter().position(|n| n == field.name()) {
                Some(i) => topic_columns[i].take(),
                None => payload_columns.next().cloned(),
            };
            columns.push(column.ok_or_else(|| {
                OperatorError::Internal(format!("mqtt source lost column '{}'", field.name()))
            })?);
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

fn bad_message(message: &Publish, reason: &'static str, error: String) -> BadMessage {
    let payload = if message.payload.len() > OVERSIZE_EXCERPT_BYTES && reason == REJECTED_TOO_LARGE
    {
        &message.payload[..OVERSIZE_EXCERPT_BYTES]
    } else {
        &message.payload[..]
    };
    BadMessage {
        topic: message.topic.clone(),
        reason,
        error,
        payload: String::from_utf8_lossy(payload).into_owned(),
    }
}

/// An Arrow error's message without its category prefix, starting lower-case.
fn reason(error: &ArrowError) -> String {
    let text = match error {
        ArrowError::JsonError(s)
        | ArrowError::CsvError(s)
        | ArrowError::ParseError(s)
        | ArrowError::CastError(s)
        | ArrowError::InvalidArgumentError(s) => s.clone(),
        other => other.to_string(),
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "unreadable payload".to_owned(),
    }
}

/// What the connection task hands the source.
enum Incoming {
    /// A message from a subscription, and the connection it came on.
    Message { message: Publish, connection: u64 },
    /// The broker refused something retrying will not fix; the source fails with this.
    Fatal(String),
}

/// An acknowledgement the source has decided on: a QoS 1 message's packet id, on the
/// connection the message came on. An ack means nothing to a later connection: the
/// broker sends the message again there, under a packet id of that connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ack {
    connection: u64,
    pkid: u16,
    /// The message's [`digest`], to tell its redelivery from a later message that got
    /// the same packet id.
    digest: u32,
}

/// A digest of a message's topic and payload that stays the same across restarts.
fn digest(message: &Publish) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(message.topic.as_bytes());
    hasher.update(&[0]);
    hasher.update(&message.payload);
    hasher.finalize()
}

/// The most acks written to the socket in one go, before one flush.
const ACK_BATCH: usize = 1024;

/// The running mqtt source.
struct MqttSource {
    plan: Plan,
    client: AsyncClient,
    /// Taken by the connection task when the source starts.
    eventloop: Option<EventLoop>,
    report: RejectLog,
    connection_metrics: ConnectionMetrics,
    /// Acknowledgements waiting for a checkpoint, while the pipeline checkpoints.
    held: HeldAcks,
}

/// The acknowledgements of emitted QoS 1 messages that wait for a checkpoint to
/// complete: until then a crash rolls the pipeline back to before those messages, and
/// the broker must send them again.
#[derive(Default)]
struct HeldAcks {
    /// Emitted since the last barrier.
    current: Vec<Ack>,
    /// Taken into a checkpoint, in epoch order, until it completes.
    sealed: VecDeque<(Epoch, Vec<Ack>)>,
    /// Packet ids and digests of messages the restored checkpoint already holds but
    /// whose acks may not have reached the broker: their redelivery (same packet id and
    /// content, DUP set) is acked, not emitted again.
    restored: HashSet<(u16, u32)>,
}

impl HeldAcks {
    fn len(&self) -> usize {
        self.current.len()
            + self
                .sealed
                .iter()
                .map(|(_, acks)| acks.len())
                .sum::<usize>()
    }

    /// What a checkpoint records: the packet id and digest of every held ack, so that
    /// after a crash their redelivery is recognised. Some may be acked by the time the
    /// checkpoint completes; the broker then does not send them again, and a later
    /// message under the same packet id differs in its digest.
    fn position(&self) -> Vec<u8> {
        let mut held: Vec<(u16, u32)> = self
            .sealed
            .iter()
            .flat_map(|(_, acks)| acks.iter())
            .chain(&self.current)
            .map(|ack| (ack.pkid, ack.digest))
            .chain(self.restored.iter().copied())
            .collect();
        held.sort_unstable();
        held.dedup();
        held.iter()
            .flat_map(|(pkid, digest)| pkid.to_be_bytes().into_iter().chain(digest.to_be_bytes()))
            .collect()
    }

    /// A redelivered message already emitted: its held ack moves to the connection it
    /// came on now (an ack means nothing on another connection). Returns the ack to
    /// send at once when a restored checkpoint holds it, or whether to drop it.
    fn redelivered(&mut self, message: &Publish, connection: u64) -> Redelivery {
        if !message.dup || message.qos == QoS::AtMostOnce {
            return Redelivery::New;
        }
        let (pkid, digest) = (message.pkid, digest(message));
        if self.restored.remove(&(pkid, digest)) {
            return Redelivery::AckNow(Ack {
                connection,
                pkid,
                digest,
            });
        }
        let held = self
            .sealed
            .iter_mut()
            .flat_map(|(_, acks)| acks.iter_mut())
            .chain(self.current.iter_mut())
            .find(|ack| ack.pkid == pkid && ack.digest == digest && ack.connection != connection);
        match held {
            Some(ack) => {
                ack.connection = connection;
                Redelivery::Held
            }
            None => Redelivery::New,
        }
    }

    /// The acks of every epoch up to `epoch`, which has completed.
    fn release(&mut self, epoch: Epoch) -> Vec<Ack> {
        let mut released = Vec::new();
        while let Some((sealed, _)) = self.sealed.front()
            && *sealed <= epoch
        {
            if let Some((_, acks)) = self.sealed.pop_front() {
                released.extend(acks);
            }
        }
        released
    }
}

/// What to do with a message that may have been delivered before.
enum Redelivery {
    /// Emit it.
    New,
    /// Already emitted, and its ack is held: drop it.
    Held,
    /// Already in the restored checkpoint: drop it and send this ack.
    AckNow(Ack),
}

/// Messages received and not yet emitted, with the acks they are owed once they are.
#[derive(Default)]
struct Pending {
    messages: Vec<Publish>,
    acks: Vec<Ack>,
}

impl Pending {
    fn push(&mut self, message: Publish, connection: u64) {
        if message.qos != QoS::AtMostOnce {
            self.acks.push(Ack {
                connection,
                pkid: message.pkid,
                digest: digest(&message),
            });
        }
        self.messages.push(message);
    }
}

#[async_trait]
impl Source for MqttSource {
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError> {
        ctx.set_rejects(
            DEAD_LETTER_PORT,
            crate::rejects::rows_as_dead_letters(dead_letter_schema()),
        );
        let eventloop = self
            .eventloop
            .take()
            .ok_or_else(|| OperatorError::Internal("mqtt source started twice".to_owned()))?;
        let (tx, mut rx) = mpsc::channel(self.plan.batch_rows.clamp(16, 10_000));
        // Unbounded so that the source never waits on the connection task, which may be
        // waiting on the source: acks are bounded anyway by the messages handed over and
        // not yet acked, and the connection task writes them before it reads more.
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        let connection = Connection {
            client: self.client.clone(),
            filters: self
                .plan
                .topics
                .iter()
                .map(|topic| SubscribeFilter::new(topic.clone(), self.plan.qos))
                .collect(),
            broker: self.plan.connection.broker.clone(),
            monitor: ConnectionMonitor::new(&self.plan.connection, self.connection_metrics.clone()),
            tx,
            acks: acks_rx,
            connection: 0,
        };
        let mut task = tokio::spawn(connection.drive(eventloop));
        let mut pending = Pending::default();
        let mut completed = ctx.completed_epochs();
        let mut released_through: Epoch = completed.as_ref().map_or(0, |c| *c.borrow());
        let mut oldest = Instant::now();
        let mut newest = oldest;
        let idle_flush = (self.plan.qos == QoS::AtLeastOnce).then_some(QOS1_IDLE_FLUSH);
        let outcome = loop {
            let mut deadline = oldest + self.plan.linger;
            if let Some(idle) = idle_flush {
                deadline = deadline.min(newest + idle);
            }
            tokio::select! {
                biased;
                _ = ctx.cancelled() => break Ok(()),
                epoch = completed_after(&mut completed, released_through) => {
                    released_through = epoch;
                    let released = self.held.release(epoch);
                    self.send_acks(released, &acks_tx);
                }
                epoch = ctx.barrier_requested() => {
                    let position = Some(self.held.position());
                    if let Err(error) = ctx.checkpoint(epoch, position).await {
                        break Err(error);
                    }
                    let current = std::mem::take(&mut self.held.current);
                    if !current.is_empty() {
                        self.held.sealed.push_back((epoch, current));
                    }
                }
                _ = tokio::time::sleep_until(deadline), if !pending.messages.is_empty() => {
                    if let Err(error) = self.flush(ctx, &mut pending, &acks_tx).await {
                        break Err(error);
                    }
                }
                incoming = rx.recv() => match incoming {
                    Some(Incoming::Message { message, connection }) => {
                        match self.held.redelivered(&message, connection) {
                            Redelivery::New => {}
                            Redelivery::Held => continue,
                            Redelivery::AckNow(ack) => {
                                self.send_acks(vec![ack], &acks_tx);
                                continue;
                            }
                        }
                        newest = Instant::now();
                        if pending.messages.is_empty() {
                            oldest = newest;
                        }
                        pending.push(message, connection);
                        if pending.messages.len() >= self.plan.batch_rows
                            && let Err(error) = self.flush(ctx, &mut pending, &acks_tx).await
                        {
                            break Err(error);
                        }
                    }
                    Some(Incoming::Fatal(message)) => break Err(OperatorError::External(message)),
                    None => break Err(OperatorError::Internal(
                        "the mqtt connection task ended unexpectedly".to_owned(),
                    )),
                },
            }
        };
        // What was received is emitted and acked before leaving, unless downstream is gone.
        let flushed = match outcome {
            Ok(()) | Err(OperatorError::External(_)) => {
                self.flush(ctx, &mut pending, &acks_tx).await
            }
            Err(_) => Ok(()),
        };
        // The disconnect is requested after the acks were queued, and the connection
        // task writes queued acks before it polls for the disconnect, so they reach the
        // broker first. Messages still arriving meanwhile are dropped unacked (the broker
        // redelivers them), which also frees the connection task should it be waiting to
        // hand one over.
        let abort = task.abort_handle();
        let shutdown = async {
            let _ = self.client.disconnect().await;
            let _ = (&mut task).await;
        };
        let drain = async { while rx.recv().await.is_some() {} };
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            tokio::join!(shutdown, drain);
        })
        .await;
        abort.abort();
        self.report.summarise();
        outcome.and(flushed)
    }

    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, OperatorError> {
        Ok(Some(self.held.position()))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), OperatorError> {
        if !state.len().is_multiple_of(6) {
            return Err(OperatorError::User(format!(
                "the checkpointed mqtt state is {} bytes, not a list of held acknowledgements",
                state.len()
            )));
        }
        self.held.restored = state
            .chunks_exact(6)
            .map(|held| {
                (
                    u16::from_be_bytes([held[0], held[1]]),
                    u32::from_be_bytes([held[2], held[3], held[4], held[5]]),
                )
            })
            .collect();
        Ok(())
    }
}

impl MqttSource {
    /// Decodes and emits the pending messages, then queues their acks.
    async fn flush(
        &mut self,
        ctx: &mut SourceContext,
        pending: &mut Pending,
        acks: &mpsc::UnboundedSender<Ack>,
    ) -> Result<(), OperatorError> {
        if pending.messages.is_empty() {
            return Ok(());
        }
        let (batch, bad) = self.plan.decoder.decode(&pending.messages)?;
        if let Some(batch) = batch {
            ctx.emit(batch).await?;
        }
        if !bad.is_empty() {
            let mut topics = StringBuilder::new();
            let mut errors = StringBuilder::new();
            let mut payloads = StringBuilder::new();
            for message in &bad {
                self.report
                    .note(format_args!("topic '{}'", message.topic), &message.error);
                ctx.count_rejected(message.reason, 1);
                topics.append_value(&message.topic);
                errors.append_value(&message.error);
                payloads.append_value(&message.payload);
            }
            let columns: Vec<ArrayRef> = vec![
                Arc::new(topics.finish()),
                Arc::new(errors.finish()),
                Arc::new(payloads.finish()) as Arc<StringArray>,
            ];
            let batch = RecordBatch::try_new(dead_letter_schema(), columns)?;
            ctx.emit_to(DEAD_LETTER_PORT, batch).await?;
        }
        pending.messages.clear();
        if ctx.checkpointing() {
            // Downstream has the messages, but only a complete checkpoint keeps them
            // through a crash: the acks wait for one, asked for early when enough wait.
            self.held.current.append(&mut pending.acks);
            if self.held.len() >= self.plan.max_held_acks {
                ctx.request_checkpoint();
            }
            return Ok(());
        }
        // Downstream accepted everything: now the broker may forget these messages.
        let decided = std::mem::take(&mut pending.acks);
        self.send_acks(decided, acks);
        Ok(())
    }

    /// Queues `decided` for the connection task to write.
    fn send_acks(&self, decided: Vec<Ack>, acks: &mpsc::UnboundedSender<Ack>) {
        let backlog = &self.connection_metrics.ack_backlog;
        for ack in decided {
            backlog.inc();
            if acks.send(ack).is_err() {
                // The connection task is gone; the broker redelivers what was not acked.
                backlog.dec();
                debug!("mqtt ack not sent: the connection task has ended");
            }
        }
    }
}

/// The connection task: polls the rumqttc event loop, (re)subscribes, backs off between
/// reconnects, hands messages to the source and writes the source's acks.
///
/// Acks do not go through rumqttc's request channel. rumqttc takes at most one request
/// per turn of its event loop, and none while it still hands out packets it has already
/// read (up to 10 per read), so a broker that sends faster than one message per turn
/// (Mosquitto replaying a persistent session's backlog) builds up acks until the
/// channel is full: the source then waited on the channel while this task waited on the
/// source, and the stream stopped for good. Here acks are written to the socket
/// directly, in batches, before every poll and while a message waits for the source, so
/// the two tasks never wait on each other.
struct Connection {
    client: AsyncClient,
    filters: Vec<SubscribeFilter>,
    broker: BrokerUrl,
    monitor: ConnectionMonitor,
    tx: mpsc::Sender<Incoming>,
    acks: mpsc::UnboundedReceiver<Ack>,
    /// Counts the connections made, to tell acks for this one from older ones.
    connection: u64,
}

impl Connection {
    async fn drive(mut self, mut eventloop: EventLoop) {
        let address = self.broker.address();
        let mut acks = Vec::with_capacity(ACK_BATCH);
        loop {
            // Writing acks first means a poll in progress may be dropped. That is safe
            // between packets: rumqttc reads through a buffer that keeps partial
            // packets, every packet it writes goes whole into the write buffer (which
            // `write_acks` leaves empty, so queueing never has to wait), and a dropped
            // flush is finished by the next one.
            let connected = eventloop.network.is_some();
            let polled = tokio::select! {
                biased;
                received = self.acks.recv_many(&mut acks, ACK_BATCH), if connected => {
                    if received == 0 {
                        return; // the source has gone
                    }
                    if let Err(error) = self.write_acks(&mut eventloop, &mut acks).await
                        && !self.recover(&mut eventloop, error).await
                    {
                        return;
                    }
                    continue;
                }
                polled = eventloop.poll() => polled,
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.connection += 1;
                    // Messages of the last connection come again on this one.
                    self.monitor.metrics().in_flight.set(0);
                    self.monitor.connected();
                    // A new session has no subscriptions; a resumed one keeps them.
                    if !ack.session_present
                        && let Err(error) = self.client.try_subscribe_many(self.filters.clone())
                    {
                        let _ = self
                            .tx
                            .send(Incoming::Fatal(format!(
                                "mqtt broker {address}: cannot subscribe: {error}"
                            )))
                            .await;
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|code| matches!(code, SubscribeReasonCode::Failure))
                    {
                        let topics: Vec<&str> =
                            self.filters.iter().map(|f| f.path.as_str()).collect();
                        let _ = self
                            .tx
                            .send(Incoming::Fatal(format!(
                                "mqtt broker {address} refused the subscription to {}: check \
                                 the broker's access control for this user",
                                topics.join(", ")
                            )))
                            .await;
                        return;
                    }
                    let topics: Vec<&str> = self.filters.iter().map(|f| f.path.as_str()).collect();
                    info!("mqtt subscribed to {} on {address}", topics.join(", "));
                }
                Ok(Event::Incoming(Packet::Publish(message))) => {
                    if message.qos != QoS::AtMostOnce {
                        self.monitor.metrics().in_flight.inc();
                    }
                    if !self.hand_over(&mut eventloop, message, &mut acks).await {
                        return;
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    self.monitor.closed();
                    return;
                }
                Ok(_) => {}
                Err(ConnectionError::RequestsDone) => {
                    self.monitor.closed();
                    return;
                }
                Err(error) => {
                    if !self.recover(&mut eventloop, error).await {
                        return;
                    }
                }
            }
        }
    }

    /// Hands `message` to the source. While the source is busy (downstream
    /// backpressure), acks keep being written and the broker keeps hearing from this
    /// client, so it neither waits for acks nor drops the connection as dead. Returns
    /// false once the source is gone.
    async fn hand_over(
        &mut self,
        eventloop: &mut EventLoop,
        message: Publish,
        acks: &mut Vec<Ack>,
    ) -> bool {
        let incoming = Incoming::Message {
            message,
            connection: self.connection,
        };
        // Most of the time the source has room.
        let incoming = match self.tx.try_send(incoming) {
            Ok(()) => return true,
            Err(TrySendError::Closed(_)) => return false,
            Err(TrySendError::Full(incoming)) => incoming,
        };
        // A sender of its own, so that waiting on it does not hold `self`.
        let tx = self.tx.clone();
        let keep_alive = eventloop.mqtt_options.keep_alive();
        let mut ping = (!keep_alive.is_zero())
            .then(|| tokio::time::interval_at(Instant::now() + keep_alive / 2, keep_alive / 2));
        loop {
            let connected = eventloop.network.is_some();
            let outcome = tokio::select! {
                biased;
                permit = tx.reserve() => {
                    return match permit {
                        Ok(permit) => {
                            permit.send(incoming);
                            true
                        }
                        Err(_) => false,
                    };
                }
                received = self.acks.recv_many(acks, ACK_BATCH), if connected => {
                    if received == 0 {
                        return false;
                    }
                    self.write_acks(eventloop, acks).await
                }
                () = tick(&mut ping), if connected => {
                    write_packet(eventloop, Packet::PingReq).await
                }
            };
            if let Err(error) = outcome
                && !self.recover(eventloop, error).await
            {
                return false;
            }
        }
    }

    /// Writes `acks` that belong to the current connection, then flushes them.
    async fn write_acks(
        &mut self,
        eventloop: &mut EventLoop,
        acks: &mut Vec<Ack>,
    ) -> Result<(), ConnectionError> {
        self.monitor.metrics().ack_backlog.sub(acks.len() as i64);
        let current = self.connection;
        let Some(network) = eventloop.network.as_mut() else {
            acks.clear();
            return Ok(());
        };
        let mut written = 0;
        for ack in acks.drain(..).filter(|ack| ack.connection == current) {
            network.write(Packet::PubAck(PubAck::new(ack.pkid))).await?;
            written += 1;
        }
        if written > 0 {
            flush(eventloop).await?;
            self.monitor.metrics().in_flight.sub(written);
        }
        Ok(())
    }

    /// After the connection failed: drops it (rumqttc reconnects on the next poll) and
    /// waits out the backoff. Returns false when retrying cannot help (the source was
    /// told why) or the source has gone.
    async fn recover(&mut self, eventloop: &mut EventLoop, error: ConnectionError) -> bool {
        if eventloop.network.is_some() {
            // The failure was in a write of ours, which rumqttc did not see.
            eventloop.clean();
        }
        match self.monitor.failed(&error) {
            Err(message) => {
                let _ = self.tx.send(Incoming::Fatal(message)).await;
                false
            }
            Ok(delay) => {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => true,
                    _ = self.tx.closed() => false,
                }
            }
        }
    }
}

/// The next tick of `interval`, or never without one.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Writes one packet outside rumqttc's own turn and flushes it.
async fn write_packet(eventloop: &mut EventLoop, packet: Packet) -> Result<(), ConnectionError> {
    if let Some(network) = eventloop.network.as_mut() {
        network.write(packet).await?;
        flush(eventloop).await?;
    }
    Ok(())
}

/// Flushes what was written, within the connection timeout as rumqttc does.
async fn flush(eventloop: &mut EventLoop) -> Result<(), ConnectionError> {
    let limit = Duration::from_secs(eventloop.network_options.connection_timeout());
    let Some(network) = eventloop.network.as_mut() else {
        return Ok(());
    };
    match tokio::time::timeout(limit, network.flush()).await {
        Ok(flushed) => Ok(flushed?),
        Err(_) => Err(ConnectionError::FlushTimeout),
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, AsArray, Float64Array};
    use arrow::datatypes::{Float64Type, TimeUnit};
    use rumqttc::QoS;
    use weir_engine::time::EventTimeSpec;

    use super::*;
    use crate::format::test_support::{Decl, plan};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("site", DataType::Utf8, false),
            Field::new("device", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            Field::new("temperature", DataType::Float64, true),
        ]))
    }

    fn plan_with(config: &str, schema: Option<SchemaRef>) -> Result<Plan, ConfigErrors> {
        // Planning through the factory checks the public path; the typed plan is rebuilt
        // from the same config for the decoder tests.
        let decl = Decl {
            schema: schema.clone(),
            event_time: Some(EventTimeSpec {
                column: "ts".into(),
                max_out_of_order: Duration::from_secs(5),
                ..EventTimeSpec::default()
            }),
            ..Decl::default()
        };
        plan(&MqttSourceFactory, Role::Source, config, decl)?;
        let value = crate::format::test_support::yaml(config);
        let path = "sources.node.config";
        let node = NodeContext {
            pipeline: "test",
            name: "node",
            role: Role::Source,
            config: &value,
            config_path: path,
            inputs: &[],
            inputs_known: true,
            schema,
            event_time: Some(EventTimeSpec {
                column: "ts".into(),
                max_out_of_order: Duration::from_secs(5),
                ..EventTimeSpec::default()
            }),
            window: None,
            on_error: weir_engine::registry::OnError::Fail,
            base_dir: std::path::Path::new("."),
            peers: &[],
        };
        let (connection, config) = node.config_split()?;
        validate(&connection, &config, &node)
    }

    fn messages(list: &[(&str, &str)]) -> Vec<Publish> {
        list.iter()
            .map(|(topic, payload)| Publish::new(*topic, QoS::AtLeastOnce, payload.as_bytes()))
            .collect()
    }

    fn errors(config: &str, schema: Option<SchemaRef>) -> String {
        let Err(errors) = plan_with(config, schema) else {
            panic!("config should be rejected: {config}");
        };
        errors.iter().map(|e| format!("{e}\n")).collect()
    }

    const PATTERN: &str = "url: mqtt://127.0.0.1:1883\ntopics: [\"plant/+/+/telemetry\"]\n\
                           topic_pattern: \"plant/{site}/{device}/telemetry\"\n";

    #[test]
    fn defaults_and_client_id_follow_the_node() {
        let plan = plan_with("url: mqtt://h\ntopics: [a/#]", Some(schema())).unwrap();
        assert_eq!(plan.connection.client_id, "weir-test-node");
        assert_eq!(plan.qos, QoS::AtLeastOnce);
        assert_eq!(plan.batch_rows, 1000);
        assert_eq!(plan.linger, Duration::from_millis(50));
        assert!(plan.connection.clean_session);
        let outputs = plan.outputs();
        assert_eq!(outputs[1].name, "dead_letter");
        assert_eq!(outputs[1].unwired_drop_reason, Some("malformed"));
        assert_eq!(outputs[0].stream.event_time.as_deref(), Some("ts"));
    }

    #[test]
    fn invalid_configs_report_every_problem() {
        let text = errors(
            "url: http://h\ntopics: [\"a/#/b\", \"x+\"]\nqos: 2\nbatch_rows: 0\n\
             topic_pattern: \"plant/{nope}/{temperature}\"\n\
             tls: {ca_file: ca.pem}\npassword: secret\npassword_env: P\n",
            Some(schema()),
        );
        for needle in [
            "scheme 'http'",
            "'#' must be a whole level and the last one",
            "'+' must be a whole level",
            "qos 2 is not supported",
            "batch_rows must be at least 1",
            "'nope', which the schema does not declare",
            "'temperature', which is Float64 in the schema",
            "give password or password_env, not both",
            "a password needs a username",
        ] {
            assert!(text.contains(needle), "missing '{needle}' in:\n{text}");
        }
        let tls = errors(
            "url: mqtt://h\ntopics: [a]\ntls: {ca_file: ca.pem}",
            Some(schema()),
        );
        assert!(tls.contains("tls options apply only to mqtts://"), "{tls}");
        let key = errors(
            "url: mqtts://h\ntopics: [a]\ntls: {cert_file: c.pem}",
            Some(schema()),
        );
        assert!(key.contains("needs tls.key_file"), "{key}");
        let no_schema = errors("url: mqtt://h\ntopics: [a]", None);
        assert!(no_schema.contains("needs a declared schema"), "{no_schema}");
        let unknown = errors("url: mqtt://h\ntopics: [a]\ntopic: b", Some(schema()));
        assert!(unknown.contains("unknown field 'topic'"), "{unknown}");
        // Connection fields sit in the same map; a typo of one is hinted like any other.
        let typo = errors("url: mqtt://h\ntopics: [a]\nkeep_alvie: 5s", Some(schema()));
        assert!(typo.contains("did you mean 'keep_alive'?"), "{typo}");
    }

    #[test]
    fn topic_patterns_capture_levels_and_reject_other_topics() {
        let pattern = TopicPattern::parse("plant/{site}/+/{device}").unwrap();
        assert_eq!(pattern.columns().collect::<Vec<_>>(), ["site", "device"]);
        assert_eq!(pattern.captures("plant/a/x/b"), Some(vec!["a", "b"]));
        assert_eq!(pattern.captures("plant/a/x"), None);
        assert_eq!(pattern.captures("other/a/x/b"), None);
        assert!(TopicPattern::parse("plant/pre{site}").is_err());
        assert!(TopicPattern::parse("plant/{}").is_err());
    }

    #[test]
    fn json_messages_decode_in_one_batch_with_topic_columns_in_schema_order() {
        let plan = plan_with(PATTERN, Some(schema())).unwrap();
        let (batch, bad) = plan
            .decoder
            .decode(&messages(&[
                (
                    "plant/p1/boiler/telemetry",
                    r#"{"ts": 1000, "temperature": 20.5}"#,
                ),
                (
                    "plant/p2/pump/telemetry",
                    r#"{"ts": 2000, "temperature": null, "x": 1}"#,
                ),
            ]))
            .unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        let batch = batch.unwrap();
        assert_eq!(batch.schema(), schema());
        let site = batch.column(0).as_string::<i32>();
        let device = batch.column(1).as_string::<i32>();
        assert_eq!((site.value(0), device.value(0)), ("p1", "boiler"));
        assert_eq!((site.value(1), device.value(1)), ("p2", "pump"));
        let temperature = batch.column(3).as_primitive::<Float64Type>();
        assert_eq!(temperature.value(0), 20.5);
        assert!(temperature.is_null(1));
    }

    #[test]
    fn flat_messages_take_the_fast_path_and_decode_as_arrow_json_does() {
        let plan = plan_with(PATTERN, Some(schema())).unwrap();
        assert!(plan.decoder.flat.is_some(), "the declared schema is flat");
        let mut reference = plan.decoder.clone();
        reference.flat = None;
        let cases: &[&[&str]] = &[
            // Flat objects, in any order, with unknown fields and nulls.
            &[
                r#"{"ts": 1000, "temperature": 20.5}"#,
                r#"{"x": {"y": [1]}, "temperature": null, "ts": 2000}"#,
                "{\"ts\": 3000}\n",
            ],
            // Declined, so arrow-json decodes or rejects them as before.
            &[r#"{"ts": "2026-01-01T00:00:00Z", "temperature": 1}"#],
            &["{\"ts\": 1,\n \"temperature\": 2}"],
            &[r#"{"ts": 1} {"ts": 2}"#],
            &[
                r#"{"ts": 1}"#,
                "not json",
                r#"{"ts": 3, "temperature": "hot"}"#,
            ],
        ];
        for payloads in cases {
            let list: Vec<(&str, &str)> = payloads
                .iter()
                .map(|payload| ("plant/p1/boiler/telemetry", *payload))
                .collect();
            let (fast, fast_bad) = plan.decoder.decode(&messages(&list)).unwrap();
            let (slow, slow_bad) = reference.decode(&messages(&list)).unwrap();
            assert_eq!(fast, slow, "{payloads:?}");
            assert_eq!(
                format!("{fast_bad:?}"),
                format!("{slow_bad:?}"),
                "{payloads:?}"
            );
        }
    }

    #[test]
    fn bad_messages_are_isolated_and_good_ones_kept_in_order() {
        let plan = plan_with(PATTERN, Some(schema())).unwrap();
        let big = format!(r#"{{"ts": 1, "pad": "{}"}}"#, "x".repeat(2 << 20));
        let (batch, bad) = plan
            .decoder
            .decode(&messages(&[
                ("plant/a/d1/telemetry", r#"{"ts": 1, "temperature": 1.0}"#),
                ("plant/a/d2/telemetry", r#"{"ts": 2, "temperature": "hot"}"#),
                ("plant/a/d3/telemetry", "not json"),
                ("plant/a/d4/telemetry", r#"{"temperature": 4.0}"#),
                ("plant/a/d5/telemetry", r#"{"ts": 5}{"ts": 6}"#),
                ("elsewhere/d6", r#"{"ts": 6}"#),
                ("plant/a/d7/telemetry", &big),
                ("plant/a/d8/telemetry", r#"{"ts": 8, "temperature": 8.0}"#),
            ]))
            .unwrap();
        let batch = batch.unwrap();
        let devices: Vec<_> = batch
            .column(1)
            .as_string::<i32>()
            .iter()
            .flatten()
            .collect();
        assert_eq!(devices, ["d1", "d8"]);
        let temps = batch
            .column(3)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert_eq!(temps.values().to_vec(), vec![1.0, 8.0]);
        let why: Vec<(&str, &str)> = bad
            .iter()
            .map(|b| (b.topic.as_str(), b.error.as_str()))
            .collect();
        assert_eq!(why.len(), 6, "{why:?}");
        let by_topic = |t: &str| bad.iter().find(|b| b.topic == t).unwrap();
        assert!(
            by_topic("plant/a/d2/telemetry").error.contains("hot"),
            "{why:?}"
        );
        assert_eq!(
            by_topic("elsewhere/d6").error,
            "topic does not match topic_pattern"
        );
        assert!(
            by_topic("plant/a/d7/telemetry")
                .error
                .contains("exceeds max_payload_bytes")
        );
        assert_eq!(
            by_topic("plant/a/d7/telemetry").payload.len(),
            OVERSIZE_EXCERPT_BYTES
        );
        assert_eq!(
            by_topic("plant/a/d4/telemetry").error,
            "missing value for non-nullable column 'ts'"
        );
        assert!(by_topic("plant/a/d5/telemetry").error.contains("found 2"));
        assert_eq!(by_topic("plant/a/d3/telemetry").payload, "not json");
    }

    #[test]
    fn json_arrays_and_csv_lines_repeat_topic_values_per_row() {
        let array = plan_with(&format!("{PATTERN}format: json_array"), Some(schema())).unwrap();
        let (batch, bad) = array
            .decoder
            .decode(&messages(&[
                ("plant/a/d1/telemetry", r#"[{"ts": 1}, {"ts": 2}]"#),
                ("plant/a/d2/telemetry", r#"{"ts": 3}"#),
                ("plant/b/d3/telemetry", r#"[{"ts": 4}]"#),
            ]))
            .unwrap();
        let batch = batch.unwrap();
        let devices: Vec<_> = batch
            .column(1)
            .as_string::<i32>()
            .iter()
            .flatten()
            .collect();
        assert_eq!(devices, ["d1", "d1", "d3"]);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].error.contains("json array"), "{bad:?}");

        let csv = plan_with(&format!("{PATTERN}format: csv"), Some(schema())).unwrap();
        let (batch, bad) = csv
            .decoder
            .decode(&messages(&[
                (
                    "plant/a/d1/telemetry",
                    "1970-01-01T00:00:01Z,1.5\n1970-01-01T00:00:02Z,2.5\n",
                ),
                ("plant/a/d2/telemetry", "1970-01-01T00:00:03Z,warm"),
                ("plant/a/d3/telemetry", "1970-01-01T00:00:04Z,4.5"),
            ]))
            .unwrap();
        let batch = batch.unwrap();
        let devices: Vec<_> = batch
            .column(1)
            .as_string::<i32>()
            .iter()
            .flatten()
            .collect();
        assert_eq!(devices, ["d1", "d1", "d3"]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].topic, "plant/a/d2/telemetry");
    }

    #[test]
    fn topic_filters_follow_the_mqtt_rules() {
        assert_eq!(filter_problem("a/+/b/#"), None);
        assert_eq!(filter_problem("#"), None);
        assert!(filter_problem("").is_some());
        assert!(filter_problem("a/#/b").is_some());
        assert!(filter_problem("a/b#").is_some());
        assert!(filter_problem("a+/b").is_some());
    }
}
