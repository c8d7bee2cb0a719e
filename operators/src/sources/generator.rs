//! The `generator` source: synthetic sensor readings, deterministic for a seed.
//!
//! It stands in for real devices in demos, benchmarks and detector tests. Each of
//! `devices` series reports one reading every `interval` of event time; every configured
//! field becomes a float64 column shaped as a sine wave, a random walk or a constant, with
//! optional Gaussian noise and optional injected spikes whose rows are flagged in an
//! `injected_anomaly` column (ground truth for detector tests).
//!
//! Everything random comes from one ChaCha8 generator seeded by `seed`, drawn in row order
//! (tick by tick, device by device, field by field), so the same config yields the same
//! rows whatever the batch size or pacing. With `realtime` the ticks are paced on tokio's
//! clock, so tests run them on a paused clock without sleeping.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, StringBuilder, TimestampMillisecondArray,
};
use arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use tokio::time::{Instant, sleep_until};
use weir_engine::config::{ConfigErrors, HumanDuration};
use weir_engine::metrics::OperatorMetrics;
use weir_engine::registry::{
    MAIN_PORT_NAME, NodeContext, OperatorFactory, OutputSpec, PlannedOperator, Role, StreamInfo,
};
use weir_engine::{OperatorError, OperatorInstance, Source, SourceContext};

/// The name of the device-id column.
pub const DEVICE_COLUMN: &str = "device";
/// The name of the event-time column.
pub const TS_COLUMN: &str = "ts";
/// The name of the column that flags rows with an injected spike.
pub const ANOMALY_COLUMN: &str = "injected_anomaly";

/// The most series one generator produces; their names and state stay in memory.
const MAX_DEVICES: u32 = 1_000_000;

/// Builds `generator` sources.
pub struct GeneratorFactory;

/// The `config` of a `generator` source.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeneratorConfig {
    /// How many series to produce; device ids are `device_prefix` followed by the series
    /// number, zero-padded to four digits (`dev-0000`, `dev-0001`, …).
    pub devices: u32,
    /// The text before the series number in device ids.
    pub device_prefix: String,
    /// The event-time step between two readings of one device, in whole milliseconds.
    pub interval: HumanDuration,
    /// How many rows to produce in total before the stream ends; absent means endless.
    pub count: Option<u64>,
    /// Pace the readings in wall-clock time, one tick of all devices every `interval`;
    /// `false` produces them as fast as downstream takes them.
    pub realtime: bool,
    /// The event time of the first tick as an RFC 3339 timestamp, e.g.
    /// `2026-01-01T00:00:00Z`; absent means the wall clock when the source starts.
    pub start: Option<String>,
    /// Seeds every random draw: the same seed and config give the same rows.
    pub seed: u64,
    /// The most rows in one emitted batch.
    pub batch_rows: usize,
    /// The value columns, in order; each becomes a float64 column of that name.
    pub fields: FieldList,
    /// Inject spikes into random rows and flag them in an `injected_anomaly` column.
    pub anomalies: Option<AnomalyConfig>,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            devices: 10,
            device_prefix: "dev-".to_owned(),
            interval: HumanDuration(Duration::from_secs(1)),
            count: None,
            realtime: true,
            start: None,
            seed: 0,
            batch_rows: 4096,
            fields: FieldList::default(),
            anomalies: None,
        }
    }
}

/// The value columns of a generator, in the order they were written.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldList(pub Vec<(String, FieldConfig)>);

impl Default for FieldList {
    /// One sine-shaped column called `value`.
    fn default() -> Self {
        FieldList(vec![("value".to_owned(), FieldConfig::of(Shape::Sine))])
    }
}

impl<'de> Deserialize<'de> for FieldList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = FieldList;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a mapping from column name to {shape: sine | random_walk | constant, ...}",
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FieldList, A::Error> {
                let mut fields: Vec<(String, FieldConfig)> = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    if fields.iter().any(|(seen, _)| *seen == name) {
                        return Err(serde::de::Error::custom(format!(
                            "field '{name}' is declared twice: give each column its own name"
                        )));
                    }
                    fields.push((name, map.next_value()?));
                }
                Ok(FieldList(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// How one value column evolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// `base + amplitude * sin(2π t / period + phase)`, with a random phase per device.
    Sine,
    /// Starts at `base` and moves by `step` times a standard normal draw each reading,
    /// reflected into `min..max`.
    RandomWalk,
    /// Always `base`.
    Constant,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Sine => "sine",
            Shape::RandomWalk => "random_walk",
            Shape::Constant => "constant",
        }
    }

    /// The parameters this shape takes, besides `shape`.
    fn parameters(self) -> &'static [&'static str] {
        match self {
            Shape::Sine => &["base", "amplitude", "period", "noise"],
            Shape::RandomWalk => &["base", "step", "min", "max", "noise"],
            Shape::Constant => &["base", "noise"],
        }
    }
}

