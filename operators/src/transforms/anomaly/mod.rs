//! The `anomaly` transform: scores every row of one or more value columns against its
//! series' history and adds `anomaly_score` (0..1) and `is_anomaly` columns.
//!
//! Rows are grouped into series by an optional `key` column, each with its own detector
//! state; at most `max_keys` series are kept, the least recently seen is evicted first,
//! and evictions are counted. With an event-time column on the input, rows wait until the
//! watermark passes them and are then scored in event-time order, so the outcome does not
//! depend on how rows were cut into batches or interleaved across keys. Rows that arrive
//! behind the watermark are scored on arrival. Detectors are deterministic: the same rows
//! (and, for `iforest`, the same seed) give the same scores.
//!
//! Detectors, each in its own file with its parameters and defaults: `zscore` (distance
//! from the mean of earlier values), `ewma` (an exponentially weighted control chart),
//! `mad` (distance from the median in median absolute deviations), `forecast` (the
//! residual of a seasonal Holt-Winters forecast), `range` (a value outside the range seen
//! so far), `iforest` (an isolation forest over several columns and their recent
//! values) and `ensemble` (several of these, combined). Any detector's scores can be
//! post-processed (`post.rs`): `likelihood` turns them into a calibrated tail
//! probability and `onset_rows` keeps only the start of an anomalous stretch.

mod ensemble;
mod ewma;
mod forecast;
mod iforest;
mod mad;
mod post;
mod range;
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
use weir_engine::checkpoint::{NodeState, StateChanges, decode_batches, encode_batches};
use weir_engine::config::ConfigErrors;
use weir_engine::metrics::{OperatorMetrics, StateMetrics};
use weir_engine::registry::{
    MAIN_PORT_NAME, NodeContext, OperatorFactory, OutputSpec, Partitionable, PlannedOperator, Role,
    StreamInfo,
};
use weir_engine::time::event_times_ms;
use weir_engine::{Collector, OperatorError, OperatorInstance, Transform, Watermark};

pub use ensemble::{Combine, EnsembleConfig};
pub use ewma::EwmaConfig;
pub use forecast::ForecastConfig;
pub use iforest::IforestConfig;
pub use mad::MadConfig;
pub use post::LikelihoodConfig;
pub use range::RangeConfig;
pub use zscore::ZscoreConfig;

/// The column holding each row's score, from 0 (normal) towards 1.
pub const SCORE_COLUMN: &str = "anomaly_score";
/// The column saying whether the row is an anomaly.
pub const FLAG_COLUMN: &str = "is_anomaly";

/// What one keyed series costs besides its key text and detector: the map's entry and
/// list links (an estimate for `weir_operator_state_bytes`).
const SERIES_OVERHEAD_BYTES: usize = 64;

/// Builds `anomaly` transforms.
pub struct AnomalyFactory;

/// The `config` of an `anomaly` transform, besides its detector ([`DetectorConfig`]),
/// whose fields are written in the same map.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnomalyConfig {
    /// The numeric column to score.
    pub value: Option<String>,
    /// Several numeric columns scored together, for a multivariate detector (`iforest`).
    pub values: Option<Vec<String>>,
    /// The column whose values name the series (e.g. `device`); one series without it.
    pub key: Option<String>,
    /// The timestamp column detectors read times from (seasons, time windows); the
    /// input's event-time column by default. Naming one does not change the order rows
    /// are scored in: that is event-time order only when the input has event time.
    pub time: Option<String>,
    /// `all` rows, scored, or only the `anomalies`.
    pub emit: Emit,
    /// The most series kept; beyond it the least recently seen is forgotten.
    pub max_keys: usize,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            value: None,
            values: None,
            key: None,
            time: None,
            emit: Emit::All,
            max_keys: 100_000,
        }
    }
}

