//! The hub's wire protocol: the JSON bodies its API reads and writes, shared by the
//! hub, its CLI and `weir agent`. Without the `server` feature this module, the
//! [`crate::client`] and [`crate::identity`] are all a device needs.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The header a shipped batch carries the time the device stored it in (ms).
pub const APPENDED_MS_HEADER: &str = "weir-appended-ms";

/// What the hub made of a shipped batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct IngestAnswer {
    /// False when the hub had it already (sent again): acknowledged, not stored twice.
    pub stored: bool,
    /// Rows stored now.
    pub rows: u64,
}

/// The header a device's answer to a forwarded query carries its HTTP status in.
pub const ANSWER_STATUS_HEADER: &str = "weir-answer-status";

/// A query an admin forwarded to a device, as the device's query poll receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ForwardedQuery {
    /// The query's id, to post the answer to.
    pub id: String,
    /// The query: `{"sql": …, "format": …, "max_rows": …, "timeout": …}`.
    #[cfg_attr(feature = "server", schema(value_type = Object))]
    pub request: weir_query::QueryRequest,
}

/// The etag of the desired state "no deployment".
pub const NO_DEPLOYMENT_ETAG: &str = "none";

/// A device to register.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// Its id: 1 to 128 of `A-Z a-z 0-9 . _ : @ -`, not starting with a dot.
    pub id: String,
    /// Its tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// Changes to a device.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    /// Tags to set; a tag set to null is removed. Tags not named are kept.
    #[serde(default)]
    pub tags: Option<BTreeMap<String, Option<String>>>,
    /// Whether the device may connect: a disabled device's requests are refused.
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// A device's keys, base64. Each signs tokens on its own; two allow rotation.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DeviceKeys {
    /// The primary key.
    pub primary: String,
    /// The secondary key.
    pub secondary: String,
}

/// A device just registered, with its keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct CreatedDevice {
    /// The device.
    pub device: DeviceView,
    /// Its keys.
    pub keys: DeviceKeys,
}

/// A device as the admin API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DeviceView {
    /// Its id.
    pub id: String,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Whether it may connect.
    pub enabled: bool,
    /// When it was registered, ms since the Unix epoch.
    pub created_ms: i64,
    /// Whether it is heard from.
    pub connection: Connection,
    /// When it was last heard from, ms since the Unix epoch.
    pub last_seen_ms: Option<i64>,
    /// The deployment it should run.
    pub desired: Option<DeploymentRef>,
    /// Its last report.
    pub report: Option<Report>,
    /// When that report came, ms since the Unix epoch.
    pub reported_ms: Option<i64>,
    /// Whether it reports running its desired deployment (or nothing, with none).
    pub in_sync: bool,
}

/// Names one version of a deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DeploymentRef {
    /// The deployment.
    pub name: String,
    /// Its version.
    pub version: u64,
    /// Its revision.
    pub revision: i64,
}

/// A deployment to create or update.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// Its name (in the path for PUT): 1 to 64 of `A-Z a-z 0-9 . _ -`.
    #[serde(default)]
    pub name: Option<String>,
    /// Which devices it targets, over their tags: `site = 'plant-3' AND role =
    /// 'gateway'`; `*` for every device.
    pub target_condition: String,
    /// Higher wins where several deployments target a device. Default 0.
    #[serde(default)]
    pub priority: i64,
    /// The pipeline documents it runs (at least one).
    pub pipelines: Vec<PipelineDocument>,
}

/// A deployment as the admin API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DeploymentView {
    /// Its name.
    pub name: String,
    /// 1 when created, one more on each update.
    pub version: u64,
    /// Unique across the hub's deployments and versions; devices report against it.
    pub revision: i64,
    /// Higher wins.
    pub priority: i64,
    /// Which devices it targets.
    pub target_condition: String,
    /// What it runs.
    pub pipelines: Vec<PipelineDocument>,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: i64,
    /// When this version was written, ms since the Unix epoch.
    pub updated_ms: i64,
    /// How far this version has rolled out.
    pub rollout: Rollout,
    /// `idle`, `rolling-out`, `complete` or `failing`.
    pub status: String,
}

/// A targeted device's state in one deployment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DeploymentDevice {
    /// The device.
    pub id: String,
    /// Whether it is heard from.
    pub connection: Connection,
    /// Its report on this version, if it made one: status and error.
    pub report: Option<Report>,
}

