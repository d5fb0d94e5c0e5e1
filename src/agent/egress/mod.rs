//! Mesh pods to cluster Services: a pod's TCP connections to its owner's cluster
//! ranges (the Service CIDR, see [`crate::wire::Assign::cluster_ranges`]) are
//! redirected by nftables ([`nft`]) to a proxy of this agent on the pod network's
//! gateway address, which reads where each was going (`SO_ORIGINAL_DST`) and relays it
//! over a [`CLUSTER_PROTOCOL`] stream to the pod's owner, which dials it inside the
//! cluster; its UDP flows there go the same way, their destinations read from
//! conntrack ([`udp`]). Only the pods this agent runs are redirected, each to its own owner. The
//! same way, a pod's DNS queries to its nameserver (the gateway address, see
//! `runtime::dns::ClusterDns`), over UDP and TCP, reach relays of this agent, which ask
//! the owner to ask the cluster's DNS.
//!
//! Before relaying, the agent asks the owner for the connection's route: a Service
//! endpoint that is a mesh pod is connected to straight through its own agent
//! ([`super::direct`]); the rest of the cluster's addresses go through the owner.

pub mod nft;
pub mod udp;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};

use ipnet::Ipv4Net;
use k8s_openapi::ByteString;
use libp2p::PeerId;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use super::direct::DirectEndpoints;
use crate::kubelet::relay::{
    read_datagram, read_u16_framed, request_stream, splice, write_datagram, write_u16_framed,
    MAX_DATAGRAM,
};
use crate::mesh::MeshHandle;
use crate::metrics::Metrics;
use crate::runtime::{MacAddress, PodNetwork};
use crate::wire::{
    ClusterDial, ClusterDnsQuery, Epoch, KubeletAnswer, PodRef, PodUid, Request, Response, Route,
    CLUSTER_PROTOCOL, DIRECT_PROTOCOL, MAX_DNS_MESSAGE, MAX_DNS_TCP_MESSAGE,
};

/// Connections relayed at once for all the agent's pods; more wait in the backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// DNS queries relayed at once for all the agent's pods; more over UDP are dropped and
/// counted (the pod's resolver asks again), more over TCP wait.
pub const MAX_DNS_QUERIES: usize = 256;
/// How long a pod's DNS connection may stay idle between queries.
const DNS_TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("cannot run nft: {0}")]
    Nft(std::io::Error),
    #[error("nft refused the agent's rules: {0}")]
    Rules(String),
}

/// One copy of a pod whose connections to its owner's cluster go through the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPod {
    pub pod: PodRef,
    pub owner: PeerId,
    pub epoch: Epoch,
    pub ip: Ipv4Addr,
    /// The pod's hardware address: its redirects match it too, so that a rule left by
    /// an agent that died never takes the traffic of another pod given the same IP.
    pub mac: Option<MacAddress>,
    pub subnet: Ipv4Net,
    pub ranges: Vec<Ipv4Net>,
    /// Its DNS queries go to its owner.
    pub dns: bool,
}

impl EgressPod {
    /// What the pod's connection (or UDP flow) to `to` asks its owner for, when `to` is
    /// in the owner's cluster ranges.
    fn dial(&self, to: SocketAddrV4, udp: bool) -> Result<ClusterDial, String> {
        if !self.ranges.iter().any(|r| r.contains(to.ip())) {
            return Err(format!("{to} is outside the owner's cluster ranges"));
        }
        Ok(ClusterDial {
            pod: self.pod.clone(),
            to: SocketAddr::V4(to),
            udp,
        })
    }
}

/// Cheap to clone; shared by the supervisors.
#[derive(Clone)]
pub struct Egress {
    state: Arc<Mutex<State>>,
    /// The table as last written; held while `nft` runs, one at a time.
    written: Arc<Mutex<Written>>,
    sources: Arc<RwLock<HashMap<Ipv4Addr, EgressPod>>>,
    mesh: MeshHandle,
    metrics: Metrics,
    endpoints: DirectEndpoints,
    connections: Arc<Semaphore>,
    dns_queries: Arc<Semaphore>,
    flows: udp::Flows,
    table: String,
    cancel: CancellationToken,
}

