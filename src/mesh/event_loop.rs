//! The one task that owns the Swarm.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{gossipsub, identify, kad, ping, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::handle::Command;
use super::lanes::{Lane, Lanes};
use super::window::{Admitted, RequestWindow};
use super::{Behaviour, BehaviourEvent, MeshConfig, MeshError, MeshEvent, MAX_CONCURRENT_REQUESTS};
use crate::metrics::Metrics;
use crate::wire::{self, GossipMessage, Request, Response, Topic};

/// How often connected peers' gossip scores follow trust changes.
const RESCORE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// How often connections are checked for unanswered pings.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);
/// How often an overloaded program is warned about at most.
const OVERLOAD_WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// Times the application weight (10): far below the graylist threshold (-80).
const UNTRUSTED_SCORE: f64 = -1000.0;

/// Requests this peer keeps in flight to one other peer: half of what a connection
/// holds, the other half left for the other peer's requests (see `window`).
const REQUEST_WINDOW: usize = MAX_CONCURRENT_REQUESTS / 2;
/// Requests that may wait for room, per peer; beyond them a request fails at once.
const MAX_QUEUED_REQUESTS: usize = 1024;

type ReplyTo = oneshot::Sender<Result<Response, MeshError>>;
type PendingReply = BoxFuture<'static, (ResponseChannel<Response>, Option<Response>)>;

/// Owns the Swarm; everything else reaches it through [`super::MeshHandle`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    lanes: Lanes,
    config: MeshConfig,
    metrics: Metrics,
    /// Requests sent, with the peer they went to.
    pending_requests: HashMap<OutboundRequestId, (PeerId, ReplyTo)>,
    /// Requests per peer in flight, and those waiting for room (see `window`).
    outbound: RequestWindow<(Request, ReplyTo)>,
    /// Inbound requests waiting for the program's answer.
    pending_replies: FuturesUnordered<PendingReply>,
    listen_addrs: Vec<Multiaddr>,
    /// Connected peers, with the lane their connection event went to: the
    /// disconnection follows it there, so the program sees the two in order.
    connected: HashMap<PeerId, Lane>,
    /// Said once while no peer can be reached, so that an agent that cannot reach its
    /// bootstrap address says why at the default log level without repeating it.
    isolation_reported: bool,
    /// When each open connection last answered a ping (or opened), except those
    /// whose peer does not speak ping; removed when it closes.
    pinged: HashMap<ConnectionId, Instant>,
    /// When an overloaded program was last warned about (said at most every 10 s).
    overload_warned: Option<Instant>,
}

