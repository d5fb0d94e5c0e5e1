//! The agent's side of enrollment: with `--join <token>`, it proves the token to the
//! node it reaches and pins that node's peer ID as an owner whose work it runs. The
//! pin is kept in the state directory, so that the token is needed once.

use std::collections::BTreeSet;
use std::path::Path;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::mesh::MeshHandle;
use crate::trust::join::{self, JoinToken};
use crate::trust::replay::unix_millis;
use crate::trust::store::{JsonStore, StoreError};
use crate::wire::{PeerRef, Request, Response};

/// File (under the trust directory) of the owners an agent pinned by joining.
pub const PINNED_OWNERS_FILE: &str = "owners.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedOwners {
    #[serde(default)]
    pub owners: BTreeSet<PeerRef>,
}

/// The owners this agent pinned with earlier joins.
pub fn pinned_owners(
    state_dir: &Path,
) -> Result<(JsonStore<PinnedOwners>, Vec<PeerId>), StoreError> {
    let store: JsonStore<PinnedOwners> = JsonStore::open(state_dir, PINNED_OWNERS_FILE)?;
    let owners = store.load()?.owners.into_iter().map(|p| p.0).collect();
    Ok((store, owners))
}

/// What came of one join attempt.
#[derive(Debug)]
pub enum JoinOutcome {
    /// The node proved it knows the token and enrolled us.
    Joined(PeerId),
    /// The node refused the token: final.
    Refused { node: PeerId, reason: String },
    /// No answer, or one that proves nothing: try again later.
    Failed { node: PeerId, reason: String },
}

/// A pending enrollment.
#[derive(Debug)]
pub struct Enrollment {
    token: JoinToken,
    /// The peers the token is for: the bootstrap peers with an ID, else any peer.
    candidates: BTreeSet<PeerId>,
    store: JsonStore<PinnedOwners>,
    in_flight: bool,
}

impl Enrollment {
    pub fn new(
        token: JoinToken,
        candidates: BTreeSet<PeerId>,
        store: JsonStore<PinnedOwners>,
    ) -> Self {
        Enrollment {
            token,
            candidates,
            store,
            in_flight: false,
        }
    }

    /// Whether a join should be tried with `peer` now.
    pub fn should_try(&self, peer: &PeerId) -> bool {
        !self.in_flight && (self.candidates.is_empty() || self.candidates.contains(peer))
    }

    pub fn set_in_flight(&mut self, in_flight: bool) {
        self.in_flight = in_flight;
    }

    /// Pins `owner` in the state directory.
    pub fn pin(&self, owner: PeerId) -> Result<(), StoreError> {
        self.store.update(|doc| {
            doc.owners.insert(PeerRef(owner));
        })
    }

    /// One join exchange with `node`; the result comes back to the agent loop.
    pub fn attempt(
        &self,
        mesh: MeshHandle,
        node: PeerId,
    ) -> impl std::future::Future<Output = JoinOutcome> {
        let token = self.token.clone();
        async move {
            let me = mesh.local_peer_id();
            let nonce = match join::nonce() {
                Ok(nonce) => nonce,
                Err(e) => {
                    return JoinOutcome::Failed {
                        node,
                        reason: format!("no randomness: {e}"),
                    }
                }
            };
            let request = join::request(&token, &me, &node, nonce, unix_millis());
            match mesh.request(node, Request::Join(request.clone())).await {
                Ok(Response::Joined { proof })
                    if join::verify_node_proof(&token, &me, &node, &request, &proof) =>
                {
                    JoinOutcome::Joined(node)
                }
                Ok(Response::Joined { .. }) => JoinOutcome::Refused {
                    node,
                    reason: "the peer accepted the token but could not prove it knows it \
                             (not the node that issued the token)"
                        .into(),
                },
                Ok(Response::Declined { reason }) => JoinOutcome::Refused { node, reason },
                Ok(other) => JoinOutcome::Failed {
                    node,
                    reason: format!("unexpected answer {other:?}"),
                },
                Err(e) => JoinOutcome::Failed {
                    node,
                    reason: e.to_string(),
                },
            }
        }
    }
}
