//! Services without Kubernetes: `kind: Service` manifests beside the standalone pods.
//! Each gets a ClusterIP from the mesh service range (`--mesh-service-cidr`), its own
//! when it names one there, else one derived from its name (so that it keeps it across
//! restarts of the node) and kept while it exists. A mesh pod's connection to that
//! address and port goes, through its agent, straight to the agent of a ready pod the
//! selector picks (see `wire::Route`); its name resolves through the node
//! ([`super::mesh_dns`]). Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use super::manifests::{Manifest, ManifestError};
use crate::gateway::cluster::service_serves;
use crate::gateway::endpoints;
use crate::wire::ServiceSummary;

/// Where standalone Services get their ClusterIPs: apart from the default mesh pod
/// CIDR (10.64.0.0/12), k3s' and kubeadm's ranges and Podman's default network.
pub const DEFAULT_CIDR: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 80, 0, 0), 16);

type Key = (String, String);

/// The standalone Services with their ClusterIPs.
#[derive(Debug, Clone)]
pub struct MeshServices {
    range: Ipv4Net,
    by_name: BTreeMap<Key, Service>,
}

impl MeshServices {
    pub fn new(range: Ipv4Net) -> MeshServices {
        MeshServices {
            range,
            by_name: BTreeMap::new(),
        }
    }

    pub fn range(&self) -> Ipv4Net {
        self.range
    }

    /// The scan's Services in place of the last scan's; those that cannot be served are
    /// left out, each with its error.
    pub fn update(&mut self, scanned: &[Manifest<Service>]) -> Vec<ManifestError> {
        let mut errors = Vec::new();
        let mut valid: Vec<(&Manifest<Service>, Option<Ipv4Addr>)> = Vec::new();
        for ms in scanned {
            match check(&ms.object, self.range) {
                Ok(wanted) => valid.push((ms, wanted)),
                Err(message) => errors.push(ms.error(message)),
            }
        }
        // Addresses asked for first, then those held, then new ones: a new Service never
        // takes an address another one has.
        let previous = std::mem::take(&mut self.by_name);
        let held = |ms: &Manifest<Service>| {
            previous
                .get(&key(&ms.object))
                .and_then(cluster_ip)
                .filter(|ip| self.range.contains(ip))
        };
        valid.sort_by_key(|(ms, wanted)| (wanted.is_none(), held(ms).is_none(), key(&ms.object)));
        let mut taken = BTreeSet::new();
        for (ms, wanted) in valid {
            let ip = match wanted {
                Some(ip) if taken.contains(&ip) => {
                    errors.push(ms.error(format!(
                        "spec.clusterIP {ip} is already the address of another Service"
                    )));
                    continue;
                }
                Some(ip) => ip,
                None => match held(ms).filter(|ip| !taken.contains(ip)) {
                    Some(ip) => ip,
                    None => match self.free_address(&key(&ms.object), &taken) {
                        Some(ip) => ip,
                        None => {
                            errors.push(ms.error(format!(
                                "no address left in the mesh service range {} (--mesh-service-cidr)",
                                self.range
                            )));
                            continue;
                        }
                    },
                },
            };
            taken.insert(ip);
            let mut service = ms.object.clone();
            let (namespace, name) = key(&service);
            // Backends are matched by UID (see `gateway::endpoints::Plan`).
            service.metadata.uid = Some(format!("mesh-service/{namespace}/{name}"));
            if let Some(spec) = service.spec.as_mut() {
                spec.cluster_ip = Some(ip.to_string());
                spec.cluster_ips = Some(vec![ip.to_string()]);
            }
            self.by_name.insert((namespace, name), service);
        }
        errors
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.by_name.values()
    }

    /// The Services for a mesh view, with how many ready pods each sends to of those
    /// `pods_behind(service)` returns.
    pub fn summaries(&self, pods_behind: impl Fn(&Service) -> Vec<Pod>) -> Vec<ServiceSummary> {
        self.by_name
            .iter()
            .map(|((namespace, name), service)| {
                let pods = pods_behind(service);
                let refs: Vec<&Pod> = pods.iter().collect();
                let plan = endpoints::plan(&[service], &refs);
                let uid = service.metadata.uid.as_deref().unwrap_or_default();
                let ports = service.spec.iter().flat_map(|s| s.ports.iter().flatten());
                let ready: BTreeSet<&str> = ports
                    .clone()
                    .flat_map(|port| plan.ready_behind(uid, port.port))
                    .map(|(_, target)| target.uid.as_str())
                    .collect();
                ServiceSummary {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    cluster_ip: cluster_ip(service)
                        .map(|ip| ip.to_string())
                        .unwrap_or_default(),
                    ports: ports
                        .map(|p| format!("{}/{}", p.port, p.protocol.as_deref().unwrap_or("TCP")))
                        .collect(),
                    ready_endpoints: u32::try_from(ready.len()).unwrap_or(u32::MAX),
                }
            })
            .collect()
    }

