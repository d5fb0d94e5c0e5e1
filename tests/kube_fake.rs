//! The test fake API server against real clients: kubectl and kube-rs. Its semantics
//! are checked against the responses recorded from k3s (tests/fixtures, shared/fixtures).

mod fake_apiserver;

use std::process::Command;
use std::time::Duration;

use fake_apiserver::FakeApiServer;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::{json, Value};

fn kubectl(kubeconfig: &std::path::Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
    }
    let out = child.wait_with_output().expect("kubectl ends");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

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
    let (ok, out) = tokio::task::spawn_blocking(move || {
        kubectl(&cfg, &["apply", "--validate=false", "-f", "-"], Some(POD))
    })
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
