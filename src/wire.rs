//! Every message BeeMesh peers exchange, with its codec and size limits (protocol v1).
//!
//! Gossip carries small messages (offers, heartbeats); request-response carries the
//! rest. Every message travels in an [`Envelope`] with a version, is JSON on the wire
//! (the Kubernetes types it embeds are designed for JSON), and is refused before
//! parsing when it is larger than its limit. Decoding never panics: a bad message is a
//! [`WireError`] that the mesh counts and drops.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use libp2p::PeerId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The protocol version this build speaks (2: signed assignments, sequenced reports,
/// enrollment).
pub const PROTOCOL_VERSION: u16 = 2;
/// Gossip messages stay well under rust-libp2p's 64 KiB default transmit size.
pub const MAX_GOSSIP_BYTES: usize = 60 * 1024;
/// A request carries at most one full pod spec plus the data meant for its runner.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// A response carries at most a mesh view.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// The request-response protocol name, versioned with the wire format.
pub const REQUEST_PROTOCOL: &str = "/beemesh/req/1";

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message of {size} bytes exceeds the {limit} byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("protocol version {0} is not supported (this peer speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message does not belong on topic {0}")]
    WrongTopic(Topic),
}

impl WireError {
    /// A short, fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::TooLarge { .. } => "too_large",
            WireError::UnsupportedVersion(_) => "unsupported_version",
            WireError::Malformed(_) => "malformed",
            WireError::WrongTopic(_) => "wrong_topic",
        }
    }
}

/// The UID of a Kubernetes pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PodUid(pub String);

impl PodUid {
    /// A name safe to use as one path component: the UID itself when it is plain
    /// (Kubernetes UIDs are), else its SHA-256, so that no UID can escape a directory.
    pub fn file_name(&self) -> String {
        let plain = !self.0.is_empty()
            && self.0.len() <= 128
            && self
                .0
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-');
        if plain {
            self.0.clone()
        } else {
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(self.0.as_bytes()))
        }
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Placement generation of a pod. Only the owner raises it; a runner holding a lower
/// epoch than the owner's for a pod must stop its copy.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A mesh peer (agent or node), serialized as its base58 peer ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerRef(pub PeerId);

impl fmt::Display for PeerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for PeerRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PeerRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        PeerId::from_str(&text)
            .map(PeerRef)
            .map_err(serde::de::Error::custom)
    }
}

/// The gossip topics. There is no "unknown" topic: a message on any other topic never
/// reaches BeeMesh code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    Offers,
    Heartbeats,
}

impl Topic {
    pub const ALL: [Topic; 2] = [Topic::Offers, Topic::Heartbeats];

    pub fn name(self) -> &'static str {
        match self {
            Topic::Offers => "beemesh/v1/offers",
            Topic::Heartbeats => "beemesh/v1/heartbeats",
        }
    }

    pub fn from_name(name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Identifies a pod to people and to the runtime.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    pub uid: PodUid,
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    /// How the kubelet names a pod in its messages (`format.Pod`): `name_namespace(uid)`.
    pub fn kubelet_name(&self) -> String {
        format!("{}_{}({})", self.name, self.namespace, self.uid)
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An amount of the resources placement counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub pods: u64,
}

impl Resources {
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            pods: self.pods.saturating_sub(other.pods),
        }
    }

    pub fn saturating_add(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            pods: self.pods.saturating_add(other.pods),
        }
    }
}

/// One requirement of a label selector over agent labels (`beemesh.io/agent-selector`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum LabelRequirement {
    Equals { key: String, value: String },
    NotEquals { key: String, value: String },
    In { key: String, values: Vec<String> },
    NotIn { key: String, values: Vec<String> },
    Exists { key: String },
    DoesNotExist { key: String },
}

/// A pod offered to the mesh by its owner (gossip, `beemesh/v1/offers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub pod: PodRef,
    pub epoch: Epoch,
    pub requests: Resources,
    #[serde(default)]
    pub agent_selector: Vec<LabelRequirement>,
    /// Host ports the pod binds; an agent that already binds one cannot take it.
    #[serde(default)]
    pub host_ports: Vec<u16>,
    /// SHA-256 of the pod as the owner will send it in [`Assign`].
    pub spec_digest: String,
}

/// A pod an agent runs, as its heartbeat tells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostedPod {
    pub pod: PodRef,
    pub owner: PeerRef,
    pub epoch: Epoch,
    pub phase: String,
    pub requests: Resources,
    #[serde(default)]
    pub host_ports: Vec<u16>,
    /// The agent found this pod in its runtime without its assignment record (lost
    /// with its memory-backed directory): its owner claims it by sending the
    /// assignment again, or releases it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unrecorded: bool,
}

/// Whether an agent can take pods, as the kubelet reports its node's conditions: its
/// container runtime passes its checks, and it is under no resource pressure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHealth {
    /// Why the container runtime fails its checks, while it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_error: Option<String>,
    #[serde(default)]
    pub memory_pressure: bool,
    #[serde(default)]
    pub disk_pressure: bool,
    #[serde(default)]
    pub pid_pressure: bool,
}

