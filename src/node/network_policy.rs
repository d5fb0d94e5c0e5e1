//! NetworkPolicy for connections that cross the mesh, as the API documents it: a pod is
//! isolated for ingress (egress) when a policy of its namespace selects it with that
//! policy type (policyTypes defaulting to Ingress, plus Egress when the policy has
//! egress rules); an isolated pod's connection is allowed when one rule of one such
//! policy allows it: its peers (pods by podSelector in the policy's namespace, by
//! namespaceSelector, both, or an ipBlock) and its ports (number, name of the pod's
//! container port, protocol, endPort), an empty list allowing all. The owner enforces it
//! where it routes a connection (`node::route`) and the gateway where the cluster's
//! connections come in. Pure: no I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::placement::selector_matches;
use crate::wire::LabelRequirement;

pub type Labels = BTreeMap<String, String>;

/// The label every namespace has (the API server sets it), which is all a standalone
/// node knows of its namespaces.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// One end of a connection.
#[derive(Debug, Clone, Copy)]
pub enum Peer<'a> {
    /// A pod the owner knows (a mesh pod), with its namespace's labels.
    Pod {
        pod: &'a Pod,
        namespace_labels: &'a Labels,
    },
    /// Known only by its address (a client in the cluster, seen by the gateway).
    Address(IpAddr),
    /// Some pod behind a cluster Service (the node dials the ClusterIP; kube-proxy
    /// picks the pod, its labels, address and port unknown here).
    ClusterService,
}

/// Whether a connection may go, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Denied: the policies that isolate the pod, none of whose rules allows it.
    Denied {
        policies: Vec<String>,
    },
}

/// An ingress or egress rule: its peers and its ports (none: all).
type Rule<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// A destination port and its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub number: u16,
    /// As the API names it: `TCP`, `UDP`.
    pub protocol: &'static str,
}

impl Port {
    pub fn tcp(number: u16) -> Port {
        Port {
            number,
            protocol: "TCP",
        }
    }
}

/// Whether `to` may accept a connection (a flow, for UDP) on `port` from `from`.
pub fn ingress(policies: &[&NetworkPolicy], to: &Pod, port: Port, from: Peer<'_>) -> Verdict {
    decide(policies, Direction::Ingress, to, port, from, Some(to))
}

/// Whether `from` may open a connection to `to` on `port` (the destination pod's port).
pub fn egress(policies: &[&NetworkPolicy], from: &Pod, to: Peer<'_>, port: Port) -> Verdict {
    let destination = match to {
        Peer::Pod { pod, .. } => Some(pod),
        Peer::Address(_) | Peer::ClusterService => None,
    };
    decide(policies, Direction::Egress, from, port, to, destination)
}

/// Why the gateway cannot enforce a policy over mesh pod `pod` as written; such
/// connections are denied (an empty list: it is enforced as written).
pub fn unenforceable<'a>(
    policies: &[&'a NetworkPolicy],
    pod: &Pod,
) -> Vec<(&'a NetworkPolicy, &'static str)> {
    let mut out = Vec::new();
    for &policy in policies {
        let Some(spec) = &policy.spec else { continue };
        let by_selector = spec
            .ingress
            .iter()
            .flatten()
            .flat_map(|r| r.from.iter().flatten())
            .any(|peer| peer.pod_selector.is_some() || peer.namespace_selector.is_some());
        if by_selector && isolates(policy, Direction::Ingress, pod) {
            out.push((policy, INGRESS_BY_SELECTOR));
        }
        let narrowed = spec.egress.iter().flatten().any(|rule| {
            rule.to.as_ref().is_some_and(|to| !to.is_empty())
                || rule.ports.as_ref().is_some_and(|ports| !ports.is_empty())
        });
        if narrowed && isolates(policy, Direction::Egress, pod) {
            out.push((policy, EGRESS_TO_CLUSTER));
        }
    }
    out
}

/// The gateway's message for an ingress rule it cannot match.
pub const INGRESS_BY_SELECTOR: &str = "connections from the cluster reach mesh pods through the node's gateway, which knows their clients by address only: podSelector and namespaceSelector peers cannot allow them, so the gateway refuses them unless an ipBlock or a rule open to all does (connections between mesh pods obey the policy as written)";

/// The node's message for an egress rule it cannot match.
pub const EGRESS_TO_CLUSTER: &str = "mesh pods reach the cluster's Services through the node, which dials the ClusterIP and cannot see which pod kube-proxy picks: their connections into the cluster are allowed only by an egress rule open to every destination and port (connections between mesh pods obey the policy as written)";

