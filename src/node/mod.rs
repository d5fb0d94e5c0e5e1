//! The virtual node: owns pods, offers them to the mesh and follows their status.
//!
//! Pods come from a manifest directory (standalone), from the Kubernetes API through an
//! [`ApiLink`], or both; their status is printed, and sent to the API for its pods.

pub mod desired;
mod display;
pub mod enroll;
pub mod groups;
pub mod manifests;
pub mod mesh_dns;
pub mod mesh_services;
pub mod network_policy;
pub mod owner;
mod printer;
pub mod resolve;
mod route;
mod selections;
pub mod service_env;
pub mod stored;
pub mod subnets;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::cluster::watched::Watched;
use crate::mesh::{MeshEvent, MeshEvents, MeshHandle};
use crate::metrics::Metrics;
use crate::wire::{AgentEvent, GossipMessage, PodRef, PodUid, Request, Response};
use desired::DesiredStore;
use enroll::NodeEnrollment;
use manifests::ManifestDir;
use network_policy::Labels;
use owner::{AgentsSummary, DesiredPod, DesiredPods, Owner, OwnerConfig, PodLocation, StatusSink};
pub use printer::{timestamp, PhasePrinter};
use resolve::{Fetched, ResolveError};
use stored::StoredPod;

/// How often the manifest directory is scanned when inotify says nothing (changes
/// must be noticed within 5 s even where inotify does not work, e.g. some network
/// filesystems).
const MANIFEST_SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Granularity of the owner's timers (offer windows, retries).
const OWNER_TICK: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot read manifest directory {path}")]
    ManifestDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Standalone pods; None when all pods come from the Kubernetes API.
    pub pod_manifest_path: Option<PathBuf>,
    pub owner: OwnerConfig,
    /// Joins with tokens; None when agents are only listed (or, insecurely, any).
    pub enrollment: Option<NodeEnrollment>,
    /// Where the pods' DNS queries relayed by their agents go when they are not for a
    /// standalone Service: the cluster's DNS, or (standalone) the host's resolver.
    pub cluster_dns: Option<std::net::SocketAddr>,
    /// The addresses of standalone Services (`--mesh-service-cidr`).
    pub mesh_service_cidr: ipnet::Ipv4Net,
}

/// How the node loop and the Kubernetes side talk.
pub struct ApiLink {
    /// The API's pods bound to this node, resolved.
    pub pods: Arc<DesiredStore>,
    /// Where the status of the API's pods goes.
    pub sink: Box<dyn StatusSink>,
    /// The live agents, for the Node object's capacity and conditions.
    pub agents: watch::Sender<AgentsSummary>,
    /// The cluster's Services and NetworkPolicies, which the node's routes follow
    /// (None: a source of pods that has none, as the scale harness' simulated API).
    pub network: Option<ApiNetwork>,
}

/// The cluster's Services, their EndpointSlices (but the node's own), NetworkPolicies
/// and Namespaces, watched by the Kubernetes side.
#[derive(Clone)]
pub struct ApiNetwork {
    pub services: Watched<Service>,
    pub slices: Watched<EndpointSlice>,
    pub policies: Watched<NetworkPolicy>,
    pub namespaces: Watched<k8s_openapi::api::core::v1::Namespace>,
}

impl ApiNetwork {
    /// The policies in force; None until both watches have listed (nothing is routed
    /// on a partial view: deny by default).
    pub fn policies(&self) -> Option<Vec<Arc<NetworkPolicy>>> {
        (self.policies.is_listed() && self.namespaces.is_listed())
            .then(|| self.policies.store.state())
    }

    /// The ClusterIP of the cluster's Service `name` in `namespace` (none for a
    /// headless one).
    pub fn cluster_ip_of(&self, namespace: &str, name: &str) -> Option<std::net::Ipv4Addr> {
        let service = self
            .services
            .store
            .get(&kube::runtime::reflector::ObjectRef::new(name).within(namespace))?;
        service.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok()
    }

