//! The files of volumes whose content comes with the assignment (configMap, secret,
//! downwardAPI, projected), written under the pod's volumes directory.
//!
//! Each file is replaced by a rename, so a container never reads half a file (a
//! refreshed token, say); files no longer sent are removed.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::node::resolve::is_relative_path;
use crate::wire::VolumeFile;

/// Writes every volume's files into `<volumes_dir>/<volume name>/`, owned by the pod's
/// `fs_group` if it has one.
pub async fn write(
    volumes_dir: &Path,
    volumes: &BTreeMap<String, Vec<VolumeFile>>,
    fs_group: Option<u32>,
) -> io::Result<()> {
    for (name, files) in volumes {
        if name.contains('/') || !is_relative_path(name) {
            return Err(invalid(format!("bad volume name {name:?}")));
        }
        let root = volumes_dir.join(name);
        create_dir(&root, fs_group).await?;
        let mut wanted = BTreeSet::new();
        for file in files {
            if !is_relative_path(&file.path) {
                return Err(invalid(format!(
                    "bad file path {:?} in volume {name}",
                    file.path
                )));
            }
            let path = root.join(&file.path);
            if let Some(parent) = path.parent() {
                create_dir(parent, fs_group).await?;
            }
            let tmp = path.with_file_name(format!(
                ".{}.tmp",
                path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
            ));
            tokio::fs::write(&tmp, &file.data.0).await?;
            tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(file.mode & 0o777))
                .await?;
            if let Some(gid) = fs_group {
                give_to_group(&tmp, gid, READ_ONLY).await?;
            }
            tokio::fs::rename(&tmp, &path).await?;
            wanted.insert(path);
        }
        remove_unwanted(&root, &wanted).await?;
    }
    Ok(())
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Volumes of files from the API are mounted read-only.
const READ_ONLY: bool = true;

/// Volume directories are world-readable, as the kubelet's, so that containers running
/// as any user can read files their mode allows them to.
async fn create_dir(dir: &Path, fs_group: Option<u32>) -> io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).await?;
    match fs_group {
        Some(gid) => give_to_group(dir, gid, READ_ONLY).await,
        None => Ok(()),
    }
}

/// The mode the kubelet's `SetVolumeOwnership` gives a volume's file or directory for
/// `fsGroup`: group-readable (and writable, unless the volume is read-only), directories
/// also group-searchable and setgid, so that what is made in them keeps the group.
pub fn fs_group_mode(mode: u32, is_dir: bool, read_only: bool) -> u32 {
    let mut mask = if read_only { 0o440 } else { 0o660 };
    if is_dir {
        mask |= 0o2110;
    }
    mode | mask
}

/// Gives `path` to group `gid` with [`fs_group_mode`]; a symbolic link is left alone
/// (containers may have made it, and it may point anywhere on the host).
pub async fn give_to_group(path: &Path, gid: u32, read_only: bool) -> io::Result<()> {
    let meta = tokio::fs::symlink_metadata(path).await?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, None, Some(gid))?;
    let mode = fs_group_mode(meta.permissions().mode() & 0o7777, meta.is_dir(), read_only);
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).await
}

async fn remove_unwanted(root: &Path, wanted: &BTreeSet<PathBuf>) -> io::Result<()> {
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let mut entries = tokio::fs::read_dir(&dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            let path = entry.path();
            if entry.file_type().await?.is_dir() {
                pending.push(path);
            } else if !wanted.contains(&path) {
                tokio::fs::remove_file(&path).await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn file(path: &str, data: &str, mode: u32) -> VolumeFile {
        VolumeFile {
            path: path.into(),
            data: ByteString(data.as_bytes().to_vec()),
            mode,
        }
    }

    #[tokio::test]
    async fn writes_replaces_and_prunes_files_with_their_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let volumes = BTreeMap::from([(
            "token".to_string(),
            vec![file("token", "one", 0o600), file("ca/ca.crt", "pem", 0o644)],
        )]);
        write(dir.path(), &volumes, None).await.expect("writes");
        let token = dir.path().join("token/token");
        assert_eq!(std::fs::read_to_string(&token).expect("token"), "one");
        let mode = std::fs::metadata(&token)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);

        let refreshed = BTreeMap::from([("token".to_string(), vec![file("token", "two", 0o600)])]);
        write(dir.path(), &refreshed, None).await.expect("rewrites");
        assert_eq!(std::fs::read_to_string(&token).expect("token"), "two");
        assert!(!dir.path().join("token/ca/ca.crt").exists());
    }

    #[test]
    fn fs_group_modes_follow_the_kubelet() {
        assert_eq!(fs_group_mode(0o400, false, true), 0o440);
        assert_eq!(fs_group_mode(0o644, false, false), 0o664);
        assert_eq!(fs_group_mode(0o755, true, true), 0o2755);
        assert_eq!(fs_group_mode(0o777, true, false), 0o2777);
    }

    #[tokio::test]
    async fn with_an_fs_group_files_and_directories_are_the_groups() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let volumes = BTreeMap::from([(
            "creds".to_string(),
            vec![
                file("password", "s3cr3t", 0o400),
                file("sub/key", "k", 0o600),
            ],
        )]);
        write(dir.path(), &volumes, Some(2000))
            .await
            .expect("writes");
        for (path, mode) in [
            ("creds", 0o2755),
            ("creds/sub", 0o2755),
            ("creds/password", 0o440),
            ("creds/sub/key", 0o640),
        ] {
            let meta = std::fs::metadata(dir.path().join(path)).expect("meta");
            assert_eq!(meta.gid(), 2000, "{path}");
            assert_eq!(meta.permissions().mode() & 0o7777, mode, "{path}");
        }
    }

    #[tokio::test]
    async fn refuses_paths_that_leave_the_volume() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (volume, path) in [
            ("v", "../escape"),
            ("v", "/etc/passwd"),
            ("../v", "f"),
            ("a/b", "f"),
        ] {
            let volumes = BTreeMap::from([(volume.to_string(), vec![file(path, "x", 0o644)])]);
            assert!(
                write(dir.path(), &volumes, None).await.is_err(),
                "{volume} {path}"
            );
        }
        assert!(!dir.path().parent().expect("parent").join("escape").exists());
    }
}
