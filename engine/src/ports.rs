//! The ends of the channels between operators: output ports that fan a batch out to
//! every consumer without copying it, the input merger that fans several inputs in and
//! tracks the minimum watermark, and the watermark generator for sources.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arrow::array::{Array, AsArray, BooleanArray, Int64Array};
use arrow::compute::kernels::boolean::not;
use arrow::compute::{filter, filter_record_batch, prep_null_mask_filter};
use arrow::datatypes::Int64Type;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use prometheus::IntGauge;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::OperatorError;
use crate::message::{Message, Watermark};
use crate::metrics::OperatorMetrics;
use crate::observe::StreamView;
use crate::partition::KeyRouter;
use crate::time::{EventTimeSpec, duration_ms, event_times_ms};

/// Rows sent to a main port that nothing consumes are counted under this reason.
const UNCONSUMED: &str = "unconsumed";

/// The channel, or channels, from one output port to one consumer.
pub(crate) enum Edge {
    /// To a consumer that runs as one instance: every batch goes down the channel.
    Direct(mpsc::Sender<Message>),
    /// To a consumer that runs as several instances, one channel each: each row goes to
    /// the instance its key routes it to, and everything else to all of them.
    Partitioned(KeyRouter, Vec<mpsc::Sender<Message>>),
}

impl Edge {
    /// Whether the consumer has gone. A partitioned consumer has gone as a whole when
    /// any instance has: the rows routed to that one could go nowhere else.
    fn is_closed(&self) -> bool {
        match self {
            Edge::Direct(sender) => sender.is_closed(),
            Edge::Partitioned(_, senders) => senders.iter().any(mpsc::Sender::is_closed),
        }
    }

    /// Sends `message` down every channel of the edge; false when the consumer has gone.
    async fn send_all(&self, message: &Message) -> bool {
        match self {
            Edge::Direct(sender) => sender.send(message.clone()).await.is_ok(),
            Edge::Partitioned(_, senders) => {
                let mut delivered = true;
                for sender in senders {
                    delivered &= sender.send(message.clone()).await.is_ok();
                }
                delivered
            }
        }
    }

    /// Sends `batch` to the consumer, split by key over a partitioned one's instances;
    /// false when the consumer has gone.
    async fn send_batch(&self, batch: &RecordBatch) -> Result<bool, OperatorError> {
        match self {
            // Cloning a batch clones the Arcs of its columns, never the data.
            Edge::Direct(sender) => Ok(sender.send(Message::Batch(batch.clone())).await.is_ok()),
            Edge::Partitioned(router, senders) => {
                let parts = router.split(batch).map_err(|error| {
                    OperatorError::Internal(format!("cannot partition a batch: {error}"))
                })?;
                let mut delivered = true;
                for (sender, part) in senders.iter().zip(parts) {
                    if let Some(part) = part {
                        delivered &= sender.send(Message::Batch(part)).await.is_ok();
                    }
                }
                Ok(delivered)
            }
        }
    }
}

