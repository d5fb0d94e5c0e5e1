//! The libp2p mesh: one behaviour, one event loop that owns the Swarm, and a cheap
//! cloneable [`MeshHandle`] through which the rest of the program talks to it.
//!
//! Transports are TCP and QUIC with Noise and Yamux; peers find each other through
//! Kademlia (seeded with bootstrap addresses) and identify; gossipsub carries offers
//! and heartbeats (signed, strictly validated); request-response carries the direct
//! messages of [`crate::wire`]; raw streams (libp2p-stream, with Yamux's flow control)
//! carry the kubelet API's logs, exec and port-forward between node and agent.

mod codec;
mod event_loop;
mod handle;
mod keep_alive;
mod lanes;
mod window;

use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    connection_limits, gossipsub, identify, kad, memory_connection_limits, noise, ping,
    request_response, tcp, yamux,
};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::wire::{self, GossipMessage, Request, Response, Topic};

pub use codec::{read_declared, WireCodec};
pub use event_loop::{peer_of, EventLoop};
pub use handle::MeshHandle;
pub use lanes::MeshEvents;

/// Capacity of the command channel from the program to the event loop.
const CHANNEL_CAPACITY: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("the mesh event loop has stopped")]
    Stopped,
    #[error("request to {peer} failed: {reason}")]
    Request { peer: PeerId, reason: String },
    #[error("cannot publish on {topic}: {reason}")]
    Publish { topic: Topic, reason: String },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("cannot set up the transport: {0}")]
    Transport(String),
    #[error("cannot open a stream to {peer}: {reason}")]
    Stream { peer: PeerId, reason: String },
    #[error("{0} streams are already being accepted")]
    AlreadyAccepting(StreamProtocol),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
}

/// Whom a peer exchanges gossip with: it accepts and relays messages only on its
/// topics and only when signed by a peer it trusts (its relayer is not penalised for
/// the others: it may trust peers this one does not), and it neither sends gossip to nor
/// takes gossip from connected peers it does not trust (they are scored below
/// gossipsub's graylist threshold), so strangers learn nothing from it either.
#[derive(Clone)]
pub struct GossipFilter {
    topics: Vec<Topic>,
    trusts: Arc<TrustsPeer>,
    /// Whose requests take the control lane (see `lanes`): the gossip peers, unless
    /// more are named with [`GossipFilter::with_requests_from`].
    requesters: Option<Arc<TrustsPeer>>,
}

/// Whether a peer is trusted.
type TrustsPeer = dyn Fn(&PeerId) -> bool + Send + Sync;

impl GossipFilter {
    pub fn new(
        topics: impl IntoIterator<Item = Topic>,
        trusts: impl Fn(&PeerId) -> bool + Send + Sync + 'static,
    ) -> Self {
        GossipFilter {
            topics: topics.into_iter().collect(),
            trusts: Arc::new(trusts),
            requesters: None,
        }
    }

    /// Requests from these peers (as well as the gossip peers') go first: a node's
    /// clients, whose status queries must get through a stranger's flood too.
    pub fn with_requests_from(
        mut self,
        requesters: impl Fn(&PeerId) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.requesters = Some(Arc::new(requesters));
        self
    }

    /// Whether a peer's requests and connection events take the control lane.
    pub fn prioritizes(&self, peer: &PeerId) -> bool {
        self.talks_to(peer) || self.requesters.as_ref().is_some_and(|r| r(peer))
    }

    /// Every topic from every peer (for tests of the mesh itself).
    pub fn accept_all() -> Self {
        GossipFilter::new(Topic::ALL, |_| true)
    }

    pub fn accepts(&self, topic: Topic, source: &PeerId) -> bool {
        self.topics.contains(&topic) && (self.trusts)(source)
    }

    pub fn talks_to(&self, peer: &PeerId) -> bool {
        (self.trusts)(peer)
    }
}

/// Accepts nothing: a peer that wants gossip says from whom.
impl Default for GossipFilter {
    fn default() -> Self {
        GossipFilter::new([], |_| false)
    }
}

impl std::fmt::Debug for GossipFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipFilter")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

