//! Looking into a stream while it flows, without ever slowing it: retention keeps a
//! node's recent batches in memory for ad-hoc queries, and taps sample its batches live.
//!
//! Every node with an output has a [`StreamView`] on its main port. The port hands each
//! batch it sends to the view, which costs one atomic load when nothing retains or taps
//! the stream. Retention clones the batch (its columns are shared, not copied) into a
//! queue bounded by age and bytes, evicting the oldest first. Taps get a batch only when
//! their bounded queue has room; otherwise the batch is dropped for that tap and counted,
//! so a slow reader never holds the pipeline back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::StreamMetrics;

/// How long a retained stream keeps batches when its YAML gives no `duration`.
pub const DEFAULT_RETAIN_DURATION: Duration = Duration::from_secs(15 * 60);
/// How much memory a retained stream may hold when its YAML gives no `max_bytes`: 64 MiB.
pub const DEFAULT_RETAIN_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// How much of a stream to keep for queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetainSpec {
    /// Batches older than this (since they passed) are let go.
    pub duration: Duration,
    /// The most memory the kept batches may hold; the oldest go first.
    pub max_bytes: u64,
}

impl Default for RetainSpec {
    fn default() -> Self {
        RetainSpec {
            duration: DEFAULT_RETAIN_DURATION,
            max_bytes: DEFAULT_RETAIN_MAX_BYTES,
        }
    }
}

/// What a retained stream holds right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetainedUsage {
    /// Batches held.
    pub batches: usize,
    /// Rows held.
    pub rows: u64,
    /// Memory held, in bytes.
    pub bytes: u64,
}

/// The stream a node emits on its main port, as seen from outside the pipeline.
pub struct StreamView {
    pipeline: String,
    node: String,
    schema: SchemaRef,
    retention: Option<Retention>,
    taps: Mutex<Vec<TapSender>>,
    /// `taps.len()`, readable without the lock on the hot path.
    tap_count: AtomicUsize,
    /// Set once the node has sent its end of stream: taps opened later end at once.
    ended: AtomicBool,
    /// The instances writing to the view that have not ended (a partitioned node runs
    /// several); the stream ends with the last.
    producers: AtomicUsize,
    metrics: StreamMetrics,
}

struct Retention {
    spec: RetainSpec,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    batches: VecDeque<HeldBatch>,
    usage: RetainedUsage,
}

struct HeldBatch {
    arrived: Instant,
    batch: RecordBatch,
    bytes: u64,
}

struct TapSender {
    batches: mpsc::Sender<RecordBatch>,
    dropped: Arc<AtomicU64>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks can leave the data half-updated, so a panic elsewhere
    // while one was held does not make the data wrong.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl StreamView {
    /// A view of `node`'s stream in `pipeline`, retaining it when `retain` says so.
    pub fn new(
        pipeline: impl Into<String>,
        node: impl Into<String>,
        schema: SchemaRef,
        retain: Option<RetainSpec>,
        metrics: StreamMetrics,
    ) -> Self {
        StreamView {
            pipeline: pipeline.into(),
            node: node.into(),
            schema,
            retention: retain.map(|spec| Retention {
                spec,
                held: Mutex::new(Held::default()),
            }),
            taps: Mutex::new(Vec::new()),
            tap_count: AtomicUsize::new(0),
            ended: AtomicBool::new(false),
            producers: AtomicUsize::new(0),
            metrics,
        }
    }

    /// Counts one more instance of the node writing to the view.
    pub(crate) fn add_producer(&self) {
        self.producers.fetch_add(1, Ordering::Relaxed);
    }

    /// The pipeline the stream belongs to.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// The node that emits the stream.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The schema of every batch on the stream.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The retention bounds, when the stream is retained.
    pub fn retention(&self) -> Option<RetainSpec> {
        self.retention.as_ref().map(|retention| retention.spec)
    }

    /// Whether the stream keeps its batches, so rows nobody else reads are not lost.
    pub fn is_retained(&self) -> bool {
        self.retention.is_some()
    }

    /// Called by the output port with every batch it sends.
    pub(crate) fn observe(&self, batch: &RecordBatch) {
        if let Some(retention) = &self.retention {
            self.retain(retention, batch);
        }
        if self.tap_count.load(Ordering::Relaxed) > 0 {
            self.offer_to_taps(batch);
        }
    }

    fn retain(&self, retention: &Retention, batch: &RecordBatch) {
        if batch.num_rows() == 0 {
            return;
        }
        let now = Instant::now();
        let mut held = lock(&retention.held);
        let bytes = batch.get_array_memory_size() as u64;
        held.usage.batches += 1;
        held.usage.rows += batch.num_rows() as u64;
        held.usage.bytes += bytes;
        held.batches.push_back(HeldBatch {
            arrived: now,
            batch: batch.clone(),
            bytes,
        });
        self.evict(retention.spec, &mut held, now);
    }

