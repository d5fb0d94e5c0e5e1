//! The owner side of placement: offers pods to the mesh, assigns each to the best
//! bidder with an epoch only it raises, follows the runners' status reports, moves
//! pods off lost agents, and stops copies it no longer wants.
//!
//! Pods come from their sources (the manifest directory, the Kubernetes API) as one
//! desired set of resolved pods; status goes out through a [`StatusSink`].

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, Pod,
    PodCondition, PodSpec, PodStatus, Service,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::display::{pod_display, unscheduled};
use super::groups::{GroupBook, GroupedPod};
use super::resolve::{ResolveError, Resolved};
use super::selections::Selections;
use super::stored::{StoredPod, StoredStatus};
use super::subnets::{Exhausted, SubnetPool};
use crate::agent::status::RestartPolicy;
use crate::audit::{self, Outcome};
use crate::fencing::{fencing_of, Fencing};
use crate::mesh::MeshHandle;
use crate::metrics::Metrics;
use crate::placement::{self, AgentCapacity, Candidate, ScoreMode, AGENT_SELECTOR_ANNOTATION};
use crate::retry::Backoff;
use crate::runtime::translate;
use crate::trust::replay::{unix_millis, ReplayGuard, ReplayList};
use crate::trust::statement::{self, spec_digest};
use crate::trust::TrustedPeers;
use crate::view::{HeartbeatBook, SeenAgent};
use crate::wire::{
    AgentEvent, AgentEventReason, Assign, Bid, Epoch, GossipMessage, Heartbeat, MeshView, Offer,
    PeerRef, PodRef, PodSummary, PodUid, ReadyCount, RegistryCredential, Release, Renew, Request,
    Resources, Response, SignedAssignment, StatusReport, VolumeFile, MAX_REPORT_EVENTS,
    POLICY_REFUSAL,
};

/// A pod a source wants run: the pod as the source has it, and what resolving its
/// configMaps, secrets and volumes gave.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPod {
    /// As the source has it.
    pub pod: StoredPod,
    pub resolved: Result<Resolved, ResolveError>,
}

/// The pods sources want, by UID. Shared, not copied, between a source, the node and
/// the owner: a pod that did not change is the same allocation in each set a source
/// sends, so telling it unchanged costs a pointer comparison.
pub type DesiredPods = BTreeMap<String, Arc<DesiredPod>>;

/// Where a pod runs, as the kubelet API needs to know it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodLocation {
    pub pod: PodRef,
    /// None while the pod is not placed.
    pub agent: Option<PeerId>,
    /// Init and app container names.
    pub containers: Vec<String>,
}

/// The live agents together, as the virtual node shows them to Kubernetes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AgentsSummary {
    pub live: usize,
    /// Live agents whose container runtime passes its checks.
    pub runtime_healthy: usize,
    /// Live agents under each kind of pressure.
    pub memory_pressure: usize,
    pub disk_pressure: usize,
    pub pid_pressure: usize,
    pub capacity: Resources,
    pub storage_bytes: u64,
}

/// Where the owner's view of its pods goes (stdout, and the Kubernetes API server for
/// the API's pods).
pub trait StatusSink: Send {
    /// The pod's status changed; `agent` runs it, if any.
    fn status_changed(
        &mut self,
        pod: &PodRef,
        spec: Option<&PodSpec>,
        status: &PodStatus,
        agent: Option<PeerId>,
    );
    /// The pod is gone from the mesh.
    fn removed(&mut self, pod: &PodRef);
    /// Events its agent reported (only known reasons, bounded, see [`AgentEvent`]).
    fn events(&mut self, _pod: &PodRef, _events: &[AgentEvent]) {}
    /// The status the pod had before this node saw it (in the API, before a restart).
    fn last_known(&self, _pod: &PodUid) -> Option<PodStatus> {
        None
    }
}

/// Timings and trust of the owner.
#[derive(Debug, Clone)]
pub struct OwnerConfig {
    /// How long an offer collects bids before the best one is taken.
    pub offer_window: Duration,
    /// An agent missing heartbeats this long is lost and its pods move.
    pub agent_loss_timeout: Duration,
    /// After a start, how long agents' heartbeats are awaited before anything is
    /// offered, so that a restarted owner adopts running pods instead of starting
    /// them twice.
    pub adopt_window: Duration,
    /// How often an unschedulable pod is offered again while nothing changes.
    pub retry_interval: Duration,
    /// The agents pods may go to; heartbeats, bids and reports of others are dropped.
    pub agents: TrustedPeers,
    /// The peers `beemesh status` may ask with (Query); others get nothing.
    pub clients: TrustedPeers,
    /// How the owner ranks the agents that bid.
    pub score_mode: ScoreMode,
    /// How long a signed assignment may take to reach its agent (covers clock skew
    /// between owner and agent too).
    pub assignment_ttl: Duration,
    /// The lowest epoch of this owner's placements: above every epoch of its earlier
    /// runs, so that its placements supersede theirs, even copies it never heard of
    /// (see [`epoch_floor`]).
    pub epoch_floor: Epoch,
    /// How long a strict pod's copy runs without its owner renewing the placement
    /// (see `fencing`).
    pub lease: Duration,
    /// How much longer than the lease the owner waits before placing a strict pod
    /// again: covers the agent's clock running slower than the owner's (its lease
    /// lasts longer in real time) and the stop taking effect.
    pub fencing_margin: Duration,
    /// The node's name (`--node-name`), shown with its pods.
    pub node_name: String,
    /// Pods a scheduler bound here that ask for more than any agent has at all are
    /// rejected this long after that is first seen (Failed, `OutOfcpu`/`OutOfmemory`),
    /// as a kubelet rejects pods its node cannot hold, so that their controllers and
    /// the scheduler can act. None (standalone: the node is the only scheduler) keeps
    /// them waiting for a larger agent to join.
    pub reject_too_big_after: Option<Duration>,
    /// The mesh pod CIDR (`--mesh-pod-cidr`) and the prefix of each agent's subnet of
    /// it: an empty pool, as configured.
    pub pod_subnets: SubnetPool,
    /// The Service addresses (the cluster's Service CIDR, the mesh service range) that
    /// pods' connections to are routed by this node.
    pub cluster_ranges: Vec<Ipv4Net>,
    /// The cluster's domain, when this node answers its pods' DNS queries (its
    /// Services' names, the cluster's DNS for the rest).
    pub cluster_domain: Option<String>,
}

/// The epoch floor of the owner's `start`-th run (counted in its persisted trust
/// document, so a clock that steps back cannot lower it): each run owns the epochs
/// from `start << 32` on, room for 2^32 placements of one pod per run.
pub fn epoch_floor(start: u64) -> Epoch {
    Epoch(start.saturating_mul(1 << 32))
}

