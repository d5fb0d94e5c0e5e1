//! Command-line definitions. Every flag can also be set through a `BEEMESH_*`
//! environment variable; values are checked here, before any port is bound.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::Ipv4Net;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use libp2p::{Multiaddr, PeerId};

use crate::kubelet::tunnel::TunnelMode;
use crate::node::{mesh_services, subnets};
use crate::placement::ScoreMode;
use crate::runtime::translate;
use crate::trust::join::JoinToken;

#[derive(Debug, Parser)]
#[command(
    name = "beemesh",
    version,
    about = "Run Kubernetes pods on machines that are not part of a cluster",
    long_about = "BeeMesh is a Kubernetes virtual kubelet whose pods run on a libp2p mesh of \
                  Podman agents. `beemesh node` owns pods and offers them to the mesh; \
                  `beemesh agent` runs them under Podman."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub logging: LoggingArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Args)]
pub struct LoggingArgs {
    /// Log format on stderr. Levels come from RUST_LOG (default: info).
    #[arg(
        long,
        global = true,
        env = "BEEMESH_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print this peer's ID (creating its identity key if there is none).
    Id(IdArgs),
    /// Run an agent: join the mesh and run assigned pods under Podman.
    Agent(Box<AgentArgs>),
    /// Run the virtual node: own pods and offer them to the mesh.
    Node(Box<NodeArgs>),
    /// Show the mesh's agents and pods, as a node sees them.
    Status(StatusArgs),
    /// Manage the join tokens agents enroll with, and the agents enrolled.
    Token(TokenArgs),
    /// Started by an agent that runs strict pods: removes a copy whose lease ran out
    /// when the agent could not stop it. Not for people.
    #[command(hide = true)]
    FenceWatchdog(FenceWatchdogArgs),
}

