//! Stateful workloads end to end, standalone: three pods annotated with one Raft group,
//! each on its own agent, get a leader and a replicated key-value store through the
//! Unix socket in their containers; the leader's agent killed, another leads within
//! 5 s and no acknowledged write is lost; the group's state goes with its pods. A
//! strict pod of a group (as a StatefulSet's) moves only once the group gives its seat
//! to the new copy. The node, the agents, Podman and the mesh are real. Requires
//! hack/install-podman.sh and hack/build-test-image.sh.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::group::{self, call};
use common::{podman_containers, Mesh};
use serde_json::Value;

/// A pod of group `db` that sleeps, on the agent labelled slot=`slot`.
fn member(name: &str, slot: usize) -> String {
    member_fenced(name, slot, "relaxed")
}

/// As [`member`], with its `beemesh.io/fencing`.
fn member_fenced(name: &str, slot: usize, fencing: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  annotations: {{beemesh.io/raft-group: db, beemesh.io/agent-selector: "slot={slot}", beemesh.io/fencing: {fencing}}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: app
    image: localhost/busybox:1.35
    command: [sleep, "3600"]
"#
    )
}

/// The running container of pod `name`.
fn container_of(name: &str) -> Option<Value> {
    group::running_container(&format!("io.beemesh.pod.name={name}"))
}