    /// The labels of `namespace`; without its object, the one every namespace has.
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        self.namespaces
            .store
            .get(&kube::runtime::reflector::ObjectRef::new(namespace))
            .and_then(|ns| ns.metadata.labels.clone())
            .unwrap_or_else(|| standalone_namespace_labels(namespace))
    }
}

impl route::ClusterServices for ApiNetwork {
    fn serving(&self, to: std::net::SocketAddr) -> Option<Arc<Service>> {
        self.services
            .store
            .state()
            .into_iter()
            .find(|s| crate::gateway::cluster::service_serves(s, to, "TCP"))
    }

    fn ready_in_cluster(&self, service: &Service) -> usize {
        let slices = self.slices.store.state();
        crate::gateway::endpoints::ready_endpoints(slices.iter().map(AsRef::as_ref), service)
    }
}

/// What the node's routes and DNS answers are decided from: the manifests' Services and
/// NetworkPolicies and, with an API, the cluster's.
struct Network {
    services: mesh_services::MeshServices,
    policies: Vec<NetworkPolicy>,
    api: Option<ApiNetwork>,
}

impl Network {
    fn namespace_labels(&self, namespace: &str) -> Labels {
        match &self.api {
            Some(api) => api.namespace_labels(namespace),
            None => standalone_namespace_labels(namespace),
        }
    }
}

/// A namespace without an API has the label the API server gives every namespace.
fn standalone_namespace_labels(namespace: &str) -> Labels {
    Labels::from([(
        network_policy::NAMESPACE_NAME_LABEL.to_owned(),
        namespace.to_owned(),
    )])
}

/// Questions about the node's pods, answered by the node loop.
#[derive(Debug)]
enum NodeQuery {
    Locate {
        namespace: String,
        name: String,
        reply: oneshot::Sender<Option<PodLocation>>,
    },
    PlacedOn {
        pod: PodRef,
        reply: oneshot::Sender<Option<PeerId>>,
    },
    Pods {
        reply: oneshot::Sender<Vec<Pod>>,
    },
    Agents {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
}

/// A cheap, cloneable way to ask the node loop about its pods (for the kubelet API).
#[derive(Debug, Clone)]
pub struct NodeDirectory {
    queries: mpsc::Sender<NodeQuery>,
}

impl NodeDirectory {
    /// A directory and the receiver to hand to [`Node::run`].
    pub fn new() -> (NodeDirectory, NodeQueries) {
        let (queries, receiver) = mpsc::channel(64);
        (NodeDirectory { queries }, NodeQueries(receiver))
    }

    /// Where the pod runs; None if the node has no such pod (or has stopped).
    pub async fn locate(&self, namespace: &str, name: &str) -> Option<PodLocation> {
        self.ask(|reply| NodeQuery::Locate {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            reply,
        })
        .await
        .flatten()
    }

    /// The agent this node's pod (UID, namespace and name) is placed on, if it is.
    pub async fn placed_on(&self, pod: PodRef) -> Option<PeerId> {
        self.ask(|reply| NodeQuery::PlacedOn { pod, reply })
            .await
            .flatten()
    }

    /// The agents that run the node's pods.
    pub async fn agents(&self) -> Vec<PeerId> {
        self.ask(|reply| NodeQuery::Agents { reply })
            .await
            .unwrap_or_default()
    }

    /// The node's pods with their status.
    pub async fn pods(&self) -> Vec<Pod> {
        self.ask(|reply| NodeQuery::Pods { reply })
            .await
            .unwrap_or_default()
    }

    /// Whether the node loop answers queries (it has not stopped).
    pub async fn alive(&self) -> bool {
        self.ask(|reply| NodeQuery::Agents { reply })
            .await
            .is_some()
    }

    /// The node loop's answer; None once it has stopped.
    async fn ask<T>(&self, query: impl FnOnce(oneshot::Sender<T>) -> NodeQuery) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.queries.send(query(reply)).await.ok()?;
        answer.await.ok()
    }
}

