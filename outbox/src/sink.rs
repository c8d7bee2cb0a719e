//! The `hub` sink and the shipper behind it.
//!
//! Every batch a `hub` sink receives is appended to the process's one outbox and fsynced
//! before `write` returns: from then on it is accepted, and survives a crash or a power
//! cut. One shipper per process sends the outbox's batches over an [`Uplink`] in order,
//! highest-priority stream first, retrying with jittered exponential backoff, and deletes
//! each only once the uplink has acknowledged it. Batches carry (pipeline, sink,
//! sequence), so the receiver can store each once however often it is sent.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::Notify;
use weir_engine::checkpoint::{Epoch, StateChanges};
use weir_engine::config::ConfigErrors;
use weir_engine::metrics::{OperatorMetrics, OutboxMetrics};
use weir_engine::registry::{NodeContext, OperatorFactory, OutputSpec, PlannedOperator, Role};
use weir_engine::{OperatorError, OperatorInstance, Sink};

use rand::{Rng, SeedableRng};

use crate::{Limits, Outbox, OutboxError, Settled, Stats, Stored};

/// Batches shipped per round; one stream at a time.
const SHIP_BATCHES: usize = 32;
/// Sends in flight at once.
const IN_FLIGHT: usize = 4;
/// The wait after a failed send: doubling from this…
const RETRY_INITIAL: Duration = Duration::from_millis(500);
/// …to this.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often the shipper looks at the limits and refreshes metrics while idle.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Why a batch was not shipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShipError {
    /// Not now: the receiver is away, busy, or the credentials are being sorted out.
    /// The batch is sent again.
    #[error("{0}")]
    Retry(String),
    /// The receiver refuses this batch for good, and would refuse it again: it is set
    /// aside as a dead letter, and the batches after it ship.
    #[error("{0}")]
    Refused(String),
}

/// Where shipped batches go: the hub, or a local directory.
#[async_trait]
pub trait Uplink: Send + Sync {
    /// Sends one stored batch. `Ok` means the receiver has it durably (or already had
    /// it); only then is it deleted from the outbox.
    async fn ship(&self, batch: &Stored) -> Result<(), ShipError>;

    /// Where batches go, for messages.
    fn describe(&self) -> String;
}

/// Ships to a directory: each batch becomes `DIR/PIPELINE/SINK/SEQ.arrows` (Arrow IPC,
/// zstd), written to a temporary name, fsynced and renamed. A batch sent twice lands on
/// the same name, so the directory holds each batch once. For trying pipelines, and for
/// tests, without a hub.
pub struct DirectoryUplink {
    dir: PathBuf,
}

impl DirectoryUplink {
    /// An uplink into `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirectoryUplink { dir: dir.into() }
    }
}

#[async_trait]
impl Uplink for DirectoryUplink {
    async fn ship(&self, batch: &Stored) -> Result<(), ShipError> {
        let dir = self.dir.join(&batch.stream);
        let name = format!("{:020}.arrows", batch.seq);
        let payload = batch.payload.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            std::fs::create_dir_all(&dir)?;
            let partial = dir.join(format!(".{name}.partial"));
            let mut file = std::fs::File::create(&partial)?;
            file.write_all(&payload)?;
            file.sync_all()?;
            std::fs::rename(&partial, dir.join(&name))?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| ShipError::Retry(e.to_string()))?
        .map_err(|e| ShipError::Retry(format!("cannot write into {}: {e}", self.dir.display())))
    }

    fn describe(&self) -> String {
        format!("the directory {}", self.dir.display())
    }
}

/// The process's outbox and its shipper, shared by every `hub` sink.
pub struct Shipping {
    path: PathBuf,
    limits: Limits,
    uplink: Arc<dyn Uplink>,
    metrics: OutboxMetrics,
    opened: OnceLock<Result<Arc<Outbox>, String>>,
    appended: Arc<Notify>,
    sends: Arc<Sends>,
}

