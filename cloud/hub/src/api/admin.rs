//! The admin API: registering devices and their tags and keys, writing deployments, and
//! the fleet's status. Every handler here needs the admin token.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use super::{ApiError, Caller, JsonBody, PathParams, QueryParams};
use crate::condition::Condition;
use crate::fleet::{Fleet, FleetChange};
use crate::hub::Hub;
use crate::identity::{self, KeySlot};
use crate::protocol::{Connection, ReportStatus, Rollout, now_ms};
use crate::protocol::{
    CreatedDevice, DeploymentDevice, DeploymentRef, DeploymentSpec, DeploymentSummary,
    DeploymentView, DeviceKeys, DevicePatch, DeviceView, FleetStatus, NewDevice,
};
use crate::store::{DeploymentDraft, DeploymentRecord, DeviceRecord};

/// The most pipeline documents in one deployment.
const MAX_PIPELINES: usize = 64;
/// The most tags on one device, and their sizes.
const MAX_TAGS: usize = 64;
const MAX_TAG_NAME: usize = 64;
const MAX_TAG_VALUE: usize = 256;

/// How to filter the device list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeviceFilter {
    /// Only devices whose tags match this target condition, e.g. `site = 'plant-3'`.
    condition: Option<String>,
    /// Only devices with this tag: `NAME=VALUE`, or `NAME` for any value.
    tag: Option<String>,
}

/// Lists devices, optionally filtered by tag or by a target condition.
#[utoipa::path(get, path = "/api/v1/devices", params(DeviceFilter), security(("admin" = [])),
    responses((status = 200, body = [DeviceView]), (status = 400, body = crate::protocol::ErrorBody)))]
pub async fn list_devices(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    QueryParams(filter): QueryParams<DeviceFilter>,
) -> Result<Json<Vec<DeviceView>>, ApiError> {
    caller.require_admin()?;
    let condition = filter
        .condition
        .as_deref()
        .map(Condition::parse)
        .transpose()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let tag = filter.tag.as_deref().map(|tag| match tag.split_once('=') {
        Some((name, value)) => (name.trim(), Some(value.trim())),
        None => (tag.trim(), None),
    });
    let now = now_ms();
    let devices = hub.store().devices().await?;
    let views = hub.with_fleet(|fleet| {
        devices
            .into_iter()
            .filter(|device| condition.as_ref().is_none_or(|c| c.matches(&device.tags)))
            .filter(|device| {
                tag.is_none_or(|(name, value)| match (device.tags.get(name), value) {
                    (Some(have), Some(want)) => have == want,
                    (Some(_), None) => true,
                    (None, _) => false,
                })
            })
            .map(|device| device_view(&hub, fleet, device, now))
            .collect()
    });
    Ok(Json(views))
}

/// Registers a device and issues its keys.
#[utoipa::path(post, path = "/api/v1/devices", request_body = NewDevice, security(("admin" = [])),
    responses((status = 201, body = CreatedDevice), (status = 400, body = crate::protocol::ErrorBody),
        (status = 409, body = crate::protocol::ErrorBody)))]
pub async fn create_device(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    JsonBody(new): JsonBody<NewDevice>,
) -> Result<(StatusCode, Json<CreatedDevice>), ApiError> {
    caller.require_admin()?;
    identity::check_device_id(&new.id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    check_tags(&new.tags)?;
    let nonce = identity::new_nonce().map_err(|e| ApiError::Internal(e.to_string()))?;
    let device = DeviceRecord {
        id: new.id,
        tags: new.tags,
        nonce,
        primary_generation: 0,
        secondary_generation: 0,
        enabled: true,
        created_ms: now_ms(),
        last_seen_ms: None,
        report: None,
        reported_ms: None,
    };
    let generation = hub.store().insert_device(&device).await?;
    hub.applied(
        generation,
        FleetChange::Device {
            id: device.id.clone(),
            tags: Some(device.tags.clone()),
        },
    )
    .await?;
    tracing::info!(device = %device.id, "device registered");
    let keys = keys_of(&hub, &device);
    let view = view_of(&hub, device);
    Ok((
        StatusCode::CREATED,
        Json(CreatedDevice { device: view, keys }),
    ))
}

/// One device: its tags, connection, desired deployment and last report.
#[utoipa::path(get, params(("id" = String, Path, description = "The device id")),
    path = "/api/v1/devices/{id}", security(("admin" = [])),
    responses((status = 200, body = DeviceView), (status = 404, body = crate::protocol::ErrorBody)))]
