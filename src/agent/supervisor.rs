//! One task per pod: creates its Podman pod, runs init containers in order and then the
//! app containers, restarts them with the kubelet's back-off, runs probes, and reports
//! every change of status. A stop command tears the pod down within its grace period.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Container, Lifecycle, LifecycleHandler, Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use libp2p::PeerId;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::admission::Policy;
use super::eviction;
use super::hook::{self, Hook};
use super::probe::{self, ProbeSpec, ProbeState};
use super::status::{self, ContainerView, Observed, PodView, RestartPolicy};
use super::subpath;
use super::termination;
use crate::cluster::events::{MOUNT_FAILED, SANDBOX_FAILED};
use crate::metrics::Metrics;
use crate::runtime::dns::{self, ResolvConf};
use crate::runtime::registry_auth;
use crate::runtime::translate::{self, ContainerKind, PlanContext};
use crate::runtime::{
    labels, ContainerPlan, ContainerStatus, LogOptions, PodNetwork, Runtime, RuntimeError,
    RuntimePod,
};
use crate::wire::{
    AgentEvent, AgentEventReason, Epoch, PodRef, RegistryCredential, VolumeFile, MAX_REPORT_EVENTS,
};

/// The kubelet's crash-loop back-off: 10 s doubling to 5 min, forgotten after a
/// container ran for 10 min.
const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);
/// How often a supervisor wakes for its timers (probes, back-offs, setup retries).
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often running containers are inspected without an event saying they changed:
/// the runtime's event stream wakes a supervisor at once (see `runtime_events`), so
/// polling Podman for every pod every second (what made Podman busy enough on 2 cores
/// to slow down starting the pods of a lost agent) is only a safety net.
const RESYNC_INTERVAL: Duration = Duration::from_secs(10);
/// A pod the runtime could not remove is tried again after this, doubling up to the
/// maximum.
const REMOVE_RETRY_INITIAL: Duration = Duration::from_secs(1);
const REMOVE_RETRY_MAX: Duration = Duration::from_secs(30);
/// A pod whose volumes or sandbox could not be set up (a full disk, a runtime error) is
/// set up again after this, doubling up to the maximum, as the kubelet's volume manager
/// retries a failed mount (500 ms doubling to about 2 min).
const SETUP_RETRY_INITIAL: Duration = Duration::from_secs(1);
const SETUP_RETRY_MAX: Duration = Duration::from_secs(120);
/// While the runtime does not answer, set-ups are tried again at least this often: a
/// pod starts soon after it is back.
const UNAVAILABLE_RETRY_MAX: Duration = Duration::from_secs(8);

/// What a supervisor tells the agent.
#[derive(Debug, Clone)]
pub struct WorkerUpdate {
    pub pod: PodRef,
    pub epoch: Epoch,
    pub status: PodStatus,
    /// The pod has been torn down and its worker has ended.
    pub removed: bool,
    /// Events since the last update.
    pub events: Vec<AgentEvent>,
}

/// Everything a supervisor needs from its agent.
#[derive(Clone)]
pub struct WorkerContext {
    pub runtime: Arc<dyn Runtime>,
    pub agent: PeerId,
    /// On disk: emptyDir volumes.
    pub volumes_root: PathBuf,
    /// In memory-backed storage: volumes of files from the API, which may hold secrets.
    pub files_root: PathBuf,
    pub host_ip: Option<IpAddr>,
    pub node_name: String,
    pub updates: mpsc::Sender<WorkerUpdate>,
    pub metrics: Metrics,
    /// Gives the image references Podman pulls and runs.
    pub policy: Arc<Policy>,
    /// Permits to set a new pod up (see [`SETUP_CONCURRENCY`]).
    pub setups: Arc<tokio::sync::Semaphore>,
    /// Where each pod is, for connections to it.
    pub addresses: super::addresses::PodAddresses,
    /// The pods' connections to their owners' clusters.
    pub egress: super::egress::Egress,
    /// The Raft groups of the stateful workloads whose pods run here.
    pub groups: crate::raft::Groups,
}

/// New pods set up at once by one agent. A burst of hundreds (a Deployment scaled up)
/// would otherwise bury the runtime under creates: its answers to the health check and
/// to the running pods' restarts would wait behind all of them, the agent would be
/// taken for broken and its pods moved. More at once gains nothing: the runtime does
/// its work one pod at a time anyway.
pub const SETUP_CONCURRENCY: usize = 4;

impl WorkerContext {
    /// Where one copy of a pod keeps its volumes. Per epoch: a newer copy on the same
    /// agent must not share (or lose) the older copy's volumes while that one is torn
    /// down.
    pub fn volumes_dir(&self, uid: &crate::wire::PodUid, epoch: Epoch) -> PathBuf {
        self.volumes_root
            .join(format!("{}_{}", uid.file_name(), epoch))
    }

    /// Where one copy of a pod keeps the volumes of files from the API (per epoch, as
    /// [`WorkerContext::volumes_dir`]).
    pub fn files_dir(&self, uid: &crate::wire::PodUid, epoch: Epoch) -> PathBuf {
        self.files_root
            .join(format!("{}_{}", uid.file_name(), epoch))
    }
}

/// What the owner gave with the assignment beside the pod: only the assigned agent
/// has it.
#[derive(Debug, Default)]
pub struct Provided {
    /// Files of the volumes the owner resolved (empty for an adopted pod, whose files
    /// are already written).
    pub volumes: BTreeMap<String, Vec<VolumeFile>>,
    /// The pod's registry logins, each given to Podman only with a pull it is for.
    pub pull_credentials: Vec<RegistryCredential>,
    /// Where the pod goes on the mesh.
    pub network: NetworkGrant,
    /// Why no container may start yet: a strict pod's copy waiting for its seat in
    /// its group (see `lease::SeatLease`).
    pub gate: Option<String>,
}

/// Where the owner puts the pod on the mesh, as first assigned (an update to a running
/// pod does not move it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkGrant {
    /// The agent's subnet of the owner's mesh pod CIDR, where the pod's network is.
    pub subnet: Option<Ipv4Net>,
    /// The owner's cluster ranges, the pod's connections to which go through it.
    pub cluster_ranges: Vec<Ipv4Net>,
    /// The cluster's domain, when the owner relays the pod's DNS queries.
    pub cluster_domain: Option<String>,
}

impl NetworkGrant {
    /// Whether the pod's connections or DNS queries to its cluster go through the agent.
    pub fn relays_cluster_traffic(&self) -> bool {
        self.subnet.is_some() && (!self.cluster_ranges.is_empty() || self.cluster_domain.is_some())
    }

    /// The cluster DNS as the pod reaches it: the agent's relay on its network's
    /// gateway address.
    pub fn cluster_dns(&self) -> Option<dns::ClusterDns> {
        Some(dns::ClusterDns {
            nameserver: PodNetwork::on(self.subnet?).gateway.into(),
            domain: self.cluster_domain.clone()?,
        })
    }
}

/// What a lookup of the pod's address found.
struct FoundAddress {
    ip: IpAddr,
    /// Why its redirects could not be admitted, if they could not.
    egress: Option<super::egress::EgressError>,
}

/// The agent's handle on one supervisor task.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: mpsc::Sender<Duration>,
    poke: mpsc::Sender<()>,
    pull_credentials: watch::Sender<Vec<RegistryCredential>>,
    pod: watch::Sender<Option<Pod>>,
    gate: watch::Sender<Option<String>>,
}

impl WorkerHandle {
    /// Asks the worker to tear the pod down, SIGKILLing after `grace`.
    pub fn stop(&self, grace: Duration) {
        // A full or closed channel means a stop is already under way.
        let _ = self.stop.try_send(grace);
    }

    /// Tells the worker one of its containers changed: it inspects them now.
    pub fn poke(&self) {
        // A full channel means a look is already due.
        let _ = self.poke.try_send(());
    }

    /// New logins from the owner (a pull secret changed), for the pulls to come.
    pub fn set_pull_credentials(&self, credentials: Vec<RegistryCredential>) {
        self.pull_credentials.send_replace(credentials);
    }

    /// The pod as its owner now has it: its new ephemeral containers are started.
    pub fn set_pod(&self, pod: Pod) {
        self.pod.send_replace(Some(pod));
        self.poke();
    }

    /// The copy has its seat in its group: its containers start now.
    pub fn open_gate(&self) {
        self.gate.send_replace(None);
        self.poke();
    }

    /// The copy waits for its seat, its containers saying `message`.
    pub fn close_gate(&self, message: String) {
        self.gate.send_if_modified(|gate| {
            let changed = gate.as_ref() != Some(&message);
            *gate = Some(message);
            changed
        });
    }
}