/// What the shipper sent since the process started.
#[derive(Debug, Default)]
struct Sends {
    shipped_rows: AtomicU64,
    retries: AtomicU64,
}

/// The outbox and its shipper at a glance, for reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShippingStats {
    /// What the outbox holds, and what it stored, acknowledged and dropped.
    pub outbox: Stats,
    /// Rows sent to the receiver since the process started, every attempt counted.
    pub shipped_rows: u64,
    /// Sends that failed since the process started (each tried again later).
    pub retries: u64,
}

impl Shipping {
    /// Shipping through `uplink` from the outbox at `path` (opened when the first `hub`
    /// sink starts).
    pub fn new(
        path: PathBuf,
        limits: Limits,
        uplink: Arc<dyn Uplink>,
        metrics: OutboxMetrics,
    ) -> Self {
        Shipping {
            path,
            limits,
            uplink,
            metrics,
            opened: OnceLock::new(),
            appended: Arc::new(Notify::new()),
            sends: Arc::default(),
        }
    }

    /// The outbox, opened (or recovered) on first use, with the shipper started.
    fn outbox(&self) -> Result<Arc<Outbox>, String> {
        self.opened
            .get_or_init(|| {
                let (outbox, recovery) =
                    Outbox::open(&self.path, self.limits).map_err(|e| e.to_string())?;
                if let Some(recovery) = recovery {
                    self.metrics
                        .recovered(recovery.salvaged_batches, recovery.broken_batches);
                }
                let outbox = Arc::new(outbox);
                tokio::spawn(ship(
                    outbox.clone(),
                    self.uplink.clone(),
                    Counted {
                        metrics: self.metrics.clone(),
                        sends: self.sends.clone(),
                    },
                    self.appended.clone(),
                ));
                tracing::info!(
                    outbox = %self.path.display(),
                    "shipping to {}",
                    self.uplink.describe()
                );
                Ok(outbox)
            })
            .clone()
    }

    /// Opens the outbox and starts the shipper now, rather than when the first `hub`
    /// sink starts (to ship what an earlier run left, say).
    pub fn start(&self) -> Result<Arc<Outbox>, String> {
        self.outbox()
    }

