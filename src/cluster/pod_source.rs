//! The API's pods bound to this node: watched with a field selector on spec.nodeName
//! (the watcher re-lists after a 410 or a restarted API server), resolved against
//! their configMaps, secrets and service account tokens, and handed to the node loop
//! pod by pod through a [`DesiredStore`].
//!
//! ConfigMaps and secrets come from watched caches ([`ObjectCache`]: one watch per
//! referenced object, as the kubelet's watch-based managers keep them): a pod is
//! resolved again exactly when an object it refers to changes (appears, is updated or
//! deleted; so changed configMaps reach its volumes within moments), when one of its
//! tokens nears expiry, and, after a failed TokenRequest, a few seconds later. Nothing
//! is polled.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::Store;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::Client;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::events::{EventRecorder, PodEvent};
use super::object_cache::{unavailable, ObjectCache, ObjectKey, ObjectKind};
use super::pod_status::{Gates, StatusBoard, MESH_IP_ANNOTATION};
use super::watched::Watched;
use crate::node::desired::DesiredStore;
use crate::node::owner::DesiredPod;
use crate::node::resolve::{self, Fetched, ResolveError, TokenSpec};
use crate::node::service_env;
use crate::node::stored::StoredPod;
use crate::runtime::{dns, translate};
use crate::wire::PodUid;

/// A pod whose TokenRequest failed (its service account is missing, or the API did not
/// answer) is resolved again this often.
const TOKEN_RETRY: Duration = Duration::from_secs(2);
/// A pod whose tokens the node may not create (403) is resolved again this often: until
/// its RBAC changes, every attempt is refused.
const DENIED_RETRY: Duration = Duration::from_secs(10);
/// How long resolving a pod waits for the first list of an object no pod referred to
/// before; past it the pod waits as for a missing object, and is resolved again once
/// the list comes.
const FIRST_LIST_WAIT: Duration = Duration::from_secs(5);
/// A token is replaced once this share of its lifetime has passed (the kubelet's 80%).
const TOKEN_REFRESH_SHARE: f64 = 0.8;

struct Token {
    value: String,
    refresh_at: Timestamp,
}

struct Tracked {
    /// `pod`: the pod without status and bookkeeping fields (what resolution depends
    /// on). Replaced, never changed in place: the owner holds it too.
    desired: Arc<DesiredPod>,
    /// When a token must be replaced, or a failed TokenRequest tried again; None: only
    /// when an object the pod refers to changes.
    next_resolve: Option<Instant>,
}

/// What resolving a pod gave, and when to try again for its tokens' sake.
struct Resolution {
    resolved: Result<resolve::Resolved, ResolveError>,
    /// Set when a TokenRequest failed.
    retry_in: Option<Duration>,
}

struct PodSource {
    client: Client,
    board: Arc<StatusBoard>,
    events: EventRecorder,
    pods: BTreeMap<String, Tracked>,
    /// By pod UID: tokens are bound to their pod.
    tokens: HashMap<(String, TokenSpec), Token>,
    /// The configMaps and secrets the pods refer to.
    objects: ObjectCache,
    /// Pods whose entry changed since the store was last told.
    changed: BTreeSet<String>,
    /// The cluster's Services, for the pods' Service environment variables.
    services: Store<Service>,
    /// Each pod's Service environment variables, as when it was first resolved: they
    /// stay as its containers were started with (the kubelet reads them again only
    /// when a container restarts; a changed value here would change the pod's spec).
    service_envs: HashMap<String, Arc<BTreeMap<String, String>>>,
    /// The node relays its pods' DNS queries to the cluster's DNS.
    relays_dns: bool,
}

/// What the pods see of the cluster's network.
pub struct PodNetworkView {
    /// The cluster's Services, for the pods' Service environment variables.
    pub services: Watched<Service>,
    /// Whether `ClusterFirst` pods get the cluster's DNS (else the kubelet's
    /// `MissingClusterDNS` warning).
    pub relays_dns: bool,
}

/// How long the pod source waits for the Services to be listed before it resolves
/// pods (the kubelet starts no container before its Service informer has synced).
const SERVICES_LIST_WAIT: Duration = Duration::from_secs(10);