/// Starts supervising `pod` at `epoch`. With `adopted`, the Podman pod already exists
/// (the agent restarted) and supervision continues from what it finds.
pub fn spawn(
    ctx: WorkerContext,
    pod_ref: PodRef,
    pod: Pod,
    provided: Provided,
    epoch: Epoch,
    owner: PeerId,
    adopted: Option<RuntimePod>,
) -> WorkerHandle {
    let (stop_tx, stop_rx) = mpsc::channel(1);
    let (poke_tx, poke_rx) = mpsc::channel(1);
    let mut provided = provided;
    let pull_credentials = std::mem::take(&mut provided.pull_credentials);
    let (credentials_tx, credentials_rx) = watch::channel(pull_credentials);
    let (pod_tx, pod_rx) = watch::channel(None);
    let (gate_tx, gate_rx) = watch::channel(provided.gate.take());
    let updates = Updates {
        pull_credentials: credentials_rx,
        pod: pod_rx,
        gate: gate_rx,
    };
    let worker = Worker::new(ctx, pod_ref, pod, provided, updates, epoch, owner);
    tokio::spawn(worker.run(stop_rx, poke_rx, adopted));
    WorkerHandle {
        stop: stop_tx,
        poke: poke_tx,
        pull_credentials: credentials_tx,
        pod: pod_tx,
        gate: gate_tx,
    }
}

/// What the agent tells a running worker: the owner's newer word.
struct Updates {
    /// The owner's latest registry logins for the pod.
    pull_credentials: watch::Receiver<Vec<RegistryCredential>>,
    /// The pod, once it changed.
    pod: watch::Receiver<Option<Pod>>,
    /// Why no container may start yet (a strict pod waiting for its seat in its
    /// group); None once they may.
    gate: watch::Receiver<Option<String>>,
}

/// One container of the pod, across its restarts.
struct Slot {
    spec: Container,
    kind: ContainerKind,
    view: ContainerView,
    /// Podman instance number; +1 for each restart.
    attempt: u32,
    id: Option<String>,
    previous_id: Option<String>,
    backoff: Option<Duration>,
    /// While set, the container waits (crash-loop or image back-off).
    retry_at: Option<Instant>,
    running_since: Option<Instant>,
    startup: Option<ProbeState>,
    liveness: Option<ProbeState>,
    readiness: Option<ProbeState>,
    /// Set once an init container (or a non-restarting app container) is done for good.
    finished: bool,
    /// Its writable layer and log, as last inspected.
    disk_bytes: u64,
    /// Its postStart hook, running: until it ends the container is not Running, and
    /// the containers after it are not started (as the kubelet's sync waits on it).
    post_start: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Slot {
    fn new(spec: Container, kind: ContainerKind) -> Slot {
        let reason = match kind {
            ContainerKind::Init => "PodInitializing",
            ContainerKind::App | ContainerKind::Ephemeral => "ContainerCreating",
        };
        Slot {
            view: ContainerView {
                name: spec.name.clone(),
                image: spec.image.clone().unwrap_or_default(),
                image_id: String::new(),
                container_id: None,
                state: Observed::waiting(reason, None),
                last_state: None,
                restart_count: 0,
                ready: false,
                started: false,
                sidecar: kind == ContainerKind::Init && translate::is_sidecar(&spec),
            },
            spec,
            kind,
            attempt: 0,
            id: None,
            previous_id: None,
            backoff: None,
            retry_at: None,
            running_since: None,
            disk_bytes: 0,
            post_start: None,
            startup: None,
            liveness: None,
            readiness: None,
            finished: false,
        }
    }

    fn probes_reset(&mut self, now: Instant) {
        let make = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
            p.as_ref().map(|p| ProbeState::new(ProbeSpec::new(p), now))
        };
        self.startup = make(&self.spec.startup_probe);
        self.liveness = make(&self.spec.liveness_probe);
        self.readiness = make(&self.spec.readiness_probe);
        self.view.started = self.startup.is_none();
        self.view.ready = false;
    }

    /// Schedules the next attempt after a failure, following the crash-loop back-off:
    /// the first retry is immediate, then 10 s, 20 s, ... up to 5 min.
    fn schedule_retry(&mut self, now: Instant) {
        if self
            .running_since
            .is_some_and(|since| now.duration_since(since) >= BACKOFF_RESET_AFTER)
        {
            self.backoff = None;
        }
        match self.backoff {
            None => {
                self.retry_at = None;
                self.backoff = Some(BACKOFF_INITIAL);
            }
            Some(delay) => self.retry_after(now, delay),
        }
    }

    /// After a failed pull: the kubelet's image back-off waits from the first failure.
    fn schedule_pull_retry(&mut self, now: Instant) {
        self.retry_after(now, self.backoff.unwrap_or(BACKOFF_INITIAL));
    }

    fn retry_after(&mut self, now: Instant, delay: Duration) {
        self.retry_at = Some(now + delay);
        self.backoff = Some((delay * 2).min(BACKOFF_MAX));
    }
}

struct Worker {
    ctx: WorkerContext,
    pod_ref: PodRef,
    pod: Pod,
    epoch: Epoch,
    /// Peer IDs rendered once, for labels.
    agent_id: String,
    owner_id: String,
    /// Who alone may connect to the pod (see [`super::addresses`]).
    owner: PeerId,
    /// `<volumes root>/<pod uid>_<epoch>`: where the pod's emptyDirs live.
    volumes_dir: PathBuf,
    /// `<files root>/<pod uid>_<epoch>`: where its volumes of files from the API live.
    files_dir: PathBuf,
    /// Files of the volumes the owner resolved (empty for an adopted pod, whose files
    /// are already written).
    volumes: BTreeMap<String, Vec<VolumeFile>>,
    updates: Updates,
    network: NetworkGrant,
    /// The cluster's DNS as the pod reaches it, if its owner relays it.
    cluster_dns: Option<dns::ClusterDns>,
    policy: RestartPolicy,
    pod_id: Option<String>,
    pod_ip: Option<IpAddr>,
    /// A lookup of the pod's address running beside its first container's creation;
    /// it never outlives the step that began it.
    pending_address: Option<tokio::task::JoinHandle<Option<FoundAddress>>>,
    /// The agent's resolv.conf, read again for each sandbox as the kubelet does.
    host_dns: ResolvConf,
    /// Where the sandbox's memory-backed emptyDirs are, by volume name.
    memory_dirs: BTreeMap<String, PathBuf>,
    /// The directory of the pod's group socket, for a pod of a stateful workload.
    group_socket: Option<PathBuf>,
    /// How the agent stands in the pod's group, for a pod of a stateful workload.
    group: Option<watch::Receiver<crate::raft::Standing>>,
    /// The term this pod's member last said it leads in.
    led_term: Option<u64>,
    group_key: Option<crate::raft::GroupKey>,
    start_time: Timestamp,
    slots: Vec<Slot>,
    failure: Option<(String, String)>,
    /// After a failed setup: when to try again, and the wait after that.
    setup_retry: Option<(Instant, Duration)>,
    last_sent: Option<PodStatus>,
    /// An event said a container changed: the next step inspects them all.
    inspect_due: bool,
    /// When running containers were last inspected.
    inspected_at: Instant,
    /// This step inspects running containers (else it trusts what it last saw).
    inspecting: bool,
    /// Events for the next report: at most [`MAX_REPORT_EVENTS`], later ones dropped
    /// until it is sent.
    events: Vec<AgentEvent>,
}

