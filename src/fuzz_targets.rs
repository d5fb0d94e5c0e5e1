//! Fuzz bodies: one `pub fn <target>(data: &[u8])` per decoder of untrusted bytes, shared
//! by the cargo-fuzz harnesses in `fuzz/` and by `tests/fuzz_corpus.rs`, which replays the
//! committed corpus on stable `cargo test`.
//!
//! Each body decodes, and where the codec has an encoder re-encodes what it decoded and
//! decodes that again, asserting equality; it also asserts the bounds the decoder
//! promises (an inflated header block never exceeds its limit, a frame's buffers never
//! exceed the frame limit, a mount never leaves its volume directory). A panic is a
//! finding. Not part of BeeMesh's API.

use std::collections::HashMap;
use std::path::{Component, Path};
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::kubelet::channel::{self, PortForwardChannels, ResizeDecoder, StreamProtocol};
use crate::kubelet::spdy::frame::{decode_header_block, encode_header_block};
use crate::kubelet::spdy::zlib::{HeaderDeflater, HeaderInflater};
use crate::kubelet::spdy::{Frame as SpdyFrame, FrameDecoder, FrameEncoder, Limits};
use crate::kubelet::{relay, tunnel};
use crate::runtime::dns::ResolvConf;
use crate::runtime::translate::{self, ContainerKind, PlanContext};
use crate::wire::{self, Epoch, GossipMessage, KubeletAnswer, KubeletRequest, Request, Response};

/// Splits the first byte off as a selector (0 when there is none).
fn split_selector(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&first, rest)) => (first, rest),
        None => (0, data),
    }
}

/// Decodes `bytes` as `T`; if that works, its encoding must decode, re-encode to the same
/// bytes and decode to the same value. The first round may normalise (Kubernetes `Time`
/// keeps whole seconds, defaults fill in absent fields), so equality is asserted from the
/// second one on: what a peer computes a digest over must be stable.
fn json_fixpoint<T>(value: &T, what: &str)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(first) = serde_json::to_vec(value) else {
        // Serialization can refuse (a time outside RFC 3339); nothing goes on the wire.
        return;
    };
    let once: T = serde_json::from_slice(&first)
        .unwrap_or_else(|e| panic!("{what}: its own encoding does not decode: {e}"));
    let second = serde_json::to_vec(&once).expect("encodes again");
    // Digests (spec_digest) are taken over encodings: decoding what was encoded must
    // give the same bytes again.
    assert_eq!(
        String::from_utf8_lossy(&first),
        String::from_utf8_lossy(&second),
        "{what}: encoding is not stable"
    );
    let twice: T = serde_json::from_slice(&second).expect("decodes again");
    assert_eq!(once, twice, "{what}: value changes on a second round trip");
}

fn wire_round_trip<T>(data: &[u8], limit: usize, what: &str) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let msg: T = wire::decode(data, limit).ok()?;
    // Re-encoding may grow a message (defaults are written out), so no limit here.
    let bytes = wire::encode(&msg, usize::MAX).expect("a decoded message encodes");
    let back: T = wire::decode(&bytes, usize::MAX)
        .unwrap_or_else(|e| panic!("{what}: re-encoded message does not decode: {e}"));
    json_fixpoint(&back, what);
    Some(msg)
}

/// The volume files of an Assign: what the agent writes must stay in its volume.
fn check_volume_paths(assign: &wire::Assign) {
    use crate::node::resolve::is_relative_path;
    let root = Path::new("/volumes");
    for (name, files) in &assign.volumes {
        if name.contains('/') || !is_relative_path(name) {
            continue;
        }
        for file in files {
            if is_relative_path(&file.path) {
                let path = root.join(name).join(&file.path);
                assert!(
                    path.starts_with(root) && !path.components().any(|c| c == Component::ParentDir),
                    "volume file {path:?} leaves {root:?}"
                );
            }
        }
    }
}

