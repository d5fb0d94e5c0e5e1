//! The owner's word on its stateful workloads' groups: which agents run each group's
//! pods (and so are its Raft members), told to those agents when it changes and again
//! now and then, so that a lost word or a restarted agent catches up. Pure: the owner
//! signs and sends what [`GroupBook::words`] returns.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use libp2p::PeerId;

use crate::trust::group::Group;
use crate::wire::{GroupMember, PeerRef, PodRef, MAX_GROUP_MEMBERS};

/// An unchanged group's word is said again this often.
pub const RESEND: Duration = Duration::from_secs(10);

/// One placed pod of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupedPod {
    /// The group's name (see `raft::group_of`).
    pub group: String,
    pub pod: PodRef,
    pub agent: PeerId,
    /// Orders the pods by age: the oldest pod's agent founds the group. The creation
    /// time in Unix seconds if known, then the name.
    pub age: (i64, String),
}

/// A word to sign and send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    pub group: Group,
    pub to: Vec<PeerId>,
}

struct Said {
    founder: Option<PeerId>,
    members: Vec<GroupMember>,
    version: u64,
    at: Instant,
}

/// What the owner last said of each group.
#[derive(Default)]
pub struct GroupBook {
    said: HashMap<(String, String), Said>,
    version: u64,
}

impl GroupBook {
    /// The words to send, given every placed pod of every group: a group whose members
    /// changed is told to its members old and new (so that those left out leave), an
    /// unchanged one to its members every [`RESEND`], and a group with no pod left, once,
    /// with no member.
    pub fn words(
        &mut self,
        placed: impl IntoIterator<Item = GroupedPod>,
        now: Instant,
        now_ms: u64,
    ) -> Vec<Word> {
        let mut wanted: BTreeMap<(String, String), Vec<GroupedPod>> = BTreeMap::new();
        for pod in placed {
            let key = (pod.pod.namespace.clone(), pod.group.clone());
            wanted.entry(key).or_default().push(pod);
        }
        let wanted_keys: BTreeSet<(String, String)> = wanted.keys().cloned().collect();
        let mut words = Vec::new();
        for ((namespace, name), mut pods) in wanted {
            pods.sort_by(|a, b| a.age.cmp(&b.age));
            // The oldest pods make the group when there are more than it takes.
            pods.truncate(MAX_GROUP_MEMBERS);
            let agents: BTreeSet<PeerId> = pods.iter().map(|p| p.agent).collect();
            let mut members: Vec<GroupMember> = pods
                .iter()
                .map(|p| GroupMember {
                    agent: PeerRef(p.agent),
                    pod: p.pod.clone(),
                })
                .collect();
            members.sort_by(|a, b| (&a.pod.name, &a.pod.uid).cmp(&(&b.pod.name, &b.pod.uid)));
            let key = (namespace.clone(), name.clone());
            let said = self.said.get(&key);
            // The founder stays while it is a member: only an agent whose group may have
            // no log yet starts one.
            let founder = said
                .and_then(|s| s.founder)
                .filter(|f| agents.contains(f))
                .or_else(|| pods.first().map(|p| p.agent));
            let changed = said.is_none_or(|s| s.members != members || s.founder != founder);
            let due = said.is_none_or(|s| now.duration_since(s.at) >= RESEND);
            if !changed && !due {
                continue;
            }
            let mut to = agents.clone();
            if changed {
                to.extend(
                    said.iter()
                        .flat_map(|s| s.members.iter().map(|m| m.agent.0)),
                );
            }
            let kept_version = said.filter(|_| !changed).map(|s| s.version);
            let version = match kept_version {
                Some(version) => version,
                None => self.next_version(now_ms),
            };
            words.push(Word {
                group: Group {
                    namespace,
                    name,
                    version,
                    founder,
                    members: members.clone(),
                },
                to: to.into_iter().collect(),
            });
            self.said.insert(
                key,
                Said {
                    founder,
                    members,
                    version,
                    at: now,
                },
            );
        }
        let gone: Vec<(String, String)> = self
            .said
            .keys()
            .filter(|key| !wanted_keys.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            let Some(said) = self.said.remove(&key) else {
                continue;
            };
            let to: BTreeSet<PeerId> = said.members.iter().map(|m| m.agent.0).collect();
            words.push(Word {
                group: Group {
                    namespace: key.0,
                    name: key.1,
                    version: self.next_version(now_ms),
                    founder: None,
                    members: Vec::new(),
                },
                to: to.into_iter().collect(),
            });
        }
        words
    }

