//! Runs each role from its parsed command line. The program's edge: errors are
//! `anyhow`, with context a person can act on.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::admission::Policy;
use crate::agent::enroll::{self, Enrollment};
use crate::agent::{watchdog, Agent, AgentConfig};
use crate::cli::{
    self, AgentArgs, Command, FenceWatchdogArgs, IdArgs, MeshArgs, NodeArgs, OutputFormat,
    StatusArgs, TokenArgs, TokenCommand,
};
use crate::cluster::{self, node_object::NodeIdentity};
use crate::gateway;
use crate::health::{Check, Health};
use crate::kubelet::{self, tls::ServingCert};
use crate::mesh::{self, GossipFilter, MeshConfig, MeshEvent, MeshEvents, MeshHandle};
use crate::metrics::Metrics;
use crate::node::enroll::NodeEnrollment;
use crate::node::owner::{self, OwnerConfig};
use crate::node::subnets::{self, SubnetPool};
use crate::node::{Node, NodeConfig, NodeDirectory};
use crate::runtime::podman::Podman;
use crate::runtime::{dns, translate, Runtime};
use crate::tables::{self, human_age};
use crate::trust::join::{JoinToken, TrustDoc};
use crate::trust::replay::unix_millis;
use crate::trust::store::{JsonStore, TrustStore, NODE_TRUST_FILE};
use crate::trust::{
    load_identity_file, load_or_create_identity, load_or_create_key, load_psk_file, TrustedPeers,
    CLIENT_KEY_FILE,
};
use crate::wire::{MeshView, Request, Resources, Response, Topic};

/// Runs `command` to the end on a multi-threaded runtime. A plain function rather than
/// an `async` one for `main` to await: a future is compiled in the crate that polls it,
/// so awaiting this one from the binary would compile the whole program twice (the
/// binary took 46 s of a 6.5-minute release build doing so).
pub fn run_to_end(command: Command) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(command))
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Id(args) => id(args),
        Command::Agent(args) => agent(*args).await,
        Command::Node(args) => node(*args).await,
        Command::Status(args) => status(args).await,
        Command::Token(args) => token(args).await,
        Command::FenceWatchdog(args) => fence_watchdog(args).await,
    }
}

fn id(args: IdArgs) -> Result<()> {
    let keypair = match (&args.identity_key_file, &args.state_dir) {
        (Some(path), _) => load_identity_file(path)?,
        (None, Some(dir)) => load_or_create_identity(dir)?,
        (None, None) => bail!("pass --state-dir or --identity-key-file"),
    };
    println!("{}", keypair.public().to_peer_id());
    Ok(())
}

/// Cancelled on SIGINT or SIGTERM.
fn shutdown_token() -> Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        cancel.cancel();
    });
    Ok(token)
}

/// The peer's identity key, as the flags name it.
fn identity(args: &MeshArgs) -> Result<libp2p::identity::Keypair> {
    Ok(match &args.identity_key_file {
        Some(path) => load_identity_file(path)?,
        None => load_or_create_identity(&args.state_dir)?,
    })
}

/// The mesh peers trust: `listed` or, with --insecure-trust-any, everyone (warned about
/// every minute while the process runs).
fn trusted_peers(
    args: &MeshArgs,
    listed: impl IntoIterator<Item = libp2p::PeerId>,
    cancel: &CancellationToken,
) -> TrustedPeers {
    if !args.insecure_trust_any {
        return TrustedPeers::new(listed);
    }
    let cancel = cancel.clone();
    tokio::spawn(async move {
        let mut every_minute = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = every_minute.tick() => tracing::warn!(
                    "--insecure-trust-any: every peer that reaches the mesh port is trusted \
                     (it may take pods with their secrets, or run anything here); use join \
                     tokens for anything but a throwaway demo"
                ),
            }
        }
    });
    TrustedPeers::insecure_any()
}

/// Joins the mesh as described by the flags; returns the handle, the event stream
/// and the running event loop.
fn join_mesh(
    args: &MeshArgs,
    keypair: libp2p::identity::Keypair,
    subscribe: Vec<Topic>,
    accept_gossip: GossipFilter,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> Result<(mesh::MeshHandle, MeshEvents, JoinHandle<()>)> {
    let config = MeshConfig {
        listen: args.listen.clone(),
        bootstrap: args.bootstrap.clone(),
        subscribe,
        accept_gossip,
        psk: args
            .mesh_psk_file
            .as_deref()
            .map(load_psk_file)
            .transpose()?,
        ..MeshConfig::default()
    };
    let (handle, events, event_loop) = mesh::start(keypair, config, metrics.clone())?;
    let task = tokio::spawn(event_loop.run(cancel.clone()));
    if let Some(addr) = args.metrics_addr {
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics.serve(addr, cancel).await {
                tracing::error!(%addr, error = %e, "cannot serve metrics");
            }
        });
    }
    Ok((handle, events, task))
}

