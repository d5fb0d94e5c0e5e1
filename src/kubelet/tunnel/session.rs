//! One remotedialer session, the client side: the server asks for connections with
//! Connect, and each one that names this node's kubelet port on loopback is dialled to
//! the kubelet API (its TLS, authentication and authorization unchanged) and piped
//! through Data messages until either side sends Error or closes.
//!
//! Flow control, both ways: a Pause from the server stops reading that connection's
//! local side until Resume; data from the server queues per connection up to
//! [`PAUSE_AT`], then this side sends Pause (and Resume below [`RESUME_AT`]). Servers
//! that ignore Pause (remotedialer before SyncConnections, as in k3s 1.21) are slowed
//! the way they slowed themselves: at [`QUEUE_LIMIT`] the session stops reading the
//! WebSocket until the connection drains, so memory stays bounded and nothing is lost.
//!
//! Bad input is dropped and counted, the session stays up: undecodable messages, text
//! messages, unknown types, Data for unknown connections (answered with an Error as
//! remotedialer does), and Connects to anything but the kubelet (answered with an Error
//! for that connection).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::frame::{self, Body, Frame};
use crate::metrics::Metrics;

/// Queued bytes from the server for one connection at which this side sends Pause.
pub const PAUSE_AT: usize = 1 << 21;
/// ... and Resume once the queue is below this (remotedialer's MaxBuffer/8).
pub const RESUME_AT: usize = PAUSE_AT / 8;
/// The most one connection may queue; past it the session waits for it to drain.
pub const QUEUE_LIMIT: usize = 2 * PAUSE_AT;
/// The largest read sent in one Data message (twice Go's io.Copy buffer: fewer
/// messages for bulk transfers; receivers take any size).
const READ_CHUNK: usize = 64 * 1024;
/// The largest WebSocket message accepted: Data messages are at most a read's size.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Messages waiting to be written to the server.
const OUTBOUND_QUEUE: usize = 64;

/// How a session behaves; the defaults are remotedialer's and k3s's.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Where tunnelled connections go: the kubelet API on loopback.
    pub kubelet: SocketAddr,
    /// The most connections open at once; more Connects are refused.
    pub max_connections: usize,
    /// A WebSocket ping this often (remotedialer's PingWriteInterval).
    pub ping_interval: Duration,
    /// The list of live connections this often (SyncConnectionsInterval).
    pub sync_interval: Duration,
    /// The session is dead after this long without any message from the server.
    pub idle_timeout: Duration,
    /// How long dialling the kubelet may take.
    pub dial_timeout: Duration,
}