/// Mesh messages as `wire::decode` reads them (gossip, request-response, kubelet stream
/// headers, the stats answer): round trip and the checks the receiver relies on. The
/// first byte picks the message type, the rest is the message.
pub fn wire_message(data: &[u8]) {
    let (selector, data) = split_selector(data);
    match selector % 7 {
        0 => {
            let request = wire_round_trip::<Request>(data, wire::MAX_REQUEST_BYTES, "request");
            if let Some(Request::Assign(assign)) = request {
                check_volume_paths(&assign);
            }
        }
        1 => {
            wire_round_trip::<Response>(data, wire::MAX_RESPONSE_BYTES, "response");
        }
        2 => {
            wire_round_trip::<KubeletRequest>(
                data,
                wire::MAX_KUBELET_HEADER_BYTES,
                "kubelet request",
            );
        }
        3 => {
            wire_round_trip::<KubeletAnswer>(
                data,
                wire::MAX_KUBELET_HEADER_BYTES,
                "kubelet answer",
            );
        }
        topic @ (4 | 5) => {
            let topic = wire::Topic::ALL[usize::from(topic - 4)];
            if let Ok(msg) = wire::decode_gossip(topic, data) {
                assert_eq!(msg.topic(), topic);
                let bytes = wire::encode(&msg, usize::MAX).expect("encodes");
                let back: GossipMessage = wire::decode(&bytes, usize::MAX).expect("decodes");
                json_fixpoint(&back, "gossip");
            }
        }
        _ => {
            // The agent's answer to a stats request is bare JSON.
            if let Ok(usage) = serde_json::from_slice::<Vec<wire::PodUsage>>(data) {
                json_fixpoint(&usage, "pod usage");
            }
        }
    }
}

fn metrics() -> crate::metrics::Metrics {
    static METRICS: OnceLock<crate::metrics::Metrics> = OnceLock::new();
    METRICS.get_or_init(crate::metrics::Metrics::new).clone()
}

/// Byte streams of the mesh's length-prefixed protocols: request-response frames
/// (`WireCodec`), kubelet relay headers and interactive session frames (`relay`).
pub fn mesh_stream(data: &[u8]) {
    use futures::executor::block_on;
    use libp2p::request_response::Codec;
    let (selector, data) = split_selector(data);
    let protocol = libp2p::StreamProtocol::new(wire::REQUEST_PROTOCOL);
    let mut codec = crate::mesh::WireCodec::new(metrics());
    match selector % 4 {
        0 => {
            let mut io = futures::io::Cursor::new(data);
            if let Ok(req) = block_on(codec.read_request(&protocol, &mut io)) {
                let mut out = futures::io::Cursor::new(Vec::new());
                block_on(codec.write_request(&protocol, &mut out, req.clone())).expect("writes");
                let mut back = futures::io::Cursor::new(out.into_inner());
                let again = block_on(codec.read_request(&protocol, &mut back)).expect("reads");
                json_fixpoint(&again, "request frame");
            }
        }
        1 => {
            let mut io = futures::io::Cursor::new(data);
            if let Ok(res) = block_on(codec.read_response(&protocol, &mut io)) {
                let mut out = futures::io::Cursor::new(Vec::new());
                block_on(codec.write_response(&protocol, &mut out, res)).expect("writes");
                let mut back = futures::io::Cursor::new(out.into_inner());
                let again = block_on(codec.read_response(&protocol, &mut back)).expect("reads");
                json_fixpoint(&again, "response frame");
            }
        }
        2 => {
            let mut io = data;
            if let Ok(req) = block_on(relay::read_header::<KubeletRequest>(&mut io)) {
                let mut out = Vec::new();
                block_on(relay::write_header(&mut out, &req)).expect("writes");
                let back: KubeletRequest =
                    block_on(relay::read_header(&mut out.as_slice())).expect("reads");
                assert_eq!(back, req);
            }
        }
        _ => {
            // Session frames, one after another, as the node and the agent read them.
            let mut io = data;
            let mut frames = Vec::new();
            while let Ok(Some(frame)) = block_on(relay::read_frame(&mut io)) {
                if let relay::Frame::Stdin(b) | relay::Frame::Stdout(b) | relay::Frame::Stderr(b) =
                    &frame
                {
                    assert!(b.len() <= relay::MAX_FRAME_BYTES);
                }
                frames.push(frame);
            }
            let mut out = Vec::new();
            for frame in &frames {
                block_on(relay::write_frame(&mut out, frame)).expect("writes");
            }
            let mut back = out.as_slice();
            for frame in &frames {
                let again = block_on(relay::read_frame(&mut back))
                    .expect("reads")
                    .expect("a frame");
                assert_eq!(&again, frame);
            }
            assert!(back.is_empty());
        }
    }
}

