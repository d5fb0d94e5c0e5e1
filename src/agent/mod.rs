//! The agent: takes the pods its owners assign it when they fit and its policy allows
//! them (and bids for the offers it fits), runs them under Podman,
//! reports their status to their owners, and heartbeats its free capacity.

mod addresses;
pub mod admission;
mod direct;
pub mod egress;
pub mod enroll;
mod eviction;
mod health;
mod hook;
mod kubelet;
pub mod lease;
pub mod memory;
pub mod probe;
mod routes;
mod runtime_events;
pub mod status;
pub(crate) mod store;
mod subpath;
mod supervisor;
mod termination;
mod volumes;
pub mod watchdog;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use libp2p::PeerId;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audit::{self, Outcome};
use crate::fencing::boottime_ms;
use crate::mesh::{MeshError, MeshEvent, MeshEvents, MeshHandle};
use crate::metrics::Metrics;
use crate::placement::{self, AgentCapacity};
use crate::runtime::translate;
use crate::runtime::{labels, Runtime, RuntimeError};
use crate::trust::replay::{unix_millis, Sequencer};
use crate::trust::statement;
use crate::trust::TrustedPeers;
use crate::wire::{
    self, AgentEvent, AgentHealth, Assign, Bid, Epoch, GossipMessage, Heartbeat, HostedPod,
    MeshView, Offer, PeerRef, PodRef, PodUid, Release, Renew, Request, Resources, Response,
    SignedAssignment, StatusReport, WireError,
};
use admission::{Policy, Refusal, RefusedSpecs};
use enroll::{Enrollment, JoinOutcome};
use lease::{Lease, LeaseBook, SeatAttempt, SeatLease, SeatNews, LEASES_FILE, SEAT_LEASE_MS};
use store::{create_private_dir, AssignmentStore};
use supervisor::{NetworkGrant, Provided, WorkerContext, WorkerHandle, WorkerUpdate};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("Podman request failed")]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot create the volumes directory {path}")]
    VolumesDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--secrets-dir {0} is not in memory-backed storage: the pods' secrets must never \
         reach a disk; mount a tmpfs there (mount -t tmpfs -o mode=0700 tmpfs {0}) or name a \
         directory on one (systemd: RuntimeDirectory=; /dev/shm)"
    )]
    SecretsOnDisk(String),
    #[error("cannot use --secrets-dir {path}")]
    SecretsDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node {node} refused the join token: {reason}")]
    JoinRefused { node: PeerId, reason: String },
    #[error("cannot keep the node joined: {0}")]
    Pin(#[from] crate::trust::store::StoreError),
}

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    /// Memory-backed directory for what may hold secrets: the volumes of files from
    /// the API and the assignment records (with env values from secrets).
    pub secrets_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub heartbeat_interval: Duration,
    /// Statuses are re-sent this often even when nothing changed.
    pub resync_interval: Duration,
    /// A pod whose owner has not been heard from this long is stopped.
    pub owner_gone_after: Duration,
    /// The address pods see as `status.hostIP`.
    pub host_ip: Option<IpAddr>,
    /// Size of the filesystem holding the state directory (the node's ephemeral-storage).
    pub storage_bytes: u64,
    /// Starts the process that removes strict pods' copies if this agent cannot stop
    /// them when their leases run out (none: only the agent itself fences).
    pub fence_watchdog: Option<watchdog::Launcher>,
    /// What this host agrees to run, whoever asks (`--policy-file`).
    pub policy: Arc<Policy>,
    /// How the Raft groups of stateful workloads run.
    pub groups: crate::raft::GroupConfig,
}

/// A pod this agent runs.
struct Hosted {
    pod: PodRef,
    requests: Resources,
    host_ports: Vec<u16>,
    /// The owner's signed assignment, shown with every status report.
    statement: SignedAssignment,
    worker: WorkerHandle,
    status: Option<PodStatus>,
    stopping: bool,
    /// Its termination grace period.
    grace: Duration,
    /// Where its owner put it on the mesh (see [`Provided::network`]).
    network: NetworkGrant,
}

impl Hosted {
    fn owner(&self) -> PeerId {
        self.statement.owner.0
    }

    fn epoch(&self) -> Epoch {
        self.statement.epoch
    }

    /// Succeeded or Failed: its containers are done and will not start again, so it
    /// holds no capacity (the kubelet admits against active pods only).
    fn finished(&self) -> bool {
        let phase = self.status.as_ref().and_then(|s| s.phase.as_deref());
        matches!(phase, Some("Succeeded" | "Failed"))
    }

    fn phase(&self) -> String {
        if self.stopping {
            return "Terminating".into();
        }
        self.status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Pending".into())
    }
}

/// A Podman pod of this agent found without its assignment record: left alone while
/// its owner is asked, through the heartbeats, whether it still wants it here.
struct Unrecorded {
    pod: PodRef,
    owner: PeerId,
    epoch: Epoch,
    runtime_pod: crate::runtime::RuntimePod,
}

/// What pods take, counting one pod each.
fn requested<'a>(pods: impl Iterator<Item = &'a Hosted>) -> Resources {
    pods.fold(Resources::default(), |used, hosted| {
        used.saturating_add(Resources {
            pods: 1,
            ..hosted.requests
        })
    })
}

/// How soon after a new connection the next heartbeat goes out.
const HEARTBEAT_AFTER_CONNECT: Duration = Duration::from_millis(500);

/// How often strict pods' leases are checked: a copy stops within this of its time.
const LEASE_CHECK: Duration = Duration::from_millis(250);

/// Results of spawned tasks, fed back into the agent loop.
enum Internal {
    Superseded {
        uid: PodUid,
        epoch: Epoch,
    },
    Join(JoinOutcome),
    /// The outcome of a health check.
    Health(AgentHealth),
    /// An owner answered.
    Heard(PeerId),
    /// An owner's answer to a lease renewal sent at `sent_ms` (None: no answer).
    Renewed {
        owner: PeerId,
        sent_ms: u64,
        answer: Option<Response>,
    },
    /// A group's answer to a seat attempt sent at `sent_ms`.
    Seat {
        uid: PodUid,
        sent_ms: u64,
        outcome: crate::raft::kv::Outcome,
    },
}

pub struct Agent {
    config: AgentConfig,
    mesh: MeshHandle,
    runtime: Arc<dyn Runtime>,
    /// The owners whose work this agent runs.
    owners: TrustedPeers,
    metrics: Metrics,
    store: AssignmentStore,
    pods: HashMap<PodUid, Hosted>,
    unrecorded: HashMap<PodUid, Unrecorded>,
    leases: LeaseBook,
    /// The fence watchdog could not be started (said once, until it can).
    watchdog_failing: bool,
    /// As the last check found it.
    health: AgentHealth,
    /// A health check is under way (a slow runtime gets one at a time).
    checking_health: bool,
    /// When each owner was last heard from (trusted owners only).
    owner_heard: HashMap<PeerId, Instant>,
    /// Specs the policy refused: not bid for again.
    refused: RefusedSpecs,
    enrollment: Option<Enrollment>,
    connected: std::collections::BTreeSet<PeerId>,
    sequencer: Arc<Sequencer>,
    /// Pods the last heartbeat had room for besides those it listed (see
    /// `wire::heartbeat_room`): capacity beyond it is not offered.
    heartbeat_room: u64,
    /// A heartbeat was too large to send (said once, until one goes out).
    heartbeat_too_large: bool,
    worker_ctx: WorkerContext,
    updates: mpsc::Receiver<WorkerUpdate>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    started: Instant,
}

