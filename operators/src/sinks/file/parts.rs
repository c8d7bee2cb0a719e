//! Parts committed per checkpoint: how the `file` sink writes Parquet, and any rotating
//! output, when its pipeline checkpoints.
//!
//! A Parquet file cannot be cut back to a checkpoint and written on (its footer ends
//! it), so under checkpoints each path is written as numbered parts, as Flink's file
//! sink rolls bulk formats on every checkpoint: `out/r.parquet` becomes
//! `out/r-00000.parquet`, `out/r-00001.parquet`, … A part is written under a hidden
//! `.NAME.inprogress` name, finished (footer, fsync) at the barrier that follows its rows
//! or when its rotation is due, and renamed to its final name only once that barrier's
//! checkpoint has completed. The checkpoint lists the finished parts not yet renamed, so
//! a restart renames those of completed checkpoints and deletes any other in-progress
//! part, whose rows the replay writes again: every row lands in exactly one final part.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{debug, warn};
use weir_engine::OperatorError;
use weir_engine::checkpoint::{Epoch, NodeState, StateChanges};

use super::RotateConfig;

/// The prefix of a finished, not yet renamed part's key in the sink's checkpointed
/// state; its in-progress path follows. The value is its epoch (8 bytes) and final path.
const PART_KEY: &[u8] = b"part/";

/// Part `number` of `path`: (where it is written, its final name).
pub(super) fn part_paths(path: &Path, number: u64) -> (PathBuf, PathBuf) {
    let (stem, ext) = name_parts(path);
    let finished = path.with_file_name(format!("{stem}-{number:05}{ext}"));
    let in_progress = path.with_file_name(format!(".{stem}-{number:05}{ext}.inprogress"));
    (in_progress, finished)
}

/// The file stem of `path` and its extension with the dot (or nothing).
fn name_parts(path: &Path) -> (String, String) {
    let stem = path
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let ext = path
        .extension()
        .map_or_else(String::new, |e| format!(".{}", e.to_string_lossy()));
    (stem, ext)
}

fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// The parts of `path` in its directory: (number, whether finished, file). Blocking.
fn existing_parts(path: &Path) -> Vec<(u64, bool, PathBuf)> {
    let (stem, ext) = name_parts(path);
    let dir = directory_of(path);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let finished_prefix = format!("{stem}-");
    let in_progress_prefix = format!(".{stem}-");
    let in_progress_suffix = format!("{ext}.inprogress");
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let name = name.to_str()?;
            let (number, finished) = if let Some(rest) = name.strip_prefix(&in_progress_prefix) {
                (rest.strip_suffix(&in_progress_suffix)?, false)
            } else {
                (
                    name.strip_prefix(&finished_prefix)?.strip_suffix(&ext)?,
                    true,
                )
            };
            let number = number.parse::<u64>().ok()?;
            Some((number, finished, dir.join(name)))
        })
        .collect()
}

/// The number the next part of `path` gets: past every finished part in its directory,
/// so a restart never overwrites one. Blocking.
pub(super) fn next_part_number(path: &Path) -> u64 {
    existing_parts(path)
        .into_iter()
        .filter(|(_, finished, _)| *finished)
        .map(|(number, ..)| number + 1)
        .max()
        .unwrap_or(0)
}

/// The part being written for one path.
struct Current {
    in_progress: PathBuf,
    finished: PathBuf,
    opened: Instant,
    rows: u64,
}

/// A part finished but not yet renamed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Sealed {
    /// The checkpoint whose barrier followed its rows; `None` until that barrier comes.
    epoch: Option<Epoch>,
    in_progress: PathBuf,
    finished: PathBuf,
}

/// Every path's parts: the one being written, and those finished but not yet renamed.
#[derive(Default)]
pub(super) struct Parts {
    current: HashMap<PathBuf, Current>,
    /// The number each path's next part gets.
    next: HashMap<PathBuf, u64>,
    sealed: Vec<Sealed>,
}

impl Parts {
    /// The in-progress file that rows for `path` go to, starting its next part if none
    /// is being written. The first time a path is seen, its in-progress parts that no
    /// checkpoint lists are deleted: a crash cut them off, and their rows come again.
    /// Blocking.
    pub(super) fn current(&mut self, path: &Path) -> PathBuf {
        if let Some(current) = self.current.get(path) {
            return current.in_progress.clone();
        }
        let number = match self.next.get(path) {
            Some(&number) => number,
            None => {
                let sealed: HashSet<&Path> = self
                    .sealed
                    .iter()
                    .map(|s| s.in_progress.as_path())
                    .collect();
                let mut number = 0;
                for (found, finished, file) in existing_parts(path) {
                    if finished || sealed.contains(file.as_path()) {
                        number = number.max(found + 1);
                    } else {
                        match std::fs::remove_file(&file) {
                            Ok(()) => debug!(
                                "file sink: removed {}, cut off by a crash; its rows are written again",
                                file.display()
                            ),
                            Err(error) => {
                                warn!("file sink: cannot remove {}: {error}", file.display())
                            }
                        }
                    }
                }
                number
            }
        };
        self.next.insert(path.to_owned(), number + 1);
        let (in_progress, finished) = part_paths(path, number);
        self.current.insert(
            path.to_owned(),
            Current {
                in_progress: in_progress.clone(),
                finished,
                opened: Instant::now(),
                rows: 0,
            },
        );
        in_progress
    }

