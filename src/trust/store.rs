//! Trust state kept in the state directory: one JSON document per file, private to its
//! owner (0600 in a 0700 directory), changed only under an exclusive lock and replaced
//! whole (written aside, synced, renamed), so that the running node and a `beemesh
//! token` command never lose each other's changes and a crash never leaves half a file.

use std::fs::{self, OpenOptions};
use std::marker::PhantomData;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::join::TrustDoc;

/// The directory under the state directory that holds trust files.
pub const TRUST_DIR: &str = "trust";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path} is readable by others (mode {mode:o}); run: chmod 600 {path}")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{place}: {reason}")]
    Remote { place: String, reason: String },
}

/// Where a node keeps its [`TrustDoc`]: a file in its state directory, or a
/// Kubernetes Secret when it runs in a cluster (see `cluster::trust_secret`). Writers
/// never lose each other's changes: a file lock, or the API's resourceVersion.
#[async_trait::async_trait]
pub trait TrustStore: Send + Sync + std::fmt::Debug {
    /// Where the document lives, for messages.
    fn place(&self) -> String;
    async fn load(&self) -> Result<TrustDoc, StoreError>;
    /// Applies `change` to the current document and saves the result, which it
    /// returns. `change` may run more than once (a concurrent writer won a race).
    async fn update(
        &self,
        change: &mut (dyn for<'d> FnMut(&'d mut TrustDoc) + Send),
    ) -> Result<TrustDoc, StoreError>;
}

/// The trust file of a standalone node, `<state-dir>/trust/node.json`.
pub const NODE_TRUST_FILE: &str = "node.json";

#[async_trait::async_trait]
impl TrustStore for JsonStore<TrustDoc> {
    fn place(&self) -> String {
        self.path.display().to_string()
    }

    async fn load(&self) -> Result<TrustDoc, StoreError> {
        JsonStore::load(self)
    }

    // A small file under a lock held for milliseconds: done in place.
    async fn update(
        &self,
        change: &mut (dyn for<'d> FnMut(&'d mut TrustDoc) + Send),
    ) -> Result<TrustDoc, StoreError> {
        JsonStore::update(self, |doc| {
            change(doc);
            doc.clone()
        })
    }
}

/// A JSON document of type `T` in a private file.
#[derive(Debug, Clone)]
pub struct JsonStore<T> {
    path: PathBuf,
    lock: PathBuf,
    kind: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned + Default> JsonStore<T> {
    /// The document `<state_dir>/trust/<name>`; the directory is created (0700).
    pub fn open(state_dir: &Path, name: &str) -> Result<Self, StoreError> {
        let dir = state_dir.join(TRUST_DIR);
        let io = |source| StoreError::Io {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(io)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        Ok(JsonStore {
            path: dir.join(name),
            lock: dir.join(format!(".{name}.lock")),
            kind: PhantomData,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The document; the default one when the file does not exist yet.
    pub fn load(&self) -> Result<T, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(T::default()),
            Err(e) => return Err(self.io(e)),
        };
        let mode = fs::metadata(&self.path)
            .map_err(|e| self.io(e))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(StoreError::Permissions {
                path: self.path.clone(),
                mode,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Invalid {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    /// Changes the document under the lock; `change` sees the current one and its
    /// result is returned. The file is written only when the document changed.
    pub fn update<R>(&self, change: impl FnOnce(&mut T) -> R) -> Result<R, StoreError>
    where
        T: PartialEq + Clone,
    {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&self.lock)
            .map_err(|e| self.io(e))?;
        // Released when `lock` is dropped, after the write.
        lock.lock().map_err(|e| self.io(e))?;
        let before = self.load()?;
        let mut doc = before.clone();
        let result = change(&mut doc);
        if doc != before {
            self.write(&doc)?;
        }
        drop(lock);
        Ok(result)
    }

    fn write(&self, doc: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(doc).map_err(|e| StoreError::Invalid {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        crate::durable::write_atomically(&self.path, &bytes, 0o600).map_err(|e| self.io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn documents_are_private_updated_under_a_lock_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: JsonStore<BTreeSet<u32>> =
            JsonStore::open(dir.path(), "doc.json").expect("opens");
        assert!(store.load().expect("empty").is_empty());
        let threads: Vec<_> = (0..8u32)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || store.update(|doc| doc.insert(i)).expect("updates"))
            })
            .collect();
        for t in threads {
            assert!(t.join().expect("thread"));
        }
        let again: JsonStore<BTreeSet<u32>> =
            JsonStore::open(dir.path(), "doc.json").expect("opens");
        assert_eq!(again.load().expect("loads").len(), 8, "no update was lost");
        let mode = |p: &Path| fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(store.path()), 0o600);
        assert_eq!(mode(&dir.path().join(TRUST_DIR)), 0o700);

        fs::set_permissions(store.path(), fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(store.load(), Err(StoreError::Permissions { .. })));
        fs::write(store.path(), b"{").expect("write");
        fs::set_permissions(store.path(), fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(store.load(), Err(StoreError::Invalid { .. })));
    }
}
