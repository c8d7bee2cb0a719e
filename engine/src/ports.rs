//! The ends of the channels between operators: output ports that fan a batch out to
//! every consumer without copying it, the input merger that fans several inputs in and
//! tracks the minimum watermark, and the watermark generator for sources.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow::record_batch::RecordBatch;
use prometheus::IntGauge;
use tokio::sync::mpsc;

use crate::error::OperatorError;
use crate::message::{Message, Watermark};
use crate::metrics::OperatorMetrics;
use crate::observe::StreamView;
use crate::time::{duration_ms, max_event_time_ms};

/// Rows sent to a main port that nothing consumes are counted under this reason.
const UNCONSUMED: &str = "unconsumed";

/// One output port and the channels of its consumers.
pub(crate) struct OutputPort {
    pub(crate) edges: Vec<mpsc::Sender<Message>>,
    pub(crate) unwired_drop_reason: Option<&'static str>,
    /// Retention and taps; on the main port of every node that has one.
    pub(crate) view: Option<Arc<StreamView>>,
}

/// All output ports of one operator, main port first.
pub(crate) struct OutputPorts {
    pub(crate) ports: Vec<OutputPort>,
}

impl OutputPorts {
    pub(crate) fn is_wired(&self, port: usize) -> bool {
        self.ports.get(port).is_some_and(|p| !p.edges.is_empty())
    }

    fn all_closed(&self) -> bool {
        self.ports.iter().all(|p| p.edges.is_empty())
    }

    /// Sends a batch to every consumer of `port`, waiting while any of them is full.
    ///
    /// Consumers that have gone away are forgotten. When no consumer is left anywhere,
    /// returns [`OperatorError::DownstreamClosed`] so the producer stops.
    pub(crate) async fn send_batch(
        &mut self,
        port: usize,
        batch: RecordBatch,
        metrics: &OperatorMetrics,
    ) -> Result<(), OperatorError> {
        let rows = batch.num_rows() as u64;
        let Some(out) = self.ports.get_mut(port) else {
            return Err(OperatorError::Internal(format!(
                "operator emitted on output port {port}, which it did not declare"
            )));
        };
        let retained = out.view.as_ref().is_some_and(|view| {
            view.observe(&batch);
            view.is_retained()
        });
        if out.edges.is_empty() {
            if retained {
                metrics.rows_out.inc_by(rows);
                metrics.batches_out.inc();
            } else {
                metrics.dropped(out.unwired_drop_reason.unwrap_or(UNCONSUMED), rows);
            }
            return Ok(());
        }
        metrics.rows_out.inc_by(rows);
        metrics.batches_out.inc();
        let mut closed = false;
        for edge in &out.edges {
            // Cloning a batch clones the Arcs of its columns, never the data.
            if edge.send(Message::Batch(batch.clone())).await.is_err() {
                closed = true;
            }
        }
        if closed {
            out.edges.retain(|edge| !edge.is_closed());
            if self.all_closed() {
                return Err(OperatorError::DownstreamClosed);
            }
        }
        Ok(())
    }

    /// Sends a watermark on every port.
    pub(crate) async fn send_watermark(
        &mut self,
        watermark: Watermark,
    ) -> Result<(), OperatorError> {
        self.broadcast(Message::Watermark(watermark)).await
    }

    /// Tells every consumer that nothing follows. Consumers that have gone are ignored.
    pub(crate) async fn send_end(&mut self) {
        let _ = self.broadcast(Message::EndOfStream).await;
    }

    async fn broadcast(&mut self, message: Message) -> Result<(), OperatorError> {
        let mut closed = false;
        for out in &self.ports {
            for edge in &out.edges {
                if edge.send(message.clone()).await.is_err() {
                    closed = true;
                }
            }
        }
        if closed {
            for out in &mut self.ports {
                out.edges.retain(|edge| !edge.is_closed());
            }
            if self.all_closed() {
                return Err(OperatorError::DownstreamClosed);
            }
        }
        Ok(())
    }
}

impl Drop for OutputPorts {
    /// However the node stops (its end of stream, a failure, a panic, an abort), its taps
    /// end with it rather than wait for batches that will never come.
    fn drop(&mut self) {
        for view in self.ports.iter().filter_map(|port| port.view.as_ref()) {
            view.end();
        }
    }
}

