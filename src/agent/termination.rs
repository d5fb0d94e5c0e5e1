//! A container's termination message, as the kubelet gets it: what the container
//! wrote to its `terminationMessagePath` (the last 4 KiB), else, with
//! `FallbackToLogsOnError` and a failure, the end of its log (the last 80 lines, at
//! most 2 KiB).
//!
//! The file is one the agent makes in the pod's volumes directory and bind-mounts into
//! the container, which may write anything there: it is read without following a
//! symbolic link, and only its end.

use std::io::{self, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// The kubelet's `MaxContainerTerminationMessageLength`.
pub const MAX_MESSAGE_BYTES: u64 = 4096;
/// The kubelet's `MaxContainerTerminationMessageLogLines` and `...LogLength`.
pub const MAX_LOG_LINES: u64 = 80;
pub const MAX_LOG_BYTES: usize = 2048;

/// Makes the empty file a container instance may write its message to, writable by
/// whichever user the container runs as.
pub async fn create_file(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .await?;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).await
}

/// The end of the file: its last [`MAX_MESSAGE_BYTES`].
pub async fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .await?;
    let len = file.metadata().await?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(MAX_MESSAGE_BYTES)))
        .await?;
    let mut data = Vec::new();
    file.take(MAX_MESSAGE_BYTES).read_to_end(&mut data).await?;
    Ok(data)
}

/// What of a log's end stands in for the message: the last [`MAX_LOG_BYTES`] of
/// `tail` (already its last [`MAX_LOG_LINES`] lines).
pub fn log_message(tail: &[u8]) -> String {
    let start = tail.len().saturating_sub(MAX_LOG_BYTES);
    String::from_utf8_lossy(&tail[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_file_is_made_writable_and_only_its_end_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(".termination/main_0");
        create_file(&path).await.expect("made");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o666);
        assert!(read(&path).await.expect("read").is_empty());

        let long: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::write(&path, &long).expect("write");
        let end = read(&path).await.expect("read");
        assert_eq!(end.len(), 4096);
        assert_eq!(end, long[long.len() - 4096..]);
    }

    #[tokio::test]
    async fn a_link_put_in_the_files_place_is_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "host secret").expect("write");
        let path = dir.path().join("main_0");
        std::os::unix::fs::symlink(&secret, &path).expect("link");
        assert!(read(&path).await.is_err());
        assert!(create_file(&path).await.is_err());
        assert_eq!(
            std::fs::read_to_string(&secret).expect("read"),
            "host secret"
        );
    }

    #[test]
    fn a_log_stands_in_with_its_last_two_kibibytes() {
        assert_eq!(log_message(b"oops\n"), "oops\n");
        let long = "x".repeat(3000) + "end";
        let message = log_message(long.as_bytes());
        assert_eq!(message.len(), 2048);
        assert!(message.ends_with("end"));
    }
}
