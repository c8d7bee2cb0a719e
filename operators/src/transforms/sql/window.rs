//! The windowed `sql` transform: rows are assigned to panes of event time, and when the
//! watermark passes a window's end the query's result over the window's panes is
//! emitted.
//!
//! Tumbling windows are hopping windows whose slide equals their size. Windows start at
//! multiples of the slide (counted from the Unix epoch) and are `size` long, so every
//! window is a run of consecutive panes of length `gcd(size, slide)`. A batch that spans
//! several panes is split with Arrow kernels; the common case, a batch inside one pane,
//! is used as it came.
//!
//! What a pane keeps depends on the query (see `incremental.rs`). A query whose
//! aggregate splits into DataFusion's partial and final phases keeps accumulator state
//! per group key, merged across the window's panes when it closes. Arriving rows are
//! folded into that state in mini-batches: a pane gathers up to [`MINI_BATCH_ROWS`] rows
//! per input, and folds them in one partial aggregation when it has that many, when the
//! watermark passes the pane, and at the end. One aggregation over many rows costs far
//! less than many over a few, and the gathered rows are bounded. Any other query keeps
//! the pane's rows and runs over them at the close. Either way the pane's bytes count
//! towards `max_state_bytes` and show in the state metrics.
//!
//! A window closes when the watermark reaches its end. Windows without rows emit
//! nothing. A row whose every window has closed is late: it goes to the `late` port, or
//! is counted as dropped when the transform has several inputs (and so no late port).
//!
//! Results carry `window_start` as their event time, so the watermark forwarded
//! downstream is held back to the earliest start a window still open can have: a
//! window after a window sees every result on time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::error::DataFusionError;
use tracing::{debug, warn};
use weir_engine::arrow::array::{
    Array, ArrayRef, Int64Array, TimestampMillisecondArray, UInt32Array,
};
use weir_engine::arrow::compute::kernels::cmp::eq;
use weir_engine::arrow::compute::{
    SortColumn, concat_batches, filter, filter_record_batch, is_not_null, lexsort_to_indices, max,
    min, partition, take, take_record_batch,
};
use weir_engine::arrow::datatypes::SchemaRef;
use weir_engine::arrow::error::ArrowError;
use weir_engine::arrow::record_batch::RecordBatch;
use weir_engine::checkpoint::{NodeState, StateChanges, decode_batches, encode_batches};
use weir_engine::metrics::StateMetrics;
use weir_engine::time::{WindowSpec, event_times_ms};
use weir_engine::{Collector, OperatorError, Transform, Watermark};

use super::incremental::{IncrementalPlan, same_columns};
use super::isolate::{DeadLetters, bisect};
use super::plan::SqlPlan;
use super::{LATE_PORT, execution_error, format_millis, is_data_error};

/// When a batch spans at most this many panes it is split with one filter per pane;
/// beyond, with one sort, so the cost stays linear in the batch, not in the panes.
const FILTER_SPLIT_MAX_PANES: i64 = 8;

/// How many state batches a pane collects before they are merged into one.
const REDUCE_AFTER: usize = 16;

/// How many rows of one input a pane of an incremental window gathers before they are
/// folded into its accumulator state.
pub(crate) const MINI_BATCH_ROWS: usize = 64 * 1024;

/// What one pane keeps: its rows per input, or (incrementally) accumulator state
/// batches in `batches[0]` and the rows not folded into them yet in `pending`.
struct Pane {
    batches: Vec<Vec<RecordBatch>>,
    /// Rows of each input waiting to be folded into the state (incremental only).
    pending: Vec<Vec<RecordBatch>>,
    /// The rows in `pending`, over all inputs.
    pending_rows: usize,
    /// State batches added since the pane was last reduced.
    unreduced: usize,
    /// Rows kept: input rows, or state rows (one per group and batch until reduced).
    rows: usize,
    bytes: usize,
}

/// The memory a batch's rows take, counting only the part of shared buffers that the
/// batch's slices cover.
fn batch_bytes(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|column| {
            column
                .to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| column.get_array_memory_size())
        })
        .sum()
}

/// The rows and memory of `batches` together.
fn sizes(batches: &[RecordBatch]) -> (usize, usize) {
    batches.iter().fold((0, 0), |(rows, bytes), batch| {
        (rows + batch.num_rows(), bytes + batch_bytes(batch))
    })
}

/// The event-time bookkeeping of a windowed transform: panes with what they keep, the
/// windows that have rows and are still open, and the last watermark.
pub(crate) struct Panes {
    size: i64,
    slide: i64,
    /// The pane length: the greatest common divisor of size and slide.
    pane: i64,
    inputs: usize,
    panes: BTreeMap<i64, Pane>,
    /// Starts of the windows that hold at least one row and have not closed yet.
    open: BTreeSet<i64>,
    watermark: i64,
    rows: usize,
    bytes: usize,
    /// What changed since the last snapshot, so a checkpoint writes only those panes.
    changes: PaneChanges,
    /// The parts of panes the store holds, so a snapshot deletes only what it wrote.
    stored: BTreeSet<(i64, Kept, usize)>,
}

