//! The outbox over redb: appending in fsynced commit groups, reading for shipping,
//! acknowledging, the limits, and recovering a damaged file.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::OutboxError;
use crate::frame::{Frame, encode_batch, salvage_file};

/// (stream, seq) → the batch's frame.
const BATCHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("batches");
/// (stream, seq) → (frame bytes, rows, appended_ms): read at start instead of the batches.
const INDEX: TableDefinition<(&str, u64), (u64, u64, i64)> = TableDefinition::new("index");
/// stream → (next seq, priority).
const STREAMS: TableDefinition<&str, (u64, i32)> = TableDefinition::new("streams");
/// (stream, seq) → the checkpoint epoch of a batch held back until that epoch completes
/// ([`OPEN_EPOCH`] until its barrier has passed). Held batches are stored like the
/// others, and shipped only once released.
const HELD: TableDefinition<(&str, u64), u64> = TableDefinition::new("held");
/// The epoch of a held batch whose barrier has not passed yet.
const OPEN_EPOCH: u64 = u64::MAX;
/// (stream, seq) → (frame bytes as stored, why, when in ms): batches the receiver
/// refused for good, or whose frame does not read. Kept for an operator
/// (`weir outbox check` lists them), at most [`MAX_DEAD_LETTERS`], and never shipped.
const DEAD: TableDefinition<(&str, u64), (&[u8], &str, i64)> = TableDefinition::new("dead");
/// Dead letters kept; past this the oldest go, counted.
pub const MAX_DEAD_LETTERS: usize = 1000;
/// Settings of the file itself: `seq_floor`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The first sequence number of a stream the file has not seen: the time the file was
/// created (or recovered), in µs. So a new or recovered file never reuses a number an
/// earlier one gave a batch the hub may have stored already (it would take the new batch
/// for a copy of the old and keep only the old).
const SEQ_FLOOR: &str = "seq_floor";

/// How much the outbox may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes of stored batches (compressed, as stored); past it the oldest
    /// batch of the lowest-priority stream goes first. The file itself can be larger:
    /// the database keeps free pages for reuse.
    pub max_bytes: u64,
    /// Batches older than this are dropped; `None` keeps them until shipped.
    pub max_age: Option<Duration>,
}

impl Limits {
    /// The byte limit when none is configured: 512 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 512 * 1024 * 1024;
    /// The age limit when none is configured: 7 days.
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: Limits::DEFAULT_MAX_BYTES,
            max_age: Some(Limits::DEFAULT_MAX_AGE),
        }
    }
}

/// What opening a damaged outbox did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Why the file could not be used as it was.
    pub reason: String,
    /// Where the damaged file was moved.
    pub moved_to: PathBuf,
    /// Intact batches carried into the new file.
    pub salvaged_batches: u64,
    /// Their rows.
    pub salvaged_rows: u64,
    /// Batches found but cut off or damaged: lost.
    pub broken_batches: u64,
}

/// A stored batch, read for shipping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// `pipeline/sink`.
    pub stream: String,
    /// Its place in its stream.
    pub seq: u64,
    /// Rows in it.
    pub rows: u64,
    /// When it was stored, ms since the Unix epoch.
    pub appended_ms: i64,
    /// The batch as zstd-compressed Arrow IPC ([`crate::frame::decode_batches`]).
    pub payload: Vec<u8>,
}

/// One stream's share of the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStats {
    /// `pipeline/sink`.
    pub stream: String,
    /// Higher ships first and is dropped last.
    pub priority: i32,
    /// Batches waiting.
    pub batches: u64,
    /// Their rows.
    pub rows: u64,
    /// Their bytes.
    pub bytes: u64,
    /// When the oldest was stored.
    pub oldest_ms: Option<i64>,
    /// The sequence number the next batch gets.
    pub next_seq: u64,
}

/// The outbox at a glance, for metrics and reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Batches waiting.
    pub batches: u64,
    /// Their rows.
    pub rows: u64,
    /// Their bytes.
    pub bytes: u64,
    /// When the oldest was stored.
    pub oldest_ms: Option<i64>,
    /// Rows stored since the outbox was opened.
    pub appended_rows: u64,
    /// Rows acknowledged since the outbox was opened.
    pub acked_rows: u64,
    /// Rows dropped to stay within `max_bytes`.
    pub dropped_rows_bytes: u64,
    /// Rows dropped for being older than `max_age`.
    pub dropped_rows_age: u64,
    /// Rows set aside as dead letters since the outbox was opened.
    pub dead_lettered_rows: u64,
    /// Dead letters kept now.
    pub dead_letters: u64,
    /// Each stream.
    pub streams: Vec<StreamStats>,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    seq: u64,
    bytes: u64,
    rows: u64,
    appended_ms: i64,
}

#[derive(Debug, Default)]
struct StreamState {
    priority: i32,
    next_seq: u64,
    /// What ships, oldest first.
    entries: VecDeque<Entry>,
    /// Held back until their epoch completes: (epoch, entry), in the order written.
    held: Vec<(u64, Entry)>,
}

/// What [`Outbox::settle_held`] did with a stream's held batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Batches of completed epochs, now shipped.
    pub released_batches: u64,
    /// Their rows.
    pub released_rows: u64,
    /// Batches of epochs that never completed: deleted, as the pipeline writes them again.
    pub discarded_batches: u64,
}

