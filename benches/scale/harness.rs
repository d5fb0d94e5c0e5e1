//! The scale harness (issue 13): one real owner (the library's `Node` with its `Owner`,
//! mesh and node loop, fed pods as an API source feeds them) and many simulated agents,
//! each a real libp2p swarm (`beemesh::mesh`, TCP on loopback) with a small task in
//! place of `beemesh agent`: it bids for every offer it fits, takes every assignment
//! it fits (the owner places most pods without an offer), "runs" what it is assigned
//! at once (Ack, then one status report: Running), and heartbeats its capacity and pods
//! every 2 s. Podman is not involved; its pod start is measured by
//! hack/bench-pod-start.sh.
//!
//! Roles, each run as a child process of the bench binary (`main.rs`) or, for the smoke
//! test (`tests/scale_smoke.rs`), as tasks of one process; they talk JSON lines:
//!
//! - `owner`: the owner; feeds pods at the rates it is told and reports when each was
//!   handed over and when its assignment was acknowledged.
//! - `agents`: a range of simulated agents; counts the gossip they send and receive.
//! - `track`: an owner without a mesh to speak of, driven directly: it is handed N pods,
//!   adopts their placements from signed status reports, and processes heartbeats that
//!   list them: its RSS and the time of a full heartbeat round.
//! - `run` (the controller): starts the others, runs the phases, measures the owner
//!   process (RSS, CPU) and its connections' bytes (`ss`), and writes the results.

// Two targets share this file and each uses part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beemesh::mesh::{self, GossipFilter, MeshConfig, MeshEvent, MeshEvents, MeshHandle};
use beemesh::metrics::Metrics;
use beemesh::node::desired::DesiredStore;
use beemesh::node::owner::{
    AgentsSummary, DesiredPod, DesiredPods, Owner, OwnerConfig, StatusSink,
};
use beemesh::node::subnets::SubnetPool;
use beemesh::node::{standalone_pod, ApiLink, Node, NodeConfig};
use beemesh::placement::{self, AgentCapacity};
use beemesh::trust::replay::{unix_millis, Sequencer};
use beemesh::trust::statement;
use beemesh::trust::TrustedPeers;
use beemesh::wire::{
    self, AgentHealth, Epoch, GossipMessage, Heartbeat, HostedPod, Offer, PeerRef, PodRef, PodUid,
    Request, Resources, Response, SignedAssignment, StatusReport, Topic,
};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStatus, Pod, PodCondition, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// As `beemesh agent`'s default.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// How often the owner's pod source hands over the pods added since (an API watch or a
/// manifest directory coalesces changes the same way: the node takes the whole set).
const FEED_TICK: Duration = Duration::from_millis(100);
/// Agents dialled at a time: the owner accepts 256 pending connections at most.
const CONNECT_BATCH: u64 = 100;
const CONNECT_PAUSE: Duration = Duration::from_millis(100);
/// What each simulated agent offers: as a mid-size machine.
/// The mesh pod CIDR of the scale runs: a /24 for each of up to 65,536 agents.
const SCALE_MESH_POD_CIDR: Ipv4Net = Ipv4Net::new_assert(std::net::Ipv4Addr::new(10, 0, 0, 0), 8);

/// The subnet simulated agent `agent` says its pods run in (a heartbeat's usual size).
fn agent_subnet(agent: u64) -> Ipv4Net {
    let index = u32::try_from(agent % (1 << 16)).unwrap_or_default();
    Ipv4Net::new_assert(std::net::Ipv4Addr::from(0x0A00_0000 | (index << 8)), 24)
}

const AGENT_CAPACITY: Resources = Resources {
    cpu_millis: 16_000,
    memory_bytes: 64 << 30,
    pods: 110,
};
/// Lines a role writes on stdout start with this; anything else (the node's phase
/// printer) is not for the controller.
pub const LINE_PREFIX: &str = "@scale ";

pub const TYPICAL_POD: &str = include_str!("../typical-pod.yaml");

// ---------------------------------------------------------------------------------------
// Identities, pods, clocks
// ---------------------------------------------------------------------------------------

fn key(seed: u64, role: u8, index: u64) -> Keypair {
    let mut bytes = [0u8; 32];
    bytes[0] = role;
    bytes[1..9].copy_from_slice(&seed.to_le_bytes());
    bytes[9..17].copy_from_slice(&index.to_le_bytes());
    Keypair::ed25519_from_bytes(bytes).expect("32 bytes make an Ed25519 key")
}

/// Every role derives the same keys from the seed, so that owner and agents can trust
/// each other by peer ID without exchanging them.
pub fn owner_key(seed: u64) -> Keypair {
    key(seed, 1, 0)
}

pub fn agent_key(seed: u64, index: u64) -> Keypair {
    key(seed, 2, index)
}

pub fn typical_pod_template() -> Pod {
    serde_yaml::from_str(TYPICAL_POD).expect("the typical pod parses")
}

pub fn pod_uid(index: u64) -> String {
    format!("00000000-0000-4000-8000-{index:012x}")
}

fn pod_index(uid: &PodUid) -> Option<usize> {
    let hex = uid.0.strip_prefix("00000000-0000-4000-8000-")?;
    usize::from_str_radix(hex, 16).ok()
}

/// The `index`th copy of the typical pod.
pub fn typical_pod(template: &Pod, index: u64) -> Pod {
    let mut pod = template.clone();
    pod.metadata.name = Some(format!("web-7d9c8b6f5-{index:06}"));
    pod.metadata.uid = Some(pod_uid(index));
    pod
}

/// Wall-clock microseconds: comparable between the roles' processes.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn running_status() -> PodStatus {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let condition = |type_: &str| PodCondition {
        type_: type_.into(),
        status: "True".into(),
        last_transition_time: Some(now.clone()),
        ..Default::default()
    };
    PodStatus {
        phase: Some("Running".into()),
        conditions: Some(vec![
            condition("Initialized"),
            condition("Ready"),
            condition("ContainersReady"),
            condition("PodScheduled"),
        ]),
        container_statuses: Some(vec![ContainerStatus {
            name: "web".into(),
            image: "registry.example.com/shop/web:1.4.2".into(),
            image_id: "sha256:5d41402abc4b2a76b9719d911017c592".into(),
            container_id: Some("podman://3b18e512dba79e4c8300dd08aeb37f8e".into()),
            ready: true,
            started: Some(true),
            restart_count: 0,
            state: Some(ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(now.clone()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        host_ip: Some("10.0.0.1".into()),
        pod_ip: Some("10.88.0.7".into()),
        start_time: Some(now),
        ..Default::default()
    }
}

/// The owner's RSS over its desired set's, about: the owner shares the set's pods and
/// adds its own state per pod (statuses, offers, indexes).
const OWNER_TO_DESIRED: f64 = 1.5;

/// Memory the kernel could give without swapping, in GiB (Linux).
pub fn mem_available_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0.0, |kib| kib as f64 / (1024.0 * 1024.0))
}

/// This process's resident memory and its peak, in KiB (Linux).
pub fn rss_kib(pid: Option<u32>) -> (u64, u64) {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".into(),
    };
    let status = std::fs::read_to_string(path).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Pins this thread and the threads it starts later to one CPU (Linux): called before a
/// role starts its runtime, it pins the role's process.
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for any cpu
    // below its size, and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// CPU seconds (user + system) a process has used so far (Linux).
pub fn cpu_secs(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".into(),
    };
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

// ---------------------------------------------------------------------------------------
// Links between the controller and the roles
// ---------------------------------------------------------------------------------------

/// The controller's end of a role: JSON messages each way, and the role's process when it
/// runs in one.
pub struct Link {
    name: String,
    tx: mpsc::UnboundedSender<Value>,
    rx: mpsc::UnboundedReceiver<Value>,
    child: Option<tokio::process::Child>,
}

impl Link {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    pub fn send(&self, message: Value) {
        let _ = self.tx.send(message);
    }

    /// The next message that has `key`; others (progress) are passed to `other`.
    pub async fn recv_with(
        &mut self,
        key: &str,
        timeout: Duration,
        mut other: impl FnMut(&Value),
    ) -> Result<Value, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return Err(format!("{}: no {key:?} within {timeout:?}", self.name)),
                Ok(None) => return Err(format!("{}: ended before sending {key:?}", self.name)),
                Ok(Some(message)) if message.get(key).is_some() => return Ok(message),
                Ok(Some(message)) => other(&message),
            }
        }
    }

    pub async fn recv(&mut self, key: &str, timeout: Duration) -> Result<Value, String> {
        self.recv_with(key, timeout, |_| {}).await
    }

    /// Asks the role to stop and waits for its process, if any.
    pub async fn quit(mut self) {
        self.send(json!({"cmd": "quit"}));
        if let Some(mut child) = self.child.take() {
            if tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// Runs a role as a task of this process.
pub fn in_process<F, Fut>(name: &str, role: F) -> Link
where
    F: FnOnce(mpsc::UnboundedReceiver<Value>, mpsc::UnboundedSender<Value>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    tokio::spawn(role(cmd_rx, out_tx));
    Link {
        name: name.into(),
        tx: cmd_tx,
        rx: out_rx,
        child: None,
    }
}

/// Runs a role as a child process of this executable (`<exe> <args>`), its stderr going
/// to `log`.
pub fn child_process(name: &str, args: &[String], log: &Path) -> std::io::Result<Link> {
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<Value>();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = cmd_rx.recv().await {
            let line = format!("{message}\n");
            if stdin.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(json) = line.strip_prefix(LINE_PREFIX) {
                match serde_json::from_str(json) {
                    Ok(message) => {
                        if out_tx.send(message).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("unreadable line from a role: {e}"),
                }
            }
        }
    });
    Ok(Link {
        name: name.into(),
        tx: cmd_tx,
        rx: out_rx,
        child: Some(child),
    })
}

/// The role's side when it is a child process: commands from stdin, messages to stdout
/// (whole lines under stdout's lock, so that they never mix with the node's printer).
pub async fn serve_stdio<F, Fut>(role: F)
where
    F: FnOnce(mpsc::UnboundedReceiver<Value>, mpsc::UnboundedSender<Value>) -> Fut,
    Fut: Future<Output = ()>,
{
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(message) = serde_json::from_str::<Value>(&line) {
                let _ = cmd_tx.send(message);
            }
        }
        // The controller is gone: so is the role.
        let _ = cmd_tx.send(json!({"cmd": "quit"}));
    });
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        while let Some(message) = out_rx.blocking_recv() {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{LINE_PREFIX}{message}");
            let _ = out.flush();
        }
    });
    role(cmd_rx, out_tx).await;
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
}

