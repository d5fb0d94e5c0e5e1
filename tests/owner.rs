//! The owner's protocol, against scripted agents on a real loopback mesh: pods placed at
//! once from heartbeats, with reservations so that pods placed together never
//! over-commit an agent; the best agent (by the owner's own ranking) declines and the
//! next one gets the pod, and when all decline the owner asks them (offer, bids); stale
//! epochs are superseded; pods the owner does not have are released; and what a
//! trusted-but-rogue or untrusted peer tries is refused and counted.

use std::collections::BTreeMap;
use std::time::Duration;

use beemesh::mesh::{self, GossipFilter, MeshConfig, MeshEvent, MeshEvents, MeshHandle};
use beemesh::metrics::Metrics;
use beemesh::node::owner::{
    DesiredPods, Owner, OwnerConfig, StatusSink, DUE_PER_PASS, MAX_ASSIGNING,
};
use beemesh::node::subnets::SubnetPool;
use beemesh::node::{standalone_pod, Node, NodeConfig};
use beemesh::trust::replay::Sequencer;
use beemesh::trust::statement;
use beemesh::trust::TrustedPeers;
use beemesh::wire::{
    Assign, Bid, ClusterDial, Epoch, GossipMessage, Heartbeat, HostedPod, MeshView, Offer, PeerRef,
    PodRef, PodSummary, PodUid, Renew, Request, Resources, Response, SignedAssignment,
    StatusReport, Topic,
};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use tokio_util::sync::CancellationToken;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: scripted, uid: 11111111-2222-3333-4444-555555555555}
spec:
  containers: [{name: c, image: localhost/busybox:1.35}]
"#;

struct ScriptedAgent {
    handle: MeshHandle,
    events: MeshEvents,
}

async fn start_peer(
    keypair: Keypair,
    listen: Option<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    subscribe: Vec<Topic>,
    cancel: &CancellationToken,
) -> (MeshHandle, MeshEvents) {
    let config = MeshConfig {
        listen: listen.into_iter().collect(),
        bootstrap,
        subscribe,
        accept_gossip: GossipFilter::accept_all(),
        ..MeshConfig::default()
    };
    let (handle, events, event_loop) = mesh::start(keypair, config, Metrics::new()).expect("mesh");
    tokio::spawn(event_loop.run(cancel.clone()));
    (handle, events)
}

/// A heartbeat with `free` of 8 CPUs free, stamped by `seq`.
fn heartbeat(seq: &Sequencer, free_cpu_millis: u64, pods: Vec<HostedPod>) -> GossipMessage {
    let capacity = Resources {
        cpu_millis: 8000,
        memory_bytes: 8 << 30,
        pods: 10,
    };
    let (seq, sent_at_ms) = seq.next();
    GossipMessage::Heartbeat(Heartbeat {
        labels: BTreeMap::new(),
        capacity,
        free: Resources {
            cpu_millis: free_cpu_millis,
            ..capacity
        },
        pods,
        uptime_secs: 1,
        storage_bytes: 0,
        seq,
        sent_at_ms,
        health: Default::default(),
        pod_subnets: Vec::new(),
    })
}

