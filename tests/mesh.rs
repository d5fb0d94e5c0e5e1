//! Several real swarms over loopback TCP: gossip reaches peers that are not directly
//! connected, requests get answers, and malformed or oversized messages from a raw
//! libp2p peer are dropped and counted without harming anyone.

use std::time::Duration;

use beemesh::mesh::{self, GossipFilter, MeshConfig, MeshEvent, MeshEvents, MeshHandle};
use beemesh::metrics::Metrics;
use beemesh::wire::{
    Epoch, GossipMessage, MeshView, Offer, PodRef, PodUid, Request, Resources, Response, Topic,
};
use futures::{AsyncRead, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{gossipsub, noise, request_response, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
use tokio_util::sync::CancellationToken;

struct Peer {
    handle: MeshHandle,
    events: MeshEvents,
    metrics: Metrics,
    addr: Multiaddr,
}

async fn peer(bootstrap: Vec<Multiaddr>, cancel: &CancellationToken) -> Peer {
    peer_on("/ip4/127.0.0.1/tcp/0", bootstrap, cancel).await
}

async fn peer_on(listen: &str, bootstrap: Vec<Multiaddr>, cancel: &CancellationToken) -> Peer {
    peer_with(
        Keypair::generate_ed25519(),
        listen,
        bootstrap,
        GossipFilter::accept_all(),
        cancel,
    )
    .await
}

/// `listen` as a listen list: "" for none.
fn listen_addrs(listen: &str) -> Vec<Multiaddr> {
    Some(listen)
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().expect("multiaddr"))
        .into_iter()
        .collect()
}

/// A peer listening on `listen` ("" for none: it can only dial out).
async fn peer_with(
    keypair: Keypair,
    listen: &str,
    bootstrap: Vec<Multiaddr>,
    accept_gossip: GossipFilter,
    cancel: &CancellationToken,
) -> Peer {
    let config = MeshConfig {
        listen: listen_addrs(listen),
        bootstrap,
        subscribe: Topic::ALL.to_vec(),
        accept_gossip,
        ..MeshConfig::default()
    };
    start_peer(keypair, config, cancel).await
}

/// A peer joined with `config`.
async fn start_peer(keypair: Keypair, config: MeshConfig, cancel: &CancellationToken) -> Peer {
    let metrics = Metrics::new();
    let listens = !config.listen.is_empty();
    let (handle, events, event_loop) =
        mesh::start(keypair, config, metrics.clone()).expect("mesh starts");
    tokio::spawn(event_loop.run(cancel.clone()));
    if !listens {
        let addr = Multiaddr::empty();
        return Peer {
            handle,
            events,
            metrics,
            addr,
        };
    }
    let addr = loop {
        if let Some(addr) = handle
            .listen_addrs()
            .await
            .expect("loop runs")
            .into_iter()
            .next()
        {
            break addr;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    Peer {
        handle,
        events,
        metrics,
        addr,
    }
}

fn offer(name: &str) -> GossipMessage {
    GossipMessage::Offer(Offer {
        pod: PodRef {
            uid: PodUid(format!("uid-{name}")),
            namespace: "default".into(),
            name: name.into(),
        },
        epoch: Epoch(1),
        requests: Resources::default(),
        agent_selector: vec![],
        host_ports: vec![],
        spec_digest: String::new(),
    })
}

/// Waits for the first event that `pick` accepts.
async fn next_matching<T>(
    events: &mut MeshEvents,
    mut pick: impl FnMut(MeshEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let event = events.recv().await.expect("mesh running");
            if let Some(found) = pick(event) {
                return found;
            }
        }
    })
    .await
    .expect("event within 15 s")
}

/// `from` asks `to`, whose program (reading `to_events`) answers: the answer arrives.
async fn request_answered(from: &MeshHandle, to: PeerId, to_events: &mut MeshEvents) {
    let asker = from.clone();
    let ask = tokio::spawn(async move { asker.request(to, Request::Query).await });
    let reply = next_matching(to_events, |e| match e {
        MeshEvent::Request { reply, .. } => Some(reply),
        _ => None,
    })
    .await;
    reply.send(Response::Ack).expect("loop waits");
    assert_eq!(ask.await.expect("task").expect("answered"), Response::Ack);
}

/// Publishes until the message gets through: gossipsub needs a heartbeat or two to
/// learn who subscribes to what.
async fn publish_until_received(from: &Peer, to: &mut Peer, message: GossipMessage) -> PeerId {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let _ = from.handle.publish(&message).await;
        let got = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match to.events.recv().await {
                    Some(MeshEvent::Gossip { source, message: m }) if m == message => {
                        return source
                    }
                    Some(_) => continue,
                    None => panic!("mesh stopped"),
                }
            }
        })
        .await;
        if let Ok(source) = got {
            return source;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gossip never arrived"
        );
    }
}

