//! The agent's groups: one Raft member per group the owner named this agent in, the
//! members' calls to it, and the way its pods' reads and writes reach the leader.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{PeerId, StreamProtocol};
use openraft::error::RaftError;
use openraft::{ChangeMembers, SnapshotPolicy};
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use super::api;
use super::kv::{is_copy_on, Command, Outcome};
use super::rpc::{self, Call, CallFrame, Read, ReadResult, Reply, ServeError, MAX_FRAME_BYTES};
use super::store::{LogStore, SharedState, StateMachine, MAX_SNAPSHOT_BYTES};
use super::{members_of, node_id, peer_of, GroupKey, NodeId, Raft};
use crate::audit::{self, Outcome as AuditOutcome};
use crate::kubelet::relay::{read_message, write_message};
use crate::mesh::{MeshError, MeshHandle};
use crate::metrics::Metrics;
use crate::trust::{group, TrustedPeers};
use crate::wire::{Epoch, PodRef, PodUid, Response, SignedGroup, RAFT_PROTOCOL};
use sha2::Digest;

/// Calls from members served at once; streams beyond are closed.
const MAX_CALLS: usize = 256;
/// How long a member has to send its call once its stream is open.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a member looks at its group's membership besides when told.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// A group this agent runs no pod of for this long is left, even if the owner's word
/// that says so was lost.
const ORPHAN_AFTER: Duration = Duration::from_secs(60);
/// How often the agent looks for group state on disk that no group here uses.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// The most groups an agent is a member of at once.
const MAX_GROUPS: usize = 1024;
/// How long a forwarded read or write, or a learner catching up, may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// How the agent's groups run.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// A snapshot is taken, and the log before it dropped, after this many entries.
    pub snapshot_entries: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            snapshot_entries: 1000,
            // A follower that hears no leader for 0.75 to 1.5 s stands for election:
            // fail-over in about two of those, and no spurious elections from a busy
            // host's pauses of a few heartbeats.
            heartbeat_ms: 150,
            election_timeout_min_ms: 750,
            election_timeout_max_ms: 1500,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GroupsError {
    #[error("cannot open the group's storage: {0}")]
    Storage(#[from] std::io::Error),
    #[error("cannot start the group's Raft member: {0}")]
    Raft(String),
}

/// Why a pod's read or write was not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("this agent is not (yet) a member of group {0}")]
    NoGroup(String),
    #[error("the group has no leader at the moment")]
    NoLeader,
    #[error("the write's outcome is unknown: {0}")]
    Unknown(String),
    #[error("{0}")]
    Failed(String),
}

/// How this agent's member stands in a group: what its pods' status says
/// ([`crate::raft::GROUP_READY_CONDITION`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    /// Ready: a voter of a group that has a leader. The reason is then `Leader` or
    /// `Follower`.
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
    pub term: u64,
}

impl Standing {
    fn not_member(key: &GroupKey) -> Standing {
        Standing {
            ready: false,
            reason: "NotAMember",
            message: format!("this agent is not (yet) a member of group {key}"),
            term: 0,
        }
    }

    pub fn leads(&self) -> bool {
        self.ready && self.reason == "Leader"
    }

    /// The standing of a pod that shares the leading agent with the pod that speaks for
    /// it (see [`Groups::speaks_for_agent`]): one leader per group, as pods see it.
    fn into_follower(mut self) -> Standing {
        if self.leads() {
            self.reason = "Follower";
            self.message = format!(
                "another pod on this agent speaks for the group's leader (term {})",
                self.term
            );
        }
        self
    }
}

/// A member's standing from what its Raft member knows.
fn standing_of(
    key: &GroupKey,
    me: NodeId,
    leader: Option<NodeId>,
    voters: &BTreeSet<NodeId>,
    term: u64,
) -> Standing {
    let (ready, reason, message) = if !voters.contains(&me) {
        (
            false,
            "CatchingUp",
            format!("this agent's member of group {key} is catching up and does not vote yet"),
        )
    } else {
        match leader {
            None => (
                false,
                "NoLeader",
                format!("group {key} has no leader (term {term})"),
            ),
            Some(l) if l == me => (
                true,
                "Leader",
                format!("this pod's member leads group {key} (term {term})"),
            ),
            Some(_) => (
                true,
                "Follower",
                format!("this pod's member follows the leader of group {key} (term {term})"),
            ),
        }
    };
    Standing {
        ready,
        reason,
        message,
        term,
    }
}

/// One group this agent is a member of.
struct Group {
    key: GroupKey,
    joined: Instant,
    /// This member's node ID.
    me: NodeId,
    raft: Raft,
    state: SharedState,
    dir: PathBuf,
    /// The owner's latest word on it.
    word: Mutex<SignedGroup>,
    changed: Notify,
    cancel: CancellationToken,
}

