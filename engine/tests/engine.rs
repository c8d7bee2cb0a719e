//! Behaviour of the dataflow runtime with small test operators: fan-out without copies,
//! fan-in with the minimum watermark, end of stream as the final watermark, bounded
//! channels, failures naming pipeline and operator, and shutdown that drains.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use weir_engine::arrow::array::{ArrayRef, Int64Array, TimestampMillisecondArray};
use weir_engine::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use weir_engine::arrow::record_batch::RecordBatch;
use weir_engine::graph::{InputRef, PipelineBuilder};
use weir_engine::metrics::EngineMetrics;
use weir_engine::registry::{MAIN_PORT_NAME, OutputSpec, StreamInfo};
use weir_engine::time::EventTimeSpec;
use weir_engine::{
    Collector, OperatorError, OperatorInstance, PipelineError, Sink, Source, SourceContext,
    Transform, Watermark,
};

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("v", DataType::Int64, false),
    ]))
}

fn batch(times: &[i64]) -> RecordBatch {
    let ts: ArrayRef = Arc::new(TimestampMillisecondArray::from(times.to_vec()));
    let v: ArrayRef = Arc::new(Int64Array::from(times.to_vec()));
    RecordBatch::try_new(schema(), vec![ts, v]).expect("valid batch")
}

fn main_port() -> Vec<OutputSpec> {
    vec![OutputSpec {
        name: MAIN_PORT_NAME.into(),
        stream: StreamInfo {
            schema: schema(),
            event_time: Some("ts".into()),
        },
        unwired_drop_reason: None,
    }]
}

fn input(node: &str) -> InputRef {
    InputRef {
        node: node.into(),
        port: MAIN_PORT_NAME.into(),
    }
}

fn event_time() -> Option<EventTimeSpec> {
    Some(EventTimeSpec {
        column: "ts".into(),
        max_out_of_order: Duration::ZERO,
        ..EventTimeSpec::default()
    })
}

/// Emits the given batches, then ends; or runs until cancelled when `endless`.
struct ListSource {
    batches: Vec<RecordBatch>,
    endless: bool,
    emitted: Arc<AtomicUsize>,
}

#[async_trait]
impl Source for ListSource {
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError> {
        loop {
            for batch in &self.batches {
                if ctx.is_cancelled() {
                    return Ok(());
                }
                ctx.emit(batch.clone()).await?;
                self.emitted.fetch_add(1, Ordering::SeqCst);
            }
            if !self.endless {
                return Ok(());
            }
            tokio::task::yield_now().await;
        }
    }
}

fn source(batches: Vec<RecordBatch>) -> (OperatorInstance, Arc<AtomicUsize>) {
    let emitted = Arc::new(AtomicUsize::new(0));
    let instance = OperatorInstance::Source(Box::new(ListSource {
        batches,
        endless: false,
        emitted: emitted.clone(),
    }));
    (instance, emitted)
}

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Batch(usize, RecordBatch),
    Watermark(Watermark),
    Closed,
}

/// Records everything it receives; optionally waits before each write.
struct RecordingSink {
    seen: Arc<Mutex<Vec<Seen>>>,
    delay: Duration,
}

#[async_trait]
impl Sink for RecordingSink {
    async fn write(&mut self, input: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.seen.lock().unwrap().push(Seen::Batch(input, batch));
        Ok(())
    }

    async fn on_watermark(&mut self, watermark: Watermark) -> Result<(), OperatorError> {
        self.seen.lock().unwrap().push(Seen::Watermark(watermark));
        Ok(())
    }

    async fn close(&mut self) -> Result<(), OperatorError> {
        self.seen.lock().unwrap().push(Seen::Closed);
        Ok(())
    }
}

fn sink(delay: Duration) -> (OperatorInstance, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let instance = OperatorInstance::Sink(Box::new(RecordingSink {
        seen: seen.clone(),
        delay,
    }));
    (instance, seen)
}

/// Passes batches through and records the watermarks it is given.
struct PassThrough {
    watermarks: Arc<Mutex<Vec<Watermark>>>,
    closed: Arc<AtomicUsize>,
    fail_on_batch: bool,
}

