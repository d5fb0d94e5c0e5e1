//! Stateful workloads: the agents that run a stateful workload's pods form a Raft group
//! (openraft) for as long as the workload lives. It gives the pods a leader and a small
//! linearizable key-value store with leases, through a Unix socket in each container
//! (see [`api`]).
//!
//! - Which pods: those of a StatefulSet, and those annotated [`GROUP_ANNOTATION`]
//!   ([`group_of`]).
//! - Who takes part: the agents the pods' owner names in its signed word on the group
//!   ([`crate::wire::SignedGroup`]), which it sends as placements change.
//! - Transport: [`crate::wire::RAFT_PROTOCOL`] streams over the mesh ([`rpc`]), answered
//!   only for members the owner named.
//! - Storage: the log, vote and snapshots in the agent's state directory ([`store`]),
//!   deleted when the agent leaves the group.

pub mod api;
pub mod groups;
pub mod kv;
pub mod rpc;
pub mod store;

use std::collections::BTreeMap;
use std::io::Cursor;

use k8s_openapi::api::core::v1::Pod;
use libp2p::PeerId;
use sha2::{Digest, Sha256};

pub use groups::{GroupConfig, Groups, Standing};

/// A member's Raft node ID: from its peer ID (see [`node_id`]).
pub type NodeId = u64;
/// A member as Raft knows it: its peer ID in `addr`.
pub type Member = openraft::BasicNode;

openraft::declare_raft_types!(
    /// The Raft types of a group.
    pub TypeConfig:
        D = kv::Command,
        R = kv::Outcome,
        NodeId = NodeId,
        Node = Member,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Entry = openraft::Entry<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig>;

/// Pods with this annotation form a group with the pods of the same value in their
/// namespace.
pub const GROUP_ANNOTATION: &str = "beemesh.io/raft-group";
/// Where each container of a grouped pod finds the group's socket.
pub const SOCKET_DIR_IN_CONTAINER: &str = "/run/beemesh";
pub const SOCKET_IN_CONTAINER: &str = "/run/beemesh/group.sock";
/// The environment variable that names it.
pub const SOCKET_ENV: &str = "BEEMESH_GROUP_SOCKET";
/// The pod status condition that says whether the pod's member is a voter of a group
/// with a leader; when True, its reason is `Leader` or `Follower`.
pub const GROUP_READY_CONDITION: &str = "beemesh.io/GroupReady";
/// The label the node gives a grouped pod in the API: `leader` or `follower`, so that a
/// Service can select the leader.
pub const GROUP_ROLE_LABEL: &str = "beemesh.io/group-role";

/// The group a pod belongs to: its [`GROUP_ANNOTATION`], else the StatefulSet that
/// controls it; none for other pods. An annotation that is not a DNS label is refused.
pub fn group_of(pod: &Pod) -> Result<Option<String>, String> {
    let meta = &pod.metadata;
    if let Some(name) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(GROUP_ANNOTATION))
    {
        if !crate::runtime::translate::is_dns_label(name) {
            return Err(format!(
                "{name:?} is not a group name: a lowercase RFC 1123 label of at most 63 characters"
            ));
        }
        return Ok(Some(name.clone()));
    }
    Ok(meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "StatefulSet" && o.controller == Some(true))
        .map(|o| o.name.clone()))
}

/// A member's Raft node ID: the first 8 bytes of its peer ID's SHA-256.
pub fn node_id(peer: &PeerId) -> NodeId {
    let digest = Sha256::digest(peer.to_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The peer ID a member's node carries.
pub fn peer_of(member: &Member) -> Option<PeerId> {
    member.addr.parse().ok()
}

/// Members as Raft takes them, by node ID.
pub fn members_of(peers: impl IntoIterator<Item = PeerId>) -> BTreeMap<NodeId, Member> {
    peers
        .into_iter()
        .map(|peer| (node_id(&peer), Member::new(peer.to_string())))
        .collect()
}

/// A group, as agents tell groups apart: the owner that placed its pods, their
/// namespace and the group's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    pub owner: PeerId,
    pub namespace: String,
    pub name: String,
}

impl GroupKey {
    /// A short, path-safe name for the group's directory.
    pub fn dir_name(&self) -> String {
        let mut hash = Sha256::new();
        for field in [
            self.owner.to_bytes(),
            self.namespace.as_bytes().to_vec(),
            self.name.as_bytes().to_vec(),
        ] {
            hash.update((field.len() as u32).to_be_bytes());
            hash.update(field);
        }
        hex::encode(&hash.finalize()[..8])
    }
}

impl std::fmt::Display for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    fn pod(annotation: Option<&str>, owner: Option<(&str, bool)>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                annotations: annotation
                    .map(|a| [(GROUP_ANNOTATION.to_owned(), a.to_owned())].into()),
                owner_references: owner.map(|(kind, controller)| {
                    vec![OwnerReference {
                        kind: kind.into(),
                        name: "web".into(),
                        controller: Some(controller),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_is_grouped_by_its_annotation_or_its_statefulset() {
        assert_eq!(group_of(&pod(None, None)), Ok(None));
        assert_eq!(group_of(&pod(Some("db"), None)), Ok(Some("db".into())));
        assert_eq!(
            group_of(&pod(None, Some(("StatefulSet", true)))),
            Ok(Some("web".into()))
        );
        assert_eq!(group_of(&pod(None, Some(("ReplicaSet", true)))), Ok(None));
        assert_eq!(group_of(&pod(None, Some(("StatefulSet", false)))), Ok(None));
        // The annotation wins over the StatefulSet.
        assert_eq!(
            group_of(&pod(Some("db"), Some(("StatefulSet", true)))),
            Ok(Some("db".into()))
        );
        assert!(group_of(&pod(Some("Not A Label"), None)).is_err());
        assert!(group_of(&pod(Some(""), None)).is_err());
    }

    #[test]
    fn node_ids_and_group_directories_are_stable_and_distinct() {
        let (a, b) = (PeerId::random(), PeerId::random());
        assert_eq!(node_id(&a), node_id(&a));
        assert_ne!(node_id(&a), node_id(&b));
        let members = members_of([a, b]);
        assert_eq!(peer_of(&members[&node_id(&a)]), Some(a));
        let key = |name: &str| GroupKey {
            owner: a,
            namespace: "default".into(),
            name: name.into(),
        };
        assert_eq!(key("web").dir_name(), key("web").dir_name());
        assert_ne!(key("web").dir_name(), key("db").dir_name());
        assert_eq!(key("web").dir_name().len(), 16);
    }
}
