//! The owner's protocol, against scripted agents on a real loopback mesh: the best
//! bidder declines and the next one gets the pod; stale epochs are superseded; pods the
//! owner does not have are released.

use std::collections::BTreeMap;
use std::time::Duration;

use beemesh::mesh::{self, MeshConfig, MeshEvent, MeshHandle};
use beemesh::metrics::Metrics;
use beemesh::node::owner::OwnerConfig;
use beemesh::node::{Node, NodeConfig};
use beemesh::wire::{
    Bid, Epoch, GossipMessage, Heartbeat, HostedPod, PeerRef, PodRef, PodUid, Request, Resources,
    Response, StatusReport, Topic,
};
use k8s_openapi::api::core::v1::PodStatus;
use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use tokio::sync::mpsc;
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
    events: mpsc::Receiver<MeshEvent>,
}

async fn start_peer(
    listen: Option<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    subscribe: Vec<Topic>,
    cancel: &CancellationToken,
) -> (MeshHandle, mpsc::Receiver<MeshEvent>) {
    let config = MeshConfig {
        listen: listen.into_iter().collect(),
        bootstrap,
        subscribe,
        ..MeshConfig::default()
    };
    let (handle, events, event_loop) =
        mesh::start(Keypair::generate_ed25519(), config, Metrics::new()).expect("mesh");
    tokio::spawn(event_loop.run(cancel.clone()));
    (handle, events)
}

fn heartbeat(pods: Vec<HostedPod>) -> GossipMessage {
    let capacity = Resources {
        cpu_millis: 4000,
        memory_bytes: 8 << 30,
        pods: 10,
    };
    GossipMessage::Heartbeat(Heartbeat {
        labels: BTreeMap::new(),
        capacity,
        free: capacity,
        pods,
        uptime_secs: 1,
        storage_bytes: 0,
    })
}

async fn next_event<T>(
    events: &mut mpsc::Receiver<MeshEvent>,
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

#[tokio::test]
async fn the_next_bidder_gets_the_pod_when_the_best_declines_and_stale_copies_are_superseded() {
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pod.yaml"), POD).expect("manifest");

    let node_addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", free_port())
        .parse()
        .expect("addr");
    let (node_mesh, node_events) = start_peer(
        Some(node_addr.clone()),
        vec![],
        vec![Topic::Heartbeats],
        &cancel,
    )
    .await;
    let node_id = node_mesh.local_peer_id();
    let node = Node::new(
        NodeConfig {
            pod_manifest_path: Some(dir.path().to_path_buf()),
            owner: OwnerConfig {
                adopt_window: Duration::from_millis(500),
                offer_window: Duration::from_secs(2),
                ..OwnerConfig::default()
            },
        },
        node_mesh.clone(),
        Metrics::new(),
    );
    tokio::spawn(node.run(node_events, None, None, cancel.clone()));

    let mut agents = Vec::new();
    for _ in 0..2 {
        let (handle, events) =
            start_peer(None, vec![node_addr.clone()], Topic::ALL.to_vec(), &cancel).await;
        agents.push(ScriptedAgent { handle, events });
    }
    // Both agents heartbeat throughout: the owner offers only to a mesh with agents.
    let beats: Vec<_> = agents
        .iter()
        .map(|agent| {
            let handle = agent.handle.clone();
            tokio::spawn(async move {
                loop {
                    let _ = handle.publish(&heartbeat(vec![])).await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            })
        })
        .collect();
    // Both bid on an offer as soon as it is seen; agent 0 bids higher. An offer may
    // close before the bids arrive (it was made before both agents were known): the
    // next one is taken then.
    let offer = loop {
        let offer = next_event(&mut agents[0].events, "offer", |e| match e {
            MeshEvent::Gossip {
                source,
                message: GossipMessage::Offer(offer),
            } if source == node_id => Some(offer),
            _ => None,
        })
        .await;
        let mut acks = 0;
        for (agent, score) in agents.iter().zip([900, 100]) {
            let bid = Request::Bid(Bid {
                pod: offer.pod.uid.clone(),
                epoch: offer.epoch,
                score,
            });
            if agent.handle.request(node_id, bid).await.expect("bid") == Response::Ack {
                acks += 1;
            }
        }
        if acks == 2 {
            break offer;
        }
    };
    for beat in beats {
        beat.abort();
    }
    // The best bidder is asked first and declines.
    let reply = next_event(
        &mut agents[0].events,
        "assign to the best bidder",
        |e| match e {
            MeshEvent::Request {
                request: Request::Assign(assign),
                reply,
                ..
            } => Some((assign, reply)),
            _ => None,
        },
    )
    .await;
    assert_eq!(reply.0.epoch, offer.epoch);
    reply
        .1
        .send(Response::Declined {
            reason: "no longer fits".into(),
        })
        .expect("reply");
    // The next bidder gets the same epoch: the decliner runs nothing.
    let (assign, reply) = next_event(
        &mut agents[1].events,
        "assign to the next bidder",
        |e| match e {
            MeshEvent::Request {
                request: Request::Assign(assign),
                reply,
                ..
            } => Some((assign, reply)),
            _ => None,
        },
    )
    .await;
    assert_eq!(assign.epoch, offer.epoch);
    reply.send(Response::Ack).expect("reply");

    let pod_ref = PodRef {
        uid: PodUid("11111111-2222-3333-4444-555555555555".into()),
        namespace: "default".into(),
        name: "scripted".into(),
    };
    let report = |epoch: Epoch| {
        Request::Status(Box::new(StatusReport {
            pod: pod_ref.clone(),
            epoch,
            status: PodStatus {
                phase: Some("Running".into()),
                ..Default::default()
            },
            removed: false,
        }))
    };
    // The runner's report is taken; the view shows the pod Running on it.
    let runner = agents[1].handle.local_peer_id();
    assert_eq!(
        agents[1]
            .handle
            .request(node_id, report(assign.epoch))
            .await
            .expect("status"),
        Response::Ack
    );
    let Response::View(view) = agents[1]
        .handle
        .request(node_id, Request::Query)
        .await
        .expect("query")
    else {
        panic!("view expected");
    };
    let pod = view
        .pods
        .iter()
        .find(|p| p.pod == pod_ref)
        .expect("pod listed");
    assert_eq!(pod.phase, "Running");
    assert_eq!(pod.agent, Some(PeerRef(runner)));

    // A report of an older epoch is superseded.
    let stale = Epoch(assign.epoch.0 - 1);
    assert_eq!(
        agents[0]
            .handle
            .request(node_id, report(stale))
            .await
            .expect("status"),
        Response::Superseded {
            current: assign.epoch
        }
    );

    // A heartbeat listing a pod the owner does not have brings a Release.
    let orphan = HostedPod {
        pod: PodRef {
            uid: PodUid("99999999-0000-0000-0000-000000000000".into()),
            namespace: "default".into(),
            name: "orphan".into(),
        },
        owner: PeerRef(node_id),
        epoch: Epoch(3),
        phase: "Running".into(),
        requests: Resources::default(),
        host_ports: vec![],
    };
    let handle = agents[0].handle.clone();
    let beat = tokio::spawn(async move {
        loop {
            let _ = handle.publish(&heartbeat(vec![orphan.clone()])).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
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
    cancel.cancel();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
