//! Standalone Services end to end: `kind: Service` manifests beside the pods give mesh
//! pods names and load balancing with no Kubernetes anywhere; a connection goes from
//! the client's agent straight to the endpoint's agent. The node, three agents and
//! Podman are real. Requires hack/install-podman.sh and hack/build-test-image.sh.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{counter, podman_containers, scrape, Mesh};

/// A busybox web server answering with `name` on its port named `http` (8080), ready
/// once it listens, on an agent labelled role=server.
fn server(name: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: web}}
  annotations: {{beemesh.io/agent-selector: "role=server"}}
spec:
  containers:
  - name: httpd
    image: localhost/busybox:1.35
    command: [sh, -c, "mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 8080 -h /www"]
    ports: [{{name: http, containerPort: 8080}}]
    readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
"#
    )
}

/// A pod that sleeps on the agent labelled role=client: where the tests connect from.
/// Named per test, since the tests of this file run at once on one Podman.
fn client(name: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{role: client}}
  annotations: {{beemesh.io/agent-selector: "role=client"}}
spec:
  containers:
  - name: c
    image: localhost/busybox:1.35
    command: [sleep, "3600"]
"#
    )
}

/// The running container of pod `name`.
fn container_of(name: &str) -> serde_json::Value {
    podman_containers(&format!("io.beemesh.pod.name={name}"))
        .into_iter()
        .find(|c| c["State"] == "running")
        .unwrap_or_else(|| panic!("{name} runs"))
}

const SERVICES: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody}
spec:
  clusterIP: 10.80.0.99
  selector: {app: none}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: udp}
spec:
  selector: {app: web}
  ports: [{port: 53, protocol: UDP}]
"#;

/// Runs `script` in the client's container; its output, and whether it succeeded.
fn in_client(script: &str) -> (bool, String) {
    let container = container_of("client");
    let id = container["Id"].as_str().expect("the container's ID");
    let out = Command::new("podman")
        .args(["exec", id, "sh", "-c", script])
        .output()
        .expect("podman exec");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// How often each server answered `count` fetches of http://web/.
fn fetch_web(count: usize) -> BTreeMap<String, usize> {
    let (_, out) = in_client(&format!(
        "for i in $(seq {count}); do wget -qO- http://web/ || echo failed; done"
    ));
    let mut seen = BTreeMap::new();
    for line in out.lines() {
        *seen.entry(line.trim().to_owned()).or_insert(0) += 1;
    }
    seen
}

fn agent_of(mesh: &Mesh, pod: &str) -> Option<String> {
    let status = mesh.pod_status("default", pod)?;
    (status["phase"] == "Running").then(|| status["agent"].as_str().map(str::to_owned))?
}

#[test]
fn a_standalone_service_reaches_ready_pods_on_two_agents_by_name_and_follows_a_moved_pod() {
    let mut mesh = Mesh::new();
    let metrics = format!("127.0.0.1:{}", common::free_port());
    mesh.start_agent(&["--label", "role=server"]);
    mesh.start_agent(&["--label", "role=server"]);
    mesh.start_agent(&["--label", "role=client", "--metrics-addr", &metrics]);
    // Every agent known before the pods come, so that they spread.
    mesh.wait_for("three agents heard", Duration::from_secs(30), || {
        let agents = mesh.status()?["agents"].as_array()?.len();
        (agents == 3).then_some(())
    });
    mesh.write_manifest("services.yaml", SERVICES);
    mesh.write_manifest("web-a.yaml", &server("web-a"));
    mesh.write_manifest("web-b.yaml", &server("web-b"));
    mesh.write_manifest("client.yaml", &client("client"));
    let agents = mesh.wait_for(
        "servers and client running",
        Duration::from_secs(90),
        || {
            let a = agent_of(&mesh, "web-a")?;
            let b = agent_of(&mesh, "web-b")?;
            agent_of(&mesh, "client")?;
            Some((a, b))
        },
    );
    assert_ne!(
        agents.0, agents.1,
        "the servers spread over both server agents"
    );

    // A Service the mesh cannot carry is refused with the reason; the others work.
    let node_out = mesh.node().output();
    assert!(
        node_out.contains("service udp: port 53 is UDP; mesh Services carry TCP only"),
        "{node_out}"
    );

    // The kubelet's resolv.conf for a pod of the default namespace, through its agent.
    let (_, resolv) = in_client("cat /etc/resolv.conf");
    assert!(
        resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local"),
        "{resolv}"
    );
    assert!(resolv.contains("options ndots:5"), "{resolv}");

    // By name, balanced over both ready pods (their readiness probes passed).
    let seen = mesh.wait_for("both servers answer", Duration::from_secs(60), || {
        let seen = fetch_web(20);
        (seen.contains_key("web-a") && seen.contains_key("web-b")).then_some(seen)
    });
    eprintln!("20 fetches of http://web/: {seen:?}");
    assert_eq!(
        seen.values().sum::<usize>(),
        20,
        "every fetch answered: {seen:?}"
    );
    // `beemesh status` lists the Services with their ready endpoints.
    let status = mesh.status().expect("status");
    let web = status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .cloned()
        .unwrap_or_else(|| panic!("web in {status:#}"));
    assert_eq!(web["ready_endpoints"], 2, "{web}");
    assert_eq!(web["ports"], serde_json::json!(["80/TCP"]), "{web}");
    let (resolved, lookup) = in_client("nslookup web.default.svc.cluster.local");
    eprintln!("{lookup}");
    assert!(
        resolved && lookup.contains(web["cluster_ip"].as_str().expect("ip")),
        "{lookup}"
    );
    let (found, unknown) = in_client("nslookup nosuch.default.svc.cluster.local");
    eprintln!("{unknown}");
    assert!(
        !found,
        "an unknown Service's name does not exist: {unknown}"
    );

    // Straight from the client's agent to the servers' agents: counted as direct.
    let direct = counter(
        &scrape(&metrics),
        "beemesh_cluster_connections_total",
        "kind=\"direct\"",
    );
    eprintln!("direct connections: {direct}");
    assert!(direct >= 20, "direct connections: {direct}");

    // A Service without ready endpoints refuses at once (a reset, as kube-proxy's
    // reject rule), rather than hanging.
    let started = Instant::now();
    let (ok, out) = in_client("wget -qO- http://nobody/");
    assert!(!ok, "{out}");
    assert!(started.elapsed() < Duration::from_secs(5), "{out}");

    // A NetworkPolicy over the servers that admits only role=trusted pods: the client
    // (role=client) is refused at once; admitted when the policy names it; reached
    // freely once the policy is gone.
    let policy = |role: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web-ingress}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{role: {role}}}}}}}], ports: [{{port: http}}]}}]\n"
        )
    };
    mesh.write_manifest("policy.yaml", &policy("trusted"));
    mesh.wait_for(
        "the policy refuses the client",
        Duration::from_secs(30),
        || {
            let started = Instant::now();
            let (ok, _) = in_client("wget -qO- http://web/");
            (!ok && started.elapsed() < Duration::from_secs(5)).then_some(())
        },
    );
    mesh.write_manifest("policy.yaml", &policy("client"));
    mesh.wait_for(
        "the policy admits the client",
        Duration::from_secs(30),
        || {
            let seen = fetch_web(4);
            (!seen.contains_key("failed")).then_some(())
        },
    );
    mesh.remove_manifest("policy.yaml");

    // web-a's agent dies: web-a moves to the other server agent and is reached there.
    let victim = mesh
        .agents
        .iter()
        .position(|a| a.peer == agents.0)
        .expect("web-a's agent");
    mesh.agents[victim].kill();
    mesh.wait_for("web-a running elsewhere", Duration::from_secs(60), || {
        agent_of(&mesh, "web-a").filter(|a| *a == agents.1)
    });
    mesh.wait_for("web-a answers again", Duration::from_secs(60), || {
        let seen = fetch_web(10);
        seen.get("web-a").map(|_| ())
    });
}