fn decide(
    policies: &[&NetworkPolicy],
    direction: Direction,
    subject: &Pod,
    port: Port,
    other: Peer<'_>,
    port_owner: Option<&Pod>,
) -> Verdict {
    let isolating: Vec<&NetworkPolicy> = policies
        .iter()
        .copied()
        .filter(|p| isolates(p, direction, subject))
        .collect();
    if isolating.is_empty() {
        return Verdict::Allowed;
    }
    let allowed = isolating.iter().any(|policy| {
        let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
        let spec = policy.spec.as_ref();
        let rules: Vec<Rule<'_>> = match direction {
            Direction::Ingress => spec
                .and_then(|s| s.ingress.as_ref())
                .into_iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Direction::Egress => spec
                .and_then(|s| s.egress.as_ref())
                .into_iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        rules.into_iter().any(|(peers, ports)| {
            let peer_ok = peers
                .filter(|p| !p.is_empty())
                .is_none_or(|peers| peers.iter().any(|p| peer_matches(p, namespace, other)));
            // Behind a Service, the pod's own port is unknown.
            let port_ok = ports.filter(|p| !p.is_empty()).is_none_or(|ports| {
                !matches!(other, Peer::ClusterService)
                    && ports.iter().any(|p| port_matches(p, port, port_owner))
            });
            peer_ok && port_ok
        })
    });
    if allowed {
        Verdict::Allowed
    } else {
        Verdict::Denied {
            policies: isolating
                .iter()
                .map(|p| p.metadata.name.clone().unwrap_or_default())
                .collect(),
        }
    }
}

/// Whether `policy` selects `pod` for `direction`.
fn isolates(policy: &NetworkPolicy, direction: Direction, pod: &Pod) -> bool {
    let Some(spec) = &policy.spec else {
        return false;
    };
    if policy.metadata.namespace != pod.metadata.namespace {
        return false;
    }
    let types = match &spec.policy_types {
        Some(types) if !types.is_empty() => types.clone(),
        // The API server's defaults.
        _ => {
            let mut types = vec!["Ingress".to_owned()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                types.push("Egress".into());
            }
            types
        }
    };
    let wanted = match direction {
        Direction::Ingress => "Ingress",
        Direction::Egress => "Egress",
    };
    types.iter().any(|t| t == wanted)
        && spec
            .pod_selector
            .as_ref()
            .is_none_or(|selector| selects(selector, labels_of(pod)))
}

fn labels_of(pod: &Pod) -> &Labels {
    static EMPTY: Labels = BTreeMap::new();
    pod.metadata.labels.as_ref().unwrap_or(&EMPTY)
}

fn peer_matches(peer: &NetworkPolicyPeer, policy_namespace: &str, other: Peer<'_>) -> bool {
    if let Some(block) = &peer.ip_block {
        let Peer::Address(ip) = other else {
            // Mesh pods' addresses are not the ones the policy's author could name.
            return false;
        };
        let within = |cidr: &str| cidr.parse::<IpNet>().is_ok_and(|net| net.contains(&ip));
        return within(&block.cidr) && !block.except.iter().flatten().any(|c| within(c));
    }
    let Peer::Pod {
        pod,
        namespace_labels,
    } = other
    else {
        return false;
    };
    let in_namespace = match &peer.namespace_selector {
        Some(selector) => selects(selector, namespace_labels),
        None => pod.metadata.namespace.as_deref() == Some(policy_namespace),
    };
    let pod_selected = peer
        .pod_selector
        .as_ref()
        .is_none_or(|selector| selects(selector, labels_of(pod)));
    in_namespace && pod_selected
}

fn port_matches(rule: &NetworkPolicyPort, port: Port, owner: Option<&Pod>) -> bool {
    if rule.protocol.as_deref().unwrap_or("TCP") != port.protocol {
        return false;
    }
    let first = match &rule.port {
        None => return true,
        Some(IntOrString::Int(number)) => *number,
        Some(IntOrString::String(name)) => {
            let named = owner
                .and_then(|p| p.spec.as_ref())
                .into_iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| {
                    p.name.as_deref() == Some(name)
                        && p.protocol.as_deref().unwrap_or("TCP") == port.protocol
                });
            match named {
                Some(p) => p.container_port,
                None => return false,
            }
        }
    };
    let last = rule.end_port.unwrap_or(first).max(first);
    (first..=last).contains(&i32::from(port.number))
}

/// Whether a LabelSelector selects `labels`: every matchLabels pair and expression; an
/// empty selector selects everything, a malformed one nothing (the API rejects it).
pub fn selects(selector: &LabelSelector, labels: &Labels) -> bool {
    requirements(selector).is_some_and(|reqs| selector_matches(&reqs, labels))
}

