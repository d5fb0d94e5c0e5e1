//! The replicated state of a group: a small key-value store with revisions, leases
//! for mutual exclusion, and the seats of its strict pods (which copy of each may run).
//! Pure: the state machine applies committed commands here, in log order, so every
//! member computes the same answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most keys a group holds.
pub const MAX_KEYS: usize = 10_000;
/// Most bytes of keys and values a group holds: what a snapshot carries, and what each
/// member keeps in memory.
pub const MAX_STORE_BYTES: usize = 16 * 1024 * 1024;
/// Most locks a group holds at once.
pub const MAX_LOCKS: usize = 1_024;
/// Longest lease a lock is granted for.
pub const MAX_LEASE_MS: u64 = 5 * 60 * 1000;
/// Most seats a group holds (one per pod name; a copy gives its seat back when it is
/// removed, so only copies lost with their agents leave theirs behind).
pub const MAX_SEATS: usize = 1_024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("a key is 1 to {MAX_KEY_BYTES} bytes of printable ASCII without spaces")]
    BadKey,
    #[error("a value is at most {MAX_VALUE_BYTES} bytes")]
    ValueTooLarge,
    #[error("a lease is 1 to {MAX_LEASE_MS} ms")]
    BadLease,
    #[error("the state is over the group's limits")]
    OverLimits,
}

/// Checks a key or lock name: what the HTTP API and the state machine both accept.
pub fn check_key(key: &str) -> Result<(), KvError> {
    let printable = key.bytes().all(|b| b.is_ascii_graphic());
    if key.is_empty() || key.len() > MAX_KEY_BYTES || !printable {
        return Err(KvError::BadKey);
    }
    Ok(())
}

/// A change to the group's state, as proposed to its leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Command {
    /// Sets `key`; with `expect`, only if the key's revision is that (0: only if the key
    /// does not exist).
    Put {
        key: String,
        value: String,
        expect: Option<u64>,
    },
    /// Removes `key`; with `expect`, only if its revision is that.
    Delete { key: String, expect: Option<u64> },
    /// Takes lock `name` for `holder` for `lease_ms` from `now_ms` (the leader's clock
    /// when it proposed this), or renews it if `holder` has it.
    Lock {
        name: String,
        holder: String,
        lease_ms: u64,
        now_ms: u64,
    },
    /// Gives lock `name` back, if `holder` holds it with fencing token `token`.
    Unlock {
        name: String,
        holder: String,
        token: u64,
    },
    /// Gives pod `pod`'s seat to `holder` (a copy: `<agent>/<epoch>`) if the seat's
    /// revision is `expect` (0: only if nobody holds it). The holder renews by seating
    /// itself again at its revision; another copy takes over at the revision it saw
    /// unchanged for longer than a seat lease. Only agents propose these.
    Seat {
        pod: String,
        holder: String,
        expect: u64,
    },
    /// Gives pod `pod`'s seat back, if `holder` has it.
    Unseat { pod: String, holder: String },
}

/// The seat holder that names copy `epoch` of a pod on `agent`.
pub fn seat_holder(agent: impl std::fmt::Display, epoch: impl std::fmt::Display) -> String {
    format!("{agent}/{epoch}")
}

/// Whether seat holder `holder` names a copy on `agent`.
pub fn is_copy_on(holder: &str, agent: impl std::fmt::Display) -> bool {
    holder
        .strip_prefix(&agent.to_string())
        .is_some_and(|epoch| epoch.starts_with('/'))
}