/// Trust records: owner-signed assignments as they arrive (verification against the
/// peer IDs they name), join requests against a node's trust document, join tokens, and
/// what agents and nodes read back from disk (assignment records, leases, the trust
/// document, identity keys).
pub fn trust_records(data: &[u8]) {
    use crate::trust::join::{JoinToken, NonceBook, TrustDoc};
    use crate::trust::statement;
    let (selector, data) = split_selector(data);
    match selector % 6 {
        0 => {
            let Ok(signed) = serde_json::from_slice::<wire::SignedAssignment>(data) else {
                return;
            };
            json_fixpoint(&signed, "signed assignment");
            let owner = signed.owner.0;
            // Whatever the statement says, only a real signature verifies.
            let _ = statement::verify_signature(&signed, &owner);
            let pod = Pod::default();
            let _ =
                statement::verify_assign(&signed, &owner, &signed.agent.0, &pod, signed.epoch, 0);
            // A statement re-signed with a key verifies, for that key only.
            let key = fixed_keypair();
            let resigned = statement::sign(
                &key,
                statement::Assignment {
                    agent: signed.agent.0,
                    pod: signed.pod.clone(),
                    epoch: signed.epoch,
                    spec_digest: signed.spec_digest.clone(),
                    expires_at: signed.expires_at,
                },
            );
            let signer = key.public().to_peer_id();
            assert_eq!(statement::verify_signature(&resigned, &signer), Ok(()));
            // The input's signature, claimed by the fixed key: it verifies only if it is
            // that key's signature (hex is case-insensitive, so compare bytes).
            let claimed = wire::SignedAssignment {
                owner: wire::PeerRef(signer),
                ..signed
            };
            if hex::decode(&claimed.signature).ok() != hex::decode(&resigned.signature).ok() {
                assert!(
                    statement::verify_signature(&claimed, &signer).is_err(),
                    "a signature verified for the wrong key"
                );
            }
        }
        1 => {
            // A node's trust document (file or Secret) with a join request after it.
            let mut stream =
                serde_json::Deserializer::from_slice(data).into_iter::<serde_json::Value>();
            let doc = stream
                .next()
                .and_then(Result::ok)
                .and_then(|v| serde_json::from_value::<TrustDoc>(v).ok());
            let req = stream
                .next()
                .and_then(Result::ok)
                .and_then(|v| serde_json::from_value::<wire::JoinRequest>(v).ok());
            if let Some(doc) = &doc {
                json_fixpoint(doc, "trust document");
            }
            if let (Some(mut doc), Some(req)) = (doc, req) {
                let (agent, node) = fixed_peers();
                let _ = NonceBook::default().check(&req, req.sent_at_ms);
                let before = doc.clone();
                match doc.accept(&req, &agent, &node, 1_700_000_000) {
                    Ok(_) => assert!(before.verify(&req, &agent, &node, 1_700_000_000).is_ok()),
                    Err(_) => assert_eq!(doc, before, "a refused join changed the document"),
                }
                let _ = doc.revoke(&req.token_id);
            }
        }
        2 => {
            if let Ok(text) = std::str::from_utf8(data) {
                if let Ok(token) = text.parse::<JoinToken>() {
                    let again: JoinToken = token.reveal().parse().expect("a token reparses");
                    assert_eq!(again, token);
                }
            }
        }
        3 => {
            if let Ok(record) =
                serde_json::from_slice::<crate::agent::store::StoredAssignment>(data)
            {
                let bytes = serde_json::to_vec(&record).expect("encodes");
                let back: crate::agent::store::StoredAssignment =
                    serde_json::from_slice(&bytes).expect("decodes");
                assert_eq!(back.statement, record.statement);
                let _ = translate::validate(&back.pod);
            }
        }
        4 => {
            if let Ok(mut book) = crate::agent::lease::LeaseBook::from_json(data) {
                let back = crate::agent::lease::LeaseBook::from_json(&book.to_json())
                    .expect("a lease book reparses");
                assert_eq!(back, book);
                let (owner, _) = fixed_peers();
                for now in [0, 1 << 32, u64::MAX] {
                    let _ = book.due(now);
                    let uids: Vec<wire::PodUid> = book.iter().map(|(u, _)| u.clone()).collect();
                    book.renewed(owner, now, now, &uids, &[], now);
                    let _ = book.fence(now);
                }
            }
        }
        _ => {
            let _ = crate::trust::decode_key(data);
        }
    }
}