// ---------------------------------------------------------------------------------------
// The owner role
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct OwnerOptions {
    pub agents: u64,
    pub seed: u64,
    pub listen: Multiaddr,
    /// The node's default (100 ms) unless set: the smoke test's debug build needs longer.
    pub offer_window: Option<Duration>,
}

/// Notes when the owner reports each pod placed (its assignment acknowledged).
struct RecordingSink {
    assigned: Arc<Mutex<HashMap<String, u64>>>,
}

impl StatusSink for RecordingSink {
    fn status_changed(
        &mut self,
        pod: &PodRef,
        _spec: Option<&PodSpec>,
        _status: &PodStatus,
        agent: Option<PeerId>,
    ) {
        if agent.is_some() {
            let mut assigned = self.assigned.lock().expect("not poisoned");
            assigned.entry(pod.uid.0.clone()).or_insert_with(now_us);
        }
    }

    fn removed(&mut self, _pod: &PodRef) {}
}

/// The owner's dropped-message counters, from its metrics.
fn dropped_counts(metrics: &Metrics) -> Value {
    let mut out = serde_json::Map::new();
    for line in metrics.render().lines() {
        if let Some(rest) = line.strip_prefix("beemesh_mesh_messages_dropped_total{") {
            if let Some((labels, n)) = rest.split_once("} ") {
                out.insert(labels.replace('"', ""), json!(n.trim().parse::<f64>().ok()));
            }
        }
    }
    Value::Object(out)
}