impl Command {
    /// Checks sizes and names before the command is proposed.
    pub fn check(&self) -> Result<(), KvError> {
        match self {
            Command::Put { key, value, .. } => {
                check_key(key)?;
                if value.len() > MAX_VALUE_BYTES {
                    return Err(KvError::ValueTooLarge);
                }
                Ok(())
            }
            Command::Delete { key, .. } | Command::Unlock { name: key, .. } => check_key(key),
            Command::Seat { pod, holder, .. } | Command::Unseat { pod, holder } => {
                check_key(pod)?;
                check_key(holder)
            }
            Command::Lock { name, lease_ms, .. } => {
                check_key(name)?;
                if *lease_ms == 0 || *lease_ms > MAX_LEASE_MS {
                    return Err(KvError::BadLease);
                }
                Ok(())
            }
        }
    }
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "result",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Outcome {
    /// The key now has this revision.
    Stored { revision: u64 },
    /// The key is gone (it had this revision, or did not exist).
    Deleted { previous: Option<u64> },
    /// `expect` did not hold: the key's revision is `current` (none: it does not exist).
    Conflict { current: Option<u64> },
    /// The lock is the caller's until `expires_at_ms`; `token` (the log index at which
    /// it was taken) grows with every new holder, so writes elsewhere can be fenced.
    Locked { token: u64, expires_at_ms: u64 },
    /// Someone else holds the lock until `expires_at_ms`.
    Held { holder: String, expires_at_ms: u64 },
    /// The lock was given back.
    Unlocked,
    /// The seat is the caller's at this revision.
    Seated { revision: u64 },
    /// `expect` did not hold: `holder` has the seat at `revision`.
    SeatTaken { holder: String, revision: u64 },
    /// The seat was given back (or nobody had it).
    Unseated,
    /// The command was not applied (the store is full, the caller does not hold the
    /// lock, a malformed command).
    Refused { reason: String },
    /// A leader's blank entry or a membership change: no client asked for it.
    Internal,
}

/// A key's value and revision: the log index of the command that last set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub value: String,
    pub revision: u64,
}

/// A held lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: String,
    pub token: u64,
    pub expires_at_ms: u64,
}

/// Which copy of a pod may run: the holder, and the log index of the command that
/// last seated it (a renewal moves it on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seat {
    pub holder: String,
    pub revision: u64,
}

/// The group's replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kv {
    items: BTreeMap<String, Item>,
    locks: BTreeMap<String, Lease>,
    #[serde(default)]
    seats: BTreeMap<String, Seat>,
    /// Bytes of keys and values held.
    bytes: usize,
}

impl Kv {
    /// Applies the command committed at log `index`.
    pub fn apply(&mut self, index: u64, command: &Command) -> Outcome {
        if let Err(e) = command.check() {
            return Outcome::Refused {
                reason: e.to_string(),
            };
        }
        match command {
            Command::Put { key, value, expect } => self.put(index, key, value, *expect),
            Command::Delete { key, expect } => self.delete(key, *expect),
            Command::Lock {
                name,
                holder,
                lease_ms,
                now_ms,
            } => self.lock(index, name, holder, *lease_ms, *now_ms),
            Command::Unlock {
                name,
                holder,
                token,
            } => match self.locks.get(name) {
                Some(lease) if lease.holder == *holder && lease.token == *token => {
                    self.locks.remove(name);
                    Outcome::Unlocked
                }
                _ => Outcome::Refused {
                    reason: format!("{holder} does not hold lock {name} with token {token}"),
                },
            },
            Command::Seat {
                pod,
                holder,
                expect,
            } => self.seat(index, pod, holder, *expect),
            Command::Unseat { pod, holder } => {
                if self.seats.get(pod).is_some_and(|s| s.holder == *holder) {
                    self.seats.remove(pod);
                }
                Outcome::Unseated
            }
        }
    }

    fn seat(&mut self, index: u64, pod: &str, holder: &str, expect: u64) -> Outcome {
        match self.seats.get(pod) {
            Some(seat) if seat.revision != expect => {
                return Outcome::SeatTaken {
                    holder: seat.holder.clone(),
                    revision: seat.revision,
                }
            }
            Some(_) => {}
            None if expect != 0 => {
                return Outcome::SeatTaken {
                    holder: String::new(),
                    revision: 0,
                }
            }
            None if self.seats.len() >= MAX_SEATS => {
                return Outcome::Refused {
                    reason: format!("the group holds {MAX_SEATS} seats, its most"),
                }
            }
            None => {}
        }
        let seat = Seat {
            holder: holder.to_owned(),
            revision: index,
        };
        self.seats.insert(pod.to_owned(), seat);
        Outcome::Seated { revision: index }
    }