#[derive(Default)]
struct State {
    pods: HashMap<PodUid, EgressPod>,
    /// The relays of each pod network, on its gateway address.
    relays: HashMap<Ipv4Net, Relays>,
    /// Counts the changes to `pods`.
    generation: u64,
}

/// Which generation of the state the table was last written from, and how that went.
struct Written {
    generation: u64,
    outcome: Result<(), String>,
    /// The redirects the table holds; None while that is not known (nothing written
    /// yet, or a write failed), when the next write replaces the table.
    redirects: Option<HashMap<PodUid, nft::Redirect>>,
}

#[derive(Clone, Copy)]
struct Relays {
    proxy: SocketAddrV4,
    udp: SocketAddrV4,
    dns: nft::DnsRelays,
}

impl Egress {
    /// The agent's peer ID names its nftables table; its proxies stop with `cancel`.
    pub fn new(
        mesh: MeshHandle,
        metrics: Metrics,
        endpoints: DirectEndpoints,
        cancel: CancellationToken,
    ) -> Egress {
        Egress {
            state: Arc::default(),
            written: Arc::new(Mutex::new(Written {
                generation: 0,
                outcome: Ok(()),
                redirects: None,
            })),
            sources: Arc::default(),
            table: nft::table_name(&mesh.local_peer_id().to_string()),
            mesh,
            metrics,
            endpoints,
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            dns_queries: Arc::new(Semaphore::new(MAX_DNS_QUERIES)),
            flows: udp::Flows::default(),
            cancel,
        }
    }

    /// This agent's pods as other agents' granted connections reach them.
    pub fn endpoints(&self) -> DirectEndpoints {
        self.endpoints.clone()
    }

    /// Redirects the pod copy's connections to its owner's cluster ranges, in place of
    /// an older copy's.
    pub async fn admit(&self, pod: EgressPod) -> Result<(), EgressError> {
        let generation = {
            let mut state = self.state.lock().await;
            if state.pods.get(&pod.pod.uid) == Some(&pod) {
                return Ok(());
            }
            if let std::collections::hash_map::Entry::Vacant(entry) = state.relays.entry(pod.subnet)
            {
                entry.insert(self.listen(pod.subnet)?);
            }
            self.write_source(|sources| {
                sources.retain(|_, known| known.pod.uid != pod.pod.uid);
                sources.insert(pod.ip, pod.clone());
            });
            state.pods.insert(pod.pod.uid.clone(), pod);
            state.generation += 1;
            state.generation
        };
        self.write_table(generation).await
    }

    /// Ends the redirect of copy `epoch` of the pod (not a newer copy's).
    pub async fn remove(&self, uid: &PodUid, epoch: Epoch) {
        let generation = {
            let mut state = self.state.lock().await;
            if state.pods.get(uid).is_none_or(|p| p.epoch != epoch) {
                return;
            }
            state.pods.remove(uid);
            self.write_source(|sources| sources.retain(|_, known| known.pod.uid != *uid));
            state.generation += 1;
            state.generation
        };
        if let Err(e) = self.write_table(generation).await {
            tracing::warn!(%uid, error = %e, "cannot remove the pod's cluster redirect");
        }
    }

    /// Empties the agent's table, made if missing: what a crashed run left goes (the
    /// pods adopted are admitted again), and its chain is there before the first pod.
    pub async fn reset(&self) -> Result<(), EgressError> {
        let mut written = self.written.lock().await;
        let outcome = run_nft(&nft::replace_table(&self.table, [])).await;
        written.redirects = outcome.is_ok().then(HashMap::new);
        outcome
    }

    /// Stops the proxies and removes the table, since no proxy answers any more.
    pub async fn stop(&self) {
        self.cancel.cancel();
        let mut written = self.written.lock().await;
        written.redirects = None;
        if let Err(e) = run_nft(&nft::delete_table(&self.table)).await {
            tracing::warn!(error = %e, "cannot remove the agent's cluster redirects");
        }
    }