impl Worker {
    fn new(
        ctx: WorkerContext,
        pod_ref: PodRef,
        pod: Pod,
        // Its pull credentials go with the updates.
        provided: Provided,
        updates: Updates,
        epoch: Epoch,
        owner: PeerId,
    ) -> Worker {
        let spec = pod.spec.clone().unwrap_or_default();
        let slots = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| Slot::new(c.clone(), ContainerKind::Init))
            .chain(
                spec.containers
                    .iter()
                    .map(|c| Slot::new(c.clone(), ContainerKind::App)),
            )
            .chain(
                translate::ephemeral_containers(&spec)
                    .into_iter()
                    .map(|c| Slot::new(c, ContainerKind::Ephemeral)),
            )
            .collect();
        Worker {
            policy: RestartPolicy::from_spec(spec.restart_policy.as_deref()),
            agent_id: ctx.agent.to_string(),
            owner_id: owner.to_string(),
            owner,
            volumes_dir: ctx.volumes_dir(&pod_ref.uid, epoch),
            files_dir: ctx.files_dir(&pod_ref.uid, epoch),
            volumes: provided.volumes,
            cluster_dns: provided.network.cluster_dns(),
            network: provided.network,
            updates,
            ctx,
            pod_ref,
            pod,
            epoch,
            pod_id: None,
            pod_ip: None,
            pending_address: None,
            host_dns: ResolvConf::default(),
            memory_dirs: BTreeMap::new(),
            group_socket: None,
            group: None,
            led_term: None,
            group_key: None,
            start_time: Timestamp::now(),
            slots,
            failure: None,
            setup_retry: None,
            last_sent: None,
            inspect_due: true,
            inspected_at: Instant::now(),
            inspecting: true,
            events: Vec::new(),
        }
    }

    async fn run(
        mut self,
        mut stop: mpsc::Receiver<Duration>,
        mut poke: mpsc::Receiver<()>,
        adopted: Option<RuntimePod>,
    ) {
        match adopted {
            Some(existing) => {
                self.adopt(existing).await;
                // Inspect before the first report, so that an adopted pod is reported
                // as it is rather than as freshly created.
                self.step().await;
            }
            None => {
                self.report(false).await;
                let permit = tokio::select! {
                    permit = self.ctx.setups.clone().acquire_owned() => permit.ok(),
                    grace = stop.recv() => return self.stopped(grace).await,
                };
                self.advance().await;
                drop(permit);
            }
        }
        self.report(false).await;
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Followed apart from `self.group` (the select borrows self elsewhere).
        let mut standing = None;
        loop {
            if standing.is_none() {
                standing = self.group.clone();
            }
            tokio::select! {
                grace = stop.recv() => return self.stopped(grace).await,
                () = standing_changed(&mut standing) => {
                    self.on_standing();
                    self.report(false).await;
                }
                Some(()) = poke.recv() => {
                    self.inspect_due = true;
                    self.advance().await;
                    self.report(false).await;
                }
                _ = poll.tick() => {
                    self.advance().await;
                    self.report(false).await;
                }
            }
        }
    }

    /// A stop: the pod torn down with `grace`. None: the agent is shutting down; the
    /// pod keeps running and the next agent process adopts it.
    async fn stopped(&mut self, grace: Option<Duration>) {
        if let Some(grace) = grace {
            self.teardown(grace).await;
            self.report(true).await;
        }
    }

    /// Sets the pod up when due (its containers then start at once, not a poll later),
    /// then moves its containers along.
    async fn advance(&mut self) {
        if self.failure.is_some() {
            return;
        }
        if self.past_active_deadline() {
            return self.exceed_deadline().await;
        }
        if self.pod_id.is_none() || self.setup_retry.is_some() {
            if !self.setup_due() {
                return;
            }
            self.create().await;
            if self.failure.is_some() || self.pod_id.is_none() || self.setup_retry.is_some() {
                return;
            }
        }
        self.step().await;
    }

    fn plan_context(&self) -> PlanContext<'_> {
        PlanContext {
            agent: &self.agent_id,
            owner: &self.owner_id,
            epoch: self.epoch,
            volumes_dir: &self.volumes_dir,
            files_dir: &self.files_dir,
            pod_ip: self.pod_ip,
            host_ip: self.ctx.host_ip,
            pod_subnet: self.network.subnet,
            cluster_dns: self.cluster_dns.as_ref(),
            node_name: &self.ctx.node_name,
            host_dns: &self.host_dns,
            memory_dirs: &self.memory_dirs,
            group_socket_dir: self.group_socket.as_deref(),
        }
    }

    /// How this pod stands in its group, for a pod of a stateful workload.
    fn standing(&self) -> Option<crate::raft::Standing> {
        let agent = self.group.as_ref()?.borrow().clone();
        let key = self.group_key.as_ref()?;
        Some(self.ctx.groups.standing_of_pod(key, &self.pod_ref, agent))
    }

    /// The group's standing changed: a pod that now leads says so in an event.
    fn on_standing(&mut self) {
        if let Some(group) = self.group.as_mut() {
            group.borrow_and_update();
        }
        let Some(standing) = self.standing() else {
            return;
        };
        if standing.leads() && self.led_term != Some(standing.term) {
            self.led_term = Some(standing.term);
            self.note(
                AgentEventReason::LeaderElected,
                format!(
                    "{} leads its group (term {})",
                    self.pod_ref.name, standing.term
                ),
            );
        }
    }

    /// Gives a pod of a stateful workload its group's socket.
    fn attach_group(&mut self) -> std::io::Result<()> {
        let Ok(Some(name)) = crate::raft::group_of(&self.pod) else {
            return Ok(());
        };
        let key = crate::raft::GroupKey {
            owner: self.owner,
            namespace: self.pod_ref.namespace.clone(),
            name,
        };
        let (dir, standing) = self
            .ctx
            .groups
            .attach_pod(key.clone(), &self.pod_ref, self.epoch)?;
        self.group_socket = Some(dir);
        self.group = Some(standing);
        self.group_key = Some(key);
        Ok(())
    }

    /// Creates the Podman pod (network namespace and volumes). A spec that cannot run
    /// fails the pod; a setup the host or runtime could not do now (a full disk, a
    /// runtime error) leaves it Pending and is tried again, as the kubelet does.
    async fn create(&mut self) {
        if let Err(e) = translate::validate(&self.pod) {
            self.fail("UnsupportedPodSpec", e.to_string());
            return;
        }
        // A sandbox that did not start is made again from scratch.
        if let Some(stale) = self.pod_id.take() {
            if let Err(e) = self.ctx.runtime.remove_pod(&stale).await {
                self.pod_id = Some(stale);
                return self.setup_failed(format!(
                    "{}: cannot remove the sandbox that did not start: {e}",
                    SANDBOX_FAILED
                ));
            }
        }
        if let Err(e) = self.attach_group() {
            return self.setup_failed(format!("cannot make the pod's group socket: {e}"));
        }
        let fs_group = translate::fs_group(&self.pod);
        for name in translate::empty_dirs(&self.pod) {
            if let Err(e) = create_world_writable(&self.volumes_dir.join(&name), fs_group).await {
                return self.setup_failed(format!("{} for volume \"{name}\" : {e}", MOUNT_FAILED));
            }
        }
        match super::volumes::write(&self.files_dir, &self.volumes, fs_group).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                return self.fail(
                    "VolumeError",
                    format!("cannot write the pod's volumes: {e}"),
                )
            }
            Err(e) => {
                return self.setup_failed(format!(
                    "{}: cannot write the pod's volume files: {e}",
                    MOUNT_FAILED
                ))
            }
        }
        let unsent = translate::file_volumes(&self.pod)
            .into_iter()
            .find(|name| !self.files_dir.join(name).is_dir());
        if let Some(name) = unsent {
            return self.fail(
                "VolumeError",
                format!("volume {name}: its files did not come with the assignment"),
            );
        }
        if self
            .pod
            .spec
            .as_ref()
            .is_some_and(|s| s.dns_config.is_some())
        {
            self.host_dns = read_host_dns().await;
        }
        let plan = match translate::pod_plan(&self.pod, &self.plan_context()) {
            Ok(plan) => plan,
            Err(e) => return self.fail("UnsupportedPodSpec", e.to_string()),
        };
        for warning in &plan.dns_warnings {
            self.note(AgentEventReason::DNSConfigForming, warning.clone());
        }
        let pod_id = match self.ctx.runtime.create_pod(&plan).await {
            Ok(id) => id,
            // Podman down, or out of something (its locks: 2048 by default, three a
            // pod): said, and tried again soon after it answers again, not at once
            // (a retry every poll buried Podman under thousands of requests).
            Err(RuntimeError::Unavailable(e)) => {
                return self.setup_failed_within(
                    format!("{}: Podman unavailable: {e}", SANDBOX_FAILED),
                    UNAVAILABLE_RETRY_MAX,
                );
            }
            Err(e) => {
                return self.setup_failed(format!("{}: {e}", SANDBOX_FAILED));
            }
        };
        self.pod_id = Some(pod_id.clone());
        if let Err(e) = self
            .ctx
            .runtime
            .start_pod(&pod_id, plan.network.as_ref())
            .await
        {
            return self.setup_failed(format!("{}: {e}", SANDBOX_FAILED));
        }
        for memory in &plan.memory_volumes {
            match self.ctx.runtime.volume_dir(&memory.volume).await {
                Ok(dir) => {
                    self.memory_dirs.insert(memory.name.clone(), dir);
                }
                Err(e) => {
                    return self.setup_failed(format!(
                        "{} for volume \"{}\" : {e}",
                        MOUNT_FAILED, memory.name
                    ))
                }
            }
        }
        self.setup_retry = None;
        self.show_setup_problem(None);
        tracing::info!(pod = %self.pod_ref, epoch = %self.epoch, podman_pod = %plan.name, "pod sandbox started");
    }

    fn setup_due(&self) -> bool {
        self.setup_retry.is_none_or(|(at, _)| Instant::now() >= at)
    }

    /// The pod stays Pending, its containers waiting with the problem as their message,
    /// and its setup is tried again after a back-off.
    fn setup_failed(&mut self, message: String) {
        self.setup_failed_within(message, SETUP_RETRY_MAX);
    }

    /// As [`Worker::setup_failed`], the back-off growing to `max` at most.
    fn setup_failed_within(&mut self, message: String, max: Duration) {
        let delay = self
            .setup_retry
            .map_or(SETUP_RETRY_INITIAL, |(_, delay)| delay.min(max));
        tracing::warn!(pod = %self.pod_ref, %message, retry_secs = delay.as_secs(), "cannot set the pod up; trying again");
        self.setup_retry = Some((Instant::now() + delay, (delay * 2).min(max)));
        self.show_setup_problem(Some(message));
    }

    /// Shows (or clears) a setup problem on the containers not created yet.
    fn show_setup_problem(&mut self, message: Option<String>) {
        for slot in self
            .slots
            .iter_mut()
            .filter(|s| s.id.is_none() && s.attempt == 0)
        {
            if let Observed::Waiting { message: shown, .. } = &mut slot.view.state {
                shown.clone_from(&message);
            }
        }
    }

    async fn refresh_pod_ip(&mut self) {
        if let Some(lookup) = self.address_lookup() {
            let found = lookup.await;
            self.took_address(found);
        }
    }

    /// Starts looking the pod's address up (and admitting its redirects) while its
    /// first container's image is checked and the container is created: the floor's
    /// path has neither, and the container's start awaits it (see
    /// [`Worker::finish_address_lookup`]).
    fn begin_address_lookup(&mut self) {
        if self.pending_address.is_none() {
            self.pending_address = self.address_lookup().map(tokio::spawn);
        }
    }

    /// Ends a lookup [`Worker::begin_address_lookup`] started, if one runs.
    async fn finish_address_lookup(&mut self) {
        if let Some(lookup) = self.pending_address.take() {
            match lookup.await {
                Ok(found) => self.took_address(found),
                Err(e) => {
                    tracing::warn!(pod = %self.pod_ref, error = %e, "the pod's address lookup ended early")
                }
            }
        }
    }

    /// The pod's address from the runtime and, for a pod whose cluster traffic the
    /// agent relays, the outcome of admitting its redirects, which must be in place
    /// before its containers start (without them they still run: such connections
    /// fail, which the pod's events say).
    fn address_lookup(
        &self,
    ) -> Option<impl std::future::Future<Output = Option<FoundAddress>> + Send + 'static> {
        let pod_id = self.pod_id.clone()?;
        let runtime = self.ctx.runtime.clone();
        let egress = self.ctx.egress.clone();
        let network = self.network.clone();
        let (pod, owner, epoch) = (self.pod_ref.clone(), self.owner, self.epoch);
        Some(async move {
            let address = runtime.pod_address(&pod_id).await.ok()??;
            let egress = match (network.subnet, address.ip) {
                (Some(subnet), IpAddr::V4(ip)) if network.relays_cluster_traffic() => {
                    let pod = super::egress::EgressPod {
                        pod,
                        owner,
                        epoch,
                        ip,
                        mac: address.mac,
                        subnet,
                        ranges: network.cluster_ranges,
                        dns: network.cluster_domain.is_some(),
                    };
                    egress.admit(pod).await.err()
                }
                _ => None,
            };
            Some(FoundAddress {
                ip: address.ip,
                egress,
            })
        })
    }

    /// Keeps what a lookup found: the pod's IP, where connections to it go, and an
    /// event when its redirects could not be admitted.
    fn took_address(&mut self, found: Option<FoundAddress>) {
        let Some(found) = found else {
            return;
        };
        self.pod_ip = Some(found.ip);
        self.ctx
            .addresses
            .set(&self.pod_ref.uid, self.owner, self.epoch, found.ip);
        if let Some(e) = found.egress {
            tracing::warn!(pod = %self.pod_ref, error = %e, "the pod cannot reach its cluster's Services");
            self.note(
                AgentEventReason::ClusterUnreachable,
                format!("the pod cannot reach the cluster's Services: {e}"),
            );
        }
    }

    /// Picks up a pod this agent created before it restarted: the newest instance of
    /// each container carries on, its attempt number being the restart count.
    async fn adopt(&mut self, existing: RuntimePod) {
        // Files given again (a pod whose record was lost, claimed by its owner) are
        // written again; the containers see them through their bind mounts.
        if !self.volumes.is_empty() {
            let fs_group = translate::fs_group(&self.pod);
            if let Err(e) = super::volumes::write(&self.files_dir, &self.volumes, fs_group).await {
                tracing::warn!(pod = %self.pod_ref, error = %e, "cannot write the pod's volume files");
            }
        }
        self.pod_id = Some(existing.id.clone());
        if let Err(e) = self.attach_group() {
            tracing::warn!(pod = %self.pod_ref, error = %e, "cannot make the pod's group socket again");
        }
        for memory in translate::memory_volumes(&self.pod, self.epoch).unwrap_or_default() {
            match self.ctx.runtime.volume_dir(&memory.volume).await {
                Ok(dir) => {
                    self.memory_dirs.insert(memory.name, dir);
                }
                Err(e) => {
                    tracing::warn!(pod = %self.pod_ref, volume = %memory.name, error = %e, "cannot find the pod's memory volume")
                }
            }
        }
        // Started when its first container did, not when this agent process did (the
        // pod's active deadline counts from it).
        if let Some(first) = existing
            .containers
            .iter()
            .filter_map(|c| c.state.started_at)
            .min()
        {
            self.start_time = self.start_time.min(first);
        }
        self.refresh_pod_ip().await;
        let now = Instant::now();
        for slot in &mut self.slots {
            let mut instances: Vec<_> = existing
                .containers
                .iter()
                .filter(|c| c.labels.get(labels::CONTAINER) == Some(&slot.spec.name))
                .filter_map(|c| {
                    let attempt: u32 = c.labels.get(labels::ATTEMPT)?.parse().ok()?;
                    Some((attempt, c))
                })
                .collect();
            instances.sort_by_key(|(attempt, _)| *attempt);
            let Some((attempt, newest)) = instances.pop() else {
                continue;
            };
            slot.attempt = attempt;
            slot.view.restart_count = attempt;
            slot.id = Some(newest.id.clone());
            slot.view.container_id = Some(newest.id.clone());
            slot.previous_id = instances.pop().map(|(_, c)| c.id.clone());
            // A paused one is unpaused at its first inspection (see drive()).
            if matches!(
                newest.state.status,
                ContainerStatus::Running | ContainerStatus::Paused
            ) {
                slot.running_since = Some(now);
                slot.probes_reset(now);
            }
        }
        tracing::info!(pod = %self.pod_ref, epoch = %self.epoch, "adopted running pod");
    }

    /// The kubelet's `runAsNonRoot` check, which needs the image's user when the
    /// container does not set one.
    async fn verify_run_as_non_root(&self, spec: &Container, image: &str) -> Result<(), String> {
        let image_user = if translate::runs_as_image_user_non_root(&self.pod, spec) {
            self.ctx
                .runtime
                .image_user(image)
                .await
                .map_err(|e| format!("cannot read the image's user: {e}"))?
        } else {
            String::new()
        };
        translate::verify_run_as_non_root(&self.pod, spec, &image_user)
    }

    /// `activeDeadlineSeconds` counted from the pod's start, as the kubelet counts it;
    /// a pod whose containers have all finished is done and stays as it ended.
    fn past_active_deadline(&self) -> bool {
        if self.slots.iter().all(|slot| slot.finished) {
            return false;
        }
        let deadline = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.active_deadline_seconds);
        deadline.is_some_and(|secs| {
            let active = Timestamp::now().duration_since(self.start_time);
            active.as_secs() >= secs
        })
    }

    /// The kubelet's DeadlineExceeded: the pod Failed, its containers stopped with the
    /// grace period.
    async fn exceed_deadline(&mut self) {
        let grace = Duration::from_secs(translate::grace_period_secs(&self.pod));
        self.terminate(
            "DeadlineExceeded",
            "Pod was active on the node longer than the specified deadline".into(),
            grace,
        )
        .await;
    }

    /// The kubelet's local storage eviction: measured at each full inspection of a
    /// pod with limits, evicted (Failed, reason Evicted, containers killed at once)
    /// when its usage passes one.
    async fn enforce_local_storage_limits(&mut self) {
        let dirs: Vec<(String, PathBuf)> = translate::empty_dirs(&self.pod)
            .into_iter()
            .map(|name| {
                let dir = self.volumes_dir.join(&name);
                (name, dir)
            })
            .collect();
        let empty_dirs = tokio::task::spawn_blocking(move || {
            dirs.into_iter()
                .map(|(name, dir)| (name, eviction::disk_usage(&dir)))
                .collect()
        })
        .await
        .unwrap_or_default();
        let usage = eviction::Usage {
            empty_dirs,
            containers: self
                .slots
                .iter()
                .filter(|s| s.kind == ContainerKind::App)
                .map(|s| (s.spec.name.clone(), s.disk_bytes))
                .collect(),
        };
        if let Some(message) = eviction::exceeded(&self.pod, &usage) {
            self.terminate(eviction::EVICTED, message, Duration::ZERO)
                .await;
        }
    }

    /// The pod Failed with `reason`, its running containers stopped with `grace` and
    /// shown terminated as they ended.
    async fn terminate(&mut self, reason: &str, message: String, grace: Duration) {
        self.fail(reason, message);
        let live: Vec<(usize, String)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| !slot.finished)
            .filter_map(|(i, slot)| Some((i, slot.id.clone()?)))
            .collect();
        self.stop_containers(live.iter().map(|(i, _)| *i).collect(), grace)
            .await;
        for (i, id) in live {
            let (terminated, _) = self.terminated_state(&id).await;
            let slot = &mut self.slots[i];
            slot.view.ready = false;
            slot.finished = true;
            slot.view.state = terminated;
        }
    }

    fn fail(&mut self, reason: &str, message: String) {
        tracing::warn!(pod = %self.pod_ref, reason, %message, "pod failed");
        self.failure = Some((reason.to_string(), message));
    }

    /// One pass over the containers: init containers strictly in order, then all app
    /// containers.
    async fn step(&mut self) {
        let changed = self.updates.gate.has_changed().unwrap_or(false);
        let waiting = self.updates.gate.borrow_and_update().clone();
        if waiting.is_some() || changed {
            // Shown while waiting, and cleared once, when the gate opens.
            self.show_setup_problem(waiting.clone());
        }
        if waiting.is_some() {
            return;
        }
        let now = Instant::now();
        self.inspecting =
            self.inspect_due || now.duration_since(self.inspected_at) >= RESYNC_INTERVAL;
        if self.inspecting {
            self.inspect_due = false;
            self.inspected_at = now;
        }
        let init_count = self
            .slots
            .iter()
            .filter(|s| s.kind == ContainerKind::Init)
            .count();
        // The pod's IP is looked up before the containers when one needs it in its
        // environment or while init containers run (it is shown meanwhile); beside the
        // first container's creation when the redirects of its cluster connections and
        // DNS queries need it, which must be in place when it starts; else after the
        // app containers started: not on the way to a running pod.
        if self.pod_ip.is_none() {
            if init_count > 0 || translate::env_uses_pod_ip(&self.pod) {
                self.refresh_pod_ip().await;
            } else if self.network.relays_cluster_traffic() {
                self.begin_address_lookup();
            }
        }
        // Init containers in order, each awaited: a regular one until it is done, a
        // sidecar until it is up (it then runs on beside the rest).
        for i in 0..init_count {
            if self.slots[i].finished {
                continue;
            }
            self.drive(i, now).await;
            let slot = &self.slots[i];
            let awaited = if slot.view.sidecar {
                slot.view.sidecar_up() && slot.post_start.is_none()
            } else {
                slot.finished
            };
            if !awaited {
                return;
            }
        }
        // Containers start in order, each after the postStart hook of the one before;
        // ephemeral ones once the app containers started.
        self.take_pod_update();
        let mut hook_running = false;
        for i in init_count..self.slots.len() {
            if hook_running && self.slots[i].id.is_none() {
                continue;
            }
            self.drive(i, now).await;
            hook_running |= self.slots[i].post_start.is_some();
        }
        self.stop_sidecars_after_the_app(now).await;
        if self.inspecting && eviction::has_limits(&self.pod) {
            self.enforce_local_storage_limits().await;
        }
        self.finish_address_lookup().await;
        if self.pod_ip.is_none() {
            self.refresh_pod_ip().await;
        }
    }

    /// Moves one container along: create and start it when due, watch it while it
    /// runs, decide about restarts when it exits.
    async fn drive(&mut self, i: usize, now: Instant) {
        if self.slots[i].finished {
            return;
        }
        if let Some(hook) = self.slots[i].post_start.as_mut() {
            if !hook.is_finished() {
                return;
            }
            let outcome = hook
                .await
                .unwrap_or_else(|e| Err(format!("the postStart hook did not finish: {e}")));
            self.slots[i].post_start = None;
            if let (Err(_), Some(id)) = (&outcome, self.slots[i].id.clone()) {
                return self.post_start_ended(i, &id, outcome, now).await;
            }
        }
        match self.slots[i].id.clone() {
            None => self.start(i, now).await,
            // Running when last seen, and no event since: only its probes are due.
            Some(id) if !self.inspecting && self.slots[i].running_since.is_some() => {
                self.probe(i, &id, now).await
            }
            Some(id) => match self.ctx.runtime.container_state(&id).await {
                Ok(state) => {
                    if let Some(image_id) = &state.image_ref {
                        self.slots[i].view.image_id.clone_from(image_id);
                    }
                    if let Some(bytes) = state.disk_bytes {
                        self.slots[i].disk_bytes = bytes;
                    }
                    match state.status {
                        ContainerStatus::Running => {
                            let slot = &mut self.slots[i];
                            if slot.running_since.is_none() {
                                slot.running_since = Some(now);
                                slot.probes_reset(now);
                            }
                            slot.view.state = Observed::Running {
                                started_at: state.started_at.unwrap_or_else(Timestamp::now),
                            };
                            self.probe(i, &id, now).await;
                        }
                        ContainerStatus::Exited => {
                            let code = state.exit_code.unwrap_or(-1);
                            let message = self.termination_message(i, &id, code).await;
                            let terminated = Observed::Terminated {
                                exit_code: code,
                                reason: Observed::exit_reason(code).to_string(),
                                message: message.or_else(|| state.error.clone()),
                                started_at: state.started_at,
                                finished_at: state.finished_at,
                            };
                            self.exited(i, terminated, code, now);
                        }
                        ContainerStatus::Created => {
                            if has_sub_path(&self.slots[i].spec) {
                                self.recreate(i, &id, now).await;
                            } else if let Err(e) = self.ctx.runtime.start_container(&id).await {
                                self.start_failed(i, e, now);
                            }
                        }
                        ContainerStatus::Paused => {
                            // Only the agent pauses containers, while a sibling's subPath is
                            // mounted (freeze_writers); one still paused (the agent stopped
                            // meanwhile, or the unpause failed) runs on.
                            if let Err(e) = self.ctx.runtime.unpause_container(&id).await {
                                tracing::warn!(pod = %self.pod_ref, error = %e, "cannot unpause container");
                            }
                        }
                        ContainerStatus::Other => {}
                    }
                }
                Err(RuntimeError::NotFound(_)) => {
                    // Removed behind our back: count it as a crash and start anew.
                    let terminated = Observed::Terminated {
                        exit_code: 137,
                        reason: "ContainerRemoved".into(),
                        message: Some("the container disappeared from Podman".into()),
                        started_at: None,
                        finished_at: Some(Timestamp::now()),
                    };
                    self.exited(i, terminated, 137, now);
                }
                Err(e) => {
                    tracing::debug!(pod = %self.pod_ref, error = %e, "cannot inspect container")
                }
            },
        }
    }

    /// The message the current instance of container `i` (`id`, exited with `code`)
    /// leaves, as the kubelet reads it (`super::termination`).
    async fn termination_message(&self, i: usize, id: &str, code: i32) -> Option<String> {
        let slot = &self.slots[i];
        let file =
            translate::termination_message_file(&self.volumes_dir, &slot.spec.name, slot.attempt);
        match termination::read(&file).await {
            Ok(data) if !data.is_empty() => {
                return Some(String::from_utf8_lossy(&data).into_owned())
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Some(format!("Error on reading termination log: {e}")),
        }
        if code == 0 || !translate::falls_back_to_logs(&slot.spec) {
            return None;
        }
        let options = LogOptions {
            tail_lines: Some(termination::MAX_LOG_LINES),
            ..LogOptions::default()
        };
        let mut stream = self.ctx.runtime.logs(id, &options).await.ok()?;
        let mut tail = Vec::new();
        while let Some(Ok(chunk)) = stream.next().await {
            tail.extend_from_slice(&chunk);
            // 80 lines may be long: keep only what can be shown.
            if tail.len() > 2 * termination::MAX_LOG_BYTES {
                tail.drain(..tail.len() - termination::MAX_LOG_BYTES);
            }
        }
        Some(termination::log_message(&tail)).filter(|m| !m.is_empty())
    }

    /// Handles the exit of a container instance according to the restart policy.
    fn exited(&mut self, i: usize, terminated: Observed, code: i32, now: Instant) {
        let slot = &self.slots[i];
        let restarts = if slot.view.sidecar {
            true
        } else if slot.kind == ContainerKind::Ephemeral {
            false
        } else if slot.kind == ContainerKind::Init {
            code != 0 && self.policy != RestartPolicy::Never
        } else {
            self.policy.restarts(code)
        };
        let slot = &mut self.slots[i];
        slot.view.ready = false;
        if !restarts {
            slot.view.state = terminated;
            slot.finished = true;
            return;
        }
        slot.schedule_retry(now);
        slot.running_since = None;
        slot.previous_id = slot.id.take();
        slot.attempt += 1;
        slot.view.restart_count += 1;
        slot.view.last_state = Some(terminated);
        self.ctx.metrics.container_restarts.inc();
        slot.view.state = Observed::waiting(
            "CrashLoopBackOff",
            Some(format!(
                "back-off {}s restarting failed container={} pod={}",
                slot.backoff.map(|d| d.as_secs() / 2).unwrap_or(0).max(10),
                slot.spec.name,
                self.pod_ref.kubelet_name()
            )),
        );
    }

    fn start_failed(&mut self, i: usize, e: RuntimeError, now: Instant) {
        let terminated = Observed::Terminated {
            exit_code: 128,
            reason: "StartError".into(),
            message: Some(e.to_string()),
            started_at: None,
            finished_at: Some(Timestamp::now()),
        };
        self.exited(i, terminated, 128, now);
    }

    async fn start(&mut self, i: usize, now: Instant) {
        if self.slots[i].retry_at.is_some_and(|at| now < at) {
            return;
        }
        let Some(pod_id) = self.pod_id.clone() else {
            return;
        };
        let spec = self.slots[i].spec.clone();
        let image = self
            .ctx
            .policy
            .runtime_image(spec.image.as_deref().unwrap_or_default());
        let credentials: Vec<RegistryCredential> =
            registry_auth::lookup(&self.updates.pull_credentials.borrow(), &image)
                .into_iter()
                .cloned()
                .collect();
        if let Err(e) = self
            .ctx
            .runtime
            .ensure_image(&image, translate::pull_policy(&spec), &credentials)
            .await
        {
            let slot = &mut self.slots[i];
            // The first failure shows ErrImagePull, the waits after it ImagePullBackOff,
            // each with the kubelet's message.
            let (reason, message) = match &e {
                RuntimeError::ImageNeverPull(_) => ("ErrImageNeverPull", e.to_string()),
                RuntimeError::Unavailable(_) => ("ContainerCreating", e.to_string()),
                _ if slot.backoff.is_some() => (
                    "ImagePullBackOff",
                    format!(
                        "Back-off pulling image \"{}\"",
                        spec.image.as_deref().unwrap_or_default()
                    ),
                ),
                _ => ("ErrImagePull", e.to_string()),
            };
            slot.view.state = Observed::waiting(reason, Some(message));
            slot.schedule_pull_retry(now);
            return;
        }
        if let Err(message) = self.verify_run_as_non_root(&spec, &image).await {
            let slot = &mut self.slots[i];
            slot.view.state = Observed::waiting("CreateContainerConfigError", Some(message));
            slot.schedule_retry(now);
            return;
        }
        let plan = match translate::container_plan(
            &self.pod,
            &spec,
            self.slots[i].kind,
            self.slots[i].attempt,
            &self.plan_context(),
        ) {
            Ok(plan) => ContainerPlan {
                image,
                pid_namespace_of: self.pid_target(i),
                ..plan
            },
            Err(e) => {
                let slot = &mut self.slots[i];
                slot.view.state =
                    Observed::waiting("CreateContainerConfigError", Some(e.to_string()));
                slot.schedule_retry(now);
                return;
            }
        };
        let frozen = match self.freeze_writers(i, &plan).await {
            Ok(frozen) => frozen,
            Err(message) => {
                let slot = &mut self.slots[i];
                slot.view.state = Observed::waiting("CreateContainerError", Some(message));
                slot.schedule_retry(now);
                return;
            }
        };
        self.create_and_start(i, &pod_id, &plan, now).await;
        self.thaw(&frozen).await;
    }

    /// Prepares the container's mounts, then creates and starts it.
    async fn create_and_start(
        &mut self,
        i: usize,
        pod_id: &str,
        plan: &ContainerPlan,
        now: Instant,
    ) {
        let fs_group = translate::fs_group(&self.pod);
        if let Err(message) = prepare_mounts(&self.slots[i].spec.name, plan, fs_group).await {
            let slot = &mut self.slots[i];
            slot.view.state = Observed::waiting("CreateContainerConfigError", Some(message));
            slot.schedule_retry(now);
            return;
        }
        // Keep exactly one previous instance (for `logs --previous`); older ones go.
        if let Some(old) = self.slots[i].previous_id.clone() {
            if self.slots[i].attempt >= 2 {
                let _ = self.ctx.runtime.remove_container(&old).await;
                self.slots[i].previous_id = None;
                let older = translate::termination_message_file(
                    &self.volumes_dir,
                    &self.slots[i].spec.name,
                    self.slots[i].attempt - 2,
                );
                let _ = tokio::fs::remove_file(older).await;
            }
        }
        if let Err(e) = termination::create_file(&plan.termination_message.host_file).await {
            let slot = &mut self.slots[i];
            slot.view.state = Observed::waiting(
                "CreateContainerConfigError",
                Some(format!("cannot create the termination message file: {e}")),
            );
            slot.schedule_retry(now);
            return;
        }
        let id = match self.ctx.runtime.create_container(pod_id, plan).await {
            Ok(id) => id,
            Err(e) => {
                let slot = &mut self.slots[i];
                slot.view.state = Observed::waiting("CreateContainerError", Some(e.to_string()));
                slot.schedule_retry(now);
                return;
            }
        };
        let slot = &mut self.slots[i];
        slot.id = Some(id.clone());
        slot.view.container_id = Some(id.clone());
        self.finish_address_lookup().await;
        if let Err(e) = self.ctx.runtime.start_container(&id).await {
            self.start_failed(i, e, now);
            return;
        }
        if let Some(hook) = self.hook(i, &id, |l| l.post_start.as_ref()) {
            let slot = &mut self.slots[i];
            slot.retry_at = None;
            slot.view.state = Observed::waiting("ContainerCreating", None);
            slot.post_start = Some(tokio::spawn(async move {
                hook.run(hook::POST_START_LIMIT).await
            }));
            tracing::info!(pod = %self.pod_ref, container = %slot.spec.name, attempt = slot.attempt, "container started; its postStart hook runs");
            return;
        }
        let slot = &mut self.slots[i];
        slot.retry_at = None;
        slot.running_since = Some(now);
        slot.probes_reset(now);
        slot.view.state = Observed::Running {
            started_at: Timestamp::now(),
        };
        tracing::info!(pod = %self.pod_ref, container = %slot.spec.name, attempt = slot.attempt, "container started");
    }

    /// Container `i`'s hook that `which` picks from its lifecycle, ready to run on the
    /// instance `id`.
    fn hook(
        &self,
        i: usize,
        id: &str,
        which: impl Fn(&Lifecycle) -> Option<&LifecycleHandler>,
    ) -> Option<Hook> {
        let spec = &self.slots[i].spec;
        let handler = spec.lifecycle.as_ref().and_then(which)?;
        Some(Hook {
            handler: handler.clone(),
            runtime: self.ctx.runtime.clone(),
            container_id: id.to_string(),
            container: spec.clone(),
            pod: self.pod_ref.kubelet_name(),
            pod_ip: self.pod_ip,
        })
    }

    /// After container `i`'s postStart hook ended: a failure stops the container (its
    /// preStop hook first, as the kubelet kills it) and it waits with
    /// `PostStartHookError` until it is started again.
    async fn post_start_ended(
        &mut self,
        i: usize,
        id: &str,
        outcome: Result<(), String>,
        now: Instant,
    ) {
        let Err(message) = outcome else {
            return;
        };
        tracing::info!(pod = %self.pod_ref, container = %self.slots[i].spec.name, %message, "postStart hook failed; stopping the container");
        self.note(
            AgentEventReason::FailedPostStartHook,
            "PostStartHook failed".into(),
        );
        self.kill(i, id, translate::grace_period_secs(&self.pod))
            .await;
        let (terminated, code) = self.terminated_state(id).await;
        self.exited(i, terminated, code, now);
        let slot = &mut self.slots[i];
        if !slot.finished {
            slot.view.state = Observed::waiting("PostStartHookError", Some(message));
        }
    }

    /// Stops container `i` (instance `id`) as the kubelet kills one: its preStop hook
    /// first, within the grace period, then SIGTERM with what is left of it (at least
    /// 2 s) before SIGKILL.
    async fn kill(&mut self, i: usize, id: &str, grace_secs: u64) {
        let pre_stop = self.hook(i, id, |l| l.pre_stop.as_ref());
        let outcome = stop_container(
            self.ctx.runtime.clone(),
            id.to_string(),
            pre_stop,
            Duration::from_secs(grace_secs),
        )
        .await;
        self.stopped_container(outcome);
    }

    /// Notes a failed preStop hook, logs a failed stop.
    fn stopped_container(&mut self, outcome: StopOutcome) {
        if let Some(message) = outcome.pre_stop_failure {
            tracing::info!(pod = %self.pod_ref, %message, "preStop hook failed");
            self.note(
                AgentEventReason::FailedPreStopHook,
                "PreStopHook failed".into(),
            );
        }
        if let Err(e) = outcome.stopped {
            tracing::warn!(pod = %self.pod_ref, error = %e, "cannot stop container");
        }
    }

    /// Pauses the pod's other containers that could change what [`subpath::open`] checks
    /// for container `i` before the runtime has mounted it: the ones that mount a volume
    /// this container mounts a subPath of, writable, and are not known to have exited.
    /// Returns the IDs paused, for [`Worker::thaw`].
    ///
    /// The walk proves a subPath free of links when it runs, but Podman (and the kernel
    /// under it) resolves the path again when it mounts it, a moment later: a container
    /// swapping a checked directory for a link in between would still get the link's
    /// target. The kubelet closes that window by bind-mounting the descriptor the walk
    /// opened (`/proc/<pid>/fd/<n>`) onto a private path and handing the runtime that;
    /// the agent cannot, since its systemd unit gives it neither CAP_SYS_ADMIN nor the
    /// mount system calls, and a mount namespace of its own that Podman does not see.
    /// Frozen, no process of the pod can change the volume until the new container is
    /// started, its mounts made. Nothing outside the pod can: an emptyDir belongs to one
    /// pod, and volumes of files from the API are read-only to every container.
    async fn freeze_writers(
        &mut self,
        i: usize,
        plan: &ContainerPlan,
    ) -> Result<Vec<String>, String> {
        let volumes: HashSet<&str> = plan
            .mounts
            .iter()
            .filter(|m| m.sub_path.is_some())
            .map(|m| m.volume.as_str())
            .collect();
        if volumes.is_empty() {
            return Ok(Vec::new());
        }
        let read_only: HashSet<String> = translate::file_volumes(&self.pod).into_iter().collect();
        let writers: Vec<(String, String)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .filter(|(_, slot)| {
                slot.spec.volume_mounts.iter().flatten().any(|m| {
                    volumes.contains(m.name.as_str())
                        && m.read_only != Some(true)
                        && !read_only.contains(&m.name)
                })
            })
            .filter_map(|(_, slot)| Some((slot.id.clone()?, slot.spec.name.clone())))
            .collect();
        let mut frozen = Vec::new();
        for (id, name) in writers {
            let Err(e) = self.ctx.runtime.pause_container(&id).await else {
                frozen.push(id);
                continue;
            };
            // One that does not run cannot write.
            match self.ctx.runtime.container_state(&id).await {
                Ok(state)
                    if matches!(
                        state.status,
                        ContainerStatus::Created
                            | ContainerStatus::Exited
                            | ContainerStatus::Paused
                    ) => {}
                Err(RuntimeError::NotFound(_)) => {}
                _ => {
                    self.thaw(&frozen).await;
                    return Err(format!(
                        "failed to prepare subPaths of container \"{}\": cannot pause \
                         container \"{name}\", which can write to their volumes: {e}",
                        self.slots[i].spec.name
                    ));
                }
            }
        }
        Ok(frozen)
    }

    /// Unpauses what [`Worker::freeze_writers`] paused. One that stays paused is tried
    /// again at its next inspection.
    async fn thaw(&self, frozen: &[String]) {
        for id in frozen {
            if let Err(e) = self.ctx.runtime.unpause_container(id).await {
                tracing::warn!(pod = %self.pod_ref, container = %id, error = %e, "cannot unpause container");
            }
        }
    }

    /// Removes a container with subPath mounts that was created but never started (the
    /// agent stopped in between), and creates and starts it anew: starting it as it is
    /// would have Podman resolve its subPaths again, unchecked and unguarded.
    async fn recreate(&mut self, i: usize, id: &str, now: Instant) {
        match self.ctx.runtime.remove_container(id).await {
            Ok(()) | Err(RuntimeError::NotFound(_)) => {}
            Err(e) => {
                tracing::debug!(pod = %self.pod_ref, error = %e, "cannot remove a container never started");
                return;
            }
        }
        let slot = &mut self.slots[i];
        slot.id = None;
        slot.view.container_id = None;
        self.start(i, now).await;
    }

    /// Runs the container's due probes. A failed startup or liveness probe kills the
    /// container (the restart policy then decides); readiness sets `ready`.
    async fn probe(&mut self, i: usize, id: &str, now: Instant) {
        let runtime = self.ctx.runtime.clone();
        let pod_ip = self.pod_ip;
        let slot = &mut self.slots[i];
        // Each failure is the kubelet's Unhealthy event; the one that settles a startup
        // or liveness probe as failed kills the container.
        let mut failures = Vec::new();
        let mut kill = None;
        if let Some(state) = slot.startup.as_mut() {
            if state.result != Some(true) && state.due(now) {
                let outcome =
                    probe::run(&state.spec, runtime.as_ref(), id, &slot.spec, pod_ip).await;
                let ok = outcome.is_ok();
                match state.record(ok, outcome.err().unwrap_or_default(), now) {
                    Some(true) => slot.view.started = true,
                    Some(false) => kill = Some("startup"),
                    None => {}
                }
                if !ok {
                    failures.push(format!("Startup probe failed: {}", state.last_message));
                }
            }
        }
        if slot.view.started && kill.is_none() {
            if let Some(state) = slot.liveness.as_mut() {
                if state.due(now) {
                    let outcome =
                        probe::run(&state.spec, runtime.as_ref(), id, &slot.spec, pod_ip).await;
                    let ok = outcome.is_ok();
                    if state.record(ok, outcome.err().unwrap_or_default(), now) == Some(false) {
                        kill = Some("liveness");
                    }
                    if !ok {
                        failures.push(format!("Liveness probe failed: {}", state.last_message));
                    }
                }
            }
            match slot.readiness.as_mut() {
                Some(state) => {
                    if state.due(now) {
                        let outcome =
                            probe::run(&state.spec, runtime.as_ref(), id, &slot.spec, pod_ip).await;
                        let ok = outcome.is_ok();
                        state.record(ok, outcome.err().unwrap_or_default(), now);
                        if !ok {
                            failures
                                .push(format!("Readiness probe failed: {}", state.last_message));
                        }
                    }
                    slot.view.ready = state.result == Some(true);
                }
                None => slot.view.ready = true,
            }
        }
        let name = slot.spec.name.clone();
        for failure in failures {
            self.note(AgentEventReason::Unhealthy, failure);
        }
        if let Some(probe) = kill {
            let message = format!("Container {name} failed {probe} probe, will be restarted");
            tracing::info!(pod = %self.pod_ref, container = %name, %message, "killing container");
            self.note(AgentEventReason::Killing, message);
            self.slots[i].view.ready = false;
            self.kill(i, id, translate::grace_period_secs(&self.pod))
                .await;
        }
    }

    /// An event for the next report (dropped when that report already has its fill).
    fn note(&mut self, reason: AgentEventReason, message: String) {
        if self.events.len() >= MAX_REPORT_EVENTS {
            tracing::debug!(pod = %self.pod_ref, ?reason, "event dropped: the report is full");
            return;
        }
        self.events.push(AgentEvent::new(reason, message));
    }

    /// The runtime ID of the container whose processes ephemeral container `i` joins
    /// (its `targetContainerName`), once that one has been made.
    fn pid_target(&self, i: usize) -> Option<String> {
        if self.slots[i].kind != ContainerKind::Ephemeral {
            return None;
        }
        let spec = self.pod.spec.as_ref()?;
        let name = &self.slots[i].spec.name;
        let target = spec
            .ephemeral_containers
            .iter()
            .flatten()
            .find(|e| &e.name == name)?
            .target_container_name
            .as_ref()?;
        self.slots
            .iter()
            .find(|s| s.kind == ContainerKind::App && &s.spec.name == target)?
            .id
            .clone()
    }

    /// The owner's newer pod, if it sent one: its new ephemeral containers get slots, and
    /// the others their new spec for their next start (env values the owner took from a
    /// changed configMap, as a kubelet reads them again when it restarts a container).
    fn take_pod_update(&mut self) {
        if !self.updates.pod.has_changed().unwrap_or(false) {
            return;
        }
        let Some(pod) = self.updates.pod.borrow_and_update().clone() else {
            return;
        };
        let spec = pod.spec.clone().unwrap_or_default();
        let ephemeral = translate::ephemeral_containers(&spec);
        for slot in &mut self.slots {
            let list = match slot.kind {
                ContainerKind::Init => spec.init_containers.as_deref().unwrap_or_default(),
                ContainerKind::App => spec.containers.as_slice(),
                ContainerKind::Ephemeral => ephemeral.as_slice(),
            };
            if let Some(container) = list.iter().find(|c| c.name == slot.spec.name) {
                slot.spec = container.clone();
            }
        }
        for container in ephemeral {
            if !self.slots.iter().any(|s| s.spec.name == container.name) {
                tracing::info!(pod = %self.pod_ref, container = %container.name, "ephemeral container added");
                self.slots
                    .push(Slot::new(container, ContainerKind::Ephemeral));
            }
        }
        self.pod = pod;
    }

    /// Once every app container is done for good (restartPolicy Never or OnFailure),
    /// the sidecars are stopped, last first, and the pod ends as its app containers did.
    async fn stop_sidecars_after_the_app(&mut self, now: Instant) {
        let apps_done = self
            .slots
            .iter()
            .filter(|s| s.kind == ContainerKind::App)
            .all(|s| s.finished);
        let running: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].view.sidecar && !self.slots[i].finished)
            .collect();
        if !apps_done || running.is_empty() {
            return;
        }
        let grace = Duration::from_secs(translate::grace_period_secs(&self.pod));
        self.stop_in_turn(running.iter().rev().copied().collect(), grace, now)
            .await;
        for i in running {
            let terminated = match self.slots[i].id.clone() {
                Some(id) => self.terminated_state(&id).await.0,
                None => Observed::Terminated {
                    exit_code: 0,
                    reason: "Completed".into(),
                    message: None,
                    started_at: None,
                    finished_at: Some(Timestamp::now()),
                },
            };
            let slot = &mut self.slots[i];
            slot.view.ready = false;
            slot.view.state = terminated;
            slot.finished = true;
        }
    }

    /// How a stopped container ended, as its runtime says, and its exit code (137,
    /// killed, when the runtime cannot say).
    async fn terminated_state(&self, id: &str) -> (Observed, i32) {
        let state = self.ctx.runtime.container_state(id).await.ok();
        let code = state.as_ref().and_then(|s| s.exit_code).unwrap_or(137);
        let terminated = Observed::Terminated {
            exit_code: code,
            reason: Observed::exit_reason(code).to_string(),
            message: None,
            started_at: state.as_ref().and_then(|s| s.started_at),
            finished_at: state
                .and_then(|s| s.finished_at)
                .or_else(|| Some(Timestamp::now())),
        };
        (terminated, code)
    }

    /// Stops the containers `which` one after another, in that order, all within
    /// `grace` (each has what is left of it, as the kubelet stops sidecars).
    async fn stop_in_turn(&mut self, which: Vec<usize>, grace: Duration, begun: Instant) {
        let deadline = begun + grace;
        for i in which {
            let left = deadline.saturating_duration_since(Instant::now());
            self.stop_containers(vec![i], left).await;
        }
    }

    /// Stops the containers `which` at once, each as [`Worker::kill`] does.
    async fn stop_containers(&mut self, which: Vec<usize>, grace: Duration) {
        let mut stops = Vec::new();
        for i in which {
            if let Some(hook) = self.slots[i].post_start.take() {
                hook.abort();
            }
            let Some(id) = self.slots[i].id.clone() else {
                continue;
            };
            // Only a running container's preStop hook runs, as with the kubelet.
            let pre_stop = self.slots[i]
                .running_since
                .and_then(|_| self.hook(i, &id, |l| l.pre_stop.as_ref()));
            stops.push(stop_container(
                self.ctx.runtime.clone(),
                id,
                pre_stop,
                grace,
            ));
        }
        for outcome in futures::future::join_all(stops).await {
            self.stopped_container(outcome);
        }
    }

    /// Stops the app containers, then the sidecars last first, as the kubelet ends a pod
    /// with sidecars, all within `grace`; then removes the pod.
    async fn teardown(&mut self, grace: Duration) {
        let runtime = self.ctx.runtime.clone();
        let begun = Instant::now();
        let (sidecars, others): (Vec<usize>, Vec<usize>) =
            (0..self.slots.len()).partition(|&i| self.slots[i].view.sidecar);
        self.stop_containers(others, grace).await;
        self.stop_in_turn(sidecars.into_iter().rev().collect(), grace, begun)
            .await;
        // Nothing listens any more, and Podman may give the address to another pod.
        self.ctx.addresses.remove(&self.pod_ref.uid, self.epoch);
        self.ctx.egress.remove(&self.pod_ref.uid, self.epoch).await;
        self.ctx.groups.detach_pod(&self.pod_ref, self.epoch).await;
        if let Some(pod_id) = self.pod_id.take() {
            // Until it is gone: a copy the agent forgot would run on unseen (Podman
            // may be down for a while; the containers run on under conmon).
            let mut delay = REMOVE_RETRY_INITIAL;
            loop {
                match runtime.remove_pod(&pod_id).await {
                    Ok(()) | Err(RuntimeError::NotFound(_)) => break,
                    Err(e) => {
                        tracing::warn!(pod = %self.pod_ref, error = %e, retry_secs = delay.as_secs(), "cannot remove pod; trying again");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(REMOVE_RETRY_MAX);
                    }
                }
            }
        }
        let _ = tokio::fs::remove_dir_all(&self.volumes_dir).await;
        let _ = tokio::fs::remove_dir_all(&self.files_dir).await;
        for slot in &mut self.slots {
            if !matches!(slot.view.state, Observed::Terminated { .. }) {
                slot.view.state = Observed::Terminated {
                    exit_code: 0,
                    reason: "Completed".into(),
                    message: Some("stopped by the owner".into()),
                    started_at: None,
                    finished_at: Some(Timestamp::now()),
                };
            }
            slot.view.ready = false;
        }
        tracing::info!(pod = %self.pod_ref, epoch = %self.epoch, "pod removed");
    }

    fn view(&self) -> PodView {
        let of = |kind: ContainerKind| -> Vec<ContainerView> {
            self.slots
                .iter()
                .filter(|s| s.kind == kind)
                .map(|s| s.view.clone())
                .collect()
        };
        PodView {
            init: of(ContainerKind::Init),
            app: of(ContainerKind::App),
            ephemeral: of(ContainerKind::Ephemeral),
            restart_policy: self.policy,
            pod_ip: self.pod_ip.map(|ip| ip.to_string()),
            host_ip: self.ctx.host_ip.map(|ip| ip.to_string()),
            start_time: Some(self.start_time),
            failure: self.failure.clone(),
            group: self.standing(),
        }
    }

    /// Sends the status if it changed, or events came (or when the pod is gone).
    async fn report(&mut self, removed: bool) {
        let mut status = status::pod_status(&self.view(), Timestamp::now());
        if let Some(old) = &self.last_sent {
            status::carry_transition_times(&mut status, old);
            if !removed && *old == status && self.events.is_empty() {
                return;
            }
        }
        self.last_sent = Some(status.clone());
        let update = WorkerUpdate {
            pod: self.pod_ref.clone(),
            epoch: self.epoch,
            status,
            removed,
            events: std::mem::take(&mut self.events),
        };
        if self.ctx.updates.send(update).await.is_err() {
            tracing::debug!(pod = %self.pod_ref, "agent is gone; status not delivered");
        }
    }
}