    /// Waits until the outbox is empty, or `timeout` passes; returns the batches left.
    pub async fn drain(&self, timeout: Duration) -> u64 {
        let Some(Ok(outbox)) = self.opened.get() else {
            return 0;
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = outbox.stats().batches;
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The outbox and the shipper at a glance, once a `hub` sink has opened it.
    pub fn stats(&self) -> Option<ShippingStats> {
        match self.opened.get() {
            Some(Ok(outbox)) => Some(ShippingStats {
                outbox: outbox.stats(),
                shipped_rows: self.sends.shipped_rows.load(Ordering::Relaxed),
                retries: self.sends.retries.load(Ordering::Relaxed),
            }),
            _ => None,
        }
    }

    /// The outbox file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub(crate) use weir_engine::time::wall_clock_ms as now_ms;

/// The outbox's figures in `/metrics`.
trait Publish {
    fn recovered(&self, kept: u64, lost: u64);
    fn update(&self, stats: &Stats, now_ms: i64);
    fn appended(&self, stream: &str, rows: u64);
}

/// The shipper's figures: in `/metrics`, and kept for reports.
struct Counted {
    metrics: OutboxMetrics,
    sends: Arc<Sends>,
}

impl Counted {
    fn shipped(&self, stream: &str, rows: u64) {
        self.metrics
            .shipped_rows
            .with_label_values(&[stream])
            .inc_by(rows);
        self.sends.shipped_rows.fetch_add(rows, Ordering::Relaxed);
    }

    fn acked(&self, stream: &str, rows: u64) {
        self.metrics
            .acked_rows
            .with_label_values(&[stream])
            .inc_by(rows);
    }

    fn retried(&self, stream: &str) {
        self.metrics.retries.with_label_values(&[stream]).inc();
        self.sends.retries.fetch_add(1, Ordering::Relaxed);
    }
}

impl Publish for OutboxMetrics {
    fn recovered(&self, kept: u64, lost: u64) {
        self.recovered_batches
            .with_label_values(&["kept"])
            .inc_by(kept);
        self.recovered_batches
            .with_label_values(&["lost"])
            .inc_by(lost);
    }

    fn update(&self, stats: &Stats, now_ms: i64) {
        for stream in &stats.streams {
            let labels = &[stream.stream.as_str()];
            let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.batches
                .with_label_values(labels)
                .set(as_i64(stream.batches));
            self.rows.with_label_values(labels).set(as_i64(stream.rows));
            self.bytes
                .with_label_values(labels)
                .set(as_i64(stream.bytes));
            self.oldest_age_seconds.with_label_values(labels).set(
                stream
                    .oldest_ms
                    .map_or(0, |oldest| (now_ms - oldest).max(0) / 1000),
            );
        }
        // The outbox counts its drops since it opened; the counters catch up to it.
        for (reason, total) in [
            ("bytes", stats.dropped_rows_bytes),
            ("age", stats.dropped_rows_age),
            ("refused", stats.dead_lettered_rows),
        ] {
            let counter = self.dropped_rows.with_label_values(&[reason]);
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    fn appended(&self, stream: &str, rows: u64) {
        self.appended_rows.with_label_values(&[stream]).inc_by(rows);
    }
}

/// Sends what the outbox holds, in order, until the process ends.
async fn ship(
    outbox: Arc<Outbox>,
    uplink: Arc<dyn Uplink>,
    counted: Counted,
    appended: Arc<Notify>,
) {
    let mut failures = 0u32;
    let mut jitter = rand_chacha::ChaCha8Rng::seed_from_u64(now_ms() as u64);
    loop {
        let expired = {
            let outbox = outbox.clone();
            tokio::task::spawn_blocking(move || outbox.expire(now_ms())).await
        };
        if let Ok(Err(error)) = expired {
            tracing::error!("cannot apply the outbox's age limit: {error}");
        }
        counted.metrics.update(&outbox.stats(), now_ms());
        let next = {
            let outbox = outbox.clone();
            tokio::task::spawn_blocking(move || outbox.next(SHIP_BATCHES)).await
        };
        let batches = match next {
            Ok(Ok(batches)) => batches,
            Ok(Err(error)) => {
                tracing::error!("cannot read the outbox: {error}");
                tokio::time::sleep(IDLE_TICK).await;
                continue;
            }
            Err(_) => return,
        };
        if batches.is_empty() {
            let _ = tokio::time::timeout(IDLE_TICK, appended.notified()).await;
            continue;
        }
        // A few sends in flight at once: the receiver's work on one overlaps the
        // transfer of the next. Each batch is acknowledged on its own, so the order they
        // land in does not matter (the receiver keys them by sequence number).
        for wave in batches.chunks(IN_FLIGHT) {
            for batch in wave {
                counted.shipped(&batch.stream, batch.rows);
            }
            let sent = futures::future::join_all(wave.iter().map(|batch| uplink.ship(batch))).await;
            let mut shipped = Vec::new();
            let mut failed = None;
            for (batch, outcome) in wave.iter().zip(sent) {
                match outcome {
                    Ok(()) => {
                        counted.acked(&batch.stream, batch.rows);
                        shipped.push(batch.seq);
                    }
                    Err(ShipError::Refused(reason)) => {
                        tracing::error!(
                            stream = %batch.stream,
                            seq = batch.seq,
                            "{} refuses the batch for good; it is set aside as a dead letter \
                             (`weir outbox check` lists it): {reason}",
                            uplink.describe()
                        );
                        let outbox = outbox.clone();
                        let (stream, seq) = (batch.stream.clone(), batch.seq);
                        let reason = format!("refused by {}: {reason}", uplink.describe());
                        let set_aside = tokio::task::spawn_blocking(move || {
                            outbox.dead_letter(&stream, seq, &reason, now_ms())
                        })
                        .await;
                        if let Ok(Err(error)) = set_aside {
                            tracing::error!("cannot set the batch aside: {error}");
                            failed.get_or_insert(ShipError::Retry(error.to_string()));
                        }
                    }
                    Err(error) => {
                        counted.retried(&batch.stream);
                        failed.get_or_insert(error);
                    }
                }
            }
            if !shipped.is_empty() {
                let acked = {
                    let outbox = outbox.clone();
                    let stream = wave[0].stream.clone();
                    tokio::task::spawn_blocking(move || outbox.ack(&stream, &shipped)).await
                };
                if let Ok(Err(error)) = acked {
                    tracing::error!("cannot delete shipped batches from the outbox: {error}");
                }
            }
            if let Some(error) = failed {
                failures += 1;
                let delay = backoff(failures, &mut jitter);
                tracing::warn!(
                    stream = %wave[0].stream,
                    "cannot ship to {}: {error}; trying again in {delay:.1?}",
                    uplink.describe()
                );
                tokio::time::sleep(delay).await;
                break;
            }
            failures = 0;
        }
    }
}

/// The wait after `failures` failed sends in a row: doubling, capped, with full jitter
/// over its upper half so devices that lost the hub together do not return together.
fn backoff(failures: u32, jitter: &mut impl Rng) -> Duration {
    let ceiling = RETRY_INITIAL
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(RETRY_MAX);
    let half = ceiling / 2;
    half + half.mul_f64(jitter.random::<f64>())
}

/// Builds `hub` sinks; every one in the process shares one [`Shipping`].
pub struct HubSinkFactory {
    shipping: Option<Arc<Shipping>>,
}

impl HubSinkFactory {
    /// A factory whose sinks ship through `shipping`; with `None` (the hub validating a
    /// deployment, `weir validate`) sinks plan but cannot start.
    pub fn new(shipping: Option<Arc<Shipping>>) -> Self {
        HubSinkFactory { shipping }
    }
}

/// The `config` of a `hub` sink.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubSinkConfig {
    /// Where several sinks share the uplink, a higher priority ships first and is
    /// dropped last when the outbox is full. Default 0.
    pub priority: i32,
    /// Number each batch by the smallest value of this timestamp or integer column (ms),
    /// e.g. `window_start` for windowed aggregates, instead of counting. A window
    /// produced again after a restart then gets the number it had, and the hub stores it
    /// once. Each batch must then hold a different value (one window per batch).
    pub sequence_by: Option<String>,
}

impl OperatorFactory for HubSinkFactory {
    fn kind(&self) -> &'static str {
        "hub"
    }

    fn roles(&self) -> &'static [Role] {
        &[Role::Sink]
    }

    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config: HubSinkConfig = node.config()?;
        let sequence_by = match config.sequence_by {
            None => None,
            Some(column) => {
                let found = node
                    .inputs
                    .iter()
                    .map(|input| {
                        input
                            .stream
                            .schema
                            .index_of(&column)
                            .ok()
                            .map(|i| input.stream.schema.field(i).data_type().clone())
                    })
                    .collect::<Vec<_>>();
                let usable = |t: &Option<DataType>| {
                    matches!(t, Some(DataType::Timestamp(..) | DataType::Int64))
                };
                if node.inputs_known && !found.iter().all(usable) {
                    return Err(vec![node.field_error(
                        &["sequence_by"],
                        format!(
                            "every input needs a timestamp or int64 column '{column}' to number \
                             batches by"
                        ),
                    )]);
                }
                Some(column)
            }
        };
        Ok(Box::new(Plan {
            stream: format!("{}/{}", node.pipeline, node.name),
            priority: config.priority,
            sequence_by,
            shipping: self.shipping.clone(),
        }))
    }
}

struct Plan {
    stream: String,
    priority: i32,
    sequence_by: Option<String>,
    shipping: Option<Arc<Shipping>>,
}

impl PlannedOperator for Plan {
    fn outputs(&self) -> Vec<OutputSpec> {
        Vec::new()
    }

