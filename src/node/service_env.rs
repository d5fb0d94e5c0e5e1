//! The Service environment variables the kubelet gives every container
//! (pkg/kubelet/envvars `FromServices`, and `getServiceEnvVarMap`): for each Service
//! with a ClusterIP in the pod's namespace (with `enableServiceLinks`, the default)
//! and the `kubernetes` Service of the `default` namespace (always),
//! `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT`, `<NAME>_SERVICE_PORT_<PORT NAME>` and
//! the Docker link variables `<NAME>_PORT…`. Mesh pods reach those addresses through
//! their agents (see `agent::egress`). Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;

/// The Service every pod learns of, whatever its namespace.
const MASTER_SERVICE: (&str, &str) = ("default", "kubernetes");

/// The variables for a pod in `namespace`, from `services` (all the cluster's, or at
/// least those of `namespace` and `default`).
pub fn service_env<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    namespace: &str,
    enable_service_links: bool,
) -> BTreeMap<String, String> {
    let mut chosen: BTreeMap<&str, &Service> = BTreeMap::new();
    for service in services {
        if cluster_ip(service).is_none() {
            continue;
        }
        let (Some(name), Some(ns)) = (
            service.metadata.name.as_deref(),
            service.metadata.namespace.as_deref(),
        ) else {
            continue;
        };
        if (ns, name) == MASTER_SERVICE {
            chosen.entry(name).or_insert(service);
        } else if ns == namespace && enable_service_links {
            chosen.insert(name, service);
        }
    }
    let mut env = BTreeMap::new();
    for (name, service) in chosen {
        add_service(&mut env, name, service);
    }
    env
}

/// The Service's ClusterIP, unless it has none ("None": headless; empty: ExternalName).
fn cluster_ip(service: &Service) -> Option<&str> {
    let ip = service.spec.as_ref()?.cluster_ip.as_deref()?;
    (!ip.is_empty() && ip != "None").then_some(ip)
}

fn variable_name(name: &str) -> String {
    name.replace('-', "_").to_uppercase()
}

fn add_service(env: &mut BTreeMap<String, String>, name: &str, service: &Service) {
    let (Some(ip), Some(spec)) = (cluster_ip(service), service.spec.as_ref()) else {
        return;
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    let Some(first) = ports.first() else {
        return;
    };
    let prefix = variable_name(name);
    env.insert(format!("{prefix}_SERVICE_HOST"), ip.to_owned());
    env.insert(format!("{prefix}_SERVICE_PORT"), first.port.to_string());
    for port in ports {
        if let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) {
            env.insert(
                format!("{prefix}_SERVICE_PORT_{}", variable_name(port_name)),
                port.port.to_string(),
            );
        }
    }
    // Docker link variables; Docker special-cases the first port.
    let host = |port: i32| match ip.contains(':') {
        true => format!("[{ip}]:{port}"),
        false => format!("{ip}:{port}"),
    };
    for (index, port) in ports.iter().enumerate() {
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        let url = format!("{}://{}", protocol.to_lowercase(), host(port.port));
        if index == 0 {
            env.insert(format!("{prefix}_PORT"), url.clone());
        }
        let port_prefix = format!("{prefix}_PORT_{}_{}", port.port, protocol.to_uppercase());
        env.insert(format!("{port_prefix}_PROTO"), protocol.to_lowercase());
        env.insert(format!("{port_prefix}_PORT"), port.port.to_string());
        env.insert(format!("{port_prefix}_ADDR"), ip.to_owned());
        env.insert(port_prefix, url);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("service")
    }

    #[test]
    fn variables_are_the_kubelets() {
        let services = [
            service("metadata: {name: kubernetes, namespace: default}\nspec: {clusterIP: 10.43.0.1, ports: [{name: https, port: 443, protocol: TCP}]}"),
            service("metadata: {name: redis-master, namespace: shop}\nspec: {clusterIP: 10.43.0.11, ports: [{port: 6379}, {name: metrics, port: 9121, protocol: UDP}]}"),
            service("metadata: {name: headless, namespace: shop}\nspec: {clusterIP: None, ports: [{port: 5432}]}"),
            service("metadata: {name: elsewhere, namespace: other}\nspec: {clusterIP: 10.43.0.12, ports: [{port: 80}]}"),
        ];
        let env = service_env(&services, "shop", true);
        let expected: BTreeMap<String, String> = [
            ("KUBERNETES_PORT", "tcp://10.43.0.1:443"),
            ("KUBERNETES_PORT_443_TCP", "tcp://10.43.0.1:443"),
            ("KUBERNETES_PORT_443_TCP_ADDR", "10.43.0.1"),
            ("KUBERNETES_PORT_443_TCP_PORT", "443"),
            ("KUBERNETES_PORT_443_TCP_PROTO", "tcp"),
            ("KUBERNETES_SERVICE_HOST", "10.43.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("KUBERNETES_SERVICE_PORT_HTTPS", "443"),
            ("REDIS_MASTER_PORT", "tcp://10.43.0.11:6379"),
            ("REDIS_MASTER_PORT_6379_TCP", "tcp://10.43.0.11:6379"),
            ("REDIS_MASTER_PORT_6379_TCP_ADDR", "10.43.0.11"),
            ("REDIS_MASTER_PORT_6379_TCP_PORT", "6379"),
            ("REDIS_MASTER_PORT_6379_TCP_PROTO", "tcp"),
            ("REDIS_MASTER_PORT_9121_UDP", "udp://10.43.0.11:9121"),
            ("REDIS_MASTER_PORT_9121_UDP_ADDR", "10.43.0.11"),
            ("REDIS_MASTER_PORT_9121_UDP_PORT", "9121"),
            ("REDIS_MASTER_PORT_9121_UDP_PROTO", "udp"),
            ("REDIS_MASTER_SERVICE_HOST", "10.43.0.11"),
            ("REDIS_MASTER_SERVICE_PORT", "6379"),
            ("REDIS_MASTER_SERVICE_PORT_METRICS", "9121"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(env, expected);
    }

    #[test]
    fn without_service_links_only_the_kubernetes_service_is_given() {
        let services = [
            service("metadata: {name: kubernetes, namespace: default}\nspec: {clusterIP: 10.43.0.1, ports: [{name: https, port: 443}]}"),
            service("metadata: {name: web, namespace: default}\nspec: {clusterIP: 10.43.0.7, ports: [{port: 80}]}"),
        ];
        let env = service_env(&services, "default", false);
        assert_eq!(
            env.get("KUBERNETES_SERVICE_HOST").map(String::as_str),
            Some("10.43.0.1")
        );
        assert!(!env.contains_key("WEB_SERVICE_HOST"), "{env:?}");
        let env = service_env(&services, "default", true);
        assert_eq!(env.get("WEB_SERVICE_PORT").map(String::as_str), Some("80"));
    }
}