fn requirements(selector: &LabelSelector) -> Option<Vec<LabelRequirement>> {
    let mut out: Vec<LabelRequirement> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, value)| LabelRequirement::Equals {
            key: key.clone(),
            value: value.clone(),
        })
        .collect();
    for expression in selector.match_expressions.iter().flatten() {
        let key = expression.key.clone();
        let values = expression.values.clone().unwrap_or_default();
        out.push(match expression.operator.as_str() {
            "In" => LabelRequirement::In { key, values },
            "NotIn" => LabelRequirement::NotIn { key, values },
            "Exists" => LabelRequirement::Exists { key },
            "DoesNotExist" => LabelRequirement::DoesNotExist { key },
            _ => return None,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> NetworkPolicy {
        serde_yaml::from_str(yaml).expect("policy")
    }

    fn pod(namespace: &str, labels: &[(&str, &str)]) -> Pod {
        let mut pod: Pod = serde_yaml::from_str(
            "metadata: {name: p}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}",
        )
        .expect("pod");
        pod.metadata.namespace = Some(namespace.into());
        pod.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        pod
    }

    fn ns(name: &str, extra: &[(&str, &str)]) -> Labels {
        let mut labels: Labels = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.into());
        labels
    }

    const WEB_FROM_CLIENTS: &str = r#"
metadata: {name: web-from-clients, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchLabels: {role: client}}
    - namespaceSelector: {matchLabels: {team: ops}}
      podSelector: {matchExpressions: [{key: tier, operator: In, values: [probe]}]}
    ports: [{port: http}]
"#;

    #[test]
    fn ingress_follows_pod_and_namespace_selectors_and_named_ports() {
        let policy = policy(WEB_FROM_CLIENTS);
        let policies = [&policy];
        let web = pod("shop", &[("app", "web")]);
        let shop = ns("shop", &[]);
        let ops = ns("ops", &[("team", "ops")]);
        let client = pod("shop", &[("role", "client")]);
        let stranger = pod("shop", &[("role", "other")]);
        let remote_client = pod("other", &[("role", "client")]);
        let probe = pod("ops", &[("tier", "probe")]);
        let from = |pod, namespace_labels| Peer::Pod {
            pod,
            namespace_labels,
        };
        assert_eq!(
            ingress(&policies, &web, Port::tcp(8080), from(&client, &shop)),
            Verdict::Allowed
        );
        assert_eq!(
            ingress(&policies, &web, Port::tcp(8080), from(&probe, &ops)),
            Verdict::Allowed
        );
        let denied = Verdict::Denied {
            policies: vec!["web-from-clients".into()],
        };
        assert_eq!(
            ingress(&policies, &web, Port::tcp(9090), from(&client, &shop)),
            denied,
            "another port"
        );
        assert_eq!(
            ingress(&policies, &web, Port::tcp(8080), from(&stranger, &shop)),
            denied
        );
        let other = ns("other", &[]);
        assert_eq!(
            ingress(
                &policies,
                &web,
                Port::tcp(8080),
                from(&remote_client, &other)
            ),
            denied,
            "a podSelector alone stays in the policy's namespace"
        );
        assert_eq!(
            ingress(
                &policies,
                &web,
                Port::tcp(8080),
                Peer::Address("10.42.0.7".parse().expect("ip"))
            ),
            denied
        );
        // Pods it does not select, or of other namespaces, are not isolated.
        let db = pod("shop", &[("app", "db")]);
        assert_eq!(
            ingress(&policies, &db, Port::tcp(5432), from(&stranger, &shop)),
            Verdict::Allowed
        );
        let other_web = pod("other", &[("app", "web")]);
        assert_eq!(
            ingress(
                &policies,
                &other_web,
                Port::tcp(8080),
                from(&stranger, &shop)
            ),
            Verdict::Allowed
        );
        assert_eq!(
            unenforceable(&policies, &web)
                .iter()
                .map(|(p, why)| (p.metadata.name.as_deref(), *why))
                .collect::<Vec<_>>(),
            vec![(Some("web-from-clients"), INGRESS_BY_SELECTOR)]
        );
    }

    #[test]
    fn deny_all_allow_all_ip_blocks_port_ranges_and_egress() {
        let deny_all = policy("metadata: {name: deny, namespace: shop}\nspec: {podSelector: {}}");
        let allow_all = policy(
            "metadata: {name: allow, namespace: shop}\nspec: {podSelector: {}, ingress: [{}]}",
        );
        let web = pod("shop", &[("app", "web")]);
        let shop = ns("shop", &[]);
        let peer = pod("shop", &[]);
        let from = Peer::Pod {
            pod: &peer,
            namespace_labels: &shop,
        };
        assert!(matches!(
            ingress(&[&deny_all], &web, Port::tcp(80), from),
            Verdict::Denied { .. }
        ));
        assert_eq!(
            ingress(&[&deny_all, &allow_all], &web, Port::tcp(80), from),
            Verdict::Allowed
        );
        // Not isolated for egress: no egress rules, no policy type.
        assert_eq!(
            egress(&[&deny_all], &web, from, Port::tcp(80)),
            Verdict::Allowed
        );

        let blocks = policy(
            r#"
metadata: {name: blocks, namespace: shop}
spec:
  podSelector: {}
  ingress: [{from: [{ipBlock: {cidr: 10.42.0.0/16, except: [10.42.9.0/24]}}], ports: [{port: 8000, endPort: 8010}]}]
"#,
        );
        let at = |ip: &str| Peer::Address(ip.parse().expect("ip"));
        assert_eq!(
            ingress(&[&blocks], &web, Port::tcp(8005), at("10.42.1.1")),
            Verdict::Allowed
        );
        assert!(matches!(
            ingress(&[&blocks], &web, Port::tcp(8011), at("10.42.1.1")),
            Verdict::Denied { .. }
        ));
        assert!(matches!(
            ingress(&[&blocks], &web, Port::tcp(8005), at("10.42.9.1")),
            Verdict::Denied { .. }
        ));
        assert!(
            matches!(
                ingress(&[&blocks], &web, Port::tcp(8005), from),
                Verdict::Denied { .. }
            ),
            "an ipBlock never names a mesh pod"
        );
        assert!(unenforceable(&[&blocks], &web).is_empty());

        let egress_to_db = policy(
            r#"
metadata: {name: to-db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: db}}}], ports: [{port: 5432, protocol: TCP}]}]
"#,
        );
        let db = pod("shop", &[("app", "db")]);
        let to = |pod| Peer::Pod {
            pod,
            namespace_labels: &shop,
        };
        assert_eq!(
            egress(&[&egress_to_db], &web, to(&db), Port::tcp(5432)),
            Verdict::Allowed
        );
        assert!(matches!(
            egress(&[&egress_to_db], &web, to(&peer), Port::tcp(5432)),
            Verdict::Denied { .. }
        ));
        assert!(matches!(
            egress(&[&egress_to_db], &web, to(&db), Port::tcp(80)),
            Verdict::Denied { .. }
        ));
        // Into the cluster, behind a Service: only a rule open to all allows it.
        assert!(matches!(
            egress(
                &[&egress_to_db],
                &web,
                Peer::ClusterService,
                Port::tcp(5432)
            ),
            Verdict::Denied { .. }
        ));
        assert_eq!(
            unenforceable(&[&egress_to_db], &web)[0].1,
            EGRESS_TO_CLUSTER
        );
        let open = policy("metadata: {name: open, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{}]}");
        assert_eq!(
            egress(
                &[&egress_to_db, &open],
                &web,
                Peer::ClusterService,
                Port::tcp(5432)
            ),
            Verdict::Allowed
        );
        assert!(unenforceable(&[&open], &web).is_empty());
        // Egress only: ingress stays open.
        assert_eq!(
            ingress(&[&egress_to_db], &web, Port::tcp(80), from),
            Verdict::Allowed
        );
    }

    #[test]
    fn selectors_follow_the_apis_rules() {
        let selector =
            |yaml: &str| -> LabelSelector { serde_yaml::from_str(yaml).expect("selector") };
        let labels = ns("x", &[("a", "1"), ("b", "2")]);
        assert!(selects(&selector("{}"), &labels));
        assert!(selects(&selector("{matchLabels: {a: '1'}}"), &labels));
        assert!(!selects(&selector("{matchLabels: {a: '2'}}"), &labels));
        assert!(selects(
            &selector("{matchExpressions: [{key: c, operator: DoesNotExist}]}"),
            &labels
        ));
        assert!(selects(
            &selector("{matchExpressions: [{key: b, operator: NotIn, values: ['3']}]}"),
            &labels
        ));
        assert!(!selects(&selector("{matchExpressions: [{key: a, operator: Exists}, {key: b, operator: In, values: ['3']}]}"), &labels));
        assert!(!selects(
            &selector("{matchExpressions: [{key: a, operator: Gt, values: ['0']}]}"),
            &labels
        ));
    }
}
