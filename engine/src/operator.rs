//! The operator roles: one trait per role, batch in and batch out, with every hook but
//! the main one defaulted.
//!
//! - A [`Source`] runs until its input ends or it is cancelled, pushing batches through
//!   its [`SourceContext`]. Watermarks are derived for it from the declared event-time
//!   column, so sources never compute them by hand.
//! - A [`Transform`] processes one batch at a time and may emit on watermarks and when
//!   its inputs close. It emits into a [`Collector`]; the engine then forwards the
//!   collected batches with backpressure.
//! - A [`Sink`] writes batches and flushes what it has buffered.

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::checkpoint::coordinator::NodeLink;
use crate::checkpoint::{Epoch, NodeState, StateChanges};
use crate::error::OperatorError;
use crate::message::Watermark;
use crate::metrics::OperatorMetrics;
use crate::ports::{OutputPorts, WatermarkGenerator};

/// The index of an operator's main output port. Side outputs follow it.
pub const MAIN_PORT: usize = 0;

/// A running operator of one of the three roles.
pub enum OperatorInstance {
    /// Produces batches.
    Source(Box<dyn Source>),
    /// Turns batches into batches.
    Transform(Box<dyn Transform>),
    /// Consumes batches.
    Sink(Box<dyn Sink>),
}

/// An operator that produces batches.
#[async_trait]
pub trait Source: Send {
    /// Produces batches until the input ends or `ctx` is cancelled.
    ///
    /// Returning `Ok(())` ends the stream. A source must return promptly once
    /// [`SourceContext::cancelled`] resolves; what it already emitted is drained.
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<(), OperatorError>;

    /// The source's position, for a checkpoint: what it needs to go on after a restart
    /// without losing or repeating input (a file offset, a generator's sequence). `None`
    /// for a source that keeps nothing.
    ///
    /// While checkpointing is on, a source must take barriers: whenever
    /// [`SourceContext::barrier_due`] says so (or [`SourceContext::barrier_requested`]
    /// resolves), between two batches, it calls [`SourceContext::checkpoint`] with
    /// this. The engine takes the final one itself once `run` has returned.
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>, OperatorError> {
        Ok(None)
    }

    /// Resumes from a position [`Source::snapshot`] returned, before `run`. On error the
    /// source must be as it was, so it can start afresh.
    fn restore(&mut self, _state: &[u8]) -> Result<(), OperatorError> {
        Ok(())
    }
}

/// An operator that turns input batches into output batches.
#[async_trait]
pub trait Transform: Send {
    /// Processes one batch that arrived on input number `input` (in declaration order).
    async fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> Result<(), OperatorError>;

    /// Event time on every input has passed `watermark`. Windowed operators close
    /// windows here. At the end of the stream this is called with [`Watermark::END`].
    async fn on_watermark(
        &mut self,
        _watermark: Watermark,
        _out: &mut Collector,
    ) -> Result<(), OperatorError> {
        Ok(())
    }

    /// The watermark to forward downstream once `watermark` has been handled. An
    /// operator whose output carries earlier event times than its input (a window's
    /// results, stamped with the window's start) holds it back to the earliest event
    /// time it may still emit, so its output is never late downstream.
    fn output_watermark(&self, watermark: Watermark) -> Watermark {
        watermark
    }

    /// Every input has ended (after the final watermark). Emit what is left.
    async fn on_close(&mut self, _out: &mut Collector) -> Result<(), OperatorError> {
        Ok(())
    }

    /// How the transform's state changed since its last snapshot, taken when a
    /// checkpoint barrier has arrived on every input (and again at the end). Stateless
    /// transforms keep the default.
    fn snapshot(&mut self) -> Result<StateChanges, OperatorError> {
        Ok(StateChanges::unchanged())
    }

    /// Takes up the state of the last complete checkpoint, before any batch. On error
    /// the transform must be as it was, so it can start afresh.
    fn restore(&mut self, _state: &NodeState) -> Result<(), OperatorError> {
        Ok(())
    }
}

/// An operator that consumes batches.
#[async_trait]
pub trait Sink: Send {
    /// Called once when the pipeline starts, before any batch. Sinks that talk to an
    /// external system connect here, so a refused connection shows at once rather than
    /// with the first batch.
    async fn start(&mut self) -> Result<(), OperatorError> {
        Ok(())
    }

    /// Writes one batch that arrived on input number `input` (in declaration order).
    async fn write(&mut self, input: usize, batch: RecordBatch) -> Result<(), OperatorError>;

    /// Event time on every input has passed `watermark`.
    async fn on_watermark(&mut self, _watermark: Watermark) -> Result<(), OperatorError> {
        Ok(())
    }

    /// Makes everything written so far durable or visible.
    async fn flush(&mut self) -> Result<(), OperatorError> {
        Ok(())
    }

    /// Every input has ended: flush and release resources.
    async fn close(&mut self) -> Result<(), OperatorError> {
        self.flush().await
    }

