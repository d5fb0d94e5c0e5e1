//! Mesh pods to cluster Services, the node's side: agents relay their pods'
//! connections to the cluster's Service addresses (see `agent::egress`) over
//! [`CLUSTER_PROTOCOL`] streams, and the node dials each inside the cluster, where
//! kube-proxy (or whatever implements Services) takes it on. Deny by default: only the
//! agent a pod of this node is placed on may ask for it, and only for a port a Service
//! serves on its ClusterIP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use libp2p::{PeerId, StreamProtocol};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use super::endpoints::endpoint_serves;
use super::Relay;
use crate::kubelet::relay::{
    answer, answer_and_splice, read_header, read_u16_framed, relay_datagrams, write_u16_framed,
    RelayError,
};
use crate::node::network_policy;
use crate::node::ApiNetwork;
use crate::wire::{
    ClusterDial, KubeletAnswer, CLUSTER_PROTOCOL, MAX_DNS_MESSAGE, MAX_DNS_TCP_MESSAGE,
};

/// How long the node tries to connect inside the cluster.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the cluster's DNS has to answer a relayed query.
const DNS_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the cluster's DNS at `upstream` one query, over TCP when `tcp` (a client asks
/// again so after a truncated answer); its answer.
pub async fn ask_dns(upstream: SocketAddr, query: &[u8], tcp: bool) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        if tcp {
            let mut stream = TcpStream::connect(upstream).await?;
            let mut answer = Vec::new();
            write_u16_framed(&mut stream, query)
                .await
                .map_err(io_error)?;
            return match read_u16_framed(&mut stream, &mut answer, MAX_DNS_TCP_MESSAGE).await {
                Ok(Some(_)) => Ok(answer),
                Ok(None) => Err(std::io::ErrorKind::UnexpectedEof.into()),
                Err(e) => Err(io_error(e)),
            };
        }
        let socket = udp_socket(upstream).await?;
        socket.send(query).await?;
        let mut answer = vec![0u8; MAX_DNS_MESSAGE];
        let len = socket.recv(&mut answer).await?;
        answer.truncate(len);
        Ok(answer)
    };
    tokio::time::timeout(DNS_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the cluster's DNS did not answer",
            )
        })?
}

fn io_error(e: RelayError) -> std::io::Error {
    match e {
        RelayError::Io(e) => e,
        other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// Whether a Service serves `protocol` (as the API names it) on `to`: one of its
/// ClusterIPs and ports.
pub fn service_serves(service: &Service, to: SocketAddr, protocol: &str) -> bool {
    let Some(spec) = &service.spec else {
        return false;
    };
    let ips = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter());
    let on_ip = ips
        .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
        .any(|ip| ip == to.ip());
    on_ip
        && spec.ports.iter().flatten().any(|port| {
            i32::from(to.port()) == port.port
                && port.protocol.as_deref().unwrap_or("TCP") == protocol
        })
}

/// Serves the agents' cluster connections until cancelled.
pub async fn serve(relay: Relay, network: ApiNetwork, cancel: CancellationToken) {
    let mut incoming = match relay
        .mesh
        .accept_streams(StreamProtocol::new(CLUSTER_PROTOCOL))
    {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve mesh pods' connections to cluster Services");
            return;
        }
    };
    let connections = Arc::new(Semaphore::new(super::MAX_CONNECTIONS));
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return,
            next = incoming.next() => next,
        };
        let Some((agent, stream)) = next else {
            return;
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            relay.metrics.cluster_connection("refused");
            tracing::debug!(%agent, "too many cluster connections; one refused");
            continue;
        };
        let (relay, network, cancel) = (relay.clone(), network.clone(), cancel.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = cancel.cancelled() => {}
                result = connect(agent, stream, &relay, &network) => match result {
                    Ok(()) => relay.metrics.cluster_connection("relayed"),
                    Err(reason) => {
                        relay.metrics.cluster_connection("refused");
                        tracing::debug!(%agent, %reason, "cluster connection not relayed");
                    }
                },
            }
        });
    }
}

