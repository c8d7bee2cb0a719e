//! The hub's Prometheus metrics: requests by route, devices by connection, deployments
//! by rollout status, and the data the devices ship.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::protocol::Rollout;

/// The least time between two computations of the fleet gauges.
pub const FLEET_GAUGE_INTERVAL_MS: i64 = 5_000;

/// The hub's metrics, in their own registry.
pub struct HubMetrics {
    /// When the fleet gauges were last computed, ms since the epoch.
    fleet_updated_ms: std::sync::atomic::AtomicI64,
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    devices: IntGaugeVec,
    deployments: IntGaugeVec,
    rollout: IntGaugeVec,
    ingested: IntCounterVec,
    refused: IntCounterVec,
    quarantined: prometheus::IntGauge,
    fleet_scans: prometheus::IntCounter,
}

impl Default for HubMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl HubMetrics {
    /// The metric families, registered.
    pub fn new() -> HubMetrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "weir_hub_http_requests_total",
                "HTTP requests answered, by method, route and status code.",
            ),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        // Long polls are held up to a minute: the buckets reach past that.
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "weir_hub_http_request_duration_seconds",
                "Time to answer HTTP requests, by method and route (long polls included).",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 120.0,
            ]),
            &["method", "route"],
        )
        .expect("valid metric");
        let devices = IntGaugeVec::new(
            Opts::new(
                "weir_hub_devices",
                "Registered devices by connection: online, offline, never (seen).",
            ),
            &["connection"],
        )
        .expect("valid metric");
        let deployments = IntGaugeVec::new(
            Opts::new(
                "weir_hub_deployments",
                "Deployments by rollout status: idle, rolling-out, complete, failing.",
            ),
            &["status"],
        )
        .expect("valid metric");
        let rollout = IntGaugeVec::new(
            Opts::new(
                "weir_hub_deployment_devices",
                "Devices per deployment: targeted, applied, succeeded, failed.",
            ),
            &["deployment", "count"],
        )
        .expect("valid metric");
        let ingested = IntCounterVec::new(
            Opts::new(
                "weir_hub_ingested_total",
                "What the devices shipped and the hub stored: rows, and bytes as shipped.",
            ),
            &["unit"],
        )
        .expect("valid metric");
        let refused = IntCounterVec::new(
            Opts::new(
                "weir_hub_ingest_refused_total",
                "Shipped batches the hub refused, by reason: malformed, over-limit, conflict \
                 (a column of another type, a hub_* column, a reserved pipeline name).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let quarantined = prometheus::IntGauge::new(
            "weir_hub_quarantined_files",
            "Files of the fleet's data this hub found unreadable and moved under quarantine/ \
             since it started.",
        )
        .expect("valid metric");
        let fleet_scans = prometheus::IntCounter::new(
            "weir_hub_fleet_scans_total",
            "Times this hub read every device row to summarise the fleet for /status and the \
             fleet gauges; at most once a second, however often they are asked for.",
        )
        .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(ingested.clone()),
            Box::new(refused.clone()),
            Box::new(quarantined.clone()),
            Box::new(fleet_scans.clone()),
            Box::new(latency.clone()),
            Box::new(devices.clone()),
            Box::new(deployments.clone()),
            Box::new(rollout.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        HubMetrics {
            fleet_updated_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            registry,
            requests,
            latency,
            devices,
            deployments,
            rollout,
            ingested,
            refused,
            quarantined,
            fleet_scans,
        }
    }

    /// Counts one read of every device row.
    pub fn fleet_scanned(&self) {
        self.fleet_scans.inc();
    }

    /// Counts one refused batch.
    pub fn refused(&self, reason: &str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    /// Sets how many files were quarantined.
    pub fn set_quarantined(&self, files: u64) {
        self.quarantined
            .set(i64::try_from(files).unwrap_or(i64::MAX));
    }

    /// Counts one stored batch.
    pub fn ingested(&self, rows: u64, bytes: usize) {
        self.ingested.with_label_values(&["rows"]).inc_by(rows);
        self.ingested
            .with_label_values(&["bytes"])
            .inc_by(bytes as u64);
    }

    /// Counts one answered request.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .with_label_values(&[method, route, &status.to_string()])
            .inc();
        self.latency
            .with_label_values(&[method, route])
            .observe(seconds);
    }

    /// Whether the fleet gauges are older than [`FLEET_GAUGE_INTERVAL_MS`] at `now_ms`;
    /// if so, the caller is the one to recompute them. Scrapes (which need no token)
    /// cannot make the hub read its whole registry more often than that.
    pub fn fleet_due(&self, now_ms: i64) -> bool {
        use std::sync::atomic::Ordering;
        let last = self.fleet_updated_ms.load(Ordering::Acquire);
        now_ms.saturating_sub(last) >= FLEET_GAUGE_INTERVAL_MS
            && self
                .fleet_updated_ms
                .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Sets the fleet gauges: devices per connection state, and each deployment's
    /// rollout. Deployments gone since the last call disappear from the gauges.
    pub fn set_fleet<'a>(
        &self,
        connections: [(&str, i64); 3],
        rollouts: impl IntoIterator<Item = (&'a str, Rollout)>,
    ) {
        for (state, count) in connections {
            self.devices.with_label_values(&[state]).set(count);
        }
        self.rollout.reset();
        let mut by_status = [
            ("idle", 0),
            ("rolling-out", 0),
            ("complete", 0),
            ("failing", 0),
        ];
        for (name, rollout) in rollouts {
            for (count, value) in [
                ("targeted", rollout.targeted),
                ("applied", rollout.applied),
                ("succeeded", rollout.succeeded),
                ("failed", rollout.failed),
            ] {
                self.rollout
                    .with_label_values(&[name, count])
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            }
            if let Some(slot) = by_status.iter_mut().find(|(s, _)| *s == rollout.status()) {
                slot.1 += 1;
            }
        }
        for (status, count) in by_status {
            self.deployments.with_label_values(&[status]).set(count);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec does not fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8_lossy(&buffer).into_owned()
    }
}
