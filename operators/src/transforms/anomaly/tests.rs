//! Tests of the `anomaly` transform: planning, event-time order per key, eviction.

use std::sync::Arc;

use arrow::array::{AsArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef, TimeUnit};
use weir_engine::metrics::{EngineMetrics, OperatorMetrics};
use weir_engine::registry::{InputStream, Role, StreamInfo};
use weir_engine::{Collector, OperatorInstance, Transform, Watermark};

use super::*;
use crate::format::test_support::{Decl, plan};

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device", DataType::Utf8, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("v", DataType::Float64, true),
    ]))
}

fn decl(event_time: bool) -> Decl<'static> {
    Decl {
        inputs: vec![InputStream {
            name: "up".into(),
            stream: StreamInfo {
                schema: schema(),
                event_time: event_time.then(|| "ts".to_owned()),
            },
        }],
        ..Decl::default()
    }
}

fn batch(rows: &[(&str, i64, f64)]) -> RecordBatch {
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from(
                rows.iter().map(|r| Some(r.0)).collect::<Vec<_>>(),
            )),
            Arc::new(TimestampMillisecondArray::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap()
}

fn transform(config: &str, event_time: bool, metrics: &OperatorMetrics) -> Box<dyn Transform> {
    let planned = plan(&AnomalyFactory, Role::Transform, config, decl(event_time))
        .unwrap_or_else(|e| panic!("{e:?}"));
    match planned.instantiate(metrics).unwrap() {
        OperatorInstance::Transform(t) => t,
        _ => panic!("not a transform"),
    }
}

/// (device, ts, is_anomaly) of every emitted row, whose scores are all within 0..=1.
fn flags(out: &mut Collector) -> Vec<(String, i64, bool)> {
    verdicts(out)
        .into_iter()
        .map(|(device, ts, score, flag)| {
            let score = score.map_or(0.0, f64::from_bits);
            assert!((0.0..=1.0).contains(&score), "{score}");
            (device, ts, flag)
        })
        .collect()
}

fn errors(config: &str) -> String {
    match plan(&AnomalyFactory, Role::Transform, config, decl(true)) {
        Ok(_) => panic!("config should be rejected: {config}"),
        Err(errors) => errors.iter().map(|e| format!("{e}\n")).collect(),
    }
}

#[test]
fn invalid_configs_report_every_problem() {
    let text =
        errors("value: nope\nkey: nada\nmax_keys: 0\ndetector: zscore\nzscore: {min_history: 1}\n");
    for needle in [
        "no column 'nope'",
        "no column 'nada'",
        "max_keys must be at least 1",
        "min_history must be at least 2",
    ] {
        assert!(text.contains(needle), "missing '{needle}' in:\n{text}");
    }
    assert!(errors("value: device").contains("must be numeric"));
    assert!(errors("key: device").contains("needs a value column"));
    assert!(errors("value: v\ndetector: magic").contains("unknown value 'magic'"));
    let mismatched = errors("value: v\ndetector: ewma\nmad: {window_rows: 10}\newma: {alpha: 2}");
    assert!(
        mismatched.contains("`mad` sets the mad detector, but the detector is ewma"),
        "{mismatched}"
    );
    assert!(
        mismatched.contains("ewma.alpha: alpha must be between 0 and 1"),
        "{mismatched}"
    );
}

