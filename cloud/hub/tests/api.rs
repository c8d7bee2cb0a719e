//! The hub's API end to end, over HTTP on loopback: the registry, identities and access,
//! deployments and their rollout, long polls, several hubs on one database, TLS, the
//! OpenAPI document and the metrics. Each test runs on SQLite and on PostgreSQL.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use support::{
    ADMIN_TOKEN, Db, Setup, TestDatabase, TestHub, deployment, pipeline, refusal_status,
};
use weir_hub::identity::{DeviceKey, device_resource, sign_token};
use weir_hub::protocol::DevicePatch;
use weir_hub::protocol::{Report, ReportStatus};
use weir_hub::{ClientError, Credentials, HubClient, TlsFiles};

on_both_databases!(
    devices_are_registered_tagged_filtered_and_deleted,
    devices_act_only_as_themselves_with_valid_tokens,
    deployments_target_by_tags_with_priority_and_versions,
    rollouts_count_what_devices_report,
    a_bad_deployment_is_refused_with_the_validators_messages,
    a_long_poll_answers_when_the_desired_state_changes,
    a_generated_admin_token_is_printed_once_and_kept_hashed,
    silent_devices_go_offline_and_metrics_count_them,
    scrapes_and_status_calls_share_one_read_of_the_fleet,
);

fn refusal_message(result: Result<impl std::fmt::Debug, ClientError>) -> String {
    match result {
        Err(error) => error.to_string(),
        Ok(value) => panic!("expected a refusal, got {value:?}"),
    }
}

async fn devices_are_registered_tagged_filtered_and_deleted(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let hub = TestHub::start(dir.path(), &database.database).await;

    let gw = hub
        .register("gw-1", &[("site", "plant-3"), ("role", "gateway")])
        .await;
    assert_eq!(gw.keys.primary.len(), 44, "{:?}", gw.keys);
    assert_ne!(gw.keys.primary, gw.keys.secondary);
    let sensor = hub
        .register("sensor-1", &[("site", "plant-3"), ("role", "sensor")])
        .await;
    assert_ne!(sensor.keys.primary, gw.keys.primary);
    hub.register("gw-9", &[("site", "plant-9"), ("role", "gateway")])
        .await;

    // The same id twice is a conflict; a bad id says which character is wrong.
    let again = hub
        .admin
        .create_device(&weir_hub::protocol::NewDevice {
            id: "gw-1".to_owned(),
            tags: BTreeMap::new(),
        })
        .await;
    assert_eq!(refusal_status(again), 409);
    let bad = hub
        .admin
        .create_device(&weir_hub::protocol::NewDevice {
            id: "cam/7".to_owned(),
            tags: BTreeMap::new(),
        })
        .await;
    let text = refusal_message(bad);
    assert!(text.contains("'/'") && text.contains("HTTP 400"), "{text}");

    let all = hub.admin.devices(None, None).await.expect("list");
    let ids: Vec<&str> = all.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["gw-1", "gw-9", "sensor-1"]);
    let plant3 = hub
        .admin
        .devices(Some("site = 'plant-3' AND role = 'gateway'"), None)
        .await
        .expect("filter");
    assert_eq!(plant3.len(), 1);
    assert_eq!(plant3[0].id, "gw-1");
    let bad_filter = hub.admin.devices(Some("site = "), None).await;
    assert_eq!(refusal_status(bad_filter), 400);

    // Tags: set one, remove one, keep the rest.
    let patch = DevicePatch {
        tags: Some(BTreeMap::from([
            ("floor".to_owned(), Some("2".to_owned())),
            ("role".to_owned(), None),
        ])),
        enabled: None,
    };
    let patched = hub.admin.patch_device("gw-1", &patch).await.expect("patch");
    assert_eq!(
        patched.tags,
        BTreeMap::from([
            ("floor".to_owned(), "2".to_owned()),
            ("site".to_owned(), "plant-3".to_owned()),
        ])
    );
    let floor2 = hub
        .admin
        .devices(Some("floor >= 2"), None)
        .await
        .expect("filter");
    assert_eq!(floor2.len(), 1);
    let by_tag = hub
        .admin
        .devices(None, Some("role=gateway"))
        .await
        .expect("tag");
    let ids: Vec<&str> = by_tag.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["gw-9"]);
    let having = hub.admin.devices(None, Some("floor")).await.expect("tag");
    assert_eq!(having.len(), 1);

    // The keys can be read again, and are the ones issued.
    let keys = hub.admin.device_keys("gw-1").await.expect("keys");
    assert_eq!(keys.primary, gw.keys.primary);

    hub.admin.delete_device("gw-1").await.expect("delete");
    assert_eq!(refusal_status(hub.admin.device("gw-1").await), 404);
    assert_eq!(refusal_status(hub.admin.delete_device("gw-1").await), 404);
    // Re-created under the same id, it gets new keys.
    let reborn = hub.register("gw-1", &[]).await;
    assert_ne!(reborn.keys.primary, gw.keys.primary);

    hub.stop().await;
    database.drop_database().await;
}

