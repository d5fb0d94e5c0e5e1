//! The Node object and its Lease in the API: registration (or take-over of an existing
//! Node of the same name), the Lease renewed every 10 s, and the status patched when the
//! live agents change and at least every minute.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::node_object::{self, NodeIdentity};
use super::ClusterError;
use crate::health::Check;
use crate::node::owner::AgentsSummary;

const LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(10);
/// The kubelet's default: four renewals may fail before the node counts as gone.
const LEASE_DURATION_SECS: i32 = 40;
/// The status is written at least this often even when nothing changed, as the
/// kubelet's nodeStatusReportFrequency.
const STATUS_REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// Between failed registration attempts.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// Keeps the node registered until cancelled; then leaves it NotReady, or deletes it.
pub async fn run(
    client: Client,
    identity: NodeIdentity,
    mut agents: watch::Receiver<AgentsSummary>,
    tunnel_sessions: watch::Receiver<usize>,
    delete_on_exit: bool,
    lease_check: Check,
    cancel: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, LEASE_NAMESPACE);
    let node = loop {
        match register(&nodes, &identity).await {
            Ok(node) => break node,
            Err(e) => {
                lease_check.fail(format!("cannot register the node: {e}"));
                tracing::warn!(node = %identity.name, error = %e, "cannot register the node; retrying")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(RETRY_INTERVAL) => {}
        }
    };
    tracing::info!(node = %identity.name, "node registered");
    let mut reported: Option<NodeStatus> = node.status.clone();
    let mut last_report = tokio::time::Instant::now();
    let mut written = false;
    let mut lease_tick = tokio::time::interval(LEASE_RENEW_INTERVAL);
    let mut status_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = lease_tick.tick() => {
                match renew_lease(&leases, &node).await {
                    Ok(()) => lease_check.pass(),
                    Err(e) => {
                        lease_check.fail(format!("cannot renew the node lease: {e}"));
                        tracing::warn!(node = %identity.name, error = %e, "cannot renew the node lease");
                    }
                }
            }
            // Agents changing or the periodic report; changes are batched per second.
            _ = status_tick.tick() => {
                let summary = *agents.borrow_and_update();
                let tunnelled = *tunnel_sessions.borrow() > 0;
                let status = node_object::node_status(&identity, tunnelled, &summary, reported.as_ref(), Time(Timestamp::now()));
                let due = last_report.elapsed() >= STATUS_REPORT_INTERVAL;
                let changed = reported.as_ref().is_none_or(|old| node_object::status_changed(old, &status));
                if !(written && !changed && !due) {
                    match patch_status(&nodes, &identity.name, &status).await {
                        Ok(()) => {
                            reported = Some(status);
                            last_report = tokio::time::Instant::now();
                            written = true;
                        }
                        Err(e) => tracing::warn!(node = %identity.name, error = %e, "cannot update the node status"),
                    }
                }
            }
        }
    }
    if delete_on_exit {
        match nodes.delete(&identity.name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(node = %identity.name, "node deleted"),
            Err(e) => tracing::warn!(node = %identity.name, error = %e, "cannot delete the node"),
        }
        return;
    }
    let mut status = reported.unwrap_or_default();
    for condition in status.conditions.iter_mut().flatten() {
        if condition.type_ == "Ready" {
            condition.status = "False".into();
            condition.reason = Some("KubeletStopped".into());
            condition.message = Some("the BeeMesh node stopped".into());
            condition.last_transition_time = Some(Time(Timestamp::now()));
        }
    }
    match patch_status(&nodes, &identity.name, &status).await {
        Ok(()) => tracing::info!(node = %identity.name, "node left NotReady"),
        Err(e) => {
            tracing::warn!(node = %identity.name, error = %e, "cannot mark the node NotReady")
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RegisterError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error(transparent)]
    Foreign(ClusterError),
}

/// Creates the Node, or takes over an existing one BeeMesh registered before: our labels
/// and taint are added, everything else on it stays. A Node BeeMesh did not register
/// (made meanwhile: the start checked the name) is left alone.
async fn register(nodes: &Api<Node>, identity: &NodeIdentity) -> Result<Node, RegisterError> {
    match nodes.get_opt(&identity.name).await? {
        None => Ok(nodes
            .create(&PostParams::default(), &node_object::new_node(identity))
            .await?),
        Some(existing) if !node_object::is_ours(&existing) => {
            Err(RegisterError::Foreign(ClusterError::ForeignNode {
                name: identity.name.clone(),
            }))
        }
        Some(existing) => {
            let (labels, ours) = node_object::node_metadata(identity);
            let mut taints: Vec<_> = existing
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|t| !ours.iter().any(|o| o.key == t.key && o.effect == t.effect))
                .collect();
            taints.extend(ours);
            let patch = json!({
                "metadata": { "labels": labels },
                "spec": { "taints": taints },
            });
            tracing::info!(node = %identity.name, "taking over the existing Node object");
            nodes
                .patch(
                    &identity.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(RegisterError::Api)
        }
    }
}

async fn patch_status(
    nodes: &Api<Node>,
    name: &str,
    status: &NodeStatus,
) -> Result<(), kube::Error> {
    let patch = json!({ "status": status });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
}

/// Renews the node's Lease, creating it (owned by the Node, as the kubelet's) if needed.
async fn renew_lease(leases: &Api<Lease>, node: &Node) -> Result<(), kube::Error> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let spec = LeaseSpec {
        holder_identity: Some(name.clone()),
        lease_duration_seconds: Some(LEASE_DURATION_SECS),
        renew_time: Some(MicroTime(Timestamp::now())),
        ..Default::default()
    };
    let patch = json!({ "spec": spec });
    match leases
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        other => return other.map(drop),
    }
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(LEASE_NAMESPACE.into()),
            owner_references: node.metadata.uid.clone().map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: name.clone(),
                    uid,
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(spec),
    };
    leases
        .create(&PostParams::default(), &lease)
        .await
        .map(drop)
}