impl SessionConfig {
    pub fn new(kubelet_port: u16) -> Self {
        SessionConfig {
            kubelet: SocketAddr::from(([127, 0, 0, 1], kubelet_port)),
            max_connections: 512,
            ping_interval: Duration::from_secs(5),
            sync_interval: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            dial_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    #[error("the node is stopping")]
    Cancelled,
    #[error("the server closed the session")]
    Closed,
    #[error("nothing heard from the server for {0:?}")]
    Silent(Duration),
    #[error("WebSocket error: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

/// One tunnelled connection, as the session's reader sees it.
struct Connection {
    /// Bytes for the kubelet; closing it ends the connection after they are written.
    to_local: mpsc::Sender<Bytes>,
    /// Bytes queued in `to_local`, bounded by QUEUE_LIMIT permits.
    room: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
    /// Whether this side has sent Pause for the connection.
    paused_by_us: Arc<AtomicBool>,
    /// The server's Pause/Resume for this side's sending.
    paused_by_server: watch::Sender<bool>,
    stop: CancellationToken,
}

type Connections = Arc<Mutex<HashMap<i64, Connection>>>;

/// Message ids: any increasing sequence; remotedialer starts at a random value.
#[derive(Clone)]
struct Outbound {
    queue: mpsc::Sender<Message>,
    next_id: Arc<std::sync::atomic::AtomicI64>,
}

impl Outbound {
    async fn send(&self, conn_id: i64, body: Body) -> bool {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.queue_message(frame::encode(&Frame { id, conn_id, body }))
            .await
    }

    /// A connection's read, copied once into its message.
    async fn send_data(&self, conn_id: i64, payload: &[u8]) -> bool {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.queue_message(frame::encode_data(id, conn_id, payload))
            .await
    }

    async fn queue_message(&self, bytes: Vec<u8>) -> bool {
        self.queue.send(Message::binary(bytes)).await.is_ok()
    }
}

fn lock(connections: &Connections) -> std::sync::MutexGuard<'_, HashMap<i64, Connection>> {
    // A panic elsewhere cannot leave the map half-changed: every change is one call.
    connections.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves one session until the server closes it, it fails, goes silent, or `cancel`
/// fires. Every tunnelled connection ends with it.
pub async fn serve<S>(
    websocket: WebSocketStream<S>,
    config: &SessionConfig,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = websocket.split();
    let (queue, mut outbound_rx) = mpsc::channel::<Message>(OUTBOUND_QUEUE);
    let start_id = i64::from(rand_u32());
    let outbound = Outbound {
        queue,
        next_id: Arc::new(std::sync::atomic::AtomicI64::new(start_id)),
    };
    let connections: Connections = Arc::default();
    let session = cancel.child_token();
    let writer_metrics = metrics.clone();
    let writer = tokio::spawn(async move {
        while let Some(first) = outbound_rx.recv().await {
            // Feed what is queued, then flush once: fewer syscalls under load.
            let mut batch = vec![first];
            while batch.len() < 16 {
                match outbound_rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            for message in batch {
                if let Message::Binary(bytes) = &message {
                    writer_metrics
                        .tunnel_bytes("to_server")
                        .inc_by(bytes.len() as u64);
                }
                sink.feed(message).await?;
            }
            sink.flush().await?;
        }
        Ok::<(), tokio_tungstenite::tungstenite::Error>(())
    });
    let mut ping = tokio::time::interval(config.ping_interval);
    let mut sync = tokio::time::interval(config.sync_interval);
    sync.reset();
    let mut last_heard = tokio::time::Instant::now();
    let end = loop {
        let message = tokio::select! {
            _ = session.cancelled() => break SessionEnd::Cancelled,
            _ = ping.tick() => {
                if last_heard.elapsed() > config.idle_timeout {
                    break SessionEnd::Silent(config.idle_timeout);
                }
                let _ = outbound.queue.send(Message::Ping(Default::default())).await;
                continue;
            }
            _ = sync.tick() => {
                let mut ids: Vec<i64> = lock(&connections).keys().copied().collect();
                ids.sort_unstable();
                outbound.send(0, Body::SyncConnections(ids)).await;
                continue;
            }
            message = stream.next() => message,
        };
        let message = match message {
            None => break SessionEnd::Closed,
            Some(Err(e)) => break SessionEnd::WebSocket(e),
            Some(Ok(message)) => message,
        };
        last_heard = tokio::time::Instant::now();
        let bytes = match message {
            Message::Binary(bytes) => bytes,
            Message::Close(_) => break SessionEnd::Closed,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Text(_) => {
                metrics.tunnel_dropped("text_message").inc();
                continue;
            }
        };
        metrics
            .tunnel_bytes("from_server")
            .inc_by(bytes.len() as u64);
        let frame = match frame::decode(bytes) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::debug!(error = %e, "undecodable tunnel message dropped");
                metrics.tunnel_dropped("malformed").inc();
                continue;
            }
        };
        handle(frame, config, metrics, &connections, &outbound, &session).await;
    };
    session.cancel();
    let open: Vec<Connection> = lock(&connections).drain().map(|(_, c)| c).collect();
    for connection in open {
        connection.stop.cancel();
    }
    writer.abort();
    end
}

async fn handle(
    frame: Frame,
    config: &SessionConfig,
    metrics: &Metrics,
    connections: &Connections,
    outbound: &Outbound,
    session: &CancellationToken,
) {
    let conn_id = frame.conn_id;
    match frame.body {
        Body::Connect(payload) => {
            let refusal = match frame::connect_target(&payload, config.kubelet.port()) {
                Err(refusal) => Some(refusal.to_string()),
                Ok(_) => {
                    let open = lock(connections);
                    if open.contains_key(&conn_id) {
                        Some(format!("connection {conn_id} is already open"))
                    } else if open.len() >= config.max_connections {
                        Some(format!(
                            "too many tunnelled connections ({})",
                            config.max_connections
                        ))
                    } else {
                        None
                    }
                }
            };
            if let Some(why) = refusal {
                tracing::warn!(conn_id, reason = %why, "tunnel connect refused");
                metrics.tunnel_refused.inc();
                outbound.send(conn_id, Body::Error(why)).await;
                return;
            }
            open_connection(conn_id, config, metrics, connections, outbound, session);
        }
        Body::Data(bytes) => {
            let found = lock(connections).get(&conn_id).map(|c| {
                (
                    c.to_local.clone(),
                    c.room.clone(),
                    c.queued.clone(),
                    c.paused_by_us.clone(),
                )
            });
            let Some((to_local, room, queued, paused_by_us)) = found else {
                metrics.tunnel_dropped("unknown_connection").inc();
                outbound
                    .send(
                        conn_id,
                        Body::Error(format!("connection not found {conn_id}")),
                    )
                    .await;
                return;
            };
            let len = bytes.len();
            // Waits (reading nothing more from the server) while the queue is full.
            let Ok(permits) = room.acquire_many_owned(len.min(QUEUE_LIMIT) as u32).await else {
                return; // the connection ended meanwhile
            };
            permits.forget();
            let now = queued.fetch_add(len, Ordering::AcqRel) + len;
            if now > PAUSE_AT && !paused_by_us.swap(true, Ordering::AcqRel) {
                outbound.send(conn_id, Body::Pause).await;
            }
            let _ = to_local.send(bytes).await;
        }
        Body::Error(text) => {
            // The server is done: what is queued is still written, then the connection
            // closes (remotedialer reads its buffer before the error).
            if let Some(connection) = lock(connections).remove(&conn_id) {
                tracing::debug!(conn_id, error = %text, "tunnelled connection closed by the server");
                drop(connection.to_local);
            }
        }
        Body::Pause | Body::Resume => {
            let paused = matches!(frame.body, Body::Pause);
            if let Some(connection) = lock(connections).get(&conn_id) {
                connection.paused_by_server.send_replace(paused);
            }
        }
        Body::SyncConnections(live) => {
            // Whatever the server no longer has is stale here too.
            let stale: Vec<Connection> = {
                let mut open = lock(connections);
                let gone: Vec<i64> = open
                    .keys()
                    .filter(|id| !live.contains(id))
                    .copied()
                    .collect();
                gone.iter().filter_map(|id| open.remove(id)).collect()
            };
            for connection in stale {
                connection.stop.cancel();
            }
        }
        Body::AddClient(_) | Body::RemoveClient(_) => {}
        Body::Unknown(kind) => {
            tracing::debug!(kind, "tunnel message of unknown type ignored");
            metrics.tunnel_dropped("unknown_type").inc();
        }
    }
}

fn open_connection(
    conn_id: i64,
    config: &SessionConfig,
    metrics: &Metrics,
    connections: &Connections,
    outbound: &Outbound,
    session: &CancellationToken,
) {
    let (to_local, mut from_server) = mpsc::channel::<Bytes>(256);
    let room = Arc::new(Semaphore::new(QUEUE_LIMIT));
    let queued = Arc::new(AtomicUsize::new(0));
    let paused_by_us = Arc::new(AtomicBool::new(false));
    let (paused_by_server, mut server_paused) = watch::channel(false);
    let stop = session.child_token();
    lock(connections).insert(
        conn_id,
        Connection {
            to_local,
            room: room.clone(),
            queued: queued.clone(),
            paused_by_us: paused_by_us.clone(),
            paused_by_server,
            stop: stop.clone(),
        },
    );
    metrics.tunnel_connections.inc();
    let (kubelet, dial_timeout) = (config.kubelet, config.dial_timeout);
    let (connections, outbound, metrics) = (connections.clone(), outbound.clone(), metrics.clone());
    tokio::spawn(async move {
        let dialled = tokio::time::timeout(dial_timeout, tokio::net::TcpStream::connect(kubelet));
        let tcp = tokio::select! {
            _ = stop.cancelled() => None,
            dialled = dialled => Some(dialled),
        };
        let outcome = match tcp {
            None => None,
            Some(Ok(Ok(tcp))) => {
                let _ = tcp.set_nodelay(true);
                let (mut local_read, mut local_write) = tcp.into_split();
                let to_server = async {
                    let mut buffer = vec![0u8; READ_CHUNK];
                    loop {
                        if server_paused.wait_for(|paused| !paused).await.is_err() {
                            return None;
                        }
                        match local_read.read(&mut buffer).await {
                            Ok(0) => return Some("EOF".to_string()),
                            Ok(n) => {
                                if !outbound.send_data(conn_id, &buffer[..n]).await {
                                    return None;
                                }
                            }
                            Err(e) => return Some(e.to_string()),
                        }
                    }
                };
                let to_local = async {
                    while let Some(bytes) = from_server.recv().await {
                        let len = bytes.len();
                        let written = local_write.write_all(&bytes).await;
                        room.add_permits(len.min(QUEUE_LIMIT));
                        let left = queued.fetch_sub(len, Ordering::AcqRel) - len;
                        if left < RESUME_AT && paused_by_us.swap(false, Ordering::AcqRel) {
                            outbound.send(conn_id, Body::Resume).await;
                        }
                        if let Err(e) = written {
                            return Some(e.to_string());
                        }
                    }
                    // The server closed the connection: nothing to tell it.
                    None
                };
                tokio::select! {
                    _ = stop.cancelled() => None,
                    ended = to_server => ended,
                    ended = to_local => ended,
                }
            }
            Some(Ok(Err(e))) => Some(format!("dial {kubelet}: {e}")),
            Some(Err(_)) => Some(format!("dial {kubelet}: timed out")),
        };
        // Wakes a reader waiting for room, and refuses more data.
        room.close();
        let still_open = lock(&connections).remove(&conn_id).is_some();
        if let (true, Some(why)) = (still_open, outcome) {
            outbound.send(conn_id, Body::Error(why)).await;
        }
        metrics.tunnel_connections.dec();
    });
}

/// A random start for message ids, as remotedialer seeds its counter.
fn rand_u32() -> u32 {
    let mut bytes = [0u8; 4];
    // Message ids only need to differ between sessions; a fixed start is still correct.
    let _ = getrandom::getrandom(&mut bytes);
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// A "kubelet" that echoes, and closes the connection when it reads "close".
    async fn echo_kubelet() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = tcp.read(&mut buffer).await {
                        if n == 0 || &buffer[..n] == b"close" {
                            return;
                        }
                        if tcp.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    struct Server {
        websocket: WebSocketStream<tokio::io::DuplexStream>,
        next_id: i64,
    }

    impl Server {
        async fn send(&mut self, conn_id: i64, body: Body) {
            self.next_id += 1;
            let frame = Frame {
                id: self.next_id,
                conn_id,
                body,
            };
            self.raw(Message::binary(frame::encode(&frame))).await;
        }

        async fn raw(&mut self, message: Message) {
            self.websocket.send(message).await.expect("send");
        }

        /// The next message from the client that `keep` accepts (pings and others skipped).
        async fn expect(&mut self, keep: impl Fn(&Frame) -> bool) -> Frame {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let next = tokio::time::timeout_at(deadline, self.websocket.next())
                    .await
                    .expect("a message in time")
                    .expect("open")
                    .expect("message");
                if let Message::Binary(bytes) = next {
                    let frame = frame::decode(bytes).expect("decodable");
                    if keep(&frame) {
                        return frame;
                    }
                }
            }
        }

        /// Whether a message `matches` arrives within `wait`.
        async fn quiet(&mut self, wait: Duration, matches: impl Fn(&Frame) -> bool) -> bool {
            let until = tokio::time::Instant::now() + wait;
            while let Ok(Some(Ok(message))) =
                tokio::time::timeout_at(until, self.websocket.next()).await
            {
                if let Message::Binary(bytes) = message {
                    if frame::decode(bytes).is_ok_and(|f| matches(&f)) {
                        return false;
                    }
                }
            }
            true
        }
    }

    async fn session(config: SessionConfig, metrics: &Metrics) -> (Server, CancellationToken) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(server_io, Role::Server, None).await;
        let cancel = CancellationToken::new();
        let (metrics, stop) = (metrics.clone(), cancel.clone());
        tokio::spawn(async move { serve(client, &config, &metrics, &stop).await });
        (
            Server {
                websocket: server,
                next_id: 100,
            },
            cancel,
        )
    }

    fn data(conn_id: i64) -> impl Fn(&Frame) -> bool {
        move |f| f.conn_id == conn_id && matches!(f.body, Body::Data(_))
    }

    #[tokio::test]
    async fn connections_reach_the_kubelet_and_close_both_ways() {
        let port = echo_kubelet().await;
        let metrics = Metrics::new();
        let (mut server, cancel) = session(SessionConfig::new(port), &metrics).await;
        let target = format!("tcp/127.0.0.1:{port}").into_bytes();
        server.send(1, Body::Connect(target.clone())).await;
        server
            .send(1, Body::Data(Bytes::from_static(b"hello")))
            .await;
        let echoed = server.expect(data(1)).await;
        assert_eq!(echoed.body, Body::Data(Bytes::from_static(b"hello")));
        // The kubelet closes: the client says EOF.
        server
            .send(1, Body::Data(Bytes::from_static(b"close")))
            .await;
        let closed = server.expect(|f| f.conn_id == 1).await;
        assert_eq!(closed.body, Body::Error("EOF".into()));
        // The server closes: the connection goes, and later data is unknown.
        server.send(2, Body::Connect(target)).await;
        server
            .send(2, Body::Data(Bytes::from_static(b"ping")))
            .await;
        server.expect(data(2)).await;
        server.send(2, Body::Error("EOF".into())).await;
        server
            .send(2, Body::Data(Bytes::from_static(b"late")))
            .await;
        let answer = server.expect(|f| f.conn_id == 2).await;
        assert_eq!(answer.body, Body::Error("connection not found 2".into()));
        cancel.cancel();
    }

    #[tokio::test]
    async fn bad_input_is_refused_and_counted_and_the_session_stays() {
        let port = echo_kubelet().await;
        let metrics = Metrics::new();
        let (mut server, cancel) = session(SessionConfig::new(port), &metrics).await;
        server
            .send(5, Body::Connect(b"tcp/10.0.0.1:22".to_vec()))
            .await;
        let refused = server.expect(|f| f.conn_id == 5).await;
        assert_eq!(
            refused.body,
            Body::Error("connect not allowed: tcp/10.0.0.1:22".into())
        );
        let long = format!("tcp/{}:{port}", "a".repeat(400)).into_bytes();
        server.send(6, Body::Connect(long)).await;
        assert!(matches!(
            server.expect(|f| f.conn_id == 6).await.body,
            Body::Error(text) if text.contains("longer than 266")
        ));
        server.raw(Message::binary(vec![0x80u8])).await;
        server.raw(Message::text("not binary")).await;
        server.send(7, Body::Unknown(42)).await;
        // Still serving.
        server
            .send(
                8,
                Body::Connect(format!("tcp/127.0.0.1:{port}").into_bytes()),
            )
            .await;
        server
            .send(8, Body::Data(Bytes::from_static(b"after")))
            .await;
        assert_eq!(
            server.expect(data(8)).await.body,
            Body::Data(Bytes::from_static(b"after"))
        );
        assert_eq!(metrics.tunnel_refused.get(), 2);
        for reason in ["malformed", "text_message", "unknown_type"] {
            assert_eq!(metrics.tunnel_dropped(reason).get(), 1, "{reason}");
        }
        cancel.cancel();
    }

    #[tokio::test]
    async fn pause_resume_and_sync_connections() {
        let port = echo_kubelet().await;
        let metrics = Metrics::new();
        let config = SessionConfig {
            sync_interval: Duration::from_millis(300),
            ..SessionConfig::new(port)
        };
        let (mut server, cancel) = session(config, &metrics).await;
        let target = format!("tcp/127.0.0.1:{port}").into_bytes();
        server.send(3, Body::Connect(target.clone())).await;
        server.send(4, Body::Connect(target)).await;
        // Paused: the kubelet's answer waits.
        server.send(3, Body::Pause).await;
        server
            .send(3, Body::Data(Bytes::from_static(b"held")))
            .await;
        assert!(server.quiet(Duration::from_millis(400), data(3)).await);
        server.send(3, Body::Resume).await;
        assert_eq!(
            server.expect(data(3)).await.body,
            Body::Data(Bytes::from_static(b"held"))
        );
        // The client lists its live connections.
        let sync = server
            .expect(|f| matches!(f.body, Body::SyncConnections(_)))
            .await;
        assert_eq!(sync.body, Body::SyncConnections(vec![3, 4]));
        // A sync from the server without 4 closes it here.
        server.send(0, Body::SyncConnections(vec![3])).await;
        let next = server
            .expect(|f| matches!(f.body, Body::SyncConnections(_)))
            .await;
        assert_eq!(next.body, Body::SyncConnections(vec![3]));
        cancel.cancel();
    }

    type ServerStream = futures::stream::SplitStream<WebSocketStream<tokio::io::DuplexStream>>;

    async fn next_of(stream: &mut ServerStream, wanted: Body) {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("in time")
                .expect("open")
                .expect("message");
            if let Message::Binary(bytes) = message {
                if frame::decode(bytes).expect("frame").body == wanted {
                    return;
                }
            }
        }
    }