    /// The Service that serves TCP on `to`.
    pub fn serving(&self, to: SocketAddr) -> Option<&Service> {
        self.by_name.values().find(|s| service_serves(s, to, "TCP"))
    }

    /// The ClusterIP of Service `name` in `namespace`.
    pub fn address_of(&self, namespace: &str, name: &str) -> Option<Ipv4Addr> {
        self.by_name
            .get(&(namespace.to_owned(), name.to_owned()))
            .and_then(cluster_ip)
    }

    /// The address derived from the Service's name, or the next free one after it.
    fn free_address(&self, key: &Key, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let (first, count) = hosts(self.range);
        if count == 0 {
            return None;
        }
        let digest = Sha256::digest(format!("{}/{}", key.0, key.1).as_bytes());
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&digest[..8]);
        let start = u64::from_be_bytes(seed) % count;
        (0..count)
            .map(|i| Ipv4Addr::from(first + ((start + i) % count) as u32))
            .find(|ip| !taken.contains(ip))
    }
}

/// The range's host addresses (as `Ipv4Net::hosts`: without the network and broadcast
/// addresses, but for /31 and /32): the first, and how many, without listing them.
fn hosts(range: Ipv4Net) -> (u32, u64) {
    let size = 1u64 << (32 - u32::from(range.prefix_len()));
    let network = u32::from(range.network());
    if range.prefix_len() >= 31 {
        (network, size)
    } else {
        (network + 1, size - 2)
    }
}

fn key(service: &Service) -> Key {
    (
        service.metadata.namespace.clone().unwrap_or_default(),
        service.metadata.name.clone().unwrap_or_default(),
    )
}

fn cluster_ip(service: &Service) -> Option<Ipv4Addr> {
    service.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok()
}

