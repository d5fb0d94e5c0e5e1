//! Opening a volume mount's `subPath` without ever leaving the volume.
//!
//! Containers write the pod's emptyDirs, so they can leave symbolic links in them
//! (`ln -s / /data/escape`). Podman, and the kernel's bind mount under it, follow links
//! in the path they are given: a later mount of `subPath: escape` would hand a container
//! the agent host's root, and making a missing `subPath: escape/x` would make a
//! world-writable directory wherever the link points (CVE-2017-1002101, which the
//! kubelet answers in `pkg/volume/util/subpath`).
//!
//! [`open`] walks the subPath from the volume's directory one name at a time: each name
//! is opened relative to the directory opened before it, with `O_NOFOLLOW`, and checked
//! with `fstat`. A link is never followed, and a directory renamed or replaced meanwhile
//! cannot lead the walk elsewhere, since it goes on from what it holds open, not from a
//! path. A missing directory is made with `mkdirat` under the parent that was checked,
//! opened again with `O_NOFOLLOW | O_DIRECTORY` and given its mode with `fchmod`, so that
//! what gets the mode is the directory just made, never what a link points to.
//!
//! Choices:
//! - Every symbolic link in a subPath is refused, also one whose target stays inside the
//!   volume (the kubelet follows those). Following links safely means resolving their
//!   targets against the volume ourselves, which is more code to trust for a rare use;
//!   refusing them is always safe and the same on every kernel.
//! - The walk, not `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)`: the walk is needed
//!   anyway to make missing directories under a checked parent, and it works on any
//!   Linux and under any seccomp filter; openat2 needs Linux 5.6 and a filter that allows
//!   it, so it would only be a second path doing the same.
//! - Directories made for a subPath get the permission bits of the volume's directory,
//!   as the kubelet gives them (0777 for an emptyDir, unless a container changed it).
//!
//! The walk proves the path safe when it runs; that it is still the same when Podman
//! mounts it is the supervisor's part (it pauses the pod's containers that could change
//! the volume until the container that mounts the subPath has started).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Why a subPath cannot be mounted.
#[derive(Debug, thiserror::Error)]
pub enum SubPathError {
    #[error("{0:?} is a symbolic link, and a subPath may not go through one")]
    Symlink(PathBuf),
    #[error("{0:?} is not a directory")]
    NotDirectory(PathBuf),
    #[error("{0:?} is not a relative path of plain names")]
    Invalid(PathBuf),
    #[error("cannot open the volume's directory: {0}")]
    Volume(io::Error),
    #[error("{path:?}: {error}")]
    Io { path: PathBuf, error: io::Error },
}

/// Opens `sub_path` inside `volume_dir` without following any symbolic link, making the
/// directories that are missing (the last name included, as the kubelet does). Returns
/// an `O_PATH` descriptor (or, for a directory just made, an `O_RDONLY` one) of what the
/// subPath names: a directory, a file, or anything else but a link.
pub fn open(volume_dir: &Path, sub_path: &Path) -> Result<OwnedFd, SubPathError> {
    let names = names(sub_path)?;
    let root = c_path(volume_dir.as_os_str().as_bytes())
        .ok_or_else(|| SubPathError::Invalid(volume_dir.to_path_buf()))?;
    // The volume's directory is the agent's own (`<state>/volumes/<pod>/<volume>`), but
    // it is not followed either if it were a link.
    let mut dir = open_at(
        libc::AT_FDCWD,
        &root,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
    )
    .map_err(SubPathError::Volume)?;
    let mode = stat(&dir).map_err(SubPathError::Volume)?.st_mode & 0o7777;
    let mut walked = PathBuf::new();
    for (index, name) in names.iter().enumerate() {
        walked.push(name);
        let io_error = |error| SubPathError::Io {
            path: walked.clone(),
            error,
        };
        let c_name =
            c_path(name.as_bytes()).ok_or_else(|| SubPathError::Invalid(walked.clone()))?;
        let next = match open_at(dir.as_raw_fd(), &c_name, libc::O_PATH | libc::O_NOFOLLOW) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                match make_dir(&dir, &c_name, mode) {
                    Ok(fd) => fd,
                    // Replaced by a link between mkdirat and the open.
                    Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                        return Err(SubPathError::Symlink(walked))
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                        return Err(SubPathError::NotDirectory(walked))
                    }
                    Err(e) => return Err(io_error(e)),
                }
            }
            Err(e) => return Err(io_error(e)),
        };
        let kind = stat(&next).map_err(io_error)?.st_mode & libc::S_IFMT;
        if kind == libc::S_IFLNK {
            return Err(SubPathError::Symlink(walked));
        }
        if index + 1 < names.len() && kind != libc::S_IFDIR {
            return Err(SubPathError::NotDirectory(walked));
        }
        dir = next;
    }
    Ok(dir)
}

