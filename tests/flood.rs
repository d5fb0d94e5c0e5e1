//! Floods from strangers against a real `beemesh node` and `beemesh agent` on loopback,
//! with a legitimate pod in the machine's real Podman. For 20 s, libp2p peers made in
//! this process with their own keys publish gossip as fast as they can, fire requests
//! from many peers at once, hold streams open without writing a byte, and send frames
//! declaring 4 GiB. Meanwhile, and after, the pod keeps running untouched, its logs
//! come through the kubelet API and the mesh, `beemesh status` answers, the node's and
//! the agent's memory stays under a stated bound, and what was refused is counted.
//!
//! Requires hack/install-podman.sh and hack/build-test-image.sh.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beemesh::mesh::{self, GossipFilter, MeshConfig, MeshHandle};
use beemesh::metrics::Metrics;
use beemesh::wire::{
    GossipMessage, Heartbeat, Request, Resources, Topic, KUBELET_PROTOCOL, REQUEST_PROTOCOL,
};
use common::{client_certs, counter, podman_containers, scrape, Mesh};
use futures::AsyncWriteExt;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio_util::sync::CancellationToken;

const COUNTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: flood-counter, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: localhost/busybox:1.35
    command: [sh, -c, 'i=1; while true; do echo "line $i"; i=$((i+1)); sleep 0.3; done']
"#;

/// How long the floods last at least; longer, up to `FLOOD_MAX`, until the requesters
/// sent `MIN_REQUESTS` (a loaded machine sends fewer a second).
const FLOOD: Duration = Duration::from_secs(20);
const FLOOD_MAX: Duration = Duration::from_secs(90);
const MIN_REQUESTS: u64 = 1000;
/// Peers firing requests, and requests each keeps in flight.
const REQUESTERS: usize = 8;
const IN_FLIGHT: usize = 64;
/// Peers holding silent streams, and streams each opens to each target.
const SILENT_PEERS: usize = 4;
const SILENT_STREAMS: usize = 100;
/// The bound stated for the node's and the agent's resident memory under the floods.
const RSS_BOUND_KIB: u64 = 256 * 1024;

#[derive(Default)]
struct Sent {
    gossip: AtomicU64,
    requests: AtomicU64,
    requests_failed: AtomicU64,
    silent_streams: AtomicU64,
    huge_frames: AtomicU64,
}

/// A stranger: a BeeMesh mesh peer with a fresh key that nobody trusts.
async fn stranger(bootstrap: &[Multiaddr], cancel: &CancellationToken) -> MeshHandle {
    let config = MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        bootstrap: bootstrap.to_vec(),
        subscribe: Topic::ALL.to_vec(),
        accept_gossip: GossipFilter::accept_all(),
        ..MeshConfig::default()
    };
    let (handle, mut events, event_loop) =
        mesh::start(Keypair::generate_ed25519(), config, Metrics::new()).expect("mesh");
    tokio::spawn(event_loop.run(cancel.clone()));
    // Its events are read and forgotten.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    handle
}

fn heartbeat(seq: u64) -> GossipMessage {
    GossipMessage::Heartbeat(Heartbeat {
        labels: Default::default(),
        capacity: Resources::default(),
        free: Resources::default(),
        pods: Vec::new(),
        uptime_secs: 1,
        storage_bytes: 0,
        seq,
        sent_at_ms: beemesh::trust::replay::unix_millis(),
        health: Default::default(),
        pod_subnets: Vec::new(),
    })
}

