//! Shipping from a device's outbox to a release `weir-hub` on loopback.
//!
//! This process plays the device: it appends `SHIP_MB` (1024) MiB of batches to an
//! outbox (fsynced per commit group of `SHIP_GROUP` batches), then starts a shipper and
//! times the drain of that backlog to the hub, which stores each batch once as Parquet.
//! Reports append throughput (rows/s, MB/s as stored), drain throughput, and this
//! process's peak RSS while draining (the outbox is never loaded whole). Targets: drain
//! faster than 50 MB/s, RSS under 200 MB.
//!
//! ```sh
//! cargo bench -p weir-hub --bench ship
//! ```
//!
//! `HUB_BIN` names another `weir-hub` binary.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_engine::arrow::array::{Float64Array, Int64Array, StringArray};
use weir_engine::arrow::datatypes::{DataType, Field, Schema};
use weir_engine::arrow::record_batch::RecordBatch;
use weir_hub::protocol::NewDevice;
use weir_hub::{Credentials, HubClient, HubUplink};
use weir_outbox::{Limits, Outbox, Shipping};

mod support;
use support::{env_or, rss_mib};

const ADMIN_TOKEN: &str = "weir_admin_ship-bench";
/// Rows per batch: a few seconds of readings from a gateway's devices.
const ROWS: i64 = 8192;

/// A batch of readings whose values compress as real readings do (not at all, nearly).
fn batch(n: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("device", DataType::Utf8, false),
        Field::new("ts", DataType::Int64, false),
        Field::new("temperature", DataType::Float64, false),
        Field::new("humidity", DataType::Float64, false),
    ]));
    let mut x = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut noise = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                (0..ROWS).map(|i| format!("dev-{:04}", i % 1000)),
            )),
            Arc::new(Int64Array::from_iter_values(
                (0..ROWS).map(|i| n * ROWS + i),
            )),
            Arc::new(Float64Array::from_iter_values(
                (0..ROWS).map(|_| 60.0 + noise()),
            )),
            Arc::new(Float64Array::from_iter_values(
                (0..ROWS).map(|_| 40.0 + noise()),
            )),
        ],
    )
    .expect("a batch")
}

fn main() {
    let megabytes: u64 = env_or("SHIP_MB", 1024);
    let group: usize = env_or("SHIP_GROUP", 8);
    let binary = std::env::var_os("HUB_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_weir-hub")),
        PathBuf::from,
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("address").port()
    };
    let mut hub = Command::new(&binary)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path().join("hub"))
        .env("WEIR_HUB_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start weir-hub");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let url = format!("http://127.0.0.1:{port}");
    let outcome = runtime.block_on(async {
        let admin = HubClient::new(&url, Credentials::Admin(ADMIN_TOKEN.to_owned()), None)
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        while admin.status().await.is_err() {
            if started.elapsed() > Duration::from_secs(30) {
                return Err("the hub did not start".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let created = admin
            .create_device(&NewDevice {
                id: "bench-1".to_owned(),
                tags: Default::default(),
            })
            .await
            .map_err(|e| e.to_string())?;
        let key = weir_hub::identity::DeviceKey::from_base64(&created.keys.primary)
            .map_err(|e| e.to_string())?;
        let device = admin.with_credentials(Credentials::Device {
            id: "bench-1".to_owned(),
            key,
        });

        // Append the backlog, as the hub sink does while the hub is out of reach.
        let path = dir.path().join("outbox.redb");
        let limits = Limits {
            max_bytes: u64::MAX,
            max_age: None,
        };
        let (rows, bytes, append_time) = {
            let (outbox, _) = Outbox::open(&path, limits).map_err(|e| e.to_string())?;
            let target = megabytes * 1024 * 1024;
            let started = Instant::now();
            let mut n = 0;
            while outbox.stats().bytes < target {
                let batches: Vec<RecordBatch> = (0..group as i64).map(|i| batch(n + i)).collect();
                n += group as i64;
                outbox
                    .append("plant/uplink", &batches, 1_767_225_600_000)
                    .map_err(|e| e.to_string())?;
            }
            let stats = outbox.stats();
            (stats.rows, stats.bytes, started.elapsed())
        };
        let mb = bytes as f64 / 1e6;
        println!(
            "append: {rows} rows, {mb:.0} MB stored in {:.1} s: {:.0} rows/s, {:.1} MB/s (fsync per {group} batches of {ROWS} rows)",
            append_time.as_secs_f64(),
            rows as f64 / append_time.as_secs_f64(),
            mb / append_time.as_secs_f64()
        );

        // The hub is back: drain.
        let (rss_before, _) = rss_mib("self");
        let shipping = Shipping::new(
            path,
            limits,
            Arc::new(HubUplink::new(device, "bench-1".to_owned())),
            weir_engine::metrics::EngineMetrics::new(&prometheus::Registry::new())
                .map_err(|e| e.to_string())?
                .outbox(),
        );
        let started = Instant::now();
        shipping.start()?;
        let mut peak_rss: f64 = 0.0;
        loop {
            let left = shipping.drain(Duration::from_millis(200)).await;
            peak_rss = peak_rss.max(rss_mib("self").0);
            if left == 0 {
                break;
            }
            if started.elapsed() > Duration::from_secs(1800) {
                return Err(format!("{left} batches still waiting after 30 minutes"));
            }
        }
        let drain = started.elapsed();
        println!(
            "drain: {mb:.0} MB ({rows} rows) to the hub in {:.1} s: {:.1} MB/s, {:.0} rows/s (target > 50 MB/s)",
            drain.as_secs_f64(),
            mb / drain.as_secs_f64(),
            rows as f64 / drain.as_secs_f64()
        );
        println!(
            "device RSS while draining: {peak_rss:.0} MiB at most (before: {rss_before:.0} MiB; target < 200 MB)"
        );
        let mut request = weir_query::QueryRequest::new("SELECT count(*) AS n FROM plant.uplink");
        request.format = Some(weir_query::Format::Csv);
        let answer = admin.query(&request).await.map_err(|e| e.to_string())?;
        println!(
            "the hub holds: {}",
            String::from_utf8_lossy(&answer.body).replace('\n', " ")
        );
        Ok(())
    });
    let _ = hub.kill();
    let _ = hub.wait();
    outcome.expect("the bench ran");
}
