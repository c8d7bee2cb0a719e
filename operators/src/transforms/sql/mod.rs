//! The `sql` transform: a SELECT query over the transform's inputs, run by DataFusion.
//!
//! Each input is a table named after it (`FROM sensors`). Without a window the query
//! runs on every batch alone, so only queries whose result does not depend on how rows
//! are cut into batches are accepted (projections, filters, scalar functions, UNION ALL
//! of inputs). With a window (`window: {tumbling: 10s}` or `{hopping: …}`) rows are
//! grouped by event time and the query runs once per window when the watermark passes
//! its end; the output starts with `window_start` and `window_end`.
//!
//! The query is parsed, checked and planned to a physical plan once, in
//! [`SqlFactory`]'s pure planning step, so `weir validate` reports a misspelt column
//! before anything runs. The running operator only rebinds that plan to new rows (see
//! `plan.rs`); windows and their panes live in `window.rs`, and the split of a windowed
//! aggregate into incremental phases in `incremental.rs`.

mod incremental;
mod isolate;
mod partition;
mod plan;
mod stateless;
#[cfg(test)]
mod tests;
mod window;

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Column, SchemaError, TableReference};
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion::sql::sqlparser::parser::ParserError;
use serde::Deserialize;
use weir_engine::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use weir_engine::arrow::error::ArrowError;
use weir_engine::config::{ConfigError, ConfigErrors, HumanSize, Location, closest_match};
use weir_engine::metrics::OperatorMetrics;
use weir_engine::registry::{
    InputStream, MAIN_PORT_NAME, NodeContext, OnError, OutputSpec, Partitionable, StreamInfo,
};
use weir_engine::time::{WindowSpec, is_event_time_type};
use weir_engine::{OperatorError, OperatorFactory, OperatorInstance, PlannedOperator, Role};

use self::incremental::{IncrementalPlan, NotIncremental};
use self::isolate::{DeadLetters, QUERY_ERROR, dead_letter_schema};
use self::plan::{InputTable, SqlPlan, new_session};
use self::stateless::StatelessSql;
use self::window::{WindowQuery, WindowSettings, WindowedSql};

/// The column a windowed transform puts first: the window's inclusive start.
pub const WINDOW_START: &str = "window_start";
/// The column a windowed transform puts second: the window's exclusive end.
pub const WINDOW_END: &str = "window_end";
/// The side port of a windowed transform with one input, carrying its late rows.
pub const LATE_PORT_NAME: &str = "late";
/// The index of [`LATE_PORT_NAME`] among the transform's output ports.
const LATE_PORT: usize = 1;
/// The most windows a hopping window may put one row into (`size / slide`). Each is a
/// separate query execution over the window's rows.
const MAX_WINDOWS_PER_ROW: i64 = 10_000;
/// The default bound on a windowed transform's state (`max_state_bytes`): 256 MiB.
pub const DEFAULT_MAX_STATE_BYTES: u64 = 256 << 20;

/// The `config` of a `sql` transform.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// One SELECT query over the transform's inputs, each a table named after its input
    /// (`SELECT device, temperature FROM sensors WHERE temperature > 80`). Unquoted
    /// names are lower-cased; quote names with capitals (`"Temp"`). Without a window the
    /// query runs on each batch alone, so aggregates, window functions, ORDER BY, LIMIT,
    /// DISTINCT, joins and subqueries need a `window` on the transform.
    pub query: String,
    /// The most memory a windowed transform's state may take: accumulator state, or
    /// rows for a query that is not computed incrementally (default 256 MiB). While
    /// the state is over it, arriving rows are dropped and counted under the reason
    /// `state_limit` until closing windows free room; DataFusion's working memory per
    /// execution is bounded by the same figure.
    #[serde(default)]
    pub max_state_bytes: Option<HumanSize>,
}

/// Builds `sql` transforms.
pub struct SqlFactory;