/// A detector and its parameters: the rest of the transform's `config`, or one member of
/// an `ensemble`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorConfig {
    /// Which detector scores the rows.
    pub detector: DetectorKind,
    /// Parameters of the `zscore` detector.
    pub zscore: Option<ZscoreConfig>,
    /// Parameters of the `ewma` detector.
    pub ewma: Option<EwmaConfig>,
    /// Parameters of the `mad` detector.
    pub mad: Option<MadConfig>,
    /// Parameters of the `forecast` detector.
    pub forecast: Option<ForecastConfig>,
    /// Parameters of the `range` detector.
    pub range: Option<RangeConfig>,
    /// Parameters of the `iforest` detector.
    pub iforest: Option<IforestConfig>,
    /// The members of an `ensemble` and how their scores combine.
    pub ensemble: Option<EnsembleConfig>,
    /// Replace the detector's scores by their anomaly likelihood (see `post.rs`).
    pub likelihood: Option<LikelihoodConfig>,
    /// Keep a score only when it beats every score of the previous this many rows, so a
    /// long anomalous stretch reports its start and not every row (0: keep all).
    pub onset_rows: usize,
}

/// The detectors there are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorKind {
    /// Distance from the mean of earlier values, in standard deviations.
    Zscore,
    /// An exponentially weighted control chart.
    Ewma,
    /// Distance from the median, in median absolute deviations.
    Mad,
    /// The residual of a seasonal (Holt-Winters) forecast.
    Forecast,
    /// A value outside the range of the earlier ones.
    Range,
    /// An isolation forest over the value columns and their recent values.
    Iforest,
    /// Several detectors, combined; with its default members, the default detector.
    #[default]
    Ensemble,
}

impl DetectorKind {
    const ALL: [DetectorKind; 7] = [
        DetectorKind::Zscore,
        DetectorKind::Ewma,
        DetectorKind::Mad,
        DetectorKind::Forecast,
        DetectorKind::Range,
        DetectorKind::Iforest,
        DetectorKind::Ensemble,
    ];

    fn name(self) -> &'static str {
        match self {
            DetectorKind::Zscore => "zscore",
            DetectorKind::Ewma => "ewma",
            DetectorKind::Mad => "mad",
            DetectorKind::Forecast => "forecast",
            DetectorKind::Range => "range",
            DetectorKind::Iforest => "iforest",
            DetectorKind::Ensemble => "ensemble",
        }
    }

    /// Whether the detector scores several value columns at once.
    fn multivariate(self) -> bool {
        matches!(self, DetectorKind::Iforest | DetectorKind::Ensemble)
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

/// What a detector says about one row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    /// 0 (normal) to 1 (as abnormal as it gets).
    pub score: f64,
    /// Whether the row is an anomaly.
    pub is_anomaly: bool,
}

impl Verdict {
    /// Nothing unusual (or too little history to tell).
    pub const NORMAL: Verdict = Verdict {
        score: 0.0,
        is_anomaly: false,
    };
}

/// One series' detector: scores each row against what came before, then learns it.
pub trait Detector: Send {
    /// Scores the row with `values` (one per value column, none of them NaN), seen at
    /// event time `ts` (ms), and adds it to the history.
    fn observe(&mut self, ts: i64, values: &[f64]) -> Verdict;

    /// The memory this series' state holds, in bytes (an estimate).
    fn state_bytes(&self) -> usize;

    /// Appends what the series has learnt to `out`, for a checkpoint. Its parameters are
    /// not saved: they come from the config, and a checkpoint is only restored under the
    /// config it was taken with (the engine compares the node's fingerprint).
    fn save(&self, out: &mut Vec<u8>) -> Result<(), StateError>;

    /// Takes up what [`Detector::save`] wrote at the front of `bytes` and returns the
    /// bytes after it. On error the detector is half-loaded and must be dropped.
    fn load<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], StateError>;
}

/// Why a series' checkpointed state could not be saved or taken up.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The bytes are not what a detector writes.
    #[error("its bytes do not decode ({0})")]
    Encoding(#[from] postcard::Error),
    /// The bytes decode but cannot have come from a detector of this config.
    #[error("it does not fit the detector's config: {0}")]
    Mismatch(&'static str),
}

/// Appends `state` to `out` in the checkpoint encoding (postcard: compact, and floats
/// are saved bit for bit).
fn save_state<T: serde::Serialize + ?Sized>(
    state: &T,
    out: &mut Vec<u8>,
) -> Result<(), StateError> {
    *out = postcard::to_extend(state, std::mem::take(out))?;
    Ok(())
}

/// Reads a `T` that [`save_state`] wrote at the front of `bytes`, and the bytes after it.
fn load_state<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, &'a [u8]), StateError> {
    Ok(postcard::take_from_bytes(bytes)?)
}

