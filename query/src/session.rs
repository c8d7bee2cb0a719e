//! A DataFusion context for one query: tables registered by the caller, a memory limit,
//! and running one read-only statement within a timeout and a row limit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::{MemorySchemaProvider, SchemaProvider, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::parser::ParserError;
use futures::StreamExt;
use weir_engine::observe::StreamView;

use crate::{Answer, Limits, QueryError};

/// The catalog tables are registered in; its default schema holds unqualified names.
const CATALOG: &str = "datafusion";
const DEFAULT_SCHEMA: &str = Session::DEFAULT_NAMESPACE;

/// A context to run one query in; see the crate's documentation.
pub struct Session {
    context: SessionContext,
    /// Names that are not tables, with why (e.g. a stream that is not retained), so a
    /// query naming one is told what to change.
    missing: BTreeMap<String, String>,
}

impl Session {
    /// The namespace of unqualified table names.
    pub const DEFAULT_NAMESPACE: &str = "public";

    /// A context whose joins, sorts and aggregations may hold `limits.memory_bytes`.
    pub fn new(limits: &Limits) -> Result<Self, QueryError> {
        // Nothing spills to disk: on a device an ad-hoc query must not wear its flash or
        // fill its disk, so past the memory limit it fails and says so.
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.memory_bytes, 1.0)
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()
            .map_err(|e| QueryError::Internal(format!("cannot set up the query engine: {e}")))?;
        let config = SessionConfig::new()
            .with_default_catalog_and_schema(CATALOG, DEFAULT_SCHEMA)
            .with_information_schema(true);
        Ok(Session {
            context: SessionContext::new_with_config_rt(config, runtime),
            missing: BTreeMap::new(),
        })
    }

    /// The DataFusion context, for registering tables other than in-memory ones.
    pub fn context(&self) -> &SessionContext {
        &self.context
    }

    /// Registers `batches` as table `name`, in schema `namespace` when given (queried as
    /// `namespace.name`, created on first use) and otherwise unqualified.
    pub fn register_batches(
        &self,
        namespace: Option<&str>,
        name: &str,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<(), QueryError> {
        let table = MemTable::try_new(schema, vec![batches])
            .map_err(|e| QueryError::Internal(format!("cannot register table '{name}': {e}")))?;
        self.register_table(namespace, name, Arc::new(table))
    }

    /// Registers `table` as `name`, in schema `namespace` when given (created on first
    /// use) and otherwise unqualified.
    pub fn register_table(
        &self,
        namespace: Option<&str>,
        name: &str,
        table: Arc<dyn TableProvider>,
    ) -> Result<(), QueryError> {
        let namespace = namespace.unwrap_or(DEFAULT_SCHEMA);
        let existing = self
            .context
            .catalog(CATALOG)
            .and_then(|catalog| catalog.schema(namespace));
        let schema = match existing {
            Some(schema) => schema,
            None => {
                let schema = Arc::new(MemorySchemaProvider::new());
                self.register_schema(namespace, schema.clone())?;
                schema
            }
        };
        schema
            .register_table(name.to_owned(), table)
            .map_err(|e| QueryError::Internal(format!("cannot register table '{name}': {e}")))?;
        Ok(())
    }

    /// Makes `provider` namespace `namespace` (replacing what was there): for tables
    /// built only when a query names them.
    pub fn register_schema(
        &self,
        namespace: &str,
        provider: Arc<dyn SchemaProvider>,
    ) -> Result<(), QueryError> {
        let catalog = self
            .context
            .catalog(CATALOG)
            .ok_or_else(|| QueryError::Internal("the query catalog is missing".to_owned()))?;
        catalog.register_schema(namespace, provider).map_err(|e| {
            QueryError::Internal(format!("cannot register schema '{namespace}': {e}"))
        })?;
        Ok(())
    }

    /// Says why `name` is not a table, for a query that names it anyway.
    pub fn explain_missing(&mut self, name: impl Into<String>, why: impl Into<String>) {
        self.missing.insert(name.into(), why.into());
    }

    /// The tables a query can name, qualified where they are not in the default schema.
    pub fn table_names(&self) -> Vec<String> {
        let Some(catalog) = self.context.catalog(CATALOG) else {
            return Vec::new();
        };
        let mut names = Vec::new();
        for namespace in catalog.schema_names() {
            if namespace == "information_schema" {
                continue;
            }
            let Some(schema) = catalog.schema(&namespace) else {
                continue;
            };
            for table in schema.table_names() {
                if namespace == DEFAULT_SCHEMA {
                    names.push(table);
                } else {
                    names.push(format!("{namespace}.{table}"));
                }
            }
        }
        names.sort();
        names
    }

    /// Runs `sql` within `limits`.
    pub async fn run(&self, sql: &str, limits: &Limits) -> Result<Answer, QueryError> {
        let started = Instant::now();
        check_read_only(sql)?;
        let running = async {
            let options = SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false);
            let frame = self
                .context
                .sql_with_options(sql, options)
                .await
                .map_err(|e| self.describe(&e))?;
            let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
            let plan = frame
                .create_physical_plan()
                .await
                .map_err(|e| self.describe(&e))?;
            let mut stream = execute_stream(yielding(plan)?, self.context.task_ctx())
                .map_err(|e| self.describe(&e))?;
            let mut batches = Vec::new();
            let (mut row_count, mut truncated) = (0usize, false);
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|e| self.describe(&e))?;
                let room = limits.max_rows - row_count;
                if batch.num_rows() > room {
                    if room > 0 {
                        batches.push(batch.slice(0, room));
                        row_count += room;
                    }
                    truncated = true;
                    break;
                }
                row_count += batch.num_rows();
                if batch.num_rows() > 0 {
                    batches.push(batch);
                }
            }
            Ok(Answer {
                schema,
                batches,
                row_count,
                truncated,
                elapsed: started.elapsed(),
            })
        };
        tokio::time::timeout(limits.timeout, running)
            .await
            .map_err(|_| QueryError::Timeout(limits.timeout))?
    }

    /// A DataFusion failure in words: what is wrong, and for unknown tables which exist.
    fn describe(&self, error: &DataFusionError) -> QueryError {
        let root = error.find_root();
        let message = one_line(&root.strip_backtrace());
        match root {
            DataFusionError::SQL(parser, _) => QueryError::Sql(format!(
                "SQL syntax error: {}",
                match parser.as_ref() {
                    ParserError::TokenizerError(text) | ParserError::ParserError(text) =>
                        text.clone(),
                    ParserError::RecursionLimitExceeded => "the query nests too deeply".into(),
                }
            )),
            DataFusionError::ResourcesExhausted(detail) => QueryError::Memory(format!(
                "the query needs more memory than it may use: {}",
                one_line(detail)
            )),
            DataFusionError::Plan(text) if text.contains("not found") && text.contains("table") => {
                let named = self.missing.iter().find(|(name, _)| {
                    text.contains(&format!("'{name}'")) || text.contains(&format!(".{name}'"))
                });
                match named {
                    Some((_, why)) => QueryError::Sql(format!("{}: {why}", one_line(text))),
                    None => QueryError::Sql(format!(
                        "{}; tables: {}",
                        one_line(text),
                        match self.table_names() {
                            names if names.is_empty() => "none".to_owned(),
                            names => names.join(", "),
                        }
                    )),
                }
            }
            DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(_) => QueryError::Sql(message),
            DataFusionError::Execution(_) | DataFusionError::ArrowError(..) => {
                QueryError::Execution(message)
            }
            // Stored data that cannot be read (a damaged file, a store that fails): said
            // with what was being read when it happened.
            DataFusionError::ParquetError(_)
            | DataFusionError::ObjectStore(_)
            | DataFusionError::IoError(_) => {
                QueryError::Execution(one_line(&error.strip_backtrace()))
            }
            _ => QueryError::Internal(message),
        }
    }
}

