//! Watched caches of the configMaps and secrets that the pods bound to this node refer
//! to, kept as the kubelet's watch-based managers keep theirs
//! (pkg/kubelet/util/manager/watch_based_manager.go):
//!
//! - each referenced object, by namespace, kind and name, has its own kube-runtime
//!   watcher and reflector store, listing and watching with
//!   `fieldSelector=metadata.name=<name>` in its namespace; so the node needs `list` and
//!   `watch` only where it serves pods, and RBAC `resourceNames` can still name the
//!   objects (the API server authorizes such a list or watch as one of that name);
//! - each is counted by the pods that refer to it, started by the first and stopped
//!   (its watch connection closed, its store dropped) when the last of them goes;
//! - an object marked `immutable` stops being watched once seen: it cannot change, and
//!   the value seen stays cached while pods refer to it (deleted or not, as with the
//!   kubelet);
//! - a missing object is watched all the same, so the pods waiting for it are resolved
//!   again the moment it is created;
//! - every change (an event, or a list after the watch had to start over) is reported
//!   by key through [`Changes`], so that exactly the pods that refer to it are resolved
//!   again. Nothing is polled.
//!
//! Bound: the cache holds at most one watch and one object per distinct (namespace,
//! kind, name) referenced by the pods bound to this node, and nothing else; pending
//! change notices are a set of those keys.
//!
//! The kubelet also stops the watch of an object no pod asked for in a while (an
//! env-only reference: env is read once, at container start) and starts it again on the
//! next read. Here the watch stays while a pod refers to it: a resolution happens only
//! when something changed, so there is no read to restart it on.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::NamespaceResourceScope;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::Client;
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;

use crate::node::resolve::ResolveError;

/// The first retry after a failed list or watch; doubled after each failure in a row.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between retries, also while the API server refuses (403): once the
/// node is granted the permission, the pods start within this.
const RETRY_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    ConfigMap,
    Secret,
}

impl ObjectKind {
    /// As the kubelet names it in messages.
    pub fn lowercase(self) -> &'static str {
        match self {
            ObjectKind::ConfigMap => "configmap",
            ObjectKind::Secret => "secret",
        }
    }
}

/// One referenced object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: ObjectKind, namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// What a watch knows of its object so far.
#[derive(Debug, Clone, PartialEq)]
enum WatchState {
    /// Not listed yet.
    Listing,
    /// Listed: the store has the object, or it does not exist.
    Listed,
    /// Every list so far failed (retried until one succeeds).
    Failed(ResolveError),
}

/// The keys whose objects changed since the owner last took them.
#[derive(Default)]
pub struct Changes {
    pending: Mutex<BTreeSet<ObjectKey>>,
    notify: Notify,
}

impl Changes {
    fn push(&self, key: &ObjectKey) {
        self.pending.lock().expect("changes").insert(key.clone());
        self.notify.notify_one();
    }

    /// Waits until a key is pending (at once if one is), and takes all that are.
    pub async fn next(&self) -> BTreeSet<ObjectKey> {
        loop {
            let taken = std::mem::take(&mut *self.pending.lock().expect("changes"));
            if !taken.is_empty() {
                return taken;
            }
            self.notify.notified().await;
        }
    }
}

/// The kinds the cache watches.
trait Watched:
    kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    fn immutable(&self) -> bool;
}

impl Watched for ConfigMap {
    fn immutable(&self) -> bool {
        self.immutable == Some(true)
    }
}

impl Watched for Secret {
    fn immutable(&self) -> bool {
        self.immutable == Some(true)
    }
}

enum Reader {
    ConfigMap(Store<ConfigMap>),
    Secret(Store<Secret>),
}

struct Entry {
    /// UIDs of the pods that refer to the object.
    pods: BTreeSet<String>,
    reader: Reader,
    sync: watch::Receiver<WatchState>,
    task: AbortHandle,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The objects referenced by the pods bound to this node, each watched while referenced.
pub struct ObjectCache {
    client: Client,
    entries: BTreeMap<ObjectKey, Entry>,
    /// What each pod (by UID) refers to.
    by_pod: BTreeMap<String, BTreeSet<ObjectKey>>,
    changes: Arc<Changes>,
}

impl ObjectCache {
    pub fn new(client: Client) -> ObjectCache {
        ObjectCache {
            client,
            entries: BTreeMap::new(),
            by_pod: BTreeMap::new(),
            changes: Arc::new(Changes::default()),
        }
    }

