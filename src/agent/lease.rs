//! The leases of the strict pods an agent runs (see `fencing`): when each runs out on
//! the boot clock, which renewals are due, and which copies must stop now. Pure
//! bookkeeping; the agent sends the renewals and stops the copies. Kept in a file in
//! the memory-backed secrets directory (boot-scoped, like the clock) so that a
//! restarted agent goes on from where it was.

use std::collections::BTreeMap;
use std::time::Duration;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::wire::{Epoch, PeerRef, PodUid};

/// The file of strict pods' leases, in the agent's secrets directory.
pub const LEASES_FILE: &str = "leases.json";

/// One strict pod's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: PeerRef,
    pub epoch: Epoch,
    /// As the owner last granted it.
    pub lease_ms: u64,
    /// Boot-clock milliseconds at which the copy must have stopped.
    pub expires_at_ms: u64,
    /// The pod's termination grace period: the copy is asked to stop this long before
    /// the lease runs out (at most a third of the lease), then killed.
    pub grace_ms: u64,
    /// The copy is being stopped: no more renewals. The lease stays until the copy
    /// is gone, so that the watchdog removes it if the agent cannot.
    #[serde(default)]
    pub fenced: bool,
}

impl Lease {
    /// When the copy is asked to stop: early enough to exit by itself by the expiry.
    fn stop_at_ms(&self) -> u64 {
        let notice = self.grace_ms.min(self.lease_ms / 3);
        self.expires_at_ms.saturating_sub(notice)
    }
}

/// Every lease of this agent, by pod.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseBook {
    leases: BTreeMap<PodUid, Lease>,
    /// When the last renewal to each owner was sent (boot-clock ms); not kept across
    /// restarts, so that a restarted agent renews at once.
    #[serde(skip)]
    renewed_at: BTreeMap<PeerId, u64>,
}

impl LeaseBook {
    /// A new assignment's lease, counted from its arrival.
    pub fn take(&mut self, uid: PodUid, lease: Lease) {
        self.leases.insert(uid, lease);
    }

    pub fn get(&self, uid: &PodUid) -> Option<&Lease> {
        self.leases.get(uid)
    }