async fn connect(
    agent: PeerId,
    stream: libp2p::Stream,
    relay: &Relay,
    network: &ApiNetwork,
) -> Result<(), String> {
    let mut io = stream.compat();
    let dial: ClusterDial = read_header(&mut io).await.map_err(|e| e.to_string())?;
    let allowed = allowed(agent, &dial, relay, network).await;
    let failed = |(code, message)| KubeletAnswer::Failed { code, message };
    if dial.udp {
        let socket = match allowed {
            Ok(()) => udp_socket(dial.to)
                .await
                .map_err(|e| (502, format!("cannot send to {}: {e}", dial.to))),
            Err(refusal) => Err(refusal),
        };
        let socket = answer(&mut io, socket.map_err(failed)).await?;
        return relay_datagrams(io, &socket)
            .await
            .map_err(|e| e.to_string());
    }
    let upstream = match allowed {
        Ok(()) => tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(dial.to))
            .await
            .map_err(|_| (504, format!("connecting to {} timed out", dial.to)))
            .and_then(|connected| {
                connected.map_err(|e| (502, format!("cannot connect to {}: {e}", dial.to)))
            }),
        Err(refusal) => Err(refusal),
    };
    answer_and_splice(&mut io, upstream.map_err(failed)).await
}

/// A UDP socket of the node's that sends to `to` and hears only from it.
async fn udp_socket(to: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let bind: SocketAddr = match to {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    socket.connect(to).await?;
    Ok(socket)
}

/// The pod is this node's and placed on `agent`, and a Service serves `dial.to` (its
/// ClusterIP, or the address of one of its pods).
async fn allowed(
    agent: PeerId,
    dial: &ClusterDial,
    relay: &Relay,
    network: &ApiNetwork,
) -> Result<(), (u16, String)> {
    if relay.directory.placed_on(dial.pod.clone()).await != Some(agent) {
        return Err((403, format!("pod {} is not placed on this agent", dial.pod)));
    }
    let protocol = dial.protocol();
    let served = network
        .services
        .store
        .state()
        .iter()
        .any(|s| service_serves(s, dial.to, protocol))
        || endpoint_serves(
            network.slices.store.state().iter().map(AsRef::as_ref),
            dial.to,
            protocol,
        );
    if !served {
        return Err((403, format!("no Service serves {protocol} on {}", dial.to)));
    }
    let policy = relay.policy.as_ref().ok_or((
        503,
        "the cluster's NetworkPolicies are not watched yet".to_owned(),
    ))?;
    let port = network_policy::Port {
        number: dial.to.port(),
        protocol,
    };
    policy
        .allows_egress(&dial.pod, port)
        .map_err(|denied| (403, denied))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("service")
    }

    #[test]
    fn only_a_services_cluster_ips_and_ports_of_the_protocol_are_served() {
        let web = service(
            "metadata: {name: web}\nspec: {clusterIP: 10.43.0.20, clusterIPs: [10.43.0.20], ports: [{port: 80}, {port: 53, protocol: UDP}]}",
        );
        let to = |addr: &str| addr.parse::<SocketAddr>().expect("addr");
        assert!(service_serves(&web, to("10.43.0.20:80"), "TCP"));
        assert!(
            !service_serves(&web, to("10.43.0.20:80"), "UDP"),
            "TCP only"
        );
        assert!(
            !service_serves(&web, to("10.43.0.20:8080"), "TCP"),
            "another port"
        );
        assert!(service_serves(&web, to("10.43.0.20:53"), "UDP"));
        assert!(
            !service_serves(&web, to("10.43.0.20:53"), "TCP"),
            "UDP only"
        );
        assert!(
            !service_serves(&web, to("10.43.0.21:80"), "TCP"),
            "another address"
        );
        let headless = service(
            "metadata: {name: db}\nspec: {clusterIP: None, clusterIPs: [None], ports: [{port: 5432}]}",
        );
        assert!(!service_serves(&headless, to("10.43.0.20:5432"), "TCP"));
    }
}
