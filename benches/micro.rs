//! Micro-benchmarks (criterion): the wire codec of the messages every placement sends,
//! the mesh's request frame codec, the owner's ranking of bidders and the agent's
//! translation of a pod into Podman plans. `cargo bench --bench micro`; figures in
//! BENCHMARKS.md.

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use beemesh::mesh::WireCodec;
use beemesh::placement::{self, AgentCapacity, Candidate, ScoreMode};
use beemesh::runtime::dns;
use beemesh::runtime::translate::{self, ContainerKind, PlanContext};
use beemesh::trust::statement;
use beemesh::view::SeenAgent;
use beemesh::wire::{
    self, AgentHealth, Assign, Epoch, GossipMessage, Heartbeat, HostedPod, Offer, PeerRef, PodRef,
    PodUid, Request, Resources, SignedAssignment, Topic,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use k8s_openapi::api::core::v1::Pod;
use libp2p::identity::Keypair;
use libp2p::request_response::Codec;
use libp2p::{PeerId, StreamProtocol};

const TYPICAL_POD: &str = include_str!("typical-pod.yaml");

fn typical_pod() -> Pod {
    serde_yaml::from_str(TYPICAL_POD).expect("the typical pod parses")
}

fn pod_ref(i: usize) -> PodRef {
    PodRef {
        uid: PodUid(format!("00000000-0000-4000-8000-{i:012x}")),
        namespace: "default".into(),
        name: format!("web-7d9c8b6f5-{i:06}"),
    }
}

fn requests() -> Resources {
    Resources {
        cpu_millis: 100,
        memory_bytes: 128 << 20,
        pods: 1,
    }
}

fn offer() -> Offer {
    Offer {
        pod: pod_ref(1),
        epoch: Epoch(1_796_342_562),
        requests: requests(),
        agent_selector: placement::parse_selector("zone in (zone-0,zone-1)").expect("selector"),
        host_ports: vec![],
        spec_digest: statement::spec_digest(&typical_pod()),
    }
}

fn heartbeat(pods: usize) -> Heartbeat {
    let owner = PeerRef(PeerId::random());
    let capacity = Resources {
        cpu_millis: 16_000,
        memory_bytes: 64 << 30,
        pods: 110,
    };
    Heartbeat {
        labels: BTreeMap::from([("zone".to_string(), "zone-1".to_string())]),
        capacity,
        free: capacity.saturating_sub(Resources {
            cpu_millis: 100 * pods as u64,
            memory_bytes: (128 << 20) * pods as u64,
            pods: pods as u64,
        }),
        pods: (0..pods)
            .map(|i| HostedPod {
                pod: pod_ref(i),
                owner,
                epoch: Epoch(1_796_342_562),
                phase: "Running".into(),
                requests: requests(),
                host_ports: vec![],
                unrecorded: false,
            })
            .collect(),
        uptime_secs: 86_400,
        storage_bytes: 100 << 30,
        seq: 1_796_342_562_000_001,
        sent_at_ms: 1_796_342_562_000,
        health: AgentHealth::default(),
        pod_subnets: vec!["10.64.3.0/24".parse().expect("cidr")],
    }
}

/// The typical pod's assignment, signed by `owner`.
fn signed_assignment(owner: &Keypair) -> SignedAssignment {
    statement::sign(
        owner,
        statement::Assignment {
            agent: PeerId::random(),
            pod: pod_ref(1).uid,
            epoch: Epoch(1_796_342_562),
            spec_digest: statement::spec_digest(&typical_pod()),
            expires_at: 1_796_343_162,
        },
    )
}

fn assign() -> Request {
    Request::Assign(Box::new(Assign {
        epoch: Epoch(1_796_342_562),
        pod: typical_pod(),
        volumes: BTreeMap::new(),
        pull_credentials: Vec::new(),
        statement: signed_assignment(&Keypair::generate_ed25519()),
        lease_ms: None,
        pod_subnet: Some("10.64.3.0/24".parse().expect("cidr")),
        cluster_ranges: vec!["10.43.0.0/16".parse().expect("cidr")],
        cluster_domain: Some("cluster.local".into()),
    }))
}

fn wire_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");
    let messages: [(&str, GossipMessage); 2] = [
        ("offer", GossipMessage::Offer(offer())),
        (
            "heartbeat_100_pods",
            GossipMessage::Heartbeat(heartbeat(100)),
        ),
    ];
    for (name, message) in &messages {
        let bytes = wire::encode(message, wire::MAX_GOSSIP_BYTES).expect("encodes");
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(BenchmarkId::new("encode", name), |b| {
            b.iter(|| wire::encode(black_box(message), wire::MAX_GOSSIP_BYTES))
        });
        group.bench_function(BenchmarkId::new("decode", name), |b| {
            b.iter(|| wire::decode_gossip(message.topic(), black_box(&bytes)))
        });
    }
    let assign = assign();
    let bytes = wire::encode(&assign, wire::MAX_REQUEST_BYTES).expect("encodes");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function(BenchmarkId::new("encode", "assign"), |b| {
        b.iter(|| wire::encode(black_box(&assign), wire::MAX_REQUEST_BYTES))
    });
    group.bench_function(BenchmarkId::new("decode", "assign"), |b| {
        b.iter(|| wire::decode::<Request>(black_box(&bytes), wire::MAX_REQUEST_BYTES))
    });
    group.finish();
    assert!(matches!(
        wire::decode_gossip(
            Topic::Offers,
            &wire::encode(&messages[0].1, usize::MAX).expect("encodes")
        ),
        Ok(GossipMessage::Offer(_))
    ));
}