#[derive(Debug, Args)]
pub struct FenceWatchdogArgs {
    /// The agent's --secrets-dir, which holds its lease file.
    #[arg(value_name = "DIR", long)]
    pub secrets_dir: PathBuf,
    #[arg(value_name = "URI", long)]
    pub podman_socket: String,
    /// The agent's peer ID: only its Podman pods are touched.
    #[arg(long)]
    pub agent: String,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// Directory holding the identity key (identity.key, mode 0600).
    #[arg(
        value_name = "DIR",
        long,
        env = "BEEMESH_STATE_DIR",
        required_unless_present = "identity_key_file"
    )]
    pub state_dir: Option<PathBuf>,
    /// An identity key kept elsewhere (see `beemesh node --help`); it is only read, and
    /// wins over --state-dir.
    #[arg(value_name = "FILE", long, env = "BEEMESH_IDENTITY_KEY_FILE")]
    pub identity_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MeshArgs {
    /// Directory for the identity key and local state.
    #[arg(value_name = "DIR", long, env = "BEEMESH_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Identity key kept elsewhere, e.g. a mounted Secret: libp2p's encoding (as `beemesh
    /// id` writes it) or PEM PKCS#8 Ed25519 (`openssl genpkey -algorithm ed25519`);
    /// others may not read it (its group may). Default: <state-dir>/identity.key,
    /// created (mode 0600) if missing.
    #[arg(value_name = "FILE", long, env = "BEEMESH_IDENTITY_KEY_FILE")]
    pub identity_key_file: Option<PathBuf>,
    /// Multiaddr to listen on, e.g. /ip4/0.0.0.0/tcp/4001 or /ip4/0.0.0.0/udp/4001/quic-v1.
    #[arg(
        value_name = "MULTIADDR",
        long,
        env = "BEEMESH_LISTEN",
        value_delimiter = ',',
        required = true
    )]
    pub listen: Vec<Multiaddr>,
    /// Multiaddr of a mesh peer to join through (repeatable).
    #[arg(
        value_name = "MULTIADDR",
        long,
        env = "BEEMESH_BOOTSTRAP",
        value_delimiter = ','
    )]
    pub bootstrap: Vec<Multiaddr>,
    /// Serve Prometheus metrics on this address at /metrics.
    #[arg(value_name = "ADDR", long, env = "BEEMESH_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// A private mesh: the pre-shared key file (libp2p's swarm.key format) that every
    /// peer must hold to connect at all. TCP only.
    #[arg(value_name = "FILE", long, env = "BEEMESH_MESH_PSK_FILE")]
    pub mesh_psk_file: Option<PathBuf>,
    /// Trust every peer on the mesh: any agent gets pods and their secrets, any owner
    /// runs anything. For throwaway demos only; warned about every minute, and refused
    /// when the node runs in Kubernetes.
    #[arg(long, env = "BEEMESH_INSECURE_TRUST_ANY")]
    pub insecure_trust_any: bool,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// Memory-backed directory (tmpfs) for what may hold the pods' secrets: their
    /// configMap, secret, downwardAPI and projected volumes, and the assignment records.
    /// Refused if it is on a disk. The systemd unit provides /run/beemesh
    /// (RuntimeDirectory).
    #[arg(
        value_name = "DIR",
        long,
        env = "BEEMESH_SECRETS_DIR",
        default_value = "/run/beemesh"
    )]
    pub secrets_dir: PathBuf,
    /// Podman REST API socket.
    #[arg(
        value_name = "URI",
        long,
        env = "BEEMESH_PODMAN_SOCKET",
        default_value = "unix:///run/podman/podman.sock"
    )]
    pub podman_socket: String,
    /// Agent label k=v, matched by pods' beemesh.io/agent-selector (repeatable).
    #[arg(value_name = "K=V", long = "label", env = "BEEMESH_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// CPU offered to pods, in cores or millicores ("2", "1.5", "500m"). Default: all cores.
    #[arg(value_name = "CPU", long, env = "BEEMESH_CPU", value_parser = parse_cpu)]
    pub cpu: Option<u64>,
    /// Memory offered to pods, in bytes or with a suffix ("4Gi"). Default: all memory.
    #[arg(value_name = "BYTES", long, env = "BEEMESH_MEMORY", value_parser = parse_memory)]
    pub memory: Option<u64>,
    /// Most pods run at once.
    #[arg(value_name = "N", long, env = "BEEMESH_MAX_PODS", default_value_t = 110, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_pods: u64,
    /// Peer ID of a node whose work is accepted (repeatable). Not needed with --join,
    /// which pins the node it joins.
    #[arg(
        value_name = "PEER_ID",
        long,
        env = "BEEMESH_TRUST",
        value_delimiter = ','
    )]
    pub trust: Vec<PeerId>,
    /// Join token from the node (`beemesh token create`): the agent enrolls with the
    /// node it reaches through --bootstrap and pins its peer ID in the state directory,
    /// so the token is needed only once.
    #[arg(value_name = "TOKEN", long, env = "BEEMESH_JOIN", value_parser = parse_join_token)]
    pub join: Option<JoinToken>,
    /// Seconds between heartbeats.
    #[arg(value_name = "N", long, env = "BEEMESH_HEARTBEAT_SECONDS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub heartbeat_seconds: u64,
    /// Seconds without a word from a pod's owner (since the last, or since this agent
    /// started) after which its pods are stopped: an owner that is gone for good, or
    /// came back with a new identity, leaves nothing running forever.
    #[arg(value_name = "N", long, env = "BEEMESH_OWNER_GONE_SECONDS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(5..))]
    pub owner_gone_seconds: u64,
    /// Address reported as the pods' hostIP. Default: the IPv4 listen address, if specific.
    #[arg(value_name = "IP", long, env = "BEEMESH_HOST_IP")]
    pub host_ip: Option<IpAddr>,
    /// Admission policy file (YAML): which pods this host runs, whoever assigns them
    /// (Pod Security level, host ports, image allow-list, per-owner quotas). Default:
    /// the "baseline" level with host ports 1024-65535.
    #[arg(value_name = "FILE", long, env = "BEEMESH_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
    /// Entries of a stateful workload's Raft log after which its members take a
    /// snapshot and drop the log before it.
    #[arg(value_name = "N", long, env = "BEEMESH_RAFT_SNAPSHOT_ENTRIES", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    pub raft_snapshot_entries: u64,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub mesh: MeshArgs,
    /// Directory of Pod manifests (YAML or JSON, several documents per file), like
    /// the kubelet's static pods, and of the Services in front of them (ClusterIP,
    /// with a selector); changes are picked up at once (inotify) and at the
    /// latest within 1 s. With it, a Kubernetes API server is used only when named
    /// (--kubeconfig, KUBECONFIG, or running in a pod).
    #[arg(value_name = "DIR", long, env = "BEEMESH_POD_MANIFEST_PATH")]
    pub pod_manifest_path: Option<PathBuf>,
    /// Kubeconfig of the API server to register with (default: in-cluster config in a
    /// pod, else KUBECONFIG, else ~/.kube/config).
    #[arg(value_name = "FILE", long, env = "BEEMESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Name of the Node object. A Node of that name that BeeMesh did not register (no
    /// label beemesh.io/mesh=true) is refused at start, never taken over with its pods.
    #[arg(
        value_name = "NAME",
        long,
        env = "BEEMESH_NODE_NAME",
        default_value = "beemesh"
    )]
    pub node_name: String,
    /// The node's InternalIP address, where the API server reaches the kubelet API
    /// (default: the POD_IP environment variable).
    #[arg(value_name = "IP", long, env = "BEEMESH_NODE_IP")]
    pub node_ip: Option<IpAddr>,
    /// Ports of the node's address (--node-ip) that the Services selecting mesh pods are
    /// served on: one per pod port a Service sends to, published in the node's
    /// EndpointSlices and relayed to the pod over the mesh. First-last.
    #[arg(value_name = "FIRST-LAST", long, env = "BEEMESH_GATEWAY_PORTS", default_value = "20000-29999", value_parser = parse_port_range)]
    pub gateway_ports: RangeInclusive<u16>,
    /// The range mesh pods get their IPs from: each agent runs the node's pods on its
    /// own subnet of it (--mesh-pod-subnet-prefix), so that a mesh pod's IP is unique
    /// across the mesh. Must be apart from the cluster's pod and service CIDRs and from
    /// the networks of the agents' hosts.
    #[arg(value_name = "CIDR", long, env = "BEEMESH_MESH_POD_CIDR", default_value_t = subnets::DEFAULT_CIDR)]
    pub mesh_pod_cidr: Ipv4Net,
    /// The prefix length of each agent's subnet of --mesh-pod-cidr (24: 253 pods per
    /// agent; 4096 agents in the default CIDR).
    #[arg(value_name = "LENGTH", long, env = "BEEMESH_MESH_POD_SUBNET_PREFIX", default_value_t = subnets::DEFAULT_PREFIX)]
    pub mesh_pod_subnet_prefix: u8,
    /// Where the Services in --pod-manifest-path get their ClusterIPs (apart from
    /// --mesh-pod-cidr): mesh pods reach them by name and address, each connection
    /// going straight to the agent of a ready pod the Service selects.
    #[arg(value_name = "CIDR", long, env = "BEEMESH_MESH_SERVICE_CIDR", default_value_t = mesh_services::DEFAULT_CIDR)]
    pub mesh_service_cidr: Ipv4Net,
    /// The cluster's pod CIDR (k3s's --cluster-cidr), which --mesh-pod-cidr must be
    /// apart from; checked at start when the node uses a Kubernetes API server. Mesh
    /// pods' connections to the cluster's pods that are endpoints of a Service (what a
    /// headless Service's name resolves to) are relayed through the node.
    #[arg(
        value_name = "CIDR",
        long,
        env = "BEEMESH_CLUSTER_CIDR",
        default_value = "10.42.0.0/16"
    )]
    pub cluster_cidr: Ipv4Net,
    /// The cluster's DNS, which mesh pods with dnsPolicy ClusterFirst resolve through
    /// (their agents relay their queries to this node, which asks it): IP or IP:PORT
    /// (port 53). Default, when the node runs in a pod: its own nameserver, the
    /// cluster's DNS Service; standalone: the node's own nameserver, for names that are
    /// not its Services'. Without it such pods of a cluster use their agent's resolver,
    /// with the kubelet's MissingClusterDNS warning.
    #[arg(value_name = "IP[:PORT]", long, env = "BEEMESH_CLUSTER_DNS", value_parser = parse_dns_server)]
    pub cluster_dns: Option<SocketAddr>,
    /// The cluster's DNS domain (the kubelet's --cluster-domain), for the search paths of
    /// ClusterFirst pods.
    #[arg(
        value_name = "DOMAIN",
        long,
        env = "BEEMESH_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,
    /// The cluster's Service CIDR (k3s's --service-cidr), checked as --cluster-cidr.
    #[arg(
        value_name = "CIDR",
        long,
        env = "BEEMESH_SERVICE_CIDR",
        default_value = "10.43.0.0/16"
    )]
    pub service_cidr: Ipv4Net,
    /// A Hostname address for the node; reported only if it resolves (API servers try
    /// Hostname first, and an unresolvable one breaks kubectl logs and exec).
    #[arg(value_name = "NAME", long, env = "BEEMESH_NODE_HOSTNAME")]
    pub node_hostname: Option<String>,
    /// Open k3s's agent tunnel, through which a k3s server sends its kubectl
    /// logs/exec/port-forward connections to kubelets: auto (when the API server is
    /// k3s), on (fail the start if it has no tunnel endpoint) or off.
    #[arg(long, env = "BEEMESH_K3S_TUNNEL", value_enum, default_value = "auto")]
    pub k3s_tunnel: TunnelMode,
    /// Port of the kubelet API, published in the Node's daemonEndpoints.
    #[arg(value_name = "PORT", long, env = "BEEMESH_KUBELET_PORT", default_value_t = 10250, value_parser = clap::value_parser!(u16).range(1..))]
    pub kubelet_port: u16,
    /// How long the kubelet API caches a TokenReview's answer (as the kubelet's flag).
    #[arg(value_name = "DURATION", long, env = "BEEMESH_AUTHENTICATION_TOKEN_WEBHOOK_CACHE_TTL", default_value = "2m", value_parser = parse_duration_secs)]
    pub authentication_token_webhook_cache_ttl: u64,
    /// How long the kubelet API caches an allowing SubjectAccessReview.
    #[arg(value_name = "DURATION", long, env = "BEEMESH_AUTHORIZATION_WEBHOOK_CACHE_AUTHORIZED_TTL", default_value = "5m", value_parser = parse_duration_secs)]
    pub authorization_webhook_cache_authorized_ttl: u64,
    /// How long the kubelet API caches a denying SubjectAccessReview.
    #[arg(value_name = "DURATION", long, env = "BEEMESH_AUTHORIZATION_WEBHOOK_CACHE_UNAUTHORIZED_TTL", default_value = "30s", value_parser = parse_duration_secs)]
    pub authorization_webhook_cache_unauthorized_ttl: u64,
    /// The kubelet API's serving certificate (PEM); with --tls-private-key-file.
    /// Default: a certificate generated for the node's name and addresses, kept in the
    /// state directory.
    #[arg(
        value_name = "FILE",
        long,
        env = "BEEMESH_TLS_CERT_FILE",
        requires = "tls_private_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// The key of --tls-cert-file (PEM).
    #[arg(
        value_name = "FILE",
        long,
        env = "BEEMESH_TLS_PRIVATE_KEY_FILE",
        requires = "tls_cert_file"
    )]
    pub tls_private_key_file: Option<PathBuf>,
    /// CA bundle (PEM) whose client certificates may use the kubelet API. Without it
    /// (and without a cluster to check tokens), every request is refused.
    #[arg(value_name = "FILE", long, env = "BEEMESH_CLIENT_CA_FILE")]
    pub client_ca_file: Option<PathBuf>,
    /// Serve plain-HTTP /healthz (liveness) and /readyz (readiness) on this address for
    /// probes, like the kubelet's healthz port (e.g. 0.0.0.0:10248). They tell only
    /// whether the node works, so they need no credentials.
    #[arg(value_name = "ADDR", long, env = "BEEMESH_HEALTHZ_ADDR")]
    pub healthz_addr: Option<SocketAddr>,
    /// Delete the Node object on exit instead of leaving it NotReady.
    #[arg(long, env = "BEEMESH_DELETE_NODE_ON_EXIT")]
    pub delete_node_on_exit: bool,
    /// Peer ID of an agent this node's pods may go to (repeatable), besides the agents
    /// enrolled with join tokens. Pods carry their configMaps and secrets to their agent.
    #[arg(
        value_name = "PEER_ID",
        long = "trust-agent",
        env = "BEEMESH_TRUST_AGENTS",
        value_delimiter = ','
    )]
    pub trust_agents: Vec<PeerId>,
    /// Peer ID of a client that may ask `beemesh status` (repeatable), besides the
    /// key the node keeps in <state-dir>/client.key.
    #[arg(
        value_name = "PEER_ID",
        long = "trust-client",
        env = "BEEMESH_TRUST_CLIENT",
        value_delimiter = ','
    )]
    pub trust_clients: Vec<PeerId>,
    /// How the node ranks the agents that can take a pod.
    #[arg(long, env = "BEEMESH_SCORE_MODE", value_enum, default_value = "spread")]
    pub score_mode: ScoreMode,
    /// Keep join tokens and enrolled agents in this Secret ([NAMESPACE/]NAME; the
    /// namespace defaults to the client's) instead of <state-dir>/trust/node.json, so
    /// that they outlive the node's pod. Its key join-token, if set, is the first token.
    #[arg(value_name = "[NAMESPACE/]NAME", long, env = "BEEMESH_TRUST_SECRET", value_parser = parse_secret_ref)]
    pub trust_secret: Option<SecretRef>,
    /// Milliseconds an offer collects bids (offers go out only when agents declined a pod
    /// or have not been heard from lately; pods are otherwise placed at once).
    #[arg(value_name = "MS", long, env = "BEEMESH_OFFER_WINDOW_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub offer_window_ms: u64,
    /// Seconds without a heartbeat after which an agent is lost and its pods move
    /// (default: 3 heartbeats of 2 s).
    #[arg(value_name = "N", long, env = "BEEMESH_AGENT_LOSS_SECONDS", default_value_t = 6, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub agent_loss_seconds: u64,
    /// Seconds a strict pod's copy runs without the node renewing its placement (agents
    /// renew every third of it); a copy cut off longer stops (see `beemesh.io/fencing`).
    #[arg(value_name = "N", long, env = "BEEMESH_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub lease_seconds: u64,
    /// Seconds beyond a lease the node waits before placing a strict pod again: room
    /// for the agent's clock to run slower than the node's and for the stop to act.
    #[arg(value_name = "N", long, env = "BEEMESH_FENCING_MARGIN_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub fencing_margin_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Multiaddr of a mesh peer to ask (a node shows its pods' reasons too).
    #[arg(
        value_name = "MULTIADDR",
        long,
        env = "BEEMESH_BOOTSTRAP",
        value_delimiter = ',',
        required = true
    )]
    pub bootstrap: Vec<Multiaddr>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// Seconds to wait for an answer.
    #[arg(value_name = "N", long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub timeout_seconds: u64,
    /// Keep asking (every 2 s) and print the view again whenever it changes, until
    /// interrupted.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// The key to ask with: the node answers only its own client key
    /// (<node state dir>/client.key) and the peers it lists with --trust-client.
    #[arg(value_name = "FILE", long, env = "BEEMESH_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// The private mesh's pre-shared key file, if it has one.
    #[arg(value_name = "FILE", long, env = "BEEMESH_MESH_PSK_FILE")]
    pub mesh_psk_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The node's state directory, which holds its tokens and enrolled agents
    /// (trust/node.json).
    #[arg(value_name = "DIR", long, env = "BEEMESH_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// The Secret of a node in a cluster ([NAMESPACE/]NAME, as `beemesh node
    /// --trust-secret`); wins over --state-dir.
    #[arg(value_name = "[NAMESPACE/]NAME", long, env = "BEEMESH_TRUST_SECRET", global = true, value_parser = parse_secret_ref)]
    pub trust_secret: Option<SecretRef>,
    /// Kubeconfig for --trust-secret (default: in-cluster config in a pod, else
    /// KUBECONFIG, else ~/.kube/config).
    #[arg(value_name = "FILE", long, env = "BEEMESH_KUBECONFIG", global = true)]
    pub kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token and print it (the only time its secret is shown).
    Create {
        /// How long it may be used: seconds, or with a unit (30m, 24h, 7d); 0 never
        /// expires.
        #[arg(value_name = "DURATION", long, default_value = "24h", value_parser = parse_duration_secs)]
        ttl: u64,
        /// How many agents may join with it. Default: any number.
        #[arg(value_name = "N", long, value_parser = clap::value_parser!(u32).range(1..))]
        uses: Option<u32>,
    },
    /// List the tokens (without secrets) and the agents that joined with each.
    List,
    /// Revoke a token (by its id, the part before the dot) and every agent that joined
    /// with it, or one agent (by peer ID). The running node drops them within seconds
    /// and moves their pods.
    Revoke {
        /// A token id or an agent's peer ID.
        what: String,
    },
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not a k=v label"))?;
    // One grammar for labels and selectors: a label is valid when `k=v` parses as
    // a selector requirement.
    crate::placement::parse_selector(text).map_err(|e| e.to_string())?;
    Ok((key.trim().to_string(), value.trim().to_string()))
}