#[derive(Debug, Default)]
struct State {
    streams: BTreeMap<String, StreamState>,
    seq_floor: u64,
    bytes: u64,
    appended_rows: u64,
    acked_rows: u64,
    dropped_rows_bytes: u64,
    dropped_rows_age: u64,
    dead_lettered_rows: u64,
    dead_letters: u64,
}

/// Why an entry goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drop {
    Bytes,
    Age,
    Acked,
    DeadLettered,
}

/// A batch set aside for good: the receiver refused it, or its frame does not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// `pipeline/sink`.
    pub stream: String,
    /// Its place in its stream.
    pub seq: u64,
    /// Its rows, as far as its frame says (0 for a frame that does not read).
    pub rows: u64,
    /// Why it was set aside.
    pub reason: String,
    /// When, ms since the Unix epoch.
    pub at_ms: i64,
}

/// The durable outbox; see the crate's documentation. Its calls block on disk (every
/// append is fsynced): call them from a blocking thread in async code.
pub struct Outbox {
    db: Database,
    path: PathBuf,
    limits: Limits,
    state: Mutex<State>,
}

fn storage(path: &Path, error: impl std::fmt::Display) -> OutboxError {
    OutboxError::Storage {
        path: path.to_owned(),
        message: error.to_string(),
    }
}