async fn devices_act_only_as_themselves_with_valid_tokens(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let hub = TestHub::start(dir.path(), &database.database).await;
    let a = hub.register("dev-a", &[]).await;
    let b = hub.register("dev-b", &[]).await;
    let as_a = hub.device("dev-a", &a.keys.primary);
    let as_a_secondary = hub.device("dev-a", &a.keys.secondary);
    let wait = Duration::ZERO;

    // Its own desired state, reports and heartbeats: yes.
    assert!(
        as_a.desired("dev-a", None, wait)
            .await
            .expect("own")
            .is_some()
    );
    let report = Report {
        revision: None,
        status: ReportStatus::Applied,
        error: None,
        health: serde_json::Value::Null,
    };
    as_a.report("dev-a", &report).await.expect("own report");
    as_a.heartbeat("dev-a").await.expect("own heartbeat");
    as_a_secondary
        .desired("dev-a", None, wait)
        .await
        .expect("the secondary key works too");

    // Another device's: 403, reading or writing.
    assert_eq!(refusal_status(as_a.desired("dev-b", None, wait).await), 403);
    assert_eq!(refusal_status(as_a.report("dev-b", &report).await), 403);
    assert_eq!(refusal_status(as_a.heartbeat("dev-b").await), 403);
    let short = std::time::Duration::from_secs(1);
    assert_eq!(
        refusal_status(as_a.forwarded_queries("dev-b", short).await),
        403
    );
    assert_eq!(
        refusal_status(as_a.answer_query("dev-b", "q0", 200, &[], Vec::new()).await),
        403
    );
    // Its own forwarded queries: none yet.
    assert!(
        as_a.forwarded_queries("dev-a", short)
            .await
            .expect("own queries")
            .is_empty()
    );
    // The admin API: 403 for a device, forwarding queries included.
    assert_eq!(
        refusal_status(
            as_a.query_device("dev-a", &weir_query::QueryRequest::new("SELECT 1"))
                .await
        ),
        403
    );
    assert_eq!(refusal_status(as_a.devices(None, None).await), 403);
    assert_eq!(refusal_status(as_a.device_keys("dev-a").await), 403);

    // Raw tokens: expired, tampered, signed with the wrong key, or with no header.
    let url = format!("{}/api/v1/devices/dev-a/desired", hub.url);
    let raw = hub.raw();
    let get = |authorization: Option<String>| {
        let mut request = raw.get(&url);
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        request.send()
    };
    let key_a = DeviceKey::from_base64(&a.keys.primary).expect("key");
    let key_b = DeviceKey::from_base64(&b.keys.primary).expect("key");
    let now = weir_hub::protocol::now_secs();
    // Expired by more than the clock skew the hub allows.
    let expired = get(Some(sign_token(
        &device_resource("dev-a"),
        &key_a,
        now - weir_hub::identity::TOKEN_CLOCK_SKEW - 10,
    )))
    .await
    .expect("request");
    assert_eq!(expired.status(), 401);
    let body = expired.text().await.expect("body");
    assert!(body.contains("expired"), "{body}");

    let good = sign_token(&device_resource("dev-a"), &key_a, now + 600);
    let tampered_expiry = good.replace(&format!("se={}", now + 600), &format!("se={}", now + 900));
    assert_ne!(tampered_expiry, good);
    assert_eq!(
        get(Some(tampered_expiry)).await.expect("request").status(),
        401
    );
    // dev-b's key signing for dev-a.
    let forged = sign_token(&device_resource("dev-a"), &key_b, now + 600);
    assert_eq!(get(Some(forged)).await.expect("request").status(), 401);
    let no_header = get(None).await.expect("request");
    assert_eq!(no_header.status(), 401);
    assert!(no_header.headers().contains_key("www-authenticate"));
    assert_eq!(
        get(Some("Bearer not-the-token".to_owned()))
            .await
            .expect("request")
            .status(),
        401
    );
    assert_eq!(
        get(Some(good.clone())).await.expect("request").status(),
        200
    );

    // Rotating the primary key revokes tokens signed with it; the secondary still works.
    hub.admin
        .rotate_key("dev-a", "primary")
        .await
        .expect("rotate");
    assert_eq!(get(Some(good)).await.expect("request").status(), 401);
    assert_eq!(refusal_status(as_a.heartbeat("dev-a").await), 401);
    as_a_secondary
        .heartbeat("dev-a")
        .await
        .expect("the secondary key still works");

    // A disabled device is refused (403) until enabled again.
    let disable = DevicePatch {
        tags: None,
        enabled: Some(false),
    };
    hub.admin
        .patch_device("dev-a", &disable)
        .await
        .expect("disable");
    let refused = refusal_message(as_a_secondary.heartbeat("dev-a").await);
    assert!(
        refused.contains("disabled") && refused.contains("403"),
        "{refused}"
    );
    let enable = DevicePatch {
        tags: None,
        enabled: Some(true),
    };
    hub.admin
        .patch_device("dev-a", &enable)
        .await
        .expect("enable");
    as_a_secondary
        .heartbeat("dev-a")
        .await
        .expect("enabled again");

    // A deleted device's tokens stop working; the answer is the one a wrong key gets,
    // so device ids cannot be probed.
    let forged = sign_token(&device_resource("dev-b"), &key_a, now + 600);
    let wrong_key = raw
        .get(format!("{}/api/v1/devices/dev-b/desired", hub.url))
        .header("Authorization", forged)
        .send()
        .await
        .expect("request");
    assert_eq!(wrong_key.status(), 401);
    let wrong_key: serde_json::Value = wrong_key.json().await.expect("json");
    hub.admin.delete_device("dev-a").await.expect("delete");
    let forged = sign_token(&device_resource("dev-zz"), &key_a, now + 600);
    let unknown = raw
        .get(format!("{}/api/v1/devices/dev-zz/desired", hub.url))
        .header("Authorization", forged)
        .send()
        .await
        .expect("request");
    assert_eq!(unknown.status(), 401);
    let unknown: serde_json::Value = unknown.json().await.expect("json");
    assert_eq!(
        unknown["error"]["message"]
            .as_str()
            .map(|m| m.replace("dev-zz", "ID")),
        wrong_key["error"]["message"]
            .as_str()
            .map(|m| m.replace("dev-b", "ID")),
    );
    assert_eq!(refusal_status(as_a_secondary.heartbeat("dev-a").await), 401);

    hub.stop().await;
    database.drop_database().await;
}