fn default_host_ip(listen: &[Multiaddr]) -> Option<IpAddr> {
    listen.iter().find_map(|addr| {
        addr.iter().find_map(|p| match p {
            Protocol::Ip4(ip) if !ip.is_unspecified() => Some(IpAddr::V4(ip)),
            _ => None,
        })
    })
}

fn machine_capacity() -> (u64, u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    (cpus * 1000, system.total_memory())
}

/// Size of the filesystem holding `dir`: the disk whose mount point is the longest
/// prefix of it.
fn storage_bytes(dir: &std::path::Path) -> u64 {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|disk| dir.starts_with(disk.mount_point()))
        .max_by_key(|disk| disk.mount_point().as_os_str().len())
        .map_or(0, |disk| disk.total_space())
}

async fn fence_watchdog(args: FenceWatchdogArgs) -> Result<()> {
    let runtime = Podman::new(&args.podman_socket)
        .with_context(|| format!("invalid --podman-socket {}", args.podman_socket))?;
    watchdog::run(Arc::new(runtime), args.secrets_dir, args.agent).await?;
    Ok(())
}

async fn agent(args: AgentArgs) -> Result<()> {
    let policy = match &args.policy_file {
        Some(path) => Policy::load(path)?,
        None => Policy::default(),
    };
    tracing::info!(level = %policy.level, host_ports = ?policy.host_ports, images = ?policy.images, "admission policy");
    let runtime = Podman::new(&args.podman_socket)
        .with_context(|| format!("invalid --podman-socket {}", args.podman_socket))?;
    // Checked before joining the mesh: an agent without a runtime must not bid.
    runtime.ping().await.with_context(|| {
        format!(
            "cannot reach Podman at {}: start its REST service (bash hack/install-podman.sh, \
             or podman system service --time=0 <socket>) or pass --podman-socket",
            args.podman_socket
        )
    })?;
    let (machine_cpu, machine_memory) = machine_capacity();
    let capacity = Resources {
        cpu_millis: args.cpu.unwrap_or(machine_cpu),
        memory_bytes: args.memory.unwrap_or(machine_memory),
        pods: args.max_pods,
    };
    let cancel = shutdown_token()?;
    let (pins, pinned) = enroll::pinned_owners(&args.mesh.state_dir)?;
    let owners = trusted_peers(&args.mesh, args.trust.iter().copied(), &cancel);
    owners.set_enrolled(pinned.iter().copied());
    let enrollment = match args.join.clone() {
        Some(_) if !pinned.is_empty() => {
            tracing::info!(nodes = ?pinned, "already joined; --join is not needed any more");
            None
        }
        Some(token) => {
            let candidates = args
                .mesh
                .bootstrap
                .iter()
                .filter_map(mesh::peer_of)
                .collect();
            Some(Enrollment::new(token, candidates, pins))
        }
        None if owners.is_empty() => bail!(
            "this agent trusts no node: pass --join <token> (on the node: beemesh token \
             create) or --trust <node peer ID>"
        ),
        None => None,
    };
    if enrollment.is_some() && args.mesh.bootstrap.is_empty() {
        bail!("--join needs --bootstrap: the address of the node to join");
    }
    let metrics = Metrics::new();
    let gossip = {
        let owners = owners.clone();
        GossipFilter::new([Topic::Offers], move |peer| owners.trusts(peer))
    };
    let keypair = identity(&args.mesh)?;
    let (mesh, events, mesh_task) = join_mesh(
        &args.mesh,
        keypair,
        vec![Topic::Offers],
        gossip,
        &metrics,
        &cancel,
    )?;
    let config = AgentConfig {
        state_dir: args.mesh.state_dir.clone(),
        secrets_dir: args.secrets_dir.clone(),
        labels: cli::labels_map(&args.labels),
        capacity,
        heartbeat_interval: Duration::from_secs(args.heartbeat_seconds),
        owner_gone_after: Duration::from_secs(args.owner_gone_seconds),
        resync_interval: Duration::from_secs(10),
        host_ip: args.host_ip.or_else(|| default_host_ip(&args.mesh.listen)),
        storage_bytes: storage_bytes(&args.mesh.state_dir),
        fence_watchdog: Some(watchdog::Launcher {
            exe: std::env::current_exe().context("cannot find this program's path")?,
            secrets_dir: args.secrets_dir.clone(),
            podman_socket: args.podman_socket.clone(),
            agent: mesh.local_peer_id().to_string(),
        }),
        policy: Arc::new(policy),
        groups: crate::raft::GroupConfig {
            snapshot_entries: args.raft_snapshot_entries,
            ..Default::default()
        },
    };
    tracing::info!(peer = %mesh.local_peer_id(), cpu_millis = capacity.cpu_millis, memory_bytes = capacity.memory_bytes, pods = capacity.pods, "agent starting");
    let agent = Agent::new(config, mesh, Arc::new(runtime), owners, enrollment, metrics)?;
    tokio::spawn(crate::agent::memory::keep_returning_freed(cancel.clone()));
    let result = agent
        .run(events, cancel.clone())
        .await
        .context("agent stopped");
    cancel.cancel();
    let _ = mesh_task.await;
    result
}

