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

/// `batch` as Arrow IPC with `codec`, with or without the end-of-stream marker.
fn ipc_of(
    batch: &weir_engine::arrow::record_batch::RecordBatch,
    codec: Option<weir_engine::arrow::ipc::CompressionType>,
    finish: bool,
) -> Vec<u8> {
    use weir_engine::arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
    let options = IpcWriteOptions::default()
        .try_with_compression(codec)
        .expect("a codec");
    let mut out = Vec::new();
    let mut writer =
        StreamWriter::try_new_with_options(&mut out, &batch.schema(), options).expect("a writer");
    writer.write(batch).expect("writes");
    if finish {
        writer.finish().expect("finishes");
    }
    drop(writer);
    out
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_past_the_hubs_limits_are_refused_and_the_hub_goes_on() {
    use weir_engine::arrow::array::Int8Array;
    use weir_engine::arrow::datatypes::{DataType, Field, Schema};
    use weir_engine::arrow::ipc::CompressionType;
    use weir_engine::arrow::record_batch::RecordBatch;
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(Db::Sqlite, dir.path()).await;
    let (hub, _) = Setup::new(dir.path(), &database.database).start().await;
    let a = hub.register("edge-a", &[]).await;
    let as_a = hub.device("edge-a", &a.keys.primary);
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int8, false)]));
    let rows = |n: usize| {
        RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int8Array::from(vec![0i8; n]))],
        )
        .expect("a batch")
    };
    let ship = |seq: u64, body: Vec<u8>| as_a.ship("edge-a", ("plant", "uplink", seq), DAY, body);
    // More rows than a batch may hold: 8 MB of zeros that zstd sends in a few KB.
    let many = ipc_of(&rows(8_000_001), Some(CompressionType::ZSTD), true);
    assert!(many.len() < 64 << 10, "{} bytes", many.len());
    assert_eq!(refusal_status(ship(0, many).await), 413);
    // A stream cut off between messages.
    assert_eq!(
        refusal_status(ship(1, ipc_of(&rows(10), Some(CompressionType::ZSTD), false)).await),
        400
    );
    // Neither was recorded: the same sequence numbers, sent well, are stored.
    for seq in 0..2 {
        let stored = ship(seq, ipc_of(&rows(10), Some(CompressionType::ZSTD), true))
            .await
            .expect("stored");
        assert_eq!((stored.stored, stored.rows), (true, 10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_accept_streams_deployed_a_device_ships_only_its_deployments_hub_sinks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(Db::Sqlite, dir.path()).await;
    let mut setup = Setup::new(dir.path(), &database.database);
    setup.accept_streams = vec!["deployed".parse().expect("a rule")];
    let (hub, _) = setup.start().await;
    let yaml = "version: 1\nname: plant\nsources:\n  readings:\n    kind: generator\n\
                sinks:\n  uplink:\n    kind: hub\n    inputs: [readings]\n";
    hub.admin
        .put_deployment(
            "ship",
            &support::deployment("site = 'a'", 0, &[("plant", yaml)]),
        )
        .await
        .expect("deployed");
    let a = hub.register("edge-a", &[("site", "a")]).await;
    let b = hub.register("edge-b", &[("site", "b")]).await;
    let as_a = hub.device("edge-a", &a.keys.primary);
    let as_b = hub.device("edge-b", &b.keys.primary);
    as_a.ship("edge-a", ("plant", "uplink", 0), DAY, shipped_batch(0, 1))
        .await
        .expect("its deployment's hub sink");
    assert_eq!(
        refusal_status(
            as_a.ship("edge-a", ("plant", "junk", 0), DAY, shipped_batch(0, 1))
                .await
        ),
        422
    );
    // Not its deployment: refused, though another device ships there.
    assert_eq!(
        refusal_status(
            as_b.ship("edge-b", ("plant", "uplink", 0), DAY, shipped_batch(0, 1))
                .await
        ),
        422
    );
    hub.stop().await;
    database.drop_database().await;
}

on_both_databases!(a_device_cannot_break_or_spoof_a_shared_table);

async fn a_device_cannot_break_or_spoof_a_shared_table(db: Db) {
    use weir_engine::arrow::array::{ArrayRef, Int64Array, StringArray};
    use weir_engine::arrow::datatypes::{Field, Schema};
    use weir_engine::arrow::record_batch::RecordBatch;
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let (hub, _) = Setup::new(dir.path(), &database.database).start().await;
    let a = hub.register("edge-a", &[]).await;
    let b = hub.register("edge-b", &[]).await;
    let as_a = hub.device("edge-a", &a.keys.primary);
    let as_b = hub.device("edge-b", &b.keys.primary);
    let batch = |columns: Vec<(&str, ArrayRef)>| {
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|(name, array)| Field::new(*name, array.data_type().clone(), false))
                .collect::<Vec<_>>(),
        ));
        let arrays = columns.into_iter().map(|(_, array)| array).collect();
        let batch = RecordBatch::try_new(schema, arrays).expect("a batch");
        weir_outbox::frame::encode_batch(&batch).expect("encodes")
    };
    let numbers = |n: i64| -> ArrayRef { Arc::new(Int64Array::from(vec![n])) };
    let text = |t: &str| -> ArrayRef { Arc::new(StringArray::from(vec![t])) };
    as_a.ship(
        "edge-a",
        ("plant", "uplink", 0),
        DAY,
        batch(vec![("n", numbers(1))]),
    )
    .await
    .expect("stored");
    // Another type for a column the table has: refused, and the table still reads.
    assert_eq!(
        refusal_status(
            as_b.ship(
                "edge-b",
                ("plant", "uplink", 0),
                DAY,
                batch(vec![("n", text("x"))])
            )
            .await
        ),
        422
    );
    // A column of the hub's own, to pass rows off as another device's.
    assert_eq!(
        refusal_status(
            as_b.ship(
                "edge-b",
                ("plant", "uplink", 0),
                DAY,
                batch(vec![("n", numbers(2)), ("hub_device", text("edge-a"))])
            )
            .await
        ),
        422
    );
    // A pipeline named like the namespace of unqualified names.
    assert_eq!(
        refusal_status(
            as_b.ship(
                "edge-b",
                ("public", "uplink", 0),
                DAY,
                batch(vec![("n", numbers(3))])
            )
            .await
        ),
        422
    );
    // A new column is taken, and the table has both.
    as_b.ship(
        "edge-b",
        ("plant", "uplink", 0),
        DAY,
        batch(vec![("n", numbers(4)), ("site", text("north"))]),
    )
    .await
    .expect("stored");
    let mut request =
        weir_query::QueryRequest::new("SELECT hub_device, n, site FROM uplink ORDER BY hub_device");
    request.format = Some(weir_query::Format::Csv);
    let answer = hub.admin.query(&request).await.expect("the fleet answers");
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        "hub_device,n,site\nedge-a,1,\nedge-b,4,north\n"
    );
}