    fn write_source(&self, change: impl FnOnce(&mut HashMap<Ipv4Addr, EgressPod>)) {
        change(&mut self.sources.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// Writes the table as the state is now, unless a write from `generation` or later
    /// already did: one `nft` at a time, and the changes that queue up meanwhile go in
    /// the next write together (a burst of pods costs a few writes, not one each).
    /// Added pods have their rules added to the table as written; anything else, or an
    /// addition that fails (the table changed by hand, say), replaces the table.
    /// Removing rules or declaring the chain makes the kernel wait (about 15 ms here,
    /// against 3 ms for adding rules): a wait kept off the way to a new pod's start.
    async fn write_table(&self, generation: u64) -> Result<(), EgressError> {
        let mut written = self.written.lock().await;
        if written.generation >= generation {
            return written.outcome.clone().map_err(EgressError::Rules);
        }
        let (wanted, now) = {
            let state = self.state.lock().await;
            (self.redirects(&state), state.generation)
        };
        let additions = written
            .redirects
            .as_ref()
            .filter(|known| known.iter().all(|(uid, r)| wanted.get(uid) == Some(r)))
            .map(|known| {
                let added = wanted.iter().filter(|(uid, _)| !known.contains_key(*uid));
                nft::add_rules(&self.table, added.map(|(_, r)| r))
            });
        let added = match &additions {
            Some(script) if script.is_empty() => Some(Ok(())),
            Some(script) => Some(run_nft(script).await.inspect_err(|e| {
                tracing::debug!(error = %e, "cannot add to the agent's cluster redirects; replacing them")
            })),
            None => None,
        };
        let outcome = match added {
            Some(Ok(())) => Ok(()),
            _ => run_nft(&nft::replace_table(&self.table, wanted.values())).await,
        };
        written.generation = now;
        written.outcome = outcome.as_ref().map(|_| ()).map_err(ToString::to_string);
        written.redirects = outcome.is_ok().then_some(wanted);
        outcome
    }

    /// Each admitted pod's redirects.
    fn redirects(&self, state: &State) -> HashMap<PodUid, nft::Redirect> {
        state
            .pods
            .iter()
            .filter_map(|(uid, pod)| {
                let relays = state.relays.get(&pod.subnet)?;
                Some((
                    uid.clone(),
                    nft::Redirect {
                        pod_ip: pod.ip,
                        pod_mac: pod.mac,
                        ranges: pod.ranges.clone(),
                        proxy: relays.proxy,
                        udp_proxy: relays.udp,
                        dns: pod.dns.then_some(relays.dns),
                    },
                ))
            })
            .collect()
    }

    /// The relays on the network's gateway address, which exists once the runtime has
    /// brought the network's bridge up (`IP_FREEBIND`: bound before that too), on
    /// ports of their own: agents sharing a host and a network each have theirs.
    fn listen(&self, subnet: Ipv4Net) -> Result<Relays, EgressError> {
        let gateway = PodNetwork::on(subnet).gateway;
        let wanted = SocketAddrV4::new(gateway, 0);
        let error = |source| EgressError::Listen {
            address: wanted,
            source,
        };
        let listener = |socket: socket2::Socket| TcpListener::from_std(socket.into());
        let proxy =
            listener(bind_freely(wanted, socket2::Type::STREAM).map_err(error)?).map_err(error)?;
        let dns_tcp =
            listener(bind_freely(wanted, socket2::Type::STREAM).map_err(error)?).map_err(error)?;
        let dns = UdpSocket::from_std(
            bind_freely(wanted, socket2::Type::DGRAM)
                .map_err(error)?
                .into(),
        )
        .map_err(error)?;
        let udp = UdpSocket::from_std(
            bind_freely(wanted, socket2::Type::DGRAM)
                .map_err(error)?
                .into(),
        )
        .map_err(error)?;
        let relays = Relays {
            proxy: v4(proxy.local_addr().map_err(error)?, wanted),
            udp: v4(udp.local_addr().map_err(error)?, wanted),
            dns: nft::DnsRelays {
                udp: v4(dns.local_addr().map_err(error)?, wanted),
                tcp: v4(dns_tcp.local_addr().map_err(error)?, wanted),
            },
        };
        tracing::info!(proxy = %relays.proxy, udp = %relays.udp, dns = %relays.dns.udp, dns_tcp = %relays.dns.tcp, %subnet, "relaying the pod network's cluster connections and DNS queries");
        tokio::spawn(self.clone().accept(proxy));
        tokio::spawn(self.clone().relay_dns(dns));
        tokio::spawn(self.clone().relay_dns_tcp(dns_tcp));
        tokio::spawn(self.clone().relay_udp(udp, relays.udp));
        Ok(relays)
    }

    /// Relays each pod's DNS queries over UDP to its owner and the answers back.
    async fn relay_dns(self, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let mut query = vec![0u8; MAX_DNS_MESSAGE];
        loop {
            let received = tokio::select! {
                _ = self.cancel.cancelled() => return,
                received = socket.recv_from(&mut query) => received,
            };
            let Ok((len, SocketAddr::V4(client))) = received else {
                continue;
            };
            tracing::debug!(%client, bytes = len, "DNS query received");
            let Some(source) = self.dns_source(*client.ip()) else {
                continue;
            };
            let Ok(permit) = self.dns_queries.clone().try_acquire_owned() else {
                self.metrics.dropped("cluster_dns", "too_many");
                tracing::debug!(pod = %source.pod, "DNS query dropped: too many in flight");
                continue;
            };
            let (egress, socket, query) = (self.clone(), socket.clone(), query[..len].to_vec());
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(answer) = egress.ask_owner(&source, query, false).await {
                    let sent = socket.send_to(&answer, client).await;
                    tracing::debug!(pod = %source.pod, %client, bytes = answer.len(), ?sent, "DNS answer relayed");
                }
            });
        }
    }