/// One value column. Which parameters apply depends on `shape`; the others are rejected.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    /// `sine`, `random_walk` or `constant`.
    pub shape: Shape,
    /// The centre of a sine, the start of a random walk, the value of a constant (default 0).
    pub base: Option<f64>,
    /// Sine only: the peak deviation from `base` (default 1).
    pub amplitude: Option<f64>,
    /// Sine only: the length of one cycle in event time (default 1h).
    pub period: Option<HumanDuration>,
    /// The standard deviation of Gaussian noise added to every reading (default 0).
    pub noise: Option<f64>,
    /// Random walk only: the standard deviation of one step (default 1).
    pub step: Option<f64>,
    /// Random walk only: the lowest value the walk reaches (default unbounded).
    pub min: Option<f64>,
    /// Random walk only: the highest value the walk reaches (default unbounded).
    pub max: Option<f64>,
}

impl FieldConfig {
    fn of(shape: Shape) -> Self {
        FieldConfig {
            shape,
            base: None,
            amplitude: None,
            period: None,
            noise: None,
            step: None,
            min: None,
            max: None,
        }
    }

    /// The parameters that were written, by name.
    fn written(&self) -> [(&'static str, bool); 7] {
        [
            ("base", self.base.is_some()),
            ("amplitude", self.amplitude.is_some()),
            ("period", self.period.is_some()),
            ("noise", self.noise.is_some()),
            ("step", self.step.is_some()),
            ("min", self.min.is_some()),
            ("max", self.max.is_some()),
        ]
    }
}

/// The value of `base` when a field leaves it out.
const DEFAULT_BASE: f64 = 0.0;
/// The value of `amplitude` when a sine field leaves it out.
const DEFAULT_AMPLITUDE: f64 = 1.0;
/// The value of `period` when a sine field leaves it out.
const DEFAULT_PERIOD: Duration = Duration::from_secs(3600);
/// The value of `noise` when a field leaves it out.
const DEFAULT_NOISE: f64 = 0.0;
/// The value of `step` when a random-walk field leaves it out.
const DEFAULT_STEP: f64 = 1.0;
/// The value of `anomalies.magnitude` when left out.
const DEFAULT_MAGNITUDE: f64 = 6.0;

/// Spikes injected into random rows.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    /// The chance that a row is spiked, from 0 to 1.
    pub probability: f64,
    /// How far a spike moves each value, in units of the field's noise (or, without
    /// noise, its amplitude, or else 1), up or down at random (default 6).
    #[serde(default = "default_magnitude")]
    pub magnitude: f64,
}

fn default_magnitude() -> f64 {
    DEFAULT_MAGNITUDE
}

/// A value column after validation, with its defaults filled in.
#[derive(Clone, Debug)]
struct FieldModel {
    name: String,
    kind: Kind,
    noise: f64,
    /// The unit a spike's magnitude is measured in.
    spike_unit: f64,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sine {
        base: f64,
        amplitude: f64,
        period_ms: i64,
    },
    RandomWalk {
        base: f64,
        step: f64,
        min: f64,
        max: f64,
    },
    Constant {
        base: f64,
    },
}

/// A generator whose config is valid.
#[derive(Clone, Debug)]
struct Plan {
    devices: u32,
    device_prefix: String,
    interval: Duration,
    count: Option<u64>,
    realtime: bool,
    start_ms: Option<i64>,
    seed: u64,
    batch_rows: usize,
    fields: Vec<FieldModel>,
    anomalies: Option<AnomalyConfig>,
    schema: SchemaRef,
}

impl OperatorFactory for GeneratorFactory {
    fn kind(&self) -> &'static str {
        "generator"
    }

    fn roles(&self) -> &'static [Role] {
        &[Role::Source]
    }

    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config: GeneratorConfig = node.config()?;
        Ok(Box::new(validate(&config, node)?))
    }
}

