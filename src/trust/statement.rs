//! Owner-signed assignments: the owner's word that one agent runs one pod at one
//! epoch with one spec. Agents check it before running anything; owners check their own
//! signature before believing an agent that says it runs a pod (after a restart, when
//! the owner's memory of its placements is gone).

use k8s_openapi::api::core::v1::Pod;
use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::wire::{Epoch, PeerRef, PodUid, SignedAssignment};

/// Separates these signatures from any other use of the identity key.
const DOMAIN: &[u8] = b"beemesh/assignment/v1\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatementError {
    #[error("the assignment is signed by {signer}, not by the peer that sent it")]
    WrongOwner { signer: PeerId },
    #[error("the assignment names agent {named}, not this one")]
    WrongAgent { named: PeerId },
    #[error("the assignment's signature does not verify")]
    BadSignature,
    #[error("the assignment expired {ago_secs} s ago")]
    Expired { ago_secs: u64 },
    #[error("the assignment is for pod {named}, not {received}")]
    WrongPod { named: PodUid, received: PodUid },
    #[error("the assignment is for epoch {named}, not {received}")]
    WrongEpoch { named: Epoch, received: Epoch },
    #[error("the pod received does not match the assignment's spec digest")]
    DigestMismatch,
}

impl StatementError {
    /// A short, fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StatementError::WrongOwner { .. } => "wrong_owner",
            StatementError::WrongAgent { .. } => "wrong_agent",
            StatementError::BadSignature => "bad_signature",
            StatementError::Expired { .. } => "expired",
            StatementError::WrongPod { .. } => "wrong_pod",
            StatementError::WrongEpoch { .. } => "wrong_epoch",
            StatementError::DigestMismatch => "digest_mismatch",
        }
    }
}

/// SHA-256 of the pod as JSON: what offers announce and assignments sign. Kubernetes'
/// types serialize deterministically (struct fields in order, maps sorted), so the
/// receiver's digest of the decoded pod equals the sender's.
pub fn spec_digest(pod: &Pod) -> String {
    hex::encode(Sha256::digest(serde_json::to_vec(pod).unwrap_or_default()))
}

/// What an owner signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub agent: PeerId,
    pub pod: PodUid,
    pub epoch: Epoch,
    pub spec_digest: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// The bytes signed: the domain, then each field length-prefixed, so that no two
/// statements share an encoding.
fn signed_bytes(owner: &PeerId, a: &Assignment) -> Vec<u8> {
    length_prefixed(
        DOMAIN,
        [
            owner.to_bytes(),
            a.agent.to_bytes(),
            a.pod.0.as_bytes().to_vec(),
            a.epoch.0.to_be_bytes().to_vec(),
            a.spec_digest.as_bytes().to_vec(),
            a.expires_at.to_be_bytes().to_vec(),
        ],
    )
}

/// `domain`, then each field with its length before it.
pub(crate) fn length_prefixed(domain: &[u8], fields: impl IntoIterator<Item = Vec<u8>>) -> Vec<u8> {
    let mut out = domain.to_vec();
    for field in fields {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(&field);
    }
    out
}

/// `bytes` signed with the identity key, in hex.
pub(crate) fn sign_hex(keypair: &Keypair, bytes: &[u8]) -> String {
    // Ed25519 signing cannot fail; an empty signature would only fail verification.
    hex::encode(keypair.sign(bytes).unwrap_or_default())
}

/// Whether `signature` (hex) is `signer`'s over `bytes`.
pub(crate) fn signed_by(signer: &PeerId, bytes: &[u8], signature: &str) -> bool {
    let (Some(key), Ok(signature)) = (public_key_of(signer), hex::decode(signature)) else {
        return false;
    };
    key.verify(bytes, &signature)
}

/// Signs an assignment with the owner's identity key.
pub fn sign(keypair: &Keypair, assignment: Assignment) -> SignedAssignment {
    let owner = keypair.public().to_peer_id();
    let signature = sign_hex(keypair, &signed_bytes(&owner, &assignment));
    SignedAssignment {
        owner: PeerRef(owner),
        agent: PeerRef(assignment.agent),
        pod: assignment.pod,
        epoch: assignment.epoch,
        spec_digest: assignment.spec_digest,
        expires_at: assignment.expires_at,
        signature,
    }
}

/// The public key an Ed25519 peer ID carries inline (its identity multihash).
pub fn public_key_of(peer: &PeerId) -> Option<PublicKey> {
    let multihash = peer.as_ref();
    // Code 0 is the identity hash: the digest is the protobuf-encoded key itself.
    if multihash.code() != 0 {
        return None;
    }
    PublicKey::try_decode_protobuf(multihash.digest()).ok()
}

