//! The peer's Ed25519 identity, persisted in the state directory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// File name of the identity key inside the state directory.
pub const IDENTITY_FILE: &str = "identity.key";
/// File name, inside a node's state directory, of the key `beemesh status` asks with.
pub const CLIENT_KEY_FILE: &str = "client.key";

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

/// The DER prefix of every PKCS#8 v1 Ed25519 private key; the 32-byte seed follows.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Loads the identity from `<state_dir>/identity.key`, creating a new Ed25519 key
/// (mode 0600) if there is none. A key that others can read is refused, as ssh does.
pub fn load_or_create_identity(state_dir: &Path) -> Result<Keypair, IdentityError> {
    load_or_create_key(&state_dir.join(IDENTITY_FILE))
}

/// Loads the Ed25519 key at `path`, creating it (mode 0600, and its directory) if
/// there is none.
pub fn load_or_create_key(path: &Path) -> Result<Keypair, IdentityError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|source| IdentityError::StateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = path.to_path_buf();
    match fs::read(&path) {
        Ok(bytes) => {
            check_mode(&path, 0o077)?;
            decode(&path, &bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(&path),
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

/// Loads the identity from a key file managed elsewhere, typically a mounted
/// Kubernetes Secret. Its group may read it (a Secret volume is 0440 to the pod's
/// fsGroup); others may not.
pub fn load_identity_file(path: &Path) -> Result<Keypair, IdentityError> {
    let bytes = fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    check_mode(path, 0o007)?;
    decode(path, &bytes)
}

/// Loads a private mesh's pre-shared key: the libp2p/IPFS `swarm.key` format
/// (`/key/swarm/psk/1.0.0/`, `/base16/`, then 64 hex digits). As with a mounted key, its
/// group may read it, others may not.
pub fn load_psk_file(path: &Path) -> Result<libp2p::pnet::PreSharedKey, IdentityError> {
    let text = fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    check_mode(path, 0o007)?;
    text.trim().parse().map_err(|e| IdentityError::Invalid {
        path: path.to_path_buf(),
        reason: format!(
            "{e} (expected /key/swarm/psk/1.0.0/, /base16/ and 64 hex digits on three lines)"
        ),
    })
}

/// The permission bits of the key file at `path` if any of `forbidden` is among them
/// (0o077: only its owner may read it; 0o007: its group may too), else None.
pub fn loose_mode(path: &Path, forbidden: u32) -> std::io::Result<Option<u32>> {
    let mode = fs::metadata(path)?.permissions().mode() & 0o777;
    Ok((mode & forbidden != 0).then_some(mode))
}

fn check_mode(path: &Path, forbidden: u32) -> Result<(), IdentityError> {
    let loose = loose_mode(path, forbidden).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(mode) = loose {
        return Err(IdentityError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// An Ed25519 key in libp2p's protobuf encoding (what `beemesh id` writes), or in PEM
/// PKCS#8 (what `openssl genpkey -algorithm ed25519` and Helm's `genPrivateKey
/// "ed25519"` write).
fn decode(path: &Path, bytes: &[u8]) -> Result<Keypair, IdentityError> {
    let invalid = |reason: String| IdentityError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.starts_with(b"-----BEGIN") {
        let (_, pem) = x509_parser::pem::parse_x509_pem(bytes)
            .map_err(|e| invalid(format!("unreadable PEM: {e}")))?;
        if pem.label != "PRIVATE KEY" {
            return Err(invalid(format!(
                "PEM holds a {:?}, not a PKCS#8 PRIVATE KEY",
                pem.label
            )));
        }
        let seed = pem
            .contents
            .strip_prefix(&PKCS8_ED25519_PREFIX[..])
            .filter(|seed| seed.len() == 32)
            .ok_or_else(|| invalid("the PKCS#8 key is not an Ed25519 key".into()))?;
        return Keypair::ed25519_from_bytes(seed.to_vec()).map_err(|e| invalid(e.to_string()));
    }
    let keypair = Keypair::from_protobuf_encoding(bytes).map_err(|e| invalid(e.to_string()))?;
    if keypair.key_type() != libp2p::identity::KeyType::Ed25519 {
        return Err(invalid(format!("key type is {:?}", keypair.key_type())));
    }
    Ok(keypair)
}

/// [`decode`] without a file, for the fuzz targets.
#[doc(hidden)]
pub fn decode_key(bytes: &[u8]) -> Result<Keypair, IdentityError> {
    decode(Path::new("<bytes>"), bytes)
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
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_key(path),
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
    fn a_mounted_key_may_be_pem_pkcs8_and_group_readable_but_not_world_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        // As Helm's genPrivateKey "ed25519" renders it (RFC 8410 test vector seed).
        let pem = "-----BEGIN PRIVATE KEY-----\n\
                   MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
                   -----END PRIVATE KEY-----\n";
        fs::write(&path, pem).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o440)).expect("chmod");
        let keypair = load_identity_file(&path).expect("loads");
        let seed = keypair
            .try_into_ed25519()
            .expect("ed25519")
            .secret()
            .as_ref()
            .to_vec();
        assert_eq!(
            hex::encode(seed),
            "d4ee72dbf913584ad5b6d8f1f769f8ad3afe7c28cbf1d4fbe097a88f44755842"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).expect("chmod");
        assert!(matches!(
            load_identity_file(&path),
            Err(IdentityError::Permissions { .. })
        ));
    }

    #[test]
    fn a_mounted_key_of_another_kind_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["x".into()]).expect("cert");
        for (text, reason) in [
            (cert.cert.pem(), "not a PKCS#8 PRIVATE KEY"),
            (cert.key_pair.serialize_pem(), "not an Ed25519 key"),
        ] {
            fs::write(&path, text).expect("write");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).expect("chmod");
            let error = load_identity_file(&path).expect_err("refused").to_string();
            assert!(error.contains(reason), "{error}");
        }
    }

    #[test]
    fn pre_shared_keys_are_read_in_swarm_key_format_and_kept_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("swarm.key");
        fs::write(
            &path,
            format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "ab".repeat(32)),
        )
        .expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o440)).expect("chmod");
        let key = load_psk_file(&path).expect("loads");
        assert_eq!(
            key.to_string(),
            format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "ab".repeat(32))
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).expect("chmod");
        assert!(matches!(
            load_psk_file(&path),
            Err(IdentityError::Permissions { .. })
        ));
        fs::write(&path, "/key/swarm/psk/1.0.0/\n/base16/\nnothex").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).expect("chmod");
        assert!(matches!(
            load_psk_file(&path),
            Err(IdentityError::Invalid { .. })
        ));
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