/// One output port and the channels of its consumers.
pub(crate) struct OutputPort {
    pub(crate) edges: Vec<Edge>,
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
            if !edge.send_batch(&batch).await? {
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

    /// Tells every consumer that this operator's inputs went idle, or are active again.
    pub(crate) async fn send_idle(&mut self, idle: bool) -> Result<(), OperatorError> {
        self.broadcast(Message::Idle(idle)).await
    }

    /// Passes checkpoint barrier `epoch` on to every consumer.
    pub(crate) async fn send_barrier(&mut self, epoch: u64) -> Result<(), OperatorError> {
        self.broadcast(Message::Barrier(epoch)).await
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
                if !edge.send_all(&message).await {
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
///
/// Lateness downstream is judged against the watermark a row meets, so a watermark
/// only after each batch would make results depend on how rows were cut into batches:
/// rows of one batch would never be late to each other. The generator therefore cuts a
/// batch before every row that is behind the watermark its predecessors imply, and
/// sends that watermark first. A row at or ahead of the watermark cannot be late in any
/// window (its window ends after it), so only those rows need a cut, and every row
/// meets exactly the watermark it would meet if each row were its own batch. In-order
/// input is never cut.
pub(crate) struct WatermarkGenerator {
    column: usize,
    max_out_of_order_ms: i64,
    /// `event_time.max_future`.
    pub(crate) max_future: Option<Duration>,
    max_seen: Option<i64>,
    emitted: Watermark,
    /// While held, batches pass without watermarks (see [`SourceContext::hold_watermarks`]).
    ///
    /// [`SourceContext::hold_watermarks`]: crate::SourceContext::hold_watermarks
    pub(crate) held: bool,
}

/// A batch as the generator sends it: runs of rows, each after the watermark it must
/// follow, then the watermark that covers the whole batch.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    /// Rows in arrival order, each run preceded by a watermark to send before it.
    pub(crate) runs: Vec<(Option<Watermark>, RecordBatch)>,
    /// The watermark to send after the last run.
    pub(crate) after: Option<Watermark>,
    /// Rows whose event time is further than `max_future` past the wall clock.
    pub(crate) future: Option<RecordBatch>,
}

impl WatermarkGenerator {
    pub(crate) fn new(spec: &EventTimeSpec, column: usize) -> Self {
        WatermarkGenerator {
            column,
            max_out_of_order_ms: duration_ms(spec.max_out_of_order),
            max_future: spec.max_future,
            max_seen: None,
            emitted: Watermark::START,
            held: false,
        }
    }

    /// Forgets the event times seen so far: the next rows start a new watermark, which
    /// only ever moves the emitted one forward.
    pub(crate) fn restart(&mut self) {
        self.max_seen = None;
    }

    /// Looks at a batch about to be sent, with the wall clock at `now_ms`, and says
    /// how to send it.
    pub(crate) fn observe(&mut self, batch: RecordBatch, now_ms: i64) -> Observed {
        let Some(times) = batch.columns().get(self.column).and_then(event_times_ms) else {
            return Observed {
                runs: vec![(None, batch)],
                ..Observed::default()
            };
        };
        let (batch, times, future) = match self.max_future {
            Some(max_future) => {
                let limit = now_ms.saturating_add(duration_ms(max_future));
                match split_future(&batch, &times, limit) {
                    Ok(split) => split,
                    // The kernels fail only on arrays of different lengths, which one
                    // batch cannot hold; keep every row rather than lose one.
                    Err(_) => (batch, times, None),
                }
            }
            None => (batch, times, None),
        };
        if self.held {
            return Observed {
                runs: vec![(None, batch)],
                after: None,
                future,
            };
        }
        let mut runs = Vec::new();
        let mut run_start = 0;
        let mut pending = None;
        for (row, time) in times.iter().enumerate() {
            let Some(time) = time else { continue };
            if let Some(seen) = self.max_seen {
                let before = Watermark(seen.saturating_sub(self.max_out_of_order_ms));
                if time < before.millis() && before > self.emitted {
                    if row > run_start {
                        runs.push((pending.take(), batch.slice(run_start, row - run_start)));
                    }
                    run_start = row;
                    pending = Some(before);
                    self.emitted = before;
                }
            }
            if self.max_seen.is_none_or(|seen| time > seen) {
                self.max_seen = Some(time);
            }
        }
        if batch.num_rows() > run_start || pending.is_some() {
            runs.push((
                pending,
                batch.slice(run_start, batch.num_rows() - run_start),
            ));
        }
        let after = self.max_seen.and_then(|seen| {
            let watermark = Watermark(seen.saturating_sub(self.max_out_of_order_ms));
            (watermark > self.emitted).then(|| {
                self.emitted = watermark;
                watermark
            })
        });
        Observed {
            runs,
            after,
            future,
        }
    }
}

/// Splits off the rows of `batch` whose event time is past `limit`. Rows without an
/// event time stay.
fn split_future(
    batch: &RecordBatch,
    times: &Int64Array,
    limit: i64,
) -> Result<(RecordBatch, Int64Array, Option<RecordBatch>), ArrowError> {
    let ahead = BooleanArray::from_unary(times, |t| t > limit);
    // Rows without an event time are not ahead: their null becomes false.
    let ahead = match ahead.nulls() {
        Some(_) => prep_null_mask_filter(&ahead),
        None => ahead,
    };
    if ahead.true_count() == 0 {
        return Ok((batch.clone(), times.clone(), None));
    }
    let keep = not(&ahead)?;
    let kept_times = filter(times, &keep)?.as_primitive::<Int64Type>().clone();
    Ok((
        filter_record_batch(batch, &keep)?,
        kept_times,
        Some(filter_record_batch(batch, &ahead)?),
    ))
}

/// What an operator receives next from its merged inputs.
#[derive(Debug)]
pub(crate) enum InputEvent {
    /// A batch from input number `.0`.
    Batch(usize, RecordBatch),
    /// The minimum watermark over all inputs advanced.
    Watermark(Watermark),
    /// Every open input went idle (`true`), or one is active again (`false`).
    Idle(bool),
    /// Every open input has delivered checkpoint barrier `.0`: what came before it on
    /// all of them has been returned, and nothing after it yet.
    Barrier(u64),
    /// Every input has ended.
    End,
}

/// One input channel and what the merger knows of it.
pub(crate) struct InputChannel {
    pub(crate) receiver: mpsc::Receiver<Message>,
    pub(crate) depth: IntGauge,
    watermark: Watermark,
    ended: bool,
    /// The producer's `event_time.idle_timeout`, for channels straight from a source.
    idle_timeout: Option<Duration>,
    last_batch: Instant,
    /// The producer said its own inputs are idle ([`Message::Idle`]); its watermark
    /// then already advances on the wall clock.
    marked_idle: bool,
    /// The checkpoint barrier this input delivered, while the others catch up to it;
    /// the input is not read meanwhile.
    barrier: Option<u64>,
    /// Which of the node's declared inputs this channel carries: one declared input
    /// reads one channel per instance of a partitioned producer.
    input: usize,
}

impl InputChannel {
    pub(crate) fn new(
        receiver: mpsc::Receiver<Message>,
        depth: IntGauge,
        idle_timeout: Option<Duration>,
    ) -> Self {
        InputChannel {
            receiver,
            depth,
            watermark: Watermark::START,
            ended: false,
            idle_timeout,
            last_batch: Instant::now(),
            marked_idle: false,
            barrier: None,
            input: 0,
        }
    }

    /// Marks the channel as carrying the node's declared input number `input`.
    pub(crate) fn for_input(mut self, input: usize) -> Self {
        self.input = input;
        self
    }

    /// How long the input has been idle at `now`, if it has been quiet for longer than
    /// its idle timeout.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        let quiet = now.saturating_duration_since(self.last_batch);
        self.idle_timeout
            .filter(|timeout| !self.ended && quiet >= *timeout)
            .map(|_| quiet)
    }

    /// How far past its last watermark the input's event time has moved while idle, if
    /// it is idle: by its own timeout, or because its producer said so (and advances
    /// the watermark itself).
    fn idle_advance(&self, now: Option<Instant>) -> Option<i64> {
        if self.ended {
            return None;
        }
        if self.marked_idle {
            return Some(0);
        }
        now.and_then(|now| self.idle_for(now)).map(duration_ms)
    }

    /// When the merger must look at this input again without a message: when it turns
    /// idle, and then regularly while its watermark advances on the wall clock.
    fn next_idle_check(&self, now: Instant) -> Option<Instant> {
        let timeout = self.idle_timeout.filter(|_| !self.ended)?;
        Some(match self.idle_for(now) {
            None => self.last_batch + timeout,
            Some(_) => now + (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        })
    }
}

/// Fans several inputs into one sequence of events, taking the minimum watermark.
///
/// An input straight from a source with `event_time.idle_timeout` that has sent no
/// rows for that long is idle: it stops holding the others back (the minimum is taken
/// over the inputs that are not idle), and when every open input is idle the watermark
/// advances with the wall clock from each one's last watermark, as if event time went
/// on passing while nothing was said. An input whose producer reports itself idle
/// ([`Message::Idle`]) counts as idle too, so idleness reaches a fan-in through the
/// operators in between; the merger reports its own idleness the same way.
pub(crate) struct InputMerger {
    inputs: Vec<InputChannel>,
    open: usize,
    next_poll: usize,
    current: Watermark,
    /// Whether every open input was idle when last looked at.
    idle: bool,
    /// Whether something besides data arrived (or the clock was due) since barriers,
    /// watermarks and idleness were last looked at: a plain batch changes none of them,
    /// so the common path does not look.
    changed: bool,
    /// Whether any input has an idle timeout, and so the merger reads the clock.
    watches_idleness: bool,
}

impl InputMerger {
    pub(crate) fn new(inputs: Vec<InputChannel>) -> Self {
        let open = inputs.len();
        InputMerger {
            watches_idleness: inputs.iter().any(|input| input.idle_timeout.is_some()),
            inputs,
            open,
            next_poll: 0,
            current: Watermark::START,
            idle: false,
            changed: false,
        }
    }

    /// The next batch, watermark advance or the end of all inputs.
    pub(crate) async fn next(&mut self) -> InputEvent {
        loop {
            if self.open == 0 {
                return InputEvent::End;
            }
            if std::mem::take(&mut self.changed)
                && let Some(event) = self.pending_event()
            {
                return event;
            }
            // Only inputs straight from a source with an idle timeout need the clock.
            let check = self.watches_idleness.then(Instant::now).and_then(|now| {
                self.inputs
                    .iter()
                    .filter_map(|input| input.next_idle_check(now))
                    .min()
            });
            let polled = match check {
                None => Some(poll_fn(|cx| self.poll_any(cx)).await),
                Some(at) => tokio::select! {
                    biased;
                    polled = poll_fn(|cx| self.poll_any(cx)) => Some(polled),
                    () = tokio::time::sleep_until(at) => None,
                },
            };
            if let Some((index, message)) = polled {
                match message {
                    Some(Message::Batch(batch)) => {
                        let input = &mut self.inputs[index];
                        if self.watches_idleness {
                            input.last_batch = Instant::now();
                        }
                        // Data ends idleness, the producer's or (with a timeout) our own.
                        let was_idle = std::mem::replace(&mut input.marked_idle, false);
                        self.changed |= was_idle || self.watches_idleness;
                        return InputEvent::Batch(input.input, batch);
                    }
                    Some(Message::Watermark(watermark)) => {
                        let input = &mut self.inputs[index];
                        input.watermark = input.watermark.max(watermark);
                    }
                    Some(Message::Idle(idle)) => self.inputs[index].marked_idle = idle,
                    Some(Message::Barrier(epoch)) => self.inputs[index].barrier = Some(epoch),
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
            }
            // Anything but a batch, or the clock coming due, may have moved them.
            self.changed = true;
        }
    }

    /// The barrier, watermark or idleness change that the inputs' state now implies and
    /// that has not been reported; the merger is marked changed again after one, so the
    /// next call looks for another.
    fn pending_event(&mut self) -> Option<InputEvent> {
        self.changed = true;
        if let Some(epoch) = self.aligned_barrier() {
            for input in &mut self.inputs {
                input.barrier = None;
                // Time spent held at the barrier is not silence.
                if self.watches_idleness {
                    input.last_batch = Instant::now();
                }
            }
            return Some(InputEvent::Barrier(epoch));
        }
        let (minimum, idle) = self.combined();
        if minimum > self.current {
            self.current = minimum;
            return Some(InputEvent::Watermark(minimum));
        }
        if idle != self.idle {
            self.idle = idle;
            return Some(InputEvent::Idle(idle));
        }
        self.changed = false;
        None
    }

    /// The checkpoint barrier every open input has delivered, if they all have. An
    /// input that ended counts as aligned: nothing more of it can come before the
    /// barrier. Sources inject barriers in the same order, so inputs held at one can
    /// only be waiting for the same epoch.
    fn aligned_barrier(&self) -> Option<u64> {
        let mut epoch = None;
        for input in self.inputs.iter().filter(|input| !input.ended) {
            epoch = Some(input.barrier?);
        }
        epoch
    }

    /// The watermark over all inputs now, and whether every open input is idle.
    fn combined(&self) -> (Watermark, bool) {
        let now = self.watches_idleness.then(Instant::now);
        let mut active: Option<Watermark> = None;
        let mut idle: Option<Watermark> = None;
        // Ended inputs count as active at END, so they never hold anything back; idle
        // inputs count only when no open input is active.
        let mut open_active = false;
        for input in &self.inputs {
            match input.idle_advance(now) {
                Some(quiet) => {
                    let advanced = Watermark(input.watermark.millis().saturating_add(quiet));
                    idle = Some(idle.map_or(advanced, |other| other.min(advanced)));
                }
                None => {
                    open_active |= !input.ended;
                    active =
                        Some(active.map_or(input.watermark, |other| other.min(input.watermark)));
                }
            }
        }
        let watermark = match (open_active, active, idle) {
            (true, Some(active), _) => active,
            (_, _, Some(idle)) => idle,
            (_, Some(active), None) => active,
            _ => Watermark::END,
        };
        (watermark, !open_active && idle.is_some())
    }

    /// Polls the open inputs round-robin so that a busy input cannot starve the others.
    fn poll_any(&mut self, cx: &mut Context<'_>) -> Poll<(usize, Option<Message>)> {
        let count = self.inputs.len();
        for offset in 0..count {
            let index = (self.next_poll + offset) % count;
            let input = &mut self.inputs[index];
            // An input held at a barrier is read again once the others reach it.
            if input.ended || input.barrier.is_some() {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array};

    use super::*;

    fn batch(value: i64) -> RecordBatch {
        let column: ArrayRef = Arc::new(Int64Array::from(vec![value]));
        RecordBatch::try_from_iter([("v", column)]).unwrap()
    }

    fn merger(inputs: usize) -> (Vec<mpsc::Sender<Message>>, InputMerger) {
        let (senders, channels) = (0..inputs)
            .map(|input| {
                let (tx, rx) = mpsc::channel(16);
                let depth = IntGauge::new("depth", "test").unwrap();
                (tx, InputChannel::new(rx, depth, None).for_input(input))
            })
            .unzip();
        (senders, InputMerger::new(channels))
    }

    /// The events up to and including the next barrier or end, as short strings.
    async fn until_barrier(merger: &mut InputMerger) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let event = merger.next().await;
            let last = matches!(event, InputEvent::Barrier(_) | InputEvent::End);
            seen.push(match event {
                InputEvent::Batch(input, batch) => {
                    let value = batch.column(0).as_any().downcast_ref::<Int64Array>();
                    format!("{input}:{}", value.unwrap().value(0))
                }
                InputEvent::Watermark(watermark) => format!("wm {}", watermark.millis()),
                InputEvent::Idle(idle) => format!("idle {idle}"),
                InputEvent::Barrier(epoch) => format!("barrier {epoch}"),
                InputEvent::End => "end".into(),
            });
            if last {
                return seen;
            }
        }
    }

    #[tokio::test]
    async fn a_barrier_is_passed_once_every_input_delivered_it_and_holds_what_follows() {
        let (inputs, mut merger) = merger(2);
        // Input 0 reaches the barrier first and goes on; input 1 is behind.
        for message in [
            Message::Batch(batch(1)),
            Message::Barrier(7),
            Message::Batch(batch(2)),
        ] {
            inputs[0].send(message).await.unwrap();
        }
        for message in [
            Message::Batch(batch(10)),
            Message::Batch(batch(11)),
            Message::Barrier(7),
            Message::Batch(batch(12)),
        ] {
            inputs[1].send(message).await.unwrap();
        }
        let mut before = until_barrier(&mut merger).await;
        assert_eq!(before.pop().as_deref(), Some("barrier 7"));
        // Everything before the barrier on both inputs, and nothing after it.
        before.sort();
        assert_eq!(before, ["0:1", "1:10", "1:11"]);
        drop(inputs);
        let mut after = until_barrier(&mut merger).await;
        assert_eq!(after.pop().as_deref(), Some("end"));
        after.sort();
        assert_eq!(after, ["0:2", "1:12"]);
    }

    #[tokio::test]
    async fn an_input_that_ended_does_not_hold_a_barrier_back() {
        let (inputs, mut merger) = merger(2);
        inputs[0].send(Message::Barrier(1)).await.unwrap();
        inputs[1].send(Message::Batch(batch(5))).await.unwrap();
        inputs[1].send(Message::EndOfStream).await.unwrap();
        assert_eq!(until_barrier(&mut merger).await, ["1:5", "barrier 1"]);
    }
}
