//! The fence watchdog: a process of its own that removes a strict pod's copy whose lease
//! ran out when its agent could not stop it (killed, frozen, crashed). Podman keeps
//! pods running without the agent, so without it a dead agent's strict pods would run
//! beside the copies its owner places elsewhere.
//!
//! The agent starts it (the same binary, `beemesh fence-watchdog`, in a process group
//! of its own so that a signal to the agent's group does not reach it) while it holds
//! leases; it reads the agent's lease file, outlives the agent, and ends once no lease
//! has been left for a while. One per secrets directory, by an exclusive lock.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::lease::{LeaseBook, LEASES_FILE};
use crate::fencing::boottime_ms;
use crate::runtime::{labels, stop_and_remove, Runtime, RuntimeError};
use crate::wire::{Epoch, PodUid};

/// Held by the running watchdog.
const LOCK_FILE: &str = "fence-watchdog.lock";
/// How often the lease file is read.
const CHECK: Duration = Duration::from_millis(250);
/// How long after a lease ran out the agent has to have stopped the copy itself; the
/// owner's fencing margin must cover it and the removal.
pub const SLACK: Duration = Duration::from_secs(1);
/// The watchdog ends after this long without a lease.
const IDLE_EXIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("cannot open the fence watchdog's lock {path}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the fence watchdog ({exe})")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
}

/// The lock, if nobody holds it.
fn try_lock(secrets_dir: &Path) -> Result<Option<File>, WatchdogError> {
    let path = secrets_dir.join(LOCK_FILE);
    let err = |source| WatchdogError::Lock {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(err)?;
    // SAFETY: the descriptor belongs to `file`, which outlives the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    match std::io::Error::last_os_error() {
        e if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        e => Err(err(e)),
    }
}

/// How the agent starts its watchdog.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub exe: PathBuf,
    pub secrets_dir: PathBuf,
    pub podman_socket: String,
    pub agent: String,
}

impl Launcher {
    /// Starts the watchdog unless one runs; true when it started one.
    pub fn ensure_running(&self) -> Result<bool, WatchdogError> {
        if try_lock(&self.secrets_dir)?.is_none() {
            return Ok(false);
        }
        // The lock is let go here and taken again by the new process; a second agent
        // check in between starts a second one, which finds it taken and ends.
        let mut command = tokio::process::Command::new(&self.exe);
        command
            .arg("fence-watchdog")
            .arg("--secrets-dir")
            .arg(&self.secrets_dir)
            .args(["--podman-socket", &self.podman_socket])
            .args(["--agent", &self.agent])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .process_group(0);
        // Dropped, not waited for: tokio reaps it when it ends.
        command.spawn().map_err(|source| WatchdogError::Spawn {
            exe: self.exe.clone(),
            source,
        })?;
        Ok(true)
    }
}

/// Serves as the watchdog until no lease is left (returns at once if another runs).
pub async fn run(
    runtime: Arc<dyn Runtime>,
    secrets_dir: PathBuf,
    agent: String,
) -> Result<(), WatchdogError> {
    let Some(_lock) = try_lock(&secrets_dir)? else {
        tracing::debug!("another fence watchdog runs");
        return Ok(());
    };
    tracing::info!(secrets_dir = %secrets_dir.display(), "fence watchdog watching strict pods' leases");
    let mut removed: HashSet<(PodUid, Epoch)> = HashSet::new();
    let mut idle_since: Option<u64> = None;
    loop {
        let book = read_leases(&secrets_dir.join(LEASES_FILE));
        let now = boottime_ms();
        if book.is_empty() {
            let since = *idle_since.get_or_insert(now);
            if now.saturating_sub(since) >= IDLE_EXIT.as_millis() as u64 {
                tracing::info!("no lease left; fence watchdog ends");
                return Ok(());
            }
        } else {
            idle_since = None;
        }
        let slack = SLACK.as_millis() as u64;
        let due: Vec<(PodUid, Epoch)> = book
            .iter()
            .filter(|(uid, lease)| {
                lease.deadline_ms().saturating_add(slack) <= now
                    && !removed.contains(&((*uid).clone(), lease.epoch))
            })
            .map(|(uid, lease)| (uid.clone(), lease.epoch))
            .collect();
        // All at once: removed one after another, the last of many copies whose leases
        // ran out together would go seconds late, past the owner's margin.
        let results = futures::future::join_all(
            due.iter()
                .map(|(uid, epoch)| remove_copy(runtime.as_ref(), &agent, uid, *epoch)),
        )
        .await;
        for ((uid, epoch), result) in due.into_iter().zip(results) {
            match result {
                Ok(count) => {
                    if count > 0 {
                        tracing::warn!(%uid, %epoch, "lease ran out and the agent did not stop the copy; removed it");
                    }
                    removed.insert((uid, epoch));
                }
                Err(e) => {
                    tracing::warn!(%uid, error = %e, "cannot remove a copy whose lease ran out; retrying")
                }
            }
        }
        removed.retain(|(uid, epoch)| book.get(uid).is_some_and(|l| l.epoch == *epoch));
        tokio::time::sleep(CHECK).await;
    }
}

/// The agent's leases; none if the file is gone (its directory removed) or unreadable.
fn read_leases(path: &Path) -> LeaseBook {
    match std::fs::read(path) {
        Ok(bytes) => LeaseBook::from_json(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "unreadable lease file");
            LeaseBook::default()
        }),
        Err(_) => LeaseBook::default(),
    }
}

/// Removes this agent's Podman pods of `uid` at `epoch`; how many there were.
async fn remove_copy(
    runtime: &dyn Runtime,
    agent: &str,
    uid: &PodUid,
    epoch: Epoch,
) -> Result<usize, RuntimeError> {
    let epoch = epoch.to_string();
    let copies: Vec<_> = runtime
        .list_pods(labels::POD_UID, &uid.0)
        .await?
        .into_iter()
        .filter(|p| {
            p.labels.get(labels::AGENT).map(String::as_str) == Some(agent)
                && p.labels.get(labels::EPOCH) == Some(&epoch)
        })
        .collect();
    for copy in &copies {
        // Killed without the pod's grace period: the lease is over, and the owner's
        // margin is all the time there is.
        stop_and_remove(runtime, copy, Duration::ZERO).await?;
    }
    Ok(copies.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holds_the_lock_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = try_lock(dir.path()).expect("lock").expect("free");
        assert!(try_lock(dir.path()).expect("lock").is_none());
        drop(first);
        assert!(try_lock(dir.path()).expect("lock").is_some());
    }
}