/// Watches and resolves until cancelled, telling `store` each pod that changed.
pub async fn run(
    client: Client,
    node_name: String,
    board: Arc<StatusBoard>,
    events: EventRecorder,
    store: Arc<DesiredStore>,
    network: PodNetworkView,
    cancel: CancellationToken,
) {
    let PodNetworkView {
        services,
        relays_dns,
    } = network;
    if !tokio::time::timeout(SERVICES_LIST_WAIT, services.listed())
        .await
        .unwrap_or(false)
    {
        tracing::warn!(
            "Services not listed yet: pods resolved now get no Service environment variables"
        );
    }
    let api: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut source = PodSource {
        objects: ObjectCache::new(client.clone()),
        client,
        board,
        events,
        pods: BTreeMap::new(),
        tokens: HashMap::new(),
        changed: BTreeSet::new(),
        services: services.store,
        service_envs: HashMap::new(),
        relays_dns,
    };
    let changes = source.objects.changes();
    let mut listing: Option<Vec<Pod>> = None;
    let mut listed = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            event = stream.next() => match event {
                None => return,
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                Some(Ok(watcher::Event::Init)) => listing = Some(Vec::new()),
                Some(Ok(watcher::Event::InitApply(pod))) => {
                    listing.get_or_insert_with(Vec::new).push(pod);
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    let pods = listing.take().unwrap_or_default();
                    source.replace_all(pods).await;
                    listed = true;
                }
                Some(Ok(watcher::Event::Apply(pod))) => source.apply(pod).await,
                Some(Ok(watcher::Event::Delete(pod))) => source.remove(&pod),
            },
            keys = changes.next() => {
                let uids = source.objects.pods_referring(&keys);
                source.resolve_again(uids).await;
            }
            _ = tick.tick() => source.resolve_due().await,
        }
        if listed {
            source.publish(&store);
            store.set_listed();
        }
    }
}