/// Which list of a pane a snapshot part holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kept {
    /// `Pane::batches`: rows, or accumulator state.
    Kept,
    /// `Pane::pending`: rows not folded into the state yet.
    Pending,
}

/// The panes a checkpoint has to write or delete, and whether the store holds an
/// earlier snapshot of this state to change at all.
#[derive(Default)]
struct PaneChanges {
    changed: BTreeSet<i64>,
    removed: BTreeSet<i64>,
    /// The watermark the store holds, once it holds any snapshot.
    stored_watermark: Option<i64>,
    /// The last watermark before the end of the stream, once it has ended.
    before_end: i64,
}

/// The key of the watermark in a windowed transform's snapshot.
const WATERMARK_KEY: &[u8] = b"watermark";
/// The prefix of the key of what a pane keeps; the pane's start and the input number
/// follow.
const PANE_KEY: &[u8] = b"pane/";
/// The prefix of the key of a pane's rows not folded into its state yet.
const PENDING_KEY: &[u8] = b"pending/";

impl Kept {
    fn prefix(self) -> &'static [u8] {
        match self {
            Kept::Kept => PANE_KEY,
            Kept::Pending => PENDING_KEY,
        }
    }
}

/// The key of a snapshot part: what pane `pane` keeps of input `input` in its list
/// `kept`. The start's sign bit is flipped so keys sort in time order.
fn pane_key((pane, kept, input): (i64, Kept, usize)) -> Vec<u8> {
    let mut key = kept.prefix().to_vec();
    key.extend_from_slice(&((pane as u64) ^ (1 << 63)).to_be_bytes());
    key.extend_from_slice(&(input as u32).to_be_bytes());
    key
}

/// The part a key [`pane_key`] made names.
fn parse_pane_key(key: &[u8]) -> Option<(i64, Kept, usize)> {
    let (kept, rest) = [Kept::Kept, Kept::Pending]
        .into_iter()
        .find_map(|kept| Some((kept, key.strip_prefix(kept.prefix())?)))?;
    let (start, input) = rest.split_first_chunk::<8>()?;
    let input: [u8; 4] = input.try_into().ok()?;
    Some((
        (u64::from_be_bytes(*start) ^ (1 << 63)) as i64,
        kept,
        u32::from_be_bytes(input) as usize,
    ))
}

/// `a - (a mod m)` with the remainder taken non-negative: the multiple of `m` at or
/// below `a`, saturating at `i64::MIN`.
fn floor_to(a: i64, m: i64) -> i64 {
    a.saturating_sub(a.rem_euclid(m))
}

/// The multiple of `m` at or above `a`, saturating at `i64::MAX`.
fn ceil_to(a: i64, m: i64) -> i64 {
    match a.rem_euclid(m) {
        0 => a,
        r => a.saturating_add(m - r),
    }
}

