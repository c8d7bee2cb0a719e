//! The DataFusion side of the `sql` transform: "plan once, rebind per execution".
//!
//! At plan time every input of the transform is registered as an [`InputTable`] whose
//! scan returns an [`InputSlotExec`]: a leaf that knows the input's schema and the
//! scan's projection but holds no rows. The query is planned once to a physical plan.
//! Each execution (one batch when stateless, one window when windowed) then rebuilds
//! the plan bottom-up with slots that hold that execution's batches, resetting every
//! operator's state on the way, and collects the result. Planning and optimising are
//! thus paid once, while no state (a join's build side, a dynamic filter) can leak from
//! one execution into the next.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Result as DfResult, project_schema};
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning,
    PhysicalExpr, PlanProperties, ReplaceChildrenOptions, SendableRecordBatchStream, collect,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use weir_engine::arrow::datatypes::SchemaRef;
use weir_engine::arrow::record_batch::RecordBatch;

/// Rows per batch inside DataFusion. Input batches pass through at their own size; this
/// bounds what operators such as aggregates and joins emit.
const BATCH_SIZE: usize = 8192;

/// A DataFusion session for planning one transform's query: a single partition (the
/// transform runs on one task, so repartitioning would only add copies), no dynamic
/// filters, whose state would otherwise outlive an execution of the reused plan, and a
/// memory pool of `memory_limit` bytes, so an execution that would need more fails
/// with an error naming the limit instead of exhausting the device.
pub(crate) fn new_session(memory_limit: usize) -> SessionContext {
    let mut config = SessionConfig::new()
        .with_target_partitions(1)
        .with_batch_size(BATCH_SIZE)
        .with_information_schema(false);
    let optimizer = &mut config.options_mut().optimizer;
    optimizer.enable_dynamic_filter_pushdown = false;
    optimizer.enable_topk_dynamic_filter_pushdown = false;
    optimizer.enable_join_dynamic_filter_pushdown = false;
    optimizer.enable_aggregate_dynamic_filter_pushdown = false;
    match RuntimeEnvBuilder::new()
        .with_memory_limit(memory_limit, 1.0)
        .build_arc()
    {
        Ok(runtime) => SessionContext::new_with_config_rt(config, runtime),
        // Building a runtime with a memory pool does not fail; if it ever did, the
        // default (unbounded) runtime still runs the query.
        Err(_) => SessionContext::new_with_config(config),
    }
}

/// One input of the transform seen as a SQL table. It holds no rows: its scan returns
/// an empty [`InputSlotExec`] that each execution fills.
#[derive(Debug)]
pub(crate) struct InputTable {
    input: usize,
    name: String,
    schema: SchemaRef,
}

impl InputTable {
    /// The table for input number `input`, called `name`, with the input's schema.
    pub(crate) fn new(input: usize, name: &str, schema: SchemaRef) -> Self {
        InputTable {
            input,
            name: name.to_owned(),
            schema,
        }
    }
}

#[async_trait]
impl TableProvider for InputTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        // A temporary table: rows exist only for the duration of one execution.
        TableType::Temporary
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(InputSlotExec::new(
            self.input,
            &self.name,
            Arc::clone(&self.schema),
            projection.cloned(),
            limit,
        )?))
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Filters stay in the plan as FilterExec: the slot only hands batches over.
        Ok(vec![
            TableProviderFilterPushDown::Unsupported;
            filters.len()
        ])
    }
}

/// The leaf where one input's batches enter the physical plan.
///
/// The planned slot is empty; [`SqlPlan::execute`] replaces it with a copy holding the
/// batches of one execution. The copy shares the planned slot's properties, so
/// DataFusion rebuilds the ancestors without recomputing theirs.
#[derive(Debug)]
pub(crate) struct InputSlotExec {
    input: usize,
    table: String,
    /// The input's full schema; the batches have it.
    schema: SchemaRef,
    projection: Option<Vec<usize>>,
    fetch: Option<usize>,
    properties: Arc<PlanProperties>,
    batches: Vec<RecordBatch>,
}