fn validate(config: &GeneratorConfig, node: &NodeContext<'_>) -> Result<Plan, ConfigErrors> {
    let mut errors = ConfigErrors::new();
    if node.schema.is_some() {
        errors.push(
            node.error("generator derives its schema from config.fields")
                .with_hint(
                    "remove `schema` from this node and describe the columns under config.fields",
                ),
        );
    }
    if config.devices == 0 || config.devices > MAX_DEVICES {
        errors.push(node.field_error(
            &["devices"],
            format!(
                "devices must be between 1 and {MAX_DEVICES}, not {}",
                config.devices
            ),
        ));
    }
    let interval = config.interval.0;
    if interval < Duration::from_millis(1) || !interval.subsec_nanos().is_multiple_of(1_000_000) {
        errors.push(
            node.field_error(
                &["interval"],
                "interval must be a whole number of milliseconds, at least 1ms",
            )
            .with_hint("event times are in milliseconds; write e.g. 250ms or 1s"),
        );
    }
    if config.batch_rows == 0 {
        errors.push(node.field_error(&["batch_rows"], "batch_rows must be at least 1"));
    }
    let start_ms = match &config.start {
        None => None,
        Some(text) => match string_to_timestamp_nanos(text.trim()) {
            Ok(nanos) => Some(nanos.div_euclid(1_000_000)),
            Err(_) => {
                errors.push(
                    node.field_error(
                        &["start"],
                        format!("start '{text}' is not an RFC 3339 timestamp"),
                    )
                    .with_hint("write e.g. 2026-01-01T00:00:00Z"),
                );
                None
            }
        },
    };
    let fields = validate_fields(config, node, &mut errors);
    if let Some(anomalies) = &config.anomalies {
        if !(0.0..=1.0).contains(&anomalies.probability) {
            errors.push(node.field_error(
                &["anomalies", "probability"],
                format!(
                    "probability must be between 0 and 1, not {}",
                    anomalies.probability
                ),
            ));
        }
        if !anomalies.magnitude.is_finite() {
            errors.push(node.field_error(
                &["anomalies", "magnitude"],
                "magnitude must be a finite number",
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let schema = output_schema(&fields, config.anomalies.is_some());
    Ok(Plan {
        devices: config.devices,
        device_prefix: config.device_prefix.clone(),
        interval,
        count: config.count,
        realtime: config.realtime,
        start_ms,
        seed: config.seed,
        batch_rows: config.batch_rows,
        fields,
        anomalies: config.anomalies.clone(),
        schema,
    })
}

fn validate_fields(
    config: &GeneratorConfig,
    node: &NodeContext<'_>,
    errors: &mut ConfigErrors,
) -> Vec<FieldModel> {
    if config.fields.0.is_empty() {
        errors.push(node.field_error(&["fields"], "fields must declare at least one column"));
    }
    let mut models = Vec::with_capacity(config.fields.0.len());
    for (name, field) in &config.fields.0 {
        let at = |key: &'static str| ["fields", name.as_str(), key];
        let error = |keys: [&str; 3], message: String| node.field_error(&keys, message);
        if name.is_empty() || [DEVICE_COLUMN, TS_COLUMN, ANOMALY_COLUMN].contains(&name.as_str()) {
            errors.push(
                node.field_error(&["fields", name], format!("'{name}' cannot name a field"))
                    .with_hint("device, ts and injected_anomaly are the generator's own columns"),
            );
        }
        let shape = field.shape;
        for (parameter, written) in field.written() {
            if written && !shape.parameters().contains(&parameter) {
                errors.push(
                    error(
                        at(parameter),
                        format!("{parameter} does not apply to shape {}", shape.name()),
                    )
                    .with_hint(format!(
                        "{} takes {}",
                        shape.name(),
                        shape.parameters().join(", ")
                    )),
                );
            }
        }
        let mut finite = |key: &'static str, value: Option<f64>, default: f64| match value {
            Some(v) if !v.is_finite() => {
                errors.push(error(at(key), format!("{key} must be a finite number")));
                default
            }
            Some(v) => v,
            None => default,
        };
        let base = finite("base", field.base, DEFAULT_BASE);
        let amplitude = finite("amplitude", field.amplitude, DEFAULT_AMPLITUDE);
        let noise = finite("noise", field.noise, DEFAULT_NOISE);
        let step = finite("step", field.step, DEFAULT_STEP);
        let min = field.min.unwrap_or(f64::NEG_INFINITY);
        let max = field.max.unwrap_or(f64::INFINITY);
        if noise < 0.0 {
            errors.push(error(
                at("noise"),
                format!("noise must not be negative, not {noise}"),
            ));
        }
        if step < 0.0 {
            errors.push(error(
                at("step"),
                format!("step must not be negative, not {step}"),
            ));
        }
        let period = field.period.map_or(DEFAULT_PERIOD, |p| p.0);
        if period < Duration::from_millis(1) {
            errors.push(error(
                at("period"),
                "period must be at least 1ms".to_owned(),
            ));
        }
        let kind = match shape {
            Shape::Sine => Kind::Sine {
                base,
                amplitude,
                period_ms: weir_engine::time::duration_ms(period).max(1),
            },
            Shape::RandomWalk => {
                if min.is_nan() || max.is_nan() || min > max {
                    errors.push(error(
                        at("min"),
                        format!("min {min} must not exceed max {max}"),
                    ));
                } else if base < min || base > max {
                    errors.push(
                        error(
                            at("base"),
                            format!("base {base} lies outside min..max ({min}..{max})"),
                        )
                        .with_hint("the walk starts at base, so put it between min and max"),
                    );
                }
                Kind::RandomWalk {
                    base,
                    step,
                    min,
                    max,
                }
            }
            Shape::Constant => Kind::Constant { base },
        };
        let spike_unit = if noise > 0.0 {
            noise
        } else if matches!(kind, Kind::Sine { .. }) && amplitude != 0.0 {
            amplitude.abs()
        } else {
            1.0
        };
        models.push(FieldModel {
            name: name.clone(),
            kind,
            noise,
            spike_unit,
        });
    }
    models
}

fn output_schema(fields: &[FieldModel], anomalies: bool) -> SchemaRef {
    let mut columns = vec![
        Field::new(DEVICE_COLUMN, DataType::Utf8, false),
        Field::new(
            TS_COLUMN,
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
    ];
    columns.extend(
        fields
            .iter()
            .map(|f| Field::new(&f.name, DataType::Float64, false)),
    );
    if anomalies {
        columns.push(Field::new(ANOMALY_COLUMN, DataType::Boolean, false));
    }
    Arc::new(Schema::new(columns))
}

impl PlannedOperator for Plan {
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: MAIN_PORT_NAME.to_owned(),
            stream: StreamInfo {
                schema: self.schema.clone(),
                event_time: Some(TS_COLUMN.to_owned()),
            },
            unwired_drop_reason: None,
        }]
    }

    fn instantiate(
        self: Box<Self>,
        _metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        Ok(OperatorInstance::Source(Box::new(Generator::new(*self))))
    }
}

/// A seeded random source with a cached second normal draw.
struct Random {
    rng: ChaCha8Rng,
    spare_normal: Option<f64>,
}

impl Random {
    /// A uniform draw from `[0, 1)` with 53 random bits.
    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard normal draw (Marsaglia's polar method: no trigonometry, two draws per
    /// accepted pair, so every other call is free).
    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        loop {
            let u = 2.0 * self.uniform() - 1.0;
            let v = 2.0 * self.uniform() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let m = (-2.0 * s.ln() / s).sqrt();
                self.spare_normal = Some(v * m);
                return u * m;
            }
        }
    }
}

