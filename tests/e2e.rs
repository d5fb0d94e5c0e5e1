//! End to end: `beemesh node` (standalone) and agents as separate processes, pods in
//! real Podman. Requires hack/install-podman.sh and hack/build-test-image.sh.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{podman_containers, podman_logs, podman_pods, Mesh};

fn running_copies(name: &str) -> Vec<common::PodmanPod> {
    podman_pods(&format!("io.beemesh.pod.name={name}"))
        .into_iter()
        .filter(|p| p.status == "Running" || p.status == "Degraded")
        .collect()
}

fn phase_of(mesh: &Mesh, name: &str) -> Option<String> {
    mesh.pod_status("default", name)
        .and_then(|p| p["phase"].as_str().map(str::to_string))
}

fn wait_running(mesh: &Mesh, name: &str) {
    mesh.wait_for(&format!("{name} Running"), Duration::from_secs(60), || {
        (phase_of(mesh, name).as_deref() == Some("Running")).then_some(())
    });
}

/// The pod's one running copy: the index of its agent in the mesh, and its epoch.
fn runner_of(mesh: &Mesh, name: &str) -> (usize, u64) {
    let copies = running_copies(name);
    assert_eq!(copies.len(), 1, "{copies:?}");
    let agent = &copies[0].labels["io.beemesh.agent"];
    let epoch = copies[0].labels["io.beemesh.epoch"].parse().expect("epoch");
    let index = mesh
        .agents
        .iter()
        .position(|a| &a.peer == agent)
        .expect("runner is ours");
    (index, epoch)
}

const WEB: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: e2e-web
spec:
  terminationGracePeriodSeconds: 2
  volumes:
  - name: shared
    emptyDir: {}
  initContainers:
  - name: prepare
    image: localhost/busybox:1.35
    command: ["sh", "-c", "echo prepared-by-init > /shared/msg"]
    volumeMounts: [{name: shared, mountPath: /shared}]
  containers:
  - name: web
    image: localhost/busybox:1.35
    command: ["httpd", "-f", "-p", "8080", "-h", "/shared"]
    volumeMounts: [{name: shared, mountPath: /shared}]
    readinessProbe:
      httpGet: {path: /msg, port: 8080}
      periodSeconds: 1
  - name: logger
    image: localhost/busybox:1.35
    command: ["sh", "-c", "cat /shared/msg; echo pod=$(POD_NAME); while true; do sleep 1; done"]
    env:
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    volumeMounts: [{name: shared, mountPath: /shared}]
"#;

#[test]
fn a_pod_with_an_init_container_runs_on_exactly_one_agent_and_goes_away_with_its_file() {
    let mut mesh = Mesh::new();
    for _ in 0..3 {
        mesh.start_agent(&[]);
    }
    let agents: BTreeSet<String> = mesh.agent_peers().into_iter().collect();
    mesh.write_manifest("web.yaml", WEB);

    wait_running(&mesh, "e2e-web");
    let copies = podman_pods("io.beemesh.pod.name=e2e-web");
    assert_eq!(copies.len(), 1, "exactly one Podman pod: {copies:?}");
    let runner = copies[0].labels["io.beemesh.agent"].clone();
    assert!(agents.contains(&runner), "run by one of our agents");
    assert!(
        copies[0].name.starts_with("default_e2e-web_"),
        "{}",
        copies[0].name
    );

    let containers = podman_containers("io.beemesh.pod.name=e2e-web");
    let state = |name: &str| {
        containers
            .iter()
            .find(|c| c["Labels"]["io.beemesh.container"] == name)
            .map(|c| {
                (
                    c["State"].as_str().unwrap_or_default().to_string(),
                    c["ExitCode"].as_i64(),
                )
            })
    };
    assert_eq!(state("prepare"), Some(("exited".into(), Some(0))));
    assert_eq!(state("web").map(|s| s.0), Some("running".into()));
    assert_eq!(state("logger").map(|s| s.0), Some("running".into()));

    // Logs through Podman: the init container's file and the expanded $(POD_NAME).
    let logger = containers
        .iter()
        .find(|c| c["Labels"]["io.beemesh.container"] == "logger")
        .and_then(|c| c["Id"].as_str())
        .expect("logger container")
        .to_string();
    let logs = mesh.wait_for("logger output", Duration::from_secs(10), || {
        let logs = podman_logs(&logger);
        logs.contains("pod=e2e-web").then_some(logs)
    });
    assert!(logs.contains("prepared-by-init"), "{logs}");

    // The readiness probe (HTTP GET of the init container's file) makes it Ready.
    let node_out = mesh.wait_for("Running and ready printed", Duration::from_secs(10), || {
        let out = mesh.node.as_ref().map(|n| n.output()).unwrap_or_default();
        out.lines()
            .any(|l| l.contains("default/e2e-web") && l.contains(" Running 2/2 ready"))
            .then_some(out)
    });
    assert!(node_out.contains(&runner), "{node_out}");

    // `beemesh status` shows it as `kubectl get pods -o wide` would, and the agent.
    let table = mesh.status_output("table").expect("beemesh status");
    let header = table
        .lines()
        .find(|l| l.starts_with("NAMESPACE"))
        .unwrap_or_else(|| panic!("a pods table: {table}"));
    let row = table
        .lines()
        .find(|l| l.starts_with("default") && l.contains(" e2e-web "))
        .unwrap_or_else(|| panic!("a row for e2e-web: {table}"));
    let cell = |column: &str| {
        let at = header.find(column).expect("column");
        row[at..].split_whitespace().next().unwrap_or_default()
    };
    assert_eq!(
        (
            cell("READY"),
            cell("STATUS"),
            cell("RESTARTS"),
            cell("AGENT")
        ),
        ("2/2", "Running", "0", runner.as_str()),
        "{table}"
    );
    assert!(
        cell("MESH IP").parse::<std::net::IpAddr>().is_ok(),
        "{table}"
    );
    assert!(cell("AGE").ends_with('s'), "{table}");
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&mesh.status_output("yaml").expect("-o yaml")).expect("YAML");
    assert!(
        yaml["pods"].as_sequence().is_some_and(|p| !p.is_empty()),
        "{yaml:?}"
    );

    mesh.remove_manifest("web.yaml");
    mesh.wait_for("e2e-web gone from Podman", Duration::from_secs(30), || {
        podman_pods("io.beemesh.pod.name=e2e-web")
            .is_empty()
            .then_some(())
    });
    mesh.wait_for("deletion printed", Duration::from_secs(10), || {
        mesh.node
            .as_ref()
            .is_some_and(|n| n.output().contains("default/e2e-web deleted"))
            .then_some(())
    });
    // Logs written to files are plain text: colours are for terminals.
    let logs = mesh.logs();
    assert!(logs.len() >= 2, "node and agent logs: {logs:?}");
    for (path, text) in logs {
        assert!(!text.contains('\u{1b}'), "ANSI codes in {}", path.display());
    }
}

const SLEEPER: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: e2e-mover
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: localhost/busybox:1.35
    command: ["sleep", "100000"]
"#;