/// Agent liveness and free capacity (gossip, `beemesh/v1/heartbeats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub free: Resources,
    pub pods: Vec<HostedPod>,
    /// Seconds since the agent started, so that owners can tell a restart.
    pub uptime_secs: u64,
    /// Size of the filesystem that holds the agent's pods' data (ephemeral storage).
    #[serde(default)]
    pub storage_bytes: u64,
    /// The agent's sequence number: it only grows, across restarts too, so that an
    /// old heartbeat replayed later is recognised.
    pub seq: u64,
    /// The agent's clock when it sent this, in Unix milliseconds.
    pub sent_at_ms: u64,
    /// An agent that says nothing is healthy (agents before this field).
    #[serde(default)]
    pub health: AgentHealth,
    /// The subnets the agent's pods run in (each given by an owner, see
    /// [`Assign::pod_subnet`]): a restarted owner takes its agents' subnets back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_subnets: Vec<Ipv4Net>,
}

/// Everything sent on a gossip topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum GossipMessage {
    Offer(Offer),
    Heartbeat(Heartbeat),
}

impl GossipMessage {
    pub fn topic(&self) -> Topic {
        match self {
            GossipMessage::Offer(_) => Topic::Offers,
            GossipMessage::Heartbeat(_) => Topic::Heartbeats,
        }
    }
}

/// An agent's bid for an offer: it fits and is willing. The owner ranks bidders itself,
/// from their heartbeats, never from what a bidder claims.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bid {
    pub pod: PodUid,
    pub epoch: Epoch,
}

/// The owner's signed word that `agent` runs `pod` at `epoch` with the spec whose
/// SHA-256 is `spec_digest` (see `trust::statement`). Holds no secret: agents keep it
/// with their assignment records and show it with their status reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAssignment {
    pub owner: PeerRef,
    pub agent: PeerRef,
    pub pod: PodUid,
    pub epoch: Epoch,
    pub spec_digest: String,
    /// Unix seconds after which an agent refuses the assignment when it arrives.
    pub expires_at: u64,
    /// The owner's Ed25519 signature, hex.
    pub signature: String,
}

/// The owner gives a pod to one agent for one epoch. Sent again with the same epoch
/// when the data of the pod's volumes changes (a refreshed service account token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assign {
    pub epoch: Epoch,
    /// The whole pod (metadata and spec; status empty), with env values taken from
    /// configMaps and secrets already filled in by the owner.
    pub pod: Pod,
    /// The files of the pod's configMap, secret, downwardAPI and projected volumes, by
    /// volume name. Only the assigned agent receives them: offers never carry them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, Vec<VolumeFile>>,
    /// The credentials of the pod's `imagePullSecrets`, as the kubelet's keyring holds
    /// them. Only the assigned agent receives them, and gives each to Podman with the
    /// one pull it is for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_credentials: Vec<RegistryCredential>,
    /// The owner's signature over this assignment, for this agent.
    pub statement: SignedAssignment,
    /// For a strict pod (see `fencing`), how long the agent may run it without hearing
    /// its owner renew the placement, counted from when it received this; none for a
    /// relaxed pod, which runs through partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// The agent's subnet of the owner's mesh pod CIDR, on which the pod runs (a Podman
    /// network the agent keeps for it); none puts it on Podman's default network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_subnet: Option<Ipv4Net>,
    /// Addresses in the owner's cluster (its Service CIDR) that the pod's connections
    /// to are relayed to the owner (see [`CLUSTER_PROTOCOL`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_ranges: Vec<Ipv4Net>,
    /// The cluster's domain, when the owner relays its pods' DNS queries to the
    /// cluster's DNS (`ClusterFirst` pods then resolve through the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_domain: Option<String>,
}

/// One file of a volume whose content the owner provides.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeFile {
    /// Relative to the volume's root, without `..` (checked where it is written).
    pub path: String,
    pub data: k8s_openapi::ByteString,
    /// Permission bits, as the volume's defaultMode or the item's mode.
    pub mode: u32,
}

/// Never prints the data: it may be a secret.
impl fmt::Debug for VolumeFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeFile")
            .field("path", &self.path)
            .field("bytes", &self.data.0.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

/// Events an agent may report about a pod it runs: the kubelet's own reasons, nothing
/// else (an agent cannot write arbitrary events into the cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentEventReason {
    /// A probe failed once (`Liveness probe failed: …`).
    Unhealthy,
    /// A container is stopped for a failed probe or hook.
    Killing,
    FailedPostStartHook,
    FailedPreStopHook,
    /// The pod's resolv.conf had to be cut to the kubelet's limits.
    DNSConfigForming,
    /// A container could not be created (`Error: …`), e.g. an ephemeral container
    /// the agent's policy refuses.
    Failed,
    /// The pod's connections to its cluster's Services cannot be relayed (the agent
    /// cannot set its redirect up).
    ClusterUnreachable,
    /// The pod's member leads its stateful workload's group now.
    LeaderElected,
    /// From a newer agent: dropped by the owner.
    #[serde(other)]
    Unknown,
}