impl Outbox {
    /// Opens the outbox at `path`, creating it (and its directory) when missing.
    ///
    /// A file the database cannot read is moved aside to `PATH.damaged-MS` and its intact
    /// batches are salvaged into a new file at `path`; the returned [`Recovery`] says how
    /// many were kept and how many were lost.
    pub fn open(path: &Path, limits: Limits) -> Result<(Outbox, Option<Recovery>), OutboxError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| storage(path, e))?;
        }
        match load(path) {
            Ok((db, state)) => Ok((Outbox::with(db, path, limits, state), None)),
            Err(LoadFailure::Damaged(reason)) if path.exists() => {
                let recovery = recover(path, &reason)?;
                let (db, state) = load(path).map_err(|e| storage(path, e.reason()))?;
                Ok((Outbox::with(db, path, limits, state), Some(recovery)))
            }
            Err(failure) => Err(storage(path, failure.reason())),
        }
    }

    fn with(db: Database, path: &Path, limits: Limits, state: State) -> Outbox {
        Outbox {
            db,
            path: path.to_owned(),
            limits,
            state: Mutex::new(state),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Declares `stream` with its `priority` (higher ships first and is dropped last).
    pub fn register(&self, stream: &str, priority: i32) -> Result<(), OutboxError> {
        let mut state = self.state();
        let txn = self.db.begin_write().map_err(|e| storage(&self.path, e))?;
        let next_seq = state
            .streams
            .get(stream)
            .map_or(state.seq_floor, |s| s.next_seq);
        {
            let mut streams = txn
                .open_table(STREAMS)
                .map_err(|e| storage(&self.path, e))?;
            streams
                .insert(stream, (next_seq, priority))
                .map_err(|e| storage(&self.path, e))?;
        }
        txn.commit().map_err(|e| storage(&self.path, e))?;
        let entry = state.streams.entry(stream.to_owned()).or_default();
        entry.priority = priority;
        entry.next_seq = next_seq;
        Ok(())
    }

    /// Stores `batches` of `stream` as one commit group, fsynced before it returns: once
    /// it has, they are accepted. Returns their sequence numbers. Past `max_bytes`, the
    /// oldest batches of the lowest-priority streams are dropped in the same commit.
    pub fn append(
        &self,
        stream: &str,
        batches: &[RecordBatch],
        now_ms: i64,
    ) -> Result<Vec<u64>, OutboxError> {
        let encoded = encode_all(batches.iter().map(|batch| (None, batch)))?;
        self.store(stream, encoded, now_ms, false)
    }

    /// Like [`Outbox::append`], with each batch's sequence number given: the number of
    /// what it holds (its window, say), so a batch produced again after a restart gets
    /// the number it had and the receiver stores it once. A number still waiting here is
    /// not stored again.
    pub fn append_numbered(
        &self,
        stream: &str,
        batches: &[(u64, RecordBatch)],
        now_ms: i64,
    ) -> Result<Vec<u64>, OutboxError> {
        let encoded = encode_all(batches.iter().map(|(seq, batch)| (Some(*seq), batch)))?;
        self.store(stream, encoded, now_ms, false)
    }

    /// Like [`Outbox::append`] (or [`Outbox::append_numbered`] for batches with a
    /// number), but the batches are held: stored and fsynced, not shipped until
    /// [`Outbox::seal_held`] has given them the epoch whose barrier followed them and
    /// [`Outbox::release_held`] says that epoch completed. A checkpointing `hub` sink
    /// writes so: what a crash cuts off before its checkpoint completes is written again
    /// by the replay, and [`Outbox::settle_held`] deletes the first copy.
    pub fn append_held(
        &self,
        stream: &str,
        batches: &[(Option<u64>, RecordBatch)],
        now_ms: i64,
    ) -> Result<Vec<u64>, OutboxError> {
        let encoded = encode_all(batches.iter().map(|(seq, batch)| (*seq, batch)))?;
        self.store(stream, encoded, now_ms, true)
    }

    /// Gives `stream`'s held batches whose barrier had not passed the epoch `epoch`: the
    /// barrier that has now reached the sink.
    pub fn seal_held(&self, stream: &str, epoch: u64) -> Result<(), OutboxError> {
        let mut state = self.state();
        let Some(stream_state) = state.streams.get_mut(stream) else {
            return Ok(());
        };
        if !stream_state.held.iter().any(|(e, _)| *e == OPEN_EPOCH) {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| storage(&self.path, e))?;
        {
            let mut held = txn.open_table(HELD).map_err(|e| storage(&self.path, e))?;
            for (_, entry) in stream_state.held.iter().filter(|(e, _)| *e == OPEN_EPOCH) {
                held.insert((stream, entry.seq), epoch)
                    .map_err(|e| storage(&self.path, e))?;
            }
        }
        txn.commit().map_err(|e| storage(&self.path, e))?;
        for (held_epoch, _) in &mut stream_state.held {
            if *held_epoch == OPEN_EPOCH {
                *held_epoch = epoch;
            }
        }
        Ok(())
    }

    /// Ships `stream`'s held batches of epochs up to `completed`: their checkpoint is
    /// complete. Returns the batches and rows released.
    pub fn release_held(&self, stream: &str, completed: u64) -> Result<(u64, u64), OutboxError> {
        let settled = self.settle(stream, completed, false)?;
        Ok((settled.released_batches, settled.released_rows))
    }

    /// Settles what an earlier run left held for `stream`, when a pipeline starts with
    /// `completed` as the newest complete checkpoint: batches of epochs up to it ship,
    /// the others (after it, or whose barrier never came) are deleted, as the pipeline
    /// replays their input.
    pub fn settle_held(&self, stream: &str, completed: u64) -> Result<Settled, OutboxError> {
        self.settle(stream, completed, true)
    }

    fn settle(&self, stream: &str, completed: u64, discard: bool) -> Result<Settled, OutboxError> {
        let mut state = self.state();
        let mut settled = Settled::default();
        let Some(stream_state) = state.streams.get_mut(stream) else {
            return Ok(settled);
        };
        let (released, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut stream_state.held)
            .into_iter()
            .partition(|(epoch, _)| *epoch <= completed);
        let (discarded, kept) = if discard {
            (kept, Vec::new())
        } else {
            (Vec::new(), kept)
        };
        let undo = |stream_state: &mut StreamState| {
            let mut held: Vec<(u64, Entry)> = released.iter().chain(&discarded).copied().collect();
            held.extend(&kept);
            stream_state.held = held;
        };
        if released.is_empty() && discarded.is_empty() {
            stream_state.held = kept;
            return Ok(settled);
        }
        let written = (|| -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            {
                let mut held = txn.open_table(HELD)?;
                for (_, entry) in released.iter().chain(&discarded) {
                    held.remove((stream, entry.seq))?;
                }
            }
            let victims: Vec<(String, Entry)> = discarded
                .iter()
                .map(|(_, entry)| (stream.to_owned(), *entry))
                .collect();
            delete(&txn, &victims)?;
            txn.commit()?;
            Ok(())
        })();
        if let Err(error) = written {
            undo(stream_state);
            return Err(storage(&self.path, error));
        }
        stream_state.held = kept;
        stream_state
            .entries
            .extend(released.iter().map(|(_, entry)| *entry));
        settled.released_batches = released.len() as u64;
        settled.released_rows = released.iter().map(|(_, entry)| entry.rows).sum();
        settled.discarded_batches = discarded.len() as u64;
        state.appended_rows += settled.released_rows;
        let discarded_bytes: u64 = discarded.iter().map(|(_, entry)| entry.bytes).sum();
        state.bytes = state.bytes.saturating_sub(discarded_bytes);
        if settled.released_batches > 0 {
            self.enforce_byte_limit(&mut state, stream)?;
        }
        Ok(settled)
    }

    fn store(
        &self,
        stream: &str,
        encoded: Vec<Encoded>,
        now_ms: i64,
        held: bool,
    ) -> Result<Vec<u64>, OutboxError> {
        let mut state = self.state();
        let mut next_seq = state
            .streams
            .get(stream)
            .map_or(state.seq_floor, |s| s.next_seq);
        let priority = state.streams.get(stream).map_or(0, |s| s.priority);
        let waiting = |seq: u64| {
            state.streams.get(stream).is_some_and(|s| {
                s.entries.iter().any(|entry| entry.seq == seq)
                    || s.held.iter().any(|(_, entry)| entry.seq == seq)
            })
        };
        let numbered: Vec<(u64, Vec<u8>, u64)> = encoded
            .into_iter()
            .filter_map(|(given, payload, rows)| match given {
                Some(seq) if waiting(seq) => None,
                Some(seq) => {
                    next_seq = next_seq.max(seq.saturating_add(1));
                    Some((seq, payload, rows))
                }
                None => {
                    next_seq += 1;
                    Some((next_seq - 1, payload, rows))
                }
            })
            .collect();
        let mut added = Vec::with_capacity(numbered.len());
        let txn = self.db.begin_write().map_err(|e| storage(&self.path, e))?;
        {
            let mut frames = txn
                .open_table(BATCHES)
                .map_err(|e| storage(&self.path, e))?;
            let mut index = txn.open_table(INDEX).map_err(|e| storage(&self.path, e))?;
            let mut held_table = txn.open_table(HELD).map_err(|e| storage(&self.path, e))?;
            for (seq, payload, rows) in numbered {
                let frame = Frame {
                    stream: stream.to_owned(),
                    seq,
                    appended_ms: now_ms,
                    rows: rows as u32,
                    payload,
                }
                .to_bytes();
                let bytes = frame.len() as u64;
                frames
                    .insert((stream, seq), frame.as_slice())
                    .map_err(|e| storage(&self.path, e))?;
                index
                    .insert((stream, seq), (bytes, rows, now_ms))
                    .map_err(|e| storage(&self.path, e))?;
                if held {
                    held_table
                        .insert((stream, seq), OPEN_EPOCH)
                        .map_err(|e| storage(&self.path, e))?;
                }
                added.push(Entry {
                    seq,
                    bytes,
                    rows,
                    appended_ms: now_ms,
                });
            }
            let mut streams = txn
                .open_table(STREAMS)
                .map_err(|e| storage(&self.path, e))?;
            streams
                .insert(stream, (next_seq, priority))
                .map_err(|e| storage(&self.path, e))?;
        }
        // What the byte limit drops goes in the same commit, so the file never holds more.
        // Held batches are never dropped for it: they are at most one checkpoint's worth.
        let added_bytes: u64 = added.iter().map(|entry| entry.bytes).sum();
        let candidates: &[Entry] = if held { &[] } else { &added };
        let victims = over_limit(
            &state,
            stream,
            candidates,
            self.limits.max_bytes,
            added_bytes,
        );
        delete(&txn, &victims).map_err(|e| storage(&self.path, e))?;
        txn.commit().map_err(|e| storage(&self.path, e))?;

        let seqs: Vec<u64> = added.iter().map(|entry| entry.seq).collect();
        let stream_state = state.streams.entry(stream.to_owned()).or_default();
        stream_state.next_seq = next_seq;
        if held {
            stream_state
                .held
                .extend(added.into_iter().map(|entry| (OPEN_EPOCH, entry)));
        } else {
            stream_state.entries.extend(added.iter().copied());
            state.appended_rows += added.iter().map(|entry| entry.rows).sum::<u64>();
        }
        state.bytes += added_bytes;
        forget(&mut state, &victims, Drop::Bytes);
        self.warn_full(&victims);
        Ok(seqs)
    }

    /// Says what the byte limit dropped, if anything.
    fn warn_full(&self, victims: &[(String, Entry)]) {
        if !victims.is_empty() {
            tracing::warn!(
                outbox = %self.path.display(),
                "the outbox is full ({} bytes): dropped the {} oldest batches ({} rows) of its \
                 lowest-priority streams",
                self.limits.max_bytes,
                victims.len(),
                victims.iter().map(|(_, entry)| entry.rows).sum::<u64>()
            );
        }
    }

    /// Drops the oldest shippable batches, lowest priority first, until the outbox is
    /// within `max_bytes` again: held batches just released count against it now.
    fn enforce_byte_limit(&self, state: &mut State, stream: &str) -> Result<(), OutboxError> {
        let victims = over_limit(state, stream, &[], self.limits.max_bytes, 0);
        if victims.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| storage(&self.path, e))?;
        delete(&txn, &victims).map_err(|e| storage(&self.path, e))?;
        txn.commit().map_err(|e| storage(&self.path, e))?;
        forget(state, &victims, Drop::Bytes);
        self.warn_full(&victims);
        Ok(())
    }

    /// Drops the batches older than `max_age` at `now_ms`; returns the rows dropped.
    pub fn expire(&self, now_ms: i64) -> Result<u64, OutboxError> {
        let Some(max_age) = self.limits.max_age else {
            return Ok(0);
        };
        if now_ms < PLAUSIBLE_SINCE_MS {
            // The clock is not set yet (a device without a battery-backed clock, before
            // NTP): ages mean nothing.
            return Ok(0);
        }
        let cutoff = now_ms.saturating_sub(i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX));
        let mut state = self.state();
        let victims: Vec<(String, Entry)> = state
            .streams
            .iter()
            .flat_map(|(name, stream)| {
                stream
                    .entries
                    .iter()
                    // A batch stored while the clock was not set cannot be dated: it is
                    // kept, and so is everything after it.
                    .take_while(|entry| {
                        entry.appended_ms >= PLAUSIBLE_SINCE_MS && entry.appended_ms < cutoff
                    })
                    .map(|entry| (name.clone(), *entry))
            })
            .collect();
        if victims.is_empty() {
            return Ok(0);
        }
        let txn = self.db.begin_write().map_err(|e| storage(&self.path, e))?;
        delete(&txn, &victims).map_err(|e| storage(&self.path, e))?;
        txn.commit().map_err(|e| storage(&self.path, e))?;
        forget(&mut state, &victims, Drop::Age);
        let rows = victims.iter().map(|(_, entry)| entry.rows).sum();
        tracing::warn!(
            outbox = %self.path.display(),
            "dropped {} batches ({rows} rows) older than {} s",
            victims.len(),
            max_age.as_secs()
        );
        Ok(rows)
    }

    /// Up to `max` batches to ship next, oldest first, all of one stream: the stream of
    /// highest priority that has any, the one with the oldest batch among equals.
    pub fn next(&self, max: usize) -> Result<Vec<Stored>, OutboxError> {
        let chosen: Option<(String, Vec<Entry>)> = {
            let state = self.state();
            state
                .streams
                .iter()
                .filter_map(|(name, stream)| Some((name, stream, stream.entries.front()?)))
                .max_by(|(_, a, a_front), (_, b, b_front)| {
                    a.priority
                        .cmp(&b.priority)
                        .then(b_front.appended_ms.cmp(&a_front.appended_ms))
                        .then(b_front.seq.cmp(&a_front.seq))
                })
                .map(|(name, stream, _)| {
                    (
                        name.clone(),
                        stream.entries.iter().take(max).copied().collect(),
                    )
                })
        };
        let Some((stream, entries)) = chosen else {
            return Ok(Vec::new());
        };
        let txn = self.db.begin_read().map_err(|e| storage(&self.path, e))?;
        let frames = txn
            .open_table(BATCHES)
            .map_err(|e| storage(&self.path, e))?;
        let mut stored = Vec::with_capacity(entries.len());
        let mut unreadable = Vec::new();
        for entry in entries {
            let Some(bytes) = frames
                .get((stream.as_str(), entry.seq))
                .map_err(|e| storage(&self.path, e))?
            else {
                continue;
            };
            match Frame::parse(bytes.value()) {
                Ok((frame, _)) => stored.push(Stored {
                    stream: frame.stream,
                    seq: frame.seq,
                    rows: u64::from(frame.rows),
                    appended_ms: frame.appended_ms,
                    payload: frame.payload,
                }),
                Err(why) => unreadable.push((entry.seq, format!("its frame does not read: {why}"))),
            }
        }
        drop(frames);
        drop(txn);
        // A frame that does not read would stop its stream for good: it is set aside,
        // and the batches after it ship.
        for (seq, reason) in unreadable {
            tracing::error!(%stream, seq, "setting a batch aside as a dead letter: {reason}");
            self.dead_letter(&stream, seq, &reason, crate::sink::now_ms())?;
        }
        Ok(stored)
    }

    /// Sets batch `seq` of `stream` aside for good, with `reason`: it is no longer
    /// shipped, counted in [`Stats::dead_lettered_rows`], and listed by
    /// [`Outbox::dead_letters`]. The oldest dead letters go past [`MAX_DEAD_LETTERS`].
    pub fn dead_letter(
        &self,
        stream: &str,
        seq: u64,
        reason: &str,
        now_ms: i64,
    ) -> Result<(), OutboxError> {
        let mut state = self.state();
        let Some(victim) = state
            .streams
            .get(stream)
            .and_then(|s| s.entries.iter().find(|entry| entry.seq == seq))
            .copied()
        else {
            return Ok(());
        };
        let victims = [(stream.to_owned(), victim)];
        let txn = self.db.begin_write().map_err(|e| storage(&self.path, e))?;
        let kept = (|| -> Result<u64, redb::Error> {
            let bytes = txn
                .open_table(BATCHES)?
                .get((stream, seq))?
                .map(|bytes| bytes.value().to_vec())
                .unwrap_or_default();
            let mut dead = txn.open_table(DEAD)?;
            dead.insert((stream, seq), (bytes.as_slice(), reason, now_ms))?;
            let mut by_age: Vec<(i64, String, u64)> = Vec::new();
            for row in dead.iter()? {
                let (key, value) = row?;
                let (stream, seq) = key.value();
                by_age.push((value.value().2, stream.to_owned(), seq));
            }
            by_age.sort();
            let excess = by_age.len().saturating_sub(MAX_DEAD_LETTERS);
            for (_, stream, seq) in &by_age[..excess] {
                dead.remove((stream.as_str(), *seq))?;
            }
            Ok((by_age.len() - excess) as u64)
        })()
        .map_err(|e| storage(&self.path, e))?;
        delete(&txn, &victims).map_err(|e| storage(&self.path, e))?;
        txn.commit().map_err(|e| storage(&self.path, e))?;
        forget(&mut state, &victims, Drop::DeadLettered);
        state.dead_letters = kept;
        Ok(())
    }

    /// The dead letters kept, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, OutboxError> {
        let txn = self.db.begin_read().map_err(|e| storage(&self.path, e))?;
        let dead = match txn.open_table(DEAD) {
            Ok(dead) => dead,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(&self.path, e)),
        };
        let mut letters = Vec::new();
        for row in dead.iter().map_err(|e| storage(&self.path, e))? {
            let (key, value) = row.map_err(|e| storage(&self.path, e))?;
            let (stream, seq) = key.value();
            let (bytes, reason, at_ms) = value.value();
            letters.push(DeadLetter {
                stream: stream.to_owned(),
                seq,
                rows: Frame::parse(bytes).map_or(0, |(frame, _)| u64::from(frame.rows)),
                reason: reason.to_owned(),
                at_ms,
            });
        }
        letters.sort_by_key(|letter| letter.at_ms);
        Ok(letters)
    }

    /// Deletes what the hub acknowledged: `seqs` of `stream`.
    pub fn ack(&self, stream: &str, seqs: &[u64]) -> Result<(), OutboxError> {
        let mut state = self.state();
        let victims: Vec<(String, Entry)> = state
            .streams
            .get(stream)
            .map(|s| {
                s.entries
                    .iter()
                    .filter(|entry| seqs.contains(&entry.seq))
                    .map(|entry| (stream.to_owned(), *entry))
                    .collect()
            })
            .unwrap_or_default();
        if victims.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| storage(&self.path, e))?;
        delete(&txn, &victims).map_err(|e| storage(&self.path, e))?;
        txn.commit().map_err(|e| storage(&self.path, e))?;
        forget(&mut state, &victims, Drop::Acked);
        Ok(())
    }

    /// The outbox at a glance.
    pub fn stats(&self) -> Stats {
        let state = self.state();
        let streams: Vec<StreamStats> = state
            .streams
            .iter()
            .map(|(name, stream)| StreamStats {
                stream: name.clone(),
                priority: stream.priority,
                batches: stream.entries.len() as u64,
                rows: stream.entries.iter().map(|e| e.rows).sum(),
                bytes: stream.entries.iter().map(|e| e.bytes).sum(),
                oldest_ms: stream.entries.front().map(|e| e.appended_ms),
                next_seq: stream.next_seq,
            })
            .collect();
        Stats {
            batches: streams.iter().map(|s| s.batches).sum(),
            rows: streams.iter().map(|s| s.rows).sum(),
            bytes: state.bytes,
            oldest_ms: streams.iter().filter_map(|s| s.oldest_ms).min(),
            appended_rows: state.appended_rows,
            acked_rows: state.acked_rows,
            dropped_rows_bytes: state.dropped_rows_bytes,
            dropped_rows_age: state.dropped_rows_age,
            dead_lettered_rows: state.dead_lettered_rows,
            dead_letters: state.dead_letters,
            streams,
        }
    }
}