pub async fn get_device(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(id): PathParams<String>,
) -> Result<Json<DeviceView>, ApiError> {
    caller.require_admin()?;
    let device = find_device(&hub, &id).await?;
    Ok(Json(view_of(&hub, device)))
}

/// Changes some of a device's tags, or enables or disables it.
#[utoipa::path(patch, params(("id" = String, Path, description = "The device id")),
    path = "/api/v1/devices/{id}", request_body = DevicePatch,
    security(("admin" = [])),
    responses((status = 200, body = DeviceView), (status = 404, body = crate::protocol::ErrorBody)))]
pub async fn patch_device(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(id): PathParams<String>,
    JsonBody(patch): JsonBody<DevicePatch>,
) -> Result<Json<DeviceView>, ApiError> {
    caller.require_admin()?;
    let device = find_device(&hub, &id).await?;
    if let Some(changes) = patch.tags {
        // Checked against the tags as read; the store merges into the tags as they are
        // when it writes, so a concurrent change is not lost.
        let mut merged = device.tags.clone();
        for (name, value) in &changes {
            match value {
                Some(value) => merged.insert(name.clone(), value.clone()),
                None => merged.remove(name),
            };
        }
        check_tags(&merged)?;
        let Some((generation, tags)) = hub.store().patch_tags(&id, &changes).await? else {
            return Err(no_device(&id));
        };
        hub.applied(
            generation,
            FleetChange::Device {
                id: id.clone(),
                tags: Some(tags),
            },
        )
        .await?;
    }
    if let Some(enabled) = patch.enabled {
        hub.store().set_enabled(&id, enabled).await?;
    }
    let device = find_device(&hub, &id).await?;
    Ok(Json(view_of(&hub, device)))
}

/// Replaces a device's tags.
#[utoipa::path(put, params(("id" = String, Path, description = "The device id")),
    path = "/api/v1/devices/{id}/tags",
    request_body = BTreeMap<String, String>, security(("admin" = [])),
    responses((status = 200, body = DeviceView), (status = 404, body = crate::protocol::ErrorBody)))]
pub async fn put_tags(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(id): PathParams<String>,
    JsonBody(tags): JsonBody<BTreeMap<String, String>>,
) -> Result<Json<DeviceView>, ApiError> {
    caller.require_admin()?;
    check_tags(&tags)?;
    retag(&hub, &id, tags).await?;
    let device = find_device(&hub, &id).await?;
    Ok(Json(view_of(&hub, device)))
}

/// Removes a device. Its tokens stop working at once.
#[utoipa::path(delete, params(("id" = String, Path, description = "The device id")),
    path = "/api/v1/devices/{id}", security(("admin" = [])),
    responses((status = 204), (status = 404, body = crate::protocol::ErrorBody)))]
pub async fn delete_device(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(id): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let Some(generation) = hub.store().delete_device(&id).await? else {
        return Err(no_device(&id));
    };
    hub.applied(
        generation,
        FleetChange::Device {
            id: id.clone(),
            tags: None,
        },
    )
    .await?;
    tracing::info!(device = %id, "device deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// A device's current keys.
#[utoipa::path(get, params(("id" = String, Path, description = "The device id")),
    path = "/api/v1/devices/{id}/keys", security(("admin" = [])),
    responses((status = 200, body = DeviceKeys), (status = 404, body = crate::protocol::ErrorBody)))]
pub async fn get_keys(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(id): PathParams<String>,
) -> Result<Json<DeviceKeys>, ApiError> {
    caller.require_admin()?;
    let device = find_device(&hub, &id).await?;
    Ok(Json(keys_of(&hub, &device)))
}

