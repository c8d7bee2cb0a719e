//! The fleet's shipped data through the hub's API: each batch stored once, laid out by
//! pipeline, sink, day and device, compacted, and queryable, both in a local directory
//! and in an S3-compatible bucket (moto's server, started per test). Also what the hub
//! does when the bucket is missing or the store goes away, and `weir-hub serve` taking
//! its bucket and credentials from the command line and the `AWS_*` environment.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt};
use support::{ADMIN_TOKEN, Db, Setup, TestDatabase, refusal_status};
use weir_hub::data::{FleetLocation, S3Location};
use weir_hub::protocol::NewDevice;
use weir_hub::{Credentials, Hub, HubClient, HubConfig};
use weir_testkit::S3Server;

/// 2026-01-01T00:00:00Z, in ms.
const DAY: i64 = 1_767_225_600_000;

/// A batch as a device's outbox holds it: zstd Arrow IPC of `rows` readings from `from`.
fn shipped_batch(from: i64, rows: i64) -> Vec<u8> {
    use weir_engine::arrow::array::Int64Array;
    use weir_engine::arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let batch = weir_engine::arrow::record_batch::RecordBatch::try_new(
        schema,
        vec![Arc::new(Int64Array::from_iter_values(from..from + rows))],
    )
    .expect("a batch");
    weir_outbox::frame::encode_batch(&batch).expect("encodes")
}

/// An S3 location in `server`'s `bucket`, under `prefix`.
fn s3_location(server: &S3Server, bucket: &str, prefix: &str) -> FleetLocation {
    FleetLocation::S3(S3Location {
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
        settings: server.settings(),
    })
}

/// The bucket as a client of its own sees it, rooted at `prefix`.
fn bucket_seen_from_outside(server: &S3Server, bucket: &str, prefix: &str) -> Arc<dyn ObjectStore> {
    let mut builder = AmazonS3Builder::new().with_bucket_name(bucket);
    for (key, value) in server.settings() {
        builder = builder.with_config(key.parse::<AmazonS3ConfigKey>().expect("a key"), value);
    }
    let bucket = builder.build().expect("an S3 client");
    Arc::new(PrefixStore::new(bucket, prefix))
}

/// The names of the objects under `prefix`.
async fn objects_under(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    let listed: Vec<_> = store
        .list(Some(&ObjectPath::from(prefix)))
        .try_collect()
        .await
        .expect("lists");
    let mut names: Vec<String> = listed.into_iter().map(|o| o.location.to_string()).collect();
    names.sort();
    names
}

/// Where a test's hub keeps the fleet's data.
enum Storage {
    /// The default: `DATA_DIR/fleet`.
    Directory,
    /// A bucket on a moto server.
    S3(S3Server),
}

on_both_databases!(shipped_batches_in_a_directory);

