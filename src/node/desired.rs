//! The API's pods, handed from the pod source to the node loop by key: the source
//! replaces a pod's entry and marks it changed; the node takes the changed keys with
//! their current entries, as a kube-runtime controller reads a reflector's store for the
//! keys its queue gives. Changes to one pod before the node looks are one change, and
//! the node's work follows the pods that changed, not all the pods there are.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::owner::{DesiredPod, DesiredPods};

#[derive(Default)]
pub struct DesiredStore {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Default)]
struct State {
    pods: DesiredPods,
    changed: BTreeSet<String>,
    /// The source has listed every pod once: until then the node knows not which pods
    /// the API wants, and takes nothing.
    listed: bool,
    /// Set with `listed`, cleared by the first take: the node learns that its view is
    /// now complete.
    newly_listed: bool,
}

/// What changed since the node last took.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// True on the first take after the source's first full listing.
    pub listed: bool,
    /// Each changed pod's UID with what the API now wants (None: the pod is gone).
    pub pods: Vec<(String, Option<Arc<DesiredPod>>)>,
}

impl DesiredStore {
    /// Sets what the API wants of one pod (None: nothing any more).
    pub fn set(&self, uid: String, pod: Option<Arc<DesiredPod>>) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let same = match (state.pods.get(&uid), &pod) {
            (Some(old), Some(new)) => Arc::ptr_eq(old, new),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        match pod {
            Some(pod) => state.pods.insert(uid.clone(), pod),
            None => state.pods.remove(&uid),
        };
        state.changed.insert(uid);
        if state.listed {
            self.notify.notify_one();
        }
    }

    /// The source has listed every pod (and set them): the node may take them now.
    pub fn set_listed(&self) {
        if let Ok(mut state) = self.state.lock() {
            if !state.listed {
                state.listed = true;
                state.newly_listed = true;
            }
        }
        self.notify.notify_one();
    }

    /// Waits until there may be changes to take.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// The changes since the last take; none before the first full listing.
    pub fn take(&self) -> Changes {
        let Ok(mut state) = self.state.lock() else {
            return Changes::default();
        };
        if !state.listed {
            return Changes::default();
        }
        let changed = std::mem::take(&mut state.changed);
        let pods = changed
            .into_iter()
            .map(|uid| {
                let pod = state.pods.get(&uid).cloned();
                (uid, pod)
            })
            .collect();
        Changes {
            listed: std::mem::take(&mut state.newly_listed),
            pods,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::standalone_pod;
    use k8s_openapi::api::core::v1::Pod;

    fn desired(name: &str) -> Arc<DesiredPod> {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        standalone_pod(pod)
    }

    #[test]
    fn nothing_is_taken_before_the_listing_and_then_only_what_changed() {
        let store = DesiredStore::default();
        let a = desired("a");
        store.set("a".into(), Some(a.clone()));
        store.set("b".into(), Some(desired("b")));
        assert_eq!(store.take(), Changes::default());
        store.set_listed();
        let first = store.take();
        assert!(first.listed);
        assert_eq!(
            first
                .pods
                .iter()
                .map(|(uid, _)| uid.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        // The same allocation again is no change; a removal and a new entry are.
        store.set("a".into(), Some(a));
        store.set("b".into(), None);
        let b2 = desired("b2");
        store.set("c".into(), Some(b2.clone()));
        store.set("c".into(), Some(b2));
        let next = store.take();
        assert!(!next.listed);
        assert_eq!(next.pods.len(), 2);
        assert_eq!(next.pods[0].0, "b");
        assert!(next.pods[0].1.is_none());
        assert_eq!(next.pods[1].0, "c");
        assert_eq!(store.take(), Changes::default());
    }
}