/// What stopping a container gave.
struct StopOutcome {
    /// The preStop hook's failure, in the kubelet's words.
    pre_stop_failure: Option<String>,
    stopped: Result<(), RuntimeError>,
}

/// The kubelet's grace after a preStop hook: never less than this.
const MIN_GRACE_AFTER_PRE_STOP: Duration = Duration::from_secs(2);

/// The preStop hook (if any) within `grace`, then a stop with the rest of it.
async fn stop_container(
    runtime: Arc<dyn Runtime>,
    id: String,
    pre_stop: Option<Hook>,
    grace: Duration,
) -> StopOutcome {
    let mut pre_stop_failure = None;
    let mut left = grace;
    if let Some(hook) = pre_stop.filter(|_| !grace.is_zero()) {
        let begun = Instant::now();
        pre_stop_failure = match tokio::time::timeout(grace, hook.run(grace)).await {
            Ok(outcome) => outcome.err(),
            Err(_) => Some(format!(
                "the preStop hook did not end within the grace period ({grace:?})"
            )),
        };
        left = grace
            .saturating_sub(begun.elapsed())
            .max(MIN_GRACE_AFTER_PRE_STOP);
    }
    StopOutcome {
        pre_stop_failure,
        stopped: runtime.stop_container(&id, left).await,
    }
}

