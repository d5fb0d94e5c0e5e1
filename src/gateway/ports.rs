//! The gateway's ports: one per pod port a Service sends to, from a configured range,
//! kept as long as that pod port is wanted. A freed port is handed out again only after
//! every other free one (the next allocation goes on from the last), so that a
//! connection to a slice someone still has cached does not reach a different pod.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use super::endpoints::Target;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("all {size} gateway ports ({first}-{last}) are taken")]
pub struct Exhausted {
    pub size: usize,
    pub first: u16,
    pub last: u16,
}

#[derive(Debug)]
pub struct PortPool {
    range: RangeInclusive<u16>,
    by_target: BTreeMap<Target, u16>,
    used: BTreeSet<u16>,
    /// Where the search for a free port starts.
    next: u16,
}

impl PortPool {
    pub fn new(range: RangeInclusive<u16>) -> PortPool {
        PortPool {
            next: *range.start(),
            range,
            by_target: BTreeMap::new(),
            used: BTreeSet::new(),
        }
    }

    pub fn get(&self, target: &Target) -> Option<u16> {
        self.by_target.get(target).copied()
    }

    /// Frees the ports of targets no longer wanted; returns them.
    pub fn retain(&mut self, wanted: &BTreeSet<Target>) -> Vec<(Target, u16)> {
        let gone: Vec<Target> = self
            .by_target
            .keys()
            .filter(|t| !wanted.contains(*t))
            .cloned()
            .collect();
        gone.into_iter()
            .filter_map(|target| {
                let port = self.by_target.remove(&target)?;
                self.used.remove(&port);
                Some((target, port))
            })
            .collect()
    }

    /// The target's port, allocated if it has none.
    pub fn allocate(&mut self, target: &Target) -> Result<u16, Exhausted> {
        if let Some(port) = self.get(target) {
            return Ok(port);
        }
        let (first, last) = (*self.range.start(), *self.range.end());
        let size = usize::from(last - first) + 1;
        let port = (self.next..=last)
            .chain(first..self.next)
            .find(|p| !self.used.contains(p))
            .ok_or(Exhausted { size, first, last })?;
        self.next = if port == last { first } else { port + 1 };
        self.used.insert(port);
        self.by_target.insert(target.clone(), port);
        Ok(port)
    }

    /// Takes `port` out of use (something else holds it) until the node restarts; the
    /// target it was allocated to, if any, has none again.
    pub fn block(&mut self, port: u16) {
        self.by_target.retain(|_, p| *p != port);
        self.used.insert(port);
    }

    /// Every allocated port and its target.
    pub fn allocated(&self) -> impl Iterator<Item = (&Target, u16)> {
        self.by_target.iter().map(|(t, p)| (t, *p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(pod: &str, port: u16) -> Target {
        Target {
            namespace: "default".into(),
            pod: pod.into(),
            uid: format!("uid-{pod}"),
            port,
            protocol: super::super::endpoints::Protocol::Tcp,
        }
    }

    #[test]
    fn ports_are_stable_freed_when_unwanted_and_reused_last() {
        let mut pool = PortPool::new(20000..=20002);
        let (a, b, c, d) = (
            target("a", 80),
            target("b", 80),
            target("c", 80),
            target("d", 80),
        );
        assert_eq!(pool.allocate(&a), Ok(20000));
        assert_eq!(pool.allocate(&b), Ok(20001));
        assert_eq!(pool.allocate(&a), Ok(20000), "stable");
        let freed = pool.retain(&BTreeSet::from([b.clone()]));
        assert_eq!(freed, [(a.clone(), 20000)]);
        // 20002 is handed out before the freed 20000.
        assert_eq!(pool.allocate(&c), Ok(20002));
        assert_eq!(pool.allocate(&d), Ok(20000));
        let full = pool.allocate(&a);
        assert_eq!(
            full,
            Err(Exhausted {
                size: 3,
                first: 20000,
                last: 20002
            })
        );
        assert_eq!(
            full.expect_err("full").to_string(),
            "all 3 gateway ports (20000-20002) are taken"
        );
        assert_eq!(pool.allocated().count(), 3);
        // A port held elsewhere: its target gets another, it none again.
        pool.retain(&BTreeSet::new());
        assert_eq!(pool.allocate(&a), Ok(20001));
        pool.block(20001);
        assert_eq!(pool.get(&a), None);
        assert_eq!(pool.allocate(&a), Ok(20002));
        pool.retain(&BTreeSet::new());
        assert_eq!(pool.allocate(&b), Ok(20000));
        assert_eq!(pool.allocate(&c), Ok(20002));
        assert!(pool.allocate(&d).is_err(), "20001 stays blocked");
    }
}
