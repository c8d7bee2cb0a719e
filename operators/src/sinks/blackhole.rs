//! The `blackhole` sink: accepts every batch and keeps nothing.
//!
//! For benchmarks and for trying a pipeline's upstream: what it receives is counted in
//! `weir_operator_rows_in_total` like any sink's input, and, when `log_every` is set, the
//! row count and rate are logged at that interval.

use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use serde::Deserialize;
use tracing::info;
use weir_engine::config::{ConfigErrors, HumanDuration};
use weir_engine::metrics::OperatorMetrics;
use weir_engine::registry::{NodeContext, OperatorFactory, OutputSpec, PlannedOperator, Role};
use weir_engine::{OperatorError, OperatorInstance, Sink};

/// Builds `blackhole` sinks.
pub struct BlackholeFactory;

/// The `config` of a `blackhole` sink.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlackholeConfig {
    /// Log how many rows arrived, and how fast, this often; by default nothing is logged.
    pub log_every: Option<HumanDuration>,
}

impl OperatorFactory for BlackholeFactory {
    fn kind(&self) -> &'static str {
        "blackhole"
    }

    fn roles(&self) -> &'static [Role] {
        &[Role::Sink]
    }

    fn plan(&self, node: &NodeContext<'_>) -> Result<Box<dyn PlannedOperator>, ConfigErrors> {
        let config: BlackholeConfig = node.config()?;
        let log_every = config.log_every.map(|d| d.0);
        if log_every.is_some_and(|every| every < Duration::from_millis(100)) {
            return Err(vec![
                node.field_error(&["log_every"], "log_every must be at least 100ms"),
            ]);
        }
        Ok(Box::new(Plan {
            node: node.name.to_owned(),
            log_every,
        }))
    }
}

struct Plan {
    node: String,
    log_every: Option<Duration>,
}

impl PlannedOperator for Plan {
    fn outputs(&self) -> Vec<OutputSpec> {
        Vec::new()
    }

    fn instantiate(
        self: Box<Self>,
        _metrics: &OperatorMetrics,
    ) -> Result<OperatorInstance, OperatorError> {
        Ok(OperatorInstance::Sink(Box::new(Blackhole {
            node: self.node,
            log_every: self.log_every,
            rows: 0,
            since_log: 0,
            last_log: Instant::now(),
        })))
    }
}

struct Blackhole {
    node: String,
    log_every: Option<Duration>,
    rows: u64,
    since_log: u64,
    last_log: Instant,
}

#[async_trait]
impl Sink for Blackhole {
    async fn write(&mut self, _input: usize, batch: RecordBatch) -> Result<(), OperatorError> {
        let rows = batch.num_rows() as u64;
        self.rows += rows;
        self.since_log += rows;
        if let Some(every) = self.log_every {
            let elapsed = self.last_log.elapsed();
            if elapsed >= every {
                info!(
                    "blackhole '{}': {} rows, {:.0} rows/s",
                    self.node,
                    self.rows,
                    self.since_log as f64 / elapsed.as_secs_f64()
                );
                self.since_log = 0;
                self.last_log = Instant::now();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::format::test_support::{Decl, plan};

    #[test]
    fn log_every_is_checked() {
        let Err(errors) = plan(
            &BlackholeFactory,
            Role::Sink,
            "log_every: 10ms",
            Decl::default(),
        ) else {
            panic!("a 10ms log interval is refused");
        };
        assert_eq!(errors[0].message, "log_every must be at least 100ms");
        assert!(
            plan(
                &BlackholeFactory,
                Role::Sink,
                "log_every: 5s",
                Decl::default()
            )
            .is_ok()
        );
        assert!(plan(&BlackholeFactory, Role::Sink, "", Decl::default()).is_ok());
    }

    #[tokio::test]
    async fn it_accepts_every_batch_and_closes() {
        let planned = plan(
            &BlackholeFactory,
            Role::Sink,
            "log_every: 1s",
            Decl::default(),
        )
        .expect("valid config");
        let OperatorInstance::Sink(mut sink) = planned
            .instantiate(&OperatorMetrics::detached("test", "node"))
            .expect("instantiates")
        else {
            panic!("not a sink");
        };
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2, 3]))]).unwrap();
        sink.write(0, batch.clone()).await.unwrap();
        sink.write(0, batch).await.unwrap();
        sink.close().await.unwrap();
    }
}