async fn deployments_target_by_tags_with_priority_and_versions(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let hub = TestHub::start(dir.path(), &database.database).await;
    let gw = hub
        .register("gw", &[("site", "plant-3"), ("role", "gateway")])
        .await;
    let plain = hub.register("plain", &[("site", "plant-3")]).await;
    let other = hub.register("other", &[("site", "plant-9")]).await;
    let as_gw = hub.device("gw", &gw.keys.primary);
    let as_plain = hub.device("plain", &plain.keys.primary);
    let as_other = hub.device("other", &other.keys.primary);
    let desired_name = |client: HubClient, id: &'static str| async move {
        client
            .desired(id, None, Duration::ZERO)
            .await
            .expect("desired")
            .expect("an answer without an etag")
            .deployment
            .map(|d| (d.name, d.version))
    };

    let base = hub
        .admin
        .put_deployment(
            "base",
            &deployment("site = 'plant-3'", 1, &[("filter", &pipeline("base", 50))]),
        )
        .await
        .expect("deploy base");
    assert_eq!(base.version, 1);
    assert_eq!(base.rollout.targeted, 2);
    let gateways = hub
        .admin
        .put_deployment(
            "gateways",
            &deployment(
                "site = 'plant-3' AND role = 'gateway'",
                10,
                &[("filter", &pipeline("gateways", 70))],
            ),
        )
        .await
        .expect("deploy gateways");
    assert_eq!(gateways.rollout.targeted, 1);

    assert_eq!(
        desired_name(as_gw.clone(), "gw").await,
        Some(("gateways".to_owned(), 1))
    );
    assert_eq!(
        desired_name(as_plain.clone(), "plain").await,
        Some(("base".to_owned(), 1))
    );
    assert_eq!(desired_name(as_other.clone(), "other").await, None);

    // A device that gains a matching tag gets the deployment.
    let patch = DevicePatch {
        tags: Some(BTreeMap::from([(
            "role".to_owned(),
            Some("gateway".to_owned()),
        )])),
        enabled: None,
    };
    hub.admin.patch_device("plain", &patch).await.expect("tag");
    assert_eq!(
        desired_name(as_plain.clone(), "plain").await,
        Some(("gateways".to_owned(), 1))
    );

    // An update is a new version with a new revision; the pipelines are the new ones.
    let updated = hub
        .admin
        .put_deployment(
            "gateways",
            &deployment(
                "site = 'plant-3' AND role = 'gateway'",
                10,
                &[("filter", &pipeline("gateways", 80))],
            ),
        )
        .await
        .expect("update");
    assert_eq!(updated.version, 2);
    assert!(updated.revision > gateways.revision);
    let state = as_gw
        .desired("gw", None, Duration::ZERO)
        .await
        .expect("desired")
        .expect("state");
    let desired = state.deployment.expect("a deployment");
    assert_eq!((desired.version, desired.revision), (2, updated.revision));
    assert!(desired.pipelines[0].yaml.contains("temperature > 80"));
    assert_eq!(state.etag, format!("r{}", updated.revision));

    // POST refuses to overwrite.
    let mut spec = deployment("*", 0, &[("filter", &pipeline("gateways", 1))]);
    spec.name = Some("gateways".to_owned());
    let created =
        HubClient::new(&hub.url, Credentials::Admin(ADMIN_TOKEN.to_owned()), None).expect("client");
    let raw = hub.raw();
    let conflict = raw
        .post(format!("{}/api/v1/deployments", created.url()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&spec)
        .send()
        .await
        .expect("request");
    assert_eq!(conflict.status(), 409);

    // Deleting the winner lets the next match take over.
    hub.admin
        .delete_deployment("gateways")
        .await
        .expect("delete");
    assert_eq!(
        desired_name(as_gw, "gw").await,
        Some(("base".to_owned(), 1))
    );
    hub.admin.delete_deployment("base").await.expect("delete");
    assert_eq!(desired_name(as_plain, "plain").await, None);
    assert_eq!(refusal_status(hub.admin.deployment("base").await), 404);

    hub.stop().await;
    database.drop_database().await;
}