impl Default for OwnerConfig {
    fn default() -> Self {
        OwnerConfig {
            offer_window: Duration::from_millis(100),
            agent_loss_timeout: Duration::from_secs(6),
            adopt_window: Duration::from_secs(4),
            retry_interval: Duration::from_secs(5),
            agents: TrustedPeers::default(),
            clients: TrustedPeers::default(),
            score_mode: ScoreMode::default(),
            assignment_ttl: Duration::from_secs(600),
            lease: Duration::from_secs(15),
            fencing_margin: Duration::from_secs(5),
            node_name: "beemesh".into(),
            reject_too_big_after: None,
            pod_subnets: SubnetPool::default(),
            cluster_ranges: Vec::new(),
            cluster_domain: None,
            // Without a persisted count (demos with --insecure-trust-any, tests): the
            // clock in seconds, below every counted run's floor.
            epoch_floor: Epoch(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Placement {
    /// Not placed; offered when `at` has passed.
    Waiting {
        at: Instant,
    },
    /// Not placed until what it refers to exists (a new [`DesiredPod`] releases it).
    Held,
    /// An offer is collecting bids (the agents willing to take it), until `deadline`
    /// or until the `fitting` agents (by the owner's view) have all bid.
    Offering {
        deadline: Instant,
        bids: Vec<PeerId>,
        fitting: usize,
    },
    /// An assignment is in flight.
    Assigning,
    Placed {
        agent: PeerId,
    },
    /// A strict pod whose agent is unreachable: placed again once `until` has passed,
    /// when its copy there has stopped for want of a lease (see `fencing`). Taken back
    /// if the agent shows up with the placement before then.
    Fencing {
        agent: PeerId,
        until: Instant,
    },
    /// Will not run again (invalid spec, or lost with restartPolicy Never).
    Done,
}

struct OwnedPod {
    /// As the source last gave it.
    desired: Arc<DesiredPod>,
    /// The pod as assigned: resolved, or as the source has it while held.
    pod: StoredPod,
    /// The pod's creationTimestamp, read whenever its group's members are told.
    created: Option<Time>,
    volumes: Arc<BTreeMap<String, Vec<VolumeFile>>>,
    pull_credentials: Arc<Vec<RegistryCredential>>,
    /// What goes out to agents when the pod is offered; its `pod` names the pod (see
    /// [`OwnedPod::pod_ref`]).
    offer: Offer,
    grace_secs: u64,
    policy: RestartPolicy,
    epoch: Epoch,
    placement: Placement,
    status: StoredStatus,
    /// Restarts of earlier placements (lost agents), added to each container's count.
    carried_restarts: BTreeMap<String, i32>,
    /// Set after an agent loss: the lastState shown until the new run has its own.
    /// Boxed, as is `lost_copy`: rarely set, and an owner holds a million of these.
    lost_state: Option<Box<ContainerStateTerminated>>,
    deleting: bool,
    /// When the placement last became `Placed`.
    placed_at: Instant,
    fencing: Fencing,
    /// When the owner last heard the agent take or renew a strict pod's lease.
    lease_renewed_at: Instant,
    /// The status is the API's from before this node started and no agent has reported
    /// the pod since: its copy may run somewhere, so it is not offered before
    /// `offer_not_before`, and when it is, that copy counts as lost.
    inherited: bool,
    offer_not_before: Instant,
    /// A relaxed pod's copy last declared lost with its agent, while no assignment has
    /// gone out since: taken back if that agent turns up still running it.
    lost_copy: Option<Box<LostCopy>>,
    /// The highest epoch offered: an epoch offered once is never offered again, even
    /// after a lost copy of a lower one was taken back.
    offered: Epoch,
    /// Agents whose admission policy refused this spec, with their reasons: said in the
    /// status when no agent bids (such agents no longer do). At most
    /// [`MAX_POLICY_REFUSALS`], the latest.
    policy_refusals: Vec<(PeerId, String)>,
    /// An agent declined the pod the owner's view said it fits: until it is placed,
    /// the agents are asked (offer and bids) instead of trusting that view.
    ask_agents: bool,
    /// Since when the pod has asked for more than any agent has at all.
    too_big_since: Option<Instant>,
    /// Ephemeral containers (`kubectl debug`) the agent's policy refused, with the
    /// reason: left out of the pod sent to agents (so that the rest of the pod still
    /// gets its updates and later debug containers), shown waiting in the status.
    refused_ephemeral: BTreeMap<String, String>,
    /// The last status report sequence number of each agent that reported the pod.
    status_seqs: ReplayList<PeerId>,
    /// The pod as the assignment in flight carries it, when the pod changed since:
    /// sent again once an agent takes it, so that the change is not lost.
    changed_in_flight: Option<StoredPod>,
}

/// Policy refusals kept per pod: enough to tell the user why.
const MAX_POLICY_REFUSALS: usize = 8;

/// What declaring a copy lost changed, to undo if the copy turns out to run on.
struct LostCopy {
    agent: PeerId,
    epoch: Epoch,
    status: PodStatus,
    carried_restarts: BTreeMap<String, i32>,
    lost_state: Option<Box<ContainerStateTerminated>>,
}

impl OwnedPod {
    /// Which pod this is (kept once, in the offer: a million pods hold it).
    fn pod_ref(&self) -> &PodRef {
        &self.offer.pod
    }

    /// Whether the placement waits for a time (to be placed, an offer to close, a lost
    /// copy's lease to run out): what keeps the pod in the owner's due set.
    fn waits(&self) -> bool {
        matches!(
            self.placement,
            Placement::Waiting { .. } | Placement::Offering { .. } | Placement::Fencing { .. }
        )
    }

    /// When the tick next has something to do for the pod; none while it waits for
    /// nothing the tick does (deleted while waiting to be placed, say).
    fn due_at(&self) -> Option<Instant> {
        match &self.placement {
            Placement::Waiting { at } if !self.deleting => Some((*at).max(self.offer_not_before)),
            Placement::Offering { deadline, .. } => Some(*deadline),
            Placement::Fencing { until, .. } => Some(*until),
            _ => None,
        }
    }

    /// The agent the pod is placed on, if it is.
    fn placed_on(&self) -> Option<PeerId> {
        match self.placement {
            Placement::Placed { agent } => Some(agent),
            _ => None,
        }
    }

    /// The pod as the API shows it.
    fn with_status(&self) -> Pod {
        Pod {
            status: Some(self.status.get()),
            ..self.desired.pod.get()
        }
    }

    /// Waiting to be placed again (or offered, with no assignment yet) since its copy
    /// on `agent` at `epoch` was declared lost: that copy, if it runs, is the pod's
    /// newest.
    fn waits_after_losing(&self, agent: PeerId, epoch: Epoch) -> bool {
        matches!(
            self.placement,
            Placement::Waiting { .. } | Placement::Offering { .. }
        ) && self
            .lost_copy
            .as_ref()
            .is_some_and(|l| l.agent == agent && l.epoch == epoch)
    }

    /// The first lease of an assignment, for strict pods.
    fn lease_ms(&self, lease: Duration) -> Option<u64> {
        (self.fencing == Fencing::Strict).then_some(lease.as_millis() as u64)
    }
}

/// Results of spawned assignment tasks.
enum Internal {
    Assigned {
        uid: PodUid,
        epoch: Epoch,
        agent: PeerId,
    },
    AssignFailed {
        uid: PodUid,
        epoch: Epoch,
        /// Each agent asked, with its answer.
        reasons: Vec<(PeerId, String)>,
        /// An agent did not answer: it may run the pod.
        unanswered: bool,
    },
    /// The agent declined the pod's update `refused` to `previous`.
    UpdateRefused {
        uid: PodUid,
        previous: StoredPod,
        refused: StoredPod,
        reason: String,
    },
}

pub struct Owner {
    config: OwnerConfig,
    /// Signs assignments.
    signer: Keypair,
    mesh: MeshHandle,
    metrics: Metrics,
    sink: Box<dyn StatusSink>,
    /// Boxed: a pod's record is about a kilobyte, and a map of a million records
    /// keeps up to as many empty slots again.
    pods: HashMap<PodUid, Box<OwnedPod>>,
    /// The pods each Service selector picks; cleared when a pod is added, changed or
    /// removed.
    selections: Selections,
    agents: HeartbeatBook,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    adopt_until: Instant,
    /// Capacity given to each agent that its heartbeats do not show yet: taken off
    /// what they show, so that pods placed together neither over-commit an agent nor
    /// all go to the one that was emptiest before them.
    reservations: HashMap<PeerId, Vec<Reservation>>,
    /// Which agent holds each pod's reservation.
    reserved_on: HashMap<PodUid, PeerId>,
    /// Where the next search for fitting agents starts in the heartbeat book, so that
    /// a search that stops early does not always look at the same agents.
    search_from: usize,
    /// Pods that may be waiting for a time (to be placed, an offer to close, a lost
    /// copy's lease to run out): the tick looks at these only, and drops those no
    /// longer waiting, so that its cost follows the pods not yet placed, not all pods.
    due: HashSet<PodUid>,
    /// The pods placed on each agent (or fenced off it), as last set: checked against
    /// each pod's placement when used, so an entry left behind is harmless. Lets a
    /// heartbeat be checked against that agent's pods, not all pods.
    placed_on: HashMap<PeerId, HashSet<PodUid>>,
    /// When placements whose agent has not heartbeat since were last looked for.
    silent_checked: Instant,
    /// False until every pod source has delivered its first full set: until then a pod
    /// an agent reports is not known to be unwanted.
    synced: bool,
    /// The last heartbeat sequence number of each agent.
    heartbeat_seqs: ReplayGuard<PeerId>,
    /// Since when each agent has said its container runtime fails its checks.
    runtime_down_since: HashMap<PeerId, Instant>,
    /// Releases sent again while the agent's heartbeats still list the copy.
    release_retries: Backoff<(PeerId, PodUid)>,
    /// Every agent was lost at once, and none has been heard since.
    cut_off: bool,
    /// Each agent's subnet of the mesh pod CIDR.
    subnets: SubnetPool,
    /// The pods of stateful workloads, with their group's name (see `raft::group_of`).
    grouped: HashMap<PodUid, String>,
    /// What was last said of their groups, and when their placements were last looked at.
    groups: GroupBook,
    groups_checked: Instant,
    /// Cloned into each assignment's task for as long as it waits for its answers: the
    /// clones counted are the assignments in flight.
    assigning: Arc<()>,
}

/// How often the stateful workloads' placements are looked at for their groups.
const GROUP_CHECK: Duration = Duration::from_millis(250);

/// A Release is sent again after this while the agent still lists the copy, doubling
/// up to the maximum (a copy stopping takes up to its grace period).
const RELEASE_RETRY: Duration = Duration::from_secs(3);
const RELEASE_RETRY_MAX: Duration = Duration::from_secs(60);

/// Due pods one pass of [`Owner::advance_due`] takes on. A pass runs on the node's
/// loop: a backlog of thousands placed in one go held up the agents' heartbeats and
/// status reports for seconds, and on one CPU the mesh itself, whose connections then
/// failed their pings and closed.
pub const DUE_PER_PASS: usize = 256;
/// Assignments sent and not yet answered, at most; a pass places no more than leaves
/// room under it. Under overload answers come back later, and placing waits for them
/// instead of queueing more than the mesh carries, behind which the agents' heartbeats
/// and pings waited until the agents looked lost.
pub const MAX_ASSIGNING: usize = 4 * DUE_PER_PASS;
/// A reservation is dropped after this even if its assignment is still in flight:
/// by then the agent's heartbeats show the pod or it has declined it.
const RESERVATION_MAX: Duration = Duration::from_secs(5);

/// Capacity given to an agent for a pod, until the agent's heartbeats show it.
struct Reservation {
    pod: PodUid,
    at: Instant,
    requests: Resources,
    host_ports: Vec<u16>,
}
/// A heartbeat received this long after an assignment shows the pod in the agent's
/// capacity (the assignment's round trip is done by then).
const HEARTBEAT_SHOWS_ASSIGNMENT: Duration = Duration::from_secs(1);
/// A pod placed on an agent longer ago than this and missing from its heartbeat is no
/// longer run there (gossip and replies may cross, but not for this long).
const MISSING_GRACE: Duration = Duration::from_secs(10);
/// How often placements are looked over for agents silent or broken too long.
const SILENT_CHECK: Duration = Duration::from_secs(1);

/// What a search of the owner's view found for a pod.
#[derive(Default)]
struct Search {
    /// The best fitting agents heard from lately (at most
    /// [`placement::DIRECT_CANDIDATES`]), best first.
    ranked: Vec<Candidate<PeerId>>,
    /// An agent fits whose heartbeats have not come lately: the view may be stale.
    stale_fit: bool,
}

/// An assignment before it is signed for an agent.
struct AssignmentDraft {
    signer: Keypair,
    pod: StoredPod,
    volumes: Arc<BTreeMap<String, Vec<VolumeFile>>>,
    pull_credentials: Arc<Vec<RegistryCredential>>,
    uid: PodUid,
    epoch: Epoch,
    spec_digest: String,
    ttl: Duration,
    lease_ms: Option<u64>,
    cluster_ranges: Vec<Ipv4Net>,
    cluster_domain: Option<String>,
}

impl AssignmentDraft {
    fn signed_for(&self, agent: PeerId, pod_subnet: Option<Ipv4Net>) -> Assign {
        let statement = statement::sign(
            &self.signer,
            statement::Assignment {
                agent,
                pod: self.uid.clone(),
                epoch: self.epoch,
                spec_digest: self.spec_digest.clone(),
                expires_at: (unix_millis() / 1000).saturating_add(self.ttl.as_secs()),
            },
        );
        Assign {
            epoch: self.epoch,
            pod: self.pod.get(),
            volumes: BTreeMap::clone(&self.volumes),
            pull_credentials: Vec::clone(&self.pull_credentials),
            statement,
            lease_ms: self.lease_ms,
            pod_subnet,
            cluster_ranges: self.cluster_ranges.clone(),
            cluster_domain: self.cluster_domain.clone(),
        }
    }
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

/// "agent: reason; agent: reason".
fn agent_reasons(reasons: &[(PeerId, String)]) -> String {
    reasons
        .iter()
        .map(|(agent, reason)| format!("{agent}: {reason}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn pending_status(reason: &str, message: String) -> PodStatus {
    PodStatus {
        phase: Some("Pending".into()),
        conditions: Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some(reason.into()),
            message: Some(message),
            last_transition_time: Some(now_time()),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// A condition's lastTransitionTime moves only when its status does (the API's
/// conventions): a condition of `new` with the type and status it had in `old` keeps
/// `old`'s time.
fn keep_transition_times(old: &PodStatus, new: &mut PodStatus) {
    for condition in new.conditions.iter_mut().flatten() {
        let before = old
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == condition.type_ && c.status == condition.status);
        if let Some(before) = before {
            condition.last_transition_time = before.last_transition_time.clone();
        }
    }
}

/// A container that cannot be created for its configuration, as the kubelet shows it.
fn config_error_container(name: String, image: String, message: String) -> ContainerStatus {
    ContainerStatus {
        name,
        image,
        started: Some(false),
        state: Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("CreateContainerConfigError".into()),
                message: Some(message),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod whose configMaps or secrets are missing, as the kubelet shows it: Pending, each
/// container waiting with CreateContainerConfigError.
fn config_error_status(pod: &Pod, message: String) -> PodStatus {
    let spec = pod.spec.clone().unwrap_or_default();
    let waiting = |container: &k8s_openapi::api::core::v1::Container| {
        config_error_container(
            container.name.clone(),
            container.image.clone().unwrap_or_default(),
            message.clone(),
        )
    };
    let condition = |type_: &str, status: &str, reason: Option<&str>| PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.map(Into::into),
        last_transition_time: Some(now_time()),
        ..Default::default()
    };
    let has_init = spec.init_containers.as_ref().is_some_and(|c| !c.is_empty());
    PodStatus {
        phase: Some("Pending".into()),
        conditions: Some(vec![
            condition(
                "Initialized",
                if has_init { "False" } else { "True" },
                has_init.then_some("ContainersNotInitialized"),
            ),
            condition("Ready", "False", Some("ContainersNotReady")),
            condition("ContainersReady", "False", Some("ContainersNotReady")),
            condition("PodScheduled", "True", None),
        ]),
        init_container_statuses: has_init
            .then(|| spec.init_containers.iter().flatten().map(waiting).collect()),
        container_statuses: Some(spec.containers.iter().map(waiting).collect()),
        ..Default::default()
    }
}

fn failed_status(reason: &str, message: String, base: &PodStatus) -> PodStatus {
    PodStatus {
        phase: Some("Failed".into()),
        reason: Some(reason.into()),
        message: Some(message),
        ..base.clone()
    }
}

impl Owner {
    /// `signer` is the identity the mesh handle speaks for: agents check that the
    /// assignments they receive are signed by the peer that sent them.
    pub fn new(
        config: OwnerConfig,
        signer: Keypair,
        mesh: MeshHandle,
        metrics: Metrics,
        sink: Box<dyn StatusSink>,
    ) -> Owner {
        let (internal_tx, internal_rx) = mpsc::channel(256);
        Owner {
            adopt_until: Instant::now() + config.adopt_window,
            synced: true,
            reservations: HashMap::new(),
            reserved_on: HashMap::new(),
            search_from: 0,
            due: HashSet::new(),
            placed_on: HashMap::new(),
            silent_checked: Instant::now(),
            heartbeat_seqs: ReplayGuard::default(),
            runtime_down_since: HashMap::new(),
            release_retries: Backoff::new(RELEASE_RETRY, RELEASE_RETRY_MAX),
            cut_off: false,
            subnets: config.pod_subnets.clone(),
            grouped: HashMap::new(),
            groups: GroupBook::default(),
            groups_checked: Instant::now(),
            assigning: Arc::new(()),
            config,
            signer,
            mesh,
            metrics,
            sink,
            pods: HashMap::new(),
            selections: Selections::default(),
            agents: HeartbeatBook::default(),
            internal_tx,
            internal_rx,
        }
    }

    fn me(&self) -> PeerId {
        self.mesh.local_peer_id()
    }

    /// Until `set_synced(true)`, pods agents report that this owner does not know are
    /// left alone (a source that has not listed its pods yet may still want them).
    pub fn set_synced(&mut self, synced: bool) {
        if synced && !self.synced {
            // Give agents' heartbeats a window to show what runs before offering.
            self.adopt_until = self
                .adopt_until
                .max(Instant::now() + self.config.adopt_window);
            let adopt_until = self.adopt_until;
            self.retime_waiting(|at| (*at).max(adopt_until));
        }
        self.synced = synced;
    }

    /// The live agents' count, health and summed capacity.
    pub fn agents_summary(&self) -> AgentsSummary {
        self.agents
            .live()
            .fold(AgentsSummary::default(), |sum, (_, seen)| {
                let health = &seen.heartbeat.health;
                AgentsSummary {
                    live: sum.live + 1,
                    runtime_healthy: sum.runtime_healthy
                        + usize::from(health.runtime_error.is_none()),
                    memory_pressure: sum.memory_pressure + usize::from(health.memory_pressure),
                    disk_pressure: sum.disk_pressure + usize::from(health.disk_pressure),
                    pid_pressure: sum.pid_pressure + usize::from(health.pid_pressure),
                    capacity: sum.capacity.saturating_add(seen.heartbeat.capacity),
                    storage_bytes: sum
                        .storage_bytes
                        .saturating_add(seen.heartbeat.storage_bytes),
                }
            })
    }

    /// Replaces the desired set of pods: new ones are placed, missing ones and those
    /// being deleted stopped, changed ones updated.
    pub fn set_desired(&mut self, desired: DesiredPods) {
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !desired.contains_key(&uid.0))
            .map(|uid| uid.0.clone())
            .collect();
        for uid in gone {
            self.apply(&uid, None);
        }
        for (uid, wanted) in desired {
            self.apply(&uid, Some(wanted));
        }
    }

    /// What a source now wants of one pod (None: nothing): a new pod is placed, a
    /// missing one or one being deleted stopped, a changed one updated.
    pub fn apply(&mut self, uid: &str, wanted: Option<Arc<DesiredPod>>) {
        let uid = PodUid(uid.to_string());
        match (self.pods.get(&uid), wanted) {
            (None, Some(wanted)) => self.add(wanted),
            (Some(owned), Some(wanted))
                if !Arc::ptr_eq(&owned.desired, &wanted) && owned.desired != wanted =>
            {
                self.update(&uid, wanted)
            }
            (Some(_), None) => self.delete(&uid),
            _ => {}
        }
        self.metrics.pods.set(self.pods.len() as i64);
    }

    fn add(&mut self, desired: Arc<DesiredPod>) {
        let pod = desired.pod.get();
        let pod_ref = match translate::pod_ref(&pod) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "pod without identity ignored");
                return;
            }
        };
        let spec = pod.spec.clone().unwrap_or_default();
        let policy = RestartPolicy::from_spec(spec.restart_policy.as_deref());
        let mut owned = OwnedPod {
            offer: Offer {
                pod: pod_ref.clone(),
                epoch: Epoch(0),
                requests: Default::default(),
                agent_selector: Vec::new(),
                host_ports: translate::host_ports(&pod),
                spec_digest: String::new(),
            },
            grace_secs: translate::grace_period_secs(&pod),
            policy,
            epoch: Epoch(0),
            placement: Placement::Held,
            status: StoredStatus::default(),
            carried_restarts: BTreeMap::new(),
            lost_state: None,
            deleting: false,
            placed_at: Instant::now(),
            fencing: Fencing::Relaxed,
            lease_renewed_at: Instant::now(),
            inherited: false,
            offer_not_before: Instant::now(),
            lost_copy: None,
            offered: Epoch(0),
            policy_refusals: Vec::new(),
            ask_agents: false,
            too_big_since: None,
            refused_ephemeral: BTreeMap::new(),
            status_seqs: ReplayList::default(),
            changed_in_flight: None,
            pod: desired.pod.clone(),
            created: pod.metadata.creation_timestamp.clone(),
            volumes: Arc::default(),
            pull_credentials: Arc::default(),
            desired: desired.clone(),
        };
        self.prepare(&mut owned, desired.resolved.clone(), &pod);
        tracing::info!(pod = %pod_ref, uid = %pod_ref.uid, "pod added");
        let inherited = self.sink.last_known(&pod_ref.uid);
        if !self.inherit(&mut owned, inherited) {
            self.sink
                .status_changed(&pod_ref, pod.spec.as_ref(), &owned.status.get(), None);
        }
        let deleted = pod.metadata.deletion_timestamp.is_some();
        if let Ok(Some(group)) = crate::raft::group_of(&pod) {
            self.grouped.insert(pod_ref.uid.clone(), group);
        }
        self.pods.insert(pod_ref.uid.clone(), Box::new(owned));
        self.selections.clear();
        self.due.insert(pod_ref.uid.clone());
        if deleted {
            self.delete(&pod_ref.uid);
        }
    }

    /// Takes the status a pod had before this node started, if it shows the pod placed
    /// then: kept as it is (nothing is posted) until the pod's agent reports it, or
    /// until it is clear no agent will. True if taken.
    fn inherit(&self, owned: &mut OwnedPod, previous: Option<PodStatus>) -> bool {
        let Some(previous) = previous else {
            return false;
        };
        if !matches!(owned.placement, Placement::Waiting { .. }) {
            return false;
        }
        match previous.phase.as_deref() {
            // Finished, as the kubelet leaves it: never run again.
            Some("Succeeded" | "Failed") => {
                owned.placement = Placement::Done;
                owned.status = StoredStatus::new(&previous);
                true
            }
            _ if was_placed(&previous) => {
                // Every agent that may run it reports within a loss timeout; a strict
                // pod's unknown copy stops within a lease and margin of the last
                // renewal, which came before this start.
                let mut wait = self.config.agent_loss_timeout;
                if owned.fencing == Fencing::Strict {
                    wait = wait.max(self.config.lease + self.config.fencing_margin);
                }
                tracing::info!(pod = %owned.pod_ref(), wait_secs = wait.as_secs(), "keeping the API's status until an agent reports the pod");
                owned.offer_not_before = Instant::now() + wait;
                owned.inherited = true;
                owned.status = StoredStatus::new(&previous);
                true
            }
            _ => false,
        }
    }

    /// Takes what resolving the pod gave: ready to offer, held, or failed for good.
    /// `desired` is the source's pod, decoded.
    fn prepare(
        &self,
        owned: &mut OwnedPod,
        resolved: Result<Resolved, ResolveError>,
        desired: &Pod,
    ) {
        let resolved = match resolved {
            Ok(resolved) => resolved,
            Err(ResolveError::Missing(message) | ResolveError::Denied(message)) => {
                owned.placement = Placement::Held;
                owned.status = StoredStatus::new(&config_error_status(desired, message));
                return;
            }
            Err(e @ ResolveError::Invalid { .. }) => {
                owned.placement = Placement::Done;
                let status =
                    failed_status("UnsupportedPodSpec", e.to_string(), &PodStatus::default());
                owned.status = StoredStatus::new(&status);
                return;
            }
        };
        // Decoded again only when resolving rewrote the pod.
        let rewritten = resolved.rewritten.map(|stored| {
            let pod = stored.get();
            (stored, pod)
        });
        let pod = rewritten.as_ref().map_or(desired, |(_, pod)| pod);
        let checked = translate::validate(pod)
            .and_then(|()| translate::pod_requests(pod))
            .map_err(|e| e.to_string())
            .and_then(|requests| {
                let fencing = fencing_of(pod)?;
                let selector = placement::agent_selector_of(pod).map_err(|e| {
                    format!("metadata.annotations[{AGENT_SELECTOR_ANNOTATION}]: {e}")
                })?;
                Ok((requests, selector, fencing))
            });
        match checked {
            Ok((requests, selector, fencing)) => {
                owned.fencing = fencing;
                owned.offer.requests = requests;
                owned.offer.agent_selector = selector;
                let digest = spec_digest(pod);
                if digest != owned.offer.spec_digest {
                    // A new spec: the agents judge it afresh.
                    owned.policy_refusals.clear();
                    owned.ask_agents = false;
                }
                owned.offer.spec_digest = digest;
                owned.placement = Placement::Waiting {
                    at: self.adopt_until.max(Instant::now()),
                };
                let status = pending_status("Placing", "choosing an agent".into());
                owned.status = StoredStatus::new(&status);
            }
            Err(message) => {
                let status = failed_status("UnsupportedPodSpec", message, &PodStatus::default());
                owned.status = StoredStatus::new(&status);
                owned.placement = Placement::Done;
            }
        }
        owned.pod = rewritten.map_or_else(|| owned.desired.pod.clone(), |(stored, _)| stored);
        owned.volumes = resolved.volumes;
        owned.pull_credentials = resolved.pull_credentials;
    }

    /// A pod the source changed: being deleted, no longer held, or with new volume data.
    fn update(&mut self, uid: &PodUid, desired: Arc<DesiredPod>) {
        let Some(mut owned) = self.pods.remove(uid) else {
            return;
        };
        self.selections.clear();
        let pod = desired.pod.get();
        let deleted = pod.metadata.deletion_timestamp.is_some();
        owned.grace_secs = translate::grace_period_secs(&pod);
        owned.desired = desired.clone();
        match (&owned.placement, desired.resolved.clone()) {
            (Placement::Held, resolved) => {
                self.prepare(&mut owned, resolved, &pod);
                let status = owned.status.get();
                self.pods.insert(uid.clone(), owned);
                self.due.insert(uid.clone());
                self.set_status_forced(uid, status);
            }
            (placement, Ok(resolved)) => {
                // New data for the volumes (a refreshed token, a changed configMap):
                // the assigned agent rewrites the files. New pull credentials serve
                // its next pull. A changed pod (an ephemeral container added by
                // `kubectl debug`, new labels) goes to the agent signed anew.
                let agent = match placement {
                    Placement::Placed { agent } => Some(*agent),
                    _ => None,
                };
                let assigning = matches!(placement, Placement::Assigning);
                let assigned = resolved.rewritten.unwrap_or_else(|| desired.pod.clone());
                let pod = without_ephemeral(assigned, &owned.refused_ephemeral);
                let pod_changed = pod != owned.pod;
                let changed = pod_changed
                    || resolved.volumes != owned.volumes
                    || resolved.pull_credentials != owned.pull_credentials;
                let previous = changed.then(|| {
                    owned.volumes = resolved.volumes;
                    owned.pull_credentials = resolved.pull_credentials;
                    if pod_changed {
                        owned.offer.spec_digest = spec_digest(&pod.get());
                    }
                    std::mem::replace(&mut owned.pod, pod)
                });
                let previous = match previous {
                    Some(previous) if assigning => {
                        owned.changed_in_flight.get_or_insert(previous);
                        None
                    }
                    previous => previous,
                };
                self.pods.insert(uid.clone(), owned);
                if let (Some(agent), Some(previous)) = (agent, previous) {
                    self.send_assign_refresh(uid, agent, previous);
                }
            }
            // A pod's spec hardly changes once created; a configMap that disappears
            // leaves the running pod as it is, as with the kubelet.
            _ => {
                self.pods.insert(uid.clone(), owned);
            }
        }
        if deleted {
            self.delete(uid);
        }
    }

    /// The assignment of `owned` at its epoch to `agent`, signed for that agent.
    fn assign(&self, owned: &OwnedPod, agent: PeerId) -> Assign {
        self.draft(owned)
            .signed_for(agent, self.subnets.subnet_of(&agent))
    }

    /// The agent's subnet of the mesh pod CIDR, given it now if it has none: the
    /// subnet of an agent gone for good (not heard from, no pods placed there) is
    /// given again once every subnet is taken.
    fn pod_subnet(&mut self, agent: PeerId) -> Result<Ipv4Net, Exhausted> {
        let (agents, placed_on) = (&self.agents, &self.placed_on);
        let allocated = self.subnets.allocate(agent, |gone| {
            agents.get(gone).is_none() && placed_on.get(gone).is_none_or(HashSet::is_empty)
        });
        if let Err(exhausted) = &allocated {
            tracing::warn!(%agent, %exhausted, "agent gets no pod subnet");
        }
        allocated
    }

    fn draft(&self, owned: &OwnedPod) -> AssignmentDraft {
        AssignmentDraft {
            signer: self.signer.clone(),
            pod: owned.pod.clone(),
            volumes: owned.volumes.clone(),
            pull_credentials: owned.pull_credentials.clone(),
            uid: owned.pod_ref().uid.clone(),
            epoch: owned.epoch,
            spec_digest: owned.offer.spec_digest.clone(),
            ttl: self.config.assignment_ttl,
            lease_ms: owned.lease_ms(self.config.lease),
            cluster_ranges: self.config.cluster_ranges.clone(),
            cluster_domain: self.config.cluster_domain.clone(),
        }
    }

    /// Sends the placed pod's assignment again, with its new data or spec; `previous`
    /// is the pod the agent had, to tell what a refused update added.
    fn send_assign_refresh(&self, uid: &PodUid, agent: PeerId, previous: StoredPod) {
        let Some(owned) = self.pods.get(uid) else {
            return;
        };
        let assign = self.assign(owned, agent);
        let refused = owned.pod.clone();
        let uid = uid.clone();
        let mesh = self.mesh.clone();
        let metrics = self.metrics.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            match mesh.request(agent, Request::Assign(Box::new(assign))).await {
                Ok(Response::Declined { reason }) => {
                    tracing::warn!(%agent, %reason, "the agent refused the pod's update");
                    let refusal = Internal::UpdateRefused {
                        uid,
                        previous,
                        refused,
                        reason,
                    };
                    // Only when the owner is gone does this fail.
                    let _ = internal.send(refusal).await;
                }
                Ok(_) => {}
                Err(e) => {
                    metrics.request_failed("assign");
                    tracing::warn!(%agent, error = %e, "the pod's update not delivered to the agent");
                }
            }
        });
    }

    fn delete(&mut self, uid: &PodUid) {
        let Some(owned) = self.pods.get_mut(uid) else {
            return;
        };
        if owned.deleting {
            return;
        }
        owned.deleting = true;
        match owned.placement.clone() {
            Placement::Placed { agent } => {
                tracing::info!(pod = %owned.pod_ref(), "pod deleted; stopping it on its agent");
                let release = Release {
                    pod: uid.clone(),
                    epoch: owned.epoch,
                    grace_period_secs: owned.grace_secs,
                };
                self.release_now(agent, release);
            }
            // The assignment's answer settles it (see on_internal).
            Placement::Assigning => {}
            // An unreachable agent's copy stops for want of a lease, or is released
            // when its heartbeat lists it again.
            Placement::Waiting { .. }
            | Placement::Held
            | Placement::Offering { .. }
            | Placement::Fencing { .. }
            | Placement::Done => {
                self.forget(uid);
            }
        }
    }

    fn forget(&mut self, uid: &PodUid) {
        self.grouped.remove(uid);
        if let Some(owned) = self.pods.remove(uid) {
            self.selections.clear();
            tracing::info!(pod = %owned.pod_ref(), "pod removed");
            self.sink.removed(owned.pod_ref());
        }
        self.metrics.pods.set(self.pods.len() as i64);
    }

    fn send_release(&self, agent: PeerId, release: Release) {
        let mesh = self.mesh.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = mesh.request(agent, Request::Release(release)).await {
                metrics.request_failed("release");
                tracing::debug!(%agent, error = %e, "release not delivered; the agent's next heartbeat retries it");
            }
        });
    }

    /// Sets a pod's status and tells the sink, unless nothing changed (a pod retried
    /// for the same reason is not written again).
    fn set_status(&mut self, uid: &PodUid, mut status: PodStatus) {
        let Some(owned) = self.pods.get(uid) else {
            return;
        };
        if self.grouped.contains_key(uid) {
            not_in_group_unless_said(&mut status);
        }
        keep_transition_times(&owned.status.get(), &mut status);
        // Compared as stored: the JSON keeps times to the second, as the API does.
        let stored = StoredStatus::new(&status);
        if owned.status != stored {
            self.put_status(uid, status, stored);
        }
    }

    fn set_status_forced(&mut self, uid: &PodUid, status: PodStatus) {
        let stored = StoredStatus::new(&status);
        self.put_status(uid, status, stored);
    }

    fn put_status(&mut self, uid: &PodUid, status: PodStatus, stored: StoredStatus) {
        let Some(owned) = self.pods.get_mut(uid) else {
            return;
        };
        owned.status = stored;
        let agent = owned.placed_on();
        let pod = owned.desired.pod.get();
        self.sink
            .status_changed(owned.pod_ref(), pod.spec.as_ref(), &status, agent);
    }

    /// Timers: offers whose window closed, pods due for an offer, lost agents.
    pub fn tick(&mut self) {
        self.check_lost_agents();
        self.expire_reservations();
        self.advance_due();
        self.tell_groups();
    }

    /// Tells the agents of each stateful workload who its group's members are, when
    /// that changed and now and then (see `node::groups`).
    fn tell_groups(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.groups_checked) < GROUP_CHECK {
            return;
        }
        self.groups_checked = now;
        let placed: Vec<GroupedPod> = self
            .grouped
            .iter()
            .filter_map(|(uid, group)| {
                let owned = self.pods.get(uid)?;
                let agent = match owned.placement {
                    Placement::Placed { agent } | Placement::Fencing { agent, .. } => agent,
                    _ => return None,
                };
                let created = owned.created.as_ref();
                Some(GroupedPod {
                    group: group.clone(),
                    pod: owned.pod_ref().clone(),
                    agent,
                    age: (
                        created.map_or(0, |t| t.0.as_second()),
                        owned.pod_ref().name.clone(),
                    ),
                })
            })
            .collect();
        for word in self.groups.words(placed, now, unix_millis()) {
            let signed = crate::trust::group::sign(&self.signer, word.group);
            tracing::debug!(group = %signed.name, version = signed.version, members = signed.members.len(), "telling a group's agents its members");
            for agent in word.to {
                let (mesh, metrics, signed) =
                    (self.mesh.clone(), self.metrics.clone(), signed.clone());
                tokio::spawn(async move {
                    if let Err(e) = mesh.request(agent, Request::Group(Box::new(signed))).await {
                        metrics.request_failed("group");
                        tracing::debug!(%agent, error = %e, "group word not delivered");
                    }
                });
            }
        }
    }

