//! Per-key retry back-off for what is sent again until it takes effect (a Release
//! until the agent stops listing the pod, a pod's status until the API takes it): the
//! first try goes at once, the next after `initial`, each later one after twice the
//! last wait, up to `max`.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Backoff<K> {
    initial: Duration,
    max: Duration,
    /// When the key may be tried next, and the wait after that.
    due: HashMap<K, (Instant, Duration)>,
}

impl<K: Hash + Eq> Backoff<K> {
    pub fn new(initial: Duration, max: Duration) -> Backoff<K> {
        Backoff {
            initial,
            max,
            due: HashMap::new(),
        }
    }

    /// Whether `key` may be tried at `now`; if so, the try is counted.
    pub fn try_now(&mut self, key: K, now: Instant) -> bool {
        match self.due.get_mut(&key) {
            Some((at, _)) if *at > now => false,
            Some((at, wait)) => {
                *at = now + *wait;
                *wait = (*wait * 2).min(self.max);
                true
            }
            None => {
                self.due
                    .insert(key, (now + self.initial, (self.initial * 2).min(self.max)));
                true
            }
        }
    }

    /// Forgets the keys `keep` says no: their effect showed, or they no longer matter.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.due.retain(|key, _| keep(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_at_once_then_after_doubling_waits_up_to_the_maximum() {
        let mut backoff = Backoff::new(Duration::from_secs(3), Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert!(backoff.try_now("a", at(0)));
        assert!(!backoff.try_now("a", at(2)));
        assert!(backoff.try_now("a", at(3)));
        assert!(!backoff.try_now("a", at(8)));
        assert!(backoff.try_now("a", at(9)));
        // 6 s later would be 12: capped at 10.
        assert!(!backoff.try_now("a", at(18)));
        assert!(backoff.try_now("a", at(19)));
        assert!(backoff.try_now("b", at(19)), "keys are independent");
        backoff.retain(|k| *k != "a");
        assert!(backoff.try_now("a", at(19)), "forgotten: at once again");
        assert_eq!(backoff.due.len(), 2);
    }
}