async fn rollouts_count_what_devices_report(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let hub = TestHub::start(dir.path(), &database.database).await;
    let mut clients = Vec::new();
    for id in ["d1", "d2", "d3"] {
        let created = hub.register(id, &[("fleet", "blue")]).await;
        clients.push((id, hub.device(id, &created.keys.primary)));
    }
    let view = hub
        .admin
        .put_deployment(
            "blue",
            &deployment("fleet = 'blue'", 0, &[("p", &pipeline("p", 50))]),
        )
        .await
        .expect("deploy");
    let report = |status, error: Option<&str>| Report {
        revision: Some(view.revision),
        status,
        error: error.map(str::to_owned),
        health: serde_json::json!({"pipelines": [{"name": "p", "state": "running"}]}),
    };
    clients[0]
        .1
        .report("d1", &report(ReportStatus::Applied, None))
        .await
        .expect("report");
    clients[1]
        .1
        .report(
            "d2",
            &report(ReportStatus::Failed, Some("the mqtt broker refused")),
        )
        .await
        .expect("report");
    clients[2]
        .1
        .report("d3", &report(ReportStatus::Applying, None))
        .await
        .expect("report");

    let view = hub.admin.deployment("blue").await.expect("deployment");
    assert_eq!(
        (
            view.rollout.targeted,
            view.rollout.applied,
            view.rollout.succeeded,
            view.rollout.failed
        ),
        (3, 3, 1, 1)
    );
    assert_eq!(view.status, "failing");
    let devices = hub.admin.deployment_devices("blue").await.expect("devices");
    let d2 = devices.iter().find(|d| d.id == "d2").expect("d2 listed");
    assert_eq!(
        d2.report.as_ref().and_then(|r| r.error.as_deref()),
        Some("the mqtt broker refused")
    );
    let shown = hub.admin.device("d2").await.expect("device");
    assert!(!shown.in_sync);
    assert_eq!(
        shown.desired.as_ref().map(|d| d.revision),
        Some(view.revision)
    );

    // A new version resets the counts until devices report on it.
    let v2 = hub
        .admin
        .put_deployment(
            "blue",
            &deployment("fleet = 'blue'", 0, &[("p", &pipeline("p", 60))]),
        )
        .await
        .expect("update");
    assert_eq!((v2.rollout.targeted, v2.rollout.applied), (3, 0));
    assert_eq!(v2.status, "rolling-out");
    let fleet = hub.admin.status().await.expect("status");
    assert_eq!(fleet.devices, 3);
    assert_eq!(fleet.deployments.len(), 1);
    assert_eq!(fleet.deployments[0].version, 2);

    hub.stop().await;
    database.drop_database().await;
}

