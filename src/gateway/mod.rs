//! The node as the cluster's gateway to mesh pods: a Service that selects mesh pods gets
//! EndpointSlices ([`endpoints`]) whose endpoints are the node's own address and a port
//! per pod port ([`ports`]); a connection to such a port (a flow of datagrams for UDP,
//! [`datagrams`]) is relayed over a libp2p stream to the pod's agent, which connects to
//! the pod (the path `kubectl port-forward` takes, with the same checks: only the pod's
//! owner may ask its agent). The other way, mesh pods' connections to cluster Services
//! come to the node from their agents and are dialed inside the cluster ([`cluster`]).

pub mod cluster;
mod datagrams;
pub mod endpoints;
pub mod ports;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use tokio_util::compat::Compat;

use crate::kubelet::relay::{request_agent, splice};
use crate::mesh::MeshHandle;
use crate::metrics::Metrics;
use crate::node::{network_policy, ApiNetwork, NodeDirectory};
use crate::wire::{KubeletRequest, PodRef};
use endpoints::{Protocol, Target};
use ports::{Exhausted, PortPool};

/// Connections relayed at once through all the gateway's ports; more wait in the
/// listen backlog.
pub const MAX_CONNECTIONS: usize = 4096;

/// What the relay needs to reach pods.
#[derive(Clone)]
pub struct Relay {
    pub mesh: MeshHandle,
    pub directory: NodeDirectory,
    pub metrics: Metrics,
    /// The cluster's NetworkPolicies and the node's pods, once watched: until then
    /// nothing is relayed.
    pub policy: Option<PolicyCheck>,
}

/// NetworkPolicy where the cluster and mesh pods meet at the node: the gateway knows a
/// cluster client only by its address, so only ipBlock peers (and rules open to all)
/// admit it; a mesh pod's connection into the cluster goes to some pod behind a
/// ClusterIP, which only egress rules open to all allow.
#[derive(Clone)]
pub struct PolicyCheck {
    pub network: ApiNetwork,
    /// The pods bound to the node.
    pub pods: Store<Pod>,
}

impl PolicyCheck {
    /// Whether a client at `from` in the cluster may reach `target`.
    fn allows(&self, target: &Target, from: IpAddr) -> Result<(), String> {
        let port = network_policy::Port {
            number: target.port,
            protocol: target.protocol.as_str(),
        };
        self.decide(&target.namespace, &target.pod, &target.uid, |policies, pod| {
            network_policy::ingress(policies, pod, port, network_policy::Peer::Address(from))
        })
        .map_err(|denied| format!("network policy {denied} denies {from} (connections from the cluster are told apart by address only)"))
    }

    /// Whether mesh pod `pod` may reach a cluster Service on `port`.
    pub fn allows_egress(&self, pod: &PodRef, port: network_policy::Port) -> Result<(), String> {
        self.decide(
            &pod.namespace,
            &pod.name,
            &pod.uid.0,
            |policies, subject| {
                let to = network_policy::Peer::ClusterService;
                network_policy::egress(policies, subject, to, port)
            },
        )
        .map_err(|denied| {
            format!("network policy {denied} denies pod {pod} connections into the cluster")
        })
    }

    /// The verdict on the node's pod `namespace/name` (of `uid`); Err names the
    /// policies that deny it, or why nothing can be decided.
    fn decide(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        verdict: impl FnOnce(&[&NetworkPolicy], &Pod) -> network_policy::Verdict,
    ) -> Result<(), String> {
        let policies = self
            .network
            .policies()
            .ok_or("the cluster's NetworkPolicies are not read yet")?;
        let pod = self
            .pods
            .get(&ObjectRef::new(name).within(namespace))
            .filter(|p| p.metadata.uid.as_deref() == Some(uid))
            .ok_or("the pod is gone")?;
        let refs: Vec<&NetworkPolicy> = policies.iter().map(AsRef::as_ref).collect();
        match verdict(&refs, &pod) {
            network_policy::Verdict::Allowed => Ok(()),
            network_policy::Verdict::Denied { policies } => Err(policies.join(", ")),
        }
    }
}

/// The gateway's ports and their listeners.
pub struct Gateway {
    address: IpAddr,
    pool: PortPool,
    listeners: HashMap<u16, CancellationToken>,
    relay: Relay,
    connections: Arc<Semaphore>,
}