impl OperatorFactory for SqlFactory {
    fn kind(&self) -> &'static str {
        "sql"
    }

    fn roles(&self) -> &'static [Role] {
        &[Role::Transform]
    }

    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config: SqlConfig = node
            .config
            .deserialize_into(node.config_path)
            .map_err(|e| vec![e])?;
        let location = node
            .config
            .get("query")
            .map_or(node.config.location, |query| query.location);
        let max_state_bytes = config
            .max_state_bytes
            .map_or(DEFAULT_MAX_STATE_BYTES, |size| size.0);
        if max_state_bytes == 0 {
            return Err(vec![node.field_error(
                &["max_state_bytes"],
                "max_state_bytes must be more than zero",
            )]);
        }
        let planner = Planner {
            node,
            query: &config.query,
            max_state_bytes: usize::try_from(max_state_bytes).unwrap_or(usize::MAX),
            path: format!("{}.query", node.config_path),
            location,
        };
        if !node.inputs_known {
            // An upstream could not be planned, so its schema is unknown: report only what
            // does not depend on it, and let the upstream's own errors speak.
            return Err(planner.syntax_errors());
        }
        Ok(Box::new(planner.plan()?))
    }
}

/// How a planned transform runs.
enum Mode {
    /// Once per batch.
    Stateless,
    /// Once per window, with the event-time column of each input.
    Windowed {
        window: WindowSpec,
        event_time_columns: Vec<usize>,
        /// The query split into aggregation phases, or why it is run over buffered rows.
        incremental: Result<IncrementalPlan, NotIncremental>,
        max_state_bytes: usize,
    },
}

/// A `sql` transform whose query has been checked and planned.
struct PlannedSql {
    name: String,
    plan: SqlPlan,
    mode: Mode,
    outputs: Vec<OutputSpec>,
    input_names: Vec<String>,
    /// The `dead_letter` port's index, with `on_error: dead_letter`.
    dead_letter: Option<usize>,
    /// Whether it can run as parallel instances, and on which keys.
    partitionable: Partitionable,
}

impl PlannedOperator for PlannedSql {
    fn outputs(&self) -> Vec<OutputSpec> {
        self.outputs.clone()
    }

    fn notes(&self) -> Vec<String> {
        match &self.mode {
            Mode::Stateless => Vec::new(),
            Mode::Windowed {
                incremental: Err(reason),
                ..
            } => vec![format!(
                "its windows keep every row until they close, because {reason}; the rows count towards max_state_bytes"
            )],
            Mode::Windowed {
                incremental: Ok(plan),
                ..
            } if !plan.value_keeping.is_empty() => vec![format!(
                "its windows keep aggregate state per group, but {} keep every value of the window in that state; it counts towards max_state_bytes",
                plan.value_keeping.join(", ")
            )],
            Mode::Windowed { .. } => Vec::new(),
        }
    }

    fn partitionable(&self) -> Partitionable {
        self.partitionable.clone()
    }

    fn instantiate(
        self: Box<Self>,
        metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        let PlannedSql {
            name,
            plan,
            mode,
            outputs,
            input_names,
            dead_letter,
            partitionable: _,
        } = *self;
        let dead_letters = dead_letter.map(|port| DeadLetters {
            port,
            input_names: input_names.clone(),
        });
        Ok(OperatorInstance::Transform(match mode {
            Mode::Stateless => Box::new(StatelessSql::new(name, plan, input_names, dead_letters)),
            Mode::Windowed {
                window,
                event_time_columns,
                incremental,
                max_state_bytes,
            } => {
                let schema = Arc::clone(&outputs[0].stream.schema);
                let query = match incremental {
                    Ok(split) => WindowQuery::Incremental(split),
                    Err(_) => WindowQuery::Buffered(plan),
                };
                let settings = WindowSettings {
                    window,
                    event_time_columns,
                    max_state_bytes,
                };
                Box::new(WindowedSql::new(
                    name,
                    input_names,
                    query,
                    schema,
                    settings,
                    metrics.state(),
                    dead_letters,
                ))
            }
        }))
    }
}

/// Checks and plans one transform's query, collecting every problem it can find.
struct Planner<'a> {
    node: &'a NodeContext<'a>,
    query: &'a str,
    /// Where the query sits in the document; the errors point there.
    path: String,
    location: Location,
    max_state_bytes: usize,
}