impl AgentEventReason {
    /// The Kubernetes reason, and whether it is a warning; None for [`Self::Unknown`].
    pub fn kubernetes(self) -> Option<(&'static str, bool)> {
        Some(match self {
            AgentEventReason::Unhealthy => ("Unhealthy", true),
            AgentEventReason::Killing => ("Killing", false),
            AgentEventReason::FailedPostStartHook => ("FailedPostStartHook", true),
            AgentEventReason::FailedPreStopHook => ("FailedPreStopHook", true),
            AgentEventReason::DNSConfigForming => ("DNSConfigForming", true),
            AgentEventReason::Failed => ("Failed", true),
            AgentEventReason::ClusterUnreachable => ("ClusterUnreachable", true),
            AgentEventReason::LeaderElected => ("LeaderElected", false),
            AgentEventReason::Unknown => return None,
        })
    }
}

/// The most events one status report carries.
pub const MAX_REPORT_EVENTS: usize = 16;
/// The longest event message kept, in bytes (the rest is cut).
pub const MAX_EVENT_MESSAGE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEvent {
    pub reason: AgentEventReason,
    pub message: String,
}

impl AgentEvent {
    /// An event with its message cut to [`MAX_EVENT_MESSAGE`] bytes.
    pub fn new(reason: AgentEventReason, mut message: String) -> AgentEvent {
        if message.len() > MAX_EVENT_MESSAGE {
            let mut end = MAX_EVENT_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        AgentEvent { reason, message }
    }
}

/// A registry login from an image pull secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryCredential {
    /// The registry it is for, as the kubelet's keyring indexes it: a host (with port
    /// and `*` globs) and maybe a path prefix, without scheme (`registry:5000`,
    /// `*.example.com/team`, `index.docker.io`).
    pub registry: String,
    pub username: String,
    pub password: String,
}