/// A batch ready to store: its given number (if any), zstd Arrow IPC, and its rows.
type Encoded = (Option<u64>, Vec<u8>, u64);

/// Each non-empty batch, encoded.
fn encode_all<'a>(
    batches: impl Iterator<Item = (Option<u64>, &'a RecordBatch)>,
) -> Result<Vec<Encoded>, OutboxError> {
    batches
        .filter(|(_, batch)| batch.num_rows() > 0)
        .map(|(seq, batch)| Ok((seq, encode_batch(batch)?, batch.num_rows() as u64)))
        .collect()
}

/// The entries to drop so that `added_bytes` more fit in `max_bytes`: oldest first from
/// the lowest-priority streams, the batches just added included.
fn over_limit(
    state: &State,
    stream: &str,
    added: &[Entry],
    max_bytes: u64,
    added_bytes: u64,
) -> Vec<(String, Entry)> {
    let mut total = state.bytes + added_bytes;
    if total <= max_bytes {
        return Vec::new();
    }
    // Candidates per stream, oldest first, as if the new entries were already there.
    let mut queues: Vec<(i32, String, VecDeque<Entry>)> = state
        .streams
        .iter()
        .map(|(name, s)| {
            let mut entries = s.entries.clone();
            if name == stream {
                entries.extend(added.iter().copied());
            }
            (s.priority, name.clone(), entries)
        })
        .collect();
    if !state.streams.contains_key(stream) {
        queues.push((0, stream.to_owned(), added.iter().copied().collect()));
    }
    let mut victims = Vec::new();
    while total > max_bytes {
        let Some((_, name, entries)) = queues
            .iter_mut()
            .filter(|(_, _, entries)| !entries.is_empty())
            .min_by(|(pa, _, a), (pb, _, b)| {
                pa.cmp(pb)
                    .then(a[0].appended_ms.cmp(&b[0].appended_ms))
                    .then(a[0].seq.cmp(&b[0].seq))
            })
        else {
            break;
        };
        let Some(entry) = entries.pop_front() else {
            break;
        };
        total -= entry.bytes;
        victims.push((name.clone(), entry));
    }
    victims
}