    /// Checkpoint `epoch`'s barrier has arrived, after [`Sink::flush`]: the sink makes
    /// everything written before it durable and returns what it needs to undo writes
    /// past it after a crash (a file's length). Also taken after [`Sink::close`], for
    /// the pipeline's last checkpoint.
    async fn snapshot(&mut self, _epoch: Epoch) -> Result<StateChanges, OperatorError> {
        Ok(StateChanges::unchanged())
    }

    /// Called before [`Sink::start`] when the pipeline checkpoints, with the newest epoch
    /// the state store holds as complete (0: none). Every write is then followed by
    /// barriers, and is final once [`Sink::commit`] says its epoch completed: a sink that
    /// can hold writes back until then (the outbox) does so, and settles what an earlier
    /// run left: up to `completed` it was committed, after it, it is replayed.
    fn checkpointing(&mut self, _completed: Epoch) {}

    /// Recovers to the last complete checkpoint before [`Sink::start`]: drops what was
    /// written after it. On error the sink must be as it was.
    fn restore(&mut self, _state: &NodeState) -> Result<(), OperatorError> {
        Ok(())
    }

    /// Checkpoint `epoch` is complete: what was written before its barrier may be
    /// published (a part renamed into place, an outbox entry released). After the last
    /// snapshot, the engine calls this once more when the pipeline's last checkpoint
    /// is written.
    async fn commit(&mut self, _epoch: Epoch) -> Result<(), OperatorError> {
        Ok(())
    }
}

/// What a transform emits while handling one message. The engine forwards it afterwards.
#[derive(Default)]
pub struct Collector {
    pub(crate) batches: Vec<(usize, RecordBatch)>,
    pub(crate) dropped: Vec<(&'static str, u64)>,
}

impl Collector {
    /// A collector with nothing in it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Emits a batch on the main output.
    pub fn emit(&mut self, batch: RecordBatch) {
        self.emit_to(MAIN_PORT, batch);
    }

    /// Emits a batch on output port number `port` (0 is the main output).
    ///
    /// Rows sent to a side port that nothing consumes are dropped and counted under the
    /// port's drop reason.
    pub fn emit_to(&mut self, port: usize, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.batches.push((port, batch));
        }
    }

    /// Counts rows this operator dropped itself, by reason (e.g. `late`).
    pub fn count_dropped(&mut self, reason: &'static str, rows: u64) {
        if rows > 0 {
            self.dropped.push((reason, rows));
        }
    }

    /// Takes the collected batches, leaving the collector empty. For tests of transforms.
    pub fn take_batches(&mut self) -> Vec<(usize, RecordBatch)> {
        std::mem::take(&mut self.batches)
    }

    /// Takes the counted drops, leaving none. For tests of transforms.
    pub fn take_dropped(&mut self) -> Vec<(&'static str, u64)> {
        std::mem::take(&mut self.dropped)
    }
}

/// Turns rows a source emitted but the engine rejected (their event time is too far in
/// the future) into rows of the source's dead-letter port, given why.
pub type RejectEncoder =
    Box<dyn Fn(&RecordBatch, &str) -> Result<RecordBatch, arrow::error::ArrowError> + Send + Sync>;

/// The reason under which rows further than `max_future` ahead are counted.
pub const FUTURE_EVENT_TIME: &str = "future_event_time";

/// A source's handle on the pipeline: where it sends batches, and how it learns to stop.
pub struct SourceContext {
    pub(crate) outputs: OutputPorts,
    pub(crate) watermarks: Option<WatermarkGenerator>,
    pub(crate) cancel: CancellationToken,
    pub(crate) metrics: OperatorMetrics,
    pub(crate) rejects: Option<(usize, RejectEncoder)>,
    pub(crate) future_logged: bool,
    pub(crate) checkpoint: Option<NodeLink>,
}

impl SourceContext {
    /// Sends a batch on the main output, waiting while downstream is full.
    ///
    /// When the source declares an event-time column, a watermark follows the batch
    /// whenever the batch moves event time forward.
    pub async fn emit(&mut self, batch: RecordBatch) -> Result<(), OperatorError> {
        self.emit_to(crate::operator::MAIN_PORT, batch).await
    }

    /// Sends a batch on output port number `port` (0 is the main output).
    ///
    /// On the main port of a source with an event-time column, rows further than
    /// `max_future` ahead of the wall clock are taken out (see
    /// [`SourceContext::set_rejects`]), and watermarks are sent before and after the
    /// rows so that each row meets the watermark its predecessors imply.
    pub async fn emit_to(&mut self, port: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let observed = match (&mut self.watermarks, port) {
            (Some(generator), MAIN_PORT) => generator.observe(batch, crate::time::wall_clock_ms()),
            _ => return self.outputs.send_batch(port, batch, &self.metrics).await,
        };
        if let Some(future) = observed.future {
            self.reject_future(future).await?;
        }
        for (watermark, run) in observed.runs {
            if let Some(watermark) = watermark {
                self.outputs.send_watermark(watermark).await?;
            }
            self.outputs.send_batch(port, run, &self.metrics).await?;
        }
        if let Some(watermark) = observed.after {
            self.outputs.send_watermark(watermark).await?;
        }
        Ok(())
    }