#[test]
fn a_killed_agents_pod_moves_to_another_within_15s_and_never_runs_twice() {
    let mut mesh = Mesh::new();
    for _ in 0..3 {
        mesh.start_agent(&[]);
    }
    mesh.write_manifest("mover.yaml", SLEEPER);
    wait_running(&mesh, "e2e-mover");
    let (victim, old_epoch) = runner_of(&mesh, "e2e-mover");
    let old_agent = mesh.agents[victim].peer.clone();
    let victim_state = mesh.agents[victim].state_dir.clone();
    mesh.agents[victim].kill();
    let killed_at = Instant::now();

    // Sample Podman until a newer epoch runs elsewhere: copies of the newest epoch
    // never number more than one.
    let moved = loop {
        let copies = running_copies("e2e-mover");
        let newest = copies
            .iter()
            .filter_map(|p| p.labels["io.beemesh.epoch"].parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let at_newest: Vec<_> = copies
            .iter()
            .filter(|p| p.labels["io.beemesh.epoch"] == newest.to_string())
            .collect();
        assert!(
            at_newest.len() <= 1,
            "two copies of epoch {newest}: {copies:?}"
        );
        if newest > old_epoch {
            break at_newest[0].clone();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "pod did not move within 15 s\n{}",
            mesh.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let moved_after = killed_at.elapsed();
    assert_ne!(moved.labels["io.beemesh.agent"], old_agent);
    eprintln!("pod moved to another agent {moved_after:?} after the kill");

    mesh.wait_for(
        "status Running on the new agent",
        Duration::from_secs(20),
        || {
            let pod = mesh.pod_status("default", "e2e-mover")?;
            (pod["phase"] == "Running" && pod["agent"] == moved.labels["io.beemesh.agent"].as_str())
                .then_some(())
        },
    );
    let node_out = mesh.node.as_ref().map(|n| n.output()).unwrap_or_default();
    assert!(node_out.contains("AgentLost"), "{node_out}");

    // The old agent comes back, adopts its stale copy, learns it is superseded and
    // stops it: one copy remains.
    mesh.start_agent_in(victim_state, &[]);
    mesh.wait_for("the stale copy stopped", Duration::from_secs(30), || {
        let all = podman_pods("io.beemesh.pod.name=e2e-mover");
        (all.len() == 1 && all[0].labels["io.beemesh.agent"] == moved.labels["io.beemesh.agent"])
            .then_some(())
    });
}

#[test]
fn restarting_the_node_or_an_agent_neither_duplicates_nor_loses_pods() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    mesh.start_agent(&[]);
    mesh.write_manifest("stay.yaml", &SLEEPER.replace("e2e-mover", "e2e-stay"));
    wait_running(&mesh, "e2e-stay");
    let before = running_copies("e2e-stay");
    assert_eq!(before.len(), 1);
    // Epochs come from the node's counted starts (kept in its trust file), not the clock.
    let starts = |mesh: &Mesh| {
        let text = std::fs::read_to_string(mesh.node_state().join("trust/node.json"))
            .expect("the node's trust file");
        serde_json::from_str::<serde_json::Value>(&text).expect("json")["owner_starts"]
            .as_u64()
            .expect("owner_starts")
    };
    let epoch = |mesh: &Mesh, name: &str| {
        mesh.pod_status("default", name)
            .and_then(|p| p["epoch"].as_u64())
            .expect("an epoch")
    };
    assert_eq!(starts(&mesh), 1);
    let first = epoch(&mesh, "e2e-stay");
    assert!(((1u64 << 32)..(2u64 << 32)).contains(&first), "{first}");

    // Node: SIGKILL and start again; it adopts the running placement.
    mesh.node().kill();
    mesh.start_node();
    mesh.wait_for(
        "e2e-stay Running after node restart",
        Duration::from_secs(30),
        || (phase_of(&mesh, "e2e-stay").as_deref() == Some("Running")).then_some(()),
    );
    assert_eq!(starts(&mesh), 2);
    assert_eq!(epoch(&mesh, "e2e-stay"), first, "adopted, not placed again");
    mesh.write_manifest("new.yaml", &SLEEPER.replace("e2e-mover", "e2e-new"));
    mesh.wait_for("e2e-new Running", Duration::from_secs(30), || {
        (phase_of(&mesh, "e2e-new").as_deref() == Some("Running")).then_some(())
    });
    assert!(
        epoch(&mesh, "e2e-new") >= 2u64 << 32,
        "a new placement supersedes every earlier run's"
    );
    std::thread::sleep(Duration::from_secs(5));
    let after_node = running_copies("e2e-stay");
    assert_eq!(after_node.len(), 1, "{after_node:?}");
    assert_eq!(
        after_node[0].id, before[0].id,
        "the same Podman pod carries on"
    );

    // Agent: SIGKILL and start again within the loss timeout; it adopts its pod.
    let runner = before[0].labels["io.beemesh.agent"].clone();
    let i = mesh
        .agents
        .iter()
        .position(|a| a.peer == runner)
        .expect("ours");
    let state = mesh.agents[i].state_dir.clone();
    let containers_before = podman_containers("io.beemesh.pod.name=e2e-stay");
    mesh.agents[i].kill();
    mesh.start_agent_in(state, &[]);
    std::thread::sleep(Duration::from_secs(12));
    let after_agent = running_copies("e2e-stay");
    assert_eq!(after_agent.len(), 1, "{after_agent:?}");
    assert_eq!(after_agent[0].id, before[0].id);
    let containers_after = podman_containers("io.beemesh.pod.name=e2e-stay");
    assert_eq!(
        containers_before
            .iter()
            .map(|c| c["Id"].clone())
            .collect::<Vec<_>>(),
        containers_after
            .iter()
            .map(|c| c["Id"].clone())
            .collect::<Vec<_>>(),
        "no container was recreated"
    );
    assert_eq!(phase_of(&mesh, "e2e-stay").as_deref(), Some("Running"));
}

#[test]
fn a_pod_no_agent_fits_waits_with_the_reason_and_runs_when_capacity_appears() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&["--memory", "64Mi"]);
    mesh.start_agent(&["--memory", "64Mi", "--label", "zone=b"]);
    mesh.write_manifest(
        "big.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: e2e-big
  annotations: {beemesh.io/agent-selector: "zone=b"}
spec:
  containers:
  - name: main
    image: localhost/busybox:1.35
    command: ["sleep", "100000"]
    resources: {requests: {memory: 1Gi}}
"#,
    );
    // Until both agents have joined, the message counts fewer.
    let pod = mesh.wait_for("Unschedulable reason", Duration::from_secs(30), || {
        let pod = mesh.pod_status("default", "e2e-big")?;
        (pod["reason"] == "Unschedulable"
            && pod["message"]
                == "0/2 agents fit: 2 insufficient memory, 1 didn't match the pod's agent \
                    selector; it asks for more memory than any agent has (1073741824 > \
                    67108864): waiting for a larger agent")
            .then_some(pod)
    });
    assert_eq!(pod["phase"], "Pending");
    assert!(podman_pods("io.beemesh.pod.name=e2e-big").is_empty());

    mesh.start_agent(&["--memory", "4Gi", "--label", "zone=b"]);
    mesh.wait_for("e2e-big Running", Duration::from_secs(30), || {
        (phase_of(&mesh, "e2e-big").as_deref() == Some("Running")).then_some(())
    });
}

/// `fsGroup` and `supplementalGroups` as the kubelet applies them: the process has the
/// groups, the emptyDir belongs to fsGroup (setgid: what the user makes there too).
#[test]
fn fs_group_owns_the_volumes_and_every_process_has_the_groups() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    mesh.write_manifest(
        "groups.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: e2e-groups}
spec:
  securityContext: {runAsUser: 1000, runAsGroup: 1000, fsGroup: 2000, supplementalGroups: [3000]}
  containers:
  - name: main
    image: localhost/busybox:1.35
    command: [sh, -c, 'touch /data/made; echo "groups=$(id -G) dir=$(stat -c %g:%a /data) file=$(stat -c %g /data/made)"; sleep 100000']
    volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, emptyDir: {}}]
"#,
    );
    let name = mesh.wait_for("the container", Duration::from_secs(30), || {
        let containers = podman_containers("io.beemesh.pod.name=e2e-groups");
        Some(containers.first()?["Names"][0].as_str()?.to_owned())
    });
    let line = mesh.wait_for("its output", Duration::from_secs(20), || {
        let logs = podman_logs(&name);
        logs.contains("groups=").then_some(logs)
    });
    let groups: BTreeSet<&str> = line
        .split("groups=")
        .nth(1)
        .and_then(|rest| rest.split(" dir=").next())
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(groups, BTreeSet::from(["1000", "2000", "3000"]), "{line}");
    assert!(line.contains("dir=2000:2777"), "{line}");
    assert!(line.contains("file=2000"), "{line}");
}

/// `runAsNonRoot` without `runAsUser`, checked as the kubelet checks it: against the
/// image's user when the container is created. The test image sets none (root): the
/// container waits with the kubelet's reason and message, and nothing runs; with
/// `runAsUser` it runs.
#[test]
fn run_as_non_root_is_checked_against_the_images_user() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    let pod = |name: &str, security: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, uid: {name}-uid}}\nspec:\n  securityContext: {security}\n  containers:\n  - {{name: main, image: localhost/busybox:1.35, command: [sleep, '100000']}}\n"
        )
    };
    mesh.write_manifest("root.yaml", &pod("e2e-root", "{runAsNonRoot: true}"));
    mesh.write_manifest(
        "user.yaml",
        &pod("e2e-user", "{runAsNonRoot: true, runAsUser: 1000}"),
    );
    let refused = mesh.wait_for("e2e-root refused", Duration::from_secs(30), || {
        let pod = mesh.pod_status("default", "e2e-root")?;
        (pod["reason"] == "CreateContainerConfigError").then_some(pod)
    });
    assert_eq!(
        refused["message"],
        "container has runAsNonRoot and image will run as root (pod: \"e2e-root_default(e2e-root-uid)\", container: main)",
        "{refused}"
    );
    mesh.wait_for("e2e-user Running", Duration::from_secs(30), || {
        (phase_of(&mesh, "e2e-user").as_deref() == Some("Running")).then_some(())
    });
    assert!(podman_containers("io.beemesh.pod.name=e2e-root").is_empty());
}

/// Lifecycle hooks as the kubelet runs them: a container is Running only once its
/// postStart hook ended, and the next container starts only then; a failed postStart
/// stops the container, which waits with `PostStartHookError` and the kubelet's message
/// (and the node says `FailedPostStartHook`); deleting the pod runs each running
/// container's preStop hook (an HTTP GET made by the agent) before it is stopped.
#[test]
fn post_start_and_pre_stop_hooks_run_as_the_kubelet_runs_them() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (hits_tx, hits) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 1024];
            let n = std::io::Read::read(&mut stream, &mut buf).unwrap_or(0);
            let line = String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            let _ = std::io::Write::write_all(&mut stream, b"HTTP/1.1 204 No Content\r\n\r\n");
            let _ = hits_tx.send(line);
        }
    });
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    mesh.write_manifest(
        "hooked.yaml",
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: e2e-hooked}}
spec:
  terminationGracePeriodSeconds: 5
  containers:
  - name: first
    image: localhost/busybox:1.35
    command: [sh, -c, 'until [ -f /tmp/hooked ]; do sleep 0.1; done; echo "saw $(cat /tmp/hooked)"; sleep 100000']
    lifecycle:
      postStart: {{exec: {{command: [sh, -c, 'sleep 2; echo by-post-start > /tmp/hooked']}}}}
      preStop: {{httpGet: {{host: 127.0.0.1, port: {port}, path: /pre-stop/first}}}}
  - name: second
    image: localhost/busybox:1.35
    command: [sleep, '100000']