fn delete(txn: &redb::WriteTransaction, victims: &[(String, Entry)]) -> Result<(), redb::Error> {
    if victims.is_empty() {
        return Ok(());
    }
    let mut frames = txn.open_table(BATCHES)?;
    let mut index = txn.open_table(INDEX)?;
    for (stream, entry) in victims {
        frames.remove((stream.as_str(), entry.seq))?;
        index.remove((stream.as_str(), entry.seq))?;
    }
    Ok(())
}

/// Takes `victims` out of the in-memory state, counting them under `why`.
fn forget(state: &mut State, victims: &[(String, Entry)], why: Drop) {
    for (stream, victim) in victims {
        if let Some(s) = state.streams.get_mut(stream) {
            s.entries.retain(|entry| entry.seq != victim.seq);
        }
        state.bytes = state.bytes.saturating_sub(victim.bytes);
        match why {
            Drop::Bytes => state.dropped_rows_bytes += victim.rows,
            Drop::Age => state.dropped_rows_age += victim.rows,
            Drop::Acked => state.acked_rows += victim.rows,
            Drop::DeadLettered => state.dead_lettered_rows += victim.rows,
        }
    }
}

/// Times before this (2024-01-01) are a clock that is not set yet: a device without a
/// battery-backed clock boots at 1970 and learns the time from NTP later. Such times are
/// not used to judge ages, and the hub files such batches by their arrival.
pub const PLAUSIBLE_SINCE_MS: i64 = 1_704_067_200_000;

