//! The cheap, cloneable way into the mesh event loop.

use libp2p::{Multiaddr, PeerId};
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
}

/// Talks to the mesh event loop over a bounded channel. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct MeshHandle {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
}

impl MeshHandle {
    pub(crate) fn new(commands: mpsc::Sender<Command>, local_peer_id: PeerId) -> Self {
        MeshHandle {
            commands,
            local_peer_id,
        }
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

    /// The addresses the swarm listens on (with `/p2p/<peer id>`), once bound.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, MeshError> {
        self.call(|done| Command::ListenAddrs { done }).await
    }
}