/// Replaces one of a device's keys (`primary` or `secondary`): tokens signed with the
/// old key are refused from now on.
#[utoipa::path(post, params(("id" = String, Path, description = "The device id"), ("slot" = String, Path, description = "primary or secondary")),
    path = "/api/v1/devices/{id}/keys/{slot}/rotate", security(("admin" = [])),
    responses((status = 200, body = DeviceKeys), (status = 404, body = crate::protocol::ErrorBody)))]
pub async fn rotate_key(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams((id, slot)): PathParams<(String, String)>,
) -> Result<Json<DeviceKeys>, ApiError> {
    caller.require_admin()?;
    let slot: KeySlot = slot
        .parse()
        .map_err(|e: identity::IdentityError| ApiError::BadRequest(e.to_string()))?;
    let Some(device) = hub.store().rotate_key(&id, slot).await? else {
        return Err(no_device(&id));
    };
    tracing::info!(device = %id, key = %slot, "device key rotated");
    Ok(Json(keys_of(&hub, &device)))
}

/// Lists deployments with their rollouts.
#[utoipa::path(get, path = "/api/v1/deployments", security(("admin" = [])),
    responses((status = 200, body = [DeploymentView])))]
pub async fn list_deployments(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
) -> Result<Json<Vec<DeploymentView>>, ApiError> {
    caller.require_admin()?;
    let devices = hub.store().devices().await?;
    let rollouts = hub.with_fleet(|fleet| fleet.rollouts(&devices));
    let deployments = hub.store().deployments().await?;
    Ok(Json(
        deployments
            .into_iter()
            .map(|record| {
                let rollout = rollouts.get(&record.name).copied().unwrap_or_default();
                deployment_view(record, rollout)
            })
            .collect(),
    ))
}

/// Creates a deployment. Its pipelines are validated as `weir validate` does, and a
/// deployment with any problem is refused with every problem listed.
#[utoipa::path(post, path = "/api/v1/deployments", request_body = DeploymentSpec,
    security(("admin" = [])),
    responses((status = 201, body = DeploymentView), (status = 400, body = crate::protocol::ErrorBody),
        (status = 409, body = crate::protocol::ErrorBody), (status = 422, body = crate::protocol::ErrorBody)))]
pub async fn create_deployment(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    JsonBody(spec): JsonBody<DeploymentSpec>,
) -> Result<(StatusCode, Json<DeploymentView>), ApiError> {
    caller.require_admin()?;
    let Some(name) = spec.name.clone() else {
        return Err(ApiError::BadRequest(
            "a deployment needs a 'name'".to_owned(),
        ));
    };
    let record = write_deployment(&hub, name, spec, true).await?;
    let view = view_now(&hub, record).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Creates or updates a deployment: an update is a new version, rolled out again.
#[utoipa::path(put, params(("name" = String, Path, description = "The deployment")),
    path = "/api/v1/deployments/{name}", request_body = DeploymentSpec,
    security(("admin" = [])),
    responses((status = 200, body = DeploymentView), (status = 400, body = crate::protocol::ErrorBody),
        (status = 422, body = crate::protocol::ErrorBody)))]
pub async fn put_deployment(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(name): PathParams<String>,
    JsonBody(spec): JsonBody<DeploymentSpec>,
) -> Result<Json<DeploymentView>, ApiError> {
    caller.require_admin()?;
    if let Some(other) = spec.name.as_deref().filter(|other| *other != name) {
        return Err(ApiError::BadRequest(format!(
            "the body names deployment '{other}' but the path names '{name}'"
        )));
    }
    let record = write_deployment(&hub, name, spec, false).await?;
    Ok(Json(view_now(&hub, record).await?))
}

/// One deployment with its rollout.
#[utoipa::path(get, params(("name" = String, Path, description = "The deployment")),
    path = "/api/v1/deployments/{name}", security(("admin" = [])),
    responses((status = 200, body = DeploymentView), (status = 404, body = crate::protocol::ErrorBody)))]