/// Where a new file's sequence numbers start: the time in µs, so they pass every number
/// an earlier file (deleted, or lost with its disk) can have given. With the clock not
/// set, the time says nothing: a random start high above any time (2^61 to 2^62) keeps
/// the numbers apart from those of every other file instead.
fn now_micros() -> u64 {
    seq_floor(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2)),
    )
}

/// The first sequence number of a file created at `micros` (see [`now_micros`]).
fn seq_floor(micros: u64) -> u64 {
    if micros < PLAUSIBLE_SINCE_MS as u64 * 1000 {
        use rand::Rng;
        return rand::rng().random_range(1u64 << 61..1u64 << 62);
    }
    micros
}

/// The page size redb writes in: a file of another length was cut short.
const PAGE: u64 = 4096;

/// Why an outbox file could not be opened.
#[derive(Debug)]
enum LoadFailure {
    /// The file is damaged: what it holds must be salvaged.
    Damaged(String),
    /// The file is fine as far as anyone knows, but cannot be used now (another process
    /// has it open, no permission, the disk is full or failing): it is left as it is.
    Unavailable(String),
}

impl LoadFailure {
    fn reason(self) -> String {
        match self {
            LoadFailure::Damaged(reason) | LoadFailure::Unavailable(reason) => reason,
        }
    }
}

