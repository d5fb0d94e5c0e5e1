//! Raft between a group's members over the mesh: each call is one
//! [`RAFT_PROTOCOL`](crate::wire::RAFT_PROTOCOL) stream (Noise-authenticated, so the
//! callee knows the caller's peer ID), carrying a [`Call`] one way and a [`Reply`] the
//! other. Besides Raft's own messages, a member forwards its pods' reads and writes to
//! the leader this way.

use std::time::Duration;

use libp2p::{PeerId, StreamProtocol};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::kv::{Command, Item, Outcome};
use super::{peer_of, GroupKey, Member, NodeId, TypeConfig};
use crate::kubelet::relay::{read_message, write_message};
use crate::mesh::MeshHandle;
use crate::wire::{PeerRef, RAFT_PROTOCOL};

/// The largest frame either way: a batch of entries (see the config's
/// `max_payload_entries`) or a snapshot chunk, with room for encoding.
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// A call to one member of one group.
#[derive(Debug, Serialize, Deserialize)]
pub struct CallFrame {
    pub owner: PeerRef,
    pub namespace: String,
    pub name: String,
    pub call: Call,
}

impl CallFrame {
    pub fn group(&self) -> GroupKey {
        GroupKey {
            owner: self.owner.0,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

// Externally tagged: an internally tagged enum buffers its content, and then cannot
// read the u64 map keys (node IDs) of a membership back from JSON's strings.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Call {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A pod's write, for the leader to commit.
    Propose(Command),
    /// A pod's linearizable read, for the leader to answer.
    Read(Read),
}

/// What a pod reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "read", rename_all = "camelCase")]
pub enum Read {
    Key { key: String },
    Prefix { prefix: String },
}

/// What a read found, as of log index `index`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadResult {
    pub index: u64,
    pub items: Vec<(String, Item)>,
}

/// Why the leader could not serve a forwarded read or write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "error", rename_all = "camelCase")]
pub enum ServeError {
    /// Nothing was proposed: the caller may try again at the leader.
    #[error("this member is not the group's leader")]
    NotLeader { leader: Option<NodeId> },
    /// Nothing was proposed, and trying again will not help.
    #[error("{message}")]
    Failed { message: String },
    /// The write was proposed but its fate is unknown (leadership was lost before it
    /// committed): a later leader may still commit it.
    #[error("{message}")]
    Unknown { message: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Reply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Proposed(Result<(u64, Outcome), ServeError>),
    Read(Result<ReadResult, ServeError>),
    /// The callee does not serve this caller for this group.
    Refused {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("member {0} has no peer ID")]
    NoPeer(NodeId),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Mesh(#[from] crate::mesh::MeshError),
    #[error(transparent)]
    Relay(#[from] crate::kubelet::relay::RelayError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("answered {0} to a different call")]
    Mismatch(&'static str),
}

/// Sends one call to `peer` and waits up to `ttl` for its reply.
pub async fn call(
    mesh: &MeshHandle,
    peer: PeerId,
    group: &GroupKey,
    call: Call,
    ttl: Duration,
) -> Result<Reply, CallError> {
    let frame = CallFrame {
        owner: PeerRef(group.owner),
        namespace: group.namespace.clone(),
        name: group.name.clone(),
        call,
    };
    let exchange = async {
        let stream = mesh
            .open_stream(peer, StreamProtocol::new(RAFT_PROTOCOL))
            .await?;
        let mut io = stream.compat();
        write_message(&mut io, &frame, MAX_FRAME_BYTES).await?;
        let reply: Reply = read_message(&mut io, MAX_FRAME_BYTES).await?;
        match reply {
            Reply::Refused { reason } => Err(CallError::Refused(reason)),
            reply => Ok(reply),
        }
    };
    tokio::time::timeout(ttl, exchange)
        .await
        .map_err(|_| CallError::Timeout(ttl))?
}

/// Openraft's way to the group's other members.
#[derive(Clone)]
pub struct Network {
    pub mesh: MeshHandle,
    pub group: GroupKey,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = MemberClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> MemberClient {
        MemberClient {
            mesh: self.mesh.clone(),
            group: self.group.clone(),
            target,
            peer: peer_of(node),
        }
    }
}

/// Openraft's connection to one member.
pub struct MemberClient {
    mesh: MeshHandle,
    group: GroupKey,
    target: NodeId,
    peer: Option<PeerId>,
}

impl MemberClient {
    async fn send<E: std::error::Error>(
        &self,
        payload: Call,
        option: &RPCOption,
    ) -> Result<Reply, RPCError<NodeId, Member, E>> {
        let peer = self.peer.ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&CallError::NoPeer(self.target)))
        })?;
        call(&self.mesh, peer, &self.group, payload, option.hard_ttl())
            .await
            .map_err(|e| match e {
                // Not reached, or not taking us (yet): back off before trying again.
                CallError::Mesh(_) | CallError::Refused(_) | CallError::NoPeer(_) => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                _ => RPCError::Network(NetworkError::new(&e)),
            })
    }

    fn mismatch<E: std::error::Error>(
        &self,
        expected: &'static str,
    ) -> RPCError<NodeId, Member, E> {
        RPCError::Network(NetworkError::new(&CallError::Mismatch(expected)))
    }
}

impl RaftNetwork<TypeConfig> for MemberClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        match self.send(Call::AppendEntries(rpc), &option).await? {
            Reply::AppendEntries(result) => {
                result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.mismatch("append entries")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.send(Call::InstallSnapshot(rpc), &option).await? {
            Reply::InstallSnapshot(result) => {
                result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.mismatch("install snapshot")),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        match self.send(Call::Vote(rpc), &option).await? {
            Reply::Vote(result) => {
                result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.mismatch("vote")),
        }
    }
}
