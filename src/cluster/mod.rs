//! The virtual node in Kubernetes: the connection to the API server, the Node object
//! and its Lease, the pods bound to the node, and their status and events.
//!
//! Each piece is its own task; the node loop sees them only through an [`ApiLink`].

pub mod events;
pub mod node_lease;
pub mod node_object;
pub mod object_cache;
pub mod pod_source;
pub mod pod_status;
pub mod service_gateway;
pub mod trust_secret;
pub mod watched;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::Ipv4Net;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warp::http::header::{HeaderValue, USER_AGENT};

use crate::gateway::Gateway;
use crate::health::Check;
use crate::node::desired::DesiredStore;
use crate::node::ApiLink;
use crate::node::ApiNetwork;
use node_object::NodeIdentity;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("invalid Kubernetes client configuration")]
    Config(#[from] kube::config::KubeconfigError),
    #[error("invalid in-cluster configuration")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("Kubernetes API request failed")]
    Client(#[source] kube::Error),
    #[error("kube-system/extension-apiserver-authentication has no client-ca-file")]
    NoClientCa,
    #[error(
        "Node {name} already exists and BeeMesh did not register it (it lacks the label \
         {label}=true): refusing to take it over, which would move its pods to the mesh; \
         choose another --node-name, or delete that Node if it is a leftover",
        label = node_object::MESH_LABEL
    )]
    ForeignNode { name: String },
}

/// Where the API server's address and credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    InCluster,
    Kubeconfig(PathBuf),
}

/// The kubeconfig to use: `--kubeconfig`, else in-cluster when running in a pod, else
/// KUBECONFIG, else ~/.kube/config when it exists (unless `explicit_only`: standalone
/// pods are then the node's only source unless a cluster is named).
pub fn config_source(
    flag: Option<&Path>,
    explicit_only: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<ConfigSource> {
    if let Some(path) = flag {
        return Some(ConfigSource::Kubeconfig(path.to_path_buf()));
    }
    if env("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty()) {
        return Some(ConfigSource::InCluster);
    }
    if let Some(path) = env("KUBECONFIG").filter(|p| !p.is_empty()) {
        // The first file of a list, as kubectl merges them with the first winning.
        let first = path.split(':').find(|p| !p.is_empty()).unwrap_or_default();
        return Some(ConfigSource::Kubeconfig(first.into()));
    }
    if explicit_only {
        return None;
    }
    let home = env("HOME")?;
    let default = Path::new(&home).join(".kube/config");
    default
        .is_file()
        .then_some(ConfigSource::Kubeconfig(default))
}

pub async fn connect(source: &ConfigSource) -> Result<Client, ClusterError> {
    Client::try_from(config(source).await?).map_err(ClusterError::Client)
}

/// The client configuration `source` names, with BeeMesh's User-Agent.
pub async fn config(source: &ConfigSource) -> Result<kube::Config, ClusterError> {
    let mut config = match source {
        ConfigSource::InCluster => kube::Config::incluster()?,
        ConfigSource::Kubeconfig(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).map_err(|source| ClusterError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
    };
    // Named as the kubelet names itself, so that audit logs tell the node's requests apart.
    let agent = format!(
        "beemesh/{} ({}/{})",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    if let Ok(value) = HeaderValue::try_from(agent) {
        config.headers.push((USER_AGENT, value));
    }
    Ok(config)
}

/// The CA that signs the API server's client certificates (what it presents to
/// kubelets), as published in kube-system/extension-apiserver-authentication.
pub async fn client_ca(client: &Client) -> Result<String, ClusterError> {
    let config_maps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), "kube-system");
    let published = config_maps
        .get("extension-apiserver-authentication")
        .await
        .map_err(ClusterError::Client)?;
    published
        .data
        .and_then(|mut data| data.remove("client-ca-file"))
        .ok_or(ClusterError::NoClientCa)
}

/// Refuses a node name that a Node BeeMesh did not register already has (a typo of a
/// real node's name would otherwise take that node over and its pods with it). Returns
/// the pod CIDRs the cluster gave the node's Node, if it exists: parts of the
/// cluster's pod CIDR, which the mesh pod CIDR must be apart from.
pub async fn check_node_name(client: &Client, name: &str) -> Result<Vec<Ipv4Net>, ClusterError> {
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    match nodes.get_opt(name).await.map_err(ClusterError::Client)? {
        Some(node) if !node_object::is_ours(&node) => Err(ClusterError::ForeignNode {
            name: name.to_string(),
        }),
        Some(node) => Ok(node_object::pod_cidrs(&node)),
        None => Ok(Vec::new()),
    }
}

/// How the node's Kubernetes side behaves.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Delete the Node object on exit instead of leaving it NotReady.
    pub delete_node_on_exit: bool,
    /// The node relays its pods' DNS queries to the cluster's DNS.
    pub relays_cluster_dns: bool,
}