#[test]
fn ensemble_members_and_value_columns_are_checked_where_they_are_written() {
    let text = errors(
        "value: v\nensemble:\n  members:\n    - {detector: forecast, forecast: {alpha: 2}}\n    - {onset_rows: 3}\n",
    );
    assert!(
        text.contains("ensemble.members.0.forecast.alpha: alpha must be in 0 < x < 1"),
        "{text}"
    );
    assert!(
        text.contains("ensemble.members.1: an ensemble member must name its detector"),
        "{text}"
    );
    assert!(errors("value: v\nensemble: {members: []}").contains("needs at least one member"));
    assert!(errors("value: v\nvalues: [v]").contains("give `value` or `values`, not both"));
    let univariate = errors("values: [v, v]\ndetector: forecast");
    assert!(
        univariate.contains("the forecast detector scores one value column, but `values` names 2"),
        "{univariate}"
    );
    let bad_member =
        errors("values: [v, v]\nensemble: {members: [{detector: iforest}, {detector: range}]}");
    assert!(
        bad_member.contains("ensemble.members.1.detector: the range detector scores one"),
        "{bad_member}"
    );
    assert!(errors("value: v\nlikelihood: {raw_weight: 2}").contains("likelihood.raw_weight"));
    // The default detector, and a multivariate forest, plan.
    for config in [
        "value: v",
        "values: [v, v]\ndetector: iforest\niforest: {shingle: 2}",
    ] {
        plan(&AnomalyFactory, Role::Transform, config, decl(true))
            .unwrap_or_else(|e| panic!("{config}: {e:?}"));
    }
}

#[tokio::test]
async fn rows_wait_for_the_watermark_and_are_scored_in_event_time_order_per_key() {
    let metrics = OperatorMetrics::detached("test", "node");
    let mut anomaly = transform("value: v\ndetector: zscore\nkey: device\n", true, &metrics);
    let mut out = Collector::new();
    // Arrival order differs from event-time order; the spike for `a` arrives first.
    anomaly
        .process_batch(0, batch(&[("a", 40, 90.0), ("b", 10, 5.0)]), &mut out)
        .await
        .unwrap();
    anomaly
        .process_batch(
            0,
            batch(&[
                ("a", 10, 1.0),
                ("a", 20, 2.0),
                ("a", 30, 1.0),
                ("b", 20, 5.0),
            ]),
            &mut out,
        )
        .await
        .unwrap();
    assert!(
        out.take_batches().is_empty(),
        "nothing before the watermark"
    );
    anomaly.on_watermark(Watermark(35), &mut out).await.unwrap();
    let first = flags(&mut out);
    assert_eq!(
        first,
        [
            // Equal times keep arrival order: b's row at 10 came first.
            ("b".into(), 10, false),
            ("a".into(), 10, false),
            ("a".into(), 20, false),
            ("b".into(), 20, false),
            ("a".into(), 30, false),
        ]
    );
    anomaly
        .on_watermark(Watermark::END, &mut out)
        .await
        .unwrap();
    // Scored after a's three earlier values, the spike at 40 is an anomaly.
    assert_eq!(flags(&mut out), [("a".into(), 40, true)]);
}

#[tokio::test]
async fn without_event_time_rows_are_scored_on_arrival_and_emit_can_filter() {
    let metrics = OperatorMetrics::detached("test", "node");
    let mut anomaly = transform(
        "value: v\ndetector: zscore\nemit: anomalies\n",
        false,
        &metrics,
    );
    let mut out = Collector::new();
    anomaly
        .process_batch(
            0,
            batch(&[("x", 0, 1.0), ("y", 0, 2.0), ("z", 0, 1.0), ("w", 0, 50.0)]),
            &mut out,
        )
        .await
        .unwrap();
    // One series (no key): only the 50 is an anomaly, and only it is emitted.
    assert_eq!(flags(&mut out), [("w".into(), 0, true)]);
}