    fn put(&mut self, index: u64, key: &str, value: &str, expect: Option<u64>) -> Outcome {
        let current = self.items.get(key).map(|item| item.revision);
        if let Some(expected) = expect {
            if current.unwrap_or(0) != expected {
                return Outcome::Conflict { current };
            }
        }
        let old = self
            .items
            .get(key)
            .map_or(0, |item| key.len() + item.value.len());
        let bytes = self.bytes - old + key.len() + value.len();
        if current.is_none() && self.items.len() >= MAX_KEYS {
            return Outcome::Refused {
                reason: format!("the group holds {MAX_KEYS} keys, its most"),
            };
        }
        if bytes > MAX_STORE_BYTES {
            return Outcome::Refused {
                reason: format!("the group would hold over {MAX_STORE_BYTES} bytes"),
            };
        }
        self.bytes = bytes;
        let item = Item {
            value: value.to_owned(),
            revision: index,
        };
        self.items.insert(key.to_owned(), item);
        Outcome::Stored { revision: index }
    }

    fn delete(&mut self, key: &str, expect: Option<u64>) -> Outcome {
        let current = self.items.get(key).map(|item| item.revision);
        if let Some(expected) = expect {
            if current.unwrap_or(0) != expected {
                return Outcome::Conflict { current };
            }
        }
        if let Some(item) = self.items.remove(key) {
            self.bytes -= key.len() + item.value.len();
        }
        Outcome::Deleted { previous: current }
    }

    fn lock(
        &mut self,
        index: u64,
        name: &str,
        holder: &str,
        lease_ms: u64,
        now_ms: u64,
    ) -> Outcome {
        let expires_at_ms = now_ms.saturating_add(lease_ms);
        let token = match self.locks.get(name) {
            Some(lease) if lease.expires_at_ms > now_ms && lease.holder != holder => {
                return Outcome::Held {
                    holder: lease.holder.clone(),
                    expires_at_ms: lease.expires_at_ms,
                }
            }
            // A renewal keeps its token: the holder's writes stay fenced the same way.
            Some(lease) if lease.expires_at_ms > now_ms => lease.token,
            _ => index,
        };
        if !self.locks.contains_key(name) && self.locks.len() >= MAX_LOCKS {
            return Outcome::Refused {
                reason: format!("the group holds {MAX_LOCKS} locks, its most"),
            };
        }
        let lease = Lease {
            holder: holder.to_owned(),
            token,
            expires_at_ms,
        };
        self.locks.insert(name.to_owned(), lease);
        Outcome::Locked {
            token,
            expires_at_ms,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Item> {
        self.items.get(key)
    }

    /// The keys that start with `prefix`, in order.
    pub fn with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Item)> {
        self.items
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(key, _)| key.starts_with(prefix))
    }

    pub fn lease(&self, name: &str) -> Option<&Lease> {
        self.locks.get(name)
    }

