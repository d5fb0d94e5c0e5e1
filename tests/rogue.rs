//! A rogue peer against a real zero-trust mesh: a `beemesh node` and a `beemesh agent`
//! process on loopback, running a legitimate pod in the machine's real Podman, and a
//! libp2p peer made in this process with its own fresh Ed25519 key, which dials the
//! node's and the agent's mesh addresses and tries every way in that the wire protocol
//! offers. Each attempt is refused (and counted), and the legitimate pod never notices:
//! same Podman pod and containers, no restart, same agent and epoch.
//!
//! Nor does it hear the gossip: reaching the node's mesh port is enough for Kademlia to
//! connect it to the agents too, and it may subscribe to every topic, but node and
//! agents score untrusted peers below gossipsub's graylist threshold, so flood
//! publishing skips them: the offers and heartbeats that would tell it most of what a
//! Query is refused (pod names and UIDs, epochs, phases, agents' labels and capacity)
//! never reach it.
//!
//! Requires hack/install-podman.sh and hack/build-test-image.sh.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beemesh::kubelet::relay::{read_header, write_header};
use beemesh::mesh::{self, GossipFilter, MeshConfig, MeshEvent, MeshHandle};
use beemesh::metrics::Metrics;
use beemesh::trust::dial;
use beemesh::trust::join::{self, JoinToken};
use beemesh::trust::replay::{unix_millis, Sequencer};
use beemesh::trust::statement::{self, StatementError};
use beemesh::wire::{
    Assign, Bid, ClusterDial, Epoch, GossipMessage, Heartbeat, HostedPod, KubeletAnswer,
    KubeletRequest, PeerRef, PodRef, PodUid, Release, Request, Resources, Response,
    SignedAssignment, StatusReport, Streams, Topic, DIRECT_PROTOCOL, KUBELET_PROTOCOL,
};
use common::{counter, podman_containers, podman_pods, scrape, Mesh};
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde_json::{json, Value};
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

/// The legitimate pod, which must come through every attack untouched.
const TARGET: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: rogue-target
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: localhost/busybox:1.35
    command: ["sleep", "100000"]
"#;

