//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) and the inputs of fixed
//! crashes (`fuzz/regressions/<target>/`) through the fuzz bodies in
//! `beemesh::fuzz_targets`, on stable: any panic fails the test. A target whose corpus
//! directory is missing or empty fails too, so that a renamed target cannot skip.
//!
//! The long runs are `hack/fuzz.sh` (cargo-fuzz, nightly); see RELIABILITY.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use beemesh::fuzz_targets;

type Body = fn(&[u8]);

/// Every target: its name in `fuzz/fuzz_targets/` and its body.
const TARGETS: &[(&str, Body)] = &[
    ("wire_message", fuzz_targets::wire_message),
    ("mesh_stream", fuzz_targets::mesh_stream),
    ("trust_records", fuzz_targets::trust_records),
    ("spdy_frames", fuzz_targets::spdy_frames),
    ("spdy_header_block", fuzz_targets::spdy_header_block),
    ("spdy_session", fuzz_targets::spdy_session),
    ("ws_channel", fuzz_targets::ws_channel),
    ("tunnel_frame", fuzz_targets::tunnel_frame),
    ("manifest_yaml", fuzz_targets::manifest_yaml),
    ("translate_pod", fuzz_targets::translate_pod),
    ("quantity", fuzz_targets::quantity),
    ("kubelet_query", fuzz_targets::kubelet_query),
    ("raft_frames", fuzz_targets::raft_frames),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every file of `dir` through `body`; the files that panicked.
fn replay(target: &str, body: Body, dir: &Path) -> (usize, Vec<String>) {
    let mut failed = Vec::new();
    let inputs = files(dir);
    for path in &inputs {
        let data = std::fs::read(path).expect("reads a corpus file");
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            failed.push(format!("{target}: {}", path.display()));
        }
    }
    (inputs.len(), failed)
}

#[test]
fn every_target_has_a_harness_and_a_corpus() {
    let harnesses: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    let names: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(harnesses, sorted, "fuzz/fuzz_targets/ and TARGETS differ");
    let corpus_dirs: Vec<String> = std::fs::read_dir(fuzz_dir().join("corpus"))
        .expect("fuzz/corpus exists")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    for dir in &corpus_dirs {
        assert!(
            names.contains(dir),
            "fuzz/corpus/{dir} belongs to no target"
        );
    }
}

#[test]
fn corpus_and_regressions_replay_without_panics() {
    let mut counts = BTreeMap::new();
    let mut failed = Vec::new();
    for (target, body) in TARGETS {
        let (corpus, mut bad) = replay(target, *body, &fuzz_dir().join("corpus").join(target));
        assert!(corpus > 0, "fuzz/corpus/{target} is missing or empty");
        failed.append(&mut bad);
        let (regressions, mut bad) =
            replay(target, *body, &fuzz_dir().join("regressions").join(target));
        failed.append(&mut bad);
        counts.insert(*target, (corpus, regressions));
    }
    println!("replayed (corpus, regressions): {counts:?}");
    assert!(
        failed.is_empty(),
        "inputs that panic:\n{}",
        failed.join("\n")
    );
}

/// Writes the hand-made seeds (`seed-*` files) of every target: real frames and
/// messages from the crate's encoders and the recorded kubectl/k3s exchanges in
/// tests/fixtures. `cargo test --test fuzz_corpus -- --ignored write_seed_corpus`;
/// the rest of each corpus is what the fuzzer found (after `cargo fuzz cmin`).
#[test]
#[ignore = "regenerates fuzz/corpus seeds"]
fn write_seed_corpus() {
    seeds::write_all(&fuzz_dir().join("corpus"));
}

mod seeds {
    use std::collections::BTreeMap;
    use std::path::Path;

    use beemesh::kubelet::channel;
    use beemesh::kubelet::relay;
    use beemesh::kubelet::spdy::frame::{encode_header_block, Setting};
    use beemesh::kubelet::spdy::zlib::HeaderDeflater;
    use beemesh::kubelet::spdy::{Frame, FrameEncoder, GoAwayStatus, Headers, RstStatus};
    use beemesh::kubelet::tunnel::frame as tunnel;
    use beemesh::trust::statement;
    use beemesh::wire::*;
    use bytes::Bytes;
    use k8s_openapi::api::core::v1::{Pod, PodStatus};
    use libp2p::identity::Keypair;

    fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
        let dir = dir.join(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write");
    }

    fn raft_seeds(dir: &Path, agent: &PeerRef, owner: &PeerRef, word: &SignedGroup) {
        use beemesh::raft::kv::{Command, Outcome};
        use beemesh::raft::rpc::{Call, CallFrame, Read, Reply};
        use beemesh::raft::{members_of, node_id, Entry, TypeConfig};
        use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest};
        use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership, Vote};

        let id = node_id(&agent.0);
        let log_id = |index| LogId::new(CommittedLeaderId::new(2, id), index);
        let members = members_of([agent.0, owner.0]);
        let voters = [members.keys().copied().collect()];
        let entries: Vec<Entry> = vec![
            Entry {
                log_id: log_id(7),
                payload: EntryPayload::Membership(Membership::new(voters.to_vec(), members)),
            },
            Entry {
                log_id: log_id(8),
                payload: EntryPayload::Normal(Command::Put {
                    key: "config/leader".into(),
                    value: "db-0".into(),
                    expect: Some(0),
                }),
            },
            Entry {
                log_id: log_id(9),
                payload: EntryPayload::Blank,
            },
        ];
        let appended = entries.clone();
        let frame = |call| CallFrame {
            owner: *owner,
            namespace: "shop".into(),
            name: "db".into(),
            call,
        };
        let calls = [
            (
                "append",
                frame(Call::AppendEntries(AppendEntriesRequest::<TypeConfig> {
                    vote: Vote::new_committed(2, id),
                    prev_log_id: Some(log_id(6)),
                    entries: entries.clone(),
                    leader_commit: Some(log_id(6)),
                })),
            ),
            (
                "vote",
                frame(Call::Vote(VoteRequest::new(
                    Vote::new(3, id),
                    Some(log_id(9)),
                ))),
            ),
            (
                "propose",
                frame(Call::Propose(Command::Lock {
                    name: "primary".into(),
                    holder: "db-1".into(),
                    lease_ms: 10_000,
                    now_ms: 0,
                })),
            ),
            (
                "read",
                frame(Call::Read(Read::Prefix {
                    prefix: "config/".into(),
                })),
            ),
        ];
        for (name, call) in &calls {
            write(
                dir,
                "raft_frames",
                &format!("call-{name}"),
                &with(0, &framed(call)),
            );
        }
        let replies = [
            (
                "append",
                Reply::AppendEntries(Ok(AppendEntriesResponse::Success)),
            ),
            (
                "proposed",
                Reply::Proposed(Ok((8, Outcome::Stored { revision: 8 }))),
            ),
            (
                "refused",
                Reply::Refused {
                    reason: "not a member".into(),
                },
            ),
        ];
        for (name, reply) in &replies {
            write(
                dir,
                "raft_frames",
                &format!("reply-{name}"),
                &with(1, &framed(reply)),
            );
        }
        let word = beemesh::wire::encode(word, usize::MAX).expect("encodes");
        write(dir, "raft_frames", "group-word", &with(2, &word));
        // A snapshot as a member builds it.
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let snapshot = runtime.block_on(async {
            use openraft::storage::RaftStateMachine;
            use openraft::RaftSnapshotBuilder;
            let state = tempfile::tempdir().expect("tempdir");
            let mut machine =
                beemesh::raft::store::StateMachine::open(state.path()).expect("opens");
            machine.apply(appended).await.expect("applies");
            let snapshot = machine.build_snapshot().await.expect("builds");
            snapshot.snapshot.into_inner()
        });
        write(dir, "raft_frames", "snapshot", &with(3, &snapshot));
    }

    /// A message framed as on a Raft stream.
    fn framed<T: serde::Serialize>(message: &T) -> Vec<u8> {
        let mut out = Vec::new();
        futures::executor::block_on(relay::write_message(&mut out, message, usize::MAX))
            .expect("frames");
        out
    }

    fn with(selector: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![selector];
        out.extend_from_slice(bytes);
        out
    }

    fn fixture(path: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(path),
        )
        .expect("fixture")
    }

    fn key(seed: u8) -> Keypair {
        Keypair::ed25519_from_bytes([seed; 32]).expect("key")
    }

    /// A pod that passes validation and uses most of what translation handles.
    pub const RICH_POD: &str = r#"{
  "apiVersion": "v1", "kind": "Pod",
  "metadata": {"name": "web", "namespace": "shop", "uid": "0b7a4c6e-1111-2222-3333-444455556666",
    "labels": {"app": "web"}, "annotations": {"beemesh.io/agent-selector": "zone=a,!spot"},
    "creationTimestamp": "2026-11-22T16:52:14Z"},
  "spec": {
    "hostname": "web-0", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
    "terminationGracePeriodSeconds": 10,
    "securityContext": {"runAsUser": 1000, "runAsGroup": 1000},
    "volumes": [{"name": "data", "emptyDir": {}}, {"name": "cache", "emptyDir": {"medium": "Memory"}},
      {"name": "token", "projected": {"sources": [{"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}]}}],
    "initContainers": [{"name": "init", "image": "busybox:1.36", "command": ["sh", "-c", "echo $(GREETING) > /data/hello"],
      "env": [{"name": "GREETING", "value": "hi $$ $(POD_NAME)"}],
      "volumeMounts": [{"name": "data", "mountPath": "/data", "subPath": "init"}]}],
    "containers": [{"name": "main", "image": "localhost:5000/web@sha256:0000000000000000000000000000000000000000000000000000000000000000",
      "imagePullPolicy": "IfNotPresent",
      "command": ["/bin/web"], "args": ["--port=$(PORT)", "--name=$(POD_NAME)"], "workingDir": "/srv",
      "env": [{"name": "PORT", "value": "8080"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}}],
      "ports": [{"containerPort": 8080, "hostPort": 18080, "protocol": "TCP"}, {"containerPort": 53, "protocol": "UDP"}],
      "resources": {"requests": {"cpu": "250m", "memory": "64Mi", "ephemeral-storage": "1Gi"}, "limits": {"cpu": "1", "memory": "128Mi"}},
      "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": true}, {"name": "cache", "mountPath": "/cache"},
        {"name": "token", "mountPath": "/var/run/token"}],
      "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
        "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}},
      "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 5},
      "readinessProbe": {"tcpSocket": {"port": 8080}},
      "tty": false, "stdin": false}]
  }
}"#;

    fn pods() -> Vec<(&'static str, Pod)> {
        let list: serde_json::Value =
            serde_json::from_slice(&fixture("k3s-1.21-api/pods-list-fieldselector.json"))
                .expect("list");
        let k3s: Pod = serde_json::from_value(list["items"][0].clone()).expect("pod");
        vec![
            ("rich", serde_json::from_str(RICH_POD).expect("rich pod")),
            ("k3s", k3s),
        ]
    }

    fn signed(pod: &Pod, owner: &Keypair, agent: &Keypair) -> SignedAssignment {
        statement::sign(
            owner,
            statement::Assignment {
                agent: agent.public().to_peer_id(),
                pod: PodUid(pod.metadata.uid.clone().unwrap_or_default()),
                epoch: Epoch(2),
                spec_digest: statement::spec_digest(pod),
                expires_at: 1_900_000_000,
            },
        )
    }

    pub fn write_all(dir: &Path) {
        let (owner, agent) = (key(1), key(2));
        let owner_peer = PeerRef(owner.public().to_peer_id());
        let agent_peer = PeerRef(agent.public().to_peer_id());
        let pods = pods();
        for (name, pod) in &pods {
            assert_eq!(beemesh::runtime::translate::validate(pod), Ok(()), "{name}");
        }
        let pod_ref = PodRef {
            uid: PodUid("0b7a4c6e-1111-2222-3333-444455556666".into()),
            namespace: "shop".into(),
            name: "web".into(),
        };
        let statement = signed(&pods[0].1, &owner, &agent);

        // wire_message and mesh_stream (frames: 4-byte length, then the message).
        let mut requests: Vec<(&str, Request)> = vec![
            (
                "bid",
                Request::Bid(Bid {
                    pod: pod_ref.uid.clone(),
                    epoch: Epoch(1),
                }),
            ),
            (
                "release",
                Request::Release(Release {
                    pod: pod_ref.uid.clone(),
                    epoch: Epoch(2),
                    grace_period_secs: 30,
                }),
            ),
            ("query", Request::Query),
            (
                "route",
                Request::Route(ClusterDial {
                    pod: pod_ref.clone(),
                    to: "10.80.0.10:80".parse().expect("addr"),
                    udp: false,
                }),
            ),
            (
                "join",
                Request::Join(beemesh::trust::join::request(
                    &"abcdef.0123456789abcdef".parse().expect("token"),
                    &agent_peer.0,
                    &owner_peer.0,
                    "00".repeat(16),
                    1_700_000_000_000,
                )),
            ),
            (
                "renew",
                Request::Renew(Renew {
                    leases: vec![statement.clone()],
                }),
            ),
            (
                "status",
                Request::Status(Box::new(StatusReport {
                    pod: pod_ref.clone(),
                    epoch: Epoch(2),
                    status: PodStatus {
                        phase: Some("Running".into()),
                        ..Default::default()
                    },
                    removed: false,
                    assignment: statement.clone(),
                    seq: 9,
                    sent_at_ms: 1_700_000_000_000,
                    events: Vec::new(),
                })),
            ),
        ];
        let word = beemesh::trust::group::sign(
            &owner,
            beemesh::trust::group::Group {
                namespace: "shop".into(),
                name: "db".into(),
                version: 1_700_000_000_000,
                founder: Some(agent_peer.0),
                members: vec![GroupMember {
                    agent: agent_peer,
                    pod: pod_ref.clone(),
                }],
            },
        );
        requests.push(("group", Request::Group(Box::new(word.clone()))));
        for (name, pod) in &pods {
            requests.push((
                name,
                Request::Assign(Box::new(Assign {
                    epoch: Epoch(2),
                    pod: pod.clone(),
                    volumes: BTreeMap::from([(
                        "token".to_string(),
                        vec![VolumeFile {
                            path: "labels".into(),
                            data: k8s_openapi::ByteString(b"app=\"web\"\n".to_vec()),
                            mode: 0o644,
                        }],
                    )]),
                    pull_credentials: Vec::new(),
                    statement: signed(pod, &owner, &agent),
                    lease_ms: Some(15_000),
                    pod_subnet: Some("10.64.3.0/24".parse().expect("cidr")),
                    cluster_ranges: vec!["10.43.0.0/16".parse().expect("cidr")],
                    cluster_domain: Some("cluster.local".into()),
                })),
            ));
        }
        let responses: Vec<(&str, Response)> = vec![
            ("ack", Response::Ack),
            (
                "declined",
                Response::Declined {
                    reason: "insufficient memory".into(),
                },
            ),
            ("superseded", Response::Superseded { current: Epoch(4) }),
            ("route_owner", Response::Route(Route::Owner)),
            (
                "route_direct",
                Response::Route(Route::Direct(Box::new(beemesh::trust::dial::sign(
                    &owner,
                    beemesh::trust::dial::Dial {
                        from: agent_peer.0,
                        to: agent_peer.0,
                        pod: pod_ref.uid.clone(),
                        port: 8080,
                        expires_at: 1_700_000_030,
                    },
                )))),
            ),
            (
                "view",
                Response::View(Box::new(MeshView {
                    agents: vec![AgentSummary {
                        peer: agent_peer,
                        labels: BTreeMap::from([("zone".into(), "a".into())]),
                        capacity: Resources {
                            cpu_millis: 2000,
                            memory_bytes: 1 << 30,
                            pods: 110,
                        },
                        free: Resources::default(),
                        pods: 1,
                        last_seen_secs: 1,
                        health: AgentHealth::default(),
                    }],
                    pods: vec![PodSummary::new(
                        pod_ref.clone(),
                        Some(agent_peer),
                        Epoch(2),
                        "Running".into(),
                    )],
                    services: vec![ServiceSummary {
                        namespace: "shop".into(),
                        name: "web".into(),
                        cluster_ip: "10.80.0.10".into(),
                        ports: vec!["80/TCP".into()],
                        ready_endpoints: 2,
                    }],
                })),
            ),
            (
                "error",
                Response::Error {
                    message: "x".into(),
                },
            ),
            (
                "joined",
                Response::Joined {
                    proof: "cd".repeat(32),
                },
            ),
            (
                "leases",
                Response::Leases {
                    granted: vec![pod_ref.uid.clone()],
                    refused: vec![],
                    lease_ms: 15_000,
                },
            ),
        ];
        let gossip = [
            (
                "offer",
                GossipMessage::Offer(Offer {
                    pod: pod_ref.clone(),
                    epoch: Epoch(3),
                    requests: Resources {
                        cpu_millis: 250,
                        memory_bytes: 64 << 20,
                        pods: 1,
                    },
                    agent_selector: beemesh::placement::parse_selector(
                        "zone=a,arch!=arm64,gpu,!spot,tier in (web,api)",
                    )
                    .expect("selector"),
                    host_ports: vec![18080],
                    spec_digest: "ab".repeat(32),
                }),
            ),
            (
                "heartbeat",
                GossipMessage::Heartbeat(Heartbeat {
                    labels: BTreeMap::from([("zone".into(), "a".into())]),
                    capacity: Resources {
                        cpu_millis: 2000,
                        memory_bytes: 1 << 30,
                        pods: 110,
                    },
                    free: Resources {
                        cpu_millis: 1750,
                        memory_bytes: 900 << 20,
                        pods: 109,
                    },
                    pods: vec![HostedPod {
                        pod: pod_ref.clone(),
                        owner: owner_peer,
                        epoch: Epoch(2),
                        phase: "Running".into(),
                        requests: Resources::default(),
                        host_ports: vec![18080],
                        unrecorded: false,
                    }],
                    uptime_secs: 5,
                    storage_bytes: 100 << 30,
                    seq: 1_700_000_000_000_001,
                    sent_at_ms: 1_700_000_000_000,
                    health: AgentHealth {
                        runtime_error: Some("ping: connection refused".into()),
                        ..AgentHealth::default()
                    },
                    pod_subnets: vec!["10.64.3.0/24".parse().expect("cidr")],
                }),
            ),
        ];
        let kubelet_requests = [
            (
                "logs",
                KubeletRequest::Logs {
                    pod: pod_ref.uid.clone(),
                    container: "main".into(),
                    follow: true,
                    tail_lines: Some(5),
                    timestamps: true,
                    since: Some(1_700_000_000),
                    previous: false,
                },
            ),
            ("stats", KubeletRequest::Stats),
            (
                "exec",
                KubeletRequest::Exec {
                    pod: pod_ref.uid.clone(),
                    container: "main".into(),
                    command: vec!["echo".into(), "hi".into()],
                    streams: Streams {
                        stdin: true,
                        stdout: true,
                        stderr: true,
                        tty: false,
                    },
                },
            ),
            (
                "portforward",
                KubeletRequest::PortForward {
                    pod: pod_ref.uid.clone(),
                    port: 80,
                },
            ),
            (
                "attach",
                KubeletRequest::Attach {
                    pod: pod_ref.uid.clone(),
                    container: "main".into(),
                    streams: Streams::default(),
                },
            ),
        ];
        let frame = |bytes: &[u8]| {
            let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(bytes);
            out
        };
        for (name, msg) in &requests {
            let bytes = encode(msg, usize::MAX).expect("encodes");
            write(
                dir,
                "wire_message",
                &format!("request-{name}"),
                &with(0, &bytes),
            );
            write(
                dir,
                "mesh_stream",
                &format!("request-{name}"),
                &with(0, &frame(&bytes)),
            );
        }
        for (name, msg) in &responses {
            let bytes = encode(msg, usize::MAX).expect("encodes");
            write(
                dir,
                "wire_message",
                &format!("response-{name}"),
                &with(1, &bytes),
            );
            write(
                dir,
                "mesh_stream",
                &format!("response-{name}"),
                &with(1, &frame(&bytes)),
            );
        }
        for (name, msg) in &gossip {
            write(
                dir,
                "wire_message",
                &format!("gossip-{name}"),
                &with(
                    4 + u8::from(matches!(msg, GossipMessage::Heartbeat(_))),
                    &encode(msg, usize::MAX).expect("encodes"),
                ),
            );
        }
        for (name, msg) in &kubelet_requests {
            let bytes = encode(msg, usize::MAX).expect("encodes");
            write(
                dir,
                "wire_message",
                &format!("kubelet-{name}"),
                &with(2, &bytes),
            );
            write(
                dir,
                "mesh_stream",
                &format!("kubelet-{name}"),
                &with(2, &frame(&bytes)),
            );
        }
        for (name, msg) in [
            ("ok", KubeletAnswer::Ok),
            (
                "failed",
                KubeletAnswer::Failed {
                    code: 404,
                    message: "no such container".into(),
                },
            ),
        ] {
            write(
                dir,
                "wire_message",
                &format!("answer-{name}"),
                &with(3, &encode(&msg, usize::MAX).expect("encodes")),
            );
        }
        let usage = vec![PodUsage {
            pod: pod_ref.clone(),
            containers: vec![ContainerUsage {
                name: "main".into(),
                cpu_nanos: 123_456_789,
                memory_bytes: 10 << 20,
                started_at: Some(1_700_000_000),
            }],
        }];
        write(
            dir,
            "wire_message",
            "stats-usage",
            &with(6, &serde_json::to_vec(&usage).expect("json")),
        );
        // Relay session frames, every kind in one stream.
        let mut session = Vec::new();
        for f in [
            relay::Frame::Stdin(b"ls\n".to_vec()),
            relay::Frame::Resize {
                width: 120,
                height: 40,
            },
            relay::Frame::StdinClosed,
            relay::Frame::Stdout(b"bin\netc\n".to_vec()),
            relay::Frame::Stderr(b"warning\n".to_vec()),
            relay::Frame::Exit(relay::Exit::Code(3)),
            relay::Frame::Exit(relay::Exit::Error("container not running".into())),
        ] {
            futures::executor::block_on(relay::write_frame(&mut session, &f)).expect("frame");
        }
        write(dir, "mesh_stream", "relay-session", &with(3, &session));

        // raft_frames: selector 0 call frame, 1 reply frame, 2 group word, 3 snapshot.
        raft_seeds(dir, &agent_peer, &owner_peer, &word);

        // trust_records: selector 0 signed assignment, 1 trust doc + join request,
        // 2 join token, 3 assignment record, 4 lease book, 5 identity key.
        write(
            dir,
            "trust_records",
            "signed-assignment",
            &with(0, &serde_json::to_vec(&statement).expect("json")),
        );
        let token: beemesh::trust::join::JoinToken =
            "abcdef.0123456789abcdef".parse().expect("token");
        let mut doc = beemesh::trust::join::TrustDoc::default();
        doc.create_token(&token, 1_700_000_000, 3600, Some(2));
        let req = beemesh::trust::join::request(
            &token,
            &key(1).public().to_peer_id(),
            &key(2).public().to_peer_id(),
            "00".repeat(16),
            1_700_000_000_000,
        );
        let mut both = serde_json::to_vec(&doc).expect("json");
        both.push(b'\n');
        both.extend(serde_json::to_vec(&req).expect("json"));
        write(dir, "trust_records", "trust-doc-and-join", &with(1, &both));
        write(
            dir,
            "trust_records",
            "join-token",
            &with(2, b"abcdef.0123456789abcdef"),
        );
        write(
            dir,
            "trust_records",
            "assignment-record",
            &with(
                3,
                &serde_json::to_vec(&serde_json::json!({
            "statement": statement, "pod": pods[0].1, "lease_ms": 15000}))
                .expect("json"),
            ),
        );
        write(
            dir,
            "trust_records",
            "lease-book",
            &with(
                4,
                &serde_json::to_vec(&serde_json::json!({
            "leases": {"0b7a4c6e": {"owner": owner_peer, "epoch": 2, "lease_ms": 15000,
                "expires_at_ms": 1_000_000, "grace_ms": 30000, "fenced": false}}}))
                .expect("json"),
            ),
        );
        write(
            dir,
            "trust_records",
            "identity-protobuf",
            &with(5, &key(3).to_protobuf_encoding().expect("key")),
        );
        let pem = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH\n-----END PRIVATE KEY-----\n".to_vec();
        write(dir, "trust_records", "identity-pem", &with(5, &pem));

        // spdy_frames: the recorded kubectl exec and port-forward openings, and every
        // frame type from the encoder.
        for name in ["03", "08"] {
            write(
                dir,
                "spdy_frames",
                &format!("recorded-{name}"),
                &fixture(&format!(
                    "k3s-1.21-kubelet-requests/{name}-spdy-client-frames.bin"
                )),
            );
        }
        let headers: Headers = [
            ("streamtype", "stdout"),
            ("port", "8080"),
            ("requestid", "0"),
        ]
        .into_iter()
        .collect();
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: [("streamtype", "error")].into_iter().collect(),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 0,
                priority: 7,
                fin: false,
                unidirectional: true,
                headers: headers.clone(),
            },
            Frame::SynReply {
                stream_id: 3,
                fin: true,
                headers: Headers::new(),
            },
            Frame::Headers {
                stream_id: 5,
                fin: false,
                headers,
            },
            Frame::Data {
                stream_id: 3,
                fin: true,
                data: Bytes::from_static(b"hello"),
            },
            Frame::RstStream {
                stream_id: 3,
                status: RstStatus::Cancel,
            },
            Frame::Settings {
                clear: true,
                entries: vec![Setting {
                    flags: 1,
                    id: 7,
                    value: 1 << 20,
                }],
            },
            Frame::Ping { id: 2 },
            Frame::GoAway {
                last_good_stream_id: 7,
                status: GoAwayStatus::ProtocolError,
            },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 40_000,
            },
            Frame::Unknown {
                kind: 10,
                flags: 0,
                payload: Bytes::from_static(b"credential"),
            },
        ];
        let mut encoder = FrameEncoder::new().expect("encoder");
        let mut all = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let mut one = Vec::new();
            FrameEncoder::new()
                .expect("encoder")
                .encode(f, &mut one)
                .expect("encodes");
            write(dir, "spdy_frames", &format!("frame-{i:02}"), &one);
            encoder.encode(f, &mut all).expect("encodes");
        }
        write(dir, "spdy_frames", "every-frame", &all);

        // spdy_header_block: compressed blocks through one stream (selector: limit).
        let mut deflater = HeaderDeflater::new().expect("deflater");
        let mut blocks = Vec::new();
        for h in [
            [("streamtype", "error")].into_iter().collect::<Headers>(),
            [("streamtype", "stdout"), ("port", "80"), ("requestid", "0")]
                .into_iter()
                .collect(),
            Headers::new(),
        ] {
            let raw = encode_header_block(&h).expect("block");
            write(
                dir,
                "spdy_header_block",
                &format!("raw-{}", h.len()),
                &with(4, &raw),
            );
            blocks.extend(deflater.compress(&raw).expect("compresses"));
        }
        write(dir, "spdy_header_block", "stream", &with(4, &blocks));
        let recorded = fixture("k3s-1.21-kubelet-requests/08-spdy-client-frames.bin");
        write(
            dir,
            "spdy_header_block",
            "recorded-08",
            &with(6, &recorded[18..recorded.len() - 2]),
        );
        let bomb = HeaderDeflater::new()
            .expect("deflater")
            .compress(&vec![b'a'; 100_000])
            .expect("compresses");
        write(dir, "spdy_header_block", "bomb", &with(11, &bomb));

        // ws_channel: selector = port count - 1 and resize piece size.
        for (name, selector, bytes) in [
            ("stdin", 0u8, channel::data_message(channel::STDIN, b"ls\n")),
            ("stdout", 1, channel::data_message(channel::STDOUT, b"hi")),
            ("close", 0, channel::close_message(channel::STDIN)),
            ("resize", 7, channel::data_message(channel::RESIZE, br#"{"Width":80,"Height":24}{"Width":100,"Height":40}"#)),
            ("port-data", 1, vec![2, b'G', b'E', b'T']),
            ("status-exit", 3, channel::ExecOutcome::ExitCode(3).status_json()),
            ("status-error", 3, channel::ExecOutcome::Error("no \"such\" container".into()).status_json()),
            ("ports", 0, b"8080,443&80".to_vec()),
            ("protocols", 0, b"v5.channel.k8s.io\nv4.channel.k8s.io, channel.k8s.io\nSPDY/3.1+portforward.k8s.io".to_vec()),
        ] {
            write(dir, "ws_channel", name, &with(selector, &bytes));
        }

        // tunnel_frame: what remotedialer sends and k3s asks.
        for (name, body) in [
            (
                "data",
                tunnel::Body::Data(Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n")),
            ),
            (
                "connect",
                tunnel::Body::Connect(b"tcp/127.0.0.1:10250".to_vec()),
            ),
            (
                "connect-v6",
                tunnel::Body::Connect(b"tcp/[::1]:10250".to_vec()),
            ),
            ("error", tunnel::Body::Error("EOF".into())),
            ("add-client", tunnel::Body::AddClient(b"peer/3".to_vec())),
            ("pause", tunnel::Body::Pause),
            ("resume", tunnel::Body::Resume),
            ("sync", tunnel::Body::SyncConnections(vec![2, 3, 1 << 40])),
        ] {
            write(
                dir,
                "tunnel_frame",
                name,
                &tunnel::encode(&tunnel::Frame {
                    id: 7,
                    conn_id: 2,
                    body,
                }),
            );
        }

        // manifest_yaml: the project's example manifests and the pods above as YAML.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
        for sub in ["examples", "standalone"] {
            for entry in std::fs::read_dir(root.join(sub)).expect("manifests") {
                let path = entry.expect("entry").path();
                let name = format!(
                    "{sub}-{}",
                    path.file_name().expect("name").to_string_lossy()
                );
                write(
                    dir,
                    "manifest_yaml",
                    &name,
                    &std::fs::read(&path).expect("read"),
                );
            }
        }
        let mut multi = String::new();
        for (name, pod) in &pods {
            let mut value = serde_json::to_value(pod).expect("json");
            value["apiVersion"] = "v1".into();
            value["kind"] = "Pod".into();
            let yaml = serde_yaml::to_string(&value).expect("yaml");
            write(
                dir,
                "manifest_yaml",
                &format!("pod-{name}"),
                yaml.as_bytes(),
            );
            multi.push_str("---\n");
            multi.push_str(&yaml);
        }
        multi.push_str(
            "---\n# empty\n---\nkind: Deployment\napiVersion: apps/v1\n---\nanchors: &a [*a]\n",
        );
        write(dir, "manifest_yaml", "multi", multi.as_bytes());
        // Hostile YAML: aliases that would expand to 9^24 nodes, and deep nesting.
        let mut laughs = String::from(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: laughs\n  labels:\n    a0: &a0 lol\n",
        );
        for i in 1..25 {
            let refs = vec![format!("*a{}", i - 1); 9].join(",");
            laughs.push_str(&format!("    a{i}: &a{i} [{refs}]\n"));
        }
        laughs.push_str("spec:\n  containers: [{name: c, image: busybox}]\n");
        write(dir, "manifest_yaml", "billion-laughs", laughs.as_bytes());
        let deep = format!(
            "apiVersion: v1\nkind: Pod\nspec: {}{}\n",
            "[".repeat(5000),
            "]".repeat(5000)
        );
        write(dir, "manifest_yaml", "deep-nesting", deep.as_bytes());

        // translate_pod: the pods as JSON.
        for (name, pod) in &pods {
            write(
                dir,
                "translate_pod",
                name,
                &serde_json::to_vec_pretty(pod).expect("json"),
            );
        }

        for q in [
            "100m",
            "1.5Gi",
            "1e3",
            ".5",
            "0.0001",
            "1Ei",
            "12E6",
            "2.",
            "+3k",
            "-0",
            "123456789012345678901234567890123456789",
            "1e-9223372036854775808",
        ] {
            write(dir, "quantity", q, q.as_bytes());
        }

        for (name, q) in [
            ("exec", "command=echo&command=hi&error=1&output=1"),
            (
                "exec-tty",
                "command=sh&stdin=true&stdout=true&tty=1&command=-c&command=echo%20%24HOME+x",
            ),
            (
                "logs",
                "tailLines=5&timestamps=true&follow=1&sinceSeconds=60&limitBytes=100",
            ),
            (
                "logs-since-time",
                "sinceTime=2026-11-22T16:52:14Z&previous=true",
            ),
            (
                "selector",
                "zone=a,arch!=arm64,gpu,!spot,tier in (web,api),env notin (dev)",
            ),
        ] {
            write(dir, "kubelet_query", name, q.as_bytes());
        }
    }
}
