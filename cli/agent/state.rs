//! The agent's memory on disk: the last deployment it applied, so that it boots into it
//! while the hub is out of reach.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use weir_hub::protocol::DesiredState;

/// The file, in the state directory, that holds the applied deployment.
const APPLIED_FILE: &str = "applied.json";

/// The last desired state the agent applied successfully.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// When it was applied, in ms since the Unix epoch.
    pub applied_ms: i64,
    /// The desired state, as the hub sent it.
    pub state: DesiredState,
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating) the state directory.
    pub fn open(dir: &Path) -> Result<StateDir, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the state directory {}: {e}", dir.display()))?;
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The last applied deployment, if there is one. A file that cannot be read is
    /// reported and set aside (renamed `applied.json.bad`), so the agent still starts and
    /// takes what the hub sends.
    pub fn load(&self) -> Option<Applied> {
        let path = self.dir.join(APPLIED_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::error!("cannot read {}: {e}; starting with nothing", path.display());
                return None;
            }
        };
        match serde_json::from_str(&text) {
            Ok(applied) => Some(applied),
            Err(e) => {
                let aside = path.with_extension("json.bad");
                tracing::error!(
                    "{} is not a deployment the agent wrote ({e}); moved to {} and starting \
                     with nothing",
                    path.display(),
                    aside.display()
                );
                let _ = std::fs::rename(&path, &aside);
                None
            }
        }
    }

    /// Stores `applied`, atomically: a power cut leaves the old file or the new one,
    /// never half of one.
    pub fn store(&self, applied: &Applied) -> Result<(), String> {
        let path = self.dir.join(APPLIED_FILE);
        let temporary = self.dir.join(format!("{APPLIED_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(applied)
            .map_err(|e| format!("cannot encode the applied deployment: {e}"))?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            // The rename is durable once the directory is.
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_hub::protocol::{DesiredDeployment, PipelineDocument};

    #[test]
    fn the_applied_deployment_survives_a_restart_and_garbage_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        assert_eq!(state.load(), None);
        let applied = Applied {
            applied_ms: 1,
            state: DesiredState {
                etag: "r7".to_owned(),
                deployment: Some(DesiredDeployment {
                    name: "d".to_owned(),
                    version: 2,
                    revision: 7,
                    pipelines: vec![PipelineDocument {
                        name: "p".to_owned(),
                        yaml: "version: 1\n".to_owned(),
                    }],
                }),
            },
        };
        state.store(&applied).unwrap();
        let reopened = StateDir::open(&dir.path().join("state")).unwrap();
        assert_eq!(reopened.load(), Some(applied));

        std::fs::write(dir.path().join("state/applied.json"), "{ not json").unwrap();
        assert_eq!(reopened.load(), None);
        assert!(dir.path().join("state/applied.json.bad").exists());
        assert_eq!(reopened.load(), None);
    }
}