/// `Ok` when `holds`, else the mismatch `problem`.
fn check(holds: bool, problem: &'static str) -> Result<(), StateError> {
    if holds {
        Ok(())
    } else {
        Err(StateError::Mismatch(problem))
    }
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

/// The problem with a `threshold` in spreads (standard deviations, MADs), unless it is a
/// positive number.
pub fn spread_threshold_problem(threshold: f64) -> Option<(&'static str, String)> {
    (!(threshold.is_finite() && threshold > 0.0)).then(|| {
        (
            "threshold",
            format!("threshold must be a positive number, not {threshold}"),
        )
    })
}

/// The problem with a `threshold` on scores, unless it is in (0, 1].
pub fn score_threshold_problem(threshold: f64) -> Option<(&'static str, String)> {
    (!(threshold > 0.0 && threshold <= 1.0)).then(|| {
        (
            "threshold",
            format!("threshold is a score above 0 and at most 1, not {threshold}"),
        )
    })
}

/// The validated choice of detector, able to start a series.
#[derive(Clone, Debug)]
struct DetectorSpec {
    base: BaseSpec,
    likelihood: Option<LikelihoodConfig>,
    onset_rows: usize,
}

/// A detector before post-processing.
#[derive(Clone, Debug)]
enum BaseSpec {
    Zscore(ZscoreConfig),
    Ewma(EwmaConfig),
    Mad(MadConfig),
    Forecast(ForecastConfig),
    Range(RangeConfig),
    Iforest(IforestConfig),
    Ensemble(Combine, Vec<DetectorSpec>),
}

impl DetectorSpec {
    fn new_series(&self, columns: usize) -> Box<dyn Detector> {
        let base: Box<dyn Detector> = match &self.base {
            BaseSpec::Zscore(config) => Box::new(zscore::Zscore::new(config)),
            BaseSpec::Ewma(config) => Box::new(ewma::Ewma::new(config)),
            BaseSpec::Mad(config) => Box::new(mad::Mad::new(config)),
            BaseSpec::Forecast(config) => Box::new(forecast::Forecast::new(config)),
            BaseSpec::Range(config) => Box::new(range::Range::new(config)),
            BaseSpec::Iforest(config) => Box::new(iforest::Iforest::new(config, columns)),
            BaseSpec::Ensemble(combine, members) => Box::new(ensemble::Ensemble::new(
                *combine,
                members.iter().map(|m| m.new_series(columns)).collect(),
            )),
        };
        let base = match &self.likelihood {
            Some(config) => Box::new(post::Likelihood::new(config, base)),
            None => base,
        };
        match self.onset_rows {
            0 => base,
            rows => Box::new(post::Onset::new(rows, base)),
        }
    }

    /// Checks `config` (found at `path` under the node's config) for `columns` value
    /// columns, pushing every problem to `errors`.
    fn validate(
        config: &DetectorConfig,
        path: &[String],
        columns: usize,
        node: &NodeContext<'_>,
        errors: &mut ConfigErrors,
    ) -> DetectorSpec {
        let at = |field: &[&str]| -> Vec<String> {
            path.iter()
                .cloned()
                .chain(field.iter().map(|f| (*f).to_owned()))
                .collect()
        };
        // Problems of this detector; a member's own go straight to `errors`.
        let mut problems: Vec<(Vec<String>, String, Option<String>)> = Vec::new();
        let mut report = |keys: Vec<String>, problem: String, hint: Option<String>| {
            problems.push((keys, problem, hint));
        };
        let chosen = config.detector;
        let given = [
            config.zscore.is_some(),
            config.ewma.is_some(),
            config.mad.is_some(),
            config.forecast.is_some(),
            config.range.is_some(),
            config.iforest.is_some(),
            config.ensemble.is_some(),
        ];
        for (kind, given) in DetectorKind::ALL.into_iter().zip(given) {
            if given && kind != chosen {
                report(
                    at(&[kind.name()]),
                    format!(
                        "`{}` sets the {} detector, but the detector is {}",
                        kind.name(),
                        kind.name(),
                        chosen.name()
                    ),
                    Some(format!(
                        "set `detector: {}`, or remove `{}`",
                        kind.name(),
                        kind.name()
                    )),
                );
            }
        }
        if columns > 1 && !chosen.multivariate() {
            report(
                at(&["detector"]),
                format!(
                    "the {} detector scores one value column, but `values` names {columns}",
                    chosen.name()
                ),
                Some("use `detector: iforest` for several columns, or one `value`".to_owned()),
            );
        }
        let mut check = |problems: Vec<(&'static str, String)>| {
            for (field, problem) in problems {
                report(at(&[chosen.name(), field]), problem, None);
            }
        };
        let base = match chosen {
            DetectorKind::Zscore => {
                let zscore = config.zscore.clone().unwrap_or_default();
                check(zscore.problems());
                BaseSpec::Zscore(zscore)
            }
            DetectorKind::Ewma => {
                let ewma = config.ewma.clone().unwrap_or_default();
                check(ewma.problems());
                BaseSpec::Ewma(ewma)
            }
            DetectorKind::Mad => {
                let mad = config.mad.clone().unwrap_or_default();
                check(mad.problems());
                BaseSpec::Mad(mad)
            }
            DetectorKind::Forecast => {
                let forecast = config.forecast.clone().unwrap_or_default();
                check(forecast.problems());
                BaseSpec::Forecast(forecast)
            }
            DetectorKind::Range => {
                let range = config.range.clone().unwrap_or_default();
                check(range.problems());
                BaseSpec::Range(range)
            }
            DetectorKind::Iforest => {
                let iforest = config.iforest.clone().unwrap_or_default();
                check(iforest.problems());
                BaseSpec::Iforest(iforest)
            }
            DetectorKind::Ensemble => {
                let ensemble = config.ensemble.clone().unwrap_or_default();
                if ensemble.members.is_empty() {
                    report(
                        at(&["ensemble", "members"]),
                        "an ensemble needs at least one member".to_owned(),
                        Some(
                            "e.g. `members: [{detector: forecast}, {detector: range}]`".to_owned(),
                        ),
                    );
                }
                let mut members = Vec::new();
                for (i, member) in ensemble.members.iter().enumerate() {
                    let member_path = at(&["ensemble", "members", &i.to_string()]);
                    if member.detector == DetectorKind::Ensemble {
                        report(
                            member_path,
                            "an ensemble member must name its detector: zscore, ewma, mad, \
                             forecast, range or iforest (ensembles do not nest)"
                                .to_owned(),
                            Some("e.g. `- {detector: forecast}`".to_owned()),
                        );
                    } else {
                        members.push((member, member_path));
                    }
                }
                let members = members
                    .into_iter()
                    .map(|(member, path)| {
                        DetectorSpec::validate(member, &path, columns, node, errors)
                    })
                    .collect();
                BaseSpec::Ensemble(ensemble.combine, members)
            }
        };
        if let Some(likelihood) = &config.likelihood {
            for (field, problem) in likelihood.problems() {
                report(at(&["likelihood", field]), problem, None);
            }
        }
        for (keys, problem, hint) in problems {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let error = node.field_error(&keys, problem);
            errors.push(match hint {
                Some(hint) => error.with_hint(hint),
                None => error,
            });
        }
        DetectorSpec {
            base,
            likelihood: config.likelihood.clone(),
            onset_rows: config.onset_rows,
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
        let (config, detector_config): (AnomalyConfig, DetectorConfig) = node.config_split()?;
        let mut errors = ConfigErrors::new();
        let value_names: Vec<String> = match (&config.value, &config.values) {
            (Some(value), None) => vec![value.clone()],
            (None, Some(values)) => values.clone(),
            (Some(_), Some(_)) => {
                errors.push(
                    node.field_error(&["values"], "give `value` or `values`, not both")
                        .with_hint("`value` names one column, `values` a list of them"),
                );
                Vec::new()
            }
            (None, None) => Vec::new(),
        };
        if value_names.is_empty() {
            errors.push(
                node.field_error(&["value"], "the anomaly transform needs a value column")
                    .with_hint("add e.g. `value: temperature` under config"),
            );
        }
        let detector = DetectorSpec::validate(
            &detector_config,
            &[],
            value_names.len().max(1),
            node,
            &mut errors,
        );
        if config.max_keys == 0 {
            errors.push(node.field_error(&["max_keys"], "max_keys must be at least 1"));
        }
        let [input] = node.inputs else {
            errors.push(node.error(format!(
                "the anomaly transform reads one stream but has {} inputs",
                node.inputs.len()
            )));
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
        let value_field = if config.values.is_some() {
            "values"
        } else {
            "value"
        };
        let mut values = Vec::new();
        for name in &value_names {
            match schema.index_of(name) {
                Ok(index) if schema.field(index).data_type().is_numeric() => values.push(index),
                Ok(index) => errors.push(node.field_error(
                    &[value_field],
                    format!(
                        "column '{name}' is {}: a value column must be numeric",
                        schema.field(index).data_type()
                    ),
                )),
                Err(_) => errors.push(
                    node.field_error(&[value_field], format!("the input has no column '{name}'"))
                        .with_hint(format!("its columns: {}", names())),
                ),
            }
        }
        let key = match &config.key {
            None => None,
            Some(name) => match schema.index_of(name) {
                Ok(index) if can_cast_types(schema.field(index).data_type(), &DataType::Utf8) => {
                    Some(index)
                }
                Ok(index) => {
                    errors.push(node.field_error(
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
                        node.field_error(&["key"], format!("the input has no column '{name}'"))
                            .with_hint(format!("its columns: {}", names())),
                    );
                    None
                }
            },
        };
        for taken in [SCORE_COLUMN, FLAG_COLUMN] {
            if schema.index_of(taken).is_ok() {
                errors.push(node.error(format!(
                    "the input already has a column '{taken}', which the anomaly \
                         transform adds: rename it upstream"
                )));
            }
        }
        let event_time = input
            .stream
            .event_time
            .as_ref()
            .and_then(|column| schema.index_of(column).ok());
        let time = match &config.time {
            None => event_time,
            Some(name) => match schema.index_of(name) {
                Ok(index) if matches!(schema.field(index).data_type(), DataType::Timestamp(..)) => {
                    Some(index)
                }
                Ok(index) => {
                    errors.push(node.field_error(
                        &["time"],
                        format!(
                            "column '{name}' is {}: the time column must be a timestamp",
                            schema.field(index).data_type()
                        ),
                    ));
                    None
                }
                Err(_) => {
                    errors.push(
                        node.field_error(&["time"], format!("the input has no column '{name}'"))
                            .with_hint(format!("its columns: {}", names())),
                    );
                    None
                }
            },
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(SCORE_COLUMN, DataType::Float64, true)));
        fields.push(Arc::new(Field::new(FLAG_COLUMN, DataType::Boolean, false)));
        Ok(Box::new(Plan {
            input_schema: schema.clone(),
            output_schema: Arc::new(Schema::new(fields)),
            event_time_name: input.stream.event_time.clone(),
            event_time,
            time,
            values,
            key,
            detector,
            emit: config.emit,
            max_keys: NonZeroUsize::new(config.max_keys).unwrap_or(NonZeroUsize::MIN),
        }))
    }
}

/// An `anomaly` transform whose config is valid.
struct Plan {
    input_schema: SchemaRef,
    output_schema: SchemaRef,
    event_time_name: Option<String>,
    /// Index of the input's event-time column, when it has one: it orders the rows.
    event_time: Option<usize>,
    /// Index of the column detectors read times from.
    time: Option<usize>,
    /// Indexes of the value columns, in the order the detector sees them.
    values: Vec<usize>,
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

    fn partitionable(&self) -> Partitionable {
        match self.key {
            // Each series is scored on its own; null keys all hash alike, so the rows
            // without a key stay one series too.
            Some(key) => {
                Partitionable::GroupedBy(vec![self.input_schema.field(key).name().clone()])
            }
            None => Partitionable::No(
                "it scores all of its rows as one series; name the series column in `key`".into(),
            ),
        }
    }

    fn instantiate(
        self: Box<Self>,
        metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        Ok(OperatorInstance::Transform(Box::new(Anomaly {
            series: LruCache::with_hasher(self.max_keys, foldhash::fast::RandomState::default()),
            unkeyed: None,
            pending: Vec::new(),
            watermark: Watermark::START,
            state: metrics.state(),
            state_bytes: 0,
            changes: Changes::default(),
            plan: *self,
        })))
    }
}

/// The running transform.
struct Anomaly {
    plan: Plan,
    /// Each keyed series, least recently seen first out.
    series: LruCache<String, Series, foldhash::fast::RandomState>,
    /// The series of rows without a key (no key column, or a null key).
    unkeyed: Option<Series>,
    /// Rows waiting for the watermark to pass them.
    pending: Vec<RecordBatch>,
    watermark: Watermark,
    state: StateMetrics,
    /// The state memory last reported.
    state_bytes: i64,
    /// What changed since the last checkpoint snapshot.
    changes: Changes,
}

/// One series' detector, and whether it learnt anything since the last snapshot.
struct Series {
    detector: Box<dyn Detector>,
    changed: bool,
}

impl Series {
    fn new(detector: Box<dyn Detector>) -> Self {
        Series {
            detector,
            changed: true,
        }
    }
}

/// What the next snapshot writes besides the series marked changed.
#[derive(Default)]
struct Changes {
    /// Series evicted since: their saved state is deleted.
    evicted: Vec<String>,
    /// Whether the rows waiting for the watermark changed.
    pending: bool,
    /// The watermark the store has.
    stored_watermark: Option<Watermark>,
    /// The recency rank the next saved series gets: ranks rise with each series saved,
    /// least recently seen first, so a restore rebuilds the eviction order.
    next_rank: u64,
}

/// The layout of a series' saved state; a checkpoint of another layout is not restored.
const STATE_VERSION: u8 = 1;
/// Keys of the transform's checkpointed state: one part per keyed series (its key's
/// bytes after the prefix), the series without a key, the rows waiting for the
/// watermark, and the watermark.
const SERIES_PREFIX: &[u8] = b"series/";
const UNKEYED_KEY: &[u8] = b"unkeyed";
const PENDING_KEY: &[u8] = b"pending";
const WATERMARK_KEY: &[u8] = b"watermark";

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
        self.changes.pending = true;
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
        self.changes.pending = true;
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

    /// The series that learnt since the last snapshot, the series evicted, the rows
    /// waiting for the watermark when they changed, and the watermark.
    fn snapshot(&mut self) -> Result<StateChanges, OperatorError> {
        let mut snapshot = StateChanges::unchanged();
        for key in self.changes.evicted.drain(..) {
            snapshot.delete(series_key(&key));
        }
        // Least recently seen first: every changed series was seen after every
        // unchanged one, so fresh ranks above the stored ones keep the order.
        for (key, series) in self.series.iter_mut().rev() {
            if series.changed {
                let mut value = vec![STATE_VERSION];
                value.extend_from_slice(&self.changes.next_rank.to_be_bytes());
                series.detector.save(&mut value).map_err(state_error)?;
                snapshot.put(series_key(key), value);
                self.changes.next_rank += 1;
                series.changed = false;
            }
        }
        if let Some(series) = self.unkeyed.as_mut().filter(|series| series.changed) {
            let mut value = vec![STATE_VERSION];
            series.detector.save(&mut value).map_err(state_error)?;
            snapshot.put(UNKEYED_KEY.to_vec(), value);
            series.changed = false;
        }
        if std::mem::take(&mut self.changes.pending) {
            if self.pending.is_empty() {
                snapshot.delete(PENDING_KEY.to_vec());
            } else {
                let rows = encode_batches(&self.plan.input_schema, &self.pending)?;
                snapshot.put(PENDING_KEY.to_vec(), rows);
            }
        }
        // The end of the stream is not time a resumed run has reached.
        if self.watermark != Watermark::END && self.changes.stored_watermark != Some(self.watermark)
        {
            let millis = self.watermark.millis().to_be_bytes().to_vec();
            snapshot.put(WATERMARK_KEY.to_vec(), millis);
            self.changes.stored_watermark = Some(self.watermark);
        }
        Ok(snapshot)
    }

    /// Takes up the series, waiting rows and watermark of `state`, all or nothing.
    fn restore(&mut self, state: &NodeState) -> Result<(), OperatorError> {
        let restored = self.restored(state).map_err(|reason| {
            OperatorError::User(format!(
                "anomaly transform: the checkpointed state cannot be used: {reason}"
            ))
        })?;
        let Restored {
            mut keyed,
            unkeyed,
            pending,
            watermark,
        } = restored;
        keyed.sort_by_key(|(rank, ..)| *rank);
        self.changes = Changes {
            next_rank: keyed.last().map_or(0, |(rank, ..)| rank + 1),
            stored_watermark: watermark,
            ..Changes::default()
        };
        self.series.clear();
        self.state_bytes = 0;
        for (_, key, detector) in keyed {
            self.state_bytes += (key.len() + SERIES_OVERHEAD_BYTES + detector.state_bytes()) as i64;
            let series = Series {
                detector,
                changed: false,
            };
            if let Some((evicted_key, evicted)) = self.series.push(key, series) {
                self.state_bytes -= (evicted_key.len()
                    + SERIES_OVERHEAD_BYTES
                    + evicted.detector.state_bytes()) as i64;
                self.changes.evicted.push(evicted_key);
            }
        }
        self.unkeyed = unkeyed.map(|detector| Series {
            detector,
            changed: false,
        });
        self.pending = pending;
        self.watermark = watermark.unwrap_or(Watermark::START);
        self.state
            .hold(self.series.len() as i64, self.state_bytes.max(0));
        Ok(())
    }
}

/// The state a checkpoint holds, decoded and checked before any of it is taken up.
struct Restored {
    /// (recency rank, key, detector) of each keyed series.
    keyed: Vec<(u64, String, Box<dyn Detector>)>,
    unkeyed: Option<Box<dyn Detector>>,
    pending: Vec<RecordBatch>,
    watermark: Option<Watermark>,
}

fn series_key(key: &str) -> Vec<u8> {
    [SERIES_PREFIX, key.as_bytes()].concat()
}

fn state_error(error: StateError) -> OperatorError {
    OperatorError::Internal(format!("an anomaly series' state does not save: {error}"))
}

impl Anomaly {
    /// The series named `key` (`None`: no key column, or a null key), starting it, and
    /// evicting the least recently seen one, when needed.
    fn series_of(&mut self, key: Option<&str>) -> &mut Series {
        let Some(key) = key else {
            let (detector, columns) = (&self.plan.detector, self.plan.values.len());
            return self
                .unkeyed
                .get_or_insert_with(|| Series::new(detector.new_series(columns)));
        };
        if !self.series.contains(key) {
            let fresh = self.plan.detector.new_series(self.plan.values.len());
            self.state_bytes += (key.len() + SERIES_OVERHEAD_BYTES + fresh.state_bytes()) as i64;
            if let Some((evicted_key, evicted)) =
                self.series.push(key.to_owned(), Series::new(fresh))
            {
                self.state.evictions.inc();
                self.state_bytes -= (evicted_key.len()
                    + SERIES_OVERHEAD_BYTES
                    + evicted.detector.state_bytes()) as i64;
                self.changes.evicted.push(evicted_key);
            }
        }
        self.series
            .get_mut(key)
            .expect("the series was just looked up or inserted")
    }

    /// Decodes and checks `state`, a snapshot [`Transform::snapshot`] wrote.
    fn restored(&self, state: &NodeState) -> Result<Restored, String> {
        let columns = self.plan.values.len();
        let mut restored = Restored {
            keyed: Vec::new(),
            unkeyed: None,
            pending: Vec::new(),
            watermark: None,
        };
        let load = |what: &str, value: &[u8]| -> Result<Box<dyn Detector>, String> {
            let mut detector = self.plan.detector.new_series(columns);
            let rest = detector
                .load(value)
                .map_err(|error| format!("the state of {what}: {error}"))?;
            if !rest.is_empty() {
                return Err(format!(
                    "the state of {what} has {} bytes more than its detector saves",
                    rest.len()
                ));
            }
            Ok(detector)
        };
        let versioned = |what: &str, value: &'_ [u8]| -> Result<Vec<u8>, String> {
            match value.split_first() {
                Some((&STATE_VERSION, rest)) => Ok(rest.to_vec()),
                Some((version, _)) => Err(format!(
                    "{what} was saved in layout {version}, and this version of Weir reads {STATE_VERSION}"
                )),
                None => Err(format!("{what} has no saved state")),
            }
        };
        for (key, value) in state.entries() {
            if let Some(name) = key.strip_prefix(SERIES_PREFIX) {
                let name = String::from_utf8(name.to_vec())
                    .map_err(|_| "a series key is not UTF-8".to_owned())?;
                let what = format!("series '{name}'");
                let value = versioned(&what, value)?;
                let (rank, value) = value
                    .split_first_chunk::<8>()
                    .ok_or_else(|| format!("{what} has no recency rank"))?;
                let detector = load(&what, value)?;
                restored
                    .keyed
                    .push((u64::from_be_bytes(*rank), name, detector));
            } else if key == UNKEYED_KEY {
                let what = "the series without a key";
                restored.unkeyed = Some(load(what, &versioned(what, value)?)?);
            } else if key == PENDING_KEY {
                let (_, batches) = decode_batches(value)
                    .map_err(|error| format!("the rows waiting for the watermark: {error}"))?;
                for batch in batches {
                    let batch = RecordBatch::try_new(
                        self.plan.input_schema.clone(),
                        batch.columns().to_vec(),
                    )
                    .map_err(|error| {
                        format!("the rows waiting for the watermark do not fit the input: {error}")
                    })?;
                    restored.pending.push(batch);
                }
            } else if key == WATERMARK_KEY {
                let millis = value
                    .try_into()
                    .map_err(|_| format!("its watermark is {} bytes, not 8", value.len()))?;
                restored.watermark = Some(Watermark(i64::from_be_bytes(millis)));
            } else {
                return Err(format!(
                    "it has an entry this transform does not know ({key:?})"
                ));
            }
        }
        Ok(restored)
    }

    /// Each row's event time in ms; rows without one sort first.
    fn event_times(&self, batch: &RecordBatch) -> Result<Vec<i64>, OperatorError> {
        Self::times_ms(batch, self.plan.event_time)
    }

    /// Each row's time in the column at `index` in ms (0 without a column; rows without
    /// a time get the earliest there is).
    fn times_ms(batch: &RecordBatch, index: Option<usize>) -> Result<Vec<i64>, OperatorError> {
        let Some(index) = index else {
            return Ok(vec![0; batch.num_rows()]);
        };
        let column = batch.column(index);
        let millis = event_times_ms(column).ok_or_else(|| {
            OperatorError::Internal("the time column is not a timestamp".to_owned())
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
        let columns = self
            .plan
            .values
            .iter()
            .map(|&index| cast(batch.column(index), &DataType::Float64))
            .collect::<Result<Vec<_>, _>>()?;
        let columns = columns
            .iter()
            .map(|c| {
                c.as_any()
                    .downcast_ref::<Float64Array>()
                    .ok_or_else(|| OperatorError::Internal("value cast to float64".to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut row_values = vec![0.0; columns.len()];
        let keys = match self.plan.key {
            Some(index) => Some(cast(batch.column(index), &DataType::Utf8)?),
            None => None,
        };
        let keys = keys
            .as_ref()
            .map(|k| k.as_any().downcast_ref::<StringArray>())
            .unwrap_or(None);
        let times = Self::times_ms(batch, self.plan.time)?;
        let mut scores = Float64Builder::with_capacity(rows);
        let mut flags = BooleanBuilder::with_capacity(rows);
        for (row, &ts) in times.iter().enumerate() {
            let mut complete = true;
            for (slot, column) in row_values.iter_mut().zip(&columns) {
                *slot = column.value(row);
                complete &= column.is_valid(row) && !slot.is_nan();
            }
            if !complete {
                scores.append_null();
                flags.append_value(false);
                continue;
            }
            let key = keys.and_then(|k| (!k.is_null(row)).then(|| k.value(row)));
            let series = self.series_of(key);
            series.changed = true;
            let before = series.detector.state_bytes() as i64;
            let verdict = series.detector.observe(ts, &row_values);
            let grown = series.detector.state_bytes() as i64 - before;
            self.state_bytes += grown;
            scores.append_value(verdict.score);
            flags.append_value(verdict.is_anomaly);
        }
        self.state
            .hold(self.series.len() as i64, self.state_bytes.max(0));
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
