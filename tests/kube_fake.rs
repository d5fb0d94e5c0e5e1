//! The test fake API server against real clients: kubectl and kube-rs. Its semantics
//! are checked against the responses recorded from k3s (tests/fixtures, shared/fixtures).

mod fake_apiserver;

use std::time::Duration;

use fake_apiserver::{kubectl, FakeApiServer};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::{json, Value};

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  nodeSelector: {type: virtual-kubelet}
  tolerations: [{key: virtual-kubelet.io/provider, operator: Equal, value: beemesh, effect: NoSchedule}]
  containers: [{name: c, image: "localhost/busybox:1.35"}]
"#;

#[tokio::test]
async fn kubectl_applies_gets_and_deletes_pods() {
    let server = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.write_kubeconfig(dir.path());
    let cfg = kubeconfig.clone();
    let (ok, out) =
        tokio::task::spawn_blocking(move || kubectl(&cfg, &["apply", "-f", "-"], Some(POD)))
            .await
            .expect("task");
    assert!(ok, "{out}");
    assert!(out.contains("pod/web created"), "{out}");
    let cfg = kubeconfig.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        kubectl(&cfg, &["get", "pod", "web", "-o", "json"], None)
    })
    .await
    .expect("task");
    assert!(ok, "{out}");
    let pod: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(pod["spec"]["restartPolicy"], "Always");
    assert_eq!(
        pod["spec"]["containers"][0]["imagePullPolicy"],
        "IfNotPresent"
    );
    assert!(pod["metadata"]["uid"]
        .as_str()
        .is_some_and(|u| u.len() == 36));
    assert!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string()
    );
    let (ok, out) = run_kubectl(&kubeconfig, &["get", "pod", "web", "-o", "yaml"], None).await;
    assert!(ok, "{out}");
    let yaml: Value = serde_yaml::from_str(&out).expect("yaml");
    assert_eq!(yaml["spec"]["serviceAccountName"], "default");
    assert_eq!(yaml["metadata"]["name"], "web");
    let cfg = kubeconfig.clone();
    let (ok, out) =
        tokio::task::spawn_blocking(move || kubectl(&cfg, &["get", "pod", "nosuch"], None))
            .await
            .expect("task");
    assert!(!ok && out.contains("pods \"nosuch\" not found"), "{out}");
    // Unbound: deleted at once.
    let cfg = kubeconfig.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        kubectl(&cfg, &["delete", "pod", "web", "--wait=false"], None)
    })
    .await
    .expect("task");
    assert!(ok && out.contains("deleted"), "{out}");
    assert!(server.object("pods", "default", "web").is_none());
}