async fn node(args: NodeArgs) -> Result<()> {
    if let Some(path) = &args.pod_manifest_path {
        if !path.is_dir() {
            bail!("--pod-manifest-path {} is not a directory", path.display());
        }
    }
    if !translate::is_dns_subdomain(&args.node_name) {
        bail!(
            "--node-name {:?} is not a valid node name (a lowercase RFC 1123 subdomain)",
            args.node_name
        );
    }
    let pod_subnets = SubnetPool::new(args.mesh_pod_cidr, args.mesh_pod_subnet_prefix)
        .context("--mesh-pod-subnet-prefix does not fit --mesh-pod-cidr")?;
    subnets::check_apart(
        args.mesh_service_cidr,
        &[("mesh pod CIDR (--mesh-pod-cidr)", args.mesh_pod_cidr)],
    )
    .context("--mesh-service-cidr must be apart from --mesh-pod-cidr")?;
    let env = |name: &str| std::env::var(name).ok();
    let source = cluster::config_source(
        args.kubeconfig.as_deref(),
        args.pod_manifest_path.is_some(),
        &env,
    );
    if source.is_none() && args.pod_manifest_path.is_none() {
        bail!(
            "no pods to run: pass --pod-manifest-path <dir> for standalone pods, or a \
             Kubernetes API server with --kubeconfig (or KUBECONFIG, ~/.kube/config, or by \
             running in a pod)"
        );
    }
    let kube_config = match &source {
        Some(source) => Some(
            cluster::config(source)
                .await
                .with_context(|| format!("cannot use the Kubernetes API server ({source:?})"))?,
        ),
        None => None,
    };
    let client = match &kube_config {
        Some(config) => Some(
            kube::Client::try_from(config.clone())
                .context("cannot use the Kubernetes API server")?,
        ),
        None => None,
    };
    let internal_ip = match args.node_ip {
        Some(ip) => Some(ip),
        None => match env("POD_IP").filter(|ip| !ip.is_empty()) {
            Some(ip) => Some(
                ip.parse()
                    .with_context(|| format!("POD_IP {ip:?} is not an IP address"))?,
            ),
            None => None,
        },
    };
    let hostname = match args.node_hostname.clone() {
        Some(name) if resolves(&name).await => Some(name),
        Some(name) => {
            tracing::warn!(%name, "--node-hostname does not resolve; reporting only the InternalIP address");
            None
        }
        None => None,
    };
    // Bound before anything starts, so that a taken port fails the start.
    let healthz = match args.healthz_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on --healthz-addr {addr}"))?,
        ),
        None => None,
    };
    if args.mesh.insecure_trust_any && client.is_some() {
        bail!(
            "--insecure-trust-any is refused for a node of a Kubernetes cluster: any peer \
             could take its pods with their secrets; enroll agents with join tokens instead"
        );
    }
    let keypair = identity(&args.mesh)?;
    let cancel = shutdown_token()?;
    let metrics = Metrics::new();
    let agents = trusted_peers(&args.mesh, args.trust_agents.iter().copied(), &cancel);
    let trust_store = node_trust_store(&args, client.as_ref(), &agents).await?;
    let epoch_floor = match &trust_store {
        // Counted, not read off the clock: a clock stepped back cannot lower it.
        Some(store) => {
            let doc = store
                .update(&mut |doc| doc.owner_starts += 1)
                .await
                .with_context(|| format!("cannot count this start in {}", store.place()))?;
            owner::epoch_floor(doc.owner_starts)
        }
        None => OwnerConfig::default().epoch_floor,
    };
    let client_key_path = args.mesh.state_dir.join(CLIENT_KEY_FILE);
    let client_key = load_or_create_key(&client_key_path)?;
    let clients = TrustedPeers::new(
        args.trust_clients
            .iter()
            .copied()
            .chain([client_key.public().to_peer_id()]),
    );
    let (directory, queries) = NodeDirectory::new();
    let health = Health::new(directory.clone());
    if let Some(listener) = healthz {
        tokio::spawn(health.clone().serve(listener, cancel.clone()));
    }
    let gossip = {
        let agents = agents.clone();
        let clients = clients.clone();
        GossipFilter::new([Topic::Heartbeats], move |peer| agents.trusts(peer))
            .with_requests_from(move |peer| clients.trusts(peer))
    };
    let (mesh, events, mesh_task) = join_mesh(
        &args.mesh,
        keypair.clone(),
        vec![Topic::Heartbeats],
        gossip,
        &metrics,
        &cancel,
    )?;
    let peer = mesh.local_peer_id();
    let enrollment = trust_store
        .map(|store| NodeEnrollment::new(store, agents.clone(), metrics.clone(), mesh.clone()));
    if let Some(dir) = &args.pod_manifest_path {
        println!("node {peer} owns the pods in {}", dir.display());
    }
    let api_cancel = CancellationToken::new();
    let own_nameserver = || {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        dns::parse_resolv_conf(&text)
            .nameservers
            .first()
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
    };
    let cluster_dns = match (&source, args.cluster_dns) {
        (_, Some(given)) => Some(given),
        // In a pod, its nameserver is the cluster's DNS Service; standalone, the names
        // that are not the node's Services' are the host's business.
        (Some(cluster::ConfigSource::InCluster) | None, None) => own_nameserver(),
        (Some(_), None) => None,
    };
    match cluster_dns {
        Some(upstream) => {
            tracing::info!(%upstream, domain = %args.cluster_domain, "mesh pods' DNS queries come to this node, and go on to the upstream resolver unless they are for its Services")
        }
        None if source.is_some() => tracing::warn!(
            "no --cluster-dns: mesh pods with dnsPolicy ClusterFirst use their agents' resolvers"
        ),
        None => {}
    }
    let (api, api_tasks) = match (client.clone(), &kube_config) {
        (Some(client), Some(kube_config)) => {
            if internal_ip.is_none() {
                tracing::warn!(
                    "no --node-ip or POD_IP: the API server cannot reach this node's kubelet API, nor Services its mesh pods"
                );
            }
            let identity = NodeIdentity {
                name: args.node_name.clone(),
                internal_ip,
                hostname,
                kubelet_port: args.kubelet_port,
            };
            let node_pod_cidrs = cluster::check_node_name(&client, &args.node_name)
                .await
                .context("cannot register the node (--node-name)")?;
            let cluster_cidrs: Vec<_> = [
                ("cluster pod CIDR (--cluster-cidr)", args.cluster_cidr),
                ("cluster service CIDR (--service-cidr)", args.service_cidr),
            ]
            .into_iter()
            .chain(
                node_pod_cidrs
                    .into_iter()
                    .map(|cidr| ("pod CIDR of the node's Node", cidr)),
            )
            .collect();
            subnets::check_apart(args.mesh_pod_cidr, &cluster_cidrs)
                .context("--mesh-pod-cidr must be apart from the cluster's addresses")?;
            if args.pod_manifest_path.is_some() {
                subnets::check_apart(args.mesh_service_cidr, &cluster_cidrs)
                    .context("--mesh-service-cidr must be apart from the cluster's addresses")?;
            }
            println!("node {peer} is Kubernetes node {}", args.node_name);
            let tunnel = kubelet::tunnel::TunnelConfig {
                mode: args.k3s_tunnel,
                node_name: args.node_name.clone(),
                kubelet_port: args.kubelet_port,
                dir: args.mesh.state_dir.join("kubelet"),
            };
            let tunnel_sessions = kubelet::tunnel::start(
                tunnel,
                client.clone(),
                kube_config,
                metrics.clone(),
                cancel.clone(),
            )
            .await
            .context("cannot open the k3s agent tunnel (--k3s-tunnel)")?;
            let gateway = internal_ip.map(|address| {
                let relay = gateway::Relay {
                    mesh: mesh.clone(),
                    directory: directory.clone(),
                    metrics: metrics.clone(),
                    // Set by the gateway's controller once it watches the pods.
                    policy: None,
                };
                gateway::Gateway::new(address, args.gateway_ports.clone(), relay)
            });
            let (link, tasks) = cluster::start(
                client,
                identity,
                tunnel_sessions,
                cluster::Options {
                    delete_node_on_exit: args.delete_node_on_exit,
                    relays_cluster_dns: cluster_dns.is_some(),
                },
                health.check("node-lease"),
                gateway,
                api_cancel.clone(),
            );
            (Some(link), tasks)
        }
        _ => (None, Vec::new()),
    };
    let config = NodeConfig {
        pod_manifest_path: args.pod_manifest_path.clone(),
        owner: OwnerConfig {
            offer_window: Duration::from_millis(args.offer_window_ms),
            agent_loss_timeout: Duration::from_secs(args.agent_loss_seconds),
            agents,
            clients,
            score_mode: args.score_mode,
            epoch_floor,
            lease: Duration::from_secs(args.lease_seconds),
            fencing_margin: Duration::from_secs(args.fencing_margin_seconds),
            node_name: args.node_name.clone(),
            pod_subnets,
            // The cluster's Services, and its pods (the endpoints of its Services, which
            // a headless Service's name resolves to).
            cluster_ranges: api
                .is_some()
                .then_some([args.service_cidr, args.cluster_cidr])
                .into_iter()
                .flatten()
                .chain(
                    args.pod_manifest_path
                        .is_some()
                        .then_some(args.mesh_service_cidr),
                )
                .collect(),
            // Standalone, the node is the domain's DNS (its Services' names).
            cluster_domain: (cluster_dns.is_some() || api.is_none())
                .then(|| args.cluster_domain.clone()),
            reject_too_big_after: api
                .is_some()
                .then(|| Duration::from_secs(args.agent_loss_seconds)),
            ..OwnerConfig::default()
        },
        enrollment,
        cluster_dns,
        mesh_service_cidr: args.mesh_service_cidr,
    };
    let serving = health.check("kubelet-api");
    let backend = KubeletBackend {
        mesh: mesh.clone(),
        directory,
        metrics: metrics.clone(),
    };
    start_kubelet_api(
        &args,
        internal_ip,
        client.as_ref(),
        backend,
        serving,
        &cancel,
    )
    .await?;
    let result = Node::new(config, keypair, mesh, metrics)
        .run(events, api, Some(queries), cancel.clone())
        .await
        .context("node stopped");
    // The API tasks finish first: the Node is marked NotReady (or deleted) on exit.
    api_cancel.cancel();
    let finishing = futures::future::join_all(api_tasks);
    if tokio::time::timeout(Duration::from_secs(10), finishing)
        .await
        .is_err()
    {
        tracing::warn!("the Kubernetes API did not answer in time on exit");
    }
    cancel.cancel();
    let _ = mesh_task.await;
    result
}