impl Group {
    fn word(&self) -> SignedGroup {
        locked(&self.word).clone()
    }

    fn names(&self, peer: &PeerId) -> bool {
        self.word().members.iter().any(|m| m.agent.0 == *peer)
    }
}

struct Inner {
    me: PeerId,
    mesh: MeshHandle,
    owners: TrustedPeers,
    root: PathBuf,
    config: GroupConfig,
    metrics: Metrics,
    groups: Mutex<HashMap<GroupKey, Arc<Group>>>,
    /// The pods of each group this agent runs, and since when it runs none.
    pods: Mutex<HashMap<GroupKey, LocalPods>>,
    /// Each pod copy's socket: its group, and the token that stops its API.
    sockets: Mutex<HashMap<(PodUid, Epoch), (GroupKey, CancellationToken)>>,
    /// How this agent stands in each group it runs pods of, or is a member of.
    standings: Mutex<HashMap<GroupKey, watch::Sender<Standing>>>,
}

/// A group's pods on this agent, and since when there are none.
type LocalPods = (BTreeSet<PodRef>, Option<Instant>);

/// The agent's groups. Cheap to clone.
#[derive(Clone)]
pub struct Groups {
    inner: Arc<Inner>,
}

impl Groups {
    /// Groups kept under `root` (in the agent's state directory).
    pub fn new(
        me: PeerId,
        mesh: MeshHandle,
        owners: TrustedPeers,
        root: PathBuf,
        config: GroupConfig,
        metrics: Metrics,
    ) -> Groups {
        Groups {
            inner: Arc::new(Inner {
                me,
                mesh,
                owners,
                root,
                config,
                metrics,
                groups: Mutex::new(HashMap::new()),
                pods: Mutex::new(HashMap::new()),
                sockets: Mutex::new(HashMap::new()),
                standings: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn group(&self, key: &GroupKey) -> Option<Arc<Group>> {
        locked(&self.inner.groups).get(key).cloned()
    }

    /// The owner's word on a group, from `sender`: this agent joins, follows or leaves.
    pub async fn on_word(&self, sender: PeerId, signed: SignedGroup) -> Response {
        if !self.inner.owners.trusts(&sender) {
            return Response::Error {
                message: format!("owner {sender} is not trusted by this agent"),
            };
        }
        if let Err(e) = group::verify(&signed, &sender) {
            self.inner.metrics.dropped("group_word", "bad_signature");
            return Response::Error {
                message: e.to_string(),
            };
        }
        let key = GroupKey {
            owner: sender,
            namespace: signed.namespace.clone(),
            name: signed.name.clone(),
        };
        let member = signed.members.iter().any(|m| m.agent.0 == self.inner.me);
        match (self.group(&key), member) {
            (Some(group), true) => {
                let mut word = locked(&group.word);
                if signed.version > word.version {
                    *word = signed;
                    drop(word);
                    group.changed.notify_one();
                }
            }
            (Some(group), false) => {
                if signed.version > group.word().version {
                    self.leave(&key, "the owner no longer names this agent")
                        .await;
                }
            }
            (None, true) => {
                if locked(&self.inner.groups).len() >= MAX_GROUPS {
                    self.inner.metrics.dropped("group_word", "too_many_groups");
                    return Response::Error {
                        message: format!("this agent is a member of {MAX_GROUPS} groups, its most"),
                    };
                }
                if let Err(e) = self.join(key.clone(), signed).await {
                    tracing::warn!(group = %key, error = %e, "cannot join group");
                    return Response::Error {
                        message: e.to_string(),
                    };
                }
            }
            (None, false) => {}
        }
        Response::Ack
    }

    async fn join(&self, key: GroupKey, word: SignedGroup) -> Result<(), GroupsError> {
        let dir = self.inner.root.join(key.dir_name());
        let log = LogStore::open(&dir)?;
        let machine = StateMachine::open(&dir.join("state"))?;
        let state = machine.shared.clone();
        let c = &self.inner.config;
        let config = openraft::Config {
            cluster_name: key.to_string(),
            heartbeat_interval: c.heartbeat_ms,
            election_timeout_min: c.election_timeout_min_ms,
            election_timeout_max: c.election_timeout_max_ms,
            // Frames stay under the stream's limit: 16 of the largest values.
            max_payload_entries: 16,
            snapshot_max_chunk_size: 1024 * 1024,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(c.snapshot_entries),
            max_in_snapshot_log_to_keep: c.snapshot_entries.min(100),
            ..Default::default()
        }
        .validate()
        .map_err(|e| GroupsError::Raft(e.to_string()))?;
        let network = rpc::Network {
            mesh: self.inner.mesh.clone(),
            group: key.clone(),
        };
        let raft = Raft::new(
            node_id(&self.inner.me),
            Arc::new(config),
            network,
            log,
            machine,
        )
        .await
        .map_err(|e| GroupsError::Raft(e.to_string()))?;
        let group = Arc::new(Group {
            key: key.clone(),
            joined: Instant::now(),
            me: node_id(&self.inner.me),
            raft,
            state,
            dir,
            word: Mutex::new(word),
            changed: Notify::new(),
            cancel: CancellationToken::new(),
        });
        let previous = locked(&self.inner.groups).insert(key.clone(), group.clone());
        if let Some(previous) = previous {
            // Two words crossed: keep one member, stop the other.
            previous.cancel.cancel();
            let _ = previous.raft.shutdown().await;
        }
        tracing::info!(group = %key, member = node_id(&self.inner.me), "joined group");
        tokio::spawn(self.clone().follow_standing(group.clone()));
        tokio::spawn(self.clone().reconcile(group));
        Ok(())
    }

    fn standing_sender(&self, key: &GroupKey) -> watch::Sender<Standing> {
        locked(&self.inner.standings)
            .entry(key.clone())
            .or_insert_with(|| watch::Sender::new(Standing::not_member(key)))
            .clone()
    }

    /// Keeps the group's standing as its Raft member changes, until it leaves.
    async fn follow_standing(self, group: Arc<Group>) {
        let standing = self.standing_sender(&group.key);
        let mut metrics = group.raft.metrics();
        loop {
            let now = {
                let m = metrics.borrow_and_update();
                let voters = m.membership_config.membership().voter_ids().collect();
                standing_of(
                    &group.key,
                    group.me,
                    m.current_leader,
                    &voters,
                    m.current_term,
                )
            };
            standing.send_if_modified(|old| {
                let changed = *old != now;
                *old = now;
                changed
            });
            tokio::select! {
                _ = group.cancel.cancelled() => break,
                changed = metrics.changed() => if changed.is_err() { break },
            }
        }
        standing.send_replace(Standing::not_member(&group.key));
    }

    /// Stops this agent's member of the group and deletes its state.
    async fn leave(&self, key: &GroupKey, why: &str) {
        let group = locked(&self.inner.groups).remove(key);
        if let Some(group) = group {
            group.cancel.cancel();
            let _ = group.raft.shutdown().await;
            if let Err(e) = tokio::fs::remove_dir_all(&group.dir).await {
                tracing::warn!(group = %key, error = %e, "cannot delete the group's state");
            }
            tracing::info!(group = %key, %why, "left group; its state is deleted");
        }
    }

    /// Follows the owner's word: the founder starts the log, the leader brings the
    /// voters in line with the members named.
    async fn reconcile(self, group: Arc<Group>) {
        let me = node_id(&self.inner.me);
        loop {
            tokio::select! {
                _ = group.cancel.cancelled() => return,
                _ = group.changed.notified() => {}
                _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            }
            if self.orphaned(&group.key) {
                self.leave(
                    &group.key,
                    "this agent has run none of its pods for a while",
                )
                .await;
                return;
            }
            let word = group.word();
            let wanted = members_of(word.members.iter().map(|m| m.agent.0));
            if word.founder.is_some_and(|f| f.0 == self.inner.me)
                && !group.raft.is_initialized().await.unwrap_or(true)
            {
                match group.raft.initialize(wanted.clone()).await {
                    Ok(()) => {
                        tracing::info!(group = %group.key, members = wanted.len(), "founded group")
                    }
                    Err(e) => tracing::debug!(group = %group.key, error = %e, "not founded"),
                }
                continue;
            }
            let metrics = group.raft.metrics().borrow().clone();
            if metrics.current_leader != Some(me) {
                continue;
            }
            let membership = metrics.membership_config.membership();
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            let wanted_ids: BTreeSet<NodeId> = wanted.keys().copied().collect();
            if wanted_ids.is_empty()
                || voters == wanted_ids
                || membership.get_joint_config().len() > 1
            {
                continue;
            }
            for (id, node) in &wanted {
                if membership.get_node(id).is_none() {
                    let added = tokio::time::timeout(
                        FORWARD_TIMEOUT,
                        group.raft.add_learner(*id, node.clone(), true),
                    )
                    .await;
                    if !matches!(added, Ok(Ok(_))) {
                        tracing::debug!(group = %group.key, member = id, "new member not caught up yet");
                    }
                }
            }
            match group
                .raft
                .change_membership(ChangeMembers::ReplaceAllVoters(wanted_ids.clone()), false)
                .await
            {
                Ok(_) => {
                    tracing::info!(group = %group.key, voters = ?wanted_ids, "group membership changed")
                }
                Err(e) => {
                    tracing::debug!(group = %group.key, error = %e, "membership not changed yet")
                }
            }
        }
    }

    /// Whether `pod` speaks for this agent in the group: the first by name of the
    /// group's pods here. Only it is the leader when this agent leads.
    pub fn speaks_for_agent(&self, key: &GroupKey, pod: &PodRef) -> bool {
        let pods = locked(&self.inner.pods);
        let first = pods
            .get(key)
            .and_then(|(pods, _)| pods.iter().min_by(|a, b| a.name.cmp(&b.name)));
        first.is_none_or(|first| first.uid == pod.uid)
    }

    /// How `pod` stands in its group: its agent's standing, as a follower unless it
    /// speaks for its agent.
    pub fn standing_of_pod(&self, key: &GroupKey, pod: &PodRef, agent: Standing) -> Standing {
        if self.speaks_for_agent(key, pod) {
            agent
        } else {
            agent.into_follower()
        }
    }

    fn names_anywhere(&self, peer: &PeerId) -> bool {
        let groups = locked(&self.inner.groups);
        groups.values().any(|g| g.names(peer))
    }

    /// Counts and audits a refused call.
    fn refuse(&self, peer: PeerId, why: &str) {
        self.inner.metrics.dropped("raft_stream", "not_a_member");
        audit::record(
            &self.inner.metrics,
            "raft_call",
            AuditOutcome::Refused,
            &peer,
            None,
            &why,
        );
    }

    fn runs_pods_of(&self, key: &GroupKey) -> bool {
        let pods = locked(&self.inner.pods);
        pods.get(key).is_some_and(|(pods, _)| !pods.is_empty())
    }

    fn orphaned(&self, key: &GroupKey) -> bool {
        let pods = locked(&self.inner.pods);
        match pods.get(key) {
            Some((_, Some(since))) => since.elapsed() > ORPHAN_AFTER,
            Some((_, None)) => false,
            // Named before its pod started here: it has the same while to start.
            None => self
                .group(key)
                .is_some_and(|g| g.joined.elapsed() > ORPHAN_AFTER),
        }
    }

    /// Where a copy of a grouped pod finds its group: a directory with the pod's
    /// socket, whose API serves until [`Groups::detach_pod`], and how the agent stands
    /// in the group. The same path for the same copy, so that a restarted agent's new
    /// socket appears in the running containers.
    pub fn attach_pod(
        &self,
        key: GroupKey,
        pod: &PodRef,
        epoch: Epoch,
    ) -> std::io::Result<(PathBuf, watch::Receiver<Standing>)> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.socket_dir(pod, epoch);
        std::fs::create_dir_all(&dir)?;
        // Any user in the pod's containers reaches the socket; nobody else sees the
        // directory (the agent's state directory is private).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let listener = api::bind(&dir.join("group.sock"))?;
        let cancel = CancellationToken::new();
        let previous = locked(&self.inner.sockets)
            .insert((pod.uid.clone(), epoch), (key.clone(), cancel.clone()));
        if let Some((_, previous)) = previous {
            previous.cancel();
        }
        self.pod_started(&key, pod);
        let pod_api = api::PodApi {
            groups: self.clone(),
            group: key,
            pod: pod.clone(),
        };
        let standing = self.standing_sender(&pod_api.group).subscribe();
        tokio::spawn(api::serve(listener, pod_api, cancel));
        Ok((dir, standing))
    }

    /// The copy's containers are gone: its API stops, its socket goes.
    pub async fn detach_pod(&self, pod: &PodRef, epoch: Epoch) {
        let attached = locked(&self.inner.sockets).remove(&(pod.uid.clone(), epoch));
        let Some((key, cancel)) = attached else {
            return;
        };
        cancel.cancel();
        self.pod_stopped(&key, pod);
        if self.group(&key).is_none() && !self.runs_pods_of(&key) {
            locked(&self.inner.standings).remove(&key);
        }
        let _ = tokio::fs::remove_dir_all(self.socket_dir(pod, epoch)).await;
    }

    /// A short path: a socket's path must fit in 108 bytes.
    fn socket_dir(&self, pod: &PodRef, epoch: Epoch) -> PathBuf {
        let name = hex::encode(&sha2::Sha256::digest(pod.uid.0.as_bytes())[..8]);
        self.inner.root.join("pods").join(format!("{name}_{epoch}"))
    }

    /// A pod of the group runs here now.
    fn pod_started(&self, key: &GroupKey, pod: &PodRef) {
        let mut pods = locked(&self.inner.pods);
        let entry = pods.entry(key.clone()).or_default();
        entry.0.insert(pod.clone());
        entry.1 = None;
    }

    /// A pod of the group no longer runs here.
    fn pod_stopped(&self, key: &GroupKey, pod: &PodRef) {
        let mut pods = locked(&self.inner.pods);
        if let Some(entry) = pods.get_mut(key) {
            entry.0.remove(pod);
            if entry.0.is_empty() {
                entry.1 = Some(Instant::now());
            }
        }
    }

    /// The group's current leader, as this member knows it, and the term.
    pub fn leader(&self, key: &GroupKey) -> Result<(Option<PeerId>, u64), ServiceError> {
        let group = self
            .group(key)
            .ok_or_else(|| ServiceError::NoGroup(key.to_string()))?;
        let metrics = group.raft.metrics().borrow().clone();
        let leader = metrics.current_leader.and_then(|id| {
            metrics
                .membership_config
                .membership()
                .get_node(&id)
                .and_then(peer_of)
        });
        Ok((leader, metrics.current_term))
    }

    /// Waits until the group's leader or term differs from `seen`, or `timeout` passes.
    pub async fn leader_change(
        &self,
        key: &GroupKey,
        seen: (Option<PeerId>, u64),
        timeout: Duration,
    ) {
        let Some(group) = self.group(key) else {
            return;
        };
        let mut metrics = group.raft.metrics();
        let wait = async {
            loop {
                if metrics.changed().await.is_err() {
                    return;
                }
                if self.leader(key).ok() != Some(seen) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }

    /// The owner's latest word on the group.
    pub fn word(&self, key: &GroupKey) -> Option<SignedGroup> {
        self.group(key).map(|g| g.word())
    }

    /// What this member has applied (not a linearizable read: for waiting on changes).
    pub fn state(&self, key: &GroupKey) -> Option<SharedState> {
        self.group(key).map(|g| g.state.clone())
    }

    /// This agent's peer ID.
    pub fn me(&self) -> PeerId {
        self.inner.me
    }

    /// Commits a pod's write, through the leader.
    pub async fn propose(
        &self,
        key: &GroupKey,
        command: Command,
    ) -> Result<(u64, Outcome), ServiceError> {
        self.ask_leader(key, Forward::Propose(command), |reply| match reply {
            Reply::Proposed(result) => Some(result),
            _ => None,
        })
        .await
    }

    /// A linearizable read, through the leader.
    pub async fn read(&self, key: &GroupKey, read: Read) -> Result<ReadResult, ServiceError> {
        self.ask_leader(key, Forward::Read(read), |reply| match reply {
            Reply::Read(result) => Some(result),
            _ => None,
        })
        .await
    }

    /// The leader's answer to `forward`, as `answer` picks it from its reply.
    async fn ask_leader<T>(
        &self,
        key: &GroupKey,
        forward: Forward,
        answer: impl FnOnce(Reply) -> Option<Result<T, ServeError>>,
    ) -> Result<T, ServiceError> {
        let group = self
            .group(key)
            .ok_or_else(|| ServiceError::NoGroup(key.to_string()))?;
        let reply = self.through_leader(&group, forward).await?;
        answer(reply)
            .ok_or_else(|| ServiceError::Failed("the leader answered another call".into()))?
            .map_err(served)
    }

    /// Serves `call` on the leader: here if this member leads, else forwarded to it.
    /// Tried again while there is no leader or the one asked no longer leads, until
    /// [`FORWARD_TIMEOUT`]; a write whose forwarding failed midway is not tried again
    /// (it may have been committed).
    async fn through_leader(
        &self,
        group: &Arc<Group>,
        call: Forward,
    ) -> Result<Reply, ServiceError> {
        let deadline = Instant::now() + FORWARD_TIMEOUT;
        let me = node_id(&self.inner.me);
        let write = matches!(call, Forward::Propose(_));
        loop {
            let metrics = group.raft.metrics().borrow().clone();
            let leader = metrics.current_leader;
            let reply = match leader {
                Some(id) if id == me => {
                    // A leader cut off from its quorum waits for it: as long as a
                    // forwarded call may, not for ever.
                    let ttl = deadline.saturating_duration_since(Instant::now());
                    let served = serve_locally(group, call.clone().into(), &self.inner.me);
                    match tokio::time::timeout(ttl, served).await {
                        Ok(reply) => Some(reply),
                        Err(_) if write => {
                            return Err(ServiceError::Unknown(
                                "no quorum answered in time; the write may still be committed"
                                    .into(),
                            ))
                        }
                        Err(_) => None,
                    }
                }
                Some(id) => {
                    let peer = metrics
                        .membership_config
                        .membership()
                        .get_node(&id)
                        .and_then(peer_of);
                    match peer {
                        Some(peer) => {
                            let ttl = deadline.saturating_duration_since(Instant::now());
                            match rpc::call(
                                &self.inner.mesh,
                                peer,
                                &group.key,
                                call.clone().into(),
                                ttl,
                            )
                            .await
                            {
                                Ok(reply) => Some(reply),
                                Err(rpc::CallError::Mesh(_)) | Err(rpc::CallError::Refused(_)) => {
                                    None
                                }
                                Err(e) if write => {
                                    return Err(ServiceError::Unknown(e.to_string()))
                                }
                                Err(_) => None,
                            }
                        }
                        None => None,
                    }
                }
                None => None,
            };
            let not_leader = matches!(
                &reply,
                Some(Reply::Proposed(Err(ServeError::NotLeader { .. })))
                    | Some(Reply::Read(Err(ServeError::NotLeader { .. })))
            );
            if let (Some(reply), false) = (reply, not_leader) {
                return Ok(reply);
            }
            if Instant::now() >= deadline {
                return Err(ServiceError::NoLeader);
            }
            let mut changes = group.raft.metrics();
            let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
        }
    }

    /// Deletes the state of groups this agent neither takes part in nor runs a pod of,
    /// once it has been so for [`ORPHAN_AFTER`]: what an agent restarted after its last
    /// word on a group finds on disk (a word with no members goes out once), which no
    /// word opens again.
    async fn sweep_left_behind(self, cancel: CancellationToken) {
        let mut unused_since: HashMap<std::ffi::OsString, Instant> = HashMap::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
            }
            let mut in_use: HashSet<String> = locked(&self.inner.groups)
                .keys()
                .map(GroupKey::dir_name)
                .collect();
            in_use.extend(
                locked(&self.inner.pods)
                    .iter()
                    .filter(|(_, (pods, _))| !pods.is_empty())
                    .map(|(key, _)| key.dir_name()),
            );
            let Ok(mut entries) = tokio::fs::read_dir(&self.inner.root).await else {
                continue;
            };
            let mut unused = HashSet::new();
            while let Ok(Some(entry)) = entries.next_entry().await {
                let name = entry.file_name();
                let text = name.to_string_lossy();
                if text == "pods" || in_use.contains(text.as_ref()) {
                    continue;
                }
                unused.insert(name.clone());
                let since = *unused_since.entry(name).or_insert_with(Instant::now);
                if since.elapsed() > ORPHAN_AFTER {
                    match tokio::fs::remove_dir_all(entry.path()).await {
                        Ok(()) => {
                            tracing::info!(dir = %entry.path().display(), "deleted the state of a group this agent no longer takes part in")
                        }
                        Err(e) => {
                            tracing::warn!(dir = %entry.path().display(), error = %e, "cannot delete the state of a group left behind")
                        }
                    }
                }
            }
            unused_since.retain(|name, _| unused.contains(name));
        }
    }

    /// Serves members' calls until cancelled.
    pub async fn serve(self, cancel: CancellationToken) -> Result<(), MeshError> {
        let mut incoming = self
            .inner
            .mesh
            .accept_streams(StreamProtocol::new(RAFT_PROTOCOL))?;
        tokio::spawn(self.clone().sweep_left_behind(cancel.clone()));
        let calls = Arc::new(Semaphore::new(MAX_CALLS));
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => break,
                next = incoming.next() => next,
            };
            let Some((peer, stream)) = next else { break };
            // A peer no group here names is closed unread, before it holds a slot:
            // strangers cost no buffer and cannot crowd the members out.
            if !self.names_anywhere(&peer) {
                self.refuse(peer, "a member of no group here");
                drop(stream);
                continue;
            }
            let Ok(permit) = calls.clone().try_acquire_owned() else {
                self.inner.metrics.dropped("raft_stream", "too_many");
                continue;
            };
            let groups = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(reason) = groups.answer(peer, stream).await {
                    tracing::debug!(%peer, %reason, "raft call not served");
                }
            });
        }
        let groups: Vec<GroupKey> = locked(&self.inner.groups).keys().cloned().collect();
        for key in groups {
            if let Some(group) = self.group(&key) {
                group.cancel.cancel();
                let _ = group.raft.shutdown().await;
            }
        }
        Ok(())
    }

    async fn answer(&self, peer: PeerId, stream: libp2p::Stream) -> Result<(), String> {
        let mut io = stream.compat();
        let frame: CallFrame =
            tokio::time::timeout(CALL_TIMEOUT, read_message(&mut io, MAX_FRAME_BYTES))
                .await
                .map_err(|_| "no call in time".to_owned())?
                .map_err(|e| e.to_string())?;
        let key = frame.group();
        let group = self.group(&key).filter(|g| g.names(&peer));
        let reply = match group {
            Some(group) => serve_locally(&group, frame.call, &peer).await,
            None => {
                self.refuse(peer, &format!("not a member of group {key}"));
                Reply::Refused {
                    reason: format!("{peer} is not a member of group {key} here"),
                }
            }
        };
        write_message(&mut io, &reply, MAX_FRAME_BYTES)
            .await
            .map_err(|e| e.to_string())
    }
}