/// A real node (mesh, node loop, owner) trusting the seed's agents, fed pods through an
/// API link. Commands: `phase` {rate, secs, drain_secs}; `quit`.
pub async fn owner_role(
    opts: OwnerOptions,
    mut cmds: mpsc::UnboundedReceiver<Value>,
    out: mpsc::UnboundedSender<Value>,
) {
    let cancel = CancellationToken::new();
    let keypair = owner_key(opts.seed);
    let agents =
        TrustedPeers::new((0..opts.agents).map(|i| agent_key(opts.seed, i).public().to_peer_id()));
    let metrics = Metrics::new();
    // As `beemesh node` joins the mesh (commands.rs), with its defaults.
    let gossip = {
        let agents = agents.clone();
        GossipFilter::new([Topic::Heartbeats], move |peer| agents.trusts(peer))
    };
    let config = MeshConfig {
        listen: vec![opts.listen.clone()],
        subscribe: vec![Topic::Heartbeats],
        accept_gossip: gossip,
        ..MeshConfig::default()
    };
    let (mesh, events, event_loop) =
        mesh::start(keypair.clone(), config, metrics.clone()).expect("the owner's mesh starts");
    tokio::spawn(event_loop.run(cancel.clone()));

    let pods = Arc::new(DesiredStore::default());
    // The source's first (empty) listing, at once: the node then waits its adoption
    // window from now, not from the first pods.
    pods.set_listed();
    let (agents_tx, mut agents_rx) = watch::channel(AgentsSummary::default());
    let assigned = Arc::new(Mutex::new(HashMap::new()));
    let node = Node::new(
        NodeConfig {
            pod_manifest_path: None,
            owner: OwnerConfig {
                agents: agents.clone(),
                offer_window: opts
                    .offer_window
                    .unwrap_or(OwnerConfig::default().offer_window),
                // Room for 65,536 agents (the default CIDR holds 4,096).
                pod_subnets: SubnetPool::new(SCALE_MESH_POD_CIDR, 24).expect("a valid pool"),
                ..OwnerConfig::default()
            },
            enrollment: None,
            cluster_dns: None,
            mesh_service_cidr: beemesh::node::mesh_services::DEFAULT_CIDR,
        },
        keypair,
        mesh.clone(),
        metrics.clone(),
    );
    let link = ApiLink {
        pods: pods.clone(),
        sink: Box::new(RecordingSink {
            assigned: assigned.clone(),
        }),
        agents: agents_tx,
        network: None,
    };
    tokio::spawn(node.run(events, Some(link), None, cancel.clone()));

    let addr = loop {
        if let Some(addr) = mesh
            .listen_addrs()
            .await
            .ok()
            .and_then(|a| a.first().cloned())
        {
            break addr;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = out.send(json!({"addr": addr.to_string()}));
    {
        let out = out.clone();
        tokio::spawn(async move {
            let mut last = usize::MAX;
            while agents_rx.changed().await.is_ok() {
                let live = agents_rx.borrow_and_update().live;
                if live != last {
                    last = live;
                    if out.send(json!({"live": live})).is_err() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    let template = typical_pod_template();
    let mut next: u64 = 0;
    while let Some(cmd) = cmds.recv().await {
        match cmd["cmd"].as_str() {
            Some("phase") => {
                let rate = cmd["rate"].as_f64().unwrap_or(1.0);
                let secs = cmd["secs"].as_f64().unwrap_or(10.0);
                let drain = Duration::from_secs_f64(cmd["drain_secs"].as_f64().unwrap_or(30.0));
                let total = (rate * secs).round() as u64;
                let first = next;
                let mut given = Vec::with_capacity(total as usize);
                let start = Instant::now();
                let mut tick = tokio::time::interval(FEED_TICK);
                while next < first + total {
                    tick.tick().await;
                    let due =
                        (first + (rate * start.elapsed().as_secs_f64()) as u64).min(first + total);
                    if due <= next {
                        continue;
                    }
                    let batch: Vec<(String, Arc<DesiredPod>)> = (next..due)
                        .map(|i| (pod_uid(i), standalone_pod(typical_pod(&template, i))))
                        .collect();
                    let at = now_us();
                    given.extend(std::iter::repeat_n(at, batch.len()));
                    for (uid, pod) in batch {
                        pods.set(uid, Some(pod));
                    }
                    next = due;
                }
                let fed_secs = start.elapsed().as_secs_f64();
                // Until every pod of the phase is placed, or the drain time is out.
                let drain_until = Instant::now() + drain;
                let times = loop {
                    let times: Vec<u64> = {
                        let assigned = assigned.lock().expect("not poisoned");
                        (first..next)
                            .map(|i| assigned.get(&pod_uid(i)).copied().unwrap_or(0))
                            .collect()
                    };
                    if times.iter().all(|&t| t > 0) || Instant::now() >= drain_until {
                        break times;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                let _ = out.send(json!({
                    "phase": {
                        "rate": rate,
                        "first": first,
                        "fed_secs": fed_secs,
                        "given_us": given,
                        "assigned_us": times,
                        "dropped": dropped_counts(&metrics),
                    }
                }));
            }
            Some("quit") | None => break,
            Some(other) => eprintln!("owner: unknown command {other}"),
        }
    }
    cancel.cancel();
}

// ---------------------------------------------------------------------------------------
// The agents role
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct AgentsOptions {
    pub seed: u64,
    pub first: u64,
    pub count: u64,
    /// The owner's address; with a `/p2p/` peer ID, that peer is the owner (a real
    /// `beemesh node`), else the harness's owner of `seed`.
    pub owner: Multiaddr,
    /// Pod indexes that may be offered (sizes the per-pod tables).
    pub max_pods: usize,
}

impl AgentsOptions {
    fn owner_peer(&self) -> PeerId {
        self.owner
            .iter()
            .find_map(|protocol| match protocol {
                libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
                _ => None,
            })
            .unwrap_or_else(|| owner_key(self.seed).public().to_peer_id())
    }
}

/// Counters summed over this role's agents.
#[derive(Default)]
struct Counters {
    heartbeats: AtomicU64,
    heartbeat_bytes: AtomicU64,
    offers: AtomicU64,
    offer_bytes: AtomicU64,
    bids: AtomicU64,
    bids_acked: AtomicU64,
    bids_declined: AtomicU64,
    bids_failed: AtomicU64,
    assigns: AtomicU64,
    /// Assignments of a pod at the epoch this agent already runs it at: its owner's
    /// update of the pod (new labels, annotations or volume data), not a placement.
    refreshes: AtomicU64,
    assigns_declined: AtomicU64,
    reports: AtomicU64,
    reports_failed: AtomicU64,
    releases: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "heartbeats": get(&self.heartbeats),
            "heartbeat_bytes": get(&self.heartbeat_bytes),
            "offers": get(&self.offers),
            "offer_bytes": get(&self.offer_bytes),
            "bids": get(&self.bids),
            "bids_acked": get(&self.bids_acked),
            "bids_declined": get(&self.bids_declined),
            "bids_failed": get(&self.bids_failed),
            "assigns": get(&self.assigns),
            "refreshes": get(&self.refreshes),
            "assigns_declined": get(&self.assigns_declined),
            "reports": get(&self.reports),
            "reports_failed": get(&self.reports_failed),
            "releases": get(&self.releases),
        })
    }
}

struct Shared {
    counters: Counters,
    /// Per pod index: when an agent here first received its offer (µs; MAX: never).
    first_offer: Vec<AtomicU64>,
    /// Per pod index: the size of its offer's gossip payload, once known.
    offer_size: Vec<AtomicU32>,
    connected: AtomicUsize,
    /// Per pod (namespace/name): when an agent here first "ran" it (Unix ms).
    ran: Mutex<HashMap<String, u64>>,
}

struct SimPod {
    pod: PodRef,
    epoch: Epoch,
    requests: Resources,
    statement: SignedAssignment,
}

/// What stands in for `beemesh agent`.
struct SimAgent {
    index: u64,
    mesh: MeshHandle,
    owner: PeerId,
    labels: BTreeMap<String, String>,
    pods: HashMap<PodUid, SimPod>,
    used: Resources,
    bids: HashMap<PodUid, (Epoch, Resources)>,
    sequencer: Arc<Sequencer>,
    shared: Arc<Shared>,
    started: Instant,
    running: PodStatus,
}

impl SimAgent {
    async fn run(mut self, mut events: MeshEvents, cancel: CancellationToken) {
        // Heartbeats of all agents spread over the interval, as independent machines'.
        let phase = HEARTBEAT_INTERVAL.mul_f64((self.index % 1000) as f64 / 1000.0);
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + phase, HEARTBEAT_INTERVAL);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                event = events.recv() => match event {
                    None => break,
                    Some(MeshEvent::PeerConnected(peer)) if peer == self.owner => {
                        self.shared.connected.fetch_add(1, Ordering::Relaxed);
                        // As the agent: the owner hears of it soon after connecting.
                        heartbeat.reset_after(Duration::from_millis(500));
                    }
                    Some(MeshEvent::PeerDisconnected(peer)) if peer == self.owner => {
                        self.shared.connected.fetch_sub(1, Ordering::Relaxed);
                    }
                    Some(event) => self.on_event(event),
                },
                _ = heartbeat.tick() => self.heartbeat().await,
            }
        }
    }

    fn capacity(&self) -> AgentCapacity {
        AgentCapacity {
            labels: Arc::new(self.labels.clone()),
            capacity: AGENT_CAPACITY,
            free: AGENT_CAPACITY.saturating_sub(self.used),
            used_host_ports: Default::default(),
            health: AgentHealth::default(),
        }
    }

    fn on_event(&mut self, event: MeshEvent) {
        match event {
            MeshEvent::Gossip {
                source,
                message: GossipMessage::Offer(offer),
            } if source == self.owner => self.on_offer(offer),
            MeshEvent::Request {
                peer,
                request,
                reply,
            } => {
                let response = self.on_request(peer, request);
                let _ = reply.send(response);
            }
            _ => {}
        }
    }

    fn on_offer(&mut self, offer: Offer) {
        let shared = &self.shared;
        shared.counters.offers.fetch_add(1, Ordering::Relaxed);
        if let Some(index) = pod_index(&offer.pod.uid).filter(|&i| i < shared.first_offer.len()) {
            shared.first_offer[index].fetch_min(now_us(), Ordering::Relaxed);
            let mut size = shared.offer_size[index].load(Ordering::Relaxed);
            if size == 0 {
                let message = GossipMessage::Offer(offer.clone());
                size = wire::encode(&message, wire::MAX_GOSSIP_BYTES).map_or(0, |b| b.len() as u32);
                shared.offer_size[index].store(size, Ordering::Relaxed);
            }
            shared
                .counters
                .offer_bytes
                .fetch_add(size.into(), Ordering::Relaxed);
        }
        if self
            .pods
            .get(&offer.pod.uid)
            .is_some_and(|p| p.epoch >= offer.epoch)
        {
            return;
        }
        if !placement::misfits(&offer, &self.capacity()).is_empty() {
            return;
        }
        self.bids
            .insert(offer.pod.uid.clone(), (offer.epoch, offer.requests));
        let bid = Request::Bid(wire::Bid {
            pod: offer.pod.uid.clone(),
            epoch: offer.epoch,
        });
        let (mesh, owner, shared) = (self.mesh.clone(), self.owner, self.shared.clone());
        shared.counters.bids.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let counter = match mesh.request(owner, bid).await {
                Ok(Response::Ack) => &shared.counters.bids_acked,
                Ok(_) => &shared.counters.bids_declined,
                Err(_) => &shared.counters.bids_failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        });
    }

    fn on_request(&mut self, peer: PeerId, request: Request) -> Response {
        if peer != self.owner {
            return Response::Declined {
                reason: "not this agent's owner".into(),
            };
        }
        match request {
            Request::Assign(assign) => {
                let uid = PodUid(assign.pod.metadata.uid.clone().unwrap_or_default());
                // As `beemesh agent`: whatever fits is taken, bid for or not.
                self.bids.remove(&uid);
                if let Some(hosted) = self.pods.get_mut(&uid).filter(|p| p.epoch == assign.epoch) {
                    hosted.statement = assign.statement.clone();
                    self.shared
                        .counters
                        .refreshes
                        .fetch_add(1, Ordering::Relaxed);
                    return Response::Ack;
                }
                let Ok(requests) = beemesh::runtime::translate::pod_requests(&assign.pod) else {
                    return Response::Declined {
                        reason: "invalid requests".into(),
                    };
                };
                let free = AGENT_CAPACITY.saturating_sub(self.used);
                if requests.cpu_millis > free.cpu_millis
                    || requests.memory_bytes > free.memory_bytes
                    || free.pods == 0
                {
                    self.shared
                        .counters
                        .assigns_declined
                        .fetch_add(1, Ordering::Relaxed);
                    return Response::Declined {
                        reason: "does not fit".into(),
                    };
                }
                let pod = PodRef {
                    uid: uid.clone(),
                    namespace: assign.pod.metadata.namespace.clone().unwrap_or_default(),
                    name: assign.pod.metadata.name.clone().unwrap_or_default(),
                };
                if let Some(old) = self.pods.remove(&uid) {
                    self.used = self.used.saturating_sub(Resources {
                        pods: 1,
                        ..old.requests
                    });
                }
                self.used = self.used.saturating_add(Resources {
                    pods: 1,
                    ..requests
                });
                self.shared.counters.assigns.fetch_add(1, Ordering::Relaxed);
                let statement = assign.statement.clone();
                self.pods.insert(
                    uid,
                    SimPod {
                        pod: pod.clone(),
                        epoch: assign.epoch,
                        requests,
                        statement: statement.clone(),
                    },
                );
                // "Runs" at once: the one report a started pod's agent sends at least.
                self.shared
                    .ran
                    .lock()
                    .expect("ran")
                    .entry(format!("{}/{}", pod.namespace, pod.name))
                    .or_insert_with(unix_millis);
                self.report(pod, assign.epoch, statement, false);
                Response::Ack
            }
            Request::Release(release) => {
                self.shared
                    .counters
                    .releases
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(hosted) = self.pods.get(&release.pod) {
                    if hosted.epoch <= release.epoch {
                        let hosted = self.pods.remove(&release.pod).expect("present");
                        self.used = self.used.saturating_sub(Resources {
                            pods: 1,
                            ..hosted.requests
                        });
                        self.report(hosted.pod, hosted.epoch, hosted.statement, true);
                    }
                }
                Response::Ack
            }
            _ => Response::Error {
                message: "simulated agent".into(),
            },
        }
    }

    fn report(&self, pod: PodRef, epoch: Epoch, assignment: SignedAssignment, removed: bool) {
        let (seq, sent_at_ms) = self.sequencer.next();
        let report = StatusReport {
            pod,
            epoch,
            status: self.running.clone(),
            removed,
            assignment,
            seq,
            sent_at_ms,
            events: Vec::new(),
        };
        let (mesh, owner, shared) = (self.mesh.clone(), self.owner, self.shared.clone());
        shared.counters.reports.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if mesh
                .request(owner, Request::Status(Box::new(report)))
                .await
                .is_err()
            {
                shared
                    .counters
                    .reports_failed
                    .fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    async fn heartbeat(&mut self) {
        let (seq, sent_at_ms) = self.sequencer.next();
        let message = GossipMessage::Heartbeat(Heartbeat {
            labels: self.labels.clone(),
            capacity: AGENT_CAPACITY,
            free: AGENT_CAPACITY.saturating_sub(self.used),
            pods: self
                .pods
                .values()
                .map(|p| HostedPod {
                    pod: p.pod.clone(),
                    owner: PeerRef(self.owner),
                    epoch: p.epoch,
                    phase: "Running".into(),
                    requests: p.requests,
                    host_ports: vec![],
                    unrecorded: false,
                })
                .collect(),
            uptime_secs: self.started.elapsed().as_secs(),
            storage_bytes: 100 << 30,
            seq,
            sent_at_ms,
            health: AgentHealth::default(),
            pod_subnets: Vec::new(),
        });
        let size = wire::encode(&message, wire::MAX_GOSSIP_BYTES).map_or(0, |b| b.len() as u64);
        if self.mesh.publish(&message).await.is_ok() {
            let counters = &self.shared.counters;
            counters.heartbeats.fetch_add(1, Ordering::Relaxed);
            counters.heartbeat_bytes.fetch_add(size, Ordering::Relaxed);
        }
    }
}

/// `count` agents, each its own swarm dialling the owner. Commands: `counters`,
/// `offers` {first, count}, `ran` (when each pod was first "run"), `quit`.
pub async fn agents_role(
    opts: AgentsOptions,
    mut cmds: mpsc::UnboundedReceiver<Value>,
    out: mpsc::UnboundedSender<Value>,
) {
    let cancel = CancellationToken::new();
    let owner = opts.owner_peer();
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        first_offer: (0..opts.max_pods)
            .map(|_| AtomicU64::new(u64::MAX))
            .collect(),
        offer_size: (0..opts.max_pods).map(|_| AtomicU32::new(0)).collect(),
        connected: AtomicUsize::new(0),
        ran: Mutex::default(),
    });
    // One registry for all: the agents' own metrics are not what is measured.
    let metrics = Metrics::new();
    let running = running_status();
    let started_at = Instant::now();
    let mut starting = (opts.first..opts.first + opts.count).peekable();
    let mut started = 0u64;
    let mut pause = tokio::time::interval(CONNECT_PAUSE);
    // Agents start in batches while commands are answered.
    loop {
        tokio::select! {
            _ = pause.tick(), if starting.peek().is_some() => {
                for index in starting.by_ref().take(CONNECT_BATCH as usize) {
                    let config = MeshConfig {
                        bootstrap: vec![opts.owner.clone()],
                        subscribe: vec![Topic::Offers],
                        accept_gossip: GossipFilter::new([Topic::Offers], move |peer| *peer == owner),
                        // Thousands of agents share this process: the limit is meant for
                        // one agent's.
                        max_memory_bytes: usize::MAX,
                        ..MeshConfig::default()
                    };
                    let (mesh, events, event_loop) =
                        mesh::start(agent_key(opts.seed, index), config, metrics.clone())
                            .expect("an agent's mesh starts");
                    tokio::spawn(event_loop.run(cancel.clone()));
                    let agent = SimAgent {
                        index,
                        mesh,
                        owner,
                        labels: BTreeMap::from([("zone".to_string(), format!("zone-{}", index % 3))]),
                        pods: HashMap::new(),
                        used: Resources::default(),
                        bids: HashMap::new(),
                        sequencer: Arc::new(Sequencer::default()),
                        shared: shared.clone(),
                        started: Instant::now(),
                        running: running.clone(),
                    };
                    tokio::spawn(agent.run(events, cancel.clone()));
                    started += 1;
                }
                if starting.peek().is_none() {
                    let _ = out.send(json!({"started": started, "secs": started_at.elapsed().as_secs_f64()}));
                }
            }
            cmd = cmds.recv() => match cmd.as_ref().and_then(|c| c["cmd"].as_str()) {
                Some("counters") => {
                    let _ = out.send(json!({
                        "counters": shared.counters.snapshot(),
                        "connected": shared.connected.load(Ordering::Relaxed),
                    }));
                }
                Some("offers") => {
                    let cmd = cmd.as_ref().expect("some");
                    let first = cmd["first"].as_u64().unwrap_or(0) as usize;
                    let count = cmd["count"].as_u64().unwrap_or(0) as usize;
                    let times: Vec<u64> = (first..first + count)
                        .map(|i| shared.first_offer.get(i).map_or(u64::MAX, |t| t.load(Ordering::Relaxed)))
                        .map(|t| if t == u64::MAX { 0 } else { t })
                        .collect();
                    let _ = out.send(json!({"offers": times}));
                }
                Some("ran") => {
                    let ran = shared.ran.lock().expect("ran").clone();
                    let _ = out.send(json!({"ran": ran}));
                }
                Some("quit") | None => break,
                Some(other) => eprintln!("agents: unknown command {other}"),
            },
        }
    }
    cancel.cancel();
}

// ---------------------------------------------------------------------------------------
// The track role: an owner holding many placements
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct TrackOptions {
    pub pods: u64,
    pub agents: u64,
    pub seed: u64,
    /// Heartbeat rounds measured (the first finds every agent new).
    pub rounds: u32,
    /// A round is cut short (and its time extrapolated) past this.
    pub round_budget: Duration,
}

/// An owner handed `pods` pods that `agents` agents already run (adopted from their
/// signed status reports, as after a node restart), then `rounds` heartbeat rounds
/// in which every agent lists its pods: memory at each step and the time each takes.
/// The owner is driven directly (no gossip): a round's time is what the node loop spends
/// on decoding and handling the heartbeats, without gossipsub's own work.
pub async fn track(opts: TrackOptions, out: mpsc::UnboundedSender<Value>) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let say = |what: &str| eprintln!("track {} pods: {what}", opts.pods);
    let (rss_start, _) = rss_kib(None);
    let keypair = owner_key(opts.seed);
    let owner_id = keypair.public().to_peer_id();
    let agent_ids: Vec<PeerId> = (0..opts.agents)
        .map(|i| agent_key(opts.seed, i).public().to_peer_id())
        .collect();
    let cancel = CancellationToken::new();
    let (mesh, _events, event_loop) =
        mesh::start(keypair.clone(), MeshConfig::default(), Metrics::new()).expect("mesh");
    tokio::spawn(event_loop.run(cancel.clone()));
    let mut owner = Owner::new(
        OwnerConfig {
            agents: TrustedPeers::new(agent_ids.clone()),
            adopt_window: Duration::ZERO,
            // Rounds are timed one after another, not every 2 s: no agent counts as
            // lost meanwhile (the scans that look for lost agents run all the same).
            agent_loss_timeout: Duration::from_secs(24 * 3600),
            ..OwnerConfig::default()
        },
        keypair.clone(),
        mesh,
        Metrics::new(),
        // The node prints every pod's phase changes: that map is the node's too.
        Box::new(PhasePrinterQuiet::default()),
    );
    let (rss_owner_empty, _) = rss_kib(None);

    say("building the desired set");
    let template = typical_pod_template();
    // A sample first: the owner ends up holding about 1.5 times the desired set, which
    // must fit in what the machine has free.
    let sample = opts.pods.min(5_000);
    let mut desired: DesiredPods = (0..sample)
        .map(|i| (pod_uid(i), standalone_pod(typical_pod(&template, i))))
        .collect();
    let per_pod_kib = rss_kib(None).0.saturating_sub(rss_owner_empty) as f64 / sample as f64;
    let needed_gib = per_pod_kib * opts.pods as f64 * OWNER_TO_DESIRED / (1024.0 * 1024.0);
    let available_gib = mem_available_gib();
    if needed_gib > available_gib * 0.8 {
        let _ = out.send(json!({
            "track": {
                "pods": opts.pods,
                "agents": opts.agents,
                "error": format!(
                    "not run: it would need about {needed_gib:.0} GiB ({:.1} KiB per pod in the \
                     desired set, the owner holding about {OWNER_TO_DESIRED} times that); \
                     {available_gib:.0} GiB are available",
                    per_pod_kib
                ),
                "desired_kib_per_pod": per_pod_kib,
                "needed_gib": needed_gib,
                "available_gib": available_gib,
            }
        }));
        cancel.cancel();
        return;
    }
    desired.extend(
        (sample..opts.pods).map(|i| (pod_uid(i), standalone_pod(typical_pod(&template, i)))),
    );
    let (rss_desired, _) = rss_kib(None);
    say("handing it to the owner");
    let started = Instant::now();
    owner.set_desired(desired);
    let set_desired_secs = started.elapsed().as_secs_f64();
    let (rss_after_set, _) = rss_kib(None);

    say("adopting placements");
    let epoch = Epoch(7);
    let requests = Resources {
        cpu_millis: 100,
        memory_bytes: 128 << 20,
        pods: 1,
    };
    let running = running_status();
    let sequencers: Vec<Sequencer> = (0..opts.agents).map(|_| Sequencer::default()).collect();
    let mut refused = 0u64;
    let mut adopt_time = Duration::ZERO;
    for i in 0..opts.pods {
        let agent = (i % opts.agents) as usize;
        let uid = PodUid(pod_uid(i));
        let assignment = statement::sign(
            &keypair,
            statement::Assignment {
                agent: agent_ids[agent],
                pod: uid.clone(),
                epoch,
                spec_digest: "0".repeat(64),
                expires_at: unix_millis() / 1000 + 3600,
            },
        );
        let (seq, sent_at_ms) = sequencers[agent].next();
        let report = StatusReport {
            pod: PodRef {
                uid,
                namespace: "default".into(),
                name: format!("web-7d9c8b6f5-{i:06}"),
            },
            epoch,
            status: running.clone(),
            removed: false,
            assignment,
            seq,
            sent_at_ms,
            events: Vec::new(),
        };
        let started = Instant::now();
        let response = owner.on_request(agent_ids[agent], Request::Status(Box::new(report)));
        adopt_time += started.elapsed();
        if response != Response::Ack {
            refused += 1;
        }
    }
    let (rss_adopted, _) = rss_kib(None);

    let per_agent = opts.pods.div_ceil(opts.agents);
    let heartbeat_of = |agent: u64, seq: (u64, u64)| {
        let pods: Vec<HostedPod> = (agent..opts.pods)
            .step_by(opts.agents as usize)
            .map(|i| HostedPod {
                pod: PodRef {
                    uid: PodUid(pod_uid(i)),
                    namespace: "default".into(),
                    name: format!("web-7d9c8b6f5-{i:06}"),
                },
                owner: PeerRef(owner_id),
                epoch,
                phase: "Running".into(),
                requests,
                host_ports: vec![],
                unrecorded: false,
            })
            .collect();
        let used = Resources {
            cpu_millis: requests.cpu_millis * pods.len() as u64,
            memory_bytes: requests.memory_bytes * pods.len() as u64,
            pods: pods.len() as u64,
        };
        GossipMessage::Heartbeat(Heartbeat {
            labels: BTreeMap::from([("zone".to_string(), format!("zone-{}", agent % 3))]),
            capacity: AGENT_CAPACITY,
            free: AGENT_CAPACITY.saturating_sub(used),
            pods,
            uptime_secs: 600,
            storage_bytes: 100 << 30,
            seq: seq.0,
            sent_at_ms: seq.1,
            health: AgentHealth::default(),
            pod_subnets: vec![agent_subnet(agent)],
        })
    };
    let mut heartbeat_bytes = 0usize;
    let mut rounds = Vec::new();
    for round in 0..opts.rounds {
        say(&format!("heartbeat round {}", round + 1));
        let mut decode = Duration::ZERO;
        let mut handle = Duration::ZERO;
        let mut done = 0u64;
        let wall = Instant::now();
        for agent in 0..opts.agents {
            let bytes = wire::encode(
                &heartbeat_of(agent, sequencers[agent as usize].next()),
                usize::MAX,
            )
            .expect("encodes");
            heartbeat_bytes = heartbeat_bytes.max(bytes.len());
            let started = Instant::now();
            let message = wire::decode_gossip(Topic::Heartbeats, &bytes);
            let decoded = started.elapsed();
            let Ok(GossipMessage::Heartbeat(heartbeat)) = message else {
                // Over the gossip size limit: no agent could send it.
                continue;
            };
            let started = Instant::now();
            owner.on_heartbeat(agent_ids[agent as usize], heartbeat);
            handle += started.elapsed();
            decode += decoded;
            done += 1;
            if wall.elapsed() > opts.round_budget {
                break;
            }
        }
        let scale = opts.agents as f64 / done.max(1) as f64;
        rounds.push(json!({
            "agents_processed": done,
            "extrapolated": done < opts.agents,
            "decode_secs": decode.as_secs_f64() * scale,
            "handle_secs": handle.as_secs_f64() * scale,
            "round_secs": (decode + handle).as_secs_f64() * scale,
        }));
    }
    let (rss_heartbeats, _) = rss_kib(None);

    say("timing the owner's tick");
    let mut ticks = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        owner.tick();
        ticks.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ticks.sort_by(f64::total_cmp);

    let (rss_end, hwm) = rss_kib(None);
    // What a connection to a Service costs the owner to find the pods behind it, for
    // the pods of its namespace it does not select (here every pod): decoding each
    // whole, as the owner did until 6 December, against reading its labels only (the
    // first connection after a pod changed) and the selection kept (the others).
    say("timing a Service's pod selection");
    let started = Instant::now();
    let decoded = (0..opts.pods)
        .filter(|&i| owner.pod(&PodUid(pod_uid(i))).is_some())
        .count();
    let every_pod_decoded_ms = started.elapsed().as_secs_f64() * 1000.0;
    let selector = BTreeMap::from([("app".to_string(), "none".to_string())]);
    let mut selection_ms = [0.0; 2];
    for ms in &mut selection_ms {
        let started = Instant::now();
        assert!(owner.selected_pods("default", &selector).is_empty());
        *ms = started.elapsed().as_secs_f64() * 1000.0;
    }
    let [labels_read_ms, kept_ms] = selection_ms;
    assert_eq!(decoded, opts.pods as usize);
    let _ = out.send(json!({
        "track": {
            "pods": opts.pods,
            "agents": opts.agents,
            "pods_per_agent": per_agent,
            "pod_struct_bytes": std::mem::size_of::<Pod>(),
            "pod_json_bytes": serde_json::to_vec(&template).map_or(0, |b| b.len()),
            "heartbeat_bytes": heartbeat_bytes,
            "heartbeat_over_gossip_limit": heartbeat_bytes > wire::MAX_GOSSIP_BYTES,
            "rss_start_mib": mib(rss_start),
            "rss_owner_empty_mib": mib(rss_owner_empty),
            "desired_set_mib": mib(rss_desired.saturating_sub(rss_owner_empty)),
            "rss_after_set_desired_mib": mib(rss_after_set),
            "set_desired_secs": set_desired_secs,
            "rss_adopted_mib": mib(rss_adopted),
            "status_reports_per_sec": opts.pods as f64 / adopt_time.as_secs_f64().max(1e-9),
            "status_reports_refused": refused,
            "rss_after_heartbeats_mib": mib(rss_heartbeats),
            "rss_end_mib": mib(rss_end),
            "rss_peak_mib": mib(hwm),
            "rounds": rounds,
            "tick_ms_median": ticks[ticks.len() / 2],
            "service_selection": {
                "every_pod_decoded_ms": every_pod_decoded_ms,
                "labels_read_ms": labels_read_ms,
                "kept_ms": kept_ms,
            },
        }
    }));
    drop(owner);
    cancel.cancel();
}

#[derive(Debug, Clone)]
pub struct PlaceOptions {
    pub agents: u64,
    pub seed: u64,
    /// Pods placed one after another, at most...
    pub pods: u64,
    /// ...and no more once this much time has gone.
    pub budget: Duration,
}

/// The owner's own work for one placement with `agents` agents, without the mesh: every
/// agent heartbeats (no pods), then for each pod the owner is handed it (`set_desired`,
/// timed apart) and places it on its tick: the search of its view, the ranking and the
/// assignment's draft (signed in a task of its own, as it is sent). The time is the
/// node loop's CPU time per pod, the least any placement costs.
pub async fn place(opts: PlaceOptions, out: mpsc::UnboundedSender<Value>) {
    let keypair = owner_key(opts.seed);
    let agent_ids: Vec<PeerId> = (0..opts.agents)
        .map(|i| agent_key(opts.seed, i).public().to_peer_id())
        .collect();
    let cancel = CancellationToken::new();
    let (mesh, _events, event_loop) =
        mesh::start(keypair.clone(), MeshConfig::default(), Metrics::new()).expect("mesh");
    tokio::spawn(event_loop.run(cancel.clone()));
    let floor = Epoch(1_000);
    let mut owner = Owner::new(
        OwnerConfig {
            agents: TrustedPeers::new(agent_ids.clone()),
            adopt_window: Duration::ZERO,
            agent_loss_timeout: Duration::from_secs(24 * 3600),
            epoch_floor: floor,
            ..OwnerConfig::default()
        },
        keypair,
        mesh,
        Metrics::new(),
        Box::new(PhasePrinterQuiet::default()),
    );
    let sequencers: Vec<Sequencer> = (0..opts.agents).map(|_| Sequencer::default()).collect();
    let started = Instant::now();
    for (agent, id) in agent_ids.iter().enumerate() {
        let (seq, sent_at_ms) = sequencers[agent].next();
        owner.on_heartbeat(
            *id,
            Heartbeat {
                labels: BTreeMap::from([("zone".to_string(), format!("zone-{}", agent % 3))]),
                capacity: AGENT_CAPACITY,
                free: AGENT_CAPACITY,
                pods: vec![],
                uptime_secs: 600,
                storage_bytes: 100 << 30,
                seq,
                sent_at_ms,
                health: AgentHealth::default(),
                pod_subnets: Vec::new(),
            },
        );
    }
    let heartbeat_round_ms = started.elapsed().as_secs_f64() * 1000.0;
    let template = typical_pod_template();
    let mut desired = BTreeMap::new();
    let (mut per_pod, mut handed) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for i in 0..opts.pods {
        if i > 0 && started.elapsed() > opts.budget {
            break;
        }
        desired.insert(pod_uid(i), standalone_pod(typical_pod(&template, i)));
        let given = desired.clone();
        let handed_started = Instant::now();
        owner.set_desired(given);
        handed.push(handed_started.elapsed().as_secs_f64() * 1000.0);
        let tick_started = Instant::now();
        owner.tick();
        per_pod.push(tick_started.elapsed().as_secs_f64() * 1000.0);
    }
    let placed = owner
        .view()
        .pods
        .iter()
        .filter(|p| p.reason.as_deref() != Some("Unschedulable"))
        .count();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile(v, 50.0)
    };
    let per_pod_ms = median(&mut per_pod);
    let _ = out.send(json!({
        "place": {
            "agents": opts.agents,
            "pods": per_pod.len(),
            "not_placed": per_pod.len().saturating_sub(placed),
            "empty_heartbeat_round_ms": heartbeat_round_ms,
            "per_pod_ms": per_pod_ms,
            "set_desired_ms": median(&mut handed),
            "max_pods_per_s": 1000.0 / per_pod_ms,
        }
    }));
    drop(owner);
    cancel.cancel();
}