/// Never prints the password.
impl fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The owner takes a pod away: stop every copy with an epoch up to `epoch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub pod: PodUid,
    pub epoch: Epoch,
    /// Seconds between SIGTERM and SIGKILL.
    pub grace_period_secs: u64,
}

/// An agent asks its owner to renew the leases of the strict pods it runs for it,
/// showing the owner's signed assignment of each (proof enough to adopt them after the
/// owner restarted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Renew {
    pub leases: Vec<SignedAssignment>,
}

/// A runner's view of a pod's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub pod: PodRef,
    pub epoch: Epoch,
    pub status: PodStatus,
    /// True once the runner has removed the pod after a release.
    #[serde(default)]
    pub removed: bool,
    /// The owner's assignment of this pod to the reporter at this epoch: an owner
    /// believes a report only with its own signature.
    pub assignment: SignedAssignment,
    /// The agent's sequence number (see [`Heartbeat::seq`]).
    pub seq: u64,
    /// The agent's clock when it sent this, in Unix milliseconds.
    pub sent_at_ms: u64,
    /// What happened to the pod since the last report that its status does not show
    /// (a failed probe, a failed hook), for the owner to record as Kubernetes events.
    /// At most [`MAX_REPORT_EVENTS`]; the owner drops any beyond.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<AgentEvent>,
}

/// An agent proves it holds a join token (see `trust::join`); the token itself never
/// travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The public half of the token.
    pub token_id: String,
    /// 128 random bits, hex: makes each proof single-use.
    pub nonce: String,
    /// The agent's clock, Unix milliseconds.
    pub sent_at_ms: u64,
    /// HMAC-SHA256 with the token's secret over both peer IDs, the nonce and the time.
    pub proof: String,
}

/// The stream protocol over which a node relays kubelet API requests to the agent that
/// runs the pod: a [`KubeletRequest`] header, a [`KubeletAnswer`] header, then the bytes.
pub const KUBELET_PROTOCOL: &str = "/beemesh/kubelet/1";
/// Upper bound of a kubelet stream header.
pub const MAX_KUBELET_HEADER_BYTES: usize = 64 * 1024;

/// The stream protocol over which an agent relays a connection of one of its pods to
/// an address in the cluster (a Service's ClusterIP) to the pod's owner, which dials it
/// inside the cluster: a [`ClusterDial`] header, a [`KubeletAnswer`], then the bytes
/// (for a UDP flow, its datagrams each way, framed as `kubelet::relay::write_datagram`).
pub const CLUSTER_PROTOCOL: &str = "/beemesh/cluster/1";

/// A pod's connection to `to` in the cluster, relayed by its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterDial {
    pub pod: PodRef,
    pub to: std::net::SocketAddr,
    /// A UDP flow (datagrams from one port of the pod to `to`), not a TCP connection.
    #[serde(default)]
    pub udp: bool,
}

impl ClusterDial {
    /// The protocol as the API names it in Service and NetworkPolicy ports.
    pub fn protocol(&self) -> &'static str {
        if self.udp {
            "UDP"
        } else {
            "TCP"
        }
    }
}

/// Which standard streams an interactive session (exec, attach) connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Streams {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// What a node asks of an agent on a kubelet stream, after it authorized the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum KubeletRequest {
    /// A container's log; the agent then streams it until it ends (or, following,
    /// until the container stops or either side closes).
    Logs {
        pod: PodUid,
        container: String,
        follow: bool,
        tail_lines: Option<u64>,
        timestamps: bool,
        /// Unix seconds.
        since: Option<i64>,
        /// The instance before the last restart.
        previous: bool,
    },
    /// Resource usage of the asking owner's pods on the agent: the agent answers with
    /// a JSON list of [`PodUsage`] and closes.
    Stats,
    /// A command in a running container with the chosen streams; session frames
    /// follow both ways (see `kubelet::relay`).
    Exec {
        pod: PodUid,
        container: String,
        command: Vec<String>,
        streams: Streams,
    },
    /// A TCP connection to a port of the pod (`kubectl port-forward`); raw bytes follow
    /// both ways.
    PortForward { pod: PodUid, port: u16 },
    /// UDP datagrams to and from a port of the pod (a Service's UDP port, through the
    /// node's gateway); datagrams follow both ways, each framed (see
    /// `kubelet::relay::write_datagram`).
    UdpForward { pod: PodUid, port: u16 },
    /// The streams of a container's own process (`kubectl attach`); session frames
    /// follow as for `Exec`.
    Attach {
        pod: PodUid,
        container: String,
        streams: Streams,
    },
}

impl KubeletRequest {
    /// The kubelet API verb, for audit lines.
    pub fn verb(&self) -> &'static str {
        match self {
            KubeletRequest::Logs { .. } => "logs",
            KubeletRequest::Stats => "stats",
            KubeletRequest::Exec { .. } => "exec",
            KubeletRequest::PortForward { .. } => "portforward",
            KubeletRequest::UdpForward { .. } => "udpforward",
            KubeletRequest::Attach { .. } => "attach",
        }
    }

    pub fn pod(&self) -> Option<&PodUid> {
        match self {
            KubeletRequest::Logs { pod, .. }
            | KubeletRequest::Exec { pod, .. }
            | KubeletRequest::PortForward { pod, .. }
            | KubeletRequest::UdpForward { pod, .. }
            | KubeletRequest::Attach { pod, .. } => Some(pod),
            KubeletRequest::Stats => None,
        }
    }
}

/// Resource usage of one container, as an agent reads it from its runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerUsage {
    pub name: String,
    /// CPU time used since the container started, in nanoseconds.
    pub cpu_nanos: u64,
    pub memory_bytes: u64,
    /// Unix seconds.
    pub started_at: Option<i64>,
}

/// Resource usage of one pod's running containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodUsage {
    pub pod: PodRef,
    pub containers: Vec<ContainerUsage>,
}

/// The agent's answer; after `Ok` the requested bytes follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum KubeletAnswer {
    Ok,
    /// An HTTP status and the kubelet's text for it.
    Failed {
        code: u16,
        message: String,
    },
}

/// Direct requests between peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Request {
    Bid(Bid),
    Assign(Box<Assign>),
    Release(Release),
    Status(Box<StatusReport>),
    /// Ask a peer what it knows of the mesh (`beemesh status`).
    Query,
    /// An agent asks to be enrolled by a node.
    Join(JoinRequest),
    /// An agent asks its owner to renew its strict pods' leases.
    Renew(Renew),
    /// An agent relays a DNS query of one of its pods to the pod's owner, which asks the
    /// cluster's DNS.
    ClusterDns(ClusterDnsQuery),
    /// An agent asks the owner of one of its pods where that pod's connection to a
    /// Service address goes (answered with [`Response::Route`]).
    Route(ClusterDial),
    /// The owner tells the agents of a stateful workload who its group's members are.
    Group(Box<SignedGroup>),
}

/// The largest DNS message relayed over UDP, and the largest query over TCP (a query is
/// far smaller; an answer larger than the client's buffer comes back truncated, as DNS
/// over UDP does, and the client asks again over TCP).
pub const MAX_DNS_MESSAGE: usize = 4096;

/// The largest DNS answer relayed over TCP: what its two-byte length can say.
pub const MAX_DNS_TCP_MESSAGE: usize = 65_535;

/// A pod's DNS query, as it sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterDnsQuery {
    pub pod: PodRef,
    pub query: k8s_openapi::ByteString,
    /// The pod asked over TCP (after a truncated answer): so is the cluster's DNS, and
    /// the answer may be up to [`MAX_DNS_TCP_MESSAGE`].
    #[serde(default)]
    pub tcp: bool,
}

impl Request {
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Bid(_) => "bid",
            Request::Assign(_) => "assign",
            Request::Release(_) => "release",
            Request::Status(_) => "status",
            Request::Query => "query",
            Request::Join(_) => "join",
            Request::Renew(_) => "renew",
            Request::ClusterDns(_) => "cluster_dns",
            Request::Route(_) => "route",
            Request::Group(_) => "group",
        }
    }
}

/// An agent as a mesh view shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSummary {
    pub peer: PeerRef,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub free: Resources,
    pub pods: usize,
    /// Seconds since its last heartbeat reached the answering peer.
    pub last_seen_secs: u64,
    #[serde(default)]
    pub health: AgentHealth,
}

/// A pod as a mesh view shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodSummary {
    pub pod: PodRef,
    pub agent: Option<PeerRef>,
    pub epoch: Epoch,
    pub phase: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// As `kubectl get pods` shows it (owners only; agents list phases): STATUS,
    /// READY, RESTARTS.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub ready: Option<ReadyCount>,
    #[serde(default)]
    pub restarts: u32,
    /// Unix seconds of the pod's creation (or, without one, its start).
    #[serde(default)]
    pub created_at: Option<i64>,
    #[serde(default)]
    pub ip: Option<String>,
    /// The BeeMesh node that owns it.
    #[serde(default)]
    pub node: Option<String>,
}

impl PodSummary {
    /// A pod in a phase, nothing more said.
    pub fn new(pod: PodRef, agent: Option<PeerRef>, epoch: Epoch, phase: String) -> Self {
        PodSummary {
            pod,
            agent,
            epoch,
            phase,
            reason: None,
            message: None,
            status: None,
            ready: None,
            restarts: 0,
            created_at: None,
            ip: None,
            node: None,
        }
    }
}

/// Ready containers of all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyCount {
    pub ready: u32,
    pub total: u32,
}

/// What a peer knows of the mesh.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MeshView {
    pub agents: Vec<AgentSummary>,
    pub pods: Vec<PodSummary>,
    /// The owner's standalone Services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSummary>,
}

/// A standalone Service as a mesh view shows it (`kubectl get services` and its
/// endpoints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: String,
    /// `80/TCP`, as kubectl shows them.
    pub ports: Vec<String>,
    /// The ready pods it sends to.
    pub ready_endpoints: u32,
}

/// How a [`Response::Declined`] reason from an agent's admission policy starts.
pub const POLICY_REFUSAL: &str = "refused by the agent's policy";

/// Answers to [`Request`]s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Response {
    Ack,
    /// The agent will not run the pod (it no longer fits, or it does not trust the owner).
    /// A reason starting with [`POLICY_REFUSAL`] names the rule of the agent's admission
    /// policy that refused the pod; the agent bids no more for a spec its policy
    /// refused, nor beyond an owner's quota.
    Declined {
        reason: String,
    },
    /// The sender's epoch is stale: the owner has placed the pod again (or deleted it).
    Superseded {
        current: Epoch,
    },
    View(Box<MeshView>),
    /// The request was understood but could not be served.
    Error {
        message: String,
    },
    /// The node enrolled the agent; its proof that it knows the token too.
    Joined {
        proof: String,
    },
    /// The answer to [`Renew`]: the pods whose leases run on for `lease_ms` from when
    /// the agent sent the request, and those the owner no longer has there (their
    /// copies stop now). Pods in neither list wait (the owner is not ready to say).
    Leases {
        granted: Vec<PodUid>,
        refused: Vec<PodUid>,
        lease_ms: u64,
    },
    /// The cluster DNS's answer to a [`ClusterDnsQuery`].
    ClusterDns {
        answer: k8s_openapi::ByteString,
    },
    /// Where a pod's connection to a Service address goes (see [`Request::Route`]).
    Route(Route),
}

/// Where a mesh pod's connection to a Service address goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "via", rename_all = "camelCase")]
pub enum Route {
    /// To the owner over [`CLUSTER_PROTOCOL`], which dials it inside the cluster.
    Owner,
    /// Straight to the agent of the mesh pod the owner picked as the Service's endpoint,
    /// over [`DIRECT_PROTOCOL`], with the owner's grant.
    Direct(Box<SignedDial>),
}

/// The stream protocol between the members of a stateful workload's Raft group (see
/// `raft::rpc` for its frames).
pub const RAFT_PROTOCOL: &str = "/beemesh/raft/1";

/// The most members a group has: the most pods of one stateful workload that get a
/// group.
pub const MAX_GROUP_MEMBERS: usize = 64;

/// One pod of a group, and the agent that runs it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupMember {
    pub agent: PeerRef,
    pub pod: PodRef,
}

/// The owner's word on a stateful workload's group: the pods `namespace`/`name` has, and
/// the agents that run them, which alone take part in its Raft group (see
/// `trust::group`). Sent to every member when it changes, and again now and then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedGroup {
    pub owner: PeerRef,
    pub namespace: String,
    /// The group's name: the StatefulSet's, or the pods' `beemesh.io/raft-group`.
    pub name: String,
    /// Grows with every change the owner makes: an agent ignores an older word.
    pub version: u64,
    /// The member that starts the group's log, when none has one: the agent of the
    /// group's oldest pod. None when the group has no pod left.
    pub founder: Option<PeerRef>,
    pub members: Vec<GroupMember>,
    /// The owner's Ed25519 signature, hex.
    pub signature: String,
}

/// The stream protocol over which an agent connects one of its pods to a port of a pod
/// of another agent (a mesh Service's endpoint): a [`SignedDial`] header, a
/// [`KubeletAnswer`], then the bytes.
pub const DIRECT_PROTOCOL: &str = "/beemesh/direct/1";

/// An owner's grant: agent `from` may connect to TCP `port` of pod `pod`, which the
/// owner placed on agent `to`, until `expires_at` (Unix seconds). The agent `to` checks
/// the signature against an owner it trusts and that owner's pod on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDial {
    pub owner: PeerRef,
    pub from: PeerRef,
    pub to: PeerRef,
    pub pod: PodUid,
    pub port: u16,
    pub expires_at: u64,
    /// Ed25519 over the fields (see `trust::dial`), hex.
    pub signature: String,
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    v: u16,
    msg: &'a T,
}

#[derive(Deserialize)]
struct EnvelopeIn<T> {
    msg: T,
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u16,
}

/// Encodes a message in its versioned envelope, refusing to emit one over `limit`.
pub fn encode<T: Serialize>(msg: &T, limit: usize) -> Result<Vec<u8>, WireError> {
    let bytes = serde_json::to_vec(&EnvelopeOut {
        v: PROTOCOL_VERSION,
        msg,
    })
    .map_err(|e| WireError::Malformed(e.to_string()))?;
    if bytes.len() > limit {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

/// The least a pod entry of a heartbeat is counted as when working out its room: a
/// short name, no host ports.
const MIN_HEARTBEAT_ENTRY: usize = 256;
/// Room kept in a heartbeat for entries larger than any so far (long names, many host
/// ports).
const HEARTBEAT_SLACK: usize = 2048;

/// A gossip message's encoded size, and that of its largest pod entry if it is a
/// heartbeat (0 otherwise).
pub fn heartbeat_size(message: &GossipMessage) -> Result<(usize, usize), WireError> {
    let bytes = encode(message, usize::MAX)?.len();
    let pods = match message {
        GossipMessage::Heartbeat(heartbeat) => heartbeat.pods.as_slice(),
        _ => &[],
    };
    let largest = pods
        .iter()
        .map(|p| serde_json::to_vec(p).map_or(0, |entry| entry.len() + 1))
        .max()
        .unwrap_or(0);
    Ok((bytes, largest))
}

/// How many more pods a heartbeat of `bytes`, whose largest pod entry took
/// `largest_entry`, can list within [`MAX_GOSSIP_BYTES`]: an agent takes no more pods
/// than its heartbeat lists, or its owner would lose sight of all of them.
pub fn heartbeat_room(bytes: usize, largest_entry: usize) -> u64 {
    let free = MAX_GOSSIP_BYTES.saturating_sub(bytes + HEARTBEAT_SLACK);
    (free / largest_entry.max(MIN_HEARTBEAT_ENTRY)) as u64
}

/// Decodes a message from its versioned envelope.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, WireError> {
    if bytes.len() > limit {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    let probe: VersionProbe =
        serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if probe.v != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion(probe.v));
    }
    let envelope: EnvelopeIn<T> =
        serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    Ok(envelope.msg)
}

/// Decodes a gossip message and checks that it belongs on the topic it came on.
pub fn decode_gossip(topic: Topic, bytes: &[u8]) -> Result<GossipMessage, WireError> {
    let msg: GossipMessage = decode(bytes, MAX_GOSSIP_BYTES)?;
    if msg.topic() != topic {
        return Err(WireError::WrongTopic(topic));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod_ref() -> PodRef {
        PodRef {
            uid: PodUid("0b7a4c6e-1111-2222-3333-444455556666".into()),
            namespace: "default".into(),
            name: "web".into(),
        }
    }

    fn statement() -> SignedAssignment {
        SignedAssignment {
            owner: PeerRef(PeerId::random()),
            agent: PeerRef(PeerId::random()),
            pod: pod_ref().uid,
            epoch: Epoch(2),
            spec_digest: "ab".repeat(32),
            expires_at: 1_700_000_000,
            signature: "ef".repeat(64),
        }
    }

    fn round_trip<T>(msg: &T, limit: usize)
    where
        T: Serialize + DeserializeOwned + PartialEq + fmt::Debug,
    {
        let bytes = encode(msg, limit).expect("encodes");
        let back: T = decode(&bytes, limit).expect("decodes");
        assert_eq!(&back, msg);
    }

    #[test]
    fn an_event_reason_from_a_newer_agent_is_unknown_not_an_error() {
        let event: AgentEvent =
            serde_json::from_str(r#"{"reason": "SomethingNew", "message": "m"}"#)
                .expect("a report with it still decodes");
        assert_eq!(event.reason, AgentEventReason::Unknown);
        assert_eq!(event.reason.kubernetes(), None);
        let long = AgentEvent::new(AgentEventReason::Unhealthy, "é".repeat(MAX_EVENT_MESSAGE));
        assert!(
            long.message.len() <= MAX_EVENT_MESSAGE && long.message.len() > MAX_EVENT_MESSAGE - 2
        );
    }

    #[test]
    fn a_dns_query_from_an_agent_before_dns_over_tcp_is_a_udp_one() {
        let query = Request::ClusterDns(ClusterDnsQuery {
            pod: pod_ref(),
            query: k8s_openapi::ByteString(vec![1, 2]),
            tcp: true,
        });
        round_trip(&query, MAX_REQUEST_BYTES);
        let mut older = serde_json::to_value(&query).expect("encodes");
        older.as_object_mut().expect("the query").remove("tcp");
        let older: Request = serde_json::from_value(older).expect("decodes");
        assert!(matches!(
            older,
            Request::ClusterDns(ClusterDnsQuery { tcp: false, .. })
        ));
    }

    #[test]
    fn secrets_in_messages_never_reach_a_log() {
        let credential = RegistryCredential {
            registry: "registry:5000".into(),
            username: "alice".into(),
            password: "pa55word".into(),
        };
        let file = VolumeFile {
            path: "password".into(),
            data: k8s_openapi::ByteString(b"s3cr3t".to_vec()),
            mode: 0o400,
        };
        let shown = format!("{credential:?} {file:?}");
        assert!(
            shown.contains("registry:5000") && shown.contains("alice"),
            "{shown}"
        );
        assert!(
            !shown.contains("pa55word") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }

    #[test]
    fn gossip_messages_round_trip() {
        let offer = GossipMessage::Offer(Offer {
            pod: pod_ref(),
            epoch: Epoch(3),
            requests: Resources {
                cpu_millis: 250,
                memory_bytes: 64 << 20,
                pods: 1,
            },
            agent_selector: vec![
                LabelRequirement::Equals {
                    key: "zone".into(),
                    value: "a".into(),
                },
                LabelRequirement::NotIn {
                    key: "arch".into(),
                    values: vec!["arm64".into()],
                },
            ],
            host_ports: vec![8080],
            spec_digest: "ab".repeat(32),
        });
        round_trip(&offer, MAX_GOSSIP_BYTES);

        let heartbeat = GossipMessage::Heartbeat(Heartbeat {
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            capacity: Resources {
                cpu_millis: 2000,
                memory_bytes: 1 << 30,
                pods: 110,
            },
            free: Resources::default(),
            pods: vec![HostedPod {
                pod: pod_ref(),
                owner: PeerRef(PeerId::random()),
                epoch: Epoch(1),
                phase: "Running".into(),
                requests: Resources::default(),
                host_ports: vec![],
                unrecorded: false,
            }],
            uptime_secs: 5,
            storage_bytes: 100 << 30,
            seq: 1_700_000_000_000_001,
            sent_at_ms: 1_700_000_000_000,
            pod_subnets: vec!["10.64.3.0/24".parse().expect("cidr")],
            health: AgentHealth {
                runtime_error: Some("ping: connection refused".into()),
                disk_pressure: true,
                ..AgentHealth::default()
            },
        });
        round_trip(&heartbeat, MAX_GOSSIP_BYTES);
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("u".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("localhost/busybox:1.35".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        };
        for req in [
            Request::Bid(Bid {
                pod: pod_ref().uid,
                epoch: Epoch(1),
            }),
            Request::Assign(Box::new(Assign {
                epoch: Epoch(2),
                pod,
                volumes: BTreeMap::from([(
                    "config".to_string(),
                    vec![VolumeFile {
                        path: "app/settings.yaml".into(),
                        data: k8s_openapi::ByteString(b"\x00binary\xff".to_vec()),
                        mode: 0o640,
                    }],
                )]),
                pod_subnet: Some("10.64.3.0/24".parse().expect("cidr")),
                cluster_ranges: vec!["10.43.0.0/16".parse().expect("cidr")],
                cluster_domain: Some("cluster.local".into()),
                pull_credentials: vec![RegistryCredential {
                    registry: "registry:5000".into(),
                    username: "u".into(),
                    password: "p".into(),
                }],
                statement: statement(),
                lease_ms: Some(15_000),
            })),
            Request::Release(Release {
                pod: pod_ref().uid,
                epoch: Epoch(2),
                grace_period_secs: 30,
            }),
            Request::Status(Box::new(StatusReport {
                pod: pod_ref(),
                epoch: Epoch(2),
                status: PodStatus {
                    phase: Some("Running".into()),
                    ..Default::default()
                },
                removed: false,
                assignment: statement(),
                seq: 9,
                sent_at_ms: 1_700_000_000_000,
                events: vec![AgentEvent::new(
                    AgentEventReason::Unhealthy,
                    "Liveness probe failed: 503".into(),
                )],
            })),
            Request::Query,
            Request::Renew(Renew {
                leases: vec![statement()],
            }),
            Request::Join(JoinRequest {
                token_id: "abcdef".into(),
                nonce: "00".repeat(16),
                sent_at_ms: 1_700_000_000_000,
                proof: "ab".repeat(32),
            }),
        ] {
            round_trip(&req, MAX_REQUEST_BYTES);
        }
        for resp in [
            Response::Ack,
            Response::Declined {
                reason: "insufficient memory".into(),
            },
            Response::Superseded { current: Epoch(4) },
            Response::View(Box::new(MeshView {
                agents: vec![AgentSummary {
                    peer: PeerRef(PeerId::random()),
                    labels: BTreeMap::new(),
                    capacity: Resources::default(),
                    free: Resources::default(),
                    pods: 0,
                    last_seen_secs: 1,
                    health: AgentHealth::default(),
                }],
                pods: vec![PodSummary {
                    reason: Some("Unschedulable".into()),
                    message: Some("0/0 agents fit".into()),
                    ..PodSummary::new(pod_ref(), None, Epoch(0), "Pending".into())
                }],
                services: vec![ServiceSummary {
                    namespace: "default".into(),
                    name: "web".into(),
                    cluster_ip: "10.80.0.1".into(),
                    ports: vec!["80/TCP".into()],
                    ready_endpoints: 1,
                }],
            })),
            Response::Error {
                message: "x".into(),
            },
            Response::Joined {
                proof: "cd".repeat(32),
            },
            Response::Leases {
                granted: vec![PodUid("a".into())],
                refused: vec![PodUid("b".into())],
                lease_ms: 15_000,
            },
        ] {
            round_trip(&resp, MAX_RESPONSE_BYTES);
        }
    }

    #[test]
    fn oversized_messages_are_refused_both_ways() {
        let big = Request::Release(Release {
            pod: PodUid("x".repeat(100)),
            epoch: Epoch(1),
            grace_period_secs: 1,
        });
        assert!(matches!(
            encode(&big, 50),
            Err(WireError::TooLarge { limit: 50, .. })
        ));
        let bytes = vec![b' '; MAX_GOSSIP_BYTES + 1];
        assert!(matches!(
            decode_gossip(Topic::Offers, &bytes),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_and_other_versions_are_errors_not_panics() {
        for bytes in [
            &b""[..],
            b"\xff\xfe",
            b"{}",
            b"[1,2,3]",
            b"{\"v\":2}",
            b"{\"v\":2,\"msg\":{\"type\":\"nope\"}}",
            b"{\"v\":2,\"msg\":{\"type\":\"bid\",\"pod\":7}}",
            b"{\"v\":-1}",
        ] {
            assert!(decode::<Request>(bytes, MAX_REQUEST_BYTES).is_err());
        }
        assert!(matches!(
            decode::<Request>(b"{\"v\":1,\"msg\":{\"type\":\"query\"}}", MAX_REQUEST_BYTES),
            Err(WireError::UnsupportedVersion(1))
        ));
    }

    #[test]
    fn a_heartbeats_room_is_what_still_fits_under_the_gossip_limit() {
        let entry = |i: usize| HostedPod {
            pod: PodRef {
                uid: PodUid(format!("{i:036}")),
                namespace: "default".into(),
                name: format!("burst-{i}"),
            },
            owner: PeerRef(PeerId::random()),
            epoch: Epoch(4_294_967_296),
            phase: "Running".into(),
            requests: Resources::default(),
            host_ports: vec![],
            unrecorded: false,
        };
        let mut heartbeat = Heartbeat {
            labels: BTreeMap::new(),
            capacity: Resources::default(),
            free: Resources::default(),
            pods: vec![],
            uptime_secs: 0,
            storage_bytes: 0,
            seq: 0,
            sent_at_ms: 0,
            health: AgentHealth::default(),
            pod_subnets: Vec::new(),
        };
        let (bytes, largest) =
            heartbeat_size(&GossipMessage::Heartbeat(heartbeat.clone())).expect("encodes");
        let room = heartbeat_room(bytes, largest) as usize;
        assert!(
            room > 100,
            "an empty heartbeat has room for the kubelet's 110: {room}"
        );
        // Filled to the room it announced, the heartbeat still goes out.
        heartbeat.pods = (0..room).map(entry).collect();
        let (bytes, largest) =
            heartbeat_size(&GossipMessage::Heartbeat(heartbeat.clone())).expect("encodes");
        assert!(bytes <= MAX_GOSSIP_BYTES, "{bytes}");
        assert_eq!(heartbeat_room(bytes, largest), 0);
        assert!(encode(&GossipMessage::Heartbeat(heartbeat), MAX_GOSSIP_BYTES).is_ok());
    }

    #[test]
    fn gossip_on_the_wrong_topic_is_refused() {
        let hb = GossipMessage::Heartbeat(Heartbeat {
            labels: BTreeMap::new(),
            capacity: Resources::default(),
            free: Resources::default(),
            pods: vec![],
            uptime_secs: 0,
            storage_bytes: 0,
            seq: 0,
            sent_at_ms: 0,
            health: AgentHealth::default(),
            pod_subnets: Vec::new(),
        });
        let bytes = encode(&hb, MAX_GOSSIP_BYTES).expect("encodes");
        assert!(matches!(
            decode_gossip(Topic::Offers, &bytes),
            Err(WireError::WrongTopic(Topic::Offers))
        ));
        assert!(decode_gossip(Topic::Heartbeats, &bytes).is_ok());
    }

    #[test]
    fn peer_refs_must_be_peer_ids() {
        assert!(serde_json::from_str::<PeerRef>("\"not-a-peer\"").is_err());
        let id = PeerId::random();
        let json = serde_json::to_string(&PeerRef(id)).expect("serializes");
        assert_eq!(
            serde_json::from_str::<PeerRef>(&json).expect("parses").0,
            id
        );
    }

    #[test]
    fn uid_file_names_never_escape() {
        assert_eq!(PodUid("0b7a-11".into()).file_name(), "0b7a-11");
        for bad in ["../x", "", "a/b", ".."] {
            let name = PodUid(bad.into()).file_name();
            assert_eq!(name.len(), 64, "{bad}");
            assert!(name.chars().all(|c| c.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn topics_have_names_and_nothing_else_parses() {
        for t in Topic::ALL {
            assert_eq!(Topic::from_name(t.name()), Some(t));
        }
        assert_eq!(Topic::from_name("beemesh/v1/other"), None);
    }
}
