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

    /// Every input has ended (after the final watermark). Emit what is left.
    async fn on_close(&mut self, _out: &mut Collector) -> Result<(), OperatorError> {
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

/// A source's handle on the pipeline: where it sends batches, and how it learns to stop.
pub struct SourceContext {
    pub(crate) outputs: OutputPorts,
    pub(crate) watermarks: Option<WatermarkGenerator>,
    pub(crate) cancel: CancellationToken,
    pub(crate) metrics: OperatorMetrics,
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
    pub async fn emit_to(&mut self, port: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let watermark = match (&mut self.watermarks, port) {
            (Some(generator), MAIN_PORT) => generator.observe(&batch),
            _ => None,
        };
        self.outputs.send_batch(port, batch, &self.metrics).await?;
        if let Some(watermark) = watermark {
            self.outputs.send_watermark(watermark).await?;
        }
        Ok(())
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