/// The node's phase printer keeps what it last showed of each pod; this keeps the same
/// and prints nothing (a million lines on stdout are not what is measured).
#[derive(Default)]
struct PhasePrinterQuiet {
    shown: HashMap<PodUid, (String, Option<String>, Option<PeerId>)>,
}

impl StatusSink for PhasePrinterQuiet {
    fn status_changed(
        &mut self,
        pod: &PodRef,
        _spec: Option<&PodSpec>,
        status: &PodStatus,
        agent: Option<PeerId>,
    ) {
        let phase = status.phase.clone().unwrap_or_else(|| "Pending".into());
        let reason = status.reason.clone();
        self.shown.insert(pod.uid.clone(), (phase, reason, agent));
    }

    fn removed(&mut self, pod: &PodRef) {
        self.shown.remove(&pod.uid);
    }
}

// ---------------------------------------------------------------------------------------
// The controller
// ---------------------------------------------------------------------------------------

/// How the controller starts roles: as child processes (the benchmark) or tasks (the
/// smoke test).
pub enum Spawn {
    Processes { logs: PathBuf },
    InProcess,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub agents: u64,
    pub rates: Vec<f64>,
    pub phase_secs: f64,
    pub drain_secs: f64,
    pub idle_secs: f64,
    pub agents_per_process: u64,
    pub seed: u64,
    pub max_pods: usize,
    /// Stop raising the rate once a phase places less than this share of its rate.
    pub saturation: f64,
    /// The owner's offer window, if not the node's default.
    pub offer_window: Option<Duration>,
    /// A phase lasts long enough to offer at least this many pods.
    pub min_pods: u64,
    /// Child processes: the owner on CPU 0, the agents on CPU 1.
    pub pin: bool,
    /// How long every agent may take to be live at the owner.
    pub connect_timeout: Duration,
}