"#
        ),
    );
    mesh.write_manifest(
        "failing.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: e2e-hook-fails, uid: e2e-hook-fails-uid}
spec:
  containers:
  - name: app
    image: localhost/busybox:1.35
    command: [sleep, '100000']
    lifecycle:
      postStart: {exec: {command: [sh, -c, 'echo no way; exit 3']}}
"#,
    );
    wait_running(&mesh, "e2e-hooked");
    let started = |container: &str| -> String {
        containers_named("e2e-hooked", container)
            .first()
            .and_then(|c| c["StartedAt"].as_i64())
            .map(|t| t.to_string())
            .unwrap_or_default()
    };
    let (first, second) = (started("first"), started("second"));
    let (first, second): (i64, i64) = (
        first.parse().expect("first"),
        second.parse().expect("second"),
    );
    assert!(
        second - first >= 2,
        "second started {}s after first: not after its postStart hook",
        second - first
    );
    let name = containers_named("e2e-hooked", "first")[0]["Names"][0]
        .as_str()
        .expect("name")
        .to_owned();
    let logs = mesh.wait_for(
        "the first container's output",
        Duration::from_secs(10),
        || {
            let logs = podman_logs(&name);
            logs.contains("saw").then_some(logs)
        },
    );
    assert!(logs.contains("saw by-post-start"), "{logs}");

    let failed = wait_message(&mesh, "e2e-hook-fails", "Exec lifecycle hook");
    assert_eq!(
        failed["message"],
        "Exec lifecycle hook ([sh -c echo no way; exit 3]) for Container \"app\" in Pod \"e2e-hook-fails_default(e2e-hook-fails-uid)\" failed - error: command 'sh -c echo no way; exit 3' exited with 3: no way\n, message: \"no way\\n\"",
        "{failed}"
    );
    mesh.wait_for(
        "the node's FailedPostStartHook line",
        Duration::from_secs(10),
        || {
            let output = mesh
                .node
                .as_ref()
                .map(|node| node.output())
                .unwrap_or_default();
            output
                .contains("FailedPostStartHook: PostStartHook failed")
                .then_some(())
        },
    );

    mesh.remove_manifest("hooked.yaml");
    let hit = hits
        .recv_timeout(Duration::from_secs(30))
        .expect("the preStop hook's request");
    assert_eq!(hit, "GET /pre-stop/first HTTP/1.1");
    mesh.wait_for("e2e-hooked removed", Duration::from_secs(30), || {
        running_copies("e2e-hooked").is_empty().then_some(())
    });
}

/// Native sidecars as the kubelet runs them: an init container with `restartPolicy:
/// Always` is awaited only until it is up (its startup probe passed), runs beside the
/// app container, is restarted when it exits whatever the pod's restartPolicy, and is
/// stopped once the app container is done; the pod then ends as its app container did.
#[test]
fn a_sidecar_runs_beside_the_app_restarts_and_stops_after_it() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    mesh.write_manifest(
        "sidecar.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: e2e-sidecar}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 5
  initContainers:
  - name: setup
    image: localhost/busybox:1.35
    command: [sh, -c, 'echo set > /shared/setup']
    volumeMounts: [{name: shared, mountPath: /shared}]
  - name: proxy
    image: localhost/busybox:1.35
    restartPolicy: Always
    command: [sh, -c, 'n=$(cat /shared/runs 2>/dev/null || echo 0); echo $((n+1)) > /shared/runs; sleep 1; touch /shared/proxy-up; if [ "$n" = 0 ]; then sleep 1; exit 1; fi; trap "echo proxy stopping; exit 0" TERM; while true; do sleep 0.2; done']
    startupProbe: {exec: {command: [test, -f, /shared/proxy-up]}, periodSeconds: 1}
    volumeMounts: [{name: shared, mountPath: /shared}]
  containers:
  - name: app
    image: localhost/busybox:1.35
    command: [sh, -c, 'echo "app saw setup=$(cat /shared/setup) proxy-up=$(test -f /shared/proxy-up && echo yes)"; sleep 6; echo "proxy runs=$(cat /shared/runs)"']
    volumeMounts: [{name: shared, mountPath: /shared}]
  volumes: [{name: shared, emptyDir: {}}]
"#,
    );
    let done = mesh.wait_for("e2e-sidecar Succeeded", Duration::from_secs(60), || {
        let pod = mesh.pod_status("default", "e2e-sidecar")?;
        (pod["phase"] == "Succeeded").then_some(pod)
    });
    assert!(
        done["restarts"].as_u64() >= Some(1),
        "the sidecar was restarted: {done}"
    );
    let app = containers_named("e2e-sidecar", "app");
    let app_name = app[0]["Names"][0].as_str().expect("name").to_owned();
    let logs = podman_logs(&app_name);
    assert!(logs.contains("app saw setup=set proxy-up=yes"), "{logs}");
    assert!(logs.contains("proxy runs=2"), "{logs}");
    // The sidecar was stopped with SIGTERM once the app was done, and is not started again.
    let proxies = containers_named("e2e-sidecar", "proxy");
    assert!(
        proxies.iter().all(|c| c["State"] == "exited"),
        "{proxies:#?}"
    );
    let last = proxies
        .iter()
        .filter_map(|c| c["Names"][0].as_str())
        .max_by_key(|name| name.rsplit('_').next().and_then(|n| n.parse::<u32>().ok()))
        .expect("a proxy container")
        .to_owned();
    assert!(podman_logs(&last).contains("proxy stopping"), "{last}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        containers_named("e2e-sidecar", "proxy").len(),
        proxies.len()
    );
}

/// An emptyDir with `medium: Memory` is a tmpfs as large as its `sizeLimit`, whose
/// data outlives a container's restart, and which goes with the pod.
#[test]
fn a_memory_emptydir_is_a_sized_tmpfs_that_survives_restarts() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    mesh.write_manifest(
        "memory.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: e2e-memory}
spec:
  restartPolicy: OnFailure
  containers:
  - name: main
    image: localhost/busybox:1.35
    command: [sh, -c, 'if [ -f /cache/first ]; then echo "again: $(cat /cache/first) $(grep " /cache " /proc/mounts | cut -d" " -f1,4)"; sleep 100000; fi; echo run-1 > /cache/first; dd if=/dev/zero of=/cache/big bs=1M count=16 2>/dev/null || echo "full at $(du -k /cache/big | cut -f1)k"; exit 1']
    volumeMounts: [{name: cache, mountPath: /cache}]
  volumes: [{name: cache, emptyDir: {medium: Memory, sizeLimit: 8Mi}}]
"#,
    );
    wait_running(&mesh, "e2e-memory");
    let line = mesh.wait_for(
        "the restarted container's output",
        Duration::from_secs(40),
        || {
            containers_named("e2e-memory", "main")
                .iter()
                .filter_map(|c| c["Names"][0].as_str())
                .map(podman_logs)
                .find(|logs| logs.contains("again:"))
        },
    );
    assert!(line.contains("again: run-1 tmpfs"), "{line}");
    assert!(line.contains("size=8192k"), "{line}");
    let first = containers_named("e2e-memory", "main")
        .iter()
        .filter_map(|c| c["Names"][0].as_str())
        .map(podman_logs)
        .find(|logs| logs.contains("full at"))
        .expect("the first run's output");
    assert!(first.contains("full at 8"), "{first}");
    mesh.remove_manifest("memory.yaml");
    mesh.wait_for(
        "the pod and its volume gone",
        Duration::from_secs(30),
        || {
            let volumes = std::process::Command::new("podman")
                .args([
                    "volume",
                    "ls",
                    "-q",
                    "--filter",
                    "label=io.beemesh.pod.name=e2e-memory",
                ])
                .output()
                .ok()?;
            (running_copies("e2e-memory").is_empty() && volumes.stdout.is_empty()).then_some(())
        },
    );
}

/// Local ephemeral storage limits are enforced by eviction, as the kubelet's eviction
/// manager does: an emptyDir past its `sizeLimit`, or a container whose writable layer
/// and log pass its `ephemeral-storage` limit, gets its pod Failed with reason Evicted
/// and the kubelet's message, its containers killed and not restarted.
#[test]
fn pods_past_their_local_storage_limits_are_evicted() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    // Each fills 12 MiB at `target`; `limits` are the containers' ephemeral-storage
    // limits, the first for the filling container, the others for idle ones.
    let pod = |name: &str, target: &str, limits: &[&str]| {
        let mut text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers:\n  - name: main\n    image: localhost/busybox:1.35\n    command: [sh, -c, 'dd if=/dev/zero of={target}/fill bs=1M count=12; sleep 100000']\n    volumeMounts: [{{name: scratch, mountPath: /scratch}}]\n"
        );
        for (i, limit) in limits.iter().enumerate() {
            if i > 0 {
                text.push_str(&format!(
                    "  - name: idle{i}\n    image: localhost/busybox:1.35\n    command: [sleep, '100000']\n"
                ));
            }
            text.push_str(&format!(
                "    resources: {{limits: {{ephemeral-storage: {limit}}}}}\n"
            ));
        }
        text.push_str("  volumes: [{name: scratch, emptyDir: {sizeLimit: 8Mi}}]\n");
        text
    };
    mesh.write_manifest("dir.yaml", &pod("e2e-full-dir", "/scratch", &[]));
    mesh.write_manifest("pod.yaml", &pod("e2e-full-pod", "/tmp", &["8Mi"]));
    mesh.write_manifest(
        "container.yaml",
        &pod("e2e-full-container", "/tmp", &["8Mi", "100Mi"]),
    );
    // In the kubelet's order: emptyDirs, then the pod's total (which a single container
    // past its limit passes first), then each container.
    for (name, message) in [
        (
            "e2e-full-dir",
            "Usage of EmptyDir volume \"scratch\" exceeds the limit \"8Mi\". ",
        ),
        (
            "e2e-full-pod",
            "Pod ephemeral local storage usage exceeds the total limit of containers 8Mi. ",
        ),
        (
            "e2e-full-container",
            "Container main exceeded its local ephemeral storage limit \"8Mi\". ",
        ),
    ] {
        let evicted = mesh.wait_for(&format!("{name} evicted"), Duration::from_secs(60), || {
            let pod = mesh.pod_status("default", name)?;
            (pod["phase"] == "Failed").then_some(pod)
        });
        assert_eq!(evicted["reason"], "Evicted", "{evicted}");
        assert_eq!(evicted["message"], message, "{evicted}");
        let containers = containers_named(name, "main");
        assert_eq!(containers.len(), 1, "not restarted: {containers:#?}");
        assert_eq!(containers[0]["State"], "exited");
    }
}