/// The running generator: the series' state and where in the sequence it is.
struct Generator {
    plan: Plan,
    random: Random,
    names: Vec<String>,
    /// Per device and field (device-major): the sine phase, in radians.
    phases: Vec<f64>,
    /// Per device and field (device-major): the random walk's current value.
    walks: Vec<f64>,
    interval_ms: i64,
    tick: u64,
    device: usize,
    /// Rows emitted so far (`count` bounds them).
    emitted: u64,
    /// The event time of tick 0, fixed at the first run (or restored).
    start_ms: Option<i64>,
}

/// Where a generator is in its sequence: its checkpointed position. The series' phases
/// follow from the seed, so they are not kept.
#[derive(serde::Serialize, serde::Deserialize)]
struct Position {
    /// The random stream's position, in 32-bit words (ChaCha's own counter).
    word_pos: u128,
    /// Floats as their bits: a decimal rendering need not read back to the same value,
    /// and one bit off would change every value after it.
    spare_normal: Option<u64>,
    walks: Vec<u64>,
    tick: u64,
    device: usize,
    emitted: u64,
    start_ms: i64,
}

impl Generator {
    fn new(plan: Plan) -> Self {
        let mut random = Random {
            rng: ChaCha8Rng::seed_from_u64(plan.seed),
            spare_normal: None,
        };
        let devices = plan.devices as usize;
        let names = (0..devices)
            .map(|i| format!("{}{i:04}", plan.device_prefix))
            .collect();
        let slots = devices * plan.fields.len();
        let phases = (0..slots)
            .map(|_| random.uniform() * std::f64::consts::TAU)
            .collect();
        let walks = (0..devices)
            .flat_map(|_| plan.fields.iter())
            .map(|field| match field.kind {
                Kind::RandomWalk { base, .. } => base,
                _ => 0.0,
            })
            .collect();
        Generator {
            interval_ms: weir_engine::time::duration_ms(plan.interval),
            plan,
            random,
            names,
            phases,
            walks,
            tick: 0,
            device: 0,
            emitted: 0,
            start_ms: None,
        }
    }