/// Totals the controller samples before and after each phase.
#[derive(Debug, Clone, Default)]
struct Sample {
    at: Option<Instant>,
    counters: HashMap<String, f64>,
    connected: f64,
    owner_cpu: f64,
    agents_cpu: f64,
    owner_rss_kib: u64,
    owner_hwm_kib: u64,
    agents_rss_kib: u64,
    /// Bytes sent and received on the owner's established TCP connections.
    wire: Option<(u64, u64)>,
}

impl Sample {
    fn counter(&self, name: &str) -> f64 {
        self.counters.get(name).copied().unwrap_or(0.0)
    }
}

/// Bytes sent (acknowledged) and received on `port`'s established connections, from
/// the kernel's TCP info (`ss`); None if `ss` is missing.
fn wire_bytes(port: u16) -> Option<(u64, u64)> {
    let output = std::process::Command::new("ss")
        .args([
            "-tinH",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let sum = |field: &str| -> u64 {
        text.split_whitespace()
            .filter_map(|w| w.strip_prefix(field))
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    };
    Some((sum("bytes_acked:"), sum("bytes_received:")))
}

fn port_of(addr: &Multiaddr) -> Option<u16> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
        _ => None,
    })
}

/// Percentile (nearest rank) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Roles {
    owner: Link,
    agents: Vec<Link>,
    port: Option<u16>,
}

