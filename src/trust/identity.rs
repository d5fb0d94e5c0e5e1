//! The peer's Ed25519 identity, persisted in the state directory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// File name of the identity key inside the state directory.
pub const IDENTITY_FILE: &str = "identity.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create state directory {path}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read identity key {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write identity key {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("identity key {path} is not a valid Ed25519 key: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("identity key {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")]
    Permissions { path: PathBuf, mode: u32 },
}

/// Loads the identity from `<state_dir>/identity.key`, creating a new Ed25519 key
/// (mode 0600) if there is none. A key that others can read is refused, as ssh does.
pub fn load_or_create_identity(state_dir: &Path) -> Result<Keypair, IdentityError> {
    fs::create_dir_all(state_dir).map_err(|source| IdentityError::StateDir {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let path = state_dir.join(IDENTITY_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let mode = fs::metadata(&path)
                .map_err(|source| IdentityError::Read {
                    path: path.clone(),
                    source,
                })?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::Permissions { path, mode });
            }
            let keypair =
                Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Invalid {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if keypair.key_type() != libp2p::identity::KeyType::Ed25519 {
                return Err(IdentityError::Invalid {
                    path,
                    reason: format!("key type is {:?}", keypair.key_type()),
                });
            }
            Ok(keypair)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(&path),
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

fn create(path: &Path) -> Result<Keypair, IdentityError> {
    let keypair = Keypair::generate_ed25519();
    let write_err = |source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    };
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| IdentityError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    // Written whole under a name of our own, created 0600, then linked into place:
    // a crash never leaves half a key, and of two processes creating it at once
    // (`beemesh id` beside a starting agent) exactly one wins and both use its key.
    let tmp = path.with_extension(format!("key.{}.tmp", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    let written = file
        .write_all(&bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok(keypair),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            load_or_create_identity(path.parent().unwrap_or(Path::new(".")))
        }
        Err(e) => Err(write_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_with_mode_0600_and_reloads_the_same_peer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create_identity(dir.path()).expect("creates");
        let mode = fs::metadata(dir.path().join(IDENTITY_FILE))
            .expect("key exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_create_identity(dir.path()).expect("loads");
        assert_eq!(first.public().to_peer_id(), again.public().to_peer_id());
    }

    #[test]
    fn concurrent_creators_agree_on_one_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let peers: Vec<_> = (0..8)
            .map(|_| {
                let path = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    load_or_create_identity(&path)
                        .expect("created or loaded")
                        .public()
                        .to_peer_id()
                })
            })
            .map(|t| t.join().expect("thread"))
            .collect();
        assert!(peers.windows(2).all(|w| w[0] == w[1]), "{peers:?}");
    }

    #[test]
    fn refuses_garbage_and_open_permissions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(IDENTITY_FILE);
        fs::write(&path, b"not a key").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            load_or_create_identity(dir.path()),
            Err(IdentityError::Invalid { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            load_or_create_identity(dir.path()),
            Err(IdentityError::Permissions { .. })
        ));
    }
}