/// Checks that `owner` signed `statement`. Expiry is the caller's business: an agent
/// refuses an expired assignment when it arrives, but an owner still recognises its
/// own old signature on a pod that has run for a long time.
pub fn verify_signature(
    statement: &SignedAssignment,
    owner: &PeerId,
) -> Result<(), StatementError> {
    if statement.owner.0 != *owner {
        return Err(StatementError::WrongOwner {
            signer: statement.owner.0,
        });
    }
    if signed_by(
        owner,
        &signed_bytes(owner, &assignment_of(statement)),
        &statement.signature,
    ) {
        Ok(())
    } else {
        Err(StatementError::BadSignature)
    }
}

/// Checks that `me` signed `statement`, as [`verify_signature`] does, for an owner
/// that checks its own word in every status report, at a fraction of the cost: an
/// Ed25519 signature is deterministic (RFC 8032), so signing the statement again
/// gives the same signature, and signing is cheaper than verifying. The comparison
/// takes the same time wherever the signatures differ: one that stopped at the first
/// difference would tell an agent how much of a forged signature was right.
pub fn verify_own_signature(
    statement: &SignedAssignment,
    me: &Keypair,
) -> Result<(), StatementError> {
    let owner = me.public().to_peer_id();
    if statement.owner.0 != owner {
        return Err(StatementError::WrongOwner {
            signer: statement.owner.0,
        });
    }
    let signature = sign_hex(me, &signed_bytes(&owner, &assignment_of(statement)));
    if bool::from(signature.as_bytes().ct_eq(statement.signature.as_bytes())) {
        Ok(())
    } else {
        Err(StatementError::BadSignature)
    }
}

fn assignment_of(statement: &SignedAssignment) -> Assignment {
    Assignment {
        agent: statement.agent.0,
        pod: statement.pod.clone(),
        epoch: statement.epoch,
        spec_digest: statement.spec_digest.clone(),
        expires_at: statement.expires_at,
    }
}