impl Roles {
    async fn sample(&mut self) -> Result<Sample, String> {
        let mut sample = Sample {
            at: Some(Instant::now()),
            ..Sample::default()
        };
        for link in &mut self.agents {
            link.send(json!({"cmd": "counters"}));
            let reply = link.recv("counters", Duration::from_secs(60)).await?;
            for (name, value) in reply["counters"].as_object().into_iter().flatten() {
                *sample.counters.entry(name.clone()).or_default() += value.as_f64().unwrap_or(0.0);
            }
            sample.connected += reply["connected"].as_f64().unwrap_or(0.0);
            sample.agents_cpu += link.pid().map_or(0.0, |pid| cpu_secs(Some(pid)));
            sample.agents_rss_kib += link.pid().map_or(0, |pid| rss_kib(Some(pid)).0);
        }
        if let Some(pid) = self.owner.pid() {
            sample.owner_cpu = cpu_secs(Some(pid));
            (sample.owner_rss_kib, sample.owner_hwm_kib) = rss_kib(Some(pid));
        }
        sample.wire = self.port.and_then(wire_bytes);
        Ok(sample)
    }

    /// When an agent first received each offer of `first..first + count`.
    async fn first_offers(&mut self, first: u64, count: usize) -> Result<Vec<u64>, String> {
        let mut merged = vec![0u64; count];
        for link in &mut self.agents {
            link.send(json!({"cmd": "offers", "first": first, "count": count}));
            let reply = link.recv("offers", Duration::from_secs(60)).await?;
            for (slot, t) in merged
                .iter_mut()
                .zip(reply["offers"].as_array().into_iter().flatten())
            {
                let t = t.as_u64().unwrap_or(0);
                if t > 0 && (*slot == 0 || t < *slot) {
                    *slot = t;
                }
            }
        }
        Ok(merged)
    }
}

/// Rates between two samples, per agent and for the owner.
fn window(before: &Sample, after: &Sample, agents: u64) -> Value {
    let secs = match (before.at, after.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-9),
        _ => f64::NAN,
    };
    let per_agent_s =
        |name: &str| (after.counter(name) - before.counter(name)) / agents as f64 / secs;
    let heartbeat = per_agent_s("heartbeat_bytes");
    let offers = per_agent_s("offer_bytes");
    // Connections that closed take their counts with them: then there is no figure.
    let wire = match (before.wire, after.wire) {
        (Some(b), Some(a)) if a.0 >= b.0 && a.1 >= b.1 => {
            json!((a.0 - b.0 + a.1 - b.1) as f64 / agents as f64 / secs)
        }
        _ => Value::Null,
    };
    json!({
        "secs": secs,
        "gossip_bytes_per_agent_s": heartbeat + offers,
        "heartbeat_bytes_per_agent_s": heartbeat,
        "offer_bytes_per_agent_s": offers,
        "heartbeats_per_agent_s": per_agent_s("heartbeats"),
        "offers_per_agent_s": per_agent_s("offers"),
        "mesh_bytes_per_agent_s": wire,
        "owner_cpu_percent": (after.owner_cpu - before.owner_cpu) / secs * 100.0,
        "agents_cpu_percent": (after.agents_cpu - before.agents_cpu) / secs * 100.0,
        "owner_rss_mib": after.owner_rss_kib as f64 / 1024.0,
        "owner_peak_rss_mib": after.owner_hwm_kib as f64 / 1024.0,
        "agents_rss_mib": after.agents_rss_kib as f64 / 1024.0,
        "connected": after.connected,
    })
}