/// Derives a source's watermarks from its event-time column: the greatest event time
/// seen so far minus the allowed out-of-orderness.
pub(crate) struct WatermarkGenerator {
    column: usize,
    max_out_of_order_ms: i64,
    max_seen: Option<i64>,
    emitted: Watermark,
}

impl WatermarkGenerator {
    pub(crate) fn new(column: usize, max_out_of_order: std::time::Duration) -> Self {
        WatermarkGenerator {
            column,
            max_out_of_order_ms: duration_ms(max_out_of_order),
            max_seen: None,
            emitted: Watermark::START,
        }
    }

    /// Looks at a batch about to be sent; returns the watermark to send after it, if
    /// event time moved forward.
    pub(crate) fn observe(&mut self, batch: &RecordBatch) -> Option<Watermark> {
        let newest = max_event_time_ms(batch.columns().get(self.column)?)?;
        if self.max_seen.is_some_and(|seen| seen >= newest) {
            return None;
        }
        self.max_seen = Some(newest);
        let watermark = Watermark(newest.saturating_sub(self.max_out_of_order_ms));
        (watermark > self.emitted).then(|| {
            self.emitted = watermark;
            watermark
        })
    }
}

/// What an operator receives next from its merged inputs.
#[derive(Debug)]
pub(crate) enum InputEvent {
    /// A batch from input number `.0`.
    Batch(usize, RecordBatch),
    /// The minimum watermark over all inputs advanced.
    Watermark(Watermark),
    /// Every input has ended.
    End,
}

/// One input channel and what the merger knows of it.
pub(crate) struct InputChannel {
    pub(crate) receiver: mpsc::Receiver<Message>,
    pub(crate) depth: IntGauge,
    watermark: Watermark,
    ended: bool,
}

impl InputChannel {
    pub(crate) fn new(receiver: mpsc::Receiver<Message>, depth: IntGauge) -> Self {
        InputChannel {
            receiver,
            depth,
            watermark: Watermark::START,
            ended: false,
        }
    }
}

/// Fans several inputs into one sequence of events, taking the minimum watermark.
pub(crate) struct InputMerger {
    inputs: Vec<InputChannel>,
    open: usize,
    next_poll: usize,
    current: Watermark,
}

impl InputMerger {
    pub(crate) fn new(inputs: Vec<InputChannel>) -> Self {
        let open = inputs.len();
        InputMerger {
            inputs,
            open,
            next_poll: 0,
            current: Watermark::START,
        }
    }

    /// The next batch, watermark advance or the end of all inputs.
    pub(crate) async fn next(&mut self) -> InputEvent {
        loop {
            if self.open == 0 {
                return InputEvent::End;
            }
            let (index, message) = poll_fn(|cx| self.poll_any(cx)).await;
            match message {
                Some(Message::Batch(batch)) => return InputEvent::Batch(index, batch),
                Some(Message::Watermark(watermark)) => {
                    let input = &mut self.inputs[index];
                    input.watermark = input.watermark.max(watermark);
                }
                // A channel that closes without an end-of-stream belongs to a producer
                // that failed; the supervisor reports that, and here it ends the input.
                Some(Message::EndOfStream) | None => {
                    let input = &mut self.inputs[index];
                    input.ended = true;
                    input.watermark = Watermark::END;
                    input.depth.set(0);
                    self.open -= 1;
                    if self.open == 0 {
                        return InputEvent::End;
                    }
                }
            }
            let minimum = self
                .inputs
                .iter()
                .map(|input| input.watermark)
                .min()
                .unwrap_or(Watermark::END);
            if minimum > self.current {
                self.current = minimum;
                return InputEvent::Watermark(minimum);
            }
        }
    }

    /// Polls the open inputs round-robin so that a busy input cannot starve the others.
    fn poll_any(&mut self, cx: &mut Context<'_>) -> Poll<(usize, Option<Message>)> {
        let count = self.inputs.len();
        for offset in 0..count {
            let index = (self.next_poll + offset) % count;
            let input = &mut self.inputs[index];
            if input.ended {
                continue;
            }
            if let Poll::Ready(message) = input.receiver.poll_recv(cx) {
                input.depth.set(input.receiver.len() as i64);
                self.next_poll = (index + 1) % count;
                return Poll::Ready((index, message));
            }
        }
        Poll::Pending
    }
}