impl Planner<'_> {
    fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.path.clone(), self.location, message)
    }

    fn name(&self) -> &str {
        self.node.name
    }

    fn inputs(&self) -> &[InputStream] {
        self.node.inputs
    }

    fn plan(&self) -> Result<PlannedSql, ConfigErrors> {
        let mut errors = Vec::new();
        self.check_inputs(&mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let window = self.node.window;
        if let Some(window) = window {
            self.check_window(window, &mut errors);
        }
        let event_time_columns = match window {
            Some(_) => self.event_time_columns(&mut errors),
            None => Vec::new(),
        };

        let ctx = new_session(self.max_state_bytes);
        for (index, input) in self.inputs().iter().enumerate() {
            let table = InputTable::new(index, &input.name, Arc::clone(&input.stream.schema));
            if let Err(error) =
                ctx.register_table(TableReference::bare(input.name.as_str()), Arc::new(table))
            {
                errors.push(self.error(format!(
                    "sql transform '{}' cannot use input '{}' as a table: {}",
                    self.name(),
                    input.name,
                    innermost(&error).message()
                )));
            }
        }
        let state = ctx.state();
        let Some(logical) = self.logical_plan(&state, &mut errors) else {
            return Err(errors);
        };
        self.check_reads_every_input(&logical, &mut errors);
        if window.is_none() {
            self.check_stateless(&logical, &mut errors);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let partitionable = match window {
            Some(_) => partition::windowed(&logical, self.inputs()),
            None => Partitionable::AnyKeys,
        };

        let optimized = state
            .optimize(&logical)
            .map_err(|e| vec![self.plan_error(&e)])?;
        let physical = futures::executor::block_on(
            state
                .query_planner()
                .create_physical_plan(&optimized, &state),
        )
        .map_err(|e| vec![self.plan_error(&e)])?;
        let query_schema = physical.schema();
        let task_ctx = state.task_ctx();
        let mode = match window {
            Some(window) => Mode::Windowed {
                window,
                event_time_columns,
                incremental: IncrementalPlan::split(&physical, &task_ctx, self.inputs().len()),
                max_state_bytes: self.max_state_bytes,
            },
            None => Mode::Stateless,
        };
        let main = match &mode {
            Mode::Stateless => StreamInfo {
                schema: Arc::clone(&query_schema),
                event_time: self.passed_through_event_time(&optimized, &query_schema),
            },
            Mode::Windowed { .. } => StreamInfo {
                schema: self.windowed_schema(&query_schema)?,
                event_time: Some(WINDOW_START.to_owned()),
            },
        };
        let mut outputs = vec![OutputSpec {
            name: MAIN_PORT_NAME.to_owned(),
            stream: main,
            unwired_drop_reason: None,
        }];
        if let (Mode::Windowed { .. }, [input]) = (&mode, self.inputs()) {
            outputs.push(OutputSpec {
                name: LATE_PORT_NAME.to_owned(),
                stream: input.stream.clone(),
                unwired_drop_reason: Some("late"),
            });
        }
        let dead_letter = (self.node.on_error == OnError::DeadLetter).then(|| {
            outputs.push(OutputSpec {
                name: crate::rejects::DEAD_LETTER_PORT_NAME.to_owned(),
                stream: StreamInfo {
                    schema: dead_letter_schema(),
                    event_time: None,
                },
                unwired_drop_reason: Some(QUERY_ERROR),
            });
            outputs.len() - 1
        });
        Ok(PlannedSql {
            dead_letter,
            partitionable,
            name: self.name().to_owned(),
            plan: SqlPlan::new(physical, task_ctx, self.inputs().len()),
            mode,
            outputs,
            input_names: self.inputs().iter().map(|i| i.name.clone()).collect(),
        })
    }

    fn check_inputs(&self, errors: &mut ConfigErrors) {
        if self.inputs().is_empty() {
            errors.push(
                self.error(format!("sql transform '{}' has no inputs", self.name()))
                    .with_hint(
                        "list the streams its query reads under inputs, e.g. inputs: [sensors]",
                    ),
            );
        }
        for (index, input) in self.inputs().iter().enumerate() {
            if self.inputs()[..index]
                .iter()
                .any(|earlier| earlier.name == input.name)
            {
                errors.push(
                    self.error(format!(
                        "sql transform '{}' reads '{}' twice; each input is one table",
                        self.name(),
                        input.name
                    ))
                    .with_hint("list each input once; a query may read one table several times"),
                );
            }
        }
    }

    fn check_window(&self, window: WindowSpec, errors: &mut ConfigErrors) {
        let (size, slide) = (window.size_ms(), window.slide_ms());
        let window_path = match self.node.config_path.strip_suffix(".config") {
            Some(node_path) => format!("{node_path}.window"),
            None => self.path.clone(),
        };
        let error = |message: String| ConfigError::new(window_path.clone(), self.location, message);
        if size <= 0 || slide <= 0 {
            errors.push(
                error(format!(
                    "the window of sql transform '{}' must be at least 1ms long and slide by at least 1ms",
                    self.name()
                ))
                .with_hint("write a duration such as 10s"),
            );
        } else if slide > size {
            errors.push(
                error(format!(
                    "the window of sql transform '{}' slides further than it is long, so rows between windows would be lost",
                    self.name()
                ))
                .with_hint("make the slide at most the window size, or use a tumbling window"),
            );
        } else if size / slide > MAX_WINDOWS_PER_ROW {
            errors.push(
                error(format!(
                    "the window of sql transform '{}' puts every row into {} windows; at most {MAX_WINDOWS_PER_ROW} are supported",
                    self.name(),
                    size / slide
                ))
                .with_hint("use a longer slide or a shorter window"),
            );
        }
    }

    fn event_time_columns(&self, errors: &mut ConfigErrors) -> Vec<usize> {
        let mut columns = Vec::new();
        for input in self.inputs() {
            let Some(column) = &input.stream.event_time else {
                errors.push(self.error(format!(
                    "windowed sql transform '{}' needs an event-time column on input '{}'; declare event_time on its source",
                    self.name(),
                    input.name
                )));
                continue;
            };
            let schema = &input.stream.schema;
            match schema.index_of(column) {
                Ok(index) if is_event_time_type(schema.field(index).data_type()) => {
                    columns.push(index);
                }
                _ => errors.push(self.error(format!(
                    "the event-time column '{column}' of input '{}' is not a timestamp column of that stream",
                    input.name
                ))),
            }
        }
        columns
    }

    /// Problems in the query text alone: empty, not SQL, or not a single SELECT.
    fn syntax_errors(&self) -> ConfigErrors {
        let mut errors = Vec::new();
        if self.query.trim().is_empty() {
            return errors;
        }
        let state = new_session(DEFAULT_MAX_STATE_BYTES as usize).state();
        let dialect = state.config().options().sql_parser.dialect;
        match state.sql_to_statement(self.query, &dialect) {
            Ok(statement) => {
                if let Some(kind) = non_query_kind(&statement) {
                    errors.push(self.only_select(&kind));
                }
            }
            Err(error) => errors.push(self.parse_error(&error)),
        }
        errors
    }

    /// Parses the query, checks it is one SELECT over known tables and plans it.
    fn logical_plan(&self, state: &SessionState, errors: &mut ConfigErrors) -> Option<LogicalPlan> {
        if self.query.trim().is_empty() {
            errors.push(
                self.error(format!(
                    "the query of sql transform '{}' is empty",
                    self.name()
                ))
                .with_hint("write a SELECT query over the transform's inputs"),
            );
            return None;
        }
        let dialect = state.config().options().sql_parser.dialect;
        let statement = match state.sql_to_statement(self.query, &dialect) {
            Ok(statement) => statement,
            Err(error) => {
                errors.push(self.parse_error(&error));
                return None;
            }
        };
        if let Some(kind) = non_query_kind(&statement) {
            errors.push(self.only_select(&kind));
            return None;
        }
        match state.resolve_table_references(&statement) {
            Ok(tables) => {
                for table in tables {
                    self.check_table(state, &table, errors);
                }
            }
            Err(error) => errors.push(self.plan_error(&error)),
        }
        if !errors.is_empty() {
            return None;
        }
        match futures::executor::block_on(state.statement_to_plan(statement)) {
            Ok(plan) => {
                // Statements the parser lets through as queries, e.g. SELECT … INTO.
                let kind = match &plan {
                    LogicalPlan::Ddl(_) => Some("statements that create tables (SELECT … INTO)"),
                    LogicalPlan::Dml(_) | LogicalPlan::Copy(_) => Some("statements that write"),
                    LogicalPlan::Statement(_) => Some("session statements"),
                    LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => Some("EXPLAIN statements"),
                    LogicalPlan::DescribeTable(_) => Some("DESCRIBE statements"),
                    _ => None,
                };
                match kind {
                    Some(kind) => {
                        errors.push(self.only_select(kind));
                        None
                    }
                    None => Some(plan),
                }
            }
            Err(error) => {
                errors.push(self.plan_error(&error));
                None
            }
        }
    }

    fn only_select(&self, kind: &str) -> ConfigError {
        self.error(format!(
            "sql transform '{}' runs only SELECT queries, not {kind}",
            self.name()
        ))
        .with_hint("write one SELECT … FROM <input> query")
    }

    fn check_table(&self, state: &SessionState, table: &TableReference, errors: &mut ConfigErrors) {
        let name = table.table();
        if self.inputs().iter().any(|input| input.name == name)
            || state.table_functions().contains_key(name)
        {
            return;
        }
        let inputs: Vec<&str> = self.inputs().iter().map(|i| i.name.as_str()).collect();
        let mut error = self.error(format!(
            "no table '{name}' in transform '{}'; its inputs are: {}",
            self.name(),
            inputs.join(", ")
        ));
        error = error.with_hint(match closest_match(name, inputs.iter().copied()) {
            Some(near) if needs_quotes(near, name) => {
                format!("unquoted names are lower-cased: write \"{near}\" in double quotes")
            }
            Some(near) => format!("did you mean '{near}'?"),
            None => format!("read one of the inputs, or add '{name}' to the transform's inputs"),
        });
        errors.push(error);
    }

    fn check_reads_every_input(&self, plan: &LogicalPlan, errors: &mut ConfigErrors) {
        let mut scanned = BTreeSet::new();
        let _ = plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                scanned.insert(scan.table_name.table().to_owned());
            }
            Ok(TreeNodeRecursion::Continue)
        });
        for input in self.inputs() {
            if !scanned.contains(&input.name) {
                errors.push(
                    self.error(format!(
                        "the query of sql transform '{}' does not read its input '{}', whose rows would be lost",
                        self.name(),
                        input.name
                    ))
                    .with_hint(format!(
                        "read it in the query (FROM {}) or remove it from inputs",
                        input.name
                    )),
                );
            }
        }
    }

    /// Rejects what would silently compute per batch without a window.
    fn check_stateless(&self, plan: &LogicalPlan, errors: &mut ConfigErrors) {
        let mut found: Vec<&'static str> = Vec::new();
        let _ = plan.apply_with_subqueries(|node| {
            let construct = match node {
                LogicalPlan::Aggregate(_) => Some("an aggregate (GROUP BY, count, avg, …)"),
                LogicalPlan::Window(_) => Some("a window function (OVER …)"),
                LogicalPlan::Sort(_) => Some("ORDER BY"),
                LogicalPlan::Limit(_) => Some("LIMIT"),
                LogicalPlan::Distinct(_) => Some("DISTINCT"),
                LogicalPlan::Join(_) => Some("a join"),
                LogicalPlan::Subquery(_) => Some("a subquery"),
                LogicalPlan::RecursiveQuery(_) => Some("a recursive query"),
                _ => None,
            };
            if let Some(construct) = construct
                && !found.contains(&construct)
            {
                found.push(construct);
            }
            Ok(TreeNodeRecursion::Continue)
        });
        if !found.is_empty() {
            errors.push(
                self.error(format!(
                    "the query of sql transform '{}' uses {} but the transform has no window, so it would run on each batch alone",
                    self.name(),
                    found.join(" and ")
                ))
                .with_hint(
                    "add `window: {tumbling: 10s}` to the transform to compute it over event-time windows",
                ),
            );
        }
    }

    /// The input's event-time column, when the query passes it through unchanged under
    /// its own name (one input only: with several, rows of different streams mix).
    fn passed_through_event_time(&self, plan: &LogicalPlan, schema: &SchemaRef) -> Option<String> {
        let [input] = self.inputs() else {
            return None;
        };
        let column = input.stream.event_time.as_ref()?;
        let index = schema.index_of(column).ok()?;
        passes_through(plan, index, &input.name, column).then(|| column.clone())
    }

    fn windowed_schema(&self, query: &SchemaRef) -> Result<SchemaRef, ConfigErrors> {
        let clashes: Vec<ConfigError> = [WINDOW_START, WINDOW_END]
            .into_iter()
            .filter(|name| query.field_with_name(name).is_ok())
            .map(|name| {
                self.error(format!(
                    "the query of windowed sql transform '{}' outputs a column named '{name}', which the window adds itself",
                    self.name()
                ))
                .with_hint(format!("rename it with AS, or drop it: every output row gets {WINDOW_START} and {WINDOW_END}"))
            })
            .collect();
        if !clashes.is_empty() {
            return Err(clashes);
        }
        let bound = |name| {
            Arc::new(Field::new(
                name,
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ))
        };
        let mut fields = vec![bound(WINDOW_START), bound(WINDOW_END)];
        fields.extend(query.fields().iter().cloned());
        Ok(Arc::new(Schema::new_with_metadata(
            fields,
            query.metadata().clone(),
        )))
    }

    fn parse_error(&self, error: &DataFusionError) -> ConfigError {
        let root = innermost(error);
        match root {
            DataFusionError::SQL(parser, _) => {
                let detail = match parser.as_ref() {
                    ParserError::TokenizerError(text) | ParserError::ParserError(text) => {
                        text.clone()
                    }
                    ParserError::RecursionLimitExceeded => "the query nests too deeply".to_owned(),
                };
                self.error(format!("sql syntax error: {detail}"))
            }
            DataFusionError::NotImplemented(text) if text.contains("single SQL statement") => self
                .error(format!(
                    "sql transform '{}' takes one query, but its query holds several statements",
                    self.name()
                ))
                .with_hint("remove the extra statements (and the semicolons between them)"),
            _ => self.plan_error(error),
        }
    }

    /// Describes a planning failure, naming the column or table it is about.
    fn plan_error(&self, error: &DataFusionError) -> ConfigError {
        match innermost(error) {
            DataFusionError::SchemaError(schema_error, _) => match schema_error.as_ref() {
                SchemaError::FieldNotFound { field, .. } => self.unknown_column(field),
                SchemaError::AmbiguousReference { field } => self
                    .error(format!(
                        "sql: column name '{}' is ambiguous in transform '{}'",
                        field.name,
                        self.name()
                    ))
                    .with_hint(format!(
                        "qualify it with its table, e.g. {}.{}",
                        self.inputs()[0].name,
                        field.name
                    )),
                other => self.error(format!("sql: {other} in transform '{}'", self.name())),
            },
            root => self.error(format!(
                "sql: cannot plan the query of transform '{}': {}",
                self.name(),
                one_line(&root.message())
            )),
        }
    }

    fn unknown_column(&self, field: &Column) -> ConfigError {
        // A qualified name (`sensors.x`) is looked up in that input; otherwise in all.
        let qualified: Vec<&InputStream> = match &field.relation {
            Some(relation) => self
                .inputs()
                .iter()
                .filter(|input| input.name == relation.table())
                .collect(),
            None => Vec::new(),
        };
        let candidates = if qualified.is_empty() {
            self.inputs().iter().collect()
        } else {
            qualified
        };
        let listing: Vec<String> = candidates
            .iter()
            .map(|input| {
                let names: Vec<&str> = input
                    .stream
                    .schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect();
                format!("columns of {}: {}", input.name, names.join(", "))
            })
            .collect();
        let error = self.error(format!(
            "sql: no column named '{}' in transform '{}'; {}",
            field.name,
            self.name(),
            listing.join("; ")
        ));
        let names = candidates.iter().flat_map(|input| {
            input
                .stream
                .schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
        });
        match closest_match(&field.name, names) {
            Some(near) if needs_quotes(near, &field.name) => error.with_hint(format!(
                "unquoted names are lower-cased: write \"{near}\" in double quotes"
            )),
            Some(near) => error.with_hint(format!("did you mean '{near}'?")),
            None => error,
        }
    }
}

