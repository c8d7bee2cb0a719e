//! The messages that travel on the channels between operators.
//!
//! Data, watermarks and the end of the stream share one channel so that their order is
//! preserved: a watermark always follows the batches it covers.

use arrow::record_batch::RecordBatch;

/// Event-time progress: no row with an event time earlier than this is expected any more.
///
/// Watermarks are milliseconds since the Unix epoch. [`Watermark::END`] is the final
/// watermark that the end of a stream implies: every open window may close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Watermark(pub i64);

impl Watermark {
    /// The watermark before any event time was seen.
    pub const START: Watermark = Watermark(i64::MIN);
    /// The watermark that the end of a stream implies.
    pub const END: Watermark = Watermark(i64::MAX);

    /// Milliseconds since the Unix epoch.
    pub fn millis(self) -> i64 {
        self.0
    }
}

/// One item on a channel between two operators.
#[derive(Clone, Debug)]
pub enum Message {
    /// A batch of rows. Cloning shares the column buffers, so fan-out never copies data.
    Batch(RecordBatch),
    /// Event time has advanced to this point on this channel.
    Watermark(Watermark),
    /// The producer's inputs have all gone idle (`true`: its watermark now moves on the
    /// wall clock and must not hold back other inputs of a consumer), or data flows
    /// again (`false`). As Flink's watermark status, it carries `idle_timeout` past
    /// the operators between a source and a fan-in.
    Idle(bool),
    /// A checkpoint barrier: everything before it on this channel belongs to checkpoint
    /// `epoch`, everything after it to later ones. A consumer with several inputs
    /// aligns them: it reads no further on an input that delivered the barrier until
    /// every input has.
    Barrier(u64),
    /// The producer has finished; nothing follows.
    EndOfStream,
}