/// Whether the mesh can serve the Service; the ClusterIP it asks for, if any.
fn check(service: &Service, range: Ipv4Net) -> Result<Option<Ipv4Addr>, String> {
    let name = service.metadata.name.as_deref().unwrap_or_default();
    let spec = service
        .spec
        .as_ref()
        .ok_or_else(|| format!("service {name}: spec is required"))?;
    match spec.type_.as_deref() {
        None | Some("ClusterIP") => {}
        Some(other) => {
            return Err(format!(
                "service {name}: type {other} needs a cluster; standalone Services are of type ClusterIP"
            ))
        }
    }
    if spec.selector.as_ref().is_none_or(|s| s.is_empty()) {
        return Err(format!(
            "service {name}: spec.selector is required (standalone Services send to the pods they select; there are no EndpointSlices to write by hand)"
        ));
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err(format!("service {name}: spec.ports is empty"));
    }
    let mut seen = BTreeSet::new();
    for port in ports {
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !(1..=65535).contains(&port.port) {
            return Err(format!(
                "service {name}: port {} is not between 1 and 65535",
                port.port
            ));
        }
        if protocol != "TCP" {
            return Err(format!(
                "service {name}: port {} is {protocol}; mesh Services carry TCP only",
                port.port
            ));
        }
        if !seen.insert(port.port) {
            return Err(format!(
                "service {name}: port {}/{protocol} is listed twice",
                port.port
            ));
        }
        if let Some(IntOrString::Int(target)) = &port.target_port {
            if !(1..=65535).contains(target) {
                return Err(format!(
                    "service {name}: targetPort {target} of port {} is not between 1 and 65535",
                    port.port
                ));
            }
        }
    }
    match spec.cluster_ip.as_deref() {
        None | Some("") => Ok(None),
        Some("None") => Err(format!(
            "service {name}: headless Services (clusterIP: None) need pod addresses that every pod can reach, and mesh pods on other agents cannot reach each other's; give it a ClusterIP"
        )),
        Some(text) => {
            let ip: Ipv4Addr = text
                .parse()
                .map_err(|_| format!("service {name}: spec.clusterIP {text:?} is not an IPv4 address"))?;
            let (first, count) = hosts(range);
            if !(u64::from(first)..u64::from(first) + count).contains(&u64::from(u32::from(ip))) {
                return Err(format!(
                    "service {name}: spec.clusterIP {ip} is not an address of the mesh service range {range} (--mesh-service-cidr)"
                ));
            }
            Ok(Some(ip))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scanned(docs: &[&str]) -> Vec<Manifest<Service>> {
        docs.iter()
            .enumerate()
            .map(|(i, yaml)| {
                let mut service: Service = serde_yaml::from_str(yaml).expect("service");
                service
                    .metadata
                    .namespace
                    .get_or_insert_with(|| "default".into());
                Manifest {
                    file: PathBuf::from("svc.yaml"),
                    document: i + 1,
                    object: service,
                }
            })
            .collect()
    }

    fn range() -> Ipv4Net {
        DEFAULT_CIDR
    }

    const WEB: &str = "metadata: {name: web}\nspec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}";

    #[test]
    fn addresses_are_given_asked_for_and_kept() {
        let mut services = MeshServices::new(range());
        let asked = "metadata: {name: db}\nspec: {clusterIP: 10.80.0.10, selector: {app: db}, ports: [{port: 5432}]}";
        assert_eq!(services.update(&scanned(&[WEB, asked])), vec![]);
        let web = services
            .address_of("default", "web")
            .expect("web has an address");
        assert!(range().contains(&web));
        assert_eq!(
            services.address_of("default", "db"),
            Some(Ipv4Addr::new(10, 80, 0, 10))
        );
        let to = |ip: Ipv4Addr, port| SocketAddr::from((ip, port));
        assert!(services.serving(to(web, 80)).is_some());
        assert!(services.serving(to(web, 8080)).is_none(), "the target port");
        // The same name gets the same address in a new node, and keeps it when a new
        // Service comes.
        let mut again = MeshServices::new(range());
        again.update(&scanned(&[WEB]));
        assert_eq!(again.address_of("default", "web"), Some(web));
        let other = "metadata: {name: other}\nspec: {selector: {app: o}, ports: [{port: 80}]}";
        assert_eq!(services.update(&scanned(&[other, WEB, asked])), vec![]);
        assert_eq!(services.address_of("default", "web"), Some(web));
        // Gone with its manifest.
        services.update(&scanned(&[asked]));
        assert_eq!(services.address_of("default", "web"), None);
    }

    #[test]
    fn a_full_range_and_a_taken_address_are_errors_of_their_service_only() {
        // A /30 has two hosts.
        let mut services = MeshServices::new("10.80.0.0/30".parse().expect("cidr"));
        let docs = [
            "metadata: {name: a}\nspec: {clusterIP: 10.80.0.1, selector: {app: a}, ports: [{port: 80}]}",
            "metadata: {name: b}\nspec: {clusterIP: 10.80.0.1, selector: {app: b}, ports: [{port: 80}]}",
            "metadata: {name: c}\nspec: {selector: {app: c}, ports: [{port: 80}]}",
            "metadata: {name: d}\nspec: {selector: {app: d}, ports: [{port: 80}]}",
        ];
        let errors = services.update(&scanned(&docs));
        let messages: Vec<_> = errors
            .iter()
            .map(|e| (e.document, e.message.as_str()))
            .collect();
        assert_eq!(
            messages,
            vec![
                (
                    2,
                    "spec.clusterIP 10.80.0.1 is already the address of another Service"
                ),
                (
                    4,
                    "no address left in the mesh service range 10.80.0.0/30 (--mesh-service-cidr)"
                ),
            ]
        );
        assert_eq!(
            services.address_of("default", "c"),
            Some(Ipv4Addr::new(10, 80, 0, 2))
        );
    }

    #[test]
    fn services_the_mesh_cannot_serve_are_refused_with_the_reason() {
        for (yaml, wanted) in [
            ("metadata: {name: s}", "spec is required"),
            (
                "metadata: {name: s}\nspec: {type: NodePort, selector: {a: b}, ports: [{port: 80}]}",
                "type NodePort needs a cluster",
            ),
            (
                "metadata: {name: s}\nspec: {ports: [{port: 80}]}",
                "spec.selector is required",
            ),
            ("metadata: {name: s}\nspec: {selector: {a: b}}", "spec.ports is empty"),
            (
                "metadata: {name: s}\nspec: {selector: {a: b}, ports: [{port: 53, protocol: UDP}]}",
                "port 53 is UDP; mesh Services carry TCP only",
            ),
            (
                "metadata: {name: s}\nspec: {selector: {a: b}, ports: [{port: 80}, {port: 80, targetPort: 81}]}",
                "port 80/TCP is listed twice",
            ),
            (
                "metadata: {name: s}\nspec: {selector: {a: b}, ports: [{port: 70000}]}",
                "port 70000 is not between 1 and 65535",
            ),
            (
                "metadata: {name: s}\nspec: {selector: {a: b}, ports: [{port: 80, targetPort: 0}]}",
                "targetPort 0 of port 80 is not between 1 and 65535",
            ),
            (
                "metadata: {name: s}\nspec: {clusterIP: None, selector: {a: b}, ports: [{port: 80}]}",
                "headless Services",
            ),
            (
                "metadata: {name: s}\nspec: {clusterIP: 10.43.0.10, selector: {a: b}, ports: [{port: 80}]}",
                "10.43.0.10 is not an address of the mesh service range 10.80.0.0/16",
            ),
            (
                "metadata: {name: s}\nspec: {clusterIP: web, selector: {a: b}, ports: [{port: 80}]}",
                "\"web\" is not an IPv4 address",
            ),
        ] {
            let mut services = MeshServices::new(range());
            let errors = services.update(&scanned(&[yaml, WEB]));
            assert_eq!(errors.len(), 1, "{yaml}: {errors:?}");
            assert!(errors[0].message.contains(wanted), "{yaml}: {}", errors[0].message);
            assert!(services.address_of("default", "web").is_some(), "the good one stays");
            assert!(services.address_of("default", "s").is_none());
        }
    }
}