    /// Lets go of what is too old, then of the oldest until the rest fits in max_bytes.
    fn evict(&self, spec: RetainSpec, held: &mut Held, now: Instant) {
        while let Some(oldest) = held.batches.front() {
            let too_old = now.saturating_duration_since(oldest.arrived) > spec.duration;
            let too_big = held.usage.bytes > spec.max_bytes;
            if !too_old && !too_big {
                break;
            }
            let rows = oldest.batch.num_rows() as u64;
            held.usage.batches -= 1;
            held.usage.rows -= rows;
            held.usage.bytes -= oldest.bytes;
            held.batches.pop_front();
            if too_old {
                self.metrics.evicted_for_age.inc_by(rows);
            } else {
                self.metrics.evicted_for_bytes.inc_by(rows);
            }
        }
        self.metrics.retained_rows.set(held.usage.rows as i64);
        self.metrics.retained_bytes.set(held.usage.bytes as i64);
    }

    /// Lets go of retained batches older than the retention's duration. Arriving batches
    /// do this too; a sweep covers streams that have gone quiet.
    pub fn evict_expired(&self) {
        if let Some(retention) = &self.retention {
            let mut held = lock(&retention.held);
            self.evict(retention.spec, &mut held, Instant::now());
        }
    }

    /// The retained batches, oldest first, after letting go of expired ones. `None` when
    /// the stream is not retained. The batches share their columns with the stream.
    pub fn retained_batches(&self) -> Option<Vec<RecordBatch>> {
        let retention = self.retention.as_ref()?;
        let mut held = lock(&retention.held);
        self.evict(retention.spec, &mut held, Instant::now());
        Some(held.batches.iter().map(|held| held.batch.clone()).collect())
    }

    /// What the retention holds; zero when the stream is not retained.
    pub fn retained_usage(&self) -> RetainedUsage {
        self.retention
            .as_ref()
            .map(|retention| lock(&retention.held).usage)
            .unwrap_or_default()
    }

    /// Opens a tap that receives the stream's batches from now on, holding at most
    /// `capacity` of them (at least 1) while its reader is busy. Batches that find the tap
    /// full are dropped for it and counted, in [`Tap::dropped_rows`] and in metrics.
    /// Dropping the tap closes it.
    pub fn tap(self: &Arc<Self>, capacity: usize) -> Tap {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut taps = lock(&self.taps);
        // Checked under the lock, so a tap opened while the stream ends is ended too.
        if !self.ended.load(Ordering::Relaxed) {
            taps.push(TapSender {
                batches: sender,
                dropped: dropped.clone(),
            });
            self.tap_count.store(taps.len(), Ordering::Relaxed);
        }
        Tap {
            batches: receiver,
            dropped,
            view: self.clone(),
        }
    }

