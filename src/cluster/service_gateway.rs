//! Services for mesh pods: the Services, this node's pods and the node's own
//! EndpointSlices are watched into reflector stores; after each change the gateway
//! serves the pod ports the Services send to, and the slices in the API are made what
//! [`endpoints::slices`] says (created, replaced, deleted). The default EndpointSlice
//! controller gives those pods no endpoints, since their podIP stays empty.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::events::{EventRecorder, PodEvent};
use crate::gateway::endpoints::{self, MANAGED_BY, MANAGED_BY_LABEL};
use crate::gateway::Gateway;
use crate::wire::{PodRef, PodUid};

/// How long the controller waits after a change for more, so that a burst (a
/// Deployment's pods becoming ready) becomes one pass.
const COALESCE: Duration = Duration::from_millis(100);
/// A pass whose writes failed is done again after this, at the latest.
const RETRY: Duration = Duration::from_secs(5);

/// Serves the Services that select the pods bound to `node_name` until cancelled.
pub async fn run(
    client: Client,
    node_name: String,
    mut gateway: Gateway,
    events: EventRecorder,
    cancel: CancellationToken,
) {
    let changed = Arc::new(Notify::new());
    let services = watch_into_store::<Service>(
        Api::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        cancel.clone(),
    );
    let pods = watch_into_store::<Pod>(
        Api::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
        changed.clone(),
        cancel.clone(),
    );
    let slices = watch_into_store::<EndpointSlice>(
        Api::all(client.clone()),
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
        changed.clone(),
        cancel.clone(),
    );
    for ready in [
        services.wait_until_ready().await,
        pods.wait_until_ready().await,
        slices.wait_until_ready().await,
    ] {
        if ready.is_err() {
            return;
        }
    }
    tracing::info!(address = %gateway.address(), "serving Services for mesh pods");
    let mut said = BTreeSet::new();
    loop {
        let passed = pass(&client, &mut gateway, &services, &pods, &slices).await;
        said = tell(&events, passed.unserved, said);
        let wait = async {
            if passed.retry {
                tokio::time::sleep(RETRY).await;
            } else {
                changed.notified().await;
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wait => {}
        }
        tokio::time::sleep(COALESCE).await;
    }
}

/// Watches `api` into a store, telling `changed` after every event, until cancelled;
/// the watcher starts over after errors with its back-off.
fn watch_into_store<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    cancel: CancellationToken,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
    K: serde::de::DeserializeOwned,
{
    let (store, writer) = reflector::store::<K>();
    tokio::spawn(async move {
        let events = reflector::reflector(writer, watcher(api, config)).default_backoff();
        let mut events = std::pin::pin!(events);
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                event = events.next() => event,
            };
            match event {
                None => return,
                Some(Ok(_)) => changed.notify_one(),
                Some(Err(e)) => {
                    tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying")
                }
            }
        }
    });
    store
}

/// What a pass left to do: the Services it could not serve fully, and whether a write
/// failed (the pass is done again soon).
struct Passed {
    unserved: Vec<endpoints::Unserved>,
    retry: bool,
}

/// Warns on each Service newly unserved (once, not on every pass); returns what has
/// been said, for the next time.
fn tell(
    events: &EventRecorder,
    unserved: Vec<endpoints::Unserved>,
    said: BTreeSet<endpoints::Unserved>,
) -> BTreeSet<endpoints::Unserved> {
    let now: BTreeSet<endpoints::Unserved> = unserved.into_iter().collect();
    for new in now.difference(&said) {
        tracing::warn!(service = %new.service, namespace = %new.namespace, reason = new.reason, message = %new.message, "Service not fully served");
        let service = PodRef {
            uid: PodUid(new.uid.clone()),
            namespace: new.namespace.clone(),
            name: new.service.clone(),
        };
        events.record_about(
            "Service",
            &service,
            vec![PodEvent::warning(new.reason, new.message.clone())],
        );
    }
    now
}

/// One pass: ports served and slices written as the stores say now.
async fn pass(
    client: &Client,
    gateway: &mut Gateway,
    services: &Store<Service>,
    pods: &Store<Pod>,
    slices: &Store<EndpointSlice>,
) -> Passed {
    let (services, pods) = (services.state(), pods.state());
    let service_refs: Vec<&Service> = services.iter().map(AsRef::as_ref).collect();
    let pod_refs: Vec<&Pod> = pods.iter().map(AsRef::as_ref).collect();
    let plan = endpoints::plan(&service_refs, &pod_refs);
    if let Err(exhausted) = gateway.serve(&plan.targets()) {
        tracing::warn!(error = %exhausted, "some Service backends get no endpoint; widen --gateway-ports");
    }
    let mut unserved = plan.unserved.clone();
    unserved.extend(plan.unallocated(|t| gateway.port(t)));
    let desired = endpoints::slices(&plan, gateway.address(), |t| gateway.port(t));
    let existing: BTreeMap<(String, String), Arc<EndpointSlice>> = slices
        .state()
        .into_iter()
        .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), s))
        .collect();
    let mut failed = false;
    let mut wanted = BTreeSet::new();
    for slice in desired {
        let namespace = slice.namespace().unwrap_or_default();
        let key = (namespace.clone(), slice.name_any());
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &namespace);
        let written = match existing.get(&key) {
            Some(current) if same(current, &slice) => Ok(()),
            Some(current) => {
                let mut replacement = slice.clone();
                replacement.metadata.resource_version = current.resource_version();
                api.replace(&key.1, &PostParams::default(), &replacement)
                    .await
                    .map(drop)
            }
            None => api.create(&PostParams::default(), &slice).await.map(drop),
        };
        if let Err(e) = written {
            tracing::warn!(slice = %key.1, namespace = %key.0, error = %e, "cannot write EndpointSlice");
            failed = true;
        }
        wanted.insert(key);
    }
    for (key, _) in existing.iter().filter(|(key, _)| !wanted.contains(*key)) {
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &key.0);
        match api.delete(&key.1, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => {
                tracing::warn!(slice = %key.1, namespace = %key.0, error = %e, "cannot delete EndpointSlice");
                failed = true;
            }
        }
    }
    Passed {
        unserved,
        retry: failed,
    }
}

/// Whether the slice in the API says what `desired` says (the API adds bookkeeping).
fn same(current: &EndpointSlice, desired: &EndpointSlice) -> bool {
    current.metadata.labels == desired.metadata.labels
        && current.metadata.owner_references == desired.metadata.owner_references
        && current.address_type == desired.address_type
        && current.endpoints == desired.endpoints
        && current.ports == desired.ports
}
