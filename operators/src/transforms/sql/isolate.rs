//! `on_error: dead_letter`: finding the rows that make a query fail, the way the file
//! source finds its bad lines, and sending them to the transform's `dead_letter` port
//! with the error, so one bad value no longer stops the pipeline.
//!
//! A batch whose execution fails on its data (a failed cast, a division by zero) is
//! halved, and each half run again, until every part either succeeds or is a single
//! row that fails: O(bad rows × log rows) executions, and none when nothing fails.

use std::future::Future;
use std::sync::Arc;

use datafusion::error::{DataFusionError, Result as DfResult};
use weir_engine::arrow::array::{ArrayRef, StringArray};
use weir_engine::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use weir_engine::arrow::record_batch::RecordBatch;
use weir_engine::{Collector, OperatorError};

use super::{innermost, is_data_error, one_line};
use crate::rejects::rows_as_json;

/// Rows sent to the dead-letter port when nothing reads it are dropped under this reason.
pub const QUERY_ERROR: &str = "query_error";

/// The schema of a transform's `dead_letter` port: which input the row came from, why
/// the query failed on it, and the row as a JSON object.
pub fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("input", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("raw", DataType::Utf8, false),
    ]))
}

/// Where a transform with `on_error: dead_letter` sends the rows it fails on.
pub(crate) struct DeadLetters {
    /// The index of the `dead_letter` port.
    pub(crate) port: usize,
    /// The inputs' names, written into the `input` column.
    pub(crate) input_names: Vec<String>,
}

impl DeadLetters {
    /// Emits the failed rows of `isolated` (from input number `input`) and returns the
    /// results of the parts that ran, in row order.
    pub(crate) fn settle(
        &self,
        out: &mut Collector,
        input: usize,
        isolated: Isolated,
    ) -> Result<Vec<RecordBatch>, OperatorError> {
        for (rows, error) in &isolated.failed {
            self.emit(out, input, rows, error)?;
        }
        Ok(isolated
            .succeeded
            .into_iter()
            .flat_map(|(_, results)| results)
            .collect())
    }

    /// Emits `rows` of input number `input`, which failed with `error`.
    pub(crate) fn emit(
        &self,
        out: &mut Collector,
        input: usize,
        rows: &RecordBatch,
        error: &DataFusionError,
    ) -> Result<(), OperatorError> {
        let count = rows.num_rows();
        let input = self.input_names.get(input).map_or("", String::as_str);
        let message = one_line(&innermost(error).message());
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                input, count,
            ))),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                message.as_str(),
                count,
            ))),
            Arc::new(StringArray::from(rows_as_json(rows)?)),
        ];
        out.emit_to(
            self.port,
            RecordBatch::try_new(dead_letter_schema(), columns)?,
        );
        Ok(())
    }
}

/// The parts of a batch after [`bisect`]: those that ran, with their results, in row
/// order, and the single rows that failed, with their errors.
pub(crate) struct Isolated {
    pub(crate) succeeded: Vec<(RecordBatch, Vec<RecordBatch>)>,
    pub(crate) failed: Vec<(RecordBatch, DataFusionError)>,
}

/// Runs `run` over `batch`, halving every part that fails on its data until each
/// failing part is one row. An error that is not about the data is returned as it is.
pub(crate) async fn bisect<F, Fut>(batch: RecordBatch, mut run: F) -> DfResult<Isolated>
where
    F: FnMut(RecordBatch) -> Fut,
    Fut: Future<Output = DfResult<Vec<RecordBatch>>>,
{
    let mut isolated = Isolated {
        succeeded: Vec::new(),
        failed: Vec::new(),
    };
    // Last in, first out, with the second half pushed first: parts finish in row order.
    let mut parts = vec![batch];
    while let Some(part) = parts.pop() {
        match run(part.clone()).await {
            Ok(results) => isolated.succeeded.push((part, results)),
            Err(error) if !is_data_error(&error) => return Err(error),
            Err(error) if part.num_rows() <= 1 => isolated.failed.push((part, error)),
            Err(_) => {
                let half = part.num_rows() / 2;
                parts.push(part.slice(half, part.num_rows() - half));
                parts.push(part.slice(0, half));
            }
        }
    }
    Ok(isolated)
}
