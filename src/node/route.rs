//! Where a mesh pod's connection to a Service address goes, as the owner of the pod
//! decides when its agent asks ([`crate::wire::Request::Route`]): to a standalone
//! Service's endpoint, a ready pod its selector picks at random (as kube-proxy does),
//! straight to that pod's agent with a signed grant; to the cluster's Service CIDR,
//! through this node into the cluster. Anything else is refused.

use k8s_openapi::api::core::v1::Pod;
use libp2p::identity::Keypair;
use libp2p::PeerId;

use super::mesh_services::MeshServices;
use super::owner::Owner;
use crate::gateway::endpoints;
use crate::trust::dial::{self, Dial, GRANT_SECS};
use crate::wire::{ClusterDial, Response, Route};

/// The route of `agent`'s connection `dial`; `pick(n)` chooses one of `n` endpoints.
pub fn route(
    owner: &Owner,
    services: &MeshServices,
    signer: &Keypair,
    agent: PeerId,
    dial: &ClusterDial,
    now_unix: u64,
    mut pick: impl FnMut(usize) -> usize,
) -> Response {
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
    let mut ready = plan.ready_behind(uid, i32::from(dial.to.port()));
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