async fn flood_gossip(target: Multiaddr, sent: Arc<Sent>, cancel: CancellationToken) {
    let handle = stranger(&[target], &cancel).await;
    let mut seq = 0;
    while !cancel.is_cancelled() {
        seq += 1;
        if handle.publish(&heartbeat(seq)).await.is_ok() {
            sent.gossip.fetch_add(1, Ordering::Relaxed);
        } else {
            // Nobody to send to (yet, or never: the node graylists strangers).
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

async fn flood_requests(target: Multiaddr, sent: Arc<Sent>, cancel: CancellationToken) {
    let node = peer_of(&target);
    let handle = stranger(&[target], &cancel).await;
    let mut tasks = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (handle, sent, cancel) = (handle.clone(), sent.clone(), cancel.clone());
        tasks.push(tokio::spawn(async move {
            while !cancel.is_cancelled() {
                sent.requests.fetch_add(1, Ordering::Relaxed);
                if handle.request(node, Request::Query).await.is_err() {
                    sent.requests_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// Declares a 4 GiB frame on the request protocol to each target, then opens streams
/// to them in turn and never writes.
async fn hold_silent_streams(targets: Vec<Multiaddr>, sent: Arc<Sent>, cancel: CancellationToken) {
    let handle = stranger(&targets, &cancel).await;
    let peers: Vec<PeerId> = targets.iter().map(peer_of).collect();
    let open = |peer: PeerId, protocol: &'static str| {
        let handle = handle.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(2),
                handle.open_stream(peer, StreamProtocol::new(protocol)),
            )
            .await
            .ok()
            .and_then(Result::ok)
        }
    };
    let mut held = Vec::new();
    for &peer in &peers {
        if let Some(mut stream) = open(peer, REQUEST_PROTOCOL).await {
            if stream.write_all(&u32::MAX.to_be_bytes()).await.is_ok() {
                sent.huge_frames.fetch_add(1, Ordering::Relaxed);
            }
            held.push(stream);
        }
    }
    for i in 0..SILENT_STREAMS {
        let protocol = if i % 2 == 0 {
            REQUEST_PROTOCOL
        } else {
            KUBELET_PROTOCOL
        };
        for &peer in &peers {
            if cancel.is_cancelled() {
                break;
            }
            if let Some(stream) = open(peer, protocol).await {
                sent.silent_streams.fetch_add(1, Ordering::Relaxed);
                held.push(stream);
            }
        }
    }
    cancel.cancelled().await;
    drop(held);
}

fn peer_of(addr: &Multiaddr) -> PeerId {
    mesh::peer_of(addr).expect("address with /p2p/")
}

fn dropped_total(metrics: &str, reason: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("beemesh_mesh_messages_dropped_total")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn floods_from_strangers_leave_the_pod_its_logs_and_status_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client_certs(dir.path(), "alice");
    let node_metrics = format!("127.0.0.1:{}", common::free_port());
    let agent_metrics = format!("127.0.0.1:{}", common::free_port());
    let ca = client.ca.display().to_string();
    let mut mesh =
        Mesh::with_node_args(&["--client-ca-file", &ca, "--metrics-addr", &node_metrics]);
    mesh.start_agent(&["--metrics-addr", &agent_metrics]);
    mesh.write_manifest("counter.yaml", COUNTER);
    mesh.wait_for("flood-counter Running", Duration::from_secs(40), || {
        let pod = mesh.pod_status("default", "flood-counter")?;
        (pod["phase"] == "Running").then_some(())
    });
    let server_ca = mesh.node().state_dir.join("kubelet/kubelet.crt");
    let node_pid = mesh.node().child.id();
    let kubelet_port = mesh.kubelet_port;
    let logs = || {
        let mut command = std::process::Command::new("curl");
        command
            .args(["--max-time", "10", "--cacert"])
            .arg(&server_ca)
            .arg("--cert")
            .arg(&client.cert)
            .arg("--key")
            .arg(&client.key)
            .arg(format!(
                "https://127.0.0.1:{kubelet_port}/containerLogs/default/flood-counter/c?tailLines=2"
            ));
        common::curl(command)
    };
    let containers = || -> Vec<String> {
        podman_containers("io.beemesh.pod.name=flood-counter")
            .iter()
            .filter_map(|c| c["Id"].as_str().map(str::to_owned))
            .collect()
    };
    let before = containers();
    assert_eq!(before.len(), 1, "{before:?}");
    let agent_pid = mesh.agents[0].child.id();
    let rss_before = (common::rss_kib(node_pid), common::rss_kib(agent_pid));

    let node_addr: Multiaddr = mesh.node_addr().parse().expect("node address");
    let agent_addr: Multiaddr = format!("{}/p2p/{}", mesh.agents[0].addr, mesh.agents[0].peer)
        .parse()
        .expect("agent address");
    // The attackers run at the lowest priority: a real attacker's CPU is not the
    // victim's, while here both share two cores.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(|| {
            // SAFETY: setpriority on the calling thread (Linux: PRIO_PROCESS, 0).
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        })
        .enable_all()
        .build()
        .expect("runtime");
    let cancel = CancellationToken::new();
    let sent = Arc::new(Sent::default());
    rt.spawn(flood_gossip(
        node_addr.clone(),
        sent.clone(),
        cancel.clone(),
    ));
    for _ in 0..REQUESTERS {
        rt.spawn(flood_requests(
            node_addr.clone(),
            sent.clone(),
            cancel.clone(),
        ));
    }
    for _ in 0..SILENT_PEERS {
        let targets = vec![node_addr.clone(), agent_addr.clone()];
        rt.spawn(hold_silent_streams(targets, sent.clone(), cancel.clone()));
    }

    let started = Instant::now();
    let mut peak = rss_before;
    let mut checks = 0;
    while started.elapsed() < FLOOD
        || (sent.requests.load(Ordering::Relaxed) <= MIN_REQUESTS && started.elapsed() < FLOOD_MAX)
    {
        let (code, body) = logs();
        assert_eq!(code, 200, "logs during the flood: {body}");
        assert!(body.contains("line "), "{body}");
        let status = mesh
            .try_status()
            .unwrap_or_else(|e| panic!("beemesh status during the flood: {e}"));
        let phases: Vec<&serde_json::Value> = status["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["pod"]["name"] == "flood-counter")
            .map(|p| &p["phase"])
            .collect();
        assert_eq!(phases, ["Running"], "{status}");
        peak = (
            peak.0.max(common::rss_kib(node_pid)),
            peak.1.max(common::rss_kib(agent_pid)),
        );
        checks += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    let node_seen = scrape(&node_metrics);
    let agent_seen = scrape(&agent_metrics);
    cancel.cancel();
    rt.shutdown_timeout(Duration::from_secs(5));

    let figures = format!(
        "in {:?}: {} gossip messages published, {} requests ({} failed), {} silent streams \
         held, {} 4 GiB frames declared; {checks} log and status checks passed; RSS KiB \
         node {} -> peak {}, agent {} -> peak {}; node dropped: untrusted {}, overloaded \
         {}, too_large {}; agent dropped: untrusted {}, too_large {}",
        started.elapsed(),
        sent.gossip.load(Ordering::Relaxed),
        sent.requests.load(Ordering::Relaxed),
        sent.requests_failed.load(Ordering::Relaxed),
        sent.silent_streams.load(Ordering::Relaxed),
        sent.huge_frames.load(Ordering::Relaxed),
        rss_before.0,
        peak.0,
        rss_before.1,
        peak.1,
        dropped_total(&node_seen, "untrusted"),
        dropped_total(&node_seen, "overloaded"),
        dropped_total(&node_seen, "too_large"),
        dropped_total(&agent_seen, "untrusted"),
        dropped_total(&agent_seen, "too_large"),
    );
    eprintln!("{figures}");
    assert!(
        sent.requests.load(Ordering::Relaxed) > MIN_REQUESTS,
        "{figures}"
    );
    assert!(sent.silent_streams.load(Ordering::Relaxed) > 0, "{figures}");
    assert!(
        peak.0 < RSS_BOUND_KIB && peak.1 < RSS_BOUND_KIB,
        "memory past the bound: {figures}"
    );
    // Refused requests are audited and counted; a huge frame is counted on each side.
    assert!(
        counter(
            &node_seen,
            "beemesh_audit_events_total",
            "action=\"query\",outcome=\"refused\""
        ) > 0,
        "{figures}"
    );
    assert!(dropped_total(&node_seen, "too_large") > 0, "{figures}");
    assert!(dropped_total(&agent_seen, "too_large") > 0, "{figures}");

    // After: the same container, never restarted, its logs still fresh.
    assert_eq!(containers(), before, "the pod's container changed");
    let pod = mesh
        .pod_status("default", "flood-counter")
        .expect("status after the flood");
    assert_eq!(pod["phase"], "Running", "{pod}");
    let (code, body) = logs();
    assert_eq!(code, 200, "{body}");
}