/// The server of the throughput benchmark: busybox httpd with a file of `bytes` and a
/// small one, on a server agent, behind Service `bulk` at a fixed ClusterIP.
fn bulk_server(bytes: usize) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: bulk}}
spec:
  clusterIP: {BULK_IP}
  selector: {{app: bulk}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: bulk
  labels: {{app: bulk}}
  annotations: {{beemesh.io/agent-selector: "role=server"}}
spec:
  containers:
  - name: httpd
    image: localhost/busybox:1.35
    command: [sh, -c, 'mkdir -p /www && head -c {bytes} /dev/zero > /www/bulk && echo x > /www/small && exec httpd -f -p 8080 -h /www']
    readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
"#
    )
}

const BULK_IP: &str = "10.80.0.80";

/// Mesh pod to mesh pod on two agents, from inside the client pod's network namespace:
/// straight to the server's mesh IP (across the host's two pod bridges: the floor) and
/// through the Service (the client's agent, a libp2p stream to the server's agent, the
/// pod). `hack/bench-mesh-services.sh` runs 256 MiB and 200 requests on a release build
/// for BENCHMARKS.md; the suite runs 4 MiB and 5, asserting only that every byte arrives.
#[test]
fn mesh_pod_to_mesh_pod_throughput_and_latency_through_a_service_and_direct() {
    let mib = common::env_number("BEEMESH_BENCH_MIB", 4);
    let runs = common::env_number("BEEMESH_BENCH_REQUESTS", 5);
    let mut mesh = Mesh::new();
    mesh.start_agent(&["--label", "role=server"]);
    mesh.start_agent(&["--label", "role=client"]);
    mesh.write_manifest("bulk.yaml", &bulk_server(mib << 20));
    mesh.write_manifest("client.yaml", &client("bench-client"));
    let server_ip: std::net::IpAddr =
        mesh.wait_for("server and client ready", Duration::from_secs(90), || {
            agent_of(&mesh, "bench-client")?;
            let server = mesh.pod_status("default", "bulk")?;
            (server["ready"]["ready"] == 1).then(|| server["ip"].as_str()?.parse().ok())?
        });
    let pid: u32 = container_of("bench-client")["Pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
        .expect("the client's process");
    let service: std::net::IpAddr = BULK_IP.parse().expect("ip");
    common::in_netns(pid, move || {
        let paths = [
            (
                "direct to the pod's mesh IP",
                std::net::SocketAddr::new(server_ip, 8080),
            ),
            (
                "through the Service",
                std::net::SocketAddr::new(service, 80),
            ),
        ];
        common::compare_paths(&paths, mib, runs);
    });
}
