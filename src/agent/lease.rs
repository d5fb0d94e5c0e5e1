//! The leases of the strict pods an agent runs (see `fencing`): when each runs out on
//! the boot clock, which renewals are due, and which copies must stop now. Pure
//! bookkeeping; the agent sends the renewals and stops the copies. Kept in a file in
//! the memory-backed secrets directory (boot-scoped, like the clock) so that a
//! restarted agent goes on from where it was.
//!
//! A strict pod of a stateful workload also needs its seat in the workload's group
//! ([`SeatLease`]): its containers start once the group has seated this copy, and the
//! copy stops when the group has not renewed the seat for [`SEAT_LEASE_MS`], whichever
//! lease runs out first. Another copy takes the seat over only after seeing it
//! unrenewed for longer than that, so two copies never run at once even when the owner
//! cannot tell (see `raft::kv::Command::Seat`).

use std::collections::BTreeMap;
use std::time::Duration;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::raft::kv::{Command, Outcome};
use crate::raft::GroupKey;
use crate::wire::{Epoch, PeerRef, PodUid};

/// The file of strict pods' leases, in the agent's secrets directory.
pub const LEASES_FILE: &str = "leases.json";

/// How long a copy keeps its seat after sending a renewal that the group committed.
pub const SEAT_LEASE_MS: u64 = 10_000;
/// How much longer than a seat lease another copy must see the seat unrenewed before
/// it takes it over: how much slower the holder's clock may run, and its stop.
pub const SEAT_MARGIN_MS: u64 = 2_000;
/// How often a copy waiting for its seat asks for it.
pub const SEAT_RETRY_MS: u64 = 1_000;

/// A strict pod's seat in its group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatLease {
    pub namespace: String,
    pub group: String,
    pub pod: String,
    /// This copy, as the group knows it: `<agent>/<epoch>`.
    pub holder: String,
    /// The seat's revision while this copy holds it; 0 while it waits.
    pub revision: u64,
    /// Boot-clock milliseconds at which the copy must have stopped: a seat lease from
    /// the sending of the last renewal the group committed.
    pub expires_at_ms: u64,
    /// When the last attempt was sent.
    #[serde(skip)]
    sent_ms: Option<u64>,
    /// Who else holds the seat at which revision, seen unchanged since when.
    #[serde(skip)]
    seen: Option<(String, u64, u64)>,
}

impl SeatLease {
    pub fn new(namespace: &str, group: &str, pod: &str, holder: String) -> SeatLease {
        SeatLease {
            namespace: namespace.to_owned(),
            group: group.to_owned(),
            pod: pod.to_owned(),
            holder,
            revision: 0,
            expires_at_ms: 0,
            sent_ms: None,
            seen: None,
        }
    }

    pub fn seated(&self) -> bool {
        self.revision > 0
    }

    /// The group, as the agent tells groups apart: `owner` placed the pod.
    pub fn group_key(&self, owner: PeerId) -> GroupKey {
        GroupKey {
            owner,
            namespace: self.namespace.clone(),
            name: self.group.clone(),
        }
    }

    /// What gives the seat back, if this copy has it.
    pub fn unseat(&self) -> Command {
        Command::Unseat {
            pod: self.pod.clone(),
            holder: self.holder.clone(),
        }
    }

    /// What a copy waiting for the seat shows on its containers.
    pub fn waiting_message(&self) -> String {
        match &self.seen {
            Some((holder, _, _)) if !holder.is_empty() && *holder != self.holder => format!(
                "waiting for group {} to seat this copy of {}: {holder} has the seat until it is not renewed for {} s",
                self.group,
                self.pod,
                (SEAT_LEASE_MS + SEAT_MARGIN_MS) / 1000
            ),
            _ => format!(
                "waiting for group {} to seat this copy of {}",
                self.group, self.pod
            ),
        }
    }
}