/// Where a node keeps its join tokens and enrolled agents: a Secret with
/// --trust-secret, else its state directory; None when it trusts every agent anyway
/// (--insecure-trust-any). The agents it enrolled are added to `agents`. A node that
/// nobody could ever join refuses to start.
async fn node_trust_store(
    args: &NodeArgs,
    client: Option<&kube::Client>,
    agents: &TrustedPeers,
) -> Result<Option<Arc<dyn TrustStore>>> {
    if agents.is_insecure() {
        return Ok(None);
    }
    let store = trust_store(
        args.trust_secret.as_ref(),
        client,
        Some(&args.mesh.state_dir),
    )?;
    let doc = store.load().await?;
    let now = unix_millis() / 1000;
    let usable_token = doc.tokens.iter().any(|t| !t.expired(now));
    agents.set_enrolled(doc.enrolled().collect::<Vec<_>>());
    if agents.is_empty() && !usable_token {
        bail!(
            "no agent can join this node: create a join token with `beemesh token create` \
             (in {}; agents pass it with --join), or list agents with --trust-agent",
            store.place()
        );
    }
    Ok(Some(store))
}

/// The trust store named by --trust-secret (with a client) or --state-dir.
fn trust_store(
    secret: Option<&cli::SecretRef>,
    client: Option<&kube::Client>,
    state_dir: Option<&std::path::Path>,
) -> Result<Arc<dyn TrustStore>> {
    match (secret, client, state_dir) {
        (Some(secret), Some(client), _) => {
            let namespace = secret
                .namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string());
            Ok(Arc::new(cluster::trust_secret::SecretTrustStore::new(
                client.clone(),
                &namespace,
                &secret.name,
            )))
        }
        (Some(_), None, _) => bail!("--trust-secret needs a Kubernetes API server"),
        (None, _, Some(dir)) => Ok(Arc::new(JsonStore::<TrustDoc>::open(dir, NODE_TRUST_FILE)?)),
        (None, _, None) => {
            bail!("pass --state-dir (the node's state directory) or --trust-secret (its Secret)")
        }
    }
}