/// Whether any of the container's volume mounts has a subPath.
fn has_sub_path(spec: &Container) -> bool {
    spec.volume_mounts
        .iter()
        .flatten()
        .any(|m| m.sub_path.as_deref().is_some_and(|p| !p.is_empty()))
}

/// Makes sure that what each mount names is there: the directory of a volume (made again
/// if it went missing), or its subPath, opened and made if missing by [`subpath::open`],
/// which refuses one through a symbolic link. The error is the container's status
/// message, as the kubelet words it.
async fn prepare_mounts(
    container: &str,
    plan: &ContainerPlan,
    fs_group: Option<u32>,
) -> Result<(), String> {
    for mount in &plan.mounts {
        let Some(sub_path) = mount.sub_path.clone() else {
            create_world_writable(&mount.volume_dir, fs_group)
                .await
                .map_err(|e| format!("cannot create {}: {e}", mount.container_path))?;
            continue;
        };
        let volume_dir = mount.volume_dir.clone();
        let shown = sub_path.clone();
        let opened =
            tokio::task::spawn_blocking(move || subpath::open(&volume_dir, &sub_path).map(drop))
                .await;
        let error = match opened {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        return Err(format!(
            "failed to prepare subPath for volumeMount \"{}\" of container \"{container}\": \
             subPath {shown:?}: {error}",
            mount.volume
        ));
    }
    Ok(())
}

/// Creates a volume directory with mode 0777, as the kubelet creates emptyDir volumes,
/// so that containers running as any user can write to it. One that exists keeps its
/// owner and mode: a container may have set them, and a restart must not undo that.
async fn create_world_writable(
    dir: &std::path::Path,
    fs_group: Option<u32>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if tokio::fs::metadata(dir).await.is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    tokio::fs::create_dir_all(dir).await?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).await?;
    match fs_group {
        Some(gid) => super::volumes::give_to_group(dir, gid, false).await,
        None => Ok(()),
    }
}