/// The kind of a statement other than a query (`INSERT`, `EXPLAIN`, …), or `None` for a
/// query.
fn non_query_kind(statement: &DfStatement) -> Option<String> {
    match statement {
        DfStatement::Statement(inner) => match inner.as_ref() {
            SqlStatement::Query(_) => None,
            other => {
                let text = other.to_string();
                let words: Vec<&str> = text.split_whitespace().take(2).collect();
                Some(format!("{} statements", words.join(" ").to_uppercase()))
            }
        },
        DfStatement::CreateExternalTable(_) => Some("CREATE EXTERNAL TABLE statements".into()),
        DfStatement::CopyTo(_) => Some("COPY statements".into()),
        DfStatement::Explain(_) => Some("EXPLAIN statements".into()),
        DfStatement::Reset(_) => Some("RESET statements".into()),
    }
}

/// Whether output column `index` of `plan` is column `column` of table `table`, passed
/// through unchanged.
fn passes_through(plan: &LogicalPlan, index: usize, table: &str, column: &str) -> bool {
    match plan {
        LogicalPlan::Projection(projection) => {
            let mut expr = match projection.expr.get(index) {
                Some(expr) => expr,
                None => return false,
            };
            while let Expr::Alias(alias) = expr {
                expr = &alias.expr;
            }
            let Expr::Column(source) = expr else {
                return false;
            };
            projection
                .input
                .schema()
                .index_of_column(source)
                .is_ok_and(|inner| passes_through(&projection.input, inner, table, column))
        }
        LogicalPlan::Filter(filter) => passes_through(&filter.input, index, table, column),
        LogicalPlan::SubqueryAlias(alias) => passes_through(&alias.input, index, table, column),
        LogicalPlan::Repartition(repartition) => {
            passes_through(&repartition.input, index, table, column)
        }
        LogicalPlan::Union(union) => union
            .inputs
            .iter()
            .all(|input| passes_through(input, index, table, column)),
        LogicalPlan::TableScan(scan) => {
            let source = match &scan.projection {
                Some(projection) => projection.get(index).copied(),
                None => Some(index),
            };
            scan.table_name.table() == table
                && source
                    .and_then(|source| scan.source.schema().fields().get(source).cloned())
                    .is_some_and(|field| field.name() == column)
        }
        _ => false,
    }
}

