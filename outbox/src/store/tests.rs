//! The outbox on real files: durability across reopening, order, acknowledgement, the
//! byte and age limits with priorities, and recovery from a damaged file.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array};
use arrow::datatypes::{DataType, Field, Schema};
use rand::{Rng, SeedableRng};

use super::*;
use crate::frame::decode_batches;

const T0: i64 = 1_800_000_000_000;

/// A batch whose `n` column runs from `from`, with incompressible values so sizes are
/// realistic.
fn batch(from: i64, rows: i64) -> RecordBatch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(from as u64);
    let schema = Arc::new(Schema::new(vec![
        Field::new("n", DataType::Int64, false),
        Field::new("value", DataType::Float64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(from..from + rows)),
            Arc::new(Float64Array::from_iter_values(
                (0..rows).map(|_| rng.random::<f64>()),
            )),
        ],
    )
    .unwrap()
}

fn numbers(stored: &[Stored]) -> Vec<i64> {
    stored
        .iter()
        .flat_map(|s| {
            let (_, batches) = decode_batches(&s.payload).unwrap();
            batches
                .into_iter()
                .flat_map(|b| {
                    b.column(0)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .unwrap()
                        .values()
                        .to_vec()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn open(path: &Path, limits: Limits) -> Outbox {
    let (outbox, recovery) = Outbox::open(path, limits).unwrap();
    assert_eq!(recovery, None);
    outbox
}

fn unlimited() -> Limits {
    Limits {
        max_bytes: u64::MAX,
        max_age: None,
    }
}

#[test]
fn batches_survive_reopening_in_order_until_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    let base = {
        let outbox = open(&path, unlimited());
        let seqs = outbox
            .append("p/hub", &[batch(0, 10), batch(10, 10)], T0)
            .unwrap();
        // A new file numbers from the time it was made, never from 0 again.
        assert!(seqs[0] > 1_700_000_000_000_000, "{seqs:?}");
        assert_eq!(seqs[1], seqs[0] + 1);
        assert_eq!(
            outbox.append("p/hub", &[batch(20, 5)], T0 + 1).unwrap(),
            [seqs[0] + 2]
        );
        seqs[0]
    };
    let outbox = open(&path, unlimited());
    let stats = outbox.stats();
    assert_eq!(
        (stats.batches, stats.rows, stats.oldest_ms),
        (3, 25, Some(T0))
    );
    let next = outbox.next(2).unwrap();
    assert_eq!(
        next.iter().map(|s| s.seq).collect::<Vec<_>>(),
        [base, base + 1]
    );
    assert_eq!(numbers(&next), (0..20).collect::<Vec<_>>());
    outbox.ack("p/hub", &[base, base + 1]).unwrap();
    drop(outbox);

    let outbox = open(&path, unlimited());
    let next = outbox.next(10).unwrap();
    assert_eq!(next.iter().map(|s| s.seq).collect::<Vec<_>>(), [base + 2]);
    // Numbers are never reused, even once everything before was acknowledged.
    outbox.ack("p/hub", &[base + 2]).unwrap();
    assert_eq!(
        outbox.append("p/hub", &[batch(25, 1)], T0 + 2).unwrap(),
        [base + 3]
    );
    assert_eq!(outbox.stats().acked_rows, 5);
}

#[test]
fn past_max_bytes_the_oldest_batches_go_first_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    let probe = open(&dir.path().join("probe.redb"), unlimited());
    probe.append("p/hub", &[batch(0, 100)], T0).unwrap();
    let one = probe.stats().bytes;
    let outbox = open(
        &path,
        Limits {
            max_bytes: one * 3 + one / 2,
            max_age: None,
        },
    );
    for i in 0..10 {
        outbox
            .append("p/hub", &[batch(i * 100, 100)], T0 + i)
            .unwrap();
        assert!(outbox.stats().bytes <= one * 3 + one / 2);
    }
    let stats = outbox.stats();
    assert_eq!((stats.batches, stats.rows), (3, 300));
    assert_eq!(stats.dropped_rows_bytes, 700);
    assert_eq!(stats.appended_rows, 1000);
    // Exactly the oldest went: what is left is the newest 3, in order.
    assert_eq!(
        numbers(&outbox.next(10).unwrap()),
        (700..1000).collect::<Vec<_>>()
    );
}

#[test]
fn the_lowest_priority_stream_is_dropped_first_and_the_highest_ships_first() {
    let dir = tempfile::tempdir().unwrap();
    let probe = open(&dir.path().join("probe.redb"), unlimited());
    probe.append("p/x", &[batch(0, 100)], T0).unwrap();
    let one = probe.stats().bytes;
    let outbox = open(
        &dir.path().join("outbox.redb"),
        Limits {
            max_bytes: one * 4 + one / 2,
            max_age: None,
        },
    );
    outbox.register("p/alerts", 10).unwrap();
    outbox.register("p/bulk", 0).unwrap();
    outbox.append("p/alerts", &[batch(0, 100)], T0).unwrap();
    for i in 0..4 {
        outbox
            .append("p/bulk", &[batch(1000 + i * 100, 100)], T0 + 1 + i)
            .unwrap();
    }
    // Full: the next alert pushes out bulk's oldest, not the older alert.
    outbox
        .append("p/alerts", &[batch(100, 100)], T0 + 9)
        .unwrap();
    let stats = outbox.stats();
    let rows: Vec<(String, u64)> = stats
        .streams
        .iter()
        .map(|s| (s.stream.clone(), s.rows))
        .collect();
    assert_eq!(
        rows,
        [("p/alerts".to_owned(), 200), ("p/bulk".to_owned(), 200)]
    );
    assert_eq!(stats.dropped_rows_bytes, 200);
    // The alerts ship first although bulk's batches are older.
    let next = outbox.next(10).unwrap();
    assert_eq!(next[0].stream, "p/alerts");
    assert_eq!(numbers(&next), (0..200).collect::<Vec<_>>());
}

#[test]
fn batches_older_than_max_age_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(
        &dir.path().join("outbox.redb"),
        Limits {
            max_bytes: u64::MAX,
            max_age: Some(Duration::from_secs(60)),
        },
    );
    outbox.append("p/hub", &[batch(0, 10)], T0).unwrap();
    outbox
        .append("p/hub", &[batch(10, 10)], T0 + 30_000)
        .unwrap();
    assert_eq!(outbox.expire(T0 + 59_000).unwrap(), 0);
    assert_eq!(outbox.expire(T0 + 61_000).unwrap(), 10);
    let stats = outbox.stats();
    assert_eq!((stats.rows, stats.dropped_rows_age), (10, 10));
    assert_eq!(
        numbers(&outbox.next(10).unwrap()),
        (10..20).collect::<Vec<_>>()
    );
}

#[test]
fn a_device_that_boots_at_1970_and_then_learns_the_time_drops_nothing_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(
        &dir.path().join("outbox.redb"),
        Limits {
            max_bytes: u64::MAX,
            max_age: Some(Duration::from_secs(60)),
        },
    );
    // Stored before NTP: the clock reads minutes after the epoch.
    let boot = 120_000;
    outbox.append("p/hub", &[batch(0, 10)], boot).unwrap();
    assert_eq!(
        outbox.expire(boot + 3_600_000).unwrap(),
        0,
        "no age while unset"
    );
    // Then the clock is set, and batches are stored with real times.
    outbox.append("p/hub", &[batch(10, 10)], T0).unwrap();
    assert_eq!(outbox.expire(T0 + 30_000).unwrap(), 0);
    // Days later: the real-time batch is old, but it comes after one that cannot be
    // dated, so both wait; nothing is taken for 56 years old.
    assert_eq!(outbox.expire(T0 + 86_400_000).unwrap(), 0);
    assert_eq!(outbox.stats().rows, 20);
    // Once the undated one has shipped, age applies again.
    let first = outbox.next(1).unwrap();
    outbox.ack("p/hub", &[first[0].seq]).unwrap();
    assert_eq!(outbox.expire(T0 + 86_400_000).unwrap(), 10);
}

#[test]
fn a_file_created_before_the_clock_is_set_numbers_apart_from_every_other() {
    let set = T0 as u64 * 1000;
    assert_eq!(seq_floor(set), set);
    let unset: Vec<u64> = (0..4).map(|_| seq_floor(120_000_000)).collect();
    for floor in &unset {
        assert!((1u64 << 61..1u64 << 62).contains(floor), "{floor}");
    }
    assert!(unset.windows(2).any(|w| w[0] != w[1]), "random: {unset:?}");
}

#[test]
fn an_outbox_cut_at_any_byte_still_opens_and_keeps_what_is_intact() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original.redb");
    {
        let outbox = open(&original, unlimited());
        for i in 0..40 {
            outbox
                .append("p/hub", &[batch(i * 50, 50)], T0 + i)
                .unwrap();
        }
        let first = outbox.stats().streams[0].next_seq - 40;
        outbox.ack("p/hub", &[first, first + 1, first + 2]).unwrap();
    }
    let first_seq_written = open(&original, unlimited()).stats().streams[0].next_seq - 40;
    let bytes = std::fs::read(&original).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut cuts: Vec<usize> = (0..12).map(|_| rng.random_range(1..bytes.len())).collect();
    cuts.extend([bytes.len() / 2, bytes.len() - 1, 4096 * 3]);
    let mut recovered = 0;
    for cut in cuts {
        let path = dir.path().join(format!("cut-{cut}.redb"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let (outbox, recovery) =
            Outbox::open(&path, unlimited()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let stored = outbox.next(usize::MAX).unwrap();
        let kept = numbers(&stored);
        // Whatever was kept is exactly what was written, each row once.
        let mut sorted = kept.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), kept.len(), "cut at {cut}: a row twice");
        assert!(kept.iter().all(|n| (0..2000).contains(n)), "cut at {cut}");
        if cut >= bytes.len() / 2 {
            // Every batch lies before the cut: every batch not acknowledged is kept.
            assert!(
                (150..2000).all(|n| sorted.binary_search(&n).is_ok()),
                "cut at {cut}"
            );
        }
        if let Some(recovery) = recovery {
            recovered += 1;
            assert!(recovery.moved_to.exists());
            assert_eq!(recovery.salvaged_rows, outbox.stats().rows, "cut at {cut}");
            // Writing goes on with numbers past anything used before.
            let seq = outbox.append("p/hub", &[batch(9000, 1)], T0).unwrap()[0];
            assert!(
                seq > first_seq_written + 39,
                "cut at {cut}: seq {seq} may be reused"
            );
        }
    }
    assert!(recovered >= 12, "{recovered}");
}

#[test]
fn check_reports_a_sound_outbox_and_what_a_damaged_one_would_keep() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    {
        let outbox = open(&path, unlimited());
        for i in 0..5 {
            outbox
                .append("p/hub", &[batch(i * 10, 10)], T0 + i)
                .unwrap();
        }
    }
    match Outbox::check(&path).unwrap() {
        Check::Sound(stats, dead) => {
            assert_eq!((stats.batches, stats.rows), (5, 50));
            assert!(dead.is_empty());
        }
        other => panic!("{other:?}"),
    }
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let before = std::fs::read(&path).unwrap();
    match Outbox::check(&path).unwrap() {
        Check::Damaged {
            batches,
            rows,
            reason,
            ..
        } => {
            assert_eq!((batches, rows), (5, 50));
            assert!(reason.contains("cut short"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "check changes nothing"
    );
}

#[test]
fn an_outbox_in_use_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    let first = open(&path, unlimited());
    first.append("p/hub", &[batch(0, 3)], T0).unwrap();
    // A second runtime on the same state directory: not a damaged file.
    let Err(error) = Outbox::open(&path, unlimited()) else {
        panic!("a second open succeeded");
    };
    assert!(error.to_string().contains("another process"), "{error}");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["outbox.redb"], "nothing was moved or salvaged");
    assert_eq!(first.stats().rows, 3);
    drop(first);
    let (again, recovery) = Outbox::open(&path, unlimited()).unwrap();
    assert!(recovery.is_none());
    assert_eq!(again.stats().rows, 3);
}

#[test]
fn garbage_where_the_outbox_should_be_is_moved_aside_and_a_new_one_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    std::fs::write(&path, b"this is not a database at all").unwrap();
    let (outbox, recovery) = Outbox::open(&path, unlimited()).unwrap();
    let recovery = recovery.expect("recovered");
    assert_eq!((recovery.salvaged_batches, recovery.broken_batches), (0, 0));
    assert_eq!(
        std::fs::read(&recovery.moved_to).unwrap(),
        b"this is not a database at all"
    );
    outbox.append("p/hub", &[batch(0, 1)], T0).unwrap();
    assert_eq!(outbox.stats().rows, 1);
    // The salvage was written beside it and moved in: nothing else is left.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[1].starts_with("outbox.redb.damaged-"), "{names:?}");
}