#[tokio::test]
async fn gossip_travels_two_hops_and_requests_get_answers() {
    let cancel = CancellationToken::new();
    let mut hub = peer(vec![], &cancel).await;
    let left = peer(vec![hub.addr.clone()], &cancel).await;
    let mut right = peer(vec![hub.addr.clone()], &cancel).await;

    // left and right only know the hub; the offer reaches right through it, signed by left.
    let source = publish_until_received(&left, &mut right, offer("two-hops")).await;
    assert_eq!(source, left.handle.local_peer_id());

    // A request from right to the hub, answered by the hub's program.
    let hub_id = hub.handle.local_peer_id();
    let asker = right.handle.clone();
    let ask = tokio::spawn(async move { asker.request(hub_id, Request::Query).await });
    let (peer, reply) = next_matching(&mut hub.events, |e| match e {
        MeshEvent::Request {
            peer,
            request: Request::Query,
            reply,
        } => Some((peer, reply)),
        _ => None,
    })
    .await;
    assert_eq!(peer, right.handle.local_peer_id());
    let view = MeshView::default();
    reply
        .send(Response::View(Box::new(view.clone())))
        .expect("loop waits");
    let answer = ask.await.expect("task").expect("request answered");
    assert_eq!(answer, Response::View(Box::new(view)));

    // A request the program drops is a failure for the asker, not a hang.
    let asker = right.handle.clone();
    let ask = tokio::spawn(async move { asker.request(hub_id, Request::Query).await });
    next_matching(&mut hub.events, |e| match e {
        MeshEvent::Request { reply, .. } => {
            drop(reply);
            Some(())
        }
        _ => None,
    })
    .await;
    assert!(ask.await.expect("task").is_err());
    cancel.cancel();
}

/// Answers every request a peer gets, each after `delay`, until its mesh stops.
fn answer_slowly(mut events: MeshEvents, delay: Duration) {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let MeshEvent::Request { reply, .. } = event {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = reply.send(Response::Ack);
                });
            }
        }
    });
}

/// `count` requests from `from` to `to` at once; the failures' reasons.
async fn burst(from: &MeshHandle, to: PeerId, count: usize) -> Vec<String> {
    let asks: Vec<_> = (0..count)
        .map(|_| {
            let from = from.clone();
            tokio::spawn(async move { from.request(to, Request::Query).await })
        })
        .collect();
    let mut failures = Vec::new();
    for ask in asks {
        match ask.await.expect("task") {
            Ok(Response::Ack) => {}
            Ok(other) => failures.push(format!("unexpected {other:?}")),
            Err(e) => failures.push(e.to_string()),
        }
    }
    failures
}