fn gcd(mut a: i64, mut b: i64) -> i64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Panes {
    /// Empty state for `window` over `inputs` inputs. The window must have a positive
    /// size and slide; planning checks that.
    pub(crate) fn new(window: WindowSpec, inputs: usize) -> Self {
        let size = window.size_ms().max(1);
        Panes::sized(size, window.slide_ms().clamp(1, size), inputs)
    }

    /// Empty state for windows `size` long every `slide` (both positive).
    fn sized(size: i64, slide: i64, inputs: usize) -> Self {
        Panes {
            size,
            slide,
            pane: gcd(size, slide),
            inputs,
            panes: BTreeMap::new(),
            open: BTreeSet::new(),
            watermark: Watermark::START.millis(),
            rows: 0,
            bytes: 0,
            changes: PaneChanges::default(),
            stored: BTreeSet::new(),
        }
    }

    /// The start of the pane that holds event time `t`.
    fn pane_of(&self, t: i64) -> i64 {
        floor_to(t, self.pane)
    }

    /// The start of the last window that covers the pane starting at `pane`.
    fn last_window(&self, pane: i64) -> i64 {
        floor_to(pane, self.slide)
    }

    /// The end of a window starting at `start`.
    fn end(&self, start: i64) -> i64 {
        start.saturating_add(self.size)
    }

    /// Whether every window covering the pane starting at `pane` has closed.
    fn is_late(&self, pane: i64) -> bool {
        self.end(self.last_window(pane)) <= self.watermark
    }

    /// The earliest start a window not closed by `watermark` may have: every result
    /// still to come has at least this `window_start`.
    fn earliest_open_start(&self, watermark: i64) -> i64 {
        ceil_to(watermark.saturating_sub(self.size - 1), self.slide)
    }

    /// Keeps `batches` (rows of input `input`, or state) in the pane starting at
    /// `pane`, which must not be late, and opens the windows the pane feeds.
    fn insert(&mut self, input: usize, pane: i64, batches: Vec<RecordBatch>) {
        self.add(Kept::Kept, input, pane, batches);
    }

    /// Gathers rows of input `input` in the pane starting at `pane`, which must not be
    /// late, to be folded into its state later; returns how many the pane now gathers.
    fn insert_pending(&mut self, input: usize, pane: i64, batch: RecordBatch) -> usize {
        self.add(Kept::Pending, input, pane, vec![batch]);
        self.panes.get(&pane).map_or(0, |entry| entry.pending_rows)
    }

    fn add(&mut self, kept: Kept, input: usize, pane: i64, batches: Vec<RecordBatch>) {
        let inputs = self.inputs;
        self.changes.changed.insert(pane);
        let mut created = false;
        let entry = self.panes.entry(pane).or_insert_with(|| {
            created = true;
            Pane {
                batches: vec![Vec::new(); inputs],
                pending: vec![Vec::new(); inputs],
                pending_rows: 0,
                unreduced: 0,
                rows: 0,
                bytes: 0,
            }
        });
        for batch in batches {
            let (rows, bytes) = (batch.num_rows(), batch_bytes(&batch));
            match kept {
                Kept::Kept => {
                    entry.batches[input].push(batch);
                    entry.unreduced += 1;
                }
                Kept::Pending => {
                    entry.pending[input].push(batch);
                    entry.pending_rows += rows;
                }
            }
            entry.rows += rows;
            entry.bytes += bytes;
            self.rows += rows;
            self.bytes += bytes;
        }
        if created {
            // Windows only ever close, so the windows open now are the ones this pane
            // will feed; later batches of the same pane need no bookkeeping.
            let last = self.last_window(pane);
            let first = ceil_to(
                pane.saturating_add(self.pane).saturating_sub(self.size),
                self.slide,
            );
            let mut start = first;
            while start <= last {
                if self.end(start) > self.watermark {
                    self.open.insert(start);
                }
                match start.checked_add(self.slide) {
                    Some(next) => start = next,
                    None => break,
                }
            }
        }
    }

    /// Takes the rows the pane starting at `pane` gathers to fold, per input that has
    /// some.
    fn take_pending(&mut self, pane: i64) -> Vec<(usize, Vec<RecordBatch>)> {
        let Some(entry) = self.panes.get_mut(&pane) else {
            return Vec::new();
        };
        if entry.pending_rows == 0 {
            return Vec::new();
        }
        self.changes.changed.insert(pane);
        entry.pending_rows = 0;
        let mut taken = Vec::new();
        for (input, pending) in entry.pending.iter_mut().enumerate() {
            if pending.is_empty() {
                continue;
            }
            let batches = std::mem::take(pending);
            let (rows, bytes) = sizes(&batches);
            entry.rows -= rows;
            entry.bytes -= bytes;
            self.rows -= rows;
            self.bytes -= bytes;
            taken.push((input, batches));
        }
        taken
    }

    /// The starts of the panes the watermark has passed that gather rows to fold or
    /// hold several state batches to merge.
    fn complete_with_work(&self) -> Vec<i64> {
        self.panes
            .range(..self.watermark.saturating_sub(self.pane).saturating_add(1))
            .filter(|(_, entry)| entry.pending_rows > 0 || entry.unreduced >= 2)
            .map(|(&pane, _)| pane)
            .collect()
    }

    /// The state batches of `pane` when at least `at_least` have gathered since its last
    /// merge, taken out of the pane; [`Panes::insert`] puts the merged batches back.
    fn take_for_reduce(&mut self, pane: i64, at_least: usize) -> Option<Vec<RecordBatch>> {
        let entry = self.panes.get_mut(&pane)?;
        if entry.unreduced < at_least.max(2) {
            return None;
        }
        self.changes.changed.insert(pane);
        self.rows -= entry.rows;
        self.bytes -= entry.bytes;
        entry.rows = 0;
        entry.bytes = 0;
        entry.unreduced = 0;
        Some(std::mem::take(&mut entry.batches[0]))
    }

    /// Moves the watermark to `watermark` and returns, in start order, the windows with
    /// rows that it closes. Their panes stay until [`Panes::evict`].
    fn advance(&mut self, watermark: i64) -> Vec<i64> {
        if watermark <= self.watermark {
            return Vec::new();
        }
        if watermark == Watermark::END.millis() {
            self.changes.before_end = self.watermark;
        }
        self.watermark = watermark;
        let mut closing = Vec::new();
        while let Some(&start) = self.open.first() {
            if self.end(start) > watermark {
                break;
            }
            self.open.pop_first();
            closing.push(start);
        }
        closing
    }

    /// What the panes of the window starting at `start` keep, per input.
    fn window_batches(&self, start: i64) -> Vec<Vec<RecordBatch>> {
        let mut inputs = vec![Vec::new(); self.inputs];
        for pane in self
            .panes
            .range(start..self.end(start))
            .map(|(_, pane)| pane)
        {
            for (input, batches) in inputs.iter_mut().zip(&pane.batches) {
                input.extend(batches.iter().cloned());
            }
        }
        inputs
    }

    /// The starts of the panes that the window starting at `start` covers and that
    /// hold something.
    fn window_panes(&self, start: i64) -> Vec<i64> {
        self.panes
            .range(start..self.end(start))
            .map(|(&pane, _)| pane)
            .collect()
    }

    /// The rows of input `input` kept in the pane starting at `pane`.
    fn input_batches(&self, pane: i64, input: usize) -> &[RecordBatch] {
        self.panes
            .get(&pane)
            .and_then(|entry| entry.batches.get(input))
            .map_or(&[], Vec::as_slice)
    }

    /// Takes what the pane starting at `pane` keeps of input `input` out of it;
    /// [`Panes::insert`] puts rows back.
    fn take_input(&mut self, pane: i64, input: usize) -> Vec<RecordBatch> {
        let Some(entry) = self.panes.get_mut(&pane) else {
            return Vec::new();
        };
        let taken = std::mem::take(&mut entry.batches[input]);
        self.changes.changed.insert(pane);
        let (rows, bytes) = sizes(&taken);
        entry.rows -= rows;
        entry.bytes -= bytes;
        self.rows -= rows;
        self.bytes -= bytes;
        taken
    }

    /// Drops the panes that no open window covers any more.
    fn evict(&mut self) {
        while let Some((&pane, _)) = self.panes.first_key_value() {
            if !self.is_late(pane) {
                break;
            }
            if let Some(evicted) = self.panes.remove(&pane) {
                self.rows -= evicted.rows;
                self.bytes -= evicted.bytes;
            }
            self.changes.changed.remove(&pane);
            self.changes.removed.insert(pane);
        }
    }

    /// What changed since the last snapshot: the panes that changed, whole, the panes
    /// evicted, and the watermark. The first snapshot replaces whatever the store had.
    fn snapshot(&mut self) -> Result<StateChanges, ArrowError> {
        let mut snapshot = match self.changes.stored_watermark {
            Some(_) => StateChanges::unchanged(),
            None => StateChanges::cleared(),
        };
        for &pane in &self.changes.removed {
            let parts: Vec<_> = self
                .stored
                .range((pane, Kept::Kept, 0)..=(pane, Kept::Pending, usize::MAX))
                .copied()
                .collect();
            for part in parts {
                self.stored.remove(&part);
                snapshot.delete(pane_key(part));
            }
        }
        for &pane in &self.changes.changed {
            let Some(entry) = self.panes.get(&pane) else {
                continue;
            };
            for (kept, lists) in [
                (Kept::Kept, &entry.batches),
                (Kept::Pending, &entry.pending),
            ] {
                for (input, batches) in lists.iter().enumerate() {
                    let part = (pane, kept, input);
                    match batches.first() {
                        Some(first) => {
                            let bytes = encode_batches(&first.schema(), batches)?;
                            snapshot.put(pane_key(part), bytes);
                            self.stored.insert(part);
                        }
                        None => {
                            if self.stored.remove(&part) {
                                snapshot.delete(pane_key(part));
                            }
                        }
                    }
                }
            }
        }
        // The end of the stream closes every window, and its final watermark is not
        // time a resumed run has reached: it goes on from the last real watermark.
        let watermark = if self.watermark == Watermark::END.millis() {
            self.changes.before_end
        } else {
            self.watermark
        };
        if self.changes.stored_watermark != Some(watermark) {
            snapshot.put(WATERMARK_KEY.to_vec(), watermark.to_be_bytes().to_vec());
        }
        self.changes = PaneChanges {
            stored_watermark: Some(watermark),
            before_end: self.changes.before_end,
            ..PaneChanges::default()
        };
        Ok(snapshot)
    }

    /// The same windows over the panes of `state`, a snapshot [`Panes::snapshot`] wrote.
    /// State batches must have `state_schema` when one is given, and rows waiting to be
    /// folded the schema of their input in `input_schemas`.
    fn restored(
        &self,
        state: &NodeState,
        state_schema: Option<&SchemaRef>,
        input_schemas: &[Option<SchemaRef>],
    ) -> Result<Self, String> {
        let mut restored = Panes::sized(self.size, self.slide, self.inputs);
        let mut parts = Vec::new();
        for (key, value) in state.entries() {
            if key == WATERMARK_KEY {
                let bytes = value
                    .try_into()
                    .map_err(|_| format!("its watermark is {} bytes, not 8", value.len()))?;
                restored.watermark = i64::from_be_bytes(bytes);
                continue;
            }
            let part @ (_, kept, input) = parse_pane_key(key)
                // Only an incremental window (one with a state schema) gathers rows.
                .filter(|&(_, kept, input)| {
                    input < self.inputs && (kept == Kept::Kept || state_schema.is_some())
                })
                .ok_or_else(|| format!("it has an entry this window does not know ({key:?})"))?;
            let (schema, batches) = decode_batches(value)
                .map_err(|error| format!("a pane's rows do not decode: {error}"))?;
            let expected = match kept {
                Kept::Kept => state_schema,
                Kept::Pending => input_schemas.get(input).and_then(Option::as_ref),
            };
            if let Some(expected) = expected
                && !same_columns(&schema, expected)
            {
                let what = match kept {
                    Kept::Kept => "accumulator state",
                    Kept::Pending => "rows waiting to be aggregated",
                };
                return Err(format!(
                    "its {what} have columns {schema:?}, and this version of the query keeps {expected:?}"
                ));
            }
            parts.push((part, batches));
        }
        let mut removed = BTreeSet::new();
        for (part @ (pane, kept, input), batches) in parts {
            restored.stored.insert(part);
            if restored.is_late(pane) {
                // Nothing of it is needed any more: the next snapshot deletes it.
                removed.insert(pane);
                continue;
            }
            restored.add(kept, input, pane, batches);
        }
        restored.changes = PaneChanges {
            stored_watermark: Some(restored.watermark),
            removed,
            ..PaneChanges::default()
        };
        Ok(restored)
    }
}

