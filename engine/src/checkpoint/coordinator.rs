//! The checkpoint coordinator of one pipeline: starts epochs, gathers every node's
//! snapshot and commits each complete epoch to the state store.
//!
//! One checkpoint is in flight at a time. The next starts `interval` after the previous
//! one started, or as soon as it completes if that took longer. A node that has ended
//! counts as having reported every later epoch; what it reported at its end is committed
//! with the next epoch, and when every node has ended the last epoch is committed (and
//! marked finished when every source ended on its own, so the next run starts afresh).
//! A node that fails reports nothing more, so nothing after the failure is committed and
//! a restart resumes from the last complete checkpoint.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounterVec, IntGauge};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, error, info};

use super::store::{StateStore, now_ms};
use super::{Epoch, StateChanges};

/// The checkpoint series of one pipeline.
#[derive(Clone)]
pub struct CheckpointMetrics {
    /// `weir_checkpoint_last_completed_epoch`.
    pub last_completed_epoch: IntGauge,
    /// `weir_checkpoint_duration_seconds`: from an epoch's start to its commit.
    pub duration: Histogram,
    /// `weir_checkpoint_bytes`: what the last checkpoint wrote.
    pub bytes: IntGauge,
    /// `weir_checkpoint_failures_total`, by reason.
    pub failures: IntCounterVec,
    /// The pipeline's label value, for `failures`.
    pub pipeline: String,
    /// `weir_checkpoint_last_completed_timestamp_seconds`.
    pub last_completed_at: IntGauge,
    /// `weir_checkpoint_age_seconds`: time since the last checkpoint completed.
    pub age: IntGauge,
}

/// The reasons `weir_checkpoint_failures_total` counts under.
pub const FAILURE_REASONS: [&str; 3] = ["store", "damaged_store", "restore"];

impl CheckpointMetrics {
    /// The failures counted for this pipeline, whatever their reason.
    pub fn failures_total(&self) -> u64 {
        FAILURE_REASONS
            .iter()
            .map(|reason| {
                self.failures
                    .with_label_values(&[self.pipeline.as_str(), reason])
                    .get()
            })
            .sum()
    }

    /// Counts a failure under `reason`, one of [`FAILURE_REASONS`].
    pub fn failed(&self, reason: &str) {
        self.failures
            .with_label_values(&[self.pipeline.as_str(), reason])
            .inc();
    }
}

/// What a node tells the coordinator.
pub(crate) enum Report {
    /// The node has passed barrier `epoch`; its state changed so since its last report.
    Snapshot {
        node: usize,
        epoch: Epoch,
        changes: StateChanges,
    },
    /// The node has ended, leaving its state so. `on_its_own` is false for a source that
    /// stopped because the pipeline was shutting down.
    Ended {
        node: usize,
        changes: StateChanges,
        on_its_own: bool,
    },
}

/// A node's line to the coordinator.
pub(crate) struct NodeLink {
    pub(crate) node: usize,
    /// The newest epoch the coordinator has started (sources inject it).
    pub(crate) requested: watch::Receiver<Epoch>,
    /// Asks the coordinator for a checkpoint before the interval is up.
    pub(crate) early: Arc<Notify>,
    /// The newest complete epoch.
    pub(crate) completed: watch::Receiver<Epoch>,
    reports: mpsc::UnboundedSender<Report>,
    /// For a source: the newest epoch it has injected.
    pub(crate) injected: Epoch,
}

impl NodeLink {
    pub(crate) fn snapshot(&self, epoch: Epoch, changes: StateChanges) {
        // A coordinator that has gone has nothing left to commit.
        let _ = self.reports.send(Report::Snapshot {
            node: self.node,
            epoch,
            changes,
        });
    }

    pub(crate) fn ended(&self, changes: StateChanges, on_its_own: bool) {
        let _ = self.reports.send(Report::Ended {
            node: self.node,
            changes,
            on_its_own,
        });
    }
}

/// A node as the coordinator knows it.
pub(crate) struct NodeEntry {
    pub(crate) name: String,
    pub(crate) fingerprint: String,
    pub(crate) is_source: bool,
    /// Changes not yet committed (for a node started fresh over old state: a clearing).
    pub(crate) pending: StateChanges,
}

/// The coordinator task's state.
pub(crate) struct Coordinator {
    pipeline: String,
    store: Arc<StateStore>,
    interval: Duration,
    nodes: Vec<NodeEntry>,
    last_completed: Epoch,
    request: watch::Sender<Epoch>,
    completed: watch::Sender<Epoch>,
    early: Arc<Notify>,
    reports: mpsc::UnboundedReceiver<Report>,
    report_tx: Option<mpsc::UnboundedSender<Report>>,
    metrics: CheckpointMetrics,
}

/// The epoch in flight.
struct InFlight {
    epoch: Epoch,
    started: Instant,
    reported: Vec<bool>,
}

impl Coordinator {
    pub(crate) fn new(
        pipeline: &str,
        store: Arc<StateStore>,
        interval: Duration,
        nodes: Vec<NodeEntry>,
        restored_epoch: Epoch,
        metrics: CheckpointMetrics,
    ) -> Self {
        let (request, _) = watch::channel(restored_epoch);
        let (completed, _) = watch::channel(restored_epoch);
        let (report_tx, reports) = mpsc::unbounded_channel();
        metrics
            .last_completed_epoch
            .set(i64::try_from(restored_epoch).unwrap_or(i64::MAX));
        Coordinator {
            pipeline: pipeline.to_owned(),
            store,
            interval,
            nodes,
            last_completed: restored_epoch,
            request,
            completed,
            early: Arc::new(Notify::new()),
            reports,
            report_tx: Some(report_tx),
            metrics,
        }
    }