#[test]
fn numbered_batches_keep_their_numbers_and_one_still_waiting_is_not_stored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open(&dir.path().join("outbox.redb"), unlimited());
    let window = 1_767_225_600_000u64;
    let seqs = outbox
        .append_numbered(
            "p/hub",
            &[(window, batch(0, 5)), (window + 60_000, batch(5, 5))],
            T0,
        )
        .unwrap();
    assert_eq!(seqs, [window, window + 60_000]);
    // The same window again (a restart produced it anew) while it still waits: skipped.
    let again = outbox
        .append_numbered(
            "p/hub",
            &[(window, batch(0, 5)), (window + 120_000, batch(10, 5))],
            T0,
        )
        .unwrap();
    assert_eq!(again, [window + 120_000]);
    let stored = outbox.next(10).unwrap();
    assert_eq!(numbers(&stored), (0..15).collect::<Vec<_>>());
    assert_eq!(outbox.stats().rows, 15);
}

#[test]
fn held_batches_ship_once_their_epoch_completes_and_a_restart_settles_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    let stream = "p/hub";
    {
        let outbox = open(&path, unlimited());
        outbox
            .append_held(stream, &[(None, batch(0, 10)), (None, batch(10, 10))], T0)
            .unwrap();
        assert!(outbox.next(10).unwrap().is_empty(), "held: not shipped");
        assert_eq!(outbox.stats().batches, 0);
        outbox.seal_held(stream, 1).unwrap();
        outbox
            .append_held(stream, &[(None, batch(20, 5))], T0)
            .unwrap();
        // Epoch 1 is not complete yet: nothing ships.
        assert_eq!(outbox.release_held(stream, 0).unwrap(), (0, 0));
        assert_eq!(outbox.release_held(stream, 1).unwrap(), (2, 20));
        assert_eq!(
            numbers(&outbox.next(10).unwrap()),
            (0..20).collect::<Vec<_>>()
        );
        outbox.seal_held(stream, 2).unwrap();
        outbox
            .append_held(stream, &[(None, batch(25, 5))], T0)
            .unwrap();
        // Killed here: epoch 2 was sealed, and may or may not have completed; the last
        // batch's barrier never came.
    }
    // (completed epoch at restart, batches released, batches discarded, rows shipped then)
    for (completed, released, discarded, shipped) in [(1, 0, 2, 20..20), (2, 1, 1, 20..25)] {
        let copy = dir.path().join(format!("copy-{completed}.redb"));
        std::fs::copy(&path, &copy).unwrap();
        let outbox = open(&copy, unlimited());
        let settled = outbox.settle_held(stream, completed).unwrap();
        assert_eq!(
            (settled.released_batches, settled.discarded_batches),
            (released, discarded),
            "completed {completed}"
        );
        let mut expected: Vec<i64> = (0..20).collect();
        expected.extend(shipped.clone());
        assert_eq!(
            numbers(&outbox.next(10).unwrap()),
            expected,
            "completed {completed}"
        );
        drop(outbox);
        // The settling was durable, and the discarded batches' bytes are gone.
        let outbox = open(&copy, unlimited());
        assert_eq!(
            outbox.settle_held(stream, u64::MAX).unwrap(),
            Settled::default()
        );
        assert_eq!(numbers(&outbox.next(10).unwrap()), expected);
        let stored: u64 = outbox.stats().streams.iter().map(|s| s.bytes).sum();
        assert_eq!(outbox.stats().bytes, stored);
    }
}