/// How a peer joins the mesh.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// The gossip topics whose messages this peer wants.
    pub subscribe: Vec<Topic>,
    /// Whose gossip on those topics is accepted and relayed.
    pub accept_gossip: GossipFilter,
    pub request_timeout: Duration,
    /// How often unreachable bootstrap peers are dialled again.
    pub redial_interval: Duration,
    /// A private mesh: only peers holding this key can connect at all.
    pub psk: Option<libp2p::pnet::PreSharedKey>,
    /// No new connection is accepted or dialled while the process's memory (RSS) is
    /// above this: whatever peers make it hold, the connections they would add are
    /// refused first.
    pub max_memory_bytes: usize,
    /// How long a connection that nothing uses stays open (one to a peer this one
    /// gossips with is always kept; see `keep_alive`).
    pub idle_timeout: Duration,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            listen: Vec::new(),
            bootstrap: Vec::new(),
            subscribe: Vec::new(),
            accept_gossip: GossipFilter::default(),
            request_timeout: Duration::from_secs(10),
            redial_interval: Duration::from_secs(3),
            psk: None,
            max_memory_bytes: 1 << 30,
            // Long enough that a lookup's or a request's peer is still connected for
            // the next one; short enough that what discovery opened is soon closed.
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// What the mesh tells the program.
#[derive(Debug)]
pub enum MeshEvent {
    /// A valid gossip message, `source` being the peer that signed it.
    Gossip {
        source: PeerId,
        message: GossipMessage,
    },
    /// A direct request; answer on `reply` (dropping it tells the peer nothing came).
    Request {
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Response>,
    },
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
}

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    gossipsub: keep_alive::Gossipsub,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    requests: request_response::Behaviour<WireCodec>,
    streams: libp2p_stream::Behaviour,
    limits: connection_limits::Behaviour,
    memory: memory_connection_limits::Behaviour,
}

/// Connections a peer may hold with one other peer (two when both dial at once), and
/// in all: what a hostile peer can open is bounded before any handshake work.
const MAX_CONNECTIONS_PER_PEER: u32 = 2;
const MAX_CONNECTIONS: u32 = 16_384;
const MAX_PENDING_INCOMING: u32 = 256;
/// Requests a connection may have in flight at once, each way.
pub(crate) const MAX_CONCURRENT_REQUESTS: usize = 32;

const KAD_PROTOCOL: &str = "/beemesh/kad/1.0.0";
const IDENTIFY_PROTOCOL: &str = "/beemesh/1.0.0";

impl Behaviour {
    fn new(keypair: &Keypair, config: &MeshConfig, metrics: &Metrics) -> Result<Self, MeshError> {
        let peer_id = keypair.public().to_peer_id();
        let gossip_config = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Strict)
            // Messages are decoded and checked before they are forwarded.
            .validate_messages()
            .max_transmit_size(wire::MAX_GOSSIP_BYTES + 4096)
            .heartbeat_interval(Duration::from_secs(1))
            .build()
            .map_err(|e| MeshError::Transport(e.to_string()))?;
        let mut gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(keypair.clone()),
            gossip_config,
        )
        .map_err(|e| MeshError::Transport(e.to_string()))?;
        let (params, thresholds) = peer_scoring();
        gossipsub
            .with_peer_score(params, thresholds)
            .map_err(|e| MeshError::Transport(e.to_string()))?;

        let mut kad = kad::Behaviour::with_config(
            peer_id,
            kad::store::MemoryStore::new(peer_id),
            kad::Config::new(StreamProtocol::new(KAD_PROTOCOL)),
        );
        // Peers on private networks never get a confirmed external address, which is
        // what automatic mode waits for; every BeeMesh peer answers DHT queries.
        kad.set_mode(Some(kad::Mode::Server));

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), keypair.public())
                .with_agent_version(format!("beemesh/{}", env!("CARGO_PKG_VERSION"))),
        );
        let requests = request_response::Behaviour::with_codec(
            WireCodec::new(metrics.clone()),
            [(
                StreamProtocol::new(wire::REQUEST_PROTOCOL),
                request_response::ProtocolSupport::Full,
            )],
            request_response::Config::default()
                .with_request_timeout(config.request_timeout)
                .with_max_concurrent_streams(MAX_CONCURRENT_REQUESTS),
        );
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
            .with_max_established(Some(MAX_CONNECTIONS))
            .with_max_pending_incoming(Some(MAX_PENDING_INCOMING));
        Ok(Behaviour {
            gossipsub: keep_alive::Gossipsub::new(gossipsub, config.accept_gossip.clone()),
            kad,
            identify,
            // A ping every 5 s, failed after 10 s without an answer: the event loop then
            // closes the connection (see `event_loop`).
            ping: ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(PING_INTERVAL)
                    .with_timeout(PING_TIMEOUT),
            ),
            requests,
            streams: libp2p_stream::Behaviour::new(),
            limits: connection_limits::Behaviour::new(limits),
            memory: memory_connection_limits::Behaviour::with_max_bytes(config.max_memory_bytes),
        })
    }
}