/// `plan` with every operator's output spending the task's scheduling budget, so a query
/// that only computes (a join of small tables with a huge result, say) still yields: its
/// timeout can fire, and other work on the runtime (the pipelines) keeps running.
/// DataFusion on its own makes only the scans do this.
fn yielding(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>, QueryError> {
    plan.transform_up(|node| {
        Ok(if node.is::<CooperativeExec>() {
            Transformed::no(node)
        } else {
            Transformed::yes(Arc::new(CooperativeExec::new(node)) as Arc<dyn ExecutionPlan>)
        })
    })
    .map(|transformed| transformed.data)
    .map_err(|e| QueryError::Internal(format!("cannot prepare the query: {e}")))
}

/// Refuses anything but one read-only statement, naming what was sent instead.
fn check_read_only(sql: &str) -> Result<(), QueryError> {
    if sql.trim().is_empty() {
        return Err(QueryError::BadRequest(
            "the query is empty: send one SELECT".to_owned(),
        ));
    }
    let statements = match DFParser::parse_sql(sql) {
        Ok(statements) => statements,
        Err(DataFusionError::SQL(parser, _)) => {
            return Err(QueryError::Sql(format!(
                "SQL syntax error: {}",
                match parser.as_ref() {
                    ParserError::TokenizerError(text) | ParserError::ParserError(text) =>
                        text.clone(),
                    ParserError::RecursionLimitExceeded => "the query nests too deeply".into(),
                }
            )));
        }
        Err(other) => return Err(QueryError::Sql(one_line(&other.strip_backtrace()))),
    };
    if statements.len() != 1 {
        return Err(QueryError::BadRequest(format!(
            "send one statement at a time; this request holds {}",
            statements.len()
        )));
    }
    let reads = match &statements[0] {
        DfStatement::Statement(statement) => match statement.as_ref() {
            Statement::Query(_) => true,
            Statement::Explain { statement, .. } => {
                matches!(statement.as_ref(), Statement::Query(_))
            }
            _ => false,
        },
        DfStatement::Explain(explain) => matches!(
            explain.statement.as_ref(),
            DfStatement::Statement(inner) if matches!(inner.as_ref(), Statement::Query(_))
        ),
        _ => false,
    };
    if reads {
        return Ok(());
    }
    let written = statements[0].to_string();
    let verb = written
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    Err(QueryError::ReadOnly(format!(
        "queries are read-only: `{verb} …` is not allowed; send a SELECT"
    )))
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Registers every retained stream of `streams` as a table: as `pipeline.node` always,
/// and as plain `node` when no other retained stream has that name. Streams that are not
/// retained are named in the session so a query that reads one is told how to retain it.
pub fn register_streams(
    session: &mut Session,
    streams: &[Arc<StreamView>],
) -> Result<(), QueryError> {
    let mut by_node: BTreeMap<&str, usize> = BTreeMap::new();
    for view in streams.iter().filter(|view| view.is_retained()) {
        *by_node.entry(view.node()).or_default() += 1;
    }
    for view in streams {
        match view.retained_batches() {
            Some(batches) => {
                // A pipeline named like a built-in schema is reachable by node name only.
                let qualified = !matches!(view.pipeline(), DEFAULT_SCHEMA | "information_schema");
                if qualified {
                    session.register_batches(
                        Some(view.pipeline()),
                        view.node(),
                        view.schema().clone(),
                        batches.clone(),
                    )?;
                }
                if by_node.get(view.node()) == Some(&1) {
                    session.register_batches(None, view.node(), view.schema().clone(), batches)?;
                }
            }
            None if !by_node.contains_key(view.node()) => session.explain_missing(
                view.node(),
                format!(
                    "'{}' of pipeline '{}' is not retained; add `retain: {{duration: 15m, \
                     max_bytes: 64MB}}` to it to query it",
                    view.node(),
                    view.pipeline()
                ),
            ),
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