async fn shipped_batches_are_stored_once_per_device_and_queryable(db: Db, storage: Storage) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let mut setup = Setup::new(dir.path(), &database.database);
    if let Storage::S3(server) = &storage {
        setup.fleet_data = Some(s3_location(server, "fleet", "plant-hub"));
    }
    // Short, so that a merged file no record names is soon old enough to delete.
    setup.compaction_lease = Duration::from_secs(2);
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
    // merged file, and a merged file no record names. A pass deletes both, as their
    // rows are held elsewhere, once the merged one is older than twice the lease (until
    // then it may be another hub's, about to be pointed at).
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
    tokio::time::sleep(Duration::from_millis(4500)).await;
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

on_both_databases!(a_hub_that_lost_its_lease_midway_cannot_repoint_or_delete);

/// Two hubs race on one directory under a short lease: the one whose lease expired
/// while it compacted changes nothing, and a merged file in the making is not taken
/// for a stale one.
async fn a_hub_that_lost_its_lease_midway_cannot_repoint_or_delete(db: Db) {
    let dir = tempfile::tempdir().expect("temp dir");
    let database = TestDatabase::new(db, dir.path()).await;
    let first = Setup::new(dir.path(), &database.database).start().await.0;
    let second = Setup::new(dir.path(), &database.database).start().await.0;
    let created = first.register("edge-a", &[]).await;
    let device = first.device("edge-a", &created.keys.primary);
    for seq in 0..20 {
        device
            .ship(
                "edge-a",
                ("plant", "uplink", seq),
                DAY,
                shipped_batch(seq as i64, 1),
            )
            .await
            .expect("stored");
    }
    let store = first.hub.store();
    let day_dir = "pipeline=plant/sink=uplink/date=2026-01-01/device=edge-a";
    let files = LocalFileSystem::new_with_prefix(dir.path().join("fleet")).expect("the directory");
    // The first hub's lease runs out (a long pause); the second takes it.
    let lost = store
        .take_lease("race", "first", 200)
        .await
        .expect("the lease")
        .expect("free");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let held = store
        .take_lease("race", "second", 60_000)
        .await
        .expect("the lease")
        .expect("expired, so free");
    // A merged file the second hub is about to point records at.
    let in_the_making = ObjectPath::from(format!(
        "{day_dir}/00000000000000000100-00000000000000000101.parquet"
    ));
    files
        .put(&in_the_making, b"rows in the making".to_vec().into())
        .await
        .expect("a merged file");
    // The first hub resumes: it writes its merged file, but cannot point the records at
    // it, so deletes none of the inputs. (Its file, named by no record, is deleted once
    // old, or replaced by the holder's merge of the same batches.)
    let error = first
        .hub
        .data()
        .compact_directory(store, day_dir, &lost)
        .await
        .expect_err("the lease is lost");
    assert!(error.to_string().contains("no longer held"), "{error}");
    assert_eq!(objects_under(&files, day_dir).await.len(), 22);
    // The second hub compacts, and leaves the young merged file alone.
    let merged = second
        .hub
        .data()
        .compact_directory(second.hub.store(), day_dir, &held)
        .await
        .expect("compacts");
    assert_eq!(merged, 20);
    assert_eq!(
        objects_under(&files, day_dir).await,
        [
            format!("{day_dir}/00000000000000000000-00000000000000000019.parquet"),
            in_the_making.to_string()
        ]
    );
    files.delete(&in_the_making).await.expect("deleted");
    let mut count =
        weir_query::QueryRequest::new("SELECT count(*) AS rows, sum(n) AS total FROM uplink");
    count.format = Some(weir_query::Format::Csv);
    let answer = first.admin.query(&count).await.expect("the fleet answers");
    assert_eq!(
        String::from_utf8(answer.body).unwrap(),
        "rows,total\n20,190\n"
    );
    first.stop().await;
    second.stop().await;
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
