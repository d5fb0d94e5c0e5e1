//! The Helm chart against the real binary: every flag the chart's Deployment passes is
//! one `beemesh node --help` lists and the node's own command line accepts, for the
//! default values and for values that take every optional branch; and the identity key
//! the chart generates is one the node loads. Needs helm (bash hack/install-helm.sh).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use serde_json::Value;

use beemesh::cli::{Cli, Command as BeemeshCommand};

fn chart_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/charts/beemesh"))
}

/// `helm template` with a values file; every rendered object.
fn render(values: &Path) -> Vec<Value> {
    let values = values.display().to_string();
    let text = common::helm_template(&["--values", &values]);
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| <Value as serde::Deserialize>::deserialize(document).expect("yaml"))
        .filter(|value| !value.is_null())
        .collect()
}

fn object<T: serde::de::DeserializeOwned>(objects: &[Value], kind: &str) -> Option<T> {
    let found = objects.iter().find(|o| o["kind"] == kind)?;
    Some(serde_json::from_value(found.clone()).expect(kind))
}

fn named<T: serde::de::DeserializeOwned>(objects: &[Value], kind: &str, name: &str) -> Option<T> {
    let found = objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)?;
    Some(serde_json::from_value(found.clone()).expect(kind))
}

/// charts/beemesh/ci/*.yaml: the defaults and values that take every optional branch.
fn values_files() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("charts/beemesh/ci")
        .map(|entry| entry.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    files
}

/// The long flags `beemesh node --help` lists.
fn node_help_flags() -> Vec<String> {
    let out = Command::new(common::bin())
        .args(["node", "--help"])
        .output()
        .expect("beemesh node --help");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with("--"))
        .map(|word| word.trim_end_matches([',', '.']).to_string())
        .map(|word| word.split('=').next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn every_flag_the_chart_passes_is_one_the_node_accepts() {
    let help = node_help_flags();
    assert!(help.iter().any(|f| f == "--kubelet-port"), "{help:?}");
    for values in values_files() {
        let deployment: Deployment = object(&render(&values), "Deployment").expect("a Deployment");
        let pod = deployment.spec.template.spec.expect("pod");
        let container = &pod.containers[0];
        let args = container.args.clone().expect("args");
        assert_eq!(args[0], "node", "{}", values.display());
        for arg in args.iter().filter(|a| a.starts_with("--")) {
            let flag = arg.split('=').next().unwrap_or_default();
            assert!(
                help.iter().any(|f| f == flag),
                "{}: the chart passes {flag}, which `beemesh node --help` does not list",
                values.display()
            );
        }
        // The values too: the whole command line parses as the binary would parse it.
        let parsed = Cli::try_parse_from(std::iter::once("beemesh".to_string()).chain(args));
        match parsed {
            Ok(cli) => assert!(matches!(cli.command, BeemeshCommand::Node(_))),
            Err(e) => panic!(
                "{}: the node refuses the chart's flags: {e}",
                values.display()
            ),
        }
        // Probes go to the health endpoint the chart enables, on a declared port.
        let healthz = args_value(container.args.as_deref(), "--healthz-addr").expect("healthz");
        let port = healthz.rsplit(':').next().expect("port");
        let ports = container.ports.clone().unwrap_or_default();
        let named = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("healthz"))
            .expect("a healthz port");
        assert_eq!(named.container_port.to_string(), port);
        for (probe, path) in [
            (&container.liveness_probe, "/healthz"),
            (&container.readiness_probe, "/readyz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .expect("probe");
            assert_eq!(get.path.as_deref(), Some(path));
        }
    }
}

fn args_value(args: Option<&[String]>, flag: &str) -> Option<String> {
    args?
        .iter()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")).map(str::to_owned))
}

#[test]
fn the_identity_key_the_chart_generates_is_one_the_node_loads() {
    let values = chart_dir().join("ci/default-values.yaml");
    let objects = render(&values);
    let secret: Secret =
        named(&objects, "Secret", "beemesh-identity").expect("the identity Secret");
    let key = secret
        .data
        .and_then(|mut data| data.remove("identity.key"))
        .expect("identity.key");
    // Mounted as the Deployment mounts it: mode 0440, readable by the pod's fsGroup.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("identity.key");
    std::fs::write(&path, &key.0).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).expect("chmod");
    let keypair = beemesh::trust::load_identity_file(&path).expect("the node loads the key");
    // `beemesh id` tells the peer ID the node will have (for agents' --trust).
    let out = Command::new(common::bin())
        .args(["id", "--identity-key-file"])
        .arg(&path)
        .output()
        .expect("beemesh id runs");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        keypair.public().to_peer_id().to_string()
    );
}

