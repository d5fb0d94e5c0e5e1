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

/// `helm template` with extra arguments; every rendered object.
fn render_args(args: &[&str]) -> Vec<Value> {
    let text = common::helm_template(args);
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| <Value as serde::Deserialize>::deserialize(document).expect("yaml"))
        .filter(|value| !value.is_null())
        .collect()
}

fn kinds<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// Every rule of the objects of `kind`, with the object's namespace.
fn rules<'a>(objects: &'a [Value], kind: &str) -> Vec<(String, &'a Value)> {
    kinds(objects, kind)
        .into_iter()
        .flat_map(|role| {
            let namespace = role["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            role["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |rule| (namespace.clone(), rule))
        })
        .collect()
}

fn grants(rule: &Value, resource: &str) -> bool {
    strings(&rule["resources"])
        .iter()
        .any(|r| r == resource || r == "*")
}

/// Least privilege, as rendered: the node's own Node and Lease by name, pods' configMaps,
/// secrets and tokens only in the served namespaces (cluster-wide only with "*").
#[test]
fn the_node_may_write_its_own_node_and_lease_only_and_read_only_served_namespaces() {
    let defaults = render(&chart_dir().join("ci/default-values.yaml"));
    // Nothing cluster-wide on configMaps, secrets or tokens.
    for (_, rule) in rules(&defaults, "ClusterRole") {
        for resource in [
            "secrets",
            "configmaps",
            "serviceaccounts/token",
            "serviceaccounts",
        ] {
            assert!(!grants(rule, resource), "cluster-wide {resource}: {rule}");
        }
        assert!(
            !strings(&rule["verbs"]).contains(&"*".to_string()),
            "{rule}"
        );
    }
    // Nodes: create (RBAC cannot name it), everything else on its own Node only; never
    // listed or watched; delete only with deleteNodeOnExit.
    let node_rules: Vec<&Value> = rules(&defaults, "ClusterRole")
        .into_iter()
        .map(|(_, rule)| rule)
        .filter(|rule| grants(rule, "nodes") || grants(rule, "nodes/status"))
        .collect();
    assert_eq!(node_rules.len(), 3, "{node_rules:?}");
    for rule in &node_rules {
        let verbs = strings(&rule["verbs"]);
        assert!(
            !verbs
                .iter()
                .any(|v| v == "list" || v == "watch" || v == "delete"),
            "{rule}"
        );
        if verbs == ["create"] {
            assert!(rule["resourceNames"].is_null(), "{rule}");
        } else {
            assert_eq!(strings(&rule["resourceNames"]), ["beemesh"], "{rule}");
        }
    }
    // Its Lease in kube-node-lease: patch by name, create (unnameable) in that namespace.
    let lease: Vec<(String, &Value)> = rules(&defaults, "Role")
        .into_iter()
        .filter(|(_, rule)| grants(rule, "leases"))
        .collect();
    assert!(
        lease.iter().all(|(ns, _)| ns == "kube-node-lease"),
        "{lease:?}"
    );
    assert!(lease
        .iter()
        .any(|(_, r)| strings(&r["verbs"]) == ["create"] && r["resourceNames"].is_null()));
    assert!(lease
        .iter()
        .any(|(_, r)| strings(&r["verbs"]) == ["patch"]
            && strings(&r["resourceNames"]) == ["beemesh"]));
    assert!(rules(&defaults, "ClusterRole")
        .iter()
        .all(|(_, r)| !grants(r, "leases")));
    // The client CA: one ConfigMap of kube-system.
    let client_ca = named::<Value>(&defaults, "Role", "beemesh-client-ca").expect("client-ca Role");
    assert_eq!(client_ca["metadata"]["namespace"], "kube-system");
    assert_eq!(
        strings(&client_ca["rules"][0]["resourceNames"]),
        ["extension-apiserver-authentication"]
    );
    // The served namespace (default): list and watch (by name, each object the pods
    // refer to) on configMaps and secrets, tokens; bound to the node's ServiceAccount.
    let served = |objects: &[Value]| -> Vec<String> {
        rules(objects, "Role")
            .into_iter()
            .filter(|(_, rule)| grants(rule, "secrets") && rule["resourceNames"].is_null())
            .map(|(ns, rule)| {
                assert_eq!(strings(&rule["verbs"]), ["list", "watch"], "{rule}");
                ns
            })
            .collect()
    };
    assert_eq!(served(&defaults), ["default"]);
    let pods_role = named::<Value>(&defaults, "Role", "beemesh-pods").expect("pods Role");
    assert!(pods_role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .any(|r| strings(&r["resources"]) == ["serviceaccounts/token"]
            && strings(&r["verbs"]) == ["create"]));
    let binding = named::<Value>(&defaults, "RoleBinding", "beemesh-pods").expect("binding");
    assert_eq!(binding["metadata"]["namespace"], "default");
    assert_eq!(binding["roleRef"]["name"], "beemesh-pods");
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "beemesh", "namespace": "beemesh"}])
    );
    // Pods: list and watch (a field selector RBAC cannot check), delete, status patch;
    // never update or create.
    let pod_verbs: Vec<String> = rules(&defaults, "ClusterRole")
        .into_iter()
        .filter(|(_, r)| grants(r, "pods"))
        .flat_map(|(_, r)| strings(&r["verbs"]))
        .collect();
    assert_eq!(pod_verbs, ["list", "watch", "delete"]);

    // Two namespaces: a Role in each; with deleteNodeOnExit, delete on its own Node.
    let two = render(&chart_dir().join("ci/served-namespaces-values.yaml"));
    assert_eq!(served(&two), ["default", "team-a"]);
    assert!(rules(&two, "ClusterRole")
        .iter()
        .any(|(_, r)| grants(r, "nodes")
            && strings(&r["verbs"]).contains(&"delete".to_string())
            && strings(&r["resourceNames"]) == ["beemesh"]));
    // "*": one ClusterRole for every namespace, and no Roles.
    let all = render(&chart_dir().join("ci/all-namespaces-values.yaml"));
    assert!(served(&all).is_empty());
    let cluster_wide: Vec<&Value> = kinds(&all, "ClusterRole")
        .into_iter()
        .filter(|r| {
            r["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|rule| grants(rule, "secrets"))
        })
        .collect();
    assert_eq!(cluster_wide.len(), 1);
    assert_eq!(cluster_wide[0]["metadata"]["name"], "beemesh-pods");
    assert!(named::<Value>(&all, "ClusterRoleBinding", "beemesh-pods").is_some());
    // rbac.create=false: no RBAC object at all.
    let none = render(&chart_dir().join("ci/nondefault-values.yaml"));
    assert!(none
        .iter()
        .all(|o| !o["kind"].as_str().unwrap_or_default().contains("Role")));
}