/// The names a subPath walks through; anything but plain names (`..`, `/`) is refused,
/// as the spec's validation already does.
fn names(sub_path: &Path) -> Result<Vec<&std::ffi::OsStr>, SubPathError> {
    sub_path
        .components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(SubPathError::Invalid(sub_path.to_path_buf())),
        })
        .collect()
}

fn c_path(bytes: &[u8]) -> Option<CString> {
    CString::new(bytes).ok()
}

fn open_at(dir: libc::c_int, name: &CString, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and outlives the call; the result is checked.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn stat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: a zeroed `stat` is a valid value, filled in by fstat.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open; `stat` is a valid, writable buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat)
}

/// Makes directory `name` in `parent` and opens it (never through a link) to give it
/// `mode`, which mkdirat alone would narrow by the umask. One that appeared meanwhile
/// (EEXIST) is opened as it is, to be checked like any other.
fn make_dir(parent: &OwnedFd, name: &CString, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and outlives the call; the result is checked.
    if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), mode) } != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EEXIST) {
            return open_at(parent.as_raw_fd(), name, libc::O_PATH | libc::O_NOFOLLOW);
        }
        return Err(error);
    }
    let dir = open_at(
        parent.as_raw_fd(),
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
    )?;
    // SAFETY: `dir` is an open descriptor of the directory just made.
    if unsafe { libc::fchmod(dir.as_raw_fd(), mode) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    /// A volume directory (mode 0777, as an emptyDir's) inside a scratch directory that
    /// stands for the agent's host.
    struct Volume {
        host: tempfile::TempDir,
    }

    impl Volume {
        fn new() -> Volume {
            let host = tempfile::tempdir().expect("tempdir");
            let volume = host.path().join("volume");
            std::fs::create_dir(&volume).expect("volume");
            std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o777))
                .expect("chmod");
            std::fs::create_dir(host.path().join("outside")).expect("outside");
            Volume { host }
        }

        fn dir(&self) -> PathBuf {
            self.host.path().join("volume")
        }

        fn outside(&self) -> PathBuf {
            self.host.path().join("outside")
        }

        fn open(&self, sub_path: &str) -> Result<OwnedFd, SubPathError> {
            open(&self.dir(), Path::new(sub_path))
        }
    }

    fn inode(fd: &OwnedFd) -> (u64, u64) {
        let stat = stat(fd).expect("fstat");
        (stat.st_dev, stat.st_ino)
    }

    fn inode_of(path: &Path) -> (u64, u64) {
        let meta = std::fs::symlink_metadata(path).expect("exists");
        (meta.dev(), meta.ino())
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .expect("exists")
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn existing_directories_and_files_are_opened_as_they_are() {
        let volume = Volume::new();
        let dir = volume.dir().join("a/b");
        std::fs::create_dir_all(&dir).expect("dirs");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::fs::write(dir.join("file"), "x").expect("file");

        assert_eq!(inode(&volume.open("a/b").expect("dir")), inode_of(&dir));
        assert_eq!(inode(&volume.open("./a//b/").expect("dir")), inode_of(&dir));
        let file = volume.open("a/b/file").expect("file");
        assert_eq!(inode(&file), inode_of(&dir.join("file")));
        // What a container set stays as it set it.
        assert_eq!(mode(&dir), 0o700);
        // The volume itself.
        assert_eq!(
            inode(&volume.open("").expect("root")),
            inode_of(&volume.dir())
        );
    }

    #[test]
    fn missing_directories_are_made_with_the_volume_s_mode_whatever_the_umask() {
        let volume = Volume::new();
        let fd = volume.open("logs/app/today").expect("made");
        let made = volume.dir().join("logs/app/today");
        assert!(made.is_dir());
        assert_eq!(inode(&fd), inode_of(&made));
        for dir in ["logs", "logs/app", "logs/app/today"] {
            assert_eq!(mode(&volume.dir().join(dir)), 0o777, "{dir}");
        }
        // A volume a container narrowed gives its own mode.
        std::fs::set_permissions(volume.dir(), std::fs::Permissions::from_mode(0o750))
            .expect("chmod");
        volume.open("private").expect("made");
        assert_eq!(mode(&volume.dir().join("private")), 0o750);
    }

    #[test]
    fn an_absolute_link_is_refused_and_nothing_is_made_where_it_points() {
        let volume = Volume::new();
        symlink("/", volume.dir().join("escape")).expect("link");
        let refused = volume.open("escape").expect_err("refused");
        assert!(matches!(&refused, SubPathError::Symlink(p) if p == Path::new("escape")));
        assert_eq!(
            refused.to_string(),
            "\"escape\" is a symbolic link, and a subPath may not go through one"
        );

        symlink(volume.outside(), volume.dir().join("mid")).expect("link");
        assert!(matches!(
            volume.open("mid/created/deeper"),
            Err(SubPathError::Symlink(p)) if p == Path::new("mid")
        ));
        assert!(!volume.outside().join("created").exists());

        // A dangling link is not made real either.
        let target = volume.outside().join("not-yet");
        symlink(&target, volume.dir().join("dangling")).expect("link");
        for sub_path in ["dangling", "dangling/x"] {
            assert!(
                matches!(volume.open(sub_path), Err(SubPathError::Symlink(_))),
                "{sub_path}"
            );
        }
        assert!(!target.exists());
    }

    #[test]
    fn a_relative_link_out_of_the_volume_is_refused() {
        let volume = Volume::new();
        std::fs::create_dir(volume.dir().join("a")).expect("dir");
        symlink("../../outside", volume.dir().join("a/up")).expect("link");
        assert!(matches!(
            volume.open("a/up"),
            Err(SubPathError::Symlink(p)) if p == Path::new("a/up")
        ));
        assert!(matches!(
            volume.open("a/up/new"),
            Err(SubPathError::Symlink(p)) if p == Path::new("a/up")
        ));
        assert_eq!(
            std::fs::read_dir(volume.outside())
                .expect("outside")
                .count(),
            0
        );
    }

    #[test]
    fn a_link_in_a_middle_component_is_refused() {
        let volume = Volume::new();
        std::fs::create_dir_all(volume.dir().join("a/real/c")).expect("dirs");
        symlink(volume.outside(), volume.dir().join("a/b")).expect("link");
        std::fs::create_dir(volume.outside().join("c")).expect("target");
        assert!(matches!(
            volume.open("a/b/c"),
            Err(SubPathError::Symlink(p)) if p == Path::new("a/b")
        ));
    }

    #[test]
    fn a_link_that_stays_inside_the_volume_is_refused_too() {
        let volume = Volume::new();
        std::fs::create_dir(volume.dir().join("real")).expect("dir");
        symlink("real", volume.dir().join("inner")).expect("link");
        symlink(
            volume.dir().join("real"),
            volume.dir().join("absolute-inner"),
        )
        .expect("link");
        for sub_path in ["inner", "inner/x", "absolute-inner"] {
            assert!(
                matches!(volume.open(sub_path), Err(SubPathError::Symlink(_))),
                "{sub_path}"
            );
        }
        assert!(!volume.dir().join("real/x").exists());
    }

    #[test]
    fn a_file_in_the_middle_and_bad_names_are_refused() {
        let volume = Volume::new();
        std::fs::write(volume.dir().join("file"), "x").expect("file");
        assert!(matches!(
            volume.open("file/x"),
            Err(SubPathError::NotDirectory(p)) if p == Path::new("file")
        ));
        for sub_path in ["../outside", "a/../../outside", "/etc"] {
            assert!(
                matches!(volume.open(sub_path), Err(SubPathError::Invalid(_))),
                "{sub_path}"
            );
        }
        let nul = open(&volume.dir(), Path::new("a\0b"));
        assert!(matches!(nul, Err(SubPathError::Invalid(_))));
    }

    #[test]
    fn a_volume_directory_that_is_a_link_or_missing_is_an_error() {
        let volume = Volume::new();
        let link = volume.host.path().join("link");
        symlink(volume.outside(), &link).expect("link");
        assert!(matches!(
            open(&link, Path::new("x")),
            Err(SubPathError::Volume(_))
        ));
        assert!(!volume.outside().join("x").exists());
        assert!(matches!(
            open(&volume.host.path().join("gone"), Path::new("x")),
            Err(SubPathError::Volume(_))
        ));
    }

    #[test]
    fn a_fifo_is_opened_without_waiting_for_a_writer() {
        let volume = Volume::new();
        let fifo = c_path(volume.dir().join("pipe").as_os_str().as_bytes()).expect("path");
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let fd = volume.open("pipe").expect("opened");
        assert_eq!(
            stat(&fd).expect("fstat").st_mode & libc::S_IFMT,
            libc::S_IFIFO
        );
    }
}