/// What the rogue peer saw arrive from the mesh.
#[derive(Default)]
struct Seen {
    connected: HashSet<PeerId>,
    /// Requests other peers sent it (an Assign or Release here would be a leak of work).
    requests: Vec<(PeerId, &'static str)>,
    /// Gossip it received, with its signer.
    gossip: Vec<(PeerId, GossipMessage)>,
}

/// A libp2p peer with its own key, trusted by nobody, in a runtime of its own (the
/// harness around it is blocking).
struct Rogue {
    key: Keypair,
    handle: MeshHandle,
    seen: Arc<Mutex<Seen>>,
    cancel: CancellationToken,
    rt: tokio::runtime::Runtime,
}

impl Rogue {
    fn start(bootstrap: Vec<Multiaddr>, subscribe: Vec<Topic>) -> Rogue {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let key = Keypair::generate_ed25519();
        let cancel = CancellationToken::new();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let handle = rt.block_on(async {
            let config = MeshConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
                bootstrap,
                subscribe,
                accept_gossip: GossipFilter::accept_all(),
                ..MeshConfig::default()
            };
            let (handle, mut events, event_loop) =
                mesh::start(key.clone(), config, Metrics::new()).expect("rogue mesh");
            tokio::spawn(event_loop.run(cancel.clone()));
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    let mut seen = seen.lock().expect("seen");
                    match event {
                        MeshEvent::PeerConnected(peer) => {
                            seen.connected.insert(peer);
                        }
                        MeshEvent::PeerDisconnected(peer) => {
                            seen.connected.remove(&peer);
                        }
                        MeshEvent::Request {
                            peer,
                            request,
                            reply,
                        } => {
                            seen.requests.push((peer, request.kind()));
                            let _ = reply.send(Response::Declined {
                                reason: "rogue".into(),
                            });
                        }
                        MeshEvent::Gossip { source, message } => {
                            seen.gossip.push((source, message));
                        }
                    }
                }
            });
            handle
        });
        Rogue {
            key,
            handle,
            seen,
            cancel,
            rt,
        }
    }

    fn peer(&self) -> PeerId {
        self.handle.local_peer_id()
    }

    fn wait_connected(&self, mesh: &Mesh, peers: &[PeerId]) {
        mesh.wait_for(
            "the rogue connected to the node and the agent",
            Duration::from_secs(15),
            || {
                let seen = self.seen.lock().expect("seen");
                peers
                    .iter()
                    .all(|p| seen.connected.contains(p))
                    .then_some(())
            },
        );
    }

    /// Sends a request and waits (bounded) for the answer.
    fn request(&self, peer: PeerId, request: Request) -> Response {
        let kind = request.kind();
        self.rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(15), self.handle.request(peer, request))
                    .await
            })
            .unwrap_or_else(|_| panic!("no answer to the rogue's {kind} within 15 s"))
            .unwrap_or_else(|e| panic!("the rogue's {kind} failed: {e}"))
    }

    /// Publishes; false when gossipsub has nobody to send it to yet.
    fn publish(&self, message: &GossipMessage) -> bool {
        self.rt.block_on(self.handle.publish(message)).is_ok()
    }

    /// Opens a `protocol` stream to `agent`, sends `request` as its header and reads
    /// the answer header: Err when the stream closed before any answer.
    fn stream<R: serde::Serialize>(
        &self,
        agent: PeerId,
        protocol: &'static str,
        request: &R,
    ) -> Result<KubeletAnswer, String> {
        let outcome = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), async {
                let stream = self
                    .handle
                    .open_stream(agent, StreamProtocol::new(protocol))
                    .await
                    .map_err(|e| format!("open: {e}"))?;
                let mut io = stream.compat();
                // The agent may have closed the stream already: writing can fail too.
                if let Err(e) = write_header(&mut io, request).await {
                    return Err(format!("write: {e}"));
                }
                read_header::<KubeletAnswer>(&mut io)
                    .await
                    .map_err(|e| format!("read: {e}"))
            })
            .await
        });
        outcome.unwrap_or_else(|_| panic!("the agent left the rogue's {protocol} stream open"))
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// `GET /metrics` of a process started with `--metrics-addr`.
/// A metric without labels.
fn plain(text: &str, metric: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(metric)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// `beemesh_mesh_messages_dropped_total{kind, reason}`.
fn dropped(text: &str, kind: &str, reason: &str) -> u64 {
    counter(
        text,
        "beemesh_mesh_messages_dropped_total",
        &format!("kind=\"{kind}\",reason=\"{reason}\""),
    )
}

/// `beemesh_audit_events_total{action, outcome}`.
fn audited(text: &str, action: &str, outcome: &str) -> u64 {
    counter(
        text,
        "beemesh_audit_events_total",
        &format!("action=\"{action}\",outcome=\"{outcome}\""),
    )
}

fn assert_declined(answer: &Response, because: &str, attack: &str) {
    match answer {
        Response::Declined { reason } if reason.contains(because) => {}
        other => panic!("{attack}: expected Declined ({because}), got {other:?}"),
    }
}

/// The node's view of the target pod: (agent, epoch, phase, uid).
fn view(mesh: &Mesh) -> Option<(String, u64, String, String)> {
    let pod = mesh.pod_status("default", "rogue-target")?;
    Some((
        pod["agent"].as_str()?.to_string(),
        pod["epoch"].as_u64()?,
        pod["phase"].as_str()?.to_string(),
        pod["pod"]["uid"].as_str()?.to_string(),
    ))
}

/// What Podman runs of the target: its pod IDs and, per container, ID, name, attempt
/// label, state and Podman's restart count.
#[derive(Debug, Clone, PartialEq)]
struct InPodman {
    pods: Vec<(String, String)>,
    containers: Vec<BTreeMap<&'static str, String>>,
}

fn in_podman(name: &str) -> InPodman {
    let label = format!("io.beemesh.pod.name={name}");
    let mut pods: Vec<(String, String)> = podman_pods(&label)
        .into_iter()
        .map(|p| (p.id, p.status))
        .collect();
    pods.sort();
    let mut containers: Vec<BTreeMap<&'static str, String>> = podman_containers(&label)
        .iter()
        .map(|c| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            let id = text(&c["Id"]);
            let restarts = Command::new("podman")
                .args(["inspect", "--format", "{{.RestartCount}}", &id])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            BTreeMap::from([
                ("id", id),
                ("container", text(&c["Labels"]["io.beemesh.container"])),
                ("attempt", text(&c["Labels"]["io.beemesh.attempt"])),
                ("state", text(&c["State"])),
                ("restarts", restarts),
            ])
        })
        .collect();
    containers.sort();
    InPodman { pods, containers }
}