    pub fn seat_of(&self, pod: &str) -> Option<&Seat> {
        self.seats.get(pod)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Checks a decoded snapshot (from a peer, or this agent's disk) before it replaces
    /// the state: every key and value within the limits, the byte count recomputed.
    pub fn checked(mut self) -> Result<Kv, KvError> {
        if self.items.len() > MAX_KEYS
            || self.locks.len() > MAX_LOCKS
            || self.seats.len() > MAX_SEATS
        {
            return Err(KvError::OverLimits);
        }
        let mut bytes = 0;
        for (key, item) in &self.items {
            check_key(key)?;
            if item.value.len() > MAX_VALUE_BYTES {
                return Err(KvError::ValueTooLarge);
            }
            bytes += key.len() + item.value.len();
        }
        if bytes > MAX_STORE_BYTES {
            return Err(KvError::OverLimits);
        }
        for name in self.locks.keys() {
            check_key(name)?;
        }
        for (pod, seat) in &self.seats {
            check_key(pod)?;
            check_key(&seat.holder)?;
        }
        self.bytes = bytes;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, expect: Option<u64>) -> Command {
        Command::Put {
            key: key.into(),
            value: value.into(),
            expect,
        }
    }

    #[test]
    fn revisions_are_the_log_index_and_compare_and_swap_holds_them() {
        let mut kv = Kv::default();
        assert_eq!(
            kv.apply(3, &put("a", "1", None)),
            Outcome::Stored { revision: 3 }
        );
        assert_eq!(
            kv.apply(4, &put("a", "2", Some(2))),
            Outcome::Conflict { current: Some(3) }
        );
        assert_eq!(
            kv.apply(5, &put("a", "2", Some(3))),
            Outcome::Stored { revision: 5 }
        );
        assert_eq!(kv.get("a").map(|i| i.value.as_str()), Some("2"));
        // 0: only if absent.
        assert_eq!(
            kv.apply(6, &put("a", "3", Some(0))),
            Outcome::Conflict { current: Some(5) }
        );
        assert_eq!(
            kv.apply(7, &put("b", "x", Some(0))),
            Outcome::Stored { revision: 7 }
        );
        let delete = |expect| Command::Delete {
            key: "a".into(),
            expect,
        };
        assert_eq!(
            kv.apply(8, &delete(Some(4))),
            Outcome::Conflict { current: Some(5) }
        );
        assert_eq!(
            kv.apply(9, &delete(Some(5))),
            Outcome::Deleted { previous: Some(5) }
        );
        assert_eq!(
            kv.apply(10, &delete(None)),
            Outcome::Deleted { previous: None }
        );
        assert_eq!(kv.len(), 1);
    }

    #[test]
    fn prefixes_list_in_order_and_stop_at_the_first_other_key() {
        let mut kv = Kv::default();
        for (i, key) in ["app/b", "app/a", "apps", "b", "app"].iter().enumerate() {
            kv.apply(i as u64 + 1, &put(key, "v", None));
        }
        let keys: Vec<_> = kv.with_prefix("app/").map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["app/a", "app/b"]);
        assert_eq!(kv.with_prefix("").count(), 5);
    }

    #[test]
    fn limits_refuse_without_changing_the_state() {
        let mut kv = Kv::default();
        assert!(matches!(
            kv.apply(1, &put("", "v", None)),
            Outcome::Refused { .. }
        ));
        assert!(matches!(
            kv.apply(1, &put("a b", "v", None)),
            Outcome::Refused { .. }
        ));
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        assert!(matches!(
            kv.apply(1, &put("k", &big, None)),
            Outcome::Refused { .. }
        ));
        let most = "x".repeat(MAX_VALUE_BYTES);
        let mut index = 1;
        while kv.bytes + MAX_VALUE_BYTES + 8 <= MAX_STORE_BYTES {
            assert!(matches!(
                kv.apply(index, &put(&format!("k{index}"), &most, None)),
                Outcome::Stored { .. }
            ));
            index += 1;
        }
        let before = kv.clone();
        assert!(matches!(
            kv.apply(index, &put("overflow", &most, None)),
            Outcome::Refused { .. }
        ));
        assert_eq!(kv, before);
        // Replacing a value with one of the same size still fits.
        assert!(matches!(
            kv.apply(index, &put("k1", &most, None)),
            Outcome::Stored { .. }
        ));
    }

    #[test]
    fn a_seat_is_taken_renewed_and_taken_over_only_at_the_revision_seen() {
        let mut kv = Kv::default();
        let seat = |holder: &str, expect| Command::Seat {
            pod: "web-0".into(),
            holder: holder.into(),
            expect,
        };
        let taken = |holder: &str, revision| Outcome::SeatTaken {
            holder: holder.into(),
            revision,
        };
        let seated = |revision| Outcome::Seated { revision };
        // Nobody holds it: taken at revision 0 only.
        assert_eq!(kv.apply(5, &seat("a/1", 3)), taken("", 0));
        assert_eq!(kv.apply(6, &seat("a/1", 0)), seated(6));
        // Another copy asking at 0 learns who holds it, and changes nothing.
        assert_eq!(kv.apply(7, &seat("b/2", 0)), taken("a/1", 6));
        // The holder renews at its revision, which moves on.
        assert_eq!(kv.apply(8, &seat("a/1", 6)), seated(8));
        // A takeover at a revision the holder has since renewed past fails...
        assert_eq!(kv.apply(9, &seat("b/2", 6)), taken("a/1", 8));
        // ...and at the current one succeeds; the old holder's renewal then fails.
        assert_eq!(kv.apply(10, &seat("b/2", 8)), seated(10));
        assert_eq!(kv.apply(11, &seat("a/1", 8)), taken("b/2", 10));
        // Only the holder gives it back.
        let unseat = |holder: &str| Command::Unseat {
            pod: "web-0".into(),
            holder: holder.into(),
        };
        assert_eq!(kv.apply(12, &unseat("a/1")), Outcome::Unseated);
        assert_eq!(kv.seat_of("web-0").map(|s| s.revision), Some(10));
        assert_eq!(kv.apply(13, &unseat("b/2")), Outcome::Unseated);
        assert_eq!(kv.seat_of("web-0"), None);
        assert_eq!(kv.apply(14, &seat("c/3", 0)), seated(14));
        // Bad names are refused; seats are bounded and survive a snapshot's check.
        assert!(matches!(
            kv.apply(15, &seat("", 0)),
            Outcome::Refused { .. }
        ));
        for i in 1..MAX_SEATS {
            let command = Command::Seat {
                pod: format!("p-{i}"),
                holder: "c/3".into(),
                expect: 0,
            };
            assert!(matches!(
                kv.apply(100 + i as u64, &command),
                Outcome::Seated { .. }
            ));
        }
        let full = Command::Seat {
            pod: "one-more".into(),
            holder: "c/3".into(),
            expect: 0,
        };
        assert!(matches!(kv.apply(5_000, &full), Outcome::Refused { .. }));
        assert_eq!(kv.clone().checked(), Ok(kv));
    }

    #[test]
    fn a_lock_is_exclusive_until_it_expires_and_each_new_holder_gets_a_larger_token() {
        let mut kv = Kv::default();
        let lock = |holder: &str, now_ms| Command::Lock {
            name: "leader".into(),
            holder: holder.into(),
            lease_ms: 1000,
            now_ms,
        };
        assert_eq!(
            kv.apply(10, &lock("web-0", 0)),
            Outcome::Locked {
                token: 10,
                expires_at_ms: 1000
            }
        );
        assert_eq!(
            kv.apply(11, &lock("web-1", 500)),
            Outcome::Held {
                holder: "web-0".into(),
                expires_at_ms: 1000
            }
        );
        // Renewed: same token, later expiry.
        assert_eq!(
            kv.apply(12, &lock("web-0", 900)),
            Outcome::Locked {
                token: 10,
                expires_at_ms: 1900
            }
        );
        assert_eq!(
            kv.apply(13, &lock("web-1", 1900)),
            Outcome::Locked {
                token: 13,
                expires_at_ms: 2900
            }
        );
        let unlock = |holder: &str, token| Command::Unlock {
            name: "leader".into(),
            holder: holder.into(),
            token,
        };
        assert!(matches!(
            kv.apply(14, &unlock("web-0", 10)),
            Outcome::Refused { .. }
        ));
        assert_eq!(kv.apply(15, &unlock("web-1", 13)), Outcome::Unlocked);
        assert_eq!(kv.lease("leader"), None);
        let bad = Command::Lock {
            name: "l".into(),
            holder: "h".into(),
            lease_ms: 0,
            now_ms: 0,
        };
        assert!(matches!(kv.apply(16, &bad), Outcome::Refused { .. }));
    }

    #[test]
    fn a_snapshot_is_checked_and_its_byte_count_recomputed() {
        let mut kv = Kv::default();
        kv.apply(1, &put("a", "12345", None));
        let decoded: Kv = serde_json::from_value(serde_json::json!({
            "items": {"a": {"value": "12345", "revision": 1}},
            "locks": {},
            "bytes": 0
        }))
        .unwrap();
        assert_eq!(decoded.checked(), Ok(kv));
        let bad: Kv = serde_json::from_value(serde_json::json!({
            "items": {"a b": {"value": "", "revision": 1}},
            "locks": {},
            "bytes": 0
        }))
        .unwrap();
        assert_eq!(bad.checked(), Err(KvError::BadKey));
    }
}
