//! The rows a query found, and writing them as JSON, CSV or Arrow IPC.

use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::{Format, QueryError};

/// What a query found: at most the row limit, and whether there was more.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The schema of the rows.
    pub schema: SchemaRef,
    /// The rows, in the order the query produced them.
    pub batches: Vec<RecordBatch>,
    /// How many rows `batches` hold.
    pub row_count: usize,
    /// True when the query produced more rows than the limit and the rest were cut.
    pub truncated: bool,
    /// How long planning and running took.
    pub elapsed: Duration,
}

/// One column of a JSON answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    /// The column's name.
    pub name: String,
    /// Its Arrow type, e.g. `Utf8`, `Float64`, `Timestamp(ms)`.
    #[serde(rename = "type")]
    pub data_type: String,
}

/// A JSON answer as clients read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JsonAnswer {
    /// The columns, in order.
    pub columns: Vec<Column>,
    /// The rows, each an object keyed by column name; nulls are written as `null`.
    pub rows: Vec<serde_json::Map<String, serde_json::Value>>,
    /// How many rows there are.
    pub row_count: usize,
    /// True when the query produced more rows than the limit and the rest were cut.
    pub truncated: bool,
    /// How long the query took, in milliseconds.
    pub elapsed_ms: f64,
}

impl Answer {
    /// The rows written in `format`.
    pub fn encode(&self, format: Format) -> Result<Vec<u8>, QueryError> {
        let encoding = |error: arrow::error::ArrowError| {
            QueryError::Internal(format!("cannot write the answer as {format:?}: {error}"))
        };
        match format {
            Format::Json => self.encode_json().map_err(encoding),
            Format::Csv => {
                let mut out = Vec::new();
                let mut writer = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut out);
                // An empty batch first, so an answer without rows still has its header.
                writer
                    .write(&RecordBatch::new_empty(self.schema.clone()))
                    .map_err(encoding)?;
                for batch in &self.batches {
                    writer.write(batch).map_err(encoding)?;
                }
                drop(writer);
                Ok(out)
            }
            Format::Arrow => {
                let mut out = Vec::new();
                let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &self.schema)
                    .map_err(encoding)?;
                for batch in &self.batches {
                    writer.write(batch).map_err(encoding)?;
                }
                writer.finish().map_err(encoding)?;
                drop(writer);
                Ok(out)
            }
        }
    }

    fn encode_json(&self) -> Result<Vec<u8>, arrow::error::ArrowError> {
        let columns: Vec<Column> = self
            .schema
            .fields()
            .iter()
            .map(|field| Column {
                name: field.name().clone(),
                data_type: field.data_type().to_string(),
            })
            .collect();
        let mut out = Vec::new();
        out.extend_from_slice(b"{\"columns\":");
        serde_json::to_writer(&mut out, &columns)
            .map_err(|e| arrow::error::ArrowError::JsonError(e.to_string()))?;
        out.extend_from_slice(b",\"rows\":");
        // Arrow writes the rows straight from the columns, without a value tree between.
        let mut rows = arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::JsonArray>(&mut out);
        for batch in &self.batches {
            rows.write(batch)?;
        }
        rows.finish()?;
        drop(rows);
        let tail = format!(
            ",\"row_count\":{},\"truncated\":{},\"elapsed_ms\":{:.3}}}",
            self.row_count,
            self.truncated,
            self.elapsed.as_secs_f64() * 1000.0
        );
        out.extend_from_slice(tail.as_bytes());
        Ok(out)
    }
}

/// An Arrow IPC answer as an aligned table for a terminal, with its row count.
pub fn arrow_to_table(arrow: &[u8]) -> Result<(String, usize), String> {
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(arrow), None)
        .map_err(|e| format!("the answer is not Arrow IPC: {e}"))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the answer is not Arrow IPC: {e}"))?;
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let table = if rows == 0 {
        // An empty answer still shows its columns.
        arrow::util::pretty::pretty_format_batches(&[RecordBatch::new_empty(schema)])
    } else {
        arrow::util::pretty::pretty_format_batches(&batches)
    }
    .map_err(|e| format!("cannot print the answer: {e}"))?;
    Ok((table.to_string(), rows))
}

/// A query's answer ready to send over HTTP: the rows in the asked format, or the error.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// The HTTP status.
    pub status: u16,
    /// The media type of `body`.
    pub content_type: &'static str,
    /// How many rows the answer holds, and whether they were cut at the limit.
    pub rows: Option<(usize, bool)>,
    /// The rows in the asked format, or the error as `{"error": …, "code": …}`.
    pub body: Vec<u8>,
}

impl Encoded {
    /// `error` as a JSON answer.
    pub fn refusal(error: &QueryError) -> Self {
        let body = serde_json::json!({"error": error.to_string(), "code": error.code()});
        Encoded {
            status: error.status(),
            content_type: "application/json",
            rows: None,
            body: body.to_string().into_bytes(),
        }
    }

    /// `answer` written as `format`.
    pub fn answer(answer: &Answer, format: Format) -> Self {
        match answer.encode(format) {
            Ok(body) => Encoded {
                status: 200,
                content_type: format.content_type(),
                rows: Some((answer.row_count, answer.truncated)),
                body,
            },
            Err(error) => Encoded::refusal(&error),
        }
    }

    /// Every header that goes with the body: its media type and, for rows, their count
    /// and whether they were cut.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![("content-type", self.content_type.to_owned())];
        headers.extend(self.row_headers());
        headers
    }

    /// The headers that go with the body, beside its media type.
    pub fn row_headers(&self) -> Vec<(&'static str, String)> {
        match self.rows {
            Some((count, truncated)) => vec![
                (crate::ROW_COUNT_HEADER, count.to_string()),
                (crate::TRUNCATED_HEADER, truncated.to_string()),
            ],
            None => Vec::new(),
        }
    }
}