async fn shipped_batches_in_a_directory(db: Db) {
    shipped_batches_are_stored_once_per_device_and_queryable(db, Storage::Directory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_batches_in_an_s3_bucket() {
    let server = S3Server::start();
    server.create_bucket("fleet");
    shipped_batches_are_stored_once_per_device_and_queryable(Db::Sqlite, Storage::S3(server)).await;
}

async fn shipped_batches_are_stored_once_per_device_and_queryable(db: Db, storage: Storage) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let mut setup = Setup::new(dir.path(), &database.database);
    if let Storage::S3(server) = &storage {
        setup.fleet_data = Some(s3_location(server, "fleet", "plant-hub"));
    }
    let (hub, _) = setup.start().await;
    let files: Arc<dyn ObjectStore> = match &storage {
        Storage::Directory => Arc::new(
            LocalFileSystem::new_with_prefix(dir.path().join("fleet")).expect("the directory"),
        ),
        Storage::S3(server) => bucket_seen_from_outside(server, "fleet", "plant-hub"),
    };
    let a = hub.register("edge-a", &[]).await;
    let b = hub.register("edge-b", &[]).await;
    let as_a = hub.device("edge-a", &a.keys.primary);
    let as_b = hub.device("edge-b", &b.keys.primary);

    let first = as_a
        .ship("edge-a", ("plant", "uplink", 0), DAY, shipped_batch(0, 3))
        .await
        .expect("stored");
    assert_eq!((first.stored, first.rows), (true, 3));
    // The same batch again (a lost acknowledgement): acknowledged, not stored twice.
    let again = as_a
        .ship("edge-a", ("plant", "uplink", 0), DAY, shipped_batch(0, 3))
        .await
        .expect("acknowledged");
    assert_eq!((again.stored, again.rows), (false, 0));
    as_a.ship("edge-a", ("plant", "uplink", 1), DAY, shipped_batch(3, 2))
        .await
        .expect("stored");
    // Another device's sequence numbers are its own.
    as_b.ship(
        "edge-b",
        ("plant", "uplink", 0),
        DAY + 86_400_000,
        shipped_batch(100, 4),
    )
    .await
    .expect("stored");
    // A device ships only as itself, and only Arrow.
    assert_eq!(
        refusal_status(
            as_a.ship("edge-b", ("plant", "uplink", 9), DAY, shipped_batch(0, 1))
                .await
        ),
        403
    );
    assert_eq!(
        refusal_status(
            as_a.ship("edge-a", ("plant", "uplink", 9), DAY, b"not arrow".to_vec())
                .await
        ),
        400
    );
    assert_eq!(
        refusal_status(
            as_a.ship(
                "edge-a",
                ("pipe;line", "uplink", 9),
                DAY,
                shipped_batch(0, 1)
            )
            .await
        ),
        400
    );

    let mut request = weir_query::QueryRequest::new(
        "SELECT hub_device, count(*) AS rows, sum(n) AS total FROM plant.uplink \
         GROUP BY hub_device ORDER BY hub_device",
    );
    request.format = Some(weir_query::Format::Csv);
    let answer = hub.admin.query(&request).await.expect("the fleet answers");
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        "hub_device,rows,total\nedge-a,5,10\nedge-b,4,406\n"
    );
    // The files are laid out by pipeline, sink, day and device.
    assert_eq!(
        objects_under(
            files.as_ref(),
            "pipeline=plant/sink=uplink/date=2026-01-02/device=edge-b"
        )
        .await,
        ["pipeline=plant/sink=uplink/date=2026-01-02/device=edge-b/00000000000000000000.parquet"]
    );
    // Many small files of one device and day are compacted into one; nothing changes
    // for queries, and a batch sent again is still known.
    for seq in 2..20 {
        as_a.ship(
            "edge-a",
            ("plant", "uplink", seq),
            DAY,
            shipped_batch(seq as i64 * 10, 1),
        )
        .await
        .expect("stored");
    }
    let day_dir = "pipeline=plant/sink=uplink/date=2026-01-01/device=edge-a";
    assert_eq!(objects_under(files.as_ref(), day_dir).await.len(), 20);
    // Files the hub did not write are never touched, however many and small.
    for n in 0..20 {
        files
            .put(
                &ObjectPath::from(format!("exports/part-{n}.parquet")),
                vec![0u8; 8].into(),
            )
            .await
            .expect("a foreign file");
    }
    // A file whose record was never written (the hub stopped between the two): a copy
    // of batch 2's file stands in for batch 99's.
    let orphan = ObjectPath::from(format!("{day_dir}/00000000000000000099.parquet"));
    let copy = files
        .get(&ObjectPath::from(format!(
            "{day_dir}/00000000000000000002.parquet"
        )))
        .await
        .expect("batch 2's file")
        .bytes()
        .await
        .expect("its bytes");
    files
        .put(&orphan, copy.clone().into())
        .await
        .expect("the orphan");
    let compacted = hub
        .hub
        .compact_once(0)
        .await
        .expect("the only hub compacts");
    assert_eq!((compacted.directories, compacted.merged), (1, 20));
    assert_eq!(objects_under(files.as_ref(), "exports").await.len(), 20);
    assert_eq!(
        objects_under(files.as_ref(), day_dir).await,
        [
            format!("{day_dir}/00000000000000000000-00000000000000000019.parquet"),
            orphan.to_string()
        ]
    );
    let again = as_a
        .ship("edge-a", ("plant", "uplink", 5), DAY, shipped_batch(50, 1))
        .await
        .expect("acknowledged");
    assert!(!again.stored);
    // Batch 99 sent again lands on its own file, once.
    let resent = as_a
        .ship(
            "edge-a",
            ("plant", "uplink", 99),
            DAY,
            shipped_batch(990, 1),
        )
        .await
        .expect("stored");
    assert!(resent.stored);
    // What a compaction stopped halfway leaves: an original whose record now names the
    // merged file, and a merged file no record names. The next pass deletes both, as
    // their rows are held elsewhere.
    let stale = [
        ObjectPath::from(format!("{day_dir}/00000000000000000002.parquet")),
        ObjectPath::from(format!(
            "{day_dir}/00000000000000000002-00000000000000000007.parquet"
        )),
    ];
    for path in &stale {
        files
            .put(path, copy.clone().into())
            .await
            .expect("a stale file");
    }
    let compacted = hub
        .hub
        .compact_once(0)
        .await
        .expect("the only hub compacts");
    assert_eq!(compacted.merged, 0);
    assert_eq!(
        objects_under(files.as_ref(), day_dir).await,
        [
            format!("{day_dir}/00000000000000000000-00000000000000000019.parquet"),
            orphan.to_string()
        ]
    );
    let mut count = weir_query::QueryRequest::new(
        "SELECT count(*) AS rows, sum(n) AS total FROM plant.uplink WHERE hub_device = 'edge-a'",
    );
    count.format = Some(weir_query::Format::Csv);
    let answer = hub.admin.query(&count).await.expect("the fleet answers");
    // Batches 0 to 19 hold 0..5 and 20, 30, …, 190; then 990.
    let total = (0..5).sum::<i64>() + (2..20).map(|seq| seq * 10).sum::<i64>() + 990;
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        format!("rows,total\n24,{total}\n")
    );

    // A batch in a new shape adds its column to the table at once.
    let wider = {
        use weir_engine::arrow::array::{Float64Array, Int64Array};
        use weir_engine::arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("celsius", DataType::Float64, false),
        ]));
        let batch = weir_engine::arrow::record_batch::RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1000])),
                Arc::new(Float64Array::from(vec![21.5])),
            ],
        )
        .expect("a batch");
        weir_outbox::frame::encode_batch(&batch).expect("encodes")
    };
    as_b.ship("edge-b", ("plant", "uplink", 1), DAY, wider)
        .await
        .expect("stored");
    let mut newest = weir_query::QueryRequest::new(
        "SELECT n, celsius FROM plant.uplink WHERE celsius IS NOT NULL",
    );
    newest.format = Some(weir_query::Format::Csv);
    let answer = hub.admin.query(&newest).await.expect("the fleet answers");
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        "n,celsius\n1000,21.5\n"
    );

    // Only the admin may query, and a bad query says what is wrong.
    assert_eq!(refusal_status(as_a.query(&request).await), 403);
    let error = hub
        .admin
        .query(&weir_query::QueryRequest::new("SELECT nope FROM uplink"))
        .await
        .expect_err("bad SQL");
    assert_eq!(error.status(), Some(400));
    assert!(error.to_string().contains("nope"), "{error}");
    if let Storage::S3(_) = storage {
        assert!(
            !dir.path().join("fleet").exists(),
            "S3 data went to the disk"
        );
    }
    hub.stop().await;
    database.drop_database().await;
}