fn fixed_keypair() -> libp2p::identity::Keypair {
    static KEY: OnceLock<libp2p::identity::Keypair> = OnceLock::new();
    KEY.get_or_init(|| {
        libp2p::identity::Keypair::ed25519_from_bytes([7u8; 32]).expect("a fixed key")
    })
    .clone()
}

fn fixed_peers() -> (libp2p::PeerId, libp2p::PeerId) {
    let a = libp2p::identity::Keypair::ed25519_from_bytes([1u8; 32]).expect("key");
    let b = libp2p::identity::Keypair::ed25519_from_bytes([2u8; 32]).expect("key");
    (a.public().to_peer_id(), b.public().to_peer_id())
}

/// Limits small enough that the fuzzer reaches them.
const FUZZ_LIMITS: Limits = Limits {
    max_payload: 64 << 10,
    max_header_block: 16 << 10,
};

/// SPDY/3.1 frames as the session reads them: the input is the byte stream from the
/// client, decoded frame by frame (header blocks through one zlib stream). Every frame
/// decoded is re-encoded by a fresh encoder and must decode to itself.
pub fn spdy_frames(data: &[u8]) {
    let mut decoder = FrameDecoder::new(FUZZ_LIMITS);
    // Feed in two pieces, as bytes arrive: the split point comes from the input.
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut buf = BytesMut::from(&data[..cut]);
    let mut rest = &data[cut..];
    let mut frames = Vec::new();
    loop {
        match decoder.decode(&mut buf) {
            Ok(Some(frame)) => {
                check_spdy_bounds(&frame);
                frames.push(frame);
            }
            Ok(None) if !rest.is_empty() => {
                buf.extend_from_slice(rest);
                rest = &[];
            }
            Ok(None) | Err(_) => break,
        }
        // The buffer grows for at most one frame of the limit, whatever is declared.
        assert!(buf.capacity() <= 2 * (data.len() + 8 + FUZZ_LIMITS.max_payload));
    }
    if frames.is_empty() {
        return;
    }
    let mut wire = Vec::new();
    let has_headers = frames.iter().any(|f| {
        matches!(
            f,
            SpdyFrame::SynStream { .. } | SpdyFrame::SynReply { .. } | SpdyFrame::Headers { .. }
        )
    });
    if has_headers {
        // Header blocks go through the encoder's zlib stream: a fresh one.
        let mut encoder = FrameEncoder::new().expect("encoder");
        for frame in &frames {
            encoder
                .encode(frame, &mut wire)
                .expect("a decoded frame encodes");
        }
    } else {
        // Other frames leave the compressor untouched, so one encoder serves every input
        // (creating a zlib compressor costs more than the rest of the run).
        thread_local! {
            static ENCODER: std::cell::RefCell<FrameEncoder> =
                std::cell::RefCell::new(FrameEncoder::new().expect("encoder"));
        }
        ENCODER.with_borrow_mut(|encoder| {
            for frame in &frames {
                encoder
                    .encode(frame, &mut wire)
                    .expect("a decoded frame encodes");
            }
        });
    }
    let mut decoder = FrameDecoder::new(FUZZ_LIMITS);
    let mut buf = BytesMut::from(&wire[..]);
    for frame in &frames {
        let again = decoder
            .decode(&mut buf)
            .expect("re-encoded frame decodes")
            .expect("a whole frame");
        assert_eq!(&again, frame);
    }
    assert!(buf.is_empty());
}

