//! What a peer knows of the agents on the mesh, from their heartbeats.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use tokio::time::Instant;

use crate::placement::AgentCapacity;
use crate::wire::{AgentSummary, Heartbeat, HostedPod, MeshView, PeerRef, PodSummary};

#[derive(Debug, Clone)]
pub struct SeenAgent {
    /// The heartbeat, less the pods a reader keeps its own record of (see
    /// [`HeartbeatBook::take_listed`]).
    pub heartbeat: Heartbeat,
    pub last_seen: Instant,
    /// How many pods the heartbeat listed.
    listed: usize,
    /// What the heartbeat offers for placement, worked out once per heartbeat: owners
    /// look at it for every pod they place.
    capacity: AgentCapacity,
}

impl SeenAgent {
    pub fn new(heartbeat: Heartbeat, last_seen: Instant) -> SeenAgent {
        let capacity = AgentCapacity {
            labels: Arc::new(heartbeat.labels.clone()),
            capacity: heartbeat.capacity,
            free: heartbeat.free,
            used_host_ports: heartbeat
                .pods
                .iter()
                .flat_map(|p| p.host_ports.iter().copied())
                .collect::<BTreeSet<u16>>(),
            health: heartbeat.health.clone(),
        };
        SeenAgent {
            listed: heartbeat.pods.len(),
            heartbeat,
            last_seen,
            capacity,
        }
    }

    pub fn capacity(&self) -> &AgentCapacity {
        &self.capacity
    }
}

/// The latest heartbeat of every agent, with when it arrived.
#[derive(Debug, Default)]
pub struct HeartbeatBook {
    agents: HashMap<PeerId, SeenAgent>,
}

impl HeartbeatBook {
    /// Records a heartbeat; true when the agent is new or its free capacity or health
    /// changed (which is when pending pods deserve another offer: a runtime that works
    /// again takes pods at once, not a retry later).
    pub fn record(&mut self, agent: PeerId, heartbeat: Heartbeat) -> bool {
        let now = Instant::now();
        let changed = self.agents.get(&agent).is_none_or(|seen| {
            seen.heartbeat.free != heartbeat.free || seen.heartbeat.health != heartbeat.health
        });
        self.agents.insert(agent, SeenAgent::new(heartbeat, now));
        changed
    }

    /// Removes and returns the agents not heard from within `timeout`.
    pub fn take_lost(&mut self, timeout: Duration) -> Vec<PeerId> {
        let now = Instant::now();
        let lost: Vec<PeerId> = self
            .agents
            .iter()
            .filter(|(_, seen)| now.duration_since(seen.last_seen) > timeout)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in &lost {
            self.agents.remove(peer);
        }
        lost
    }

    /// Takes from an agent's last heartbeat the pods `take` picks, and returns them: an
    /// owner keeps its own pods' state, and a million listed again would double it.
    /// What the heartbeat offers for placement, and its count of pods, still include
    /// them.
    pub fn take_listed(
        &mut self,
        agent: &PeerId,
        take: impl Fn(&HostedPod) -> bool,
    ) -> Vec<HostedPod> {
        let Some(seen) = self.agents.get_mut(agent) else {
            return Vec::new();
        };
        let (taken, mut kept): (Vec<_>, Vec<_>) = std::mem::take(&mut seen.heartbeat.pods)
            .into_iter()
            .partition(take);
        kept.shrink_to_fit();
        seen.heartbeat.pods = kept;
        taken
    }

    pub fn get(&self, agent: &PeerId) -> Option<&SeenAgent> {
        self.agents.get(agent)
    }

    /// Forgets an agent (its trust was revoked).
    pub fn remove(&mut self, agent: &PeerId) -> bool {
        self.agents.remove(agent).is_some()
    }

    pub fn live(&self) -> impl Iterator<Item = (&PeerId, &SeenAgent)> {
        self.agents.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Agents heard from within `timeout`, and the pods their heartbeats list.
    pub fn view(&self, timeout: Duration) -> MeshView {
        let now = Instant::now();
        let mut view = MeshView::default();
        for (peer, seen) in &self.agents {
            let age = now.duration_since(seen.last_seen);
            if age > timeout {
                continue;
            }
            view.agents.push(AgentSummary {
                peer: PeerRef(*peer),
                labels: seen.heartbeat.labels.clone(),
                capacity: seen.heartbeat.capacity,
                free: seen.heartbeat.free,
                pods: seen.listed,
                last_seen_secs: age.as_secs(),
                health: seen.heartbeat.health.clone(),
            });
            view.pods.extend(seen.heartbeat.pods.iter().map(|hosted| {
                PodSummary::new(
                    hosted.pod.clone(),
                    Some(PeerRef(*peer)),
                    hosted.epoch,
                    hosted.phase.clone(),
                )
            }));
        }
        view.agents.sort_by_key(|a| a.peer);
        view.pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AgentHealth, Resources};

    fn heartbeat(free_cpu: u64, runtime_error: Option<&str>) -> Heartbeat {
        Heartbeat {
            labels: Default::default(),
            capacity: Resources {
                cpu_millis: 4000,
                memory_bytes: 1 << 30,
                pods: 10,
            },
            free: Resources {
                cpu_millis: free_cpu,
                memory_bytes: 1 << 30,
                pods: 10,
            },
            pods: vec![],
            uptime_secs: 1,
            storage_bytes: 0,
            seq: 1,
            sent_at_ms: 1,
            health: AgentHealth {
                runtime_error: runtime_error.map(str::to_string),
                ..AgentHealth::default()
            },
            pod_subnets: Vec::new(),
        }
    }

    #[test]
    fn a_new_agent_and_changes_of_room_or_health_call_for_offers() {
        let mut book = HeartbeatBook::default();
        let agent = PeerId::random();
        assert!(book.record(agent, heartbeat(4000, None)), "new");
        assert!(!book.record(agent, heartbeat(4000, None)), "same");
        assert!(book.record(agent, heartbeat(3000, None)), "room");
        assert!(
            book.record(agent, heartbeat(3000, Some("ping: refused"))),
            "sick"
        );
        assert!(book.record(agent, heartbeat(3000, None)), "well again");
    }

    #[test]
    fn pods_forgotten_from_a_heartbeat_still_count_and_keep_their_host_ports() {
        let mut book = HeartbeatBook::default();
        let agent = PeerId::random();
        let (mine, theirs) = (PeerId::random(), PeerId::random());
        let hosted = |name: &str, owner: PeerId, port: u16| HostedPod {
            pod: crate::wire::PodRef {
                uid: crate::wire::PodUid(name.into()),
                namespace: "default".into(),
                name: name.into(),
            },
            owner: PeerRef(owner),
            epoch: crate::wire::Epoch(1),
            phase: "Running".into(),
            requests: Resources::default(),
            host_ports: vec![port],
            unrecorded: false,
        };
        let mut beat = heartbeat(4000, None);
        beat.pods = vec![hosted("a", mine, 8080), hosted("b", theirs, 9090)];
        book.record(agent, beat);
        let taken = book.take_listed(&agent, |p| p.owner.0 == mine);
        assert_eq!(taken, [hosted("a", mine, 8080)]);
        let view = book.view(Duration::from_secs(60));
        assert_eq!(view.agents[0].pods, 2);
        let names: Vec<&str> = view.pods.iter().map(|p| p.pod.name.as_str()).collect();
        assert_eq!(names, ["b"]);
        let ports = &book
            .get(&agent)
            .map(|seen| seen.capacity().used_host_ports.clone());
        assert_eq!(ports, &Some(BTreeSet::from([8080, 9090])));
    }
}
