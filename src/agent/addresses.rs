//! The pods' addresses as this agent's supervisors learn them, so that connections to a
//! pod (`kubectl port-forward`, Services through the node's gateway) find it without
//! asking the runtime: one lookup per connection instead of two Podman requests. Each
//! entry names the pod's owner, who alone may connect, and the copy (epoch) it is of; a
//! copy's entry goes when its containers have stopped, before Podman frees its address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use libp2p::PeerId;

use crate::wire::{Epoch, PodUid};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    owner: PeerId,
    epoch: Epoch,
    ip: IpAddr,
}

/// Cheap to clone; shared by the supervisors and the kubelet stream server. Bounded by
/// the pods the agent runs (at most its --max-pods, one entry per pod).
#[derive(Debug, Clone, Default)]
pub struct PodAddresses(Arc<RwLock<HashMap<PodUid, Entry>>>);

impl PodAddresses {
    /// The address of copy `epoch` of `pod`; an older copy's entry is replaced, a newer
    /// one's kept.
    pub fn set(&self, pod: &PodUid, owner: PeerId, epoch: Epoch, ip: IpAddr) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        let newer_kept = map.get(pod).is_some_and(|e| e.epoch > epoch);
        if !newer_kept {
            map.insert(pod.clone(), Entry { owner, epoch, ip });
        }
    }

    /// Forgets copy `epoch` of `pod` (not a newer copy's entry).
    pub fn remove(&self, pod: &PodUid, epoch: Epoch) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        if map.get(pod).is_some_and(|e| e.epoch == epoch) {
            map.remove(pod);
        }
    }

    /// The pod's address, if `owner` owns it.
    pub fn get(&self, pod: &PodUid, owner: &PeerId) -> Option<IpAddr> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        map.get(pod).filter(|e| e.owner == *owner).map(|e| e.ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_copy_s_address_is_given_to_its_owner_only() {
        let addresses = PodAddresses::default();
        let (owner, stranger) = (PeerId::random(), PeerId::random());
        let pod = PodUid("u".into());
        let ip = |last: u8| IpAddr::from([10, 88, 0, last]);
        addresses.set(&pod, owner, Epoch(2), ip(2));
        assert_eq!(addresses.get(&pod, &owner), Some(ip(2)));
        assert_eq!(addresses.get(&pod, &stranger), None);
        // An older copy neither replaces nor removes the newer one's.
        addresses.set(&pod, owner, Epoch(1), ip(1));
        addresses.remove(&pod, Epoch(1));
        assert_eq!(addresses.get(&pod, &owner), Some(ip(2)));
        addresses.set(&pod, owner, Epoch(3), ip(3));
        assert_eq!(addresses.get(&pod, &owner), Some(ip(3)));
        addresses.remove(&pod, Epoch(3));
        assert_eq!(addresses.get(&pod, &owner), None);
    }
}