fn exec(container: &str, script: &str) -> String {
    let out = Command::new("podman")
        .args(["exec", container, "sh", "-c", script])
        .output()
        .expect("podman exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The group's socket as pod `name`'s container sees it.
fn socket_of(name: &str) -> Option<PathBuf> {
    group::group_socket(&format!("io.beemesh.pod.name={name}"))
}

/// The leading pod every member agrees on, if they do.
fn agreed_leader(sockets: &[PathBuf]) -> Option<String> {
    let leaders: Vec<Option<String>> = sockets
        .iter()
        .map(|s| {
            let (_, body) = call(s, "GET", "/leader", "").ok()?;
            body["leader"]["pod"].as_str().map(str::to_owned)
        })
        .collect();
    let first = leaders.first()?.clone()?;
    leaders
        .iter()
        .all(|l| l.as_deref() == Some(&first))
        .then_some(first)
}

#[test]
fn an_annotated_group_elects_a_leader_replicates_writes_survives_its_leaders_loss_and_goes_with_its_pods(
) {
    let mut mesh = Mesh::new();
    for slot in 0..3 {
        mesh.start_agent(&["--label", &format!("slot={slot}")]);
    }
    mesh.wait_for("three agents heard", Duration::from_secs(30), || {
        (mesh.status()?["agents"].as_array()?.len() == 3).then_some(())
    });
    let names = ["db-0", "db-1", "db-2"];
    for (slot, name) in names.iter().enumerate() {
        mesh.write_manifest(&format!("{name}.yaml"), &member(name, slot));
    }
    let sockets: Vec<PathBuf> =
        mesh.wait_for("three members running", Duration::from_secs(90), || {
            names.iter().map(|n| socket_of(n)).collect()
        });

    // Every container has the socket and its variable.
    let id = container_of("db-1").expect("db-1 runs")["Id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(
        exec(&id, "echo $BEEMESH_GROUP_SOCKET").trim(),
        "/run/beemesh/group.sock"
    );
    assert!(exec(&id, "ls -l /run/beemesh/group.sock").starts_with('s'));
    let (status, me) = call(&sockets[1], "GET", "/self", "").expect("GET /self");
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["pod"], "db-1", "{me}");
    assert_eq!(me["group"], "db", "{me}");
    // The README's curl examples, with curl as the client.
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10", "--unix-socket"])
            .arg(&sockets[1])
            .args(args)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let me = curl(&["http://group/self"]);
    assert!(me.contains(r#""pod":"db-1""#), "{me}");
    let stored = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        "hello",
        "http://group/kv/curl",
    ]);
    assert!(stored.contains(r#""result":"stored""#), "{stored}");
    let got = curl(&["http://group/kv/curl"]);
    assert!(got.contains(r#""value":"hello""#), "{got}");
    let created = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        "x",
        "http://group/kv/curl?revision=0",
    ]);
    assert!(created.contains(r#""result":"conflict""#), "{created}");

    let started = Instant::now();
    let leader = mesh.wait_for(
        "the members agree on a leader",
        Duration::from_secs(30),
        || agreed_leader(&sockets),
    );
    eprintln!("leader {leader} agreed after {:?}", started.elapsed());

    // Written through one pod, read through the others.
    let (status, put) = call(&sockets[0], "PUT", "/kv/greeting", "hello").expect("PUT");
    assert_eq!(status, 200, "{put}");
    let revision = put["revision"].as_u64().expect("a revision");
    for socket in &sockets[1..] {
        let (status, got) = call(socket, "GET", "/kv/greeting", "").expect("GET");
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["value"], "hello", "{got}");
        assert_eq!(got["revision"], revision, "{got}");
    }
    // Compare-and-swap on the revision.
    let (status, conflict) = call(
        &sockets[2],
        "PUT",
        &format!("/kv/greeting?revision={}", revision + 100),
        "no",
    )
    .expect("CAS");
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["current"], revision, "{conflict}");
    let (status, swapped) = call(
        &sockets[2],
        "PUT",
        &format!("/kv/greeting?revision={revision}"),
        "hi",
    )
    .expect("CAS");
    assert_eq!(status, 200, "{swapped}");
    let (status, absent) = call(&sockets[1], "GET", "/kv/nothing", "").expect("GET");
    assert_eq!(status, 404, "{absent}");
    let (status, bad) = call(&sockets[1], "PUT", "/kv/a%20b", "x").expect("PUT");
    assert_eq!(status, 400, "{bad}");
    // A lock: one holder at a time, with a fencing token.
    let (status, locked) =
        call(&sockets[0], "POST", "/lock/primary?lease_ms=60000", "").expect("lock");
    assert_eq!(status, 200, "{locked}");
    let (status, held) =
        call(&sockets[1], "POST", "/lock/primary?lease_ms=60000", "").expect("lock");
    assert_eq!(status, 409, "{held}");
    assert_eq!(held["holder"], "db-0", "{held}");
    // Writes acknowledged before the leader goes.
    for i in 0..20 {
        let (status, body) =
            call(&sockets[i % 3], "PUT", &format!("/kv/k{i}"), &i.to_string()).expect("PUT");
        assert_eq!(status, 200, "{body}");
    }

    // The leader's agent is killed: the two others elect a leader of their own.
    let leader_index = names
        .iter()
        .position(|n| *n == leader)
        .expect("a member leads");
    let leader_agent = mesh
        .pod_status("default", &leader)
        .expect("leader's status")["agent"]
        .as_str()
        .expect("placed")
        .to_owned();
    let killed = Instant::now();
    let agent_index = mesh.kill_agent(&leader_agent);
    let others: Vec<PathBuf> = (0..3)
        .filter(|i| *i != leader_index)
        .map(|i| sockets[i].clone())
        .collect();
    let new_leader = mesh.wait_for("a new leader", Duration::from_secs(15), || {
        agreed_leader(&others).filter(|l| *l != leader)
    });
    let failover = killed.elapsed();
    eprintln!("{new_leader} leads {failover:?} after {leader}'s agent was killed");
    assert!(
        failover < Duration::from_secs(5),
        "fail-over took {failover:?}"
    );
    // Nothing acknowledged is lost, and the group takes writes again.
    let (status, listed) = call(&others[0], "GET", "/kv?prefix=k", "").expect("list");
    assert_eq!(status, 200, "{listed}");
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(20),
        "{listed}"
    );
    let (_, got) = call(&others[1], "GET", "/kv/greeting", "").expect("GET");
    assert_eq!(got["value"], "hi", "{got}");
    let (status, put) = call(&others[1], "PUT", "/kv/after", "failover").expect("PUT");
    assert_eq!(status, 200, "{put}");

    // The killed agent starts again on its state: it adopts its pod (which ran on under
    // Podman), the pod's socket comes back, and its member rejoins from its log and
    // follows the new leader.
    let state = mesh.agents[agent_index].state_dir.clone();
    mesh.start_agent_in(state, &["--label", &format!("slot={agent_index}")]);
    mesh.wait_for(
        "the restarted member follows",
        Duration::from_secs(60),
        || {
            let (status, body) = call(&sockets[leader_index], "GET", "/leader", "").ok()?;
            (status == 200 && body["leader"]["pod"] == new_leader.as_str()).then_some(())
        },
    );
    let (status, got) = call(&sockets[leader_index], "GET", "/kv/after", "").expect("GET");
    assert_eq!(
        (status, got["value"].as_str()),
        (200, Some("failover")),
        "{got}"
    );

    // The workload deleted: every member deletes the group's state.
    for name in names {
        mesh.remove_manifest(&format!("{name}.yaml"));
    }
    mesh.wait_for("the group's state deleted", Duration::from_secs(60), || {
        mesh.agents
            .iter()
            .all(|agent| group::group_dirs(&agent.state_dir).is_empty())
            .then_some(())
    });
}

/// A strict pod of a group runs only while the group keeps its seat for that copy. Its
/// agent killed, the node (with a short lease) places it again within seconds, but
/// the new copy's containers wait, saying why, until the group has seen the seat
/// unrenewed for a seat lease and margin; the two copies never run at once.
#[test]
fn a_strict_pods_new_copy_waits_for_its_seat_in_the_group_and_never_runs_beside_the_old() {
    use beemesh::agent::lease::{SEAT_LEASE_MS, SEAT_MARGIN_MS};
    let mut mesh = Mesh::with_node_args(&["--lease-seconds", "4", "--fencing-margin-seconds", "1"]);
    for slot in 0..3 {
        mesh.start_agent(&["--label", &format!("slot={slot}")]);
    }
    mesh.wait_for("three agents heard", Duration::from_secs(30), || {
        (mesh.status()?["agents"].as_array()?.len() == 3).then_some(())
    });
    // Named apart from the other test's pods, which may run at the same time.
    let names = ["seated-0", "seated-1", "seated-2"];
    for (slot, name) in names.iter().enumerate() {
        mesh.write_manifest(
            &format!("{name}.yaml"),
            &member_fenced(name, slot, "strict"),
        );
    }
    let sockets: Vec<PathBuf> = mesh.wait_for(
        "three seated members running",
        Duration::from_secs(90),
        || names.iter().map(|n| socket_of(n)).collect(),
    );
    mesh.wait_for(
        "the members agree on a leader",
        Duration::from_secs(30),
        || agreed_leader(&sockets),
    );
    let (status, put) = call(&sockets[1], "PUT", "/kv/before", "move").expect("PUT");
    assert_eq!(status, 200, "{put}");

    // A second agent where seated-0 may go, then seated-0's agent killed.
    mesh.start_agent(&["--label", "slot=0"]);
    mesh.wait_for("four agents heard", Duration::from_secs(30), || {
        (mesh.status()?["agents"].as_array()?.len() == 4).then_some(())
    });
    let old = container_of("seated-0").expect("seated-0 runs")["Id"]
        .as_str()
        .expect("id")
        .to_owned();
    let victim = mesh.pod_status("default", "seated-0").expect("status")["agent"]
        .as_str()
        .expect("placed")
        .to_owned();
    let killed = Instant::now();
    mesh.kill_agent(&victim);
    let (mut waited, mut most_running) = (false, 0);
    mesh.wait_for("seated-0 running again", Duration::from_secs(90), || {
        let running: Vec<String> = podman_containers("io.beemesh.pod.name=seated-0")
            .into_iter()
            .filter(|c| c["State"] == "running")
            .filter_map(|c| c["Id"].as_str().map(str::to_owned))
            .collect();
        most_running = most_running.max(running.len());
        let status = mesh.pod_status("default", "seated-0").unwrap_or_default();
        waited |= status
            .to_string()
            .contains("waiting for group db to seat this copy of seated-0");
        running.into_iter().find(|id| *id != old)
    });
    let took = killed.elapsed();
    eprintln!("seated-0 ran again {took:?} after its agent was killed");
    assert_eq!(most_running, 1, "two copies of seated-0 ran at once");
    assert!(waited, "the new copy never said it waited for its seat");
    // Its old copy renewed the seat before the kill; the new one asked after it: the
    // group gave it the seat only a seat lease and margin after first seeing it held.
    assert!(
        took >= Duration::from_millis(SEAT_LEASE_MS + SEAT_MARGIN_MS),
        "seated-0 ran again {took:?} after the kill"
    );
    assert!(
        podman_containers("io.beemesh.pod.name=seated-0")
            .iter()
            .all(|c| c["Id"] != old.as_str()),
        "the old copy was removed"
    );
    // The moved pod is a member again and reads what was written before.
    let socket = mesh.wait_for("seated-0's socket", Duration::from_secs(30), || {
        let socket = socket_of("seated-0")?;
        let (status, got) = call(&socket, "GET", "/kv/before", "").ok()?;
        (status == 200 && got["value"] == "move").then_some(socket)
    });
    let (status, me) = call(&socket, "GET", "/self", "").expect("GET /self");
    assert_eq!(
        (status, me["pod"].as_str()),
        (200, Some("seated-0")),
        "{me}"
    );
}