    /// Places, closes the offers of and ends the fencing of the pods whose time has
    /// come, the earliest first and at most [`DUE_PER_PASS`] of them, fewer when
    /// [`MAX_ASSIGNING`] assignments are close to being in flight (the rest at the next
    /// tick). Each tick, and at once after a source's changes, so that a new pod is
    /// placed without waiting for the tick.
    pub fn advance_due(&mut self) {
        let in_flight = Arc::strong_count(&self.assigning) - 1;
        self.metrics.assignments_in_flight.set(in_flight as i64);
        let room = DUE_PER_PASS.min(MAX_ASSIGNING.saturating_sub(in_flight));
        let now = Instant::now();
        let mut gone = Vec::new();
        let mut ready: Vec<(Instant, &PodUid)> = Vec::new();
        for uid in &self.due {
            let Some(owned) = self.pods.get(uid).filter(|o| o.waits()) else {
                gone.push(uid.clone());
                continue;
            };
            if let Some(when) = owned.due_at().filter(|when| *when <= now) {
                ready.push((when, uid));
            }
        }
        if ready.len() > room {
            if let Some(last) = room.checked_sub(1) {
                ready.select_nth_unstable_by_key(last, |(when, _)| *when);
            }
            ready.truncate(room);
        }
        ready.sort_by_key(|(when, _)| *when);
        let ready: Vec<PodUid> = ready.into_iter().map(|(_, uid)| uid.clone()).collect();
        for uid in &gone {
            self.due.remove(uid);
        }
        for uid in ready {
            // As it is now: a pod placed before it in this pass may have changed it.
            let placement = self
                .pods
                .get(&uid)
                .filter(|o| o.due_at().is_some_and(|when| when <= now))
                .map(|o| o.placement.clone());
            match placement {
                Some(Placement::Waiting { .. }) => self.place(&uid),
                Some(Placement::Offering { .. }) => self.close_offer(&uid),
                Some(Placement::Fencing { agent, .. }) => self.agent_lost(
                    &uid,
                    agent,
                    "was unreachable until its copy's lease ran out",
                ),
                _ => {}
            }
            if !self.pods.get(&uid).is_some_and(|o| o.waits()) {
                self.due.remove(&uid);
            }
        }
    }

