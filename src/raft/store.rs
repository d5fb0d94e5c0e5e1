//! A member's durable part of its group: the Raft log and vote (one file per entry, each
//! flushed before openraft hears it is written), and the state machine with its
//! snapshot. Everything lives under the group's directory in the agent's state
//! directory, and goes with it when the group does.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::kv::{Kv, Outcome};
use super::{Entry, Member, NodeId, TypeConfig};
use crate::durable::write_atomically;

/// Files are the agent's alone.
const FILE_MODE: u32 = 0o600;
/// The largest snapshot read back or accepted: the store's limit and room for encoding.
pub const MAX_SNAPSHOT_BYTES: usize = 4 * super::kv::MAX_STORE_BYTES;

type StoreResult<T> = Result<T, StorageError<NodeId>>;

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(std::io::Error::other)?
}

fn entry_file(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("{index:020}"))
}

#[derive(Default)]
struct Log {
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
}

/// The log and vote, cached in memory (the snapshot policy keeps the log short) and
/// written through to disk. Cloning shares it: openraft's log reader is a clone.
#[derive(Clone)]
pub struct LogStore {
    dir: PathBuf,
    log: Arc<Mutex<Log>>,
}

impl LogStore {
    /// Opens the log under `dir`, reading back what an earlier run wrote. An entry file
    /// that does not decode (cut short by a crash before it was flushed, so never
    /// acknowledged) ends the log there; the files after it are removed.
    pub fn open(dir: &Path) -> std::io::Result<LogStore> {
        let entries_dir = dir.join("log");
        std::fs::create_dir_all(&entries_dir)?;
        let read_json = |path: PathBuf| -> std::io::Result<Option<Vec<u8>>> {
            match std::fs::read(path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        };
        let mut log = Log::default();
        if let Some(bytes) = read_json(dir.join("vote"))? {
            log.vote = serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
        }
        if let Some(bytes) = read_json(dir.join("purged"))? {
            log.last_purged = serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
        }
        let mut indexes: Vec<u64> = std::fs::read_dir(&entries_dir)?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        indexes.sort_unstable();
        let mut broken = false;
        for index in indexes {
            let path = entry_file(&entries_dir, index);
            let entry = (!broken)
                .then(|| std::fs::read(&path).ok())
                .flatten()
                .and_then(|bytes| serde_json::from_slice::<Entry>(&bytes).ok())
                .filter(|entry| entry.log_id.index == index);
            match entry {
                Some(entry) => {
                    log.entries.insert(index, entry);
                }
                None => {
                    broken = true;
                    std::fs::remove_file(&path)?;
                }
            }
        }
        Ok(LogStore {
            dir: dir.to_owned(),
            log: Arc::new(Mutex::new(log)),
        })
    }

    fn entries_dir(&self) -> PathBuf {
        self.dir.join("log")
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        // A panic while holding it cannot leave the map half-changed.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes the entries with indexes in `indexes`: their files, flushed with the
    /// directory, then the cached entries.
    async fn remove(&self, indexes: Vec<u64>) -> StoreResult<()> {
        let dir = self.entries_dir();
        let files = indexes.clone();
        blocking(move || {
            for index in files {
                match std::fs::remove_file(entry_file(&dir, index)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e))?;
        let mut log = self.log();
        for index in indexes {
            log.entries.remove(&index);
        }
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry>> {
        Ok(self
            .log()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let log = self.log();
        let last = log.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: log.last_purged,
            last_log_id: last.or(log.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        let bytes = serde_json::to_vec(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        let path = self.dir.join("vote");
        blocking(move || write_atomically(&path, &bytes, FILE_MODE))
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.log().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        Ok(self.log().vote)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut files = Vec::with_capacity(entries.len());
        for entry in &entries {
            let bytes = serde_json::to_vec(entry).map_err(|e| StorageIOError::write_logs(&e))?;
            files.push((entry_file(&self.entries_dir(), entry.log_id.index), bytes));
        }
        let dir = self.entries_dir();
        let written = blocking(move || {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            for (path, bytes) in files {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(FILE_MODE)
                    .open(path)?;
                file.write_all(&bytes)?;
                file.sync_data()?;
            }
            std::fs::File::open(&dir)?.sync_all()
        })
        .await;
        match written {
            Ok(()) => {
                let mut log = self.log();
                for entry in entries {
                    log.entries.insert(entry.log_id.index, entry);
                }
                drop(log);
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let error = StorageIOError::write_logs(&e);
                callback.log_io_completed(Err(e));
                Err(error.into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        let gone = self
            .log()
            .entries
            .range(log_id.index..)
            .map(|(i, _)| *i)
            .collect();
        self.remove(gone).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        // The purge point first: a crash between the two leaves files below it, which
        // the next purge removes, never a log that seems to start later than it does.
        let bytes = serde_json::to_vec(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        let path = self.dir.join("purged");
        blocking(move || write_atomically(&path, &bytes, FILE_MODE))
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let gone = {
            let mut log = self.log();
            log.last_purged = Some(log_id);
            log.entries
                .range(..=log_id.index)
                .map(|(i, _)| *i)
                .collect()
        };
        self.remove(gone).await
    }
}

/// What the state machine has applied: read by the pods' API as well.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, Member>,
    pub kv: Kv,
}

/// The applied state, shared with readers; `changed` carries the last applied index,
/// for watches.
#[derive(Clone)]
pub struct SharedState {
    state: Arc<RwLock<Applied>>,
    changed: watch::Sender<u64>,
}

impl SharedState {
    fn new(applied: Applied) -> SharedState {
        let index = applied.last_applied.map_or(0, |l| l.index);
        SharedState {
            state: Arc::new(RwLock::new(applied)),
            changed: watch::Sender::new(index),
        }
    }

    /// Reads the applied state.
    pub fn read<R>(&self, f: impl FnOnce(&Applied) -> R) -> R {
        f(&self.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn write<R>(&self, f: impl FnOnce(&mut Applied) -> R) -> R {
        let result = f(&mut self.state.write().unwrap_or_else(|e| e.into_inner()));
        let index = self.read(|a| a.last_applied.map_or(0, |l| l.index));
        self.changed.send_replace(index);
        result
    }

    /// Follows the last applied log index.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// A snapshot as written to disk and sent to members that fell behind.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    kv: Kv,
}

/// The state machine: applies committed entries to the shared state, and builds,
/// keeps and installs snapshots (on disk, so that a restarted member starts from its
/// last one and replays only the log after it).
#[derive(Clone)]
pub struct StateMachine {
    dir: PathBuf,
    pub shared: SharedState,
}

impl StateMachine {
    /// Opens the state machine under `dir`, from its last snapshot if it has one.
    pub fn open(dir: &Path) -> std::io::Result<StateMachine> {
        std::fs::create_dir_all(dir)?;
        let applied = match std::fs::read(dir.join("snapshot")) {
            Ok(bytes) => {
                let stored = decode_snapshot(&bytes).map_err(std::io::Error::other)?;
                Applied {
                    last_applied: stored.meta.last_log_id,
                    membership: stored.meta.last_membership,
                    kv: stored.kv,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Applied::default(),
            Err(e) => return Err(e),
        };
        Ok(StateMachine {
            dir: dir.to_owned(),
            shared: SharedState::new(applied),
        })
    }

    fn stored(&self) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join("snapshot")).ok()
    }

    async fn keep(&self, bytes: Vec<u8>) -> std::io::Result<()> {
        let path = self.dir.join("snapshot");
        blocking(move || write_atomically(&path, &bytes, FILE_MODE)).await
    }
}

/// A snapshot's state, read and checked as a member reads it from a peer or its disk.
pub(crate) fn decode_snapshot_state(bytes: &[u8]) -> Result<Kv, String> {
    decode_snapshot(bytes).map(|stored| stored.kv)
}

fn decode_snapshot(bytes: &[u8]) -> Result<StoredSnapshot, String> {
    if bytes.len() > MAX_SNAPSHOT_BYTES {
        return Err(format!(
            "a snapshot of {} bytes is over the limit",
            bytes.len()
        ));
    }
    let stored: StoredSnapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let kv = stored.kv.checked().map_err(|e| e.to_string())?;
    Ok(StoredSnapshot { kv, ..stored })
}

fn snapshot_of(stored: &StoredSnapshot, bytes: Vec<u8>) -> Snapshot<TypeConfig> {
    Snapshot {
        meta: stored.meta.clone(),
        snapshot: Box::new(Cursor::new(bytes)),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let stored = self.shared.read(|a| StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: a.last_applied,
                last_membership: a.membership.clone(),
                snapshot_id: a.last_applied.map_or_else(|| "0".into(), |l| l.to_string()),
            },
            kv: a.kv.clone(),
        });
        let bytes = serde_json::to_vec(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(stored.meta.signature()), &e))?;
        self.keep(bytes.clone())
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(stored.meta.signature()), &e))?;
        Ok(snapshot_of(&stored, bytes))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>)> {
        Ok(self.shared.read(|a| (a.last_applied, a.membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<Outcome>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        Ok(self.shared.write(|applied| {
            entries
                .into_iter()
                .map(|entry| {
                    applied.last_applied = Some(entry.log_id);
                    match entry.payload {
                        EntryPayload::Blank => Outcome::Internal,
                        EntryPayload::Normal(command) => {
                            applied.kv.apply(entry.log_id.index, &command)
                        }
                        EntryPayload::Membership(membership) => {
                            applied.membership =
                                StoredMembership::new(Some(entry.log_id), membership);
                            Outcome::Internal
                        }
                    }
                })
                .collect()
        }))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let bytes = snapshot.into_inner();
        let stored = decode_snapshot(&bytes).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), &std::io::Error::other(e))
        })?;
        self.keep(bytes)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.shared.write(|applied| {
            *applied = Applied {
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
                kv: stored.kv,
            }
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let Some(bytes) = self.stored() else {
            return Ok(None);
        };
        let stored = decode_snapshot(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(None, &std::io::Error::other(e)))?;
        Ok(Some(snapshot_of(&stored, bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::kv::Command;
    use crate::raft::{members_of, node_id};
    use openraft::storage::RaftLogStorageExt;
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{CommittedLeaderId, Membership};

    fn log_id(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(1, 7), index)
    }

    fn put(index: u64, key: &str) -> Entry {
        Entry {
            log_id: log_id(index),
            payload: EntryPayload::Normal(Command::Put {
                key: key.into(),
                value: format!("v{index}"),
                expect: None,
            }),
        }
    }

    async fn append(log: &mut LogStore, entries: Vec<Entry>) {
        log.blocking_append(entries).await.expect("appends");
    }

    /// Fresh storage in a directory of its own, for openraft's own storage suite.
    struct Fresh;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Fresh {
        async fn build(&self) -> StoreResult<(tempfile::TempDir, LogStore, StateMachine)> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
            let log = LogStore::open(dir.path()).map_err(|e| StorageIOError::write(&e))?;
            let machine = StateMachine::open(&dir.path().join("state"))
                .map_err(|e| StorageIOError::write(&e))?;
            Ok((dir, log, machine))
        }
    }

    #[test]
    fn the_storage_passes_openraft_s_storage_suite() {
        Suite::test_all(Fresh).expect("passes");
    }

    #[tokio::test]
    async fn the_log_and_vote_survive_a_restart_and_a_torn_entry_ends_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = LogStore::open(dir.path()).expect("opens");
        append(&mut log, (1..=5).map(|i| put(i, "k")).collect()).await;
        let vote = Vote::new_committed(3, 7);
        log.save_vote(&vote).await.expect("saves the vote");
        log.truncate(log_id(5)).await.expect("truncates");
        log.purge(log_id(1)).await.expect("purges");

        let mut back = LogStore::open(dir.path()).expect("opens again");
        assert_eq!(back.read_vote().await.expect("vote"), Some(vote));
        let state = back.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1)));
        assert_eq!(state.last_log_id, Some(log_id(4)));
        let entries = back.try_get_log_entries(0..10).await.expect("entries");
        let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
        assert_eq!(indexes, [2, 3, 4]);

        // A crash while writing entry 3 (never acknowledged): the log ends at 2.
        std::fs::write(entry_file(&dir.path().join("log"), 3), b"{\"log_id\":").expect("tears");
        let mut torn = LogStore::open(dir.path()).expect("opens a torn log");
        let state = torn.get_log_state().await.expect("state");
        assert_eq!(state.last_log_id, Some(log_id(2)));
        assert!(!entry_file(&dir.path().join("log"), 4).exists());
        for file in std::fs::read_dir(dir.path().join("log"))
            .expect("dir")
            .flatten()
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = file.metadata().expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.path().display());
        }
    }

    #[tokio::test]
    async fn a_snapshot_carries_the_state_to_another_member_and_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut machine = StateMachine::open(dir.path()).expect("opens");
        let peers = [libp2p::PeerId::random(), libp2p::PeerId::random()];
        let members = members_of(peers);
        let voters = vec![members.keys().copied().collect()];
        let membership = Entry {
            log_id: log_id(1),
            payload: EntryPayload::Membership(Membership::new(voters, members)),
        };
        let outcomes = machine
            .apply(vec![membership, put(2, "a"), put(3, "b")])
            .await
            .expect("applies");
        assert_eq!(outcomes[1], Outcome::Stored { revision: 2 });
        let snapshot = machine.build_snapshot().await.expect("builds");
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(3)));

        let other_dir = tempfile::tempdir().expect("tempdir");
        let mut other = StateMachine::open(other_dir.path()).expect("opens");
        other
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .expect("installs");
        let (applied, stored) = other.applied_state().await.expect("state");
        assert_eq!(applied, Some(log_id(3)));
        assert!(stored.membership().get_node(&node_id(&peers[0])).is_some());
        assert_eq!(
            other.shared.read(|a| a.kv.get("b").map(|i| i.revision)),
            Some(3)
        );

        // Restarted from its snapshot; a corrupt one is refused, not half-read.
        let mut reopened = StateMachine::open(other_dir.path()).expect("reopens");
        assert_eq!(
            reopened.applied_state().await.expect("state").0,
            Some(log_id(3))
        );
        let bad = Box::new(Cursor::new(b"{\"meta\":".to_vec()));
        assert!(reopened
            .install_snapshot(&snapshot.meta, bad)
            .await
            .is_err());
        assert_eq!(reopened.shared.read(|a| a.kv.len()), 2);
    }
}