fn check_spdy_bounds(frame: &SpdyFrame) {
    match frame {
        SpdyFrame::Data { data, .. } => assert!(data.len() <= FUZZ_LIMITS.max_payload),
        SpdyFrame::Unknown { payload, .. } => assert!(payload.len() <= FUZZ_LIMITS.max_payload),
        SpdyFrame::SynStream { headers, .. }
        | SpdyFrame::SynReply { headers, .. }
        | SpdyFrame::Headers { headers, .. } => {
            let size: usize = headers.iter().map(|(n, v)| 8 + n.len() + v.len()).sum();
            assert!(
                size + 4 <= FUZZ_LIMITS.max_header_block,
                "header block of {size} bytes"
            );
            assert!(headers.iter().all(|(n, _)| !n.is_empty()));
        }
        _ => {}
    }
}

/// SPDY header blocks: the first byte picks the inflater's output limit; the rest is one
/// or more compressed blocks (split at the sync-flush marker) inflated through one zlib
/// stream with the SPDY dictionary, and also parsed as an uncompressed block.
pub fn spdy_header_block(data: &[u8]) {
    let (selector, data) = split_selector(data);
    let limit = 1usize << (6 + selector % 12);
    let mut inflater = HeaderInflater::new();
    for block in split_after(data, &[0, 0, 0xff, 0xff]) {
        match inflater.decompress(block, limit) {
            Ok(out) => {
                assert!(
                    out.len() <= limit,
                    "inflated {} bytes, limit {limit}",
                    out.len()
                );
                if let Ok(headers) = decode_header_block(&out) {
                    let bytes = encode_header_block(&headers).expect("encodes");
                    assert_eq!(bytes.len(), out.len());
                }
            }
            Err(_) => break,
        }
    }
    if let Ok(headers) = decode_header_block(data) {
        let bytes = encode_header_block(&headers).expect("encodes");
        let again = decode_header_block(&bytes).expect("decodes");
        assert_eq!(again, headers);
        let mut deflater = HeaderDeflater::new().expect("deflater");
        let packed = deflater.compress(&bytes).expect("compresses");
        let unpacked = HeaderInflater::new()
            .decompress(&packed, bytes.len().max(1))
            .expect("inflates");
        assert_eq!(unpacked, bytes);
    }
}

/// Splits after each occurrence of `marker` (the marker stays with its block).
fn split_after<'a>(data: &'a [u8], marker: &[u8]) -> Vec<&'a [u8]> {
    let mut blocks = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + marker.len() <= data.len() {
        if &data[i..i + marker.len()] == marker {
            blocks.push(&data[start..i + marker.len()]);
            start = i + marker.len();
            i = start;
        } else {
            i += 1;
        }
    }
    if start < data.len() || blocks.is_empty() {
        blocks.push(&data[start..]);
    }
    blocks
}

/// WebSocket channel protocols: exec/attach channel messages (every version), v5 close
/// messages, port-forward channels, the resize stream and the error-stream Status.
pub fn ws_channel(data: &[u8]) {
    let (selector, data) = split_selector(data);
    for protocol in StreamProtocol::ALL {
        match channel::parse_message(data, protocol) {
            Ok(channel::Message::Data {
                channel: ch,
                payload,
            }) => {
                assert_eq!(channel::data_message(ch, payload), data);
            }
            Ok(channel::Message::Close { channel: ch }) => {
                assert!(protocol.has_close());
                assert_eq!(channel::close_message(ch), data);
            }
            Err(_) => {}
        }
    }
    // Port-forward: as many ports as the selector says, messages parsed both ways.
    let ports: Vec<u16> = (0..=u16::from(selector % 127)).map(|p| 8000 + p).collect();
    let count = ports.len();
    let mut channels = PortForwardChannels::new(ports).expect("at most 127 ports");
    if let Ok(message) = channels.parse(data) {
        assert!(message.index < count);
        let sent = channels
            .message(message.index, message.kind, message.payload)
            .expect("a parsed channel can be written");
        assert_eq!(sent[0], data[0]);
        assert!(sent.len() == data.len() || sent.len() == data.len() + 2);
    }
    let _ = channels.initial_messages();
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(ports) = channel::parse_ports(text.split('&')) {
            assert!(!ports.is_empty() && ports.len() <= 127 && !ports.contains(&0));
            PortForwardChannels::new(ports).expect("parsed ports make channels");
        }
        let offered = channel::offered_protocols(text.split('\n'));
        let names: Vec<&str> = StreamProtocol::ALL.iter().map(|p| p.name()).collect();
        if let Ok(name) = channel::negotiate_websocket(&offered, &names) {
            assert!(StreamProtocol::from_name(name).is_some());
        }
        let _ = channel::negotiate_stream_protocol(&offered, &names);
    }
    // The resize stream, fed in pieces of the selector's size.
    let mut resize = ResizeDecoder::new();
    for piece in data.chunks(usize::from(selector).max(1)) {
        if resize.push(piece).is_err() {
            break;
        }
    }
    let outcome = channel::parse_status(data);
    if let channel::ExecOutcome::ExitCode(code) = outcome {
        assert!((0..=255).contains(&code), "exit code {code} is not a byte");
    }
    for protocol in StreamProtocol::ALL {
        let payload = channel::error_stream_payload(protocol, &outcome);
        if protocol.status_on_error_stream() {
            assert_eq!(channel::parse_status(&payload), round_outcome(&outcome));
        }
    }
}

