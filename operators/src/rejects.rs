//! What operators do with input they reject as malformed, in one place: the `dead_letter`
//! side port that sources offer, and logging that names the first few rejects one by one
//! and then summarises the rest periodically, so a stream of bad input cannot flood the
//! log while a single bad record is still easy to find.

use std::fmt::Display;
use std::time::Duration;

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt64Array, new_null_array};
use arrow::datatypes::{DataType, SchemaRef};
use tokio::time::Instant;
use tracing::warn;
use weir_engine::RejectEncoder;
use weir_engine::registry::{MAIN_PORT_NAME, OutputSpec, StreamInfo};

/// The name of the port that carries malformed input.
pub const DEAD_LETTER_PORT_NAME: &str = "dead_letter";

/// The index of the dead-letter port (the main port is 0).
pub const DEAD_LETTER_PORT: usize = 1;

/// The drop reason of malformed input when nothing reads the dead-letter port.
const UNWIRED_REASON: &str = "malformed";

/// How many rejects are logged one by one before the log switches to summaries.
const LOGGED_INDIVIDUALLY: u64 = 10;

/// How often a summary of further rejects is logged.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// The outputs of a source with a dead-letter port: `main`, then `dead_letter` with
/// `dead_letter_schema`.
pub fn outputs_with_dead_letter(
    main: StreamInfo,
    dead_letter_schema: SchemaRef,
) -> Vec<OutputSpec> {
    vec![
        OutputSpec {
            name: MAIN_PORT_NAME.to_owned(),
            stream: main,
            unwired_drop_reason: None,
        },
        OutputSpec {
            name: DEAD_LETTER_PORT_NAME.to_owned(),
            stream: StreamInfo {
                schema: dead_letter_schema,
                event_time: None,
            },
            unwired_drop_reason: Some(UNWIRED_REASON),
        },
    ]
}

/// Encodes rows that the engine rejected for their event time (`event_time.max_future`)
/// as rows of a source's dead-letter port: `error` says why, the text column (`raw` or
/// `payload`) holds the row as a JSON object, and any other column is left empty, as
/// the row no longer knows the line or message it came from.
pub fn rows_as_dead_letters(dead_letter: SchemaRef) -> RejectEncoder {
    Box::new(move |rows: &RecordBatch, reason: &str| {
        let lines = rows_as_json(rows)?;
        let count = rows.num_rows();
        let columns: Vec<ArrayRef> = dead_letter
            .fields()
            .iter()
            .map(|field| -> ArrayRef {
                match (field.name().as_str(), field.data_type()) {
                    ("error", _) => Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                        reason, count,
                    ))),
                    ("raw" | "payload", _) => Arc::new(StringArray::from_iter_values(
                        (0..count).map(|row| lines.get(row).map_or("", String::as_str)),
                    )),
                    (_, DataType::UInt64) => Arc::new(UInt64Array::from(vec![0; count])),
                    _ if field.is_nullable() => new_null_array(field.data_type(), count),
                    _ => Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                        "", count,
                    ))),
                }
            })
            .collect();
        RecordBatch::try_new(Arc::clone(&dead_letter), columns)
    })
}

/// Each row of `rows` as one JSON object.
pub fn rows_as_json(rows: &RecordBatch) -> Result<Vec<String>, arrow::error::ArrowError> {
    let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
    writer.write(rows)?;
    writer.finish()?;
    let text = String::from_utf8_lossy(&writer.into_inner()).into_owned();
    Ok(text.lines().map(str::to_owned).collect())
}

/// Logs rejected input without flooding the log.
pub struct RejectLog {
    /// Who rejects: a file name, `mqtt 127.0.0.1:1883`, ...
    source: String,
    /// What one reject is, e.g. `malformed line`, and several of them.
    noun: (&'static str, &'static str),
    logged: u64,
    suppressed: u64,
    /// Where the last unlogged reject was, and why it was rejected.
    last: Option<(String, String)>,
    last_summary: Instant,
}

impl RejectLog {
    /// A log for rejects by `source`, each one a `singular` (`plural` for several).
    pub fn new(source: impl Into<String>, singular: &'static str, plural: &'static str) -> Self {
        RejectLog {
            source: source.into(),
            noun: (singular, plural),
            logged: 0,
            suppressed: 0,
            last: None,
            last_summary: Instant::now(),
        }
    }

    /// Notes one reject, found at `place` (`line 12`, `topic 'a/b'`), for `reason`.
    pub fn note(&mut self, place: impl Display, reason: &str) {
        let (singular, plural) = self.noun;
        if self.logged < LOGGED_INDIVIDUALLY {
            self.logged += 1;
            warn!("{}: skipped a {singular} at {place}: {reason}", self.source);
            if self.logged == LOGGED_INDIVIDUALLY {
                warn!(
                    "{}: further {plural} are summarised every {}s",
                    self.source,
                    SUMMARY_EVERY.as_secs()
                );
                self.last_summary = Instant::now();
            }
            return;
        }
        self.suppressed += 1;
        self.last = Some((place.to_string(), reason.to_owned()));
        self.summarise_if_due();
    }

    /// Logs the count of unlogged rejects if the last summary is old enough.
    pub fn summarise_if_due(&mut self) {
        if self.suppressed > 0 && self.last_summary.elapsed() >= SUMMARY_EVERY {
            self.summarise();
        }
    }

    /// Logs the count of unlogged rejects now, e.g. when the operator stops.
    pub fn summarise(&mut self) {
        if self.suppressed > 0
            && let Some((place, reason)) = self.last.take()
        {
            warn!(
                "{}: skipped {} more {}, the last at {place}: {reason}",
                self.source, self.suppressed, self.noun.1
            );
        }
        self.suppressed = 0;
        self.last_summary = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_first_rejects_are_logged_then_summarised_periodically() {
        let mut log = RejectLog::new("f.jsonl", "malformed line", "malformed lines");
        for line in 1..=LOGGED_INDIVIDUALLY {
            log.note(format_args!("line {line}"), "bad json");
        }
        assert_eq!((log.logged, log.suppressed), (LOGGED_INDIVIDUALLY, 0));
        log.note("line 11", "bad json");
        log.note("line 12", "not a number");
        // Not yet due: held back, the last one remembered.
        assert_eq!(log.suppressed, 2);
        assert_eq!(log.last.as_ref().map(|(p, _)| p.as_str()), Some("line 12"));
        tokio::time::advance(SUMMARY_EVERY).await;
        log.note("line 13", "bad json");
        assert_eq!((log.suppressed, log.last.is_none()), (0, true));
        log.note("line 14", "bad json");
        log.summarise();
        assert_eq!(log.suppressed, 0);
    }
}