/// What the kubelet API serves from: the node's pods, the mesh to their agents, and
/// the metrics its audit lines count into.
struct KubeletBackend {
    mesh: mesh::MeshHandle,
    directory: NodeDirectory,
    metrics: Metrics,
}

/// Serves the kubelet API on `--kubelet-port`: binding fails the start at once. In a
/// cluster, tokens and permissions are checked with the API server, client certificates
/// are verified against the cluster's client CA unless `--client-ca-file` names one, and
/// the serving certificate comes from a CSR unless `--tls-cert-file` names one.
async fn start_kubelet_api(
    args: &NodeArgs,
    internal_ip: Option<IpAddr>,
    client: Option<&kube::Client>,
    backend: KubeletBackend,
    serving_check: Check,
    cancel: &CancellationToken,
) -> Result<()> {
    let kubelet_dir = args.mesh.state_dir.join("kubelet");
    let addresses: Vec<IpAddr> = internal_ip.into_iter().collect();
    let serving = match (&args.tls_cert_file, &args.tls_private_key_file, client) {
        (Some(cert), Some(key), _) => Some(ServingCert::Files {
            cert: cert.clone(),
            key: key.clone(),
        }),
        // Obtained below, once the port is bound: a CSR may take a while.
        (_, _, Some(_)) => None,
        _ => Some(ServingCert::SelfSigned {
            dir: kubelet_dir.clone(),
            names: [
                args.node_name.clone(),
                "localhost".into(),
                "127.0.0.1".into(),
            ]
            .into_iter()
            .chain(addresses.iter().map(ToString::to_string))
            .collect(),
        }),
    };
    let client_ca = match (&args.client_ca_file, client) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(client)) => match cluster::client_ca(client).await {
            Ok(pem) => {
                let path = kubelet_dir.join("client-ca.crt");
                std::fs::create_dir_all(&kubelet_dir)
                    .and_then(|()| std::fs::write(&path, pem))
                    .with_context(|| format!("cannot write {}", path.display()))?;
                Some(path)
            }
            // Bearer tokens still work; the API server's own client certificate not.
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the cluster's client CA; pass --client-ca-file");
                None
            }
        },
        (None, None) => {
            tracing::warn!("no --client-ca-file: the kubelet API refuses every request");
            None
        }
    };
    if let Some(serving) = &serving {
        // Checked now, so that bad files fail the start.
        kubelet::tls::server_config(serving, client_ca.as_deref())
            .context("cannot set up the kubelet API's TLS")?;
    }
    let listener =
        kubelet::server::bind(SocketAddr::from(([0, 0, 0, 0], args.kubelet_port))).await?;
    let authorizer: Arc<dyn kubelet::auth::Authorizer> = match client {
        Some(client) => Arc::new(kubelet::auth::ApiServerAuth::new(
            client.clone(),
            args.node_name.clone(),
            kubelet::auth::CacheTtls {
                token: Duration::from_secs(args.authentication_token_webhook_cache_ttl),
                authorized: Duration::from_secs(args.authorization_webhook_cache_authorized_ttl),
                unauthorized: Duration::from_secs(
                    args.authorization_webhook_cache_unauthorized_ttl,
                ),
            },
        )),
        None => Arc::new(kubelet::auth::ClientCertsOnly),
    };
    let context = kubelet::server::Context {
        directory: backend.directory,
        mesh: backend.mesh,
        authorizer,
        node_name: args.node_name.clone(),
        started: k8s_openapi::jiff::Timestamp::now(),
        rates: Default::default(),
        metrics: backend.metrics,
    };
    let cluster_cert = client
        .cloned()
        .map(|client| (client, args.node_name.clone(), addresses, kubelet_dir));
    let cancel = cancel.clone();
    tokio::spawn(async move {
        let serving = match (serving, cluster_cert) {
            (Some(serving), _) => serving,
            (None, Some((client, node_name, addresses, dir))) => {
                serving_check.fail("waiting for the cluster to sign the serving certificate");
                match cluster_serving_cert(client, node_name, addresses, dir, &cancel).await {
                    Some(serving) => serving,
                    None => return,
                }
            }
            (None, None) => return,
        };
        match kubelet::tls::server_config(&serving, client_ca.as_deref()) {
            Ok(tls) => {
                serving_check.pass();
                kubelet::server::serve(listener, tls, context, cancel).await
            }
            Err(e) => {
                serving_check.fail(format!("cannot set up TLS: {e:#}"));
                tracing::error!(error = %format!("{e:#}"), "cannot set up the kubelet API's TLS")
            }
        }
    });
    Ok(())
}