    /// Emits `batch`, first taking a checkpoint barrier if one is due.
    async fn emit(
        &mut self,
        ctx: &mut SourceContext,
        batch: RecordBatch,
    ) -> Result<(), OperatorError> {
        self.emitted += batch.num_rows() as u64;
        ctx.emit(batch).await?;
        self.take_barrier(ctx).await
    }

    async fn take_barrier(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError> {
        if let Some(epoch) = ctx.barrier_due() {
            let position = self.snapshot()?;
            ctx.checkpoint(epoch, position).await?;
        }
        Ok(())
    }

    /// The next `rows` readings, continuing where the previous batch stopped.
    fn next_batch(&mut self, start_ms: i64, rows: usize) -> Result<RecordBatch, ArrowError> {
        let field_count = self.plan.fields.len();
        let name_bytes = self.names.first().map_or(0, String::len) * rows;
        let mut devices = StringBuilder::with_capacity(rows, name_bytes);
        let mut ts = Vec::with_capacity(rows);
        let mut values: Vec<Vec<f64>> =
            (0..field_count).map(|_| Vec::with_capacity(rows)).collect();
        let mut flags = Vec::with_capacity(if self.plan.anomalies.is_some() {
            rows
        } else {
            0
        });
        let mut offsets = self.period_offsets_ms();
        let mut tick_ms = self.tick_ms(start_ms);
        for _ in 0..rows {
            let device = self.device;
            devices.append_value(&self.names[device]);
            ts.push(tick_ms);
            let spike = match &self.plan.anomalies {
                Some(anomalies) => {
                    let hit = self.random.uniform() < anomalies.probability;
                    flags.push(hit);
                    if hit {
                        let up = self.random.rng.next_u32() & 1 == 0;
                        if up {
                            anomalies.magnitude
                        } else {
                            -anomalies.magnitude
                        }
                    } else {
                        0.0
                    }
                }
                None => 0.0,
            };
            for (index, field) in self.plan.fields.iter().enumerate() {
                let slot = device * field_count + index;
                let mut value = match field.kind {
                    Kind::Sine {
                        base,
                        amplitude,
                        period_ms,
                    } => {
                        let cycle = offsets[index] as f64 / period_ms as f64;
                        base + amplitude * (std::f64::consts::TAU * cycle + self.phases[slot]).sin()
                    }
                    Kind::RandomWalk { step, min, max, .. } => {
                        let mut next = self.walks[slot];
                        if step > 0.0 {
                            next += step * self.random.normal();
                        }
                        // Reflect off the bounds so the walk does not stick to them.
                        if next > max {
                            next = max - (next - max);
                        }
                        if next < min {
                            next = min + (min - next);
                        }
                        next = next.clamp(min, max);
                        self.walks[slot] = next;
                        next
                    }
                    Kind::Constant { base } => base,
                };
                if field.noise > 0.0 {
                    value += field.noise * self.random.normal();
                }
                if spike != 0.0 {
                    value += spike * field.spike_unit;
                }
                values[index].push(value);
            }
            self.device += 1;
            if self.device == self.names.len() {
                self.device = 0;
                self.tick += 1;
                offsets = self.period_offsets_ms();
                tick_ms = self.tick_ms(start_ms);
            }
        }
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(field_count + 3);
        columns.push(Arc::new(devices.finish()));
        columns.push(Arc::new(TimestampMillisecondArray::from(ts)));
        columns.extend(
            values
                .into_iter()
                .map(|column| Arc::new(Float64Array::from(column)) as ArrayRef),
        );
        if self.plan.anomalies.is_some() {
            columns.push(Arc::new(BooleanArray::from(flags)));
        }
        RecordBatch::try_new(self.plan.schema.clone(), columns)
    }

    /// The event time of the current tick.
    fn tick_ms(&self, start_ms: i64) -> i64 {
        let tick = i64::try_from(self.tick).unwrap_or(i64::MAX);
        start_ms.saturating_add(tick.saturating_mul(self.interval_ms))
    }

    /// For each field, how far into its sine period the current tick is, in milliseconds.
    /// Integer arithmetic keeps the phase exact however long the generator runs.
    fn period_offsets_ms(&self) -> Vec<i64> {
        let elapsed = i128::from(self.tick) * i128::from(self.interval_ms);
        self.plan
            .fields
            .iter()
            .map(|field| match field.kind {
                Kind::Sine { period_ms, .. } => (elapsed % i128::from(period_ms)) as i64,
                _ => 0,
            })
            .collect()
    }
}

fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, weir_engine::time::duration_ms)
}