/// The node's stdout lines about the target (one per change of phase, reason or agent).
fn node_lines(mesh: &Mesh) -> Vec<String> {
    mesh.node
        .as_ref()
        .map(|n| n.output())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("default/rogue-target"))
        .map(str::to_string)
        .collect()
}

/// A privileged pod (it would see the host's devices). hostNetwork is left out on
/// purpose: agents refuse that spec anyway, and this attack must be stopped by trust
/// alone.
fn privileged_pod(uid: &str, name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid},
        "spec": {
            "containers": [{
                "name": "main",
                "image": common::IMAGE,
                "command": ["sh", "-c", "touch /tmp/owned; sleep 100000"],
                "securityContext": {"privileged": true},
            }],
        },
    }))
    .expect("pod")
}

fn in_ten_minutes() -> u64 {
    unix_millis() / 1000 + 600
}

fn heartbeat(seq: u64, sent_at_ms: u64, pods: Vec<HostedPod>) -> GossipMessage {
    // An eager agent: lots of room, nothing much to do.
    let capacity = Resources {
        cpu_millis: 64_000,
        memory_bytes: 256 << 30,
        pods: 110,
    };
    GossipMessage::Heartbeat(Heartbeat {
        labels: BTreeMap::new(),
        capacity,
        free: capacity,
        pods,
        uptime_secs: 3600,
        storage_bytes: 1 << 40,
        seq,
        sent_at_ms,
        health: Default::default(),
        pod_subnets: Vec::new(),
    })
}

fn peer_of(addr: &str) -> PeerId {
    addr.rsplit_once("/p2p/")
        .and_then(|(_, p)| p.parse().ok())
        .expect("multiaddr with /p2p/")
}