/// How many messages of `kind` the node dropped for `reason`.
fn dropped(metrics: &Metrics, kind: &str, reason: &str) -> u64 {
    let needle =
        format!("beemesh_mesh_messages_dropped_total{{kind=\"{kind}\",reason=\"{reason}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

async fn next_event<T>(
    events: &mut MeshEvents,
    what: &str,
    mut pick: impl FnMut(MeshEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(found) = pick(events.recv().await.expect("mesh running")) {
                return found;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within 20 s"))
}

/// The next Assign a scripted agent receives, with the channel to answer it.
async fn next_assign(
    events: &mut MeshEvents,
    what: &str,
) -> (Box<Assign>, tokio::sync::oneshot::Sender<Response>) {
    next_event(events, what, |e| match e {
        MeshEvent::Request {
            request: Request::Assign(assign),
            reply,
            ..
        } => Some((assign, reply)),
        _ => None,
    })
    .await
}

/// A real node serving one manifest (`pod`), and two scripted agents on its mesh.
struct Scene {
    cancel: CancellationToken,
    dir: tempfile::TempDir,
    node_addr: Multiaddr,
    node_id: libp2p::PeerId,
    node_metrics: Metrics,
    agent_keys: [Keypair; 2],
    agent_ids: Vec<libp2p::PeerId>,
    agents: Vec<ScriptedAgent>,
}

/// `owner` gets the agents' peer IDs (and fills in the rest of the node's settings).
async fn scene(pod: &str, owner: impl FnOnce(&[libp2p::PeerId]) -> OwnerConfig) -> Scene {
    let scene = scene_without_pods(owner).await;
    std::fs::write(scene.dir.path().join("pod.yaml"), pod).expect("manifest");
    scene
}

/// As [`scene`], the manifest to come: for a test that needs the owner to have heard
/// from both agents before it places the pod (else it may place it on the one heard
/// first, which a loaded machine makes likelier).
async fn scene_without_pods(owner: impl FnOnce(&[libp2p::PeerId]) -> OwnerConfig) -> Scene {
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().expect("tempdir");

    let node_addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", free_port())
        .parse()
        .expect("addr");
    let agent_keys = [Keypair::generate_ed25519(), Keypair::generate_ed25519()];
    let agent_ids: Vec<_> = agent_keys.iter().map(|k| k.public().to_peer_id()).collect();
    let node_key = Keypair::generate_ed25519();
    let (node_mesh, node_events) = start_peer(
        node_key.clone(),
        Some(node_addr.clone()),
        vec![],
        vec![Topic::Heartbeats],
        &cancel,
    )
    .await;
    let node_id = node_mesh.local_peer_id();
    let node_metrics = Metrics::new();
    let node = Node::new(
        NodeConfig {
            pod_manifest_path: Some(dir.path().to_path_buf()),
            owner: owner(&agent_ids),
            enrollment: None,
            cluster_dns: None,
            mesh_service_cidr: beemesh::node::mesh_services::DEFAULT_CIDR,
        },
        node_key,
        node_mesh.clone(),
        node_metrics.clone(),
    );
    tokio::spawn(node.run(node_events, None, None, cancel.clone()));

    let mut agents = Vec::new();
    for key in &agent_keys {
        let (handle, events) = start_peer(
            key.clone(),
            None,
            vec![node_addr.clone()],
            vec![Topic::Offers],
            &cancel,
        )
        .await;
        agents.push(ScriptedAgent { handle, events });
    }
    Scene {
        cancel,
        dir,
        node_addr,
        node_id,
        node_metrics,
        agent_keys,
        agent_ids,
        agents,
    }
}

/// Heartbeats of `agent` every 300 ms with `free` millicores free, while `alive`.
fn beat_while(
    agent: &ScriptedAgent,
    seq: std::sync::Arc<Sequencer>,
    free: u64,
    alive: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let handle = agent.handle.clone();
    tokio::spawn(async move {
        loop {
            if alive.load(std::sync::atomic::Ordering::Acquire) {
                let _ = handle.publish(&heartbeat(&seq, free, vec![])).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// Heartbeats of both scripted agents (agent 0 emptier), each while its `alive` is set.
struct Heartbeats {
    seqs: [std::sync::Arc<Sequencer>; 2],
    alive: Vec<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn heartbeats(agents: &[ScriptedAgent]) -> Heartbeats {
    let seqs = [
        std::sync::Arc::new(Sequencer::default()),
        std::sync::Arc::new(Sequencer::default()),
    ];
    let alive: Vec<_> = (0..2)
        .map(|_| std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)))
        .collect();
    let tasks = (0..2)
        .map(|i| {
            beat_while(
                &agents[i],
                seqs[i].clone(),
                [8000, 2000][i],
                alive[i].clone(),
            )
        })
        .collect();
    Heartbeats { seqs, alive, tasks }
}

/// A pod an agent's heartbeat says it runs for `owner`.
fn running_pod(pod: PodRef, owner: libp2p::PeerId, epoch: Epoch) -> HostedPod {
    HostedPod {
        pod,
        owner: PeerRef(owner),
        epoch,
        phase: "Running".into(),
        requests: Resources::default(),
        host_ports: vec![],
        unrecorded: false,
    }
}

/// Heartbeats of `agent` listing `hosted`, every 300 ms until aborted.
fn hosting(
    agent: &ScriptedAgent,
    seq: std::sync::Arc<Sequencer>,
    hosted: HostedPod,
) -> tokio::task::JoinHandle<()> {
    let handle = agent.handle.clone();
    tokio::spawn(async move {
        loop {
            let _ = handle
                .publish(&heartbeat(&seq, 8000, vec![hosted.clone()]))
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// Fails with `what` if any of `agents` has been sent an assignment.
fn assert_no_assignment(agents: &mut [ScriptedAgent], what: &str) {
    for agent in agents.iter_mut() {
        while let Some(event) = agent.events.try_recv() {
            if let MeshEvent::Request {
                request: Request::Assign(assign),
                ..
            } = event
            {
                panic!("{what}: {assign:?}");
            }
        }
    }
}

/// Until the node's view (asked through `handle`, a client it trusts) shows `agents`.
async fn until_heard(handle: &MeshHandle, node_id: libp2p::PeerId, agents: &[libp2p::PeerId]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Not answered while the asking agent is still dialling the node.
        if let Ok(Response::View(view)) = handle.request(node_id, Request::Query).await {
            if agents
                .iter()
                .all(|agent| view.agents.iter().any(|a| a.peer.0 == *agent))
            {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{agents:?} not heard within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes the manifest `pod` once the node has heard from both agents (agent 1 asks:
/// the owner must trust it as a client).
async fn pod_once_both_heard(
    dir: &tempfile::TempDir,
    agents: &[ScriptedAgent],
    node_id: libp2p::PeerId,
    agent_ids: &[libp2p::PeerId],
    pod: &str,
) {
    until_heard(&agents[1].handle, node_id, agent_ids).await;
    std::fs::write(dir.path().join("pod.yaml"), pod).expect("manifest");
}

/// What the node shows `handle` (which it trusts as a client) of the mesh.
async fn query_view(handle: &MeshHandle, node_id: libp2p::PeerId) -> MeshView {
    match handle
        .request(node_id, Request::Query)
        .await
        .expect("query")
    {
        Response::View(view) => *view,
        other => panic!("view expected, got {other:?}"),
    }
}

/// The next Assign `agent` receives, placed from the heartbeats: no offer before it.
async fn placed_directly(
    agent: &mut ScriptedAgent,
    what: &str,
) -> (Box<Assign>, tokio::sync::oneshot::Sender<Response>) {
    next_event(&mut agent.events, what, |e| match e {
        MeshEvent::Gossip {
            message: GossipMessage::Offer(offer),
            ..
        } => panic!("{what}: offered instead of placed at once: {offer:?}"),
        MeshEvent::Request {
            request: Request::Assign(assign),
            reply,
            ..
        } => Some((assign, reply)),
        _ => None,
    })
    .await
}

/// Every agent bids on an offer as soon as it is seen. An offer may close before the
/// bids arrive (it was made before all agents were known): the next one is taken then.
async fn bid_by_all(agents: &mut [ScriptedAgent], node_id: libp2p::PeerId) -> Offer {
    loop {
        let offer = next_event(&mut agents[0].events, "offer", |e| match e {
            MeshEvent::Gossip {
                source,
                message: GossipMessage::Offer(offer),
            } if source == node_id => Some(offer),
            _ => None,
        })
        .await;
        let bid = Request::Bid(Bid {
            pod: offer.pod.uid.clone(),
            epoch: offer.epoch,
        });
        let mut acks = 0;
        for agent in agents.iter().rev() {
            if agent
                .handle
                .request(node_id, bid.clone())
                .await
                .expect("bid")
                == Response::Ack
            {
                acks += 1;
            }
        }
        if acks == agents.len() {
            return offer;
        }
    }
}

#[tokio::test]
async fn the_next_agent_gets_the_pod_when_the_best_declines_and_stale_copies_are_superseded() {
    let Scene {
        cancel,
        dir,
        node_addr,
        node_id,
        node_metrics,
        agent_keys,
        agent_ids,
        mut agents,
    } = scene_without_pods(|agent_ids| OwnerConfig {
        adopt_window: Duration::from_millis(500),
        offer_window: Duration::from_secs(2),
        agents: TrustedPeers::new(agent_ids.to_vec()),
        // Agent 1 doubles as the operator asking `beemesh status`.
        clients: TrustedPeers::new([agent_ids[1]]),
        ..OwnerConfig::default()
    })
    .await;
    let stranger_key = Keypair::generate_ed25519();
    let (stranger, _stranger_events) = start_peer(
        stranger_key.clone(),
        None,
        vec![node_addr.clone()],
        vec![],
        &cancel,
    )
    .await;
    // Both agents heartbeat throughout: the owner offers only to a mesh with agents.
    // Agent 0 is emptier, so the owner (spreading) ranks it first, whatever anyone bids.
    let seqs = [
        std::sync::Arc::new(Sequencer::default()),
        std::sync::Arc::new(Sequencer::default()),
    ];
    // Recorded now, played again at the end.
    let captured = heartbeat(&seqs[0], 8000, vec![]);
    let alive = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let beats: Vec<_> = agents
        .iter()
        .zip([8000, 2000])
        .zip(seqs.clone())
        .map(|((agent, free), seq)| beat_while(agent, seq, free, alive.clone()))
        .collect();
    pod_once_both_heard(&dir, &agents, node_id, &agent_ids, POD).await;
    // Placed at once from the heartbeats, without an offer: the best-ranked agent is
    // asked first and declines. Its assignment is signed for it alone.
    let (declined, reply) = placed_directly(&mut agents[0], "assign to the best agent").await;
    for beat in beats {
        beat.abort();
    }
    // A stranger's bid, from a peer that never heartbeat, is refused.
    let bid = Request::Bid(Bid {
        pod: declined.statement.pod.clone(),
        epoch: declined.epoch,
    });
    assert!(matches!(
        stranger.request(node_id, bid).await.expect("bid"),
        Response::Declined { .. }
    ));
    assert_eq!(declined.statement.agent, PeerRef(agent_ids[0]));
    statement::verify_assign(
        &declined.statement,
        &node_id,
        &agent_ids[0],
        &declined.pod,
        declined.epoch,
        declined.statement.expires_at - 1,
    )
    .expect("a genuine assignment");
    assert_eq!(
        declined.statement.spec_digest,
        statement::spec_digest(&declined.pod)
    );
    reply
        .send(Response::Declined {
            reason: "no longer fits".into(),
        })
        .expect("reply");
    // The next agent gets the same epoch: the decliner runs nothing.
    let (assign, reply) = placed_directly(&mut agents[1], "assign to the next agent").await;
    assert_eq!(assign.epoch, declined.epoch);
    assert_eq!(assign.statement.agent, PeerRef(agent_ids[1]));
    reply.send(Response::Ack).expect("reply");

    let pod_ref = PodRef {
        uid: PodUid("11111111-2222-3333-4444-555555555555".into()),
        namespace: "default".into(),
        name: "scripted".into(),
    };
    // Only the agent that runs the pod may ask where its connections go: the trusted
    // agent that declined it is refused.
    let route = |agent: &ScriptedAgent, pod: &PodRef| {
        let request = Request::Route(ClusterDial {
            pod: pod.clone(),
            to: "10.80.0.10:80".parse().expect("addr"),
            udp: false,
        });
        let handle = agent.handle.clone();
        async move {
            match handle.request(node_id, request).await.expect("route") {
                Response::Declined { reason } => reason,
                other => panic!("declined expected, got {other:?}"),
            }
        }
    };
    let not_placed = format!("pod {pod_ref} is not placed on this agent");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reason = route(&agents[1], &pod_ref).await;
        if reason != not_placed {
            assert!(reason.contains("no Service serves TCP"), "{reason}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{reason}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(route(&agents[0], &pod_ref).await, not_placed);
    // Nor may the agent that runs it speak for it under another namespace, whose
    // policies would then be the ones applied.
    let renamed = PodRef {
        namespace: "other".into(),
        ..pod_ref.clone()
    };
    assert_eq!(
        route(&agents[1], &renamed).await,
        format!("pod {renamed} is not placed on this agent")
    );
    let report = |seq: &Sequencer, epoch: Epoch, phase: &str, assignment: &SignedAssignment| {
        let (seq, sent_at_ms) = seq.next();
        Request::Status(Box::new(StatusReport {
            pod: pod_ref.clone(),
            epoch,
            status: PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            },
            removed: false,
            assignment: assignment.clone(),
            seq,
            sent_at_ms,
            events: Vec::new(),
        }))
    };
    // The runner's report is taken; the view shows the pod Running on it.
    let runner = agents[1].handle.local_peer_id();
    let running = report(&seqs[1], assign.epoch, "Running", &assign.statement);
    assert_eq!(
        agents[1]
            .handle
            .request(node_id, running.clone())
            .await
            .expect("status"),
        Response::Ack
    );
    let view = |handle: MeshHandle| async move {
        query_view(&handle, node_id)
            .await
            .pods
            .iter()
            .find(|p| p.pod.uid.0 == "11111111-2222-3333-4444-555555555555")
            .map(|p| (p.phase.clone(), p.agent, p.epoch))
            .expect("pod listed")
    };
    assert_eq!(
        view(agents[1].handle.clone()).await,
        ("Running".into(), Some(PeerRef(runner)), assign.epoch)
    );
    // Nobody else may ask.
    assert!(matches!(
        stranger
            .request(node_id, Request::Query)
            .await
            .expect("query"),
        Response::Declined { .. }
    ));

    // The same report played again is dropped (the phase it would set stays as is).
    let replays = dropped(&node_metrics, "status", "replayed");
    let failed = report(&seqs[1], assign.epoch, "Failed", &assign.statement);
    agents[1]
        .handle
        .request(node_id, failed.clone())
        .await
        .expect("status");
    agents[1]
        .handle
        .request(node_id, running)
        .await
        .expect("status");
    assert_eq!(dropped(&node_metrics, "status", "replayed"), replays + 1);
    assert_eq!(view(agents[1].handle.clone()).await.0, "Failed");
    agents[1]
        .handle
        .request(
            node_id,
            report(&seqs[1], assign.epoch, "Running", &assign.statement),
        )
        .await
        .expect("status");

    // The decliner claims the pod with the assignment it was offered: the runner keeps it.
    assert_eq!(
        agents[0]
            .handle
            .request(
                node_id,
                report(&seqs[0], declined.epoch, "Running", &declined.statement)
            )
            .await
            .expect("status"),
        Response::Superseded {
            current: assign.epoch
        }
    );
    // A higher epoch, with an assignment it signed itself or altered: refused.
    let mut forged = statement::sign(
        &agent_keys[0],
        statement::Assignment {
            agent: agent_ids[0],
            pod: pod_ref.uid.clone(),
            epoch: assign.epoch.next(),
            spec_digest: declined.statement.spec_digest.clone(),
            expires_at: u64::MAX,
        },
    );
    forged.owner = PeerRef(node_id);
    let mut altered = declined.statement.clone();
    altered.epoch = assign.epoch.next();
    for statement in [forged, altered] {
        let answer = agents[0]
            .handle
            .request(
                node_id,
                report(&seqs[0], statement.epoch, "Running", &statement),
            )
            .await
            .expect("status");
        assert!(matches!(answer, Response::Declined { .. }), "{answer:?}");
    }
    assert_eq!(
        view(agents[1].handle.clone()).await,
        ("Running".into(), Some(PeerRef(runner)), assign.epoch),
        "the pod never moved"
    );

    // A report of an older epoch is superseded.
    let stale_statement = statement::sign(
        &Keypair::generate_ed25519(),
        statement::Assignment {
            agent: agent_ids[0],
            pod: pod_ref.uid.clone(),
            epoch: Epoch(assign.epoch.0 - 1),
            spec_digest: String::new(),
            expires_at: 0,
        },
    );
    assert!(matches!(
        agents[0]
            .handle
            .request(
                node_id,
                report(&seqs[0], stale_statement.epoch, "Running", &stale_statement)
            )
            .await
            .expect("status"),
        Response::Declined { .. }
    ));

    // A heartbeat listing a pod the owner does not have brings a Release; the same
    // heartbeat played again is dropped.
    let orphan = PodRef {
        uid: PodUid("99999999-0000-0000-0000-000000000000".into()),
        namespace: "default".into(),
        name: "orphan".into(),
    };
    let beat = hosting(
        &agents[0],
        seqs[0].clone(),
        running_pod(orphan, node_id, Epoch(3)),
    );
    let (release, reply) = next_event(
        &mut agents[0].events,
        "release of the orphan",
        |e| match e {
            MeshEvent::Request {
                request: Request::Release(release),
                reply,
                ..
            } => Some((release, reply)),
            _ => None,
        },
    )
    .await;
    beat.abort();
    assert_eq!(release.pod.0, "99999999-0000-0000-0000-000000000000");
    assert_eq!(release.epoch, Epoch(3));
    reply.send(Response::Ack).expect("reply");

    // The recorded heartbeat, published again: a new gossip message (gossipsub numbers
    // it anew) carrying the agent's old sequence number.
    let stale_beat = captured;
    let replayed_before = dropped(&node_metrics, "heartbeat", "replayed");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while dropped(&node_metrics, "heartbeat", "replayed") == replayed_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old heartbeat was not dropped"
        );
        let _ = agents[0].handle.publish(&stale_beat).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The pod is deleted: its runner gets a Release, stops it, and its one `removed`
    // report is lost. Its heartbeats no longer list the pod: the deletion is done.
    let hosted = HostedPod {
        pod: pod_ref.clone(),
        owner: PeerRef(node_id),
        epoch: assign.epoch,
        phase: "Running".into(),
        requests: Resources::default(),
        host_ports: vec![],
        unrecorded: false,
    };
    let still_runs = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let beat = {
        let (handle, seq, still_runs) = (
            agents[1].handle.clone(),
            seqs[1].clone(),
            still_runs.clone(),
        );
        tokio::spawn(async move {
            loop {
                let pods = match still_runs.load(std::sync::atomic::Ordering::Acquire) {
                    true => vec![hosted.clone()],
                    false => vec![],
                };
                let _ = handle.publish(&heartbeat(&seq, 8000, pods)).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    std::fs::remove_file(dir.path().join("pod.yaml")).expect("delete the manifest");
    let (release, reply) =
        next_event(
            &mut agents[1].events,
            "release of the deleted pod",
            |e| match e {
                MeshEvent::Request {
                    request: Request::Release(release),
                    reply,
                    ..
                } => Some((release, reply)),
                _ => None,
            },
        )
        .await;
    assert_eq!(
        (release.pod.clone(), release.epoch),
        (pod_ref.uid.clone(), assign.epoch)
    );
    reply.send(Response::Ack).expect("reply");
    still_runs.store(false, std::sync::atomic::Ordering::Release);
    let deleted = pod_ref.uid.clone();
    let listed = |handle: MeshHandle| {
        let deleted = deleted.clone();
        async move {
            query_view(&handle, node_id)
                .await
                .pods
                .iter()
                .any(|p| p.pod.uid == deleted)
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while listed(agents[1].handle.clone()).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deleted pod stayed Terminating after its runner stopped listing it"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    beat.abort();
    cancel.cancel();
}

const STRICT_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: strict
  uid: 22222222-3333-4444-5555-666666666666
  annotations: {beemesh.io/fencing: strict}
spec:
  containers: [{name: c, image: localhost/busybox:1.35}]
"#;

/// A strict pod is never placed again while its unreachable agent's copy may still run:
/// only once the lease the owner last renewed, plus the margin, has passed. An agent
/// back in time keeps its pod; a late one is refused.
#[tokio::test]
async fn a_strict_pod_moves_only_after_its_lost_copy_s_lease_and_margin_have_passed() {
    let lease = Duration::from_secs(3);
    let margin = Duration::from_secs(1);
    let Scene {
        cancel,
        dir: manifests,
        node_id,
        node_metrics,
        agent_ids,
        mut agents,
        ..
    } = scene_without_pods(|agent_ids| OwnerConfig {
        adopt_window: Duration::from_millis(500),
        offer_window: Duration::from_secs(2),
        agent_loss_timeout: Duration::from_secs(1),
        lease,
        fencing_margin: margin,
        agents: TrustedPeers::new(agent_ids.to_vec()),
        clients: TrustedPeers::new([agent_ids[1]]),
        ..OwnerConfig::default()
    })
    .await;
    // Agent 0 is emptier: ranked first.
    let Heartbeats {
        alive,
        tasks: _beats,
        ..
    } = heartbeats(&agents);
    pod_once_both_heard(&manifests, &agents, node_id, &agent_ids, STRICT_POD).await;
    let (assign, reply) = placed_directly(&mut agents[0], "assign to agent 0").await;
    assert_eq!(
        assign.lease_ms,
        Some(3000),
        "a strict pod's assignment holds a lease"
    );
    reply.send(Response::Ack).expect("reply");
    let uid = assign.statement.pod.clone();

    let handles: Vec<MeshHandle> = agents.iter().map(|a| a.handle.clone()).collect();
    let renew = |agent: usize, statement: SignedAssignment| {
        let handle = handles[agent].clone();
        async move {
            handle
                .request(
                    node_id,
                    Request::Renew(Renew {
                        leases: vec![statement],
                    }),
                )
                .await
                .expect("renew")
        }
    };
    let granted = Response::Leases {
        granted: vec![uid.clone()],
        refused: vec![],
        lease_ms: 3000,
    };
    let refused = Response::Leases {
        granted: vec![],
        refused: vec![uid.clone()],
        lease_ms: 3000,
    };
    assert_eq!(renew(0, assign.statement.clone()).await, granted);
    // Another agent, or an altered assignment, renews nothing.
    assert_eq!(renew(1, assign.statement.clone()).await, refused);
    let mut altered = assign.statement.clone();
    altered.epoch = altered.epoch.next();
    let before = dropped(&node_metrics, "renew", "not_assigned");
    assert_eq!(renew(0, altered).await, refused);
    assert_eq!(dropped(&node_metrics, "renew", "not_assigned"), before + 1);

    let placed_on = |handle: MeshHandle| {
        let uid = uid.clone();
        async move {
            query_view(&handle, node_id)
                .await
                .pods
                .iter()
                .find(|p| p.pod.uid == uid)
                .and_then(|p| p.agent.map(|a| a.0))
        }
    };
    // A short partition: agent 0 is declared lost, but comes back before its lease
    // and margin are over; it keeps the pod, and nothing was assigned elsewhere.
    assert_eq!(renew(0, assign.statement.clone()).await, granted);
    alive[0].store(false, std::sync::atomic::Ordering::Release);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while placed_on(agents[1].handle.clone()).await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent 0 never declared lost"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        renew(0, assign.statement.clone()).await,
        granted,
        "taken back"
    );
    alive[0].store(true, std::sync::atomic::Ordering::Release);
    assert_eq!(
        placed_on(agents[1].handle.clone()).await,
        Some(agent_ids[0])
    );
    // Its heartbeats are heard again before the next partition.
    until_heard(&handles[1], node_id, &agent_ids[..1]).await;

    // For good this time: the pod goes to agent 1, not before the lease last renewed
    // plus the margin (counted from before the renewal was sent: the owner counts from
    // its arrival, which is later).
    let renewed = tokio::time::Instant::now();
    assert_eq!(renew(0, assign.statement.clone()).await, granted);
    alive[0].store(false, std::sync::atomic::Ordering::Release);
    let (moved, reply) = placed_directly(&mut agents[1], "assign to agent 1").await;
    let waited = renewed.elapsed();
    assert!(waited >= lease + margin, "placed again after {waited:?}");
    assert!(moved.epoch > assign.epoch);
    reply.send(Response::Ack).expect("reply");
    // Agent 0 had nothing else assigned meanwhile, and its late renewal is refused.
    while let Some(event) = agents[0].events.try_recv() {
        assert!(
            !matches!(
                event,
                MeshEvent::Request {
                    request: Request::Assign(_),
                    ..
                }
            ),
            "agent 0 got an assignment while partitioned"
        );
    }
    assert_eq!(renew(0, assign.statement.clone()).await, refused);
    cancel.cancel();
}

/// A node cut off from every agent (its own network failed): when they come back, the
/// relaxed copies they ran on are taken back at their epochs, with their status and
/// restart counts, instead of being restarted on whichever agent is heard first.
#[tokio::test]
async fn relaxed_copies_that_ran_on_while_the_node_was_cut_off_are_taken_back() {
    let Scene {
        cancel,
        dir: manifests,
        node_id,
        agent_ids,
        mut agents,
        ..
    } = scene_without_pods(|agent_ids| OwnerConfig {
        adopt_window: Duration::from_millis(500),
        offer_window: Duration::from_secs(1),
        agent_loss_timeout: Duration::from_secs(2),
        retry_interval: Duration::from_millis(200),
        agents: TrustedPeers::new(agent_ids.to_vec()),
        clients: TrustedPeers::new([agent_ids[1]]),
        ..OwnerConfig::default()
    })
    .await;
    // Agent 0 is emptier: ranked first.
    let Heartbeats {
        seqs,
        alive,
        tasks: _beats,
    } = heartbeats(&agents);
    pod_once_both_heard(&manifests, &agents, node_id, &agent_ids, POD).await;
    let (assign, reply) = placed_directly(&mut agents[0], "assign to agent 0").await;
    reply.send(Response::Ack).expect("reply");
    let pod_ref = PodRef {
        uid: assign.statement.pod.clone(),
        namespace: "default".into(),
        name: "scripted".into(),
    };
    let (seq, sent_at_ms) = seqs[0].next();
    let running: PodStatus = serde_json::from_value(serde_json::json!({
        "phase": "Running",
        "containerStatuses": [{"name": "c", "image": "localhost/busybox:1.35", "imageID": "",
            "ready": true, "restartCount": 0, "containerID": "podman://abc",
            "state": {"running": {}}}]}))
    .expect("status");
    let report = Request::Status(Box::new(StatusReport {
        pod: pod_ref.clone(),
        epoch: assign.epoch,
        status: running,
        removed: false,
        assignment: assign.statement.clone(),
        seq,
        sent_at_ms,
        events: Vec::new(),
    }));
    assert_eq!(
        agents[0]
            .handle
            .request(node_id, report)
            .await
            .expect("report"),
        Response::Ack
    );
    let client = agents[1].handle.clone();
    let pod_view = || {
        let client = client.clone();
        let uid = pod_ref.uid.clone();
        async move {
            query_view(&client, node_id)
                .await
                .pods
                .into_iter()
                .find(|p| p.pod.uid == uid)
                .expect("pod in view")
        }
    };
    let wait_view = |what: &'static str, want: Box<dyn Fn(&beemesh::wire::PodSummary) -> bool>| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let view = pod_view().await;
            if want(&view) {
                return view;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: {view:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_view("running on agent 0", Box::new(|p| p.phase == "Running")).await;

    // Every agent goes silent: both are lost, the pod's copy with them. Agent 1 first,
    // declared lost before agent 0 stops: were agent 0 lost first, the pod would go to
    // agent 1 (not lost yet) and that assignment would supersede the lost copy.
    alive[1].store(false, std::sync::atomic::Ordering::Release);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while query_view(&client, node_id)
        .await
        .agents
        .iter()
        .any(|a| a.peer.0 == agent_ids[1])
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent 1 not declared lost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alive[0].store(false, std::sync::atomic::Ordering::Release);
    let lost = wait_view("declared lost", Box::new(|p| p.agent.is_none())).await;
    assert_eq!(lost.reason.as_deref(), Some("AgentLost"), "{lost:?}");
    // It stays so while no agent is heard (not "no agent has joined").
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = pod_view().await;
    assert_eq!(still.reason.as_deref(), Some("AgentLost"), "{still:?}");

    // Agent 1 is heard first: the pod waits for agent 0 (neither offered nor placed)
    // rather than going to agent 1.
    while agents[1].events.try_recv().is_some() {}
    alive[1].store(true, std::sync::atomic::Ordering::Release);
    let quiet = tokio::time::timeout(Duration::from_millis(1200), async {
        loop {
            match agents[1].events.recv().await {
                Some(MeshEvent::Gossip {
                    message: GossipMessage::Offer(offer),
                    ..
                }) => return format!("{offer:?}"),
                Some(MeshEvent::Request {
                    request: Request::Assign(assign),
                    ..
                }) => return format!("{assign:?}"),
                _ => {}
            }
        }
    })
    .await;
    assert!(
        quiet.is_err(),
        "placed while its agent may come back: {quiet:?}"
    );
    // Agent 0 is back, still running its copy.
    let beating = hosting(
        &agents[0],
        seqs[0].clone(),
        running_pod(pod_ref.clone(), node_id, assign.epoch),
    );
    let taken = wait_view("taken back", Box::new(|p| p.agent.is_some())).await;
    beating.abort();
    assert_eq!(taken.agent.map(|a| a.0), Some(agent_ids[0]), "{taken:?}");
    assert_eq!(taken.epoch, assign.epoch, "the same copy, not a new one");
    assert_eq!(
        taken.phase, "Running",
        "its status before the loss: {taken:?}"
    );
    assert!(taken.reason.is_none(), "{taken:?}");
    for agent in agents.iter_mut() {
        while let Some(event) = agent.events.try_recv() {
            assert!(
                !matches!(
                    event,
                    MeshEvent::Request {
                        request: Request::Assign(_),
                        ..
                    }
                ),
                "an assignment went out: the pod was placed again"
            );
        }
    }
    cancel.cancel();
}

/// Shows nothing: for owners driven by hand.
struct NoSink;

impl StatusSink for NoSink {
    fn status_changed(
        &mut self,
        _: &PodRef,
        _: Option<&PodSpec>,
        _: &PodStatus,
        _: Option<libp2p::PeerId>,
    ) {
    }
    fn removed(&mut self, _: &PodRef) {}
}

/// A counter's value in `metrics`, by its full name and labels.
fn counter(metrics: &Metrics, series: &str) -> u64 {
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// [`POD`] with a label added.
const POD_LABELLED: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: scripted, uid: 11111111-2222-3333-4444-555555555555, labels: {team: shop}}
spec:
  containers: [{name: c, image: localhost/busybox:1.35}]
"#;

/// The pod's labels as an assignment carries them.
fn team_label(assign: &Assign) -> Option<&str> {
    assign
        .pod
        .metadata
        .labels
        .as_ref()?
        .get("team")
        .map(String::as_str)
}

/// A pod that changes while its assignment waits for the agent's answer: that
/// assignment carries the pod as it was, so the owner sends the pod again, at the same
/// epoch, once the agent has taken it. (Should the change come after the answer, the
/// pod goes again all the same: the test holds either way, and shows the window only
/// when the change falls into it, as it does unless the machine is very slow.)
#[tokio::test]
async fn a_change_made_while_the_assignment_is_in_flight_follows_it_to_the_agent() {
    let Scene {
        cancel,
        dir,
        node_id,
        agent_ids,
        mut agents,
        ..
    } = scene_without_pods(|agent_ids| OwnerConfig {
        agents: TrustedPeers::new(agent_ids.to_vec()),
        clients: TrustedPeers::new([agent_ids[1]]),
        ..OwnerConfig::default()
    })
    .await;
    // 8 CPUs free on agent 0, 2 on agent 1: agent 0 is asked.
    let Heartbeats { tasks: _beats, .. } = heartbeats(&agents);
    pod_once_both_heard(&dir, &agents, node_id, &agent_ids, POD).await;
    let (first, reply) = placed_directly(&mut agents[0], "the assignment").await;
    assert_eq!(team_label(&first), None);
    std::fs::write(dir.path().join("pod.yaml"), POD_LABELLED).expect("manifest");
    // The node's inotify watch reads the change within milliseconds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    reply.send(Response::Ack).expect("reply");
    let (update, reply) = next_assign(&mut agents[0].events, "the changed pod").await;
    reply.send(Response::Ack).expect("reply");
    assert_eq!(update.epoch, first.epoch, "an update, not a new placement");
    assert_eq!(team_label(&update), Some("shop"));
    cancel.cancel();
}

const THREE_CPU_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: big-1, uid: 33333333-0000-4000-8000-000000000001}
spec:
  containers: [{name: c, image: localhost/busybox:1.35, resources: {requests: {cpu: "3"}}}]
---
apiVersion: v1
kind: Pod
metadata: {name: big-2, uid: 33333333-0000-4000-8000-000000000002}
spec:
  containers: [{name: c, image: localhost/busybox:1.35, resources: {requests: {cpu: "3"}}}]
---
apiVersion: v1
kind: Pod
metadata: {name: big-3, uid: 33333333-0000-4000-8000-000000000003}
spec:
  containers: [{name: c, image: localhost/busybox:1.35, resources: {requests: {cpu: "3"}}}]
"#;

/// Pods placed together (in one tick, before any heartbeat can show them) are placed
/// against the capacity the owner has already given: agent 0 has room for two of three
/// 3-CPU pods, agent 1 for none, so the third waits instead of over-committing agent 0.
#[tokio::test]
async fn pods_placed_together_never_over_commit_an_agent() {
    let Scene {
        cancel,
        dir: _manifests,
        node_id,
        mut agents,
        ..
    } = scene(THREE_CPU_PODS, |agent_ids| OwnerConfig {
        adopt_window: Duration::from_millis(500),
        agent_loss_timeout: Duration::from_secs(30),
        retry_interval: Duration::from_millis(200),
        agents: TrustedPeers::new(agent_ids.to_vec()),
        clients: TrustedPeers::new([agent_ids[1]]),
        ..OwnerConfig::default()
    })
    .await;
    // 8 CPUs free on agent 0, 2 on agent 1.
    let Heartbeats {
        alive,
        tasks: _beats,
        ..
    } = heartbeats(&agents);
    let (first, reply) = placed_directly(&mut agents[0], "first pod").await;
    // From here on no heartbeat shows what agent 0 was given: the owner's reservations
    // are all that keeps it from taking more.
    alive[0].store(false, std::sync::atomic::Ordering::Release);
    reply.send(Response::Ack).expect("reply");
    let (second, reply) = placed_directly(&mut agents[0], "second pod").await;
    reply.send(Response::Ack).expect("reply");
    assert_ne!(first.statement.pod, second.statement.pod);
    let third = PodUid(
        ["1", "2", "3"]
            .iter()
            .map(|n| format!("33333333-0000-4000-8000-00000000000{n}"))
            .find(|uid| *uid != first.statement.pod.0 && *uid != second.statement.pod.0)
            .expect("a third pod"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let waiting = loop {
        let view = query_view(&agents[1].handle, node_id).await;
        let pod = view.pods.into_iter().find(|p| p.pod.uid == third);
        if let Some(pod) = pod.filter(|p| p.reason.as_deref() == Some("Unschedulable")) {
            break pod;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "third pod not Unschedulable"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        waiting.message.as_deref(),
        Some("0/2 agents fit: 2 insufficient cpu"),
        "{waiting:?}"
    );
    // Neither agent was asked to take it meanwhile.
    assert_no_assignment(&mut agents, "over-committed");
    cancel.cancel();
}

const TWELVE_CPU_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: huge, uid: 12121212-0000-4000-8000-000000000001}
spec:
  containers: [{name: c, image: localhost/busybox:1.35, resources: {requests: {cpu: "12"}}}]
"#;

const TWELVE_CPU_POD_THAT_WAITS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: huge
  uid: 12121212-0000-4000-8000-000000000002
  annotations: {beemesh.io/wait-for-agent: "true"}
spec:
  containers: [{name: c, image: localhost/busybox:1.35, resources: {requests: {cpu: "12"}}}]
"#;

/// A scene for a pod larger than every agent (8 CPUs each), with the owner of a node
/// that rejects such pods after `reject_after`, as with a Kubernetes API.
async fn too_big_scene(pod: &str, reject_after: Duration) -> Scene {
    scene(pod, |agent_ids| OwnerConfig {
        adopt_window: Duration::from_millis(500),
        retry_interval: Duration::from_millis(200),
        agents: TrustedPeers::new(agent_ids.to_vec()),
        clients: TrustedPeers::new([agent_ids[1]]),
        reject_too_big_after: Some(reject_after),
        ..OwnerConfig::default()
    })
    .await
}

/// The pod `huge` as the owner's view shows it, if the view can be had yet (until the
/// agent has dialled the node, a query finds no way there).
async fn huge_pod(agent: &ScriptedAgent, node_id: libp2p::PeerId) -> Option<PodSummary> {
    match agent.handle.request(node_id, Request::Query).await {
        Ok(Response::View(view)) => view.pods.into_iter().find(|p| p.pod.name == "huge"),
        _ => None,
    }
}

/// Annotated `beemesh.io/wait-for-agent: "true"`, a pod larger than every agent is not
/// rejected: it waits, and says so, for a larger agent to join.
#[tokio::test]
async fn a_pod_annotated_to_wait_for_a_larger_agent_is_not_rejected() {
    let Scene {
        cancel,
        dir: _manifests,
        node_id,
        mut agents,
        ..
    } = too_big_scene(TWELVE_CPU_POD_THAT_WAITS, Duration::from_secs(1)).await;
    let Heartbeats { tasks: _beats, .. } = heartbeats(&agents);
    let waiting = "0/2 agents fit: 2 insufficient cpu; it asks for more cpu than any agent has \
                   (12000 > 8000): waiting for a larger agent";
    let mut first_seen = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    // Waiting, and still waiting 3 s (three times the rejection delay) later.
    loop {
        if let Some(pod) = huge_pod(&agents[1], node_id).await {
            assert_ne!(pod.phase, "Failed", "rejected: {:?}", pod.message);
            if pod.message.as_deref() == Some(waiting) {
                let since = *first_seen.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= Duration::from_secs(3) {
                    break;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never waiting as expected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_no_assignment(&mut agents, "assigned a pod no agent can hold");
    cancel.cancel();
}

/// A pod that asks for more than any agent has at all (the scheduler, seeing all agents
/// as one node, binds such pods) says so while it waits, then, when a scheduler placed
/// it (a node with a Kubernetes API), is rejected as the kubelet rejects a pod its node
/// cannot hold, instead of waiting forever. (Standalone, it waits for a larger agent:
/// tests/e2e.rs `a_pod_no_agent_fits_waits_with_the_reason_and_runs_when_capacity_appears`.)
#[tokio::test]
async fn a_pod_bigger_than_every_agent_is_rejected_as_the_kubelet_rejects_it() {
    let Scene {
        cancel,
        dir: _manifests,
        node_id,
        mut agents,
        ..
    } = too_big_scene(TWELVE_CPU_POD, Duration::from_secs(3)).await;
    // 8 CPUs in all on each agent.
    let Heartbeats { tasks: _beats, .. } = heartbeats(&agents);
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let rejected = loop {
        if let Some(pod) = huge_pod(&agents[1], node_id).await {
            if pod.phase == "Failed" {
                break pod;
            }
            if !seen.contains(&pod.message) {
                seen.push(pod.message.clone());
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not rejected: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        seen.iter().flatten().any(|m| m
            == "0/2 agents fit: 2 insufficient cpu; it asks for more cpu than any agent has \
                (12000 > 8000): rejected if no larger agent joins within 3 s"),
        "{seen:?}"
    );
    assert_eq!(rejected.reason.as_deref(), Some("OutOfcpu"));
    assert_eq!(
        rejected.message.as_deref(),
        Some(
            "Pod was rejected: no agent has enough resource: cpu, requested: 12000, largest \
             capacity: 8000, largest free: 8000 (2 agents)"
        )
    );
    assert_no_assignment(&mut agents, "assigned a pod no agent can hold");
    cancel.cancel();
}

/// When the agents the owner's view picked all decline, the owner stops trusting that
/// view for the pod: it asks the agents (an offer, bids) and gives it to a bidder.
#[tokio::test]
async fn when_every_agent_picked_declines_the_owner_asks_the_agents() {
    let Scene {
        cancel,
        dir: manifests,
        node_id,
        node_metrics,
        agent_ids,
        mut agents,
        ..
    } = scene_without_pods(|agent_ids| OwnerConfig {
        adopt_window: Duration::from_millis(500),
        offer_window: Duration::from_secs(2),
        agents: TrustedPeers::new(agent_ids.to_vec()),
        clients: TrustedPeers::new([agent_ids[1]]),
        ..OwnerConfig::default()
    })
    .await;
    let Heartbeats { tasks: _beats, .. } = heartbeats(&agents);
    pod_once_both_heard(&manifests, &agents, node_id, &agent_ids, POD).await;
    for agent in agents.iter_mut() {
        let (_, reply) = placed_directly(agent, "direct assignment").await;
        reply
            .send(Response::Declined {
                reason: "no longer fits".into(),
            })
            .expect("reply");
    }
    let offer = bid_by_all(&mut agents, node_id).await;
    let (assign, reply) = next_assign(&mut agents[0].events, "assign to the best bidder").await;
    assert_eq!(assign.epoch, offer.epoch);
    assert_eq!(assign.statement.agent, PeerRef(agent_ids[0]));
    reply.send(Response::Ack).expect("reply");
    assert_eq!(counter(&node_metrics, DIRECT_PLACEMENTS), 1);
    assert_eq!(
        counter(&node_metrics, "beemesh_placements_total{path=\"offer\"}"),
        1
    );
    cancel.cancel();
}

/// Heartbeats of both agents (agent 0 emptier), agent 1's saying its pods run in
/// `claimed`, every 300 ms until aborted.
fn beats_claiming(
    agents: &[ScriptedAgent],
    claimed: ipnet::Ipv4Net,
) -> Vec<tokio::task::JoinHandle<()>> {
    agents
        .iter()
        .enumerate()
        .map(|(i, agent)| {
            let handle = agent.handle.clone();
            let seq = Sequencer::default();
            tokio::spawn(async move {
                loop {
                    let GossipMessage::Heartbeat(mut beat) =
                        heartbeat(&seq, [8000, 2000][i], vec![])
                    else {
                        unreachable!("a heartbeat");
                    };
                    if i == 1 {
                        beat.pod_subnets = vec![claimed];
                    }
                    let _ = handle.publish(&GossipMessage::Heartbeat(beat)).await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            })
        })
        .collect()
}

fn cidr(text: &str) -> ipnet::Ipv4Net {
    text.parse().expect("cidr")
}

#[tokio::test]
async fn each_agent_runs_pods_on_its_own_subnet_and_subnets_heartbeats_claim_are_kept() {
    let Scene {
        cancel,
        dir: manifests,
        node_id,
        agent_ids,
        mut agents,
        ..
    } = scene_without_pods(|agent_ids| OwnerConfig {
        adopt_window: Duration::from_millis(500),
        agents: TrustedPeers::new(agent_ids.to_vec()),
        clients: TrustedPeers::new([agent_ids[1]]),
        pod_subnets: SubnetPool::new(cidr("10.64.0.0/23"), 24).expect("pool"),
        ..OwnerConfig::default()
    })
    .await;
    // Agent 1 already runs pods on the pool's first subnet (the owner restarted, say).
    let _beats = beats_claiming(&agents, cidr("10.64.0.0/24"));
    pod_once_both_heard(&manifests, &agents, node_id, &agent_ids, POD).await;
    let (assign, reply) = placed_directly(&mut agents[0], "assignment to the emptier").await;
    assert_eq!(
        assign.pod_subnet,
        Some(cidr("10.64.1.0/24")),
        "the free subnet"
    );
    reply
        .send(Response::Declined {
            reason: "busy".into(),
        })
        .expect("reply");
    let (assign, reply) = placed_directly(&mut agents[1], "assignment to the next").await;
    assert_eq!(assign.statement.agent, PeerRef(agent_ids[1]));
    assert_eq!(
        assign.pod_subnet,
        Some(cidr("10.64.0.0/24")),
        "the claimed subnet"
    );
    reply.send(Response::Ack).expect("reply");
    cancel.cancel();
}

#[tokio::test]
async fn an_agent_no_subnet_is_left_for_gets_no_pod_and_the_pod_says_why() {
    let Scene {
        cancel,
        dir: manifests,
        node_id,
        agent_ids,
        mut agents,
        ..
    } = scene_without_pods(|agent_ids| OwnerConfig {
        adopt_window: Duration::from_millis(500),
        retry_interval: Duration::from_secs(30),
        offer_window: Duration::from_secs(30),
        agents: TrustedPeers::new(agent_ids.to_vec()),
        clients: TrustedPeers::new([agent_ids[1]]),
        // One subnet, which agent 1 holds.
        pod_subnets: SubnetPool::new(cidr("10.64.0.0/24"), 24).expect("pool"),
        ..OwnerConfig::default()
    })
    .await;
    let _beats = beats_claiming(&agents, cidr("10.64.0.0/24"));
    pod_once_both_heard(&manifests, &agents, node_id, &agent_ids, POD).await;
    // Agent 0, the emptier, is skipped: the assignment goes to agent 1.
    let (assign, reply) = placed_directly(&mut agents[1], "assignment").await;
    assert_eq!(assign.pod_subnet, Some(cidr("10.64.0.0/24")));
    reply
        .send(Response::Declined {
            reason: "busy".into(),
        })
        .expect("reply");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let message = loop {
        let view = query_view(&agents[1].handle, node_id).await;
        let message = view.pods.into_iter().find_map(|p| p.message);
        if let Some(message) = message.filter(|m| m.contains("subnet")) {
            break message;
        }
        assert!(tokio::time::Instant::now() < deadline, "no reason shown");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        message.contains(&format!(
            "{}: no pod subnet left: all 1 /24 subnets of the mesh pod CIDR 10.64.0.0/24",
            agent_ids[0]
        )),
        "{message}"
    );
    assert_no_assignment(&mut agents[..1], "an agent without a subnet");
    cancel.cancel();
}

/// What a Service's connections are routed among: the pods of its namespace whose
/// labels hold every pair of its selector, with their status; none for an empty
/// selector.
#[tokio::test]
async fn a_service_selects_the_pods_of_its_namespace_whose_labels_hold_its_selector() {
    let pairs = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let cancel = CancellationToken::new();
    let key = Keypair::generate_ed25519();
    let (mesh, _events, event_loop) =
        mesh::start(key.clone(), MeshConfig::default(), Metrics::new()).expect("mesh");
    tokio::spawn(event_loop.run(cancel.clone()));
    let mut owner = Owner::new(
        OwnerConfig::default(),
        key,
        mesh,
        Metrics::new(),
        Box::new(NoSink),
    );
    let pods = [
        ("default", "web-1", &[("app", "web"), ("tier", "front")][..]),
        ("default", "web-2", &[("app", "web")][..]),
        ("default", "db", &[("app", "db")][..]),
        ("other", "web-3", &[("app", "web")][..]),
        ("default", "bare", &[][..]),
    ];
    let desired = |namespace: &str, name: &str, labels: &[(&str, &str)]| {
        let uid = format!("uid-{namespace}-{name}");
        let mut pod: Pod = serde_yaml::from_str(POD).expect("pod");
        pod.metadata.namespace = Some(namespace.to_string());
        pod.metadata.name = Some(name.to_string());
        pod.metadata.uid = Some(uid.clone());
        pod.metadata.labels = Some(pairs(labels)).filter(|l| !l.is_empty());
        (uid, standalone_pod(pod))
    };
    owner.set_desired(
        pods.iter()
            .map(|(namespace, name, labels)| desired(namespace, name, labels))
            .collect::<DesiredPods>(),
    );
    let selected = |owner: &Owner, namespace: &str, selector: &[(&str, &str)]| -> Vec<String> {
        let pods = owner.selected_pods(namespace, &pairs(selector));
        assert!(pods.iter().all(|p| p.status.is_some()), "with their status");
        let mut names: Vec<String> = pods.into_iter().filter_map(|p| p.metadata.name).collect();
        names.sort();
        names
    };
    let web = [("app", "web")];
    assert_eq!(selected(&owner, "default", &web), ["web-1", "web-2"]);
    assert_eq!(
        selected(&owner, "default", &[("app", "web"), ("tier", "front")]),
        ["web-1"]
    );
    assert_eq!(selected(&owner, "other", &web), ["web-3"]);
    assert!(selected(&owner, "default", &[("app", "cache")]).is_empty());
    assert!(
        selected(&owner, "default", &[]).is_empty(),
        "an empty selector selects none"
    );

    // What a selector picks follows pods added, relabelled and removed.
    let (uid, pod) = desired("default", "web-4", &web);
    owner.apply(&uid, Some(pod));
    assert_eq!(
        selected(&owner, "default", &web),
        ["web-1", "web-2", "web-4"]
    );
    let (uid, pod) = desired("default", "web-2", &[("app", "db")]);
    owner.apply(&uid, Some(pod));
    assert_eq!(selected(&owner, "default", &web), ["web-1", "web-4"]);
    assert_eq!(
        selected(&owner, "default", &[("app", "db")]),
        ["db", "web-2"]
    );
    owner.apply("uid-default-web-4", None);
    assert_eq!(selected(&owner, "default", &web), ["web-1"]);
    cancel.cancel();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A backlog is placed a bounded pass at a time, so that the node's loop gets back to
/// the agents' heartbeats and reports in between, and every pod of it is placed.
#[tokio::test]
async fn a_backlog_is_placed_a_bounded_pass_at_a_time_and_in_full() {
    let backlog = 2 * DUE_PER_PASS + DUE_PER_PASS / 2;
    let (mut owner, metrics, cancel) = owner_with_backlog(backlog);
    let placed = || counter(&metrics, DIRECT_PLACEMENTS);
    for expected in [DUE_PER_PASS, 2 * DUE_PER_PASS, backlog, backlog] {
        owner.advance_due();
        assert_eq!(placed(), expected as u64);
    }
    cancel.cancel();
}

/// With MAX_ASSIGNING assignments unanswered a pass places nothing more (under
/// overload, placing waits for the mesh rather than queueing on it), and it goes on
/// as answers come.
#[tokio::test]
async fn placing_waits_while_max_assigning_assignments_are_unanswered() {
    let (mut owner, metrics, cancel) = owner_with_backlog(MAX_ASSIGNING + DUE_PER_PASS);
    let placed = || counter(&metrics, DIRECT_PLACEMENTS);
    let passes = MAX_ASSIGNING / DUE_PER_PASS;
    for pass in 1..=passes + 1 {
        owner.advance_due();
        assert_eq!(placed(), (pass.min(passes) * DUE_PER_PASS) as u64);
    }
    assert_eq!(
        counter(&metrics, "beemesh_assignments_in_flight"),
        MAX_ASSIGNING as u64
    );
    // The agents are not reachable: each answer is a failure.
    owner.next_internal().await.expect("an answer");
    owner.advance_due();
    assert!(
        placed() > MAX_ASSIGNING as u64,
        "nothing placed once answers came"
    );
    cancel.cancel();
}

/// An owner with `backlog` pods due and four agents with room for all of them (agents
/// it is not connected to, so that nothing it sends is answered until the mesh says
/// so), and its metrics.
fn owner_with_backlog(backlog: usize) -> (Owner, Metrics, CancellationToken) {
    let cancel = CancellationToken::new();
    let key = Keypair::generate_ed25519();
    let (mesh, _events, event_loop) =
        mesh::start(key.clone(), MeshConfig::default(), Metrics::new()).expect("mesh");
    tokio::spawn(event_loop.run(cancel.clone()));
    let agents: Vec<libp2p::PeerId> = (0..4)
        .map(|_| Keypair::generate_ed25519().public().to_peer_id())
        .collect();
    let metrics = Metrics::new();
    let mut owner = Owner::new(
        OwnerConfig {
            agents: TrustedPeers::new(agents.clone()),
            adopt_window: Duration::ZERO,
            ..OwnerConfig::default()
        },
        key,
        mesh,
        metrics.clone(),
        Box::new(NoSink),
    );
    for agent in &agents {
        let GossipMessage::Heartbeat(mut beat) = heartbeat(&Sequencer::default(), 8000, vec![])
        else {
            panic!("a heartbeat");
        };
        beat.capacity.pods = backlog as u64;
        beat.free.pods = backlog as u64;
        owner.on_heartbeat(*agent, beat);
    }
    owner.set_desired(
        (0..backlog)
            .map(|i| {
                let mut pod: Pod = serde_yaml::from_str(POD).expect("pod");
                let uid = format!("backlog-{i}");
                pod.metadata.name = Some(uid.clone());
                pod.metadata.uid = Some(uid.clone());
                (uid, standalone_pod(pod))
            })
            .collect::<DesiredPods>(),
    );
    (owner, metrics, cancel)
}

const DIRECT_PLACEMENTS: &str = "beemesh_placements_total{path=\"direct\"}";