    /// Relays each pod's DNS connections (a client asks over TCP after a truncated
    /// answer): their queries one by one to the owner, the answers back.
    async fn relay_dns_tcp(self, listener: TcpListener) {
        while let Some((permit, accepted)) = self.next_connection(&listener).await {
            let Ok((mut client, SocketAddr::V4(peer))) = accepted else {
                continue;
            };
            let Some(source) = self.dns_source(*peer.ip()) else {
                continue;
            };
            let egress = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut query = Vec::new();
                loop {
                    let read = tokio::select! {
                        _ = egress.cancel.cancelled() => return,
                        read = tokio::time::timeout(
                            DNS_TCP_IDLE,
                            read_u16_framed(&mut client, &mut query, MAX_DNS_MESSAGE),
                        ) => read,
                    };
                    // Idle, closed, or a query over the limit: the connection ends.
                    let Ok(Ok(Some(_))) = read else { return };
                    let Ok(_query_permit) = egress.dns_queries.clone().acquire_owned().await else {
                        return;
                    };
                    let Some(answer) = egress.ask_owner(&source, query.clone(), true).await else {
                        return;
                    };
                    if write_u16_framed(&mut client, &answer).await.is_err() {
                        return;
                    }
                    tracing::debug!(pod = %source.pod, client = %peer, bytes = answer.len(), "DNS answer relayed over TCP");
                }
            });
        }
    }

    /// This agent's pod at `address`.
    fn source(&self, address: Ipv4Addr) -> Option<EgressPod> {
        self.sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&address)
            .cloned()
    }

    /// The pod of this agent at `client` whose DNS queries its owner answers; None
    /// (counted) for any other address.
    fn dns_source(&self, client: Ipv4Addr) -> Option<EgressPod> {
        let source = self.source(client).filter(|pod| pod.dns);
        if source.is_none() {
            self.metrics.dropped("cluster_dns", "not_a_pod");
            tracing::debug!(%client, "DNS query from an address that is not a pod of this agent dropped");
        }
        source
    }

    /// The owner's answer to one of its pod's DNS queries; None (counted) without one.
    async fn ask_owner(&self, source: &EgressPod, query: Vec<u8>, tcp: bool) -> Option<Vec<u8>> {
        let limit = if tcp {
            MAX_DNS_TCP_MESSAGE
        } else {
            MAX_DNS_MESSAGE
        };
        let request = Request::ClusterDns(ClusterDnsQuery {
            pod: source.pod.clone(),
            query: ByteString(query),
            tcp,
        });
        match self.mesh.request(source.owner, request).await {
            Ok(Response::ClusterDns { answer }) if answer.0.len() <= limit => Some(answer.0),
            Ok(other) => {
                self.metrics.dropped("cluster_dns", "no_answer");
                tracing::debug!(pod = %source.pod, answer = ?other, "DNS query not answered");
                None
            }
            Err(e) => {
                self.metrics.dropped("cluster_dns", "owner_unreachable");
                tracing::debug!(pod = %source.pod, error = %e, "DNS query not relayed");
                None
            }
        }
    }

    /// Relays the pods' UDP flows to their owners' cluster ranges. The redirect hides
    /// where a datagram was going, so each flow's first datagram asks conntrack; the
    /// answers go back through this socket, which conntrack makes look as if from where
    /// the pod sent.
    async fn relay_udp(self, socket: UdpSocket, proxy: SocketAddrV4) {
        let socket = Arc::new(socket);
        let mut datagram = vec![0u8; MAX_DATAGRAM];
        loop {
            let received = tokio::select! {
                _ = self.cancel.cancelled() => return,
                received = socket.recv_from(&mut datagram) => received,
            };
            let Ok((len, SocketAddr::V4(from))) = received else {
                continue;
            };
            let payload = &datagram[..len];
            match self.flows.send(from, payload) {
                udp::Handed::Queued => continue,
                udp::Handed::NoFlow => {}
                udp::Handed::Dropped => {
                    self.metrics.dropped("cluster_udp", "queue_full");
                    continue;
                }
            }
            let Some(source) = self.source(*from.ip()) else {
                self.metrics.dropped("cluster_udp", "not_a_pod");
                continue;
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                self.metrics.dropped("cluster_udp", "too_many");
                continue;
            };
            let mut queued = self.flows.open(from);
            let _ = self.flows.send(from, payload);
            let (egress, socket) = (self.clone(), socket.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let relayed = tokio::select! {
                    _ = egress.cancel.cancelled() => Ok(()),
                    relayed = egress.relay_flow(&source, proxy, from, &socket, &mut queued) => relayed,
                };
                egress.flows.close(from);
                match relayed {
                    Ok(()) => egress.metrics.cluster_connection("relayed_udp"),
                    Err(reason) => {
                        egress.metrics.cluster_connection("refused");
                        tracing::debug!(pod = %source.pod, %from, %reason, "pod's UDP flow not relayed");
                    }
                }
            });
        }
    }

    /// Relays one UDP flow of the pod at `from` until it is idle for
    /// [`udp::FLOW_IDLE`]: its datagrams to a stream to the owner, the answers back.
    async fn relay_flow(
        &self,
        source: &EgressPod,
        proxy: SocketAddrV4,
        from: SocketAddrV4,
        socket: &UdpSocket,
        queued: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), String> {
        let to = tokio::task::spawn_blocking(move || udp::original_destination(proxy, from))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("no original destination: {e}"))?;
        let dial = source.dial(to, true)?;
        let stream = request_stream(&self.mesh, source.owner, CLUSTER_PROTOCOL, &dial)
            .await
            .map_err(|(_, message)| message)?;
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut answer = Vec::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(udp::FLOW_IDLE) => return Ok(()),
                Some(datagram) = queued.recv() => write_datagram(&mut writer, &datagram).await,
                read = read_datagram(&mut reader, &mut answer) => match read {
                    Ok(Some(_)) => {
                        let _ = socket.send_to(&answer, from).await;
                        Ok(())
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => Err(e),
                },
            }
            .map_err(|e| e.to_string())?;
        }
    }

    /// The next connection to `listener` once one of [`MAX_CONNECTIONS`] is free, with
    /// that permit; None once the agent stops.
    async fn next_connection(
        &self,
        listener: &TcpListener,
    ) -> Option<(
        tokio::sync::OwnedSemaphorePermit,
        std::io::Result<(TcpStream, SocketAddr)>,
    )> {
        let permit = tokio::select! {
            _ = self.cancel.cancelled() => return None,
            permit = self.connections.clone().acquire_owned() => permit.ok()?,
        };
        tokio::select! {
            _ = self.cancel.cancelled() => None,
            accepted = listener.accept() => Some((permit, accepted)),
        }
    }

    async fn accept(self, listener: TcpListener) {
        while let Some((permit, accepted)) = self.next_connection(&listener).await {
            let Ok((client, peer)) = accepted else {
                continue;
            };
            let egress = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = egress.cancel.cancelled() => {}
                    result = egress.relay(client, peer) => match result {
                        Ok(how) => egress.metrics.cluster_connection(how),
                        Err(reason) => {
                            egress.metrics.cluster_connection("refused");
                            tracing::debug!(%peer, %reason, "pod's cluster connection not relayed");
                        }
                    },
                }
            });
        }
    }

    /// Relays one redirected connection where the owner of the pod it comes from
    /// routes it: `relayed` through the owner, or `direct` to a Service's endpoint.
    async fn relay(&self, mut client: TcpStream, peer: SocketAddr) -> Result<&'static str, String> {
        let SocketAddr::V4(peer) = peer else {
            return Err("not an IPv4 client".into());
        };
        let to = socket2::SockRef::from(&client)
            .original_dst_v4()
            .map_err(|e| format!("no original destination: {e}"))?
            .as_socket_ipv4()
            .ok_or("no original IPv4 destination")?;
        let source = self.source(*peer.ip()).ok_or("not a pod of this agent")?;
        let dial = source.dial(to, false)?;
        let route = match self
            .mesh
            .request(source.owner, Request::Route(dial.clone()))
            .await
        {
            Ok(Response::Route(route)) => Ok(route),
            Ok(Response::Declined { reason }) => Err(reason),
            Ok(other) => Err(format!("the owner did not route it: {other:?}")),
            Err(e) => Err(format!("the owner is unreachable: {e}")),
        };
        let upstream = match route {
            Ok(Route::Owner) => request_stream(&self.mesh, source.owner, CLUSTER_PROTOCOL, &dial)
                .await
                .map(|stream| ("relayed", Upstream::Mesh(stream))),
            Ok(Route::Direct(grant)) if grant.to.0 == self.endpoints.me => self
                .endpoints
                .connect(&grant, self.endpoints.me)
                .await
                .map(|pod| ("direct", Upstream::Local(pod)))
                .map_err(|answer| match answer {
                    KubeletAnswer::Failed { code, message } => (code, message),
                    KubeletAnswer::Ok => (500, "no connection".into()),
                }),
            Ok(Route::Direct(grant)) => {
                request_stream(&self.mesh, grant.to.0, DIRECT_PROTOCOL, &grant)
                    .await
                    .map(|stream| ("direct", Upstream::Mesh(stream)))
            }
            Err(reason) => Err((403, reason)),
        };
        let (how, upstream) = match upstream {
            Ok(opened) => opened,
            Err((_, message)) => {
                // The client sees a reset (when dropped), as from a Service without
                // endpoints.
                let _ = socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO));
                return Err(message);
            }
        };
        let _ = client.set_nodelay(true);
        let spliced = match upstream {
            Upstream::Mesh(mut stream) => splice(&mut client, &mut stream).await,
            Upstream::Local(mut pod) => splice(&mut client, &mut pod).await,
        };
        spliced.map(|_| how).map_err(|e| e.to_string())
    }
}

