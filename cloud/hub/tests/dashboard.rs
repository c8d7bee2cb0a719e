//! The dashboard in a real browser: headless Chromium renders each page of a hub with
//! devices, a deployment and shipped data, and the rendered page must show them (a
//! device's aggregates and its chart with anomalies marked); screenshots are taken too. Chromium comes from `apt-get install chromium` (as `.ci/run` does).

mod support;

use std::path::Path;
use std::process::Command;

use support::{ADMIN_TOKEN, Db, TestDatabase, TestHub, deployment, pipeline};
use weir_hub::protocol::{Report, ReportStatus};

/// The Chromium binary: `CHROMIUM` if set, else the first of the usual names on PATH.
fn chromium() -> String {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return path;
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new("which")
            .arg(name)
            .output()
            .is_ok_and(|output| output.status.success());
        if found {
            return name.to_owned();
        }
    }
    panic!("the dashboard test needs Chromium: apt-get install chromium (or set CHROMIUM)");
}

/// Renders `url` headless and returns the DOM after its scripts ran; with `screenshot`,
/// also writes a PNG there.
fn render(url: &str, profile: &Path, screenshot: Option<&Path>) -> String {
    let mut command = Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1280,900",
            // Lets the page's fetches finish before the DOM is taken.
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    let output = command.arg(url).output().expect("run chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_devices_deployments_and_a_device_in_trouble() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(Db::Sqlite, dir.path()).await;
    let hub = TestHub::start(dir.path(), &database.database).await;
    let good = hub.register("press-7", &[("site", "plant-3")]).await;
    let bad = hub.register("oven-2", &[("site", "plant-3")]).await;
    hub.register("spare-9", &[("site", "lab")]).await;
    let view = hub
        .admin
        .put_deployment(
            "plant3-filter",
            &deployment("site = 'plant-3'", 5, &[("p", &pipeline("p", 50))]),
        )
        .await
        .expect("deploy");
    let report = |status, error: Option<&str>| Report {
        revision: Some(view.revision),
        status,
        error: error.map(str::to_owned),
        health: serde_json::json!({"pipelines": [{"name": "p", "state": "running"}]}),
    };
    hub.device("press-7", &good.keys.primary)
        .report("press-7", &report(ReportStatus::Applied, None))
        .await
        .expect("report");
    hub.device("oven-2", &bad.keys.primary)
        .report(
            "oven-2",
            &report(
                ReportStatus::Failed,
                Some("sink 'out': cannot open /data: permission denied"),
            ),
        )
        .await
        .expect("report");

    // press-7 shipped per-minute aggregates, two of them flagged as anomalies.
    hub.device("press-7", &good.keys.primary)
        .ship(
            "press-7",
            ("plant", "per_minute", 0),
            1_767_225_600_000,
            aggregates(),
        )
        .await
        .expect("ship");

    let url = hub.url.clone();
    let profile = dir.path().join("chromium");
    let pages = tokio::task::spawn_blocking(move || {
        let page = |route: &str| format!("{url}/#{route}?token={ADMIN_TOKEN}");
        let overview = render(&page("/"), &profile, None);
        let devices = render(&page("/devices"), &profile, None);
        let deployments = render(&page("/deployments"), &profile, None);
        let device = render(&page("/devices/oven-2"), &profile, None);
        let shipped = render(&page("/devices/press-7"), &profile, None);
        let shipped_png = profile.with_file_name("shipped.png");
        render(&page("/devices/press-7"), &profile, Some(&shipped_png));
        let png = profile.with_file_name("dashboard.png");
        render(&page("/deployments"), &profile, Some(&png));
        (overview, devices, deployments, device, shipped, png)
    })
    .await
    .expect("render");
    let (overview, devices, deployments, device, shipped, png) = pages;

    // The overview: device counts, and the deployment with its rollout.
    assert!(overview.contains(r#"id="count-devices">3<"#), "{overview}");
    assert!(overview.contains("plant3-filter"), "{overview}");
    assert!(overview.contains(r#"class="failing""#), "{overview}");
    // Every device, with its tags and what it reported.
    for id in ["press-7", "oven-2", "spare-9"] {
        assert!(devices.contains(id), "{id} missing: {devices}");
    }
    assert!(devices.contains("site=plant-3"), "{devices}");
    // The deployment's rollout counts: targeted 2, applied 2, succeeded 1, failed 1.
    let row = deployments
        .split("<tr>")
        .find(|row| row.contains("plant3-filter"))
        .unwrap_or_else(|| panic!("no deployment row: {deployments}"));
    let cells: Vec<&str> = row
        .split("<td")
        .skip(1)
        .map(|cell| {
            let text = &cell[cell.find('>').map_or(0, |i| i + 1)..];
            &text[..text.find('<').unwrap_or(text.len())]
        })
        .collect();
    assert_eq!(&cells[4..9], ["failing", "2", "2", "1", "1"], "{row}");
    // A device in trouble shows its error.
    assert!(
        device.contains("cannot open /data: permission denied"),
        "{device}"
    );
    assert!(device.contains(r#"id="device-error""#), "{device}");
    // The token was moved out of the address at once.
    assert!(
        !device.contains(ADMIN_TOKEN),
        "the token leaked into the page"
    );

    // A device's shipped data: the table, its last rows, and a chart with the anomalies.
    assert!(shipped.contains(r#"id="shipped""#), "{shipped}");
    assert!(shipped.contains("<b>plant.per_minute</b>"), "{shipped}");
    assert!(shipped.contains("<b>avg_t</b>"), "{shipped}");
    assert!(shipped.contains("anomalies from is_anomaly"), "{shipped}");
    assert!(shipped.contains(r#"<svg id="chart""#), "{shipped}");
    assert_eq!(
        shipped.matches(r#"class="anomaly""#).count(),
        2,
        "{shipped}"
    );
    let recent = shipped
        .split(r#"id="recent""#)
        .nth(1)
        .expect("the recent rows");
    assert_eq!(
        recent.matches("<tr>").count(),
        11,
        "a header and 10 rows: {recent}"
    );
    assert!(recent.contains("<td>63.5</td>"), "{recent}");

    let image = std::fs::read(&png).expect("the screenshot was written");
    assert!(image.starts_with(b"\x89PNG"), "not a PNG");
    assert!(
        image.len() > 10_000,
        "a blank screenshot? {} bytes",
        image.len()
    );
    hub.stop().await;
}

/// Ten per-minute aggregates of one sensor as the hub sink ships them, with the
/// anomaly flag set on the 4th and 8th.
fn aggregates() -> Vec<u8> {
    use std::sync::Arc;
    use weir_engine::arrow::array::{
        BooleanArray, Float64Array, StringArray, TimestampMillisecondArray,
    };
    use weir_engine::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "window_start",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("device", DataType::Utf8, false),
        Field::new("avg_t", DataType::Float64, false),
        Field::new("is_anomaly", DataType::Boolean, false),
    ]));
    let batch = weir_engine::arrow::record_batch::RecordBatch::try_new(
        schema,
        vec![
            Arc::new(TimestampMillisecondArray::from_iter_values(
                (0..10).map(|i| 1_767_225_600_000 + i * 60_000),
            )),
            Arc::new(StringArray::from_iter_values((0..10).map(|_| "sensor-1"))),
            Arc::new(Float64Array::from_iter_values((0..10).map(|i| {
                if i == 3 || i == 7 {
                    63.5
                } else {
                    60.0 + i as f64 * 0.1
                }
            }))),
            Arc::new(BooleanArray::from_iter(
                (0..10).map(|i| Some(i == 3 || i == 7)),
            )),
        ],
    )
    .expect("a batch");
    weir_outbox::frame::encode_batch(&batch).expect("encodes")
}
