//! Assignments an agent accepted, kept in its state directory so that a restarted
//! agent knows the spec, owner and epoch of the Podman pods it finds.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use crate::wire::{Epoch, PodUid, SignedAssignment};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredAssignment {
    /// The owner's signed assignment: who owns the pod, at which epoch.
    pub statement: SignedAssignment,
    pub pod: Pod,
}

impl StoredAssignment {
    pub fn epoch(&self) -> Epoch {
        self.statement.epoch
    }
}

#[derive(Debug, thiserror::Error)]
#[error("assignment store {path}")]
pub struct StoreError {
    path: PathBuf,
    source: std::io::Error,
}

/// One JSON file per pod UID under `<state dir>/assignments`.
#[derive(Debug, Clone)]
pub struct AssignmentStore {
    dir: PathBuf,
}

impl AssignmentStore {
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let dir = state_dir.join("assignments");
        // Assignments hold env values taken from secrets.
        create_private_dir(&dir).map_err(|source| StoreError {
            path: dir.clone(),
            source,
        })?;
        Ok(AssignmentStore { dir })
    }

    fn path(&self, uid: &PodUid) -> PathBuf {
        self.dir.join(format!("{}.json", uid.file_name()))
    }

    pub async fn save(
        &self,
        uid: &PodUid,
        statement: &SignedAssignment,
        pod: &Pod,
    ) -> Result<(), StoreError> {
        let path = self.path(uid);
        let err = |source| StoreError {
            path: path.clone(),
            source,
        };
        let record = StoredAssignment {
            statement: statement.clone(),
            pod: pod.clone(),
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| err(e.into()))?;
        let tmp = path.with_extension("json.tmp");
        tokio::fs::write(&tmp, bytes).await.map_err(err)?;
        tokio::fs::rename(&tmp, &path).await.map_err(err)
    }

    /// The stored assignment, or None if there is none or it cannot be read.
    pub async fn load(&self, uid: &PodUid) -> Option<StoredAssignment> {
        let path = self.path(uid);
        let bytes = tokio::fs::read(&path).await.ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(record) => Some(record),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable assignment record");
                None
            }
        }
    }

    pub async fn remove(&self, uid: &PodUid) {
        let _ = tokio::fs::remove_file(self.path(uid)).await;
    }
}

/// Creates `dir` (and its parents) and makes it accessible to its owner only.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn saves_loads_and_never_escapes_its_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = AssignmentStore::open(dir.path()).expect("opens");
        let owner = libp2p::PeerId::random();
        for uid in ["a1b2-c3", "../../etc/passwd", ""] {
            let uid = PodUid(uid.into());
            let statement = SignedAssignment {
                owner: crate::wire::PeerRef(owner),
                agent: crate::wire::PeerRef(libp2p::PeerId::random()),
                pod: uid.clone(),
                epoch: Epoch(4),
                spec_digest: String::new(),
                expires_at: 0,
                signature: String::new(),
            };
            store
                .save(&uid, &statement, &Pod::default())
                .await
                .expect("saves");
            assert!(store.path(&uid).starts_with(dir.path().join("assignments")));
            let back = store.load(&uid).await.expect("loads");
            assert_eq!(back.epoch(), Epoch(4));
            assert_eq!(back.statement.owner.0, owner);
            store.remove(&uid).await;
            assert!(store.load(&uid).await.is_none());
        }
    }
}