/// `activeDeadlineSeconds` as the kubelet enforces it: the pod Failed with
/// DeadlineExceeded, its container stopped (not restarted, restartPolicy Always
/// notwithstanding) and shown terminated.
#[test]
fn a_pod_past_its_active_deadline_is_stopped_and_failed() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    mesh.write_manifest(
        "deadline.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: e2e-deadline}
spec:
  activeDeadlineSeconds: 4
  terminationGracePeriodSeconds: 2
  containers:
  - {name: main, image: localhost/busybox:1.35, command: ["sleep", "100000"]}
"#,
    );
    // One that finishes in time stays as it ended.
    mesh.write_manifest(
        "in-time.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: e2e-in-time}
spec:
  activeDeadlineSeconds: 2
  restartPolicy: Never
  containers:
  - {name: main, image: localhost/busybox:1.35, command: ["true"]}
"#,
    );
    mesh.wait_for("e2e-deadline Running", Duration::from_secs(30), || {
        (phase_of(&mesh, "e2e-deadline").as_deref() == Some("Running")).then_some(())
    });
    let pod = mesh.wait_for("DeadlineExceeded", Duration::from_secs(30), || {
        let pod = mesh.pod_status("default", "e2e-deadline")?;
        (pod["phase"] == "Failed").then_some(pod)
    });
    assert_eq!(pod["reason"], "DeadlineExceeded", "{pod}");
    assert_eq!(
        pod["message"],
        "Pod was active on the node longer than the specified deadline"
    );
    assert_eq!(phase_of(&mesh, "e2e-in-time").as_deref(), Some("Succeeded"));
    let containers = podman_containers("io.beemesh.pod.name=e2e-deadline");
    assert_eq!(containers.len(), 1, "restarted? {containers:?}");
    assert_eq!(containers[0]["State"], "exited", "{containers:?}");
}

#[test]
fn a_finished_pod_frees_its_agents_capacity() {
    // Room for one pod: a finished one must not hold it (the kubelet admits against
    // active pods only).
    let mut mesh = Mesh::new();
    mesh.start_agent(&["--max-pods", "1", "--memory", "256Mi"]);
    let pod = |name: &str, command: &str, restart: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  restartPolicy: {restart}\n  containers:\n  - name: main\n    image: localhost/busybox:1.35\n    command: [sh, -c, '{command}']\n    resources: {{requests: {{memory: 200Mi}}}}\n"
        )
    };
    mesh.write_manifest("done.yaml", &pod("e2e-done", "echo done", "Never"));
    mesh.wait_for("e2e-done Succeeded", Duration::from_secs(30), || {
        (phase_of(&mesh, "e2e-done").as_deref() == Some("Succeeded")).then_some(())
    });
    mesh.write_manifest("next.yaml", &pod("e2e-next", "sleep 100000", "Always"));
    mesh.wait_for("e2e-next Running", Duration::from_secs(30), || {
        (phase_of(&mesh, "e2e-next").as_deref() == Some("Running")).then_some(())
    });
    assert_eq!(phase_of(&mesh, "e2e-done").as_deref(), Some("Succeeded"));
}

#[test]
fn a_pod_whose_volume_cannot_be_made_waits_and_runs_once_it_can() {
    // A full disk, or any error making an emptyDir, is a wait with the reason (the
    // kubelet retries the mount), not a Failed pod that never runs again.
    let mut mesh = Mesh::new();
    let agent = mesh.start_agent(&[]);
    let volumes = mesh.agents[agent].state_dir.join("volumes");
    mesh.wait_for(
        "the agent's volumes directory",
        Duration::from_secs(30),
        || volumes.is_dir().then_some(()),
    );
    std::fs::remove_dir_all(&volumes).expect("remove volumes dir");
    std::fs::write(&volumes, "in the way").expect("a file where the directory goes");
    mesh.write_manifest(
        "scratch.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: e2e-scratch}\nspec:\n  terminationGracePeriodSeconds: 1\n  volumes: [{name: scratch, emptyDir: {}}]\n  containers:\n  - name: main\n    image: localhost/busybox:1.35\n    command: [sh, -c, 'echo ok > /scratch/f; sleep 100000']\n    volumeMounts: [{name: scratch, mountPath: /scratch}]\n",
    );
    let waiting = mesh.wait_for(
        "e2e-scratch waiting for its volume",
        Duration::from_secs(60),
        || {
            let pod = mesh.pod_status("default", "e2e-scratch")?;
            pod["message"]
                .as_str()?
                .starts_with("MountVolume.SetUp failed for volume \"scratch\"")
                .then_some(pod)
        },
    );
    assert_eq!(waiting["phase"], "Pending", "{waiting}");
    assert_eq!(waiting["reason"], "ContainerCreating", "{waiting}");
    // Tried again, still waiting, never Failed.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(phase_of(&mesh, "e2e-scratch").as_deref(), Some("Pending"));
    assert!(running_copies("e2e-scratch").is_empty());

    std::fs::remove_file(&volumes).expect("remove the file");
    std::fs::create_dir(&volumes).expect("volumes dir back");
    wait_running(&mesh, "e2e-scratch");
    let pod = mesh.pod_status("default", "e2e-scratch").expect("pod");
    assert!(pod["message"].is_null(), "{pod}");
    assert_eq!(running_copies("e2e-scratch").len(), 1);
}