on_both_databases!(hubs_sharing_a_database_compact_one_at_a_time);

async fn hubs_sharing_a_database_compact_one_at_a_time(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let first = Setup::new(dir.path(), &database.database).start().await.0;
    let second = Setup::new(dir.path(), &database.database).start().await.0;
    let store = first.hub.store();

    // The lease itself: held until it expires, renewed by its holder only; another
    // lease is another job. (lease, holder, now, until, taken)
    let steps = [
        ("job", "a", 1_000, 2_000, true),
        ("job", "b", 1_500, 2_500, false),
        ("job", "a", 1_800, 2_800, true),
        ("job", "b", 2_799, 3_799, false),
        ("job", "b", 2_801, 3_801, true),
        ("job", "a", 2_900, 3_900, false),
        ("other", "a", 2_900, 3_900, true),
    ];
    for (lease, holder, now, until, taken) in steps {
        let took = store
            .try_lease(lease, holder, now, until)
            .await
            .expect("the lease");
        assert_eq!(took, taken, "{holder} at {now} on {lease}");
    }

    // The hubs: one compacts, the other leaves it.
    let ran = [
        first.hub.compact_once(0).await.is_some(),
        second.hub.compact_once(0).await.is_some(),
    ];
    assert_eq!(ran, [true, false]);
    assert!(
        first.hub.compact_once(0).await.is_some(),
        "the holder renews"
    );
    first.stop().await;
    second.stop().await;
    database.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_reads_only_the_tables_it_names() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(Db::Sqlite, dir.path()).await;
    let (hub, _) = Setup::new(dir.path(), &database.database).start().await;
    let created = hub.register("edge-a", &[]).await;
    let device = hub.device("edge-a", &created.keys.primary);
    for sink in ["uplink", "audit"] {
        device
            .ship("edge-a", ("plant", sink, 0), DAY, shipped_batch(0, 2))
            .await
            .expect("stored");
    }
    // The audit table's only file is damaged.
    std::fs::write(
        dir.path()
            .join("fleet/pipeline=plant/sink=audit/date=2026-01-01/device=edge-a")
            .join("00000000000000000000.parquet"),
        b"not parquet",
    )
    .expect("damages the file");

    let mut uplink = weir_query::QueryRequest::new("SELECT count(*) AS rows FROM uplink");
    uplink.format = Some(weir_query::Format::Csv);
    let answer = hub.admin.query(&uplink).await.expect("the fleet answers");
    assert_eq!(String::from_utf8(answer.body).unwrap(), "rows\n2\n");
    let error = hub
        .admin
        .query(&weir_query::QueryRequest::new("SELECT * FROM plant.audit"))
        .await
        .expect_err("a damaged table");
    assert_eq!(error.status(), Some(422), "{error}");
    assert!(
        error
            .to_string()
            .contains("cannot read the files of plant.audit"),
        "{error}"
    );
    // Listing the tables reads none of them.
    let mut tables = weir_query::QueryRequest::new(
        "SELECT table_schema, table_name FROM information_schema.tables \
         WHERE table_schema = 'plant' ORDER BY table_name",
    );
    tables.format = Some(weir_query::Format::Csv);
    let answer = hub.admin.query(&tables).await.expect("the tables");
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        "table_schema,table_name\nplant,audit\nplant,uplink\n"
    );
    // An unknown table is named with the ones there are.
    let error = hub
        .admin
        .query(&weir_query::QueryRequest::new("SELECT * FROM nothing"))
        .await
        .expect_err("no such table");
    assert!(error.to_string().contains("plant.uplink"), "{error}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_queries_keep_to_the_hubs_limits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(Db::Sqlite, dir.path()).await;
    let mut setup = Setup::new(dir.path(), &database.database);
    setup.query_limits.max_rows = 3;
    let (hub, _) = setup.start().await;
    let created = hub.register("edge-a", &[]).await;
    hub.device("edge-a", &created.keys.primary)
        .ship("edge-a", ("plant", "uplink", 0), DAY, shipped_batch(0, 5))
        .await
        .expect("stored");

    let answer = hub
        .admin
        .query(&weir_query::QueryRequest::new(
            "SELECT n FROM uplink ORDER BY n",
        ))
        .await
        .expect("the fleet answers");
    assert!(answer.truncated);
    let json: serde_json::Value = serde_json::from_slice(&answer.body).expect("JSON");
    assert_eq!(json["row_count"], 3, "{json}");
    assert_eq!(json["rows"][2]["n"], 2, "{json}");

    let mut more = weir_query::QueryRequest::new("SELECT n FROM uplink");
    more.max_rows = Some(4);
    let refused = hub.admin.query(&more).await.expect_err("over the limit");
    assert_eq!(refused.status(), Some(400));
    assert!(
        refused
            .to_string()
            .contains("max_rows 4 is over this server's limit of 3 rows"),
        "{refused}"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_whose_bucket_is_missing_does_not_start() {
    let server = S3Server::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = HubConfig::new(dir.path());
    config.admin_token = Some(ADMIN_TOKEN.to_owned());
    config.fleet_data = s3_location(&server, "no-such-bucket", "fleet");
    let Err(error) = Hub::open(config).await else {
        panic!("a hub opened on a missing bucket");
    };
    let message = error.to_string();
    assert!(
        message.starts_with("cannot use the fleet's data store s3://no-such-bucket/fleet: "),
        "{message}"
    );
    assert!(message.contains("NoSuchBucket"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_store_cannot_take_is_refused_with_503_to_be_sent_again() {
    let server = S3Server::start();
    server.create_bucket("fleet");
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(Db::Sqlite, dir.path()).await;
    let mut setup = Setup::new(dir.path(), &database.database);
    setup.fleet_data = Some(s3_location(&server, "fleet", ""));
    let (hub, _) = setup.start().await;
    let created = hub.register("edge-a", &[]).await;
    let device = hub.device("edge-a", &created.keys.primary);
    device
        .ship("edge-a", ("plant", "uplink", 0), DAY, shipped_batch(0, 3))
        .await
        .expect("stored");

    server.cut();
    let refused = device
        .ship("edge-a", ("plant", "uplink", 1), DAY, shipped_batch(3, 3))
        .await
        .expect_err("nowhere to store it");
    assert_eq!(refused.status(), Some(503), "{refused}");
    assert!(
        refused.to_string().contains("send the batch again later"),
        "{refused}"
    );
    // Not recorded as stored: sent again once the store is back, it is stored, not taken
    // for a duplicate.
    server.restore();
    let resent = device
        .ship("edge-a", ("plant", "uplink", 1), DAY, shipped_batch(3, 3))
        .await
        .expect("stored");
    assert_eq!((resent.stored, resent.rows), (true, 3));
    let mut request =
        weir_query::QueryRequest::new("SELECT count(*) AS rows, sum(n) AS total FROM uplink");
    request.format = Some(weir_query::Format::Csv);
    let answer = hub.admin.query(&request).await.expect("the fleet answers");
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        "rows,total\n6,15\n"
    );
    hub.stop().await;
}

#[test]
fn weir_hub_serve_stores_in_the_bucket_its_flag_and_environment_name() {
    let server = S3Server::start();
    server.create_bucket("plant-data");
    let dir = tempfile::tempdir().expect("temp dir");
    let port = weir_testkit::free_port();
    let mut hub = std::process::Command::new(env!("CARGO_BIN_EXE_weir-hub"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--fleet-data", "s3://plant-data/weir"])
        .env("WEIR_HUB_ADMIN_TOKEN", ADMIN_TOKEN)
        .envs(server.environment())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start weir-hub");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let url = format!("http://127.0.0.1:{port}");
    let admin = HubClient::new(&url, Credentials::Admin(ADMIN_TOKEN.to_owned()), None)
        .expect("an admin client");
    let deadline = Instant::now() + weir_testkit::WAIT;
    while runtime.block_on(admin.status()).is_err() {
        assert!(Instant::now() < deadline, "weir-hub did not start");
        assert!(
            hub.try_wait().expect("the hub").is_none(),
            "weir-hub exited"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    runtime.block_on(async {
        let created = admin
            .create_device(&NewDevice {
                id: "edge-a".into(),
                tags: Default::default(),
            })
            .await
            .expect("registered");
        let device = HubClient::new(
            &url,
            Credentials::Device {
                id: "edge-a".into(),
                key: weir_hub::identity::DeviceKey::from_base64(&created.keys.primary)
                    .expect("a key"),
            },
            None,
        )
        .expect("a device client");
        device
            .ship("edge-a", ("plant", "uplink", 7), DAY, shipped_batch(0, 4))
            .await
            .expect("stored");
        let bucket = bucket_seen_from_outside(&server, "plant-data", "weir");
        assert_eq!(
            objects_under(bucket.as_ref(), "").await,
            ["pipeline=plant/sink=uplink/date=2026-01-01/device=edge-a/00000000000000000007.parquet"]
        );
        let mut request = weir_query::QueryRequest::new("SELECT sum(n) AS total FROM uplink");
        request.format = Some(weir_query::Format::Csv);
        let answer = admin.query(&request).await.expect("the fleet answers");
        assert_eq!(String::from_utf8(answer.body).unwrap(), "total\n6\n");
    });
    assert!(
        !dir.path().join("fleet").exists(),
        "S3 data went to the disk"
    );
    let _ = hub.kill();
    let _ = hub.wait();
}
