//! The chart catalogue on the mesh: the pods that well-known charts render with their
//! default values (tests/fixtures/charts), applied with the real kubectl to the fake
//! API server with their ConfigMaps, Secrets and ServiceAccounts, run by a real agent on
//! real Podman, or refused with a precise reason, as `chart_catalogue::EXPECTED` says.

mod chart_catalogue;
mod common;
mod fake_apiserver;

use std::time::{Duration, Instant};

use chart_catalogue::{charts, with_stand_ins, Expected};
use common::Mesh;
use fake_apiserver::{kubectl, FakeApiServer};
use serde_json::Value;

const TEST_IMAGE: &str = "localhost/busybox:1.35";

/// What became of the pod: Runs once Running with every container started, Refused
/// with its message once Failed as UnsupportedPodSpec; None while neither.
fn outcome(pod: &Value) -> Option<Outcome> {
    let status = &pod["status"];
    let all_running = status["containerStatuses"]
        .as_array()
        .is_some_and(|all| !all.is_empty() && all.iter().all(|c| !c["state"]["running"].is_null()));
    if status["phase"] == "Running" && all_running {
        return Some(Outcome::Runs);
    }
    (status["phase"] == "Failed").then(|| {
        Outcome::Failed(
            status["reason"].as_str().unwrap_or_default().to_string(),
            status["message"].as_str().unwrap_or_default().to_string(),
        )
    })
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Runs,
    Failed(String, String),
}

impl From<Expected> for Outcome {
    fn from(expected: Expected) -> Outcome {
        match expected {
            Expected::Runs => Outcome::Runs,
            Expected::Refused(message) => {
                Outcome::Failed("UnsupportedPodSpec".into(), message.into())
            }
        }
    }
}

/// Where a running catalogue pod's containers do not run as its security context
/// says: the user (`runAsUser`), the groups (`runAsGroup`, `fsGroup`) and a read-only
/// root file system, as the processes see them.
fn security_context_differences(pod: &Value) -> Vec<String> {
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
    let running = common::podman_containers(&format!("io.beemesh.pod.uid={uid}"));
    let pod_context = &pod["spec"]["securityContext"];
    let mut differ = Vec::new();
    for container in pod["spec"]["containers"].as_array().into_iter().flatten() {
        let container_name = container["name"].as_str().unwrap_or_default();
        let Some(id) = running
            .iter()
            .find(|c| {
                c["Labels"]["io.beemesh.container"] == container_name && c["State"] == "running"
            })
            .and_then(|c| c["Id"].as_str())
        else {
            differ.push(format!(
                "{name}/{container_name}: no running Podman container"
            ));
            continue;
        };
        let exec = |command: &str| -> (bool, String) {
            let out = std::process::Command::new("podman")
                .args(["exec", id, "sh", "-c", command])
                .output()
                .expect("podman exec");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            )
        };
        let context = &container["securityContext"];
        let setting = |field: &str| -> Option<i64> {
            context[field].as_i64().or(pod_context[field].as_i64())
        };
        let (_, user) = exec("id -u");
        let (_, group) = exec("id -g");
        let (_, groups) = exec("id -G");
        let groups: Vec<&str> = groups.split_whitespace().collect();
        if let Some(wanted) = setting("runAsUser") {
            if user != wanted.to_string() {
                differ.push(format!("{name}/{container_name}: uid {user}, not {wanted}"));
            }
        }
        if let Some(wanted) = setting("runAsGroup") {
            if group != wanted.to_string() {
                differ.push(format!(
                    "{name}/{container_name}: gid {group}, not {wanted}"
                ));
            }
        }
        if let Some(wanted) = pod_context["fsGroup"].as_i64() {
            if !groups.contains(&wanted.to_string().as_str()) {
                differ.push(format!(
                    "{name}/{container_name}: groups {groups:?} lack fsGroup {wanted}"
                ));
            }
        }
        if context["readOnlyRootFilesystem"] == true && exec("touch /catalogue-probe").0 {
            differ.push(format!(
                "{name}/{container_name}: its root file system is writable"
            ));
        }
    }
    differ
}

#[test]
fn the_pods_of_well_known_charts_run_or_are_refused_with_a_precise_reason() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = runtime.block_on(FakeApiServer::start());
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.write_kubeconfig(dir.path());
    let kc = kubeconfig.display().to_string();
    let mut mesh = Mesh::with_node_args(&["--kubeconfig", &kc, "--node-ip", "127.0.0.1"]);
    mesh.start_agent(&[]);

    let charts = charts();
    assert!(
        charts.len() >= 5,
        "the catalogue has {} charts",
        charts.len()
    );
    let mut pods = Vec::new();
    for chart in &charts {
        for object in chart.pod_objects() {
            let (ok, out) = kubectl(
                &kubeconfig,
                &["apply", "-f", "-"],
                Some(&object.to_string()),
            );
            assert!(ok, "{}: kubectl apply: {out}", chart.name);
        }
        for pod in chart.pods() {
            let manifest = with_stand_ins(&pod.pod, TEST_IMAGE).to_string();
            let (ok, out) = kubectl(&kubeconfig, &["apply", "-f", "-"], Some(&manifest));
            assert!(ok, "{}: kubectl apply {}: {out}", chart.name, pod.name());
            pods.push((pod.name().to_string(), pod.expected()));
        }
    }
    let get = |name: &str| -> Option<Value> {
        let (ok, out) = kubectl(&kubeconfig, &["get", "pod", name, "-o", "json"], None);
        ok.then(|| serde_json::from_str(&out).ok()).flatten()
    };
    let mut differ = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for (name, expected) in &pods {
        let mut last;
        let outcome = loop {
            last = get(name);
            if let Some(outcome) = last.as_ref().and_then(outcome) {
                break Some(outcome);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        match outcome {
            Some(Outcome::Runs) if *expected == Some(Expected::Runs) => {
                if let Some(pod) = &last {
                    differ.extend(security_context_differences(pod));
                }
            }
            Some(outcome) if expected.map(Outcome::from).as_ref() == Some(&outcome) => {}
            Some(outcome) => differ.push(format!("{name}: expected {expected:?}, got {outcome:?}")),
            None => differ.push(format!(
                "{name}: expected {expected:?}, neither running nor failed after 120 s: {}",
                last.map(|pod| pod["status"].to_string())
                    .unwrap_or_default()
            )),
        }
    }
    let stale: Vec<_> = chart_catalogue::EXPECTED
        .iter()
        .filter(|(name, _)| !pods.iter().any(|(pod, _)| pod == name))
        .collect();
    assert!(
        differ.is_empty() && stale.is_empty(),
        "{}\n\nthe catalogue's expectations differ from what happened:\n{}\nexpected of no pod: {stale:?}",
        mesh.diagnostics(),
        differ.join("\n")
    );
}