/// How a windowed transform computes a window's result.
pub(crate) enum WindowQuery {
    /// From accumulator state per pane and group key.
    Incremental(IncrementalPlan),
    /// By running the query over the window's rows.
    Buffered(SqlPlan),
}

/// What a windowed transform is asked to do, besides its query.
pub(crate) struct WindowSettings {
    pub(crate) window: WindowSpec,
    /// The event-time column of each input.
    pub(crate) event_time_columns: Vec<usize>,
    pub(crate) max_state_bytes: usize,
}

/// A running windowed `sql` transform.
pub(crate) struct WindowedSql {
    name: String,
    /// The inputs' names, for messages.
    input_names: Vec<String>,
    query: WindowQuery,
    /// The main port's schema: `window_start`, `window_end`, then the query's columns.
    schema: SchemaRef,
    /// The event-time column of each input.
    event_time_columns: Vec<usize>,
    /// Whether late rows go to the `late` port (one input) or are counted as dropped.
    late_port: bool,
    panes: Panes,
    max_state_bytes: usize,
    state: StateMetrics,
    /// Whether rows are being refused because the state is over `max_state_bytes`;
    /// logged once per episode.
    over_limit: bool,
    /// Where rows the query fails on go, with `on_error: dead_letter`.
    dead_letters: Option<DeadLetters>,
}

