//! Owner-signed dial grants: the owner's word that one agent may connect one of its
//! pods to a port of a pod the owner placed on another agent (a mesh Service's
//! endpoint), for a short while. The agent that runs the endpoint checks the grant
//! instead of asking the owner, so that a connection costs one round trip to the owner
//! (the route) and none more.

use libp2p::identity::Keypair;
use libp2p::PeerId;

use super::statement::{length_prefixed, sign_hex, signed_by};
use crate::wire::{PeerRef, PodUid, SignedDial};

/// Separates these signatures from any other use of the identity key.
const DOMAIN: &[u8] = b"beemesh/dial/v1\0";

/// How long a grant is good for: enough for the connection it is for to be opened.
pub const GRANT_SECS: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    #[error("the grant is for agent {named}, not the peer that presents it")]
    WrongDialer { named: PeerId },
    #[error("the grant is for agent {named}, not this one")]
    WrongAgent { named: PeerId },
    #[error("the grant's signature does not verify")]
    BadSignature,
    #[error("the grant expired {ago_secs} s ago")]
    Expired { ago_secs: u64 },
}

/// What an owner grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    pub from: PeerId,
    pub to: PeerId,
    pub pod: PodUid,
    pub port: u16,
    /// Unix seconds.
    pub expires_at: u64,
}

fn signed_bytes(owner: &PeerId, d: &Dial) -> Vec<u8> {
    length_prefixed(
        DOMAIN,
        [
            owner.to_bytes(),
            d.from.to_bytes(),
            d.to.to_bytes(),
            d.pod.0.as_bytes().to_vec(),
            d.port.to_be_bytes().to_vec(),
            d.expires_at.to_be_bytes().to_vec(),
        ],
    )
}

/// Signs a grant with the owner's identity key.
pub fn sign(keypair: &Keypair, dial: Dial) -> SignedDial {
    let owner = keypair.public().to_peer_id();
    let signature = sign_hex(keypair, &signed_bytes(&owner, &dial));
    SignedDial {
        owner: PeerRef(owner),
        from: PeerRef(dial.from),
        to: PeerRef(dial.to),
        pod: dial.pod,
        port: dial.port,
        expires_at: dial.expires_at,
        signature,
    }
}

/// Checks, on agent `me`, a grant that `peer` presents: signed by its owner (whether
/// this agent trusts that owner, and runs that pod of its, is the caller's business),
/// for `peer`, for this agent, not expired at `now_unix`.
pub fn verify(
    grant: &SignedDial,
    peer: &PeerId,
    me: &PeerId,
    now_unix: u64,
) -> Result<(), DialError> {
    if grant.from.0 != *peer {
        return Err(DialError::WrongDialer {
            named: grant.from.0,
        });
    }
    if grant.to.0 != *me {
        return Err(DialError::WrongAgent { named: grant.to.0 });
    }
    let dial = Dial {
        from: grant.from.0,
        to: grant.to.0,
        pod: grant.pod.clone(),
        port: grant.port,
        expires_at: grant.expires_at,
    };
    if !signed_by(
        &grant.owner.0,
        &signed_bytes(&grant.owner.0, &dial),
        &grant.signature,
    ) {
        return Err(DialError::BadSignature);
    }
    if grant.expires_at < now_unix {
        return Err(DialError::Expired {
            ago_secs: now_unix - grant.expires_at,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_holds_only_for_its_dialer_its_agent_its_fields_and_its_time() {
        let owner = Keypair::generate_ed25519();
        let (from, to, stranger) = (PeerId::random(), PeerId::random(), PeerId::random());
        let grant = sign(
            &owner,
            Dial {
                from,
                to,
                pod: PodUid("p".into()),
                port: 8080,
                expires_at: 1_000,
            },
        );
        assert_eq!(verify(&grant, &from, &to, 1_000), Ok(()));
        assert_eq!(
            verify(&grant, &stranger, &to, 1_000),
            Err(DialError::WrongDialer { named: from })
        );
        assert_eq!(
            verify(&grant, &from, &stranger, 1_000),
            Err(DialError::WrongAgent { named: to })
        );
        assert_eq!(
            verify(&grant, &from, &to, 1_010),
            Err(DialError::Expired { ago_secs: 10 })
        );
        let other_port = SignedDial {
            port: 22,
            ..grant.clone()
        };
        assert_eq!(
            verify(&other_port, &from, &to, 1_000),
            Err(DialError::BadSignature)
        );
        let other_pod = SignedDial {
            pod: PodUid("q".into()),
            ..grant.clone()
        };
        assert_eq!(
            verify(&other_pod, &from, &to, 1_000),
            Err(DialError::BadSignature)
        );
        let forged = SignedDial {
            owner: PeerRef(Keypair::generate_ed25519().public().to_peer_id()),
            ..grant
        };
        assert_eq!(
            verify(&forged, &from, &to, 1_000),
            Err(DialError::BadSignature)
        );
    }
}
