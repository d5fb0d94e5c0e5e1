//! Where a mesh pod's connection to a Service address goes, as the owner of the pod
//! decides when its agent asks ([`crate::wire::Request::Route`]): to a standalone
//! Service's endpoint, a ready pod its selector picks at random (as kube-proxy does)
//! among those the NetworkPolicies let the client reach, straight to that pod's agent
//! with a signed grant; to a cluster Service, the same way to one of its mesh pods as
//! often as kube-proxy would pick one, else through this node into the cluster.
//! Anything else is refused.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use libp2p::identity::Keypair;
use libp2p::PeerId;

use super::mesh_services::MeshServices;
use super::network_policy::{self, Labels, Peer, Port, Verdict};
use super::owner::Owner;
use crate::gateway::endpoints;
use crate::trust::dial::{self, Dial, GRANT_SECS};
use crate::wire::{ClusterDial, PodUid, Response, Route, SignedDial};

/// The NetworkPolicies in force, and the labels of each namespace.
pub struct Policies<'a> {
    pub policies: Vec<&'a NetworkPolicy>,
    pub namespace_labels: &'a dyn Fn(&str) -> Labels,
}

/// What a route is decided from.
pub struct Routing<'a> {
    pub owner: &'a Owner,
    /// The standalone Services.
    pub services: &'a MeshServices,
    /// The cluster's Services and how many ready endpoints each has in the cluster
    /// (not mesh pods); none without an API.
    pub cluster: Option<&'a dyn ClusterServices>,
    pub policies: Policies<'a>,
    /// Signs the grants.
    pub signer: &'a Keypair,
}

/// The cluster's Services as the node watches them.
pub trait ClusterServices {
    /// The Service that serves TCP on `to`.
    fn serving(&self, to: SocketAddr) -> Option<Arc<Service>>;
    /// The ready endpoints of `service` that are not mesh pods (the default
    /// EndpointSlice controller's).
    fn ready_in_cluster(&self, service: &Service) -> usize;
}

/// The route of `agent`'s connection `dial`; `pick(n)` chooses one of `n` endpoints.
pub fn route(
    routing: &Routing<'_>,
    agent: PeerId,
    dial: &ClusterDial,
    now_unix: u64,
    mut pick: impl FnMut(usize) -> usize,
) -> Response {
    let owner = routing.owner;
    if !owner.runs_for(agent, &dial.pod) {
        return declined(format!("pod {} is not placed on this agent", dial.pod));
    }
    if let Some(service) = routing.services.serving(dial.to) {
        return match endpoint(routing, agent, dial, service, 0, now_unix, &mut pick) {
            Ok(Some(grant)) => Response::Route(Route::Direct(Box::new(grant))),
            Ok(None) => declined(format!(
                "service {} has no ready endpoint for port {}",
                name_of(service),
                dial.to.port()
            )),
            Err(reason) => declined(reason),
        };
    }
    let in_cluster = match dial.to.ip() {
        IpAddr::V4(ip) => {
            owner.cluster_ranges().iter().any(|r| r.contains(&ip))
                && !routing.services.range().contains(&ip)
        }
        IpAddr::V6(_) => false,
    };
    if !in_cluster {
        return declined(format!("no Service serves TCP on {}", dial.to));
    }
    // A cluster Service: straight to one of its mesh pods as often as kube-proxy would
    // pick one (their share of its ready endpoints), else through this node.
    let Some(service) = routing.cluster.and_then(|c| c.serving(dial.to)) else {
        return Response::Route(Route::Owner);
    };
    let elsewhere = routing.cluster.map_or(0, |c| c.ready_in_cluster(&service));
    match endpoint(
        routing, agent, dial, &service, elsewhere, now_unix, &mut pick,
    ) {
        Ok(Some(grant)) => Response::Route(Route::Direct(Box::new(grant))),
        // The node's own check (and the cluster's policies) decide what is relayed.
        Ok(None) => Response::Route(Route::Owner),
        // Every mesh pod denied: the cluster's endpoints remain, if it has any.
        Err(_) if elsewhere > 0 => Response::Route(Route::Owner),
        Err(reason) => declined(reason),
    }
}