    fn instantiate(
        self: Box<Self>,
        _metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        let shipping = self.shipping.ok_or_else(|| {
            OperatorError::User(
                "the hub sink has nowhere to ship: run the pipeline under `weir agent`, or \
                 pass --ship-dir DIR to `weir run` to ship to a local directory"
                    .to_owned(),
            )
        })?;
        let outbox = shipping.outbox().map_err(OperatorError::User)?;
        outbox
            .register(&self.stream, self.priority)
            .map_err(|e| OperatorError::User(e.to_string()))?;
        Ok(OperatorInstance::Sink(Box::new(HubSink {
            stream: self.stream,
            sequence_by: self.sequence_by,
            checkpointing: None,
            outbox,
            appended: shipping.appended.clone(),
            metrics: shipping.metrics.clone(),
        })))
    }
}

struct HubSink {
    stream: String,
    sequence_by: Option<String>,
    /// When the pipeline checkpoints, the newest epoch complete at its start: batches
    /// are then held in the outbox until their epoch completes.
    checkpointing: Option<Epoch>,
    outbox: Arc<Outbox>,
    appended: Arc<Notify>,
    metrics: OutboxMetrics,
}

impl HubSink {
    /// Runs `work` on the outbox on a blocking thread (it fsyncs).
    async fn on_outbox<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Outbox, &str) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OperatorError> {
        let (outbox, stream) = (self.outbox.clone(), self.stream.clone());
        tokio::task::spawn_blocking(move || work(&outbox, &stream))
            .await
            .map_err(|e| OperatorError::Internal(e.to_string()))?
            .map_err(|e| OperatorError::User(e.to_string()))
    }