/// The namespace a pod's references are in.
fn namespace_of(pod: &Pod) -> String {
    pod.metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

/// The configMaps and secrets `pod` refers to.
fn object_keys(pod: &Pod) -> BTreeSet<ObjectKey> {
    let namespace = namespace_of(pod);
    let refs = resolve::references(pod);
    let config_maps = refs
        .config_maps
        .iter()
        .map(|name| ObjectKey::new(ObjectKind::ConfigMap, &namespace, name));
    let secrets = refs
        .secrets
        .iter()
        .map(|name| ObjectKey::new(ObjectKind::Secret, &namespace, name));
    config_maps.chain(secrets).collect()
}

/// The pod as resolution sees it: without status and the fields every write changes.
/// The node's own [`MESH_IP_ANNOTATION`] goes with the status it is written with: were
/// it part of the pod, its first write would send every placed pod to its agent again.
fn essentials(pod: &Pod) -> Pod {
    let mut pod = pod.clone();
    pod.status = None;
    pod.metadata.resource_version = None;
    pod.metadata.managed_fields = None;
    if let Some(annotations) = &mut pod.metadata.annotations {
        annotations.remove(MESH_IP_ANNOTATION);
        // As the API shows a pod without annotations.
        if annotations.is_empty() {
            pod.metadata.annotations = None;
        }
    }
    pod
}

impl PodSource {
    /// Tells the store, and the status board, each pod that changed.
    fn publish(&mut self, store: &DesiredStore) {
        for uid in std::mem::take(&mut self.changed) {
            let desired = self.pods.get(&uid).map(|t| t.desired.clone());
            self.board.set_known(PodUid(uid.clone()), desired.is_some());
            store.set(uid, desired);
        }
    }

    async fn replace_all(&mut self, pods: Vec<Pod>) {
        let mut old = std::mem::take(&mut self.pods);
        // Every new object's first list at once, rather than one pod after another.
        let mut keys = BTreeSet::new();
        for pod in &pods {
            if let Some(uid) = &pod.metadata.uid {
                let refs = object_keys(pod);
                self.objects.set_references(uid, refs.clone());
                keys.extend(refs);
            }
        }
        self.objects.wait_listed(&keys, FIRST_LIST_WAIT).await;
        for pod in pods {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            match old.remove(&uid) {
                Some(tracked) if tracked.desired.pod == StoredPod::new(&essentials(&pod)) => {
                    self.board.set_gates(PodUid(uid.clone()), Gates::of(&pod));
                    self.pods.insert(uid, tracked);
                }
                _ => {
                    self.apply(pod).await;
                }
            }
        }
        for uid in old.into_keys() {
            self.objects.forget(&uid);
            self.changed.insert(uid);
        }
        self.forget_tokens();
    }

    /// A new or changed pod.
    async fn apply(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        if !self.pods.contains_key(&uid) {
            self.board.inherit(PodUid(uid.clone()), pod.status.clone());
            self.record_missing_cluster_dns(&pod);
        }
        // Others set the gates' conditions: every version of the pod may change them.
        self.board.set_gates(PodUid(uid.clone()), Gates::of(&pod));
        let essentials = essentials(&pod);
        let stored = StoredPod::new(&essentials);
        if self.pods.get(&uid).is_some_and(|t| t.desired.pod == stored) {
            return;
        }
        let newly_deleted = pod.metadata.deletion_timestamp.is_some()
            && self
                .pods
                .get(&uid)
                .is_none_or(|t| t.desired.pod.get().metadata.deletion_timestamp.is_none());
        if newly_deleted {
            self.record_killing(&pod);
        }
        let keys = object_keys(&essentials);
        self.objects.set_references(&uid, keys.clone());
        let (resolved, next_resolve) = match self.pods.get(&uid) {
            // Being deleted: nothing more to resolve.
            Some(tracked) if pod.metadata.deletion_timestamp.is_some() => {
                (tracked.desired.resolved.clone(), None)
            }
            _ => {
                self.objects.wait_listed(&keys, FIRST_LIST_WAIT).await;
                let resolution = self.resolve(&essentials).await;
                let next = self.next_resolve(&uid, resolution.retry_in);
                (resolution.resolved, next)
            }
        };
        self.changed.insert(uid.clone());
        self.pods.insert(
            uid,
            Tracked {
                desired: Arc::new(DesiredPod {
                    pod: stored,
                    resolved,
                }),
                next_resolve,
            },
        );
    }

    fn remove(&mut self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.as_ref() else {
            return;
        };
        if self.pods.remove(uid).is_some() {
            self.changed.insert(uid.clone());
        }
        self.objects.forget(uid);
        self.service_envs.remove(uid);
        self.forget_tokens();
    }

    /// Resolves the pods whose tokens are due.
    async fn resolve_due(&mut self) {
        let now = Instant::now();
        let due: BTreeSet<String> = self
            .pods
            .iter()
            .filter(|(_, t)| t.next_resolve.is_some_and(|at| at <= now))
            .map(|(uid, _)| uid.clone())
            .collect();
        self.resolve_again(due).await;
    }

    /// Resolves the pods `uids` again (those not being deleted).
    async fn resolve_again(&mut self, uids: BTreeSet<String>) {
        for uid in uids {
            let Some(stored) = self.pods.get(&uid).map(|t| t.desired.pod.clone()) else {
                continue;
            };
            let pod = stored.get();
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let resolution = self.resolve(&pod).await;
            let next_resolve = self.next_resolve(&uid, resolution.retry_in);
            if let Some(tracked) = self.pods.get_mut(&uid) {
                tracked.next_resolve = next_resolve;
                if tracked.desired.resolved != resolution.resolved {
                    tracked.desired = Arc::new(DesiredPod {
                        pod: stored,
                        resolved: resolution.resolved,
                    });
                    self.changed.insert(uid);
                }
            }
        }
    }

    /// After a failed TokenRequest, `retry_in`; else when a token must be replaced;
    /// None if neither (changed objects are reported by their watches).
    fn next_resolve(&self, uid: &str, retry_in: Option<Duration>) -> Option<Instant> {
        let now = Instant::now();
        if let Some(retry_in) = retry_in {
            return Some(now + retry_in);
        }
        let wall = Timestamp::now();
        self.tokens
            .iter()
            .filter(|((owner, _), _)| owner == uid)
            .map(|(_, token)| {
                let secs = token.refresh_at.duration_since(wall).as_secs_f64().max(0.0);
                now + Duration::from_secs_f64(secs)
            })
            .min()
    }

    async fn resolve(&mut self, pod: &Pod) -> Resolution {
        let resolution = match self.try_resolve(pod).await {
            Ok(resolved) => Resolution {
                resolved: resolve::resolve(pod, &resolved),
                retry_in: None,
            },
            Err((error, retry_in)) => Resolution {
                resolved: Err(error),
                retry_in,
            },
        };
        if let Ok(resolved) = &resolution.resolved {
            self.record_unusable_pull_secrets(pod, resolved);
        }
        resolution
    }

    /// The kubelet's `FailedToRetrieveImagePullSecret` warning, when the pod's unusable
    /// pull secrets are new or changed.
    fn record_unusable_pull_secrets(&self, pod: &Pod, resolved: &resolve::Resolved) {
        let unusable = &resolved.unusable_pull_secrets;
        let before = pod
            .metadata
            .uid
            .as_ref()
            .and_then(|uid| self.pods.get(uid))
            .and_then(|tracked| tracked.desired.resolved.as_ref().ok())
            .map(|resolved| &resolved.unusable_pull_secrets);
        if unusable.is_empty() || before == Some(unusable) {
            return;
        }
        let Ok(pod_ref) = translate::pod_ref(pod) else {
            return;
        };
        let event = PodEvent {
            warning: true,
            reason: "FailedToRetrieveImagePullSecret",
            message: format!(
                "Unable to retrieve some image pull secrets ({}); attempting to pull the \
                 image may not succeed.",
                unusable.join(", ")
            ),
        };
        self.events.record(&pod_ref, vec![event]);
    }

    /// The pod's Service environment variables, computed when it is first resolved.
    fn service_env(
        &mut self,
        pod: &Pod,
        uid: &str,
        namespace: &str,
    ) -> Arc<BTreeMap<String, String>> {
        let links = pod
            .spec
            .as_ref()
            .and_then(|s| s.enable_service_links)
            .unwrap_or(true);
        let services = &self.services;
        self.service_envs
            .entry(uid.to_owned())
            .or_insert_with(|| {
                let all = services.state();
                Arc::new(service_env::service_env(
                    all.iter().map(AsRef::as_ref),
                    namespace,
                    links,
                ))
            })
            .clone()
    }

    /// The objects and tokens `pod` refers to; an error with the time to try again
    /// (None: when a watched object changes).
    async fn try_resolve(
        &mut self,
        pod: &Pod,
    ) -> Result<Fetched, (ResolveError, Option<Duration>)> {
        let namespace = namespace_of(pod);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let refs = resolve::references(pod);
        let mut fetched = Fetched {
            service_env: self.service_env(pod, &uid, &namespace),
            ..Fetched::default()
        };
        for name in &refs.config_maps {
            let found = self
                .objects
                .config_map(&namespace, name)
                .map_err(|e| (e, None))?;
            fetched
                .config_maps
                .extend(found.map(|cm| (name.clone(), cm)));
        }
        for name in &refs.secrets {
            let found = self
                .objects
                .secret(&namespace, name)
                .map_err(|e| (e, None))?;
            fetched
                .secrets
                .extend(found.map(|secret| (name.clone(), secret)));
        }
        for spec in refs.tokens {
            let key = (uid.clone(), spec.clone());
            let fresh = self
                .tokens
                .get(&key)
                .filter(|token| token.refresh_at > Timestamp::now());
            let value = match fresh {
                Some(token) => token.value.clone(),
                None => {
                    let token = self
                        .request_token(pod, &namespace, &spec)
                        .await
                        .map_err(|e| {
                            let retry_in = match e {
                                ResolveError::Denied(_) => DENIED_RETRY,
                                _ => TOKEN_RETRY,
                            };
                            (e, Some(retry_in))
                        })?;
                    let value = token.value.clone();
                    self.tokens.insert(key, token);
                    value
                }
            };
            fetched.tokens.insert(spec, value);
        }
        Ok(fetched)
    }

    /// A TokenRequest for the pod's service account, bound to the pod (so the token
    /// dies with it), as the kubelet makes for the projected token volume.
    async fn request_token(
        &self,
        pod: &Pod,
        namespace: &str,
        spec: &TokenSpec,
    ) -> Result<Token, ResolveError> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let request = token_request(pod, spec);
        let answer = accounts
            .create_token_request(&spec.service_account, &PostParams::default(), &request)
            .await
            .map_err(|e| match &e {
                kube::Error::Api(status) if status.code == 404 => ResolveError::Missing(format!(
                    "serviceaccount \"{}\" not found",
                    spec.service_account
                )),
                _ => unavailable(
                    "create a token for serviceaccount",
                    &spec.service_account,
                    namespace,
                    &e,
                ),
            })?;
        let no_token = || {
            ResolveError::Missing(format!(
                "the token request for serviceaccount \"{}\" gave no token",
                spec.service_account
            ))
        };
        let status = answer.status.ok_or_else(no_token)?;
        let (Some(token), Some(expires)) = (status.token, status.expiration_timestamp) else {
            return Err(no_token());
        };
        tracing::debug!(pod = ?pod.metadata.name, account = %spec.service_account, "service account token issued");
        Ok(Token {
            value: token,
            refresh_at: refresh_time(Timestamp::now(), expires.0),
        })
    }

    /// Drops tokens of pods no longer here.
    fn forget_tokens(&mut self) {
        let pods = &self.pods;
        self.tokens.retain(|(uid, _), _| pods.contains_key(uid));
    }

    /// The kubelet's `MissingClusterDNS` warning for a pod that asks for cluster DNS
    /// the node does not relay, once, before its containers first start.
    fn record_missing_cluster_dns(&self, pod: &Pod) {
        if self.relays_dns {
            return;
        }
        let not_started = pod.status.as_ref().is_none_or(|s| {
            s.container_statuses
                .as_deref()
                .unwrap_or_default()
                .is_empty()
        });
        let wants = pod.spec.as_ref().is_some_and(dns::wants_cluster_dns);
        if !not_started || !wants || pod.metadata.deletion_timestamp.is_some() {
            return;
        }
        let Ok(pod_ref) = translate::pod_ref(pod) else {
            return;
        };
        let event = PodEvent {
            warning: true,
            reason: dns::MISSING_CLUSTER_DNS,
            message: dns::missing_cluster_dns(&pod_ref.kubelet_name()),
        };
        self.events.record(&pod_ref, vec![event]);
    }

    /// The kubelet's Killing event for each running container of a pod being deleted.
    fn record_killing(&self, pod: &Pod) {
        let Ok(pod_ref) = translate::pod_ref(pod) else {
            return;
        };
        let running = pod
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
            .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
            .map(|c| PodEvent {
                warning: false,
                reason: "Killing",
                message: format!("Stopping container {}", c.name),
            })
            .collect();
        self.events.record(&pod_ref, running);
    }
}