/// The request-response frame codec as the mesh runs it: length prefix, size check,
/// envelope, on an in-memory stream.
fn frame_codec(c: &mut Criterion) {
    let protocol = StreamProtocol::new(wire::REQUEST_PROTOCOL);
    let mut codec = WireCodec::default();
    let assign = assign();
    let mut group = c.benchmark_group("frame");
    group.bench_function("assign_write_read", |b| {
        b.iter(|| {
            futures::executor::block_on(async {
                let mut buf = futures::io::Cursor::new(Vec::with_capacity(4096));
                codec
                    .write_request(&protocol, &mut buf, black_box(assign.clone()))
                    .await
                    .expect("writes");
                let mut read = futures::io::Cursor::new(buf.into_inner());
                codec
                    .read_request(&protocol, &mut read)
                    .await
                    .expect("reads")
            })
        })
    });
    let bid = Request::Bid(wire::Bid {
        pod: pod_ref(1).uid,
        epoch: Epoch(1_796_342_562),
    });
    group.bench_function("bid_write_read", |b| {
        b.iter(|| {
            futures::executor::block_on(async {
                let mut buf = futures::io::Cursor::new(Vec::with_capacity(256));
                codec
                    .write_request(&protocol, &mut buf, black_box(bid.clone()))
                    .await
                    .expect("writes");
                let mut read = futures::io::Cursor::new(buf.into_inner());
                codec
                    .read_request(&protocol, &mut read)
                    .await
                    .expect("reads")
            })
        })
    });
    group.finish();
}

fn agents(n: usize) -> Vec<AgentCapacity> {
    let capacity = Resources {
        cpu_millis: 16_000,
        memory_bytes: 64 << 30,
        pods: 110,
    };
    (0..n)
        .map(|i| {
            let pods = (i * 7919 % 100) as u64;
            AgentCapacity {
                labels: Arc::new(BTreeMap::from([(
                    "zone".to_string(),
                    format!("zone-{}", i % 3),
                )])),
                capacity,
                free: capacity.saturating_sub(Resources {
                    cpu_millis: 100 * pods,
                    memory_bytes: (128 << 20) * pods,
                    pods,
                }),
                used_host_ports: BTreeSet::new(),
                health: AgentHealth::default(),
            }
        })
        .collect()
}