fn declined(reason: String) -> Response {
    Response::Declined { reason }
}

fn name_of(service: &Service) -> String {
    format!(
        "{}/{}",
        service.metadata.namespace.as_deref().unwrap_or_default(),
        service.metadata.name.as_deref().unwrap_or_default()
    )
}

/// A grant for one of the Service's ready mesh pods that the NetworkPolicies let the
/// client reach, picked among them and the Service's `elsewhere` other ready endpoints
/// (None: one of those, or none at all); Err when the policies deny every mesh pod.
fn endpoint(
    routing: &Routing<'_>,
    agent: PeerId,
    dial: &ClusterDial,
    service: &Service,
    elsewhere: usize,
    now_unix: u64,
    pick: &mut impl FnMut(usize) -> usize,
) -> Result<Option<SignedDial>, String> {
    let Routing {
        owner,
        policies,
        signer,
        ..
    } = routing;
    let pods = owner.pods_behind(service);
    let refs: Vec<&Pod> = pods.iter().collect();
    let plan = endpoints::plan(&[service], &refs);
    let uid = service.metadata.uid.as_deref().unwrap_or_default();
    let ready = plan.ready_behind(uid, i32::from(dial.to.port()));
    if ready.is_empty() {
        return Ok(None);
    }
    let client = owner
        .pod(&dial.pod.uid)
        .ok_or_else(|| format!("pod {} is gone", dial.pod))?;
    let client_namespace = client.metadata.namespace.as_deref().unwrap_or_default();
    let client_labels = (policies.namespace_labels)(client_namespace);
    let mut denials = Vec::new();
    let mut allowed: Vec<_> = ready
        .into_iter()
        .filter(|(pod, target)| {
            let target_labels = (policies.namespace_labels)(&target.namespace);
            let from = Peer::Pod {
                pod: &client,
                namespace_labels: &client_labels,
            };
            let to = Peer::Pod {
                pod,
                namespace_labels: &target_labels,
            };
            let verdicts = [
                network_policy::egress(&policies.policies, &client, to, Port::tcp(target.port)),
                network_policy::ingress(&policies.policies, pod, Port::tcp(target.port), from),
            ];
            let denied: Vec<String> = verdicts
                .into_iter()
                .flat_map(|v| match v {
                    Verdict::Allowed => Vec::new(),
                    Verdict::Denied { policies } => policies,
                })
                .collect();
            denials.extend(denied.iter().cloned());
            denied.is_empty()
        })
        .collect();
    if allowed.is_empty() {
        denials.sort();
        denials.dedup();
        return Err(format!(
            "network policy {} denies pod {} every ready endpoint of service {} on port {}",
            denials.join(", "),
            dial.pod,
            name_of(service),
            dial.to.port()
        ));
    }
    if pick(allowed.len() + elsewhere) >= allowed.len() {
        return Ok(None);
    }
    while !allowed.is_empty() {
        let (_, target) = allowed.swap_remove(pick(allowed.len()) % allowed.len());
        let Some(to) = owner.placed_on(&target.pod_ref()) else {
            continue;
        };
        return Ok(Some(dial::sign(
            signer,
            Dial {
                from: agent,
                to,
                pod: PodUid(target.uid.clone()),
                port: target.port,
                expires_at: now_unix + GRANT_SECS,
            },
        )));
    }
    Ok(None)
}

/// A random index below `n` (which is not 0).
pub fn random_below(n: usize) -> usize {
    let mut bytes = [0u8; 8];
    // Without the OS' randomness the first endpoint is as good a pick as any.
    let _ = getrandom::getrandom(&mut bytes);
    (u64::from_le_bytes(bytes) % n.max(1) as u64) as usize
}
