//! Event time: declarations of event-time columns and windows, and the kernels that
//! read event times out of Arrow columns.
//!
//! Internally event time is milliseconds since the Unix epoch, whatever the unit of the
//! column it came from, so watermarks and window bounds compare without conversions.

use std::time::Duration;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array};
use arrow::compute::kernels::aggregate::max;
use arrow::datatypes::{
    DataType, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType,
};

/// Milliseconds since the Unix epoch by the wall clock: 0 before it, `i64::MAX` past
/// what an `i64` holds.
pub fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

/// A stream's event-time column, how far out of order its rows may arrive, and how its
/// watermark treats rows from the future and quiet periods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventTimeSpec {
    /// The column holding each row's event time. It must be a timestamp column.
    pub column: String,
    /// How far behind the newest event time a row may still arrive without being late.
    pub max_out_of_order: Duration,
    /// How far past the wall clock a row's event time may be. Rows further ahead are
    /// rejected (counted, and sent to the source's `dead_letter` port when it has one)
    /// and never move the watermark. `None` accepts any time.
    pub max_future: Option<Duration>,
    /// After this long without a row, the source stops holding the watermark back: its
    /// watermark advances with the wall clock from the last one, so the last window
    /// closes without a later reading. `None` waits for data forever.
    pub idle_timeout: Option<Duration>,
}

/// How a windowed operator groups rows by event time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowSpec {
    /// Fixed-size, non-overlapping windows.
    Tumbling {
        /// The window length.
        size: Duration,
    },
    /// Fixed-size windows that start every `slide`; a row falls into `size / slide` windows.
    Hopping {
        /// The window length.
        size: Duration,
        /// The distance between the starts of consecutive windows.
        slide: Duration,
    },
}

impl WindowSpec {
    /// The window length in milliseconds.
    pub fn size_ms(&self) -> i64 {
        match self {
            WindowSpec::Tumbling { size } | WindowSpec::Hopping { size, .. } => duration_ms(*size),
        }
    }

    /// The distance between window starts in milliseconds (the size, for tumbling windows).
    pub fn slide_ms(&self) -> i64 {
        match self {
            WindowSpec::Tumbling { size } => duration_ms(*size),
            WindowSpec::Hopping { slide, .. } => duration_ms(*slide),
        }
    }
}

/// A duration in whole milliseconds, saturating at `i64::MAX`.
pub fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Whether a column of this type can serve as an event-time column.
pub fn is_event_time_type(data_type: &DataType) -> bool {
    matches!(data_type, DataType::Timestamp(_, _))
}

/// The event times of a timestamp column as milliseconds since the epoch (floored).
///
/// Returns `None` when the column is not a timestamp column.
pub fn event_times_ms(column: &ArrayRef) -> Option<Int64Array> {
    let DataType::Timestamp(unit, _) = column.data_type() else {
        return None;
    };
    let millis = match unit {
        TimeUnit::Second => column
            .as_primitive::<TimestampSecondType>()
            .unary(|s| s.saturating_mul(1000)),
        TimeUnit::Millisecond => column
            .as_primitive::<TimestampMillisecondType>()
            .reinterpret_cast(),
        TimeUnit::Microsecond => column
            .as_primitive::<TimestampMicrosecondType>()
            .unary(|us| us.div_euclid(1000)),
        TimeUnit::Nanosecond => column
            .as_primitive::<TimestampNanosecondType>()
            .unary(|ns| ns.div_euclid(1_000_000)),
    };
    Some(millis)
}

/// The greatest event time in a timestamp column, in milliseconds, ignoring nulls.
pub fn max_event_time_ms(column: &ArrayRef) -> Option<i64> {
    if column.null_count() == column.len() {
        return None;
    }
    event_times_ms(column).and_then(|millis| max(&millis))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{TimestampMillisecondArray, TimestampNanosecondArray};

    use super::*;

    #[test]
    fn max_event_time_reads_every_unit_as_millis() {
        let ms: ArrayRef = Arc::new(TimestampMillisecondArray::from(vec![
            Some(5),
            None,
            Some(9),
        ]));
        assert_eq!(max_event_time_ms(&ms), Some(9));
        let ns: ArrayRef = Arc::new(TimestampNanosecondArray::from(vec![1_999_999, -1]));
        assert_eq!(event_times_ms(&ns).unwrap().values().to_vec(), vec![1, -1]);
        let nulls: ArrayRef = Arc::new(TimestampMillisecondArray::from(vec![None, None]));
        assert_eq!(max_event_time_ms(&nulls), None);
    }

    #[test]
    fn hopping_window_reports_size_and_slide() {
        let w = WindowSpec::Hopping {
            size: Duration::from_secs(60),
            slide: Duration::from_secs(10),
        };
        assert_eq!((w.size_ms(), w.slide_ms()), (60_000, 10_000));
    }
}
