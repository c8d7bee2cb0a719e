//! The local state store: the last complete checkpoint of one pipeline, in one redb file.
//!
//! The file holds one checkpoint at a time. Committing epoch `N` applies every node's
//! changes and the new epoch number in one write transaction, so a crash leaves epoch
//! `N - 1` or `N`, never a mix, and the older epoch is gone once the newer is in.
//! Unchanged parts of a node's state are not written again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Epoch, NodeState, StateChanges};

/// Every node's state: (node, part key) to bytes.
const STATE: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("state");
/// Each node's fingerprint (kind and config) when its state was taken.
const NODES: TableDefinition<&str, &str> = TableDefinition::new("nodes");
/// The epoch and when it completed.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const EPOCH: &str = "epoch";
const COMPLETED_AT_MS: &str = "completed_at_ms";
const FINISHED: &str = "finished";

/// Why the state store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("state store {path}: {message}")]
pub struct StoreError {
    /// The store's file.
    pub path: PathBuf,
    /// What failed.
    pub message: String,
}

/// A complete checkpoint as stored.
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    /// Its epoch.
    pub epoch: Epoch,
    /// When it completed, in milliseconds since the Unix epoch.
    pub completed_at_ms: u64,
    /// Whether it was taken when every source had ended on its own, so the run is over
    /// and the next one starts afresh.
    pub finished: bool,
    /// Each node's fingerprint and state.
    pub nodes: BTreeMap<String, (String, NodeState)>,
}

/// One node's share of a store, for `weir state inspect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSummary {
    /// The node.
    pub node: String,
    /// How many parts its state has.
    pub parts: u64,
    /// Their bytes, keys included.
    pub bytes: u64,
}

/// What a store holds, for `weir state inspect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreSummary {
    /// The last complete epoch (0: none yet).
    pub epoch: Epoch,
    /// When it completed, in milliseconds since the Unix epoch.
    pub completed_at_ms: u64,
    /// Whether the run it belongs to had finished.
    pub finished: bool,
    /// The size of the file.
    pub file_bytes: u64,
    /// Per node, in name order.
    pub nodes: Vec<NodeSummary>,
}

/// A store found damaged and moved aside.
#[derive(Clone, Debug)]
pub struct Damaged {
    /// Where the damaged file now is.
    pub moved_to: PathBuf,
    /// What was wrong with it.
    pub reason: String,
}

/// One pipeline's state store.
pub struct StateStore {
    db: Database,
    path: PathBuf,
}

/// A store opened, with what it held and whether it had to be replaced.
pub struct Opened {
    /// The store, ready for commits.
    pub store: StateStore,
    /// Its last complete checkpoint, if it has one.
    pub checkpoint: Option<Checkpoint>,
    /// Set when the file could not be read: it was moved aside and this store is new.
    pub damaged: Option<Damaged>,
}

/// Why a store did not open as it is.
enum OpenFailure {
    /// This process has it open already.
    InUse,
    /// It cannot be read: the reason.
    Damaged(String),
}

/// How often, and how long apart, opening a store that is still in use is tried again.
const IN_USE_RETRIES: usize = 40;
const IN_USE_WAIT: Duration = Duration::from_millis(50);