/// The fleet at a glance.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct FleetStatus {
    /// Registered devices.
    pub devices: u64,
    /// Devices heard from lately.
    pub online: u64,
    /// Devices heard from, but not lately.
    pub offline: u64,
    /// Devices never heard from.
    pub never_seen: u64,
    /// Every deployment's rollout.
    pub deployments: Vec<DeploymentSummary>,
}

/// One deployment's rollout, in the fleet status.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DeploymentSummary {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: u64,
    /// Its priority.
    pub priority: i64,
    /// `idle`, `rolling-out`, `complete` or `failing`.
    pub status: String,
    /// The counts.
    pub rollout: Rollout,
}

/// An error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong, for a person.
    pub message: String,
    /// For a refused deployment: every problem in its pipelines, as `weir validate`
    /// reports them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<DiagnosticView>,
}

/// One problem in a pipeline document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DiagnosticView {
    /// `DEPLOYMENT/DOCUMENT.yaml`.
    pub file: String,
    /// 1-based line, 0 when unknown.
    pub line: u32,
    /// 1-based column, 0 when unknown.
    pub column: u32,
    /// Where in the document, such as `sources.sensors.schema.ts`.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// The whole diagnostic as `weir validate` prints it.
    pub text: String,
}

/// What a device reports about the desired state it was given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Report {
    /// The revision of the desired state this is about; none for "no deployment".
    #[serde(default)]
    pub revision: Option<i64>,
    /// `applying`, `applied` or `failed`.
    pub status: ReportStatus,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The device's pipelines, operators and modules, as it describes them.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    #[cfg_attr(feature = "server", schema(value_type = Object))]
    pub health: serde_json::Value,
}

/// Where a device is with a desired state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ReportStatus {
    /// Received, being validated and started.
    Applying,
    /// Running.
    Applied,
    /// Refused or failed to start: the previous pipelines keep running.
    Failed,
}

/// One pipeline document of a deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct PipelineDocument {
    /// A name for the document, unique in its deployment (messages about it use
    /// `DEPLOYMENT/NAME.yaml`); the pipeline's own name is inside the YAML.
    pub name: String,
    /// The pipeline YAML, as `weir run` reads it.
    pub yaml: String,
}

/// How far a deployment has rolled out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Rollout {
    /// Devices whose desired state it is.
    pub targeted: u64,
    /// Of those, the ones that have reported on its current version.
    pub applied: u64,
    /// Of those, the ones running it.
    pub succeeded: u64,
    /// Of those, the ones that could not run it (they keep what they ran before).
    pub failed: u64,
}

impl Rollout {
    /// One word for where the rollout is: `idle` (no device targeted), `failing`
    /// (some device failed), `complete` (every device runs it), else `rolling-out`.
    pub fn status(&self) -> &'static str {
        if self.targeted == 0 {
            "idle"
        } else if self.failed > 0 {
            "failing"
        } else if self.succeeded == self.targeted {
            "complete"
        } else {
            "rolling-out"
        }
    }
}

/// What a device should run, as the device API serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DesiredState {
    /// Names this desired state: a device polls with the etag it has, and is answered
    /// when the etag changes. `none` for "no deployment".
    pub etag: String,
    /// The deployment to run; none means run nothing.
    pub deployment: Option<DesiredDeployment>,
}

impl DesiredState {
    /// The desired state "run nothing".
    pub fn nothing() -> DesiredState {
        DesiredState {
            etag: NO_DEPLOYMENT_ETAG.to_owned(),
            deployment: None,
        }
    }
}

/// One deployment version, as a device receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DesiredDeployment {
    /// The deployment's name.
    pub name: String,
    /// Its version.
    pub version: u64,
    /// Its revision: the device reports against this.
    pub revision: i64,
    /// Its pipeline documents.
    pub pipelines: Vec<PipelineDocument>,
}

/// Whether a device is connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Connection {
    /// Heard from within `offline_after`.
    Online,
    /// Heard from before, not lately.
    Offline,
    /// Never heard from.
    Never,
}

impl Connection {
    /// The lower-case name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Connection::Online => "online",
            Connection::Offline => "offline",
            Connection::Never => "never",
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |now| i64::try_from(now.as_millis()).unwrap_or(i64::MAX))
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |now| now.as_secs())
}
