//! Files that survive a crash whole: written under a temporary name, flushed to the disk,
//! renamed into place, and the rename flushed with its directory. A reader sees the old
//! file or the new one, never half of one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces `path` with `bytes`, created with `mode` (e.g. 0o600 for secrets).
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let written = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path))
        .and_then(|()| {
            // The rename itself reaches the disk with the directory.
            File::open(path.parent().unwrap_or(Path::new("."))).and_then(|d| d.sync_all())
        });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_files_with_their_mode_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("record.json");
        write_atomically(&path, b"first", 0o600).expect("writes");
        write_atomically(&path, b"second", 0o600).expect("replaces");
        assert_eq!(fs::read(&path).expect("reads"), b"second");
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["record.json"]);
        // A directory that does not exist: an error, and no stray file.
        assert!(write_atomically(&dir.path().join("none/x.json"), b"x", 0o600).is_err());
    }
}