pub async fn get_deployment(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(name): PathParams<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    caller.require_admin()?;
    let record = find_deployment(&hub, &name).await?;
    Ok(Json(view_now(&hub, record).await?))
}

/// Removes a deployment: the devices it targeted move to the next deployment that
/// matches them, or to running nothing.
#[utoipa::path(delete, params(("name" = String, Path, description = "The deployment")),
    path = "/api/v1/deployments/{name}", security(("admin" = [])),
    responses((status = 204), (status = 404, body = crate::protocol::ErrorBody)))]
pub async fn delete_deployment(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(name): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let Some(generation) = hub.store().delete_deployment(&name).await? else {
        return Err(no_deployment(&name));
    };
    hub.deployments_changed(generation).await?;
    tracing::info!(deployment = %name, "deployment deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// The devices a deployment targets, each with its report on the current version.
#[utoipa::path(get, params(("name" = String, Path, description = "The deployment")),
    path = "/api/v1/deployments/{name}/devices", security(("admin" = [])),
    responses((status = 200, body = [DeploymentDevice]), (status = 404, body = crate::protocol::ErrorBody)))]
pub async fn deployment_devices(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
    PathParams(name): PathParams<String>,
) -> Result<Json<Vec<DeploymentDevice>>, ApiError> {
    caller.require_admin()?;
    let record = find_deployment(&hub, &name).await?;
    let now = now_ms();
    let devices = hub.store().devices().await?;
    let devices: Vec<DeviceRecord> = hub.with_fleet(|fleet| {
        devices
            .into_iter()
            .filter(|device| {
                fleet
                    .deployment_for(&device.tags)
                    .is_some_and(|d| d.record.name == name)
            })
            .collect()
    });
    let targeted = devices
        .into_iter()
        .map(|device| DeploymentDevice {
            connection: hub.connection(device.last_seen_ms, now),
            report: device
                .report
                .filter(|report| report.revision == Some(record.revision)),
            id: device.id,
        })
        .collect();
    Ok(Json(targeted))
}

/// The fleet at a glance: devices by connection, and every deployment's rollout.
#[utoipa::path(get, path = "/api/v1/status", security(("admin" = [])),
    responses((status = 200, body = FleetStatus)))]
pub async fn fleet_status(
    caller: Caller,
    State(hub): State<Arc<Hub>>,
) -> Result<Json<FleetStatus>, ApiError> {
    caller.require_admin()?;
    Ok(Json(fleet_summary(&hub).await?))
}

/// Refreshes the fleet gauges of `/metrics`.
pub async fn update_fleet_metrics(hub: &Hub) -> Result<(), ApiError> {
    let status = fleet_summary(hub).await?;
    hub.metrics().set_fleet(
        [
            (Connection::Online.as_str(), to_i64(status.online)),
            (Connection::Offline.as_str(), to_i64(status.offline)),
            (Connection::Never.as_str(), to_i64(status.never_seen)),
        ],
        status
            .deployments
            .iter()
            .map(|d| (d.name.as_str(), d.rollout)),
    );
    Ok(())
}

/// How stale `/status` and the fleet gauges may be in what devices report and when they
/// were last heard from. A change of deployments or devices shows at once.
const STATUS_MAX_AGE_MS: i64 = 1_000;

/// The fleet at a glance, computed at most once a second however many ask (one at a
/// time; the others wait and share it): reading every device row for each request
/// would make `/status` and `/metrics` the heaviest calls of a hub with thousands of
/// devices.
async fn fleet_summary(hub: &Hub) -> Result<FleetStatus, ApiError> {
    let mut cache = hub.status_cache().lock().await;
    let generation = hub.with_fleet(|fleet| fleet.generation);
    let now = now_ms();
    if let Some((at_generation, at, status)) = cache.as_ref()
        && *at_generation == generation
        && now.saturating_sub(*at) < STATUS_MAX_AGE_MS
    {
        return Ok(status.clone());
    }
    let status = compute_fleet_summary(hub).await?;
    *cache = Some((generation, now, status.clone()));
    Ok(status)
}