/// A Secret named `[NAMESPACE/]NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub namespace: Option<String>,
    pub name: String,
}

fn parse_secret_ref(text: &str) -> Result<SecretRef, String> {
    let (namespace, name) = match text.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, text),
    };
    let valid = |s: &str, what: &str| {
        if translate::is_dns_subdomain(s) {
            Ok(s.to_string())
        } else {
            Err(format!(
                "{s:?} is not a valid {what} (a lowercase RFC 1123 subdomain)"
            ))
        }
    };
    Ok(SecretRef {
        namespace: namespace.map(|ns| valid(ns, "namespace")).transpose()?,
        name: valid(name, "Secret name")?,
    })
}

fn parse_join_token(text: &str) -> Result<JoinToken, String> {
    text.parse()
        .map_err(|e: crate::trust::join::JoinError| e.to_string())
}

/// Seconds, or a number with one of the units s, m, h, d.
fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{text:?}: use seconds or a unit of s, m, h or d")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{text:?} is not a duration like 3600, 30m, 24h or 7d"))
}

fn parse_cpu(text: &str) -> Result<u64, String> {
    translate::parse_cpu_millis(&Quantity(text.to_string()))
}

fn parse_dns_server(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{text:?} is not an IP address or IP:PORT"))
}

fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let (first, last) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not a range of ports (FIRST-LAST)"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(format!("the range {first}-{last} is empty"));
    }
    Ok(first..=last)
}