    /// Sets the time of every pod waiting to be placed (`when` gives the new one from
    /// the old), dropping from `due` the pods no longer waiting for anything.
    fn retime_waiting(&mut self, when: impl Fn(&Instant) -> Instant) {
        let pods = &mut self.pods;
        self.due
            .retain(|uid| match pods.get_mut(uid).map(|o| &mut o.placement) {
                Some(Placement::Waiting { at }) => {
                    *at = when(at);
                    true
                }
                Some(Placement::Offering { .. } | Placement::Fencing { .. }) => true,
                _ => false,
            });
    }

    /// The pods placed on (or fenced off) `agent`, from the index checked against each
    /// pod's placement; entries that no longer hold are dropped.
    fn pods_on(&mut self, agent: PeerId) -> Vec<PodUid> {
        let Some(indexed) = self.placed_on.get_mut(&agent) else {
            return Vec::new();
        };
        let pods = &self.pods;
        indexed.retain(|uid| {
            pods.get(uid).is_some_and(|o| {
                matches!(o.placement, Placement::Placed { agent: a } | Placement::Fencing { agent: a, .. } if a == agent)
            })
        });
        let placed: Vec<PodUid> = indexed.iter().cloned().collect();
        if placed.is_empty() {
            self.placed_on.remove(&agent);
        }
        placed
    }

    /// Places a pod that is due: at once from the agents' heartbeats, as a scheduler
    /// places from its cache, or, when that view is stale or an agent declined the
    /// pod, by asking the agents (an offer, and bids within the offer window).
    fn place(&mut self, uid: &PodUid) {
        if self.pods.get(uid).is_some_and(|o| o.inherited) {
            // No agent reported the copy it ran before this node started.
            self.copy_lost(
                uid,
                "no agent reported the pod after the node restarted".into(),
            );
            if !matches!(
                self.pods.get(uid).map(|o| &o.placement),
                Some(Placement::Waiting { .. })
            ) {
                return;
            }
        }
        if self.agents.is_empty() {
            let message = placement::explain(&self.pods[uid].offer, std::iter::empty());
            let Some(owned) = self.pods.get_mut(uid) else {
                return;
            };
            owned.placement = Placement::Waiting {
                at: Instant::now() + self.config.retry_interval,
            };
            self.due.insert(uid.clone());
            // A lost copy's pod keeps saying so: its agent may come back.
            if owned.lost_copy.is_none() {
                self.set_status(uid, pending_status("Unschedulable", message));
            }
            return;
        }
        let Some(owned) = self.pods.get_mut(uid) else {
            return;
        };
        owned.epoch = owned
            .epoch
            .max(owned.offered)
            .next()
            .max(self.config.epoch_floor);
        owned.offered = owned.epoch;
        owned.offer.epoch = owned.epoch;
        if !owned.ask_agents {
            let search = self.search(uid);
            if !search.ranked.is_empty() {
                let agents = search.ranked.iter().map(|c| c.agent).collect();
                self.metrics.placement_begun("direct");
                self.assign_in_turn(uid, agents);
                return;
            }
            if !search.stale_fit {
                self.unschedulable(uid);
                return;
            }
        }
        self.metrics.placement_begun("offer");
        self.open_offer(uid);
    }

    /// The best fitting agents the owner's view shows for a pod, best first: agents
    /// heard from lately, less what the owner gave them since (reservations), not
    /// those whose policy refused the pod; the best few of at most
    /// [`placement::fitting_agents_to_find`], looked for from where the last search
    /// stopped.
    fn search(&mut self, uid: &PodUid) -> Search {
        let Some(owned) = self.pods.get(uid) else {
            return Search::default();
        };
        let total = self.agents.len();
        let want = placement::fitting_agents_to_find(total);
        let fresh = self.config.agent_loss_timeout / 2;
        let start = self.search_from % total.max(1);
        let mut search = Search::default();
        let mut looked = 0;
        let agents = self.agents.live().skip(start);
        for (agent, seen) in agents.chain(self.agents.live().take(start)) {
            if search.ranked.len() >= want {
                break;
            }
            looked += 1;
            if owned.policy_refusals.iter().any(|(a, _)| a == agent) {
                continue;
            }
            let (capacity, unseen) = self.reserved(agent, seen);
            if !placement::misfits(&owned.offer, &capacity).is_empty() {
                continue;
            }
            if seen.last_seen.elapsed() > fresh {
                search.stale_fit = true;
                continue;
            }
            search.ranked.push(Candidate {
                agent: *agent,
                score: placement::score(&owned.offer, &capacity, self.config.score_mode),
                unseen,
            });
        }
        self.search_from = start + looked;
        placement::keep_best(&mut search.ranked, placement::DIRECT_CANDIDATES);
        search
    }

    fn open_offer(&mut self, uid: &PodUid) {
        let fitting = self.fitting_agents(uid);
        let Some(owned) = self.pods.get_mut(uid) else {
            return;
        };
        owned.placement = Placement::Offering {
            deadline: Instant::now() + self.config.offer_window,
            bids: Vec::new(),
            fitting,
        };
        self.due.insert(uid.clone());
        let message = GossipMessage::Offer(owned.offer.clone());
        let mesh = self.mesh.clone();
        let pod = owned.pod_ref().clone();
        tokio::spawn(async move {
            if let Err(e) = mesh.publish(&message).await {
                tracing::debug!(%pod, error = %e, "offer not published");
            }
        });
    }

    fn on_bid(&mut self, agent: PeerId, bid: Bid) -> Response {
        tracing::debug!(pod = %bid.pod, epoch = %bid.epoch, %agent, "bid received");
        // Only agents heard from lately, which the owner's own view says fit, take part:
        // a bid is a willingness, not a claim to capacity.
        let fits = self.pods.get(&bid.pod).and_then(|owned| {
            let seen = self.agents.get(&agent)?;
            Some(placement::misfits(&owned.offer, seen.capacity()).is_empty())
        });
        match fits {
            None if self.pods.contains_key(&bid.pod) => {
                self.metrics.dropped("bid", "no_heartbeat");
                return Response::Declined {
                    reason: "no recent heartbeat from this agent".into(),
                };
            }
            Some(false) => {
                self.metrics.dropped("bid", "does_not_fit");
                return Response::Declined {
                    reason: "this agent's last heartbeat does not fit the pod".into(),
                };
            }
            _ => {}
        }
        let Some(owned) = self.pods.get_mut(&bid.pod) else {
            return Response::Declined {
                reason: "no such pod".into(),
            };
        };
        let Placement::Offering { bids, fitting, .. } = &mut owned.placement else {
            return Response::Declined {
                reason: "offer closed".into(),
            };
        };
        if bid.epoch != owned.epoch {
            return Response::Declined {
                reason: "offer closed".into(),
            };
        }
        if !bids.contains(&agent) {
            bids.push(agent);
        }
        // Every agent that can fit has bid: no need to wait out the window.
        if bids.len() >= *fitting {
            self.close_offer(&bid.pod);
        }
        Response::Ack
    }