fn delta(before: &Sample, after: &Sample, name: &str) -> f64 {
    after.counter(name) - before.counter(name)
}

/// Starts the owner and the agents, waits for every agent to be live at the owner, then
/// measures an idle window and one phase per rate (stopping after the first that
/// saturates). Progress goes to stderr.
pub async fn measure_agents(opts: &RunOptions, spawn: &Spawn) -> Result<Value, String> {
    let n = opts.agents;
    let started = Instant::now();
    let start_role = |name: &str, args: Vec<String>, role: RoleKind| -> Result<Link, String> {
        match spawn {
            Spawn::Processes { logs } => {
                child_process(name, &args, &logs.join(format!("{name}.log")))
                    .map_err(|e| e.to_string())
            }
            Spawn::InProcess => Ok(match role {
                RoleKind::Owner(o) => in_process(name, move |c, out| owner_role(o, c, out)),
                RoleKind::Agents(a) => in_process(name, move |c, out| agents_role(a, c, out)),
            }),
        }
    };
    let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr");
    let owner_opts = OwnerOptions {
        agents: n,
        seed: opts.seed,
        listen: listen.clone(),
        offer_window: opts.offer_window,
    };
    let mut owner_args = vec![
        "owner".into(),
        format!("--agents={n}"),
        format!("--seed={}", opts.seed),
    ];
    if let Some(window) = opts.offer_window {
        owner_args.push(format!("--offer-window-ms={}", window.as_millis()));
    }
    if opts.pin {
        owner_args.push("--cpu=0".into());
    }
    let mut owner = start_role(
        &format!("owner-{n}"),
        owner_args,
        RoleKind::Owner(owner_opts),
    )?;
    let addr: Multiaddr = owner.recv("addr", Duration::from_secs(60)).await?["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or("the owner gave no address")?;
    let mut agents = Vec::new();
    let per = opts.agents_per_process.max(1);
    for (k, first) in (0..n).step_by(per as usize).enumerate() {
        let count = per.min(n - first);
        let mut args = vec![
            "agents".into(),
            format!("--seed={}", opts.seed),
            format!("--first={first}"),
            format!("--count={count}"),
            format!("--owner={addr}"),
            format!("--max-pods={}", opts.max_pods),
        ];
        if opts.pin {
            args.push("--cpu=1".into());
        }
        let agent_opts = AgentsOptions {
            seed: opts.seed,
            first,
            count,
            owner: addr.clone(),
            max_pods: opts.max_pods,
        };
        agents.push(start_role(
            &format!("agents-{n}-{k}"),
            args,
            RoleKind::Agents(agent_opts),
        )?);
    }
    let mut roles = Roles {
        owner,
        agents,
        port: port_of(&addr),
    };
    // Every agent live at the owner (its heartbeats heard). If they never all are, what
    // was reached is the result.
    let deadline = Instant::now() + opts.connect_timeout;
    let (mut live, mut most) = (0u64, 0u64);
    let mut last_said = Instant::now();
    while live < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match roles.owner.recv("live", left).await {
            Ok(message) => live = message["live"].as_u64().unwrap_or(0),
            Err(_) => {
                let sample = roles.sample().await?;
                let Roles { owner, agents, .. } = roles;
                owner.quit().await;
                for link in agents {
                    link.quit().await;
                }
                return Ok(json!({
                    "agents": n,
                    "error": format!(
                        "{live} of {n} agents live at the owner after {} s (at most {most})",
                        opts.connect_timeout.as_secs()
                    ),
                    "live": live,
                    "most_live": most,
                    "connected": sample.connected,
                    "owner_rss_mib": sample.owner_rss_kib as f64 / 1024.0,
                    "owner_cpu_secs": sample.owner_cpu,
                    "agents_rss_mib": sample.agents_rss_kib as f64 / 1024.0,
                    "agents_cpu_secs": sample.agents_cpu,
                    "pinned": opts.pin,
                }));
            }
        }
        most = most.max(live);
        if last_said.elapsed() > Duration::from_secs(5) || live == n {
            last_said = Instant::now();
            eprintln!(
                "  {n} agents: {live} live after {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    // A heartbeat round or two more, so that every agent is settled.
    tokio::time::sleep(HEARTBEAT_INTERVAL * 2).await;
    let before = roles.sample().await?;
    tokio::time::sleep(Duration::from_secs_f64(opts.idle_secs)).await;
    let after = roles.sample().await?;
    let idle = window(&before, &after, n);
    eprintln!("  {n} agents idle: {idle}");

    let mut phases = Vec::new();
    for &rate in &opts.rates {
        let secs = opts.phase_secs.max(opts.min_pods as f64 / rate);
        let before = roles.sample().await?;
        roles.owner.send(json!({
            "cmd": "phase", "rate": rate, "secs": secs, "drain_secs": opts.drain_secs,
        }));
        let timeout = Duration::from_secs_f64(secs * 3.0 + opts.drain_secs + 60.0);
        let result = roles.owner.recv("phase", timeout).await?;
        let after = roles.sample().await?;
        let phase = &result["phase"];
        let first = phase["first"].as_u64().unwrap_or(0);
        let given: Vec<u64> = serde_json::from_value(phase["given_us"].clone()).unwrap_or_default();
        let assigned: Vec<u64> =
            serde_json::from_value(phase["assigned_us"].clone()).unwrap_or_default();
        let offers = roles.first_offers(first, given.len()).await?;
        let summary = summarize_phase(
            rate, opts, &given, &assigned, &offers, &before, &after, n, phase,
        );
        eprintln!("  {n} agents, {rate} pods/s: {summary}");
        let saturated = summary["saturated"].as_bool().unwrap_or(true);
        phases.push(summary);
        if saturated {
            break;
        }
    }
    let end = roles.sample().await?;
    let Roles { owner, agents, .. } = roles;
    owner.quit().await;
    for link in agents {
        link.quit().await;
    }
    Ok(json!({
        "agents": n,
        "pinned": opts.pin,
        "offer_window_ms": opts.offer_window.map(|w| w.as_millis() as u64),
        "agent_processes": n.div_ceil(per),
        "connect_secs": connect_secs,
        "idle": idle,
        "phases": phases,
        "owner_peak_rss_mib": end.owner_hwm_kib as f64 / 1024.0,
    }))
}

enum RoleKind {
    Owner(OwnerOptions),
    Agents(AgentsOptions),
}

#[allow(clippy::too_many_arguments)]
fn summarize_phase(
    rate: f64,
    opts: &RunOptions,
    given: &[u64],
    assigned: &[u64],
    offers: &[u64],
    before: &Sample,
    after: &Sample,
    agents: u64,
    phase: &Value,
) -> Value {
    let ms = |us: f64| us / 1000.0;
    let mut latencies: Vec<f64> = given
        .iter()
        .zip(assigned)
        .filter(|(_, &a)| a > 0)
        .map(|(&g, &a)| a.saturating_sub(g) as f64)
        .collect();
    latencies.sort_by(f64::total_cmp);
    // Breakdown: handed over → first offer received by an agent → assignment acknowledged.
    let mut to_offer: Vec<f64> = given
        .iter()
        .zip(offers)
        .filter(|(_, &o)| o > 0)
        .map(|(&g, &o)| o.saturating_sub(g) as f64)
        .collect();
    to_offer.sort_by(f64::total_cmp);
    let mut offer_to_assign: Vec<f64> = offers
        .iter()
        .zip(assigned)
        .filter(|(&o, &a)| o > 0 && a > 0)
        .map(|(&o, &a)| a.saturating_sub(o) as f64)
        .collect();
    offer_to_assign.sort_by(f64::total_cmp);
    // Sustained: assignments of this phase's pods made while pods were being fed, after
    // a warm-up (the first pods find an idle owner).
    let start = given.iter().copied().min().unwrap_or(0);
    let fed_secs = phase["fed_secs"].as_f64().unwrap_or(opts.phase_secs);
    let warm = (fed_secs / 4.0).min(2.0);
    let (from, to) = (start + (warm * 1e6) as u64, start + (fed_secs * 1e6) as u64);
    let in_window = assigned.iter().filter(|&&a| a >= from && a <= to).count();
    let sustained = in_window as f64 / (fed_secs - warm).max(1e-9);
    let placed = latencies.len();
    let saturated = sustained < opts.saturation * rate || placed < given.len();
    let fed = given.len() as f64;
    let mut summary = window(before, after, agents);
    let extra = json!({
        "rate": rate,
        "pods": given.len(),
        "assigned": placed,
        "unassigned": given.len() - placed,
        "p50_ms": ms(percentile(&latencies, 50.0)),
        "p90_ms": ms(percentile(&latencies, 90.0)),
        "p99_ms": ms(percentile(&latencies, 99.0)),
        "max_ms": ms(latencies.last().copied().unwrap_or(f64::NAN)),
        "to_first_offer_p50_ms": ms(percentile(&to_offer, 50.0)),
        "to_first_offer_p99_ms": ms(percentile(&to_offer, 99.0)),
        "offer_to_assigned_p50_ms": ms(percentile(&offer_to_assign, 50.0)),
        "offer_to_assigned_p99_ms": ms(percentile(&offer_to_assign, 99.0)),
        "sustained_per_s": sustained,
        "saturated": saturated,
        "bids_per_pod": delta(before, after, "bids") / fed.max(1.0),
        "bids_declined": delta(before, after, "bids_declined"),
        "bids_failed": delta(before, after, "bids_failed"),
        "assigns": delta(before, after, "assigns"),
        "reports_failed": delta(before, after, "reports_failed"),
        "owner_dropped": phase["dropped"].clone(),
    });
    if let (Value::Object(summary), Value::Object(extra)) = (&mut summary, extra) {
        summary.extend(extra);
    }
    summary
}

/// Runs the track role in a child process (or here) and returns its figures.
pub async fn measure_tracking(opts: &TrackOptions, spawn: &Spawn) -> Result<Value, String> {
    let args = vec![
        format!("--pods={}", opts.pods),
        format!("--agents={}", opts.agents),
        format!("--seed={}", opts.seed),
        format!("--rounds={}", opts.rounds),
        format!("--round-budget-secs={}", opts.round_budget.as_secs()),
    ];
    let budget = opts.round_budget * (opts.rounds + 2) + Duration::from_secs(3600);
    let here = opts.clone();
    measure_role(
        "track",
        opts.pods,
        args,
        spawn,
        budget,
        move |_cmds, out| track(here, out),
    )
    .await
}

/// Runs the place role in a child process (or here) and returns its figures.
pub async fn measure_placement(opts: &PlaceOptions, spawn: &Spawn) -> Result<Value, String> {
    let args = vec![
        format!("--agents={}", opts.agents),
        format!("--seed={}", opts.seed),
        format!("--pods={}", opts.pods),
        format!("--budget-secs={}", opts.budget.as_secs()),
    ];
    let budget = opts.budget * 4 + Duration::from_secs(600);
    let here = opts.clone();
    measure_role(
        "place",
        opts.agents,
        args,
        spawn,
        budget,
        move |_cmds, out| place(here, out),
    )
    .await
}

/// Runs a role that sends one result under its name, as `<role> ARGS` in a child
/// process (logged as `<role>-<size>.log`) or here, and returns that result.
async fn measure_role<F, Fut>(
    role: &str,
    size: u64,
    args: Vec<String>,
    spawn: &Spawn,
    budget: Duration,
    here: F,
) -> Result<Value, String>
where
    F: FnOnce(mpsc::UnboundedReceiver<Value>, mpsc::UnboundedSender<Value>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut link = match spawn {
        Spawn::Processes { logs } => {
            let args: Vec<String> = std::iter::once(role.to_string()).chain(args).collect();
            let log = logs.join(format!("{role}-{size}.log"));
            child_process(&format!("{role}-{size}"), &args, &log).map_err(|e| e.to_string())?
        }
        Spawn::InProcess => in_process(role, here),
    };
    let result = link.recv(role, budget).await?;
    link.quit().await;
    Ok(result[role].clone())
}

/// The machine, for the record.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "memory_gib": mem_kib as f64 / (1024.0 * 1024.0),
        "memory_available_gib": mem_available_gib(),
        "load_average": std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
        "kernel": kernel,
    })
}

