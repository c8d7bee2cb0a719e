//! The `anomaly` transform: scores every row of a value column against its series'
//! history and adds `anomaly_score` (0..1) and `is_anomaly` columns.
//!
//! Rows are grouped into series by an optional `key` column, each with its own detector
//! state; at most `max_keys` series are kept, the least recently seen is evicted first,
//! and evictions are counted. With an event-time column on the input, rows wait until the
//! watermark passes them and are then scored in event-time order, so the outcome does not
//! depend on how rows were cut into batches or interleaved across keys. Rows that arrive
//! behind the watermark are scored on arrival. Detectors are deterministic: the same rows
//! give the same scores.
//!
//! Detectors, each in its own file with its parameters and defaults: `zscore` (distance
//! from the mean of earlier values), `ewma` (an exponentially weighted control chart) and
//! `mad` (distance from the median in median absolute deviations).

mod ewma;
mod mad;
mod zscore;

use std::num::NonZeroUsize;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, Float64Array, Float64Builder, RecordBatch,
    StringArray, UInt32Array,
};
use arrow::compute::{
    can_cast_types, cast, concat_batches, filter_record_batch, take_record_batch,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use lru::LruCache;
use serde::Deserialize;
use weir_engine::config::ConfigErrors;
use weir_engine::metrics::{OperatorMetrics, StateMetrics};
use weir_engine::registry::{
    MAIN_PORT_NAME, NodeContext, OperatorFactory, OutputSpec, PlannedOperator, Role, StreamInfo,
};
use weir_engine::time::event_times_ms;
use weir_engine::{Collector, OperatorError, OperatorInstance, Transform, Watermark};

pub use ewma::EwmaConfig;
pub use mad::MadConfig;
pub use zscore::ZscoreConfig;

use crate::format::{field_error, node_config, node_error};

/// The column holding each row's score, from 0 (normal) towards 1.
pub const SCORE_COLUMN: &str = "anomaly_score";
/// The column saying whether the row is an anomaly.
pub const FLAG_COLUMN: &str = "is_anomaly";

/// What one keyed series costs besides its key text and detector: the map's entry and
/// list links (an estimate for `weir_operator_state_bytes`).
const SERIES_OVERHEAD_BYTES: usize = 64;

/// Builds `anomaly` transforms.
pub struct AnomalyFactory;

/// The `config` of an `anomaly` transform.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnomalyConfig {
    /// The numeric column to score.
    pub value: String,
    /// The column whose values name the series (e.g. `device`); one series without it.
    pub key: Option<String>,
    /// The detector: `zscore`, `ewma` or `mad`.
    pub detector: DetectorKind,
    /// Parameters of the `zscore` detector.
    pub zscore: Option<ZscoreConfig>,
    /// Parameters of the `ewma` detector.
    pub ewma: Option<EwmaConfig>,
    /// Parameters of the `mad` detector.
    pub mad: Option<MadConfig>,
    /// `all` rows, scored, or only the `anomalies`.
    pub emit: Emit,
    /// The most series kept; beyond it the least recently seen is forgotten.
    pub max_keys: usize,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            value: String::new(),
            key: None,
            detector: DetectorKind::Zscore,
            zscore: None,
            ewma: None,
            mad: None,
            emit: Emit::All,
            max_keys: 100_000,
        }
    }
}

/// The detectors there are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorKind {
    /// Distance from the mean of earlier values, in standard deviations.
    #[default]
    Zscore,
    /// An exponentially weighted control chart.
    Ewma,
    /// Distance from the median, in median absolute deviations.
    Mad,
}

impl DetectorKind {
    fn name(self) -> &'static str {
        match self {
            DetectorKind::Zscore => "zscore",
            DetectorKind::Ewma => "ewma",
            DetectorKind::Mad => "mad",
        }
    }
}

/// Which rows leave the transform.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Emit {
    /// Every row, with its score.
    #[default]
    All,
    /// Only rows that are anomalies.
    Anomalies,
}

/// What a detector says about one value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    /// 0 (normal) to 1 (as abnormal as it gets).
    pub score: f64,
    /// Whether the value is an anomaly.
    pub is_anomaly: bool,
}

impl Verdict {
    /// Nothing unusual (or too little history to tell).
    pub const NORMAL: Verdict = Verdict {
        score: 0.0,
        is_anomaly: false,
    };
}