#[tokio::test]
async fn the_least_recently_seen_series_is_evicted_and_counted() {
    let registry = prometheus::Registry::new();
    let metrics = EngineMetrics::new(&registry).unwrap().operator("p", "a");
    let mut anomaly = transform(
        "value: v\ndetector: zscore\nkey: device\nmax_keys: 2\n",
        false,
        &metrics,
    );
    let mut out = Collector::new();
    let rows = [("a", 0, 1.0), ("b", 0, 1.0), ("a", 1, 1.0), ("c", 0, 1.0)];
    anomaly
        .process_batch(0, batch(&rows), &mut out)
        .await
        .unwrap();
    let state = metrics.state();
    assert_eq!(state.evictions.get(), 1, "b was least recently seen");
    assert_eq!(state.keys.get(), 2);
    assert!(state.bytes.get() > 0);
    // `a` kept its history: after 1, 1 a value of 9 is an anomaly; `b` starts over.
    anomaly
        .process_batch(0, batch(&[("a", 2, 9.0), ("b", 1, 9.0)]), &mut out)
        .await
        .unwrap();
    let last: Vec<bool> = flags(&mut out).into_iter().skip(4).map(|r| r.2).collect();
    assert_eq!(last, [true, false]);
}

/// (device, ts, score bits, is_anomaly) of every emitted row: scores compared exactly.
fn verdicts(out: &mut Collector) -> Vec<(String, i64, Option<u64>, bool)> {
    let mut rows = Vec::new();
    for (_, b) in out.take_batches() {
        let device = b.column(0).as_string::<i32>();
        let ts = b
            .column(1)
            .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        let score = b
            .column_by_name(SCORE_COLUMN)
            .unwrap()
            .as_primitive::<Float64Type>();
        let flag = b.column_by_name(FLAG_COLUMN).unwrap().as_boolean();
        for i in 0..b.num_rows() {
            let score = score.is_valid(i).then(|| score.value(i).to_bits());
            rows.push((
                device.value(i).to_owned(),
                ts.value(i),
                score,
                flag.value(i),
            ));
        }
    }
    rows
}

/// Batches of a noisy series over five devices seen unevenly (so some series do not
/// change between snapshots and the eviction order matters), out of order within each
/// batch, with spikes; each with the watermark that follows it.
fn uneven_stream() -> Vec<(RecordBatch, Watermark)> {
    let devices = ["a", "b", "c", "d", "e"];
    let mut batches = Vec::new();
    for chunk in 0..40 {
        let mut rows = Vec::new();
        for i in 0..25 {
            let n = chunk * 25 + i;
            let device = devices[(n * n / 7 + chunk / 9) % devices.len()];
            // Out of order by up to 30 ms within the batch.
            let ts = 1_000 + n as i64 * 60_000 - ((n * 13) % 4) as i64 * 10;
            let spike = if n % 97 == 50 { 40.0 } else { 0.0 };
            let noise = weir_testkit::noise(n as u64, 7);
            rows.push((device, ts, 20.0 + noise * 2.0 + spike));
        }
        let watermark = Watermark(1_000 + (chunk as i64 * 25 + 20) * 60_000);
        batches.push((batch(&rows), watermark));
    }
    batches
}

async fn feed(
    anomaly: &mut dyn Transform,
    stream: &[(RecordBatch, Watermark)],
    out: &mut Collector,
) {
    for (batch, watermark) in stream {
        anomaly.process_batch(0, batch.clone(), out).await.unwrap();
        anomaly.on_watermark(*watermark, out).await.unwrap();
    }
}