// ---------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------

/// A rate as people write it: 0.2, 1, 20.
fn rate(value: &Value) -> String {
    match value.as_f64() {
        Some(v) if v.fract() == 0.0 => format!("{v:.0}"),
        Some(v) => format!("{v}"),
        None => "–".into(),
    }
}

fn num(value: &Value, digits: usize) -> String {
    match value.as_f64() {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "–".into(),
    }
}

/// The results as Markdown tables.
pub fn markdown(results: &Value) -> String {
    let mut out = String::new();
    let machine = &results["machine"];
    out.push_str(&format!(
        "Run of {}; {} CPUs ({}), {:.0} GiB, Linux {}; load average at the start {}.\n\n",
        results["date"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["memory_gib"].as_f64().unwrap_or(0.0),
        machine["kernel"].as_str().unwrap_or("?"),
        machine["load_average"].as_str().unwrap_or("?"),
    ));
    out.push_str(
        "| agents | offered pods/s | pods | placed | p50 ms | p99 ms | sustained placed/s | \
         bids/pod | gossip B/agent/s | all mesh B/agent/s | owner CPU % | owner RSS MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for run in results["agents"].as_array().into_iter().flatten() {
        let n = &run["agents"];
        if let Some(error) = run.get("error") {
            out.push_str(&format!(
                "| {n} | {} (owner RSS {} MiB, agents' {} MiB) |||||||||||\n",
                error.as_str().unwrap_or("failed"),
                num(&run["owner_rss_mib"], 0),
                num(&run["agents_rss_mib"], 0),
            ));
            continue;
        }
        let idle = &run["idle"];
        out.push_str(&format!(
            "| {n} | idle | 0 | – | – | – | – | – | {} | {} | {} | {} |\n",
            num(&idle["gossip_bytes_per_agent_s"], 0),
            num(&idle["mesh_bytes_per_agent_s"], 0),
            num(&idle["owner_cpu_percent"], 0),
            num(&idle["owner_rss_mib"], 0),
        ));
        for phase in run["phases"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "| {n} | {} | {} | {} | {} | {} | {}{} | {} | {} | {} | {} | {} |\n",
                rate(&phase["rate"]),
                phase["pods"],
                phase["assigned"],
                num(&phase["p50_ms"], 0),
                num(&phase["p99_ms"], 0),
                num(&phase["sustained_per_s"], 1),
                if phase["saturated"].as_bool() == Some(true) {
                    " (saturated)"
                } else {
                    ""
                },
                num(&phase["bids_per_pod"], 0),
                num(&phase["gossip_bytes_per_agent_s"], 0),
                num(&phase["mesh_bytes_per_agent_s"], 0),
                num(&phase["owner_cpu_percent"], 0),
                num(&phase["owner_rss_mib"], 0),
            ));
        }
    }
    out.push_str(
        "\n| agents | owner CPU per placement ms | handing the pod over ms | pods/s at most | \
         all agents' empty heartbeats ms |\n|---|---|---|---|---|\n",
    );
    for place in results["placement"].as_array().into_iter().flatten() {
        if let Some(error) = place.get("error") {
            out.push_str(&format!("| {} | failed: {error} ||||\n", place["agents"]));
            continue;
        }
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            place["agents"],
            num(&place["per_pod_ms"], 2),
            num(&place["set_desired_ms"], 2),
            num(&place["max_pods_per_s"], 0),
            num(&place["empty_heartbeat_round_ms"], 1),
        ));
    }
    out.push_str(
        "\n| pods tracked | agents | heartbeat bytes | owner RSS MiB | of which desired set MiB | \
         heartbeat round s (first) | heartbeat round s | of which decode s | owner tick ms | \
         status reports/s | a Service's pods found, ms: every pod decoded / labels read / kept |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for track in results["tracking"].as_array().into_iter().flatten() {
        if let Some(error) = track.get("error") {
            out.push_str(&format!(
                "| {} | {} | {} |||||||||\n",
                track["pods"],
                track["agents"],
                error.as_str().unwrap_or("failed")
            ));
            continue;
        }
        let rounds = track["rounds"].as_array().cloned().unwrap_or_default();
        let round = |i: usize, key: &str| {
            rounds.get(i).map_or("–".into(), |r| {
                let extrapolated = if r["extrapolated"].as_bool() == Some(true) {
                    " (extrapolated)"
                } else {
                    ""
                };
                format!("{}{extrapolated}", num(&r[key], 2))
            })
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} |\n",
            track["pods"],
            track["agents"],
            track["heartbeat_bytes"],
            num(&track["rss_end_mib"], 0),
            num(&track["desired_set_mib"], 0),
            round(0, "round_secs"),
            round(rounds.len().saturating_sub(1), "round_secs"),
            round(rounds.len().saturating_sub(1), "decode_secs"),
            num(&track["tick_ms_median"], 1),
            num(&track["status_reports_per_sec"], 0),
            num(&track["service_selection"]["every_pod_decoded_ms"], 0),
            num(&track["service_selection"]["labels_read_ms"], 0),
            num(&track["service_selection"]["kept_ms"], 3),
        ));
    }
    out
}
