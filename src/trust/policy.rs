//! Which peers a role deals with: an agent, the owners whose work it runs; a node, the
//! agents it gives pods (and the secrets they carry) to.

use std::collections::BTreeSet;

use libp2p::PeerId;

/// The trusted peers. With none listed every peer is trusted, which is said once, in a
/// warning, when the policy is made.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    trusted: BTreeSet<PeerId>,
}

impl PeerPolicy {
    /// An agent's policy: the owners listed with `--trust`.
    pub fn owners(trusted: impl IntoIterator<Item = PeerId>) -> Self {
        Self::new(
            trusted,
            "no --trust given: accepting work from any owner on the mesh; \
             pass --trust <owner peer ID> to restrict it",
        )
    }

    /// A node's policy: the agents listed with `--trust-agent`.
    pub fn agents(trusted: impl IntoIterator<Item = PeerId>) -> Self {
        Self::new(
            trusted,
            "no --trust-agent given: any agent on the mesh may run this node's pods and \
             receive their configMaps and secrets; pass --trust-agent <agent peer ID> to \
             restrict it",
        )
    }

    fn new(trusted: impl IntoIterator<Item = PeerId>, warning: &str) -> Self {
        let trusted: BTreeSet<PeerId> = trusted.into_iter().collect();
        if trusted.is_empty() {
            tracing::warn!("{warning}");
        }
        PeerPolicy { trusted }
    }

    pub fn trusts(&self, peer: &PeerId) -> bool {
        self.trusted.is_empty() || self.trusted.contains(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_policy_trusts_everyone_otherwise_only_the_listed() {
        let a = PeerId::random();
        let b = PeerId::random();
        assert!(PeerPolicy::owners([]).trusts(&a));
        assert!(PeerPolicy::default().trusts(&a));
        let policy = PeerPolicy::agents([a]);
        assert!(policy.trusts(&a));
        assert!(!policy.trusts(&b));
    }
}
