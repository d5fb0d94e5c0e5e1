//! Which owners an agent takes work from.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

use libp2p::PeerId;

/// The owners an agent trusts. With none configured every owner is trusted, and a
/// warning says so once.
#[derive(Debug)]
pub struct OwnerPolicy {
    trusted: BTreeSet<PeerId>,
    warned: AtomicBool,
}

impl OwnerPolicy {
    pub fn new(trusted: impl IntoIterator<Item = PeerId>) -> Self {
        OwnerPolicy {
            trusted: trusted.into_iter().collect(),
            warned: AtomicBool::new(false),
        }
    }

    pub fn trusts_any(&self) -> bool {
        self.trusted.is_empty()
    }

    pub fn trusts(&self, owner: &PeerId) -> bool {
        if self.trusted.is_empty() {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "no --trust given: accepting work from any owner on the mesh; \
                     pass --trust <owner peer ID> to restrict it"
                );
            }
            return true;
        }
        self.trusted.contains(owner)
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
