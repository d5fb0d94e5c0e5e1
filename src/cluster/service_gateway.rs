//! Services for mesh pods: the Services, this node's pods and the node's own
//! EndpointSlices are watched into reflector stores; after each change the gateway
//! serves the pod ports the Services send to, and the slices in the API are made what
//! [`endpoints::slices`] says (created, replaced, deleted). The default EndpointSlice
//! controller gives those pods no endpoints, since their podIP stays empty.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::events::{EventRecorder, PodEvent};
use super::watched::{watch_into_store, Watched};
use crate::gateway::endpoints::{self, MANAGED_BY, MANAGED_BY_LABEL};
use crate::gateway::{Gateway, PolicyCheck};
use crate::node::{network_policy, ApiNetwork};
use crate::wire::{PodRef, PodUid};

/// How long the controller waits after a change for more, so that a burst (a
/// Deployment's pods becoming ready) becomes one pass.
const COALESCE: Duration = Duration::from_millis(100);
/// A pass whose writes failed is done again after this, at the latest.
const RETRY: Duration = Duration::from_secs(5);

/// Serves the Services that select the pods bound to `node_name` until cancelled.
/// `services` is the store of all Services, with the notice its watch gives on each
/// change.
pub async fn run(
    client: Client,
    node_name: String,
    mut gateway: Gateway,
    events: EventRecorder,
    (services, changed): (Watched<Service>, Arc<Notify>),
    network: ApiNetwork,
    cancel: CancellationToken,
) {
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
    if !(services.listed().await && pods.listed().await && slices.listed().await) {
        return;
    }
    let (services, pods, slices) = (services.store, pods.store, slices.store);
    gateway.enforce(PolicyCheck {
        network: network.clone(),
        pods: pods.clone(),
    });
    tracing::info!(address = %gateway.address(), "serving Services for mesh pods");
    tokio::spawn(crate::gateway::cluster::serve(
        gateway.relay(),
        network.clone(),
        cancel.clone(),
    ));
    let mut said = BTreeSet::new();
    loop {
        let mut passed = pass(&client, &mut gateway, &services, &pods, &slices).await;
        passed.unserved.extend(unenforceable(&network, &pods));
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
        tracing::warn!(kind = new.kind, name = %new.name, namespace = %new.namespace, reason = new.reason, message = %new.message, "not served as written");
        let object = PodRef {
            uid: PodUid(new.uid.clone()),
            namespace: new.namespace.clone(),
            name: new.name.clone(),
        };
        events.record_about(
            new.kind,
            &object,
            vec![PodEvent::warning(new.reason, new.message.clone())],
        );
    }
    now
}

/// The NetworkPolicies over the node's pods that the gateway cannot enforce as written
/// (it denies what they would allow), each with the reason.
fn unenforceable(network: &ApiNetwork, pods: &Store<Pod>) -> Vec<endpoints::Unserved> {
    let Some(policies) = network.policies() else {
        return Vec::new();
    };
    let refs: Vec<&NetworkPolicy> = policies.iter().map(AsRef::as_ref).collect();
    let mut out: Vec<endpoints::Unserved> = pods
        .state()
        .iter()
        .flat_map(|pod| network_policy::unenforceable(&refs, pod))
        .map(|(policy, why)| {
            endpoints::Unserved::about(
                "NetworkPolicy",
                &policy.metadata,
                "PolicyNotEnforceable",
                why.to_owned(),
            )
        })
        .collect();
    out.sort();
    out.dedup();
    out
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