/// The cluster-signed serving certificate, kept renewed; asks again every 30 s until
/// it comes (None if the node stops first).
async fn cluster_serving_cert(
    client: kube::Client,
    node_name: String,
    addresses: Vec<IpAddr>,
    dir: std::path::PathBuf,
    cancel: &CancellationToken,
) -> Option<ServingCert> {
    let spec = kubelet::csr::CertSpec {
        node_name,
        kind: kubelet::csr::CertKind::Serving { addresses },
    };
    loop {
        let obtained = tokio::select! {
            _ = cancel.cancelled() => return None,
            obtained = kubelet::csr::obtain(&client, &spec, &dir) => obtained,
        };
        match obtained {
            Ok(issued) => {
                let slot = kubelet::csr::CertSlot::new(issued.key);
                tokio::spawn(kubelet::csr::keep_renewed(
                    client,
                    spec,
                    dir,
                    slot.clone(),
                    issued.renew_at,
                ));
                return Some(ServingCert::Renewed(slot));
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no kubelet serving certificate from the cluster yet; asking again in 30 s");
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            }
        }
    }
}

async fn resolves(name: &str) -> bool {
    tokio::net::lookup_host((name, 0))
        .await
        .is_ok_and(|mut addrs| addrs.next().is_some())
}

async fn status(args: StatusArgs) -> Result<()> {
    let cancel = CancellationToken::new();
    // Without a key, a throwaway identity: the node then says it does not know it.
    let keypair = match &args.client_key {
        Some(path) => load_identity_file(path)?,
        None => libp2p::identity::Keypair::generate_ed25519(),
    };
    let config = MeshConfig {
        bootstrap: args.bootstrap.clone(),
        psk: args
            .mesh_psk_file
            .as_deref()
            .map(load_psk_file)
            .transpose()?,
        ..MeshConfig::default()
    };
    let (mesh, mut events, event_loop) = mesh::start(keypair, config, Metrics::new())?;
    let task = tokio::spawn(event_loop.run(cancel.clone()));
    let timeout = Duration::from_secs(args.timeout_seconds);
    let (peer, view) = tokio::time::timeout(timeout, async {
        loop {
            match events.recv().await {
                Some(MeshEvent::PeerConnected(peer)) => match query(&mesh, peer).await {
                    Ok(view) => return Ok((peer, view)),
                    Err(QueryFailed::Refused(e)) => return Err(e),
                    Err(QueryFailed::Unanswered(e)) => {
                        tracing::debug!(%peer, error = %format!("{e:#}"), "query failed")
                    }
                },
                Some(_) => {}
                None => bail!("the mesh stopped"),
            }
        }
    })
    .await
    .with_context(|| {
        format!(
            "no answer from {} within {}s",
            args.bootstrap
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            args.timeout_seconds
        )
    })??;
    print_view(&view, args.output, args.watch)?;
    if args.watch {
        watch(&mesh, peer, view, args.output).await?;
    }
    cancel.cancel();
    let _ = task.await;
    Ok(())
}

