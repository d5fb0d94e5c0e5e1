//! Which EndpointSlices the node publishes for the Services that select its pods: as the
//! EndpointSlice controller makes them (selector, target port by number or name, ready,
//! serving and terminating conditions, hostnames for headless Services), except that a
//! pod's endpoint is the gateway's address and a port allocated for that pod and port,
//! since a mesh pod's own address is not one the cluster can reach. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::wire::{PodRef, PodUid};

/// `endpointslice.kubernetes.io/managed-by` of the node's slices (the default
/// controller manages only its own, `endpointslice-controller.k8s.io`).
pub const MANAGED_BY: &str = "beemesh.io";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A pod's port that a Service sends to: what the gateway allocates a port for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub port: u16,
    pub protocol: Protocol,
}

impl Target {
    /// The pod this is a port of.
    pub fn pod_ref(&self) -> PodRef {
        PodRef {
            uid: PodUid(self.uid.clone()),
            namespace: self.namespace.clone(),
            name: self.pod.clone(),
        }
    }
}

/// The protocols the gateway relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As the API names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }

    fn parse(name: &str) -> Option<Protocol> {
        match name {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// A Service the gateway cannot serve fully, said in a warning event on the Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unserved {
    /// `Service`, or `NetworkPolicy` for a policy the gateway cannot enforce as written.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub reason: &'static str,
    pub message: String,
}

impl Unserved {
    fn of(service: &Service, reason: &'static str, message: String) -> Unserved {
        Unserved::about("Service", &service.metadata, reason, message)
    }

    pub fn about(
        kind: &'static str,
        object: &ObjectMeta,
        reason: &'static str,
        message: String,
    ) -> Unserved {
        Unserved {
            kind,
            namespace: object.namespace.clone().unwrap_or_default(),
            name: object.name.clone().unwrap_or_default(),
            uid: object.uid.clone().unwrap_or_default(),
            reason,
            message,
        }
    }
}

/// One pod behind one Service port.
#[derive(Debug, Clone, PartialEq)]
struct Backend<'a> {
    service: &'a Service,
    service_port: i32,
    port_name: Option<String>,
    pod: &'a Pod,
    target: Target,
}

/// What the Services want of the node's pods: every backend, and the Service ports
/// that cannot be served.
pub struct Plan<'a> {
    backends: Vec<Backend<'a>>,
    pub unserved: Vec<Unserved>,
}