#[tokio::test]
async fn every_detector_goes_on_from_a_checkpoint_as_if_never_stopped() {
    let stream = uneven_stream();
    let configs = [
        "detector: zscore\nzscore: {window_rows: 30}",
        "detector: zscore\nzscore: {window_duration: 20m}",
        "detector: zscore",
        "detector: ewma",
        "detector: mad\nmad: {window_rows: 40}",
        "detector: forecast\nforecast: {season: 1h}",
        "detector: range\nrange: {lag_rows: 3}",
        "values: [v, v]\ndetector: iforest\niforest: {shingle: 2, window_rows: 64, sample_size: 32, min_history: 32, retrain_rows: 20, trees: 10}",
        // The default ensemble, post-processed.
        "likelihood: {learning_rows: 20}\nonset_rows: 4",
    ];
    for config in configs {
        let value = if config.contains("values:") {
            ""
        } else {
            "value: v\n"
        };
        let config = format!("{value}key: device\nmax_keys: 4\n{config}\n");
        let metrics = OperatorMetrics::detached("test", "node");
        let mut out = Collector::new();
        let mut reference = transform(&config, true, &metrics);
        feed(reference.as_mut(), &stream, &mut out).await;
        reference
            .on_watermark(Watermark::END, &mut out)
            .await
            .unwrap();
        let expected = verdicts(&mut out);
        assert_eq!(expected.len(), 1000, "{config}");
        // The scores depend on what each series learnt, so a lost state would show.
        assert!(
            expected
                .iter()
                .any(|row| row.2.is_some_and(|bits| f64::from_bits(bits) > 0.1)),
            "{config}: the series should score"
        );

        // Snapshots after batches 5, 12 and 23, applied as the store applies them; the
        // run then stops, and a fresh instance goes on from the last one.
        let mut interrupted = transform(&config, true, &metrics);
        let mut state = NodeState::default();
        let mut emitted = Vec::new();
        for (index, (batch, watermark)) in stream[..24].iter().enumerate() {
            interrupted
                .process_batch(0, batch.clone(), &mut out)
                .await
                .unwrap();
            interrupted
                .on_watermark(*watermark, &mut out)
                .await
                .unwrap();
            if [5, 12, 23].contains(&index) {
                state.apply(&interrupted.snapshot().unwrap());
                emitted.extend(verdicts(&mut out));
            }
        }
        assert!(
            state.entries().any(|(key, _)| key == b"pending"),
            "{config}"
        );
        let mut resumed = transform(&config, true, &metrics);
        resumed.restore(&state).unwrap();
        feed(resumed.as_mut(), &stream[24..], &mut out).await;
        resumed
            .on_watermark(Watermark::END, &mut out)
            .await
            .unwrap();
        emitted.extend(verdicts(&mut out));
        assert_eq!(emitted, expected, "{config}");
    }
}

#[tokio::test]
async fn a_damaged_checkpoint_is_refused_and_the_transform_is_left_as_it_was() {
    let config = "value: v\nkey: device\ndetector: zscore\n";
    let metrics = OperatorMetrics::detached("test", "node");
    let stream = uneven_stream();
    let mut out = Collector::new();
    let mut source = transform(config, true, &metrics);
    feed(source.as_mut(), &stream[..10], &mut out).await;
    let mut state = NodeState::default();
    state.apply(&source.snapshot().unwrap());
    let damaged = |edit: &dyn Fn(&mut Vec<u8>)| {
        let entries = state
            .entries()
            .map(|(key, value)| {
                let mut value = value.to_vec();
                if key.starts_with(b"series/") {
                    edit(&mut value);
                }
                (key.to_vec(), value)
            })
            .collect();
        NodeState::from_entries(entries)
    };
    /// A change to a series' saved bytes, and the problem it must be refused with.
    type Damage<'a> = (&'a dyn Fn(&mut Vec<u8>), &'a str);
    let cases: [Damage<'_>; 3] = [
        (&|value| value.truncate(12), "do not decode"),
        (&|value| value[0] = 9, "saved in layout 9"),
        (&|value| value.push(0), "bytes more than its detector saves"),
    ];
    for (edit, problem) in cases {
        let mut fresh = transform(config, true, &metrics);
        let error = fresh.restore(&damaged(edit)).unwrap_err().to_string();
        assert!(error.contains(problem), "{error}");
        // Nothing was taken up: the transform scores as a fresh one does.
        let mut expected = transform(config, true, &metrics);
        let (mut a, mut b) = (Collector::new(), Collector::new());
        feed(fresh.as_mut(), &stream[10..], &mut a).await;
        feed(expected.as_mut(), &stream[10..], &mut b).await;
        assert_eq!(verdicts(&mut a), verdicts(&mut b));
    }
}
