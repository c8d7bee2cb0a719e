//! Incremental window aggregation: the query's aggregate split into DataFusion's own
//! Partial, PartialReduce and Final phases, so a window keeps accumulator state per
//! (pane, group key) instead of its raw rows.
//!
//! A query such as `SELECT device, avg(t) FROM s WHERE t > 0 GROUP BY device HAVING …`
//! plans to an aggregate over a *row-local* subtree (projections, filters, unions of
//! inputs: operators whose output over many batches is the union of their outputs over
//! each batch) with the rest of the plan above it. Such a plan is split in three:
//!
//! - `partial`: the subtree with an `AggregateExec(Partial)` on top. It runs on every
//!   arriving batch and returns that batch's accumulator state, one row per group.
//! - `reduce`: an `AggregateExec(PartialReduce)` over state rows, which merges a pane's
//!   state batches into one so a pane holds one state row per group however many
//!   batches fed it.
//! - `finish`: the plan above the aggregate, with an `AggregateExec(Final)` over state
//!   rows in the aggregate's place. It runs when a window closes, over the state of the
//!   window's panes: O(panes × keys), whatever the number of rows.
//!
//! The accumulators are DataFusion's (`avg`'s sum and count, `count(DISTINCT)`'s value
//! set, `approx_percentile_cont`'s digest…); nothing here knows an aggregate function.
//! A plan that does not split this way (no aggregate, an aggregate over a join, a
//! window function below the aggregate) is run over the window's buffered rows instead.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::Result as DfResult;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use weir_engine::arrow::datatypes::{DataType, SchemaRef};
use weir_engine::arrow::record_batch::RecordBatch;

use super::plan::{InputSlotExec, SqlPlan};

/// The plan nodes whose output over a sequence of batches is the concatenation of their
/// outputs over each batch alone, so a Partial aggregate may run batch by batch above
/// them. A sort qualifies as the input of an order-sensitive aggregate: its partial
/// state keeps the ordering values and the merge restores the order across batches.
const ROW_LOCAL: &[&str] = &[
    "InputSlotExec",
    "CooperativeExec",
    "ProjectionExec",
    "FilterExec",
    "CoalesceBatchesExec",
    "CoalescePartitionsExec",
    "RepartitionExec",
    "UnionExec",
    "InterleaveExec",
    "SortExec",
];

/// A windowed query split into its three aggregation phases.
pub(crate) struct IncrementalPlan {
    partial: SqlPlan,
    reduce: SqlPlan,
    finish: SqlPlan,
    /// Aggregates whose state is a list of the values they saw (`array_agg`, `median`,
    /// `count(DISTINCT …)`): their state grows with the window's rows.
    pub(crate) value_keeping: Vec<String>,
}

/// Why a windowed query is computed over buffered rows rather than incrementally.
pub(crate) type NotIncremental = String;

impl IncrementalPlan {
    /// Splits `plan` (planned over `inputs` input slots) into its aggregation phases, or
    /// says why it cannot be.
    pub(crate) fn split(
        plan: &Arc<dyn ExecutionPlan>,
        task_ctx: &Arc<TaskContext>,
        inputs: usize,
    ) -> Result<Self, NotIncremental> {
        let mut found = Vec::new();
        find_splittable_aggregates(plan, &mut found);
        let aggregate = match found.as_slice() {
            [] => {
                return Err(
                    "its query has no aggregate over the window's rows, or the aggregate reads a join, a window function or a subquery".into(),
                );
            }
            [one] => Arc::clone(one),
            _ => return Err("its query has several aggregates over the window's rows".into()),
        };
        let Some((top, phase)) = aggregate_phases(&aggregate) else {
            return Err("its aggregate is planned in a mode that cannot be split".into());
        };
        let df = |error: datafusion::error::DataFusionError| error.to_string();
        let partial: Arc<dyn ExecutionPlan> = Arc::new(
            AggregateExec::try_new(
                AggregateMode::Partial,
                phase.group_expr().clone(),
                phase.aggr_expr().to_vec(),
                phase.filter_expr().to_vec(),
                Arc::clone(phase.input()),
                phase.input_schema(),
            )
            .map_err(df)?,
        );
        let state_schema = partial.schema();
        let state_slot = || -> Result<Arc<dyn ExecutionPlan>, NotIncremental> {
            Ok(Arc::new(
                InputSlotExec::new(0, "window state", Arc::clone(&state_schema), None, None)
                    .map_err(df)?,
            ))
        };
        let over_state = |mode| -> Result<Arc<dyn ExecutionPlan>, NotIncremental> {
            let exec = AggregateExec::try_new(
                mode,
                phase.group_expr().as_final(),
                phase.aggr_expr().to_vec(),
                phase.filter_expr().to_vec(),
                state_slot()?,
                phase.input_schema(),
            )
            .map_err(df)?;
            Ok(Arc::new(exec))
        };
        let reduce = over_state(AggregateMode::PartialReduce)?;
        if reduce.schema() != state_schema {
            return Err("its aggregate's partial state does not merge into itself".into());
        }
        let final_aggregate = over_state(AggregateMode::Final)?;
        if !same_columns(&final_aggregate.schema(), &top.schema()) {
            return Err(
                "its aggregate's final phase returns other columns than the query plans".into(),
            );
        }
        let target = Arc::as_ptr(&top) as *const ();
        if reads_inputs_outside(plan, target) {
            return Err("its query reads the window's rows outside its aggregate".into());
        }
        let finish = Arc::clone(plan)
            .transform_down(|node| {
                if Arc::as_ptr(&node) as *const () == target {
                    Ok(Transformed::new(
                        Arc::clone(&final_aggregate),
                        true,
                        TreeNodeRecursion::Jump,
                    ))
                } else {
                    Ok(Transformed::no(node))
                }
            })
            .map_err(df)?
            .data;
        let value_keeping = phase
            .aggr_expr()
            .iter()
            .filter(|aggregate| keeps_values(aggregate))
            .map(|aggregate| aggregate.name().to_owned())
            .collect();
        Ok(IncrementalPlan {
            partial: SqlPlan::new(partial, Arc::clone(task_ctx), inputs),
            reduce: SqlPlan::new(reduce, Arc::clone(task_ctx), 1),
            finish: SqlPlan::new(finish, Arc::clone(task_ctx), 1),
            value_keeping,
        })
    }