impl Plan<'_> {
    /// The pod ports some Service sends to.
    pub fn targets(&self) -> BTreeSet<Target> {
        self.backends.iter().map(|b| b.target.clone()).collect()
    }

    /// The ready pods behind port `port` of `service` (matched by UID), with the pod
    /// port each is sent to.
    pub fn ready_behind(&self, service: &str, port: i32) -> Vec<(&Pod, &Target)> {
        self.backends
            .iter()
            .filter(|b| b.service.metadata.uid.as_deref() == Some(service))
            .filter(|b| b.service_port == port && is_ready(b.pod))
            .map(|b| (b.pod, &b.target))
            .collect()
    }

    /// The Services some of whose backends have no gateway port (the range is full).
    pub fn unallocated(&self, allocated: impl Fn(&Target) -> Option<u16>) -> Vec<Unserved> {
        let mut out: Vec<Unserved> = self
            .backends
            .iter()
            .filter(|b| allocated(&b.target).is_none())
            .map(|b| {
                Unserved::of(
                    b.service,
                    "FailedToAllocateGatewayPort",
                    "the node's gateway ports (--gateway-ports) are all taken: some of this Service's mesh pods get no endpoint".into(),
                )
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Matches `services` to `pods` as the EndpointSlice controller does: Services with a
/// selector, the pods in their namespace it selects that are not terminal, each port's
/// target port by number or by the name of one of the pod's container ports.
pub fn plan<'a>(services: &[&'a Service], pods: &[&'a Pod]) -> Plan<'a> {
    let mut backends = Vec::new();
    let mut unserved = Vec::new();
    for &service in services {
        let Some(spec) = &service.spec else { continue };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let namespace = service.metadata.namespace.clone().unwrap_or_default();
        let selected: Vec<&Pod> = pods
            .iter()
            .copied()
            .filter(|pod| pod.metadata.namespace.as_deref() == Some(&namespace))
            .filter(|pod| !is_terminal(pod))
            .filter(|pod| {
                let labels = pod.metadata.labels.as_ref();
                selector
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            })
            .collect();
        if selected.is_empty() {
            continue;
        }
        for port in spec.ports.iter().flatten() {
            let name = port.protocol.as_deref().unwrap_or("TCP");
            let Some(protocol) = Protocol::parse(name) else {
                unserved.push(Unserved::of(
                    service,
                    "UnsupportedProtocol",
                    format!(
                        "port {} is {name}: the mesh gateway relays TCP and UDP only, so its mesh pods get no endpoints for it",
                        port.name.as_deref().unwrap_or(&port.port.to_string())
                    ),
                ));
                continue;
            };
            for pod in &selected {
                let Some(number) = target_port(port.target_port.as_ref(), port.port, protocol, pod)
                else {
                    // The controller leaves such a pod out of that port's slice too.
                    continue;
                };
                backends.push(Backend {
                    service,
                    service_port: port.port,
                    port_name: port.name.clone(),
                    pod,
                    target: Target {
                        namespace: namespace.clone(),
                        pod: pod.metadata.name.clone().unwrap_or_default(),
                        uid: pod.metadata.uid.clone().unwrap_or_default(),
                        port: number,
                        protocol,
                    },
                });
            }
        }
    }
    Plan { backends, unserved }
}

/// How many ready endpoints `slices` give `service` (its slices by the
/// `kubernetes.io/service-name` label in its namespace); an endpoint without conditions
/// is ready, as kube-proxy counts it.
pub fn ready_endpoints<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    service: &Service,
) -> usize {
    let name = service.metadata.name.as_deref().unwrap_or_default();
    let namespace = service.metadata.namespace.as_deref();
    slices
        .into_iter()
        .filter(|slice| {
            slice.metadata.namespace.as_deref() == namespace
                && slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .is_some_and(|s| s == name)
        })
        .flat_map(|slice| slice.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .count()
}

/// Whether `to` is an endpoint of one of `slices` (an address of a Service's pod, which
/// a headless Service's name resolves to) with a port of `protocol` (as the API names
/// it) there. Not-ready endpoints count: they are addresses the cluster gave its pods.
pub fn endpoint_serves<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    to: std::net::SocketAddr,
    protocol: &str,
) -> bool {
    let address = to.ip().to_string();
    slices.into_iter().any(|slice| {
        let port = slice.ports.iter().flatten().any(|p| {
            p.port == Some(i32::from(to.port()))
                && p.protocol.as_deref().unwrap_or("TCP") == protocol
        });
        port && slice
            .endpoints
            .iter()
            .flatten()
            .any(|e| e.addresses.contains(&address))
    })
}

fn is_terminal(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// The pod's port a Service port sends to: its number, the number of the pod's
/// container port of that name and protocol, or, unset, the Service port itself.
fn target_port(
    target: Option<&IntOrString>,
    service_port: i32,
    protocol: Protocol,
    pod: &Pod,
) -> Option<u16> {
    match target {
        None => u16::try_from(service_port).ok(),
        Some(IntOrString::Int(number)) => u16::try_from(*number).ok().filter(|n| *n > 0),
        Some(IntOrString::String(name)) => pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name)
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol.as_str()
            })
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// The slices for `plan`: one per Service and pod (a slice's ports hold for all its
/// endpoints, and each pod's ports are its own), named after both, owned by the
/// Service; a backend whose target has no allocated port is left out.
pub fn slices(
    plan: &Plan<'_>,
    gateway: IpAddr,
    allocated: impl Fn(&Target) -> Option<u16>,
) -> Vec<EndpointSlice> {
    let mut grouped: BTreeMap<(String, String), Vec<&Backend<'_>>> = BTreeMap::new();
    for backend in &plan.backends {
        let key = (
            backend.service.metadata.uid.clone().unwrap_or_default(),
            backend.target.uid.clone(),
        );
        grouped.entry(key).or_default().push(backend);
    }
    grouped
        .into_values()
        .filter_map(|backends| {
            let first = backends.first()?;
            let ports: Vec<EndpointPort> = backends
                .iter()
                .filter_map(|b| {
                    Some(EndpointPort {
                        name: b.port_name.clone(),
                        port: allocated(&b.target).map(i32::from),
                        protocol: Some(b.target.protocol.as_str().into()),
                        app_protocol: None,
                    })
                    .filter(|p| p.port.is_some())
                })
                .collect();
            if ports.is_empty() {
                return None;
            }
            Some(slice(first.service, first.pod, gateway, ports))
        })
        .collect()
}

fn slice(service: &Service, pod: &Pod, gateway: IpAddr, ports: Vec<EndpointPort>) -> EndpointSlice {
    let service_name = service.metadata.name.clone().unwrap_or_default();
    let namespace = service.metadata.namespace.clone();
    let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
    let publish_not_ready = service
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    // As the EndpointSlice controller: serving follows the pod's Ready condition (or
    // publishNotReadyAddresses), ready is serving and not terminating.
    let serving = publish_not_ready || is_ready(pod);
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let spec = pod.spec.as_ref();
    let hostname = spec
        .and_then(|s| s.hostname.clone())
        .filter(|_| spec.and_then(|s| s.subdomain.as_deref()) == Some(&service_name));
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(&service_name, &pod_uid)),
            namespace: namespace.clone(),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_string(), service_name.clone()),
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name: service_name,
                uid: service.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..ObjectMeta::default()
        },
        address_type: if gateway.is_ipv4() { "IPv4" } else { "IPv6" }.into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![gateway.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(serving && !terminating),
                serving: Some(serving),
                terminating: Some(terminating),
            }),
            hostname,
            target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                kind: Some("Pod".into()),
                namespace,
                name: pod.metadata.name.clone(),
                uid: Some(pod_uid),
                ..Default::default()
            }),
            ..Endpoint::default()
        }]),
        ports: Some(ports),
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// `<service>-beemesh-<8 hex digits of the pod uid's SHA-256>`: stable, and within the
/// 253 characters of an object name whatever the Service's name (at most 63).
pub fn slice_name(service: &str, pod_uid: &str) -> String {
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(pod_uid.as_bytes()));
    format!("{service}-beemesh-{}", &digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_endpoints_are_counted_per_service_as_kube_proxy_counts_them() {
        let slice = |name: &str, namespace: &str, ready: &[Option<bool>]| -> EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("{name}-x"), "namespace": namespace,
                    "labels": {SERVICE_NAME_LABEL: name}},
                "addressType": "IPv4",
                "endpoints": ready.iter().map(|r| match r {
                    Some(r) => serde_json::json!({"addresses": ["10.42.0.1"], "conditions": {"ready": r}}),
                    None => serde_json::json!({"addresses": ["10.42.0.1"]}),
                }).collect::<Vec<_>>(),
            }))
            .expect("slice")
        };
        let web: Service =
            serde_yaml::from_str("metadata: {name: web, namespace: shop}").expect("service");
        let slices = [
            slice("web", "shop", &[Some(true), Some(false), None]),
            slice("web", "other", &[Some(true)]),
            slice("db", "shop", &[Some(true)]),
        ];
        assert_eq!(ready_endpoints(&slices, &web), 2);
    }

    #[test]
    fn an_endpoint_is_served_on_its_slices_ports_and_protocols_only() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "db-x", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "db"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.42.1.5"]}, {"addresses": ["10.42.1.6"], "conditions": {"ready": false}}],
            "ports": [{"port": 5432}, {"port": 53, "protocol": "UDP"}],
        }))
        .expect("slice");
        let to = |a: &str| a.parse::<std::net::SocketAddr>().expect("addr");
        let slices = [slice];
        assert!(endpoint_serves(&slices, to("10.42.1.5:5432"), "TCP"));
        assert!(
            endpoint_serves(&slices, to("10.42.1.6:5432"), "TCP"),
            "not ready"
        );
        assert!(endpoint_serves(&slices, to("10.42.1.5:53"), "UDP"));
        assert!(
            !endpoint_serves(&slices, to("10.42.1.5:53"), "TCP"),
            "UDP only"
        );
        assert!(
            !endpoint_serves(&slices, to("10.42.1.5:80"), "TCP"),
            "another port"
        );
        assert!(
            !endpoint_serves(&slices, to("10.42.1.7:5432"), "TCP"),
            "another pod"
        );
    }
    use serde_json::json;

    fn service(value: serde_json::Value) -> Service {
        serde_json::from_value(value).expect("service")
    }

    fn pod(name: &str, labels: serde_json::Value, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "labels": labels},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        }))
        .expect("pod")
    }

    fn refs<T>(items: &[T]) -> Vec<&T> {
        items.iter().collect()
    }

    fn endpoint(slice: &EndpointSlice) -> &Endpoint {
        &slice.endpoints.as_ref().expect("endpoints")[0]
    }

    fn web() -> Service {
        service(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "svc-uid"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "admin", "port": 9000},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "signal", "port": 2905, "protocol": "SCTP"},
            ]},
        }))
    }

    #[test]
    fn each_selected_pod_gets_a_slice_of_its_allocated_ports_at_the_gateway() {
        let services = [web()];
        let pods = [
            pod("a", json!({"app": "web"}), true),
            pod("b", json!({"app": "web"}), false),
            pod("other", json!({"app": "db"}), true),
        ];
        let plan = plan(&refs(&services), &refs(&pods));
        let targets = plan.targets();
        let ports: Vec<(&str, u16, Protocol)> = targets
            .iter()
            .map(|t| (t.pod.as_str(), t.port, t.protocol))
            .collect();
        use Protocol::{Tcp, Udp};
        assert_eq!(
            ports,
            [
                ("a", 53, Udp),
                ("a", 8080, Tcp),
                ("a", 9000, Tcp),
                ("b", 53, Udp),
                ("b", 8080, Tcp),
                ("b", 9000, Tcp)
            ]
        );
        assert_eq!(plan.unserved.len(), 1);
        assert_eq!(plan.unserved[0].reason, "UnsupportedProtocol");
        let gateway: IpAddr = "10.42.0.7".parse().expect("ip");
        let allocated =
            |t: &Target| Some(20000 + u16::from(t.pod == "b") * 10 + u16::from(t.port == 9000));
        let slices = slices(&plan, gateway, allocated);
        assert_eq!(slices.len(), 2);
        let a = &slices
            .iter()
            .find(|s| {
                endpoint(s)
                    .target_ref
                    .as_ref()
                    .and_then(|r| r.name.as_deref())
                    == Some("a")
            })
            .expect("a");
        assert_eq!(
            a.metadata.name.as_deref(),
            Some(slice_name("web", "uid-a").as_str())
        );
        let labels = a.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(
            a.metadata.owner_references.as_ref().expect("owner")[0].uid,
            "svc-uid"
        );
        assert_eq!(a.address_type, "IPv4");
        assert_eq!(endpoint(a).addresses, ["10.42.0.7"]);
        let ports: Vec<(Option<&str>, Option<i32>, Option<&str>)> = a
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.port, p.protocol.as_deref()))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("http"), Some(20000), Some("TCP")),
                (Some("admin"), Some(20001), Some("TCP")),
                (Some("dns"), Some(20000), Some("UDP"))
            ]
        );
        let conditions = endpoint(a).conditions.as_ref().expect("conditions");
        assert_eq!(
            (conditions.ready, conditions.serving),
            (Some(true), Some(true))
        );
        let b = slices
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(slice_name("web", "uid-b").as_str()))
            .expect("b");
        let conditions = endpoint(b).conditions.as_ref().expect("conditions");
        assert_eq!(
            (conditions.ready, conditions.serving),
            (Some(false), Some(false))
        );
    }

    #[test]
    fn terminating_terminal_unallocated_and_headless_pods_as_the_controller_treats_them() {
        let mut headless = web();
        if let Some(spec) = headless.spec.as_mut() {
            spec.cluster_ip = Some("None".into());
        }
        let mut terminating = pod("a", json!({"app": "web"}), true);
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        if let Some(spec) = terminating.spec.as_mut() {
            spec.hostname = Some("a".into());
            spec.subdomain = Some("web".into());
        }
        let mut done = pod("done", json!({"app": "web"}), false);
        if let Some(status) = done.status.as_mut() {
            status.phase = Some("Succeeded".into());
        }
        let services = [headless];
        let pods = [terminating, done];
        let plan = plan(&refs(&services), &refs(&pods));
        assert!(plan.targets().iter().all(|t| t.pod == "a"));
        let slices = slices(&plan, "10.0.0.1".parse().expect("ip"), |t| {
            (t.port == 8080).then_some(21000)
        });
        assert_eq!(slices.len(), 1);
        let endpoint = endpoint(&slices[0]);
        assert_eq!(endpoint.hostname.as_deref(), Some("a"));
        let conditions = endpoint.conditions.as_ref().expect("conditions");
        assert_eq!(
            (conditions.ready, conditions.serving, conditions.terminating),
            (Some(false), Some(true), Some(true))
        );
        // Only the allocated port is published.
        assert_eq!(slices[0].ports.as_ref().map(Vec::len), Some(1));
        assert!(super::slices(&plan, "10.0.0.1".parse().expect("ip"), |_| None).is_empty());
        let unallocated = plan.unallocated(|_| None);
        assert_eq!(
            unallocated.len(),
            1,
            "one event per Service: {unallocated:?}"
        );
        assert_eq!(unallocated[0].reason, "FailedToAllocateGatewayPort");
        assert!(plan.unallocated(|_| Some(1)).is_empty());
    }

    #[test]
    fn services_without_selectors_or_pods_and_unknown_port_names_give_nothing() {
        let no_selector = service(
            json!({"metadata": {"name": "ext", "namespace": "default", "uid": "x"},
            "spec": {"ports": [{"port": 80}]}}),
        );
        let named = service(
            json!({"metadata": {"name": "n", "namespace": "default", "uid": "y"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "nope"}]}}),
        );
        let elsewhere = service(
            json!({"metadata": {"name": "w", "namespace": "other", "uid": "z"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}),
        );
        let services = [no_selector, named, elsewhere];
        let pods = [pod("a", json!({"app": "web"}), true)];
        assert!(plan(&refs(&services), &refs(&pods)).targets().is_empty());
    }
}