#[test]
fn the_join_token_the_chart_generates_is_one_agents_take_and_the_node_may_use_its_secret() {
    let values = chart_dir().join("ci/default-values.yaml");
    let objects = render(&values);
    let secret: Secret = named(&objects, "Secret", "beemesh-trust").expect("the trust Secret");
    let token = secret
        .data
        .and_then(|mut data| data.remove("join-token"))
        .expect("join-token");
    let token = String::from_utf8(token.0).expect("utf-8");
    token
        .parse::<beemesh::trust::join::JoinToken>()
        .expect("a join token agents accept");
    // Tokens differ from one install to the next.
    let again: Secret = named(&render(&values), "Secret", "beemesh-trust").expect("again");
    assert_ne!(again.data.expect("data")["join-token"].0, token.as_bytes());
    // The node is pointed at that Secret, and its Role lets it read and update that one.
    let text = serde_json::to_string(&objects).expect("json");
    assert!(
        text.contains("\"BEEMESH_TRUST_SECRET\",\"value\":\"beemesh/beemesh-trust\""),
        "{text}"
    );
    let role = objects
        .iter()
        .find(|o| o["kind"] == "Role" && o["metadata"]["name"] == "beemesh-trust")
        .expect("the trust Role");
    assert_eq!(role["rules"][0]["resourceNames"][0], "beemesh-trust");
    assert_eq!(
        role["rules"][0]["verbs"],
        serde_json::json!(["get", "update"])
    );
}

#[test]
fn the_private_mesh_key_the_chart_generates_is_one_peers_load() {
    let objects = render(&chart_dir().join("ci/private-mesh-values.yaml"));
    let secret: Secret = named(&objects, "Secret", "beemesh-trust").expect("the trust Secret");
    let key = secret
        .data
        .and_then(|mut data| data.remove("swarm.key"))
        .expect("swarm.key");
    // Mounted as the Deployment mounts it: mode 0440.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("swarm.key");
    std::fs::write(&path, &key.0).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).expect("chmod");
    beemesh::trust::load_psk_file(&path).expect("a pre-shared key the mesh loads");
}

/// The k3s tunnel's client certificate is approved by the cluster's approver (the
/// nodeclient ClusterRole); `approve` on its signer only when self-approval is asked for.
#[test]
fn the_tunnel_is_approved_by_the_cluster_unless_self_approval_is_asked_for() {
    let signers = |objects: &[Value]| -> Vec<String> {
        let role = objects
            .iter()
            .find(|o| o["kind"] == "ClusterRole")
            .expect("the node's ClusterRole");
        role["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .filter(|rule| rule["resources"][0] == "signers")
            .flat_map(|rule| {
                rule["resourceNames"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|name| name.as_str().map(str::to_string))
            .collect()
    };
    let defaults = render(&chart_dir().join("ci/default-values.yaml"));
    assert_eq!(signers(&defaults), ["kubernetes.io/kubelet-serving"]);
    let binding = defaults
        .iter()
        .find(|o| {
            o["kind"] == "ClusterRoleBinding" && o["metadata"]["name"] == "beemesh-nodeclient"
        })
        .expect("the nodeclient binding");
    assert_eq!(
        binding["roleRef"]["name"],
        "system:certificates.k8s.io:certificatesigningrequests:nodeclient"
    );
    assert_eq!(binding["subjects"][0]["name"], "beemesh");
    let text = serde_json::to_string(&defaults).expect("json");
    assert!(text.contains("\"--k3s-tunnel=auto\""), "{text}");
    // The API servers' addresses: the one Endpoints object, read-only.
    let apiservers = defaults
        .iter()
        .find(|o| o["kind"] == "Role" && o["metadata"]["name"] == "beemesh-apiservers")
        .expect("the apiservers Role");
    assert_eq!(apiservers["metadata"]["namespace"], "default");
    assert_eq!(
        apiservers["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["endpoints"], "resourceNames": ["kubernetes"], "verbs": ["get"]}])
    );
    let asked = render(&chart_dir().join("ci/tunnel-self-approve-values.yaml"));
    assert_eq!(
        signers(&asked),
        [
            "kubernetes.io/kubelet-serving",
            "kubernetes.io/kube-apiserver-client-kubelet"
        ]
    );
}