impl WindowedSql {
    pub(crate) fn new(
        name: String,
        input_names: Vec<String>,
        query: WindowQuery,
        schema: SchemaRef,
        settings: WindowSettings,
        state: StateMetrics,
        dead_letters: Option<DeadLetters>,
    ) -> Self {
        let WindowSettings {
            window,
            event_time_columns,
            max_state_bytes,
        } = settings;
        let inputs = event_time_columns.len();
        WindowedSql {
            name,
            input_names,
            query,
            schema,
            late_port: inputs == 1,
            panes: Panes::new(window, inputs),
            event_time_columns,
            max_state_bytes,
            state,
            over_limit: false,
            dead_letters,
        }
    }

    /// Keeps rows that fall into the pane starting at `pane`, or routes them as late,
    /// or refuses them while the state is full.
    async fn route(
        &mut self,
        input: usize,
        pane: i64,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.panes.is_late(pane) {
            self.late(batch, out);
            return Ok(());
        }
        if self.panes.bytes >= self.max_state_bytes {
            if !self.over_limit {
                warn!(
                    operator = %self.name,
                    state_bytes = self.panes.bytes,
                    max_state_bytes = self.max_state_bytes,
                    "window state is full: rows are dropped (reason state_limit) until windows close"
                );
                self.over_limit = true;
            }
            out.count_dropped("state_limit", batch.num_rows() as u64);
            return Ok(());
        }
        match &self.query {
            WindowQuery::Buffered(_) => self.panes.insert(input, pane, vec![batch]),
            WindowQuery::Incremental(_) => {
                if self.panes.insert_pending(input, pane, batch) >= MINI_BATCH_ROWS {
                    self.fold(pane, out).await?;
                }
            }
        }
        Ok(())
    }

    /// Folds the rows the pane starting at `pane` gathers into its accumulator state.
    /// With `on_error: dead_letter`, rows the aggregate fails on are isolated and sent
    /// to `dead_letter`, and the rest are folded.
    async fn fold(&mut self, pane: i64, out: &mut Collector) -> Result<(), OperatorError> {
        let WindowQuery::Incremental(plan) = &self.query else {
            return Ok(());
        };
        for (input, batches) in self.panes.take_pending(pane) {
            let Some(schema) = batches.first().map(RecordBatch::schema) else {
                continue;
            };
            let states = match (
                plan.partial(input, batches.clone()).await,
                &self.dead_letters,
            ) {
                (Ok(states), _) => states,
                (Err(error), Some(dead_letters)) if is_data_error(&error) => {
                    let rows = concat_batches(&schema, &batches)?;
                    let isolated = bisect(rows, |part| plan.partial(input, vec![part]))
                        .await
                        .map_err(|error| self.failed_batch(input, pane, error))?;
                    dead_letters.settle(out, input, isolated)?
                }
                (Err(error), _) => return Err(self.failed_batch(input, pane, error)),
            };
            self.panes.insert(0, pane, states);
        }
        self.reduce(pane, REDUCE_AFTER).await
    }