impl InputSlotExec {
    /// An empty slot for input number `input`, called `table`, whose batches have
    /// `schema`; the scan's `projection` and `fetch` apply to them.
    pub(crate) fn new(
        input: usize,
        table: &str,
        schema: SchemaRef,
        projection: Option<Vec<usize>>,
        fetch: Option<usize>,
    ) -> DfResult<Self> {
        let projected = project_schema(&schema, projection.as_ref())?;
        // Statistics stay unknown (the trait's default): with "exactly zero rows" the
        // optimiser would fold the plan into constants computed from the empty slot.
        let properties = PlanProperties::new(
            EquivalenceProperties::new(projected),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(InputSlotExec {
            input,
            table: table.to_owned(),
            schema,
            projection,
            fetch,
            properties: Arc::new(properties),
            batches: Vec::new(),
        })
    }

    /// A copy of this slot that yields `batches`.
    fn bind(&self, batches: Vec<RecordBatch>) -> Self {
        InputSlotExec {
            input: self.input,
            table: self.table.clone(),
            schema: Arc::clone(&self.schema),
            projection: self.projection.clone(),
            fetch: self.fetch,
            properties: Arc::clone(&self.properties),
            batches,
        }
    }
}

impl DisplayAs for InputSlotExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match t {
            DisplayFormatType::Default | DisplayFormatType::Verbose => {
                write!(f, "InputSlotExec: table={}", self.table)?;
                if let Some(projection) = &self.projection {
                    write!(f, ", projection={projection:?}")?;
                }
                if let Some(fetch) = self.fetch {
                    write!(f, ", fetch={fetch}")?;
                }
                Ok(())
            }
            DisplayFormatType::TreeRender => write!(f, "table={}", self.table),
        }
    }
}

impl ExecutionPlan for InputSlotExec {
    fn name(&self) -> &str {
        "InputSlotExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "InputSlotExec is a leaf and takes no children".into(),
            ))
        }
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "InputSlotExec has one partition, asked for partition {partition}"
            )));
        }
        let stream = MemoryStream::try_new(
            self.batches.clone(),
            Arc::clone(self.properties.eq_properties.schema()),
            self.projection.clone(),
        )?
        .with_fetch(self.fetch);
        Ok(Box::pin(stream))
    }
}

/// A physical plan planned once and executed many times over different batches.
pub(crate) struct SqlPlan {
    plan: Arc<dyn ExecutionPlan>,
    task_ctx: Arc<TaskContext>,
    /// How many inputs the transform has; each execution passes one batch list per input.
    inputs: usize,
}

impl SqlPlan {
    /// Wraps a physical plan whose leaves include [`InputSlotExec`]s.
    pub(crate) fn new(
        plan: Arc<dyn ExecutionPlan>,
        task_ctx: Arc<TaskContext>,
        inputs: usize,
    ) -> Self {
        SqlPlan {
            plan,
            task_ctx,
            inputs,
        }
    }

    /// How many inputs each execution takes.
    pub(crate) fn inputs(&self) -> usize {
        self.inputs
    }

    /// The schema of every batch an execution returns.
    pub(crate) fn schema(&self) -> SchemaRef {
        self.plan.schema()
    }

    /// The schema the batches of each input must have, for the inputs the plan reads.
    pub(crate) fn input_schemas(&self) -> Vec<Option<SchemaRef>> {
        let mut schemas = vec![None; self.inputs];
        let mut found = Vec::new();
        collect_slots(&self.plan, &mut found);
        for (input, schema) in found {
            if let Some(slot) = schemas.get_mut(input) {
                *slot = Some(schema);
            }
        }
        schemas
    }

