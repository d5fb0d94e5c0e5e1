//! Which connections stay open while no protocol uses them: those to the peers this
//! one gossips with (an agent's owners, a node's agents). The others close once idle;
//! requests, streams and Kademlia lookups keep a connection while they run.
//!
//! Gossipsub holds a long-lived stream each way on every connection, and libp2p keeps
//! a connection open while any stream is (libp2p/rust-libp2p#5190), so every
//! connection a Kademlia lookup opened stayed open for good: an agent among 20 held one
//! to each of the others. [`Gossipsub`] wraps the behaviour so that its streams are not
//! counted, and keeps a connection for as long as its peer is one this peer gossips
//! with (asked on every poll: a peer trusted later, as an enrolled agent, is kept
//! from then on).

use std::ops::{Deref, DerefMut};
use std::task::{Context, Poll};

use futures::future::Either;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::gossipsub;
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound, FullyNegotiatedOutbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use super::GossipFilter;

/// Gossipsub's own handler.
type Inner = THandler<gossipsub::Behaviour>;

/// Gossipsub whose connections are kept for the peers `filter` talks to, and for no
/// others.
pub(crate) struct Gossipsub {
    inner: gossipsub::Behaviour,
    filter: GossipFilter,
}

impl Gossipsub {
    pub(crate) fn new(inner: gossipsub::Behaviour, filter: GossipFilter) -> Self {
        Gossipsub { inner, filter }
    }

    fn handler(&self, peer: PeerId, inner: Inner) -> Handler {
        Handler {
            inner,
            peer,
            filter: self.filter.clone(),
        }
    }
}

impl Deref for Gossipsub {
    type Target = gossipsub::Behaviour;

    fn deref(&self) -> &gossipsub::Behaviour {
        &self.inner
    }
}

impl DerefMut for Gossipsub {
    fn deref_mut(&mut self) -> &mut gossipsub::Behaviour {
        &mut self.inner
    }
}

impl NetworkBehaviour for Gossipsub {
    type ConnectionHandler = Handler;
    type ToSwarm = gossipsub::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<Handler, ConnectionDenied> {
        let inner = self.inner.handle_established_inbound_connection(
            connection,
            peer,
            local_addr,
            remote_addr,
        )?;
        Ok(self.handler(peer, inner))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(connection, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<Handler, ConnectionDenied> {
        let inner = self
            .inner
            .handle_established_outbound_connection(connection, peer, addr, role, port_use)?;
        Ok(self.handler(peer, inner))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer, connection, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<gossipsub::Event, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

/// Gossipsub's handler for one connection, its streams left out of the keep-alive
/// count.
pub(crate) struct Handler {
    inner: Inner,
    peer: PeerId,
    filter: GossipFilter,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = <Inner as ConnectionHandler>::FromBehaviour;
    type ToBehaviour = <Inner as ConnectionHandler>::ToBehaviour;
    type InboundProtocol = <Inner as ConnectionHandler>::InboundProtocol;
    type OutboundProtocol = <Inner as ConnectionHandler>::OutboundProtocol;
    type InboundOpenInfo = <Inner as ConnectionHandler>::InboundOpenInfo;
    type OutboundOpenInfo = <Inner as ConnectionHandler>::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol()
    }

    fn connection_keep_alive(&self) -> bool {
        self.filter.talks_to(&self.peer)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        self.inner.poll(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.inner.on_behaviour_event(event);
    }

    fn on_connection_event(
        &mut self,
        mut event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        match &mut event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: Either::Left((stream, _)),
                ..
            })
            | ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: (stream, _),
                ..
            }) => stream.ignore_for_keep_alive(),
            _ => {}
        }
        self.inner.on_connection_event(event);
    }
}
