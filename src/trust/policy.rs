//! Which peers a role deals with: an agent, the owners whose work it runs; a node, the
//! agents it gives pods (and the secrets they carry) to. Nobody is trusted unless
//! listed or enrolled: an empty set trusts no one.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use libp2p::PeerId;

#[derive(Debug, Default)]
struct Inner {
    /// Listed on the command line; never revoked at run time.
    listed: BTreeSet<PeerId>,
    /// Enrolled with a join token (node) or pinned by one (agent); follows the store.
    enrolled: BTreeSet<PeerId>,
    /// `--insecure-trust-any`: every peer, for throwaway demos only.
    any: bool,
}

/// The trusted peers of one role, shared by everything that checks a peer (the mesh's
/// gossip validation, the owner or agent loop, the kubelet streams). Cloning is cheap;
/// all clones see enrollments and revocations at once.
#[derive(Debug, Clone, Default)]
pub struct TrustedPeers {
    inner: Arc<RwLock<Inner>>,
}

impl TrustedPeers {
    /// Trusts exactly the listed peers (and those enrolled later).
    pub fn new(listed: impl IntoIterator<Item = PeerId>) -> Self {
        TrustedPeers {
            inner: Arc::new(RwLock::new(Inner {
                listed: listed.into_iter().collect(),
                ..Inner::default()
            })),
        }
    }

    /// Trusts every peer. Only for throwaway demos: the caller warns about it.
    pub fn insecure_any() -> Self {
        TrustedPeers {
            inner: Arc::new(RwLock::new(Inner {
                any: true,
                ..Inner::default()
            })),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Inner) -> T) -> T {
        // A poisoned lock still holds a consistent set: every writer replaces it whole.
        f(&self.inner.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn write<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.write().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn trusts(&self, peer: &PeerId) -> bool {
        self.read(|i| i.any || i.listed.contains(peer) || i.enrolled.contains(peer))
    }

    /// Whether every peer is trusted (`--insecure-trust-any`).
    pub fn is_insecure(&self) -> bool {
        self.read(|i| i.any)
    }

    /// True when no peer at all is trusted.
    pub fn is_empty(&self) -> bool {
        self.read(|i| !i.any && i.listed.is_empty() && i.enrolled.is_empty())
    }

    /// Replaces the enrolled peers; returns those that lost their trust (neither
    /// enrolled nor listed any more).
    pub fn set_enrolled(&self, enrolled: impl IntoIterator<Item = PeerId>) -> Vec<PeerId> {
        let enrolled: BTreeSet<PeerId> = enrolled.into_iter().collect();
        self.write(|i| {
            let dropped = i
                .enrolled
                .difference(&enrolled)
                .filter(|p| !i.listed.contains(p))
                .copied()
                .collect();
            i.enrolled = enrolled;
            dropped
        })
    }

    pub fn enroll(&self, peer: PeerId) {
        self.write(|i| i.enrolled.insert(peer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_is_trusted_unless_listed_or_enrolled() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let none = TrustedPeers::new([]);
        assert!(none.is_empty());
        assert!(!none.trusts(&a));
        assert!(!TrustedPeers::default().trusts(&a));

        let trusted = TrustedPeers::new([a]);
        assert!(trusted.trusts(&a) && !trusted.trusts(&b));
        let clone = trusted.clone();
        clone.enroll(b);
        assert!(trusted.trusts(&b), "clones share enrollments");
        clone.enroll(c);
        // Re-reading the store without b and a (a stays: it is listed).
        assert_eq!(trusted.set_enrolled([c, a]), vec![b]);
        assert!(!trusted.trusts(&b) && trusted.trusts(&a) && trusted.trusts(&c));
        assert_eq!(trusted.set_enrolled([]), vec![c]);
        assert!(trusted.trusts(&a));
    }

    #[test]
    fn insecure_trust_any_trusts_everyone_and_says_so() {
        let any = TrustedPeers::insecure_any();
        assert!(any.trusts(&PeerId::random()));
        assert!(any.is_insecure() && !any.is_empty());
    }
}