/// The values schema refuses what RBAC could not take.
#[test]
fn the_schema_checks_served_namespaces_and_the_admission_policy_value() {
    let chart = chart_dir().display().to_string();
    for bad in [
        "servedNamespaces={Bad_Namespace}",
        "servedNamespaces=null",
        "servedNamespaces={}",
        "admissionPolicy.enabled=maybe",
        "admissionPolicy.unknown=true",
    ] {
        let out = Command::new("helm")
            .args(["template", "beemesh", &chart, "--set", bad])
            .output()
            .expect("helm");
        assert!(!out.status.success(), "{bad} accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("values don't meet the specifications of the schema"),
            "{bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

const VAP_API: &str = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy";

/// The admission policy only where the API server has ValidatingAdmissionPolicy (1.30+).
#[test]
fn the_admission_policy_is_installed_only_where_the_api_exists() {
    let without = render_args(&[]);
    assert!(kinds(&without, "ValidatingAdmissionPolicy").is_empty());
    assert!(kinds(&without, "ValidatingAdmissionPolicyBinding").is_empty());
    // The group/version alone (what `helm template` assumes by default) is not enough.
    let group_only = render_args(&["--api-versions", "admissionregistration.k8s.io/v1"]);
    assert!(kinds(&group_only, "ValidatingAdmissionPolicy").is_empty());
    let with = render_args(&["--api-versions", VAP_API]);
    let policy = named::<Value>(
        &with,
        "ValidatingAdmissionPolicy",
        "beemesh-node-restriction",
    )
    .expect("the policy");
    assert_eq!(policy["apiVersion"], "admissionregistration.k8s.io/v1");
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    assert_eq!(
        policy["spec"]["matchConditions"][0]["expression"],
        "request.userInfo.username == 'system:serviceaccount:beemesh:beemesh'"
    );
    let binding = named::<Value>(
        &with,
        "ValidatingAdmissionPolicyBinding",
        "beemesh-node-restriction",
    )
    .expect("the binding");
    assert_eq!(binding["spec"]["policyName"], "beemesh-node-restriction");
    assert_eq!(
        binding["spec"]["validationActions"],
        serde_json::json!(["Deny"])
    );
    // Turned off: none, API or not.
    let off = render_args(&[
        "--api-versions",
        VAP_API,
        "--set",
        "admissionPolicy.enabled=false",
    ]);
    assert!(kinds(&off, "ValidatingAdmissionPolicy").is_empty());
    // The plain manifests ship it as a separate file for 1.30+ clusters.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("manifests/install/beemesh-admission-policy.yaml"),
    )
    .expect("manifests/install/beemesh-admission-policy.yaml");
    assert!(shipped.contains("kind: ValidatingAdmissionPolicyBinding"));
    let plain = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/install/beemesh.yaml"),
    )
    .expect("manifests/install/beemesh.yaml");
    assert!(
        !plain.contains("kind: ValidatingAdmissionPolicy"),
        "beemesh.yaml must apply on 1.21"
    );
}

/// One admission request as a ValidatingAdmissionPolicy sees it: `request` with the
/// AdmissionRequest's fields (subResource absent for the main resource: omitempty),
/// `object` (null on DELETE) and `oldObject` (null on CREATE).
struct Admission {
    user: &'static str,
    operation: &'static str,
    group: &'static str,
    resource: &'static str,
    sub: Option<&'static str>,
    namespace: &'static str,
    object: Value,
    old: Value,
}

const NODE_USER: &str = "system:serviceaccount:beemesh:beemesh";

impl Admission {
    fn new(operation: &'static str, resource: &'static str, object: Value, old: Value) -> Self {
        let (resource, sub) = match resource.split_once('/') {
            Some((resource, sub)) => (resource, Some(sub)),
            None => (resource, None),
        };
        Admission {
            user: NODE_USER,
            operation,
            group: match resource {
                "leases" => "coordination.k8s.io",
                "endpointslices" => "discovery.k8s.io",
                _ => "",
            },
            resource,
            sub,
            namespace: match resource {
                "nodes" => "",
                "leases" => "kube-node-lease",
                _ => "default",
            },
            object,
            old,
        }
    }

    fn by(self, user: &'static str) -> Self {
        Admission { user, ..self }
    }

    fn request(&self) -> Value {
        let name = [&self.object, &self.old]
            .iter()
            .find_map(|o| o["metadata"]["name"].as_str())
            .unwrap_or_default()
            .to_string();
        let mut request = serde_json::json!({
            "kind": {"group": self.group, "version": "v1", "kind": "X"},
            "resource": {"group": self.group, "version": "v1", "resource": self.resource},
            "name": name,
            "operation": self.operation,
            "userInfo": {"username": self.user, "groups": ["system:serviceaccounts", "system:authenticated"]},
        });
        if let Some(sub) = self.sub {
            request["subResource"] = sub.into();
        }
        if !self.namespace.is_empty() {
            request["namespace"] = self.namespace.into();
        }
        request
    }
}

/// Whether one of the policy's resourceRules matches.
fn policy_matches(policy: &Value, a: &Admission) -> bool {
    let resource = match a.sub {
        Some(sub) => format!("{}/{sub}", a.resource),
        None => a.resource.to_string(),
    };
    policy["spec"]["matchConstraints"]["resourceRules"]
        .as_array()
        .expect("resourceRules")
        .iter()
        .any(|rule| {
            strings(&rule["apiGroups"]).iter().any(|g| g == a.group)
                && strings(&rule["operations"])
                    .iter()
                    .any(|o| o == a.operation)
                && strings(&rule["resources"]).contains(&resource)
        })
}

/// The policy's answer: Ok if admitted, Err with the first failed validation's message.
/// An expression that cannot be evaluated fails the test: on a cluster it would refuse
/// the request (failurePolicy Fail) for a reason nobody meant. cel-interpreter is not
/// Kubernetes' cel-go, but stricter where it matters here: `&&` and `||` stop at the
/// first operand that decides (cel-go also forgives an error on the other side), and a
/// missing field is an error in both. Where it is laxer (a map index of a missing key
/// is null, an error in cel-go; `has()` on null is false), the expressions test
/// `key in map` first and never look into a null object.
fn admit(policy: &Value, a: &Admission) -> Result<(), String> {
    if !policy_matches(policy, a) {
        return Ok(());
    }
    let mut context = cel_interpreter::Context::default();
    context
        .add_variable("request", a.request())
        .expect("request");
    context
        .add_variable("object", a.object.clone())
        .expect("object");
    context
        .add_variable("oldObject", a.old.clone())
        .expect("oldObject");
    let evaluate = |expression: &str| -> bool {
        let program = cel_interpreter::Program::compile(expression)
            .unwrap_or_else(|e| panic!("{expression}: {e:?}"));
        match program.execute(&context) {
            Ok(cel_interpreter::Value::Bool(b)) => b,
            other => panic!("{expression} on {}: {other:?}", a.request()),
        }
    };
    let conditions = policy["spec"]["matchConditions"]
        .as_array()
        .expect("matchConditions");
    if !conditions
        .iter()
        .all(|c| evaluate(c["expression"].as_str().expect("expression")))
    {
        return Ok(());
    }
    for validation in policy["spec"]["validations"]
        .as_array()
        .expect("validations")
    {
        assert_eq!(validation["reason"], "Forbidden");
        if !evaluate(validation["expression"].as_str().expect("expression")) {
            return Err(validation["message"].as_str().expect("message").to_string());
        }
    }
    Ok(())
}

fn pod(node: Option<&str>, labels: Value) -> Value {
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default", "uid": "u1", "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running"}
    });
    if let Some(node) = node {
        pod["spec"]["nodeName"] = node.into();
    }
    pod
}