impl Agent {
    /// `owners` are the owners whose work this agent runs; `enrollment`, a join to
    /// make, whose node becomes one of them.
    pub fn new(
        config: AgentConfig,
        mesh: MeshHandle,
        runtime: Arc<dyn Runtime>,
        owners: TrustedPeers,
        enrollment: Option<Enrollment>,
        metrics: Metrics,
    ) -> Result<Agent, AgentError> {
        create_private_dir(&config.secrets_dir).map_err(|source| AgentError::SecretsDir {
            path: config.secrets_dir.clone(),
            source,
        })?;
        match store::is_memory_backed(&config.secrets_dir) {
            Ok(true) => {}
            Ok(false) => {
                return Err(AgentError::SecretsOnDisk(
                    config.secrets_dir.display().to_string(),
                ))
            }
            Err(source) => {
                return Err(AgentError::SecretsDir {
                    path: config.secrets_dir.clone(),
                    source,
                })
            }
        }
        let store = AssignmentStore::open(&config.secrets_dir)?;
        let leases = match std::fs::read(config.secrets_dir.join(LEASES_FILE)) {
            Ok(bytes) => LeaseBook::from_json(&bytes).unwrap_or_else(|e| {
                // Adoption then stops every strict pod: no lease, no copy.
                tracing::warn!(error = %e, "unreadable lease file; strict pods found will be stopped");
                LeaseBook::default()
            }),
            Err(_) => LeaseBook::default(),
        };
        // Nobody else on the host may look in: containers reach their own volume
        // through its bind mount.
        let volumes_root = config.state_dir.join("volumes");
        let files_root = config.secrets_dir.join("volumes");
        for dir in [&volumes_root, &files_root] {
            create_private_dir(dir).map_err(|source| AgentError::VolumesDir {
                path: dir.clone(),
                source,
            })?;
        }
        let (updates_tx, updates) = mpsc::channel(256);
        let (internal_tx, internal_rx) = mpsc::channel(256);
        let addresses = addresses::PodAddresses::default();
        let worker_ctx = WorkerContext {
            runtime: runtime.clone(),
            agent: mesh.local_peer_id(),
            volumes_root,
            files_root,
            host_ip: config.host_ip,
            node_name: mesh.local_peer_id().to_string(),
            updates: updates_tx,
            metrics: metrics.clone(),
            policy: config.policy.clone(),
            setups: Arc::new(tokio::sync::Semaphore::new(supervisor::SETUP_CONCURRENCY)),
            addresses: addresses.clone(),
            egress: egress::Egress::new(
                mesh.clone(),
                metrics.clone(),
                direct::DirectEndpoints {
                    runtime: runtime.clone(),
                    addresses,
                    owners: owners.clone(),
                    me: mesh.local_peer_id(),
                    metrics: metrics.clone(),
                },
                CancellationToken::new(),
            ),
            groups: crate::raft::Groups::new(
                mesh.local_peer_id(),
                mesh.clone(),
                owners.clone(),
                config.state_dir.join("groups"),
                config.groups.clone(),
                metrics.clone(),
            ),
        };
        Ok(Agent {
            config,
            mesh,
            runtime,
            owners,
            metrics,
            store,
            pods: HashMap::new(),
            unrecorded: HashMap::new(),
            leases,
            watchdog_failing: false,
            health: AgentHealth::default(),
            checking_health: false,
            owner_heard: HashMap::new(),
            refused: RefusedSpecs::default(),
            enrollment,
            connected: Default::default(),
            sequencer: Arc::new(Sequencer::default()),
            heartbeat_room: u64::MAX,
            heartbeat_too_large: false,
            worker_ctx,
            updates,
            internal_tx,
            internal_rx,
            started: Instant::now(),
        })
    }