#[test]
fn a_rogue_peer_is_refused_everything_and_the_running_pod_never_notices() {
    let started = Instant::now();
    let node_metrics = format!("127.0.0.1:{}", common::free_port());
    let agent_metrics = format!("127.0.0.1:{}", common::free_port());
    let mut mesh = Mesh::with_node_args(&["--metrics-addr", &node_metrics]);
    mesh.start_agent(&["--metrics-addr", &agent_metrics]);
    mesh.write_manifest("target.yaml", TARGET);
    let node = peer_of(mesh.node_addr());
    let agent: PeerId = mesh.agents[0].peer.parse().expect("agent peer ID");
    let agent_addr: Multiaddr = format!("{}/p2p/{agent}", mesh.agents[0].addr)
        .parse()
        .expect("agent addr");

    // The legitimate pod runs on the agent, placed by the node.
    let (runner, epoch, _, uid) =
        mesh.wait_for("rogue-target Running", Duration::from_secs(60), || {
            view(&mesh).filter(|v| v.2 == "Running")
        });
    assert_eq!(runner, agent.to_string());
    let target = PodRef {
        uid: PodUid(uid.clone()),
        namespace: "default".into(),
        name: "rogue-target".into(),
    };
    let before = mesh.wait_for(
        "the target's container running",
        Duration::from_secs(20),
        || {
            let seen = in_podman("rogue-target");
            (seen.pods.len() == 1
                && seen.containers.len() == 1
                && seen.containers[0]["state"] == "running")
                .then_some(seen)
        },
    );
    assert_eq!(before.containers[0]["attempt"], "0", "{before:?}");
    assert_eq!(before.containers[0]["restarts"], "0", "{before:?}");
    let main_container = before.containers[0]["id"].clone();
    let lines_before = node_lines(&mesh);
    let node_start = scrape(&node_metrics);
    let agent_start = scrape(&agent_metrics);
    // The legitimate agent's enrollment and assignment, the only ones there will be.
    assert!(audited(&node_start, "join", "allowed") >= 1, "{node_start}");
    assert!(plain(&node_start, "beemesh_assignments_total") >= 1);
    assert!(
        audited(&agent_start, "assign", "allowed") >= 1,
        "{agent_start}"
    );

    // The rogue: a real libp2p peer with a fresh key, dialling both real processes.
    let rogue = Rogue::start(
        vec![mesh.node_addr().parse().expect("addr"), agent_addr],
        vec![],
    );
    let me = rogue.peer();
    rogue.wait_connected(&mesh, &[node, agent]);
    let declined_by_agent = format!("owner {me} is not trusted by this agent");
    let declined_by_node = format!("peer {me} is not trusted by this node");

    // 1. An unsolicited Assign of a privileged pod, signed by the rogue itself, for
    //    exactly this agent, with the right digest and a valid expiry.
    let evil = privileged_pod("0badc0de-0000-4000-8000-000000000001", "rogue-privileged");
    let assign = Assign {
        epoch: Epoch(1),
        statement: statement::sign(
            &rogue.key,
            statement::Assignment {
                agent,
                pod: PodUid("0badc0de-0000-4000-8000-000000000001".into()),
                epoch: Epoch(1),
                spec_digest: statement::spec_digest(&evil),
                expires_at: in_ten_minutes(),
            },
        ),
        pod: evil,
        volumes: BTreeMap::new(),
        pull_credentials: Vec::new(),
        lease_ms: None,
        pod_subnet: None,
        cluster_ranges: Vec::new(),
        cluster_domain: None,
    };
    let answer = rogue.request(agent, Request::Assign(Box::new(assign)));
    assert_declined(&answer, &declined_by_agent, "self-signed Assign");
    // ... nor may it stop the legitimate pod.
    let release = Request::Release(Release {
        pod: target.uid.clone(),
        epoch: Epoch(u64::MAX),
        grace_period_secs: 0,
    });
    assert_declined(
        &rogue.request(agent, release),
        &declined_by_agent,
        "Release of the legitimate pod",
    );

    // 2. An Assign that takes over the legitimate pod (its UID, the next epoch, a
    //    privileged spec) with a statement that names the node as owner but carries
    //    the rogue's signature. It would fail the signature check (shown here on the
    //    statement itself); what refuses it first is the sender check: counted as
    //    "untrusted", and nothing reaches statement verification.
    let hijack = privileged_pod(&uid, "rogue-target");
    let mut forged = statement::sign(
        &rogue.key,
        statement::Assignment {
            agent,
            pod: target.uid.clone(),
            epoch: Epoch(epoch + 1),
            spec_digest: statement::spec_digest(&hijack),
            expires_at: in_ten_minutes(),
        },
    );
    forged.owner = PeerRef(node);
    assert_eq!(
        statement::verify_signature(&forged, &node),
        Err(StatementError::BadSignature)
    );
    let assign = Assign {
        epoch: Epoch(epoch + 1),
        pod: hijack,
        volumes: BTreeMap::new(),
        pull_credentials: Vec::new(),
        statement: forged,
        lease_ms: None,
        pod_subnet: None,
        cluster_ranges: Vec::new(),
        cluster_domain: None,
    };
    let answer = rogue.request(agent, Request::Assign(Box::new(assign)));
    assert_declined(&answer, &declined_by_agent, "Assign forged as the node's");
    let agent_now = scrape(&agent_metrics);
    assert_eq!(
        dropped(&agent_now, "assign", "untrusted"),
        dropped(&agent_start, "assign", "untrusted") + 2,
        "{agent_now}"
    );
    assert_eq!(
        dropped(&agent_now, "release", "untrusted"),
        dropped(&agent_start, "release", "untrusted") + 1
    );
    for reason in ["bad_signature", "wrong_owner", "unsolicited"] {
        assert_eq!(dropped(&agent_now, "assign", reason), 0, "{reason}");
    }
    assert_eq!(
        audited(&agent_now, "assign", "refused"),
        audited(&agent_start, "assign", "refused") + 2
    );
    assert_eq!(
        audited(&agent_now, "assign", "allowed"),
        audited(&agent_start, "assign", "allowed")
    );

    // 3. Bids for the legitimate pod, first from a peer the node never heard of, then
    //    after the rogue published heartbeats that make it look like the best agent.
    let bid = |epoch: u64| {
        Request::Bid(Bid {
            pod: target.uid.clone(),
            epoch: Epoch(epoch),
        })
    };
    for e in [epoch, epoch + 1] {
        assert_declined(&rogue.request(node, bid(e)), &declined_by_node, "Bid");
    }
    // The node takes no gossip from a peer it does not trust (graylisted below
    // gossipsub; a heartbeat relayed by someone else would be dropped as untrusted):
    // three seconds of heartbeats leave it unknown.
    let seq = Sequencer::default();
    for _ in 0..10 {
        let (n, at) = seq.next();
        rogue.publish(&heartbeat(n, at, vec![]));
        std::thread::sleep(Duration::from_millis(300));
    }
    for e in [epoch, epoch + 1] {
        assert_declined(
            &rogue.request(node, bid(e)),
            &declined_by_node,
            "Bid after heartbeats",
        );
    }

    // 4. Status reports for the legitimate pod at a higher epoch, with statements that
    //    claim the node signed them: one says the rogue now runs the pod, the other
    //    that the real agent dropped it (which would make the node place it again).
    for (runs_it, removed) in [(me, false), (agent, true)] {
        let mut assignment: SignedAssignment = statement::sign(
            &rogue.key,
            statement::Assignment {
                agent: runs_it,
                pod: target.uid.clone(),
                epoch: Epoch(epoch + 1),
                spec_digest: String::new(),
                expires_at: in_ten_minutes(),
            },
        );
        assignment.owner = PeerRef(node);
        let (n, at) = seq.next();
        let report = StatusReport {
            pod: target.clone(),
            epoch: Epoch(epoch + 1),
            status: PodStatus {
                phase: Some("Running".into()),
                ..Default::default()
            },
            removed,
            assignment,
            seq: n,
            sent_at_ms: at,
            events: Vec::new(),
        };
        assert_declined(
            &rogue.request(node, Request::Status(Box::new(report))),
            &declined_by_node,
            "forged StatusReport",
        );
    }

    // 5. Heartbeats that list the legitimate pod as run by the rogue at a higher epoch:
    //    a fresh one, and one replayed from long ago with a sequence number far ahead.
    //    Their signer is untrusted: the node does not even read them (graylisted).
    let hosted = HostedPod {
        pod: target.clone(),
        owner: PeerRef(node),
        epoch: Epoch(epoch + 1),
        phase: "Running".into(),
        requests: Resources::default(),
        host_ports: vec![],
        unrecorded: false,
    };
    let (n, at) = seq.next();
    let fresh = heartbeat(n, at, vec![hosted.clone()]);
    let replayed = heartbeat(u64::MAX - 1, at - 3_600_000, vec![hosted]);
    for _ in 0..10 {
        rogue.publish(&fresh);
        rogue.publish(&replayed);
        std::thread::sleep(Duration::from_millis(300));
    }

    let (now_on, now_at, _, _) = view(&mesh).expect("the node still shows the pod");
    assert_eq!(
        (now_on.as_str(), now_at),
        (runner.as_str(), epoch),
        "the pod moved"
    );

    // 6. Nobody tells the rogue what runs where.
    assert_declined(
        &rogue.request(node, Request::Query),
        &declined_by_node,
        "Query to the node",
    );
    assert_declined(
        &rogue.request(agent, Request::Query),
        &declined_by_agent,
        "Query to the agent",
    );

    // 7. Exec in the legitimate pod over a kubelet stream: closed unread, no answer.
    for command in [
        vec!["id".to_string()],
        vec!["sh".into(), "-c".into(), "id > /tmp/rogue-exec".into()],
    ] {
        let exec = KubeletRequest::Exec {
            pod: target.uid.clone(),
            container: "main".into(),
            command,
            streams: Streams {
                stdout: true,
                stderr: true,
                ..Streams::default()
            },
        };
        // The stream opens (the agent serves the protocol) and is then closed unread.
        match rogue.stream(agent, KUBELET_PROTOCOL, &exec) {
            Err(closed) if !closed.starts_with("open:") => {
                eprintln!("kubelet stream closed without an answer ({closed})");
            }
            other => panic!("the rogue's kubelet stream: {other:?}"),
        }
    }
    let agent_now = scrape(&agent_metrics);
    assert_eq!(
        dropped(&agent_now, "kubelet_stream", "untrusted"),
        dropped(&agent_start, "kubelet_stream", "untrusted") + 2,
        "{agent_now}"
    );
    assert_eq!(
        audited(&agent_now, "kubelet_stream", "refused"),
        audited(&agent_start, "kubelet_stream", "refused") + 2
    );
    assert_eq!(audited(&agent_now, "exec", "allowed"), 0, "{agent_now}");
    let probe = Command::new("podman")
        .args(["exec", &main_container, "test", "-e", "/tmp/rogue-exec"])
        .status()
        .expect("podman exec");
    assert_eq!(probe.code(), Some(1), "the rogue's command ran in the pod");

    // 7b. Straight to the pod as another agent's connection to a Service endpoint: a
    //     grant the rogue signs itself, a real grant of the node (its key read here)
    //     for another dialer, as if stolen, and an expired one for the rogue. Each is
    //     refused with the reason; and the node routes nothing for the rogue.
    let node_key =
        beemesh::trust::load_or_create_key(&mesh.node_state().join(beemesh::trust::IDENTITY_FILE))
            .expect("the node's key");
    let grant = |signer: &Keypair, from: PeerId, expires_at: u64| {
        dial::sign(
            signer,
            dial::Dial {
                from,
                to: agent,
                pod: target.uid.clone(),
                port: 80,
                expires_at,
            },
        )
    };
    for (signed, because) in [
        (
            grant(&rogue.key, me, in_ten_minutes()),
            declined_by_agent.clone(),
        ),
        (
            grant(&node_key, PeerId::random(), in_ten_minutes()),
            "not the peer that presents it".to_string(),
        ),
        (
            grant(&node_key, me, in_ten_minutes() - 1200),
            "the grant expired".to_string(),
        ),
    ] {
        match rogue.stream(agent, DIRECT_PROTOCOL, &signed) {
            Ok(KubeletAnswer::Failed { code: 403, message }) if message.contains(&because) => {}
            other => panic!("the rogue's direct stream ({because}): {other:?}"),
        }
    }
    let agent_now = scrape(&agent_metrics);
    assert_eq!(
        audited(&agent_now, "direct_stream", "refused"),
        audited(&agent_start, "direct_stream", "refused") + 3,
        "{agent_now}"
    );
    assert_declined(
        &rogue.request(
            node,
            Request::Route(ClusterDial {
                pod: target.clone(),
                to: "10.80.0.10:80".parse().expect("addr"),
                udp: false,
            }),
        ),
        &declined_by_node,
        "Route to the node",
    );

    // 8. Joins: with a well-formed token the node never issued, and with a token that
    //    was issued and then revoked. The rogue stays a stranger.
    let join_with = |token: &JoinToken| {
        let nonce = join::nonce().expect("nonce");
        Request::Join(join::request(token, &me, &node, nonce, unix_millis()))
    };
    let unknown: JoinToken = "zzzzzz.0123456789abcdef".parse().expect("token");
    assert_declined(
        &rogue.request(node, join_with(&unknown)),
        "no such join token",
        "Join with an unknown token",
    );
    let second = common::create_token(mesh.node_state(), &[]);
    let second: JoinToken = second.parse().expect("token");
    assert_ne!(second.reveal(), mesh.join_token);
    let out = Command::new(common::bin())
        .args(["token", "revoke", &second.id, "--state-dir"])
        .arg(mesh.node_state())
        .output()
        .expect("beemesh token revoke");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("revoked token {}", second.id)),
        "{out:?}"
    );
    assert_declined(
        &rogue.request(node, join_with(&second)),
        "no such join token",
        "Join with a revoked token",
    );
    assert_declined(
        &rogue.request(node, Request::Query),
        &declined_by_node,
        "Query after the joins",
    );
    assert_declined(
        &rogue.request(node, bid(epoch)),
        &declined_by_node,
        "Bid after the joins",
    );
    let trust_file = std::fs::read_to_string(mesh.node_state().join("trust/node.json"))
        .expect("the node's trust file");
    assert!(!trust_file.contains(&me.to_string()), "{trust_file}");

    // The node counted and audited every refusal.
    let node_now = scrape(&node_metrics);
    for (kind, n) in [("bid", 5), ("status", 2), ("query", 2)] {
        assert_eq!(
            dropped(&node_now, kind, "untrusted"),
            dropped(&node_start, kind, "untrusted") + n,
            "{kind}\n{node_now}"
        );
        assert_eq!(
            audited(&node_now, kind, "refused"),
            audited(&node_start, kind, "refused") + n,
            "{kind}\n{node_now}"
        );
    }
    assert_eq!(
        dropped(&node_now, "join", "refused"),
        dropped(&node_start, "join", "refused") + 2
    );
    assert_eq!(
        audited(&node_now, "join", "refused"),
        audited(&node_start, "join", "refused") + 2
    );
    assert_eq!(
        audited(&node_now, "join", "allowed"),
        audited(&node_start, "join", "allowed")
    );
    assert_eq!(
        plain(&node_now, "beemesh_assignments_total"),
        plain(&node_start, "beemesh_assignments_total")
    );
    // Refused before anyone looked at what they carried.
    assert_eq!(
        dropped(&node_now, "status", "not_assigned"),
        dropped(&node_start, "status", "not_assigned")
    );
    for reason in ["stale", "replayed"] {
        assert_eq!(
            dropped(&node_now, "heartbeat", reason),
            dropped(&node_start, "heartbeat", reason),
            "{reason}"
        );
    }
    let agent_now = scrape(&agent_metrics);
    assert_eq!(
        dropped(&agent_now, "query", "untrusted"),
        dropped(&agent_start, "query", "untrusted") + 1
    );

    // Two heartbeat rounds later (a release or a re-placement would show by then), the
    // legitimate pod is exactly as it was.
    std::thread::sleep(Duration::from_secs(7));
    let after = in_podman("rogue-target");
    assert_eq!(after, before, "the legitimate pod changed in Podman");
    let (runner_after, epoch_after, phase_after, uid_after) =
        view(&mesh).expect("the node still shows the pod");
    assert_eq!(
        (runner_after, epoch_after, phase_after.as_str(), uid_after),
        (runner, epoch, "Running", uid)
    );
    assert_eq!(
        node_lines(&mesh),
        lines_before,
        "the node printed a change of the pod"
    );
    let status = mesh.status().expect("beemesh status");
    let agents: Vec<&str> = status["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .filter_map(|a| a["peer"].as_str())
        .collect();
    assert_eq!(agents, vec![agent.to_string().as_str()], "{status}");
    assert!(
        podman_pods("io.beemesh.pod.name=rogue-privileged").is_empty(),
        "the privileged pod runs"
    );
    let seen = rogue.seen.lock().expect("seen");
    assert!(seen.requests.is_empty(), "{:?}", seen.requests);
    drop(seen);
    drop(rogue);
    eprintln!("rogue test took {:?}", started.elapsed());
}