fn node(name: &str, tainted: bool, labels: Value) -> Value {
    let mut node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}
    });
    if tainted {
        node["spec"]["taints"] = serde_json::json!([
            {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"},
            {"key": "virtual-kubelet.io/provider", "value": "beemesh", "effect": "NoSchedule"}
        ]);
    }
    node
}

/// The policy's CEL, evaluated: what the node does is admitted, what NodeRestriction
/// refuses a kubelet is refused the node, other users are left alone.
#[test]
fn the_admission_policy_admits_what_the_node_does_and_refuses_the_rest() {
    use serde_json::json;
    let objects = render_args(&["--api-versions", VAP_API]);
    let policy = named::<Value>(
        &objects,
        "ValidatingAdmissionPolicy",
        "beemesh-node-restriction",
    )
    .expect("the policy");
    let null = Value::Null;
    let ours = json!({"type": "virtual-kubelet", "kubernetes.io/hostname": "beemesh", "beemesh.io/mesh": "true"});
    let denied = |a: Admission, why: &str| {
        let answer = admit(&policy, &a);
        assert!(
            answer.as_ref().is_err_and(|m| m.contains(why)),
            "{} {}{} should be refused ({why}): {answer:?}",
            a.operation,
            a.resource,
            a.sub.map(|s| format!("/{s}")).unwrap_or_default()
        );
    };
    let admitted = |a: Admission| {
        let answer = admit(&policy, &a);
        assert!(answer.is_ok(), "{} {}: {answer:?}", a.operation, a.resource);
    };

    // Pods: delete and status writes of pods bound to this node only.
    admitted(Admission::new(
        "DELETE",
        "pods",
        null.clone(),
        pod(Some("beemesh"), json!({"app": "web"})),
    ));
    denied(
        Admission::new(
            "DELETE",
            "pods",
            null.clone(),
            pod(Some("worker-1"), json!({})),
        ),
        "pods bound to it",
    );
    denied(
        Admission::new("DELETE", "pods", null.clone(), pod(None, json!({}))),
        "pods bound to it",
    );
    let mut running = pod(Some("beemesh"), json!({"app": "web"}));
    running["status"]["phase"] = "Succeeded".into();
    admitted(Admission::new(
        "UPDATE",
        "pods/status",
        running.clone(),
        pod(Some("beemesh"), json!({"app": "web"})),
    ));
    let unlabelled = |node| {
        let mut pod = pod(node, json!({}));
        pod["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove("labels");
        pod
    };
    admitted(Admission::new(
        "UPDATE",
        "pods/status",
        unlabelled(Some("beemesh")),
        unlabelled(Some("beemesh")),
    ));
    denied(
        Admission::new(
            "UPDATE",
            "pods/status",
            pod(Some("beemesh"), json!({"app": "db"})),
            pod(Some("beemesh"), json!({"app": "web"})),
        ),
        "labels",
    );
    denied(
        Admission::new(
            "UPDATE",
            "pods/status",
            pod(Some("beemesh"), json!({"app": "web"})),
            unlabelled(Some("beemesh")),
        ),
        "labels",
    );
    // A stateful workload's pod: its group role, and only that, changes.
    for (old, new) in [
        (
            json!({"app": "db"}),
            json!({"app": "db", "beemesh.io/group-role": "leader"}),
        ),
        (
            json!({"app": "db", "beemesh.io/group-role": "leader"}),
            json!({"app": "db", "beemesh.io/group-role": "follower"}),
        ),
        (
            json!({"app": "db", "beemesh.io/group-role": "follower"}),
            json!({"app": "db"}),
        ),
    ] {
        admitted(Admission::new(
            "UPDATE",
            "pods/status",
            pod(Some("beemesh"), new),
            pod(Some("beemesh"), old),
        ));
    }
    admitted(Admission::new(
        "UPDATE",
        "pods/status",
        pod(Some("beemesh"), json!({"beemesh.io/group-role": "leader"})),
        unlabelled(Some("beemesh")),
    ));
    denied(
        Admission::new(
            "UPDATE",
            "pods/status",
            pod(
                Some("beemesh"),
                json!({"app": "web", "beemesh.io/group-role": "leader"}),
            ),
            pod(Some("beemesh"), json!({"app": "db"})),
        ),
        "labels",
    );
    denied(
        Admission::new(
            "UPDATE",
            "pods/status",
            pod(
                Some("beemesh"),
                json!({"beemesh.io/group-role": "leader", "x": "1"}),
            ),
            pod(Some("beemesh"), json!({})),
        ),
        "labels",
    );
    denied(
        Admission::new(
            "UPDATE",
            "pods/status",
            running,
            pod(Some("worker-1"), json!({"app": "web"})),
        ),
        "pods bound to it",
    );
    denied(
        Admission::new(
            "UPDATE",
            "pods",
            pod(Some("worker-1"), json!({})),
            pod(Some("worker-1"), json!({})),
        ),
        "pods bound to it",
    );
    // Anyone else: not this policy's business.
    admitted(
        Admission::new(
            "DELETE",
            "pods",
            null.clone(),
            pod(Some("worker-1"), json!({})),
        )
        .by("system:serviceaccount:kube-system:generic-garbage-collector"),
    );
    admitted(
        Admission::new(
            "CREATE",
            "nodes",
            node("worker-2", false, json!({})),
            null.clone(),
        )
        .by("system:node:worker-2"),
    );

    // Nodes: its own only, created with its taint, which it never removes.
    admitted(Admission::new(
        "CREATE",
        "nodes",
        node("beemesh", true, ours.clone()),
        null.clone(),
    ));
    denied(
        Admission::new(
            "CREATE",
            "nodes",
            node("worker-2", true, ours.clone()),
            null.clone(),
        ),
        "another Node",
    );
    denied(
        Admission::new(
            "CREATE",
            "nodes",
            node("beemesh", false, ours.clone()),
            null.clone(),
        ),
        "keep its taint",
    );
    admitted(Admission::new(
        "UPDATE",
        "nodes",
        node("beemesh", true, ours.clone()),
        node("beemesh", true, ours.clone()),
    ));
    // Taking over a Node it registered before its taint existed: adds the taint.
    admitted(Admission::new(
        "UPDATE",
        "nodes",
        node("beemesh", true, ours.clone()),
        node("beemesh", false, ours.clone()),
    ));
    denied(
        Admission::new(
            "UPDATE",
            "nodes",
            node("beemesh", false, ours.clone()),
            node("beemesh", true, ours.clone()),
        ),
        "keep its taint",
    );
    // An administrator removed the taint: the node's status writes still go through.
    admitted(Admission::new(
        "UPDATE",
        "nodes/status",
        node("beemesh", false, ours.clone()),
        node("beemesh", false, ours.clone()),
    ));
    admitted(Admission::new(
        "UPDATE",
        "nodes/status",
        node("beemesh", true, ours.clone()),
        node("beemesh", true, ours.clone()),
    ));
    denied(
        Admission::new(
            "UPDATE",
            "nodes/status",
            node("worker-1", false, json!({})),
            node("worker-1", false, json!({})),
        ),
        "another Node",
    );
    denied(
        Admission::new(
            "UPDATE",
            "nodes",
            node("worker-1", true, json!({})),
            node("worker-1", true, json!({})),
        ),
        "another Node",
    );
    admitted(Admission::new(
        "DELETE",
        "nodes",
        null.clone(),
        node("beemesh", true, ours.clone()),
    ));
    denied(
        Admission::new(
            "DELETE",
            "nodes",
            null.clone(),
            node("worker-1", false, json!({})),
        ),
        "another Node",
    );
    // node-restriction.kubernetes.io/ labels are the administrator's.
    let restricted =
        json!({"type": "virtual-kubelet", "node-restriction.kubernetes.io/zone": "dmz"});
    let other_zone =
        json!({"type": "virtual-kubelet", "node-restriction.kubernetes.io/zone": "lab"});
    denied(
        Admission::new(
            "CREATE",
            "nodes",
            node("beemesh", true, restricted.clone()),
            null.clone(),
        ),
        "node-restriction.kubernetes.io/",
    );
    admitted(Admission::new(
        "UPDATE",
        "nodes",
        node("beemesh", true, restricted.clone()),
        node("beemesh", true, restricted.clone()),
    ));
    denied(
        Admission::new(
            "UPDATE",
            "nodes",
            node("beemesh", true, restricted.clone()),
            node("beemesh", true, ours.clone()),
        ),
        "node-restriction.kubernetes.io/",
    );
    denied(
        Admission::new(
            "UPDATE",
            "nodes",
            node("beemesh", true, other_zone),
            node("beemesh", true, restricted.clone()),
        ),
        "node-restriction.kubernetes.io/",
    );
    denied(
        Admission::new(
            "UPDATE",
            "nodes",
            node("beemesh", true, ours.clone()),
            node("beemesh", true, restricted.clone()),
        ),
        "node-restriction.kubernetes.io/",
    );

    // Tokens: bound to a pod, as the node requests them.
    let token = |bound: Value| {
        let mut request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "metadata": {"name": "default", "namespace": "default"},
            "spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"], "expirationSeconds": 3607}});
        if !bound.is_null() {
            request["spec"]["boundObjectRef"] = bound;
        }
        request
    };
    admitted(Admission::new(
        "CREATE",
        "serviceaccounts/token",
        token(json!({"apiVersion": "v1", "kind": "Pod", "name": "web", "uid": "u1"})),
        null.clone(),
    ));
    denied(
        Admission::new(
            "CREATE",
            "serviceaccounts/token",
            token(Value::Null),
            null.clone(),
        ),
        "bound to a pod",
    );
    denied(
        Admission::new(
            "CREATE",
            "serviceaccounts/token",
            token(json!({"apiVersion": "v1", "kind": "Secret", "name": "s", "uid": "u2"})),
            null.clone(),
        ),
        "bound to a pod",
    );
    denied(
        Admission::new(
            "CREATE",
            "serviceaccounts/token",
            token(json!({"apiVersion": "v1", "kind": "Pod", "name": "web"})),
            null.clone(),
        ),
        "bound to a pod",
    );

    // Leases: its own.
    let lease = |name: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"}, "spec": {"holderIdentity": name}})
    };
    admitted(Admission::new(
        "CREATE",
        "leases",
        lease("beemesh"),
        null.clone(),
    ));
    admitted(Admission::new(
        "UPDATE",
        "leases",
        lease("beemesh"),
        lease("beemesh"),
    ));
    denied(
        Admission::new("CREATE", "leases", lease("worker-1"), null.clone()),
        "own Lease",
    );
    denied(
        Admission::new("UPDATE", "leases", lease("worker-1"), lease("worker-1")),
        "own Lease",
    );
    denied(
        Admission::new("DELETE", "leases", null.clone(), lease("worker-1")),
        "own Lease",
    );

    // EndpointSlices: those managed by beemesh.io, before and after.
    let slice = |manager: &str| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-x", "namespace": "default", "labels": {
            "kubernetes.io/service-name": "web",
            "endpointslice.kubernetes.io/managed-by": manager}},
        "addressType": "IPv4", "endpoints": []})
    };
    let ours = slice("beemesh.io");
    let controllers = slice("endpointslice-controller.k8s.io");
    admitted(Admission::new(
        "CREATE",
        "endpointslices",
        ours.clone(),
        null.clone(),
    ));
    admitted(Admission::new(
        "UPDATE",
        "endpointslices",
        ours.clone(),
        ours.clone(),
    ));
    admitted(Admission::new(
        "DELETE",
        "endpointslices",
        null.clone(),
        ours.clone(),
    ));
    let managed_by_beemesh = "EndpointSlices managed by beemesh.io";
    denied(
        Admission::new(
            "CREATE",
            "endpointslices",
            controllers.clone(),
            null.clone(),
        ),
        managed_by_beemesh,
    );
    denied(
        Admission::new(
            "UPDATE",
            "endpointslices",
            ours.clone(),
            controllers.clone(),
        ),
        managed_by_beemesh,
    );
    denied(
        Admission::new("UPDATE", "endpointslices", controllers.clone(), ours),
        managed_by_beemesh,
    );
    let mut unlabelled = controllers.clone();
    unlabelled["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("labels");
    denied(
        Admission::new("DELETE", "endpointslices", null.clone(), unlabelled),
        managed_by_beemesh,
    );
    denied(
        Admission::new("DELETE", "endpointslices", null, controllers),
        managed_by_beemesh,
    );
}