/// Where a relayed connection goes.
enum Upstream {
    /// A stream to the owner or to the endpoint's agent.
    Mesh(tokio_util::compat::Compat<libp2p::Stream>),
    /// A pod of this agent.
    Local(TcpStream),
}

/// A socket on `address` (port 0: one the kernel picks) before the address exists.
/// Never `SO_REUSEADDR`: two UDP sockets that both have it may be given the same port,
/// and the datagrams of one relay then reach another (measured: 140 of 3,000 such
/// sockets on one address shared a port; this was the lost DNS lookups of the tests,
/// whose agents share a pod network's gateway).
fn bind_freely(address: SocketAddrV4, kind: socket2::Type) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, kind, None)?;
    socket.set_freebind_v4(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::V4(address).into())?;
    if kind == socket2::Type::STREAM {
        socket.listen(1024)?;
    }
    Ok(socket)
}

fn v4(address: SocketAddr, or: SocketAddrV4) -> SocketAddrV4 {
    match address {
        SocketAddr::V4(address) => address,
        SocketAddr::V6(_) => or,
    }
}

async fn run_nft(script: &str) -> Result<(), EgressError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(EgressError::Nft)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(EgressError::Nft)?;
    }
    let output = child.wait_with_output().await.map_err(EgressError::Nft)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(EgressError::Rules(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}