/// What a Status written for `outcome` reads back as.
fn round_outcome(outcome: &channel::ExecOutcome) -> channel::ExecOutcome {
    match outcome {
        channel::ExecOutcome::Error(message) => {
            channel::ExecOutcome::Error(format!("Internal error occurred: {message}"))
        }
        other => other.clone(),
    }
}

/// rancher/remotedialer messages of the k3s agent tunnel, and the Connect target check.
pub fn tunnel_frame(data: &[u8]) {
    use tunnel::frame::{connect_target, decode, encode, Body, MAX_CONNECT_PAYLOAD};
    if let Ok(frame) = decode(Bytes::copy_from_slice(data)) {
        if let Body::Error(text) = &frame.body {
            // 100 bytes read, each invalid byte possibly widened to U+FFFD.
            assert!(text.len() <= 300);
        }
        let bytes = encode(&frame);
        let again = decode(Bytes::from(bytes)).expect("a re-encoded frame decodes");
        match (&again.body, &frame.body) {
            // Lossy UTF-8 and the 100-byte cut make Error text a fixpoint only after a round.
            (Body::Error(_), Body::Error(_)) => {
                assert_eq!((again.id, again.conn_id), (frame.id, frame.conn_id));
                let third = decode(Bytes::from(encode(&again))).expect("decodes");
                let fourth = decode(Bytes::from(encode(&third))).expect("decodes");
                assert_eq!(fourth, third);
            }
            _ => assert_eq!(again, frame),
        }
        if let Body::Connect(payload) = &frame.body {
            if let Ok(port) = connect_target(payload, 10250) {
                assert_eq!(port, 10250);
                assert!(payload.len() <= MAX_CONNECT_PAYLOAD);
            }
        }
    }
    if let Ok(port) = connect_target(data, 10250) {
        assert_eq!(port, 10250);
    }
}

/// Pod manifests as the node reads them from its manifest directory (YAML, several
/// documents), each pod then taken through validation and the plans.
pub fn manifest_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = crate::node::manifests::parse(Path::new("fuzz.yaml"), text, "owner");
    for pod in &parsed.pods {
        assert!(pod.metadata.uid.as_deref().is_some_and(|u| !u.is_empty()));
        assert!(pod
            .metadata
            .namespace
            .as_deref()
            .is_some_and(|n| !n.is_empty()));
        check_pod(pod);
    }
}

/// Arbitrary Pod JSON (what an owner sends in an Assign) through every pure function of
/// the spec translation, with the plans' invariants.
pub fn translate_pod(data: &[u8]) {
    let Ok(pod) = serde_json::from_slice::<Pod>(data) else {
        return;
    };
    check_pod(&pod);
}

