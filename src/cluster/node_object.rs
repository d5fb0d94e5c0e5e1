//! The virtual node's Node object, built from its configuration and the live agents.
//! Pure: the API calls are in [`super::node_lease`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::node::owner::AgentsSummary;

pub const TAINT_KEY: &str = "virtual-kubelet.io/provider";
pub const TAINT_VALUE: &str = "beemesh";
pub const MESH_LABEL: &str = "beemesh.io/mesh";

/// What the node says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub name: String,
    /// The InternalIP address, through which the API server reaches the kubelet API.
    pub internal_ip: Option<IpAddr>,
    /// A Hostname address, only when it resolves (checked by the caller).
    pub hostname: Option<String>,
    pub kubelet_port: u16,
}

/// Labels and taint: what makes pods choose the virtual node, and others avoid it.
pub fn node_metadata(identity: &NodeIdentity) -> (BTreeMap<String, String>, Vec<Taint>) {
    let labels = BTreeMap::from([
        ("type".to_string(), "virtual-kubelet".to_string()),
        ("kubernetes.io/role".to_string(), "agent".to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/hostname".to_string(), identity.name.clone()),
        (MESH_LABEL.to_string(), "true".to_string()),
    ]);
    let taint = Taint {
        key: TAINT_KEY.into(),
        value: Some(TAINT_VALUE.into()),
        effect: "NoSchedule".into(),
        time_added: None,
    };
    (labels, vec![taint])
}

/// Whether BeeMesh registered `node` (it carries the mesh label): only such a Node is
/// taken over by a node of the same name, after a restart or from an older version.
pub fn is_ours(node: &Node) -> bool {
    node.metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(MESH_LABEL))
        .is_some_and(|value| value == "true")
}

/// The IPv4 pod CIDRs the cluster's node IPAM gave `node` (`spec.podCIDRs`).
pub fn pod_cidrs(node: &Node) -> Vec<Ipv4Net> {
    let spec = node.spec.as_ref();
    spec.and_then(|s| s.pod_cidrs.clone())
        .unwrap_or_default()
        .into_iter()
        .chain(spec.and_then(|s| s.pod_cidr.clone()))
        .filter_map(|cidr| cidr.parse().ok())
        .collect()
}

/// A new Node object (status is written separately, through nodes/status).
pub fn new_node(identity: &NodeIdentity) -> Node {
    let (labels, taints) = node_metadata(identity);
    Node {
        metadata: ObjectMeta {
            name: Some(identity.name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(taints),
            ..Default::default()
        }),
        status: None,
    }
}

/// What the kubelet API serves beyond the kubelet's defaults, in `status.declaredFeatures`
/// (KEP-5328): exec/attach as WebSocket `v5.channel.k8s.io` (v4 fallback) and
/// port-forward as `SPDY/3.1+portforward.k8s.io` in WebSocket, so that API servers with
/// KEP-4006's gate forward kubectl's WebSocket instead of translating it to SPDY.
pub const DECLARED_FEATURES: &[&str] = &["ExtendWebSocketsToKubelet"];