/// One series' detector: scores each value against what came before, then learns it.
pub trait Detector: Send {
    /// Scores `value`, seen at event time `ts` (ms), and adds it to the history.
    fn observe(&mut self, ts: i64, value: f64) -> Verdict;

    /// The memory this series' state holds, in bytes (an estimate).
    fn state_bytes(&self) -> usize;
}

/// The verdict on a value `deviation` from a centre whose spread is `sigma`: an anomaly
/// beyond `threshold` spreads, scored `erf(|z| / sqrt(2))` (any deviation at all from a
/// series without spread scores 1).
pub fn normal_score(deviation: f64, sigma: f64, threshold: f64) -> Verdict {
    let deviation = deviation.abs();
    let score = if sigma > 0.0 {
        libm::erf(deviation / sigma / std::f64::consts::SQRT_2)
    } else if deviation > 0.0 {
        1.0
    } else {
        0.0
    };
    Verdict {
        score,
        is_anomaly: deviation > threshold * sigma,
    }
}

/// The validated detector choice, able to start a series.
#[derive(Clone, Debug)]
enum DetectorSpec {
    Zscore(ZscoreConfig),
    Ewma(EwmaConfig),
    Mad(MadConfig),
}

impl DetectorSpec {
    fn new_series(&self) -> Box<dyn Detector> {
        match self {
            DetectorSpec::Zscore(config) => Box::new(zscore::Zscore::new(config)),
            DetectorSpec::Ewma(config) => Box::new(ewma::Ewma::new(config)),
            DetectorSpec::Mad(config) => Box::new(mad::Mad::new(config)),
        }
    }
}

impl OperatorFactory for AnomalyFactory {
    fn kind(&self) -> &'static str {
        "anomaly"
    }

    fn roles(&self) -> &'static [Role] {
        &[Role::Transform]
    }

    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config: AnomalyConfig = node_config(node)?;
        let mut errors = ConfigErrors::new();
        let chosen = config.detector;
        for (kind, given) in [
            (DetectorKind::Zscore, config.zscore.is_some()),
            (DetectorKind::Ewma, config.ewma.is_some()),
            (DetectorKind::Mad, config.mad.is_some()),
        ] {
            if given && kind != chosen {
                errors.push(
                    field_error(
                        node,
                        &[kind.name()],
                        format!(
                            "`{}` sets the {} detector, but the detector is {}",
                            kind.name(),
                            kind.name(),
                            chosen.name()
                        ),
                    )
                    .with_hint(format!(
                        "set `detector: {}`, or remove `{}`",
                        kind.name(),
                        kind.name()
                    )),
                );
            }
        }
        let mut check = |problems: Vec<(&'static str, String)>| {
            for (field, problem) in problems {
                errors.push(field_error(node, &[chosen.name(), field], problem));
            }
        };
        let detector = match chosen {
            DetectorKind::Zscore => {
                let zscore = config.zscore.clone().unwrap_or_default();
                check(zscore.problems());
                DetectorSpec::Zscore(zscore)
            }
            DetectorKind::Ewma => {
                let ewma = config.ewma.clone().unwrap_or_default();
                check(ewma.problems());
                DetectorSpec::Ewma(ewma)
            }
            DetectorKind::Mad => {
                let mad = config.mad.clone().unwrap_or_default();
                check(mad.problems());
                DetectorSpec::Mad(mad)
            }
        };
        if config.max_keys == 0 {
            errors.push(field_error(
                node,
                &["max_keys"],
                "max_keys must be at least 1",
            ));
        }
        if config.value.is_empty() {
            errors.push(
                field_error(
                    node,
                    &["value"],
                    "the anomaly transform needs a value column",
                )
                .with_hint("add e.g. `value: temperature` under config"),
            );
        }
        let [input] = node.inputs else {
            errors.push(node_error(
                node,
                format!(
                    "the anomaly transform reads one stream but has {} inputs",
                    node.inputs.len()
                ),
            ));
            return Err(errors);
        };
        if !node.inputs_known {
            return Err(errors);
        }
        let schema = &input.stream.schema;
        let names = || {
            schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let value = match schema.index_of(&config.value) {
            Ok(index) if schema.field(index).data_type().is_numeric() => Some(index),
            Ok(index) => {
                errors.push(field_error(
                    node,
                    &["value"],
                    format!(
                        "column '{}' is {}: the value column must be numeric",
                        config.value,
                        schema.field(index).data_type()
                    ),
                ));
                None
            }
            Err(_) if config.value.is_empty() => None,
            Err(_) => {
                errors.push(
                    field_error(
                        node,
                        &["value"],
                        format!("the input has no column '{}'", config.value),
                    )
                    .with_hint(format!("its columns: {}", names())),
                );
                None
            }
        };
        let key = match &config.key {
            None => None,
            Some(name) => match schema.index_of(name) {
                Ok(index) if can_cast_types(schema.field(index).data_type(), &DataType::Utf8) => {
                    Some(index)
                }
                Ok(index) => {
                    errors.push(field_error(
                        node,
                        &["key"],
                        format!(
                            "column '{name}' is {}, which cannot name a series: use a text, \
                             number or time column",
                            schema.field(index).data_type()
                        ),
                    ));
                    None
                }
                Err(_) => {
                    errors.push(
                        field_error(node, &["key"], format!("the input has no column '{name}'"))
                            .with_hint(format!("its columns: {}", names())),
                    );
                    None
                }
            },
        };
        for taken in [SCORE_COLUMN, FLAG_COLUMN] {
            if schema.index_of(taken).is_ok() {
                errors.push(node_error(
                    node,
                    format!(
                        "the input already has a column '{taken}', which the anomaly \
                         transform adds: rename it upstream"
                    ),
                ));
            }
        }
        let event_time = input
            .stream
            .event_time
            .as_ref()
            .and_then(|column| schema.index_of(column).ok());
        match value {
            Some(value) if errors.is_empty() => {
                let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
                fields.push(Arc::new(Field::new(SCORE_COLUMN, DataType::Float64, true)));
                fields.push(Arc::new(Field::new(FLAG_COLUMN, DataType::Boolean, false)));
                Ok(Box::new(Plan {
                    input_schema: schema.clone(),
                    output_schema: Arc::new(Schema::new(fields)),
                    event_time_name: input.stream.event_time.clone(),
                    event_time,
                    value,
                    key,
                    detector,
                    emit: config.emit,
                    max_keys: NonZeroUsize::new(config.max_keys).unwrap_or(NonZeroUsize::MIN),
                }))
            }
            _ => Err(errors),
        }
    }
}