    fn next_version(&mut self, now_ms: u64) -> u64 {
        self.version = (self.version + 1).max(now_ms);
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PodUid;

    fn pod(name: &str, agent: PeerId, created: i64) -> GroupedPod {
        GroupedPod {
            group: "web".into(),
            pod: PodRef {
                uid: PodUid(format!("uid-{name}")),
                namespace: "default".into(),
                name: name.into(),
            },
            agent,
            age: (created, name.into()),
        }
    }

    #[test]
    fn a_group_is_told_when_it_changes_to_old_and_new_members_and_again_later() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut book = GroupBook::default();
        let t0 = Instant::now();
        let words = book.words([pod("web-1", b, 20), pod("web-0", a, 10)], t0, 1000);
        assert_eq!(words.len(), 1);
        let first = &words[0];
        // The oldest pod's agent founds it; members sorted.
        assert_eq!(first.group.founder, Some(a));
        assert_eq!(first.group.version, 1000);
        assert_eq!(first.group.members[0].pod.name, "web-0");
        assert_eq!(first.to.len(), 2);
        // Unchanged: nothing until RESEND, then the same version to the members.
        assert!(book
            .words([pod("web-0", a, 10), pod("web-1", b, 20)], t0, 1001)
            .is_empty());
        let again = book.words(
            [pod("web-0", a, 10), pod("web-1", b, 20)],
            t0 + RESEND,
            1002,
        );
        assert_eq!(again[0].group.version, 1000);
        // web-1 moves from b to c: a new version, told to a, b and c.
        let moved = book.words(
            [pod("web-0", a, 10), pod("web-1", c, 20)],
            t0 + RESEND,
            1003,
        );
        assert_eq!(moved[0].group.version, 1003);
        let to: BTreeSet<PeerId> = moved[0].to.iter().copied().collect();
        assert_eq!(to, [a, b, c].into());
        // The founder stays while a member, even if an older pod shows up elsewhere.
        let older = book.words(
            [
                pod("web-0", a, 10),
                pod("web-1", c, 20),
                pod("web-00", b, 1),
            ],
            t0 + RESEND,
            1004,
        );
        assert_eq!(older[0].group.founder, Some(a));
        // a leaves: the oldest pod's agent founds (if no member has a log yet).
        let without_a = book.words(
            [pod("web-1", c, 20), pod("web-00", b, 1)],
            t0 + RESEND,
            1005,
        );
        assert_eq!(without_a[0].group.founder, Some(b));
    }

    #[test]
    fn a_group_with_no_pod_left_is_told_once_with_no_member() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut book = GroupBook::default();
        let t0 = Instant::now();
        book.words([pod("web-0", a, 10), pod("web-1", b, 20)], t0, 5);
        let gone = book.words([], t0, 6);
        assert_eq!(gone.len(), 1);
        assert!(gone[0].group.members.is_empty());
        assert_eq!(gone[0].group.founder, None);
        // Versions only grow, whatever the clock says.
        assert_eq!(gone[0].group.version, 6);
        assert_eq!(gone[0].to.len(), 2);
        assert!(book.words([], t0 + RESEND, 7).is_empty());
        let back = book.words([pod("web-0", a, 10)], t0 + RESEND, 1);
        assert_eq!(back[0].group.version, 7);
    }

    #[test]
    fn a_group_takes_its_oldest_pods_up_to_the_limit() {
        let agent = PeerId::random();
        let mut book = GroupBook::default();
        let pods = (0..MAX_GROUP_MEMBERS as i64 + 5).map(|i| pod(&format!("p-{i}"), agent, i));
        let words = book.words(pods, Instant::now(), 1);
        assert_eq!(words[0].group.members.len(), MAX_GROUP_MEMBERS);
        assert!(!words[0].group.members.iter().any(|m| m.pod.name == "p-68"));
    }
}