    /// `rows` more are in the outbox to ship.
    fn shippable(&self, rows: u64) {
        if rows > 0 {
            self.metrics.appended(&self.stream, rows);
            self.appended.notify_one();
        }
    }
}

#[async_trait]
impl Sink for HubSink {
    fn checkpointing(&mut self, completed: Epoch) {
        self.checkpointing = Some(completed);
    }

    /// A checkpointing sink settles what an earlier run held: batches of epochs that
    /// completed ship, the rest are deleted, as the pipeline writes them again.
    async fn start(&mut self) -> Result<(), OperatorError> {
        let Some(completed) = self.checkpointing else {
            return Ok(());
        };
        let settled = self
            .on_outbox(move |outbox, stream| outbox.settle_held(stream, completed))
            .await?;
        if settled != Settled::default() {
            tracing::info!(
                stream = %self.stream,
                "batches held at the last stop: {} of completed checkpoints now ship, {}                  written after the last checkpoint are written again",
                settled.released_batches,
                settled.discarded_batches
            );
        }
        self.shippable(settled.released_rows);
        Ok(())
    }

    async fn write(&mut self, _input: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        let rows = batch.num_rows() as u64;
        if rows == 0 {
            return Ok(());
        }
        let number = match &self.sequence_by {
            Some(column) => Some(first_millis(&batch, column)?),
            None => None,
        };
        // Accepted only once stored and fsynced.
        if self.checkpointing.is_some() {
            self.on_outbox(move |outbox, stream| {
                outbox.append_held(stream, &[(number, batch)], now_ms())
            })
            .await?;
            return Ok(());
        }
        self.on_outbox(move |outbox, stream| match number {
            Some(seq) => outbox.append_numbered(stream, &[(seq, batch)], now_ms()),
            None => outbox.append(stream, &[batch], now_ms()),
        })
        .await?;
        self.shippable(rows);
        Ok(())
    }