/// An `anomaly` transform whose config is valid.
struct Plan {
    input_schema: SchemaRef,
    output_schema: SchemaRef,
    event_time_name: Option<String>,
    /// Index of the input's event-time column, when it has one.
    event_time: Option<usize>,
    value: usize,
    key: Option<usize>,
    detector: DetectorSpec,
    emit: Emit,
    max_keys: NonZeroUsize,
}

impl PlannedOperator for Plan {
    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: MAIN_PORT_NAME.to_owned(),
            stream: StreamInfo {
                schema: self.output_schema.clone(),
                event_time: self.event_time_name.clone(),
            },
            unwired_drop_reason: None,
        }]
    }

    fn instantiate(
        self: Box<Self>,
        metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        Ok(OperatorInstance::Transform(Box::new(Anomaly {
            series: LruCache::new(self.max_keys),
            unkeyed: None,
            pending: Vec::new(),
            watermark: Watermark::START,
            state: metrics.state(),
            state_bytes: 0,
            plan: *self,
        })))
    }
}

/// The running transform.
struct Anomaly {
    plan: Plan,
    /// Each keyed series' detector, least recently seen first out.
    series: LruCache<String, Box<dyn Detector>>,
    /// The series of rows without a key (no key column, or a null key).
    unkeyed: Option<Box<dyn Detector>>,
    /// Rows waiting for the watermark to pass them.
    pending: Vec<RecordBatch>,
    watermark: Watermark,
    state: StateMetrics,
    /// The state memory last reported.
    state_bytes: i64,
}