async fn client(server: &FakeApiServer) -> kube::Client {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = server.write_kubeconfig(dir.path());
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

#[tokio::test]
async fn scheduling_status_patches_conflicts_watches_and_graceful_deletion() {
    let server = FakeApiServer::start().await;
    let client = client(&server).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let nodes: Api<Node> = Api::all(client.clone());

    let pod: Pod = serde_yaml::from_str(POD).expect("pod");
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("created");
    assert!(
        created
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .is_none(),
        "no node yet"
    );

    // A node without the label: not bound. With label and taint: bound.
    let node = |labels: Value| -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "beemesh", "labels": labels},
            "spec": {"taints": [{"key": "virtual-kubelet.io/provider", "value": "beemesh", "effect": "NoSchedule"}]}
        }))
        .expect("node")
    };
    nodes
        .create(&PostParams::default(), &node(json!({})))
        .await
        .expect("node");
    assert!(pods
        .get("web")
        .await
        .expect("get")
        .spec
        .and_then(|s| s.node_name)
        .is_none());
    let mut labelled = nodes.get("beemesh").await.expect("node");
    labelled.metadata.labels = Some([("type".to_string(), "virtual-kubelet".to_string())].into());
    nodes
        .replace("beemesh", &PostParams::default(), &labelled)
        .await
        .expect("replace");
    let bound = pods.get("web").await.expect("get");
    assert_eq!(
        bound.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some("beemesh")
    );

    // A stale replace is a 409 Conflict, as recorded.
    let err = nodes
        .replace("beemesh", &PostParams::default(), &labelled)
        .await
        .expect_err("stale");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 409);
            assert_eq!(s.reason, "Conflict");
        }
        other => panic!("expected 409, got {other}"),
    }

    // Listing with the kubelet's field selector.
    let selected = pods
        .list(&ListParams::default().fields("spec.nodeName=beemesh"))
        .await
        .expect("list");
    assert_eq!(selected.items.len(), 1);
    let other = pods
        .list(&ListParams::default().fields("spec.nodeName=elsewhere"))
        .await
        .expect("list");
    assert!(other.items.is_empty());
    let rv = selected.metadata.resource_version.clone().expect("list rv");

    // Watch from the list's resourceVersion sees the status patch, merged by type.
    let mut stream = pods
        .watch(&WatchParams::default().fields("spec.nodeName=beemesh"), &rv)
        .await
        .expect("watch")
        .boxed();
    let status = json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status("web", &PatchParams::default(), &Patch::Strategic(&status))
        .await
        .expect("status patch");
    let event = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("event in time")
        .expect("ok")
        .expect("some");
    let WatchEvent::Modified(modified) = event else {
        panic!("expected MODIFIED, got {event:?}");
    };
    let status = modified.status.expect("status");
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let types: Vec<String> = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.type_)
        .collect();
    assert_eq!(types, vec!["PodScheduled".to_string(), "Ready".to_string()]);
    // The status subresource changes nothing but status.
    let sneaky =
        json!({"metadata": {"labels": {"app": "changed"}}, "status": {"phase": "Running"}});
    let after = pods
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&sneaky))
        .await
        .expect("patch");
    assert_eq!(after.metadata.labels.expect("labels")["app"], "web");

    // Deleting a bound pod only marks it; the kubelet's delete with grace 0 removes it.
    let marked = pods
        .delete("web", &Default::default())
        .await
        .expect("delete");
    let marked = marked.left().expect("still there");
    assert!(marked.metadata.deletion_timestamp.is_some());
    pods.delete("web", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .expect("delete now");
    assert!(server.object("pods", "default", "web").is_none());

    // A watch from a compacted resourceVersion ends with 410 Expired.
    server.compact();
    let mut expired = pods
        .watch(&WatchParams::default(), "2")
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(Duration::from_secs(5), expired.next())
        .await
        .expect("answer")
    {
        Some(Ok(WatchEvent::Error(e))) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected 410, got {other:?}"),
    }
}

async fn run_kubectl(
    kubeconfig: &std::path::Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String) {
    let kubeconfig = kubeconfig.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        kubectl(&kubeconfig, &args, stdin.as_deref())
    })
    .await
    .expect("task")
}

fn api_error(err: kube::Error) -> kube::core::Status {
    match err {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn every_namespace_gets_a_default_service_account_and_the_root_ca() {
    let server = FakeApiServer::start().await;
    let client = client(&server).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "team-a"}})).expect("ns"),
        )
        .await
        .expect("namespace");
    for ns in [
        "default",
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "team-a",
    ] {
        let sa = Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .get("default")
            .await
            .unwrap_or_else(|e| panic!("{ns}: {e}"));
        assert_eq!(sa.metadata.namespace.as_deref(), Some(ns));
        assert!(sa.metadata.uid.is_some());
        let ca = Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get("kube-root-ca.crt")
            .await
            .unwrap_or_else(|e| panic!("{ns}: {e}"));
        let pem = &ca.data.expect("data")["ca.crt"];
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE-----\n")
                && pem.trim_end().ends_with("-----END CERTIFICATE-----"),
            "{pem}"
        );
    }
}

/// The projected volume the recorded k3s pod got from ServiceAccount admission.
fn recorded_token_volume() -> Value {
    let list: Value = serde_json::from_str(include_str!(
        "fixtures/k3s-1.21-api/pods-list-fieldselector.json"
    ))
    .expect("fixture");
    list["items"][0]["spec"]["volumes"][0].clone()
}

