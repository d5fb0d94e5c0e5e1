//! Owner-signed group membership: the owner's word on which agents run the pods of a
//! stateful workload, and so take part in its Raft group. An agent takes part only on
//! such a word from an owner it trusts, and answers a peer's Raft messages only if the
//! word names that peer.

use libp2p::identity::Keypair;
use libp2p::PeerId;

use super::statement::{length_prefixed, sign_hex, signed_by};
use crate::wire::{GroupMember, PeerRef, SignedGroup, MAX_GROUP_MEMBERS};

/// Separates these signatures from any other use of the identity key.
const DOMAIN: &[u8] = b"beemesh/group/v1\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("the group's word comes from another peer than its owner {owner}")]
    NotFromOwner { owner: PeerId },
    #[error("the group's signature does not verify")]
    BadSignature,
    #[error("a group has at most {MAX_GROUP_MEMBERS} members")]
    TooManyMembers,
    #[error("the group's founder is not one of its members")]
    FounderNotMember,
}

/// What an owner says of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub namespace: String,
    pub name: String,
    pub version: u64,
    pub founder: Option<PeerId>,
    pub members: Vec<GroupMember>,
}

fn signed_bytes(owner: &PeerId, g: &Group) -> Vec<u8> {
    let head = [
        owner.to_bytes(),
        g.namespace.as_bytes().to_vec(),
        g.name.as_bytes().to_vec(),
        g.version.to_be_bytes().to_vec(),
        g.founder.map(|f| f.to_bytes()).unwrap_or_default(),
    ];
    let members = g.members.iter().flat_map(|m| {
        [
            m.agent.0.to_bytes(),
            m.pod.uid.0.as_bytes().to_vec(),
            m.pod.namespace.as_bytes().to_vec(),
            m.pod.name.as_bytes().to_vec(),
        ]
    });
    length_prefixed(DOMAIN, head.into_iter().chain(members))
}

/// Signs a group's membership with the owner's identity key.
pub fn sign(keypair: &Keypair, group: Group) -> SignedGroup {
    let owner = keypair.public().to_peer_id();
    let signature = sign_hex(keypair, &signed_bytes(&owner, &group));
    SignedGroup {
        owner: PeerRef(owner),
        namespace: group.namespace,
        name: group.name,
        version: group.version,
        founder: group.founder.map(PeerRef),
        members: group.members,
        signature,
    }
}

/// Checks a group's word that `sender` sent: from its owner, signed by it, within
/// the limits. Whether this agent trusts that owner is the caller's business.
pub fn verify(signed: &SignedGroup, sender: &PeerId) -> Result<(), GroupError> {
    if signed.owner.0 != *sender {
        return Err(GroupError::NotFromOwner {
            owner: signed.owner.0,
        });
    }
    if signed.members.len() > MAX_GROUP_MEMBERS {
        return Err(GroupError::TooManyMembers);
    }
    if let Some(founder) = signed.founder {
        if !signed.members.iter().any(|m| m.agent == founder) {
            return Err(GroupError::FounderNotMember);
        }
    }
    let group = Group {
        namespace: signed.namespace.clone(),
        name: signed.name.clone(),
        version: signed.version,
        founder: signed.founder.map(|f| f.0),
        members: signed.members.clone(),
    };
    if !signed_by(
        &signed.owner.0,
        &signed_bytes(&signed.owner.0, &group),
        &signed.signature,
    ) {
        return Err(GroupError::BadSignature);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{PodRef, PodUid};

    fn member(agent: PeerId, name: &str) -> GroupMember {
        GroupMember {
            agent: PeerRef(agent),
            pod: PodRef {
                uid: PodUid(format!("uid-{name}")),
                namespace: "default".into(),
                name: name.into(),
            },
        }
    }

    #[test]
    fn a_group_holds_only_as_its_owner_signed_it() {
        let owner = Keypair::generate_ed25519();
        let me = owner.public().to_peer_id();
        let (a, b) = (PeerId::random(), PeerId::random());
        let signed = sign(
            &owner,
            Group {
                namespace: "default".into(),
                name: "web".into(),
                version: 7,
                founder: Some(a),
                members: vec![member(a, "web-0"), member(b, "web-1")],
            },
        );
        assert_eq!(verify(&signed, &me), Ok(()));
        assert!(matches!(
            verify(&signed, &a),
            Err(GroupError::NotFromOwner { .. })
        ));
        let mut changed = signed.clone();
        changed.members[1].agent = PeerRef(PeerId::random());
        assert_eq!(verify(&changed, &me), Err(GroupError::BadSignature));
        let mut changed = signed.clone();
        changed.version = 8;
        assert_eq!(verify(&changed, &me), Err(GroupError::BadSignature));
        let mut changed = signed.clone();
        changed.founder = Some(PeerRef(PeerId::random()));
        assert_eq!(verify(&changed, &me), Err(GroupError::FounderNotMember));
        let mut changed = signed;
        changed.members = (0..=MAX_GROUP_MEMBERS)
            .map(|i| member(a, &i.to_string()))
            .collect();
        assert_eq!(verify(&changed, &me), Err(GroupError::TooManyMembers));
    }
}
