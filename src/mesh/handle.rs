//! The cheap, cloneable way into the mesh event loop.

use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use super::MeshError;
use crate::wire::{self, GossipMessage, Request, Response, Topic};

/// Commands the event loop carries out for a [`MeshHandle`].
#[derive(Debug)]
pub(crate) enum Command {
    Publish {
        topic: Topic,
        bytes: Vec<u8>,
        done: oneshot::Sender<Result<(), MeshError>>,
    },
    Request {
        peer: PeerId,
        request: Request,
        done: oneshot::Sender<Result<Response, MeshError>>,
    },
    ListenAddrs {
        done: oneshot::Sender<Vec<Multiaddr>>,
    },
    /// Whom to trust changed: connected peers' gossip standing follows at once.
    TrustChanged,
}

/// Talks to the mesh event loop over a bounded channel. Cloning is cheap.
#[derive(Clone)]
pub struct MeshHandle {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    streams: libp2p_stream::Control,
}

impl std::fmt::Debug for MeshHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshHandle")
            .field("local_peer_id", &self.local_peer_id)
            .finish_non_exhaustive()
    }
}

impl MeshHandle {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        local_peer_id: PeerId,
        streams: libp2p_stream::Control,
    ) -> Self {
        MeshHandle {
            commands,
            local_peer_id,
            streams,
        }
    }

    /// Opens a stream of `protocol` to `peer` (dialling it if needed). Yamux's flow
    /// control gives back-pressure: a slow reader slows the writer.
    pub async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<Stream, MeshError> {
        // Each clone of a control has its own slot, so concurrent opens do not queue.
        let mut control = self.streams.clone();
        control
            .open_stream(peer, protocol)
            .await
            .map_err(|e| MeshError::Stream {
                peer,
                reason: e.to_string(),
            })
    }

    /// Streams of `protocol` that peers open to us, with the peer that opened each.
    pub fn accept_streams(
        &self,
        protocol: StreamProtocol,
    ) -> Result<libp2p_stream::IncomingStreams, MeshError> {
        self.streams
            .clone()
            .accept(protocol.clone())
            .map_err(|_| MeshError::AlreadyAccepting(protocol))
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    async fn call<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MeshError> {
        let (done, answer) = oneshot::channel();
        self.commands
            .send(command(done))
            .await
            .map_err(|_| MeshError::Stopped)?;
        answer.await.map_err(|_| MeshError::Stopped)
    }

    /// Publishes a message on its topic. Encoding (and the size check) happens here,
    /// off the event loop.
    pub async fn publish(&self, message: &GossipMessage) -> Result<(), MeshError> {
        let bytes = wire::encode(message, wire::MAX_GOSSIP_BYTES)?;
        let topic = message.topic();
        self.call(|done| Command::Publish { topic, bytes, done })
            .await?
    }

    /// Sends a request to a peer and waits for its response.
    pub async fn request(&self, peer: PeerId, request: Request) -> Result<Response, MeshError> {
        self.call(|done| Command::Request {
            peer,
            request,
            done,
        })
        .await?
    }

    /// Tells the mesh that the set of trusted peers changed (an enrollment), so that
    /// gossip with a newly trusted peer starts now rather than at the next periodic
    /// check.
    pub async fn trust_changed(&self) {
        let _ = self.commands.send(Command::TrustChanged).await;
    }

    /// The addresses the swarm listens on (with `/p2p/<peer id>`), once bound.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, MeshError> {
        self.call(|done| Command::ListenAddrs { done }).await
    }
}