async fn compute_fleet_summary(hub: &Hub) -> Result<FleetStatus, ApiError> {
    let devices = hub.store().devices().await?;
    hub.metrics().fleet_scanned();
    let (rollouts, summaries) = hub.with_fleet(|fleet| {
        let rollouts = fleet.rollouts(&devices);
        let summaries: Vec<(String, u64, i64)> = fleet
            .deployments()
            .iter()
            .map(|d| (d.record.name.clone(), d.record.version, d.record.priority))
            .collect();
        (rollouts, summaries)
    });
    let now = now_ms();
    let mut status = FleetStatus {
        devices: devices.len() as u64,
        online: 0,
        offline: 0,
        never_seen: 0,
        deployments: Vec::new(),
    };
    for device in &devices {
        match hub.connection(device.last_seen_ms, now) {
            Connection::Online => status.online += 1,
            Connection::Offline => status.offline += 1,
            Connection::Never => status.never_seen += 1,
        }
    }
    status.deployments = summaries
        .into_iter()
        .map(|(name, version, priority)| {
            let rollout = rollouts.get(&name).copied().unwrap_or_default();
            DeploymentSummary {
                name,
                version,
                priority,
                status: rollout.status().to_owned(),
                rollout,
            }
        })
        .collect();
    Ok(status)
}

/// Checks and writes a deployment, then makes it the fleet's.
async fn write_deployment(
    hub: &Hub,
    name: String,
    spec: DeploymentSpec,
    create_only: bool,
) -> Result<DeploymentRecord, ApiError> {
    check_name("deployment", &name)?;
    let condition = Condition::parse(&spec.target_condition)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if spec.pipelines.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "deployment '{name}' has no pipelines: give at least one document in 'pipelines'"
        )));
    }
    if spec.pipelines.len() > MAX_PIPELINES {
        return Err(ApiError::BadRequest(format!(
            "deployment '{name}' has {} pipeline documents; at most {MAX_PIPELINES} are allowed",
            spec.pipelines.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for document in &spec.pipelines {
        check_name("pipeline document", &document.name)?;
        if !seen.insert(document.name.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "deployment '{name}' has two pipeline documents named '{}'",
                document.name
            )));
        }
    }
    let diagnostics = hub.validate_pipelines(&name, &spec.pipelines);
    if !diagnostics.is_empty() {
        let count = diagnostics.len();
        return Err(ApiError::Invalid {
            message: format!(
                "deployment '{name}' was refused: {count} problem{} in its pipelines",
                if count == 1 { "" } else { "s" }
            ),
            diagnostics: diagnostics.iter().map(super::diagnostic_view).collect(),
        });
    }
    let draft = DeploymentDraft {
        name,
        priority: spec.priority,
        target_condition: condition.as_str().to_owned(),
        pipelines: spec.pipelines,
    };
    let record = hub
        .store()
        .put_deployment(&draft, create_only, now_ms())
        .await?;
    hub.deployments_changed(record.revision).await?;
    tracing::info!(
        deployment = %record.name,
        version = record.version,
        condition = %record.target_condition,
        "deployment written"
    );
    Ok(record)
}

async fn view_now(hub: &Hub, record: DeploymentRecord) -> Result<DeploymentView, ApiError> {
    let devices = hub.store().devices().await?;
    let rollouts = hub.with_fleet(|fleet| fleet.rollouts(&devices));
    let rollout = rollouts.get(&record.name).copied().unwrap_or_default();
    Ok(deployment_view(record, rollout))
}

fn deployment_view(record: DeploymentRecord, rollout: Rollout) -> DeploymentView {
    DeploymentView {
        status: rollout.status().to_owned(),
        rollout,
        name: record.name,
        version: record.version,
        revision: record.revision,
        priority: record.priority,
        target_condition: record.target_condition,
        pipelines: record.pipelines,
        created_ms: record.created_ms,
        updated_ms: record.updated_ms,
    }
}

