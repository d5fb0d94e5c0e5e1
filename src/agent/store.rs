//! Assignments an agent accepted, kept in its memory-backed secrets directory (they
//! hold env values taken from secrets) so that a restarted agent knows the spec, owner
//! and epoch of the Podman pods it finds. After a reboot they are gone with the pods'
//! secrets: the owner places those pods again.

use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use super::supervisor::NetworkGrant;
use crate::wire::{Epoch, PodUid, RegistryCredential, SignedAssignment};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredAssignment {
    /// The owner's signed assignment: who owns the pod, at which epoch.
    pub statement: SignedAssignment,
    pub pod: Pod,
    /// The pod's registry logins: a restarted agent may have to pull its images again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_credentials: Vec<RegistryCredential>,
    /// A strict pod's lease (see `fencing`): a restarted agent that finds no lease for
    /// it stops it rather than guess.
    #[serde(default)]
    pub lease_ms: Option<u64>,
    /// The subnet of the pod's network, as first assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_subnet: Option<Ipv4Net>,
    /// The owner's cluster ranges, as first assigned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_ranges: Vec<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_domain: Option<String>,
}

impl StoredAssignment {
    pub fn epoch(&self) -> Epoch {
        self.statement.epoch
    }

    pub fn network(&self) -> NetworkGrant {
        NetworkGrant {
            subnet: self.pod_subnet,
            cluster_ranges: self.cluster_ranges.clone(),
            cluster_domain: self.cluster_domain.clone(),
        }
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
        pull_credentials: &[RegistryCredential],
        lease_ms: Option<u64>,
        network: &NetworkGrant,
    ) -> Result<(), StoreError> {
        let path = self.path(uid);
        let err = |source| StoreError {
            path: path.clone(),
            source,
        };
        let record = StoredAssignment {
            statement: statement.clone(),
            pod: pod.clone(),
            pull_credentials: pull_credentials.to_vec(),
            lease_ms,
            pod_subnet: network.subnet,
            cluster_ranges: network.cluster_ranges.clone(),
            cluster_domain: network.cluster_domain.clone(),
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| err(e.into()))?;
        // Whole or not at all: a restarted agent must not find half a record.
        let target = path.clone();
        tokio::task::spawn_blocking(move || {
            crate::durable::write_atomically(&target, &bytes, 0o600)
        })
        .await
        .map_err(|e| err(std::io::Error::other(e)))?
        .map_err(err)
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

/// Whether `dir` is in memory-backed storage (tmpfs or ramfs), where secrets may go.
pub fn is_memory_backed(dir: &Path) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a writable statfs.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between platforms
    let kind = stat.f_type as i64;
    Ok(kind == TMPFS_MAGIC || kind == RAMFS_MAGIC)
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

    #[test]
    fn tells_memory_backed_storage_from_disk() {
        // /dev/shm is a tmpfs on Linux; a fresh directory of the test's is not (the
        // project's machines build on a disk).
        assert!(is_memory_backed(Path::new("/dev/shm")).expect("statfs"));
        let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        assert!(!is_memory_backed(disk.path()).expect("statfs"));
        assert!(is_memory_backed(Path::new("/nonexistent/x")).is_err());
    }

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
                .save(
                    &uid,
                    &statement,
                    &Pod::default(),
                    &[],
                    None,
                    &NetworkGrant::default(),
                )
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