    /// Holds the source's watermark where it is while `held`: batches then go out
    /// without watermarks. A source reading several files whose time ranges overlap
    /// holds it until the last one, so no file makes another's rows late.
    pub fn hold_watermarks(&mut self, held: bool) {
        if let Some(generator) = &mut self.watermarks {
            generator.held = held;
        }
    }

    /// Starts the source's watermark afresh from the next rows (it never moves back):
    /// for a source that begins another file, whose event times are its own.
    pub fn restart_event_time(&mut self) {
        if let Some(generator) = &mut self.watermarks {
            generator.restart();
        }
    }

    /// Says where rows rejected for their event time go: port number `port`, encoded
    /// by `encoder`. Without this they are counted and dropped.
    pub fn set_rejects(&mut self, port: usize, encoder: RejectEncoder) {
        self.rejects = Some((port, encoder));
    }

    async fn reject_future(&mut self, rows: RecordBatch) -> Result<(), OperatorError> {
        let count = rows.num_rows() as u64;
        self.metrics.rejected(FUTURE_EVENT_TIME, count);
        let max_future = self
            .watermarks
            .as_ref()
            .and_then(|generator| generator.max_future)
            .unwrap_or_default();
        let reason = format!(
            "event time is more than {max_future:?} ahead of the wall clock (event_time.max_future)"
        );
        if !self.future_logged {
            tracing::warn!(
                rows = count,
                "rejected rows whose {reason}; further rejects are counted in weir_operator_rejected_rows_total{{reason=\"{FUTURE_EVENT_TIME}\"}}"
            );
            self.future_logged = true;
        }
        let encoded = match &self.rejects {
            Some((port, encoder)) if self.outputs.is_wired(*port) => {
                Some((*port, encoder(&rows, &reason)?))
            }
            _ => None,
        };
        match encoded {
            Some((port, batch)) => self.outputs.send_batch(port, batch, &self.metrics).await,
            None => {
                self.metrics.dropped(FUTURE_EVENT_TIME, count);
                Ok(())
            }
        }
    }

    /// Whether the pipeline checkpoints: the source then takes barriers.
    pub fn checkpointing(&self) -> bool {
        self.checkpoint.is_some()
    }

    /// The checkpoint the coordinator has started and this source has not yet taken a
    /// barrier for, if any. Sources that loop without waiting ask between batches.
    pub fn barrier_due(&self) -> Option<Epoch> {
        let link = self.checkpoint.as_ref()?;
        let requested = *link.requested.borrow();
        (requested > link.injected).then_some(requested)
    }

    /// Resolves with the next checkpoint to take a barrier for: for sources that wait on
    /// their input in a `select!`. Never resolves while checkpointing is off.
    pub async fn barrier_requested(&self) -> Epoch {
        let Some(link) = self.checkpoint.as_ref() else {
            return std::future::pending().await;
        };
        // A receiver of its own, so the source may wait on this and on being cancelled
        // in one `select!`.
        let mut requested_epochs = link.requested.clone();
        loop {
            let requested = *requested_epochs.borrow_and_update();
            if requested > link.injected {
                return requested;
            }
            if requested_epochs.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Takes checkpoint `epoch`: records `position` (what [`Source::snapshot`] returns)
    /// and sends the barrier after everything emitted so far.
    pub async fn checkpoint(
        &mut self,
        epoch: Epoch,
        position: Option<Vec<u8>>,
    ) -> Result<(), OperatorError> {
        let Some(link) = self.checkpoint.as_mut() else {
            return Ok(());
        };
        link.injected = epoch;
        link.snapshot(
            epoch,
            position.map_or_else(StateChanges::unchanged, StateChanges::whole),
        );
        self.outputs.send_barrier(epoch).await
    }

    /// Asks for a checkpoint before the interval is up: for a source that holds
    /// something back until one completes (MQTT acknowledgements, which a broker's
    /// inflight window limits).
    pub fn request_checkpoint(&self) {
        if let Some(link) = &self.checkpoint {
            link.early.notify_one();
        }
    }

    /// The newest complete checkpoint, changing as they complete: for sources that
    /// commit outside once their input is safe (MQTT acknowledgements).
    pub fn completed_epochs(&self) -> Option<tokio::sync::watch::Receiver<Epoch>> {
        self.checkpoint.as_ref().map(|link| link.completed.clone())
    }

    /// Resolves when the pipeline is shutting down; the source should then return.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// Whether the pipeline is shutting down.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Counts rows the source dropped itself, by reason (e.g. `malformed`).
    pub fn count_dropped(&self, reason: &'static str, rows: u64) {
        self.metrics.dropped(reason, rows);
    }

    /// Counts input the source rejected as malformed, by reason (e.g. `bad_payload`),
    /// whether or not it goes on to a dead-letter output.
    pub fn count_rejected(&self, reason: &'static str, rows: u64) {
        self.metrics.rejected(reason, rows);
    }

    /// Counts an error the source recovered from (it went on running).
    pub fn count_error(&self) {
        self.metrics.errors.inc();
    }

    /// Whether anything consumes output port number `port`.
    pub fn is_wired(&self, port: usize) -> bool {
        self.outputs.is_wired(port)
    }
}