    /// Merges the state batches of `pane` into one per group when at least `at_least`
    /// have gathered since its last merge.
    async fn reduce(&mut self, pane: i64, at_least: usize) -> Result<(), OperatorError> {
        let WindowQuery::Incremental(plan) = &self.query else {
            return Ok(());
        };
        let Some(states) = self.panes.take_for_reduce(pane, at_least) else {
            return Ok(());
        };
        let reduced = plan
            .reduce(states)
            .await
            .map_err(|error| self.failed("merging a pane's state", error))?;
        self.panes.insert(0, pane, reduced);
        if let Some(entry) = self.panes.panes.get_mut(&pane) {
            entry.unreduced = 0;
        }
        Ok(())
    }

    fn failed_batch(&self, input: usize, pane: i64, error: DataFusionError) -> OperatorError {
        let what = format!(
            "a batch of input '{}' at [{}, {})",
            self.input_names.get(input).map_or("?", String::as_str),
            format_millis(pane),
            format_millis(pane.saturating_add(self.panes.pane))
        );
        self.failed(&what, error)
    }

    fn failed(&self, what: &str, error: DataFusionError) -> OperatorError {
        execution_error(&self.name, what, error)
    }

    /// Sends the rows of the window starting at `start` that make the query fail on
    /// their own to `dead_letter`, and keeps the rest in their panes. Each input's rows
    /// are run pane by pane with the other inputs empty, so a failure that only the
    /// combination of inputs causes (a join's condition, say) is not isolated: the
    /// window then fails as with `on_error: fail`.
    async fn isolate_buffered(
        &mut self,
        start: i64,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        let (WindowQuery::Buffered(plan), Some(dead_letters)) = (&self.query, &self.dead_letters)
        else {
            return Ok(());
        };
        let inputs = self.panes.inputs;
        for pane in self.panes.window_panes(start) {
            for input in 0..inputs {
                let batches = self.panes.input_batches(pane, input);
                let Some(first) = batches.first() else {
                    continue;
                };
                let rows = concat_batches(&first.schema(), batches)?;
                let run = |part: RecordBatch| {
                    let mut alone = vec![Vec::new(); inputs];
                    alone[input] = vec![part];
                    async move { plan.execute(&alone).await }
                };
                let isolated = bisect(rows, run)
                    .await
                    .map_err(|error| self.failed_batch(input, pane, error))?;
                if isolated.failed.is_empty() {
                    continue;
                }
                for (rows, error) in &isolated.failed {
                    dead_letters.emit(out, input, rows, error)?;
                }
                let kept = isolated
                    .succeeded
                    .into_iter()
                    .map(|(part, _)| part)
                    .collect();
                self.panes.take_input(pane, input);
                self.panes.insert(input, pane, kept);
            }
        }
        Ok(())
    }

    fn late(&self, batch: RecordBatch, out: &mut Collector) {
        if self.late_port {
            out.emit_to(LATE_PORT, batch);
        } else {
            out.count_dropped("late", batch.num_rows() as u64);
        }
    }

    fn report_state(&mut self) {
        self.state
            .hold(self.panes.rows as i64, self.panes.bytes as i64);
        if self.over_limit && self.panes.bytes < self.max_state_bytes {
            self.over_limit = false;
        }
    }

    /// Computes the window starting at `start` and emits its rows.
    async fn close(&mut self, start: i64, out: &mut Collector) -> Result<(), OperatorError> {
        let end = self.panes.end(start);
        let mut inputs = self.panes.window_batches(start);
        let mut results = match &self.query {
            WindowQuery::Buffered(plan) => plan.execute(&inputs).await,
            WindowQuery::Incremental(plan) => plan.finish(std::mem::take(&mut inputs[0])).await,
        };
        if matches!(self.query, WindowQuery::Buffered(_))
            && self.dead_letters.is_some()
            && results.as_ref().is_err_and(is_data_error)
        {
            // A buffered window's rows first run at the close: find the bad ones now,
            // take them out of their panes (later windows over them must not fail or
            // send them again) and run the window once more over the rest.
            self.isolate_buffered(start, out).await?;
            if let WindowQuery::Buffered(plan) = &self.query {
                results = plan.execute(&self.panes.window_batches(start)).await;
            }
        }
        let results = results.map_err(|error| {
            let what = format!("window [{}, {})", format_millis(start), format_millis(end));
            self.failed(&what, error)
        })?;
        for result in results {
            let rows = result.num_rows();
            if rows == 0 {
                continue;
            }
            let mut columns: Vec<ArrayRef> = Vec::with_capacity(result.num_columns() + 2);
            columns.push(Arc::new(TimestampMillisecondArray::from_value(start, rows)));
            columns.push(Arc::new(TimestampMillisecondArray::from_value(end, rows)));
            columns.extend(result.columns().iter().cloned());
            let batch = RecordBatch::try_new(Arc::clone(&self.schema), columns).map_err(|error| {
                OperatorError::Internal(format!(
                    "sql transform '{}': window result does not match the planned schema: {error}",
                    self.name
                ))
            })?;
            out.emit(batch);
        }
        Ok(())
    }
}