/// A connection holds 32 request streams, both ways together; a burst far past that
/// (an owner assigning a Deployment's pods to one agent) while the other side sends its
/// own requests gets every answer: the surplus waits for room instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_past_the_stream_limit_is_answered_in_full_both_ways() {
    let cancel = CancellationToken::new();
    let owner = peer(vec![], &cancel).await;
    let agent = peer(vec![owner.addr.clone()], &cancel).await;
    let (owner_id, agent_id) = (owner.handle.local_peer_id(), agent.handle.local_peer_id());
    answer_slowly(owner.events, Duration::from_millis(20));
    answer_slowly(agent.events, Duration::from_millis(20));
    tokio::time::timeout(Duration::from_secs(15), async {
        while agent
            .handle
            .request(owner_id, Request::Query)
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("connected within 15 s");

    let (assigns, reports) = tokio::join!(
        burst(&owner.handle, agent_id, 300),
        burst(&agent.handle, owner_id, 100),
    );
    assert!(assigns.is_empty(), "owner to agent: {assigns:?}");
    assert!(reports.is_empty(), "agent to owner: {reports:?}");
    cancel.cancel();
}

#[tokio::test]
async fn gossip_from_untrusted_signers_is_neither_delivered_nor_relayed() {
    let cancel = CancellationToken::new();
    let trusted_key = Keypair::generate_ed25519();
    let trusted = trusted_key.public().to_peer_id();
    let right_key = Keypair::generate_ed25519();
    let right_id = right_key.public().to_peer_id();
    // The hub exchanges gossip only with `trusted` and `right`; they accept everything.
    let mut hub = peer_with(
        Keypair::generate_ed25519(),
        "/ip4/127.0.0.1/tcp/0",
        vec![],
        GossipFilter::new(Topic::ALL, move |peer| {
            *peer == trusted || *peer == right_id
        }),
        &cancel,
    )
    .await;
    // None listens: they reach each other only through the hub.
    let dialler = |key: Keypair| {
        peer_with(
            key,
            "",
            vec![hub.addr.clone()],
            GossipFilter::accept_all(),
            &cancel,
        )
    };
    let rogue = dialler(Keypair::generate_ed25519()).await;
    let mut right = dialler(right_key).await;
    let friend = dialler(trusted_key).await;
    // What the hub trusts goes through it.
    assert_eq!(
        publish_until_received(&friend, &mut right, offer("friend")).await,
        trusted
    );
    // The rogue's offers, published for seconds, reach neither the hub's program nor,
    // through the hub, right: the hub takes no gossip from a peer it does not trust.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < deadline {
        let _ = rogue.handle.publish(&offer("rogue")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rogue_id = rogue.handle.local_peer_id();
    let from_rogue =
        |e: &MeshEvent| matches!(e, MeshEvent::Gossip { source, .. } if *source == rogue_id);
    while let Some(event) = hub.events.try_recv() {
        assert!(!from_rogue(&event), "{event:?}");
    }
    while let Some(event) = right.events.try_recv() {
        assert!(!from_rogue(&event), "relayed: {event:?}");
    }
    cancel.cancel();
}

#[tokio::test]
async fn peers_join_over_quic_too() {
    let cancel = CancellationToken::new();
    let mut hub = peer_on("/ip4/127.0.0.1/udp/0/quic-v1", vec![], &cancel).await;
    assert!(hub.addr.to_string().contains("/quic-v1/"), "{}", hub.addr);
    let spoke = peer_on(
        "/ip4/127.0.0.1/udp/0/quic-v1",
        vec![hub.addr.clone()],
        &cancel,
    )
    .await;
    let source = publish_until_received(&spoke, &mut hub, offer("over-quic")).await;
    assert_eq!(source, spoke.handle.local_peer_id());
    cancel.cancel();
}

#[tokio::test]
async fn a_private_mesh_takes_only_peers_that_hold_its_key() {
    let cancel = CancellationToken::new();
    let key = |byte: &str| -> libp2p::pnet::PreSharedKey {
        format!("/key/swarm/psk/1.0.0/\n/base16/\n{}", byte.repeat(32))
            .parse()
            .expect("key")
    };
    let start = |listen: &str, bootstrap: Vec<Multiaddr>, psk| {
        mesh::start(
            Keypair::generate_ed25519(),
            MeshConfig {
                listen: listen_addrs(listen),
                bootstrap,
                psk,
                ..MeshConfig::default()
            },
            Metrics::new(),
        )
    };
    // QUIC has no place for the key: refused at start, not silently open.
    assert!(matches!(
        start("/ip4/127.0.0.1/udp/0/quic-v1", vec![], Some(key("11"))),
        Err(mesh::MeshError::Listen { .. })
    ));
    let (hub, mut hub_events, event_loop) =
        start("/ip4/127.0.0.1/tcp/0", vec![], Some(key("11"))).expect("hub");
    tokio::spawn(event_loop.run(cancel.clone()));
    // The hub answers every request it gets.
    tokio::spawn(async move {
        while let Some(event) = hub_events.recv().await {
            if let MeshEvent::Request { reply, .. } = event {
                let _ = reply.send(Response::Ack);
            }
        }
    });
    let hub_addr = loop {
        if let Some(addr) = hub.listen_addrs().await.expect("loop").into_iter().next() {
            break addr;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for (psk, reaches) in [
        (Some(key("11")), true),
        (Some(key("22")), false),
        (None, false),
    ] {
        let (peer, _events, event_loop) = start("", vec![hub_addr.clone()], psk).expect("peer");
        tokio::spawn(event_loop.run(cancel.clone()));
        let answer = tokio::time::timeout(
            Duration::from_secs(12),
            peer.request(hub.local_peer_id(), Request::Query),
        )
        .await;
        assert_eq!(
            matches!(answer, Ok(Ok(Response::Ack))),
            reaches,
            "{answer:?}"
        );
    }
    cancel.cancel();
}

/// A libp2p swarm over TCP with `behaviour`, not a BeeMesh peer: what a stranger on
/// the mesh port runs. Connections stay open a minute without traffic.
fn raw_swarm<B: NetworkBehaviour>(keypair: Keypair, behaviour: B) -> libp2p::Swarm<B> {
    libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| behaviour)
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// A raw libp2p peer that speaks the same protocols but sends whatever bytes it likes.
#[derive(NetworkBehaviour)]
struct Raw {
    gossipsub: gossipsub::Behaviour,
    requests: request_response::Behaviour<RawCodec>,
}

#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        futures::AsyncReadExt::read_to_end(io, &mut buf).await?;
        Ok(buf)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()> {
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

fn dropped(metrics: &Metrics, kind: &str, reason: &str) -> bool {
    metrics.render().lines().any(|l| {
        l.starts_with("beemesh_mesh_messages_dropped_total")
            && l.contains(&format!("kind=\"{kind}\""))
            && l.contains(&format!("reason=\"{reason}\""))
            && !l.ends_with(" 0")
    })
}

#[tokio::test]
async fn malformed_and_oversized_messages_are_dropped_and_counted() {
    let cancel = CancellationToken::new();
    let mut target = peer(vec![], &cancel).await;
    let target_id = target.handle.local_peer_id();

    let keypair = Keypair::generate_ed25519();
    let gossip = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(keypair.clone()),
        gossipsub::ConfigBuilder::default()
            .heartbeat_interval(Duration::from_millis(200))
            .max_transmit_size(1 << 20)
            .build()
            .expect("config"),
    )
    .expect("gossipsub");
    let requests = request_response::Behaviour::with_codec(
        RawCodec,
        [(
            StreamProtocol::new(beemesh::wire::REQUEST_PROTOCOL),
            request_response::ProtocolSupport::Outbound,
        )],
        request_response::Config::default(),
    );
    let mut raw = raw_swarm(
        keypair,
        Raw {
            gossipsub: gossip,
            requests,
        },
    );
    let offers = gossipsub::IdentTopic::new(Topic::Offers.name());
    raw.behaviour_mut()
        .gossipsub
        .subscribe(&offers)
        .expect("subscribe");
    raw.dial(target.addr.clone()).expect("dial");

    // Frames: garbage, a wrong version, and a length prefix far over the limit.
    let mut bad_requests = vec![
        {
            let mut f = 7u32.to_be_bytes().to_vec();
            f.extend_from_slice(b"garbage");
            f
        },
        {
            let body = br#"{"v":9,"msg":{"type":"query"}}"#;
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(body);
            f
        },
        {
            let mut f = (64u32 << 20).to_be_bytes().to_vec();
            f.extend_from_slice(&[b'x'; 1024]);
            f
        },
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut publish = tokio::time::interval(Duration::from_millis(300));
    loop {
        tokio::select! {
            event = raw.select_next_some() => {
                if let SwarmEvent::ConnectionEstablished { .. } = event {
                    for frame in bad_requests.drain(..) {
                        raw.behaviour_mut().requests.send_request(&target_id, frame);
                    }
                }
            }
            _ = publish.tick() => {
                let _ = raw.behaviour_mut().gossipsub.publish(offers.clone(), b"{not json".to_vec());
                let _ = raw.behaviour_mut().gossipsub.publish(offers.clone(), vec![b' '; 70 * 1024]);
            }
        }
        if dropped(&target.metrics, "offer", "malformed")
            && dropped(&target.metrics, "request", "malformed")
            && dropped(&target.metrics, "request", "unsupported_version")
            && dropped(&target.metrics, "request", "too_large")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "drops not counted:\n{}",
            target.metrics.render()
        );
    }
    // Nothing bad reached the program, and the peer still serves good requests.
    while let Some(event) = target.events.try_recv() {
        assert!(
            !matches!(event, MeshEvent::Gossip { .. } | MeshEvent::Request { .. }),
            "a bad message got through: {event:?}"
        );
    }
    let helper = peer(vec![target.addr.clone()], &cancel).await;
    request_answered(&helper.handle, target_id, &mut target.events).await;
    cancel.cancel();
}

/// Forwards TCP from a local port to `target`; while `blackhole` is set, bytes are
/// read and dropped both ways (a partition that leaves the connection open).
async fn blackholing_proxy(
    target: std::net::SocketAddr,
    blackhole: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            for (mut from, mut to) in [(ri, wo), (ro, wi)].map(|(r, w)| {
                (
                    Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                    Box::new(w) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                )
            }) {
                let blackhole = blackhole.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = from.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if !blackhole.load(std::sync::atomic::Ordering::Acquire)
                            && to.write_all(&buf[..n]).await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
        }
    });
    port
}

/// A connection that goes silent (a partition; TCP stays open) is closed when pings
/// fail, rather than kept while TCP backs off, and the peer is reached again after.
#[tokio::test]
async fn a_connection_that_goes_silent_is_closed_after_failed_pings_and_redialed() {
    let cancel = CancellationToken::new();
    let b = peer(vec![], &cancel).await;
    let b_id = b.handle.local_peer_id();
    let target = b
        .addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .expect("tcp port");
    let blackhole = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = blackholing_proxy(([127, 0, 0, 1], target).into(), blackhole.clone()).await;
    let via_proxy: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{b_id}")
        .parse()
        .expect("addr");
    let mut a = peer_on("", vec![via_proxy], &cancel).await;
    wait_for_peer(&mut a.events, b_id, true).await;
    blackhole.store(true, std::sync::atomic::Ordering::Release);
    // Without pings that close it, TCP would keep this connection for many minutes.
    let silent_at = tokio::time::Instant::now();
    wait_for_peer(&mut a.events, b_id, false).await;
    let closed_after = silent_at.elapsed();
    eprintln!("silent connection closed after {closed_after:?}");
    // An interval and a timeout without an answer, and the check's second.
    assert!(
        closed_after <= mesh::PING_INTERVAL + mesh::PING_TIMEOUT + Duration::from_secs(2),
        "closed only after {closed_after:?}"
    );
    blackhole.store(false, std::sync::atomic::Ordering::Release);
    wait_for_peer(&mut a.events, b_id, true).await;
    cancel.cancel();
}

/// Waits (at most 30 s) until `peer` connects, or disconnects.
async fn wait_for_peer(events: &mut MeshEvents, peer: PeerId, connected: bool) {
    let what = if connected {
        "connected"
    } else {
        "disconnected"
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await.expect("mesh runs") {
                MeshEvent::PeerConnected(p) if p == peer && connected => return,
                MeshEvent::PeerDisconnected(p) if p == peer && !connected => return,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("peer {peer} not {what} within 30 s"));
}

/// A peer that opens connection after connection to one mesh peer gets at most two at
/// once (the others are closed as they come), not one per dial.
/// A stranger dials `target` `times`; returns the connections open after 3 s and the
/// most open at once.
async fn dial_repeatedly(target: &Multiaddr, times: usize) -> (i32, i32) {
    let mut dialer = raw_swarm(Keypair::generate_ed25519(), libp2p::swarm::dummy::Behaviour);
    for _ in 0..times {
        let dial = libp2p::swarm::dial_opts::DialOpts::unknown_peer_id()
            .address(target.clone())
            .build();
        dialer.dial(dial).expect("dial");
    }
    let mut open = 0i32;
    let mut most = 0i32;
    let settle = tokio::time::sleep(Duration::from_secs(3));
    tokio::pin!(settle);
    loop {
        tokio::select! {
            _ = &mut settle => break,
            event = dialer.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { .. } => open += 1,
                SwarmEvent::ConnectionClosed { .. } => open -= 1,
                _ => {}
            },
        }
        most = most.max(open);
    }
    (open, most)
}

#[tokio::test]
async fn a_peer_gets_at_most_two_connections_to_another() {
    let cancel = CancellationToken::new();
    let target = peer(vec![], &cancel).await;
    let (open, most) = dial_repeatedly(&target.addr, 5).await;
    assert!(open <= 2, "{open} connections open");
    assert!(open >= 1, "the peer is still reachable");
    eprintln!("at most {most} open at once while dialling, {open} after");
    cancel.cancel();
}

#[tokio::test]
async fn a_peer_over_its_memory_bound_takes_no_new_connections() {
    let cancel = CancellationToken::new();
    let config = MeshConfig {
        listen: listen_addrs("/ip4/127.0.0.1/tcp/0"),
        // Below any process's RSS: every new connection is over the bound.
        max_memory_bytes: 1 << 20,
        ..MeshConfig::default()
    };
    let (handle, _events, event_loop) =
        mesh::start(Keypair::generate_ed25519(), config, Metrics::new()).expect("mesh starts");
    tokio::spawn(event_loop.run(cancel.clone()));
    let addr = loop {
        if let Some(addr) = handle
            .listen_addrs()
            .await
            .expect("runs")
            .into_iter()
            .next()
        {
            break addr;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (open, _) = dial_repeatedly(&addr, 1).await;
    assert_eq!(open, 0, "a connection past the memory bound stays open");
    cancel.cancel();
}

/// Connections that a Kademlia lookup opened between two agents close once idle, and
/// open again when a request needs one; an agent's connection to its owner, the peer
/// it gossips with, stays (gossipsub's streams no longer keep every connection open).
#[tokio::test]
async fn connections_close_when_idle_except_to_the_peers_gossiped_with() {
    let cancel = CancellationToken::new();
    let idle_timeout = Duration::from_secs(2);
    let (owner_key, agent_keys) = (
        Keypair::generate_ed25519(),
        [Keypair::generate_ed25519(), Keypair::generate_ed25519()],
    );
    let owner_id = owner_key.public().to_peer_id();
    let agent_ids: Vec<PeerId> = agent_keys.iter().map(|k| k.public().to_peer_id()).collect();
    // As a node and its agents: each takes the other's topic, and none is in the
    // other's gossipsub mesh, which would keep the connection open by itself.
    let config = |bootstrap: Vec<Multiaddr>, topic: Topic, trusts: Vec<PeerId>| MeshConfig {
        listen: listen_addrs("/ip4/127.0.0.1/tcp/0"),
        bootstrap,
        subscribe: vec![topic],
        accept_gossip: GossipFilter::new([topic], move |p| trusts.contains(p)),
        idle_timeout,
        ..MeshConfig::default()
    };
    let owner_config = config(vec![], Topic::Heartbeats, agent_ids.clone());
    let owner = start_peer(owner_key, owner_config, &cancel).await;
    let agent = |key: Keypair| {
        let agent_config = config(vec![owner.addr.clone()], Topic::Offers, vec![owner_id]);
        start_peer(key, agent_config, &cancel)
    };
    let [first_key, second_key] = agent_keys;
    let mut first = agent(first_key).await;
    wait_for_peer(&mut first.events, owner_id, true).await;
    let second = agent(second_key).await;
    // The second agent's lookup through the owner finds the first, and dials it.
    wait_for_peer(&mut first.events, agent_ids[1], true).await;
    let started = tokio::time::Instant::now();
    wait_for_peer(&mut first.events, agent_ids[1], false).await;
    let closed_after = started.elapsed();
    eprintln!("the agents' connection closed {closed_after:?} after it opened");
    assert!(
        closed_after >= idle_timeout / 2,
        "closed after {closed_after:?}"
    );

    // A request opens one again.
    request_answered(&second.handle, agent_ids[0], &mut first.events).await;

    // Through several idle timeouts, the agent stays connected to its owner: nothing
    // but a disconnection from the other agent is seen.
    let quiet = tokio::time::sleep(idle_timeout * 4);
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            _ = &mut quiet => break,
            event = first.events.recv() => match event.expect("mesh runs") {
                MeshEvent::PeerDisconnected(peer) => assert_eq!(peer, agent_ids[1], "owner lost"),
                MeshEvent::Gossip { .. } | MeshEvent::PeerConnected(_) => {}
                MeshEvent::Request { .. } => panic!("no request was sent"),
            },
        }
    }
    cancel.cancel();
}