impl<E: Into<redb::Error>> From<E> for LoadFailure {
    fn from(error: E) -> Self {
        match error.into() {
            redb::Error::DatabaseAlreadyOpen => LoadFailure::Unavailable(
                "another process has it open (is another weir running with this state \
                 directory?)"
                    .to_owned(),
            ),
            redb::Error::Io(e) => LoadFailure::Unavailable(e.to_string()),
            redb::Error::UpgradeRequired(version) => LoadFailure::Unavailable(format!(
                "it is in an older file format ({version}) that this weir does not open"
            )),
            other => LoadFailure::Damaged(other.to_string()),
        }
    }
}

/// Opens the database and reads its index. What the database finds damaged (or panics
/// on) is a damaged file; an error of the file system or a lock is not.
fn load(path: &Path) -> Result<(Database, State), LoadFailure> {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.len() % PAGE != 0
    {
        return Err(LoadFailure::Damaged(format!(
            "its size ({} bytes) is not a whole number of {PAGE}-byte pages: it was cut short",
            meta.len()
        )));
    }
    let path = path.to_owned();
    std::panic::catch_unwind(move || {
        let db = Database::create(&path)?;
        let mut state = State::default();
        let txn = db.begin_write()?;
        {
            // Created on first use, so a fresh file has them.
            txn.open_table(BATCHES)?;
            let mut meta = txn.open_table(META)?;
            let floor = meta.get(SEQ_FLOOR)?.map(|floor| floor.value());
            state.seq_floor = match floor {
                Some(floor) => floor,
                None => {
                    // A new file: its numbers start past any an earlier file (deleted,
                    // or lost with its disk) can have used.
                    let floor = now_micros();
                    meta.insert(SEQ_FLOOR, floor)?;
                    floor
                }
            };
            state.dead_letters = txn.open_table(DEAD)?.len()?;
            let index = txn.open_table(INDEX)?;
            let held_table = txn.open_table(HELD)?;
            let mut held = BTreeMap::new();
            for row in held_table.iter()? {
                let (key, epoch) = row?;
                let (stream, seq) = key.value();
                held.insert((stream.to_owned(), seq), epoch.value());
            }
            let streams = txn.open_table(STREAMS)?;
            for row in streams.iter()? {
                let (name, value) = row?;
                let (next_seq, priority) = value.value();
                state.streams.insert(
                    name.value().to_owned(),
                    StreamState {
                        priority,
                        next_seq,
                        ..StreamState::default()
                    },
                );
            }
            for row in index.iter()? {
                let (key, value) = row?;
                let (stream, seq) = key.value();
                let (bytes, rows, appended_ms) = value.value();
                state.bytes += bytes;
                let entry = Entry {
                    seq,
                    bytes,
                    rows,
                    appended_ms,
                };
                let stream_state = state.streams.entry(stream.to_owned()).or_default();
                match held.get(&(stream.to_owned(), seq)) {
                    Some(&epoch) => stream_state.held.push((epoch, entry)),
                    None => stream_state.entries.push_back(entry),
                }
            }
        }
        txn.commit()?;
        Ok((db, state))
    })
    .unwrap_or_else(|_| {
        Err(LoadFailure::Damaged(
            "the database could not read it".to_owned(),
        ))
    })
}

/// What `weir outbox check` reports: the outbox as it is, or what recovery would keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The file is sound: what waits, and the dead letters set aside.
    Sound(Stats, Vec<DeadLetter>),
    /// The file is damaged; opening it would keep `batches` intact batches and lose
    /// `broken` damaged ones.
    Damaged {
        /// What is wrong with it.
        reason: String,
        /// Intact batches found.
        batches: u64,
        /// Their rows.
        rows: u64,
        /// Damaged batches found.
        broken: u64,
    },
}

