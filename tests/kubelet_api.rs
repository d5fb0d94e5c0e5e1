//! The node's kubelet HTTPS API with the real curl, standalone: TLS, client
//! certificates, /healthz, /pods and /containerLogs relayed over the mesh to the agent
//! that runs the pod, served from Podman.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{client_certs, ClientCerts, Mesh};

const COUNTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: counter, namespace: default, uid: 6f1c2a9e-0000-4000-8000-000000000001}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: c
    image: localhost/busybox:1.35
    command: [sh, -c, 'i=1; while true; do echo "line $i"; i=$((i+1)); sleep 0.3; done']
"#;

/// Prints which instance it is (counted in an emptyDir that outlives restarts), then
/// fails: the kubelet's back-off restarts it after 10 s.
const CRASHER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: crasher, namespace: default, uid: 6f1c2a9e-0000-4000-8000-000000000002}
spec:
  terminationGracePeriodSeconds: 2
  volumes: [{name: data, emptyDir: {}}]
  containers:
  - name: c
    image: localhost/busybox:1.35
    volumeMounts: [{name: data, mountPath: /data}]
    command: [sh, -c, 'n=$(cat /data/n 2>/dev/null || echo 0); echo "instance $n"; echo $((n+1)) > /data/n; sleep 1; exit 1']
"#;

/// `curl` against the node's kubelet port: the HTTP code and the body.
fn curl(
    mesh: &Mesh,
    server_ca: &Path,
    client: Option<&ClientCerts>,
    path: &str,
    max_secs: u32,
) -> (u16, String) {
    let url = format!("https://127.0.0.1:{}{path}", mesh.kubelet_port);
    let mut command = Command::new("curl");
    command
        .args(["--max-time", &max_secs.to_string(), "--cacert"])
        .arg(server_ca);
    if let Some(client) = client {
        command
            .arg("--cert")
            .arg(&client.cert)
            .arg("--key")
            .arg(&client.key);
    }
    command.arg(url);
    common::curl(command)
}