    fn offer_to_taps(&self, batch: &RecordBatch) {
        let mut taps = lock(&self.taps);
        taps.retain(|tap| match tap.batches.try_send(batch.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                let rows = batch.num_rows() as u64;
                tap.dropped.fetch_add(rows, Ordering::Relaxed);
                self.metrics.tap_dropped.inc_by(rows);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        self.tap_count.store(taps.len(), Ordering::Relaxed);
    }

    /// Called when an instance's output ports go (after its end of stream, or when it
    /// failed or was aborted): when it was the last instance, every tap ends.
    pub(crate) fn end(&self) {
        let before = self
            .producers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(0);
        if before > 1 {
            return;
        }
        let mut taps = lock(&self.taps);
        self.ended.store(true, Ordering::Relaxed);
        taps.clear();
        self.tap_count.store(0, Ordering::Relaxed);
    }

    /// Whether the node has ended its stream.
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    fn close_tap(&self, closing: &Arc<AtomicU64>) {
        let mut taps = lock(&self.taps);
        taps.retain(|tap| !Arc::ptr_eq(&tap.dropped, closing));
        self.tap_count.store(taps.len(), Ordering::Relaxed);
    }
}

impl Drop for StreamView {
    /// A stream that is gone holds nothing: its pipeline was stopped or replaced.
    fn drop(&mut self) {
        if self.retention.is_some() {
            self.metrics.retained_rows.set(0);
            self.metrics.retained_bytes.set(0);
        }
    }
}

/// A live feed of a stream's batches; see [`StreamView::tap`].
pub struct Tap {
    batches: mpsc::Receiver<RecordBatch>,
    dropped: Arc<AtomicU64>,
    view: Arc<StreamView>,
}

impl Tap {
    /// The next batch, or `None` once the stream's pipeline has gone.
    pub async fn next(&mut self) -> Option<RecordBatch> {
        self.batches.recv().await
    }

    /// Rows the tap missed because it was full, so far.
    pub fn dropped_rows(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Counts rows the tap's reader chose not to show (e.g. over its rate), so they add
    /// to [`Tap::dropped_rows`] and to the stream's metrics like rows it missed.
    pub fn count_dropped(&self, rows: u64) {
        self.dropped.fetch_add(rows, Ordering::Relaxed);
        self.view.metrics.tap_dropped.inc_by(rows);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.view.close_tap(&self.dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]))
    }

    fn batch(from: i64, rows: i64) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![Arc::new(Int64Array::from_iter_values(from..from + rows))],
        )
        .unwrap()
    }

    fn values(batches: &[RecordBatch]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect()
    }

    fn view(retain: Option<RetainSpec>) -> (Arc<StreamView>, StreamMetrics) {
        let metrics = StreamMetrics::detached("p", "n");
        let view = StreamView::new("p", "n", schema(), retain, metrics.clone());
        (Arc::new(view), metrics)
    }

    #[test]
    fn a_stream_written_by_several_instances_ends_with_the_last() {
        let (view, _) = view(None);
        view.add_producer();
        view.add_producer();
        let _tap = view.tap(4);
        view.end();
        assert!(!view.has_ended(), "one instance of two ended the stream");
        assert_eq!(view.tap_count.load(Ordering::Relaxed), 1);
        view.end();
        assert!(view.has_ended());
        assert_eq!(view.tap_count.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_stream_that_is_not_retained_keeps_nothing() {
        let (view, metrics) = view(None);
        view.observe(&batch(0, 10));
        assert!(view.retained_batches().is_none());
        assert_eq!(view.retained_usage(), RetainedUsage::default());
        assert_eq!(metrics.retained_rows.get(), 0);
    }

    #[test]
    fn retention_stays_within_max_bytes_letting_the_oldest_go() {
        let one = batch(0, 100).get_array_memory_size() as u64;
        let (view, metrics) = view(Some(RetainSpec {
            duration: Duration::from_secs(3600),
            max_bytes: one * 3,
        }));
        for i in 0..10 {
            view.observe(&batch(i * 100, 100));
            let usage = view.retained_usage();
            assert!(usage.bytes <= one * 3, "{usage:?} over {}", one * 3);
            assert_eq!(metrics.retained_bytes.get() as u64, usage.bytes);
        }
        let kept = values(&view.retained_batches().unwrap());
        assert_eq!(
            kept,
            (700..1000).collect::<Vec<_>>(),
            "the newest 3 batches"
        );
        assert_eq!(metrics.evicted_for_bytes.get(), 700);
        assert_eq!(metrics.evicted_for_age.get(), 0);
        assert_eq!(metrics.retained_rows.get(), 300);
    }

    #[test]
    fn a_batch_larger_than_max_bytes_is_let_go_and_counted() {
        let (view, metrics) = view(Some(RetainSpec {
            duration: Duration::from_secs(60),
            max_bytes: 16,
        }));
        view.observe(&batch(0, 1000));
        assert_eq!(view.retained_usage(), RetainedUsage::default());
        assert_eq!(metrics.evicted_for_bytes.get(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn retention_lets_go_of_batches_older_than_its_duration() {
        let (view, metrics) = view(Some(RetainSpec {
            duration: Duration::from_secs(60),
            max_bytes: u64::MAX,
        }));
        view.observe(&batch(0, 5));
        tokio::time::advance(Duration::from_secs(40)).await;
        view.observe(&batch(5, 5));
        tokio::time::advance(Duration::from_secs(30)).await;
        // 70 s after the first batch, 30 s after the second: only the second is kept.
        assert_eq!(
            values(&view.retained_batches().unwrap()),
            vec![5, 6, 7, 8, 9]
        );
        assert_eq!(metrics.evicted_for_age.get(), 5);
        tokio::time::advance(Duration::from_secs(31)).await;
        view.evict_expired();
        assert_eq!(view.retained_usage(), RetainedUsage::default());
        assert_eq!(metrics.retained_bytes.get(), 0);
        assert_eq!(metrics.evicted_for_age.get(), 10);
    }

    #[tokio::test]
    async fn a_full_tap_drops_and_counts_instead_of_waiting() {
        let (view, metrics) = view(None);
        let mut tap = view.tap(2);
        for i in 0..5 {
            // observe never waits: a full tap loses the batch.
            view.observe(&batch(i * 10, 10));
        }
        assert_eq!(tap.dropped_rows(), 30);
        assert_eq!(metrics.tap_dropped.get(), 30);
        assert_eq!(
            values(&[tap.next().await.unwrap()]),
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(
            values(&[tap.next().await.unwrap()]),
            (10..20).collect::<Vec<_>>()
        );
        tap.count_dropped(7);
        assert_eq!(tap.dropped_rows(), 37);
        assert_eq!(metrics.tap_dropped.get(), 37);
    }

    #[tokio::test]
    async fn taps_end_with_the_stream() {
        let (view, _) = view(None);
        let mut open = view.tap(4);
        view.observe(&batch(0, 1));
        view.end();
        assert!(open.next().await.is_some(), "what was sent still arrives");
        assert!(open.next().await.is_none());
        assert!(
            view.tap(4).next().await.is_none(),
            "a late tap ends at once"
        );
    }

    #[tokio::test]
    async fn a_closed_tap_is_forgotten() {
        let (view, _) = view(None);
        let first = view.tap(4);
        let mut second = view.tap(4);
        assert_eq!(view.tap_count.load(Ordering::Relaxed), 2);
        drop(first);
        assert_eq!(view.tap_count.load(Ordering::Relaxed), 1);
        view.observe(&batch(0, 3));
        assert_eq!(values(&[second.next().await.unwrap()]), vec![0, 1, 2]);
    }
}
