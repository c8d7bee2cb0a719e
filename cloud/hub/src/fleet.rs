//! The fleet as the hub serves it: which deployment each device should run, and how far
//! each deployment has rolled out.
//!
//! A device's desired state is the deployment with the highest priority whose target
//! condition its tags match; of deployments with the same priority, the one whose name
//! sorts first. The hub keeps the deployments and every device's tags in memory
//! ([`Fleet`]), so answering a device's poll never touches the database. Its own changes
//! are applied to it in place ([`FleetChange`]); a change made elsewhere (another hub on
//! the same database) shows as a gap in the change generation, and the fleet is read
//! again whole.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::condition::Condition;
use crate::protocol::{DesiredDeployment, DesiredState, ReportStatus, Rollout};
use crate::store::{DeploymentRecord, DeviceRecord};

/// A deployment with its condition parsed.
#[derive(Clone, Debug)]
pub struct ActiveDeployment {
    /// The deployment.
    pub record: DeploymentRecord,
    /// Its target condition.
    pub condition: Condition,
    /// The (pipeline, sink) of each of its `hub` sinks: what a device running it ships.
    pub shipping: BTreeSet<(String, String)>,
}

/// The `hub` sinks of `record`'s pipelines, by (pipeline, sink). A pipeline that does
/// not read (it was validated when written, so only a newer hub's) ships nothing here.
fn hub_sinks(record: &DeploymentRecord) -> BTreeSet<(String, String)> {
    let any_value = |_: &str| Some(String::new());
    record
        .pipelines
        .iter()
        .filter_map(|document| {
            weir_pipelines::load_str(
                std::path::Path::new(&document.name),
                &document.yaml,
                &any_value,
            )
            .ok()
        })
        .flat_map(|pipeline| {
            pipeline
                .nodes
                .iter()
                .filter(|node| node.role == weir_engine::Role::Sink && node.kind == "hub")
                .map(|node| (pipeline.name.clone(), node.name.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The deployments and device tags, at one change generation.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    /// The store's change generation this was built at.
    pub generation: i64,
    /// By priority, highest first, then by name.
    deployments: Vec<ActiveDeployment>,
    /// Each device's tags.
    tags: HashMap<String, BTreeMap<String, String>>,
}

impl Fleet {
    /// The fleet at `generation`. A stored condition that no longer parses (written by a
    /// newer hub, say) targets no device, and is logged.
    pub fn new(
        generation: i64,
        deployments: Vec<DeploymentRecord>,
        devices: impl IntoIterator<Item = (String, BTreeMap<String, String>)>,
    ) -> Fleet {
        let mut active: Vec<ActiveDeployment> = deployments
            .into_iter()
            .filter_map(|record| match Condition::parse(&record.target_condition) {
                Ok(condition) => Some(ActiveDeployment {
                    shipping: hub_sinks(&record),
                    record,
                    condition,
                }),
                Err(e) => {
                    tracing::error!(deployment = %record.name, "skipping deployment: {e}");
                    None
                }
            })
            .collect();
        active.sort_by(|a, b| {
            b.record
                .priority
                .cmp(&a.record.priority)
                .then_with(|| a.record.name.cmp(&b.record.name))
        });
        Fleet {
            generation,
            deployments: active,
            tags: devices.into_iter().collect(),
        }
    }

    /// The deployment a device with `tags` should run.
    pub fn deployment_for(&self, tags: &BTreeMap<String, String>) -> Option<&ActiveDeployment> {
        self.deployments
            .iter()
            .find(|deployment| deployment.condition.matches(tags))
    }

    /// Whether device `id`'s deployment has the `hub` sink `sink` in pipeline `pipeline`.
    pub fn ships(&self, id: &str, (pipeline, sink): (&str, &str)) -> bool {
        self.tags
            .get(id)
            .and_then(|tags| self.deployment_for(tags))
            .is_some_and(|deployment| {
                deployment
                    .shipping
                    .contains(&(pipeline.to_owned(), sink.to_owned()))
            })
    }

    /// What device `id` should run; none when the fleet does not know it.
    pub fn desired(&self, id: &str) -> Option<DesiredState> {
        let tags = self.tags.get(id)?;
        Some(desired_state(self.deployment_for(tags).map(|d| &d.record)))
    }

    /// Applies one change made at `generation`. Returns false, changing nothing, when
    /// that generation does not follow this fleet's: a change made elsewhere came in
    /// between, and the fleet must be read again whole.
    pub fn apply(&mut self, generation: i64, change: FleetChange) -> bool {
        if generation <= self.generation {
            // Already in: a full read after the change took it in.
            return true;
        }
        if generation != self.generation + 1 {
            return false;
        }
        match change {
            FleetChange::Device {
                id,
                tags: Some(tags),
            } => {
                self.tags.insert(id, tags);
            }
            FleetChange::Device { id, tags: None } => {
                self.tags.remove(&id);
            }
            FleetChange::Deployments(deployments) => {
                *self = Fleet::new(generation, deployments, std::mem::take(&mut self.tags));
            }
        }
        self.generation = generation;
        true
    }

    /// The deployments, highest priority first.
    pub fn deployments(&self) -> &[ActiveDeployment] {
        &self.deployments
    }

    /// Each deployment's rollout over `devices` (which carry the reports), by name.
    pub fn rollouts(&self, devices: &[DeviceRecord]) -> BTreeMap<String, Rollout> {
        let mut rollouts: BTreeMap<String, Rollout> = self
            .deployments
            .iter()
            .map(|d| (d.record.name.clone(), Rollout::default()))
            .collect();
        for device in devices {
            let Some(deployment) = self.deployment_for(&device.tags) else {
                continue;
            };
            let Some(rollout) = rollouts.get_mut(&deployment.record.name) else {
                continue;
            };
            rollout.targeted += 1;
            let Some(report) = device
                .report
                .as_ref()
                .filter(|report| report.revision == Some(deployment.record.revision))
            else {
                continue;
            };
            rollout.applied += 1;
            match report.status {
                ReportStatus::Applied => rollout.succeeded += 1,
                ReportStatus::Failed => rollout.failed += 1,
                ReportStatus::Applying => {}
            }
        }
        rollouts
    }
}

/// One change to the fleet, as the hub that made it applies it.
#[derive(Clone, Debug)]
pub enum FleetChange {
    /// A device was registered or re-tagged (`Some`), or removed (`None`).
    Device {
        /// The device.
        id: String,
        /// Its tags now.
        tags: Option<BTreeMap<String, String>>,
    },
    /// A deployment was written or removed: every deployment, as stored now.
    Deployments(Vec<DeploymentRecord>),
}

/// The desired state of running `deployment`.
pub fn desired_state(deployment: Option<&DeploymentRecord>) -> DesiredState {
    match deployment {
        Some(record) => DesiredState {
            etag: format!("r{}", record.revision),
            deployment: Some(DesiredDeployment {
                name: record.name.clone(),
                version: record.version,
                revision: record.revision,
                pipelines: record.pipelines.clone(),
            }),
        },
        None => DesiredState::nothing(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{NO_DEPLOYMENT_ETAG, Report};

    fn deployment(name: &str, priority: i64, condition: &str, revision: i64) -> DeploymentRecord {
        DeploymentRecord {
            name: name.to_owned(),
            version: 1,
            revision,
            priority,
            target_condition: condition.to_owned(),
            pipelines: Vec::new(),
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn device(id: &str, tags: BTreeMap<String, String>, report: Option<Report>) -> DeviceRecord {
        DeviceRecord {
            id: id.to_owned(),
            tags,
            nonce: String::new(),
            primary_generation: 0,
            secondary_generation: 0,
            enabled: true,
            created_ms: 0,
            last_seen_ms: None,
            report,
            reported_ms: None,
        }
    }

    #[test]
    fn the_highest_priority_match_wins_and_ties_go_to_the_first_name() {
        let fleet = Fleet::new(
            7,
            vec![
                deployment("base", 1, "site = 'plant-3'", 1),
                deployment("gateways", 10, "site = 'plant-3' AND role = 'gateway'", 2),
                deployment("b-tie", 5, "role = 'sensor'", 3),
                deployment("a-tie", 5, "role = 'sensor'", 4),
            ],
            [
                (
                    "gw".to_owned(),
                    tags(&[("site", "plant-3"), ("role", "gateway")]),
                ),
                ("plain".to_owned(), tags(&[("site", "plant-3")])),
                ("sensor".to_owned(), tags(&[("role", "sensor")])),
                ("elsewhere".to_owned(), tags(&[("site", "plant-9")])),
            ],
        );
        let name = |id: &str| fleet.desired(id).and_then(|d| d.deployment).map(|d| d.name);
        assert_eq!(name("gw").as_deref(), Some("gateways"));
        assert_eq!(name("plain").as_deref(), Some("base"));
        assert_eq!(name("sensor").as_deref(), Some("a-tie"));
        assert_eq!(name("elsewhere"), None);
        assert_eq!(fleet.desired("elsewhere").unwrap().etag, NO_DEPLOYMENT_ETAG);
        assert_eq!(fleet.desired("gw").unwrap().etag, "r2");
        assert!(fleet.desired("unknown").is_none());
    }

    #[test]
    fn changes_apply_in_generation_order_and_a_gap_asks_for_a_full_read() {
        let mut fleet = Fleet::new(3, vec![deployment("d", 1, "role = 'gw'", 2)], []);
        let gateway = || tags(&[("role", "gw")]);
        let added = FleetChange::Device {
            id: "a".to_owned(),
            tags: Some(gateway()),
        };
        assert!(fleet.apply(4, added.clone()));
        assert_eq!(fleet.generation, 4);
        assert_eq!(fleet.desired("a").unwrap().deployment.unwrap().name, "d");
        // Seen already (a full read took it in): nothing to do.
        assert!(fleet.apply(4, added.clone()));
        // Generation 5 was made elsewhere: 6 cannot be applied on its own.
        let removed = FleetChange::Device {
            id: "a".to_owned(),
            tags: None,
        };
        assert!(!fleet.apply(6, removed.clone()));
        assert_eq!(fleet.generation, 4);
        assert!(fleet.desired("a").is_some());
        assert!(fleet.apply(5, removed));
        assert!(fleet.desired("a").is_none());
        // A new set of deployments keeps the devices.
        assert!(fleet.apply(6, added));
        let replaced = FleetChange::Deployments(vec![deployment("e", 1, "*", 7)]);
        assert!(fleet.apply(7, replaced));
        assert_eq!(fleet.generation, 7);
        assert_eq!(fleet.desired("a").unwrap().deployment.unwrap().name, "e");
    }

    #[test]
    fn rollouts_count_reports_on_the_current_revision_only() {
        let fleet = Fleet::new(
            1,
            vec![deployment("d", 1, "role = 'gateway'", 5)],
            std::iter::empty(),
        );
        let gateway = || tags(&[("role", "gateway")]);
        let report = |revision, status| Report {
            revision: Some(revision),
            status,
            error: None,
            health: serde_json::Value::Null,
        };
        let devices = vec![
            device("ok", gateway(), Some(report(5, ReportStatus::Applied))),
            device("bad", gateway(), Some(report(5, ReportStatus::Failed))),
            device("busy", gateway(), Some(report(5, ReportStatus::Applying))),
            device("stale", gateway(), Some(report(4, ReportStatus::Applied))),
            device("silent", gateway(), None),
            device("other", tags(&[("role", "sensor")]), None),
        ];
        let rollout = fleet.rollouts(&devices)["d"];
        assert_eq!(
            rollout,
            Rollout {
                targeted: 5,
                applied: 3,
                succeeded: 1,
                failed: 1
            }
        );
        assert_eq!(rollout.status(), "failing");
        assert_eq!(Rollout::default().status(), "idle");
        let done = Rollout {
            targeted: 2,
            applied: 2,
            succeeded: 2,
            failed: 0,
        };
        assert_eq!(done.status(), "complete");
    }
}