#[test]
fn a_held_number_is_not_stored_twice_and_held_batches_meet_the_byte_limit_once_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    let outbox = open(&path, unlimited());
    let seqs = outbox
        .append_held("p/hub", &[(Some(1_000), batch(0, 3))], T0)
        .unwrap();
    assert_eq!(seqs, [1_000]);
    let again = outbox
        .append_held("p/hub", &[(Some(1_000), batch(0, 3))], T0)
        .unwrap();
    assert!(again.is_empty(), "a number still held is not stored again");
    drop(outbox);
    let tight = Limits {
        max_bytes: 1,
        max_age: None,
    };
    let outbox = open(&path, tight);
    outbox
        .append_held("p/hub", &[(None, batch(3, 3))], T0)
        .unwrap();
    outbox.seal_held("p/hub", 4).unwrap();
    // Held, they are kept past the limit: they are at most one checkpoint's worth.
    assert_eq!(outbox.stats().dropped_rows_bytes, 0);
    assert!(outbox.stats().bytes > 1);
    // Released, they count against it like any other batch.
    assert_eq!(outbox.release_held("p/hub", 4).unwrap(), (2, 6));
    assert_eq!(outbox.stats().dropped_rows_bytes, 6);
    assert!(outbox.next(10).unwrap().is_empty());
    assert_eq!(outbox.stats().bytes, 0);
}