/// The node loop's end of a [`NodeDirectory`].
pub struct NodeQueries(mpsc::Receiver<NodeQuery>);

/// Status goes to every sink.
struct Sinks(Vec<Box<dyn StatusSink>>);

impl StatusSink for Sinks {
    fn status_changed(
        &mut self,
        pod: &PodRef,
        spec: Option<&PodSpec>,
        status: &PodStatus,
        agent: Option<PeerId>,
    ) {
        for sink in &mut self.0 {
            sink.status_changed(pod, spec, status, agent);
        }
    }

    fn removed(&mut self, pod: &PodRef) {
        for sink in &mut self.0 {
            sink.removed(pod);
        }
    }

    fn events(&mut self, pod: &PodRef, events: &[AgentEvent]) {
        for sink in &mut self.0 {
            sink.events(pod, events);
        }
    }

    fn last_known(&self, pod: &PodUid) -> Option<PodStatus> {
        self.0.iter().find_map(|sink| sink.last_known(pod))
    }
}

/// A pod from a manifest file: there is no API to take configMaps, secrets or tokens
/// from, but downward API volumes work.
pub fn standalone_pod(pod: Pod) -> Arc<DesiredPod> {
    let gated = pod
        .spec
        .as_ref()
        .is_some_and(|s| s.readiness_gates.as_ref().is_some_and(|g| !g.is_empty()));
    let resolved = if gated {
        Err(ResolveError::Invalid {
            field: "spec.readinessGates".into(),
            message: "readiness gates need a Kubernetes API server, where others set their \
                      conditions (pods from manifest files cannot use them)"
                .into(),
        })
    } else if resolve::references(&pod).is_empty() {
        resolve::resolve(&pod, &Fetched::default())
    } else {
        Err(ResolveError::Invalid {
            field: "spec".into(),
            message: "configMaps, secrets and service account tokens need a Kubernetes API \
                      server (pods from manifest files cannot use them)"
                .into(),
        })
    };
    Arc::new(DesiredPod {
        pod: StoredPod::new(&pod),
        resolved,
    })
}

pub struct Node {
    config: NodeConfig,
    /// The mesh identity, which signs assignments.
    signer: Keypair,
    mesh: MeshHandle,
    metrics: Metrics,
    /// DNS queries waiting for the upstream resolver.
    upstream_queries: Arc<tokio::sync::Semaphore>,
}

/// DNS queries asked of the upstream resolver at once, for all agents; more are
/// dropped and counted (the pods' resolvers ask again).
pub const MAX_UPSTREAM_DNS_QUERIES: usize = 512;

impl Node {
    pub fn new(config: NodeConfig, signer: Keypair, mesh: MeshHandle, metrics: Metrics) -> Node {
        Node {
            config,
            signer,
            mesh,
            metrics,
            upstream_queries: Arc::new(tokio::sync::Semaphore::new(MAX_UPSTREAM_DNS_QUERIES)),
        }
    }