    /// Runs the plan once with `inputs[i]` as the rows of input `i`, and returns the
    /// result batches.
    pub(crate) async fn execute(&self, inputs: &[Vec<RecordBatch>]) -> DfResult<Vec<RecordBatch>> {
        if inputs.len() != self.inputs {
            return Err(DataFusionError::Internal(format!(
                "sql plan executed with {} inputs, planned with {}",
                inputs.len(),
                self.inputs
            )));
        }
        let plan = Arc::clone(&self.plan)
            .transform_up(|node| {
                if let Some(slot) = node.downcast_ref::<InputSlotExec>() {
                    let batches = inputs.get(slot.input).cloned().unwrap_or_default();
                    let bound: Arc<dyn ExecutionPlan> = Arc::new(slot.bind(batches));
                    return Ok(Transformed::yes(bound));
                }
                // Fresh operator state for every execution (hash tables, join build
                // sides, buffered sorts), the same way DataFusion re-runs recursive queries.
                Ok(Transformed::yes(node.reset_state()?))
            })?
            .data;
        collect(plan, Arc::clone(&self.task_ctx)).await
    }
}

/// The input number and batch schema of every input slot under `node`.
fn collect_slots(node: &Arc<dyn ExecutionPlan>, found: &mut Vec<(usize, SchemaRef)>) {
    if let Some(slot) = node.downcast_ref::<InputSlotExec>() {
        found.push((slot.input, Arc::clone(&slot.schema)));
    }
    for child in node.children() {
        collect_slots(child, found);
    }
}

#[cfg(test)]
mod tests {
    use weir_engine::arrow::array::{Array, AsArray, Int64Array};
    use weir_engine::arrow::datatypes::{DataType, Field, Int64Type, Schema};

    use super::*;

    fn batch(values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("b", DataType::Int64, false),
        ]));
        let doubled: Vec<i64> = values.iter().map(|v| v * 2).collect();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(values.to_vec())),
                Arc::new(Int64Array::from(doubled)),
            ],
        )
        .unwrap()
    }

    async fn planned(query: &str) -> SqlPlan {
        let ctx = new_session(64 << 20);
        let schema = batch(&[]).schema();
        ctx.register_table("t", Arc::new(InputTable::new(0, "t", schema)))
            .unwrap();
        let state = ctx.state();
        let logical = state.create_logical_plan(query).await.unwrap();
        let physical = state.create_physical_plan(&logical).await.unwrap();
        SqlPlan::new(physical, state.task_ctx(), 1)
    }

    fn column(batches: &[RecordBatch], index: usize) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| {
                b.column(index)
                    .as_primitive::<Int64Type>()
                    .values()
                    .to_vec()
            })
            .collect()
    }

    #[tokio::test]
    async fn rebinding_runs_the_same_plan_over_new_rows_without_leaking_state() {
        let plan = planned("SELECT sum(b) AS s, count(*) AS n FROM t").await;
        let first = plan.execute(&[vec![batch(&[1, 2, 3])]]).await.unwrap();
        assert_eq!((column(&first, 0), column(&first, 1)), (vec![12], vec![3]));
        // A second execution sees only its own rows: the aggregate starts from zero.
        let second = plan
            .execute(&[vec![batch(&[10]), batch(&[20])]])
            .await
            .unwrap();
        assert_eq!(
            (column(&second, 0), column(&second, 1)),
            (vec![60], vec![2])
        );
    }

    #[tokio::test]
    async fn slot_applies_projection_and_self_joins_see_the_same_rows() {
        let plan = planned("SELECT x.b FROM t x JOIN t y ON x.a = y.a WHERE x.a > 1").await;
        let out = plan.execute(&[vec![batch(&[1, 2, 3])]]).await.unwrap();
        let mut values = column(&out, 0);
        values.sort_unstable();
        assert_eq!(values, vec![4, 6]);
        assert_eq!(plan.schema().fields().len(), 1);
        let again = plan.execute(&[vec![batch(&[5])]]).await.unwrap();
        assert_eq!(column(&again, 0), vec![10]);
        assert!(again.iter().all(|b| b.column(0).null_count() == 0));
    }

    #[tokio::test]
    async fn statistics_of_the_empty_slot_do_not_fold_the_plan() {
        // With "exactly zero rows" statistics count(*) would be planned as a constant 0.
        let plan = planned("SELECT count(*) AS n FROM t").await;
        let out = plan.execute(&[vec![batch(&[7, 8])]]).await.unwrap();
        assert_eq!(column(&out, 0), vec![2]);
    }
}
