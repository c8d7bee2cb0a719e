//! Whether a windowed query can run as parallel instances, and on which keys: it can when
//! each of its result rows comes from the rows of one group, so that rows routed by (some
//! of) its GROUP BY columns give every instance whole groups.

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::logical_expr::{Expr, LogicalPlan};
use weir_engine::registry::{InputStream, Partitionable};

use super::passes_through;

/// How the windowed query `plan` over `inputs` may be partitioned.
pub(super) fn windowed(plan: &LogicalPlan, inputs: &[InputStream]) -> Partitionable {
    let [input] = inputs else {
        return Partitionable::No(
            "its query reads more than one input, and rows of one group could come from any".into(),
        );
    };
    let mut has_subquery = false;
    let _ = plan.apply_with_subqueries(|node| {
        has_subquery |= matches!(node, LogicalPlan::Subquery(_));
        Ok(if has_subquery {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    if has_subquery {
        return Partitionable::No("its query has a subquery, which reads every group".into());
    }
    // Above the aggregate only row-by-row steps may run: a sort, limit or window function
    // there would see one instance's groups rather than all of them.
    let mut node = plan;
    let aggregate = loop {
        node = match node {
            LogicalPlan::Projection(projection) => &projection.input,
            LogicalPlan::Filter(filter) => &filter.input,
            LogicalPlan::SubqueryAlias(alias) => &alias.input,
            LogicalPlan::Aggregate(aggregate) => break aggregate,
            other => return Partitionable::No(across_groups(other)),
        };
    };
    // Below it too: a join or a second aggregate would group rows some other way.
    let mut below = aggregate.input.as_ref();
    loop {
        below = match below {
            LogicalPlan::Projection(projection) => &projection.input,
            LogicalPlan::Filter(filter) => &filter.input,
            LogicalPlan::SubqueryAlias(alias) => &alias.input,
            LogicalPlan::TableScan(_) => break,
            other => return Partitionable::No(across_groups(other)),
        };
    }
    if aggregate
        .group_expr
        .iter()
        .any(|expr| matches!(expr, Expr::GroupingSet(_)))
    {
        return Partitionable::No(
            "its query groups by GROUPING SETS, ROLLUP or CUBE, whose totals span groups".into(),
        );
    }
    let schema = aggregate.input.schema();
    let columns: Vec<&str> = input
        .stream
        .schema
        .fields()
        .iter()
        .map(|field| field.name().as_str())
        .collect();
    let mut keys: Vec<String> = Vec::new();
    for expr in &aggregate.group_expr {
        let Expr::Column(column) = expr else { continue };
        let Ok(index) = schema.index_of_column(column) else {
            continue;
        };
        let source = columns
            .iter()
            .find(|name| passes_through(&aggregate.input, index, &input.name, name));
        if let Some(source) = source
            && !keys.iter().any(|key| key == source)
        {
            keys.push((*source).to_owned());
        }
    }
    if keys.is_empty() {
        return Partitionable::No(
            "its query aggregates the whole window rather than GROUP BY a column of its input"
                .into(),
        );
    }
    Partitionable::GroupedBy(keys)
}

/// Why a query whose plan has `node` around its aggregate spans groups.
fn across_groups(node: &LogicalPlan) -> String {
    let what = match node {
        LogicalPlan::Sort(_) => "ORDER BY",
        LogicalPlan::Limit(_) => "LIMIT",
        LogicalPlan::Window(_) => "a window function (OVER …)",
        LogicalPlan::Distinct(_) => "DISTINCT",
        LogicalPlan::Join(_) => "a join",
        LogicalPlan::Union(_) => "UNION",
        LogicalPlan::Aggregate(_) => "a second aggregate",
        _ => "a step",
    };
    format!("its query has {what} over the rows of every group")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::prelude::SessionContext;
    use weir_engine::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use weir_engine::registry::StreamInfo;

    use super::*;

    async fn partitioning(query: &str) -> Partitionable {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, false),
            Field::new("site", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            Field::new("v", DataType::Float64, false),
        ]));
        let ctx = SessionContext::new();
        let empty = datafusion::datasource::MemTable::try_new(schema.clone(), vec![vec![]])
            .expect("an empty table");
        ctx.register_table("s", Arc::new(empty)).expect("registers");
        let plan = ctx
            .state()
            .create_logical_plan(query)
            .await
            .expect("the query plans");
        let inputs = [InputStream {
            name: "s".into(),
            stream: StreamInfo {
                schema,
                event_time: Some("ts".into()),
            },
        }];
        windowed(&plan, &inputs)
    }

    #[tokio::test]
    async fn a_grouped_query_is_partitioned_by_its_group_columns_of_the_input() {
        assert_eq!(
            partitioning("SELECT device, avg(v) FROM s GROUP BY device").await,
            Partitionable::GroupedBy(vec!["device".into()])
        );
        assert_eq!(
            partitioning(
                "SELECT d, site, max(v) AS top FROM (SELECT device AS d, site, v FROM s WHERE v > 0) \
                 GROUP BY d, site, upper(site) HAVING max(v) > 1"
            )
            .await,
            Partitionable::GroupedBy(vec!["device".into(), "site".into()])
        );
    }

    #[tokio::test]
    async fn a_query_whose_result_spans_groups_is_not_partitioned() {
        for query in [
            "SELECT count(*) FROM s",
            "SELECT upper(device), count(*) FROM s GROUP BY upper(device)",
            "SELECT device, avg(v) AS a FROM s GROUP BY device ORDER BY a DESC LIMIT 3",
            "SELECT device, rank() OVER (ORDER BY avg(v)) FROM s GROUP BY device",
            "SELECT site, max(n) FROM (SELECT site, device, count(*) AS n FROM s GROUP BY site, device) GROUP BY site",
            "SELECT device, count(*) FROM s WHERE v > (SELECT avg(v) FROM s) GROUP BY device",
            "SELECT device, site, count(*) FROM s GROUP BY ROLLUP (device, site)",
        ] {
            let partitioning = partitioning(query).await;
            assert!(
                matches!(partitioning, Partitionable::No(_)),
                "{query}: {partitioning:?}"
            );
        }
    }
}
