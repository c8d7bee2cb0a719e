//! The `sql` transform without a window: the query runs once per input batch.
//!
//! Planning has already rejected everything whose result would depend on how rows are
//! cut into batches (aggregates, sorts, joins, …), so running the query on each batch
//! alone gives the same rows as running it on the whole stream.

use async_trait::async_trait;
use weir_engine::arrow::datatypes::SchemaRef;
use weir_engine::arrow::record_batch::RecordBatch;
use weir_engine::{Collector, OperatorError, Transform};

use super::isolate::{DeadLetters, bisect};
use super::plan::SqlPlan;
use super::{execution_error, is_data_error};

/// A running stateless `sql` transform.
pub(crate) struct StatelessSql {
    name: String,
    plan: SqlPlan,
    /// The declared schema of the main port.
    schema: SchemaRef,
    /// The table name of each input, for messages.
    input_names: Vec<String>,
    /// Where rows the query fails on go, with `on_error: dead_letter`.
    dead_letters: Option<DeadLetters>,
}

impl StatelessSql {
    pub(crate) fn new(
        name: String,
        plan: SqlPlan,
        input_names: Vec<String>,
        dead_letters: Option<DeadLetters>,
    ) -> Self {
        StatelessSql {
            name,
            schema: plan.schema(),
            plan,
            input_names,
            dead_letters,
        }
    }
}

#[async_trait]
impl Transform for StatelessSql {
    async fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        // The other inputs' tables are empty for this execution; only a UNION of the
        // inputs can read several, and it passes each batch through on its own.
        let mut inputs = vec![Vec::new(); self.input_names.len()];
        let Some(slot) = inputs.get_mut(input) else {
            return Err(OperatorError::Internal(format!(
                "sql transform '{}' received a batch on input {input}, which it does not have",
                self.name
            )));
        };
        slot.push(batch.clone());
        let failed = |error| {
            let what = format!("a batch of input '{}'", self.input_names[input]);
            execution_error(&self.name, &what, error)
        };
        let results = match (self.plan.execute(&inputs).await, &self.dead_letters) {
            (Ok(results), _) => results,
            (Err(error), Some(dead_letters)) if is_data_error(&error) => {
                let plan = &self.plan;
                let count = inputs.len();
                let isolated = bisect(batch, |part| {
                    let mut inputs = vec![Vec::new(); count];
                    inputs[input].push(part);
                    async move { plan.execute(&inputs).await }
                })
                .await
                .map_err(failed)?;
                dead_letters.settle(out, input, isolated)?
            }
            (Err(error), _) => return Err(failed(error)),
        };
        for result in results {
            out.emit(conform(result, &self.schema)?);
        }
        Ok(())
    }
}

/// Gives a result batch the declared output schema (which DataFusion's batches already
/// match, up to the identity of the `Arc`).
pub(crate) fn conform(
    batch: RecordBatch,
    schema: &SchemaRef,
) -> Result<RecordBatch, OperatorError> {
    if std::sync::Arc::ptr_eq(&batch.schema(), schema) {
        return Ok(batch);
    }
    batch.with_schema(schema.clone()).map_err(|error| {
        OperatorError::Internal(format!(
            "sql result does not match the planned output schema: {error}"
        ))
    })
}