enum QueryFailed {
    /// The peer answered, and will not tell: asking again will not help.
    Refused(anyhow::Error),
    Unanswered(anyhow::Error),
}

async fn query(mesh: &MeshHandle, peer: libp2p::PeerId) -> Result<MeshView, QueryFailed> {
    match mesh.request(peer, Request::Query).await {
        Ok(Response::View(view)) => Ok(*view),
        Ok(Response::Declined { reason }) => Err(QueryFailed::Refused(anyhow::anyhow!(
            "{peer} refused: {reason}; ask with the node's client key \
             (--client-key <node state dir>/client.key) or a key it lists with --trust-client"
        ))),
        Ok(other) => Err(QueryFailed::Refused(anyhow::anyhow!(
            "{peer} answered {other:?}"
        ))),
        Err(e) => Err(QueryFailed::Unanswered(e.into())),
    }
}

/// How often `--watch` asks again.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Asks again until interrupted, printing the view whenever something in it changed
/// (not the seconds since each heartbeat, which always do).
async fn watch(
    mesh: &MeshHandle,
    peer: libp2p::PeerId,
    mut shown: MeshView,
    output: OutputFormat,
) -> Result<()> {
    let mut unanswered = false;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
        }
        match query(mesh, peer).await {
            Ok(view) => {
                unanswered = false;
                if !same_but_heartbeat_ages(&view, &shown) {
                    print_view(&view, output, true)?;
                    shown = view;
                }
            }
            Err(QueryFailed::Refused(e)) => return Err(e),
            Err(QueryFailed::Unanswered(e)) => {
                // Said once per outage; the watch goes on.
                if !std::mem::replace(&mut unanswered, true) {
                    eprintln!("{peer} does not answer ({e:#}); still asking");
                }
            }
        }
    }
}