    pub fn remove(&mut self, uid: &PodUid) -> Option<Lease> {
        self.leases.remove(uid)
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Keeps only the pods this agent runs (after a restart's adoption).
    pub fn retain(&mut self, mut keep: impl FnMut(&PodUid, &Lease) -> bool) {
        self.leases.retain(|uid, lease| keep(uid, lease));
    }

    /// Owners whose leases are due for renewal at `now_ms`: a third of the shortest
    /// lease since the last renewal was sent. One that hangs does not hold the next
    /// back: a broken connection must not cost a lease while a new one may get through.
    pub fn due(&mut self, now_ms: u64) -> BTreeMap<PeerId, Vec<PodUid>> {
        let mut due: BTreeMap<PeerId, Vec<PodUid>> = BTreeMap::new();
        let mut shortest: BTreeMap<PeerId, u64> = BTreeMap::new();
        for (uid, lease) in self.leases.iter().filter(|(_, l)| !l.fenced) {
            due.entry(lease.owner.0).or_default().push(uid.clone());
            let s = shortest.entry(lease.owner.0).or_insert(u64::MAX);
            *s = (*s).min(lease.lease_ms);
        }
        due.retain(|owner, _| {
            let every = shortest[owner] / 3;
            let last = self.renewed_at.get(owner).copied();
            last.is_none_or(|at| now_ms.saturating_sub(at) >= every)
        });
        for owner in due.keys() {
            self.renewed_at.insert(*owner, now_ms);
        }
        due
    }

    /// The owner answered a renewal sent at `sent_ms`: granted leases run on for
    /// `lease_ms` from then (never shortened); refused ones run out now.
    pub fn renewed(
        &mut self,
        owner: PeerId,
        sent_ms: u64,
        now_ms: u64,
        granted: &[PodUid],
        refused: &[PodUid],
        lease_ms: u64,
    ) {
        for uid in granted {
            if let Some(lease) = self.leases.get_mut(uid).filter(|l| l.owner.0 == owner) {
                lease.lease_ms = lease_ms;
                lease.expires_at_ms = lease.expires_at_ms.max(sent_ms.saturating_add(lease_ms));
            }
        }
        for uid in refused {
            if let Some(lease) = self.leases.get_mut(uid).filter(|l| l.owner.0 == owner) {
                lease.expires_at_ms = lease.expires_at_ms.min(now_ms);
            }
        }
    }

    /// The copies to stop at `now_ms`, with how long each may take to exit before the
    /// lease runs out. Each is fenced once.
    pub fn fence(&mut self, now_ms: u64) -> Vec<(PodUid, Duration)> {
        let mut due = Vec::new();
        for (uid, lease) in &mut self.leases {
            if !lease.fenced && lease.stop_at_ms() <= now_ms {
                lease.fenced = true;
                let left = lease.expires_at_ms.saturating_sub(now_ms);
                due.push((uid.clone(), Duration::from_millis(left)));
            }
        }
        due
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PodUid, &Lease)> {
        self.leases.iter()
    }

    /// The leases as their file holds them.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<LeaseBook, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(owner: PeerId, expires_at_ms: u64) -> Lease {
        Lease {
            owner: PeerRef(owner),
            epoch: Epoch(1),
            lease_ms: 15_000,
            expires_at_ms,
            grace_ms: 30_000,
            fenced: false,
        }
    }

    fn uid(s: &str) -> PodUid {
        PodUid(s.into())
    }

    #[test]
    fn renewals_are_due_every_third_of_the_shortest_lease_answered_or_not() {
        let owner = PeerId::random();
        let mut book = LeaseBook::default();
        book.take(uid("a"), lease(owner, 15_000));
        book.take(
            uid("b"),
            Lease {
                lease_ms: 30_000,
                ..lease(owner, 30_000)
            },
        );
        let due = book.due(0);
        assert_eq!(due[&owner], vec![uid("a"), uid("b")]);
        assert!(book.due(4_999).is_empty(), "not yet a third");
        assert_eq!(book.due(5_000).len(), 1, "the first one never answered");
        book.renewed(owner, 5_000, 5_100, &[uid("a"), uid("b")], &[], 15_000);
        assert!(book.due(9_999).is_empty());
        assert_eq!(book.due(10_000).len(), 1);
    }

    #[test]
    fn a_grant_counts_from_the_sending_and_never_shortens() {
        let owner = PeerId::random();
        let mut book = LeaseBook::default();
        book.take(uid("a"), lease(owner, 15_000));
        book.renewed(owner, 5_000, 5_200, &[uid("a")], &[], 15_000);
        assert_eq!(book.get(&uid("a")).map(|l| l.expires_at_ms), Some(20_000));
        book.renewed(owner, 1_000, 5_300, &[uid("a")], &[], 15_000);
        assert_eq!(book.get(&uid("a")).map(|l| l.expires_at_ms), Some(20_000));
        // Another owner cannot renew it.
        book.renewed(PeerId::random(), 9_000, 9_100, &[uid("a")], &[], 15_000);
        assert_eq!(book.get(&uid("a")).map(|l| l.expires_at_ms), Some(20_000));
    }

    #[test]
    fn a_copy_stops_a_third_of_the_lease_before_it_runs_out_and_once() {
        let owner = PeerId::random();
        let mut book = LeaseBook::default();
        book.take(uid("a"), lease(owner, 15_000));
        assert!(book.fence(9_999).is_empty());
        assert_eq!(
            book.fence(10_000),
            vec![(uid("a"), Duration::from_millis(5_000))]
        );
        assert!(book.fence(20_000).is_empty());
        // Kept (for the watchdog) until the copy is gone, but never renewed again.
        assert!(book.get(&uid("a")).is_some_and(|l| l.fenced));
        assert!(book.due(20_000).is_empty());
    }

    #[test]
    fn a_short_grace_period_stops_the_copy_later_and_a_refusal_at_once() {
        let owner = PeerId::random();
        let mut book = LeaseBook::default();
        book.take(
            uid("a"),
            Lease {
                grace_ms: 1_000,
                ..lease(owner, 15_000)
            },
        );
        book.take(uid("b"), lease(owner, 15_000));
        book.renewed(owner, 1_000, 2_000, &[], &[uid("b")], 15_000);
        assert_eq!(book.fence(2_000), vec![(uid("b"), Duration::ZERO)]);
        assert!(book.fence(13_999).is_empty());
        assert_eq!(
            book.fence(14_000),
            vec![(uid("a"), Duration::from_millis(1_000))]
        );
    }

    #[test]
    fn the_file_keeps_leases_but_not_the_renewal_schedule() {
        let owner = PeerId::random();
        let mut book = LeaseBook::default();
        book.take(uid("a"), lease(owner, 15_000));
        book.due(0);
        let mut back = LeaseBook::from_json(&book.to_json()).expect("round trip");
        assert_eq!(back.get(&uid("a")), book.get(&uid("a")));
        assert_eq!(back.due(1).len(), 1, "a restarted agent renews at once");
        assert!(LeaseBook::from_json(b"{\"leases\": 7}").is_err());
    }
}