#[tokio::test]
async fn service_account_admission_defaults_checks_and_mounts_the_token() {
    let server = FakeApiServer::start().await;
    let client = client(&server).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = |value: Value| -> Pod { serde_json::from_value(value).expect("pod") };
    let created = pods
        .create(
            &PostParams::default(),
            &pod(json!({
                "metadata": {"name": "web"},
                "spec": {
                    "initContainers": [{"name": "init", "image": "busybox"}],
                    "containers": [
                        {"name": "a", "image": "busybox"},
                        {"name": "b", "image": "busybox", "volumeMounts": [{"name": "own", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}
                    ],
                    "volumes": [{"name": "own", "emptyDir": {}}]
                }
            })),
        )
        .await
        .expect("create");
    let created = serde_json::to_value(&created).expect("json");
    let spec = &created["spec"];
    assert_eq!(spec["serviceAccountName"], "default");
    assert_eq!(spec["serviceAccount"], "default");
    let volumes = spec["volumes"].as_array().expect("volumes");
    assert_eq!(volumes.len(), 2, "{volumes:?}");
    let token_volume = &volumes[1];
    let name = token_volume["name"].as_str().expect("name");
    let suffix = name.strip_prefix("kube-api-access-").expect("prefix");
    assert!(
        suffix.len() == 5
            && suffix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{name}"
    );
    // Exactly what the real API server added to the recorded pod, but for the name.
    let mut expected = recorded_token_volume();
    expected["name"] = json!(name);
    assert_eq!(token_volume, &expected);
    let mount = json!({"name": name, "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"});
    assert_eq!(spec["initContainers"][0]["volumeMounts"], json!([mount]));
    assert_eq!(spec["containers"][0]["volumeMounts"], json!([mount]));
    // A container that mounts something there already keeps only its own.
    assert_eq!(
        spec["containers"][1]["volumeMounts"],
        json!([{"name": "own", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}])
    );
    // The default tolerations the recorded pod also got.
    assert_eq!(
        spec["tolerations"],
        json!([
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
        ])
    );

    // A service account that does not exist: 403 with the plugin's message.
    let missing = pod(json!({
        "metadata": {"name": "robot-pod"},
        "spec": {"serviceAccountName": "robot", "containers": [{"name": "c", "image": "busybox"}]}
    }));
    let status = api_error(
        pods.create(&PostParams::default(), &missing)
            .await
            .expect_err("no such service account"),
    );
    assert_eq!(status.code, 403);
    assert_eq!(status.reason, "Forbidden");
    assert_eq!(
        status.message,
        "pods \"robot-pod\" is forbidden: error looking up service account default/robot: serviceaccount \"robot\" not found"
    );
    assert!(server.object("pods", "default", "robot-pod").is_none());

    // Once it exists the pod is admitted; the deprecated alias fills the name too.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "robot"}, "automountServiceAccountToken": false}),
        )
        .expect("sa"),
    )
    .await
    .expect("sa");
    let alias = pods
        .create(
            &PostParams::default(),
            &pod(json!({
                "metadata": {"name": "robot-pod"},
                "spec": {"serviceAccount": "robot", "containers": [{"name": "c", "image": "busybox"}]}
            })),
        )
        .await
        .expect("admitted");
    let alias_spec = alias.spec.expect("spec");
    assert_eq!(alias_spec.service_account_name.as_deref(), Some("robot"));
    assert_eq!(alias_spec.service_account.as_deref(), Some("robot"));
    // The service account opts out of automounting: no token volume.
    assert!(alias_spec.volumes.is_none_or(|v| v.is_empty()));
    assert!(alias_spec.containers[0].volume_mounts.is_none());
    // ...unless the pod opts back in; and a pod can opt out on its own.
    for (name, sa, automount, mounted) in [
        ("robot-in", "robot", true, true),
        ("default-out", "default", false, false),
    ] {
        let admitted = pods
            .create(
                &PostParams::default(),
                &pod(json!({
                    "metadata": {"name": name},
                    "spec": {"serviceAccountName": sa, "automountServiceAccountToken": automount, "containers": [{"name": "c", "image": "busybox"}]}
                })),
            )
            .await
            .expect("admitted");
        let volumes = admitted.spec.expect("spec").volumes.unwrap_or_default();
        assert_eq!(volumes.len(), usize::from(mounted), "{name}: {volumes:?}");
    }
}

