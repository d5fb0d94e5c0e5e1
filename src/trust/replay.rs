//! Replay protection for what agents report: each heartbeat and status report carries
//! the agent's sequence number and clock. The receiver drops what is not newer than
//! what it already has, and what was sent too far from its own clock (a message
//! recorded long ago and played again after the receiver forgot its sequence).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};

use super::join::MAX_CLOCK_SKEW_MS;

/// The current Unix time in milliseconds (0 before 1970).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Stamps an agent's messages. Numbers start at the wall clock's microseconds, so that
/// they keep growing across restarts (an agent sends far fewer than a million a second).
#[derive(Debug)]
pub struct Sequencer(AtomicU64);

impl Default for Sequencer {
    fn default() -> Self {
        Sequencer(AtomicU64::new(unix_millis().saturating_mul(1000)))
    }
}

impl Sequencer {
    /// The next sequence number and the time, in Unix milliseconds.
    pub fn next(&self) -> (u64, u64) {
        (self.0.fetch_add(1, Ordering::Relaxed) + 1, unix_millis())
    }
}

/// Why a message was refused as a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Replay {
    #[error("sequence number not newer than the last one accepted")]
    Old,
    #[error("sent more than 5 minutes from this peer's clock")]
    Stale,
}

impl Replay {
    /// A short, fixed label for metrics.
    pub fn kind(self) -> &'static str {
        match self {
            Replay::Old => "replayed",
            Replay::Stale => "stale",
        }
    }
}

/// The last sequence number accepted per key (an agent, or an agent's pod). Keys come
/// only from messages already authenticated and checked against what the receiver
/// knows, and are forgotten with what they belong to, which bounds the map.
#[derive(Debug)]
pub struct ReplayGuard<K> {
    last: HashMap<K, u64>,
}

impl<K> Default for ReplayGuard<K> {
    fn default() -> Self {
        ReplayGuard {
            last: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq> ReplayGuard<K> {
    /// Accepts `seq` for `key` if it is newer than the last one and was sent near
    /// `now_ms`; remembers it then.
    pub fn check(&mut self, key: K, seq: u64, sent_at_ms: u64, now_ms: u64) -> Result<(), Replay> {
        // One hash of the key: this runs for every heartbeat.
        match self.last.entry(key) {
            Entry::Occupied(mut last) => {
                judge(Some(*last.get()), seq, sent_at_ms, now_ms)?;
                last.insert(seq);
            }
            Entry::Vacant(slot) => {
                judge(None, seq, sent_at_ms, now_ms)?;
                slot.insert(seq);
            }
        }
        Ok(())
    }

    /// Forgets every key `keep` refuses.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.last.retain(|k, _| keep(k));
    }
}

/// A [`ReplayGuard`] for a handful of keys (the agents that ran one pod), as a list:
/// kept with what it guards, it goes with it, and a list of one costs less than a map.
#[derive(Debug)]
pub struct ReplayList<K> {
    last: Vec<(K, u64)>,
}

impl<K> Default for ReplayList<K> {
    fn default() -> Self {
        ReplayList { last: Vec::new() }
    }
}

impl<K: Eq> ReplayList<K> {
    /// As [`ReplayGuard::check`].
    pub fn check(&mut self, key: K, seq: u64, sent_at_ms: u64, now_ms: u64) -> Result<(), Replay> {
        let last = self.last.iter_mut().find(|(k, _)| *k == key);
        judge(
            last.as_ref().map(|(_, last)| *last),
            seq,
            sent_at_ms,
            now_ms,
        )?;
        match last {
            Some((_, last)) => *last = seq,
            None => {
                // Most pods are only ever reported by one agent.
                self.last.reserve_exact(1);
                self.last.push((key, seq));
            }
        }
        Ok(())
    }
}

/// Whether `seq`, sent at `sent_at_ms`, may follow `last` (`None`: nothing accepted yet).
fn judge(last: Option<u64>, seq: u64, sent_at_ms: u64, now_ms: u64) -> Result<(), Replay> {
    if sent_at_ms.abs_diff(now_ms) > MAX_CLOCK_SKEW_MS {
        return Err(Replay::Stale);
    }
    if last.is_some_and(|last| seq <= last) {
        return Err(Replay::Old);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_grow_across_restarts() {
        let first = Sequencer::default();
        let (a, _) = first.next();
        let (b, now) = first.next();
        assert!(b > a);
        assert!(now.abs_diff(unix_millis()) < 1000);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let restarted = Sequencer::default();
        assert!(restarted.next().0 > b);
    }

    #[test]
    fn old_repeated_and_stale_messages_are_replays() {
        let mut guard = ReplayGuard::default();
        let now = 10_000_000;
        assert_eq!(guard.check("a", 5, now, now), Ok(()));
        assert_eq!(guard.check("a", 5, now, now), Err(Replay::Old));
        assert_eq!(guard.check("a", 4, now, now), Err(Replay::Old));
        assert_eq!(guard.check("a", 6, now, now), Ok(()));
        // Each key has its own sequence.
        assert_eq!(guard.check("b", 1, now, now), Ok(()));
        // A message from long ago, presented to a receiver that forgot the key.
        guard.retain(|k| *k != "a");
        assert_eq!(
            guard.check("a", 5, now - MAX_CLOCK_SKEW_MS - 1, now),
            Err(Replay::Stale)
        );
        assert_eq!(
            guard.check("a", 7, now + MAX_CLOCK_SKEW_MS + 1, now),
            Err(Replay::Stale)
        );
        assert_eq!(guard.last.len(), 1);
    }

    #[test]
    fn a_replay_list_judges_as_the_guard_does() {
        let mut list = ReplayList::default();
        let now = 10_000_000;
        assert_eq!(list.check("a", 5, now, now), Ok(()));
        assert_eq!(list.check("a", 5, now, now), Err(Replay::Old));
        assert_eq!(list.check("b", 1, now, now), Ok(()));
        assert_eq!(list.check("a", 6, now, now), Ok(()));
        assert_eq!(
            list.check("c", 1, now + MAX_CLOCK_SKEW_MS + 1, now),
            Err(Replay::Stale)
        );
        assert_eq!(list.last, [("a", 6), ("b", 1)]);
    }
}