/// The node's status for the live agents. `previous` keeps each condition's
/// lastTransitionTime while its status stays the same, as the kubelet does. While a k3s
/// agent tunnel session is up (`tunnelled`), the Node has a Hostname address equal to
/// its name: k3s 1.21 and older send connections for that name through the session.
pub fn node_status(
    identity: &NodeIdentity,
    tunnelled: bool,
    agents: &AgentsSummary,
    previous: Option<&NodeStatus>,
    now: Time,
) -> NodeStatus {
    let resources = BTreeMap::from([
        (
            "cpu".to_string(),
            Quantity(format!("{}m", agents.capacity.cpu_millis)),
        ),
        (
            "memory".to_string(),
            Quantity(agents.capacity.memory_bytes.to_string()),
        ),
        (
            "pods".to_string(),
            Quantity(agents.capacity.pods.to_string()),
        ),
        (
            "ephemeral-storage".to_string(),
            Quantity(agents.storage_bytes.to_string()),
        ),
    ]);
    let broken = agents.live - agents.runtime_healthy.min(agents.live);
    let ready = if agents.runtime_healthy > 0 {
        let mut message = format!(
            "BeeMesh node is ready: {} agent(s) on the mesh",
            agents.live
        );
        if broken > 0 {
            message.push_str(&format!(
                ", {broken} of them with a container runtime that fails its checks"
            ));
        }
        ("True", "KubeletReady", message)
    } else if agents.live > 0 {
        (
            "False",
            "RuntimeUnhealthy",
            format!(
                "the container runtime of every agent ({}) fails its checks: see `beemesh status` and the agents' logs",
                agents.live
            ),
        )
    } else {
        (
            "False",
            "NoAgents",
            "no BeeMesh agent is alive on the mesh: start one with `beemesh agent --bootstrap <this node's mesh address>`".to_string(),
        )
    };
    // True when no live agent is free of it (the node can take no pod); until then the
    // message says how many are under it.
    let pressure = |under: usize, kind: &str, yes: &'static str, no: &'static str| {
        let message = format!("{under} of {} agent(s) under {kind} pressure", agents.live);
        if agents.live > 0 && under >= agents.live {
            ("True", yes, message)
        } else {
            ("False", no, message)
        }
    };
    let memory = pressure(
        agents.memory_pressure,
        "memory",
        "KubeletHasInsufficientMemory",
        "KubeletHasSufficientMemory",
    );
    let disk = pressure(
        agents.disk_pressure,
        "disk",
        "KubeletHasDiskPressure",
        "KubeletHasNoDiskPressure",
    );
    let pid = pressure(
        agents.pid_pressure,
        "PID",
        "KubeletHasInsufficientPID",
        "KubeletHasSufficientPID",
    );
    let conditions = [
        ("Ready", ready.0, ready.1, ready.2),
        ("MemoryPressure", memory.0, memory.1, memory.2),
        ("DiskPressure", disk.0, disk.1, disk.2),
        ("PIDPressure", pid.0, pid.1, pid.2),
        (
            "NetworkUnavailable",
            "False",
            "MeshConnected",
            "pods are reached through the BeeMesh mesh".into(),
        ),
    ]
    .into_iter()
    .map(|(type_, status, reason, message)| {
        let unchanged = previous
            .and_then(|p| p.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time.clone());
        NodeCondition {
            type_: type_.into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(message),
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(unchanged.unwrap_or_else(|| now.clone())),
        }
    })
    .collect();
    let mut addresses = Vec::new();
    if let Some(ip) = identity.internal_ip {
        addresses.push(NodeAddress {
            type_: "InternalIP".into(),
            address: ip.to_string(),
        });
    }
    let hostname = match tunnelled {
        true => Some(&identity.name),
        false => identity.hostname.as_ref(),
    };
    if let Some(hostname) = hostname {
        addresses.push(NodeAddress {
            type_: "Hostname".into(),
            address: hostname.clone(),
        });
    }
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        conditions: Some(conditions),
        addresses: Some(addresses),
        declared_features: Some(DECLARED_FEATURES.iter().map(|f| f.to_string()).collect()),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(identity.kubelet_port),
            }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH
                .replace("x86_64", "amd64")
                .replace("aarch64", "arm64"),
            operating_system: "linux".into(),
            os_image: "BeeMesh mesh of Podman agents".into(),
            kernel_version: String::new(),
            kubelet_version: format!("v{}-beemesh", env!("CARGO_PKG_VERSION")),
            kube_proxy_version: String::new(),
            container_runtime_version: "podman://".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether two statuses differ in more than their heartbeat times.