#[async_trait]
impl Transform for Anomaly {
    async fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        if self.plan.event_time.is_none() || self.watermark == Watermark::END {
            return self.score_in_order(&batch, out);
        }
        self.pending.push(batch);
        Ok(())
    }

    async fn on_watermark(
        &mut self,
        watermark: Watermark,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        self.watermark = watermark;
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = concat_batches(&self.plan.input_schema, &self.pending)?;
        self.pending.clear();
        let times = self.event_times(&pending)?;
        let ready: BooleanArray = times
            .iter()
            .map(|&ts| Some(watermark == Watermark::END || ts < watermark.millis()))
            .collect();
        let waiting = arrow::compute::not(&ready)?;
        let later = filter_record_batch(&pending, &waiting)?;
        if later.num_rows() > 0 {
            self.pending.push(later);
        }
        let now = filter_record_batch(&pending, &ready)?;
        if now.num_rows() == 0 {
            return Ok(());
        }
        // Event-time order; rows with equal times keep their arrival order.
        let times = self.event_times(&now)?;
        let mut order: Vec<u32> = (0..now.num_rows() as u32).collect();
        order.sort_by_key(|&i| times[i as usize]);
        let sorted = take_record_batch(&now, &UInt32Array::from(order))?;
        self.score_in_order(&sorted, out)
    }
}

impl Anomaly {
    /// The detector of the series named `key` (`None`: no key column, or a null key),
    /// starting the series, and evicting the least recently seen one, when needed.
    fn series_of(&mut self, key: Option<&str>) -> &mut Box<dyn Detector> {
        let Some(key) = key else {
            let detector = &self.plan.detector;
            return self.unkeyed.get_or_insert_with(|| detector.new_series());
        };
        if !self.series.contains(key) {
            let fresh = self.plan.detector.new_series();
            self.state_bytes += (key.len() + SERIES_OVERHEAD_BYTES + fresh.state_bytes()) as i64;
            if let Some((evicted_key, evicted)) = self.series.push(key.to_owned(), fresh) {
                self.state.evictions.inc();
                self.state_bytes -=
                    (evicted_key.len() + SERIES_OVERHEAD_BYTES + evicted.state_bytes()) as i64;
            }
        }
        self.series
            .get_mut(key)
            .expect("the series was just looked up or inserted")
    }

    /// Each row's event time in ms; rows without one sort first.
    fn event_times(&self, batch: &RecordBatch) -> Result<Vec<i64>, OperatorError> {
        let Some(index) = self.plan.event_time else {
            return Ok(vec![0; batch.num_rows()]);
        };
        let column = batch.column(index);
        let millis = event_times_ms(column).ok_or_else(|| {
            OperatorError::Internal("the event-time column is not a timestamp".to_owned())
        })?;
        Ok((0..millis.len())
            .map(|i| {
                if millis.is_null(i) {
                    i64::MIN
                } else {
                    millis.value(i)
                }
            })
            .collect())
    }

    /// Scores the rows of `batch` in the order given and emits them with their verdicts.
    fn score_in_order(
        &mut self,
        batch: &RecordBatch,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        let rows = batch.num_rows();
        let values = cast(batch.column(self.plan.value), &DataType::Float64)?;
        let values = values
            .as_any()
            .downcast_ref::<Float64Array>()
            .ok_or_else(|| OperatorError::Internal("value cast to float64".to_owned()))?;
        let keys = match self.plan.key {
            Some(index) => Some(cast(batch.column(index), &DataType::Utf8)?),
            None => None,
        };
        let keys = keys
            .as_ref()
            .map(|k| k.as_any().downcast_ref::<StringArray>())
            .unwrap_or(None);
        let times = self.event_times(batch)?;
        let mut scores = Float64Builder::with_capacity(rows);
        let mut flags = BooleanBuilder::with_capacity(rows);
        for (row, &ts) in times.iter().enumerate() {
            if values.is_null(row) || values.value(row).is_nan() {
                scores.append_null();
                flags.append_value(false);
                continue;
            }
            let key = keys.and_then(|k| (!k.is_null(row)).then(|| k.value(row)));
            let detector = self.series_of(key);
            let before = detector.state_bytes() as i64;
            let verdict = detector.observe(ts, values.value(row));
            let grown = detector.state_bytes() as i64 - before;
            self.state_bytes += grown;
            scores.append_value(verdict.score);
            flags.append_value(verdict.is_anomaly);
        }
        self.state.keys.set(self.series.len() as i64);
        self.state.bytes.set(self.state_bytes.max(0));
        let flags = flags.finish();
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        columns.push(Arc::new(scores.finish()));
        columns.push(Arc::new(flags.clone()));
        let scored = RecordBatch::try_new(self.plan.output_schema.clone(), columns)?;
        out.emit(match self.plan.emit {
            Emit::All => scored,
            Emit::Anomalies => filter_record_batch(&scored, &flags)?,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests;