#[async_trait]
impl Transform for PassThrough {
    async fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        if self.fail_on_batch {
            return Err(OperatorError::User("value out of range".into()));
        }
        out.emit(batch);
        Ok(())
    }

    async fn on_watermark(
        &mut self,
        watermark: Watermark,
        _out: &mut Collector,
    ) -> Result<(), OperatorError> {
        self.watermarks.lock().unwrap().push(watermark);
        Ok(())
    }

    async fn on_close(&mut self, _out: &mut Collector) -> Result<(), OperatorError> {
        self.closed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn metrics() -> (prometheus::Registry, EngineMetrics) {
    let registry = prometheus::Registry::new();
    let metrics = EngineMetrics::new(&registry).expect("registers");
    (registry, metrics)
}

#[tokio::test]
async fn fan_out_shares_batches_without_copying() {
    let mut builder = PipelineBuilder::new("fan-out");
    let (src, _) = source(vec![batch(&[1, 2, 3])]);
    builder.add_node("src", src, main_port(), vec![], None);
    let (left, left_seen) = sink(Duration::ZERO);
    let (right, right_seen) = sink(Duration::ZERO);
    builder.add_node("left", left, vec![], vec![input("src")], None);
    builder.add_node("right", right, vec![], vec![input("src")], None);
    let (_, metrics) = metrics();
    builder
        .build(&metrics)
        .unwrap()
        .run(CancellationToken::new())
        .await
        .unwrap();

    let first = |seen: &Arc<Mutex<Vec<Seen>>>| match &seen.lock().unwrap()[0] {
        Seen::Batch(_, batch) => batch.clone(),
        other => panic!("expected a batch, got {other:?}"),
    };
    let (l, r) = (first(&left_seen), first(&right_seen));
    assert_eq!(l, r);
    // The very same buffer reached both consumers.
    assert_eq!(
        l.column(1).to_data().buffers()[0].as_ptr(),
        r.column(1).to_data().buffers()[0].as_ptr()
    );
}

#[tokio::test]
async fn fan_in_takes_the_minimum_watermark_and_end_is_the_final_one() {
    let mut builder = PipelineBuilder::new("fan-in");
    let (fast, _) = source(vec![batch(&[100]), batch(&[500])]);
    let (slow, _) = source(vec![batch(&[50]), batch(&[200])]);
    builder.add_node("fast", fast, main_port(), vec![], event_time());
    builder.add_node("slow", slow, main_port(), vec![], event_time());
    let watermarks = Arc::new(Mutex::new(Vec::new()));
    let closed = Arc::new(AtomicUsize::new(0));
    let merge = OperatorInstance::Transform(Box::new(PassThrough {
        watermarks: watermarks.clone(),
        closed: closed.clone(),
        fail_on_batch: false,
    }));
    builder.add_node(
        "merge",
        merge,
        main_port(),
        vec![input("fast"), input("slow")],
        None,
    );
    let (out, seen) = sink(Duration::ZERO);
    builder.add_node("out", out, vec![], vec![input("merge")], None);
    let (_, metrics) = metrics();
    builder
        .build(&metrics)
        .unwrap()
        .run(CancellationToken::new())
        .await
        .unwrap();

    let watermarks = watermarks.lock().unwrap().clone();
    // Never ahead of the slower input: it only reaches 200, so 500 never shows up
    // before the end, and the end arrives as the final watermark.
    assert_eq!(watermarks.last(), Some(&Watermark::END));
    assert!(watermarks.windows(2).all(|w| w[0] < w[1]), "{watermarks:?}");
    for watermark in &watermarks[..watermarks.len() - 1] {
        assert!(watermark.millis() <= 200, "{watermarks:?}");
    }
    assert_eq!(closed.load(Ordering::SeqCst), 1);
    let seen = seen.lock().unwrap();
    let rows: usize = seen
        .iter()
        .map(|s| match s {
            Seen::Batch(_, b) => b.num_rows(),
            _ => 0,
        })
        .sum();
    assert_eq!(rows, 4);
    assert_eq!(seen.last(), Some(&Seen::Closed));
    assert!(seen.contains(&Seen::Watermark(Watermark::END)));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_slow_sink_holds_back_its_source_within_the_channel_bound() {
    let capacity = 4;
    let mut builder = PipelineBuilder::new("backpressure").channel_capacity(capacity);
    let emitted = Arc::new(AtomicUsize::new(0));
    let src = OperatorInstance::Source(Box::new(ListSource {
        batches: vec![batch(&[1])],
        endless: true,
        emitted: emitted.clone(),
    }));
    builder.add_node("src", src, main_port(), vec![], None);
    let (out, seen) = sink(Duration::from_millis(100));
    builder.add_node("out", out, vec![], vec![input("src")], None);
    let (_, metrics) = metrics();
    let pipeline = builder.build(&metrics).unwrap();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(pipeline.run(shutdown.clone()));
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let written = seen.lock().unwrap().len();
        let ahead = emitted.load(Ordering::SeqCst) - written;
        // In flight: the channel's capacity, plus one batch in the sink's hands.
        assert!(ahead <= capacity + 1, "source ran {ahead} batches ahead");
    }
    shutdown.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_operator_failure_names_pipeline_and_operator_and_stops_the_sources() {
    let mut builder = PipelineBuilder::new("failing");
    let emitted = Arc::new(AtomicUsize::new(0));
    let src = OperatorInstance::Source(Box::new(ListSource {
        batches: vec![batch(&[1])],
        endless: true,
        emitted,
    }));
    builder.add_node("src", src, main_port(), vec![], None);
    let broken = OperatorInstance::Transform(Box::new(PassThrough {
        watermarks: Arc::default(),
        closed: Arc::default(),
        fail_on_batch: true,
    }));
    builder.add_node("broken", broken, main_port(), vec![input("src")], None);
    let (out, seen) = sink(Duration::ZERO);
    builder.add_node("out", out, vec![], vec![input("broken")], None);
    let (registry, metrics) = metrics();
    let error = builder
        .build(&metrics)
        .unwrap()
        .run(CancellationToken::new())
        .await
        .expect_err("the transform fails");
    assert!(matches!(&error, PipelineError::Operator { operator, .. } if operator == "broken"));
    assert_eq!(
        error.to_string(),
        "pipeline 'failing': operator 'broken' failed: value out of range"
    );
    // Downstream still closed cleanly.
    assert_eq!(seen.lock().unwrap().last(), Some(&Seen::Closed));
    let errors = registry
        .gather()
        .into_iter()
        .find(|family| family.name() == "weir_operator_errors_total")
        .expect("errors are counted");
    let broken_errors: f64 = errors
        .get_metric()
        .iter()
        .filter(|m| m.get_label().iter().any(|l| l.value() == "broken"))
        .map(|m| m.get_counter().get_value())
        .sum();
    assert_eq!(broken_errors, 1.0);
}

struct Panicking;

#[async_trait]
impl Sink for Panicking {
    async fn write(&mut self, _input: usize, _batch: RecordBatch) -> Result<(), OperatorError> {
        panic!("index out of bounds in a test sink");
    }
}

#[tokio::test]
async fn a_panicking_operator_is_reported_not_silent() {
    let mut builder = PipelineBuilder::new("panics");
    let (src, _) = source(vec![batch(&[1])]);
    builder.add_node("src", src, main_port(), vec![], None);
    builder.add_node(
        "bad",
        OperatorInstance::Sink(Box::new(Panicking)),
        vec![],
        vec![input("src")],
        None,
    );
    let (_, metrics) = metrics();
    let error = builder
        .build(&metrics)
        .unwrap()
        .run(CancellationToken::new())
        .await
        .expect_err("the sink panics");
    assert_eq!(
        error.to_string(),
        "pipeline 'panics': operator 'bad' panicked: index out of bounds in a test sink"
    );
}

#[tokio::test]
async fn shutdown_stops_an_endless_source_and_drains_what_was_sent() {
    let mut builder = PipelineBuilder::new("drain");
    let emitted = Arc::new(AtomicUsize::new(0));
    let src = OperatorInstance::Source(Box::new(ListSource {
        batches: vec![batch(&[1, 2])],
        endless: true,
        emitted: emitted.clone(),
    }));
    builder.add_node("src", src, main_port(), vec![], None);
    let (out, seen) = sink(Duration::ZERO);
    builder.add_node("out", out, vec![], vec![input("src")], None);
    let (_, metrics) = metrics();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(builder.build(&metrics).unwrap().run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    let seen = seen.lock().unwrap();
    let written = seen.iter().filter(|s| matches!(s, Seen::Batch(..))).count();
    assert_eq!(
        written,
        emitted.load(Ordering::SeqCst),
        "every emitted batch was written"
    );
    assert_eq!(seen.last(), Some(&Seen::Closed));
}

#[tokio::test]
async fn wiring_to_a_missing_node_or_a_cycle_is_refused() {
    let (_, metrics) = metrics();
    let mut builder = PipelineBuilder::new("dangling");
    let (out, _) = sink(Duration::ZERO);
    builder.add_node("out", out, vec![], vec![input("nowhere")], None);
    let error = builder.build(&metrics).err().expect("refused");
    assert!(
        error.to_string().contains("'out' reads from 'nowhere'"),
        "{error}"
    );

    let mut builder = PipelineBuilder::new("cycle");
    for (name, from) in [("a", "b"), ("b", "a")] {
        let t = OperatorInstance::Transform(Box::new(PassThrough {
            watermarks: Arc::default(),
            closed: Arc::default(),
            fail_on_batch: false,
        }));
        builder.add_node(name, t, main_port(), vec![input(from)], None);
    }
    let error = builder.build(&metrics).err().expect("refused");
    assert!(error.to_string().contains("form a cycle"), "{error}");
}

#[tokio::test]
async fn a_retained_stream_keeps_its_batches_even_with_no_consumer() {
    let mut builder = PipelineBuilder::new("retained");
    let (src, _) = source(vec![batch(&[1, 2]), batch(&[3])]);
    builder.add_node("src", src, main_port(), vec![], None);
    builder.retain("src", weir_engine::observe::RetainSpec::default());
    let (registry, metrics) = metrics();
    let pipeline = builder.build(&metrics).unwrap();
    let view = pipeline.streams()[0].clone();
    assert_eq!(view.node(), "src");
    let mut tap = view.tap(8);
    pipeline.run(CancellationToken::new()).await.unwrap();

    let kept = view.retained_batches().expect("retained");
    assert_eq!(kept, vec![batch(&[1, 2]), batch(&[3])]);
    // The tap saw both batches, then the end of the stream.
    assert_eq!(tap.next().await, Some(batch(&[1, 2])));
    assert_eq!(tap.next().await, Some(batch(&[3])));
    assert_eq!(tap.next().await, None);
    // Retained rows are not "unconsumed": they went to the retention.
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(!text.contains("reason=\"unconsumed\""), "{text}");
    assert!(
        text.contains("weir_retained_rows{operator=\"src\",pipeline=\"retained\"} 3"),
        "{text}"
    );
}

#[tokio::test]
async fn retaining_a_sink_or_a_missing_node_is_refused() {
    for retained in ["out", "nowhere"] {
        let mut builder = PipelineBuilder::new("p");
        let (src, _) = source(vec![]);
        builder.add_node("src", src, main_port(), vec![], None);
        let (out, _) = sink(Duration::ZERO);
        builder.add_node("out", out, vec![], vec![input("src")], None);
        builder.retain(retained, weir_engine::observe::RetainSpec::default());
        let (_, metrics) = metrics();
        let error = builder.build(&metrics).err().expect("refused");
        assert!(
            error
                .to_string()
                .contains(&format!("'{retained}' is retained")),
            "{error}"
        );
    }
}

/// Passes its first batch on, then panics.
struct PanicsAfterOne {
    passed: bool,
}

#[async_trait]
impl Transform for PanicsAfterOne {
    async fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        if self.passed {
            panic!("a test transform gives up");
        }
        self.passed = true;
        out.emit(batch);
        Ok(())
    }
}

#[tokio::test]
async fn a_tap_ends_when_its_node_panics() {
    let mut builder = PipelineBuilder::new("panics");
    let (src, _) = source(vec![batch(&[1]), batch(&[2]), batch(&[3])]);
    builder.add_node("src", src, main_port(), vec![], None);
    builder.add_node(
        "flaky",
        OperatorInstance::Transform(Box::new(PanicsAfterOne { passed: false })),
        main_port(),
        vec![input("src")],
        None,
    );
    let (out, _) = sink(Duration::ZERO);
    builder.add_node("out", out, vec![], vec![input("flaky")], None);
    let (_, metrics) = metrics();
    let pipeline = builder.build(&metrics).unwrap();
    let view = pipeline
        .streams()
        .iter()
        .find(|view| view.node() == "flaky")
        .unwrap()
        .clone();
    let mut tap = view.tap(8);
    pipeline
        .run(CancellationToken::new())
        .await
        .expect_err("the transform panics");
    assert_eq!(tap.next().await, Some(batch(&[1])));
    // No end of stream was sent, yet the tap ends rather than wait forever.
    assert_eq!(tap.next().await, None);
    assert!(view.has_ended());
}

// ---- event time: row-exact watermarks, max_future, idleness, flushing -----------------

/// Emits its batches, then says nothing more until the pipeline stops; optionally
/// waits `every` between batches.
struct QuietSource {
    batches: Vec<RecordBatch>,
    every: Duration,
}

#[async_trait]
impl Source for QuietSource {
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError> {
        for batch in &self.batches {
            ctx.emit(batch.clone()).await?;
            tokio::time::sleep(self.every).await;
        }
        ctx.cancelled().await;
        Ok(())
    }
}

fn quiet(batches: Vec<RecordBatch>, every: Duration) -> OperatorInstance {
    OperatorInstance::Source(Box::new(QuietSource { batches, every }))
}

fn idle_after(timeout: Duration) -> Option<EventTimeSpec> {
    Some(EventTimeSpec {
        idle_timeout: Some(timeout),
        ..event_time().unwrap()
    })
}

/// Builds and runs `builder` until every source has ended; returns its metrics.
async fn run_to_end(builder: PipelineBuilder) -> prometheus::Registry {
    let (registry, metrics) = metrics();
    builder
        .build(&metrics)
        .unwrap()
        .run(CancellationToken::new())
        .await
        .unwrap();
    registry
}

/// Runs `builder` until `done` holds of what the sink `seen` has recorded (or 10 min of
/// paused time pass), then shuts it down.
async fn run_until(
    builder: PipelineBuilder,
    seen: &Arc<Mutex<Vec<Seen>>>,
    done: impl Fn(&[Seen]) -> bool,
) -> bool {
    let (_, metrics) = metrics();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(builder.build(&metrics).unwrap().run(shutdown.clone()));
    let mut reached = false;
    for _ in 0..6000 {
        if done(&seen.lock().unwrap()) {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
    reached
}

fn watermarks_of(seen: &[Seen]) -> Vec<i64> {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Watermark(w) if *w != Watermark::END => Some(w.millis()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_row_behind_the_watermark_meets_it_whatever_the_batch() {
    let mut builder = PipelineBuilder::new("row-exact");
    let (src, _) = source(vec![batch(&[100, 300, 50, 400, 200]), batch(&[500, 600])]);
    builder.add_node("src", src, main_port(), vec![], event_time());
    let (out, seen) = sink(Duration::ZERO);
    builder.add_node("out", out, vec![], vec![input("src")], None);
    run_to_end(builder).await;
    // Each row that is behind what its predecessors imply follows that watermark, as
    // it would if every row were its own batch; rows in order stay together.
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            Seen::Batch(0, batch(&[100, 300])),
            Seen::Watermark(Watermark(300)),
            Seen::Batch(0, batch(&[50, 400])),
            Seen::Watermark(Watermark(400)),
            Seen::Batch(0, batch(&[200])),
            Seen::Batch(0, batch(&[500, 600])),
            Seen::Watermark(Watermark(600)),
            Seen::Watermark(Watermark::END),
            Seen::Closed,
        ]
    );
}

#[tokio::test]
async fn rows_past_max_future_are_rejected_counted_and_never_move_the_watermark() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let hour = 3_600_000;
    let mut builder = PipelineBuilder::new("future");
    let (src, _) = source(vec![batch(&[now - 5, now + 10 * hour, now])]);
    let spec = EventTimeSpec {
        max_future: Some(Duration::from_secs(3600)),
        ..event_time().unwrap()
    };
    builder.add_node("src", src, main_port(), vec![], Some(spec));
    let (out, seen) = sink(Duration::ZERO);
    builder.add_node("out", out, vec![], vec![input("src")], None);
    let registry = run_to_end(builder).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0], Seen::Batch(0, batch(&[now - 5, now])));
    assert_eq!(watermarks_of(&seen), vec![now]);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    for family in ["rejected", "dropped"] {
        let line = format!(
            "weir_operator_{family}_rows_total{{operator=\"src\",pipeline=\"future\",reason=\"future_event_time\"}} 1"
        );
        assert!(text.contains(&line), "{line} in\n{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_quiet_source_past_its_idle_timeout_advances_on_the_wall_clock() {
    let mut builder = PipelineBuilder::new("idle");
    let src = quiet(vec![batch(&[1000])], Duration::ZERO);
    builder.add_node(
        "src",
        src,
        main_port(),
        vec![],
        idle_after(Duration::from_secs(5)),
    );
    let (out, seen) = sink(Duration::ZERO);
    builder.add_node("out", out, vec![], vec![input("src")], None);
    let started = tokio::time::Instant::now();
    let reached = run_until(builder, &seen, |seen| {
        watermarks_of(seen).last().is_some_and(|w| *w >= 20_000)
    })
    .await;
    assert!(reached, "{:?}", watermarks_of(&seen.lock().unwrap()));
    let seen = seen.lock().unwrap();
    let watermarks = watermarks_of(&seen);
    assert_eq!(watermarks[0], 1000, "data first sets the watermark");
    // Nothing moves before the timeout; afterwards event time passes with the clock.
    assert!(watermarks[1] >= 6000, "{watermarks:?}");
    assert!(started.elapsed() >= Duration::from_secs(19));
}

fn pass_through() -> OperatorInstance {
    OperatorInstance::Transform(Box::new(PassThrough {
        watermarks: Arc::new(Mutex::new(Vec::new())),
        closed: Arc::new(AtomicUsize::new(0)),
        fail_on_batch: false,
    }))
}

/// A fan-in of a source that sends one reading and falls silent (idle after 1 s) and
/// one that reports a second of event time every 100 ms, far ahead of the wall clock;
/// with `relayed`, the quiet source reaches the fan-in through an operator that has no
/// idle timeout of its own. Returns how long the fan-in took to reach 50 s of event time.
async fn time_to_pass_an_idle_input(relayed: bool) -> Duration {
    let mut builder = PipelineBuilder::new("fan-in-idle");
    builder.add_node(
        "quiet",
        quiet(vec![batch(&[0])], Duration::ZERO),
        main_port(),
        vec![],
        idle_after(Duration::from_secs(1)),
    );
    let busy: Vec<RecordBatch> = (1..=100).map(|i| batch(&[i * 1000])).collect();
    builder.add_node(
        "busy",
        quiet(busy, Duration::from_millis(100)),
        main_port(),
        vec![],
        event_time(),
    );
    let quiet_input = if relayed {
        builder.add_node(
            "relay",
            pass_through(),
            main_port(),
            vec![input("quiet")],
            None,
        );
        "relay"
    } else {
        "quiet"
    };
    builder.add_node(
        "merge",
        pass_through(),
        main_port(),
        vec![input(quiet_input), input("busy")],
        None,
    );
    let (out, seen) = sink(Duration::ZERO);
    builder.add_node("out", out, vec![], vec![input("merge")], None);
    let started = tokio::time::Instant::now();
    let reached = run_until(builder, &seen, |seen| {
        watermarks_of(seen).last().is_some_and(|w| *w >= 50_000)
    })
    .await;
    assert!(reached, "{:?}", watermarks_of(&seen.lock().unwrap()));
    started.elapsed()
}

#[tokio::test(start_paused = true)]
async fn an_idle_input_of_a_fan_in_stops_holding_the_others_back() {
    // The busy input gets there in about 5 s: the quiet one's wall clock alone would
    // need 50 s.
    let took = time_to_pass_an_idle_input(false).await;
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn idleness_reaches_a_fan_in_through_the_operators_between() {
    // The relay's own watermark moves with the wall clock (about 1 s per second), so had
    // it held the fan-in back, 50 s of event time would have taken 50 s.
    let took = time_to_pass_an_idle_input(true).await;
    assert!(took < Duration::from_secs(20), "{took:?}");
}

/// Counts its flushes.
struct FlushCounting {
    flushes: Arc<AtomicUsize>,
}

#[async_trait]
impl Sink for FlushCounting {
    async fn write(&mut self, _input: usize, _batch: RecordBatch) -> Result<(), OperatorError> {
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), OperatorError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn sinks_are_flushed_on_a_timer_while_they_have_unflushed_writes() {
    let mut builder = PipelineBuilder::new("flushing");
    builder.add_node(
        "src",
        quiet(vec![batch(&[1]), batch(&[2])], Duration::from_millis(2500)),
        main_port(),
        vec![],
        None,
    );
    let flushes = Arc::new(AtomicUsize::new(0));
    let out = OperatorInstance::Sink(Box::new(FlushCounting {
        flushes: flushes.clone(),
    }));
    builder.add_node("out", out, vec![], vec![input("src")], None);
    builder.flush_interval("out", Duration::from_secs(1));
    let (_, metrics) = metrics();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(builder.build(&metrics).unwrap().run(shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(30)).await;
    // One flush a second after each write, none while nothing new was written.
    assert_eq!(flushes.load(Ordering::SeqCst), 2);
    shutdown.cancel();
    running.await.unwrap().unwrap();
    // And the close flushes once more.
    assert_eq!(flushes.load(Ordering::SeqCst), 3);
}

/// Passes batches through, noting which key values (`v`) instance `instance` saw.
struct KeyTally {
    instance: usize,
    seen: Arc<Mutex<Vec<(usize, i64)>>>,
}

#[async_trait]
impl Transform for KeyTally {
    async fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        let values = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("v is Int64");
        let mut seen = self.seen.lock().unwrap();
        seen.extend(values.values().iter().map(|&v| (self.instance, v)));
        drop(seen);
        out.emit(batch);
        Ok(())
    }
}

/// Rows at times 0..rows, each with key `v = time % keys`, in batches of `per_batch`.
fn keyed_batches(rows: i64, keys: i64, per_batch: i64) -> Vec<RecordBatch> {
    (0..rows)
        .step_by(per_batch as usize)
        .map(|start| {
            let times: Vec<i64> = (start..(start + per_batch).min(rows)).collect();
            let keys: Vec<i64> = times.iter().map(|t| t % keys).collect();
            let ts: ArrayRef = Arc::new(TimestampMillisecondArray::from(times));
            let v: ArrayRef = Arc::new(Int64Array::from(keys));
            RecordBatch::try_new(schema(), vec![ts, v]).expect("valid batch")
        })
        .collect()
}

/// The event times (`ts`) of `batch`'s rows.
fn event_times(batch: &RecordBatch) -> Vec<i64> {
    batch
        .column(0)
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .expect("ts is a millisecond timestamp")
        .values()
        .to_vec()
}

/// Runs source → `parallelism` instances of [`KeyTally`] keyed by `v` → recording sink,
/// and returns what the instances saw and what the sink saw.
async fn run_partitioned(
    parallelism: usize,
    batches: Vec<RecordBatch>,
) -> (Vec<(usize, i64)>, Vec<Seen>) {
    let mut builder = PipelineBuilder::new("partitioned");
    let (src, _) = source(batches);
    builder.add_node("src", src, main_port(), vec![], event_time());
    let tallies = Arc::new(Mutex::new(Vec::new()));
    let instances = (0..parallelism)
        .map(|instance| {
            OperatorInstance::Transform(Box::new(KeyTally {
                instance,
                seen: tallies.clone(),
            }))
        })
        .collect();
    builder.add_partitioned_node(
        "by_key",
        instances,
        main_port(),
        vec![input("src")],
        vec!["v".into()],
    );
    let (out, seen) = sink(Duration::ZERO);
    builder.add_node("out", out, vec![], vec![input("by_key")], None);
    let (_, metrics) = metrics();
    builder
        .build(&metrics)
        .unwrap()
        .run(CancellationToken::new())
        .await
        .unwrap();
    let tallies = tallies.lock().unwrap().clone();
    let seen = seen.lock().unwrap().clone();
    (tallies, seen)
}

#[tokio::test]
async fn a_partitioned_transform_sees_each_key_in_one_instance_and_loses_no_row() {
    let batches = keyed_batches(600, 17, 50);
    let (tallies, seen) = run_partitioned(3, batches).await;
    // Every key went to exactly one instance, and more than one instance had work.
    let mut instance_of: std::collections::HashMap<i64, usize> = Default::default();
    for (instance, key) in &tallies {
        assert_eq!(
            *instance_of.entry(*key).or_insert(*instance),
            *instance,
            "key {key}"
        );
    }
    let used: std::collections::HashSet<usize> = instance_of.values().copied().collect();
    assert!(
        used.len() > 1,
        "every key went to one instance: {instance_of:?}"
    );
    // The sink got every row once, as with one instance.
    let times = |seen: &[Seen]| {
        let mut times: Vec<i64> = seen
            .iter()
            .filter_map(|event| match event {
                Seen::Batch(_, batch) => Some(batch),
                _ => None,
            })
            .flat_map(event_times)
            .collect();
        times.sort_unstable();
        times
    };
    let (_, single) = run_partitioned(1, keyed_batches(600, 17, 50)).await;
    assert_eq!(times(&seen), (0..600).collect::<Vec<_>>());
    assert_eq!(times(&seen), times(&single));
}

#[tokio::test]
async fn the_consumer_of_a_partitioned_node_takes_the_minimum_watermark_over_its_instances() {
    for _ in 0..5 {
        let (_, seen) = run_partitioned(4, keyed_batches(2_000, 13, 7)).await;
        // In-order input and no lateness allowed: a watermark that ran ahead of one
        // instance would be followed by that instance's older rows.
        let mut watermark = i64::MIN;
        let mut watermarks = 0;
        for event in &seen {
            match event {
                Seen::Watermark(next) => {
                    assert!(next.millis() >= watermark, "the watermark went back");
                    watermark = next.millis();
                    watermarks += 1;
                }
                Seen::Batch(_, batch) => {
                    let oldest = event_times(batch).into_iter().min().unwrap();
                    assert!(
                        oldest > watermark,
                        "a row at {oldest} came after watermark {watermark}"
                    );
                }
                Seen::Closed => {}
            }
        }
        assert!(watermarks > 1, "the watermark never moved");
    }
}

#[tokio::test]
async fn only_transforms_run_partitioned_and_their_keys_must_be_columns() {
    let (_, metrics) = metrics();
    let mut builder = PipelineBuilder::new("bad-key");
    let (src, _) = source(vec![batch(&[1])]);
    builder.add_node("src", src, main_port(), vec![], None);
    let tally = |instance| {
        OperatorInstance::Transform(Box::new(KeyTally {
            instance,
            seen: Arc::default(),
        }))
    };
    builder.add_partitioned_node(
        "by_site",
        vec![tally(0), tally(1)],
        main_port(),
        vec![input("src")],
        vec!["site".into()],
    );
    let Err(error) = builder.build(&metrics) else {
        panic!("a key that is no column built");
    };
    assert!(
        error.to_string().contains(
            "'by_site': partition key 'site' is not a column of its input (columns: ts, v)"
        ),
        "{error}"
    );

    let mut builder = PipelineBuilder::new("partitioned-sink");
    let (src, _) = source(vec![batch(&[1])]);
    builder.add_node("src", src, main_port(), vec![], None);
    let (first, _) = sink(Duration::ZERO);
    let (second, _) = sink(Duration::ZERO);
    builder.add_partitioned_node(
        "out",
        vec![first, second],
        vec![],
        vec![input("src")],
        vec!["v".into()],
    );
    let Err(error) = builder.build(&metrics) else {
        panic!("a partitioned sink built");
    };
    assert!(
        error
            .to_string()
            .contains("'out' runs as several instances, but only transforms can"),
        "{error}"
    );
}