#[test]
fn kubelet_api_serves_logs_of_mesh_pods_to_authenticated_clients_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client_certs(dir.path(), "alice");
    let ca = client.ca.display().to_string();
    let mut mesh = Mesh::with_node_args(&["--client-ca-file", &ca]);
    mesh.start_agent(&[]);
    mesh.write_manifest("counter.yaml", COUNTER);
    mesh.write_manifest("crasher.yaml", CRASHER);
    mesh.wait_for("counter Running", Duration::from_secs(40), || {
        let pod = mesh.pod_status("default", "counter")?;
        (pod["phase"] == "Running").then_some(())
    });
    let server_ca = mesh.node().state_dir.join("kubelet/kubelet.crt");

    // Deny by default: no client certificate, no access.
    let (code, body) = curl(&mesh, &server_ca, None, "/healthz", 5);
    assert_eq!((code, body.as_str()), (401, "Unauthorized"));
    let (code, body) = curl(&mesh, &server_ca, Some(&client), "/healthz", 5);
    assert_eq!((code, body.as_str()), (200, "ok"));

    let (code, body) = curl(&mesh, &server_ca, Some(&client), "/pods", 5);
    assert_eq!(code, 200, "{body}");
    let pods: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(pods["kind"], "PodList");
    let names: Vec<&str> = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert!(
        names.contains(&"counter") && names.contains(&"crasher"),
        "{names:?}"
    );

    // Logs: tail, limit, timestamps, follow; the kubelet's 404 texts.
    let logs = mesh.wait_for("a few lines", Duration::from_secs(10), || {
        let (code, body) = curl(
            &mesh,
            &server_ca,
            Some(&client),
            "/containerLogs/default/counter/c",
            5,
        );
        (code == 200 && body.contains("line 4")).then_some(body)
    });
    assert!(logs.starts_with("line 1\nline 2\n"), "{logs}");
    let (code, tail) = curl(
        &mesh,
        &server_ca,
        Some(&client),
        "/containerLogs/default/counter/c?tailLines=2",
        5,
    );
    assert_eq!(code, 200);
    assert_eq!(tail.lines().count(), 2, "{tail}");
    let (_, limited) = curl(
        &mesh,
        &server_ca,
        Some(&client),
        "/containerLogs/default/counter/c?limitBytes=5",
        5,
    );
    assert_eq!(limited, "line ");
    let (_, stamped) = curl(
        &mesh,
        &server_ca,
        Some(&client),
        "/containerLogs/default/counter/c?timestamps=true&tailLines=1",
        5,
    );
    let (stamp, line) = stamped.trim_end().split_once(' ').expect("a stamped line");
    assert!(
        stamp.parse::<k8s_openapi::jiff::Timestamp>().is_ok() && line.starts_with("line "),
        "{stamped}"
    );
    // Following streams lines as they are written, until the client goes.
    let (_, followed) = curl(
        &mesh,
        &server_ca,
        Some(&client),
        "/containerLogs/default/counter/c?follow=true&tailLines=1",
        3,
    );
    let numbers: Vec<u32> = followed
        .lines()
        .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
        .collect();
    assert!(numbers.len() >= 5, "only {numbers:?} in 3 s of following");
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");

    // Resource usage from Podman's stats, as metrics-server reads it.
    let (code, body) = curl(&mesh, &server_ca, Some(&client), "/stats/summary", 15);
    assert_eq!(code, 200, "{body}");
    std::thread::sleep(Duration::from_secs(1));
    let (_, body) = curl(&mesh, &server_ca, Some(&client), "/stats/summary", 15);
    let summary: serde_json::Value = serde_json::from_str(&body).expect("json");
    let pod = summary["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["podRef"]["name"] == "counter")
        .unwrap_or_else(|| panic!("no counter in {summary}"));
    let container = &pod["containers"][0];
    assert_eq!(container["name"], "c");
    assert!(
        container["cpu"]["usageCoreNanoSeconds"].as_u64() > Some(0),
        "{container}"
    );
    assert!(container["cpu"]["usageNanoCores"].is_u64(), "{container}");
    assert!(
        container["memory"]["workingSetBytes"].as_u64() > Some(0),
        "{container}"
    );
    let (code, metrics) = curl(&mesh, &server_ca, Some(&client), "/metrics/resource", 15);
    assert_eq!(code, 200);
    assert!(
        metrics.contains("container_cpu_usage_seconds_total{container=\"c\",namespace=\"default\",pod=\"counter\"}"),
        "{metrics}"
    );

    let (code, body) = curl(
        &mesh,
        &server_ca,
        Some(&client),
        "/containerLogs/default/nope/c",
        5,
    );
    assert_eq!((code, body.as_str()), (404, "pod \"nope\" does not exist"));
    let (code, body) = curl(
        &mesh,
        &server_ca,
        Some(&client),
        "/containerLogs/default/counter/x",
        5,
    );
    assert_eq!(
        (code, body.as_str()),
        (404, "container \"x\" not found in pod \"counter\"")
    );
    let (code, body) = curl(
        &mesh,
        &server_ca,
        Some(&client),
        "/containerLogs/default/counter/c?tailLines=-1",
        5,
    );
    assert_eq!(code, 400, "{body}");

    // sinceSeconds: only the last moments; previous: the instance before the restart.
    let (code, recent) = curl(
        &mesh,
        &server_ca,
        Some(&client),
        "/containerLogs/default/counter/c?sinceSeconds=1",
        5,
    );
    assert_eq!(code, 200);
    // One to two seconds back (whole seconds, as the kubelet counts them), and what was
    // written while the request was on its way: up to 7 lines of a line every 0.3 s
    // seen on a loaded 2-core machine, never the whole log (19 lines by then).
    let recent_lines = recent.lines().count();
    assert!(
        (1..=10).contains(&recent_lines) && !recent.starts_with("line 1\n"),
        "{recent}"
    );
    let previous = mesh.wait_for("a restarted crasher", Duration::from_secs(40), || {
        let (code, body) = curl(
            &mesh,
            &server_ca,
            Some(&client),
            "/containerLogs/default/crasher/c?previous=true",
            5,
        );
        (code == 200).then_some(body)
    });
    let (_, current) = curl(
        &mesh,
        &server_ca,
        Some(&client),
        "/containerLogs/default/crasher/c",
        5,
    );
    assert!(previous.starts_with("instance "), "{previous}");
    assert_ne!(previous, current, "previous gave the current instance");
}