fn base64url_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' => 62,
            b'_' => 63,
            other => panic!("not base64url: {}", other as char),
        }
    };
    let mut out = vec![];
    for chunk in text.as_bytes().chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, c)| n | (value(*c) << (18 - 6 * i)));
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[tokio::test]
async fn token_requests_for_bound_pods() {
    let server = FakeApiServer::start().await;
    let client = client(&server).await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_yaml::from_str(POD).expect("pod");
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let uid = pod.metadata.uid.clone().expect("uid");
    let request = |seconds: Option<i64>, pod_uid: &str| -> TokenRequest {
        let mut spec = json!({
            "audiences": ["https://kubernetes.default.svc.cluster.local"],
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": pod_uid}
        });
        if let Some(seconds) = seconds {
            spec["expirationSeconds"] = json!(seconds);
        }
        serde_json::from_value(
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}),
        )
        .expect("token request")
    };

    // Discoverable as the real /api/v1 lists it.
    let (ok, out) = run_kubectl(
        &server.write_kubeconfig(tempfile::tempdir().expect("dir").path()),
        &["get", "--raw", "/api/v1"],
        None,
    )
    .await;
    assert!(ok, "{out}");
    let discovery: Value = serde_json::from_str(&out).expect("json");
    let token = discovery["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["name"] == "serviceaccounts/token")
        .expect("serviceaccounts/token listed");
    assert_eq!(token["kind"], "TokenRequest");
    assert_eq!(token["group"], "authentication.k8s.io");
    assert_eq!(token["version"], "v1");
    assert_eq!(token["verbs"], json!(["create"]));
    assert_eq!(token["namespaced"], true);

    let answer = sas
        .create_token_request("default", &PostParams::default(), &request(None, &uid))
        .await
        .expect("token");
    assert_eq!(
        answer.spec.as_ref().and_then(|s| s.expiration_seconds),
        Some(3600),
        "defaulted"
    );
    assert_eq!(answer.metadata.name.as_deref(), Some("default"));
    let status = answer.status.expect("status");
    let expires = status.expiration_timestamp.expect("expiry").0.as_second();
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    assert!(
        (now + 3590..=now + 3610).contains(&expires),
        "{expires} vs {now}"
    );
    let token = status.token.expect("token");
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let claims: Value = serde_json::from_slice(&base64url_decode(parts[1])).expect("claims");
    assert_eq!(claims["sub"], "system:serviceaccount:default:default");
    assert_eq!(
        claims["aud"],
        json!(["https://kubernetes.default.svc.cluster.local"])
    );
    assert!(claims["iss"].is_string());
    assert_eq!(
        claims["exp"].as_i64().expect("exp") - claims["iat"].as_i64().expect("iat"),
        3600
    );
    let sa = sas.get("default").await.expect("sa");
    assert_eq!(
        claims["kubernetes.io"],
        json!({
            "namespace": "default",
            "pod": {"name": "web", "uid": uid},
            "serviceaccount": {"name": "default", "uid": sa.metadata.uid.expect("sa uid")}
        })
    );

    // The admission plugin's 3607 s, asked again: a refresh, seen by the test.
    sas.create_token_request(
        "default",
        &PostParams::default(),
        &request(Some(3607), &uid),
    )
    .await
    .expect("refresh");
    let issued = server.tokens_issued();
    assert_eq!(issued.len(), 2);
    assert_eq!(
        (
            issued[1].namespace.as_str(),
            issued[1].service_account.as_str(),
            issued[1].pod.as_deref(),
            issued[1].expiration_seconds
        ),
        ("default", "default", Some("web"), 3607)
    );

    // Under ten minutes: 422 Invalid.
    let status = api_error(
        sas.create_token_request("default", &PostParams::default(), &request(Some(599), &uid))
            .await
            .expect_err("too short"),
    );
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        status.message,
        "TokenRequest.authentication.k8s.io \"\" is invalid: spec.expirationSeconds: Invalid value: 599: may not specify a duration less than 10 minutes"
    );
    // No such service account: 404.
    let status = api_error(
        sas.create_token_request("nobody", &PostParams::default(), &request(None, &uid))
            .await
            .expect_err("no sa"),
    );
    assert_eq!(
        (status.code, status.message.as_str()),
        (404, "serviceaccounts \"nobody\" not found")
    );
    // A pod that was deleted and made again has another uid: 409 Conflict.
    let status = api_error(
        sas.create_token_request(
            "default",
            &PostParams::default(),
            &request(None, "0000-stale"),
        )
        .await
        .expect_err("stale uid"),
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(
        status
            .message
            .contains("the UID in the bound object reference (0000-stale) does not match"),
        "{}",
        status.message
    );
    // A pod that does not exist: 404.
    pods.delete("web", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .expect("delete");
    let status = api_error(
        sas.create_token_request("default", &PostParams::default(), &request(None, &uid))
            .await
            .expect_err("no pod"),
    );
    assert_eq!(
        (status.code, status.message.as_str()),
        (404, "pods \"web\" not found")
    );
    assert_eq!(
        server.tokens_issued().len(),
        2,
        "failed requests issue nothing"
    );
}

const TYPO_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: typo}
spec:
  restartPolicyy: Never
  containers: [{name: c, image: "localhost/busybox:1.35"}]