    /// `rows` more were written into the part of `path`.
    pub(super) fn wrote(&mut self, path: &Path, rows: usize) {
        if let Some(current) = self.current.get_mut(path) {
            current.rows += rows as u64;
        }
    }

    /// The paths whose part `rotate` says to finish, given each in-progress file's size.
    pub(super) fn due(
        &self,
        rotate: Option<&RotateConfig>,
        size_of: impl Fn(&Path) -> u64,
    ) -> Vec<PathBuf> {
        let Some(rotate) = rotate else {
            return Vec::new();
        };
        self.current
            .iter()
            .filter(|(_, current)| {
                current.rows > 0
                    && (rotate
                        .max_bytes
                        .is_some_and(|max| size_of(&current.in_progress) >= max.0)
                        || rotate.interval.is_some_and(|every| {
                            current.opened.elapsed() >= std::time::Duration::from(every)
                        }))
            })
            .map(|(path, _)| path.clone())
            .collect()
    }

    /// The paths whose part holds rows: what a barrier finishes.
    pub(super) fn with_rows(&self) -> Vec<PathBuf> {
        self.current
            .iter()
            .filter(|(_, current)| current.rows > 0)
            .map(|(path, _)| path.clone())
            .collect()
    }

    /// Every path with a part being written.
    pub(super) fn all(&self) -> Vec<PathBuf> {
        self.current.keys().cloned().collect()
    }

    /// Ends the part of `path` (its writer was closed and its file made durable): it
    /// waits for its barrier and checkpoint to be renamed.
    pub(super) fn seal(&mut self, path: &Path) {
        if let Some(current) = self.current.remove(path) {
            self.sealed.push(Sealed {
                epoch: None,
                in_progress: current.in_progress,
                finished: current.finished,
            });
        }
    }

    /// The in-progress file of the part of `path`, if one is being written.
    pub(super) fn in_progress(&self, path: &Path) -> Option<PathBuf> {
        self.current.get(path).map(|c| c.in_progress.clone())
    }

    /// Barrier `epoch` has come: the parts finished before it are its, and the
    /// checkpoint lists every part not yet renamed.
    pub(super) fn snapshot(&mut self, epoch: Epoch) -> StateChanges {
        for sealed in &mut self.sealed {
            sealed.epoch.get_or_insert(epoch);
        }
        let mut changes = StateChanges::cleared();
        for sealed in &self.sealed {
            let key = [PART_KEY, sealed.in_progress.as_os_str().as_bytes()].concat();
            let mut value = sealed.epoch.unwrap_or(epoch).to_be_bytes().to_vec();
            value.extend_from_slice(sealed.finished.as_os_str().as_bytes());
            changes.put(key, value);
        }
        changes
    }

    /// Checkpoint `epoch` is complete: its parts, and earlier ones, take their final
    /// names, and the renames are made durable. Blocking.
    pub(super) fn commit(&mut self, epoch: Epoch) -> Result<(), OperatorError> {
        let (done, waiting): (Vec<Sealed>, Vec<Sealed>) = std::mem::take(&mut self.sealed)
            .into_iter()
            .partition(|sealed| sealed.epoch.is_some_and(|e| e <= epoch));
        self.sealed = waiting;
        let mut directories = BTreeSet::new();
        for (index, sealed) in done.iter().enumerate() {
            if let Err(error) = publish(&sealed.in_progress, &sealed.finished) {
                // What is left is renamed at the next commit, or by a restart.
                self.sealed.extend(done[index..].iter().cloned());
                return Err(error);
            }
            directories.insert(directory_of(&sealed.finished).to_owned());
        }
        sync_directories(&directories)
    }

    /// Renames the parts a checkpoint lists: all of them belong to complete
    /// checkpoints. Blocking.
    pub(super) fn recover(state: &NodeState) -> Result<usize, String> {
        let mut listed = Vec::new();
        for (key, value) in state.entries() {
            let (Some(in_progress), Some((_, finished))) =
                (key.strip_prefix(PART_KEY), value.split_first_chunk::<8>())
            else {
                return Err("its checkpointed state has an entry it does not know".to_owned());
            };
            listed.push((
                PathBuf::from(std::ffi::OsStr::from_bytes(in_progress)),
                PathBuf::from(std::ffi::OsStr::from_bytes(finished)),
            ));
        }
        let mut directories = BTreeSet::new();
        for (in_progress, finished) in &listed {
            if in_progress.exists() {
                publish(in_progress, finished).map_err(|e| e.to_string())?;
            } else if !finished.exists() {
                warn!(
                    "file sink: {} is gone since the checkpoint that finished it",
                    in_progress.display()
                );
            }
            directories.insert(directory_of(finished).to_owned());
        }
        sync_directories(&directories).map_err(|e| e.to_string())?;
        Ok(listed.len())
    }
}

/// Gives a finished part its final name. Blocking.
fn publish(in_progress: &Path, finished: &Path) -> Result<(), OperatorError> {
    std::fs::rename(in_progress, finished).map_err(|e| {
        OperatorError::io(
            format!(
                "cannot rename {} to {}",
                in_progress.display(),
                finished.display()
            ),
            e,
        )
    })?;
    debug!("file sink: finished part {}", finished.display());
    Ok(())
}

/// Makes renames in `directories` durable. Blocking.
fn sync_directories(directories: &BTreeSet<PathBuf>) -> Result<(), OperatorError> {
    for dir in directories {
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| OperatorError::io(format!("cannot fsync {}", dir.display()), e))?;
    }
    Ok(())
}