    /// Where the watches report changes.
    pub fn changes(&self) -> Arc<Changes> {
        self.changes.clone()
    }

    /// How many objects are watched (or cached, for immutable ones).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Makes the pod `uid` refer to exactly `keys`: objects no other pod referred to are
    /// watched from now on, and those no pod refers to any more are no longer.
    pub fn set_references(&mut self, uid: &str, keys: BTreeSet<ObjectKey>) {
        let old = self.by_pod.remove(uid).unwrap_or_default();
        for key in old.difference(&keys) {
            let unused = self.entries.get_mut(key).is_some_and(|entry| {
                entry.pods.remove(uid);
                entry.pods.is_empty()
            });
            if unused {
                self.entries.remove(key);
                tracing::debug!(
                    ?key,
                    "no pod refers to the object any more; its watch stopped"
                );
            }
        }
        for key in keys.difference(&old) {
            let entry = match self.entries.get_mut(key) {
                Some(entry) => entry,
                None => {
                    let entry = self.start(key);
                    self.entries.entry(key.clone()).or_insert(entry)
                }
            };
            entry.pods.insert(uid.to_owned());
        }
        if !keys.is_empty() {
            self.by_pod.insert(uid.to_owned(), keys);
        }
    }

    /// The pod `uid` is gone: its references are dropped.
    pub fn forget(&mut self, uid: &str) {
        self.set_references(uid, BTreeSet::new());
    }

    /// The pods that refer to any of `keys`.
    pub fn pods_referring<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a ObjectKey>,
    ) -> BTreeSet<String> {
        keys.into_iter()
            .filter_map(|key| self.entries.get(key))
            .flat_map(|entry| entry.pods.iter().cloned())
            .collect()
    }

    /// Waits, at most `limit`, until each of `keys` has been listed or has failed to be.
    pub async fn wait_listed(&self, keys: &BTreeSet<ObjectKey>, limit: Duration) {
        let waits = keys
            .iter()
            .filter_map(|key| self.entries.get(key))
            .map(|entry| {
                let mut sync = entry.sync.clone();
                async move {
                    let _ = sync.wait_for(|s| *s != WatchState::Listing).await;
                }
            });
        let _ = tokio::time::timeout(limit, futures::future::join_all(waits)).await;
    }