    /// A kubelet that reads nothing until told to, with a small receive buffer: (port,
    /// the signal to start reading, everything it read once the connection closed).
    async fn slow_kubelet() -> (
        u16,
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Receiver<Vec<u8>>,
    ) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("buffer");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(1).expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let (read_now, start_reading) = tokio::sync::oneshot::channel::<()>();
        let (total_tx, total_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let _ = start_reading.await;
            let mut received = Vec::new();
            let _ = tcp.read_to_end(&mut received).await;
            let _ = total_tx.send(received);
        });
        (port, read_now, total_rx)
    }

    fn data_frame(id: i64, body: Body) -> Message {
        Message::binary(frame::encode(&Frame {
            id,
            conn_id: 9,
            body,
        }))
    }

    #[tokio::test]
    async fn a_flood_for_one_connection_is_paused_and_nothing_is_lost() {
        let (port, read_now, total_rx) = slow_kubelet().await;
        let metrics = Metrics::new();
        let (server, cancel) = session(SessionConfig::new(port), &metrics).await;
        let (mut sink, mut stream) = server.websocket.split();
        let connect = format!("tcp/127.0.0.1:{port}").into_bytes();
        sink.send(data_frame(1, Body::Connect(connect)))
            .await
            .expect("send");
        // The server sends until the client pauses it, as remotedialer's writer does.
        let chunk: Vec<u8> = (0..32 * 1024).map(|i| (i % 251) as u8).collect();
        let paused = Arc::new(AtomicBool::new(false));
        let sender = {
            let (chunk, paused) = (chunk.clone(), paused.clone());
            tokio::spawn(async move {
                let mut sent = 0usize;
                while !paused.load(Ordering::Acquire) && sent < 64 * PAUSE_AT {
                    sink.send(data_frame(2, Body::Data(Bytes::from(chunk.clone()))))
                        .await
                        .expect("send");
                    sent += chunk.len();
                }
                (sink, sent)
            })
        };
        next_of(&mut stream, Body::Pause).await;
        paused.store(true, Ordering::Release);
        let (mut sink, sent) = sender.await.expect("sender");
        assert!(sent > PAUSE_AT, "paused only after {PAUSE_AT} bytes queued");
        let _ = read_now.send(());
        next_of(&mut stream, Body::Resume).await;
        sink.send(data_frame(3, Body::Error("EOF".into())))
            .await
            .expect("send");
        let received = total_rx.await.expect("kubelet read");
        assert_eq!(received.len(), sent);
        assert!(received.chunks(chunk.len()).all(|c| c == chunk.as_slice()));
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_server_that_ignores_pause_is_slowed_down_and_nothing_is_lost() {
        // As k3s 1.21's remotedialer, which knows no Pause: it writes until the
        // WebSocket stops taking data, which happens once the connection's queue is full.
        let (port, read_now, total_rx) = slow_kubelet().await;
        let metrics = Metrics::new();
        let (server, cancel) = session(SessionConfig::new(port), &metrics).await;
        let (mut sink, _stream) = server.websocket.split();
        let connect = format!("tcp/127.0.0.1:{port}").into_bytes();
        sink.send(data_frame(1, Body::Connect(connect)))
            .await
            .expect("send");
        let chunk: Vec<u8> = (0..32 * 1024).map(|i| (i % 251) as u8).collect();
        let total = 3 * QUEUE_LIMIT;
        let sender = {
            let chunk = chunk.clone();
            tokio::spawn(async move {
                for _ in 0..total / chunk.len() {
                    sink.send(data_frame(2, Body::Data(Bytes::from(chunk.clone()))))
                        .await
                        .expect("send");
                }
                sink
            })
        };
        // Blocked: more than the queue and the pipe between them hold cannot be sent.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!sender.is_finished(), "the session read without bound");
        let _ = read_now.send(());
        let mut sink = tokio::time::timeout(Duration::from_secs(20), sender)
            .await
            .expect("the flood drains")
            .expect("sender");
        sink.send(data_frame(3, Body::Error("EOF".into())))
            .await
            .expect("send");
        let received = total_rx.await.expect("kubelet read");
        assert_eq!(received.len(), total);
        assert!(received.chunks(chunk.len()).all(|c| c == chunk.as_slice()));
        cancel.cancel();
    }
}