    /// Live agents whose last heartbeat fits the pod.
    fn fitting_agents(&self, uid: &PodUid) -> usize {
        let Some(owned) = self.pods.get(uid) else {
            return 0;
        };
        self.agents
            .live()
            .filter(|(_, seen)| placement::misfits(&owned.offer, seen.capacity()).is_empty())
            .count()
    }

    /// An agent's capacity as its last heartbeat showed it, less what this owner gave
    /// it that the heartbeat does not show (a pod the agent took shows in the first
    /// heartbeat sent at least [`HEARTBEAT_SHOWS_ASSIGNMENT`] after), and how many
    /// such pods there are.
    fn reserved<'a>(&self, agent: &PeerId, seen: &'a SeenAgent) -> (Cow<'a, AgentCapacity>, usize) {
        let mut capacity = Cow::Borrowed(seen.capacity());
        let mut unseen = 0;
        let reservations = self.reservations.get(agent).into_iter().flatten();
        for reservation in
            reservations.filter(|r| r.at + HEARTBEAT_SHOWS_ASSIGNMENT > seen.last_seen)
        {
            placement::reserve(
                capacity.to_mut(),
                &reservation.requests,
                &reservation.host_ports,
            );
            unseen += 1;
        }
        (capacity, unseen)
    }

    /// Reserves `agent`'s capacity for a pod the owner gives it, in place of any
    /// reservation the pod had.
    fn reserve(&mut self, uid: &PodUid, agent: PeerId, at: Instant) {
        self.unreserve(uid);
        let Some(owned) = self.pods.get(uid) else {
            return;
        };
        self.reservations
            .entry(agent)
            .or_default()
            .push(Reservation {
                pod: uid.clone(),
                at,
                requests: owned.offer.requests,
                host_ports: owned.offer.host_ports.clone(),
            });
        self.reserved_on.insert(uid.clone(), agent);
    }

    /// Drops a pod's reservation (its agent declined it, or another took it).
    fn unreserve(&mut self, uid: &PodUid) {
        let Some(agent) = self.reserved_on.remove(uid) else {
            return;
        };
        if let Some(reserved) = self.reservations.get_mut(&agent) {
            reserved.retain(|r| &r.pod != uid);
            if reserved.is_empty() {
                self.reservations.remove(&agent);
            }
        }
    }

    /// Drops the reservations old enough for heartbeats to show their pods.
    fn expire_reservations(&mut self) {
        let now = Instant::now();
        let reserved_on = &mut self.reserved_on;
        self.reservations.retain(|_, reserved| {
            reserved.retain(|r| {
                let live = now.duration_since(r.at) < RESERVATION_MAX;
                if !live {
                    reserved_on.remove(&r.pod);
                }
                live
            });
            !reserved.is_empty()
        });
    }

    /// Says why no agent takes a pod, and tries again after the retry interval.
    fn unschedulable(&mut self, uid: &PodUid) {
        let Some(owned) = self.pods.get(uid) else {
            return;
        };
        // As the search saw them: less what the owner gave them since.
        let agents: Vec<Cow<AgentCapacity>> = self
            .agents
            .live()
            .map(|(agent, seen)| self.reserved(agent, seen).0)
            .collect();
        let mut message = placement::explain(&owned.offer, agents.iter().map(AsRef::as_ref));
        if !owned.policy_refusals.is_empty() {
            message = format!(
                "{message}; refused before: {}",
                agent_reasons(&owned.policy_refusals)
            );
        }
        // The scheduler sees the sum of all agents as one node, so it binds pods no
        // agent can hold. One that never ran is rejected as the kubelet rejects a pod
        // its node cannot hold; one that ran keeps waiting for its agent.
        let never_ran = owned.lost_copy.is_none()
            && !owned.inherited
            && owned.carried_restarts.is_empty()
            && owned.status.get().container_statuses.is_none();
        let waits = placement::waits_for_agent(&owned.desired.pod.get());
        let shortfall = placement::shortfall(&owned.offer, agents.iter().map(AsRef::as_ref));
        let now = Instant::now();
        let reject_after = self
            .config
            .reject_too_big_after
            .filter(|_| never_ran && !waits);
        let Some(owned) = self.pods.get_mut(uid) else {
            return;
        };
        match (shortfall, reject_after) {
            (Some(shortfall), Some(reject_after)) => {
                let since = *owned.too_big_since.get_or_insert(now);
                if now.duration_since(since) >= reject_after {
                    tracing::info!(pod = %owned.pod_ref(), message = %shortfall.message(), "pod rejected: no agent can hold it");
                    owned.placement = Placement::Done;
                    let status = failed_status(
                        &shortfall.reason(),
                        shortfall.message(),
                        &PodStatus::default(),
                    );
                    self.set_status(uid, status);
                    return;
                }
                message = format!(
                    "{message}; {}: rejected if no larger agent joins within {} s",
                    shortfall.beyond_every_agent(),
                    reject_after.as_secs()
                );
            }
            (Some(shortfall), None) => {
                message = format!(
                    "{message}; {}: waiting for a larger agent",
                    shortfall.beyond_every_agent()
                );
            }
            (None, _) => owned.too_big_since = None,
        }
        tracing::info!(pod = %owned.pod_ref(), %message, "no agent can take the pod");
        owned.placement = Placement::Waiting {
            at: now + self.config.retry_interval,
        };
        self.due.insert(uid.clone());
        self.set_status(uid, pending_status("Unschedulable", message));
    }

    fn close_offer(&mut self, uid: &PodUid) {
        let Some(owned) = self.pods.get(uid) else {
            return;
        };
        let Placement::Offering { bids, .. } = &owned.placement else {
            return;
        };
        // Highest score by the owner's own reckoning from the bidders' heartbeats (a
        // bidder whose heartbeats stopped since it bid drops out).
        let mut ranked: Vec<Candidate<PeerId>> = bids
            .iter()
            .filter_map(|agent| {
                let seen = self.agents.get(agent)?;
                let (capacity, unseen) = self.reserved(agent, seen);
                Some(Candidate {
                    agent: *agent,
                    score: placement::score(&owned.offer, &capacity, self.config.score_mode),
                    unseen,
                })
            })
            .collect();
        if ranked.is_empty() {
            self.unschedulable(uid);
            return;
        }
        placement::rank(&mut ranked);
        tracing::debug!(pod = %owned.pod_ref(), epoch = %owned.epoch, ?ranked, "offer closed");
        self.assign_in_turn(uid, ranked.into_iter().map(|c| c.agent).collect());
    }

    /// Assigns a pod to `agents` in turn until one takes it, the first reserved for it
    /// at once (placements right after this one must see it). Signed for each agent
    /// as its turn comes: an assignment names its agent.
    fn assign_in_turn(&mut self, uid: &PodUid, agents: Vec<PeerId>) {
        let Some(&first) = agents.first() else {
            return;
        };
        self.reserve(uid, first, Instant::now());
        let Some(owned) = self.pods.get_mut(uid) else {
            return;
        };
        owned.placement = Placement::Assigning;
        // The lost copy may now be superseded by one that runs unseen.
        owned.lost_copy = None;
        // This assignment carries the pod as it is now.
        owned.changed_in_flight = None;
        let (pod_ref, epoch) = (owned.pod_ref().clone(), owned.epoch);
        let draft = self.draft(&self.pods[uid]);
        let agents: Vec<_> = agents
            .into_iter()
            .map(|agent| (agent, self.pod_subnet(agent)))
            .collect();
        let mesh = self.mesh.clone();
        let internal = self.internal_tx.clone();
        let uid = uid.clone();
        let metrics = self.metrics.clone();
        let in_flight = self.assigning.clone();
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let mut reasons = Vec::new();
            let mut unanswered = false;
            for (agent, pod_subnet) in agents {
                let assign = match pod_subnet {
                    Ok(subnet) => draft.signed_for(agent, Some(subnet)),
                    Err(exhausted) => {
                        reasons.push((agent, exhausted.to_string()));
                        continue;
                    }
                };
                match mesh.request(agent, Request::Assign(Box::new(assign))).await {
                    Ok(Response::Ack) => {
                        metrics.assignments.inc();
                        audit::record(
                            &metrics,
                            "assign",
                            Outcome::Allowed,
                            &agent,
                            Some(&pod_ref),
                            &format_args!("epoch {epoch}"),
                        );
                        let _ = internal
                            .send(Internal::Assigned { uid, epoch, agent })
                            .await;
                        return;
                    }
                    // A definite no: the agent does not run it, so the next one may
                    // get the same epoch.
                    Ok(Response::Declined { reason }) => reasons.push((agent, reason)),
                    Ok(other) => reasons.push((agent, format!("unexpected answer {other:?}"))),
                    // No answer: the agent may have taken it. Stop here; the next
                    // placement raises the epoch, which supersedes whatever it started.
                    Err(e) => {
                        reasons.push((agent, e.to_string()));
                        unanswered = true;
                        break;
                    }
                }
            }
            let _ = internal
                .send(Internal::AssignFailed {
                    uid,
                    epoch,
                    reasons,
                    unanswered,
                })
                .await;
        });
    }

    fn on_internal(&mut self, internal: Internal) {
        match internal {
            Internal::Assigned { uid, epoch, agent } => {
                let Some(owned) = self.pods.get_mut(&uid) else {
                    return;
                };
                if owned.epoch != epoch {
                    return;
                }
                owned.placement = Placement::Placed { agent };
                owned.placed_at = Instant::now();
                owned.ask_agents = false;
                self.placed_on.entry(agent).or_default().insert(uid.clone());
                // Reserved where it went, from when it was given (not the first
                // candidate's, if that one declined).
                let placed_at = owned.placed_at;
                self.reserve(&uid, agent, placed_at);
                let Some(owned) = self.pods.get_mut(&uid) else {
                    return;
                };
                // Not before the agent took the lease: it counts from receiving the
                // assignment, which came before this answer.
                owned.lease_renewed_at = owned.placed_at;
                tracing::info!(pod = %owned.pod_ref(), %epoch, %agent, "assigned");
                let changed_in_flight = owned.changed_in_flight.take();
                if owned.deleting {
                    let release = Release {
                        pod: uid.clone(),
                        epoch,
                        grace_period_secs: owned.grace_secs,
                    };
                    self.release_now(agent, release);
                    return;
                }
                let mut status = owned.status.get();
                status.conditions = Some(vec![PodCondition {
                    type_: "PodScheduled".into(),
                    status: "True".into(),
                    last_transition_time: Some(now_time()),
                    ..Default::default()
                }]);
                self.set_status(&uid, status);
                if let Some(previous) = changed_in_flight {
                    self.send_assign_refresh(&uid, agent, previous);
                }
            }
            Internal::AssignFailed {
                uid,
                epoch,
                reasons,
                unanswered,
            } => {
                let Some(owned) = self.pods.get_mut(&uid) else {
                    return;
                };
                if owned.epoch != epoch {
                    return;
                }
                // Declined, or it may run unseen: either way the owner's view was
                // wrong about it, so the agents are asked next time.
                owned.ask_agents = true;
                if owned.deleting {
                    self.forget(&uid);
                    return;
                }
                if !unanswered {
                    self.unreserve(&uid);
                }
                let Some(owned) = self.pods.get_mut(&uid) else {
                    return;
                };
                // A strict pod an agent may have started without answering waits for
                // that copy's first lease to run out.
                let wait = if unanswered && owned.fencing == Fencing::Strict {
                    self.config.lease + self.config.fencing_margin
                } else {
                    Duration::from_secs(1)
                };
                owned.placement = Placement::Waiting {
                    at: Instant::now() + wait,
                };
                self.due.insert(uid.clone());
                for (agent, reason) in &reasons {
                    if reason.starts_with(POLICY_REFUSAL) {
                        owned.policy_refusals.retain(|(a, _)| a != agent);
                        owned.policy_refusals.push((*agent, reason.clone()));
                    }
                }
                if owned.policy_refusals.len() > MAX_POLICY_REFUSALS {
                    let excess = owned.policy_refusals.len() - MAX_POLICY_REFUSALS;
                    owned.policy_refusals.drain(..excess);
                }
                let message = if unanswered {
                    format!("assignment not answered: {}", agent_reasons(&reasons))
                } else {
                    format!("assignment declined: {}", agent_reasons(&reasons))
                };
                tracing::info!(pod = %owned.pod_ref(), %message, "re-offering");
                self.set_status(&uid, pending_status("Unschedulable", message));
            }
            Internal::UpdateRefused {
                uid,
                previous,
                refused,
                reason,
            } => self.on_update_refused(&uid, &previous.get(), &refused.get(), reason),
        }
    }

    /// The agent declined an update of a placed pod. The ephemeral containers that
    /// update added are what its policy refused (nothing else of a running pod's spec
    /// changes): each is left out of the pod from now on and waits in the status with
    /// the reason, as the kubelet shows a container it cannot create, with a `Failed`
    /// event; the rest of the pod is sent again.
    fn on_update_refused(&mut self, uid: &PodUid, previous: &Pod, refused: &Pod, reason: String) {
        let Some(owned) = self.pods.get_mut(uid) else {
            return;
        };
        let Placement::Placed { agent } = owned.placement else {
            return;
        };
        let had = ephemeral_names(previous);
        let added: Vec<String> = ephemeral_names(refused)
            .into_iter()
            .filter(|name| !had.contains(name) && !owned.refused_ephemeral.contains_key(name))
            .collect();
        if added.is_empty() {
            return;
        }
        let mut events = Vec::new();
        for name in added {
            let message =
                format!("the agent's policy refuses ephemeral container {name:?}: {reason}");
            events.push(AgentEvent::new(
                AgentEventReason::Failed,
                format!("Error: {message}"),
            ));
            owned.refused_ephemeral.insert(name, message);
        }
        self.sink.events(owned.pod_ref(), &events);
        let pod = without_ephemeral(owned.pod.clone(), &owned.refused_ephemeral);
        if pod != owned.pod {
            owned.offer.spec_digest = spec_digest(&pod.get());
            let previous = std::mem::replace(&mut owned.pod, pod);
            self.send_assign_refresh(uid, agent, previous);
        }
        let Some(owned) = self.pods.get(uid) else {
            return;
        };
        let status = with_refused_ephemeral(owned.status.get(), &owned.refused_ephemeral);
        self.set_status(uid, status);
    }

    /// An agent's heartbeat: remember its capacity, and release the pods it says it
    /// runs for us that we no longer want there. A heartbeat never places a pod: only
    /// a status report with the owner's signed assignment does (see `on_status`).
    pub fn on_heartbeat(&mut self, agent: PeerId, heartbeat: Heartbeat) {
        if !self.config.agents.trusts(&agent) {
            self.metrics.dropped("heartbeat", "untrusted");
            return;
        }
        if let Err(replay) =
            self.heartbeat_seqs
                .check(agent, heartbeat.seq, heartbeat.sent_at_ms, unix_millis())
        {
            self.metrics.dropped("heartbeat", replay.kind());
            tracing::debug!(%agent, %replay, "heartbeat dropped");
            return;
        }
        for subnet in &heartbeat.pod_subnets {
            self.subnets.claim(agent, *subnet);
        }
        let me = self.me();
        // Pods placed there that the agent no longer lists. Deleted ones: it stopped them
        // and its `removed` report was lost, so the deletion is done. Others: it lost
        // them (a reboot took its memory-backed records with the pods' secrets, say), so
        // they go elsewhere.
        let listed: HashSet<&PodUid> = heartbeat
            .pods
            .iter()
            .filter(|p| p.owner.0 == me)
            .map(|h| &h.pod.uid)
            .collect();
        let unlisted: Vec<(PodUid, bool)> = self
            .pods_on(agent)
            .into_iter()
            .filter(|uid| !listed.contains(uid))
            .filter_map(|uid| {
                let owned = self.pods.get(&uid)?;
                (owned.placed_at.elapsed() > MISSING_GRACE).then_some((uid, owned.deleting))
            })
            .collect();
        for (uid, deleting) in unlisted {
            if deleting {
                tracing::info!(%agent, %uid, "agent no longer runs the deleted pod; its deletion is done");
                self.forget(&uid);
            } else {
                tracing::warn!(%agent, %uid, "agent no longer runs the pod; placing it again");
                self.agent_lost(&uid, agent, "no longer runs the pod");
            }
        }
        match &heartbeat.health.runtime_error {
            Some(error) => {
                if let std::collections::hash_map::Entry::Vacant(entry) =
                    self.runtime_down_since.entry(agent)
                {
                    tracing::warn!(%agent, %error, "agent's container runtime fails its checks");
                    entry.insert(Instant::now());
                }
            }
            None => {
                if self.runtime_down_since.remove(&agent).is_some() {
                    tracing::info!(%agent, "agent's container runtime recovered");
                }
            }
        }
        let first_back = self.cut_off && self.agents.is_empty();
        if self.agents.record(agent, heartbeat) {
            // Capacity changed: pods nobody could take may fit now.
            let soon = Instant::now().max(self.adopt_until);
            self.retime_waiting(|at| (*at).min(soon));
        }
        // This owner's pods are known from its own records (and shown from them). Those
        // it no longer has stay listed, as the agent's, until they are released below.
        let pods = &self.pods;
        let mut hosted = self
            .agents
            .take_listed(&agent, |p| p.owner.0 == me && pods.contains_key(&p.pod.uid));
        hosted.extend(
            self.agents
                .get(&agent)
                .into_iter()
                .flat_map(|seen| &seen.heartbeat.pods)
                .filter(|p| p.owner.0 == me)
                .cloned(),
        );
        if first_back {
            self.hold_lost_copies(agent);
        }
        // Copies no longer listed are done with: their releases are not sent again.
        self.release_retries
            .retain(|(a, uid)| *a != agent || hosted.iter().any(|h| &h.pod.uid == uid));
        for hp in hosted {
            let uid = hp.pod.uid.clone();
            let Some(owned) = self.pods.get(&uid) else {
                if !self.synced {
                    continue;
                }
                tracing::info!(pod = %hp.pod, %agent, "agent runs a pod this owner no longer has; releasing it");
                self.release_again(
                    agent,
                    Release {
                        pod: uid,
                        epoch: hp.epoch,
                        grace_period_secs: 30,
                    },
                );
                continue;
            };
            // (Not while its runtime fails: that is why the copy was given up.)
            let lost_copy_back = !owned.deleting
                && !hp.unrecorded
                && !self.runtime_down_since.contains_key(&agent)
                && owned.waits_after_losing(agent, hp.epoch);
            if lost_copy_back {
                // This owner assigned that copy to this agent, and nothing since: the
                // agent was cut off, not gone, and its copy ran on.
                tracing::info!(pod = %hp.pod, %agent, epoch = %hp.epoch, "agent is back with the copy declared lost; taking it back");
                self.adopt(&uid, agent, hp.epoch);
                continue;
            }
            let current = matches!(owned.placement, Placement::Placed { agent: a } if a == agent)
                && hp.epoch == owned.epoch;
            if hp.unrecorded && current && !owned.deleting {
                // The agent lost its record of the placement: it gets it again.
                tracing::info!(pod = %hp.pod, %agent, "agent found the pod without its record; sending the assignment again");
                let pod = owned.pod.clone();
                self.send_assign_refresh(&uid, agent, pod);
                continue;
            }
            // A lost copy not taken back yet (its runtime still fails) is kept: it
            // may be the pod's only copy.
            let older = hp.epoch < owned.epoch && !owned.waits_after_losing(agent, hp.epoch);
            if older || owned.deleting || owned.placement == Placement::Done && !current {
                let release = Release {
                    pod: uid,
                    epoch: hp.epoch,
                    grace_period_secs: owned.grace_secs,
                };
                self.release_again(agent, release);
            }
        }
    }

    /// The first agent heard after every agent was lost: the node was probably the one
    /// cut off, so the other agents' relaxed copies likely ran on. Their pods wait a
    /// loss timeout for their agents to come back (and be taken back) before they go
    /// elsewhere, instead of all restarting on whichever agent is heard first.
    fn hold_lost_copies(&mut self, back: PeerId) {
        self.cut_off = false;
        let until = Instant::now() + self.config.agent_loss_timeout;
        let mut held = 0;
        for owned in self.pods.values_mut() {
            let waiting_for_other = matches!(owned.placement, Placement::Waiting { .. })
                && owned.lost_copy.as_ref().is_some_and(|l| l.agent != back);
            if waiting_for_other {
                owned.offer_not_before = owned.offer_not_before.max(until);
                held += 1;
            }
        }
        tracing::info!(agent = %back, held, wait_secs = self.config.agent_loss_timeout.as_secs(), "an agent is back after all were lost; pods of the others wait for theirs");
    }

    /// Sends a Release at once; the agent's heartbeats repeat it (see
    /// [`Owner::release_again`]) after the back-off.
    fn release_now(&mut self, agent: PeerId, release: Release) {
        self.release_retries
            .try_now((agent, release.pod.clone()), Instant::now());
        self.send_release(agent, release);
    }

    /// Sends a Release a heartbeat calls for, unless one went to that copy lately (see
    /// [`RELEASE_RETRY`]).
    fn release_again(&mut self, agent: PeerId, release: Release) {
        if self
            .release_retries
            .try_now((agent, release.pod.clone()), Instant::now())
        {
            self.send_release(agent, release);
        }
    }

    /// Takes over a placement found on the mesh (after this owner restarted).
    fn adopt(&mut self, uid: &PodUid, agent: PeerId, epoch: Epoch) {
        let Some(owned) = self.pods.get_mut(uid) else {
            return;
        };
        // Offers made since the loss went unanswered.
        let lost_copy_back = owned.waits_after_losing(agent, epoch);
        if epoch < owned.epoch && !lost_copy_back {
            return;
        }
        if let Placement::Placed { agent: other } = owned.placement {
            if other != agent && epoch == owned.epoch {
                return;
            }
        }
        tracing::info!(pod = %owned.pod_ref(), %epoch, %agent, "adopting running placement");
        let taken_back = owned.lost_copy.take().filter(|_| lost_copy_back);
        owned.inherited = false;
        owned.epoch = epoch;
        owned.offer.epoch = epoch;
        owned.placement = Placement::Placed { agent };
        owned.placed_at = Instant::now();
        self.placed_on.entry(agent).or_default().insert(uid.clone());
        // The agent's lease, if any, was taken before now.
        owned.lease_renewed_at = owned.placed_at;
        if let Some(lost) = taken_back {
            // The copy declared lost runs on: no restart happened.
            owned.carried_restarts = lost.carried_restarts;
            owned.lost_state = lost.lost_state;
            self.set_status(uid, lost.status);
        }
    }

    /// Whether `statement` is this owner's signed assignment of the reported pod and
    /// epoch to `agent`: the only proof a report counts for.
    fn assigned_by_me(&self, agent: PeerId, report: &StatusReport) -> Result<(), String> {
        let statement: &SignedAssignment = &report.assignment;
        statement::verify_own_signature(statement, &self.signer).map_err(|e| e.to_string())?;
        if statement.agent.0 != agent
            || statement.pod != report.pod.uid
            || statement.epoch != report.epoch
        {
            return Err(format!(
                "the assignment is for {} at epoch {} on {}",
                statement.pod, statement.epoch, statement.agent
            ));
        }
        Ok(())
    }

    pub fn on_status(&mut self, agent: PeerId, report: StatusReport) -> Response {
        let uid = report.pod.uid.clone();
        if let Err(reason) = self.assigned_by_me(agent, &report) {
            self.metrics.dropped("status", "not_assigned");
            audit::record(
                &self.metrics,
                "status",
                Outcome::Refused,
                &agent,
                Some(&report.pod),
                &reason,
            );
            return Response::Declined {
                reason: format!("not assigned to you by this owner: {reason}"),
            };
        }
        let Some(owned) = self.pods.get_mut(&uid) else {
            if !self.synced {
                // Not known yet; the agent reports again.
                return Response::Ack;
            }
            return Response::Superseded {
                current: report.epoch.next(),
            };
        };
        let lost_copy = owned.waits_after_losing(agent, report.epoch);
        if report.epoch < owned.epoch && !lost_copy {
            return Response::Superseded {
                current: owned.epoch,
            };
        }
        let sent_at_ms = report.sent_at_ms;
        if let Err(replay) = owned
            .status_seqs
            .check(agent, report.seq, sent_at_ms, unix_millis())
        {
            self.metrics.dropped("status", replay.kind());
            tracing::debug!(pod = %report.pod, %agent, %replay, "status report dropped");
            return Response::Ack;
        }
        if lost_copy && self.runtime_down_since.contains_key(&agent) {
            // Taken back, with this status, once the agent's heartbeats say its runtime
            // works again.
            if let Some(lost) = self.pods.get_mut(&uid).and_then(|o| o.lost_copy.as_mut()) {
                lost.status = merge_status(
                    report.status,
                    &lost.carried_restarts,
                    lost.lost_state.as_deref(),
                );
            }
            return Response::Ack;
        }
        let placed_here = matches!(owned.placement, Placement::Placed { agent: a } if a == agent);
        if report.epoch > owned.epoch || !placed_here {
            self.adopt(&uid, agent, report.epoch);
        }
        let Some(owned) = self.pods.get(&uid) else {
            return Response::Ack;
        };
        if !matches!(owned.placement, Placement::Placed { agent: a } if a == agent) {
            return Response::Superseded {
                current: owned.epoch,
            };
        }
        if report.removed {
            if owned.deleting {
                self.forget(&uid);
            } else {
                // The runner dropped it without being asked: place it again.
                if let Some(owned) = self.pods.get_mut(&uid) {
                    owned.placement = Placement::Waiting { at: Instant::now() };
                    self.due.insert(uid.clone());
                }
            }
            return Response::Ack;
        }
        let events = self.known_events(report.events);
        if !events.is_empty() {
            self.sink.events(owned.pod_ref(), &events);
        }
        let merged = merge_status(
            report.status,
            &owned.carried_restarts,
            owned.lost_state.as_deref(),
        );
        let merged = with_refused_ephemeral(merged, &owned.refused_ephemeral);
        self.set_status(&uid, merged);
        Response::Ack
    }

    /// An agent's events as they may reach the cluster: known reasons only, at most
    /// [`MAX_REPORT_EVENTS`], messages cut to [`MAX_EVENT_MESSAGE`]; the rest dropped
    /// and counted.
    fn known_events(&self, events: Vec<AgentEvent>) -> Vec<AgentEvent> {
        let mut kept = Vec::new();
        for event in events {
            if event.reason.kubernetes().is_none() {
                self.metrics.dropped("event", "unknown_reason");
            } else if kept.len() == MAX_REPORT_EVENTS {
                self.metrics.dropped("event", "too_many");
            } else {
                kept.push(AgentEvent::new(event.reason, event.message));
            }
        }
        kept
    }

    /// An agent renews the leases of the strict pods it runs for this owner: granted
    /// where the owner has the pod placed there (adopting it first after a restart, as
    /// from a status report), refused where it placed it elsewhere or let it go, left
    /// waiting while an assignment's answer or the first pod list is still out.
    fn on_renew(&mut self, agent: PeerId, renew: Renew) -> Response {
        let me = self.me();
        let (mut granted, mut refused) = (Vec::new(), Vec::new());
        for statement in renew.leases {
            let uid = statement.pod.clone();
            if statement::verify_signature(&statement, &me).is_err() || statement.agent.0 != agent {
                self.metrics.dropped("renew", "not_assigned");
                refused.push(uid);
                continue;
            }
            let Some(owned) = self.pods.get(&uid) else {
                if self.synced {
                    refused.push(uid);
                }
                continue;
            };
            let epoch = statement.epoch;
            match owned.placement {
                Placement::Assigning if owned.epoch == epoch => continue,
                Placement::Done => {
                    refused.push(uid);
                    continue;
                }
                Placement::Placed { agent: a } if a == agent && owned.epoch == epoch => {}
                _ => self.adopt(&uid, agent, epoch),
            }
            match self.pods.get_mut(&uid) {
                Some(owned)
                    if owned.placement == Placement::Placed { agent } && owned.epoch == epoch =>
                {
                    owned.lease_renewed_at = Instant::now();
                    granted.push(uid);
                }
                _ => refused.push(uid),
            }
        }
        Response::Leases {
            granted,
            refused,
            lease_ms: self.config.lease.as_millis() as u64,
        }
    }

    fn check_lost_agents(&mut self) {
        let lost = self.agents.take_lost(self.config.agent_loss_timeout);
        if !lost.is_empty() && self.agents.is_empty() {
            tracing::warn!("every agent is lost: this node may be the one cut off");
            self.cut_off = true;
        }
        for agent in lost {
            self.metrics.agents_lost.inc();
            tracing::warn!(%agent, "agent stopped sending heartbeats; moving its pods");
            let uids: Vec<PodUid> = self
                .pods_on(agent)
                .into_iter()
                .filter(|uid| self.pods[uid].placement == Placement::Placed { agent })
                .collect();
            self.heartbeat_seqs.retain(|a| *a != agent);
            self.runtime_down_since.remove(&agent);
            self.release_retries.retain(|(a, _)| *a != agent);
            for uid in uids {
                self.agent_unreachable(&uid, agent, "stopped sending heartbeats");
            }
        }
        // What follows looks at every placement: once a second is soon enough for
        // timeouts counted in seconds.
        if self.silent_checked.elapsed() < SILENT_CHECK {
            return;
        }
        self.silent_checked = Instant::now();
        // An agent whose runtime has failed as long as a lost agent's heartbeats: its
        // relaxed pods go elsewhere. Its strict ones stay: the runtime cannot say
        // whether their containers still run, nor stop them, so no second copy starts.
        let broken: Vec<PeerId> = self
            .runtime_down_since
            .iter()
            .filter(|(_, since)| since.elapsed() > self.config.agent_loss_timeout)
            .map(|(agent, _)| *agent)
            .collect();
        for agent in broken {
            let relaxed: Vec<PodUid> = self
                .pods_on(agent)
                .into_iter()
                .filter(|uid| {
                    let o = &self.pods[uid];
                    o.placement == Placement::Placed { agent } && o.fencing == Fencing::Relaxed
                })
                .collect();
            for uid in relaxed {
                self.agent_lost(&uid, agent, "has a container runtime that fails its checks");
            }
        }
        // Placements taken back from an agent's report or renewal: its heartbeats must
        // follow within the loss timeout, or it is as lost as one that stopped.
        let timeout = self.config.agent_loss_timeout;
        let silent: Vec<(PodUid, PeerId)> = self
            .pods
            .iter()
            .filter_map(|(uid, owned)| match owned.placement {
                Placement::Placed { agent }
                    if self.agents.get(&agent).is_none() && owned.placed_at.elapsed() > timeout =>
                {
                    Some((uid.clone(), agent))
                }
                _ => None,
            })
            .collect();
        for (uid, agent) in silent {
            self.agent_unreachable(&uid, agent, "sent no heartbeat since it took the pod");
        }
    }

    /// The pod's agent cannot be reached (or trusted) any more: a relaxed pod goes
    /// elsewhere at once; a strict one once the lease of its copy there has run out.
    fn agent_unreachable(&mut self, uid: &PodUid, agent: PeerId, why: &str) {
        let Some(owned) = self.pods.get_mut(uid) else {
            return;
        };
        if owned.fencing == Fencing::Relaxed || owned.deleting {
            self.agent_lost(uid, agent, why);
            return;
        }
        let until = owned.lease_renewed_at + self.config.lease + self.config.fencing_margin;
        owned.placement = Placement::Fencing { agent, until };
        self.due.insert(uid.clone());
        self.placed_on.entry(agent).or_default().insert(uid.clone());
        let wait = until.saturating_duration_since(Instant::now()).as_secs();
        let message = format!(
            "agent {agent} {why}; the pod is placed again once its copy there has stopped for want of a lease (in {wait} s)"
        );
        tracing::warn!(pod = %owned.pod_ref(), %agent, wait_secs = wait, "strict pod's agent unreachable; waiting for its lease to run out");
        let mut status = owned.status.get();
        for condition in status.conditions.iter_mut().flatten() {
            if [
                "Ready",
                "ContainersReady",
                crate::raft::GROUP_READY_CONDITION,
            ]
            .contains(&condition.type_.as_str())
            {
                condition.status = "False".into();
                condition.reason = Some("AgentUnreachable".into());
                condition.message = Some(message.clone());
                condition.last_transition_time = Some(now_time());
            }
        }
        for cs in status.container_statuses.iter_mut().flatten() {
            cs.ready = false;
        }
        self.set_status(uid, status);
    }

    fn agent_lost(&mut self, uid: &PodUid, agent: PeerId, why: &str) {
        let Some(owned) = self.pods.get(uid) else {
            return;
        };
        let before = LostCopy {
            agent,
            epoch: owned.epoch,
            status: owned.status.get(),
            carried_restarts: owned.carried_restarts.clone(),
            lost_state: owned.lost_state.clone(),
        };
        self.copy_lost(uid, format!("agent {agent} {why}"));
        if let Some(owned) = self.pods.get_mut(uid) {
            // A strict copy stopped for want of a lease: never taken back.
            if owned.fencing == Fencing::Relaxed
                && matches!(owned.placement, Placement::Waiting { .. })
            {
                owned.lost_copy = Some(Box::new(before));
            }
        }
    }

    /// The pod's copy is gone: placed again (its restarts counted on), or failed for
    /// good with restartPolicy Never.
    fn copy_lost(&mut self, uid: &PodUid, message: String) {
        let Some(owned) = self.pods.get_mut(uid) else {
            return;
        };
        owned.inherited = false;
        if owned.deleting {
            // If it comes back, its heartbeat lists the pod and it is released then.
            self.forget(uid);
            return;
        }
        let lost = ContainerStateTerminated {
            exit_code: 137,
            reason: Some("AgentLost".into()),
            message: Some(message.clone()),
            finished_at: Some(now_time()),
            ..Default::default()
        };
        let current = owned.status.get();
        if owned.policy == RestartPolicy::Never {
            let mut status = failed_status("AgentLost", message, &current);
            for cs in status.container_statuses.iter_mut().flatten() {
                if cs.state.as_ref().is_some_and(|s| s.terminated.is_none()) {
                    cs.state = Some(ContainerState {
                        terminated: Some(lost.clone()),
                        ..Default::default()
                    });
                    cs.ready = false;
                }
            }
            owned.placement = Placement::Done;
            self.set_status(uid, status);
            return;
        }
        // Restart elsewhere: each container's restart count goes on from where it was.
        for cs in current.container_statuses.iter().flatten() {
            owned
                .carried_restarts
                .insert(cs.name.clone(), cs.restart_count + 1);
        }
        owned.lost_state = Some(Box::new(lost.clone()));
        owned.placement = Placement::Waiting { at: Instant::now() };
        self.due.insert(uid.clone());
        let mut status = pending_status("AgentLost", format!("{message}; offering the pod again"));
        status.container_statuses = current.container_statuses.map(|list| {
            list.into_iter()
                .map(|cs| ContainerStatus {
                    ready: false,
                    started: Some(false),
                    state: Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some("ContainerCreating".into()),
                            message: None,
                        }),
                        ..Default::default()
                    }),
                    last_state: Some(ContainerState {
                        terminated: Some(lost.clone()),
                        ..Default::default()
                    }),
                    restart_count: cs.restart_count + 1,
                    ..cs
                })
                .collect()
        });
        self.set_status(uid, status);
    }

    /// Where a pod runs, for the kubelet API, which names pods without their UID. Of
    /// namesakes (a StatefulSet's `web-0` being deleted while its replacement runs) the
    /// kubelet means the pod it added last: the one not being deleted, else the newest.
    pub fn locate(&self, namespace: &str, name: &str) -> Option<PodLocation> {
        let owned = self
            .pods
            .values()
            .filter(|o| o.pod_ref().namespace == namespace && o.pod_ref().name == name)
            .max_by_key(|o| (!o.deleting, o.created.as_ref().map(|t| t.0)))?;
        let spec = owned.desired.pod.get().spec;
        Some(PodLocation {
            pod: owned.pod_ref().clone(),
            agent: owned.placed_on(),
            containers: spec
                .as_ref()
                .map(|s| {
                    s.init_containers
                        .iter()
                        .flatten()
                        .chain(&s.containers)
                        .map(|c| c.name.clone())
                        .chain(
                            s.ephemeral_containers
                                .iter()
                                .flatten()
                                .map(|e| e.name.clone()),
                        )
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The agents that run this owner's pods.
    pub fn placed_agents(&self) -> Vec<PeerId> {
        let mut agents: Vec<PeerId> = self.pods.values().filter_map(|o| o.placed_on()).collect();
        agents.sort();
        agents.dedup();
        agents
    }

    /// The pods as the source has them (no resolved secrets), with their status, for
    /// the kubelet API's /pods.
    pub fn pods(&self) -> Vec<Pod> {
        self.pods
            .values()
            .map(|owned| owned.with_status())
            .collect()
    }

    /// Everything this owner knows, for `beemesh status`.
    pub fn view(&self) -> MeshView {
        let mut view = self.agents.view(self.config.agent_loss_timeout);
        // Our own pods, with reasons; the agents' lists add nothing for those.
        view.pods.retain(|p| !self.pods.contains_key(&p.pod.uid));
        for owned in self.pods.values() {
            let status = owned.status.get();
            let scheduled = unscheduled(&status);
            // What keeps a container from running, as `kubectl get pods` shows it.
            let waiting = status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten())
                .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
                .find(|w| w.message.is_some());
            let spec = owned.desired.pod.get().spec;
            let shown = pod_display(spec.as_ref(), &status, owned.deleting);
            let created = owned
                .created
                .as_ref()
                .map(|t| t.0)
                .or_else(|| status.start_time.as_ref().map(|t| t.0));
            view.pods.push(PodSummary {
                reason: status
                    .reason
                    .clone()
                    .or_else(|| scheduled.and_then(|c| c.reason.clone()))
                    .or_else(|| waiting.map(|w| w.reason.clone().unwrap_or_default())),
                message: status
                    .message
                    .clone()
                    .or_else(|| scheduled.and_then(|c| c.message.clone()))
                    .or_else(|| waiting.and_then(|w| w.message.clone())),
                status: Some(shown.status),
                ready: Some(ReadyCount {
                    ready: shown.ready,
                    total: shown.containers,
                }),
                restarts: shown.restarts,
                created_at: created.map(|t| t.as_second()),
                ip: status.pod_ip.clone().filter(|ip| !ip.is_empty()),
                node: Some(
                    spec.and_then(|s| s.node_name)
                        .unwrap_or_else(|| self.config.node_name.clone()),
                ),
                ..PodSummary::new(
                    owned.pod_ref().clone(),
                    match owned.placement {
                        Placement::Placed { agent } => Some(PeerRef(agent)),
                        _ => None,
                    },
                    owned.epoch,
                    if owned.deleting {
                        "Terminating".into()
                    } else {
                        status.phase.clone().unwrap_or_else(|| "Pending".into())
                    },
                )
            });
        }
        view.pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        view
    }

    /// Answers an agent's or client's request. Joins are the node's business (they
    /// need its token store) and never reach the owner.
    pub fn on_request(&mut self, peer: PeerId, request: Request) -> Response {
        if let Some(refusal) = self.refuse_untrusted(peer, &request) {
            return refusal;
        }
        match request {
            Request::Bid(bid) => self.on_bid(peer, bid),
            Request::Status(report) => self.on_status(peer, *report),
            Request::Renew(renew) => self.on_renew(peer, renew),
            Request::Query => Response::View(Box::new(self.view())),
            Request::Assign(_) | Request::Release(_) | Request::Join(_) | Request::Group(_) => {
                Response::Error {
                    message: "this peer is an owner; it does not run pods".into(),
                }
            }
            // Answered by the node loop, which has the Services and the cluster's DNS.
            Request::ClusterDns(_) | Request::Route(_) => Response::Error {
                message: "this node answers no DNS queries or routes".into(),
            },
        }
    }

    /// The refusal of a request from a peer not trusted to make it (audited and
    /// counted); None for a trusted one.
    pub fn refuse_untrusted(&self, peer: PeerId, request: &Request) -> Option<Response> {
        let trusted = match request {
            Request::Bid(_)
            | Request::Status(_)
            | Request::Renew(_)
            | Request::ClusterDns(_)
            | Request::Route(_) => self.config.agents.trusts(&peer),
            Request::Query => self.config.clients.trusts(&peer),
            Request::Assign(_) | Request::Release(_) | Request::Join(_) | Request::Group(_) => true,
        };
        if !trusted {
            self.metrics.dropped(request.kind(), "untrusted");
            audit::record(
                &self.metrics,
                request.kind(),
                Outcome::Refused,
                &peer,
                None,
                &"peer not trusted",
            );
            return Some(Response::Declined {
                reason: format!("peer {peer} is not trusted by this node"),
            });
        }
        None
    }

    /// The Service addresses this owner routes.
    pub fn cluster_ranges(&self) -> &[Ipv4Net] {
        &self.config.cluster_ranges
    }

    /// Whether `agent` may ask for DNS and routes on behalf of `pod`: a trusted agent
    /// that runs that pod of this owner.
    pub fn runs_for(&self, agent: PeerId, pod: &PodRef) -> bool {
        self.config.agents.trusts(&agent) && self.placed_on(pod) == Some(agent)
    }

    /// The agent `pod` is placed on, if it is this owner's pod under that UID, namespace
    /// and name: looked up by UID, as every connection to, from or through a pod asks
    /// it (a terminating namesake keeps its connections until it is gone).
    pub fn placed_on(&self, pod: &PodRef) -> Option<PeerId> {
        self.pods
            .get(&pod.uid)
            .filter(|owned| owned.pod_ref() == pod)
            .and_then(|owned| owned.placed_on())
    }

    /// The pods `service` selects, with their status (see [`Owner::selected_pods`]).
    pub fn pods_behind(&self, service: &Service) -> Vec<Pod> {
        let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
        match service.spec.as_ref().and_then(|s| s.selector.as_ref()) {
            Some(selector) => self.selected_pods(namespace, selector),
            None => Vec::new(),
        }
    }

    /// The pods of `namespace` whose labels hold every pair of `selector`, with their
    /// status; none for an empty selector, as a Service without one has no endpoints.
    /// Every connection to a Service asks for its pods: which they are is kept until
    /// a pod is added, changed or removed, and only those are decoded.
    pub fn selected_pods(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<Pod> {
        if selector.is_empty() {
            return Vec::new();
        }
        let uids = self.selections.get_or_find(namespace, selector, || {
            self.pods
                .iter()
                .filter(|(_, owned)| owned.pod_ref().namespace == namespace)
                .filter(|(_, owned)| owned.desired.pod.labels_match(selector))
                .map(|(uid, _)| uid.clone())
                .collect()
        });
        uids.iter()
            .filter_map(|uid| self.pods.get(uid))
            .map(|owned| owned.with_status())
            .collect()
    }

    /// The pod with its status.
    pub fn pod(&self, uid: &PodUid) -> Option<Pod> {
        self.pods.get(uid).map(|owned| owned.with_status())
    }

    /// Agents whose trust was revoked: they are forgotten at once, and their pods are
    /// released there and placed elsewhere, as for a lost agent.
    pub fn agents_revoked(&mut self, revoked: &[PeerId]) {
        for agent in revoked {
            self.agents.remove(agent);
            self.runtime_down_since.remove(agent);
            self.release_retries.retain(|(a, _)| a != agent);
            self.heartbeat_seqs.retain(|a| a != agent);
            let uids: Vec<PodUid> = self
                .pods_on(*agent)
                .into_iter()
                .filter(|uid| self.pods[uid].placement == Placement::Placed { agent: *agent })
                .collect();
            tracing::warn!(%agent, pods = uids.len(), "agent's trust revoked; moving its pods");
            for uid in uids {
                if let Some(owned) = self.pods.get(&uid) {
                    let release = Release {
                        pod: uid.clone(),
                        epoch: owned.epoch,
                        grace_period_secs: owned.grace_secs,
                    };
                    self.send_release(*agent, release);
                }
                self.agent_unreachable(&uid, *agent, "had its trust revoked");
            }
        }
    }

    /// Waits for the next result of an assignment task.
    pub async fn next_internal(&mut self) -> Option<()> {
        let internal = self.internal_rx.recv().await?;
        self.on_internal(internal);
        Some(())
    }
}

/// Whether a status shows the pod placed on an agent: running, or with a container
/// that was created.
pub fn was_placed(status: &PodStatus) -> bool {
    status.phase.as_deref() == Some("Running")
        || status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
            .any(|c| c.container_id.is_some())
}

/// A runner's status with the restarts and last state of earlier placements.
fn merge_status(
    mut status: PodStatus,
    carried: &BTreeMap<String, i32>,
    lost: Option<&ContainerStateTerminated>,
) -> PodStatus {
    for cs in status.container_statuses.iter_mut().flatten() {
        if let Some(extra) = carried.get(&cs.name) {
            cs.restart_count += extra;
            let no_last_state = cs.last_state.as_ref().is_none_or(|s| {
                s.terminated.is_none() && s.running.is_none() && s.waiting.is_none()
            });
            if no_last_state {
                if let Some(lost) = lost {
                    cs.last_state = Some(ContainerState {
                        terminated: Some(lost.clone()),
                        ..Default::default()
                    });
                }
            }
        }
    }
    status
}

fn ephemeral_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten())
        .map(|e| e.name.clone())
        .collect()
}

/// `pod` without the ephemeral containers named in `refused`.
fn without_ephemeral(stored: StoredPod, refused: &BTreeMap<String, String>) -> StoredPod {
    if refused.is_empty() {
        return stored;
    }
    let mut pod = stored.get();
    if !ephemeral_names(&pod)
        .iter()
        .any(|n| refused.contains_key(n))
    {
        return stored;
    }
    if let Some(ephemeral) = pod
        .spec
        .as_mut()
        .and_then(|s| s.ephemeral_containers.as_mut())
    {
        ephemeral.retain(|e| !refused.contains_key(&e.name));
    }
    StoredPod::new(&pod)
}

/// `status` with each refused ephemeral container waiting, with the reason, as the
/// kubelet shows a container it could not create.
fn with_refused_ephemeral(mut status: PodStatus, refused: &BTreeMap<String, String>) -> PodStatus {
    if refused.is_empty() {
        return status;
    }
    let statuses = status
        .ephemeral_container_statuses
        .get_or_insert_with(Vec::new);
    statuses.retain(|cs| !refused.contains_key(&cs.name));
    statuses.extend(refused.iter().map(|(name, message)| {
        config_error_container(name.clone(), String::new(), message.clone())
    }));
    status
}

/// A stateful workload's pod whose status the owner made (lost, waiting, failed) has no
/// member in its group: its group condition says so, so that its role label goes.
fn not_in_group_unless_said(status: &mut PodStatus) {
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    if !conditions
        .iter()
        .any(|c| c.type_ == crate::raft::GROUP_READY_CONDITION)
    {
        conditions.push(PodCondition {
            type_: crate::raft::GROUP_READY_CONDITION.into(),
            status: "False".into(),
            reason: Some("NotRunning".into()),
            message: Some("the pod does not run, so it has no member in its group".into()),
            last_transition_time: Some(now_time()),
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_ephemeral_containers_leave_the_pod_and_wait_in_its_status() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {
                "containers": [{"name": "app"}],
                "ephemeralContainers": [{"name": "root"}, {"name": "debugger"}],
            },
        }))
        .expect("pod");
        assert_eq!(ephemeral_names(&pod), ["root", "debugger"]);
        let pod = StoredPod::new(&pod);
        let none = BTreeMap::new();
        assert_eq!(without_ephemeral(pod.clone(), &none), pod);
        let refused = BTreeMap::from([("root".to_string(), "no privileged".to_string())]);
        assert_eq!(
            ephemeral_names(&without_ephemeral(pod, &refused).get()),
            ["debugger"]
        );

        let reported = PodStatus {
            ephemeral_container_statuses: Some(vec![ContainerStatus {
                name: "debugger".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let status = with_refused_ephemeral(reported, &refused);
        let statuses = status.ephemeral_container_statuses.expect("statuses");
        assert_eq!(statuses.len(), 2);
        let waiting = statuses[1].state.as_ref().and_then(|s| s.waiting.as_ref());
        assert_eq!(statuses[1].name, "root");
        assert_eq!(
            waiting.and_then(|w| w.reason.as_deref()),
            Some("CreateContainerConfigError")
        );
        assert_eq!(
            waiting.and_then(|w| w.message.as_deref()),
            Some("no privileged")
        );
        assert_eq!(
            with_refused_ephemeral(PodStatus::default(), &none),
            PodStatus::default()
        );
    }

    #[test]
    fn each_counted_start_owns_epochs_above_every_earlier_one() {
        assert!(
            epoch_floor(1) > OwnerConfig::default().epoch_floor,
            "above clock seconds"
        );
        assert!(epoch_floor(2) > epoch_floor(1));
        assert_eq!(epoch_floor(2).0 - epoch_floor(1).0, 1 << 32);
        assert_eq!(epoch_floor(u64::MAX), Epoch(u64::MAX));
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let mut before = pending_status("Unschedulable", "0/1 agents fit".into());
        let at = Time(Timestamp::from_second(1_000_000).expect("time"));
        before.conditions.as_mut().expect("conditions")[0].last_transition_time = Some(at.clone());
        // Retried for another reason: still not scheduled since the same time.
        let mut again = pending_status("Unschedulable", "assignment declined".into());
        keep_transition_times(&before, &mut again);
        let condition = &again.conditions.as_ref().expect("conditions")[0];
        assert_eq!(condition.last_transition_time, Some(at.clone()));
        assert_eq!(condition.message.as_deref(), Some("assignment declined"));
        // Retried for the same reason: the very same status, so nothing is written.
        let mut same = pending_status("Unschedulable", "0/1 agents fit".into());
        keep_transition_times(&before, &mut same);
        assert_eq!(same, before);
        // Scheduled: a transition, at its own time.
        let mut placed = before.clone();
        placed.conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "True".into(),
            last_transition_time: Some(now_time()),
            ..Default::default()
        }]);
        keep_transition_times(&before, &mut placed);
        assert_ne!(
            placed.conditions.expect("conditions")[0].last_transition_time,
            Some(at)
        );
    }

    #[test]
    fn merged_status_carries_restarts_and_the_agent_lost_state() {
        let status = PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                name: "c".into(),
                restart_count: 1,
                last_state: Some(ContainerState::default()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let carried = BTreeMap::from([("c".to_string(), 2)]);
        let lost = ContainerStateTerminated {
            exit_code: 137,
            reason: Some("AgentLost".into()),
            ..Default::default()
        };
        let merged = merge_status(status, &carried, Some(&lost));
        let cs = &merged.container_statuses.expect("statuses")[0];
        assert_eq!(cs.restart_count, 3);
        assert_eq!(
            cs.last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.reason.as_deref()),
            Some("AgentLost")
        );
    }
}