    pub async fn run(
        self,
        mut events: MeshEvents,
        api: Option<ApiLink>,
        queries: Option<NodeQueries>,
        cancel: CancellationToken,
    ) -> Result<(), NodeError> {
        let mut queries = queries.map(|q| q.0);
        let mut sinks: Vec<Box<dyn StatusSink>> = vec![Box::new(PhasePrinter::default())];
        let (api_pods, agents, api_network) = match api {
            Some(link) => {
                sinks.push(link.sink);
                (Some(link.pods), Some(link.agents), link.network)
            }
            None => (None, None, None),
        };
        let mut owner = Owner::new(
            self.config.owner.clone(),
            self.signer.clone(),
            self.mesh.clone(),
            self.metrics.clone(),
            Box::new(Sinks(sinks)),
        );
        let mut desired = Desired::default();
        let mut network = Network {
            services: mesh_services::MeshServices::new(self.config.mesh_service_cidr),
            policies: Vec::new(),
            api: api_network,
        };
        if api_pods.is_some() {
            owner.set_synced(false);
        }
        let mut source = None;
        if let Some(path) = &self.config.pod_manifest_path {
            let mut dir = ManifestDir::new(path.clone(), self.mesh.local_peer_id().to_string());
            // Read once before anything else, so that a bad path fails at start.
            let first = dir.scan().await.map_err(|e| NodeError::ManifestDir {
                path: path.clone(),
                source: e,
            })?;
            let first = desired.reported.take_scan(first, &mut network);
            desired.set_manifests(first, &mut owner);
            source = Some(dir);
        }

        let (changed_tx, mut changed) = mpsc::channel(1);
        // Kept alive for the loop's lifetime; None when inotify is unavailable.
        let _watcher = self
            .config
            .pod_manifest_path
            .as_deref()
            .and_then(|path| watch_dir(path, changed_tx));
        let (revoked_tx, mut revoked) = mpsc::channel(16);
        if let Some(enrollment) = &self.config.enrollment {
            tokio::spawn(enrollment.clone().follow(revoked_tx, cancel.clone()));
        }
        let mut scan = tokio::time::interval(MANIFEST_SCAN_INTERVAL);
        scan.reset();
        let mut tick = tokio::time::interval(OWNER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(event) = events.recv() => match event {
                    MeshEvent::Gossip { source, message: GossipMessage::Heartbeat(hb) } => {
                        owner.on_heartbeat(source, hb);
                    }
                    MeshEvent::Gossip { message: GossipMessage::Offer(_), .. } => {}
                    MeshEvent::Request { peer, request: Request::Join(join), reply } => {
                        match self.config.enrollment.clone() {
                            // Answered aside: recording an enrollment is I/O.
                            Some(enrollment) => {
                                tokio::spawn(async move {
                                    let _ = reply.send(enrollment.join(peer, join).await);
                                });
                            }
                            None => {
                                let _ = reply.send(Response::Declined {
                                    reason: "this node takes no join tokens (its agents are listed with --trust-agent)".into(),
                                });
                            }
                        }
                    }
                    MeshEvent::Request { peer, request, reply } => match owner.refuse_untrusted(peer, &request) {
                        Some(refusal) => {
                            let _ = reply.send(refusal);
                        }
                        None => match request {
                            Request::ClusterDns(query) => {
                                self.answer_dns(&owner, &network, peer, query, reply);
                            }
                            Request::Route(dial) => {
                                let _ = reply.send(self.route(&owner, &network, peer, &dial));
                            }
                            Request::Query => {
                                let mut view = owner.view();
                                view.services = network.services.summaries(|s| owner.pods_behind(s));
                                let _ = reply.send(Response::View(Box::new(view)));
                            }
                            request => {
                                let _ = reply.send(owner.on_request(peer, request));
                            }
                        },
                    },
                    MeshEvent::PeerConnected(_) | MeshEvent::PeerDisconnected(_) => {}
                },
                Some(()) = owner.next_internal() => {}
                Some(gone) = revoked.recv() => owner.agents_revoked(&gone),
                Some(query) = next_query(queries.as_mut()) => match query {
                    NodeQuery::Locate { namespace, name, reply } => {
                        let _ = reply.send(owner.locate(&namespace, &name));
                    }
                    NodeQuery::PlacedOn { pod, reply } => {
                        let _ = reply.send(owner.placed_on(&pod));
                    }
                    NodeQuery::Pods { reply } => {
                        let _ = reply.send(owner.pods());
                    }
                    NodeQuery::Agents { reply } => {
                        let _ = reply.send(owner.placed_agents());
                    }
                },
                _ = tick.tick() => {
                    owner.tick();
                    if let Some(agents) = &agents {
                        let summary = owner.agents_summary();
                        agents.send_if_modified(|old| std::mem::replace(old, summary) != summary);
                    }
                }
                () = changed_or_pending(api_pods.as_deref()) => {
                    if let Some(store) = &api_pods {
                        let changes = store.take();
                        for (uid, pod) in changes.pods {
                            desired.set_api(uid, pod, &mut owner);
                        }
                        if changes.listed {
                            owner.set_synced(true);
                        }
                        owner.advance_due();
                    }
                }
                _ = scan.tick(), if source.is_some() => rescan(&mut source, &mut desired, &mut network, &mut owner).await,
                Some(()) = changed.recv() => rescan(&mut source, &mut desired, &mut network, &mut owner).await,
            }
        }
        Ok(())
    }

    /// Where a pod's connection to a Service address goes, as its agent asks.
    fn route(
        &self,
        owner: &Owner,
        network: &Network,
        peer: PeerId,
        dial: &crate::wire::ClusterDial,
    ) -> Response {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let api_policies = match network.api.as_ref().map(ApiNetwork::policies) {
            None => Vec::new(),
            Some(Some(policies)) => policies,
            Some(None) => {
                return Response::Declined {
                    reason: "the cluster's NetworkPolicies are not read yet".into(),
                }
            }
        };
        let namespace_labels = |namespace: &str| network.namespace_labels(namespace);
        let routing = route::Routing {
            owner,
            services: &network.services,
            cluster: network
                .api
                .as_ref()
                .map(|api| api as &dyn route::ClusterServices),
            policies: route::Policies {
                policies: network
                    .policies
                    .iter()
                    .chain(api_policies.iter().map(AsRef::as_ref))
                    .collect(),
                namespace_labels: &namespace_labels,
            },
            signer: &self.signer,
        };
        let response = route::route(&routing, peer, dial, now, route::random_below);
        if let Response::Declined { reason } = &response {
            self.metrics.cluster_connection("refused");
            tracing::debug!(%peer, pod = %dial.pod, to = %dial.to, %reason, "route refused");
        }
        response
    }

    /// Answers a pod's DNS query its agent relays: a standalone Service's name here,
    /// anything else by the upstream resolver (aside: that takes a round trip).
    fn answer_dns(
        &self,
        owner: &Owner,
        network: &Network,
        peer: PeerId,
        query: crate::wire::ClusterDnsQuery,
        reply: oneshot::Sender<Response>,
    ) {
        let domain = self.config.owner.cluster_domain.as_deref();
        let (Some(domain), true) = (domain, owner.runs_for(peer, &query.pod)) else {
            self.metrics.dropped("cluster_dns", "refused");
            let _ = reply.send(Response::Declined {
                reason: "this node answers no DNS queries for that pod from this peer".into(),
            });
            return;
        };
        self.metrics.cluster_connection("dns");
        // Without a cluster, the node is the authority of the cluster's domain.
        let authoritative = network.api.is_none();
        let local = mesh_dns::answer(&query.query.0, domain, authoritative, |namespace, name| {
            network.services.address_of(namespace, name).or_else(|| {
                network
                    .api
                    .as_ref()
                    .and_then(|api| api.cluster_ip_of(namespace, name))
            })
        });
        let upstream = match (local, self.config.cluster_dns) {
            (mesh_dns::Answer::Local(answer), _) => {
                let _ = reply.send(Response::ClusterDns {
                    answer: k8s_openapi::ByteString(answer),
                });
                return;
            }
            (mesh_dns::Answer::Forward, Some(upstream)) => upstream,
            (mesh_dns::Answer::Forward, None) => {
                let _ = reply.send(Response::Error {
                    message: "this node has no resolver for names outside its domain".into(),
                });
                return;
            }
        };
        let Ok(permit) = self.upstream_queries.clone().try_acquire_owned() else {
            self.metrics.dropped("cluster_dns", "too_many");
            let _ = reply.send(Response::Error {
                message: "too many DNS queries in flight".into(),
            });
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let answer =
                crate::gateway::cluster::ask_dns(upstream, &query.query.0, query.tcp).await;
            let response = match answer {
                Ok(answer) => Response::ClusterDns {
                    answer: k8s_openapi::ByteString(answer),
                },
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            };
            let _ = reply.send(response);
        });
    }
}