/// Starts the node's Kubernetes tasks; they stop when `cancel` fires (the node then
/// marks itself NotReady or deletes itself). `lease_check` passes while the Node is
/// registered and its Lease renewed. `tunnel_sessions` counts the k3s agent tunnel
/// sessions up (see `kubelet::tunnel`). With a `gateway`, the Services that select the
/// node's pods are served through it.
pub fn start(
    client: Client,
    identity: NodeIdentity,
    tunnel_sessions: watch::Receiver<usize>,
    options: Options,
    lease_check: Check,
    gateway: Option<Gateway>,
    cancel: CancellationToken,
) -> (ApiLink, Vec<JoinHandle<()>>) {
    let board = Arc::new(pod_status::StatusBoard::default());
    let recorder = events::EventRecorder::new(client.clone(), identity.name.clone());
    let pods = Arc::new(DesiredStore::default());
    let (agents_tx, agents_rx) = watch::channel(Default::default());
    // The Services, watched once: for the gateway, and for the pods' environment.
    let services_changed = Arc::new(tokio::sync::Notify::new());
    let services = watched::watch_into_store::<k8s_openapi::api::core::v1::Service>(
        kube::Api::all(client.clone()),
        kube::runtime::watcher::Config::default(),
        services_changed.clone(),
        cancel.clone(),
    );
    // The NetworkPolicies the node's routes and gateway obey, and the namespaces'
    // labels their namespaceSelectors match; a change makes the gateway look again.
    let network = ApiNetwork {
        services: services.clone(),
        // The Services' endpoints in the cluster, for how often a mesh pod's connection
        // goes straight to a mesh endpoint (node/route.rs).
        slices: watched::watch_into_store(
            kube::Api::all(client.clone()),
            kube::runtime::watcher::Config::default().labels(&format!(
                "{}!={}",
                crate::gateway::endpoints::MANAGED_BY_LABEL,
                crate::gateway::endpoints::MANAGED_BY
            )),
            services_changed.clone(),
            cancel.clone(),
        ),
        policies: watched::watch_into_store(
            kube::Api::all(client.clone()),
            kube::runtime::watcher::Config::default(),
            services_changed.clone(),
            cancel.clone(),
        ),
        namespaces: watched::watch_into_store(
            kube::Api::all(client.clone()),
            kube::runtime::watcher::Config::default(),
            services_changed.clone(),
            cancel.clone(),
        ),
    };
    let mut tasks = Vec::new();
    if let Some(gateway) = gateway {
        tasks.push(tokio::spawn(service_gateway::run(
            client.clone(),
            identity.name.clone(),
            gateway,
            recorder.clone(),
            (services.clone(), services_changed),
            network.clone(),
            cancel.clone(),
        )));
    }
    tasks.extend([
        tokio::spawn(node_lease::run(
            client.clone(),
            identity.clone(),
            agents_rx,
            tunnel_sessions,
            options.delete_node_on_exit,
            lease_check,
            cancel.clone(),
        )),
        tokio::spawn(pod_source::run(
            client.clone(),
            identity.name.clone(),
            board.clone(),
            recorder.clone(),
            pods.clone(),
            pod_source::PodNetworkView {
                services,
                relays_dns: options.relays_cluster_dns,
            },
            cancel.clone(),
        )),
        tokio::spawn(pod_status::run(client, board.clone(), recorder, cancel)),
    ]);
    let link = ApiLink {
        pods,
        sink: Box::new(pod_status::ApiStatusSink(board)),
        agents: agents_tx,
        network: Some(network),
    };
    (link, tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_comes_from_the_flag_the_pod_or_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let flag = Path::new("/etc/k.yaml");
        assert_eq!(
            config_source(
                Some(flag),
                true,
                &env(&[("KUBERNETES_SERVICE_HOST", "10.43.0.1")])
            ),
            Some(ConfigSource::Kubeconfig(flag.into()))
        );
        assert_eq!(
            config_source(
                None,
                true,
                &env(&[("KUBERNETES_SERVICE_HOST", "10.43.0.1")])
            ),
            Some(ConfigSource::InCluster)
        );
        assert_eq!(
            config_source(None, true, &env(&[("KUBECONFIG", "/a:/b")])),
            Some(ConfigSource::Kubeconfig("/a".into()))
        );
        let home = tempfile::tempdir().expect("home");
        std::fs::create_dir(home.path().join(".kube")).expect("dir");
        std::fs::write(home.path().join(".kube/config"), "").expect("file");
        let home_path = home.path().to_string_lossy().into_owned();
        let with_home = move |name: &str| (name == "HOME").then(|| home_path.clone());
        // Standalone pods and only a default kubeconfig: no cluster unless named.
        assert_eq!(config_source(None, true, &with_home), None);
        assert_eq!(
            config_source(None, false, &with_home),
            Some(ConfigSource::Kubeconfig(home.path().join(".kube/config")))
        );
        assert_eq!(config_source(None, false, &env(&[])), None);
    }
}