#[async_trait]
impl Transform for WindowedSql {
    async fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        let Some(&column) = self.event_time_columns.get(input) else {
            return Err(OperatorError::Internal(format!(
                "sql transform '{}' received a batch on input {input}, which it does not have",
                self.name
            )));
        };
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let times = batch
            .columns()
            .get(column)
            .and_then(event_times_ms)
            .ok_or_else(|| {
                OperatorError::Internal(format!(
                    "sql transform '{}': event-time column {column} of input {input} is not a timestamp",
                    self.name
                ))
            })?;
        let (batch, times) = if times.null_count() > 0 {
            let valid = is_not_null(&times)?;
            out.count_dropped("null_event_time", times.null_count() as u64);
            let times = filter(&times, &valid)?;
            let times = times
                .as_any()
                .downcast_ref::<Int64Array>()
                .cloned()
                .ok_or_else(|| OperatorError::Internal("filter changed the array type".into()))?;
            (filter_record_batch(&batch, &valid)?, times)
        } else {
            (batch, times)
        };
        let (Some(first), Some(last)) = (min(&times), max(&times)) else {
            return Ok(());
        };
        let (first, last) = (self.panes.pane_of(first), self.panes.pane_of(last));
        if first == last {
            self.route(input, first, batch, out).await?;
            self.report_state();
            return Ok(());
        }
        if self.panes.is_late(last) {
            // Panes ascend, so when the last is late all are: no need to split.
            self.late(batch, out);
            return Ok(());
        }
        let pane_len = self.panes.pane;
        let keys =
            times.unary::<_, weir_engine::arrow::datatypes::Int64Type>(|t| floor_to(t, pane_len));
        let span = (i128::from(last) - i128::from(first)) / i128::from(pane_len) + 1;
        if span <= i128::from(FILTER_SPLIT_MAX_PANES) {
            let mut pane = first;
            loop {
                let mask = eq(&keys, &Int64Array::new_scalar(pane))?;
                if mask.true_count() > 0 {
                    let part = filter_record_batch(&batch, &mask)?;
                    self.route(input, pane, part, out).await?;
                }
                if pane >= last {
                    break;
                }
                pane = pane.saturating_add(pane_len);
            }
        } else {
            // Sort by (pane, arrival position): rows of a pane stay in arrival order.
            let rows = u32::try_from(batch.num_rows()).map_err(|_| {
                OperatorError::User(format!(
                    "sql transform '{}': a batch of {} rows is too large to split into windows",
                    self.name,
                    batch.num_rows()
                ))
            })?;
            let position: ArrayRef = Arc::new(UInt32Array::from_iter_values(0..rows));
            let keys: ArrayRef = Arc::new(keys);
            let indices = lexsort_to_indices(
                &[
                    SortColumn {
                        values: Arc::clone(&keys),
                        options: None,
                    },
                    SortColumn {
                        values: position,
                        options: None,
                    },
                ],
                None,
            )?;
            let sorted = take_record_batch(&batch, &indices)?;
            let sorted_keys = take(keys.as_ref(), &indices, None)?;
            let sorted_keys = sorted_keys
                .as_any()
                .downcast_ref::<Int64Array>()
                .cloned()
                .ok_or_else(|| OperatorError::Internal("take changed the array type".into()))?;
            let ranges = partition(&[Arc::new(sorted_keys.clone()) as ArrayRef])?.ranges();
            for range in ranges {
                let pane = sorted_keys.value(range.start);
                let part = sorted.slice(range.start, range.end - range.start);
                self.route(input, pane, part, out).await?;
            }
        }
        self.report_state();
        Ok(())
    }

    async fn on_watermark(
        &mut self,
        watermark: Watermark,
        out: &mut Collector,
    ) -> Result<(), OperatorError> {
        let closing = self.panes.advance(watermark.millis());
        // The watermark has passed these panes, so their rows are all here (later ones
        // are late): fold what they gathered, as the windows closing now need, and merge
        // their state batches, since hopping windows keep a pane for long and it should
        // hold one state row per key meanwhile.
        for pane in self.panes.complete_with_work() {
            self.fold(pane, out).await?;
            self.reduce(pane, 2).await?;
        }
        if closing.is_empty() {
            self.report_state();
            return Ok(());
        }
        for start in closing {
            self.close(start, out).await?;
        }
        self.panes.evict();
        self.report_state();
        debug!(
            operator = %self.name,
            kept_rows = self.panes.rows,
            kept_bytes = self.panes.bytes,
            panes = self.panes.panes.len(),
            open_windows = self.panes.open.len(),
            "sql windows closed"
        );
        Ok(())
    }

    fn snapshot(&mut self) -> Result<StateChanges, OperatorError> {
        self.panes.snapshot().map_err(|error| {
            OperatorError::Internal(format!(
                "sql transform '{}': its window state does not encode: {error}",
                self.name
            ))
        })
    }

    fn restore(&mut self, state: &NodeState) -> Result<(), OperatorError> {
        let (state_schema, input_schemas) = match &self.query {
            WindowQuery::Incremental(plan) => (Some(plan.state_schema()), plan.input_schemas()),
            WindowQuery::Buffered(_) => (None, Vec::new()),
        };
        self.panes = self
            .panes
            .restored(state, state_schema.as_ref(), &input_schemas)
            .map_err(|reason| {
                OperatorError::User(format!(
                    "sql transform '{}': the checkpointed window state cannot be used: {reason}",
                    self.name
                ))
            })?;
        self.report_state();
        Ok(())
    }

    fn output_watermark(&self, watermark: Watermark) -> Watermark {
        if watermark == Watermark::END {
            return watermark;
        }
        // Results carry their window's start as event time: hold the watermark back to
        // the earliest start still to come, so no result is late downstream.
        Watermark(self.panes.earliest_open_start(watermark.millis())).min(watermark)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn hopping(size_ms: u64, slide_ms: u64) -> WindowSpec {
        WindowSpec::Hopping {
            size: Duration::from_millis(size_ms),
            slide: Duration::from_millis(slide_ms),
        }
    }

    fn one_row() -> RecordBatch {
        let array: ArrayRef = Arc::new(Int64Array::from(vec![1]));
        RecordBatch::try_from_iter([("x", array)]).unwrap()
    }

    #[test]
    fn rounding_helpers_floor_and_ceil_negative_times_too() {
        assert_eq!(
            (floor_to(25, 10), floor_to(-1, 10), floor_to(-10, 10)),
            (20, -10, -10)
        );
        assert_eq!(
            (ceil_to(21, 10), ceil_to(-9, 10), ceil_to(30, 10)),
            (30, 0, 30)
        );
        assert_eq!(floor_to(i64::MIN, 7), i64::MIN);
        assert_eq!(ceil_to(i64::MAX, 10), i64::MAX);
        assert_eq!((gcd(25, 10), gcd(10, 10)), (5, 10));
    }

    #[test]
    fn a_pane_opens_every_window_that_covers_it() {
        let mut panes = Panes::new(hopping(30, 10), 1);
        panes.insert(0, panes.pane_of(25), vec![one_row()]);
        assert_eq!(
            panes.open.iter().copied().collect::<Vec<_>>(),
            vec![0, 10, 20]
        );
        // Windows that do not align with the slide use panes of gcd(size, slide).
        let mut panes = Panes::new(hopping(25, 10), 1);
        assert_eq!(panes.pane, 5);
        panes.insert(0, panes.pane_of(27), vec![one_row()]);
        assert_eq!(panes.open.iter().copied().collect::<Vec<_>>(), vec![10, 20]);
    }

    #[test]
    fn closing_and_eviction_follow_the_watermark() {
        let mut panes = Panes::new(hopping(30, 10), 1);
        panes.insert(0, 0, vec![one_row()]);
        panes.insert(0, 10, vec![one_row()]);
        assert_eq!(panes.advance(29), vec![-20, -10]);
        assert_eq!(panes.advance(30), vec![0]);
        panes.evict();
        // Pane 0 is covered only by windows that closed; pane 10 still feeds [10, 40).
        assert_eq!(panes.panes.keys().copied().collect::<Vec<_>>(), vec![10]);
        assert_eq!(panes.rows, 1);
        assert!(panes.is_late(0));
        assert!(!panes.is_late(10));
        // An older watermark changes nothing.
        assert!(panes.advance(20).is_empty());
        assert_eq!(panes.advance(Watermark::END.millis()), vec![10]);
        panes.evict();
        assert!(panes.panes.is_empty() && panes.open.is_empty() && panes.rows == 0);
    }

    #[test]
    fn a_pane_created_after_some_of_its_windows_closed_opens_only_the_rest() {
        let mut panes = Panes::new(hopping(30, 10), 1);
        panes.advance(35);
        // Pane 20 is covered by [0, 30) (closed), [10, 40) and [20, 50) (open).
        panes.insert(0, 20, vec![one_row()]);
        assert_eq!(panes.open.iter().copied().collect::<Vec<_>>(), vec![10, 20]);
    }
}