impl EventLoop {
    pub(super) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        lanes: Lanes,
        config: MeshConfig,
        metrics: Metrics,
    ) -> Self {
        EventLoop {
            swarm,
            commands,
            lanes,
            config,
            metrics,
            pending_requests: HashMap::new(),
            outbound: RequestWindow::new(REQUEST_WINDOW, MAX_QUEUED_REQUESTS),
            pending_replies: FuturesUnordered::new(),
            listen_addrs: Vec::new(),
            connected: HashMap::new(),
            isolation_reported: false,
            pinged: HashMap::new(),
            overload_warned: None,
        }
    }

    /// Runs until `cancel` fires or every handle is dropped.
    pub async fn run(mut self, cancel: CancellationToken) {
        self.dial_bootstrap();
        let mut redial = tokio::time::interval(self.config.redial_interval);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescore = tokio::time::interval(RESCORE_INTERVAL);
        let mut liveness = tokio::time::interval(LIVENESS_CHECK);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let control = self.lanes.control_sender();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                // Control events that waited for room move on as the program reads.
                Ok(permit) = control.clone().reserve_owned(), if self.lanes.backlogged() => {
                    self.lanes.flush_one(permit);
                }
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                Some((channel, reply)) = self.pending_replies.next(), if !self.pending_replies.is_empty() => {
                    // No answer (the program dropped the request) closes the stream,
                    // which the requester sees as a failure.
                    if let Some(reply) = reply {
                        if self.swarm.behaviour_mut().requests.send_response(channel, reply).is_err() {
                            tracing::debug!("requester went away before the response was sent");
                        }
                    }
                }
                _ = redial.tick() => self.redial_lost_bootstrap_peers(),
                // Trust changes (an agent enrolls, one is revoked): gossip follows.
                _ = rescore.tick() => self.score_peers(),
                _ = liveness.tick() => self.close_silent_connections(),
            }
        }
        tracing::debug!("mesh event loop stopped");
    }

    /// A connection that has answered no ping for an interval and a timeout is stalled
    /// (a partition, a frozen peer): closed, so that a fresh one is dialled when the
    /// network comes back. libp2p's ping reports only every second failure, and the
    /// second (a new stream's negotiation timing out) only after about 30 s.
    fn close_silent_connections(&mut self) {
        let limit = super::PING_INTERVAL + super::PING_TIMEOUT;
        let silent: Vec<ConnectionId> = self
            .pinged
            .iter()
            .filter(|(_, answered)| answered.elapsed() > limit)
            .map(|(connection, _)| *connection)
            .collect();
        for connection in silent {
            self.pinged.remove(&connection);
            tracing::debug!(%connection, "no ping answered for {} s; closing the connection", limit.as_secs());
            self.swarm.close_connection(connection);
        }
    }

    fn score_peers(&mut self) {
        for peer in self.connected.keys().copied().collect::<Vec<_>>() {
            self.score_peer(peer);
        }
    }

    /// Untrusted peers get an application score far below gossipsub's graylist
    /// threshold: nothing is published to them and nothing they send is processed.
    fn score_peer(&mut self, peer: PeerId) {
        let score = if self.config.accept_gossip.talks_to(&peer) {
            0.0
        } else {
            UNTRUSTED_SCORE
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .set_application_score(&peer, score);
    }

    fn dial_bootstrap(&mut self) {
        for addr in self.config.bootstrap.clone() {
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "cannot dial bootstrap peer");
            }
        }
    }

    /// Bootstrap peers that are not connected are dialled again, so that a peer comes
    /// back into the mesh after the other side restarts or a partition heals.
    fn redial_lost_bootstrap_peers(&mut self) {
        for addr in self.config.bootstrap.clone() {
            let connected = match peer_of(&addr) {
                Some(peer) => self.connected.contains_key(&peer),
                None => !self.connected.is_empty(),
            };
            if !connected {
                let _ = self.swarm.dial(addr);
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish { topic, bytes, done } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(gossipsub::IdentTopic::new(topic.name()), bytes)
                    .map(|_| ())
                    .map_err(|e| MeshError::Publish {
                        topic,
                        reason: e.to_string(),
                    });
                let _ = done.send(result);
            }
            Command::Request {
                peer,
                request,
                done,
            } => match self.outbound.admit(peer, (request, done)) {
                Admitted::Send((request, done)) => self.send_request(peer, request, done),
                Admitted::Queued => {
                    let queued = self.outbound.queued() as i64;
                    self.metrics.mesh_requests_queued.set(queued);
                }
                Admitted::Full((_, done)) => {
                    self.metrics.request_failed("queue_full");
                    let _ = done.send(Err(MeshError::Request {
                        peer,
                        reason: format!(
                            "{MAX_QUEUED_REQUESTS} requests are already waiting to be sent to it"
                        ),
                    }));
                }
            },
            Command::ListenAddrs { done } => {
                let _ = done.send(self.listen_addrs.clone());
            }
            Command::TrustChanged => self.score_peers(),
        }
    }

    fn send_request(&mut self, peer: PeerId, request: Request, done: ReplyTo) {
        let id = self
            .swarm
            .behaviour_mut()
            .requests
            .send_request(&peer, request);
        self.pending_requests.insert(id, (peer, done));
    }

    /// A request has its answer or failed: it goes to whoever asked, and the next
    /// request waiting for room to that peer is sent (unless its asker gave up).
    fn request_finished(&mut self, id: OutboundRequestId, result: Result<Response, MeshError>) {
        let Some((peer, done)) = self.pending_requests.remove(&id) else {
            return;
        };
        let _ = done.send(result);
        while let Some((request, done)) = self.outbound.finished(&peer) {
            if !done.is_closed() {
                self.send_request(peer, request, done);
                break;
            }
        }
        self.metrics
            .mesh_requests_queued
            .set(self.outbound.queued() as i64);
    }

    /// The lane of a request or connection event: control for peers this one trusts.
    fn lane_of(&self, peer: &PeerId) -> Lane {
        if self.config.accept_gossip.prioritizes(peer) {
            Lane::Control
        } else {
            Lane::Untrusted
        }
    }

    /// Hands an event to the program without ever blocking the Swarm (see
    /// [`super::lanes`]); what no lane can hold is dropped and counted. A dropped
    /// request's stream closes unanswered, which its sender sees as a failure.
    fn emit(&mut self, lane: Lane, event: MeshEvent, kind: &str) {
        if self.lanes.send(lane, event).is_err() {
            self.metrics.dropped(kind, "overloaded");
            let now = Instant::now();
            if self
                .overload_warned
                .is_none_or(|at| now.duration_since(at) >= OVERLOAD_WARNING_INTERVAL)
            {
                self.overload_warned = Some(now);
                tracing::warn!(
                    kind,
                    ?lane,
                    "program is not keeping up with the mesh; events dropped (counted in beemesh_mesh_messages_dropped_total{{reason=\"overloaded\"}})"
                );
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match &event {
            SwarmEvent::ConnectionEstablished { connection_id, .. } => {
                self.pinged.insert(*connection_id, Instant::now());
            }
            SwarmEvent::ConnectionClosed { connection_id, .. } => {
                self.pinged.remove(connection_id);
            }
            _ => {}
        }
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => self.on_gossip(event),
            SwarmEvent::Behaviour(BehaviourEvent::Requests(event)) => self.on_request(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // Identify tells which addresses a peer listens on: Kademlia and
                // request-response dial them later.
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) => {
                tracing::trace!(%peer, "kademlia routing table updated");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                connection,
                result: Ok(_),
                ..
            })) => {
                self.pinged.insert(connection, Instant::now());
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                connection,
                result: Err(ping::Failure::Unsupported),
                ..
            })) => {
                // Such a peer's connection is never judged by pings.
                self.pinged.remove(&connection);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(failure),
            })) => {
                // Dead or stalled: a new connection is dialed (bootstrap peers are
                // redialed) rather than waiting out TCP's retransmission back-off. A
                // peer that does not speak ping at all (Unsupported) keeps its
                // connection.
                tracing::debug!(%peer, %failure, "ping failed; closing the connection");
                self.pinged.remove(&connection);
                self.swarm.close_connection(connection);
            }
            SwarmEvent::Behaviour(_) => {}
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address
                    .clone()
                    .with(Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::info!(address = %full, "listening");
                self.listen_addrs.push(full);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs
                    .retain(|a| !a.to_string().starts_with(&address.to_string()));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } if num_established.get() == 1 => {
                if endpoint.is_dialer() {
                    let addr = endpoint.get_remote_address().clone();
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
                if std::mem::take(&mut self.isolation_reported) {
                    tracing::info!(peer = %peer_id, "reached the mesh");
                }
                let lane = self.lane_of(&peer_id);
                self.connected.insert(peer_id, lane);
                self.score_peer(peer_id);
                self.metrics.mesh_peers.set(self.connected.len() as i64);
                tracing::debug!(peer = %peer_id, "peer connected");
                self.emit(lane, MeshEvent::PeerConnected(peer_id), "peer");
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                let lane = self
                    .connected
                    .remove(&peer_id)
                    .unwrap_or_else(|| self.lane_of(&peer_id));
                self.metrics.mesh_peers.set(self.connected.len() as i64);
                tracing::debug!(peer = %peer_id, "peer disconnected");
                self.emit(lane, MeshEvent::PeerDisconnected(peer_id), "peer");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                if self.connected.is_empty() && !self.isolation_reported {
                    self.isolation_reported = true;
                    tracing::warn!(error = %error, "cannot reach any mesh peer; dialling the bootstrap peers again every few seconds");
                } else {
                    tracing::debug!(peer = ?peer_id, error = %error, "dial failed");
                }
            }
            _ => {}
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = event
        else {
            return;
        };
        let Some(topic) = Topic::from_name(message.topic.as_str()) else {
            self.report(&message_id, &propagation_source, Reject);
            self.metrics.dropped("gossip", "unknown_topic");
            return;
        };
        // Strict validation guarantees a verified source on every delivered message.
        let Some(source) = message.source else {
            self.report(&message_id, &propagation_source, Reject);
            self.metrics.dropped(topic_kind(topic), "unsigned");
            return;
        };
        match wire::decode_gossip(topic, &message.data) {
            Ok(_) if !self.config.accept_gossip.accepts(topic, &source) => {
                // Not relayed; the relayer is not penalised (it may trust the signer).
                self.report(&message_id, &propagation_source, Ignore);
                self.metrics.dropped(topic_kind(topic), "untrusted");
                tracing::debug!(%source, %topic, "gossip from an untrusted peer dropped");
            }
            Ok(decoded) => {
                // Accepting a message forwards it to this peer's mesh for the topic, and
                // gossipsub walks every connection to pick the recipients: a cost per
                // message that grows with the connections (an owner of 3,000 agents spent
                // most of its core on it). With nobody in that mesh (an owner alone on its
                // heartbeats, agents that keep only their owners' connections) it would go
                // to nobody (BeeMesh has no explicit or floodsub peers), so it is taken
                // with `Ignore`: not forwarded, its sender not penalised.
                let relay = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .mesh_peers(&message.topic)
                    .next()
                    .is_some();
                self.report(
                    &message_id,
                    &propagation_source,
                    if relay { Accept } else { Ignore },
                );
                let kind = gossip_kind(&decoded);
                self.metrics.received(kind);
                self.emit(
                    Lane::Gossip,
                    MeshEvent::Gossip {
                        source,
                        message: decoded,
                    },
                    kind,
                );
            }
            Err(e) => {
                self.report(&message_id, &propagation_source, Reject);
                self.metrics.dropped(topic_kind(topic), e.kind());
                tracing::debug!(%source, %topic, error = %e, "dropped gossip message");
            }
        }
    }

    fn report(
        &mut self,
        id: &gossipsub::MessageId,
        from: &PeerId,
        acceptance: gossipsub::MessageAcceptance,
    ) {
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(id, from, acceptance);
    }

    fn on_request(&mut self, event: request_response::Event<wire::Request, Response>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let kind = request.kind();
                self.metrics.received(kind);
                let (reply, answer) = oneshot::channel();
                self.emit(
                    self.lane_of(&peer),
                    MeshEvent::Request {
                        peer,
                        request,
                        reply,
                    },
                    kind,
                );
                self.pending_replies
                    .push(async move { (channel, answer.await.ok()) }.boxed());
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                self.request_finished(request_id, Ok(response));
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.metrics.request_failed("outbound");
                let reason = error.to_string();
                self.request_finished(request_id, Err(MeshError::Request { peer, reason }));
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                // Undecodable or oversized requests end up here: counted, never fatal.
                self.metrics
                    .dropped("request", inbound_failure_reason(&error));
                tracing::debug!(%peer, error = %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

/// The peer ID a multiaddr names (`/p2p/<peer>`), if any.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

fn topic_kind(topic: Topic) -> &'static str {
    match topic {
        Topic::Offers => "offer",
        Topic::Heartbeats => "heartbeat",
    }
}

fn gossip_kind(message: &GossipMessage) -> &'static str {
    topic_kind(message.topic())
}

fn inbound_failure_reason(error: &request_response::InboundFailure) -> &'static str {
    match error {
        request_response::InboundFailure::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            "malformed"
        }
        request_response::InboundFailure::Io(_) => "io",
        request_response::InboundFailure::Timeout => "timeout",
        request_response::InboundFailure::ConnectionClosed => "connection_closed",
        request_response::InboundFailure::UnsupportedProtocols => "unsupported_protocol",
        request_response::InboundFailure::ResponseOmission => "no_response",
    }
}