fn check_pod(pod: &Pod) {
    let valid = translate::validate(pod);
    let requests = translate::pod_requests(pod);
    if valid.is_ok() {
        assert!(
            requests.is_ok(),
            "a valid pod's requests do not parse: {requests:?}"
        );
    }
    let _ = translate::host_ports(pod);
    let _ = translate::empty_dirs(pod);
    let _ = translate::file_volumes(pod);
    assert!(translate::grace_period_secs(pod) >= 2);
    let volumes_dir = Path::new("/var/lib/beemesh/pods/p/volumes");
    let files_dir = Path::new("/run/beemesh/pods/p/files");
    let ctx = PlanContext {
        pod_subnet: None,
        cluster_dns: None,
        agent: "agent",
        owner: "owner",
        epoch: Epoch(3),
        volumes_dir,
        files_dir,
        pod_ip: Some([10, 0, 0, 2].into()),
        host_ip: Some([192, 168, 0, 1].into()),
        node_name: "node",
        host_dns: &ResolvConf {
            nameservers: vec!["10.0.0.2".into()],
            searches: vec!["example.com".into()],
            options: vec!["ndots:2".into()],
        },
        memory_dirs: &std::collections::BTreeMap::new(),
        group_socket_dir: None,
    };
    let plan = translate::pod_plan(pod, &ctx);
    assert_eq!(plan.is_ok(), valid.is_ok());
    let Ok(plan) = plan else {
        return;
    };
    assert!(
        !plan.hostname.is_empty() && plan.hostname.len() <= 63,
        "hostname {:?}",
        plan.hostname
    );
    let Some(spec) = pod.spec.as_ref() else {
        panic!("a valid pod without a spec");
    };
    let init = spec.init_containers.iter().flatten();
    let containers = init
        .map(|c| (ContainerKind::Init, c))
        .chain(spec.containers.iter().map(|c| (ContainerKind::App, c)));
    for (kind, container) in containers {
        let Ok(plan) = translate::container_plan(pod, container, kind, 0, &ctx) else {
            continue;
        };
        for mount in &plan.mounts {
            let host_path = mount.host_path();
            assert!(
                (host_path.starts_with(volumes_dir) || host_path.starts_with(files_dir))
                    && !host_path.components().any(|c| c == Component::ParentDir),
                "mount {host_path:?} leaves the pod's directories"
            );
            assert!(mount.container_path.starts_with('/'));
        }
    }
}

/// Kubernetes quantities (resource requests and limits): CPU in millicores and memory
/// in bytes must agree, as ceil(1000 x) and ceil(x) of the same amount.
pub fn quantity(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let q = Quantity(text.to_owned());
    let cpu = translate::parse_cpu_millis(&q);
    let memory = translate::parse_memory_bytes(&q);
    match (cpu, memory) {
        (Ok(cpu), Ok(memory)) => {
            assert!(
                u128::from(cpu) <= u128::from(memory) * 1000,
                "{text:?}: {cpu}m > {memory} x 1000"
            );
            if memory > 0 {
                assert!(
                    u128::from(cpu) > (u128::from(memory) - 1) * 1000,
                    "{text:?}: {cpu}m, {memory} bytes"
                );
            } else {
                assert_eq!(cpu, 0, "{text:?}");
            }
        }
        // Millicores overflow before bytes do, never the other way round.
        (Err(_), Ok(_)) | (Err(_), Err(_)) => {}
        (Ok(cpu), Err(e)) => {
            panic!("{text:?}: {cpu} millicores but memory fails: {e}");
        }
    }
}

/// Text a client controls on the kubelet API and in pod annotations: exec options,
/// log queries, port lists, agent selectors.
pub fn kubelet_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for attach in [false, true] {
        if let Ok(options) = crate::kubelet::exec::ExecOptions::parse(text, attach) {
            assert!(attach || !options.command.is_empty());
            let s = options.streams;
            assert!(s.stdin || s.stdout || s.stderr);
            assert!(!(s.tty && s.stderr));
        }
    }
    let query: HashMap<String, String> = text
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    for now in [0, 1_700_000_000, i64::from(i32::MAX)] {
        let now = jiff::Timestamp::from_second(now).expect("a time");
        if let Ok(q) = crate::kubelet::server::LogQuery::parse(&query, now) {
            assert!(q.limit_bytes != Some(0));
        }
    }
    if let Ok(requirements) = crate::placement::parse_selector(text) {
        // What the selector says travels in offers: it must survive the wire.
        json_fixpoint(&requirements, "selector");
    }
}