/// The next directory query; never returns without a directory.
async fn next_query(queries: Option<&mut mpsc::Receiver<NodeQuery>>) -> Option<NodeQuery> {
    match queries {
        Some(queries) => queries.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits for changes to the API's pods; never returns without an API.
async fn changed_or_pending(pods: Option<&DesiredStore>) {
    match pods {
        Some(pods) => pods.changed().await,
        None => std::future::pending().await,
    }
}

/// The pods of both sources, handed to the owner pod by pod as they change.
#[derive(Default)]
struct Desired {
    manifests: DesiredPods,
    api: DesiredPods,
    reported: ReportedErrors,
}

impl Desired {
    /// What is wanted of a pod: manifest pods have UIDs of their own; on a clash the
    /// API's pod wins.
    fn wanted(&self, uid: &str) -> Option<Arc<DesiredPod>> {
        self.api
            .get(uid)
            .or_else(|| self.manifests.get(uid))
            .cloned()
    }

    fn set_api(&mut self, uid: String, pod: Option<Arc<DesiredPod>>, owner: &mut Owner) {
        match pod {
            Some(pod) => self.api.insert(uid.clone(), pod),
            None => self.api.remove(&uid),
        };
        owner.apply(&uid, self.wanted(&uid));
    }

    /// A scan's pods in place of the last scan's.
    fn set_manifests(&mut self, pods: DesiredPods, owner: &mut Owner) {
        let old = std::mem::replace(&mut self.manifests, pods);
        let uids: BTreeSet<&String> = old.keys().chain(self.manifests.keys()).collect();
        for uid in uids {
            owner.apply(uid, self.wanted(uid));
        }
    }
}

/// Manifest errors already reported, so that each is reported once.
#[derive(Default)]
struct ReportedErrors(Vec<manifests::ManifestError>);

impl ReportedErrors {
    /// Takes the scan's Services and NetworkPolicies, reports the scan's new errors and
    /// gives its pods.
    fn take_scan(&mut self, mut scan: manifests::Scan, network: &mut Network) -> DesiredPods {
        scan.errors.extend(network.services.update(&scan.services));
        network.policies = scan.policies.iter().map(|p| p.object.clone()).collect();
        for error in &scan.errors {
            if !self.0.contains(error) {
                tracing::error!("manifest {error}");
                println!("{} manifest error: {error}", printer::timestamp());
            }
        }
        self.0 = scan.errors;
        scan.pods
            .into_iter()
            .map(|(uid, pod)| (uid, standalone_pod(pod)))
            .collect()
    }
}

/// Watches the manifest directory with inotify; every event wakes the node loop for a
/// scan (a full channel already holds a wake-up, so events coalesce).
fn watch_dir(
    dir: &std::path::Path,
    changed: mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::event::{AccessKind, AccessMode, EventKind};
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only changes: reads (including our own scans) must not wake us.
        let is_change = event.is_ok_and(|e| {
            matches!(
                e.kind,
                EventKind::Create(_)
                    | EventKind::Modify(_)
                    | EventKind::Remove(_)
                    | EventKind::Access(AccessKind::Close(AccessMode::Write))
            )
        });
        if is_change {
            let _ = changed.try_send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "inotify unavailable; polling the manifest directory"))
    .ok()?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| tracing::warn!(error = %e, "cannot watch the manifest directory; polling it"))
        .ok()?;
    Some(watcher)
}

async fn rescan(
    source: &mut Option<ManifestDir>,
    desired: &mut Desired,
    network: &mut Network,
    owner: &mut Owner,
) {
    let Some(dir) = source.as_mut() else {
        return;
    };
    match dir.scan().await {
        Ok(result) => {
            let pods = desired.reported.take_scan(result, network);
            desired.set_manifests(pods, owner);
            owner.advance_due();
        }
        Err(e) => {
            tracing::warn!(dir = %dir.dir().display(), error = %e, "cannot scan manifest directory")
        }
    }
}