pub fn status_changed(old: &NodeStatus, new: &NodeStatus) -> bool {
    let strip = |status: &NodeStatus| {
        let mut status = status.clone();
        for condition in status.conditions.iter_mut().flatten() {
            condition.last_heartbeat_time = None;
        }
        status
    };
    strip(old) != strip(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Resources;
    use k8s_openapi::jiff::Timestamp;

    fn identity() -> NodeIdentity {
        NodeIdentity {
            name: "beemesh".into(),
            internal_ip: Some("10.42.0.7".parse().expect("ip")),
            hostname: None,
            kubelet_port: 10250,
        }
    }

    fn condition<'a>(status: &'a NodeStatus, type_: &str) -> &'a NodeCondition {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_)
            .expect("condition")
    }

    #[test]
    fn capacity_is_the_sum_over_live_agents_and_readiness_follows_them() {
        let two = AgentsSummary {
            live: 2,
            runtime_healthy: 2,
            capacity: Resources {
                cpu_millis: 6000,
                memory_bytes: 12 << 30,
                pods: 220,
            },
            storage_bytes: 200 << 30,
            ..AgentsSummary::default()
        };
        let t0 = Time(Timestamp::from_second(1_000).expect("time"));
        let status = node_status(&identity(), false, &two, None, t0.clone());
        let capacity = status.capacity.clone().expect("capacity");
        assert_eq!(capacity["cpu"], Quantity("6000m".into()));
        assert_eq!(capacity["memory"], Quantity((12u64 << 30).to_string()));
        assert_eq!(capacity["pods"], Quantity("220".into()));
        assert_eq!(
            capacity["ephemeral-storage"],
            Quantity((200u64 << 30).to_string())
        );
        assert_eq!(status.allocatable, status.capacity);
        assert_eq!(condition(&status, "Ready").status, "True");
        assert_eq!(condition(&status, "MemoryPressure").status, "False");
        assert_eq!(
            status
                .daemon_endpoints
                .clone()
                .and_then(|d| d.kubelet_endpoint)
                .map(|e| e.port),
            Some(10250)
        );
        let addresses = status.addresses.clone().expect("addresses");
        assert_eq!(
            addresses.len(),
            1,
            "no Hostname address unless one resolves"
        );
        assert_eq!(addresses[0].type_, "InternalIP");
        assert_eq!(
            status.declared_features.as_deref(),
            Some(&["ExtendWebSocketsToKubelet".to_string()][..])
        );

        // While the k3s tunnel is up, the node's name is its Hostname address.
        let tunnelled = node_status(&identity(), true, &two, Some(&status), t0.clone());
        let addresses = tunnelled.addresses.clone().expect("addresses");
        assert_eq!(
            addresses
                .iter()
                .map(|a| (a.type_.as_str(), a.address.as_str()))
                .collect::<Vec<_>>(),
            [("InternalIP", "10.42.0.7"), ("Hostname", "beemesh")]
        );
        assert!(status_changed(&status, &tunnelled));

        // Same state later: transition times stay, heartbeat times move.
        let t1 = Time(Timestamp::from_second(2_000).expect("time"));
        let again = node_status(&identity(), false, &two, Some(&status), t1.clone());
        assert!(!status_changed(&status, &again));
        assert_eq!(condition(&again, "Ready").last_transition_time, Some(t0));
        assert_eq!(
            condition(&again, "Ready").last_heartbeat_time,
            Some(t1.clone())
        );

        // No agent alive: NotReady with a reason, and nothing to offer.
        let none = node_status(
            &identity(),
            false,
            &AgentsSummary::default(),
            Some(&again),
            t1.clone(),
        );
        assert!(status_changed(&again, &none));
        let ready = condition(&none, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some("NoAgents"))
        );
        assert_eq!(ready.last_transition_time, Some(t1));
        assert_eq!(
            none.capacity.expect("capacity")["pods"],
            Quantity("0".into())
        );
    }

    #[test]
    fn readiness_needs_a_working_runtime_and_pressure_every_agent_under_it() {
        let t0 = Time(Timestamp::from_second(1_000).expect("time"));
        let one_broken = AgentsSummary {
            live: 2,
            runtime_healthy: 1,
            memory_pressure: 1,
            disk_pressure: 2,
            ..AgentsSummary::default()
        };
        let status = node_status(&identity(), false, &one_broken, None, t0.clone());
        let ready = condition(&status, "Ready");
        assert_eq!(ready.status, "True");
        assert!(ready
            .message
            .as_deref()
            .is_some_and(|m| m.contains("1 of them")));
        let memory = condition(&status, "MemoryPressure");
        assert_eq!(memory.status, "False");
        assert_eq!(
            memory.message.as_deref(),
            Some("1 of 2 agent(s) under memory pressure")
        );
        let disk = condition(&status, "DiskPressure");
        assert_eq!(
            (disk.status.as_str(), disk.reason.as_deref()),
            ("True", Some("KubeletHasDiskPressure"))
        );
        assert_eq!(condition(&status, "PIDPressure").status, "False");

        let all_broken = AgentsSummary {
            live: 2,
            ..AgentsSummary::default()
        };
        let status = node_status(&identity(), false, &all_broken, None, t0);
        let ready = condition(&status, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some("RuntimeUnhealthy"))
        );
    }

    #[test]
    fn the_node_is_labelled_and_tainted_for_virtual_kubelet_pods() {
        let node = new_node(&identity());
        let labels = node.metadata.labels.expect("labels");
        assert_eq!(labels["type"], "virtual-kubelet");
        assert_eq!(labels["kubernetes.io/hostname"], "beemesh");
        assert_eq!(labels[MESH_LABEL], "true");
        let taints = node.spec.and_then(|s| s.taints).expect("taints");
        assert_eq!(taints[0].key, TAINT_KEY);
        assert_eq!(taints[0].value.as_deref(), Some("beemesh"));
        assert_eq!(taints[0].effect, "NoSchedule");
    }
}