    /// Adopts this agent's pods from Podman, then serves the mesh until cancelled.
    /// Pods keep running when the agent stops; the next start adopts them.
    pub async fn run(
        mut self,
        mut events: MeshEvents,
        cancel: CancellationToken,
    ) -> Result<(), AgentError> {
        if let Err(e) = self.worker_ctx.egress.reset().await {
            tracing::warn!(error = %e, "cannot set up cluster redirects: mesh pods cannot reach their clusters' Services");
        }
        self.adopt().await?;
        let kubelet = kubelet::serve(
            self.mesh.clone(),
            self.runtime.clone(),
            self.worker_ctx.addresses.clone(),
            self.owners.clone(),
            self.metrics.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = kubelet.await {
                tracing::error!(error = %e, "cannot serve kubelet streams");
            }
        });
        let direct = self
            .worker_ctx
            .egress
            .endpoints()
            .serve(self.mesh.clone(), cancel.clone());
        tokio::spawn(async move {
            if let Err(e) = direct.await {
                tracing::error!(error = %e, "cannot serve other agents' connections to Services' endpoints");
            }
        });
        let groups = self.worker_ctx.groups.clone().serve(cancel.clone());
        tokio::spawn(async move {
            if let Err(e) = groups.await {
                tracing::error!(error = %e, "cannot serve the Raft groups of stateful workloads");
            }
        });
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval);
        let mut resync = tokio::time::interval(self.config.resync_interval);
        resync.reset();
        let mut health_check = tokio::time::interval(health::CHECK_INTERVAL);
        health_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.metrics.runtime_healthy.set(1);
        let mut lease_check = tokio::time::interval(LEASE_CHECK);
        lease_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut container_events = runtime_events::follow(
            self.runtime.clone(),
            self.mesh.local_peer_id().to_string(),
            cancel.clone(),
        );
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(signal) = container_events.recv() => self.on_container_signal(signal),
                Some(event) = events.recv() => {
                    if matches!(event, MeshEvent::PeerConnected(_)) {
                        // Let a new peer learn of us without waiting a whole period; the
                        // delay leaves time for gossipsub to exchange subscriptions.
                        heartbeat.reset_after(HEARTBEAT_AFTER_CONNECT);
                    }
                    self.on_mesh_event(event).await
                }
                Some(update) = self.updates.recv() => self.on_update(update).await,
                Some(internal) = self.internal_rx.recv() => match internal {
                    Internal::Superseded { uid, epoch } => self.stop_superseded(&uid, epoch),
                    Internal::Renewed { owner, sent_ms, answer } => {
                        if answer.is_some() {
                            self.heard(owner);
                        }
                        self.on_renewed(owner, sent_ms, answer)
                    }
                    Internal::Seat { uid, sent_ms, outcome } => self.on_seat(&uid, sent_ms, &outcome),
                    Internal::Heard(owner) => self.heard(owner),
                    Internal::Health(health) => {
                        self.checking_health = false;
                        if self.on_health(health) {
                            // The node learns of it now, not a period later.
                            heartbeat.reset_after(HEARTBEAT_AFTER_CONNECT);
                        }
                    }
                    Internal::Join(outcome) => {
                        if self.on_join(outcome).await? {
                            // The node learns of us now, not a period later.
                            heartbeat.reset_after(HEARTBEAT_AFTER_CONNECT);
                        }
                    }
                },
                _ = heartbeat.tick() => {
                    self.publish_heartbeat().await;
                    // A join that got no answer is tried again.
                    for peer in self.connected.clone() {
                        self.try_join(peer);
                    }
                }
                _ = resync.tick() => {
                    self.stop_orphans();
                    self.resync(None);
                }
                _ = lease_check.tick() => self.check_leases(),
                _ = health_check.tick() => self.check_health(),
            }
        }
        // The pods run on; their cluster connections fail until the next start.
        self.worker_ctx.egress.stop().await;
        Ok(())
    }

    /// Picks up the Podman pods this agent created before it restarted. A pod without
    /// its assignment record is kept while its owner is asked (see [`Unrecorded`]); one
    /// whose record is for another epoch, or that names no owner it trusts, is removed.
    async fn adopt(&mut self) -> Result<(), AgentError> {
        let me = self.mesh.local_peer_id().to_string();
        let found = self.runtime.list_pods(labels::AGENT, &me).await?;
        for existing in found {
            let uid = existing.labels.get(labels::POD_UID).cloned().map(PodUid);
            let epoch = existing
                .labels
                .get(labels::EPOCH)
                .and_then(|e| e.parse().ok())
                .map(Epoch);
            let record = match &uid {
                Some(uid) => self.store.load(uid).await,
                None => None,
            };
            let (Some(uid), Some(epoch)) = (uid, epoch) else {
                tracing::warn!(podman_pod = %existing.name, "removing a pod without BeeMesh labels");
                let _ = self.runtime.remove_pod(&existing.id).await;
                continue;
            };
            let Some(record) = record else {
                match self.unrecorded_pod(uid, epoch, existing) {
                    Ok(()) => {}
                    Err(existing) => {
                        tracing::warn!(podman_pod = %existing.name, "removing a pod with no assignment record and no trusted owner");
                        let _ = self.runtime.remove_pod(&existing.id).await;
                    }
                }
                continue;
            };
            if record.epoch() != epoch || self.pods.contains_key(&uid) {
                tracing::warn!(podman_pod = %existing.name, "removing pod of a superseded epoch");
                let _ = self.runtime.remove_pod(&existing.id).await;
                continue;
            }
            let Ok(pod_ref) = translate::pod_ref(&record.pod) else {
                let _ = self.runtime.remove_pod(&existing.id).await;
                continue;
            };
            // The policy may have been tightened while the agent was down: what it no
            // longer allows stops, and its owner places it elsewhere.
            if let Err(refusal) = self.config.policy.admit(&record.pod) {
                tracing::warn!(pod = %pod_ref, rule = %refusal.rule, %refusal, "removing a pod the policy no longer allows");
                self.metrics.policy_refused(&refusal.rule);
                self.refused
                    .insert(uid.clone(), statement::spec_digest(&record.pod));
                let _ = self.runtime.remove_pod(&existing.id).await;
                self.store.remove(&uid).await;
                continue;
            }
            tracing::info!(pod = %pod_ref, %epoch, "adopting pod after restart");
            if let Some(lease_ms) = record.lease_ms {
                if self.leases.get(&uid).is_none_or(|l| l.epoch != epoch) {
                    // When it was last renewed is not known: it may have run out.
                    tracing::warn!(pod = %pod_ref, "strict pod without a lease record; stopping it");
                    self.leases.take(
                        uid.clone(),
                        Lease {
                            owner: record.statement.owner,
                            epoch,
                            lease_ms,
                            expires_at_ms: 0,
                            grace_ms: 0,
                            fenced: false,
                            seat: None,
                        },
                    );
                }
            }
            let network = record.network();
            self.host(
                pod_ref,
                record.pod,
                Provided {
                    volumes: BTreeMap::new(),
                    network,
                    pull_credentials: record.pull_credentials,
                    // From the lease, by `host`.
                    gate: None,
                },
                record.statement,
                Some(existing),
            );
        }
        // A pod found without its record keeps its lease too: it runs out unless the
        // owner claims the pod first (a strict copy must not outlive it unclaimed).
        let (pods, unrecorded) = (&self.pods, &self.unrecorded);
        self.leases.retain(|uid, lease| {
            pods.get(uid).is_some_and(|h| h.epoch() == lease.epoch)
                || unrecorded.get(uid).is_some_and(|u| u.epoch == lease.epoch)
        });
        self.save_leases();
        self.metrics.pods.set(self.pods.len() as i64);
        Ok(())
    }

    /// Wakes the supervisor of the pod copy whose container changed (all of them after
    /// a gap in the event stream).
    fn on_container_signal(&self, signal: runtime_events::Signal) {
        match signal {
            runtime_events::Signal::Changed(event) => {
                if let Some(hosted) = self.pods.get(&event.pod) {
                    if hosted.epoch() == event.epoch {
                        hosted.worker.poke();
                    }
                }
            }
            runtime_events::Signal::Resubscribed => {
                for hosted in self.pods.values() {
                    hosted.worker.poke();
                }
            }
        }
    }

    fn heard(&mut self, owner: PeerId) {
        if self.owners.trusts(&owner) {
            self.owner_heard.insert(owner, Instant::now());
        }
    }

    /// Stops the pods of owners not heard from for `owner_gone_after`: not connected
    /// (a live connection is pinged) and silent since (or since this agent started).
    fn stop_orphans(&mut self) {
        for owner in self.connected.clone() {
            self.heard(owner);
        }
        let limit = self.config.owner_gone_after;
        let started = self.started;
        let heard = &self.owner_heard;
        for hosted in self.pods.values_mut() {
            let last = heard.get(&hosted.owner()).copied().unwrap_or(started);
            if hosted.stopping || last.elapsed() < limit {
                continue;
            }
            tracing::warn!(pod = %hosted.pod, owner = %hosted.owner(), silent_secs = last.elapsed().as_secs(), "owner not heard from for --owner-gone-seconds; stopping its pod");
            audit::record(
                &self.metrics,
                "owner_gone",
                Outcome::Allowed,
                &hosted.owner(),
                Some(&hosted.pod),
                &format_args!("not heard from for {} s", last.elapsed().as_secs()),
            );
            hosted.stopping = true;
            hosted.worker.stop(hosted.grace);
        }
        let gone: Vec<PodUid> = self
            .unrecorded
            .iter()
            .filter(|(_, u)| heard.get(&u.owner).copied().unwrap_or(started).elapsed() >= limit)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            if let Some(found) = self.unrecorded.remove(&uid) {
                tracing::warn!(pod = %found.pod, owner = %found.owner, "owner of a pod found without its record not heard from; removing it");
                // Its grace period is in the lost record: the kubelet's default.
                self.remove_runtime_pod(found.runtime_pod, Duration::from_secs(30));
            }
        }
    }

    /// Checks the runtime and samples the host in the background.
    fn check_health(&mut self) {
        if std::mem::replace(&mut self.checking_health, true) {
            return;
        }
        let runtime = self.runtime.clone();
        let agent = self.mesh.local_peer_id().to_string();
        let state_dir = self.config.state_dir.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let mut health = AgentHealth {
                runtime_error: health::check_runtime(runtime, agent).await.err(),
                ..AgentHealth::default()
            };
            match health::sample(&state_dir) {
                Ok(sample) => health::judge_pressure(&sample, &mut health),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot sample the host's memory, disk and PIDs")
                }
            }
            let _ = internal.send(Internal::Health(health)).await;
        });
    }

    /// Takes a health check's outcome; true if it changed.
    fn on_health(&mut self, health: AgentHealth) -> bool {
        if health == self.health {
            return false;
        }
        match (&self.health.runtime_error, &health.runtime_error) {
            (None, Some(error)) => {
                tracing::error!(%error, "container runtime fails its checks: taking no pods until it recovers")
            }
            (Some(_), None) => tracing::info!("container runtime recovered"),
            _ => {}
        }
        for (name, was, is) in [
            (
                "memory",
                self.health.memory_pressure,
                health.memory_pressure,
            ),
            ("disk", self.health.disk_pressure, health.disk_pressure),
            ("PID", self.health.pid_pressure, health.pid_pressure),
        ] {
            if is && !was {
                tracing::warn!("under {name} pressure: taking no new pods");
            } else if was && !is {
                tracing::info!("{name} pressure over");
            }
        }
        self.metrics
            .runtime_healthy
            .set(i64::from(health.runtime_error.is_none()));
        self.health = health;
        true
    }

    /// Keeps a pod found without its record, if its labels name a trusted owner.
    fn unrecorded_pod(
        &mut self,
        uid: PodUid,
        epoch: Epoch,
        existing: crate::runtime::RuntimePod,
    ) -> Result<(), crate::runtime::RuntimePod> {
        let label = |key| existing.labels.get(key).cloned();
        let owner = label(labels::OWNER).and_then(|o| o.parse::<PeerId>().ok());
        let (Some(owner), Some(namespace), Some(name)) =
            (owner, label(labels::POD_NAMESPACE), label(labels::POD_NAME))
        else {
            return Err(existing);
        };
        if !self.owners.trusts(&owner) {
            return Err(existing);
        }
        let pod = PodRef {
            uid: uid.clone(),
            namespace,
            name,
        };
        tracing::warn!(%pod, %epoch, %owner, "pod found without its assignment record; asking its owner");
        self.unrecorded.insert(
            uid,
            Unrecorded {
                pod,
                owner,
                epoch,
                runtime_pod: existing,
            },
        );
        Ok(())
    }

    /// Removes a Podman pod in the background (a stale or unwanted copy), its
    /// containers stopped first with `grace`.
    fn remove_runtime_pod(&self, runtime_pod: crate::runtime::RuntimePod, grace: Duration) {
        let runtime = self.runtime.clone();
        tokio::spawn(async move {
            let removed =
                crate::runtime::stop_and_remove(runtime.as_ref(), &runtime_pod, grace).await;
            if let Err(e) = removed {
                tracing::warn!(podman_pod = %runtime_pod.name, error = %e, "cannot remove pod");
            }
        });
    }

    /// Writes the leases where a restarted agent finds them. A small file on a
    /// memory-backed filesystem: written in place of the loop's work, not spawned, so
    /// that writes cannot cross.
    fn save_leases(&self) {
        let path = self.config.secrets_dir.join(LEASES_FILE);
        if let Err(e) = crate::durable::write_atomically(&path, &self.leases.to_json(), 0o600) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the lease file");
        }
    }

    /// Stops the strict pods whose leases run out, and asks owners to renew the rest.
    fn check_leases(&mut self) {
        if self.leases.is_empty() {
            return;
        }
        if let Some(launcher) = &self.config.fence_watchdog {
            let failing = match launcher.ensure_running() {
                Ok(started) => {
                    if started {
                        tracing::info!("fence watchdog started");
                    }
                    false
                }
                Err(e) => {
                    if !self.watchdog_failing {
                        tracing::error!(error = %e, "no fence watchdog: strict pods stop only while this agent runs");
                    }
                    true
                }
            };
            self.watchdog_failing = failing;
        }
        let now = boottime_ms();
        let fenced = self.leases.fence(now);
        for (uid, grace, by_seat) in &fenced {
            if let Some(found) = self.unrecorded.remove(uid) {
                tracing::warn!(pod = %found.pod, epoch = %found.epoch, "lease ran out before the owner claimed the pod found without its record; removing it");
                self.metrics.pods_fenced.inc();
                self.leases.remove(uid);
                self.remove_runtime_pod(found.runtime_pod, Duration::ZERO);
                continue;
            }
            let Some(hosted) = self.pods.get_mut(uid) else {
                continue;
            };
            self.metrics.pods_fenced.inc();
            let cause = if *by_seat {
                "its group did not renew its seat"
            } else {
                "the owner did not renew its lease"
            };
            tracing::warn!(pod = %hosted.pod, epoch = %hosted.epoch(), owner = %hosted.owner(), cause, "stopping this copy (fenced)");
            audit::record(
                &self.metrics,
                "fence",
                Outcome::Allowed,
                &hosted.owner(),
                Some(&hosted.pod),
                &format_args!("epoch {}: {cause}", hosted.epoch()),
            );
            hosted.stopping = true;
            hosted.worker.stop(*grace);
        }
        for (owner, uids) in self.leases.due(now) {
            let leases = uids
                .iter()
                .filter_map(|uid| self.pods.get(uid).map(|h| h.statement.clone()))
                .collect();
            let mesh = self.mesh.clone();
            let internal = self.internal_tx.clone();
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                let answer = match mesh.request(owner, Request::Renew(Renew { leases })).await {
                    Ok(answer) => Some(answer),
                    Err(e) => {
                        metrics.request_failed("renew");
                        tracing::debug!(%owner, error = %e, "lease renewal not answered");
                        None
                    }
                };
                let _ = internal
                    .send(Internal::Renewed {
                        owner,
                        sent_ms: now,
                        answer,
                    })
                    .await;
            });
        }
        for (uid, attempt) in self.leases.seats_due(now) {
            self.propose_seat(uid, attempt, now);
        }
        if !fenced.is_empty() {
            self.save_leases();
        }
    }

    /// Proposes a seat attempt to the pod's group; its answer comes back to the loop.
    fn propose_seat(&self, uid: PodUid, attempt: SeatAttempt, sent_ms: u64) {
        let groups = self.worker_ctx.groups.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let SeatAttempt { group, command } = attempt;
            // An answer later than a third of a seat lease is of no use: the next
            // attempt is out by then.
            let proposed = tokio::time::timeout(
                Duration::from_millis(SEAT_LEASE_MS / 3),
                groups.propose(&group, command),
            )
            .await;
            let outcome = match proposed {
                Ok(Ok((_, outcome))) => outcome,
                Ok(Err(e)) => {
                    tracing::debug!(%group, error = %e, "seat attempt not answered");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%group, "seat attempt timed out");
                    return;
                }
            };
            let _ = internal
                .send(Internal::Seat {
                    uid,
                    sent_ms,
                    outcome,
                })
                .await;
        });
    }

    fn on_seat(&mut self, uid: &PodUid, sent_ms: u64, outcome: &crate::raft::kv::Outcome) {
        let Some(news) = self
            .leases
            .seat_answered(uid, sent_ms, boottime_ms(), outcome)
        else {
            return;
        };
        let Some(hosted) = self.pods.get(uid) else {
            return;
        };
        match news {
            SeatNews::Seated => {
                tracing::info!(pod = %hosted.pod, epoch = %hosted.epoch(), "the pod's group seated this copy; its containers start");
                self.save_leases();
                hosted.worker.open_gate();
            }
            SeatNews::Waiting(message) => hosted.worker.close_gate(message),
            SeatNews::Lost => {
                tracing::warn!(pod = %hosted.pod, epoch = %hosted.epoch(), "another copy took this pod's seat in its group");
                self.save_leases();
                self.check_leases();
            }
        }
    }

    /// Gives a removed copy's seat back, so that the next copy need not wait for it to
    /// run out.
    fn unseat(&self, owner: PeerId, seat: SeatLease) {
        if !seat.seated() {
            return;
        }
        let groups = self.worker_ctx.groups.clone();
        let (group, command) = (seat.group_key(owner), seat.unseat());
        tokio::spawn(async move {
            let given = tokio::time::timeout(
                Duration::from_millis(SEAT_LEASE_MS),
                groups.propose(&group, command),
            )
            .await;
            if !matches!(given, Ok(Ok(_))) {
                tracing::debug!(%group, "seat not given back; it runs out instead");
            }
        });
    }

    fn on_renewed(&mut self, owner: PeerId, sent_ms: u64, answer: Option<Response>) {
        match answer {
            Some(Response::Leases {
                granted,
                refused,
                lease_ms,
            }) => {
                self.leases
                    .renewed(owner, sent_ms, boottime_ms(), &granted, &refused, lease_ms);
                self.save_leases();
                // Refused copies stop at the next check.
                self.check_leases();
            }
            Some(other) => tracing::warn!(%owner, answer = ?other, "owner did not renew leases"),
            // The next renewal is due a third of a lease after this one was sent.
            None => {}
        }
    }

    /// Starts supervising a pod (new, or adopted from Podman) and accounts for it.
    fn host(
        &mut self,
        pod_ref: PodRef,
        pod: k8s_openapi::api::core::v1::Pod,
        provided: Provided,
        statement: SignedAssignment,
        adopted: Option<crate::runtime::RuntimePod>,
    ) {
        // Validated before (assign) or when first assigned (adopt).
        let requests = translate::pod_requests(&pod).unwrap_or_default();
        let host_ports = translate::host_ports(&pod);
        let grace = Duration::from_secs(translate::grace_period_secs(&pod));
        let network = provided.network.clone();
        // A copy waiting for its seat starts no container until it has it.
        let gate = self
            .leases
            .get(&pod_ref.uid)
            .and_then(|lease| lease.seat.as_ref())
            .filter(|seat| !seat.seated())
            .map(SeatLease::waiting_message);
        let worker = supervisor::spawn(
            self.worker_ctx.clone(),
            pod_ref.clone(),
            pod,
            Provided { gate, ..provided },
            statement.epoch,
            statement.owner.0,
            adopted,
        );
        self.pods.insert(
            pod_ref.uid.clone(),
            Hosted {
                pod: pod_ref,
                requests,
                host_ports,
                statement,
                worker,
                status: None,
                stopping: false,
                grace,
                network,
            },
        );
        self.metrics.pods.set(self.pods.len() as i64);
    }

    fn capacity(&self, except: Option<&PodUid>) -> AgentCapacity {
        let active = || self.active_pods(except);
        let mut free = self.config.capacity.saturating_sub(requested(active()));
        free.pods = free.pods.min(self.heartbeat_room);
        AgentCapacity {
            labels: Arc::new(self.config.labels.clone()),
            capacity: self.config.capacity,
            free,
            used_host_ports: active()
                .flat_map(|hosted| hosted.host_ports.iter().copied())
                .collect(),
            health: self.health.clone(),
        }
    }

    /// The pods that hold capacity here, but `except`.
    fn active_pods<'a>(&'a self, except: Option<&'a PodUid>) -> impl Iterator<Item = &'a Hosted> {
        self.pods
            .iter()
            .filter(move |(uid, hosted)| Some(*uid) != except && !hosted.finished())
            .map(|(_, hosted)| hosted)
    }

    async fn on_mesh_event(&mut self, event: MeshEvent) {
        match event {
            MeshEvent::Gossip {
                source,
                message: GossipMessage::Offer(offer),
            } => self.on_offer(source, offer),
            // Agents do not subscribe to heartbeats; the mesh delivers none.
            MeshEvent::Gossip {
                message: GossipMessage::Heartbeat(_),
                ..
            } => {}
            MeshEvent::Request {
                peer,
                request,
                reply,
            } => {
                let response = self.on_request(peer, request).await;
                let _ = reply.send(response);
            }
            MeshEvent::PeerConnected(peer) => {
                self.connected.insert(peer);
                self.try_join(peer);
                // An owner that (re)connects hears at once what runs for it: after its
                // restart, that is how it finds its placements again.
                self.resync(Some(peer));
            }
            MeshEvent::PeerDisconnected(peer) => {
                self.connected.remove(&peer);
                // Heard until now: the connection was kept alive by pings.
                self.heard(peer);
            }
        }
    }

    /// Starts a join with `peer` if one is pending and the peer may be the node.
    fn try_join(&mut self, peer: PeerId) {
        let Some(enrollment) = self.enrollment.as_mut() else {
            return;
        };
        if !enrollment.should_try(&peer) {
            return;
        }
        enrollment.set_in_flight(true);
        let attempt = enrollment.attempt(self.mesh.clone(), peer);
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let _ = internal.send(Internal::Join(attempt.await)).await;
        });
    }

    /// Takes a join's outcome; true when this agent has joined now.
    async fn on_join(&mut self, outcome: JoinOutcome) -> Result<bool, AgentError> {
        let Some(enrollment) = self.enrollment.as_mut() else {
            return Ok(false);
        };
        enrollment.set_in_flight(false);
        match outcome {
            JoinOutcome::Joined(node) => {
                enrollment.pin(node)?;
                self.owners.enroll(node);
                self.enrollment = None;
                self.mesh.trust_changed().await;
                audit::record(
                    &self.metrics,
                    "join",
                    Outcome::Allowed,
                    &node,
                    None,
                    &"node enrolled this agent; its peer ID is pinned",
                );
                Ok(true)
            }
            JoinOutcome::Refused { node, reason } => {
                audit::record(
                    &self.metrics,
                    "join",
                    Outcome::Refused,
                    &node,
                    None,
                    &reason,
                );
                if self.owners.is_empty() {
                    return Err(AgentError::JoinRefused { node, reason });
                }
                self.enrollment = None;
                Ok(false)
            }
            JoinOutcome::Failed { node, reason } => {
                tracing::warn!(%node, %reason, "join not answered; trying again");
                Ok(false)
            }
        }
    }

    fn on_offer(&mut self, owner: PeerId, offer: Offer) {
        if !self.owners.trusts(&owner) {
            self.metrics.dropped("offer", "untrusted");
            return;
        }
        self.heard(owner);
        if let Some(hosted) = self.pods.get(&offer.pod.uid) {
            if hosted.epoch() >= offer.epoch || hosted.owner() != owner {
                return;
            }
        }
        tracing::debug!(pod = %offer.pod, epoch = %offer.epoch, "offer received");
        if self.refused.contains(&offer.pod.uid, &offer.spec_digest) {
            tracing::debug!(pod = %offer.pod, "not bidding: the policy refused this spec");
            return;
        }
        let capacity = self.capacity(Some(&offer.pod.uid));
        let misfits = placement::misfits(&offer, &capacity);
        if !misfits.is_empty() {
            tracing::debug!(pod = %offer.pod, ?misfits, "not bidding");
            return;
        }
        let used = self.used_by(&owner, &offer.pod.uid);
        if let Err(refusal) = self.config.policy.quota(&owner, used, offer.requests) {
            tracing::debug!(pod = %offer.pod, %refusal, "not bidding");
            return;
        }
        let bid = Bid {
            pod: offer.pod.uid.clone(),
            epoch: offer.epoch,
        };
        let mesh = self.mesh.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = mesh.request(owner, Request::Bid(bid)).await {
                metrics.request_failed("bid");
                tracing::debug!(pod = %offer.pod, error = %e, "bid not delivered");
            }
        });
    }

    async fn on_request(&mut self, peer: PeerId, request: Request) -> Response {
        let kind = request.kind();
        let for_owners = matches!(
            request,
            Request::Assign(_) | Request::Release(_) | Request::Query | Request::Group(_)
        );
        if for_owners && !self.owners.trusts(&peer) {
            self.metrics.dropped(kind, "untrusted");
            audit::record(
                &self.metrics,
                kind,
                Outcome::Refused,
                &peer,
                None,
                &"owner not trusted",
            );
            return Response::Declined {
                reason: format!("owner {peer} is not trusted by this agent"),
            };
        }
        if for_owners {
            self.heard(peer);
        }
        match request {
            Request::Assign(assign) => self.on_assign(peer, *assign).await,
            Request::Release(release) => self.on_release(peer, release),
            Request::Query => Response::View(Box::new(self.view(peer))),
            Request::Group(word) => self.worker_ctx.groups.on_word(peer, *word).await,
            Request::Bid(_)
            | Request::Status(_)
            | Request::Join(_)
            | Request::Renew(_)
            | Request::ClusterDns(_)
            | Request::Route(_) => Response::Error {
                message: "this peer is an agent; bids, status reports and joins go to nodes".into(),
            },
        }
    }

    /// Refuses a pod the policy does not allow, and remembers its spec so that no bid
    /// goes out for it again.
    fn refuse_by_policy(
        &mut self,
        owner: PeerId,
        pod_ref: &PodRef,
        pod: &Pod,
        refusal: Refusal,
    ) -> Response {
        tracing::warn!(pod = %pod_ref, %owner, rule = %refusal.rule, %refusal, "pod refused by the policy");
        self.metrics.policy_refused(&refusal.rule);
        self.refused
            .insert(pod_ref.uid.clone(), statement::spec_digest(pod));
        self.refuse_assign(owner, pod_ref, "policy", refusal.to_string())
    }

    /// What an owner's pods other than `except` take here, as quotas count it.
    fn used_by(&self, owner: &PeerId, except: &PodUid) -> Resources {
        requested(
            self.active_pods(Some(except))
                .filter(|hosted| hosted.owner() == *owner),
        )
    }

    /// Refuses an assignment: counted, audited, answered with the reason.
    fn refuse_assign(
        &self,
        owner: PeerId,
        pod: &dyn std::fmt::Display,
        kind: &str,
        reason: String,
    ) -> Response {
        self.metrics.dropped("assign", kind);
        audit::record(
            &self.metrics,
            "assign",
            Outcome::Refused,
            &owner,
            Some(pod),
            &reason,
        );
        Response::Declined { reason }
    }

    async fn on_assign(&mut self, owner: PeerId, assign: Assign) -> Response {
        let me = self.mesh.local_peer_id();
        let uid = PodUid(assign.pod.metadata.uid.clone().unwrap_or_default());
        if let Err(e) = statement::verify_assign(
            &assign.statement,
            &owner,
            &me,
            &assign.pod,
            assign.epoch,
            unix_millis() / 1000,
        ) {
            return self.refuse_assign(owner, &uid, e.kind(), e.to_string());
        }
        let pod_ref = match translate::pod_ref(&assign.pod) {
            Ok(r) => r,
            Err(e) => {
                return Response::Declined {
                    reason: e.to_string(),
                }
            }
        };
        if let Err(refusal) = self.config.policy.admit(&assign.pod) {
            return self.refuse_by_policy(owner, &pod_ref, &assign.pod, refusal);
        }
        if let Err(e) = translate::validate(&assign.pod) {
            return Response::Declined {
                reason: e.to_string(),
            };
        }
        let requests = match translate::pod_requests(&assign.pod) {
            Ok(r) => r,
            Err(e) => {
                return Response::Declined {
                    reason: e.to_string(),
                }
            }
        };
        if let Some(existing) = self.pods.get(&pod_ref.uid) {
            if existing.owner() != owner {
                return Response::Declined {
                    reason: "the pod is owned by another peer".into(),
                };
            }
            if existing.epoch() == assign.epoch {
                // The owner sends an assignment again when the volumes' data or the
                // pull credentials changed, or the pod did (an ephemeral container
                // added: checked against this agent's policy above, as every pod is).
                existing
                    .worker
                    .set_pull_credentials(assign.pull_credentials.clone());
                if existing.statement.spec_digest != assign.statement.spec_digest {
                    existing.worker.set_pod(assign.pod.clone());
                }
                let network = existing.network.clone();
                if let Err(e) = self.save_assignment(&pod_ref.uid, &assign, &network).await {
                    return Response::Error {
                        message: e.to_string(),
                    };
                }
                if let Some(hosted) = self.pods.get_mut(&pod_ref.uid) {
                    hosted.statement = assign.statement.clone();
                }
                let dir = self.worker_ctx.files_dir(&pod_ref.uid, assign.epoch);
                let fs_group = translate::fs_group(&assign.pod);
                return match volumes::write(&dir, &assign.volumes, fs_group).await {
                    Ok(()) => Response::Ack,
                    Err(e) => Response::Error {
                        message: format!("cannot update the pod's volumes: {e}"),
                    },
                };
            }
            if existing.epoch() > assign.epoch {
                return Response::Superseded {
                    current: existing.epoch(),
                };
            }
        }

        // The owner placed it from this agent's heartbeats, which may be out of date:
        // it must fit now, as a bid would have.
        let agent_selector = match placement::agent_selector_of(&assign.pod) {
            Ok(selector) => selector,
            Err(e) => {
                return Response::Declined {
                    reason: e.to_string(),
                }
            }
        };
        let offer = Offer {
            pod: pod_ref.clone(),
            epoch: assign.epoch,
            requests,
            agent_selector,
            host_ports: translate::host_ports(&assign.pod),
            spec_digest: String::new(),
        };
        let misfits = placement::misfits(&offer, &self.capacity(Some(&pod_ref.uid)));
        if !misfits.is_empty() {
            let reasons: Vec<String> = misfits.iter().map(ToString::to_string).collect();
            return self.refuse_assign(owner, &pod_ref, "does_not_fit", reasons.join(", "));
        }
        let listed = HostedPod {
            pod: pod_ref.clone(),
            owner: PeerRef(owner),
            epoch: assign.epoch,
            phase: "Pending".into(),
            requests,
            host_ports: offer.host_ports.clone(),
            unrecorded: false,
        };
        if let Err(e) = self.heartbeat_fits(listed) {
            let reason = format!("this agent's heartbeat cannot list another pod ({e})");
            return self.refuse_assign(owner, &pod_ref, "does_not_fit", reason);
        }
        let used = self.used_by(&owner, &pod_ref.uid);
        if let Err(refusal) = self.config.policy.quota(&owner, used, requests) {
            // Not remembered: the same spec fits once the owner's other pods are gone.
            self.metrics.policy_refused(&refusal.rule);
            return self.refuse_assign(owner, &pod_ref, "policy", refusal.to_string());
        }
        if let Some(subnet) = assign.pod_subnet {
            let routes = routes::host_routes().await;
            if let Some(route) = routes::overlapping(&routes, subnet) {
                let reason = format!(
                    "the pod subnet {subnet} overlaps this host's network {} on {} (the node's --mesh-pod-cidr must be apart from the agents' networks)",
                    route.destination, route.interface
                );
                tracing::warn!(pod = %pod_ref, %reason, "assignment refused");
                return self.refuse_assign(owner, &pod_ref, "pod_subnet", reason);
            }
        }
        if let Err(e) = self
            .save_assignment(&pod_ref.uid, &assign, &network_of(&assign))
            .await
        {
            return Response::Declined {
                reason: e.to_string(),
            };
        }
        if let Some(old) = self.pods.remove(&pod_ref.uid) {
            // A newer epoch of a pod we run: the old copy goes first.
            old.worker
                .stop(Duration::from_secs(translate::grace_period_secs(
                    &assign.pod,
                )));
        }
        audit::record(
            &self.metrics,
            "assign",
            Outcome::Allowed,
            &owner,
            Some(&pod_ref),
            &format_args!("epoch {}", assign.epoch),
        );
        self.metrics.assignments.inc();
        match assign.lease_ms {
            Some(lease_ms) => {
                // Counted from now: the owner counts from our answer, which is later.
                let grace = translate::grace_period_secs(&assign.pod).saturating_mul(1000);
                self.leases.take(
                    pod_ref.uid.clone(),
                    Lease {
                        owner: PeerRef(owner),
                        epoch: assign.epoch,
                        lease_ms,
                        expires_at_ms: boottime_ms().saturating_add(lease_ms),
                        grace_ms: grace,
                        fenced: false,
                        seat: seat_of(
                            &assign.pod,
                            &pod_ref,
                            self.worker_ctx.groups.me(),
                            assign.epoch,
                        ),
                    },
                );
            }
            None => {
                self.leases.remove(&pod_ref.uid);
            }
        }
        self.save_leases();
        // Its owner claims a pod found without its record: it carries on as it runs.
        let adopted = match self.unrecorded.remove(&pod_ref.uid) {
            Some(found) if found.epoch == assign.epoch => {
                tracing::info!(pod = %pod_ref, epoch = %assign.epoch, "owner claimed the pod found without its record");
                Some(found.runtime_pod)
            }
            Some(stale) => {
                self.remove_runtime_pod(stale.runtime_pod, Duration::ZERO);
                None
            }
            None => None,
        };
        let network = network_of(&assign);
        self.host(
            pod_ref,
            assign.pod,
            Provided {
                volumes: assign.volumes,
                network,
                pull_credentials: assign.pull_credentials,
                // From the lease, by `host`.
                gate: None,
            },
            assign.statement,
            adopted,
        );
        Response::Ack
    }

    /// Keeps the assignment in the memory-backed store, for a restarted agent.
    async fn save_assignment(
        &self,
        uid: &PodUid,
        assign: &Assign,
        network: &NetworkGrant,
    ) -> Result<(), store::StoreError> {
        self.store
            .save(
                uid,
                &assign.statement,
                &assign.pod,
                &assign.pull_credentials,
                assign.lease_ms,
                network,
            )
            .await
    }

    fn on_release(&mut self, peer: PeerId, release: Release) -> Response {
        let unwanted = self
            .unrecorded
            .get(&release.pod)
            .is_some_and(|u| u.owner == peer && u.epoch <= release.epoch);
        if unwanted {
            if let Some(found) = self.unrecorded.remove(&release.pod) {
                tracing::info!(pod = %found.pod, epoch = %found.epoch, "owner released the pod found without its record; removing it");
                self.remove_runtime_pod(
                    found.runtime_pod,
                    Duration::from_secs(release.grace_period_secs),
                );
            }
            return Response::Ack;
        }
        match self.pods.get_mut(&release.pod) {
            Some(hosted) if hosted.owner() != peer => Response::Declined {
                reason: "only the pod's owner can release it".into(),
            },
            Some(hosted) if hosted.epoch() <= release.epoch => {
                if !hosted.stopping {
                    tracing::info!(pod = %hosted.pod, epoch = %hosted.epoch(), "released by owner");
                    hosted.stopping = true;
                    hosted
                        .worker
                        .stop(Duration::from_secs(release.grace_period_secs));
                }
                Response::Ack
            }
            Some(hosted) => Response::Superseded {
                current: hosted.epoch(),
            },
            None => Response::Ack,
        }
    }

    fn stop_superseded(&mut self, uid: &PodUid, epoch: Epoch) {
        if let Some(hosted) = self.pods.get_mut(uid) {
            if hosted.epoch() == epoch && !hosted.stopping {
                tracing::info!(pod = %hosted.pod, %epoch, "owner superseded this copy; stopping it");
                hosted.stopping = true;
                hosted.worker.stop(Duration::from_secs(0));
            }
        }
    }

    async fn on_update(&mut self, update: WorkerUpdate) {
        let Some(hosted) = self.pods.get_mut(&update.pod.uid) else {
            return;
        };
        if hosted.epoch() != update.epoch {
            // A report from an older copy that is being replaced.
            return;
        }
        hosted.status = Some(update.status.clone());
        let statement = hosted.statement.clone();
        if update.removed {
            self.pods.remove(&update.pod.uid);
            if let Some(lease) = self.leases.remove(&update.pod.uid) {
                self.save_leases();
                if let Some(seat) = lease.seat {
                    self.unseat(lease.owner.0, seat);
                }
            }
            self.store.remove(&update.pod.uid).await;
            self.metrics.pods.set(self.pods.len() as i64);
        }
        self.send_status(
            update.pod,
            statement,
            update.status,
            update.removed,
            update.events,
        );
    }

    fn send_status(
        &self,
        pod: PodRef,
        assignment: SignedAssignment,
        status: PodStatus,
        removed: bool,
        events: Vec<AgentEvent>,
    ) {
        let mesh = self.mesh.clone();
        let internal = self.internal_tx.clone();
        let metrics = self.metrics.clone();
        let (seq, sent_at_ms) = self.sequencer.next();
        let (owner, epoch) = (assignment.owner.0, assignment.epoch);
        tokio::spawn(async move {
            let uid = pod.uid.clone();
            let report = StatusReport {
                pod,
                epoch,
                status,
                removed,
                assignment,
                seq,
                sent_at_ms,
                events,
            };
            match mesh.request(owner, Request::Status(Box::new(report))).await {
                Ok(Response::Superseded { .. }) if !removed => {
                    let _ = internal.send(Internal::Superseded { uid, epoch }).await;
                }
                Ok(_) => {
                    let _ = internal.send(Internal::Heard(owner)).await;
                }
                Err(e) => {
                    metrics.request_failed("status");
                    tracing::debug!(%uid, error = %e, "status report not delivered; resync will retry");
                }
            }
        });
    }

    /// Re-sends every status (of one owner's pods, or of all), so that an owner that
    /// restarted or missed a report catches up.
    fn resync(&self, owner: Option<PeerId>) {
        for hosted in self.pods.values() {
            if owner.is_some_and(|o| o != hosted.owner()) {
                continue;
            }
            if let Some(status) = &hosted.status {
                self.send_status(
                    hosted.pod.clone(),
                    hosted.statement.clone(),
                    status.clone(),
                    false,
                    Vec::new(),
                );
            }
        }
    }

    fn heartbeat(&self) -> Heartbeat {
        let (seq, sent_at_ms) = self.sequencer.next();
        self.heartbeat_numbered(seq, sent_at_ms)
    }

    fn heartbeat_numbered(&self, seq: u64, sent_at_ms: u64) -> Heartbeat {
        let capacity = self.capacity(None);
        Heartbeat {
            labels: self.config.labels.clone(),
            capacity: self.config.capacity,
            free: capacity.free,
            pods: self
                .pods
                .values()
                .map(|h| HostedPod {
                    pod: h.pod.clone(),
                    owner: PeerRef(h.owner()),
                    epoch: h.epoch(),
                    phase: h.phase(),
                    requests: h.requests,
                    host_ports: h.host_ports.clone(),
                    unrecorded: false,
                })
                .chain(self.unrecorded.values().map(|u| HostedPod {
                    pod: u.pod.clone(),
                    owner: PeerRef(u.owner),
                    epoch: u.epoch,
                    phase: "Unknown".into(),
                    requests: Resources::default(),
                    host_ports: Vec::new(),
                    unrecorded: true,
                }))
                .collect(),
            uptime_secs: self.started.elapsed().as_secs(),
            storage_bytes: self.config.storage_bytes,
            seq,
            sent_at_ms,
            health: self.health.clone(),
            pod_subnets: self
                .pods
                .values()
                .filter_map(|h| h.network.subnet)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        }
    }

    async fn publish_heartbeat(&mut self) {
        let heartbeat = GossipMessage::Heartbeat(self.heartbeat());
        if let Ok((bytes, largest)) = wire::heartbeat_size(&heartbeat) {
            self.heartbeat_room = wire::heartbeat_room(bytes, largest);
        }
        match self.mesh.publish(&heartbeat).await {
            Ok(()) => self.heartbeat_too_large = false,
            // Pods taken are checked against it, but pods found in the runtime after a
            // restart are listed whatever their number: the owners then lose sight of
            // this agent, and its pods move.
            Err(MeshError::Wire(e @ WireError::TooLarge { .. })) => {
                self.metrics.dropped("heartbeat", e.kind());
                if !std::mem::replace(&mut self.heartbeat_too_large, true) {
                    tracing::warn!(error = %e, pods = self.pods.len() + self.unrecorded.len(),
                        "heartbeat too large to send: owners will take this agent for lost");
                }
            }
            // Expected while no peer is connected yet.
            Err(e) => tracing::debug!(error = %e, "heartbeat not published"),
        }
    }

    /// Whether the heartbeat still goes out with `entry` listed too.
    fn heartbeat_fits(&self, entry: HostedPod) -> Result<(), WireError> {
        let mut heartbeat = self.heartbeat_numbered(0, 0);
        heartbeat.pods.retain(|p| p.pod.uid != entry.pod.uid);
        heartbeat.pods.push(entry);
        wire::encode(&GossipMessage::Heartbeat(heartbeat), wire::MAX_GOSSIP_BYTES).map(|_| ())
    }

    /// This agent and the pods it runs for `owner`: an owner learns nothing of
    /// other owners' work.
    fn view(&self, owner: PeerId) -> MeshView {
        let mut heartbeat = self.heartbeat();
        heartbeat.pods.retain(|p| p.owner.0 == owner);
        let mut book = crate::view::HeartbeatBook::default();
        book.record(self.mesh.local_peer_id(), heartbeat);
        book.view(self.config.heartbeat_interval)
    }
}

/// The seat a strict pod of a stateful workload needs in its group, for this copy.
fn seat_of(pod: &Pod, pod_ref: &PodRef, agent: PeerId, epoch: Epoch) -> Option<SeatLease> {
    let group = crate::raft::group_of(pod).ok()??;
    let holder = crate::raft::kv::seat_holder(agent, epoch);
    Some(SeatLease::new(
        &pod_ref.namespace,
        &group,
        &pod_ref.name,
        holder,
    ))
}

/// Where the assignment puts the pod on the mesh.
fn network_of(assign: &Assign) -> NetworkGrant {
    NetworkGrant {
        subnet: assign.pod_subnet,
        cluster_ranges: assign.cluster_ranges.clone(),
        cluster_domain: assign.cluster_domain.clone(),
    }
}