/// When a token issued at `now` and expiring at `expires` is replaced.
fn refresh_time(now: Timestamp, expires: Timestamp) -> Timestamp {
    let lifetime = expires.duration_since(now).as_secs_f64().max(0.0);
    let refresh_in =
        k8s_openapi::jiff::SignedDuration::from_secs_f64(lifetime * TOKEN_REFRESH_SHARE);
    now.checked_add(refresh_in).unwrap_or(now)
}

/// The TokenRequest for `pod`'s token volume `spec`: bound to the pod by name and uid
/// (apiVersion v1, kind Pod), as the kubelet binds it, so the token stops working when
/// the pod is deleted, and the API server checks that the pod exists with that uid and
/// runs as that service account.
fn token_request(pod: &Pod, spec: &TokenSpec) -> TokenRequest {
    TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: spec.audience.clone().map(|audience| vec![audience]),
            expiration_seconds: Some(spec.expiration_secs),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_replaced_at_four_fifths_of_their_lifetime() {
        let issued = Timestamp::from_second(1_000_000).expect("time");
        let expires = Timestamp::from_second(1_000_000 + 3607).expect("time");
        let at = refresh_time(issued, expires);
        assert_eq!(at.duration_since(issued).as_secs(), 2885);
        // An already expired token is replaced at once.
        assert_eq!(refresh_time(expires, issued), expires);
    }

    #[test]
    fn token_requests_are_bound_to_the_pod_by_name_and_uid() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "0b5c-uid"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}
        }))
        .expect("pod");
        let spec = TokenSpec {
            service_account: "shop-api".into(),
            audience: Some("vault".into()),
            expiration_secs: 3607,
        };
        let request = serde_json::to_value(token_request(&pod, &spec)).expect("json");
        // As the kubelet sends it, and as NodeRestriction (and the chart's admission
        // policy) require of a node: bound to a Pod with its name and uid.
        assert_eq!(
            request["spec"],
            serde_json::json!({
                "audiences": ["vault"],
                "expirationSeconds": 3607,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "web", "uid": "0b5c-uid"}
            })
        );
    }

    #[test]
    fn resolution_ignores_status_bookkeeping_and_the_nodes_annotation() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "uid": "u", "resourceVersion": "1"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Pending"}
        }))
        .expect("pod");
        let before = essentials(&pod);
        pod.metadata.resource_version = Some("2".into());
        pod.status.as_mut().expect("status").phase = Some("Running".into());
        assert_eq!(essentials(&pod), before);
        let annotations = pod.metadata.annotations.get_or_insert_default();
        annotations.insert(MESH_IP_ANNOTATION.into(), "10.244.3.7".into());
        assert_eq!(essentials(&pod), before, "the node's own annotation");
        let annotations = pod.metadata.annotations.get_or_insert_default();
        annotations.insert("team".into(), "shop".into());
        assert_ne!(essentials(&pod), before);
        pod.metadata.annotations = None;
        pod.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        assert_ne!(essentials(&pod), before);
    }
}