"#;

#[tokio::test]
async fn kubectl_validates_against_the_servers_schema() {
    let server = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.write_kubeconfig(dir.path());
    // Default flags: kubectl reads /openapi/v3, sees fieldValidation and asks for Strict.
    let (ok, out) = run_kubectl(&kubeconfig, &["apply", "-f", "-"], Some(TYPO_POD)).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("Error from server (BadRequest): error when creating \"STDIN\": Pod in version \"v1\" cannot be handled as a Pod: strict decoding error: unknown field \"spec.restartPolicyy\""),
        "{out}"
    );
    assert!(server.object("pods", "default", "typo").is_none());
    // --validate=warn: created without the unknown field, and a warning.
    let (ok, out) = run_kubectl(
        &kubeconfig,
        &["apply", "--validate=warn", "-f", "-"],
        Some(TYPO_POD),
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("Warning: unknown field \"spec.restartPolicyy\""),
        "{out}"
    );
    let stored = server.object("pods", "default", "typo").expect("created");
    assert!(stored["spec"]["restartPolicyy"].is_null());
    assert_eq!(stored["spec"]["restartPolicy"], "Always");
    // A patch (apply to an existing pod) is checked too.
    let (ok, out) = run_kubectl(&kubeconfig, &["apply", "-f", "-"], Some(TYPO_POD)).await;
    assert!(
        !ok && out.contains("strict decoding error: unknown field \"spec.restartPolicyy\""),
        "{out}"
    );
    // Server-side apply types the configuration whatever fieldValidation says.
    let (ok, out) = run_kubectl(
        &kubeconfig,
        &["apply", "--server-side", "-f", "-"],
        Some(TYPO_POD),
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("failed to create typed patch object (default/typo; /v1, Kind=Pod): .spec.restartPolicyy: field not declared in schema"),
        "{out}"
    );
    // kube-rs patches: Strict refuses, the default (Warn) drops the field.
    let client = client(&server).await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let typo = json!({"spec": {"containers": [{"name": "c", "imagee": "x"}]}});
    let strict = PatchParams {
        field_validation: Some(kube::api::ValidationDirective::Strict),
        ..Default::default()
    };
    let status = api_error(
        pods.patch("typo", &strict, &Patch::Strategic(&typo))
            .await
            .expect_err("strict"),
    );
    assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));
    assert_eq!(
        status.message,
        "strict decoding error: unknown field \"spec.containers[0].imagee\""
    );
    let patched = pods
        .patch("typo", &PatchParams::default(), &Patch::Strategic(&typo))
        .await
        .expect("warn");
    assert_eq!(patched.spec.expect("spec").containers.len(), 1);
    let stored = server.object("pods", "default", "typo").expect("stored");
    assert!(stored["spec"]["containers"][0]["imagee"].is_null());
}