#[async_trait]
impl Source for Generator {
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError> {
        let start_ms = *self
            .start_ms
            .get_or_insert_with(|| self.plan.start_ms.unwrap_or_else(wall_clock_ms));
        let batch_rows = self.plan.batch_rows as u64;
        let mut remaining = self
            .plan
            .count
            .unwrap_or(u64::MAX)
            .saturating_sub(self.emitted);
        if !self.plan.realtime {
            while remaining > 0 && !ctx.is_cancelled() {
                let rows = remaining.min(batch_rows);
                remaining -= rows;
                let batch = self.next_batch(start_ms, rows as usize)?;
                self.emit(ctx, batch).await?;
            }
            return Ok(());
        }
        let interval = self.plan.interval;
        let mut due = Instant::now();
        while remaining > 0 {
            // One tick: a reading of every device, in batches of at most `batch_rows`.
            // A restored generator may stand mid-tick: it finishes that tick first.
            let devices = self.names.len() - self.device;
            let mut tick_rows = remaining.min(devices as u64);
            remaining -= tick_rows;
            while tick_rows > 0 {
                let rows = tick_rows.min(batch_rows);
                tick_rows -= rows;
                let batch = self.next_batch(start_ms, rows as usize)?;
                self.emit(ctx, batch).await?;
            }
            if remaining == 0 {
                break;
            }
            due += interval;
            // More than a tick behind (a slow consumer, a suspended process): start the
            // schedule afresh from now instead of bursting every missed tick at once.
            let now = Instant::now();
            if now.saturating_duration_since(due) > interval {
                due = now;
            }
            loop {
                tokio::select! {
                    biased;
                    _ = ctx.cancelled() => return Ok(()),
                    _ = ctx.barrier_requested() => self.take_barrier(ctx).await?,
                    _ = sleep_until(due) => break,
                }
            }
        }
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, OperatorError> {
        let position = Position {
            word_pos: self.random.rng.get_word_pos(),
            spare_normal: self.random.spare_normal.map(f64::to_bits),
            walks: self.walks.iter().map(|walk| walk.to_bits()).collect(),
            tick: self.tick,
            device: self.device,
            emitted: self.emitted,
            start_ms: self.start_ms.unwrap_or_default(),
        };
        serde_json::to_vec(&position).map(Some).map_err(|e| {
            OperatorError::Internal(format!("cannot encode the generator's position: {e}"))
        })
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), OperatorError> {
        let position: Position = serde_json::from_slice(state).map_err(|e| {
            OperatorError::User(format!(
                "the checkpointed generator position does not read: {e}"
            ))
        })?;
        if position.walks.len() != self.walks.len() || position.device >= self.names.len().max(1) {
            return Err(OperatorError::User(
                "the checkpointed generator position is for another set of devices or fields"
                    .into(),
            ));
        }
        self.random.rng.set_word_pos(position.word_pos);
        self.random.spare_normal = position.spare_normal.map(f64::from_bits);
        self.walks = position.walks.into_iter().map(f64::from_bits).collect();
        self.tick = position.tick;
        self.device = position.device;
        self.emitted = position.emitted;
        self.start_ms = Some(position.start_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::AsArray;
    use arrow::datatypes::{Float64Type, TimestampMillisecondType};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::format::test_support::{Decl, Outputs, plan, run_source, run_source_checkpointed};

    fn planned(config: &str) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        plan(&GeneratorFactory, Role::Source, config, Decl::default())
    }

    async fn generate(config: &str) -> RecordBatch {
        let outputs = Outputs::new();
        run_source(
            planned(config).unwrap(),
            None,
            CancellationToken::new(),
            &outputs,
        )
        .await
        .unwrap();
        outputs.main_batch()
    }

    const SENSORS: &str = "
devices: 3
interval: 1s
count: 300
realtime: false
start: 2026-01-01T00:00:00Z
seed: 42
batch_rows: 64
fields:
  temperature: {shape: sine, base: 60, amplitude: 5, period: 1m, noise: 0.5}
  humidity: {shape: random_walk, base: 40, step: 0.2, min: 0, max: 100}
  pressure: {shape: constant, base: 1013, noise: 0.1}
";

    fn floats(batch: &RecordBatch, name: &str) -> Vec<f64> {
        batch
            .column_by_name(name)
            .unwrap()
            .as_primitive::<Float64Type>()
            .values()
            .to_vec()
    }

    #[tokio::test]
    async fn same_seed_gives_same_rows_whatever_the_batch_size() {
        let a = generate(SENSORS).await;
        let b = generate(&SENSORS.replace("batch_rows: 64", "batch_rows: 7")).await;
        assert_eq!(a.num_rows(), 300);
        assert_eq!(a, b);
        let names: Vec<_> = a
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(
            names,
            ["device", "ts", "temperature", "humidity", "pressure"]
        );
    }

    #[tokio::test]
    async fn a_stopped_generator_resumes_where_it_stopped() {
        let config = SENSORS.replace("count: 300", "count: 300000");
        let whole = generate(&config).await;
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("state.redb");
        let mut parts = Vec::new();
        // Stopped a few milliseconds in, again and again, until a run reaches the end.
        let mut runs = 0;
        loop {
            runs += 1;
            let outputs = Outputs::new();
            let shutdown = CancellationToken::new();
            let stopper = {
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    shutdown.cancel();
                })
            };
            let planned = planned(&config).unwrap();
            run_source_checkpointed(
                planned,
                &store,
                Duration::from_millis(1),
                shutdown,
                &outputs,
            )
            .await
            .unwrap();
            stopper.await.unwrap();
            parts.extend(outputs.main.lock().unwrap().iter().cloned());
            let opened = weir_engine::checkpoint::StateStore::open(&store).unwrap();
            if opened
                .checkpoint
                .is_some_and(|checkpoint| checkpoint.finished)
            {
                break;
            }
            assert!(runs < 1000, "the generator never reached its end");
        }
        assert!(runs > 1, "no run was stopped before the end");
        let resumed = weir_engine::arrow::compute::concat_batches(&whole.schema(), &parts).unwrap();
        assert_eq!(resumed.num_rows(), 300_000);
        if resumed != whole {
            let first = (0..whole.num_rows())
                .find(|&i| resumed.slice(i, 1) != whole.slice(i, 1))
                .unwrap();
            panic!(
                "row {first} differs: {:?} vs {:?}",
                resumed.slice(first, 2),
                whole.slice(first, 2)
            );
        }
        // The run ended on its own: the next one starts afresh.
        let outputs = Outputs::new();
        let planned = planned(&config).unwrap();
        run_source_checkpointed(
            planned,
            &store,
            Duration::from_secs(1),
            CancellationToken::new(),
            &outputs,
        )
        .await
        .unwrap();
        assert_eq!(outputs.main_batch(), whole);
    }