impl Gateway {
    pub fn new(address: IpAddr, ports: std::ops::RangeInclusive<u16>, relay: Relay) -> Gateway {
        Gateway {
            address,
            pool: PortPool::new(ports),
            listeners: HashMap::new(),
            relay,
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    pub fn address(&self) -> IpAddr {
        self.address
    }

    pub fn relay(&self) -> Relay {
        self.relay.clone()
    }

    /// Connections are relayed from now on, as the cluster's NetworkPolicies allow.
    pub fn enforce(&mut self, policy: PolicyCheck) {
        self.relay.policy = Some(policy);
    }

    pub fn port(&self, target: &Target) -> Option<u16> {
        self.pool.get(target)
    }

    /// Serves exactly `wanted`: listeners of targets no longer wanted stop (their
    /// connections end), each new target gets a port and its listener. A port something
    /// else holds is passed over. Fails only when the range has no port left; the
    /// targets served before that are kept.
    pub fn serve(&mut self, wanted: &BTreeSet<Target>) -> Result<(), Exhausted> {
        for (target, port) in self.pool.retain(wanted) {
            if let Some(stop) = self.listeners.remove(&port) {
                stop.cancel();
                tracing::info!(pod = %target.pod, namespace = %target.namespace, port = target.port, gateway_port = port, "gateway port freed");
            }
        }
        for target in wanted {
            while self.pool.get(target).is_none() {
                let port = self.pool.allocate(target)?;
                let address = SocketAddr::new(self.address, port);
                let stop = CancellationToken::new();
                let (target, relay) = (target.clone(), self.relay.clone());
                let listening = match target.protocol {
                    Protocol::Tcp => bind_tcp(address).map(|listener| {
                        let connections = self.connections.clone();
                        tokio::spawn(accept(
                            listener,
                            target.clone(),
                            relay,
                            connections,
                            stop.clone(),
                        ));
                    }),
                    Protocol::Udp => bind_udp(address).map(|socket| {
                        tokio::spawn(datagrams::serve(
                            socket,
                            target.clone(),
                            relay,
                            stop.clone(),
                        ));
                    }),
                };
                match listening {
                    Ok(()) => {
                        self.listeners.insert(port, stop);
                        tracing::info!(pod = %target.pod, namespace = %target.namespace, port = target.port, protocol = target.protocol.as_str(), gateway_port = port, "gateway port open");
                    }
                    Err(e) => {
                        tracing::warn!(gateway_port = port, protocol = target.protocol.as_str(), error = %e, "gateway port unusable; passed over");
                        self.pool.block(port);
                    }
                }
            }
        }
        Ok(())
    }
}

fn bind_tcp(address: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

fn bind_udp(address: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(address)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for stop in self.listeners.values() {
            stop.cancel();
        }
    }
}

async fn accept(
    listener: TcpListener,
    target: Target,
    relay: Relay,
    connections: Arc<Semaphore>,
    stop: CancellationToken,
) {
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "gateway accept failed");
                continue;
            }
        };
        let (target, relay, stop) = (target.clone(), relay.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = stop.cancelled() => {}
                result = forward(client, peer.ip(), &target, &relay) => match result {
                    Ok(()) => relay.metrics.gateway_connection("relayed"),
                    Err(reason) => {
                        relay.metrics.gateway_connection("refused");
                        tracing::debug!(%peer, pod = %target.pod, port = target.port, %reason, "gateway connection not relayed");
                    }
                },
            }
        });
    }
}

/// Opens a stream to the target's agent for its pod's port, for a client at `from`: a
/// TCP connection or a flow of datagrams, as the target's protocol.
async fn open(
    target: &Target,
    relay: &Relay,
    from: IpAddr,
) -> Result<Compat<libp2p::Stream>, String> {
    match &relay.policy {
        Some(policy) => policy.allows(target, from).inspect_err(|_| {
            relay.metrics.gateway_connection("denied");
        })?,
        None => return Err("the cluster's NetworkPolicies are not watched yet".into()),
    }
    let pod = target.pod_ref();
    let agent = relay
        .directory
        .placed_on(pod.clone())
        .await
        .ok_or("the pod is gone or not placed")?;
    let (pod, port) = (pod.uid, target.port);
    let request = match target.protocol {
        Protocol::Tcp => KubeletRequest::PortForward { pod, port },
        Protocol::Udp => KubeletRequest::UdpForward { pod, port },
    };
    request_agent(&relay.mesh, agent, &request)
        .await
        .map_err(|(_, message)| message)
}

/// Relays one connection to the target pod's port through its agent.
async fn forward(
    mut client: TcpStream,
    from: IpAddr,
    target: &Target,
    relay: &Relay,
) -> Result<(), String> {
    let mut stream = open(target, relay, from).await?;
    let _ = client.set_nodelay(true);
    splice(&mut client, &mut stream)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}
