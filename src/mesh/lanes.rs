//! The lanes that carry mesh events from the event loop to the program, so that a flood
//! can neither block the Swarm nor crowd out the messages that matter.
//!
//! - **control**: requests from trusted peers (assignments, releases, status reports,
//!   bids, renewals) and their connection events. Never dropped while its overflow
//!   queue has room: when the program lags, events wait there, in order, and move on as
//!   the channel frees (back-pressure without stalling the Swarm).
//! - **gossip**: offers and heartbeats, already limited to trusted signers; periodic, so
//!   under overload the newest are dropped and counted.
//! - **untrusted**: requests (joins, status queries) and connection events of peers not
//!   trusted: dropped and counted when full, so strangers cannot crowd the others out.
//!
//! [`MeshEvents::recv`] reads them in that order of priority.

use std::collections::VecDeque;

use tokio::sync::mpsc::{self, error::TrySendError, OwnedPermit};

use super::MeshEvent;

/// Events each lane's channel holds.
const CONTROL_CAPACITY: usize = 1024;
const GOSSIP_CAPACITY: usize = 1024;
const UNTRUSTED_CAPACITY: usize = 256;
/// Control events kept waiting for room beyond the channel; past this, dropped.
pub(super) const CONTROL_OVERFLOW: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    Control,
    Gossip,
    Untrusted,
}

/// The event loop's side.
pub(super) struct Lanes {
    control: mpsc::Sender<MeshEvent>,
    gossip: mpsc::Sender<MeshEvent>,
    untrusted: mpsc::Sender<MeshEvent>,
    /// Control events waiting for room in the channel, oldest first.
    overflow: VecDeque<MeshEvent>,
}

/// The program's side: every mesh event, control first.
pub struct MeshEvents {
    control: mpsc::Receiver<MeshEvent>,
    gossip: mpsc::Receiver<MeshEvent>,
    untrusted: mpsc::Receiver<MeshEvent>,
}

/// The event could not be queued: the program is that far behind.
#[derive(Debug)]
pub(super) struct Dropped;

pub(super) fn lanes() -> (Lanes, MeshEvents) {
    let (control_tx, control) = mpsc::channel(CONTROL_CAPACITY);
    let (gossip_tx, gossip) = mpsc::channel(GOSSIP_CAPACITY);
    let (untrusted_tx, untrusted) = mpsc::channel(UNTRUSTED_CAPACITY);
    (
        Lanes {
            control: control_tx,
            gossip: gossip_tx,
            untrusted: untrusted_tx,
            overflow: VecDeque::new(),
        },
        MeshEvents {
            control,
            gossip,
            untrusted,
        },
    )
}

impl Lanes {
    /// Queues an event without waiting.
    pub(super) fn send(&mut self, lane: Lane, event: MeshEvent) -> Result<(), Dropped> {
        let sender = match lane {
            Lane::Control if !self.overflow.is_empty() => return self.wait(event),
            Lane::Control => &self.control,
            Lane::Gossip => &self.gossip,
            Lane::Untrusted => &self.untrusted,
        };
        match sender.try_send(event) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(event)) if lane == Lane::Control => self.wait(event),
            // Closed: the program is gone, nothing is lost that anyone would read.
            Err(TrySendError::Closed(_)) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Dropped),
        }
    }

    fn wait(&mut self, event: MeshEvent) -> Result<(), Dropped> {
        if self.overflow.len() >= CONTROL_OVERFLOW {
            return Err(Dropped);
        }
        self.overflow.push_back(event);
        Ok(())
    }

    /// Whether control events are waiting for room.
    pub(super) fn backlogged(&self) -> bool {
        !self.overflow.is_empty()
    }

    /// A sender the event loop waits on for room in the control channel.
    pub(super) fn control_sender(&self) -> mpsc::Sender<MeshEvent> {
        self.control.clone()
    }

    /// Moves the oldest waiting control event into the room just reserved.
    pub(super) fn flush_one(&mut self, permit: OwnedPermit<MeshEvent>) {
        if let Some(event) = self.overflow.pop_front() {
            permit.send(event);
        }
    }
}

impl MeshEvents {
    /// The next event already queued, in the same order as [`MeshEvents::recv`].
    pub fn try_recv(&mut self) -> Option<MeshEvent> {
        [&mut self.control, &mut self.gossip, &mut self.untrusted]
            .into_iter()
            .find_map(|lane| lane.try_recv().ok())
    }

    /// The next event: control first, then gossip, then untrusted peers'. None once the
    /// event loop has stopped and every lane is drained.
    pub async fn recv(&mut self) -> Option<MeshEvent> {
        tokio::select! {
            biased;
            Some(event) = self.control.recv() => Some(event),
            Some(event) = self.gossip.recv() => Some(event),
            Some(event) = self.untrusted.recv() => Some(event),
            else => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::PeerId;

    fn connected(peer: PeerId) -> MeshEvent {
        MeshEvent::PeerConnected(peer)
    }

    fn peer_of(event: Option<MeshEvent>) -> PeerId {
        match event {
            Some(MeshEvent::PeerConnected(peer)) => peer,
            _ => panic!("not a connection event"),
        }
    }

    #[tokio::test]
    async fn control_events_wait_in_order_and_come_first() {
        let (mut lanes, mut events) = lanes();
        let peers: Vec<PeerId> = (0..CONTROL_CAPACITY + 10)
            .map(|_| PeerId::random())
            .collect();
        let stranger = PeerId::random();
        lanes
            .send(Lane::Untrusted, connected(stranger))
            .expect("room");
        for peer in &peers {
            lanes.send(Lane::Control, connected(*peer)).expect("queued");
        }
        assert!(lanes.backlogged());
        // The program reads; the event loop moves waiting events on as room appears.
        let control = lanes.control_sender();
        let mut read = Vec::new();
        for _ in 0..peers.len() {
            read.push(peer_of(events.recv().await));
            while lanes.backlogged() {
                match control.clone().try_reserve_owned() {
                    Ok(permit) => lanes.flush_one(permit),
                    Err(_) => break,
                }
            }
        }
        assert_eq!(
            read, peers,
            "every control event, in order, before the stranger's"
        );
        assert_eq!(peer_of(events.recv().await), stranger);
    }

    #[tokio::test]
    async fn control_overflow_and_other_lanes_are_bounded() {
        let (mut lanes, _events) = lanes();
        for _ in 0..CONTROL_CAPACITY + CONTROL_OVERFLOW {
            lanes
                .send(Lane::Control, connected(PeerId::random()))
                .expect("queued");
        }
        assert!(lanes
            .send(Lane::Control, connected(PeerId::random()))
            .is_err());
        for _ in 0..UNTRUSTED_CAPACITY {
            lanes
                .send(Lane::Untrusted, connected(PeerId::random()))
                .expect("room");
        }
        assert!(lanes
            .send(Lane::Untrusted, connected(PeerId::random()))
            .is_err());
        for _ in 0..GOSSIP_CAPACITY {
            lanes
                .send(Lane::Gossip, connected(PeerId::random()))
                .expect("room");
        }
        assert!(lanes
            .send(Lane::Gossip, connected(PeerId::random()))
            .is_err());
    }
}