    #[tokio::test]
    async fn another_seed_gives_other_values() {
        let a = generate(SENSORS).await;
        let b = generate(&SENSORS.replace("seed: 42", "seed: 43")).await;
        assert_ne!(floats(&a, "temperature"), floats(&b, "temperature"));
        assert_ne!(floats(&a, "humidity"), floats(&b, "humidity"));
    }

    #[tokio::test]
    async fn devices_take_turns_each_tick_and_series_differ() {
        let batch = generate(SENSORS).await;
        let devices = batch.column(0).as_string::<i32>();
        assert_eq!(
            (0..4).map(|i| devices.value(i)).collect::<Vec<_>>(),
            ["dev-0000", "dev-0001", "dev-0002", "dev-0000"]
        );
        let ts = batch.column(1).as_primitive::<TimestampMillisecondType>();
        assert_eq!(ts.value(0), 1_767_225_600_000);
        assert_eq!(ts.value(2), 1_767_225_600_000);
        assert_eq!(ts.value(3), 1_767_225_601_000);
        let temperature = floats(&batch, "temperature");
        assert_ne!(temperature[0], temperature[1], "per-device phases differ");
        assert!(temperature.iter().all(|t| (50.0..70.0).contains(t)));
        let humidity = floats(&batch, "humidity");
        assert!(humidity.iter().all(|h| (0.0..=100.0).contains(h)));
        assert!(
            humidity.iter().any(|h| (h - 40.0).abs() > 0.1),
            "the walk moves"
        );
        let pressure = floats(&batch, "pressure");
        let mean = pressure.iter().sum::<f64>() / pressure.len() as f64;
        assert!(
            (mean - 1013.0).abs() < 0.05,
            "noise centres on base: {mean}"
        );
    }

    #[tokio::test]
    async fn count_ends_the_stream_mid_tick() {
        let batch = generate("{devices: 4, count: 10, realtime: false, batch_rows: 3}").await;
        assert_eq!(batch.num_rows(), 10);
        assert_eq!(batch.column(0).as_string::<i32>().value(9), "dev-0001");
    }