    /// The configMap as last seen: None if it does not exist; an error while it could
    /// not be listed yet.
    pub fn config_map(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<ConfigMap>, ResolveError> {
        let key = ObjectKey::new(ObjectKind::ConfigMap, namespace, name);
        match self.synced(&key)? {
            Reader::ConfigMap(store) => Ok(read(store, namespace, name)),
            Reader::Secret(_) => unreachable!("a configMap key has a configMap store"),
        }
    }

    /// The secret as last seen, as [`ObjectCache::config_map`].
    pub fn secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>, ResolveError> {
        let key = ObjectKey::new(ObjectKind::Secret, namespace, name);
        match self.synced(&key)? {
            Reader::Secret(store) => Ok(read(store, namespace, name)),
            Reader::ConfigMap(_) => unreachable!("a secret key has a secret store"),
        }
    }

    fn synced(&self, key: &ObjectKey) -> Result<&Reader, ResolveError> {
        let waiting = || {
            ResolveError::Missing(format!(
                "{} \"{}\" not read from the API server yet",
                key.kind.lowercase(),
                key.name
            ))
        };
        let entry = self.entries.get(key).ok_or_else(waiting)?;
        let sync = entry.sync.borrow().clone();
        match sync {
            WatchState::Listed => Ok(&entry.reader),
            WatchState::Listing => Err(waiting()),
            WatchState::Failed(error) => Err(error),
        }
    }

    fn start(&self, key: &ObjectKey) -> Entry {
        let (sync_tx, sync) = watch::channel(WatchState::Listing);
        let changes = self.changes.clone();
        let (reader, task) = match key.kind {
            ObjectKind::ConfigMap => {
                let (store, task) = spawn_watch::<ConfigMap>(&self.client, key, sync_tx, changes);
                (Reader::ConfigMap(store), task)
            }
            ObjectKind::Secret => {
                let (store, task) = spawn_watch::<Secret>(&self.client, key, sync_tx, changes);
                (Reader::Secret(store), task)
            }
        };
        tracing::debug!(?key, "watching the object");
        Entry {
            pods: BTreeSet::new(),
            reader,
            sync,
            task,
        }
    }
}

fn read<K: Watched>(store: &Store<K>, namespace: &str, name: &str) -> Option<K> {
    store
        .get(&ObjectRef::new(name).within(namespace))
        .map(|object| (*object).clone())
}

/// Lists and watches the one object `key` names into a reflector store, until aborted
/// (or until the object is seen immutable).
fn spawn_watch<K: Watched>(
    client: &Client,
    key: &ObjectKey,
    sync: watch::Sender<WatchState>,
    changes: Arc<Changes>,
) -> (Store<K>, AbortHandle) {
    let api: Api<K> = Api::namespaced(client.clone(), &key.namespace);
    // The first list from the API server's cache (resourceVersion 0), as client-go's
    // reflectors list; the watch then brings anything newer.
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={}", key.name))
        .any_semantic();
    let (store, writer) = reflector::store::<K>();
    let key = key.clone();
    let task = tokio::spawn(async move {
        let mut events = std::pin::pin!(reflector::reflector(writer, watcher(api, config)));
        let mut retry = RETRY_MIN;
        let mut immutable = false;
        while let Some(event) = events.next().await {
            let seen = match event {
                Ok(watcher::Event::Init) => {
                    immutable = false;
                    false
                }
                Ok(watcher::Event::InitApply(object)) => {
                    immutable = object.immutable();
                    false
                }
                Ok(watcher::Event::InitDone) => true,
                Ok(watcher::Event::Apply(object)) => {
                    immutable = object.immutable();
                    true
                }
                Ok(watcher::Event::Delete(_)) => {
                    immutable = false;
                    true
                }
                Err(error) => {
                    let failed = watch_failure(&key, &error);
                    tracing::debug!(?key, %error, retry_secs = retry.as_secs(), "watching the object failed; retrying");
                    let report = !matches!(*sync.borrow(), WatchState::Listed)
                        && *sync.borrow() != WatchState::Failed(failed.clone());
                    if report {
                        // Before the first list, the pods waiting for the object say why;
                        // after it, they keep what was seen, as the kubelet's store does.
                        sync.send_replace(WatchState::Failed(failed));
                        changes.push(&key);
                    }
                    // The watcher starts over by itself; not before this.
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                    false
                }
            };
            if !seen {
                continue;
            }
            // Listed, or an event: the store is up to date (the reflector applies each
            // event before passing it on).
            retry = RETRY_MIN;
            sync.send_replace(WatchState::Listed);
            changes.push(&key);
            if immutable {
                tracing::debug!(?key, "the object is immutable; its watch stopped");
                return;
            }
        }
    });
    (store, task.abort_handle())
}

/// What a failed list or watch means for the pods that need the object: a 403 says
/// which permission the node lacks, and where (see [`unavailable`]).
fn watch_failure(key: &ObjectKey, error: &watcher::Error) -> ResolveError {
    let action = format!("read {}", key.kind.lowercase());
    match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => unavailable(&action, &key.name, &key.namespace, e),
        watcher::Error::WatchError(status) => unavailable(
            &action,
            &key.name,
            &key.namespace,
            &kube::Error::Api(status.clone()),
        ),
        watcher::Error::NoResourceVersion => {
            ResolveError::Missing(format!("cannot {action} \"{}\": {error}", key.name))
        }
    }
}