#[test]
fn an_untrusted_peer_that_subscribes_hears_no_gossip() {
    let mut mesh = Mesh::new();
    mesh.start_agent(&[]);
    let node = peer_of(mesh.node_addr());
    let agent: PeerId = mesh.agents[0].peer.parse().expect("agent peer ID");
    // Connected to the node only, and subscribed before the pod exists: its offer goes
    // out after.
    let rogue = Rogue::start(
        vec![mesh.node_addr().parse().expect("addr")],
        vec![Topic::Offers, Topic::Heartbeats],
    );
    rogue.wait_connected(&mesh, &[node]);
    let me = rogue.peer();
    assert_declined(
        &rogue.request(node, Request::Query),
        &format!("peer {me} is not trusted by this node"),
        "Query",
    );
    mesh.write_manifest(
        "eavesdrop.yaml",
        &TARGET.replace("rogue-target", "rogue-eavesdrop"),
    );
    mesh.wait_for("rogue-eavesdrop Running", Duration::from_secs(60), || {
        let pod = mesh.pod_status("default", "rogue-eavesdrop")?;
        (pod["phase"] == "Running").then_some(())
    });
    // Two heartbeat rounds.
    std::thread::sleep(Duration::from_secs(7));
    let seen = rogue.seen.lock().expect("seen");
    let heard: Vec<String> = seen
        .gossip
        .iter()
        .map(|(source, message)| {
            let who = if *source == node {
                "the node".to_string()
            } else if *source == agent {
                "the agent".to_string()
            } else {
                source.to_string()
            };
            match message {
                GossipMessage::Offer(o) => format!(
                    "offer from {who}: {} uid {} epoch {} requests {:?}",
                    o.pod, o.pod.uid, o.epoch, o.requests
                ),
                GossipMessage::Heartbeat(h) => format!(
                    "heartbeat from {who}: capacity {:?}, pods {:?}",
                    h.capacity,
                    h.pods
                        .iter()
                        .map(|p| format!(
                            "{} uid {} owner {} epoch {} {}",
                            p.pod, p.pod.uid, p.owner, p.epoch, p.phase
                        ))
                        .collect::<Vec<_>>()
                ),
            }
        })
        .collect();
    let connected: Vec<String> = seen.connected.iter().map(ToString::to_string).collect();
    eprintln!("rogue connected to {connected:?}");
    assert!(
        heard.is_empty(),
        "an untrusted peer refused Query still heard the mesh:\n{}",
        heard.join("\n")
    );
}
