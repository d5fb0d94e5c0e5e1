//! Where a mesh pod's connection to a Service address goes, as the owner of the pod
//! decides when its agent asks ([`crate::wire::Request::Route`]): to a standalone
//! Service's endpoint, a ready pod its selector picks at random (as kube-proxy does)
//! among those the NetworkPolicies let the client reach, straight to that pod's agent
//! with a signed grant; to the cluster's Service CIDR, through this node into the
//! cluster. Anything else is refused.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use libp2p::identity::Keypair;
use libp2p::PeerId;

use super::mesh_services::MeshServices;
use super::network_policy::{self, Labels, Peer, Port, Verdict};
use super::owner::Owner;
use crate::gateway::endpoints;
use crate::trust::dial::{self, Dial, GRANT_SECS};
use crate::wire::{ClusterDial, Response, Route};

/// The NetworkPolicies in force, and the labels of each namespace.
pub struct Policies<'a> {
    pub policies: Vec<&'a NetworkPolicy>,
    pub namespace_labels: &'a dyn Fn(&str) -> Labels,
}

/// What a route is decided from.
pub struct Routing<'a> {
    pub owner: &'a Owner,
    pub services: &'a MeshServices,
    pub policies: Policies<'a>,
    /// Signs the grants.
    pub signer: &'a Keypair,
}

/// The route of `agent`'s connection `dial`; `pick(n)` chooses one of `n` endpoints.
pub fn route(
    routing: &Routing<'_>,
    agent: PeerId,
    dial: &ClusterDial,
    now_unix: u64,
    mut pick: impl FnMut(usize) -> usize,
) -> Response {
    let Routing {
        owner,
        services,
        policies,
        signer,
    } = routing;
    let declined = |reason: String| Response::Declined { reason };
    if !owner.runs_for(agent, &dial.pod) {
        return declined(format!("pod {} is not placed on this agent", dial.pod));
    }
    let ip = dial.to.ip();
    let Some(service) = services.serving(dial.to) else {
        let in_cluster = owner.cluster_ranges().iter().any(|r| match ip {
            std::net::IpAddr::V4(v4) => r.contains(&v4) && !services.range().contains(&v4),
            std::net::IpAddr::V6(_) => false,
        });
        return if in_cluster {
            Response::Route(Route::Owner)
        } else {
            declined(format!("no Service serves TCP on {}", dial.to))
        };
    };
    let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
    let pods = owner.pods_in(namespace);
    let refs: Vec<&Pod> = pods.iter().collect();
    let plan = endpoints::plan(&[service], &refs);
    let uid = service.metadata.uid.as_deref().unwrap_or_default();
    let ready = plan.ready_behind(uid, i32::from(dial.to.port()));
    let Some(client) = owner.pod(&dial.pod.uid) else {
        return declined(format!("pod {} is gone", dial.pod));
    };
    let client_namespace = client.metadata.namespace.as_deref().unwrap_or_default();
    let client_labels = (policies.namespace_labels)(client_namespace);
    let mut denials = Vec::new();
    let mut ready: Vec<_> = ready
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
    if ready.is_empty() && !denials.is_empty() {
        denials.sort();
        denials.dedup();
        return declined(format!(
            "network policy {} denies pod {} every ready endpoint of service {namespace}/{} on port {}",
            denials.join(", "),
            dial.pod,
            service.metadata.name.as_deref().unwrap_or_default(),
            dial.to.port()
        ));
    }
    while !ready.is_empty() {
        let (_, target) = ready.swap_remove(pick(ready.len()) % ready.len());
        let placed = owner
            .locate(&target.namespace, &target.pod)
            .filter(|l| l.pod.uid.0 == target.uid)
            .and_then(|l| l.agent);
        let Some(to) = placed else { continue };
        let grant = dial::sign(
            signer,
            Dial {
                from: agent,
                to,
                pod: crate::wire::PodUid(target.uid.clone()),
                port: target.port,
                expires_at: now_unix + GRANT_SECS,
            },
        );
        return Response::Route(Route::Direct(Box::new(grant)));
    }
    declined(format!(
        "service {namespace}/{} has no ready endpoint for port {}",
        service.metadata.name.as_deref().unwrap_or_default(),
        dial.to.port()
    ))
}

/// A random index below `n` (which is not 0).
pub fn random_below(n: usize) -> usize {
    let mut bytes = [0u8; 8];
    // Without the OS' randomness the first endpoint is as good a pick as any.
    let _ = getrandom::getrandom(&mut bytes);
    (u64::from_le_bytes(bytes) % n.max(1) as u64) as usize
}