#[tokio::test]
async fn events_show_in_kubectl_describe_and_get() {
    let server = FakeApiServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.write_kubeconfig(dir.path());
    let client = client(&server).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_yaml::from_str(POD).expect("pod");
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let uid = pod.metadata.uid.clone().expect("uid");
    let event = |name: &str, reason: &str, message: &str, object_uid: &str| -> Event {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "involvedObject": {"kind": "Pod", "namespace": "default", "name": "web", "uid": object_uid, "apiVersion": "v1", "fieldPath": "spec.containers{c}"},
            "reason": reason,
            "message": message,
            "type": "Normal",
            "source": {"component": "beemesh", "host": "node-1"},
            "firstTimestamp": "2026-01-01T00:00:00Z",
            "lastTimestamp": "2026-01-01T00:00:00Z",
            "count": 2
        }))
        .expect("event")
    };
    events
        .create(
            &PostParams::default(),
            &event(
                "web.1",
                "Pulled",
                "Container image already present on machine",
                &uid,
            ),
        )
        .await
        .expect("event");
    // An event of an older pod of the same name is not this pod's.
    events
        .create(
            &PostParams::default(),
            &event("web.2", "Killing", "Stopping container c", "old-uid"),
        )
        .await
        .expect("event");

    // The selector kubectl describe uses.
    let selected = events
        .list(&ListParams::default().fields(&format!(
            "involvedObject.name=web,involvedObject.namespace=default,involvedObject.uid={uid}"
        )))
        .await
        .expect("list");
    let names: Vec<String> = selected
        .items
        .iter()
        .filter_map(|e| e.metadata.name.clone())
        .collect();
    assert_eq!(names, vec!["web.1".to_string()]);
    // Field labels the API does not support are a 400, as on a real server.
    let status = api_error(
        events
            .list(&ListParams::default().fields("message=x"))
            .await
            .expect_err("unsupported label"),
    );
    assert_eq!(
        (status.code, status.message.as_str()),
        (400, "field label not supported: message")
    );

    let (ok, out) = run_kubectl(&kubeconfig, &["describe", "pod", "web"], None).await;
    assert!(ok, "{out}");
    assert!(out.contains("Service Account:  default"), "{out}");
    assert!(
        out.contains("/var/run/secrets/kubernetes.io/serviceaccount from kube-api-access-"),
        "{out}"
    );
    let events_section = out.split("Events:").nth(1).expect("Events section");
    assert!(
        events_section.contains("Pulled")
            && events_section.contains("Container image already present on machine"),
        "{out}"
    );
    assert!(events_section.contains("beemesh"), "{out}");
    assert!(!events_section.contains("Killing"), "{out}");

    // kubectl get events: the server prints the table, as a real one does.
    let (ok, out) = run_kubectl(&kubeconfig, &["get", "events"], None).await;
    assert!(ok, "{out}");
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header
            .split_whitespace()
            .eq(["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.contains("Pulled")
            && l.contains("pod/web")
            && l.contains("Container image already present on machine")),
        "{out}"
    );
    let (ok, out) = run_kubectl(
        &kubeconfig,
        &[
            "get",
            "events",
            "--field-selector",
            "reason=Killing",
            "-o",
            "wide",
        ],
        None,
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("beemesh, node-1") && out.contains("Killing") && !out.contains("Pulled"),
        "{out}"
    );
    let (ok, out) = run_kubectl(&kubeconfig, &["get", "pods"], None).await;
    assert!(ok, "{out}");
    assert!(
        out.lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .eq(["NAME", "READY", "STATUS", "RESTARTS", "AGE"]),
        "{out}"
    );
    assert!(
        out.contains("web") && out.contains("0/1") && out.contains("Pending"),
        "{out}"
    );
}