fn device_view(hub: &Hub, fleet: &Fleet, device: DeviceRecord, now: i64) -> DeviceView {
    let desired = fleet.deployment_for(&device.tags).map(|d| DeploymentRef {
        name: d.record.name.clone(),
        version: d.record.version,
        revision: d.record.revision,
    });
    let in_sync = match (&desired, &device.report) {
        (Some(desired), Some(report)) => {
            report.revision == Some(desired.revision) && report.status == ReportStatus::Applied
        }
        (None, Some(report)) => report.revision.is_none() && report.status == ReportStatus::Applied,
        (None, None) => true,
        (Some(_), None) => false,
    };
    DeviceView {
        connection: hub.connection(device.last_seen_ms, now),
        id: device.id,
        tags: device.tags,
        enabled: device.enabled,
        created_ms: device.created_ms,
        last_seen_ms: device.last_seen_ms,
        desired,
        report: device.report,
        reported_ms: device.reported_ms,
        in_sync,
    }
}

/// A device's view at this moment.
fn view_of(hub: &Hub, device: DeviceRecord) -> DeviceView {
    let now = now_ms();
    hub.with_fleet(|fleet| device_view(hub, fleet, device, now))
}

/// Sets a device's tags and takes the change into the fleet.
async fn retag(hub: &Hub, id: &str, tags: BTreeMap<String, String>) -> Result<(), ApiError> {
    let Some(generation) = hub.store().set_tags(id, &tags).await? else {
        return Err(no_device(id));
    };
    hub.applied(
        generation,
        FleetChange::Device {
            id: id.to_owned(),
            tags: Some(tags),
        },
    )
    .await?;
    Ok(())
}

fn keys_of(hub: &Hub, device: &DeviceRecord) -> DeviceKeys {
    let credentials = device.credentials();
    DeviceKeys {
        primary: hub.device_key(&credentials, KeySlot::Primary).to_base64(),
        secondary: hub.device_key(&credentials, KeySlot::Secondary).to_base64(),
    }
}

pub(super) async fn find_device(hub: &Hub, id: &str) -> Result<DeviceRecord, ApiError> {
    hub.store().device(id).await?.ok_or_else(|| no_device(id))
}

async fn find_deployment(hub: &Hub, name: &str) -> Result<DeploymentRecord, ApiError> {
    hub.store()
        .deployment(name)
        .await?
        .ok_or_else(|| no_deployment(name))
}

fn no_device(id: &str) -> ApiError {
    ApiError::NotFound(format!("no device '{id}' is registered"))
}

fn no_deployment(name: &str) -> ApiError {
    ApiError::NotFound(format!("no deployment named '{name}'"))
}

/// Deployment and document names: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with a
/// dot (they become file names on devices).
fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let fits = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || name.starts_with('.') || !name.chars().all(fits) {
        return Err(ApiError::BadRequest(format!(
            "'{name}' is not a valid {what} name: use 1 to 64 letters, digits, '.', '_' or '-', \
             not starting with '.'"
        )));
    }
    Ok(())
}

/// Tag names are what target conditions can name; values are free text of a bounded
/// size.
fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if tags.len() > MAX_TAGS {
        return Err(ApiError::BadRequest(format!(
            "a device has at most {MAX_TAGS} tags; this one would have {}",
            tags.len()
        )));
    }
    let fits = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    for (name, value) in tags {
        if name.is_empty() || name.len() > MAX_TAG_NAME || !name.chars().all(fits) {
            return Err(ApiError::BadRequest(format!(
                "'{name}' is not a valid tag name: use 1 to {MAX_TAG_NAME} letters, digits, \
                 '.', '_' or '-'"
            )));
        }
        if value.len() > MAX_TAG_VALUE {
            return Err(ApiError::BadRequest(format!(
                "the value of tag '{name}' is {} bytes long; at most {MAX_TAG_VALUE} are allowed",
                value.len()
            )));
        }
    }
    Ok(())
}

fn to_i64(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}