/// A whole SPDY/3.1 session (`kubelet::spdy::accept_with`) fed the input as the client's
/// bytes, then the client's end of file; the application accepts every stream, reads it
/// to its end and answers. A session that has not ended 5 s after its client went away
/// (each run takes microseconds) is a finding: a session left behind would hold its
/// connection and buffers for good.
pub fn spdy_session(data: &[u8]) {
    use crate::kubelet::spdy::{accept_with, SessionConfig, SessionError};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let input = data.to_vec();
    runtime.block_on(async move {
        let (client, server) = tokio::io::duplex(16 << 10);
        let config = SessionConfig {
            limits: FUZZ_LIMITS,
            ..SessionConfig::default()
        };
        let (session, mut streams) = accept_with(server, config);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        tokio::spawn(async move {
            let _ = to_server.write_all(&input).await;
            let _ = to_server.shutdown().await;
        });
        // The client reads whatever the server sends (replies, pings, resets).
        tokio::spawn(async move {
            let mut sink = [0u8; 4096];
            while matches!(from_server.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        // Panics in tasks are caught by tokio: take them out and raise them here, so that
        // the corpus replay (without libFuzzer's aborting panic hook) sees them too.
        let app = tokio::spawn(async move {
            let mut tasks = Vec::new();
            while let Some(stream) = streams.recv().await {
                tasks.push(tokio::spawn(async move {
                    let (mut reader, mut writer) = stream.into_split();
                    let mut got = Vec::new();
                    let _ = reader.read_to_end(&mut got).await;
                    assert!(
                        got.len() <= data_limit(),
                        "a stream buffered {} bytes",
                        got.len()
                    );
                    let _ = writer.write_all(b"ok").await;
                    let _ = writer.shutdown().await;
                }));
            }
            for task in tasks {
                if let Err(e) = task.await {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
            }
        });
        let wait = std::time::Duration::from_secs(5);
        let end = tokio::time::timeout(wait, session.closed())
            .await
            .expect("the session did not end after its client closed");
        if let Err(SessionError::Io { message, .. }) = &end {
            assert_ne!(message, "session task stopped", "the session's task died");
        }
        match tokio::time::timeout(wait, app).await {
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(_) => {}
            Err(_) => panic!("streams did not end with the session"),
        }
    });
}

/// What one stream can deliver at most: the whole input fits in the fuzzer's max_len.
fn data_limit() -> usize {
    1 << 20
}

/// The Raft groups' protocol: call and reply frames as members read them off a stream
/// (encoding stable once decoded), the owner's group word as an agent checks it, and a
/// snapshot as a member reads it back (from a peer or its disk). The first byte picks.
pub fn raft_frames(data: &[u8]) {
    use crate::raft::rpc::{CallFrame, Reply, MAX_FRAME_BYTES};
    use futures::executor::block_on;
    fn stable<T: Serialize + DeserializeOwned>(data: &[u8], what: &str) {
        let mut io = data;
        let Ok(first) = block_on(relay::read_message::<T>(&mut io, MAX_FRAME_BYTES)) else {
            return;
        };
        let mut once = Vec::new();
        block_on(relay::write_message(&mut once, &first, usize::MAX)).expect("writes");
        let again: T = block_on(relay::read_message(&mut once.as_slice(), usize::MAX))
            .unwrap_or_else(|e| panic!("{what}: its own encoding does not decode: {e}"));
        let mut twice = Vec::new();
        block_on(relay::write_message(&mut twice, &again, usize::MAX)).expect("writes");
        assert_eq!(once, twice, "{what}: encoding is not stable");
    }
    let (selector, data) = split_selector(data);
    match selector % 4 {
        0 => stable::<CallFrame>(data, "raft call"),
        1 => stable::<Reply>(data, "raft reply"),
        2 => {
            if let Ok(word) = wire::decode::<wire::SignedGroup>(data, wire::MAX_REQUEST_BYTES) {
                let sender = word.owner.0;
                if crate::trust::group::verify(&word, &sender).is_ok() {
                    assert!(word.members.len() <= wire::MAX_GROUP_MEMBERS);
                }
                json_fixpoint(&word, "group word");
            }
        }
        _ => {
            if let Ok(kv) = crate::raft::store::decode_snapshot_state(data) {
                assert!(kv.len() <= crate::raft::kv::MAX_KEYS);
            }
        }
    }
}
