//! Which owners an agent takes work from.

use std::collections::BTreeSet;

use libp2p::PeerId;

/// The owners an agent trusts. With none configured every owner is trusted, which is
/// said once, in a warning, when the policy is made.
#[derive(Debug)]
pub struct OwnerPolicy {
    trusted: BTreeSet<PeerId>,
}

impl OwnerPolicy {
    pub fn new(trusted: impl IntoIterator<Item = PeerId>) -> Self {
        let trusted: BTreeSet<PeerId> = trusted.into_iter().collect();
        if trusted.is_empty() {
            tracing::warn!(
                "no --trust given: accepting work from any owner on the mesh; \
                 pass --trust <owner peer ID> to restrict it"
            );
        }
        OwnerPolicy { trusted }
    }

    pub fn trusts(&self, owner: &PeerId) -> bool {
        self.trusted.is_empty() || self.trusted.contains(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_policy_trusts_everyone_otherwise_only_the_listed() {
        let a = PeerId::random();
        let b = PeerId::random();
        assert!(OwnerPolicy::new([]).trusts(&a));
        let policy = OwnerPolicy::new([a]);
        assert!(policy.trusts(&a));
        assert!(!policy.trusts(&b));
    }
}