#[test]
fn bad_manifests_get_clear_messages_and_do_not_disturb_good_pods() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    mesh.write_manifest("garbage.yaml", "key: [unclosed\n");
    mesh.write_manifest(
        "deploy.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
    );
    mesh.write_manifest(
        "bad-pods.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: e2e-empty}
spec: {containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: e2e-hostpath}
spec:
  volumes: [{name: root, hostPath: {path: /}}]
  containers: [{name: c, image: localhost/busybox:1.35, volumeMounts: [{name: root, mountPath: /host}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: e2e-badref}
spec:
  containers: [{name: c, image: "busybox latest"}]
---
apiVersion: v1
kind: Pod
metadata: {name: e2e-noimage}
spec:
  containers: [{name: c, image: localhost/does-not-exist:1, imagePullPolicy: IfNotPresent}]
"#,
    );
    mesh.write_manifest("good.yaml", &SLEEPER.replace("e2e-mover", "e2e-good"));

    mesh.wait_for("good pod Running", Duration::from_secs(60), || {
        (phase_of(&mesh, "e2e-good").as_deref() == Some("Running")).then_some(())
    });
    let empty = mesh.pod_status("default", "e2e-empty").expect("listed");
    assert_eq!(empty["phase"], "Failed");
    assert_eq!(empty["reason"], "UnsupportedPodSpec");
    assert!(
        empty["message"]
            .as_str()
            .unwrap_or_default()
            .contains("spec.containers"),
        "{empty}"
    );
    let hostpath = mesh.pod_status("default", "e2e-hostpath").expect("listed");
    assert_eq!(hostpath["phase"], "Failed");
    assert!(
        hostpath["message"]
            .as_str()
            .unwrap_or_default()
            .contains("hostPath"),
        "{hostpath}"
    );
    let badref = mesh.pod_status("default", "e2e-badref").expect("listed");
    assert_eq!(badref["phase"], "Failed");
    assert!(
        badref["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not a valid image reference"),
        "{badref}"
    );
    mesh.wait_for("ErrImagePull shown", Duration::from_secs(30), || {
        let out = mesh.node.as_ref().map(|n| n.output()).unwrap_or_default();
        (out.contains("default/e2e-noimage") && out.contains("ErrImagePull")).then_some(())
    });
    let out = mesh.node.as_ref().map(|n| n.output()).unwrap_or_default();
    assert!(
        out.contains("garbage.yaml (document 1): not valid YAML"),
        "{out}"
    );
    assert!(out.contains("apps/v1/Deployment is not supported"), "{out}");
    assert!(mesh.node().is_running());
    assert_eq!(phase_of(&mesh, "e2e-good").as_deref(), Some("Running"));
}

#[test]
fn probes_restarts_and_terminal_phases_follow_the_kubelet() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    mesh.write_manifest(
        "lifecycle.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: e2e-unhealthy}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: localhost/busybox:1.35
    command: ["sh", "-c", "touch /tmp/alive; sleep 2; rm /tmp/alive; sleep 100000"]
    livenessProbe:
      exec: {command: ["test", "-f", "/tmp/alive"]}
      periodSeconds: 1
      failureThreshold: 2
---
apiVersion: v1
kind: Pod
metadata: {name: e2e-crasher}
spec:
  restartPolicy: OnFailure
  containers:
  - name: main
    image: localhost/busybox:1.35
    command: ["sh", "-c", "echo failing; exit 3"]
---
apiVersion: v1
kind: Pod
metadata: {name: e2e-once}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: localhost/busybox:1.35
    command: ["sh", "-c", "echo done"]
"#,
    );
    // The liveness probe fails after 2 s: the container is killed and started again.
    mesh.wait_for("a liveness restart", Duration::from_secs(40), || {
        podman_containers("io.beemesh.pod.name=e2e-unhealthy")
            .iter()
            .any(|c| c["Labels"]["io.beemesh.attempt"] == "1")
            .then_some(())
    });
    assert_eq!(phase_of(&mesh, "e2e-unhealthy").as_deref(), Some("Running"));
    // OnFailure with exit 3: restarted at once, then held back: CrashLoopBackOff.
    mesh.wait_for("CrashLoopBackOff", Duration::from_secs(30), || {
        let out = mesh.node.as_ref().map(|n| n.output()).unwrap_or_default();
        out.lines()
            .any(|l| l.contains("default/e2e-crasher") && l.contains("CrashLoopBackOff"))
            .then_some(())
    });
    let attempts: BTreeSet<String> = podman_containers("io.beemesh.pod.name=e2e-crasher")
        .iter()
        .filter_map(|c| {
            c["Labels"]["io.beemesh.attempt"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(
        attempts.contains("1"),
        "restarted once at least: {attempts:?}"
    );
    mesh.wait_for("e2e-once Succeeded", Duration::from_secs(30), || {
        (phase_of(&mesh, "e2e-once").as_deref() == Some("Succeeded")).then_some(())
    });
}

#[test]
fn agents_work_only_for_the_node_they_joined_and_bad_tokens_get_nothing() {
    let mut mesh = Mesh::new();
    // An agent that trusts another node, and one whose token the node never issued:
    // neither ever runs the pod.
    let stranger = common::peer_id(&mesh.dir.path().join("someone-else"));
    mesh.start_agent(&["--trust", &stranger]);
    let forged = mesh.start_agent(&["--join", "abcdef.0123456789abcdef"]);
    mesh.write_manifest("trusted.yaml", &SLEEPER.replace("e2e-mover", "e2e-trusted"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while mesh.agents[forged].is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "the forged join was not refused\n{}",
            mesh.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = mesh.diagnostics();
    assert!(log.contains("refused the join token"), "{log}");
    let pod = mesh.wait_for(
        "the pod to wait for an agent",
        Duration::from_secs(20),
        || {
            let pod = mesh.pod_status("default", "e2e-trusted")?;
            (pod["reason"] == "Unschedulable").then_some(pod)
        },
    );
    assert!(pod["agent"].is_null(), "{pod}");
    // An agent that joins with the node's token runs it.
    let joined = mesh.start_agent(&[]);
    mesh.wait_for("e2e-trusted Running", Duration::from_secs(30), || {
        (phase_of(&mesh, "e2e-trusted").as_deref() == Some("Running")).then_some(())
    });
    let copies = running_copies("e2e-trusted");
    assert_eq!(copies.len(), 1);
    assert_eq!(
        copies[0].labels["io.beemesh.agent"],
        mesh.agents[joined].peer
    );
}

#[test]
fn pods_offered_together_spread_over_equal_agents() {
    // A window long enough for every bid on a loaded 2-core machine; the offer still
    // closes as soon as all agents that fit have bid.
    let mut mesh = Mesh::with_node_args(&["--offer-window-ms", "3000"]);
    for _ in 0..3 {
        mesh.start_agent(&[]);
    }
    let pods: String = (0..3)
        .map(|i| SLEEPER.replace("e2e-mover", &format!("e2e-spread-{i}")))
        .collect::<Vec<_>>()
        .join("\n---\n");
    // Agents must be known before the pods arrive, or the first offer waits for them.
    std::thread::sleep(Duration::from_secs(5));
    mesh.write_manifest("spread.yaml", &pods);
    let runners = mesh.wait_for("three pods running", Duration::from_secs(60), || {
        let runners: Vec<String> = (0..3)
            .flat_map(|i| running_copies(&format!("e2e-spread-{i}")))
            .map(|p| p.labels["io.beemesh.agent"].clone())
            .collect();
        (runners.len() == 3).then_some(runners)
    });
    let distinct: BTreeSet<&String> = runners.iter().collect();
    assert_eq!(distinct.len(), 3, "one pod per agent: {runners:?}");
    // Each agent runs its pods on its own subnet of the mesh pod CIDR, so their IPs
    // are unique across the mesh, not Podman's default network's on every agent.
    let mesh_cidr: ipnet::Ipv4Net = "10.64.0.0/12".parse().expect("cidr");
    let subnets: BTreeSet<ipnet::Ipv4Net> = (0..3)
        .map(|i| {
            let name = format!("e2e-spread-{i}");
            let ip = mesh.wait_for(&format!("{name}'s IP"), Duration::from_secs(20), || {
                mesh.pod_status("default", &name)
                    .and_then(|p| p["ip"].as_str()?.parse::<std::net::Ipv4Addr>().ok())
            });
            assert!(mesh_cidr.contains(&ip), "{name}: {ip}");
            ipnet::Ipv4Net::new(ip, 24).expect("prefix").trunc()
        })
        .collect();
    assert_eq!(subnets.len(), 3, "one subnet per agent: {subnets:?}");
    for subnet in subnets {
        let network = format!("beemesh-{}-24", subnet.network());
        let inspect = std::process::Command::new("podman")
            .args([
                "network",
                "inspect",
                &network,
                "--format",
                "{{range .Subnets}}{{.Subnet}}{{end}} {{.DNSEnabled}}",
            ])
            .output()
            .expect("podman network inspect");
        assert_eq!(
            String::from_utf8_lossy(&inspect.stdout).trim(),
            format!("{subnet} false"),
            "{network}"
        );
    }
}

#[test]
fn a_never_restarting_pod_fails_with_agent_lost_and_metrics_count_it() {
    let metrics_port = common::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut mesh = Mesh::with_node_args(&["--metrics-addr", &metrics_addr]);
    mesh.start_agent(&[]);
    mesh.write_manifest(
        "never.yaml",
        &SLEEPER
            .replace("e2e-mover", "e2e-never")
            .replace("spec:\n", "spec:\n  restartPolicy: Never\n"),
    );
    wait_running(&mesh, "e2e-never");
    mesh.agents[0].kill();
    let pod = mesh.wait_for("Failed with AgentLost", Duration::from_secs(30), || {
        let pod = mesh.pod_status("default", "e2e-never")?;
        (pod["phase"] == "Failed").then_some(pod)
    });
    assert_eq!(pod["reason"], "AgentLost", "{pod}");
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            &format!("http://{metrics_addr}/metrics"),
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("beemesh_agents_lost_total 1"), "{text}");
    assert!(text.contains("beemesh_assignments_total 1"), "{text}");
    assert!(
        text.contains("beemesh_mesh_messages_received_total{kind=\"heartbeat\"}"),
        "{text}"
    );
}

#[test]
fn a_changed_manifest_replaces_its_pod() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    let v1 = SLEEPER.replace("e2e-mover", "e2e-changed");
    mesh.write_manifest("changed.yaml", &v1);
    mesh.wait_for("v1 Running", Duration::from_secs(60), || {
        (phase_of(&mesh, "e2e-changed").as_deref() == Some("Running")).then_some(())
    });
    let before = running_copies("e2e-changed");
    assert_eq!(before.len(), 1);
    let old_uid = before[0].labels["io.beemesh.pod.uid"].clone();

    let changed_at = Instant::now();
    mesh.write_manifest("changed.yaml", &v1.replace("100000", "200000"));
    let after = mesh.wait_for("the new version alone", Duration::from_secs(30), || {
        let all = podman_pods("io.beemesh.pod.name=e2e-changed");
        (all.len() == 1
            && all[0].labels["io.beemesh.pod.uid"] != old_uid
            && (all[0].status == "Running" || all[0].status == "Degraded"))
            .then_some(all)
    });
    let new_uid = after[0].labels["io.beemesh.pod.uid"].clone();
    mesh.wait_for(
        "the new version's container running",
        Duration::from_secs(20),
        || {
            podman_containers(&format!("io.beemesh.pod.uid={new_uid}"))
                .iter()
                .any(|c| c["State"] == "running")
                .then_some(())
        },
    );
    assert!(
        changed_at.elapsed() < Duration::from_secs(20),
        "{:?}",
        changed_at.elapsed()
    );
}

#[test]
fn secrets_stay_off_disk_and_pods_a_reboot_stopped_run_again() {
    let mut mesh = Mesh::new();
    // An agent whose secrets directory is on a disk refuses to start.
    let on_disk = mesh
        .dir
        .path()
        .join("on-disk-secrets")
        .display()
        .to_string();
    let refused = mesh.start_agent(&["--secrets-dir", &on_disk]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while mesh.agents[refused].is_running() {
        assert!(Instant::now() < deadline, "the agent started");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        mesh.diagnostics()
            .contains("is not in memory-backed storage"),
        "{}",
        mesh.diagnostics()
    );

    let agent = mesh.start_agent(&[]);
    mesh.write_manifest("boot.yaml", &SLEEPER.replace("e2e-mover", "e2e-boot"));
    wait_running(&mesh, "e2e-boot");
    let before = running_copies("e2e-boot");
    assert_eq!(before.len(), 1);
    let epoch = mesh.pod_status("default", "e2e-boot").expect("pod")["epoch"].clone();

    // A reboot, as the agent sees it: its process gone, its tmpfs emptied (records and
    // secrets with it), its Podman pod stopped.
    let state = mesh.agents[agent].state_dir.clone();
    mesh.agents[agent].kill();
    let secrets = mesh.shm.path().join(state.file_name().expect("name"));
    std::fs::remove_dir_all(&secrets).expect("empty the tmpfs");
    let stopped = std::process::Command::new("podman")
        .args(["pod", "stop", "-t", "0", &before[0].id])
        .output()
        .expect("podman pod stop");
    assert!(stopped.status.success(), "{stopped:?}");
    mesh.start_agent_in(state, &[]);
    // The agent keeps the pod it finds without its record and lists it as such; the
    // node claims it by sending the assignment again, and its containers start again
    // where they were (same pod, same epoch), as the kubelet restarts a pod after a
    // reboot.
    let pod = mesh.wait_for("e2e-boot running again", Duration::from_secs(60), || {
        let pod = mesh.pod_status("default", "e2e-boot")?;
        let copies = running_copies("e2e-boot");
        (pod["phase"] == "Running" && copies.len() == 1).then_some(pod)
    });
    assert_eq!(pod["epoch"], epoch, "{pod}");
    assert_eq!(running_copies("e2e-boot")[0].id, before[0].id);
    let records = secrets.join("assignments");
    assert_eq!(
        std::fs::read_dir(&records).expect("records").count(),
        1,
        "the record written again"
    );
}

const STRICT: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: e2e-strict
  annotations: {beemesh.io/fencing: strict}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: localhost/busybox:1.35
    command: ["sleep", "100000"]
"#;

/// The containers of a pod that Podman runs.
fn running_containers(name: &str) -> Vec<serde_json::Value> {
    podman_containers(&format!("io.beemesh.pod.name={name}"))
        .into_iter()
        .filter(|c| c["State"] == "running")
        .collect()
}

#[test]
fn a_strict_pod_stops_when_its_owner_is_unreachable_past_the_lease_and_a_relaxed_one_runs_on() {
    let (lease, margin) = (Duration::from_secs(3), Duration::from_secs(2));
    let mut mesh = Mesh::with_node_args(&["--lease-seconds", "3", "--fencing-margin-seconds", "2"]);
    let metrics_addr = format!("127.0.0.1:{}", common::free_port());
    mesh.start_agent(&["--metrics-addr", &metrics_addr]);
    mesh.write_manifest("strict.yaml", STRICT);
    mesh.write_manifest("relaxed.yaml", &SLEEPER.replace("e2e-mover", "e2e-relaxed"));
    for name in ["e2e-strict", "e2e-relaxed"] {
        mesh.wait_for(name, Duration::from_secs(60), || {
            (phase_of(&mesh, name).as_deref() == Some("Running")).then_some(())
        });
    }
    let strict = running_copies("e2e-strict");
    assert_eq!(strict.len(), 1, "{strict:?}");
    let strict_epoch: u64 = strict[0].labels["io.beemesh.epoch"].parse().expect("epoch");
    let relaxed = running_containers("e2e-relaxed");
    assert_eq!(relaxed.len(), 1, "{relaxed:?}");
    let relaxed_id = relaxed[0]["Id"].clone();

    // The node freezes: the agent hears no renewal. Its strict copy must be gone before
    // the owner could place the pod again (the lease and margin after the last renewal,
    // which came before the freeze); the relaxed one runs on.
    let node_pid = mesh.node().child.id();
    signal(node_pid, "-STOP");
    let frozen_at = Instant::now();
    let stopped_after = loop {
        let elapsed = frozen_at.elapsed();
        if running_containers("e2e-strict").is_empty() {
            break elapsed;
        }
        assert!(
            elapsed < lease + margin,
            "the strict copy still runs {elapsed:?} after its owner froze\n{}",
            mesh.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("strict copy stopped {stopped_after:?} after the owner froze");
    std::thread::sleep(lease);
    let relaxed_now = running_containers("e2e-relaxed");
    assert_eq!(relaxed_now.len(), 1, "{relaxed_now:?}");
    assert_eq!(
        relaxed_now[0]["Id"], relaxed_id,
        "the relaxed pod ran through"
    );
    assert!(running_copies("e2e-strict").is_empty());
    let (code, metrics) = common::curl({
        let mut curl = std::process::Command::new("curl");
        curl.arg(format!("http://{metrics_addr}/metrics"));
        curl
    });
    assert_eq!(code, 200);
    assert!(metrics.contains("beemesh_pods_fenced_total 1"), "{metrics}");

    // The node thaws: it learns the copy is gone and places the pod again, once.
    signal(node_pid, "-CONT");
    let placed = mesh.wait_for("e2e-strict placed again", Duration::from_secs(60), || {
        let copies = running_copies("e2e-strict");
        assert!(copies.len() <= 1, "{copies:?}");
        let epoch: u64 = copies.first()?.labels["io.beemesh.epoch"].parse().ok()?;
        (epoch > strict_epoch && phase_of(&mesh, "e2e-strict").as_deref() == Some("Running"))
            .then_some(epoch)
    });
    assert!(placed > strict_epoch);
    let relaxed_now = running_containers("e2e-relaxed");
    assert_eq!(relaxed_now.len(), 1, "{relaxed_now:?}");
    assert_eq!(relaxed_now[0]["Id"], relaxed_id);
}

/// Sends `signal` (e.g. "-STOP") to a process.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid}");
}

#[test]
fn a_frozen_agent_s_strict_copy_is_removed_by_its_watchdog_before_the_pod_runs_elsewhere() {
    // The agent is declared lost before its lease runs out: the lease decides.
    let mut mesh = Mesh::with_node_args(&[
        "--lease-seconds",
        "3",
        "--fencing-margin-seconds",
        "3",
        "--agent-loss-seconds",
        "2",
    ]);
    mesh.start_agent(&[]);
    mesh.start_agent(&[]);
    mesh.write_manifest("strict.yaml", &STRICT.replace("e2e-strict", "e2e-frozen"));
    wait_running(&mesh, "e2e-frozen");
    let (frozen, old_epoch) = runner_of(&mesh, "e2e-frozen");
    let old_agent = mesh.agents[frozen].peer.clone();
    let frozen_pid = mesh.agents[frozen].child.id();

    // The runner freezes: it can neither renew nor stop anything. Its watchdog removes
    // the copy; only then does the pod start on the other agent. Sampled every 100 ms.
    signal(frozen_pid, "-STOP");
    let frozen_at = Instant::now();
    let mut gone_after = None;
    let moved = loop {
        let copies = running_containers("e2e-frozen");
        assert!(copies.len() <= 1, "two copies: {copies:?}");
        if gone_after.is_none()
            && running_copies("e2e-frozen")
                .iter()
                .all(|p| p.labels["io.beemesh.agent"] != old_agent)
        {
            gone_after = Some(frozen_at.elapsed());
        }
        if let Some(copy) = running_copies("e2e-frozen").into_iter().find(|p| {
            p.labels["io.beemesh.epoch"]
                .parse::<u64>()
                .is_ok_and(|e| e > old_epoch)
        }) {
            break copy;
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(60),
            "the pod did not move\n{}",
            mesh.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let moved_after = frozen_at.elapsed();
    assert_ne!(moved.labels["io.beemesh.agent"], old_agent);
    eprintln!(
        "frozen agent's copy removed after {:?}; running elsewhere after {moved_after:?}",
        gone_after.expect("removed before the move")
    );

    // The agent thaws: it keeps no copy, and the pod runs once.
    signal(frozen_pid, "-CONT");
    mesh.wait_for(
        "one copy, on the new agent",
        Duration::from_secs(30),
        || {
            let all = podman_pods("io.beemesh.pod.name=e2e-frozen");
            (all.len() == 1
                && all[0].labels["io.beemesh.agent"] == moved.labels["io.beemesh.agent"])
                .then_some(())
        },
    );
    mesh.wait_for("Running", Duration::from_secs(30), || {
        (phase_of(&mesh, "e2e-frozen").as_deref() == Some("Running")).then_some(())
    });
}

/// A Podman REST service of the test's own, on its own socket (same storage as the
/// machine's), which the test may kill without disturbing anyone else.
struct PrivatePodman {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl PrivatePodman {
    fn start(socket: std::path::PathBuf) -> PrivatePodman {
        let _ = std::fs::remove_file(&socket);
        let child = std::process::Command::new("podman")
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("podman system service starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "no socket at {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        PrivatePodman { child, socket }
    }

    fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivatePodman {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn an_agent_whose_podman_fails_takes_no_pods_and_its_relaxed_pods_move() {
    let mut mesh = Mesh::with_node_args(&["--agent-loss-seconds", "4"]);
    let socket = mesh.dir.path().join("podman.sock");
    let mut podman = PrivatePodman::start(socket.clone());
    let sick = mesh.start_agent(&["--podman-socket", &podman.url()]);
    let sick_peer = mesh.agents[sick].peer.clone();
    mesh.write_manifest("sick.yaml", &SLEEPER.replace("e2e-mover", "e2e-sick"));
    wait_running(&mesh, "e2e-sick");
    let healthy = mesh.start_agent(&[]);
    let healthy_peer = mesh.agents[healthy].peer.clone();

    // Its Podman service dies (the containers run on, under conmon): the agent says
    // so within a check, takes no new pod, and its relaxed pod runs elsewhere.
    podman.kill();
    let health = mesh.wait_for(
        "the agent reports its runtime",
        Duration::from_secs(30),
        || {
            let status = mesh.status()?;
            let agent = status["agents"]
                .as_array()?
                .iter()
                .find(|a| a["peer"] == sick_peer.as_str())?
                .clone();
            agent["health"]["runtime_error"]
                .is_string()
                .then_some(agent)
        },
    );
    eprintln!("unhealthy agent: {}", health["health"]);
    mesh.write_manifest("new.yaml", &SLEEPER.replace("e2e-mover", "e2e-sick-new"));
    for name in ["e2e-sick-new", "e2e-sick"] {
        mesh.wait_for(name, Duration::from_secs(60), || {
            let pod = mesh.pod_status("default", name)?;
            (pod["phase"] == "Running" && pod["agent"] == healthy_peer.as_str()).then_some(())
        });
    }
    assert!(running_copies("e2e-sick-new")
        .iter()
        .all(|p| p.labels["io.beemesh.agent"] == healthy_peer));

    // Podman comes back: the agent is healthy again and stops its superseded copy.
    let _podman = PrivatePodman::start(socket);
    mesh.wait_for("one copy of e2e-sick", Duration::from_secs(60), || {
        let copies = running_copies("e2e-sick");
        (copies.len() == 1 && copies[0].labels["io.beemesh.agent"] == healthy_peer).then_some(())
    });
    mesh.wait_for("the agent healthy again", Duration::from_secs(30), || {
        let status = mesh.status()?;
        status["agents"]
            .as_array()?
            .iter()
            .any(|a| a["peer"] == sick_peer.as_str() && a["health"]["runtime_error"].is_null())
            .then_some(())
    });
}

#[test]
fn a_copy_given_up_while_every_runtime_failed_is_taken_back_when_podman_works_again() {
    // The only agent's Podman fails past the loss timeout: its relaxed pod is given up,
    // but there is nowhere else to run it and its container runs on under conmon.
    // When Podman answers again the copy is taken back as it is: same epoch, same
    // container, no restart.
    let mut mesh = Mesh::with_node_args(&["--agent-loss-seconds", "3"]);
    let socket = mesh.dir.path().join("podman.sock");
    let mut podman = PrivatePodman::start(socket.clone());
    let agent = mesh.start_agent(&["--podman-socket", &podman.url()]);
    let peer = mesh.agents[agent].peer.clone();
    mesh.write_manifest("alone.yaml", &SLEEPER.replace("e2e-mover", "e2e-alone"));
    wait_running(&mesh, "e2e-alone");
    let (_, epoch) = runner_of(&mesh, "e2e-alone");
    let containers = || {
        running_containers("e2e-alone")
            .iter()
            .filter_map(|c| c["Id"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    let before = containers();

    podman.kill();
    let given_up = mesh.wait_for("the copy given up", Duration::from_secs(60), || {
        let pod = mesh.pod_status("default", "e2e-alone")?;
        pod["agent"].is_null().then_some(pod)
    });
    eprintln!("given up: {given_up}");
    let _podman = PrivatePodman::start(socket);
    let back = mesh.wait_for("the copy taken back", Duration::from_secs(60), || {
        let pod = mesh.pod_status("default", "e2e-alone")?;
        (pod["agent"] == peer.as_str() && pod["phase"] == "Running").then_some(pod)
    });
    assert_eq!(back["epoch"], epoch, "{back}");
    assert_eq!(containers(), before, "the same container runs on");
    assert_eq!(runner_of(&mesh, "e2e-alone"), (agent, epoch));
}

#[test]
fn pods_of_an_owner_gone_for_good_are_stopped_after_owner_gone_seconds() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&["--owner-gone-seconds", "6"]);
    mesh.write_manifest("orphan.yaml", &SLEEPER.replace("e2e-mover", "e2e-orphan"));
    wait_running(&mesh, "e2e-orphan");
    // Heard from regularly, the owner keeps its pod running past the limit.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(running_copies("e2e-orphan").len(), 1);

    mesh.node().kill();
    let gone_at = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(running_copies("e2e-orphan").len(), 1, "stopped too early");
    mesh.wait_for("the orphan stopped", Duration::from_secs(40), || {
        podman_pods("io.beemesh.pod.name=e2e-orphan")
            .is_empty()
            .then_some(())
    });
    eprintln!(
        "orphan stopped {:?} after its owner went",
        gone_at.elapsed()
    );
}

#[test]
fn an_agent_that_lost_a_record_asks_the_owner_and_keeps_the_running_pod() {
    // A short lease: the strict pod's copy must get a fresh one with the claim.
    let mut mesh = Mesh::with_node_args(&["--lease-seconds", "3", "--fencing-margin-seconds", "2"]);
    let first = mesh.start_agent(&[]);
    mesh.write_manifest(
        "unrecorded.yaml",
        &SLEEPER.replace("e2e-mover", "e2e-unrecorded"),
    );
    mesh.write_manifest(
        "strict.yaml",
        &STRICT.replace("e2e-strict", "e2e-unrecorded-strict"),
    );
    let names = ["e2e-unrecorded", "e2e-unrecorded-strict"];
    for name in names {
        wait_running(&mesh, name);
    }
    let containers = |name: &str| -> Vec<String> {
        podman_containers(&format!("io.beemesh.pod.name={name}"))
            .iter()
            .filter_map(|c| c["Id"].as_str().map(str::to_owned))
            .collect()
    };
    let before: Vec<(String, Vec<String>)> = names
        .iter()
        .map(|name| (running_copies(name)[0].id.clone(), containers(name)))
        .collect();

    // The agent restarts without its assignment records (say its tmpfs was cleared).
    let state = mesh.agents[first].state_dir.clone();
    mesh.agents[first].kill();
    let records = mesh
        .shm
        .path()
        .join(state.file_name().expect("name"))
        .join("assignments");
    let removed = std::fs::read_dir(&records)
        .expect("records")
        .flatten()
        .map(|entry| std::fs::remove_file(entry.path()).expect("remove record"))
        .count();
    assert_eq!(removed, 2);
    mesh.start_agent_in(state, &[]);

    // The owner claims them: the same containers carry on, at the same epochs, and the
    // agent has its records again. The strict pod's lease goes on being renewed.
    mesh.wait_for("the records written again", Duration::from_secs(30), || {
        let count = std::fs::read_dir(&records).ok()?.flatten().count();
        (count == 2).then_some(())
    });
    std::thread::sleep(Duration::from_secs(8));
    for (name, (pod, ids)) in names.iter().zip(&before) {
        wait_running(&mesh, name);
        let after = running_copies(name);
        assert_eq!(after.len(), 1, "{after:?}");
        assert_eq!(&after[0].id, pod, "{name}");
        assert_eq!(&containers(name), ids, "{name}");
    }
}

/// A pod's status message once it mentions `text`.
fn wait_message(mesh: &Mesh, name: &str, text: &str) -> serde_json::Value {
    mesh.wait_for(&format!("{name}: {text}"), Duration::from_secs(30), || {
        let pod = mesh.pod_status("default", name)?;
        pod["message"]
            .as_str()
            .is_some_and(|m| m.contains(text))
            .then_some(pod)
    })
}

#[test]
fn agents_run_only_what_their_policy_allows_and_name_the_rule_otherwise() {
    let mut mesh = Mesh::new();
    let policy = mesh.dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "level: baseline\nhostPorts: ['20000-20100']\nimages: [localhost/busybox]\n\
         quotas: {default: {pods: 2}}\n",
    )
    .expect("policy file");
    let metrics_addr = format!("127.0.0.1:{}", common::free_port());
    mesh.start_agent(&[
        "--policy-file",
        &policy.display().to_string(),
        "--metrics-addr",
        &metrics_addr,
    ]);
    let sleeper = |name: &str, extra: &str| {
        SLEEPER
            .replace("e2e-mover", name)
            .replace("    command:", &format!("{extra}    command:"))
    };
    mesh.write_manifest("good.yaml", &sleeper("e2e-allowed", ""));
    wait_running(&mesh, "e2e-allowed");
    mesh.write_manifest(
        "privileged.yaml",
        &sleeper(
            "e2e-privileged",
            "    securityContext: {privileged: true}\n",
        ),
    );
    mesh.write_manifest(
        "unconfined.yaml",
        &sleeper(
            "e2e-unconfined",
            "    securityContext: {seccompProfile: {type: Unconfined}}\n",
        ),
    );
    mesh.write_manifest(
        "image.yaml",
        &sleeper("e2e-image", "")
            .replace("localhost/busybox:1.35", "docker.io/library/busybox:1.35"),
    );
    mesh.write_manifest(
        "port.yaml",
        &sleeper(
            "e2e-port",
            "    ports: [{containerPort: 80, hostPort: 8080}]\n",
        ),
    );
    let cases = [
        (
            "e2e-privileged",
            "rule baseline:privileged: spec.containers[0].securityContext.privileged",
        ),
        ("e2e-unconfined", "rule baseline:seccompProfile_baseline"),
        ("e2e-image", "rule images: spec.containers[0].image"),
        (
            "e2e-port",
            "host port 8080 is not allowed on this agent (allowed: 20000-20100)",
        ),
    ];
    for (name, rule) in cases {
        let pod = wait_message(&mesh, name, rule);
        assert_eq!(pod["phase"], "Pending", "{pod}");
        // Refused once, the spec gets no more bids: the status keeps saying why.
        let pod = wait_message(&mesh, name, "refused before: ");
        assert!(
            pod["message"].as_str().unwrap_or_default().contains(rule),
            "{pod}"
        );
    }
    // The quota of two pods per owner: the third waits, the allowed pod runs on.
    mesh.write_manifest("second.yaml", &sleeper("e2e-second", ""));
    wait_running(&mesh, "e2e-second");
    mesh.write_manifest("third.yaml", &sleeper("e2e-third", ""));
    let third = wait_message(&mesh, "e2e-third", "did not bid");
    assert_eq!(third["phase"], "Pending", "{third}");
    for name in [
        "e2e-privileged",
        "e2e-unconfined",
        "e2e-image",
        "e2e-port",
        "e2e-third",
    ] {
        assert!(
            podman_pods(&format!("io.beemesh.pod.name={name}")).is_empty(),
            "{name} has a Podman pod"
        );
    }
    assert_eq!(phase_of(&mesh, "e2e-allowed").as_deref(), Some("Running"));
    // Room again: the waiting pod runs.
    mesh.remove_manifest("good.yaml");
    wait_running(&mesh, "e2e-third");

    let (code, metrics) = common::curl({
        let mut curl = std::process::Command::new("curl");
        curl.arg(format!("http://{metrics_addr}/metrics"));
        curl
    });
    assert_eq!(code, 200);
    for rule in [
        "baseline:privileged",
        "baseline:seccompProfile_baseline",
        "images",
        "hostPorts",
    ] {
        assert!(
            metrics.contains(&format!(
                "beemesh_policy_refusals_total{{rule=\"{rule}\"}} 1"
            )),
            "{rule} counted once: {metrics}"
        );
    }
}

#[test]
fn mesh_pod_subnet_flags_that_cannot_work_stop_the_node_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (flags, reason) in [
        (
            [
                "--mesh-pod-cidr",
                "10.64.0.0/16",
                "--mesh-pod-subnet-prefix",
                "12",
            ],
            "the per-agent prefix /12 is shorter than the mesh pod CIDR 10.64.0.0/16",
        ),
        (
            [
                "--mesh-pod-cidr",
                "10.64.0.0/16",
                "--mesh-pod-subnet-prefix",
                "31",
            ],
            "the per-agent prefix /31 leaves no room for pods (at most /30)",
        ),
        (
            [
                "--mesh-pod-cidr",
                "10.64.0.0",
                "--mesh-pod-subnet-prefix",
                "24",
            ],
            "invalid value '10.64.0.0' for '--mesh-pod-cidr <CIDR>'",
        ),
    ] {
        let mut node = std::process::Command::new(common::bin())
            .args([
                "node",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--pod-manifest-path",
            ])
            .arg(dir.path())
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(flags)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("beemesh node");
        let deadline = Instant::now() + Duration::from_secs(20);
        while node.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = node.kill();
                panic!("{flags:?}: the node started");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = node.wait_with_output().expect("output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?}: {stderr}");
        assert!(stderr.contains(reason), "{flags:?}: {stderr}");
    }
}

#[test]
fn an_agent_refuses_a_pod_subnet_over_its_hosts_own_network() {
    let host_network = common::HostNetwork::up("10.78.0.1/16");
    let mut mesh = Mesh::with_node_args(&["--mesh-pod-cidr", "10.78.0.0/16"]);
    mesh.start_agent(&[]);
    mesh.write_manifest("pod.yaml", &SLEEPER.replace("e2e-mover", "e2e-overlap"));
    wait_message(
        &mesh,
        "e2e-overlap",
        &format!(
            "the pod subnet 10.78.0.0/24 overlaps this host's network 10.78.0.0/16 on {}",
            host_network.0
        ),
    );
    assert!(podman_pods("io.beemesh.pod.name=e2e-overlap").is_empty());
}

#[test]
fn a_bad_policy_file_stops_the_agent_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "level: lax\n").expect("policy file");
    let out = std::process::Command::new(common::bin())
        .args([
            "agent",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--insecure-trust-any",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--policy-file")
        .arg(&policy)
        .output()
        .expect("agent runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "policy file {}: level: unknown variant `lax`",
            policy.display()
        )),
        "{stderr}"
    );
}

/// The containers of a pod (not infra) that carry `container` as their name label.
fn containers_named(pod: &str, container: &str) -> Vec<serde_json::Value> {
    podman_containers(&format!("io.beemesh.pod.name={pod}"))
        .into_iter()
        .filter(|c| c["Labels"]["io.beemesh.container"] == container)
        .collect()
}

#[test]
fn a_subpath_through_a_symlink_is_refused_and_the_host_stays_out_of_reach() {
    // CVE-2017-1002101 in its BeeMesh form: a container plants symbolic links in an
    // emptyDir, and a later container mounts them as its subPath. Followed, the first
    // would give the app the agent host's root, the second would make the agent create
    // a world-writable directory on the host.
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    let secret = format!("host-only-{}", std::process::id());
    let marker = mesh.dir.path().join("host-marker");
    std::fs::write(&marker, &secret).expect("marker");
    let host_dir = mesh.dir.path().join("host-dir");
    std::fs::create_dir(&host_dir).expect("host dir");
    mesh.write_manifest(
        "escape.yaml",
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: e2e-escape}}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{{name: data, emptyDir: {{}}}}]
  initContainers:
  - name: plant
    image: localhost/busybox:1.35
    command: [sh, -c, 'ln -s / /data/escape && ln -s {host_dir} /data/mid']
    volumeMounts: [{{name: data, mountPath: /data}}]
  containers:
  - name: app
    image: localhost/busybox:1.35
    command: [sh, -c, 'cat /host{marker}; sleep 100000']
    volumeMounts: [{{name: data, mountPath: /host, subPath: escape}}]
  - name: mid
    image: localhost/busybox:1.35
    command: [sleep, '100000']
    volumeMounts: [{{name: data, mountPath: /created, subPath: mid/created}}]
"#,
            host_dir = host_dir.display(),
            marker = marker.display(),
        ),
    );
    let refused = mesh.wait_for(
        "e2e-escape refused with its reason",
        Duration::from_secs(60),
        || {
            let pod = mesh.pod_status("default", "e2e-escape")?;
            (pod["reason"] == "CreateContainerConfigError").then_some(pod)
        },
    );
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(
            "failed to prepare subPath for volumeMount \"data\" of container \"app\": "
        ),
        "{refused}"
    );
    assert!(
        message.contains("\"escape\" is a symbolic link"),
        "{refused}"
    );
    // It stays that way (retried with the crash-loop back-off, refused each time):
    // no container of either mounts anything, nothing was made on the host.
    std::thread::sleep(Duration::from_secs(3));
    let pod = mesh.pod_status("default", "e2e-escape").expect("listed");
    assert_eq!(pod["phase"], "Pending", "{pod}");
    assert_eq!(pod["reason"], "CreateContainerConfigError", "{pod}");
    for name in ["app", "mid"] {
        let made = containers_named("e2e-escape", name);
        for container in &made {
            let id = container["Id"].as_str().unwrap_or_default();
            assert!(!podman_logs(id).contains(&secret), "{name} read the host");
        }
        assert!(made.is_empty(), "{name}: {made:?}");
    }
    assert!(
        !host_dir.join("created").exists(),
        "the agent made a directory through the link"
    );
    assert_eq!(
        std::fs::read_dir(&host_dir).expect("host dir").count(),
        0,
        "nothing made on the host"
    );
}

#[test]
fn subpaths_of_a_real_and_a_missing_directory_are_mounted_beside_a_running_writer() {
    let mut mesh = Mesh::new();
    let agent = mesh.start_agent(&[]);
    mesh.write_manifest(
        "subpath.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: e2e-subpath}
spec:
  terminationGracePeriodSeconds: 1
  volumes:
  - {name: data, emptyDir: {}}
  - name: info
    downwardAPI: {items: [{path: pod/name, fieldRef: {fieldPath: metadata.name}}]}
  initContainers:
  - name: prepare
    image: localhost/busybox:1.35
    command: [sh, -c, 'mkdir -p /data/real && echo from-init > /data/real/f']
    volumeMounts: [{name: data, mountPath: /data}]
  containers:
  # Runs first, with the whole volume writable: paused while app's subPaths are
  # mounted, and running again after.
  - name: writer
    image: localhost/busybox:1.35
    command: [sh, -c, 'while true; do date > /data/tick; sleep 0.2; done']
    volumeMounts: [{name: data, mountPath: /data}]
  - name: app
    image: localhost/busybox:1.35
    command: [sh, -c, 'cat /real/f; echo written > /new/file; echo name=$(cat /name); stat -c mode=%a /new; sleep 100000']
    volumeMounts:
    - {name: data, mountPath: /real, subPath: real}
    - {name: data, mountPath: /new, subPath: made/by/agent}
    # A file volume's subPath naming a file.
    - {name: info, mountPath: /name, subPath: pod/name}
"#,
    );
    wait_running(&mesh, "e2e-subpath");
    let app = containers_named("e2e-subpath", "app");
    assert_eq!(app.len(), 1, "{app:?}");
    let id = app[0]["Id"].as_str().expect("id").to_string();
    let logs = mesh.wait_for("app's output", Duration::from_secs(10), || {
        let logs = podman_logs(&id);
        logs.contains("mode=").then_some(logs)
    });
    assert!(logs.contains("from-init"), "{logs}");
    assert!(logs.contains("name=e2e-subpath"), "{logs}");
    // Made by the agent with the emptyDir's mode, inside the volume.
    assert!(logs.contains("mode=777"), "{logs}");
    let volumes = mesh.agents[agent].state_dir.join("volumes");
    let written: Vec<_> = std::fs::read_dir(&volumes)
        .expect("volumes")
        .flatten()
        .map(|pod| pod.path().join("data/made/by/agent/file"))
        .filter(|file| file.is_file())
        .collect();
    assert_eq!(written.len(), 1, "{written:?}");
    let writer = containers_named("e2e-subpath", "writer");
    assert_eq!(writer.len(), 1, "{writer:?}");
    assert_eq!(writer[0]["State"], "running", "{writer:?}");
    // One left paused (say the agent stopped while app started) is unpaused when the
    // agent next looks at it.
    let writer_id = writer[0]["Id"].as_str().expect("id").to_string();
    let paused = std::process::Command::new("podman")
        .args(["pause", &writer_id])
        .output()
        .expect("podman pause");
    assert!(paused.status.success(), "{paused:?}");
    mesh.wait_for("the writer unpaused", Duration::from_secs(10), || {
        let writer = containers_named("e2e-subpath", "writer");
        (writer.len() == 1 && writer[0]["State"] == "running").then_some(())
    });
}

#[test]
fn a_container_swapping_a_subpath_for_a_link_cannot_win_the_race() {
    // The subPath is checked link-free, then Podman resolves it again to mount it. A
    // sibling flipping it between a directory and a link to / all the while would win
    // that race now and then if it kept running; it is paused in between.
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    let secret = format!("host-only-{}", std::process::id());
    let marker = mesh.dir.path().join("race-marker");
    std::fs::write(&marker, &secret).expect("marker");
    let victims = 8;
    let mut manifest = String::from(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: e2e-race}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{name: data, emptyDir: {}}]
  containers:
  - name: racer
    image: localhost/busybox:1.35
    command: [sh, -c, 'mkdir -p /data/d; while true; do mv /data/d /data/d.real; ln -s / /data/d; rm /data/d; mv /data/d.real /data/d; done']
    volumeMounts: [{name: data, mountPath: /data}]
"#,
    );
    for n in 0..victims {
        manifest.push_str(&format!(
            r#"  - name: victim{n}
    image: localhost/busybox:1.35
    command: [sh, -c, 'cat /d{marker}; echo checked; sleep 100000']
    volumeMounts: [{{name: data, mountPath: /d, subPath: d}}]
"#,
            marker = marker.display()
        ));
    }
    mesh.write_manifest("race.yaml", &manifest);
    // Each victim starts with the directory, or is refused (a link at the time) and
    // tried again; let several of them through before looking.
    let started = mesh.wait_for("victims started", Duration::from_secs(90), || {
        let ids: Vec<String> = (0..victims)
            .flat_map(|n| containers_named("e2e-race", &format!("victim{n}")))
            .filter_map(|c| c["Id"].as_str().map(str::to_owned))
            .collect();
        (ids.len() >= victims / 2).then_some(ids)
    });
    std::thread::sleep(Duration::from_secs(2));
    let logs: Vec<String> = started.iter().map(|id| podman_logs(id)).collect();
    for log in &logs {
        assert!(!log.contains(&secret), "a victim read the host: {log}");
    }
    assert!(logs.iter().any(|log| log.contains("checked")), "{logs:?}");
    // Paused only while a victim starts (those refused are tried again meanwhile).
    mesh.wait_for("the racer running", Duration::from_secs(10), || {
        let racer = containers_named("e2e-race", "racer");
        (racer.len() == 1 && racer[0]["State"] == "running").then_some(())
    });
    eprintln!("{} of {victims} victims started", started.len());
}