fn same_but_heartbeat_ages(a: &MeshView, b: &MeshView) -> bool {
    let without_ages = |view: &MeshView| {
        let mut view = view.clone();
        for agent in &mut view.agents {
            agent.last_seen_secs = 0;
        }
        view
    };
    without_ages(a) == without_ages(b)
}

/// One view as asked for; a watch prints tables under the time and documents one
/// after another (JSON one a line, YAML `---`-separated).
fn print_view(view: &MeshView, output: OutputFormat, watching: bool) -> Result<()> {
    match (output, watching) {
        (OutputFormat::Json, false) => println!("{}", serde_json::to_string_pretty(view)?),
        (OutputFormat::Json, true) => println!("{}", serde_json::to_string(view)?),
        (OutputFormat::Yaml, _) => print!("---\n{}", serde_yaml::to_string(view)?),
        (OutputFormat::Table, watching) => {
            let now = unix_millis() as i64 / 1000;
            if watching {
                println!("{}", crate::node::timestamp());
            }
            print!("{}", tables::render_status(view, now));
            if watching {
                println!();
            }
        }
    }
    Ok(())
}

/// `beemesh token create|list|revoke`, on the node's trust file or Secret.
async fn token(args: TokenArgs) -> Result<()> {
    let client =
        match &args.trust_secret {
            Some(_) => {
                let env = |name: &str| std::env::var(name).ok();
                let source = cluster::config_source(args.kubeconfig.as_deref(), false, &env)
                    .context("--trust-secret needs a Kubernetes API server: pass --kubeconfig")?;
                Some(cluster::connect(&source).await.with_context(|| {
                    format!("cannot use the Kubernetes API server ({source:?})")
                })?)
            }
            None => None,
        };
    let store = trust_store(
        args.trust_secret.as_ref(),
        client.as_ref(),
        args.state_dir.as_deref(),
    )?;
    let now = unix_millis() / 1000;
    match args.command {
        TokenCommand::Create { ttl, uses } => {
            let token = JoinToken::generate().context("no randomness for a token")?;
            store
                .update(&mut |doc| doc.create_token(&token, now, ttl, uses))
                .await?;
            println!("{}", token.reveal());
            eprintln!(
                "agents join with: beemesh agent --join <token> --bootstrap <the node's multiaddr>"
            );
        }
        TokenCommand::List => {
            let doc = store.load().await?;
            let mut rows = vec![vec![
                "TOKEN".to_string(),
                "EXPIRES".into(),
                "USES LEFT".into(),
                "AGENTS".into(),
            ]];
            for t in &doc.tokens {
                let agents: Vec<String> = doc
                    .agents
                    .iter()
                    .filter(|a| a.token_id == t.id)
                    .map(|a| a.peer.to_string())
                    .collect();
                rows.push(vec![
                    t.id.clone(),
                    match t.expires_at {
                        None => "never".into(),
                        Some(_) if t.expired(now) => "expired".into(),
                        Some(at) => format!("in {}", human_age(at as i64 - now as i64)),
                    },
                    t.uses_left
                        .map_or_else(|| "unlimited".into(), |n| n.to_string()),
                    agents.join(","),
                ]);
            }
            print!("{}", tables::table(&rows));
            let orphans: Vec<String> = doc
                .agents
                .iter()
                .filter(|a| !doc.tokens.iter().any(|t| t.id == a.token_id))
                .map(|a| format!("{} (token {} gone)", a.peer, a.token_id))
                .collect();
            if !orphans.is_empty() {
                println!("\nagents whose token was deleted: {}", orphans.join(", "));
            }
        }
        TokenCommand::Revoke { what } => {
            let mut revoked = None;
            store.update(&mut |doc| revoked = doc.revoke(&what)).await?;
            match revoked {
                Some(crate::trust::join::Revoked::Token { id, agents }) => {
                    println!(
                        "revoked token {id} and {} agent(s) that joined with it",
                        agents.len()
                    );
                }
                Some(crate::trust::join::Revoked::Agent(peer)) => println!("revoked agent {peer}"),
                None => bail!("no token or enrolled agent {what:?} (see beemesh token list)"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node reports a Hostname address only if it resolves: API servers try it first.
    #[tokio::test]
    async fn only_resolvable_hostnames_count() {
        assert!(resolves("localhost").await);
        assert!(!resolves("beemesh.invalid").await);
    }
}