async fn a_bad_deployment_is_refused_with_the_validators_messages(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let hub = TestHub::start(dir.path(), &database.database).await;
    let broken = pipeline("broken", 50).replace("FROM readings", "FROM nowhere");
    let refused = hub
        .admin
        .put_deployment("bad", &deployment("*", 0, &[("filter", &broken)]))
        .await;
    let Err(ClientError::Refused {
        status,
        message,
        diagnostics,
    }) = refused
    else {
        panic!("a broken pipeline was accepted: {refused:?}");
    };
    assert_eq!(status, 422);
    assert!(
        message.contains("deployment 'bad' was refused"),
        "{message}"
    );

    // The same messages `weir validate` gives for the same file.
    let mut registry = weir_operators::registry::builtin();
    registry.register(std::sync::Arc::new(weir_modules::ModuleFactory::new(
        std::sync::Arc::new(weir_modules::ModuleHost::new(dir.path().join("m"))),
    )));
    let file = Path::new("bad/filter.yaml");
    let expected =
        weir_pipelines::validate_str(file, &broken, &registry, &|_| None, Path::new("."))
            .expect_err("the validator refuses it too");
    let texts: Vec<String> = diagnostics.iter().map(|d| d.text.clone()).collect();
    let expected: Vec<String> = expected.iter().map(ToString::to_string).collect();
    assert_eq!(texts, expected);
    assert!(texts[0].contains("nowhere"), "{texts:?}");
    assert!(diagnostics[0].line > 0);

    // Nothing was stored.
    assert_eq!(
        hub.admin
            .deployment("bad")
            .await
            .map(|d| d.name)
            .map_err(|e| e.status()),
        Err(Some(404))
    );

    // A bad condition, no pipelines, a bad name, two documents of one name: 400.
    let bad_condition = hub
        .admin
        .put_deployment("c", &deployment("site = ", 0, &[("p", &pipeline("p", 1))]))
        .await;
    assert!(refusal_message(bad_condition).contains("HTTP 400"));
    assert_eq!(
        refusal_status(
            hub.admin
                .put_deployment("c", &deployment("*", 0, &[]))
                .await
        ),
        400
    );
    assert_eq!(
        refusal_status(
            hub.admin
                .put_deployment("a b", &deployment("*", 0, &[("p", &pipeline("p", 1))]))
                .await
        ),
        400
    );
    let twice = deployment(
        "*",
        0,
        &[("p", &pipeline("p", 1)), ("p", &pipeline("q", 1))],
    );
    assert_eq!(
        refusal_status(hub.admin.put_deployment("c", &twice).await),
        400
    );
    // Two documents naming the same pipeline: the validator's cross-file check.
    let same = deployment(
        "*",
        0,
        &[("p", &pipeline("p", 1)), ("q", &pipeline("p", 2))],
    );
    let Err(ClientError::Refused { diagnostics, .. }) = hub.admin.put_deployment("c", &same).await
    else {
        panic!("two pipelines of one name were accepted");
    };
    assert!(
        diagnostics[0]
            .text
            .contains("pipeline name 'p' is already used"),
        "{diagnostics:?}"
    );

    hub.stop().await;
    database.drop_database().await;
}