/// The API could not be asked for `name` (`action` is e.g. "read secret"): the pod
/// waits, and the next attempt may succeed. A 403 says which permission the node lacks
/// in which namespace, and how the chart grants it.
pub fn unavailable(action: &str, name: &str, namespace: &str, error: &kube::Error) -> ResolveError {
    match error {
        kube::Error::Api(status) if status.code == 403 => ResolveError::Denied(format!(
            "the node's service account may not {action} \"{name}\" in namespace \
             \"{namespace}\": the node serves only the namespaces of its chart value \
             servedNamespaces; add \"{namespace}\" to it (or grant the node's service \
             account that permission there). The API server said: {}",
            status.message
        )),
        _ => ResolveError::Missing(format!("cannot {action} \"{name}\": {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client of an address where nothing listens: every list fails.
    fn unreachable_client() -> Client {
        let url = "http://127.0.0.1:9".parse().expect("url");
        Client::try_from(kube::Config::new(url)).expect("client")
    }

    fn keys(items: &[(ObjectKind, &str)]) -> BTreeSet<ObjectKey> {
        items
            .iter()
            .map(|(kind, name)| ObjectKey::new(*kind, "shop", name))
            .collect()
    }

    #[tokio::test]
    async fn objects_are_watched_while_a_pod_refers_to_them() {
        let mut cache = ObjectCache::new(unreachable_client());
        let cfg = (ObjectKind::ConfigMap, "cfg");
        let creds = (ObjectKind::Secret, "creds");
        cache.set_references("pod-a", keys(&[cfg, creds]));
        cache.set_references("pod-b", keys(&[cfg]));
        assert_eq!(cache.len(), 2);
        let cfg_key = ObjectKey::new(ObjectKind::ConfigMap, "shop", "cfg");
        assert_eq!(
            cache.pods_referring([&cfg_key]),
            BTreeSet::from(["pod-a".to_string(), "pod-b".to_string()])
        );
        let task = cache.entries[&cfg_key].task.clone();

        // Not listed yet: the pods wait, saying so; then the failure says why.
        assert!(
            matches!(cache.config_map("shop", "cfg"), Err(ResolveError::Missing(m)) if m.contains("not read")),
        );
        let changes = cache.changes();
        cache
            .wait_listed(&keys(&[cfg, creds]), Duration::from_secs(10))
            .await;
        let reported = tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .expect("the failures are reported");
        assert!(!reported.is_empty());
        assert!(
            matches!(cache.secret("shop", "creds"), Err(ResolveError::Missing(m)) if m.starts_with("cannot read secret \"creds\"")),
        );

        // A pod that changes its references, and pods that go: each object is watched
        // until the last pod referring to it goes.
        cache.set_references("pod-a", keys(&[cfg]));
        assert_eq!(cache.len(), 1);
        cache.forget("pod-a");
        assert_eq!(cache.len(), 1);
        assert!(!task.is_finished());
        cache.forget("pod-b");
        assert!(cache.is_empty());
        tokio::time::timeout(Duration::from_secs(5), async {
            while !task.is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the watch task ends");
        assert!(cache.pods_referring([&cfg_key]).is_empty());
        assert!(cache.by_pod.is_empty());
    }

    #[tokio::test]
    async fn changes_are_coalesced_into_one_set() {
        let changes = Changes::default();
        let key = ObjectKey::new(ObjectKind::Secret, "shop", "creds");
        changes.push(&key);
        changes.push(&key);
        changes.push(&ObjectKey::new(ObjectKind::ConfigMap, "shop", "cfg"));
        assert_eq!(changes.next().await.len(), 2);
        // Nothing more pending: the next waits for a push.
        let waiting = tokio::time::timeout(Duration::from_millis(50), changes.next()).await;
        assert!(waiting.is_err());
    }

    #[test]
    fn a_forbidden_read_says_which_namespace_and_which_chart_value() {
        // The Status a real API server sends for an RBAC denial (NewForbidden with
        // forbiddenMessage): 403, reason Forbidden.
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "secrets \"creds\" is forbidden: User \"system:serviceaccount:beemesh:beemesh\" cannot get resource \"secrets\" in API group \"\" in the namespace \"shop\"",
            "reason": "Forbidden", "details": {"name": "creds", "kind": "secrets"}, "code": 403
        }))
        .expect("status");
        let denied = unavailable(
            "read secret",
            "creds",
            "shop",
            &kube::Error::Api(status.boxed()),
        );
        let ResolveError::Denied(message) = &denied else {
            panic!("{denied:?}");
        };
        for part in [
            "may not read secret \"creds\" in namespace \"shop\"",
            "servedNamespaces",
            "cannot get resource \"secrets\"",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
        // Anything else is a pod waiting for the API, retried sooner.
        let unavailable_status: kube::core::Status = serde_json::from_value(
            serde_json::json!({"status": "Failure", "message": "etcdserver: request timed out", "code": 500}),
        )
        .expect("status");
        let waiting = unavailable(
            "read secret",
            "creds",
            "shop",
            &kube::Error::Api(unavailable_status.boxed()),
        );
        assert!(
            matches!(&waiting, ResolveError::Missing(m) if m.starts_with("cannot read secret \"creds\"")),
            "{waiting:?}"
        );
    }
}
