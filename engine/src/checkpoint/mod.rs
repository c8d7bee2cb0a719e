//! Checkpoints: consistent snapshots of a running pipeline, taken with barriers in band.
//!
//! The [coordinator](coordinator) asks the sources for epoch `N` every
//! `checkpoint.interval`. Each source records its position and sends barrier `N` after
//! the batches it already emitted; every operator snapshots its state when barrier `N`
//! has arrived on all of its inputs (the input merger aligns them) and passes it on;
//! each sink makes what it wrote before the barrier durable and reports. When every node
//! has reported, the epoch's state is written to the [store](store) in one transaction
//! and the epoch is *complete*: sources may then commit outside (MQTT acknowledgements),
//! and a restart resumes from it. Between two complete epochs, nothing the pipeline did
//! is promised; recovery replays it from the sources' positions.
//!
//! State is key-value per node, so an operator whose state has parts (a window's panes)
//! writes only the parts that changed ([`StateChanges`]).

pub mod coordinator;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;

pub use coordinator::CheckpointMetrics;
pub use store::{Checkpoint, Damaged, NodeSummary, Opened, StateStore, StoreError, StoreSummary};

/// A checkpoint's number. Epochs rise by one; a restored pipeline goes on from the
/// epoch it restored.
pub type Epoch = u64;

/// How often a pipeline checkpoints when its YAML does not say (`checkpoint.interval`).
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// What changed in one node's state since its previous snapshot.
///
/// A node with one piece of state replaces it whole ([`StateChanges::whole`]); a node
/// whose state is many parts puts and deletes only the parts that changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateChanges {
    /// The node's earlier state is dropped before these entries apply.
    pub(crate) replace: bool,
    /// Keys to set (`Some`) or remove (`None`).
    pub(crate) entries: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl StateChanges {
    /// Nothing changed.
    pub fn unchanged() -> Self {
        Self::default()
    }

    /// The node's whole state is `value` (under the empty key), replacing what it had.
    pub fn whole(value: Vec<u8>) -> Self {
        let mut changes = StateChanges {
            replace: true,
            entries: BTreeMap::new(),
        };
        changes.entries.insert(Vec::new(), Some(value));
        changes
    }

    /// The node's state is now empty.
    pub fn cleared() -> Self {
        StateChanges {
            replace: true,
            entries: BTreeMap::new(),
        }
    }

    /// Sets the part `key` to `value`.
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.entries.insert(key, Some(value));
    }

    /// Removes the part `key`.
    pub fn delete(&mut self, key: Vec<u8>) {
        self.entries.insert(key, None);
    }

    /// Whether applying these changes would leave the state as it is.
    pub fn is_unchanged(&self) -> bool {
        !self.replace && self.entries.is_empty()
    }

    /// Folds `later` into these changes, as if both had been applied in turn.
    pub(crate) fn then(&mut self, later: StateChanges) {
        if later.replace {
            *self = later;
        } else {
            self.entries.extend(later.entries);
        }
    }

    /// How many parts these changes put or delete.
    pub fn parts(&self) -> usize {
        self.entries.len()
    }

    /// The bytes these changes write.
    pub fn bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|(key, value)| (key.len() + value.as_ref().map_or(0, Vec::len)) as u64)
            .sum()
    }
}

/// One node's state as the last complete checkpoint left it: its parts by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl NodeState {
    /// A state of these parts.
    pub fn from_entries(entries: BTreeMap<Vec<u8>, Vec<u8>>) -> Self {
        NodeState { entries }
    }

    /// The whole state of a node that keeps one piece ([`StateChanges::whole`]).
    pub fn whole(&self) -> Option<&[u8]> {
        self.entries.get(&[][..]).map(Vec::as_slice)
    }

    /// Every part, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries
            .iter()
            .map(|(key, value)| (key.as_slice(), value.as_slice()))
    }

    /// Whether the node had no state.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Applies `changes`, as the store does when their epoch commits.
    pub fn apply(&mut self, changes: &StateChanges) {
        if changes.replace {
            self.entries.clear();
        }
        for (key, value) in &changes.entries {
            match value {
                Some(value) => self.entries.insert(key.clone(), value.clone()),
                None => self.entries.remove(key),
            };
        }
    }
}

/// `batches` (all of `schema`) as one Arrow IPC stream: how operators put rows or
/// accumulator state into a snapshot.
pub fn encode_batches(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new(&mut out, schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    drop(writer);
    Ok(out)
}

/// The schema and batches of an IPC stream [`encode_batches`] wrote.
pub fn decode_batches(bytes: &[u8]) -> Result<(SchemaRef, Vec<RecordBatch>), ArrowError> {
    let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    let schema = Arc::clone(&reader.schema());
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// The newest complete epoch once it is past `after`, from a receiver of complete
/// epochs ([`crate::SourceContext::completed_epochs`]); never resolves without one, or
/// once the pipeline's checkpoints have stopped.
pub async fn completed_after(
    completed: &mut Option<tokio::sync::watch::Receiver<Epoch>>,
    after: Epoch,
) -> Epoch {
    let Some(receiver) = completed.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        let epoch = *receiver.borrow_and_update();
        if epoch > after {
            return epoch;
        }
        if receiver.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// How a pipeline checkpoints: where, how often, and what it starts from.
pub struct CheckpointSettings {
    /// The pipeline's state store.
    pub store: Arc<StateStore>,
    /// Time from one checkpoint's start to the next one's.
    pub interval: Duration,
    /// The last complete checkpoint, restored at start (`None`: start fresh).
    pub restored: Option<Checkpoint>,
    /// The pipeline's checkpoint series.
    pub metrics: CheckpointMetrics,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_changes_fold_over_earlier_ones_and_a_replacement_wins() {
        let mut changes = StateChanges::unchanged();
        changes.put(b"a".to_vec(), b"1".to_vec());
        changes.put(b"b".to_vec(), b"2".to_vec());
        let mut later = StateChanges::unchanged();
        later.delete(b"a".to_vec());
        later.put(b"c".to_vec(), b"3".to_vec());
        changes.then(later);
        let mut state = NodeState::from_entries([(b"z".to_vec(), b"0".to_vec())].into());
        state.apply(&changes);
        let keys: Vec<_> = state
            .entries()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(
            keys,
            [
                (b"b".to_vec(), b"2".to_vec()),
                (b"c".to_vec(), b"3".to_vec()),
                (b"z".to_vec(), b"0".to_vec())
            ]
        );
        changes.then(StateChanges::whole(b"w".to_vec()));
        state.apply(&changes);
        assert_eq!(state.whole(), Some(&b"w"[..]));
        assert_eq!(state.entries().count(), 1);
    }
}