    /// The line node number `node` reports on.
    pub(crate) fn link(&self, node: usize) -> NodeLink {
        NodeLink {
            node,
            requested: self.request.subscribe(),
            early: Arc::clone(&self.early),
            completed: self.completed.subscribe(),
            reports: self
                .report_tx
                .clone()
                .expect("links are made before the coordinator runs"),
            injected: *self.request.borrow(),
        }
    }

    /// Runs until every node has ended (committing the last epoch) or until every node
    /// has gone without all of them ending (a failure: nothing more is committed).
    pub(crate) async fn run(mut self) {
        self.report_tx = None;
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        let mut age = tokio::time::interval(Duration::from_secs(1));
        let mut in_flight: Option<InFlight> = None;
        let mut ended = vec![false; self.nodes.len()];
        let mut on_their_own = true;
        let mut due = false;
        let early = Arc::clone(&self.early);
        loop {
            tokio::select! {
                _ = ticks.tick() => due = true,
                () = early.notified() => due = true,
                _ = age.tick() => self.update_age(),
                report = self.reports.recv() => match report {
                    Some(Report::Snapshot { node, epoch, changes }) => {
                        if let Some(node_entry) = self.nodes.get_mut(node) {
                            node_entry.pending.then(changes);
                        }
                        if let Some(flight) = in_flight.as_mut().filter(|f| f.epoch == epoch)
                            && let Some(reported) = flight.reported.get_mut(node)
                        {
                            *reported = true;
                        }
                    }
                    Some(Report::Ended { node, changes, on_its_own }) => {
                        if let Some(node_entry) = self.nodes.get_mut(node) {
                            node_entry.pending.then(changes);
                            if node_entry.is_source && !on_its_own {
                                on_their_own = false;
                            }
                        }
                        if let Some(flag) = ended.get_mut(node) {
                            *flag = true;
                        }
                    }
                    None => {
                        debug!(pipeline = %self.pipeline, "a node failed: the last checkpoint stays as it was");
                        return;
                    }
                },
            }
            if ended.iter().all(|&done| done) {
                let epoch = in_flight
                    .as_ref()
                    .map_or(self.last_completed + 1, |f| f.epoch);
                let started = in_flight.as_ref().map_or_else(Instant::now, |f| f.started);
                if self.commit(epoch, started, on_their_own).await && on_their_own {
                    info!(
                        pipeline = %self.pipeline,
                        "every source ended on its own: the run is complete, and the next one starts afresh"
                    );
                }
                return;
            }
            if let Some(flight) = &in_flight
                && flight
                    .reported
                    .iter()
                    .zip(&ended)
                    .all(|(&reported, &ended)| reported || ended)
            {
                let (epoch, started) = (flight.epoch, flight.started);
                in_flight = None;
                self.commit(epoch, started, false).await;
            }
            if due && in_flight.is_none() {
                due = false;
                let epoch = self.last_completed.max(*self.request.borrow()) + 1;
                debug!(pipeline = %self.pipeline, epoch, "checkpoint started");
                in_flight = Some(InFlight {
                    epoch,
                    started: Instant::now(),
                    reported: vec![false; self.nodes.len()],
                });
                self.request.send_replace(epoch);
            }
        }
    }

    /// Writes `epoch` with every node's pending changes. On failure the changes stay
    /// pending and go with the next epoch.
    async fn commit(&mut self, epoch: Epoch, started: Instant, finished: bool) -> bool {
        let store = Arc::clone(&self.store);
        let nodes: Vec<(String, String, StateChanges)> = self
            .nodes
            .iter()
            .map(|node| {
                (
                    node.name.clone(),
                    node.fingerprint.clone(),
                    node.pending.clone(),
                )
            })
            .collect();
        let written = tokio::task::spawn_blocking(move || {
            let borrowed: Vec<(&str, &str, &StateChanges)> = nodes
                .iter()
                .map(|(name, fingerprint, changes)| (name.as_str(), fingerprint.as_str(), changes))
                .collect();
            store.commit(epoch, &borrowed, finished)
        })
        .await;
        match written {
            Ok(Ok(bytes)) => {
                for node in &mut self.nodes {
                    node.pending = StateChanges::unchanged();
                }
                self.last_completed = epoch;
                let took = started.elapsed();
                self.metrics.duration.observe(took.as_secs_f64());
                self.metrics
                    .bytes
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                self.metrics
                    .last_completed_epoch
                    .set(i64::try_from(epoch).unwrap_or(i64::MAX));
                self.metrics
                    .last_completed_at
                    .set(i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX));
                self.metrics.age.set(0);
                self.completed.send_replace(epoch);
                debug!(pipeline = %self.pipeline, epoch, bytes, took_ms = took.as_millis() as u64, "checkpoint complete");
                true
            }
            Ok(Err(store_error)) => {
                self.metrics.failed("store");
                error!(pipeline = %self.pipeline, epoch, "checkpoint failed: {store_error}; its changes go with the next one");
                false
            }
            Err(join_error) => {
                self.metrics.failed("store");
                error!(pipeline = %self.pipeline, epoch, "checkpoint failed: {join_error}");
                false
            }
        }
    }

    fn update_age(&self) {
        let at = self.metrics.last_completed_at.get();
        if at > 0 {
            let now = i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX);
            self.metrics.age.set(now.saturating_sub(at));
        }
    }
}