#[test]
fn a_client_that_never_finishes_its_tls_handshake_is_dropped() {
    use std::io::Read;
    let mesh = Mesh::new();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], mesh.kubelet_port));
    let mut silent = mesh.wait_for("the kubelet port", Duration::from_secs(30), || {
        std::net::TcpStream::connect(addr).ok()
    });
    // Connected, and never a byte of the handshake: closed after the handshake timeout
    // (10 s) rather than held for as long as the client likes.
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = silent.read(&mut buf);
    let waited = started.elapsed();
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?} after {waited:?}"
    );
    assert!(
        waited >= Duration::from_secs(8) && waited <= Duration::from_secs(15),
        "closed after {waited:?}"
    );
}

/// The kubelet API names pods without their UID. While a pod is being deleted its
/// replacement may already run under the same name (a changed manifest here; a
/// StatefulSet's `web-0` in a cluster): requests mean the replacement, as on a kubelet,
/// never the namesake on its way out.
#[test]
fn logs_of_a_name_reach_the_current_pod_not_its_namesake_being_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client_certs(dir.path(), "alice");
    let ca = client.ca.display().to_string();
    let mut mesh = Mesh::with_node_args(&["--client-ca-file", &ca]);
    mesh.start_agent(&[]);
    let pod = |uid: &str, says: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: namesake, namespace: default, uid: {uid}}}\nspec:\n  terminationGracePeriodSeconds: 60\n  containers:\n  - name: c\n    image: localhost/busybox:1.35\n    command: [sh, -c, 'trap \"echo ignoring TERM\" TERM; while true; do echo {says}; sleep 0.5; done']\n"
        )
    };
    mesh.write_manifest(
        "namesake.yaml",
        &pod("6f1c2a9e-0000-4000-8000-00000000000a", "old"),
    );
    mesh.wait_for("the old pod Running", Duration::from_secs(40), || {
        let pod = mesh.pod_status("default", "namesake")?;
        (pod["phase"] == "Running").then_some(())
    });
    let server_ca = mesh.node().state_dir.join("kubelet/kubelet.crt");
    mesh.write_manifest(
        "namesake.yaml",
        &pod("6f1c2a9e-0000-4000-8000-00000000000b", "new"),
    );
    let logs = mesh.wait_for("the replacement's log", Duration::from_secs(40), || {
        let (code, body) = curl(
            &mesh,
            &server_ca,
            Some(&client),
            "/containerLogs/default/namesake/c?tailLines=1",
            5,
        );
        (code == 200 && body.contains("new")).then_some(body)
    });
    assert_eq!(logs, "new\n");
    // The old copy is still on its way out (its process ignores SIGTERM): both exist.
    let copies = common::podman_pods("io.beemesh.pod.name=namesake");
    assert_eq!(copies.len(), 2, "the namesake is still being stopped");
    for _ in 0..5 {
        let (code, body) = curl(
            &mesh,
            &server_ca,
            Some(&client),
            "/containerLogs/default/namesake/c?tailLines=1",
            5,
        );
        assert_eq!((code, body.as_str()), (200, "new\n"));
        std::thread::sleep(Duration::from_millis(300));
    }
}