impl StateStore {
    /// Opens (or creates) the store at `path` and reads its last checkpoint. A file
    /// that cannot be read is moved aside to `PATH.damaged-MS` and a new, empty store
    /// takes its place: a damaged store never stops a pipeline from starting.
    pub fn open(path: &Path) -> Result<Opened, StoreError> {
        let error = |message: String| StoreError {
            path: path.to_owned(),
            message,
        };
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| error(format!("cannot create {}: {e}", dir.display())))?;
        }
        // A run of the same pipeline that was just stopped may still be closing it (its
        // coordinator ends once its operators have): wait a little rather than take an
        // open file for a damaged one.
        let mut opened = Self::open_intact(path);
        for _ in 0..IN_USE_RETRIES {
            if !matches!(opened, Err(OpenFailure::InUse)) {
                break;
            }
            std::thread::sleep(IN_USE_WAIT);
            opened = Self::open_intact(path);
        }
        match opened {
            Ok((store, checkpoint)) => Ok(Opened {
                store,
                checkpoint,
                damaged: None,
            }),
            Err(OpenFailure::InUse) => Err(error(
                "another run of the pipeline still has it open".to_owned(),
            )),
            Err(OpenFailure::Damaged(reason)) => {
                let mut moved_to = path.as_os_str().to_owned();
                moved_to.push(format!(".damaged-{}", now_ms()));
                let moved_to = PathBuf::from(moved_to);
                std::fs::rename(path, &moved_to).map_err(|e| {
                    error(format!(
                        "it cannot be read ({reason}) and cannot be moved aside: {e}"
                    ))
                })?;
                let (store, _) = Self::open_intact(path).map_err(|failure| match failure {
                    OpenFailure::InUse => error("it is in use".to_owned()),
                    OpenFailure::Damaged(reason) => error(reason),
                })?;
                Ok(Opened {
                    store,
                    checkpoint: None,
                    damaged: Some(Damaged { moved_to, reason }),
                })
            }
        }
    }

    /// Opens the file and reads it whole; any failure, or a panic in the database,
    /// means it is damaged.
    fn open_intact(path: &Path) -> Result<(StateStore, Option<Checkpoint>), OpenFailure> {
        let owned = path.to_owned();
        let opened = std::panic::catch_unwind(move || {
            let db = Database::create(&owned).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => OpenFailure::InUse,
                other => OpenFailure::Damaged(other.to_string()),
            })?;
            let store = StateStore { db, path: owned };
            let checkpoint = store.read().map_err(|e| OpenFailure::Damaged(e.message))?;
            Ok::<_, OpenFailure>((store, checkpoint))
        });
        opened.unwrap_or_else(|_| {
            Err(OpenFailure::Damaged(
                "the database panicked while reading it".into(),
            ))
        })
    }

    /// What the store at `path` holds, without moving a damaged file aside.
    pub fn inspect(path: &Path) -> Result<StoreSummary, StoreError> {
        let error = |message: String| StoreError {
            path: path.to_owned(),
            message,
        };
        let db = Database::open(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                error("a running weir has it open; ask its local API (weir status) instead".into())
            }
            other => error(other.to_string()),
        })?;
        StateStore {
            db,
            path: path.to_owned(),
        }
        .summary()
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, error: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            message: error.to_string(),
        }
    }

    /// The last complete checkpoint, if any.
    pub fn read(&self) -> Result<Option<Checkpoint>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let meta = match txn.open_table(META) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.error(e)),
        };
        let get = |key: &str| -> Result<u64, StoreError> {
            Ok(meta
                .get(key)
                .map_err(|e| self.error(e))?
                .map_or(0, |value| value.value()))
        };
        let epoch = get(EPOCH)?;
        if epoch == 0 {
            return Ok(None);
        }
        let mut checkpoint = Checkpoint {
            epoch,
            completed_at_ms: get(COMPLETED_AT_MS)?,
            finished: get(FINISHED)? != 0,
            nodes: BTreeMap::new(),
        };
        let nodes = txn.open_table(NODES).map_err(|e| self.error(e))?;
        for row in nodes.iter().map_err(|e| self.error(e))? {
            let (node, fingerprint) = row.map_err(|e| self.error(e))?;
            checkpoint.nodes.insert(
                node.value().to_owned(),
                (fingerprint.value().to_owned(), NodeState::default()),
            );
        }
        let state = txn.open_table(STATE).map_err(|e| self.error(e))?;
        let mut parts: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>> = BTreeMap::new();
        for row in state.iter().map_err(|e| self.error(e))? {
            let (key, value) = row.map_err(|e| self.error(e))?;
            let (node, part) = key.value();
            parts
                .entry(node.to_owned())
                .or_default()
                .insert(part.to_vec(), value.value().to_vec());
        }
        for (node, entries) in parts {
            if let Some((_, state)) = checkpoint.nodes.get_mut(&node) {
                *state = NodeState::from_entries(entries);
            }
        }
        Ok(Some(checkpoint))
    }

    /// Makes `epoch` the store's checkpoint: applies each node's changes and records its
    /// fingerprint, drops the state of every node not in `nodes`, all in one durable
    /// transaction. Returns the bytes written.
    pub fn commit(
        &self,
        epoch: Epoch,
        nodes: &[(&str, &str, &StateChanges)],
        finished: bool,
    ) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        let mut written = 0;
        {
            let mut state = txn.open_table(STATE).map_err(|e| self.error(e))?;
            let mut fingerprints = txn.open_table(NODES).map_err(|e| self.error(e))?;
            let stale: Vec<String> = fingerprints
                .iter()
                .map_err(|e| self.error(e))?
                .filter_map(Result::ok)
                .map(|(node, _)| node.value().to_owned())
                .filter(|node| !nodes.iter().any(|(name, _, _)| name == node))
                .collect();
            for node in &stale {
                fingerprints
                    .remove(node.as_str())
                    .map_err(|e| self.error(e))?;
                remove_node(&mut state, node).map_err(|e| self.error(e))?;
            }
            for (node, fingerprint, changes) in nodes {
                fingerprints
                    .insert(*node, *fingerprint)
                    .map_err(|e| self.error(e))?;
                if changes.replace {
                    remove_node(&mut state, node).map_err(|e| self.error(e))?;
                }
                for (key, value) in &changes.entries {
                    match value {
                        Some(value) => {
                            state
                                .insert((*node, key.as_slice()), value.as_slice())
                                .map_err(|e| self.error(e))?;
                        }
                        None => {
                            state
                                .remove((*node, key.as_slice()))
                                .map_err(|e| self.error(e))?;
                        }
                    }
                }
                written += changes.bytes();
            }
            let mut meta = txn.open_table(META).map_err(|e| self.error(e))?;
            meta.insert(EPOCH, epoch).map_err(|e| self.error(e))?;
            meta.insert(COMPLETED_AT_MS, now_ms())
                .map_err(|e| self.error(e))?;
            meta.insert(FINISHED, u64::from(finished))
                .map_err(|e| self.error(e))?;
        }
        txn.commit().map_err(|e| self.error(e))?;
        Ok(written)
    }

    /// Removes every checkpoint: the next start is fresh.
    pub fn clear(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        txn.delete_table(STATE).map_err(|e| self.error(e))?;
        txn.delete_table(NODES).map_err(|e| self.error(e))?;
        txn.delete_table(META).map_err(|e| self.error(e))?;
        txn.commit().map_err(|e| self.error(e))
    }

    /// What the store holds, per node.
    pub fn summary(&self) -> Result<StoreSummary, StoreError> {
        let checkpoint = self.read()?.unwrap_or_default();
        let nodes = checkpoint
            .nodes
            .iter()
            .map(|(node, (_, state))| NodeSummary {
                node: node.clone(),
                parts: state.entries().count() as u64,
                bytes: state
                    .entries()
                    .map(|(key, value)| (key.len() + value.len()) as u64)
                    .sum(),
            })
            .collect();
        Ok(StoreSummary {
            epoch: checkpoint.epoch,
            completed_at_ms: checkpoint.completed_at_ms,
            finished: checkpoint.finished,
            file_bytes: std::fs::metadata(&self.path).map_or(0, |meta| meta.len()),
            nodes,
        })
    }
}