async fn a_long_poll_answers_when_the_desired_state_changes(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let hub = TestHub::start(dir.path(), &database.database).await;
    let created = hub.register("poller", &[("site", "x")]).await;
    let device = hub.device("poller", &created.keys.primary);
    let first = device
        .desired("poller", None, Duration::ZERO)
        .await
        .expect("desired")
        .expect("state");
    assert_eq!(first.etag, "none");

    // Nothing changes: the poll waits, then says so.
    let started = Instant::now();
    let unchanged = device
        .desired("poller", Some("none"), Duration::from_secs(1))
        .await
        .expect("poll");
    assert!(unchanged.is_none());
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A deployment arrives while the device waits: the poll answers with it.
    let poll = {
        let device = device.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let state = device
                .desired("poller", Some("none"), Duration::from_secs(20))
                .await;
            (state, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let view = hub
        .admin
        .put_deployment(
            "x",
            &deployment("site = 'x'", 0, &[("p", &pipeline("p", 1))]),
        )
        .await
        .expect("deploy");
    let (state, waited) = poll.await.expect("poll task");
    let state = state.expect("poll").expect("a change");
    assert_eq!(state.etag, format!("r{}", view.revision));
    assert!(
        waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );

    hub.stop().await;
    database.drop_database().await;
}

async fn a_generated_admin_token_is_printed_once_and_kept_hashed(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let mut setup = Setup::new(dir.path(), &database.database);
    setup.admin_token = None;
    let (hub, generated) = setup.start().await;
    let token = generated.expect("a first start generates the admin token");
    assert!(token.starts_with("weir_admin_"));
    hub.admin.status().await.expect("the generated token works");
    hub.stop().await;

    // Started again: nothing new to print, and the same token still works.
    let mut setup = Setup::new(dir.path(), &database.database);
    setup.admin_token = None;
    let (hub, generated) = setup.start().await;
    assert_eq!(generated, None);
    let admin = HubClient::new(&hub.url, Credentials::Admin(token.clone()), None).expect("client");
    admin
        .status()
        .await
        .expect("the token from the first start");
    let stranger = HubClient::new(
        &hub.url,
        Credentials::Admin("weir_admin_guess".to_owned()),
        None,
    )
    .expect("client");
    assert_eq!(refusal_status(stranger.status().await), 401);
    hub.stop().await;

    // The token itself is stored nowhere: not in the data directory, not in the database.
    for entry in std::fs::read_dir(dir.path()).expect("data dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            let bytes = std::fs::read(&path).expect("read");
            let found = bytes.windows(token.len()).any(|w| w == token.as_bytes());
            assert!(!found, "the admin token is in {}", path.display());
        }
    }
    database.drop_database().await;
}

async fn silent_devices_go_offline_and_metrics_count_them(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let mut setup = Setup::new(dir.path(), &database.database);
    setup.offline_after = Duration::from_secs(2);
    let (hub, _) = setup.start().await;
    let created = hub.register("beating", &[]).await;
    hub.register("silent", &[]).await;
    let device = hub.device("beating", &created.keys.primary);
    device.heartbeat("beating").await.expect("heartbeat");

    let connection = |id: &'static str| {
        let admin = hub.admin.clone();
        async move {
            admin
                .device(id)
                .await
                .expect("device")
                .connection
                .as_str()
                .to_owned()
        }
    };
    // Heartbeats are written within a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    while connection("beating").await != "online" {
        assert!(Instant::now() < deadline, "the heartbeat was not recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(connection("silent").await, "never");

    let metrics = hub
        .raw()
        .get(format!("{}/metrics", hub.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("weir_hub_devices{connection=\"online\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("weir_hub_devices{connection=\"never\"} 1"));
    assert!(
        metrics.contains(
            "weir_hub_http_requests_total{method=\"POST\",route=\"/api/v1/devices/{id}/heartbeat\",status=\"204\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("weir_hub_http_request_duration_seconds_bucket"));

    // The heartbeats stop: offline once `offline_after` has passed.
    let deadline = Instant::now() + Duration::from_secs(15);
    while connection("beating").await != "offline" {
        assert!(Instant::now() < deadline, "the device never went offline");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    hub.stop().await;
    database.drop_database().await;
}

/// `/metrics` needs no token, so however often it and `/status` are asked for, the hub
/// reads every device row at most once a second (issue 18: cheap at 10,000 devices).
async fn scrapes_and_status_calls_share_one_read_of_the_fleet(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let hub = TestHub::start(dir.path(), &database.database).await;
    for id in ["one", "two", "three"] {
        hub.register(id, &[]).await;
    }
    let scrape = || {
        let client = hub.raw();
        let url = format!("{}/metrics", hub.url);
        async move {
            client
                .get(url)
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text")
        }
    };
    let scans = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("weir_hub_fleet_scans_total "))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no fleet scan count in {metrics}"))
    };
    let before = scans(&scrape().await);
    let started = Instant::now();
    let calls = 40;
    let scrapes = futures::future::join_all((0..calls).map(|_| scrape()));
    let statuses = futures::future::join_all((0..calls).map(|_| hub.admin.status()));
    let (_, statuses) = tokio::join!(scrapes, statuses);
    for status in statuses {
        assert_eq!(status.expect("status").devices, 3);
    }
    let elapsed = started.elapsed();
    let made = scans(&scrape().await) - before;
    assert!(
        made <= elapsed.as_secs() + 2,
        "{made} reads of every device for {} calls in {elapsed:?}",
        2 * calls
    );

    // A change to the fleet shows at once all the same.
    hub.register("four", &[]).await;
    assert_eq!(hub.admin.status().await.expect("status").devices, 4);
    hub.stop().await;
    database.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_sharing_one_postgres_database_agree() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(Db::Postgres, dir.path()).await;
    // Both hubs read the secret from one file, as hubs sharing a database must.
    let one = TestHub::start(dir.path(), &database.database).await;
    let two = TestHub::start(dir.path(), &database.database).await;
    let created = one.register("shared", &[("site", "a")]).await;

    // Registered through one hub, the device authenticates at the other.
    let device_at_two = two.device("shared", &created.keys.primary);
    let first = device_at_two
        .desired("shared", None, Duration::ZERO)
        .await
        .expect("desired at hub two")
        .expect("state");
    assert_eq!(first.etag, "none");

    // A poll held by hub two answers when hub one deploys.
    let poll = {
        let device = device_at_two.clone();
        tokio::spawn(async move {
            device
                .desired("shared", Some("none"), Duration::from_secs(20))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let view = one
        .admin
        .put_deployment(
            "d",
            &deployment("site = 'a'", 0, &[("p", &pipeline("p", 1))]),
        )
        .await
        .expect("deploy at hub one");
    let state = poll.await.expect("poll").expect("poll").expect("a change");
    assert_eq!(state.etag, format!("r{}", view.revision));

    // Updates racing through both hubs each get their own version.
    let mut updates = Vec::new();
    for round in 0..10u32 {
        let admin = if round % 2 == 0 {
            one.admin.clone()
        } else {
            two.admin.clone()
        };
        updates.push(tokio::spawn(async move {
            admin
                .put_deployment(
                    "d",
                    &deployment("site = 'a'", 0, &[("p", &pipeline("p", round))]),
                )
                .await
                .expect("update")
        }));
    }
    let mut versions = Vec::new();
    for update in updates {
        versions.push(update.await.expect("update task").version);
    }
    versions.sort_unstable();
    assert_eq!(versions, (2..=11).collect::<Vec<u64>>());
    let at_two = two.admin.deployment("d").await.expect("read at hub two");
    assert_eq!(at_two.version, 11);

    one.stop().await;
    two.stop().await;
    database.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_serves_https_with_its_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = weir_testkit::Pki::generate(dir.path());
    let database = TestDatabase::new(Db::Sqlite, dir.path()).await;
    let mut setup = Setup::new(dir.path(), &database.database);
    setup.tls = Some(TlsFiles {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
    });
    setup.ca_file = Some(pki.ca_file.clone());
    let (hub, _) = setup.start().await;
    assert!(hub.url.starts_with("https://"), "{}", hub.url);
    hub.admin.status().await.expect("status over TLS");

    // A client that does not trust the hub's authority refuses the connection.
    let stranger = HubClient::new(
        &hub.url,
        Credentials::Admin(ADMIN_TOKEN.to_owned()),
        Some(&pki.other_ca_file),
    )
    .expect("client");
    let refused = stranger
        .status()
        .await
        .expect_err("an untrusted certificate");
    assert!(
        matches!(refused, ClientError::Unreachable { .. }),
        "{refused}"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(Db::Sqlite, dir.path()).await;
    let hub = TestHub::start(dir.path(), &database.database).await;
    let document: serde_json::Value = hub
        .raw()
        .get(format!("{}/api/v1/openapi.json", hub.url))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3."))
    );
    let paths = document["paths"].as_object().expect("paths");
    let mut operations: Vec<String> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flat_map(|methods| methods.keys())
                .map(move |method| format!("{} {path}", method.to_uppercase()))
        })
        .collect();
    operations.sort();
    assert_eq!(
        operations,
        [
            "DELETE /api/v1/deployments/{name}",
            "DELETE /api/v1/devices/{id}",
            "GET /api/v1/deployments",
            "GET /api/v1/deployments/{name}",
            "GET /api/v1/deployments/{name}/devices",
            "GET /api/v1/devices",
            "GET /api/v1/devices/{id}",
            "GET /api/v1/devices/{id}/desired",
            "GET /api/v1/devices/{id}/keys",
            "GET /api/v1/devices/{id}/queries",
            "GET /api/v1/status",
            "PATCH /api/v1/devices/{id}",
            "POST /api/v1/deployments",
            "POST /api/v1/devices",
            "POST /api/v1/devices/{id}/data/{pipeline}/{sink}/{seq}",
            "POST /api/v1/devices/{id}/heartbeat",
            "POST /api/v1/devices/{id}/keys/{slot}/rotate",
            "POST /api/v1/devices/{id}/queries/{query}/answer",
            "POST /api/v1/devices/{id}/query",
            "POST /api/v1/devices/{id}/report",
            "POST /api/v1/query",
            "PUT /api/v1/deployments/{name}",
            "PUT /api/v1/devices/{id}/tags",
        ]
    );
    // A query that does not parse and a method a route does not take answer in JSON too.
    hub.register("q", &[]).await;
    let bad_query = hub
        .raw()
        .get(format!("{}/api/v1/devices/q/desired?wait=soon", hub.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("request");
    assert_eq!(bad_query.status(), 400);
    let body: serde_json::Value = bad_query.json().await.expect("a JSON error");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("wait")),
        "{body}"
    );
    let wrong_method = hub
        .raw()
        .delete(format!("{}/api/v1/status", hub.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("request");
    assert_eq!(wrong_method.status(), 405);
    let body: serde_json::Value = wrong_method.json().await.expect("a JSON error");
    assert_eq!(body["error"]["status"], 405);

    // Each documented route answers (an unknown one is a JSON 404 naming the path).
    let missing = hub
        .raw()
        .get(format!("{}/api/v1/nothing-here", hub.url))
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), 404);
    let body = missing.text().await.expect("body");
    assert!(body.contains("/api/v1/nothing-here"), "{body}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_past_its_limits_gets_429_or_422_and_others_are_not_held_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(Db::Sqlite, dir.path()).await;
    let mut setup = Setup::new(dir.path(), &database.database);
    setup.limits = weir_hub::limits::RequestLimits {
        max_polls_per_device: 1,
        max_streams_per_device: 1,
        ..weir_hub::limits::RequestLimits::default()
    };
    let (hub, _) = setup.start().await;
    let a = hub.register("dev-a", &[]).await;
    let b = hub.register("dev-b", &[]).await;
    let as_a = hub.device("dev-a", &a.keys.primary);
    let as_b = hub.device("dev-b", &b.keys.primary);

    // Reports: a burst of 10 passes, then the rate applies; another device has its own.
    let report = Report {
        revision: None,
        status: ReportStatus::Applied,
        error: None,
        health: serde_json::Value::Null,
    };
    for _ in 0..10 {
        as_a.report("dev-a", &report)
            .await
            .expect("within the burst");
    }
    assert_eq!(refusal_status(as_a.report("dev-a", &report).await), 429);
    as_b.report("dev-b", &report)
        .await
        .expect("its own allowance");

    // Long polls: one held open at a time per kind.
    let etag = as_a
        .desired("dev-a", None, Duration::ZERO)
        .await
        .expect("desired")
        .expect("a state")
        .etag;
    let held = {
        let as_a = hub.device("dev-a", &a.keys.primary);
        let etag = etag.clone();
        tokio::spawn(async move {
            as_a.desired("dev-a", Some(&etag), Duration::from_secs(3))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        refusal_status(
            as_a.desired("dev-a", Some(&etag), Duration::from_secs(3))
                .await
        ),
        429
    );
    as_b.desired("dev-b", None, Duration::ZERO)
        .await
        .expect("another device polls");
    held.await
        .expect("the held poll")
        .expect("ends at its wait");
    as_a.desired("dev-a", Some(&etag), Duration::ZERO)
        .await
        .expect("free again");

    // Streams: one per device here; a second is refused for good.
    let batch = {
        use weir_engine::arrow::array::Int64Array;
        use weir_engine::arrow::datatypes::{DataType, Field, Schema};
        let schema =
            std::sync::Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch = weir_engine::arrow::record_batch::RecordBatch::try_new(
            schema,
            vec![std::sync::Arc::new(Int64Array::from(vec![1]))],
        )
        .expect("a batch");
        weir_outbox::frame::encode_batch(&batch).expect("encodes")
    };
    let day = 1_767_225_600_000;
    as_a.ship("dev-a", ("plant", "uplink", 0), day, batch.clone())
        .await
        .expect("the first stream");
    assert_eq!(
        refusal_status(
            as_a.ship("dev-a", ("plant", "junk", 0), day, batch.clone())
                .await
        ),
        422
    );
    as_b.ship("dev-b", ("plant", "junk", 0), day, batch)
        .await
        .expect("another device's first stream");
    let metrics = hub
        .raw()
        .get(format!("{}/metrics", hub.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("weir_hub_ingest_refused_total{reason=\"quota\"} 1"),
        "{metrics}"
    );
    hub.stop().await;
    database.drop_database().await;
}