/// How often a connection is pinged, and how long an answer may take: a connection
/// that fails a ping, or that answered pings and then none for both together, is
/// closed, so that a partition shows as a disconnection within about 15 s, and a
/// healed one gets a fresh connection instead of a TCP connection whose
/// retransmissions backed off for as long as the partition lasted.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Gossipsub peer scoring: a peer that delivers invalid messages (undecodable, wrong
/// topic, unsigned) is soon below the graylist threshold and ignored. The other
/// components are tuned down for a mesh of few, quiet topics: rewards stay small,
/// sparse traffic is not a fault, and many agents may share one address (NAT).
fn peer_scoring() -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let topic = gossipsub::TopicScoreParams {
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 10.0,
        first_message_deliveries_cap: 10.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        // Two invalid messages take a peer past the graylist threshold (-80); the
        // penalty decays over about a minute.
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.95,
        ..gossipsub::TopicScoreParams::default()
    };
    let params = gossipsub::PeerScoreParams {
        topics: Topic::ALL
            .into_iter()
            .map(|t| (gossipsub::IdentTopic::new(t.name()).hash(), topic.clone()))
            .collect(),
        ip_colocation_factor_weight: 0.0,
        ..gossipsub::PeerScoreParams::default()
    };
    (params, gossipsub::PeerScoreThresholds::default())
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
}

/// Builds the swarm, starts listening and dials the bootstrap peers. Run the returned
/// [`EventLoop`]; talk to it through the [`MeshHandle`]; read its events from the
/// receiver.
pub fn start(
    keypair: Keypair,
    config: MeshConfig,
    metrics: Metrics,
) -> Result<(MeshHandle, MeshEvents, EventLoop), MeshError> {
    let local_peer_id = keypair.public().to_peer_id();
    let behaviour = Behaviour::new(&keypair, &config, &metrics)?;
    let streams = behaviour.streams.new_control();
    let transport = |e: &dyn std::fmt::Display| MeshError::Transport(e.to_string());
    let idle_timeout = config.idle_timeout;
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(idle_timeout);
    let builder = libp2p::SwarmBuilder::with_existing_identity(keypair).with_tokio();
    let mut swarm = match config.psk {
        None => builder
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| transport(&e))?
            .with_quic()
            .with_dns()
            .map_err(|e| transport(&e))?
            .with_behaviour(|_| behaviour)
            .map_err(|e| transport(&e))?
            .with_swarm_config(idle)
            .build(),
        // A private mesh: TCP only (QUIC has no place for the pre-shared key), every
        // connection encrypted with the key before Noise even starts.
        Some(psk) => {
            if let Some(addr) = config.listen.iter().find(|a| is_quic(a)) {
                return Err(MeshError::Listen {
                    addr: addr.clone(),
                    reason: "a private mesh (pre-shared key) runs over TCP only".into(),
                });
            }
            builder
                .with_other_transport(|key| {
                    use libp2p::core::upgrade::Version;
                    use libp2p::Transport;
                    let noise = noise::Config::new(key)?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                            .and_then(move |socket, _| {
                                libp2p::pnet::PnetConfig::new(psk).handshake(socket)
                            })
                            .upgrade(Version::V1Lazy)
                            .authenticate(noise)
                            .multiplex(yamux::Config::default())
                            .timeout(Duration::from_secs(20))
                            .boxed(),
                    )
                })
                .map_err(|e| transport(&e))?
                .with_dns()
                .map_err(|e| transport(&e))?
                .with_behaviour(|_| behaviour)
                .map_err(|e| transport(&e))?
                .with_swarm_config(idle)
                .build()
        }
    };

    for topic in &config.subscribe {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&gossipsub::IdentTopic::new(topic.name()))
            .map_err(|e| MeshError::Transport(e.to_string()))?;
    }
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| MeshError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }

    let (command_tx, command_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (lanes, events) = lanes::lanes();
    let handle = MeshHandle::new(command_tx, local_peer_id, streams);
    let event_loop = EventLoop::new(swarm, command_rx, lanes, config, metrics);
    Ok((handle, events, event_loop))
}