/// A seat attempt to propose to the pod's group: a take, a renewal or a takeover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeatAttempt {
    pub group: GroupKey,
    /// A [`Command::Seat`].
    pub command: Command,
}

/// What a group's answer changed for a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeatNews {
    /// The copy now has the seat: its containers may start.
    Seated,
    /// Another copy has it; the copy waits, saying this.
    Waiting(String),
    /// The copy had the seat and another took it over: it stops now.
    Lost,
}

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
    /// Its seat, for a pod of a stateful workload.
    #[serde(default)]
    pub seat: Option<SeatLease>,
}

impl Lease {
    /// When the copy must have stopped: its owner's lease or its seat, whichever runs
    /// out first.
    pub fn deadline_ms(&self) -> u64 {
        match &self.seat {
            Some(seat) if seat.seated() => self.expires_at_ms.min(seat.expires_at_ms),
            _ => self.expires_at_ms,
        }
    }

    /// When the copy is asked to stop: early enough to exit by itself by the deadline.
    fn stop_at_ms(&self) -> u64 {
        let by_owner = self
            .expires_at_ms
            .saturating_sub(self.grace_ms.min(self.lease_ms / 3));
        match &self.seat {
            Some(seat) if seat.seated() => by_owner.min(
                seat.expires_at_ms
                    .saturating_sub(self.grace_ms.min(SEAT_LEASE_MS / 3)),
            ),
            _ => by_owner,
        }
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
    /// deadline, and whether the seat (not the owner's lease) ran out. Each is fenced
    /// once.
    pub fn fence(&mut self, now_ms: u64) -> Vec<(PodUid, Duration, bool)> {
        let mut due = Vec::new();
        for (uid, lease) in &mut self.leases {
            if !lease.fenced && lease.stop_at_ms() <= now_ms {
                lease.fenced = true;
                let left = lease.deadline_ms().saturating_sub(now_ms);
                let by_seat = lease.deadline_ms() < lease.expires_at_ms;
                due.push((uid.clone(), Duration::from_millis(left), by_seat));
            }
        }
        due
    }

    /// Seat attempts due at `now_ms`: a seated copy renews every third of a seat lease
    /// (answered or not, as with owners), a waiting one asks every [`SEAT_RETRY_MS`],
    /// at the revision it may take the seat at: its own, one nobody renewed for a
    /// seat lease and margin, else none (0: only a free seat).
    pub fn seats_due(&mut self, now_ms: u64) -> Vec<(PodUid, SeatAttempt)> {
        let mut due = Vec::new();
        for (uid, lease) in self.leases.iter_mut().filter(|(_, l)| !l.fenced) {
            let Some(seat) = lease.seat.as_mut() else {
                continue;
            };
            let every = if seat.seated() {
                SEAT_LEASE_MS / 3
            } else {
                SEAT_RETRY_MS
            };
            if seat
                .sent_ms
                .is_some_and(|at| now_ms.saturating_sub(at) < every)
            {
                continue;
            }
            seat.sent_ms = Some(now_ms);
            let expect = match &seat.seen {
                _ if seat.seated() => seat.revision,
                Some((holder, revision, since))
                    if *holder == seat.holder
                        || now_ms.saturating_sub(*since) >= SEAT_LEASE_MS + SEAT_MARGIN_MS =>
                {
                    *revision
                }
                _ => 0,
            };
            due.push((
                uid.clone(),
                SeatAttempt {
                    group: seat.group_key(lease.owner.0),
                    command: Command::Seat {
                        pod: seat.pod.clone(),
                        holder: seat.holder.clone(),
                        expect,
                    },
                },
            ));
        }
        due
    }

    /// The group's answer, at `now_ms`, to the seat attempt sent at `sent_ms`.
    pub fn seat_answered(
        &mut self,
        uid: &PodUid,
        sent_ms: u64,
        now_ms: u64,
        outcome: &Outcome,
    ) -> Option<SeatNews> {
        let seat = self.leases.get_mut(uid)?.seat.as_mut()?;
        match outcome {
            Outcome::Seated { revision } => {
                let newly = !seat.seated();
                // Answers may come out of order: the latest revision and the latest
                // sending count.
                seat.revision = seat.revision.max(*revision);
                seat.expires_at_ms = seat
                    .expires_at_ms
                    .max(sent_ms.saturating_add(SEAT_LEASE_MS));
                seat.seen = None;
                newly.then_some(SeatNews::Seated)
            }
            // An earlier attempt of this copy moved the seat on (its answer is late or
            // lost): the next attempt renews at that revision.
            Outcome::SeatTaken { holder, revision } if *holder == seat.holder => {
                if seat.seated() {
                    seat.revision = seat.revision.max(*revision);
                } else {
                    seat.seen = Some((holder.clone(), *revision, now_ms));
                }
                None
            }
            Outcome::SeatTaken { holder, revision } => {
                if seat.seated() {
                    seat.expires_at_ms = seat.expires_at_ms.min(now_ms);
                    return Some(SeatNews::Lost);
                }
                // Counted from this answer, which came after the renewal it saw was
                // sent: the holder stops a seat lease after that sending.
                if seat
                    .seen
                    .as_ref()
                    .is_none_or(|(h, r, _)| h != holder || r != revision)
                {
                    seat.seen = Some((holder.clone(), *revision, now_ms));
                }
                Some(SeatNews::Waiting(seat.waiting_message()))
            }
            _ => None,
        }
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
            seat: None,
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
            vec![(uid("a"), Duration::from_millis(5_000), false)]
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
        assert_eq!(book.fence(2_000), vec![(uid("b"), Duration::ZERO, false)]);
        assert!(book.fence(13_999).is_empty());
        assert_eq!(
            book.fence(14_000),
            vec![(uid("a"), Duration::from_millis(1_000), false)]
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

    fn seated_book(owner: PeerId) -> LeaseBook {
        let mut book = LeaseBook::default();
        book.take(
            uid("a"),
            Lease {
                grace_ms: 1_000,
                seat: Some(SeatLease::new("default", "web", "web-0", "me/1".into())),
                ..lease(owner, 60_000)
            },
        );
        book
    }

    fn expect_of(attempt: &SeatAttempt) -> u64 {
        match attempt.command {
            Command::Seat { expect, .. } => expect,
            _ => panic!("not a seat attempt: {attempt:?}"),
        }
    }

    fn taken(holder: &str, revision: u64) -> Outcome {
        Outcome::SeatTaken {
            holder: holder.into(),
            revision,
        }
    }

    #[test]
    fn a_waiting_copy_takes_over_only_a_seat_unrenewed_for_a_lease_and_margin() {
        let mut book = seated_book(PeerId::random());
        let expects = |book: &mut LeaseBook, now| -> Vec<u64> {
            book.seats_due(now)
                .into_iter()
                .map(|(_, a)| expect_of(&a))
                .collect()
        };
        // Asked at 0 (only a free seat); another copy has it at revision 7.
        assert_eq!(expects(&mut book, 0), vec![0]);
        let news = book.seat_answered(&uid("a"), 0, 100, &taken("old/1", 7));
        assert!(
            matches!(&news, Some(SeatNews::Waiting(m)) if m.contains("old/1 has the seat")),
            "{news:?}"
        );
        assert!(
            expects(&mut book, 999).is_empty(),
            "asked again after a second"
        );
        assert_eq!(expects(&mut book, 1_000), vec![0]);
        // Renewed meanwhile: the wait starts again from when that was seen.
        book.seat_answered(&uid("a"), 1_000, 1_100, &taken("old/1", 9));
        let takeover_at = 1_100 + SEAT_LEASE_MS + SEAT_MARGIN_MS;
        let mut now = 2_000;
        while now < takeover_at {
            assert_eq!(expects(&mut book, now), vec![0], "at {now}");
            book.seat_answered(&uid("a"), now, now, &taken("old/1", 9));
            now += SEAT_RETRY_MS;
        }
        assert_eq!(
            expects(&mut book, now),
            vec![9],
            "taken over at the revision seen"
        );
        assert_eq!(
            book.seat_answered(&uid("a"), now, now + 50, &Outcome::Seated { revision: 30 }),
            Some(SeatNews::Seated)
        );
        let lease = book.get(&uid("a")).expect("lease");
        assert_eq!(lease.deadline_ms(), now + SEAT_LEASE_MS, "from the sending");
    }

    #[test]
    fn a_seated_copy_renews_every_third_and_stops_when_its_seat_runs_out_or_is_taken() {
        let mut book = seated_book(PeerId::random());
        book.seats_due(0);
        assert_eq!(
            book.seat_answered(&uid("a"), 0, 10, &Outcome::Seated { revision: 4 }),
            Some(SeatNews::Seated)
        );
        assert!(book.seats_due(SEAT_LEASE_MS / 3 - 1).is_empty());
        let due = book.seats_due(SEAT_LEASE_MS / 3);
        assert_eq!(expect_of(&due[0].1), 4, "a renewal at its own revision");
        // Unanswered renewals: the seat runs out a lease after the last one committed,
        // before the owner's lease; the copy is asked to stop a grace period earlier.
        assert!(book.fence(SEAT_LEASE_MS - 1_001).is_empty());
        let fenced = book.fence(SEAT_LEASE_MS - 1_000);
        assert_eq!(fenced, vec![(uid("a"), Duration::from_millis(1_000), true)]);
        assert!(
            book.seats_due(SEAT_LEASE_MS).is_empty(),
            "no renewal once fenced"
        );

        // Taken over by another copy: stopped at once.
        let mut book = seated_book(PeerId::random());
        book.seats_due(0);
        book.seat_answered(&uid("a"), 0, 10, &Outcome::Seated { revision: 4 });
        // A late answer of this copy's own earlier renewal is not a loss.
        assert_eq!(
            book.seat_answered(&uid("a"), 0, 20, &taken("me/1", 6)),
            None
        );
        assert_eq!(expect_of(&book.seats_due(SEAT_LEASE_MS / 3)[0].1), 6);
        assert_eq!(
            book.seat_answered(&uid("a"), 3_400, 3_500, &taken("new/2", 8)),
            Some(SeatNews::Lost)
        );
        assert_eq!(book.fence(3_500), vec![(uid("a"), Duration::ZERO, true)]);
    }

    #[test]
    fn a_copy_that_finds_the_seat_its_own_renews_it_and_the_seat_survives_a_restart() {
        let mut book = seated_book(PeerId::random());
        book.seats_due(0);
        assert_eq!(book.seat_answered(&uid("a"), 0, 5, &taken("me/1", 3)), None);
        assert_eq!(expect_of(&book.seats_due(1_000)[0].1), 3);
        book.seat_answered(&uid("a"), 1_000, 1_010, &Outcome::Seated { revision: 12 });
        let back = LeaseBook::from_json(&book.to_json()).expect("read back");
        let seat = back
            .get(&uid("a"))
            .and_then(|l| l.seat.clone())
            .expect("seat");
        assert_eq!(
            (seat.revision, seat.expires_at_ms),
            (12, 1_000 + SEAT_LEASE_MS)
        );
        // Leases written before seats existed still read.
        let old = br#"{"leases":{"a":{"owner":"12D3KooWRkGhZzekg6sHoqK7xhuZNt7UbDpUcLgStXhRUR8ciXTX","epoch":1,"lease_ms":1,"expires_at_ms":2,"grace_ms":3}}}"#;
        let old = LeaseBook::from_json(old).expect("an older file");
        assert_eq!(old.get(&uid("a")).map(|l| l.seat.is_none()), Some(true));
    }
}