/// The agent's resolver configuration: `/etc/resolv.conf`, or, where that names only
/// systemd-resolved's stub on loopback (unreachable from a pod), the upstream servers
/// systemd-resolved uses, as Podman picks them. Unreadable: none (the pod's `dnsConfig`
/// alone), said in the log.
async fn read_host_dns() -> ResolvConf {
    const HOST: &str = "/etc/resolv.conf";
    const SYSTEMD_UPSTREAM: &str = "/run/systemd/resolve/resolv.conf";
    let read = |path: &'static str| async move {
        let file = tokio::fs::File::open(path).await?;
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(
            &mut tokio::io::AsyncReadExt::take(file, dns::MAX_RESOLV_CONF_BYTES),
            &mut text,
        )
        .await?;
        Ok::<_, std::io::Error>(dns::parse_resolv_conf(&text))
    };
    match read(HOST).await {
        Ok(conf) if conf.nameservers.is_empty() => read(SYSTEMD_UPSTREAM).await.unwrap_or(conf),
        Ok(conf) => conf,
        Err(e) => {
            tracing::warn!(path = HOST, error = %e, "cannot read the agent's resolver configuration");
            ResolvConf::default()
        }
    }
}

/// Waits for the group's standing to change; never, without a group (or once its
/// agent side is gone).
async fn standing_changed(standing: &mut Option<watch::Receiver<crate::raft::Standing>>) {
    if let Some(receiver) = standing {
        if receiver.changed().await.is_ok() {
            return;
        }
    }
    *standing = None;
    std::future::pending::<()>().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn volume_directories_are_made_world_writable_once_and_then_left_as_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume = dir.path().join("data/sub");
        let mode = |path: &std::path::Path| {
            std::fs::metadata(path)
                .expect("exists")
                .permissions()
                .mode()
                & 0o777
        };
        create_world_writable(&volume, None).await.expect("created");
        assert_eq!(mode(&volume), 0o777);
        // What a container did to it (here: chmod) survives its restart.
        std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        create_world_writable(&volume, None).await.expect("kept");
        assert_eq!(mode(&volume), 0o700);
    }
}
