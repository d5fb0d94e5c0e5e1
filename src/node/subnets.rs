//! Pod subnets: the owner gives each agent its own subnet of the mesh pod CIDR
//! (`--mesh-pod-cidr`), on which the agent runs the owner's pods, so that a mesh pod's
//! IP is unique across the mesh (Podman's default network repeats the same addresses
//! on every host).
//!
//! The owner keeps no record of its own: agents say in their heartbeats which subnets
//! their pods run in, and a restarted owner takes those back before it gives out new
//! ones (it places nothing until its adopt window has passed).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use libp2p::PeerId;

/// `--mesh-pod-cidr`'s default: apart from k3s's pod and service CIDRs (10.42.0.0/16,
/// 10.43.0.0/16), kubeadm's (10.244.0.0/16, 10.96.0.0/12) and Podman's default network
/// (10.88.0.0/16).
pub const DEFAULT_CIDR: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 64, 0, 0), 12);
/// `--mesh-pod-subnet-prefix`'s default: 4096 agents of up to 253 pods.
pub const DEFAULT_PREFIX: u8 = 24;

/// The smallest subnet an agent can be given: a gateway and a pod besides the network
/// and broadcast addresses.
pub const LONGEST_PREFIX: u8 = 30;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubnetError {
    #[error("the per-agent prefix /{prefix} is shorter than the mesh pod CIDR {cidr}")]
    PrefixShorterThanCidr { cidr: Ipv4Net, prefix: u8 },
    #[error("the per-agent prefix /{prefix} leaves no room for pods (at most /{LONGEST_PREFIX})")]
    PrefixTooLong { prefix: u8 },
    #[error("the mesh pod CIDR {mesh} overlaps the {what} {other}")]
    Overlaps {
        mesh: Ipv4Net,
        what: &'static str,
        other: Ipv4Net,
    },
}

/// Every subnet of the CIDR is held by an agent that may still run pods there.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no pod subnet left: all {count} /{prefix} subnets of the mesh pod CIDR {cidr} are given to agents (a larger --mesh-pod-cidr or a longer --mesh-pod-subnet-prefix makes room)")]
pub struct Exhausted {
    pub cidr: Ipv4Net,
    pub prefix: u8,
    pub count: u64,
}