    #[tokio::test]
    async fn anomalies_are_flagged_and_spiked() {
        let config = "
devices: 2
count: 20000
realtime: false
seed: 7
fields: {value: {shape: constant, base: 10, noise: 1}}
anomalies: {probability: 0.01, magnitude: 8}
";
        let batch = generate(config).await;
        let flags = batch.column_by_name(ANOMALY_COLUMN).unwrap().as_boolean();
        let values = floats(&batch, "value");
        let flagged: Vec<usize> = (0..batch.num_rows()).filter(|&i| flags.value(i)).collect();
        assert!(
            (100..300).contains(&flagged.len()),
            "about 1%: {}",
            flagged.len()
        );
        for &i in &flagged {
            assert!(
                (values[i] - 10.0).abs() > 4.0,
                "row {i} spiked: {}",
                values[i]
            );
        }
        let calm = (0..batch.num_rows())
            .filter(|&i| !flags.value(i) && (values[i] - 10.0).abs() > 6.0)
            .count();
        assert_eq!(calm, 0, "unflagged rows stay within 6 sigma");
    }

    #[tokio::test]
    async fn default_config_has_one_sine_value_column() {
        let outputs = planned("{realtime: false, count: 5}").unwrap().outputs();
        let schema = &outputs[0].stream.schema;
        assert_eq!(schema.field(2).name(), "value");
        assert_eq!(schema.fields().len(), 3);
        assert_eq!(outputs[0].stream.event_time.as_deref(), Some("ts"));
    }

    #[tokio::test(start_paused = true)]
    async fn realtime_paces_one_tick_per_interval() {
        let started = Instant::now();
        let batch =
            generate("{devices: 2, interval: 5s, count: 6, start: 2026-01-01T00:00:00Z}").await;
        assert_eq!(batch.num_rows(), 6);
        // Three ticks: at 0s, 5s and 10s.
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn realtime_stops_when_cancelled() {
        let outputs = Outputs::new();
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3500)).await;
            stop.cancel();
        });
        let planned = planned("{devices: 1, interval: 1s}").unwrap();
        run_source(planned, None, cancel, &outputs).await.unwrap();
        assert_eq!(outputs.main_rows(), 4, "ticks at 0s, 1s, 2s and 3s");
    }

    #[test]
    fn rejects_a_declared_schema_and_bad_parameters_all_at_once() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Float64, true)]));
        let decl = Decl {
            schema: Some(schema),
            ..Decl::default()
        };
        let config = "
devices: 0
interval: 500us
start: yesterday
fields:
  t: {shape: sine, step: 2}
  h: {shape: random_walk, base: 5, min: 10, max: 20}
anomalies: {probability: 2}
";
        let errors = plan(&GeneratorFactory, Role::Source, config, decl)
            .err()
            .unwrap();
        let messages: Vec<_> = errors.iter().map(|e| e.message.as_str()).collect();
        assert!(messages.contains(&"generator derives its schema from config.fields"));
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        for path in [
            "sources.node",
            "sources.node.config.devices",
            "sources.node.config.interval",
            "sources.node.config.start",
            "sources.node.config.fields.t.step",
            "sources.node.config.fields.h.base",
            "sources.node.config.anomalies.probability",
        ] {
            assert!(paths.contains(&path), "{path} missing from {paths:?}");
        }
    }

    #[test]
    fn rejects_reserved_field_names() {
        let errors = planned("fields: {ts: {shape: constant}}").err().unwrap();
        assert_eq!(errors[0].path, "sources.node.config.fields.ts");
    }

    #[test]
    fn generates_fast_enough() {
        // Not a benchmark, a guard against accidental per-row allocation or slow paths.
        let config = GeneratorConfig {
            realtime: false,
            ..GeneratorConfig::default()
        };
        let root = weir_engine::config::ConfigValue::null();
        let node = NodeContext {
            pipeline: "p",
            name: "g",
            role: Role::Source,
            config: &root,
            config_path: "sources.g.config",
            inputs: &[],
            inputs_known: true,
            schema: None,
            event_time: None,
            window: None,
            on_error: weir_engine::registry::OnError::Fail,
            base_dir: std::path::Path::new("."),
            peers: &[],
        };
        let mut generator = Generator::new(validate(&config, &node).unwrap());
        let started = std::time::Instant::now();
        let mut rows = 0;
        while rows < 2_000_000 {
            rows += generator.next_batch(0, 4096).unwrap().num_rows();
        }
        let per_second = rows as f64 / started.elapsed().as_secs_f64();
        assert!(per_second > 1_000_000.0, "{per_second:.0} rows/s");
    }
}