/// What the owner does to place a pod: keep the agents that fit, score them, take the
/// best; and, when none fit, explain why.
fn placement_scoring(c: &mut Criterion) {
    let offer = offer();
    let mut group = c.benchmark_group("placement");
    for n in [1_000, 10_000] {
        let agents = agents(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("rank", n), &agents, |b, agents| {
            b.iter(|| {
                agents
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| placement::misfits(black_box(&offer), a).is_empty())
                    .map(|(i, a)| (placement::score(&offer, a, ScoreMode::Spread), i))
                    .max()
            })
        });
        group.bench_with_input(BenchmarkId::new("explain", n), &agents, |b, agents| {
            b.iter(|| placement::explain(black_box(&offer), agents.iter()))
        });
        // What the owner does to place a pod (Owner::search): the live agents' capacities
        // (worked out once per heartbeat; 10 pods each here) checked until
        // `fitting_agents_to_find` fit, those scored and ranked.
        let seen: Vec<SeenAgent> = (0..n)
            .map(|i| {
                let mut heartbeat = heartbeat(10);
                heartbeat.labels =
                    BTreeMap::from([("zone".to_string(), format!("zone-{}", i % 3))]);
                SeenAgent::new(heartbeat, tokio::time::Instant::now())
            })
            .collect();
        let want = placement::fitting_agents_to_find(n);
        group.bench_with_input(BenchmarkId::new("search", n), &seen, |b, seen| {
            b.iter(|| {
                let mut ranked: Vec<Candidate<usize>> = seen
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| placement::misfits(black_box(&offer), s.capacity()).is_empty())
                    .take(want)
                    .map(|(agent, s)| Candidate {
                        agent,
                        score: placement::score(&offer, s.capacity(), ScoreMode::Spread),
                        unseen: 0,
                    })
                    .collect();
                placement::keep_best(&mut ranked, placement::DIRECT_CANDIDATES);
                ranked.first().map(|c| c.agent)
            })
        });
    }
    group.finish();
}

/// The agent's translation of the typical pod into its Podman pod and container plans,
/// and the owner's checks of a pod it is handed.
fn spec_translation(c: &mut Criterion) {
    let pod = typical_pod();
    let host_dns = dns::parse_resolv_conf("nameserver 10.0.0.2\nsearch corp.example\n");
    let ctx = PlanContext {
        agent: "12D3KooWEgQ4T6FTwEvEHPh4EVqNMC3ogbLa5TqtP7hdkbMpkS9Q",
        owner: "12D3KooWGCy5CKbbwq819tJ4DC5sC15zUr9GWnCVTtMrHAfU23ZN",
        epoch: Epoch(1_796_342_562),
        volumes_dir: Path::new("/var/lib/beemesh/volumes/pod"),
        files_dir: Path::new("/run/beemesh/volumes/pod"),
        pod_ip: Some("10.64.3.7".parse().expect("ip")),
        pod_subnet: Some("10.64.3.0/24".parse().expect("cidr")),
        cluster_dns: None,
        host_ip: Some("10.0.0.1".parse().expect("ip")),
        node_name: "agent-1",
        host_dns: &host_dns,
        memory_dirs: &BTreeMap::new(),
        group_socket_dir: None,
    };
    let mut group = c.benchmark_group("translate");
    group.bench_function("typical_pod_plans", |b| {
        b.iter(|| {
            let pod = black_box(&pod);
            let plan = translate::pod_plan(pod, &ctx).expect("pod plan");
            let spec = pod.spec.as_ref().expect("spec");
            let containers: Vec<_> = spec
                .containers
                .iter()
                .map(|c| translate::container_plan(pod, c, ContainerKind::App, 0, &ctx))
                .collect::<Result<_, _>>()
                .expect("container plans");
            (plan, containers)
        })
    });
    group.bench_function("owner_checks", |b| {
        b.iter(|| {
            let pod = black_box(&pod);
            translate::validate(pod).expect("valid");
            let requests = translate::pod_requests(pod).expect("requests");
            (requests, statement::spec_digest(pod))
        })
    });
    group.finish();
}

/// What an owner does to every status report: check that the assignment it carries
/// is the owner's own, by verifying the signature or by signing it again.
fn assignment_check(c: &mut Criterion) {
    let owner = Keypair::generate_ed25519();
    let owner_id = owner.public().to_peer_id();
    let signed = signed_assignment(&owner);
    let mut group = c.benchmark_group("assignment");
    group.bench_function("verify", |b| {
        b.iter(|| statement::verify_signature(black_box(&signed), &owner_id))
    });
    group.bench_function("verify_own", |b| {
        b.iter(|| statement::verify_own_signature(black_box(&signed), &owner))
    });
    group.finish();
}

criterion_group!(
    benches,
    wire_codec,
    frame_codec,
    placement_scoring,
    spec_translation,
    assignment_check
);
criterion_main!(benches);