/// Checks that the mesh pod CIDR is apart from each of `others` (what, CIDR).
pub fn check_apart(mesh: Ipv4Net, others: &[(&'static str, Ipv4Net)]) -> Result<(), SubnetError> {
    match others.iter().find(|(_, other)| overlaps(mesh, *other)) {
        Some(&(what, other)) => Err(SubnetError::Overlaps { mesh, what, other }),
        None => Ok(()),
    }
}

pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Which agent holds which subnet of the mesh pod CIDR. An empty pool is what the
/// owner is configured with: made only by [`SubnetPool::new`], it is valid.
#[derive(Debug, Clone)]
pub struct SubnetPool {
    cidr: Ipv4Net,
    prefix: u8,
    by_agent: HashMap<PeerId, Ipv4Net>,
    by_subnet: BTreeMap<Ipv4Net, PeerId>,
}

impl Default for SubnetPool {
    fn default() -> Self {
        SubnetPool {
            cidr: DEFAULT_CIDR,
            prefix: DEFAULT_PREFIX,
            by_agent: HashMap::new(),
            by_subnet: BTreeMap::new(),
        }
    }
}

impl SubnetPool {
    pub fn new(cidr: Ipv4Net, prefix: u8) -> Result<SubnetPool, SubnetError> {
        if prefix < cidr.prefix_len() {
            return Err(SubnetError::PrefixShorterThanCidr { cidr, prefix });
        }
        if prefix > LONGEST_PREFIX {
            return Err(SubnetError::PrefixTooLong { prefix });
        }
        Ok(SubnetPool {
            cidr: cidr.trunc(),
            prefix,
            by_agent: HashMap::new(),
            by_subnet: BTreeMap::new(),
        })
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// The agent's subnet, if it has one.
    pub fn subnet_of(&self, agent: &PeerId) -> Option<Ipv4Net> {
        self.by_agent.get(agent).copied()
    }

    /// An agent's heartbeat says its pods run in `subnet`: it keeps it if the subnet is
    /// one of this pool's, the agent holds none yet and no other agent holds it.
    /// Returns whether the agent now holds it.
    pub fn claim(&mut self, agent: PeerId, subnet: Ipv4Net) -> bool {
        if let Some(held) = self.by_agent.get(&agent) {
            return *held == subnet;
        }
        if subnet.prefix_len() != self.prefix
            || !self.cidr.contains(&subnet)
            || subnet.trunc() != subnet
            || self.by_subnet.contains_key(&subnet)
        {
            return false;
        }
        self.by_agent.insert(agent, subnet);
        self.by_subnet.insert(subnet, agent);
        true
    }

    /// The agent's subnet, given now if it has none: the first free one, else that of
    /// an agent `reclaimable` says is gone for good (no pods, not heard from).
    pub fn allocate(
        &mut self,
        agent: PeerId,
        mut reclaimable: impl FnMut(&PeerId) -> bool,
    ) -> Result<Ipv4Net, Exhausted> {
        if let Some(held) = self.subnet_of(&agent) {
            return Ok(held);
        }
        let free = self
            .cidr
            .subnets(self.prefix)
            .ok()
            .and_then(|mut all| all.find(|s| !self.by_subnet.contains_key(s)));
        let subnet = match free {
            Some(subnet) => subnet,
            None => {
                let (&subnet, &gone) = self
                    .by_subnet
                    .iter()
                    .find(|(_, holder)| reclaimable(holder))
                    .ok_or(Exhausted {
                        cidr: self.cidr,
                        prefix: self.prefix,
                        count: 1u64 << (self.prefix - self.cidr.prefix_len()),
                    })?;
                self.by_agent.remove(&gone);
                subnet
            }
        };
        self.by_agent.insert(agent, subnet);
        self.by_subnet.insert(subnet, agent);
        Ok(subnet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("cidr")
    }

    #[test]
    fn agents_get_distinct_subnets_and_keep_theirs() {
        let mut pool = SubnetPool::new(net("10.64.0.0/22"), 24).expect("pool");
        let (a, b) = (PeerId::random(), PeerId::random());
        let first = pool.allocate(a, |_| false).expect("room");
        let second = pool.allocate(b, |_| false).expect("room");
        assert_eq!(first, net("10.64.0.0/24"));
        assert_eq!(second, net("10.64.1.0/24"));
        assert_eq!(pool.allocate(a, |_| false), Ok(first));
        assert_eq!(pool.subnet_of(&b), Some(second));
    }

    #[test]
    fn heartbeats_give_back_what_agents_held_and_nothing_else() {
        let mut pool = SubnetPool::new(net("10.64.0.0/22"), 24).expect("pool");
        let (a, b) = (PeerId::random(), PeerId::random());
        assert!(pool.claim(a, net("10.64.2.0/24")));
        assert!(pool.claim(a, net("10.64.2.0/24")), "the same claim again");
        assert!(!pool.claim(a, net("10.64.3.0/24")), "one subnet per agent");
        assert!(!pool.claim(b, net("10.64.2.0/24")), "held by another agent");
        assert!(!pool.claim(b, net("10.65.0.0/24")), "outside the CIDR");
        assert!(!pool.claim(b, net("10.64.0.0/25")), "another prefix");
        assert!(!pool.claim(b, net("10.64.1.7/24")), "not a subnet boundary");
        // A new agent gets the first subnet nobody claimed.
        assert_eq!(pool.allocate(b, |_| false), Ok(net("10.64.0.0/24")));
    }

    #[test]
    fn an_exhausted_pool_takes_back_only_what_gone_agents_held() {
        let mut pool = SubnetPool::new(net("10.64.0.0/23"), 24).expect("pool");
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        pool.allocate(a, |_| false).expect("room");
        pool.allocate(b, |_| false).expect("room");
        let exhausted = pool.allocate(c, |_| false).expect_err("full");
        assert_eq!(exhausted.count, 2);
        assert!(
            exhausted.to_string().contains("10.64.0.0/23"),
            "{exhausted}"
        );
        assert_eq!(pool.subnet_of(&c), None);
        assert_eq!(pool.allocate(c, |gone| *gone == b), Ok(net("10.64.1.0/24")));
        assert_eq!(pool.subnet_of(&b), None);
        assert_eq!(pool.subnet_of(&a), Some(net("10.64.0.0/24")));
    }

    #[test]
    fn prefixes_are_checked() {
        assert_eq!(
            SubnetPool::new(net("10.64.0.0/16"), 12).expect_err("shorter"),
            SubnetError::PrefixShorterThanCidr {
                cidr: net("10.64.0.0/16"),
                prefix: 12
            }
        );
        assert!(SubnetPool::new(net("10.64.0.0/16"), 31).is_err());
        assert!(SubnetPool::new(net("10.64.0.0/16"), 30).is_ok());
    }

    #[test]
    fn overlapping_cidrs_are_named() {
        let mesh = net("10.64.0.0/12");
        assert!(check_apart(mesh, &[("cluster pod CIDR", net("10.42.0.0/16"))]).is_ok());
        let err = check_apart(
            mesh,
            &[
                ("cluster pod CIDR", net("10.42.0.0/16")),
                ("cluster service CIDR", net("10.72.0.0/16")),
            ],
        )
        .expect_err("overlaps");
        assert_eq!(
            err.to_string(),
            "the mesh pod CIDR 10.64.0.0/12 overlaps the cluster service CIDR 10.72.0.0/16"
        );
        assert!(overlaps(net("10.0.0.0/8"), net("10.64.3.0/24")));
        assert!(!overlaps(net("10.64.0.0/12"), net("10.88.0.0/16")));
    }
}