/// A lock's data, even if a thread panicked holding it: no update here is left
/// half-done by a panic.
fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn served(e: ServeError) -> ServiceError {
    match e {
        ServeError::NotLeader { .. } => ServiceError::NoLeader,
        ServeError::Failed { message } => ServiceError::Failed(message),
        ServeError::Unknown { message } => ServiceError::Unknown(message),
    }
}

/// A pod's read or write on its way to the leader.
#[derive(Clone)]
enum Forward {
    Propose(Command),
    Read(Read),
}

impl From<Forward> for Call {
    fn from(forward: Forward) -> Call {
        match forward {
            Forward::Propose(command) => Call::Propose(command),
            Forward::Read(read) => Call::Read(read),
        }
    }
}

/// Whether the owner's word lets agent `caller` propose `command`: a pod's seat is
/// taken or renewed only by an agent the word places that pod on, for a copy of its
/// own, and given back only by the copy's agent; a lock is taken or given back only
/// for a pod the word places on the caller. Any member can write keys: they are its
/// pods' shared data.
fn admits(word: &SignedGroup, caller: &PeerId, command: &Command) -> Result<(), String> {
    let places = |pod: &str| {
        word.members
            .iter()
            .any(|m| m.agent.0 == *caller && m.pod.name == pod)
    };
    let own_copy = |holder: &str| is_copy_on(holder, caller);
    match command {
        Command::Put { .. } | Command::Delete { .. } => Ok(()),
        Command::Seat { holder, .. } if !own_copy(holder) => Err(format!(
            "agent {caller} cannot seat {holder}: not a copy of its own"
        )),
        Command::Seat { pod, .. } if !places(pod) => Err(format!(
            "agent {caller} cannot seat pod {pod}: the owner placed no such pod there"
        )),
        Command::Unseat { holder, .. } if !own_copy(holder) => Err(format!(
            "agent {caller} cannot give back the seat of {holder}: not a copy of its own"
        )),
        Command::Lock { holder, .. } | Command::Unlock { holder, .. } if !places(holder) => {
            Err(format!(
                "agent {caller} cannot lock for pod {holder}: the owner placed no such pod there"
            ))
        }
        Command::Seat { .. }
        | Command::Unseat { .. }
        | Command::Lock { .. }
        | Command::Unlock { .. } => Ok(()),
    }
}

