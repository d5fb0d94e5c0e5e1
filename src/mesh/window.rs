//! How many requests this peer has in flight to each other peer, and the ones waiting
//! for room.
//!
//! A connection's request-response streams share one bounded set on each side,
//! inbound and outbound together (libp2p's request-response handler): past it, an
//! outbound request fails at once ("max sub-streams reached") and an inbound one is
//! dropped unseen. A burst of assignments to one agent would overrun it. Sending at
//! most half of it to a peer, and queueing the rest here, leaves the other half for
//! the peer's own requests, so neither side ever hits the limit.

use std::collections::{HashMap, VecDeque};

use libp2p::PeerId;

/// What became of a request offered to the window.
#[derive(Debug)]
pub enum Admitted<T> {
    /// Send it now.
    Send(T),
    /// Held until a request to the same peer finishes.
    Queued,
    /// The peer's queue is full: refuse it.
    Full(T),
}

#[derive(Debug)]
struct PeerRequests<T> {
    in_flight: usize,
    queued: VecDeque<T>,
}

/// Per-peer in-flight counts and queues; a peer with neither is forgotten.
#[derive(Debug)]
pub struct RequestWindow<T> {
    per_peer: usize,
    max_queued: usize,
    peers: HashMap<PeerId, PeerRequests<T>>,
    queued: usize,
}

impl<T> RequestWindow<T> {
    pub fn new(per_peer: usize, max_queued: usize) -> Self {
        RequestWindow {
            per_peer,
            max_queued,
            peers: HashMap::new(),
            queued: 0,
        }
    }

    pub fn admit(&mut self, peer: PeerId, request: T) -> Admitted<T> {
        let entry = self.peers.entry(peer).or_insert_with(|| PeerRequests {
            in_flight: 0,
            queued: VecDeque::new(),
        });
        if entry.in_flight < self.per_peer {
            entry.in_flight += 1;
            Admitted::Send(request)
        } else if entry.queued.len() < self.max_queued {
            entry.queued.push_back(request);
            self.queued += 1;
            Admitted::Queued
        } else {
            Admitted::Full(request)
        }
    }

    /// A request to `peer` finished (answered or failed): the next one waiting for it,
    /// if any, now counts as in flight and is to be sent.
    pub fn finished(&mut self, peer: &PeerId) -> Option<T> {
        let entry = self.peers.get_mut(peer)?;
        entry.in_flight = entry.in_flight.saturating_sub(1);
        let next = entry.queued.pop_front();
        if next.is_some() {
            entry.in_flight += 1;
            self.queued -= 1;
        } else if entry.in_flight == 0 {
            self.peers.remove(peer);
        }
        next
    }

    /// Requests waiting, to every peer.
    pub fn queued(&self) -> usize {
        self.queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_window_requests_wait_and_go_in_order_as_others_finish() {
        let peer = PeerId::random();
        let mut window = RequestWindow::new(2, 2);
        assert!(matches!(window.admit(peer, 1), Admitted::Send(1)));
        assert!(matches!(window.admit(peer, 2), Admitted::Send(2)));
        assert!(matches!(window.admit(peer, 3), Admitted::Queued));
        assert!(matches!(window.admit(peer, 4), Admitted::Queued));
        assert!(matches!(window.admit(peer, 5), Admitted::Full(5)));
        assert_eq!(window.queued(), 2);
        assert_eq!(window.finished(&peer), Some(3));
        assert_eq!(window.finished(&peer), Some(4));
        // 3 and 4 are in flight now: a new one waits again.
        assert!(matches!(window.admit(peer, 6), Admitted::Queued));
        assert_eq!(window.finished(&peer), Some(6));
        assert_eq!(window.queued(), 0);
        assert_eq!(window.finished(&peer), None);
        assert_eq!(window.finished(&peer), None);
        assert_eq!(window.finished(&peer), None);
        assert!(window.peers.is_empty(), "an idle peer is forgotten");
    }

    #[test]
    fn peers_have_windows_of_their_own() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut window = RequestWindow::new(1, 1);
        assert!(matches!(window.admit(a, 1), Admitted::Send(1)));
        assert!(matches!(window.admit(b, 2), Admitted::Send(2)));
        assert!(matches!(window.admit(a, 3), Admitted::Queued));
        assert_eq!(window.finished(&b), None);
        assert_eq!(window.finished(&a), Some(3));
        // A finish for a peer never seen changes nothing.
        assert_eq!(window.finished(&PeerId::random()), None);
    }
}
