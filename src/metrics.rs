//! Prometheus metrics shared by every role, and the `/metrics` endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use warp::Filter;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    pub action: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabel {
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Every metric BeeMesh exports. Cheap to clone; all clones count into one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Mesh messages received and accepted, by kind (offer, heartbeat, bid, ...).
    pub mesh_received: Family<KindLabel, Counter>,
    /// Mesh messages dropped, by kind and reason (malformed, too_large, untrusted, ...).
    pub mesh_dropped: Family<DropLabels, Counter>,
    /// Outbound requests that failed, by kind.
    pub mesh_request_failures: Family<KindLabel, Counter>,
    /// Connections to the node's gateway ports, by outcome (relayed, refused).
    pub gateway_connections: Family<KindLabel, Counter>,
    /// Connections of mesh pods to cluster Services, by outcome (relayed, refused).
    pub cluster_connections: Family<KindLabel, Counter>,
    pub mesh_peers: Gauge,
    /// Outbound requests waiting for room to their peer (see `mesh::window`).
    pub mesh_requests_queued: Gauge,
    /// Assignments the node sent and has no answer to yet (see `MAX_ASSIGNING`).
    pub assignments_in_flight: Gauge,
    /// Pods this process owns (node) or runs (agent).
    pub pods: Gauge,
    /// Assignments made (node) or accepted (agent).
    pub assignments: Counter,
    /// Placements begun by the node, by path: `direct` from the agents' heartbeats,
    /// `offer` by asking the agents.
    pub placements: Family<PathLabel, Counter>,
    /// Container restarts performed by this agent.
    pub container_restarts: Counter,
    /// Agents declared lost by this node.
    pub agents_lost: Counter,
    /// Strict pods' copies this agent stopped because their lease ran out or was
    /// refused (see `fencing`).
    pub pods_fenced: Counter,
    /// 1 while the agent's container runtime passes its checks.
    pub runtime_healthy: Gauge,
    /// Security decisions, by action and outcome (see `audit`).
    pub audit_events: Family<AuditLabels, Counter>,
    /// Pods this agent's admission policy refused, by rule (see `agent::admission`).
    pub policy_refusals: Family<RuleLabel, Counter>,
    /// k3s agent tunnel sessions up, by API server (1 or 0).
    pub tunnel_sessions_up: Family<ServerLabel, Gauge>,
    /// Connections open through the tunnel.
    pub tunnel_connections: Gauge,
    /// Bytes through the tunnel, by direction (to_server, from_server).
    pub tunnel_bytes_total: Family<DirectionLabel, Counter>,
    /// Connects refused (an address other than the kubelet's, too many, malformed).
    pub tunnel_refused: Counter,
    /// Tunnel messages dropped, by reason (malformed, text_message, unknown_type, ...).
    pub tunnel_dropped_total: Family<ReasonLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mesh_received = Family::<KindLabel, Counter>::default();
        let mesh_dropped = Family::<DropLabels, Counter>::default();
        let mesh_request_failures = Family::<KindLabel, Counter>::default();
        let gateway_connections = Family::<KindLabel, Counter>::default();
        let cluster_connections = Family::<KindLabel, Counter>::default();
        let (mesh_peers, pods) = (Gauge::default(), Gauge::default());
        let (mesh_requests_queued, assignments_in_flight) = (Gauge::default(), Gauge::default());
        let (assignments, container_restarts, agents_lost) =
            (Counter::default(), Counter::default(), Counter::default());
        let pods_fenced = Counter::default();
        let runtime_healthy = Gauge::default();
        let audit_events = Family::<AuditLabels, Counter>::default();
        let policy_refusals = Family::<RuleLabel, Counter>::default();
        let placements = Family::<PathLabel, Counter>::default();
        let tunnel_sessions_up = Family::<ServerLabel, Gauge>::default();
        let tunnel_connections = Gauge::default();
        let tunnel_bytes_total = Family::<DirectionLabel, Counter>::default();
        let tunnel_refused = Counter::default();
        let tunnel_dropped_total = Family::<ReasonLabel, Counter>::default();
        let mut registry = Registry::with_prefix("beemesh");
        registry.register(
            "k3s_tunnel_up",
            "k3s agent tunnel sessions up, by API server",
            tunnel_sessions_up.clone(),
        );
        registry.register(
            "k3s_tunnel_connections",
            "Connections open through the k3s agent tunnel",
            tunnel_connections.clone(),
        );
        registry.register(
            "k3s_tunnel_bytes",
            "Bytes through the k3s agent tunnel, by direction",
            tunnel_bytes_total.clone(),
        );
        registry.register(
            "k3s_tunnel_connects_refused",
            "Tunnel connects refused (not the kubelet's address, too many, malformed)",
            tunnel_refused.clone(),
        );
        registry.register(
            "k3s_tunnel_messages_dropped",
            "Tunnel messages dropped (malformed, text, unknown type, unknown connection)",
            tunnel_dropped_total.clone(),
        );
        registry.register(
            "audit_events",
            "Security decisions (enrollments, revocations, assignments, refused messages, kubelet streams)",
            audit_events.clone(),
        );
        registry.register(
            "policy_refusals",
            "Pods the agent's admission policy refused, by rule",
            policy_refusals.clone(),
        );
        registry.register(
            "placements",
            "Placements begun by the node, by path (direct: from the agents' heartbeats; offer: by asking the agents)",
            placements.clone(),
        );
        registry.register(
            "mesh_messages_received",
            "Mesh messages received and accepted",
            mesh_received.clone(),
        );
        registry.register(
            "mesh_messages_dropped",
            "Mesh messages dropped (malformed, oversized, wrong version, untrusted)",
            mesh_dropped.clone(),
        );
        registry.register(
            "mesh_request_failures",
            "Outbound mesh requests that failed",
            mesh_request_failures.clone(),
        );
        registry.register(
            "gateway_connections",
            "Connections to the node's Service gateway ports, by outcome (relayed to a mesh pod, or refused)",
            gateway_connections.clone(),
        );
        registry.register(
            "cluster_connections",
            "Connections of mesh pods to cluster Services relayed by agent and node, by outcome (relayed, refused)",
            cluster_connections.clone(),
        );
        registry.register("mesh_peers", "Connected mesh peers", mesh_peers.clone());
        registry.register(
            "mesh_requests_queued",
            "Outbound mesh requests waiting for room to their peer",
            mesh_requests_queued.clone(),
        );
        registry.register(
            "assignments_in_flight",
            "Assignments sent by the node and not yet answered",
            assignments_in_flight.clone(),
        );
        registry.register("pods", "Pods owned (node) or run (agent)", pods.clone());
        registry.register(
            "assignments",
            "Assignments made (node) or accepted (agent)",
            assignments.clone(),
        );
        registry.register(
            "container_restarts",
            "Container restarts performed",
            container_restarts.clone(),
        );
        registry.register(
            "agents_lost",
            "Agents declared lost after missing heartbeats",
            agents_lost.clone(),
        );
        registry.register(
            "pods_fenced",
            "Strict pods' copies stopped because their lease ran out or was refused",
            pods_fenced.clone(),
        );
        registry.register(
            "runtime_healthy",
            "1 while the agent's container runtime passes its checks (ping and a listing)",
            runtime_healthy.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            mesh_received,
            mesh_dropped,
            mesh_request_failures,
            gateway_connections,
            cluster_connections,
            mesh_peers,
            mesh_requests_queued,
            assignments_in_flight,
            pods,
            assignments,
            container_restarts,
            agents_lost,
            pods_fenced,
            runtime_healthy,
            audit_events,
            policy_refusals,
            placements,
            tunnel_sessions_up,
            tunnel_connections,
            tunnel_bytes_total,
            tunnel_refused,
            tunnel_dropped_total,
        }
    }

    pub fn tunnel_up(&self, server: &str) -> Gauge {
        self.tunnel_sessions_up
            .get_or_create(&ServerLabel {
                server: server.to_string(),
            })
            .clone()
    }

    pub fn tunnel_bytes(&self, direction: &str) -> Counter {
        self.tunnel_bytes_total
            .get_or_create(&DirectionLabel {
                direction: direction.to_string(),
            })
            .clone()
    }

    pub fn tunnel_dropped(&self, reason: &str) -> Counter {
        self.tunnel_dropped_total
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .clone()
    }

    pub fn audited(&self, action: &str, outcome: &str) {
        self.audit_events
            .get_or_create(&AuditLabels {
                action: action.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn dropped(&self, kind: &str, reason: &str) {
        self.mesh_dropped
            .get_or_create(&DropLabels {
                kind: kind.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn placement_begun(&self, path: &str) {
        self.placements
            .get_or_create(&PathLabel {
                path: path.to_string(),
            })
            .inc();
    }

    pub fn policy_refused(&self, rule: &str) {
        self.policy_refusals
            .get_or_create(&RuleLabel {
                rule: rule.to_string(),
            })
            .inc();
    }

    pub fn received(&self, kind: &str) {
        self.mesh_received
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn request_failed(&self, kind: &str) {
        self.mesh_request_failures
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn gateway_connection(&self, outcome: &str) {
        count_kind(&self.gateway_connections, outcome);
    }

    pub fn cluster_connection(&self, outcome: &str) {
        count_kind(&self.cluster_connections, outcome);
    }

    /// The registry in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Serves `GET /metrics` on `addr` until `cancel` fires; every other path is 404.
    pub async fn serve(self, addr: SocketAddr, cancel: CancellationToken) -> std::io::Result<()> {
        let route = warp::path!("metrics").and(warp::get()).map(move || {
            let mut reply = warp::reply::Response::new(self.render().into());
            reply.headers_mut().insert(
                warp::http::header::CONTENT_TYPE,
                warp::http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            reply
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "serving metrics on /metrics");
        warp::serve(route)
            .incoming(listener)
            .graceful(async move { cancel.cancelled().await })
            .run()
            .await;
        Ok(())
    }
}

fn count_kind(family: &Family<KindLabel, Counter>, kind: &str) {
    family
        .get_or_create(&KindLabel {
            kind: kind.to_string(),
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        m.dropped("offer", "malformed");
        m.received("heartbeat");
        let text = m.render();
        assert!(text.contains(
            "beemesh_mesh_messages_dropped_total{kind=\"offer\",reason=\"malformed\"} 1"
        ));
        assert!(text.contains("beemesh_mesh_messages_received_total{kind=\"heartbeat\"} 1"));
    }
}