#[test]
fn a_batch_refused_for_good_is_set_aside_and_the_rest_ship() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    {
        let outbox = open(&path, unlimited());
        for i in 0..3 {
            outbox
                .append("p/hub", &[batch(i * 10, 10)], T0 + i)
                .unwrap();
        }
        let first = outbox.next(10).unwrap();
        assert_eq!(first.len(), 3);
        outbox
            .dead_letter(
                "p/hub",
                first[1].seq,
                "refused by the hub: 422 bad column",
                T0 + 5,
            )
            .unwrap();
        let rest = outbox.next(10).unwrap();
        assert_eq!(numbers(&rest), (0..10).chain(20..30).collect::<Vec<_>>());
        let stats = outbox.stats();
        assert_eq!(
            (stats.rows, stats.dead_lettered_rows, stats.dead_letters),
            (20, 10, 1)
        );
        // A frame that does not read is set aside too, instead of stopping its stream.
        {
            let txn = outbox.db.begin_write().unwrap();
            txn.open_table(BATCHES)
                .unwrap()
                .insert(("p/hub", first[2].seq), &b"garbage"[..])
                .unwrap();
            txn.commit().unwrap();
        }
        let rest = outbox.next(10).unwrap();
        assert_eq!(numbers(&rest), (0..10).collect::<Vec<_>>());
        assert_eq!(outbox.stats().dead_letters, 2);
    }
    // Kept across a restart, listed by `weir outbox check`, never shipped.
    match Outbox::check(&path).unwrap() {
        Check::Sound(stats, dead) => {
            assert_eq!((stats.batches, stats.dead_letters), (1, 2));
            assert_eq!(dead.len(), 2);
            let refused = dead
                .iter()
                .find(|d| d.reason.contains("422"))
                .expect("listed");
            assert_eq!((refused.rows, refused.at_ms), (10, T0 + 5));
            assert!(
                dead.iter().any(|d| d.reason.contains("does not read")),
                "{dead:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}