impl Outbox {
    /// Looks at the outbox at `path` without changing it (nothing is moved or repaired).
    pub fn check(path: &Path) -> Result<Check, OutboxError> {
        if !path.exists() {
            return Err(storage(path, "no such file"));
        }
        let copy = tempfile_next_to(path).map_err(|e| storage(path, e))?;
        // The database may repair a file it opens: it opens a copy.
        std::fs::copy(path, &copy).map_err(|e| storage(path, e))?;
        let checked = match load(&copy) {
            Ok((db, state)) => {
                let outbox = Outbox::with(db, path, Limits::default(), state);
                let dead_letters = outbox.dead_letters()?;
                Ok(Check::Sound(outbox.stats(), dead_letters))
            }
            Err(LoadFailure::Unavailable(reason)) => Err(storage(path, reason)),
            Err(LoadFailure::Damaged(reason)) => {
                let found = salvage_file(path).map_err(|e| storage(path, e))?;
                Ok(Check::Damaged {
                    reason,
                    batches: found.frames.len() as u64,
                    rows: found.frames.iter().map(|f| u64::from(f.rows)).sum(),
                    broken: found.broken_frames,
                })
            }
        };
        let _ = std::fs::remove_file(&copy);
        checked
    }
}

/// A path beside `path` for a scratch copy.
fn tempfile_next_to(path: &Path) -> std::io::Result<PathBuf> {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".check-{}", std::process::id()));
    Ok(PathBuf::from(name))
}

/// Writes the intact batches of the damaged file at `path` to a new file beside it, then
/// moves the damaged one aside and the new one in its place. Until both renames are
/// done the damaged file stays where it was: a disk that fills up midway strands no
/// batch, and the next start tries again.
///
/// Frames do not say whether a batch was held for a checkpoint: salvaged batches all
/// ship, so one whose checkpoint never completed may reach the hub twice (once more from
/// the replay). Losing it would be worse.
fn recover(path: &Path, reason: &str) -> Result<Recovery, OutboxError> {
    let found = salvage_file(path).map_err(|e| storage(path, e))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let beside = |suffix: String| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    let moved_to = beside(format!(".damaged-{stamp}"));
    let salvaged = beside(format!(".salvaged-{}", std::process::id()));
    let _ = std::fs::remove_file(&salvaged);
    let written = write_salvaged(&salvaged, &found.frames);
    let rows = match written {
        Ok(rows) => rows,
        Err(e) => {
            let _ = std::fs::remove_file(&salvaged);
            return Err(e);
        }
    };
    std::fs::rename(path, &moved_to).map_err(|e| storage(path, e))?;
    std::fs::rename(&salvaged, path).map_err(|e| storage(path, e))?;
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| storage(path, e))?;
    }
    let recovery = Recovery {
        reason: reason.to_owned(),
        moved_to,
        salvaged_batches: found.frames.len() as u64,
        salvaged_rows: rows,
        broken_batches: found.broken_frames,
    };
    tracing::error!(
        outbox = %path.display(),
        "the outbox was damaged ({reason}); kept {} intact batches ({} rows), lost {} \
         damaged ones; the damaged file is at {}",
        recovery.salvaged_batches,
        recovery.salvaged_rows,
        recovery.broken_batches,
        recovery.moved_to.display()
    );
    Ok(recovery)
}

/// A new outbox file at `path` holding `frames`; gives their rows.
fn write_salvaged(path: &Path, salvaged: &[Frame]) -> Result<u64, OutboxError> {
    let db = Database::create(path).map_err(|e| storage(path, e))?;
    let txn = db.begin_write().map_err(|e| storage(path, e))?;
    let mut rows = 0;
    let floor = now_micros();
    {
        txn.open_table(META)
            .map_err(|e| storage(path, e))?
            .insert(SEQ_FLOOR, floor)
            .map_err(|e| storage(path, e))?;
        let mut frames = txn.open_table(BATCHES).map_err(|e| storage(path, e))?;
        let mut index = txn.open_table(INDEX).map_err(|e| storage(path, e))?;
        let mut streams = txn.open_table(STREAMS).map_err(|e| storage(path, e))?;
        let mut next: BTreeMap<&str, u64> = BTreeMap::new();
        for frame in salvaged {
            let bytes = frame.to_bytes();
            let key = (frame.stream.as_str(), frame.seq);
            frames
                .insert(key, bytes.as_slice())
                .map_err(|e| storage(path, e))?;
            index
                .insert(
                    key,
                    (bytes.len() as u64, u64::from(frame.rows), frame.appended_ms),
                )
                .map_err(|e| storage(path, e))?;
            rows += u64::from(frame.rows);
            let after = next.entry(&frame.stream).or_insert(floor);
            *after = (*after).max(frame.seq + 1);
        }
        for (stream, next_seq) in next {
            streams
                .insert(stream, (next_seq, 0))
                .map_err(|e| storage(path, e))?;
        }
    }
    txn.commit().map_err(|e| storage(path, e))?;
    drop(db);
    Ok(rows)
}

#[cfg(test)]
mod tests;