fn parse_memory(text: &str) -> Result<u64, String> {
    translate::parse_memory_bytes(&Quantity(text.to_string()))
}

/// Labels as a map; a repeated key keeps the last value.
pub fn labels_map(labels: &[(String, String)]) -> BTreeMap<String, String> {
    labels.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_are_first_to_last_and_never_empty() {
        assert_eq!(parse_port_range("20000-20009"), Ok(20000..=20009));
        assert_eq!(parse_port_range("80-80"), Ok(80..=80));
        assert_eq!(
            parse_port_range("20009-20000"),
            Err("the range 20009-20000 is empty".into())
        );
        assert_eq!(
            parse_port_range("0-10"),
            Err("\"0\" is not a port (1-65535)".into())
        );
        assert_eq!(
            parse_port_range("20000"),
            Err("\"20000\" is not a range of ports (FIRST-LAST)".into())
        );
        assert!(parse_port_range("1-70000").is_err());
    }
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn labels_must_be_key_value() {
        assert_eq!(parse_label("zone=a"), Ok(("zone".into(), "a".into())));
        assert!(parse_label("zone").is_err());
        assert!(parse_label("zo ne=a").is_err());
        assert!(parse_label("zone=a b").is_err());
    }

    #[test]
    fn bad_flags_are_refused_with_a_message() {
        let agent = |extra: &[&'static str]| {
            let mut args = vec![
                "beemesh",
                "agent",
                "--state-dir",
                "/tmp/x",
                "--listen",
                "/ip4/127.0.0.1/tcp/1",
            ];
            args.extend_from_slice(extra);
            args
        };
        for args in [
            agent(&["--listen", "not-a-multiaddr"]),
            agent(&["--trust", "nope"]),
            agent(&["--cpu", "lots"]),
            agent(&["--memory", "-1"]),
            agent(&["--max-pods", "0"]),
            agent(&["--label", "no-equals"]),
            agent(&["--join", "not-a-token"]),
            agent(&["--score-mode", "binpack"]),
            vec!["beemesh", "token", "create", "--ttl", "forever"],
            vec!["beemesh", "token", "create", "--uses", "0"],
            vec!["beemesh", "token", "--trust-secret", "a/b/c", "list"],
            vec!["beemesh", "token", "--trust-secret", "Bad_Name", "list"],
            vec![
                "beemesh",
                "node",
                "--state-dir",
                "/tmp/x",
                "--listen",
                "/ip4/127.0.0.1/tcp/1",
                "--kubelet-port",
                "0",
            ],
            vec!["beemesh", "status"],
        ] {
            assert!(
                Cli::try_parse_from(&args).is_err(),
                "{args:?} should be refused"
            );
        }
        let ok = Cli::try_parse_from([
            "beemesh",
            "agent",
            "--state-dir",
            "/tmp/x",
            "--listen",
            "/ip4/127.0.0.1/tcp/1",
            "--cpu",
            "1500m",
            "--memory",
            "2Gi",
            "--label",
            "zone=a",
        ])
        .expect("parses");
        let Command::Agent(agent) = ok.command else {
            panic!("agent expected");
        };
        assert_eq!(agent.cpu, Some(1500));
        assert_eq!(agent.memory, Some(2 << 30));
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("30m"), Ok(1800));
        assert_eq!(parse_duration_secs("24h"), Ok(86400));
        assert_eq!(parse_duration_secs("7d"), Ok(604_800));
        assert_eq!(parse_duration_secs("0"), Ok(0));
        for bad in ["", "h", "1w", "-1h", "99999999999999999999d"] {
            assert!(parse_duration_secs(bad).is_err(), "{bad}");
        }
    }
}