/// Whether `written` names `actual` but for case, and quoting would fix it: unquoted
/// names are lower-cased, so only names with capitals need quotes.
fn needs_quotes(actual: &str, written: &str) -> bool {
    actual != written && actual.eq_ignore_ascii_case(written) && actual != actual.to_lowercase()
}

/// One line of DataFusion's text for a message.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The error under DataFusion's wrappers (context, diagnostics, shared errors).
fn innermost(error: &DataFusionError) -> &DataFusionError {
    let mut error = error;
    loop {
        error = match error {
            DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => {
                inner.as_ref()
            }
            DataFusionError::Shared(inner) => inner.as_ref(),
            DataFusionError::Collection(errors) if !errors.is_empty() => &errors[0],
            other => return other,
        };
    }
}

/// Turns a DataFusion failure while running the query into an operator error: bad data
/// (a failed cast, a division by zero) is the user's; anything else is Weir's.
fn execution_error(transform: &str, what: &str, error: DataFusionError) -> OperatorError {
    let message = format!(
        "sql transform '{transform}' failed on {what}: {}",
        one_line(&innermost(&error).message())
    );
    // Running out of the memory limit is the user's to fix too, but not a row's fault.
    let exhausted = matches!(innermost(&error), DataFusionError::ResourcesExhausted(_));
    if is_data_error(&error) || exhausted {
        OperatorError::User(message)
    } else {
        OperatorError::Internal(message)
    }
}

/// Whether a failure is about the rows the query ran over (the user's data) rather than
/// about Weir: only those are isolated by `on_error: dead_letter`.
fn is_data_error(error: &DataFusionError) -> bool {
    match innermost(error) {
        DataFusionError::ArrowError(arrow, _) => matches!(
            arrow.as_ref(),
            ArrowError::CastError(_)
                | ArrowError::ComputeError(_)
                | ArrowError::DivideByZero
                | ArrowError::ArithmeticOverflow(_)
                | ArrowError::InvalidArgumentError(_)
                | ArrowError::ParseError(_)
        ),
        DataFusionError::Execution(_) => true,
        _ => false,
    }
}

/// Milliseconds since the epoch as an RFC 3339 time, for messages.
fn format_millis(millis: i64) -> String {
    // humantime formats years 1970 to 9999 only.
    const MAX_FORMATTED: i64 = 253_402_300_799_999;
    match u64::try_from(millis) {
        Ok(positive) if millis <= MAX_FORMATTED => humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(positive),
        )
        .to_string(),
        _ => format!("{millis}ms"),
    }
}