    /// The batches written since the last barrier belong to `epoch`.
    async fn snapshot(&mut self, epoch: Epoch) -> Result<StateChanges, OperatorError> {
        self.on_outbox(move |outbox, stream| outbox.seal_held(stream, epoch))
            .await?;
        Ok(StateChanges::unchanged())
    }

    async fn commit(&mut self, epoch: Epoch) -> Result<(), OperatorError> {
        let (_, rows) = self
            .on_outbox(move |outbox, stream| outbox.release_held(stream, epoch))
            .await?;
        self.shippable(rows);
        Ok(())
    }
}

/// The smallest value of `column` in `batch`, in ms (timestamps) or as it is (int64).
fn first_millis(batch: &RecordBatch, column: &str) -> Result<u64, OperatorError> {
    let values = batch.column_by_name(column).ok_or_else(|| {
        OperatorError::User(format!(
            "the batch has no column '{column}' to number it by"
        ))
    })?;
    let as_ms = match values.data_type() {
        DataType::Timestamp(..) => arrow::compute::cast(
            values,
            &DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
        )
        .and_then(|ms| arrow::compute::cast(&ms, &DataType::Int64)),
        _ => arrow::compute::cast(values, &DataType::Int64),
    }
    .map_err(|e| OperatorError::User(format!("cannot number the batch by '{column}': {e}")))?;
    let smallest = arrow::compute::min(
        as_ms
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .ok_or_else(|| OperatorError::Internal("a cast to int64 gave no int64".into()))?,
    )
    .ok_or_else(|| OperatorError::User(format!("'{column}' holds only nulls")))?;
    u64::try_from(smallest).map_err(|_| {
        OperatorError::User(format!(
            "'{column}' is negative ({smallest}); cannot number by it"
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    /// Takes every batch but those of `refused_rows` rows, which it refuses for good.
    struct Picky {
        refused_rows: u64,
        taken: Mutex<Vec<u64>>,
    }

    #[async_trait]
    impl Uplink for Picky {
        async fn ship(&self, batch: &Stored) -> Result<(), ShipError> {
            if batch.rows == self.refused_rows {
                return Err(ShipError::Refused("422: a column of another type".into()));
            }
            self.taken.lock().unwrap().push(batch.rows);
            Ok(())
        }

        fn describe(&self) -> String {
            "a picky receiver".into()
        }
    }

    #[tokio::test]
    async fn a_batch_refused_for_good_is_set_aside_and_shipping_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = weir_engine::metrics::EngineMetrics::new(&prometheus::Registry::new())
            .unwrap()
            .outbox();
        let uplink = Arc::new(Picky {
            refused_rows: 2,
            taken: Mutex::default(),
        });
        let limits = Limits {
            max_bytes: u64::MAX,
            max_age: None,
        };
        let shipping = Shipping::new(
            dir.path().join("outbox.redb"),
            limits,
            uplink.clone(),
            metrics,
        );
        let outbox = shipping.start().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let rows = |n: i64| {
            RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from_iter_values(0..n))],
            )
            .unwrap()
        };
        outbox
            .append("p/hub", &[rows(1), rows(2), rows(3)], now_ms())
            .unwrap();
        assert_eq!(shipping.drain(Duration::from_secs(20)).await, 0);
        assert_eq!(*uplink.taken.lock().unwrap(), [1, 3]);
        let letters = outbox.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert!(letters[0].reason.contains("422"), "{letters:?}");
        assert_eq!(outbox.stats().dead_lettered_rows, 2);
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() {
        let mut jitter = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for failures in 1..20 {
            let ceiling = RETRY_INITIAL
                .saturating_mul(1 << (failures - 1).min(16))
                .min(RETRY_MAX);
            let delay = backoff(failures, &mut jitter);
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{failures}: {delay:?}"
            );
        }
        assert!(backoff(30, &mut jitter) <= RETRY_MAX);
    }
}