/// Removes every part of `node`'s state.
fn remove_node(
    state: &mut redb::Table<'_, (&'static str, &'static [u8]), &'static [u8]>,
    node: &str,
) -> Result<(), redb::StorageError> {
    let keys: Vec<Vec<u8>> = state
        .range((node, &[][..])..)?
        .map_while(|row| {
            let (key, _) = row.ok()?;
            let (owner, part) = key.value();
            (owner == node).then(|| part.to_vec())
        })
        .collect();
    for key in keys {
        state.remove((node, key.as_slice()))?;
    }
    Ok(())
}

pub(crate) fn now_ms() -> u64 {
    // The wall clock reads 0 before the epoch, so this never falls back.
    u64::try_from(crate::time::wall_clock_ms()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(entries: &[(&str, Option<&str>)], replace: bool) -> StateChanges {
        let mut changes = if replace {
            StateChanges::cleared()
        } else {
            StateChanges::unchanged()
        };
        for (key, value) in entries {
            match value {
                Some(value) => changes.put(key.as_bytes().to_vec(), value.as_bytes().to_vec()),
                None => changes.delete(key.as_bytes().to_vec()),
            }
        }
        changes
    }

    #[test]
    fn a_commit_applies_changes_over_the_last_epoch_and_drops_nodes_that_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.redb");
        let opened = StateStore::open(&path).unwrap();
        assert!(opened.checkpoint.is_none() && opened.damaged.is_none());
        let store = opened.store;
        let first = changes(&[("1", Some("a")), ("2", Some("b"))], false);
        let gone = StateChanges::whole(b"x".to_vec());
        store
            .commit(1, &[("w", "f1", &first), ("old", "f0", &gone)], false)
            .unwrap();
        let second = changes(&[("1", None), ("3", Some("c"))], false);
        store.commit(2, &[("w", "f1", &second)], false).unwrap();
        drop(store);

        let reopened = StateStore::open(&path).unwrap();
        let checkpoint = reopened.checkpoint.unwrap();
        assert_eq!(checkpoint.epoch, 2);
        assert_eq!(checkpoint.nodes.len(), 1, "{:?}", checkpoint.nodes);
        let (fingerprint, state) = &checkpoint.nodes["w"];
        assert_eq!(fingerprint, "f1");
        let parts: Vec<_> = state
            .entries()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(
            parts,
            [
                (b"2".to_vec(), b"b".to_vec()),
                (b"3".to_vec(), b"c".to_vec())
            ]
        );
        let summary = reopened.store.summary().unwrap();
        assert_eq!(summary.epoch, 2);
        assert_eq!(summary.nodes[0].parts, 2);

        reopened.store.clear().unwrap();
        assert!(reopened.store.read().unwrap().is_none());
    }

    #[test]
    fn a_damaged_file_is_moved_aside_and_a_fresh_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.redb");
        std::fs::write(&path, b"this is not a database").unwrap();
        let opened = StateStore::open(&path).unwrap();
        let damaged = opened.damaged.expect("reported as damaged");
        assert!(damaged.moved_to.exists());
        assert!(opened.checkpoint.is_none());
        opened
            .store
            .commit(1, &[("n", "f", &StateChanges::whole(vec![1]))], false)
            .unwrap();
    }

    #[test]
    fn a_store_still_open_is_waited_for_and_never_taken_for_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.redb");
        let first = StateStore::open(&path).unwrap();
        first
            .store
            .commit(3, &[("n", "f", &StateChanges::whole(vec![7]))], false)
            .unwrap();
        let error = StateStore::open(&path).err().expect("in use");
        assert!(error.to_string().contains("still has it open"), "{error}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "nothing moved aside"
        );
        // Closed while the next run waits: it opens, with the checkpoint.
        let closing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let second = StateStore::open(&path).unwrap();
        closing.join().unwrap();
        assert!(second.damaged.is_none());
        assert_eq!(second.checkpoint.map(|c| c.epoch), Some(3));
    }
}