/// Serves a call on this member, from agent `caller` (this one for its own pods').
async fn serve_locally(group: &Group, call: Call, caller: &PeerId) -> Reply {
    match call {
        Call::AppendEntries(rpc) => Reply::AppendEntries(group.raft.append_entries(rpc).await),
        Call::Vote(rpc) => Reply::Vote(group.raft.vote(rpc).await),
        Call::InstallSnapshot(rpc) => {
            // The chunk lands at its offset in memory: one past the largest snapshot
            // would only grow the buffer.
            let end = rpc.offset.saturating_add(rpc.data.len() as u64);
            if end > MAX_SNAPSHOT_BYTES as u64 {
                return Reply::Refused {
                    reason: format!(
                        "a snapshot chunk ending at byte {end} is past the largest snapshot"
                    ),
                };
            }
            Reply::InstallSnapshot(group.raft.install_snapshot(rpc).await)
        }
        Call::Propose(mut command) => {
            // Leases run on the leader's clock.
            if let Command::Lock { now_ms, .. } = &mut command {
                *now_ms = crate::trust::replay::unix_millis();
            }
            if let Err(e) = command.check() {
                return Reply::Proposed(Err(ServeError::Failed {
                    message: e.to_string(),
                }));
            }
            if let Err(message) = admits(&locked(&group.word), caller, &command) {
                tracing::warn!(group = %group.key, %message, "refused a member's write");
                return Reply::Proposed(Err(ServeError::Failed { message }));
            }
            // Only a write never proposed may be tried again elsewhere: one this
            // member proposed and then lost the lead over may still be committed.
            let leader = group.raft.metrics().borrow().current_leader;
            if leader != Some(group.me) {
                return Reply::Proposed(Err(ServeError::NotLeader { leader }));
            }
            Reply::Proposed(match group.raft.client_write(command).await {
                Ok(written) => Ok((written.log_id.index, written.data)),
                Err(e) => Err(ServeError::Unknown {
                    message: format!("the write's outcome is unknown: {e}"),
                }),
            })
        }
        Call::Read(read) => Reply::Read(match group.raft.ensure_linearizable().await {
            Ok(_) => Ok(group.state.read(|applied| ReadResult {
                index: applied.last_applied.map_or(0, |l| l.index),
                items: match &read {
                    Read::Key { key } => applied
                        .kv
                        .get(key)
                        .map(|item| (key.clone(), item.clone()))
                        .into_iter()
                        .collect(),
                    Read::Prefix { prefix } => applied
                        .kv
                        .with_prefix(prefix)
                        .map(|(k, item)| (k.clone(), item.clone()))
                        .collect(),
                },
            })),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ServeError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Err(e) => Err(ServeError::Failed {
                message: e.to_string(),
            }),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{GroupMember, PeerRef};

    #[test]
    fn only_the_agent_a_pod_is_placed_on_takes_its_seat_or_lock_and_only_for_its_own_copy() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let member = |agent: PeerId, name: &str| GroupMember {
            agent: PeerRef(agent),
            pod: PodRef {
                uid: PodUid(format!("uid-{name}")),
                namespace: "default".into(),
                name: name.into(),
            },
        };
        let word = SignedGroup {
            owner: PeerRef(PeerId::random()),
            namespace: "default".into(),
            name: "db".into(),
            version: 1,
            founder: Some(PeerRef(a)),
            members: vec![member(a, "db-0"), member(b, "db-1")],
            signature: String::new(),
        };
        let seat = |pod: &str, holder: String| Command::Seat {
            pod: pod.into(),
            holder,
            expect: 0,
        };
        let lock = |holder: &str| Command::Lock {
            name: "l".into(),
            holder: holder.into(),
            lease_ms: 1000,
            now_ms: 0,
        };
        let unlock = |holder: &str| Command::Unlock {
            name: "l".into(),
            holder: holder.into(),
            token: 1,
        };
        let unseat = |holder: String| Command::Unseat {
            pod: "db-0".into(),
            holder,
        };
        assert_eq!(admits(&word, &a, &seat("db-0", format!("{a}/3"))), Ok(()));
        assert_eq!(admits(&word, &a, &unseat(format!("{a}/3"))), Ok(()));
        assert_eq!(admits(&word, &a, &lock("db-0")), Ok(()));
        assert_eq!(admits(&word, &a, &unlock("db-0")), Ok(()));
        // b runs db-1, not db-0: it seats and locks for db-0 in no one's name.
        let refused = admits(&word, &b, &seat("db-0", format!("{b}/1"))).unwrap_err();
        assert!(refused.contains("placed no such pod"), "{refused}");
        let refused = admits(&word, &b, &seat("db-1", format!("{a}/3"))).unwrap_err();
        assert!(refused.contains("not a copy of its own"), "{refused}");
        assert!(admits(&word, &b, &seat("db-1", format!("{a}"))).is_err());
        assert!(admits(&word, &b, &seat("db-1", format!("{b}x/1"))).is_err());
        assert!(admits(&word, &b, &unseat(format!("{a}/3"))).is_err());
        assert!(admits(&word, &b, &lock("db-0")).is_err());
        assert!(admits(&word, &b, &unlock("db-0")).is_err());
        // Keys are the pods' shared data.
        let put = Command::Put {
            key: "k".into(),
            value: "v".into(),
            expect: None,
        };
        assert_eq!(admits(&word, &b, &put), Ok(()));
    }

    #[test]
    fn a_member_is_ready_as_a_voter_of_a_group_with_a_leader() {
        let key = GroupKey {
            owner: PeerId::random(),
            namespace: "default".into(),
            name: "db".into(),
        };
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        let leader = standing_of(&key, 1, Some(1), &voters, 4);
        assert!(leader.ready && leader.leads());
        assert_eq!(leader.reason, "Leader");
        let follower = standing_of(&key, 2, Some(1), &voters, 4);
        assert!(follower.ready && !follower.leads());
        assert_eq!(follower.reason, "Follower");
        let leaderless = standing_of(&key, 2, None, &voters, 5);
        assert!(!leaderless.ready);
        assert_eq!(leaderless.reason, "NoLeader");
        assert!(
            leaderless.message.contains("term 5"),
            "{}",
            leaderless.message
        );
        let learner = standing_of(&key, 9, Some(1), &voters, 4);
        assert_eq!((learner.ready, learner.reason), (false, "CatchingUp"));
        assert_eq!(Standing::not_member(&key).reason, "NotAMember");
    }
}