/// What an agent checks of an Assign before it runs anything: signed by the peer that
/// sent it, naming this agent, this pod and epoch, not expired, and for exactly the
/// spec received.
pub fn verify_assign(
    statement: &SignedAssignment,
    sender: &PeerId,
    me: &PeerId,
    pod: &Pod,
    epoch: Epoch,
    now_unix: u64,
) -> Result<(), StatementError> {
    verify_signature(statement, sender)?;
    if statement.agent.0 != *me {
        return Err(StatementError::WrongAgent {
            named: statement.agent.0,
        });
    }
    if statement.expires_at < now_unix {
        return Err(StatementError::Expired {
            ago_secs: now_unix - statement.expires_at,
        });
    }
    let uid = PodUid(pod.metadata.uid.clone().unwrap_or_default());
    if statement.pod != uid {
        return Err(StatementError::WrongPod {
            named: statement.pod.clone(),
            received: uid,
        });
    }
    if statement.epoch != epoch {
        return Err(StatementError::WrongEpoch {
            named: statement.epoch,
            received: epoch,
        });
    }
    if statement.spec_digest != spec_digest(pod) {
        return Err(StatementError::DigestMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(uid: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some(uid.into()),
                labels: Some([("b".into(), "2".into()), ("a".into(), "1".into())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("localhost/busybox:1.35".into()),
                    env: Some(vec![EnvVar {
                        name: "PASSWORD".into(),
                        value: Some("s3cret".into()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        }
    }

    fn signed(owner: &Keypair, agent: PeerId, pod: &Pod, expires_at: u64) -> SignedAssignment {
        sign(
            owner,
            Assignment {
                agent,
                pod: PodUid(pod.metadata.uid.clone().unwrap_or_default()),
                epoch: Epoch(7),
                spec_digest: spec_digest(pod),
                expires_at,
            },
        )
    }

    #[test]
    fn the_digest_survives_the_wire() {
        let sent = pod("u1");
        let bytes = serde_json::to_vec(&sent).expect("encodes");
        let received: Pod = serde_json::from_slice(&bytes).expect("decodes");
        assert_eq!(spec_digest(&sent), spec_digest(&received));
    }

    #[test]
    fn a_genuine_assignment_verifies_and_every_forgery_is_refused() {
        let owner = Keypair::generate_ed25519();
        let owner_id = owner.public().to_peer_id();
        let me = PeerId::random();
        let p = pod("u1");
        let good = signed(&owner, me, &p, 1000);
        assert_eq!(
            verify_assign(&good, &owner_id, &me, &p, Epoch(7), 999),
            Ok(())
        );

        // Sent by someone else than the signer.
        let other = Keypair::generate_ed25519().public().to_peer_id();
        assert!(matches!(
            verify_assign(&good, &other, &me, &p, Epoch(7), 999),
            Err(StatementError::WrongOwner { .. })
        ));
        // Signed by a stranger who claims to be the owner.
        let mut forged = signed(&Keypair::generate_ed25519(), me, &p, 1000);
        forged.owner = PeerRef(owner_id);
        assert_eq!(
            verify_assign(&forged, &owner_id, &me, &p, Epoch(7), 999),
            Err(StatementError::BadSignature)
        );
        // Any field changed after signing.
        for tamper in [
            |s: &mut SignedAssignment| s.epoch = Epoch(8),
            |s: &mut SignedAssignment| s.expires_at += 1,
            |s: &mut SignedAssignment| s.pod = PodUid("u2".into()),
            |s: &mut SignedAssignment| s.spec_digest = "00".repeat(32),
            |s: &mut SignedAssignment| s.signature = "zz".into(),
        ] {
            let mut s = good.clone();
            tamper(&mut s);
            assert!(verify_signature(&s, &owner_id).is_err(), "{s:?}");
        }
        // For another agent.
        assert!(matches!(
            verify_assign(&good, &owner_id, &PeerId::random(), &p, Epoch(7), 999),
            Err(StatementError::WrongAgent { .. })
        ));
        // Too late.
        assert_eq!(
            verify_assign(&good, &owner_id, &me, &p, Epoch(7), 1010),
            Err(StatementError::Expired { ago_secs: 10 })
        );
        // Another spec (a privileged pod slipped in under a benign digest).
        let mut changed = p.clone();
        changed.spec.as_mut().expect("spec").host_network = Some(true);
        assert_eq!(
            verify_assign(&good, &owner_id, &me, &changed, Epoch(7), 999),
            Err(StatementError::DigestMismatch)
        );
        // Another pod or epoch than the message carries.
        assert!(matches!(
            verify_assign(&good, &owner_id, &me, &pod("u2"), Epoch(7), 999),
            Err(StatementError::WrongPod { .. })
        ));
        assert!(matches!(
            verify_assign(&good, &owner_id, &me, &p, Epoch(6), 999),
            Err(StatementError::WrongEpoch { .. })
        ));
    }

    #[test]
    fn an_owner_recognises_its_own_signature_and_nothing_else() {
        let owner = Keypair::generate_ed25519();
        let owner_id = owner.public().to_peer_id();
        let p = pod("u1");
        let good = signed(&owner, PeerId::random(), &p, 1000);
        assert_eq!(verify_own_signature(&good, &owner), Ok(()));
        // Another owner's word, and a stranger's signature under this owner's name.
        let stranger = Keypair::generate_ed25519();
        assert!(matches!(
            verify_own_signature(&signed(&stranger, PeerId::random(), &p, 1000), &owner),
            Err(StatementError::WrongOwner { .. })
        ));
        let mut forged = signed(&stranger, PeerId::random(), &p, 1000);
        forged.owner = PeerRef(owner_id);
        let mut wrong_case = good.clone();
        wrong_case.signature = wrong_case.signature.to_uppercase();
        let mut truncated = good.clone();
        truncated.signature.pop();
        for refused in [forged, truncated] {
            assert_eq!(
                verify_own_signature(&refused, &owner),
                Err(StatementError::BadSignature)
            );
            assert!(verify_signature(&refused, &owner_id).is_err());
        }
        // The same signature in uppercase hex is refused too (`verify_signature` takes
        // it): agents send the statement back as they got it.
        assert_eq!(
            verify_own_signature(&wrong_case, &owner),
            Err(StatementError::BadSignature)
        );
        // Any field changed after signing.
        for tamper in [
            |s: &mut SignedAssignment| s.agent = PeerRef(PeerId::random()),
            |s: &mut SignedAssignment| s.epoch = Epoch(8),
            |s: &mut SignedAssignment| s.expires_at += 1,
            |s: &mut SignedAssignment| s.pod = PodUid("u2".into()),
            |s: &mut SignedAssignment| s.spec_digest = "00".repeat(32),
        ] {
            let mut s = good.clone();
            tamper(&mut s);
            assert_eq!(
                verify_own_signature(&s, &owner),
                Err(StatementError::BadSignature),
                "{s:?}"
            );
        }
    }

    #[test]
    fn peer_ids_carry_their_ed25519_key() {
        let key = Keypair::generate_ed25519();
        let id = key.public().to_peer_id();
        assert_eq!(public_key_of(&id), Some(key.public()));
        // A random peer ID is a SHA-256 multihash, not an inline key.
        assert_eq!(public_key_of(&PeerId::random()), None);
    }
}