    /// The accumulator state of `batches` of input number `input`: one row per group.
    pub(crate) async fn partial(
        &self,
        input: usize,
        batches: Vec<RecordBatch>,
    ) -> DfResult<Vec<RecordBatch>> {
        let mut bound = vec![Vec::new(); self.partial.inputs()];
        bound[input] = batches;
        self.partial.execute(&bound).await
    }

    /// The schema each input's rows have, for the inputs the aggregate reads.
    pub(crate) fn input_schemas(&self) -> Vec<Option<SchemaRef>> {
        self.partial.input_schemas()
    }

    /// Merges state batches into state batches with one row per group.
    pub(crate) async fn reduce(&self, states: Vec<RecordBatch>) -> DfResult<Vec<RecordBatch>> {
        self.reduce.execute(&[states]).await
    }

    /// The schema of the accumulator state that `partial` and `reduce` return.
    pub(crate) fn state_schema(&self) -> SchemaRef {
        self.partial.schema()
    }

    /// The query's result over the merged state of `states`.
    pub(crate) async fn finish(&self, states: Vec<RecordBatch>) -> DfResult<Vec<RecordBatch>> {
        self.finish.execute(&[states]).await
    }
}

/// Collects the aggregates that read input slots through row-local operators only. An
/// aggregate over another aggregate (as `count(DISTINCT x)` plans) is looked through to
/// the one below it.
fn find_splittable_aggregates(
    node: &Arc<dyn ExecutionPlan>,
    found: &mut Vec<Arc<dyn ExecutionPlan>>,
) {
    if let Some((_, phase)) = aggregate_phases(node)
        && is_row_local(phase.input())
        && reads_inputs(phase.input())
    {
        found.push(Arc::clone(node));
        return;
    }
    for child in node.children() {
        find_splittable_aggregates(child, found);
    }
}

/// For an aggregate node: the node the query's result reads (replaced by the Final
/// phase) and the aggregate holding the group, aggregate and filter expressions over
/// raw rows. A one-phase (`Single`) aggregate is both; a `Final` over a `Partial` is
/// the Final and its Partial.
fn aggregate_phases(
    node: &Arc<dyn ExecutionPlan>,
) -> Option<(Arc<dyn ExecutionPlan>, &AggregateExec)> {
    let aggregate = node.downcast_ref::<AggregateExec>()?;
    match aggregate.mode() {
        AggregateMode::Single | AggregateMode::SinglePartitioned => {
            Some((Arc::clone(node), aggregate))
        }
        AggregateMode::Final | AggregateMode::FinalPartitioned => {
            let partial = aggregate.input().downcast_ref::<AggregateExec>()?;
            (*partial.mode() == AggregateMode::Partial).then(|| (Arc::clone(node), partial))
        }
        AggregateMode::Partial | AggregateMode::PartialReduce => None,
    }
}

fn is_row_local(node: &Arc<dyn ExecutionPlan>) -> bool {
    ROW_LOCAL.contains(&node.name())
        && (node.name() != "SortExec" || node.fetch().is_none())
        && node.children().into_iter().all(is_row_local)
}

fn reads_inputs(node: &Arc<dyn ExecutionPlan>) -> bool {
    node.downcast_ref::<InputSlotExec>().is_some() || node.children().into_iter().any(reads_inputs)
}

/// Whether `node` reads an input slot other than through the node at `aggregate`.
fn reads_inputs_outside(node: &Arc<dyn ExecutionPlan>, aggregate: *const ()) -> bool {
    if Arc::as_ptr(node) as *const () == aggregate {
        return false;
    }
    node.downcast_ref::<InputSlotExec>().is_some()
        || node
            .children()
            .into_iter()
            .any(|child| reads_inputs_outside(child, aggregate))
}

/// Whether two schemas have the same column names and types (their metadata and
/// nullability may differ between a one-phase and a two-phase aggregate).
pub(crate) fn same_columns(a: &SchemaRef, b: &SchemaRef) -> bool {
    a.fields().len() == b.fields().len()
        && a.fields()
            .iter()
            .zip(b.fields())
            .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type())
}

/// Whether an aggregate's state holds the values it saw, so it grows with the rows:
/// a list-typed state field. Approximate aggregates keep bounded sketches even where
/// those are lists (a t-digest's centroids).
fn keeps_values(aggregate: &datafusion::physical_expr::aggregate::AggregateFunctionExpr) -> bool {
    if aggregate.fun().name().starts_with("approx_") {
        return false;
    }
    aggregate.state_fields().is_ok_and(|fields| {
        fields.iter().any(|field| {
            matches!(
                field.data_type(),
                DataType::List(_) | DataType::LargeList(_) | DataType::ListView(_)
            )
        })
    })
}
